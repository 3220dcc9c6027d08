//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) in message
//! headers, so that a consumer's span continues the publisher's trace: the
//! publisher [injects](TraceContext::inject) `traceparent` (and
//! `tracestate`) into the message's headers as long strings, the consumer
//! [extracts](TraceContext::extract) them from the delivery.
//!
//! Dependency-free and always compiled: bridge it to the tracing system in
//! use (with `opentelemetry`, build the `SpanContext` from
//! [`trace_id`](TraceContext::trace_id), [`parent_id`](TraceContext::parent_id)
//! and [`flags`](TraceContext::flags)).
//!
//! ```
//! use amqp091::trace_context::TraceContext;
//! use amqp091::BasicProperties;
//!
//! // The publisher: the context of its current span.
//! let context = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None)?;
//! let mut properties = BasicProperties::default();
//! context.inject_properties(&mut properties);
//! // … published, and delivered: the consumer's side.
//! let received = TraceContext::from_properties(&properties).expect("a trace context");
//! assert_eq!(received, context);
//! assert!(received.is_sampled());
//! # Ok::<(), amqp091::trace_context::InvalidTraceContext>(())
//! ```

use std::fmt;

use crate::protocol::{BasicProperties, FieldTable, FieldValue};

/// The header that carries the trace and parent span ids.
pub const TRACEPARENT: &str = "traceparent";
/// The header that carries vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// The length of a version `00` `traceparent`.
const TRACEPARENT_LEN: usize = 55;
/// At most this many list members in a `tracestate`.
const TRACESTATE_MAX_MEMBERS: usize = 32;
/// `tracestate` values longer than this are dropped rather than forwarded
/// (the spec asks vendors to propagate at least 512 characters).
const TRACESTATE_MAX_LEN: usize = 512;

/// Why a `traceparent` was refused.
///
/// ```
/// use amqp091::trace_context::{InvalidTraceContext, TraceContext};
///
/// let zero_trace = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
/// assert_eq!(TraceContext::parse(zero_trace, None), Err(InvalidTraceContext::ZeroTraceId));
/// let upper = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
/// assert_eq!(TraceContext::parse(upper, None), Err(InvalidTraceContext::NotLowercaseHex));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTraceContext {
    /// Not `version-traceid-parentid-flags` with the spec's lengths.
    #[error("traceparent is not version-traceid-parentid-flags (55 characters for version 00)")]
    Format,
    /// A field holds something else than lowercase hex digits.
    #[error("traceparent holds a character that is not a lowercase hex digit")]
    NotLowercaseHex,
    /// Version `ff`, which the spec forbids.
    #[error("traceparent version ff is invalid")]
    ForbiddenVersion,
    /// The trace id is all zeros.
    #[error("traceparent trace id is all zeros")]
    ZeroTraceId,
    /// The parent id is all zeros.
    #[error("traceparent parent id is all zeros")]
    ZeroParentId,
}

/// A validated W3C trace context: the trace, the span that is the parent of
/// the next one, the trace flags, and the vendors' `tracestate`.
///
/// ```
/// use amqp091::trace_context::TraceContext;
/// use amqp091::FieldTable;
///
/// let context = TraceContext::new([0x4b; 16], [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7], TraceContext::SAMPLED)?
///     .with_tracestate("vendor=opaque");
/// let mut headers = FieldTable::new();
/// context.inject(&mut headers);
/// assert_eq!(
///     headers.get("traceparent").and_then(|v| v.as_str()),
///     Some("00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-00f067aa0ba902b7-01")
/// );
/// let extracted = TraceContext::extract(&headers).expect("present and valid");
/// assert_eq!(extracted.tracestate(), Some("vendor=opaque"));
/// # Ok::<(), amqp091::trace_context::InvalidTraceContext>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
    tracestate: Option<String>,
}

impl TraceContext {
    /// The `sampled` trace flag.
    pub const SAMPLED: u8 = 0x01;

    /// A context from its ids and flags; all-zero ids are invalid.
    pub fn new(
        trace_id: [u8; 16],
        parent_id: [u8; 8],
        flags: u8,
    ) -> Result<Self, InvalidTraceContext> {
        if trace_id == [0; 16] {
            return Err(InvalidTraceContext::ZeroTraceId);
        }
        if parent_id == [0; 8] {
            return Err(InvalidTraceContext::ZeroParentId);
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
            tracestate: None,
        })
    }

    /// Parses a `traceparent` header value, and keeps `tracestate` when it
    /// is well-formed (a malformed one is dropped, as the spec allows, and
    /// the `traceparent` still counts).
    ///
    /// A version other than `00` is parsed as the spec says for versions it
    /// does not know yet: its first 55 characters as version `00`, provided
    /// that a dash follows them when there are more.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, InvalidTraceContext> {
        let bytes = traceparent.as_bytes();
        if bytes.len() < TRACEPARENT_LEN {
            return Err(InvalidTraceContext::Format);
        }
        let version = hex_byte(&bytes[0..2])?;
        match version {
            0xff => return Err(InvalidTraceContext::ForbiddenVersion),
            0x00 if bytes.len() != TRACEPARENT_LEN => return Err(InvalidTraceContext::Format),
            _ if bytes.len() > TRACEPARENT_LEN && bytes[TRACEPARENT_LEN] != b'-' => {
                return Err(InvalidTraceContext::Format)
            }
            _ => {}
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(InvalidTraceContext::Format);
        }
        let mut trace_id = [0; 16];
        hex_into(&bytes[3..35], &mut trace_id)?;
        let mut parent_id = [0; 8];
        hex_into(&bytes[36..52], &mut parent_id)?;
        let flags = hex_byte(&bytes[53..55])?;
        let mut context = Self::new(trace_id, parent_id, flags)?;
        context.tracestate = tracestate
            .filter(|s| valid_tracestate(s))
            .map(str::to_owned);
        Ok(context)
    }

    /// This context with `tracestate` (dropped when malformed, see [`parse`](Self::parse)).
    #[must_use]
    pub fn with_tracestate(mut self, tracestate: &str) -> Self {
        self.tracestate = Some(tracestate)
            .filter(|s| valid_tracestate(s))
            .map(str::to_owned);
        self
    }

    /// The trace id.
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The id of the span the next span is a child of.
    pub fn parent_id(&self) -> [u8; 8] {
        self.parent_id
    }

    /// The trace flags (bit 0: [`SAMPLED`](Self::SAMPLED)).
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the caller may have recorded the trace.
    pub fn is_sampled(&self) -> bool {
        self.flags & Self::SAMPLED != 0
    }

    /// The vendors' trace state, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The `traceparent` header value (version `00`, lowercase hex).
    pub fn traceparent(&self) -> String {
        self.to_string()
    }

    /// Writes `traceparent` (and `tracestate`, when there is one; an earlier
    /// one is removed when there is not) into `headers`, as long strings.
    pub fn inject(&self, headers: &mut FieldTable) {
        headers.insert(TRACEPARENT, FieldValue::from(self.traceparent()));
        match &self.tracestate {
            Some(state) => headers.insert(TRACESTATE, FieldValue::from(state.as_str())),
            None => {
                headers.remove(TRACESTATE);
            }
        }
    }

    /// [`inject`](Self::inject) into a message's properties, creating its
    /// headers when it has none.
    pub fn inject_properties(&self, properties: &mut BasicProperties) {
        self.inject(properties.headers.get_or_insert_with(FieldTable::new));
    }

    /// The context in `headers`; `None` when there is no `traceparent`, it is
    /// not a long string, or it is invalid.
    pub fn extract(headers: &FieldTable) -> Option<Self> {
        let traceparent = long_string(headers.get(TRACEPARENT)?)?;
        let tracestate = headers.get(TRACESTATE).and_then(long_string);
        Self::parse(traceparent, tracestate).ok()
    }

    /// [`extract`](Self::extract) from a message's properties (a delivery's
    /// `properties` dereference to them).
    pub fn from_properties(properties: &BasicProperties) -> Option<Self> {
        Self::extract(properties.headers.as_ref()?)
    }
}

impl fmt::Display for TraceContext {
    /// The `traceparent` header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        for byte in self.trace_id {
            write!(f, "{byte:02x}")?;
        }
        f.write_str("-")?;
        for byte in self.parent_id {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "-{:02x}", self.flags)
    }
}

impl std::str::FromStr for TraceContext {
    type Err = InvalidTraceContext;

    /// Parses a `traceparent` (no `tracestate`).
    fn from_str(traceparent: &str) -> Result<Self, Self::Err> {
        Self::parse(traceparent, None)
    }
}

fn long_string(value: &FieldValue) -> Option<&str> {
    match value {
        FieldValue::LongString(bytes) => std::str::from_utf8(bytes).ok(),
        _ => None,
    }
}

fn hex_digit(c: u8) -> Result<u8, InvalidTraceContext> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(InvalidTraceContext::NotLowercaseHex),
    }
}

fn hex_byte(pair: &[u8]) -> Result<u8, InvalidTraceContext> {
    Ok(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?)
}

fn hex_into(hex: &[u8], out: &mut [u8]) -> Result<(), InvalidTraceContext> {
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = hex_byte(pair)?;
    }
    Ok(())
}

/// Whether `tracestate` is a list of at most 32 `key=value` members of
/// printable ASCII, no longer than we forward. Keys and values are not
/// checked further: the vendors that wrote them read them.
fn valid_tracestate(tracestate: &str) -> bool {
    if tracestate.len() > TRACESTATE_MAX_LEN
        || !tracestate.bytes().all(|b| (0x20..=0x7e).contains(&b))
    {
        return false;
    }
    let members: Vec<&str> = tracestate
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect();
    !members.is_empty()
        && members.len() <= TRACESTATE_MAX_MEMBERS
        && members.iter().all(|m| {
            m.split_once('=')
                .is_some_and(|(key, value)| !key.is_empty() && !value.is_empty())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_spec_example() {
        let context = TraceContext::parse(VALID, Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"))
            .expect("valid");
        assert_eq!(
            context.trace_id(),
            [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36
            ]
        );
        assert_eq!(
            context.parent_id(),
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(context.flags(), 1);
        assert!(context.is_sampled());
        assert_eq!(
            context.tracestate(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        assert_eq!(context.traceparent(), VALID);
        assert_eq!(
            VALID.parse::<TraceContext>().map(|c| c.traceparent()),
            Ok(VALID.to_owned())
        );
    }

    #[test]
    fn refuses_what_the_spec_forbids() {
        let cases = [
            ("", InvalidTraceContext::Format),
            (&VALID[..54], InvalidTraceContext::Format),
            // Version 00 is exactly 55 characters.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                InvalidTraceContext::Format,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                InvalidTraceContext::NotLowercaseHex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
                InvalidTraceContext::NotLowercaseHex,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                InvalidTraceContext::Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
                InvalidTraceContext::Format,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                InvalidTraceContext::ForbiddenVersion,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                InvalidTraceContext::ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                InvalidTraceContext::ZeroParentId,
            ),
            // A future version with more after the 55 characters needs a dash first.
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                InvalidTraceContext::Format,
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(TraceContext::parse(input, None), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn a_future_version_is_read_as_version_00() {
        let context = TraceContext::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-adds",
            None,
        )
        .expect("parsed as 00");
        assert_eq!(context.traceparent(), VALID);
    }

    #[test]
    fn a_malformed_tracestate_is_dropped_not_the_traceparent() {
        for state in ["", "no-equals", "k=", "=v", "k=v\u{7f}", &"k=v,".repeat(33)] {
            let context = TraceContext::parse(VALID, Some(state)).expect("traceparent valid");
            assert_eq!(context.tracestate(), None, "{state:?}");
        }
    }

    #[test]
    fn inject_then_extract_round_trips_as_long_strings() {
        let context = TraceContext::parse(VALID, Some("rojo=00f067aa0ba902b7")).expect("valid");
        let mut headers = FieldTable::new().with("other", 5i32);
        context.inject(&mut headers);
        assert!(matches!(
            headers.get(TRACEPARENT),
            Some(FieldValue::LongString(_))
        ));
        assert!(matches!(
            headers.get(TRACESTATE),
            Some(FieldValue::LongString(_))
        ));
        assert_eq!(TraceContext::extract(&headers), Some(context.clone()));
        assert_eq!(headers.get("other"), Some(&FieldValue::I32(5)));

        // Injecting a context without tracestate removes the stale one.
        let plain = TraceContext::parse(VALID, None).expect("valid");
        plain.inject(&mut headers);
        assert_eq!(headers.get(TRACESTATE), None);
        assert_eq!(TraceContext::extract(&headers), Some(plain));
    }

    #[test]
    fn extract_ignores_missing_mistyped_and_invalid_headers() {
        assert_eq!(TraceContext::extract(&FieldTable::new()), None);
        let mistyped = FieldTable::new().with(TRACEPARENT, 42i32);
        assert_eq!(TraceContext::extract(&mistyped), None);
        let invalid = FieldTable::new().with(TRACEPARENT, "00-not-a-trace-context");
        assert_eq!(TraceContext::extract(&invalid), None);
        assert_eq!(
            TraceContext::from_properties(&BasicProperties::default()),
            None
        );
    }

    #[test]
    fn new_refuses_zero_ids() {
        assert_eq!(
            TraceContext::new([0; 16], [1; 8], 0),
            Err(InvalidTraceContext::ZeroTraceId)
        );
        assert_eq!(
            TraceContext::new([1; 16], [0; 8], 0),
            Err(InvalidTraceContext::ZeroParentId)
        );
        let context = TraceContext::new([0xab; 16], [0xcd; 8], 0).expect("valid");
        assert!(!context.is_sampled());
        assert_eq!(
            context.traceparent(),
            format!("00-{}-{}-00", "ab".repeat(16), "cd".repeat(8))
        );
    }
}
