//! Failover in a three-node cluster of private nodes (the shared broker is
//! never stopped): confirmed publishes to a quorum queue while the client's
//! node, and separately the queue's leader, is stopped; a stream consumer
//! across the loss of its node; shuffled address lists spreading clients
//! over the nodes.
//!
//! The cluster boots once for this binary, and every scenario runs in the
//! one test below, in sequence: the scenarios stop nodes, so they must not
//! overlap, and the test owns the [`Cluster`], so that unwinding from a
//! panic (or the test's end) drops it, which stops the nodes and removes
//! their directories. (A fixture in a `static` is never dropped; a process
//! killed outright is cleaned up by each node's watchdog.) Each scenario
//! runs as a task of its own, so that one failing still lets the others run
//! and report, and the cluster is brought back to three running nodes after
//! each.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp091::prelude::*;
use amqp091::{
    BasicProperties, Channel, Config, Confirmation, ConnectInfo, Connection, ConsumeOptions,
    Consumer, Error, FieldTable, FieldValue, PublishConfirm, RecoveryConfig, RecoveryEvent,
};
use amqp_client_tests::cluster::{Cluster, SIZE};
use amqp_client_tests::{name, unique};
use tokio::sync::mpsc;

/// Confirmed publishes per quorum-queue scenario, as issue 14 asks.
const MESSAGES: u32 = 20_000;
/// Publishes awaiting their confirms at once.
const WINDOW: usize = 1_000;

/// Backoff for the failover tests: a first retry after 100 ms, at most 1 s
/// between retries.
fn quick_recovery() -> RecoveryConfig {
    RecoveryConfig {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        ..RecoveryConfig::default()
    }
}

/// A connection with what it tells about where it connects: each run of its
/// on-connect hook (first connect and every reconnect) and every recovery
/// event, with the time it came.
struct Tracked {
    connection: Connection,
    connects: Arc<Mutex<Vec<ConnectInfo>>>,
    events: Arc<Mutex<Vec<(Instant, RecoveryEvent)>>>,
}

impl Tracked {
    async fn connect(config: Config) -> Tracked {
        let connects = Arc::new(Mutex::new(Vec::new()));
        let hook_connects = connects.clone();
        let connection = Connection::builder(config)
            .on_connect(move |_connection, info| {
                hook_connects.lock().unwrap().push(info);
                async { Ok(()) }
            })
            .connect()
            .await
            .expect("connect to the cluster");
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut receiver = connection.recovery_events();
        let recorded = events.clone();
        tokio::spawn(async move {
            loop {
                match receiver.recv().await {
                    Ok(event) => recorded.lock().unwrap().push((Instant::now(), event)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
        let tracked = Tracked {
            connection,
            connects,
            events,
        };
        // The hook runs on a task of its own.
        tracked.connected_times(1, Duration::from_secs(10)).await;
        tracked
    }

    /// The node of the last connect, per the hook.
    fn node(&self, cluster: &Cluster) -> usize {
        let connects = self.connects.lock().unwrap();
        let last = connects
            .last()
            .expect("the hook ran after the first connect");
        cluster
            .index_of_address(&last.address)
            .unwrap_or_else(|| panic!("{} is no node of the cluster", last.address))
    }

    fn connects(&self) -> Vec<ConnectInfo> {
        self.connects.lock().unwrap().clone()
    }

    /// Waits until the hook has run `count` times (the first connect and
    /// `count - 1` reconnects).
    async fn connected_times(&self, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.connects.lock().unwrap().len() < count {
            assert!(
                Instant::now() < deadline,
                "no reconnect within {within:?}; events: {:?}",
                self.events.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether `Recovering` was reported (the connection was lost).
    fn has_lost_its_connection(&self) -> bool {
        self.events
            .lock()
            .unwrap()
            .iter()
            .any(|(_, event)| matches!(event, RecoveryEvent::Recovering { .. }))
    }

    /// From the loss of the connection (`Recovering`) to `Recovered`, for
    /// each recovery so far.
    fn recovery_times(&self) -> Vec<Duration> {
        let mut lost = None;
        let mut times = Vec::new();
        for (at, event) in self.events.lock().unwrap().iter() {
            match event {
                RecoveryEvent::Recovering { .. } => lost = Some(*at),
                RecoveryEvent::Recovered => {
                    if let Some(lost) = lost.take() {
                        times.push(at.duration_since(lost));
                    }
                }
                _ => {}
            }
        }
        times
    }
}

type Scenario = fn(Arc<Cluster>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_in_a_three_node_cluster() {
    let started = Instant::now();
    let cluster = Arc::new(Cluster::start_async().await);
    let booted = started.elapsed();
    let scenarios: [(&str, Scenario); 4] = [
        (
            "shuffled addresses spread 30 connections over every node",
            |c| Box::pin(shuffled_addresses_spread_connections_over_every_node(c)),
        ),
        (
            "confirmed publishes while the client's node is stopped",
            |c| Box::pin(no_confirmed_message_is_lost_when_the_clients_node_stops(c)),
        ),
        (
            "confirmed publishes while the queue's leader is stopped",
            |c| Box::pin(no_confirmed_message_is_lost_when_the_queues_leader_stops(c)),
        ),
        ("a stream consumer across the loss of its node", |c| {
            Box::pin(a_stream_consumer_resumes_after_its_last_delivery_on_another_node(c))
        }),
    ];
    let mut failures = Vec::new();
    for (title, scenario) in scenarios {
        let began = Instant::now();
        let mut task = tokio::spawn(scenario(cluster.clone()));
        let outcome = match tokio::time::timeout(Duration::from_secs(180), &mut task).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(match e.try_into_panic() {
                Ok(panic) => panic_text(&panic),
                Err(e) => e.to_string(),
            }),
            Err(_) => {
                task.abort();
                let _ = task.await;
                Some("did not finish within 180 s".to_owned())
            }
        };
        eprintln!(
            "scenario `{title}`: {} in {:.1?}",
            if outcome.is_none() { "ok" } else { "FAILED" },
            began.elapsed()
        );
        if let Some(why) = outcome {
            failures.push(format!("{title}: {why}"));
        }
        // The next scenario finds the three nodes up, whatever this one did.
        cluster.start_stopped_nodes().await;
    }
    eprintln!(
        "cluster booted in {booted:.1?}; all scenarios done after {:.1?}",
        started.elapsed()
    );
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

async fn shuffled_addresses_spread_connections_over_every_node(cluster: Arc<Cluster>) {
    const CONNECTIONS: usize = 30;
    let prefix = unique("shuffled");
    let mut connections = Vec::new();
    for i in 0..CONNECTIONS {
        // The same list, node 0 first, for every client.
        let config = cluster
            .config(0)
            .shuffle_addresses(true)
            .connection_name(format!("{prefix}-{i}"));
        connections.push(Tracked::connect(config).await);
    }
    let mut per_node = [0usize; SIZE];
    for tracked in &connections {
        per_node[tracked.node(&cluster)] += 1;
    }
    assert!(
        per_node.iter().all(|&n| n > 0),
        "connections per node, as the client saw them: {per_node:?}"
    );
    // The broker's view: connections are listed cluster-wide, each with the
    // AMQP port of the node that holds it.
    let listing = cluster
        .rabbitmqctl_async(&[
            "list_connections",
            "-q",
            "--no-table-headers",
            "port",
            "client_properties",
        ])
        .await;
    let mut broker_per_node = [0usize; SIZE];
    for line in listing.lines().filter(|l| l.contains(&prefix)) {
        let port: u16 = line
            .split('\t')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no port in {line}"));
        let node = cluster
            .index_of_port(port)
            .unwrap_or_else(|| panic!("port {port} is no node's"));
        broker_per_node[node] += 1;
    }
    assert_eq!(
        broker_per_node, per_node,
        "the broker's count per node against the client's"
    );
    eprintln!("{CONNECTIONS} shuffled connections per node: {per_node:?}");
    for tracked in connections {
        tracked.connection.close().await.expect("close");
    }
}

/// Which node a quorum-queue scenario stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    /// The node the publisher and the consumer are connected to (not the
    /// queue's leader).
    ClientsNode,
    /// The queue's leader (the clients are connected to another node).
    Leader,
}

async fn no_confirmed_message_is_lost_when_the_clients_node_stops(cluster: Arc<Cluster>) {
    confirmed_publishes_across_a_node_loss(&cluster, Victim::ClientsNode).await;
}

async fn no_confirmed_message_is_lost_when_the_queues_leader_stops(cluster: Arc<Cluster>) {
    confirmed_publishes_across_a_node_loss(&cluster, Victim::Leader).await;
}

/// 20,000 confirmed publishes to a quorum queue on all three nodes, a
/// consumer reading throughout, and a node stopped in the midst of them.
async fn confirmed_publishes_across_a_node_loss(cluster: &Arc<Cluster>, victim: Victim) {
    let queue = unique(match victim {
        Victim::ClientsNode => "quorum-client-node",
        Victim::Leader => "quorum-leader",
    });
    // Declared through node 0, which leads it (RabbitMQ puts the leader on
    // the declaring client's node), as `list_queues … leader` then confirms.
    let admin = Tracked::connect(cluster.config(0).recovery(quick_recovery())).await;
    let admin_channel = admin.connection.open_channel().await.expect("channel");
    declare_quorum_queue(&admin_channel, &queue).await;
    let leader = cluster.leader_of(&queue).await;
    let clients_node = (leader + 1) % SIZE;
    let stopped = match victim {
        Victim::ClientsNode => clients_node,
        Victim::Leader => leader,
    };

    let client_config = || {
        cluster
            .config(clients_node)
            .recovery(quick_recovery())
            .connection_name(unique("quorum-client"))
    };
    let publisher = Tracked::connect(client_config()).await;
    let consumer_connection = Tracked::connect(client_config()).await;
    assert_eq!(publisher.node(cluster), clients_node);
    assert_eq!(consumer_connection.node(cluster), clients_node);

    let consumer_channel = consumer_connection
        .connection
        .open_channel()
        .await
        .expect("channel");
    consumer_channel
        .basic_qos(basic::Qos {
            prefetch_count: 1000,
            ..Default::default()
        })
        .await
        .expect("qos");
    let consumer = consumer_channel
        .basic_consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let (consumed_tx, mut consumed) = mpsc::unbounded_channel();
    let consumer_task = tokio::spawn(read_ids(consumer, consumed_tx));

    let channel = publisher.connection.open_channel().await.expect("channel");
    channel
        .confirm_select(confirm::Select::default())
        .await
        .expect("confirm mode");
    let (confirms_tx, confirms_rx) = mpsc::channel(WINDOW);
    let outcomes = tokio::spawn(collect_outcomes(confirms_rx));
    // The stop starts once publishing is in full swing and takes a few
    // seconds to bite (rabbitmqctl boots an Erlang VM of its own): the
    // client's connection lost (or, for the leader, the node down) while
    // publishes are in flight. Should it not have bitten by `pace_from`,
    // the rest are published 2 ms apart (at most 500 a second, ten more
    // seconds for the stop), so that it still lands amid publishes: a
    // steady few awaiting their confirms rather than bursts and pauses,
    // in which the loss would find none in flight.
    let stop_from = MESSAGES / 20;
    let pace_from = MESSAGES * 3 / 4;
    let mut stopping = None;
    // The id being published when the loss was first seen.
    let mut lost_at = None;
    let mut unsent = Vec::new();
    let publishing = Instant::now();
    for id in 0..MESSAGES {
        if id == stop_from {
            let cluster = cluster.clone();
            stopping = Some(tokio::spawn(async move {
                cluster.node(stopped).stop_app_async().await;
            }));
        }
        if let (None, Some(stop)) = (lost_at, &stopping) {
            let lost = match victim {
                // A publish made while recovering waits for the reconnect,
                // so the recovery events tell, not `is_recovering`.
                Victim::ClientsNode => publisher.has_lost_its_connection(),
                Victim::Leader => stop.is_finished(),
            };
            if lost {
                lost_at = Some((id, publishing.elapsed()));
            } else if id >= pace_from {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        match publish_id(&channel, &queue, id).await {
            Ok(confirm) => confirms_tx.send((id, confirm)).await.expect("collector"),
            Err(_) => unsent.push(id),
        }
    }
    if let Some(stop) = stopping {
        stop.await.expect("node stopped");
    }
    assert!(
        lost_at.is_some(),
        "node {stopped} stopped ({victim:?}) only after the last publish"
    );
    drop(confirms_tx);
    let (mut acked, mut unknown) = outcomes.await.expect("collector");
    let (first_round_unknown, first_round_unsent) = (unknown.len(), unsent.len());
    unknown.extend(unsent);
    // At least once: whatever has no ack is published again until it has.
    for round in 1..=10 {
        if unknown.is_empty() {
            break;
        }
        let (tx, rx) = mpsc::channel(WINDOW);
        let outcomes = tokio::spawn(collect_outcomes(rx));
        let mut unsent = Vec::new();
        for id in std::mem::take(&mut unknown) {
            match publish_id(&channel, &queue, id).await {
                Ok(confirm) => tx.send((id, confirm)).await.expect("collector"),
                Err(_) => unsent.push(id),
            }
        }
        drop(tx);
        let (more_acked, still_unknown) = outcomes.await.expect("collector");
        acked.extend(more_acked);
        unknown = still_unknown;
        unknown.extend(unsent);
        assert!(round < 10, "{} publishes never acked", unknown.len());
    }
    assert_eq!(
        acked.len(),
        MESSAGES as usize,
        "every id acked once republished"
    );

    // Every acked message reaches the consumer, which never re-subscribed.
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !acked.iter().all(|id| seen.contains(id)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumed.recv()).await {
            Ok(Some(id)) => {
                seen.insert(id);
            }
            Ok(None) => panic!(
                "the consumer's stream ended after {} of {MESSAGES} messages: {:?}",
                seen.len(),
                consumer_task.await
            ),
            Err(_) => {
                let missing: Vec<_> = acked.iter().filter(|id| !seen.contains(id)).collect();
                panic!(
                    "{} acked messages never consumed (first: {:?}); stopped node {stopped}, leader was {leader}",
                    missing.len(),
                    &missing[..missing.len().min(10)]
                );
            }
        }
    }

    let publisher_connects = publisher.connects();
    let consumer_connects = consumer_connection.connects();
    match victim {
        Victim::ClientsNode => {
            for (who, connects) in [
                ("publisher", &publisher_connects),
                ("consumer", &consumer_connects),
            ] {
                assert_eq!(connects.len(), 2, "{who}: one reconnect: {connects:?}");
                let moved = &connects[1];
                let node = cluster.index_of_address(&moved.address);
                assert!(
                    node.is_some_and(|n| n != stopped),
                    "{who} moved to a live node: {moved:?}"
                );
                // The lost node is tried last, so the first attempt after
                // the first backoff delay reaches a live one.
                assert_eq!(moved.attempt, 1, "{who}: {moved:?}");
            }
            // Recovery consumed again, once.
            let consumers = admin_channel
                .queue_declare(queue::Declare {
                    queue: name(&queue),
                    passive: true,
                    ..Default::default()
                })
                .await
                .expect("passive declare")
                .consumer_count;
            assert_eq!(consumers, 1, "one consumer on {queue} after the move");
        }
        Victim::Leader => {
            assert_eq!(publisher_connects.len(), 1, "{publisher_connects:?}");
            assert_eq!(consumer_connects.len(), 1, "{consumer_connects:?}");
            let new_leader = cluster.leader_of(&queue).await;
            assert_ne!(new_leader, stopped, "a surviving node leads {queue} now");
        }
    }
    eprintln!(
        "{victim:?}: stopped node {stopped} (leader {leader}, clients on {clients_node}), \
         lost at (publish, time) {lost_at:?}; {first_round_unknown} confirms unknown \
         or nacked and {first_round_unsent} publishes refused, all republished; \
         {} distinct ids consumed; publisher recovered in {:?}, consumer in {:?}; {:.1?} in all",
        seen.len(),
        publisher.recovery_times(),
        consumer_connection.recovery_times(),
        publishing.elapsed(),
    );

    consumer_task.abort();
    cluster.node(stopped).start_app_async().await;
    admin_channel
        .queue_delete(queue::Delete {
            queue: name(&queue),
            ..Default::default()
        })
        .await
        .expect("delete");
    for tracked in [publisher, consumer_connection, admin] {
        tracked.connection.close().await.expect("close");
    }
}

async fn declare_quorum_queue(channel: &Channel, queue: &str) {
    channel
        .queue_declare(queue::Declare {
            queue: name(queue),
            durable: true,
            arguments: FieldTable::new()
                .with("x-queue-type", FieldValue::LongString("quorum".into()))
                .with("x-quorum-initial-group-size", FieldValue::I32(SIZE as i32)),
            ..Default::default()
        })
        .await
        .expect("declare a quorum queue");
}

async fn publish_id(channel: &Channel, queue: &str, id: u32) -> Result<PublishConfirm, Error> {
    let persistent = BasicProperties {
        delivery_mode: Some(2),
        ..Default::default()
    };
    channel
        .basic_publish("", queue, false, &persistent, id.to_string())
        .await
}

/// Awaits each confirm in turn: the acked ids, and those whose outcome is
/// unknown (or nacked), to publish again. Anything else fails the test.
async fn collect_outcomes(
    mut confirms: mpsc::Receiver<(u32, PublishConfirm)>,
) -> (HashSet<u32>, Vec<u32>) {
    let mut acked = HashSet::new();
    let mut unknown = Vec::new();
    while let Some((id, confirm)) = confirms.recv().await {
        match confirm.await {
            Ok(Confirmation::Ack) => {
                acked.insert(id);
            }
            Ok(Confirmation::Nack) | Err(Error::PublishOutcomeUnknown(_)) => unknown.push(id),
            other => panic!("publish {id}: {other:?}"),
        }
    }
    (acked, unknown)
}

/// Sends the id of each delivery to `ids` and acks it (an ack refused as
/// stale after a reconnect is fine: the broker redelivers). Returns the
/// error that ended the stream, if one did.
async fn read_ids(mut consumer: Consumer, ids: mpsc::UnboundedSender<u32>) -> Option<Error> {
    while let Some(delivery) = consumer.next().await {
        match delivery {
            Ok(delivery) => {
                let id = std::str::from_utf8(&delivery.body)
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .expect("a numeric body");
                let _ = delivery.ack().await;
                if ids.send(id).is_err() {
                    return None;
                }
            }
            Err(error) => return Some(error),
        }
    }
    None
}

async fn a_stream_consumer_resumes_after_its_last_delivery_on_another_node(cluster: Arc<Cluster>) {
    let queue = unique("stream");
    // The stream is declared, and published to, through node 0 (its
    // leader); the consumer reads on node 1, which is then stopped.
    let publisher = Tracked::connect(cluster.config(0).recovery(quick_recovery())).await;
    let channel = publisher.connection.open_channel().await.expect("channel");
    channel
        .queue_declare(queue::Declare {
            queue: name(&queue),
            durable: true,
            arguments: FieldTable::new()
                .with("x-queue-type", FieldValue::LongString("stream".into()))
                .with("x-initial-cluster-size", FieldValue::I32(SIZE as i32)),
            ..Default::default()
        })
        .await
        .expect("declare a stream");
    channel
        .confirm_select(confirm::Select::default())
        .await
        .expect("confirm mode");
    let publish = |range: std::ops::Range<u32>| {
        let channel = channel.clone();
        let queue = queue.clone();
        async move {
            let mut confirms = Vec::new();
            for id in range {
                confirms.push(publish_id(&channel, &queue, id).await.expect("publish"));
            }
            for confirm in confirms {
                assert!(
                    matches!(confirm.await, Ok(Confirmation::Ack)),
                    "the stream took the message"
                );
            }
        }
    };
    publish(0..100).await;

    let consumers_node = 1;
    let reader = Tracked::connect(cluster.config(consumers_node).recovery(quick_recovery())).await;
    assert_eq!(reader.node(&cluster), consumers_node);
    let reader_channel = reader.connection.open_channel().await.expect("channel");
    // Streams need a prefetch and acks (as credit).
    reader_channel
        .basic_qos(basic::Qos {
            prefetch_count: 10,
            ..Default::default()
        })
        .await
        .expect("qos");
    let mut consumer = reader_channel
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
        seen.push(next_stream_id(&mut consumer).await);
    }
    cluster.node(consumers_node).stop_app_async().await;
    reader.connected_times(2, Duration::from_secs(30)).await;
    let moved = reader.connects()[1].clone();
    assert_ne!(
        cluster.index_of_address(&moved.address),
        Some(consumers_node),
        "moved to a live node: {moved:?}"
    );
    publish(100..150).await;
    while seen.len() < 150 {
        seen.push(next_stream_id(&mut consumer).await);
    }
    // Nothing more comes: nothing was delivered twice.
    let extra = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
    assert!(extra.is_err(), "an extra delivery: {extra:?}");
    let expected: Vec<u32> = (0..150).collect();
    assert_eq!(
        seen, expected,
        "every message once, in order, across the move to {moved:?}"
    );

    cluster.node(consumers_node).start_app_async().await;
    channel
        .queue_delete(queue::Delete {
            queue: name(&queue),
            ..Default::default()
        })
        .await
        .expect("delete");
    reader.connection.close().await.expect("close");
    publisher.connection.close().await.expect("close");
}

async fn next_stream_id(consumer: &mut Consumer) -> u32 {
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
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
