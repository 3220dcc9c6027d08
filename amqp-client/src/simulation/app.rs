//! The seeded application: what a program does with its handles — channels,
//! declarations, publishes (confirmed or not, mandatory or not), consumers,
//! gets, acks, transactions — and what it checks in the answers it gets.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use super::broker::Broker;
use super::driver::{Answer, CallId, ConsumerId, Handle, SimDelivery, SimDriver};
use super::Rng;
use crate::events::Confirmation;
use crate::fuzzing::support::short;
use crate::machine::Settlement;
use crate::protocol::methods::{basic, confirm, exchange, queue, tx, Method};
use crate::protocol::{BasicProperties, FieldTable, MethodInfo, ShortString};

/// Exchanges and their types; the last is never declared.
const EXCHANGES: [(&str, &str); 5] = [
    ("x.direct", "direct"),
    ("x.fanout", "fanout"),
    ("x.topic", "topic"),
    ("x.headers", "headers"),
    ("x.missing", "direct"),
];
const QUEUES: [&str; 5] = ["q1", "q2", "q3", "q.full", ""];
const KEYS: [&str; 5] = ["a", "b", "a.b", "c.d.e", "q1"];
/// Channels the application keeps open at most.
const MAX_CHANNELS: usize = 5;
const MAX_CONSUMERS: usize = 8;

/// The arguments and flags each queue name is always declared with (a
/// different set is RabbitMQ's 406), and the name's usual declaration.
fn declare_for(name: &str) -> queue::Declare {
    let mut declare = queue::Declare {
        queue: short(name),
        ..Default::default()
    };
    match name {
        "q1" => declare.durable = true,
        "q2" => declare.auto_delete = true,
        "q3" | "" => declare.exclusive = true,
        _ => {
            declare.arguments.insert(short("x-max-length"), 2i64);
            declare
                .arguments
                .insert(short("x-overflow"), "reject-publish");
        }
    }
    declare
}

/// The body of message `id`: a pattern the receiver checks.
fn body_of(id: u64, size: usize) -> Bytes {
    (0..size)
        .map(|i| ((id as usize * 7 + i) % 251) as u8)
        .collect()
}

fn body_is_intact(message_id: &str, body: &[u8]) -> bool {
    let Some(id) = message_id
        .strip_prefix('p')
        .and_then(|n| n.parse::<u64>().ok())
    else {
        return true;
    };
    body.iter()
        .enumerate()
        .all(|(i, b)| *b == ((id as usize * 7 + i) % 251) as u8)
}

#[derive(Default)]
struct AppChannel {
    confirm: bool,
    tx: bool,
    /// Settlements sent since the last commit, held again after a rollback.
    uncommitted: Vec<Held>,
}

/// A delivery (or get-ok) the application holds unsettled.
#[derive(Debug, Clone)]
struct Held {
    handle: Handle,
    tag: u64,
    epoch: u64,
}

struct AppConsumer {
    handle: Handle,
    started: bool,
    no_ack: bool,
}

enum CallKind {
    Open,
    Close,
    Rpc {
        handle: Handle,
        request: &'static MethodInfo,
        /// Settlements a rollback gives back.
        restore: Vec<Held>,
        get_no_ack: bool,
    },
    Consume(ConsumerId),
    Confirm {
        message: String,
    },
    WaitConfirms,
}

/// What the application reached, for the tests' minimum counts.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AppReached {
    pub channels_opened: u64,
    pub replies: u64,
    pub deliveries: u64,
    pub settled: u64,
    pub acked_confirms: u64,
    pub nacked_confirms: u64,
    pub returned_confirms: u64,
    pub unknown_confirms: u64,
    pub consumers_ended: u64,
    pub gets: u64,
}

#[derive(Default)]
pub(crate) struct App {
    channels: BTreeMap<Handle, AppChannel>,
    calls: HashMap<CallId, CallKind>,
    consumers: BTreeMap<ConsumerId, AppConsumer>,
    held: Vec<Held>,
    next_publish: u64,
    next_tag: u64,
    pub(crate) reached: AppReached,
}

impl App {
    fn live_channel(&self, driver: &SimDriver, rng: &mut Rng) -> Option<Handle> {
        let live: Vec<Handle> = self
            .channels
            .keys()
            .copied()
            .filter(|h| driver.channel_error(*h).is_none())
            .collect();
        (!live.is_empty()).then(|| live[rng.below(live.len())])
    }

    fn rpc(&mut self, driver: &mut SimDriver, handle: Handle, method: Method) {
        let request = method.info();
        let get_no_ack = matches!(&method, Method::BasicGet(g) if g.no_ack);
        let call = driver.rpc(handle, method);
        let restore = Vec::new();
        self.calls.insert(
            call,
            CallKind::Rpc {
                handle,
                request,
                restore,
                get_no_ack,
            },
        );
    }

    /// One seeded action of the application; returns what it did.
    pub(crate) fn act(&mut self, driver: &mut SimDriver, rng: &mut Rng) -> String {
        let open = self
            .channels
            .keys()
            .filter(|h| driver.channel_error(**h).is_none())
            .count();
        if open == 0 || (open < MAX_CHANNELS && rng.one_in(12)) {
            let call = driver.open_channel();
            self.calls.insert(call, CallKind::Open);
            return "open channel".to_owned();
        }
        let Some(handle) = self.live_channel(driver, rng) else {
            return "nothing".to_owned();
        };
        let id = driver.channel_id(handle);
        let choice = rng.below(77);
        match choice {
            0..=2 => {
                // A consumer holds a handle: the last one cannot drop before it.
                let awaited = rng.flag() || self.consumers.values().any(|c| c.handle == handle);
                match driver.close_channel(handle, awaited) {
                    Some(call) => {
                        self.calls.insert(call, CallKind::Close);
                    }
                    // The last handle dropped: the application has it no more.
                    None => self.forget_channel(handle),
                }
                format!("close channel {id} (awaited: {awaited})")
            }
            3..=8 => {
                let (name, mut kind) = EXCHANGES[rng.below(4)];
                if rng.one_in(20) {
                    kind = "fanout";
                }
                let declare = exchange::Declare {
                    exchange: short(name),
                    kind: short(kind),
                    passive: rng.one_in(10),
                    auto_delete: false,
                    no_wait: rng.one_in(5),
                    ..Default::default()
                };
                let text = format!("declare exchange {name} {kind} on {id}");
                self.send_or_call(driver, handle, Method::ExchangeDeclare(declare));
                text
            }
            9..=15 => {
                let name = rng.pick(&QUEUES);
                let mut declare = declare_for(name);
                declare.passive = rng.one_in(12);
                declare.no_wait = !name.is_empty() && rng.one_in(6);
                if rng.one_in(25) {
                    declare.durable = !declare.durable;
                }
                self.send_or_call(driver, handle, Method::QueueDeclare(declare));
                format!("declare queue {name:?} on {id}")
            }
            16..=22 => {
                let queue = short(rng.pick(&QUEUES[..4]));
                let (exchange, kind) = EXCHANGES[rng.below(EXCHANGES.len())];
                let mut arguments = FieldTable::new();
                if kind == "headers" {
                    arguments.insert(short("k"), rng.pick(&KEYS));
                }
                let bind = queue::Bind {
                    queue: queue.clone(),
                    exchange: short(exchange),
                    routing_key: short(if kind == "topic" {
                        rng.pick(&["a.*", "#", "c.#", "b"])
                    } else {
                        rng.pick(&KEYS)
                    }),
                    no_wait: rng.one_in(6),
                    arguments,
                };
                self.send_or_call(driver, handle, Method::QueueBind(bind));
                format!("bind {queue} to {exchange} on {id}")
            }
            23..=24 => {
                let method = match rng.below(4) {
                    0 => Method::QueueUnbind(queue::Unbind {
                        queue: short(rng.pick(&QUEUES[..4])),
                        exchange: short(EXCHANGES[rng.below(4)].0),
                        routing_key: short(rng.pick(&KEYS)),
                        arguments: FieldTable::new(),
                    }),
                    1 => Method::QueuePurge(queue::Purge {
                        queue: short(rng.pick(&QUEUES[..4])),
                        no_wait: rng.one_in(4),
                    }),
                    2 => Method::QueueDelete(queue::Delete {
                        queue: short(rng.pick(&QUEUES[..4])),
                        if_unused: rng.flag(),
                        if_empty: rng.one_in(3),
                        no_wait: rng.one_in(4),
                    }),
                    _ => Method::ExchangeBind(exchange::Bind {
                        destination: short(EXCHANGES[rng.below(4)].0),
                        source: short(EXCHANGES[rng.below(4)].0),
                        routing_key: short(rng.pick(&KEYS)),
                        no_wait: rng.one_in(4),
                        arguments: FieldTable::new(),
                    }),
                };
                let text = format!("{} on {id}", method.info().name);
                self.send_or_call(driver, handle, method);
                text
            }
            25 => {
                let method = if rng.one_in(3) {
                    Method::ExchangeDelete(exchange::Delete {
                        exchange: short(EXCHANGES[rng.below(4)].0),
                        if_unused: rng.flag(),
                        no_wait: false,
                    })
                } else {
                    Method::BasicQos(basic::Qos {
                        prefetch_size: 0,
                        prefetch_count: rng.pick(&[0, 1, 2, 5]),
                        global: rng.flag(),
                    })
                };
                let text = format!("{} on {id}", method.info().name);
                self.rpc(driver, handle, method);
                text
            }
            26..=28 => self.modes(driver, handle, rng),
            29..=55 => self.publish(driver, handle, rng),
            56..=63 => self.consume(driver, handle, rng),
            64..=67 => self.cancel(driver, rng),
            68..=71 => {
                let no_ack = rng.one_in(3);
                self.rpc(
                    driver,
                    handle,
                    Method::BasicGet(basic::Get {
                        queue: short(rng.pick(&QUEUES[..4])),
                        no_ack,
                    }),
                );
                format!("basic.get on {id}")
            }
            72..=74 => {
                if self.channels[&handle].confirm {
                    let call = driver.wait_for_confirms(handle);
                    self.calls.insert(call, CallKind::WaitConfirms);
                }
                format!("wait for confirms on {id}")
            }
            75 => {
                let holds = self.held.iter().any(|h| h.handle == handle);
                let consumes = self.consumers.values().any(|c| c.handle == handle);
                // Acking a tag from before a recover is the application's
                // mistake (RabbitMQ answers 406): only on an idle channel.
                if !holds && !consumes && !self.channels[&handle].tx {
                    if rng.flag() {
                        self.rpc(
                            driver,
                            handle,
                            Method::BasicRecover(basic::Recover { requeue: true }),
                        );
                    } else {
                        driver.send(
                            handle,
                            Method::BasicRecoverAsync(basic::RecoverAsync { requeue: true }),
                        );
                    }
                }
                format!("basic.recover on {id}")
            }
            76 => {
                driver.listen_returns(handle);
                format!("listen for returns on {id}")
            }
            _ => "nothing".to_owned(),
        }
    }

    fn forget_channel(&mut self, handle: Handle) {
        self.channels.remove(&handle);
        self.held.retain(|h| h.handle != handle);
    }

    fn send_or_call(&mut self, driver: &mut SimDriver, handle: Handle, method: Method) {
        if crate::fuzzing::support::expects_reply(&method) {
            self.rpc(driver, handle, method);
        } else {
            driver.send(handle, method);
        }
    }

    /// Confirm mode, transactions, commits and rollbacks.
    fn modes(&mut self, driver: &mut SimDriver, handle: Handle, rng: &mut Rng) -> String {
        let id = driver.channel_id(handle);
        let channel = &self.channels[&handle];
        if channel.tx {
            let commit = !rng.one_in(4);
            let method = if commit {
                Method::TxCommit(tx::Commit {})
            } else {
                Method::TxRollback(tx::Rollback {})
            };
            let restore = if commit {
                Vec::new()
            } else {
                std::mem::take(
                    &mut self
                        .channels
                        .get_mut(&handle)
                        .expect("a channel")
                        .uncommitted,
                )
            };
            let request = method.info();
            let call = driver.rpc(handle, method);
            self.calls.insert(
                call,
                CallKind::Rpc {
                    handle,
                    request,
                    restore,
                    get_no_ack: false,
                },
            );
            return format!("tx commit ({commit}) on {id}");
        }
        if rng.one_in(6) && !channel.confirm {
            self.rpc(driver, handle, Method::TxSelect(tx::Select {}));
            return format!("tx.select on {id}");
        }
        if rng.one_in(4) {
            driver.send(
                handle,
                Method::ConfirmSelect(confirm::Select { no_wait: true }),
            );
        } else {
            self.rpc(
                driver,
                handle,
                Method::ConfirmSelect(confirm::Select { no_wait: false }),
            );
        }
        format!("confirm.select on {id}")
    }

    fn publish(&mut self, driver: &mut SimDriver, handle: Handle, rng: &mut Rng) -> String {
        if driver.is_blocked() {
            // `basic_publish` waits out connection.blocked.
            return "publish waits: blocked".to_owned();
        }
        let id = driver.channel_id(handle);
        let n = self.next_publish;
        self.next_publish += 1;
        let message = format!("p{n}");
        let (exchange, kind) = if rng.one_in(40) {
            EXCHANGES[4]
        } else if rng.one_in(3) {
            ("", "")
        } else {
            EXCHANGES[rng.below(4)]
        };
        let routing_key = if exchange.is_empty() {
            rng.pick(&QUEUES[..4])
        } else {
            rng.pick(&KEYS)
        };
        let mut properties = BasicProperties {
            message_id: Some(short(&message)),
            ..Default::default()
        };
        if kind == "headers" {
            properties.headers = Some(FieldTable::new().with(short("k"), rng.pick(&KEYS)));
        }
        let chunk = driver_frame_body(driver);
        let size = rng.pick(&[0, 1, 10, 100, chunk - 1, chunk, chunk + 1, 2 * chunk + 3]);
        let publish = basic::Publish {
            exchange: short(exchange),
            routing_key: short(routing_key),
            mandatory: rng.flag(),
            immediate: false,
        };
        let confirm = self.channels[&handle].confirm;
        if let Some(call) = driver.publish(handle, &publish, &properties, body_of(n, size), confirm)
        {
            self.calls.insert(
                call,
                CallKind::Confirm {
                    message: message.clone(),
                },
            );
        }
        format!(
            "publish {message} ({size} bytes) to {exchange:?}/{routing_key} on {id}, mandatory {}",
            publish.mandatory
        )
    }

    fn consume(&mut self, driver: &mut SimDriver, handle: Handle, rng: &mut Rng) -> String {
        if self.consumers.len() >= MAX_CONSUMERS {
            return self.cancel(driver, rng);
        }
        let id = driver.channel_id(handle);
        self.next_tag += 1;
        let queue = rng.pick(&QUEUES[..4]);
        let consume = basic::Consume {
            queue: short(queue),
            consumer_tag: short(format!("ctag-{id}.{}", self.next_tag)),
            no_ack: rng.one_in(4),
            exclusive: rng.one_in(10),
            ..Default::default()
        };
        let no_ack = consume.no_ack;
        let (call, consumer) = driver.consume(handle, consume, 1 + rng.below(4));
        match consumer {
            Some(consumer) => {
                self.consumers.insert(
                    consumer,
                    AppConsumer {
                        handle,
                        started: false,
                        no_ack,
                    },
                );
                self.calls.insert(call, CallKind::Consume(consumer));
            }
            None => {
                self.calls.insert(call, CallKind::Close);
            }
        }
        format!("consume {queue} on {id}")
    }

    /// Cancels a consumer (awaited or no-wait) or drops it.
    fn cancel(&mut self, driver: &mut SimDriver, rng: &mut Rng) -> String {
        // A `Consumer` exists once its consume-ok came, but its tag (the
        // application's own, or the one it will get) can be cancelled from
        // another task before that, through the raw `basic_cancel`.
        let ids: Vec<ConsumerId> = self.consumers.keys().copied().collect();
        if ids.is_empty() {
            return "no consumer to cancel".to_owned();
        }
        let consumer = ids[rng.below(ids.len())];
        if rng.flag() && self.consumers[&consumer].started {
            self.consumers.remove(&consumer);
            driver.drop_consumer(consumer);
            return format!("drop consumer {consumer}");
        }
        let handle = self.consumers[&consumer].handle;
        let Some(tag) = driver.consumer_tag(consumer) else {
            return "consumer gone".to_owned();
        };
        if rng.flag() {
            self.rpc(
                driver,
                handle,
                Method::BasicCancel(basic::Cancel {
                    consumer_tag: tag.clone(),
                    no_wait: false,
                }),
            );
        } else {
            driver.send(
                handle,
                Method::BasicCancel(basic::Cancel {
                    consumer_tag: tag.clone(),
                    no_wait: true,
                }),
            );
        }
        format!("cancel {tag}")
    }

    /// Reads up to `max` deliveries from each of some consumers, checking
    /// each against what the broker sent; settles some of what is held.
    pub(crate) fn receive(
        &mut self,
        driver: &mut SimDriver,
        broker: &Broker,
        rng: &mut Rng,
        max: usize,
    ) -> usize {
        let mut count = 0;
        let ids: Vec<ConsumerId> = self.consumers.keys().copied().collect();
        for consumer in ids {
            let received = driver.receive(consumer, max);
            count += received.deliveries.len();
            for delivery in received.deliveries {
                self.delivered(driver, broker, consumer, delivery);
            }
            if let Some(end) = received.ended {
                let app = &self.consumers[&consumer];
                assert!(
                    !app.started || end.is_some(),
                    "consumer {consumer}'s stream ended without a reason"
                );
                self.reached.consumers_ended += 1;
                self.consumers.remove(&consumer);
            }
        }
        let handles: Vec<Handle> = self.channels.keys().copied().collect();
        for handle in handles {
            for id in driver.take_returns(handle) {
                let id = id.unwrap_or_default();
                let fate = broker.store.ledger.get(&id);
                assert!(
                    fate.is_some_and(|f| f.returned),
                    "{id} reached the returns listener; the broker {fate:?}"
                );
            }
        }
        for _ in 0..max {
            if self.held.is_empty() {
                break;
            }
            let held = self.held.swap_remove(rng.below(self.held.len()));
            let settlement = match rng.below(10) {
                0 => Settlement::Nack(basic::Nack {
                    delivery_tag: held.tag,
                    multiple: false,
                    requeue: rng.flag(),
                }),
                1 => Settlement::Reject(basic::Reject {
                    delivery_tag: held.tag,
                    requeue: rng.flag(),
                }),
                _ => Settlement::Ack(basic::Ack {
                    delivery_tag: held.tag,
                    multiple: false,
                }),
            };
            self.settle(driver, held, settlement);
        }
        count
    }

    fn settle(&mut self, driver: &mut SimDriver, held: Held, settlement: Settlement) {
        if driver.settle(held.handle, settlement, held.epoch) {
            self.reached.settled += 1;
            if let Some(channel) = self.channels.get_mut(&held.handle).filter(|c| c.tx) {
                channel.uncommitted.push(held);
            }
        }
    }

    fn delivered(
        &mut self,
        driver: &SimDriver,
        broker: &Broker,
        consumer: ConsumerId,
        delivery: SimDelivery,
    ) {
        self.reached.deliveries += 1;
        let app = &self.consumers[&consumer];
        let handle = app.handle;
        let message = delivery.message_id.clone().unwrap_or_default();
        assert!(
            body_is_intact(&message, &delivery.body),
            "the body of {message} arrived altered"
        );
        let expected = driver.consumer_tag(consumer);
        assert_eq!(
            expected.as_ref(),
            Some(&delivery.consumer_tag),
            "a delivery reached another consumer"
        );
        Self::check_delivery(broker, driver.channel_id(handle), &delivery);
        if !app.no_ack {
            self.held.push(Held {
                handle,
                tag: delivery.tag,
                epoch: delivery.epoch,
            });
        }
    }

    /// Checks a delivery against the broker's record: the right message to
    /// the right consumer with that tag on that channel.
    fn check_delivery(broker: &Broker, channel: u16, delivery: &SimDelivery) {
        let id = delivery.message_id.clone().unwrap_or_default();
        assert!(
            broker.was_delivered(channel, delivery.tag, &id, &delivery.consumer_tag),
            "delivery tag {} on channel {channel} ({id} to {}) is not one the broker sent",
            delivery.tag,
            delivery.consumer_tag
        );
    }

    /// Handles answers as the handles' callers would, checking each.
    pub(crate) fn answers(&mut self, driver: &mut SimDriver, broker: &Broker) {
        for (call, answer) in driver.poll_answers() {
            let Some(kind) = self.calls.remove(&call) else {
                panic!("an answer to call {call}, which nobody made");
            };
            self.answer(driver, broker, kind, answer);
        }
    }

    fn answer(&mut self, driver: &SimDriver, broker: &Broker, kind: CallKind, answer: Answer) {
        match (kind, answer) {
            (CallKind::Open, Answer::Opened(Ok(handle))) => {
                self.reached.channels_opened += 1;
                let id = driver.channel_id(handle);
                let taken = self
                    .channels
                    .keys()
                    .any(|h| driver.channel_id(*h) == id && driver.channel_error(*h).is_none());
                assert!(
                    !taken,
                    "channel id {id} handed out while a handle still has it open"
                );
                self.channels.insert(handle, AppChannel::default());
            }
            (
                CallKind::Rpc {
                    handle,
                    request,
                    restore,
                    get_no_ack,
                },
                Answer::Reply(reply),
            ) => {
                let Ok(reply) = reply else {
                    return;
                };
                self.reached.replies += 1;
                assert!(
                    request.is_answered_by(reply.method.info().id),
                    "{} answered by {}",
                    request.name,
                    reply.method.info().name
                );
                let Some(channel) = self.channels.get_mut(&handle) else {
                    return;
                };
                match &reply.method {
                    Method::ConfirmSelectOk(_) => channel.confirm = true,
                    Method::TxSelectOk(_) => channel.tx = true,
                    Method::TxCommitOk(_) => channel.uncommitted.clear(),
                    Method::TxRollbackOk(_) => self.held.extend(restore),
                    Method::BasicGetOk(get_ok) => {
                        self.reached.gets += 1;
                        let (message, body) = reply.content.clone().expect("a get-ok's content");
                        let message = message.unwrap_or_default();
                        assert!(
                            body_is_intact(&message, &body),
                            "the body of {message} arrived altered"
                        );
                        if !get_no_ack {
                            self.held.push(Held {
                                handle,
                                tag: get_ok.delivery_tag,
                                epoch: reply.epoch,
                            });
                        }
                    }
                    _ => {}
                }
            }
            (CallKind::Consume(consumer), Answer::Reply(reply)) => match reply {
                Ok(_) => {
                    if let Some(c) = self.consumers.get_mut(&consumer) {
                        c.started = true;
                    }
                }
                Err(_) => {
                    self.consumers.remove(&consumer);
                }
            },
            (CallKind::Confirm { message }, Answer::Confirm(outcome)) => {
                let fate = broker.store.ledger.get(&message);
                match outcome {
                    Ok(Confirmation::Ack) => {
                        self.reached.acked_confirms += 1;
                        let fate = fate.unwrap_or_else(|| {
                            panic!("{message} acked though the broker never saw it")
                        });
                        assert!(
                            fate.acked && !fate.returned,
                            "{message} acked; the broker {fate:?}"
                        );
                    }
                    Ok(Confirmation::Nack) => {
                        self.reached.nacked_confirms += 1;
                        assert!(
                            fate.is_some_and(|f| f.nacked),
                            "{message} nacked; the broker {fate:?}"
                        );
                    }
                    Ok(Confirmation::Returned(returned)) => {
                        self.reached.returned_confirms += 1;
                        assert!(
                            fate.is_some_and(|f| f.returned && f.acked),
                            "{message} returned; the broker {fate:?}"
                        );
                        let id = returned
                            .properties
                            .get()
                            .message_id
                            .as_ref()
                            .map(ShortString::to_string);
                        assert_eq!(
                            id.as_deref(),
                            Some(message.as_str()),
                            "{message}'s outcome carries another message's return"
                        );
                    }
                    Ok(Confirmation::NotRequested) => {
                        panic!("{message} published in confirm mode got NotRequested")
                    }
                    Err(_) => self.reached.unknown_confirms += 1,
                }
            }
            (CallKind::WaitConfirms, Answer::Confirms(outcome)) => {
                self.reached.replies += u64::from(outcome.is_ok());
            }
            (CallKind::Close, Answer::Done(outcome)) => {
                self.reached.replies += u64::from(outcome.is_ok());
            }
            (CallKind::Close, Answer::Reply(_)) | (CallKind::Open, Answer::Opened(_)) => {}
            (_, answer) => panic!("an answer of the wrong kind: {answer:?}"),
        }
    }

    /// The settling phase: everything held is acked, transactions committed.
    pub(crate) fn settle_all(&mut self, driver: &mut SimDriver, broker: &Broker, rng: &mut Rng) {
        self.receive(driver, broker, rng, usize::MAX);
        for held in std::mem::take(&mut self.held) {
            let ack = Settlement::Ack(basic::Ack {
                delivery_tag: held.tag,
                multiple: false,
            });
            self.settle(driver, held, ack);
        }
        let pending: Vec<Handle> = self
            .channels
            .iter()
            .filter(|(h, c)| {
                c.tx && (!c.uncommitted.is_empty()
                    || broker.has_uncommitted_settlements(driver.channel_id(**h)))
            })
            .map(|(h, _)| *h)
            .collect();
        for handle in pending {
            if driver.channel_error(handle).is_none() {
                self.channels
                    .get_mut(&handle)
                    .expect("a channel")
                    .uncommitted
                    .clear();
                self.rpc(driver, handle, Method::TxCommit(tx::Commit {}));
            }
        }
    }

    /// Whether the application still holds something to settle.
    pub(crate) fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// Consumers the application still reads: (channel id, tag).
    pub(crate) fn live_consumers(&self, driver: &SimDriver) -> Vec<(u16, ShortString)> {
        self.consumers
            .iter()
            .filter(|(id, c)| {
                c.started
                    && driver.consumer_end(**id).is_none()
                    && driver.channel_error(c.handle).is_none()
            })
            .filter_map(|(id, c)| Some((driver.channel_id(c.handle), driver.consumer_tag(*id)?)))
            .collect()
    }
}

/// Body bytes of one frame at the driver's frame_max.
fn driver_frame_body(driver: &SimDriver) -> usize {
    driver.frame_max() as usize - crate::protocol::frame::FRAME_OVERHEAD
}
