//! An AMQP 0-9-1 client for RabbitMQ, on tokio: publisher confirms,
//! consumers as streams, automatic connection recovery, TLS.
//!
//! # A short tour
//!
//! Connect with a URL (or a [`Config`]), open a [`Channel`], declare a queue,
//! publish with a confirm, consume, close:
//!
//! ```no_run
//! use amqp091::prelude::*;
//! use amqp091::{BasicProperties, Confirmation, Connection, ConsumeOptions};
//!
//! # async fn example() -> Result<(), amqp091::Error> {
//! let connection = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let channel = connection.open_channel().await?;
//! channel
//!     .queue_declare(queue::Declare { queue: "jobs".into(), durable: true, ..Default::default() })
//!     .await?;
//!
//! // In confirm mode each publish resolves to the broker's ack or nack.
//! channel.confirm_select(confirm::Select::default()).await?;
//! let properties = BasicProperties::default().with_delivery_mode(2);
//! let confirm = channel.basic_publish("", "jobs", false, &properties, "work").await?;
//! assert_eq!(confirm.await?, Confirmation::Ack);
//!
//! let mut consumer = channel.basic_consume("jobs", ConsumeOptions::default()).await?;
//! if let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     println!("got {:?}", delivery.body);
//!     delivery.ack().await?;
//! }
//! connection.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Where things are
//!
//! - **Connecting**: [`Connection::open`] takes a URL; [`Config`] says
//!   everything a URL can and more (TLS with [`TlsConfig`], fallback
//!   addresses, timeouts); [`Connection::builder`] adds an on-connect hook,
//!   error handlers and a credentials provider ([`ConnectionBuilder`]).
//! - **Channel methods**: [`Channel`] publishes ([`Channel::basic_publish`]),
//!   consumes ([`Channel::basic_consume`], giving a [`Consumer`] of
//!   [`Delivery`]s), gets ([`Channel::basic_get`]) and waits for confirms.
//!   The spec's other methods (`queue_declare`, `exchange_bind`, `basic_qos`,
//!   `confirm_select`…) take one of the method structs that [`prelude`]
//!   brings into scope (`queue::Declare`…), with their replies typed.
//! - **Errors**: every call fails with [`Error`]; a close by the broker
//!   carries its reply code and text ([`Error::reply_code`],
//!   [`CloseReason`]).
//! - **Recovery**: a lost connection is recovered by default, with backoff,
//!   its channels, topology and consumers included ([`RecoveryConfig`]);
//!   [`Connection::recovery_events`] reports each step as a
//!   [`RecoveryEvent`]:
//!
//! ```no_run
//! use amqp091::{Connection, RecoveryEvent};
//! use tokio::sync::broadcast::error::RecvError;
//!
//! # async fn example() -> Result<(), amqp091::Error> {
//! let connection = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let mut events = connection.recovery_events();
//! tokio::spawn(async move {
//!     loop {
//!         match events.recv().await {
//!             Ok(RecoveryEvent::Recovering { cause }) => eprintln!("connection lost: {cause}"),
//!             Ok(RecoveryEvent::Recovered) => eprintln!("connection recovered"),
//!             Ok(_) | Err(RecvError::Lagged(_)) => {}
//!             Err(RecvError::Closed) => break,
//!         }
//!     }
//! });
//! # Ok(())
//! # }
//! ```
//!
//! The [`protocol`] module is generated from the spec XML (plus hand-written
//! wire primitives and the frame codec); the rest is the async core.

pub mod arguments;
#[cfg(feature = "blocking")]
pub mod blocking;
pub mod channel;
mod command_queue;
pub mod config;
mod connect;
pub mod connection;
pub mod consumer;
mod credit;
pub mod error;
mod events;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod io;
mod link;
mod machine;
mod outbox;
mod ports;
pub mod protocol;
pub mod rpc_client;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod simulation;
mod sync;
pub mod telemetry;
mod topology;
pub mod trace_context;
mod transport;
mod unsettled;

/// The rustls this client is built with, to build a
/// [`TlsConfig::with_client_config`] of the matching version (feature `tls`).
#[cfg(feature = "tls")]
pub use tokio_rustls::rustls;

pub use arguments::{
    ConsumeArguments, Interval, IntervalUnit, InvalidInterval, Overflow, QueueArguments, QueueType,
    StreamOffset,
};
pub use channel::{Channel, ConfirmationFuture, ConsumeOptions, PublishConfirm};
#[cfg(feature = "tls")]
pub use config::ReadyClientConfig;
pub use config::{AuthMechanism, Config, RecoveryConfig, TlsConfig, UrlError};
pub use connection::{
    ConnectInfo, Connection, ConnectionBuilder, Credentials, ProviderError, ServerInfo,
};
pub use consumer::{Consumer, Delivery, Envelope, GetMessage};
pub use error::{CloseReason, Error, Initiator, Result};
pub use events::{Confirmation, RecoveryEvent, ReturnedMessage};
pub use protocol::{
    BasicProperties, Decimal, FieldTable, FieldValue, ReplyCode, ReplyError, ShortString,
};
pub use rpc_client::{RpcClient, RpcError};

/// What most programs need in scope: the modules of the method structs that
/// the [`Channel`] methods take (`queue::Declare`, `basic::Qos`…).
pub mod prelude {
    pub use crate::protocol::methods::{basic, channel, confirm, exchange, queue, tx};
}
