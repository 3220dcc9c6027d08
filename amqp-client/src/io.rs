//! The one task that owns the socket: it reads frames into the state machine,
//! takes commands from handles, keeps time for heartbeats, and writes what the
//! machine produces in large batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::connection::Shared;
use crate::error::Error;
use crate::machine::{Command, Machine, RawDelivery};
use crate::protocol::frame::FrameDecoder;
use crate::protocol::ReplyCode;
use crate::transport::{Reader, Writer};

/// How much the task writes per batch before it looks at the socket again.
const WRITE_BATCH: usize = 256 * 1024;
/// How much room it makes for each socket read.
const READ_CHUNK: usize = 64 * 1024;

pub(crate) struct Driver {
    pub reader: Reader,
    pub writer: Writer,
    pub machine: Machine,
    pub decoder: FrameDecoder,
    pub read_buf: BytesMut,
    pub commands: mpsc::Receiver<Command>,
    pub control: mpsc::UnboundedReceiver<Command>,
    pub shared: Arc<Shared>,
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

impl Driver {
    /// Decodes and handles the frames in the read buffer, stopping early when
    /// a consumer's buffer is full.
    fn handle_input(&mut self) {
        while self.machine.parked_sender().is_none() && !self.machine.is_closed() {
            match self.decoder.decode(&mut self.read_buf) {
                Ok(Some(frame)) => {
                    if let Err(error) = self.machine.handle_frame(frame) {
                        self.machine.protocol_error(error);
                    }
                }
                Ok(None) => break,
                Err(error) => self.machine.protocol_error(Error::Protocol(error)),
            }
        }
    }

    pub(crate) async fn run(mut self) {
        let mut write_buf = BytesMut::with_capacity(WRITE_BATCH);
        let mut commands_open = true;
        let mut control_open = true;
        let mut reading = true;
        // Leftover bytes from the handshake.
        self.handle_input();
        loop {
            if write_buf.len() < WRITE_BATCH / 2 && self.machine.wants_to_write() {
                self.machine.write_frames(&mut write_buf, WRITE_BATCH);
            }
            if self.machine.is_closed() && write_buf.is_empty() {
                break;
            }
            if !commands_open && !control_open && self.machine.accepts_commands() {
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
            let parked = self.machine.parked_sender();
            let paused = parked.is_some();
            let deadline = self.machine.next_timeout();
            let Driver {
                reader,
                writer,
                read_buf,
                commands,
                control,
                ..
            } = &mut self;
            tokio::select! {
                biased;
                written = writer.write(&write_buf), if !write_buf.is_empty() => {
                    match written {
                        Ok(0) => self.machine.fail(Error::ConnectionLost(Arc::new(std::io::ErrorKind::WriteZero.into()))),
                        Ok(n) => {
                            write_buf.advance(n);
                            self.machine.on_sent(Instant::now());
                        }
                        Err(e) => self.machine.fail(Error::ConnectionLost(Arc::new(e))),
                    }
                }
                command = control.recv(), if control_open => match command {
                    Some(command) => self.machine.command(command, Instant::now()),
                    None => control_open = false,
                },
                permit = reserve(parked) => match permit {
                    Ok(permit) => {
                        self.machine.unpark(permit, Instant::now());
                        self.handle_input();
                    }
                    Err(()) => {
                        self.machine.drop_parked();
                        self.handle_input();
                    }
                },
                read = { read_buf.reserve(READ_CHUNK); reader.read_buf(read_buf) }, if reading && !paused => {
                    match read {
                        Ok(0) => {
                            reading = false;
                            self.machine.fail(Error::ConnectionLost(Arc::new(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the broker closed the socket",
                            ))));
                        }
                        Ok(_) => {
                            self.machine.on_received(Instant::now());
                            self.handle_input();
                        }
                        Err(e) => {
                            reading = false;
                            self.machine.fail(Error::ConnectionLost(Arc::new(e)));
                        }
                    }
                }
                command = commands.recv(), if commands_open && accepting => match command {
                    Some(command) => {
                        let now = Instant::now();
                        self.machine.command(command, now);
                        // Take what else is queued without another trip through select.
                        for _ in 0..256 {
                            match self.commands.try_recv() {
                                Ok(command) => self.machine.command(command, now),
                                Err(_) => break,
                            }
                        }
                    }
                    None => commands_open = false,
                },
                () = sleep_until(deadline) => self.machine.handle_timeout(Instant::now()),
            }
            if self.machine.is_closed() && !reading {
                // Nothing more will be written to a dead socket.
                write_buf.clear();
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.writer.shutdown()).await;
        let error = self.machine.error().cloned();
        // Handles that were waiting in the queues learn why.
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            self.machine.command(command, Instant::now());
        }
        self.control.close();
        while let Ok(command) = self.control.try_recv() {
            self.machine.command(command, Instant::now());
        }
        self.shared.finish(error);
    }
}
