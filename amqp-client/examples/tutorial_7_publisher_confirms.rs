//! RabbitMQ tutorial 7, "Publisher Confirms": the broker acks each message
//! it took responsibility for (or nacks it), and the publisher waits for
//! those answers in one of three ways, each timed here:
//!
//! 1. individually: publish, wait for its confirm, publish the next
//!    (simple, and slow: one round trip per message);
//! 2. in batches: publish a batch, wait until all of it is confirmed;
//! 3. asynchronously: keep publishing while another task handles the
//!    confirms as they come (the fastest; outstanding confirms are tracked).
//!
//! ```sh
//! cargo run -p amqp091 --example tutorial_7_publisher_confirms            # 10,000 messages each
//! cargo run -p amqp091 --example tutorial_7_publisher_confirms -- 50000
//! ```
//!
//! The broker is `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! The functions are public so that `tests/tests/tutorials.rs` runs them.

use std::time::{Duration, Instant};

use amqp091::prelude::*;
use amqp091::{BasicProperties, Channel, Confirmation, Connection, Error, PublishConfirm};

/// What one strategy did: how many messages the broker acked, and how long
/// publishing and confirming them took.
#[derive(Debug)]
pub struct Outcome {
    /// Messages acked.
    pub acked: usize,
    /// Messages nacked (none, unless the broker is in trouble).
    pub nacked: usize,
    /// The server-named queue the messages went to.
    pub queue: String,
    /// Publishing and confirming all of them.
    pub elapsed: Duration,
}

/// A channel in confirm mode and a fresh server-named queue on it.
async fn confirming_channel(connection: &Connection) -> Result<(Channel, String), Error> {
    let channel = connection.open_channel().await?;
    channel.confirm_select(confirm::Select::default()).await?;
    let declared = channel
        .queue_declare(queue::Declare {
            exclusive: true,
            ..Default::default()
        })
        .await?;
    Ok((channel, declared.queue.to_string()))
}

fn count(confirmation: Confirmation, acked: &mut usize, nacked: &mut usize) {
    match confirmation {
        Confirmation::Ack => *acked += 1,
        _ => *nacked += 1,
    }
}

async fn publish(channel: &Channel, queue: &str, n: usize) -> Result<PublishConfirm, Error> {
    channel
        .basic_publish("", queue, false, &BasicProperties::default(), n.to_string())
        .await
}

/// Strategy 1: each message's confirm is awaited before the next is published.
pub async fn publish_individually(
    connection: &Connection,
    messages: usize,
) -> Result<Outcome, Error> {
    let (channel, queue) = confirming_channel(connection).await?;
    let start = Instant::now();
    let (mut acked, mut nacked) = (0, 0);
    for n in 0..messages {
        let confirmation = publish(&channel, &queue, n).await?.await?;
        count(confirmation, &mut acked, &mut nacked);
    }
    let elapsed = start.elapsed();
    println!("Published {messages} messages individually in {elapsed:?}");
    Ok(Outcome {
        acked,
        nacked,
        queue,
        elapsed,
    })
}

/// Strategy 2: `batch` messages are published, then all of their confirms
/// awaited, then the next batch.
pub async fn publish_in_batches(
    connection: &Connection,
    messages: usize,
    batch: usize,
) -> Result<Outcome, Error> {
    let (channel, queue) = confirming_channel(connection).await?;
    let start = Instant::now();
    let (mut acked, mut nacked) = (0, 0);
    let mut outstanding = Vec::with_capacity(batch);
    for n in 0..messages {
        outstanding.push(publish(&channel, &queue, n).await?);
        if outstanding.len() == batch || n + 1 == messages {
            for confirm in outstanding.drain(..) {
                count(confirm.await?, &mut acked, &mut nacked);
            }
        }
    }
    let elapsed = start.elapsed();
    println!("Published {messages} messages in batches of {batch} in {elapsed:?}");
    Ok(Outcome {
        acked,
        nacked,
        queue,
        elapsed,
    })
}

/// Strategy 3: the confirms go to a task that handles each as it comes
/// (here: counts it; a real publisher would republish a nacked message)
/// while this one keeps publishing.
pub async fn handle_confirms_asynchronously(
    connection: &Connection,
    messages: usize,
) -> Result<Outcome, Error> {
    let (channel, queue) = confirming_channel(connection).await?;
    let start = Instant::now();
    // Bounded: at most this many confirms outstanding, so a slow broker
    // slows the publisher instead of growing memory.
    let (outstanding, mut confirms) = tokio::sync::mpsc::channel::<PublishConfirm>(10_000);
    let handler = tokio::spawn(async move {
        let (mut acked, mut nacked) = (0, 0);
        while let Some(confirm) = confirms.recv().await {
            count(confirm.await?, &mut acked, &mut nacked);
        }
        Ok::<_, Error>((acked, nacked))
    });
    for n in 0..messages {
        let confirm = publish(&channel, &queue, n).await?;
        if outstanding.send(confirm).await.is_err() {
            break; // the handler failed: its error is reported below
        }
    }
    drop(outstanding);
    let (acked, nacked) = handler.await.expect("the confirm handler panicked")?;
    let elapsed = start.elapsed();
    println!("Published {messages} messages and handled confirms asynchronously in {elapsed:?}");
    Ok(Outcome {
        acked,
        nacked,
        queue,
        elapsed,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let messages = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(10_000);
    let connection = Connection::open(&url).await?;
    publish_individually(&connection, messages).await?;
    publish_in_batches(&connection, messages, 100).await?;
    handle_confirms_asynchronously(&connection, messages).await?;
    connection.close().await?;
    Ok(())
}
