//! The synchronisation primitives of the queue to the I/O task
//! (`command_queue.rs`) and of the publish budget (`credit.rs`): std's and
//! tokio's own in every build, and loom's in the loom test build
//! (`RUSTFLAGS="--cfg amqp_client_loom" cargo test --lib loom_models`), so
//! that the loom models in those files explore every interleaving of their
//! locks and atomics.
//!
//! The cfg is the crate's own, not the usual `loom`: tokio reads `loom`
//! itself and drops `tokio::net` under it. The switch also needs `test`:
//! loom is a dev-dependency, so only the test build can name it.
//!
//! loom cannot run tokio's `Notify` (its atomics and lock are tokio's own,
//! out of loom's sight), so the loom build uses [`Notify`] below: a model of
//! tokio's documented contract on loom's mutex. The models therefore check
//! the queue's and the budget's protocol given that contract, not tokio's
//! implementation of it.

#[cfg(not(all(test, amqp_client_loom)))]
pub(crate) use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
#[cfg(not(all(test, amqp_client_loom)))]
pub(crate) use std::sync::{Mutex, MutexGuard};
#[cfg(not(all(test, amqp_client_loom)))]
pub(crate) use tokio::sync::Notify;

#[cfg(all(test, amqp_client_loom))]
pub(crate) use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
#[cfg(all(test, amqp_client_loom))]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(all(test, amqp_client_loom))]
pub(crate) use notify_model::Notify;

/// Runs `model` under loom, over every interleaving with at most
/// `preemptions` preemptions (threads switched while they could go on) —
/// unless `LOOM_MAX_PREEMPTIONS` says otherwise, to look deeper by hand.
/// Models of three threads explored without a bound take minutes; every bug
/// seeded into these files so far showed within three preemptions.
#[cfg(all(test, amqp_client_loom))]
pub(crate) fn explore(preemptions: usize, model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound.get_or_insert(preemptions);
    builder.check(model);
}

#[cfg(all(test, amqp_client_loom))]
mod notify_model {
    //! tokio's `Notify` as its documentation describes it, in the subset the
    //! crate uses:
    //!
    //! - `notify_one` wakes the oldest registered waiter, or stores one
    //!   permit when none is registered; the next `Notified` takes it.
    //! - `notify_waiters` completes every `Notified` created before the
    //!   call, polled or not, and stores no permit.
    //! - a `Notified` registers when first polled or enabled; a
    //!   `notify_one` it received but never returned goes on to the next
    //!   waiter when it is dropped.

    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use loom::sync::Mutex;

    pub(crate) struct Notify {
        state: Mutex<State>,
    }

    #[derive(Default)]
    struct State {
        permit: bool,
        notify_waiters_calls: usize,
        next_waiter: usize,
        /// Registered waiters, oldest first.
        waiters: Vec<Waiter>,
    }

    struct Waiter {
        id: usize,
        waker: Option<Waker>,
        woken: Option<Woken>,
    }

    enum Woken {
        One,
        All,
    }

    impl State {
        /// Gives a `notify_one` to the oldest waiter not yet woken, or keeps
        /// it as the permit.
        fn notify_one(&mut self) -> Option<Waker> {
            match self
                .waiters
                .iter_mut()
                .find(|waiter| waiter.woken.is_none())
            {
                Some(waiter) => {
                    waiter.woken = Some(Woken::One);
                    waiter.waker.take()
                }
                None => {
                    self.permit = true;
                    None
                }
            }
        }
    }

    impl Notify {
        pub(crate) fn new() -> Self {
            Self {
                state: Mutex::new(State::default()),
            }
        }

        pub(crate) fn notified(&self) -> Notified<'_> {
            Notified {
                notify: self,
                notify_waiters_calls: self.state.lock().unwrap().notify_waiters_calls,
                stage: Stage::Created,
            }
        }

        pub(crate) fn notify_one(&self) {
            let waker = self.state.lock().unwrap().notify_one();
            if let Some(waker) = waker {
                waker.wake();
            }
        }

        pub(crate) fn notify_waiters(&self) {
            let mut state = self.state.lock().unwrap();
            state.notify_waiters_calls += 1;
            let wakers: Vec<Waker> = state
                .waiters
                .iter_mut()
                .filter(|waiter| waiter.woken.is_none())
                .filter_map(|waiter| {
                    waiter.woken = Some(Woken::All);
                    waiter.waker.take()
                })
                .collect();
            drop(state);
            for waker in wakers {
                waker.wake();
            }
        }
    }

    impl std::fmt::Debug for Notify {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Notify")
        }
    }

    #[derive(Clone, Copy)]
    enum Stage {
        Created,
        Registered(usize),
        Done,
    }

    pub(crate) struct Notified<'a> {
        notify: &'a Notify,
        notify_waiters_calls: usize,
        stage: Stage,
    }

    impl Notified<'_> {
        /// Registers without a waker, as tokio's `Notified::enable` does.
        pub(crate) fn enable(self: Pin<&mut Self>) -> bool {
            self.get_mut().poll_with(None).is_ready()
        }

        fn poll_with(&mut self, waker: Option<&Waker>) -> Poll<()> {
            let mut state = self.notify.state.lock().unwrap();
            match self.stage {
                Stage::Done => Poll::Ready(()),
                Stage::Created => {
                    if state.notify_waiters_calls != self.notify_waiters_calls {
                        self.stage = Stage::Done;
                        return Poll::Ready(());
                    }
                    if std::mem::take(&mut state.permit) {
                        self.stage = Stage::Done;
                        return Poll::Ready(());
                    }
                    let id = state.next_waiter;
                    state.next_waiter += 1;
                    state.waiters.push(Waiter {
                        id,
                        waker: waker.cloned(),
                        woken: None,
                    });
                    self.stage = Stage::Registered(id);
                    Poll::Pending
                }
                Stage::Registered(id) => {
                    let index = state
                        .waiters
                        .iter()
                        .position(|waiter| waiter.id == id)
                        .expect("a registered waiter stays listed until done");
                    if state.waiters[index].woken.is_some() {
                        state.waiters.remove(index);
                        self.stage = Stage::Done;
                        return Poll::Ready(());
                    }
                    if let Some(waker) = waker {
                        state.waiters[index].waker = Some(waker.clone());
                    }
                    Poll::Pending
                }
            }
        }
    }

    impl Future for Notified<'_> {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.get_mut().poll_with(Some(cx.waker()))
        }
    }

    impl Drop for Notified<'_> {
        fn drop(&mut self) {
            let Stage::Registered(id) = self.stage else {
                return;
            };
            let mut state = self.notify.state.lock().unwrap();
            let index = state
                .waiters
                .iter()
                .position(|waiter| waiter.id == id)
                .expect("a registered waiter stays listed until done");
            let waiter = state.waiters.remove(index);
            let forwarded = match waiter.woken {
                Some(Woken::One) => state.notify_one(),
                _ => None,
            };
            drop(state);
            if let Some(waker) = forwarded {
                waker.wake();
            }
        }
    }
}
