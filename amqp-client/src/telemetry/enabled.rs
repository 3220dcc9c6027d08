//! The feature's instrumentation: metric handles registered once per
//! connection (a registration is a lookup in the recorder; an increment
//! through a handle is an atomic add), and the spans.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Unit};
use tracing::instrument::Instrumented;
use tracing::{Instrument, Span};

use super::{Received, Settled};
use crate::config::Config;
use crate::error::Error;
use crate::events::Confirmation;
use crate::protocol::methods::basic;
use crate::protocol::{BasicProperties, ReceivedProperties};

/// The value of `messaging.system`.
const SYSTEM: &str = "rabbitmq";

const SENT: &str = "messaging.client.sent.messages";
const CONSUMED: &str = "messaging.client.consumed.messages";
const OPERATION_DURATION: &str = "messaging.client.operation.duration";
const CONNECTIONS: &str = "amqp091.connections.open";
const CHANNELS: &str = "amqp091.channels.open";
const CONFIRMED: &str = "amqp091.publish.confirmed";
const PUBLISH_NACKED: &str = "amqp091.publish.nacked";
const RETURNED: &str = "amqp091.publish.returned";
const ACKED: &str = "amqp091.delivery.acked";
const NACKED: &str = "amqp091.delivery.nacked";
const REJECTED: &str = "amqp091.delivery.rejected";
const RECONNECTS: &str = "amqp091.connection.reconnects";
const BLOCKED: &str = "amqp091.connection.blocked.duration";
const BYTES_SENT: &str = "amqp091.bytes.sent";
const BYTES_RECEIVED: &str = "amqp091.bytes.received";

/// Gives the installed recorder the unit and description of every metric
/// the client reports (see the [module docs](crate::telemetry)). Call it
/// once, after installing the recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(SENT, Unit::Count, "Messages published.");
    describe_counter!(
        CONSUMED,
        Unit::Count,
        "Messages handed to the application, by a consumer or basic.get."
    );
    describe_histogram!(
        OPERATION_DURATION,
        Unit::Seconds,
        "Round trip of a synchronous AMQP call on a channel."
    );
    describe_gauge!(CONNECTIONS, Unit::Count, "Connections whose I/O task runs.");
    describe_gauge!(
        CHANNELS,
        Unit::Count,
        "Channels held by the connections: opening, open, closing or waiting to be recovered."
    );
    describe_counter!(CONFIRMED, Unit::Count, "Publishes the broker acked.");
    describe_counter!(PUBLISH_NACKED, Unit::Count, "Publishes the broker nacked.");
    describe_counter!(
        RETURNED,
        Unit::Count,
        "Messages the broker returned as unroutable."
    );
    describe_counter!(ACKED, Unit::Count, "Acks sent by the application.");
    describe_counter!(NACKED, Unit::Count, "Nacks sent by the application.");
    describe_counter!(REJECTED, Unit::Count, "Rejects sent by the application.");
    describe_counter!(RECONNECTS, Unit::Count, "Connections re-established.");
    describe_histogram!(
        BLOCKED,
        Unit::Seconds,
        "Each period a connection was blocked by the broker."
    );
    describe_counter!(BYTES_SENT, Unit::Bytes, "Bytes written to the sockets.");
    describe_counter!(BYTES_RECEIVED, Unit::Bytes, "Bytes read from the sockets.");
}

struct Handles {
    sent: Counter,
    delivered: Counter,
    got: Counter,
    confirmed: Counter,
    publish_nacked: Counter,
    returned: Counter,
    acked: Counter,
    nacked: Counter,
    rejected: Counter,
    reconnects: Counter,
    bytes_sent: Counter,
    bytes_received: Counter,
    connections: Gauge,
    channels: Gauge,
    blocked: Histogram,
}

impl Handles {
    fn register() -> Self {
        let system = ("messaging.system", SYSTEM);
        Self {
            sent: metrics::counter!(SENT, system.0 => system.1, "messaging.operation.name" => "publish"),
            delivered: metrics::counter!(CONSUMED, system.0 => system.1, "messaging.operation.name" => "deliver"),
            got: metrics::counter!(CONSUMED, system.0 => system.1, "messaging.operation.name" => "get"),
            confirmed: metrics::counter!(CONFIRMED),
            publish_nacked: metrics::counter!(PUBLISH_NACKED),
            returned: metrics::counter!(RETURNED),
            acked: metrics::counter!(ACKED),
            nacked: metrics::counter!(NACKED),
            rejected: metrics::counter!(REJECTED),
            reconnects: metrics::counter!(RECONNECTS),
            bytes_sent: metrics::counter!(BYTES_SENT),
            bytes_received: metrics::counter!(BYTES_RECEIVED),
            connections: metrics::gauge!(CONNECTIONS),
            channels: metrics::gauge!(CHANNELS),
            blocked: metrics::histogram!(BLOCKED),
        }
    }
}

/// A connection's metric handles and span, shared by its handles.
#[derive(Clone)]
pub(crate) struct Telemetry {
    handles: Arc<Handles>,
    span: Span,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// When a timed operation started.
#[derive(Clone, Copy)]
pub(crate) struct Started(Instant);

impl Started {
    pub(crate) fn now() -> Self {
        Self(Instant::now())
    }
}

impl Telemetry {
    /// Registers the handles with the recorder installed now, and opens the
    /// connection's span, for the address of `config` it connected to.
    pub(crate) fn new(config: &Config, address_index: usize) -> Self {
        let addresses = config.addresses();
        let (host, port) = addresses
            .get(address_index)
            .map_or((config.host.as_str(), config.port), |(host, port)| {
                (host.as_str(), *port)
            });
        let span = tracing::info_span!(
            target: "amqp091::telemetry",
            "amqp.connection",
            messaging.system = SYSTEM,
            server.address = host,
            server.port = port,
        );
        Self {
            handles: Arc::new(Handles::register()),
            span,
        }
    }

    /// A connection's telemetry that reports nowhere (tests and harnesses).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn unobserved() -> Self {
        metrics::with_local_recorder(&metrics::NoopRecorder, || Self {
            handles: Arc::new(Handles::register()),
            span: Span::none(),
        })
    }

    /// Runs the connection's I/O task in its span.
    pub(crate) fn instrument<F: Future>(&self, task: F) -> Instrumented<F> {
        task.instrument(self.span.clone())
    }

    /// A channel handle's telemetry: its span, child of the connection's.
    pub(crate) fn channel(&self, id: u16) -> ChannelTelemetry {
        let span = tracing::info_span!(
            target: "amqp091::telemetry",
            parent: &self.span,
            "amqp.channel",
            messaging.system = SYSTEM,
            messaging.rabbitmq.channel = id,
        );
        ChannelTelemetry {
            telemetry: self.clone(),
            span,
        }
    }

    pub(crate) fn connection_started(&self) {
        self.handles.connections.increment(1.0);
    }

    pub(crate) fn connection_ended(&self) {
        self.handles.connections.decrement(1.0);
    }

    pub(crate) fn reconnected(&self) {
        self.handles.reconnects.increment(1);
    }

    pub(crate) fn bytes_sent(&self, n: usize) {
        self.handles.bytes_sent.increment(n as u64);
    }

    pub(crate) fn bytes_received(&self, n: usize) {
        self.handles.bytes_received.increment(n as u64);
    }

    /// A synchronous call on a channel got its answer (or failed).
    pub(crate) fn call_done(&self, method: &'static str, started: Started, error: Option<&Error>) {
        let seconds = started.0.elapsed().as_secs_f64();
        let histogram = match error {
            None => metrics::histogram!(
                OPERATION_DURATION,
                "messaging.system" => SYSTEM,
                "messaging.operation.name" => method,
            ),
            Some(error) => metrics::histogram!(
                OPERATION_DURATION,
                "messaging.system" => SYSTEM,
                "messaging.operation.name" => method,
                "error.type" => error_type(error),
            ),
        };
        histogram.record(seconds);
    }
}

/// OpenTelemetry's `error.type` of a failed call: the broker's reply code
/// name (`NOT_FOUND`…) when it closed something, else `_OTHER`.
fn error_type(error: &Error) -> &'static str {
    error
        .reply_code()
        .and_then(|code| code.name())
        .unwrap_or("_OTHER")
}

/// What the I/O task reports: the connection's telemetry and what it needs
/// to count channels and time blocked periods.
#[derive(Debug)]
pub(crate) struct IoTelemetry {
    telemetry: Telemetry,
    /// The channels last counted in the gauge, which every connection adds to.
    channels: AtomicUsize,
    blocked_since: Mutex<Option<Instant>>,
}

impl IoTelemetry {
    pub(crate) fn new(telemetry: Telemetry) -> Self {
        Self {
            telemetry,
            channels: AtomicUsize::new(0),
            blocked_since: Mutex::new(None),
        }
    }

    pub(crate) fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The machine holds `now` channels (read after each routing; the gauge
    /// moves only when the count does).
    #[inline]
    pub(crate) fn channels(&self, now: usize) {
        let before = self.channels.swap(now, Ordering::Relaxed);
        if before != now {
            self.telemetry
                .handles
                .channels
                .increment(now as f64 - before as f64);
        }
    }

    /// The broker blocked (`true`) or unblocked the connection.
    pub(crate) fn blocked(&self, blocked: bool) {
        let Ok(mut since) = self.blocked_since.lock() else {
            return;
        };
        match (blocked, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, Some(start)) => {
                *since = None;
                self.telemetry
                    .handles
                    .blocked
                    .record(start.elapsed().as_secs_f64());
            }
            _ => {}
        }
    }

    /// The outcome of a publish in confirm mode.
    pub(crate) fn confirmed(&self, outcome: &Result<Confirmation, Error>) {
        let handles = &self.telemetry.handles;
        match outcome {
            Ok(Confirmation::Ack) => handles.confirmed.increment(1),
            Ok(Confirmation::Nack) => handles.publish_nacked.increment(1),
            Ok(Confirmation::Returned(_)) => handles.returned.increment(1),
            Ok(Confirmation::NotRequested) | Err(_) => {}
        }
    }

    /// A message returned outside confirm mode, for the returns stream.
    pub(crate) fn returned(&self) {
        self.telemetry.handles.returned.increment(1);
    }
}

/// A channel handle's telemetry.
#[derive(Clone)]
pub(crate) struct ChannelTelemetry {
    telemetry: Telemetry,
    span: Span,
}

/// A span that lasts as long as the value holding it.
pub(crate) type OperationSpan = Span;

impl ChannelTelemetry {
    /// The span of one publish, closed when the call returns.
    pub(crate) fn publish(
        &self,
        publish: &basic::Publish,
        properties: &BasicProperties,
        body_size: usize,
    ) -> OperationSpan {
        tracing::info_span!(
            target: "amqp091::telemetry",
            parent: &self.span,
            "publish",
            messaging.system = SYSTEM,
            messaging.operation.type = "send",
            messaging.operation.name = "publish",
            messaging.destination.name = %publish.exchange,
            messaging.rabbitmq.destination.routing_key = %publish.routing_key,
            messaging.message.body.size = body_size,
            messaging.message.id = properties.message_id.as_ref().map(tracing::field::display),
            messaging.message.conversation_id =
                properties.correlation_id.as_ref().map(tracing::field::display),
        )
    }

    /// A publish was handed to the connection.
    #[inline]
    pub(crate) fn published(&self) {
        self.telemetry.handles.sent.increment(1);
    }

    /// A delivery was handed to the application: counts it and opens its
    /// span, which the delivery holds.
    pub(crate) fn received(
        &self,
        envelope: Received<'_>,
        properties: &ReceivedProperties,
        body_size: usize,
    ) -> OperationSpan {
        let get = envelope.consumer_tag.is_empty();
        let handles = &self.telemetry.handles;
        if get {
            handles.got.increment(1);
        } else {
            handles.delivered.increment(1);
        }
        tracing::info_span!(
            target: "amqp091::telemetry",
            parent: &self.span,
            "receive",
            messaging.system = SYSTEM,
            messaging.operation.type = "receive",
            messaging.operation.name = if get { "get" } else { "deliver" },
            messaging.destination.name = %envelope.exchange,
            messaging.rabbitmq.destination.routing_key = %envelope.routing_key,
            messaging.rabbitmq.message.delivery_tag = envelope.delivery_tag,
            messaging.message.body.size = body_size,
            messaging.message.id = properties.message_id.as_ref().map(tracing::field::display),
            messaging.message.conversation_id =
                properties.correlation_id.as_ref().map(tracing::field::display),
        )
    }

    /// The application settled a delivery (the settlement is queued).
    pub(crate) fn settled(&self, settled: Settled, delivery_tag: u64) {
        let handles = &self.telemetry.handles;
        let (counter, name) = match settled {
            Settled::Ack => (&handles.acked, "ack"),
            Settled::Nack => (&handles.nacked, "nack"),
            Settled::Reject => (&handles.rejected, "reject"),
        };
        counter.increment(1);
        let _span = tracing::info_span!(
            target: "amqp091::telemetry",
            parent: &self.span,
            "settle",
            messaging.system = SYSTEM,
            messaging.operation.type = "settle",
            messaging.operation.name = name,
            messaging.rabbitmq.message.delivery_tag = delivery_tag,
        );
    }
}
