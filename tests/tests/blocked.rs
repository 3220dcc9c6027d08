//! connection.blocked / unblocked from a resource alarm, on a private node
//! (an alarm on the shared broker would block every other test).

use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{BasicProperties, Connection, Error, ShortString};
use amqp_client_tests::node::{NodeOptions, PrivateNode};
use amqp_client_tests::wait_for_message_count;

#[tokio::test]
async fn a_memory_alarm_blocks_publishers_until_it_clears() {
    let node = PrivateNode::start_async(NodeOptions::default()).await;
    let connection = Connection::connect(node.config()).await.expect("connect");
    let channel = connection.open_channel().await.expect("channel");
    channel
        .queue_declare(queue::Declare {
            queue: ShortString::from_static("blocked-q"),
            ..Default::default()
        })
        .await
        .expect("declare");
    let mut blocked = connection.blocked();
    assert!(blocked.borrow().is_none());

    node.rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]);
    // The broker blocks a connection when it publishes during an alarm.
    channel
        .basic_publish(
            "",
            "blocked-q",
            false,
            &BasicProperties::default(),
            "trigger",
        )
        .await
        .expect("publish");
    tokio::time::timeout(Duration::from_secs(20), blocked.wait_for(Option::is_some))
        .await
        .expect("connection.blocked arrives")
        .expect("watch open");
    let reason = blocked.borrow().clone().expect("blocked");
    assert!(reason.to_lowercase().contains("memory"), "{reason}");

    // A publish while blocked waits instead of piling up in the client.
    let waiting = tokio::spawn({
        let channel = channel.clone();
        async move {
            channel
                .basic_publish("", "blocked-q", false, &BasicProperties::default(), "later")
                .await
                .map(drop)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "publishing waits while blocked");

    // With a call timeout, the wait for an unblock is bounded; nothing was
    // sent, so the channel stays open.
    let timed = Connection::connect(node.config().call_timeout(Duration::from_millis(300)))
        .await
        .expect("connect");
    let timed_channel = timed.open_channel().await.expect("channel");
    let mut timed_blocked = timed.blocked();
    timed_channel
        .basic_publish(
            "",
            "blocked-q",
            false,
            &BasicProperties::default(),
            "trigger-2",
        )
        .await
        .expect("publish");
    tokio::time::timeout(
        Duration::from_secs(20),
        timed_blocked.wait_for(Option::is_some),
    )
    .await
    .expect("connection.blocked arrives")
    .expect("watch open");
    let timed_out = tokio::time::timeout(
        Duration::from_secs(10),
        timed_channel.basic_publish("", "blocked-q", false, &BasicProperties::default(), "late"),
    )
    .await
    .expect("the publish returns instead of waiting forever");
    assert!(
        matches!(timed_out, Err(Error::CallTimeout { timeout, .. }) if timeout == Duration::from_millis(300)),
        "{timed_out:?}"
    );
    assert!(timed_channel.closed_error().is_none());

    node.rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
    tokio::time::timeout(Duration::from_secs(20), blocked.wait_for(Option::is_none))
        .await
        .expect("connection.unblocked arrives")
        .expect("watch open");
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("publish resumes")
        .expect("join")
        .expect("publish");
    timed_channel
        .basic_publish("", "blocked-q", false, &BasicProperties::default(), "after")
        .await
        .expect("the channel still publishes once unblocked");
    // Routing is asynchronous in the broker: wait for all to be counted.
    wait_for_message_count(&channel, "blocked-q", 4, Duration::from_secs(10)).await;
    timed.close().await.expect("close");
    connection.close().await.expect("close");
}
