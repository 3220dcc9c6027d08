//! How the tool fails: an exit code that scripts can test and one line
//! naming the cause.

use std::fmt::Display;

use amqp091::Error;

/// The exit codes, documented in the README and in `amqp --help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// A bad flag or value, an unreadable file, a broken output.
    Usage = 1,
    /// The broker could not be reached or refused the connection: bad URL,
    /// DNS, TCP, TLS, wrong credentials, unknown vhost, connection lost.
    Connection = 2,
    /// The broker refused an operation by closing the channel (404 no such
    /// queue or exchange, 406 precondition failed, 403 access refused…).
    Refused = 3,
    /// At least one published message was nacked or returned as unroutable.
    NotConfirmed = 4,
    /// `--timeout` expired before the messages asked for arrived.
    Timeout = 5,
    /// `get` found the queue empty.
    Empty = 6,
}

/// A failure: the code to exit with and the one-line cause.
#[derive(Debug)]
pub struct Failure {
    /// What the process exits with.
    pub code: Code,
    /// The cause, printed as `amqp: <message>`.
    pub message: String,
}

impl Failure {
    /// A failure with `code` and `message`.
    pub fn new(code: Code, message: impl Display) -> Self {
        Self {
            code,
            message: message.to_string(),
        }
    }

    /// A bad flag or value, or a local I/O problem.
    pub fn usage(message: impl Display) -> Self {
        Self::new(Code::Usage, message)
    }

    /// The line printed to stderr: one line whatever the cause's text holds,
    /// so that scripts can log it as a single record.
    pub fn line(&self) -> String {
        let flat: Vec<&str> = self.message.split_whitespace().collect();
        format!("amqp: {}", flat.join(" "))
    }
}

/// The exit code a client error means.
pub fn code_of(error: &Error) -> Code {
    match error {
        Error::ChannelClosed { .. } | Error::FrameTooLarge { .. } => Code::Refused,
        Error::ConsumerCancelled { .. } => Code::Refused,
        Error::Returned { .. } | Error::Nacked => Code::NotConfirmed,
        Error::CallTimeout { .. } => Code::Timeout,
        Error::ShortString(_) => Code::Usage,
        // What ended the channel or connection decides, not the lost publish.
        Error::PublishOutcomeUnknown(inner) => code_of(inner),
        _ => Code::Connection,
    }
}

/// Turns a client error into a failure whose line says what was being done.
pub fn amqp(context: impl Display) -> impl FnOnce(Error) -> Failure {
    move |error| Failure::new(code_of(&error), format!("{context}: {error}"))
}
