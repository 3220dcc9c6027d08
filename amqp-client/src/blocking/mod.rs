//! The client for code without an async runtime (feature `blocking`), in the
//! spirit of `reqwest::blocking`: [`Connection`], [`Channel`] and a
//! [`Consumer`] that is an [`Iterator`] of deliveries, with the methods of the
//! async API one to one (the generated ones included), each waiting for its
//! answer instead of returning a future.
//!
//! ```no_run
//! use amqp091::blocking::Connection;
//! use amqp091::prelude::*;
//! use amqp091::{BasicProperties, ConsumeOptions};
//!
//! fn main() -> Result<(), amqp091::Error> {
//!     let connection = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f")?;
//!     let channel = connection.open_channel()?;
//!     let declared = channel.queue_declare(queue::Declare {
//!         queue: "hello".into(),
//!         ..Default::default()
//!     })?;
//!     channel.basic_publish("", &declared.queue, false, &BasicProperties::default(), "hi")?;
//!     for delivery in channel.basic_consume("hello", ConsumeOptions::default())? {
//!         let delivery = delivery?;
//!         assert_eq!(&delivery.body[..], b"hi");
//!         delivery.ack()?;
//!         break;
//!     }
//!     connection.close()
//! }
//! ```
//!
//! # How it runs
//!
//! A connection owns a thread running a current-thread tokio runtime, which
//! runs the connection's I/O task (and recovery, heartbeats, hooks). A
//! blocking call does not hand its work to that thread: it polls the async
//! call on the caller's own thread with the runtime's context entered, and
//! parks the thread only when the async call would wait (for the broker's answer, for room in the publish queue). So a
//! publish that finds room costs what the async one does plus entering the
//! runtime, with no thread switch, and any number of threads may call at once.
//! Every clone, channel, consumer and delivery keeps the runtime alive; when
//! the last of them is dropped, the connection is closed gracefully and the
//! thread ends (the drop waits for that, as long as the close takes).
//!
//! Called from inside an async runtime (a tokio task, or any thread that
//! entered a runtime), every blocking call returns
//! [`Error::BlockingInAsyncContext`] and does nothing: blocking there would
//! stall a worker thread, or deadlock a current-thread runtime.
//!
//! Recovery, the on-connect hook, publisher confirms and error handlers work
//! as in the async API, with which this module shares everything but the
//! waiting. [`Delivery`] wraps the async [`crate::Delivery`] (its fields are
//! reached through `Deref`) with blocking `ack`, `nack` and `reject`.

mod channel;
#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, unused_imports, rustdoc::redundant_explicit_links)]
mod generated;

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, oneshot, watch};

pub use self::channel::{
    Channel, Consumer, Delivery, GetMessage, PublishConfirm, RecvTimeoutError,
};
use crate::connection::{ConnectInfo, Credentials, ProviderError, ServerInfo};
use crate::error::Error;
use crate::events::RecoveryEvent;
use crate::Config;

/// How long dropping the last handle waits for the connection's graceful
/// close before the runtime is shut down regardless (the async close is
/// itself bounded by the connection timeout, at most 10 s).
const CLOSE_ON_DROP_LIMIT: Duration = Duration::from_secs(15);

/// The runtime thread a connection owns, shared by every blocking handle.
///
/// A current-thread runtime: callers poll their own calls, so the runtime
/// runs only the connection's tasks. A multi-thread runtime of one worker
/// measured the same CPU per message (perf `--blocking`, sink and flood
/// peers) for a thread more and the `rt-multi-thread` feature of tokio.
struct Runtime {
    handle: tokio::runtime::Handle,
    /// The async connection, closed when the last handle goes: held here so
    /// that the close is graceful rather than the runtime's tasks dropped.
    connection: OnceLock<crate::Connection>,
    stop: Mutex<Option<oneshot::Sender<Option<crate::Connection>>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Runtime {
    fn start() -> Result<Arc<Self>, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::BlockingThread(Arc::new(e)))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<Option<crate::Connection>>();
        let thread = std::thread::Builder::new()
            .name("amqp091-blocking".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    // A dropped sender (a failed connect) means there is
                    // nothing to close.
                    if let Ok(Some(connection)) = stopped.await {
                        let _ = tokio::time::timeout(CLOSE_ON_DROP_LIMIT, connection.close()).await;
                    }
                });
            })
            .map_err(|e| Error::BlockingThread(Arc::new(e)))?;
        Ok(Arc::new(Self {
            handle,
            connection: OnceLock::new(),
            stop: Mutex::new(Some(stop)),
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Runs `future` to completion on this thread with the runtime entered,
    /// or refuses to when this thread is inside an async runtime.
    ///
    /// Not `Handle::block_on`, which costs a lock (of the runtime's seed
    /// generator) per call: entering the runtime's context is all that the
    /// async calls need of it (for their timers and spawns), and a waker
    /// that unparks this thread all that waiting needs.
    fn block_on<F: Future>(&self, call: &'static str, future: F) -> Result<F::Output, Error> {
        refuse_inside_async(call)?;
        let _entered = self.handle.enter();
        let mut future = std::pin::pin!(future);
        THREAD_WAKER.with(|waker| {
            let mut context = std::task::Context::from_waker(waker);
            loop {
                if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut context) {
                    return Ok(output);
                }
                // A wake before this park leaves the thread's token, so
                // park returns at once; a spurious return just polls again.
                std::thread::park();
            }
        })
    }

    /// [`block_on`](Self::block_on) of a fallible call.
    fn run<T, F: Future<Output = Result<T, Error>>>(
        &self,
        call: &'static str,
        future: F,
    ) -> Result<T, Error> {
        self.block_on(call, future)?
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let connection = self.connection.take();
        if let Some(stop) = self.stop.get_mut().ok().and_then(Option::take) {
            let _ = stop.send(connection);
        }
        let thread = self.thread.get_mut().ok().and_then(Option::take);
        if let Some(thread) = thread {
            // The last handle may go on the runtime thread itself (inside a
            // task); joining there would wait for ever.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// Wakes the thread it was made on, which [`Runtime::block_on`] parks.
struct ThreadUnparker(std::thread::Thread);

impl std::task::Wake for ThreadUnparker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

thread_local! {
    /// Made once per thread: a waker per call would allocate per publish.
    static THREAD_WAKER: std::task::Waker =
        std::task::Waker::from(Arc::new(ThreadUnparker(std::thread::current())));
}

fn refuse_inside_async(call: &'static str) -> Result<(), Error> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::BlockingInAsyncContext { call });
    }
    Ok(())
}

/// The blocking on-connect hook.
type OnConnect = Arc<dyn Fn(Connection, ConnectInfo) -> Result<(), Error> + Send + Sync>;
/// The blocking credentials provider.
type CredentialsProvider = Arc<dyn Fn() -> Result<Credentials, ProviderError> + Send + Sync>;
type ErrorHandler = Box<dyn Fn(&Error) + Send + Sync>;

/// Sets up a blocking connection before it opens (see
/// [`crate::ConnectionBuilder`]).
///
/// ```no_run
/// use amqp091::blocking::Connection;
/// use amqp091::Config;
///
/// # fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let config: Config = "amqp://guest:guest@rabbit-1:5672/%2f".parse()?;
/// let connection = Connection::builder(config)
///     .on_error(|error| eprintln!("amqp: {error}"))
///     .connect()?;
/// # drop(connection);
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until `connect` is called"]
pub struct ConnectionBuilder {
    config: Config,
    hook: Option<OnConnect>,
    credentials_provider: Option<CredentialsProvider>,
    error_handlers: Vec<ErrorHandler>,
}

impl std::fmt::Debug for ConnectionBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionBuilder")
            .field("address", &self.config.address())
            .field("hook", &self.hook.is_some())
            .finish_non_exhaustive()
    }
}

impl ConnectionBuilder {
    /// Registers a hook run after every connect, the first and each
    /// reconnect, as [`crate::ConnectionBuilder::on_connect`] does: channels
    /// it opens belong to it and are not recovered (it declares them again
    /// itself), and its error goes to the error handlers.
    ///
    /// It runs on a thread of its own, started for each connect, so that it
    /// may make blocking calls (the runtime thread must not block: it runs
    /// the connection). It may keep that thread for as long as it wants, for
    /// instance to consume on the channel it opened; the connect does not
    /// wait for it.
    ///
    /// ```no_run
    /// use amqp091::blocking::Connection;
    /// use amqp091::prelude::*;
    /// use amqp091::Config;
    ///
    /// # fn example(config: Config) -> Result<(), amqp091::Error> {
    /// let connection = Connection::builder(config)
    ///     .on_connect(|connection, info| {
    ///         let channel = connection.open_channel()?;
    ///         channel.queue_declare(queue::Declare { queue: "work".into(), ..Default::default() })?;
    ///         println!("connected to {} (reconnects: {})", info.address, info.reconnects);
    ///         Ok(())
    ///     })
    ///     .connect()?;
    /// # Ok(()) }
    /// ```
    pub fn on_connect(
        mut self,
        hook: impl Fn(Connection, ConnectInfo) -> Result<(), Error> + Send + Sync + 'static,
    ) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Registers a credentials provider, called before each connect attempt
    /// (see [`crate::ConnectionBuilder::credentials_provider`]). It runs on
    /// the runtime's blocking pool, so it may block (to fetch a token).
    pub fn credentials_provider(
        mut self,
        provider: impl Fn() -> Result<Credentials, ProviderError> + Send + Sync + 'static,
    ) -> Self {
        self.credentials_provider = Some(Arc::new(provider));
        self
    }

    /// Registers an error handler (see [`Connection::on_error`]).
    pub fn on_error(mut self, handler: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.error_handlers.push(Box::new(handler));
        self
    }

    /// Starts the runtime thread and connects (retrying with backoff if
    /// `recovery.retry_initial_connect`).
    pub fn connect(self) -> Result<Connection, Error> {
        refuse_inside_async("connection.open")?;
        let runtime = Runtime::start()?;
        let mut builder = crate::Connection::builder(self.config);
        for handler in self.error_handlers {
            builder = builder.on_error(handler);
        }
        if let Some(hook) = self.hook {
            // Weak: the hook lives in the I/O task, on the runtime, which
            // must not keep itself alive.
            let weak = Arc::downgrade(&runtime);
            builder = builder.on_connect(move |connection, info| {
                run_hook(hook.clone(), weak.clone(), connection, info)
            });
        }
        if let Some(provider) = self.credentials_provider {
            builder = builder.credentials_provider(move || {
                let provider = provider.clone();
                async move {
                    match tokio::task::spawn_blocking(move || provider()).await {
                        Ok(answer) => answer,
                        Err(panicked) => Err(ProviderError::from(panicked.to_string())),
                    }
                }
            });
        }
        let connection = runtime.run("connection.open", builder.connect())?;
        let _ = runtime.connection.set(connection.clone());
        Ok(Connection {
            inner: connection,
            runtime,
        })
    }
}

/// Runs the blocking hook on a thread of its own and reports its outcome to
/// the async core, which hands an error to the error handlers.
async fn run_hook(
    hook: OnConnect,
    runtime: Weak<Runtime>,
    connection: crate::Connection,
    info: ConnectInfo,
) -> Result<(), Error> {
    // Gone: every handle was dropped and the connection is closing.
    let Some(runtime) = runtime.upgrade() else {
        return Ok(());
    };
    let (done, outcome) = oneshot::channel();
    let started = std::thread::Builder::new()
        .name("amqp091-on-connect".to_owned())
        .spawn(move || {
            let connection = Connection {
                inner: connection,
                runtime,
            };
            let _ = done.send(hook(connection, info));
        });
    match started {
        Ok(_) => outcome.await.unwrap_or(Err(Error::HookPanicked)),
        Err(e) => Err(Error::BlockingThread(Arc::new(e))),
    }
}

/// A blocking connection to a broker (see [`crate::Connection`]). Cheap to
/// clone; every clone, channel, consumer and delivery shares it and its
/// runtime thread. Dropping the last of them closes it gracefully.
///
/// ```no_run
/// use amqp091::blocking::Connection;
///
/// # fn example() -> Result<(), amqp091::Error> {
/// let connection = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f")?;
/// println!("connected to RabbitMQ {:?}", connection.server_info());
/// let channel = connection.open_channel()?;
/// # drop(channel);
/// connection.close()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connection {
    inner: crate::Connection,
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("blocking::Connection")
            .field(&self.inner)
            .finish()
    }
}

impl Connection {
    /// Connects to the broker at `url` (`amqp://…` or `amqps://…`).
    pub fn open(url: &str) -> Result<Self, Error> {
        Self::connect(url.parse()?)
    }

    /// Connects with `config` (see [`crate::Connection::connect`]).
    pub fn connect(config: Config) -> Result<Self, Error> {
        Self::builder(config).connect()
    }

    /// A builder, for an on-connect hook, a credentials provider and error
    /// handlers that must be in place before the first connect.
    pub fn builder(config: Config) -> ConnectionBuilder {
        ConnectionBuilder {
            config,
            hook: None,
            credentials_provider: None,
            error_handlers: Vec::new(),
        }
    }

    /// The async connection underneath, for code that has a runtime of its
    /// own as well (its futures need this connection's runtime only for
    /// timers, which any tokio runtime provides).
    pub fn as_async(&self) -> &crate::Connection {
        &self.inner
    }

    /// Recovery's reports (see [`crate::Connection::recovery_events`]), as
    /// an iterator.
    pub fn recovery_events(&self) -> RecoveryEvents {
        RecoveryEvents {
            receiver: self.inner.recovery_events(),
            runtime: self.runtime.clone(),
        }
    }

    /// Whether the connection is lost or being recovered right now.
    pub fn is_recovering(&self) -> bool {
        self.inner.is_recovering()
    }

    /// What was negotiated at the first connect, and the broker's properties.
    pub fn server_info(&self) -> &ServerInfo {
        self.inner.server_info()
    }

    /// The largest frame the broker now connected accepts (see
    /// [`crate::Connection::frame_max`]).
    pub fn frame_max(&self) -> u32 {
        self.inner.frame_max()
    }

    /// Opens a channel (the lowest free id). The caller closes it, or it
    /// closes when its last handle is dropped.
    pub fn open_channel(&self) -> Result<Channel, Error> {
        let channel = self
            .runtime
            .run("channel.open", self.inner.open_channel())?;
        Ok(Channel::new(channel, self.runtime.clone()))
    }

    /// Runs `body` with a fresh channel and closes the channel afterwards,
    /// whatever `body` returned (see [`crate::Connection::with_channel`]).
    pub fn with_channel<T, E, F>(&self, body: F) -> Result<T, E>
    where
        F: FnOnce(Channel) -> Result<T, E>,
        E: From<Error>,
    {
        let channel = self.open_channel()?;
        let result = body(channel.clone());
        let closed = channel.close();
        let value = result?;
        match closed {
            Ok(()) | Err(Error::ChannelClosed { .. }) => Ok(value),
            Err(e) => Err(e.into()),
        }
    }

    /// Registers `handler`, called with the error when the connection ends
    /// for any reason but the application's own `close()`. It is called on
    /// the runtime thread: it must not block (send what it gets elsewhere).
    pub fn on_error(&self, handler: impl Fn(&Error) + Send + Sync + 'static) {
        self.inner.on_error(handler);
    }

    /// `Some(reason)` while the broker blocks publishing (a resource alarm).
    /// [`watch::Receiver::borrow`] reads it without a runtime.
    pub fn blocked(&self) -> watch::Receiver<Option<String>> {
        self.inner.blocked()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Sends `connection.close` and waits for the broker's close-ok (see
    /// [`crate::Connection::close`]). The runtime thread ends when the last
    /// handle is dropped.
    pub fn close(&self) -> Result<(), Error> {
        self.runtime.run("connection.close", self.inner.close())
    }

    /// Waits until the connection has ended: `Ok` after the application's
    /// own `close()`, the reason otherwise.
    pub fn closed(&self) -> Result<(), Error> {
        self.runtime.run("connection.closed", self.inner.closed())
    }

    /// Replaces the secret (password or token) of the connection (see
    /// [`crate::Connection::update_secret`]).
    pub fn update_secret(&self, secret: impl Into<String>, reason: &str) -> Result<(), Error> {
        self.runtime.run(
            "connection.update-secret",
            self.inner.update_secret(secret, reason),
        )
    }
}

/// Recovery's reports as a blocking iterator (see [`RecoveryEvent`]). It
/// ends when the connection is gone. Events it fell too far behind to
/// receive (more than 256 unread) are skipped.
///
/// ```no_run
/// # fn example(connection: amqp091::blocking::Connection) {
/// let events = connection.recovery_events();
/// std::thread::spawn(move || {
///     for event in events {
///         eprintln!("recovery: {event:?}");
///     }
/// });
/// # }
/// ```
pub struct RecoveryEvents {
    receiver: broadcast::Receiver<RecoveryEvent>,
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for RecoveryEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryEvents").finish_non_exhaustive()
    }
}

impl RecoveryEvents {
    async fn next_event(&mut self) -> Option<RecoveryEvent> {
        loop {
            match self.receiver.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    tracing::warn!(skipped, "recovery events skipped: read them faster");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next event within `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<RecoveryEvent, RecvTimeoutError> {
        let runtime = self.runtime.clone();
        // The timer is made inside the future: only there is the runtime entered.
        let next = async { tokio::time::timeout(timeout, self.next_event()).await };
        match runtime.block_on("recovery_events", next)? {
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(RecvTimeoutError::Ended),
            Err(_) => Err(RecvTimeoutError::Timeout(timeout)),
        }
    }
}

impl Iterator for RecoveryEvents {
    type Item = RecoveryEvent;

    /// The next event, waiting for it; `None` once the connection is gone
    /// (or when called from inside an async runtime).
    fn next(&mut self) -> Option<RecoveryEvent> {
        let runtime = self.runtime.clone();
        runtime
            .block_on("recovery_events", self.next_event())
            .ok()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shareable<T: Send + Sync>() {}

    #[test]
    fn every_handle_may_move_between_threads() {
        shareable::<Connection>();
        shareable::<Channel>();
        shareable::<Delivery>();
        shareable::<GetMessage>();
        shareable::<PublishConfirm>();
        shareable::<RecvTimeoutError>();
        fn sendable<T: Send>() {}
        sendable::<Consumer>();
        sendable::<RecoveryEvents>();
    }

    #[test]
    fn a_failed_connect_is_the_async_error_and_ends_the_runtime_thread() {
        // Port 1 on the loopback: nothing listens there. Returning at all
        // means the drop of the runtime joined its thread.
        let config: Config = "amqp://guest:guest@127.0.0.1:1/%2f"
            .parse()
            .expect("a valid URL");
        let error = Connection::connect(config.connection_timeout(Duration::from_secs(2)))
            .expect_err("nothing listens on port 1");
        assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn a_call_from_inside_a_runtime_is_refused_before_anything_is_done() {
        let error = Connection::open("amqp://guest:guest@127.0.0.1:1/%2f")
            .expect_err("refused inside a runtime");
        assert!(
            matches!(
                error,
                Error::BlockingInAsyncContext {
                    call: "connection.open"
                }
            ),
            "{error:?}"
        );
    }
}
