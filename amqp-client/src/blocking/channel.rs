//! The blocking channel, its consumers, deliveries and confirmations: each a
//! thin wrapper of the async one and the runtime it waits with.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::Runtime;
use crate::channel::ConsumeOptions;
use crate::error::Error;
use crate::events::{Confirmation, ReturnedMessage};
use crate::protocol::methods::{basic, Method};
use crate::protocol::{BasicProperties, ChannelRpc, ShortString};

/// A blocking channel (see [`crate::Channel`]). Cheap to clone, `Send +
/// Sync`: many threads may use it at once. It closes when
/// [`close`](Self::close) is called or its last handle drops.
///
/// Besides the methods below it has one blocking method per method a client
/// sends on a channel (`queue_declare`, `exchange_bind`, `basic_qos`,
/// `confirm_select`…), generated from the spec as the async
/// [`Channel`](crate::Channel)'s are, with the same docs.
///
/// ```no_run
/// use amqp091::blocking::Connection;
/// use amqp091::prelude::*;
/// use amqp091::BasicProperties;
///
/// # fn example(connection: Connection) -> Result<(), amqp091::Error> {
/// let channel = connection.open_channel()?;
/// channel.exchange_declare(exchange::Declare {
///     exchange: "logs".into(),
///     kind: "fanout".into(),
///     ..Default::default()
/// })?;
/// // Another thread may publish on a clone while this one declares.
/// let publisher = channel.clone();
/// std::thread::spawn(move || {
///     publisher.basic_publish("logs", "", false, &BasicProperties::default(), "hello")
/// });
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Channel {
    inner: crate::Channel,
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("blocking::Channel")
            .field(&self.inner)
            .finish()
    }
}

impl Channel {
    pub(super) fn new(inner: crate::Channel, runtime: Arc<Runtime>) -> Self {
        Self { inner, runtime }
    }

    /// Runs a call of the async channel, waiting for its answer. What the
    /// generated methods are built on.
    pub(super) fn run<'a, T, F>(
        &'a self,
        call: &'static str,
        body: impl FnOnce(&'a crate::Channel) -> F,
    ) -> Result<T, Error>
    where
        F: std::future::Future<Output = Result<T, Error>> + 'a,
    {
        self.runtime.run(call, body(&self.inner))
    }

    /// The async channel underneath.
    pub fn as_async(&self) -> &crate::Channel {
        &self.inner
    }

    /// The channel id.
    pub fn id(&self) -> u16 {
        self.inner.id()
    }

    /// The error that closed the channel (or its connection), if it is closed.
    pub fn closed_error(&self) -> Option<Error> {
        self.inner.closed_error()
    }

    /// Closes the channel: sends `channel.close` and waits for close-ok.
    /// Closing a channel that the broker already closed returns that error.
    pub fn close(&self) -> Result<(), Error> {
        self.run("channel.close", |channel| channel.close())
    }

    /// Publishes a message (see [`crate::Channel::basic_publish`]). In
    /// confirm mode [`PublishConfirm::wait`] waits for the broker's answer.
    pub fn basic_publish(
        &self,
        exchange: impl Into<ShortString>,
        routing_key: impl Into<ShortString>,
        mandatory: bool,
        properties: &BasicProperties,
        body: impl Into<Bytes>,
    ) -> Result<PublishConfirm, Error> {
        let (exchange, routing_key, body) = (exchange.into(), routing_key.into(), body.into());
        let confirm = self.run("basic.publish", |channel| {
            channel.basic_publish(exchange, routing_key, mandatory, properties, body)
        })?;
        Ok(PublishConfirm {
            inner: confirm,
            runtime: self.runtime.clone(),
        })
    }

    /// [`basic_publish`](Self::basic_publish) with the method struct.
    pub fn publish(
        &self,
        publish: basic::Publish,
        properties: &BasicProperties,
        body: Bytes,
    ) -> Result<PublishConfirm, Error> {
        let confirm = self.run("basic.publish", |channel| {
            channel.publish(publish, properties, body)
        })?;
        Ok(PublishConfirm {
            inner: confirm,
            runtime: self.runtime.clone(),
        })
    }

    /// Waits until every publish so far is confirmed; `true` if all were acked.
    pub fn wait_for_confirms(&self) -> Result<bool, Error> {
        self.run("wait_for_confirms", |channel| channel.wait_for_confirms())
    }

    /// Messages the broker returns as unroutable (see
    /// [`crate::Channel::returns`]). [`mpsc::Receiver::blocking_recv`] and
    /// [`try_recv`](mpsc::Receiver::try_recv) read them without a runtime.
    pub fn returns(&self, capacity: usize) -> Result<mpsc::Receiver<ReturnedMessage>, Error> {
        self.run("returns", |channel| channel.returns(capacity))
    }

    /// Starts a consumer on `queue`; its deliveries come as an iterator.
    pub fn basic_consume(
        &self,
        queue: impl Into<ShortString>,
        options: ConsumeOptions,
    ) -> Result<Consumer, Error> {
        let queue = queue.into();
        let consumer = self.run("basic.consume", |channel| {
            channel.basic_consume(queue, options)
        })?;
        Ok(Consumer {
            inner: consumer,
            channel: self.clone(),
        })
    }

    /// Starts a consumer and calls `handler` for each delivery, one at a
    /// time, on a thread of its own. The thread ends when the consumer does,
    /// with the reason (`Ok` for a cancel by the application).
    pub fn basic_consume_with<F>(
        &self,
        queue: impl Into<ShortString>,
        options: ConsumeOptions,
        mut handler: F,
    ) -> Result<std::thread::JoinHandle<Result<(), Error>>, Error>
    where
        F: FnMut(Delivery) + Send + 'static,
    {
        let consumer = self.basic_consume(queue, options)?;
        std::thread::Builder::new()
            .name(format!("amqp091-consumer-{}", consumer.tag()))
            .spawn(move || {
                for delivery in consumer {
                    handler(delivery?);
                }
                Ok(())
            })
            .map_err(|e| Error::BlockingThread(Arc::new(e)))
    }

    /// Fetches one message from `queue`; `None` when it is empty.
    pub fn basic_get(
        &self,
        queue: impl Into<ShortString>,
        no_ack: bool,
    ) -> Result<Option<GetMessage>, Error> {
        let queue = queue.into();
        let got = self.run("basic.get", |channel| channel.basic_get(queue, no_ack))?;
        Ok(got.map(|got| GetMessage {
            delivery: Delivery {
                inner: got.delivery,
                runtime: self.runtime.clone(),
            },
            message_count: got.message_count,
        }))
    }

    /// Sends `request` and waits for its reply (see [`ChannelRpc::call`]):
    /// for a method the generated ones do not cover.
    pub fn call(&self, request: Method) -> Result<Method, Error> {
        let name = request.info().name;
        self.run(name, |channel| channel.call(request))
    }

    /// Sends `method`, which has no reply (see [`ChannelRpc::send`]).
    pub fn send(&self, method: Method) -> Result<(), Error> {
        let name = method.info().name;
        self.run(name, |channel| channel.send(method))
    }
}

/// The confirmation of one publish: [`wait`](Self::wait) for the outcome,
/// or drop it when it does not matter.
///
/// ```no_run
/// use amqp091::prelude::*;
/// use amqp091::{BasicProperties, Confirmation};
///
/// # fn example(channel: amqp091::blocking::Channel) -> Result<(), amqp091::Error> {
/// channel.confirm_select(confirm::Select::default())?;
/// let confirms: Vec<_> = (0..100)
///     .map(|i| channel.basic_publish("", "jobs", false, &BasicProperties::default(), format!("job {i}")))
///     .collect::<Result<_, _>>()?;
/// for confirm in confirms {
///     if confirm.wait()? != Confirmation::Ack {
///         eprintln!("a job was not taken by the broker");
///     }
/// }
/// # Ok(()) }
/// ```
#[must_use = "drop it if the outcome does not matter, or `wait` for it"]
pub struct PublishConfirm {
    inner: crate::PublishConfirm,
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for PublishConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("blocking::PublishConfirm")
            .field(&self.inner)
            .finish()
    }
}

impl PublishConfirm {
    /// Waits for the outcome: ack, nack or returned in confirm mode,
    /// [`Confirmation::NotRequested`] at once otherwise.
    pub fn wait(self) -> Result<Confirmation, Error> {
        self.runtime.run(
            "basic.publish confirmation",
            std::future::IntoFuture::into_future(self.inner),
        )
    }
}

/// Why [`Consumer::recv_timeout`] (or
/// [`RecoveryEvents::recv_timeout`](super::RecoveryEvents::recv_timeout))
/// returned nothing.
///
/// ```no_run
/// use std::time::Duration;
/// use amqp091::blocking::RecvTimeoutError;
///
/// # fn example(mut consumer: amqp091::blocking::Consumer) -> Result<(), amqp091::Error> {
/// loop {
///     match consumer.recv_timeout(Duration::from_secs(1)) {
///         Ok(delivery) => delivery.ack()?,
///         Err(RecvTimeoutError::Timeout(_)) => println!("idle"),
///         Err(RecvTimeoutError::Ended) => break,
///         Err(RecvTimeoutError::Failed(error)) => return Err(error),
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecvTimeoutError {
    /// Nothing came within the timeout; later calls may still receive.
    #[error("nothing received within {0:?}")]
    Timeout(Duration),
    /// The consumer (or connection) has ended: nothing more will come.
    #[error("nothing more will come: it has ended")]
    Ended,
    /// The consumer ended with this error (the broker cancelled it, or its
    /// channel or connection closed), or the call was refused.
    #[error(transparent)]
    Failed(#[from] Error),
}

/// A blocking consumer: an [`Iterator`] of deliveries (see
/// [`crate::Consumer`]). It ends (`None`) after a cancel by the application;
/// when the broker cancels it or its channel or connection closes, it yields
/// that error once, then ends. Dropping it cancels it.
///
/// ```no_run
/// use amqp091::ConsumeOptions;
///
/// # fn example(channel: amqp091::blocking::Channel) -> Result<(), amqp091::Error> {
/// let mut consumer = channel.basic_consume("jobs", ConsumeOptions::default())?;
/// for delivery in consumer.by_ref().take(10) {
///     let delivery = delivery?;
///     println!("{}", String::from_utf8_lossy(&delivery.body));
///     delivery.ack()?;
/// }
/// consumer.cancel()?;
/// # Ok(()) }
/// ```
pub struct Consumer {
    inner: crate::Consumer,
    channel: Channel,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("blocking::Consumer")
            .field(&self.inner)
            .finish()
    }
}

impl Consumer {
    /// The consumer tag.
    pub fn tag(&self) -> &ShortString {
        self.inner.tag()
    }

    /// The channel it consumes on.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    fn wrap(&self, delivery: crate::Delivery) -> Delivery {
        Delivery {
            inner: delivery,
            runtime: self.channel.runtime.clone(),
        }
    }

    /// The next delivery within `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Delivery, RecvTimeoutError> {
        let runtime = self.channel.runtime.clone();
        // The timer is made inside the future: only there is the runtime entered.
        let next = async { tokio::time::timeout(timeout, self.inner.next()).await };
        match runtime.block_on("basic.consume (next delivery)", next)? {
            Ok(Some(Ok(delivery))) => Ok(self.wrap(delivery)),
            Ok(Some(Err(error))) => Err(RecvTimeoutError::Failed(error)),
            Ok(None) => Err(RecvTimeoutError::Ended),
            Err(_) => Err(RecvTimeoutError::Timeout(timeout)),
        }
    }

    /// Cancels the consumer and waits for the broker's cancel-ok. Deliveries
    /// already buffered can still be read from the iterator.
    pub fn cancel(&mut self) -> Result<(), Error> {
        let runtime = self.channel.runtime.clone();
        runtime.run("basic.cancel", self.inner.cancel())
    }
}

impl Iterator for Consumer {
    type Item = Result<Delivery, Error>;

    /// The next delivery, waiting for it; `None` once the consumer has ended.
    /// From inside an async runtime: `Some(Err(BlockingInAsyncContext))`.
    fn next(&mut self) -> Option<Self::Item> {
        let runtime = self.channel.runtime.clone();
        match runtime.block_on("basic.consume (next delivery)", self.inner.next()) {
            Ok(Some(Ok(delivery))) => Some(Ok(self.wrap(delivery))),
            Ok(Some(Err(error))) | Err(error) => Some(Err(error)),
            Ok(None) => None,
        }
    }
}

/// A message delivered to a consumer or fetched with `basic.get`: the async
/// [`crate::Delivery`] (its `envelope`, `properties` and `body` through
/// `Deref`) with blocking settlement. Stale tags are refused as in the async
/// API ([`Error::StaleDelivery`]).
///
/// ```no_run
/// # fn example(delivery: amqp091::blocking::Delivery) -> Result<(), amqp091::Error> {
/// match std::str::from_utf8(&delivery.body) {
///     Ok(text) if delivery.envelope.redelivered => {
///         eprintln!("second try failed, dropping: {text}");
///         delivery.reject(false)?;
///     }
///     Ok(_) => delivery.ack()?,
///     Err(_) => delivery.nack(false, false)?,
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Delivery {
    inner: crate::Delivery,
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl std::ops::Deref for Delivery {
    type Target = crate::Delivery;

    fn deref(&self) -> &crate::Delivery {
        &self.inner
    }
}

impl Delivery {
    /// The async delivery, for code that settles it from async code.
    pub fn into_async(self) -> crate::Delivery {
        self.inner
    }

    /// The channel it arrived on.
    pub fn channel(&self) -> Channel {
        Channel::new(self.inner.channel().clone(), self.runtime.clone())
    }

    /// Acknowledges it (see [`crate::Delivery::ack`]).
    pub fn ack(&self) -> Result<(), Error> {
        self.runtime.run("basic.ack", self.inner.ack())
    }

    /// Acknowledges it and every earlier unsettled delivery of its channel.
    pub fn ack_multiple(&self) -> Result<(), Error> {
        self.runtime.run("basic.ack", self.inner.ack_multiple())
    }

    /// Rejects it (and with `multiple`, every earlier unacked one),
    /// requeueing or not.
    pub fn nack(&self, multiple: bool, requeue: bool) -> Result<(), Error> {
        self.runtime
            .run("basic.nack", self.inner.nack(multiple, requeue))
    }

    /// Rejects it, requeueing or not.
    pub fn reject(&self, requeue: bool) -> Result<(), Error> {
        self.runtime.run("basic.reject", self.inner.reject(requeue))
    }
}

/// A message fetched with `basic.get`.
///
/// ```no_run
/// # fn example(channel: amqp091::blocking::Channel) -> Result<(), amqp091::Error> {
/// while let Some(message) = channel.basic_get("jobs", false)? {
///     println!("{} left", message.message_count);
///     message.delivery.ack()?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct GetMessage {
    /// The delivery (its envelope's consumer tag is empty).
    pub delivery: Delivery,
    /// Messages left in the queue.
    pub message_count: u32,
}
