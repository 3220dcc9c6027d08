//! Fair frame scheduling, heartbeats and bounded control replies.

use super::*;

#[test]
fn a_long_body_on_one_channel_does_not_hold_back_another() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let a = open_channel(&mut m, now);
    let b = open_channel(&mut m, now);
    let publish = |channel: ChannelRef, body: Bytes| Command::Publish {
        channel,
        head: publish_head(channel.id, body.len() as u64),
        body: PublishBody(body),
        confirm: None,
        credit: None,
    };
    m.command(publish(target(&m, a), Bytes::from(vec![0u8; 100_000])), now);
    m.command(publish(target(&m, b), Bytes::from_static(b"small")), now);
    let frames = written(&mut m);
    let small_done = frames
        .iter()
        .position(|f| matches!(f, Frame::Body { channel, .. } if *channel == b))
        .expect("small body sent");
    let large_bodies_before = frames[..small_done]
        .iter()
        .filter(|f| matches!(f, Frame::Body { channel, .. } if *channel == a))
        .count();
    assert!(
        large_bodies_before <= 1,
        "the small message waited for {large_bodies_before} frames of the large one"
    );
    let large_total: usize = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Body { channel, payload } if *channel == a => Some(payload.len()),
            _ => None,
        })
        .sum();
    assert_eq!(large_total, 100_000);
}

#[tokio::test]
async fn large_body_frames_reach_the_outbox_by_reference_and_the_wire_byte_for_byte() {
    let now = Instant::now();
    let body: Bytes = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let publish = |m: &mut Machine| {
        m.machine.settings.frame_max = 131_072;
        let a = open_channel(m, now);
        let b = open_channel(m, now);
        for (id, body) in [
            (a, body.clone()),
            (b, Bytes::from_static(b"small")),
            (a, body.clone()),
        ] {
            let channel = target(m, id);
            m.command(
                Command::Publish {
                    channel,
                    head: publish_head(id, body.len() as u64),
                    body: PublishBody(body),
                    confirm: None,
                    credit: None,
                },
                now,
            );
        }
    };
    let (mut copied, _) = machine(now);
    publish(&mut copied);
    let mut expected = BytesMut::new();
    copied.write_frames(&mut expected, usize::MAX);

    let (mut spliced, _) = machine(now);
    publish(&mut spliced);
    let mut outbox = crate::outbox::Outbox::default();
    spliced.write_frames(&mut outbox, usize::MAX);
    assert!(
        outbox.tail_mut().capacity() < body.len(),
        "the large payloads were not copied into the encoding buffer"
    );
    let mut wire = Vec::new();
    let written = outbox.write_all(&mut wire).await.expect("written");
    assert_eq!(written, expected.len());
    assert_eq!(wire, expected[..]);
}

#[test]
fn heartbeats_are_sent_when_idle_and_silence_kills_the_connection() {
    let start = Instant::now();
    let (mut m, error) = machine(start);
    assert_eq!(m.next_timeout(), Some(start + Duration::from_secs(5)));
    m.handle_timeout(start + Duration::from_secs(5));
    assert_eq!(written(&mut m), vec![Frame::Heartbeat]);
    m.on_sent(start + Duration::from_secs(5));
    m.on_received(start + Duration::from_secs(12));
    m.handle_timeout(start + Duration::from_secs(21));
    assert!(!m.is_closed(), "heard from the peer 9 s ago");
    m.handle_timeout(start + Duration::from_secs(32));
    assert!(m.is_closed());
    assert!(matches!(error.get(), Some(Error::MissedHeartbeats(_))));
}

#[test]
fn a_flood_of_channel_flow_is_answered_by_one_flow_ok_with_the_latest_state() {
    let now = Instant::now();
    let (mut m, _) = machine_with(now, Blocked::new().0, true);
    let id = open_channel(&mut m, now);
    let flow = |active| Frame::Method {
        channel: id,
        method: Method::ChannelFlow(channel::Flow { active }),
    };
    for i in 0..10_000 {
        m.handle_frame(flow(i % 2 == 0)).expect("flow");
    }
    let queued = m.channels.get(&id).map(|c| c.out.len());
    assert_eq!(queued, Some(1), "one flow-ok waits, not 10000");
    assert_eq!(
        written_methods(&mut m),
        [Method::ChannelFlowOk(channel::FlowOk { active: false })],
        "it answers the latest request"
    );
    // Once written, the next request is answered again.
    m.handle_frame(flow(true)).expect("flow");
    assert_eq!(
        written_methods(&mut m),
        [Method::ChannelFlowOk(channel::FlowOk { active: true })]
    );
    assert!(written(&mut m).is_empty());

    // A flow-ok lost with the connection, unwritten, does not silence
    // the next one on the recovered channel.
    m.handle_frame(flow(false)).expect("flow");
    m.connection_lost(Error::ConnectionLost(Arc::new(std::io::Error::other(
        "gone",
    ))));
    m.resume(8, 4096, Duration::from_secs(10), now);
    assert!(matches!(
        written_methods(&mut m).as_slice(),
        [Method::ChannelOpen(_)]
    ));
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::ChannelOpenOk(channel::OpenOk {}),
    })
    .expect("open-ok");
    m.handle_frame(flow(true))
        .expect("flow on the new connection");
    assert_eq!(
        written_methods(&mut m),
        [Method::ChannelFlowOk(channel::FlowOk { active: true })]
    );
}
