//! The publish buffer's budget: publishers take credit for what they queue
//! in the client and give it back when the I/O task has written it, so a
//! broker that reads slower than the application publishes slows the
//! application instead of filling its memory.
//!
//! Not a `tokio::sync::Semaphore`: every publish takes and returns credit, and
//! a semaphore locks its waiter list on every return. Here the fast path is
//! one atomic add each way; the lock is taken only while someone waits.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// The budget, in bytes.
#[derive(Debug)]
pub(crate) struct PublishBudget {
    limit: u64,
    used: AtomicU64,
    waiters: AtomicUsize,
    returned: Notify,
}

/// Credit held by one queued publish; dropping it gives it back.
#[derive(Debug)]
pub(crate) struct Credit {
    budget: Arc<PublishBudget>,
    bytes: u64,
}

impl PublishBudget {
    pub(crate) fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            returned: Notify::new(),
        })
    }

    fn try_take(&self, bytes: u64) -> bool {
        let before = self.used.fetch_add(bytes, Ordering::AcqRel);
        // A message larger than the whole budget goes when nothing else is queued.
        if before + bytes <= self.limit || before == 0 {
            return true;
        }
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        false
    }

    /// Takes `bytes` of credit if the budget has it now.
    pub(crate) fn try_credit(self: &Arc<Self>, bytes: u64) -> Option<Credit> {
        self.try_take(bytes).then(|| Credit {
            budget: self.clone(),
            bytes,
        })
    }

    /// Takes `bytes` of credit, waiting while the budget is spent.
    pub(crate) async fn take(self: &Arc<Self>, bytes: u64) -> Credit {
        loop {
            if self.try_take(bytes) {
                return Credit {
                    budget: self.clone(),
                    bytes,
                };
            }
            self.waiters.fetch_add(1, Ordering::AcqRel);
            let returned = self.returned.notified();
            tokio::pin!(returned);
            // Registered before the re-check: a return in between is not missed.
            returned.as_mut().enable();
            if self.try_take(bytes) {
                self.waiters.fetch_sub(1, Ordering::AcqRel);
                return Credit {
                    budget: self.clone(),
                    bytes,
                };
            }
            returned.await;
            self.waiters.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Bytes currently queued.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        if self.budget.waiters.load(Ordering::Acquire) > 0 {
            self.budget.returned.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publishers_wait_while_the_budget_is_spent_and_resume_when_it_is_returned() {
        let budget = PublishBudget::new(100);
        let a = budget.take(60).await;
        let b = budget.take(40).await;
        assert_eq!(budget.used(), 100);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(50).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "no credit left");
        drop(a);
        let c = tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("woken when credit came back")
            .expect("join");
        assert_eq!(budget.used(), 90);
        drop((b, c));
        assert_eq!(budget.used(), 0);
        // Larger than the whole budget: goes when nothing else is queued.
        let huge = budget.take(1000).await;
        assert_eq!(budget.used(), 1000);
        drop(huge);
    }
}
