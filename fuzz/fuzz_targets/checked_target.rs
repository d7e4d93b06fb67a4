#![no_main]
//! Fuzz target `checked_target`: see vmm::fuzzing::checked_target.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::checked_target(data));
