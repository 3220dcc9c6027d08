//! The perf tool's workloads with amqprs (tokio).
//!
//! amqprs has no per-publish confirmation future: confirmations arrive at a
//! `ChannelCallback::publish_ack`. The producer therefore tracks the highest
//! contiguously settled delivery tag and, as perf does with its queue of
//! confirm futures, waits for the oldest outstanding one once `window` are
//! outstanding.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqprs::callbacks::{ChannelCallback, DefaultConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, QueueDeclareArguments, QueuePurgeArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use async_trait::async_trait;
use bench_compare::{Counters, Feed, Options, Workload};
use tokio::sync::watch;

const CLIENT: &str = "amqprs";

fn err(e: amqprs::error::Error) -> String {
    format!("amqprs: {e}")
}

/// Publisher confirmations of one channel.
struct Confirms {
    /// (highest tag such that it and all below are settled, settled tags above it)
    state: Mutex<(u64, BTreeSet<u64>)>,
    settled: watch::Sender<u64>,
    counters: Arc<Counters>,
    count: bool,
}

impl Confirms {
    fn settle(&self, tag: u64, multiple: bool, nack: bool) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let (contiguous, singles) = &mut *state;
        let newly = if multiple {
            if tag <= *contiguous {
                0
            } else {
                let above: Vec<u64> = singles.range(..=tag).copied().collect();
                for t in &above {
                    singles.remove(t);
                }
                let n = tag - *contiguous - above.len() as u64;
                *contiguous = tag;
                n
            }
        } else if tag <= *contiguous || !singles.insert(tag) {
            0
        } else {
            1
        };
        while singles.remove(&(*contiguous + 1)) {
            *contiguous += 1;
        }
        let now = *contiguous;
        drop(state);
        if self.count && newly > 0 {
            let counter = if nack {
                &self.counters.nacked
            } else {
                &self.counters.confirmed
            };
            counter.fetch_add(newly, Ordering::Relaxed);
        }
        self.settled.send_if_modified(|v| {
            let changed = *v != now;
            *v = now;
            changed
        });
    }
}

struct Callback {
    confirms: Option<Arc<Confirms>>,
}

#[async_trait]
impl ChannelCallback for Callback {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        eprintln!("{CLIENT}: the server closed a channel: {close}");
        Ok(())
    }
    async fn cancel(
        &mut self,
        _channel: &Channel,
        _cancel: Cancel,
    ) -> Result<(), amqprs::error::Error> {
        eprintln!("{CLIENT}: the server cancelled the consumer");
        Ok(())
    }
    async fn flow(
        &mut self,
        _channel: &Channel,
        _active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(true)
    }
    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        if let Some(c) = &self.confirms {
            c.settle(ack.delivery_tag(), ack.mutiple(), false);
        }
    }
    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        if let Some(c) = &self.confirms {
            c.settle(nack.delivery_tag(), nack.multiple(), true);
        }
    }
    async fn publish_return(
        &mut self,
        _channel: &Channel,
        _ret: Return,
        _basic_properties: BasicProperties,
        _content: Vec<u8>,
    ) {
    }
}

/// Publishes until stopped (or `limit` messages); `window`: confirm mode.
async fn producer(
    connection: Connection,
    o: Options,
    window: Option<usize>,
    limit: Option<u64>,
    counters: Arc<Counters>,
    epoch: Instant,
) -> Result<(), String> {
    let channel = connection.open_channel(None).await.map_err(err)?;
    let (settled, mut settled_rx) = watch::channel(0u64);
    let confirms = Arc::new(Confirms {
        state: Mutex::new((0, BTreeSet::new())),
        settled,
        counters: counters.clone(),
        count: limit.is_none(),
    });
    channel
        .register_callback(Callback {
            confirms: Some(confirms.clone()),
        })
        .await
        .map_err(err)?;
    if window.is_some() {
        channel
            .confirm_select(ConfirmSelectArguments::new(false))
            .await
            .map_err(err)?;
    }
    let args = BasicPublishArguments::new("", &o.queue);
    let stamped = o.stamped() && limit.is_none();
    let mut body = vec![b'x'; o.size];
    let mut sent = 0u64;
    // Tags up to `awaited` have been waited for (perf's queue of confirm futures, popped).
    let mut awaited = 0u64;
    while !counters.stopped() && limit.is_none_or(|l| sent < l) {
        bench_compare::fill_body(&mut body, epoch, stamped);
        channel
            .basic_publish(BasicProperties::default(), body.clone(), args.clone())
            .await
            .map_err(err)?;
        sent += 1;
        if limit.is_none() {
            counters.published.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(window) = window {
            if sent - awaited >= window as u64 {
                let oldest = awaited + 1;
                settled_rx
                    .wait_for(|s| *s >= oldest)
                    .await
                    .map_err(|_| "amqprs: the channel went away".to_owned())?;
                awaited = oldest;
            }
        }
    }
    if window.is_some() {
        settled_rx
            .wait_for(|s| *s >= sent)
            .await
            .map_err(|_| "amqprs: the channel went away".to_owned())?;
    }
    Ok(())
}

async fn consumer(
    connection: Connection,
    o: Options,
    counters: Arc<Counters>,
    epoch: Instant,
) -> Result<(), String> {
    let channel = connection.open_channel(None).await.map_err(err)?;
    channel
        .register_callback(Callback { confirms: None })
        .await
        .map_err(err)?;
    channel
        .basic_qos(BasicQosArguments::new(0, o.prefetch, false))
        .await
        .map_err(err)?;
    let (_tag, mut deliveries) = channel
        .basic_consume_rx(
            BasicConsumeArguments::new(&o.queue, "bench-compare")
                .manual_ack(true)
                .finish(),
        )
        .await
        .map_err(err)?;
    let measure_latency = o.stamped();
    let mut latencies = Vec::new();
    let mut n = 0u64;
    while let Some(message) = deliveries.recv().await {
        let tag = message
            .deliver
            .as_ref()
            .map(|d| d.delivery_tag())
            .ok_or("amqprs: a delivery without basic.deliver")?;
        n += 1;
        if measure_latency && n % 16 == 0 {
            if let Some(body) = &message.content {
                latencies.extend(bench_compare::latency_ns(body, epoch));
            }
        }
        channel
            .basic_ack(BasicAckArguments::new(tag, false))
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
    // amqprs parses URLs only with its `urispec` feature, and then does not
    // percent-decode the virtual host ("%2f"): take the URL apart here.
    let url = bench_compare::url_parts(&o.url)?;
    let args = OpenConnectionArguments::new(&url.host, url.port, &url.user, &url.password)
        .virtual_host(&url.vhost)
        .finish();
    let connection = Connection::open(&args).await.map_err(err)?;
    connection
        .register_callback(DefaultConnectionCallback)
        .await
        .map_err(err)?;
    let setup = connection.open_channel(None).await.map_err(err)?;
    setup
        .register_callback(Callback { confirms: None })
        .await
        .map_err(err)?;
    setup
        .queue_declare(QueueDeclareArguments::new(&o.queue))
        .await
        .map_err(err)?;
    setup
        .queue_purge(QueuePurgeArguments::new(&o.queue))
        .await
        .map_err(err)?;
    if let Some(round_trips) = o.rpc {
        let declare = QueueDeclareArguments::new(&o.queue).passive(true).finish();
        return bench_compare::rpc_round_trips(CLIENT, round_trips, || async {
            setup
                .queue_declare(declare.clone())
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
