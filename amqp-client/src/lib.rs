//! An AMQP 0-9-1 client for RabbitMQ.
//!
//! ```no_run
//! use amqp091::{BasicProperties, Connection, ConsumeOptions};
//! use amqp091::prelude::*;
//!
//! # async fn example() -> Result<(), amqp091::Error> {
//! let connection = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let channel = connection.open_channel().await?;
//! let declared = channel
//!     .queue_declare(queue::Declare { queue: "hello".into(), ..Default::default() })
//!     .await?;
//! channel.basic_publish("", &declared.queue, false, &BasicProperties::default(), "hi").await?;
//! let mut consumer = channel.basic_consume("hello", ConsumeOptions::default()).await?;
//! if let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     assert_eq!(&delivery.body[..], b"hi");
//!     delivery.ack().await?;
//! }
//! connection.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! The [`protocol`] module is generated from the spec XML (plus hand-written
//! wire primitives and the frame codec); the rest is the async core.

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
mod ports;
pub mod protocol;
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

/// What most programs need in scope: the generated channel methods and the
/// method structs they take.
pub mod prelude {
    pub use crate::protocol::methods::{basic, channel, confirm, exchange, queue, tx};
    pub use crate::protocol::ChannelMethods;
}
