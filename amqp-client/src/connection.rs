//! The connection handle: connect, open channels, watch for blocking, close.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::channel::Channel;
use crate::config::Config;
use crate::error::{Error, Initiator};
use crate::handshake;
use crate::io::Driver;
use crate::machine::{Command, Machine, Settings};
use crate::protocol::frame::FrameDecoder;
use crate::protocol::{FieldTable, ReplyCode, ShortString};
use crate::transport;

/// How many commands may wait for the I/O task before senders wait in turn.
const COMMAND_QUEUE: usize = 4096;

type ErrorHandler = Box<dyn Fn(&Error) + Send + Sync>;

/// State shared by the I/O task and every handle.
pub(crate) struct Shared {
    /// Why the connection ended; set once.
    pub error: Arc<OnceLock<Error>>,
    /// `Some(outcome)` once the I/O task has finished.
    pub finished: watch::Sender<Option<Result<(), Error>>>,
    /// `Some(reason)` while the broker blocks publishers.
    pub blocked: watch::Receiver<Option<String>>,
    error_handlers: Mutex<Vec<ErrorHandler>>,
}

impl Shared {
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
                if let Ok(handlers) = self.error_handlers.lock() {
                    for handler in handlers.iter() {
                        handler(&error);
                    }
                }
                Err(error)
            }
            None => Ok(()),
        };
        self.finished.send_replace(Some(outcome));
    }
}

/// Negotiated values and what the broker said of itself.
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
    pub commands: mpsc::Sender<Command>,
    pub control: mpsc::UnboundedSender<Command>,
    pub shared: Arc<Shared>,
    pub info: ServerInfo,
    pub config: Config,
    pub next_consumer: std::sync::atomic::AtomicU64,
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

    pub(crate) async fn send(&self, command: Command) -> Result<(), Error> {
        self.commands
            .send(command)
            .await
            .map_err(|_| self.closed_error())
    }
}

/// A connection to a broker. Cheap to clone; every clone, channel and
/// consumer shares it. Dropping the last of them closes it gracefully.
#[derive(Clone)]
pub struct Connection {
    pub(crate) inner: Arc<Inner>,
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
    /// within `config.connection_timeout`.
    pub async fn connect(config: Config) -> Result<Self, Error> {
        let address = config.address();
        tracing::debug!(%address, vhost = %config.vhost, "connecting");
        let timeout = config.connection_timeout;
        let opened = tokio::time::timeout(timeout, async {
            let mut stream = transport::connect(&config).await?;
            let negotiated = handshake::handshake(&mut stream, &config).await?;
            Ok::<_, Error>((stream, negotiated))
        })
        .await
        .map_err(|_| Error::Timeout {
            address: address.clone(),
            timeout,
        })??;
        let (stream, negotiated) = opened;
        tracing::info!(
            %address,
            channel_max = negotiated.channel_max,
            frame_max = negotiated.frame_max,
            heartbeat = negotiated.heartbeat,
            "connected"
        );

        let error = Arc::new(OnceLock::new());
        let (blocked_tx, blocked_rx) = watch::channel(None);
        let (finished, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            error: error.clone(),
            finished,
            blocked: blocked_rx,
            error_handlers: Mutex::new(Vec::new()),
        });
        let settings = Settings {
            channel_max: negotiated.channel_max,
            frame_max: negotiated.frame_max,
            heartbeat: Duration::from_secs(u64::from(negotiated.heartbeat)),
            close_timeout: timeout.min(Duration::from_secs(10)),
            max_body_size: config.max_body_size,
        };
        let machine = Machine::new(settings, Instant::now(), error, blocked_tx);
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (reader, writer) = stream.into_split();
        let driver = Driver {
            reader,
            writer,
            machine,
            decoder: FrameDecoder::new(negotiated.frame_max),
            read_buf: negotiated.leftover,
            commands: commands_rx,
            control: control_rx,
            shared: shared.clone(),
        };
        tokio::spawn(driver.run());
        Ok(Connection {
            inner: Arc::new(Inner {
                commands: commands_tx,
                control: control_tx,
                shared,
                info: ServerInfo {
                    channel_max: negotiated.channel_max,
                    frame_max: negotiated.frame_max,
                    heartbeat: negotiated.heartbeat,
                    properties: negotiated.server_properties,
                },
                config,
                next_consumer: std::sync::atomic::AtomicU64::new(1),
            }),
        })
    }

    /// What was negotiated, and the broker's properties.
    pub fn server_info(&self) -> &ServerInfo {
        &self.inner.info
    }

    /// Opens a channel (the lowest free id). The caller closes it, or it
    /// closes when its last handle is dropped.
    pub async fn open_channel(&self) -> Result<Channel, Error> {
        let closed = Arc::new(OnceLock::new());
        let (reply, answer) = oneshot::channel();
        self.inner
            .send(Command::OpenChannel {
                closed: closed.clone(),
                reply,
            })
            .await?;
        let id = answer.await.map_err(|_| self.inner.closed_error())??;
        tracing::debug!(channel = id, "channel opened");
        Ok(Channel::new(id, closed, self.inner.clone()))
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
            let _ = self.inner.control.send(Command::CloseConnection {
                code: ReplyCode::REPLY_SUCCESS,
                text: "closed by the application".to_owned(),
            });
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

    /// Replaces the credentials of a live connection (an OAuth2 token refresh).
    pub async fn update_secret(&self, secret: impl Into<Bytes>, reason: &str) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .send(Command::UpdateSecret {
                secret: secret.into(),
                reason: ShortString::new(reason)?,
                reply,
            })
            .await?;
        answer.await.map_err(|_| self.inner.closed_error())?
    }
}
