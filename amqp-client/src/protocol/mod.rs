//! The protocol layer: everything the AMQP 0-9-1 spec defines as data.
//!
//! The modules under `generated/` are written by `cargo xtask regen` from
//! `spec/`; the rest is hand-written: wire primitives ([`wire`]), the frame
//! codec ([`frame`]), content properties kept encoded until read
//! ([`received_properties`]), errors ([`error`]), method metadata
//! ([`method_info`]) and the RPC primitives the generated `Channel` methods
//! call ([`rpc`]; those methods are generated into the `channel` module,
//! which builds on this one).

// The docs of spec/amqp0-9-1.docs.xml spell out `crate::` paths in links,
// since the same text lands in several modules: see `channel.rs`.
#[rustfmt::skip]
#[allow(
    clippy::all,
    clippy::pedantic,
    unused_imports,
    rustdoc::redundant_explicit_links
)]
mod generated {
    //! Written by `cargo xtask regen`; see `codegen/`.
    /// Protocol version, frame constants and reply codes.
    pub mod constants;
    /// One struct per method and the [`Method`](methods::Method) enum.
    pub mod methods;
    /// Content header properties.
    pub mod properties;
}

pub mod error;
pub mod frame;
pub mod method_info;
pub mod received_properties;
pub mod rpc;
pub mod wire;

pub use error::{DecodeError, FrameError, ValueKind};
pub use frame::{ContentHeader, Frame, FrameDecoder};
pub use generated::constants::{self, ReplyCode, ReplyError, ReplyKind};
pub use generated::methods::{self, *};
pub use generated::properties::{self, BasicProperties};
pub use method_info::{Direction, FieldInfo, MethodId, MethodInfo, WireKind};
pub use received_properties::ReceivedProperties;
pub use rpc::{ChannelRpc, UnexpectedReply};
pub use wire::{BadField, Decimal, FieldTable, FieldValue, ShortString, ShortStringTooLong};
