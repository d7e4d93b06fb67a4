#![no_main]
//! Fuzz target `state_sections`: see vmm::fuzzing::state_sections.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::state_sections(data));
