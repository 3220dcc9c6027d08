//! Recovery from a broker restart, and failover between two brokers, on
//! private nodes (the shared broker keeps running for the other tests).

use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{
    BasicProperties, Config, Connection, ConsumeOptions, RecoveryConfig, RecoveryEvent, ShortString,
};
use amqp_client_tests::node::{NodeOptions, PrivateNode};
use tokio::sync::broadcast;

fn quick_recovery(config: Config) -> Config {
    config.recovery(RecoveryConfig {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
        ..RecoveryConfig::default()
    })
}

async fn until_recovered(events: &mut broadcast::Receiver<RecoveryEvent>) -> Vec<RecoveryEvent> {
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match events.recv().await {
                Ok(RecoveryEvent::Recovered) => return,
                Ok(RecoveryEvent::Failed { error }) => panic!("recovery failed: {error}"),
                Ok(event) => seen.push(event),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("recovery events: {e}"),
            }
        }
    })
    .await
    .expect("recovered in time");
    seen
}

async fn consume_one(consumer: &mut amqp091::Consumer) -> String {
    let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("a delivery in time")
        .expect("the consumer is open")
        .expect("a delivery");
    delivery.ack().await.expect("ack");
    String::from_utf8_lossy(&delivery.body).into_owned()
}

#[tokio::test]
async fn a_consumer_resumes_after_the_broker_restarts() {
    let node = PrivateNode::start_async(NodeOptions::default()).await;
    let connection = Connection::connect(quick_recovery(node.config()))
        .await
        .expect("connect");
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");
    // Not durable: gone with the restart, so topology recovery must re-declare it.
    channel
        .queue_declare(queue::Declare {
            queue: ShortString::from_static("restart-q"),
            ..Default::default()
        })
        .await
        .expect("declare");
    let mut consumer = channel
        .basic_consume("restart-q", ConsumeOptions::default())
        .await
        .expect("consume");
    channel
        .basic_publish(
            "",
            "restart-q",
            false,
            &BasicProperties::default(),
            "before",
        )
        .await
        .expect("publish");
    assert_eq!(consume_one(&mut consumer).await, "before");

    node.stop_app_async().await;
    node.start_app_async().await;
    until_recovered(&mut events).await;

    channel
        .basic_publish("", "restart-q", false, &BasicProperties::default(), "after")
        .await
        .expect("publish");
    assert_eq!(consume_one(&mut consumer).await, "after");
    connection.close().await.expect("close");
}

#[tokio::test]
async fn losing_one_node_moves_the_client_to_the_next() {
    let (a, b) = tokio::join!(
        PrivateNode::start_async(NodeOptions::default()),
        PrivateNode::start_async(NodeOptions::default())
    );
    let config = quick_recovery(a.config()).fallback_address("127.0.0.1", b.port());
    let connection = Connection::connect(config)
        .await
        .expect("connect to node a");
    let mut events = connection.recovery_events();
    let channel = connection.open_channel().await.expect("channel");
    channel
        .queue_declare(queue::Declare {
            queue: ShortString::from_static("failover-q"),
            ..Default::default()
        })
        .await
        .expect("declare on a");
    let mut consumer = channel
        .basic_consume("failover-q", ConsumeOptions::default())
        .await
        .expect("consume");

    a.stop_app_async().await;
    let seen = until_recovered(&mut events).await;
    let moved = seen.iter().any(|e| matches!(e, RecoveryEvent::Reconnected { address } if address.ends_with(&format!(":{}", b.port()))));
    assert!(moved, "reconnected to node b: {seen:?}");

    // The queue and the consumer now live on node b.
    let listing = b.rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "consumers",
    ]);
    assert!(
        listing.lines().any(|l| l.starts_with("failover-q\t1")),
        "{listing}"
    );
    channel
        .basic_publish("", "failover-q", false, &BasicProperties::default(), "on b")
        .await
        .expect("publish");
    assert_eq!(consume_one(&mut consumer).await, "on b");
    connection.close().await.expect("close");
}
