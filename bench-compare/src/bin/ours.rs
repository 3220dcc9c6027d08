//! The same harness with amqp-client itself (feature `ours`): a cross-check
//! of the harness against perf's own figures, and the client for the
//! pre-filled consume run, which perf cannot do (it purges its queue).
//! Built only with `--features ours`, so that an API change in amqp-client
//! never breaks the lapin/amqprs binaries.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp091::prelude::*;
use amqp091::{
    BasicProperties, Config, Connection, ConsumeOptions, RecoveryConfig, ShortString,
};
use bench_compare::{Counters, Feed, Options, Workload};
use bytes::Bytes;

const CLIENT: &str = "ours";

fn err(e: amqp091::Error) -> String {
    format!("amqp-client: {e}")
}

async fn producer(
    connection: Connection,
    o: Options,
    window: Option<usize>,
    limit: Option<u64>,
    counters: Arc<Counters>,
    epoch: Instant,
) -> Result<(), String> {
    let channel = connection.open_channel().await.map_err(err)?;
    if window.is_some() {
        channel
            .confirm_select(confirm::Select::default())
            .await
            .map_err(err)?;
    }
    let properties = BasicProperties::default();
    let stamped = o.stamped() && limit.is_none();
    let fixed = Bytes::from(vec![b'x'; o.size]);
    let mut outstanding = VecDeque::new();
    let mut sent = 0u64;
    while !counters.stopped() && limit.is_none_or(|l| sent < l) {
        let body = if stamped {
            let mut b = vec![b'x'; o.size];
            bench_compare::fill_body(&mut b, epoch, true);
            Bytes::from(b)
        } else {
            fixed.clone()
        };
        let confirm = channel
            .basic_publish("", &o.queue, false, &properties, body)
            .await
            .map_err(err)?;
        sent += 1;
        if limit.is_none() {
            counters.published.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(window) = window {
            outstanding.push_back(confirm);
            if outstanding.len() >= window {
                if let Some(oldest) = outstanding.pop_front() {
                    oldest.await.map_err(err)?;
                    if limit.is_none() {
                        counters.confirmed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    for confirm in outstanding {
        confirm.await.map_err(err)?;
        if limit.is_none() {
            counters.confirmed.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

async fn consumer(
    connection: Connection,
    o: Options,
    counters: Arc<Counters>,
    epoch: Instant,
) -> Result<(), String> {
    let channel = connection.open_channel().await.map_err(err)?;
    channel
        .basic_qos(basic::Qos {
            prefetch_count: o.prefetch,
            ..Default::default()
        })
        .await
        .map_err(err)?;
    let mut consumer = channel
        .basic_consume(&o.queue, ConsumeOptions::default())
        .await
        .map_err(err)?;
    let measure_latency = o.stamped();
    let mut latencies = Vec::new();
    let mut n = 0u64;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(err)?;
        n += 1;
        if measure_latency && n % 16 == 0 {
            latencies.extend(bench_compare::latency_ns(&delivery.body, epoch));
        }
        delivery.ack().await.map_err(err)?;
        counters.consumed.fetch_add(1, Ordering::Relaxed);
        if counters.stopped() {
            break;
        }
    }
    if let Ok(mut all) = counters.latencies.lock() {
        all.extend(latencies);
    }
    Ok(())
}

async fn run(o: Options) -> Result<(), String> {
    let config: Config = o.url.parse().map_err(|e| format!("amqp-client: {e}"))?;
    let connection = Connection::connect(config.recovery(RecoveryConfig::disabled()))
        .await
        .map_err(err)?;
    let setup = connection.open_channel().await.map_err(err)?;
    let queue_name = ShortString::new(&o.queue).map_err(|e| format!("amqp-client: {e}"))?;
    setup
        .queue_declare(queue::Declare {
            queue: queue_name.clone(),
            ..Default::default()
        })
        .await
        .map_err(err)?;
    setup
        .queue_purge(queue::Purge {
            queue: queue_name,
            ..Default::default()
        })
        .await
        .map_err(err)?;
    println!("{}", o.describe(CLIENT));
    let counters = Arc::new(Counters::default());
    let epoch = Instant::now();
    if let (Workload::Consume, Feed::Prefill(n)) = (o.workload, o.feed) {
        let t = Instant::now();
        producer(
            connection.clone(),
            o.clone(),
            Some(1000),
            Some(n),
            counters.clone(),
            epoch,
        )
        .await?;
        println!(
            "  pre-filled {n} messages in {:.1} s (not counted)",
            t.elapsed().as_secs_f64()
        );
    }
    let cpu_before = bench_compare::cpu_time();
    let mut tasks = Vec::new();
    for _ in 0..o.consumers() {
        tasks.push(tokio::spawn(consumer(
            connection.clone(),
            o.clone(),
            counters.clone(),
            epoch,
        )));
    }
    for _ in 0..o.producers() {
        tasks.push(tokio::spawn(producer(
            connection.clone(),
            o.clone(),
            o.confirm(),
            None,
            counters.clone(),
            epoch,
        )));
    }
    bench_compare::measure(CLIENT, &o, counters, cpu_before, tasks).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close()).await;
    Ok(())
}

fn main() {
    let o = bench_compare::parse();
    bench_compare::run(async move {
        if let Err(e) = run(o).await {
            eprintln!("{CLIENT}: {e}");
            std::process::exit(1);
        }
    });
}
