//! Typed builders of the optional arguments RabbitMQ reads from
//! `queue.declare` ([`QueueArguments`]) and `basic.consume`
//! ([`ConsumeArguments`], or the `with_*` methods of [`ConsumeOptions`]),
//! each value encoded with the field type RabbitMQ expects.
//!
//! They build a [`FieldTable`]; anything they do not cover can still be set
//! on it with [`QueueArguments::with`] or [`ConsumeArguments::with`].

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::channel::ConsumeOptions;
use crate::protocol::{FieldTable, FieldValue, ShortString};

/// The largest TTL or expiry these builders send, in milliseconds (2³²−1,
/// about 49.7 days): the most every RabbitMQ accepts (older versions refuse
/// larger values, the limit of Erlang's timers).
pub const MAX_EXPIRY_MILLIS: u64 = u32::MAX as u64;

/// Milliseconds of `duration`, clipped to [`MAX_EXPIRY_MILLIS`].
fn expiry_millis(duration: Duration) -> i64 {
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    millis.min(MAX_EXPIRY_MILLIS) as i64
}

/// A count RabbitMQ reads as a signed 64-bit integer, clipped to fit.
fn long(value: u64) -> FieldValue {
    FieldValue::I64(i64::try_from(value).unwrap_or(i64::MAX))
}

/// The kind of queue to declare (`x-queue-type`).
///
/// ```
/// use amqp091::{QueueArguments, QueueType};
///
/// let table = amqp091::FieldTable::from(QueueArguments::new().queue_type(QueueType::Quorum));
/// assert_eq!(table.get("x-queue-type").and_then(|v| v.as_str()), Some("quorum"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueType {
    /// The default queue type.
    Classic,
    /// A replicated queue (Raft); always durable, never exclusive.
    Quorum,
    /// An append-only log read without removing messages; always durable,
    /// consumed with a prefetch and manual acks.
    Stream,
}

impl QueueType {
    /// The value RabbitMQ reads.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

/// What a queue at its length limit does with one more message (`x-overflow`).
///
/// ```
/// use amqp091::{Overflow, QueueArguments};
///
/// let arguments = QueueArguments::new().max_length(1000).overflow(Overflow::RejectPublish);
/// let table = amqp091::FieldTable::from(arguments);
/// assert_eq!(table.get("x-overflow").and_then(|v| v.as_str()), Some("reject-publish"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Overflow {
    /// Drops (or dead-letters) the oldest message: RabbitMQ's default.
    DropHead,
    /// Refuses the new message: a publisher in confirm mode gets a nack.
    RejectPublish,
    /// Refuses the new message and dead-letters it (classic queues only).
    RejectPublishDlx,
}

impl Overflow {
    /// The value RabbitMQ reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// The optional arguments of `queue.declare`, built one by one and turned
/// into the [`FieldTable`] the declare takes.
///
/// Durations are sent in whole milliseconds (a fraction is dropped) and
/// clipped to [`MAX_EXPIRY_MILLIS`], which every RabbitMQ accepts; counts over
/// `i64::MAX` are clipped to it. See [`expires`](Self::expires) for a zero
/// expiry.
///
/// ```no_run
/// use std::time::Duration;
/// use amqp091::prelude::*;
/// use amqp091::{QueueArguments, QueueType};
///
/// # async fn example(channel: amqp091::Channel) -> Result<(), amqp091::Error> {
/// let arguments = QueueArguments::new()
///     .queue_type(QueueType::Quorum)
///     .dead_letter_exchange("dlx")
///     .message_ttl(Duration::from_secs(5))
///     .delivery_limit(3);
/// channel
///     .queue_declare(queue::Declare {
///         queue: "orders".into(),
///         durable: true,
///         arguments: arguments.into(),
///         ..Default::default()
///     })
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueArguments {
    table: FieldTable,
}

impl QueueArguments {
    /// No arguments.
    pub fn new() -> Self {
        Self::default()
    }

    /// `x-queue-type`: classic, quorum or stream.
    #[must_use]
    pub fn queue_type(self, queue_type: QueueType) -> Self {
        self.with("x-queue-type", queue_type.as_str())
    }

    /// `x-dead-letter-exchange`: where expired, rejected (without requeue)
    /// and overflowed messages are republished. `""` is the default exchange.
    #[must_use]
    pub fn dead_letter_exchange(self, exchange: &str) -> Self {
        self.with("x-dead-letter-exchange", exchange)
    }

    /// `x-dead-letter-routing-key`: the routing key dead-lettered messages
    /// are republished with, instead of their own.
    #[must_use]
    pub fn dead_letter_routing_key(self, routing_key: &str) -> Self {
        self.with("x-dead-letter-routing-key", routing_key)
    }

    /// `x-message-ttl`: how long a message may wait in the queue before it
    /// expires (is dropped or dead-lettered). Zero expires a message that
    /// cannot be delivered at once.
    ///
    /// ```
    /// use std::time::Duration;
    /// use amqp091::{FieldTable, FieldValue, QueueArguments};
    ///
    /// let table = FieldTable::from(QueueArguments::new().message_ttl(Duration::from_secs(5)));
    /// assert_eq!(table.get("x-message-ttl"), Some(&FieldValue::I64(5000)));
    /// ```
    #[must_use]
    pub fn message_ttl(self, ttl: Duration) -> Self {
        self.with("x-message-ttl", expiry_millis(ttl))
    }

    /// `x-expires`: how long the queue may go unused (no consumer, no
    /// `basic.get`, no redeclare) before RabbitMQ deletes it.
    ///
    /// RabbitMQ refuses a zero expiry; a duration under one millisecond is
    /// sent as 1 ms, the shortest it accepts (the queue is deleted as soon
    /// as it is unused).
    ///
    /// ```
    /// use std::time::Duration;
    /// use amqp091::{FieldTable, FieldValue, QueueArguments};
    ///
    /// let table = FieldTable::from(QueueArguments::new().expires(Duration::ZERO));
    /// assert_eq!(table.get("x-expires"), Some(&FieldValue::I64(1)));
    /// ```
    #[must_use]
    pub fn expires(self, idle: Duration) -> Self {
        self.with("x-expires", expiry_millis(idle).max(1))
    }

    /// `x-max-length`: the most messages the queue holds; what happens to
    /// one more is set by [`overflow`](Self::overflow).
    #[must_use]
    pub fn max_length(self, messages: u64) -> Self {
        self.with("x-max-length", long(messages))
    }

    /// `x-max-length-bytes`: the most body bytes the queue holds.
    #[must_use]
    pub fn max_length_bytes(self, bytes: u64) -> Self {
        self.with("x-max-length-bytes", long(bytes))
    }

    /// `x-overflow`: what the queue does at its length limit.
    #[must_use]
    pub fn overflow(self, overflow: Overflow) -> Self {
        self.with("x-overflow", overflow.as_str())
    }

    /// `x-single-active-consumer`: only one consumer at a time receives
    /// messages; the next takes over when it goes away.
    #[must_use]
    pub fn single_active_consumer(self, enabled: bool) -> Self {
        self.with("x-single-active-consumer", enabled)
    }

    /// `x-delivery-limit` (quorum queues): after this many failed deliveries
    /// (returned to the queue) a message is dropped or dead-lettered.
    #[must_use]
    pub fn delivery_limit(self, deliveries: u32) -> Self {
        self.with("x-delivery-limit", i64::from(deliveries))
    }

    /// `x-max-priority` (classic queues): the queue orders messages by their
    /// `priority` property, from 0 up to this.
    #[must_use]
    pub fn max_priority(self, priority: u8) -> Self {
        self.with("x-max-priority", i64::from(priority))
    }

    /// Sets any other argument, replacing one set before under that key.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<FieldValue>) -> Self {
        self.table.insert(ShortString::from(key), value);
        self
    }

    /// The table built so far.
    pub fn as_table(&self) -> &FieldTable {
        &self.table
    }
}

impl From<QueueArguments> for FieldTable {
    fn from(arguments: QueueArguments) -> Self {
        arguments.table
    }
}

/// Where a consumer of a stream queue starts reading (`x-stream-offset`).
///
/// ```
/// use amqp091::{FieldTable, FieldValue, StreamOffset};
///
/// let offset: StreamOffset = "30m".parse::<amqp091::Interval>().unwrap().into();
/// assert_eq!(offset.to_field_value().as_str(), Some("30m"));
/// assert_eq!(StreamOffset::Offset(42).to_field_value(), FieldValue::I64(42));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamOffset {
    /// The first message still in the log.
    First,
    /// The last chunk written (a batch of the latest messages).
    Last,
    /// Only messages published from now on: what RabbitMQ does without the
    /// argument.
    Next,
    /// This offset; one outside the log clamps to its start or end. Sent as
    /// a signed 64-bit integer, so offsets over `i64::MAX` are clipped (to
    /// the end of any real log).
    Offset(u64),
    /// The first message published at or after this time, in seconds since
    /// the epoch (an AMQP timestamp).
    Timestamp(u64),
    /// Messages published within this interval before now.
    Interval(Interval),
}

impl StreamOffset {
    /// [`Timestamp`](Self::Timestamp) of `time`, to the second; a time
    /// before the epoch is the epoch (the start of any log).
    pub fn since(time: SystemTime) -> Self {
        let seconds = time
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0);
        StreamOffset::Timestamp(seconds)
    }

    /// The value RabbitMQ reads: a long string for the names and the
    /// interval, a long-long for an offset, a timestamp for a time.
    pub fn to_field_value(&self) -> FieldValue {
        match *self {
            StreamOffset::First => "first".into(),
            StreamOffset::Last => "last".into(),
            StreamOffset::Next => "next".into(),
            StreamOffset::Offset(offset) => long(offset),
            StreamOffset::Timestamp(seconds) => FieldValue::Timestamp(seconds),
            StreamOffset::Interval(interval) => interval.to_string().into(),
        }
    }
}

impl From<Interval> for StreamOffset {
    fn from(interval: Interval) -> Self {
        StreamOffset::Interval(interval)
    }
}

/// The unit of an [`Interval`], as RabbitMQ writes it (`x-max-age`'s units).
///
/// ```
/// use amqp091::{Interval, IntervalUnit};
///
/// assert_eq!(Interval::new(7, IntervalUnit::Days).to_string(), "7D");
/// assert_eq!(Interval::new(2, IntervalUnit::Months).to_string(), "2M");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IntervalUnit {
    /// `Y`.
    Years,
    /// `M`.
    Months,
    /// `D`.
    Days,
    /// `h`.
    Hours,
    /// `m`.
    Minutes,
    /// `s`.
    Seconds,
}

impl IntervalUnit {
    fn letter(self) -> char {
        match self {
            IntervalUnit::Years => 'Y',
            IntervalUnit::Months => 'M',
            IntervalUnit::Days => 'D',
            IntervalUnit::Hours => 'h',
            IntervalUnit::Minutes => 'm',
            IntervalUnit::Seconds => 's',
        }
    }

    fn from_letter(letter: char) -> Option<Self> {
        Some(match letter {
            'Y' => IntervalUnit::Years,
            'M' => IntervalUnit::Months,
            'D' => IntervalUnit::Days,
            'h' => IntervalUnit::Hours,
            'm' => IntervalUnit::Minutes,
            's' => IntervalUnit::Seconds,
            _ => return None,
        })
    }
}

/// A time interval in RabbitMQ's notation: a number and a unit, as in `1h`
/// or `30m`. Parse one from text, or build it from its parts.
///
/// ```
/// use amqp091::{Interval, IntervalUnit};
///
/// let interval: Interval = "90s".parse().unwrap();
/// assert_eq!(interval, Interval::new(90, IntervalUnit::Seconds));
/// assert_eq!(interval.to_string(), "90s");
/// assert!("1 hour".parse::<Interval>().is_err());
/// assert!("0h".parse::<Interval>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interval {
    amount: u32,
    unit: IntervalUnit,
}

impl Interval {
    /// `amount` of `unit` (at least 1: a zero interval is made 1).
    pub fn new(amount: u32, unit: IntervalUnit) -> Self {
        Self {
            amount: amount.max(1),
            unit,
        }
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.amount, self.unit.letter())
    }
}

/// Text that is not an interval in RabbitMQ's notation.
///
/// ```
/// let error = "an hour".parse::<amqp091::Interval>().unwrap_err();
/// assert_eq!(error.text, "an hour");
/// assert!(error.to_string().contains("\"1h\""));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an interval: expected a positive number and one of the units Y, M, D, h, m, s, as in \"1h\"")]
pub struct InvalidInterval {
    /// The text given.
    pub text: String,
}

impl FromStr for Interval {
    type Err = InvalidInterval;

    fn from_str(text: &str) -> Result<Self, InvalidInterval> {
        let invalid = || InvalidInterval {
            text: text.to_owned(),
        };
        let mut chars = text.chars();
        let unit = chars
            .next_back()
            .and_then(IntervalUnit::from_letter)
            .ok_or_else(invalid)?;
        let digits = chars.as_str();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        match digits.parse::<u32>() {
            Ok(amount) if amount > 0 => Ok(Self { amount, unit }),
            _ => Err(invalid()),
        }
    }
}

/// The optional arguments of `basic.consume`, turned into the
/// [`FieldTable`] of [`ConsumeOptions::arguments`]. The `with_*` methods of
/// `ConsumeOptions` set the same on the options directly.
///
/// ```
/// use amqp091::{ConsumeArguments, ConsumeOptions, FieldValue, StreamOffset};
///
/// let options = ConsumeOptions {
///     arguments: ConsumeArguments::new().stream_offset(StreamOffset::First).into(),
///     ..Default::default()
/// };
/// assert_eq!(options.arguments.get("x-stream-offset").and_then(|v| v.as_str()), Some("first"));
/// let options = ConsumeOptions::default().with_priority(10);
/// assert_eq!(options.arguments.get("x-priority"), Some(&FieldValue::I32(10)));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumeArguments {
    table: FieldTable,
}

impl ConsumeArguments {
    /// No arguments.
    pub fn new() -> Self {
        Self::default()
    }

    /// `x-priority`: consumers of higher priority get messages first while
    /// they can take them (the default is 0; negative values are allowed).
    #[must_use]
    pub fn priority(self, priority: i32) -> Self {
        self.with("x-priority", priority)
    }

    /// `x-stream-offset`: where a stream queue's consumer starts.
    #[must_use]
    pub fn stream_offset(self, offset: StreamOffset) -> Self {
        self.with("x-stream-offset", offset.to_field_value())
    }

    /// Sets any other argument, replacing one set before under that key.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<FieldValue>) -> Self {
        self.table.insert(ShortString::from(key), value);
        self
    }

    /// The table built so far.
    pub fn as_table(&self) -> &FieldTable {
        &self.table
    }
}

impl From<ConsumeArguments> for FieldTable {
    fn from(arguments: ConsumeArguments) -> Self {
        arguments.table
    }
}

/// Typed arguments on the options themselves, added to (or replacing the
/// same key of) what [`arguments`](ConsumeOptions::arguments) holds.
impl ConsumeOptions {
    /// Sets `x-priority` (see [`ConsumeArguments::priority`]).
    ///
    /// ```
    /// use amqp091::{ConsumeOptions, FieldValue};
    ///
    /// let options = ConsumeOptions::default().with_priority(-1);
    /// assert_eq!(options.arguments.get("x-priority"), Some(&FieldValue::I32(-1)));
    /// ```
    #[must_use]
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.arguments.insert("x-priority", priority);
        self
    }

    /// Sets `x-stream-offset` (see [`StreamOffset`]). A stream consumer
    /// also needs a prefetch (`basic.qos`) and manual acks.
    ///
    /// ```
    /// use amqp091::{ConsumeOptions, FieldValue, StreamOffset};
    ///
    /// let options = ConsumeOptions::default().with_stream_offset(StreamOffset::Timestamp(1_700_000_000));
    /// assert_eq!(options.arguments.get("x-stream-offset"), Some(&FieldValue::Timestamp(1_700_000_000)));
    /// ```
    #[must_use]
    pub fn with_stream_offset(mut self, offset: StreamOffset) -> Self {
        self.arguments
            .insert("x-stream-offset", offset.to_field_value());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(table: &FieldTable) -> Vec<(String, FieldValue)> {
        table
            .iter()
            .map(|(key, value)| (key.to_string_lossy().into_owned(), value.clone()))
            .collect()
    }

    fn text(value: &str) -> FieldValue {
        FieldValue::from(value)
    }

    #[test]
    fn every_queue_argument_has_its_key_and_rabbitmq_type() {
        let table: FieldTable = QueueArguments::new()
            .queue_type(QueueType::Quorum)
            .dead_letter_exchange("dlx")
            .dead_letter_routing_key("dead")
            .message_ttl(Duration::from_millis(1500))
            .expires(Duration::from_secs(60))
            .max_length(10)
            .max_length_bytes(1 << 20)
            .overflow(Overflow::RejectPublishDlx)
            .single_active_consumer(true)
            .delivery_limit(3)
            .max_priority(9)
            .into();
        assert_eq!(
            entries(&table),
            vec![
                ("x-queue-type".to_owned(), text("quorum")),
                ("x-dead-letter-exchange".to_owned(), text("dlx")),
                ("x-dead-letter-routing-key".to_owned(), text("dead")),
                ("x-message-ttl".to_owned(), FieldValue::I64(1500)),
                ("x-expires".to_owned(), FieldValue::I64(60_000)),
                ("x-max-length".to_owned(), FieldValue::I64(10)),
                ("x-max-length-bytes".to_owned(), FieldValue::I64(1 << 20)),
                ("x-overflow".to_owned(), text("reject-publish-dlx")),
                (
                    "x-single-active-consumer".to_owned(),
                    FieldValue::Bool(true)
                ),
                ("x-delivery-limit".to_owned(), FieldValue::I64(3)),
                ("x-max-priority".to_owned(), FieldValue::I64(9)),
            ]
        );
    }

    #[test]
    fn the_names_of_queue_types_and_overflows_are_rabbitmqs() {
        let types = [QueueType::Classic, QueueType::Quorum, QueueType::Stream];
        let names: Vec<_> = types.iter().map(|t| t.as_str()).collect();
        assert_eq!(names, ["classic", "quorum", "stream"]);
        let overflows = [
            Overflow::DropHead,
            Overflow::RejectPublish,
            Overflow::RejectPublishDlx,
        ];
        let names: Vec<_> = overflows.iter().map(|o| o.as_str()).collect();
        assert_eq!(names, ["drop-head", "reject-publish", "reject-publish-dlx"]);
    }

    #[test]
    fn durations_are_whole_milliseconds_within_rabbitmqs_limit() {
        let ttl = |d| {
            FieldTable::from(QueueArguments::new().message_ttl(d))
                .get("x-message-ttl")
                .cloned()
        };
        assert_eq!(ttl(Duration::ZERO), Some(FieldValue::I64(0)));
        assert_eq!(ttl(Duration::from_micros(2999)), Some(FieldValue::I64(2)));
        let max = MAX_EXPIRY_MILLIS as i64;
        assert_eq!(
            ttl(Duration::from_millis(MAX_EXPIRY_MILLIS)),
            Some(FieldValue::I64(max))
        );
        assert_eq!(
            ttl(Duration::from_millis(MAX_EXPIRY_MILLIS + 1)),
            Some(FieldValue::I64(max))
        );
        assert_eq!(ttl(Duration::MAX), Some(FieldValue::I64(max)));
        let expires = |d| {
            FieldTable::from(QueueArguments::new().expires(d))
                .get("x-expires")
                .cloned()
        };
        assert_eq!(expires(Duration::ZERO), Some(FieldValue::I64(1)));
        assert_eq!(
            expires(Duration::from_micros(999)),
            Some(FieldValue::I64(1))
        );
        assert_eq!(expires(Duration::MAX), Some(FieldValue::I64(max)));
    }

    #[test]
    fn counts_over_i64_are_clipped() {
        let table = FieldTable::from(QueueArguments::new().max_length(u64::MAX));
        assert_eq!(table.get("x-max-length"), Some(&FieldValue::I64(i64::MAX)));
        assert_eq!(
            StreamOffset::Offset(u64::MAX).to_field_value(),
            FieldValue::I64(i64::MAX)
        );
    }

    #[test]
    fn setting_a_key_again_replaces_it() {
        let table = FieldTable::from(
            QueueArguments::new()
                .max_length(1)
                .with("x-max-length", 2i64)
                .max_length(3),
        );
        assert_eq!(
            entries(&table),
            vec![("x-max-length".to_owned(), FieldValue::I64(3))]
        );
    }

    #[test]
    fn each_stream_offset_has_rabbitmqs_type() {
        assert_eq!(StreamOffset::First.to_field_value(), text("first"));
        assert_eq!(StreamOffset::Last.to_field_value(), text("last"));
        assert_eq!(StreamOffset::Next.to_field_value(), text("next"));
        assert_eq!(StreamOffset::Offset(7).to_field_value(), FieldValue::I64(7));
        assert_eq!(
            StreamOffset::Timestamp(1_700_000_000).to_field_value(),
            FieldValue::Timestamp(1_700_000_000)
        );
        assert_eq!(
            StreamOffset::since(UNIX_EPOCH + Duration::from_millis(5_999)),
            StreamOffset::Timestamp(5)
        );
        assert_eq!(
            StreamOffset::since(UNIX_EPOCH - Duration::from_secs(1)),
            StreamOffset::Timestamp(0)
        );
        let interval = StreamOffset::from(Interval::new(1, IntervalUnit::Hours));
        assert_eq!(interval.to_field_value(), text("1h"));
    }

    #[test]
    fn intervals_parse_only_rabbitmqs_notation() {
        for (text, amount, unit) in [
            ("1Y", 1, IntervalUnit::Years),
            ("2M", 2, IntervalUnit::Months),
            ("7D", 7, IntervalUnit::Days),
            ("1h", 1, IntervalUnit::Hours),
            ("30m", 30, IntervalUnit::Minutes),
            ("90s", 90, IntervalUnit::Seconds),
        ] {
            let interval: Interval = text.parse().expect(text);
            assert_eq!(interval, Interval::new(amount, unit));
            assert_eq!(interval.to_string(), text);
        }
        for bad in [
            "",
            "h",
            "1",
            "0s",
            "-1h",
            "+1h",
            "1H",
            "1 h",
            "1.5h",
            "99999999999s",
            "1hh",
        ] {
            let error = bad.parse::<Interval>().expect_err(bad);
            assert_eq!(error.text, bad);
        }
        assert_eq!(Interval::new(0, IntervalUnit::Days).to_string(), "1D");
    }

    #[test]
    fn consume_arguments_and_options_build_the_same_table() {
        let built: FieldTable = ConsumeArguments::new()
            .priority(5)
            .stream_offset(StreamOffset::Offset(10))
            .into();
        let options = ConsumeOptions::default()
            .with_priority(5)
            .with_stream_offset(StreamOffset::Offset(10));
        assert_eq!(options.arguments, built);
        assert_eq!(
            entries(&built),
            vec![
                ("x-priority".to_owned(), FieldValue::I32(5)),
                ("x-stream-offset".to_owned(), FieldValue::I64(10)),
            ]
        );
    }
}
