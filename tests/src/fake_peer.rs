//! A scripted fake AMQP peer for what a real broker never does.
//!
//! [`FakePeer::start`] listens on `127.0.0.1:0`, accepts ONE client
//! connection and runs a script on it in a task of its own. The script gets a
//! [`PeerConnection`]: it can play the server side of a real handshake
//! ([`PeerConnection::handshake`]), read and answer the client's methods, and
//! then write anything at all, well-formed or not ([`PeerConnection::send_raw`]).
//! Frames are encoded and decoded with the client's own protocol layer.
//! [`PeerConnection::record_until_eof`] collects what the client sends
//! afterwards, so that a test can check that it answered with
//! `connection.close` and the right reply code.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use amqp_client_tests::fake_peer::{raw_frame, FakePeer, Tuning};
//!
//! let peer = FakePeer::start(|mut peer| async move {
//!     peer.handshake(&Tuning::default()).await?;
//!     let channel = peer.accept_channel_open().await?;
//!     peer.send_raw(&raw_frame(9, channel, b"junk")).await?;
//!     peer.record_until_eof().await
//! })
//! .await?;
//! let connection = amqp091::Connection::open(&peer.url()).await.unwrap();
//! let _channel = connection.open_channel().await.unwrap();
//! let error = connection.closed().await.unwrap_err();
//! let recording = peer.finish().await;
//! assert_eq!(recording.close_code(), Some(501));
//! # let _ = error;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use amqp091::protocol::frame::{self, Frame, FrameDecoder};
use amqp091::protocol::methods::{basic, channel, connection, Method};
use amqp091::protocol::{FieldTable, ShortString};
use amqp091::{BasicProperties, Config};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The protocol header of AMQP 0-9-1, which the client sends first.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";

/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;

/// Frame type of a method frame.
pub const FRAME_METHOD: u8 = 1;
/// Frame type of a content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Frame type of a content body frame.
pub const FRAME_BODY: u8 = 3;
/// Frame type of a heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;

/// The values the fake peer proposes in `connection.tune`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// `channel-max` (default 2047, RabbitMQ's).
    pub channel_max: u16,
    /// `frame-max` (default 131072, RabbitMQ's).
    pub frame_max: u32,
    /// `heartbeat` in seconds (default 0: none).
    pub heartbeat: u16,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 0,
        }
    }
}

impl Tuning {
    /// The default tuning with `frame_max` instead.
    pub fn frame_max(frame_max: u32) -> Self {
        Self {
            frame_max,
            ..Self::default()
        }
    }

    /// The default tuning with `heartbeat` (seconds) instead.
    pub fn heartbeat(heartbeat: u16) -> Self {
        Self {
            heartbeat,
            ..Self::default()
        }
    }
}

/// What the client said during the handshake.
#[derive(Debug, Clone, PartialEq)]
pub struct Handshake {
    /// Its `connection.start-ok`.
    pub start_ok: connection::StartOk,
    /// Its `connection.tune-ok`: what it settled on.
    pub tune_ok: connection::TuneOk,
    /// Its `connection.open`.
    pub open: connection::Open,
}

/// What the client sent after the script, until it closed the socket.
#[derive(Debug, Default)]
pub struct Recording {
    /// The frames, in order.
    pub frames: Vec<Frame>,
    /// Why the recording stopped when it was not a clean end of stream: a
    /// reset socket, or bytes that do not decode.
    pub error: Option<io::Error>,
}

impl Recording {
    /// The methods sent, with their channel.
    pub fn methods(&self) -> impl Iterator<Item = (u16, &Method)> {
        self.frames.iter().filter_map(|frame| match frame {
            Frame::Method { channel, method } => Some((*channel, method)),
            _ => None,
        })
    }

    /// The first `connection.close` sent (on channel 0).
    pub fn connection_close(&self) -> Option<&connection::Close> {
        self.methods().find_map(|(channel, method)| match method {
            Method::ConnectionClose(close) if channel == 0 => Some(close),
            _ => None,
        })
    }

    /// The reply code of the first `connection.close`.
    pub fn close_code(&self) -> Option<u16> {
        self.connection_close().map(|close| close.reply_code)
    }

    /// How many heartbeat frames were sent.
    pub fn heartbeats(&self) -> usize {
        self.frames
            .iter()
            .filter(|frame| matches!(frame, Frame::Heartbeat))
            .count()
    }

    /// Whether the client closed the socket cleanly (end of stream, not a reset).
    pub fn ended_cleanly(&self) -> bool {
        self.error.is_none()
    }
}

/// A fake server on `127.0.0.1` for ONE client connection.
#[derive(Debug)]
pub struct FakePeer {
    listener: TcpListener,
    address: SocketAddr,
}

impl FakePeer {
    /// Listens on `127.0.0.1:0` (a free port).
    pub async fn bind() -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let address = listener.local_addr()?;
        Ok(Self { listener, address })
    }

    /// Listens on a free port and runs `script` on the first connection, in a
    /// task of its own. The listener stops after that one connection.
    pub async fn start<F, Fut, T>(script: F) -> io::Result<Script<T>>
    where
        F: FnOnce(PeerConnection) -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let peer = Self::bind().await?;
        let address = peer.address;
        let task = tokio::spawn(async move {
            let connection = peer.accept().await?;
            script(connection).await
        });
        Ok(Script { address, task })
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        url_of(self.address)
    }

    /// Waits for the one client connection.
    pub async fn accept(self) -> io::Result<PeerConnection> {
        let (stream, _) = self.listener.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok(PeerConnection::new(stream))
    }
}

fn url_of(address: SocketAddr) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", address.port())
}

/// A running script: where to connect, and its outcome once it ends.
#[derive(Debug)]
pub struct Script<T> {
    address: SocketAddr,
    task: JoinHandle<io::Result<T>>,
}

impl<T> Script<T> {
    /// The port the fake peer listens on.
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        url_of(self.address)
    }

    /// The client config of [`url`](Self::url), to change before connecting.
    ///
    /// Recovery is off: a fake peer accepts one connection, and what it
    /// tests is how the client fails, not how it reconnects.
    pub fn config(&self) -> Config {
        let config: Config = self.url().parse().expect("the fake peer's URL is valid");
        config.recovery(amqp091::RecoveryConfig::disabled())
    }

    /// Whether the script has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the script and returns what it returned; panics when the
    /// script failed or panicked, so that the test fails with its reason.
    pub async fn finish(self) -> T {
        match self.task.await {
            Ok(Ok(value)) => value,
            Ok(Err(error)) => panic!("the fake peer's script failed: {error}"),
            Err(error) => panic!("the fake peer's script panicked: {error}"),
        }
    }

    /// Waits for the script and returns its result, whatever it was.
    pub async fn outcome(self) -> io::Result<T> {
        self.task.await.map_err(io::Error::other)?
    }

    /// Stops the script (and drops its socket) if it still runs.
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// The server side of one client connection.
#[derive(Debug)]
pub struct PeerConnection {
    stream: TcpStream,
    read_buf: BytesMut,
    decoder: FrameDecoder,
    frame_max: u32,
}

fn protocol(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn short(text: &str) -> ShortString {
    ShortString::from(text)
}

/// The `server-properties` of the fake peer's `connection.start`, with a
/// `capabilities` table like RabbitMQ's.
pub fn server_properties() -> FieldTable {
    let capabilities = FieldTable::new()
        .with(short("publisher_confirms"), true)
        .with(short("exchange_exchange_bindings"), true)
        .with(short("basic.nack"), true)
        .with(short("consumer_cancel_notify"), true)
        .with(short("connection.blocked"), true)
        .with(short("consumer_priorities"), true)
        .with(short("authentication_failure_close"), true)
        .with(short("per_consumer_qos"), true)
        .with(short("direct_reply_to"), true);
    FieldTable::new()
        .with(short("product"), "amqp-client fake peer")
        .with(short("version"), "0.0.0")
        .with(short("platform"), "Rust")
        .with(short("capabilities"), capabilities)
}

/// The fake peer's `connection.start`: version 0-9, [`server_properties`],
/// mechanisms `PLAIN AMQPLAIN`, locale `en_US`.
pub fn connection_start() -> Method {
    Method::ConnectionStart(connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties: server_properties(),
        mechanisms: Bytes::from_static(b"PLAIN AMQPLAIN"),
        locales: Bytes::from_static(b"en_US"),
    })
}

/// The bytes of one frame: type, channel, size, `payload` and the frame end.
/// Any type and payload: for frames a real broker never sends.
pub fn raw_frame(frame_type: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(payload.len() + 8);
    bytes.push(frame_type);
    bytes.extend_from_slice(&channel.to_be_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes.push(FRAME_END);
    bytes
}

/// The 7-byte prefix of a frame (type, channel, size) without its payload.
pub fn frame_prefix(frame_type: u8, channel: u16, size: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(7);
    bytes.push(frame_type);
    bytes.extend_from_slice(&channel.to_be_bytes());
    bytes.extend_from_slice(&size.to_be_bytes());
    bytes
}

/// The bytes of a well-formed method frame, encoded by the client's codec.
pub fn method_frame(channel: u16, method: &Method) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frame::write_method(&mut buf, channel, method);
    buf.to_vec()
}

/// The bytes of a well-formed content header frame.
pub fn header_frame(channel: u16, body_size: u64, properties: &BasicProperties) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frame::write_header(&mut buf, channel, body_size, properties);
    buf.to_vec()
}

impl PeerConnection {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            read_buf: BytesMut::with_capacity(8192),
            // Until tune-ok, accept what the client may send (RabbitMQ's frame_max).
            decoder: FrameDecoder::new(131_072),
            frame_max: 131_072,
        }
    }

    /// The frame_max the client settled on (131072 before the handshake).
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// Reads the client's 8-byte protocol header, whatever it is.
    pub async fn read_protocol_header(&mut self) -> io::Result<[u8; 8]> {
        while self.read_buf.len() < 8 {
            self.fill().await?;
        }
        let header = self.read_buf.split_to(8);
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&header);
        Ok(bytes)
    }

    /// Reads the protocol header and fails unless it is AMQP 0-9-1's.
    pub async fn expect_protocol_header(&mut self) -> io::Result<()> {
        let header = self.read_protocol_header().await?;
        if header != PROTOCOL_HEADER {
            return Err(protocol(format!(
                "the client sent protocol header {header:?}, not AMQP 0-9-1's"
            )));
        }
        Ok(())
    }

    /// Plays the server side of the handshake: reads the protocol header,
    /// sends [`connection_start`] (0-9, PLAIN and AMQPLAIN, en_US), reads
    /// start-ok, sends `connection.tune` with `tuning`, reads tune-ok and
    /// `connection.open`, and answers open-ok. From then on frames are read
    /// with the frame_max the client settled on.
    pub async fn handshake(&mut self, tuning: &Tuning) -> io::Result<Handshake> {
        self.expect_protocol_header().await?;
        self.send_method(0, &connection_start()).await?;
        let start_ok = match self.expect_method("connection.start-ok").await? {
            (_, Method::ConnectionStartOk(start_ok)) => start_ok,
            _ => unreachable!("expect_method checked the name"),
        };
        self.send_method(
            0,
            &Method::ConnectionTune(connection::Tune {
                channel_max: tuning.channel_max,
                frame_max: tuning.frame_max,
                heartbeat: tuning.heartbeat,
            }),
        )
        .await?;
        let tune_ok = match self.expect_method("connection.tune-ok").await? {
            (_, Method::ConnectionTuneOk(tune_ok)) => tune_ok,
            _ => unreachable!("expect_method checked the name"),
        };
        if tune_ok.frame_max != 0 {
            self.frame_max = tune_ok.frame_max;
            self.decoder.set_max_frame_size(tune_ok.frame_max);
        }
        let open = match self.expect_method("connection.open").await? {
            (_, Method::ConnectionOpen(open)) => open,
            _ => unreachable!("expect_method checked the name"),
        };
        self.send_method(0, &Method::ConnectionOpenOk(connection::OpenOk {}))
            .await?;
        Ok(Handshake {
            start_ok,
            tune_ok,
            open,
        })
    }

    /// Reads the client's `channel.open` and answers `channel.open-ok`;
    /// returns the channel id.
    pub async fn accept_channel_open(&mut self) -> io::Result<u16> {
        let (channel, _) = self.expect_method("channel.open").await?;
        self.send_method(channel, &Method::ChannelOpenOk(channel::OpenOk {}))
            .await?;
        Ok(channel)
    }

    /// Reads the client's `basic.consume` and answers `basic.consume-ok`
    /// with its tag; returns the channel and the tag.
    pub async fn accept_consume(&mut self) -> io::Result<(u16, ShortString)> {
        let (channel, consume) = self.expect_method("basic.consume").await?;
        let Method::BasicConsume(consume) = consume else {
            return Err(protocol(format!("expected basic.consume, got {consume:?}")));
        };
        let tag = consume.consumer_tag;
        self.send_method(
            channel,
            &Method::BasicConsumeOk(basic::ConsumeOk {
                consumer_tag: tag.clone(),
            }),
        )
        .await?;
        Ok((channel, tag))
    }

    /// Writes one method frame.
    pub async fn send_method(&mut self, channel: u16, method: &Method) -> io::Result<()> {
        self.send_raw(&method_frame(channel, method)).await
    }

    /// Writes one content header frame.
    pub async fn send_header(
        &mut self,
        channel: u16,
        body_size: u64,
        properties: &BasicProperties,
    ) -> io::Result<()> {
        self.send_raw(&header_frame(channel, body_size, properties))
            .await
    }

    /// Writes `body` as body frames of at most the negotiated frame_max.
    pub async fn send_body(&mut self, channel: u16, body: &[u8]) -> io::Result<()> {
        let mut buf = BytesMut::new();
        frame::write_body(&mut buf, channel, body, self.frame_max);
        self.send_raw(&buf).await
    }

    /// Writes a heartbeat frame (on channel 0).
    pub async fn send_heartbeat(&mut self) -> io::Result<()> {
        let mut buf = BytesMut::new();
        frame::write_heartbeat(&mut buf);
        self.send_raw(&buf).await
    }

    /// Writes `bytes` as they are, and flushes them.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Reads more bytes; an end of stream is an `UnexpectedEof` error.
    async fn fill(&mut self) -> io::Result<()> {
        if self.read_buf.capacity() - self.read_buf.len() < 4096 {
            self.read_buf.reserve(8192);
        }
        let n = self.stream.read_buf(&mut self.read_buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the client closed the socket ({} bytes of an incomplete frame left)",
                    self.read_buf.len()
                ),
            ));
        }
        Ok(())
    }

    /// Reads the next frame; `None` when the client closed the socket
    /// between frames. Bytes that do not decode are an `InvalidData` error.
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            match self.decoder.decode(&mut self.read_buf) {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(error) => {
                    return Err(protocol(format!("the client sent a bad frame: {error}")))
                }
            }
            match self.fill().await {
                Ok(()) => {}
                Err(error)
                    if error.kind() == io::ErrorKind::UnexpectedEof && self.read_buf.is_empty() =>
                {
                    return Ok(None)
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Reads the next method frame, skipping heartbeats; anything else, or
    /// the end of the stream, is an error.
    pub async fn read_method(&mut self) -> io::Result<(u16, Method)> {
        loop {
            match self.read_frame().await? {
                Some(Frame::Heartbeat) => continue,
                Some(Frame::Method { channel, method }) => return Ok((channel, method)),
                Some(other) => {
                    return Err(protocol(format!(
                        "expected a method frame, the client sent {other:?}"
                    )))
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "expected a method frame, the client closed the socket",
                    ))
                }
            }
        }
    }

    /// Reads the next method and fails unless it is `name` (`"channel.open"`…).
    pub async fn expect_method(&mut self, name: &str) -> io::Result<(u16, Method)> {
        let (channel, method) = self.read_method().await?;
        if method.info().name != name {
            return Err(protocol(format!(
                "expected {name}, the client sent {} on channel {channel}: {method:?}",
                method.info().name
            )));
        }
        Ok((channel, method))
    }

    /// Records every frame the client sends until it closes the socket. A
    /// reset socket or undecodable bytes end the recording too; the reason
    /// is kept in [`Recording::error`].
    pub async fn record_until_eof(&mut self) -> io::Result<Recording> {
        let mut recording = Recording::default();
        loop {
            match self.read_frame().await {
                Ok(Some(frame)) => recording.frames.push(frame),
                Ok(None) => return Ok(recording),
                Err(error) => {
                    recording.error = Some(error);
                    return Ok(recording);
                }
            }
        }
    }

    /// Waits until the client closes the socket, throwing away what it sends.
    pub async fn wait_for_eof(&mut self) -> io::Result<()> {
        let mut scratch = BytesMut::with_capacity(4096);
        loop {
            scratch.clear();
            if self.stream.read_buf(&mut scratch).await? == 0 {
                return Ok(());
            }
        }
    }

    /// The bytes read but not yet decoded.
    pub fn unread(&self) -> &[u8] {
        &self.read_buf
    }

    /// The socket itself, for scripts that need more than frames.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}
