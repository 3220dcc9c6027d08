//! Passwords, SASL responses, update-secret tokens and message bodies never
//! reach a log record (at any level, from any task), a `Debug` or an error
//! message, over a connection's whole life against a real RabbitMQ.
//!
//! This file holds one test: it installs a process-wide TRACE subscriber,
//! and every record in this process is its evidence.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{AuthMechanism, BasicProperties, Connection, ConsumeOptions, Error};
use amqp_client_tests::{
    close_from_broker, config, connect_with, delete_queue, name, recovered, unique, TestUser,
};

/// Everything the subscriber wrote.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture lock")).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .expect("capture lock")
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Records every event and span of the process, at every level, with all
/// their fields. Process-wide, so that the connection's I/O task (spawned
/// on the runtime) is captured too.
fn capture_all_records() -> Captured {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("the only subscriber of this test binary");
    captured
}

/// The forms in which `secret` would show if some `Debug` or `Display`
/// printed it: as text, and its bytes as a byte-string, a list of numbers
/// or hex.
fn renderings(secret: &str) -> Vec<String> {
    let bytes = secret.as_bytes();
    vec![
        secret.to_owned(),
        format!("{:?}", bytes::Bytes::copy_from_slice(bytes)),
        format!("{bytes:?}"),
        bytes.iter().map(|b| format!("{b:02x}")).collect(),
        bytes.iter().map(|b| format!("{b:02X}")).collect(),
        bytes
            .iter()
            .map(|b| format!("{b:#04x}"))
            .collect::<Vec<_>>()
            .join(", "),
    ]
}

fn assert_absent(haystack: &str, what: &str, secret: &str) {
    for rendering in renderings(secret) {
        assert!(
            !haystack.contains(&rendering),
            "the {what} appears (as `{rendering}`) in:\n{haystack}"
        );
    }
}

#[tokio::test]
async fn no_password_token_or_body_reaches_a_log_record_debug_or_error_message() {
    let captured = capture_all_records();
    let tag = unique("secrets").replace('.', "-");
    let password = format!("Pw-{tag}-hunter2");
    let wrong_password = format!("Wrong-{tag}-letmein");
    let token = format!("Token-{tag}-refreshed");
    let body = format!("Body-{tag}-confidential payload");
    let user = TestUser::add(&format!("user-{tag}"), &password);
    let user_config = config().credentials(&user.name, &password);

    let config_debug = format!("{user_config:?} {user_config:#?}");
    assert_absent(&config_debug, "password", &password);

    // A refused login: the error names the user, never the password tried.
    let refused = Connection::connect(user_config.clone().credentials(&user.name, &wrong_password))
        .await
        .expect_err("wrong password");
    assert!(
        matches!(refused, Error::AuthenticationFailed { .. }),
        "{refused:?}"
    );
    assert_absent(
        &format!("{refused} {refused:?}"),
        "wrong password",
        &wrong_password,
    );

    // AMQPLAIN sends the password inside a field table.
    let amqplain = connect_with(user_config.clone().auth_mechanism(AuthMechanism::AmqPlain)).await;
    amqplain.close().await.expect("close AMQPLAIN connection");

    let connection_name = unique("secrets");
    let connection = connect_with(user_config.clone().connection_name(&connection_name)).await;
    let channel = connection.open_channel().await.expect("channel");
    let queue = unique("secrets");
    channel
        .queue_declare(queue::Declare {
            queue: name(&queue),
            // Gone with the connection should an assertion fail first.
            exclusive: true,
            ..Default::default()
        })
        .await
        .expect("declare");
    channel
        .basic_publish("", &queue, false, &BasicProperties::default(), body.clone())
        .await
        .expect("publish");
    let mut consumer = channel
        .basic_consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("a delivery within 5 s")
        .expect("the consumer is open")
        .expect("a delivery");
    assert_eq!(&delivery.body[..], body.as_bytes());
    assert_absent(&format!("{delivery:?}"), "body", &body);
    delivery.ack().await.expect("ack");

    // RabbitMQ's internal backend accepts any new secret and keeps the
    // connection open. The client keeps the token for its reconnects: make
    // it the user's password and have the broker drop the connection, so
    // that recovery logs in with the token.
    connection
        .update_secret(token.clone(), "refresh")
        .await
        .expect("update-secret-ok");
    user.change_password(&token);
    let mut events = connection.recovery_events();
    close_from_broker(&connection_name).await;
    recovered(&mut events).await;
    delete_queue(&channel, &queue).await;
    connection.close().await.expect("close");

    let log = captured.text();
    assert_absent(&log, "password", &password);
    assert_absent(&log, "wrong password", &wrong_password);
    assert_absent(&log, "update-secret token", &token);
    assert_absent(&log, "body", &body);
    // The records under test were there to leak: the frames that carry each
    // secret were traced, with their other fields.
    for expected in [
        "frame sent",
        "frame received",
        "ConnectionStartOk",
        "mechanism: \"AMQPLAIN\"",
        "mechanism: \"PLAIN\"",
        "ConnectionUpdateSecret",
        "reason: \"refresh\"",
        "connection recovered",
        "Body {",
        &format!("payload: <{} bytes>", body.len()),
    ] {
        assert!(log.contains(expected), "no `{expected}` in the log:\n{log}");
    }
}
