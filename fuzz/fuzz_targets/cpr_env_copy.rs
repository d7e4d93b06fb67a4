#![no_main]
//! Fuzz target `cpr_env_copy`: see vmm::fuzzing::cpr_env_copy.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::cpr_env_copy(data));
