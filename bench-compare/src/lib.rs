//! What the two binaries share: options, the measurement (the same as
//! amqp-client's `examples/perf`: user + system CPU of this process from
//! /proc/self/stat, peak RSS from VmHWM), the progress loop and the report.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The three workloads of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// One producer, no confirms.
    Publish,
    /// One producer in confirm mode, at most `window` confirmations outstanding.
    Confirm,
    /// One consumer, basic.qos prefetch, one basic.ack per delivery.
    Consume,
}

/// Where the consume workload's messages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// The peer produces them (the perf tool's flood peer): no publisher.
    None,
    /// A publisher (no confirms) on its own channel of the same connection
    /// runs during the measurement, as `perf --producers 1 --consumers 1`
    /// does; its CPU is counted, and CPU per message is divided by
    /// max(published, consumed), as perf does.
    Parallel,
    /// This many messages are published (confirm mode, window 1000) before
    /// the measurement starts; not counted (but they do count in peak RSS).
    Prefill(u64),
}

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Options {
    /// AMQP URL.
    pub url: String,
    /// Which workload.
    pub workload: Workload,
    /// Measurement length.
    pub duration: Duration,
    /// Body size in bytes.
    pub size: usize,
    /// Outstanding confirmations at most (confirm workload).
    pub window: usize,
    /// basic.qos prefetch count (consume workload).
    pub prefetch: u16,
    /// Queue name.
    pub queue: String,
    /// Message source for the consume workload.
    pub feed: Feed,
    /// Instead of a workload: this many sequential passive `queue.declare`
    /// round trips (after 1000 to warm up), as `perf --rpc N`.
    pub rpc: Option<u64>,
}

fn usage() -> ! {
    eprintln!(
        "usage: {} --url URL --workload publish|confirm|consume [--duration SECONDS] [--size BYTES]\n\
         \x20      [--window N] [--prefetch N] [--queue NAME] [--feed none|parallel|prefill:N] [--rpc N]",
        std::env::args().next().unwrap_or_default()
    );
    std::process::exit(2)
}

/// Parses the command line.
pub fn parse() -> Options {
    let mut o = Options {
        url: std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
        workload: Workload::Publish,
        duration: Duration::from_secs(10),
        size: 32,
        window: 1000,
        prefetch: 1000,
        queue: "amqp-client.perf".to_owned(),
        feed: Feed::Parallel,
        rpc: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_else(|| usage());
        let number = || value.parse::<u64>().unwrap_or_else(|_| usage());
        match args[i].as_str() {
            "--url" => o.url = value.clone(),
            "--workload" => {
                o.workload = match value.as_str() {
                    "publish" => Workload::Publish,
                    "confirm" => Workload::Confirm,
                    "consume" => Workload::Consume,
                    _ => usage(),
                }
            }
            "--duration" => {
                o.duration = Duration::from_secs_f64(value.parse().unwrap_or_else(|_| usage()))
            }
            "--size" => o.size = number() as usize,
            "--window" => o.window = number().max(1) as usize,
            "--prefetch" => o.prefetch = number().min(65535) as u16,
            "--queue" => o.queue = value.clone(),
            "--rpc" => o.rpc = Some(number().max(1)),
            "--feed" => {
                o.feed = match value.as_str() {
                    "none" => Feed::None,
                    "parallel" => Feed::Parallel,
                    v => match v.strip_prefix("prefill:").map(str::parse::<u64>) {
                        Some(Ok(n)) => Feed::Prefill(n),
                        _ => usage(),
                    },
                }
            }
            _ => usage(),
        }
        i += 2;
    }
    o
}

impl Options {
    /// Whether a producer runs during the measurement.
    pub fn producers(&self) -> usize {
        match (self.workload, self.feed) {
            (Workload::Consume, Feed::Parallel) => 1,
            (Workload::Consume, _) => 0,
            _ => 1,
        }
    }

    /// Whether a consumer runs during the measurement.
    pub fn consumers(&self) -> usize {
        usize::from(self.workload == Workload::Consume)
    }

    /// Confirm window of the measured producer, if in confirm mode.
    pub fn confirm(&self) -> Option<usize> {
        (self.workload == Workload::Confirm).then_some(self.window)
    }

    /// Whether bodies carry a send timestamp (when a consumer measures latency).
    pub fn stamped(&self) -> bool {
        self.producers() > 0 && self.consumers() > 0 && self.size >= 8
    }

    /// One line describing the run.
    pub fn describe(&self, client: &str) -> String {
        let feed = match (self.workload, self.feed) {
            (Workload::Consume, Feed::None) => ", messages from the peer (no publisher)".to_owned(),
            (Workload::Consume, Feed::Parallel) => {
                ", messages from a parallel publisher on the same connection (counted)".to_owned()
            }
            (Workload::Consume, Feed::Prefill(n)) => {
                format!(", queue pre-filled with {n} messages before the measurement (not counted)")
            }
            _ => String::new(),
        };
        format!(
            "{client}: workload {:?}, {} producer(s), {} consumer(s), {} B messages, confirm {:?}, prefetch {}, queue {}, against {}{feed}",
            self.workload,
            self.producers(),
            self.consumers(),
            self.size,
            self.confirm(),
            self.prefetch,
            self.queue,
            without_credentials(&self.url)
        )
    }
}

/// `url` without its user and password, fit to print.
pub fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host_start = rest[..authority_end].rfind('@').map_or(0, |at| at + 1);
    format!("{scheme}://{}", &rest[host_start..])
}

/// An AMQP URL's parts (for clients that take them apart). Its `Debug`
/// hides the password.
#[derive(Clone)]
pub struct UrlParts {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// Virtual host, percent-decoded.
    pub vhost: String,
}

impl std::fmt::Debug for UrlParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlParts")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &format_args!("***"))
            .field("vhost", &self.vhost)
            .finish()
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits `amqp://user:pass@host:port/vhost` (no TLS, no query).
pub fn url_parts(url: &str) -> Result<UrlParts, String> {
    let rest = url.strip_prefix("amqp://").ok_or_else(|| {
        format!(
            "only amqp:// URLs are supported: {}",
            without_credentials(url)
        )
    })?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = authority
        .rsplit_once('@')
        .unwrap_or(("guest:guest", authority));
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse()
                .map_err(|_| format!("bad port in {}", without_credentials(url)))?,
        ),
        None => (hostport, 5672),
    };
    let path = path.split('?').next().unwrap_or("");
    Ok(UrlParts {
        host: host.to_owned(),
        port,
        user: percent_decode(user),
        password: percent_decode(password),
        vhost: if path.is_empty() {
            "/".to_owned()
        } else {
            percent_decode(path)
        },
    })
}

/// User + system CPU time of this process (same method as perf).
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let hz = 100; // USER_HZ
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

/// Peak resident set size in KiB (VmHWM).
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Shared counters.
#[derive(Default)]
pub struct Counters {
    /// Messages published.
    pub published: AtomicU64,
    /// Publisher confirmations received (acks).
    pub confirmed: AtomicU64,
    /// Publisher nacks received.
    pub nacked: AtomicU64,
    /// Deliveries consumed and acked.
    pub consumed: AtomicU64,
    /// Set when the measurement ends.
    pub stop: AtomicBool,
    /// Publish → deliver latencies (ns), every 16th delivery.
    pub latencies: Mutex<Vec<u64>>,
}

impl Counters {
    /// Whether the measurement ended.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A body of `size` bytes; the first 8 hold nanoseconds since `epoch` when stamped.
pub fn fill_body(buf: &mut [u8], epoch: Instant, stamped: bool) {
    if stamped && buf.len() >= 8 {
        buf[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_be_bytes());
    }
}

/// Latency sample from a stamped body.
pub fn latency_ns(body: &[u8], epoch: Instant) -> Option<u64> {
    let sent = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
    Some((epoch.elapsed().as_nanos() as u64).saturating_sub(sent))
}

type Task = tokio::task::JoinHandle<Result<(), String>>;

/// Spawns the workload's tasks (already spawned by the caller), prints
/// progress each second, stops after the duration, and prints the report.
/// `cpu_before` is taken by the caller right before it spawned the tasks.
pub async fn measure(
    client: &str,
    o: &Options,
    counters: Arc<Counters>,
    cpu_before: Duration,
    tasks: Vec<Task>,
) {
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
        if started.elapsed() >= o.duration || tasks.iter().all(|t| t.is_finished()) {
            break;
        }
    }
    counters.stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    let mut failures = Vec::new();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => failures.push(e),
            Ok(Err(e)) => failures.push(format!("task panicked: {e}")),
            // As in perf, a consumer stops at its next delivery: with an
            // empty queue that never comes. Not a failure.
            Err(_) => println!("  note: a task was still waiting 5 s after the stop"),
        }
    }
    let published = counters.published.load(Ordering::Relaxed);
    let consumed = counters.consumed.load(Ordering::Relaxed);
    let confirmed = counters.confirmed.load(Ordering::Relaxed);
    let nacked = counters.nacked.load(Ordering::Relaxed);
    let messages = published.max(consumed).max(1);
    let secs = elapsed.as_secs_f64();
    let rss_kib = peak_rss_kib();
    println!("results over {secs:.1} s:");
    println!(
        "  published {published} ({:.0} msg/s), confirmed {confirmed}, nacked {nacked}",
        published as f64 / secs
    );
    println!(
        "  consumed  {consumed} ({:.0} msg/s)",
        consumed as f64 / secs
    );
    println!(
        "  client CPU {:.2} s = {:.2} µs per message",
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / messages as f64
    );
    println!(
        "  peak RSS {:.1} MiB ({rss_kib} KiB)",
        rss_kib as f64 / 1024.0
    );
    if let Ok(mut latencies) = counters.latencies.lock() {
        if !latencies.is_empty() {
            latencies.sort_unstable();
            let p = |q: f64| {
                latencies[((latencies.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
            };
            println!(
                "  latency publish → deliver: p50 {:.0} µs, p95 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
                p(0.5),
                p(0.95),
                p(0.99),
                p(1.0)
            );
        }
    }
    for f in &failures {
        println!("  FAILURE: {f}");
    }
    let rate = if o.workload == Workload::Consume {
        consumed
    } else {
        published
    } as f64
        / secs;
    println!(
        "RESULT client={client} workload={:?} msgs_per_s={rate:.0} cpu_us_per_msg={:.2} peak_rss_mib={:.1} published={published} consumed={consumed} confirmed={confirmed} failures={}",
        o.workload,
        cpu.as_secs_f64() * 1e6 / messages as f64,
        rss_kib as f64 / 1024.0,
        failures.len()
    );
}

/// Runs `f` on a 2-worker multi-thread tokio runtime, as perf does.
pub fn run<F: Future<Output = ()>>(f: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(f);
}

/// Times `round_trips` sequential calls of `call` (after 1000 unmeasured
/// ones) and prints the percentiles and CPU per call as `perf --rpc` does.
pub async fn rpc_round_trips<F, Fut>(
    client: &str,
    round_trips: u64,
    mut call: F,
) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    for _ in 0..1000 {
        call().await?;
    }
    let cpu_before = cpu_time();
    let started = Instant::now();
    let mut times = Vec::with_capacity(round_trips as usize);
    for _ in 0..round_trips {
        let t = Instant::now();
        call().await?;
        times.push(t.elapsed().as_nanos() as u64);
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    times.sort_unstable();
    let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
    println!(
        "{client}: {round_trips} passive queue.declare round trips in {:.2} s",
        elapsed.as_secs_f64()
    );
    println!(
        "  round trip: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
    println!(
        "  client CPU {:.2} µs per round trip",
        cpu.as_secs_f64() * 1e6 / round_trips as f64
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_urls_lose_user_and_password_but_keep_where_they_point() {
        assert_eq!(
            without_credentials("amqp://alice:s3cret@rabbit:5673/%2f?heartbeat=5"),
            "amqp://rabbit:5673/%2f?heartbeat=5"
        );
        assert_eq!(
            without_credentials("amqp://alice:p@ss@rabbit"),
            "amqp://rabbit"
        );
        assert_eq!(without_credentials("amqp://rabbit/v"), "amqp://rabbit/v");
        for url in ["http://alice:s3cret@rabbit", "amqp://alice:s3cret@rabbit:x"] {
            let error = url_parts(url).expect_err(url);
            assert!(!error.contains("s3cret"), "{error}");
        }
        let parts = url_parts("amqp://alice:s3cret@rabbit:5672/%2f").expect("valid");
        assert!(!format!("{parts:?}").contains("s3cret"));
    }
}
