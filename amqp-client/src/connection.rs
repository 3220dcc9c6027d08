//! The connection handle: connect, open channels, watch for blocking, close.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::channel::Channel;
use crate::command_queue::{command_queue, CommandSender, TrySendError};
use crate::config::Config;
use crate::error::{Error, Initiator};
use crate::events::RecoveryEvent;
use crate::handshake;
use crate::io::Driver;
use crate::machine::{Command, Machine, Settings};
use crate::protocol::frame::{self, FrameDecoder};
use crate::protocol::methods::{connection, Method};
use crate::protocol::{FieldTable, MethodInfo, ReplyCode, ShortString};
use crate::transport::{self, Stream};

/// How many commands may wait for the I/O task before senders wait in turn.
const COMMAND_QUEUE: usize = 4096;

/// Publishes queued in the client (not yet written to the socket) may hold
/// at most this many bytes; beyond it `basic_publish` waits.
pub(crate) const PUBLISH_BUFFER_BYTES: u64 = 64 * 1024 * 1024;

type ErrorHandler = Box<dyn Fn(&Error) + Send + Sync>;

/// The on-connect hook: runs after the first connect and after every
/// reconnect, on a task of its own, with the connection.
pub(crate) type OnConnect = Arc<
    dyn Fn(Connection, ConnectInfo) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>
        + Send
        + Sync,
>;

/// What the on-connect hook is told about the connect it runs after.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectInfo {
    /// 0 after the first connect, `n` after the `n`-th reconnect.
    pub reconnects: u64,
    /// Which attempt of this connect succeeded (1: the first try).
    pub attempt: u32,
    /// `host:port` of the broker connected to.
    pub address: String,
}

impl ConnectInfo {
    /// Whether the hook runs after a reconnect (not the first connect).
    pub fn is_reconnect(&self) -> bool {
        self.reconnects > 0
    }
}

/// A user and secret for one connect attempt, from a
/// [credentials provider](ConnectionBuilder::credentials_provider).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    /// The password or token.
    pub secret: String,
}

impl Credentials {
    /// Credentials of `user` with `secret`.
    pub fn new(user: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            secret: secret.into(),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The error a credentials provider may fail with.
pub type ProviderError = Box<dyn std::error::Error + Send + Sync>;

/// Called before each connect attempt for the credentials to use.
pub(crate) type CredentialsProvider = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Credentials, ProviderError>> + Send>>
        + Send
        + Sync,
>;

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
    pub recovering_now: crate::machine::Flag,
    /// The same as `blocked`, readable without a lock.
    pub blocked_now: crate::machine::Flag,
    /// Recovery's reports.
    pub events: broadcast::Sender<RecoveryEvent>,
    /// The frame_max negotiated with the broker now connected: a reconnect
    /// may get another one, and frames are checked against it before they
    /// are queued (0: no limit).
    pub frame_max: AtomicU32,
    error_handlers: Mutex<Vec<ErrorHandler>>,
    /// The secret of the latest `update_secret`: later connects use it.
    secret: Mutex<Option<String>>,
    /// Called before each reconnect attempt, when set.
    pub credentials_provider: Option<CredentialsProvider>,
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
/// connect (a reconnect may negotiate others: see [`Connection::frame_max`]).
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

pub(crate) struct Inner {
    pub commands: CommandSender,
    pub control: mpsc::UnboundedSender<Command>,
    pub shared: Arc<Shared>,
    pub info: ServerInfo,
    pub config: Config,
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

    /// Refuses `method` when its frame would exceed the broker's frame_max,
    /// before it is queued. It is encoded to be measured: calls and no-wait
    /// methods are not per message, unlike publishes (see `Channel::encode_head`).
    pub(crate) fn check_method_frame(&self, channel: u16, method: &Method) -> Result<(), Error> {
        self.check_frame_of(channel, method.info(), |buf| method.encode_args(buf))
    }

    /// [`check_method_frame`](Self::check_method_frame) of the method of
    /// `info` whose arguments `args` writes, without building a [`Method`].
    pub(crate) fn check_frame_of(
        &self,
        channel: u16,
        info: &'static MethodInfo,
        args: impl FnOnce(&mut BytesMut),
    ) -> Result<(), Error> {
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

/// `config` with the credentials a connect attempt uses (see
/// [`Shared::config_for_attempt`]).
async fn config_for_attempt(
    config: &Config,
    provider: Option<&CredentialsProvider>,
    stored_secret: Option<String>,
) -> Result<Config, Error> {
    let mut config = config.clone();
    if let Some(provider) = provider {
        let credentials = provider()
            .await
            .map_err(|e| Error::CredentialsProvider(Arc::from(e)))?;
        config.user = credentials.user;
        config.password = credentials.secret;
    } else if let Some(secret) = stored_secret {
        config.password = secret;
    }
    Ok(config)
}

/// Opens a stream to one of `config`'s addresses, starting after `last`
/// (so that a lost node is tried last), and runs the handshake.
pub(crate) async fn open_stream(
    config: &Config,
    last: Option<usize>,
) -> Result<(Stream, handshake::Negotiated, usize), Error> {
    let addresses = config.addresses();
    let start = last.map_or(0, |i| i + 1);
    let mut last_error = None;
    for k in 0..addresses.len() {
        let index = (start + k) % addresses.len();
        let target = config.at(&addresses[index]);
        let address = target.address();
        tracing::debug!(%address, vhost = %target.vhost, "connecting");
        let timeout = target.connection_timeout;
        let opened = tokio::time::timeout(timeout, async {
            let mut stream = transport::connect(&target).await?;
            let negotiated = handshake::handshake(&mut stream, &target).await?;
            Ok::<_, Error>((stream, negotiated))
        })
        .await
        .unwrap_or_else(|_| {
            Err(Error::Timeout {
                address: address.clone(),
                timeout,
            })
        });
        match opened {
            Ok((stream, negotiated)) => {
                tracing::info!(
                    %address,
                    channel_max = negotiated.channel_max,
                    frame_max = negotiated.frame_max,
                    heartbeat = negotiated.heartbeat,
                    "connected"
                );
                return Ok((stream, negotiated, index));
            }
            // Wrong credentials or vhost are the same on every node.
            Err(e @ (Error::AuthenticationFailed { .. } | Error::VhostRefused { .. })) => {
                return Err(e)
            }
            Err(e) => {
                tracing::debug!(%address, error = %e, "connect failed");
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| Error::Connect {
        address: config.address(),
        source: Arc::new(std::io::Error::other("no address to connect to")),
    }))
}

/// A number in [0.5, 1.0) for backoff jitter; no RNG dependency needed for that.
pub(crate) fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // A multiplicative hash spreads nearby nanosecond counts apart.
    let mixed = nanos.wrapping_mul(2_654_435_761) >> 8;
    0.5 + f64::from(mixed % 1_000_000) / 2_000_000.0
}

/// Sets up a connection before it opens: the on-connect hook and error
/// handlers must exist before the first connect to see it.
#[must_use = "a builder does nothing until `connect` is called"]
pub struct ConnectionBuilder {
    config: Config,
    hook: Option<OnConnect>,
    error_handlers: Vec<ErrorHandler>,
    credentials_provider: Option<CredentialsProvider>,
}

impl ConnectionBuilder {
    /// Registers the on-connect hook, run after the first connect and after
    /// every reconnect (on a task of its own, like the seeds' dispatch), with a
    /// connection it can open channels on and what kind of connect it follows.
    /// Its errors go to the error handlers.
    ///
    /// What the hook creates belongs to the hook: channels opened through the
    /// connection it is given (or a clone of it), and every exchange, queue,
    /// binding and consumer declared on those channels, are not recorded for
    /// recovery. When the connection is lost they end — their calls and
    /// consumers fail with the error that lost the connection — and the hook,
    /// run again after the reconnect, creates them anew. Everything the
    /// application creates through other handles is recovered automatically.
    /// After a reconnect the hook runs once recovery is done.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), amqp_client::Error> {
    /// use amqp_client::prelude::*;
    /// use amqp_client::{Config, Connection, ConsumeOptions, ShortString};
    ///
    /// let config: Config = "amqp://guest:guest@127.0.0.1:5672/%2f".parse()?;
    /// let connection = Connection::builder(config)
    ///     .on_connect(|connection, info| async move {
    ///         if info.is_reconnect() {
    ///             eprintln!("reconnected to {} (reconnect {})", info.address, info.reconnects);
    ///         }
    ///         let channel = connection.open_channel().await?;
    ///         channel
    ///             .queue_declare(queue::Declare { queue: ShortString::new("jobs")?, durable: true, ..Default::default() })
    ///             .await?;
    ///         let mut consumer = channel.basic_consume("jobs", ConsumeOptions::default()).await?;
    ///         tokio::spawn(async move {
    ///             // Ends with the connection's error when it is lost; the
    ///             // hook's next run starts a new consumer.
    ///             while let Some(Ok(delivery)) = consumer.next().await {
    ///                 let _ = delivery.ack().await;
    ///             }
    ///         });
    ///         Ok(())
    ///     })
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn on_connect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Connection, ConnectInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        self.hook = Some(Arc::new(move |connection, info| {
            Box::pin(hook(connection, info))
        }));
        self
    }

    /// Registers a credentials provider, called before each connect attempt
    /// (the first connect and every reconnect) for the user and secret to
    /// authenticate with: for tokens that expire (OAuth 2). Its answer takes
    /// the place of the config's user and password. A provider that fails
    /// counts as an authentication failure (see
    /// [`RecoveryConfig::max_authentication_failures`](crate::RecoveryConfig::max_authentication_failures)).
    pub fn credentials_provider<F, Fut>(mut self, provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Credentials, ProviderError>> + Send + 'static,
    {
        self.credentials_provider = Some(Arc::new(move || Box::pin(provider())));
        self
    }

    /// Registers an error handler (see [`Connection::on_error`]).
    pub fn on_error(mut self, handler: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.error_handlers.push(Box::new(handler));
        self
    }

    /// Connects (retrying with backoff if `recovery.retry_initial_connect`).
    pub async fn connect(self) -> Result<Connection, Error> {
        Connection::start(
            self.config,
            self.hook,
            self.error_handlers,
            self.credentials_provider,
        )
        .await
    }
}

/// A connection to a broker. Cheap to clone; every clone, channel and
/// consumer shares it. Dropping the last of them closes it gracefully.
#[derive(Clone)]
pub struct Connection {
    pub(crate) inner: Arc<Inner>,
    /// Given to the on-connect hook: channels opened through it belong to
    /// the hook and are not recovered.
    hook_owned: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("address", &self.inner.config.address())
            .field("vhost", &self.inner.config.vhost)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to the broker at `url` (`amqp://…` or `amqps://…`).
    pub async fn open(url: &str) -> Result<Self, Error> {
        Self::connect(url.parse()?).await
    }

    /// Connects with `config`: TCP (and TLS), then the AMQP handshake, all
    /// within `config.connection_timeout` per address tried.
    pub async fn connect(config: Config) -> Result<Self, Error> {
        Self::start(config, None, Vec::new(), None).await
    }

    /// A builder, for an on-connect hook and error handlers that must be in
    /// place before the first connect.
    pub fn builder(config: Config) -> ConnectionBuilder {
        ConnectionBuilder {
            config,
            hook: None,
            error_handlers: Vec::new(),
            credentials_provider: None,
        }
    }

    async fn start(
        config: Config,
        hook: Option<OnConnect>,
        error_handlers: Vec<ErrorHandler>,
        credentials_provider: Option<CredentialsProvider>,
    ) -> Result<Self, Error> {
        let mut attempt = 0;
        let (stream, negotiated, address_index) = loop {
            let opened =
                match config_for_attempt(&config, credentials_provider.as_ref(), None).await {
                    Ok(attempt_config) => open_stream(&attempt_config, None).await,
                    Err(e) => Err(e),
                };
            match opened {
                Ok(opened) => break opened,
                Err(e)
                    if e.is_authentication_failure() || matches!(e, Error::VhostRefused { .. }) =>
                {
                    return Err(e)
                }
                Err(e)
                    if config.recovery.retry_initial_connect
                        && config
                            .recovery
                            .max_attempts
                            .is_none_or(|max| attempt + 1 < max) =>
                {
                    let delay = config.recovery.delay(attempt, jitter());
                    tracing::warn!(error = %e, ?delay, "first connect failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };

        let error = Arc::new(OnceLock::new());
        let (blocked_tx, blocked_rx) = crate::machine::Blocked::new();
        let (recovering_tx, recovering_rx) = crate::machine::Recovering::new();
        let (events, _) = broadcast::channel(256);
        let (finished, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            error: error.clone(),
            finished,
            blocked: blocked_rx,
            recovering: recovering_rx,
            recovering_now: recovering_tx.flag(),
            blocked_now: blocked_tx.flag(),
            events: events.clone(),
            frame_max: AtomicU32::new(negotiated.frame_max),
            error_handlers: Mutex::new(error_handlers),
            secret: Mutex::new(None),
            credentials_provider,
        });
        let timeout = config.connection_timeout;
        let settings = Settings {
            channel_max: negotiated.channel_max,
            frame_max: negotiated.frame_max,
            heartbeat: Duration::from_secs(u64::from(negotiated.heartbeat)),
            close_timeout: timeout.min(Duration::from_secs(10)),
            max_body_size: config.max_body_size,
            recover: config.recovery.enabled,
            recover_topology: config.recovery.topology,
        };
        let machine = Machine::new(
            settings,
            Instant::now(),
            error,
            blocked_tx,
            recovering_tx,
            events,
        );
        let (commands_tx, commands_rx) = command_queue(COMMAND_QUEUE);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            commands: commands_tx,
            control: control_tx,
            shared: shared.clone(),
            info: ServerInfo {
                channel_max: negotiated.channel_max,
                frame_max: negotiated.frame_max,
                heartbeat: negotiated.heartbeat,
                properties: negotiated.server_properties.clone(),
            },
            config: config.clone(),
            next_consumer: std::sync::atomic::AtomicU64::new(1),
            publish_budget: crate::credit::PublishBudget::new(PUBLISH_BUFFER_BYTES),
        });
        let (reader, writer) = stream.into_split();
        let info = ConnectInfo {
            reconnects: 0,
            attempt: attempt + 1,
            address: config.at(&config.addresses()[address_index]).address(),
        };
        let driver = Driver {
            reader,
            writer,
            machine,
            decoder: FrameDecoder::new(negotiated.frame_max),
            read_buf: negotiated.leftover,
            commands: commands_rx,
            control: control_rx,
            shared,
            config,
            handle: Arc::downgrade(&inner),
            hook: hook.clone(),
            address_index,
            reconnects: 0,
            commands_done: false,
            control_done: false,
        };
        tokio::spawn(driver.run());
        let connection = Connection {
            inner,
            hook_owned: false,
        };
        if let Some(hook) = hook {
            connection.run_hook(hook, info);
        }
        Ok(connection)
    }

    /// Runs the on-connect hook on a task of its own, with a connection whose
    /// channels belong to the hook; its error goes to the error handlers.
    pub(crate) fn run_hook(&self, hook: OnConnect, info: ConnectInfo) {
        let connection = Connection {
            inner: self.inner.clone(),
            hook_owned: true,
        };
        tokio::spawn(async move {
            let inner = connection.inner.clone();
            if let Err(error) = hook(connection, info).await {
                tracing::warn!(%error, "on-connect hook failed");
                inner.shared.report(&error);
            }
        });
    }

    /// Recovery's reports: recovering, reconnected, queue renamed, step
    /// failed, recovered, failed.
    pub fn recovery_events(&self) -> broadcast::Receiver<RecoveryEvent> {
        self.inner.shared.events.subscribe()
    }

    /// Whether the connection is lost or being recovered right now.
    pub fn is_recovering(&self) -> bool {
        self.inner.shared.recovering_now.is_up()
    }

    pub(crate) fn from_weak(inner: &Weak<Inner>) -> Option<Self> {
        inner.upgrade().map(|inner| Connection {
            inner,
            hook_owned: false,
        })
    }

    /// What was negotiated at the first connect, and the broker's properties.
    pub fn server_info(&self) -> &ServerInfo {
        &self.inner.info
    }

    /// The largest frame the broker now connected accepts, framing included
    /// (0: no limit). It may change at a reconnect. A method or message
    /// whose method or content header frame is larger is refused with
    /// [`Error::FrameTooLarge`]; bodies are split into frames as needed.
    pub fn frame_max(&self) -> u32 {
        self.inner.shared.frame_max()
    }

    /// Opens a channel (the lowest free id). The caller closes it, or it
    /// closes when its last handle is dropped.
    pub async fn open_channel(&self) -> Result<Channel, Error> {
        let closed = Arc::new(OnceLock::new());
        let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (reply, answer) = oneshot::channel();
        self.inner
            .send(Command::OpenChannel {
                closed: closed.clone(),
                epoch: epoch.clone(),
                hook_owned: self.hook_owned,
                reply,
            })
            .await?;
        let id = self
            .inner
            .within_call_timeout("channel.open", answer)
            .await?;
        tracing::debug!(channel = id, "channel opened");
        Ok(Channel::new(id, closed, epoch, self.inner.clone()))
    }

    /// Runs `body` with a fresh channel and closes the channel afterwards,
    /// whatever `body` returned (the seeds' `with conn.channel() as channel`).
    pub async fn with_channel<T, E, F, Fut>(&self, body: F) -> Result<T, E>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<Error>,
    {
        let channel = self.open_channel().await?;
        let result = body(channel.clone()).await;
        let closed = channel.close().await;
        let value = result?;
        // A close that fails because the channel already failed is reported
        // by `body`'s own error; a clean body with a failed close is not clean.
        match closed {
            Ok(()) | Err(Error::ChannelClosed { .. }) => Ok(value),
            Err(e) => Err(e.into()),
        }
    }

    /// Registers `handler`, called with the error when the connection ends
    /// for any reason but the application's own `close()`.
    pub fn on_error(&self, handler: impl Fn(&Error) + Send + Sync + 'static) {
        if let Ok(mut handlers) = self.inner.shared.error_handlers.lock() {
            handlers.push(Box::new(handler));
        }
    }

    /// `Some(reason)` while the broker blocks publishing (a resource alarm).
    pub fn blocked(&self) -> watch::Receiver<Option<String>> {
        self.inner.shared.blocked.clone()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.error.get().is_some()
    }

    /// Sends `connection.close` and waits for the broker's close-ok (bounded
    /// by the connection timeout, at most 10 s).
    pub async fn close(&self) -> Result<(), Error> {
        if !self.is_closed() {
            let close = Command::CloseConnection {
                code: ReplyCode::REPLY_SUCCESS,
                text: "closed by the application".to_owned(),
            };
            // The control queue is never full; its branch in the I/O task
            // takes everything already queued (publishes included) first.
            let _ = self.inner.control.send(close);
        }
        self.closed().await
    }

    /// Resolves when the connection has ended: `Ok` after the application's
    /// own `close()`, the reason otherwise (the seeds' `join()`).
    pub async fn closed(&self) -> Result<(), Error> {
        let mut finished = self.inner.shared.finished.subscribe();
        let outcome = finished
            .wait_for(Option::is_some)
            .await
            .map(|o| o.clone())
            .ok()
            .flatten();
        outcome.unwrap_or_else(|| Err(self.inner.closed_error()))
    }

    /// Replaces the secret (password or token) of the connection: the live
    /// connection gets `connection.update-secret` (an OAuth 2 token refresh),
    /// and every later reconnect authenticates with it. Called while the
    /// connection is being recovered, it is stored at once — so that a
    /// reconnect that needs it can succeed — and sent once recovery is done.
    pub async fn update_secret(
        &self,
        secret: impl Into<String>,
        reason: &str,
    ) -> Result<(), Error> {
        let secret = secret.into();
        let reason = ShortString::new(reason)?;
        let update = connection::UpdateSecret {
            new_secret: Bytes::from(secret.clone()),
            reason,
        };
        self.inner
            .check_frame_of(0, &connection::UpdateSecret::INFO, |buf| {
                update.encode_args(buf)
            })?;
        if let Ok(mut stored) = self.inner.shared.secret.lock() {
            *stored = Some(secret);
        }
        let (reply, answer) = oneshot::channel();
        self.inner
            .send(Command::UpdateSecret {
                method: update,
                reply,
            })
            .await?;
        self.inner
            .within_call_timeout("connection.update-secret", answer)
            .await
    }
}
