//! What the machine hands out, as quinn-proto's `poll_event` does: the
//! machine owns no channel to the handles. It takes their ends as opaque
//! values (typed by [`Ports`]), and queues an [`Event`] for what happened:
//! a reply to a waiting call, a publish's confirmation, a returned message,
//! a recovery event, a change of the blocked or recovering state. The I/O
//! task delivers them (`ports.rs`); the simulator and the tests read them
//! directly.
//!
//! Deliveries are the exception, for speed: each is offered to its
//! consumer's buffer as it completes, through [`Ports::offer`], which the
//! driver implements (it must not wait; a full buffer parks the delivery in
//! the machine). Queued as events, a delivery (208 bytes) was copied into
//! the queue and out of it and its consumer looked up a second time: 11%
//! more instructions per frame on the consume path (callgrind).

use super::*;

/// The handles' ends of what the machine answers, as the driver chose them
/// (tokio's oneshots and channels in the connection, `ports::TokioPorts`;
/// any other non-blocking ends a harness likes). The machine only stores and
/// hands back these values, and offers deliveries through [`Ports::offer`].
pub(crate) trait Ports {
    /// Where one waiting call's answer goes.
    type Reply<T>;
    /// A consumer's buffer of deliveries; dropping it ends the consumer's stream.
    type Deliveries: Clone;
    /// A channel's stream of returned messages.
    type Returns: Clone;
    /// Whether the consumer reading `deliveries` is gone (dropped its end).
    fn is_gone(deliveries: &Self::Deliveries) -> bool;
    /// Whether two buffers are the same consumer's.
    fn same_consumer(a: &Self::Deliveries, b: &Self::Deliveries) -> bool;
    /// Puts `delivery` in a consumer's buffer if it has room, without
    /// waiting; gives it back, and why, when the buffer does not take it.
    fn offer(deliveries: &Self::Deliveries, delivery: RawDelivery) -> Option<Refused>;
}

/// Something that happened, for the driver to deliver. Kept small (32
/// bytes): an event is copied into the queue and out of it, one per
/// confirmed publish, so what is rare or large is boxed.
pub(crate) enum Event<P: Ports> {
    /// A channel opened (or failed to); the driver tells the machine with
    /// [`Machine::open_abandoned`] when nobody waits for it any more.
    ChannelOpened(
        P::Reply<Result<ChannelRef, Error>>,
        Box<Result<ChannelRef, Error>>,
    ),
    /// The answer of a synchronous call.
    Replied(P::Reply<Result<Reply, Error>>, Box<Result<Reply, Error>>),
    /// A close or an update-secret done (or failed).
    Done(P::Reply<Result<(), Error>>, Box<Result<(), Error>>),
    /// The outcome of one publish in confirm mode.
    Confirmed(P::Reply<Result<Confirmation, Error>>, Outcome),
    /// Every publish of a channel is confirmed: whether all were acked.
    ConfirmsSettled(P::Reply<Result<bool, Error>>, Box<Result<bool, Error>>),
    /// A message the broker returned, for the channel's returns stream.
    Returned(P::Returns, Box<ReturnedMessage>),
    /// A report of recovery.
    Recovery(Box<RecoveryEvent>),
    /// The connection is lost or being recovered (`true`), or back.
    Recovering(bool),
    /// `Some(reason)` while the broker blocks publishers.
    Blocked(Option<String>),
}

/// The outcome of a publish, unboxed in the common cases.
pub(crate) enum Outcome {
    Ack,
    Nack,
    Other(Box<Result<Confirmation, Error>>),
}

impl Outcome {
    fn of(outcome: Result<Confirmation, Error>) -> Self {
        match outcome {
            Ok(Confirmation::Ack) => Self::Ack,
            Ok(Confirmation::Nack) => Self::Nack,
            other => Self::Other(Box::new(other)),
        }
    }

    /// What the publisher gets.
    pub(crate) fn into_result(self) -> Result<Confirmation, Error> {
        match self {
            Self::Ack => Ok(Confirmation::Ack),
            Self::Nack => Ok(Confirmation::Nack),
            Self::Other(outcome) => *outcome,
        }
    }
}

/// The answer types of calls, each with its [`Event`].
pub(crate) trait Answer<P: Ports>: Sized {
    fn event(to: P::Reply<Self>, value: Self) -> Event<P>;
}

macro_rules! boxed_answers {
    ($($type:ty => $variant:ident),* $(,)?) => {
        $(impl<P: Ports> Answer<P> for Result<$type, Error> {
            fn event(to: P::Reply<Self>, value: Self) -> Event<P> {
                Event::$variant(to, Box::new(value))
            }
        })*
    };
}

boxed_answers! {
    ChannelRef => ChannelOpened,
    Reply => Replied,
    () => Done,
    bool => ConfirmsSettled,
}

impl<P: Ports> Answer<P> for Result<Confirmation, Error> {
    fn event(to: P::Reply<Self>, value: Self) -> Event<P> {
        Event::Confirmed(to, Outcome::of(value))
    }
}

/// What happened and is not yet taken by the driver.
pub(crate) struct Output<P: Ports> {
    events: VecDeque<Event<P>>,
}

impl<P: Ports> Default for Output<P> {
    fn default() -> Self {
        Self {
            events: VecDeque::new(),
        }
    }
}

impl<P: Ports> Output<P> {
    /// Answers a waiting call.
    pub(super) fn answer<T: Answer<P>>(&mut self, to: P::Reply<T>, value: T) {
        self.events.push_back(T::event(to, value));
    }

    pub(super) fn push(&mut self, event: Event<P>) {
        self.events.push_back(event);
    }

    /// Reports what recovery did.
    pub(super) fn report(&mut self, event: RecoveryEvent) {
        self.events.push_back(Event::Recovery(Box::new(event)));
    }
}

/// Why a consumer's buffer did not take a delivery.
pub(crate) enum Refused {
    /// The consumer's buffer is full: the delivery waits (is parked).
    Full(RawDelivery),
    /// The consumer is gone: the delivery goes back to the queue.
    Gone(RawDelivery),
}

impl<P: Ports> Machine<P> {
    /// The next thing that happened, oldest first.
    pub(crate) fn poll_event(&mut self) -> Option<Event<P>> {
        self.output.events.pop_front()
    }

    /// Nobody waits for the channel opened as `opened` any more (the caller
    /// gave up, e.g. at a call timeout): no handle will ever use or close
    /// it, so it is closed now.
    pub(crate) fn open_abandoned(&mut self, opened: ChannelRef) {
        if self.is_current(opened) && self.has_socket() {
            self.begin_close(opened.id);
        }
    }
}
