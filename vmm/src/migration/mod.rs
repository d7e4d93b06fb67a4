//! Migration: one state walk ([`state`]), one file format ([`format`]), and one module per mode
//! deciding only what happens to RAM and where the bytes go:
//!
//! - [`file`]: stop, write state and every non-zero RAM page to a file; restore in a new
//!   process (the O(RAM) baseline);
//! - [`cpr_exec`]: stop, write state without RAM, keep RAM memfds open across an exec of the
//!   new VMM in the same process;
//! - [`cpr_transfer`]: pass RAM memfds to a separately started VMM over a UNIX socket, then
//!   stream the state.
//!
//! [`rescue`] is the guard process that keeps a cpr-exec update's guest when the new program
//! dies or hangs before it resumes the guest.

pub mod cpr_exec;
pub mod cpr_reboot;
pub mod cpr_transfer;
pub mod file;
pub mod format;
pub mod rescue;
pub mod state;

use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cpr_common::cpr::{FdKind, PreservedFd};
use cpr_common::fds::{self, FdError};

use crate::cli::IncomingSpec;
use crate::control::Vmm;
use crate::control::run_state;
use crate::devices::HostFd;
use crate::migration::cpr_transfer::TransferIn;
use crate::migration::format::RamProgress;
use crate::qmp::protocol::SocketAddress;
use crate::qmp::protocol::{
    EventKind, MigrateArgs, MigrateIncomingArgs, MigrationAddress, MigrationInfo, MigrationStats,
    QmpError, RunState,
};

pub use crate::qmp::protocol::{MigMode, MigrationStatus};

/// Why a step of a migration failed, in any mode; its text is the reason `query-migrate` and
/// the `MIGRATION` event's clients see.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("there is no machine to migrate")]
    NoMachine,
    #[error(transparent)]
    Machine(#[from] crate::machine::MachineError),
    #[error(transparent)]
    StateFile(#[from] format::StateFileError),
    #[error(transparent)]
    CprExec(#[from] cpr_exec::CprExecError),
    #[error(transparent)]
    Transfer(#[from] cpr_transfer::CprTransferError),
    #[error("cpr-transfer: {0}")]
    Protocol(#[from] cpr_common::transfer::TransferError),
    #[error("cpr-transfer: expected {expected} on the {channel} channel, got {got:?}")]
    Unexpected {
        channel: &'static str,
        expected: &'static str,
        got: cpr_common::transfer::Kind,
    },
    #[error("cpr-transfer: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cpr-transfer: the VM built for the incoming guest is gone")]
    NoPreparedMachine,
}

impl MigrationError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| MigrationError::Io { what, source }
    }
}

/// A device's host fd as a preserved fd: the same record and checks as guest RAM, with its
/// file type recorded so the receiver checks that too.
pub fn describe_device_fd(host: &HostFd) -> Result<PreservedFd, FdError> {
    let name = host.name.as_str();
    let file_type = fds::identity(host.fd, name)?.file_type;
    // The machine is paused and owned by the caller, so the device keeps `host.fd` open.
    // SAFETY: `host.fd` is open for this call, and the borrow does not outlive it.
    let fd = unsafe { BorrowedFd::borrow_raw(host.fd) };
    fds::describe(fd, name, FdKind::DeviceBackend { file_type })
}

/// What `query-migrate` reports about the last (or current) migration.
#[derive(Clone, Debug)]
pub struct MigrationRecord {
    pub status: MigrationStatus,
    pub started: Option<Instant>,
    pub setup_time_ms: u64,
    /// Fixed when the migration ends; computed live while it runs.
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub error: Option<String>,
    pub ram: Option<Arc<RamProgress>>,
    /// For live updates: the blackout and where its time went.
    pub cpr: Option<crate::qmp::protocol::CprUpdateInfo>,
}

impl Default for MigrationRecord {
    fn default() -> Self {
        MigrationRecord {
            status: MigrationStatus::None,
            started: None,
            setup_time_ms: 0,
            total_time_ms: None,
            downtime_ms: None,
            error: None,
            ram: None,
            cpr: None,
        }
    }
}

impl MigrationRecord {
    pub fn elapsed_ms(&self) -> u64 {
        self.total_time_ms.unwrap_or_else(|| {
            self.started
                .map(|s| s.elapsed().as_millis() as u64)
                .unwrap_or(0)
        })
    }
}

impl Vmm {
    /// After a cpr-transfer the guest runs in the new VMM on the same memory: running, resetting
    /// or migrating it here as well would corrupt it.
    pub(crate) fn refuse_if_handed_over(&self) -> Result<(), QmpError> {
        if self.handed_over {
            return Err(QmpError::generic(
                "The guest's RAM was handed to another VMM by cpr-transfer and runs there now; this VMM can only be queried or quit",
            ));
        }
        Ok(())
    }

    pub(crate) fn migrate(&mut self, args: &MigrateArgs) -> Result<(), QmpError> {
        let targets = args.targets()?;
        self.refuse_if_handed_over()?;
        if self.outgoing.is_some() || self.transfer_out.is_some() || self.pending_exec.is_some() {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        if self.machine.is_none() || self.run_state() == RunState::Inmigrate {
            return Err(QmpError::generic(
                "Guest is waiting for an incoming migration",
            ));
        }
        // Refused here, before anything stops, rather than half-way through.
        if !run_state::allowed(self.run_state(), RunState::FinishMigrate) {
            return Err(run_state::RunStateError {
                from: self.run_state(),
                to: RunState::FinishMigrate,
            }
            .into());
        }
        let mode = self.params.mode.unwrap_or_default();
        self.check_cpr_ram(mode)?;
        if mode == MigMode::CprTransfer {
            return self.migrate_cpr_transfer(&targets);
        }
        let path = match &targets.main {
            MigrationAddress::File(f) if f.filename.is_empty() => {
                return Err(QmpError::generic(
                    "file: needs a path, e.g. file:/run/vm.state",
                ));
            }
            MigrationAddress::File(f) if f.offset == 0 => PathBuf::from(&f.filename),
            _ => {
                return Err(QmpError::generic(format!(
                    "migration mode '{}' supports only file:PATH destinations",
                    mode.as_str()
                )));
            }
        };
        match mode {
            MigMode::CprExec => self.migrate_cpr_exec(path),
            MigMode::CprReboot => self.migrate_cpr_reboot(path),
            _ => self.start_outgoing_save(path),
        }
    }

    /// Records a failed migration and resumes the guest if it was running before.
    pub(crate) fn fail_migration(&mut self, reason: &str, guest_was_running: bool) {
        self.end_migration(MigrationStatus::Failed, Some(reason), guest_was_running);
    }

    /// Ends a migration that did not complete (`failed`, or `cancelled` by `migrate_cancel`)
    /// and resumes the guest if it was running before.
    pub(crate) fn end_migration(
        &mut self,
        status: MigrationStatus,
        reason: Option<&str>,
        guest_was_running: bool,
    ) {
        self.migration.status = status;
        self.migration.error = reason.map(str::to_string);
        self.migration.total_time_ms = Some(self.migration.elapsed_ms());
        self.emit(&EventKind::Migration { status });
        if guest_was_running {
            self.set_running();
        } else if self.machine.is_some() {
            let _ = self.set_run_state(RunState::Paused);
        }
    }

    pub(crate) fn query_migrate(&self) -> MigrationInfo {
        let r = &self.migration;
        if r.status == MigrationStatus::None {
            return MigrationInfo::default();
        }
        let ram = r.ram.as_ref().map(|p| p.stats(r.elapsed_ms()));
        MigrationInfo {
            status: Some(r.status),
            ram,
            total_time: Some(r.elapsed_ms() as i64),
            expected_downtime: None,
            downtime: r.downtime_ms.map(|d| d as i64),
            setup_time: Some(r.setup_time_ms as i64),
            cpu_throttle_percentage: None,
            error_desc: r.error.clone(),
            blocked_reasons: None,
            x_cpr: r.cpr.clone(),
        }
    }

    pub(crate) fn migrate_incoming(&mut self, args: &MigrateIncomingArgs) -> Result<(), QmpError> {
        if let Some(TransferIn::AwaitingChannel) = &self.transfer_in {
            let path = match args.address()? {
                MigrationAddress::Socket(SocketAddress::Unix(u)) if !u.path.is_empty() => {
                    PathBuf::from(u.path)
                }
                _ => {
                    return Err(QmpError::generic(
                        "cpr-transfer's main channel must be a unix socket",
                    ));
                }
            };
            return self
                .listen_transfer_main(&path)
                .map_err(|e| QmpError::generic(e.to_string()));
        }
        if self.config.incoming != Some(IncomingSpec::Defer) {
            return Err(QmpError::generic(
                "'-incoming' was not specified on the command line",
            ));
        }
        if self.run_state() != RunState::Inmigrate || self.machine.is_some() {
            return Err(QmpError::generic(
                "The incoming migration has already been started",
            ));
        }
        let path = match args.address()? {
            MigrationAddress::File(f) if f.offset == 0 => PathBuf::from(f.filename),
            _ => {
                return Err(QmpError::generic(
                    "migrate-incoming supports only file:PATH sources",
                ));
            }
        };
        self.emit(&EventKind::Migration {
            status: MigrationStatus::Active,
        });
        let result = self.incoming_from_file(&path);
        let status = if result.is_ok() {
            MigrationStatus::Completed
        } else {
            MigrationStatus::Failed
        };
        self.emit(&EventKind::Migration { status });
        result.map_err(|e| {
            log::error!("incoming migration failed: {e}");
            QmpError::generic(e.to_string())
        })
    }
}

impl RamProgress {
    /// `query-migrate`'s `ram` member.
    pub(crate) fn stats(&self, elapsed_ms: u64) -> MigrationStats {
        use std::sync::atomic::Ordering::Relaxed;
        let transferred = self.transferred.load(Relaxed);
        let mbps = if elapsed_ms > 0 {
            transferred as f64 * 8.0 / 1e6 / (elapsed_ms as f64 / 1000.0)
        } else {
            0.0
        };
        MigrationStats {
            transferred: transferred as i64,
            remaining: self.remaining.load(Relaxed) as i64,
            total: self.total.load(Relaxed) as i64,
            duplicate: self.duplicate_pages.load(Relaxed) as i64,
            normal: self.normal_pages.load(Relaxed) as i64,
            normal_bytes: (self.normal_pages.load(Relaxed) * 4096) as i64,
            dirty_pages_rate: 0,
            mbps,
            dirty_sync_count: 1,
            postcopy_requests: 0,
            page_size: 4096,
            multifd_bytes: 0,
            pages_per_second: 0,
            precopy_bytes: transferred,
            downtime_bytes: 0,
            postcopy_bytes: 0,
            dirty_sync_missed_zero_copy: 0,
        }
    }
}
