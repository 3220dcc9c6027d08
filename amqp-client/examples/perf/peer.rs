//! Peers that cost almost nothing, so that the client's own cost can be
//! measured without a broker: `sink` answers the handshake and the calls the
//! bench makes, discards publishes and acks them in batches in confirm mode;
//! `flood` streams deliveries to every consumer as fast as the socket takes them.

use std::collections::{HashSet, VecDeque};
use std::io::IoSlice;

use amqp091::protocol::frame::{self, Frame, FrameDecoder};
use amqp091::protocol::methods::{basic, channel, confirm, connection, queue, Method};
use amqp091::protocol::{BasicProperties, FieldTable, ShortString};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bodies above this size are sent from frames encoded once, not copied
/// into the write buffer per message.
const SHARED_BODY_MIN: usize = 64 * 1024;

/// Which peer to play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Discards publishes.
    Sink,
    /// Floods consumers.
    Flood,
}

/// Serves connections on `port` until killed.
/// `limit`: how many messages a flood session sends at most (so that two
/// clients measured against it handle exactly the same frames).
pub async fn serve(
    kind: Kind,
    port: u16,
    body_size: usize,
    limit: Option<u64>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            if let Err(e) = Session::new(stream, kind, body_size, limit).run().await {
                eprintln!("peer: connection ended: {e}");
            }
        });
    }
}

struct Session {
    stream: TcpStream,
    kind: Kind,
    read: BytesMut,
    write: BytesMut,
    decoder: FrameDecoder,
    confirming: HashSet<u16>,
    /// Last publish sequence number per confirming channel, and whether an ack is owed.
    confirm_seq: Vec<(u16, u64, bool)>,
    /// Channels with a flooding consumer: (channel, consumer tag, next delivery tag).
    floods: Vec<(u16, ShortString, u64)>,
    body: Vec<u8>,
    /// The body's frames, encoded once for the negotiated frame size (the
    /// channel number patched per flooding channel): a large body costs the
    /// flood no copy of its own, only the kernel's.
    body_frames: Vec<(u16, Bytes)>,
    /// What the flood has queued for the socket, written with `writev`.
    out: VecDeque<Bytes>,
    out_bytes: usize,
    /// Messages flooded, and the most this session sends.
    flooded: u64,
    limit: Option<u64>,
    frame_max: u32,
}

fn reply(write: &mut BytesMut, channel: u16, method: Method) {
    frame::write_method(write, channel, &method);
}

impl Session {
    fn new(stream: TcpStream, kind: Kind, body_size: usize, limit: Option<u64>) -> Self {
        Self {
            stream,
            kind,
            read: BytesMut::with_capacity(256 * 1024),
            write: BytesMut::with_capacity(256 * 1024),
            decoder: FrameDecoder::new(131_072),
            confirming: HashSet::new(),
            confirm_seq: Vec::new(),
            floods: Vec::new(),
            body: vec![b'f'; body_size],
            body_frames: Vec::new(),
            out: VecDeque::new(),
            out_bytes: 0,
            flooded: 0,
            limit,
            frame_max: 131_072,
        }
    }

    async fn run(mut self) -> std::io::Result<()> {
        let mut header = [0u8; 8];
        self.stream.read_exact(&mut header).await?;
        let start = connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: FieldTable::new()
                .with(ShortString::from_static("product"), "perf-peer"),
            mechanisms: "PLAIN AMQPLAIN".into(),
            locales: "en_US".into(),
        };
        reply(&mut self.write, 0, Method::ConnectionStart(start));
        self.flush().await?;
        loop {
            if self.kind == Kind::Flood && !self.floods.is_empty() && self.fill_flood() {
                // Keep the socket full; read whatever the client sends meanwhile.
                let slices: Vec<IoSlice<'_>> =
                    self.out.iter().take(64).map(|b| IoSlice::new(b)).collect();
                let (mut reader, mut writer) = self.stream.split();
                let read = tokio::select! {
                    written = writer.write_vectored(&slices) => Err(written?),
                    read = reader.read_buf(&mut self.read) => Ok(read?),
                };
                drop(slices);
                match read {
                    Err(written) => self.advance_out(written),
                    Ok(0) => return Ok(()),
                    Ok(_) => {
                        if !self.handle_input()? {
                            return Ok(());
                        }
                    }
                }
            } else {
                self.read.reserve(64 * 1024);
                if self.stream.read_buf(&mut self.read).await? == 0 {
                    return Ok(());
                }
                if !self.handle_input()? {
                    self.flush().await?;
                    return Ok(());
                }
                self.owe_acks();
                self.flush().await?;
            }
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.write.is_empty() {
            self.stream.write_all(&self.write).await?;
            self.write.clear();
        }
        Ok(())
    }

    /// One ack (multiple) per confirming channel per read batch.
    fn owe_acks(&mut self) {
        for (channel, seq, owed) in &mut self.confirm_seq {
            if *owed {
                reply(
                    &mut self.write,
                    *channel,
                    Method::BasicAck(basic::Ack {
                        delivery_tag: *seq,
                        multiple: true,
                    }),
                );
                *owed = false;
            }
        }
    }

    /// Drops what the socket took from the front of the flood's queue.
    fn advance_out(&mut self, mut written: usize) {
        self.out_bytes -= written;
        while written > 0 {
            let front = self.out.front_mut().expect("written bytes were queued");
            if front.len() <= written {
                written -= front.len();
                self.out.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }

    /// The body's frames for `channel`, encoded the first time they are needed.
    fn body_frames(&mut self, channel: u16) -> Bytes {
        if let Some((_, frames)) = self.body_frames.iter().find(|(c, _)| *c == channel) {
            return frames.clone();
        }
        let mut frames = BytesMut::new();
        frame::write_body(&mut frames, channel, &self.body, self.frame_max);
        let frames = frames.freeze();
        self.body_frames.push((channel, frames.clone()));
        frames
    }

    /// Queues messages until a batch waits; whether anything does.
    fn fill_flood(&mut self) -> bool {
        let properties = BasicProperties::default();
        // Replies queued by the input handled meanwhile go first.
        if !self.write.is_empty() {
            let replies = self.write.split().freeze();
            self.out_bytes += replies.len();
            self.out.push_back(replies);
        }
        while self.out_bytes < 128 * 1024 && self.limit.is_none_or(|limit| self.flooded < limit) {
            self.flooded += 1;
            for (channel, tag, next) in &mut self.floods {
                let deliver = Method::BasicDeliver(basic::Deliver {
                    consumer_tag: tag.clone(),
                    delivery_tag: *next,
                    redelivered: false,
                    exchange: ShortString::default(),
                    routing_key: ShortString::from_static("perf"),
                });
                *next += 1;
                frame::write_method(&mut self.write, *channel, &deliver);
                frame::write_header(
                    &mut self.write,
                    *channel,
                    self.body.len() as u64,
                    &properties,
                );
                if self.body.len() <= SHARED_BODY_MIN {
                    frame::write_body(&mut self.write, *channel, &self.body, self.frame_max);
                }
            }
            let heads = self.write.split().freeze();
            self.out_bytes += heads.len();
            self.out.push_back(heads);
            if self.body.len() <= SHARED_BODY_MIN {
                continue;
            }
            // A deliver and a header per channel above, then each channel's
            // body frames: a message's frames stay in order on its channel,
            // which is all AMQP asks (channels may interleave).
            let channels: Vec<u16> = self.floods.iter().map(|(c, _, _)| *c).collect();
            for channel in channels {
                let frames = self.body_frames(channel);
                self.out_bytes += frames.len();
                self.out.push_back(frames);
            }
        }
        !self.out.is_empty()
    }

    /// Handles every whole frame read; `false` once the connection closed.
    fn handle_input(&mut self) -> std::io::Result<bool> {
        loop {
            let frame = match self.decoder.decode(&mut self.read) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(true),
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            };
            let Frame::Method {
                channel: id,
                method,
            } = frame
            else {
                continue; // headers, bodies and heartbeats need no answer
            };
            match method {
                Method::ConnectionStartOk(_) => reply(
                    &mut self.write,
                    0,
                    Method::ConnectionTune(connection::Tune {
                        channel_max: 2047,
                        frame_max: 131_072,
                        heartbeat: 0,
                    }),
                ),
                Method::ConnectionTuneOk(tune) => {
                    self.frame_max = tune.frame_max.max(4096);
                    self.body_frames.clear();
                    self.decoder.set_max_frame_size(self.frame_max);
                }
                Method::ConnectionOpen(_) => reply(
                    &mut self.write,
                    0,
                    Method::ConnectionOpenOk(connection::OpenOk {}),
                ),
                Method::ConnectionClose(_) => {
                    reply(
                        &mut self.write,
                        0,
                        Method::ConnectionCloseOk(connection::CloseOk {}),
                    );
                    return Ok(false);
                }
                Method::ChannelOpen(_) => reply(
                    &mut self.write,
                    id,
                    Method::ChannelOpenOk(channel::OpenOk {}),
                ),
                Method::ChannelClose(_) => {
                    self.floods.retain(|(c, _, _)| *c != id);
                    reply(
                        &mut self.write,
                        id,
                        Method::ChannelCloseOk(channel::CloseOk {}),
                    );
                }
                Method::ConfirmSelect(_) => {
                    self.confirming.insert(id);
                    self.confirm_seq.push((id, 0, false));
                    reply(
                        &mut self.write,
                        id,
                        Method::ConfirmSelectOk(confirm::SelectOk {}),
                    );
                }
                Method::QueueDeclare(declare) => {
                    let name = if declare.queue.is_empty() {
                        ShortString::from_static("amq.gen-perf")
                    } else {
                        declare.queue
                    };
                    reply(
                        &mut self.write,
                        id,
                        Method::QueueDeclareOk(queue::DeclareOk {
                            queue: name,
                            message_count: 0,
                            consumer_count: 0,
                        }),
                    );
                }
                Method::QueuePurge(_) => reply(
                    &mut self.write,
                    id,
                    Method::QueuePurgeOk(queue::PurgeOk { message_count: 0 }),
                ),
                Method::QueueDelete(_) => reply(
                    &mut self.write,
                    id,
                    Method::QueueDeleteOk(queue::DeleteOk { message_count: 0 }),
                ),
                Method::BasicQos(_) => {
                    reply(&mut self.write, id, Method::BasicQosOk(basic::QosOk {}))
                }
                Method::BasicConsume(consume) => {
                    reply(
                        &mut self.write,
                        id,
                        Method::BasicConsumeOk(basic::ConsumeOk {
                            consumer_tag: consume.consumer_tag.clone(),
                        }),
                    );
                    if self.kind == Kind::Flood {
                        self.floods.push((id, consume.consumer_tag, 1));
                    }
                }
                Method::BasicCancel(cancel) => {
                    self.floods
                        .retain(|(c, t, _)| !(*c == id && *t == cancel.consumer_tag));
                    if !cancel.no_wait {
                        reply(
                            &mut self.write,
                            id,
                            Method::BasicCancelOk(basic::CancelOk {
                                consumer_tag: cancel.consumer_tag,
                            }),
                        );
                    }
                }
                Method::BasicPublish(_) => {
                    if let Some(entry) = self.confirm_seq.iter_mut().find(|(c, _, _)| *c == id) {
                        entry.1 += 1;
                        entry.2 = true;
                    }
                }
                _ => {}
            }
        }
    }
}
