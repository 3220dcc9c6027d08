//! Buffers for bodies that span several frames, taken back when the
//! application drops the message and used again for the next one.
//!
//! Why: a fresh buffer of a megabyte is fresh pages, which the kernel faults
//! in and zeroes one by one as the frames are copied in; with 1 MiB bodies
//! that cost more CPU than the copy itself, and the allocator handed the
//! pages back to the kernel every few messages only to fault them in again.
//! A buffer used again is already mapped. The pool keeps a few buffers and
//! a bounded number of bytes, and lets go of them when the connection turns
//! quiet (see [`BodyPool::release`]), so an idle connection keeps none.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// At most this many buffers wait to be used again, as many as the bodies a
/// consumer with a prefetch of some tens may hold and drop at once ...
const KEPT_BUFFERS: usize = 64;
/// ... and at most this many bytes of room in all: a body larger than this
/// gets a buffer of its own each time. The pool holds only buffers the
/// application dropped, so never more than the bodies it held at once.
const KEPT_BYTES: usize = 64 * 1024 * 1024;

/// Buffers waiting to be used again, shared by the connection (which takes
/// them) and the bodies it handed out (which give them back when dropped).
#[derive(Clone, Default)]
pub(super) struct BodyPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BodyPool {
    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // A panic while the lock was held left a valid list of buffers.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An empty buffer for a body of `expected` bytes that needs room for
    /// `wanted` now. A kept buffer with room for the whole body is the best
    /// (its memory is there already, whatever the header announced), then
    /// the smallest kept one with room for `wanted`; else a new one of
    /// `wanted` bytes.
    pub(super) fn take(&self, wanted: usize, expected: usize) -> Vec<u8> {
        let mut kept = self.kept();
        let smallest_with = |room: usize| {
            kept.iter()
                .enumerate()
                .filter(|(_, buffer)| buffer.capacity() >= room)
                .min_by_key(|(_, buffer)| buffer.capacity())
                .map(|(index, _)| index)
        };
        match smallest_with(expected).or_else(|| smallest_with(wanted)) {
            Some(index) => kept.swap_remove(index),
            None => {
                drop(kept);
                Vec::with_capacity(wanted)
            }
        }
    }

    /// Keeps `buffer` for a later body if there is room for it, in place of
    /// smaller ones if need be: a large body's buffer is worth more than the
    /// smaller ones its growth left behind.
    pub(super) fn give_back(&self, mut buffer: Vec<u8>) {
        if buffer.capacity() > KEPT_BYTES {
            return;
        }
        buffer.clear();
        let mut evicted = Vec::new();
        let mut kept = self.kept();
        let mut held: usize = kept.iter().map(Vec::capacity).sum();
        while kept.len() >= KEPT_BUFFERS || held + buffer.capacity() > KEPT_BYTES {
            let smallest = kept
                .iter()
                .enumerate()
                .min_by_key(|(_, kept)| kept.capacity())
                .map(|(index, kept)| (index, kept.capacity()));
            match smallest {
                Some((index, capacity)) if capacity < buffer.capacity() => {
                    held -= capacity;
                    evicted.push(kept.swap_remove(index));
                }
                // Not worth more than what is kept: freed with the others.
                _ => {
                    evicted.push(buffer);
                    drop(kept);
                    return;
                }
            }
        }
        kept.push(buffer);
        // `evicted` is freed once the lock is let go.
        drop(kept);
    }

    /// `buffer` as the body handed to the application: dropping the last
    /// `Bytes` of it gives the buffer back.
    pub(super) fn freeze(&self, buffer: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buffer,
            pool: self.clone(),
        })
    }

    /// Frees every kept buffer (bodies still held by the application are
    /// freed when dropped, if the pool is full by then).
    pub(super) fn release(&self) {
        let buffers = std::mem::take(&mut *self.kept());
        drop(buffers);
    }

    /// How many bytes of room wait to be used again.
    #[cfg(test)]
    pub(super) fn kept_bytes(&self) -> usize {
        self.kept().iter().map(Vec::capacity).sum()
    }
}

/// A body's buffer, on its way back to the pool when dropped.
struct Pooled {
    buffer: Vec<u8>,
    pool: BodyPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buffer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_body_gives_its_buffer_to_the_next_one() {
        let pool = BodyPool::default();
        let mut buffer = pool.take(1000, 1000);
        buffer.extend_from_slice(&[7; 1000]);
        let address = buffer.as_ptr();
        let body = pool.freeze(buffer);
        let copy = body.slice(10..20);
        drop(body);
        assert_eq!(pool.kept_bytes(), 0, "a slice still holds it");
        assert_eq!(&copy[..], &[7; 10]);
        drop(copy);
        assert!(pool.kept_bytes() >= 1000);
        let again = pool.take(600, 1000);
        assert_eq!(again.as_ptr(), address);
        assert!(again.is_empty());
    }

    #[test]
    fn a_buffer_for_the_whole_body_is_preferred_and_the_smallest_fitting_one_otherwise() {
        let pool = BodyPool::default();
        for capacity in [100, 400, 200] {
            pool.give_back(Vec::with_capacity(capacity));
        }
        assert!(pool.take(50, 300).capacity() >= 400);
        assert_eq!(pool.take(150, 10_000).capacity(), 200);
        assert_eq!(pool.take(150, 10_000).capacity(), 150, "a new one");
    }

    #[test]
    fn what_is_kept_is_bounded_and_released_on_demand() {
        let pool = BodyPool::default();
        for _ in 0..KEPT_BUFFERS + 10 {
            pool.give_back(Vec::with_capacity(1024));
        }
        assert_eq!(pool.kept_bytes(), KEPT_BUFFERS * 1024);
        // A larger buffer takes the place of a smaller one.
        pool.give_back(Vec::with_capacity(8 << 20));
        assert_eq!(pool.kept_bytes(), (KEPT_BUFFERS - 1) * 1024 + (8 << 20));
        // ... of as many smaller ones as it takes to stay within the bytes.
        pool.release();
        for capacity in [1 << 20, 4 << 20, 16 << 20, 16 << 20, 16 << 20, 4 << 20] {
            pool.give_back(Vec::with_capacity(capacity));
        }
        assert_eq!(pool.kept_bytes(), (48 + 8 + 1) << 20);
        pool.give_back(Vec::with_capacity(16 << 20));
        assert_eq!(
            pool.kept_bytes(),
            64 << 20,
            "the 1 and both 4 MiB ones made room"
        );
        pool.give_back(Vec::with_capacity(2 << 20));
        assert_eq!(
            pool.kept_bytes(),
            64 << 20,
            "a smaller one does not push out a larger"
        );
        // Room is bounded in bytes too: the largest kept (and one over the
        // bound is not kept at all).
        pool.release();
        for _ in 0..10 {
            pool.give_back(Vec::with_capacity(16 << 20));
        }
        assert_eq!(pool.kept_bytes(), KEPT_BYTES);
        pool.give_back(Vec::with_capacity(KEPT_BYTES + 1));
        assert_eq!(pool.kept_bytes(), KEPT_BYTES);
        pool.release();
        assert_eq!(pool.kept_bytes(), 0);
    }
}
