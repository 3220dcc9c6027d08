//! The one task that owns the socket: it reads frames into the state machine,
//! takes commands from handles, keeps time for heartbeats, writes what the
//! machine produces in large batches, and reconnects when the socket is lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::command_queue::CommandReceiver;
use crate::config::Config;
use crate::connect::{jitter, open_stream, ConnectInfo};
use crate::error::Error;
use crate::events::RecoveryEvent;
use crate::link::{ControlReceiver, Shared};
use crate::machine::RawDelivery;
use crate::outbox::Outbox;
use crate::ports::{route, Command, Machine, Signals};
use crate::protocol::constants::FRAME_END;
use crate::protocol::frame::FrameDecoder;
use crate::protocol::{FrameError, ReplyCode};
use crate::transport::{Reader, Stream, Writer};

/// How much the task writes per batch before it looks at the socket again.
const WRITE_BATCH: usize = 256 * 1024;
/// How much room it makes for a socket read while bytes keep coming.
const READ_CHUNK: usize = 64 * 1024;
/// A read or write batch under this size means the connection is quiet
/// (heartbeats, a call now and then): the next read gets only this much
/// room, and a buffer emptied by such a batch is released, so that an idle
/// connection holds this much read room and no write buffer. A read that
/// fills its room, or a large batch, grows them again.
const QUIET_IO: usize = 4 * 1024;
/// Body frames with at least this much payload still to come are read from
/// the socket straight into their message's buffer (see [`DirectBody`]).
const DIRECT_BODY_MIN: usize = 32 * 1024;
/// What is read after a payload read straight into its message: the frame's
/// end and the next frame's prefix, so that a next body frame is read
/// straight too, as little of it as possible through the read buffer.
const END_AND_PREFIX: usize = 8;
/// How long a last frame (a close, a close-ok) may take to go out before the
/// socket is dropped.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Called after each reconnect (the connection runs its on-connect hook).
pub(crate) type OnReconnect = Box<dyn Fn(ConnectInfo) + Send + Sync>;

/// Where the handles' commands arrive.
pub(crate) struct Queues {
    pub commands: CommandReceiver,
    /// Closes and forgotten consumers, taken even while the connection recovers.
    pub control: ControlReceiver,
}

/// A socket that finished the handshake.
pub(crate) struct Socket {
    pub stream: Stream,
    /// The frame limit negotiated on it.
    pub frame_max: u32,
    /// Bytes read past the handshake.
    pub leftover: BytesMut,
    /// Which of the config's addresses it is connected to.
    pub address_index: usize,
}

/// A body frame's payload being read from the socket into its message's
/// buffer, lent by the machine: large bodies then cost no copy beyond the
/// kernel's. The frame's end octet is checked once the payload is in.
struct DirectBody {
    channel: u16,
    buffer: Vec<u8>,
    /// Payload bytes still to read.
    remaining: usize,
}

pub(crate) struct Driver {
    reader: Reader,
    writer: Writer,
    machine: Machine,
    /// Where the machine's connection-wide events go.
    signals: Signals,
    decoder: FrameDecoder,
    read_buf: BytesMut,
    /// The size of the latest socket read (see [`QUIET_IO`]).
    last_read: usize,
    /// A body frame whose payload is read straight into its message.
    direct: Option<DirectBody>,
    commands: CommandReceiver,
    control: ControlReceiver,
    shared: Arc<Shared>,
    config: Arc<Config>,
    on_reconnect: Option<OnReconnect>,
    /// The address the current socket is connected to.
    address_index: usize,
    /// How many times the connection was re-established.
    reconnects: u64,
    /// Every handle is gone and the command queue is empty.
    commands_done: bool,
    control_done: bool,
}

async fn reserve(
    sender: Option<mpsc::Sender<RawDelivery>>,
) -> Result<mpsc::OwnedPermit<RawDelivery>, ()> {
    match sender {
        Some(sender) => sender.reserve_owned().await.map_err(|_| ()),
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Reads what the socket has into `buf`, up to `room` bytes made for it.
///
/// An idle connection thus holds `room` (the quiet size) while it waits.
/// Waiting for readability first and making room only then (TCP's
/// `readable` + `try_read_buf`) would hold none, but with 1 MiB bodies it
/// raised the consume path's peak RSS from 40-60 MiB to 0.1-1.3 GB (not yet
/// understood), so it is not done.
async fn read_into(reader: &mut Reader, buf: &mut BytesMut, room: usize) -> std::io::Result<usize> {
    buf.reserve(room);
    // No more than `room`, whatever else the buffer has room for (the
    // decoder makes room for a whole frame it has the start of): so that
    // most of a large body frame is left to be read straight into its
    // message (`DirectBody`).
    tokio::io::AsyncReadExt::read_buf(reader, &mut buf.limit(room)).await
}

/// Reads what the socket has: into the message's buffer while a direct
/// body frame's payload comes, then its end and the next frame's prefix
/// into `buf`, else into `buf` with `room` bytes made for it.
async fn read_socket(
    reader: &mut Reader,
    buf: &mut BytesMut,
    direct: &mut Option<DirectBody>,
    room: usize,
) -> std::io::Result<usize> {
    match direct {
        Some(direct) if direct.remaining > 0 => {
            let mut payload = (&mut direct.buffer).limit(direct.remaining);
            let n = tokio::io::AsyncReadExt::read_buf(reader, &mut payload).await?;
            direct.remaining -= n;
            Ok(n)
        }
        Some(_) => read_into(reader, buf, END_AND_PREFIX).await,
        None => read_into(reader, buf, room).await,
    }
}

/// The room the next read gets after one of `last_read` bytes.
fn read_room(last_read: usize) -> usize {
    if last_read < QUIET_IO {
        QUIET_IO
    } else {
        READ_CHUNK
    }
}

/// Releases `buf` once a quiet read or write batch (of `size` bytes) left
/// nothing in it: the room a busy one before it needed is not kept. Bytes
/// read may live on in the bodies sliced from it: the allocation is theirs
/// then.
fn release_if_quiet(buf: &mut BytesMut, size: usize) {
    // Whatever `capacity()` says: it counts only the room past the bytes
    // consumed, not the allocation.
    if buf.is_empty() && size < QUIET_IO {
        *buf = BytesMut::new();
    }
}

/// Releases the outbox's encoding room as [`release_if_quiet`] does, once
/// a quiet batch is all written.
fn release_outbox_if_quiet(outbox: &mut Outbox, size: usize) {
    if outbox.is_empty() {
        release_if_quiet(outbox.tail_mut(), size);
    }
}

/// Makes room for the next batch: a busy connection (the previous batch
/// was not quiet) gets a whole batch's room at once, as it keeps it, rather
/// than growing it (and moving its unwritten bytes) a doubling at a time.
fn room_for_batch(buf: &mut BytesMut, previous_batch: usize) {
    if previous_batch >= QUIET_IO && buf.capacity() < WRITE_BATCH {
        let mut room = BytesMut::with_capacity(WRITE_BATCH);
        room.extend_from_slice(buf);
        *buf = room;
    }
}

fn lost(e: std::io::Error) -> Error {
    Error::ConnectionLost(Arc::new(e))
}

impl Driver {
    pub(crate) fn new(
        machine: Machine,
        signals: Signals,
        socket: Socket,
        Queues { commands, control }: Queues,
        shared: Arc<Shared>,
        config: Arc<Config>,
        on_reconnect: Option<OnReconnect>,
    ) -> Self {
        let (reader, writer) = socket.stream.into_split();
        Self {
            reader,
            writer,
            machine,
            signals,
            decoder: FrameDecoder::new(socket.frame_max),
            read_buf: socket.leftover,
            last_read: 0,
            direct: None,
            commands,
            control,
            shared,
            config,
            on_reconnect,
            address_index: socket.address_index,
            reconnects: 0,
            commands_done: false,
            control_done: false,
        }
    }

    /// Delivers what the machine produced to the handles; called after each
    /// thing the machine is handed, before the task waits again.
    fn route(&mut self) {
        route(&mut self.machine, &self.signals);
    }

    /// Decodes and handles the frames in the read buffer, stopping early when
    /// a consumer's buffer is full.
    fn handle_input(&mut self) {
        while !self.machine.is_paused()
            && !self.machine.is_closed()
            && !self.machine.is_interrupted()
        {
            if self.direct.is_some() {
                if !self.end_direct_body() {
                    break;
                }
                self.route();
                continue;
            }
            match self.decoder.decode(&mut self.read_buf) {
                Ok(Some(frame)) => {
                    if let Err(error) = self.machine.handle_frame(frame) {
                        self.machine.protocol_error(error);
                    }
                }
                Ok(None) => {
                    if self.start_direct_body() {
                        continue;
                    }
                    break;
                }
                Err(error) => self.machine.protocol_error(Error::Protocol(error)),
            }
            // Each delivery placed (or parked) before the next frame, so
            // that a full consumer buffer pauses reading where it fills.
            self.route();
        }
    }

    /// Reads the partial body frame at the front of the read buffer
    /// straight into its message, if it is large and the machine lends the
    /// buffer; whether it does.
    fn start_direct_body(&mut self) -> bool {
        let Some((channel, size)) = self.decoder.partial_body(&self.read_buf) else {
            return false;
        };
        // What of the payload is here is copied; the rest is worth reading
        // straight only if it is large.
        let here = (self.read_buf.len() - 7).min(size);
        if size - here < DIRECT_BODY_MIN {
            return false;
        }
        let Some(mut buffer) = self.machine.lend_body_buffer(channel, size) else {
            return false;
        };
        self.read_buf.advance(7);
        buffer.extend_from_slice(&self.read_buf[..here]);
        self.read_buf.advance(here);
        self.direct = Some(DirectBody {
            channel,
            buffer,
            remaining: size - here,
        });
        true
    }

    /// Once a direct body frame's payload is in and its end octet read,
    /// checks the octet and hands the buffer back to the machine; whether
    /// that happened (else more bytes are needed).
    fn end_direct_body(&mut self) -> bool {
        let Some(&end) = self.read_buf.first() else {
            return false;
        };
        let Some(DirectBody {
            channel, buffer, ..
        }) = self.direct.take_if(|direct| direct.remaining == 0)
        else {
            return false;
        };
        if end != FRAME_END {
            self.machine
                .protocol_error(Error::Protocol(FrameError::BadFrameEnd {
                    found: end,
                    channel,
                }));
            return true;
        }
        self.read_buf.advance(1);
        if let Err(error) = self.machine.body_frame_read(channel, buffer) {
            self.machine.protocol_error(error);
        }
        true
    }

    pub(crate) async fn run(mut self) {
        self.signals.telemetry.telemetry().connection_started();
        loop {
            self.run_session().await;
            self.route();
            if !self.machine.is_interrupted() {
                break;
            }
            if let Some(cause) = self.machine.take_loss() {
                self.shared.report(&cause);
            }
            // Boxed: its connect and handshake futures would otherwise
            // size the task of every connection, however idle (some 2.5 KB).
            if let Err(error) = Box::pin(self.reconnect()).await {
                tracing::error!(%error, "recovery gave up");
                self.machine.fail(error);
                self.route();
                break;
            }
            self.route();
        }
        let error = self.machine.error().cloned();
        // Handles that were waiting in the queues learn why.
        self.commands.close();
        self.take_commands();
        self.control.close();
        while let Ok(command) = self.control.try_recv() {
            self.machine.command(*command, Instant::now());
        }
        self.route();
        self.signals.telemetry.telemetry().connection_ended();
        self.shared.finish(error);
    }

    /// Runs one socket until the machine is over or the socket is lost.
    async fn run_session(&mut self) {
        // Grown by what the machine writes into it, released when quiet.
        let mut write_buf = Outbox::default();
        // How much the latest batch put in it.
        let mut batch = 0;
        let mut socket_ok = true;
        // Leftover bytes from the handshake.
        self.last_read = 0;
        self.direct = None;
        self.handle_input();
        release_if_quiet(&mut self.read_buf, self.last_read);
        loop {
            self.route();
            if self.machine.is_closed() || self.machine.is_interrupted() {
                // Last frames (a close, a close-ok) go out if they can.
                self.machine.write_frames(&mut write_buf, usize::MAX);
                if socket_ok && !write_buf.is_empty() {
                    if let Ok(Ok(written)) =
                        tokio::time::timeout(FLUSH_TIMEOUT, write_buf.write_all(&mut self.writer))
                            .await
                    {
                        self.signals.telemetry.telemetry().bytes_sent(written);
                    }
                }
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, self.writer.shutdown()).await;
                return;
            }
            if write_buf.len() < WRITE_BATCH / 2 && self.machine.wants_to_write() {
                room_for_batch(write_buf.tail_mut(), batch);
                self.machine.write_frames(&mut write_buf, WRITE_BATCH);
                batch = write_buf.len();
            }
            if self.commands_gone() && self.machine.accepts_commands() {
                // Every handle is gone: close gracefully.
                tracing::debug!("last handle dropped: closing the connection");
                self.machine.command(
                    Command::CloseConnection {
                        code: ReplyCode::REPLY_SUCCESS,
                        text: "connection dropped by the application".to_owned(),
                    },
                    Instant::now(),
                );
                continue;
            }
            let accepting = self.machine.accepts_commands();
            let parked = self.machine.parked_outlet().cloned();
            let paused = self.machine.is_paused();
            let deadline = self.machine.next_timeout();
            let read_room = read_room(self.last_read);
            let Driver {
                reader,
                writer,
                read_buf,
                direct,
                commands,
                control,
                ..
            } = self;
            tokio::select! {
                biased;
                written = write_buf.write_some(writer), if !write_buf.is_empty() => {
                    match written {
                        Ok(0) => {
                            socket_ok = false;
                            self.machine.connection_lost(lost(std::io::ErrorKind::WriteZero.into()));
                        }
                        Ok(n) => {
                            self.signals.telemetry.telemetry().bytes_sent(n);
                            write_buf.advance(n);
                            release_outbox_if_quiet(&mut write_buf, batch);
                            self.machine.on_sent(Instant::now());
                        }
                        Err(e) => {
                            socket_ok = false;
                            self.machine.connection_lost(lost(e));
                        }
                    }
                }
                command = control.recv(), if !self.control_done => {
                    if command.is_none() {
                        self.control_done = true;
                    }
                    if let Some(command) = command {
                        // A handle dropped after it published or acked: what it
                        // queued before the drop goes out before the close.
                        if self.machine.accepts_commands() {
                            self.take_commands();
                        }
                        self.machine.command(*command, Instant::now());
                    }
                }
                permit = reserve(parked) => match permit {
                    Ok(permit) => {
                        self.machine.unpark(
                            |delivery| {
                                permit.send(delivery);
                            },
                            Instant::now(),
                        );
                        self.handle_input();
                    }
                    Err(()) => {
                        self.machine.drop_parked();
                        self.handle_input();
                    }
                },
                read = read_socket(reader, read_buf, direct, read_room), if !paused => {
                    match read {
                        Ok(0) => {
                            socket_ok = false;
                            self.machine.connection_lost(lost(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the broker closed the socket",
                            )));
                        }
                        Ok(n) => {
                            self.signals.telemetry.telemetry().bytes_received(n);
                            // Reads around a direct body are small by design:
                            // not a quiet connection.
                            self.last_read = if self.direct.is_some() { READ_CHUNK } else { n };
                            self.machine.on_received(Instant::now());
                            self.handle_input();
                            release_if_quiet(&mut self.read_buf, self.last_read);
                        }
                        Err(e) => {
                            socket_ok = false;
                            self.machine.connection_lost(lost(e));
                        }
                    }
                }
                () = commands.ready(), if accepting && !self.commands_done => {
                    self.commands_done = self.commands.is_done();
                    self.take_commands();
                },
                () = sleep_until(deadline) => self.machine.handle_timeout(Instant::now()),
            }
            // Whatever the handles queued meanwhile, in one batch.
            if self.machine.accepts_commands() {
                self.take_commands();
            }
        }
    }

    /// Hands everything queued (commands and settlements, in queue order)
    /// to the machine.
    fn take_commands(&mut self) {
        let now = Instant::now();
        for command in self.commands.take() {
            self.machine.command(command, now);
        }
    }

    /// Whether every handle is gone.
    fn commands_gone(&self) -> bool {
        self.commands_done && self.control_done
    }

    /// Reconnects with backoff, trying each address in turn, and hands the
    /// new socket to the machine, which re-creates channels, topology and
    /// consumers. Control commands are served while waiting.
    async fn reconnect(&mut self) -> Result<(), Error> {
        let recovery = self.config.recovery.clone();
        let mut attempt = 0u32;
        let mut authentication_failures = 0u32;
        loop {
            let delay = recovery.delay(attempt, jitter());
            tracing::info!(attempt, ?delay, "reconnecting");
            let wake = tokio::time::Instant::now() + delay;
            loop {
                if self.machine.is_closed() {
                    return Err(self
                        .machine
                        .error()
                        .cloned()
                        .unwrap_or_else(|| lost(std::io::ErrorKind::NotConnected.into())));
                }
                if self.commands.is_sender_gone() && self.control_done {
                    return Err(Error::connection_closed(
                        crate::error::CloseReason::by_application(
                            ReplyCode::REPLY_SUCCESS,
                            "connection dropped by the application during recovery",
                        ),
                    ));
                }
                tokio::select! {
                    () = tokio::time::sleep_until(wake) => break,
                    command = self.control.recv(), if !self.control_done => {
                        if command.is_none() {
                            self.control_done = true;
                        }
                        if let Some(command) = command {
                            self.machine.command(*command, Instant::now());
                            self.route();
                        }
                    }
                }
            }
            let opened = match self.shared.config_for_attempt(&self.config).await {
                Ok(config) => open_stream(&config, Some(self.address_index)).await,
                Err(error) => Err(error),
            };
            match opened {
                Ok((stream, negotiated, index)) => {
                    let address = self.config.at(&self.config.addresses()[index]).address();
                    self.address_index = index;
                    let (reader, writer) = stream.into_split();
                    self.reader = reader;
                    self.writer = writer;
                    self.decoder = FrameDecoder::new(negotiated.frame_max);
                    self.read_buf = negotiated.leftover;
                    let _ = self.shared.events.send(RecoveryEvent::Reconnected {
                        address: address.clone(),
                    });
                    self.reconnects += 1;
                    self.signals.telemetry.telemetry().reconnected();
                    let info = ConnectInfo {
                        reconnects: self.reconnects,
                        attempt: attempt + 1,
                        address,
                    };
                    // Before recovery ends and handles queue frames again,
                    // which they check against the new broker's limit.
                    self.shared
                        .frame_max
                        .store(negotiated.frame_max, std::sync::atomic::Ordering::Release);
                    self.machine.resume(
                        negotiated.channel_max,
                        negotiated.frame_max,
                        Duration::from_secs(u64::from(negotiated.heartbeat)),
                        Instant::now(),
                    );
                    self.route();
                    if let Some(on_reconnect) = &self.on_reconnect {
                        on_reconnect(info);
                    }
                    return Ok(());
                }
                Err(error) => {
                    tracing::warn!(attempt, %error, "reconnect failed");
                    attempt += 1;
                    let _ = self.shared.events.send(RecoveryEvent::AttemptFailed {
                        attempt,
                        error: error.clone(),
                    });
                    if error.is_authentication_failure() {
                        // Only the application can fix credentials: tell it.
                        self.shared.report(&error);
                        authentication_failures += 1;
                        if recovery
                            .max_authentication_failures
                            .is_some_and(|max| authentication_failures >= max)
                        {
                            return Err(error);
                        }
                    } else {
                        authentication_failures = 0;
                    }
                    if recovery.max_attempts.is_some_and(|max| attempt >= max) {
                        return Err(error);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{self, Frame};
    use bytes::Bytes;
    use tokio::net::{TcpListener, TcpStream};

    /// A reader on one end of a loopback connection, and the other end.
    async fn loopback() -> (Reader, Writer, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        let (reader, writer) = Stream::Tcp(client.expect("connect")).into_split();
        (reader, writer, accepted.expect("accept").0)
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_no_read_buffer_and_a_large_frame_after_still_decodes() {
        let (mut reader, _writer, mut peer) = loopback().await;
        let mut decoder = FrameDecoder::new(1 << 20);
        // What the handshake's buffer left is released once handled.
        let mut buf = BytesMut::with_capacity(8192);
        release_if_quiet(&mut buf, 0);
        assert_eq!(buf.capacity(), 0);

        // A heartbeat: a quiet read, after which nothing is kept.
        let mut wire = BytesMut::new();
        frame::write_heartbeat(&mut wire);
        peer.write_all(&wire).await.expect("write");
        let mut last_read = 0;
        let heartbeat = loop {
            if let Some(frame) = decoder.decode(&mut buf).expect("valid") {
                break frame;
            }
            last_read = read_into(&mut reader, &mut buf, read_room(last_read))
                .await
                .expect("read");
        };
        assert_eq!(heartbeat, Frame::Heartbeat);
        release_if_quiet(&mut buf, last_read);
        assert_eq!(buf.capacity(), 0, "an idle connection keeps no read buffer");

        // A frame many times the quiet room: the reads grow to it.
        let body: Bytes = (0..300_000u32).map(|i| i as u8).collect::<Vec<_>>().into();
        let mut wire = BytesMut::new();
        frame::write_body(&mut wire, 1, &body, 1 << 20);
        let writing = tokio::spawn(async move {
            peer.write_all(&wire).await.expect("write");
            peer
        });
        let mut largest_read = 0;
        let large = loop {
            if let Some(frame) = decoder.decode(&mut buf).expect("valid") {
                break frame;
            }
            last_read = read_into(&mut reader, &mut buf, read_room(last_read))
                .await
                .expect("read");
            assert_ne!(last_read, 0, "the peer closed early");
            largest_read = largest_read.max(last_read);
            release_if_quiet(&mut buf, last_read);
        };
        assert_eq!(
            large,
            Frame::Body {
                channel: 1,
                payload: body
            }
        );
        assert!(largest_read > QUIET_IO, "largest read {largest_read}");
        let _peer = writing.await.expect("writer");
    }

    #[test]
    fn a_busy_write_buffer_is_kept_whole_and_released_after_a_quiet_batch() {
        let mut buf = BytesMut::new();
        // Quiet: the buffer grows only with what is written.
        room_for_batch(&mut buf, 0);
        assert_eq!(buf.capacity(), 0);
        buf.extend_from_slice(&[1; 100]);

        // Busy: a whole batch's room, the unwritten bytes kept in order.
        room_for_batch(&mut buf, 64 * 1024);
        assert!(buf.capacity() >= WRITE_BATCH);
        assert_eq!(&buf[..], &[1; 100][..]);
        buf.extend_from_slice(&vec![2; 200_000]);
        let batch = buf.len();
        buf.advance(batch);
        let room_left = buf.capacity();
        assert_ne!(room_left, 0);
        release_if_quiet(&mut buf, batch);
        assert_eq!(buf.capacity(), room_left, "kept while busy");

        // A quiet batch, all written: the busy room goes.
        buf.extend_from_slice(&[3; 8]);
        let batch = buf.len();
        buf.advance(batch);
        release_if_quiet(&mut buf, batch);
        assert_eq!(buf.capacity(), 0);
    }
}
