//! The perf tool's workloads with lapin (on tokio).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench_compare::{Counters, Feed, Options, Workload};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const CLIENT: &str = "lapin";

fn err(e: lapin::Error) -> String {
    format!("lapin: {e}")
}

/// Publishes until stopped (or `limit` messages); `window`: confirm mode.
async fn producer(
    connection: Arc<Connection>,
    o: Options,
    window: Option<usize>,
    limit: Option<u64>,
    counters: Arc<Counters>,
    epoch: Instant,
) -> Result<(), String> {
    let channel = connection.create_channel().await.map_err(err)?;
    if window.is_some() {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(err)?;
    }
    let exchange = ShortString::from("");
    let routing_key = ShortString::from(o.queue.as_str());
    let stamped = o.stamped() && limit.is_none();
    let mut body = vec![b'x'; o.size];
    let mut outstanding = VecDeque::new();
    let mut sent = 0u64;
    while !counters.stopped() && limit.is_none_or(|l| sent < l) {
        bench_compare::fill_body(&mut body, epoch, stamped);
        let confirm = channel
            .basic_publish(
                exchange.clone(),
                routing_key.clone(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
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
                    settle(oldest.await.map_err(err)?, &counters, limit.is_none());
                }
            }
        }
    }
    for confirm in outstanding {
        settle(confirm.await.map_err(err)?, &counters, limit.is_none());
    }
    Ok(())
}

fn settle(confirmation: lapin::Confirmation, counters: &Counters, count: bool) {
    if !count {
        return;
    }
    if confirmation.is_nack() {
        counters.nacked.fetch_add(1, Ordering::Relaxed);
    } else {
        counters.confirmed.fetch_add(1, Ordering::Relaxed);
    }
}

async fn consumer(
    connection: Arc<Connection>,
    o: Options,
    counters: Arc<Counters>,
    epoch: Instant,
) -> Result<(), String> {
    let channel = connection.create_channel().await.map_err(err)?;
    channel
        .basic_qos(o.prefetch, BasicQosOptions::default())
        .await
        .map_err(err)?;
    let mut consumer = channel
        .basic_consume(
            o.queue.as_str().into(),
            "bench-compare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(err)?;
    let measure_latency = o.stamped();
    let mut latencies = Vec::new();
    let mut n = 0u64;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(err)?;
        n += 1;
        if measure_latency && n % 16 == 0 {
            latencies.extend(bench_compare::latency_ns(&delivery.data, epoch));
        }
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(err)?;
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
    let connection = Arc::new(
        Connection::connect(&o.url, ConnectionProperties::default())
            .await
            .map_err(err)?,
    );
    let setup = connection.create_channel().await.map_err(err)?;
    setup
        .queue_declare(
            o.queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(err)?;
    setup
        .queue_purge(o.queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .map_err(err)?;
    if let Some(round_trips) = o.rpc {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        return bench_compare::rpc_round_trips(CLIENT, round_trips, || async {
            setup
                .queue_declare(o.queue.as_str().into(), passive, FieldTable::default())
                .await
                .map(drop)
                .map_err(err)
        })
        .await;
    }
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
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close(200, "OK".into())).await;
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
