//! The AMQP handshake: protocol header, start/start-ok, secure/secure-ok,
//! tune/tune-ok and open/open-ok, with typed errors for each way it fails.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{AuthMechanism, Config};
use crate::error::{CloseReason, Error, Initiator};
use crate::protocol::constants::{FRAME_MIN_SIZE, PROTOCOL_HEADER};
use crate::protocol::frame::{self, Frame, FrameDecoder};
use crate::protocol::methods::{connection, Method};
use crate::protocol::{FieldTable, MethodId, ReplyCode, ShortString};
use crate::transport::Stream;

/// What the handshake settled.
#[derive(Debug, Clone)]
pub(crate) struct Negotiated {
    /// Highest usable channel id.
    pub channel_max: u16,
    /// Largest frame, framing included.
    pub frame_max: u32,
    /// Heartbeat interval in seconds (0: none).
    pub heartbeat: u16,
    /// What the broker said of itself.
    pub server_properties: FieldTable,
    /// Bytes read past `connection.open-ok`.
    pub leftover: BytesMut,
}

/// RabbitMQ's rule: 0 means "no limit", so take the other side's value;
/// otherwise the smaller.
fn negotiate<T: Ord + Default + Copy>(client: T, server: T) -> T {
    if client == T::default() || server == T::default() {
        client.max(server)
    } else {
        client.min(server)
    }
}

fn short(text: &str) -> ShortString {
    // Every name used here is a literal far below 255 bytes.
    ShortString::new(text).unwrap_or_default()
}

fn client_properties(config: &Config) -> FieldTable {
    let capabilities = FieldTable::new()
        .with(short("publisher_confirms"), true)
        .with(short("exchange_exchange_bindings"), true)
        .with(short("basic.nack"), true)
        .with(short("consumer_cancel_notify"), true)
        .with(short("connection.blocked"), true)
        .with(short("authentication_failure_close"), true);
    let mut properties = FieldTable::new()
        .with(short("product"), env!("CARGO_PKG_NAME"))
        .with(short("version"), env!("CARGO_PKG_VERSION"))
        .with(short("platform"), "Rust")
        .with(
            short("information"),
            concat!("https://crates.io/crates/", env!("CARGO_PKG_NAME")),
        )
        .with(short("capabilities"), capabilities);
    if let Some(name) = &config.connection_name {
        properties.insert(short("connection_name"), name.as_str());
    }
    for (key, value) in config.client_properties.iter() {
        properties.insert(key.clone(), value.clone());
    }
    properties
}

fn sasl_response(config: &Config) -> Bytes {
    match config.auth_mechanism {
        AuthMechanism::Plain => {
            Bytes::from(format!("\0{}\0{}", config.user, config.password).into_bytes())
        }
        AuthMechanism::AmqPlain => {
            // AMQPLAIN's response is a field table without its length prefix.
            let table = FieldTable::new()
                .with(short("LOGIN"), config.user.as_str())
                .with(short("PASSWORD"), config.password.as_str());
            let mut buf = BytesMut::new();
            crate::protocol::wire::write_table(&mut buf, &table);
            buf.freeze().slice(4..)
        }
        AuthMechanism::External => Bytes::new(),
    }
}

struct HandshakeIo<'a> {
    stream: &'a mut Stream,
    read: BytesMut,
    write: BytesMut,
    decoder: FrameDecoder,
}

impl HandshakeIo<'_> {
    async fn send(&mut self, method: Method) -> Result<(), Error> {
        // The vhost, the locale, client property keys: refused, not cut.
        method
            .check_short_strings()
            .map_err(|e| Error::bad_name(method.info().name, e))?;
        self.write.clear();
        frame::write_method(&mut self.write, 0, &method);
        tracing::trace!(channel = 0, ?method, "frame sent");
        self.stream.write_all(&self.write).await.map_err(lost)
    }

    async fn receive(&mut self) -> Result<Method, Error> {
        loop {
            let decoded = match self.decoder.decode(&mut self.read) {
                Ok(decoded) => decoded,
                Err(error) => {
                    // Tell the peer why before dropping the socket.
                    let close = connection::Close {
                        reply_code: error.reply_code().code(),
                        reply_text: ShortString::new(
                            error.to_string().chars().take(200).collect::<String>(),
                        )
                        .unwrap_or_default(),
                        class_id: 0,
                        method_id: 0,
                    };
                    let _ = self.send(Method::ConnectionClose(close)).await;
                    return Err(error.into());
                }
            };
            if let Some(frame) = decoded {
                tracing::trace!(?frame, "frame received");
                match frame {
                    Frame::Method { channel: 0, method } => return Ok(method),
                    Frame::Heartbeat => continue,
                    other => {
                        return Err(Error::UnexpectedFrame(format!(
                            "{other:?} during the handshake"
                        )))
                    }
                }
            }
            self.read.reserve(4096);
            let n = self.stream.read_buf(&mut self.read).await.map_err(lost)?;
            if n == 0 {
                return Err(lost(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the socket during the handshake",
                )));
            }
        }
    }
}

fn lost(e: std::io::Error) -> Error {
    Error::ConnectionLost(std::sync::Arc::new(e))
}

fn broker_close(close: &connection::Close) -> CloseReason {
    CloseReason {
        code: ReplyCode(close.reply_code),
        text: close.reply_text.to_string(),
        method: Some(MethodId::new(close.class_id, close.method_id)),
        initiator: Initiator::Broker,
    }
}

/// Runs the handshake on a freshly opened stream.
pub(crate) async fn handshake(stream: &mut Stream, config: &Config) -> Result<Negotiated, Error> {
    stream.write_all(&PROTOCOL_HEADER).await.map_err(lost)?;
    let mut io = HandshakeIo {
        stream,
        read: BytesMut::with_capacity(8192),
        write: BytesMut::with_capacity(1024),
        // Before tuning a peer may send frames up to frame-min-size; RabbitMQ's
        // start is well below it, other servers' may not be, so allow more.
        decoder: FrameDecoder::new(config.frame_max.max(FRAME_MIN_SIZE * 32)),
    };

    // A server that does not speak 0-9-1 answers with its own header and closes.
    while io.read.len() < 8 {
        io.read.reserve(4096);
        let n = io.stream.read_buf(&mut io.read).await.map_err(lost)?;
        if n == 0 {
            break;
        }
        if io.read.starts_with(b"AMQP") && io.read.len() >= 8 {
            break;
        }
        if !io.read.starts_with(&b"AMQP"[..io.read.len().min(4)]) {
            break;
        }
    }
    if io.read.starts_with(b"AMQP") {
        return Err(Error::ProtocolVersion {
            server_header: io.read[..io.read.len().min(8)].to_vec(),
        });
    }
    // A TLS record (alert 0x15 or handshake 0x16, version 3.x) instead of AMQP.
    if config.tls.is_none()
        && matches!(io.read.first(), Some(0x15 | 0x16))
        && io.read.get(1) == Some(&3)
    {
        return Err(Error::Tls {
            address: config.address(),
            reason: "the server speaks TLS on this port: use amqps://".to_owned(),
        });
    }

    let start = match io.receive().await? {
        Method::ConnectionStart(start) => start,
        other => {
            return Err(Error::UnexpectedFrame(format!(
                "{} instead of connection.start",
                other.info().name
            )))
        }
    };
    let mechanism = config.auth_mechanism.name();
    let offered = String::from_utf8_lossy(&start.mechanisms).into_owned();
    if !offered.split(' ').any(|m| m == mechanism) {
        return Err(Error::Mechanism {
            wanted: mechanism,
            offered,
        });
    }
    let response = sasl_response(config);
    io.send(Method::ConnectionStartOk(connection::StartOk {
        client_properties: client_properties(config),
        mechanism: short(mechanism),
        response: response.clone(),
        locale: ShortString::from(&config.locale),
    }))
    .await?;

    let tune = loop {
        match io.receive().await {
            Ok(Method::ConnectionSecure(_)) => {
                io.send(Method::ConnectionSecureOk(connection::SecureOk {
                    response: response.clone(),
                }))
                .await?;
            }
            Ok(Method::ConnectionTune(tune)) => break tune,
            Ok(Method::ConnectionClose(close)) => {
                let _ = io
                    .send(Method::ConnectionCloseOk(connection::CloseOk {}))
                    .await;
                return Err(Error::AuthenticationFailed {
                    user: config.user.clone(),
                    text: close.reply_text.to_string(),
                });
            }
            Ok(other) => {
                return Err(Error::UnexpectedFrame(format!(
                    "{} instead of connection.tune",
                    other.info().name
                )))
            }
            // Brokers without authentication_failure_close just drop the socket.
            Err(Error::ConnectionLost(_)) => {
                return Err(Error::AuthenticationFailed {
                    user: config.user.clone(),
                    text: "the broker closed the socket after authentication".to_owned(),
                })
            }
            Err(e) => return Err(e),
        }
    };

    let channel_max = match negotiate(config.channel_max, tune.channel_max) {
        0 => u16::MAX,
        n => n,
    };
    let frame_max = match negotiate(config.frame_max, tune.frame_max) {
        0 => u32::MAX,
        n => n.max(FRAME_MIN_SIZE),
    };
    let heartbeat = negotiate(config.heartbeat, tune.heartbeat);
    io.send(Method::ConnectionTuneOk(connection::TuneOk {
        channel_max,
        frame_max,
        heartbeat,
    }))
    .await?;
    io.send(Method::ConnectionOpen(connection::Open {
        virtual_host: ShortString::from(&config.vhost),
    }))
    .await?;
    match io.receive().await? {
        Method::ConnectionOpenOk(_) => {}
        Method::ConnectionClose(close) => {
            let _ = io
                .send(Method::ConnectionCloseOk(connection::CloseOk {}))
                .await;
            let reason = broker_close(&close);
            if reason.code == ReplyCode::ACCESS_REFUSED
                && close.class_id == 10
                && close.method_id == 11
            {
                return Err(Error::AuthenticationFailed {
                    user: config.user.clone(),
                    text: reason.text,
                });
            }
            return Err(Error::VhostRefused {
                vhost: config.vhost.clone(),
                reason,
            });
        }
        other => {
            return Err(Error::UnexpectedFrame(format!(
                "{} instead of connection.open-ok",
                other.info().name
            )))
        }
    }
    tracing::debug!(channel_max, frame_max, heartbeat, "connection tuned");
    Ok(Negotiated {
        channel_max,
        frame_max,
        heartbeat,
        server_properties: start.server_properties,
        leftover: io.read,
    })
}

#[cfg(test)]
mod tests {
    use super::negotiate;

    #[test]
    fn zero_means_no_limit_otherwise_the_smaller() {
        assert_eq!(negotiate(0u16, 2047), 2047);
        assert_eq!(negotiate(100u16, 0), 100);
        assert_eq!(negotiate(100u16, 2047), 100);
        assert_eq!(negotiate(0u32, 0), 0);
        assert_eq!(negotiate(131_072u32, 65_536), 65_536);
    }

    #[test]
    fn amqplain_response_is_a_table_without_its_length() {
        let config = crate::Config::default()
            .credentials("u", "p")
            .auth_mechanism(crate::config::AuthMechanism::AmqPlain);
        let r = super::sasl_response(&config);
        assert_eq!(
            &r[..],
            b"\x05LOGINS\x00\x00\x00\x01u\x08PASSWORDS\x00\x00\x00\x01p"
        );
    }
}
