//! Fuzzes the connection state machine: the input is a program of
//! application commands, broker bytes and I/O events, run by
//! `amqp091::fuzzing::run_machine` (see `src/fuzzing/machine.rs` for the
//! program's steps and the properties checked).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| amqp091::fuzzing::run_machine(data));
