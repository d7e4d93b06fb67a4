#![no_main]
//! Fuzz target `cli_args`: see vmm::fuzzing::cli_args.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::cli_args(data));
