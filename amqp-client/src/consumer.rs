//! Consumers as streams of deliveries, and the messages `basic.get` fetches.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::channel::{Channel, ConsumeOptions};
use crate::error::Error;
use crate::machine::{ConsumerEnd, Content, RawDelivery, Settlement};
use crate::ports::Command;
use crate::protocol::frame::BodyLen;
use crate::protocol::methods::{basic, Method};
use crate::protocol::{ChannelRpc, ReceivedProperties, ShortString};
use crate::telemetry::{OperationSpan, Received};

/// Where a message came from and how to acknowledge it: the
/// [`envelope`](Delivery::envelope) of each [`Delivery`].
///
/// ```no_run
/// use amqp091::{Consumer, Envelope};
///
/// # async fn example(mut consumer: Consumer) -> Result<(), amqp091::Error> {
/// while let Some(delivery) = consumer.next().await {
///     let delivery = delivery?;
///     let Envelope { exchange, routing_key, redelivered, .. } = &delivery.envelope;
///     if *redelivered {
///         eprintln!("{exchange}/{routing_key} again: it may have been handled already");
///     }
///     delivery.ack().await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The consumer it was delivered to (empty for `basic.get`).
    pub consumer_tag: ShortString,
    /// The tag to ack, nack or reject it with, on its channel.
    pub delivery_tag: u64,
    /// Whether it was delivered before.
    pub redelivered: bool,
    /// The exchange it was published to.
    pub exchange: ShortString,
    /// Its routing key.
    pub routing_key: ShortString,
}

/// A message delivered to a consumer. Its `Debug` shows the body's length,
/// not its bytes (print `body` itself to see them).
///
/// It is settled with [`ack`](Self::ack), [`ack_multiple`](Self::ack_multiple),
/// [`nack`](Self::nack) or [`reject`](Self::reject), the only way to send
/// `basic.ack`, `basic.nack` and `basic.reject`: a delivery knows which
/// connection its tag belongs to, so that after a reconnect a stale tag is
/// refused ([`Error::StaleDelivery`]) instead of settling whichever message
/// has that tag now. Single acks in a row are sent as one `multiple` ack.
/// `Channel` has no `basic_ack`, `basic_nack` or `basic_reject` taking a bare
/// tag, and [`ChannelRpc::send`] refuses
/// those methods ([`Error::RawSettlement`]):
///
/// ```compile_fail
/// # use amqp091::prelude::*;
/// # async fn example(channel: amqp091::Channel) {
/// channel.basic_ack(basic::Ack { delivery_tag: 1, multiple: false }).await;
/// # }
/// ```
///
/// ```no_run
/// # use amqp091::{Channel, ConsumeOptions, Error};
/// # async fn example(channel: Channel) -> Result<(), Error> {
/// let mut consumer = channel.basic_consume("jobs", ConsumeOptions::default()).await?;
/// while let Some(delivery) = consumer.next().await {
///     let delivery = delivery?;
///     if delivery.body.is_empty() {
///         delivery.reject(false).await?; // dropped (or dead-lettered)
///     } else {
///         delivery.ack().await?;
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Delivery {
    /// Where it came from.
    pub envelope: Envelope,
    /// Its properties.
    pub properties: ReceivedProperties,
    /// Its body, a slice of the connection's read buffer when it fit one frame.
    pub body: Bytes,
    channel: Channel,
    /// The connection epoch it arrived in: acks from an older one are refused.
    epoch: u64,
    /// Its `receive` span, open while the delivery lives (nothing without
    /// the `metrics` feature).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    span: OperationSpan,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field cannot be left out of the output.
        let Delivery {
            envelope,
            properties,
            body,
            channel,
            epoch,
            span: _,
        } = self;
        f.debug_struct("Delivery")
            .field("envelope", envelope)
            .field("properties", properties)
            .field("body", &BodyLen(body.len()))
            .field("channel", channel)
            .field("epoch", epoch)
            .finish()
    }
}

impl Delivery {
    pub(crate) fn new(envelope: Envelope, content: Content, epoch: u64, channel: Channel) -> Self {
        let received = Received {
            consumer_tag: &envelope.consumer_tag,
            exchange: &envelope.exchange,
            routing_key: &envelope.routing_key,
            delivery_tag: envelope.delivery_tag,
        };
        let span =
            channel
                .inner
                .telemetry
                .received(received, &content.properties, content.body.len());
        Self {
            span,
            envelope,
            properties: content.properties,
            body: content.body,
            channel,
            epoch,
        }
    }

    /// The channel it arrived on.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Its `receive` span (feature `metrics`; see [`telemetry`](crate::telemetry)),
    /// open until the last clone of the delivery drops: enter it, or make it
    /// the parent of the application's processing span. With
    /// `tracing-opentelemetry`, give it the publisher's context from
    /// [`TraceContext::from_properties`](crate::trace_context::TraceContext::from_properties).
    #[cfg(feature = "metrics")]
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Acknowledges it. After a reconnect the tag means nothing to the new
    /// channel: this returns [`Error::StaleDelivery`] and sends nothing (the
    /// broker redelivers the message).
    pub async fn ack(&self) -> Result<(), Error> {
        let tag = self.envelope.delivery_tag;
        let ack = Settlement::Ack(basic::Ack {
            delivery_tag: tag,
            multiple: false,
        });
        self.channel.send_settlement(ack, self.epoch, tag).await
    }

    /// Acknowledges it and every earlier delivery of its channel not yet
    /// settled (`basic.ack` with `multiple`). Stale tags are refused as for
    /// [`ack`](Self::ack).
    pub async fn ack_multiple(&self) -> Result<(), Error> {
        let tag = self.envelope.delivery_tag;
        let ack = Settlement::Ack(basic::Ack {
            delivery_tag: tag,
            multiple: true,
        });
        self.channel.send_settlement(ack, self.epoch, tag).await
    }

    /// Rejects it (and with `multiple`, every earlier unacked one), requeueing
    /// or not. Stale tags are refused as for [`ack`](Self::ack).
    pub async fn nack(&self, multiple: bool, requeue: bool) -> Result<(), Error> {
        let tag = self.envelope.delivery_tag;
        let nack = Settlement::Nack(basic::Nack {
            delivery_tag: tag,
            multiple,
            requeue,
        });
        self.channel.send_settlement(nack, self.epoch, tag).await
    }

    /// Rejects it, requeueing or not. Stale tags are refused as for [`ack`](Self::ack).
    pub async fn reject(&self, requeue: bool) -> Result<(), Error> {
        let tag = self.envelope.delivery_tag;
        let reject = Settlement::Reject(basic::Reject {
            delivery_tag: tag,
            requeue,
        });
        self.channel.send_settlement(reject, self.epoch, tag).await
    }
}

/// A message fetched with `basic.get` ([`Channel::basic_get`]), settled
/// through its [`delivery`](Self::delivery).
///
/// ```no_run
/// use amqp091::Channel;
///
/// # async fn example(channel: Channel) -> Result<(), amqp091::Error> {
/// while let Some(message) = channel.basic_get("jobs", false).await? {
///     println!("{} bytes, {} more waiting", message.delivery.body.len(), message.message_count);
///     message.delivery.ack().await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct GetMessage {
    /// The delivery (its envelope's consumer tag is empty).
    pub delivery: Delivery,
    /// Messages left in the queue.
    pub message_count: u32,
}

impl GetMessage {
    pub(crate) fn new(
        get_ok: basic::GetOk,
        content: Content,
        epoch: u64,
        channel: Channel,
    ) -> Self {
        let envelope = Envelope {
            consumer_tag: ShortString::default(),
            delivery_tag: get_ok.delivery_tag,
            redelivered: get_ok.redelivered,
            exchange: get_ok.exchange,
            routing_key: get_ok.routing_key,
        };
        Self {
            delivery: Delivery::new(envelope, content, epoch, channel),
            message_count: get_ok.message_count,
        }
    }
}

/// A consumer: a stream of deliveries. It ends (`None`) after a cancel by the
/// application; when the broker cancels it or its channel or connection
/// closes, it yields that error once, then ends. Dropping it cancels it, and
/// deliveries still on their way are requeued (unless it consumes with
/// `no_ack`: the broker counts those as acknowledged when it sends them).
///
/// Read with [`next`](Self::next), or as a [`Stream`](futures_core::Stream):
///
/// ```no_run
/// use amqp091::{Channel, ConsumeOptions, Error};
///
/// # async fn example(channel: Channel) -> Result<(), Error> {
/// let mut consumer = channel.basic_consume("jobs", ConsumeOptions::default()).await?;
/// let mut handled = 0;
/// while let Some(delivery) = consumer.next().await {
///     // An error: the broker cancelled it (its queue was deleted) or the channel closed.
///     let delivery = delivery?;
///     delivery.ack().await?;
///     handled += 1;
///     if handled == 10 {
///         // What is already buffered still comes; then the stream ends.
///         consumer.cancel().await?;
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct Consumer {
    tag: ShortString,
    channel: Channel,
    /// Consuming with `no_ack`: its deliveries have no tag to settle.
    no_ack: bool,
    receiver: mpsc::Receiver<RawDelivery>,
    end: ConsumerEnd,
    finished: bool,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("tag", &self.tag)
            .field("channel", &self.channel.id())
            .finish_non_exhaustive()
    }
}

impl Consumer {
    pub(crate) fn new(
        tag: ShortString,
        channel: Channel,
        no_ack: bool,
        receiver: mpsc::Receiver<RawDelivery>,
        end: ConsumerEnd,
    ) -> Self {
        Self {
            tag,
            channel,
            no_ack,
            receiver,
            end,
            finished: false,
        }
    }

    /// The consumer tag.
    pub fn tag(&self) -> &ShortString {
        &self.tag
    }

    /// The channel it consumes on.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The next delivery; `None` once the consumer has ended.
    pub async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        std::future::poll_fn(|cx| self.poll_delivery(cx)).await
    }

    /// Cancels the consumer and waits for the broker's cancel-ok. Deliveries
    /// already buffered can still be read from the stream.
    pub async fn cancel(&mut self) -> Result<(), Error> {
        if self.end.get().is_some() {
            return Ok(());
        }
        self.channel
            .call(Method::BasicCancel(basic::Cancel {
                consumer_tag: self.tag.clone(),
                no_wait: false,
            }))
            .await
            .map(|_| ())
    }

    fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery, Error>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.receiver.poll_recv(cx) {
            Poll::Ready(Some(raw)) => {
                let envelope = Envelope {
                    consumer_tag: raw.deliver.consumer_tag,
                    delivery_tag: raw.deliver.delivery_tag,
                    redelivered: raw.deliver.redelivered,
                    exchange: raw.deliver.exchange,
                    routing_key: raw.deliver.routing_key,
                };
                Poll::Ready(Some(Ok(Delivery::new(
                    envelope,
                    raw.content,
                    raw.epoch,
                    self.channel.clone(),
                ))))
            }
            Poll::Ready(None) => {
                self.finished = true;
                match self.end.get() {
                    Some(Error::ConsumerCancelled {
                        by_broker: false, ..
                    })
                    | None => Poll::Ready(None),
                    Some(error) => Poll::Ready(Some(Err(error.clone()))),
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl futures_core::Stream for Consumer {
    type Item = Result<Delivery, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_delivery(cx)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Deliveries buffered but never read go back to the queue, unless
        // they were no-ack: the broker no longer knows their tags, and a
        // nack of one would close the channel (406 PRECONDITION_FAILED).
        let mut requeue = Vec::new();
        let epoch = self.channel.epoch();
        while let Ok(raw) = self.receiver.try_recv() {
            // Tags from before a reconnect are the broker's to requeue.
            if !self.no_ack && raw.epoch == epoch {
                requeue.push(raw.deliver.delivery_tag);
            }
        }
        self.receiver.close();
        if self.end.get().is_none() || !requeue.is_empty() {
            let _ = self
                .channel
                .inner
                .conn
                .control
                .send(Command::ForgetConsumer {
                    channel: self.channel.inner.target,
                    tag: self.tag.clone(),
                    requeue,
                    requeue_epoch: epoch,
                });
        }
    }
}

/// Consuming and getting: on `Channel`, defined here because they build
/// this module's types (so that this module depends on the channel's, not
/// both ways).
impl Channel {
    /// Sends `basic.consume` and waits for `basic.consume-ok`: a consumer on
    /// `queue`, whose deliveries come as a stream ([`Consumer::next`]).
    ///
    /// An empty [`ConsumeOptions::consumer_tag`] lets the client pick a tag
    /// unique on the connection. Without `no_ack`, settle each delivery
    /// with [`Delivery::ack`], [`nack`](Delivery::nack) or
    /// [`reject`](Delivery::reject) (they send `basic.ack`, `basic.nack`
    /// and `basic.reject`); the broker sends at most the channel's prefetch
    /// ([`basic_qos`](Self::basic_qos)) unsettled. The consumer belongs to
    /// recovery like its channel: after a reconnect it consumes again with
    /// the same tag and the stream goes on. It ends when it is cancelled,
    /// by [`Consumer::cancel`] or by the broker (its queue deleted: the
    /// stream yields [`Error::ConsumerCancelled`]), or when its channel
    /// closes.
    ///
    /// RabbitMQ: `exclusive` fails with 403 `access-refused` if the queue
    /// has another consumer; `no_local` is not implemented; consumer
    /// priority and stream offsets go in the arguments
    /// ([`ConsumeArguments`](crate::ConsumeArguments)).
    ///
    /// ```no_run
    /// use amqp091::prelude::*;
    /// use amqp091::ConsumeOptions;
    ///
    /// # async fn example(channel: amqp091::Channel) -> Result<(), amqp091::Error> {
    /// channel.basic_qos(basic::Qos { prefetch_count: 20, ..Default::default() }).await?;
    /// let mut consumer = channel.basic_consume("jobs", ConsumeOptions::default()).await?;
    /// while let Some(delivery) = consumer.next().await {
    ///     let delivery = delivery?;
    ///     println!("{} from {}", delivery.body.len(), delivery.envelope.routing_key);
    ///     delivery.ack().await?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn basic_consume(
        &self,
        queue: impl Into<ShortString>,
        options: ConsumeOptions,
    ) -> Result<Consumer, Error> {
        self.check()?;
        let tag = if options.consumer_tag.is_empty() {
            let n = self
                .inner
                .conn
                .next_consumer
                .fetch_add(1, Ordering::Relaxed);
            // Short enough to be stored inline by ShortString.
            ShortString::from(format!("ctag-{}.{n}", self.inner.id))
        } else {
            options.consumer_tag
        };
        let consume = basic::Consume {
            queue: queue.into(),
            consumer_tag: tag.clone(),
            no_local: options.no_local,
            no_ack: options.no_ack,
            exclusive: options.exclusive,
            no_wait: false,
            arguments: options.arguments,
        };
        let no_ack = consume.no_ack;
        self.inner.conn.check_frame_of(
            self.inner.id,
            &basic::Consume::INFO,
            consume.check_short_strings(),
            |buf| consume.encode_args(buf),
        )?;
        let (deliveries, receiver) = mpsc::channel(self.inner.conn.config.consumer_buffer);
        let end = Arc::new(OnceLock::new());
        let (reply, answer) = oneshot::channel();
        self.send_command(Command::Consume {
            channel: self.inner.target,
            consume: Box::new(consume),
            deliveries,
            end: end.clone(),
            reply,
        })
        .await?;
        self.answer("basic.consume", answer).await?;
        Ok(Consumer::new(tag, self.clone(), no_ack, receiver, end))
    }

    /// [`basic_consume`](Self::basic_consume), then calls `handler` for each
    /// delivery, one at a time, on a task of its own. The task ends when the
    /// consumer does, with the reason (`Ok` for a cancel by the
    /// application).
    ///
    /// ```no_run
    /// use amqp091::ConsumeOptions;
    ///
    /// # async fn example(channel: amqp091::Channel) -> Result<(), amqp091::Error> {
    /// let task = channel
    ///     .basic_consume_with("jobs", ConsumeOptions::default(), |delivery| async move {
    ///         if let Err(error) = delivery.ack().await {
    ///             eprintln!("ack failed: {error}");
    ///         }
    ///     })
    ///     .await?;
    /// // Runs until the consumer ends; the join result says why.
    /// let ended = task.await;
    /// # drop(ended);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn basic_consume_with<F, Fut>(
        &self,
        queue: impl Into<ShortString>,
        options: ConsumeOptions,
        mut handler: F,
    ) -> Result<tokio::task::JoinHandle<Result<(), Error>>, Error>
    where
        F: FnMut(Delivery) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let mut consumer = self.basic_consume(queue, options).await?;
        Ok(tokio::spawn(async move {
            while let Some(delivery) = consumer.next().await {
                handler(delivery?).await;
            }
            Ok(())
        }))
    }

    /// Sends `basic.get` and waits for `basic.get-ok` or `basic.get-empty`:
    /// one message from `queue`, `None` when it is empty.
    ///
    /// Polling: each call is a round trip, so a consumer
    /// ([`basic_consume`](Self::basic_consume)) is far cheaper for a steady
    /// flow. Without `no_ack` the message is settled like a delivery
    /// (`message.delivery.ack()`); [`GetMessage::message_count`] is how many
    /// were left in the queue.
    ///
    /// ```no_run
    /// # async fn example(channel: amqp091::Channel) -> Result<(), amqp091::Error> {
    /// if let Some(message) = channel.basic_get("jobs", false).await? {
    ///     println!("{} more waiting", message.message_count);
    ///     message.delivery.ack().await?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn basic_get(
        &self,
        queue: impl Into<ShortString>,
        no_ack: bool,
    ) -> Result<Option<GetMessage>, Error> {
        let reply = self
            .rpc(Method::BasicGet(basic::Get {
                queue: queue.into(),
                no_ack,
            }))
            .await?;
        let epoch = reply.epoch;
        match (reply.method, reply.content) {
            (Method::BasicGetEmpty(_), _) => Ok(None),
            (Method::BasicGetOk(get_ok), Some(content)) => {
                Ok(Some(GetMessage::new(get_ok, content, epoch, self.clone())))
            }
            (other, _) => Err(crate::protocol::UnexpectedReply {
                request: &basic::Get::INFO,
                reply: other.info(),
            }
            .into()),
        }
    }
}
