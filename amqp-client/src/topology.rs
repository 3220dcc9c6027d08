//! The record of what automatic recovery re-creates: exchanges, queues and
//! bindings the application declared on the connection, kept in declaration
//! order. Deleted entities are forgotten; auto-delete ones are forgotten when
//! the broker would have deleted them. Pure data: no I/O, no time.

use crate::protocol::methods::{exchange, queue, Method};
use crate::protocol::ShortString;

/// A queue as declared, with the name the broker gave it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RecordedQueue {
    /// The declaration as sent (an empty name asks the broker to choose).
    pub declare: queue::Declare,
    /// The queue's current name.
    pub name: ShortString,
}

impl RecordedQueue {
    /// Whether the broker chose the name.
    pub fn server_named(&self) -> bool {
        self.declare.queue.is_empty()
    }
}

/// Declared topology in the order it must be re-created.
#[derive(Debug, Default)]
pub(crate) struct Topology {
    exchanges: Vec<exchange::Declare>,
    queues: Vec<RecordedQueue>,
    queue_bindings: Vec<queue::Bind>,
    exchange_bindings: Vec<exchange::Bind>,
}

fn same_queue_binding(
    a: &queue::Bind,
    queue: &ShortString,
    exchange: &ShortString,
    key: &ShortString,
    args: &crate::protocol::FieldTable,
) -> bool {
    &a.queue == queue && &a.exchange == exchange && &a.routing_key == key && &a.arguments == args
}

impl Topology {
    /// Records the effect of `request`, which the broker accepted (`reply` is
    /// its answer; `None` for a no-wait request).
    pub fn observe(&mut self, request: &Method, reply: Option<&Method>) {
        match request {
            Method::ExchangeDeclare(declare) if !declare.passive => {
                let mut declare = declare.clone();
                declare.no_wait = false;
                match self
                    .exchanges
                    .iter_mut()
                    .find(|e| e.exchange == declare.exchange)
                {
                    Some(existing) => *existing = declare,
                    None => self.exchanges.push(declare),
                }
            }
            Method::ExchangeDelete(delete) => self.forget_exchange(&delete.exchange),
            Method::QueueDeclare(declare) if !declare.passive => {
                let name = match reply {
                    Some(Method::QueueDeclareOk(ok)) => ok.queue.clone(),
                    _ => declare.queue.clone(),
                };
                if name.is_empty() {
                    return;
                }
                let mut declare = declare.clone();
                declare.no_wait = false;
                let recorded = RecordedQueue { declare, name };
                match self.queues.iter_mut().find(|q| q.name == recorded.name) {
                    Some(existing) => *existing = recorded,
                    None => self.queues.push(recorded),
                }
            }
            Method::QueueDelete(delete) => self.forget_queue(&delete.queue),
            Method::QueueBind(bind) => {
                let mut bind = bind.clone();
                bind.no_wait = false;
                if !self.queue_bindings.iter().any(|b| {
                    same_queue_binding(
                        b,
                        &bind.queue,
                        &bind.exchange,
                        &bind.routing_key,
                        &bind.arguments,
                    )
                }) {
                    self.queue_bindings.push(bind);
                }
            }
            Method::QueueUnbind(unbind) => {
                self.queue_bindings.retain(|b| {
                    !same_queue_binding(
                        b,
                        &unbind.queue,
                        &unbind.exchange,
                        &unbind.routing_key,
                        &unbind.arguments,
                    )
                });
                self.forget_unbound_auto_delete_exchange(&unbind.exchange);
            }
            Method::ExchangeBind(bind) => {
                let mut bind = bind.clone();
                bind.no_wait = false;
                if !self.exchange_bindings.contains(&bind) {
                    self.exchange_bindings.push(bind);
                }
            }
            Method::ExchangeUnbind(unbind) => {
                self.exchange_bindings.retain(|b| {
                    !(b.destination == unbind.destination
                        && b.source == unbind.source
                        && b.routing_key == unbind.routing_key
                        && b.arguments == unbind.arguments)
                });
                self.forget_unbound_auto_delete_exchange(&unbind.source);
            }
            _ => {}
        }
    }

    /// Forgets an exchange and every binding that involves it.
    pub fn forget_exchange(&mut self, name: &ShortString) {
        self.exchanges.retain(|e| &e.exchange != name);
        self.queue_bindings.retain(|b| &b.exchange != name);
        self.exchange_bindings
            .retain(|b| &b.source != name && &b.destination != name);
    }

    /// Forgets a queue and its bindings.
    pub fn forget_queue(&mut self, name: &ShortString) {
        self.queues.retain(|q| &q.name != name);
        let unbound: Vec<ShortString> = self
            .queue_bindings
            .iter()
            .filter(|b| &b.queue == name)
            .map(|b| b.exchange.clone())
            .collect();
        self.queue_bindings.retain(|b| &b.queue != name);
        for exchange in unbound {
            self.forget_unbound_auto_delete_exchange(&exchange);
        }
    }

    /// An auto-delete queue goes when its last consumer does.
    pub fn consumer_gone(&mut self, queue: &ShortString, other_consumers: bool) {
        let auto_delete = self
            .queues
            .iter()
            .any(|q| &q.name == queue && q.declare.auto_delete);
        if auto_delete && !other_consumers {
            self.forget_queue(queue);
        }
    }

    /// An auto-delete exchange goes when its last binding (as a source) does.
    fn forget_unbound_auto_delete_exchange(&mut self, name: &ShortString) {
        let auto_delete = self
            .exchanges
            .iter()
            .any(|e| &e.exchange == name && e.auto_delete);
        let still_bound = self.queue_bindings.iter().any(|b| &b.exchange == name)
            || self.exchange_bindings.iter().any(|b| &b.source == name);
        if auto_delete && !still_bound {
            self.forget_exchange(name);
        }
    }

    /// The broker gave a server-named queue a new name on recovery.
    pub fn rename_queue(&mut self, old: &ShortString, new: &ShortString) {
        for q in self.queues.iter_mut().filter(|q| &q.name == old) {
            q.name = new.clone();
        }
        for b in self.queue_bindings.iter_mut().filter(|b| &b.queue == old) {
            b.queue = new.clone();
        }
    }

    /// The recorded queue named `name`.
    #[cfg(test)]
    pub fn queue(&self, name: &ShortString) -> Option<&RecordedQueue> {
        self.queues.iter().find(|q| &q.name == name)
    }

    /// The methods that re-create everything, in order: exchanges, queues,
    /// queue bindings, exchange-to-exchange bindings. A server-named queue is
    /// declared with an empty name again; its old name is the step's key.
    pub fn plan(&self) -> Vec<(Method, Option<ShortString>)> {
        let mut steps = Vec::new();
        steps.extend(
            self.exchanges
                .iter()
                .map(|e| (Method::ExchangeDeclare(e.clone()), None)),
        );
        steps.extend(self.queues.iter().map(|q| {
            let mut declare = q.declare.clone();
            if !q.server_named() {
                declare.queue = q.name.clone();
            }
            (Method::QueueDeclare(declare), Some(q.name.clone()))
        }));
        steps.extend(
            self.queue_bindings
                .iter()
                .map(|b| (Method::QueueBind(b.clone()), None)),
        );
        steps.extend(
            self.exchange_bindings
                .iter()
                .map(|b| (Method::ExchangeBind(b.clone()), None)),
        );
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::methods::queue;

    fn s(text: &'static str) -> ShortString {
        ShortString::from_static(text)
    }

    fn plan_names(t: &Topology) -> Vec<String> {
        t.plan()
            .iter()
            .map(|(m, _)| match m {
                Method::ExchangeDeclare(e) => format!("x:{}", e.exchange),
                Method::QueueDeclare(q) => format!("q:{}", q.queue),
                Method::QueueBind(b) => format!("b:{}->{}", b.exchange, b.queue),
                Method::ExchangeBind(b) => format!("e:{}->{}", b.source, b.destination),
                other => other.info().name.to_owned(),
            })
            .collect()
    }

    #[test]
    fn records_in_recovery_order_and_forgets_deletions() {
        let mut t = Topology::default();
        t.observe(
            &Method::QueueDeclare(queue::Declare {
                queue: s("q1"),
                ..Default::default()
            }),
            None,
        );
        t.observe(
            &Method::ExchangeDeclare(exchange::Declare {
                exchange: s("x1"),
                ..Default::default()
            }),
            None,
        );
        t.observe(
            &Method::QueueBind(queue::Bind {
                queue: s("q1"),
                exchange: s("x1"),
                ..Default::default()
            }),
            None,
        );
        t.observe(
            &Method::ExchangeBind(exchange::Bind {
                destination: s("x1"),
                source: s("amq.fanout"),
                ..Default::default()
            }),
            None,
        );
        assert_eq!(
            plan_names(&t),
            ["x:x1", "q:q1", "b:x1->q1", "e:amq.fanout->x1"]
        );
        t.observe(
            &Method::ExchangeDelete(exchange::Delete {
                exchange: s("x1"),
                ..Default::default()
            }),
            None,
        );
        assert_eq!(plan_names(&t), ["q:q1"]);
        t.observe(
            &Method::QueueDelete(queue::Delete {
                queue: s("q1"),
                ..Default::default()
            }),
            None,
        );
        assert!(t.plan().is_empty());
    }

    #[test]
    fn server_named_queues_are_redeclared_nameless_and_renamed() {
        let mut t = Topology::default();
        let reply = Method::QueueDeclareOk(queue::DeclareOk {
            queue: s("amq.gen-1"),
            message_count: 0,
            consumer_count: 0,
        });
        t.observe(
            &Method::QueueDeclare(queue::Declare {
                exclusive: true,
                ..Default::default()
            }),
            Some(&reply),
        );
        t.observe(
            &Method::QueueBind(queue::Bind {
                queue: s("amq.gen-1"),
                exchange: s("amq.direct"),
                ..Default::default()
            }),
            None,
        );
        let plan = t.plan();
        assert!(
            matches!(&plan[0], (Method::QueueDeclare(d), Some(old)) if d.queue.is_empty() && old == "amq.gen-1")
        );
        t.rename_queue(&s("amq.gen-1"), &s("amq.gen-2"));
        assert_eq!(plan_names(&t), ["q:", "b:amq.direct->amq.gen-2"]);
        assert!(t.queue(&s("amq.gen-2")).is_some());
    }

    #[test]
    fn auto_delete_entities_go_with_their_last_consumer_or_binding() {
        let mut t = Topology::default();
        t.observe(
            &Method::QueueDeclare(queue::Declare {
                queue: s("ad"),
                auto_delete: true,
                ..Default::default()
            }),
            None,
        );
        t.consumer_gone(&s("ad"), true);
        assert_eq!(plan_names(&t), ["q:ad"], "another consumer remains");
        t.consumer_gone(&s("ad"), false);
        assert!(t.plan().is_empty());

        t.observe(
            &Method::ExchangeDeclare(exchange::Declare {
                exchange: s("adx"),
                auto_delete: true,
                ..Default::default()
            }),
            None,
        );
        t.observe(
            &Method::QueueDeclare(queue::Declare {
                queue: s("q"),
                ..Default::default()
            }),
            None,
        );
        t.observe(
            &Method::QueueBind(queue::Bind {
                queue: s("q"),
                exchange: s("adx"),
                ..Default::default()
            }),
            None,
        );
        t.observe(
            &Method::QueueUnbind(queue::Unbind {
                queue: s("q"),
                exchange: s("adx"),
                ..Default::default()
            }),
            None,
        );
        assert_eq!(plan_names(&t), ["q:q"]);
    }
}
