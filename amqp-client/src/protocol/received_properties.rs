//! Content properties as they arrived: checked when the header frame is
//! decoded, built into a [`BasicProperties`] only when first read.
//!
//! Most deliveries carry a handful of small properties that the application
//! may never look at, and building the 14-field struct costs more than the
//! rest of the header. RabbitMQ's own broker keeps content properties encoded
//! until a reader needs them for the same reason. The I/O task therefore only
//! checks the property list (so a malformed one still fails the frame with a
//! syntax error, as an eagerly decoded one would); the application's task
//! builds it on first access through `Deref`.

use std::fmt;
use std::ops::Deref;
use std::sync::OnceLock;

use bytes::Bytes;

use crate::protocol::error::DecodeError;
use crate::protocol::properties::BasicProperties;
use crate::protocol::wire;

/// Property lists up to this many bytes are kept inline (with the tag and the
/// length byte the encoded form stays as large as a `Bytes`).
const INLINE: usize = 38;

/// A content header's properties, decoded on first access.
///
/// Dereferences to [`BasicProperties`], so `delivery.properties.content_type`
/// reads like a plain field. Building the struct happens once, in whichever
/// task reads a property first.
///
/// ```
/// use amqp091::protocol::ReceivedProperties;
/// use amqp091::BasicProperties;
///
/// // As a delivery's `properties` would hold them.
/// let received = ReceivedProperties::from(
///     BasicProperties::default().with_content_type("application/json").with_delivery_mode(2),
/// );
/// assert_eq!(received.content_type.as_ref().unwrap(), "application/json");
/// assert_eq!(received.delivery_mode, Some(2));
/// let owned: BasicProperties = received.into_inner();
/// assert!(owned.message_id.is_none());
/// ```
#[derive(Clone, Default)]
pub struct ReceivedProperties {
    encoded: Encoded,
    decoded: OnceLock<Box<BasicProperties>>,
}

#[derive(Clone, Default)]
enum Encoded {
    /// Already decoded (property lists with tables are decoded once while
    /// they are checked), or built locally.
    #[default]
    None,
    Inline {
        len: u8,
        bytes: [u8; INLINE],
    },
    Shared(Bytes),
}

/// What checking a property list found.
#[derive(Debug)]
pub(crate) enum Checked {
    /// Valid; `len` bytes long; nothing was built.
    Encoded { len: usize },
    /// Valid and already built (it holds a table, which is checked by
    /// decoding it anyway).
    Decoded(Box<BasicProperties>),
}

impl ReceivedProperties {
    /// Checks the property list at the front of `input` (flags first) and
    /// steps over it. Only a list that holds a table is built here.
    #[inline]
    pub(crate) fn check(input: &mut wire::Input<'_>) -> Result<Checked, DecodeError> {
        let flags = input
            .get(..2)
            .map_or(0, |f| u16::from_be_bytes([f[0], f[1]]));
        if flags & BasicProperties::TABLE_FLAGS != 0 {
            return Ok(Checked::Decoded(Box::new(BasicProperties::decode(input)?)));
        }
        let before = input.len();
        BasicProperties::skip(input)?;
        Ok(Checked::Encoded {
            len: before - input.len(),
        })
    }

    /// Whether a checked list of `len` bytes is kept inline; a longer one is
    /// better handed over as a shared slice ([`Self::from_checked_shared`]).
    #[inline]
    pub(crate) fn fits_inline(len: usize) -> bool {
        len <= INLINE
    }

    /// Properties from what [`Self::check`] found in `list` (the bytes it
    /// checked first): kept inline when short, else copied.
    #[inline]
    pub(crate) fn from_checked(checked: Checked, list: &[u8]) -> Self {
        match checked {
            Checked::Decoded(properties) => Self::from_decoded(properties),
            Checked::Encoded { len } if Self::fits_inline(len) => {
                Self::from_checked_inline(&list[..len])
            }
            Checked::Encoded { len } => {
                Self::from_checked_shared(Bytes::copy_from_slice(&list[..len]))
            }
        }
    }

    /// Properties from a list [`Self::check`] accepted, copied inline;
    /// `list.len()` must be at most `INLINE`.
    #[inline]
    fn from_checked_inline(list: &[u8]) -> Self {
        let mut bytes = [0; INLINE];
        let len = list.len().min(INLINE);
        bytes[..len].copy_from_slice(&list[..len]);
        Self {
            encoded: Encoded::Inline {
                len: len as u8,
                bytes,
            },
            decoded: OnceLock::new(),
        }
    }

    /// Properties from a list [`Self::check`] accepted, as a shared slice.
    #[inline]
    pub(crate) fn from_checked_shared(list: Bytes) -> Self {
        Self {
            encoded: Encoded::Shared(list),
            decoded: OnceLock::new(),
        }
    }

    /// Properties that are already built.
    fn from_decoded(properties: Box<BasicProperties>) -> Self {
        Self {
            encoded: Encoded::None,
            decoded: OnceLock::from(properties),
        }
    }

    /// Checks and keeps a property list that must make up all of `list`
    /// (trailing bytes are an error); copies it when it is not inline.
    pub fn decode(list: &[u8]) -> Result<Self, DecodeError> {
        let mut input = list;
        let checked = Self::check(&mut input)?;
        if !input.is_empty() {
            return Err(DecodeError::TrailingBytes {
                count: input.len() as u32,
            });
        }
        Ok(Self::from_checked(checked, list))
    }

    /// The properties, built on first call.
    pub fn get(&self) -> &BasicProperties {
        self.decoded.get_or_init(|| {
            let mut input = match &self.encoded {
                Encoded::None => &[][..],
                Encoded::Inline { len, bytes } => &bytes[..usize::from(*len).min(INLINE)],
                Encoded::Shared(bytes) => &bytes[..],
            };
            // `check` accepted these bytes and `decode` fails exactly where
            // `skip` does, so the fallback is never taken.
            Box::new(BasicProperties::decode(&mut input).unwrap_or_default())
        })
    }

    /// The properties, owned.
    pub fn into_inner(self) -> BasicProperties {
        self.get();
        self.decoded.into_inner().map(|b| *b).unwrap_or_default()
    }

    /// Bytes of the read buffer it keeps (a long list is a slice of it).
    /// Fixed for the value's life, so limits that add it and later subtract
    /// it stay balanced whether or not the properties were read meanwhile.
    pub(crate) fn shared_len(&self) -> usize {
        match &self.encoded {
            Encoded::Shared(bytes) => bytes.len(),
            Encoded::None | Encoded::Inline { .. } => 0,
        }
    }
}

impl From<BasicProperties> for ReceivedProperties {
    fn from(properties: BasicProperties) -> Self {
        Self::from_decoded(Box::new(properties))
    }
}

impl Deref for ReceivedProperties {
    type Target = BasicProperties;

    fn deref(&self) -> &BasicProperties {
        self.get()
    }
}

impl PartialEq for ReceivedProperties {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl PartialEq<BasicProperties> for ReceivedProperties {
    fn eq(&self, other: &BasicProperties) -> bool {
        self.get() == other
    }
}

impl fmt::Debug for ReceivedProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.get().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::{FieldTable, ShortString};
    use bytes::BytesMut;

    fn encode(properties: &BasicProperties) -> Vec<u8> {
        let mut buf = BytesMut::new();
        properties.encode(&mut buf);
        buf.to_vec()
    }

    #[test]
    fn small_lists_stay_encoded_inline_until_read() {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from_static("application/json"));
        let received = ReceivedProperties::decode(&encode(&properties)).unwrap();
        assert!(matches!(received.encoded, Encoded::Inline { .. }));
        assert!(received.decoded.get().is_none());
        assert_eq!(
            received.content_type.as_ref().map(|t| t.to_str()),
            Some(Ok("application/json"))
        );
        assert!(received.decoded.get().is_some());
        assert_eq!(received, properties);
        assert_eq!(received.into_inner(), properties);
    }

    #[test]
    fn long_lists_are_shared_and_tables_are_decoded_once_while_checked() {
        let long =
            BasicProperties::default().with_message_id(ShortString::new("0".repeat(200)).unwrap());
        let received = ReceivedProperties::decode(&encode(&long)).unwrap();
        assert!(matches!(received.encoded, Encoded::Shared(_)));
        assert_eq!(received.shared_len(), encode(&long).len());
        assert_eq!(*received, long);

        let with_table = BasicProperties::default()
            .with_headers(FieldTable::new().with(ShortString::from_static("k"), 1i32));
        let received = ReceivedProperties::decode(&encode(&with_table)).unwrap();
        assert!(matches!(received.encoded, Encoded::None));
        assert!(received.decoded.get().is_some());
        assert_eq!(*received, with_table);
    }

    #[test]
    fn malformed_lists_fail_when_checked() {
        // content-type announced, its length says 10, 3 bytes follow.
        let truncated = [0x80, 0x00, 10, b'a', b'b', b'c'];
        assert!(matches!(
            ReceivedProperties::decode(&truncated),
            Err(DecodeError::Truncated { .. })
        ));
        // A flag the basic class does not have.
        assert!(matches!(
            ReceivedProperties::decode(&[0x00, 0x01]),
            Err(DecodeError::UnknownPropertyFlags(1))
        ));
        // Bytes after the last announced property.
        assert!(matches!(
            ReceivedProperties::decode(&[0x10, 0x00, 2, 9]),
            Err(DecodeError::TrailingBytes { count: 1 })
        ));
    }
}
