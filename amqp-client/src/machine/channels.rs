//! Per-channel state: its phase, the one synchronous call in flight and
//! those queued behind it, and what a close or a lost connection does to it.

use super::*;

/// What answered a synchronous request.
#[derive(Debug)]
pub(crate) struct Reply {
    pub method: Method,
    /// The content of a `basic.get-ok`.
    pub content: Option<Content>,
    /// The channel's epoch when the reply arrived (a get-ok's tag is only
    /// meaningful in it).
    pub epoch: u64,
}

pub(super) struct PendingRpc<P: Ports> {
    pub(super) info: &'static MethodInfo,
    /// Taken when the request goes on the wire.
    pub(super) method: Option<Box<Method>>,
    /// A copy of requests whose success must be recorded for recovery;
    /// boxed, so that the queue of calls (whose room a channel keeps) is
    /// not 136 bytes a call wider for the few requests that have one.
    pub(super) request: Option<Box<Method>>,
    /// `None` when nobody awaits the reply.
    pub(super) reply: Option<P::Reply<Result<Reply, Error>>>,
    /// A step of recovery: its reply advances recovery.
    pub(super) step: bool,
    /// The tag of the application's `basic.consume` this is: failed, the
    /// call leaves no consumer behind.
    pub(super) consumer: Option<ShortString>,
}

impl<P: Ports> PendingRpc<P> {
    pub(super) fn user(method: Box<Method>, reply: P::Reply<Result<Reply, Error>>) -> Self {
        let request = records(&method).then(|| method.clone());
        Self {
            info: method.info(),
            method: Some(method),
            request,
            reply: Some(reply),
            step: false,
            consumer: None,
        }
    }

    /// A call whose reply nobody awaits (the cancel of a dropped consumer).
    pub(super) fn unawaited(method: Method) -> Self {
        Self {
            info: method.info(),
            method: Some(Box::new(method)),
            request: None,
            reply: None,
            step: false,
            consumer: None,
        }
    }

    pub(super) fn step(method: Method) -> Self {
        Self {
            info: method.info(),
            method: Some(Box::new(method)),
            request: None,
            reply: None,
            step: true,
            consumer: None,
        }
    }

    pub(super) fn fail(self, error: &Error, out: &mut Output<P>) {
        if let Some(reply) = self.reply {
            out.answer(reply, Err(error.clone()));
        }
    }
}

/// Whether recovery must remember that this request succeeded.
pub(super) fn records(method: &Method) -> bool {
    matches!(
        method,
        Method::ExchangeDeclare(_)
            | Method::ExchangeDelete(_)
            | Method::ExchangeBind(_)
            | Method::ExchangeUnbind(_)
            | Method::QueueDeclare(_)
            | Method::QueueDelete(_)
            | Method::QueueBind(_)
            | Method::QueueUnbind(_)
            | Method::BasicQos(_)
            | Method::TxSelect(_)
    )
}

#[derive(PartialEq, Eq)]
pub(super) enum Phase {
    Opening,
    Open,
    Closing,
    /// The connection was lost; the channel waits to be re-opened.
    Lost,
}

/// Hashes channel ids by multiplication (Fibonacci hashing): ids are small
/// integers chosen by this client, so no flooding defence is needed, and the
/// default SipHash showed up on the publish path.
#[derive(Default)]
pub(super) struct ChannelIdHasher(u64);

impl std::hash::Hasher for ChannelIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u16(&mut self, id: u16) {
        self.0 = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A channel as a handle names it: its id, and the incarnation the id had
/// when the handle opened it. Ids are reused once a channel closes, and a
/// command still queued from a handle of the closed channel must not reach
/// the channel that reuses its id.
///
/// Eight bytes: it is in every publish command and every publish future
/// (at 16 bytes the publish future outgrew what is moved inline, and each
/// publish paid two `memcpy` calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChannelRef {
    pub id: u16,
    pub incarnation: u32,
}

/// Hashes consumer tags a word at a time (FxHash's mixing): every delivery
/// looks its consumer up by tag, and the default SipHash showed on the
/// consume path (callgrind). Tags
/// are chosen by the application or given by the broker at its request, so
/// no remote peer can insert keys to flood a table.
#[derive(Default)]
pub(super) struct TagHasher(u64);

impl TagHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
    }
}

impl std::hash::Hasher for TagHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(word);
            self.add(u64::from_le_bytes(buf));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf));
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

/// A channel's consumers by tag.
pub(super) type ConsumerMap<P> =
    HashMap<ShortString, ConsumerSlot<P>, std::hash::BuildHasherDefault<TagHasher>>;

/// The channels by id. Each state is boxed: it is some 600 bytes, and the
/// table keeps room for up to twice as many entries as it holds (and, once
/// grown, keeps it after the channels close), so that 10,000 channels inline
/// cost the table 1 KB each; boxed, 16 bytes a slot plus the live states.
pub(super) type ChannelMap<P> =
    HashMap<u16, Box<ChannelState<P>>, std::hash::BuildHasherDefault<ChannelIdHasher>>;

pub(super) struct ChannelState<P: Ports> {
    pub(super) closed: Arc<OnceLock<Error>>,
    pub(super) phase: Phase,
    pub(super) open_reply: Option<P::Reply<Result<ChannelRef, Error>>>,
    /// Which opening of the id this is (see [`ChannelRef`]); 0 for the
    /// channels recovery opens for itself, which no handle names.
    pub(super) incarnation: u32,
    pub(super) close_replies: Vec<P::Reply<Result<(), Error>>>,
    pub(super) rpcs: VecDeque<PendingRpc<P>>,
    pub(super) in_flight: bool,
    pub(super) out: VecDeque<Outgoing>,
    pub(super) scheduled: bool,
    pub(super) assembling: Option<Assembly>,
    pub(super) consumers: ConsumerMap<P>,
    /// Boxed: a hundred bytes that only channels in confirm mode use.
    pub(super) confirms: Option<Box<Confirms<P>>>,
    pub(super) returns: Option<P::Returns>,
    /// Bumped at each reconnect; shared with the handles.
    pub(super) epoch: Arc<AtomicU64>,
    /// Prefetch settings to restore (one per `global` value).
    pub(super) qos: Vec<basic::Qos>,
    pub(super) tx: bool,
    /// Recovery's own channel for topology, invisible to the application.
    pub(super) internal: bool,
    /// Opened by the on-connect hook: what is declared on it is not
    /// recorded, and it ends with the connection (the hook's next run
    /// re-creates what it needs).
    pub(super) hook_owned: bool,
    /// Delivery tags the broker holds unacknowledged, for coalescing acks.
    pub(super) unsettled: Unsettled,
    /// Tags of the no-ack consumers that ended most recently (a bounded
    /// few): what still arrives for them must not be nacked.
    pub(super) ended_no_ack: VecDeque<ShortString>,
    /// Whether the `basic.get` on the wire asked for no ack.
    pub(super) get_no_ack: bool,
    /// The `active` of the latest `channel.flow` while its `Outgoing::FlowOk`
    /// waits in `out`.
    pub(super) flow_ok: Option<bool>,
}

impl<P: Ports> ChannelState<P> {
    pub(super) fn new(
        closed: Arc<OnceLock<Error>>,
        epoch: Arc<AtomicU64>,
        open_reply: Option<P::Reply<Result<ChannelRef, Error>>>,
    ) -> Box<Self> {
        Box::new(Self {
            incarnation: 0,
            closed,
            epoch,
            qos: Vec::new(),
            tx: false,
            internal: false,
            hook_owned: false,
            phase: Phase::Opening,
            open_reply,
            close_replies: Vec::new(),
            rpcs: VecDeque::new(),
            in_flight: false,
            out: VecDeque::new(),
            scheduled: false,
            assembling: None,
            consumers: ConsumerMap::default(),
            confirms: None,
            returns: None,
            unsettled: Unsettled::default(),
            get_no_ack: false,
            ended_no_ack: VecDeque::new(),
            flow_ok: None,
        })
    }

    /// The queues its consumers consume from.
    pub(super) fn consumer_queues(&self) -> Vec<ShortString> {
        self.consumers
            .values()
            .map(|c| c.consume.queue.clone())
            .collect()
    }

    /// Fails everything waiting on the channel and records why it closed.
    pub(super) fn fail(&mut self, error: &Error, out: &mut Output<P>) {
        let _ = self.closed.set(error.clone());
        if let Some(reply) = self.open_reply.take() {
            out.answer(reply, Err(error.clone()));
        }
        for pending in self.rpcs.drain(..) {
            pending.fail(error, out);
        }
        for (_, slot) in self.consumers.drain() {
            let _ = slot.end.set(error.clone());
        }
        if let Some(confirms) = self.confirms.as_mut() {
            confirms.fail(error, out);
        }
        for reply in self.close_replies.drain(..) {
            out.answer(reply, Err(error.clone()));
        }
        self.out.clear();
        self.flow_ok = None;
        self.unsettled.clear();
        self.assembling = None;
    }

    /// The connection was lost: fail what was in flight (its outcome is
    /// unknown), keep what recovery re-creates.
    pub(super) fn interrupt(&mut self, error: &Error, out: &mut Output<P>) {
        // Consumers nobody holds any more (dropped, or whose consume failed)
        // are not re-created.
        self.consumers
            .retain(|_, slot| slot.end.get().is_none() && !P::is_gone(&slot.deliveries));
        for pending in self.rpcs.drain(..) {
            // Its caller learns the consume failed: no consumer to recover
            // (unless deliveries for it came, which only a consume-ok precedes).
            let unstarted = pending.consumer.as_ref().filter(|tag| {
                self.consumers
                    .get(*tag)
                    .is_some_and(|slot| slot.position == StreamPosition::Unknown)
            });
            if let Some(slot) = unstarted.and_then(|tag| self.consumers.remove(tag)) {
                let _ = slot.end.set(error.clone());
            }
            pending.fail(error, out);
        }
        self.in_flight = false;
        if let Some(confirms) = self.confirms.as_mut() {
            confirms.fail(&Error::PublishOutcomeUnknown(Arc::new(error.clone())), out);
            confirms.next_seq = 1;
        }
        for outgoing in self.out.drain(..) {
            // Never sent: its confirmation (if any) is dropped with it and the
            // publisher learns the outcome is unknown from the closed sender.
            drop(outgoing);
        }
        self.flow_ok = None;
        self.scheduled = false;
        self.unsettled.clear();
        self.assembling = None;
        self.phase = Phase::Lost;
    }
}

impl<P: Ports> Machine<P> {
    /// The lowest free channel id: ids are recycled as soon as a channel's
    /// close handshake is over.
    pub(super) fn allocate_channel(&self) -> Option<u16> {
        (1..=self.settings.channel_max).find(|id| !self.channels.contains_key(id))
    }

    /// Puts the next queued RPC of a channel on the wire if none is in flight.
    pub(super) fn pump_rpc(&mut self, id: u16) {
        let Some(channel) = self.channels.get_mut(&id) else {
            return;
        };
        if channel.in_flight || channel.phase != Phase::Open {
            return;
        }
        let Some(head) = channel.rpcs.front_mut() else {
            return;
        };
        let Some(method) = head.method.take() else {
            return;
        };
        channel.in_flight = true;
        match &*method {
            // The broker numbers publishes from the select on.
            Method::ConfirmSelect(_) => {
                channel.confirms.get_or_insert_with(|| {
                    let mut confirms = Box::new(Confirms::new());
                    // Returns until its select-ok are of earlier publishes.
                    confirms.awaiting_select_ok = true;
                    confirms
                });
            }
            Method::BasicGet(get) => channel.get_no_ack = get.no_ack,
            // See `unsettled`: acks may be rolled back, recovered tags die.
            Method::TxSelect(_) | Method::BasicRecover(_) => channel.unsettled.stop_tracking(),
            _ => {}
        }
        channel.out.push_back(Outgoing::Method(method));
        self.schedule(id);
    }

    pub(super) fn complete_rpc(&mut self, id: u16, mut reply: Reply) {
        let Some(state) = self.channels.get_mut(&id) else {
            return;
        };
        reply.epoch = state.epoch.load(Ordering::Acquire);
        state.in_flight = false;
        let Some(pending) = state.rpcs.pop_front() else {
            return;
        };
        match pending.request.as_deref() {
            // The hook re-creates what it declared; nothing to recover.
            Some(_) if state.hook_owned => {}
            Some(Method::BasicQos(qos)) => {
                state.qos.retain(|q| q.global != qos.global);
                state.qos.push(qos.clone());
            }
            Some(Method::TxSelect(_)) => state.tx = true,
            Some(request) => self.topology.observe(request, Some(&reply.method)),
            None => {}
        }
        if let (Method::ConfirmSelectOk(_), Some(confirms)) = (&reply.method, &mut state.confirms) {
            confirms.awaiting_select_ok = false;
        }
        if pending.step {
            self.step_succeeded(&reply.method);
        } else if let Some(answer) = pending.reply {
            self.output.answer(answer, Ok(reply));
        }
        self.pump_rpc(id);
    }

    /// The channel a handle's command names, or why it cannot take one:
    /// unknown, its id now another channel's, or closed (then with the error
    /// that closed it).
    pub(super) fn usable_channel(
        &mut self,
        target: ChannelRef,
    ) -> Result<&mut ChannelState<P>, Error> {
        let id = target.id;
        match self.channels.get_mut(&id) {
            Some(state) if state.incarnation != target.incarnation => Err(Self::channel_gone(id)),
            None => Err(Self::channel_gone(id)),
            Some(state) => match state.closed.get() {
                Some(error) => Err(error.clone()),
                None => Ok(state),
            },
        }
    }

    /// Whether `target` is the channel now open under its id.
    pub(super) fn is_current(&self, target: ChannelRef) -> bool {
        self.channels
            .get(&target.id)
            .is_some_and(|c| c.incarnation == target.incarnation)
    }

    pub(super) fn channel_is_usable(&self, id: u16) -> bool {
        self.channels
            .get(&id)
            .is_some_and(|c| c.closed.get().is_none())
    }

    /// Starts the application's close of channel `id`: the close is queued
    /// behind what the channel has to send, and the channel answers every
    /// later call with the application's close (unless something closed it
    /// first, e.g. a call timeout).
    pub(super) fn begin_close(&mut self, id: u16) {
        let Some(state) = self.channels.get_mut(&id) else {
            return;
        };
        if state.phase == Phase::Closing {
            return;
        }
        state.phase = Phase::Closing;
        let reason = CloseReason::by_application(ReplyCode::REPLY_SUCCESS, APPLICATION_CLOSE);
        let _ = state.closed.set(Error::channel_closed(id, reason));
        state
            .out
            .push_back(Outgoing::Method(Box::new(Method::ChannelClose(
                channel::Close {
                    reply_code: ReplyCode::REPLY_SUCCESS.code(),
                    reply_text: ShortString::from_static(APPLICATION_CLOSE),
                    class_id: 0,
                    method_id: 0,
                },
            ))));
        self.schedule(id);
    }
}
