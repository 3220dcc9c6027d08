//! The machine driven without sockets: frames in, bytes out, time as an argument.

use super::*;
use crate::ports::{route, Blocked, Signals, TokioPorts};
use crate::protocol::frame::FrameDecoder;
use crate::protocol::methods::{confirm, queue};
use tokio::sync::{mpsc, oneshot};

mod confirms;
mod content;
mod recovery;
mod rpc;
mod scheduling;
mod settlements;

/// The machine as the I/O task drives it: what it produces is delivered
/// to the handles' tokio ends after each call, as `io.rs` does.
pub(super) struct Driven {
    machine: super::Machine<TokioPorts>,
    signals: Signals,
}

impl std::ops::Deref for Driven {
    type Target = super::Machine<TokioPorts>;
    fn deref(&self) -> &Self::Target {
        &self.machine
    }
}

impl std::ops::DerefMut for Driven {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.machine
    }
}

impl Driven {
    fn route(&mut self) {
        route(&mut self.machine, &self.signals);
    }

    pub(super) fn command(&mut self, command: Command, now: Instant) {
        self.machine.command(command, now);
        self.route();
    }

    pub(super) fn handle_frame(&mut self, frame: Frame) -> Result<(), Error> {
        let handled = self.machine.handle_frame(frame);
        self.route();
        handled
    }

    pub(super) fn handle_timeout(&mut self, now: Instant) {
        self.machine.handle_timeout(now);
        self.route();
    }

    pub(super) fn connection_lost(&mut self, error: Error) {
        self.machine.connection_lost(error);
        self.route();
    }

    pub(super) fn resume(
        &mut self,
        channel_max: u16,
        frame_max: u32,
        heartbeat: Duration,
        now: Instant,
    ) {
        self.machine.resume(channel_max, frame_max, heartbeat, now);
        self.route();
    }
}

/// The machine the tests drive.
type Machine = Driven;
/// The commands of the connection's handles.
type Command = crate::ports::Command;

fn machine(now: Instant) -> (Machine, Arc<OnceLock<Error>>) {
    machine_with(now, Blocked::new().0, false)
}

fn machine_with(now: Instant, blocked: Blocked, recover: bool) -> (Machine, Arc<OnceLock<Error>>) {
    let error = Arc::new(OnceLock::new());
    let settings = Settings {
        channel_max: 8,
        frame_max: 4096,
        heartbeat: Duration::from_secs(10),
        close_timeout: Duration::from_secs(5),
        max_body_size: 1 << 20,
        recover,
        recover_topology: true,
    };
    let signals = Signals {
        blocked,
        ..Signals::unobserved()
    };
    (
        Driven {
            machine: super::Machine::new(settings, now, error.clone()),
            signals,
        },
        error,
    )
}

/// Everything the machine wants to write, decoded.
fn written(m: &mut Machine) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    m.write_frames(&mut buf, usize::MAX);
    let mut decoder = FrameDecoder::new(u32::MAX);
    let mut frames = Vec::new();
    while let Some(frame) = decoder
        .decode(&mut buf)
        .expect("the machine writes valid frames")
    {
        frames.push(frame);
    }
    frames
}

fn open_channel(m: &mut Machine, now: Instant) -> u16 {
    let (reply, mut answer) = oneshot::channel();
    m.command(
        Command::OpenChannel {
            closed: Arc::new(OnceLock::new()),
            epoch: Arc::new(AtomicU64::new(0)),
            hook_owned: false,
            reply,
        },
        now,
    );
    let Frame::Method {
        channel,
        method: Method::ChannelOpen(_),
    } = written(m).remove(0)
    else {
        panic!("expected channel.open");
    };
    m.handle_frame(Frame::Method {
        channel,
        method: Method::ChannelOpenOk(channel::OpenOk {}),
    })
    .expect("open-ok");
    assert_eq!(
        answer.try_recv().expect("answered").expect("opened").id,
        channel
    );
    channel
}

fn publish_head(channel: u16, body_size: u64) -> Bytes {
    let mut buf = BytesMut::new();
    frame::write_publish_method(&mut buf, channel, &basic::Publish::default());
    frame::write_header(
        &mut buf,
        channel,
        body_size,
        &crate::protocol::BasicProperties::default(),
    );
    buf.freeze()
}

fn declare(name: &'static str) -> Method {
    Method::QueueDeclare(queue::Declare {
        queue: ShortString::from_static(name),
        ..Default::default()
    })
}

/// Opens a consumer with tag "t" and delivers `tags` (empty bodies) to it.
fn consume_and_deliver(
    m: &mut Machine,
    now: Instant,
    id: u16,
    no_ack: bool,
    tags: impl IntoIterator<Item = u64>,
) -> mpsc::Receiver<RawDelivery> {
    let (deliveries, receiver) = mpsc::channel(64);
    let (reply, _answer) = oneshot::channel();
    m.command(
        Command::Consume {
            channel: target(m, id),
            consume: Box::new(basic::Consume {
                consumer_tag: ShortString::from_static("t"),
                no_ack,
                ..Default::default()
            }),
            deliveries,
            end: Arc::new(OnceLock::new()),
            reply,
        },
        now,
    );
    written(m);
    for delivery_tag in tags {
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::BasicDeliver(basic::Deliver {
                consumer_tag: ShortString::from_static("t"),
                delivery_tag,
                ..Default::default()
            }),
        })
        .expect("deliver");
        m.handle_frame(Frame::Header {
            channel: id,
            header: ContentHeader {
                class_id: 60,
                body_size: 0,
                properties: ReceivedProperties::default(),
            },
        })
        .expect("header");
    }
    receiver
}

/// What a generated stub such as `channel.basic_ack(..)` sends.
fn send(m: &mut Machine, now: Instant, id: u16, method: Method) {
    m.command(
        Command::Send {
            channel: target(m, id),
            method: Box::new(method),
        },
        now,
    );
}

/// What `Delivery::ack` (or nack, reject) of a current delivery sends.
fn settle(m: &mut Machine, now: Instant, id: u16, method: Method) {
    let epoch = m.channels[&id].epoch.load(Ordering::Acquire);
    m.command(
        Command::Settle {
            channel: id,
            settlement: Settlement::of(&method).expect("a settlement"),
            epoch,
        },
        now,
    );
}

fn ack(delivery_tag: u64) -> Method {
    Method::BasicAck(basic::Ack {
        delivery_tag,
        multiple: false,
    })
}

fn written_methods(m: &mut Machine) -> Vec<Method> {
    written(m)
        .into_iter()
        .map(|frame| match frame {
            Frame::Method { method, .. } => method,
            other => panic!("not a method frame: {other:?}"),
        })
        .collect()
}

/// The broker confirms publishes up to `delivery_tag`.
fn broker_acks(m: &mut Machine, id: u16, delivery_tag: u64, multiple: bool) -> Result<(), Error> {
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::BasicAck(basic::Ack {
            delivery_tag,
            multiple,
        }),
    })
}

/// Puts channel `id` in confirm mode.
fn confirm_mode(m: &mut Machine, now: Instant, id: u16) {
    let (select, _answer) = oneshot::channel();
    m.command(
        Command::Rpc {
            channel: target(m, id),
            method: Box::new(Method::ConfirmSelect(confirm::Select { no_wait: false })),
            reply: select,
        },
        now,
    );
    written(m);
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::ConfirmSelectOk(confirm::SelectOk {}),
    })
    .expect("select-ok");
}

/// Publishes an empty message on `id`; its confirmation, if asked.
fn publish_one(
    m: &mut Machine,
    now: Instant,
    id: u16,
    confirm: bool,
) -> Option<oneshot::Receiver<Result<Confirmation, Error>>> {
    let (tx, rx) = oneshot::channel();
    m.command(
        Command::Publish {
            channel: target(m, id),
            head: publish_head(id, 0),
            body: PublishBody(Bytes::new()),
            confirm: confirm.then_some(tx),
            credit: None,
        },
        now,
    );
    confirm.then_some(rx)
}

/// The broker returns a message on `id` (a `basic.return` and its header).
fn broker_returns(m: &mut Machine, id: u16) -> Result<(), Error> {
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::BasicReturn(basic::Return {
            reply_code: 312,
            reply_text: ShortString::from_static("NO_ROUTE"),
            exchange: ShortString::default(),
            routing_key: ShortString::from_static("nowhere"),
        }),
    })?;
    m.handle_frame(Frame::Header {
        channel: id,
        header: ContentHeader {
            class_id: 60,
            body_size: 0,
            properties: ReceivedProperties::default(),
        },
    })
}

/// How a handle names channel `id` as it is open now.
fn target(m: &Machine, id: u16) -> ChannelRef {
    ChannelRef {
        id,
        incarnation: m.channels[&id].incarnation,
    }
}
