//! What goes on the wire: each channel's queue of frames, served round-robin
//! one turn at a time, and settlements coalesced against the unsettled tags.

use super::*;

/// Body frames with at least this much payload are spliced (passed on by
/// reference) rather than copied into the write buffer: below it a copy
/// costs less than a buffer of its own.
const SPLICE_MIN: usize = 32 * 1024;

/// Where the machine writes frames: an encoding buffer, and a way to pass a
/// large body's slice on after what the buffer holds, without a copy.
pub(crate) trait FrameSink {
    /// The buffer frames are encoded into.
    fn buf(&mut self) -> &mut BytesMut;
    /// Puts `payload` after what is written so far: copied into the buffer
    /// unless the sink keeps slices of its own.
    fn splice(&mut self, payload: Bytes) {
        self.buf().extend_from_slice(&payload);
    }
    /// Bytes written and not yet taken.
    fn len(&self) -> usize;
}

impl FrameSink for BytesMut {
    fn buf(&mut self) -> &mut BytesMut {
        self
    }

    fn len(&self) -> usize {
        BytesMut::len(self)
    }
}

/// An ack, nack or reject: a few words, where a `Method` is 136 bytes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Settlement {
    Ack(basic::Ack),
    Nack(basic::Nack),
    Reject(basic::Reject),
}

impl Settlement {
    /// The settlement `method` is, if it is one.
    pub(super) fn of(method: &Method) -> Option<Self> {
        match method {
            Method::BasicAck(ack) => Some(Self::Ack(ack.clone())),
            Method::BasicNack(nack) => Some(Self::Nack(nack.clone())),
            Method::BasicReject(reject) => Some(Self::Reject(reject.clone())),
            _ => None,
        }
    }

    pub(super) fn write(&self, buf: &mut BytesMut, channel: u16) {
        match self {
            Self::Ack(ack) => frame::write_ack(buf, channel, ack),
            Self::Nack(nack) => {
                frame::write_method_frame(buf, channel, basic::Nack::INFO.id, |buf| {
                    nack.encode_args(buf)
                })
            }
            Self::Reject(reject) => {
                frame::write_method_frame(buf, channel, basic::Reject::INFO.id, |buf| {
                    reject.encode_args(buf)
                })
            }
        }
    }
}

pub(super) enum Outgoing {
    Method(Box<Method>),
    /// An ack the application sent whose tag the channel tracks: a later ack
    /// that completes a settled prefix may widen it (see `unsettled`).
    Ack(basic::Ack),
    /// Any other ack, nack or reject.
    Settle(Settlement),
    /// The `channel.flow-ok` answering the latest `channel.flow`
    /// (`ChannelState::flow_ok`): one waits at most, however many arrive.
    FlowOk,
    Publish {
        /// Method and header frames; `None` once written.
        head: Option<Bytes>,
        body: Bytes,
        /// How much of the body is written.
        offset: usize,
        /// Held until the message is written (see `Command::Publish`).
        credit: Option<crate::credit::Credit>,
    },
}

/// One turn of a channel: a whole method, or a publish up to and including
/// one body frame.
pub(super) fn write_one_turn<P: Ports, S: FrameSink>(
    id: u16,
    channel: &mut ChannelState<P>,
    sink: &mut S,
    frame_max: u32,
    credit_returns: &mut CreditReturns,
) {
    let Some(head) = channel.out.front_mut() else {
        return;
    };
    let buf = sink.buf();
    match head {
        Outgoing::Method(method) => {
            tracing::trace!(channel = id, ?method, "frame sent");
            frame::write_method(buf, id, method);
            channel.out.pop_front();
        }
        Outgoing::Ack(ack) => {
            tracing::trace!(channel = id, ?ack, "frame sent");
            frame::write_ack(buf, id, ack);
            channel.out.pop_front();
        }
        Outgoing::Settle(settlement) => {
            tracing::trace!(channel = id, ?settlement, "frame sent");
            settlement.write(buf, id);
            channel.out.pop_front();
        }
        Outgoing::FlowOk => {
            if let Some(active) = channel.flow_ok.take() {
                let flow_ok = Method::ChannelFlowOk(channel::FlowOk { active });
                tracing::trace!(channel = id, method = ?flow_ok, "frame sent");
                frame::write_method(buf, id, &flow_ok);
            }
            channel.out.pop_front();
        }
        Outgoing::Publish {
            head, body, offset, ..
        } => {
            if let Some(head) = head.take() {
                buf.extend_from_slice(&head);
            }
            let chunk = frame_max as usize - FRAME_OVERHEAD;
            let end = (*offset + chunk).min(body.len());
            if end - *offset >= SPLICE_MIN {
                frame::write_body_frame_head(buf, id, end - *offset);
                sink.splice(body.slice(*offset..end));
                frame::write_frame_end(sink.buf());
            } else {
                frame::write_body(buf, id, &body[*offset..end], frame_max);
            }
            *offset = end;
            if end >= body.len() {
                if let Some(Outgoing::Publish {
                    credit: Some(credit),
                    ..
                }) = channel.out.pop_front()
                {
                    credit_returns.push(credit);
                }
            }
        }
    }
}

impl<P: Ports> Machine<P> {
    /// Whether there is anything to write.
    pub(crate) fn wants_to_write(&self) -> bool {
        self.heartbeat_due
            || !self.control.is_empty()
            || !self.ready.is_empty()
            || self.closing_frame.is_some()
    }

    /// Writes frames into `buf` until it holds `budget` bytes or nothing is
    /// left: connection frames first, then one turn per ready channel in
    /// round-robin, so a long body on one channel never holds back another.
    pub(crate) fn write_frames<S: FrameSink>(&mut self, sink: &mut S, budget: usize) {
        let buf = sink.buf();
        if self.heartbeat_due {
            frame::write_heartbeat(buf);
            self.heartbeat_due = false;
        }
        while let Some((channel, method)) = self.control.pop_front() {
            tracing::trace!(channel, ?method, "frame sent");
            frame::write_method(buf, channel, &method);
        }
        let frame_max = self.settings.frame_max;
        while sink.len() < budget {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(channel) = self.channels.get_mut(&id) else {
                continue;
            };
            write_one_turn(id, channel, sink, frame_max, &mut self.credit_returns);
            if channel.out.is_empty() {
                channel.scheduled = false;
            } else {
                self.ready.push_back(id);
            }
        }
        self.credit_returns.give_back();
        if self.ready.is_empty() {
            if let Some(close) = self.closing_frame.take() {
                tracing::trace!(channel = 0, method = ?close, "frame sent");
                frame::write_method(sink.buf(), 0, &close);
                self.close_written = true;
            }
        }
    }

    pub(super) fn schedule(&mut self, id: u16) {
        if let Some(channel) = self.channels.get_mut(&id) {
            if !channel.scheduled && !channel.out.is_empty() {
                channel.scheduled = true;
                self.ready.push_back(id);
            }
        }
    }

    pub(super) fn push_out(&mut self, id: u16, outgoing: Outgoing) {
        if let Some(channel) = self.channels.get_mut(&id) {
            channel.out.push_back(outgoing);
        }
        self.schedule(id);
    }

    pub(super) fn control_on_channel(&mut self, id: u16, method: Method) {
        // Written ahead of every channel's queue: the channel is gone.
        self.control.push_back((id, method));
    }

    /// Queues an ack, nack or reject, first recorded against the channel's
    /// unsettled tags; an ack that completes a settled prefix widens the ack
    /// still waiting at the end of the queue, if there is one, into a
    /// `multiple` ack instead of adding a frame.
    pub(super) fn push_settlement(&mut self, id: u16, settlement: Settlement) {
        let Some(channel) = self.channels.get_mut(&id) else {
            return;
        };
        if channel.tx {
            // Recorded across reconnects, unlike the tracking.
            channel.unsettled.stop_tracking();
        }
        let outgoing = match &settlement {
            Settlement::Ack(ack) if ack.multiple => {
                channel.unsettled.settle_up_to(ack.delivery_tag);
                Outgoing::Settle(settlement)
            }
            Settlement::Ack(ack) => match channel.unsettled.settle_one(ack.delivery_tag, true) {
                // Everything up to `last` is settled; the broker still holds
                // only the tags whose acks are unwritten, and the widened ack
                // must name one of those (this one, or the waiting one).
                Settled::Prefix(last) => {
                    if let Some(Outgoing::Ack(waiting)) = channel.out.back_mut() {
                        if waiting.delivery_tag <= last {
                            waiting.delivery_tag = waiting.delivery_tag.max(ack.delivery_tag);
                            waiting.multiple = true;
                            return;
                        }
                    }
                    Outgoing::Ack(ack.clone())
                }
                Settled::Recorded => Outgoing::Ack(ack.clone()),
                Settled::Unknown => Outgoing::Settle(settlement),
            },
            Settlement::Nack(nack) => {
                if nack.multiple {
                    channel.unsettled.settle_up_to(nack.delivery_tag);
                } else {
                    channel.unsettled.settle_one(nack.delivery_tag, false);
                }
                Outgoing::Settle(settlement)
            }
            Settlement::Reject(reject) => {
                channel.unsettled.settle_one(reject.delivery_tag, false);
                Outgoing::Settle(settlement)
            }
        };
        self.push_out(id, outgoing);
    }

    /// Queues a method sent without awaiting a reply; settlements go through
    /// [`Self::push_settlement`].
    pub(super) fn push_method(&mut self, id: u16, method: Box<Method>) {
        if let Some(settlement) = Settlement::of(&method) {
            return self.push_settlement(id, settlement);
        }
        if let Method::BasicRecoverAsync(_) = &*method {
            if let Some(channel) = self.channels.get_mut(&id) {
                channel.unsettled.stop_tracking();
            }
        }
        self.push_out(id, Outgoing::Method(method));
    }
}
