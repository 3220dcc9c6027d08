//! The I/O task's write buffer: frames encoded in place, and large body
//! frames' payloads kept as slices of the application's body and written
//! with the frames around them in one `writev`, so that a large published
//! body reaches the socket with no copy of its own.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

use crate::machine::FrameSink;

/// How many slices one write hands the socket at most.
const MAX_SLICES: usize = 64;

/// Frames waiting for the socket, in order: `segments`, then `tail`.
#[derive(Default)]
pub(crate) struct Outbox {
    /// What comes first: frames encoded before a splice (frozen there), and
    /// spliced payloads.
    segments: VecDeque<Bytes>,
    segment_bytes: usize,
    /// Frames encoded since the last splice.
    tail: BytesMut,
}

impl Outbox {
    pub(crate) fn len(&self) -> usize {
        self.segment_bytes + self.tail.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The encoding buffer, for sizing and releasing its room.
    pub(crate) fn tail_mut(&mut self) -> &mut BytesMut {
        &mut self.tail
    }

    /// The bytes to write next, as slices into `slices`; how many there are.
    fn io_slices<'a>(&'a self, slices: &mut [IoSlice<'a>; MAX_SLICES]) -> usize {
        let mut count = 0;
        for segment in self.segments.iter().take(MAX_SLICES) {
            slices[count] = IoSlice::new(segment);
            count += 1;
        }
        if count < MAX_SLICES && !self.tail.is_empty() {
            slices[count] = IoSlice::new(&self.tail);
            count += 1;
        }
        count
    }

    /// Drops the first `n` bytes, which the socket took.
    pub(crate) fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.segments.front_mut() else {
                self.tail.advance(n);
                return;
            };
            if front.len() > n {
                front.advance(n);
                self.segment_bytes -= n;
                return;
            }
            n -= front.len();
            self.segment_bytes -= front.len();
            self.segments.pop_front();
        }
    }

    /// Writes some of what waits: a plain write while nothing is spliced
    /// (the usual case: small messages), else one vectored write. The
    /// slices are gathered at each poll, on the stack: kept in the future,
    /// they would grow every connection's task by a kilobyte.
    pub(crate) async fn write_some<W>(&self, writer: &mut W) -> std::io::Result<usize>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        std::future::poll_fn(|cx| {
            let writer = std::pin::Pin::new(&mut *writer);
            if self.segments.is_empty() {
                return writer.poll_write(cx, &self.tail);
            }
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = self.io_slices(&mut slices);
            writer.poll_write_vectored(cx, &slices[..count])
        })
        .await
    }

    /// Writes everything that waits; how many bytes that was.
    pub(crate) async fn write_all<W>(&mut self, writer: &mut W) -> std::io::Result<usize>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        let mut written = 0;
        while !self.is_empty() {
            match self.write_some(writer).await? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                n => {
                    self.advance(n);
                    written += n;
                }
            }
        }
        Ok(written)
    }
}

impl FrameSink for Outbox {
    fn buf(&mut self) -> &mut BytesMut {
        &mut self.tail
    }

    fn splice(&mut self, payload: Bytes) {
        if !self.tail.is_empty() {
            let encoded = self.tail.split().freeze();
            self.segment_bytes += encoded.len();
            self.segments.push_back(encoded);
        }
        self.segment_bytes += payload.len();
        self.segments.push_back(payload);
    }

    fn len(&self) -> usize {
        Outbox::len(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `step` bytes per call, vectored or not.
    struct Trickle {
        taken: Vec<u8>,
        step: usize,
        vectored_calls: usize,
    }

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.taken.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.vectored_calls += 1;
            let mut left = self.step;
            for buf in bufs {
                let n = buf.len().min(left);
                self.taken.extend_from_slice(&buf[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(self.step - left))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn spliced_payloads_go_out_between_the_encoded_frames_in_order() {
        let mut outbox = Outbox::default();
        let mut expected = Vec::new();
        for round in 0u8..3 {
            outbox.buf().extend_from_slice(&[round; 5]);
            let payload = Bytes::from(vec![round + 100; 1000]);
            outbox.splice(payload.clone());
            outbox.buf().extend_from_slice(&[round + 200; 3]);
            expected.extend_from_slice(&[round; 5]);
            expected.extend_from_slice(&payload);
            expected.extend_from_slice(&[round + 200; 3]);
        }
        assert_eq!(outbox.len(), expected.len());
        for step in [1, 7, 999, 5000] {
            let mut copy = Outbox {
                segments: outbox.segments.clone(),
                segment_bytes: outbox.segment_bytes,
                tail: outbox.tail.clone(),
            };
            let mut writer = Trickle {
                taken: Vec::new(),
                step,
                vectored_calls: 0,
            };
            let written = copy.write_all(&mut writer).await.expect("written");
            assert_eq!(written, expected.len(), "step {step}");
            assert_eq!(writer.taken, expected, "step {step}");
            assert!(copy.is_empty());
            assert_ne!(writer.vectored_calls, 0);
        }
    }

    #[tokio::test]
    async fn without_a_splice_the_tail_is_written_plainly() {
        let mut outbox = Outbox::default();
        outbox.buf().extend_from_slice(b"frames");
        let mut writer = Trickle {
            taken: Vec::new(),
            step: 4,
            vectored_calls: 0,
        };
        assert_eq!(outbox.write_all(&mut writer).await.expect("written"), 6);
        assert_eq!(writer.taken, b"frames");
        assert_eq!(writer.vectored_calls, 0);
    }
}
