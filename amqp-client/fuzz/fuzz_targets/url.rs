//! Fuzzes URL parsing (`Config::from_str`) with
//! `amqp091::fuzzing::check_url` (see `src/fuzzing/config_url.rs` for the
//! properties checked). Inputs that are not UTF-8 are not strings, and skipped.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        amqp091::fuzzing::check_url(text);
    }
});
