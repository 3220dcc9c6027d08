//! The connection's protocol state, free of I/O: frames and commands go in,
//! frames to write come out, and time is an argument. The I/O task (`io.rs`)
//! drives it; `tests/` and the simulator drive it without sockets. It owns
//! no channel to the handles and uses no tokio type: what happened comes out
//! as events (`output.rs`). One concern per file:
//!
//! - this file: the [`Machine`], its states and settings, failing and finishing;
//! - `commands.rs`: what the handles ask, one method per command;
//! - `inbound.rs`: frames from the broker, and the replies that complete calls;
//! - `channels.rs`: per-channel state and the one call in flight per channel;
//! - `outgoing.rs`: each channel's frame queue, served round-robin, and
//!   settlements coalesced against the unsettled tags;
//! - `content.rs`: content assembly; `body_pool.rs`: the buffers of bodies
//!   that span frames, used again; `confirms.rs`: publisher confirms;
//! - `consumers.rs`: consumers, stream offsets and delivery back-pressure;
//! - `recovery.rs`: what a lost connection keeps, and the recovery steps;
//! - `timers.rs`: heartbeats and the close deadline;
//! - `output.rs`: the events, and the [`Ports`] the handles' ends are typed by.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::credit::CreditReturns;
use crate::topology::Topology;
use crate::unsettled::{Settled, Unsettled};

use crate::error::{CloseReason, Error, Initiator};
use crate::protocol::frame::{self, BodyLen, ContentHeader, Frame, FRAME_OVERHEAD};
use crate::protocol::methods::{basic, channel, connection, Method};
use crate::protocol::{
    FieldValue, MethodId, MethodInfo, ReceivedProperties, ReplyCode, ShortString,
};

mod body_pool;
mod channels;
mod commands;
mod confirms;
mod consumers;
mod content;
mod inbound;
mod outgoing;
mod output;
mod recovery;
mod timers;

use self::body_pool::BodyPool;
use self::channels::*;
pub(crate) use self::channels::{ChannelRef, Reply};
pub(crate) use self::commands::Command;
use self::commands::APPLICATION_CLOSE;
use self::confirms::*;
use self::consumers::*;
pub(crate) use self::consumers::{ConsumerEnd, RawDelivery};
use self::content::*;
pub(crate) use self::content::{Content, PublishBody};
use self::outgoing::*;
pub(crate) use self::outgoing::{FrameSink, Settlement};
use self::output::Output;
pub(crate) use self::output::{Event, Ports, Refused};
use self::recovery::*;
use crate::events::{Confirmation, RecoveryEvent, ReturnedMessage};

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

/// The connection state machine, generic over the handles' ends ([`Ports`]).
pub(crate) struct Machine<P: Ports> {
    settings: Settings,
    state: State,
    channels: ChannelMap<P>,
    /// Channels with frames to send, served round-robin.
    ready: VecDeque<u16>,
    /// Connection frames (channel 0) and the close-ok of channels already
    /// forgotten, sent before any channel's queue.
    control: VecDeque<(u16, Method)>,
    heartbeat_due: bool,
    secret_replies: VecDeque<P::Reply<Result<(), Error>>>,
    last_received: Instant,
    last_sent: Instant,
    /// The next channel epoch: each channel open and each reconnect gives a
    /// channel a value never used before on this connection, so that a tag
    /// of an earlier incarnation (before a reconnect, or of a closed channel
    /// whose id was reused) is never taken for a current one.
    next_epoch: u64,
    /// The incarnation of the channel opened last (see [`ChannelRef`]).
    next_incarnation: u32,
    /// Why the connection ended; shared with every handle.
    error: Arc<OnceLock<Error>>,
    /// Deliveries waiting for room in their consumer's buffer, in arrival
    /// order. While there are any, the socket is still read (RPC replies and
    /// confirms keep flowing, so a consumer that awaits a call while its
    /// buffer is full does not deadlock); once they hold more than
    /// `OVERFLOW_LIMIT` bytes, reading stops and TCP pushes back.
    overflow: VecDeque<Parked<P>>,
    overflow_bytes: usize,
    /// Credit of publishes written since the last batch.
    credit_returns: CreditReturns,
    topology: Topology,
    recovery: Option<RecoveryRun>,
    /// What happened and is not yet taken by the driver.
    output: Output<P>,
    last_loss: Option<Error>,
    /// The application's connection.close, held until the channels' queues
    /// are written.
    closing_frame: Option<Method>,
    /// The close was put in the write buffer; its timeout starts when written.
    close_written: bool,
    /// Channels whose close crossed the broker's: the broker answers ours
    /// with a close-ok after the channel is gone (RabbitMQ does).
    crossed_closes: Vec<u16>,
    bodies: Bodies,
}

/// The buffers of bodies that span frames, and when one was last filled.
#[derive(Default)]
struct Bodies {
    pool: BodyPool,
    /// When a body last took or grew a buffer (the time of the read it came
    /// in); `None` once the pool was released.
    used_at: Option<Instant>,
}

fn unexpected(what: String) -> Error {
    Error::UnexpectedFrame(what)
}

fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl<P: Ports> Machine<P> {
    pub(crate) fn new(settings: Settings, now: Instant, error: Arc<OnceLock<Error>>) -> Self {
        Self {
            topology: Topology::default(),
            recovery: None,
            output: Output::default(),
            last_loss: None,
            closing_frame: None,
            close_written: false,
            crossed_closes: Vec::new(),
            bodies: Bodies::default(),
            settings,
            state: State::Open,
            channels: ChannelMap::default(),
            ready: VecDeque::new(),
            control: VecDeque::new(),
            heartbeat_due: false,
            secret_replies: VecDeque::new(),
            last_received: now,
            last_sent: now,
            next_epoch: 1,
            next_incarnation: 0,
            error,
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

    /// A channel epoch never used before on this connection.
    fn fresh_epoch(&mut self) -> u64 {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        epoch
    }

    fn closed_error(&self) -> Error {
        self.error.get().cloned().unwrap_or_else(|| {
            Error::connection_closed(CloseReason::by_application(
                ReplyCode::REPLY_SUCCESS,
                "connection closed",
            ))
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

    /// Ends the connection with `error`, failing everything that waits.
    pub(crate) fn fail(&mut self, error: Error) {
        if !self.is_closed() && self.recovery.is_some() || self.is_interrupted() {
            self.output.report(RecoveryEvent::Failed {
                error: error.clone(),
            });
        }
        self.recovery = None;
        self.output.push(Event::Recovering(false));
        // Publishers waiting for an unblock learn the error instead.
        self.output.push(Event::Blocked(None));
        let _ = self.error.set(error);
        let error = self.closed_error();
        for (_, mut state) in self.channels.drain() {
            state.fail(&error, &mut self.output);
        }
        for reply in self.secret_replies.drain(..) {
            self.output.answer(reply, Err(error.clone()));
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

    /// How many channels the connection holds: opening, open, closing, or
    /// waiting to be recovered (the `metrics` feature's gauge).
    pub(crate) fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Why the connection ended, once it has.
    pub(crate) fn error(&self) -> Option<&Error> {
        self.error.get()
    }
}

#[cfg(test)]
mod tests;
