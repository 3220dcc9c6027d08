//! A PerfTest-style bench tool: producers, consumers, message size, confirm
//! window, prefetch, duration or message count, against any URL or against a
//! built-in peer that costs almost nothing (`--peer sink` / `--peer flood`,
//! run as a child process so that its CPU is not counted as the client's).
//!
//! ```text
//! cargo run --release -p amqp091 --example perf -- --peer sink --producers 1 --size 32 --duration 10
//! cargo run --release -p amqp091 --example perf -- --peer sink --confirm 1000
//! cargo run --release -p amqp091 --example perf -- --peer flood --consumers 1 --prefetch 1000
//! cargo run --release -p amqp091 --example perf -- --url amqp://127.0.0.1 --producers 1 --consumers 1
//! # each producer and consumer has a connection of its own; --shared-connection puts them on one
//! cargo run --release -p amqp091 --features blocking --example perf -- --peer sink --blocking
//! # --blocking: producers and consumers on threads, through amqp091::blocking
//! cargo run --release -p amqp091 --features metrics --example perf -- --peer sink
//! # with the `metrics` feature: into a debugging recorder, whose counters are printed at the end
//! ```
//!
//! Prints progress each second, then msgs/s, client CPU per message (user +
//! system time of this process, from /proc/self/stat), peak RSS, and
//! publish → deliver latency percentiles when both sides run.

#[cfg(feature = "blocking")]
mod blocking;
mod peer;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp091::prelude::*;
use amqp091::{BasicProperties, Config, Connection, ConsumeOptions, RecoveryConfig};
use bytes::{BufMut, Bytes, BytesMut};

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
    queue: String,
    /// Instead of messages: this many sequential passive `queue.declare` round trips.
    rpc: Option<u64>,
    /// All producers and consumers on one connection. By default each has
    /// its own, as PerfTest does: RabbitMQ's flow control throttles a
    /// connection that publishes faster than its queues take, and on a
    /// shared connection that holds back the consumers' acks too.
    shared_connection: bool,
    /// Producers and consumers through `amqp091::blocking`, each on a
    /// thread with a connection of its own (feature `blocking`).
    blocking: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: perf [--url URL | --peer sink|flood] [--producers N] [--consumers N] [--size BYTES]\n\
         \x20           [--confirm WINDOW] [--prefetch N] [--multi-ack N] [--no-ack]\n\
         \x20           [--duration SECONDS] [--messages N] [--queue NAME] [--rpc ROUND_TRIPS]\n\
         \x20           [--shared-connection] [--blocking]\n\
         \x20      perf serve sink|flood PORT SIZE"
    );
    std::process::exit(2)
}

fn parse() -> Options {
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
        queue: "amqp-client.perf".to_owned(),
        rpc: None,
        shared_connection: false,
        blocking: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let value = |i: usize| args.get(i + 1).cloned().unwrap_or_else(|| usage());
    while i < args.len() {
        let number = |i: usize| value(i).parse::<u64>().unwrap_or_else(|_| usage());
        match args[i].as_str() {
            "--url" => o.url = value(i),
            "--peer" => {
                o.peer = Some(match value(i).as_str() {
                    "sink" => peer::Kind::Sink,
                    "flood" => peer::Kind::Flood,
                    _ => usage(),
                })
            }
            "--producers" => o.producers = number(i) as usize,
            "--consumers" => o.consumers = number(i) as usize,
            "--size" => o.size = number(i) as usize,
            "--confirm" => o.confirm = Some(number(i).max(1) as usize),
            "--prefetch" => o.prefetch = number(i).min(65535) as u16,
            "--multi-ack" => o.multi_ack = number(i).max(1),
            "--duration" => {
                o.duration = Duration::from_secs_f64(value(i).parse().unwrap_or_else(|_| usage()))
            }
            "--messages" => o.messages = Some(number(i)),
            "--queue" => o.queue = value(i),
            "--rpc" => o.rpc = Some(number(i).max(1)),
            "--no-ack" => {
                o.no_ack = true;
                i += 1;
                continue;
            }
            "--shared-connection" => {
                o.shared_connection = true;
                i += 1;
                continue;
            }
            "--blocking" => {
                if !cfg!(feature = "blocking") {
                    eprintln!("--blocking needs the `blocking` feature: add --features blocking");
                    std::process::exit(2);
                }
                o.blocking = true;
                i += 1;
                continue;
            }
            _ => usage(),
        }
        i += 2;
    }
    if o.peer == Some(peer::Kind::Flood) && !args.iter().any(|a| a == "--producers") {
        // The flood peer is the producer.
        o.producers = 0;
        o.consumers = o.consumers.max(1);
    }
    o
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
    consumed: AtomicU64,
    stop: AtomicBool,
    latencies: std::sync::Mutex<Vec<u64>>,
}

fn body(size: usize, epoch: Instant) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(8));
    if size >= 8 {
        b.put_u64(epoch.elapsed().as_nanos() as u64);
        b.resize(size, b'x');
    } else {
        b.resize(size, b'x');
    }
    b.freeze()
}

async fn producer(
    connection: Connection,
    o: Options,
    counters: Arc<Counters>,
    epoch: Instant,
) -> Result<(), amqp091::Error> {
    let channel = connection.open_channel().await?;
    if o.confirm.is_some() {
        channel.confirm_select(confirm::Select::default()).await?;
    }
    let mut outstanding = std::collections::VecDeque::new();
    let properties = BasicProperties::default();
    // Without a consumer measuring latency, one body is shared by every
    // publish (as an application sending the same payload would).
    let stamped = o.consumers > 0 && o.size >= 8;
    let fixed = body(o.size, epoch);
    while !counters.stop.load(Ordering::Relaxed) {
        if o.messages
            .is_some_and(|m| counters.published.load(Ordering::Relaxed) >= m)
        {
            break;
        }
        let confirm = channel
            .basic_publish(
                "",
                &o.queue,
                false,
                &properties,
                if stamped {
                    body(o.size, epoch)
                } else {
                    fixed.clone()
                },
            )
            .await?;
        counters.published.fetch_add(1, Ordering::Relaxed);
        if let Some(window) = o.confirm {
            outstanding.push_back(confirm);
            if outstanding.len() >= window {
                if let Some(oldest) = outstanding.pop_front() {
                    oldest.await?;
                    counters.confirmed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    for confirm in outstanding {
        confirm.await?;
        counters.confirmed.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

async fn consumer(
    connection: Connection,
    o: Options,
    counters: Arc<Counters>,
    epoch: Instant,
) -> Result<(), amqp091::Error> {
    let channel = connection.open_channel().await?;
    channel
        .basic_qos(basic::Qos {
            prefetch_count: o.prefetch,
            ..Default::default()
        })
        .await?;
    let mut consumer = channel
        .basic_consume(
            &o.queue,
            ConsumeOptions {
                no_ack: o.no_ack,
                ..Default::default()
            },
        )
        .await?;
    let mut latencies = Vec::new();
    let measure_latency = o.producers > 0 && o.size >= 8 && o.peer.is_none();
    let mut n = 0u64;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        n += 1;
        if measure_latency && n % 16 == 0 {
            let sent = u64::from_be_bytes(delivery.body[..8].try_into().unwrap_or_default());
            latencies.push((epoch.elapsed().as_nanos() as u64).saturating_sub(sent));
        }
        if !o.no_ack && n % o.multi_ack == 0 {
            if o.multi_ack == 1 {
                delivery.ack().await?;
            } else {
                delivery.nack(true, true).await.ok();
            }
        }
        counters.consumed.fetch_add(1, Ordering::Relaxed);
        if counters.stop.load(Ordering::Relaxed) || o.messages.is_some_and(|m| n >= m) {
            break;
        }
    }
    if let Ok(mut all) = counters.latencies.lock() {
        all.extend(latencies);
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
) -> Result<(), amqp091::Error> {
    let channel = connection.open_channel().await?;
    let declare = queue::Declare {
        queue: o.queue.as_str().into(),
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
    println!(
        "results: {round_trips} passive queue.declare round trips in {:.2} s",
        elapsed.as_secs_f64()
    );
    println!(
        "  round trip: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        percentile(&times, 0.5),
        percentile(&times, 0.9),
        percentile(&times, 0.99),
        percentile(&times, 1.0)
    );
    println!(
        "  client CPU {:.2} µs per round trip",
        cpu.as_secs_f64() * 1e6 / round_trips as f64
    );
    let _ = connection.close().await;
    Ok(())
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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        if let Err(e) = runtime.block_on(peer::serve(kind, port, size)) {
            eprintln!("peer: {e}");
        }
        return;
    }
    let mut o = parse();
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
    if let Err(e) = result {
        eprintln!("perf: {e}");
        std::process::exit(1);
    }
}

async fn run(o: Options) -> Result<(), amqp091::Error> {
    let config: Config = o.url.parse()?;
    // The URL may hold a password: print only where it points.
    let address = config.address();
    let config = config.recovery(RecoveryConfig::disabled());
    let connection = Connection::connect(config.clone()).await?;
    let setup = connection.open_channel().await?;
    setup
        .queue_declare(queue::Declare {
            queue: o.queue.as_str().into(),
            ..Default::default()
        })
        .await?;
    setup
        .queue_purge(queue::Purge {
            queue: o.queue.as_str().into(),
            ..Default::default()
        })
        .await?;
    println!(
        "perf: {} producer(s), {} consumer(s), {} B messages, confirm {:?}, prefetch {}, against {}",
        o.producers,
        o.consumers,
        o.size,
        o.confirm,
        o.prefetch,
        o.peer.map_or(address, |k| format!("the {k:?} peer"))
    );
    if let Some(round_trips) = o.rpc {
        return rpc_round_trips(&connection, &o, round_trips).await;
    }
    let counters = Arc::new(Counters {
        published: AtomicU64::new(0),
        confirmed: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        latencies: std::sync::Mutex::new(Vec::new()),
    });
    let epoch = Instant::now();
    let cpu_before = cpu_time();
    #[cfg_attr(not(feature = "blocking"), allow(unused_mut))]
    let mut threads: Vec<std::thread::JoinHandle<Result<(), amqp091::Error>>> = Vec::new();
    let mut tasks = Vec::new();
    #[cfg(feature = "blocking")]
    if o.blocking {
        for _ in 0..o.consumers {
            let (o, counters, config) = (o.clone(), counters.clone(), config.clone());
            threads.push(std::thread::spawn(move || {
                blocking::consumer(config, o, counters, epoch)
            }));
        }
        for _ in 0..o.producers {
            let (o, counters, config) = (o.clone(), counters.clone(), config.clone());
            threads.push(std::thread::spawn(move || {
                blocking::producer(config, o, counters, epoch)
            }));
        }
    }
    let (consumers, producers) = if o.blocking {
        (0, 0)
    } else {
        (o.consumers, o.producers)
    };
    // A connection of its own for each producer and consumer, unless asked.
    let connection_for = |connection: &Connection| {
        let (shared, config) = (connection.clone(), config.clone());
        let own = !o.shared_connection;
        async move {
            if own {
                Connection::connect(config).await
            } else {
                Ok(shared)
            }
        }
    };
    for _ in 0..consumers {
        tasks.push(tokio::spawn(consumer(
            connection_for(&connection).await?,
            o.clone(),
            counters.clone(),
            epoch,
        )));
    }
    for _ in 0..producers {
        tasks.push(tokio::spawn(producer(
            connection_for(&connection).await?,
            o.clone(),
            counters.clone(),
            epoch,
        )));
    }
    let started = Instant::now();
    let mut last = (0u64, 0u64);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let published = counters.published.load(Ordering::Relaxed);
        let consumed = counters.consumed.load(Ordering::Relaxed);
        println!(
            "  {:>4.0} s: sent {:>9}/s, received {:>9}/s",
            started.elapsed().as_secs_f64(),
            published - last.0,
            consumed - last.1
        );
        last = (published, consumed);
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
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    // Producers finish their outstanding confirms; consumers stop at the next delivery.
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !threads.iter().all(|t| t.is_finished()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for thread in threads.into_iter().filter(|t| t.is_finished()) {
        if let Ok(Err(e)) = thread.join() {
            println!("  a blocking producer or consumer failed: {e}");
        }
    }
    let published = counters.published.load(Ordering::Relaxed);
    let consumed = counters.consumed.load(Ordering::Relaxed);
    let messages = published.max(consumed).max(1);
    println!("results over {:.1} s:", elapsed.as_secs_f64());
    println!(
        "  published {published} ({:.0} msg/s), confirmed {}",
        published as f64 / elapsed.as_secs_f64(),
        counters.confirmed.load(Ordering::Relaxed)
    );
    println!(
        "  consumed  {consumed} ({:.0} msg/s)",
        consumed as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  client CPU {:.2} s = {:.2} µs per message",
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / messages as f64
    );
    println!("  peak RSS {} MiB", peak_rss_kib() / 1024);
    if let Ok(mut latencies) = counters.latencies.lock() {
        if !latencies.is_empty() {
            latencies.sort_unstable();
            println!(
                "  latency publish → deliver: p50 {:.0} µs, p95 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.95),
                percentile(&latencies, 0.99),
                percentile(&latencies, 1.0)
            );
        }
    }
    // close() flushes what is still queued in the client before the close.
    let closing = Instant::now();
    match tokio::time::timeout(Duration::from_secs(30), connection.close()).await {
        Ok(Ok(())) => println!("  closed in {:.2} s", closing.elapsed().as_secs_f64()),
        Ok(Err(e)) => println!("  close failed: {e}"),
        Err(_) => println!("  close timed out"),
    }
    Ok(())
}
