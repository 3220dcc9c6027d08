//! The broker's durable side: exchanges, queues with their messages,
//! bindings and routing, and a ledger of every message's fate, which
//! outlives connections as a RabbitMQ node's state does.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;

use crate::protocol::{BasicProperties, FieldTable, FieldValue, ShortString};

/// Exchange types, enough of each to route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl Kind {
    pub(crate) fn parse(name: &[u8]) -> Option<Self> {
        match name {
            b"direct" => Some(Self::Direct),
            b"fanout" => Some(Self::Fanout),
            b"topic" => Some(Self::Topic),
            b"headers" => Some(Self::Headers),
            _ => None,
        }
    }
}

pub(crate) struct Exchange {
    pub kind: Kind,
    pub durable: bool,
    pub auto_delete: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Dest {
    Queue(ShortString),
    Exchange(ShortString),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Binding {
    pub source: ShortString,
    pub dest: Dest,
    pub key: ShortString,
    pub arguments: FieldTable,
}

/// A message as a queue holds it.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub id: String,
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: BasicProperties,
    pub body: Bytes,
    pub redelivered: bool,
}

pub(crate) struct Queue {
    pub durable: bool,
    /// The connection generation that owns an exclusive queue.
    pub exclusive: Option<u64>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    /// `x-max-length` with `x-overflow: reject-publish`: publishes beyond
    /// it are nacked.
    pub max_length: Option<usize>,
    pub ready: VecDeque<Message>,
    /// Whether it ever had a consumer (an auto-delete queue goes with its last).
    pub had_consumers: bool,
    /// Round-robin position among its consumers.
    pub turn: usize,
}

/// What became of one message (by id), for the confirm invariant.
#[derive(Debug, Default, Clone)]
pub(crate) struct Fate {
    /// Copies put in queues.
    pub routed: u32,
    /// Copies acked, or delivered without ack.
    pub consumed: u32,
    /// Copies purged, deleted with their queue, or rejected without requeue.
    pub dropped: u32,
    pub returned: bool,
    pub nacked: bool,
    pub acked: bool,
}

/// The node's entities and messages.
#[derive(Default)]
pub(crate) struct Store {
    pub exchanges: BTreeMap<ShortString, Exchange>,
    pub bindings: Vec<Binding>,
    pub queues: BTreeMap<ShortString, Queue>,
    pub ledger: HashMap<String, Fate>,
    server_named: u64,
}

fn short(text: &str) -> ShortString {
    ShortString::new(text).expect("a short string")
}

/// Topic matching: `*` is one word, `#` any number of words.
fn topic_matches(pattern: &[&[u8]], key: &[&[u8]]) -> bool {
    match (pattern.split_first(), key.split_first()) {
        (None, None) => true,
        (Some((&b"#", rest)), _) => {
            topic_matches(rest, key) || (!key.is_empty() && topic_matches(pattern, &key[1..]))
        }
        (Some((&b"*", rest)), Some((_, key_rest))) => topic_matches(rest, key_rest),
        (Some((word, rest)), Some((first, key_rest))) => {
            word == first && topic_matches(rest, key_rest)
        }
        _ => false,
    }
}

/// Headers matching: `x-match` all (default) or any over the other arguments.
fn headers_match(arguments: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let any = arguments.get("x-match").and_then(FieldValue::as_str) == Some("any");
    let mut wanted = arguments
        .iter()
        .filter(|(k, _)| !k.as_bytes().starts_with(b"x-"));
    let has = |(key, value): (&ShortString, &FieldValue)| {
        headers.and_then(|h| h.get(key)).is_some_and(|v| v == value)
    };
    if any {
        wanted.any(has)
    } else {
        wanted.all(has)
    }
}

impl Store {
    pub(crate) fn new() -> Self {
        let mut store = Self::default();
        for (name, kind) in [
            ("", Kind::Direct),
            ("amq.direct", Kind::Direct),
            ("amq.fanout", Kind::Fanout),
            ("amq.topic", Kind::Topic),
            ("amq.headers", Kind::Headers),
        ] {
            store.exchanges.insert(
                short(name),
                Exchange {
                    kind,
                    durable: true,
                    auto_delete: false,
                },
            );
        }
        store
    }

    /// A node that already has the application's usual topology (as one
    /// that served it before), so that runs get to deliveries early.
    pub(crate) fn preload(&mut self) {
        for (name, kind) in [
            ("x.direct", Kind::Direct),
            ("x.fanout", Kind::Fanout),
            ("x.topic", Kind::Topic),
            ("x.headers", Kind::Headers),
        ] {
            let exchange = Exchange {
                kind,
                durable: false,
                auto_delete: false,
            };
            self.exchanges.insert(short(name), exchange);
        }
        for (name, durable, auto_delete, max_length) in [
            ("q1", true, false, None),
            ("q2", false, true, None),
            ("q.full", false, false, Some(2)),
        ] {
            let mut arguments = FieldTable::new();
            if let Some(max) = max_length {
                arguments.insert(short("x-max-length"), max as i64);
                arguments.insert(short("x-overflow"), "reject-publish");
            }
            let queue = Queue {
                durable,
                exclusive: None,
                auto_delete,
                arguments,
                max_length,
                ready: VecDeque::new(),
                had_consumers: false,
                turn: 0,
            };
            self.queues.insert(short(name), queue);
        }
        for (source, queue, key) in [
            ("x.direct", "q1", "a"),
            ("x.fanout", "q2", ""),
            ("x.topic", "q1", "a.*"),
            ("x.topic", "q.full", "#"),
        ] {
            self.bindings.push(Binding {
                source: short(source),
                dest: Dest::Queue(short(queue)),
                key: short(key),
                arguments: FieldTable::new(),
            });
        }
    }

    pub(crate) fn server_name(&mut self) -> ShortString {
        self.server_named += 1;
        short(&format!("amq.gen-{}", self.server_named))
    }

    /// The queues a message published to `exchange` with `key` reaches.
    pub(crate) fn route(
        &self,
        exchange: &ShortString,
        key: &ShortString,
        headers: Option<&FieldTable>,
    ) -> BTreeSet<ShortString> {
        let mut queues = BTreeSet::new();
        if exchange.is_empty() {
            if self.queues.contains_key(key) {
                queues.insert(key.clone());
            }
            return queues;
        }
        let mut seen = BTreeSet::new();
        let mut todo = vec![exchange.clone()];
        while let Some(source) = todo.pop() {
            if !seen.insert(source.clone()) {
                continue;
            }
            let Some(kind) = self.exchanges.get(&source).map(|x| x.kind) else {
                continue;
            };
            let words: Vec<&[u8]> = key.as_bytes().split(|b| *b == b'.').collect();
            for binding in self.bindings.iter().filter(|b| b.source == source) {
                let matched = match kind {
                    Kind::Direct => binding.key == *key,
                    Kind::Fanout => true,
                    Kind::Topic => {
                        let pattern: Vec<&[u8]> =
                            binding.key.as_bytes().split(|b| *b == b'.').collect();
                        topic_matches(&pattern, &words)
                    }
                    Kind::Headers => headers_match(&binding.arguments, headers),
                };
                if matched {
                    match &binding.dest {
                        Dest::Queue(queue) => {
                            queues.insert(queue.clone());
                        }
                        Dest::Exchange(next) => todo.push(next.clone()),
                    }
                }
            }
        }
        queues
    }

    /// Puts a copy of `message` in `queue`; false when the queue is full
    /// and rejects publishes.
    pub(crate) fn enqueue(&mut self, queue: &ShortString, message: Message) -> bool {
        let Some(q) = self.queues.get_mut(queue) else {
            return false;
        };
        if q.max_length.is_some_and(|max| q.ready.len() >= max) {
            return false;
        }
        self.ledger.entry(message.id.clone()).or_default().routed += 1;
        q.ready.push_back(message);
        true
    }

    /// A delivered message goes back to its queue (at the front, marked
    /// redelivered), or is dropped when the queue is gone.
    pub(crate) fn requeue(&mut self, queue: &ShortString, mut message: Message) {
        match self.queues.get_mut(queue) {
            Some(q) => {
                message.redelivered = true;
                q.ready.push_front(message);
            }
            None => self.dropped(&message.id, 1),
        }
    }

    pub(crate) fn consumed(&mut self, id: &str) {
        self.ledger.entry(id.to_owned()).or_default().consumed += 1;
    }

    pub(crate) fn dropped(&mut self, id: &str, copies: u32) {
        self.ledger.entry(id.to_owned()).or_default().dropped += copies;
    }

    /// Deletes a queue with its bindings (and auto-delete exchanges left
    /// without bindings); its ready messages are dropped.
    pub(crate) fn delete_queue(&mut self, name: &ShortString) -> u32 {
        let Some(queue) = self.queues.remove(name) else {
            return 0;
        };
        let count = queue.ready.len() as u32;
        for message in queue.ready {
            self.dropped(&message.id, 1);
        }
        let dest = Dest::Queue(name.clone());
        self.remove_bindings(|b| b.dest == dest);
        count
    }

    /// Removes the bindings `gone` selects; auto-delete exchanges that lose
    /// their last binding as a source go too.
    pub(crate) fn remove_bindings(&mut self, gone: impl Fn(&Binding) -> bool) {
        let mut sources = BTreeSet::new();
        self.bindings.retain(|b| {
            let remove = gone(b);
            if remove {
                sources.insert(b.source.clone());
            }
            !remove
        });
        for source in sources {
            let auto = self.exchanges.get(&source).is_some_and(|x| x.auto_delete);
            if auto && !self.bindings.iter().any(|b| b.source == source) {
                self.delete_exchange(&source);
            }
        }
    }

    pub(crate) fn delete_exchange(&mut self, name: &ShortString) {
        if self.exchanges.remove(name).is_some() {
            let dest = Dest::Exchange(name.clone());
            self.remove_bindings(|b| b.source == *name || b.dest == dest);
        }
    }

    /// Copies of each message that are still ready in a queue.
    pub(crate) fn ready_copies(&self) -> HashMap<&str, u32> {
        let mut copies = HashMap::new();
        for queue in self.queues.values() {
            for message in &queue.ready {
                *copies.entry(message.id.as_str()).or_insert(0) += 1;
            }
        }
        copies
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_match_as_rabbitmq_does() {
        let m = |p: &str, k: &str| {
            let p: Vec<&[u8]> = p.as_bytes().split(|b| *b == b'.').collect();
            let k: Vec<&[u8]> = k.as_bytes().split(|b| *b == b'.').collect();
            topic_matches(&p, &k)
        };
        assert!(m("a.*", "a.b"));
        assert!(!m("a.*", "a.b.c"));
        assert!(m("a.#", "a"));
        assert!(m("a.#", "a.b.c"));
        assert!(m("#", "x.y"));
        assert!(m("#.c", "a.b.c"));
        assert!(!m("a.b", "a.c"));
    }

    #[test]
    fn headers_match_all_or_any() {
        let args = FieldTable::new()
            .with(short("a"), "1")
            .with(short("b"), "2");
        let headers = FieldTable::new().with(short("a"), "1");
        assert!(!headers_match(&args, Some(&headers)));
        let any = args.clone().with(short("x-match"), "any");
        assert!(headers_match(&any, Some(&headers)));
        assert!(!headers_match(&any, None));
    }
}
