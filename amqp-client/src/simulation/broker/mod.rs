//! A model of a RabbitMQ node for the simulator: it reads the client's
//! frames, keeps entities and messages (`store.rs`), answers channel methods
//! as RabbitMQ does (`channel.rs`), and checks the client's side of the
//! protocol as it goes. Where RabbitMQ would close the connection for the
//! client's fault (an unknown delivery tag is a channel error there, but
//! never the application's doing here), the model panics: that is a bug in
//! the machine.
//!
//! One connection at a time (the client's); the store outlives it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::protocol::frame::{self, Frame, FrameDecoder};
use crate::protocol::methods::{basic, channel, connection, Method};
use crate::protocol::{BasicProperties, ReplyCode, ShortString};

use super::Rng;

mod channels;
mod declare;
mod delivery;
pub(crate) mod store;

use store::{Message, Store};

/// What the broker reached, for the tests' minimum counts.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct BrokerReached {
    pub deliveries: u64,
    pub gets: u64,
    pub confirms: u64,
    pub nacks: u64,
    pub returns: u64,
    pub server_cancels: u64,
    pub channel_errors: u64,
    pub acks: u64,
    pub requeues: u64,
    pub commits: u64,
    pub dead_tags_settled: u64,
}

/// A message being received on a channel: its method, then header and body.
pub(super) struct Incoming {
    publish: basic::Publish,
    header: Option<(BasicProperties, u64)>,
    body: BytesMut,
}

/// A delivered message the channel's broker side waits to be settled for.
pub(super) struct Unacked {
    queue: ShortString,
    message: Message,
    /// The consumer it went to (`None` for a get).
    consumer: Option<ShortString>,
}

pub(super) struct Consumer {
    queue: ShortString,
    no_ack: bool,
    exclusive: bool,
    prefetch: u16,
    unacked: u32,
}

/// Publishes and settlements a transaction holds until commit.
#[derive(Default)]
pub(super) struct Tx {
    publishes: Vec<(basic::Publish, Message)>,
    /// Settlements taken from `unacked`: back there on rollback.
    settled: Vec<(u64, Unacked, channels::Settle)>,
}

#[derive(Default)]
pub(super) struct BrokerChannel {
    /// The broker sent `channel.close` and ignores all but the close handshake.
    closing: bool,
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    /// Tags requeued by `basic.recover`: settling one is the application's
    /// mistake (RabbitMQ answers 406), not the machine's.
    dead_tags: HashSet<u64>,
    consumers: BTreeMap<ShortString, Consumer>,
    /// `basic.qos` with global=false: for consumers started later.
    consumer_prefetch: u16,
    /// `basic.qos` with global=true: shared by the channel's consumers.
    channel_prefetch: u16,
    confirm_seq: Option<u64>,
    tx: Option<Tx>,
    incoming: Option<Incoming>,
    /// Where the reply to the last synchronous request ends in the output
    /// (`u64::MAX` until it is written there).
    reply_end: Option<u64>,
}

/// The client's connection as the broker sees it.
pub(super) struct Conn {
    generation: u64,
    channels: BTreeMap<u16, BrokerChannel>,
    /// Bytes for the client, and how many were ever put there.
    out: BytesMut,
    out_total: u64,
    /// Frames produced by one batch, per channel, interleaved when flushed.
    pending: BTreeMap<u16, VecDeque<(Bytes, bool)>>,
    /// Confirms owed per channel (sequence number, ack), sent at a flush.
    confirms_due: BTreeMap<u16, Vec<(u64, bool)>>,
    inbound: BytesMut,
    decoder: FrameDecoder,
    /// The broker sent `connection.close`: waiting for close-ok.
    closing: bool,
    /// Over: the socket closes once the client read `out`.
    dead: bool,
    blocked: bool,
    /// A publish arrived while blocked: reading stops until unblocked.
    stalled: bool,
    last_received: Instant,
    last_sent: Instant,
}

/// The model node.
pub(crate) struct Broker {
    pub(crate) store: Store,
    conn: Option<Conn>,
    generation: u64,
    frame_max: u32,
    channel_max: u16,
    heartbeat: Duration,
    next_ctag: u64,
    /// (channel, delivery tag, message id, consumer tag) of every delivery.
    delivered: HashSet<(u16, u64, String, ShortString)>,
    pub(crate) reached: BrokerReached,
    /// Print every frame both ways (for a replay's trace).
    pub(crate) trace: bool,
}

/// The client broke the protocol: a bug in the machine.
#[track_caller]
pub(super) fn violation(what: String) -> ! {
    panic!("protocol violation by the client: {what}")
}

impl Broker {
    pub(crate) fn new(frame_max: u32, channel_max: u16) -> Self {
        Self {
            store: Store::new(),
            conn: None,
            generation: 0,
            frame_max,
            channel_max,
            heartbeat: Duration::ZERO,
            next_ctag: 0,
            delivered: HashSet::new(),
            reached: BrokerReached::default(),
            trace: false,
        }
    }

    /// A client connected (the handshake is not modelled) with `heartbeat`.
    pub(crate) fn connect(&mut self, heartbeat: Duration, now: Instant) {
        self.generation += 1;
        if self.trace {
            eprintln!("      broker: connection {}", self.generation);
        }
        self.heartbeat = heartbeat;
        self.conn = Some(Conn {
            generation: self.generation,
            channels: BTreeMap::new(),
            out: BytesMut::new(),
            out_total: 0,
            pending: BTreeMap::new(),
            confirms_due: BTreeMap::new(),
            inbound: BytesMut::new(),
            decoder: FrameDecoder::new(self.frame_max),
            closing: false,
            dead: false,
            blocked: false,
            stalled: false,
            last_received: now,
            last_sent: now,
        });
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Over, with everything for the client read: the socket closes.
    pub(crate) fn socket_closes(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.dead && c.out.is_empty())
    }

    pub(crate) fn output_len(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.out.len())
    }

    /// Up to `max` bytes for the client.
    pub(crate) fn take_output(&mut self, max: usize) -> Bytes {
        let Some(conn) = self.conn.as_mut() else {
            return Bytes::new();
        };
        let n = max.min(conn.out.len());
        conn.out.split_to(n).freeze()
    }

    /// Whether a delivery of message `id` with `tag` went to `consumer` on `channel`.
    pub(crate) fn was_delivered(
        &self,
        channel: u16,
        tag: u64,
        id: &str,
        consumer: &ShortString,
    ) -> bool {
        self.delivered
            .contains(&(channel, tag, id.to_owned(), consumer.clone()))
    }

    // Output.

    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("a connection")
    }

    /// A connection-level frame goes out at once.
    fn send_connection(&mut self, method: &Method) {
        let conn = self.conn();
        let mut buf = BytesMut::new();
        frame::write_method(&mut buf, 0, method);
        conn.out_total += buf.len() as u64;
        conn.out.extend_from_slice(&buf);
    }

    /// A frame on a channel, behind the channel's earlier ones; `reply`
    /// marks the answer to a synchronous request.
    pub(super) fn send_frame(&mut self, channel: u16, bytes: Bytes, reply: bool) {
        if self.trace {
            let frame = FrameDecoder::new(u32::MAX).decode(&mut BytesMut::from(&bytes[..]));
            eprintln!("      broker -> {frame:?}");
        }
        self.conn()
            .pending
            .entry(channel)
            .or_default()
            .push_back((bytes, reply));
    }

    pub(super) fn send_method(&mut self, channel: u16, method: &Method, reply: bool) {
        let mut buf = BytesMut::new();
        frame::write_method(&mut buf, channel, method);
        self.send_frame(channel, buf.freeze(), reply);
    }

    /// A method with content: its frames one by one (other channels' frames
    /// may come between them, as the spec allows).
    pub(super) fn send_content(
        &mut self,
        channel: u16,
        method: &Method,
        message: &Message,
        reply: bool,
    ) {
        let mut buf = BytesMut::new();
        frame::write_method(&mut buf, channel, method);
        let method_frame = buf.split().freeze();
        frame::write_header(
            &mut buf,
            channel,
            message.body.len() as u64,
            &message.properties,
        );
        let header = buf.split().freeze();
        let body_frames: Vec<Bytes> = message
            .body
            .chunks(self.frame_max as usize - frame::FRAME_OVERHEAD)
            .map(|piece| {
                frame::write_body(&mut buf, channel, piece, self.frame_max);
                buf.split().freeze()
            })
            .collect();
        let last = body_frames.len();
        self.send_frame(channel, method_frame, false);
        self.send_frame(channel, header, reply && last == 0);
        for (i, body) in body_frames.into_iter().enumerate() {
            self.send_frame(channel, body, reply && i + 1 == last);
        }
    }

    /// Moves the batch's frames to the output, channels interleaved at random.
    pub(crate) fn flush(&mut self, rng: &mut Rng, now: Instant) {
        let owing: Vec<u16> = self
            .conn
            .as_ref()
            .map_or_else(Vec::new, |c| c.confirms_due.keys().copied().collect());
        for id in owing {
            // Sometimes held for a later flush, as RabbitMQ batches them.
            if rng.below(4) != 0 {
                let coalesce = rng.flag();
                self.emit_confirms(id, coalesce);
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if conn.pending.is_empty() {
            return;
        }
        conn.last_sent = now;
        loop {
            let ready: Vec<u16> = conn
                .pending
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(id, _)| *id)
                .collect();
            if ready.is_empty() {
                break;
            }
            let id = ready[rng.below(ready.len())];
            let Some((bytes, reply)) = conn.pending.get_mut(&id).and_then(VecDeque::pop_front)
            else {
                break;
            };
            conn.out_total += bytes.len() as u64;
            conn.out.extend_from_slice(&bytes);
            if reply {
                if let Some(channel) = conn.channels.get_mut(&id) {
                    channel.reply_end = Some(conn.out_total);
                }
            }
        }
        conn.pending.clear();
    }

    // Input.

    /// Bytes from the client.
    pub(crate) fn receive(&mut self, bytes: &[u8], now: Instant) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if conn.dead {
            return;
        }
        conn.last_received = now;
        conn.inbound.extend_from_slice(bytes);
        self.process();
    }

    /// Decodes and handles what was received, unless reading is stalled.
    fn process(&mut self) {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            if conn.dead || conn.stalled {
                return;
            }
            let before = conn.inbound.len();
            let frame = match conn.decoder.decode(&mut conn.inbound) {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(error) => violation(format!("an undecodable frame: {error}")),
            };
            let size = before - conn.inbound.len();
            if size > self.frame_max as usize {
                violation(format!(
                    "a {size}-byte frame over frame_max {}",
                    self.frame_max
                ));
            }
            if conn.blocked
                && matches!(
                    &frame,
                    Frame::Method {
                        method: Method::BasicPublish(_),
                        ..
                    }
                )
            {
                // RabbitMQ stops reading at the first publish once blocked.
                conn.stalled = true;
            }
            if self.trace {
                eprintln!("      broker <- {frame:?}");
            }
            self.frame(frame);
        }
    }

    fn frame(&mut self, frame: Frame) {
        let closing = self.conn().closing;
        match frame {
            Frame::Heartbeat => {}
            Frame::Method { channel: 0, method } => self.connection_method(method),
            Frame::Method { .. } | Frame::Header { .. } | Frame::Body { .. } if closing => {}
            Frame::Method { channel, method } => self.channel_method(channel, method),
            Frame::Header { channel, header } => {
                let properties = header.properties.get().clone();
                self.content_header(channel, properties, header.body_size);
            }
            Frame::Body { channel, payload } => self.content_body(channel, &payload),
        }
    }

    fn connection_method(&mut self, method: Method) {
        let closing = self.conn().closing;
        match method {
            Method::ConnectionClose(close) => {
                if close.reply_code != ReplyCode::REPLY_SUCCESS.code() {
                    violation(format!(
                        "the client closed the connection with {} {}",
                        close.reply_code, close.reply_text
                    ));
                }
                self.send_connection(&Method::ConnectionCloseOk(connection::CloseOk {}));
                self.end_connection();
            }
            Method::ConnectionCloseOk(_) if closing => self.end_connection(),
            Method::ConnectionUpdateSecret(_) if !closing => {
                self.send_connection(&Method::ConnectionUpdateSecretOk(
                    connection::UpdateSecretOk {},
                ));
            }
            _ if closing => {}
            other => violation(format!("{} on channel 0", other.info().name)),
        }
    }

    /// The connection is over: what it held goes back, and the socket
    /// closes once the client read what is left.
    fn end_connection(&mut self) {
        self.release_connection();
        self.conn().dead = true;
    }

    /// The socket is gone: unacked messages go back to their queues,
    /// consumers end, exclusive queues are deleted.
    pub(crate) fn drop_connection(&mut self) {
        if self.trace && self.conn.is_some() {
            eprintln!("      broker: socket closed");
        }
        if self.conn.as_ref().is_some_and(|c| !c.dead) {
            self.release_connection();
        }
        self.conn = None;
    }

    fn release_connection(&mut self) {
        let ids: Vec<u16> = self.conn().channels.keys().copied().collect();
        for id in ids {
            self.release_channel(id);
        }
        let generation = self.conn().generation;
        let exclusive: Vec<ShortString> = self
            .store
            .queues
            .iter()
            .filter(|(_, q)| q.exclusive == Some(generation))
            .map(|(name, _)| name.clone())
            .collect();
        for name in exclusive {
            self.store.delete_queue(&name);
        }
        self.conn().channels.clear();
    }

    // Time.

    /// When the broker next needs the time.
    pub(crate) fn next_timer(&self) -> Option<Instant> {
        let conn = self.conn.as_ref().filter(|c| !c.dead)?;
        if self.heartbeat.is_zero() {
            return None;
        }
        Some((conn.last_sent + self.heartbeat / 2).min(conn.last_received + self.heartbeat * 2))
    }

    /// Time is `now`: a heartbeat goes out when due. True when the client
    /// was silent for two heartbeat intervals (RabbitMQ drops the socket).
    pub(crate) fn tick(&mut self, now: Instant) -> bool {
        let heartbeat = self.heartbeat;
        let Some(conn) = self.conn.as_mut().filter(|c| !c.dead) else {
            return false;
        };
        if heartbeat.is_zero() {
            return false;
        }
        if now >= conn.last_sent + heartbeat / 2 {
            let mut buf = BytesMut::new();
            frame::write_heartbeat(&mut buf);
            conn.out_total += buf.len() as u64;
            conn.out.extend_from_slice(&buf);
            conn.last_sent = now;
        }
        // While stalled the broker reads nothing, so the silence is its own.
        !conn.stalled && now >= conn.last_received + heartbeat * 2
    }

    // Faults.

    /// `connection.close` from the broker (an operator, a node going down).
    pub(crate) fn force_close(&mut self) {
        if self.conn.as_ref().is_some_and(|c| !c.dead && !c.closing) {
            self.send_connection(&Method::ConnectionClose(connection::Close {
                reply_code: ReplyCode::CONNECTION_FORCED.code(),
                reply_text: ShortString::from_static("CONNECTION_FORCED - simulated"),
                class_id: 0,
                method_id: 0,
            }));
            self.conn().closing = true;
        }
    }

    /// A memory alarm starts (`true`) or ends.
    pub(crate) fn set_blocked(&mut self, blocked: bool) {
        let Some(conn) = self.conn.as_mut().filter(|c| !c.dead) else {
            return;
        };
        if conn.blocked == blocked {
            return;
        }
        conn.blocked = blocked;
        let method = if blocked {
            Method::ConnectionBlocked(connection::Blocked {
                reason: ShortString::from_static("low on memory"),
            })
        } else {
            conn.stalled = false;
            Method::ConnectionUnblocked(connection::Unblocked {})
        };
        self.send_connection(&method);
        if !blocked {
            self.process();
        }
    }

    pub(crate) fn is_blocked(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.blocked)
    }

    /// The open channels of the connection.
    pub(crate) fn open_channels(&self) -> Vec<u16> {
        self.conn.as_ref().map_or_else(Vec::new, |c| {
            c.channels
                .iter()
                .filter(|(_, ch)| !ch.closing)
                .map(|(id, _)| *id)
                .collect()
        })
    }

    /// Consumers of the connection: (channel, tag).
    pub(crate) fn consumers(&self) -> Vec<(u16, ShortString)> {
        let mut all = Vec::new();
        if let Some(conn) = &self.conn {
            for (id, channel) in &conn.channels {
                for tag in channel.consumers.keys() {
                    all.push((*id, tag.clone()));
                }
            }
        }
        all
    }

    /// Whether channel `id` holds settlements its transaction has not
    /// committed (the application's, or the requeue of a dropped consumer's
    /// deliveries, which joins the transaction as any nack does).
    pub(crate) fn has_uncommitted_settlements(&self, id: u16) -> bool {
        self.conn
            .as_ref()
            .and_then(|conn| conn.channels.get(&id))
            .and_then(|channel| channel.tx.as_ref())
            .is_some_and(|tx| !tx.settled.is_empty())
    }

    /// Messages delivered on the connection and not settled: (channel, tag).
    /// Transactional channels aside: a rollback undoes the requeue nacks of a
    /// dropped consumer's deliveries as it undoes the application's own
    /// settlements, and those messages stay unacked until the channel closes
    /// (as with the Java client, which never requeues them; the ledger
    /// still accounts for every one).
    pub(crate) fn unacked(&self) -> Vec<(u16, u64)> {
        let mut all = Vec::new();
        if let Some(conn) = &self.conn {
            for (id, channel) in &conn.channels {
                if channel.tx.is_some() {
                    continue;
                }
                all.extend(channel.unacked.keys().map(|tag| (*id, *tag)));
            }
        }
        all
    }

    /// Every message some queue took is still there, delivered and
    /// unsettled, or accounted for as consumed or dropped.
    pub(crate) fn check_ledger(&self) {
        let mut copies = self.store.ready_copies();
        if let Some(conn) = &self.conn {
            for channel in conn.channels.values() {
                let tx_settled = channel
                    .tx
                    .iter()
                    .flat_map(|tx| tx.settled.iter().map(|(_, u, _)| u));
                for unacked in channel.unacked.values().chain(tx_settled) {
                    *copies.entry(unacked.message.id.as_str()).or_insert(0) += 1;
                }
            }
        }
        for (id, fate) in &self.store.ledger {
            let present = copies.get(id.as_str()).copied().unwrap_or(0);
            assert_eq!(
                fate.routed,
                present + fate.consumed + fate.dropped,
                "message {id}: routed {} times, {present} copies present, {} consumed, {} dropped",
                fate.routed,
                fate.consumed,
                fate.dropped
            );
        }
    }
}

/// The `basic.deliver` of `message` to consumer `tag`.
fn deliver_method(tag: u64, consumer_tag: &ShortString, message: &Message) -> Method {
    Method::BasicDeliver(basic::Deliver {
        consumer_tag: consumer_tag.clone(),
        delivery_tag: tag,
        redelivered: message.redelivered,
        exchange: message.exchange.clone(),
        routing_key: message.routing_key.clone(),
    })
}

/// A `channel.close` for the client's request `request`.
fn channel_close(code: ReplyCode, text: &str, request: &Method) -> Method {
    let id = request.info().id;
    Method::ChannelClose(channel::Close {
        reply_code: code.code(),
        reply_text: ShortString::new(text).unwrap_or_default(),
        class_id: id.class_id,
        method_id: id.method_id,
    })
}
