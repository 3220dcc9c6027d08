//! A lost connection: what it clears, and what a resume sends.

use super::*;

#[test]
fn a_lost_connection_is_no_longer_blocked_whether_it_recovers_or_fails() {
    for recover in [false, true] {
        let now = Instant::now();
        let (blocked, mut watch) = Blocked::new();
        let flag = blocked.flag();
        let (mut m, _) = machine_with(now, blocked, recover);
        m.handle_frame(Frame::Method {
            channel: 0,
            method: Method::ConnectionBlocked(connection::Blocked {
                reason: ShortString::from_static("low on memory"),
            }),
        })
        .expect("blocked");
        assert!(flag.is_up());
        assert_eq!(watch.borrow_and_update().as_deref(), Some("low on memory"));
        m.connection_lost(Error::ConnectionLost(Arc::new(std::io::Error::other(
            "gone",
        ))));
        assert_eq!(m.is_interrupted(), recover);
        // Publishers waiting for an unblock must not wait forever: the
        // new connection, or the error, is what they see next.
        assert!(!flag.is_up(), "recover: {recover}");
        assert!(watch.has_changed().expect("sender alive"));
        assert_eq!(*watch.borrow(), None);
        drop(m);
        assert!(
            watch.has_changed().is_err(),
            "the watch closes with the machine"
        );
    }
}

#[test]
fn a_stream_consumer_resumes_after_the_last_delivery_handed_over_not_after_parked_ones() {
    let now = Instant::now();
    let (mut m, _) = machine_with(now, Blocked::new().0, true);
    let id = open_channel(&mut m, now);
    // Room for one delivery: the next two wait in the overflow, and are
    // dropped with the socket.
    let (deliveries, mut receiver) = mpsc::channel(1);
    let (reply, _answer) = oneshot::channel();
    m.command(
        Command::Consume {
            channel: target(&m, id),
            consume: Box::new(basic::Consume {
                consumer_tag: ShortString::from_static("s"),
                ..Default::default()
            }),
            deliveries,
            end: Arc::new(OnceLock::new()),
            reply,
        },
        now,
    );
    written(&mut m);
    for delivery_tag in 1..=3u64 {
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::BasicDeliver(basic::Deliver {
                consumer_tag: ShortString::from_static("s"),
                delivery_tag,
                ..Default::default()
            }),
        })
        .expect("deliver");
        let offset = 100 + delivery_tag as i64;
        let properties = crate::protocol::BasicProperties {
            headers: Some(crate::protocol::FieldTable::new().with(
                ShortString::from_static(STREAM_OFFSET),
                FieldValue::I64(offset),
            )),
            ..Default::default()
        };
        m.handle_frame(Frame::Header {
            channel: id,
            header: ContentHeader {
                class_id: 60,
                body_size: 0,
                properties: properties.into(),
            },
        })
        .expect("header");
    }
    m.connection_lost(Error::ConnectionLost(Arc::new(std::io::Error::other(
        "cut",
    ))));
    m.resume(8, 4096, Duration::from_secs(10), now);
    // Channel re-opened, then the consume.
    assert!(matches!(
        written_methods(&mut m)[..],
        [Method::ChannelOpen(_)]
    ));
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::ChannelOpenOk(channel::OpenOk::default()),
    })
    .expect("open-ok");
    let consumes: Vec<basic::Consume> = written_methods(&mut m)
        .into_iter()
        .filter_map(|method| match method {
            Method::BasicConsume(consume) => Some(consume),
            _ => None,
        })
        .collect();
    assert_eq!(consumes.len(), 1);
    assert_eq!(
        consumes[0].arguments.get(STREAM_OFFSET),
        Some(&FieldValue::I64(102)),
        "after 101, the one delivery the consumer holds"
    );
    let held = receiver.try_recv().expect("the delivery handed over");
    assert_eq!(held.deliver.delivery_tag, 1);
}

#[test]
fn a_consumer_whose_deliveries_carry_no_offset_resumes_with_its_own_arguments() {
    let now = Instant::now();
    let (mut m, _) = machine_with(now, Blocked::new().0, true);
    let id = open_channel(&mut m, now);
    let _receiver = consume_and_deliver(&mut m, now, id, false, [1, 2]);
    m.connection_lost(Error::ConnectionLost(Arc::new(std::io::Error::other(
        "cut",
    ))));
    m.resume(8, 4096, Duration::from_secs(10), now);
    written(&mut m);
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::ChannelOpenOk(channel::OpenOk::default()),
    })
    .expect("open-ok");
    let consume = written_methods(&mut m)
        .into_iter()
        .find_map(|method| match method {
            Method::BasicConsume(consume) => Some(consume),
            _ => None,
        })
        .expect("consumed again");
    assert!(consume.arguments.is_empty());
}
