//! `amqp publish`.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::path::PathBuf;

use amqp091::prelude::*;
use amqp091::{BasicProperties, Channel, Confirmation, ConfirmationFuture, Connection};
use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::fail::{amqp, Code, Failure};
use crate::values::{short, PropertyArgs};
use crate::{progress_bar, Context};

/// `amqp publish`'s flags.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The exchange; the default "" routes by the queue's name.
    #[arg(short, long, default_value = "")]
    exchange: String,
    /// The routing key (with the default exchange: the queue's name).
    #[arg(short, long, default_value = "")]
    routing_key: String,
    /// The body. Without it, --file or --lines, all of stdin is one message.
    #[arg(conflicts_with_all = ["files", "lines"])]
    body: Option<String>,
    /// Publish a file's bytes as one message; repeat for more.
    #[arg(short, long = "file", value_name = "PATH", conflicts_with = "lines")]
    files: Vec<PathBuf>,
    /// One message per line of stdin (without its line ending).
    #[arg(short, long)]
    lines: bool,
    /// Ask the broker to return messages that no queue takes (exit 4).
    #[arg(short, long)]
    mandatory: bool,
    /// Do not put the channel in confirm mode: faster, but a nack or a
    /// return goes unnoticed.
    #[arg(long)]
    no_confirm: bool,
    /// Publishes awaiting their confirms at most, before waiting for the oldest.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    window: usize,
    #[command(flatten)]
    properties: PropertyArgs,
}

/// Publishes one message after another, keeping a window of confirms open.
struct Publisher {
    channel: Channel,
    method: basic::Publish,
    properties: BasicProperties,
    window: usize,
    pending: VecDeque<ConfirmationFuture>,
    published: u64,
    nacked: u64,
    returned: u64,
    /// The broker's reason for the first return, to name the cause.
    first_return: Option<String>,
    bar: indicatif::ProgressBar,
}

impl Publisher {
    async fn send(&mut self, body: Bytes) -> Result<(), Failure> {
        let confirm = self
            .channel
            .publish(self.method.clone(), &self.properties, body)
            .await
            .map_err(amqp("publish"))?;
        self.published += 1;
        self.bar.inc(1);
        self.pending.push_back(confirm.into_future());
        // Not in confirm mode the futures are ready at once: no wait here.
        if self.pending.len() >= self.window {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    async fn settle_oldest(&mut self) -> Result<(), Failure> {
        let Some(confirm) = self.pending.pop_front() else {
            return Ok(());
        };
        match confirm.await.map_err(amqp("publish"))? {
            Confirmation::Ack | Confirmation::NotRequested => {}
            Confirmation::Nack => self.nacked += 1,
            Confirmation::Returned(message) => {
                self.returned += 1;
                self.first_return.get_or_insert_with(|| {
                    format!("{} {}", message.reply_code, message.reply_text)
                });
            }
        }
        Ok(())
    }

    async fn finish(mut self, connection: &Connection) -> Result<(), Failure> {
        while !self.pending.is_empty() {
            self.settle_oldest().await?;
        }
        self.bar.finish();
        let _ = connection.close().await;
        if self.nacked + self.returned == 0 {
            return Ok(());
        }
        let mut causes = Vec::new();
        if let Some(reason) = &self.first_return {
            causes.push(format!("{} returned ({reason})", self.returned));
        }
        if self.nacked > 0 {
            causes.push(format!("{} nacked", self.nacked));
        }
        Err(Failure::new(
            Code::NotConfirmed,
            format!(
                "{} of {} messages not confirmed: {}",
                self.nacked + self.returned,
                self.published,
                causes.join(", ")
            ),
        ))
    }
}

/// Runs `amqp publish`.
pub async fn run(context: &Context, args: PublishArgs) -> Result<(), Failure> {
    let method = basic::Publish {
        exchange: short("the exchange name", &args.exchange)?,
        routing_key: short("the routing key", &args.routing_key)?,
        mandatory: args.mandatory,
        immediate: false,
    };
    let properties = args.properties.properties()?;
    // Files are read before connecting, so a typo in a path costs no connection.
    let mut files = Vec::with_capacity(args.files.len());
    for path in &args.files {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|error| Failure::usage(format!("cannot read {}: {error}", path.display())))?;
        files.push(Bytes::from(bytes));
    }
    let connection = context.connect().await?;
    let channel = connection
        .open_channel()
        .await
        .map_err(amqp("open a channel"))?;
    if !args.no_confirm {
        channel
            .confirm_select(confirm::Select { no_wait: false })
            .await
            .map_err(amqp("confirm.select"))?;
    }
    let bulk = args.lines || files.len() > 1;
    let length = (!args.lines).then_some(files.len() as u64);
    let bar = if bulk {
        progress_bar(context, length, "published")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut publisher = Publisher {
        channel,
        method,
        properties,
        window: args.window.max(1),
        pending: VecDeque::new(),
        published: 0,
        nacked: 0,
        returned: 0,
        first_return: None,
        bar,
    };
    if let Some(body) = args.body {
        publisher.send(Bytes::from(body)).await?;
    } else if !files.is_empty() {
        for body in files {
            publisher.send(body).await?;
        }
    } else if args.lines {
        let mut stdin = BufReader::with_capacity(64 * 1024, tokio::io::stdin());
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = stdin
                .read_until(b'\n', &mut line)
                .await
                .map_err(stdin_error)?;
            if read == 0 {
                break;
            }
            if line.last() == Some(&b'\n') {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
            }
            publisher.send(Bytes::copy_from_slice(&line)).await?;
        }
    } else {
        let mut body = Vec::new();
        tokio::io::stdin()
            .read_to_end(&mut body)
            .await
            .map_err(stdin_error)?;
        publisher.send(Bytes::from(body)).await?;
    }
    publisher.finish(&connection).await
}

fn stdin_error(error: std::io::Error) -> Failure {
    Failure::usage(format!("cannot read stdin: {error}"))
}
