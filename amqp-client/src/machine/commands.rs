//! What handles ask of the connection, and how each command is taken: at
//! once while open, a few during recovery, refused once closed.

use super::*;

/// What handles ask of the connection.
#[derive(Debug)]
pub(crate) enum Command {
    OpenChannel {
        closed: Arc<OnceLock<Error>>,
        epoch: Arc<AtomicU64>,
        /// Opened by the on-connect hook: not recovered (the hook re-creates it).
        hook_owned: bool,
        reply: oneshot::Sender<Result<u16, Error>>,
    },
    // Methods are boxed here and in `Outgoing`: a `Method` is 136 bytes, and
    // a command or frame that large is copied with a `memcpy` call at every
    // move (into the queue, out of it, into the channel's queue...), which was
    // a fifth of the CPU time of a publish. Publishes and settlements, the
    // per-message commands, carry no `Method`.
    Rpc {
        channel: u16,
        method: Box<Method>,
        reply: oneshot::Sender<Result<Reply, Error>>,
    },
    Send {
        channel: u16,
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
        channel: u16,
        head: Bytes,
        body: PublishBody,
        confirm: Option<ConfirmSender>,
        /// The publisher's share of the connection's publish buffer, given
        /// back (by drop) once the message is written or discarded.
        credit: Option<crate::credit::Credit>,
    },
    Consume {
        channel: u16,
        consume: Box<basic::Consume>,
        deliveries: mpsc::Sender<RawDelivery>,
        end: ConsumerEnd,
        reply: oneshot::Sender<Result<Reply, Error>>,
    },
    /// A dropped consumer: cancel it, and requeue what it had buffered
    /// (`requeue`) and what still arrives for it.
    ForgetConsumer {
        channel: u16,
        tag: ShortString,
        requeue: Vec<u64>,
    },
    WaitForConfirms {
        channel: u16,
        reply: oneshot::Sender<Result<bool, Error>>,
    },
    SetReturns {
        channel: u16,
        returns: mpsc::Sender<ReturnedMessage>,
    },
    CloseChannel {
        channel: u16,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    /// `connection.update-secret`, carried as the method itself so that its
    /// redacting `Debug` covers the command too.
    UpdateSecret {
        method: connection::UpdateSecret,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    CloseConnection {
        code: ReplyCode,
        text: String,
    },
}

/// How many close timeouts `close()` may spend writing what is still queued
/// before it gives up on it (a broker that stopped reading).
pub(super) const FLUSH_TIMEOUT_FACTOR: u32 = 6;

impl Machine {
    /// Takes a command from a handle.
    pub(crate) fn command(&mut self, command: Command, now: Instant) {
        if matches!(self.state, State::Interrupted | State::Recovering) {
            self.command_while_recovering(command);
            return;
        }
        if !self.accepts_commands() {
            self.refuse(command);
            return;
        }
        match command {
            Command::OpenChannel {
                closed,
                epoch,
                hook_owned,
                reply,
            } => match self.allocate_channel() {
                Some(id) => {
                    let mut state = ChannelState::new(closed, epoch, Some(reply));
                    state.hook_owned = hook_owned;
                    self.channels.insert(id, state);
                    self.push_out(
                        id,
                        Outgoing::Method(Box::new(Method::ChannelOpen(channel::Open {}))),
                    );
                }
                None => {
                    let _ = reply.send(Err(Error::ChannelsExhausted(self.settings.channel_max)));
                }
            },
            Command::Rpc {
                channel,
                method,
                reply,
            } => {
                let state = match self.usable_channel(channel) {
                    Ok(state) => state,
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        return;
                    }
                };
                state.rpcs.push_back(PendingRpc::user(method, reply));
                self.pump_rpc(channel);
            }
            Command::Send { channel, method } => {
                if let Method::BasicCancel(cancel) = &*method {
                    // no-wait cancel: the consumer ends now.
                    self.end_consumer(channel, &cancel.consumer_tag, false);
                }
                if self.channel_is_usable(channel) {
                    if records(&method)
                        && !self.channels.get(&channel).is_some_and(|c| c.hook_owned)
                    {
                        // A no-wait declaration: recorded as sent.
                        self.topology.observe(&method, None);
                    }
                    self.push_method(channel, method);
                }
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
                            let _ = confirm.send(Err(error));
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
                    channel,
                    Outgoing::Publish {
                        head: Some(head),
                        body: body.0,
                        offset: 0,
                        credit,
                    },
                );
            }
            Command::Consume {
                channel,
                consume,
                deliveries,
                end,
                reply,
            } => {
                let state = match self.usable_channel(channel) {
                    Ok(state) => state,
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        return;
                    }
                };
                // Registered now: deliveries may follow consume-ok at once.
                state.consumers.insert(
                    consume.consumer_tag.clone(),
                    ConsumerSlot {
                        deliveries,
                        end,
                        no_ack: consume.no_ack,
                        consume: (*consume).clone(),
                        position: StreamPosition::Unknown,
                    },
                );
                state.rpcs.push_back(PendingRpc {
                    info: &basic::Consume::INFO,
                    method: Some(Box::new(Method::BasicConsume(*consume))),
                    request: None,
                    reply: Some(reply),
                    step: false,
                });
                self.pump_rpc(channel);
            }
            Command::ForgetConsumer {
                channel,
                tag,
                requeue,
            } => {
                if !self.channel_is_usable(channel) {
                    return;
                }
                // No-ack deliveries are settled as sent: the broker answers a
                // nack of one with 406 and closes the channel.
                let no_ack = self
                    .channels
                    .get(&channel)
                    .and_then(|state| state.consumers.get(&tag))
                    .is_some_and(|slot| slot.no_ack);
                if !no_ack {
                    for delivery_tag in requeue {
                        self.requeue(channel, delivery_tag);
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
                // The slot stays until cancel-ok, so that deliveries still in
                // flight are requeued rather than lost. Nobody awaits the reply.
                state
                    .rpcs
                    .push_back(PendingRpc::unawaited(Method::BasicCancel(basic::Cancel {
                        consumer_tag: tag,
                        no_wait: false,
                    })));
                self.pump_rpc(channel);
            }
            Command::WaitForConfirms { channel, reply } => {
                let state = match self.usable_channel(channel) {
                    Ok(state) => state,
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        return;
                    }
                };
                match state.confirms.as_mut() {
                    None => {
                        let _ = reply.send(Err(Error::NotInConfirmMode(channel)));
                    }
                    Some(confirms) if confirms.pending.is_empty() => {
                        let all = confirms.all_acked;
                        confirms.all_acked = true;
                        let _ = reply.send(Ok(all));
                    }
                    Some(confirms) => confirms.waiters.push(reply),
                }
            }
            Command::SetReturns { channel, returns } => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    state.returns = Some(returns);
                }
            }
            Command::CloseChannel { channel, reply } => {
                let Some(state) = self.channels.get_mut(&channel) else {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(()));
                    }
                    return;
                };
                if let Some(reply) = reply {
                    state.close_replies.push(reply);
                }
                self.begin_close(channel);
            }
            Command::UpdateSecret { method, reply } => {
                self.secret_replies.push_back(reply);
                self.control
                    .push_back((0, Method::ConnectionUpdateSecret(method)));
            }
            Command::CloseConnection { code, text } => {
                let reason = CloseReason {
                    code,
                    text: text.clone(),
                    method: None,
                    initiator: Initiator::Application,
                };
                let _ = self.error.set(Error::connection_closed(reason));
                // Sent once every channel's queue is written: what was
                // published before close() goes out before the close.
                self.closing_frame = Some(Method::ConnectionClose(connection::Close {
                    reply_code: code.code(),
                    reply_text: ShortString::new(&text).unwrap_or_default(),
                    class_id: 0,
                    method_id: 0,
                }));
                // What is queued may take a while to write to a slow broker:
                // the close-ok timeout starts once the close itself is sent.
                self.state = State::Closing {
                    deadline: now + self.settings.close_timeout * FLUSH_TIMEOUT_FACTOR,
                };
            }
        }
    }

    /// Control commands that arrive while the connection is being recovered
    /// (others wait in the command queue until it is back).
    pub(super) fn command_while_recovering(&mut self, command: Command) {
        match command {
            Command::CloseConnection { code, text } => {
                let reason = CloseReason {
                    code,
                    text,
                    method: None,
                    initiator: Initiator::Application,
                };
                tracing::info!("connection closed by the application during recovery");
                self.fail(Error::connection_closed(reason));
            }
            Command::CloseChannel { channel, reply } => {
                let reopened = self
                    .channels
                    .get(&channel)
                    .is_some_and(|state| matches!(state.phase, Phase::Opening | Phase::Open));
                if reopened {
                    // Already open on the new connection: the broker must be
                    // told, after the step now on the wire for it.
                    let Some(state) = self.channels.get_mut(&channel) else {
                        return;
                    };
                    let _ = state.closed.set(Error::channel_closed(
                        channel,
                        CloseReason {
                            code: ReplyCode::REPLY_SUCCESS,
                            text: "closed by the application".to_owned(),
                            method: None,
                            initiator: Initiator::Application,
                        },
                    ));
                    if let Some(reply) = reply {
                        state.close_replies.push(reply);
                    }
                    if let Some(run) = self.recovery.as_mut() {
                        run.steps.retain(|step| step.channel() != channel);
                        run.steps.push_front(Step::Close(channel));
                    }
                    return;
                }
                if let Some(mut state) = self.channels.remove(&channel) {
                    let queues: Vec<ShortString> = state.consumer_queues();
                    state.fail(&Error::channel_closed(
                        channel,
                        CloseReason {
                            code: ReplyCode::REPLY_SUCCESS,
                            text: "closed by the application".to_owned(),
                            method: None,
                            initiator: Initiator::Application,
                        },
                    ));
                    self.consumers_gone(queues);
                    if let Some(run) = self.recovery.as_mut() {
                        run.steps.retain(|step| step.channel() != channel);
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(()));
                }
            }
            Command::ForgetConsumer { channel, tag, .. } => {
                // Tags from before the reconnect mean nothing now; the broker
                // requeues those messages itself.
                let not_yet_consumed = self.recovery.as_ref().is_some_and(|run| {
                    run.steps.iter().any(|step| {
                        matches!(step, Step::Call(id, Method::BasicConsume(c)) if *id == channel && c.consumer_tag == tag)
                    })
                });
                if not_yet_consumed {
                    if let Some(run) = self.recovery.as_mut() {
                        run.steps.retain(|step| {
                            !matches!(step, Step::Call(id, Method::BasicConsume(c)) if *id == channel && c.consumer_tag == tag)
                        });
                    }
                    self.end_consumer(channel, &tag, false);
                    return;
                }
                // Consuming again on the new connection: cancel it there (the
                // slot stays until cancel-ok; what arrives meanwhile is requeued).
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
                if state.phase == Phase::Open {
                    state
                        .rpcs
                        .push_back(PendingRpc::unawaited(Method::BasicCancel(basic::Cancel {
                            consumer_tag: tag,
                            no_wait: false,
                        })));
                    self.pump_rpc(channel);
                }
            }
            other => self.refuse(other),
        }
    }

    /// Answers a command that arrives after the connection stopped taking them.
    pub(super) fn refuse(&self, command: Command) {
        let error = self.closed_error();
        match command {
            Command::OpenChannel { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Command::Rpc { reply, .. } | Command::Consume { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Command::Publish {
                confirm: Some(confirm),
                ..
            } => {
                let _ = confirm.send(Err(error));
            }
            Command::WaitForConfirms { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Command::CloseChannel {
                reply: Some(reply), ..
            }
            | Command::UpdateSecret { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            _ => {}
        }
    }
}
