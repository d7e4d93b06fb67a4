//! The contract between the processes of a live update.
//!
//! Everything that crosses an `exec` (or a socket, for cpr-transfer) is defined here, so the old
//! VMM, `cpr-shim` and the new VMM agree on it by construction:
//!
//! - [`compat`]: the note in every VMM binary saying which formats it reads;
//! - [`container`]: the versioned, checksummed file format used by both the machine state file and
//!   the CPR state;
//! - [`cpr`]: the CPR state (which fds are preserved and what they must be, the fallback binary,
//!   timings) and the hidden channel that carries it (a memfd named by `VMM_CPR_EXEC_STATE`);
//! - [`exec`]: execs prepared in advance (signal-safe), for the update and its rollback;
//! - [`fds`]: the records of preserved fds ([`fds::PreservedFd`]), fd hygiene (close-on-exec)
//!   and the checks that an inherited fd is the file its record describes;
//! - [`state_file`]: the machine state file's magic, versions and section ids;
//! - [`target`]: resolving and hashing the new VMM binary, and the record of a target checked
//!   before the stop;
//! - [`transfer`]: the cpr-transfer wire protocol between two running VMMs;
//! - [`timing`]: the clock every process uses for blackout accounting.
//!
//! Dependencies between the modules go one way: `fds`, `timing` and `compat` depend on nothing
//! here; `container` uses `timing`, `exec` and `target` use `fds`; `state_file`, `cpr` and `transfer`
//! build on those.
//!
//! This crate knows nothing about KVM.

pub mod compat;
pub mod container;
pub mod cpr;
pub mod exec;
pub mod fds;
pub mod state_file;
pub mod target;
pub mod timing;
pub mod transfer;
