//! `--blocking`: the producers and consumers of `main.rs` through
//! `amqp091::blocking`, each on a thread of its own with a connection of its
//! own (so with its runtime thread), to compare their CPU per message with
//! the async ones'.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp091::blocking::{Connection, RecvTimeoutError};
use amqp091::prelude::*;
use amqp091::{Config, ConsumeOptions};

use crate::histogram::Histogram;
use crate::{consume_arguments, sent_at, stamp, Counters, Options, Payload};

pub fn producer(
    config: Config,
    queues: Vec<String>,
    o: Options,
    counters: Arc<Counters>,
    epoch: Instant,
) -> Result<(), amqp091::Error> {
    let connection = Connection::connect(config)?;
    let channel = connection.open_channel()?;
    if o.confirm.is_some() {
        channel.confirm_select(confirm::Select::default())?;
    }
    let mut outstanding = VecDeque::new();
    let payload = Payload::new(o.size, stamp(&o));
    let start = Instant::now();
    let mut sent = 0u64;
    while !counters.stop.load(Ordering::Relaxed) {
        if o.messages
            .is_some_and(|m| counters.published.load(Ordering::Relaxed) >= m)
        {
            break;
        }
        if let Some(rate) = o.rate {
            // From the start, as the async producers pace: no drift.
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let (body, properties) = payload.next(epoch);
        let queue = &queues[sent as usize % queues.len()];
        let confirm = channel.basic_publish("", queue.as_str(), o.mandatory, &properties, body)?;
        sent += 1;
        counters.published.fetch_add(1, Ordering::Relaxed);
        if let Some(window) = o.confirm {
            outstanding.push_back(confirm);
            if outstanding.len() >= window {
                if let Some(oldest) = outstanding.pop_front() {
                    counters.record_confirmation(oldest.wait()?);
                }
            }
        }
    }
    for confirm in outstanding {
        counters.record_confirmation(confirm.wait()?);
    }
    connection.close()
}

pub fn consumer(
    config: Config,
    queue: String,
    o: Options,
    counters: Arc<Counters>,
    epoch: Instant,
) -> Result<(), amqp091::Error> {
    let connection = Connection::connect(config)?;
    let channel = connection.open_channel()?;
    channel.basic_qos(basic::Qos {
        prefetch_count: o.prefetch,
        ..Default::default()
    })?;
    let mut consumer = channel.basic_consume(
        queue.as_str(),
        ConsumeOptions {
            no_ack: o.no_ack,
            arguments: consume_arguments(&o),
            ..Default::default()
        },
    )?;
    let mut latencies = Histogram::default();
    let stamp = stamp(&o);
    let mut n = 0u64;
    while !counters.stop.load(Ordering::Relaxed) {
        // A queue that runs dry must not keep the thread past the stop.
        let delivery = match consumer.recv_timeout(Duration::from_millis(100)) {
            Ok(delivery) => delivery,
            Err(RecvTimeoutError::Timeout(_)) => continue,
            Err(RecvTimeoutError::Ended) => break,
            Err(RecvTimeoutError::Failed(e)) => return Err(e),
        };
        n += 1;
        if let Some(stamp) = stamp {
            if let Some(sent) = sent_at(stamp, &delivery.body, delivery.properties.get()) {
                latencies.record((epoch.elapsed().as_nanos() as u64).saturating_sub(sent));
            }
        }
        if !o.no_ack && n % o.multi_ack == 0 {
            if o.multi_ack == 1 {
                delivery.ack()?;
            } else {
                delivery.ack_multiple()?;
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
    // The flood peer may not answer a close: dropping is enough here.
    Ok(())
}
