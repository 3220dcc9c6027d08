//! The client's error: one enum for everything above the protocol layer.

use std::sync::Arc;

use thiserror::Error;

use crate::config::UrlError;
use crate::protocol::{FrameError, MethodId, ReplyCode, ReplyError, UnexpectedReply};

/// Who ended a channel or connection: the [`initiator`](CloseReason::initiator)
/// of a [`CloseReason`].
///
/// ```no_run
/// use amqp091::{Connection, Error, Initiator};
///
/// # fn example(connection: &Connection) {
/// connection.on_error(|error| {
///     if let Error::ConnectionClosed { reason, .. } = error {
///         match reason.initiator {
///             Initiator::Broker => eprintln!("the broker closed the connection: {reason}"),
///             Initiator::Library => eprintln!("the broker broke the protocol: {reason}"),
///             Initiator::Application => {} // our own close: nothing to report
///         }
///     }
/// });
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// The application asked for it.
    Application,
    /// The broker sent a close.
    Broker,
    /// This library closed it after a protocol violation by the peer.
    Library,
}

/// Why a channel or connection ended, as carried by `channel.close` or
/// `connection.close`: inside [`Error::ChannelClosed`] and
/// [`Error::ConnectionClosed`].
///
/// ```no_run
/// use amqp091::prelude::*;
/// use amqp091::{Channel, Error, Initiator, ReplyCode, ReplyError};
///
/// # async fn example(channel: Channel) {
/// // A passive declare of a queue that does not exist: the broker closes the channel.
/// let missing = channel
///     .queue_declare(queue::Declare { queue: "no-such-queue".into(), passive: true, ..Default::default() })
///     .await;
/// if let Err(Error::ChannelClosed { reason, .. }) = missing {
///     assert_eq!(reason.code, ReplyCode::NOT_FOUND);
///     assert_eq!(reason.error(), ReplyError::NotFound);
///     assert_eq!(reason.initiator, Initiator::Broker);
///     eprintln!("{reason}"); // 404 NOT_FOUND, the broker's text, the method that caused it
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// The reply code.
    pub code: ReplyCode,
    /// The reply text.
    pub text: String,
    /// The method that caused it, when the closer named one.
    pub method: Option<MethodId>,
    /// Who closed.
    pub initiator: Initiator,
}

impl CloseReason {
    /// A close the application asked for, with `code` and `text`.
    pub(crate) fn by_application(code: ReplyCode, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
            method: None,
            initiator: Initiator::Application,
        }
    }

    /// The typed error of the reply code.
    pub fn error(&self) -> ReplyError {
        ReplyError::from(self.code)
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)?;
        if let Some(method) = self.method.filter(|m| m.class_id != 0) {
            write!(f, " (caused by {method})")?;
        }
        Ok(())
    }
}

/// Every way a client operation can fail. Cheap to clone: a closed channel or
/// connection answers every later call with a clone of the error that closed it.
///
/// A close by the broker carries its reply code and text; match on the
/// variant, or classify with [`reply_error`](Self::reply_error),
/// [`is_connection_error`](Self::is_connection_error) and
/// [`is_authentication_failure`](Self::is_authentication_failure):
///
/// ```
/// use std::sync::Arc;
/// use amqp091::{CloseReason, Error, Initiator, ReplyCode, ReplyError};
///
/// fn advice(error: &Error) -> String {
///     match error {
///         Error::ChannelClosed { reply: ReplyError::NotFound, reason, .. } => {
///             format!("declare it first ({})", reason.text)
///         }
///         Error::AuthenticationFailed { user, .. } => format!("check the password of {user}"),
///         error if error.is_connection_error() => format!("reconnect: {error}"),
///         error => error.to_string(),
///     }
/// }
///
/// // What the broker's `channel.close` for a missing queue becomes:
/// let text = "NOT_FOUND - no queue 'jobs' in vhost '/'".to_owned();
/// let reason = CloseReason { code: ReplyCode::NOT_FOUND, text, method: None, initiator: Initiator::Broker };
/// let error = Error::ChannelClosed { channel: 1, reply: reason.error(), reason: Arc::new(reason) };
/// assert_eq!(error.reply_code(), Some(ReplyCode::NOT_FOUND));
/// assert!(!error.is_connection_error());
/// assert!(advice(&error).starts_with("declare it first"));
/// ```
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL cannot be used.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The host name did not resolve.
    #[error("cannot resolve {address}: {source}")]
    Dns {
        /// `host:port`.
        address: String,
        /// The resolver's error.
        source: Arc<std::io::Error>,
    },
    /// Nothing accepted the TCP connection.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The address tried.
        address: String,
        /// The socket error.
        source: Arc<std::io::Error>,
    },
    /// Connecting and the handshake took longer than the connection timeout.
    #[error("connecting to {address} timed out after {timeout:?}")]
    Timeout {
        /// The address tried.
        address: String,
        /// The limit.
        timeout: std::time::Duration,
    },
    /// An `amqps://` connect with the client built without its `tls` feature.
    #[error(
        "{address} needs TLS (amqps), which this build of amqp091 lacks: enable its `tls` feature"
    )]
    TlsNotCompiled {
        /// The address tried.
        address: String,
    },
    /// TLS could not be set up (bad certificate, verification failure…).
    #[error("TLS with {address} failed: {reason}")]
    Tls {
        /// The address tried.
        address: String,
        /// What failed.
        reason: String,
    },
    /// The server does not speak AMQP 0-9-1.
    #[error("protocol version mismatch: the server answered with header {server_header:?}")]
    ProtocolVersion {
        /// The 8 bytes it sent.
        server_header: Vec<u8>,
    },
    /// Wrong user or password (403 ACCESS_REFUSED during the handshake).
    #[error("authentication failed for user `{user}`: {text}")]
    AuthenticationFailed {
        /// The user name.
        user: String,
        /// The broker's text.
        text: String,
    },
    /// The vhost does not exist or the user may not use it.
    #[error("cannot open vhost `{vhost}`: {reason}")]
    VhostRefused {
        /// The vhost.
        vhost: String,
        /// The broker's close.
        reason: CloseReason,
    },
    /// The broker offers none of the SASL mechanisms this client can use.
    #[error("the broker does not offer the {wanted} mechanism (it offers {offered})")]
    Mechanism {
        /// What the client wanted.
        wanted: &'static str,
        /// What the broker offered.
        offered: String,
    },
    /// The channel was closed (by the broker with a soft error, or by the application).
    #[error("channel {channel} closed: {reason}")]
    ChannelClosed {
        /// Channel id.
        channel: u16,
        /// The typed reply code.
        reply: ReplyError,
        /// Code, text, and the method that caused it.
        reason: Arc<CloseReason>,
    },
    /// The connection was closed (by the broker, the application, or after a protocol error).
    #[error("connection closed: {reason}")]
    ConnectionClosed {
        /// The typed reply code.
        reply: ReplyError,
        /// Code, text, and the method that caused it.
        reason: Arc<CloseReason>,
    },
    /// The socket failed or the peer went away without a close.
    #[error("connection lost: {0}")]
    ConnectionLost(Arc<std::io::Error>),
    /// No heartbeat or other frame arrived for two heartbeat intervals.
    #[error(
        "the broker sent nothing for {0:?} (two heartbeat intervals): connection considered dead"
    )]
    MissedHeartbeats(std::time::Duration),
    /// The peer sent a frame that cannot be accepted.
    #[error("protocol error: {0}")]
    Protocol(#[from] FrameError),
    /// The peer sent a well-formed frame at a point where it makes no sense.
    #[error("unexpected frame: {0}")]
    UnexpectedFrame(String),
    /// A synchronous call got a reply the spec does not list for it.
    #[error(transparent)]
    UnexpectedReply(#[from] UnexpectedReply),
    /// Every channel id up to the negotiated channel_max is in use.
    #[error("all {0} channel ids are in use")]
    ChannelsExhausted(u16),
    /// A name longer than the 255 bytes of a shortstr, from
    /// [`ShortString::new`](crate::ShortString::new) (calls that take names
    /// report [`NameTooLong`](Self::NameTooLong) instead).
    #[error(transparent)]
    ShortString(#[from] crate::protocol::ShortStringTooLong),
    /// A shortstr argument or property (a queue, exchange or consumer tag
    /// name, a routing key, a `message-id`…, or a key of a table) is over
    /// the 255 bytes the wire can carry. Refused before anything was queued:
    /// the channel and the connection stay usable.
    #[error(
        "{what}: `{field}` is {len} bytes, over the 255 a shortstr can carry; nothing was sent"
    )]
    NameTooLong {
        /// The method (`queue.declare`…), or `content header` for a
        /// message's properties.
        what: &'static str,
        /// The field's spec name (`queue`, `routing-key`, `message-id`…); for
        /// a table (`arguments`, `headers`), one of its keys is too long.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A shortstr argument of a method (a routing key, a queue or exchange
    /// name, a consumer tag) that is not UTF-8. AMQP allows any bytes, but
    /// RabbitMQ closes the whole connection on such a method (501
    /// `FRAME_ERROR`, "Malformed UTF-8 in shortstr"); so it is refused
    /// before anything was queued, and the channel and the connection stay
    /// usable. Properties and header keys may be any bytes.
    #[error("{what}: `{field}` is not UTF-8, which RabbitMQ refuses (it would close the connection); nothing was sent")]
    NameNotUtf8 {
        /// The method (`basic.publish`…).
        what: &'static str,
        /// The field's spec name (`routing-key`, `consumer-tag`…).
        field: &'static str,
    },
    /// `basic.ack`, `basic.nack` or `basic.reject` handed to
    /// [`ChannelRpc::send`](crate::protocol::ChannelRpc::send) with a bare
    /// delivery tag. Settle with [`Delivery::ack`](crate::Delivery::ack),
    /// `nack` or `reject`: they know which connection a tag belongs to, so
    /// that a tag from before a reconnect never acks another message.
    /// Nothing was sent.
    #[error("{0} is sent by Delivery::ack, nack or reject, which know the delivery's connection; nothing was sent")]
    RawSettlement(&'static str),
    /// The operation needs the channel in confirm mode.
    #[error("channel {0} is not in confirm mode")]
    NotInConfirmMode(u16),
    /// A published message was returned as unroutable (mandatory).
    #[error("message returned: {code} {text}")]
    Returned {
        /// The reply code (312 NO_ROUTE…).
        code: ReplyCode,
        /// The reply text.
        text: String,
    },
    /// A consumer ended: cancelled by the broker (its queue was deleted) or
    /// by the application.
    #[error("consumer `{consumer_tag}` on channel {channel} was cancelled by the {}", if *.by_broker { "broker" } else { "application" })]
    ConsumerCancelled {
        /// Channel id.
        channel: u16,
        /// The consumer tag.
        consumer_tag: String,
        /// Whether the broker cancelled it.
        by_broker: bool,
    },
    /// The connection was lost, or the channel or connection closed, before
    /// the broker confirmed a publish: it may or may not have been routed.
    /// Publish it again if it must arrive. The error inside says what ended
    /// the channel.
    #[error("the outcome of the publish is unknown: {0}")]
    PublishOutcomeUnknown(Arc<Error>),
    /// A delivery from before a reconnect: its tag means nothing to the new
    /// channel, so acking it would close the channel with 406.
    #[error("delivery tag {delivery_tag} on channel {channel} is from before a reconnect; the broker redelivers the message")]
    StaleDelivery {
        /// Channel id.
        channel: u16,
        /// The stale tag.
        delivery_tag: u64,
    },
    /// The connection was recovering and did not come back within the call timeout.
    #[error("the connection did not recover within {0:?}")]
    RecoveryTimeout(std::time::Duration),
    /// The broker nacked a published message.
    #[error("the broker nacked the message")]
    Nacked,
    /// A call waited on the broker longer than [`Config::call_timeout`](crate::Config::call_timeout).
    /// Where the broker was asked something, the channel is closed with
    /// this error: what the broker did with the request is unknown.
    #[error("{call} got no answer within {timeout:?}")]
    CallTimeout {
        /// What waited (`queue.declare`, `channel.open`, `wait_for_confirms`…).
        call: &'static str,
        /// The limit.
        timeout: std::time::Duration,
    },
    /// The credentials provider failed to produce credentials for a connect
    /// attempt (it counts as an authentication failure).
    #[error("the credentials provider failed: {0}")]
    CredentialsProvider(Arc<dyn std::error::Error + Send + Sync>),
    /// A method or content header frame would exceed the negotiated
    /// `frame_max`. Refused before anything was sent: the broker would answer
    /// 501 FRAME_ERROR and close the whole connection. The channel and the
    /// connection stay usable.
    #[error("the {what} frame of {size} bytes exceeds the negotiated frame_max of {frame_max} bytes; nothing was sent")]
    FrameTooLarge {
        /// The method's name (`queue.declare`…), or `content header`.
        what: &'static str,
        /// The frame's size, framing included.
        size: usize,
        /// The limit negotiated with the broker now connected.
        frame_max: u32,
    },
    /// A call of the [blocking API](crate::blocking) was made from inside an
    /// async runtime (a tokio task, or a thread that entered a runtime, such
    /// as a `spawn_blocking` one). Waiting there would stall a worker thread
    /// or deadlock, so nothing was done: use the async API in async code.
    #[cfg(feature = "blocking")]
    #[error("{call} is a call of the blocking API, made from inside an async runtime where blocking could deadlock; nothing was done (use the async API there)")]
    BlockingInAsyncContext {
        /// The call refused (`queue.declare`, `basic.publish`…).
        call: &'static str,
    },
    /// The [blocking API](crate::blocking) could not start a thread it
    /// needs: its runtime thread, or the thread that runs the on-connect hook.
    #[cfg(feature = "blocking")]
    #[error("the blocking API cannot start a thread: {0}")]
    BlockingThread(Arc<std::io::Error>),
    /// The [blocking API](crate::blocking)'s on-connect hook panicked.
    #[cfg(feature = "blocking")]
    #[error("the on-connect hook panicked")]
    HookPanicked,
}

impl Error {
    /// The reply code, when the broker sent one.
    pub fn reply_code(&self) -> Option<ReplyCode> {
        match self {
            Error::ChannelClosed { reason, .. } | Error::ConnectionClosed { reason, .. } => {
                Some(reason.code)
            }
            Error::VhostRefused { reason, .. } => Some(reason.code),
            Error::AuthenticationFailed { .. } => Some(ReplyCode::ACCESS_REFUSED),
            Error::Returned { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The typed reply error, when the broker sent a code.
    pub fn reply_error(&self) -> Option<ReplyError> {
        self.reply_code().map(ReplyError::from)
    }

    /// Whether the error is a refusal of the credentials (by the broker, or
    /// because the credentials provider failed): retrying with the same
    /// credentials cannot succeed.
    pub fn is_authentication_failure(&self) -> bool {
        matches!(
            self,
            Error::AuthenticationFailed { .. } | Error::CredentialsProvider(_)
        )
    }

    /// Whether the error ended the whole connection.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::ConnectionClosed { .. }
                | Error::ConnectionLost(_)
                | Error::MissedHeartbeats(_)
                | Error::Protocol(_)
                | Error::UnexpectedFrame(_)
        )
    }

    /// [`Error::NameTooLong`] or [`Error::NameNotUtf8`] for a field of
    /// `what` (a method's name).
    pub(crate) fn bad_name(what: &'static str, bad: crate::protocol::BadField) -> Self {
        match bad {
            crate::protocol::BadField::TooLong { field, len } => {
                Error::NameTooLong { what, field, len }
            }
            crate::protocol::BadField::NotUtf8 { field } => Error::NameNotUtf8 { what, field },
        }
    }

    pub(crate) fn channel_closed(channel: u16, reason: CloseReason) -> Self {
        Error::ChannelClosed {
            channel,
            reply: reason.error(),
            reason: Arc::new(reason),
        }
    }

    pub(crate) fn connection_closed(reason: CloseReason) -> Self {
        Error::ConnectionClosed {
            reply: reason.error(),
            reason: Arc::new(reason),
        }
    }
}

/// The result of client operations.
///
/// ```
/// use amqp091::prelude::*;
/// use amqp091::{Channel, Result};
///
/// /// Messages ready in `queue` (a passive declare fails if it does not exist).
/// async fn depth(channel: &Channel, queue: &str) -> Result<u32> {
///     let declared = channel
///         .queue_declare(queue::Declare { queue: queue.into(), passive: true, ..Default::default() })
///         .await?;
///     Ok(declared.message_count)
/// }
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;
