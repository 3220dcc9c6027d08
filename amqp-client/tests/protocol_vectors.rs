//! Known byte vectors, checked byte for byte against hand-assembled frames
//! and a `connection.start` captured from RabbitMQ 3.10.

use amqp091::protocol::frame::{self, Frame, FrameDecoder};
use amqp091::protocol::methods::{basic, Method};
use amqp091::protocol::{
    BasicProperties, FieldValue, ReplyCode, ReplyError, ReplyKind, ShortString,
};
use bytes::{BufMut, BytesMut};

fn short(s: &str) -> ShortString {
    ShortString::new(s).expect("short enough")
}

/// Assembles a frame the long way, independently of the encoder under test.
fn frame_bytes(frame_type: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![frame_type];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(0xCE);
    out
}

fn shortstr(s: &str) -> Vec<u8> {
    let mut out = vec![s.len() as u8];
    out.extend_from_slice(s.as_bytes());
    out
}

fn decode_all(bytes: &[u8], max: u32) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut decoder = FrameDecoder::new(max);
    let mut frames = Vec::new();
    while let Some(frame) = decoder.decode(&mut buf).expect("valid frames") {
        frames.push(frame);
    }
    assert!(buf.is_empty(), "{} bytes left undecoded", buf.len());
    frames
}

#[test]
fn connection_start_as_rabbitmq_sends_it() {
    let captured = include_bytes!("fixtures/rabbitmq-3.10-connection-start.bin");
    let frames = decode_all(captured, 131_072);
    let [Frame::Method {
        channel: 0,
        method: Method::ConnectionStart(start),
    }] = frames.as_slice()
    else {
        panic!("expected one connection.start on channel 0, got {frames:?}");
    };
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    assert_eq!(start.mechanisms.as_ref(), b"PLAIN AMQPLAIN");
    assert_eq!(start.locales.as_ref(), b"en_US");
    let props = &start.server_properties;
    assert_eq!(
        props.get("product").and_then(FieldValue::as_str),
        Some("RabbitMQ")
    );
    assert!(props
        .get("version")
        .and_then(FieldValue::as_str)
        .is_some_and(|v| v.starts_with("3.")));
    let Some(FieldValue::Table(capabilities)) = props.get("capabilities") else {
        panic!("capabilities table missing: {props:?}");
    };
    for flag in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
    ] {
        assert_eq!(
            capabilities.get(flag),
            Some(&FieldValue::Bool(true)),
            "{flag}"
        );
    }

    let mut reencoded = BytesMut::new();
    frame::write_method(&mut reencoded, 0, &Method::ConnectionStart(start.clone()));
    assert_eq!(
        &reencoded[..],
        &captured[..],
        "re-encoding must give the captured bytes"
    );
}

#[test]
fn basic_publish_header_and_body_byte_for_byte() {
    let mut method = vec![0x00, 0x3C, 0x00, 0x28, 0x00, 0x00];
    method.extend(shortstr("amq.direct"));
    method.extend(shortstr("rk"));
    method.push(0b0000_0001); // mandatory = bit 0, immediate = bit 1
    let mut header = vec![0x00, 0x3C, 0x00, 0x00];
    header.extend_from_slice(&5u64.to_be_bytes());
    header.extend_from_slice(&0x9000u16.to_be_bytes()); // content-type (bit 15), delivery-mode (bit 12)
    header.extend(shortstr("text/plain"));
    header.push(2);
    let mut expected = frame_bytes(1, 1, &method);
    expected.extend(frame_bytes(2, 1, &header));
    expected.extend(frame_bytes(3, 1, b"hello"));

    let publish = basic::Publish {
        exchange: short("amq.direct"),
        routing_key: short("rk"),
        mandatory: true,
        immediate: false,
    };
    let properties = BasicProperties::default()
        .with_content_type(short("text/plain"))
        .with_delivery_mode(2);
    let mut buf = BytesMut::new();
    frame::write_publish(&mut buf, 1, &publish, &properties, b"hello", 131_072);
    assert_eq!(&buf[..], &expected[..]);

    let frames = decode_all(&expected, 131_072);
    assert_eq!(frames.len(), 3);
    assert_eq!(
        frames[0],
        Frame::Method {
            channel: 1,
            method: Method::BasicPublish(publish)
        }
    );
    let Frame::Header { channel: 1, header } = &frames[1] else {
        panic!("{:?}", frames[1])
    };
    assert_eq!((header.class_id, header.body_size), (60, 5));
    assert_eq!(*header.properties, properties);
    assert_eq!(
        frames[2],
        Frame::Body {
            channel: 1,
            payload: bytes::Bytes::from_static(b"hello")
        }
    );
}

#[test]
fn basic_deliver_byte_for_byte() {
    let mut payload = vec![0x00, 0x3C, 0x00, 0x3C];
    payload.extend(shortstr("ctag-abc"));
    payload.extend_from_slice(&42u64.to_be_bytes());
    payload.push(1); // redelivered
    payload.extend(shortstr(""));
    payload.extend(shortstr("queue"));
    let bytes = frame_bytes(1, 7, &payload);
    let deliver = basic::Deliver {
        consumer_tag: short("ctag-abc"),
        delivery_tag: 42,
        redelivered: true,
        exchange: short(""),
        routing_key: short("queue"),
    };
    assert_eq!(
        decode_all(&bytes, 4096),
        vec![Frame::Method {
            channel: 7,
            method: Method::BasicDeliver(deliver.clone())
        }]
    );
    let mut buf = BytesMut::new();
    frame::write_method(&mut buf, 7, &Method::BasicDeliver(deliver));
    assert_eq!(&buf[..], &bytes[..]);
}

#[test]
fn large_bodies_split_at_frame_max_minus_eight_and_empty_bodies_send_no_frame() {
    let body = vec![7u8; 10_000];
    let mut buf = BytesMut::new();
    frame::write_body(&mut buf, 3, &body, 4096);
    let frames = decode_all(&buf, 4096);
    let sizes: Vec<usize> = frames
        .iter()
        .map(|f| match f {
            Frame::Body { payload, .. } => payload.len(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(sizes, vec![4088, 4088, 1824]);

    let mut empty = BytesMut::new();
    frame::write_body(&mut empty, 3, &[], 4096);
    assert!(empty.is_empty());
}

#[test]
fn reply_codes_know_their_name_number_and_kind() {
    assert_eq!(ReplyCode::NOT_FOUND.code(), 404);
    assert_eq!(ReplyCode::NOT_FOUND.name(), Some("NOT_FOUND"));
    assert!(ReplyCode::NOT_FOUND.is_soft_error());
    assert!(ReplyCode::CONNECTION_FORCED.is_hard_error());
    assert_eq!(ReplyCode::REPLY_SUCCESS.kind(), Some(ReplyKind::Success));
    assert_eq!(ReplyCode(999).name(), None);
    assert_eq!(format!("{:?}", ReplyCode::FRAME_ERROR), "FRAME_ERROR(501)");
}

#[test]
fn every_reply_code_rabbitmq_sends_has_a_name_a_kind_and_a_typed_error() {
    use ReplyKind::{HardError, SoftError, Success};
    // RabbitMQ's amqp-rabbitmq-0.9.1 constants, which its broker sends.
    let rabbitmq = [
        (200, "REPLY_SUCCESS", Success),
        (311, "CONTENT_TOO_LARGE", SoftError),
        (312, "NO_ROUTE", SoftError),
        (313, "NO_CONSUMERS", SoftError),
        (320, "CONNECTION_FORCED", HardError),
        (402, "INVALID_PATH", HardError),
        (403, "ACCESS_REFUSED", SoftError),
        (404, "NOT_FOUND", SoftError),
        (405, "RESOURCE_LOCKED", SoftError),
        (406, "PRECONDITION_FAILED", SoftError),
        (501, "FRAME_ERROR", HardError),
        (502, "SYNTAX_ERROR", HardError),
        (503, "COMMAND_INVALID", HardError),
        (504, "CHANNEL_ERROR", HardError),
        (505, "UNEXPECTED_FRAME", HardError),
        (506, "RESOURCE_ERROR", HardError),
        (530, "NOT_ALLOWED", HardError),
        (540, "NOT_IMPLEMENTED", HardError),
        (541, "INTERNAL_ERROR", HardError),
    ];
    for (number, name, kind) in rabbitmq {
        let code = ReplyCode(number);
        assert_eq!(
            (code.name(), code.kind()),
            (Some(name), Some(kind)),
            "{number}"
        );
        assert_eq!(code.to_string(), format!("{number} {name}"));
        let typed = ReplyError::from(code);
        assert_eq!(typed.code(), code);
        assert_eq!(
            matches!(typed, ReplyError::Other(_)),
            kind == Success,
            "{number} has a ReplyError variant of its own unless it is success: {typed:?}"
        );
    }
    let all: Vec<u16> = ReplyCode::ALL.iter().map(|c| c.code()).collect();
    assert_eq!(
        all,
        rabbitmq.map(|(number, _, _)| number),
        "ALL, in numeric order"
    );
}

#[test]
fn frame_errors_are_typed_and_map_to_reply_codes() {
    use amqp091::protocol::FrameError;
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (frame_bytes(9, 0, b""), 501), // unknown frame type
        (
            {
                let mut f = frame_bytes(8, 0, b"");
                *f.last_mut().unwrap() = 0;
                f
            },
            501,
        ), // bad end
        (frame_bytes(8, 3, b""), 501), // heartbeat on channel 3
        (frame_bytes(1, 1, &[0x00, 0x3C]), 502), // truncated method
        (frame_bytes(1, 1, &[0x00, 0x3C, 0x00, 0x63]), 503), // unknown method 60/99
        (
            frame_bytes(2, 1, &[0x00, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            501,
        ), // header for class 20
    ];
    for (bytes, code) in cases {
        let mut buf = BytesMut::from(&bytes[..]);
        let err = FrameDecoder::new(4096)
            .decode(&mut buf)
            .expect_err("must be rejected");
        assert_eq!(err.reply_code().code(), code, "{err}");
    }

    // A frame over frame_max is rejected from its 7-byte prefix alone,
    // before the payload arrives or any room is reserved for it.
    let mut buf = BytesMut::new();
    buf.put_u8(3);
    buf.put_u16(1);
    buf.put_u32(1_000_000);
    let err = FrameDecoder::new(4096)
        .decode(&mut buf)
        .expect_err("too large");
    assert!(
        matches!(
            err,
            FrameError::TooLarge {
                size: 1_000_008,
                max: 4096,
                channel: 1
            }
        ),
        "{err}"
    );
    assert!(
        buf.capacity() < 4096,
        "no room reserved for a rejected frame"
    );
}
