//! The typed queue and consume arguments against RabbitMQ: each is
//! accepted, and the queue or consumer behaves as the argument says.

use std::future::Future;
use std::time::{Duration, SystemTime};

use amqp091::prelude::*;
use amqp091::{
    BasicProperties, Channel, Confirmation, ConsumeOptions, Consumer, Delivery, FieldValue,
    Overflow, QueueArguments, QueueType, ReplyCode, StreamOffset,
};
use amqp_client_tests::{connect, delete_queue, name, passive_declare, rabbitmqctl, unique};

/// How long any one test may take.
const LIMIT: Duration = Duration::from_secs(30);

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, test).await {
        Ok(value) => value,
        Err(_) => panic!("the test did not finish within {LIMIT:?}"),
    }
}

async fn declare(channel: &Channel, queue: &str, durable: bool, arguments: QueueArguments) {
    channel
        .queue_declare(queue::Declare {
            queue: name(queue),
            durable,
            arguments: arguments.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("declare {queue}: {e}"));
}

async fn publish(channel: &Channel, queue: &str, body: &str) -> Confirmation {
    channel
        .basic_publish(
            "",
            queue,
            false,
            &BasicProperties::default(),
            body.to_owned(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmation")
}

async fn confirming_channel(connection: &amqp091::Connection) -> Channel {
    let channel = connection.open_channel().await.expect("channel");
    channel
        .confirm_select(confirm::Select::default())
        .await
        .expect("confirm.select");
    channel
}

/// The next delivery within `within`, or `None` if none comes.
async fn next_within(consumer: &mut Consumer, within: Duration) -> Option<Delivery> {
    match tokio::time::timeout(within, consumer.next()).await {
        Ok(Some(delivery)) => Some(delivery.expect("a delivery")),
        Ok(None) => panic!("the consumer ended"),
        Err(_) => None,
    }
}

async fn next(consumer: &mut Consumer) -> Delivery {
    next_within(consumer, Duration::from_secs(10))
        .await
        .expect("a delivery within 10 s")
}

fn body(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.body).into_owned()
}

async fn prefetch(channel: &Channel, count: u16) {
    channel
        .basic_qos(basic::Qos {
            prefetch_count: count,
            ..Default::default()
        })
        .await
        .expect("basic.qos");
}

/// A fanout exchange and a queue bound to it, to dead-letter into.
async fn dead_letter_target(channel: &Channel, prefix: &str) -> (String, String) {
    let exchange = unique(&format!("{prefix}.dlx"));
    channel
        .exchange_declare(exchange::Declare {
            exchange: name(&exchange),
            kind: "fanout".into(),
            auto_delete: true,
            ..Default::default()
        })
        .await
        .expect("declare the dead-letter exchange");
    let queue = unique(&format!("{prefix}.dead"));
    declare(channel, &queue, false, QueueArguments::new()).await;
    channel
        .queue_bind(queue::Bind {
            queue: name(&queue),
            exchange: name(&exchange),
            ..Default::default()
        })
        .await
        .expect("bind");
    (exchange, queue)
}

#[tokio::test]
async fn an_expired_message_is_dead_lettered_with_its_x_death_header() {
    bounded(async {
        let connection = connect().await;
        let channel = confirming_channel(&connection).await;
        let (dlx, dead) = dead_letter_target(&channel, "ttl").await;
        let queue = unique("ttl");
        let arguments = QueueArguments::new()
            .message_ttl(Duration::from_millis(50))
            .dead_letter_exchange(&dlx)
            .dead_letter_routing_key("expired");
        declare(&channel, &queue, false, arguments).await;
        assert!(publish(&channel, &queue, "short-lived").await.is_ack());

        let mut consumer = channel
            .basic_consume(&dead, ConsumeOptions::default())
            .await
            .expect("consume the dead letters");
        let delivery = next(&mut consumer).await;
        assert_eq!(body(&delivery), "short-lived");
        assert_eq!(delivery.envelope.routing_key.to_str().unwrap(), "expired");
        assert_eq!(delivery.envelope.exchange.to_str().unwrap(), dlx);
        let headers = delivery.properties.headers.clone().expect("headers");
        let Some(FieldValue::Array(deaths)) = headers.get("x-death") else {
            panic!("no x-death array in {headers:?}");
        };
        let Some(FieldValue::Table(death)) = deaths.first() else {
            panic!("no x-death entry in {deaths:?}");
        };
        assert_eq!(
            death.get("reason").and_then(|v| v.as_str()),
            Some("expired")
        );
        assert_eq!(
            death.get("queue").and_then(|v| v.as_str()),
            Some(queue.as_str())
        );
        delivery.ack().await.expect("ack");
        assert_eq!(passive_declare(&channel, &queue).await.message_count, 0);

        drop(consumer);
        delete_queue(&channel, &queue).await;
        delete_queue(&channel, &dead).await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn a_full_queue_that_rejects_publishes_nacks_the_next_one() {
    bounded(async {
        let connection = connect().await;
        let channel = confirming_channel(&connection).await;
        let queue = unique("reject-publish");
        let arguments = QueueArguments::new()
            .max_length(1)
            .overflow(Overflow::RejectPublish);
        declare(&channel, &queue, false, arguments).await;
        assert!(matches!(
            publish(&channel, &queue, "1").await,
            Confirmation::Ack
        ));
        assert!(matches!(
            publish(&channel, &queue, "2").await,
            Confirmation::Nack
        ));
        let kept = channel
            .basic_get(&queue, true)
            .await
            .expect("get")
            .expect("a message");
        assert_eq!(body(&kept.delivery), "1");
        delete_queue(&channel, &queue).await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn a_full_queue_that_drops_its_head_keeps_the_newest() {
    bounded(async {
        let connection = connect().await;
        let channel = confirming_channel(&connection).await;
        let queue = unique("drop-head");
        let arguments = QueueArguments::new()
            .max_length(2)
            .max_length_bytes(1 << 20)
            .overflow(Overflow::DropHead);
        declare(&channel, &queue, false, arguments).await;
        for n in ["1", "2", "3"] {
            assert!(publish(&channel, &queue, n).await.is_ack(), "message {n}");
        }
        assert_eq!(passive_declare(&channel, &queue).await.message_count, 2);
        let mut kept = Vec::new();
        while let Some(message) = channel.basic_get(&queue, true).await.expect("get") {
            kept.push(body(&message.delivery));
        }
        assert_eq!(kept, ["2", "3"]);
        delete_queue(&channel, &queue).await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn an_idle_queue_with_an_expiry_is_deleted() {
    bounded(async {
        let connection = connect().await;
        let channel = connection.open_channel().await.expect("channel");
        let queue = unique("expires");
        declare(
            &channel,
            &queue,
            false,
            QueueArguments::new().expires(Duration::from_millis(200)),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let error = channel
            .queue_declare(queue::Declare {
                queue: name(&queue),
                passive: true,
                ..Default::default()
            })
            .await
            .expect_err("the idle queue was deleted");
        assert_eq!(error.reply_code(), Some(ReplyCode::NOT_FOUND), "{error}");
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn durations_out_of_rabbitmqs_range_are_sent_as_values_it_accepts() {
    bounded(async {
        let connection = connect().await;
        let channel = connection.open_channel().await.expect("channel");
        // Clipped to 2^32-1 ms, which every RabbitMQ accepts (before 3.10
        // it refused more, the limit of Erlang's timers).
        let longest = unique("longest");
        let arguments = QueueArguments::new()
            .message_ttl(Duration::MAX)
            .expires(Duration::MAX);
        declare(&channel, &longest, false, arguments).await;
        delete_queue(&channel, &longest).await;
        // A zero expiry, which RabbitMQ refuses, is sent as 1 ms.
        let refused = connection
            .open_channel()
            .await
            .expect("channel")
            .queue_declare(queue::Declare {
                queue: name(&unique("zero")),
                arguments: QueueArguments::new().with("x-expires", 0i64).into(),
                ..Default::default()
            })
            .await
            .expect_err("RabbitMQ refuses a zero x-expires");
        assert_eq!(
            refused.reply_code(),
            Some(ReplyCode::PRECONDITION_FAILED),
            "{refused}"
        );
        declare(
            &channel,
            &unique("shortest"),
            false,
            QueueArguments::new().expires(Duration::ZERO),
        )
        .await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn a_quorum_queue_dead_letters_a_message_past_its_delivery_limit() {
    bounded(async {
        let connection = connect().await;
        let channel = confirming_channel(&connection).await;
        let (dlx, dead) = dead_letter_target(&channel, "quorum").await;
        let queue = unique("quorum");
        let arguments = || {
            QueueArguments::new()
                .queue_type(QueueType::Quorum)
                .delivery_limit(2)
                .dead_letter_exchange(&dlx)
        };
        declare(&channel, &queue, true, arguments()).await;
        // The same arguments again are accepted; another type is refused: the
        // broker keeps the type it was given.
        declare(&channel, &queue, true, arguments()).await;
        let other = connection.open_channel().await.expect("channel");
        let error = other
            .queue_declare(queue::Declare {
                queue: name(&queue),
                durable: true,
                arguments: arguments().queue_type(QueueType::Classic).into(),
                ..Default::default()
            })
            .await
            .expect_err("another queue type");
        assert_eq!(
            error.reply_code(),
            Some(ReplyCode::PRECONDITION_FAILED),
            "{error}"
        );
        assert!(error.to_string().contains("x-queue-type"), "{error}");

        assert!(publish(&channel, &queue, "poison").await.is_ack());
        prefetch(&channel, 1).await;
        let mut consumer = channel
            .basic_consume(&queue, ConsumeOptions::default())
            .await
            .expect("consume");
        // Limit 2: delivered and requeued three times, then dead-lettered.
        let mut deliveries = 0;
        while let Some(delivery) = next_within(&mut consumer, Duration::from_secs(2)).await {
            deliveries += 1;
            assert!(
                deliveries <= 3,
                "delivered {deliveries} times despite the limit"
            );
            delivery.reject(true).await.expect("reject with requeue");
        }
        assert_eq!(deliveries, 3);
        let dead_letter = channel
            .basic_get(&dead, true)
            .await
            .expect("get")
            .expect("dead-lettered");
        assert_eq!(body(&dead_letter.delivery), "poison");

        drop(consumer);
        delete_queue(&channel, &queue).await;
        delete_queue(&channel, &dead).await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn a_single_active_consumer_queue_feeds_the_second_only_after_the_first_cancels() {
    bounded(async {
        let connection = connect().await;
        let channel = confirming_channel(&connection).await;
        let queue = unique("single-active");
        declare(
            &channel,
            &queue,
            false,
            QueueArguments::new().single_active_consumer(true),
        )
        .await;
        let first_channel = connection.open_channel().await.expect("channel");
        let second_channel = connection.open_channel().await.expect("channel");
        let mut first = first_channel
            .basic_consume(&queue, ConsumeOptions::default())
            .await
            .expect("first consumer");
        let mut second = second_channel
            .basic_consume(&queue, ConsumeOptions::default())
            .await
            .expect("second consumer");
        for n in ["1", "2", "3"] {
            assert!(publish(&channel, &queue, n).await.is_ack());
        }
        for n in ["1", "2", "3"] {
            let delivery = next(&mut first).await;
            assert_eq!(body(&delivery), n);
            delivery.ack().await.expect("ack");
        }
        assert!(
            next_within(&mut second, Duration::from_millis(500))
                .await
                .is_none(),
            "the second consumer got a message while the first was active"
        );
        first.cancel().await.expect("cancel the first");
        assert!(publish(&channel, &queue, "4").await.is_ack());
        let delivery = next(&mut second).await;
        assert_eq!(body(&delivery), "4");
        delivery.ack().await.expect("ack");

        drop((first, second));
        delete_queue(&channel, &queue).await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn the_consumer_of_higher_priority_gets_the_messages_while_it_has_room() {
    bounded(async {
        let connection = connect().await;
        let channel = confirming_channel(&connection).await;
        let queue = unique("priority");
        declare(&channel, &queue, false, QueueArguments::new()).await;
        let low_channel = connection.open_channel().await.expect("channel");
        let high_channel = connection.open_channel().await.expect("channel");
        prefetch(&low_channel, 100).await;
        prefetch(&high_channel, 100).await;
        let mut low = low_channel
            .basic_consume(&queue, ConsumeOptions::default().with_priority(-5))
            .await
            .expect("low-priority consumer");
        let mut high = high_channel
            .basic_consume(&queue, ConsumeOptions::default().with_priority(10))
            .await
            .expect("high-priority consumer");
        for n in 0..10 {
            assert!(publish(&channel, &queue, &n.to_string()).await.is_ack());
        }
        for n in 0..10 {
            assert_eq!(body(&next(&mut high).await), n.to_string());
        }
        assert!(
            next_within(&mut low, Duration::from_millis(300))
                .await
                .is_none(),
            "the low-priority consumer got a message the other had room for"
        );
        drop((low, high));
        delete_queue(&channel, &queue).await;
        connection.close().await.expect("close");
    })
    .await;
}

/// The offset RabbitMQ gave a delivery from a stream.
fn stream_offset(delivery: &Delivery) -> i64 {
    delivery
        .properties
        .headers
        .as_ref()
        .and_then(|headers| headers.get("x-stream-offset"))
        .and_then(FieldValue::as_i64)
        .expect("a delivery from a stream carries its offset")
}

/// Consumes `queue` from `offset` (prefetch and manual acks, as streams
/// need) and returns the bodies of the first `count` deliveries.
async fn read_stream(
    connection: &amqp091::Connection,
    queue: &str,
    offset: StreamOffset,
    count: usize,
) -> Vec<String> {
    let channel = connection.open_channel().await.expect("channel");
    prefetch(&channel, 50).await;
    let mut consumer = channel
        .basic_consume(queue, ConsumeOptions::default().with_stream_offset(offset))
        .await
        .unwrap_or_else(|e| panic!("consume the stream from {offset:?}: {e}"));
    let mut bodies = Vec::new();
    let mut last_offset = -1;
    while bodies.len() < count {
        let delivery = next(&mut consumer).await;
        let offset = stream_offset(&delivery);
        assert!(
            offset > last_offset,
            "offsets go up: {offset} after {last_offset}"
        );
        last_offset = offset;
        bodies.push(body(&delivery));
        delivery.ack().await.expect("ack");
    }
    drop(consumer);
    channel.close().await.expect("close the channel");
    bodies
}

#[tokio::test]
async fn a_stream_is_read_from_each_kind_of_offset() {
    bounded(async {
        let connection = connect().await;
        let channel = confirming_channel(&connection).await;
        // Streams need RabbitMQ 3.9 or later with this flag on: without it
        // the test fails here, saying why, rather than skipping.
        let flags = rabbitmqctl(&[
            "list_feature_flags",
            "-q",
            "--no-table-headers",
            "name",
            "state",
        ]);
        assert!(
            flags
                .lines()
                .any(|line| line.split_whitespace().eq(["stream_queue", "enabled"])),
            "the broker's stream_queue feature flag is not enabled:\n{flags}"
        );
        let queue = unique("stream");
        declare(
            &channel,
            &queue,
            true,
            QueueArguments::new().queue_type(QueueType::Stream),
        )
        .await;
        for n in 0..3 {
            assert!(publish(&channel, &queue, &format!("a{n}")).await.is_ack());
        }
        // Timestamps are in whole seconds and chunks carry their time: a
        // second batch well over a second later is in a chunk of its own.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let between = SystemTime::now();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for n in 0..3 {
            assert!(publish(&channel, &queue, &format!("b{n}")).await.is_ack());
        }

        // The interval is counted back from now in milliseconds: 2 s ago is
        // after the first batch (3.2 s old) and before the second.
        let interval = "2s".parse::<amqp091::Interval>().expect("an interval");
        assert_eq!(
            read_stream(&connection, &queue, interval.into(), 3).await,
            ["b0", "b1", "b2"]
        );
        let all = ["a0", "a1", "a2", "b0", "b1", "b2"];
        assert_eq!(
            read_stream(&connection, &queue, StreamOffset::First, 6).await,
            all
        );
        assert_eq!(
            read_stream(&connection, &queue, StreamOffset::Offset(4), 2).await,
            ["b1", "b2"]
        );
        assert_eq!(
            read_stream(&connection, &queue, StreamOffset::since(between), 3).await,
            ["b0", "b1", "b2"]
        );
        // `last` starts at the last chunk: the second batch's.
        let last = read_stream(&connection, &queue, StreamOffset::Last, 1).await;
        assert!(last[0].starts_with('b'), "last started at {last:?}");

        // `next` skips what is there and waits for what comes.
        let reader = connection.open_channel().await.expect("channel");
        prefetch(&reader, 50).await;
        let mut consumer = reader
            .basic_consume(
                &queue,
                ConsumeOptions::default().with_stream_offset(StreamOffset::Next),
            )
            .await
            .expect("consume from next");
        // A next consumer is attached once consume-ok is back, but give the
        // stream reader a moment before publishing.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(publish(&channel, &queue, "c0").await.is_ack());
        let delivery = next(&mut consumer).await;
        assert_eq!(body(&delivery), "c0");
        assert_eq!(stream_offset(&delivery), 6);
        delivery.ack().await.expect("ack");

        drop(consumer);
        delete_queue(&channel, &queue).await;
        connection.close().await.expect("close");
    })
    .await;
}
