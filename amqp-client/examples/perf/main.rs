//! A PerfTest-style bench tool: producers, consumers, message size, confirm
//! window, prefetch, duration or message count, fixed publish rate, several
//! queues, connections and channels, queue types, against any URL or against
//! a built-in peer that costs almost nothing (`--peer sink` / `--peer flood`,
//! run as a child process so that its CPU is not counted as the client's).
//!
//! ```text
//! cargo run --release -p amqp091 --example perf -- --peer sink --producers 1 --size 32 --duration 10
//! cargo run --release -p amqp091 --example perf -- --peer sink --confirm 1000
//! cargo run --release -p amqp091 --example perf -- --peer flood --consumers 1 --prefetch 1000
//! cargo run --release -p amqp091 --example perf -- --url amqp://127.0.0.1 --producers 1 --consumers 1
//! # each producer and consumer has a connection of its own; --shared-connection puts them on one
//! cargo run --release -p amqp091 --example perf -- --producers 1 --consumers 1 --rate 1000
//! # publish → deliver latency percentiles at a fixed 1000 msg/s per producer
//! cargo run --release -p amqp091 --example perf -- --producers 4 --consumers 4 --queues 2 \
//!     --connections 2 --channels 2 --queue-type quorum --json
//! cargo run --release -p amqp091 --features blocking --example perf -- --peer sink --blocking
//! # --blocking: producers and consumers on threads, through amqp091::blocking
//! cargo run --release -p amqp091 --features metrics --example perf -- --peer sink
//! # with the `metrics` feature: into a debugging recorder, whose counters are printed at the end
//! ```
//!
//! Prints progress each second, then msgs/s, client CPU per message (user +
//! system time of this process, from /proc/self/stat), peak RSS, and
//! publish → deliver latency percentiles when both sides run; with `--json`
//! the progress goes to stderr and stdout gets the summary as one JSON object.

#[cfg(feature = "blocking")]
mod blocking;
mod histogram;
mod peer;
mod raw_copy;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp091::prelude::*;
use amqp091::{
    BasicProperties, Channel, Config, Confirmation, Connection, ConsumeArguments, ConsumeOptions,
    FieldTable, QueueArguments, QueueType, RecoveryConfig, StreamOffset,
};
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::json;

use histogram::Histogram;

/// Bodies up to this size carry the send time in their first 8 bytes (a
/// copy of the body per message); larger ones share one body and carry it in
/// the `perf-sent-ns` header, as copying megabytes per message would cost
/// more than the table.
const STAMP_IN_BODY_MAX: usize = 64 * 1024;
/// The largest `--size`: RabbitMQ's default `max_message_size` is 128 MiB.
const SIZE_MAX: usize = 64 * 1024 * 1024;
const SENT_HEADER: &str = "perf-sent-ns";

#[derive(Debug, Clone)]
struct Options {
    url: String,
    peer: Option<peer::Kind>,
    producers: usize,
    consumers: usize,
    size: usize,
    confirm: Option<usize>,
    prefetch: u16,
    multi_ack: u64,
    no_ack: bool,
    duration: Duration,
    messages: Option<u64>,
    /// Every queue the run declares; producers and consumers are spread over them.
    queues: Vec<String>,
    queue_type: QueueType,
    /// Delete the queues at the end (they are purged at the start anyway).
    delete_queues: bool,
    /// Publishes per second per producer; as fast as possible when `None`.
    rate: Option<f64>,
    mandatory: bool,
    /// Instead of messages: this many sequential passive `queue.declare` round trips.
    rpc: Option<u64>,
    /// Connections, and channels on each, that producers and consumers are
    /// assigned to round-robin. By default each has a connection of its
    /// own, as PerfTest does: RabbitMQ's flow control throttles a connection
    /// that publishes faster than its queues take, and on a shared
    /// connection that holds back the consumers' acks too.
    connections: usize,
    channels: usize,
    /// Producers and consumers through `amqp091::blocking`, each on a
    /// thread with a connection of its own (feature `blocking`).
    blocking: bool,
    /// The summary as one JSON object on stdout; progress on stderr.
    json: bool,
    /// Pace `--rate` with the thread's own sleep rather than tokio's timer.
    precise_pacing: bool,
    /// Make `--rpc`'s calls from the future given to `block_on` rather than
    /// from a spawned task.
    rpc_from_block_on: bool,
    /// After the run, copy as many bytes as its bodies over a plain
    /// loopback TCP connection, as the yardstick for large bodies.
    raw_copy: bool,
}

const USAGE: &str = "\
usage: perf [--url URL | --peer sink|flood] [--producers N] [--consumers N] [--size BYTES]
            [--confirm WINDOW] [--mandatory] [--prefetch N] [--multi-ack N] [--no-ack]
            [--duration SECONDS] [--messages N] [--rate MSGS_PER_SECOND_PER_PRODUCER [--precise-pacing]]
            [--queue NAME | --queues N | --queue-pattern 'NAME-%d' --queue-pattern-from A --queue-pattern-to B]
            [--queue-type classic|quorum|stream] [--delete-queues]
            [--connections N] [--channels PER_CONNECTION | --shared-connection]
            [--rpc ROUND_TRIPS [--rpc-from-block-on]] [--blocking] [--json] [--raw-copy]
       perf serve sink|flood PORT SIZE [MESSAGES]";

const HELP: &str = "\
--rate N            publishes per second per producer, paced from the start (1 ms timer steps)
--precise-pacing    pace --rate with the thread's own sleep: even spacing above 1000/s, more CPU
--queues N          queues NAME-1..NAME-N (NAME from --queue); producers and consumers round-robin
--queue-pattern P   PerfTest's queue names: P with %d from --queue-pattern-from (1) to --queue-pattern-to
--queue-type T      declared with x-queue-type (quorum and stream: durable; stream: consumed from next)
--delete-queues     delete the queues at the end (they are purged at the start, streams excepted)
--connections N     producers and consumers round-robin over N connections (default: one each)
--channels M        ... and over M channels on each connection (default 1)
--mandatory         publish mandatory; returns are counted from the confirmations (needs --confirm)
--size BYTES        up to 64 MiB; the send time is in the body up to 64 KiB, in a header above
--json              progress on stderr, the summary as one JSON object on stdout
--rpc-from-block-on make --rpc's calls from block_on's future (the main thread), not a spawned task
--raw-copy          then copy as many bytes as the bodies over plain loopback TCP, and compare
latency percentiles are measured when producers and consumers both run against a broker";

fn usage() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2)
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        url: std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
        peer: None,
        producers: 1,
        consumers: 0,
        size: 32,
        confirm: None,
        prefetch: 1000,
        multi_ack: 1,
        no_ack: false,
        duration: Duration::from_secs(10),
        messages: None,
        queues: Vec::new(),
        queue_type: QueueType::Classic,
        delete_queues: false,
        rate: None,
        mandatory: false,
        rpc: None,
        connections: 0,
        channels: 0,
        blocking: false,
        json: false,
        raw_copy: false,
        precise_pacing: false,
        rpc_from_block_on: false,
    };
    let mut queue: Option<String> = None;
    let mut queue_count: Option<u64> = None;
    let mut pattern: Option<String> = None;
    let (mut from, mut to) = (1u64, None::<u64>);
    let (mut connections, mut channels) = (None::<usize>, None::<usize>);
    let mut shared_connection = false;
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        let value = || {
            args.get(i + 1)
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let number = || {
            value()?
                .parse::<u64>()
                .map_err(|_| format!("{flag} takes a whole number"))
        };
        let positive = || match number()? {
            0 => Err(format!("{flag} must be at least 1")),
            n => Ok(n),
        };
        let mut switch = true;
        match flag {
            "--no-ack" => o.no_ack = true,
            "--mandatory" => o.mandatory = true,
            "--shared-connection" => shared_connection = true,
            "--delete-queues" => o.delete_queues = true,
            "--json" => o.json = true,
            "--raw-copy" => o.raw_copy = true,
            "--precise-pacing" => o.precise_pacing = true,
            "--rpc-from-block-on" => o.rpc_from_block_on = true,
            "--blocking" => {
                if !cfg!(feature = "blocking") {
                    return Err(
                        "--blocking needs the `blocking` feature: add --features blocking".into(),
                    );
                }
                o.blocking = true;
            }
            _ => switch = false,
        }
        if switch {
            i += 1;
            continue;
        }
        match flag {
            "--url" => o.url = value()?,
            "--peer" => {
                o.peer = Some(match value()?.as_str() {
                    "sink" => peer::Kind::Sink,
                    "flood" => peer::Kind::Flood,
                    other => return Err(format!("--peer is sink or flood, not {other}")),
                })
            }
            "--producers" => o.producers = number()? as usize,
            "--consumers" => o.consumers = number()? as usize,
            "--size" => o.size = number()? as usize,
            "--confirm" => o.confirm = Some(positive()? as usize),
            "--prefetch" => o.prefetch = number()?.min(65535) as u16,
            "--multi-ack" => o.multi_ack = positive()?,
            "--duration" => {
                o.duration = value()?
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or("--duration takes a positive number of seconds")?
            }
            "--messages" => o.messages = Some(number()?),
            "--rate" => {
                o.rate = Some(
                    value()?
                        .parse::<f64>()
                        .ok()
                        .filter(|r| r.is_finite() && *r > 0.0)
                        .ok_or("--rate takes a positive number of messages per second")?,
                )
            }
            "--queue" => queue = Some(value()?),
            "--queues" => queue_count = Some(positive()?),
            "--queue-pattern" => pattern = Some(value()?),
            "--queue-pattern-from" => from = number()?,
            "--queue-pattern-to" => to = Some(number()?),
            "--queue-type" => {
                o.queue_type = match value()?.as_str() {
                    "classic" => QueueType::Classic,
                    "quorum" => QueueType::Quorum,
                    "stream" => QueueType::Stream,
                    other => {
                        return Err(format!(
                            "--queue-type is classic, quorum or stream, not {other}"
                        ))
                    }
                }
            }
            "--connections" => connections = Some(positive()? as usize),
            "--channels" => channels = Some(positive()? as usize),
            "--rpc" => o.rpc = Some(positive()?),
            _ => return Err(format!("unknown argument {flag}")),
        }
        i += 2;
    }
    let given = |name: &str| args.iter().any(|a| a == name);
    if o.peer == Some(peer::Kind::Flood) && !given("--producers") {
        // The flood peer is the producer.
        o.producers = 0;
        o.consumers = o.consumers.max(1);
    }

    // Queue names: PerfTest's --queue-pattern, or --queues N as NAME-1..NAME-N.
    let base = queue.unwrap_or_else(|| match o.queue_type {
        // A queue's type is fixed when it is declared: each type its own default name.
        QueueType::Classic => "amqp-client.perf".to_owned(),
        other => format!("amqp-client.perf-{}", other.as_str()),
    });
    o.queues = match (pattern, queue_count) {
        (Some(_), Some(_)) => return Err("--queues and --queue-pattern exclude each other".into()),
        (Some(pattern), None) => {
            if !pattern.contains("%d") {
                return Err("--queue-pattern needs a %d for the number".into());
            }
            let to = to.ok_or("--queue-pattern needs --queue-pattern-to")?;
            if to < from {
                return Err("--queue-pattern-to is below --queue-pattern-from".into());
            }
            (from..=to)
                .map(|n| pattern.replace("%d", &n.to_string()))
                .collect()
        }
        (None, Some(1)) => vec![base],
        (None, Some(n)) => (1..=n).map(|n| format!("{base}-{n}")).collect(),
        (None, None) => vec![base],
    };
    if (given("--queue-pattern-from") || given("--queue-pattern-to")) && !given("--queue-pattern") {
        return Err("--queue-pattern-from/--queue-pattern-to need --queue-pattern".into());
    }

    // Connections and channels: by default one connection per producer and
    // consumer; --shared-connection is one connection with a channel each.
    let workers = (o.producers + o.consumers).max(1);
    if shared_connection && (connections.is_some() || channels.is_some()) {
        return Err(
            "--shared-connection is --connections 1 --channels N: give one or the other".into(),
        );
    }
    (o.connections, o.channels) = match (shared_connection, connections, channels) {
        (true, _, _) => (1, workers),
        (false, None, None) => (workers, 1),
        (false, c, m) => (c.unwrap_or(1), m.unwrap_or(1)),
    };

    if o.size > SIZE_MAX {
        return Err(format!("--size is at most {SIZE_MAX} (64 MiB)"));
    }
    if o.mandatory && o.confirm.is_none() {
        return Err("--mandatory counts returns from the confirmations: add --confirm".into());
    }
    if o.queue_type == QueueType::Stream {
        if o.no_ack {
            return Err("a stream is consumed with manual acks: drop --no-ack".into());
        }
        if o.prefetch == 0 {
            return Err("a stream is consumed with a prefetch: --prefetch 1 or more".into());
        }
    }
    if let Some(kind) = o.peer {
        if o.queue_type != QueueType::Classic {
            return Err("--queue-type means nothing to a peer: use it against a broker".into());
        }
        if kind == peer::Kind::Flood && o.rate.is_some() {
            return Err("the flood peer is the producer: --rate means nothing to it".into());
        }
        if kind == peer::Kind::Sink && o.consumers > 0 {
            return Err("the sink peer delivers nothing: no --consumers with it".into());
        }
    }
    if o.blocking && (connections.is_some() || channels.is_some() || shared_connection) {
        return Err("--blocking gives each producer and consumer a connection of its own: no --connections, --channels or --shared-connection".into());
    }
    if o.rpc_from_block_on && o.rpc.is_none() {
        return Err("--rpc-from-block-on is about --rpc: give a number of round trips".into());
    }
    if o.precise_pacing && o.rate.is_none() {
        return Err("--precise-pacing paces --rate: give a rate".into());
    }
    if o.rpc.is_some() && (o.rate.is_some() || o.blocking) {
        return Err("--rpc measures round trips: no --rate or --blocking with it".into());
    }
    Ok(o)
}

/// Where a producer puts the send time and where its consumer reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    Body,
    Header,
}

/// How messages are stamped, when both sides run in this process.
fn stamp(o: &Options) -> Option<Stamp> {
    if o.producers == 0 || o.consumers == 0 || o.peer.is_some() {
        None
    } else if (8..=STAMP_IN_BODY_MAX).contains(&o.size) {
        Some(Stamp::Body)
    } else {
        Some(Stamp::Header)
    }
}

/// The queues of worker `index` of `workers`: every `workers`-th from its
/// index, so that all queues are used when there are fewer workers than
/// queues, and workers share queues when there are more.
fn queues_of(queues: &[String], index: usize, workers: usize) -> Vec<String> {
    if workers >= queues.len() {
        vec![queues[index % queues.len()].clone()]
    } else {
        queues
            .iter()
            .skip(index)
            .step_by(workers)
            .cloned()
            .collect()
    }
}

fn consume_arguments(o: &Options) -> FieldTable {
    if o.queue_type == QueueType::Stream {
        // Only what is published during the run: a stream keeps earlier runs' messages.
        ConsumeArguments::new()
            .stream_offset(StreamOffset::Next)
            .into()
    } else {
        FieldTable::new()
    }
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after ')'.
    let hz = 100; // USER_HZ is 100 on Linux
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

/// Peak resident set size in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn start_peer(kind: peer::Kind, size: usize) -> (Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let child = Command::new(std::env::current_exe().expect("own path"))
        .args([
            "serve",
            if kind == peer::Kind::Sink {
                "sink"
            } else {
                "flood"
            },
            &port.to_string(),
            &size.to_string(),
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("start the peer");
    let mut child = child;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (child, port);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the peer did not start");
}

struct Counters {
    published: AtomicU64,
    confirmed: AtomicU64,
    nacked: AtomicU64,
    returned: AtomicU64,
    consumed: AtomicU64,
    stop: AtomicBool,
    latencies: Mutex<Histogram>,
}

impl Counters {
    fn record_confirmation(&self, confirmation: Confirmation) {
        match confirmation {
            Confirmation::Ack | Confirmation::NotRequested => &self.confirmed,
            Confirmation::Nack => &self.nacked,
            Confirmation::Returned(_) => &self.returned,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

/// What a producer sends: one body shared by every publish, stamped with the
/// send time where a consumer measures latency.
struct Payload {
    template: Bytes,
    stamp: Option<Stamp>,
    properties: BasicProperties,
}

impl Payload {
    fn new(size: usize, stamp: Option<Stamp>) -> Self {
        Self {
            template: Bytes::from(vec![b'x'; size]),
            stamp,
            properties: BasicProperties::default(),
        }
    }

    /// The body and properties of the next message, sent now.
    fn next(&self, epoch: Instant) -> (Bytes, BasicProperties) {
        let now = epoch.elapsed().as_nanos() as u64;
        match self.stamp {
            None => (self.template.clone(), self.properties.clone()),
            Some(Stamp::Body) => {
                let mut body = BytesMut::with_capacity(self.template.len());
                body.put_u64(now);
                body.extend_from_slice(&self.template[8..]);
                (body.freeze(), self.properties.clone())
            }
            Some(Stamp::Header) => {
                let properties = BasicProperties {
                    headers: Some(FieldTable::new().with(SENT_HEADER, now as i64)),
                    ..self.properties.clone()
                };
                (self.template.clone(), properties)
            }
        }
    }
}

/// The send time stamped in a delivery, in ns since `epoch`.
fn sent_at(stamp: Stamp, body: &[u8], properties: &BasicProperties) -> Option<u64> {
    match stamp {
        Stamp::Body => body
            .get(..8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default())),
        Stamp::Header => properties
            .headers
            .as_ref()?
            .get(SENT_HEADER)?
            .as_i64()
            .map(|ns| ns as u64),
    }
}

async fn producer(
    channel: Channel,
    queues: Vec<String>,
    o: Options,
    counters: Arc<Counters>,
    epoch: Instant,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), amqp091::Error> {
    if o.confirm.is_some() {
        channel.confirm_select(confirm::Select::default()).await?;
    }
    let mut outstanding = std::collections::VecDeque::new();
    let payload = Payload::new(o.size, stamp(&o));
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    while !counters.stop.load(Ordering::Relaxed) {
        if o.messages
            .is_some_and(|m| counters.published.load(Ordering::Relaxed) >= m)
        {
            break;
        }
        if let Some(rate) = o.rate {
            // The deadline of this publish, from the start rather than from
            // the last publish, so that late wake-ups do not add up (the next
            // publishes catch up at once). Tokio's timer has a 1 ms
            // resolution: above 1000 msg/s messages leave in bursts of
            // rate/1000 each millisecond, unless --precise-pacing.
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            let now = tokio::time::Instant::now();
            if o.precise_pacing && due > now && due - now < Duration::from_millis(2) {
                // The last stretch slept by the thread itself (tens of µs
                // of slack instead of the timer's 1 ms steps), its worker
                // handed to the runtime meanwhile: even spacing, more CPU.
                let wait = due - now;
                match tokio::runtime::Handle::current().runtime_flavor() {
                    tokio::runtime::RuntimeFlavor::CurrentThread => std::thread::sleep(wait),
                    _ => tokio::task::block_in_place(|| std::thread::sleep(wait)),
                }
            } else if due > now {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    // A slow rate must not hold the end of the run.
                    _ = stop.wait_for(|stop| *stop) => break,
                }
            }
        }
        let (body, properties) = payload.next(epoch);
        let queue = &queues[sent as usize % queues.len()];
        let confirm = channel
            .basic_publish("", queue.as_str(), o.mandatory, &properties, body)
            .await?;
        sent += 1;
        counters.published.fetch_add(1, Ordering::Relaxed);
        if let Some(window) = o.confirm {
            outstanding.push_back(confirm);
            if outstanding.len() >= window {
                if let Some(oldest) = outstanding.pop_front() {
                    counters.record_confirmation(oldest.await?);
                }
            }
        }
    }
    for confirm in outstanding {
        counters.record_confirmation(confirm.await?);
    }
    Ok(())
}

async fn consumer(
    channel: Channel,
    queue: String,
    o: Options,
    counters: Arc<Counters>,
    epoch: Instant,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), amqp091::Error> {
    channel
        .basic_qos(basic::Qos {
            prefetch_count: o.prefetch,
            ..Default::default()
        })
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str(),
            ConsumeOptions {
                no_ack: o.no_ack,
                arguments: consume_arguments(&o),
                ..Default::default()
            },
        )
        .await?;
    let mut latencies = Histogram::default();
    let stamp = stamp(&o);
    let mut n = 0u64;
    loop {
        // At a fixed rate the queue runs dry: stop when told, not at the next delivery.
        let delivery = tokio::select! {
            delivery = consumer.next() => delivery,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let Some(delivery) = delivery else { break };
        let delivery = delivery?;
        n += 1;
        if let Some(stamp) = stamp {
            if let Some(sent) = sent_at(stamp, &delivery.body, delivery.properties.get()) {
                latencies.record((epoch.elapsed().as_nanos() as u64).saturating_sub(sent));
            }
        }
        if !o.no_ack && n % o.multi_ack == 0 {
            if o.multi_ack == 1 {
                delivery.ack().await?;
            } else {
                delivery.ack_multiple().await?;
            }
        }
        counters.consumed.fetch_add(1, Ordering::Relaxed);
        if o.messages.is_some_and(|m| n >= m) {
            break;
        }
    }
    if let Ok(mut all) = counters.latencies.lock() {
        all.merge(&latencies);
    }
    Ok(())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

/// Sequential passive declares: the latency of one synchronous call.
async fn rpc_round_trips(
    connection: &Connection,
    o: &Options,
    round_trips: u64,
) -> Result<serde_json::Value, amqp091::Error> {
    let channel = connection.open_channel().await?;
    let declare = queue::Declare {
        queue: o.queues[0].as_str().into(),
        passive: true,
        ..Default::default()
    };
    // Warm up the connection and the broker's code paths.
    for _ in 0..1000 {
        channel.queue_declare(declare.clone()).await?;
    }
    let cpu_before = cpu_time();
    let started = Instant::now();
    let mut times = Vec::with_capacity(round_trips as usize);
    for _ in 0..round_trips {
        let t = Instant::now();
        channel.queue_declare(declare.clone()).await?;
        times.push(t.elapsed().as_nanos() as u64);
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    times.sort_unstable();
    let cpu_us = cpu.as_secs_f64() * 1e6 / round_trips as f64;
    let say = |line: String| say(o.json, line);
    say(format!(
        "results: {round_trips} passive queue.declare round trips in {:.2} s",
        elapsed.as_secs_f64()
    ));
    say(format!(
        "  round trip: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        percentile(&times, 0.5),
        percentile(&times, 0.9),
        percentile(&times, 0.99),
        percentile(&times, 1.0)
    ));
    say(format!("  client CPU {cpu_us:.2} µs per round trip"));
    let _ = connection.close().await;
    Ok(json!({
        "rpc_round_trips": round_trips,
        "elapsed_s": elapsed.as_secs_f64(),
        "round_trip_us": {
            "p50": percentile(&times, 0.5),
            "p90": percentile(&times, 0.9),
            "p99": percentile(&times, 0.99),
            "max": percentile(&times, 1.0),
        },
        "cpu_us_per_round_trip": cpu_us,
    }))
}

/// A line of human-readable output: stdout, or stderr when stdout is for JSON.
fn say(json: bool, line: String) {
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        let kind = match args.get(2).map(String::as_str) {
            Some("sink") => peer::Kind::Sink,
            Some("flood") => peer::Kind::Flood,
            _ => usage(),
        };
        let port = args
            .get(3)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| usage());
        let size = args.get(4).and_then(|p| p.parse().ok()).unwrap_or(32);
        let limit = args.get(5).and_then(|p| p.parse().ok());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        if let Err(e) = runtime.block_on(peer::serve(kind, port, size, limit)) {
            eprintln!("peer: {e}");
        }
        return;
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}\n\n{HELP}");
        return;
    }
    let mut o = parse(&args[1..]).unwrap_or_else(|message| {
        eprintln!("perf: {message}");
        usage()
    });
    #[cfg(feature = "metrics")]
    let snapshotter = {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the only recorder");
        amqp091::telemetry::describe();
        snapshotter
    };
    let mut child = None;
    if let Some(kind) = o.peer {
        let (process, port) = start_peer(kind, o.size);
        o.url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
        child = Some(process);
    }
    // PERF_THREADS=1 runs everything on one thread (no cross-thread wake-ups).
    let threads: usize = std::env::var("PERF_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .expect("runtime");
    let result = runtime.block_on(run(o.clone()));
    #[cfg(feature = "metrics")]
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if let metrics_util::debugging::DebugValue::Counter(n) = value {
            println!("  {} = {n}", key.key());
        }
    }
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
    match result {
        Ok(summary) if o.json => println!("{summary}"),
        Ok(_) => {}
        Err(e) => {
            eprintln!("perf: {e}");
            std::process::exit(1);
        }
    }
}

async fn declare_queues(connection: &Connection, o: &Options) -> Result<(), amqp091::Error> {
    let setup = connection.open_channel().await?;
    for queue in &o.queues {
        setup
            .queue_declare(queue::Declare {
                queue: queue.as_str().into(),
                // Quorum queues and streams are always durable.
                durable: o.queue_type != QueueType::Classic,
                arguments: if o.queue_type == QueueType::Classic {
                    FieldTable::new()
                } else {
                    QueueArguments::new().queue_type(o.queue_type).into()
                },
                ..Default::default()
            })
            .await?;
        // A stream cannot be purged; its consumers start at the next offset instead.
        if o.queue_type != QueueType::Stream {
            setup
                .queue_purge(queue::Purge {
                    queue: queue.as_str().into(),
                    ..Default::default()
                })
                .await?;
        }
    }
    let _ = setup.close().await;
    Ok(())
}

async fn delete_queues(connection: &Connection, o: &Options) -> Result<(), amqp091::Error> {
    let setup = connection.open_channel().await?;
    for queue in &o.queues {
        setup
            .queue_delete(queue::Delete {
                queue: queue.as_str().into(),
                ..Default::default()
            })
            .await?;
    }
    Ok(())
}

/// The channel of worker `worker`: round-robin over the connections, then
/// over the channels of each, opened on first use and shared after.
async fn channel_for(
    worker: usize,
    o: &Options,
    connections: &[Connection],
    channels: &mut HashMap<usize, Channel>,
) -> Result<Channel, amqp091::Error> {
    let connection = worker % connections.len();
    let slot = connection * o.channels + (worker / connections.len()) % o.channels;
    if let Some(channel) = channels.get(&slot) {
        return Ok(channel.clone());
    }
    let channel = connections[connection].open_channel().await?;
    channels.insert(slot, channel.clone());
    Ok(channel)
}

async fn run(o: Options) -> Result<serde_json::Value, amqp091::Error> {
    let config: Config = o.url.parse()?;
    // The URL may hold a password: print only where it points.
    let address = config.address();
    let config = config.recovery(RecoveryConfig::disabled());
    let connection = Connection::connect(config.clone()).await?;
    declare_queues(&connection, &o).await?;
    let target = o.peer.map_or(address, |k| format!("the {k:?} peer"));
    say(
        o.json,
        format!(
            "perf: {} producer(s), {} consumer(s), {} B messages, confirm {:?}, prefetch {}, \
             rate {}, {} {} queue(s), {} connection(s) × {} channel(s), against {target}",
            o.producers,
            o.consumers,
            o.size,
            o.confirm,
            o.prefetch,
            o.rate
                .map_or("unlimited".to_owned(), |r| format!("{r}/s per producer")),
            o.queues.len(),
            o.queue_type.as_str(),
            o.connections,
            o.channels,
        ),
    );
    let parameters = json!({
        "target": target,
        "producers": o.producers,
        "consumers": o.consumers,
        "size": o.size,
        "confirm": o.confirm,
        "mandatory": o.mandatory,
        "prefetch": o.prefetch,
        "multi_ack": o.multi_ack,
        "no_ack": o.no_ack,
        "rate_per_producer": o.rate,
        "queues": o.queues,
        "queue_type": o.queue_type.as_str(),
        "connections": o.connections,
        "channels_per_connection": o.channels,
        "blocking": o.blocking,
        "duration_s": o.duration.as_secs_f64(),
        "messages": o.messages,
    });
    if let Some(round_trips) = o.rpc {
        // From a spawned task, as latency-sensitive callers should (see the
        // README); --rpc-from-block-on measures calls from `block_on`'s
        // future, which on the multi-thread runtime is not on a worker.
        let mut summary = if o.rpc_from_block_on {
            rpc_round_trips(&connection, &o, round_trips).await?
        } else {
            let (connection, options) = (connection.clone(), o.clone());
            tokio::spawn(async move { rpc_round_trips(&connection, &options, round_trips).await })
                .await
                .expect("the round trips' task")?
        };
        summary["parameters"] = parameters;
        return Ok(summary);
    }
    let counters = Arc::new(Counters {
        published: AtomicU64::new(0),
        confirmed: AtomicU64::new(0),
        nacked: AtomicU64::new(0),
        returned: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        latencies: Mutex::new(Histogram::default()),
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let epoch = Instant::now();
    let cpu_before = cpu_time();
    #[cfg_attr(not(feature = "blocking"), allow(unused_mut))]
    let mut threads: Vec<std::thread::JoinHandle<Result<(), amqp091::Error>>> = Vec::new();
    let mut tasks = Vec::new();
    #[cfg(feature = "blocking")]
    if o.blocking {
        for index in 0..o.consumers {
            let queues = queues_of(&o.queues, index, o.consumers);
            for queue in queues {
                let (o, counters, config) = (o.clone(), counters.clone(), config.clone());
                threads.push(std::thread::spawn(move || {
                    blocking::consumer(config, queue, o, counters, epoch)
                }));
            }
        }
        for index in 0..o.producers {
            let queues = queues_of(&o.queues, index, o.producers);
            let (o, counters, config) = (o.clone(), counters.clone(), config.clone());
            threads.push(std::thread::spawn(move || {
                blocking::producer(config, queues, o, counters, epoch)
            }));
        }
    }
    let (consumers, producers) = if o.blocking {
        (0, 0)
    } else {
        (o.consumers, o.producers)
    };
    // Consumers first, then producers, round-robin over the connections,
    // then over the channels of each.
    let mut connections = Vec::with_capacity(o.connections);
    for _ in 0..o.connections.min(consumers + producers) {
        connections.push(Connection::connect(config.clone()).await?);
    }
    let mut channels: HashMap<usize, Channel> = HashMap::new();
    for index in 0..consumers {
        let channel = channel_for(index, &o, &connections, &mut channels).await?;
        for queue in queues_of(&o.queues, index, consumers) {
            tasks.push(tokio::spawn(consumer(
                channel.clone(),
                queue,
                o.clone(),
                counters.clone(),
                epoch,
                stopped.clone(),
            )));
        }
    }
    for index in 0..producers {
        tasks.push(tokio::spawn(producer(
            channel_for(consumers + index, &o, &connections, &mut channels).await?,
            queues_of(&o.queues, index, producers),
            o.clone(),
            counters.clone(),
            epoch,
            stopped.clone(),
        )));
    }
    let started = Instant::now();
    let mut last = (0u64, 0u64);
    let mut second = 0;
    loop {
        // Each second from the start (not from the last print), and no later
        // than the end; a run of `--messages` is looked at every 10 ms, so
        // that it ends (and is timed) when its last message is.
        let next_second = Duration::from_secs(second + 1).min(o.duration);
        let due = match o.messages {
            Some(_) => next_second.min(started.elapsed() + Duration::from_millis(10)),
            None => next_second,
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(started + due)).await;
        let published = counters.published.load(Ordering::Relaxed);
        let consumed = counters.consumed.load(Ordering::Relaxed);
        if due == next_second {
            second += 1;
            say(
                o.json,
                format!(
                    "  {:>4.0} s: sent {:>9}/s, received {:>9}/s",
                    started.elapsed().as_secs_f64(),
                    published - last.0,
                    consumed - last.1
                ),
            );
            last = (published, consumed);
        }
        let done_by_count = o.messages.is_some_and(|m| {
            (o.producers == 0 || published >= m) && (o.consumers == 0 || consumed >= m)
        });
        let all_finished =
            tasks.iter().all(|t| t.is_finished()) && threads.iter().all(|t| t.is_finished());
        if started.elapsed() >= o.duration || done_by_count || all_finished {
            break;
        }
    }
    counters.stop.store(true, Ordering::Relaxed);
    let _ = stop.send(true);
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    // Producers finish their outstanding confirms; consumers stop now.
    let mut failures = Vec::new();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Err(e))) => failures.push(e.to_string()),
            Ok(Err(e)) => failures.push(format!("a task panicked: {e}")),
            Ok(Ok(Ok(()))) | Err(_) => {}
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !threads.iter().all(|t| t.is_finished()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for thread in threads.into_iter().filter(|t| t.is_finished()) {
        if let Ok(Err(e)) = thread.join() {
            failures.push(e.to_string());
        }
    }
    for failure in &failures {
        say(
            o.json,
            format!("  a producer or consumer failed: {failure}"),
        );
    }
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let published = count(&counters.published);
    let consumed = count(&counters.consumed);
    let messages = published.max(consumed).max(1);
    let seconds = elapsed.as_secs_f64();
    let cpu_us = cpu.as_secs_f64() * 1e6 / messages as f64;
    say(o.json, format!("results over {seconds:.1} s:"));
    say(
        o.json,
        format!(
            "  published {published} ({:.0} msg/s), confirmed {}, nacked {}, returned {}",
            published as f64 / seconds,
            count(&counters.confirmed),
            count(&counters.nacked),
            count(&counters.returned),
        ),
    );
    say(
        o.json,
        format!(
            "  consumed  {consumed} ({:.0} msg/s)",
            consumed as f64 / seconds
        ),
    );
    say(
        o.json,
        format!(
            "  client CPU {:.2} s = {cpu_us:.2} µs per message",
            cpu.as_secs_f64()
        ),
    );
    // Body bytes per second, the way the larger of the two sides counts them.
    let body_bytes_per_s = messages as f64 * o.size as f64 / seconds;
    say(
        o.json,
        format!("  bodies {:.0} MB/s", body_bytes_per_s / 1e6),
    );
    let peak_rss = peak_rss_kib();
    say(o.json, format!("  peak RSS {} MiB", peak_rss / 1024));
    let raw_copy = if o.raw_copy {
        let bytes = messages * o.size as u64;
        let size = o.size;
        let copied = tokio::task::spawn_blocking(move || raw_copy::run(bytes, size))
            .await
            .expect("raw copy")
            .map_err(|e| amqp091::Error::ConnectionLost(Arc::new(e)))?;
        let raw_per_s = copied.bytes_per_s();
        say(
            o.json,
            format!(
                "  raw loopback TCP copy of {} MB: {:.0} MB/s, {:.2} s CPU; the run reached {:.0}% of it",
                bytes / 1_000_000,
                raw_per_s / 1e6,
                copied.cpu.as_secs_f64(),
                100.0 * body_bytes_per_s / raw_per_s
            ),
        );
        Some(json!({
            "bytes": bytes,
            "bytes_per_s": raw_per_s,
            "cpu_s": copied.cpu.as_secs_f64(),
            "run_fraction": body_bytes_per_s / raw_per_s,
        }))
    } else {
        None
    };
    let latency = counters
        .latencies
        .lock()
        .ok()
        .filter(|h| h.count() > 0)
        .map(|h| {
            let us = |ns: u64| ns as f64 / 1000.0;
            let p = |q: f64| us(h.quantile(q));
            say(
                o.json,
                format!(
                    "  latency publish → deliver ({} samples): p50 {:.0} µs, p90 {:.0} µs, \
                     p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs",
                    h.count(),
                    p(0.5),
                    p(0.9),
                    p(0.99),
                    p(0.999),
                    us(h.max())
                ),
            );
            json!({
                "samples": h.count(),
                "p50": p(0.5),
                "p90": p(0.9),
                "p99": p(0.99),
                "p99_9": p(0.999),
                "max": us(h.max()),
            })
        });
    for connection in connections {
        let _ = tokio::time::timeout(Duration::from_secs(5), connection.close()).await;
    }
    if o.delete_queues && o.peer.is_none() {
        if let Err(e) = delete_queues(&connection, &o).await {
            say(o.json, format!("  deleting the queues failed: {e}"));
        }
    }
    // close() flushes what is still queued in the client before the close.
    let closing = Instant::now();
    match tokio::time::timeout(Duration::from_secs(30), connection.close()).await {
        Ok(Ok(())) => say(
            o.json,
            format!("  closed in {:.2} s", closing.elapsed().as_secs_f64()),
        ),
        Ok(Err(e)) => say(o.json, format!("  close failed: {e}")),
        Err(_) => say(o.json, "  close timed out".to_owned()),
    }
    Ok(json!({
        "parameters": parameters,
        "elapsed_s": seconds,
        "published": published,
        "consumed": consumed,
        "confirmed": count(&counters.confirmed),
        "nacked": count(&counters.nacked),
        "returned": count(&counters.returned),
        "sent_msg_s": published as f64 / seconds,
        "received_msg_s": consumed as f64 / seconds,
        "confirmed_msg_s": count(&counters.confirmed) as f64 / seconds,
        "cpu_s": cpu.as_secs_f64(),
        "cpu_us_per_msg": cpu_us,
        "peak_rss_kib": peak_rss,
        "body_bytes_per_s": body_bytes_per_s,
        "raw_copy": raw_copy,
        "latency_us": latency,
        "failures": failures,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn meaningless_combinations_are_usage_errors() {
        for line in [
            "--peer sink --queue-type quorum",
            "--peer flood --rate 100",
            "--peer sink --consumers 1",
            "--queue-type stream --no-ack",
            "--queue-type stream --prefetch 0",
            "--mandatory",
            "--shared-connection --channels 2",
            "--queues 2 --queue-pattern q-%d --queue-pattern-to 3",
            "--queue-pattern q --queue-pattern-to 3",
            "--queue-pattern q-%d",
            "--queue-pattern-to 3",
            "--size 67108865",
            "--rate 0",
            "--rate fast",
            "--connections 0",
            "--rpc 10 --rate 10",
            "--precise-pacing",
            "--rpc-from-block-on",
            "--queue-type lazy",
        ] {
            assert!(parse(&args(line)).is_err(), "accepted: {line}");
        }
        assert!(parse(&args("--size 67108864 --queue-type stream --rate 0.5")).is_ok());
    }

    #[test]
    fn queues_come_from_a_count_or_a_pattern() {
        let o = parse(&args("--queue q --queues 3")).unwrap();
        assert_eq!(o.queues, ["q-1", "q-2", "q-3"]);
        let o = parse(&args(
            "--queue-pattern perf-%d --queue-pattern-from 5 --queue-pattern-to 6",
        ))
        .unwrap();
        assert_eq!(o.queues, ["perf-5", "perf-6"]);
        let o = parse(&args("--queue-type quorum")).unwrap();
        assert_eq!(o.queues, ["amqp-client.perf-quorum"]);
    }

    #[test]
    fn every_queue_has_a_worker_and_workers_share_queues_round_robin() {
        let queues: Vec<String> = ["a", "b", "c"].map(String::from).into();
        assert_eq!(queues_of(&queues, 0, 2), ["a", "c"]);
        assert_eq!(queues_of(&queues, 1, 2), ["b"]);
        assert_eq!(queues_of(&queues, 4, 5), ["b"]);
    }

    #[test]
    fn connections_and_channels_default_to_one_connection_per_worker() {
        let o = parse(&args("--producers 2 --consumers 3")).unwrap();
        assert_eq!((o.connections, o.channels), (5, 1));
        let o = parse(&args("--producers 2 --consumers 3 --shared-connection")).unwrap();
        assert_eq!((o.connections, o.channels), (1, 5));
        let o = parse(&args("--connections 2 --channels 3")).unwrap();
        assert_eq!((o.connections, o.channels), (2, 3));
    }

    #[test]
    fn the_send_time_travels_in_the_body_or_in_a_header() {
        let epoch = Instant::now() - Duration::from_secs(1);
        for (size, expected) in [
            (32, Stamp::Body),
            (4, Stamp::Header),
            (1 << 20, Stamp::Header),
        ] {
            let o = parse(&args(&format!("--consumers 1 --size {size}"))).unwrap();
            assert_eq!(stamp(&o), Some(expected));
            let payload = Payload::new(size, stamp(&o));
            let (body, properties) = payload.next(epoch);
            assert_eq!(body.len(), size);
            let sent = sent_at(expected, &body, &properties).expect("a send time");
            assert!((1_000_000_000..10_000_000_000).contains(&sent), "{sent}");
            if expected == Stamp::Header {
                // The body is the shared one, not a copy per message.
                assert_eq!(body.as_ptr(), payload.template.as_ptr());
            }
        }
    }

    /// Against the broker at AMQP_URL: fails when there is none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_at_a_fixed_rate_over_quorum_queues_reports_latency_as_json() {
        let base = format!(
            "amqp-client.perf-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        );
        let rate = 200.0;
        let o = parse(&args(&format!(
            "--producers 3 --consumers 3 --rate {rate} --queue {base} --queues 3 \
             --connections 2 --channels 2 --queue-type quorum --duration 2 --delete-queues --json"
        )))
        .unwrap();
        let summary = run(o.clone()).await.expect("the run against the broker");
        // What `--json` prints: one line holding one object.
        let line = summary.to_string();
        assert!(!line.contains('\n'));
        let summary: serde_json::Value = serde_json::from_str(&line).unwrap();

        assert_eq!(summary["failures"], json!([]), "{summary}");
        let asked = rate * 3.0;
        let received = summary["received_msg_s"].as_f64().unwrap();
        assert!(
            received > asked * 0.5 && received < asked * 1.5,
            "received {received} msg/s at {asked} asked: {summary}"
        );
        let sent = summary["sent_msg_s"].as_f64().unwrap();
        assert!(sent > asked * 0.8 && sent < asked * 1.2, "{summary}");
        let latency = &summary["latency_us"];
        let p = |name: &str| latency[name].as_f64().unwrap_or(f64::NAN);
        assert!(
            0.0 < p("p50") && p("p50") <= p("p90") && p("p90") <= p("p99"),
            "{latency}"
        );
        assert!(
            p("p99") <= p("p99_9") && p("p99_9") <= p("max"),
            "{latency}"
        );
        assert!(latency["samples"].as_u64().unwrap() > 0);
        let parameters = &summary["parameters"];
        assert_eq!(parameters["queue_type"], "quorum");
        assert_eq!(parameters["queues"].as_array().map(Vec::len), Some(3));
        assert_eq!(parameters["connections"], 2);
        assert_eq!(parameters["channels_per_connection"], 2);

        // --delete-queues removed what the run declared.
        let connection = Connection::connect(o.url.parse::<Config>().unwrap())
            .await
            .unwrap();
        for queue in &o.queues {
            let channel = connection.open_channel().await.unwrap();
            let passive = channel
                .queue_declare(queue::Declare {
                    queue: queue.as_str().into(),
                    passive: true,
                    ..Default::default()
                })
                .await;
            assert!(passive.is_err(), "{queue} is still there");
        }
        let _ = connection.close().await;
    }
}
