//! Channel methods as RabbitMQ answers them, dispatched from here:
//! the open and close handshakes, one synchronous request in flight,
//! publishes assembled from contiguous frames, qos, recover, transactions
//! and confirm mode (declarations in `declare.rs`, messages in
//! `delivery.rs`).

use super::store::{Binding, Dest, Message};
use super::*;
use crate::fuzzing::support::expects_reply;
use crate::protocol::methods::{confirm, queue, tx};

/// What a settlement does with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    Ack,
    Requeue,
    Drop,
}

impl Broker {
    pub(super) fn channel(&mut self, id: u16) -> &mut BrokerChannel {
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

    pub(super) fn reply(&mut self, id: u16, no_wait: bool, method: Method) {
        if !no_wait {
            self.send_method(id, &method, true);
        }
    }

    pub(super) fn queue_or_basic_method(&mut self, id: u16, method: Method) {
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

    pub(super) fn complete_publish(&mut self, id: u16) {
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
}
