//! Content assembly across frames, and body buffers.

use super::*;

#[test]
fn content_is_assembled_across_body_frames_and_rejected_out_of_order() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let (deliveries, mut receiver) = mpsc::channel(4);
    let (reply, _answer) = oneshot::channel();
    let tag = ShortString::from_static("t");
    m.command(
        Command::Consume {
            channel: target(&m, id),
            consume: Box::new(basic::Consume {
                consumer_tag: tag.clone(),
                ..Default::default()
            }),
            deliveries,
            end: Arc::new(OnceLock::new()),
            reply,
        },
        now,
    );
    let deliver = Frame::Method {
        channel: id,
        method: Method::BasicDeliver(basic::Deliver {
            consumer_tag: tag,
            delivery_tag: 1,
            ..Default::default()
        }),
    };
    m.handle_frame(deliver.clone()).expect("deliver");
    m.handle_frame(Frame::Header {
        channel: id,
        header: ContentHeader {
            class_id: 60,
            body_size: 6,
            properties: ReceivedProperties::default(),
        },
    })
    .expect("header");
    m.handle_frame(Frame::Body {
        channel: id,
        payload: Bytes::from_static(b"abc"),
    })
    .expect("body 1");
    assert!(receiver.try_recv().is_err(), "incomplete");
    m.handle_frame(Frame::Body {
        channel: id,
        payload: Bytes::from_static(b"def"),
    })
    .expect("body 2");
    assert_eq!(
        &receiver.try_recv().expect("complete").content.body[..],
        b"abcdef"
    );

    m.handle_frame(deliver).expect("deliver");
    let err = m
        .handle_frame(Frame::Body {
            channel: id,
            payload: Bytes::from_static(b"x"),
        })
        .expect_err("body before header");
    assert!(matches!(err, Error::UnexpectedFrame(_)));
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let err = m
        .handle_frame(Frame::Header {
            channel: id,
            header: ContentHeader {
                class_id: 60,
                body_size: 1,
                properties: ReceivedProperties::default(),
            },
        })
        .expect_err("header without method");
    assert!(matches!(err, Error::UnexpectedFrame(_)));
}

#[test]
fn a_body_buffer_grows_with_what_arrives_not_with_what_the_header_announces() {
    // Two small frames of a body announced at 128 MiB.
    let announced = 128 << 20;
    let pool = BodyPool::default();
    let mut body = BodyBuffer::Empty;
    body.push(Bytes::from(vec![1u8; 1000]), announced, &pool);
    body.push(Bytes::from(vec![2u8; 1000]), announced, &pool);
    let BodyBuffer::Many(joined) = &body else {
        panic!("two frames are joined");
    };
    assert!(
        joined.capacity() <= 4 * 2000,
        "{} bytes reserved for 2000 received",
        joined.capacity()
    );

    // A large body in 128 KiB frames: a buffer of four times what came at
    // the second frame, and one of exactly its size in the end.
    let size = 3_000_000;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut body = BodyBuffer::Empty;
    let mut capacities = Vec::new();
    for chunk in data.chunks(131_064) {
        body.push(Bytes::copy_from_slice(chunk), size, &pool);
        if let BodyBuffer::Many(joined) = &body {
            if capacities.last() != Some(&joined.capacity()) {
                capacities.push(joined.capacity());
            }
        }
    }
    assert_eq!(capacities.last(), Some(&size), "{capacities:?}");
    assert_eq!(capacities, [4 * 2 * 131_064, size]);
    assert_eq!(body.into_bytes(&pool), data);
}

/// A consumer with tag "t" on a new channel of `m`.
fn consumer(m: &mut Machine, now: Instant) -> (u16, mpsc::Receiver<RawDelivery>) {
    let id = open_channel(m, now);
    let receiver = consume_and_deliver(m, now, id, true, []);
    (id, receiver)
}

/// Delivers `body` to consumer "t" on channel `id` in frames of `frame` bytes.
fn deliver_in_frames(m: &mut Machine, id: u16, tag: u64, body: &[u8], frame: usize) {
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::BasicDeliver(basic::Deliver {
            consumer_tag: ShortString::from_static("t"),
            delivery_tag: tag,
            ..Default::default()
        }),
    })
    .expect("deliver");
    m.handle_frame(Frame::Header {
        channel: id,
        header: ContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: ReceivedProperties::default(),
        },
    })
    .expect("header");
    for payload in body.chunks(frame) {
        m.handle_frame(Frame::Body {
            channel: id,
            payload: Bytes::copy_from_slice(payload),
        })
        .expect("body");
    }
}

#[test]
fn a_dropped_body_s_buffer_carries_the_next_body_and_is_freed_once_idle() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let (id, mut receiver) = consumer(&mut m, now);
    m.on_received(now);
    let first: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
    deliver_in_frames(&mut m, id, 1, &first, 4000);
    let body = receiver.try_recv().expect("delivered").content.body;
    assert_eq!(body, first);
    let address = body.as_ptr();
    drop(body);
    assert!(m.machine.bodies.pool.kept_bytes() >= first.len());

    let second: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
    deliver_in_frames(&mut m, id, 2, &second, 4000);
    let body = receiver.try_recv().expect("delivered").content.body;
    assert_eq!(body, second, "the reused buffer holds only the new body");
    assert_eq!(
        body.as_ptr(),
        address,
        "the dropped body's buffer was used again"
    );
    drop(body);

    // Quiet for less than the idle time: kept; then freed.
    m.on_received(now + Duration::from_millis(500));
    assert_ne!(m.machine.bodies.pool.kept_bytes(), 0);
    m.handle_timeout(now + Duration::from_secs(2));
    assert_eq!(m.machine.bodies.pool.kept_bytes(), 0);
    // A body in one frame is a slice of the read buffer: no pool.
    deliver_in_frames(&mut m, id, 3, &[5; 100], 4000);
    drop(receiver.try_recv().expect("delivered"));
    assert_eq!(m.machine.bodies.pool.kept_bytes(), 0);
}
