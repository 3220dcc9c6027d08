//! Frames over the negotiated frame_max are refused by the client before a
//! byte is written, with `Error::FrameTooLarge`: sent, the broker would answer
//! 501 FRAME_ERROR and close the whole connection (and, outside confirm
//! mode, the message would be lost without a word). The channel and the
//! connection stay usable, and the limit followed is the one of the broker
//! connected now, which a reconnect may change.

use std::future::Future;
use std::time::Duration;

use amqp091::prelude::*;
use amqp091::protocol::frame::Frame;
use amqp091::protocol::Method;
use amqp091::{
    BasicProperties, Channel, Config, Confirmation, Connection, ConsumeOptions, Error, FieldTable,
    RecoveryConfig, RecoveryEvent,
};
use amqp_client_tests::fake_peer::{FakePeer, Tuning};
use amqp_client_tests::{connect, delete_queue, name, unique, wait_for_message_count};
use tokio::sync::broadcast::error::TryRecvError;

/// How long any one test may take.
const LIMIT: Duration = Duration::from_secs(20);

/// Runs `test`, failing (not hanging) when it takes longer than [`LIMIT`].
async fn bounded<T>(test: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, test).await {
        Ok(value) => value,
        Err(_) => panic!("the test did not finish within {LIMIT:?}: the client hangs"),
    }
}

/// Properties whose `headers` table holds a string of `len` bytes.
fn headers_of(len: usize) -> BasicProperties {
    BasicProperties {
        headers: Some(FieldTable::new().with(name("padding"), "x".repeat(len))),
        ..Default::default()
    }
}

/// An arguments table holding a string of `len` bytes (under a key the
/// broker ignores).
fn arguments_of(len: usize) -> FieldTable {
    FieldTable::new().with(name("x-amqp-client-test-padding"), "x".repeat(len))
}

/// Checks that `error` is a `FrameTooLarge` for `what`, over `frame_max`.
fn assert_too_large(error: &Error, expected_what: &str, expected_frame_max: u32) {
    match error {
        Error::FrameTooLarge {
            what,
            size,
            frame_max,
        } => {
            assert_eq!(*what, expected_what, "{error}");
            assert_eq!(*frame_max, expected_frame_max, "{error}");
            assert!(*size > *frame_max as usize, "{error}");
        }
        other => panic!("expected Error::FrameTooLarge for {expected_what}, got {other:?}"),
    }
    assert!(!error.is_connection_error());
}

/// Publishes `body` to `queue` and fetches it back with `basic.get`.
async fn publish_and_get(channel: &Channel, queue: &str, body: &str) {
    let confirm = channel
        .basic_publish("", queue, false, &headers_of(100), body.to_owned())
        .await
        .expect("a small publish after a refused one");
    let outcome = confirm.await.expect("its outcome");
    assert!(
        matches!(outcome, Confirmation::Ack | Confirmation::NotRequested),
        "{outcome:?}"
    );
    wait_for_message_count(channel, queue, 1, Duration::from_secs(5)).await;
    let got = channel
        .basic_get(queue, true)
        .await
        .expect("basic.get")
        .expect("the message is there");
    assert_eq!(&got.delivery.body[..], body.as_bytes());
}

/// The connection was never lost: recovery (on by default) would have
/// reported it.
fn assert_never_lost(
    connection: &Connection,
    events: &mut tokio::sync::broadcast::Receiver<RecoveryEvent>,
) {
    match events.try_recv() {
        Err(TryRecvError::Empty) => {}
        other => panic!("the connection was lost and recovered: {other:?}"),
    }
    assert!(!connection.is_closed());
}

#[tokio::test]
async fn a_publish_whose_header_frame_exceeds_frame_max_is_refused_and_nothing_is_lost() {
    bounded(async {
        let connection = connect().await;
        let mut events = connection.recovery_events();
        let frame_max = connection.frame_max();
        assert_eq!(frame_max, connection.server_info().frame_max);
        assert!((4096..200_000).contains(&frame_max), "{frame_max}");
        let queue = unique("frame-limit-publish");
        for confirm_mode in [true, false] {
            let channel = connection.open_channel().await.expect("channel");
            if confirm_mode {
                channel
                    .confirm_select(confirm::Select::default())
                    .await
                    .expect("confirm mode");
            }
            channel
                .queue_declare(queue::Declare {
                    queue: name(&queue),
                    ..Default::default()
                })
                .await
                .expect("declare");
            let error = channel
                .basic_publish("", &queue, false, &headers_of(200_000), "lost?")
                .await
                .expect_err("a 200 KB header frame is over frame_max");
            assert_too_large(&error, "content header", frame_max);
            // The same channel goes on, and nothing of the refused message
            // reached the queue.
            publish_and_get(
                &channel,
                &queue,
                &format!("after (confirm: {confirm_mode})"),
            )
            .await;
            assert!(channel
                .basic_get(&queue, true)
                .await
                .expect("get")
                .is_none());
            assert!(
                channel.closed_error().is_none(),
                "{:?}",
                channel.closed_error()
            );
            if confirm_mode {
                assert!(channel.wait_for_confirms().await.expect("confirms"));
            }
            delete_queue(&channel, &queue).await;
            channel.close().await.expect("close");
        }
        // A header just under the limit still goes through.
        let channel = connection.open_channel().await.expect("channel");
        channel
            .queue_declare(queue::Declare {
                queue: name(&queue),
                ..Default::default()
            })
            .await
            .expect("declare");
        let fits = frame_max as usize - 1024;
        channel
            .basic_publish("", &queue, false, &headers_of(fits), "fits")
            .await
            .expect("a header under frame_max");
        wait_for_message_count(&channel, &queue, 1, Duration::from_secs(5)).await;
        delete_queue(&channel, &queue).await;
        assert_never_lost(&connection, &mut events);
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn methods_whose_frame_exceeds_frame_max_are_refused_before_sending() {
    bounded(async {
        let connection = connect().await;
        let mut events = connection.recovery_events();
        let frame_max = connection.frame_max();
        let channel = connection.open_channel().await.expect("channel");
        let queue = unique("frame-limit-method");

        let error = channel
            .queue_declare(queue::Declare {
                queue: name(&queue),
                arguments: arguments_of(200_000),
                ..Default::default()
            })
            .await
            .expect_err("a 200 KB queue.declare is over frame_max");
        assert_too_large(&error, "queue.declare", frame_max);

        let error = channel
            .queue_declare_no_wait(queue::Declare {
                queue: name(&queue),
                arguments: arguments_of(200_000),
                ..Default::default()
            })
            .await
            .expect_err("the no-wait form too");
        assert_too_large(&error, "queue.declare", frame_max);

        channel
            .queue_declare(queue::Declare {
                queue: name(&queue),
                ..Default::default()
            })
            .await
            .expect("the same declaration without the padding");
        let error = channel
            .basic_consume(
                &queue,
                ConsumeOptions {
                    arguments: arguments_of(200_000),
                    ..Default::default()
                },
            )
            .await
            .expect_err("a 200 KB basic.consume is over frame_max");
        assert_too_large(&error, "basic.consume", frame_max);

        let error = connection
            .update_secret("s".repeat(200_000), "too long")
            .await
            .expect_err("a 200 KB connection.update-secret is over frame_max");
        assert_too_large(&error, "connection.update-secret", frame_max);

        // The declaration that was refused never reached the broker: the
        // queue has no consumer, and the channel and connection go on.
        let declared = channel
            .queue_declare(queue::Declare {
                queue: name(&queue),
                passive: true,
                ..Default::default()
            })
            .await
            .expect("passive declare");
        assert_eq!(declared.consumer_count, 0);
        publish_and_get(&channel, &queue, "after the refused methods").await;
        assert!(
            channel.closed_error().is_none(),
            "{:?}",
            channel.closed_error()
        );
        delete_queue(&channel, &queue).await;
        assert_never_lost(&connection, &mut events);
        connection.close().await.expect("close");
    })
    .await;
}

/// Waits for `Recovered` on `events`.
async fn recovered(events: &mut tokio::sync::broadcast::Receiver<RecoveryEvent>) {
    loop {
        match events.recv().await.expect("recovery events") {
            RecoveryEvent::Recovered => return,
            RecoveryEvent::Failed { error } => panic!("recovery failed: {error}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn the_limit_is_the_one_negotiated_at_the_last_reconnect() {
    bounded(async {
        // The first broker allows 128 KiB frames, then drops the connection;
        // the client reconnects to the second, which allows 8 KiB.
        let first = FakePeer::start(|mut peer| async move {
            peer.handshake(&Tuning::default()).await?;
            let channel = peer.accept_channel_open().await?;
            let publish = peer.read_frame().await?;
            let header = peer.read_frame().await?;
            // Then the socket drops.
            Ok((channel, publish, header))
        })
        .await
        .expect("the first fake peer listens");
        let second = FakePeer::start(|mut peer| async move {
            peer.handshake(&Tuning::frame_max(8192)).await?;
            let channel = peer.accept_channel_open().await?;
            // A frame over 8 KiB fails the script here, naming it.
            let mut methods = Vec::new();
            while let Some(frame) = peer.read_frame().await? {
                if let Frame::Method { method, .. } = frame {
                    let close = matches!(method, Method::ConnectionClose(_));
                    methods.push(method.info().name);
                    if close {
                        peer.send_method(0, &Method::ConnectionCloseOk(Default::default()))
                            .await?;
                        break;
                    }
                }
            }
            Ok((channel, methods))
        })
        .await
        .expect("the second fake peer listens");
        let config: Config = first.url().parse().expect("url");
        let config = config
            .fallback_address("127.0.0.1", second.port())
            .recovery(RecoveryConfig {
                initial_delay: Duration::from_millis(10),
                ..RecoveryConfig::default()
            });
        let connection = Connection::connect(config).await.expect("connect");
        let mut events = connection.recovery_events();
        assert_eq!(connection.frame_max(), 131_072);
        let channel = connection.open_channel().await.expect("channel");
        // 10 KB of headers fit the first broker's frames.
        channel
            .basic_publish("", "q", false, &headers_of(10_000), "")
            .await
            .expect("10 KB of headers fit 128 KiB frames");
        let (opened, publish, header) = first.finish().await;
        assert_eq!(opened, channel.id());
        assert!(
            matches!(
                publish,
                Some(Frame::Method {
                    method: Method::BasicPublish(_),
                    ..
                })
            ),
            "{publish:?}"
        );
        assert!(matches!(header, Some(Frame::Header { .. })), "{header:?}");

        recovered(&mut events).await;
        assert_eq!(connection.frame_max(), 8192);
        assert_eq!(
            connection.server_info().frame_max,
            131_072,
            "server_info keeps the first connect's values"
        );
        let error = channel
            .basic_publish("", "q", false, &headers_of(10_000), "")
            .await
            .expect_err("10 KB of headers do not fit 8 KiB frames");
        assert_too_large(&error, "content header", 8192);
        let error = channel
            .queue_declare_no_wait(queue::Declare {
                queue: name("q"),
                arguments: arguments_of(10_000),
                ..Default::default()
            })
            .await
            .expect_err("nor do 10 KB of arguments");
        assert_too_large(&error, "queue.declare", 8192);
        channel
            .basic_publish("", "q", false, &headers_of(100), "small")
            .await
            .expect("a small publish");
        // The close goes out after the publish.
        connection.close().await.expect("close");

        let (reopened, methods) = second.finish().await;
        assert_eq!(reopened, channel.id());
        assert_eq!(
            methods,
            ["basic.publish", "connection.close"],
            "only the small publish and the close were sent"
        );
    })
    .await;
}
