//! What the spec says of a method, as data: ids, name, synchronicity, content,
//! direction, replies and field layout. The generated code fills these in.

/// A (class id, method id) pair.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldInfo {
    /// Spec name, e.g. `auto-delete`.
    pub name: &'static str,
    /// Wire type.
    pub kind: WireKind,
    /// Reserved fields are not exposed and always sent as zero.
    pub reserved: bool,
}

/// What the spec says of one method.
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
