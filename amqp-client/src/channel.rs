//! The channel handle: RPCs (through the generated [`ChannelMethods`](crate::protocol::ChannelMethods)),
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

/// A channel. Cheap to clone, `Send + Sync`: many tasks may use it at once;
/// their synchronous calls queue so that one is on the wire at a time.
/// It closes when [`close`](Self::close) is called or its last handle drops.
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
#[derive(Debug, Clone, Default)]
pub struct ConsumeOptions {
    /// The consumer tag; empty lets the client choose one.
    pub consumer_tag: String,
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

/// The future of a [`PublishConfirm`].
#[derive(Debug)]
pub struct ConfirmationFuture(PublishConfirm);

impl Future for ConfirmationFuture {
    type Output = Result<Confirmation, Error>;

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

    /// The channel id.
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

    /// The error that closed the channel (or its connection), if it is closed.
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

    /// Closes the channel: sends `channel.close` and waits for close-ok.
    /// Closing a channel that the broker already closed returns that error.
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

    /// Publishes a message. In confirm mode the returned confirmation
    /// resolves to ack, nack or returned; otherwise it resolves at once.
    /// While the broker blocks the connection this waits for it to unblock,
    /// so memory does not pile up in the client.
    pub async fn basic_publish(
        &self,
        exchange: &str,
        routing_key: &str,
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

    /// [`basic_publish`](Self::basic_publish) with the method struct.
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
        // small head needs neither check (they cost more than the encoding).
        if scratch.len() > ShortString::MAX_LEN {
            let header_len = scratch.len() - method_len;
            if let Err(error) = self.check_head(publish, properties, method_len, header_len) {
                scratch.clear();
                return Err(error);
            }
        }
        Ok(scratch.split().freeze())
    }

    /// The checks of a publish's head over 255 bytes: its shortstrs, then
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
            .map_err(|e| Error::name_too_long(basic::Publish::INFO.name, e))?;
        properties
            .check_short_strings()
            .map_err(|e| Error::name_too_long("content header", e))?;
        if method_len.max(header_len) > FRAME_MIN_SIZE as usize {
            let frame_max = self.inner.conn.shared.frame_max();
            check_frame_size(basic::Publish::INFO.name, method_len, frame_max)?;
            check_frame_size("content header", header_len, frame_max)?;
        }
        Ok(())
    }

    /// Waits until every publish so far is confirmed; `true` if all were acked.
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

    /// Messages the broker returns as unroutable (published `mandatory`
    /// without confirm mode; in confirm mode they come with the confirmation).
    /// Calling it again replaces the earlier stream.
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
