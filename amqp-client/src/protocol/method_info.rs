//! What the spec says of a method, as data: ids, name, synchronicity, content,
//! direction, replies and field layout. The generated code fills these in.

/// A (class id, method id) pair.
///
/// ```
/// use amqp091::protocol::methods::queue;
/// use amqp091::protocol::MethodId;
///
/// assert_eq!(queue::Declare::INFO.id, MethodId::new(50, 10));
/// assert_eq!(MethodId::new(50, 10).to_string(), "50/10");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MethodId {
    /// Class id, e.g. 50 for `queue`.
    pub class_id: u16,
    /// Method id within the class.
    pub method_id: u16,
}

impl MethodId {
    /// Builds an id.
    pub const fn new(class_id: u16, method_id: u16) -> Self {
        Self {
            class_id,
            method_id,
        }
    }
}

impl core::fmt::Display for MethodId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}/{}", self.class_id, self.method_id)
    }
}

/// Who may send a method, from the spec's `chassis` elements.
///
/// ```
/// use amqp091::protocol::methods::{basic, channel};
/// use amqp091::protocol::Direction;
///
/// assert_eq!(basic::Publish::INFO.direction, Direction::ToServer);
/// assert_eq!(basic::Deliver::INFO.direction, Direction::ToClient);
/// assert_eq!(channel::Close::INFO.direction, Direction::Both);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Sent by the client only.
    ToServer,
    /// Sent by the server only.
    ToClient,
    /// Sent by either peer.
    Both,
}

/// A field's wire type.
///
/// ```
/// use amqp091::protocol::methods::queue;
/// use amqp091::protocol::WireKind;
///
/// let bits = queue::Declare::INFO.fields.iter().filter(|f| f.kind == WireKind::Bit);
/// assert_eq!(bits.count(), 5); // passive, durable, exclusive, auto-delete, no-wait
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireKind {
    /// u8.
    Octet,
    /// u16.
    Short,
    /// u32.
    Long,
    /// u64.
    LongLong,
    /// u64 seconds since the epoch.
    Timestamp,
    /// Up to 255 bytes.
    ShortStr,
    /// Up to 2³²−1 bytes.
    LongStr,
    /// One bit, packed with its neighbours.
    Bit,
    /// A field table.
    Table,
}

/// One field of a method.
///
/// ```
/// use amqp091::protocol::methods::queue;
/// use amqp091::protocol::{FieldInfo, WireKind};
///
/// let fields: Vec<&FieldInfo> = queue::Declare::INFO.fields.iter().filter(|f| !f.reserved).collect();
/// assert_eq!((fields[0].name, fields[0].kind), ("queue", WireKind::ShortStr));
/// assert_eq!(fields.last().map(|f| f.name), Some("arguments"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldInfo {
    /// Spec name, e.g. `auto-delete`.
    pub name: &'static str,
    /// Wire type.
    pub kind: WireKind,
    /// Reserved fields are not exposed and always sent as zero.
    pub reserved: bool,
}

/// What the spec says of one method: each method struct's `INFO`, and
/// [`Method::info`](crate::protocol::methods::Method::info) of any method.
///
/// ```
/// use amqp091::protocol::methods::{queue, Method};
///
/// let method = Method::QueueDeclare(queue::Declare::default());
/// let info = method.info();
/// assert_eq!(info.name, "queue.declare");
/// assert!(info.synchronous && !info.content);
/// assert!(info.is_answered_by(queue::DeclareOk::INFO.id));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodInfo {
    /// Class and method id.
    pub id: MethodId,
    /// `class.method`, e.g. `queue.declare`.
    pub name: &'static str,
    /// Whether the sender waits for one of `replies`.
    pub synchronous: bool,
    /// Whether content (header and body frames) follows the method.
    pub content: bool,
    /// Who sends it.
    pub direction: Direction,
    /// The methods that may answer it (empty for asynchronous methods).
    pub replies: &'static [MethodId],
    /// Fields in wire order, reserved ones included.
    pub fields: &'static [FieldInfo],
}

impl MethodInfo {
    /// Whether `reply` is one of the spec's answers to this method.
    pub fn is_answered_by(&self, reply: MethodId) -> bool {
        self.replies.contains(&reply)
    }
}
