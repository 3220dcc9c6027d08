//! `--blocking`: the producers and consumers of `main.rs` through
//! `amqp091::blocking`, each on a thread of its own with a connection of its
//! own (so with its runtime thread), to compare their CPU per message with
//! the async ones'.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use amqp091::blocking::Connection;
use amqp091::prelude::*;
use amqp091::{BasicProperties, Config, ConsumeOptions};

use crate::{body, Counters, Options};

pub fn producer(
    config: Config,
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
    let properties = BasicProperties::default();
    let stamped = o.consumers > 0 && o.size >= 8;
    let fixed = body(o.size, epoch);
    while !counters.stop.load(Ordering::Relaxed) {
        if o.messages
            .is_some_and(|m| counters.published.load(Ordering::Relaxed) >= m)
        {
            break;
        }
        let payload = if stamped {
            body(o.size, epoch)
        } else {
            fixed.clone()
        };
        let confirm = channel.basic_publish("", &o.queue, false, &properties, payload)?;
        counters.published.fetch_add(1, Ordering::Relaxed);
        if let Some(window) = o.confirm {
            outstanding.push_back(confirm);
            if outstanding.len() >= window {
                if let Some(oldest) = outstanding.pop_front() {
                    oldest.wait()?;
                    counters.confirmed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    for confirm in outstanding {
        confirm.wait()?;
        counters.confirmed.fetch_add(1, Ordering::Relaxed);
    }
    connection.close()
}

pub fn consumer(
    config: Config,
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
    let consumer = channel.basic_consume(
        &o.queue,
        ConsumeOptions {
            no_ack: o.no_ack,
            ..Default::default()
        },
    )?;
    let mut latencies = Vec::new();
    let measure_latency = o.producers > 0 && o.size >= 8 && o.peer.is_none();
    let mut n = 0u64;
    for delivery in consumer {
        let delivery = delivery?;
        n += 1;
        if measure_latency && n % 16 == 0 {
            let sent = u64::from_be_bytes(delivery.body[..8].try_into().unwrap_or_default());
            latencies.push((epoch.elapsed().as_nanos() as u64).saturating_sub(sent));
        }
        if !o.no_ack && n % o.multi_ack == 0 {
            if o.multi_ack == 1 {
                delivery.ack()?;
            } else {
                delivery.nack(true, true).ok();
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
    // The flood peer may not answer a close: dropping is enough here.
    Ok(())
}
