//! Migration: one state walk ([`state`]), one file format ([`format`]), and one module per mode
//! deciding only what happens to RAM and where the bytes go:
//!
//! - [`normal`]: stop, write state and every non-zero RAM page to a file; restore in a new
//!   process (the O(RAM) baseline);
//! - [`cpr_exec`]: stop, write state without RAM, keep RAM memfds open across an exec of the
//!   new VMM in the same process;
//! - [`cpr_transfer`]: pass RAM memfds to a separately started VMM over a UNIX socket, then
//!   stream the state.

pub mod cpr_exec;
pub mod cpr_transfer;
pub mod format;
pub mod normal;
pub mod state;

use std::sync::Arc;
use std::time::Instant;

use format::RamProgress;

pub use crate::qmp::protocol::{MigMode, MigrationStatus};

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
