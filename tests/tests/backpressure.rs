//! A consumer that reads slower than the peer delivers keeps memory bounded:
//! its buffer fills, the connection stops reading the socket, and TCP pushes
//! back on the peer. A fake peer floods deliveries (a real broker cannot be
//! made to ignore prefetch), counting how much it manages to write.

use std::time::Duration;

use amqp091::protocol::methods::{basic, Method};
use amqp091::protocol::BasicProperties;
use amqp091::{BasicProperties as Properties, Connection, ConsumeOptions};
use amqp_client_tests::fake_peer::{header_frame, method_frame, raw_frame, FakePeer, Tuning};

const BODY: usize = 1024;
/// The peer gives up flooding here: a client without back-pressure would
/// take all of it.
const FLOOD_CAP: usize = 512 * 1024 * 1024;

#[tokio::test]
async fn a_slow_consumer_stops_the_socket_instead_of_buffering_without_bound() {
    let script = FakePeer::start(|mut peer| async move {
        peer.handshake(&Tuning::default()).await?;
        peer.accept_channel_open().await?;
        let (channel, tag) = peer.accept_consume().await?;
        // Flood in batches of 64 messages until a write stalls for a second.
        let mut written = 0usize;
        let mut delivery_tag = 0u64;
        let body = vec![b'f'; BODY];
        while written < FLOOD_CAP {
            let mut batch = Vec::new();
            for _ in 0..64 {
                delivery_tag += 1;
                let deliver = Method::BasicDeliver(basic::Deliver {
                    consumer_tag: tag.clone(),
                    delivery_tag,
                    redelivered: false,
                    exchange: Default::default(),
                    routing_key: Default::default(),
                });
                batch.extend(method_frame(channel, &deliver));
                batch.extend(header_frame(
                    channel,
                    BODY as u64,
                    &BasicProperties::default(),
                ));
                batch.extend(raw_frame(3, channel, &body));
            }
            match tokio::time::timeout(Duration::from_secs(1), peer.send_raw(&batch)).await {
                Ok(result) => {
                    result?;
                    written += batch.len();
                }
                Err(_) => break,
            }
        }
        Ok(written)
    })
    .await
    .expect("fake peer");

    let connection = Connection::connect(script.config().consumer_buffer(16))
        .await
        .expect("connect");
    let channel = connection.open_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            "flood",
            ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await
        .expect("consume");
    // The application reads nothing while the peer floods.
    let written = tokio::time::timeout(Duration::from_secs(60), script.finish())
        .await
        .expect("the flood ends");
    println!(
        "the peer wrote {} MB before the socket pushed back",
        written / (1024 * 1024)
    );
    assert!(
        written < FLOOD_CAP,
        "the client took everything the peer sent: no back-pressure"
    );
    assert!(
        written < 64 * 1024 * 1024,
        "{written} bytes in flight: more than socket buffers can explain"
    );

    // Reading resumes where it stopped, in order and intact.
    for expected in 1..=1000u64 {
        let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("deliveries resume")
            .expect("open")
            .expect("ok");
        assert_eq!(delivery.envelope.delivery_tag, expected);
        assert_eq!(delivery.body.len(), BODY);
    }
}

#[tokio::test]
async fn a_publisher_faster_than_the_peer_reads_waits_instead_of_buffering_without_bound() {
    let script = FakePeer::start(|mut peer| async move {
        peer.handshake(&Tuning::default()).await?;
        peer.accept_channel_open().await?;
        // Then never read again: the socket's buffers fill up.
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(())
    })
    .await
    .expect("fake peer");
    let connection = Connection::connect(script.config()).await.expect("connect");
    let channel = connection.open_channel().await.expect("channel");
    let body = bytes::Bytes::from(vec![b'p'; 4000]);
    let properties = Properties::default();
    let mut accepted = 0usize;
    loop {
        let publish = channel.basic_publish("", "q", false, &properties, body.clone());
        match tokio::time::timeout(Duration::from_secs(1), publish).await {
            Ok(result) => {
                result.expect("publish");
                accepted += 1;
                assert!(
                    accepted < 100_000,
                    "400 MB accepted: the client buffers without bound"
                );
            }
            Err(_) => break,
        }
    }
    let mib = accepted * 4000 / (1024 * 1024);
    println!("{mib} MiB accepted before basic_publish waited");
    assert!(
        mib <= 64 + 16,
        "{mib} MiB queued: more than the 64 MiB publish buffer and socket buffers"
    );
    script.abort();
}
