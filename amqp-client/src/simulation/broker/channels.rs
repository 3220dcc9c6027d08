//! Channel methods as RabbitMQ answers them: declarations with their
//! 403/404/405/406 refusals, publishes routed and confirmed, consumers fed
//! within their prefetch, settlements checked against the tags the channel
//! holds, transactions, and what a channel's end gives back.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::store::{Binding, Dest, Kind, Message, Queue};
use super::*;
use crate::fuzzing::support::expects_reply;
use crate::protocol::methods::{confirm, exchange, queue, tx};
use crate::protocol::FieldValue;

/// What a settlement does with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    Ack,
    Requeue,
    Drop,
}

impl Broker {
    fn channel(&mut self, id: u16) -> &mut BrokerChannel {
        self.conn().channels.get_mut(&id).expect("an open channel")
    }

    /// The broker closes channel `id` for an error in `request`.
    pub(super) fn channel_error(&mut self, id: u16, code: ReplyCode, text: &str, request: &Method) {
        self.reached.channel_errors += 1;
        self.emit_confirms(id, false);
        self.send_method(id, &channel_close(code, text, request), false);
        self.release_channel(id);
        self.channel(id).closing = true;
    }

    pub(super) fn channel_method(&mut self, id: u16, method: Method) {
        let name = method.info().name;
        if let Method::ChannelOpen(_) = method {
            if id > self.channel_max {
                violation(format!(
                    "channel.open of channel {id} over channel_max {}",
                    self.channel_max
                ));
            }
            if self
                .conn()
                .channels
                .insert(id, BrokerChannel::default())
                .is_some()
            {
                violation(format!("channel.open on channel {id}, which is open"));
            }
            self.channel(id).reply_end = Some(u64::MAX);
            self.send_method(id, &Method::ChannelOpenOk(channel::OpenOk {}), true);
            return;
        }
        let conn = self.conn();
        let delivered = conn.out_total - conn.out.len() as u64;
        let Some(ch) = conn.channels.get_mut(&id) else {
            violation(format!("{name} on channel {id}, which is not open"));
        };
        if ch.closing {
            match method {
                Method::ChannelCloseOk(_) => {
                    conn.channels.remove(&id);
                }
                // Both sides closed at once: RabbitMQ answers the client's close too.
                Method::ChannelClose(_) => {
                    self.send_method(id, &Method::ChannelCloseOk(channel::CloseOk {}), false)
                }
                _ => {}
            }
            return;
        }
        if ch.incoming.is_some() {
            violation(format!(
                "{name} on channel {id} between the frames of a message"
            ));
        }
        if expects_reply(&method) && !matches!(method, Method::ChannelClose(_)) {
            if let Some(end) = ch.reply_end {
                if delivered < end {
                    violation(format!(
                        "{name} on channel {id} while the previous synchronous request is in flight"
                    ));
                }
            }
            ch.reply_end = Some(u64::MAX);
        }
        match method {
            Method::ChannelClose(_) => {
                self.emit_confirms(id, false);
                self.release_channel(id);
                self.conn().channels.remove(&id);
                self.send_method(id, &Method::ChannelCloseOk(channel::CloseOk {}), false);
            }
            Method::ChannelFlow(flow) => self.send_method(
                id,
                &Method::ChannelFlowOk(channel::FlowOk {
                    active: flow.active,
                }),
                true,
            ),
            Method::BasicPublish(publish) => {
                if publish.immediate {
                    violation("basic.publish with immediate, which RabbitMQ refuses".to_owned());
                }
                ch.incoming = Some(Incoming {
                    publish,
                    header: None,
                    body: BytesMut::new(),
                });
            }
            Method::BasicAck(ack) => {
                let request = Method::BasicAck(ack.clone());
                self.settle(id, &request, ack.delivery_tag, ack.multiple, Settle::Ack);
            }
            Method::BasicNack(nack) => {
                let how = if nack.requeue {
                    Settle::Requeue
                } else {
                    Settle::Drop
                };
                let request = Method::BasicNack(nack.clone());
                self.settle(id, &request, nack.delivery_tag, nack.multiple, how);
            }
            Method::BasicReject(reject) => {
                let how = if reject.requeue {
                    Settle::Requeue
                } else {
                    Settle::Drop
                };
                let request = Method::BasicReject(reject.clone());
                self.settle(id, &request, reject.delivery_tag, false, how);
            }
            Method::ExchangeDeclare(_)
            | Method::ExchangeDelete(_)
            | Method::ExchangeBind(_)
            | Method::ExchangeUnbind(_) => self.exchange_method(id, method),
            other => self.queue_or_basic_method(id, other),
        }
    }

    fn reply(&mut self, id: u16, no_wait: bool, method: Method) {
        if !no_wait {
            self.send_method(id, &method, true);
        }
    }

    fn exchange_method(&mut self, id: u16, method: Method) {
        let reserved = |name: &ShortString| name.is_empty() || name.starts_with("amq.");
        match &method {
            Method::ExchangeDeclare(d) => {
                if !d.passive && reserved(&d.exchange) {
                    return self.channel_error(
                        id,
                        ReplyCode::ACCESS_REFUSED,
                        "ACCESS_REFUSED",
                        &method,
                    );
                }
                let kind = Kind::parse(&d.kind)
                    .unwrap_or_else(|| violation(format!("exchange type {}", d.kind)));
                match self.store.exchanges.get(&d.exchange) {
                    Some(x)
                        if !d.passive
                            && (x.kind != kind
                                || x.durable != d.durable
                                || x.auto_delete != d.auto_delete) =>
                    {
                        return self.channel_error(
                            id,
                            ReplyCode::PRECONDITION_FAILED,
                            "PRECONDITION_FAILED - inequivalent arg",
                            &method,
                        );
                    }
                    Some(_) => {}
                    None if d.passive => {
                        return self.channel_error(
                            id,
                            ReplyCode::NOT_FOUND,
                            "NOT_FOUND - no exchange",
                            &method,
                        )
                    }
                    None => {
                        let exchange = store::Exchange {
                            kind,
                            durable: d.durable,
                            auto_delete: d.auto_delete,
                        };
                        self.store.exchanges.insert(d.exchange.clone(), exchange);
                    }
                }
                self.reply(
                    id,
                    d.no_wait,
                    Method::ExchangeDeclareOk(exchange::DeclareOk {}),
                );
            }
            Method::ExchangeDelete(d) => {
                if reserved(&d.exchange) {
                    return self.channel_error(
                        id,
                        ReplyCode::ACCESS_REFUSED,
                        "ACCESS_REFUSED",
                        &method,
                    );
                }
                if d.if_unused && self.store.bindings.iter().any(|b| b.source == d.exchange) {
                    return self.channel_error(
                        id,
                        ReplyCode::PRECONDITION_FAILED,
                        "PRECONDITION_FAILED - in use",
                        &method,
                    );
                }
                self.store.delete_exchange(&d.exchange);
                self.reply(
                    id,
                    d.no_wait,
                    Method::ExchangeDeleteOk(exchange::DeleteOk {}),
                );
            }
            Method::ExchangeBind(b) => {
                let binding = Binding {
                    source: b.source.clone(),
                    dest: Dest::Exchange(b.destination.clone()),
                    key: b.routing_key.clone(),
                    arguments: b.arguments.clone(),
                };
                if self.bind(id, binding, true, &method) {
                    self.reply(id, b.no_wait, Method::ExchangeBindOk(exchange::BindOk {}));
                }
            }
            Method::ExchangeUnbind(u) => {
                let binding = Binding {
                    source: u.source.clone(),
                    dest: Dest::Exchange(u.destination.clone()),
                    key: u.routing_key.clone(),
                    arguments: u.arguments.clone(),
                };
                if self.bind(id, binding, false, &method) {
                    self.reply(
                        id,
                        u.no_wait,
                        Method::ExchangeUnbindOk(exchange::UnbindOk {}),
                    );
                }
            }
            _ => unreachable!("an exchange method"),
        }
    }

    /// Adds (or removes) a binding; false when the channel was closed for it.
    fn bind(&mut self, id: u16, binding: Binding, add: bool, request: &Method) -> bool {
        let dest_exists = match &binding.dest {
            Dest::Queue(q) => self.store.queues.contains_key(q),
            Dest::Exchange(x) => self.store.exchanges.contains_key(x),
        };
        if !dest_exists || !self.store.exchanges.contains_key(&binding.source) {
            self.channel_error(
                id,
                ReplyCode::NOT_FOUND,
                "NOT_FOUND - no such exchange or queue",
                request,
            );
            return false;
        }
        if let Dest::Queue(q) = &binding.dest {
            if !self.accessible(q) {
                self.channel_error(
                    id,
                    ReplyCode::RESOURCE_LOCKED,
                    "RESOURCE_LOCKED - exclusive queue",
                    request,
                );
                return false;
            }
        }
        if binding.source.is_empty() {
            self.channel_error(
                id,
                ReplyCode::ACCESS_REFUSED,
                "ACCESS_REFUSED - default exchange",
                request,
            );
            return false;
        }
        if add {
            if !self.store.bindings.contains(&binding) {
                self.store.bindings.push(binding);
            }
        } else {
            self.store.remove_bindings(|b| *b == binding);
        }
        true
    }

    /// Whether this connection may use queue `name` (not another's exclusive queue).
    fn accessible(&self, name: &ShortString) -> bool {
        let generation = self.conn.as_ref().map_or(0, |c| c.generation);
        self.store
            .queues
            .get(name)
            .is_some_and(|q| q.exclusive.is_none_or(|owner| owner == generation))
    }

    /// 404 for a missing queue, 405 for another connection's exclusive one.
    fn check_queue(&mut self, id: u16, name: &ShortString, request: &Method) -> bool {
        if !self.store.queues.contains_key(name) {
            self.channel_error(id, ReplyCode::NOT_FOUND, "NOT_FOUND - no queue", request);
            return false;
        }
        if !self.accessible(name) {
            self.channel_error(
                id,
                ReplyCode::RESOURCE_LOCKED,
                "RESOURCE_LOCKED - exclusive queue",
                request,
            );
            return false;
        }
        true
    }

    fn queue_consumers(&self, name: &ShortString) -> Vec<(u16, ShortString)> {
        let mut found = Vec::new();
        if let Some(conn) = &self.conn {
            for (id, channel) in conn.channels.iter().filter(|(_, c)| !c.closing) {
                for (tag, consumer) in &channel.consumers {
                    if consumer.queue == *name {
                        found.push((*id, tag.clone()));
                    }
                }
            }
        }
        found
    }

    fn queue_or_basic_method(&mut self, id: u16, method: Method) {
        match &method {
            Method::QueueDeclare(d) => self.declare_queue(id, d, &method),
            Method::QueueBind(b) => {
                let binding = Binding {
                    source: b.exchange.clone(),
                    dest: Dest::Queue(b.queue.clone()),
                    key: b.routing_key.clone(),
                    arguments: b.arguments.clone(),
                };
                if self.bind(id, binding, true, &method) {
                    self.reply(id, b.no_wait, Method::QueueBindOk(queue::BindOk {}));
                }
            }
            Method::QueueUnbind(u) => {
                let binding = Binding {
                    source: u.exchange.clone(),
                    dest: Dest::Queue(u.queue.clone()),
                    key: u.routing_key.clone(),
                    arguments: u.arguments.clone(),
                };
                if self.bind(id, binding, false, &method) {
                    self.reply(id, false, Method::QueueUnbindOk(queue::UnbindOk {}));
                }
            }
            Method::QueuePurge(p) => {
                if !self.check_queue(id, &p.queue, &method) {
                    return;
                }
                let ready = std::mem::take(
                    &mut self.store.queues.get_mut(&p.queue).expect("checked").ready,
                );
                let count = ready.len() as u32;
                for message in ready {
                    self.store.dropped(&message.id, 1);
                }
                self.reply(
                    id,
                    p.no_wait,
                    Method::QueuePurgeOk(queue::PurgeOk {
                        message_count: count,
                    }),
                );
            }
            Method::QueueDelete(d) => {
                if !self.store.queues.contains_key(&d.queue) {
                    return self.reply(
                        id,
                        d.no_wait,
                        Method::QueueDeleteOk(queue::DeleteOk { message_count: 0 }),
                    );
                }
                if !self.check_queue(id, &d.queue, &method) {
                    return;
                }
                let consumers = self.queue_consumers(&d.queue).len();
                let ready = self.store.queues[&d.queue].ready.len();
                if (d.if_unused && consumers > 0) || (d.if_empty && ready > 0) {
                    return self.channel_error(
                        id,
                        ReplyCode::PRECONDITION_FAILED,
                        "PRECONDITION_FAILED - in use or not empty",
                        &method,
                    );
                }
                let count = self.delete_queue(&d.queue);
                self.reply(
                    id,
                    d.no_wait,
                    Method::QueueDeleteOk(queue::DeleteOk {
                        message_count: count,
                    }),
                );
            }
            Method::BasicQos(q) => {
                let ch = self.channel(id);
                if q.global {
                    ch.channel_prefetch = q.prefetch_count;
                } else {
                    ch.consumer_prefetch = q.prefetch_count;
                }
                self.reply(id, false, Method::BasicQosOk(basic::QosOk {}));
                self.dispatch();
            }
            Method::BasicConsume(c) => self.consume(id, c, &method),
            Method::BasicCancel(c) => {
                if self.channel(id).consumers.contains_key(&c.consumer_tag) {
                    self.remove_consumer(id, &c.consumer_tag);
                }
                self.reply(
                    id,
                    c.no_wait,
                    Method::BasicCancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag.clone(),
                    }),
                );
            }
            Method::BasicGet(g) => self.get(id, g, &method),
            Method::BasicRecover(basic::Recover { requeue })
            | Method::BasicRecoverAsync(basic::RecoverAsync { requeue }) => {
                if !requeue {
                    violation(
                        "basic.recover without requeue, which RabbitMQ does not implement"
                            .to_owned(),
                    );
                }
                let ch = self.channel(id);
                let unacked = std::mem::take(&mut ch.unacked);
                ch.dead_tags.extend(unacked.keys().copied());
                for consumer in ch.consumers.values_mut() {
                    consumer.unacked = 0;
                }
                for (_, u) in unacked.into_iter().rev() {
                    self.store.requeue(&u.queue, u.message);
                }
                if matches!(method, Method::BasicRecover(_)) {
                    self.reply(id, false, Method::BasicRecoverOk(basic::RecoverOk {}));
                }
                self.dispatch();
            }
            Method::TxSelect(_) => {
                let ch = self.channel(id);
                if ch.confirm_seq.is_some() {
                    return self.channel_error(
                        id,
                        ReplyCode::PRECONDITION_FAILED,
                        "PRECONDITION_FAILED - confirm mode",
                        &method,
                    );
                }
                ch.tx.get_or_insert_with(Tx::default);
                self.reply(id, false, Method::TxSelectOk(tx::SelectOk {}));
            }
            Method::TxCommit(_) | Method::TxRollback(_) => {
                let Some(tx) = self.channel(id).tx.replace(Tx::default()) else {
                    return self.channel_error(
                        id,
                        ReplyCode::PRECONDITION_FAILED,
                        "PRECONDITION_FAILED - not transactional",
                        &method,
                    );
                };
                if matches!(method, Method::TxCommit(_)) {
                    self.reached.commits += 1;
                    for (publish, message) in tx.publishes {
                        self.route_publish(id, &publish, message);
                    }
                    for (_, unacked, how) in tx.settled {
                        self.finish_settlement(unacked, how);
                    }
                    self.reply(id, false, Method::TxCommitOk(tx::CommitOk {}));
                } else {
                    let ch = self.channel(id);
                    for (tag, unacked, _) in tx.settled {
                        if let Some(consumer) = unacked
                            .consumer
                            .as_ref()
                            .and_then(|t| ch.consumers.get_mut(t))
                        {
                            consumer.unacked += 1;
                        }
                        ch.unacked.insert(tag, unacked);
                    }
                    self.reply(id, false, Method::TxRollbackOk(tx::RollbackOk {}));
                }
                self.dispatch();
            }
            Method::ConfirmSelect(s) => {
                let ch = self.channel(id);
                if ch.tx.is_some() {
                    return self.channel_error(
                        id,
                        ReplyCode::PRECONDITION_FAILED,
                        "PRECONDITION_FAILED - transactional",
                        &method,
                    );
                }
                ch.confirm_seq.get_or_insert(1);
                self.reply(id, s.no_wait, Method::ConfirmSelectOk(confirm::SelectOk {}));
            }
            other => violation(format!("{} on channel {id}", other.info().name)),
        }
    }

    fn declare_queue(&mut self, id: u16, d: &queue::Declare, request: &Method) {
        let generation = self.conn().generation;
        if !d.passive && d.queue.starts_with("amq.") {
            return self.channel_error(
                id,
                ReplyCode::ACCESS_REFUSED,
                "ACCESS_REFUSED - reserved name",
                request,
            );
        }
        let name = if d.queue.is_empty() && !d.passive {
            self.store.server_name()
        } else {
            d.queue.clone()
        };
        match self.store.queues.get(&name) {
            Some(_) if !self.accessible(&name) => {
                return self.channel_error(
                    id,
                    ReplyCode::RESOURCE_LOCKED,
                    "RESOURCE_LOCKED - exclusive queue",
                    request,
                )
            }
            Some(q)
                if !d.passive
                    && (q.durable != d.durable
                        || q.auto_delete != d.auto_delete
                        || q.exclusive.is_some() != d.exclusive
                        || q.arguments != d.arguments) =>
            {
                return self.channel_error(
                    id,
                    ReplyCode::PRECONDITION_FAILED,
                    "PRECONDITION_FAILED - inequivalent arg",
                    request,
                )
            }
            Some(_) => {}
            None if d.passive => {
                return self.channel_error(
                    id,
                    ReplyCode::NOT_FOUND,
                    "NOT_FOUND - no queue",
                    request,
                )
            }
            None => {
                let reject = d.arguments.get("x-overflow").and_then(FieldValue::as_str)
                    == Some("reject-publish");
                let max_length = d
                    .arguments
                    .get("x-max-length")
                    .and_then(FieldValue::as_i64)
                    .filter(|_| reject);
                let queue = Queue {
                    durable: d.durable,
                    exclusive: d.exclusive.then_some(generation),
                    auto_delete: d.auto_delete,
                    arguments: d.arguments.clone(),
                    max_length: max_length.map(|n| n.max(0) as usize),
                    ready: Default::default(),
                    had_consumers: false,
                    turn: 0,
                };
                self.store.queues.insert(name.clone(), queue);
            }
        }
        let message_count = self.store.queues[&name].ready.len() as u32;
        let consumer_count = self.queue_consumers(&name).len() as u32;
        self.reply(
            id,
            d.no_wait,
            Method::QueueDeclareOk(queue::DeclareOk {
                queue: name,
                message_count,
                consumer_count,
            }),
        );
    }

    fn consume(&mut self, id: u16, c: &basic::Consume, request: &Method) {
        if !self.check_queue(id, &c.queue, request) {
            return;
        }
        let tag = if c.consumer_tag.is_empty() {
            self.next_ctag += 1;
            ShortString::new(format!("amq.ctag-{}", self.next_ctag)).expect("short")
        } else {
            c.consumer_tag.clone()
        };
        if self.channel(id).consumers.contains_key(&tag) {
            violation(format!(
                "basic.consume with tag {tag}, already consuming on channel {id} (530 NOT_ALLOWED)"
            ));
        }
        let others = self.queue_consumers(&c.queue);
        let exclusive_other = others.iter().any(|(ch, t)| {
            self.conn
                .as_ref()
                .is_some_and(|conn| conn.channels[ch].consumers[t].exclusive)
        });
        if exclusive_other || (c.exclusive && !others.is_empty()) {
            return self.channel_error(
                id,
                ReplyCode::ACCESS_REFUSED,
                "ACCESS_REFUSED - exclusive consumer",
                request,
            );
        }
        let ch = self.channel(id);
        let consumer = Consumer {
            queue: c.queue.clone(),
            no_ack: c.no_ack,
            exclusive: c.exclusive,
            prefetch: ch.consumer_prefetch,
            unacked: 0,
        };
        ch.consumers.insert(tag.clone(), consumer);
        if let Some(q) = self.store.queues.get_mut(&c.queue) {
            q.had_consumers = true;
        }
        self.reply(
            id,
            c.no_wait,
            Method::BasicConsumeOk(basic::ConsumeOk { consumer_tag: tag }),
        );
        self.dispatch();
    }

    fn get(&mut self, id: u16, g: &basic::Get, request: &Method) {
        if !self.check_queue(id, &g.queue, request) {
            return;
        }
        let queue = self.store.queues.get_mut(&g.queue).expect("checked");
        let Some(message) = queue.ready.pop_front() else {
            return self.reply(id, false, Method::BasicGetEmpty(basic::GetEmpty {}));
        };
        let message_count = queue.ready.len() as u32;
        self.reached.gets += 1;
        let ch = self.channel(id);
        ch.next_tag += 1;
        let tag = ch.next_tag;
        if g.no_ack {
            self.store.consumed(&message.id);
        } else {
            let unacked = Unacked {
                queue: g.queue.clone(),
                message: message.clone(),
                consumer: None,
            };
            ch.unacked.insert(tag, unacked);
        }
        let get_ok = Method::BasicGetOk(basic::GetOk {
            delivery_tag: tag,
            redelivered: message.redelivered,
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
            message_count,
        });
        self.send_content(id, &get_ok, &message, true);
    }

    /// An ack, nack or reject from the client: every tag it names must be
    /// one the channel holds.
    fn settle(&mut self, id: u16, request: &Method, tag: u64, multiple: bool, how: Settle) {
        let ch = self.channel(id);
        if !ch.unacked.contains_key(&tag) && ch.dead_tags.contains(&tag) {
            // Recovered by the application's basic.recover: its own mistake.
            self.reached.dead_tags_settled += 1;
            return self.channel_error(
                id,
                ReplyCode::PRECONDITION_FAILED,
                "PRECONDITION_FAILED - unknown delivery tag",
                request,
            );
        }
        let tags: Vec<u64> = if multiple && tag == 0 {
            ch.unacked.keys().copied().collect()
        } else if !ch.unacked.contains_key(&tag) {
            violation(format!(
                "{} of delivery tag {tag} (multiple: {multiple}) on channel {id}, which the broker does not hold (it holds {:?})",
                request.info().name,
                ch.unacked.keys().collect::<Vec<_>>()
            ));
        } else if multiple {
            ch.unacked.range(..=tag).map(|(t, _)| *t).collect()
        } else {
            vec![tag]
        };
        for tag in tags {
            let ch = self.channel(id);
            let unacked = ch.unacked.remove(&tag).expect("held");
            if let Some(consumer) = unacked
                .consumer
                .as_ref()
                .and_then(|t| ch.consumers.get_mut(t))
            {
                consumer.unacked = consumer.unacked.saturating_sub(1);
            }
            match ch.tx.as_mut() {
                Some(tx) => tx.settled.push((tag, unacked, how)),
                None => self.finish_settlement(unacked, how),
            }
        }
        self.dispatch();
    }

    fn finish_settlement(&mut self, unacked: Unacked, how: Settle) {
        match how {
            Settle::Ack => {
                self.reached.acks += 1;
                self.store.consumed(&unacked.message.id);
            }
            Settle::Requeue => {
                self.reached.requeues += 1;
                self.store.requeue(&unacked.queue, unacked.message);
            }
            Settle::Drop => self.store.dropped(&unacked.message.id, 1),
        }
    }

    pub(super) fn content_header(&mut self, id: u16, properties: BasicProperties, size: u64) {
        let Some(ch) = self.conn().channels.get_mut(&id) else {
            violation(format!(
                "a content header on channel {id}, which is not open"
            ));
        };
        if ch.closing {
            return;
        }
        match ch.incoming.as_mut() {
            Some(incoming) if incoming.header.is_none() => {
                incoming.header = Some((properties, size))
            }
            _ => violation(format!(
                "a content header on channel {id} without a basic.publish before it"
            )),
        }
        if size == 0 {
            self.complete_publish(id);
        }
    }

    pub(super) fn content_body(&mut self, id: u16, payload: &[u8]) {
        let Some(ch) = self.conn().channels.get_mut(&id) else {
            violation(format!("a content body on channel {id}, which is not open"));
        };
        if ch.closing {
            return;
        }
        let Some(incoming) = ch.incoming.as_mut().filter(|i| i.header.is_some()) else {
            violation(format!(
                "a content body on channel {id} without a header before it"
            ));
        };
        incoming.body.extend_from_slice(payload);
        let size = incoming.header.as_ref().map_or(0, |(_, size)| *size);
        if incoming.body.len() as u64 > size {
            violation(format!(
                "a body on channel {id} longer than its header's {size} bytes"
            ));
        }
        if incoming.body.len() as u64 == size {
            self.complete_publish(id);
        }
    }

    fn complete_publish(&mut self, id: u16) {
        let Some(incoming) = self.channel(id).incoming.take() else {
            return;
        };
        let (properties, _) = incoming.header.expect("a header");
        let message = Message {
            id: properties
                .message_id
                .as_ref()
                .map_or_else(|| "anonymous".to_owned(), |m| m.to_string()),
            exchange: incoming.publish.exchange.clone(),
            routing_key: incoming.publish.routing_key.clone(),
            properties,
            body: incoming.body.freeze(),
            redelivered: false,
        };
        if !self
            .store
            .exchanges
            .contains_key(&incoming.publish.exchange)
        {
            let request = Method::BasicPublish(incoming.publish);
            return self.channel_error(
                id,
                ReplyCode::NOT_FOUND,
                "NOT_FOUND - no exchange",
                &request,
            );
        }
        match self.channel(id).tx.as_mut() {
            Some(tx) => tx.publishes.push((incoming.publish, message)),
            None => self.route_publish(id, &incoming.publish, message),
        }
    }

    /// Routes a publish into queues; in confirm mode its ack (or nack, when
    /// a full queue refused it) follows only once it is in them, after the
    /// return of an unroutable mandatory one.
    pub(super) fn route_publish(&mut self, id: u16, publish: &basic::Publish, message: Message) {
        let queues = self.store.route(
            &publish.exchange,
            &publish.routing_key,
            message.properties.headers.as_ref(),
        );
        let mut rejected = false;
        for queue in &queues {
            rejected |= !self.store.enqueue(queue, message.clone());
        }
        let returned = queues.is_empty() && publish.mandatory;
        let fate = self.store.ledger.entry(message.id.clone()).or_default();
        fate.returned |= returned;
        let ch = self.channel(id);
        let seq = ch.confirm_seq;
        if let Some(seq) = seq {
            ch.confirm_seq = Some(seq + 1);
        }
        if returned {
            // Earlier confirms first: a return is followed by its own ack,
            // with no other confirm between (the client pairs them).
            self.emit_confirms(id, false);
            self.reached.returns += 1;
            let ret = Method::BasicReturn(basic::Return {
                reply_code: ReplyCode::NO_ROUTE.code(),
                reply_text: ShortString::from_static("NO_ROUTE"),
                exchange: publish.exchange.clone(),
                routing_key: publish.routing_key.clone(),
            });
            self.send_content(id, &ret, &message, false);
        }
        if let Some(seq) = seq {
            let fate = self.store.ledger.entry(message.id.clone()).or_default();
            if rejected {
                fate.nacked = true;
            } else {
                fate.acked = true;
            }
            self.conn()
                .confirms_due
                .entry(id)
                .or_default()
                .push((seq, !rejected));
            if returned {
                // The ack of a returned message follows its return at once.
                self.emit_confirms(id, false);
            }
        }
        self.dispatch();
    }

    /// Sends the confirms channel `id` owes, as one `multiple` ack (or nack)
    /// when `coalesce` and they are all of a kind.
    pub(super) fn emit_confirms(&mut self, id: u16, coalesce: bool) {
        let Some(due) = self.conn().confirms_due.remove(&id) else {
            return;
        };
        let Some(&(last, ack)) = due.last() else {
            return;
        };
        self.reached.confirms += due.len() as u64;
        self.reached.nacks += due.iter().filter(|(_, ack)| !ack).count() as u64;
        let confirm = |seq, ack, multiple| {
            if ack {
                Method::BasicAck(basic::Ack {
                    delivery_tag: seq,
                    multiple,
                })
            } else {
                Method::BasicNack(basic::Nack {
                    delivery_tag: seq,
                    multiple,
                    requeue: false,
                })
            }
        };
        if coalesce && due.len() > 1 && due.iter().all(|(_, a)| *a == ack) {
            return self.send_method(id, &confirm(last, ack, true), false);
        }
        for (seq, ack) in due {
            self.send_method(id, &confirm(seq, ack, false), false);
        }
    }

    /// A channel ends (closed by either side, or with its connection): its
    /// unsettled messages go back to their queues, its consumers end.
    pub(super) fn release_channel(&mut self, id: u16) {
        let ch = self.channel(id);
        let unacked = std::mem::take(&mut ch.unacked);
        let tx = ch.tx.take();
        ch.incoming = None;
        let tags: Vec<ShortString> = ch.consumers.keys().cloned().collect();
        let mut back: BTreeMap<u64, Unacked> = unacked;
        if let Some(tx) = tx {
            back.extend(tx.settled.into_iter().map(|(tag, u, _)| (tag, u)));
        }
        for (_, u) in back.into_iter().rev() {
            self.store.requeue(&u.queue, u.message);
        }
        for tag in tags {
            self.remove_consumer(id, &tag);
        }
        self.conn().confirms_due.remove(&id);
    }

    /// A consumer ends; an auto-delete queue goes with its last one.
    fn remove_consumer(&mut self, id: u16, tag: &ShortString) {
        let Some(consumer) = self.channel(id).consumers.remove(tag) else {
            return;
        };
        let last = self.queue_consumers(&consumer.queue).is_empty();
        let auto = self
            .store
            .queues
            .get(&consumer.queue)
            .is_some_and(|q| q.auto_delete && q.had_consumers);
        if last && auto {
            self.store.delete_queue(&consumer.queue);
        }
    }

    /// Deletes a queue; its consumers on the connection are told with a
    /// `basic.cancel` (RabbitMQ's consumer cancel notification, no-wait).
    pub(crate) fn delete_queue(&mut self, name: &ShortString) -> u32 {
        for (channel, tag) in self.queue_consumers(name) {
            self.reached.server_cancels += 1;
            self.channel(channel).consumers.remove(&tag);
            let cancel = Method::BasicCancel(basic::Cancel {
                consumer_tag: tag,
                no_wait: true,
            });
            self.send_method(channel, &cancel, false);
        }
        self.store.delete_queue(name)
    }

    /// Feeds consumers with room in their prefetch, round-robin per queue.
    pub(super) fn dispatch(&mut self) {
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        if conn.closing || conn.dead {
            return;
        }
        loop {
            let mut progress = false;
            let names: Vec<ShortString> = self
                .store
                .queues
                .iter()
                .filter(|(_, q)| !q.ready.is_empty())
                .map(|(n, _)| n.clone())
                .collect();
            for name in names {
                let consumers = self.queue_consumers(&name);
                let turn = self.store.queues[&name].turn;
                let ready = (0..consumers.len())
                    .map(|i| &consumers[(turn + i) % consumers.len()])
                    .find(|(ch, tag)| self.has_room(*ch, tag))
                    .cloned();
                let Some((channel, tag)) = ready else {
                    continue;
                };
                let queue = self.store.queues.get_mut(&name).expect("listed");
                queue.turn = queue.turn.wrapping_add(1);
                let message = queue.ready.pop_front().expect("ready");
                self.deliver(channel, &tag, &name, message);
                progress = true;
            }
            if !progress {
                break;
            }
        }
    }

    fn has_room(&self, id: u16, tag: &ShortString) -> bool {
        let Some(ch) = self.conn.as_ref().and_then(|c| c.channels.get(&id)) else {
            return false;
        };
        let Some(consumer) = ch.consumers.get(tag) else {
            return false;
        };
        if consumer.no_ack {
            return true;
        }
        let held = ch.unacked.values().filter(|u| u.consumer.is_some()).count();
        (consumer.prefetch == 0 || consumer.unacked < u32::from(consumer.prefetch))
            && (ch.channel_prefetch == 0 || held < usize::from(ch.channel_prefetch))
    }

    fn deliver(&mut self, id: u16, tag: &ShortString, queue: &ShortString, message: Message) {
        self.reached.deliveries += 1;
        let ch = self.channel(id);
        ch.next_tag += 1;
        let delivery_tag = ch.next_tag;
        let consumer = ch.consumers.get_mut(tag).expect("a consumer");
        let no_ack = consumer.no_ack;
        if no_ack {
            self.store.consumed(&message.id);
        } else {
            consumer.unacked += 1;
            let unacked = Unacked {
                queue: queue.clone(),
                message: message.clone(),
                consumer: Some(tag.clone()),
            };
            ch.unacked.insert(delivery_tag, unacked);
        }
        self.delivered
            .insert((id, delivery_tag, message.id.clone(), tag.clone()));
        let method = deliver_method(delivery_tag, tag, &message);
        self.send_content(id, &method, &message, false);
    }

    /// Another client publishes (deliveries the application did not cause).
    pub(crate) fn external_publish(
        &mut self,
        exchange: &ShortString,
        key: &ShortString,
        id: String,
        body: Bytes,
    ) {
        let queues = self.store.route(exchange, key, None);
        let message = Message {
            id: id.clone(),
            exchange: exchange.clone(),
            routing_key: key.clone(),
            properties: BasicProperties {
                message_id: ShortString::new(&id).ok(),
                ..Default::default()
            },
            body,
            redelivered: false,
        };
        for queue in &queues {
            self.store.enqueue(queue, message.clone());
        }
        if self.conn.is_some() {
            self.dispatch();
        }
    }

    /// The broker closes channel `id` on its own (an internal error).
    pub(crate) fn fault_close_channel(&mut self, id: u16) {
        if self.conn.as_ref().is_some_and(|c| {
            !c.dead && !c.closing && c.channels.get(&id).is_some_and(|ch| !ch.closing)
        }) {
            let request = Method::ChannelClose(channel::Close::default());
            self.channel_error(
                id,
                ReplyCode::PRECONDITION_FAILED,
                "PRECONDITION_FAILED - simulated",
                &request,
            );
        }
    }
}
