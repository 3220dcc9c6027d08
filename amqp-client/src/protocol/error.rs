//! Errors of the protocol layer, in two tiers: [`DecodeError`] says what was
//! wrong with a run of bytes; [`FrameError`] adds where (frame type, channel,
//! method). Both map to the spec's reply code for the connection.close that a
//! peer sends when it receives such bytes.

use thiserror::Error;

use crate::protocol::constants::ReplyCode;
use crate::protocol::method_info::MethodId;

/// The kind of value a decoder was reading, named by
/// [`DecodeError::Truncated`].
///
/// ```
/// use amqp091::protocol::{DecodeError, ReceivedProperties, ValueKind};
///
/// // A content-type of 10 bytes announced, 3 present.
/// let error = ReceivedProperties::decode(&[0x80, 0x00, 10, b'a', b'b', b'c']).unwrap_err();
/// assert!(matches!(error, DecodeError::Truncated { what: ValueKind::ShortStr, .. }));
/// assert_eq!(ValueKind::ShortStr.to_string(), "shortstr");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueKind {
    /// u8.
    Octet,
    /// u16.
    Short,
    /// u32.
    Long,
    /// u64.
    LongLong,
    /// A short string.
    ShortStr,
    /// A long string.
    LongStr,
    /// A field table.
    Table,
    /// A field array.
    Array,
}

impl std::fmt::Display for ValueKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ValueKind::Octet => "octet",
            ValueKind::Short => "short",
            ValueKind::Long => "long",
            ValueKind::LongLong => "longlong",
            ValueKind::ShortStr => "shortstr",
            ValueKind::LongStr => "longstr",
            ValueKind::Table => "table",
            ValueKind::Array => "array",
        })
    }
}

/// What was wrong with the bytes of a method, header or table. Small (12
/// bytes) on purpose: decoders return it in every `Result`, and a large
/// error type slows the hot path that never fails.
///
/// ```
/// use amqp091::protocol::{DecodeError, ReceivedProperties, ReplyCode};
///
/// // Property flags with a bit the basic class does not define.
/// let error = ReceivedProperties::decode(&[0x00, 0x01]).unwrap_err();
/// assert_eq!(error, DecodeError::UnknownPropertyFlags(1));
/// assert_eq!(error.reply_code(), ReplyCode::SYNTAX_ERROR);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload ended inside a value.
    #[error("truncated {what}: {needed} more bytes needed, {available} left")]
    Truncated {
        /// The value being read.
        what: ValueKind,
        /// Bytes the value needs.
        needed: u32,
        /// Bytes that were left.
        available: u32,
    },
    /// Bytes were left over after the last field.
    #[error("{count} unexpected bytes after the last field")]
    TrailingBytes {
        /// How many.
        count: u32,
    },
    /// A class/method pair the spec does not define.
    #[error("unknown method {0}")]
    UnknownMethod(MethodId),
    /// A field-table value type letter RabbitMQ does not use.
    #[error("unknown field value type 0x{0:02x}")]
    UnknownFieldType(u8),
    /// Property flags announce properties the class does not have.
    #[error("unknown property flags 0x{0:04x}")]
    UnknownPropertyFlags(u16),
    /// Tables or arrays nested deeper than [`crate::protocol::wire::MAX_NESTING`].
    #[error("field tables nested deeper than {0} levels")]
    NestingTooDeep(u16),
    /// A content header for a class that has no content.
    #[error("content header for class {0}, which has no content")]
    HeaderClass(u16),
}

impl DecodeError {
    /// The reply code a peer closes the connection with on such input.
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            DecodeError::UnknownMethod(_) => ReplyCode::COMMAND_INVALID,
            DecodeError::HeaderClass(_) => ReplyCode::FRAME_ERROR,
            _ => ReplyCode::SYNTAX_ERROR,
        }
    }
}

/// A frame that cannot be accepted, with where it was found: what a
/// [`FrameDecoder`](crate::protocol::FrameDecoder) fails with, and inside
/// [`Error::Protocol`](crate::Error::Protocol).
///
/// ```
/// use amqp091::protocol::{FrameDecoder, FrameError, ReplyCode};
/// use bytes::BytesMut;
///
/// // A heartbeat frame on channel 3 whose last octet is not the frame end.
/// let mut read = BytesMut::from(&[8, 0, 3, 0, 0, 0, 0, 0x00][..]);
/// let error = FrameDecoder::default().decode(&mut read).unwrap_err();
/// assert_eq!(error, FrameError::BadFrameEnd { found: 0x00, channel: 3 });
/// assert_eq!((error.channel(), error.reply_code()), (3, ReplyCode::FRAME_ERROR));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame type octet is not method, header, body or heartbeat.
    #[error("unknown frame type {frame_type} on channel {channel}")]
    UnknownFrameType {
        /// The octet.
        frame_type: u8,
        /// Its channel.
        channel: u16,
    },
    /// The frame's size exceeds the negotiated frame_max.
    #[error("frame of {size} bytes on channel {channel} exceeds frame_max {max}")]
    TooLarge {
        /// Frame size including its 8 bytes of framing.
        size: u64,
        /// The limit.
        max: u32,
        /// Its channel.
        channel: u16,
    },
    /// The octet after the payload is not 0xCE.
    #[error("frame on channel {channel} ends with 0x{found:02x} instead of 0xce")]
    BadFrameEnd {
        /// The octet found.
        found: u8,
        /// Its channel.
        channel: u16,
    },
    /// A heartbeat frame on a channel other than 0.
    #[error("heartbeat frame on channel {channel}")]
    HeartbeatOnChannel {
        /// Its channel.
        channel: u16,
    },
    /// A method frame whose payload does not decode.
    #[error("bad method frame on channel {channel}{}: {source}", method.map(|m| format!(" ({m})")).unwrap_or_default())]
    Method {
        /// Its channel.
        channel: u16,
        /// The method, when its ids could be read.
        method: Option<MethodId>,
        /// What was wrong.
        source: DecodeError,
    },
    /// A content header frame whose payload does not decode.
    #[error("bad content header frame on channel {channel}: {source}")]
    Header {
        /// Its channel.
        channel: u16,
        /// What was wrong.
        source: DecodeError,
    },
}

impl FrameError {
    /// The reply code a peer closes the connection with on such a frame.
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            FrameError::Method { source, .. } | FrameError::Header { source, .. } => {
                source.reply_code()
            }
            // 0-9-1 §4.2.7: an invalid heartbeat frame is a frame error.
            _ => ReplyCode::FRAME_ERROR,
        }
    }

    /// The channel the frame was on.
    pub fn channel(&self) -> u16 {
        match self {
            FrameError::UnknownFrameType { channel, .. }
            | FrameError::TooLarge { channel, .. }
            | FrameError::BadFrameEnd { channel, .. }
            | FrameError::HeartbeatOnChannel { channel }
            | FrameError::Method { channel, .. }
            | FrameError::Header { channel, .. } => *channel,
        }
    }
}
