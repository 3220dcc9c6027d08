//! The recovery contract at its seams, against a real RabbitMQ: what the
//! on-connect hook owns against what recovery re-creates, credentials at
//! reconnect, confirmations pending at an application close, stream
//! consumers' offsets, and the per-call timeout.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{
    BasicProperties, Channel, Confirmation, ConnectInfo, Connection, ConsumeOptions, Credentials,
    Error, FieldTable, FieldValue, RecoveryConfig, RecoveryEvent,
};
use amqp_client_tests::proxy::{Fault, FaultProxy};
use amqp_client_tests::{
    broker_address, close_from_broker, config, connect, delete_queue, list_bindings, name,
    passive_declare, recovered, unique, wait_for_event, wait_for_message_count, TestUser,
};
use tokio::sync::mpsc;

/// Recovery that retries quickly, so that a test does not wait out backoff.
fn quick_recovery() -> RecoveryConfig {
    RecoveryConfig {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
        ..RecoveryConfig::default()
    }
}

/// Collects every body that arrives within `quiet` of the last one.
async fn drain(bodies: &mut mpsc::UnboundedReceiver<String>, quiet: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    while let Ok(Some(body)) = tokio::time::timeout(quiet, bodies.recv()).await {
        seen.push(body);
    }
    seen
}

async fn next_run(runs: &mut mpsc::UnboundedReceiver<ConnectInfo>) -> ConnectInfo {
    tokio::time::timeout(Duration::from_secs(30), runs.recv())
        .await
        .expect("the on-connect hook ran in time")
        .expect("the hook is registered")
}

/// Starts a consumer whose deliveries go to `bodies` (acked); the task ends
/// when the consumer does, and says so on `ended`.
fn forward(
    mut consumer: amqp091::Consumer,
    bodies: mpsc::UnboundedSender<String>,
    ended: mpsc::UnboundedSender<Option<Error>>,
) {
    tokio::spawn(async move {
        let mut end = None;
        while let Some(delivery) = consumer.next().await {
            match delivery {
                Ok(delivery) => {
                    let _ = bodies.send(String::from_utf8_lossy(&delivery.body).into_owned());
                    let _ = delivery.ack().await;
                }
                Err(error) => end = Some(error),
            }
        }
        let _ = ended.send(end);
    });
}

async fn consumer_count(channel: &Channel, queue: &str) -> u32 {
    passive_declare(channel, queue).await.consumer_count
}

#[tokio::test]
async fn a_queue_and_consumer_made_in_the_hook_exist_once_after_each_of_three_broker_closes() {
    let queue = unique("hook-durable");
    let connection_name = unique("hook-durable-conn");
    let (bodies_tx, mut bodies) = mpsc::unbounded_channel();
    let (ended_tx, mut ended) = mpsc::unbounded_channel();
    let (runs_tx, mut runs) = mpsc::unbounded_channel();
    let hook_queue = queue.clone();
    let connection = Connection::builder(
        config()
            .connection_name(connection_name.clone())
            .recovery(quick_recovery()),
    )
    .on_connect(move |connection, info| {
        let (queue, bodies, ended, runs) = (
            hook_queue.clone(),
            bodies_tx.clone(),
            ended_tx.clone(),
            runs_tx.clone(),
        );
        async move {
            // The seeds' pattern: declare and consume in the hook.
            let channel = connection.open_channel().await?;
            channel
                .queue_declare(queue::Declare {
                    queue: queue.as_str().into(),
                    durable: true,
                    ..Default::default()
                })
                .await?;
            let consumer = channel
                .basic_consume(&queue, ConsumeOptions::default())
                .await?;
            forward(consumer, bodies, ended);
            let _ = runs.send(info);
            Ok(())
        }
    })
    .connect()
    .await
    .expect("connect");
    let first = next_run(&mut runs).await;
    assert!(!first.is_reconnect());
    assert_eq!((first.reconnects, first.attempt), (0, 1));
    // The application's own channel, recovered automatically.
    let publisher = connection.open_channel().await.expect("channel");
    publisher
        .basic_publish("", &queue, false, &BasicProperties::default(), "m0")
        .await
        .expect("publish");
    assert_eq!(drain(&mut bodies, Duration::from_millis(500)).await, ["m0"]);

    for round in 1..=3u64 {
        close_from_broker(&connection_name).await;
        let info = next_run(&mut runs).await;
        assert!(info.is_reconnect());
        assert_eq!(info.reconnects, round);
        // The previous run's consumer ended with a typed error, so its task exited.
        let end = tokio::time::timeout(Duration::from_secs(10), ended.recv())
            .await
            .expect("the previous consumer's task ended")
            .expect("sender alive");
        assert!(
            matches!(end, Some(ref e) if e.is_connection_error()),
            "ended with {end:?}"
        );
        assert_eq!(
            consumer_count(&publisher, &queue).await,
            1,
            "round {round}: exactly one consumer"
        );
        let body = format!("m{round}");
        publisher
            .basic_publish("", &queue, false, &BasicProperties::default(), body.clone())
            .await
            .expect("publish");
        assert_eq!(
            drain(&mut bodies, Duration::from_millis(500)).await,
            [body],
            "round {round}: delivered exactly once"
        );
    }
    assert!(
        ended.try_recv().is_err(),
        "the current run's consumer is alive"
    );
    delete_queue(&publisher, &queue).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn a_server_named_queue_bound_in_the_hook_is_one_binding_after_each_of_three_broker_closes() {
    let exchange = unique("hook-fanout");
    let connection_name = unique("hook-fanout-conn");
    let (bodies_tx, mut bodies) = mpsc::unbounded_channel();
    let (ended_tx, _ended) = mpsc::unbounded_channel();
    let (runs_tx, mut runs) = mpsc::unbounded_channel();
    let hook_exchange = exchange.clone();
    let connection = Connection::builder(
        config()
            .connection_name(connection_name.clone())
            .recovery(quick_recovery()),
    )
    .on_connect(move |connection, info| {
        let (exchange, bodies, ended, runs) = (
            hook_exchange.clone(),
            bodies_tx.clone(),
            ended_tx.clone(),
            runs_tx.clone(),
        );
        async move {
            let channel = connection.open_channel().await?;
            channel
                .exchange_declare(exchange::Declare {
                    exchange: exchange.as_str().into(),
                    kind: "fanout".into(),
                    ..Default::default()
                })
                .await?;
            let declared = channel
                .queue_declare(queue::Declare {
                    exclusive: true,
                    ..Default::default()
                })
                .await?;
            channel
                .queue_bind(queue::Bind {
                    queue: declared.queue.clone(),
                    exchange: exchange.as_str().into(),
                    ..Default::default()
                })
                .await?;
            let consumer = channel
                .basic_consume(&declared.queue, ConsumeOptions::default())
                .await?;
            forward(consumer, bodies, ended);
            let _ = runs.send(info);
            Ok(())
        }
    })
    .connect()
    .await
    .expect("connect");
    next_run(&mut runs).await;
    let publisher = connection.open_channel().await.expect("channel");
    let bound = || {
        list_bindings()
            .into_iter()
            .filter(|(source, _, _)| *source == exchange)
            .count()
    };
    assert_eq!(bound(), 1);
    for round in 1..=3u64 {
        close_from_broker(&connection_name).await;
        assert_eq!(next_run(&mut runs).await.reconnects, round);
        assert_eq!(bound(), 1, "round {round}: exactly one bound queue");
        let body = format!("f{round}");
        publisher
            .basic_publish(
                &exchange,
                "",
                false,
                &BasicProperties::default(),
                body.clone(),
            )
            .await
            .expect("publish");
        assert_eq!(
            drain(&mut bodies, Duration::from_millis(500)).await,
            [body],
            "round {round}: delivered exactly once"
        );
    }
    publisher
        .exchange_delete(exchange::Delete {
            exchange: name(&exchange),
            ..Default::default()
        })
        .await
        .expect("delete the exchange");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn what_the_application_declares_outside_the_hook_is_still_recovered() {
    let queue = unique("app-owned");
    let connection_name = unique("app-owned-conn");
    let (runs_tx, mut runs) = mpsc::unbounded_channel();
    let connection = Connection::builder(
        config()
            .connection_name(connection_name.clone())
            .recovery(quick_recovery()),
    )
    .on_connect(move |_connection, info| {
        let runs = runs_tx.clone();
        async move {
            let _ = runs.send(info);
            Ok(())
        }
    })
    .connect()
    .await
    .expect("connect");
    next_run(&mut runs).await;
    let channel = connection.open_channel().await.expect("channel");
    channel
        .queue_declare(queue::Declare {
            queue: name(&queue),
            auto_delete: true,
            ..Default::default()
        })
        .await
        .expect("declare");
    let mut consumer = channel
        .basic_consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    close_from_broker(&connection_name).await;
    assert!(next_run(&mut runs).await.is_reconnect());
    assert_eq!(consumer_count(&channel, &queue).await, 1);
    channel
        .basic_publish("", &queue, false, &BasicProperties::default(), "kept")
        .await
        .expect("publish");
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("delivery");
    assert_eq!(&delivery.body[..], b"kept");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn a_reconnect_uses_the_secret_given_to_update_secret() {
    let user = TestUser::add(&unique("rotating"), "first-password");
    let connection_name = unique("rotating-conn");
    let connection = Connection::connect(
        config()
            .credentials(user.name.clone(), "first-password")
            .connection_name(connection_name.clone())
            .recovery(quick_recovery()),
    )
    .await
    .expect("connect");
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");
    user.change_password("second-password");
    connection
        .update_secret("second-password", "rotation")
        .await
        .expect("the broker takes the new secret");
    close_from_broker(&connection_name).await;
    recovered(&mut events).await;
    channel
        .basic_qos(basic::Qos::default())
        .await
        .expect("the channel works on the new connection");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn a_credentials_provider_is_asked_before_each_reconnect_and_refusals_are_reported() {
    let user = TestUser::add(&unique("provided"), "token-1");
    let connection_name = unique("provided-conn");
    let current = Arc::new(Mutex::new(Credentials::new(user.name.clone(), "token-1")));
    let asked = Arc::new(Mutex::new(0u32));
    let errors = Arc::new(Mutex::new(Vec::<Error>::new()));
    let (provider_current, provider_asked, seen) = (current.clone(), asked.clone(), errors.clone());
    let connection = Connection::builder(
        config()
            // Not the user's password: only the provider's answer works.
            .credentials("nobody", "nothing")
            .connection_name(connection_name.clone())
            .recovery(RecoveryConfig {
                max_authentication_failures: Some(3),
                ..quick_recovery()
            }),
    )
    .credentials_provider(move || {
        let credentials = provider_current.lock().expect("lock").clone();
        *provider_asked.lock().expect("lock") += 1;
        async move { Ok(credentials) }
    })
    .on_error(move |error| seen.lock().expect("lock").push(error.clone()))
    .connect()
    .await
    .expect("connect with the provider's credentials");
    assert_eq!(*asked.lock().expect("lock"), 1);
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");

    // A token refresh: the reconnect authenticates with the new one.
    user.change_password("token-2");
    *current.lock().expect("lock") = Credentials::new(user.name.clone(), "token-2");
    close_from_broker(&connection_name).await;
    recovered(&mut events).await;
    assert_eq!(*asked.lock().expect("lock"), 2);
    channel
        .basic_qos(basic::Qos::default())
        .await
        .expect("the channel works on the new connection");

    // Credentials that stay wrong: each refusal is reported, then recovery gives up.
    *current.lock().expect("lock") = Credentials::new(user.name.clone(), "expired");
    close_from_broker(&connection_name).await;
    let failed = wait_for_event(&mut events, |e| {
        matches!(e, RecoveryEvent::AttemptFailed { .. })
    })
    .await;
    let RecoveryEvent::AttemptFailed { attempt, error } = failed else {
        unreachable!()
    };
    assert_eq!(attempt, 1);
    assert!(error.is_authentication_failure(), "{error}");
    let gave_up = wait_for_event(&mut events, |e| matches!(e, RecoveryEvent::Failed { .. })).await;
    let RecoveryEvent::Failed { error } = gave_up else {
        unreachable!()
    };
    assert!(error.is_authentication_failure(), "{error}");
    assert_eq!(*asked.lock().expect("lock"), 2 + 3);
    let refusals = errors
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| matches!(e, Error::AuthenticationFailed { .. }))
        .count();
    assert!(
        refusals >= 3,
        "each refusal reached the error handler ({refusals})"
    );
    assert!(connection.is_closed());
    let error = channel.basic_qos(basic::Qos::default()).await.unwrap_err();
    assert!(error.is_authentication_failure(), "{error}");
}

/// Publishes `count` persistent messages on a confirm-mode channel without
/// awaiting their confirmations.
async fn unawaited_publishes(
    channel: &Channel,
    queue: &str,
    count: usize,
) -> Vec<amqp091::PublishConfirm> {
    channel
        .confirm_select(confirm::Select::default())
        .await
        .expect("confirm mode");
    let persistent = BasicProperties {
        delivery_mode: Some(2),
        ..Default::default()
    };
    let mut confirms = Vec::with_capacity(count);
    for i in 0..count {
        confirms.push(
            channel
                .basic_publish("", queue, false, &persistent, format!("{i}"))
                .await
                .expect("publish"),
        );
    }
    confirms
}

/// Every outcome is an ack or unknown (never a failure), and the queue holds
/// at least every acked message.
async fn check_outcomes(confirms: Vec<amqp091::PublishConfirm>, queue: &str) {
    let (mut acked, mut unknown) = (0u32, 0u32);
    for confirm in confirms {
        match confirm.await {
            Ok(Confirmation::Ack) => acked += 1,
            Err(Error::PublishOutcomeUnknown(_)) => unknown += 1,
            other => panic!("an outcome claims failure: {other:?}"),
        }
    }
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let in_queue = passive_declare(&channel, queue).await.message_count;
    assert_eq!(acked + unknown, 1000);
    assert!(in_queue >= acked, "{in_queue} in the queue, {acked} acked");
    delete_queue(&channel, queue).await;
    connection.close().await.expect("close");
}

async fn durable_queue(channel: &Channel) -> String {
    let queue = unique("pending-confirms");
    channel
        .queue_declare(queue::Declare {
            queue: name(&queue),
            durable: true,
            ..Default::default()
        })
        .await
        .expect("declare");
    queue
}

#[tokio::test]
async fn confirms_pending_when_the_application_closes_the_channel_are_unknown_not_failed() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let queue = durable_queue(&channel).await;
    let confirms = unawaited_publishes(&channel, &queue, 1000).await;
    channel.close().await.expect("close");
    check_outcomes(confirms, &queue).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn confirms_pending_when_the_application_closes_the_connection_are_unknown_not_failed() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let queue = durable_queue(&channel).await;
    let confirms = unawaited_publishes(&channel, &queue, 1000).await;
    connection.close().await.expect("close");
    check_outcomes(confirms, &queue).await;
}

#[tokio::test]
async fn a_stream_consumer_resumes_after_its_last_delivery_across_a_broker_close() {
    let queue = unique("stream");
    let connection_name = unique("stream-conn");
    let connection = Connection::connect(
        config()
            .connection_name(connection_name.clone())
            .recovery(quick_recovery()),
    )
    .await
    .expect("connect");
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");
    channel
        .queue_declare(queue::Declare {
            queue: name(&queue),
            durable: true,
            arguments: FieldTable::new()
                .with("x-queue-type", FieldValue::LongString("stream".into())),
            ..Default::default()
        })
        .await
        .expect("declare a stream");
    let publish = |range: std::ops::Range<u32>| {
        let channel = channel.clone();
        let queue = queue.clone();
        async move {
            for i in range {
                channel
                    .basic_publish(
                        "",
                        &queue,
                        false,
                        &BasicProperties::default(),
                        format!("{i}"),
                    )
                    .await
                    .expect("publish");
            }
        }
    };
    publish(0..100).await;
    wait_for_message_count(&channel, &queue, 100, Duration::from_secs(10)).await;
    // Streams need a prefetch and acks (as credit).
    channel
        .basic_qos(basic::Qos {
            prefetch_count: 10,
            ..Default::default()
        })
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            &queue,
            ConsumeOptions {
                arguments: FieldTable::new()
                    .with("x-stream-offset", FieldValue::LongString("first".into())),
                ..Default::default()
            },
        )
        .await
        .expect("consume");
    let mut seen = Vec::new();
    while seen.len() < 50 {
        seen.push(next_stream_body(&mut consumer).await);
    }
    close_from_broker(&connection_name).await;
    recovered(&mut events).await;
    publish(100..150).await;
    while seen.len() < 150 {
        seen.push(next_stream_body(&mut consumer).await);
    }
    // Nothing more comes: nothing was delivered twice.
    let extra = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
    assert!(extra.is_err(), "an extra delivery: {extra:?}");
    let expected: Vec<u32> = (0..150).collect();
    assert_eq!(seen, expected, "every message once, in order");
    delete_queue(&channel, &queue).await;
    connection.close().await.expect("close");
}

async fn next_stream_body(consumer: &mut amqp091::Consumer) -> u32 {
    let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("a delivery in time")
        .expect("the consumer is open")
        .expect("a delivery");
    // Credit for the stream; refused as stale for deliveries from before the reconnect.
    let _ = delivery.ack().await;
    std::str::from_utf8(&delivery.body)
        .expect("utf-8")
        .parse()
        .expect("a number")
}

/// A connection through a proxy that can stop forwarding, with no
/// heartbeats (so only the call timeout notices) and a short call timeout,
/// set in the URL.
async fn stalling_connection(proxy: &FaultProxy) -> Connection {
    let broker = config();
    let url = format!(
        "amqp://{}:{}@127.0.0.1:{}/%2f?heartbeat=0&call_timeout=500",
        broker.user,
        broker.password,
        proxy.port()
    );
    Connection::open(&url).await.expect("connect")
}

/// Awaits `call`, failing the test if it hangs instead of timing out.
async fn bounded<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call returned instead of hanging")
}

fn is_timeout(result: &Result<impl std::fmt::Debug, Error>, call: &str) -> bool {
    matches!(result, Err(Error::CallTimeout { call: c, timeout }) if *c == call && *timeout == Duration::from_millis(500))
}

#[tokio::test]
async fn every_wait_on_a_stalled_broker_ends_with_a_timeout_and_closes_its_channel() {
    let proxy = FaultProxy::start(broker_address()).await;
    let connection = stalling_connection(&proxy).await;
    let rpc_channel = connection.open_channel().await.expect("channel");
    let confirm_channel = connection.open_channel().await.expect("channel");
    confirm_channel
        .confirm_select(confirm::Select::default())
        .await
        .expect("confirm mode");
    let closing_channel = connection.open_channel().await.expect("channel");
    proxy.inject(Fault::Blackhole);

    let declared = bounded(rpc_channel.queue_declare(queue::Declare::default())).await;
    assert!(is_timeout(&declared, "queue.declare"), "{declared:?}");
    // The channel's state is unknown: it is closed, and says why at once.
    assert!(matches!(
        rpc_channel.closed_error(),
        Some(Error::CallTimeout { .. })
    ));
    let again = bounded(rpc_channel.basic_qos(basic::Qos::default())).await;
    assert!(is_timeout(&again, "queue.declare"), "{again:?}");

    let opened = bounded(connection.open_channel()).await;
    assert!(is_timeout(&opened, "channel.open"), "{opened:?}");

    confirm_channel
        .basic_publish("", "nowhere", false, &BasicProperties::default(), "x")
        .await
        .expect("publish is queued");
    let confirmed = bounded(confirm_channel.wait_for_confirms()).await;
    assert!(is_timeout(&confirmed, "wait_for_confirms"), "{confirmed:?}");

    let updated = bounded(connection.update_secret("guest", "refresh")).await;
    assert!(
        is_timeout(&updated, "connection.update-secret"),
        "{updated:?}"
    );

    let closed = bounded(closing_channel.close()).await;
    assert!(is_timeout(&closed, "channel.close"), "{closed:?}");
    drop(connection);
}
