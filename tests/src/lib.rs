//! End-to-end test harness for the cpr-vmm binaries.
//!
//! The end-to-end tests under `tests/tests/` drive the real `vmm` (and later
//! `cpr-shim`) binaries as black boxes: they spawn processes, talk QMP over a
//! UNIX socket, watch the guest serial console on stdout and inspect guest
//! memory dumps. This library holds everything those tests share so each test
//! reads as a short scenario instead of plumbing.
//!
//! Nothing in here needs `/dev/kvm`; only the tests that actually start a
//! VMM do.
//!
//! A typical end-to-end test:
//!
//! ```no_run
//! use std::time::Duration;
//! use cpr_tests::*;
//!
//! let dir = TempDir::new("hb").unwrap();
//! let socket = dir.join("qmp.sock");
//! let vmm = VmmProcess::start_vmm([
//!     "-m", "64M", "-smp", "2", "--guest", "heartbeat",
//!     "-qmp", &qmp_socket_arg(&socket),
//! ]);
//! vmm.wait_for_all_ticks(2, 5, Duration::from_secs(30)).unwrap();
//! let mut qmp = QmpClient::connect_and_negotiate(&socket, Duration::from_secs(10)).unwrap();
//! qmp.execute("stop", serde_json::Value::Null).unwrap();
//! qmp.wait_event("STOP", Duration::from_secs(5)).unwrap();
//! vmm.send_signal(Signal::SIGTERM).unwrap();
//! assert!(vmm.wait_exit(Duration::from_secs(10)).unwrap().success());
//! assert_ticks_consecutive(&parse_heartbeat_ticks(&vmm.stdout_text())).unwrap();
//! ```

pub mod binaries;
pub mod blkcheck;
pub mod cpr;
pub mod heartbeat;
pub mod hugepages;
pub mod linux_probe;
pub mod memcheck;
pub mod netcheck;
pub mod netns;
pub mod prereq;
pub mod previous_release;
pub mod process;
pub mod procfs;
pub mod qemu_bench;
pub mod qmp;
pub mod stats;
pub mod tempdir;
pub mod transfer;

pub use binaries::{
    build_binaries, dist_binaries, is_statically_linked, shim_bin, target_dir, vmm_bin,
    workspace_root,
};
pub use heartbeat::{
    HeartbeatLog, assert_ticks_consecutive, assert_ticks_go_on, parse_heartbeat_ticks,
    parse_heartbeats, read_tick_counters,
};
pub use memcheck::{MEMCHECK_BASE, MEMCHECK_LIMIT, check_memcheck_dump, dump_memcheck_range};
pub use prereq::{in_ci, prerequisite_missing, require_root};
pub use process::{
    Stream, TimeoutError, VmmProcess, assert_vmm_startup_error, run_vmm_as_nobody, wait_for_path,
};
pub use procfs::{
    Holdings, O_CLOEXEC_FLAG, OpenFd, holdings, list_fds, read_proc_fd_flags, wait_until,
};
pub use qmp::{QmpClient, QmpError, event_timestamp, file_uri, qmp_socket_arg};
pub use tempdir::TempDir;

/// Re-exported so tests can name signals without depending on `nix` themselves.
pub use nix::sys::signal::Signal;

#[cfg(test)]
mod fake_qmp;
