//! RabbitMQ tutorial 5, "Topics": routing keys are dot-separated words
//! (`<speed>.<colour>.<species>`, or `<facility>.<severity>` for logs); a
//! topic exchange matches them against binding keys where `*` stands for
//! exactly one word and `#` for zero or more.
//!
//! ```sh
//! cargo run -p amqp091 --example tutorial_5_topics -- receive_logs_topic "kern.*" "*.critical"
//! cargo run -p amqp091 --example tutorial_5_topics -- emit_log_topic kern.critical "A critical kernel error"
//! cargo run -p amqp091 --example tutorial_5_topics        # a demo with the tutorial's rabbits
//! ```
//!
//! The broker is `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! The functions are public so that `tests/tests/tutorials.rs` runs them.

use amqp091::prelude::*;
use amqp091::{BasicProperties, Channel, Connection, ConsumeOptions, Consumer, Error};

async fn declare_topic_logs(channel: &Channel, exchange: &str) -> Result<(), Error> {
    channel
        .exchange_declare(exchange::Declare {
            exchange: exchange.into(),
            kind: "topic".into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Publishes `message` to the topic `exchange` with `routing_key`.
pub async fn emit_log_topic(
    connection: &Connection,
    exchange: &str,
    routing_key: &str,
    message: &str,
) -> Result<(), Error> {
    let channel = connection.open_channel().await?;
    declare_topic_logs(&channel, exchange).await?;
    channel
        .basic_publish(
            exchange,
            routing_key,
            false,
            &BasicProperties::default(),
            message.to_owned(),
        )
        .await?;
    println!(" [x] Sent {routing_key}:{message:?}");
    channel.close().await
}

/// Binds a fresh server-named exclusive queue to `exchange` with each of
/// `binding_keys` (patterns with `*` and `#`) and consumes it.
pub async fn subscribe(
    connection: &Connection,
    exchange: &str,
    binding_keys: &[&str],
) -> Result<Consumer, Error> {
    let channel = connection.open_channel().await?;
    declare_topic_logs(&channel, exchange).await?;
    let declared = channel
        .queue_declare(queue::Declare {
            exclusive: true,
            ..Default::default()
        })
        .await?;
    for binding_key in binding_keys {
        channel
            .queue_bind(queue::Bind {
                queue: declared.queue.clone(),
                exchange: exchange.into(),
                routing_key: (*binding_key).into(),
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

/// Prints what `consumer` receives as `routing_key:message`, `count` of
/// them (or forever with `None`).
pub async fn receive_logs_topic(
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
    let exchange = "topic_logs";
    match args.first().map(String::as_str) {
        Some("emit_log_topic") => {
            let routing_key = args.get(1).map(String::as_str).unwrap_or("anonymous.info");
            let message = match args.get(2..).map(|rest| rest.join(" ")) {
                Some(message) if !message.is_empty() => message,
                _ => "Hello World!".to_owned(),
            };
            emit_log_topic(&connection, exchange, routing_key, &message).await?;
        }
        Some("receive_logs_topic") => {
            let binding_keys: Vec<&str> = args[1..].iter().map(String::as_str).collect();
            if binding_keys.is_empty() {
                return Err("usage: receive_logs_topic [binding_key]...".into());
            }
            let consumer = subscribe(&connection, exchange, &binding_keys).await?;
            drop(receive_logs_topic(consumer, None).await?);
        }
        None => {
            let orange = subscribe(&connection, exchange, &["*.orange.*"]).await?;
            let lazy_rabbits = subscribe(&connection, exchange, &["*.*.rabbit", "lazy.#"]).await?;
            for routing_key in [
                "quick.orange.rabbit",
                "lazy.orange.elephant",
                "quick.orange.fox",
                "lazy.brown.fox",
                "quick.brown.fox",
                "lazy.orange.new.rabbit",
            ] {
                emit_log_topic(&connection, exchange, routing_key, "hello").await?;
            }
            println!(
                "*.orange.*: {:?}",
                receive_logs_topic(orange, Some(3)).await?
            );
            println!(
                "*.*.rabbit, lazy.#: {:?}",
                receive_logs_topic(lazy_rabbits, Some(4)).await?
            );
        }
        Some(other) => {
            return Err(
                format!("unknown command {other:?}: emit_log_topic or receive_logs_topic").into(),
            )
        }
    }
    connection.close().await?;
    Ok(())
}
