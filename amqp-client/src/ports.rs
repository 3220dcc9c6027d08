//! The handles' ends of the machine's ports: tokio channels, and the
//! routing of the machine's events to them. The I/O task (`io.rs`) calls
//! [`route`] after each thing it hands the machine, before it waits again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::events::{RecoveryEvent, ReturnedMessage};
use crate::machine::{self, Event, Ports, RawDelivery, Refused};
use crate::telemetry::IoTelemetry;

/// The machine's ports as the connection's handles hold them.
#[derive(Debug)]
pub(crate) enum TokioPorts {}

impl Ports for TokioPorts {
    type Reply<T> = oneshot::Sender<T>;
    type Deliveries = mpsc::Sender<RawDelivery>;
    type Returns = mpsc::Sender<ReturnedMessage>;

    fn is_gone(deliveries: &Self::Deliveries) -> bool {
        deliveries.is_closed()
    }

    fn same_consumer(a: &Self::Deliveries, b: &Self::Deliveries) -> bool {
        a.same_channel(b)
    }

    fn offer(deliveries: &Self::Deliveries, delivery: RawDelivery) -> Option<Refused> {
        match deliveries.try_send(delivery) {
            Ok(()) => None,
            Err(TrySendError::Full(delivery)) => Some(Refused::Full(delivery)),
            Err(TrySendError::Closed(delivery)) => Some(Refused::Gone(delivery)),
        }
    }
}

/// The connection's state machine.
pub(crate) type Machine = machine::Machine<TokioPorts>;
/// What the connection's handles ask of it.
pub(crate) type Command = machine::Command<TokioPorts>;

/// A state the I/O task shows the handles: a flag for their fast path
/// (every call checks it, and a watch's `borrow` takes a lock) and a watch
/// for those that must wait. The flag is up while the value is not its
/// default.
///
/// Only the I/O task holds the watch's sender, so that those waiting on it
/// learn when the task is gone.
#[derive(Debug)]
pub(crate) struct Signal<T> {
    flag: Flag,
    watch: watch::Sender<T>,
}

/// The handles' view of a [`Signal`]'s flag.
#[derive(Debug, Clone, Default)]
pub(crate) struct Flag(Arc<AtomicBool>);

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

    pub(crate) fn set(&self, value: T) {
        self.flag.0.store(value != T::default(), Ordering::Release);
        self.watch.send_replace(value);
    }

    /// The flag, for the handles.
    pub(crate) fn flag(&self) -> Flag {
        self.flag.clone()
    }
}

/// How many recovery events a subscriber may fall behind by before it
/// misses some (`RecvError::Lagged`).
const RECOVERY_EVENTS: usize = 256;

/// The sender of the recovery events, whose broadcast channel is made when
/// the first receiver subscribes: a broadcast channel allocates all its
/// slots at once (some 28 KiB for 256 events), and most connections never
/// have a subscriber. An event sent before then goes nowhere, as it would
/// on a channel without receivers.
#[derive(Debug, Clone, Default)]
pub(crate) struct EventSender(Arc<OnceLock<broadcast::Sender<RecoveryEvent>>>);

impl EventSender {
    /// Sends `event` to every subscriber; whether there was any.
    pub(crate) fn send(&self, event: RecoveryEvent) -> bool {
        self.0
            .get()
            .is_some_and(|sender| sender.send(event).is_ok())
    }

    /// A sender whose channel holds `capacity` events, with its first
    /// receiver (for the simulator, whose runs may send many between reads).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn subscribed(capacity: usize) -> (Self, broadcast::Receiver<RecoveryEvent>) {
        let (sender, receiver) = broadcast::channel(capacity);
        (Self(Arc::new(OnceLock::from(sender))), receiver)
    }

    /// A receiver of the events sent from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<RecoveryEvent> {
        self.0
            .get_or_init(|| broadcast::channel(RECOVERY_EVENTS).0)
            .subscribe()
    }
}

/// Where the connection-wide events go.
#[derive(Debug)]
pub(crate) struct Signals {
    pub blocked: Blocked,
    pub recovering: Recovering,
    pub events: EventSender,
    /// What the I/O task counts (nothing without the `metrics` feature).
    pub telemetry: IoTelemetry,
}

impl Signals {
    /// Signals nobody listens to yet (for tests and harnesses).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn unobserved() -> Self {
        Self {
            blocked: Blocked::new().0,
            recovering: Recovering::new().0,
            events: EventSender::default(),
            telemetry: IoTelemetry::new(crate::telemetry::Telemetry::unobserved()),
        }
    }
}

/// Delivers every event the machine has to the handles' ends.
pub(crate) fn route(machine: &mut Machine, signals: &Signals) {
    while let Some(event) = machine.poll_event() {
        match event {
            Event::ChannelOpened(reply, opened) => {
                if let Err(Ok(opened)) = reply.send(*opened) {
                    machine.open_abandoned(opened);
                }
            }
            Event::Replied(reply, answer) => {
                let _ = reply.send(*answer);
            }
            Event::Done(reply, answer) => {
                let _ = reply.send(*answer);
            }
            Event::Confirmed(reply, outcome) => {
                let outcome = outcome.into_result();
                signals.telemetry.confirmed(&outcome);
                let _ = reply.send(outcome);
            }
            Event::ConfirmsSettled(reply, answer) => {
                let _ = reply.send(*answer);
            }
            Event::Returned(returns, message) => {
                signals.telemetry.returned();
                if returns.try_send(*message).is_err() {
                    tracing::warn!(
                        "returned message dropped: the returns buffer is full or closed"
                    );
                }
            }
            Event::Recovery(event) => {
                let _ = signals.events.send(*event);
            }
            Event::Recovering(recovering) => signals.recovering.set(recovering),
            Event::Blocked(blocked) => {
                signals.telemetry.blocked(blocked.is_some());
                signals.blocked.set(blocked);
            }
        }
    }
    signals.telemetry.channels(machine.channel_count());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_events_reach_the_receivers_subscribed_before_them() {
        let events = EventSender::default();
        // Nobody subscribed yet: no channel either (its slots are made with it).
        assert!(!events.send(RecoveryEvent::Recovered));
        assert!(events.0.get().is_none());
        let mut early = events.subscribe();
        assert!(events.send(RecoveryEvent::Reconnected {
            address: "rabbit:5672".into()
        }));
        let mut late = events.clone().subscribe();
        assert!(events.send(RecoveryEvent::Recovered));
        assert!(matches!(
            early.try_recv(),
            Ok(RecoveryEvent::Reconnected { .. })
        ));
        assert!(matches!(early.try_recv(), Ok(RecoveryEvent::Recovered)));
        assert!(matches!(late.try_recv(), Ok(RecoveryEvent::Recovered)));
        assert!(late.try_recv().is_err());
    }
}
