#![no_main]
//! Fuzz target `cli_options`: see vmm::fuzzing::cli_options.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::cli_options(data));
