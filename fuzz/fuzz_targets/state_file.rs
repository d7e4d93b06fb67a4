#![no_main]
//! Fuzz target `state_file`: see vmm::fuzzing::state_file.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::state_file(data));
