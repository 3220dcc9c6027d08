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

    /// Whether `bytes` more fit in the budget while `used` are queued. A
    /// message larger than the whole budget goes when nothing else is queued.
    fn fits(&self, used: u64, bytes: u64) -> bool {
        used + bytes <= self.limit || used == 0
    }

    /// Takes `bytes` if the budget has them: one atomic add when it does.
    fn try_take(&self, bytes: u64) -> bool {
        let before = self.used.fetch_add(bytes, Ordering::AcqRel);
        if self.fits(before, bytes) {
            return true;
        }
        // For a moment these bytes were counted as used, and a waiting
        // publisher's check may have been refused because of them: like
        // credit given back, taking them back must wake it.
        self.give_back(bytes);
        false
    }

    /// [`try_take`](Self::try_take) for a publisher counted in `waiters`:
    /// a refusal counts nothing, not even for a moment, so it wakes nobody
    /// (two waiters refused in turn would otherwise wake each other for as
    /// long as the budget stays spent). A refusal still writes `used` back
    /// unchanged: as a read-modify-write it is ordered with every give-back,
    /// so a give-back after it sees this publisher in `waiters`.
    fn try_take_waiting(&self, bytes: u64) -> bool {
        let mut current = self.used.load(Ordering::Acquire);
        loop {
            let fits = self.fits(current, bytes);
            let next = if fits { current + bytes } else { current };
            match self.used.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return fits,
                Err(actual) => current = actual,
            }
        }
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
        if !self.try_take(bytes) {
            loop {
                let _counted = Waiter::count(&self.waiters);
                let returned = self.returned.notified();
                tokio::pin!(returned);
                // Registered before the check: a return in between is not missed.
                returned.as_mut().enable();
                if self.try_take_waiting(bytes) {
                    break;
                }
                returned.await;
            }
        }
        Credit {
            budget: self.clone(),
            bytes,
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

/// A publisher counted in `waiters` until this drops, even when its `take`
/// is dropped while it waits (a timeout, a `select!`): counted for ever, it
/// would make every later give-back take `Notify`'s lock to wake nobody.
struct Waiter<'a>(&'a AtomicUsize);

impl<'a> Waiter<'a> {
    fn count(waiters: &'a AtomicUsize) -> Self {
        waiters.fetch_add(1, Ordering::AcqRel);
        Self(waiters)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
    async fn a_take_dropped_while_it_waits_stops_counting_as_a_waiter() {
        let budget = PublishBudget::new(100);
        let held = budget.take(100).await;
        let gave_up =
            tokio::time::timeout(std::time::Duration::from_millis(20), budget.take(50)).await;
        assert!(gave_up.is_err(), "no credit left");
        assert_eq!(budget.waiters.load(Ordering::Acquire), 0);
        drop(held);
        assert_eq!(budget.used(), 0);
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

/// loom explores every interleaving of these threads over the budget's
/// atomics and its `Notify` (a model of tokio's, see `crate::sync`). A lost
/// wake-up shows as loom's "deadlock" failure: every thread waits and none
/// will wake it.
#[cfg(all(test, amqp_client_loom))]
mod loom_models {
    use super::*;
    use crate::sync::explore;
    use loom::future::block_on;
    use loom::thread;

    #[test]
    fn concurrent_publishers_never_overspend_and_none_is_left_waiting() {
        // Three preemptions reach the lost wake-up between two refused
        // publishers that loom found here.
        explore(3, || {
            const LIMIT: u64 = 10;
            let budget = PublishBudget::new(LIMIT);
            // What the holders of credit say they hold; over the limit is
            // an overspend, whatever `used` says.
            let held = Arc::new(AtomicU64::new(6));
            let first = budget.try_credit(6).expect("the budget is unused");
            let publishers: Vec<_> = (0..2)
                .map(|_| {
                    let budget = budget.clone();
                    let held = held.clone();
                    thread::spawn(move || {
                        let credit = block_on(budget.take(6));
                        let now = held.fetch_add(6, Ordering::SeqCst) + 6;
                        assert!(now <= LIMIT, "{now} bytes of credit out of {LIMIT}");
                        held.fetch_sub(6, Ordering::SeqCst);
                        drop(credit);
                    })
                })
                .collect();
            held.fetch_sub(6, Ordering::SeqCst);
            drop(first);
            for publisher in publishers {
                publisher.join().expect("publisher");
            }
            assert_eq!(budget.used(), 0);
        });
    }

    #[test]
    fn a_publisher_refused_credit_does_not_strand_one_that_waits() {
        explore(3, || {
            let budget = PublishBudget::new(10);
            let first = budget.try_credit(6).expect("the budget is unused");
            let waiting = thread::spawn({
                let budget = budget.clone();
                move || drop(block_on(budget.take(6)))
            });
            // Tries once and gives up: its bytes, counted for a moment,
            // can refuse the waiting publisher's check after the credit
            // it waits for came back.
            let trying = thread::spawn({
                let budget = budget.clone();
                move || drop(budget.try_credit(6))
            });
            drop(first);
            waiting.join().expect("waiting publisher");
            trying.join().expect("trying publisher");
            assert_eq!(budget.used(), 0);
        });
    }

    #[test]
    fn credit_given_back_by_drop_and_by_the_write_batch_comes_back_once_and_wakes_the_waiter() {
        explore(4, || {
            let budget = PublishBudget::new(10);
            let mut returns = CreditReturns::default();
            returns.push(budget.try_credit(4).expect("room"));
            let dropped = budget.try_credit(6).expect("room");
            let waiting = thread::spawn({
                let budget = budget.clone();
                move || block_on(budget.take(10))
            });
            let dropping = thread::spawn(move || drop(dropped));
            returns.give_back();
            let whole_budget = waiting.join().expect("publisher");
            dropping.join().expect("dropping");
            assert_eq!(budget.used(), 10, "each return counted once");
            drop(whole_budget);
            drop(returns);
            assert_eq!(budget.used(), 0);
        });
    }
}
