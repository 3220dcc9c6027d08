//! The two primitives that the generated `Channel` methods
//! ([`Channel::queue_declare`](crate::Channel::queue_declare) and the rest)
//! are built on.

use core::future::Future;

use thiserror::Error;

use crate::protocol::method_info::MethodInfo;
use crate::protocol::methods::Method;

/// A reply that the spec does not list as an answer to the request sent.
/// [`Error`](crate::Error) converts from it.
///
/// ```
/// use amqp091::protocol::methods::{basic, queue};
/// use amqp091::protocol::UnexpectedReply;
///
/// let wrong = UnexpectedReply { request: &queue::Declare::INFO, reply: &basic::QosOk::INFO };
/// assert_eq!(wrong.to_string(), "queue.declare answered with basic.qos-ok");
/// assert!(matches!(amqp091::Error::from(wrong), amqp091::Error::UnexpectedReply(_)));
/// ```
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
///
/// [`Channel`](crate::Channel) implements it; so can a stand-in for tests:
///
/// ```
/// use amqp091::protocol::methods::{queue, Method};
/// use amqp091::protocol::{ChannelRpc, UnexpectedReply};
///
/// /// Answers every `queue.declare` as if the queue were empty.
/// struct FakeChannel;
///
/// impl ChannelRpc for FakeChannel {
///     type Error = UnexpectedReply;
///
///     async fn call(&self, request: Method) -> Result<Method, UnexpectedReply> {
///         match request {
///             Method::QueueDeclare(declare) => Ok(Method::QueueDeclareOk(queue::DeclareOk {
///                 queue: declare.queue,
///                 ..Default::default()
///             })),
///             other => Err(UnexpectedReply { request: other.info(), reply: other.info() }),
///         }
///     }
///
///     async fn send(&self, _method: Method) -> Result<(), UnexpectedReply> {
///         Ok(())
///     }
/// }
///
/// let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// let request = Method::QueueDeclare(queue::Declare { queue: "jobs".into(), ..Default::default() });
/// let reply = runtime.block_on(FakeChannel.call(request)).unwrap();
/// assert!(matches!(reply, Method::QueueDeclareOk(ok) if ok.queue == "jobs"));
/// ```
pub trait ChannelRpc: Sync {
    /// The error of a failed call; a wrong reply converts into it.
    type Error: From<UnexpectedReply> + Send;

    /// Sends a synchronous `request` and resolves with the method that
    /// answered it (one of the request's `replies`).
    fn call(&self, request: Method) -> impl Future<Output = Result<Method, Self::Error>> + Send;

    /// Sends a method that expects no reply (or whose reply is suppressed by `no-wait`).
    fn send(&self, method: Method) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
