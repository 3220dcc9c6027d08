//! Consumers: their slots, their position in a stream queue, and delivery
//! back-pressure (deliveries parked for a full buffer, bounded in bytes).

use super::*;

/// A delivery as the machine hands it to a consumer's buffer.
#[derive(Debug)]
pub(crate) struct RawDelivery {
    pub deliver: basic::Deliver,
    pub content: Content,
    /// The channel's connection epoch when it arrived: its tag is only
    /// meaningful on the same epoch.
    pub epoch: u64,
}

/// Why a consumer's stream ended.
pub(crate) type ConsumerEnd = Arc<OnceLock<Error>>;

pub(super) struct ConsumerSlot<P: Ports> {
    pub(super) deliveries: P::Deliveries,
    pub(super) end: ConsumerEnd,
    pub(super) no_ack: bool,
    /// The request, to consume again after a reconnect.
    pub(super) consume: basic::Consume,
    pub(super) position: StreamPosition,
}

/// The header in which RabbitMQ gives each delivery from a stream queue its
/// offset, and the consume argument that says where to start.
/// How many ended no-ack consumers a channel remembers, for deliveries
/// that were in flight when they ended.
pub(super) const ENDED_NO_ACK_REMEMBERED: usize = 16;

pub(super) const STREAM_OFFSET: &str = "x-stream-offset";

/// Where a consumer is in a stream queue, so that after a reconnect it
/// resumes after the last delivery the client took instead of at the offset
/// it first asked for (which would deliver again from there, or skip what
/// was published meanwhile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamPosition {
    /// No delivery yet: whether the queue is a stream is not known.
    Unknown,
    /// Its deliveries carry no offset: not a stream queue.
    NotAStream,
    /// The offset of the last delivery handed to (or parked for) the consumer.
    After(i64),
}

impl StreamPosition {
    /// The position after a delivery with these properties.
    #[inline]
    pub(super) fn advance(self, properties: &ReceivedProperties) -> Self {
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
pub(super) fn stream_offset(properties: &ReceivedProperties) -> Option<i64> {
    properties
        .get()
        .headers
        .as_ref()?
        .get(STREAM_OFFSET)?
        .as_i64()
}

/// Bytes of deliveries waiting for slow consumers beyond which the socket is
/// no longer read.
pub(super) const OVERFLOW_LIMIT: usize = 8 * 1024 * 1024;

/// What a waiting delivery costs beyond its body and the property bytes it
/// keeps: the method, the properties once read (368 bytes), the queue entry.
pub(super) const QUEUED_DELIVERY_OVERHEAD: usize = 640;

/// A delivery waiting for room in its consumer's buffer.
pub(super) struct Parked<P: Ports> {
    pub(super) channel: u16,
    /// The buffer it waits for (held here too: a consumer that ends still
    /// gets what was parked for it, as it gets what is in its buffer).
    pub(super) deliveries: P::Deliveries,
    pub(super) delivery: RawDelivery,
}

impl<P: Ports> Machine<P> {
    /// The buffer the oldest waiting delivery needs room in.
    pub(crate) fn parked_outlet(&self) -> Option<&P::Deliveries> {
        self.overflow.front().map(|parked| &parked.deliveries)
    }

    /// Bytes of the deliveries waiting for room in their consumers' buffers.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn overflow_bytes(&self) -> usize {
        self.overflow_bytes
    }

    /// Whether reading the socket must pause: too much is waiting for
    /// consumers that do not keep up.
    pub(crate) fn is_paused(&self) -> bool {
        self.overflow_bytes > OVERFLOW_LIMIT
    }

    pub(super) fn delivery_cost(delivery: &RawDelivery) -> usize {
        delivery.content.body.len()
            + delivery.content.properties.shared_len()
            + QUEUED_DELIVERY_OVERHEAD
    }

    /// Room was made for the oldest waiting delivery: `first` takes it. The
    /// ones after it go too while their buffers take them.
    pub(crate) fn unpark(&mut self, first: impl FnOnce(RawDelivery), now: Instant) {
        let was_paused = self.is_paused();
        if let Some(parked) = self.overflow.pop_front() {
            self.overflow_bytes -= Self::delivery_cost(&parked.delivery);
            first(parked.delivery);
        }
        while let Some(mut parked) = self.overflow.pop_front() {
            let cost = Self::delivery_cost(&parked.delivery);
            match P::offer(&parked.deliveries, parked.delivery) {
                None => self.overflow_bytes -= cost,
                Some(Refused::Full(delivery) | Refused::Gone(delivery)) => {
                    parked.delivery = delivery;
                    self.overflow.push_front(parked);
                    break;
                }
            }
        }
        if was_paused {
            // Reading resumes now; the pause does not count as the peer's silence.
            self.last_received = now;
        }
    }

    /// The consumer of the oldest waiting delivery went away: its waiting
    /// deliveries go back to the queue.
    pub(crate) fn drop_parked(&mut self) {
        let Some(gone) = self.overflow.front() else {
            return;
        };
        let gone = gone.deliveries.clone();
        let mut kept = VecDeque::new();
        for parked in std::mem::take(&mut self.overflow) {
            if !P::same_consumer(&parked.deliveries, &gone) {
                kept.push_back(parked);
                continue;
            }
            self.overflow_bytes -= Self::delivery_cost(&parked.delivery);
            self.requeue_gone(parked.channel, &parked.delivery);
        }
        self.overflow = kept;
    }

    /// A delivery whose consumer is gone goes back to the queue: only on the
    /// channel incarnation that received it (not after a reconnect, nor on a
    /// new channel that reused the id), and not when the broker counts it
    /// settled already.
    pub(super) fn requeue_gone(&mut self, channel: u16, delivery: &RawDelivery) {
        let current = self
            .channels
            .get(&channel)
            .is_some_and(|c| c.epoch.load(Ordering::Acquire) == delivery.epoch);
        if current && !self.settled_as_sent(channel, &delivery.deliver.consumer_tag) {
            self.requeue(channel, delivery.deliver.delivery_tag);
        }
    }

    /// Whether deliveries to consumer `tag` on channel `id` count as settled
    /// once sent (a no-ack consumer, current or recently ended): nacking one
    /// would close the channel with 406.
    pub(super) fn settled_as_sent(&self, id: u16, tag: &ShortString) -> bool {
        self.channels
            .get(&id)
            .is_some_and(|state| match state.consumers.get(tag) {
                Some(slot) => slot.no_ack,
                None => state.ended_no_ack.contains(tag),
            })
    }

    pub(super) fn end_consumer(&mut self, id: u16, tag: &ShortString, by_broker: bool) {
        let Some(state) = self.channels.get_mut(&id) else {
            return;
        };
        if let Some(slot) = state.consumers.remove(tag) {
            if slot.no_ack {
                // Deliveries still in flight for it are settled as sent:
                // never to be nacked (see `complete_content`).
                if state.ended_no_ack.len() == ENDED_NO_ACK_REMEMBERED {
                    state.ended_no_ack.pop_front();
                }
                state.ended_no_ack.push_back(tag.clone());
            }
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
    pub(super) fn consumers_gone(&mut self, queues: Vec<ShortString>) {
        for queue in queues {
            let others = self
                .channels
                .values()
                .any(|c| c.consumers.values().any(|slot| slot.consume.queue == queue));
            self.topology.consumer_gone(&queue, others);
        }
    }

    /// A delivery for a consumer that is gone goes back to the queue.
    pub(super) fn requeue(&mut self, id: u16, delivery_tag: u64) {
        if self
            .channels
            .get(&id)
            .is_some_and(|c| c.phase != Phase::Open)
        {
            // Its close is queued (or it is not open on this socket): the
            // broker requeues what the channel holds, and a nack after the
            // close would reach a channel that is gone.
            return;
        }
        self.push_settlement(
            id,
            Settlement::Nack(basic::Nack {
                delivery_tag,
                multiple: false,
                requeue: true,
            }),
        );
    }
}
