//! The one task that owns the socket: it reads frames into the state machine,
//! takes commands from handles, keeps time for heartbeats, writes what the
//! machine produces in large batches, and reconnects when the socket is lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::command_queue::CommandReceiver;
use crate::config::Config;
use crate::connect::{jitter, open_stream, ConnectInfo};
use crate::error::Error;
use crate::events::RecoveryEvent;
use crate::link::Shared;
use crate::machine::RawDelivery;
use crate::ports::{route, Command, Machine, Signals};
use crate::protocol::frame::FrameDecoder;
use crate::protocol::ReplyCode;
use crate::transport::{Reader, Stream, Writer};

/// How much the task writes per batch before it looks at the socket again.
const WRITE_BATCH: usize = 256 * 1024;
/// How much room it makes for each socket read.
const READ_CHUNK: usize = 64 * 1024;
/// How long a last frame (a close, a close-ok) may take to go out before the
/// socket is dropped.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Called after each reconnect (the connection runs its on-connect hook).
pub(crate) type OnReconnect = Box<dyn Fn(ConnectInfo) + Send + Sync>;

/// Where the handles' commands arrive.
pub(crate) struct Queues {
    pub commands: CommandReceiver,
    /// Closes and forgotten consumers, taken even while the connection recovers.
    pub control: mpsc::UnboundedReceiver<Command>,
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

pub(crate) struct Driver {
    reader: Reader,
    writer: Writer,
    machine: Machine,
    /// Where the machine's connection-wide events go.
    signals: Signals,
    decoder: FrameDecoder,
    read_buf: BytesMut,
    commands: CommandReceiver,
    control: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Shared>,
    config: Config,
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
        config: Config,
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
            match self.decoder.decode(&mut self.read_buf) {
                Ok(Some(frame)) => {
                    if let Err(error) = self.machine.handle_frame(frame) {
                        self.machine.protocol_error(error);
                    }
                }
                Ok(None) => break,
                Err(error) => self.machine.protocol_error(Error::Protocol(error)),
            }
            // Each delivery placed (or parked) before the next frame, so
            // that a full consumer buffer pauses reading where it fills.
            self.route();
        }
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
            if let Err(error) = self.reconnect().await {
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
            self.machine.command(command, Instant::now());
        }
        self.route();
        self.signals.telemetry.telemetry().connection_ended();
        self.shared.finish(error);
    }

    /// Runs one socket until the machine is over or the socket is lost.
    async fn run_session(&mut self) {
        let mut write_buf = BytesMut::with_capacity(WRITE_BATCH);
        let mut socket_ok = true;
        // Leftover bytes from the handshake.
        self.handle_input();
        loop {
            self.route();
            if self.machine.is_closed() || self.machine.is_interrupted() {
                // Last frames (a close, a close-ok) go out if they can.
                self.machine.write_frames(&mut write_buf, usize::MAX);
                if socket_ok && !write_buf.is_empty() {
                    if let Ok(Ok(())) =
                        tokio::time::timeout(FLUSH_TIMEOUT, self.writer.write_all(&write_buf)).await
                    {
                        self.signals
                            .telemetry
                            .telemetry()
                            .bytes_sent(write_buf.len());
                    }
                }
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, self.writer.shutdown()).await;
                return;
            }
            if write_buf.len() < WRITE_BATCH / 2 && self.machine.wants_to_write() {
                self.machine.write_frames(&mut write_buf, WRITE_BATCH);
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
            let Driver {
                reader,
                writer,
                read_buf,
                commands,
                control,
                ..
            } = self;
            tokio::select! {
                biased;
                written = writer.write(&write_buf), if !write_buf.is_empty() => {
                    match written {
                        Ok(0) => {
                            socket_ok = false;
                            self.machine.connection_lost(lost(std::io::ErrorKind::WriteZero.into()));
                        }
                        Ok(n) => {
                            self.signals.telemetry.telemetry().bytes_sent(n);
                            write_buf.advance(n);
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
                        self.machine.command(command, Instant::now());
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
                read = { read_buf.reserve(READ_CHUNK); reader.read_buf(read_buf) }, if !paused => {
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
                            self.machine.on_received(Instant::now());
                            self.handle_input();
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
                            self.machine.command(command, Instant::now());
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
