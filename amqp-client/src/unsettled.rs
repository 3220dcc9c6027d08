//! The delivery tags a channel's broker holds unacknowledged, so that acks the
//! application sends one by one can go out as one `multiple` ack.
//!
//! A consumer that acks every delivery makes the broker handle one ack per
//! message. When every tag up to X has been settled by the application
//! (acked, or nacked and rejected earlier on the wire), the single acks among
//! them that are still waiting to be written can go out as one
//! `basic.ack(T, multiple)`, T being the highest of those waiting tags: the
//! broker ends up in the same state. T must itself still be unacknowledged at
//! the broker (RabbitMQ refuses a `multiple` ack of a tag it does not hold
//! with 406), which is why it is a waiting tag and never simply X. Nothing is
//! held back to make this happen: an ack that does not complete a settled
//! prefix goes out as it is, so a slow consumer never delays a fast one's
//! acks.
//!
//! Not tracked (every settlement passes through unchanged): channels in
//! transaction mode (a rollback makes acked tags unacknowledged again), after
//! `basic.recover` (the old tags can no longer be acked), and beyond
//! `MAX_TRACKED` outstanding tags. Sans-IO, like the machine.

use std::collections::VecDeque;

/// Outstanding tags tracked at most per channel (prefetch counts go up to
/// 65535); beyond that the channel stops coalescing and forgets them.
const MAX_TRACKED: usize = 1 << 16;

/// Delivery tags of one channel in the order the broker assigned them, each
/// with whether it is settled, up to the first one that is not.
#[derive(Debug, Default)]
pub(crate) struct Unsettled {
    /// Increasing tags; the front one is never settled (settled fronts are
    /// popped at once).
    tags: VecDeque<(u64, bool)>,
    /// Tags cannot be trusted to be all known or acked as recorded (a tag
    /// arrived out of order, transactions, `basic.recover`, too many):
    /// nothing is coalesced on this channel until the next connection.
    untracked: bool,
}

/// What a settlement did to the tracked tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Every tag up to this one is settled now, the acked tag among them:
    /// the acked tag, or a higher unwritten ack at or below this one, may go
    /// out with `multiple` in place of the unwritten acks below it.
    Prefix(u64),
    /// Recorded; send the settlement as it is.
    Recorded,
    /// Not a tag this channel knows to be outstanding (a second ack, a tag
    /// from elsewhere): send it as it is and let the broker judge it.
    Unknown,
}

impl Unsettled {
    /// The broker assigned `tag` (a delivery or a get-ok); `outstanding` is
    /// false when it needs no ack (a no-ack consumer or get).
    pub(crate) fn delivered(&mut self, tag: u64, outstanding: bool) {
        if self.untracked {
            return;
        }
        if self.tags.back().is_some_and(|&(last, _)| last >= tag) || self.tags.len() >= MAX_TRACKED
        {
            // The broker numbers each channel's deliveries in order; if it
            // did not, a later `multiple` could cover a tag never acked.
            self.stop_tracking();
            return;
        }
        if outstanding || !self.tags.is_empty() {
            self.tags.push_back((tag, !outstanding));
        }
    }

    /// A single settlement of `tag` (ack, nack or reject); for an ack,
    /// whether it completes a settled prefix.
    pub(crate) fn settle_one(&mut self, tag: u64, ack: bool) -> Settled {
        if self.untracked {
            return Settled::Unknown;
        }
        let Some(at) = self.position(tag) else {
            return Settled::Unknown;
        };
        if self.tags[at].1 {
            return Settled::Unknown;
        }
        self.tags[at].1 = true;
        let Some(last) = self.pop_settled_prefix() else {
            return Settled::Recorded;
        };
        if ack && last >= tag {
            Settled::Prefix(last)
        } else {
            Settled::Recorded
        }
    }

    /// A `multiple` settlement: every tag up to `tag` is settled (tag 0:
    /// every outstanding one).
    pub(crate) fn settle_up_to(&mut self, tag: u64) {
        let tag = if tag == 0 { u64::MAX } else { tag };
        for entry in self.tags.iter_mut().take_while(|(t, _)| *t <= tag) {
            entry.1 = true;
        }
        self.pop_settled_prefix();
    }

    /// Nothing on this channel is coalesced any more (see the module doc).
    pub(crate) fn stop_tracking(&mut self) {
        self.untracked = true;
        self.tags.clear();
    }

    /// Whether settlements are recorded (else they all pass through).
    #[cfg(test)]
    fn is_tracking(&self) -> bool {
        !self.untracked
    }

    /// A new connection (or channel): the old tags mean nothing.
    pub(crate) fn clear(&mut self) {
        self.tags.clear();
        self.untracked = false;
    }

    /// Where `tag` is. Tags are usually consecutive (one consumer per
    /// channel), so the offset from the front is tried before a search.
    fn position(&self, tag: u64) -> Option<usize> {
        let &(front, _) = self.tags.front()?;
        let guess = usize::try_from(tag.checked_sub(front)?).ok()?;
        if self.tags.get(guess).is_some_and(|&(t, _)| t == tag) {
            return Some(guess);
        }
        self.tags.binary_search_by_key(&tag, |&(t, _)| t).ok()
    }

    /// Pops the settled tags at the front; the last one popped, if any.
    fn pop_settled_prefix(&mut self) -> Option<u64> {
        let mut last = None;
        while let Some(&(tag, true)) = self.tags.front() {
            last = Some(tag);
            self.tags.pop_front();
        }
        last
    }

    /// Tags still tracked (for tests and memory accounting).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.tags.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(tags: impl IntoIterator<Item = u64>) -> Unsettled {
        let mut unsettled = Unsettled::default();
        for tag in tags {
            unsettled.delivered(tag, true);
        }
        unsettled
    }

    #[test]
    fn acks_in_order_complete_the_prefix_one_by_one() {
        let mut u = delivered(1..=3);
        assert_eq!(u.settle_one(1, true), Settled::Prefix(1));
        assert_eq!(u.settle_one(2, true), Settled::Prefix(2));
        assert_eq!(u.settle_one(3, true), Settled::Prefix(3));
        assert_eq!(u.len(), 0);
    }

    #[test]
    fn an_ack_above_an_unsettled_tag_is_only_recorded() {
        let mut u = delivered(1..=4);
        assert_eq!(u.settle_one(3, true), Settled::Recorded);
        assert_eq!(u.settle_one(2, true), Settled::Recorded);
        // 1 completes the prefix through 3; 4 stays outstanding.
        assert_eq!(u.settle_one(1, true), Settled::Prefix(3));
        assert_eq!(u.len(), 1);
        assert_eq!(u.settle_one(4, true), Settled::Prefix(4));
    }

    #[test]
    fn rejects_settle_but_never_ask_for_an_ack() {
        let mut u = delivered(1..=3);
        assert_eq!(u.settle_one(1, false), Settled::Recorded);
        assert_eq!(u.settle_one(3, true), Settled::Recorded);
        assert_eq!(u.settle_one(2, false), Settled::Recorded);
        assert_eq!(u.len(), 0);
    }

    #[test]
    fn second_acks_and_unknown_tags_are_left_to_the_broker() {
        let mut u = delivered(1..=2);
        assert_eq!(u.settle_one(2, true), Settled::Recorded);
        assert_eq!(u.settle_one(2, true), Settled::Unknown);
        assert_eq!(u.settle_one(9, true), Settled::Unknown);
        assert_eq!(u.settle_one(1, true), Settled::Prefix(2));
        assert_eq!(u.settle_one(1, true), Settled::Unknown);
    }

    #[test]
    fn no_ack_tags_count_as_settled_and_multiple_settles_a_range() {
        let mut u = Unsettled::default();
        u.delivered(1, false); // nothing outstanding: not even tracked
        assert_eq!(u.len(), 0);
        u.delivered(2, true);
        u.delivered(3, false);
        u.delivered(4, true);
        u.delivered(5, true);
        assert_eq!(u.settle_one(2, true), Settled::Prefix(3));
        u.settle_up_to(4);
        assert_eq!(u.len(), 1);
        assert_eq!(u.settle_one(5, true), Settled::Prefix(5));
    }

    #[test]
    fn multiple_with_tag_zero_settles_everything_outstanding() {
        let mut u = delivered(1..=3);
        u.settle_up_to(0);
        assert_eq!(u.len(), 0);
        u.delivered(4, true);
        assert_eq!(u.settle_one(4, true), Settled::Prefix(4));
    }

    #[test]
    fn too_many_outstanding_tags_stop_tracking() {
        let mut u = delivered(1..=MAX_TRACKED as u64);
        assert!(u.is_tracking());
        u.delivered(MAX_TRACKED as u64 + 1, true);
        assert!(!u.is_tracking());
        assert_eq!(u.len(), 0);
        assert_eq!(u.settle_one(1, true), Settled::Unknown);
    }

    #[test]
    fn tags_out_of_order_stop_all_coalescing_until_cleared() {
        let mut u = delivered([1, 2]);
        u.delivered(2, true);
        assert_eq!(u.settle_one(1, true), Settled::Unknown);
        u.clear();
        u.delivered(1, true);
        assert_eq!(u.settle_one(1, true), Settled::Prefix(1));
    }
}
