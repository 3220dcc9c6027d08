//! What a peer announces must not be what the client allocates: a content
//! header may announce up to `max_body_size` (128 MiB by default), and the
//! body buffer must grow with the bytes that actually arrive.
//!
//! The heap is measured with a counting global allocator (live and peak
//! bytes): an allocation the client never touches would not show in the
//! process's RSS. This file holds one test so that nothing else runs in the
//! process while it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use amqp091::prelude::*;
use amqp091::protocol::Method;
use amqp091::{BasicProperties, Connection, ConsumeOptions};
use amqp_client_tests::fake_peer::{FakePeer, Tuning};

/// Counts the bytes of live heap allocations, and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn shrank(bytes: usize) {
    LIVE.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every call is passed to `System` as it came; only the counters,
// which no allocation depends on, are added.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees are System's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from System.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            if new_size > layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        new
    }
}

#[global_allocator]
static HEAP: Counting = Counting;

/// Starts a measurement: the peak is set back to what is live now, which is
/// returned.
fn start_measuring() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

/// How long the test may take.
const LIMIT: Duration = Duration::from_secs(20);

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, test).await {
        Ok(value) => value,
        Err(_) => panic!("the test did not finish within {LIMIT:?}: the client hangs"),
    }
}

/// Channels, each with a consumer and a body in the making.
const CHANNELS: usize = 50;

/// The body size each content header announces: the default `max_body_size`.
const ANNOUNCED: u64 = 128 * 1024 * 1024;

/// What each body frame carries.
const FRAME_PAYLOAD: usize = 1000;

/// What the client may hold on to beyond what it had, for all channels: the
/// bytes received (about 100 KiB) with their buffers, and some slack.
const ALLOWED_GROWTH: usize = 4 * 1024 * 1024;

#[tokio::test]
async fn bodies_announced_at_128_mib_cost_what_arrives_not_what_is_announced() {
    bounded(async {
        let peer = FakePeer::start(|mut peer| async move {
            peer.handshake(&Tuning::default()).await?;
            let mut consumers = Vec::new();
            for _ in 0..CHANNELS {
                let channel = peer.accept_channel_open().await?;
                let (_, consume) = peer.expect_method("basic.consume").await?;
                let Method::BasicConsume(consume) = consume else {
                    unreachable!("expect_method checked the name")
                };
                let tag = consume.consumer_tag;
                peer.send_method(
                    channel,
                    &Method::BasicConsumeOk(basic::ConsumeOk {
                        consumer_tag: tag.clone(),
                    }),
                )
                .await?;
                consumers.push((channel, tag));
            }
            // The client's basic.qos on one more channel: what it sends
            // back orders the client after every frame below.
            let probe = peer.accept_channel_open().await?;
            peer.expect_method("basic.qos").await?;
            let baseline = start_measuring();
            for (channel, tag) in &consumers {
                peer.send_method(
                    *channel,
                    &Method::BasicDeliver(basic::Deliver {
                        consumer_tag: tag.clone(),
                        delivery_tag: 1,
                        ..Default::default()
                    }),
                )
                .await?;
                peer.send_header(*channel, ANNOUNCED, &BasicProperties::default())
                    .await?;
                peer.send_body(*channel, &[1; FRAME_PAYLOAD]).await?;
                peer.send_body(*channel, &[2; FRAME_PAYLOAD]).await?;
            }
            peer.send_method(probe, &Method::BasicQosOk(basic::QosOk {}))
                .await?;
            // Until the client closes.
            peer.expect_method("connection.close").await?;
            peer.send_method(
                0,
                &Method::ConnectionCloseOk(amqp091::protocol::methods::connection::CloseOk {}),
            )
            .await?;
            Ok(baseline)
        })
        .await
        .expect("the fake peer listens");
        let config = peer.config();
        assert_eq!(
            config.max_body_size, ANNOUNCED,
            "the announced size is within the default limit"
        );
        let connection = Connection::connect(config).await.expect("connect");
        let mut consumers = Vec::new();
        for _ in 0..CHANNELS {
            let channel = connection.open_channel().await.expect("channel");
            let consumer = channel
                .basic_consume("q", ConsumeOptions::default())
                .await
                .expect("consume");
            consumers.push((channel, consumer));
        }
        let probe = connection.open_channel().await.expect("probe channel");
        probe
            .basic_qos(basic::Qos::default())
            .await
            .expect("the qos-ok comes after every body frame");
        let peak = PEAK.load(Ordering::Relaxed);
        // Nothing failed: the bodies are merely incomplete.
        assert!(!connection.is_closed());
        for (channel, _) in &consumers {
            assert!(channel.closed_error().is_none());
        }
        connection.close().await.expect("close");
        let baseline = peer.finish().await;
        let growth = peak.saturating_sub(baseline);
        assert!(
            growth < ALLOWED_GROWTH,
            "the heap grew by {growth} bytes at its peak for {} bytes of body received \
             ({CHANNELS} headers announcing {ANNOUNCED} bytes each)",
            CHANNELS * 2 * FRAME_PAYLOAD
        );
    })
    .await;
}
