//! Declare a queue, publish a message, consume it, ack it, close.
//!
//! `cargo xtask quickstart` (makes sure a broker answers at `AMQP_URL` first),
//! or `cargo run -p amqp091 --example quickstart`.

use amqp091::prelude::*;
use amqp091::{BasicProperties, Config, Connection, ConsumeOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    // The URL may hold a password: print only where it points.
    let address = url.parse::<Config>()?.address();
    let connection = Connection::open(&url).await?;
    println!("connected to {address}");

    let channel = connection.open_channel().await?;
    let declared = channel
        .queue_declare(queue::Declare {
            queue: "amqp-client.quickstart".into(),
            auto_delete: true,
            ..Default::default()
        })
        .await?;
    println!(
        "declared queue {} ({} messages waiting)",
        declared.queue, declared.message_count
    );

    let properties = BasicProperties::default()
        .with_content_type("text/plain")
        .with_message_id("1");
    channel
        .basic_publish(
            "",
            &declared.queue,
            false,
            &properties,
            "hello from amqp091",
        )
        .await?;
    println!("published");

    let mut consumer = channel
        .basic_consume(&declared.queue, ConsumeOptions::default())
        .await?;
    let delivery = consumer.next().await.ok_or("the consumer ended")??;
    println!(
        "received {:?} (delivery tag {}, content type {:?})",
        String::from_utf8_lossy(&delivery.body),
        delivery.envelope.delivery_tag,
        delivery
            .properties
            .content_type
            .as_ref()
            .map(|t| t.to_string_lossy())
    );
    delivery.ack().await?;
    println!("acked");

    consumer.cancel().await?;
    channel.close().await?;
    connection.close().await?;
    println!("closed");
    Ok(())
}
