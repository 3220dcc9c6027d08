//! What a real broker never does, played by a scripted fake peer: frames of
//! an unknown type, a bad frame end, a frame over frame_max, a truncated
//! method, a content header without a method, a heartbeat on a channel, a
//! different protocol version, a handshake that stalls, and a peer that stops
//! answering. The client must fail the connection with the right error (and
//! tell the peer why with `connection.close` where the spec says so), fail
//! every call that was waiting, and never hang.
//!
//! Every test is bounded by [`LIMIT`], so a hang fails it instead of CI.

use std::future::Future;
use std::time::{Duration, Instant};

use amqp091::prelude::*;
use amqp091::protocol::{DecodeError, FrameError, Method, MethodId};
use amqp091::{BasicProperties, Connection, Error};
use amqp_client_tests::fake_peer::{
    connection_start, frame_prefix, header_frame, method_frame, raw_frame, FakePeer, Recording,
    Tuning, FRAME_BODY, FRAME_HEARTBEAT, FRAME_METHOD, PROTOCOL_HEADER,
};

/// How long any one test may take.
const LIMIT: Duration = Duration::from_secs(10);

/// Runs `test`, failing (not hanging) when it takes longer than [`LIMIT`].
async fn bounded<T>(test: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, test).await {
        Ok(value) => value,
        Err(_) => panic!("the test did not finish within {LIMIT:?}: the client hangs"),
    }
}

/// Awaits one step, naming it when it hangs.
async fn step<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(5), future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not resolve within 5 s: the client hangs"),
    }
}

/// What the client has in flight when the bad frame arrives.
#[derive(Debug, Clone, Copy)]
enum Pending {
    /// `open_channel()`: the peer reads channel.open and does not answer.
    OpenChannel,
    /// `basic_qos()` on an open channel 1: the peer reads basic.qos and does not answer.
    Qos,
}

/// How a connection ended after the fake peer sent a bad frame.
struct Outcome {
    /// What `connection.closed()` returned.
    error: Error,
    /// What the call in flight returned.
    pending: Error,
    /// What a call made afterwards returned.
    later: Error,
    /// What the client sent after the bad frame.
    recording: Recording,
}

/// Handshake (with `tuning`), put `pending` in flight, send `bad`, and
/// collect how the client reacts.
async fn after_bad_frame(tuning: Tuning, pending: Pending, bad: Vec<u8>) -> Outcome {
    let peer = FakePeer::start(move |mut peer| async move {
        peer.handshake(&tuning).await?;
        match pending {
            Pending::OpenChannel => {
                peer.expect_method("channel.open").await?;
            }
            Pending::Qos => {
                let channel = peer.accept_channel_open().await?;
                assert_eq!(channel, 1, "the first channel is 1");
                peer.expect_method("basic.qos").await?;
            }
        }
        peer.send_raw(&bad).await?;
        peer.record_until_eof().await
    })
    .await
    .expect("the fake peer listens");

    let connection = step("the handshake", Connection::connect(peer.config()))
        .await
        .expect("the handshake with the fake peer succeeds");
    assert_eq!(connection.server_info().frame_max, tuning.frame_max);
    let mut channel = None;
    let pending = match pending {
        Pending::OpenChannel => step("the pending open_channel()", connection.open_channel())
            .await
            .map(drop),
        Pending::Qos => {
            let opened = step("open_channel()", connection.open_channel())
                .await
                .expect("the fake peer answers channel.open-ok");
            let qos = basic::Qos {
                prefetch_count: 10,
                ..Default::default()
            };
            let result = step("the pending basic_qos()", opened.basic_qos(qos))
                .await
                .map(drop);
            channel = Some(opened);
            result
        }
    };
    let pending = pending.expect_err("the call in flight must fail, not succeed");
    let error = step("connection.closed()", connection.closed())
        .await
        .expect_err("the connection must end with an error");
    assert!(connection.is_closed());
    assert!(error.is_connection_error(), "{error:?}");
    let later = step(
        "open_channel() after the failure",
        connection.open_channel(),
    )
    .await
    .expect_err("a closed connection opens no channel");
    if let Some(channel) = &channel {
        let again = step(
            "basic_qos() after the failure",
            channel.basic_qos(basic::Qos::default()),
        )
        .await
        .expect_err("a channel of a failed connection takes no call");
        assert_eq!(again.to_string(), error.to_string());
    }
    let recording = step("the fake peer", peer.finish()).await;
    Outcome {
        error,
        pending,
        later,
        recording,
    }
}

/// The client answered the bad frame with one `connection.close` carrying
/// `code`, as its last method, and `pending`/`later` carry the same error.
fn assert_closed_with(outcome: &Outcome, code: u16) {
    let close = outcome.recording.connection_close().unwrap_or_else(|| {
        panic!(
            "the client sent no connection.close; it sent {:?}",
            outcome.recording.frames
        )
    });
    assert_eq!(close.reply_code, code, "{close:?}");
    assert!(!close.reply_text.is_empty(), "the close says why");
    let last = outcome
        .recording
        .methods()
        .last()
        .map(|(c, m)| (c, m.info().name));
    assert_eq!(
        last,
        Some((0, "connection.close")),
        "nothing after the close"
    );
    assert_eq!(
        outcome
            .recording
            .methods()
            .filter(|(_, m)| m.info().name == "connection.close")
            .count(),
        1,
        "one close"
    );
    assert_eq!(outcome.pending.to_string(), outcome.error.to_string());
    assert_eq!(outcome.later.to_string(), outcome.error.to_string());
}

/// The frame error in `error`, or a panic naming what it was instead.
fn frame_error(error: &Error) -> &FrameError {
    match error {
        Error::Protocol(frame_error) => frame_error,
        other => panic!("expected Error::Protocol, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_frame_type_is_a_frame_error() {
    bounded(async {
        let outcome =
            after_bad_frame(Tuning::default(), Pending::Qos, raw_frame(9, 1, b"junk")).await;
        assert_eq!(
            frame_error(&outcome.error),
            &FrameError::UnknownFrameType {
                frame_type: 9,
                channel: 1
            }
        );
        assert_eq!(frame_error(&outcome.error).reply_code().code(), 501);
        assert_closed_with(&outcome, 501);
    })
    .await;
}

#[tokio::test]
async fn unknown_frame_type_fails_a_pending_open_channel() {
    bounded(async {
        let outcome = after_bad_frame(
            Tuning::default(),
            Pending::OpenChannel,
            raw_frame(9, 0, b""),
        )
        .await;
        assert_eq!(
            frame_error(&outcome.error),
            &FrameError::UnknownFrameType {
                frame_type: 9,
                channel: 0
            }
        );
        assert_closed_with(&outcome, 501);
    })
    .await;
}

#[tokio::test]
async fn bad_frame_end_is_a_frame_error() {
    bounded(async {
        // The very reply the pending call waits for, with 0xAB for 0xCE.
        let mut bad = method_frame(1, &Method::BasicQosOk(basic::QosOk {}));
        *bad.last_mut().expect("a frame") = 0xAB;
        let outcome = after_bad_frame(Tuning::default(), Pending::Qos, bad).await;
        assert_eq!(
            frame_error(&outcome.error),
            &FrameError::BadFrameEnd {
                found: 0xAB,
                channel: 1
            }
        );
        assert_closed_with(&outcome, 501);
    })
    .await;
}

#[tokio::test]
async fn body_frame_over_frame_max_is_rejected_from_its_prefix() {
    bounded(async {
        // Only the 7-byte prefix is ever sent: the client must not wait for
        // the 100000 bytes it announces.
        let bad = frame_prefix(FRAME_BODY, 1, 100_000);
        let outcome = after_bad_frame(Tuning::frame_max(4096), Pending::Qos, bad).await;
        assert_eq!(
            frame_error(&outcome.error),
            &FrameError::TooLarge {
                size: 100_008,
                max: 4096,
                channel: 1
            }
        );
        assert_closed_with(&outcome, 501);
    })
    .await;
}

#[tokio::test]
async fn method_frame_over_frame_max_is_rejected_from_its_prefix() {
    bounded(async {
        let bad = frame_prefix(FRAME_METHOD, 1, 100_000);
        let outcome = after_bad_frame(Tuning::frame_max(4096), Pending::OpenChannel, bad).await;
        assert_eq!(
            frame_error(&outcome.error),
            &FrameError::TooLarge {
                size: 100_008,
                max: 4096,
                channel: 1
            }
        );
        assert_closed_with(&outcome, 501);
    })
    .await;
}

#[tokio::test]
async fn truncated_method_is_a_syntax_error() {
    bounded(async {
        // basic.deliver (60/60) whose consumer-tag says 10 bytes, then nothing:
        // a correct frame envelope around 5 payload bytes.
        let bad = raw_frame(FRAME_METHOD, 1, &[0, 60, 0, 60, 10]);
        let outcome = after_bad_frame(Tuning::default(), Pending::Qos, bad).await;
        match frame_error(&outcome.error) {
            FrameError::Method {
                channel: 1,
                method: Some(method),
                source: DecodeError::Truncated { .. },
            } => assert_eq!(*method, MethodId::new(60, 60)),
            other => panic!("expected a truncated basic.deliver on channel 1, got {other:?}"),
        }
        assert_eq!(frame_error(&outcome.error).reply_code().code(), 502);
        assert_closed_with(&outcome, 502);
    })
    .await;
}

#[tokio::test]
async fn content_header_without_a_method_is_an_unexpected_frame() {
    bounded(async {
        let bad = header_frame(1, 5, &BasicProperties::default());
        let outcome = after_bad_frame(Tuning::default(), Pending::Qos, bad).await;
        assert!(
            matches!(outcome.error, Error::UnexpectedFrame(_)),
            "expected Error::UnexpectedFrame, got {:?}",
            outcome.error
        );
        assert_closed_with(&outcome, 505);
    })
    .await;
}

#[tokio::test]
async fn heartbeat_on_a_channel_is_rejected() {
    bounded(async {
        let bad = raw_frame(FRAME_HEARTBEAT, 3, b"");
        let outcome = after_bad_frame(Tuning::default(), Pending::Qos, bad).await;
        let error = frame_error(&outcome.error);
        assert_eq!(error, &FrameError::HeartbeatOnChannel { channel: 3 });
        // 0-9-1 §4.2.7: an invalid heartbeat frame is a 501 frame error;
        // the close must carry the same code.
        assert_eq!(error.reply_code().code(), 501);
        assert_closed_with(&outcome, 501);
    })
    .await;
}

/// The fake peer answers the protocol header with `header` and closes.
async fn answered_with_header(header: &'static [u8]) {
    let peer = FakePeer::start(move |mut peer| async move {
        let received = peer.read_protocol_header().await?;
        peer.send_raw(header).await?;
        Ok(received)
    })
    .await
    .expect("the fake peer listens");
    let error = step("Connection::open", Connection::connect(peer.config()))
        .await
        .expect_err("a server of another protocol version is refused");
    match &error {
        Error::ProtocolVersion { server_header } => assert_eq!(&server_header[..], header),
        other => panic!("expected Error::ProtocolVersion, got {other:?}"),
    }
    assert_eq!(step("the fake peer", peer.finish()).await, PROTOCOL_HEADER);
}

#[tokio::test]
async fn a_server_of_amqp_0_10_is_a_protocol_version_error() {
    bounded(answered_with_header(b"AMQP\x01\x01\x00\x0a")).await;
}

#[tokio::test]
async fn a_server_of_amqp_0_9_is_a_protocol_version_error() {
    bounded(answered_with_header(b"AMQP\x00\x00\x09\x00")).await;
}

/// Connects with a 1 s connection timeout to a peer that stalls after the
/// protocol header (or after start-ok when `after_start`) and checks that the handshake times out in time.
async fn stalled_handshake_times_out(after_start: bool) {
    let peer = FakePeer::start(move |mut peer| async move {
        peer.expect_protocol_header().await?;
        if after_start {
            peer.send_method(0, &connection_start()).await?;
            peer.expect_method("connection.start-ok").await?;
        }
        // Then nothing, until the client gives up and closes the socket.
        peer.wait_for_eof().await
    })
    .await
    .expect("the fake peer listens");
    let mut config = peer.config();
    config.connection_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let error = Connection::connect(config)
        .await
        .expect_err("a stalled handshake fails");
    let elapsed = started.elapsed();
    match &error {
        Error::Timeout { address, timeout } => {
            assert_eq!(*timeout, Duration::from_secs(1));
            assert!(address.ends_with(&format!(":{}", peer.port())), "{address}");
        }
        other => panic!("expected Error::Timeout, got {other:?}"),
    }
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(2),
        "timed out after {elapsed:?}, not ~1 s"
    );
    // The client dropped the socket: the peer saw it go.
    step("the fake peer", peer.finish()).await;
}

#[tokio::test]
async fn a_handshake_that_stalls_after_the_header_times_out() {
    bounded(stalled_handshake_times_out(false)).await;
}

#[tokio::test]
async fn a_handshake_that_stalls_after_start_ok_times_out() {
    bounded(stalled_handshake_times_out(true)).await;
}

#[tokio::test]
async fn a_silent_peer_is_declared_dead_after_two_heartbeat_intervals() {
    bounded(async {
        let peer = FakePeer::start(|mut peer| async move {
            let handshake = peer.handshake(&Tuning::heartbeat(1)).await?;
            // Then silence, while recording what the client sends.
            let recording = peer.record_until_eof().await?;
            Ok((handshake, recording))
        })
        .await
        .expect("the fake peer listens");
        // The client's default is 60 s: negotiating with 1 s gives 1 s.
        let connection = step("the handshake", Connection::connect(peer.config()))
            .await
            .expect("the handshake with the fake peer succeeds");
        let started = Instant::now();
        assert_eq!(connection.server_info().heartbeat, 1);
        let error = step("connection.closed()", connection.closed())
            .await
            .expect_err("a silent peer is dead");
        let elapsed = started.elapsed();
        match &error {
            Error::MissedHeartbeats(after) => assert_eq!(*after, Duration::from_secs(2)),
            other => panic!("expected Error::MissedHeartbeats, got {other:?}"),
        }
        assert!(
            elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_millis(3500),
            "declared dead after {elapsed:?}, not ~2 s"
        );
        let later = step(
            "open_channel() after the failure",
            connection.open_channel(),
        )
        .await
        .expect_err("a dead connection opens no channel");
        assert!(matches!(later, Error::MissedHeartbeats(_)), "{later:?}");

        let (handshake, recording) = step("the fake peer", peer.finish()).await;
        assert_eq!(handshake.tune_ok.heartbeat, 1, "the client asks for 1 s");
        // Idle for ~2 s with a 1 s interval: a heartbeat every ~0.5 s.
        assert!(
            recording.heartbeats() >= 2,
            "the client sent {} heartbeats while idle: {:?}",
            recording.heartbeats(),
            recording.frames
        );
        assert!(
            recording
                .methods()
                .all(|(_, m)| m.info().name == "connection.close"),
            "nothing but heartbeats (and maybe a close): {:?}",
            recording.frames
        );
    })
    .await;
}
