//! Automatic recovery against a real RabbitMQ, through a TCP fault proxy that
//! resets, closes, blackholes or cuts the connection mid-frame, and with the
//! server closing it (`rabbitmqctl close_connection`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{
    BasicProperties, Channel, Config, Confirmation, Connection, ConsumeOptions, Error,
    RecoveryConfig, RecoveryEvent, ReplyError,
};
use amqp_client_tests::proxy::{Fault, FaultProxy};
use amqp_client_tests::{
    broker_address, config, connect, connection_pid, delete_queue, name, rabbitmqctl, recovered,
    unique, wait_for_event,
};

/// A config that goes through `proxy`, recovering quickly.
fn through(proxy: &FaultProxy) -> Config {
    config()
        .host("127.0.0.1")
        .port(proxy.port())
        .recovery(RecoveryConfig {
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            ..RecoveryConfig::default()
        })
}

async fn declare(channel: &Channel, queue: &str, auto_delete: bool) {
    channel
        .queue_declare(queue::Declare {
            queue: name(queue),
            auto_delete,
            ..Default::default()
        })
        .await
        .expect("declare");
}

async fn delete(queue: &str) {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let _ = channel
        .queue_delete(queue::Delete {
            queue: name(queue),
            ..Default::default()
        })
        .await;
    connection.close().await.expect("close");
}

async fn next_body(consumer: &mut amqp091::Consumer) -> String {
    let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("a delivery in time")
        .expect("the consumer is open")
        .expect("a delivery");
    let body = String::from_utf8_lossy(&delivery.body).into_owned();
    // Acks may be refused as stale when a reconnect came in between.
    let _ = delivery.ack().await;
    body
}

async fn survives(fault: Fault, heartbeat: u16) {
    let proxy = FaultProxy::start(broker_address()).await;
    let hook_runs = Arc::new(AtomicUsize::new(0));
    let runs = hook_runs.clone();
    let connection = Connection::builder(through(&proxy).heartbeat(heartbeat))
        .on_connect(move |_connection, _info| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .connect()
        .await
        .expect("connect");
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");
    let q = unique("survives");
    declare(&channel, &q, false).await;
    channel
        .basic_qos(basic::Qos {
            prefetch_count: 1,
            ..Default::default()
        })
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    channel
        .basic_publish("", &q, false, &BasicProperties::default(), "before")
        .await
        .expect("publish");
    assert_eq!(next_body(&mut consumer).await, "before");
    // A synchronous call on the channel orders after the ack: the broker has
    // it before the fault, so "before" is not redelivered.
    channel
        .basic_qos(basic::Qos {
            prefetch_count: 1,
            ..Default::default()
        })
        .await
        .expect("qos");

    proxy.inject(fault);
    wait_for_event(&mut events, |e| {
        matches!(e, RecoveryEvent::Recovering { .. })
    })
    .await;
    recovered(&mut events).await;
    assert!(
        proxy.connections_accepted() >= 2,
        "the client reconnected through the proxy"
    );

    // The same handles keep working: the channel publishes, the consumer's
    // stream yields, and prefetch 1 was restored.
    for i in 0..3 {
        channel
            .basic_publish(
                "",
                &q,
                false,
                &BasicProperties::default(),
                format!("after-{i}"),
            )
            .await
            .expect("publish");
    }
    let first = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("delivery")
        .expect("open")
        .expect("ok");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), consumer.next())
            .await
            .is_err(),
        "prefetch 1 still applies after recovery"
    );
    first.ack().await.expect("ack of a fresh delivery");
    let mut seen = vec![String::from_utf8_lossy(&first.body).into_owned()];
    while seen.len() < 3 {
        seen.push(next_body(&mut consumer).await);
    }
    assert_eq!(seen, ["after-0", "after-1", "after-2"]);
    let declared = channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            passive: true,
            ..Default::default()
        })
        .await
        .expect("the queue is there");
    assert_eq!(declared.consumer_count, 1, "one consumer, re-created once");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        hook_runs.load(Ordering::SeqCst),
        2,
        "the hook ran on connect and on reconnect"
    );
    connection.close().await.expect("close");
    delete(&q).await;
}

#[tokio::test]
async fn recovers_from_a_reset_connection() {
    survives(Fault::Reset, 60).await;
}

#[tokio::test]
async fn recovers_from_a_closed_socket() {
    survives(Fault::Close, 60).await;
}

#[tokio::test]
async fn recovers_from_a_blackhole_caught_by_heartbeats() {
    survives(Fault::Blackhole, 1).await;
}

#[tokio::test]
async fn recovers_from_a_cut_in_the_middle_of_a_frame() {
    let proxy = FaultProxy::start(broker_address()).await;
    let connection = Connection::connect(through(&proxy)).await.expect("connect");
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");
    let q = unique("mid-frame");
    declare(&channel, &q, false).await;
    let mut consumer = channel
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    // Let 20 bytes of the next delivery through: its method frame is cut.
    proxy.inject(Fault::CutAfter(20));
    channel
        .basic_publish("", &q, false, &BasicProperties::default(), "x".repeat(1000))
        .await
        .expect("publish");
    recovered(&mut events).await;
    // The message was never acked: it comes (again) after recovery.
    assert_eq!(next_body(&mut consumer).await, "x".repeat(1000));
    connection.close().await.expect("close");
    delete(&q).await;
}

#[tokio::test]
async fn recovers_from_a_server_side_close_and_reports_it() {
    let connection_name = unique("forced");
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = errors.clone();
    let connection =
        Connection::builder(config().connection_name(connection_name.clone()).recovery(
            RecoveryConfig {
                initial_delay: Duration::from_millis(50),
                ..RecoveryConfig::default()
            },
        ))
        .on_error(move |e| seen.lock().expect("lock").push(e.to_string()))
        .connect()
        .await
        .expect("connect");
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");
    let pid = connection_pid(&connection_name).await;
    rabbitmqctl(&["close_connection", &pid, "forced by the test"]);
    let cause = wait_for_event(&mut events, |e| {
        matches!(e, RecoveryEvent::Recovering { .. })
    })
    .await;
    let RecoveryEvent::Recovering { cause } = cause else {
        unreachable!()
    };
    assert_eq!(
        cause.reply_error(),
        Some(ReplyError::ConnectionForced),
        "{cause}"
    );
    recovered(&mut events).await;
    channel
        .basic_qos(basic::Qos::default())
        .await
        .expect("the channel works again");
    assert!(errors
        .lock()
        .expect("lock")
        .iter()
        .any(|e| e.contains("forced by the test")));
    assert!(!connection.is_closed());
    connection.close().await.expect("close");
}

#[tokio::test]
async fn the_applications_own_close_is_not_recovered() {
    let proxy = FaultProxy::start(broker_address()).await;
    let connection = Connection::connect(through(&proxy)).await.expect("connect");
    connection.close().await.expect("close");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        proxy.connections_accepted(),
        1,
        "no reconnect after close()"
    );
    assert!(connection.closed().await.is_ok());
}

#[tokio::test]
async fn a_failed_first_connect_is_not_retried_unless_asked() {
    let proxy = FaultProxy::start(broker_address()).await;
    proxy.refuse_new_connections(true);
    let started = std::time::Instant::now();
    let err = Connection::connect(through(&proxy).connection_timeout(Duration::from_secs(2)))
        .await
        .expect_err("refused");
    assert!(started.elapsed() < Duration::from_secs(3), "{err}");

    let mut retrying = through(&proxy);
    retrying.recovery.retry_initial_connect = true;
    let opened = tokio::spawn(Connection::connect(retrying));
    tokio::time::sleep(Duration::from_millis(400)).await;
    proxy.refuse_new_connections(false);
    let connection = tokio::time::timeout(Duration::from_secs(10), opened)
        .await
        .expect("in time")
        .expect("join")
        .expect("connected");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn calls_made_while_recovering_wait_for_it() {
    let proxy = FaultProxy::start(broker_address()).await;
    let connection = Connection::connect(through(&proxy)).await.expect("connect");
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");
    proxy.refuse_new_connections(true);
    proxy.inject(Fault::Reset);
    wait_for_event(&mut events, |e| {
        matches!(e, RecoveryEvent::Recovering { .. })
    })
    .await;
    assert!(connection.is_recovering());
    let call = tokio::spawn({
        let channel = channel.clone();
        async move {
            channel
                .basic_qos(basic::Qos {
                    prefetch_count: 7,
                    ..Default::default()
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !call.is_finished(),
        "the call waits while the broker is unreachable"
    );
    proxy.refuse_new_connections(false);
    call.await
        .expect("join")
        .expect("the call succeeds once recovered");
    connection.close().await.expect("close");

    // With a short call timeout, a call gives up with a clear error.
    let proxy = FaultProxy::start(broker_address()).await;
    let mut short = through(&proxy);
    short.recovery.call_timeout = Duration::from_millis(300);
    let connection = Connection::connect(short).await.expect("connect");
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");
    proxy.refuse_new_connections(true);
    proxy.inject(Fault::Reset);
    wait_for_event(&mut events, |e| {
        matches!(e, RecoveryEvent::Recovering { .. })
    })
    .await;
    let err = channel
        .basic_qos(basic::Qos::default())
        .await
        .expect_err("times out");
    assert!(matches!(err, Error::RecoveryTimeout(_)), "{err:?}");
    proxy.refuse_new_connections(false);
    recovered(&mut events).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn acking_a_delivery_from_before_the_reconnect_is_refused_not_sent() {
    let proxy = FaultProxy::start(broker_address()).await;
    let connection = Connection::connect(through(&proxy)).await.expect("connect");
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");
    let q = unique("stale");
    declare(&channel, &q, false).await;
    let mut consumer = channel
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    channel
        .basic_publish("", &q, false, &BasicProperties::default(), "m")
        .await
        .expect("publish");
    let old = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("delivery")
        .expect("open")
        .expect("ok");
    proxy.inject(Fault::Reset);
    recovered(&mut events).await;
    let err = old.ack().await.expect_err("stale");
    assert!(matches!(err, Error::StaleDelivery { .. }), "{err:?}");
    // The broker redelivers; the fresh tag acks fine and the channel stays open.
    let again = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("redelivery")
        .expect("open")
        .expect("ok");
    assert!(again.envelope.redelivered);
    again.ack().await.expect("fresh ack");
    channel
        .basic_qos(basic::Qos::default())
        .await
        .expect("the channel was not closed by a stale tag");
    connection.close().await.expect("close");
    delete(&q).await;
}

#[tokio::test]
async fn server_named_and_exclusive_queues_come_back_with_bindings_and_consumers() {
    let proxy = FaultProxy::start(broker_address()).await;
    let connection = Connection::connect(through(&proxy)).await.expect("connect");
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");
    let exchange = unique("x");
    channel
        .exchange_declare(exchange::Declare {
            exchange: name(&exchange),
            kind: name("direct"),
            auto_delete: true,
            ..Default::default()
        })
        .await
        .expect("exchange");
    let declared = channel
        .queue_declare(queue::Declare {
            exclusive: true,
            ..Default::default()
        })
        .await
        .expect("server-named");
    let old_name = declared.queue.to_string();
    channel
        .queue_bind(queue::Bind {
            queue: declared.queue.clone(),
            exchange: name(&exchange),
            routing_key: name("rk"),
            ..Default::default()
        })
        .await
        .expect("bind");
    let mut consumer = channel
        .basic_consume(
            &old_name,
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await
        .expect("consume");

    proxy.inject(Fault::Reset);
    let renamed = wait_for_event(&mut events, |e| {
        matches!(e, RecoveryEvent::QueueRenamed { .. })
    })
    .await;
    let RecoveryEvent::QueueRenamed { old, new } = renamed else {
        unreachable!()
    };
    assert_eq!(old, old_name);
    assert_ne!(new, old_name);
    recovered(&mut events).await;

    channel
        .basic_publish(
            &exchange,
            "rk",
            false,
            &BasicProperties::default(),
            "routed",
        )
        .await
        .expect("publish");
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("delivered")
        .expect("open")
        .expect("ok");
    assert_eq!(
        &delivery.body[..],
        b"routed",
        "binding and consumer follow the new name"
    );
    assert_eq!(delivery.envelope.routing_key, "rk");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn deleted_entities_and_cancelled_consumers_do_not_come_back() {
    let proxy = FaultProxy::start(broker_address()).await;
    let connection = Connection::connect(through(&proxy)).await.expect("connect");
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");
    let gone = unique("deleted");
    let kept = unique("kept");
    declare(&channel, &gone, false).await;
    declare(&channel, &kept, false).await;
    let mut cancelled = channel
        .basic_consume(&kept, ConsumeOptions::default())
        .await
        .expect("consume");
    cancelled.cancel().await.expect("cancel");
    delete_queue(&channel, &gone).await;

    proxy.inject(Fault::Reset);
    recovered(&mut events).await;
    let probe = connection.open_channel().await.expect("channel");
    let err = probe
        .queue_declare(queue::Declare {
            queue: name(&gone),
            passive: true,
            ..Default::default()
        })
        .await
        .expect_err("the deleted queue stays deleted");
    assert_eq!(err.reply_error(), Some(ReplyError::NotFound));
    let declared = channel
        .queue_declare(queue::Declare {
            queue: name(&kept),
            passive: true,
            ..Default::default()
        })
        .await
        .expect("kept");
    assert_eq!(
        declared.consumer_count, 0,
        "the cancelled consumer stays cancelled"
    );
    connection.close().await.expect("close");
    delete(&kept).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_channels_with_two_consumers_each_all_resume() {
    let proxy = FaultProxy::start(broker_address()).await;
    let connection = Connection::connect(through(&proxy)).await.expect("connect");
    let mut events = connection.recovery_events();
    let mut consumers = Vec::new();
    let mut queues = Vec::new();
    let setup = connection.open_channel().await.expect("channel");
    for i in 0..50 {
        let channel = connection.open_channel().await.expect("channel");
        let q = unique(&format!("fifty-{i}"));
        declare(&setup, &q, true).await;
        for _ in 0..2 {
            consumers.push(
                channel
                    .basic_consume(
                        &q,
                        ConsumeOptions {
                            no_ack: true,
                            ..Default::default()
                        },
                    )
                    .await
                    .expect("consume"),
            );
        }
        queues.push(q);
    }
    proxy.inject(Fault::Reset);
    recovered(&mut events).await;
    for q in &queues {
        for _ in 0..2 {
            setup
                .basic_publish("", q, false, &BasicProperties::default(), q.clone())
                .await
                .expect("publish");
        }
    }
    // Round-robin between a queue's two consumers: each gets one.
    for (i, consumer) in consumers.iter_mut().enumerate() {
        let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("consumer {i} resumed"))
            .expect("open")
            .expect("ok");
        assert_eq!(String::from_utf8_lossy(&delivery.body), queues[i / 2]);
    }
    connection.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_receives_all_ten_transactional_messages_across_a_kill() {
    let q = unique("seed-reconnect");
    let publisher = connect().await;
    let pub_channel = publisher.open_channel().await.expect("channel");
    declare(&pub_channel, &q, false).await;
    pub_channel.tx_select().await.expect("tx");
    for i in 0..10 {
        pub_channel
            .basic_publish("", &q, false, &BasicProperties::default(), format!("m{i}"))
            .await
            .expect("publish");
    }
    pub_channel.tx_commit().await.expect("commit");
    publisher.close().await.expect("close");

    let proxy = FaultProxy::start(broker_address()).await;
    let connection = Connection::connect(through(&proxy)).await.expect("connect");
    let channel = connection.open_channel().await.expect("channel");
    channel
        .basic_qos(basic::Qos {
            prefetch_count: 1,
            ..Default::default()
        })
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    let mut received = HashSet::new();
    while received.len() < 10 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("all ten arrive")
            .expect("open")
            .expect("ok");
        tokio::time::sleep(Duration::from_millis(50)).await; // slow
        if received.len() == 4 {
            proxy.inject(Fault::Reset); // killed mid-way, before this ack
        }
        let body = String::from_utf8_lossy(&delivery.body).into_owned();
        if delivery.ack().await.is_ok() {
            received.insert(body);
        }
    }
    assert_eq!(received.len(), 10);
    connection.close().await.expect("close");
    delete(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_publishes_survive_five_random_cuts() {
    const MESSAGES: usize = 20_000;
    let q = unique("confirm-cuts");
    let proxy = FaultProxy::start(broker_address()).await;
    let connection = Connection::connect(through(&proxy)).await.expect("connect");
    let channel = connection.open_channel().await.expect("channel");
    declare(&channel, &q, false).await;
    channel
        .confirm_select(confirm::Select::default())
        .await
        .expect("confirm mode");

    // Five cut points spread pseudo-randomly (a fixed LCG: reproducible)
    // over the message sequence; each cuts with confirmations outstanding.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut cut_points: Vec<usize> = (0..5)
        .map(|i| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            1000 + i * 3600 + (state >> 33) as usize % 3000
        })
        .collect();
    cut_points.sort_unstable();
    let mut acked = HashSet::new();
    let mut pending: Vec<usize> = (0..MESSAGES).collect();
    let mut republished = 0usize;
    while !pending.is_empty() {
        // Up to 500 confirmations outstanding at a time.
        let rest = pending.split_off(pending.len().min(500));
        let mut window = Vec::new();
        for id in pending.drain(..) {
            match channel
                .basic_publish("", &q, false, &BasicProperties::default(), id.to_string())
                .await
            {
                Ok(confirm) => window.push((id, Some(confirm))),
                Err(_) => window.push((id, None)),
            }
            if cut_points.first() == Some(&id) {
                cut_points.remove(0);
                proxy.inject(Fault::Reset);
            }
        }
        let mut failed = Vec::new();
        for (id, confirm) in window {
            match confirm {
                Some(confirm) => match confirm.await {
                    Ok(Confirmation::Ack) => {
                        acked.insert(id);
                    }
                    Ok(other) => panic!("unexpected confirmation {other:?}"),
                    Err(Error::PublishOutcomeUnknown(_))
                    | Err(Error::ConnectionLost(_))
                    | Err(Error::RecoveryTimeout(_)) => failed.push(id),
                    Err(other) => panic!("unexpected error {other:?}"),
                },
                None => failed.push(id),
            }
        }
        republished += failed.len();
        pending = failed;
        pending.extend(rest);
    }
    assert_eq!(acked.len(), MESSAGES, "every message was eventually acked");
    println!("re-published {republished} messages whose outcome was unknown");
    assert!(cut_points.is_empty(), "all five cuts fell while publishing");
    assert_eq!(
        proxy.connections_accepted(),
        6,
        "five cuts, five reconnects"
    );
    assert!(
        republished > 0,
        "the cuts left publishes with an unknown outcome"
    );

    // Every acked message is in the queue (re-published ones may be there twice).
    let reader = connect().await;
    let read_channel = reader.open_channel().await.expect("channel");
    let total = read_channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            passive: true,
            ..Default::default()
        })
        .await
        .expect("queue")
        .message_count as usize;
    assert!(
        total >= MESSAGES,
        "{total} messages queued for {MESSAGES} acked ids"
    );
    let mut consumer = read_channel
        .basic_consume(
            &q,
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await
        .expect("consume");
    let mut found = HashSet::new();
    let mut seen = 0usize;
    while found.len() < MESSAGES {
        let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {MESSAGES} acked messages are in the queue",
                    found.len()
                )
            })
            .expect("open")
            .expect("ok");
        seen += 1;
        found.insert(
            String::from_utf8_lossy(&delivery.body)
                .parse::<usize>()
                .expect("an id"),
        );
    }
    assert!(acked.iter().all(|id| found.contains(id)));
    assert!(seen <= total, "{seen} read of {total} queued");
    connection.close().await.expect("close");
    reader.close().await.expect("close");
    delete(&q).await;
}
