//! `amqp consume` and `amqp get`.

use std::io::Write;
use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{ConsumeOptions, Delivery};
use serde_json::{json, Map, Value};

use crate::fail::{amqp, Code, Failure};
use crate::values::{body_json, properties_json, short, table};
use crate::{progress_bar, Context};

/// What happens to a message once it is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AckMode {
    /// Ack it after it is written out: a message is never lost, and one
    /// printed just before a crash may come again.
    Ack,
    /// The broker forgets it as it sends it (no-ack): fastest, but with
    /// --count the messages it sent beyond the count are lost.
    Auto,
    /// Reject it after it is written out: dropped or dead-lettered, or with
    /// --requeue put back (a peek).
    Reject,
}

/// How deliveries are written and settled; shared by consume and get.
#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// Print one JSON object per message: envelope, properties, body.
    #[arg(long)]
    json: bool,
    /// What to do with a message once it is printed.
    #[arg(long, value_enum, default_value_t = AckMode::Ack)]
    ack_mode: AckMode,
    /// With --ack-mode reject: put messages back in the queue.
    #[arg(long)]
    requeue: bool,
}

impl OutputArgs {
    fn check(&self) -> Result<(), Failure> {
        if self.requeue && self.ack_mode != AckMode::Reject {
            return Err(Failure::usage("--requeue needs --ack-mode reject"));
        }
        Ok(())
    }
}

/// `amqp consume`'s flags.
#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    /// The queue.
    queue: String,
    /// Stop after this many messages.
    #[arg(short = 'n', long)]
    count: Option<u64>,
    /// Give up when no message arrives for this many seconds: exit 5 when
    /// fewer than --count (without --count: none at all) arrived.
    #[arg(short, long, value_name = "SECS", value_parser = parse_seconds)]
    timeout: Option<Duration>,
    /// Messages the broker may send ahead of their acks (basic.qos).
    #[arg(long, default_value_t = 100)]
    prefetch: u16,
    /// The only consumer of the queue.
    #[arg(long)]
    exclusive: bool,
    /// A consumer argument, key=value (typed as for headers: x-priority=int:5,
    /// x-stream-offset=first); repeat for more.
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    arguments: Vec<String>,
    #[command(flatten)]
    output: OutputArgs,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| "expected a number of seconds".to_owned())
}

/// `amqp get`'s flags.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// The queue.
    queue: String,
    #[command(flatten)]
    output: OutputArgs,
}

/// Writes one delivery: its body and a newline, or its JSON line.
fn write_delivery(
    out: &mut impl Write,
    delivery: &Delivery,
    json: bool,
    message_count: Option<u32>,
) -> std::io::Result<()> {
    if json {
        let envelope = &delivery.envelope;
        let mut line = Map::new();
        line.insert(
            "exchange".into(),
            json!(envelope.exchange.to_string_lossy()),
        );
        line.insert(
            "routing_key".into(),
            json!(envelope.routing_key.to_string_lossy()),
        );
        line.insert("redelivered".into(), json!(envelope.redelivered));
        line.insert("delivery_tag".into(), json!(envelope.delivery_tag));
        if !envelope.consumer_tag.is_empty() {
            line.insert(
                "consumer_tag".into(),
                json!(envelope.consumer_tag.to_string_lossy()),
            );
        }
        if let Some(count) = message_count {
            line.insert("message_count".into(), json!(count));
        }
        line.insert(
            "properties".into(),
            properties_json(delivery.properties.get()),
        );
        body_json(&delivery.body, &mut line);
        serde_json::to_writer(&mut *out, &Value::Object(line))?;
    } else {
        out.write_all(&delivery.body)?;
    }
    out.write_all(b"\n")?;
    // Flushed before the ack: an acked message must have left the process.
    out.flush()
}

async fn settle(delivery: &Delivery, output: &OutputArgs) -> Result<(), Failure> {
    match output.ack_mode {
        AckMode::Ack => delivery.ack().await.map_err(amqp("ack")),
        AckMode::Reject => delivery
            .reject(output.requeue)
            .await
            .map_err(amqp("reject")),
        AckMode::Auto => Ok(()),
    }
}

fn output_error(error: std::io::Error) -> Failure {
    Failure::usage(format!("cannot write the output: {error}"))
}

/// Runs `amqp consume`.
pub async fn consume(context: &Context, args: ConsumeArgs) -> Result<(), Failure> {
    args.output.check()?;
    let arguments = table(&args.arguments)?;
    short("the queue name", &args.queue)?;
    if args.count == Some(0) {
        return Ok(());
    }
    let connection = context.connect().await?;
    let channel = connection
        .open_channel()
        .await
        .map_err(amqp("open a channel"))?;
    channel
        .basic_qos(basic::Qos {
            prefetch_size: 0,
            prefetch_count: args.prefetch,
            global: false,
        })
        .await
        .map_err(amqp("basic.qos"))?;
    let queue = &args.queue;
    let mut consumer = channel
        .basic_consume(
            queue,
            ConsumeOptions {
                no_ack: args.output.ack_mode == AckMode::Auto,
                exclusive: args.exclusive,
                arguments,
                ..Default::default()
            },
        )
        .await
        .map_err(amqp(format!("consume from queue `{queue}`")))?;
    let bar = progress_bar(context, args.count, "consumed");
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut received = 0u64;
    let outcome = loop {
        if args.count.is_some_and(|count| received >= count) {
            break Ok(());
        }
        let next = match args.timeout {
            Some(timeout) => match tokio::time::timeout(timeout, consumer.next()).await {
                Ok(next) => next,
                Err(_) => break timed_out(queue, received, args.count, timeout),
            },
            None => consumer.next().await,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => break Err(amqp(format!("consume from queue `{queue}`"))(error)),
            None => break Ok(()),
        };
        match write_delivery(&mut out, &delivery, args.output.json, None) {
            Ok(()) => {}
            // A reader that went away (`| head`) ends the consumer, not in
            // error; the unwritten message is not acked, so it is requeued.
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => break Ok(()),
            Err(error) => break Err(output_error(error)),
        }
        if let Err(failure) = settle(&delivery, &args.output).await {
            break Err(failure);
        }
        received += 1;
        bar.inc(1);
    };
    bar.finish();
    drop(out);
    // The close goes behind the acks on the channel's queue, so the acks
    // are written before it.
    let _ = connection.close().await;
    outcome
}

fn timed_out(
    queue: &str,
    received: u64,
    count: Option<u64>,
    timeout: Duration,
) -> Result<(), Failure> {
    match count {
        None if received > 0 => Ok(()),
        None => Err(Failure::new(
            Code::Timeout,
            format!("no message arrived from queue `{queue}` within {timeout:?}"),
        )),
        Some(count) => Err(Failure::new(
            Code::Timeout,
            format!(
                "{received} of {count} messages arrived from queue `{queue}` before the timeout ({timeout:?} without a message)"
            ),
        )),
    }
}

/// Runs `amqp get`.
pub async fn get(context: &Context, args: GetArgs) -> Result<(), Failure> {
    args.output.check()?;
    short("the queue name", &args.queue)?;
    let connection = context.connect().await?;
    let channel = connection
        .open_channel()
        .await
        .map_err(amqp("open a channel"))?;
    let queue = &args.queue;
    let message = channel
        .basic_get(queue, args.output.ack_mode == AckMode::Auto)
        .await
        .map_err(amqp(format!("get from queue `{queue}`")))?;
    let Some(message) = message else {
        let _ = connection.close().await;
        return Err(Failure::new(
            Code::Empty,
            format!("queue `{queue}` is empty"),
        ));
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let written = write_delivery(
        &mut out,
        &message.delivery,
        args.output.json,
        Some(message.message_count),
    );
    let outcome = match written {
        Ok(()) => settle(&message.delivery, &args.output).await,
        Err(error) => Err(output_error(error)),
    };
    let _ = connection.close().await;
    outcome
}
