//! Publisher confirms of one channel: publishes in sequence order, their
//! acks, nacks and returns, and the waiters for all of them.

use super::*;

/// Where the outcome of one publish in confirm mode goes.
pub(super) type ConfirmReply<P> = <P as Ports>::Reply<Result<Confirmation, Error>>;

pub(super) struct Confirms<P: Ports> {
    pub(super) next_seq: u64,
    /// Outstanding publishes in sequence order.
    pub(super) pending: VecDeque<(u64, Option<ConfirmReply<P>>)>,
    /// Returns waiting for the ack that follows them.
    pub(super) returned: VecDeque<ReturnedMessage>,
    pub(super) waiters: Vec<P::Reply<Result<bool, Error>>>,
    pub(super) all_acked: bool,
    /// The select that started confirm mode waits for its select-ok: returns
    /// until then are of publishes sent before it (a second select, on a
    /// channel in confirm mode already, does not set this).
    pub(super) awaiting_select_ok: bool,
}

impl<P: Ports> Confirms<P> {
    pub(super) fn new() -> Self {
        Self {
            next_seq: 1,
            pending: VecDeque::new(),
            returned: VecDeque::new(),
            waiters: Vec::new(),
            all_acked: true,
            awaiting_select_ok: false,
        }
    }

    pub(super) fn settle(&mut self, tag: u64, multiple: bool, ack: bool, out: &mut Output<P>) {
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
                out.answer(sender, Ok(outcome));
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
                out.answer(waiter, Ok(self.all_acked));
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
    pub(super) fn fail(&mut self, error: &Error, out: &mut Output<P>) {
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
                out.answer(sender, Err(unknown.clone()));
            }
        }
        self.returned.clear();
        for waiter in self.waiters.drain(..) {
            out.answer(waiter, Err(error.clone()));
        }
    }
}
