#![no_main]
//! Fuzz target `qmp_arguments`: see vmm::fuzzing::qmp_arguments.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::qmp_arguments(data));
