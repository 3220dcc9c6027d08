//! Measures what the client keeps in memory per idle connection and per open
//! channel: the heap (exact, from a counting global allocator, so the figure
//! does not depend on the machine's load) and the resident set (what the
//! process costs the machine, allocator slack and stacks included).
//!
//! ```sh
//! cargo run --release -p amqp-client-tests --example memory -- --connections 1000
//! cargo run --release -p amqp-client-tests --example memory -- --channels 10000
//! cargo run --release -p amqp-client-tests --example memory -- --connections 1000 --url amqp://guest:guest@127.0.0.1:5672/%2f
//! ```
//!
//! Without `--url` the client talks to a peer of this example's own, run as
//! a child process so that none of its memory is counted: it answers the
//! handshake (channel_max 65,535, so that 10,000 channels fit where
//! RabbitMQ's default allows 2,047), `channel.open`, `channel.close` and
//! `connection.close`, and echoes heartbeats, so that the connections stay
//! up however long they are left idle.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use amqp091::{Config, Connection};

/// The system allocator, counting the bytes it has handed out and not got back.
struct Counting;

static HEAP: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to `System` as it came; only the counter,
// which no allocation depends on, is added.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees are System's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            HEAP.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            HEAP.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from System.
        unsafe { System.dealloc(ptr, layout) };
        HEAP.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            HEAP.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes on the heap now.
fn heap() -> isize {
    HEAP.load(Ordering::Relaxed)
}

/// The resident set now, in bytes (Linux; 0 elsewhere).
fn rss() -> isize {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<isize>().ok())
        .unwrap_or(0);
    pages * 4096
}

struct Args {
    connections: usize,
    channels: usize,
    url: Option<String>,
    settle: Duration,
    heartbeat: u16,
    serve: Option<u16>,
}

fn usage() -> ! {
    eprintln!(
        "usage: memory [--connections N] [--channels N] [--url URL] [--settle SECS] [--heartbeat SECS]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        connections: 0,
        channels: 0,
        url: None,
        settle: Duration::from_secs(3),
        heartbeat: 60,
        serve: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--connections" => args.connections = value().parse().unwrap_or_else(|_| usage()),
            "--channels" => args.channels = value().parse().unwrap_or_else(|_| usage()),
            "--url" => args.url = Some(value()),
            "--settle" => {
                args.settle = Duration::from_secs_f64(value().parse().unwrap_or_else(|_| usage()))
            }
            "--heartbeat" => args.heartbeat = value().parse().unwrap_or_else(|_| usage()),
            "--serve" => args.serve = Some(value().parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    if args.connections == 0 && args.channels == 0 && args.serve.is_none() {
        args.connections = 1000;
        args.channels = 10_000;
    }
    args
}

/// Heap and RSS at one moment.
#[derive(Clone, Copy)]
struct Sample {
    heap: isize,
    rss: isize,
}

fn sample() -> Sample {
    Sample {
        heap: heap(),
        rss: rss(),
    }
}

fn report(what: &str, count: usize, before: Sample, after: Sample) {
    let per = |a: isize, b: isize| (b - a) as f64 / count as f64;
    println!(
        "{what}: {count} → heap {:+.1} MiB ({:.0} B each), RSS {:+.1} MiB ({:.0} B each)",
        (after.heap - before.heap) as f64 / 1048576.0,
        per(before.heap, after.heap),
        (after.rss - before.rss) as f64 / 1048576.0,
        per(before.rss, after.rss),
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args();
    if let Some(port) = args.serve {
        return Ok(peer::serve(port, args.heartbeat).await?);
    }
    let mut child = None;
    let url = match &args.url {
        Some(url) => url.clone(),
        None => {
            let port = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                listener.local_addr()?.port()
            };
            child = Some(
                std::process::Command::new(std::env::current_exe()?)
                    .args([
                        "--serve",
                        &port.to_string(),
                        "--heartbeat",
                        &args.heartbeat.to_string(),
                    ])
                    .spawn()?,
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if std::time::Instant::now() > deadline {
                    return Err("the peer did not start".into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
        }
    };
    let mut config: Config = url.parse()?;
    // The client asks for 2,047 channels by default, as RabbitMQ does.
    config.channel_max = config
        .channel_max
        .max(u16::try_from(args.channels).unwrap_or(u16::MAX));
    let result = measure(&args, &config).await;
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

async fn measure(args: &Args, config: &Config) -> Result<(), Box<dyn std::error::Error>> {
    // A first connection and channel, closed again: what is allocated once
    // per process (runtime, tracing call sites…) is not counted below.
    {
        let warm = Connection::connect(config.clone()).await?;
        warm.open_channel().await?.close().await?;
        warm.close().await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    if args.connections > 0 {
        let before = sample();
        let mut connections = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            connections.push(Connection::connect(config.clone()).await?);
        }
        let opened = sample();
        tokio::time::sleep(args.settle).await;
        let settled = sample();
        report(
            "idle connections, just opened",
            args.connections,
            before,
            opened,
        );
        report(
            &format!("idle connections, after {:?}", args.settle),
            args.connections,
            before,
            settled,
        );
        for connection in &connections {
            connection.close().await?;
        }
        drop(connections);
        tokio::time::sleep(Duration::from_millis(200)).await;
        println!(
            "after closing them: heap {:+} B over the start",
            heap() - before.heap
        );
    }

    if args.channels > 0 {
        let connection = Connection::connect(config.clone()).await?;
        let max = connection.server_info().channel_max;
        if usize::from(max) < args.channels {
            return Err(format!(
                "the peer allows {max} channels; {} asked (use the built-in peer)",
                args.channels
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = sample();
        let mut channels = Vec::with_capacity(args.channels);
        for _ in 0..args.channels {
            channels.push(connection.open_channel().await?);
        }
        tokio::time::sleep(args.settle).await;
        let settled = sample();
        // The Vec of handles is the example's, not the client's.
        let own = (args.channels * std::mem::size_of::<amqp091::Channel>()) as isize;
        report(
            "open channels",
            args.channels,
            before,
            Sample {
                heap: settled.heap - own,
                rss: settled.rss,
            },
        );
        for channel in &channels {
            channel.close().await?;
        }
        drop(channels);
        tokio::time::sleep(Duration::from_millis(200)).await;
        println!(
            "after closing them: heap {:+} B over the start",
            heap() - before.heap
        );
        connection.close().await?;
    }
    Ok(())
}

mod peer {
    //! Just enough of a broker for idle connections and empty channels.

    use amqp091::protocol::frame::{self, Frame, FrameDecoder};
    use amqp091::protocol::methods::{channel, connection, Method};
    use amqp091::protocol::{FieldTable, ShortString};
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const FRAME_MAX: u32 = 131_072;

    pub async fn serve(port: u16, heartbeat: u16) -> std::io::Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                if let Err(e) = session(stream, heartbeat).await {
                    eprintln!("peer: connection ended: {e}");
                }
            });
        }
    }

    async fn session(mut stream: TcpStream, heartbeat: u16) -> std::io::Result<()> {
        let mut header = [0u8; 8];
        if stream.read_exact(&mut header).await.is_err() {
            // The parent's probe whether the peer is up yet.
            return Ok(());
        }
        let mut read = BytesMut::new();
        let mut write = BytesMut::new();
        let mut decoder = FrameDecoder::new(FRAME_MAX);
        let start = connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: FieldTable::new()
                .with(ShortString::from_static("product"), "memory-peer"),
            mechanisms: "PLAIN AMQPLAIN".into(),
            locales: "en_US".into(),
        };
        frame::write_method(&mut write, 0, &Method::ConnectionStart(start));
        loop {
            if !write.is_empty() {
                stream.write_all(&write).await?;
                write.clear();
            }
            read.reserve(4096);
            if stream.read_buf(&mut read).await? == 0 {
                return Ok(());
            }
            loop {
                let frame = match decoder.decode(&mut read) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => return Err(std::io::Error::other(e.to_string())),
                };
                let (id, method) = match frame {
                    Frame::Method { channel, method } => (channel, method),
                    Frame::Heartbeat => {
                        frame::write_heartbeat(&mut write);
                        continue;
                    }
                    _ => continue,
                };
                let answer = match method {
                    Method::ConnectionStartOk(_) => Method::ConnectionTune(connection::Tune {
                        channel_max: u16::MAX,
                        frame_max: FRAME_MAX,
                        heartbeat,
                    }),
                    Method::ConnectionTuneOk(_) => continue,
                    Method::ConnectionOpen(_) => Method::ConnectionOpenOk(connection::OpenOk {}),
                    Method::ConnectionClose(_) => {
                        frame::write_method(
                            &mut write,
                            0,
                            &Method::ConnectionCloseOk(connection::CloseOk {}),
                        );
                        stream.write_all(&write).await?;
                        return Ok(());
                    }
                    Method::ChannelOpen(_) => Method::ChannelOpenOk(channel::OpenOk {}),
                    Method::ChannelClose(_) => Method::ChannelCloseOk(channel::CloseOk {}),
                    _ => continue,
                };
                frame::write_method(&mut write, id, &answer);
            }
        }
    }
}
