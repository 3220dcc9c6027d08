//! Short strings are bytes, not text. Properties and header keys that are
//! not UTF-8 (as other clients send them) go through RabbitMQ and back to
//! this client byte for byte, and reading one as `&str` is an explicit call
//! that fails rather than a silent replacement. RabbitMQ refuses a method
//! whose shortstr argument is not UTF-8 by closing the whole connection, so
//! the client refuses such a routing key, name or tag before sending it,
//! and the connection goes on.

use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{BasicProperties, ConsumeOptions, Error, FieldTable, FieldValue, ShortString};
use amqp_client_tests::{connect, delete_queue, unique};
use tokio::time::timeout;

/// Latin-1 "café", a lone continuation byte, a NUL and an 0xFF: none of it
/// survives a lossy UTF-8 decode.
const BYTES: &[u8] = b"caf\xe9.\x80\x00.\xff";

#[tokio::test]
async fn non_utf8_properties_and_header_keys_round_trip_through_the_broker_unchanged() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let queue = unique("binary-properties");
    channel
        .queue_declare(queue::Declare {
            queue: queue.as_str().into(),
            exclusive: true,
            ..Default::default()
        })
        .await
        .expect("queue.declare");

    let bytes: ShortString = BYTES.into();
    let header_key: ShortString = b"k\xe9y".as_slice().into();
    let mut properties = BasicProperties::default()
        .with_headers(FieldTable::new().with(header_key.clone(), "v"))
        .with_correlation_id(bytes.clone());
    properties.message_id = Some(bytes.clone());
    channel
        .basic_publish("", queue.as_str(), false, &properties, "body")
        .await
        .expect("publish");

    let mut consumer = channel
        .basic_consume(
            queue.as_str(),
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await
        .expect("basic.consume");
    let delivery = timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("a delivery within 5 s")
        .expect("the consumer is open")
        .expect("a delivery");

    let message_id = delivery.properties.message_id.as_ref().expect("message-id");
    assert_eq!(message_id.as_bytes(), BYTES);
    assert!(message_id.to_str().is_err(), "reading it as text fails");
    assert_eq!(
        message_id.to_string_lossy(),
        "caf\u{fffd}.\u{fffd}\0.\u{fffd}"
    );
    assert_eq!(delivery.properties.correlation_id.as_ref(), Some(&bytes));
    let headers = delivery.properties.headers.as_ref().expect("headers");
    let keys: Vec<&[u8]> = headers.iter().map(|(key, _)| key.as_bytes()).collect();
    assert_eq!(keys, [header_key.as_bytes()]);
    assert_eq!(headers.get(b"k\xe9y"), Some(&FieldValue::from("v")));
    assert_eq!(&delivery.body[..], b"body");

    consumer.cancel().await.expect("basic.cancel");
    delete_queue(&channel, &queue).await;
    connection.close().await.expect("close");
}

fn assert_not_utf8(error: Error, expected_what: &str, expected_field: &str) {
    match &error {
        Error::NameNotUtf8 { what, field } => {
            assert_eq!((*what, *field), (expected_what, expected_field), "{error}");
        }
        other => panic!("expected NameNotUtf8 for {expected_what}, got {other:?}"),
    }
    assert!(!error.is_connection_error());
    assert!(error.to_string().contains("nothing was sent"), "{error}");
}

#[tokio::test]
async fn a_method_argument_that_is_not_utf8_is_refused_before_rabbitmq_would_close_the_connection()
{
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let queue = unique("binary-arguments");
    channel
        .queue_declare(queue::Declare {
            queue: queue.as_str().into(),
            exclusive: true,
            ..Default::default()
        })
        .await
        .expect("queue.declare");

    let error = channel
        .basic_publish("", BYTES, false, &BasicProperties::default(), "x")
        .await
        .expect_err("a routing key that is not UTF-8");
    assert_not_utf8(error, "basic.publish", "routing-key");
    let error = channel
        .queue_bind(queue::Bind {
            queue: queue.as_str().into(),
            exchange: "amq.direct".into(),
            routing_key: BYTES.into(),
            ..Default::default()
        })
        .await
        .expect_err("a binding key that is not UTF-8");
    assert_not_utf8(error, "queue.bind", "routing-key");
    let error = channel
        .basic_consume(
            queue.as_str(),
            ConsumeOptions {
                consumer_tag: BYTES.into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("a consumer tag that is not UTF-8");
    assert_not_utf8(error, "basic.consume", "consumer-tag");

    // Nothing reached the broker: the channel and the connection go on, and
    // a UTF-8 key beyond ASCII is fine.
    channel
        .queue_bind(queue::Bind {
            queue: queue.as_str().into(),
            exchange: "amq.direct".into(),
            routing_key: "café".into(),
            ..Default::default()
        })
        .await
        .expect("a UTF-8 binding key");
    let confirm = channel
        .basic_publish(
            "amq.direct",
            "café",
            false,
            &BasicProperties::default(),
            "é",
        )
        .await
        .expect("publish");
    confirm.await.expect("sent");
    let message = loop {
        if let Some(message) = channel.basic_get(queue.as_str(), true).await.expect("get") {
            break message;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(message.delivery.envelope.routing_key, "café");
    assert!(channel.closed_error().is_none());
    delete_queue(&channel, &queue).await;
    connection.close().await.expect("close");
}
