//! The simulator's only contact with the connection state machine: it plays
//! the I/O task (`io.rs`) and the handles (`channel.rs`, `consumer.rs`) over
//! a small API of its own — calls return a [`CallId`] whose [`Answer`] comes
//! out of [`SimDriver::poll_answers`], bytes go in with
//! [`SimDriver::feed`] and come out of [`SimDriver::take_written`], time is
//! an argument. The handles' ends are tokio's, as in the connection (they
//! work without a runtime), and the machine's events are routed to them by
//! `ports::route`, as the I/O task does. When the machine's API changes,
//! only this file changes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::credit::PublishBudget;
use crate::error::Error;
use crate::events::{Confirmation, RecoveryEvent, ReturnedMessage};
use crate::machine::{ChannelRef, PublishBody, RawDelivery, Reply, Settings, Settlement};
use crate::ports::{route, Blocked, Command, EventSender, Flag, Machine, Recovering, Signals};
use crate::protocol::frame::{self, FrameDecoder};
use crate::protocol::methods::{basic, Method};
use crate::protocol::{BasicProperties, ReplyCode, ShortString};

/// Names a call whose answer will come out of [`SimDriver::poll_answers`].
pub(crate) type CallId = u64;
/// Names a consumer started with [`SimDriver::consume`].
pub(crate) type ConsumerId = u64;
/// Names a channel handle (an index, never reused).
pub(crate) type Handle = usize;

/// How a call ended: `Err(None)` when the machine dropped the answer's
/// sender without an answer (which the handles read as "outcome unknown").
pub(crate) type Outcome<T> = Result<T, Option<Error>>;

/// The reply to a synchronous method.
#[derive(Debug)]
pub(crate) struct SimReply {
    pub method: Method,
    /// For a `basic.get-ok`: the message's id and body.
    pub content: Option<(Option<String>, Bytes)>,
    /// The channel's epoch when the reply came (a get-ok's tag lives in it).
    pub epoch: u64,
}

/// What a call got.
#[derive(Debug)]
pub(crate) enum Answer {
    Opened(Outcome<Handle>),
    Reply(Outcome<SimReply>),
    Confirm(Outcome<Confirmation>),
    Confirms(Outcome<bool>),
    Done(Outcome<()>),
}

/// A delivery as a consumer's stream yields it.
#[derive(Debug, Clone)]
pub(crate) struct SimDelivery {
    pub tag: u64,
    pub consumer_tag: ShortString,
    pub message_id: Option<String>,
    pub body: Bytes,
    pub epoch: u64,
}

/// What a consumer's stream gave this time.
#[derive(Debug, Default)]
pub(crate) struct Received {
    pub deliveries: Vec<SimDelivery>,
    /// The stream ended (with the reason the machine recorded, if any).
    pub ended: Option<Option<Error>>,
}

enum Pending {
    Open {
        answer: oneshot::Receiver<Result<ChannelRef, Error>>,
        closed: Arc<OnceLock<Error>>,
        epoch: Arc<AtomicU64>,
    },
    Rpc(oneshot::Receiver<Result<Reply, Error>>),
    /// A consume: on failure the handle drops its stream, as `basic_consume` does.
    Consume(oneshot::Receiver<Result<Reply, Error>>, ConsumerId),
    Confirm(oneshot::Receiver<Result<Confirmation, Error>>),
    Confirms(oneshot::Receiver<Result<bool, Error>>),
    Done(oneshot::Receiver<Result<(), Error>>),
    /// Refused by the handle before any command.
    Now(Option<Answer>),
}

struct ChannelHandle {
    id: u16,
    target: ChannelRef,
    closed: Arc<OnceLock<Error>>,
    epoch: Arc<AtomicU64>,
}

struct ConsumerHandle {
    channel: Handle,
    tag: ShortString,
    no_ack: bool,
    receiver: mpsc::Receiver<RawDelivery>,
    end: Arc<OnceLock<Error>>,
}

/// Settings of a simulated connection.
#[derive(Debug, Clone)]
pub(crate) struct SimSettings {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: Duration,
    pub recover: bool,
    pub recover_topology: bool,
    pub max_body_size: u64,
}

/// Bytes read per socket read at most, as `io.rs`'s `READ_CHUNK`.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// The machine, driven as `io.rs` drives it, with the handles' side.
pub(crate) struct SimDriver {
    machine: Machine,
    signals: Signals,
    frame_max: u32,
    error: Arc<OnceLock<Error>>,
    blocked: Flag,
    recovering: Flag,
    events: broadcast::Receiver<RecoveryEvent>,
    decoder: FrameDecoder,
    read_buf: BytesMut,
    /// The socket is attached (not lost, not flushed after the end).
    connected: bool,
    commands: VecDeque<Command>,
    control: VecDeque<Command>,
    budget: Arc<PublishBudget>,
    next_call: CallId,
    calls: Vec<(CallId, Pending)>,
    channels: Vec<ChannelHandle>,
    consumers: HashMap<ConsumerId, ConsumerHandle>,
    next_consumer: ConsumerId,
    returns: HashMap<Handle, mpsc::Receiver<ReturnedMessage>>,
}

/// The publish buffer's budget; the simulated application never fills it.
const PUBLISH_BUDGET: u64 = 64 << 20;

fn message_id(properties: &BasicProperties) -> Option<String> {
    properties.message_id.as_ref().map(|id| id.to_string())
}

impl SimDriver {
    pub(crate) fn new(settings: &SimSettings, now: Instant) -> Self {
        let machine_settings = Settings {
            channel_max: settings.channel_max,
            frame_max: settings.frame_max,
            heartbeat: settings.heartbeat,
            close_timeout: Duration::from_secs(5),
            max_body_size: settings.max_body_size,
            recover: settings.recover,
            recover_topology: settings.recover_topology,
        };
        let error = Arc::new(OnceLock::new());
        let (blocked, _) = Blocked::new();
        let (recovering, _) = Recovering::new();
        let (blocked_flag, recovering_flag) = (blocked.flag(), recovering.flag());
        let (events, receiver) = EventSender::subscribed(1024);
        let machine = Machine::new(machine_settings, now, error.clone());
        Self {
            machine,
            signals: Signals {
                blocked,
                recovering,
                events,
                telemetry: crate::telemetry::IoTelemetry::new(
                    crate::telemetry::Telemetry::unobserved(),
                ),
            },
            frame_max: settings.frame_max,
            error,
            blocked: blocked_flag,
            recovering: recovering_flag,
            events: receiver,
            decoder: FrameDecoder::new(settings.frame_max),
            read_buf: BytesMut::new(),
            connected: true,
            commands: VecDeque::new(),
            control: VecDeque::new(),
            budget: PublishBudget::new(PUBLISH_BUDGET),
            next_call: 0,
            calls: Vec::new(),
            channels: Vec::new(),
            consumers: HashMap::new(),
            next_consumer: 0,
            returns: HashMap::new(),
        }
    }

    // The handles' side.

    fn call(&mut self, pending: Pending) -> CallId {
        let id = self.next_call;
        self.next_call += 1;
        self.calls.push((id, pending));
        id
    }

    /// Why a command on `handle` is refused by the handle itself.
    fn refused(&self, handle: Handle) -> Option<Error> {
        self.error
            .get()
            .or_else(|| self.channels[handle].closed.get())
            .cloned()
    }

    pub(crate) fn channel_id(&self, handle: Handle) -> u16 {
        self.channels[handle].id
    }

    /// Why the channel closed, once it has.
    pub(crate) fn channel_error(&self, handle: Handle) -> Option<&Error> {
        self.channels[handle].closed.get()
    }

    pub(crate) fn epoch(&self, handle: Handle) -> u64 {
        self.channels[handle].epoch.load(Ordering::Acquire)
    }

    pub(crate) fn is_blocked(&self) -> bool {
        self.blocked.is_up()
    }

    pub(crate) fn is_recovering(&self) -> bool {
        self.recovering.is_up()
    }

    pub(crate) fn open_channel(&mut self) -> CallId {
        if let Some(error) = self.error.get().cloned() {
            return self.call(Pending::Now(Some(Answer::Opened(Err(Some(error))))));
        }
        let closed = Arc::new(OnceLock::new());
        let epoch = Arc::new(AtomicU64::new(0));
        let (reply, answer) = oneshot::channel();
        self.commands.push_back(Command::OpenChannel {
            closed: closed.clone(),
            epoch: epoch.clone(),
            hook_owned: false,
            reply,
        });
        self.call(Pending::Open {
            answer,
            closed,
            epoch,
        })
    }

    /// `Channel::close` (awaited) or the drop of its last handle (not).
    pub(crate) fn close_channel(&mut self, handle: Handle, awaited: bool) -> Option<CallId> {
        let channel = self.channels[handle].target;
        if !awaited {
            self.control.push_back(Command::CloseChannel {
                channel,
                reply: None,
            });
            return None;
        }
        let (reply, answer) = oneshot::channel();
        self.commands.push_back(Command::CloseChannel {
            channel,
            reply: Some(reply),
        });
        Some(self.call(Pending::Done(answer)))
    }

    /// A synchronous method (`Channel::rpc`).
    pub(crate) fn rpc(&mut self, handle: Handle, method: Method) -> CallId {
        if let Some(error) = self.refused(handle) {
            return self.call(Pending::Now(Some(Answer::Reply(Err(Some(error))))));
        }
        let (reply, answer) = oneshot::channel();
        self.commands.push_back(Command::Rpc {
            channel: self.channels[handle].target,
            method: Box::new(method),
            reply,
        });
        self.call(Pending::Rpc(answer))
    }

    /// A method without a reply (`ChannelRpc::send`): no-wait methods.
    pub(crate) fn send(&mut self, handle: Handle, method: Method) {
        if self.refused(handle).is_none() {
            self.commands.push_back(Command::Send {
                channel: self.channels[handle].target,
                method: Box::new(method),
            });
        }
    }

    /// `basic_publish`; in confirm mode the returned call is its confirmation.
    pub(crate) fn publish(
        &mut self,
        handle: Handle,
        publish: &basic::Publish,
        properties: &BasicProperties,
        body: Bytes,
        confirm: bool,
    ) -> Option<CallId> {
        if let Some(error) = self.refused(handle) {
            return confirm
                .then(|| self.call(Pending::Now(Some(Answer::Confirm(Err(Some(error)))))));
        }
        let channel = self.channels[handle].id;
        let mut head = BytesMut::new();
        frame::write_publish_method(&mut head, channel, publish);
        frame::write_header(&mut head, channel, body.len() as u64, properties);
        let credit = self.budget.try_credit((head.len() + body.len()) as u64);
        let (sender, answer) = if confirm {
            let (sender, answer) = oneshot::channel();
            (Some(sender), Some(answer))
        } else {
            (None, None)
        };
        self.commands.push_back(Command::Publish {
            channel: self.channels[handle].target,
            head: head.freeze(),
            body: PublishBody(body),
            confirm: sender,
            credit,
        });
        answer.map(|answer| self.call(Pending::Confirm(answer)))
    }

    /// `basic_consume`; the consumer's stream has room for `buffer` deliveries.
    pub(crate) fn consume(
        &mut self,
        handle: Handle,
        consume: basic::Consume,
        buffer: usize,
    ) -> (CallId, Option<ConsumerId>) {
        if let Some(error) = self.refused(handle) {
            let call = self.call(Pending::Now(Some(Answer::Reply(Err(Some(error))))));
            return (call, None);
        }
        let (deliveries, receiver) = mpsc::channel(buffer.max(1));
        let end = Arc::new(OnceLock::new());
        let (reply, answer) = oneshot::channel();
        let consumer = self.next_consumer;
        self.next_consumer += 1;
        self.consumers.insert(
            consumer,
            ConsumerHandle {
                channel: handle,
                tag: consume.consumer_tag.clone(),
                no_ack: consume.no_ack,
                receiver,
                end: end.clone(),
            },
        );
        self.commands.push_back(Command::Consume {
            channel: self.channels[handle].target,
            consume: Box::new(consume),
            deliveries,
            end,
            reply,
        });
        (
            self.call(Pending::Consume(answer, consumer)),
            Some(consumer),
        )
    }

    /// Consumer `id`'s tag, while the handle has it.
    pub(crate) fn consumer_tag(&self, id: ConsumerId) -> Option<ShortString> {
        self.consumers.get(&id).map(|c| c.tag.clone())
    }

    pub(crate) fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// Why consumer `id` ended, if the machine recorded it.
    pub(crate) fn consumer_end(&self, id: ConsumerId) -> Option<&Error> {
        self.consumers.get(&id).and_then(|c| c.end.get())
    }

    /// Up to `max` deliveries from consumer `id`'s stream.
    pub(crate) fn receive(&mut self, id: ConsumerId, max: usize) -> Received {
        let mut received = Received::default();
        let Some(consumer) = self.consumers.get_mut(&id) else {
            return received;
        };
        while received.deliveries.len() < max {
            match consumer.receiver.try_recv() {
                Ok(raw) => {
                    let properties = raw.content.properties.get();
                    received.deliveries.push(SimDelivery {
                        tag: raw.deliver.delivery_tag,
                        consumer_tag: raw.deliver.consumer_tag,
                        message_id: message_id(properties),
                        body: raw.content.body,
                        epoch: raw.epoch,
                    });
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    received.ended = Some(consumer.end.get().cloned());
                    break;
                }
            }
        }
        received
    }

    /// The drop of a `Consumer`: its buffered deliveries go back (see
    /// `consumer.rs`), and the machine forgets it.
    pub(crate) fn drop_consumer(&mut self, id: ConsumerId) {
        let Some(mut consumer) = self.consumers.remove(&id) else {
            return;
        };
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
                tag: consumer.tag,
                requeue,
                requeue_epoch: epoch,
            });
        }
    }

    /// An ack, nack or reject of a delivery of `epoch`, as `Delivery` sends
    /// it: refused (false) on a closed channel or a stale epoch.
    pub(crate) fn settle(&mut self, handle: Handle, settlement: Settlement, epoch: u64) -> bool {
        if self.refused(handle).is_some() || self.epoch(handle) != epoch {
            return false;
        }
        self.commands.push_back(Command::Settle {
            channel: self.channels[handle].id,
            settlement,
            epoch,
        });
        true
    }

    pub(crate) fn wait_for_confirms(&mut self, handle: Handle) -> CallId {
        if let Some(error) = self.refused(handle) {
            return self.call(Pending::Now(Some(Answer::Confirms(Err(Some(error))))));
        }
        let (reply, answer) = oneshot::channel();
        self.commands.push_back(Command::WaitForConfirms {
            channel: self.channels[handle].target,
            reply,
        });
        self.call(Pending::Confirms(answer))
    }

    /// Starts listening for returned messages on `handle`.
    pub(crate) fn listen_returns(&mut self, handle: Handle) {
        if self.refused(handle).is_none() {
            let (returns, receiver) = mpsc::channel(16);
            self.commands.push_back(Command::SetReturns {
                channel: self.channels[handle].target,
                returns,
            });
            self.returns.insert(handle, receiver);
        }
    }

    /// Returned messages received on `handle`'s listener: their message ids.
    pub(crate) fn take_returns(&mut self, handle: Handle) -> Vec<Option<String>> {
        let mut ids = Vec::new();
        if let Some(receiver) = self.returns.get_mut(&handle) {
            while let Ok(message) = receiver.try_recv() {
                ids.push(message_id(message.properties.get()));
            }
        }
        ids
    }

    pub(crate) fn close_connection(&mut self) {
        self.control.push_back(Command::CloseConnection {
            code: ReplyCode::REPLY_SUCCESS,
            text: "closed by the simulation".to_owned(),
        });
    }

    /// The answers that came since the last poll.
    pub(crate) fn poll_answers(&mut self) -> Vec<(CallId, Answer)> {
        let mut answers = Vec::new();
        let mut index = 0;
        while index < self.calls.len() {
            match self.poll_call(index) {
                Some(answer) => {
                    let (id, _) = self.calls.swap_remove(index);
                    answers.push((id, answer));
                }
                None => index += 1,
            }
        }
        answers.sort_by_key(|(id, _)| *id);
        answers
    }

    fn poll_call(&mut self, index: usize) -> Option<Answer> {
        fn take<T>(answer: &mut oneshot::Receiver<Result<T, Error>>) -> Option<Outcome<T>> {
            match answer.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => None,
                Err(oneshot::error::TryRecvError::Closed) => Some(Err(None)),
                Ok(result) => Some(result.map_err(Some)),
            }
        }
        let answer = match &mut self.calls[index].1 {
            Pending::Now(answer) => answer.take()?,
            Pending::Open {
                answer,
                closed,
                epoch,
            } => {
                let outcome = take(answer)?;
                let (closed, epoch) = (closed.clone(), epoch.clone());
                Answer::Opened(outcome.map(|target| {
                    self.channels.push(ChannelHandle {
                        id: target.id,
                        target,
                        closed,
                        epoch,
                    });
                    self.channels.len() - 1
                }))
            }
            Pending::Rpc(answer) => Answer::Reply(take(answer)?.map(sim_reply)),
            Pending::Consume(answer, consumer) => {
                let consumer = *consumer;
                let outcome = take(answer)?;
                if outcome.is_err() {
                    // `basic_consume` returns the error: its stream is dropped.
                    self.consumers.remove(&consumer);
                }
                Answer::Reply(outcome.map(sim_reply))
            }
            Pending::Confirm(answer) => Answer::Confirm(take(answer)?),
            Pending::Confirms(answer) => Answer::Confirms(take(answer)?),
            Pending::Done(answer) => Answer::Done(take(answer)?),
        };
        Some(answer)
    }

    /// How many calls wait for an answer.
    pub(crate) fn calls_waiting(&self) -> usize {
        self.calls.len()
    }

    /// Recovery events since the last look.
    pub(crate) fn recovery_events(&mut self) -> Vec<RecoveryEvent> {
        let mut events = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            events.push(event);
        }
        events
    }

    // The I/O task's side.

    /// What `Driver::run_session` does after any event: parked deliveries
    /// that fit now, the commands queued meanwhile, and a machine that
    /// closed takes (and refuses) what is left in the queues.
    pub(crate) fn pump(&mut self, now: Instant) {
        self.serve_parked(now);
        if self.machine.accepts_commands() {
            // The control queue's branch first takes the command queue.
            for command in self.commands.drain(..) {
                self.machine.command(command, now);
            }
        }
        while let Some(command) = self.control.pop_front() {
            if self.machine.accepts_commands() {
                for command in self.commands.drain(..) {
                    self.machine.command(command, now);
                }
            }
            self.machine.command(command, now);
        }
        if self.machine.accepts_commands() || self.machine.is_closed() {
            for command in self.commands.drain(..) {
                self.machine.command(command, now);
            }
        }
        self.route();
    }

    fn serve_parked(&mut self, now: Instant) {
        while let Some(sender) = self.machine.parked_outlet().cloned() {
            match sender.try_reserve_owned() {
                Ok(permit) => self.machine.unpark(
                    |delivery| {
                        permit.send(delivery);
                    },
                    now,
                ),
                Err(TrySendError::Full(_)) => break,
                Err(TrySendError::Closed(_)) => self.machine.drop_parked(),
            }
            self.route();
            self.handle_input();
        }
    }

    /// Whether the socket is attached and the machine reads it.
    pub(crate) fn wants_to_read(&self) -> bool {
        self.connected && !self.machine.is_paused()
    }

    /// Bytes read from the socket at `now`.
    pub(crate) fn feed(&mut self, bytes: &[u8], now: Instant) {
        if bytes.is_empty() || !self.connected {
            return;
        }
        self.read_buf.extend_from_slice(bytes);
        self.machine.on_received(now);
        self.handle_input();
    }

    fn handle_input(&mut self) {
        while self.connected
            && !self.machine.is_paused()
            && !self.machine.is_closed()
            && !self.machine.is_interrupted()
        {
            match self.decoder.decode(&mut self.read_buf) {
                Ok(Some(frame)) => {
                    if let Err(error) = self.machine.handle_frame(frame) {
                        self.machine.protocol_error(error);
                    }
                }
                Ok(None) => break,
                Err(error) => self.machine.protocol_error(Error::Protocol(error)),
            }
            self.route();
        }
    }

    /// Delivers what the machine produced to the handles' ends, as
    /// `Driver::route` does after each thing the machine is handed.
    fn route(&mut self) {
        route(&mut self.machine, &self.signals);
    }

    /// What the machine writes, up to about `budget` bytes, at `now`.
    pub(crate) fn take_written(&mut self, budget: usize, now: Instant) -> Bytes {
        if !self.connected || !self.machine.wants_to_write() {
            return Bytes::new();
        }
        let mut buf = BytesMut::new();
        self.machine.write_frames(&mut buf, budget);
        if !buf.is_empty() {
            self.machine.on_sent(now);
        }
        buf.freeze()
    }

    /// The socket's end once the machine is closed or interrupted: its last
    /// frames (a close-ok, a close), then nothing more on this socket.
    pub(crate) fn end_session(&mut self) -> Option<Bytes> {
        if !self.connected || !(self.machine.is_closed() || self.machine.is_interrupted()) {
            return None;
        }
        let mut last = BytesMut::new();
        self.machine.write_frames(&mut last, usize::MAX);
        self.connected = false;
        self.read_buf.clear();
        let _ = self.machine.take_loss();
        Some(last.freeze())
    }

    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        self.machine.next_timeout()
    }

    /// Time is `now`: the timer fires if it is due.
    pub(crate) fn advance(&mut self, now: Instant) {
        if self.machine.next_timeout().is_some_and(|at| at <= now) {
            self.machine.handle_timeout(now);
            self.route();
        }
    }

    /// The socket failed (a read or write error, an EOF).
    pub(crate) fn lose_socket(&mut self, what: &str) {
        if self.connected {
            self.machine
                .connection_lost(Error::ConnectionLost(Arc::new(std::io::Error::other(
                    what.to_owned(),
                ))));
            self.route();
        }
    }

    pub(crate) fn is_interrupted(&self) -> bool {
        self.machine.is_interrupted()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.machine.is_closed()
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    /// A new socket after a handshake with these limits.
    pub(crate) fn resume(&mut self, channel_max: u16, heartbeat: Duration, now: Instant) {
        self.connected = true;
        self.decoder = FrameDecoder::new(self.frame_max);
        self.read_buf.clear();
        self.machine
            .resume(channel_max, self.frame_max, heartbeat, now);
        self.route();
        self.handle_input();
    }

    /// Recovery gave up.
    pub(crate) fn give_up(&mut self) {
        self.machine
            .fail(Error::ConnectionLost(Arc::new(std::io::Error::other(
                "recovery gave up",
            ))));
        self.route();
    }

    /// Bytes of deliveries the machine holds for consumers that do not keep up.
    pub(crate) fn buffered_bytes(&self) -> usize {
        self.machine.overflow_bytes()
    }

    /// Whether deliveries wait in the machine or in a consumer's stream.
    pub(crate) fn deliveries_waiting(&self) -> bool {
        self.machine.overflow_bytes() > 0 || self.consumers.values().any(|c| !c.receiver.is_empty())
    }

    /// Bytes read but not yet taken by the machine.
    pub(crate) fn unread_bytes(&self) -> usize {
        self.read_buf.len()
    }

    /// Whether publish credit is all back (nothing queued or written half).
    pub(crate) fn publish_credit_back(&self) -> bool {
        self.budget.try_credit(PUBLISH_BUDGET).is_some()
    }
}

fn sim_reply(reply: Reply) -> SimReply {
    SimReply {
        content: reply
            .content
            .map(|content| (message_id(content.properties.get()), content.body)),
        method: reply.method,
        epoch: reply.epoch,
    }
}
