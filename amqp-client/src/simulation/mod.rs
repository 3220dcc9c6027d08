//! A deterministic simulator of a connection's life: the sans-IO machine,
//! driven as the I/O task drives it (`driver.rs`, the only file that
//! touches it), against a model RabbitMQ node (`broker/`), with a seeded
//! application (`app.rs`) and seeded faults (`world.rs`): the socket lost at
//! any byte, the broker closing the connection or a channel, queues deleted
//! under their consumers, memory alarms, other clients' publishes, slow and
//! partial reads, time passing. No sockets, no threads, no clock: time is
//! an `Instant` plus offsets, and one seed replays exactly.
//!
//! Checked after every step and at the end (see `world.rs` and the broker):
//! no panic; no frame over `frame_max` and a message's frames contiguous on
//! its channel; nothing on a channel before its `channel.open`, one
//! synchronous request in flight per channel; no ack, nack or reject of a
//! tag the broker does not hold on that channel of that connection; every
//! confirmation attributed to the publish the broker confirmed, and every
//! acked publish accounted for by the broker; every delivery the one the
//! broker sent to that consumer, body intact; the memory held for slow
//! consumers within its bound; and once the run settles, every call,
//! confirmation and consumer answered, nothing left unacked, the broker's
//! consumers the application's, and after the close, everything ended.
//!
//! A failure panics with the seed, the last steps and the command that
//! replays it with the whole trace (`examples/soak.rs`).

use std::panic::{catch_unwind, AssertUnwindSafe};

mod app;
mod broker;
mod driver;
mod world;

pub use world::Reached;

/// SplitMix64: small, fast, and the same on every platform, so that a
/// seed is a run.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }

    pub(crate) fn flag(&mut self) -> bool {
        self.next() & 1 == 1
    }

    /// True one time in `n`.
    pub(crate) fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// Runs seed `seed`; with `trace`, every step is printed to stderr as it
/// runs. A violation panics.
pub fn run_seed(seed: u64, trace: bool) -> Reached {
    world::Sim::new(seed, trace).run()
}

/// Runs seed `seed`; a violation panics with the seed, the last steps and
/// the command that replays the run with its whole trace.
pub fn check_seed(seed: u64) -> Reached {
    match catch_unwind(AssertUnwindSafe(|| run_seed(seed, false))) {
        Ok(reached) => reached,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".to_owned());
            fail(seed, &message, &world::last_steps())
        }
    }
}

fn fail(seed: u64, message: &str, tail: &[String]) -> ! {
    panic!(
        "simulation seed {seed} failed: {message}\nlast steps:\n  {}\nreplay with: \
         cargo run -p amqp091 --features fuzzing --example soak -- --seed {seed} --trace",
        tail.join("\n  ")
    )
}

#[cfg(test)]
mod tests;
