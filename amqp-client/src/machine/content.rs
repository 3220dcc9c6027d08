//! Content assembly: a delivery, return or get-ok's header and body frames
//! joined into one message, with bodies that grow with what arrives.

use super::*;

/// Message content: properties and body.
#[derive(Clone, PartialEq)]
pub(crate) struct Content {
    pub properties: ReceivedProperties,
    pub body: Bytes,
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Content { properties, body } = self;
        f.debug_struct("Content")
            .field("properties", properties)
            .field("body", &BodyLen(body.len()))
            .finish()
    }
}

/// The body of a message on its way to the wire. A newtype only so that a
/// [`Command`] in a log record or panic message shows the body's length.
#[derive(Clone, PartialEq)]
pub(crate) struct PublishBody(pub Bytes);

impl std::fmt::Debug for PublishBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        BodyLen(self.0.len()).fmt(f)
    }
}

pub(super) enum AssemblyTarget {
    Deliver(basic::Deliver),
    Return(basic::Return),
    Get(basic::GetOk),
}

pub(super) struct Assembly {
    pub(super) target: AssemblyTarget,
    pub(super) header: Option<(ReceivedProperties, u64)>,
    pub(super) body: BodyBuffer,
}

/// The body of a message in the making: one frame's slice is kept as it is
/// (no copy); several are joined into one buffer from the [`BodyPool`] that
/// grows with the bytes received. Never sized by the header alone: a peer
/// could announce `max_body_size` on every channel and send two small frames.
pub(super) enum BodyBuffer {
    Empty,
    One(Bytes),
    Many(Vec<u8>),
}

impl BodyBuffer {
    pub(super) fn len(&self) -> usize {
        match self {
            BodyBuffer::Empty => 0,
            BodyBuffer::One(b) => b.len(),
            BodyBuffer::Many(b) => b.len(),
        }
    }

    /// Adds a frame's payload; `expected` is the body size the header
    /// announced, which the caller checked the payload does not exceed.
    #[inline]
    pub(super) fn push(&mut self, payload: Bytes, expected: usize, pool: &BodyPool) {
        *self = match std::mem::replace(self, BodyBuffer::Empty) {
            BodyBuffer::Empty => BodyBuffer::One(payload),
            joined => {
                let mut joined = joined.with_room(payload.len(), expected, pool);
                joined.extend_from_slice(&payload);
                BodyBuffer::Many(joined)
            }
        }
    }

    /// The body so far in one buffer with room for `more` bytes after it
    /// (taken from `pool`, see [`room`](Self::room)), for a frame's payload.
    pub(super) fn with_room(self, more: usize, expected: usize, pool: &BodyPool) -> Vec<u8> {
        match self {
            BodyBuffer::Empty => pool.take(Self::room(more, expected), expected),
            BodyBuffer::One(first) => {
                let needed = first.len() + more;
                let mut joined = pool.take(Self::room(needed, expected), expected);
                joined.extend_from_slice(&first);
                joined
            }
            BodyBuffer::Many(mut joined) => {
                let needed = joined.len() + more;
                if needed > joined.capacity() {
                    let mut larger = pool.take(Self::room(needed, expected), expected);
                    larger.extend_from_slice(&joined);
                    pool.give_back(std::mem::replace(&mut joined, larger));
                }
                joined
            }
        }
    }

    /// The room a new buffer gets for `needed` bytes: four times that, or
    /// the whole body once that is at least half of it (so a 1 MiB body in
    /// 128 KiB frames gets its whole buffer at once, and a 16 MiB one is
    /// copied 3 MiB more in all rather than 14), but never past `expected`:
    /// a complete body fills its buffer exactly, and a header that lies
    /// costs at most eight times the bytes that came.
    pub(super) fn room(needed: usize, expected: usize) -> usize {
        let room = needed.saturating_mul(4);
        if room >= expected / 2 {
            expected.max(needed)
        } else {
            room
        }
    }

    #[inline]
    pub(super) fn into_bytes(self, pool: &BodyPool) -> Bytes {
        match self {
            BodyBuffer::Empty => Bytes::new(),
            BodyBuffer::One(b) => b,
            BodyBuffer::Many(b) => pool.freeze(b),
        }
    }
}

impl<P: Ports> Machine<P> {
    pub(super) fn content_header(&mut self, id: u16, header: ContentHeader) -> Result<(), Error> {
        let max = self.settings.max_body_size;
        let assembly = self
            .channels
            .get_mut(&id)
            .and_then(|s| s.assembling.as_mut())
            .filter(|a| a.header.is_none())
            .ok_or_else(|| {
                unexpected(format!(
                    "content header on channel {id} without a method that carries content"
                ))
            })?;
        if header.body_size > max {
            return Err(unexpected(format!(
                "content body of {} bytes on channel {id} exceeds the {max}-byte limit",
                header.body_size
            )));
        }
        assembly.header = Some((header.properties, header.body_size));
        if header.body_size == 0 {
            self.complete_content(id)?;
        }
        Ok(())
    }

    pub(super) fn content_body(&mut self, id: u16, payload: Bytes) -> Result<(), Error> {
        let assembly = self
            .channels
            .get_mut(&id)
            .and_then(|s| s.assembling.as_mut())
            .ok_or_else(|| {
                unexpected(format!(
                    "content body on channel {id} without a content header"
                ))
            })?;
        let Some((_, size)) = &assembly.header else {
            return Err(unexpected(format!(
                "content body on channel {id} before its header"
            )));
        };
        let size = *size as usize;
        if assembly.body.len() + payload.len() > size {
            return Err(unexpected(format!(
                "content body on channel {id} longer than its header's {size} bytes"
            )));
        }
        assembly.body.push(payload, size, &self.bodies.pool);
        if let BodyBuffer::Many(_) = assembly.body {
            self.bodies.used_at = Some(self.last_received);
        }
        if assembly.body.len() == size {
            self.complete_content(id)?;
        }
        Ok(())
    }

    /// A body frame of `size` payload bytes is arriving on channel `id`
    /// whose payload the I/O task would rather read from the socket straight
    /// into the message's buffer than into its read buffer and copy: that
    /// buffer, lent with the body so far and room for the frame, if the
    /// frame is one the channel's assembly takes (else the frame goes the
    /// usual way, which reports what is wrong with it). It comes back with
    /// [`body_frame_read`](Self::body_frame_read). The frame's payload counts
    /// as received for the buffer's room: it is bounded by frame_max, and
    /// the read buffer would make as much room for it.
    pub(crate) fn lend_body_buffer(&mut self, id: u16, size: usize) -> Option<Vec<u8>> {
        let assembly = self.channels.get_mut(&id)?.assembling.as_mut()?;
        let expected = assembly.header.as_ref()?.1 as usize;
        if assembly.body.len() + size > expected {
            return None;
        }
        let body = std::mem::replace(&mut assembly.body, BodyBuffer::Empty);
        self.bodies.used_at = Some(self.last_received);
        Some(body.with_room(size, expected, &self.bodies.pool))
    }

    /// The buffer [`lend_body_buffer`](Self::lend_body_buffer) lent, with a
    /// frame's payload read into it (and the frame's end checked).
    pub(crate) fn body_frame_read(&mut self, id: u16, buffer: Vec<u8>) -> Result<(), Error> {
        let Some(assembly) = self
            .channels
            .get_mut(&id)
            .and_then(|s| s.assembling.as_mut())
        else {
            // Gone meanwhile (the connection failed): as a body frame
            // without its header would be.
            self.bodies.pool.give_back(buffer);
            return Err(unexpected(format!(
                "content body on channel {id} without a content header"
            )));
        };
        let size = assembly
            .header
            .as_ref()
            .map_or(0, |(_, size)| *size as usize);
        let complete = buffer.len() == size;
        assembly.body = BodyBuffer::Many(buffer);
        if complete {
            self.complete_content(id)?;
        }
        Ok(())
    }

    pub(super) fn complete_content(&mut self, id: u16) -> Result<(), Error> {
        let Some(state) = self.channels.get_mut(&id) else {
            return Ok(());
        };
        let Some(assembly) = state.assembling.take() else {
            return Ok(());
        };
        let Some((properties, _)) = assembly.header else {
            return Ok(());
        };
        let content = Content {
            properties,
            body: assembly.body.into_bytes(&self.bodies.pool),
        };
        match assembly.target {
            AssemblyTarget::Deliver(deliver) => {
                let slot = state.consumers.get_mut(&deliver.consumer_tag);
                let no_ack = match &slot {
                    Some(slot) => slot.no_ack,
                    None => state.ended_no_ack.contains(&deliver.consumer_tag),
                };
                // Assemblies complete in the order their methods arrived, so
                // tags are recorded in the broker's order.
                state.unsettled.delivered(deliver.delivery_tag, !no_ack);
                let Some(slot) = slot else {
                    // A consumer cancelled with no-wait (or forgotten during
                    // recovery) can still receive what was in flight: back to
                    // the queue with it, unless the broker counts it settled.
                    if !no_ack {
                        tracing::debug!(channel = id, tag = %deliver.consumer_tag, "delivery for a cancelled consumer requeued");
                        self.requeue(id, deliver.delivery_tag);
                    }
                    return Ok(());
                };
                slot.position = slot.position.advance(&content.properties);
                let delivery = RawDelivery {
                    deliver,
                    content,
                    epoch: state.epoch.load(Ordering::Acquire),
                };
                // Behind this consumer's deliveries that already wait, if any.
                let waiting = !self.overflow.is_empty()
                    && self
                        .overflow
                        .iter()
                        .any(|parked| P::same_consumer(&parked.deliveries, &slot.deliveries));
                let refused = if waiting {
                    Some(Refused::Full(delivery))
                } else {
                    P::offer(&slot.deliveries, delivery)
                };
                match refused {
                    None => {}
                    Some(Refused::Full(delivery)) => {
                        self.overflow_bytes += Self::delivery_cost(&delivery);
                        self.overflow.push_back(Parked {
                            channel: id,
                            deliveries: slot.deliveries.clone(),
                            delivery,
                        });
                    }
                    Some(Refused::Gone(delivery)) => {
                        let forgotten = slot.end.get().is_some();
                        if !no_ack {
                            self.requeue(id, delivery.deliver.delivery_tag);
                        }
                        if !forgotten {
                            // A stream dropped without the consumer's drop
                            // (its basic_consume abandoned): nobody cancels
                            // it, and each requeued delivery would come back.
                            self.forget_consumer(id, delivery.deliver.consumer_tag, Vec::new());
                        }
                    }
                }
            }
            AssemblyTarget::Return(ret) => {
                let message = ReturnedMessage {
                    reply_code: ReplyCode(ret.reply_code),
                    reply_text: ret.reply_text,
                    exchange: ret.exchange,
                    routing_key: ret.routing_key,
                    properties: content.properties,
                    body: content.body,
                };
                // While the first confirm.select waits for its select-ok,
                // returns are of publishes sent before it, which no ack follows.
                if let Some(confirms) = state
                    .confirms
                    .as_mut()
                    .filter(|confirms| !confirms.awaiting_select_ok)
                {
                    // A return precedes the ack of its publish, which is
                    // still pending: more returns waiting than publishes
                    // pending is the peer's error (and unbounded growth).
                    if confirms.returned.len() >= confirms.pending.len() {
                        return Err(unexpected(format!(
                            "basic.return on channel {id} with {} returns already waiting for the acks of {} pending publishes",
                            confirms.returned.len(),
                            confirms.pending.len()
                        )));
                    }
                    confirms.returned.push_back(message);
                } else if let Some(returns) = &state.returns {
                    self.output
                        .push(Event::Returned(returns.clone(), Box::new(message)));
                } else {
                    tracing::warn!(
                        channel = id,
                        "returned message dropped: no returns listener"
                    );
                }
            }
            AssemblyTarget::Get(get_ok) => {
                self.complete_rpc(
                    id,
                    Reply {
                        method: Method::BasicGetOk(get_ok),
                        content: Some(content),
                        epoch: 0,
                    },
                );
            }
        }
        Ok(())
    }
}
