//! The handles' link to the I/O task: the command queues, the state both
//! share (why the connection ended, blocked and recovering flags, recovery
//! events, error handlers, the current credentials and frame limit), the
//! publish budget, and the waits bounded by the call timeout.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot, watch};

use crate::command_queue::{CommandSender, TrySendError};
use crate::config::Config;
use crate::connect::{config_for_attempt, CredentialsProvider};
use crate::error::{Error, Initiator};
use crate::ports::Command;
use crate::protocol::frame;
use crate::protocol::methods::Method;
use crate::protocol::{BadField, FieldTable, MethodInfo, ReplyCode};

/// Publishes queued in the client (not yet written to the socket) may hold
/// at most this many bytes; beyond it `basic_publish` waits.
pub(crate) const PUBLISH_BUFFER_BYTES: u64 = 64 * 1024 * 1024;

/// A handler of the connection's errors.
pub(crate) type ErrorHandler = Box<dyn Fn(&Error) + Send + Sync>;

/// State shared by the I/O task and every handle.
pub(crate) struct Shared {
    /// Why the connection ended; set once.
    pub error: Arc<OnceLock<Error>>,
    /// `Some(outcome)` once the I/O task has finished.
    pub finished: watch::Sender<Option<Result<(), Error>>>,
    /// `Some(reason)` while the broker blocks publishers.
    pub blocked: watch::Receiver<Option<String>>,
    /// `true` while the connection is lost or being recovered.
    pub recovering: watch::Receiver<bool>,
    /// The same, readable without a lock.
    pub recovering_now: crate::ports::Flag,
    /// The same as `blocked`, readable without a lock.
    pub blocked_now: crate::ports::Flag,
    /// Recovery's reports.
    pub events: crate::ports::EventSender,
    /// The frame_max negotiated with the broker now connected: a reconnect
    /// may get another one, and frames are checked against it before they
    /// are queued (0: no limit).
    pub frame_max: AtomicU32,
    pub error_handlers: Mutex<Vec<ErrorHandler>>,
    /// The secret of the latest `update_secret`: later connects use it.
    pub secret: Mutex<Option<String>>,
    /// Called before each reconnect attempt, when set.
    pub credentials_provider: Option<CredentialsProvider>,
    /// Metric handles and the connection's span (nothing without the
    /// `metrics` feature).
    pub telemetry: crate::telemetry::Telemetry,
}

impl Shared {
    /// The config for the next connect attempt: the credentials provider's
    /// answer, else the secret of the latest `update_secret`, else `config`'s.
    pub(crate) async fn config_for_attempt(&self, config: &Config) -> Result<Config, Error> {
        let stored = self.secret.lock().ok().and_then(|secret| secret.clone());
        config_for_attempt(config, self.credentials_provider.as_ref(), stored).await
    }

    /// Calls every error handler with `error`.
    pub(crate) fn report(&self, error: &Error) {
        if let Ok(handlers) = self.error_handlers.lock() {
            for handler in handlers.iter() {
                handler(error);
            }
        }
    }

    /// Called by the I/O task when it ends.
    pub(crate) fn finish(&self, error: Option<Error>) {
        let error = error.or_else(|| self.error.get().cloned());
        let outcome = match error {
            Some(Error::ConnectionClosed { reason, .. })
                if reason.initiator == Initiator::Application
                    && reason.code == ReplyCode::REPLY_SUCCESS =>
            {
                tracing::info!("connection closed");
                Ok(())
            }
            Some(error) => {
                tracing::info!(%error, "connection ended");
                self.report(&error);
                Err(error)
            }
            None => Ok(()),
        };
        self.finished.send_replace(Some(outcome));
    }

    /// The frame_max of the broker now connected (0: no limit).
    pub(crate) fn frame_max(&self) -> u32 {
        self.frame_max.load(Ordering::Acquire)
    }
}

/// Refuses a frame of `size` bytes (framing included) over `frame_max`.
pub(crate) fn check_frame_size(
    what: &'static str,
    size: usize,
    frame_max: u32,
) -> Result<(), Error> {
    // 0 is the protocol's "no limit".
    if frame_max != 0 && size > frame_max as usize {
        return Err(Error::FrameTooLarge {
            what,
            size,
            frame_max,
        });
    }
    Ok(())
}

/// Negotiated values and what the broker said of itself, as of the first
/// connect (a reconnect may negotiate others: see [`Connection::frame_max`](crate::Connection::frame_max)).
///
/// ```no_run
/// use amqp091::Connection;
///
/// # async fn example() -> Result<(), amqp091::Error> {
/// let connection = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
/// let info = connection.server_info();
/// let version = info.properties.get("version").and_then(|v| v.as_str());
/// println!("RabbitMQ {version:?}, heartbeat {} s, channel_max {}", info.heartbeat, info.channel_max);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// Highest usable channel id.
    pub channel_max: u16,
    /// Largest frame, framing included.
    pub frame_max: u32,
    /// Heartbeat interval in seconds (0: none).
    pub heartbeat: u16,
    /// The broker's `server-properties` (product, version, capabilities…).
    pub properties: FieldTable,
}

/// The sending end of the control queue: channel closes and forgotten
/// consumers, taken even while the connection recovers. Its commands are
/// boxed: they are rare, and tokio's unbounded channel makes room for 32
/// of its values when it is made (3 KB per connection at a `Command`'s size).
#[derive(Debug, Clone)]
pub(crate) struct ControlSender(mpsc::UnboundedSender<Box<Command>>);

/// The I/O task's end of the control queue.
pub(crate) type ControlReceiver = mpsc::UnboundedReceiver<Box<Command>>;

impl ControlSender {
    /// Queues `command` (never waits); whether the I/O task is still there
    /// to take it.
    pub(crate) fn send(&self, command: Command) -> bool {
        self.0.send(Box::new(command)).is_ok()
    }
}

/// The control queue.
pub(crate) fn control_queue() -> (ControlSender, ControlReceiver) {
    let (sender, receiver) = mpsc::unbounded_channel();
    (ControlSender(sender), receiver)
}

pub(crate) struct Inner {
    pub commands: CommandSender,
    pub control: ControlSender,
    pub shared: Arc<Shared>,
    pub info: ServerInfo,
    pub config: Arc<Config>,
    pub next_consumer: std::sync::atomic::AtomicU64,
    /// Bounds what publishers may queue in the client (bodies included).
    pub publish_budget: Arc<crate::credit::PublishBudget>,
}

impl Inner {
    /// The error that ended the connection, or a generic one if the I/O task
    /// vanished without saying.
    pub(crate) fn closed_error(&self) -> Error {
        self.shared.error.get().cloned().unwrap_or_else(|| {
            Error::ConnectionLost(Arc::new(std::io::Error::other(
                "the connection task has ended",
            )))
        })
    }

    /// Queues an ack, nack or reject for the I/O task (never waits).
    pub(crate) fn settle(&self, command: Command) {
        self.commands.settle(command);
    }

    /// Queues `command` if that needs no waiting: the connection is not
    /// recovering or closed and the queue has room. Otherwise hands it back
    /// for [`send`](Self::send), which waits (and reports a closed connection).
    pub(crate) fn try_send(&self, command: Command) -> Result<(), Command> {
        if self.shared.recovering_now.is_up() || self.shared.error.get().is_some() {
            return Err(command);
        }
        self.commands.try_send(command).map_err(|e| match e {
            TrySendError::Full(command) | TrySendError::Closed(command) => command,
        })
    }

    /// Refuses `method` when a shortstr argument is over 255 bytes or its
    /// frame would exceed the broker's frame_max, before it is queued. It is
    /// encoded to be measured: calls and no-wait methods are not per
    /// message, unlike publishes (see `Channel::encode_head`).
    pub(crate) fn check_method_frame(&self, channel: u16, method: &Method) -> Result<(), Error> {
        self.check_frame_of(
            channel,
            method.info(),
            method.check_short_strings(),
            |buf| method.encode_args(buf),
        )
    }

    /// [`check_method_frame`](Self::check_method_frame) of the method of
    /// `info` whose arguments `args` writes, without building a [`Method`];
    /// `names` is the method's `check_short_strings()`.
    pub(crate) fn check_frame_of(
        &self,
        channel: u16,
        info: &'static MethodInfo,
        names: Result<(), BadField>,
        args: impl FnOnce(&mut BytesMut),
    ) -> Result<(), Error> {
        names.map_err(|e| Error::bad_name(info.name, e))?;
        let frame_max = self.shared.frame_max();
        let mut scratch = BytesMut::new();
        frame::write_method_frame(&mut scratch, channel, info.id, args);
        check_frame_size(info.name, scratch.len(), frame_max)
    }

    pub(crate) async fn send(&self, command: Command) -> Result<(), Error> {
        self.wait_while_recovering().await?;
        self.commands
            .send(command)
            .await
            .map_err(|_| self.closed_error())
    }

    /// Awaits the I/O task's answer, bounded by the call timeout.
    pub(crate) async fn within_call_timeout<T>(
        &self,
        call: &'static str,
        answer: oneshot::Receiver<Result<T, Error>>,
    ) -> Result<T, Error> {
        let answered = async { answer.await.map_err(|_| self.closed_error())? };
        self.bounded(call, answered).await
    }

    /// Runs `wait` within the call timeout, failing with
    /// [`Error::CallTimeout`] when it expires.
    pub(crate) async fn bounded<T>(
        &self,
        call: &'static str,
        wait: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        match self.config.call_timeout {
            None => wait.await,
            Some(timeout) => tokio::time::timeout(timeout, wait)
                .await
                .unwrap_or(Err(Error::CallTimeout { call, timeout })),
        }
    }

    /// Calls made while the connection recovers wait for it (bounded by
    /// the recovery call timeout) instead of failing at once.
    pub(crate) async fn wait_while_recovering(&self) -> Result<(), Error> {
        if self.shared.recovering_now.is_up() {
            let timeout = self.config.recovery.call_timeout;
            let mut recovering = self.shared.recovering.clone();
            if tokio::time::timeout(timeout, recovering.wait_for(|r| !*r))
                .await
                .is_err()
            {
                return Err(Error::RecoveryTimeout(timeout));
            }
        }
        match self.shared.error.get() {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }
}
