//! RabbitMQ tutorial 4, "Routing": logs go to a direct exchange with their
//! severity as routing key; each receiver binds its queue once per severity
//! it wants, and gets only those.
//!
//! ```sh
//! cargo run -p amqp091 --example tutorial_4_routing -- receive_logs_direct warning error
//! cargo run -p amqp091 --example tutorial_4_routing -- receive_logs_direct info warning error
//! cargo run -p amqp091 --example tutorial_4_routing -- emit_log_direct error "Run. Run. Or it will explode."
//! cargo run -p amqp091 --example tutorial_4_routing        # a demo of the two receivers above
//! ```
//!
//! The broker is `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! The functions are public so that `tests/tests/tutorials.rs` runs them.

use amqp091::prelude::*;
use amqp091::{BasicProperties, Channel, Connection, ConsumeOptions, Consumer, Error};

async fn declare_direct_logs(channel: &Channel, exchange: &str) -> Result<(), Error> {
    channel
        .exchange_declare(exchange::Declare {
            exchange: exchange.into(),
            kind: "direct".into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Publishes `message` to the direct `exchange` with `severity` as routing key.
pub async fn emit_log_direct(
    connection: &Connection,
    exchange: &str,
    severity: &str,
    message: &str,
) -> Result<(), Error> {
    let channel = connection.open_channel().await?;
    declare_direct_logs(&channel, exchange).await?;
    channel
        .basic_publish(
            exchange,
            severity,
            false,
            &BasicProperties::default(),
            message.to_owned(),
        )
        .await?;
    println!(" [x] Sent {severity}:{message:?}");
    channel.close().await
}

/// Binds a fresh server-named exclusive queue to `exchange` once for each
/// of `severities` and consumes it.
pub async fn subscribe(
    connection: &Connection,
    exchange: &str,
    severities: &[&str],
) -> Result<Consumer, Error> {
    let channel = connection.open_channel().await?;
    declare_direct_logs(&channel, exchange).await?;
    let declared = channel
        .queue_declare(queue::Declare {
            exclusive: true,
            ..Default::default()
        })
        .await?;
    for severity in severities {
        channel
            .queue_bind(queue::Bind {
                queue: declared.queue.clone(),
                exchange: exchange.into(),
                routing_key: (*severity).into(),
                ..Default::default()
            })
            .await?;
    }
    let options = ConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    channel.basic_consume(&declared.queue, options).await
}

/// Prints the logs `consumer` receives as `severity:message`, `count` of
/// them (or forever with `None`).
pub async fn receive_logs_direct(
    mut consumer: Consumer,
    count: Option<usize>,
) -> Result<Vec<String>, Error> {
    println!(" [*] Waiting for logs. To exit press CTRL+C");
    let mut received = Vec::new();
    while count.is_none_or(|count| received.len() < count) {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let delivery = delivery?;
        let log = format!(
            "{}:{}",
            delivery.envelope.routing_key,
            String::from_utf8_lossy(&delivery.body)
        );
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
    let exchange = "direct_logs";
    match args.first().map(String::as_str) {
        Some("emit_log_direct") => {
            let severity = args.get(1).map(String::as_str).unwrap_or("info");
            let message = match args.get(2..).map(|rest| rest.join(" ")) {
                Some(message) if !message.is_empty() => message,
                _ => "Hello World!".to_owned(),
            };
            emit_log_direct(&connection, exchange, severity, &message).await?;
        }
        Some("receive_logs_direct") => {
            let severities: Vec<&str> = args[1..].iter().map(String::as_str).collect();
            if severities.is_empty() {
                return Err("usage: receive_logs_direct [info] [warning] [error]".into());
            }
            let consumer = subscribe(&connection, exchange, &severities).await?;
            drop(receive_logs_direct(consumer, None).await?);
        }
        None => {
            let to_disk = subscribe(&connection, exchange, &["warning", "error"]).await?;
            let to_screen = subscribe(&connection, exchange, &["info", "warning", "error"]).await?;
            for (severity, message) in [
                ("info", "starting"),
                ("warning", "low disk"),
                ("error", "disk full"),
            ] {
                emit_log_direct(&connection, exchange, severity, message).await?;
            }
            println!(
                "to disk: {:?}",
                receive_logs_direct(to_disk, Some(2)).await?
            );
            println!(
                "to screen: {:?}",
                receive_logs_direct(to_screen, Some(3)).await?
            );
        }
        Some(other) => {
            return Err(format!(
                "unknown command {other:?}: emit_log_direct or receive_logs_direct"
            )
            .into())
        }
    }
    connection.close().await?;
    Ok(())
}
