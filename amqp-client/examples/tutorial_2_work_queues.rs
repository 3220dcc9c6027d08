//! RabbitMQ tutorial 2, "Work Queues": tasks go to a durable queue as
//! persistent messages; workers take one at a time (prefetch 1), work for a
//! second per dot in the task, and ack when done, so a worker that dies
//! loses no task and a busy one is not given more.
//!
//! ```sh
//! cargo run -p amqp091 --example tutorial_2_work_queues -- worker            # in two terminals
//! cargo run -p amqp091 --example tutorial_2_work_queues -- new_task First message.
//! cargo run -p amqp091 --example tutorial_2_work_queues -- new_task Third message...
//! cargo run -p amqp091 --example tutorial_2_work_queues                      # a demo: two workers, five tasks
//! ```
//!
//! The broker is `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! The functions are public so that `tests/tests/tutorials.rs` runs them.

use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{BasicProperties, Channel, Connection, ConsumeOptions, Error};

/// A queue that survives a broker restart.
async fn declare_task_queue(channel: &Channel, queue: &str) -> Result<(), Error> {
    channel
        .queue_declare(queue::Declare {
            queue: queue.into(),
            durable: true,
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Publishes `task` to `queue` as a persistent message (delivery mode 2).
pub async fn new_task(connection: &Connection, queue: &str, task: &str) -> Result<(), Error> {
    let channel = connection.open_channel().await?;
    declare_task_queue(&channel, queue).await?;
    let persistent = BasicProperties::default().with_delivery_mode(2);
    channel
        .basic_publish("", queue, false, &persistent, task.to_owned())
        .await?;
    println!(" [x] Sent {task:?}");
    channel.close().await
}

/// Takes tasks from `queue` one at a time, "works" `per_dot` for each dot in
/// a task, and acks it when done. Returns the tasks done once no task came
/// for `idle` (never, with `None`).
pub async fn worker(
    connection: &Connection,
    queue: &str,
    per_dot: Duration,
    idle: Option<Duration>,
) -> Result<Vec<String>, Error> {
    let channel = connection.open_channel().await?;
    declare_task_queue(&channel, queue).await?;
    // Fair dispatch: no new task for this worker until it acked the last.
    channel
        .basic_qos(basic::Qos {
            prefetch_count: 1,
            ..Default::default()
        })
        .await?;
    let mut consumer = channel
        .basic_consume(queue, ConsumeOptions::default())
        .await?;
    println!(" [*] Waiting for messages. To exit press CTRL+C");
    let mut done = Vec::new();
    loop {
        let next = match idle {
            Some(idle) => match tokio::time::timeout(idle, consumer.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => consumer.next().await,
        };
        let Some(delivery) = next else { break };
        let delivery = delivery?;
        let task = String::from_utf8_lossy(&delivery.body).into_owned();
        println!(" [x] Received {task:?}");
        let dots = task.matches('.').count() as u32;
        tokio::time::sleep(per_dot * dots).await;
        println!(" [x] Done");
        delivery.ack().await?;
        done.push(task);
    }
    consumer.cancel().await?;
    channel.close().await?;
    Ok(done)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let connection = Connection::open(&url).await?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let second = Duration::from_secs(1);
    match args.first().map(String::as_str) {
        Some("new_task") => {
            let task = match args[1..].join(" ") {
                task if task.is_empty() => "Hello World!".to_owned(),
                task => task,
            };
            new_task(&connection, "task_queue", &task).await?;
        }
        Some("worker") => drop(worker(&connection, "task_queue", second, None).await?),
        None => {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    let connection = connection.clone();
                    tokio::spawn(async move {
                        worker(&connection, "task_queue", second / 10, Some(2 * second)).await
                    })
                })
                .collect();
            for task in ["First.", "Second..", "Third...", "Fourth....", "Fifth....."] {
                new_task(&connection, "task_queue", task).await?;
            }
            for (n, worker) in workers.into_iter().enumerate() {
                println!("worker {n} did {:?}", worker.await??);
            }
        }
        Some(other) => return Err(format!("unknown command {other:?}: new_task or worker").into()),
    }
    connection.close().await?;
    Ok(())
}
