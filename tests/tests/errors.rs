//! Failures with typed errors: connecting, authenticating, channel errors,
//! and calls after a channel closed.

use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{BasicProperties, Connection, Error, ReplyError};
use amqp_client_tests::{config, connect, delete_queue, name, unique};

#[tokio::test]
async fn wrong_password_is_an_authentication_error() {
    let err = Connection::connect(config().credentials("guest", "not-the-password"))
        .await
        .expect_err("wrong password");
    match &err {
        Error::AuthenticationFailed { user, text } => {
            assert_eq!(user, "guest");
            assert!(
                text.contains("ACCESS_REFUSED") || text.to_lowercase().contains("refused"),
                "{text}"
            );
        }
        other => panic!("expected AuthenticationFailed, got {other:?}"),
    }
    assert_eq!(err.reply_error(), Some(ReplyError::AccessRefused));
}

#[tokio::test]
async fn unknown_vhost_is_refused_with_the_brokers_reason() {
    let vhost = unique("no-such-vhost");
    let err = Connection::connect(config().vhost(vhost.clone()))
        .await
        .expect_err("unknown vhost");
    match &err {
        Error::VhostRefused { vhost: v, reason } => {
            assert_eq!(v, &vhost);
            assert_eq!(reason.error(), ReplyError::NotAllowed);
            assert!(reason.text.contains(&vhost), "{}", reason.text);
        }
        other => panic!("expected VhostRefused, got {other:?}"),
    }
}

#[tokio::test]
async fn refused_port_names_the_address() {
    // Bind and drop a listener to find a port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let err = Connection::connect(config().host("127.0.0.1").port(port))
        .await
        .expect_err("refused");
    match &err {
        Error::Connect { address, source } => {
            assert_eq!(address, &format!("127.0.0.1:{port}"));
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        other => panic!("expected Connect, got {other:?}"),
    }
    assert!(err.to_string().contains(&port.to_string()));
}

#[tokio::test]
async fn unresolvable_host_is_a_dns_error() {
    let err = Connection::connect(config().host("no-such-host.invalid"))
        .await
        .expect_err("dns");
    match &err {
        Error::Dns { address, .. } => assert_eq!(address, "no-such-host.invalid:5672"),
        other => panic!("expected Dns, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_urls_are_typed_errors() {
    let err = Connection::open("amqp://h/a/b")
        .await
        .expect_err("bad vhost");
    assert!(matches!(err, Error::Url(_)), "{err:?}");
    assert!(err.to_string().contains("vhost"));
}

#[tokio::test]
async fn not_found_closes_the_channel_and_every_later_call_fails_with_the_same_error() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let missing = unique("missing");
    let err = channel
        .queue_declare(queue::Declare {
            queue: name(&missing),
            passive: true,
            ..Default::default()
        })
        .await
        .expect_err("404");
    match &err {
        Error::ChannelClosed {
            channel: id,
            reply,
            reason,
        } => {
            assert_eq!(*id, channel.id());
            assert_eq!(*reply, ReplyError::NotFound);
            assert_eq!(reason.code.code(), 404);
            assert!(reason.text.contains(&missing), "{}", reason.text);
            assert_eq!(
                reason.method.map(|m| (m.class_id, m.method_id)),
                Some((50, 10)),
                "caused by queue.declare"
            );
        }
        other => panic!("expected ChannelClosed, got {other:?}"),
    }
    let started = std::time::Instant::now();
    let later = channel
        .basic_get("anything", true)
        .await
        .expect_err("closed channel");
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "fails at once"
    );
    assert_eq!(later.to_string(), err.to_string(), "the same error");
    let publish = channel
        .basic_publish("", "x", false, &BasicProperties::default(), "x")
        .await;
    assert!(matches!(
        publish,
        Err(Error::ChannelClosed {
            reply: ReplyError::NotFound,
            ..
        })
    ));
    // The connection is unaffected.
    let other = connection.open_channel().await.expect("new channel");
    other
        .basic_qos(basic::Qos {
            prefetch_count: 5,
            ..Default::default()
        })
        .await
        .expect("usable");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn resource_locked_when_another_connection_owns_an_exclusive_queue() {
    let owner = connect().await;
    let q = unique("exclusive");
    let owner_channel = owner.open_channel().await.expect("channel");
    owner_channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            exclusive: true,
            ..Default::default()
        })
        .await
        .expect("declare");
    let intruder = connect().await;
    let channel = intruder.open_channel().await.expect("channel");
    let err = channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            passive: true,
            ..Default::default()
        })
        .await
        .expect_err("405");
    assert_eq!(err.reply_error(), Some(ReplyError::ResourceLocked), "{err}");
    intruder.close().await.expect("close");
    owner.close().await.expect("close");
}

#[tokio::test]
async fn precondition_failed_on_an_inequivalent_redeclare() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = unique("durable");
    channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            durable: true,
            ..Default::default()
        })
        .await
        .expect("declare");
    let err = channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            durable: false,
            ..Default::default()
        })
        .await
        .expect_err("406");
    assert_eq!(
        err.reply_error(),
        Some(ReplyError::PreconditionFailed),
        "{err}"
    );
    let cleanup = connection.open_channel().await.expect("channel");
    delete_queue(&cleanup, &q).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn publish_to_a_missing_exchange_in_confirm_mode_fails_with_not_found() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    channel
        .confirm_select(confirm::Select::default())
        .await
        .expect("select");
    let confirm = channel
        .basic_publish(
            &unique("no-exchange"),
            "rk",
            false,
            &BasicProperties::default(),
            "x",
        )
        .await
        .expect("queued");
    let err = tokio::time::timeout(Duration::from_secs(5), confirm)
        .await
        .expect("does not hang")
        .expect_err("404");
    assert_eq!(err.reply_error(), Some(ReplyError::NotFound), "{err}");
    assert!(matches!(err, Error::ChannelClosed { .. }));
    connection.close().await.expect("close");
}

#[tokio::test]
async fn channel_ids_are_recycled_and_bounded_by_channel_max() {
    let connection = amqp_client_tests::connect_with(config().channel_max(3)).await;
    assert_eq!(connection.server_info().channel_max, 3);
    let a = connection.open_channel().await.expect("1");
    let b = connection.open_channel().await.expect("2");
    let c = connection.open_channel().await.expect("3");
    assert_eq!((a.id(), b.id(), c.id()), (1, 2, 3));
    let err = connection.open_channel().await.expect_err("exhausted");
    assert!(matches!(err, Error::ChannelsExhausted(3)), "{err:?}");
    b.close().await.expect("close");
    let again = connection.open_channel().await.expect("recycled");
    assert_eq!(again.id(), 2);
    drop(a);
    // Dropping the last handle closes the channel; its id comes back.
    let mut recycled = None;
    for _ in 0..50 {
        if let Ok(channel) = connection.open_channel().await {
            recycled = Some(channel);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(recycled.expect("id 1 freed by the drop").id(), 1);
    connection.close().await.expect("close");
}

#[tokio::test]
async fn scoped_channels_close_when_the_scope_ends() {
    let connection = connect().await;
    let q = unique("scoped");
    let id = connection
        .with_channel(|channel| {
            let q = q.clone();
            async move {
                channel
                    .queue_declare(queue::Declare {
                        queue: name(&q),
                        auto_delete: true,
                        ..Default::default()
                    })
                    .await?;
                Ok::<_, Error>(channel.id())
            }
        })
        .await
        .expect("scope");
    // The id is free again at once: the scope waited for close-ok.
    let next = connection.open_channel().await.expect("channel");
    assert_eq!(next.id(), id);
    next.queue_delete(queue::Delete {
        queue: name(&q),
        ..Default::default()
    })
    .await
    .expect("delete");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn closed_connection_answers_every_call_at_once() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    connection.close().await.expect("close");
    assert!(connection.is_closed());
    let err = channel
        .basic_qos(basic::Qos::default())
        .await
        .expect_err("closed");
    assert!(matches!(err, Error::ConnectionClosed { .. }), "{err:?}");
    let err = connection.open_channel().await.expect_err("closed");
    assert!(matches!(err, Error::ConnectionClosed { .. }), "{err:?}");
    assert!(
        connection.closed().await.is_ok(),
        "closed by the application"
    );
}
