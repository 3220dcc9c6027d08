//! Bodies that span many frames. Their frames' payloads are read from the
//! socket straight into the message's buffer (no copy through the read
//! buffer), that buffer is used again once the application drops the
//! delivery, and a published body's frames go to the socket as slices of
//! the application's `Bytes`. None of that may cost a byte: bodies arrive
//! as sent whatever pieces the socket hands over, frames of other channels
//! and heartbeats in between, a bad frame end after a body read that way is
//! still a frame error, and large bodies go through RabbitMQ and back intact.

use std::time::Duration;

use amqp091::prelude::*;
use amqp091::protocol::methods::{basic, Method};
use amqp091::protocol::FrameError;
use amqp091::{BasicProperties, Confirmation, Connection, ConsumeOptions, Error};
use amqp_client_tests::fake_peer::{header_frame, method_frame, FakePeer, Tuning, FRAME_BODY};
use amqp_client_tests::{connect, delete_queue, unique};
use bytes::Bytes;
use tokio::time::timeout;

/// RabbitMQ's frame_max, which the fake peer proposes too.
const FRAME_MAX: usize = 131_072;
/// A body frame's payload at that frame_max.
const PAYLOAD_MAX: usize = FRAME_MAX - 8;

/// Bytes that differ from frame to frame and from body to body, so a
/// payload put in the wrong place or twice does not go unnoticed.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

/// The body frames of `body` on `channel`, as RabbitMQ cuts them.
fn body_frames(channel: u16, body: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    for payload in body.chunks(PAYLOAD_MAX) {
        wire.push(FRAME_BODY);
        wire.extend_from_slice(&channel.to_be_bytes());
        wire.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        wire.extend_from_slice(payload);
        wire.push(0xCE);
    }
    wire
}

fn deliver(channel: u16, tag: &str, delivery_tag: u64, body: &[u8]) -> Vec<u8> {
    let mut wire = method_frame(
        channel,
        &Method::BasicDeliver(basic::Deliver {
            consumer_tag: tag.into(),
            delivery_tag,
            redelivered: false,
            exchange: Default::default(),
            routing_key: "large".into(),
        }),
    );
    wire.extend(header_frame(
        channel,
        body.len() as u64,
        &BasicProperties::default(),
    ));
    wire.extend(body_frames(channel, body));
    wire
}

/// The sizes the fake peer delivers: one byte over a frame, a payload that
/// ends exactly at a frame's end, a megabyte and some, one under a frame.
const SIZES: [usize; 4] = [
    PAYLOAD_MAX + 1,
    2 * PAYLOAD_MAX,
    (1 << 20) + 3,
    PAYLOAD_MAX - 1,
];

/// How the fake peer cuts its writes: a piece of each of these sizes in
/// turn, each flushed and followed by a pause now and then, so that the
/// client's reads end inside frame prefixes, payloads and end octets.
const PIECES: [usize; 7] = [1, 7, 8, 9, 1000, 40_000, 65_537];

#[tokio::test]
async fn bodies_arrive_byte_for_byte_whatever_pieces_the_socket_hands_over() {
    let script = FakePeer::start(|mut peer| async move {
        peer.handshake(&Tuning::default()).await?;
        peer.accept_channel_open().await?;
        let (channel, tag) = peer.accept_consume().await?;
        let tag = tag.to_string();
        let mut wire = Vec::new();
        for (index, size) in SIZES.iter().enumerate() {
            wire.extend(deliver(
                channel,
                &tag,
                index as u64 + 1,
                &pattern(*size, index as u32),
            ));
            // A heartbeat between two messages' frames.
            wire.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0xCE]);
        }
        let mut sent = 0;
        for (turn, piece) in PIECES.iter().cycle().enumerate() {
            if sent == wire.len() {
                break;
            }
            let end = (sent + piece).min(wire.len());
            peer.send_raw(&wire[sent..end]).await?;
            sent = end;
            if turn % 3 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        peer.wait_for_eof().await
    })
    .await
    .expect("fake peer");

    let connection = Connection::connect(script.config()).await.expect("connect");
    let channel = connection.open_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            "large",
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await
        .expect("consume");
    for (index, size) in SIZES.iter().enumerate() {
        let delivery = timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("delivered in time")
            .expect("consumer open")
            .expect("delivery");
        assert_eq!(delivery.envelope.delivery_tag, index as u64 + 1);
        assert_eq!(delivery.body.len(), *size);
        assert!(
            delivery.body == pattern(*size, index as u32),
            "body {index} ({size} bytes) differs from what was sent"
        );
    }
    connection.close().await.expect("a clean close");
    timeout(Duration::from_secs(10), script.finish())
        .await
        .expect("the peer ends");
}

#[tokio::test]
async fn a_bad_end_after_a_body_read_straight_into_its_message_is_a_frame_error() {
    let script = FakePeer::start(|mut peer| async move {
        peer.handshake(&Tuning::default()).await?;
        peer.accept_channel_open().await?;
        let (channel, tag) = peer.accept_consume().await?;
        let tag = tag.to_string();
        let mut wire = deliver(channel, &tag, 1, &pattern(300_000, 9));
        // The second body frame's end octet.
        let second_end = wire.len() - (300_000 - PAYLOAD_MAX - PAYLOAD_MAX) - 8 - 1;
        assert_eq!(wire[second_end], 0xCE);
        wire[second_end] = 0xAB;
        // Its prefix first, alone: the payload after it is read straight.
        let second_start = second_end - PAYLOAD_MAX - 7;
        peer.send_raw(&wire[..second_start + 7]).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        peer.send_raw(&wire[second_start + 7..]).await?;
        peer.record_until_eof().await
    })
    .await
    .expect("fake peer");

    let connection = Connection::connect(script.config()).await.expect("connect");
    let channel = connection.open_channel().await.expect("channel");
    let _consumer = channel
        .basic_consume("large", ConsumeOptions::default())
        .await
        .expect("consume");
    let error = timeout(Duration::from_secs(10), connection.closed())
        .await
        .expect("the connection fails in time")
        .expect_err("a frame error, not a clean close");
    let Error::Protocol(frame_error) = &error else {
        panic!("expected a frame error, got {error:?}");
    };
    assert_eq!(
        frame_error,
        &FrameError::BadFrameEnd {
            found: 0xAB,
            channel: channel.id()
        }
    );
    let recording = timeout(Duration::from_secs(10), script.finish())
        .await
        .expect("the peer ends");
    assert_eq!(recording.close_code(), Some(501), "told the peer why");
}

#[tokio::test]
async fn large_bodies_go_through_rabbitmq_and_back_intact_with_other_channels_interleaved() {
    let connection = connect().await;
    let publisher = connection.open_channel().await.expect("channel");
    publisher
        .confirm_select(confirm::Select::default())
        .await
        .expect("confirm mode");
    let large = unique("large-bodies");
    let small = unique("small-bodies");
    for queue in [&large, &small] {
        publisher
            .queue_declare(queue::Declare {
                queue: queue.as_str().into(),
                ..Default::default()
            })
            .await
            .expect("queue.declare");
    }
    let sizes = [
        PAYLOAD_MAX,
        PAYLOAD_MAX + 1,
        3 * PAYLOAD_MAX,
        (1 << 20) + 7,
        16 << 20,
    ];
    let bodies: Vec<Bytes> = sizes
        .iter()
        .enumerate()
        .map(|(index, size)| Bytes::from(pattern(*size, 100 + index as u32)))
        .collect();

    // Consumers on two more channels of the same connection: the large
    // bodies' frames and the small messages' interleave on the socket.
    let large_channel = connection.open_channel().await.expect("channel");
    let mut large_consumer = large_channel
        .basic_consume(&large, ConsumeOptions::default())
        .await
        .expect("consume");
    let small_channel = connection.open_channel().await.expect("channel");
    let mut small_consumer = small_channel
        .basic_consume(&small, ConsumeOptions::default())
        .await
        .expect("consume");

    let properties = BasicProperties::default();
    let mut confirms = Vec::new();
    for (index, body) in bodies.iter().enumerate() {
        confirms.push(
            publisher
                .basic_publish("", large.as_str(), false, &properties, body.clone())
                .await
                .expect("publish"),
        );
        for n in 0..50u32 {
            let body = Bytes::from(format!("small {index} {n}"));
            confirms.push(
                publisher
                    .basic_publish("", small.as_str(), false, &properties, body)
                    .await
                    .expect("publish"),
            );
        }
    }
    for confirm in confirms {
        let confirmation = timeout(Duration::from_secs(30), confirm)
            .await
            .expect("confirmed in time")
            .expect("confirmation");
        assert!(
            matches!(confirmation, Confirmation::Ack),
            "{confirmation:?}"
        );
    }
    for (index, expected) in bodies.iter().enumerate() {
        let delivery = timeout(Duration::from_secs(30), large_consumer.next())
            .await
            .expect("delivered in time")
            .expect("consumer open")
            .expect("delivery");
        assert_eq!(delivery.body.len(), expected.len(), "body {index}");
        assert!(delivery.body == *expected, "body {index} differs");
        delivery.ack().await.expect("ack");
    }
    for index in 0..bodies.len() {
        for n in 0..50u32 {
            let delivery = timeout(Duration::from_secs(30), small_consumer.next())
                .await
                .expect("delivered in time")
                .expect("consumer open")
                .expect("delivery");
            assert_eq!(&delivery.body[..], format!("small {index} {n}").as_bytes());
            delivery.ack().await.expect("ack");
        }
    }
    delete_queue(&publisher, &large).await;
    delete_queue(&publisher, &small).await;
    connection.close().await.expect("close");
}
