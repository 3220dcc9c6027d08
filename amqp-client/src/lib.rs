//! An AMQP 0-9-1 client for RabbitMQ.
//!
//! The [`protocol`] module is generated from the spec XML (plus hand-written
//! wire primitives and the frame codec).

pub mod protocol;
