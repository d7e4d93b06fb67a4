#![no_main]
//! Fuzz target `compat_note`: see vmm::fuzzing::compat_note.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzzing::compat_note(data));
