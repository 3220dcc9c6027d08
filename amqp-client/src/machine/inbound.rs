//! Frames from the broker: connection methods, channel methods and the
//! replies that complete calls.

use super::*;

impl<P: Ports> Machine<P> {
    /// Takes a frame from the broker. An error is fatal: the caller closes the
    /// connection with [`protocol_error`](Self::protocol_error).
    pub(crate) fn handle_frame(&mut self, frame: Frame) -> Result<(), Error> {
        tracing::trace!(?frame, "frame received");
        match frame {
            Frame::Heartbeat => Ok(()),
            Frame::Method { channel: 0, method } => self.connection_method(method),
            Frame::Method { channel, method } => self.channel_method(channel, method),
            Frame::Header { channel, header } => self.content_header(channel, header),
            Frame::Body { channel, payload } => self.content_body(channel, payload),
        }
        .map_err(|e| {
            tracing::debug!(error = %e, "fatal protocol error");
            e
        })
    }

    pub(super) fn connection_method(&mut self, method: Method) -> Result<(), Error> {
        match method {
            Method::ConnectionClose(close) => {
                let reason = CloseReason {
                    code: ReplyCode(close.reply_code),
                    text: close.reply_text.to_string(),
                    method: Some(MethodId::new(close.class_id, close.method_id)),
                    initiator: Initiator::Broker,
                };
                tracing::info!(%reason, "connection closed by the broker");
                let error = Error::connection_closed(reason);
                // A close the application did not ask for is recovered from
                // (after close-ok is flushed), unless it was closing anyway.
                let asked = matches!(self.state, State::Closing { .. });
                if asked {
                    self.control
                        .push_back((0, Method::ConnectionCloseOk(connection::CloseOk {})));
                    self.fail(error);
                } else {
                    self.connection_lost(error);
                    self.control
                        .push_back((0, Method::ConnectionCloseOk(connection::CloseOk {})));
                }
                Ok(())
            }
            Method::ConnectionCloseOk(_) => {
                tracing::debug!("connection.close-ok received");
                self.finish();
                Ok(())
            }
            Method::ConnectionBlocked(blocked) => {
                tracing::info!(reason = %blocked.reason, "connection blocked by the broker");
                self.output
                    .push(Event::Blocked(Some(blocked.reason.to_string())));
                Ok(())
            }
            Method::ConnectionUnblocked(_) => {
                tracing::info!("connection unblocked");
                self.output.push(Event::Blocked(None));
                Ok(())
            }
            Method::ConnectionUpdateSecretOk(_) => match self.secret_replies.pop_front() {
                Some(reply) => {
                    self.output.answer(reply, Ok(()));
                    Ok(())
                }
                None => Err(unexpected(
                    "connection.update-secret-ok without a request".to_owned(),
                )),
            },
            other => Err(unexpected(format!("{} on channel 0", other.info().name))),
        }
    }

    pub(super) fn channel_method(&mut self, id: u16, method: Method) -> Result<(), Error> {
        if let (Method::ChannelCloseOk(_), Some(at)) =
            (&method, self.crossed_closes.iter().position(|c| *c == id))
        {
            // The answer to our close of a channel the broker closed meanwhile.
            self.crossed_closes.swap_remove(at);
            return Ok(());
        }
        let Some(state) = self.channels.get_mut(&id) else {
            return Err(unexpected(format!(
                "{} on channel {id}, which is not open",
                method.info().name
            )));
        };
        if state.assembling.is_some() {
            return Err(unexpected(format!(
                "{} on channel {id} while content was expected",
                method.info().name
            )));
        }
        // Until its open-ok on this socket, a channel (new, or waiting to be
        // re-opened after a reconnect) hears only the answer to its open.
        let heard = match state.phase {
            Phase::Lost => false,
            Phase::Opening => matches!(method, Method::ChannelOpenOk(_) | Method::ChannelClose(_)),
            Phase::Open | Phase::Closing => true,
        };
        if !heard {
            return Err(unexpected(format!(
                "{} on channel {id}, which is not open on this connection",
                method.info().name
            )));
        }
        match method {
            Method::ChannelOpenOk(_) => {
                if state.phase != Phase::Opening {
                    return Err(unexpected(format!("channel.open-ok on open channel {id}")));
                }
                state.phase = Phase::Open;
                if state.out.is_empty() {
                    // The room the channel.open took: a channel that is
                    // only opened holds no frame queue (an idle channel
                    // costs its state alone); the first frame queued
                    // after makes it again.
                    state.out = VecDeque::new();
                }
                let opened = ChannelRef {
                    id,
                    incarnation: state.incarnation,
                };
                // A caller that stopped waiting (a call timeout) is told to
                // the machine by the driver: `open_abandoned`.
                if let Some(reply) = state.open_reply.take() {
                    self.output.answer(reply, Ok(opened));
                }
                self.pump_rpc(id);
                if self
                    .recovery
                    .as_ref()
                    .is_some_and(|r| r.waiting == Some(id))
                {
                    self.advance_recovery();
                }
            }
            Method::ChannelClose(close) => {
                let reason = CloseReason {
                    code: ReplyCode(close.reply_code),
                    text: close.reply_text.to_string(),
                    method: Some(MethodId::new(close.class_id, close.method_id)),
                    initiator: Initiator::Broker,
                };
                tracing::debug!(channel = id, %reason, "channel closed by the broker");
                let error = Error::channel_closed(id, reason);
                let queues: Vec<ShortString> = state.consumer_queues();
                let internal = state.internal;
                // Our close is on the wire (no longer queued): its close-ok follows.
                let crossed = state.phase == Phase::Closing
                    && !state.out.iter().any(|o| {
                        matches!(o, Outgoing::Method(m) if matches!(**m, Method::ChannelClose(_)))
                    });
                if crossed {
                    self.crossed_closes.push(id);
                }
                state.fail(&error, &mut self.output);
                for reply in state.close_replies.drain(..) {
                    self.output.answer(reply, Ok(()));
                }
                self.channels.remove(&id);
                // close-ok is the channel's last frame; the id is free after it.
                self.control_on_channel(id, Method::ChannelCloseOk(channel::CloseOk {}));
                self.consumers_gone(queues);
                if self
                    .recovery
                    .as_ref()
                    .is_some_and(|r| r.waiting == Some(id))
                {
                    self.step_failed(id, internal, error);
                }
            }
            Method::ChannelCloseOk(_) => {
                if state.phase != Phase::Closing {
                    return Err(unexpected(format!(
                        "channel.close-ok on channel {id}, which was not closing"
                    )));
                }
                let error = state
                    .closed
                    .get()
                    .cloned()
                    .unwrap_or_else(|| Self::channel_gone(id));
                let replies: Vec<_> = state.close_replies.drain(..).collect();
                let queues: Vec<ShortString> = state.consumer_queues();
                state.fail(&error, &mut self.output);
                for reply in replies {
                    self.output.answer(reply, Ok(()));
                }
                self.channels.remove(&id);
                self.consumers_gone(queues);
                if self
                    .recovery
                    .as_ref()
                    .is_some_and(|r| r.waiting == Some(id))
                {
                    self.advance_recovery();
                }
            }
            Method::ChannelFlow(flow) => {
                // A flow-ok still waiting answers this request instead: a
                // peer that floods channel.flow (and reads nothing) cannot
                // grow the queue.
                if state.flow_ok.replace(flow.active).is_none() {
                    state.out.push_back(Outgoing::FlowOk);
                    self.schedule(id);
                }
            }
            Method::BasicDeliver(deliver) => {
                state.assembling = Some(Assembly {
                    target: AssemblyTarget::Deliver(deliver),
                    header: None,
                    body: BodyBuffer::Empty,
                });
            }
            Method::BasicReturn(ret) => {
                state.assembling = Some(Assembly {
                    target: AssemblyTarget::Return(ret),
                    header: None,
                    body: BodyBuffer::Empty,
                });
            }
            Method::BasicGetOk(get_ok) => {
                if !state.in_flight
                    || state.rpcs.front().map(|p| p.info.id) != Some(basic::Get::INFO.id)
                {
                    return Err(unexpected(format!(
                        "basic.get-ok on channel {id} without a basic.get"
                    )));
                }
                let outstanding = !state.get_no_ack;
                state.unsettled.delivered(get_ok.delivery_tag, outstanding);
                state.assembling = Some(Assembly {
                    target: AssemblyTarget::Get(get_ok),
                    header: None,
                    body: BodyBuffer::Empty,
                });
            }
            Method::BasicAck(ack) => match state.confirms.as_mut() {
                Some(confirms) => {
                    confirms.settle(ack.delivery_tag, ack.multiple, true, &mut self.output)
                }
                None => {
                    return Err(unexpected(format!(
                        "basic.ack on channel {id}, which is not in confirm mode"
                    )))
                }
            },
            Method::BasicNack(nack) => match state.confirms.as_mut() {
                Some(confirms) => {
                    confirms.settle(nack.delivery_tag, nack.multiple, false, &mut self.output)
                }
                None => {
                    return Err(unexpected(format!(
                        "basic.nack on channel {id}, which is not in confirm mode"
                    )))
                }
            },
            Method::BasicCancel(cancel) => {
                // consumer_cancel_notify: the queue went away.
                if !cancel.no_wait {
                    state
                        .out
                        .push_back(Outgoing::Method(Box::new(Method::BasicCancelOk(
                            basic::CancelOk {
                                consumer_tag: cancel.consumer_tag.clone(),
                            },
                        ))));
                    self.schedule(id);
                }
                self.end_consumer(id, &cancel.consumer_tag, true);
            }
            reply => {
                let matches = state.in_flight
                    && state
                        .rpcs
                        .front()
                        .is_some_and(|p| p.info.is_answered_by(reply.info().id));
                if !matches {
                    return Err(unexpected(format!(
                        "{} on channel {id} answers no request",
                        reply.info().name
                    )));
                }
                if let Method::BasicCancelOk(ok) = &reply {
                    let tag = ok.consumer_tag.clone();
                    self.end_consumer(id, &tag, false);
                }
                self.complete_rpc(
                    id,
                    Reply {
                        method: reply,
                        content: None,
                        epoch: 0,
                    },
                );
            }
        }
        Ok(())
    }
}
