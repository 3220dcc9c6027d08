//! The two primitives that the generated `Channel` methods
//! ([`Channel::queue_declare`](crate::Channel::queue_declare) and the rest)
//! are built on.

use core::future::Future;

use thiserror::Error;

use crate::protocol::method_info::MethodInfo;
use crate::protocol::methods::Method;

/// A reply that the spec does not list as an answer to the request sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{} answered with {}", request.name, reply.name)]
pub struct UnexpectedReply {
    /// What was sent.
    pub request: &'static MethodInfo,
    /// What came back.
    pub reply: &'static MethodInfo,
}

/// A channel as the generated methods see it: something that can make a
/// synchronous call and send a method that has no reply.
pub trait ChannelRpc: Sync {
    /// The error of a failed call; a wrong reply converts into it.
    type Error: From<UnexpectedReply> + Send;

    /// Sends a synchronous `request` and resolves with the method that
    /// answered it (one of the request's `replies`).
    fn call(&self, request: Method) -> impl Future<Output = Result<Method, Self::Error>> + Send;

    /// Sends a method that expects no reply (or whose reply is suppressed by `no-wait`).
    fn send(&self, method: Method) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
