//! Peers that cost almost nothing, so that the client's own cost can be
//! measured without a broker: `sink` answers the handshake and the calls the
//! bench makes, discards publishes and acks them in batches in confirm mode;
//! `flood` streams deliveries to every consumer as fast as the socket takes them.

use std::collections::HashSet;

use amqp091::protocol::frame::{self, Frame, FrameDecoder};
use amqp091::protocol::methods::{basic, channel, confirm, connection, queue, Method};
use amqp091::protocol::{BasicProperties, FieldTable, ShortString};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Which peer to play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Discards publishes.
    Sink,
    /// Floods consumers.
    Flood,
}

/// Serves connections on `port` until killed.
pub async fn serve(kind: Kind, port: u16, body_size: usize) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            if let Err(e) = Session::new(stream, kind, body_size).run().await {
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
    frame_max: u32,
}

fn reply(write: &mut BytesMut, channel: u16, method: Method) {
    frame::write_method(write, channel, &method);
}

impl Session {
    fn new(stream: TcpStream, kind: Kind, body_size: usize) -> Self {
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
            if self.kind == Kind::Flood && !self.floods.is_empty() {
                // Keep the socket full; read whatever the client sends meanwhile.
                self.fill_flood();
                let (mut reader, mut writer) = self.stream.split();
                tokio::select! {
                    written = writer.write(&self.write) => {
                        let n = written?;
                        let _ = self.write.split_to(n);
                    }
                    read = reader.read_buf(&mut self.read) => {
                        if read? == 0 { return Ok(()); }
                        if !self.handle_input()? { return Ok(()); }
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

    fn fill_flood(&mut self) {
        let properties = BasicProperties::default();
        while self.write.len() < 128 * 1024 {
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
                frame::write_body(&mut self.write, *channel, &self.body, self.frame_max);
            }
        }
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
