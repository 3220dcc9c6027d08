//! Fuzzes `FrameDecoder::decode` on an arbitrary byte stream.
//!
//! The input is one read buffer: frames are decoded until the decoder asks for
//! more bytes (`Ok(None)`) or reports a corrupt stream (`Err`). Every method
//! and content header frame that decodes is written back with the crate's own
//! encoder and decoded again; the second decode must succeed, consume exactly
//! the bytes written, and give back an equal frame.

#![no_main]

use amqp091::protocol::frame::{write_header, write_method};
use amqp091::protocol::{Frame, FrameDecoder};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// RabbitMQ's default frame_max.
const MAX_FRAME_SIZE: u32 = 128 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut decoder = FrameDecoder::new(MAX_FRAME_SIZE);
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match decoder.decode(&mut buf) {
            Ok(Some(frame)) => {
                assert!(buf.len() < before, "a decoded frame consumed no bytes");
                check_round_trip(&frame);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                break;
            }
            Err(_) => break,
        }
    }
});

/// Re-encodes `frame` and checks it decodes to an equal frame.
fn check_round_trip(frame: &Frame) {
    let mut encoded = BytesMut::new();
    match frame {
        Frame::Method { channel, method } => write_method(&mut encoded, *channel, method),
        Frame::Header { channel, header } => {
            write_header(&mut encoded, *channel, header.body_size, &header.properties)
        }
        Frame::Body { .. } | Frame::Heartbeat => return,
    }
    // Re-encoding can grow a frame (non-UTF-8 shortstr bytes are replaced by
    // U+FFFD on decode), so the second decoder takes any size.
    let mut again = FrameDecoder::new(u32::MAX);
    let bytes = encoded.clone();
    let decoded = match again.decode(&mut encoded) {
        Ok(Some(decoded)) => decoded,
        other => panic!(
            "re-encoded frame does not decode: {other:?}\nframe: {frame:?}\nbytes: {bytes:02x?}"
        ),
    };
    assert!(
        encoded.is_empty(),
        "{} bytes left after decoding the re-encoded frame {frame:?}",
        encoded.len()
    );
    assert_eq!(&decoded, frame, "frame changed in a round trip");
}
