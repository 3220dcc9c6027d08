//! Runs the deterministic simulator over many seeds, as a soak:
//!
//! ```sh
//! cargo run --release -p amqp091 --features fuzzing --example soak -- --seeds 1000000
//! cargo run -p amqp091 --features fuzzing --example soak -- --start 5000 --seeds 100
//! cargo run -p amqp091 --features fuzzing --example soak -- --seed 42 --trace
//! ```
//!
//! A failing seed panics with its last steps and the command that replays
//! it with the whole trace.

use std::time::Instant;

use amqp091::simulation::{check_seed, run_seed, Reached};

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut start, mut seeds, mut one, mut trace, mut keep_going) =
        (0u64, 10_000u64, None, false, false);
    while let Some(arg) = args.next() {
        let mut number = || -> u64 {
            args.next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{arg} takes a number"))
        };
        match arg.as_str() {
            "--start" => start = number(),
            "--seeds" => seeds = number(),
            "--seed" => one = Some(number()),
            "--trace" => trace = true,
            "--keep-going" => keep_going = true,
            other => {
                panic!("unknown argument {other}; use --seeds N, --start S [--keep-going], --seed S [--trace]")
            }
        }
    }
    if let Some(seed) = one {
        let reached = if trace {
            run_seed(seed, true)
        } else {
            check_seed(seed)
        };
        println!("seed {seed} holds: {reached}");
        return;
    }
    let began = Instant::now();
    let mut total = Reached::default();
    for (n, seed) in (start..start + seeds).enumerate() {
        if keep_going {
            match std::panic::catch_unwind(|| check_seed(seed)) {
                Ok(reached) => total.add(&reached),
                Err(_) => println!("FAILED seed {seed}"),
            }
        } else {
            total.add(&check_seed(seed));
        }
        if (n + 1) % 100_000 == 0 {
            eprintln!(
                "{} seeds, {:.0}/s",
                n + 1,
                (n + 1) as f64 / began.elapsed().as_secs_f64()
            );
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    println!(
        "{seeds} seeds from {start} hold: {:.0} seeds/s\n{total}",
        seeds as f64 / elapsed
    );
}
