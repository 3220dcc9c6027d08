//! Support code for the integration tests: the broker URL, connecting,
//! `rabbitmqctl`, unique names, private broker nodes and a cluster of them, a
//! scripted fake peer and a TCP fault proxy.

pub mod cluster;
pub mod fake_peer;
pub mod node;
pub mod proxy;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use amqp091::prelude::*;
use amqp091::{Channel, Config, Connection, RecoveryEvent, ShortString};
use tokio::sync::broadcast;

/// The broker the tests use: `AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The config of [`amqp_url`].
pub fn config() -> Config {
    amqp_url().parse().expect("AMQP_URL is a valid AMQP URL")
}

/// Connects to the test broker, failing loudly (never skipping) when none answers.
pub async fn connect() -> Connection {
    connect_with(config()).await
}

/// Connects with `config`, failing loudly when the broker does not answer.
pub async fn connect_with(config: Config) -> Connection {
    let address = config.address();
    match Connection::connect(config).await {
        Ok(connection) => connection,
        Err(e) => panic!(
            "no RabbitMQ at {address}: {e}\nrun the tests with `cargo xtask test`, which starts one, or set AMQP_URL"
        ),
    }
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "amqp-client-test.{prefix}.{}.{}.{}",
        std::process::id(),
        nanos % 1_000_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `rabbitmqctl` against the shared broker and returns its stdout;
/// panics with its stderr when it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl: {e}"));
    assert!(
        output.status.success(),
        "rabbitmqctl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Bindings of the default vhost as (source, destination, routing key) lines.
pub fn list_bindings() -> Vec<(String, String, String)> {
    rabbitmqctl(&[
        "list_bindings",
        "-q",
        "--no-table-headers",
        "source_name",
        "destination_name",
        "routing_key",
    ])
    .lines()
    .filter_map(|line| {
        let mut parts = line.split('\t');
        Some((
            parts.next()?.to_owned(),
            parts.next()?.to_owned(),
            parts.next().unwrap_or("").to_owned(),
        ))
    })
    .collect()
}

/// A `ShortString` from a name the test chose (always short enough).
pub fn name(text: &str) -> ShortString {
    ShortString::from(text)
}

/// Deletes `queue` (the tests' clean-up), failing the test if the broker refuses.
pub async fn delete_queue(channel: &Channel, queue: &str) {
    channel
        .queue_delete(queue::Delete {
            queue: name(queue),
            ..Default::default()
        })
        .await
        .expect("delete");
}

/// The broker's pid for the connection named `connection_name`, waiting
/// for it to show up in `rabbitmqctl list_connections`.
pub async fn connection_pid(connection_name: &str) -> String {
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
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("connection {connection_name} never appeared in rabbitmqctl list_connections");
}

/// What the broker says of `queue` now (a passive declare): its message
/// and consumer counts. Fails the test if the queue does not exist.
pub async fn passive_declare(channel: &Channel, queue: &str) -> queue::DeclareOk {
    channel
        .queue_declare(queue::Declare {
            queue: name(queue),
            passive: true,
            ..Default::default()
        })
        .await
        .expect("passive declare")
}

/// Waits until `queue` holds `expected` messages (the broker routes
/// asynchronously), failing after `within` with the count it last saw.
pub async fn wait_for_message_count(
    channel: &Channel,
    queue: &str,
    expected: u32,
    within: std::time::Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let count = passive_declare(channel, queue).await.message_count;
        if count == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} of {expected} messages in {queue}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The shared broker's socket address (for proxies in front of it).
pub fn broker_address() -> std::net::SocketAddr {
    use std::net::ToSocketAddrs;
    config()
        .address()
        .to_socket_addrs()
        .expect("resolve the broker's address")
        .next()
        .expect("an address")
}

/// The next recovery event that `wanted` accepts, failing the test after 30 s.
pub async fn wait_for_event(
    events: &mut broadcast::Receiver<RecoveryEvent>,
    wanted: fn(&RecoveryEvent) -> bool,
) -> RecoveryEvent {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(event)) if wanted(&event) => return event,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(e)) => panic!("recovery events ended: {e}"),
            Err(_) => panic!("the awaited recovery event never came"),
        }
    }
}

/// Waits for [`RecoveryEvent::Recovered`].
pub async fn recovered(events: &mut broadcast::Receiver<RecoveryEvent>) {
    wait_for_event(events, |e| matches!(e, RecoveryEvent::Recovered)).await;
}

/// Closes the connection named `connection_name` from the broker's side
/// (`rabbitmqctl close_connection`), as an operator or a node shutdown does.
pub async fn close_from_broker(connection_name: &str) {
    let pid = connection_pid(connection_name).await;
    rabbitmqctl(&["close_connection", &pid, "closed by the test"]);
}

/// A user of the default vhost with every permission, deleted when dropped.
pub struct TestUser {
    /// The user name.
    pub name: String,
}

impl TestUser {
    /// Adds `name` with `password` (`rabbitmqctl add_user`).
    pub fn add(name: &str, password: &str) -> Self {
        rabbitmqctl(&["add_user", name, password]);
        rabbitmqctl(&["set_permissions", "-p", "/", name, ".*", ".*", ".*"]);
        Self {
            name: name.to_owned(),
        }
    }

    /// Changes its password (`rabbitmqctl change_password`).
    pub fn change_password(&self, password: &str) {
        rabbitmqctl(&["change_password", &self.name, password]);
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}
