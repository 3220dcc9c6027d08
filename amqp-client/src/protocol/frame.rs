//! The frame codec: method, content header, content body and heartbeat frames.
//!
//! Decoding follows tokio-util's `Decoder` contract: `Ok(None)` asks for more
//! bytes, `Ok(Some(frame))` consumes exactly one frame, `Err` means the stream
//! is corrupt. A frame's size is checked against frame_max before any room is
//! reserved for it, no more than `RESERVE_AHEAD` is reserved before its
//! bytes arrive, and payloads are handed out as slices of the read buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::protocol::constants::{
    FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_MIN_SIZE,
};
use crate::protocol::error::{DecodeError, FrameError};
use crate::protocol::method_info::MethodId;
use crate::protocol::methods::{basic, Method};
use crate::protocol::properties::BasicProperties;
use crate::protocol::received_properties::{Checked, ReceivedProperties};
use crate::protocol::wire;

/// Bytes of framing around a payload: type, channel, size, and the end octet.
pub const FRAME_OVERHEAD: usize = 8;

/// The `basic` class id, the only class with content in 0-9-1.
const BASIC_CLASS_ID: u16 = 60;

/// The payload of a content header frame.
///
/// ```
/// use amqp091::protocol::frame::{self, ContentHeader, Frame, FrameDecoder};
/// use amqp091::BasicProperties;
/// use bytes::BytesMut;
///
/// let mut wire = BytesMut::new();
/// let properties = BasicProperties::default().with_content_type("text/plain");
/// frame::write_header(&mut wire, 1, 5, &properties);
///
/// let Some(Frame::Header { header, .. }) = FrameDecoder::default().decode(&mut wire)? else {
///     panic!("a header frame");
/// };
/// let ContentHeader { class_id, body_size, properties } = header;
/// assert_eq!((class_id, body_size), (60, 5));
/// assert_eq!(properties.content_type.as_ref().unwrap(), "text/plain");
/// # Ok::<(), amqp091::protocol::FrameError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContentHeader {
    /// The class of the method the content belongs to (always `basic`, 60).
    pub class_id: u16,
    /// Total size of the body frames that follow.
    pub body_size: u64,
    /// The message properties: checked, built on first access.
    pub properties: ReceivedProperties,
}

/// One decoded frame. Its `Debug` shows a body frame's length, not its
/// bytes: the I/O task traces every frame, and message bodies (the
/// application's data) must never reach a log.
///
/// ```
/// use amqp091::protocol::frame::{self, Frame, FrameDecoder};
/// use amqp091::protocol::methods::basic;
/// use amqp091::BasicProperties;
/// use bytes::BytesMut;
///
/// let mut wire = BytesMut::new();
/// let publish = basic::Publish { routing_key: "jobs".into(), ..Default::default() };
/// frame::write_publish(&mut wire, 1, &publish, &BasicProperties::default(), b"hello", 131_072);
///
/// let mut decoder = FrameDecoder::new(131_072);
/// let mut seen = Vec::new();
/// while let Some(frame) = decoder.decode(&mut wire)? {
///     seen.push(match frame {
///         Frame::Method { method, .. } => method.info().name.to_owned(),
///         Frame::Header { header, .. } => format!("header of a {}-byte body", header.body_size),
///         Frame::Body { payload, .. } => format!("{} body bytes", payload.len()),
///         Frame::Heartbeat => "heartbeat".to_owned(),
///     });
/// }
/// assert_eq!(seen, ["basic.publish", "header of a 5-byte body", "5 body bytes"]);
/// # Ok::<(), amqp091::protocol::FrameError>(())
/// ```
#[derive(Clone, PartialEq)]
pub enum Frame {
    /// A method frame.
    Method {
        /// Channel number (0 for the connection).
        channel: u16,
        /// The method.
        method: Method,
    },
    /// A content header frame.
    Header {
        /// Channel number.
        channel: u16,
        /// The header.
        header: ContentHeader,
    },
    /// A content body frame, a slice of the read buffer.
    Body {
        /// Channel number.
        channel: u16,
        /// The body bytes of this frame.
        payload: Bytes,
    },
    /// A heartbeat (always channel 0).
    Heartbeat,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Frame::Method { channel, method } => f
                .debug_struct("Method")
                .field("channel", channel)
                .field("method", method)
                .finish(),
            Frame::Header { channel, header } => f
                .debug_struct("Header")
                .field("channel", channel)
                .field("header", header)
                .finish(),
            Frame::Body { channel, payload } => f
                .debug_struct("Body")
                .field("channel", channel)
                .field("payload", &BodyLen(payload.len()))
                .finish(),
            Frame::Heartbeat => f.write_str("Heartbeat"),
        }
    }
}

/// Stands for a message body in `Debug` output: `<N bytes>`. Every type that
/// holds a body prints it through this, so that no log record, panic or
/// error message the library builds from one can carry the body itself.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyLen(pub usize);

impl std::fmt::Debug for BodyLen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

impl Frame {
    /// The channel the frame belongs to.
    pub fn channel(&self) -> u16 {
        match self {
            Frame::Method { channel, .. }
            | Frame::Header { channel, .. }
            | Frame::Body { channel, .. } => *channel,
            Frame::Heartbeat => 0,
        }
    }
}

/// Room a partly received frame gets reserved in the read buffer at most,
/// ahead of its bytes. A frame at RabbitMQ's default frame_max (128 KiB) is
/// read into room made once; a larger one grows the buffer as its bytes
/// come. The announced size alone is not trusted with an allocation: with
/// no frame_max negotiated (`u32::MAX`), a 7-byte prefix could ask for 4 GiB.
const RESERVE_AHEAD: usize = 1 << 20;

/// The channel, payload size and whole size of the frame whose 7-byte
/// prefix starts `buf` (which holds at least that).
#[inline(always)]
fn prefix(buf: &[u8]) -> (u16, u32, u64) {
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
    (
        u16::from_be_bytes([buf[1], buf[2]]),
        size,
        u64::from(size) + FRAME_OVERHEAD as u64,
    )
}

/// Decodes frames from a read buffer, enforcing a frame size limit.
///
/// `Ok(None)` asks for more bytes; a whole frame is taken off the buffer's front:
///
/// ```
/// use amqp091::protocol::frame::{self, Frame, FrameDecoder};
/// use bytes::BytesMut;
///
/// let mut wire = BytesMut::new();
/// frame::write_heartbeat(&mut wire);
///
/// let mut decoder = FrameDecoder::new(131_072);
/// let mut read = BytesMut::from(&wire[..5]);
/// assert_eq!(decoder.decode(&mut read)?, None);
/// read.extend_from_slice(&wire[5..]);
/// assert_eq!(decoder.decode(&mut read)?, Some(Frame::Heartbeat));
/// assert!(read.is_empty());
/// # Ok::<(), amqp091::protocol::FrameError>(())
/// ```
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame_size: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(FRAME_MIN_SIZE)
    }
}

impl FrameDecoder {
    /// A decoder that rejects frames larger than `max_frame_size` bytes (framing
    /// included); values below the spec's 4096 minimum are raised to it.
    pub fn new(max_frame_size: u32) -> Self {
        Self {
            max_frame_size: max_frame_size.max(FRAME_MIN_SIZE),
        }
    }

    /// The current limit.
    pub fn max_frame_size(&self) -> u32 {
        self.max_frame_size
    }

    /// Changes the limit (after tune negotiation).
    pub fn set_max_frame_size(&mut self, max_frame_size: u32) {
        self.max_frame_size = max_frame_size.max(FRAME_MIN_SIZE);
    }

    /// The channel and payload size of the body frame that starts `buf`, if
    /// its 7-byte prefix is there but not all of its payload and end; `None`
    /// for any other frame, or one over the size limit (which
    /// [`decode`](Self::decode) reports).
    pub fn partial_body(&self, buf: &[u8]) -> Option<(u16, usize)> {
        if buf.len() < 7 || buf[0] != FRAME_BODY {
            return None;
        }
        let (channel, size, total) = prefix(buf);
        if total > u64::from(self.max_frame_size) || buf.len() as u64 >= total {
            return None;
        }
        Some((channel, size as usize))
    }

    /// Takes one frame off the front of `buf`, if a whole one is there.
    #[inline]
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < 7 {
            return Ok(None);
        }
        let frame_type = buf[0];
        let (channel, size, total) = prefix(buf);
        if total > u64::from(self.max_frame_size) {
            return Err(FrameError::TooLarge {
                size: total,
                max: self.max_frame_size,
                channel,
            });
        }
        if !matches!(
            frame_type,
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
        ) {
            return Err(FrameError::UnknownFrameType {
                frame_type,
                channel,
            });
        }
        // `total` ≤ max_frame_size ≤ u32::MAX, so this fits a usize.
        let total = total as usize;
        if buf.len() < total {
            buf.reserve((total - buf.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        let end = buf[total - 1];
        if end != FRAME_END {
            return Err(FrameError::BadFrameEnd {
                found: end,
                channel,
            });
        }
        let frame = match frame_type {
            // Bodies are handed out as slices of the read buffer, uncopied.
            FRAME_BODY => {
                let mut payload = buf.split_to(total).freeze();
                payload.advance(7);
                payload.truncate(size as usize);
                Frame::Body { channel, payload }
            }
            FRAME_HEADER => {
                let parsed = parse_header_in_place(&buf[7..total - 1])
                    .map_err(|source| FrameError::Header { channel, source })?;
                let (class_id, body_size, checked) = parsed;
                let list_start = 7 + HEADER_PREFIX;
                let properties = match checked {
                    // A long list stays in the read buffer, like a body.
                    Checked::Encoded { len } if !ReceivedProperties::fits_inline(len) => {
                        let frame = buf.split_to(total).freeze();
                        ReceivedProperties::from_checked_shared(
                            frame.slice(list_start..list_start + len),
                        )
                    }
                    checked => {
                        let properties =
                            ReceivedProperties::from_checked(checked, &buf[list_start..total]);
                        buf.advance(total);
                        properties
                    }
                };
                Frame::Header {
                    channel,
                    header: ContentHeader {
                        class_id,
                        body_size,
                        properties,
                    },
                }
            }
            // Methods are parsed in place: their strings are small and
            // copied out, so the buffer is never shared for them.
            _ => {
                let frame = parse_in_place(frame_type, channel, &buf[7..total - 1]);
                buf.advance(total);
                frame?
            }
        };
        Ok(Some(frame))
    }
}

#[inline]
fn parse_in_place(frame_type: u8, channel: u16, mut payload: &[u8]) -> Result<Frame, FrameError> {
    match frame_type {
        FRAME_METHOD => {
            let method =
                decode_method(&mut payload).map_err(|(method, source)| FrameError::Method {
                    channel,
                    method,
                    source,
                })?;
            Ok(Frame::Method { channel, method })
        }
        _ => {
            if channel != 0 {
                return Err(FrameError::HeartbeatOnChannel { channel });
            }
            Ok(Frame::Heartbeat)
        }
    }
}

fn trailing(buf: &[u8]) -> Result<(), DecodeError> {
    if !buf.is_empty() {
        return Err(DecodeError::TrailingBytes {
            count: buf.len() as u32,
        });
    }
    Ok(())
}

/// Decodes a method frame's payload (class id, method id, arguments).
#[inline]
pub fn decode_method(
    payload: &mut wire::Input<'_>,
) -> Result<Method, (Option<MethodId>, DecodeError)> {
    let class_id = wire::read_u16(payload).map_err(|e| (None, e))?;
    let method_id = wire::read_u16(payload).map_err(|e| (None, e))?;
    let id = MethodId::new(class_id, method_id);
    let method = Method::decode_args(id, payload).map_err(|e| (Some(id), e))?;
    trailing(payload).map_err(|e| (Some(id), e))?;
    Ok(method)
}

/// Class id, weight and body size before a header's property list.
const HEADER_PREFIX: usize = 12;

/// Reads a content header's class, weight and body size.
#[inline]
fn parse_header_prefix(payload: &mut wire::Input<'_>) -> Result<(u16, u64), DecodeError> {
    let class_id = wire::read_u16(payload)?;
    if class_id != BASIC_CLASS_ID {
        return Err(DecodeError::HeaderClass(class_id));
    }
    let _weight = wire::read_u16(payload)?;
    let body_size = wire::read_u64(payload)?;
    Ok((class_id, body_size))
}

/// Checks a content header frame's payload: the class, the body size and the
/// property list, which is only built when it holds a table.
#[inline]
fn parse_header_in_place(mut payload: &[u8]) -> Result<(u16, u64, Checked), DecodeError> {
    let (class_id, body_size) = parse_header_prefix(&mut payload)?;
    let checked = ReceivedProperties::check(&mut payload)?;
    trailing(payload)?;
    Ok((class_id, body_size, checked))
}

/// Decodes a content header frame's payload (outside the frame decoder, which
/// keeps long property lists in its read buffer instead of copying them).
pub fn decode_header(payload: &mut wire::Input<'_>) -> Result<ContentHeader, DecodeError> {
    let (class_id, body_size) = parse_header_prefix(payload)?;
    let properties = ReceivedProperties::decode(payload)?;
    *payload = &[];
    Ok(ContentHeader {
        class_id,
        body_size,
        properties,
    })
}

/// Writes a frame whose payload `body` writes, filling in the size after.
#[inline]
fn write_frame(buf: &mut BytesMut, frame_type: u8, channel: u16, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(frame_type);
    buf.put_u16(channel);
    let size_at = buf.len();
    buf.put_u32(0);
    body(buf);
    let size = (buf.len() - size_at - 4) as u32;
    buf[size_at..size_at + 4].copy_from_slice(&size.to_be_bytes());
    buf.put_u8(FRAME_END);
}

/// Writes a method frame.
#[inline]
pub fn write_method(buf: &mut BytesMut, channel: u16, method: &Method) {
    write_method_frame(buf, channel, method.info().id, |buf| {
        method.encode_args(buf)
    });
}

/// Writes a method frame: the ids, then the arguments `args` writes (a
/// method struct's `encode_args`), without building a [`Method`].
#[inline]
pub fn write_method_frame(
    buf: &mut BytesMut,
    channel: u16,
    id: MethodId,
    args: impl FnOnce(&mut BytesMut),
) {
    write_frame(buf, FRAME_METHOD, channel, |buf| {
        buf.put_u16(id.class_id);
        buf.put_u16(id.method_id);
        args(buf);
    });
}

/// Writes a content header frame.
#[inline]
pub fn write_header(
    buf: &mut BytesMut,
    channel: u16,
    body_size: u64,
    properties: &BasicProperties,
) {
    write_frame(buf, FRAME_HEADER, channel, |buf| {
        buf.put_u16(BASIC_CLASS_ID);
        buf.put_u16(0);
        buf.put_u64(body_size);
        properties.encode(buf);
    });
}

/// Writes `body` as body frames of at most `frame_max − 8` payload bytes each;
/// an empty body writes nothing.
#[inline]
pub fn write_body(buf: &mut BytesMut, channel: u16, body: &[u8], frame_max: u32) {
    let chunk = (frame_max.max(FRAME_MIN_SIZE) as usize) - FRAME_OVERHEAD;
    for piece in body.chunks(chunk) {
        buf.reserve(piece.len() + FRAME_OVERHEAD);
        write_body_frame_head(buf, channel, piece.len());
        buf.put_slice(piece);
        write_frame_end(buf);
    }
}

/// Writes what goes before a body frame's payload of `len` bytes; the
/// payload follows (copied in, or passed to the socket from its own buffer:
/// see `FrameSink::splice`), then [`write_frame_end`].
#[inline]
pub(crate) fn write_body_frame_head(buf: &mut BytesMut, channel: u16, len: usize) {
    buf.put_u8(FRAME_BODY);
    buf.put_u16(channel);
    buf.put_u32(len as u32);
}

/// Writes the octet that ends every frame.
#[inline]
pub(crate) fn write_frame_end(buf: &mut BytesMut) {
    buf.put_u8(FRAME_END);
}

/// Writes a `basic.ack` method frame (without building a [`Method`]).
#[inline]
pub fn write_ack(buf: &mut BytesMut, channel: u16, ack: &basic::Ack) {
    write_method_frame(buf, channel, basic::Ack::INFO.id, |buf| {
        ack.encode_args(buf)
    });
}

/// Writes the method frame of a `basic.publish` (without building a [`Method`]).
#[inline]
pub fn write_publish_method(buf: &mut BytesMut, channel: u16, publish: &basic::Publish) {
    write_method_frame(buf, channel, basic::Publish::INFO.id, |buf| {
        publish.encode_args(buf)
    });
}

/// Writes a whole `basic.publish`: method, header and body frames.
#[inline]
pub fn write_publish(
    buf: &mut BytesMut,
    channel: u16,
    publish: &basic::Publish,
    properties: &BasicProperties,
    body: &[u8],
    frame_max: u32,
) {
    write_publish_method(buf, channel, publish);
    write_header(buf, channel, body.len() as u64, properties);
    write_body(buf, channel, body, frame_max);
}

/// Writes a heartbeat frame.
#[inline]
pub fn write_heartbeat(buf: &mut BytesMut) {
    buf.put_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_announced_under_an_unlimited_frame_max_reserves_a_bounded_room() {
        // Found by the machine fuzz target: with no frame_max negotiated,
        // the 7-byte prefix of a 3 GiB frame made the decoder reserve 3 GiB.
        let mut buf = BytesMut::new();
        buf.put_u8(FRAME_BODY);
        buf.put_u16(1);
        buf.put_u32(3 << 30);
        let mut decoder = FrameDecoder::new(u32::MAX);
        assert!(decoder
            .decode(&mut buf)
            .expect("within frame_max")
            .is_none());
        assert!(
            buf.capacity() <= RESERVE_AHEAD + 64,
            "{} bytes reserved ahead of a frame",
            buf.capacity()
        );
        // A frame larger than the room reserved ahead still decodes once
        // its bytes are all there.
        let body = vec![7u8; 3 * RESERVE_AHEAD];
        let mut whole = BytesMut::new();
        write_body(&mut whole, 1, &body, u32::MAX);
        let mut buf = BytesMut::new();
        for piece in whole.chunks(64 * 1024) {
            buf.extend_from_slice(piece);
            if let Some(frame) = decoder.decode(&mut buf).expect("valid") {
                assert!(
                    matches!(frame, Frame::Body { ref payload, .. } if payload[..] == body[..])
                );
                assert!(buf.is_empty());
                return;
            }
        }
        panic!("the whole frame did not decode");
    }
}
