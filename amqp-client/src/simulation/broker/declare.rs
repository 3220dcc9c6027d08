//! Declarations as RabbitMQ answers them: exchanges, queues and bindings
//! with their 403/404/405/406 refusals, consumers and gets.

use super::store::{Binding, Dest, Kind, Queue};
use super::*;
use crate::protocol::methods::{exchange, queue};
use crate::protocol::FieldValue;

impl Broker {
    pub(super) fn exchange_method(&mut self, id: u16, method: Method) {
        let reserved = |name: &ShortString| name.is_empty() || name.as_bytes().starts_with(b"amq.");
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
                let kind = Kind::parse(d.kind.as_bytes())
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
    pub(super) fn bind(&mut self, id: u16, binding: Binding, add: bool, request: &Method) -> bool {
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
    pub(super) fn accessible(&self, name: &ShortString) -> bool {
        let generation = self.conn.as_ref().map_or(0, |c| c.generation);
        self.store
            .queues
            .get(name)
            .is_some_and(|q| q.exclusive.is_none_or(|owner| owner == generation))
    }

    /// 404 for a missing queue, 405 for another connection's exclusive one.
    pub(super) fn check_queue(&mut self, id: u16, name: &ShortString, request: &Method) -> bool {
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

    pub(super) fn queue_consumers(&self, name: &ShortString) -> Vec<(u16, ShortString)> {
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

    pub(super) fn declare_queue(&mut self, id: u16, d: &queue::Declare, request: &Method) {
        let generation = self.conn().generation;
        if !d.passive && d.queue.as_bytes().starts_with(b"amq.") {
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

    pub(super) fn consume(&mut self, id: u16, c: &basic::Consume, request: &Method) {
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

    pub(super) fn get(&mut self, id: u16, g: &basic::Get, request: &Method) {
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
}
