//! `amqp declare`, `delete`, `purge`, `bind` and `unbind`.

use amqp091::prelude::*;
use amqp091::{Channel, Connection, FieldTable, FieldValue, ShortString};

use crate::fail::{amqp, Failure};
use crate::values::{parse_entry, short, table};
use crate::Context;

/// The queue types RabbitMQ offers (`x-queue-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    /// The classic queue.
    Classic,
    /// A replicated Raft queue (durable, not exclusive).
    Quorum,
    /// An append-only log (durable, not exclusive).
    Stream,
}

/// `amqp declare queue`'s flags.
#[derive(Debug, clap::Args)]
pub struct DeclareQueue {
    /// The queue; "" lets the broker name it (the name is printed).
    name: String,
    /// x-queue-type. quorum and stream imply --durable.
    #[arg(long = "type", value_enum)]
    kind: Option<QueueType>,
    /// Survives a broker restart.
    #[arg(long)]
    durable: bool,
    /// Deleted when its last consumer goes.
    #[arg(long)]
    auto_delete: bool,
    /// Used by this connection only, deleted when it closes (so, with this
    /// tool, at once: for trying declares out).
    #[arg(long)]
    exclusive: bool,
    /// Only check that it exists (and print its name).
    #[arg(long)]
    passive: bool,
    /// x-message-ttl: milliseconds a message may wait in the queue.
    #[arg(long, value_name = "MS")]
    message_ttl: Option<i64>,
    /// x-expires: milliseconds unused before the queue is deleted.
    #[arg(long, value_name = "MS")]
    expires: Option<i64>,
    /// x-max-length: messages the queue holds at most.
    #[arg(long, value_name = "N")]
    max_length: Option<i64>,
    /// x-max-length-bytes: bytes of bodies the queue holds at most.
    #[arg(long, value_name = "BYTES")]
    max_length_bytes: Option<i64>,
    /// x-dead-letter-exchange.
    #[arg(long, value_name = "EXCHANGE")]
    dead_letter_exchange: Option<String>,
    /// x-dead-letter-routing-key.
    #[arg(long, value_name = "KEY")]
    dead_letter_routing_key: Option<String>,
    /// Any other argument, key=value (typed: key=int:5, key=bool:true,
    /// key=float:1.5); repeat for more. Wins over the flags above.
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    arguments: Vec<String>,
}

/// `amqp declare exchange`'s flags.
#[derive(Debug, clap::Args)]
pub struct DeclareExchange {
    /// The exchange.
    name: String,
    /// direct, fanout, topic, headers, or a plugin's (x-delayed-message…).
    #[arg(long = "type", default_value = "direct")]
    kind: String,
    /// Survives a broker restart.
    #[arg(long)]
    durable: bool,
    /// Deleted when its last binding goes.
    #[arg(long)]
    auto_delete: bool,
    /// Takes no publishes, only bindings from other exchanges.
    #[arg(long)]
    internal: bool,
    /// Only check that it exists.
    #[arg(long)]
    passive: bool,
    /// An argument, key=value (typed: key=int:5; alternate-exchange=NAME…);
    /// repeat for more.
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    arguments: Vec<String>,
}

/// `amqp declare`'s subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Declare {
    /// Declare a queue; prints its name.
    Queue(DeclareQueue),
    /// Declare an exchange.
    Exchange(DeclareExchange),
}

/// `amqp delete`'s subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Delete {
    /// Delete a queue; prints how many messages it held.
    Queue {
        /// The queue.
        name: String,
        /// Only if it has no consumers (else 406, exit 3).
        #[arg(long)]
        if_unused: bool,
        /// Only if it holds no messages (else 406, exit 3).
        #[arg(long)]
        if_empty: bool,
        /// Succeed when it does not exist.
        #[arg(long)]
        if_exists: bool,
    },
    /// Delete an exchange.
    Exchange {
        /// The exchange.
        name: String,
        /// Only if it has no bindings (else 406, exit 3).
        #[arg(long)]
        if_unused: bool,
        /// Succeed when it does not exist.
        #[arg(long)]
        if_exists: bool,
    },
}

/// `amqp purge`'s flags.
#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    /// The queue.
    queue: String,
}

/// A binding's ends and key.
#[derive(Debug, clap::Args)]
pub struct Binding {
    /// The destination: a queue for `queue`, an exchange for `exchange`.
    destination: String,
    /// The exchange messages come from.
    source: String,
    /// The binding key.
    #[arg(short, long, default_value = "")]
    routing_key: String,
    /// A binding argument, key=value (typed as for headers; the headers
    /// exchange's x-match=all…); repeat for more.
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    arguments: Vec<String>,
}

/// `amqp bind` and `amqp unbind`'s subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Bind {
    /// A queue to an exchange: QUEUE EXCHANGE.
    Queue(Binding),
    /// An exchange to an exchange: DESTINATION SOURCE.
    Exchange(Binding),
}

async fn open(context: &Context) -> Result<(Connection, Channel), Failure> {
    let connection = context.connect().await?;
    let channel = connection
        .open_channel()
        .await
        .map_err(amqp("open a channel"))?;
    Ok((connection, channel))
}

/// Closes the connection after `outcome`, which it passes on.
async fn done<T>(connection: Connection, outcome: Result<T, Failure>) -> Result<T, Failure> {
    let _ = connection.close().await;
    outcome
}

fn queue_arguments(args: &DeclareQueue) -> Result<FieldTable, Failure> {
    let mut arguments = FieldTable::new();
    let mut set = |key: &str, value: FieldValue| -> Result<(), Failure> {
        arguments.insert(short("an argument name", key)?, value);
        Ok(())
    };
    if let Some(kind) = args.kind {
        let name = match kind {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        };
        set("x-queue-type", name.into())?;
    }
    let numbers = [
        ("x-message-ttl", args.message_ttl),
        ("x-expires", args.expires),
        ("x-max-length", args.max_length),
        ("x-max-length-bytes", args.max_length_bytes),
    ];
    for (key, value) in numbers {
        if let Some(value) = value {
            set(key, FieldValue::I64(value))?;
        }
    }
    if let Some(exchange) = &args.dead_letter_exchange {
        set("x-dead-letter-exchange", exchange.as_str().into())?;
    }
    if let Some(key) = &args.dead_letter_routing_key {
        set("x-dead-letter-routing-key", key.as_str().into())?;
    }
    for entry in &args.arguments {
        let (key, value) = parse_entry(entry)?;
        arguments.insert(key, value);
    }
    Ok(arguments)
}

/// Runs `amqp declare`.
pub async fn declare(context: &Context, args: Declare) -> Result<(), Failure> {
    match args {
        Declare::Queue(args) => {
            let replicated = matches!(args.kind, Some(QueueType::Quorum | QueueType::Stream));
            let method = queue::Declare {
                queue: short("the queue name", &args.name)?,
                passive: args.passive,
                durable: args.durable || replicated,
                exclusive: args.exclusive,
                auto_delete: args.auto_delete,
                no_wait: false,
                arguments: queue_arguments(&args)?,
            };
            let (connection, channel) = open(context).await?;
            let outcome = channel
                .queue_declare(method)
                .await
                .map_err(amqp(format!("declare queue `{}`", args.name)));
            if let Ok(declared) = &outcome {
                println!("{}", declared.queue);
            }
            done(connection, outcome.map(drop)).await
        }
        Declare::Exchange(args) => {
            let method = exchange::Declare {
                exchange: short("the exchange name", &args.name)?,
                kind: short("the exchange type", &args.kind)?,
                passive: args.passive,
                durable: args.durable,
                auto_delete: args.auto_delete,
                internal: args.internal,
                no_wait: false,
                arguments: table(&args.arguments)?,
            };
            let (connection, channel) = open(context).await?;
            let outcome = channel
                .exchange_declare(method)
                .await
                .map(drop)
                .map_err(amqp(format!("declare exchange `{}`", args.name)));
            done(connection, outcome).await
        }
    }
}

/// Runs `amqp delete`. RabbitMQ answers a delete of something missing with
/// success, so unless --if-exists a passive declare checks first: a script
/// that deletes the wrong name hears of it.
pub async fn delete(context: &Context, args: Delete) -> Result<(), Failure> {
    match args {
        Delete::Queue {
            name,
            if_unused,
            if_empty,
            if_exists,
        } => {
            let queue = short("the queue name", &name)?;
            let (connection, channel) = open(context).await?;
            let context = format!("delete queue `{name}`");
            let outcome = async {
                if !if_exists {
                    channel
                        .queue_declare(queue::Declare {
                            queue: queue.clone(),
                            passive: true,
                            ..Default::default()
                        })
                        .await
                        .map_err(amqp(&context))?;
                }
                let deleted = channel
                    .queue_delete(queue::Delete {
                        queue,
                        if_unused,
                        if_empty,
                        no_wait: false,
                    })
                    .await
                    .map_err(amqp(&context))?;
                println!("{}", deleted.message_count);
                Ok(())
            }
            .await;
            done(connection, outcome).await
        }
        Delete::Exchange {
            name,
            if_unused,
            if_exists,
        } => {
            let exchange = short("the exchange name", &name)?;
            let (connection, channel) = open(context).await?;
            let context = format!("delete exchange `{name}`");
            let outcome = async {
                if !if_exists {
                    channel
                        .exchange_declare(exchange::Declare {
                            exchange: exchange.clone(),
                            passive: true,
                            ..Default::default()
                        })
                        .await
                        .map_err(amqp(&context))?;
                }
                channel
                    .exchange_delete(exchange::Delete {
                        exchange,
                        if_unused,
                        no_wait: false,
                    })
                    .await
                    .map_err(amqp(&context))?;
                Ok(())
            }
            .await;
            done(connection, outcome).await
        }
    }
}

/// Runs `amqp purge`.
pub async fn purge(context: &Context, args: PurgeArgs) -> Result<(), Failure> {
    let queue = short("the queue name", &args.queue)?;
    let (connection, channel) = open(context).await?;
    let outcome = channel
        .queue_purge(queue::Purge {
            queue,
            no_wait: false,
        })
        .await
        .map_err(amqp(format!("purge queue `{}`", args.queue)));
    if let Ok(purged) = &outcome {
        println!("{}", purged.message_count);
    }
    done(connection, outcome.map(drop)).await
}

/// Runs `amqp bind` (`bind` true) or `amqp unbind`.
pub async fn bind(context: &Context, args: Bind, bind: bool) -> Result<(), Failure> {
    let (is_queue, binding) = match args {
        Bind::Queue(binding) => (true, binding),
        Bind::Exchange(binding) => (false, binding),
    };
    let destination = short("the destination", &binding.destination)?;
    let source = short("the source exchange", &binding.source)?;
    let routing_key = short("the routing key", &binding.routing_key)?;
    let arguments = table(&binding.arguments)?;
    let what = format!(
        "{} {} `{}` to exchange `{}`",
        if bind { "bind" } else { "unbind" },
        if is_queue { "queue" } else { "exchange" },
        binding.destination,
        binding.source
    );
    let (connection, channel) = open(context).await?;
    let outcome = async {
        // RabbitMQ answers an unbind of a missing queue or exchange with
        // success; a script that names the wrong one should hear of it.
        if !bind {
            check_binding_ends(&channel, is_queue, &destination, &source).await?;
        }
        let call = BindingCall {
            is_queue,
            bind,
            destination,
            source,
            routing_key,
            arguments,
        };
        call.run(&channel).await
    }
    .await;
    done(connection, outcome.map_err(amqp(what))).await
}

/// Passive declares of a binding's destination and source.
async fn check_binding_ends(
    channel: &Channel,
    is_queue: bool,
    destination: &ShortString,
    source: &ShortString,
) -> Result<(), amqp091::Error> {
    if is_queue {
        channel
            .queue_declare(queue::Declare {
                queue: destination.clone(),
                passive: true,
                ..Default::default()
            })
            .await?;
    } else {
        passive_exchange(channel, destination).await?;
    }
    passive_exchange(channel, source).await
}

async fn passive_exchange(channel: &Channel, name: &ShortString) -> Result<(), amqp091::Error> {
    channel
        .exchange_declare(exchange::Declare {
            exchange: name.clone(),
            passive: true,
            ..Default::default()
        })
        .await
        .map(drop)
}

/// A bind or unbind, of a queue or an exchange.
struct BindingCall {
    is_queue: bool,
    bind: bool,
    destination: ShortString,
    source: ShortString,
    routing_key: ShortString,
    arguments: FieldTable,
}

impl BindingCall {
    async fn run(self, channel: &Channel) -> Result<(), amqp091::Error> {
        let BindingCall {
            is_queue,
            bind,
            destination,
            source,
            routing_key,
            arguments,
        } = self;
        match (is_queue, bind) {
            (true, true) => channel
                .queue_bind(queue::Bind {
                    queue: destination,
                    exchange: source,
                    routing_key,
                    no_wait: false,
                    arguments,
                })
                .await
                .map(drop),
            (true, false) => channel
                .queue_unbind(queue::Unbind {
                    queue: destination,
                    exchange: source,
                    routing_key,
                    arguments,
                })
                .await
                .map(drop),
            (false, true) => channel
                .exchange_bind(exchange::Bind {
                    destination,
                    source,
                    routing_key,
                    no_wait: false,
                    arguments,
                })
                .await
                .map(drop),
            (false, false) => channel
                .exchange_unbind(exchange::Unbind {
                    destination,
                    source,
                    routing_key,
                    no_wait: false,
                    arguments,
                })
                .await
                .map(drop),
        }
    }
}
