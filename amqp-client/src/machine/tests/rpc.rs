//! Synchronous calls: one in flight per channel, replies in order, closes.

use super::*;

#[test]
fn one_rpc_at_a_time_per_channel_and_replies_in_order() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let (first_tx, mut first) = oneshot::channel();
    let (second_tx, mut second) = oneshot::channel();
    m.command(
        Command::Rpc {
            channel: target(&m, id),
            method: Box::new(declare("a")),
            reply: first_tx,
        },
        now,
    );
    m.command(
        Command::Rpc {
            channel: target(&m, id),
            method: Box::new(declare("b")),
            reply: second_tx,
        },
        now,
    );
    let sent = written(&mut m);
    assert_eq!(sent.len(), 1, "the second call waits for the first reply");
    let ok = |q: &'static str| Frame::Method {
        channel: id,
        method: Method::QueueDeclareOk(queue::DeclareOk {
            queue: ShortString::from_static(q),
            message_count: 0,
            consumer_count: 0,
        }),
    };
    m.handle_frame(ok("a")).expect("reply");
    assert!(matches!(
        first.try_recv(),
        Ok(Ok(Reply {
            method: Method::QueueDeclareOk(_),
            ..
        }))
    ));
    assert!(second.try_recv().is_err(), "not answered yet");
    assert_eq!(written(&mut m).len(), 1, "now the second goes out");
    m.handle_frame(ok("b")).expect("reply");
    assert!(second.try_recv().is_ok());
}

#[test]
fn a_reply_that_answers_nothing_is_a_protocol_error() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let err = m
        .handle_frame(Frame::Method {
            channel: id,
            method: Method::TxCommitOk(crate::protocol::methods::tx::CommitOk {}),
        })
        .expect_err("unexpected");
    assert!(matches!(err, Error::UnexpectedFrame(_)), "{err}");
}

#[test]
fn a_broker_channel_close_fails_the_pending_call_with_its_reason_and_frees_the_id() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let (reply, mut answer) = oneshot::channel();
    m.command(
        Command::Rpc {
            channel: target(&m, id),
            method: Box::new(declare("missing")),
            reply,
        },
        now,
    );
    written(&mut m);
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::ChannelClose(channel::Close {
            reply_code: 404,
            reply_text: ShortString::from_static("NOT_FOUND - no queue 'missing'"),
            class_id: 50,
            method_id: 10,
        }),
    })
    .expect("close");
    let err = answer.try_recv().expect("answered").expect_err("failed");
    assert_eq!(
        err.reply_error(),
        Some(crate::protocol::ReplyError::NotFound)
    );
    assert!(matches!(
        written(&mut m).as_slice(),
        [Frame::Method {
            method: Method::ChannelCloseOk(_),
            ..
        }]
    ));
    assert_eq!(open_channel(&mut m, now), id, "the id is recycled");
}

#[test]
fn commands_and_queued_frames_fit_inline_copies() {
    // Larger values are moved with a `memcpy` call, several times per
    // publish and per ack (see `Command::Rpc`).
    let sizes = (
        std::mem::size_of::<Command>(),
        std::mem::size_of::<Outgoing>(),
    );
    assert!(sizes.0 <= 128 && sizes.1 <= 128, "{sizes:?}");
}

/// A command a handle queued before its channel was closed by the broker
/// must not act on the next channel that gets the same id.
#[test]
fn commands_of_a_closed_channel_do_not_reach_the_channel_reusing_its_id() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let old = target(&m, id);
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::ChannelClose(channel::Close {
            reply_code: 404,
            reply_text: ShortString::from_static("NOT_FOUND"),
            class_id: 50,
            method_id: 10,
        }),
    })
    .expect("channel.close");
    assert!(matches!(
        written(&mut m).as_slice(),
        [Frame::Method {
            method: Method::ChannelCloseOk(_),
            ..
        }]
    ));
    let reused = open_channel(&mut m, now);
    assert_eq!(reused, id, "the id is reused");
    assert_ne!(target(&m, id), old);

    let (reply, mut answer) = oneshot::channel();
    m.command(
        Command::Rpc {
            channel: old,
            method: Box::new(declare("a")),
            reply,
        },
        now,
    );
    assert!(matches!(
        answer.try_recv(),
        Ok(Err(Error::ChannelClosed { .. }))
    ));
    let (confirm, mut confirmed) = oneshot::channel();
    m.command(
        Command::Publish {
            channel: old,
            head: publish_head(id, 1),
            body: PublishBody(Bytes::from_static(b"x")),
            confirm: Some(confirm),
            credit: None,
        },
        now,
    );
    assert!(matches!(confirmed.try_recv(), Ok(Err(_))));
    let (reply, mut closed) = oneshot::channel();
    m.command(
        Command::CloseChannel {
            channel: old,
            reply: Some(reply),
        },
        now,
    );
    assert!(matches!(closed.try_recv(), Ok(Ok(()))), "already closed");
    assert!(
        written(&mut m).is_empty(),
        "nothing reached the new channel"
    );
    assert!(m.channel_is_usable(id), "the new channel is still open");
}

/// A no-wait `basic.cancel` of a consumer whose `basic.consume` still waits
/// behind another call must not overtake it: the broker would start a
/// consumer nobody reads. The consume is dropped instead, and its caller
/// learns it was cancelled.
#[test]
fn a_no_wait_cancel_does_not_overtake_its_queued_consume() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let (reply, _declared) = oneshot::channel();
    m.command(
        Command::Rpc {
            channel: target(&m, id),
            method: Box::new(declare("a")),
            reply,
        },
        now,
    );
    let (deliveries, _stream) = mpsc::channel(4);
    let (reply, mut consumed) = oneshot::channel();
    m.command(
        Command::Consume {
            channel: target(&m, id),
            consume: Box::new(basic::Consume {
                consumer_tag: ShortString::from_static("t"),
                ..Default::default()
            }),
            deliveries,
            end: Arc::new(OnceLock::new()),
            reply,
        },
        now,
    );
    m.command(
        Command::Send {
            channel: target(&m, id),
            method: Box::new(Method::BasicCancel(basic::Cancel {
                consumer_tag: ShortString::from_static("t"),
                no_wait: true,
            })),
        },
        now,
    );
    assert!(matches!(
        consumed.try_recv(),
        Ok(Err(Error::ConsumerCancelled {
            by_broker: false,
            ..
        }))
    ));
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::QueueDeclareOk(queue::DeclareOk {
            queue: ShortString::from_static("a"),
            message_count: 0,
            consumer_count: 0,
        }),
    })
    .expect("declare-ok");
    let sent: Vec<&'static str> = written(&mut m)
        .iter()
        .filter_map(|frame| match frame {
            Frame::Method { method, .. } => Some(method.info().name),
            _ => None,
        })
        .collect();
    assert_eq!(
        sent,
        ["queue.declare"],
        "neither consume nor cancel goes out"
    );
}

/// A channel that is only opened keeps no frame queue (its state is all an
/// idle channel costs), and the ids of many closed channels open working
/// channels again.
#[test]
fn open_channels_keep_no_frame_queue_and_freed_ids_open_working_channels() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let ids: Vec<u16> = (0..8).map(|_| open_channel(&mut m, now)).collect();
    for id in &ids {
        assert_eq!(m.channels[id].out.capacity(), 0, "channel {id}");
    }
    for id in &ids {
        let (reply, mut closed) = oneshot::channel();
        m.command(
            Command::CloseChannel {
                channel: target(&m, *id),
                reply: Some(reply),
            },
            now,
        );
        assert!(matches!(
            written_methods(&mut m).as_slice(),
            [Method::ChannelClose(_)]
        ));
        m.handle_frame(Frame::Method {
            channel: *id,
            method: Method::ChannelCloseOk(channel::CloseOk {}),
        })
        .expect("close-ok");
        assert!(matches!(closed.try_recv(), Ok(Ok(()))));
    }
    assert!(m.channels.is_empty());

    let id = open_channel(&mut m, now);
    m.command(
        Command::Publish {
            channel: target(&m, id),
            head: publish_head(id, 1),
            body: PublishBody(Bytes::from_static(b"x")),
            confirm: None,
            credit: None,
        },
        now,
    );
    let frames = written(&mut m);
    assert!(
        matches!(
            frames.as_slice(),
            [
                Frame::Method {
                    method: Method::BasicPublish(_),
                    ..
                },
                Frame::Header { .. },
                Frame::Body { payload, .. },
            ] if payload.as_ref() == b"x"
        ),
        "{frames:?}"
    );
}
