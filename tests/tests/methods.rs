//! Every client-sent method of the spec at least once against a real RabbitMQ,
//! with its effect checked.

use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{
    BasicProperties, Channel, Confirmation, ConsumeOptions, Error, FieldTable, ReplyCode,
    ReplyError,
};
use amqp_client_tests::{
    connect, delete_queue, list_bindings, name, unique, wait_for_message_count,
};

async fn message_count(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(queue::Declare {
            queue: name(queue),
            passive: true,
            ..Default::default()
        })
        .await
        .expect("queue exists")
        .message_count
}

async fn declare_queue(channel: &Channel, prefix: &str) -> String {
    let q = unique(prefix);
    channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            auto_delete: false,
            ..Default::default()
        })
        .await
        .expect("declare");
    q
}

async fn publish(channel: &Channel, routing_key: &str, body: &str) {
    channel
        .basic_publish(
            "",
            routing_key,
            false,
            &BasicProperties::default(),
            body.to_owned(),
        )
        .await
        .expect("publish");
}

/// Waits until the broker has routed what was published (publishes are
/// asynchronous; a synchronous call on the same channel orders after them).
async fn settle(channel: &Channel, queue: &str, expected: u32) {
    wait_for_message_count(channel, queue, expected, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn exchange_declare_delete_bind_unbind() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let source = unique("x-src");
    let destination = unique("x-dst");
    for x in [&source, &destination] {
        channel
            .exchange_declare(exchange::Declare {
                exchange: name(x),
                kind: name("topic"),
                ..Default::default()
            })
            .await
            .expect("declare");
        channel
            .exchange_declare(exchange::Declare {
                exchange: name(x),
                passive: true,
                ..Default::default()
            })
            .await
            .expect("passive declare finds it");
    }
    channel
        .exchange_bind(exchange::Bind {
            destination: name(&destination),
            source: name(&source),
            routing_key: name("a.#"),
            ..Default::default()
        })
        .await
        .expect("bind");
    assert!(list_bindings().contains(&(source.clone(), destination.clone(), "a.#".to_owned())));
    channel
        .exchange_unbind(exchange::Unbind {
            destination: name(&destination),
            source: name(&source),
            routing_key: name("a.#"),
            ..Default::default()
        })
        .await
        .expect("unbind");
    assert!(!list_bindings()
        .iter()
        .any(|(s, d, _)| s == &source && d == &destination));

    channel
        .exchange_delete(exchange::Delete {
            exchange: name(&source),
            ..Default::default()
        })
        .await
        .expect("delete");
    channel
        .exchange_delete_no_wait(exchange::Delete {
            exchange: name(&destination),
            ..Default::default()
        })
        .await
        .expect("delete no-wait");
    // A synchronous call on the same channel orders after the no-wait delete.
    channel
        .exchange_declare(exchange::Declare {
            exchange: name("amq.direct"),
            passive: true,
            ..Default::default()
        })
        .await
        .expect("amq.direct exists");
    for x in [&source, &destination] {
        let probe = connection.open_channel().await.expect("channel");
        let err = probe
            .exchange_declare(exchange::Declare {
                exchange: name(x),
                passive: true,
                ..Default::default()
            })
            .await
            .expect_err("deleted");
        assert_eq!(err.reply_error(), Some(ReplyError::NotFound), "{err}");
    }
    connection.close().await.expect("close");
}

#[tokio::test]
async fn queue_declare_bind_unbind_purge_delete() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = unique("q");
    let ok = channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            ..Default::default()
        })
        .await
        .expect("declare");
    assert_eq!(
        (
            ok.queue.to_str().unwrap(),
            ok.message_count,
            ok.consumer_count
        ),
        (q.as_str(), 0, 0)
    );

    let server_named = channel
        .queue_declare(queue::Declare {
            exclusive: true,
            ..Default::default()
        })
        .await
        .expect("server-named");
    assert!(
        server_named.queue.as_bytes().starts_with(b"amq.gen-"),
        "{:?}",
        server_named.queue
    );

    channel
        .queue_bind(queue::Bind {
            queue: name(&q),
            exchange: name("amq.direct"),
            routing_key: name(&q),
            ..Default::default()
        })
        .await
        .expect("bind");
    assert!(list_bindings().contains(&("amq.direct".to_owned(), q.clone(), q.clone())));
    channel
        .basic_publish(
            "amq.direct",
            &q,
            false,
            &BasicProperties::default(),
            "via binding",
        )
        .await
        .expect("publish");
    publish(&channel, &q, "direct").await;
    settle(&channel, &q, 2).await;

    channel
        .queue_unbind(queue::Unbind {
            queue: name(&q),
            exchange: name("amq.direct"),
            routing_key: name(&q),
            ..Default::default()
        })
        .await
        .expect("unbind");
    assert!(!list_bindings().contains(&("amq.direct".to_owned(), q.clone(), q.clone())));

    let purged = channel
        .queue_purge(queue::Purge {
            queue: name(&q),
            ..Default::default()
        })
        .await
        .expect("purge");
    assert_eq!(purged.message_count, 2);
    assert_eq!(message_count(&channel, &q).await, 0);

    publish(&channel, &q, "one").await;
    settle(&channel, &q, 1).await;
    let deleted = channel
        .queue_delete(queue::Delete {
            queue: name(&q),
            ..Default::default()
        })
        .await
        .expect("delete");
    assert_eq!(deleted.message_count, 1);
    let err = channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            passive: true,
            ..Default::default()
        })
        .await
        .expect_err("gone");
    assert_eq!(err.reply_error(), Some(ReplyError::NotFound));
    connection.close().await.expect("close");
}

#[tokio::test]
async fn no_wait_forms_take_effect() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = unique("nowait");
    channel
        .queue_declare_no_wait(queue::Declare {
            queue: name(&q),
            ..Default::default()
        })
        .await
        .expect("declare");
    channel
        .queue_bind_no_wait(queue::Bind {
            queue: name(&q),
            exchange: name("amq.fanout"),
            ..Default::default()
        })
        .await
        .expect("bind");
    assert_eq!(message_count(&channel, &q).await, 0);
    assert!(list_bindings()
        .iter()
        .any(|(s, d, _)| s == "amq.fanout" && d == &q));
    publish(&channel, &q, "x").await;
    settle(&channel, &q, 1).await;
    channel
        .queue_purge_no_wait(queue::Purge {
            queue: name(&q),
            ..Default::default()
        })
        .await
        .expect("purge");
    settle(&channel, &q, 0).await;
    channel
        .queue_delete_no_wait(queue::Delete {
            queue: name(&q),
            ..Default::default()
        })
        .await
        .expect("delete");
    let probe = connection.open_channel().await.expect("channel");
    let err = probe
        .queue_declare(queue::Declare {
            queue: name(&q),
            passive: true,
            ..Default::default()
        })
        .await
        .expect_err("deleted");
    assert_eq!(err.reply_error(), Some(ReplyError::NotFound));
    connection.close().await.expect("close");
}

#[tokio::test]
async fn basic_get_ack_reject_nack_and_empty() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = declare_queue(&channel, "get").await;
    assert!(
        channel.basic_get(&q, false).await.expect("get").is_none(),
        "empty queue gives None"
    );

    for body in ["a", "b", "c"] {
        publish(&channel, &q, body).await;
    }
    settle(&channel, &q, 3).await;

    let a = channel.basic_get(&q, false).await.expect("get").expect("a");
    assert_eq!((&a.delivery.body[..], a.message_count), (&b"a"[..], 2));
    a.delivery.ack().await.expect("ack");

    let b = channel.basic_get(&q, false).await.expect("get").expect("b");
    b.delivery.reject(true).await.expect("reject requeue");
    let b_again = channel
        .basic_get(&q, false)
        .await
        .expect("get")
        .expect("b again");
    assert_eq!(&b_again.delivery.body[..], b"b");
    assert!(b_again.delivery.envelope.redelivered);
    b_again
        .delivery
        .nack(false, false)
        .await
        .expect("nack drop");

    let c = channel.basic_get(&q, false).await.expect("get").expect("c");
    c.delivery.reject(false).await.expect("reject drop");
    assert!(channel.basic_get(&q, false).await.expect("get").is_none());
    assert_eq!(message_count(&channel, &q).await, 0);
    delete_queue(&channel, &q).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn basic_qos_limits_unacked_deliveries_and_cancel_stops_the_consumer() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = declare_queue(&channel, "qos").await;
    channel
        .basic_qos(basic::Qos {
            prefetch_count: 1,
            ..Default::default()
        })
        .await
        .expect("qos");
    for i in 0..3 {
        publish(&channel, &q, &i.to_string()).await;
    }
    settle(&channel, &q, 3).await;
    let mut consumer = channel
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    let first = consumer.next().await.expect("delivery").expect("ok");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), consumer.next())
            .await
            .is_err(),
        "prefetch 1 allows no second delivery before the ack"
    );
    first.ack().await.expect("ack");
    let second = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("after ack")
        .expect("some")
        .expect("ok");
    assert_eq!(&second.body[..], b"1");
    second.ack().await.expect("ack");

    consumer.cancel().await.expect("cancel");
    // The third message was delivered (prefetch allowed it) before the
    // cancel; it is still buffered, then the stream ends cleanly.
    let mut rest = Vec::new();
    while let Some(delivery) = consumer.next().await {
        rest.push(delivery.expect("a delivery, not an error"));
    }
    assert_eq!(rest.len(), 1, "exactly the third message was buffered");
    assert_eq!(&rest[0].body[..], b"2");
    rest[0].nack(false, true).await.expect("requeue");
    settle(&channel, &q, 1).await;
    delete_queue(&channel, &q).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn basic_recover_redelivers_unacked_messages() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = declare_queue(&channel, "recover").await;
    publish(&channel, &q, "again").await;
    settle(&channel, &q, 1).await;
    let mut consumer = channel
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    let first = consumer.next().await.expect("delivery").expect("ok");
    assert!(!first.envelope.redelivered);
    channel
        .basic_recover(basic::Recover { requeue: true })
        .await
        .expect("recover");
    let again = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("redelivery")
        .expect("some")
        .expect("ok");
    assert!(again.envelope.redelivered);
    assert_eq!(&again.body[..], b"again");
    again.ack().await.expect("ack");
    channel
        .basic_recover_async(basic::RecoverAsync { requeue: true })
        .await
        .expect("recover-async is accepted");
    consumer.cancel().await.expect("cancel");
    delete_queue(&channel, &q).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn tx_select_commit_rollback() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = declare_queue(&channel, "tx").await;
    channel.tx_select().await.expect("select");
    publish(&channel, &q, "rolled back").await;
    channel.tx_rollback().await.expect("rollback");
    assert_eq!(message_count(&channel, &q).await, 0);
    publish(&channel, &q, "committed").await;
    channel.tx_commit().await.expect("commit");
    assert_eq!(message_count(&channel, &q).await, 1);
    delete_queue(&channel, &q).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn confirm_select_acks_returns_and_waits_for_all() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = declare_queue(&channel, "confirm").await;
    assert!(matches!(
        channel.wait_for_confirms().await,
        Err(Error::NotInConfirmMode(_))
    ));
    channel
        .confirm_select(confirm::Select::default())
        .await
        .expect("select");
    let confirm = channel
        .basic_publish("", &q, false, &BasicProperties::default(), "confirmed")
        .await
        .expect("publish");
    assert_eq!(confirm.await.expect("confirmation"), Confirmation::Ack);

    let unroutable = unique("nowhere");
    let returned = channel
        .basic_publish("", &unroutable, true, &BasicProperties::default(), "bounce")
        .await
        .expect("publish")
        .await
        .expect("confirmation");
    match returned {
        Confirmation::Returned(message) => {
            assert_eq!(message.reply_code.code(), 312);
            assert_eq!(message.routing_key.to_str().unwrap(), unroutable);
            assert_eq!(&message.body[..], b"bounce");
        }
        other => panic!("expected a return, got {other:?}"),
    }

    let mut pending = Vec::new();
    for i in 0..100 {
        pending.push(
            channel
                .basic_publish("", &q, false, &BasicProperties::default(), format!("{i}"))
                .await
                .expect("publish"),
        );
    }
    assert!(
        channel.wait_for_confirms().await.expect("wait"),
        "all acked"
    );
    for confirm in pending {
        assert_eq!(confirm.await.expect("confirmation"), Confirmation::Ack);
    }
    assert_eq!(message_count(&channel, &q).await, 101);
    delete_queue(&channel, &q).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn returns_without_confirm_mode_reach_the_returns_stream() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let mut returns = channel.returns(16).await.expect("returns");
    let unroutable = unique("nowhere");
    let confirm = channel
        .basic_publish("", &unroutable, true, &BasicProperties::default(), "lost?")
        .await
        .expect("publish");
    assert_eq!(
        confirm.await.expect("not in confirm mode"),
        Confirmation::NotRequested
    );
    let message = tokio::time::timeout(Duration::from_secs(5), returns.recv())
        .await
        .expect("returned")
        .expect("open");
    assert_eq!(
        (
            message.reply_code.code(),
            message.routing_key.to_str().unwrap()
        ),
        (312, unroutable.as_str())
    );
    assert_eq!(&message.body[..], b"lost?");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn an_unroutable_mandatory_publish_in_confirm_mode_is_returned_as_no_route() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    channel
        .confirm_select(confirm::Select::default())
        .await
        .expect("select");
    let unroutable = unique("no-route");
    let confirmation = channel
        .basic_publish("", &unroutable, true, &BasicProperties::default(), "astray")
        .await
        .expect("publish")
        .await
        .expect("confirmation");
    let Confirmation::Returned(message) = confirmation else {
        panic!("expected a return, got {confirmation:?}");
    };
    assert_eq!(message.reply_code, ReplyCode::NO_ROUTE);
    assert_eq!(ReplyError::from(message.reply_code), ReplyError::NoRoute);
    assert_eq!(message.reply_code.to_string(), "312 NO_ROUTE");
    assert_eq!(message.routing_key.to_str().unwrap(), unroutable);
    // A soft-error code, but carried by basic.return: the channel stays open.
    channel
        .basic_qos(basic::Qos::default())
        .await
        .expect("the channel is still open");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn channel_flow_and_close() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let ok = channel
        .channel_flow(channel::Flow { active: true })
        .await
        .expect("flow");
    assert!(ok.active);
    channel.close().await.expect("close");
    let err = channel
        .queue_declare(queue::Declare {
            queue: name("amq.never"),
            passive: true,
            ..Default::default()
        })
        .await
        .expect_err("closed channel");
    assert!(matches!(err, Error::ChannelClosed { .. }), "{err}");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn consumer_cancelled_by_the_broker_ends_with_a_typed_reason() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = declare_queue(&channel, "cancel-notify").await;
    let mut consumer = channel
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    let other = connection.open_channel().await.expect("channel");
    delete_queue(&other, &q).await;
    let end = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("ends")
        .expect("an error first");
    match end {
        Err(Error::ConsumerCancelled {
            by_broker: true,
            consumer_tag,
            ..
        }) => assert_eq!(consumer_tag, consumer.tag().to_str().unwrap()),
        other => panic!("expected a broker cancel, got {other:?}"),
    }
    assert!(consumer.next().await.is_none());
    // The channel itself stays usable.
    let again = declare_queue(&channel, "after-cancel").await;
    channel
        .queue_delete(queue::Delete {
            queue: name(&again),
            ..Default::default()
        })
        .await
        .expect("usable");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn dropping_a_consumer_cancels_it_and_requeues_what_was_in_flight() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = declare_queue(&channel, "drop-consumer").await;
    for i in 0..20 {
        publish(&channel, &q, &i.to_string()).await;
    }
    settle(&channel, &q, 20).await;
    let mut consumer = channel
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    let first = consumer.next().await.expect("delivery").expect("ok");
    first.ack().await.expect("ack");
    drop(consumer);
    // 19 left, whether they were buffered in the client, in flight or queued.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let declared = channel
            .queue_declare(queue::Declare {
                queue: name(&q),
                passive: true,
                ..Default::default()
            })
            .await
            .expect("exists");
        if declared.consumer_count == 0 && declared.message_count == 19 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumer not cancelled or messages not requeued: {declared:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    delete_queue(&channel, &q).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn dropping_a_no_ack_consumer_with_buffered_deliveries_keeps_the_channel_open() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = declare_queue(&channel, "drop-no-ack-consumer").await;
    for i in 0..200 {
        publish(&channel, &q, &i.to_string()).await;
    }
    settle(&channel, &q, 200).await;
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
    let first = consumer.next().await.expect("delivery").expect("ok");
    assert_eq!(&first.body[..], b"0");
    // The broker has sent them all (no-ack: they leave the queue as they
    // go), so the other 199 wait in the client's buffer.
    settle(&channel, &q, 0).await;
    drop(consumer);
    // Requeueing them would be a nack of tags the broker no longer knows:
    // 406 PRECONDITION_FAILED, and the channel closed. Give it time to come.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let declared = channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            passive: true,
            ..Default::default()
        })
        .await
        .expect("the channel is still open");
    assert_eq!(declared.consumer_count, 0, "the consumer was cancelled");
    assert_eq!(
        declared.message_count, 0,
        "no-ack deliveries are not requeued"
    );
    publish(&channel, &q, "after").await;
    settle(&channel, &q, 1).await;
    let got = channel
        .basic_get(&q, true)
        .await
        .expect("get")
        .expect("the message");
    assert_eq!(&got.delivery.body[..], b"after");
    assert!(
        channel.closed_error().is_none(),
        "{:?}",
        channel.closed_error()
    );
    delete_queue(&channel, &q).await;
    connection.close().await.expect("close");
}

#[tokio::test]
async fn callback_consumers_see_every_delivery() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = declare_queue(&channel, "callback").await;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let task = channel
        .basic_consume_with(
            &q,
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            move |delivery| {
                let seen = seen_tx.clone();
                async move {
                    let _ = seen.send(String::from_utf8_lossy(&delivery.body).into_owned());
                }
            },
        )
        .await
        .expect("consume");
    for i in 0..5 {
        publish(&channel, &q, &format!("m{i}")).await;
    }
    for i in 0..5 {
        let body = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
            .await
            .expect("delivered")
            .expect("open");
        assert_eq!(body, format!("m{i}"));
    }
    delete_queue(&channel, &q).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("task ends")
        .expect("join");
    assert!(
        matches!(
            ended,
            Err(Error::ConsumerCancelled {
                by_broker: true,
                ..
            })
        ),
        "{ended:?}"
    );
    connection.close().await.expect("close");
}

#[tokio::test]
async fn arguments_tables_reach_the_broker() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = unique("args");
    let arguments = FieldTable::new().with(name("x-max-length"), 1i32);
    channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            arguments: arguments.clone(),
            ..Default::default()
        })
        .await
        .expect("declare");
    for i in 0..3 {
        publish(&channel, &q, &i.to_string()).await;
    }
    settle(&channel, &q, 1).await;
    let kept = channel
        .basic_get(&q, true)
        .await
        .expect("get")
        .expect("one");
    assert_eq!(
        &kept.delivery.body[..],
        b"2",
        "x-max-length 1 keeps the newest"
    );
    // Redeclaring with different arguments is a 406.
    let err = channel
        .queue_declare(queue::Declare {
            queue: name(&q),
            ..Default::default()
        })
        .await
        .expect_err("inequivalent");
    assert_eq!(
        err.reply_error(),
        Some(ReplyError::PreconditionFailed),
        "{err}"
    );
    let cleanup = connection.open_channel().await.expect("channel");
    delete_queue(&cleanup, &q).await;
    connection.close().await.expect("close");
}

/// Acks sent one by one may leave as `multiple` acks (the client coalesces
/// those that settle a prefix of the channel's delivery tags): every message
/// acked is gone, and the one held back is the only one the broker requeues.
#[tokio::test]
async fn acks_one_by_one_settle_exactly_the_acked_deliveries() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = declare_queue(&channel, "ack-coalescing").await;
    channel
        .basic_qos(basic::Qos {
            prefetch_count: 50,
            ..Default::default()
        })
        .await
        .expect("qos");
    const COUNT: usize = 400;
    for i in 0..COUNT {
        publish(&channel, &q, &i.to_string()).await;
    }
    settle(&channel, &q, COUNT as u32).await;

    let consuming = connection.open_channel().await.expect("channel");
    consuming
        .basic_qos(basic::Qos {
            prefetch_count: 50,
            ..Default::default()
        })
        .await
        .expect("qos");
    let mut consumer = consuming
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    // Message 0 stays unacked and 200 is rejected back to the queue; every
    // other one is acked on its own, in order, as it arrives.
    let mut held = None;
    for i in 0..COUNT {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("delivery in time")
            .expect("some")
            .expect("ok");
        assert_eq!(delivery.body, i.to_string().as_bytes(), "in order");
        match i {
            0 => held = Some(delivery),
            200 => delivery.reject(false).await.expect("reject"),
            _ => delivery.ack().await.expect("ack"),
        }
    }
    // The queue holds nothing ready: 0 is unacked, 200 was dropped, the rest
    // were acked (a multiple ack covering 0 would have removed it too).
    assert_eq!(message_count(&channel, &q).await, 0);
    drop(held);
    consuming
        .close()
        .await
        .expect("close the consuming channel");
    // Closing the channel requeues exactly what was never acked: message 0.
    settle(&channel, &q, 1).await;
    let again = channel
        .basic_get(&q, true)
        .await
        .expect("get")
        .expect("a message")
        .delivery;
    assert_eq!(&again.body[..], b"0");
    assert!(again.envelope.redelivered);
    delete_queue(&channel, &q).await;
    connection.close().await.expect("close");
}

/// Acks made in a burst leave coalesced, and every coalesced ack names a tag
/// the broker still holds: RabbitMQ closes the channel (406) on a `multiple`
/// ack of a tag it no longer holds when no later tag is outstanding, so the
/// ack that completes the prefix must not name the tag acked earlier.
#[tokio::test]
async fn coalesced_acks_are_accepted_by_the_broker_and_settle_everything() {
    let connection = connect().await;
    let channel = connection.open_channel().await.expect("channel");
    let q = declare_queue(&channel, "ack-burst").await;
    const COUNT: usize = 300;
    for i in 0..COUNT {
        publish(&channel, &q, &i.to_string()).await;
    }
    settle(&channel, &q, COUNT as u32).await;
    let consuming = connection.open_channel().await.expect("channel");
    let mut consumer = consuming
        .basic_consume(&q, ConsumeOptions::default())
        .await
        .expect("consume");
    let mut deliveries = Vec::new();
    for _ in 0..COUNT {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("delivery in time")
            .expect("some")
            .expect("ok");
        deliveries.push(delivery);
    }
    // The last delivery's ack is on the wire (a call on the same channel is
    // answered after it) before the others are made, in one burst: the one
    // that completes the prefix must not name the last tag.
    deliveries[COUNT - 1].ack().await.expect("ack");
    message_count(&consuming, &q).await;
    for delivery in &deliveries[..COUNT - 1] {
        delivery.ack().await.expect("ack");
    }
    assert_eq!(
        message_count(&consuming, &q).await,
        0,
        "the channel is still open and nothing is ready"
    );
    assert!(consuming.closed_error().is_none(), "no 406 from the broker");
    consuming
        .close()
        .await
        .expect("close the consuming channel");
    // Nothing was left unacknowledged to be requeued.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(message_count(&channel, &q).await, 0);
    delete_queue(&channel, &q).await;
    connection.close().await.expect("close");
}
