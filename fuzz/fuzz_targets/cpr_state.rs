#![no_main]
//! Fuzz target `cpr_state`: see vmm::fuzzing::cpr_state.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::cpr_state(data));
