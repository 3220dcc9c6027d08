//! What the machine hands out, as quinn-proto's `poll_event` does: the
//! machine owns no channel to the handles. It takes their ends as opaque
//! values (typed by [`Ports`]), and queues an [`Event`] for each thing that
//! happened: a reply for a waiting call, a delivery for a consumer, a
//! publish's confirmation, a returned message, a recovery event, a change of
//! the blocked or recovering state. The I/O task delivers them
//! (`ports.rs`); the simulator and the tests read them directly.

use super::*;

/// The handles' ends of what the machine answers, as the driver chose them
/// (tokio channels in the connection, plain queues in a simulation). The
/// machine only stores and hands back these values.
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
}

/// Something that happened, for the driver to deliver.
pub(crate) enum Event<P: Ports> {
    /// A channel opened (or failed to); the driver tells the machine with
    /// [`Machine::open_abandoned`] when nobody waits for it any more.
    ChannelOpened(
        P::Reply<Result<ChannelRef, Error>>,
        Result<ChannelRef, Error>,
    ),
    /// The answer of a synchronous call.
    Replied(P::Reply<Result<Reply, Error>>, Result<Reply, Error>),
    /// A close or an update-secret done (or failed).
    Done(P::Reply<Result<(), Error>>, Result<(), Error>),
    /// The outcome of one publish in confirm mode.
    Confirmed(
        P::Reply<Result<Confirmation, Error>>,
        Result<Confirmation, Error>,
    ),
    /// Every publish of a channel is confirmed: whether all were acked.
    ConfirmsSettled(P::Reply<Result<bool, Error>>, Result<bool, Error>),
    /// A delivery for the consumer it names on `channel`: the driver offers
    /// it to [`Machine::deliveries_of`] and hands it back with
    /// [`Machine::refused`] when the buffer is full or gone.
    Delivery { channel: u16, delivery: RawDelivery },
    /// A message the broker returned, for the channel's returns stream.
    Returned(P::Returns, Box<ReturnedMessage>),
    /// A report of recovery.
    Recovery(RecoveryEvent),
    /// The connection is lost or being recovered (`true`), or back.
    Recovering(bool),
    /// `Some(reason)` while the broker blocks publishers.
    Blocked(Option<String>),
}

/// The answer types of calls, each with its [`Event`].
pub(crate) trait Answer<P: Ports>: Sized {
    fn event(to: P::Reply<Self>, value: Self) -> Event<P>;
}

macro_rules! answers {
    ($($type:ty => $variant:ident),* $(,)?) => {
        $(impl<P: Ports> Answer<P> for Result<$type, Error> {
            fn event(to: P::Reply<Self>, value: Self) -> Event<P> {
                Event::$variant(to, value)
            }
        })*
    };
}

answers! {
    ChannelRef => ChannelOpened,
    Reply => Replied,
    () => Done,
    Confirmation => Confirmed,
    bool => ConfirmsSettled,
}

/// The queue of events not yet taken by the driver.
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
}

/// Why the driver gave a delivery back.
pub(crate) enum Refused {
    /// The consumer's buffer is full: the delivery waits (is parked).
    Full(RawDelivery),
    /// The consumer is gone: the delivery goes back to the queue.
    Gone(RawDelivery),
}

impl<P: Ports> Machine<P> {
    /// The next thing that happened, oldest first. A delivery for a consumer
    /// that already has deliveries parked is parked behind them instead, so
    /// that each consumer gets its deliveries in order.
    pub(crate) fn poll_event(&mut self) -> Option<Event<P>> {
        loop {
            let event = self.output.events.pop_front()?;
            match event {
                Event::Delivery { channel, delivery }
                    if !self.overflow.is_empty() && self.has_parked(channel, &delivery) =>
                {
                    self.park(channel, delivery);
                }
                event => return Some(event),
            }
        }
    }

    /// The buffer of the consumer a delivery on `channel` names, if it still
    /// consumes there.
    pub(crate) fn deliveries_of(&self, channel: u16, tag: &ShortString) -> Option<&P::Deliveries> {
        self.channels
            .get(&channel)?
            .consumers
            .get(tag)
            .map(|slot| &slot.deliveries)
    }

    /// The driver could not hand over a delivery of [`Event::Delivery`].
    pub(crate) fn refused(&mut self, channel: u16, refused: Refused) {
        match refused {
            Refused::Full(delivery) => self.park(channel, delivery),
            Refused::Gone(delivery) => self.requeue_gone(channel, &delivery),
        }
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
