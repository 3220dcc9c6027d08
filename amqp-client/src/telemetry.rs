//! Metrics and tracing spans for operators (feature `metrics`).
//!
//! With the feature off every function here is an empty `#[inline(always)]`
//! one and every type a zero-sized one: the hot paths compile to what they
//! were without it (measured with callgrind, see BENCHMARKS.md). With it on,
//! the client reports through the `metrics` crate's facade to whatever recorder
//! the application installed, and opens `tracing` spans whose attribute
//! names follow OpenTelemetry's messaging semantic conventions.
//!
//! # Metrics
//!
//! Handles are registered when a connection opens, with the recorder
//! installed then (install it first). `describe()` gives the recorder each
//! metric's unit and description. Names follow OpenTelemetry's messaging
//! metrics where one exists; the rest are `amqp091.*`. Every metric is summed
//! over all the connections of the process.
//!
//! | name | type | unit | labels | what |
//! | --- | --- | --- | --- | --- |
//! | `messaging.client.sent.messages` | counter | `{message}` | `messaging.system`, `messaging.operation.name` = `publish` | messages handed to the connection by `basic_publish` |
//! | `messaging.client.consumed.messages` | counter | `{message}` | `messaging.system`, `messaging.operation.name` = `deliver` or `get` | messages handed to the application: by a consumer's stream, or by `basic_get` |
//! | `messaging.client.operation.duration` | histogram | `s` | `messaging.system`, `messaging.operation.name` = the AMQP method (`queue.declare`…), `error.type` when it failed | round trip of each synchronous call on a channel |
//! | `amqp091.connections.open` | gauge | `{connection}` | — | connections whose I/O task runs (recovering ones included) |
//! | `amqp091.channels.open` | gauge | `{channel}` | — | channels the connections hold: opening, open, closing, or waiting to be recovered |
//! | `amqp091.publish.confirmed` | counter | `{message}` | — | publishes the broker acked (confirm mode) |
//! | `amqp091.publish.nacked` | counter | `{message}` | — | publishes the broker nacked (confirm mode) |
//! | `amqp091.publish.returned` | counter | `{message}` | — | messages the broker returned as unroutable (`mandatory`), with or without confirm mode |
//! | `amqp091.delivery.acked` | counter | `{call}` | — | `ack` and `ack_multiple` calls the application made (one per call, however many messages `multiple` covers) |
//! | `amqp091.delivery.nacked` | counter | `{call}` | — | `nack` calls |
//! | `amqp091.delivery.rejected` | counter | `{call}` | — | `reject` calls |
//! | `amqp091.connection.reconnects` | counter | `{reconnect}` | — | connections re-established by recovery |
//! | `amqp091.connection.blocked.duration` | histogram | `s` | — | each period the broker blocked a connection (`connection.blocked` to `unblocked`); its sum is the time blocked |
//! | `amqp091.bytes.sent` | counter | `By` | — | bytes written to the sockets after the handshake |
//! | `amqp091.bytes.received` | counter | `By` | — | bytes read from the sockets after the handshake |
//!
//! `messaging.system` is always `rabbitmq`. No metric carries a queue,
//! exchange or routing key: OpenTelemetry makes `messaging.destination.name`
//! conditional, and per-destination series multiply with every temporary or
//! server-named queue (and cost a lookup per message). The spans carry them.
//!
//! # Spans
//!
//! All at INFO, with target `amqp091::telemetry` (filter them apart from the
//! client's logs with e.g. `amqp091::telemetry=info`). They are created only
//! when a subscriber is interested, and their fields computed only then.
//!
//! | span | when | fields |
//! | --- | --- | --- |
//! | `amqp.connection` | the connection's life; its I/O task runs in it | `messaging.system`, `server.address`, `server.port` |
//! | `amqp.channel` | a channel handle's life, child of its connection | `messaging.system`, `messaging.rabbitmq.channel` (the id) |
//! | `publish` | one `basic_publish`'s hand-over of the encoded message to the connection's queue, child of its channel; closed before the call awaits anything, so that the publish future does not grow | `messaging.system`, `messaging.operation.type` = `send`, `messaging.operation.name` = `publish`, `messaging.destination.name` (the exchange, empty for the default one), `messaging.rabbitmq.destination.routing_key`, `messaging.message.body.size`, `messaging.message.id` and `messaging.message.conversation_id` (correlation id) when set |
//! | `receive` | from a delivery's hand-over to the application until the last clone of it drops, child of its channel | the same, with `messaging.operation.type` = `receive`, `messaging.operation.name` = `deliver` or `get`, `messaging.rabbitmq.message.delivery_tag` |
//! | `settle` | one `ack`, `nack` or `reject`, child of its channel | `messaging.system`, `messaging.operation.type` = `settle`, `messaging.operation.name` = `ack`, `nack` or `reject`, `messaging.rabbitmq.message.delivery_tag` |
//!
//! A consumer continues the publisher's trace through the message's W3C
//! trace context headers: see [`trace_context`](crate::trace_context).

use crate::protocol::ShortString;

#[cfg(feature = "metrics")]
mod enabled;
#[cfg(feature = "metrics")]
pub use enabled::describe;
#[cfg(feature = "metrics")]
pub(crate) use enabled::*;

#[cfg(not(feature = "metrics"))]
mod disabled;
#[cfg(not(feature = "metrics"))]
pub(crate) use disabled::*;

/// Where a delivery came from, as its span records it (the consumer's
/// `Envelope` by reference: this module imports no handle's module).
/// References to the `ShortString`s, not `&str`s: `ShortString::as_str`
/// checks UTF-8, a loop the compiler keeps even when nothing reads its
/// result (callgrind: with `&str`s the feature-off consume path ran it
/// three times per delivery).
#[derive(Clone, Copy)]
pub(crate) struct Received<'a> {
    /// Empty for `basic.get`.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub consumer_tag: &'a ShortString,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub exchange: &'a ShortString,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub routing_key: &'a ShortString,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub delivery_tag: u64,
}

/// How the application settled a delivery (the settle metrics' and span's kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    Ack,
    Nack,
    Reject,
}
