//! Messages on their way: publishes routed and confirmed, consumers fed
//! within their prefetch, settlements checked against the tags a channel
//! holds, and what a channel's end gives back.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::channels::Settle;
use super::store::Message;
use super::*;

impl Broker {
    /// An ack, nack or reject from the client: every tag it names must be
    /// one the channel holds.
    pub(super) fn settle(
        &mut self,
        id: u16,
        request: &Method,
        tag: u64,
        multiple: bool,
        how: Settle,
    ) {
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

    pub(super) fn finish_settlement(&mut self, unacked: Unacked, how: Settle) {
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
    pub(super) fn remove_consumer(&mut self, id: u16, tag: &ShortString) {
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

    pub(super) fn has_room(&self, id: u16, tag: &ShortString) -> bool {
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

    pub(super) fn deliver(
        &mut self,
        id: u16,
        tag: &ShortString,
        queue: &ShortString,
        message: Message,
    ) {
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
