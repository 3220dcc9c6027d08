//! Request/reply over RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`):
//! [`RpcClient`] sends requests and routes each reply to the call that
//! waits for it; [`reply`] answers a request on the server side.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::channel::{Channel, ConsumeOptions, PublishConfirm};
use crate::consumer::{Consumer, Delivery};
use crate::error::Error;
use crate::protocol::{BasicProperties, ShortString};

/// The pseudo-queue of direct reply-to: consumed (with no-ack) by the
/// client, named as `reply_to` of its requests.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Why an RPC call failed.
///
/// ```no_run
/// use std::time::Duration;
/// use amqp091::{BasicProperties, RpcClient, RpcError};
///
/// # async fn example(client: RpcClient) -> Result<(), amqp091::Error> {
/// match client.call("", "rpc_queue", BasicProperties::default(), "30", Duration::from_secs(1)).await {
///     Ok(reply) => println!("{:?}", reply.body),
///     Err(RpcError::Timeout { .. }) => println!("no server answered in time; try again later"),
///     Err(RpcError::Client(error)) => return Err(error),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// No reply came within the call's timeout. A reply that comes later is
    /// dropped.
    #[error("no reply to RPC call {correlation_id} within {timeout:?}")]
    Timeout {
        /// The call's correlation id.
        correlation_id: String,
        /// The timeout it was given.
        timeout: Duration,
    },
    /// The request could not be published, or the reply consumer ended
    /// (its channel or connection closed, or the broker cancelled it): the
    /// error that ended it.
    #[error(transparent)]
    Client(#[from] Error),
}

/// The calls waiting for a reply, by correlation id.
type Calls = HashMap<ShortString, oneshot::Sender<Delivery>>;

struct Shared {
    pending: Mutex<Calls>,
    /// Why the reply consumer ended, once it has.
    ended: OnceLock<Error>,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Calls> {
        // A panic while holding the lock leaves the map consistent (every
        // operation on it is a single insert or remove).
        match self.pending.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// What the last [`RpcClient`] handle owns: dropping it stops the reader
/// task, which cancels the reply consumer.
struct Owner {
    channel: Channel,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// An RPC client over direct reply-to: requests are published with
/// `reply_to` set to `amq.rabbitmq.reply-to` and a correlation id of their
/// own; RabbitMQ sends the replies straight back to this channel's reply
/// consumer, with no queue in between. Any number of calls may be in flight
/// at once, from any number of tasks (the client is cheap to clone); one
/// task reads the replies and hands each to its call. A reply for no call
/// waiting (one whose call timed out or was dropped) is dropped.
///
/// Direct reply-to needs the consumer and the requests on the same
/// channel, and one reply consumer per channel: give each `RpcClient` a
/// channel of its own.
///
/// When the connection is lost and recovered, the reply consumer is
/// consumed again with the channel and later calls work as before; the
/// replies to calls in flight at the loss were addressed to the old
/// connection and never come, so those calls time out.
///
/// ```no_run
/// use std::time::Duration;
/// use amqp091::{BasicProperties, Connection, RpcClient};
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let connection = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
/// let client = RpcClient::new(connection.open_channel().await?).await?;
/// let reply = client
///     .call("", "rpc_queue", BasicProperties::default(), "30", Duration::from_secs(5))
///     .await?;
/// println!("fib(30) = {}", String::from_utf8_lossy(&reply.body));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RpcClient {
    owner: Arc<Owner>,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("channel", &self.owner.channel.id())
            .field("pending_calls", &self.pending_calls())
            .finish()
    }
}

/// Takes a call out of the waiting map when the call ends, however it ends
/// (answered, timed out, failed, or its future dropped), so none is leaked.
struct PendingGuard<'a> {
    shared: &'a Shared,
    correlation_id: ShortString,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending().remove(&self.correlation_id);
    }
}

impl RpcClient {
    /// Starts consuming `amq.rabbitmq.reply-to` on `channel` (with no-ack,
    /// as RabbitMQ requires), before any request is published.
    pub async fn new(channel: Channel) -> Result<Self, Error> {
        let consumer = channel
            .basic_consume(
                DIRECT_REPLY_TO,
                ConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
            )
            .await?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            ended: OnceLock::new(),
        });
        let reader = tokio::spawn(read_replies(consumer, shared.clone()));
        Ok(Self {
            owner: Arc::new(Owner {
                channel,
                shared,
                next_id: AtomicU64::new(0),
                reader,
            }),
        })
    }

    /// The channel the requests go out on.
    pub fn channel(&self) -> &Channel {
        &self.owner.channel
    }

    /// How many calls are waiting for their reply now.
    pub fn pending_calls(&self) -> usize {
        self.owner.shared.pending().len()
    }

    /// Publishes a request to `exchange` with `routing_key` and waits up to
    /// `timeout` for its reply. `properties` are sent as given, except
    /// `reply_to` and `correlation_id`, which the client sets. The request
    /// is not published `mandatory` and its confirmation (in confirm mode)
    /// is not awaited: a request that reaches no server gets no reply, and
    /// the call times out.
    pub async fn call(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Delivery, RpcError> {
        let shared = &self.owner.shared;
        let n = self.owner.next_id.fetch_add(1, Ordering::Relaxed);
        // Ids never repeat within a client, so a late reply can only match
        // the call it answers, which is gone.
        let correlation_id = ShortString::from(format!("rpc-{n}"));
        let (sender, answer) = oneshot::channel();
        shared.pending().insert(correlation_id.clone(), sender);
        let _guard = PendingGuard {
            shared,
            correlation_id: correlation_id.clone(),
        };
        // Checked after the insert: the reader sets `ended` before it drops
        // the waiting calls, so a call is either dropped by it or sees this.
        if let Some(error) = shared.ended.get() {
            return Err(error.clone().into());
        }
        let properties = properties
            .with_reply_to(DIRECT_REPLY_TO)
            .with_correlation_id(correlation_id.clone());
        let confirm: PublishConfirm = self
            .owner
            .channel
            .basic_publish(exchange, routing_key, false, &properties, body)
            .await?;
        // The reply is the answer; a request the broker refused gets none.
        drop(confirm);
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(self.ended_error().into()),
            Err(_) => Err(RpcError::Timeout {
                correlation_id: correlation_id.to_string_lossy().into_owned(),
                timeout,
            }),
        }
    }

    fn ended_error(&self) -> Error {
        let shared = &self.owner.shared;
        shared
            .ended
            .get()
            .cloned()
            .or_else(|| self.owner.channel.closed_error())
            .unwrap_or_else(|| Error::ConsumerCancelled {
                channel: self.owner.channel.id(),
                consumer_tag: String::new(),
                by_broker: false,
            })
    }
}

/// Hands each reply to the call waiting for its correlation id; once the
/// consumer ends, fails every call still waiting.
async fn read_replies(mut consumer: Consumer, shared: Arc<Shared>) {
    while let Some(delivery) = consumer.next().await {
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(error) => {
                let _ = shared.ended.set(error);
                break;
            }
        };
        let Some(correlation_id) = delivery.properties.correlation_id.clone() else {
            tracing::debug!("dropping an RPC reply without a correlation id");
            continue;
        };
        let waiting = shared.pending().remove(&correlation_id);
        match waiting {
            // The call may have given up between the lookup and now: the
            // reply is dropped with the closed sender.
            Some(call) => drop(call.send(delivery)),
            None => tracing::debug!(%correlation_id, "dropping a reply no call waits for"),
        }
    }
    if shared.ended.get().is_none() {
        let _ = shared.ended.set(Error::ConsumerCancelled {
            channel: consumer.channel().id(),
            consumer_tag: consumer.tag().to_string_lossy().into_owned(),
            by_broker: false,
        });
    }
    // Dropping the senders wakes every waiting call with the error above.
    shared.pending().clear();
}

/// Answers an RPC request: publishes `body` to the default exchange with
/// the request's `reply_to` as routing key and its `correlation_id` copied
/// into `properties`, on the channel the request arrived on. A request
/// without `reply_to` is not answered (`Ok(None)`).
///
/// ```no_run
/// use amqp091::{rpc_client, BasicProperties, Channel, ConsumeOptions};
///
/// # async fn example(channel: Channel) -> Result<(), amqp091::Error> {
/// let mut requests = channel.basic_consume("rpc_queue", ConsumeOptions::default()).await?;
/// while let Some(request) = requests.next().await {
///     let request = request?;
///     let answer = request.body.to_ascii_uppercase();
///     rpc_client::reply(&request, BasicProperties::default(), answer).await?;
///     request.ack().await?;
/// }
/// # Ok(())
/// # }
/// ```
pub async fn reply(
    request: &Delivery,
    properties: BasicProperties,
    body: impl Into<Bytes>,
) -> Result<Option<PublishConfirm>, Error> {
    let Some(reply_to) = request.properties.reply_to.clone() else {
        return Ok(None);
    };
    let properties = match request.properties.correlation_id.clone() {
        Some(correlation_id) => properties.with_correlation_id(correlation_id),
        None => properties,
    };
    request
        .channel()
        .basic_publish("", reply_to, false, &properties, body)
        .await
        .map(Some)
}
