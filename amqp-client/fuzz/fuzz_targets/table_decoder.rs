//! Fuzzes `wire::read_table` and checks the `write_table` round trip.
//!
//! When the input starts with a table that decodes, the table is written back
//! and read again: the second read must succeed, consume exactly the bytes
//! written and give an equal table, and writing that table again must give the
//! same bytes (the encoding of a decoded table is stable).

#![no_main]

use amqp091::protocol::wire::{read_table, write_table};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

/// The readers' input type is inferred from `read_table`'s signature, so this
/// target builds whether the readers take `&mut Bytes` or `&mut &[u8]`
/// (`wire::Input`).
trait ReadInput<'a> {
    fn from_slice(data: &'a [u8]) -> Self;
    fn unread(&self) -> usize;
}

impl<'a> ReadInput<'a> for Bytes {
    fn from_slice(data: &'a [u8]) -> Self {
        Bytes::copy_from_slice(data)
    }
    fn unread(&self) -> usize {
        self.len()
    }
}

impl<'a> ReadInput<'a> for &'a [u8] {
    fn from_slice(data: &'a [u8]) -> Self {
        data
    }
    fn unread(&self) -> usize {
        self.len()
    }
}

fn input<'a, I: ReadInput<'a>>(data: &'a [u8]) -> I {
    I::from_slice(data)
}

fn unread<'a, I: ReadInput<'a>>(input: &I) -> usize {
    input.unread()
}

fuzz_target!(|data: &[u8]| {
    let mut first = input(data);
    let Ok(table) = read_table(&mut first) else {
        return;
    };
    assert!(unread(&first) <= data.len());

    let mut encoded = BytesMut::new();
    write_table(&mut encoded, &table);
    let encoded = encoded.freeze();

    let mut second = input(&encoded);
    let again = match read_table(&mut second) {
        Ok(again) => again,
        Err(err) => panic!(
            "re-encoded table does not decode: {err}\ntable: {table:?}\nbytes: {encoded:02x?}"
        ),
    };
    assert_eq!(
        unread(&second),
        0,
        "bytes left after reading the re-encoded table"
    );
    assert_eq!(again, table, "table changed in a round trip");

    let mut reencoded = BytesMut::new();
    write_table(&mut reencoded, &again);
    assert_eq!(&reencoded[..], &encoded[..], "table encoding is not stable");
});
