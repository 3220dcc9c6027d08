//! Fuzzing harnesses, compiled with the `fuzzing` feature (and in this
//! crate's tests). They live in the crate because what they drive is
//! crate-private (the connection state machine and its commands): the
//! cargo-fuzz targets in `fuzz/` only hand their input to these functions,
//! and `cargo test` runs the same checks on fixed and seeded inputs. Not part
//! of the API: no stability promise.

mod config_url;
mod machine;
pub(crate) mod support;

pub use config_url::check_url;
pub use machine::{machine_seeds, run_machine};
