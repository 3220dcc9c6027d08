//! Property tests: every method of the spec, every field value type and the
//! content header properties round-trip; random bytes never panic a decoder.

use amqp091::protocol::frame::{self, FrameDecoder};
use amqp091::protocol::methods::{Method, ALL_METHODS};
use amqp091::protocol::wire::{self, MAX_NESTING};
use amqp091::protocol::{
    BasicProperties, Decimal, FieldTable, FieldValue, MethodInfo, ShortString, WireKind,
};
use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

fn short_string() -> impl Strategy<Value = ShortString> {
    proptest::string::string_regex("[a-zA-Z0-9._:-]{0,40}|\\PC{0,20}")
        .expect("regex")
        .prop_filter_map("≤255 bytes", |s| ShortString::new(s).ok())
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn field_value() -> impl Strategy<Value = FieldValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(FieldValue::Bool),
        any::<i8>().prop_map(FieldValue::I8),
        any::<u8>().prop_map(FieldValue::U8),
        any::<i16>().prop_map(FieldValue::I16),
        any::<u16>().prop_map(FieldValue::U16),
        any::<i32>().prop_map(FieldValue::I32),
        any::<u32>().prop_map(FieldValue::U32),
        any::<i64>().prop_map(FieldValue::I64),
        any::<u32>().prop_map(|b| FieldValue::F32(f32::from_bits(b))),
        any::<u64>().prop_map(|b| FieldValue::F64(f64::from_bits(b))),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| FieldValue::Decimal(Decimal { scale, value })),
        bytes(64).prop_map(FieldValue::LongString),
        bytes(64).prop_map(FieldValue::Bytes),
        any::<u64>().prop_map(FieldValue::Timestamp),
        Just(FieldValue::Void),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(FieldValue::Array),
            proptest::collection::vec((short_string(), inner), 0..8)
                .prop_map(|entries| FieldValue::Table(entries.into_iter().collect())),
        ]
    })
}

fn field_table() -> impl Strategy<Value = FieldTable> {
    proptest::collection::vec((short_string(), field_value()), 0..12)
        .prop_map(|e| e.into_iter().collect())
}

/// One value of a method field, to be written by the test's own encoder.
#[derive(Debug, Clone)]
enum Arg {
    Octet(u8),
    Short(u16),
    Long(u32),
    LongLong(u64),
    Str(ShortString),
    LongStr(Bytes),
    Bit(bool),
    Table(FieldTable),
}

fn arg(kind: WireKind, reserved: bool) -> BoxedStrategy<Arg> {
    // Reserved fields are always zero on the wire: the encoder writes them so.
    if reserved {
        return Just(match kind {
            WireKind::Octet => Arg::Octet(0),
            WireKind::Short => Arg::Short(0),
            WireKind::Long => Arg::Long(0),
            WireKind::LongLong | WireKind::Timestamp => Arg::LongLong(0),
            WireKind::ShortStr => Arg::Str(ShortString::default()),
            WireKind::LongStr => Arg::LongStr(Bytes::new()),
            WireKind::Bit => Arg::Bit(false),
            WireKind::Table => Arg::Table(FieldTable::new()),
        })
        .boxed();
    }
    match kind {
        WireKind::Octet => any::<u8>().prop_map(Arg::Octet).boxed(),
        WireKind::Short => any::<u16>().prop_map(Arg::Short).boxed(),
        WireKind::Long => any::<u32>().prop_map(Arg::Long).boxed(),
        WireKind::LongLong | WireKind::Timestamp => any::<u64>().prop_map(Arg::LongLong).boxed(),
        WireKind::ShortStr => short_string().prop_map(Arg::Str).boxed(),
        WireKind::LongStr => bytes(200).prop_map(Arg::LongStr).boxed(),
        WireKind::Bit => any::<bool>().prop_map(Arg::Bit).boxed(),
        WireKind::Table => field_table().prop_map(Arg::Table).boxed(),
    }
}

/// A method picked from the spec and random values for its fields.
fn method_args() -> impl Strategy<Value = (&'static MethodInfo, Vec<Arg>)> {
    proptest::sample::select(ALL_METHODS.to_vec()).prop_flat_map(|info| {
        let fields: Vec<BoxedStrategy<Arg>> = info
            .fields
            .iter()
            .map(|f| arg(f.kind, f.reserved))
            .collect();
        (Just(info), fields)
    })
}

/// The spec's argument encoding, written independently of the generated code:
/// consecutive bits share an octet, lowest bit first.
fn encode_args(args: &[Arg]) -> BytesMut {
    let mut buf = BytesMut::new();
    let mut bit_index = 8;
    for a in args {
        if let Arg::Bit(b) = a {
            if bit_index == 8 {
                buf.put_u8(0);
                bit_index = 0;
            }
            if *b {
                let last = buf.len() - 1;
                buf[last] |= 1 << bit_index;
            }
            bit_index += 1;
            continue;
        }
        bit_index = 8;
        match a {
            Arg::Octet(v) => buf.put_u8(*v),
            Arg::Short(v) => buf.put_u16(*v),
            Arg::Long(v) => buf.put_u32(*v),
            Arg::LongLong(v) => buf.put_u64(*v),
            Arg::Str(s) => {
                buf.put_u8(s.len() as u8);
                buf.put_slice(s.as_bytes());
            }
            Arg::LongStr(b) => {
                buf.put_u32(b.len() as u32);
                buf.put_slice(b);
            }
            Arg::Table(t) => wire::write_table(&mut buf, t),
            Arg::Bit(_) => unreachable!(),
        }
    }
    buf
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_method_round_trips((info, args) in method_args()) {
        let wire_args = encode_args(&args).freeze();
        let mut input = &wire_args[..];
        let method = Method::decode_args(info.id, &mut input).expect("decodes");
        prop_assert!(input.is_empty(), "{} left bytes unread", info.name);
        prop_assert_eq!(method.info(), info);

        let mut encoded = BytesMut::new();
        method.encode_args(&mut encoded);
        prop_assert_eq!(&encoded[..], &wire_args[..], "{} re-encodes differently", info.name);

        let mut framed = BytesMut::new();
        frame::write_method(&mut framed, 5, &method);
        let decoded = FrameDecoder::new(u32::MAX).decode(&mut framed).expect("valid").expect("whole");
        prop_assert_eq!(decoded, amqp091::protocol::Frame::Method { channel: 5, method });
    }

    #[test]
    fn field_tables_round_trip(table in field_table()) {
        let mut buf = BytesMut::new();
        wire::write_table(&mut buf, &table);
        let encoded = buf.freeze();
        let mut input = &encoded[..];
        let decoded = wire::read_table(&mut input).expect("decodes");
        prop_assert!(input.is_empty());
        prop_assert_eq!(&decoded, &table);
        let mut again = BytesMut::new();
        wire::write_table(&mut again, &decoded);
        prop_assert_eq!(&again[..], &encoded[..]);
    }

    #[test]
    fn content_header_properties_round_trip(
        content_type in proptest::option::of(short_string()),
        headers in proptest::option::of(field_table()),
        delivery_mode in proptest::option::of(any::<u8>()),
        priority in proptest::option::of(any::<u8>()),
        correlation_id in proptest::option::of(short_string()),
        expiration in proptest::option::of(short_string()),
        timestamp in proptest::option::of(any::<u64>()),
        app_id in proptest::option::of(short_string()),
        reserved in proptest::option::of(short_string()),
        body_size in any::<u64>(),
    ) {
        let properties = BasicProperties {
            content_type, headers, delivery_mode, priority, correlation_id, expiration,
            timestamp, app_id, reserved, ..BasicProperties::default()
        };
        let mut buf = BytesMut::new();
        frame::write_header(&mut buf, 9, body_size, &properties);
        let decoded = FrameDecoder::new(u32::MAX).decode(&mut buf).expect("valid").expect("whole");
        let amqp091::protocol::Frame::Header { channel: 9, header } = decoded else {
            panic!("not a header: {decoded:?}");
        };
        prop_assert_eq!(header.body_size, body_size);
        prop_assert_eq!(header.properties, properties);
    }

    #[test]
    fn checking_a_property_list_fails_exactly_where_decoding_fails(
        flags in any::<u16>(),
        tail in proptest::collection::vec(any::<u8>(), 0..96),
        content_type in proptest::option::of(short_string()),
        headers in proptest::option::of(field_table()),
        message_id in proptest::option::of(short_string()),
        timestamp in proptest::option::of(any::<u64>()),
        cut in any::<prop::sample::Index>(),
        flip in any::<(prop::sample::Index, u8)>(),
    ) {
        // Random flags (the two unused bits cleared half of the time) over
        // random bytes, and a valid list cut short or with one byte changed.
        let flags = if tail.first().is_some_and(|b| b & 1 == 0) { flags & !3 } else { flags };
        let mut random = flags.to_be_bytes().to_vec();
        random.extend_from_slice(&tail);
        let properties = BasicProperties {
            content_type, headers, message_id, timestamp, ..BasicProperties::default()
        };
        let mut valid = BytesMut::new();
        properties.encode(&mut valid);
        let cut_short = valid[..cut.index(valid.len() + 1)].to_vec();
        let mut changed = valid.to_vec();
        let at = flip.0.index(changed.len());
        changed[at] ^= flip.1;
        for input in [&random[..], &valid[..], &cut_short[..], &changed[..]] {
            let mut skipped = input;
            let mut decoded = input;
            let skip = BasicProperties::skip(&mut skipped);
            let decode = BasicProperties::decode(&mut decoded);
            prop_assert_eq!(skip.as_ref().err(), decode.as_ref().err());
            if skip.is_ok() {
                prop_assert_eq!(skipped.len(), decoded.len());
                // What the frame decoder keeps encoded decodes to the same.
                let kept = &input[..input.len() - skipped.len()];
                let received = amqp091::protocol::ReceivedProperties::decode(kept).expect("checked");
                prop_assert_eq!(&*received, decode.as_ref().expect("decoded"));
            }
        }
    }

    #[test]
    fn random_bytes_never_panic_the_frame_decoder(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&data[..]);
        let mut decoder = FrameDecoder::new(4096);
        while let Ok(Some(_)) = decoder.decode(&mut buf) {}
    }

    #[test]
    fn random_frame_payloads_never_panic(frame_type in 1u8..=3, payload in proptest::collection::vec(any::<u8>(), 0..256)) {
        // A valid frame envelope around random bytes reaches the method,
        // header and body parsers instead of stopping at the framing checks.
        let mut buf = BytesMut::new();
        buf.put_u8(frame_type);
        buf.put_u16(1);
        buf.put_u32(payload.len() as u32);
        buf.put_slice(&payload);
        buf.put_u8(0xCE);
        let _ = FrameDecoder::new(4096).decode(&mut buf);
    }

    #[test]
    fn random_bytes_never_panic_the_table_decoder(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = wire::read_table(&mut &data[..]);
    }
}

#[test]
fn nesting_beyond_the_limit_is_an_error_not_a_stack_overflow() {
    // Table → 'F' table → … built from the inside out.
    let mut inner = BytesMut::new();
    inner.put_u32(0);
    for _ in 0..(MAX_NESTING + 10) as usize {
        let mut outer = BytesMut::new();
        outer.put_u32((inner.len() + 3) as u32);
        outer.put_u8(1);
        outer.put_u8(b'k');
        outer.put_u8(b'F');
        outer.put_slice(&inner);
        inner = outer;
    }
    let err = wire::read_table(&mut &inner[..]).expect_err("too deep");
    assert_eq!(
        err,
        amqp091::protocol::DecodeError::NestingTooDeep(MAX_NESTING)
    );
}

#[test]
fn a_length_claim_beyond_the_input_allocates_nothing_and_fails() {
    let err = wire::read_table(&mut &[0xFF, 0xFF, 0xFF, 0xF0, b'x'][..]).expect_err("truncated");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn short_strings_compare_by_content_whatever_their_storage() {
    let inline = ShortString::new("routing.key").expect("short");
    let stat = ShortString::from_static("routing.key");
    assert_eq!(inline, stat);
    let long = "x".repeat(200);
    let heap = ShortString::new(&long).expect("≤255");
    assert_eq!(heap.to_str(), Ok(long.as_str()));
    assert_eq!(ShortString::new("a".repeat(31)).expect("31").len(), 31);
    assert_eq!(
        ShortString::new("é".repeat(15)).expect("30 bytes").to_str(),
        Ok("é".repeat(15).as_str())
    );
    assert!(ShortString::new("y".repeat(256)).is_err());
    assert_eq!(std::mem::size_of::<ShortString>(), 32);
}

#[test]
fn short_strings_convert_from_str_and_string_without_failing() {
    let from_str: ShortString = "jobs".into();
    let from_string: ShortString = String::from("jobs").into();
    let from_ref: ShortString = (&String::from("jobs")).into();
    assert_eq!(from_str, "jobs");
    assert_eq!(from_str, from_string);
    assert_eq!(from_str, from_ref);
    for len in [0, 31, 32, 255] {
        let text = "q".repeat(len);
        let short: ShortString = text.clone().into();
        assert_eq!(short.to_str(), Ok(text.as_str()));
        assert!(short.check().is_ok(), "{len} bytes fit");
    }
    // Longer is held, and refused when it would be encoded.
    let long: ShortString = "n".repeat(256).into();
    assert_eq!(long.len(), 256);
    assert_eq!(long.check().map_err(|e| e.len), Err(256));
    let long_static = ShortString::from_static(concat!(
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef!"
    ));
    assert_eq!(long_static.check().map_err(|e| e.len), Err(257));
}

#[test]
fn over_long_short_strings_are_named_by_the_checks_of_methods_and_properties() {
    use amqp091::protocol::{basic, queue, BadField};
    let long = "n".repeat(256);
    let declare = queue::Declare {
        queue: long.as_str().into(),
        ..Default::default()
    };
    assert_eq!(
        declare.check_short_strings(),
        Err(BadField::TooLong {
            field: "queue",
            len: 256
        })
    );
    let method = Method::QueueDeclare(declare);
    assert_eq!(
        method.check_short_strings().map_err(|e| match e {
            BadField::TooLong { field, .. } | BadField::NotUtf8 { field } => field,
        }),
        Err("queue")
    );
    let bind = queue::Bind {
        queue: "q".into(),
        exchange: "x".into(),
        routing_key: "k".into(),
        arguments: FieldTable::new().with("nested", FieldTable::new().with(long.as_str(), 1i32)),
        ..Default::default()
    };
    assert_eq!(
        bind.check_short_strings(),
        Err(BadField::TooLong {
            field: "arguments",
            len: 256
        })
    );
    let publish = basic::Publish {
        routing_key: long.as_str().into(),
        ..Default::default()
    };
    assert_eq!(
        publish.check_short_strings().map_err(|e| match e {
            BadField::TooLong { field, .. } | BadField::NotUtf8 { field } => field,
        }),
        Err("routing-key")
    );
    let fine = BasicProperties::default()
        .with_content_type("text/plain")
        .with_message_id(String::from("1"))
        .with_headers(FieldTable::new().with("k", "v"));
    assert_eq!(fine.check_short_strings(), Ok(()));
    assert_eq!(
        fine.clone()
            .with_correlation_id(long.as_str())
            .check_short_strings(),
        Err(BadField::TooLong {
            field: "correlation-id",
            len: 256
        })
    );
    assert_eq!(
        fine.with_headers(FieldTable::new().with(&long, "v"))
            .check_short_strings()
            .map_err(|e| match e {
                BadField::TooLong { field, .. } | BadField::NotUtf8 { field } => field,
            }),
        Err("headers")
    );
}

#[test]
fn method_shortstrs_that_are_not_utf8_are_refused_but_properties_and_keys_are_bytes() {
    use amqp091::protocol::{basic, BadField};
    let latin1: ShortString = b"caf\xe9".as_slice().into();
    let publish = basic::Publish {
        routing_key: latin1.clone(),
        ..Default::default()
    };
    assert_eq!(
        publish.check_short_strings(),
        Err(BadField::NotUtf8 {
            field: "routing-key"
        })
    );
    let consume = basic::Consume {
        queue: "q".into(),
        consumer_tag: latin1.clone(),
        ..Default::default()
    };
    assert_eq!(
        Method::BasicConsume(consume).check_short_strings(),
        Err(BadField::NotUtf8 {
            field: "consumer-tag"
        })
    );
    // UTF-8 beyond ASCII, inline and on the heap, passes.
    for text in ["café", &"é".repeat(100)] {
        let publish = basic::Publish {
            routing_key: text.into(),
            ..Default::default()
        };
        assert_eq!(publish.check_short_strings(), Ok(()), "{text}");
    }
    let properties = BasicProperties::default()
        .with_headers(FieldTable::new().with(latin1.clone(), "v"))
        .with_message_id(latin1);
    assert_eq!(properties.check_short_strings(), Ok(()));
}

#[test]
fn the_properties_setters_take_plain_strings() {
    let properties = BasicProperties::default()
        .with_content_type("text/plain")
        .with_message_id("1")
        .with_reply_to(String::from("amq.rabbitmq.reply-to"))
        .with_delivery_mode(2);
    assert_eq!(properties.content_type.as_ref().unwrap(), "text/plain");
    assert_eq!(properties.message_id.as_ref().unwrap(), "1");
    assert_eq!(
        properties.reply_to.as_ref().unwrap(),
        "amq.rabbitmq.reply-to"
    );
    assert_eq!(properties.delivery_mode, Some(2));
}

#[test]
fn confirmations_say_whether_the_broker_acked() {
    use amqp091::Confirmation;
    assert!(Confirmation::Ack.is_ack());
    assert!(!Confirmation::Nack.is_ack());
    assert!(!Confirmation::NotRequested.is_ack());
}

#[test]
fn non_utf8_short_strings_from_the_wire_keep_their_bytes() {
    let mut input: &[u8] = &[3, b'a', 0xFF, b'b'];
    let s = wire::read_short_string(&mut input).expect("any bytes");
    assert_eq!(s.as_bytes(), b"a\xFFb");
    let not_utf8 = s.to_str().expect_err("0xFF is not UTF-8");
    assert_eq!(not_utf8.valid_up_to(), 1);
    assert_eq!(s.to_string_lossy(), "a\u{FFFD}b");
    assert_eq!(s.to_string(), "a\u{FFFD}b");
    assert_eq!(format!("{s:?}"), r#"b"a\xffb""#);
    // Encoded again, byte for byte.
    let mut out = BytesMut::new();
    wire::write_short_string(&mut out, &s);
    assert_eq!(&out[..], &[3, b'a', 0xFF, b'b']);
    // Text and bytes of the same value are the same short string.
    assert_eq!(ShortString::from("é"), ShortString::from(&b"\xc3\xa9"[..]));
    assert_eq!(format!("{:?}", ShortString::from("é")), r#""é""#);
}

#[test]
fn short_strings_of_every_inline_length_decode_with_and_without_bytes_after_them() {
    // Strings up to 31 bytes are taken as a 32-byte window when the input
    // holds one, else assembled from the text alone: both paths, each length.
    for len in 0..=40usize {
        let text: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        for after in [0usize, 1, 31, 40] {
            let mut input = vec![len as u8];
            input.extend_from_slice(&text);
            input.extend((0..after).map(|i| 0x80 | i as u8));
            let mut rest = &input[..];
            let decoded = wire::read_short_string(&mut rest).expect("valid");
            assert_eq!(decoded.as_bytes(), &text[..], "length {len}, {after} after");
            assert_eq!(
                rest.len(),
                after,
                "length {len}: the bytes after stay unread"
            );
            let copy = decoded.clone();
            assert_eq!(copy, decoded);
            assert!(
                decoded.is_utf8(),
                "length {len}: the bytes after are not looked at"
            );
            // One byte that is not ASCII, at each position, is seen.
            for at in 0..len {
                let mut input = input.clone();
                input[1 + at] = 0xE9;
                let decoded = wire::read_short_string(&mut &input[..]).expect("valid");
                assert!(!decoded.is_utf8(), "length {len}, 0xE9 at {at}");
            }
        }
    }
}

proptest! {
    #[test]
    fn short_strings_from_any_bytes_decode_unchanged_and_consume_exactly_their_length(
        text in proptest::collection::vec(any::<u8>(), 0..=255),
        ascii in any::<bool>(),
        after in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let text: Vec<u8> = if ascii { text.iter().map(|b| b & 0x7F).collect() } else { text };
        let mut input = vec![text.len() as u8];
        input.extend_from_slice(&text);
        input.extend_from_slice(&after);
        let mut rest = &input[..];
        let decoded = wire::read_short_string(&mut rest).expect("any bytes decode");
        prop_assert_eq!(decoded.as_bytes(), &text[..]);
        prop_assert_eq!(rest, &after[..]);
        prop_assert_eq!(decoded.to_str().ok(), std::str::from_utf8(&text).ok());
        prop_assert_eq!(decoded.is_utf8(), std::str::from_utf8(&text).is_ok());
        let mut out = BytesMut::new();
        wire::write_short_string(&mut out, &decoded);
        prop_assert_eq!(&out[..], &input[..input.len() - after.len()]);
    }
}
