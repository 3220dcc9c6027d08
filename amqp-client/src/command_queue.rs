//! The queue from the handles to the I/O task: commands (publishes, RPCs,
//! consumer changes) and settlements (acks, nacks, rejects), in the order
//! they were queued.
//!
//! The I/O task takes everything queued in one swap of two vectors, so the
//! cost per command is one uncontended lock and a push, and the I/O task is
//! woken once per batch, not once per command (tokio's bounded channel spent
//! about a quarter of a publish's CPU time on its per-message semaphore,
//! list and waker traffic between the two cores).
//!
//! Commands are bounded: past `capacity` queued commands, [`CommandSender::send`]
//! waits and [`CommandSender::try_send`] refuses. Settlements are not, and do
//! not count: each answers a delivery the consumer already holds, so their
//! number is bounded by the consumers' buffers, and acking must not wait
//! behind publishes.

use std::sync::Arc;

use crate::ports::Command;
use crate::sync::{Mutex, MutexGuard, Notify};

/// Why a command was not queued; the command is handed back.
#[derive(Debug)]
pub(crate) enum TrySendError {
    /// The queue holds `capacity` entries.
    Full(Command),
    /// The I/O task has stopped taking commands.
    Closed(Command),
}

struct State {
    queued: Vec<Command>,
    /// How many of `queued` are commands (not settlements).
    commands: usize,
    /// The receiver stopped taking: later sends fail.
    closed: bool,
    /// The sender is gone: once the queue is empty, nothing will come.
    sender_gone: bool,
    /// A sender waits for room.
    waiting_for_room: bool,
}

struct Queue {
    state: Mutex<State>,
    capacity: usize,
    /// Wakes the I/O task when the queue stops being empty or the sender goes.
    ready: Notify,
    /// Wakes senders waiting for room.
    room: Notify,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent (every
        // critical section is a push, a swap or a flag), so poisoning is moot.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The handles' end. There is one, owned by the connection's shared state;
/// dropping it tells the I/O task that every handle is gone.
pub(crate) struct CommandSender {
    queue: Arc<Queue>,
}

/// The I/O task's end.
pub(crate) struct CommandReceiver {
    queue: Arc<Queue>,
    /// The batch being handed to the machine; swapped with the queue's
    /// vector so that neither is reallocated once grown.
    batch: Vec<Command>,
}

/// A queue that holds at most `capacity` commands (settlements aside).
pub(crate) fn command_queue(capacity: usize) -> (CommandSender, CommandReceiver) {
    let queue = Arc::new(Queue {
        state: Mutex::new(State {
            queued: Vec::new(),
            commands: 0,
            closed: false,
            sender_gone: false,
            waiting_for_room: false,
        }),
        capacity,
        ready: Notify::new(),
        room: Notify::new(),
    });
    (
        CommandSender {
            queue: queue.clone(),
        },
        CommandReceiver {
            queue,
            batch: Vec::new(),
        },
    )
}

impl CommandSender {
    /// Queues `command` if there is room and the I/O task still takes commands.
    pub(crate) fn try_send(&self, command: Command) -> Result<(), TrySendError> {
        let mut state = self.queue.lock();
        if state.closed {
            return Err(TrySendError::Closed(command));
        }
        if state.commands >= self.queue.capacity {
            state.waiting_for_room = true;
            return Err(TrySendError::Full(command));
        }
        state.commands += 1;
        self.push(state, command);
        Ok(())
    }

    /// Queues `command`, waiting for room; hands it back if the I/O task has
    /// stopped taking commands.
    pub(crate) async fn send(&self, mut command: Command) -> Result<(), Command> {
        loop {
            // Registered before the check, so a wake between the two is kept.
            let room = self.queue.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_send(command) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(refused)) => return Err(refused),
                Err(TrySendError::Full(refused)) => {
                    command = refused;
                    room.await;
                }
            }
        }
    }

    /// Queues an ack, nack or reject, whatever the queue holds. After the
    /// I/O task has stopped, the settlement is dropped: its channel is gone.
    pub(crate) fn settle(&self, settlement: Command) {
        let state = self.queue.lock();
        if !state.closed {
            self.push(state, settlement);
        }
    }

    fn push(&self, mut state: MutexGuard<'_, State>, command: Command) {
        state.queued.push(command);
        let was_empty = state.queued.len() == 1;
        drop(state);
        // The I/O task takes the whole queue at once: only the first
        // command of a batch has to wake it.
        if was_empty {
            self.queue.ready.notify_one();
        }
    }
}

impl Drop for CommandSender {
    fn drop(&mut self) {
        self.queue.lock().sender_gone = true;
        self.queue.ready.notify_one();
    }
}

impl CommandReceiver {
    /// Waits until commands are queued or the sender is gone.
    pub(crate) async fn ready(&self) {
        loop {
            let ready = self.queue.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            {
                let state = self.queue.lock();
                if !state.queued.is_empty() || state.sender_gone {
                    return;
                }
            }
            ready.await;
        }
    }

    /// Takes everything queued, in queue order.
    pub(crate) fn take(&mut self) -> std::vec::Drain<'_, Command> {
        self.batch.clear();
        let waiting = {
            let mut state = self.queue.lock();
            std::mem::swap(&mut state.queued, &mut self.batch);
            state.commands = 0;
            std::mem::take(&mut state.waiting_for_room)
        };
        if waiting {
            self.queue.room.notify_waiters();
        }
        self.batch.drain(..)
    }

    /// Whether the sender is gone and nothing is left to take.
    pub(crate) fn is_done(&self) -> bool {
        let state = self.queue.lock();
        state.sender_gone && state.queued.is_empty()
    }

    /// Whether the sender is gone (commands may still be queued).
    pub(crate) fn is_sender_gone(&self) -> bool {
        self.queue.lock().sender_gone
    }

    /// Refuses every later command; what is queued stays to be taken.
    pub(crate) fn close(&mut self) {
        self.queue.lock().closed = true;
        self.queue.room.notify_waiters();
    }
}

impl Drop for CommandReceiver {
    /// The I/O task ended without taking what is queued (a panic, a runtime
    /// shut down): later sends fail, and what is queued is dropped, which
    /// answers its callers (their reply senders close) and gives back its
    /// publish credit.
    fn drop(&mut self) {
        self.close();
        let queued = std::mem::take(&mut self.queue.lock().queued);
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Settlement;
    use crate::protocol::methods::basic;
    use std::time::Duration;

    fn ack(tag: u64) -> Command {
        Command::Settle {
            channel: 1,
            settlement: Settlement::Ack(basic::Ack {
                delivery_tag: tag,
                multiple: false,
            }),
            epoch: 0,
        }
    }

    fn tags(receiver: &mut CommandReceiver) -> Vec<u64> {
        receiver
            .take()
            .map(|command| match command {
                Command::Settle {
                    settlement: Settlement::Ack(ack),
                    ..
                } => ack.delivery_tag,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn commands_and_settlements_come_out_in_queue_order() {
        let (sender, mut receiver) = command_queue(4);
        sender.try_send(ack(1)).expect("room");
        sender.settle(ack(2));
        sender.send(ack(3)).await.expect("room");
        receiver.ready().await;
        assert_eq!(tags(&mut receiver), [1, 2, 3]);
        assert!(tags(&mut receiver).is_empty());
    }

    #[tokio::test]
    async fn a_full_queue_refuses_commands_but_not_settlements_and_wakes_a_waiting_sender() {
        let (sender, mut receiver) = command_queue(2);
        sender.try_send(ack(1)).expect("room");
        sender.try_send(ack(2)).expect("room");
        assert!(matches!(
            sender.try_send(ack(3)),
            Err(TrySendError::Full(_))
        ));
        sender.settle(ack(4));
        let sender = Arc::new(sender);
        let waiting = tokio::spawn({
            let sender = sender.clone();
            async move { sender.send(ack(5)).await.map_err(drop) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the send must wait for room");
        assert_eq!(tags(&mut receiver), [1, 2, 4]);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the take")
            .expect("task")
            .expect("queued");
        assert_eq!(tags(&mut receiver), [5]);
    }

    #[tokio::test]
    async fn settlements_do_not_take_room_from_commands() {
        let (sender, mut receiver) = command_queue(1);
        sender.settle(ack(1));
        sender.settle(ack(2));
        sender
            .try_send(ack(3))
            .expect("settlements leave the room to commands");
        assert!(matches!(
            sender.try_send(ack(4)),
            Err(TrySendError::Full(_))
        ));
        assert_eq!(tags(&mut receiver), [1, 2, 3]);
        sender.try_send(ack(5)).expect("room again after the take");
    }

    #[tokio::test]
    async fn a_dropped_receiver_refuses_commands_and_drops_what_was_queued() {
        let (sender, receiver) = command_queue(4);
        let (reply, answer) = tokio::sync::oneshot::channel();
        sender
            .try_send(Command::OpenChannel {
                closed: Arc::new(std::sync::OnceLock::new()),
                epoch: Arc::new(std::sync::atomic::AtomicU64::new(0)),
                hook_owned: false,
                reply,
            })
            .expect("room");
        drop(receiver);
        assert!(
            answer.await.is_err(),
            "the queued command's reply is dropped"
        );
        assert!(matches!(
            sender.try_send(ack(1)),
            Err(TrySendError::Closed(_))
        ));
        assert!(sender.send(ack(2)).await.is_err());
    }

    #[tokio::test]
    async fn closing_refuses_later_commands_and_wakes_waiting_senders() {
        let (sender, mut receiver) = command_queue(1);
        sender.try_send(ack(1)).expect("room");
        let sender = Arc::new(sender);
        let waiting = tokio::spawn({
            let sender = sender.clone();
            async move { sender.send(ack(2)).await.is_err() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        receiver.close();
        assert!(tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the close")
            .expect("task"));
        assert!(matches!(
            sender.try_send(ack(3)),
            Err(TrySendError::Closed(_))
        ));
        sender.settle(ack(4));
        assert_eq!(
            tags(&mut receiver),
            [1],
            "what was queued before the close stays"
        );
    }

    #[tokio::test]
    async fn the_receiver_learns_when_the_sender_is_gone() {
        let (sender, mut receiver) = command_queue(4);
        sender.try_send(ack(1)).expect("room");
        drop(sender);
        assert!(receiver.is_sender_gone());
        assert!(!receiver.is_done(), "a command is still queued");
        tokio::time::timeout(Duration::from_secs(5), receiver.ready())
            .await
            .expect("ready");
        assert_eq!(tags(&mut receiver), [1]);
        assert!(receiver.is_done());
        tokio::time::timeout(Duration::from_secs(5), receiver.ready())
            .await
            .expect("a gone sender makes the queue ready");
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_the_first_command() {
        let (sender, mut receiver) = command_queue(4);
        let sender = Arc::new(sender);
        let later = tokio::spawn({
            let sender = sender.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                sender.settle(ack(7));
            }
        });
        tokio::time::timeout(Duration::from_secs(5), receiver.ready())
            .await
            .expect("woken");
        later.await.expect("task");
        assert_eq!(tags(&mut receiver), [7]);
    }
}

/// loom explores every interleaving of these threads over the queue's lock
/// and its two `Notify`s (a model of tokio's, see `crate::sync`). A lost
/// wake-up shows as loom's "deadlock" failure: every thread waits and none
/// will wake it.
#[cfg(all(test, amqp_client_loom))]
mod loom_models {
    use super::*;
    use crate::machine::Settlement;
    use crate::protocol::methods::basic;
    use crate::sync::explore;
    use loom::future::block_on;
    use loom::thread;

    /// Tags from here on are settlements; below, commands.
    const FIRST_SETTLEMENT_TAG: u64 = 100;

    fn ack(tag: u64) -> Command {
        Command::Settle {
            channel: 1,
            settlement: Settlement::Ack(basic::Ack {
                delivery_tag: tag,
                multiple: false,
            }),
            epoch: 0,
        }
    }

    fn tag(command: &Command) -> u64 {
        match command {
            Command::Settle {
                settlement: Settlement::Ack(ack),
                ..
            } => ack.delivery_tag,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A command whose drop shows: `Arc::strong_count(&witness)` falls back to
    /// one once the command is gone.
    fn witnessed_command() -> (Command, Arc<std::sync::OnceLock<crate::Error>>) {
        let witness = Arc::new(std::sync::OnceLock::new());
        let (reply, _answer) = tokio::sync::oneshot::channel();
        let command = Command::OpenChannel {
            closed: witness.clone(),
            epoch: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            hook_owned: false,
            reply,
        };
        (command, witness)
    }

    /// Takes batches until `count` entries came, checking that no batch holds
    /// more than `capacity` commands. The caller still holds the sender, so
    /// only the wake-up of a push can end a wait here.
    fn take_until(receiver: &mut CommandReceiver, count: usize, capacity: usize) -> Vec<u64> {
        let mut taken = Vec::new();
        while taken.len() < count {
            block_on(receiver.ready());
            let batch: Vec<u64> = receiver.take().map(|command| tag(&command)).collect();
            let commands = batch.iter().filter(|&&tag| tag < FIRST_SETTLEMENT_TAG);
            assert!(
                commands.count() <= capacity,
                "a batch holds more commands than the bound: {batch:?}"
            );
            taken.extend(batch);
        }
        taken
    }

    /// Drops the caller's sender and waits for the receiver to learn that the
    /// last one is gone.
    fn wait_until_done(receiver: &CommandReceiver, sender: Arc<CommandSender>) {
        drop(sender);
        block_on(receiver.ready());
        assert!(
            receiver.is_done(),
            "ready with nothing queued and a sender left"
        );
    }

    #[test]
    fn two_senders_pushing_while_the_receiver_takes_lose_duplicate_and_reorder_nothing() {
        explore(3, || {
            let (sender, mut receiver) = command_queue(4);
            let sender = Arc::new(sender);
            let first = thread::spawn({
                let sender = sender.clone();
                move || {
                    sender.try_send(ack(1)).expect("room");
                    sender.try_send(ack(2)).expect("room");
                }
            });
            let second = thread::spawn({
                let sender = sender.clone();
                move || {
                    sender.settle(ack(FIRST_SETTLEMENT_TAG + 1));
                    sender.try_send(ack(11)).expect("room");
                }
            });
            let taken = take_until(&mut receiver, 4, 4);
            wait_until_done(&receiver, sender);
            first.join().expect("first sender");
            second.join().expect("second sender");

            let position = |tag| taken.iter().position(|&taken| taken == tag);
            assert!(position(1) < position(2), "first sender's order: {taken:?}");
            assert!(
                position(FIRST_SETTLEMENT_TAG + 1) < position(11),
                "second sender's order: {taken:?}"
            );
            let mut each_once = taken.clone();
            each_once.sort_unstable();
            assert_eq!(each_once, [1, 2, 11, FIRST_SETTLEMENT_TAG + 1], "{taken:?}");
        });
    }

    #[test]
    fn senders_waiting_for_room_are_all_woken_by_takes_and_the_bound_holds() {
        explore(2, || {
            let (sender, mut receiver) = command_queue(1);
            sender.try_send(ack(1)).expect("room");
            let sender = Arc::new(sender);
            let waiting: Vec<_> = [2, 3]
                .map(|tag| {
                    let sender = sender.clone();
                    thread::spawn(move || block_on(sender.send(ack(tag))).expect("open"))
                })
                .into();
            let mut taken = take_until(&mut receiver, 3, 1);
            wait_until_done(&receiver, sender);
            for sender in waiting {
                sender.join().expect("sender");
            }
            taken.sort_unstable();
            assert_eq!(taken, [1, 2, 3]);
        });
    }

    #[test]
    fn closing_wakes_a_sender_waiting_for_room_and_keeps_what_was_queued() {
        loom::model(|| {
            let (sender, mut receiver) = command_queue(1);
            sender.try_send(ack(1)).expect("room");
            let sender = Arc::new(sender);
            let waiting = thread::spawn({
                let sender = sender.clone();
                move || block_on(sender.send(ack(2))).map_err(|refused| tag(&refused))
            });
            receiver.close();
            assert_eq!(
                waiting.join().expect("sender"),
                Err(2),
                "the queue stays full until the close, so the command comes back"
            );
            assert!(matches!(
                sender.try_send(ack(3)),
                Err(TrySendError::Closed(_))
            ));
            let taken: Vec<u64> = receiver.take().map(|command| tag(&command)).collect();
            assert_eq!(taken, [1]);
        });
    }

    #[test]
    fn a_receiver_dropped_while_a_sender_pushes_leaves_no_command_behind() {
        loom::model(|| {
            let (sender, receiver) = command_queue(2);
            let sender = Arc::new(sender);
            let (command, witness) = witnessed_command();
            let pushing = thread::spawn({
                let sender = sender.clone();
                move || match sender.try_send(command) {
                    Ok(()) => None,
                    Err(TrySendError::Closed(refused)) => Some(refused),
                    Err(TrySendError::Full(_)) => panic!("two commands fit"),
                }
            });
            drop(receiver);
            let refused = pushing.join().expect("sender");
            // Queued or refused, the command is dropped or handed back now,
            // while the sender lives: none waits in the queue for a receiver
            // that will never take it.
            assert_eq!(
                Arc::strong_count(&witness),
                1 + usize::from(refused.is_some())
            );
            assert!(matches!(
                sender.try_send(ack(1)),
                Err(TrySendError::Closed(_))
            ));
        });
    }
}
