//! RabbitMQ tutorial 3, "Publish/Subscribe": a log emitter publishes to a
//! fanout exchange, which copies each message to every bound queue; each
//! receiver binds a server-named, exclusive queue of its own, so every
//! receiver gets every log, and only those sent while it runs.
//!
//! ```sh
//! cargo run -p amqp091 --example tutorial_3_publish_subscribe -- receive_logs   # in two terminals
//! cargo run -p amqp091 --example tutorial_3_publish_subscribe -- emit_log info: Hello World!
//! cargo run -p amqp091 --example tutorial_3_publish_subscribe                   # a demo: two receivers, three logs
//! ```
//!
//! The broker is `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! The functions are public so that `tests/tests/tutorials.rs` runs them.

use amqp091::prelude::*;
use amqp091::{BasicProperties, Channel, Connection, ConsumeOptions, Consumer, Error};

async fn declare_logs(channel: &Channel, exchange: &str) -> Result<(), Error> {
    channel
        .exchange_declare(exchange::Declare {
            exchange: exchange.into(),
            kind: "fanout".into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Publishes `message` to the fanout `exchange` (the routing key is ignored).
pub async fn emit_log(connection: &Connection, exchange: &str, message: &str) -> Result<(), Error> {
    let channel = connection.open_channel().await?;
    declare_logs(&channel, exchange).await?;
    channel
        .basic_publish(
            exchange,
            "",
            false,
            &BasicProperties::default(),
            message.to_owned(),
        )
        .await?;
    println!(" [x] Sent {message:?}");
    channel.close().await
}

/// Binds a fresh server-named exclusive queue to `exchange` and consumes it:
/// from now on the returned consumer gets every log.
pub async fn subscribe(connection: &Connection, exchange: &str) -> Result<Consumer, Error> {
    let channel = connection.open_channel().await?;
    declare_logs(&channel, exchange).await?;
    // An empty name asks the broker for one; exclusive: deleted with the connection.
    let declared = channel
        .queue_declare(queue::Declare {
            exclusive: true,
            ..Default::default()
        })
        .await?;
    channel
        .queue_bind(queue::Bind {
            queue: declared.queue.clone(),
            exchange: exchange.into(),
            ..Default::default()
        })
        .await?;
    let options = ConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    channel.basic_consume(&declared.queue, options).await
}

/// Prints the logs `consumer` receives, `count` of them (or forever with `None`).
pub async fn receive_logs(
    mut consumer: Consumer,
    count: Option<usize>,
) -> Result<Vec<String>, Error> {
    println!(" [*] Waiting for logs. To exit press CTRL+C");
    let mut received = Vec::new();
    while count.is_none_or(|count| received.len() < count) {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let log = String::from_utf8_lossy(&delivery?.body).into_owned();
        println!(" [x] {log}");
        received.push(log);
    }
    consumer.cancel().await?;
    Ok(received)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let connection = Connection::open(&url).await?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("emit_log") => {
            let message = match args[1..].join(" ") {
                message if message.is_empty() => "info: Hello World!".to_owned(),
                message => message,
            };
            emit_log(&connection, "logs", &message).await?;
        }
        Some("receive_logs") => {
            drop(receive_logs(subscribe(&connection, "logs").await?, None).await?)
        }
        None => {
            let first = subscribe(&connection, "logs").await?;
            let second = subscribe(&connection, "logs").await?;
            let logs = [
                "info: starting",
                "warning: disk 90% full",
                "error: disk full",
            ];
            for log in logs {
                emit_log(&connection, "logs", log).await?;
            }
            println!(
                "first receiver: {:?}",
                receive_logs(first, Some(logs.len())).await?
            );
            println!(
                "second receiver: {:?}",
                receive_logs(second, Some(logs.len())).await?
            );
        }
        Some(other) => {
            return Err(format!("unknown command {other:?}: emit_log or receive_logs").into())
        }
    }
    connection.close().await?;
    Ok(())
}
