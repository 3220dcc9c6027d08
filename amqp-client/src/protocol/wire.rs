//! Wire primitives: short and long strings, field tables and values, and the
//! readers and writers the generated codecs call. Every read checks the bytes
//! that are left before it takes any; nothing is allocated for a length the
//! input does not actually contain.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::protocol::error::{DecodeError, ValueKind};

/// How deeply tables and arrays may nest before a decode fails, so that a
/// hostile peer cannot exhaust the stack with recursion.
pub const MAX_NESTING: u16 = 64;

/// A string longer than the 255 bytes an AMQP `shortstr` can carry.
///
/// ```
/// use amqp091::ShortString;
///
/// let refused = ShortString::new("q".repeat(300)).unwrap_err();
/// assert_eq!(refused.len, 300);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("a shortstr holds at most 255 bytes, this one has {len}")]
pub struct ShortStringTooLong {
    /// Length in bytes.
    pub len: usize,
}

/// A shortstr argument or property that cannot be sent as it is, found
/// when a method or a message's properties were checked before being
/// encoded.
///
/// ```
/// use amqp091::protocol::{queue, BadField};
///
/// let declare = queue::Declare { queue: "q".repeat(256).into(), ..Default::default() };
/// assert_eq!(declare.check_short_strings(), Err(BadField::TooLong { field: "queue", len: 256 }));
/// let declare = queue::Declare { queue: b"caf\xe9".as_slice().into(), ..Default::default() };
/// assert_eq!(declare.check_short_strings(), Err(BadField::NotUtf8 { field: "queue" }));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BadField {
    /// Over the 255 bytes of a shortstr.
    #[error("`{field}` is {len} bytes, over the 255 a shortstr can carry")]
    TooLong {
        /// The field's spec name (`queue`, `routing-key`, `message-id`…). For
        /// a table (`arguments`, `headers`) one of its keys is too long.
        field: &'static str,
        /// The length in bytes of the string (or table key) that is too long.
        len: usize,
    },
    /// A method's shortstr argument that is not UTF-8. The wire allows any
    /// bytes, but RabbitMQ closes the whole connection (501 `FRAME_ERROR`,
    /// "Malformed UTF-8 in shortstr") on such a method, and a recovered
    /// connection would replay it; so it is refused before it is sent.
    /// Properties and table keys may be any bytes: RabbitMQ passes them on
    /// unchanged.
    #[error("`{field}` is not UTF-8, which RabbitMQ refuses in a method's arguments")]
    NotUtf8 {
        /// The field's spec name (`routing-key`, `consumer-tag`…).
        field: &'static str,
    },
}

/// An AMQP `shortstr`: at most 255 bytes on the wire, kept exactly as the
/// peer sent them.
///
/// AMQP does not require a short string to be UTF-8, and other clients do
/// send routing keys, consumer tags and header keys that are not. So a
/// received short string is never altered: it compares, hashes and is sent
/// back byte for byte. Reading it as text is explicit: [`to_str`](Self::to_str)
/// fails on bytes that are not UTF-8, [`to_string_lossy`](Self::to_string_lossy)
/// replaces them, and [`as_bytes`](Self::as_bytes) gives them as they are.
/// `Display` writes the lossy form.
///
/// Made from `&str`, `String`, `&[u8]` or `Vec<u8>` with `.into()`, which
/// never fails: a value over 255 bytes is refused when the method or message
/// that carries it is sent ([`Error::NameTooLong`](crate::Error::NameTooLong),
/// nothing sent). Use [`ShortString::new`] to have the length checked at once.
///
/// ```
/// use amqp091::ShortString;
///
/// let queue: ShortString = "jobs".into();
/// let tag: ShortString = format!("worker-{}", 7).into();
/// assert_eq!(queue, "jobs");
/// assert_eq!(tag.to_str(), Ok("worker-7"));
/// assert!(ShortString::new("x".repeat(256)).is_err());
///
/// // A routing key another client sent as Latin-1 keeps its bytes.
/// let key = ShortString::from(&b"caf\xe9"[..]);
/// assert_eq!(key.as_bytes(), b"caf\xe9");
/// assert!(key.to_str().is_err());
/// assert_eq!(key.to_string_lossy(), "caf\u{fffd}");
/// ```
#[derive(Clone)]
pub struct ShortString(Repr);

/// Inline capacity: the length byte and the bytes fill 32 bytes, the size of
/// the whole type.
const INLINE: usize = 31;

#[derive(Clone)]
enum Repr {
    Inline(Inline),
    Static(&'static str),
    Heap(Arc<[u8]>),
}

/// An inline string laid out as it is on the wire: the length byte, then the
/// bytes. [`Repr`]'s tag lives in the length byte's unused values, so the
/// type holds 31 bytes in 32, and decoding one is a copy of 32 bytes of the
/// frame as they are.
#[derive(Clone)]
#[repr(C)]
struct Inline {
    len: InlineLen,
    /// `data[..len]` is the value; bytes after it are unspecified (decoding
    /// copies a fixed-size window of the frame).
    data: [u8; INLINE],
}

impl Inline {
    #[inline(always)]
    fn bytes(&self) -> &[u8] {
        // `len` is at most `INLINE` by its type.
        &self.data[..self.len as usize]
    }

    /// Whether the bytes are ASCII, tested as two overlapping 16-byte words
    /// of `data` with the bytes past the value masked off (no per-byte loop).
    #[inline(always)]
    fn is_ascii(&self) -> bool {
        const HIGH_BITS: u128 = u128::from_ne_bytes([0x80; 16]);
        fn first_bytes(n: usize) -> u128 {
            match n {
                0 => 0,
                1..=15 => (1u128 << (n * 8)) - 1,
                _ => u128::MAX,
            }
        }
        let len = self.len as usize;
        let head = u128::from_le_bytes(self.data[..16].try_into().unwrap_or_default());
        let tail = u128::from_le_bytes(self.data[15..].try_into().unwrap_or_default());
        let head = head & first_bytes(len);
        // `data[15..len]`: byte 15 again, harmless.
        let tail = tail & first_bytes(len.saturating_sub(15));
        (head | tail) & HIGH_BITS == 0
    }
}

/// 0 to 31: the values above are free for [`Repr`]'s tag.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[rustfmt::skip]
enum InlineLen {
    L0, L1, L2, L3, L4, L5, L6, L7, L8, L9, L10, L11, L12, L13, L14, L15,
    L16, L17, L18, L19, L20, L21, L22, L23, L24, L25, L26, L27, L28, L29, L30, L31,
}

impl InlineLen {
    #[inline(always)]
    #[rustfmt::skip]
    fn new(len: usize) -> Option<Self> {
        use InlineLen::*;
        Some(match len {
            0 => L0, 1 => L1, 2 => L2, 3 => L3, 4 => L4, 5 => L5, 6 => L6, 7 => L7,
            8 => L8, 9 => L9, 10 => L10, 11 => L11, 12 => L12, 13 => L13, 14 => L14,
            15 => L15, 16 => L16, 17 => L17, 18 => L18, 19 => L19, 20 => L20, 21 => L21,
            22 => L22, 23 => L23, 24 => L24, 25 => L25, 26 => L26, 27 => L27, 28 => L28,
            29 => L29, 30 => L30, 31 => L31,
            _ => return None,
        })
    }
}

impl Default for ShortString {
    fn default() -> Self {
        Self(Repr::Static(""))
    }
}

impl ShortString {
    /// The longest `shortstr` in bytes.
    pub const MAX_LEN: usize = 255;

    /// Checks the length and wraps `value` (text or bytes).
    pub fn new(value: impl AsRef<[u8]>) -> Result<Self, ShortStringTooLong> {
        let bytes = value.as_ref();
        if bytes.len() > Self::MAX_LEN {
            return Err(ShortStringTooLong { len: bytes.len() });
        }
        Ok(Self::from_slice(bytes))
    }

    /// Wraps a static string without copying it. Like `.into()`, a text
    /// over 255 bytes is refused only when it is sent.
    pub const fn from_static(text: &'static str) -> Self {
        Self(Repr::Static(text))
    }

    /// Whether it fits the 255 bytes of the wire; sending checks it.
    #[inline(always)]
    pub fn check(&self) -> Result<(), ShortStringTooLong> {
        let len = match &self.0 {
            // At most 31 by its type.
            Repr::Inline(_) => return Ok(()),
            Repr::Static(text) => text.len(),
            Repr::Heap(bytes) => bytes.len(),
        };
        if len > Self::MAX_LEN {
            return Err(ShortStringTooLong { len });
        }
        Ok(())
    }

    /// Wraps `bytes` of any length (inline when they fit).
    fn from_slice(bytes: &[u8]) -> Self {
        match InlineLen::new(bytes.len()) {
            Some(len) => {
                let mut data = [0; INLINE];
                data[..bytes.len()].copy_from_slice(bytes);
                Self(Repr::Inline(Inline { len, data }))
            }
            None => Self(Repr::Heap(Arc::from(bytes))),
        }
    }

    /// Whether the bytes are UTF-8 text, as RabbitMQ requires of a method's
    /// shortstr arguments.
    #[inline]
    pub fn is_utf8(&self) -> bool {
        match &self.0 {
            Repr::Static(_) => true,
            // Checked on every publish's exchange and routing key: the usual
            // short ASCII one without a call.
            Repr::Inline(inline) => {
                inline.is_ascii() || std::str::from_utf8(inline.bytes()).is_ok()
            }
            Repr::Heap(bytes) => std::str::from_utf8(bytes).is_ok(),
        }
    }

    /// The value as text, or the error saying where it stops being UTF-8.
    pub fn to_str(&self) -> Result<&str, std::str::Utf8Error> {
        match &self.0 {
            Repr::Static(text) => Ok(text),
            _ => std::str::from_utf8(self.as_bytes()),
        }
    }

    /// The value as text, with each run of bytes that is not UTF-8 replaced
    /// by U+FFFD (borrowed when it is all UTF-8).
    pub fn to_string_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.as_bytes())
    }

    /// The bytes, exactly as received or given.
    #[inline(always)]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline(inline) => inline.bytes(),
            Repr::Static(text) => text.as_bytes(),
            Repr::Heap(bytes) => bytes,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads a `shortstr` (length byte, bytes) off the front of `buf`.
    #[inline(always)]
    fn read(buf: &mut Input<'_>) -> Result<Self, DecodeError> {
        // The common case: a string of up to 31 bytes with at least 32 bytes
        // of input from its length byte on, taken as one fixed-size window.
        if let Some(window) = buf.first_chunk::<{ INLINE + 1 }>() {
            if let Some(inline_len) = InlineLen::new(usize::from(window[0])) {
                *buf = &buf[1 + inline_len as usize..];
                return Ok(Self::from_window(window, inline_len));
            }
        }
        let len = usize::from(read_u8(buf)?);
        let bytes = take(buf, len, ValueKind::ShortStr)?;
        // The last field of a frame has fewer than 32 bytes after it.
        Ok(match InlineLen::new(len) {
            Some(inline_len) => Self::from_window(&window_of(bytes), inline_len),
            None => Self(Repr::Heap(Arc::from(bytes))),
        })
    }

    /// An inline string from the wire bytes `window` (the length byte, the
    /// value, then anything), whose first byte is `len`.
    #[inline(always)]
    fn from_window(window: &[u8; INLINE + 1], len: InlineLen) -> Self {
        let data = window[1..].try_into().unwrap_or([0; INLINE]);
        Self(Repr::Inline(Inline { len, data }))
    }
}

/// The wire bytes of a short string of at most 31 bytes (the length byte,
/// the value, zeros after it), assembled in two 128-bit registers from loads
/// that stay within `text`. A byte-wise copy into a stack buffer followed by
/// wide reads of it stalls on store forwarding, which cost more than this.
#[inline(always)]
fn window_of(text: &[u8]) -> [u8; INLINE + 1] {
    let len = text.len().min(INLINE);
    // The text as a little-endian number of up to 248 bits, in two halves.
    let (low, high): (u128, u128) = match len {
        0 => (0, 0),
        1..=3 => {
            let (first, middle, last) = (text[0], text[len / 2], text[len - 1]);
            let low = u128::from(first)
                | u128::from(middle) << (8 * (len / 2))
                | u128::from(last) << (8 * (len - 1));
            (low, 0)
        }
        4..=7 => {
            let first = u32::from_le_bytes(text[..4].try_into().unwrap_or_default());
            let last = u32::from_le_bytes(text[len - 4..len].try_into().unwrap_or_default());
            (u128::from(first) | u128::from(last) << (8 * (len - 4)), 0)
        }
        8..=15 => {
            let first = u64::from_le_bytes(text[..8].try_into().unwrap_or_default());
            let last = u64::from_le_bytes(text[len - 8..len].try_into().unwrap_or_default());
            (u128::from(first) | u128::from(last) << (8 * (len - 8)), 0)
        }
        _ => {
            let first = u128::from_le_bytes(text[..16].try_into().unwrap_or_default());
            let last = u128::from_le_bytes(text[len - 16..len].try_into().unwrap_or_default());
            let shift = 8 * (len - 16) as u32;
            let carried = last.checked_shr(128 - shift).unwrap_or(0);
            (first | last << shift, carried)
        }
    };
    // Shift in the length byte.
    let word0 = (low << 8) | len as u128;
    let word1 = (high << 8) | (low >> 120);
    let mut window = [0; INLINE + 1];
    window[..16].copy_from_slice(&word0.to_le_bytes());
    window[16..].copy_from_slice(&word1.to_le_bytes());
    window
}

impl PartialEq for ShortString {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for ShortString {}

impl std::hash::Hash for ShortString {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialOrd for ShortString {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ShortString {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Debug for ShortString {
    /// Text in quotes, as `str` shows it; bytes that are not UTF-8 as a byte
    /// string literal (`b"caf\xe9"`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_str() {
            Ok(text) => fmt::Debug::fmt(text, f),
            Err(_) => write!(f, "b\"{}\"", self.as_bytes().escape_ascii()),
        }
    }
}

impl fmt::Display for ShortString {
    /// The lossy text ([`ShortString::to_string_lossy`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.as_bytes().utf8_chunks() {
            f.write_str(chunk.valid())?;
            if !chunk.invalid().is_empty() {
                f.write_str("\u{fffd}")?;
            }
        }
        Ok(())
    }
}

impl AsRef<[u8]> for ShortString {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq<str> for ShortString {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for ShortString {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<[u8]> for ShortString {
    fn eq(&self, other: &[u8]) -> bool {
        self.as_bytes() == other
    }
}

impl PartialEq<&[u8]> for ShortString {
    fn eq(&self, other: &&[u8]) -> bool {
        self.as_bytes() == *other
    }
}

impl From<&str> for ShortString {
    /// Never fails: a text over 255 bytes is refused when it is sent.
    fn from(text: &str) -> Self {
        Self::from_slice(text.as_bytes())
    }
}

impl From<String> for ShortString {
    /// Never fails: a text over 255 bytes is refused when it is sent.
    fn from(text: String) -> Self {
        Self::from_slice(text.as_bytes())
    }
}

impl From<&String> for ShortString {
    /// Never fails: a text over 255 bytes is refused when it is sent.
    fn from(text: &String) -> Self {
        Self::from_slice(text.as_bytes())
    }
}

impl From<&ShortString> for ShortString {
    fn from(value: &ShortString) -> Self {
        value.clone()
    }
}

impl From<&[u8]> for ShortString {
    /// Never fails: a value over 255 bytes is refused when it is sent.
    fn from(bytes: &[u8]) -> Self {
        Self::from_slice(bytes)
    }
}

impl From<Vec<u8>> for ShortString {
    /// Never fails: a value over 255 bytes is refused when it is sent.
    fn from(bytes: Vec<u8>) -> Self {
        Self::from_slice(&bytes)
    }
}

/// An AMQP decimal: `value` × 10^−`scale`.
///
/// ```
/// use amqp091::{Decimal, FieldTable, FieldValue};
///
/// // 12.50
/// let price = Decimal { scale: 2, value: 1250 };
/// let headers = FieldTable::new().with("price", price);
/// assert_eq!(headers.get("price"), Some(&FieldValue::Decimal(price)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Decimal {
    /// Number of decimal digits after the point.
    pub scale: u8,
    /// The unscaled value.
    pub value: u32,
}

/// A value in a field table or array, with exactly the type letters RabbitMQ
/// uses (its 0-9-1 errata: `s` is a signed 16-bit and `l` a signed 64-bit int).
///
/// Floats compare by their bits, so that a value always equals itself after a
/// round trip (NaN included).
///
/// ```
/// use amqp091::{FieldTable, FieldValue};
///
/// // What a dead-lettered message carries, read back.
/// let headers = FieldTable::new()
///     .with("x-first-death-reason", "expired")
///     .with("x-delivery-count", 3i64)
///     .with("redelivered", true);
/// assert_eq!(headers.get("x-first-death-reason").and_then(FieldValue::as_str), Some("expired"));
/// assert_eq!(headers.get("x-delivery-count").and_then(FieldValue::as_i64), Some(3));
/// match headers.get("redelivered") {
///     Some(FieldValue::Bool(flag)) => assert!(*flag),
///     other => panic!("unexpected {other:?}"),
/// }
/// ```
#[derive(Debug, Clone)]
pub enum FieldValue {
    /// `t`: boolean.
    Bool(bool),
    /// `b`: signed 8-bit.
    I8(i8),
    /// `B`: unsigned 8-bit.
    U8(u8),
    /// `s`: signed 16-bit.
    I16(i16),
    /// `u`: unsigned 16-bit.
    U16(u16),
    /// `I`: signed 32-bit.
    I32(i32),
    /// `i`: unsigned 32-bit.
    U32(u32),
    /// `l`: signed 64-bit.
    I64(i64),
    /// `f`: 32-bit float.
    F32(f32),
    /// `d`: 64-bit float.
    F64(f64),
    /// `D`: decimal.
    Decimal(Decimal),
    /// `S`: long string (bytes, usually UTF-8).
    LongString(Bytes),
    /// `x`: byte array.
    Bytes(Bytes),
    /// `A`: array.
    Array(Vec<FieldValue>),
    /// `T`: timestamp, seconds since the epoch.
    Timestamp(u64),
    /// `F`: nested table.
    Table(FieldTable),
    /// `V`: no value.
    Void,
}

impl PartialEq for FieldValue {
    fn eq(&self, other: &Self) -> bool {
        use FieldValue::*;
        match (self, other) {
            (Bool(a), Bool(b)) => a == b,
            (I8(a), I8(b)) => a == b,
            (U8(a), U8(b)) => a == b,
            (I16(a), I16(b)) => a == b,
            (U16(a), U16(b)) => a == b,
            (I32(a), I32(b)) => a == b,
            (U32(a), U32(b)) => a == b,
            (I64(a), I64(b)) => a == b,
            (F32(a), F32(b)) => a.to_bits() == b.to_bits(),
            (F64(a), F64(b)) => a.to_bits() == b.to_bits(),
            (Decimal(a), Decimal(b)) => a == b,
            (LongString(a), LongString(b)) => a == b,
            (Bytes(a), Bytes(b)) => a == b,
            (Array(a), Array(b)) => a == b,
            (Timestamp(a), Timestamp(b)) => a == b,
            (Table(a), Table(b)) => a == b,
            (Void, Void) => true,
            _ => false,
        }
    }
}

impl Eq for FieldValue {}

impl FieldValue {
    /// The type letter on the wire.
    pub fn type_letter(&self) -> u8 {
        match self {
            FieldValue::Bool(_) => b't',
            FieldValue::I8(_) => b'b',
            FieldValue::U8(_) => b'B',
            FieldValue::I16(_) => b's',
            FieldValue::U16(_) => b'u',
            FieldValue::I32(_) => b'I',
            FieldValue::U32(_) => b'i',
            FieldValue::I64(_) => b'l',
            FieldValue::F32(_) => b'f',
            FieldValue::F64(_) => b'd',
            FieldValue::Decimal(_) => b'D',
            FieldValue::LongString(_) => b'S',
            FieldValue::Bytes(_) => b'x',
            FieldValue::Array(_) => b'A',
            FieldValue::Timestamp(_) => b'T',
            FieldValue::Table(_) => b'F',
            FieldValue::Void => b'V',
        }
    }

    /// The text of a long string that is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::LongString(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value as an i64, for any integer type.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            FieldValue::I8(v) => v.into(),
            FieldValue::U8(v) => v.into(),
            FieldValue::I16(v) => v.into(),
            FieldValue::U16(v) => v.into(),
            FieldValue::I32(v) => v.into(),
            FieldValue::U32(v) => v.into(),
            FieldValue::I64(v) => v,
            _ => return None,
        })
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            FieldValue::Bool(v) => Some(v),
            _ => None,
        }
    }
}

macro_rules! field_value_from {
    ($($ty:ty => $variant:ident),* $(,)?) => {
        $(impl From<$ty> for FieldValue {
            fn from(value: $ty) -> Self {
                FieldValue::$variant(value.into())
            }
        })*
    };
}

field_value_from! {
    bool => Bool, i8 => I8, u8 => U8, i16 => I16, u16 => U16, i32 => I32,
    u32 => U32, i64 => I64, f32 => F32, f64 => F64, Decimal => Decimal,
    Vec<FieldValue> => Array, FieldTable => Table,
}

impl From<&str> for FieldValue {
    fn from(value: &str) -> Self {
        FieldValue::LongString(Bytes::copy_from_slice(value.as_bytes()))
    }
}

impl From<String> for FieldValue {
    fn from(value: String) -> Self {
        FieldValue::LongString(Bytes::from(value))
    }
}

/// An AMQP field table: named values in wire order. Keys are unique;
/// [`insert`](Self::insert) replaces an existing value in place. Keys are
/// short strings: any bytes, looked up by text or bytes.
///
/// ```
/// use amqp091::{BasicProperties, FieldTable};
///
/// let mut headers = FieldTable::new().with("tenant", "acme");
/// headers.insert("attempt", 2i32);
/// headers.insert("tenant", "globex");
/// assert_eq!(headers.len(), 2);
/// assert_eq!(headers.get("tenant").and_then(|v| v.as_str()), Some("globex"));
/// let properties = BasicProperties::default().with_headers(headers);
/// assert!(properties.headers.is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldTable(Vec<(ShortString, FieldValue)>);

impl FieldTable {
    /// An empty table.
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// Sets `key` to `value`, replacing any value it had. A key over 255
    /// bytes is refused when the table is sent.
    pub fn insert(&mut self, key: impl Into<ShortString>, value: impl Into<FieldValue>) {
        let key = key.into();
        let value = value.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.0.push((key, value)),
        }
    }

    /// Builder form of [`insert`](Self::insert).
    ///
    /// ```
    /// use amqp091::FieldTable;
    ///
    /// let arguments = FieldTable::new()
    ///     .with("x-queue-type", "quorum")
    ///     .with("x-delivery-limit", 5i32);
    /// assert_eq!(arguments.get("x-queue-type").and_then(|v| v.as_str()), Some("quorum"));
    /// ```
    #[must_use]
    pub fn with(mut self, key: impl Into<ShortString>, value: impl Into<FieldValue>) -> Self {
        self.insert(key, value);
        self
    }

    /// The value of `key` (text or bytes).
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<&FieldValue> {
        let key = key.as_ref();
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Removes `key` and returns its value.
    pub fn remove(&mut self, key: impl AsRef<[u8]>) -> Option<FieldValue> {
        let key = key.as_ref();
        let index = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(index).1)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Entries in wire order.
    pub fn iter(&self) -> impl Iterator<Item = (&ShortString, &FieldValue)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Whether every key, those of nested tables included, fits the 255
    /// bytes of the wire; sending checks it.
    pub fn check_keys(&self) -> Result<(), ShortStringTooLong> {
        fn check_value(value: &FieldValue) -> Result<(), ShortStringTooLong> {
            match value {
                FieldValue::Table(table) => table.check_keys(),
                FieldValue::Array(items) => items.iter().try_for_each(check_value),
                _ => Ok(()),
            }
        }
        for (key, value) in &self.0 {
            key.check()?;
            check_value(value)?;
        }
        Ok(())
    }
}

impl FromIterator<(ShortString, FieldValue)> for FieldTable {
    fn from_iter<I: IntoIterator<Item = (ShortString, FieldValue)>>(iter: I) -> Self {
        let mut table = FieldTable::new();
        for (k, v) in iter {
            table.insert(k, v);
        }
        table
    }
}

/// The input of every reader: the unread rest of a frame's payload.
///
/// ```
/// use amqp091::protocol::wire::{read_short_string, Input};
///
/// let mut input: Input<'_> = &[4, b'j', b'o', b'b', b's', 0xAA];
/// let name = read_short_string(&mut input)?;
/// assert_eq!(name, "jobs");
/// assert_eq!(input, &[0xAA]);
/// # Ok::<(), amqp091::protocol::DecodeError>(())
/// ```
pub type Input<'a> = &'a [u8];

#[inline]
fn take<'a>(buf: &mut Input<'a>, needed: usize, what: ValueKind) -> Result<&'a [u8], DecodeError> {
    if buf.len() < needed {
        return Err(DecodeError::Truncated {
            what,
            needed: needed as u32,
            available: buf.len() as u32,
        });
    }
    let (head, rest) = buf.split_at(needed);
    *buf = rest;
    Ok(head)
}

#[inline]
fn take_array<const N: usize>(
    buf: &mut Input<'_>,
    what: ValueKind,
) -> Result<[u8; N], DecodeError> {
    let head = take(buf, N, what)?;
    let mut out = [0u8; N];
    out.copy_from_slice(head);
    Ok(out)
}

/// Reads an octet.
#[inline]
pub fn read_u8(buf: &mut Input<'_>) -> Result<u8, DecodeError> {
    Ok(take_array::<1>(buf, ValueKind::Octet)?[0])
}

/// Reads a big-endian u16.
#[inline]
pub fn read_u16(buf: &mut Input<'_>) -> Result<u16, DecodeError> {
    Ok(u16::from_be_bytes(take_array(buf, ValueKind::Short)?))
}

/// Reads a big-endian u32.
#[inline]
pub fn read_u32(buf: &mut Input<'_>) -> Result<u32, DecodeError> {
    Ok(u32::from_be_bytes(take_array(buf, ValueKind::Long)?))
}

/// Reads a big-endian u64.
#[inline]
pub fn read_u64(buf: &mut Input<'_>) -> Result<u64, DecodeError> {
    Ok(u64::from_be_bytes(take_array(buf, ValueKind::LongLong)?))
}

/// Reads a `shortstr`.
#[inline(always)]
pub fn read_short_string(buf: &mut Input<'_>) -> Result<ShortString, DecodeError> {
    ShortString::read(buf)
}

#[inline]
fn read_long_slice<'a>(buf: &mut Input<'a>, what: ValueKind) -> Result<&'a [u8], DecodeError> {
    let len = read_u32(buf)? as usize;
    take(buf, len, what)
}

/// Reads a `longstr` (a copy: long strings are rare outside message bodies,
/// which the frame codec hands out without copying).
#[inline]
pub fn read_long_string(buf: &mut Input<'_>) -> Result<Bytes, DecodeError> {
    Ok(Bytes::copy_from_slice(read_long_slice(
        buf,
        ValueKind::LongStr,
    )?))
}

/// Checks a `shortstr` and steps over it without building it. Any bytes are
/// accepted, as [`read_short_string`] accepts them.
#[inline]
pub fn skip_short_string(buf: &mut Input<'_>) -> Result<(), DecodeError> {
    let len = usize::from(read_u8(buf)?);
    take(buf, len, ValueKind::ShortStr).map(drop)
}

/// Checks a `longstr` and steps over it without copying it.
#[inline]
pub fn skip_long_string(buf: &mut Input<'_>) -> Result<(), DecodeError> {
    read_long_slice(buf, ValueKind::LongStr).map(drop)
}

/// Checks a field table and steps over it. Tables are checked by decoding
/// them, so that a table is never accepted here and refused by [`read_table`];
/// callers that keep the table decode it once instead (see
/// `BasicProperties::TABLE_FLAGS`).
pub fn skip_table(buf: &mut Input<'_>) -> Result<(), DecodeError> {
    read_table(buf).map(drop)
}

/// Reads a field table.
pub fn read_table(buf: &mut Input<'_>) -> Result<FieldTable, DecodeError> {
    read_table_at(buf, 0)
}

fn read_table_at(buf: &mut Input<'_>, depth: u16) -> Result<FieldTable, DecodeError> {
    if depth >= MAX_NESTING {
        return Err(DecodeError::NestingTooDeep(MAX_NESTING));
    }
    let mut body = read_long_slice(buf, ValueKind::Table)?;
    let mut entries = Vec::new();
    while !body.is_empty() {
        let key = read_short_string(&mut body)?;
        let value = read_value(&mut body, depth)?;
        entries.push((key, value));
    }
    Ok(FieldTable(entries))
}

fn read_value(buf: &mut Input<'_>, depth: u16) -> Result<FieldValue, DecodeError> {
    let letter = read_u8(buf)?;
    Ok(match letter {
        b't' => FieldValue::Bool(read_u8(buf)? != 0),
        b'b' => FieldValue::I8(read_u8(buf)? as i8),
        b'B' => FieldValue::U8(read_u8(buf)?),
        b's' => FieldValue::I16(read_u16(buf)? as i16),
        b'u' => FieldValue::U16(read_u16(buf)?),
        b'I' => FieldValue::I32(read_u32(buf)? as i32),
        b'i' => FieldValue::U32(read_u32(buf)?),
        b'l' => FieldValue::I64(read_u64(buf)? as i64),
        b'f' => FieldValue::F32(f32::from_bits(read_u32(buf)?)),
        b'd' => FieldValue::F64(f64::from_bits(read_u64(buf)?)),
        b'D' => FieldValue::Decimal(Decimal {
            scale: read_u8(buf)?,
            value: read_u32(buf)?,
        }),
        b'S' => FieldValue::LongString(read_long_string(buf)?),
        b'x' => FieldValue::Bytes(read_long_string(buf)?),
        b'A' => {
            if depth + 1 >= MAX_NESTING {
                return Err(DecodeError::NestingTooDeep(MAX_NESTING));
            }
            let mut body = read_long_slice(buf, ValueKind::Array)?;
            let mut items = Vec::new();
            while !body.is_empty() {
                items.push(read_value(&mut body, depth + 1)?);
            }
            FieldValue::Array(items)
        }
        b'T' => FieldValue::Timestamp(read_u64(buf)?),
        b'F' => FieldValue::Table(read_table_at(buf, depth + 1)?),
        b'V' => FieldValue::Void,
        other => return Err(DecodeError::UnknownFieldType(other)),
    })
}

/// Writes a `shortstr`. Callers check lengths first
/// ([`ShortString::check`], the generated `check_short_strings`), before
/// anything is queued: the length byte of a longer text would be wrong. Its
/// bytes are written whole all the same, so that a frame holding one is
/// always over 255 bytes, which lets the publish path skip the check for the
/// usual small frames (see `Channel::encode_head`).
#[inline]
pub fn write_short_string(buf: &mut BytesMut, value: &ShortString) {
    buf.put_u8(value.len() as u8);
    buf.put_slice(value.as_bytes());
}

/// Writes a `longstr`.
///
/// Callers bound lengths far below 4 GiB (frame_max, body limits), so the
/// length always fits the u32 prefix.
#[inline]
pub fn write_long_string(buf: &mut BytesMut, value: &[u8]) {
    buf.put_u32(value.len() as u32);
    buf.put_slice(value);
}

/// Reserves a u32 length prefix, runs `body`, then fills the prefix in.
fn write_length_prefixed(buf: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let at = buf.len();
    buf.put_u32(0);
    body(buf);
    let len = (buf.len() - at - 4) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Writes a field table.
pub fn write_table(buf: &mut BytesMut, table: &FieldTable) {
    write_length_prefixed(buf, |buf| {
        for (key, value) in &table.0 {
            write_short_string(buf, key);
            write_value(buf, value);
        }
    });
}

fn write_value(buf: &mut BytesMut, value: &FieldValue) {
    buf.put_u8(value.type_letter());
    match value {
        FieldValue::Bool(v) => buf.put_u8(u8::from(*v)),
        FieldValue::I8(v) => buf.put_i8(*v),
        FieldValue::U8(v) => buf.put_u8(*v),
        FieldValue::I16(v) => buf.put_i16(*v),
        FieldValue::U16(v) => buf.put_u16(*v),
        FieldValue::I32(v) => buf.put_i32(*v),
        FieldValue::U32(v) => buf.put_u32(*v),
        FieldValue::I64(v) => buf.put_i64(*v),
        FieldValue::F32(v) => buf.put_u32(v.to_bits()),
        FieldValue::F64(v) => buf.put_u64(v.to_bits()),
        FieldValue::Decimal(d) => {
            buf.put_u8(d.scale);
            buf.put_u32(d.value);
        }
        FieldValue::LongString(b) | FieldValue::Bytes(b) => write_long_string(buf, b),
        FieldValue::Array(items) => write_length_prefixed(buf, |buf| {
            for item in items {
                write_value(buf, item);
            }
        }),
        FieldValue::Timestamp(v) => buf.put_u64(*v),
        FieldValue::Table(t) => write_table(buf, t),
        FieldValue::Void => {}
    }
}

/// The text of a long string, replacing bytes that are not UTF-8.
pub fn long_string_lossy(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}
