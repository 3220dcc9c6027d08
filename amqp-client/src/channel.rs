//! The channel handle: the AMQP methods of a channel (the generated ones in
//! `channel/generated_methods.rs`, an `impl Channel` of their own),
//! publishing with optional confirms, consuming, `basic.get`, returns.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::events::{Confirmation, ReturnedMessage};
use crate::link::{check_frame_size, Inner as ConnectionInner};
use crate::machine::{ChannelRef, PublishBody, Reply, Settlement};
use crate::ports::Command;
use crate::protocol::constants::FRAME_MIN_SIZE;
use crate::protocol::frame;
use crate::protocol::methods::{basic, Method};
use crate::protocol::{BasicProperties, ChannelRpc, FieldTable, ShortString};
use crate::telemetry::{ChannelTelemetry, Settled, Started};

/// What a queued publish costs in memory beyond its frames (command, queue
/// entry, handles), charged to the publish budget with its bytes so that the
/// budget bounds memory for small messages too.
const QUEUED_MESSAGE_OVERHEAD: usize = 256;

pub(crate) struct ChannelInner {
    pub id: u16,
    /// What commands name: the id with the incarnation this handle opened.
    pub target: ChannelRef,
    /// Where publishers encode method and header frames: one buffer carved
    /// into `Bytes` per publish, so encoding allocates only when it is used up.
    scratch: std::sync::Mutex<bytes::BytesMut>,
    pub closed: Arc<OnceLock<Error>>,
    /// Bumped by the connection at each reconnect.
    pub epoch: Arc<AtomicU64>,
    pub conn: Arc<ConnectionInner>,
    confirm_mode: AtomicBool,
    /// The channel's span and the connection's metric handles (nothing
    /// without the `metrics` feature).
    pub telemetry: ChannelTelemetry,
}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        // The last handle is gone: close the channel without waiting (the
        // control queue is unbounded, so this never blocks or spawns).
        if self.closed.get().is_none() {
            let _ = self.conn.control.send(Command::CloseChannel {
                channel: self.target,
                reply: None,
            });
        }
    }
}

/// A channel: where exchanges and queues are declared, messages published
/// and consumed. Open one with
/// [`Connection::open_channel`](crate::Connection::open_channel).
///
/// Cheap to clone, `Send + Sync`: many tasks may use it at once; their
/// synchronous calls queue so that one is on the wire at a time. It closes
/// when [`close`](Self::close) is called, when its last handle drops, or
/// when the broker closes it on an error (a soft error such as `not-found`,
/// reported by the failed call and by [`closed_error`](Self::closed_error)
/// afterwards).
///
/// ```no_run
/// use amqp091::prelude::*;
/// use amqp091::{BasicProperties, Connection};
///
/// # async fn example() -> Result<(), amqp091::Error> {
/// let connection = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
/// let channel = connection.open_channel().await?;
/// channel
///     .exchange_declare(exchange::Declare {
///         exchange: "logs".into(),
///         kind: "fanout".into(),
///         ..Default::default()
///     })
///     .await?;
/// let declared = channel.queue_declare(queue::Declare::default()).await?;
/// channel
///     .queue_bind(queue::Bind {
///         queue: declared.queue.clone(),
///         exchange: "logs".into(),
///         ..Default::default()
///     })
///     .await?;
/// channel.basic_publish("logs", "", false, &BasicProperties::default(), "hi").await?;
/// channel.close().await?;
/// # Ok(())
/// # }
/// ```
///
/// Consuming: a prefetch limit, then each delivery settled on the delivery
/// itself (`basic.ack`, `basic.nack` and `basic.reject` have no `Channel`
/// method; see the table below).
///
/// ```no_run
/// use amqp091::prelude::*;
/// use amqp091::ConsumeOptions;
///
/// # async fn example(channel: amqp091::Channel) -> Result<(), amqp091::Error> {
/// channel.basic_qos(basic::Qos { prefetch_count: 50, ..Default::default() }).await?;
/// let mut consumer = channel.basic_consume("jobs", ConsumeOptions::default()).await?;
/// while let Some(delivery) = consumer.next().await {
///     let delivery = delivery?;
///     match std::str::from_utf8(&delivery.body) {
///         Ok(job) => {
///             println!("job: {job}");
///             delivery.ack().await?;
///         }
///         // Not requeued: dropped, or dead-lettered if the queue has a
///         // dead-letter exchange.
///         Err(_) => delivery.reject(false).await?,
///     }
/// }
/// // A single message, polling instead:
/// if let Some(message) = channel.basic_get("jobs", false).await? {
///     message.delivery.ack().await?;
/// }
/// # Ok(())
/// # }
/// ```
///
/// # Every AMQP method, and where to find it
///
/// Each method a client sends on a channel has a method here taking its
/// struct from [`protocol`](crate::protocol) (`queue_declare` takes a
/// [`queue::Declare`](crate::protocol::queue::Declare)); those with a
/// `no-wait` flag have a `_no_wait` twin that does not wait for the reply.
/// Their docs, and the structs', say what each method and field means and
/// where RabbitMQ departs from the spec. The rest are sent by the calls that
/// must track state with them:
///
/// | AMQP method | Sent by |
/// |---|---|
/// | `channel.open` | [`Connection::open_channel`](crate::Connection::open_channel) |
/// | `channel.close` | [`close`](Self::close) (received: the channel's error) |
/// | `channel.flow` | [`channel_flow`](Self::channel_flow) (RabbitMQ refuses `active = false`) |
/// | `exchange.declare`, `exchange.delete` | [`exchange_declare`](Self::exchange_declare), [`exchange_delete`](Self::exchange_delete) |
/// | `exchange.bind`, `exchange.unbind` (RabbitMQ) | [`exchange_bind`](Self::exchange_bind), [`exchange_unbind`](Self::exchange_unbind) |
/// | `queue.declare`, `queue.delete`, `queue.purge` | [`queue_declare`](Self::queue_declare), [`queue_delete`](Self::queue_delete), [`queue_purge`](Self::queue_purge) |
/// | `queue.bind`, `queue.unbind` | [`queue_bind`](Self::queue_bind), [`queue_unbind`](Self::queue_unbind) |
/// | `basic.qos` | [`basic_qos`](Self::basic_qos) |
/// | `basic.publish` | [`basic_publish`](Self::basic_publish), [`publish`](Self::publish) |
/// | `basic.consume` | [`basic_consume`](Self::basic_consume), [`basic_consume_with`](Self::basic_consume_with); deliveries (`basic.deliver`) come on the [`Consumer`](crate::Consumer) |
/// | `basic.cancel` | [`Consumer::cancel`](crate::Consumer::cancel) (or [`basic_cancel`](Self::basic_cancel), which leaves the client's side of the consumer to the broker's cancel-ok) |
/// | `basic.get` | [`basic_get`](Self::basic_get) |
/// | `basic.ack`, `basic.nack`, `basic.reject` | [`Delivery::ack`](crate::Delivery::ack), [`Delivery::ack_multiple`](crate::Delivery::ack_multiple), [`Delivery::nack`](crate::Delivery::nack), [`Delivery::reject`](crate::Delivery::reject): a delivery knows which connection its tag belongs to, so a tag from before a reconnect is refused instead of settling another message |
/// | `basic.recover`, `basic.recover-async` | [`basic_recover`](Self::basic_recover), [`basic_recover_async`](Self::basic_recover_async) (RabbitMQ supports only `requeue = true`) |
/// | `basic.return` (from the broker) | [`returns`](Self::returns), or the publish's [`Confirmation`] in confirm mode |
/// | `tx.select`, `tx.commit`, `tx.rollback` | [`tx_select`](Self::tx_select), [`tx_commit`](Self::tx_commit), [`tx_rollback`](Self::tx_rollback) |
/// | `confirm.select` (RabbitMQ) | [`confirm_select`](Self::confirm_select); the broker's `basic.ack`/`basic.nack` resolve each [`PublishConfirm`], and [`wait_for_confirms`](Self::wait_for_confirms) awaits them all |
///
/// The `connection` class is run by [`Connection`](crate::Connection)
/// (`connection.blocked` is [`Connection::blocked`](crate::Connection::blocked),
/// `connection.update-secret` [`Connection::update_secret`](crate::Connection::update_secret)).
#[derive(Clone)]
pub struct Channel {
    pub(crate) inner: Arc<ChannelInner>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

/// Options of [`Channel::basic_consume`].
///
/// ```no_run
/// use amqp091::{Channel, ConsumeOptions, FieldTable};
///
/// # async fn example(channel: Channel) -> Result<(), amqp091::Error> {
/// let options = ConsumeOptions {
///     consumer_tag: "billing-1".into(),
///     exclusive: true,
///     arguments: FieldTable::new().with("x-priority", 10i32),
///     ..ConsumeOptions::default()
/// };
/// let consumer = channel.basic_consume("invoices", options).await?;
/// assert_eq!(consumer.tag(), "billing-1");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ConsumeOptions {
    /// The consumer tag; empty lets the client choose one.
    pub consumer_tag: ShortString,
    /// Deliveries need no ack.
    pub no_ack: bool,
    /// The only consumer of the queue.
    pub exclusive: bool,
    /// Not delivered messages published on this connection.
    pub no_local: bool,
    /// Extra arguments (`x-priority`…).
    pub arguments: FieldTable,
}

/// The confirmation of one publish: `.await` it for the outcome, or drop it
/// when it does not matter (it is not itself a future, so dropping it
/// unawaited is not a mistake).
///
/// Publishing many messages, then awaiting their confirmations, keeps the
/// pipe full:
///
/// ```no_run
/// use amqp091::prelude::*;
/// use amqp091::{BasicProperties, Channel, Confirmation};
///
/// # async fn example(channel: Channel) -> Result<(), amqp091::Error> {
/// channel.confirm_select(confirm::Select::default()).await?;
/// let mut pending = Vec::new();
/// for n in 0..100 {
///     let body = format!("message {n}");
///     pending.push(channel.basic_publish("", "jobs", false, &BasicProperties::default(), body).await?);
/// }
/// for confirm in pending {
///     if confirm.await? != Confirmation::Ack {
///         eprintln!("a message was not taken; publish it again");
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct PublishConfirm {
    /// In confirm mode: the answer, and the connection whose error explains
    /// an answer that never comes.
    answer: Option<(ConfirmReceiver, Arc<ConnectionInner>)>,
}

type ConfirmReceiver = oneshot::Receiver<Result<Confirmation, Error>>;

impl std::fmt::Debug for PublishConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishConfirm")
            .field("confirm_mode", &self.answer.is_some())
            .finish()
    }
}

impl std::future::IntoFuture for PublishConfirm {
    type Output = Result<Confirmation, Error>;
    type IntoFuture = ConfirmationFuture;

    fn into_future(self) -> ConfirmationFuture {
        ConfirmationFuture(self)
    }
}

/// The future of a [`PublishConfirm`], from `IntoFuture`: what `.await` on
/// one polls. Named to store it, or to poll it with others:
///
/// ```no_run
/// use std::future::IntoFuture;
/// use amqp091::prelude::*;
/// use amqp091::{BasicProperties, Channel, ConfirmationFuture};
///
/// # async fn example(channel: Channel) -> Result<(), amqp091::Error> {
/// channel.confirm_select(confirm::Select::default()).await?;
/// let properties = BasicProperties::default();
/// let first: ConfirmationFuture = channel.basic_publish("", "a", false, &properties, "1").await?.into_future();
/// let second = channel.basic_publish("", "b", false, &properties, "2").await?.into_future();
/// let (first, second) = tokio::join!(first, second);
/// assert!(first?.is_ack() && second?.is_ack());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ConfirmationFuture(PublishConfirm);

impl Future for ConfirmationFuture {
    type Output = Result<Confirmation, Error>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut self.0;
        match this.answer.as_mut() {
            // Not in confirm mode: handed to the connection is all there is.
            None => Poll::Ready(Ok(Confirmation::NotRequested)),
            Some((answer, conn)) => match Pin::new(answer).poll(cx) {
                Poll::Ready(Ok(outcome)) => Poll::Ready(outcome),
                Poll::Ready(Err(_)) => Poll::Ready(Err(conn.closed_error())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl Channel {
    pub(crate) fn new(
        target: ChannelRef,
        closed: Arc<OnceLock<Error>>,
        epoch: Arc<AtomicU64>,
        conn: Arc<ConnectionInner>,
    ) -> Self {
        let telemetry = conn.shared.telemetry.channel(target.id);
        Self {
            inner: Arc::new(ChannelInner {
                telemetry,
                id: target.id,
                target,
                scratch: std::sync::Mutex::new(bytes::BytesMut::new()),
                closed,
                epoch,
                conn,
                confirm_mode: AtomicBool::new(false),
            }),
        }
    }

    /// The channel's number on its connection (1 and up), as in the
    /// broker's logs and management UI.
    pub fn id(&self) -> u16 {
        self.inner.id
    }

    /// The channel's epoch: a value of its own on the connection, new at each
    /// reconnect (delivery tags are only meaningful within one).
    pub(crate) fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }

    /// Sends an ack, nack or reject for a delivery of `epoch`: a tag from
    /// before a reconnect is refused here, and dropped by the connection if
    /// a reconnect happens while it waits to be sent.
    pub(crate) async fn send_settlement(
        &self,
        settlement: Settlement,
        epoch: u64,
        delivery_tag: u64,
    ) -> Result<(), Error> {
        self.check()?;
        if epoch != self.epoch() {
            return Err(Error::StaleDelivery {
                channel: self.inner.id,
                delivery_tag,
            });
        }
        let settled = match settlement {
            Settlement::Ack(_) => Settled::Ack,
            Settlement::Nack(_) => Settled::Nack,
            Settlement::Reject(_) => Settled::Reject,
        };
        self.inner.conn.settle(Command::Settle {
            channel: self.inner.id,
            settlement,
            epoch,
        });
        self.inner.telemetry.settled(settled, delivery_tag);
        Ok(())
    }

    /// The error that closed the channel (or its connection), if it is
    /// closed: every call on a closed channel fails with it.
    ///
    /// ```no_run
    /// # fn example(channel: amqp091::Channel) {
    /// if let Some(error) = channel.closed_error() {
    ///     eprintln!("channel {} is closed: {error}", channel.id());
    /// }
    /// # }
    /// ```
    #[inline]
    pub fn closed_error(&self) -> Option<Error> {
        self.inner
            .closed
            .get()
            .or_else(|| self.inner.conn.shared.error.get())
            .cloned()
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        match self.closed_error() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    pub(crate) async fn send_command(&self, command: Command) -> Result<(), Error> {
        self.inner.conn.send(command).await
    }

    /// Awaits the answer to `call`, which asked the broker something, within
    /// the call timeout. When it expires the channel is closed with the
    /// timeout: what the broker did with the request is unknown, and a reply
    /// that still comes must not be taken for a later call's.
    pub(crate) async fn answer<T>(
        &self,
        call: &'static str,
        answer: oneshot::Receiver<Result<T, Error>>,
    ) -> Result<T, Error> {
        let answered = async {
            match answer.await {
                Ok(result) => result,
                Err(_) => Err(self
                    .closed_error()
                    .unwrap_or_else(|| self.inner.conn.closed_error())),
            }
        };
        let result = self.inner.conn.bounded(call, answered).await;
        if let Err(error @ Error::CallTimeout { .. }) = &result {
            if self.inner.closed.set(error.clone()).is_ok() {
                tracing::warn!(channel = self.inner.id, %error, "closing the channel");
                let _ = self.inner.conn.control.send(Command::CloseChannel {
                    channel: self.inner.target,
                    reply: None,
                });
            }
        }
        result
    }

    pub(crate) async fn rpc(&self, method: Method) -> Result<Reply, Error> {
        self.check()?;
        let call = method.info().name;
        self.inner.conn.check_method_frame(self.inner.id, &method)?;
        let is_confirm_select = matches!(method, Method::ConfirmSelect(_));
        let (reply, answer) = oneshot::channel();
        let started = Started::now();
        self.send_command(Command::Rpc {
            channel: self.inner.target,
            method: Box::new(method),
            reply,
        })
        .await?;
        let reply = self.answer(call, answer).await;
        self.inner
            .conn
            .shared
            .telemetry
            .call_done(call, started, reply.as_ref().err());
        let reply = reply?;
        if is_confirm_select {
            self.inner.confirm_mode.store(true, Ordering::Release);
        }
        Ok(reply)
    }

    /// Closes the channel: sends `channel.close` (behind what was already
    /// published on it) and waits for `channel.close-ok`. Closing a channel
    /// again is `Ok`; closing one that the broker closed returns the
    /// broker's error. Dropping the last handle closes it too, without
    /// waiting.
    ///
    /// ```no_run
    /// # async fn example(channel: amqp091::Channel) -> Result<(), amqp091::Error> {
    /// channel.close().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn close(&self) -> Result<(), Error> {
        if let Some(error) = self.closed_error() {
            return match error {
                Error::ChannelClosed { ref reason, .. }
                    if reason.initiator == crate::error::Initiator::Application =>
                {
                    Ok(())
                }
                other => Err(other),
            };
        }
        let (reply, answer) = oneshot::channel();
        // Through the command queue: behind what was published on the channel.
        self.send_command(Command::CloseChannel {
            channel: self.inner.target,
            reply: Some(reply),
        })
        .await?;
        self.inner
            .conn
            .within_call_timeout("channel.close", answer)
            .await
    }

    /// Publishes a message (`basic.publish`) to `exchange` (`""` is the
    /// default exchange, which routes to the queue named `routing_key`).
    /// With `mandatory`, an unroutable message comes back (`basic.return`):
    /// in the confirmation in confirm mode, else on [`returns`](Self::returns);
    /// without it, the broker drops it.
    ///
    /// Returns once the message is queued for the connection. The
    /// [`PublishConfirm`] it returns resolves, in confirm mode
    /// ([`confirm_select`](Self::confirm_select)), to the broker's ack, nack
    /// or return; otherwise at once to
    /// [`Confirmation::NotRequested`].
    /// While the broker blocks the connection (`connection.blocked`) this
    /// waits for it to unblock, so memory does not pile up in the client.
    /// A shortstr over 255 bytes or a frame over the broker's `frame_max`
    /// is refused here, before anything is sent.
    ///
    /// ```no_run
    /// use amqp091::prelude::*;
    /// use amqp091::{BasicProperties, Confirmation};
    ///
    /// # async fn example(channel: amqp091::Channel) -> Result<(), amqp091::Error> {
    /// channel.confirm_select(confirm::Select::default()).await?;
    /// let properties = BasicProperties::default()
    ///     .with_content_type("text/plain")
    ///     .with_delivery_mode(2);
    /// let confirm = channel.basic_publish("", "my-queue", true, &properties, "hello").await?;
    /// match confirm.await? {
    ///     Confirmation::Ack => {}
    ///     other => eprintln!("not taken: {other:?}"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn basic_publish(
        &self,
        exchange: impl Into<ShortString>,
        routing_key: impl Into<ShortString>,
        mandatory: bool,
        properties: &BasicProperties,
        body: impl Into<Bytes>,
    ) -> Result<PublishConfirm, Error> {
        self.check()?;
        let publish = basic::Publish {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            mandatory,
            immediate: false,
        };
        self.publish(publish, properties, body.into()).await
    }

    /// [`basic_publish`](Self::basic_publish) with the method struct, for
    /// a publisher that builds its [`basic::Publish`] once and clones it
    /// (cheap: its names are [`ShortString`]s). Its `immediate` must stay
    /// `false`: RabbitMQ closes the connection on it.
    ///
    /// ```no_run
    /// use amqp091::prelude::*;
    /// use amqp091::BasicProperties;
    ///
    /// # async fn example(channel: amqp091::Channel) -> Result<(), amqp091::Error> {
    /// let publish = basic::Publish {
    ///     exchange: "my-exchange".into(),
    ///     routing_key: "my-key".into(),
    ///     ..Default::default()
    /// };
    /// let properties = BasicProperties::default();
    /// for n in 0..10 {
    ///     channel.publish(publish.clone(), &properties, format!("message {n}").into()).await?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish(
        &self,
        publish: basic::Publish,
        properties: &BasicProperties,
        body: Bytes,
    ) -> Result<PublishConfirm, Error> {
        self.check()?;
        let conn = &self.inner.conn;
        if conn.shared.blocked_now.is_up() {
            let mut blocked = conn.shared.blocked.clone();
            match conn.config.call_timeout {
                None => {
                    let _ = blocked.wait_for(Option::is_none).await;
                }
                // Boxed: a timer in every publish's future would make each
                // publish copy more. Nothing was sent, so the channel stays open.
                Some(timeout) => Box::pin(tokio::time::timeout(
                    timeout,
                    blocked.wait_for(Option::is_none),
                ))
                .await
                .map_err(|_| Error::CallTimeout {
                    call: "basic.publish (waiting out connection.blocked)",
                    timeout,
                })
                .map(drop)?,
            }
        }
        let (confirm, answer) = if self.inner.confirm_mode.load(Ordering::Acquire) {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let head = self.encode_head(&publish, properties, body.len() as u64)?;
        let bytes = (head.len() + body.len() + QUEUED_MESSAGE_OVERHEAD) as u64;
        // Most publishes find credit and room in the queue: they are queued
        // without awaiting anything. The waiting path is boxed so that its
        // state (a semaphore waiter, a recovery timer) does not make every
        // publish's future large: a future is copied where it is awaited.
        let credit = match conn.publish_budget.try_credit(bytes) {
            Some(credit) => credit,
            None => Box::pin(conn.publish_budget.take(bytes)).await,
        };
        // The publish span covers the hand-over to the connection and is
        // closed before any await: held across one, it would grow every
        // publish's future past what is moved inline (callgrind: +170
        // instructions of memcpy per publish with the feature on).
        let queued = {
            let _span = self
                .inner
                .telemetry
                .publish(&publish, properties, body.len());
            conn.try_send(Command::Publish {
                channel: self.inner.target,
                head,
                body: PublishBody(body),
                confirm,
                credit: Some(credit),
            })
        };
        match queued {
            // Usually nothing above awaited: give the scheduler its turn now and then,
            // or a publishing loop on a current-thread runtime would starve
            // the I/O task (heartbeats, confirms) until the queue filled.
            Ok(()) => tokio::task::consume_budget().await,
            Err(command) => Box::pin(self.send_command(command)).await?,
        }
        self.inner.telemetry.published();
        Ok(PublishConfirm {
            answer: answer.map(|answer| (answer, conn.clone())),
        })
    }

    /// Encodes the method and header frames of a publish in the caller's
    /// task, so the I/O task only copies bytes. A shortstr over 255 bytes or
    /// a frame over the broker's frame_max is refused here: sent, it would
    /// close the connection.
    fn encode_head(
        &self,
        publish: &basic::Publish,
        properties: &BasicProperties,
        body_size: u64,
    ) -> Result<Bytes, Error> {
        const CHUNK: usize = 64 * 1024;
        let mut scratch = match self.inner.scratch.lock() {
            Ok(scratch) => scratch,
            Err(poisoned) => poisoned.into_inner(),
        };
        if scratch.capacity() < 1024 {
            scratch.reserve(CHUNK);
        }
        frame::write_publish_method(&mut scratch, self.inner.id, publish);
        let method_len = scratch.len();
        frame::write_header(&mut scratch, self.inner.id, body_size, properties);
        // A shortstr over 255 bytes is written whole (see
        // `wire::write_short_string`), so a head of at most 255 bytes holds
        // none; and frame_max is never below the spec's minimum. So the usual
        // small head needs neither length check (they cost more than the
        // encoding), only the UTF-8 one RabbitMQ makes of the method's
        // shortstrs (it closes the connection over one that is not).
        if scratch.len() > ShortString::MAX_LEN
            || !(publish.exchange.is_utf8() && publish.routing_key.is_utf8())
        {
            let header_len = scratch.len() - method_len;
            if let Err(error) = self.check_head(publish, properties, method_len, header_len) {
                scratch.clear();
                return Err(error);
            }
        }
        Ok(scratch.split().freeze())
    }

    /// The checks of a publish's head over 255 bytes or with a shortstr
    /// that is not UTF-8: its shortstrs, then
    /// (over the spec's minimum frame_max) its frames' sizes. Kept out of
    /// [`encode_head`](Self::encode_head), where the usual head skips them.
    #[inline(never)]
    fn check_head(
        &self,
        publish: &basic::Publish,
        properties: &BasicProperties,
        method_len: usize,
        header_len: usize,
    ) -> Result<(), Error> {
        publish
            .check_short_strings()
            .map_err(|e| Error::bad_name(basic::Publish::INFO.name, e))?;
        properties
            .check_short_strings()
            .map_err(|e| Error::bad_name("content header", e))?;
        if method_len.max(header_len) > FRAME_MIN_SIZE as usize {
            let frame_max = self.inner.conn.shared.frame_max();
            check_frame_size(basic::Publish::INFO.name, method_len, frame_max)?;
            check_frame_size("content header", header_len, frame_max)?;
        }
        Ok(())
    }

    /// Waits until the broker has confirmed every message published on the
    /// channel so far; `true` if it acked them all since the last wait,
    /// `false` if it nacked any. Needs confirm mode
    /// ([`confirm_select`](Self::confirm_select)): without it this fails
    /// with [`Error::NotInConfirmMode`].
    ///
    /// ```no_run
    /// use amqp091::prelude::*;
    /// use amqp091::BasicProperties;
    ///
    /// # async fn example(channel: amqp091::Channel) -> Result<(), amqp091::Error> {
    /// channel.confirm_select(confirm::Select::default()).await?;
    /// for n in 0..100 {
    ///     let body = format!("message {n}");
    ///     channel.basic_publish("", "my-queue", false, &BasicProperties::default(), body).await?;
    /// }
    /// assert!(channel.wait_for_confirms().await?, "the broker nacked a message");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn wait_for_confirms(&self) -> Result<bool, Error> {
        self.check()?;
        let (reply, answer) = oneshot::channel();
        self.send_command(Command::WaitForConfirms {
            channel: self.inner.target,
            reply,
        })
        .await?;
        self.answer("wait_for_confirms", answer).await
    }

    /// Messages the broker returns as unroutable (`basic.return` of a
    /// message published `mandatory` without confirm mode; in confirm mode
    /// they come with the confirmation instead), as a stream holding up to
    /// `capacity` of them. Calling it again replaces the earlier stream.
    ///
    /// ```no_run
    /// # async fn example(channel: amqp091::Channel) -> Result<(), amqp091::Error> {
    /// let mut returns = channel.returns(16).await?;
    /// tokio::spawn(async move {
    ///     while let Some(returned) = returns.recv().await {
    ///         eprintln!("unroutable: {returned:?}");
    ///     }
    /// });
    /// # Ok(())
    /// # }
    /// ```
    pub async fn returns(&self, capacity: usize) -> Result<mpsc::Receiver<ReturnedMessage>, Error> {
        let (returns, receiver) = mpsc::channel(capacity.max(1));
        self.send_command(Command::SetReturns {
            channel: self.inner.target,
            returns,
        })
        .await?;
        Ok(receiver)
    }
}

impl ChannelRpc for Channel {
    type Error = Error;

    async fn call(&self, request: Method) -> Result<Method, Error> {
        Ok(self.rpc(request).await?.method)
    }

    /// Sends `method`. Acks, nacks and rejects are refused
    /// ([`Error::RawSettlement`]): a bare delivery tag may belong to the
    /// connection before a reconnect, where it named another message. Settle
    /// with [`Delivery::ack`](crate::Delivery::ack), `ack_multiple`, `nack`
    /// or `reject`.
    async fn send(&self, method: Method) -> Result<(), Error> {
        if let Method::BasicAck(_) | Method::BasicNack(_) | Method::BasicReject(_) = method {
            return Err(Error::RawSettlement(method.info().name));
        }
        self.check()?;
        self.inner.conn.check_method_frame(self.inner.id, &method)?;
        let is_confirm_select = matches!(method, Method::ConfirmSelect(_));
        self.send_command(Command::Send {
            channel: self.inner.target,
            method: Box::new(method),
        })
        .await?;
        if is_confirm_select {
            // Publishes from now on get confirmations, as after an awaited select.
            self.inner.confirm_mode.store(true, Ordering::Release);
        }
        Ok(())
    }
}

// Written by `cargo xtask regen` (see `codegen/`): here rather than under
// `protocol/generated/` because it is an `impl Channel`, and the protocol
// layer must not depend on the channel. The docs it carries come from
// spec/amqp0-9-1.docs.xml, whose links spell out `crate::` paths because
// the same text lands in several modules: where the path is also in scope,
// rustdoc would call the explicit target redundant.
#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, rustdoc::redundant_explicit_links)]
mod generated_methods;
