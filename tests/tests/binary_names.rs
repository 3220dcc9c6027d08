//! Short strings are bytes, not text: a routing key, binding key, consumer
//! tag, message id or header key that is not UTF-8 (as other clients send)
//! goes through RabbitMQ and back to this client byte for byte, and reading
//! it as `&str` is an explicit, failing call rather than a silent
//! replacement.

use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{BasicProperties, ConsumeOptions, FieldTable, FieldValue, ShortString};
use amqp_client_tests::{connect, delete_queue, unique};
use tokio::time::timeout;

/// Latin-1 "café", a lone continuation byte, a NUL and an 0xFF: none of it
/// survives a lossy UTF-8 decode.
const KEY: &[u8] = b"caf\xe9.\x80\x00.\xff";

#[tokio::test]
async fn non_utf8_short_strings_round_trip_through_the_broker_unchanged() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let exchange = unique("binary-names-x");
    let queue = unique("binary-names-q");
    channel
        .exchange_declare(exchange::Declare {
            exchange: exchange.as_str().into(),
            kind: "direct".into(),
            auto_delete: true,
            ..Default::default()
        })
        .await
        .expect("exchange.declare");
    channel
        .queue_declare(queue::Declare {
            queue: queue.as_str().into(),
            exclusive: true,
            ..Default::default()
        })
        .await
        .expect("queue.declare");
    // The broker routes by the exact bytes: a lossy key would not match.
    channel
        .queue_bind(queue::Bind {
            queue: queue.as_str().into(),
            exchange: exchange.as_str().into(),
            routing_key: KEY.into(),
            ..Default::default()
        })
        .await
        .expect("queue.bind");

    let message_id: ShortString = b"id-\xfe\xff".as_slice().into();
    let header_key: ShortString = b"k\xe9y".as_slice().into();
    let mut properties =
        BasicProperties::default().with_headers(FieldTable::new().with(header_key.clone(), "v"));
    properties.message_id = Some(message_id.clone());
    channel
        .basic_publish(exchange.as_str(), KEY, false, &properties, "body")
        .await
        .expect("publish");

    let tag: ShortString = b"tag-\xff\x01".as_slice().into();
    let mut consumer = channel
        .basic_consume(
            queue.as_str(),
            ConsumeOptions {
                consumer_tag: tag.clone(),
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

    assert_eq!(delivery.envelope.routing_key.as_bytes(), KEY);
    assert!(delivery.envelope.routing_key.to_str().is_err());
    assert_eq!(delivery.envelope.consumer_tag, tag);
    assert_eq!(delivery.envelope.exchange, exchange.as_str());
    assert_eq!(delivery.properties.message_id.as_ref(), Some(&message_id));
    let headers = delivery.properties.headers.as_ref().expect("headers");
    let keys: Vec<&[u8]> = headers.iter().map(|(key, _)| key.as_bytes()).collect();
    assert_eq!(keys, [header_key.as_bytes()]);
    assert_eq!(headers.get(b"k\xe9y"), Some(&FieldValue::from("v")));
    assert_eq!(&delivery.body[..], b"body");

    // The same tag cancels the consumer: it reaches the broker unchanged.
    consumer.cancel().await.expect("basic.cancel");
    delete_queue(&channel, &queue).await;
    connection.close().await.expect("close");
}
