//! A three-node RabbitMQ cluster of private nodes, for the failover tests.
//!
//! [`Cluster::start`] boots three [`PrivateNode`]s at once (each with its
//! own node name, ports and directory) and joins the second and third to
//! the first the way an operator does: `rabbitmqctl stop_app`, `reset`,
//! `join_cluster <first node>`, `start_app`. The nodes share the Erlang
//! cookie that every private node uses (see [`node`](crate::node)), which
//! clustering needs. Dropping the [`Cluster`] stops the three nodes at once
//! and removes their directories, also when the test panics; each node's
//! watchdog does it when the test process dies without unwinding.
//!
//! ```no_run
//! use amqp_client_tests::cluster::Cluster;
//!
//! # async fn example() {
//! let cluster = Cluster::start_async().await;
//! let config = cluster.config(0); // node 0 first, then nodes 1 and 2
//! let connection = amqp091::Connection::connect(config).await.unwrap();
//! cluster.node(0).stop_app_async().await;
//! // … the connection moves to node 1 …
//! cluster.start_stopped_nodes().await;
//! # drop(connection);
//! # }
//! ```

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::node::{NodeOptions, PrivateNode};

/// Three private RabbitMQ nodes joined into one cluster; stopped and
/// deleted on drop.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<PrivateNode>,
}

/// How many nodes a [`Cluster`] has: the least for quorum queues to keep a
/// majority with one node down.
pub const SIZE: usize = 3;

impl Cluster {
    /// Boots the three nodes and clusters them. Blocks for the time that
    /// takes (tens of seconds on a busy machine); from async code prefer
    /// [`start_async`](Self::start_async).
    ///
    /// # Panics
    ///
    /// When a node does not boot or join, with its log's tail.
    pub fn start() -> Cluster {
        let started = Instant::now();
        let nodes: Vec<PrivateNode> = std::thread::scope(|scope| {
            let booting: Vec<_> = (0..SIZE)
                .map(|_| scope.spawn(|| PrivateNode::start(NodeOptions::default())))
                .collect();
            booting
                .into_iter()
                .map(|boot| boot.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let cluster = Cluster { nodes };
        let seed = cluster.nodes[0].node_name().to_owned();
        let joining = &cluster.nodes[1..];
        // A node forgets its own data (`reset`) before it joins; both
        // joiners can do that at once, but they join the seed one at a time
        // (concurrent schema changes on the seed can time out).
        parallel(joining, |node| {
            node.stop_app();
            node.rabbitmqctl(&["reset"]);
        });
        for node in joining {
            node.rabbitmqctl(&["join_cluster", &seed]);
        }
        parallel(joining, PrivateNode::start_app);
        // One CLI call (each boots an Erlang VM): the running members, and
        // the feature flags that quorum queues and streams need (fresh 3.10
        // nodes enable every flag, and a joining node takes the cluster's).
        let status = cluster.nodes[0].rabbitmqctl(&[
            "eval",
            "{[atom_to_list(N) || N <- rabbit_nodes:all_running()], \
              rabbit_feature_flags:is_enabled(quorum_queue), \
              rabbit_feature_flags:is_enabled(stream_queue)}.",
        ]);
        for node in &cluster.nodes {
            assert!(
                status.contains(node.node_name()),
                "{} is not running in the cluster: {status}",
                node.node_name()
            );
        }
        let compact: String = status.split_whitespace().collect();
        assert!(
            compact.ends_with(",true,true}"),
            "the quorum_queue and stream_queue feature flags are not both enabled: {status}"
        );
        eprintln!(
            "a cluster of {SIZE} private RabbitMQ nodes ({}) started in {:.1?}",
            cluster
                .nodes
                .iter()
                .map(|n| format!("{} on port {}", n.node_name(), n.port()))
                .collect::<Vec<_>>()
                .join(", "),
            started.elapsed()
        );
        cluster
    }

    /// [`start`](Self::start) on a blocking thread.
    pub async fn start_async() -> Cluster {
        match tokio::task::spawn_blocking(Self::start).await {
            Ok(cluster) => cluster,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Node `index` (0, 1 or 2; 0 is the one the others joined).
    pub fn node(&self, index: usize) -> &PrivateNode {
        &self.nodes[index]
    }

    /// The three nodes.
    pub fn nodes(&self) -> &[PrivateNode] {
        &self.nodes
    }

    /// A config listing every node's address, node `first` first and the
    /// others after it in turn (as fallback addresses).
    pub fn config(&self, first: usize) -> amqp091::Config {
        (1..SIZE).fold(self.nodes[first].config(), |config, k| {
            let port = self.nodes[(first + k) % SIZE].port();
            config.fallback_address(Ipv4Addr::LOCALHOST.to_string(), port)
        })
    }

    /// The index of the node whose AMQP address is `address` (`host:port`,
    /// as [`ConnectInfo`](amqp091::ConnectInfo) and
    /// [`RecoveryEvent::Reconnected`](amqp091::RecoveryEvent) name it).
    pub fn index_of_address(&self, address: &str) -> Option<usize> {
        let port: u16 = address.rsplit_once(':')?.1.parse().ok()?;
        self.index_of_port(port)
    }

    /// The index of the node listening for AMQP on `port`.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// The index of the node named `name` (`amqptest-…@localhost`).
    pub fn index_of_name(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.node_name() == name)
    }

    /// Whether node `index`'s AMQP port accepts connections (its RabbitMQ
    /// application runs).
    pub fn is_up(&self, index: usize) -> bool {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.nodes[index].port()));
        TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_ok()
    }

    /// `rabbitmqctl <args>` on a node that is up, for cluster-wide listings.
    ///
    /// # Panics
    ///
    /// When no node is up, or the command fails.
    pub fn rabbitmqctl(&self, args: &[&str]) -> String {
        let up = (0..SIZE)
            .find(|&i| self.is_up(i))
            .expect("a node of the cluster is up");
        self.nodes[up].rabbitmqctl(args)
    }

    /// [`rabbitmqctl`](Self::rabbitmqctl), letting the runtime's other
    /// tasks run meanwhile (`block_in_place`: needs the multi-thread
    /// runtime).
    pub async fn rabbitmqctl_async(&self, args: &[&str]) -> String {
        let up = (0..SIZE)
            .find(|&i| self.is_up(i))
            .expect("a node of the cluster is up");
        let node = &self.nodes[up];
        tokio::task::block_in_place(|| node.rabbitmqctl(args))
    }

    /// The index of the node that leads `queue` (a quorum queue or a
    /// stream), from `rabbitmqctl list_queues name leader`. Needs the
    /// multi-thread runtime, as [`rabbitmqctl_async`](Self::rabbitmqctl_async) does.
    ///
    /// # Panics
    ///
    /// When the queue is not listed or its leader is none of the nodes.
    pub async fn leader_of(&self, queue: &str) -> usize {
        let listing = self
            .rabbitmqctl_async(&["list_queues", "-q", "--no-table-headers", "name", "leader"])
            .await;
        let leader = listing
            .lines()
            .find_map(|line| {
                let (name, leader) = line.split_once('\t')?;
                (name == queue).then(|| leader.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("{queue} is not in the listing:\n{listing}"));
        self.index_of_name(&leader).unwrap_or_else(|| {
            panic!("the leader of {queue}, {leader:?}, is no node of the cluster")
        })
    }

    /// Starts the RabbitMQ application again on every node whose port is
    /// closed, so that the next test finds all three up.
    pub async fn start_stopped_nodes(&self) {
        for index in 0..SIZE {
            if !self.is_up(index) {
                self.nodes[index].start_app_async().await;
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // At once: stopping a node takes seconds. Each PrivateNode's own
        // drop then finds it stopped and removes its directory.
        parallel(&self.nodes, PrivateNode::stop);
    }
}

/// Runs `f` on every node, each on a thread of its own, and waits for all;
/// a panic in one is raised again once all are done.
fn parallel(nodes: &[PrivateNode], f: impl Fn(&PrivateNode) + Sync) {
    std::thread::scope(|scope| {
        let running: Vec<_> = nodes.iter().map(|node| scope.spawn(|| f(node))).collect();
        let mut panic = None;
        for handle in running {
            if let Err(e) = handle.join() {
                panic.get_or_insert(e);
            }
        }
        if let Some(e) = panic {
            std::panic::resume_unwind(e);
        }
    });
}
