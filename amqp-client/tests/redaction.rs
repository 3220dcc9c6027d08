//! What `Debug` shows of credentials and message bodies: their length only.
//! The I/O task traces every frame it sends and receives with `Debug`, so
//! these are what keeps passwords, tokens and the application's data out of
//! the logs.

use amqp091::protocol::frame::{self, Frame, FrameDecoder};
use amqp091::protocol::methods::{connection, Method};
use amqp091::protocol::{FieldTable, ReceivedProperties, ReplyCode, ShortString};
use amqp091::{Confirmation, ReturnedMessage};
use bytes::{Bytes, BytesMut};

const PASSWORD: &str = "pw-Kd93xQ-never-printed";

/// Writes `method` on channel 0 and decodes it back, as the broker's side
/// of the connection would see it.
fn through_the_codec(method: Method) -> Frame {
    let mut buf = BytesMut::new();
    frame::write_method(&mut buf, 0, &method);
    FrameDecoder::new(4096)
        .decode(&mut buf)
        .expect("valid frame")
        .expect("a whole frame")
}

fn assert_redacted(debug: &str, secret: &str, length: usize) {
    assert!(!debug.contains(secret), "secret in {debug}");
    assert!(
        debug.contains(&format!("<redacted, {length} bytes>")),
        "no length in {debug}"
    );
}

#[test]
fn sasl_responses_and_new_secrets_show_only_their_length() {
    let plain = Bytes::from(format!("\0alice\0{PASSWORD}"));
    let start_ok = connection::StartOk {
        client_properties: FieldTable::new(),
        mechanism: ShortString::from_static("PLAIN"),
        response: plain.clone(),
        locale: ShortString::from_static("en_US"),
    };
    assert_redacted(&format!("{start_ok:?}"), PASSWORD, plain.len());
    let debug = format!("{start_ok:#?}");
    assert_redacted(&debug, PASSWORD, plain.len());
    assert!(
        debug.contains(r#"mechanism: "PLAIN""#),
        "the other fields still show: {debug}"
    );
    let frame = through_the_codec(Method::ConnectionStartOk(start_ok));
    assert_redacted(&format!("{frame:?}"), PASSWORD, plain.len());

    let secure_ok = Method::ConnectionSecureOk(connection::SecureOk {
        response: plain.clone(),
    });
    assert_redacted(&format!("{secure_ok:?}"), PASSWORD, plain.len());
    let frame = through_the_codec(secure_ok);
    assert_redacted(&format!("{frame:?}"), PASSWORD, plain.len());

    let token = "token-Vb72mP-never-printed";
    let update = Method::ConnectionUpdateSecret(connection::UpdateSecret {
        new_secret: Bytes::from(token),
        reason: ShortString::from_static("refresh"),
    });
    let debug = format!("{update:?}");
    assert_redacted(&debug, token, token.len());
    assert!(debug.contains(r#"reason: "refresh""#), "{debug}");
    let frame = through_the_codec(update);
    assert_redacted(&format!("{frame:?}"), token, token.len());
}

#[test]
fn a_body_frame_shows_its_length_not_its_bytes() {
    let body = b"body-Hw41zN-never-printed";
    let mut buf = BytesMut::new();
    frame::write_body(&mut buf, 7, body, 4096);
    let frame = FrameDecoder::new(4096)
        .decode(&mut buf)
        .expect("valid frame")
        .expect("a whole frame");
    let debug = format!("{frame:?}");
    assert_eq!(
        debug,
        format!("Body {{ channel: 7, payload: <{} bytes> }}", body.len())
    );
}

#[test]
fn a_returned_message_shows_its_body_length_not_its_bytes() {
    let body = "body-Tj58cR-never-printed";
    let returned = ReturnedMessage {
        reply_code: ReplyCode(312),
        reply_text: ShortString::from_static("NO_ROUTE"),
        exchange: ShortString::from_static(""),
        routing_key: ShortString::from_static("nowhere"),
        properties: ReceivedProperties::default(),
        body: Bytes::from(body),
    };
    let confirmation = Confirmation::Returned(Box::new(returned));
    for debug in [format!("{confirmation:?}"), format!("{confirmation:#?}")] {
        assert!(!debug.contains(body), "body in {debug}");
        assert!(
            debug.contains(&format!("<{} bytes>", body.len())),
            "{debug}"
        );
        assert!(
            debug.contains(r#""nowhere""#),
            "the routing key still shows: {debug}"
        );
    }
}
