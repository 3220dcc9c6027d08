//! Names are plain strings (`"jobs".into()`): a name over the 255 bytes of a
//! shortstr is refused with `Error::NameTooLong` when the call is made,
//! naming the method and the field, before anything is queued — never a
//! panic, never a frame the broker would answer by closing the connection.
//! And acks, nacks and rejects go only through `Delivery`, which knows the
//! connection a delivery tag belongs to.

use std::future::Future;
use std::time::Duration;

use amqp091::prelude::*;
use amqp091::protocol::{ChannelRpc, Method};
use amqp091::{BasicProperties, Channel, Connection, ConsumeOptions, Error, FieldTable};
use amqp_client_tests::fake_peer::{FakePeer, Tuning};
use amqp_client_tests::{connect, delete_queue, unique};

/// How long any one test may take.
const LIMIT: Duration = Duration::from_secs(20);

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, test).await {
        Ok(value) => value,
        Err(_) => panic!("the test did not finish within {LIMIT:?}: the client hangs"),
    }
}

fn assert_name_too_long(error: Error, expected_what: &str, expected_field: &str) {
    match &error {
        Error::NameTooLong { what, field, len } => {
            assert_eq!(*what, expected_what, "{error}");
            assert_eq!(*field, expected_field, "{error}");
            assert_eq!(*len, 256, "{error}");
        }
        other => panic!("expected NameTooLong for {expected_what} {expected_field}, got {other:?}"),
    }
    assert!(!error.is_connection_error());
    let text = error.to_string();
    assert!(
        text.contains(expected_field) && text.contains("nothing was sent"),
        "{text}"
    );
}

/// Every call that takes a name, given one of 256 bytes: each is refused
/// with the field named, and nothing reaches the broker.
async fn refuse_over_long_names(channel: &Channel) {
    let long = "n".repeat(256);
    let declare = || queue::Declare {
        queue: long.as_str().into(),
        ..Default::default()
    };
    let error = channel
        .queue_declare(declare())
        .await
        .expect_err("256 bytes");
    assert_name_too_long(error, "queue.declare", "queue");
    let error = channel
        .queue_declare_no_wait(declare())
        .await
        .expect_err("the no-wait form too");
    assert_name_too_long(error, "queue.declare", "queue");
    let error = channel
        .exchange_declare(exchange::Declare {
            exchange: "amq.direct".into(),
            kind: "direct".into(),
            arguments: FieldTable::new().with(long.as_str(), 1i32),
            ..Default::default()
        })
        .await
        .expect_err("a table key of 256 bytes");
    assert_name_too_long(error, "exchange.declare", "arguments");
    let error = channel
        .basic_publish("", &long, false, &BasicProperties::default(), "x")
        .await
        .expect_err("a routing key of 256 bytes");
    assert_name_too_long(error, "basic.publish", "routing-key");
    let properties = BasicProperties::default().with_message_id(long.as_str());
    let error = channel
        .basic_publish("", "q", false, &properties, "x")
        .await
        .expect_err("a message-id of 256 bytes");
    assert_name_too_long(error, "content header", "message-id");
    let error = channel
        .basic_consume(&long, ConsumeOptions::default())
        .await
        .expect_err("a queue name of 256 bytes");
    assert_name_too_long(error, "basic.consume", "queue");
    let error = channel
        .basic_consume(
            "q",
            ConsumeOptions {
                consumer_tag: long.as_str().into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("a consumer tag of 256 bytes");
    assert_name_too_long(error, "basic.consume", "consumer-tag");
    let error = channel
        .basic_get(&long, true)
        .await
        .expect_err("basic.get of a queue name of 256 bytes");
    assert_name_too_long(error, "basic.get", "queue");
}

#[tokio::test]
async fn a_name_over_255_bytes_is_a_typed_error_and_the_channel_goes_on() {
    bounded(async {
        let connection = connect().await;
        let channel = connection.open_channel().await.expect("channel");
        refuse_over_long_names(&channel).await;

        // Plain strings everywhere; 255 bytes is still a name.
        let queue = unique("names");
        let declared = channel
            .queue_declare(queue::Declare {
                queue: queue.as_str().into(),
                ..Default::default()
            })
            .await
            .expect("declare after the refused calls");
        assert_eq!(declared.queue, queue.as_str());
        let properties = BasicProperties::default()
            .with_content_type("text/plain")
            .with_message_id("m".repeat(255));
        channel
            .basic_publish("", &queue, false, &properties, "hello")
            .await
            .expect("publish");
        let got = loop {
            if let Some(got) = channel.basic_get(&queue, false).await.expect("get") {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(
            got.delivery
                .properties
                .message_id
                .as_ref()
                .map(|s| s.to_str().unwrap()),
            Some(&*"m".repeat(255))
        );
        got.delivery.ack().await.expect("ack");
        assert!(
            channel.closed_error().is_none(),
            "{:?}",
            channel.closed_error()
        );
        delete_queue(&channel, &queue).await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn refused_names_and_raw_settlements_send_nothing() {
    bounded(async {
        let peer = FakePeer::start(|mut peer| async move {
            peer.handshake(&Tuning::default()).await?;
            peer.accept_channel_open().await?;
            // Everything the client sends until the marker.
            let mut sent = Vec::new();
            loop {
                let (_, method) = peer.read_method().await?;
                let name = method.info().name;
                sent.push(name);
                if name == "basic.recover-async" {
                    return Ok(sent);
                }
            }
        })
        .await
        .expect("the fake peer listens");
        let connection = Connection::connect(peer.config())
            .await
            .expect("the handshake with the fake peer succeeds");
        let channel = connection.open_channel().await.expect("channel");
        refuse_over_long_names(&channel).await;

        // A bare delivery tag, as one kept from before a reconnect: refused,
        // whichever message the tag would name on the channel now.
        for method in [
            Method::BasicAck(basic::Ack {
                delivery_tag: 1,
                multiple: false,
            }),
            Method::BasicNack(basic::Nack {
                delivery_tag: 1,
                multiple: true,
                requeue: true,
            }),
            Method::BasicReject(basic::Reject {
                delivery_tag: 1,
                requeue: false,
            }),
        ] {
            let name = method.info().name;
            match ChannelRpc::send(&channel, method).await {
                Err(Error::RawSettlement(refused)) => assert_eq!(refused, name),
                other => panic!("{name} sent with a bare tag: {other:?}"),
            }
        }

        channel
            .basic_recover_async(basic::RecoverAsync { requeue: true })
            .await
            .expect("the marker");
        let sent = peer.finish().await;
        assert_eq!(sent, ["basic.recover-async"], "only the marker was sent");
        drop(connection);
    })
    .await;
}
