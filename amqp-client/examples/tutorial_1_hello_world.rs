//! RabbitMQ tutorial 1, "Hello World!": one program sends a message to a
//! queue, another receives it.
//!
//! ```sh
//! cargo run -p amqp091 --example tutorial_1_hello_world -- send
//! cargo run -p amqp091 --example tutorial_1_hello_world -- receive   # until Ctrl-C
//! cargo run -p amqp091 --example tutorial_1_hello_world              # both: send, then receive it
//! ```
//!
//! The broker is `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! The functions are public so that `tests/tests/tutorials.rs` runs them.

use amqp091::prelude::*;
use amqp091::{BasicProperties, Connection, ConsumeOptions, Error};

/// Declares `queue` (so that the message has somewhere to go even before a
/// receiver started) and publishes `message` to it through the default
/// exchange.
pub async fn send(connection: &Connection, queue: &str, message: &str) -> Result<(), Error> {
    let channel = connection.open_channel().await?;
    channel
        .queue_declare(queue::Declare {
            queue: queue.into(),
            ..Default::default()
        })
        .await?;
    channel
        .basic_publish(
            "",
            queue,
            false,
            &BasicProperties::default(),
            message.to_owned(),
        )
        .await?;
    println!(" [x] Sent {message:?}");
    channel.close().await
}

/// Declares `queue` (whichever program runs first creates it) and prints
/// the messages it receives, `count` of them (or forever with `None`), with
/// automatic acks as in the tutorial.
pub async fn receive(
    connection: &Connection,
    queue: &str,
    count: Option<usize>,
) -> Result<Vec<String>, Error> {
    let channel = connection.open_channel().await?;
    channel
        .queue_declare(queue::Declare {
            queue: queue.into(),
            ..Default::default()
        })
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue,
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await?;
    println!(" [*] Waiting for messages. To exit press CTRL+C");
    let mut received = Vec::new();
    while count.is_none_or(|count| received.len() < count) {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let body = String::from_utf8_lossy(&delivery?.body).into_owned();
        println!(" [x] Received {body:?}");
        received.push(body);
    }
    consumer.cancel().await?;
    channel.close().await?;
    Ok(received)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let connection = Connection::open(&url).await?;
    match std::env::args().nth(1).as_deref() {
        Some("send") => send(&connection, "hello", "Hello World!").await?,
        Some("receive") => drop(receive(&connection, "hello", None).await?),
        None => {
            send(&connection, "hello", "Hello World!").await?;
            receive(&connection, "hello", Some(1)).await?;
        }
        Some(other) => return Err(format!("unknown command {other:?}: send or receive").into()),
    }
    connection.close().await?;
    Ok(())
}
