#![no_main]
//! Fuzz target `qmp_stream`: see vmm::fuzzing::qmp_stream.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::qmp_stream(data));
