//! The publish buffer's budget: publishers take credit for what they queue
//! in the client and give it back when the I/O task has written it, so a
//! broker that reads slower than the application publishes slows the
//! application instead of filling its memory.
//!
//! Not a `tokio::sync::Semaphore`: every publish takes and returns credit, and
//! a semaphore locks its waiter list on every return. Here taking is one
//! atomic add, and the I/O task gives back the credit of everything it wrote
//! in one subtraction per write batch ([`CreditReturns`]); the lock is taken
//! only while someone waits.

use std::sync::Arc;

use crate::sync::{AtomicU64, AtomicUsize, Notify, Ordering};

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

    fn give_back(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        if self.waiters.load(Ordering::Acquire) > 0 {
            self.returned.notify_waiters();
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
        if self.bytes > 0 {
            self.budget.give_back(self.bytes);
        }
    }
}

/// Credit of written publishes, given back to its budget in one go.
///
/// Given back one message at a time, every publish cost the I/O task an
/// atomic subtraction on the cache line that publishers add to from the
/// other core. Credit still held here when this is dropped goes back then.
#[derive(Debug, Default)]
pub(crate) struct CreditReturns(Vec<Credit>);

impl CreditReturns {
    /// Keeps `credit` until [`give_back`](Self::give_back).
    pub(crate) fn push(&mut self, credit: Credit) {
        self.0.push(credit);
    }

    /// Gives everything kept back to its budget: one subtraction per budget
    /// (a connection has one).
    pub(crate) fn give_back(&mut self) {
        let Some(first) = self.0.first() else {
            return;
        };
        let budget = first.budget.clone();
        let mut bytes = 0;
        for credit in &mut self.0 {
            if Arc::ptr_eq(&credit.budget, &budget) {
                bytes += std::mem::take(&mut credit.bytes);
            }
        }
        budget.give_back(bytes);
        // Emptied credits drop without touching the budget; others return
        // their own.
        self.0.clear();
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

    #[tokio::test]
    async fn credit_kept_for_returning_goes_back_at_once_and_wakes_a_waiting_publisher() {
        let budget = PublishBudget::new(100);
        let other = PublishBudget::new(100);
        let mut returns = CreditReturns::default();
        returns.push(budget.take(60).await);
        returns.push(budget.take(40).await);
        returns.push(other.take(10).await);
        assert_eq!(budget.used(), 100, "kept credit is still in use");
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(70).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "no credit left");
        returns.give_back();
        assert_eq!(other.used(), 0, "credit of another budget goes back to it");
        let taken = tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("woken when the kept credit came back")
            .expect("join");
        assert_eq!(budget.used(), 70);
        returns.push(taken);
        drop(returns);
        assert_eq!(
            budget.used(),
            0,
            "dropping the returns gives back what they keep"
        );
    }
}
