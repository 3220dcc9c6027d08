//! The connection state machine driven the way the I/O task (`io.rs`) drives
//! it, by a fuzz input read as a program.
//!
//! The program plays three parts. The application queues commands, as the
//! handles do (with their checks: a closed channel is not asked anything, a
//! method over `frame_max` is refused before it is queued). The broker writes
//! bytes: frames built from what the machine asked of it (replies in order,
//! deliveries to the consumers it knows, confirms of the publishes it saw) or
//! raw bytes from the input. The I/O task decodes and hands over what was
//! read, takes the queued commands after each event, writes with a budget,
//! lets time pass, loses the socket and resumes on a new one.
//!
//! A program's first 7 bytes set the connection up (frame_max, channel_max,
//! heartbeat, close timeout, max body size, recovery and topology recovery);
//! then each step is a byte that picks an `Op` (through `OPS`) followed by
//! the bytes its details need. Past the end of the input every byte reads as
//! 0, so any prefix of a program is a program, and the fuzzer's mutations
//! keep most of a program's meaning.
//!
//! What is checked, besides "no panic":
//!
//! - every frame the machine writes decodes and is within `frame_max`, and
//!   every write stops at a frame boundary;
//! - the machine writes nothing on a channel before `channel.open` on that
//!   socket or after the channel's close handshake (but `close-ok`), and
//!   never opens a channel twice;
//! - once closed or interrupted, the machine writes what it held then (the
//!   last flush) and nothing more until it has a new socket;
//! - every ack, nack or reject the machine writes names a delivery tag the
//!   broker holds unsettled (RabbitMQ closes the channel with 406 otherwise),
//!   on channels whose settlements the application left to it;
//! - a broker ack or nack settles exactly the publishes it names, with the
//!   broker's verdict, and nothing else settles a publish;
//! - replies answer their requests, a channel id is not handed out while a
//!   handle still has it open, deliveries reach the consumer they name, and
//!   a consumer's stream does not end without a reason;
//! - after the connection fails, every reply sender was answered or dropped,
//!   every consumer's and returns' stream has ended, every publish's credit
//!   is back, and later commands are refused at once.
//!
//! Memory is bounded by the harness: a program has at most `MAX_STEPS`
//! steps, and what it lets accumulate (channels, consumers, unsettled
//! deliveries, queued commands) is capped.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{mpsc, oneshot};

use crate::credit::PublishBudget;
use crate::error::Error;
use crate::events::{Confirmation, ReturnedMessage};
use crate::machine::{ChannelRef, PublishBody, RawDelivery, Reply, Settings, Settlement};
use crate::ports::{route, Command, Machine, Signals};
use crate::protocol::frame::{self, Frame, FrameDecoder, FRAME_OVERHEAD};
use crate::protocol::methods::{basic, channel, confirm, connection, exchange, queue, tx, Method};
use crate::protocol::{
    BasicProperties, FieldTable, FieldValue, MethodInfo, ReplyCode, ShortString,
};

use super::support::{expects_reply, short};

/// Steps of one program at most.
const MAX_STEPS: usize = 4096;
/// Channel handles, consumers and returns streams the application keeps at most.
const MAX_CHANNELS: usize = 32;
const MAX_CONSUMERS: usize = 16;
const MAX_RETURNS: usize = 4;
/// Deliveries the application holds unsettled at most (the oldest is forgotten).
const MAX_RECEIVED: usize = 64;
/// Commands queued at most; a handle would wait for room.
const MAX_QUEUED: usize = 64;
/// Bytes of one raw write by the broker at most.
const MAX_RAW: usize = 64;
/// The publish budget: publishers wait beyond it (here: do not publish).
const PUBLISH_BUDGET: u64 = 4 << 20;

const QUEUES: [&str; 3] = ["", "q1", "q2"];
const EXCHANGES: [&str; 3] = ["x1", "x2", "amq.direct"];
const STREAM_OFFSET: &str = "x-stream-offset";

/// Runs the program `data` (any bytes are a program) against a machine set up
/// as after a handshake, checking the properties in the module doc; a
/// violation panics.
pub fn run_machine(data: &[u8]) {
    run(data);
}

/// What a program reached, for the tests to check that the harness still
/// gets where it should.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Reached {
    frames_written: usize,
    channels_opened: usize,
    replies_checked: usize,
    deliveries_received: usize,
    settlements_checked: usize,
    confirms_checked: usize,
    resumes: usize,
}

fn run(data: &[u8]) -> Reached {
    let mut input = Choices { data };
    let mut harness = Harness::new(&mut input);
    for _ in 0..MAX_STEPS {
        if input.data.is_empty() {
            break;
        }
        harness.step(&mut input);
    }
    harness.finish()
}

/// The input, read as a stream of small decisions. Once it is used up every
/// read gives 0, so that any prefix of a program is a program.
struct Choices<'a> {
    data: &'a [u8],
}

impl Choices<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&first, rest)) = self.data.split_first() else {
            return 0;
        };
        self.data = rest;
        first
    }

    fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// True one time in `n`.
    fn one_in(&mut self, n: u8) -> bool {
        self.byte() % n == n - 1
    }

    /// A number below `n` (which is at most 256).
    fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n.max(1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1).min(self.data.len());
        let (taken, rest) = self.data.split_at(n);
        self.data = rest;
        taken.to_vec()
    }
}

/// The steps a program is made of; a step's first byte picks one (modulo
/// the table's length), the next bytes its details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    // The application: commands go to the queue, or to the control queue.
    OpenChannel,
    CloseChannel,
    CallTimeout,
    Call,
    SendNoWait,
    Publish,
    Consume,
    DropConsumer,
    Receive,
    Settle,
    WaitForConfirms,
    SetReturns,
    UpdateSecret,
    CloseConnection,
    AbandonCall,
    // The broker.
    Reply,
    Deliver,
    Confirm,
    BrokerOther,
    RawBytes,
    // The I/O task.
    TakeCommands,
    TakeControl,
    Write,
    Wait,
    /// Loses the socket, or (without one) resumes on a new one.
    LoseSocket,
}

/// How many of the 64 values of a step's first byte pick each op: the common
/// steps have more, the ones that end a connection (raw bytes, a close, a
/// lost socket) few, so that programs get somewhere before it ends.
const WEIGHTS: [(Op, usize); 25] = [
    (Op::OpenChannel, 3),
    (Op::CloseChannel, 1),
    (Op::CallTimeout, 1),
    (Op::Call, 5),
    (Op::SendNoWait, 2),
    (Op::Publish, 4),
    (Op::Consume, 2),
    (Op::DropConsumer, 1),
    (Op::Receive, 3),
    (Op::Settle, 3),
    (Op::WaitForConfirms, 1),
    (Op::SetReturns, 1),
    (Op::UpdateSecret, 1),
    (Op::CloseConnection, 1),
    (Op::AbandonCall, 1),
    (Op::Reply, 8),
    (Op::Deliver, 4),
    (Op::Confirm, 3),
    (Op::BrokerOther, 2),
    (Op::RawBytes, 1),
    (Op::TakeCommands, 3),
    (Op::TakeControl, 2),
    (Op::Write, 6),
    (Op::Wait, 2),
    (Op::LoseSocket, 3),
];

/// Op by first byte (modulo 64), from `WEIGHTS`.
const OPS: [Op; 64] = {
    let mut table = [Op::Write; 64];
    let mut at = 0;
    let mut i = 0;
    while i < WEIGHTS.len() {
        let (op, weight) = WEIGHTS[i];
        let mut n = 0;
        while n < weight {
            table[at] = op;
            at += 1;
            n += 1;
        }
        i += 1;
    }
    assert!(at == table.len(), "the weights add up to 64");
    table
};

fn op_of(byte: u8) -> Op {
    OPS[usize::from(byte) % OPS.len()]
}

/// A channel handle of the application.
struct AppChannel {
    id: u16,
    target: ChannelRef,
    closed: Arc<OnceLock<Error>>,
    epoch: Arc<AtomicU64>,
    /// Set once its `confirm.select` was answered, as `Channel` does.
    confirm_mode: bool,
}

/// A call whose answer the application awaits.
enum Call {
    Open {
        answer: oneshot::Receiver<Result<ChannelRef, Error>>,
        closed: Arc<OnceLock<Error>>,
        epoch: Arc<AtomicU64>,
    },
    Rpc {
        /// Index into `Harness::channels`.
        channel: usize,
        request: &'static MethodInfo,
        /// For a `basic.get`: whether it asked for no ack.
        get_no_ack: Option<bool>,
        /// For a `basic.consume`: the consumer's id.
        consumer: Option<u64>,
        answer: oneshot::Receiver<Result<Reply, Error>>,
    },
    Confirms {
        channel: usize,
        answer: oneshot::Receiver<Result<bool, Error>>,
    },
    Done {
        /// Index into `Harness::channels`, for a channel's close.
        channel: Option<usize>,
        answer: oneshot::Receiver<Result<(), Error>>,
    },
}

impl Call {
    fn channel(&self) -> Option<usize> {
        match self {
            Call::Open { .. } => None,
            Call::Rpc { channel, .. } | Call::Confirms { channel, .. } => Some(*channel),
            Call::Done { channel, .. } => *channel,
        }
    }
}

/// The outcome of a publish in confirm mode, awaited.
struct AwaitedConfirm {
    publish: u64,
    channel: u16,
    answer: oneshot::Receiver<Result<Confirmation, Error>>,
    /// Whether the broker's confirms on its channel can be attributed (a
    /// broker that confirms publishes it never saw makes them unknowable).
    attributable: bool,
}

struct AppConsumer {
    id: u64,
    /// Index into `Harness::channels`.
    channel: usize,
    tag: ShortString,
    no_ack: bool,
    receiver: mpsc::Receiver<RawDelivery>,
    end: Arc<OnceLock<Error>>,
    /// Its `basic.consume` was answered with consume-ok.
    started: bool,
}

/// A delivery the application holds and has not settled.
struct Received {
    channel: usize,
    tag: u64,
    epoch: u64,
}

/// One socket, as the broker sees it.
struct Socket {
    /// Bytes from the broker the machine has not taken yet.
    inbound: BytesMut,
    decoder: FrameDecoder,
    /// What the machine wrote, decoded by the broker's decoder.
    outbound: BytesMut,
    broker_decoder: FrameDecoder,
    /// Channels open on this socket.
    channels: BTreeMap<u16, WireChannel>,
    /// Connection requests (channel 0) the broker has not answered.
    connection_requests: VecDeque<Method>,
    /// Names of server-named queues given so far.
    server_named: u32,
}

impl Socket {
    fn new(frame_max: u32) -> Self {
        Self {
            inbound: BytesMut::new(),
            decoder: FrameDecoder::new(frame_max),
            outbound: BytesMut::new(),
            broker_decoder: FrameDecoder::new(frame_max),
            channels: BTreeMap::new(),
            connection_requests: VecDeque::new(),
            server_named: 0,
        }
    }
}

/// A channel as the broker sees it.
#[derive(Default)]
struct WireChannel {
    /// Requests not answered yet, oldest first.
    requests: VecDeque<Method>,
    /// Consumer tag → no-ack.
    consumers: BTreeMap<ShortString, bool>,
    /// The last delivery tag generated, and the last one the machine took.
    generated_tag: u64,
    taken_tag: u64,
    /// Tags delivered and not settled yet.
    outstanding: BTreeSet<u64>,
    /// The model no longer knows which tags are outstanding (transactions,
    /// `basic.recover`, tags out of order, a delivery to a consumer the
    /// broker does not know).
    untracked: bool,
    get_no_ack: bool,
    /// Publishes numbered since `confirm.select`.
    confirms: Option<WireConfirms>,
    /// A `basic.publish` was written; its header comes next.
    publishing: bool,
    stream_offset: i64,
}

struct WireConfirms {
    next_seq: u64,
    /// Sequence number → the application's publish id.
    unconfirmed: BTreeMap<u64, u64>,
}

impl WireChannel {
    /// The machine took a delivery (or get-ok) of `tag`; `outstanding` is
    /// `None` when the broker would not have sent it.
    fn delivered(&mut self, tag: u64, outstanding: Option<bool>) {
        if tag <= self.taken_tag {
            self.untracked = true;
        }
        self.taken_tag = self.taken_tag.max(tag);
        match outstanding {
            Some(true) => {
                self.outstanding.insert(tag);
            }
            Some(false) => {}
            None => self.untracked = true,
        }
    }

    fn next_tag(&mut self) -> u64 {
        self.generated_tag += 1;
        self.generated_tag
    }
}

fn lost(what: &str) -> Error {
    Error::ConnectionLost(Arc::new(std::io::Error::other(what.to_owned())))
}

struct Harness {
    machine: Machine,
    signals: Signals,
    now: Instant,
    frame_max: u32,
    channel_max: u16,
    error: Arc<OnceLock<Error>>,
    budget: Arc<PublishBudget>,
    socket: Option<Socket>,
    commands: VecDeque<Command>,
    control: VecDeque<Command>,
    channels: Vec<AppChannel>,
    calls: Vec<Call>,
    confirms: Vec<AwaitedConfirm>,
    consumers: Vec<AppConsumer>,
    returns: Vec<mpsc::Receiver<ReturnedMessage>>,
    received: VecDeque<Received>,
    /// Channel ids on which the application chose tags itself (a `multiple`
    /// settlement, an ack by tag): their settlements are the application's
    /// business, not checked.
    free_settlements: HashSet<u16>,
    next_publish: u64,
    next_consumer: u64,
    reached: Reached,
    /// `AMQP_FUZZ_TRACE` is set: each step and frame is printed, to read
    /// what a failing input did.
    trace: bool,
}

impl Harness {
    fn new(input: &mut Choices<'_>) -> Self {
        let now = Instant::now();
        let frame_max = input.pick(&[4096, 4096, 8192, 131_072, u32::MAX]);
        let channel_max = input.pick(&[1, 2, 3, 8]);
        let settings = Settings {
            channel_max,
            frame_max,
            heartbeat: Duration::from_secs(input.pick(&[0, 1, 10, 60])),
            close_timeout: Duration::from_secs(input.pick(&[1, 5])),
            max_body_size: input.pick(&[16, 300_000, 2 << 20, 2 << 20]),
            recover: input.flag(),
            recover_topology: input.flag(),
        };
        let error = Arc::new(OnceLock::new());
        let machine = Machine::new(settings, now, error.clone());
        Self {
            machine,
            // The receivers of the signals and events are not needed: the
            // machine must work without anyone listening.
            signals: Signals::unobserved(),
            now,
            frame_max,
            channel_max,
            error,
            budget: PublishBudget::new(PUBLISH_BUDGET),
            socket: Some(Socket::new(frame_max)),
            commands: VecDeque::new(),
            control: VecDeque::new(),
            channels: Vec::new(),
            calls: Vec::new(),
            confirms: Vec::new(),
            consumers: Vec::new(),
            returns: Vec::new(),
            received: VecDeque::new(),
            free_settlements: HashSet::new(),
            next_publish: 0,
            next_consumer: 0,
            reached: Reached::default(),
            trace: std::env::var_os("AMQP_FUZZ_TRACE").is_some(),
        }
    }

    fn step(&mut self, input: &mut Choices<'_>) {
        let op = op_of(input.byte());
        if self.trace {
            let channels: Vec<_> = self
                .channels
                .iter()
                .map(|c| (c.id, c.target.incarnation, c.closed.get().is_some()))
                .collect();
            eprintln!("step {op:?}; channels (id, incarnation, closed): {channels:?}");
        }
        match op {
            Op::OpenChannel => self.open_channel(input),
            Op::CloseChannel => self.close_channel(input),
            Op::CallTimeout => self.call_timeout(input),
            Op::Call => self.call(input),
            Op::SendNoWait => self.send_no_wait(input),
            Op::Publish => self.publish(input),
            Op::Consume => self.consume(input),
            Op::DropConsumer => self.drop_consumer(input),
            Op::Receive => self.receive(input),
            Op::Settle => self.settle(input),
            Op::WaitForConfirms => self.wait_for_confirms(input),
            Op::SetReturns => self.set_returns(input),
            Op::UpdateSecret => self.update_secret(input),
            Op::CloseConnection => self.close_connection(input),
            Op::AbandonCall => self.abandon_call(input),
            Op::Reply => self.broker_reply(input),
            Op::Deliver => self.broker_deliver(input),
            Op::Confirm => self.broker_confirm(input),
            Op::BrokerOther => self.broker_other(input),
            Op::RawBytes => self.broker_raw(input),
            Op::TakeCommands => {}
            Op::TakeControl => self.take_control(),
            Op::Write => {
                let budget = input.pick(&[1, 100, 4096, 256 * 1024, usize::MAX]);
                self.write(budget);
            }
            Op::Wait => self.wait(input),
            Op::LoseSocket => self.lose_or_resume(input),
        }
        // The application's steps only queue; the I/O task's take effect now
        // and are followed, as in `Driver::run_session`, by the commands
        // queued meanwhile.
        let io_event = !matches!(
            op,
            Op::OpenChannel
                | Op::CloseChannel
                | Op::CallTimeout
                | Op::Call
                | Op::SendNoWait
                | Op::Publish
                | Op::Consume
                | Op::Settle
                | Op::WaitForConfirms
                | Op::SetReturns
                | Op::UpdateSecret
                | Op::CloseConnection
                | Op::AbandonCall
        );
        if io_event {
            self.after_io_event();
        }
        self.route();
        self.poll_calls();
    }

    /// Delivers what the machine produced, as `Driver::route` does.
    fn route(&mut self) {
        route(&mut self.machine, &self.signals);
    }

    // The application.

    /// A handle of a channel that is not known to be closed (its calls fail
    /// at once otherwise, without a command).
    fn usable_channel(&mut self, input: &mut Choices<'_>) -> Option<usize> {
        if self.channels.is_empty() {
            return None;
        }
        let index = input.below(self.channels.len());
        let channel = &self.channels[index];
        (channel.closed.get().is_none() && self.error.get().is_none()).then_some(index)
    }

    fn queue(&mut self, command: Command) -> bool {
        if self.commands.len() >= MAX_QUEUED {
            return false;
        }
        self.commands.push_back(command);
        true
    }

    /// Whether the handle would refuse `method` as over `frame_max`.
    fn too_large(&self, channel: u16, method: &Method) -> bool {
        let mut buf = BytesMut::new();
        frame::write_method(&mut buf, channel, method);
        buf.len() > self.frame_max as usize
    }

    fn open_channel(&mut self, input: &mut Choices<'_>) {
        if self.error.get().is_some() || self.channels.len() >= MAX_CHANNELS {
            return;
        }
        let closed = Arc::new(OnceLock::new());
        let epoch = Arc::new(AtomicU64::new(0));
        let (reply, answer) = oneshot::channel();
        let queued = self.queue(Command::OpenChannel {
            closed: closed.clone(),
            epoch: epoch.clone(),
            hook_owned: input.one_in(8),
            reply,
        });
        if queued {
            self.calls.push(Call::Open {
                answer,
                closed,
                epoch,
            });
        }
    }

    /// `Channel::close` (queued, awaited) or the drop of the last handle
    /// (through the control queue).
    fn close_channel(&mut self, input: &mut Choices<'_>) {
        let Some(index) = self.usable_channel(input) else {
            return;
        };
        if input.flag() {
            let (reply, answer) = oneshot::channel();
            if self.queue(Command::CloseChannel {
                channel: self.channels[index].target,
                reply: Some(reply),
            }) {
                self.calls.push(Call::Done {
                    channel: Some(index),
                    answer,
                });
            }
        } else {
            self.control.push_back(Command::CloseChannel {
                channel: self.channels[index].target,
                reply: None,
            });
        }
    }

    /// A call on a channel timed out: the caller stops waiting and the
    /// channel is closed, as `Channel::answer` does.
    fn call_timeout(&mut self, input: &mut Choices<'_>) {
        let waiting: Vec<usize> = (0..self.calls.len())
            .filter(|&i| self.calls[i].channel().is_some())
            .collect();
        if waiting.is_empty() {
            return;
        }
        let call = self.calls.swap_remove(waiting[input.below(waiting.len())]);
        let Some(index) = call.channel() else {
            return;
        };
        drop(call);
        let channel = &self.channels[index];
        let timeout = Error::CallTimeout {
            call: "fuzzed call",
            timeout: Duration::from_secs(1),
        };
        if channel.closed.set(timeout).is_ok() {
            self.control.push_back(Command::CloseChannel {
                channel: channel.target,
                reply: None,
            });
        }
    }

    /// A caller stopped waiting (its future was dropped).
    fn abandon_call(&mut self, input: &mut Choices<'_>) {
        if !self.calls.is_empty() {
            let index = input.below(self.calls.len());
            self.calls.swap_remove(index);
        }
    }

    fn arguments(&mut self, input: &mut Choices<'_>) -> FieldTable {
        let mut arguments = FieldTable::new();
        if input.flag() {
            return arguments;
        }
        if input.flag() {
            arguments.insert(short("x-queue-type"), "stream");
        }
        // Near `frame_max`, so that what the machine adds on its own (a
        // stream offset) may push a frame over it.
        let padding = input.pick(&[0, 100, 3900, 3990, 4000, 4010, 4030, 4050]);
        if padding > 0 {
            arguments.insert(short("x-padding"), "p".repeat(padding).as_str());
        }
        arguments
    }

    fn queue_name(&mut self, input: &mut Choices<'_>) -> ShortString {
        short(input.pick(&QUEUES))
    }

    fn exchange_name(&mut self, input: &mut Choices<'_>) -> ShortString {
        short(input.pick(&EXCHANGES))
    }

    /// A consumer tag of a consumer of the application on channel `index`,
    /// or one nobody uses.
    fn consumer_tag(&mut self, input: &mut Choices<'_>, index: usize) -> ShortString {
        let tags: Vec<ShortString> = self
            .consumers
            .iter()
            .filter(|c| c.channel == index)
            .map(|c| c.tag.clone())
            .collect();
        if tags.is_empty() || input.one_in(8) {
            return short("nobody");
        }
        tags[input.below(tags.len())].clone()
    }

    /// The synchronous generated `Channel` methods (what `Channel::rpc`
    /// sends), `basic.get` and `basic.cancel` included.
    fn request(&mut self, input: &mut Choices<'_>, index: usize) -> Method {
        match input.below(18) {
            0 | 1 => Method::QueueDeclare(queue::Declare {
                queue: self.queue_name(input),
                passive: input.one_in(4),
                durable: input.flag(),
                exclusive: input.flag(),
                auto_delete: input.flag(),
                no_wait: false,
                arguments: self.arguments(input),
            }),
            2 => Method::QueueBind(queue::Bind {
                queue: self.queue_name(input),
                exchange: self.exchange_name(input),
                routing_key: short("rk"),
                no_wait: false,
                arguments: self.arguments(input),
            }),
            3 => Method::QueueUnbind(queue::Unbind {
                queue: self.queue_name(input),
                exchange: self.exchange_name(input),
                routing_key: short("rk"),
                arguments: FieldTable::new(),
            }),
            4 => Method::QueuePurge(queue::Purge {
                queue: self.queue_name(input),
                no_wait: false,
            }),
            5 => Method::QueueDelete(queue::Delete {
                queue: self.queue_name(input),
                if_unused: input.flag(),
                if_empty: input.flag(),
                no_wait: false,
            }),
            6 => Method::ExchangeDeclare(exchange::Declare {
                exchange: self.exchange_name(input),
                kind: short("direct"),
                passive: input.one_in(4),
                durable: input.flag(),
                auto_delete: input.flag(),
                internal: false,
                no_wait: false,
                arguments: self.arguments(input),
            }),
            7 => Method::ExchangeDelete(exchange::Delete {
                exchange: self.exchange_name(input),
                if_unused: input.flag(),
                no_wait: false,
            }),
            8 => Method::ExchangeBind(exchange::Bind {
                destination: self.exchange_name(input),
                source: self.exchange_name(input),
                routing_key: short("rk"),
                no_wait: false,
                arguments: FieldTable::new(),
            }),
            9 => Method::ExchangeUnbind(exchange::Unbind {
                destination: self.exchange_name(input),
                source: self.exchange_name(input),
                routing_key: short("rk"),
                no_wait: false,
                arguments: FieldTable::new(),
            }),
            10 => Method::BasicQos(basic::Qos {
                prefetch_size: 0,
                prefetch_count: input.pick(&[0, 1, 10]),
                global: input.flag(),
            }),
            11 => Method::ConfirmSelect(confirm::Select { no_wait: false }),
            12 => Method::TxSelect(tx::Select {}),
            13 => Method::TxCommit(tx::Commit {}),
            14 => Method::BasicRecover(basic::Recover {
                requeue: input.flag(),
            }),
            15 => Method::ChannelFlow(channel::Flow {
                active: input.flag(),
            }),
            16 => Method::BasicCancel(basic::Cancel {
                consumer_tag: self.consumer_tag(input, index),
                no_wait: false,
            }),
            _ => Method::BasicGet(basic::Get {
                queue: self.queue_name(input),
                no_ack: input.flag(),
            }),
        }
    }

    fn call(&mut self, input: &mut Choices<'_>) {
        let Some(index) = self.usable_channel(input) else {
            return;
        };
        let method = self.request(input, index);
        let id = self.channels[index].id;
        if self.too_large(id, &method) {
            return;
        }
        let get_no_ack = match &method {
            Method::BasicGet(get) => Some(get.no_ack),
            _ => None,
        };
        let request = method.info();
        let (reply, answer) = oneshot::channel();
        if self.queue(Command::Rpc {
            channel: self.channels[index].target,
            method: Box::new(method),
            reply,
        }) {
            self.calls.push(Call::Rpc {
                channel: index,
                request,
                get_no_ack,
                consumer: None,
                answer,
            });
        }
    }

    /// The generated no-wait `Channel` methods (what `ChannelRpc::send` sends).
    fn send_no_wait(&mut self, input: &mut Choices<'_>) {
        let Some(index) = self.usable_channel(input) else {
            return;
        };
        let id = self.channels[index].id;
        let method = match input.below(11) {
            0 => Method::QueueDeclare(queue::Declare {
                queue: short(input.pick(&["q1", "q2"])),
                durable: input.flag(),
                auto_delete: input.flag(),
                no_wait: true,
                arguments: self.arguments(input),
                ..Default::default()
            }),
            1 => Method::QueueBind(queue::Bind {
                queue: self.queue_name(input),
                exchange: self.exchange_name(input),
                routing_key: short("rk"),
                no_wait: true,
                arguments: FieldTable::new(),
            }),
            2 => Method::QueuePurge(queue::Purge {
                queue: self.queue_name(input),
                no_wait: true,
            }),
            3 => Method::QueueDelete(queue::Delete {
                queue: self.queue_name(input),
                no_wait: true,
                ..Default::default()
            }),
            4 => Method::ExchangeDeclare(exchange::Declare {
                exchange: self.exchange_name(input),
                kind: short("fanout"),
                no_wait: true,
                ..Default::default()
            }),
            5 => Method::ExchangeDelete(exchange::Delete {
                exchange: self.exchange_name(input),
                if_unused: false,
                no_wait: true,
            }),
            6 => Method::ExchangeBind(exchange::Bind {
                destination: self.exchange_name(input),
                source: self.exchange_name(input),
                routing_key: short("rk"),
                no_wait: true,
                arguments: FieldTable::new(),
            }),
            7 => Method::BasicCancel(basic::Cancel {
                consumer_tag: self.consumer_tag(input, index),
                no_wait: true,
            }),
            8 => Method::BasicRecoverAsync(basic::RecoverAsync {
                requeue: input.flag(),
            }),
            9 => Method::ConfirmSelect(confirm::Select { no_wait: true }),
            _ => {
                // `basic_ack` and friends by tag: the application's own tags.
                self.free_settlements.insert(id);
                let delivery_tag = u64::from(input.byte());
                match input.below(3) {
                    0 => Method::BasicAck(basic::Ack {
                        delivery_tag,
                        multiple: input.flag(),
                    }),
                    1 => Method::BasicNack(basic::Nack {
                        delivery_tag,
                        multiple: input.flag(),
                        requeue: input.flag(),
                    }),
                    _ => Method::BasicReject(basic::Reject {
                        delivery_tag,
                        requeue: input.flag(),
                    }),
                }
            }
        };
        if !self.too_large(id, &method) {
            self.queue(Command::Send {
                channel: self.channels[index].target,
                method: Box::new(method),
            });
        }
    }

    fn body_size(&self, input: &mut Choices<'_>) -> usize {
        body_size(input, self.frame_max)
    }

    fn publish(&mut self, input: &mut Choices<'_>) {
        let Some(index) = self.usable_channel(input) else {
            return;
        };
        let id = self.channels[index].id;
        let size = self.body_size(input);
        let publish_id = self.next_publish;
        self.next_publish += 1;
        // The publish's id rides in its header, for the broker's side to
        // tell which publish a sequence number is.
        let properties = BasicProperties {
            message_id: Some(short(format!("p{publish_id}"))),
            ..Default::default()
        };
        let mut head = BytesMut::new();
        frame::write_publish_method(
            &mut head,
            id,
            &basic::Publish {
                exchange: self.exchange_name(input),
                routing_key: short("rk"),
                mandatory: input.flag(),
                immediate: false,
            },
        );
        frame::write_header(&mut head, id, size as u64, &properties);
        let Some(credit) = self.budget.try_credit((head.len() + size) as u64) else {
            return;
        };
        let (confirm, answer) = if self.channels[index].confirm_mode {
            let (sender, answer) = oneshot::channel();
            (Some(sender), Some(answer))
        } else {
            (None, None)
        };
        let queued = self.queue(Command::Publish {
            channel: self.channels[index].target,
            head: head.freeze(),
            body: PublishBody(Bytes::from(vec![b'b'; size])),
            confirm,
            credit: Some(credit),
        });
        if let (true, Some(answer)) = (queued, answer) {
            self.confirms.push(AwaitedConfirm {
                publish: publish_id,
                channel: id,
                answer,
                attributable: true,
            });
        }
    }

    fn consume(&mut self, input: &mut Choices<'_>) {
        if self.consumers.len() >= MAX_CONSUMERS {
            return;
        }
        let Some(index) = self.usable_channel(input) else {
            return;
        };
        let id = self.channels[index].id;
        let consumer = self.next_consumer;
        self.next_consumer += 1;
        let mut arguments = self.arguments(input);
        if input.flag() {
            arguments.insert(short(STREAM_OFFSET), "first");
        }
        let consume = basic::Consume {
            queue: self.queue_name(input),
            consumer_tag: short(format!("ctag-{id}.{consumer}")),
            no_local: false,
            no_ack: input.flag(),
            exclusive: input.one_in(4),
            no_wait: false,
            arguments,
        };
        if self.too_large(id, &Method::BasicConsume(consume.clone())) {
            return;
        }
        let (deliveries, receiver) = mpsc::channel(1 + input.below(3));
        let end = Arc::new(OnceLock::new());
        let (reply, answer) = oneshot::channel();
        let tag = consume.consumer_tag.clone();
        let no_ack = consume.no_ack;
        let queued = self.queue(Command::Consume {
            channel: self.channels[index].target,
            consume: Box::new(consume),
            deliveries,
            end: end.clone(),
            reply,
        });
        if queued {
            self.calls.push(Call::Rpc {
                channel: index,
                request: &basic::Consume::INFO,
                get_no_ack: None,
                consumer: Some(consumer),
                answer,
            });
            self.consumers.push(AppConsumer {
                id: consumer,
                channel: index,
                tag,
                no_ack,
                receiver,
                end,
                started: false,
            });
        }
    }

    /// The application drops a consumer: as `Consumer`'s `Drop`, what it
    /// had buffered goes back (unless no-ack or from before a reconnect).
    fn drop_consumer(&mut self, input: &mut Choices<'_>) {
        if self.consumers.is_empty() {
            return;
        }
        let mut consumer = self
            .consumers
            .swap_remove(input.below(self.consumers.len()));
        let channel = &self.channels[consumer.channel];
        let epoch = channel.epoch.load(Ordering::Acquire);
        let mut requeue = Vec::new();
        while let Ok(raw) = consumer.receiver.try_recv() {
            if !consumer.no_ack && raw.epoch == epoch {
                requeue.push(raw.deliver.delivery_tag);
            }
        }
        consumer.receiver.close();
        if consumer.end.get().is_none() || !requeue.is_empty() {
            self.control.push_back(Command::ForgetConsumer {
                channel: channel.target,
                tag: consumer.tag.clone(),
                requeue,
                requeue_epoch: epoch,
            });
        }
    }

    /// The application reads deliveries (and returned messages), which
    /// makes room in their buffers.
    fn receive(&mut self, input: &mut Choices<'_>) {
        for returns in &mut self.returns {
            while returns.try_recv().is_ok() {}
        }
        if self.consumers.is_empty() {
            return;
        }
        let index = input.below(self.consumers.len());
        let wanted = 1 + input.below(4);
        let consumer = &mut self.consumers[index];
        for _ in 0..wanted {
            match consumer.receiver.try_recv() {
                Ok(raw) => {
                    self.reached.deliveries_received += 1;
                    assert_eq!(
                        raw.deliver.consumer_tag, consumer.tag,
                        "a delivery reached another consumer than the one it names"
                    );
                    let epoch = self.channels[consumer.channel]
                        .epoch
                        .load(Ordering::Acquire);
                    assert!(raw.epoch <= epoch, "a delivery from a later epoch");
                    if !consumer.no_ack {
                        if self.received.len() >= MAX_RECEIVED {
                            self.received.pop_front();
                        }
                        self.received.push_back(Received {
                            channel: consumer.channel,
                            tag: raw.deliver.delivery_tag,
                            epoch: raw.epoch,
                        });
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    assert!(
                        !consumer.started || consumer.end.get().is_some(),
                        "consumer {} ended without a reason",
                        consumer.tag
                    );
                    break;
                }
            }
        }
    }

    /// The application acks, nacks or rejects a delivery it holds, as
    /// `Delivery` does (refused on a closed channel or a stale epoch).
    fn settle(&mut self, input: &mut Choices<'_>) {
        if self.received.is_empty() {
            return;
        }
        let index = input.below(self.received.len());
        let Some(held) = self.received.remove(index) else {
            return;
        };
        let channel = &self.channels[held.channel];
        if channel.closed.get().is_some()
            || self.error.get().is_some()
            || channel.epoch.load(Ordering::Acquire) != held.epoch
        {
            return;
        }
        let id = channel.id;
        let delivery_tag = held.tag;
        let settlement = match input.below(8) {
            0 => Settlement::Nack(basic::Nack {
                delivery_tag,
                multiple: false,
                requeue: input.flag(),
            }),
            1 => Settlement::Reject(basic::Reject {
                delivery_tag,
                requeue: input.flag(),
            }),
            2 if input.one_in(4) => {
                self.free_settlements.insert(id);
                Settlement::Ack(basic::Ack {
                    delivery_tag,
                    multiple: true,
                })
            }
            _ => Settlement::Ack(basic::Ack {
                delivery_tag,
                multiple: false,
            }),
        };
        // Settlements are not bounded by the queue's capacity.
        self.commands.push_back(Command::Settle {
            channel: id,
            settlement,
            epoch: held.epoch,
        });
    }

    fn wait_for_confirms(&mut self, input: &mut Choices<'_>) {
        let Some(index) = self.usable_channel(input) else {
            return;
        };
        let (reply, answer) = oneshot::channel();
        if self.queue(Command::WaitForConfirms {
            channel: self.channels[index].target,
            reply,
        }) {
            self.calls.push(Call::Confirms {
                channel: index,
                answer,
            });
        }
    }

    fn set_returns(&mut self, input: &mut Choices<'_>) {
        let Some(index) = self.usable_channel(input) else {
            return;
        };
        if self.returns.len() >= MAX_RETURNS {
            self.returns.remove(0);
        }
        let (returns, receiver) = mpsc::channel(1 + input.below(2));
        if self.queue(Command::SetReturns {
            channel: self.channels[index].target,
            returns,
        }) {
            self.returns.push(receiver);
        }
    }

    fn update_secret(&mut self, input: &mut Choices<'_>) {
        if self.error.get().is_some() {
            return;
        }
        let (reply, answer) = oneshot::channel();
        let method = connection::UpdateSecret {
            new_secret: Bytes::from(format!("secret-{}", input.byte())),
            reason: short("refresh"),
        };
        if self.queue(Command::UpdateSecret { method, reply }) {
            self.calls.push(Call::Done {
                channel: None,
                answer,
            });
        }
    }

    /// `Connection::close` (one time in four: it ends the program's
    /// connection, which is more interesting later).
    fn close_connection(&mut self, input: &mut Choices<'_>) {
        if self.error.get().is_some() || !input.one_in(4) {
            return;
        }
        let text = if input.one_in(4) {
            // Longer than a short string can hold.
            "x".repeat(300)
        } else {
            "closed by the application".to_owned()
        };
        self.control.push_back(Command::CloseConnection {
            code: ReplyCode::REPLY_SUCCESS,
            text,
        });
    }

    /// Checks the calls that were answered and acts on the answers as the
    /// handles do.
    fn poll_calls(&mut self) {
        let mut index = 0;
        while index < self.calls.len() {
            if self.poll_call(index) {
                self.calls.swap_remove(index);
            } else {
                index += 1;
            }
        }
        let mut index = 0;
        while index < self.confirms.len() {
            let awaited = &mut self.confirms[index];
            match awaited.answer.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => index += 1,
                Ok(Ok(outcome)) if awaited.attributable => panic!(
                    "publish {} on channel {} settled as {outcome:?} though the broker confirmed nothing of it",
                    awaited.publish, awaited.channel
                ),
                _ => {
                    self.confirms.swap_remove(index);
                }
            }
        }
    }

    /// Whether call `index` is over (answered, or its sender dropped).
    fn poll_call(&mut self, index: usize) -> bool {
        match &mut self.calls[index] {
            Call::Open {
                answer,
                closed,
                epoch,
            } => match answer.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => false,
                Ok(Ok(target)) => {
                    let id = target.id;
                    assert!(
                        (1..=self.channel_max).contains(&id),
                        "channel id {id} outside 1..={}",
                        self.channel_max
                    );
                    assert!(
                        !self
                            .channels
                            .iter()
                            .any(|c| c.id == id && c.closed.get().is_none()),
                        "channel id {id} handed out while a handle still has it open"
                    );
                    self.reached.channels_opened += 1;
                    let channel = AppChannel {
                        id,
                        target,
                        closed: closed.clone(),
                        epoch: epoch.clone(),
                        confirm_mode: false,
                    };
                    self.channels.push(channel);
                    true
                }
                _ => true,
            },
            Call::Rpc {
                channel,
                request,
                get_no_ack,
                consumer,
                answer,
            } => {
                let reply = match answer.try_recv() {
                    Err(oneshot::error::TryRecvError::Empty) => return false,
                    Ok(Ok(reply)) => reply,
                    _ => return true,
                };
                let (channel, request, get_no_ack, consumer) =
                    (*channel, *request, *get_no_ack, *consumer);
                self.reached.replies_checked += 1;
                let replied = reply.method.info();
                assert!(
                    request.is_answered_by(replied.id),
                    "{} answered by {}",
                    request.name,
                    replied.name
                );
                match &reply.method {
                    Method::ConfirmSelectOk(_) => self.channels[channel].confirm_mode = true,
                    Method::BasicConsumeOk(_) => {
                        if let Some(c) = self.consumers.iter_mut().find(|c| Some(c.id) == consumer)
                        {
                            c.started = true;
                        }
                    }
                    Method::BasicGetOk(get_ok) => {
                        assert!(reply.content.is_some(), "a get-ok without its content");
                        if get_no_ack == Some(false) && self.received.len() < MAX_RECEIVED {
                            self.received.push_back(Received {
                                channel,
                                tag: get_ok.delivery_tag,
                                epoch: reply.epoch,
                            });
                        }
                    }
                    _ => assert!(
                        reply.content.is_none(),
                        "content with a {} reply",
                        replied.name
                    ),
                }
                true
            }
            Call::Confirms { answer, .. } => {
                !matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty))
            }
            Call::Done { answer, .. } => {
                !matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty))
            }
        }
    }

    // The broker.

    /// Bytes from the broker: read (unless reading is paused) and handed to
    /// the machine as `Driver` does.
    fn broker_sends(&mut self, bytes: &[u8]) {
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        socket.inbound.extend_from_slice(bytes);
        if !self.machine.is_paused() {
            self.machine.on_received(self.now);
            self.handle_input();
        }
    }

    /// `Driver::handle_input`, watching each frame the machine takes.
    fn handle_input(&mut self) {
        while !self.machine.is_paused()
            && !self.machine.is_closed()
            && !self.machine.is_interrupted()
        {
            let Some(socket) = self.socket.as_mut() else {
                return;
            };
            match socket.decoder.decode(&mut socket.inbound) {
                Ok(Some(frame)) => {
                    if self.trace {
                        eprintln!("  broker: {frame:?}");
                    }
                    let seen = frame.clone();
                    match self.machine.handle_frame(frame) {
                        Ok(()) => {
                            self.route();
                            self.broker_frame_taken(seen);
                        }
                        Err(error) => self.machine.protocol_error(error),
                    }
                }
                Ok(None) => break,
                Err(error) => self.machine.protocol_error(Error::Protocol(error)),
            }
            self.route();
        }
    }

    /// The machine accepted `frame`: the broker's view follows.
    fn broker_frame_taken(&mut self, frame: Frame) {
        let Frame::Method { channel, method } = frame else {
            return;
        };
        if channel == 0 {
            return;
        }
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        match method {
            // Either way the channel is gone on the broker's side.
            Method::ChannelClose(_) | Method::ChannelCloseOk(_) => {
                socket.channels.remove(&channel);
            }
            Method::BasicDeliver(deliver) => {
                let wire = socket.channels.entry(channel).or_default();
                let no_ack = wire.consumers.get(&deliver.consumer_tag).copied();
                wire.delivered(deliver.delivery_tag, no_ack.map(|no_ack| !no_ack));
            }
            Method::BasicGetOk(get_ok) => {
                let wire = socket.channels.entry(channel).or_default();
                let outstanding = !wire.get_no_ack;
                wire.delivered(get_ok.delivery_tag, Some(outstanding));
            }
            Method::BasicCancel(cancel) => {
                if let Some(wire) = socket.channels.get_mut(&channel) {
                    wire.consumers.remove(&cancel.consumer_tag);
                }
            }
            Method::BasicCancelOk(ok) => {
                if let Some(wire) = socket.channels.get_mut(&channel) {
                    wire.consumers.remove(&ok.consumer_tag);
                }
            }
            Method::BasicAck(ack) => {
                self.broker_confirmed(channel, ack.delivery_tag, ack.multiple, true)
            }
            Method::BasicNack(nack) => {
                self.broker_confirmed(channel, nack.delivery_tag, nack.multiple, false)
            }
            _ => {}
        }
    }

    /// The machine took the broker's ack (or nack) of `tag`: the publishes it
    /// names must be settled now, with that verdict.
    fn broker_confirmed(&mut self, channel: u16, tag: u64, multiple: bool, ack: bool) {
        let wire_confirms = self
            .socket
            .as_mut()
            .and_then(|s| s.channels.get_mut(&channel))
            .and_then(|w| w.confirms.as_mut());
        let confirms = match wire_confirms {
            Some(confirms) if tag < confirms.next_seq => confirms,
            other => {
                // The broker confirmed a publish it never saw (or before it
                // saw confirm.select): the machine may settle publishes not
                // written yet, which the model cannot attribute.
                if let Some(confirms) = other {
                    confirms.unconfirmed.clear();
                }
                for awaited in self.confirms.iter_mut().filter(|c| c.channel == channel) {
                    awaited.attributable = false;
                }
                return;
            }
        };
        let settled: Vec<u64> = if multiple {
            let later = confirms.unconfirmed.split_off(&(tag + 1));
            std::mem::replace(&mut confirms.unconfirmed, later)
                .into_values()
                .collect()
        } else {
            confirms.unconfirmed.remove(&tag).into_iter().collect()
        };
        for publish in settled {
            let Some(index) = self
                .confirms
                .iter()
                .position(|c| c.publish == publish && c.attributable)
            else {
                continue;
            };
            let mut awaited = self.confirms.swap_remove(index);
            self.reached.confirms_checked += 1;
            match awaited.answer.try_recv() {
                Ok(Ok(Confirmation::Ack | Confirmation::Returned(_))) if ack => {}
                Ok(Ok(Confirmation::Nack)) if !ack => {}
                other => panic!(
                    "the broker {} publish {publish} (channel {channel}, tag {tag}, multiple {multiple}); the publisher got {other:?}",
                    if ack { "acked" } else { "nacked" }
                ),
            }
        }
    }

    /// The broker answers the oldest request on a channel that has one.
    fn broker_reply(&mut self, input: &mut Choices<'_>) {
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        let mut waiting: Vec<u16> = socket
            .channels
            .iter()
            .filter(|(_, wire)| !wire.requests.is_empty())
            .map(|(id, _)| *id)
            .collect();
        if !socket.connection_requests.is_empty() {
            waiting.push(0);
        }
        if waiting.is_empty() {
            return;
        }
        let channel = waiting[input.below(waiting.len())];
        let refuse = input.one_in(8);
        let mut bytes = BytesMut::new();
        if channel == 0 {
            let Some(request) = socket.connection_requests.pop_front() else {
                return;
            };
            let reply = match request {
                Method::ConnectionUpdateSecret(_) if refuse => {
                    Method::ConnectionClose(connection::Close {
                        reply_code: ReplyCode::NOT_ALLOWED.code(),
                        reply_text: short("NOT_ALLOWED - refused"),
                        class_id: 10,
                        method_id: 70,
                    })
                }
                Method::ConnectionUpdateSecret(_) => {
                    Method::ConnectionUpdateSecretOk(connection::UpdateSecretOk {})
                }
                _ => Method::ConnectionCloseOk(connection::CloseOk {}),
            };
            frame::write_method(&mut bytes, 0, &reply);
        } else {
            let queue_name = format!("amq.gen-{}", socket.server_named);
            let frame_max = self.frame_max;
            let Some(wire) = socket.channels.get_mut(&channel) else {
                return;
            };
            let Some(request) = wire.requests.pop_front() else {
                return;
            };
            if refuse && !matches!(request, Method::ChannelClose(_)) {
                let id = request.info().id;
                let close = Method::ChannelClose(channel::Close {
                    reply_code: input.pick(&[403, 404, 405, 406]),
                    reply_text: short("refused by the fuzzed broker"),
                    class_id: id.class_id,
                    method_id: id.method_id,
                });
                // The broker ignores the channel's later requests until close-ok.
                wire.requests.clear();
                frame::write_method(&mut bytes, channel, &close);
            } else {
                let reply = match &request {
                    Method::ChannelOpen(_) => Method::ChannelOpenOk(channel::OpenOk {}),
                    Method::ChannelClose(_) => Method::ChannelCloseOk(channel::CloseOk {}),
                    Method::ChannelFlow(flow) => Method::ChannelFlowOk(channel::FlowOk {
                        active: flow.active,
                    }),
                    Method::ExchangeDeclare(_) => Method::ExchangeDeclareOk(exchange::DeclareOk {}),
                    Method::ExchangeDelete(_) => Method::ExchangeDeleteOk(exchange::DeleteOk {}),
                    Method::ExchangeBind(_) => Method::ExchangeBindOk(exchange::BindOk {}),
                    Method::ExchangeUnbind(_) => Method::ExchangeUnbindOk(exchange::UnbindOk {}),
                    Method::QueueDeclare(declare) => {
                        let queue = if declare.queue.is_empty() {
                            socket.server_named += 1;
                            short(&queue_name)
                        } else {
                            declare.queue.clone()
                        };
                        Method::QueueDeclareOk(queue::DeclareOk {
                            queue,
                            message_count: 0,
                            consumer_count: 0,
                        })
                    }
                    Method::QueueBind(_) => Method::QueueBindOk(queue::BindOk {}),
                    Method::QueueUnbind(_) => Method::QueueUnbindOk(queue::UnbindOk {}),
                    Method::QueuePurge(_) => {
                        Method::QueuePurgeOk(queue::PurgeOk { message_count: 3 })
                    }
                    Method::QueueDelete(_) => {
                        Method::QueueDeleteOk(queue::DeleteOk { message_count: 0 })
                    }
                    Method::BasicQos(_) => Method::BasicQosOk(basic::QosOk {}),
                    Method::BasicConsume(consume) => Method::BasicConsumeOk(basic::ConsumeOk {
                        consumer_tag: consume.consumer_tag.clone(),
                    }),
                    Method::BasicCancel(cancel) => Method::BasicCancelOk(basic::CancelOk {
                        consumer_tag: cancel.consumer_tag.clone(),
                    }),
                    Method::BasicRecover(_) => Method::BasicRecoverOk(basic::RecoverOk {}),
                    Method::TxSelect(_) => Method::TxSelectOk(tx::SelectOk {}),
                    Method::TxCommit(_) => Method::TxCommitOk(tx::CommitOk {}),
                    Method::TxRollback(_) => Method::TxRollbackOk(tx::RollbackOk {}),
                    Method::ConfirmSelect(_) => Method::ConfirmSelectOk(confirm::SelectOk {}),
                    Method::BasicGet(_) if input.flag() => {
                        Method::BasicGetEmpty(basic::GetEmpty {})
                    }
                    Method::BasicGet(_) => {
                        let get_ok = basic::GetOk {
                            delivery_tag: wire.next_tag(),
                            redelivered: false,
                            exchange: short("x1"),
                            routing_key: short("rk"),
                            message_count: 0,
                        };
                        frame::write_method(&mut bytes, channel, &Method::BasicGetOk(get_ok));
                        let size = body_size(input, frame_max);
                        write_content(
                            &mut bytes,
                            channel,
                            size,
                            &BasicProperties::default(),
                            frame_max,
                            1,
                        );
                        self.broker_sends(&bytes);
                        return;
                    }
                    _ => return,
                };
                frame::write_method(&mut bytes, channel, &reply);
            }
        }
        self.broker_sends(&bytes);
    }

    /// The broker delivers to a consumer it knows (or, rarely, one it does not).
    fn broker_deliver(&mut self, input: &mut Choices<'_>) {
        let frame_max = self.frame_max;
        let size = self.body_size(input);
        let parts = 1 + input.below(3);
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        let channels: Vec<u16> = socket.channels.keys().copied().collect();
        if channels.is_empty() {
            return;
        }
        let channel = channels[input.below(channels.len())];
        let Some(wire) = socket.channels.get_mut(&channel) else {
            return;
        };
        let tags: Vec<ShortString> = wire.consumers.keys().cloned().collect();
        let consumer_tag = if tags.is_empty() || input.one_in(16) {
            short("unknown-consumer")
        } else {
            tags[input.below(tags.len())].clone()
        };
        let delivery_tag = if input.one_in(16) {
            u64::from(input.byte())
        } else {
            wire.next_tag()
        };
        let mut properties = BasicProperties::default();
        if input.flag() {
            wire.stream_offset += 1;
            let offset = match input.below(8) {
                0 => i64::MAX,
                1 => i64::MIN,
                2 => -1,
                _ => wire.stream_offset,
            };
            properties.headers =
                Some(FieldTable::new().with(short(STREAM_OFFSET), FieldValue::I64(offset)));
        }
        let mut bytes = BytesMut::new();
        let deliver = Method::BasicDeliver(basic::Deliver {
            consumer_tag,
            delivery_tag,
            redelivered: input.flag(),
            exchange: short("x1"),
            routing_key: short("rk"),
        });
        frame::write_method(&mut bytes, channel, &deliver);
        write_content(&mut bytes, channel, size, &properties, frame_max, parts);
        self.broker_sends(&bytes);
    }

    /// The broker confirms publishes it saw (or, rarely, one it did not).
    fn broker_confirm(&mut self, input: &mut Choices<'_>) {
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        let channels: Vec<u16> = socket
            .channels
            .iter()
            .filter(|(_, wire)| wire.confirms.is_some())
            .map(|(id, _)| *id)
            .collect();
        if channels.is_empty() {
            return;
        }
        let channel = channels[input.below(channels.len())];
        let Some(confirms) = socket
            .channels
            .get(&channel)
            .and_then(|wire| wire.confirms.as_ref())
        else {
            return;
        };
        let seqs: Vec<u64> = confirms.unconfirmed.keys().copied().collect();
        let delivery_tag = if seqs.is_empty() || input.one_in(16) {
            confirms.next_seq + u64::from(input.byte() % 3)
        } else {
            seqs[input.below(seqs.len())]
        };
        let multiple = input.flag();
        let method = if input.one_in(4) {
            Method::BasicNack(basic::Nack {
                delivery_tag,
                multiple,
                requeue: false,
            })
        } else {
            Method::BasicAck(basic::Ack {
                delivery_tag,
                multiple,
            })
        };
        let mut bytes = BytesMut::new();
        frame::write_method(&mut bytes, channel, &method);
        self.broker_sends(&bytes);
    }

    /// What else a broker sends: closes, alarms, flow, cancels, returns,
    /// heartbeats.
    fn broker_other(&mut self, input: &mut Choices<'_>) {
        let frame_max = self.frame_max;
        let channel_max = self.channel_max;
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        let channels: Vec<u16> = socket.channels.keys().copied().collect();
        // Rarely a channel that is not open, which the machine must refuse.
        let channel = if input.one_in(16) {
            1 + input.below(usize::from(channel_max) + 1) as u16
        } else if channels.is_empty() {
            return;
        } else {
            channels[input.below(channels.len())]
        };
        let mut bytes = BytesMut::new();
        match input.below(10) {
            0 => {
                let close = Method::ChannelClose(channel::Close {
                    reply_code: input.pick(&[404, 406, 320]),
                    reply_text: short("closed by the fuzzed broker"),
                    class_id: 50,
                    method_id: 10,
                });
                if let Some(wire) = socket.channels.get_mut(&channel) {
                    wire.requests.clear();
                }
                frame::write_method(&mut bytes, channel, &close);
            }
            1 => {
                let close = Method::ConnectionClose(connection::Close {
                    reply_code: input.pick(&[320, 541]),
                    reply_text: short("CONNECTION_FORCED - broker forced connection closure"),
                    class_id: 0,
                    method_id: 0,
                });
                frame::write_method(&mut bytes, 0, &close);
            }
            2 => frame::write_method(
                &mut bytes,
                0,
                &Method::ConnectionBlocked(connection::Blocked {
                    reason: short("low on memory"),
                }),
            ),
            3 => frame::write_method(
                &mut bytes,
                0,
                &Method::ConnectionUnblocked(connection::Unblocked {}),
            ),
            4 => frame::write_method(
                &mut bytes,
                channel,
                &Method::ChannelFlow(channel::Flow {
                    active: input.flag(),
                }),
            ),
            5 => {
                let tags: Vec<ShortString> = socket
                    .channels
                    .get(&channel)
                    .map(|wire| wire.consumers.keys().cloned().collect())
                    .unwrap_or_default();
                let Some(tag) = tags.get(input.below(tags.len().max(1))).cloned() else {
                    return;
                };
                frame::write_method(
                    &mut bytes,
                    channel,
                    &Method::BasicCancel(basic::Cancel {
                        consumer_tag: tag,
                        no_wait: input.flag(),
                    }),
                );
            }
            6 | 7 => {
                let ret = Method::BasicReturn(basic::Return {
                    reply_code: ReplyCode::NO_ROUTE.code(),
                    reply_text: short("NO_ROUTE"),
                    exchange: short("x1"),
                    routing_key: short("rk"),
                });
                frame::write_method(&mut bytes, channel, &ret);
                let size = usize::from(input.byte() % 16);
                write_content(
                    &mut bytes,
                    channel,
                    size,
                    &BasicProperties::default(),
                    frame_max,
                    1,
                );
            }
            8 => frame::write_heartbeat(&mut bytes),
            _ => frame::write_method(
                &mut bytes,
                0,
                &Method::ConnectionCloseOk(connection::CloseOk {}),
            ),
        }
        self.broker_sends(&bytes);
    }

    /// Bytes of the input: mostly framed (a frame type, a channel that is
    /// open, the length and frame end right), so that the payload reaches
    /// the method, header and body decoders; sometimes raw.
    fn broker_raw(&mut self, input: &mut Choices<'_>) {
        let framed = !input.one_in(4);
        let frame_type = input.pick(&[1, 1, 2, 3, 8]);
        let channel = self
            .socket
            .as_ref()
            .map(|socket| socket.channels.keys().copied().collect::<Vec<u16>>())
            .filter(|channels| !channels.is_empty() && input.flag())
            .map_or(0, |channels| channels[input.below(channels.len())]);
        let payload = input.bytes(MAX_RAW);
        let mut bytes = BytesMut::new();
        if framed {
            bytes.extend_from_slice(&[frame_type]);
            bytes.extend_from_slice(&channel.to_be_bytes());
            bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&payload);
            bytes.extend_from_slice(&[0xCE]);
        } else {
            bytes.extend_from_slice(&payload);
        }
        self.broker_sends(&bytes);
    }

    // The I/O task.

    /// The control queue's branch of `Driver::run_session`: what the queue
    /// holds goes first (while commands are taken), then one control command.
    fn take_control(&mut self) {
        if self.machine.accepts_commands() {
            self.take_commands();
        }
        if let Some(command) = self.control.pop_front() {
            self.machine.command(command, self.now);
        }
    }

    fn take_commands(&mut self) {
        while let Some(command) = self.commands.pop_front() {
            self.machine.command(command, self.now);
        }
    }

    /// Parked deliveries, the loss of the socket, then the commands queued
    /// meanwhile: what `Driver::run_session` does after any event.
    fn after_io_event(&mut self) {
        self.serve_parked();
        self.end_socket_if_over();
        if self.machine.accepts_commands() {
            self.take_commands();
        }
        if self.machine.is_closed() {
            // `Driver::run`: the queues are drained into the closed machine.
            self.take_commands();
            while let Some(command) = self.control.pop_front() {
                self.machine.command(command, self.now);
            }
        }
        self.route();
        self.end_socket_if_over();
    }

    /// `Driver::run_session`'s `reserve(parked)` branch, for as long as it
    /// would fire.
    fn serve_parked(&mut self) {
        if self.socket.is_none() {
            return;
        }
        while let Some(sender) = self.machine.parked_outlet().cloned() {
            match sender.try_reserve_owned() {
                Ok(permit) => self.machine.unpark(
                    |delivery| {
                        permit.send(delivery);
                    },
                    self.now,
                ),
                Err(TrySendError::Full(_)) => break,
                Err(TrySendError::Closed(_)) => self.machine.drop_parked(),
            }
            self.route();
            self.handle_input();
        }
    }

    /// The session is over (closed or interrupted): the last frames are
    /// flushed to the socket, which is then gone.
    fn end_socket_if_over(&mut self) {
        if self.socket.is_some() && (self.machine.is_closed() || self.machine.is_interrupted()) {
            let mut last = BytesMut::new();
            self.machine.write_frames(&mut last, usize::MAX);
            self.take_written(last);
            self.socket = None;
            let _ = self.machine.take_loss();
        }
    }

    fn write(&mut self, budget: usize) {
        let wanted = self.machine.wants_to_write();
        let mut buf = BytesMut::new();
        self.machine.write_frames(&mut buf, budget);
        if !wanted {
            assert!(
                buf.is_empty(),
                "wrote {} bytes without wanting to write",
                buf.len()
            );
        }
        if self.socket.is_some() && !buf.is_empty() {
            self.machine.on_sent(self.now);
        }
        self.take_written(buf);
        if budget == usize::MAX {
            assert!(
                !self.machine.wants_to_write(),
                "something is left to write after an unbounded write"
            );
        }
    }

    /// Time passes, the broker's heartbeat usually comes, and the timer
    /// fires if it is due.
    fn wait(&mut self, input: &mut Choices<'_>) {
        let millis = input.pick(&[1, 100, 1_000, 5_000, 10_000, 25_000, 61_000, 300_000]);
        self.now += Duration::from_millis(millis);
        if !input.one_in(4) {
            let mut heartbeat = BytesMut::new();
            frame::write_heartbeat(&mut heartbeat);
            self.broker_sends(&heartbeat);
        }
        if self.socket.is_some() && self.machine.next_timeout().is_some_and(|at| at <= self.now) {
            self.machine.handle_timeout(self.now);
        }
    }

    /// With a socket: it fails (one time in eight). Without: a new one is up
    /// (as after a handshake) or recovery gives up.
    fn lose_or_resume(&mut self, input: &mut Choices<'_>) {
        if self.socket.is_some() {
            if input.one_in(8) {
                self.machine.connection_lost(lost("socket lost"));
            }
            return;
        }
        if !self.machine.is_interrupted() {
            return;
        }
        if input.one_in(8) {
            self.machine.fail(lost("recovery gave up"));
            return;
        }
        // Another broker of the cluster, with the same limits but maybe
        // another heartbeat.
        let heartbeat = Duration::from_secs(input.pick(&[0, 1, 10, 60]));
        self.socket = Some(Socket::new(self.frame_max));
        self.reached.resumes += 1;
        self.machine
            .resume(self.channel_max, self.frame_max, heartbeat, self.now);
        self.handle_input();
    }

    /// Checks what the machine wrote, frame by frame, as the broker reads it.
    fn take_written(&mut self, written: BytesMut) {
        if written.is_empty() {
            return;
        }
        let Some(socket) = self.socket.as_mut() else {
            panic!(
                "the machine wrote {} bytes with no socket (after its last flush)",
                written.len()
            );
        };
        socket.outbound.extend_from_slice(&written);
        let mut frames = Vec::new();
        loop {
            let before = socket.outbound.len();
            match socket.broker_decoder.decode(&mut socket.outbound) {
                Ok(Some(frame)) => {
                    let size = before - socket.outbound.len();
                    assert!(
                        size <= self.frame_max as usize,
                        "a {size}-byte frame over frame_max {}: {frame:?}",
                        self.frame_max
                    );
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(error) => panic!("the machine wrote a frame the broker cannot decode: {error}"),
            }
        }
        assert!(
            socket.outbound.is_empty(),
            "a write ended inside a frame ({} bytes left)",
            socket.outbound.len()
        );
        for frame in frames {
            self.reached.frames_written += 1;
            self.client_frame(frame);
        }
    }

    /// The broker's view of a frame the machine wrote, and the checks on it.
    fn client_frame(&mut self, frame: Frame) {
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        if self.trace {
            eprintln!("  client: {frame:?}");
        }
        let channel = frame.channel();
        let method = match frame {
            Frame::Heartbeat => return,
            Frame::Method { channel: 0, method } => {
                if expects_reply(&method) {
                    socket.connection_requests.push_back(method);
                }
                return;
            }
            Frame::Method { method, .. } => Some(method),
            Frame::Header { .. } | Frame::Body { .. } if channel == 0 => {
                panic!("content on channel 0: {frame:?}")
            }
            Frame::Header { header, .. } => {
                let wire = socket.channels.get_mut(&channel).unwrap_or_else(|| {
                    panic!("content header on channel {channel}, which is not open on this socket")
                });
                if std::mem::take(&mut wire.publishing) {
                    if let Some(confirms) = wire.confirms.as_mut() {
                        let seq = confirms.next_seq;
                        confirms.next_seq += 1;
                        let publish = header
                            .properties
                            .get()
                            .message_id
                            .as_ref()
                            .and_then(|id| id.to_str().ok()?.strip_prefix('p')?.parse().ok());
                        if let Some(publish) = publish {
                            confirms.unconfirmed.insert(seq, publish);
                        }
                    }
                }
                None
            }
            Frame::Body { .. } => {
                assert!(
                    socket.channels.contains_key(&channel),
                    "content body on channel {channel}, which is not open on this socket"
                );
                None
            }
        };
        let Some(method) = method else {
            return;
        };
        match &method {
            Method::ChannelOpen(_) => {
                let mut wire = WireChannel::default();
                wire.requests.push_back(method);
                let again = socket.channels.insert(channel, wire);
                assert!(
                    again.is_none(),
                    "channel.open on channel {channel}, which is already open on this socket"
                );
                return;
            }
            // It answers the broker's close, after which the channel is gone.
            Method::ChannelCloseOk(_) => return,
            _ => {}
        }
        let name = method.info().name;
        let wire = socket.channels.get_mut(&channel).unwrap_or_else(|| {
            panic!("{name} on channel {channel}, which is not open on this socket")
        });
        let settlement = match &method {
            Method::BasicConsume(consume) => {
                wire.consumers
                    .insert(consume.consumer_tag.clone(), consume.no_ack);
                None
            }
            Method::BasicCancel(cancel) if cancel.no_wait => {
                wire.consumers.remove(&cancel.consumer_tag);
                None
            }
            Method::BasicGet(get) => {
                wire.get_no_ack = get.no_ack;
                None
            }
            Method::ConfirmSelect(_) => {
                wire.confirms.get_or_insert_with(|| WireConfirms {
                    next_seq: 1,
                    unconfirmed: BTreeMap::new(),
                });
                None
            }
            Method::TxSelect(_) | Method::BasicRecover(_) | Method::BasicRecoverAsync(_) => {
                wire.untracked = true;
                wire.outstanding.clear();
                None
            }
            Method::BasicPublish(_) => {
                wire.publishing = true;
                None
            }
            Method::BasicAck(ack) => Some((ack.delivery_tag, ack.multiple)),
            Method::BasicNack(nack) => Some((nack.delivery_tag, nack.multiple)),
            Method::BasicReject(reject) => Some((reject.delivery_tag, false)),
            _ => None,
        };
        if let Some((tag, multiple)) = settlement {
            if !wire.untracked && !self.free_settlements.contains(&channel) {
                self.reached.settlements_checked += 1;
                if multiple && tag == 0 {
                    wire.outstanding.clear();
                } else {
                    assert!(
                        wire.outstanding.contains(&tag),
                        "{name} of delivery tag {tag} (multiple: {multiple}) on channel {channel}, \
                         which the broker does not hold unsettled (it holds {:?}): RabbitMQ closes \
                         the channel with 406 PRECONDITION_FAILED",
                        wire.outstanding
                    );
                    if multiple {
                        wire.outstanding = wire.outstanding.split_off(&(tag + 1));
                    } else {
                        wire.outstanding.remove(&tag);
                    }
                }
            }
        }
        if expects_reply(&method) {
            wire.requests.push_back(method);
        }
    }

    /// The program is over: the connection fails, and then everything the
    /// application waits for must be over too.
    fn finish(mut self) -> Reached {
        self.after_io_event();
        if !self.machine.is_closed() {
            self.machine.fail(lost("the program ended"));
            self.route();
        }
        self.after_io_event();
        assert!(self.machine.is_closed() && !self.machine.accepts_commands());
        assert!(
            self.error.get().is_some(),
            "a failed connection without an error"
        );
        self.write(usize::MAX);
        self.poll_calls();
        if let Some(call) = self.calls.first() {
            let what = match call {
                Call::Open { .. } => "channel.open",
                Call::Rpc { request, .. } => request.name,
                Call::Confirms { .. } => "wait_for_confirms",
                Call::Done {
                    channel: Some(_), ..
                } => "channel.close",
                Call::Done { channel: None, .. } => "connection.update-secret",
            };
            panic!("{what} was neither answered nor dropped after the connection failed");
        }
        if let Some(awaited) = self.confirms.first() {
            panic!(
                "the confirm of publish {} was neither answered nor dropped after the connection failed",
                awaited.publish
            );
        }
        for consumer in &mut self.consumers {
            while consumer.receiver.try_recv().is_ok() {}
            assert_eq!(
                consumer.receiver.try_recv().err(),
                Some(TryRecvError::Disconnected),
                "consumer {}'s stream did not end with the connection",
                consumer.tag
            );
            assert!(
                !consumer.started || consumer.end.get().is_some(),
                "consumer {} ended without a reason",
                consumer.tag
            );
        }
        for returns in &mut self.returns {
            while returns.try_recv().is_ok() {}
            assert_eq!(
                returns.try_recv().err(),
                Some(TryRecvError::Disconnected),
                "a returns stream did not end with the connection"
            );
        }
        assert!(
            self.budget.try_credit(PUBLISH_BUDGET).is_some(),
            "publish credit still held after the connection failed"
        );
        self.check_refused_after_close();
        self.reached
    }

    /// Commands that reach a closed machine are answered at once.
    fn check_refused_after_close(&mut self) {
        let (reply, mut opened) = oneshot::channel();
        self.machine.command(
            Command::OpenChannel {
                closed: Arc::new(OnceLock::new()),
                epoch: Arc::new(AtomicU64::new(0)),
                hook_owned: false,
                reply,
            },
            self.now,
        );
        self.route();
        assert!(matches!(opened.try_recv(), Ok(Err(_))), "open after close");
        let (reply, mut called) = oneshot::channel();
        self.machine.command(
            Command::Rpc {
                channel: ChannelRef {
                    id: 1,
                    incarnation: 1,
                },
                method: Box::new(Method::BasicQos(basic::Qos::default())),
                reply,
            },
            self.now,
        );
        self.route();
        assert!(matches!(called.try_recv(), Ok(Err(_))), "call after close");
        let (confirm, mut confirmed) = oneshot::channel();
        self.machine.command(
            Command::Publish {
                channel: ChannelRef {
                    id: 1,
                    incarnation: 1,
                },
                head: Bytes::new(),
                body: PublishBody(Bytes::new()),
                confirm: Some(confirm),
                credit: None,
            },
            self.now,
        );
        self.route();
        assert!(
            matches!(confirmed.try_recv(), Ok(Err(_))),
            "publish after close"
        );
        let (reply, mut waited) = oneshot::channel();
        self.machine.command(
            Command::WaitForConfirms {
                channel: ChannelRef {
                    id: 1,
                    incarnation: 1,
                },
                reply,
            },
            self.now,
        );
        self.route();
        assert!(matches!(waited.try_recv(), Ok(Err(_))), "wait after close");
        let mut buf = BytesMut::new();
        self.machine.write_frames(&mut buf, usize::MAX);
        assert!(buf.is_empty(), "refused commands were written");
    }
}

/// A body size: empty, small, or around the frame size, sometimes large.
fn body_size(input: &mut Choices<'_>, frame_max: u32) -> usize {
    let chunk = frame_max.min(1 << 17) as usize - FRAME_OVERHEAD;
    match input.below(10) {
        0 => 0,
        1 => 1,
        2 => usize::from(input.byte()),
        3 => chunk - 1,
        4 => chunk,
        5 => chunk + 1,
        6 => 2 * chunk + 5,
        7 if input.one_in(4) => 1 << 20,
        _ => 10,
    }
}

/// A content header and a body of `size` bytes split into about `parts`
/// runs of body frames.
fn write_content(
    buf: &mut BytesMut,
    channel: u16,
    size: usize,
    properties: &BasicProperties,
    frame_max: u32,
    parts: usize,
) {
    frame::write_header(buf, channel, size as u64, properties);
    let body = vec![b'd'; size];
    let part = size.div_ceil(parts.max(1)).max(1);
    for piece in body.chunks(part) {
        frame::write_body(buf, channel, piece, frame_max);
    }
}

/// A program's bytes from steps given as an op and its detail bytes.
fn program(settings: [u8; 7], steps: &[(Op, &[u8])]) -> Vec<u8> {
    let mut bytes = settings.to_vec();
    for (op, details) in steps {
        let code = OPS.iter().position(|o| o == op).expect("op in the table");
        bytes.push(code as u8);
        bytes.extend_from_slice(details);
    }
    bytes
}

/// frame_max 4096, channel_max 8, heartbeat 10 s, close timeout 1 s,
/// max body 300 kB, recovery with topology.
const RECOVERING: [u8; 7] = [0, 3, 2, 0, 2, 1, 1];

/// Without a socket, `Op::LoseSocket` resumes on a new one.
const RESUME: Op = Op::LoseSocket;

/// Opens channel 1 and puts it in confirm mode; a consumer on it.
fn open_confirm_consume() -> Vec<(Op, &'static [u8])> {
    vec![
        (Op::OpenChannel, &[0]),
        (Op::TakeCommands, &[]),
        (Op::Write, &[4]),
        (Op::Reply, &[0, 0]),
        // confirm.select (kind 11 of `request`).
        (Op::Call, &[0, 11]),
        (Op::TakeCommands, &[]),
        (Op::Write, &[4]),
        (Op::Reply, &[0, 0]),
        // A consumer with acks, no arguments, on "q1", buffer of 1.
        (Op::Consume, &[0, 1, 0, 1, 0, 0, 0]),
        (Op::TakeCommands, &[]),
        (Op::Write, &[4]),
        (Op::Reply, &[0, 0]),
    ]
}

/// Opens a channel, publishes with a confirm, and acks a delivery.
fn publish_confirm_deliver_ack() -> Vec<(Op, &'static [u8])> {
    let mut steps = open_confirm_consume();
    steps.extend_from_slice(&[
        // A 10-byte publish (size choice 9), then the broker's ack of it.
        (Op::Publish, &[0, 9, 0, 0]),
        (Op::TakeCommands, &[]),
        (Op::Write, &[4]),
        (Op::Confirm, &[0, 0, 0, 0, 0]),
        // A delivery to the consumer, read and acked.
        (Op::Deliver, &[9, 0, 0, 0, 0, 0, 0, 0]),
        (Op::Receive, &[0, 0]),
        (Op::Settle, &[0, 7]),
        (Op::TakeCommands, &[]),
        (Op::Write, &[4]),
    ]);
    steps
}

/// Opens a channel, loses the socket and recovers on a new one.
fn lose_and_recover() -> Vec<(Op, &'static [u8])> {
    let mut steps = open_confirm_consume();
    steps.extend_from_slice(&[
        (Op::LoseSocket, &[7]),
        (Op::TakeCommands, &[]),
        (RESUME, &[0, 2]),
        (Op::Write, &[4]),
        // channel.open, confirm.select, basic.consume again.
        (Op::Reply, &[0, 0]),
        (Op::Write, &[4]),
        (Op::Reply, &[0, 0]),
        (Op::Write, &[4]),
        (Op::Reply, &[0, 0]),
        (Op::Write, &[4]),
    ]);
    steps
}

/// Opens a channel and closes the connection.
fn open_and_close() -> Vec<(Op, &'static [u8])> {
    let mut steps = open_confirm_consume();
    steps.extend_from_slice(&[
        (Op::CloseConnection, &[3]),
        (Op::TakeControl, &[]),
        (Op::Write, &[4]),
        (Op::Reply, &[0, 0]),
    ]);
    steps
}

/// Programs that get somewhere (a confirmed publish, an acked delivery, a
/// recovery, a close), named: seeds for the fuzzer's corpus (written by
/// `fuzz/examples/gen_corpus.rs`), which mutates from there.
pub fn machine_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "publish_confirm_deliver_ack",
            program(RECOVERING, &publish_confirm_deliver_ack()),
        ),
        ("lose_and_recover", program(RECOVERING, &lose_and_recover())),
        ("open_and_close", program(RECOVERING, &open_and_close())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_confirmed_and_a_delivery_acked_are_checked() {
        let reached = run(&program(RECOVERING, &publish_confirm_deliver_ack()));
        assert_eq!(reached.channels_opened, 1, "{reached:?}");
        assert_eq!(reached.confirms_checked, 1, "{reached:?}");
        assert_eq!(reached.deliveries_received, 1, "{reached:?}");
        assert_eq!(reached.settlements_checked, 1, "{reached:?}");
        assert!(reached.replies_checked >= 2, "{reached:?}");
    }

    #[test]
    fn a_lost_socket_is_recovered_on_a_new_one() {
        let reached = run(&program(RECOVERING, &lose_and_recover()));
        assert_eq!(reached.resumes, 1, "{reached:?}");
        // Open, select and consume on each socket.
        assert!(reached.frames_written >= 6, "{reached:?}");
    }

    #[test]
    fn any_prefix_of_a_seed_and_the_empty_program_hold() {
        for (_, seed) in machine_seeds() {
            for end in 0..=seed.len() {
                run(&seed[..end]);
            }
        }
    }

    /// xorshift64*, for inputs that are the same on every run.
    fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn seeded_random_programs_hold_and_reach_the_checks() {
        let mut total = Reached::default();
        for seed in 0..2_000 {
            let input = pseudo_random(seed, 64 + (seed as usize * 7) % 700);
            let reached = run(&input);
            total.frames_written += reached.frames_written;
            total.channels_opened += reached.channels_opened;
            total.replies_checked += reached.replies_checked;
            total.deliveries_received += reached.deliveries_received;
            total.settlements_checked += reached.settlements_checked;
            total.confirms_checked += reached.confirms_checked;
            total.resumes += reached.resumes;
        }
        // Random programs must get past the first steps, or the fuzzer
        // would start from nothing.
        assert!(total.frames_written > 5_000, "{total:?}");
        assert!(total.channels_opened > 500, "{total:?}");
        assert!(total.replies_checked > 100, "{total:?}");
        assert!(total.resumes > 300, "{total:?}");
    }

    /// Regression: deliveries parked for a
    /// consumer outlive its channel's close by the broker, and the consumer's
    /// drop requeues them by channel id, on the new channel that reuses the
    /// id: the broker answers the nack of a tag it never gave that channel
    /// with 406 PRECONDITION_FAILED.
    #[test]
    fn regression_requeue_after_a_broker_close_goes_to_the_channel_reusing_the_id() {
        // channel_max 1, so that the new channel gets the old one's id.
        let settings = [0, 0, 0, 0, 2, 1, 1];
        let delivery: &[u8] = &[9, 0, 0, 0, 0, 0, 0, 0];
        let steps: Vec<(Op, &[u8])> = vec![
            (Op::OpenChannel, &[0]),
            (Op::TakeCommands, &[]),
            (Op::Write, &[4]),
            (Op::Reply, &[0, 0]),
            // A consumer with acks and a buffer of one delivery.
            (Op::Consume, &[0, 1, 0, 1, 0, 0, 0]),
            (Op::TakeCommands, &[]),
            (Op::Write, &[4]),
            (Op::Reply, &[0, 0]),
            // The first delivery fills its buffer, the second is parked.
            (Op::Deliver, delivery),
            (Op::Deliver, delivery),
            // The broker closes the channel (404).
            (Op::BrokerOther, &[0, 0, 0, 0]),
            // A new channel gets id 1 again.
            (Op::OpenChannel, &[0]),
            (Op::TakeCommands, &[]),
            (Op::Write, &[4]),
            (Op::Reply, &[0, 0]),
            // The old consumer is dropped: its parked delivery (tag 2) and,
            // through `ForgetConsumer`, its buffered one (tag 1) are nacked
            // on the new channel 1.
            (Op::DropConsumer, &[0]),
            (Op::TakeControl, &[]),
            (Op::Write, &[4]),
        ];
        run(&program(settings, &steps));
    }

    /// Regression: the stream offset of a
    /// delivery is the broker's; `resume` adds one to the last one, which
    /// overflows for `i64::MAX` (a panic with overflow checks, a wrap to
    /// `i64::MIN` without).
    #[test]
    fn regression_a_stream_offset_of_i64_max_overflows_at_resume() {
        let mut steps = open_confirm_consume();
        steps.extend_from_slice(&[
            // A delivery whose x-stream-offset is i64::MAX.
            (Op::Deliver, &[9, 0, 0, 0, 0, 0, 1, 0, 0]),
            (Op::LoseSocket, &[7]),
            (RESUME, &[0, 2]),
        ]);
        run(&program(RECOVERING, &steps));
    }

    /// Regression, the input the fuzzer found (run with `AMQP_FUZZ_TRACE=1`
    /// to read it): during a recovery the broker closes channel 1, a new
    /// channel gets id 1 again, and a `basic.consume` the old channel's
    /// handle had queued meanwhile was taken for the new channel, whose
    /// deliveries then reached the old handle's consumer.
    #[test]
    fn regression_a_command_of_a_closed_channel_reaches_the_channel_reusing_its_id() {
        run(include_bytes!(
            "../../fuzz/regressions/machine-command-of-a-closed-channel-reaches-its-successor"
        ));
    }

    /// Regression: a parked delivery's stream
    /// offset minus one, at `interrupt`, overflows for `i64::MIN`.
    #[test]
    fn regression_a_parked_stream_offset_of_i64_min_overflows_at_interrupt() {
        let mut steps = open_confirm_consume();
        steps.extend_from_slice(&[
            // The first fills the consumer's buffer, the second is parked.
            (Op::Deliver, &[9, 0, 0, 0, 0, 0, 1, 3, 0]),
            (Op::Deliver, &[9, 0, 0, 0, 0, 0, 1, 1, 0]),
            (Op::LoseSocket, &[7]),
        ]);
        run(&program(RECOVERING, &steps));
    }

    /// Regression: a delivery for a consumer
    /// the application cancelled with no-wait is requeued (nacked) even when
    /// the consumer was no-ack: the broker holds no such tag and answers
    /// with 406 PRECONDITION_FAILED.
    #[test]
    fn regression_an_in_flight_delivery_of_a_cancelled_no_ack_consumer_is_nacked() {
        let steps: Vec<(Op, &[u8])> = vec![
            (Op::OpenChannel, &[0]),
            (Op::TakeCommands, &[]),
            (Op::Write, &[4]),
            (Op::Reply, &[0, 0]),
            // A no-ack consumer.
            (Op::Consume, &[0, 1, 0, 1, 1, 0, 0]),
            (Op::TakeCommands, &[]),
            (Op::Write, &[4]),
            (Op::Reply, &[0, 0]),
            // basic.cancel with no-wait, taken but not written yet...
            (Op::SendNoWait, &[0, 7, 0, 0]),
            (Op::TakeCommands, &[]),
            // ...when a delivery for the consumer arrives.
            (Op::Deliver, &[9, 0, 0, 0, 0, 0, 0, 0]),
            (Op::Write, &[4]),
        ];
        run(&program(RECOVERING, &steps));
    }

    /// Regression: after a reconnect, a frame
    /// for a channel not re-opened yet on the new socket is taken (here
    /// `channel.flow`, from a broker that breaks the protocol) and answered
    /// on that channel before its `channel.open`: RabbitMQ closes the
    /// connection with 504 CHANNEL_ERROR.
    #[test]
    fn regression_a_frame_for_a_channel_not_yet_reopened_is_answered_on_it() {
        let mut steps = open_confirm_consume();
        steps.extend_from_slice(&[
            // Channel 2.
            (Op::OpenChannel, &[0]),
            (Op::TakeCommands, &[]),
            (Op::Write, &[4]),
            (Op::Reply, &[0, 0]),
            (Op::LoseSocket, &[7]),
            // Recovery re-opens channel 1 first; channel 2 waits its turn.
            (RESUME, &[0, 2]),
            // channel.flow on channel 2 (a channel the broker has not seen
            // opened on this socket).
            (Op::BrokerOther, &[15, 1, 4, 0]),
            (Op::Write, &[4]),
        ]);
        run(&program(RECOVERING, &steps));
    }

    /// Regression: `confirm_select_no_wait`
    /// (a `Send` of confirm.select) puts the broker in confirm mode but not
    /// the machine, which starts numbering publishes at a later awaited
    /// confirm.select: the broker's ack of its first publish settles another
    /// publish (and without a later select, the broker's first ack is an
    /// "unexpected frame" that closes the connection).
    #[test]
    fn regression_confirm_select_no_wait_shifts_the_publish_numbering() {
        let steps: Vec<(Op, &[u8])> = vec![
            (Op::OpenChannel, &[0]),
            (Op::TakeCommands, &[]),
            (Op::Write, &[4]),
            (Op::Reply, &[0, 0]),
            // confirm.select no-wait, a publish, then an awaited confirm.select.
            (Op::SendNoWait, &[0, 9]),
            (Op::Publish, &[0, 9, 0, 0]),
            (Op::Call, &[0, 11]),
            (Op::TakeCommands, &[]),
            (Op::Write, &[4]),
            (Op::Reply, &[0, 0]),
            // A publish with a confirm: the machine's number 1, the broker's 2.
            (Op::Publish, &[0, 9, 0, 0]),
            (Op::TakeCommands, &[]),
            (Op::Write, &[4]),
            // The broker acks its publish 1 (the first publish).
            (Op::Confirm, &[0, 0, 0, 0, 0]),
        ];
        run(&program(RECOVERING, &steps));
    }

    /// Regression: recovery re-consumes a
    /// stream consumer with `x-stream-offset` added to its arguments; for a
    /// consume the handle found within frame_max by less than that
    /// argument's 25 bytes, the new frame (4101 bytes here) exceeds
    /// frame_max 4096, and every reconnect sends it again.
    #[test]
    fn regression_a_recovered_stream_consume_can_exceed_frame_max() {
        let steps: Vec<(Op, &[u8])> = vec![
            (Op::OpenChannel, &[0]),
            (Op::TakeCommands, &[]),
            (Op::Write, &[4]),
            (Op::Reply, &[0, 0]),
            // A consumer whose arguments are padded to 4030 bytes.
            (Op::Consume, &[0, 0, 0, 6, 0, 1, 0, 0, 0]),
            (Op::TakeCommands, &[]),
            (Op::Write, &[4]),
            (Op::Reply, &[0, 0]),
            // A delivery with a stream offset.
            (Op::Deliver, &[9, 0, 0, 0, 0, 0, 1, 3, 0]),
            (Op::LoseSocket, &[7]),
            (RESUME, &[0, 2]),
            (Op::Write, &[4]),
            (Op::Reply, &[0, 0]),
            // The consume again, with the offset to resume from.
            (Op::Write, &[4]),
        ];
        run(&program(RECOVERING, &steps));
    }
}
