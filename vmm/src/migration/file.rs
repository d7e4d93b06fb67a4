//! Migration to a file (QEMU's "normal" mode): the whole machine, RAM included, to a file;
//! restored in a new process by `-incoming file:PATH` or `migrate-incoming`.
//!
//! The guest is stopped for the whole save (this is the simple, non-live variant, and the
//! O(RAM) baseline the live-update benchmarks compare against). The save runs on its own thread
//! so `query-migrate` can report progress; the VMM thread is woken when it ends.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::format::write_state_file;
use super::state::MachineState;
use crate::control::{IncomingError, Vmm};
use crate::machine::{MachineError, Source};
use crate::memory::RamView;
use crate::memory::{self, MemoryError};
use crate::migration::MigrationError;
use crate::migration::format::{RamContents, RamProgress, SavedRun, StateFile, StateFileError};
use crate::migration::{MigrationRecord, MigrationStatus};
use crate::qmp::protocol::{EventKind, QmpError, RunState};

/// Starts writing `state` and all of RAM to `path`. `done` is written when the thread ends;
/// join the handle for the outcome (the file size).
pub fn start_outgoing(
    path: PathBuf,
    state: MachineState,
    run: SavedRun,
    ram: RamView,
    progress: Arc<RamProgress>,
    done: Arc<EventFd>,
) -> std::io::Result<JoinHandle<Result<u64, StateFileError>>> {
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let result = write_state_file(&path, &state, &run, RamContents::Pages(&ram, &progress));
            let _ = done.write(1);
            result
        })
}

#[derive(Debug, thiserror::Error)]
pub enum IncomingRamError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    File(#[from] StateFileError),
    #[error(transparent)]
    Reboot(#[from] super::cpr_reboot::CprRebootError),
}

/// A `migrate` to a file in flight.
pub(crate) struct OutgoingSave {
    thread: JoinHandle<Result<u64, StateFileError>>,
    guest_was_running: bool,
}

impl Vmm {
    /// Restores a machine saved with `migrate` in normal mode. Everything is validated, and RAM
    /// loaded and checksummed, before KVM is touched; on error nothing ran.
    pub(crate) fn incoming_from_file(&mut self, path: &Path) -> Result<(), IncomingError> {
        let started = Instant::now();
        let file = StateFile::open(path)?;
        file.check_machine(&self.described_machine())?;
        let ram = match file.ram_file()? {
            // cpr-reboot: RAM was never copied; the saved RAM file is mapped in place.
            Some(saved) if !file.has_ram() => {
                self.reboot_ram(&saved).map_err(IncomingRamError::from)?
            }
            // Fresh RAM as the command line says (memfds or the RAM file), filled from the file
            // (checksum verified).
            _ => {
                let ram = self.fresh_ram().map_err(IncomingRamError::from)?;
                file.load_ram(&ram.view())?;
                ram
            }
        };
        let (machine, rx) = self.build_machine(
            ram,
            // A new process on the same host: devices open their backends from the command line.
            Source::Restore {
                state: &file.state,
                host_fds: Default::default(),
            },
            None,
        )?;
        self.install_machine(machine, rx)
            .map_err(|e| IncomingError::Machine(MachineError::EventFd(e)))?;
        self.migration = MigrationRecord {
            status: MigrationStatus::Completed,
            started: Some(started),
            total_time_ms: Some(started.elapsed().as_millis() as u64),
            ..MigrationRecord::default()
        };
        if file.run.guest_was_running && self.autostart {
            self.set_running();
        } else {
            let _ = self.set_run_state(RunState::Paused);
        }
        log::info!(
            "restored from {} (saved by vmm {}) in {} ms",
            path.display(),
            file.run.saved_by_version,
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// Normal mode: stop, capture the machine, and write state and RAM on a thread.
    pub(crate) fn start_outgoing_save(&mut self, path: PathBuf) -> Result<(), QmpError> {
        let guest_was_running = self.run_state() == RunState::Running;
        let progress = Arc::new(RamProgress::default());
        if let Some(m) = &self.machine {
            // Known from the start, so query-migrate never shows an empty save as done.
            progress.set_total(m.ram().total_size());
        }
        self.migration = MigrationRecord {
            status: MigrationStatus::Setup,
            started: Some(Instant::now()),
            ram: Some(progress.clone()),
            ..MigrationRecord::default()
        };
        self.emit(&EventKind::Migration {
            status: MigrationStatus::Setup,
        });
        let captured = self.capture_for_save(guest_was_running);
        let (state, ram) = match captured {
            Ok(c) => c,
            Err(e) => {
                let reason = e.to_string();
                self.fail_migration(&reason, guest_was_running);
                return Err(QmpError::generic(reason));
            }
        };
        self.migration.setup_time_ms = self.migration.elapsed_ms();
        let run = SavedRun {
            guest_was_running,
            saved_by_version: crate::version_string(),
            saved_at_unix_ns: cpr_common::timing::realtime_ns(),
        };
        match start_outgoing(path, state, run, ram, progress, self.migration_done.clone()) {
            Ok(thread) => {
                self.outgoing = Some(OutgoingSave {
                    thread,
                    guest_was_running,
                });
                self.migration.status = MigrationStatus::Active;
                self.emit(&EventKind::Migration {
                    status: MigrationStatus::Active,
                });
                Ok(())
            }
            Err(e) => {
                let msg = format!("starting the migration thread: {e}");
                self.fail_migration(&msg, guest_was_running);
                Err(QmpError::generic(msg))
            }
        }
    }

    /// Stops the guest (if running) and saves the machine's state (not RAM).
    pub(crate) fn capture_for_save(
        &mut self,
        guest_was_running: bool,
    ) -> Result<(crate::migration::state::MachineState, memory::RamView), MigrationError> {
        let Some(m) = &mut self.machine else {
            return Err(MigrationError::NoMachine);
        };
        let state = m.pause_and_save()?;
        let ram = m.ram().view();
        if guest_was_running {
            self.emit(&EventKind::Stop);
        }
        let _ = self.set_run_state(RunState::FinishMigrate);
        Ok((state, ram))
    }

    pub(crate) fn finish_outgoing_save(&mut self) {
        let Some(out) = self.outgoing.take() else {
            return;
        };
        let result = out.thread.join().unwrap_or_else(|_| {
            Err(StateFileError::Ram {
                path: String::new(),
                source: super::format::RamRecordError::WriterPanicked,
            })
        });
        match result {
            Ok(size) => {
                let ms = self.complete_stopped_save();
                log::info!("migration to file completed: {size} bytes in {ms} ms");
                self.emit(&EventKind::Migration {
                    status: MigrationStatus::Completed,
                });
            }
            Err(_) if self.migration.status == MigrationStatus::Cancelling => {
                log::info!("migration to file cancelled; the partial file is removed");
                self.end_migration(MigrationStatus::Cancelled, None, out.guest_was_running);
            }
            Err(e) => {
                log::error!("migration failed: {e}");
                self.fail_migration(&e.to_string(), out.guest_was_running);
            }
        }
    }

    /// A save that kept the guest stopped throughout has completed: the record says so and the
    /// VM is in `postmigrate`. Returns the save's duration in ms (the caller emits the event).
    pub(crate) fn complete_stopped_save(&mut self) -> u64 {
        let ms = self.migration.elapsed_ms();
        self.migration.total_time_ms = Some(ms);
        self.migration.downtime_ms = Some(ms);
        self.migration.status = MigrationStatus::Completed;
        let _ = self.set_run_state(RunState::Postmigrate);
        ms
    }

    /// `migrate_cancel`: a save to a file in flight stops at its next chunk (`cancelling`,
    /// then `cancelled` when the writer has stopped and the guest runs again). A live update
    /// has no window to cancel in: its exec follows the reply to `migrate` at once.
    pub(crate) fn cancel_migration(&mut self) {
        if let Some(progress) = &self.migration.ram
            && self.outgoing.is_some()
            && self.migration.status != MigrationStatus::Cancelling
        {
            progress.cancel();
            self.migration.status = MigrationStatus::Cancelling;
            self.emit(&EventKind::Migration {
                status: MigrationStatus::Cancelling,
            });
        }
    }
}
