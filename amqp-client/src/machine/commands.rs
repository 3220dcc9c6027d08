//! What handles ask of the connection, and how each command is taken: at
//! once while open, a few during recovery, refused once closed.

use super::*;

/// What handles ask of the connection; the answers go to their [`Ports`].
pub(crate) enum Command<P: Ports> {
    OpenChannel {
        closed: Arc<OnceLock<Error>>,
        epoch: Arc<AtomicU64>,
        /// Opened by the on-connect hook: not recovered (the hook re-creates it).
        hook_owned: bool,
        reply: P::Reply<Result<ChannelRef, Error>>,
    },
    // Methods are boxed here and in `Outgoing`: a `Method` is 136 bytes, and
    // a command or frame that large is copied with a `memcpy` call at every
    // move (into the queue, out of it, into the channel's queue...), which was
    // a fifth of the CPU time of a publish. Publishes and settlements, the
    // per-message commands, carry no `Method`.
    Rpc {
        channel: ChannelRef,
        method: Box<Method>,
        reply: P::Reply<Result<Reply, Error>>,
    },
    Send {
        channel: ChannelRef,
        method: Box<Method>,
    },
    /// An ack, nack or reject of a delivery of `epoch`: a stale one is
    /// dropped rather than sent to a channel that never saw the tag.
    Settle {
        channel: u16,
        settlement: Settlement,
        epoch: u64,
    },
    /// A publish whose method and header frames the publisher encoded (off
    /// the I/O task); the body is split into frames when it is written.
    Publish {
        channel: ChannelRef,
        head: Bytes,
        body: PublishBody,
        confirm: Option<ConfirmReply<P>>,
        /// The publisher's share of the connection's publish buffer, given
        /// back (by drop) once the message is written or discarded.
        credit: Option<crate::credit::Credit>,
    },
    Consume {
        channel: ChannelRef,
        consume: Box<basic::Consume>,
        deliveries: P::Deliveries,
        end: ConsumerEnd,
        reply: P::Reply<Result<Reply, Error>>,
    },
    /// A dropped consumer: cancel it, and requeue what it had buffered
    /// (`requeue`) and what still arrives for it.
    ForgetConsumer {
        channel: ChannelRef,
        tag: ShortString,
        /// Buffered delivery tags, of epoch `requeue_epoch`.
        requeue: Vec<u64>,
        requeue_epoch: u64,
    },
    WaitForConfirms {
        channel: ChannelRef,
        reply: P::Reply<Result<bool, Error>>,
    },
    SetReturns {
        channel: ChannelRef,
        returns: P::Returns,
    },
    CloseChannel {
        channel: ChannelRef,
        reply: Option<P::Reply<Result<(), Error>>>,
    },
    /// `connection.update-secret`, carried as the method itself so that its
    /// redacting `Debug` covers the command too.
    UpdateSecret {
        method: connection::UpdateSecret,
        reply: P::Reply<Result<(), Error>>,
    },
    CloseConnection {
        code: ReplyCode,
        text: String,
    },
}

// By hand: the handles' ends (`P`'s types) need not be `Debug`. What a
// command carries beyond its kind and channel is left out (the secret of
// an update-secret among it).
impl<P: Ports> std::fmt::Debug for Command<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, channel) = match self {
            Command::OpenChannel { .. } => ("OpenChannel", None),
            Command::Rpc {
                channel, method, ..
            } => (method.info().name, Some(channel.id)),
            Command::Send { channel, method } => (method.info().name, Some(channel.id)),
            Command::Settle { channel, .. } => ("Settle", Some(*channel)),
            Command::Publish { channel, .. } => ("Publish", Some(channel.id)),
            Command::Consume { channel, .. } => ("Consume", Some(channel.id)),
            Command::ForgetConsumer { channel, .. } => ("ForgetConsumer", Some(channel.id)),
            Command::WaitForConfirms { channel, .. } => ("WaitForConfirms", Some(channel.id)),
            Command::SetReturns { channel, .. } => ("SetReturns", Some(channel.id)),
            Command::CloseChannel { channel, .. } => ("CloseChannel", Some(channel.id)),
            Command::UpdateSecret { .. } => ("UpdateSecret", None),
            Command::CloseConnection { .. } => ("CloseConnection", None),
        };
        let mut debug = f.debug_struct(kind);
        if let Some(channel) = channel {
            debug.field("channel", &channel);
        }
        debug.finish_non_exhaustive()
    }
}

/// How many close timeouts `close()` may spend writing what is still queued
/// before it gives up on it (a broker that stopped reading).
const FLUSH_TIMEOUT_FACTOR: u32 = 6;

/// The reply text of the application's closes.
pub(super) const APPLICATION_CLOSE: &str = "closed by the application";

impl<P: Ports> Machine<P> {
    /// Takes a command from a handle. While the connection is lost or being
    /// recovered only closes and forgotten consumers are taken (the rest wait
    /// in the command queue until it is back); once it is closing, every
    /// command is answered with why.
    pub(crate) fn command(&mut self, command: Command<P>, now: Instant) {
        let recovering = matches!(self.state, State::Interrupted | State::Recovering);
        if !recovering && !self.accepts_commands() {
            return self.refuse(command);
        }
        match command {
            Command::CloseConnection { code, text } => self.close_connection(code, text, now),
            Command::CloseChannel { channel, reply } => self.close_channel(channel, reply),
            Command::ForgetConsumer {
                channel,
                tag,
                requeue,
                requeue_epoch,
            } => {
                // The consumer's channel is gone (and the id maybe reused): so is the consumer.
                let current_epoch = self
                    .channels
                    .get(&channel.id)
                    .filter(|state| state.incarnation == channel.incarnation)
                    .map(|state| state.epoch.load(Ordering::Acquire));
                if let Some(epoch) = current_epoch {
                    let requeue = if epoch == requeue_epoch {
                        requeue
                    } else {
                        Vec::new()
                    };
                    self.forget_consumer(channel.id, tag, requeue);
                }
            }
            other if recovering => self.refuse(other),
            Command::Publish {
                channel,
                head,
                body,
                confirm,
                credit,
            } => {
                let state = match self.usable_channel(channel) {
                    Ok(state) => state,
                    Err(error) => {
                        if let Some(confirm) = confirm {
                            self.output.answer(confirm, Err(error));
                        }
                        return;
                    }
                };
                if let Some(confirms) = state.confirms.as_mut() {
                    let seq = confirms.next_seq;
                    confirms.next_seq += 1;
                    confirms.pending.push_back((seq, confirm));
                }
                self.push_out(
                    channel.id,
                    Outgoing::Publish {
                        head: Some(head),
                        body: body.0,
                        offset: 0,
                        credit,
                    },
                );
            }
            Command::Settle {
                channel,
                settlement,
                epoch,
            } => {
                let current = self
                    .channels
                    .get(&channel)
                    .map(|c| c.epoch.load(Ordering::Acquire));
                if current != Some(epoch) {
                    tracing::debug!(
                        channel,
                        ?settlement,
                        "stale delivery tag from before a reconnect dropped"
                    );
                    return;
                }
                if self.channel_is_usable(channel) {
                    self.push_settlement(channel, settlement);
                }
            }
            Command::OpenChannel {
                closed,
                epoch,
                hook_owned,
                reply,
            } => self.open_channel(closed, epoch, hook_owned, reply),
            Command::Rpc {
                channel,
                method,
                reply,
            } => match self.usable_channel(channel) {
                Ok(state) => {
                    state.rpcs.push_back(PendingRpc::user(method, reply));
                    self.pump_rpc(channel.id);
                }
                Err(error) => {
                    self.output.answer(reply, Err(error));
                }
            },
            Command::Send { channel, method } => self.send(channel, method),
            Command::Consume {
                channel,
                consume,
                deliveries,
                end,
                reply,
            } => self.consume(channel, *consume, deliveries, end, reply),
            Command::WaitForConfirms { channel, reply } => self.wait_for_confirms(channel, reply),
            Command::SetReturns { channel, returns } => {
                if let Ok(state) = self.usable_channel(channel) {
                    state.returns = Some(returns);
                }
            }
            Command::UpdateSecret { method, reply } => {
                self.secret_replies.push_back(reply);
                self.control
                    .push_back((0, Method::ConnectionUpdateSecret(method)));
            }
        }
    }

    fn open_channel(
        &mut self,
        closed: Arc<OnceLock<Error>>,
        epoch: Arc<AtomicU64>,
        hook_owned: bool,
        reply: P::Reply<Result<ChannelRef, Error>>,
    ) {
        let Some(id) = self.allocate_channel() else {
            self.output.answer(
                reply,
                Err(Error::ChannelsExhausted(self.settings.channel_max)),
            );
            return;
        };
        epoch.store(self.fresh_epoch(), Ordering::Release);
        let mut state = ChannelState::new(closed, epoch, Some(reply));
        // Wrapping: only a command queued before an id's reuse and taken
        // 2^32 channel opens later could be mistaken for the new channel's.
        self.next_incarnation = self.next_incarnation.wrapping_add(1).max(1);
        state.incarnation = self.next_incarnation;
        state.hook_owned = hook_owned;
        self.channels.insert(id, state);
        self.push_out(
            id,
            Outgoing::Method(Box::new(Method::ChannelOpen(channel::Open {}))),
        );
    }

    /// A method sent without awaiting a reply (no-wait, or one that has none).
    fn send(&mut self, target: ChannelRef, method: Box<Method>) {
        if !self.is_current(target) {
            return;
        }
        let channel = target.id;
        if let Method::BasicCancel(cancel) = &*method {
            // no-wait cancel: the consumer ends now.
            self.end_consumer(channel, &cancel.consumer_tag, false);
            if self.drop_unsent_consume(channel, &cancel.consumer_tag) {
                // Sent, the cancel would overtake the consume queued behind
                // another call: the broker would then start a consumer that
                // nobody reads (and whose deliveries come back forever).
                return;
            }
        }
        if !self.channel_is_usable(channel) {
            return;
        }
        if records(&method) && !self.channels.get(&channel).is_some_and(|c| c.hook_owned) {
            // A no-wait declaration: recorded as sent.
            self.topology.observe(&method, None);
        }
        if let (Method::ConfirmSelect(_), Some(state)) = (&*method, self.channels.get_mut(&channel))
        {
            // Sent as a select whose select-ok nobody awaits: returns of
            // publishes sent before it (which no ack follows) come before
            // that select-ok, and only it tells them from the returns of
            // publishes in confirm mode.
            let select =
                Method::ConfirmSelect(crate::protocol::methods::confirm::Select { no_wait: false });
            state.rpcs.push_back(PendingRpc::unawaited(select));
            return self.pump_rpc(channel);
        }
        self.push_method(channel, method);
    }

    fn consume(
        &mut self,
        target: ChannelRef,
        consume: basic::Consume,
        deliveries: P::Deliveries,
        end: ConsumerEnd,
        reply: P::Reply<Result<Reply, Error>>,
    ) {
        let channel = target.id;
        let state = match self.usable_channel(target) {
            Ok(state) => state,
            Err(error) => {
                self.output.answer(reply, Err(error));
                return;
            }
        };
        // Registered now: deliveries may follow consume-ok at once.
        let tag = consume.consumer_tag.clone();
        state.consumers.insert(
            consume.consumer_tag.clone(),
            ConsumerSlot {
                deliveries,
                end,
                no_ack: consume.no_ack,
                consume: consume.clone(),
                position: StreamPosition::Unknown,
            },
        );
        state.rpcs.push_back(PendingRpc {
            info: &basic::Consume::INFO,
            method: Some(Box::new(Method::BasicConsume(consume))),
            request: None,
            reply: Some(reply),
            step: false,
            consumer: Some(tag),
        });
        self.pump_rpc(channel);
    }

    fn wait_for_confirms(&mut self, target: ChannelRef, reply: P::Reply<Result<bool, Error>>) {
        let channel = target.id;
        let state = match self.usable_channel(target) {
            Ok(state) => state,
            Err(error) => {
                self.output.answer(reply, Err(error));
                return;
            }
        };
        match state.confirms.as_mut() {
            None => {
                self.output
                    .answer(reply, Err(Error::NotInConfirmMode(channel)));
            }
            Some(confirms) if confirms.pending.is_empty() => {
                let all = confirms.all_acked;
                confirms.all_acked = true;
                self.output.answer(reply, Ok(all));
            }
            Some(confirms) => confirms.waiters.push(reply),
        }
    }

    /// Drops the `basic.consume` of `tag` if it still waits behind another
    /// call on `channel` (never sent); its caller learns it was cancelled.
    fn drop_unsent_consume(&mut self, channel: u16, tag: &ShortString) -> bool {
        let Some(state) = self.channels.get_mut(&channel) else {
            return false;
        };
        let unsent = state
            .rpcs
            .iter()
            .position(|pending| pending.method.is_some() && pending.consumer.as_ref() == Some(tag));
        let Some(pending) = unsent.and_then(|at| state.rpcs.remove(at)) else {
            return false;
        };
        let cancelled = Error::ConsumerCancelled {
            channel,
            consumer_tag: tag.to_string(),
            by_broker: false,
        };
        pending.fail(&cancelled, &mut self.output);
        true
    }

    /// A dropped consumer: cancel it, and requeue what it had buffered. While
    /// the connection is lost or being recovered, its buffered tags belong to
    /// the old connection (the broker requeues those itself), and a consumer
    /// not yet consuming on the new one just ends.
    pub(super) fn forget_consumer(&mut self, channel: u16, tag: ShortString, requeue: Vec<u64>) {
        if self.accepts_commands() {
            if !self.channel_is_usable(channel) {
                return;
            }
            // No-ack deliveries are settled as sent: the broker answers a
            // nack of one with 406 and closes the channel.
            if !self.settled_as_sent(channel, &tag) {
                for delivery_tag in requeue {
                    self.requeue(channel, delivery_tag);
                }
            }
        } else {
            let consume_step_pending = self.drop_consume_step(channel, &tag);
            let consuming_again = self
                .channels
                .get(&channel)
                .is_some_and(|state| state.phase == Phase::Open);
            if consume_step_pending || !consuming_again {
                self.end_consumer(channel, &tag, false);
                return;
            }
        }
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        let Some(slot) = state.consumers.get(&tag) else {
            return;
        };
        let _ = slot.end.set(Error::ConsumerCancelled {
            channel,
            consumer_tag: tag.to_string(),
            by_broker: false,
        });
        // The slot stays until cancel-ok, so that deliveries still in flight
        // are requeued rather than lost. Nobody awaits the reply.
        state
            .rpcs
            .push_back(PendingRpc::unawaited(Method::BasicCancel(basic::Cancel {
                consumer_tag: tag,
                no_wait: false,
            })));
        self.pump_rpc(channel);
    }

    /// The application closes a channel. Open (on this connection or, during
    /// recovery, already on the new one), it sends `channel.close` and
    /// answers `reply` at close-ok; lost with the old connection, it is done.
    fn close_channel(&mut self, target: ChannelRef, reply: Option<P::Reply<Result<(), Error>>>) {
        let channel = target.id;
        // An id reused since is another channel than this handle's.
        let state = self
            .channels
            .get_mut(&channel)
            .filter(|state| state.incarnation == target.incarnation);
        let Some(state) = state else {
            if let Some(reply) = reply {
                self.output.answer(reply, Ok(()));
            }
            return;
        };
        if state.phase != Phase::Lost {
            if let Some(reply) = reply {
                state.close_replies.push(reply);
            }
            match self.recovery.as_mut() {
                // Already closing: its close-ok answers the reply too.
                _ if state.phase == Phase::Closing => {}
                None => self.begin_close(channel),
                Some(run) => {
                    // After the step on the wire for it, if any.
                    let _ = state.closed.set(Error::channel_closed(
                        channel,
                        CloseReason::by_application(ReplyCode::REPLY_SUCCESS, APPLICATION_CLOSE),
                    ));
                    run.steps.retain(|step| step.channel() != channel);
                    run.steps.push_front(Step::Close(channel));
                }
            }
            return;
        }
        if let Some(mut state) = self.channels.remove(&channel) {
            let queues = state.consumer_queues();
            state.fail(
                &Error::channel_closed(
                    channel,
                    CloseReason::by_application(ReplyCode::REPLY_SUCCESS, APPLICATION_CLOSE),
                ),
                &mut self.output,
            );
            self.consumers_gone(queues);
            if let Some(run) = self.recovery.as_mut() {
                run.steps.retain(|step| step.channel() != channel);
            }
        }
        if let Some(reply) = reply {
            self.output.answer(reply, Ok(()));
        }
    }

    /// The application closes the connection: once every channel's queue is
    /// written (what was published before `close()` goes out before it), or
    /// at once while there is no connection to write to.
    fn close_connection(&mut self, code: ReplyCode, text: String, now: Instant) {
        let reason = CloseReason::by_application(code, text.clone());
        if !self.accepts_commands() {
            tracing::info!("connection closed by the application during recovery");
            return self.fail(Error::connection_closed(reason));
        }
        let _ = self.error.set(Error::connection_closed(reason));
        self.closing_frame = Some(Method::ConnectionClose(connection::Close {
            reply_code: code.code(),
            reply_text: ShortString::new(&text).unwrap_or_default(),
            class_id: 0,
            method_id: 0,
        }));
        // What is queued may take a while to write to a slow broker: the
        // close-ok timeout starts once the close itself is sent.
        self.state = State::Closing {
            deadline: now + self.settings.close_timeout * FLUSH_TIMEOUT_FACTOR,
        };
    }

    /// Answers a command that arrives after the connection stopped taking them.
    pub(super) fn refuse(&mut self, command: Command<P>) {
        let error = self.closed_error();
        match command {
            Command::OpenChannel { reply, .. } => {
                self.output.answer(reply, Err(error));
            }
            Command::Rpc { reply, .. } | Command::Consume { reply, .. } => {
                self.output.answer(reply, Err(error));
            }
            Command::Publish {
                confirm: Some(confirm),
                ..
            } => {
                self.output.answer(confirm, Err(error));
            }
            Command::WaitForConfirms { reply, .. } => {
                self.output.answer(reply, Err(error));
            }
            Command::CloseChannel {
                reply: Some(reply), ..
            }
            | Command::UpdateSecret { reply, .. } => {
                self.output.answer(reply, Err(error));
            }
            _ => {}
        }
    }
}
