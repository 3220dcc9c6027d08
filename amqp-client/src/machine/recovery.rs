//! The connection lost and recovered: what a loss keeps and drops, and the
//! steps that re-open channels and re-create topology and consumers.

use super::*;

/// A step of recovery, run one at a time.
#[derive(Debug)]
pub(super) enum Step {
    Open(u16),
    Call(u16, Method),
    /// A queue declaration whose name the broker may change (the old name).
    Declare(u16, Method, ShortString),
    Close(u16),
}

impl Step {
    pub(super) fn channel(&self) -> u16 {
        match self {
            Step::Open(id) | Step::Call(id, _) | Step::Declare(id, _, _) | Step::Close(id) => *id,
        }
    }
}

pub(super) struct RecoveryRun {
    pub(super) steps: VecDeque<Step>,
    /// The channel whose step is on the wire.
    pub(super) waiting: Option<u16>,
    /// Old → new names of server-named queues.
    pub(super) renamed: HashMap<ShortString, ShortString>,
    /// The queue declaration on the wire, with the name it had.
    pub(super) declaring: Option<ShortString>,
}

/// Points a binding or consume at a server-named queue's new name.
pub(super) fn rename_queue_in(method: &mut Method, renamed: &HashMap<ShortString, ShortString>) {
    let queue = match method {
        Method::QueueBind(bind) => &mut bind.queue,
        Method::BasicConsume(consume) => &mut consume.queue,
        _ => return,
    };
    if let Some(new) = renamed.get(queue) {
        *queue = new.clone();
    }
}

impl<P: Ports> Machine<P> {
    /// Drops the recovery step that would consume again as `tag` on
    /// `channel`; whether there was one.
    pub(super) fn drop_consume_step(&mut self, channel: u16, tag: &ShortString) -> bool {
        let Some(run) = self.recovery.as_mut() else {
            return false;
        };
        let before = run.steps.len();
        run.steps.retain(|step| {
            !matches!(step, Step::Call(id, Method::BasicConsume(c)) if *id == channel && c.consumer_tag == *tag)
        });
        run.steps.len() != before
    }

    /// The socket is gone (or must be dropped): recover when configured,
    /// fail otherwise.
    pub(crate) fn connection_lost(&mut self, error: Error) {
        match self.state {
            State::Closed | State::Interrupted => {}
            State::Closing { .. } => self.fail(error),
            State::Open | State::Recovering if !self.settings.recover => self.fail(error),
            State::Open | State::Recovering => self.interrupt(error),
        }
    }

    /// Why the connection was last lost (once), for the error handlers.
    pub(crate) fn take_loss(&mut self) -> Option<Error> {
        self.last_loss.take()
    }

    pub(super) fn interrupt(&mut self, error: Error) {
        tracing::warn!(%error, "connection lost; recovering");
        self.last_loss = Some(error.clone());
        let gone: Vec<u16> = self
            .channels
            .iter()
            .filter(|(_, c)| {
                c.internal || c.hook_owned || c.phase == Phase::Closing || c.open_reply.is_some()
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(mut state) = self.channels.remove(&id) {
                let closing = state.phase == Phase::Closing;
                let replies: Vec<_> = state.close_replies.drain(..).collect();
                state.fail(&error, &mut self.output);
                if closing {
                    // The application's close is as good as done.
                    for reply in replies {
                        self.output.answer(reply, Ok(()));
                    }
                }
            }
        }
        // Parked deliveries are dropped with the socket: a stream consumer
        // resumes at the first of its own (walked backwards, so it is the
        // first that sets the position last).
        for Parked {
            channel: id,
            delivery,
            ..
        } in self.overflow.iter().rev()
        {
            let Some(slot) = self
                .channels
                .get_mut(id)
                .and_then(|c| c.consumers.get_mut(&delivery.deliver.consumer_tag))
            else {
                continue;
            };
            if let (StreamPosition::After(_), Some(offset)) =
                (slot.position, stream_offset(&delivery.content.properties))
            {
                // Saturating: the offset is the peer's to choose.
                slot.position = StreamPosition::After(offset.saturating_sub(1));
            }
        }
        for state in self.channels.values_mut() {
            state.interrupt(&error, &mut self.output);
            // Tags from before the reconnect mean nothing to the new channel.
            state.epoch.store(self.next_epoch, Ordering::Release);
            self.next_epoch += 1;
        }
        for reply in self.secret_replies.drain(..) {
            self.output.answer(reply, Err(error.clone()));
        }
        self.control.clear();
        self.crossed_closes.clear();
        self.ready.clear();
        self.heartbeat_due = false;
        self.overflow.clear();
        self.overflow_bytes = 0;
        self.recovery = None;
        self.state = State::Interrupted;
        self.output.push(Event::Recovering(true));
        // A new connection is not blocked until its broker says so.
        self.output.push(Event::Blocked(None));
        self.output
            .report(RecoveryEvent::Recovering { cause: error });
    }

    /// A new socket is up: re-open channels (same ids) with their QoS,
    /// confirm and tx modes, re-create the topology, then the consumers.
    pub(crate) fn resume(
        &mut self,
        channel_max: u16,
        frame_max: u32,
        heartbeat: Duration,
        now: Instant,
    ) {
        self.settings.channel_max = channel_max;
        self.settings.frame_max = frame_max;
        self.settings.heartbeat = heartbeat;
        self.last_received = now;
        self.last_sent = now;
        self.state = State::Recovering;
        let mut ids: Vec<u16> = self.channels.keys().copied().collect();
        ids.sort_unstable();
        let mut steps = VecDeque::new();
        for id in &ids {
            let Some(state) = self.channels.get(id) else {
                continue;
            };
            steps.push_back(Step::Open(*id));
            for qos in &state.qos {
                steps.push_back(Step::Call(*id, Method::BasicQos(qos.clone())));
            }
            if state.confirms.is_some() {
                steps.push_back(Step::Call(
                    *id,
                    Method::ConfirmSelect(crate::protocol::methods::confirm::Select {
                        no_wait: false,
                    }),
                ));
            }
            if state.tx {
                steps.push_back(Step::Call(
                    *id,
                    Method::TxSelect(crate::protocol::methods::tx::Select {}),
                ));
            }
        }
        let plan = if self.settings.recover_topology {
            self.topology.plan()
        } else {
            Vec::new()
        };
        if !plan.is_empty() {
            if let Some(t) = self.allocate_channel() {
                let mut state =
                    ChannelState::new(Arc::new(OnceLock::new()), Arc::new(AtomicU64::new(0)), None);
                state.internal = true;
                state.phase = Phase::Lost;
                self.channels.insert(t, state);
                steps.push_back(Step::Open(t));
                for (method, old_name) in plan {
                    match old_name {
                        Some(old) => steps.push_back(Step::Declare(t, method, old)),
                        None => steps.push_back(Step::Call(t, method)),
                    }
                }
                steps.push_back(Step::Close(t));
            }
        }
        for id in &ids {
            let Some(state) = self.channels.get(id) else {
                continue;
            };
            let mut consumers: Vec<&ConsumerSlot<P>> = state.consumers.values().collect();
            consumers.sort_by(|a, b| a.consume.consumer_tag.cmp(&b.consume.consumer_tag));
            for slot in consumers {
                let mut consume = slot.consume.clone();
                if let StreamPosition::After(offset) = slot.position {
                    consume.arguments.insert(
                        ShortString::from_static(STREAM_OFFSET),
                        FieldValue::I64(offset.saturating_add(1)),
                    );
                }
                steps.push_back(Step::Call(*id, Method::BasicConsume(consume)));
            }
        }
        self.recovery = Some(RecoveryRun {
            steps,
            waiting: None,
            renamed: HashMap::new(),
            declaring: None,
        });
        self.advance_recovery();
    }

    /// Puts the next recovery step on the wire, or finishes recovery.
    pub(super) fn advance_recovery(&mut self) {
        loop {
            let Some(run) = self.recovery.as_mut() else {
                return;
            };
            run.waiting = None;
            run.declaring = None;
            let Some(step) = run.steps.pop_front() else {
                self.recovery = None;
                self.state = State::Open;
                self.output.push(Event::Recovering(false));
                tracing::info!("connection recovered");
                self.output.report(RecoveryEvent::Recovered);
                return;
            };
            match step {
                Step::Open(id) => {
                    let Some(state) = self.channels.get_mut(&id) else {
                        continue;
                    };
                    state.phase = Phase::Opening;
                    state
                        .out
                        .push_back(Outgoing::Method(Box::new(Method::ChannelOpen(
                            channel::Open {},
                        ))));
                    run.waiting = Some(id);
                    self.schedule(id);
                    return;
                }
                Step::Call(id, method) | Step::Declare(id, method, _)
                    if !self
                        .channels
                        .get(&id)
                        .is_some_and(|c| c.phase == Phase::Open) =>
                {
                    tracing::debug!(
                        channel = id,
                        method = method.info().name,
                        "recovery step skipped: channel gone"
                    );
                }
                Step::Call(id, mut method) => {
                    rename_queue_in(&mut method, &run.renamed);
                    if let Method::BasicConsume(consume) = &method {
                        // The consumer's record follows the rename.
                        let queue = consume.queue.clone();
                        let tag = consume.consumer_tag.clone();
                        let Some(state) = self.channels.get_mut(&id) else {
                            continue;
                        };
                        match state.consumers.get_mut(&tag) {
                            // A consume that failed with the loss: its caller
                            // dropped the stream, and nobody would cancel it.
                            Some(slot) if P::is_gone(&slot.deliveries) => {
                                state.consumers.remove(&tag);
                                continue;
                            }
                            Some(slot) => slot.consume.queue = queue,
                            None => continue,
                        }
                    }
                    if !self.step_fits(id, &method) {
                        continue;
                    }
                    let Some(run) = self.recovery.as_mut() else {
                        return;
                    };
                    run.waiting = Some(id);
                    if let Some(state) = self.channels.get_mut(&id) {
                        state.rpcs.push_back(PendingRpc::step(method));
                    }
                    self.pump_rpc(id);
                    return;
                }
                Step::Declare(id, method, old) => {
                    if !self.step_fits(id, &method) {
                        continue;
                    }
                    let Some(run) = self.recovery.as_mut() else {
                        return;
                    };
                    run.waiting = Some(id);
                    run.declaring = Some(old);
                    if let Some(state) = self.channels.get_mut(&id) {
                        state.rpcs.push_back(PendingRpc::step(method));
                    }
                    self.pump_rpc(id);
                    return;
                }
                Step::Close(id) => {
                    let Some(state) = self.channels.get_mut(&id) else {
                        continue;
                    };
                    state.phase = Phase::Closing;
                    state
                        .out
                        .push_back(Outgoing::Method(Box::new(Method::ChannelClose(
                            channel::Close {
                                reply_code: ReplyCode::REPLY_SUCCESS.code(),
                                reply_text: ShortString::from_static("recovery done"),
                                class_id: 0,
                                method_id: 0,
                            },
                        ))));
                    run.waiting = Some(id);
                    self.schedule(id);
                    return;
                }
            }
        }
    }

    /// Whether a recovery step's frame fits the frame_max negotiated on the
    /// new connection (a smaller one than before, or a stream consumer's
    /// added offset, can push it over). One that does not is skipped and
    /// reported; a consumer that cannot consume again ends with the error.
    fn step_fits(&mut self, id: u16, method: &Method) -> bool {
        let mut encoded = BytesMut::new();
        frame::write_method(&mut encoded, id, method);
        let frame_max = self.settings.frame_max;
        if frame_max == 0 || encoded.len() <= frame_max as usize {
            return true;
        }
        let error = Error::FrameTooLarge {
            what: method.info().name,
            size: encoded.len(),
            frame_max,
        };
        tracing::warn!(channel = id, %error, "recovery step skipped");
        if let Method::BasicConsume(consume) = method {
            let slot = self
                .channels
                .get_mut(&id)
                .and_then(|state| state.consumers.remove(&consume.consumer_tag));
            if let Some(slot) = slot {
                let _ = slot.end.set(error.clone());
                self.consumers_gone(vec![slot.consume.queue]);
            }
        }
        self.output.report(RecoveryEvent::StepFailed {
            method: method.info().name,
            error,
        });
        false
    }

    pub(super) fn step_succeeded(&mut self, reply: &Method) {
        let Some(run) = self.recovery.as_mut() else {
            return;
        };
        if let (Some(old), Method::QueueDeclareOk(ok)) = (run.declaring.take(), reply) {
            if ok.queue != old {
                tracing::info!(old = %old, new = %ok.queue, "server-named queue renamed by recovery");
                run.renamed.insert(old.clone(), ok.queue.clone());
                self.topology.rename_queue(&old, &ok.queue);
                self.output.report(RecoveryEvent::QueueRenamed {
                    old: old.to_string(),
                    new: ok.queue.to_string(),
                });
            }
        }
        self.advance_recovery();
    }

    /// A step closed its channel: report it; recovery's own channel is
    /// opened again, an application channel stays closed.
    pub(super) fn step_failed(&mut self, id: u16, internal: bool, error: Error) {
        tracing::warn!(channel = id, %error, "recovery step failed");
        let method = match &error {
            Error::ChannelClosed { reason, .. } => reason
                .method
                .and_then(|m| {
                    crate::protocol::methods::ALL_METHODS
                        .iter()
                        .find(|i| i.id == m)
                })
                .map_or("channel", |i| i.name),
            _ => "channel",
        };
        self.output
            .report(RecoveryEvent::StepFailed { method, error });
        if internal {
            let mut state =
                ChannelState::new(Arc::new(OnceLock::new()), Arc::new(AtomicU64::new(0)), None);
            state.internal = true;
            state.phase = Phase::Lost;
            // The close-ok for the old incarnation goes out first (control queue).
            self.channels.insert(id, state);
            if let Some(run) = self.recovery.as_mut() {
                run.steps.push_front(Step::Open(id));
            }
        } else if let Some(run) = self.recovery.as_mut() {
            run.steps.retain(|step| step.channel() != id);
        }
        self.advance_recovery();
    }
}
