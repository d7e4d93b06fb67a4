#![no_main]
//! Fuzz target `hmp_line`: see vmm::fuzzing::hmp_line.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::hmp_line(data));
