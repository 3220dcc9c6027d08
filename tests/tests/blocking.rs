//! The blocking API (`amqp091::blocking`) against the broker, from plain
//! `#[test]` functions: no async runtime in the test code, except where a
//! test checks that calling from inside one is refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp091::blocking::{Channel, Connection, RecvTimeoutError};
use amqp091::prelude::*;
use amqp091::{
    BasicProperties, Confirmation, ConsumeOptions, Error, FieldTable, RecoveryConfig,
    RecoveryEvent, ReplyError,
};
use amqp_client_tests::{config, name, rabbitmqctl, unique};

/// Connects, failing loudly when the broker does not answer.
fn connect() -> Connection {
    let config = config();
    let address = config.address();
    Connection::connect(config).unwrap_or_else(|e| panic!("no RabbitMQ at {address}: {e}"))
}

/// Declares a queue of this test's own, deleted when its connection goes.
fn declare(channel: &Channel, prefix: &str, arguments: FieldTable) -> String {
    let queue = unique(prefix);
    channel
        .queue_declare(queue::Declare {
            queue: name(&queue),
            auto_delete: false,
            exclusive: true,
            arguments,
            ..Default::default()
        })
        .expect("queue.declare");
    queue
}

#[test]
fn a_published_message_is_got_and_acked() {
    let connection = connect();
    let channel = connection.open_channel().expect("channel");
    let queue = declare(&channel, "blocking-get", FieldTable::new());
    let confirm = channel
        .basic_publish("", &queue, false, &BasicProperties::default(), "hello")
        .expect("publish");
    assert_eq!(confirm.wait().expect("outcome"), Confirmation::NotRequested);

    let got = (0..50)
        .find_map(|_| {
            let got = channel.basic_get(&queue, false).expect("basic.get");
            if got.is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            got
        })
        .expect("the message arrives");
    assert_eq!(&got.delivery.body[..], b"hello");
    assert_eq!(got.message_count, 0);
    got.delivery.ack().expect("ack");
    assert!(channel
        .basic_get(&queue, false)
        .expect("basic.get")
        .is_none());
    let declared = channel
        .queue_declare(queue::Declare {
            queue: name(&queue),
            passive: true,
            ..Default::default()
        })
        .expect("passive declare");
    assert_eq!(declared.message_count, 0, "the ack took the message away");
    connection.close().expect("close");
}

#[test]
fn confirms_say_ack_and_nack() {
    let connection = connect();
    let channel = connection.open_channel().expect("channel");
    channel
        .confirm_select(confirm::Select::default())
        .expect("confirm.select");
    let queue = declare(&channel, "blocking-confirm", FieldTable::new());
    let acked = channel
        .basic_publish("", &queue, false, &BasicProperties::default(), "kept")
        .expect("publish");
    assert_eq!(acked.wait().expect("outcome"), Confirmation::Ack);

    // A queue that takes no message and refuses what comes: the broker nacks.
    let full = declare(
        &channel,
        "blocking-full",
        FieldTable::new()
            .with(name("x-max-length"), 0i32)
            .with(name("x-overflow"), "reject-publish"),
    );
    let nacked = channel
        .basic_publish("", &full, false, &BasicProperties::default(), "refused")
        .expect("publish");
    assert_eq!(nacked.wait().expect("outcome"), Confirmation::Nack);
    // Confirmations not waited for one by one: wait_for_confirms tells.
    for _ in 0..3 {
        drop(
            channel
                .basic_publish("", &full, false, &BasicProperties::default(), "refused")
                .expect("publish"),
        );
    }
    assert!(
        !channel.wait_for_confirms().expect("wait_for_confirms"),
        "nacks were among the publishes"
    );

    // Unroutable and mandatory: returned with its confirmation.
    let returned = channel
        .basic_publish(
            "",
            unique("no-such-queue"),
            true,
            &BasicProperties::default(),
            "lost",
        )
        .expect("publish");
    match returned.wait().expect("outcome") {
        Confirmation::Returned(message) => assert_eq!(&message.body[..], b"lost"),
        other => panic!("expected a return, got {other:?}"),
    }
    connection.close().expect("close");
}

#[test]
fn a_consumer_is_an_iterator_of_deliveries_to_ack() {
    let connection = connect();
    let channel = connection.open_channel().expect("channel");
    let queue = declare(&channel, "blocking-consume", FieldTable::new());
    for i in 0..10 {
        let _ = channel
            .basic_publish(
                "",
                &queue,
                false,
                &BasicProperties::default(),
                format!("m{i}"),
            )
            .expect("publish");
    }
    let mut consumer = channel
        .basic_consume(&queue, ConsumeOptions::default())
        .expect("basic.consume");
    let bodies: Vec<String> = consumer
        .by_ref()
        .take(10)
        .map(|delivery| {
            let delivery = delivery.expect("delivery");
            delivery.ack().expect("ack");
            String::from_utf8_lossy(&delivery.body).into_owned()
        })
        .collect();
    let expected: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected);

    match consumer.recv_timeout(Duration::from_millis(200)) {
        Err(RecvTimeoutError::Timeout(_)) => {}
        other => panic!("expected a timeout on an empty queue, got {other:?}"),
    }
    let _ = channel
        .basic_publish("", &queue, false, &BasicProperties::default(), "late")
        .expect("publish");
    let late = consumer
        .recv_timeout(Duration::from_secs(5))
        .expect("the late message");
    assert_eq!(&late.body[..], b"late");
    late.ack().expect("ack");

    consumer.cancel().expect("basic.cancel");
    assert!(consumer.next().is_none(), "a cancelled consumer ends");
    let declared = channel
        .queue_declare(queue::Declare {
            queue: name(&queue),
            passive: true,
            ..Default::default()
        })
        .expect("passive declare");
    assert_eq!(declared.message_count, 0, "every message was acked");
    connection.close().expect("close");
}

#[test]
fn a_broker_error_is_typed_and_closes_the_channel() {
    let connection = connect();
    let channel = connection.open_channel().expect("channel");
    let missing = unique("blocking-missing");
    let error = channel
        .queue_declare(queue::Declare {
            queue: name(&missing),
            passive: true,
            ..Default::default()
        })
        .expect_err("a passive declare of a missing queue fails");
    assert_eq!(error.reply_error(), Some(ReplyError::NotFound), "{error}");
    assert!(matches!(error, Error::ChannelClosed { .. }), "{error:?}");

    // The channel answers every later call with the error that closed it.
    let later = channel
        .basic_qos(basic::Qos::default())
        .expect_err("the channel is closed");
    assert_eq!(later.reply_error(), Some(ReplyError::NotFound), "{later}");
    assert!(channel.closed_error().is_some());
    // The connection is unharmed.
    let other = connection.open_channel().expect("another channel");
    other.basic_qos(basic::Qos::default()).expect("basic.qos");
    connection.close().expect("close");
}

/// The broker's pid of the connection named `connection_name`.
fn connection_pid(connection_name: &str) -> String {
    for _ in 0..100 {
        let listing = rabbitmqctl(&[
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ]);
        if let Some(line) = listing.lines().find(|l| l.contains(connection_name)) {
            return line.split('\t').next().unwrap_or_default().to_owned();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("connection {connection_name} never appeared in rabbitmqctl list_connections");
}

fn wait_for(
    events: &mut amqp091::blocking::RecoveryEvents,
    wanted: fn(&RecoveryEvent) -> bool,
) -> RecoveryEvent {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match events.recv_timeout(left) {
            Ok(event) if wanted(&event) => return event,
            Ok(_) => continue,
            Err(e) => panic!("the awaited recovery event never came: {e}"),
        }
    }
}

#[test]
fn recovers_after_a_broker_side_close_and_runs_the_hook_again() {
    let connection_name = unique("blocking-forced");
    let hook_queue = unique("blocking-hook");
    let hook_runs = Arc::new(AtomicU64::new(0));
    let reconnects_seen = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let connection =
        Connection::builder(config().connection_name(connection_name.clone()).recovery(
            RecoveryConfig {
                initial_delay: Duration::from_millis(50),
                ..RecoveryConfig::default()
            },
        ))
        .on_connect({
            let hook_runs = hook_runs.clone();
            let reconnects_seen = reconnects_seen.clone();
            let hook_queue = hook_queue.clone();
            move |connection, info| {
                // Blocking calls in the hook: it has a thread of its own.
                let channel = connection.open_channel()?;
                channel.queue_declare(queue::Declare {
                    queue: name(&hook_queue),
                    auto_delete: true,
                    ..Default::default()
                })?;
                channel.close()?;
                reconnects_seen.lock().expect("lock").push(info.reconnects);
                hook_runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .on_error({
            let errors = errors.clone();
            move |e| errors.lock().expect("lock").push(e.to_string())
        })
        .connect()
        .unwrap_or_else(|e| panic!("no RabbitMQ: {e}"));
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().expect("channel");
    let queue = declare(&channel, "blocking-recovered", FieldTable::new());
    let mut consumer = channel
        .basic_consume(&queue, ConsumeOptions::default())
        .expect("basic.consume");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while hook_runs.load(Ordering::SeqCst) < 1 {
        assert!(std::time::Instant::now() < deadline, "the hook never ran");
        std::thread::sleep(Duration::from_millis(20));
    }

    let pid = connection_pid(&connection_name);
    rabbitmqctl(&["close_connection", &pid, "forced by the blocking test"]);
    let RecoveryEvent::Recovering { cause } = wait_for(&mut events, |e| {
        matches!(e, RecoveryEvent::Recovering { .. })
    }) else {
        unreachable!()
    };
    assert_eq!(
        cause.reply_error(),
        Some(ReplyError::ConnectionForced),
        "{cause}"
    );
    wait_for(&mut events, |e| matches!(e, RecoveryEvent::Recovered));

    // The channel, its queue and its consumer are back.
    channel
        .basic_qos(basic::Qos::default())
        .expect("the channel works again");
    let _ = channel
        .basic_publish("", &queue, false, &BasicProperties::default(), "after")
        .expect("publish");
    let delivery = consumer
        .recv_timeout(Duration::from_secs(10))
        .expect("a delivery after recovery");
    assert_eq!(&delivery.body[..], b"after");
    delivery.ack().expect("ack");

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while hook_runs.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the hook did not run on reconnect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(*reconnects_seen.lock().expect("lock"), vec![0, 1]);
    assert!(errors
        .lock()
        .expect("lock")
        .iter()
        .any(|e| e.contains("forced by the blocking test")));
    assert!(!connection.is_closed());
    channel
        .queue_delete(queue::Delete {
            queue: name(&hook_queue),
            ..Default::default()
        })
        .expect("delete the hook's queue");
    connection.close().expect("close");
}

#[test]
fn calls_from_inside_an_async_runtime_are_refused() {
    let connection = connect();
    let channel = connection.open_channel().expect("channel");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let (declared, opened, closed) = runtime.block_on(async {
        (
            channel.queue_declare(queue::Declare {
                queue: name(&unique("blocking-refused")),
                exclusive: true,
                ..Default::default()
            }),
            Connection::open(&amqp_client_tests::amqp_url()),
            connection.close(),
        )
    });
    for (what, outcome) in [
        ("queue_declare", declared.map(drop)),
        ("Connection::open", opened.map(drop)),
        ("close", closed),
    ] {
        match outcome {
            Err(Error::BlockingInAsyncContext { .. }) => {}
            other => {
                panic!("{what} inside a runtime: expected BlockingInAsyncContext, got {other:?}")
            }
        }
    }
    // Outside the runtime, the same calls work: nothing was done.
    assert!(!connection.is_closed());
    channel.basic_qos(basic::Qos::default()).expect("basic.qos");
    connection.close().expect("close");
}

#[test]
fn dropping_the_last_handle_closes_the_connection() {
    let connection_name = unique("blocking-dropped");
    let connection = Connection::connect(config().connection_name(connection_name.clone()))
        .unwrap_or_else(|e| panic!("no RabbitMQ: {e}"));
    let channel = connection.open_channel().expect("channel");
    connection_pid(&connection_name);
    drop(connection);
    // The channel keeps the connection: it is still usable.
    channel.basic_qos(basic::Qos::default()).expect("basic.qos");
    drop(channel);
    let listing = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "client_properties",
    ]);
    assert!(
        !listing.contains(&connection_name),
        "the connection is gone once the last handle is: the drop waited for the close"
    );
}

#[test]
fn consume_with_calls_the_handler_on_a_thread_until_the_connection_closes() {
    let connection = connect();
    let channel = connection.open_channel().expect("channel");
    let queue = declare(&channel, "blocking-consume-with", FieldTable::new());
    let (bodies, received) = std::sync::mpsc::channel();
    let consuming = channel
        .basic_consume_with(&queue, ConsumeOptions::default(), move |delivery| {
            delivery.ack().expect("ack");
            let _ = bodies.send(String::from_utf8_lossy(&delivery.body).into_owned());
        })
        .expect("basic.consume");
    for i in 0..3 {
        let _ = channel
            .basic_publish(
                "",
                &queue,
                false,
                &BasicProperties::default(),
                format!("w{i}"),
            )
            .expect("publish");
    }
    let got: Vec<String> = (0..3)
        .map(|_| {
            received
                .recv_timeout(Duration::from_secs(10))
                .expect("the handler got a delivery")
        })
        .collect();
    assert_eq!(got, ["w0", "w1", "w2"]);
    connection.close().expect("close");
    let ended = consuming.join().expect("the handler thread did not panic");
    // Its consumer ended with the close: the thread returns instead of waiting on.
    assert!(
        matches!(
            ended,
            Ok(()) | Err(Error::ConnectionClosed { .. } | Error::ChannelClosed { .. })
        ),
        "{ended:?}"
    );
}
