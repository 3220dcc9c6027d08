//! The connection's protocol state, free of I/O: frames and commands go in,
//! frames to write come out, and time is an argument. It owns channel ids,
//! the one-RPC-at-a-time rule per channel, content assembly, publisher
//! confirms, consumers, heartbeats and the fair scheduling of outgoing frames.
//! The I/O task (`io.rs`) drives it; tests drive it without sockets.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::credit::CreditReturns;
use crate::topology::Topology;
use crate::unsettled::{Settled, Unsettled};

use crate::error::{CloseReason, Error, Initiator};
use crate::protocol::frame::{self, BodyLen, ContentHeader, Frame, FRAME_OVERHEAD};
use crate::protocol::methods::{basic, channel, connection, Method};
use crate::protocol::{
    FieldValue, MethodId, MethodInfo, ReceivedProperties, ReplyCode, ShortString,
};

/// Message content: properties and body.
#[derive(Clone, PartialEq)]
pub(crate) struct Content {
    pub properties: ReceivedProperties,
    pub body: Bytes,
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Content { properties, body } = self;
        f.debug_struct("Content")
            .field("properties", properties)
            .field("body", &BodyLen(body.len()))
            .finish()
    }
}

/// The body of a message on its way to the wire. A newtype only so that a
/// [`Command`] in a log record or panic message shows the body's length.
#[derive(Clone, PartialEq)]
pub(crate) struct PublishBody(pub Bytes);

impl std::fmt::Debug for PublishBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        BodyLen(self.0.len()).fmt(f)
    }
}

/// What answered a synchronous request.
#[derive(Debug)]
pub(crate) struct Reply {
    pub method: Method,
    /// The content of a `basic.get-ok`.
    pub content: Option<Content>,
    /// The channel's epoch when the reply arrived (a get-ok's tag is only
    /// meaningful in it).
    pub epoch: u64,
}

/// A delivery as the machine hands it to a consumer's buffer.
#[derive(Debug)]
pub(crate) struct RawDelivery {
    pub deliver: basic::Deliver,
    pub content: Content,
    /// The channel's connection epoch when it arrived: its tag is only
    /// meaningful on the same epoch.
    pub epoch: u64,
}

/// What automatic recovery reports.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RecoveryEvent {
    /// The connection was lost; recovery starts.
    Recovering {
        /// Why it was lost.
        cause: Error,
    },
    /// A new connection is up (to `address`); channels and topology follow.
    Reconnected {
        /// `host:port` of the broker.
        address: String,
    },
    /// The broker named a server-named queue anew.
    QueueRenamed {
        /// Its name before the reconnect.
        old: String,
        /// Its name now.
        new: String,
    },
    /// A reconnect attempt failed; recovery tries again after its backoff
    /// unless a limit of [`RecoveryConfig`](crate::RecoveryConfig) is reached
    /// (then [`Failed`](Self::Failed) follows).
    AttemptFailed {
        /// Which attempt (1: the first).
        attempt: u32,
        /// Why it failed ([`Error::is_authentication_failure`] tells refused
        /// credentials apart).
        error: Error,
    },
    /// Re-creating a channel, entity or consumer failed (it is skipped).
    StepFailed {
        /// The method that failed (`queue.declare`…).
        method: &'static str,
        /// Why.
        error: Error,
    },
    /// Channels, topology and consumers are back.
    Recovered,
    /// Recovery gave up; the connection is closed.
    Failed {
        /// The last error.
        error: Error,
    },
}

/// A message the broker returned as unroutable. Its `Debug` shows the body's
/// length, not its bytes (print `body` itself to see them).
#[derive(Clone, PartialEq)]
pub struct ReturnedMessage {
    /// The reply code (312 NO_ROUTE, 313 NO_CONSUMERS).
    pub reply_code: ReplyCode,
    /// The reply text.
    pub reply_text: ShortString,
    /// The exchange it was published to.
    pub exchange: ShortString,
    /// Its routing key.
    pub routing_key: ShortString,
    /// Its properties.
    pub properties: ReceivedProperties,
    /// Its body.
    pub body: Bytes,
}

impl std::fmt::Debug for ReturnedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field cannot be left out of the output.
        let ReturnedMessage {
            reply_code,
            reply_text,
            exchange,
            routing_key,
            properties,
            body,
        } = self;
        f.debug_struct("ReturnedMessage")
            .field("reply_code", reply_code)
            .field("reply_text", reply_text)
            .field("exchange", exchange)
            .field("routing_key", routing_key)
            .field("properties", properties)
            .field("body", &BodyLen(body.len()))
            .finish()
    }
}

/// The outcome of a publish on a channel in confirm mode.
#[derive(Debug, Clone, PartialEq)]
pub enum Confirmation {
    /// The broker took responsibility for the message.
    Ack,
    /// The broker could not take the message.
    Nack,
    /// The message was unroutable and `mandatory`: returned, then acked.
    Returned(Box<ReturnedMessage>),
    /// The channel is not in confirm mode: the message was handed to the
    /// connection, and nothing more is known of it.
    NotRequested,
}

/// Why a consumer's stream ended.
pub(crate) type ConsumerEnd = Arc<OnceLock<Error>>;

/// Where the outcome of one publish in confirm mode goes.
pub(crate) type ConfirmSender = oneshot::Sender<Result<Confirmation, Error>>;

/// An ack, nack or reject: a few words, where a `Method` is 136 bytes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Settlement {
    Ack(basic::Ack),
    Nack(basic::Nack),
    Reject(basic::Reject),
}

impl Settlement {
    /// The settlement `method` is, if it is one.
    fn of(method: &Method) -> Option<Self> {
        match method {
            Method::BasicAck(ack) => Some(Self::Ack(ack.clone())),
            Method::BasicNack(nack) => Some(Self::Nack(nack.clone())),
            Method::BasicReject(reject) => Some(Self::Reject(reject.clone())),
            _ => None,
        }
    }

    fn write(&self, buf: &mut BytesMut, channel: u16) {
        match self {
            Self::Ack(ack) => frame::write_ack(buf, channel, ack),
            Self::Nack(nack) => {
                frame::write_method_frame(buf, channel, basic::Nack::INFO.id, |buf| {
                    nack.encode_args(buf)
                })
            }
            Self::Reject(reject) => {
                frame::write_method_frame(buf, channel, basic::Reject::INFO.id, |buf| {
                    reject.encode_args(buf)
                })
            }
        }
    }
}

/// What handles ask of the connection.
#[derive(Debug)]
pub(crate) enum Command {
    OpenChannel {
        closed: Arc<OnceLock<Error>>,
        epoch: Arc<AtomicU64>,
        /// Opened by the on-connect hook: not recovered (the hook re-creates it).
        hook_owned: bool,
        reply: oneshot::Sender<Result<u16, Error>>,
    },
    // Methods are boxed here and in `Outgoing`: a `Method` is 136 bytes, and
    // a command or frame that large is copied with a `memcpy` call at every
    // move (into the queue, out of it, into the channel's queue...), which was
    // a fifth of the CPU time of a publish. Publishes and settlements, the
    // per-message commands, carry no `Method`.
    Rpc {
        channel: u16,
        method: Box<Method>,
        reply: oneshot::Sender<Result<Reply, Error>>,
    },
    Send {
        channel: u16,
        method: Box<Method>,
    },
    /// An ack, nack or reject of a delivery of `epoch`: a stale one is
    /// dropped rather than sent to a channel that never saw the tag.
    Settle {
        channel: u16,
        settlement: Settlement,
        epoch: u64,
    },
    /// A publish whose method and header frames the publisher encoded (off
    /// the I/O task); the body is split into frames when it is written.
    Publish {
        channel: u16,
        head: Bytes,
        body: PublishBody,
        confirm: Option<ConfirmSender>,
        /// The publisher's share of the connection's publish buffer, given
        /// back (by drop) once the message is written or discarded.
        credit: Option<crate::credit::Credit>,
    },
    Consume {
        channel: u16,
        consume: Box<basic::Consume>,
        deliveries: mpsc::Sender<RawDelivery>,
        end: ConsumerEnd,
        reply: oneshot::Sender<Result<Reply, Error>>,
    },
    /// A dropped consumer: cancel it, and requeue what it had buffered
    /// (`requeue`) and what still arrives for it.
    ForgetConsumer {
        channel: u16,
        tag: ShortString,
        requeue: Vec<u64>,
    },
    WaitForConfirms {
        channel: u16,
        reply: oneshot::Sender<Result<bool, Error>>,
    },
    SetReturns {
        channel: u16,
        returns: mpsc::Sender<ReturnedMessage>,
    },
    CloseChannel {
        channel: u16,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    /// `connection.update-secret`, carried as the method itself so that its
    /// redacting `Debug` covers the command too.
    UpdateSecret {
        method: connection::UpdateSecret,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    CloseConnection {
        code: ReplyCode,
        text: String,
    },
}

enum Outgoing {
    Method(Box<Method>),
    /// An ack the application sent whose tag the channel tracks: a later ack
    /// that completes a settled prefix may widen it (see `unsettled`).
    Ack(basic::Ack),
    /// Any other ack, nack or reject.
    Settle(Settlement),
    /// The `channel.flow-ok` answering the latest `channel.flow`
    /// (`ChannelState::flow_ok`): one waits at most, however many arrive.
    FlowOk,
    Publish {
        /// Method and header frames; `None` once written.
        head: Option<Bytes>,
        body: Bytes,
        /// How much of the body is written.
        offset: usize,
        /// Held until the message is written (see `Command::Publish`).
        credit: Option<crate::credit::Credit>,
    },
}

struct PendingRpc {
    info: &'static MethodInfo,
    /// Taken when the request goes on the wire.
    method: Option<Box<Method>>,
    /// A copy of requests whose success must be recorded for recovery.
    request: Option<Method>,
    /// `None` when nobody awaits the reply.
    reply: Option<oneshot::Sender<Result<Reply, Error>>>,
    /// A step of recovery: its reply advances recovery.
    step: bool,
}

impl PendingRpc {
    fn user(method: Box<Method>, reply: oneshot::Sender<Result<Reply, Error>>) -> Self {
        let request = records(&method).then(|| (*method).clone());
        Self {
            info: method.info(),
            method: Some(method),
            request,
            reply: Some(reply),
            step: false,
        }
    }

    /// A call whose reply nobody awaits (the cancel of a dropped consumer).
    fn unawaited(method: Method) -> Self {
        Self {
            info: method.info(),
            method: Some(Box::new(method)),
            request: None,
            reply: None,
            step: false,
        }
    }

    fn step(method: Method) -> Self {
        Self {
            info: method.info(),
            method: Some(Box::new(method)),
            request: None,
            reply: None,
            step: true,
        }
    }

    fn fail(self, error: &Error) {
        if let Some(reply) = self.reply {
            let _ = reply.send(Err(error.clone()));
        }
    }
}

/// Whether recovery must remember that this request succeeded.
fn records(method: &Method) -> bool {
    matches!(
        method,
        Method::ExchangeDeclare(_)
            | Method::ExchangeDelete(_)
            | Method::ExchangeBind(_)
            | Method::ExchangeUnbind(_)
            | Method::QueueDeclare(_)
            | Method::QueueDelete(_)
            | Method::QueueBind(_)
            | Method::QueueUnbind(_)
            | Method::BasicQos(_)
            | Method::TxSelect(_)
    )
}

enum AssemblyTarget {
    Deliver(basic::Deliver),
    Return(basic::Return),
    Get(basic::GetOk),
}

struct Assembly {
    target: AssemblyTarget,
    header: Option<(ReceivedProperties, u64)>,
    body: BodyBuffer,
}

/// The body of a message in the making: one frame's slice is kept as it is
/// (no copy); several are joined into one buffer that grows with the bytes
/// received. Never sized by the header alone: a peer could announce
/// `max_body_size` on every channel and send two small frames.
enum BodyBuffer {
    Empty,
    One(Bytes),
    Many(Vec<u8>),
}

impl BodyBuffer {
    fn len(&self) -> usize {
        match self {
            BodyBuffer::Empty => 0,
            BodyBuffer::One(b) => b.len(),
            BodyBuffer::Many(b) => b.len(),
        }
    }

    /// Adds a frame's payload; `expected` is the body size the header
    /// announced, which the caller checked the payload does not exceed.
    fn push(&mut self, payload: Bytes, expected: usize) {
        *self = match std::mem::replace(self, BodyBuffer::Empty) {
            BodyBuffer::Empty => BodyBuffer::One(payload),
            BodyBuffer::One(first) => {
                let mut joined = Vec::new();
                Self::grow(&mut joined, first.len() + payload.len(), expected);
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&payload);
                BodyBuffer::Many(joined)
            }
            BodyBuffer::Many(mut joined) => {
                Self::grow(&mut joined, payload.len(), expected);
                joined.extend_from_slice(&payload);
                BodyBuffer::Many(joined)
            }
        }
    }

    /// Makes room for `more` bytes by doubling (so a large body is copied
    /// about once more in all, as with a `Vec`'s own growth), but never past
    /// `expected`: a complete body fills its buffer exactly, and a header
    /// that lies costs at most twice the bytes that actually came.
    fn grow(joined: &mut Vec<u8>, more: usize, expected: usize) {
        let needed = joined.len() + more;
        if needed > joined.capacity() {
            let target = needed.saturating_mul(2).min(expected).max(needed);
            joined.reserve_exact(target - joined.len());
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            BodyBuffer::Empty => Bytes::new(),
            BodyBuffer::One(b) => b,
            BodyBuffer::Many(b) => Bytes::from(b),
        }
    }
}

struct ConsumerSlot {
    deliveries: mpsc::Sender<RawDelivery>,
    end: ConsumerEnd,
    no_ack: bool,
    /// The request, to consume again after a reconnect.
    consume: basic::Consume,
    position: StreamPosition,
}

/// The header in which RabbitMQ gives each delivery from a stream queue its
/// offset, and the consume argument that says where to start.
const STREAM_OFFSET: &str = "x-stream-offset";

/// Where a consumer is in a stream queue, so that after a reconnect it
/// resumes after the last delivery the client took instead of at the offset
/// it first asked for (which would deliver again from there, or skip what
/// was published meanwhile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamPosition {
    /// No delivery yet: whether the queue is a stream is not known.
    Unknown,
    /// Its deliveries carry no offset: not a stream queue.
    NotAStream,
    /// The offset of the last delivery handed to (or parked for) the consumer.
    After(i64),
}

impl StreamPosition {
    /// The position after a delivery with these properties.
    fn advance(self, properties: &ReceivedProperties) -> Self {
        if self == Self::NotAStream {
            return self;
        }
        match stream_offset(properties) {
            Some(offset) => Self::After(offset),
            None if self == Self::Unknown => Self::NotAStream,
            None => self,
        }
    }
}

/// The stream offset a delivery carries, if any.
fn stream_offset(properties: &ReceivedProperties) -> Option<i64> {
    properties
        .get()
        .headers
        .as_ref()?
        .get(STREAM_OFFSET)?
        .as_i64()
}

struct Confirms {
    next_seq: u64,
    /// Outstanding publishes in sequence order.
    pending: VecDeque<(u64, Option<ConfirmSender>)>,
    /// Returns waiting for the ack that follows them.
    returned: VecDeque<ReturnedMessage>,
    waiters: Vec<oneshot::Sender<Result<bool, Error>>>,
    all_acked: bool,
}

impl Confirms {
    fn new() -> Self {
        Self {
            next_seq: 1,
            pending: VecDeque::new(),
            returned: VecDeque::new(),
            waiters: Vec::new(),
            all_acked: true,
        }
    }

    fn settle(&mut self, tag: u64, multiple: bool, ack: bool) {
        let mut settled = Vec::new();
        if multiple {
            while self.pending.front().is_some_and(|(seq, _)| *seq <= tag) {
                if let Some(entry) = self.pending.pop_front() {
                    settled.push(entry);
                }
            }
        } else if let Ok(index) = self.pending.binary_search_by_key(&tag, |(seq, _)| *seq) {
            if let Some(entry) = self.pending.remove(index) {
                settled.push(entry);
            }
        }
        // A return precedes the ack of the message it returns: RabbitMQ sends
        // both for one publish before it handles the next.
        let last = settled.len().saturating_sub(1);
        for (i, (_, sender)) in settled.into_iter().enumerate() {
            let outcome = if !ack {
                self.all_acked = false;
                Confirmation::Nack
            } else if i == last {
                match self.returned.pop_front() {
                    Some(message) => Confirmation::Returned(Box::new(message)),
                    None => Confirmation::Ack,
                }
            } else {
                Confirmation::Ack
            };
            if let Some(sender) = sender {
                let _ = sender.send(Ok(outcome));
            }
        }
        // Returns beyond the publishes still pending belong to none of them
        // (a peer that acked several returned publishes at once): the oldest
        // go, so that a return never waits for an ack that cannot come.
        while self.returned.len() > self.pending.len() {
            self.returned.pop_front();
            tracing::debug!("returned message dropped: its publish was settled");
        }
        if self.pending.is_empty() {
            for waiter in self.waiters.drain(..) {
                let _ = waiter.send(Ok(self.all_acked));
            }
            self.all_acked = true;
        }
    }

    /// The channel ended (`error` says why) with publishes unconfirmed. When
    /// the application ended it (a close, a call timeout) or the connection
    /// was lost, the broker may have routed them: their outcome is unknown,
    /// never a failure. A close by the broker is its answer, and they get it
    /// (e.g. 404 for a publish to a missing exchange). Waiters for all
    /// confirms learn `error`.
    fn fail(&mut self, error: &Error) {
        let unknown = match error {
            Error::ChannelClosed { reason, .. } | Error::ConnectionClosed { reason, .. }
                if reason.initiator == Initiator::Application =>
            {
                Error::PublishOutcomeUnknown(Arc::new(error.clone()))
            }
            Error::CallTimeout { .. } => Error::PublishOutcomeUnknown(Arc::new(error.clone())),
            other => other.clone(),
        };
        for (_, sender) in self.pending.drain(..) {
            if let Some(sender) = sender {
                let _ = sender.send(Err(unknown.clone()));
            }
        }
        self.returned.clear();
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Err(error.clone()));
        }
    }
}

#[derive(PartialEq, Eq)]
enum Phase {
    Opening,
    Open,
    Closing,
    /// The connection was lost; the channel waits to be re-opened.
    Lost,
}

/// Hashes channel ids by multiplication (Fibonacci hashing): ids are small
/// integers chosen by this client, so no flooding defence is needed, and the
/// default SipHash showed up on the publish path.
#[derive(Default)]
struct ChannelIdHasher(u64);

impl std::hash::Hasher for ChannelIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u16(&mut self, id: u16) {
        self.0 = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ChannelMap = HashMap<u16, ChannelState, std::hash::BuildHasherDefault<ChannelIdHasher>>;

struct ChannelState {
    closed: Arc<OnceLock<Error>>,
    phase: Phase,
    open_reply: Option<oneshot::Sender<Result<u16, Error>>>,
    close_replies: Vec<oneshot::Sender<Result<(), Error>>>,
    rpcs: VecDeque<PendingRpc>,
    in_flight: bool,
    out: VecDeque<Outgoing>,
    scheduled: bool,
    assembling: Option<Assembly>,
    consumers: HashMap<ShortString, ConsumerSlot>,
    confirms: Option<Confirms>,
    returns: Option<mpsc::Sender<ReturnedMessage>>,
    /// Bumped at each reconnect; shared with the handles.
    epoch: Arc<AtomicU64>,
    /// Prefetch settings to restore (one per `global` value).
    qos: Vec<basic::Qos>,
    tx: bool,
    /// Recovery's own channel for topology, invisible to the application.
    internal: bool,
    /// Opened by the on-connect hook: what is declared on it is not
    /// recorded, and it ends with the connection (the hook's next run
    /// re-creates what it needs).
    hook_owned: bool,
    /// Delivery tags the broker holds unacknowledged, for coalescing acks.
    unsettled: Unsettled,
    /// Whether the `basic.get` on the wire asked for no ack.
    get_no_ack: bool,
    /// The `active` of the latest `channel.flow` while its `Outgoing::FlowOk`
    /// waits in `out`.
    flow_ok: Option<bool>,
}

impl ChannelState {
    fn new(
        closed: Arc<OnceLock<Error>>,
        epoch: Arc<AtomicU64>,
        open_reply: Option<oneshot::Sender<Result<u16, Error>>>,
    ) -> Self {
        Self {
            closed,
            epoch,
            qos: Vec::new(),
            tx: false,
            internal: false,
            hook_owned: false,
            phase: Phase::Opening,
            open_reply,
            close_replies: Vec::new(),
            rpcs: VecDeque::new(),
            in_flight: false,
            out: VecDeque::new(),
            scheduled: false,
            assembling: None,
            consumers: HashMap::new(),
            confirms: None,
            returns: None,
            unsettled: Unsettled::default(),
            get_no_ack: false,
            flow_ok: None,
        }
    }

    /// The queues its consumers consume from.
    fn consumer_queues(&self) -> Vec<ShortString> {
        self.consumers
            .values()
            .map(|c| c.consume.queue.clone())
            .collect()
    }

    /// Fails everything waiting on the channel and records why it closed.
    fn fail(&mut self, error: &Error) {
        let _ = self.closed.set(error.clone());
        if let Some(reply) = self.open_reply.take() {
            let _ = reply.send(Err(error.clone()));
        }
        for pending in self.rpcs.drain(..) {
            pending.fail(error);
        }
        for (_, slot) in self.consumers.drain() {
            let _ = slot.end.set(error.clone());
        }
        if let Some(confirms) = self.confirms.as_mut() {
            confirms.fail(error);
        }
        for reply in self.close_replies.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        self.out.clear();
        self.flow_ok = None;
        self.unsettled.clear();
        self.assembling = None;
    }

    /// The connection was lost: fail what was in flight (its outcome is
    /// unknown), keep what recovery re-creates.
    fn interrupt(&mut self, error: &Error) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        // Consumers nobody holds any more (dropped, or whose consume failed)
        // are not re-created.
        self.consumers
            .retain(|_, slot| slot.end.get().is_none() && !slot.deliveries.is_closed());
        for pending in self.rpcs.drain(..) {
            pending.fail(error);
        }
        self.in_flight = false;
        if let Some(confirms) = self.confirms.as_mut() {
            confirms.fail(&Error::PublishOutcomeUnknown(Arc::new(error.clone())));
            confirms.next_seq = 1;
        }
        for outgoing in self.out.drain(..) {
            // Never sent: its confirmation (if any) is dropped with it and the
            // publisher learns the outcome is unknown from the closed sender.
            drop(outgoing);
        }
        self.flow_ok = None;
        self.scheduled = false;
        self.unsettled.clear();
        self.assembling = None;
        self.phase = Phase::Lost;
    }
}

/// A state the machine shows the handles: a flag for their fast path (every
/// call checks it, and a watch's `borrow` takes a lock) and a watch for those
/// that must wait. The flag is up while the value is not its default.
///
/// Only the machine holds the watch's sender, so that those waiting on it
/// learn when the machine is gone.
#[derive(Debug)]
pub(crate) struct Signal<T> {
    flag: Flag,
    watch: watch::Sender<T>,
}

/// The handles' view of a [`Signal`]'s flag.
#[derive(Debug, Clone, Default)]
pub(crate) struct Flag(Arc<std::sync::atomic::AtomicBool>);

impl Flag {
    /// Whether the signal's value is other than the default now.
    pub(crate) fn is_up(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Whether the connection is recovering.
pub(crate) type Recovering = Signal<bool>;

/// `Some(reason)` while the broker blocks publishers.
pub(crate) type Blocked = Signal<Option<String>>;

impl<T: Default + PartialEq> Signal<T> {
    pub(crate) fn new() -> (Self, watch::Receiver<T>) {
        let (watch, receiver) = watch::channel(T::default());
        let flag = Flag::default();
        (Self { flag, watch }, receiver)
    }

    fn set(&self, value: T) {
        self.flag.0.store(value != T::default(), Ordering::Release);
        self.watch.send_replace(value);
    }

    /// The flag, for the handles.
    pub(crate) fn flag(&self) -> Flag {
        self.flag.clone()
    }
}

/// A step of recovery, run one at a time.
#[derive(Debug)]
enum Step {
    Open(u16),
    Call(u16, Method),
    /// A queue declaration whose name the broker may change (the old name).
    Declare(u16, Method, ShortString),
    Close(u16),
}

struct RecoveryRun {
    steps: VecDeque<Step>,
    /// The channel whose step is on the wire.
    waiting: Option<u16>,
    /// Old → new names of server-named queues.
    renamed: HashMap<ShortString, ShortString>,
    /// The queue declaration on the wire, with the name it had.
    declaring: Option<ShortString>,
}

/// Bytes of deliveries waiting for slow consumers beyond which the socket is
/// no longer read.
const OVERFLOW_LIMIT: usize = 8 * 1024 * 1024;

/// What a waiting delivery costs beyond its body and the property bytes it
/// keeps: the method, the properties once read (368 bytes), the queue entry.
const QUEUED_DELIVERY_OVERHEAD: usize = 640;

/// How many close timeouts `close()` may spend writing what is still queued
/// before it gives up on it (a broker that stopped reading).
const FLUSH_TIMEOUT_FACTOR: u32 = 6;

/// Settings the machine runs with.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: Duration,
    pub close_timeout: Duration,
    pub max_body_size: u64,
    /// Whether a lost connection is recovered (else it fails).
    pub recover: bool,
    /// Whether topology is re-created on recovery.
    pub recover_topology: bool,
}

#[derive(Debug)]
enum State {
    Open,
    /// The application asked to close; waiting for close-ok until the deadline.
    Closing {
        deadline: Instant,
    },
    /// The connection was lost; waiting for a new socket.
    Interrupted,
    /// A new socket is up; channels, topology and consumers are coming back.
    Recovering,
    /// Over: only flushing what is left to write.
    Closed,
}

/// The connection state machine.
pub(crate) struct Machine {
    settings: Settings,
    state: State,
    channels: ChannelMap,
    /// Channels with frames to send, served round-robin.
    ready: VecDeque<u16>,
    /// Connection frames (channel 0) and the close-ok of channels already
    /// forgotten, sent before any channel's queue.
    control: VecDeque<(u16, Method)>,
    heartbeat_due: bool,
    secret_replies: VecDeque<oneshot::Sender<Result<(), Error>>>,
    last_received: Instant,
    last_sent: Instant,
    /// Why the connection ended; shared with every handle.
    error: Arc<OnceLock<Error>>,
    blocked: Blocked,
    /// Deliveries waiting for room in their consumer's buffer, in arrival
    /// order. While there are any, the socket is still read (RPC replies and
    /// confirms keep flowing, so a consumer that awaits a call while its
    /// buffer is full does not deadlock); once they hold more than
    /// `OVERFLOW_LIMIT` bytes, reading stops and TCP pushes back.
    overflow: VecDeque<(u16, mpsc::Sender<RawDelivery>, RawDelivery)>,
    overflow_bytes: usize,
    /// Credit of publishes written since the last batch.
    credit_returns: CreditReturns,
    topology: Topology,
    recovery: Option<RecoveryRun>,
    /// `true` while the connection is lost or recovering; handles wait on it.
    recovering: Recovering,
    events: broadcast::Sender<RecoveryEvent>,
    last_loss: Option<Error>,
    /// The application's connection.close, held until the channels' queues
    /// are written.
    closing_frame: Option<Method>,
    /// The close was put in the write buffer; its timeout starts when written.
    close_written: bool,
}

fn unexpected(what: String) -> Error {
    Error::UnexpectedFrame(what)
}

impl Machine {
    pub(crate) fn new(
        settings: Settings,
        now: Instant,
        error: Arc<OnceLock<Error>>,
        blocked: Blocked,
        recovering: Recovering,
        events: broadcast::Sender<RecoveryEvent>,
    ) -> Self {
        Self {
            topology: Topology::default(),
            recovery: None,
            recovering,
            events,
            last_loss: None,
            closing_frame: None,
            close_written: false,
            settings,
            state: State::Open,
            channels: ChannelMap::default(),
            ready: VecDeque::new(),
            control: VecDeque::new(),
            heartbeat_due: false,
            secret_replies: VecDeque::new(),
            last_received: now,
            last_sent: now,
            error,
            blocked,
            overflow: VecDeque::new(),
            overflow_bytes: 0,
            credit_returns: CreditReturns::default(),
        }
    }

    /// Whether nothing more will happen but flushing.
    pub(crate) fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Whether commands from handles are still taken.
    pub(crate) fn accepts_commands(&self) -> bool {
        matches!(self.state, State::Open)
    }

    /// The buffer the oldest waiting delivery needs room in.
    pub(crate) fn parked_sender(&self) -> Option<mpsc::Sender<RawDelivery>> {
        self.overflow.front().map(|(_, sender, _)| sender.clone())
    }

    /// Whether reading the socket must pause: too much is waiting for
    /// consumers that do not keep up.
    pub(crate) fn is_paused(&self) -> bool {
        self.overflow_bytes > OVERFLOW_LIMIT
    }

    fn delivery_cost(delivery: &RawDelivery) -> usize {
        delivery.content.body.len()
            + delivery.content.properties.shared_len()
            + QUEUED_DELIVERY_OVERHEAD
    }

    /// Room was made for the oldest waiting delivery; the ones after it go
    /// too while their buffers take them.
    pub(crate) fn unpark(&mut self, permit: mpsc::OwnedPermit<RawDelivery>, now: Instant) {
        let was_paused = self.is_paused();
        if let Some((_, _, delivery)) = self.overflow.pop_front() {
            self.overflow_bytes -= Self::delivery_cost(&delivery);
            permit.send(delivery);
        }
        // Reserved through the entry's own sender: a clone per delivery
        // (two atomic increments, two decrements) was most of this loop.
        while let Some((id, sender, delivery)) = self.overflow.pop_front() {
            if let Ok(permit) = sender.try_reserve() {
                self.overflow_bytes -= Self::delivery_cost(&delivery);
                permit.send(delivery);
                continue;
            }
            self.overflow.push_front((id, sender, delivery));
            break;
        }
        if was_paused {
            // Reading resumes now; the pause does not count as the peer's silence.
            self.last_received = now;
        }
    }

    /// The consumer of the oldest waiting delivery went away: its waiting
    /// deliveries go back to the queue.
    pub(crate) fn drop_parked(&mut self) {
        let Some((_, gone, _)) = self.overflow.front() else {
            return;
        };
        let gone = gone.clone();
        let mut kept = VecDeque::new();
        for (id, sender, delivery) in std::mem::take(&mut self.overflow) {
            if !sender.same_channel(&gone) {
                kept.push_back((id, sender, delivery));
                continue;
            }
            self.overflow_bytes -= Self::delivery_cost(&delivery);
            let no_ack = self
                .channels
                .get(&id)
                .and_then(|c| c.consumers.get(&delivery.deliver.consumer_tag))
                .is_some_and(|slot| slot.no_ack);
            if !no_ack {
                self.requeue(id, delivery.deliver.delivery_tag);
            }
        }
        self.overflow = kept;
    }

    /// When [`handle_timeout`](Self::handle_timeout) next needs calling.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        let mut next = None;
        if let State::Closing { deadline } = self.state {
            next = Some(deadline);
        }
        if !self.settings.heartbeat.is_zero() && self.has_socket() {
            let send_at = self.last_sent + self.settings.heartbeat / 2;
            // While reading is paused for a full consumer buffer, silence is
            // not the peer's (see handle_timeout): no deadline for it.
            let earliest = if self.is_paused() {
                send_at
            } else {
                send_at.min(self.last_received + self.settings.heartbeat * 2)
            };
            next = Some(next.map_or(earliest, |n: Instant| n.min(earliest)));
        }
        next
    }

    /// Time passed: send a heartbeat, declare the peer dead, or give up on a close.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if let State::Closing { deadline } = self.state {
            if now >= deadline {
                tracing::debug!("no connection.close-ok before the timeout");
                self.finish();
                return;
            }
        }
        if self.settings.heartbeat.is_zero() || !self.has_socket() {
            return;
        }
        // While a full consumer buffer pauses reading, the broker's frames wait
        // in the socket: silence is ours, not the peer's.
        if !self.is_paused() && now >= self.last_received + self.settings.heartbeat * 2 {
            tracing::warn!("missed heartbeats: no frame from the broker for two intervals");
            self.connection_lost(Error::MissedHeartbeats(self.settings.heartbeat * 2));
            return;
        }
        if now >= self.last_sent + self.settings.heartbeat / 2 {
            self.heartbeat_due = true;
        }
    }

    /// Bytes arrived.
    pub(crate) fn on_received(&mut self, now: Instant) {
        self.last_received = now;
    }

    /// Bytes were written.
    pub(crate) fn on_sent(&mut self, now: Instant) {
        self.last_sent = now;
        if self.close_written {
            self.close_written = false;
            if let State::Closing { deadline } = &mut self.state {
                *deadline = now + self.settings.close_timeout;
            }
        }
    }

    /// Whether there is anything to write.
    pub(crate) fn wants_to_write(&self) -> bool {
        self.heartbeat_due
            || !self.control.is_empty()
            || !self.ready.is_empty()
            || self.closing_frame.is_some()
    }

    /// Writes frames into `buf` until it holds `budget` bytes or nothing is
    /// left: connection frames first, then one turn per ready channel in
    /// round-robin, so a long body on one channel never holds back another.
    pub(crate) fn write_frames(&mut self, buf: &mut BytesMut, budget: usize) {
        if self.heartbeat_due {
            frame::write_heartbeat(buf);
            self.heartbeat_due = false;
        }
        while let Some((channel, method)) = self.control.pop_front() {
            tracing::trace!(channel, ?method, "frame sent");
            frame::write_method(buf, channel, &method);
        }
        let frame_max = self.settings.frame_max;
        while buf.len() < budget {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(channel) = self.channels.get_mut(&id) else {
                continue;
            };
            write_one_turn(id, channel, buf, frame_max, &mut self.credit_returns);
            if channel.out.is_empty() {
                channel.scheduled = false;
            } else {
                self.ready.push_back(id);
            }
        }
        self.credit_returns.give_back();
        if self.ready.is_empty() {
            if let Some(close) = self.closing_frame.take() {
                tracing::trace!(channel = 0, method = ?close, "frame sent");
                frame::write_method(buf, 0, &close);
                self.close_written = true;
            }
        }
    }

    fn schedule(&mut self, id: u16) {
        if let Some(channel) = self.channels.get_mut(&id) {
            if !channel.scheduled && !channel.out.is_empty() {
                channel.scheduled = true;
                self.ready.push_back(id);
            }
        }
    }

    fn push_out(&mut self, id: u16, outgoing: Outgoing) {
        if let Some(channel) = self.channels.get_mut(&id) {
            channel.out.push_back(outgoing);
        }
        self.schedule(id);
    }

    /// Puts the next queued RPC of a channel on the wire if none is in flight.
    fn pump_rpc(&mut self, id: u16) {
        let Some(channel) = self.channels.get_mut(&id) else {
            return;
        };
        if channel.in_flight || channel.phase != Phase::Open {
            return;
        }
        let Some(head) = channel.rpcs.front_mut() else {
            return;
        };
        let Some(method) = head.method.take() else {
            return;
        };
        channel.in_flight = true;
        match &*method {
            // The broker numbers publishes from the select on.
            Method::ConfirmSelect(_) => {
                channel.confirms.get_or_insert_with(Confirms::new);
            }
            Method::BasicGet(get) => channel.get_no_ack = get.no_ack,
            // See `unsettled`: acks may be rolled back, recovered tags die.
            Method::TxSelect(_) | Method::BasicRecover(_) => channel.unsettled.stop_tracking(),
            _ => {}
        }
        channel.out.push_back(Outgoing::Method(method));
        self.schedule(id);
    }

    /// The lowest free channel id: ids are recycled as soon as a channel's
    /// close handshake is over.
    fn allocate_channel(&self) -> Option<u16> {
        (1..=self.settings.channel_max).find(|id| !self.channels.contains_key(id))
    }

    fn closed_error(&self) -> Error {
        self.error.get().cloned().unwrap_or_else(|| {
            Error::connection_closed(CloseReason {
                code: ReplyCode::REPLY_SUCCESS,
                text: "connection closed".to_owned(),
                method: None,
                initiator: Initiator::Application,
            })
        })
    }

    fn channel_gone(id: u16) -> Error {
        Error::channel_closed(
            id,
            CloseReason {
                code: ReplyCode::CHANNEL_ERROR,
                text: format!("channel {id} is not open"),
                method: None,
                initiator: Initiator::Library,
            },
        )
    }

    /// Takes a command from a handle.
    pub(crate) fn command(&mut self, command: Command, now: Instant) {
        if matches!(self.state, State::Interrupted | State::Recovering) {
            self.command_while_recovering(command);
            return;
        }
        if !self.accepts_commands() {
            self.refuse(command);
            return;
        }
        match command {
            Command::OpenChannel {
                closed,
                epoch,
                hook_owned,
                reply,
            } => match self.allocate_channel() {
                Some(id) => {
                    let mut state = ChannelState::new(closed, epoch, Some(reply));
                    state.hook_owned = hook_owned;
                    self.channels.insert(id, state);
                    self.push_out(
                        id,
                        Outgoing::Method(Box::new(Method::ChannelOpen(channel::Open {}))),
                    );
                }
                None => {
                    let _ = reply.send(Err(Error::ChannelsExhausted(self.settings.channel_max)));
                }
            },
            Command::Rpc {
                channel,
                method,
                reply,
            } => {
                let state = match self.usable_channel(channel) {
                    Ok(state) => state,
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        return;
                    }
                };
                state.rpcs.push_back(PendingRpc::user(method, reply));
                self.pump_rpc(channel);
            }
            Command::Send { channel, method } => {
                if let Method::BasicCancel(cancel) = &*method {
                    // no-wait cancel: the consumer ends now.
                    self.end_consumer(channel, &cancel.consumer_tag, false);
                }
                if self.channel_is_usable(channel) {
                    if records(&method)
                        && !self.channels.get(&channel).is_some_and(|c| c.hook_owned)
                    {
                        // A no-wait declaration: recorded as sent.
                        self.topology.observe(&method, None);
                    }
                    self.push_method(channel, method);
                }
            }
            Command::Settle {
                channel,
                settlement,
                epoch,
            } => {
                let current = self
                    .channels
                    .get(&channel)
                    .map(|c| c.epoch.load(Ordering::Acquire));
                if current != Some(epoch) {
                    tracing::debug!(
                        channel,
                        ?settlement,
                        "stale delivery tag from before a reconnect dropped"
                    );
                    return;
                }
                if self.channel_is_usable(channel) {
                    self.push_settlement(channel, settlement);
                }
            }
            Command::Publish {
                channel,
                head,
                body,
                confirm,
                credit,
            } => {
                let state = match self.usable_channel(channel) {
                    Ok(state) => state,
                    Err(error) => {
                        if let Some(confirm) = confirm {
                            let _ = confirm.send(Err(error));
                        }
                        return;
                    }
                };
                if let Some(confirms) = state.confirms.as_mut() {
                    let seq = confirms.next_seq;
                    confirms.next_seq += 1;
                    confirms.pending.push_back((seq, confirm));
                }
                self.push_out(
                    channel,
                    Outgoing::Publish {
                        head: Some(head),
                        body: body.0,
                        offset: 0,
                        credit,
                    },
                );
            }
            Command::Consume {
                channel,
                consume,
                deliveries,
                end,
                reply,
            } => {
                let state = match self.usable_channel(channel) {
                    Ok(state) => state,
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        return;
                    }
                };
                // Registered now: deliveries may follow consume-ok at once.
                state.consumers.insert(
                    consume.consumer_tag.clone(),
                    ConsumerSlot {
                        deliveries,
                        end,
                        no_ack: consume.no_ack,
                        consume: (*consume).clone(),
                        position: StreamPosition::Unknown,
                    },
                );
                state.rpcs.push_back(PendingRpc {
                    info: &basic::Consume::INFO,
                    method: Some(Box::new(Method::BasicConsume(*consume))),
                    request: None,
                    reply: Some(reply),
                    step: false,
                });
                self.pump_rpc(channel);
            }
            Command::ForgetConsumer {
                channel,
                tag,
                requeue,
            } => {
                if !self.channel_is_usable(channel) {
                    return;
                }
                // No-ack deliveries are settled as sent: the broker answers a
                // nack of one with 406 and closes the channel.
                let no_ack = self
                    .channels
                    .get(&channel)
                    .and_then(|state| state.consumers.get(&tag))
                    .is_some_and(|slot| slot.no_ack);
                if !no_ack {
                    for delivery_tag in requeue {
                        self.requeue(channel, delivery_tag);
                    }
                }
                let Some(state) = self.channels.get_mut(&channel) else {
                    return;
                };
                let Some(slot) = state.consumers.get(&tag) else {
                    return;
                };
                let _ = slot.end.set(Error::ConsumerCancelled {
                    channel,
                    consumer_tag: tag.to_string(),
                    by_broker: false,
                });
                // The slot stays until cancel-ok, so that deliveries still in
                // flight are requeued rather than lost. Nobody awaits the reply.
                state
                    .rpcs
                    .push_back(PendingRpc::unawaited(Method::BasicCancel(basic::Cancel {
                        consumer_tag: tag,
                        no_wait: false,
                    })));
                self.pump_rpc(channel);
            }
            Command::WaitForConfirms { channel, reply } => {
                let state = match self.usable_channel(channel) {
                    Ok(state) => state,
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        return;
                    }
                };
                match state.confirms.as_mut() {
                    None => {
                        let _ = reply.send(Err(Error::NotInConfirmMode(channel)));
                    }
                    Some(confirms) if confirms.pending.is_empty() => {
                        let all = confirms.all_acked;
                        confirms.all_acked = true;
                        let _ = reply.send(Ok(all));
                    }
                    Some(confirms) => confirms.waiters.push(reply),
                }
            }
            Command::SetReturns { channel, returns } => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    state.returns = Some(returns);
                }
            }
            Command::CloseChannel { channel, reply } => {
                let Some(state) = self.channels.get_mut(&channel) else {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(()));
                    }
                    return;
                };
                if let Some(reply) = reply {
                    state.close_replies.push(reply);
                }
                self.begin_close(channel);
            }
            Command::UpdateSecret { method, reply } => {
                self.secret_replies.push_back(reply);
                self.control
                    .push_back((0, Method::ConnectionUpdateSecret(method)));
            }
            Command::CloseConnection { code, text } => {
                let reason = CloseReason {
                    code,
                    text: text.clone(),
                    method: None,
                    initiator: Initiator::Application,
                };
                let _ = self.error.set(Error::connection_closed(reason));
                // Sent once every channel's queue is written: what was
                // published before close() goes out before the close.
                self.closing_frame = Some(Method::ConnectionClose(connection::Close {
                    reply_code: code.code(),
                    reply_text: ShortString::new(&text).unwrap_or_default(),
                    class_id: 0,
                    method_id: 0,
                }));
                // What is queued may take a while to write to a slow broker:
                // the close-ok timeout starts once the close itself is sent.
                self.state = State::Closing {
                    deadline: now + self.settings.close_timeout * FLUSH_TIMEOUT_FACTOR,
                };
            }
        }
    }

    /// Starts the application's close of channel `id`: the close is queued
    /// behind what the channel has to send, and the channel answers every
    /// later call with the application's close (unless something closed it
    /// first, e.g. a call timeout).
    fn begin_close(&mut self, id: u16) {
        let Some(state) = self.channels.get_mut(&id) else {
            return;
        };
        if state.phase == Phase::Closing {
            return;
        }
        state.phase = Phase::Closing;
        let reason = CloseReason {
            code: ReplyCode::REPLY_SUCCESS,
            text: "closed by the application".to_owned(),
            method: None,
            initiator: Initiator::Application,
        };
        let _ = state.closed.set(Error::channel_closed(id, reason));
        state
            .out
            .push_back(Outgoing::Method(Box::new(Method::ChannelClose(
                channel::Close {
                    reply_code: ReplyCode::REPLY_SUCCESS.code(),
                    reply_text: ShortString::from_static("closed by the application"),
                    class_id: 0,
                    method_id: 0,
                },
            ))));
        self.schedule(id);
    }

    /// Control commands that arrive while the connection is being recovered
    /// (others wait in the command queue until it is back).
    fn command_while_recovering(&mut self, command: Command) {
        match command {
            Command::CloseConnection { code, text } => {
                let reason = CloseReason {
                    code,
                    text,
                    method: None,
                    initiator: Initiator::Application,
                };
                tracing::info!("connection closed by the application during recovery");
                self.fail(Error::connection_closed(reason));
            }
            Command::CloseChannel { channel, reply } => {
                let reopened = self
                    .channels
                    .get(&channel)
                    .is_some_and(|state| matches!(state.phase, Phase::Opening | Phase::Open));
                if reopened {
                    // Already open on the new connection: the broker must be
                    // told, after the step now on the wire for it.
                    let Some(state) = self.channels.get_mut(&channel) else {
                        return;
                    };
                    let _ = state.closed.set(Error::channel_closed(
                        channel,
                        CloseReason {
                            code: ReplyCode::REPLY_SUCCESS,
                            text: "closed by the application".to_owned(),
                            method: None,
                            initiator: Initiator::Application,
                        },
                    ));
                    if let Some(reply) = reply {
                        state.close_replies.push(reply);
                    }
                    if let Some(run) = self.recovery.as_mut() {
                        run.steps.retain(|step| step.channel() != channel);
                        run.steps.push_front(Step::Close(channel));
                    }
                    return;
                }
                if let Some(mut state) = self.channels.remove(&channel) {
                    let queues: Vec<ShortString> = state.consumer_queues();
                    state.fail(&Error::channel_closed(
                        channel,
                        CloseReason {
                            code: ReplyCode::REPLY_SUCCESS,
                            text: "closed by the application".to_owned(),
                            method: None,
                            initiator: Initiator::Application,
                        },
                    ));
                    self.consumers_gone(queues);
                    if let Some(run) = self.recovery.as_mut() {
                        run.steps.retain(|step| step.channel() != channel);
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(()));
                }
            }
            Command::ForgetConsumer { channel, tag, .. } => {
                // Tags from before the reconnect mean nothing now; the broker
                // requeues those messages itself.
                let not_yet_consumed = self.recovery.as_ref().is_some_and(|run| {
                    run.steps.iter().any(|step| {
                        matches!(step, Step::Call(id, Method::BasicConsume(c)) if *id == channel && c.consumer_tag == tag)
                    })
                });
                if not_yet_consumed {
                    if let Some(run) = self.recovery.as_mut() {
                        run.steps.retain(|step| {
                            !matches!(step, Step::Call(id, Method::BasicConsume(c)) if *id == channel && c.consumer_tag == tag)
                        });
                    }
                    self.end_consumer(channel, &tag, false);
                    return;
                }
                // Consuming again on the new connection: cancel it there (the
                // slot stays until cancel-ok; what arrives meanwhile is requeued).
                let Some(state) = self.channels.get_mut(&channel) else {
                    return;
                };
                let Some(slot) = state.consumers.get(&tag) else {
                    return;
                };
                let _ = slot.end.set(Error::ConsumerCancelled {
                    channel,
                    consumer_tag: tag.to_string(),
                    by_broker: false,
                });
                if state.phase == Phase::Open {
                    state
                        .rpcs
                        .push_back(PendingRpc::unawaited(Method::BasicCancel(basic::Cancel {
                            consumer_tag: tag,
                            no_wait: false,
                        })));
                    self.pump_rpc(channel);
                }
            }
            other => self.refuse(other),
        }
    }

    /// The channel a command is for, or why it cannot take one: unknown, or
    /// closed (then with the error that closed it).
    fn usable_channel(&mut self, id: u16) -> Result<&mut ChannelState, Error> {
        match self.channels.get_mut(&id) {
            None => Err(Self::channel_gone(id)),
            Some(state) => match state.closed.get() {
                Some(error) => Err(error.clone()),
                None => Ok(state),
            },
        }
    }

    fn channel_is_usable(&self, id: u16) -> bool {
        self.channels
            .get(&id)
            .is_some_and(|c| c.closed.get().is_none())
    }

    /// Answers a command that arrives after the connection stopped taking them.
    fn refuse(&self, command: Command) {
        let error = self.closed_error();
        match command {
            Command::OpenChannel { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Command::Rpc { reply, .. } | Command::Consume { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Command::Publish {
                confirm: Some(confirm),
                ..
            } => {
                let _ = confirm.send(Err(error));
            }
            Command::WaitForConfirms { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Command::CloseChannel {
                reply: Some(reply), ..
            }
            | Command::UpdateSecret { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            _ => {}
        }
    }

    /// Takes a frame from the broker. An error is fatal: the caller closes the
    /// connection with [`protocol_error`](Self::protocol_error).
    pub(crate) fn handle_frame(&mut self, frame: Frame) -> Result<(), Error> {
        tracing::trace!(?frame, "frame received");
        match frame {
            Frame::Heartbeat => Ok(()),
            Frame::Method { channel: 0, method } => self.connection_method(method),
            Frame::Method { channel, method } => self.channel_method(channel, method),
            Frame::Header { channel, header } => self.content_header(channel, header),
            Frame::Body { channel, payload } => self.content_body(channel, payload),
        }
        .map_err(|e| {
            tracing::debug!(error = %e, "fatal protocol error");
            e
        })
    }

    fn connection_method(&mut self, method: Method) -> Result<(), Error> {
        match method {
            Method::ConnectionClose(close) => {
                let reason = CloseReason {
                    code: ReplyCode(close.reply_code),
                    text: close.reply_text.to_string(),
                    method: Some(MethodId::new(close.class_id, close.method_id)),
                    initiator: Initiator::Broker,
                };
                tracing::info!(%reason, "connection closed by the broker");
                let error = Error::connection_closed(reason);
                // A close the application did not ask for is recovered from
                // (after close-ok is flushed), unless it was closing anyway.
                let asked = matches!(self.state, State::Closing { .. });
                if asked {
                    self.control
                        .push_back((0, Method::ConnectionCloseOk(connection::CloseOk {})));
                    self.fail(error);
                } else {
                    self.connection_lost(error);
                    self.control
                        .push_back((0, Method::ConnectionCloseOk(connection::CloseOk {})));
                }
                Ok(())
            }
            Method::ConnectionCloseOk(_) => {
                tracing::debug!("connection.close-ok received");
                self.finish();
                Ok(())
            }
            Method::ConnectionBlocked(blocked) => {
                tracing::info!(reason = %blocked.reason, "connection blocked by the broker");
                self.blocked.set(Some(blocked.reason.to_string()));
                Ok(())
            }
            Method::ConnectionUnblocked(_) => {
                tracing::info!("connection unblocked");
                self.blocked.set(None);
                Ok(())
            }
            Method::ConnectionUpdateSecretOk(_) => match self.secret_replies.pop_front() {
                Some(reply) => {
                    let _ = reply.send(Ok(()));
                    Ok(())
                }
                None => Err(unexpected(
                    "connection.update-secret-ok without a request".to_owned(),
                )),
            },
            other => Err(unexpected(format!("{} on channel 0", other.info().name))),
        }
    }

    fn channel_method(&mut self, id: u16, method: Method) -> Result<(), Error> {
        let Some(state) = self.channels.get_mut(&id) else {
            return Err(unexpected(format!(
                "{} on channel {id}, which is not open",
                method.info().name
            )));
        };
        if state.assembling.is_some() {
            return Err(unexpected(format!(
                "{} on channel {id} while content was expected",
                method.info().name
            )));
        }
        match method {
            Method::ChannelOpenOk(_) => {
                if state.phase != Phase::Opening {
                    return Err(unexpected(format!("channel.open-ok on open channel {id}")));
                }
                state.phase = Phase::Open;
                let abandoned = state
                    .open_reply
                    .take()
                    .is_some_and(|reply| reply.send(Ok(id)).is_err());
                if abandoned {
                    // The caller stopped waiting (a call timeout): no handle
                    // will ever use or close it.
                    self.begin_close(id);
                    return Ok(());
                }
                self.pump_rpc(id);
                if self
                    .recovery
                    .as_ref()
                    .is_some_and(|r| r.waiting == Some(id))
                {
                    self.advance_recovery();
                }
            }
            Method::ChannelClose(close) => {
                let reason = CloseReason {
                    code: ReplyCode(close.reply_code),
                    text: close.reply_text.to_string(),
                    method: Some(MethodId::new(close.class_id, close.method_id)),
                    initiator: Initiator::Broker,
                };
                tracing::debug!(channel = id, %reason, "channel closed by the broker");
                let error = Error::channel_closed(id, reason);
                let queues: Vec<ShortString> = state.consumer_queues();
                let internal = state.internal;
                state.fail(&error);
                for reply in state.close_replies.drain(..) {
                    let _ = reply.send(Ok(()));
                }
                self.channels.remove(&id);
                // close-ok is the channel's last frame; the id is free after it.
                self.control_on_channel(id, Method::ChannelCloseOk(channel::CloseOk {}));
                self.consumers_gone(queues);
                if self
                    .recovery
                    .as_ref()
                    .is_some_and(|r| r.waiting == Some(id))
                {
                    self.step_failed(id, internal, error);
                }
            }
            Method::ChannelCloseOk(_) => {
                if state.phase != Phase::Closing {
                    return Err(unexpected(format!(
                        "channel.close-ok on channel {id}, which was not closing"
                    )));
                }
                let error = state
                    .closed
                    .get()
                    .cloned()
                    .unwrap_or_else(|| Self::channel_gone(id));
                let replies: Vec<_> = state.close_replies.drain(..).collect();
                let queues: Vec<ShortString> = state.consumer_queues();
                state.fail(&error);
                for reply in replies {
                    let _ = reply.send(Ok(()));
                }
                self.channels.remove(&id);
                self.consumers_gone(queues);
                if self
                    .recovery
                    .as_ref()
                    .is_some_and(|r| r.waiting == Some(id))
                {
                    self.advance_recovery();
                }
            }
            Method::ChannelFlow(flow) => {
                // A flow-ok still waiting answers this request instead: a
                // peer that floods channel.flow (and reads nothing) cannot
                // grow the queue.
                if state.flow_ok.replace(flow.active).is_none() {
                    state.out.push_back(Outgoing::FlowOk);
                    self.schedule(id);
                }
            }
            Method::BasicDeliver(deliver) => {
                state.assembling = Some(Assembly {
                    target: AssemblyTarget::Deliver(deliver),
                    header: None,
                    body: BodyBuffer::Empty,
                });
            }
            Method::BasicReturn(ret) => {
                state.assembling = Some(Assembly {
                    target: AssemblyTarget::Return(ret),
                    header: None,
                    body: BodyBuffer::Empty,
                });
            }
            Method::BasicGetOk(get_ok) => {
                if !state.in_flight
                    || state.rpcs.front().map(|p| p.info.id) != Some(basic::Get::INFO.id)
                {
                    return Err(unexpected(format!(
                        "basic.get-ok on channel {id} without a basic.get"
                    )));
                }
                let outstanding = !state.get_no_ack;
                state.unsettled.delivered(get_ok.delivery_tag, outstanding);
                state.assembling = Some(Assembly {
                    target: AssemblyTarget::Get(get_ok),
                    header: None,
                    body: BodyBuffer::Empty,
                });
            }
            Method::BasicAck(ack) => match state.confirms.as_mut() {
                Some(confirms) => confirms.settle(ack.delivery_tag, ack.multiple, true),
                None => {
                    return Err(unexpected(format!(
                        "basic.ack on channel {id}, which is not in confirm mode"
                    )))
                }
            },
            Method::BasicNack(nack) => match state.confirms.as_mut() {
                Some(confirms) => confirms.settle(nack.delivery_tag, nack.multiple, false),
                None => {
                    return Err(unexpected(format!(
                        "basic.nack on channel {id}, which is not in confirm mode"
                    )))
                }
            },
            Method::BasicCancel(cancel) => {
                // consumer_cancel_notify: the queue went away.
                if !cancel.no_wait {
                    state
                        .out
                        .push_back(Outgoing::Method(Box::new(Method::BasicCancelOk(
                            basic::CancelOk {
                                consumer_tag: cancel.consumer_tag.clone(),
                            },
                        ))));
                    self.schedule(id);
                }
                self.end_consumer(id, &cancel.consumer_tag, true);
            }
            reply => {
                let matches = state.in_flight
                    && state
                        .rpcs
                        .front()
                        .is_some_and(|p| p.info.is_answered_by(reply.info().id));
                if !matches {
                    return Err(unexpected(format!(
                        "{} on channel {id} answers no request",
                        reply.info().name
                    )));
                }
                if let Method::BasicCancelOk(ok) = &reply {
                    let tag = ok.consumer_tag.clone();
                    self.end_consumer(id, &tag, false);
                }
                self.complete_rpc(
                    id,
                    Reply {
                        method: reply,
                        content: None,
                        epoch: 0,
                    },
                );
            }
        }
        Ok(())
    }

    fn control_on_channel(&mut self, id: u16, method: Method) {
        // Written ahead of every channel's queue: the channel is gone.
        self.control.push_back((id, method));
    }

    fn complete_rpc(&mut self, id: u16, mut reply: Reply) {
        let Some(state) = self.channels.get_mut(&id) else {
            return;
        };
        reply.epoch = state.epoch.load(Ordering::Acquire);
        state.in_flight = false;
        let Some(pending) = state.rpcs.pop_front() else {
            return;
        };
        match &pending.request {
            // The hook re-creates what it declared; nothing to recover.
            Some(_) if state.hook_owned => {}
            Some(Method::BasicQos(qos)) => {
                state.qos.retain(|q| q.global != qos.global);
                state.qos.push(qos.clone());
            }
            Some(Method::TxSelect(_)) => state.tx = true,
            Some(request) => self.topology.observe(request, Some(&reply.method)),
            None => {}
        }
        if pending.step {
            self.step_succeeded(&reply.method);
        } else if let Some(answer) = pending.reply {
            let _ = answer.send(Ok(reply));
        }
        self.pump_rpc(id);
    }

    fn end_consumer(&mut self, id: u16, tag: &ShortString, by_broker: bool) {
        let Some(state) = self.channels.get_mut(&id) else {
            return;
        };
        if let Some(slot) = state.consumers.remove(tag) {
            let _ = slot.end.set(Error::ConsumerCancelled {
                channel: id,
                consumer_tag: tag.to_string(),
                by_broker,
            });
            self.consumers_gone(vec![slot.consume.queue]);
        }
    }

    /// Consumers on `queues` ended: auto-delete queues with none left are
    /// forgotten, as the broker deletes them.
    fn consumers_gone(&mut self, queues: Vec<ShortString>) {
        for queue in queues {
            let others = self
                .channels
                .values()
                .any(|c| c.consumers.values().any(|slot| slot.consume.queue == queue));
            self.topology.consumer_gone(&queue, others);
        }
    }

    fn content_header(&mut self, id: u16, header: ContentHeader) -> Result<(), Error> {
        let max = self.settings.max_body_size;
        let assembly = self
            .channels
            .get_mut(&id)
            .and_then(|s| s.assembling.as_mut())
            .filter(|a| a.header.is_none())
            .ok_or_else(|| {
                unexpected(format!(
                    "content header on channel {id} without a method that carries content"
                ))
            })?;
        if header.body_size > max {
            return Err(unexpected(format!(
                "content body of {} bytes on channel {id} exceeds the {max}-byte limit",
                header.body_size
            )));
        }
        assembly.header = Some((header.properties, header.body_size));
        if header.body_size == 0 {
            self.complete_content(id)?;
        }
        Ok(())
    }

    fn content_body(&mut self, id: u16, payload: Bytes) -> Result<(), Error> {
        let assembly = self
            .channels
            .get_mut(&id)
            .and_then(|s| s.assembling.as_mut())
            .ok_or_else(|| {
                unexpected(format!(
                    "content body on channel {id} without a content header"
                ))
            })?;
        let Some((_, size)) = &assembly.header else {
            return Err(unexpected(format!(
                "content body on channel {id} before its header"
            )));
        };
        let size = *size as usize;
        if assembly.body.len() + payload.len() > size {
            return Err(unexpected(format!(
                "content body on channel {id} longer than its header's {size} bytes"
            )));
        }
        assembly.body.push(payload, size);
        if assembly.body.len() == size {
            self.complete_content(id)?;
        }
        Ok(())
    }

    fn complete_content(&mut self, id: u16) -> Result<(), Error> {
        let Some(state) = self.channels.get_mut(&id) else {
            return Ok(());
        };
        let Some(assembly) = state.assembling.take() else {
            return Ok(());
        };
        let Some((properties, _)) = assembly.header else {
            return Ok(());
        };
        let content = Content {
            properties,
            body: assembly.body.into_bytes(),
        };
        match assembly.target {
            AssemblyTarget::Deliver(deliver) => {
                let slot = state.consumers.get_mut(&deliver.consumer_tag);
                // Assemblies complete in the order their methods arrived, so
                // tags are recorded in the broker's order.
                let outstanding = slot.as_ref().is_none_or(|slot| !slot.no_ack);
                state.unsettled.delivered(deliver.delivery_tag, outstanding);
                let Some(slot) = slot else {
                    // A consumer cancelled with no-wait (or forgotten during
                    // recovery) can still receive what was in flight: back to
                    // the queue with it.
                    tracing::debug!(channel = id, tag = %deliver.consumer_tag, "delivery for a cancelled consumer requeued");
                    let tag = deliver.delivery_tag;
                    self.requeue(id, tag);
                    return Ok(());
                };
                let no_ack = slot.no_ack;
                slot.position = slot.position.advance(&content.properties);
                let delivery = RawDelivery {
                    deliver,
                    content,
                    epoch: state.epoch.load(Ordering::Acquire),
                };
                // Behind this consumer's deliveries that already wait, if any.
                let waiting = self
                    .overflow
                    .iter()
                    .any(|(_, sender, _)| sender.same_channel(&slot.deliveries));
                let sent = if waiting {
                    Err(mpsc::error::TrySendError::Full(delivery))
                } else {
                    slot.deliveries.try_send(delivery)
                };
                match sent {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(delivery)) => {
                        self.overflow_bytes += Self::delivery_cost(&delivery);
                        self.overflow
                            .push_back((id, slot.deliveries.clone(), delivery));
                    }
                    Err(mpsc::error::TrySendError::Closed(delivery)) => {
                        if !no_ack {
                            self.requeue(id, delivery.deliver.delivery_tag);
                        }
                    }
                }
            }
            AssemblyTarget::Return(ret) => {
                let message = ReturnedMessage {
                    reply_code: ReplyCode(ret.reply_code),
                    reply_text: ret.reply_text,
                    exchange: ret.exchange,
                    routing_key: ret.routing_key,
                    properties: content.properties,
                    body: content.body,
                };
                // While confirm.select waits for its select-ok, returns are
                // of publishes sent before it, which no ack follows.
                let selecting = state.in_flight
                    && state.rpcs.front().is_some_and(|pending| {
                        pending.info.id == crate::protocol::methods::confirm::Select::INFO.id
                    });
                if let Some(confirms) = state.confirms.as_mut().filter(|_| !selecting) {
                    // A return precedes the ack of its publish, which is
                    // still pending: more returns waiting than publishes
                    // pending is the peer's error (and unbounded growth).
                    if confirms.returned.len() >= confirms.pending.len() {
                        return Err(unexpected(format!(
                            "basic.return on channel {id} with {} returns already waiting for the acks of {} pending publishes",
                            confirms.returned.len(),
                            confirms.pending.len()
                        )));
                    }
                    confirms.returned.push_back(message);
                } else if let Some(returns) = &state.returns {
                    if returns.try_send(message).is_err() {
                        tracing::warn!(
                            channel = id,
                            "returned message dropped: the returns buffer is full or closed"
                        );
                    }
                } else {
                    tracing::warn!(
                        channel = id,
                        "returned message dropped: no returns listener"
                    );
                }
            }
            AssemblyTarget::Get(get_ok) => {
                self.complete_rpc(
                    id,
                    Reply {
                        method: Method::BasicGetOk(get_ok),
                        content: Some(content),
                        epoch: 0,
                    },
                );
            }
        }
        Ok(())
    }

    /// A delivery for a consumer that is gone goes back to the queue.
    fn requeue(&mut self, id: u16, delivery_tag: u64) {
        self.push_settlement(
            id,
            Settlement::Nack(basic::Nack {
                delivery_tag,
                multiple: false,
                requeue: true,
            }),
        );
    }

    /// Queues an ack, nack or reject, first recorded against the channel's
    /// unsettled tags; an ack that completes a settled prefix widens the ack
    /// still waiting at the end of the queue, if there is one, into a
    /// `multiple` ack instead of adding a frame.
    fn push_settlement(&mut self, id: u16, settlement: Settlement) {
        let Some(channel) = self.channels.get_mut(&id) else {
            return;
        };
        if channel.tx {
            // Recorded across reconnects, unlike the tracking.
            channel.unsettled.stop_tracking();
        }
        let outgoing = match &settlement {
            Settlement::Ack(ack) if ack.multiple => {
                channel.unsettled.settle_up_to(ack.delivery_tag);
                Outgoing::Settle(settlement)
            }
            Settlement::Ack(ack) => match channel.unsettled.settle_one(ack.delivery_tag, true) {
                // Everything up to `last` is settled; the broker still holds
                // only the tags whose acks are unwritten, and the widened ack
                // must name one of those (this one, or the waiting one).
                Settled::Prefix(last) => {
                    if let Some(Outgoing::Ack(waiting)) = channel.out.back_mut() {
                        if waiting.delivery_tag <= last {
                            waiting.delivery_tag = waiting.delivery_tag.max(ack.delivery_tag);
                            waiting.multiple = true;
                            return;
                        }
                    }
                    Outgoing::Ack(ack.clone())
                }
                Settled::Recorded => Outgoing::Ack(ack.clone()),
                Settled::Unknown => Outgoing::Settle(settlement),
            },
            Settlement::Nack(nack) => {
                if nack.multiple {
                    channel.unsettled.settle_up_to(nack.delivery_tag);
                } else {
                    channel.unsettled.settle_one(nack.delivery_tag, false);
                }
                Outgoing::Settle(settlement)
            }
            Settlement::Reject(reject) => {
                channel.unsettled.settle_one(reject.delivery_tag, false);
                Outgoing::Settle(settlement)
            }
        };
        self.push_out(id, outgoing);
    }

    /// Queues a method sent without awaiting a reply; settlements go through
    /// [`Self::push_settlement`].
    fn push_method(&mut self, id: u16, method: Box<Method>) {
        if let Some(settlement) = Settlement::of(&method) {
            return self.push_settlement(id, settlement);
        }
        if let Method::BasicRecoverAsync(_) = &*method {
            if let Some(channel) = self.channels.get_mut(&id) {
                channel.unsettled.stop_tracking();
            }
        }
        self.push_out(id, Outgoing::Method(method));
    }

    /// The peer broke the protocol: tell it why (best effort) and fail everything.
    pub(crate) fn protocol_error(&mut self, error: Error) {
        if self.is_closed() {
            return;
        }
        let code = match &error {
            Error::Protocol(e) => e.reply_code(),
            _ => ReplyCode::UNEXPECTED_FRAME,
        };
        let close = Method::ConnectionClose(connection::Close {
            reply_code: code.code(),
            reply_text: ShortString::new(truncate(&error.to_string(), 255)).unwrap_or_default(),
            class_id: 0,
            method_id: 0,
        });
        self.connection_lost(error);
        // Told to the peer (best effort) before the socket is dropped.
        self.control.push_back((0, close));
    }

    /// Whether a socket is attached (not lost, not over).
    fn has_socket(&self) -> bool {
        matches!(
            self.state,
            State::Open | State::Closing { .. } | State::Recovering
        )
    }

    /// Whether the connection is lost and waits for a new socket.
    pub(crate) fn is_interrupted(&self) -> bool {
        matches!(self.state, State::Interrupted)
    }

    /// The socket is gone (or must be dropped): recover when configured,
    /// fail otherwise.
    pub(crate) fn connection_lost(&mut self, error: Error) {
        match self.state {
            State::Closed | State::Interrupted => {}
            State::Closing { .. } => self.fail(error),
            State::Open | State::Recovering if !self.settings.recover => self.fail(error),
            State::Open | State::Recovering => self.interrupt(error),
        }
    }

    /// Why the connection was last lost (once), for the error handlers.
    pub(crate) fn take_loss(&mut self) -> Option<Error> {
        self.last_loss.take()
    }

    fn interrupt(&mut self, error: Error) {
        tracing::warn!(%error, "connection lost; recovering");
        self.last_loss = Some(error.clone());
        let gone: Vec<u16> = self
            .channels
            .iter()
            .filter(|(_, c)| {
                c.internal || c.hook_owned || c.phase == Phase::Closing || c.open_reply.is_some()
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(mut state) = self.channels.remove(&id) {
                let closing = state.phase == Phase::Closing;
                let replies: Vec<_> = state.close_replies.drain(..).collect();
                state.fail(&error);
                if closing {
                    // The application's close is as good as done.
                    for reply in replies {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
        }
        // Parked deliveries are dropped with the socket: a stream consumer
        // resumes at the first of its own (walked backwards, so it is the
        // first that sets the position last).
        for (id, _, delivery) in self.overflow.iter().rev() {
            let Some(slot) = self
                .channels
                .get_mut(id)
                .and_then(|c| c.consumers.get_mut(&delivery.deliver.consumer_tag))
            else {
                continue;
            };
            if let (StreamPosition::After(_), Some(offset)) =
                (slot.position, stream_offset(&delivery.content.properties))
            {
                slot.position = StreamPosition::After(offset - 1);
            }
        }
        for state in self.channels.values_mut() {
            state.interrupt(&error);
        }
        for reply in self.secret_replies.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        self.control.clear();
        self.ready.clear();
        self.heartbeat_due = false;
        self.overflow.clear();
        self.overflow_bytes = 0;
        self.recovery = None;
        self.state = State::Interrupted;
        self.recovering.set(true);
        // A new connection is not blocked until its broker says so.
        self.blocked.set(None);
        let _ = self.events.send(RecoveryEvent::Recovering { cause: error });
    }

    /// A new socket is up: re-open channels (same ids) with their QoS,
    /// confirm and tx modes, re-create the topology, then the consumers.
    pub(crate) fn resume(
        &mut self,
        channel_max: u16,
        frame_max: u32,
        heartbeat: Duration,
        now: Instant,
    ) {
        self.settings.channel_max = channel_max;
        self.settings.frame_max = frame_max;
        self.settings.heartbeat = heartbeat;
        self.last_received = now;
        self.last_sent = now;
        self.state = State::Recovering;
        let mut ids: Vec<u16> = self.channels.keys().copied().collect();
        ids.sort_unstable();
        let mut steps = VecDeque::new();
        for id in &ids {
            let Some(state) = self.channels.get(id) else {
                continue;
            };
            steps.push_back(Step::Open(*id));
            for qos in &state.qos {
                steps.push_back(Step::Call(*id, Method::BasicQos(qos.clone())));
            }
            if state.confirms.is_some() {
                steps.push_back(Step::Call(
                    *id,
                    Method::ConfirmSelect(crate::protocol::methods::confirm::Select {
                        no_wait: false,
                    }),
                ));
            }
            if state.tx {
                steps.push_back(Step::Call(
                    *id,
                    Method::TxSelect(crate::protocol::methods::tx::Select {}),
                ));
            }
        }
        let plan = if self.settings.recover_topology {
            self.topology.plan()
        } else {
            Vec::new()
        };
        if !plan.is_empty() {
            if let Some(t) = self.allocate_channel() {
                let mut state =
                    ChannelState::new(Arc::new(OnceLock::new()), Arc::new(AtomicU64::new(0)), None);
                state.internal = true;
                state.phase = Phase::Lost;
                self.channels.insert(t, state);
                steps.push_back(Step::Open(t));
                for (method, old_name) in plan {
                    match old_name {
                        Some(old) => steps.push_back(Step::Declare(t, method, old)),
                        None => steps.push_back(Step::Call(t, method)),
                    }
                }
                steps.push_back(Step::Close(t));
            }
        }
        for id in &ids {
            let Some(state) = self.channels.get(id) else {
                continue;
            };
            let mut consumers: Vec<&ConsumerSlot> = state.consumers.values().collect();
            consumers.sort_by(|a, b| a.consume.consumer_tag.cmp(&b.consume.consumer_tag));
            for slot in consumers {
                let mut consume = slot.consume.clone();
                if let StreamPosition::After(offset) = slot.position {
                    consume.arguments.insert(
                        ShortString::from_static(STREAM_OFFSET),
                        FieldValue::I64(offset + 1),
                    );
                }
                steps.push_back(Step::Call(*id, Method::BasicConsume(consume)));
            }
        }
        self.recovery = Some(RecoveryRun {
            steps,
            waiting: None,
            renamed: HashMap::new(),
            declaring: None,
        });
        self.advance_recovery();
    }

    /// Puts the next recovery step on the wire, or finishes recovery.
    fn advance_recovery(&mut self) {
        loop {
            let Some(run) = self.recovery.as_mut() else {
                return;
            };
            run.waiting = None;
            run.declaring = None;
            let Some(step) = run.steps.pop_front() else {
                self.recovery = None;
                self.state = State::Open;
                self.recovering.set(false);
                tracing::info!("connection recovered");
                let _ = self.events.send(RecoveryEvent::Recovered);
                return;
            };
            match step {
                Step::Open(id) => {
                    let Some(state) = self.channels.get_mut(&id) else {
                        continue;
                    };
                    state.phase = Phase::Opening;
                    state
                        .out
                        .push_back(Outgoing::Method(Box::new(Method::ChannelOpen(
                            channel::Open {},
                        ))));
                    run.waiting = Some(id);
                    self.schedule(id);
                    return;
                }
                Step::Call(id, method) | Step::Declare(id, method, _)
                    if !self
                        .channels
                        .get(&id)
                        .is_some_and(|c| c.phase == Phase::Open) =>
                {
                    tracing::debug!(
                        channel = id,
                        method = method.info().name,
                        "recovery step skipped: channel gone"
                    );
                }
                Step::Call(id, mut method) => {
                    rename_queue_in(&mut method, &run.renamed);
                    if let Method::BasicConsume(consume) = &method {
                        // The consumer's record follows the rename.
                        let queue = consume.queue.clone();
                        let tag = consume.consumer_tag.clone();
                        if let Some(slot) = self
                            .channels
                            .get_mut(&id)
                            .and_then(|c| c.consumers.get_mut(&tag))
                        {
                            slot.consume.queue = queue;
                        } else {
                            continue;
                        }
                    }
                    let Some(run) = self.recovery.as_mut() else {
                        return;
                    };
                    run.waiting = Some(id);
                    if let Some(state) = self.channels.get_mut(&id) {
                        state.rpcs.push_back(PendingRpc::step(method));
                    }
                    self.pump_rpc(id);
                    return;
                }
                Step::Declare(id, method, old) => {
                    run.waiting = Some(id);
                    run.declaring = Some(old);
                    if let Some(state) = self.channels.get_mut(&id) {
                        state.rpcs.push_back(PendingRpc::step(method));
                    }
                    self.pump_rpc(id);
                    return;
                }
                Step::Close(id) => {
                    let Some(state) = self.channels.get_mut(&id) else {
                        continue;
                    };
                    state.phase = Phase::Closing;
                    state
                        .out
                        .push_back(Outgoing::Method(Box::new(Method::ChannelClose(
                            channel::Close {
                                reply_code: ReplyCode::REPLY_SUCCESS.code(),
                                reply_text: ShortString::from_static("recovery done"),
                                class_id: 0,
                                method_id: 0,
                            },
                        ))));
                    run.waiting = Some(id);
                    self.schedule(id);
                    return;
                }
            }
        }
    }

    fn step_succeeded(&mut self, reply: &Method) {
        let Some(run) = self.recovery.as_mut() else {
            return;
        };
        if let (Some(old), Method::QueueDeclareOk(ok)) = (run.declaring.take(), reply) {
            if ok.queue != old {
                tracing::info!(old = %old, new = %ok.queue, "server-named queue renamed by recovery");
                run.renamed.insert(old.clone(), ok.queue.clone());
                self.topology.rename_queue(&old, &ok.queue);
                let _ = self.events.send(RecoveryEvent::QueueRenamed {
                    old: old.to_string(),
                    new: ok.queue.to_string(),
                });
            }
        }
        self.advance_recovery();
    }

    /// A step closed its channel: report it; recovery's own channel is
    /// opened again, an application channel stays closed.
    fn step_failed(&mut self, id: u16, internal: bool, error: Error) {
        tracing::warn!(channel = id, %error, "recovery step failed");
        let method = match &error {
            Error::ChannelClosed { reason, .. } => reason
                .method
                .and_then(|m| {
                    crate::protocol::methods::ALL_METHODS
                        .iter()
                        .find(|i| i.id == m)
                })
                .map_or("channel", |i| i.name),
            _ => "channel",
        };
        let _ = self
            .events
            .send(RecoveryEvent::StepFailed { method, error });
        if internal {
            let mut state =
                ChannelState::new(Arc::new(OnceLock::new()), Arc::new(AtomicU64::new(0)), None);
            state.internal = true;
            state.phase = Phase::Lost;
            // The close-ok for the old incarnation goes out first (control queue).
            self.channels.insert(id, state);
            if let Some(run) = self.recovery.as_mut() {
                run.steps.push_front(Step::Open(id));
            }
        } else if let Some(run) = self.recovery.as_mut() {
            run.steps.retain(|step| step.channel() != id);
        }
        self.advance_recovery();
    }

    /// Ends the connection with `error`, failing everything that waits.
    pub(crate) fn fail(&mut self, error: Error) {
        if !self.is_closed() && self.recovery.is_some() || self.is_interrupted() {
            let _ = self.events.send(RecoveryEvent::Failed {
                error: error.clone(),
            });
        }
        self.recovery = None;
        self.recovering.set(false);
        // Publishers waiting for an unblock learn the error instead.
        self.blocked.set(None);
        let _ = self.error.set(error);
        let error = self.closed_error();
        for (_, mut state) in self.channels.drain() {
            state.fail(&error);
        }
        for reply in self.secret_replies.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        self.ready.clear();
        self.overflow.clear();
        self.overflow_bytes = 0;
        self.state = State::Closed;
    }

    fn finish(&mut self) {
        let error = self.closed_error();
        self.fail(error);
    }

    /// Why the connection ended, once it has.
    pub(crate) fn error(&self) -> Option<&Error> {
        self.error.get()
    }
}

impl Step {
    fn channel(&self) -> u16 {
        match self {
            Step::Open(id) | Step::Call(id, _) | Step::Declare(id, _, _) | Step::Close(id) => *id,
        }
    }
}

/// Points a binding or consume at a server-named queue's new name.
fn rename_queue_in(method: &mut Method, renamed: &HashMap<ShortString, ShortString>) {
    let queue = match method {
        Method::QueueBind(bind) => &mut bind.queue,
        Method::BasicConsume(consume) => &mut consume.queue,
        _ => return,
    };
    if let Some(new) = renamed.get(queue) {
        *queue = new.clone();
    }
}

fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// One turn of a channel: a whole method, or a publish up to and including
/// one body frame.
fn write_one_turn(
    id: u16,
    channel: &mut ChannelState,
    buf: &mut BytesMut,
    frame_max: u32,
    credit_returns: &mut CreditReturns,
) {
    let Some(head) = channel.out.front_mut() else {
        return;
    };
    match head {
        Outgoing::Method(method) => {
            tracing::trace!(channel = id, ?method, "frame sent");
            frame::write_method(buf, id, method);
            channel.out.pop_front();
        }
        Outgoing::Ack(ack) => {
            tracing::trace!(channel = id, ?ack, "frame sent");
            frame::write_ack(buf, id, ack);
            channel.out.pop_front();
        }
        Outgoing::Settle(settlement) => {
            tracing::trace!(channel = id, ?settlement, "frame sent");
            settlement.write(buf, id);
            channel.out.pop_front();
        }
        Outgoing::FlowOk => {
            if let Some(active) = channel.flow_ok.take() {
                let flow_ok = Method::ChannelFlowOk(channel::FlowOk { active });
                tracing::trace!(channel = id, method = ?flow_ok, "frame sent");
                frame::write_method(buf, id, &flow_ok);
            }
            channel.out.pop_front();
        }
        Outgoing::Publish {
            head, body, offset, ..
        } => {
            if let Some(head) = head.take() {
                buf.extend_from_slice(&head);
            }
            let chunk = frame_max as usize - FRAME_OVERHEAD;
            let end = (*offset + chunk).min(body.len());
            frame::write_body(buf, id, &body[*offset..end], frame_max);
            *offset = end;
            if end >= body.len() {
                if let Some(Outgoing::Publish {
                    credit: Some(credit),
                    ..
                }) = channel.out.pop_front()
                {
                    credit_returns.push(credit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The machine driven without sockets: frames in, bytes out, time as an argument.

    use super::*;
    use crate::protocol::frame::FrameDecoder;
    use crate::protocol::methods::{confirm, queue};

    fn machine(now: Instant) -> (Machine, Arc<OnceLock<Error>>) {
        machine_with(now, Blocked::new().0, false)
    }

    fn machine_with(
        now: Instant,
        blocked: Blocked,
        recover: bool,
    ) -> (Machine, Arc<OnceLock<Error>>) {
        let error = Arc::new(OnceLock::new());
        let recovering = Recovering::new().0;
        let (events, _) = broadcast::channel(16);
        let settings = Settings {
            channel_max: 8,
            frame_max: 4096,
            heartbeat: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            max_body_size: 1 << 20,
            recover,
            recover_topology: true,
        };
        (
            Machine::new(settings, now, error.clone(), blocked, recovering, events),
            error,
        )
    }

    #[test]
    fn a_lost_connection_is_no_longer_blocked_whether_it_recovers_or_fails() {
        for recover in [false, true] {
            let now = Instant::now();
            let (blocked, mut watch) = Blocked::new();
            let flag = blocked.flag();
            let (mut m, _) = machine_with(now, blocked, recover);
            m.handle_frame(Frame::Method {
                channel: 0,
                method: Method::ConnectionBlocked(connection::Blocked {
                    reason: ShortString::from_static("low on memory"),
                }),
            })
            .expect("blocked");
            assert!(flag.is_up());
            assert_eq!(watch.borrow_and_update().as_deref(), Some("low on memory"));
            m.connection_lost(Error::ConnectionLost(Arc::new(std::io::Error::other(
                "gone",
            ))));
            assert_eq!(m.is_interrupted(), recover);
            // Publishers waiting for an unblock must not wait forever: the
            // new connection, or the error, is what they see next.
            assert!(!flag.is_up(), "recover: {recover}");
            assert!(watch.has_changed().expect("sender alive"));
            assert_eq!(*watch.borrow(), None);
            drop(m);
            assert!(
                watch.has_changed().is_err(),
                "the watch closes with the machine"
            );
        }
    }

    /// Everything the machine wants to write, decoded.
    fn written(m: &mut Machine) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        m.write_frames(&mut buf, usize::MAX);
        let mut decoder = FrameDecoder::new(u32::MAX);
        let mut frames = Vec::new();
        while let Some(frame) = decoder
            .decode(&mut buf)
            .expect("the machine writes valid frames")
        {
            frames.push(frame);
        }
        frames
    }

    fn open_channel(m: &mut Machine, now: Instant) -> u16 {
        let (reply, mut answer) = oneshot::channel();
        m.command(
            Command::OpenChannel {
                closed: Arc::new(OnceLock::new()),
                epoch: Arc::new(AtomicU64::new(0)),
                hook_owned: false,
                reply,
            },
            now,
        );
        let Frame::Method {
            channel,
            method: Method::ChannelOpen(_),
        } = written(m).remove(0)
        else {
            panic!("expected channel.open");
        };
        m.handle_frame(Frame::Method {
            channel,
            method: Method::ChannelOpenOk(channel::OpenOk {}),
        })
        .expect("open-ok");
        assert_eq!(
            answer.try_recv().expect("answered").expect("opened"),
            channel
        );
        channel
    }

    fn publish_head(channel: u16, body_size: u64) -> Bytes {
        let mut buf = BytesMut::new();
        frame::write_publish_method(&mut buf, channel, &basic::Publish::default());
        frame::write_header(
            &mut buf,
            channel,
            body_size,
            &crate::protocol::BasicProperties::default(),
        );
        buf.freeze()
    }

    fn declare(name: &'static str) -> Method {
        Method::QueueDeclare(queue::Declare {
            queue: ShortString::from_static(name),
            ..Default::default()
        })
    }

    #[test]
    fn one_rpc_at_a_time_per_channel_and_replies_in_order() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let (first_tx, mut first) = oneshot::channel();
        let (second_tx, mut second) = oneshot::channel();
        m.command(
            Command::Rpc {
                channel: id,
                method: Box::new(declare("a")),
                reply: first_tx,
            },
            now,
        );
        m.command(
            Command::Rpc {
                channel: id,
                method: Box::new(declare("b")),
                reply: second_tx,
            },
            now,
        );
        let sent = written(&mut m);
        assert_eq!(sent.len(), 1, "the second call waits for the first reply");
        let ok = |q: &'static str| Frame::Method {
            channel: id,
            method: Method::QueueDeclareOk(queue::DeclareOk {
                queue: ShortString::from_static(q),
                message_count: 0,
                consumer_count: 0,
            }),
        };
        m.handle_frame(ok("a")).expect("reply");
        assert!(matches!(
            first.try_recv(),
            Ok(Ok(Reply {
                method: Method::QueueDeclareOk(_),
                ..
            }))
        ));
        assert!(second.try_recv().is_err(), "not answered yet");
        assert_eq!(written(&mut m).len(), 1, "now the second goes out");
        m.handle_frame(ok("b")).expect("reply");
        assert!(second.try_recv().is_ok());
    }

    #[test]
    fn a_reply_that_answers_nothing_is_a_protocol_error() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let err = m
            .handle_frame(Frame::Method {
                channel: id,
                method: Method::TxCommitOk(crate::protocol::methods::tx::CommitOk {}),
            })
            .expect_err("unexpected");
        assert!(matches!(err, Error::UnexpectedFrame(_)), "{err}");
    }

    #[test]
    fn confirms_settle_single_and_multiple_acks_and_nacks() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let (select, _select_answer) = oneshot::channel();
        m.command(
            Command::Rpc {
                channel: id,
                method: Box::new(Method::ConfirmSelect(confirm::Select { no_wait: false })),
                reply: select,
            },
            now,
        );
        written(&mut m);
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::ConfirmSelectOk(confirm::SelectOk {}),
        })
        .expect("select-ok");
        let mut answers = Vec::new();
        for _ in 0..4 {
            let (tx, rx) = oneshot::channel();
            m.command(
                Command::Publish {
                    channel: id,
                    head: publish_head(id, 1),
                    body: PublishBody(Bytes::from_static(b"x")),
                    confirm: Some(tx),
                    credit: None,
                },
                now,
            );
            answers.push(rx);
        }
        let (wait_tx, mut wait) = oneshot::channel();
        m.command(
            Command::WaitForConfirms {
                channel: id,
                reply: wait_tx,
            },
            now,
        );
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::BasicAck(basic::Ack {
                delivery_tag: 2,
                multiple: true,
            }),
        })
        .expect("ack");
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::BasicNack(basic::Nack {
                delivery_tag: 4,
                multiple: false,
                requeue: false,
            }),
        })
        .expect("nack");
        assert!(wait.try_recv().is_err(), "publish 3 is outstanding");
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::BasicAck(basic::Ack {
                delivery_tag: 3,
                multiple: false,
            }),
        })
        .expect("ack");
        let outcomes: Vec<_> = answers
            .iter_mut()
            .map(|a| a.try_recv().expect("settled").expect("ok"))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                Confirmation::Ack,
                Confirmation::Ack,
                Confirmation::Ack,
                Confirmation::Nack
            ]
        );
        assert!(
            !wait.try_recv().expect("all settled").expect("ok"),
            "one was nacked"
        );
    }

    #[test]
    fn content_is_assembled_across_body_frames_and_rejected_out_of_order() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let (deliveries, mut receiver) = mpsc::channel(4);
        let (reply, _answer) = oneshot::channel();
        let tag = ShortString::from_static("t");
        m.command(
            Command::Consume {
                channel: id,
                consume: Box::new(basic::Consume {
                    consumer_tag: tag.clone(),
                    ..Default::default()
                }),
                deliveries,
                end: Arc::new(OnceLock::new()),
                reply,
            },
            now,
        );
        let deliver = Frame::Method {
            channel: id,
            method: Method::BasicDeliver(basic::Deliver {
                consumer_tag: tag,
                delivery_tag: 1,
                ..Default::default()
            }),
        };
        m.handle_frame(deliver.clone()).expect("deliver");
        m.handle_frame(Frame::Header {
            channel: id,
            header: ContentHeader {
                class_id: 60,
                body_size: 6,
                properties: ReceivedProperties::default(),
            },
        })
        .expect("header");
        m.handle_frame(Frame::Body {
            channel: id,
            payload: Bytes::from_static(b"abc"),
        })
        .expect("body 1");
        assert!(receiver.try_recv().is_err(), "incomplete");
        m.handle_frame(Frame::Body {
            channel: id,
            payload: Bytes::from_static(b"def"),
        })
        .expect("body 2");
        assert_eq!(
            &receiver.try_recv().expect("complete").content.body[..],
            b"abcdef"
        );

        m.handle_frame(deliver).expect("deliver");
        let err = m
            .handle_frame(Frame::Body {
                channel: id,
                payload: Bytes::from_static(b"x"),
            })
            .expect_err("body before header");
        assert!(matches!(err, Error::UnexpectedFrame(_)));
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let err = m
            .handle_frame(Frame::Header {
                channel: id,
                header: ContentHeader {
                    class_id: 60,
                    body_size: 1,
                    properties: ReceivedProperties::default(),
                },
            })
            .expect_err("header without method");
        assert!(matches!(err, Error::UnexpectedFrame(_)));
    }

    /// Opens a consumer with tag "t" and delivers `tags` (empty bodies) to it.
    fn consume_and_deliver(
        m: &mut Machine,
        now: Instant,
        id: u16,
        no_ack: bool,
        tags: impl IntoIterator<Item = u64>,
    ) -> mpsc::Receiver<RawDelivery> {
        let (deliveries, receiver) = mpsc::channel(64);
        let (reply, _answer) = oneshot::channel();
        m.command(
            Command::Consume {
                channel: id,
                consume: Box::new(basic::Consume {
                    consumer_tag: ShortString::from_static("t"),
                    no_ack,
                    ..Default::default()
                }),
                deliveries,
                end: Arc::new(OnceLock::new()),
                reply,
            },
            now,
        );
        written(m);
        for delivery_tag in tags {
            m.handle_frame(Frame::Method {
                channel: id,
                method: Method::BasicDeliver(basic::Deliver {
                    consumer_tag: ShortString::from_static("t"),
                    delivery_tag,
                    ..Default::default()
                }),
            })
            .expect("deliver");
            m.handle_frame(Frame::Header {
                channel: id,
                header: ContentHeader {
                    class_id: 60,
                    body_size: 0,
                    properties: ReceivedProperties::default(),
                },
            })
            .expect("header");
        }
        receiver
    }

    #[test]
    fn a_stream_consumer_resumes_after_the_last_delivery_handed_over_not_after_parked_ones() {
        let now = Instant::now();
        let (mut m, _) = machine_with(now, Blocked::new().0, true);
        let id = open_channel(&mut m, now);
        // Room for one delivery: the next two wait in the overflow, and are
        // dropped with the socket.
        let (deliveries, mut receiver) = mpsc::channel(1);
        let (reply, _answer) = oneshot::channel();
        m.command(
            Command::Consume {
                channel: id,
                consume: Box::new(basic::Consume {
                    consumer_tag: ShortString::from_static("s"),
                    ..Default::default()
                }),
                deliveries,
                end: Arc::new(OnceLock::new()),
                reply,
            },
            now,
        );
        written(&mut m);
        for delivery_tag in 1..=3u64 {
            m.handle_frame(Frame::Method {
                channel: id,
                method: Method::BasicDeliver(basic::Deliver {
                    consumer_tag: ShortString::from_static("s"),
                    delivery_tag,
                    ..Default::default()
                }),
            })
            .expect("deliver");
            let offset = 100 + delivery_tag as i64;
            let properties = crate::protocol::BasicProperties {
                headers: Some(crate::protocol::FieldTable::new().with(
                    ShortString::from_static(STREAM_OFFSET),
                    FieldValue::I64(offset),
                )),
                ..Default::default()
            };
            m.handle_frame(Frame::Header {
                channel: id,
                header: ContentHeader {
                    class_id: 60,
                    body_size: 0,
                    properties: properties.into(),
                },
            })
            .expect("header");
        }
        m.connection_lost(Error::ConnectionLost(Arc::new(std::io::Error::other(
            "cut",
        ))));
        m.resume(8, 4096, Duration::from_secs(10), now);
        // Channel re-opened, then the consume.
        assert!(matches!(
            written_methods(&mut m)[..],
            [Method::ChannelOpen(_)]
        ));
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::ChannelOpenOk(channel::OpenOk::default()),
        })
        .expect("open-ok");
        let consumes: Vec<basic::Consume> = written_methods(&mut m)
            .into_iter()
            .filter_map(|method| match method {
                Method::BasicConsume(consume) => Some(consume),
                _ => None,
            })
            .collect();
        assert_eq!(consumes.len(), 1);
        assert_eq!(
            consumes[0].arguments.get(STREAM_OFFSET),
            Some(&FieldValue::I64(102)),
            "after 101, the one delivery the consumer holds"
        );
        let held = receiver.try_recv().expect("the delivery handed over");
        assert_eq!(held.deliver.delivery_tag, 1);
    }

    #[test]
    fn a_consumer_whose_deliveries_carry_no_offset_resumes_with_its_own_arguments() {
        let now = Instant::now();
        let (mut m, _) = machine_with(now, Blocked::new().0, true);
        let id = open_channel(&mut m, now);
        let _receiver = consume_and_deliver(&mut m, now, id, false, [1, 2]);
        m.connection_lost(Error::ConnectionLost(Arc::new(std::io::Error::other(
            "cut",
        ))));
        m.resume(8, 4096, Duration::from_secs(10), now);
        written(&mut m);
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::ChannelOpenOk(channel::OpenOk::default()),
        })
        .expect("open-ok");
        let consume = written_methods(&mut m)
            .into_iter()
            .find_map(|method| match method {
                Method::BasicConsume(consume) => Some(consume),
                _ => None,
            })
            .expect("consumed again");
        assert!(consume.arguments.is_empty());
    }

    #[test]
    fn commands_and_queued_frames_fit_inline_copies() {
        // Larger values are moved with a `memcpy` call, several times per
        // publish and per ack (see `Command::Rpc`).
        let sizes = (
            std::mem::size_of::<Command>(),
            std::mem::size_of::<Outgoing>(),
        );
        assert!(sizes.0 <= 128 && sizes.1 <= 128, "{sizes:?}");
    }

    /// What a generated stub such as `channel.basic_ack(..)` sends.
    fn send(m: &mut Machine, now: Instant, id: u16, method: Method) {
        m.command(
            Command::Send {
                channel: id,
                method: Box::new(method),
            },
            now,
        );
    }

    fn settle(m: &mut Machine, now: Instant, id: u16, method: Method) {
        m.command(
            Command::Settle {
                channel: id,
                settlement: Settlement::of(&method).expect("a settlement"),
                epoch: 0,
            },
            now,
        );
    }

    fn ack(delivery_tag: u64) -> Method {
        Method::BasicAck(basic::Ack {
            delivery_tag,
            multiple: false,
        })
    }

    fn written_methods(m: &mut Machine) -> Vec<Method> {
        written(m)
            .into_iter()
            .map(|frame| match frame {
                Frame::Method { method, .. } => method,
                other => panic!("not a method frame: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn acks_sent_one_by_one_go_out_as_one_multiple_ack_when_they_settle_a_prefix() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let _deliveries = consume_and_deliver(&mut m, now, id, false, 1..=6);
        for tag in 1..=4 {
            settle(&mut m, now, id, ack(tag));
        }
        assert_eq!(
            written_methods(&mut m),
            [Method::BasicAck(basic::Ack {
                delivery_tag: 4,
                multiple: true
            })]
        );
        // 6 before 5 is sent alone; 5 then completes the prefix through 6,
        // but 6 is no longer the broker's to ack (RabbitMQ refuses a
        // multiple ack of a tag it does not hold): 5 goes alone.
        settle(&mut m, now, id, ack(6));
        assert_eq!(written_methods(&mut m), [ack(6)]);
        settle(&mut m, now, id, ack(5));
        assert_eq!(written_methods(&mut m), [ack(5)]);
    }

    #[test]
    fn acks_sent_as_plain_methods_are_tracked_like_delivery_acks() {
        // `channel.basic_ack(..)` (the generated stub) sends a `Command::Send`.
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let _deliveries = consume_and_deliver(&mut m, now, id, false, 1..=3);
        for tag in 1..=3 {
            send(&mut m, now, id, ack(tag));
        }
        assert_eq!(
            written_methods(&mut m),
            [Method::BasicAck(basic::Ack {
                delivery_tag: 3,
                multiple: true
            })]
        );
        // Recover-async stops the tracking: later acks go out as they are.
        let _more = consume_and_deliver(&mut m, now, id, false, 4..=5);
        let recover = Method::BasicRecoverAsync(basic::RecoverAsync { requeue: true });
        send(&mut m, now, id, recover.clone());
        for tag in 4..=5 {
            send(&mut m, now, id, ack(tag));
        }
        assert_eq!(written_methods(&mut m), [recover, ack(4), ack(5)]);
    }

    #[test]
    fn an_unacked_delivery_is_never_covered_by_a_multiple_ack() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let _deliveries = consume_and_deliver(&mut m, now, id, false, 1..=4);
        // 1 stays unacked: 2..4 go out one by one.
        for tag in 2..=4 {
            settle(&mut m, now, id, ack(tag));
        }
        assert_eq!(written_methods(&mut m), [ack(2), ack(3), ack(4)]);
        // A reject of 1 settles it but is not an ack.
        let reject = Method::BasicReject(basic::Reject {
            delivery_tag: 1,
            requeue: true,
        });
        settle(&mut m, now, id, reject.clone());
        assert_eq!(written_methods(&mut m), [reject]);
        // A second ack of a settled tag is left to the broker to refuse.
        settle(&mut m, now, id, ack(3));
        assert_eq!(written_methods(&mut m), [ack(3)]);
    }

    #[test]
    fn a_reject_between_acks_stays_in_order_and_the_widened_ack_follows_it() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let _deliveries = consume_and_deliver(&mut m, now, id, false, 1..=4);
        let nack = Method::BasicNack(basic::Nack {
            delivery_tag: 2,
            multiple: false,
            requeue: false,
        });
        settle(&mut m, now, id, ack(1));
        settle(&mut m, now, id, nack.clone());
        settle(&mut m, now, id, ack(3));
        settle(&mut m, now, id, ack(4));
        assert_eq!(
            written_methods(&mut m),
            [
                ack(1),
                nack,
                Method::BasicAck(basic::Ack {
                    delivery_tag: 4,
                    multiple: true
                })
            ]
        );
    }

    #[test]
    fn the_widened_ack_names_a_tag_whose_ack_is_still_waiting() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let _deliveries = consume_and_deliver(&mut m, now, id, false, 1..=5);
        // 3 is rejected, 2 and 4 acked: waiting, not a prefix yet.
        settle(
            &mut m,
            now,
            id,
            Method::BasicReject(basic::Reject {
                delivery_tag: 3,
                requeue: false,
            }),
        );
        settle(&mut m, now, id, ack(2));
        settle(&mut m, now, id, ack(4));
        written(&mut m);
        // 1 settles the prefix through 4, whose acks are written already.
        settle(&mut m, now, id, ack(1));
        assert_eq!(written_methods(&mut m), [ack(1)]);
        settle(&mut m, now, id, ack(5));
        assert_eq!(written_methods(&mut m), [ack(5)]);
    }

    #[test]
    fn a_transaction_channel_sends_every_settlement_as_it_is() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let (reply, _answer) = oneshot::channel();
        m.command(
            Command::Rpc {
                channel: id,
                method: Box::new(Method::TxSelect(crate::protocol::methods::tx::Select {})),
                reply,
            },
            now,
        );
        written(&mut m);
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::TxSelectOk(crate::protocol::methods::tx::SelectOk {}),
        })
        .expect("select-ok");
        let _deliveries = consume_and_deliver(&mut m, now, id, false, 1..=3);
        for tag in 1..=3 {
            settle(&mut m, now, id, ack(tag));
        }
        // A rollback would make them unacknowledged again: no widening.
        assert_eq!(written_methods(&mut m), [ack(1), ack(2), ack(3)]);
    }

    #[test]
    fn acks_of_no_ack_deliveries_are_passed_through_for_the_broker_to_refuse() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        // A no-ack consumer: its tags are not outstanding; an ack of one is
        // passed through for the broker to refuse.
        let _deliveries = consume_and_deliver(&mut m, now, id, true, 1..=3);
        settle(&mut m, now, id, ack(2));
        assert_eq!(written_methods(&mut m), [ack(2)]);
    }

    #[test]
    fn forgetting_a_no_ack_consumer_cancels_it_without_nacking_its_deliveries() {
        for no_ack in [true, false] {
            let now = Instant::now();
            let (mut m, _) = machine(now);
            let id = open_channel(&mut m, now);
            let _deliveries = consume_and_deliver(&mut m, now, id, no_ack, 1..=3);
            m.handle_frame(Frame::Method {
                channel: id,
                method: Method::BasicConsumeOk(basic::ConsumeOk {
                    consumer_tag: ShortString::from_static("t"),
                }),
            })
            .expect("consume-ok");
            // What a dropped consumer that buffered 2 and 3 asks for.
            m.command(
                Command::ForgetConsumer {
                    channel: id,
                    tag: ShortString::from_static("t"),
                    requeue: vec![2, 3],
                },
                now,
            );
            let sent = written_methods(&mut m);
            let nacked: Vec<u64> = sent
                .iter()
                .filter_map(|method| match method {
                    Method::BasicNack(nack) if nack.requeue => Some(nack.delivery_tag),
                    _ => None,
                })
                .collect();
            // The broker closes the channel (406) on a nack of a no-ack tag.
            let expected: &[u64] = if no_ack { &[] } else { &[2, 3] };
            assert_eq!(nacked, expected, "no_ack: {no_ack}; sent {sent:?}");
            assert!(
                sent.iter()
                    .any(|method| matches!(method, Method::BasicCancel(_))),
                "no_ack: {no_ack}; sent {sent:?}"
            );
        }
    }

    #[test]
    fn a_long_body_on_one_channel_does_not_hold_back_another() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let a = open_channel(&mut m, now);
        let b = open_channel(&mut m, now);
        let publish = |channel, body: Bytes| Command::Publish {
            channel,
            head: publish_head(channel, body.len() as u64),
            body: PublishBody(body),
            confirm: None,
            credit: None,
        };
        m.command(publish(a, Bytes::from(vec![0u8; 100_000])), now);
        m.command(publish(b, Bytes::from_static(b"small")), now);
        let frames = written(&mut m);
        let small_done = frames
            .iter()
            .position(|f| matches!(f, Frame::Body { channel, .. } if *channel == b))
            .expect("small body sent");
        let large_bodies_before = frames[..small_done]
            .iter()
            .filter(|f| matches!(f, Frame::Body { channel, .. } if *channel == a))
            .count();
        assert!(
            large_bodies_before <= 1,
            "the small message waited for {large_bodies_before} frames of the large one"
        );
        let large_total: usize = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Body { channel, payload } if *channel == a => Some(payload.len()),
                _ => None,
            })
            .sum();
        assert_eq!(large_total, 100_000);
    }

    #[test]
    fn heartbeats_are_sent_when_idle_and_silence_kills_the_connection() {
        let start = Instant::now();
        let (mut m, error) = machine(start);
        assert_eq!(m.next_timeout(), Some(start + Duration::from_secs(5)));
        m.handle_timeout(start + Duration::from_secs(5));
        assert_eq!(written(&mut m), vec![Frame::Heartbeat]);
        m.on_sent(start + Duration::from_secs(5));
        m.on_received(start + Duration::from_secs(12));
        m.handle_timeout(start + Duration::from_secs(21));
        assert!(!m.is_closed(), "heard from the peer 9 s ago");
        m.handle_timeout(start + Duration::from_secs(32));
        assert!(m.is_closed());
        assert!(matches!(error.get(), Some(Error::MissedHeartbeats(_))));
    }

    #[test]
    fn a_broker_channel_close_fails_the_pending_call_with_its_reason_and_frees_the_id() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let (reply, mut answer) = oneshot::channel();
        m.command(
            Command::Rpc {
                channel: id,
                method: Box::new(declare("missing")),
                reply,
            },
            now,
        );
        written(&mut m);
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::ChannelClose(channel::Close {
                reply_code: 404,
                reply_text: ShortString::from_static("NOT_FOUND - no queue 'missing'"),
                class_id: 50,
                method_id: 10,
            }),
        })
        .expect("close");
        let err = answer.try_recv().expect("answered").expect_err("failed");
        assert_eq!(
            err.reply_error(),
            Some(crate::protocol::ReplyError::NotFound)
        );
        assert!(matches!(
            written(&mut m).as_slice(),
            [Frame::Method {
                method: Method::ChannelCloseOk(_),
                ..
            }]
        ));
        assert_eq!(open_channel(&mut m, now), id, "the id is recycled");
    }

    #[test]
    fn a_body_buffer_grows_with_what_arrives_not_with_what_the_header_announces() {
        // Two small frames of a body announced at 128 MiB.
        let announced = 128 << 20;
        let mut body = BodyBuffer::Empty;
        body.push(Bytes::from(vec![1u8; 1000]), announced);
        body.push(Bytes::from(vec![2u8; 1000]), announced);
        let BodyBuffer::Many(joined) = &body else {
            panic!("two frames are joined");
        };
        assert!(
            joined.capacity() <= 4 * 2000,
            "{} bytes reserved for 2000 received",
            joined.capacity()
        );

        // A large body in 128 KiB frames: a few doublings, and a buffer of
        // exactly its size in the end.
        let size = 3_000_000;
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut body = BodyBuffer::Empty;
        let mut capacities = Vec::new();
        for chunk in data.chunks(131_064) {
            body.push(Bytes::copy_from_slice(chunk), size);
            if let BodyBuffer::Many(joined) = &body {
                if capacities.last() != Some(&joined.capacity()) {
                    capacities.push(joined.capacity());
                }
            }
        }
        assert_eq!(capacities.last(), Some(&size), "{capacities:?}");
        assert!(capacities.len() <= 5, "{capacities:?}");
        assert_eq!(body.into_bytes(), data);
    }

    /// Puts channel `id` in confirm mode.
    /// The broker confirms publishes up to `delivery_tag`.
    fn broker_acks(
        m: &mut Machine,
        id: u16,
        delivery_tag: u64,
        multiple: bool,
    ) -> Result<(), Error> {
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::BasicAck(basic::Ack {
                delivery_tag,
                multiple,
            }),
        })
    }

    fn confirm_mode(m: &mut Machine, now: Instant, id: u16) {
        let (select, _answer) = oneshot::channel();
        m.command(
            Command::Rpc {
                channel: id,
                method: Box::new(Method::ConfirmSelect(confirm::Select { no_wait: false })),
                reply: select,
            },
            now,
        );
        written(m);
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::ConfirmSelectOk(confirm::SelectOk {}),
        })
        .expect("select-ok");
    }

    /// Publishes an empty message on `id`; its confirmation, if asked.
    fn publish_one(
        m: &mut Machine,
        now: Instant,
        id: u16,
        confirm: bool,
    ) -> Option<oneshot::Receiver<Result<Confirmation, Error>>> {
        let (tx, rx) = oneshot::channel();
        m.command(
            Command::Publish {
                channel: id,
                head: publish_head(id, 0),
                body: PublishBody(Bytes::new()),
                confirm: confirm.then_some(tx),
                credit: None,
            },
            now,
        );
        confirm.then_some(rx)
    }

    /// The broker returns a message on `id` (a `basic.return` and its header).
    fn broker_returns(m: &mut Machine, id: u16) -> Result<(), Error> {
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::BasicReturn(basic::Return {
                reply_code: 312,
                reply_text: ShortString::from_static("NO_ROUTE"),
                exchange: ShortString::default(),
                routing_key: ShortString::from_static("nowhere"),
            }),
        })?;
        m.handle_frame(Frame::Header {
            channel: id,
            header: ContentHeader {
                class_id: 60,
                body_size: 0,
                properties: ReceivedProperties::default(),
            },
        })
    }

    #[test]
    fn more_returns_waiting_than_publishes_pending_is_a_protocol_error() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        confirm_mode(&mut m, now, id);
        let _answer = publish_one(&mut m, now, id, true).expect("confirm mode");
        written(&mut m);
        broker_returns(&mut m, id).expect("the return of the pending publish");
        let err = broker_returns(&mut m, id).expect_err("a second return for one publish");
        assert!(
            matches!(&err, Error::UnexpectedFrame(text) if text.contains("basic.return")),
            "{err:?}"
        );

        // With nothing pending at all, the first return is already one too many.
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        confirm_mode(&mut m, now, id);
        let err = broker_returns(&mut m, id).expect_err("a return with no publish pending");
        assert!(matches!(err, Error::UnexpectedFrame(_)), "{err:?}");

        // The well-behaved order still gives the returned message to its publish.
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        confirm_mode(&mut m, now, id);
        let mut answer = publish_one(&mut m, now, id, true).expect("confirm mode");
        written(&mut m);
        broker_returns(&mut m, id).expect("return");
        broker_acks(&mut m, id, 1, false).expect("ack");
        assert!(matches!(
            answer.try_recv().expect("settled"),
            Ok(Confirmation::Returned(_))
        ));
    }

    #[test]
    fn a_return_of_a_publish_sent_before_confirm_select_is_not_taken_for_a_confirm() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let (returns, mut returned) = mpsc::channel(4);
        m.command(
            Command::SetReturns {
                channel: id,
                returns,
            },
            now,
        );
        // A mandatory publish, then confirm.select at once: the broker
        // returns the publish before it answers select-ok.
        publish_one(&mut m, now, id, false);
        let (select, _answer) = oneshot::channel();
        m.command(
            Command::Rpc {
                channel: id,
                method: Box::new(Method::ConfirmSelect(confirm::Select { no_wait: false })),
                reply: select,
            },
            now,
        );
        written(&mut m);
        broker_returns(&mut m, id).expect("a return of the earlier publish");
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::ConfirmSelectOk(confirm::SelectOk {}),
        })
        .expect("select-ok");
        assert!(returned.try_recv().is_ok(), "it went to the returns stream");
        let mut answer = publish_one(&mut m, now, id, true).expect("confirm mode");
        written(&mut m);
        broker_acks(&mut m, id, 1, false).expect("ack");
        assert_eq!(
            answer.try_recv().expect("settled").expect("ok"),
            Confirmation::Ack,
            "the first publish in confirm mode was not returned"
        );
    }

    #[test]
    fn returns_left_over_by_a_multiple_ack_do_not_wait_for_later_publishes() {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        confirm_mode(&mut m, now, id);
        publish_one(&mut m, now, id, true);
        publish_one(&mut m, now, id, true);
        written(&mut m);
        broker_returns(&mut m, id).expect("return 1");
        broker_returns(&mut m, id).expect("return 2");
        broker_acks(&mut m, id, 2, true).expect("one ack for both");
        // The next publish is routed and acked: nothing returned is left to
        // pin on it, and its own return would be accepted.
        let mut answer = publish_one(&mut m, now, id, true).expect("confirm mode");
        written(&mut m);
        broker_acks(&mut m, id, 3, false).expect("ack");
        assert_eq!(
            answer.try_recv().expect("settled").expect("ok"),
            Confirmation::Ack
        );
    }

    #[test]
    fn a_flood_of_channel_flow_is_answered_by_one_flow_ok_with_the_latest_state() {
        let now = Instant::now();
        let (mut m, _) = machine_with(now, Blocked::new().0, true);
        let id = open_channel(&mut m, now);
        let flow = |active| Frame::Method {
            channel: id,
            method: Method::ChannelFlow(channel::Flow { active }),
        };
        for i in 0..10_000 {
            m.handle_frame(flow(i % 2 == 0)).expect("flow");
        }
        let queued = m.channels.get(&id).map(|c| c.out.len());
        assert_eq!(queued, Some(1), "one flow-ok waits, not 10000");
        assert_eq!(
            written_methods(&mut m),
            [Method::ChannelFlowOk(channel::FlowOk { active: false })],
            "it answers the latest request"
        );
        // Once written, the next request is answered again.
        m.handle_frame(flow(true)).expect("flow");
        assert_eq!(
            written_methods(&mut m),
            [Method::ChannelFlowOk(channel::FlowOk { active: true })]
        );
        assert!(written(&mut m).is_empty());

        // A flow-ok lost with the connection, unwritten, does not silence
        // the next one on the recovered channel.
        m.handle_frame(flow(false)).expect("flow");
        m.connection_lost(Error::ConnectionLost(Arc::new(std::io::Error::other(
            "gone",
        ))));
        m.resume(8, 4096, Duration::from_secs(10), now);
        assert!(matches!(
            written_methods(&mut m).as_slice(),
            [Method::ChannelOpen(_)]
        ));
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::ChannelOpenOk(channel::OpenOk {}),
        })
        .expect("open-ok");
        m.handle_frame(flow(true))
            .expect("flow on the new connection");
        assert_eq!(
            written_methods(&mut m),
            [Method::ChannelFlowOk(channel::FlowOk { active: true })]
        );
    }
}
