#![no_main]
//! Fuzz target `transfer_frames`: see vmm::fuzzing::transfer_frames.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::transfer_frames(data));
