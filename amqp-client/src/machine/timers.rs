//! Time as an input: heartbeats sent and expected, and the close deadline.

use super::*;

/// How long body buffers are kept for reuse after the last body that needed
/// one (see `body_pool.rs`).
const BODY_POOL_IDLE: Duration = Duration::from_secs(1);

impl<P: Ports> Machine<P> {
    /// When [`handle_timeout`](Self::handle_timeout) next needs calling.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        let mut next = None;
        if let State::Closing { deadline } = self.state {
            next = Some(deadline);
        }
        if !self.settings.heartbeat.is_zero() && self.has_socket() {
            let send_at = self.last_sent + self.settings.heartbeat / 2;
            // While reading is paused for a full consumer buffer, silence is
            // not the peer's (see handle_timeout): no deadline for it.
            let earliest = if self.is_paused() {
                send_at
            } else {
                send_at.min(self.last_received + self.settings.heartbeat * 2)
            };
            next = Some(next.map_or(earliest, |n: Instant| n.min(earliest)));
        }
        next
    }

    /// Time passed: send a heartbeat, declare the peer dead, or give up on a close.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.release_idle_bodies(now);
        if let State::Closing { deadline } = self.state {
            if now >= deadline {
                tracing::debug!("no connection.close-ok before the timeout");
                self.finish();
                return;
            }
        }
        if self.settings.heartbeat.is_zero() || !self.has_socket() {
            return;
        }
        // While a full consumer buffer pauses reading, the broker's frames wait
        // in the socket: silence is ours, not the peer's.
        if !self.is_paused() && now >= self.last_received + self.settings.heartbeat * 2 {
            tracing::warn!("missed heartbeats: no frame from the broker for two intervals");
            self.connection_lost(Error::MissedHeartbeats(self.settings.heartbeat * 2));
            return;
        }
        if now >= self.last_sent + self.settings.heartbeat / 2 {
            self.heartbeat_due = true;
        }
    }

    /// Bytes arrived.
    pub(crate) fn on_received(&mut self, now: Instant) {
        self.last_received = now;
        self.release_idle_bodies(now);
    }

    /// Frees the body buffers kept for reuse once no body has needed one
    /// for [`BODY_POOL_IDLE`]: checked at each read and heartbeat tick, so a
    /// connection with neither keeps them until one comes.
    fn release_idle_bodies(&mut self, now: Instant) {
        if let Some(used_at) = self.bodies.used_at {
            if now.saturating_duration_since(used_at) >= BODY_POOL_IDLE {
                self.bodies.used_at = None;
                self.bodies.pool.release();
            }
        }
    }

    /// Bytes were written.
    pub(crate) fn on_sent(&mut self, now: Instant) {
        self.last_sent = now;
        if self.close_written {
            self.close_written = false;
            if let State::Closing { deadline } = &mut self.state {
                *deadline = now + self.settings.close_timeout;
            }
        }
    }
}
