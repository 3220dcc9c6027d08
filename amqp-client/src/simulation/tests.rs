//! The simulator's seeds as tests: many seeds, checked to reach what they
//! are meant to check, and the seeds of the bugs it found.

use super::*;

/// Seeds `cargo test` runs (the soak example runs more).
const SEEDS: u64 = 2_000;

#[test]
fn seeds_hold_and_reach_the_checks() {
    let mut total = Reached::default();
    for seed in 0..SEEDS {
        total.add(&check_seed(seed));
    }
    eprintln!("{total}");
    // The simulator must not silently test nothing: each kind of event
    // happens across the seeds, and most runs settle and close.
    let t = &total;
    assert!(t.app.channels_opened > SEEDS, "{t}");
    assert!(t.app.deliveries > 10 * SEEDS, "{t}");
    assert!(t.app.settled > 5 * SEEDS, "{t}");
    assert!(t.app.acked_confirms > SEEDS, "{t}");
    assert!(t.app.nacked_confirms > 50, "{t}");
    assert!(t.app.returned_confirms > 50, "{t}");
    assert!(t.app.unknown_confirms > 50, "{t}");
    assert!(t.app.gets > SEEDS, "{t}");
    assert!(t.broker.server_cancels > 100, "{t}");
    assert!(t.broker.channel_errors > SEEDS, "{t}");
    assert!(t.broker.requeues > SEEDS, "{t}");
    assert!(t.broker.commits > 100, "{t}");
    assert!(t.losses > SEEDS / 2, "{t}");
    assert!(t.mid_frame_losses > SEEDS / 4, "{t}");
    assert!(t.recoveries > SEEDS / 2, "{t}");
    assert!(t.forced_closes > SEEDS / 4, "{t}");
    assert!(t.blocked > SEEDS / 4, "{t}");
    assert!(t.settled_runs > SEEDS / 2, "{t}");
    assert!(t.closed_cleanly > SEEDS / 2, "{t}");
}
