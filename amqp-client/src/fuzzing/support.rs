//! Helpers shared by the machine fuzz harness and the simulator
//! (`crate::simulation`): both play a broker that reads the machine's frames.

use crate::protocol::methods::Method;
use crate::protocol::ShortString;

/// Whether a request waits for the broker's answer (it has a reply and is
/// not sent with no-wait).
pub(crate) fn expects_reply(method: &Method) -> bool {
    let no_wait = match method {
        Method::ExchangeDeclare(m) => m.no_wait,
        Method::ExchangeDelete(m) => m.no_wait,
        Method::ExchangeBind(m) => m.no_wait,
        Method::ExchangeUnbind(m) => m.no_wait,
        Method::QueueDeclare(m) => m.no_wait,
        Method::QueueBind(m) => m.no_wait,
        Method::QueuePurge(m) => m.no_wait,
        Method::QueueDelete(m) => m.no_wait,
        Method::BasicConsume(m) => m.no_wait,
        Method::BasicCancel(m) => m.no_wait,
        Method::ConfirmSelect(m) => m.no_wait,
        _ => false,
    };
    !method.info().replies.is_empty() && !no_wait
}

/// A short string from text known to fit.
pub(crate) fn short(text: impl AsRef<[u8]>) -> ShortString {
    ShortString::new(text).expect("a short string")
}
