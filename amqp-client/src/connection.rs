//! The connection handle: connect, open channels, watch for blocking, close.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{broadcast, oneshot, watch};

use crate::channel::Channel;
use crate::command_queue::command_queue;
use crate::config::Config;
use crate::connect::{config_for_attempt, jitter, open_stream, CredentialsProvider};
pub use crate::connect::{ConnectInfo, Credentials, ProviderError};
use crate::error::Error;
use crate::events::RecoveryEvent;
use crate::io::{Driver, OnReconnect, Queues, Socket};
pub use crate::link::ServerInfo;
use crate::link::{control_queue, ErrorHandler, Inner, Shared, PUBLISH_BUFFER_BYTES};
use crate::machine::Settings;
use crate::ports::{Blocked, Command, EventSender, Machine, Recovering, Signals};
use crate::protocol::methods::connection;
use crate::protocol::{ReplyCode, ShortString};
use crate::telemetry::{IoTelemetry, Telemetry};

/// How many commands may wait for the I/O task before senders wait in turn.
const COMMAND_QUEUE: usize = 4096;

/// The on-connect hook: runs after the first connect and after every
/// reconnect, on a task of its own, with the connection.
pub(crate) type OnConnect = Arc<
    dyn Fn(Connection, ConnectInfo) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>
        + Send
        + Sync,
>;

/// Sets up a connection before it opens: the on-connect hook and error
/// handlers must exist before the first connect to see it.
///
/// ```no_run
/// use amqp091::prelude::*;
/// use amqp091::{Config, Connection, Credentials};
///
/// # async fn fetch_token() -> Result<String, std::io::Error> { Ok(String::new()) }
/// # async fn example() -> Result<(), amqp091::Error> {
/// let config: Config = "amqp://rabbit-1/%2f".parse()?;
/// let connection = Connection::builder(config.fallback_address("rabbit-2", 5672))
///     // Asked before every connect attempt: a fresh token each time.
///     .credentials_provider(|| async { Ok(Credentials::new("app", fetch_token().await?)) })
///     .on_connect(|connection, _info| async move {
///         let channel = connection.open_channel().await?;
///         channel.queue_declare(queue::Declare { queue: "updates".into(), ..Default::default() }).await?;
///         Ok(())
///     })
///     .on_error(|error| eprintln!("connection error: {error}"))
///     .connect()
///     .await?;
/// # Ok(())
/// # }
/// ```
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
    /// # async fn run() -> Result<(), amqp091::Error> {
    /// use amqp091::prelude::*;
    /// use amqp091::{Config, Connection, ConsumeOptions};
    ///
    /// let config: Config = "amqp://guest:guest@127.0.0.1:5672/%2f".parse()?;
    /// let connection = Connection::builder(config)
    ///     .on_connect(|connection, info| async move {
    ///         if info.is_reconnect() {
    ///             eprintln!("reconnected to {} (reconnect {})", info.address, info.reconnects);
    ///         }
    ///         let channel = connection.open_channel().await?;
    ///         channel
    ///             .queue_declare(queue::Declare { queue: "jobs".into(), durable: true, ..Default::default() })
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
///
/// ```no_run
/// use amqp091::Connection;
///
/// # async fn example() -> Result<(), amqp091::Error> {
/// let connection = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
/// println!("frame_max {}", connection.server_info().frame_max);
/// let channel = connection.open_channel().await?;
/// // ... use the channel; other tasks may use clones of both ...
/// channel.close().await?;
/// connection.close().await?;
/// assert!(connection.is_closed());
/// # Ok(())
/// # }
/// ```
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

        // One copy for the handles and the I/O task.
        let config = Arc::new(config);
        let error = Arc::new(OnceLock::new());
        let (blocked_tx, blocked_rx) = Blocked::new();
        let (recovering_tx, recovering_rx) = Recovering::new();
        let events = EventSender::default();
        let (finished, _) = watch::channel(None);
        let telemetry = Telemetry::new(&config, address_index);
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
            telemetry: telemetry.clone(),
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
        let machine = Machine::new(settings, Instant::now(), error);
        let signals = Signals {
            blocked: blocked_tx,
            recovering: recovering_tx,
            events,
            telemetry: IoTelemetry::new(telemetry.clone()),
        };
        let (commands_tx, commands_rx) = command_queue(COMMAND_QUEUE);
        let (control_tx, control_rx) = control_queue();
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
        let info = ConnectInfo {
            reconnects: 0,
            attempt: attempt + 1,
            address: config.at(&config.addresses()[address_index]).address(),
        };
        let on_reconnect = hook.clone().map(|hook| {
            // Weak: the I/O task must not keep the connection alive.
            let handle = Arc::downgrade(&inner);
            Box::new(move |info| {
                if let Some(connection) = Connection::from_weak(&handle) {
                    connection.run_hook(hook.clone(), info);
                }
            }) as OnReconnect
        });
        let socket = Socket {
            stream,
            frame_max: negotiated.frame_max,
            leftover: negotiated.leftover,
            address_index,
        };
        let driver = Driver::new(
            machine,
            signals,
            socket,
            Queues {
                commands: commands_rx,
                control: control_rx,
            },
            shared,
            config,
            on_reconnect,
        );
        tokio::spawn(telemetry.instrument(driver.run()));
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
        let opened = self
            .inner
            .within_call_timeout("channel.open", answer)
            .await?;
        tracing::debug!(channel = opened.id, "channel opened");
        Ok(Channel::new(opened, closed, epoch, self.inner.clone()))
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
        let reason = ShortString::from(reason);
        let update = connection::UpdateSecret {
            new_secret: Bytes::from(secret.clone()),
            reason,
        };
        self.inner.check_frame_of(
            0,
            &connection::UpdateSecret::INFO,
            update.check_short_strings(),
            |buf| update.encode_args(buf),
        )?;
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
