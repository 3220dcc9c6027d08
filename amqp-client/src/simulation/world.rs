//! One seeded run: the application, the I/O task and the broker take turns
//! in an order the seed picks, with faults between them, over virtual time;
//! then the run settles and everything must be answered, and the
//! connection closes and everything must be over.

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::app::{App, AppReached};
use super::broker::{Broker, BrokerReached};
use super::driver::{SimDriver, SimSettings, READ_CHUNK};
use super::Rng;
use crate::fuzzing::support::short;

/// Steps of one run before it settles.
const STEPS: usize = 300;
/// How many steps the last-steps record keeps for a failure's message.
const TAIL: usize = 40;
/// The machine's bound on bytes parked for slow consumers
/// (`OVERFLOW_LIMIT`), plus the one message that may cross it.
const OVERFLOW_BOUND: usize = 8 * 1024 * 1024;

thread_local! {
    static LAST_STEPS: RefCell<VecDeque<String>> = const { RefCell::new(VecDeque::new()) };
}

/// The last steps of the run on this thread, oldest first.
pub(crate) fn last_steps() -> Vec<String> {
    LAST_STEPS.with(|steps| steps.borrow().iter().cloned().collect())
}

/// What a run reached, summed over runs by the tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reached {
    pub(crate) app: AppReached,
    pub(crate) broker: BrokerReached,
    pub(crate) losses: u64,
    pub(crate) mid_frame_losses: u64,
    pub(crate) recoveries: u64,
    pub(crate) forced_closes: u64,
    pub(crate) blocked: u64,
    pub(crate) settled_runs: u64,
    pub(crate) closed_cleanly: u64,
}

impl Reached {
    /// Adds another run's counts.
    pub fn add(&mut self, other: &Reached) {
        macro_rules! sum {
            ($($part:ident . $field:ident),* ; $($own:ident),*) => {
                $(self.$part.$field += other.$part.$field;)*
                $(self.$own += other.$own;)*
            };
        }
        sum!(app.channels_opened, app.replies, app.deliveries, app.settled, app.acked_confirms,
             app.nacked_confirms, app.returned_confirms, app.unknown_confirms, app.consumers_ended, app.gets,
             broker.deliveries, broker.gets, broker.confirms, broker.nacks, broker.returns,
             broker.server_cancels, broker.channel_errors, broker.acks, broker.requeues, broker.commits,
             broker.dead_tags_settled;
             losses, mid_frame_losses, recoveries, forced_closes, blocked, settled_runs, closed_cleanly);
    }
}

impl std::fmt::Display for Reached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:#?}")
    }
}

pub(crate) struct Sim {
    rng: Rng,
    now: Instant,
    settings: SimSettings,
    driver: SimDriver,
    broker: Broker,
    app: App,
    trace: bool,
    /// Until when the network moves nothing (a partition).
    stalled_until: Option<Instant>,
    reached: Reached,
}

impl Sim {
    pub(crate) fn new(seed: u64, trace: bool) -> Self {
        let mut rng = Rng::new(seed);
        let now = Instant::now();
        let settings = SimSettings {
            channel_max: rng.pick(&[3, 8, 16]),
            frame_max: rng.pick(&[4096, 4096, 8192, 131_072]),
            heartbeat: Duration::from_secs(rng.pick(&[0, 5, 60])),
            recover: !rng.one_in(10),
            recover_topology: !rng.one_in(8),
            max_body_size: 1 << 20,
        };
        let driver = SimDriver::new(&settings, now);
        let mut broker = Broker::new(settings.frame_max, settings.channel_max);
        broker.trace = trace;
        broker.store.preload();
        broker.connect(settings.heartbeat, now);
        LAST_STEPS.with(|steps| steps.borrow_mut().clear());
        Self {
            rng,
            now,
            settings,
            driver,
            broker,
            app: App::default(),
            trace,
            stalled_until: None,
            reached: Reached::default(),
        }
    }

    fn note(&self, step: usize, what: &str) {
        let line = format!("{step}: {what}");
        if self.trace {
            eprintln!("{line}");
        }
        LAST_STEPS.with(|steps| {
            let mut steps = steps.borrow_mut();
            if steps.len() == TAIL {
                steps.pop_front();
            }
            steps.push_back(line);
        });
    }

    pub(crate) fn run(mut self) -> Reached {
        self.note(0, &format!("settings {:?}", self.settings));
        for step in 1..=STEPS {
            if self.driver.is_closed() {
                break;
            }
            let what = self.step();
            self.note(step, &what);
            self.after_step();
        }
        self.note(STEPS + 1, "settle");
        self.settle();
        self.note(STEPS + 2, "close");
        self.close();
        self.reached.app = self.app.reached;
        self.reached.broker = self.broker.reached;
        self.reached
    }

    fn step(&mut self) -> String {
        match self.rng.below(100) {
            0..=39 => self.app.act(&mut self.driver, &mut self.rng),
            40..=49 => {
                self.driver.pump(self.now);
                "the I/O task takes commands".to_owned()
            }
            50..=61 => {
                let budget = self.rng.pick(&[1, 100, 4096, usize::MAX]);
                let n = self.write(budget);
                format!("the client writes {n} bytes")
            }
            62..=73 => {
                let max = self.rng.pick(&[1, 7, 100, 4096, READ_CHUNK]);
                let n = self.read(max);
                format!("the client reads {n} bytes")
            }
            74..=85 => {
                let max = 1 + self.rng.below(4);
                let n = self
                    .app
                    .receive(&mut self.driver, &self.broker, &mut self.rng, max);
                format!("the application receives {n}")
            }
            86..=91 => {
                let by = Duration::from_millis(self.rng.pick(&[1, 50, 1_000, 10_000, 40_000]));
                self.advance(by);
                format!("time passes: {by:?}")
            }
            _ => self.fault(),
        }
    }

    /// What follows every step: answers read, a finished socket closed,
    /// a lost connection recovered in time, the bounds checked.
    fn after_step(&mut self) {
        self.app.answers(&mut self.driver, &self.broker);
        self.end_sockets();
        if self.driver.is_interrupted() && !self.driver.is_connected() && self.rng.one_in(3) {
            self.reconnect();
        }
        let buffered = self.driver.buffered_bytes();
        assert!(
            buffered <= OVERFLOW_BOUND + self.settings.max_body_size as usize + 4096,
            "{buffered} bytes parked for slow consumers"
        );
        assert!(
            self.driver.unread_bytes() <= self.broker_max_read(),
            "read buffer over its bound"
        );
    }

    fn broker_max_read(&self) -> usize {
        // What one read adds to a buffer holding less than a frame.
        READ_CHUNK + self.settings.frame_max as usize
    }

    fn write(&mut self, budget: usize) -> usize {
        if self.partitioned() {
            return 0;
        }
        let bytes = self.driver.take_written(budget, self.now);
        if self.broker.is_connected() {
            self.broker.receive(&bytes, self.now);
            self.broker.flush(&mut self.rng, self.now);
        }
        bytes.len()
    }

    fn read(&mut self, max: usize) -> usize {
        if self.partitioned() || !self.driver.wants_to_read() {
            return 0;
        }
        let bytes = self.broker.take_output(max.min(READ_CHUNK));
        self.driver.feed(&bytes, self.now);
        bytes.len()
    }

    fn partitioned(&self) -> bool {
        self.stalled_until.is_some_and(|until| self.now < until)
    }

    /// Sockets whose end came: the broker closed its side (the client reads
    /// an EOF once it read the rest), or the machine is done with its own
    /// (its last frames go to the broker, which then sees it closed).
    fn end_sockets(&mut self) {
        if self.broker.socket_closes() && self.driver.is_connected() {
            self.driver.lose_socket("the broker closed the socket");
        }
        if let Some(last) = self.driver.end_session() {
            if self.broker.is_connected() && !self.partitioned() {
                self.broker.receive(&last, self.now);
            }
            self.broker.drop_connection();
        }
    }

    fn reconnect(&mut self) {
        if self.rng.one_in(50) {
            self.driver.give_up();
            return;
        }
        self.reached.recoveries += 1;
        self.stalled_until = None;
        let heartbeat = self.settings.heartbeat;
        self.broker.connect(heartbeat, self.now);
        self.driver
            .resume(self.settings.channel_max, heartbeat, self.now);
    }

    /// Moves everything both ways until nothing moves (the network keeps up).
    fn exchange(&mut self) {
        for _ in 0..1000 {
            self.driver.pump(self.now);
            let written = self.write(usize::MAX);
            let read = self.read(READ_CHUNK);
            self.app.answers(&mut self.driver, &self.broker);
            self.end_sockets();
            if written == 0 && read == 0 {
                return;
            }
        }
        panic!("the client and the broker never stop talking");
    }

    /// Time passes by `by`, timer by timer, the network keeping up between.
    fn advance(&mut self, by: Duration) {
        let target = self.now + by;
        for _ in 0..10_000 {
            let next = [self.driver.next_timeout(), self.broker.next_timer()]
                .into_iter()
                .flatten()
                .filter(|at| *at > self.now)
                .min()
                .map_or(target, |at| at.min(target));
            self.now = next;
            if self.driver.is_connected() {
                self.driver.advance(self.now);
            }
            if self.broker.tick(self.now) {
                assert!(
                    self.partitioned(),
                    "the client sent nothing for two heartbeat intervals ({:?})",
                    self.settings.heartbeat
                );
                self.broker.drop_connection();
                self.driver.lose_socket("reset by the broker");
            }
            self.exchange();
            if self.now >= target {
                return;
            }
        }
        panic!("time does not advance");
    }

    fn fault(&mut self) -> String {
        let open = self.broker.open_channels();
        match self.rng.below(9) {
            0 | 1 => self.lose_connection(),
            2 => {
                self.reached.forced_closes += 1;
                self.broker.force_close();
                self.broker.flush(&mut self.rng, self.now);
                "the broker closes the connection".to_owned()
            }
            3 if !open.is_empty() => {
                let id = open[self.rng.below(open.len())];
                self.broker.fault_close_channel(id);
                self.broker.flush(&mut self.rng, self.now);
                format!("the broker closes channel {id}")
            }
            4 => {
                let queue = short(self.rng.pick(&["q1", "q2", "q.full"]));
                self.broker.delete_queue(&queue);
                self.broker.flush(&mut self.rng, self.now);
                format!("an operator deletes queue {queue}")
            }
            5 => {
                let blocked = !self.broker.is_blocked();
                self.reached.blocked += u64::from(blocked);
                self.broker.set_blocked(blocked);
                format!("memory alarm: blocked {blocked}")
            }
            6 | 7 => {
                for n in 0..1 + self.rng.below(6) {
                    let (exchange, key) = self.rng.pick(&[
                        ("", "q1"),
                        ("", "q2"),
                        ("x.fanout", "a"),
                        ("x.topic", "a.b"),
                        ("amq.direct", "a"),
                    ]);
                    let id = format!("e{}.{n}", self.reached.broker.deliveries);
                    let body = bytes::Bytes::from(vec![b'e'; self.rng.pick(&[0, 10, 5000])]);
                    self.broker
                        .external_publish(&short(exchange), &short(key), id, body);
                }
                self.broker.flush(&mut self.rng, self.now);
                "another client publishes".to_owned()
            }
            _ => {
                let by = Duration::from_secs(self.rng.pick(&[1, 30, 200]));
                self.stalled_until = Some(self.now + by);
                self.advance(by);
                self.stalled_until = None;
                format!("the network stalls for {by:?}")
            }
        }
    }

    /// The socket fails: each side got a prefix of what was on its way
    /// (maybe half a frame), then a reset.
    fn lose_connection(&mut self) -> String {
        if !self.driver.is_connected() || !self.broker.is_connected() {
            return "no socket to lose".to_owned();
        }
        let to_client = self.broker.output_len();
        let cut = self.rng.below(to_client + 1);
        let bytes = self.broker.take_output(cut);
        self.driver.feed(&bytes, self.now);
        let written = self.driver.take_written(usize::MAX, self.now);
        let cut_out = self.rng.below(written.len() + 1);
        self.broker.receive(&written[..cut_out], self.now);
        if cut < to_client || cut_out < written.len() {
            self.reached.mid_frame_losses += 1;
        }
        self.reached.losses += 1;
        self.broker.drop_connection();
        self.driver.lose_socket("connection reset");
        self.end_sockets();
        format!(
            "the socket fails: {cut} of {to_client} bytes read, {cut_out} of {} written",
            written.len()
        )
    }

    /// No more faults or random actions: the application settles what it
    /// holds and the network keeps up until nothing moves; then every call
    /// must be answered and the broker's state must match the application's.
    fn settle(&mut self) {
        self.stalled_until = None;
        self.broker.set_blocked(false);
        for _ in 0..200 {
            if self.driver.is_interrupted() && !self.driver.is_connected() {
                self.reconnect();
            }
            self.exchange();
            self.app
                .settle_all(&mut self.driver, &self.broker, &mut self.rng);
            self.exchange();
            self.advance(Duration::from_millis(1));
            let quiet = self.driver.calls_waiting() == 0
                && !self.app.holds()
                && !self.driver.deliveries_waiting()
                && self.broker.output_len() == 0;
            if quiet && !self.driver.is_interrupted() && !self.driver.is_recovering() {
                break;
            }
        }
        assert_eq!(
            self.driver.calls_waiting(),
            0,
            "calls still unanswered once the run settled"
        );
        assert!(
            !self.app.holds(),
            "deliveries still held once the run settled"
        );
        if self.driver.is_closed() {
            return;
        }
        assert!(!self.driver.is_recovering(), "recovery never finished");
        self.reached.settled_runs += 1;
        self.broker.check_ledger();
        let unacked = self.broker.unacked();
        assert!(
            unacked.is_empty(),
            "the broker still holds {unacked:?} unacked once the application settled everything"
        );
        let app: BTreeSet<_> = self.app.live_consumers(&self.driver).into_iter().collect();
        let broker: BTreeSet<_> = self.broker.consumers().into_iter().collect();
        assert_eq!(
            app, broker,
            "the application's live consumers and the broker's differ"
        );
    }

    /// The application closes the connection: afterwards every call is
    /// answered, every stream ended, every publish's credit back.
    fn close(&mut self) {
        if !self.driver.is_closed() {
            self.driver.close_connection();
            for _ in 0..100 {
                self.exchange();
                if self.driver.is_closed() {
                    break;
                }
                self.advance(Duration::from_millis(100));
            }
            assert!(self.driver.is_closed(), "the connection did not close");
            self.reached.closed_cleanly += 1;
        }
        self.end_sockets();
        self.app.answers(&mut self.driver, &self.broker);
        self.app
            .receive(&mut self.driver, &self.broker, &mut self.rng, usize::MAX);
        assert_eq!(
            self.driver.calls_waiting(),
            0,
            "calls unanswered after the close"
        );
        assert!(
            self.app.live_consumers(&self.driver).is_empty(),
            "consumers still live after the close"
        );
        assert!(
            self.driver.publish_credit_back(),
            "publish credit still held after the close"
        );
        self.broker.check_ledger();
        let _ = self.driver.recovery_events();
    }
}
