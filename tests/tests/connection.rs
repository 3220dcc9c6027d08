//! Connection-level behaviour against a real RabbitMQ: heartbeats, a close
//! from the server side, concurrency, fairness, large messages, properties.

use std::collections::HashMap;
use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{
    BasicProperties, Channel, ConsumeOptions, Decimal, Error, FieldTable, FieldValue, ReplyError,
};
use amqp_client_tests::{
    config, connect, connect_with, connection_pid, delete_queue, name, rabbitmqctl, unique,
    wait_for_message_count,
};
use bytes::Bytes;

async fn temp_queue(channel: &Channel, prefix: &str) -> String {
    let q = unique(prefix);
    channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            auto_delete: true,
            ..Default::default()
        })
        .await
        .expect("declare");
    q
}

#[tokio::test]
async fn an_idle_connection_with_heartbeat_1_stays_open_for_5_seconds() {
    let connection = connect_with(config().heartbeat(1)).await;
    assert_eq!(connection.server_info().heartbeat, 1);
    let channel = connection.open_channel().await.expect("channel");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!connection.is_closed());
    channel
        .basic_qos(basic::Qos {
            prefetch_count: 1,
            ..Default::default()
        })
        .await
        .expect("still usable");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn a_close_from_the_server_fails_pending_work_and_resolves_closed() {
    let connection_name = unique("killed");
    // Without recovery the close is final (the recovery tests cover the rest).
    let connection = connect_with(
        config()
            .connection_name(connection_name.clone())
            .recovery(amqp091::RecoveryConfig::disabled()),
    )
    .await;
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = errors.clone();
    connection.on_error(move |e| seen.lock().expect("lock").push(e.to_string()));
    let channel = connection.open_channel().await.expect("channel");
    let q = temp_queue(&channel, "killed").await;
    let mut consumer = channel
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    let confirms = connection.open_channel().await.expect("channel");
    confirms
        .confirm_select(confirm::Select::default())
        .await
        .expect("select");

    let pid = connection_pid(&connection_name).await;
    rabbitmqctl(&["close_connection", &pid, "closed by the test"]);

    let ended = tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .expect("closed() resolves");
    let err = ended.expect_err("closed by the server");
    match &err {
        Error::ConnectionClosed { reply, reason } => {
            assert_eq!(*reply, ReplyError::ConnectionForced);
            assert!(
                reason.text.contains("closed by the test"),
                "{}",
                reason.text
            );
        }
        other => panic!("expected ConnectionClosed, got {other:?}"),
    }
    let from_consumer = consumer
        .next()
        .await
        .expect("an error")
        .expect_err("the close");
    assert_eq!(
        from_consumer.reply_error(),
        Some(ReplyError::ConnectionForced)
    );
    let from_call = channel
        .basic_qos(basic::Qos::default())
        .await
        .expect_err("closed");
    assert_eq!(from_call.reply_error(), Some(ReplyError::ConnectionForced));
    let publish = confirms
        .basic_publish("", &q, false, &BasicProperties::default(), "late")
        .await;
    assert!(publish.is_err(), "a publish after the close fails at once");
    assert_eq!(
        errors.lock().expect("lock").len(),
        1,
        "the error handler ran once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_tasks_publishing_ten_thousand_each_on_one_channel_all_arrive_intact() {
    const TASKS: u32 = 8;
    const EACH: u32 = 10_000;
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = temp_queue(&channel, "concurrent").await;
    let consumer_connection = connect().await;
    let consumer_channel = consumer_connection.open_channel().await.expect("channel");
    consumer_channel
        .basic_qos(basic::Qos {
            prefetch_count: 1000,
            ..Default::default()
        })
        .await
        .expect("qos");
    let mut consumer = consumer_channel
        .basic_consume(
            &q,
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await
        .expect("consume");

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let channel = channel.clone();
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let body = format!("{task}:{i}:{}", "x".repeat((i % 50) as usize));
                channel
                    .basic_publish("", &q, false, &BasicProperties::default(), body)
                    .await
                    .expect("publish");
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    let mut next_expected: HashMap<u32, u32> = HashMap::new();
    for _ in 0..TASKS * EACH {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("all deliveries arrive")
            .expect("open")
            .expect("ok");
        let text = std::str::from_utf8(&delivery.body).expect("utf-8");
        let mut parts = text.splitn(3, ':');
        let task: u32 = parts.next().and_then(|p| p.parse().ok()).expect("task");
        let i: u32 = parts.next().and_then(|p| p.parse().ok()).expect("index");
        assert_eq!(
            parts.next().expect("padding"),
            "x".repeat((i % 50) as usize),
            "body intact"
        );
        let expected = next_expected.entry(task).or_insert(0);
        assert_eq!(i, *expected, "messages of one publisher arrive in order");
        *expected += 1;
    }
    assert!(next_expected.values().all(|n| *n == EACH));
    connection.close().await.expect("close");
    consumer_connection.close().await.expect("close");
}

// One thread: both publishes are queued before the I/O task runs, so the
// test sees the scheduler's fairness rather than which task ran first.
#[tokio::test]
async fn a_small_message_is_not_held_behind_a_large_one_on_another_channel() {
    let connection = connect().await;
    let setup = connection.open_channel().await.expect("channel");
    let q = temp_queue(&setup, "fair").await;
    let consumer_connection = connect().await;
    let consumer_channel = consumer_connection.open_channel().await.expect("channel");
    let mut consumer = consumer_channel
        .basic_consume(
            &q,
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await
        .expect("consume");

    let large_channel = connection.open_channel().await.expect("channel A");
    let small_channel = connection.open_channel().await.expect("channel B");
    let large = Bytes::from(vec![b'L'; 40 * 1024 * 1024]);
    large_channel
        .basic_publish("", &q, false, &BasicProperties::default(), large.clone())
        .await
        .expect("large publish queued first");
    small_channel
        .basic_publish("", &q, false, &BasicProperties::default(), "small")
        .await
        .expect("small publish queued second");

    let first = tokio::time::timeout(Duration::from_secs(60), consumer.next())
        .await
        .expect("first")
        .expect("open")
        .expect("ok");
    assert_eq!(
        &first.body[..],
        b"small",
        "the small message overtakes the 40 MB one"
    );
    let second = tokio::time::timeout(Duration::from_secs(60), consumer.next())
        .await
        .expect("second")
        .expect("open")
        .expect("ok");
    assert_eq!(second.body.len(), large.len());
    assert!(second.body == large, "the large message arrives intact");
    connection.close().await.expect("close");
    consumer_connection.close().await.expect("close");
}

#[tokio::test]
async fn a_ten_megabyte_message_round_trips_byte_for_byte() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = temp_queue(&channel, "big").await;
    let body: Vec<u8> = (0..10 * 1024 * 1024)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    channel
        .confirm_select(confirm::Select::default())
        .await
        .expect("select");
    channel
        .basic_publish("", &q, false, &BasicProperties::default(), body.clone())
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    let got = channel
        .basic_get(&q, true)
        .await
        .expect("get")
        .expect("message");
    assert_eq!(got.delivery.body.len(), body.len());
    assert!(got.delivery.body[..] == body[..], "byte for byte");
    // Auto-delete only applies once a consumer came and went: delete it.
    delete_queue(&channel, &q).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn every_property_and_every_header_type_round_trips() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = temp_queue(&channel, "props").await;
    let nested = FieldTable::new()
        .with(name("inner"), "value")
        .with(name("n"), 7i32);
    let headers = FieldTable::new()
        .with(name("bool"), true)
        .with(name("i8"), -8i8)
        .with(name("u8"), 200u8)
        .with(name("i16"), -1600i16)
        .with(name("u16"), 60_000u16)
        .with(name("i32"), -320_000i32)
        .with(name("u32"), 4_000_000_000u32)
        .with(name("i64"), -64_000_000_000i64)
        .with(name("f32"), 1.5f32)
        .with(name("f64"), -2.25f64)
        .with(
            name("decimal"),
            Decimal {
                scale: 2,
                value: 12345,
            },
        )
        .with(name("string"), "text ✓")
        .with(
            name("bytes"),
            FieldValue::Bytes(Bytes::from_static(&[0, 1, 2, 255])),
        )
        .with(
            name("array"),
            vec![
                FieldValue::from(1i32),
                FieldValue::from("two"),
                FieldValue::Void,
            ],
        )
        .with(name("timestamp"), FieldValue::Timestamp(1_700_000_000))
        .with(name("table"), nested)
        .with(name("void"), FieldValue::Void);
    let properties = BasicProperties::default()
        .with_content_type(name("application/json"))
        .with_content_encoding(name("gzip"))
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id(name("corr-1"))
        .with_reply_to(name("reply.queue"))
        .with_expiration(name("60000"))
        .with_message_id(name("msg-1"))
        .with_timestamp(1_700_000_001)
        .with_kind(name("example.type"))
        .with_user_id(name("guest"))
        .with_app_id(name("amqp-client-tests"))
        .with_reserved(name("cluster"));
    channel
        .basic_publish("", &q, false, &properties, "{}")
        .await
        .expect("publish");
    let mut consumer = channel
        .basic_consume(
            &q,
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await
        .expect("consume");
    let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("delivered")
        .expect("open")
        .expect("ok");
    assert_eq!(*delivery.properties, properties);
    assert_eq!(delivery.envelope.routing_key, q.as_str());
    assert_eq!(delivery.envelope.exchange, "");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn update_secret_is_accepted_on_a_live_connection() {
    let connection = connect().await;
    connection
        .update_secret("guest", "token refresh")
        .await
        .expect("update-secret-ok");
    let channel = connection.open_channel().await.expect("still usable");
    channel.basic_qos(basic::Qos::default()).await.expect("qos");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn dropping_every_handle_closes_the_connection_gracefully() {
    let connection_name = unique("dropped");
    let connection = connect_with(config().connection_name(connection_name.clone())).await;
    let channel = connection.open_channel().await.expect("channel");
    channel.basic_qos(basic::Qos::default()).await.expect("qos");
    let _ = connection_pid(&connection_name).await;
    drop(channel);
    drop(connection);
    for _ in 0..100 {
        let listing = rabbitmqctl(&[
            "list_connections",
            "-q",
            "--no-table-headers",
            "client_properties",
        ]);
        if !listing.contains(&connection_name) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the connection stayed open after its last handle was dropped");
}

#[tokio::test]
async fn amqplain_authenticates_too() {
    let connection = connect_with(config().auth_mechanism(amqp091::AuthMechanism::AmqPlain)).await;
    let channel = connection.open_channel().await.expect("channel");
    channel
        .basic_qos(basic::Qos::default())
        .await
        .expect("usable");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn a_small_frame_max_from_the_url_splits_bodies_and_still_round_trips() {
    let url = format!(
        "{}?frame_max=4096&channel_max=16&heartbeat=30",
        amqp_client_tests::amqp_url()
    );
    let connection = connect_with(url.parse().expect("valid URL")).await;
    let info = connection.server_info();
    assert_eq!(
        (info.frame_max, info.channel_max, info.heartbeat),
        (4096, 16, 30)
    );
    let channel = connection.open_channel().await.expect("channel");
    let q = temp_queue(&channel, "small-frames").await;
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    channel
        .basic_publish("", &q, false, &BasicProperties::default(), body.clone())
        .await
        .expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(message) = channel.basic_get(&q, true).await.expect("get") {
                return message;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the message arrives");
    assert!(
        got.delivery.body[..] == body[..],
        "25 body frames reassembled in order"
    );
    delete_queue(&channel, &q).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn everything_published_before_a_close_or_a_drop_reaches_the_broker() {
    let q = unique("flushed");
    let setup = connect().await;
    let setup_channel = setup.open_channel().await.expect("channel");
    setup_channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            ..Default::default()
        })
        .await
        .expect("declare");

    // Published without confirms, then the channel handle dropped and the
    // connection closed at once: nothing queued in the client may be lost.
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    for i in 0..10_000 {
        channel
            .basic_publish("", &q, false, &BasicProperties::default(), format!("{i}"))
            .await
            .expect("publish");
    }
    drop(channel);
    let second = connection.open_channel().await.expect("channel");
    for i in 0..5_000 {
        second
            .basic_publish("", &q, false, &BasicProperties::default(), format!("b{i}"))
            .await
            .expect("publish");
    }
    connection.close().await.expect("close");

    wait_for_message_count(&setup_channel, &q, 15_000, Duration::from_secs(10)).await;
    delete_queue(&setup_channel, &q).await;
    setup.close().await.expect("close");
}

#[tokio::test]
async fn dropping_every_handle_right_after_publishing_still_delivers_and_closes() {
    let q = unique("drop-all");
    let connection_name = unique("drop-all");
    let setup = connect().await;
    let setup_channel = setup.open_channel().await.expect("channel");
    setup_channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            ..Default::default()
        })
        .await
        .expect("declare");
    {
        let connection = connect_with(config().connection_name(connection_name.clone())).await;
        let channel = connection.open_channel().await.expect("channel");
        for i in 0..2_000 {
            channel
                .basic_publish("", &q, false, &BasicProperties::default(), format!("{i}"))
                .await
                .expect("publish");
        }
        // The connection handle first, then the channel: commands are still queued.
        drop(connection);
        drop(channel);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let count = setup_channel
            .queue_declare(queue::Declare {
                queue: name(&q),
                passive: true,
                ..Default::default()
            })
            .await
            .expect("passive")
            .message_count;
        let listed = rabbitmqctl(&[
            "list_connections",
            "-q",
            "--no-table-headers",
            "client_properties",
        ]);
        if count == 2_000 && !listed.contains(&connection_name) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} of 2000 arrived; connection still open: {}",
            listed.contains(&connection_name)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    delete_queue(&setup_channel, &q).await;
    setup.close().await.expect("close");
}

#[tokio::test]
async fn a_no_wait_cancel_while_messages_flow_requeues_them_and_keeps_the_connection() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    // Not auto-delete: cancelling its only consumer must not delete it.
    let q = unique("nowait-cancel");
    channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            ..Default::default()
        })
        .await
        .expect("declare");
    for i in 0..500 {
        channel
            .basic_publish("", &q, false, &BasicProperties::default(), format!("{i}"))
            .await
            .expect("publish");
    }
    let consumer = channel
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    let tag = consumer.tag().clone();
    channel
        .basic_cancel_no_wait(basic::Cancel {
            consumer_tag: tag,
            ..Default::default()
        })
        .await
        .expect("cancel");
    drop(consumer);
    // Whatever was in flight went back to the queue; the connection lives on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let declared = channel
            .queue_declare(queue::Declare {
                queue: name(&q),
                passive: true,
                ..Default::default()
            })
            .await
            .expect("the channel and connection still work");
        if declared.message_count == 500 && declared.consumer_count == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{declared:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!connection.is_closed());
    delete_queue(&channel, &q).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn a_consumer_whose_buffer_is_full_can_still_make_calls() {
    // Buffer of 4 and no prefetch limit: the buffer is full at once, yet
    // each handler's RPC reply must still be read.
    let connection = connect_with(config().consumer_buffer(4)).await;
    let channel = connection.open_channel().await.expect("channel");
    let q = temp_queue(&channel, "full-buffer-rpc").await;
    for i in 0..200 {
        channel
            .basic_publish("", &q, false, &BasicProperties::default(), format!("{i}"))
            .await
            .expect("publish");
    }
    let mut consumer = channel
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    let other = connection.open_channel().await.expect("channel");
    tokio::time::timeout(Duration::from_secs(20), async {
        for _ in 0..200 {
            let delivery = consumer.next().await.expect("open").expect("delivery");
            other
                .queue_declare(queue::Declare {
                    queue: name(&q),
                    passive: true,
                    ..Default::default()
                })
                .await
                .expect("an RPC while deliveries wait");
            delivery.ack().await.expect("ack");
        }
    })
    .await
    .expect("no deadlock between a full consumer buffer and an RPC");
    connection.close().await.expect("close");
}
