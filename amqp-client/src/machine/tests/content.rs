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
    let mut body = BodyBuffer::Empty;
    body.push(Bytes::from(vec![1u8; 1000]), announced);
    body.push(Bytes::from(vec![2u8; 1000]), announced);
    let BodyBuffer::Many(joined) = &body else {
        panic!("two frames are joined");
    };
    assert!(
        joined.capacity() <= 4 * 2000,
        "{} bytes reserved for 2000 received",
        joined.capacity()
    );

    // A large body in 128 KiB frames: a few doublings, and a buffer of
    // exactly its size in the end.
    let size = 3_000_000;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut body = BodyBuffer::Empty;
    let mut capacities = Vec::new();
    for chunk in data.chunks(131_064) {
        body.push(Bytes::copy_from_slice(chunk), size);
        if let BodyBuffer::Many(joined) = &body {
            if capacities.last() != Some(&joined.capacity()) {
                capacities.push(joined.capacity());
            }
        }
    }
    assert_eq!(capacities.last(), Some(&size), "{capacities:?}");
    assert!(capacities.len() <= 5, "{capacities:?}");
    assert_eq!(body.into_bytes(), data);
}
