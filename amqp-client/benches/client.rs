#![allow(missing_docs)] // criterion's macros generate undocumented functions
//! The client's hot paths end to end, against the perf tool's in-process
//! peers (no broker): a publish through the channel into the I/O task's write
//! buffer and onto the socket, and a delivery from the socket through frame
//! decoding, content assembly and the consumer stream, with its ack.

#[path = "../examples/perf/peer.rs"]
mod peer;

use std::time::{Duration, Instant};

use amqp091::prelude::*;
use amqp091::{
    BasicProperties, Channel, Config, Connection, ConsumeOptions, Consumer, RecoveryConfig,
};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Starts `kind` on a thread of its own (its CPU is not the client's
/// thread's) and returns its port.
fn start_peer(kind: peer::Kind) -> u16 {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _ = runtime.block_on(peer::serve(kind, port, 32, None));
    });
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return port;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the peer did not start");
}

async fn connect(port: u16) -> (Connection, Channel) {
    let config: Config = format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
        .parse()
        .expect("url");
    let connection = Connection::connect(config.recovery(RecoveryConfig::disabled()))
        .await
        .expect("connect");
    let channel = connection.open_channel().await.expect("channel");
    (connection, channel)
}

fn publish(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let port = start_peer(peer::Kind::Sink);
    let (_connection, channel) = runtime.block_on(connect(port));
    let body = Bytes::from_static(&[b'x'; 32]);
    let properties = BasicProperties::default();
    let mut group = c.benchmark_group("client");
    group.throughput(Throughput::Elements(1));
    group.bench_function("publish 32 B through the channel to the socket", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let _ = channel
                        .basic_publish("", "bench", false, &properties, body.clone())
                        .await
                        .expect("publish");
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

fn consume(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let port = start_peer(peer::Kind::Flood);
    let mut consumer: Consumer = runtime.block_on(async {
        let (connection, channel) = connect(port).await;
        channel
            .basic_qos(basic::Qos {
                prefetch_count: 1000,
                ..Default::default()
            })
            .await
            .expect("qos");
        let consumer = channel
            .basic_consume("bench", ConsumeOptions::default())
            .await
            .expect("consume");
        std::mem::forget(connection); // lives as long as the bench
        consumer
    });
    let mut group = c.benchmark_group("client");
    group.throughput(Throughput::Elements(1));
    group.bench_function("deliver 32 B: decode, assemble, stream, ack", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let delivery = consumer.next().await.expect("open").expect("delivery");
                    delivery.ack().await.expect("ack");
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, publish, consume);
criterion_main!(benches);
