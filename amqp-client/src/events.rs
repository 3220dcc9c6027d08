//! What the connection reports to the application: recovery events, the
//! outcome of a publish in confirm mode, and returned messages.

use bytes::Bytes;

use crate::error::Error;
use crate::protocol::frame::BodyLen;
use crate::protocol::{ReceivedProperties, ReplyCode, ShortString};

/// What automatic recovery reports, through
/// [`Connection::recovery_events`](crate::Connection::recovery_events).
///
/// ```no_run
/// use amqp091::{Connection, RecoveryEvent};
/// use tokio::sync::broadcast::error::RecvError;
///
/// # async fn example(connection: Connection) {
/// let mut events = connection.recovery_events();
/// loop {
///     match events.recv().await {
///         Ok(RecoveryEvent::Recovering { cause }) => eprintln!("connection lost: {cause}"),
///         Ok(RecoveryEvent::AttemptFailed { attempt, error }) => eprintln!("attempt {attempt}: {error}"),
///         Ok(RecoveryEvent::QueueRenamed { old, new }) => eprintln!("queue {old} is now {new}"),
///         Ok(RecoveryEvent::Recovered) => eprintln!("back"),
///         Ok(RecoveryEvent::Failed { error }) => {
///             eprintln!("gave up: {error}");
///             break;
///         }
///         Ok(_) => {}
///         // A slow reader misses the oldest events, not the newest.
///         Err(RecvError::Lagged(missed)) => eprintln!("{missed} events missed"),
///         Err(RecvError::Closed) => break,
///     }
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RecoveryEvent {
    /// The connection was lost; recovery starts.
    Recovering {
        /// Why it was lost.
        cause: Error,
    },
    /// A new connection is up (to `address`); channels and topology follow.
    Reconnected {
        /// `host:port` of the broker.
        address: String,
    },
    /// The broker named a server-named queue anew.
    QueueRenamed {
        /// Its name before the reconnect.
        old: String,
        /// Its name now.
        new: String,
    },
    /// A reconnect attempt failed; recovery tries again after its backoff
    /// unless a limit of [`RecoveryConfig`](crate::RecoveryConfig) is reached
    /// (then [`Failed`](Self::Failed) follows).
    AttemptFailed {
        /// Which attempt (1: the first).
        attempt: u32,
        /// Why it failed ([`Error::is_authentication_failure`] tells refused
        /// credentials apart).
        error: Error,
    },
    /// Re-creating a channel, entity or consumer failed (it is skipped).
    StepFailed {
        /// The method that failed (`queue.declare`…).
        method: &'static str,
        /// Why.
        error: Error,
    },
    /// Channels, topology and consumers are back.
    Recovered,
    /// Recovery gave up; the connection is closed.
    Failed {
        /// The last error.
        error: Error,
    },
}

/// A message the broker returned as unroutable. Its `Debug` shows the body's
/// length, not its bytes (print `body` itself to see them).
///
/// In confirm mode it comes as [`Confirmation::Returned`]; otherwise through
/// [`Channel::returns`](crate::Channel::returns):
///
/// ```no_run
/// use amqp091::{BasicProperties, Channel, ReplyCode};
///
/// # async fn example(channel: Channel) -> Result<(), amqp091::Error> {
/// let mut returns = channel.returns(16).await?;
/// // `mandatory`: return it if no queue is bound for this key.
/// channel.basic_publish("amq.direct", "nobody-listens", true, &BasicProperties::default(), "hello").await?;
/// if let Some(returned) = returns.recv().await {
///     assert_eq!(returned.reply_code, ReplyCode::NO_ROUTE);
///     eprintln!("{} returned: {}", returned.routing_key, returned.reply_text);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, PartialEq)]
pub struct ReturnedMessage {
    /// The reply code (312 NO_ROUTE, 313 NO_CONSUMERS).
    pub reply_code: ReplyCode,
    /// The reply text.
    pub reply_text: ShortString,
    /// The exchange it was published to.
    pub exchange: ShortString,
    /// Its routing key.
    pub routing_key: ShortString,
    /// Its properties.
    pub properties: ReceivedProperties,
    /// Its body.
    pub body: Bytes,
}

impl std::fmt::Debug for ReturnedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field cannot be left out of the output.
        let ReturnedMessage {
            reply_code,
            reply_text,
            exchange,
            routing_key,
            properties,
            body,
        } = self;
        f.debug_struct("ReturnedMessage")
            .field("reply_code", reply_code)
            .field("reply_text", reply_text)
            .field("exchange", exchange)
            .field("routing_key", routing_key)
            .field("properties", properties)
            .field("body", &BodyLen(body.len()))
            .finish()
    }
}

/// The outcome of a publish on a channel in confirm mode: what a
/// [`PublishConfirm`](crate::PublishConfirm) resolves to.
///
/// ```no_run
/// use amqp091::prelude::*;
/// use amqp091::{BasicProperties, Channel, Confirmation};
///
/// # async fn example(channel: Channel) -> Result<(), amqp091::Error> {
/// channel.confirm_select(confirm::Select::default()).await?;
/// let confirm = channel.basic_publish("orders", "eu", true, &BasicProperties::default(), "order 17").await?;
/// match confirm.await? {
///     Confirmation::Ack => {}
///     Confirmation::Returned(message) => eprintln!("unroutable: {}", message.reply_text),
///     Confirmation::Nack => eprintln!("the broker could not take it; try again later"),
///     Confirmation::NotRequested => unreachable!("the channel is in confirm mode"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Confirmation {
    /// The broker took responsibility for the message.
    Ack,
    /// The broker could not take the message.
    Nack,
    /// The message was unroutable and `mandatory`: returned, then acked.
    Returned(Box<ReturnedMessage>),
    /// The channel is not in confirm mode: the message was handed to the
    /// connection, and nothing more is known of it.
    NotRequested,
}

impl Confirmation {
    /// Whether the broker took responsibility for the message
    /// ([`Ack`](Self::Ack)). A [`Returned`](Self::Returned) message is acked
    /// by the broker too, but it reached no queue: this is `false` for it,
    /// as for [`Nack`](Self::Nack) and [`NotRequested`](Self::NotRequested).
    ///
    /// ```
    /// use amqp091::Confirmation;
    ///
    /// assert!(Confirmation::Ack.is_ack());
    /// assert!(!Confirmation::Nack.is_ack());
    /// assert!(!Confirmation::NotRequested.is_ack());
    /// ```
    pub fn is_ack(&self) -> bool {
        matches!(self, Confirmation::Ack)
    }
}
