//! cpr-reboot (QEMU's mode for a host kernel update): guest RAM stays in a file that outlives
//! the process (persistent memory, DAX, or any file the operator keeps), the device state goes
//! to a state file, and the VMM started afterwards maps the same RAM file in place.
//!
//! `migrate-set-parameters {"mode":"cpr-reboot"}` + `migrate file:PATH`: stop, write the RAM
//! file's dirty pages to its storage (fsync), write the state without RAM pages but with a
//! `ram-file` section naming the RAM file by path, device, inode, size and change time, and stay in
//! `postmigrate` until `quit`. `vmm <same options> -incoming file:PATH` then checks the machine,
//! checks that the RAM file is still that very file of that size, opens it without creating or
//! resizing it, and resumes. Any mismatch is one error and the RAM file is left as it is.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::control::Vmm;
use crate::memory::{FileRamOptions, GuestRam, MemoryError, RamFileIdentity};
use crate::migration::format::{RamContents, SavedRun, write_state_file};
use crate::migration::{MigMode, MigrationRecord, MigrationStatus};
use crate::qmp::protocol::{EventKind, QmpError, RunState};

#[derive(Debug, thiserror::Error)]
pub enum CprRebootError {
    #[error(
        "cpr-reboot needs guest RAM in a file that outlives this process: start the VMM with -object memory-backend-file,id=pc.ram,size=S,mem-path=PATH,share=on -machine memory-backend=pc.ram (memfd RAM, from -m or memory-backend-memfd, ends with the process)"
    )]
    NotFileBacked,
    #[error("cpr-reboot: reading the RAM file's identity ({path}): {source}")]
    Identity {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cpr-reboot: writing guest RAM to its file {path} (fsync): {source}")]
    Sync {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the state file was saved by cpr-reboot with guest RAM in {saved}; start this VMM with the same -object memory-backend-file,...,mem-path={saved},share=on and -machine memory-backend=ID"
    )]
    NoRamFileOnCommandLine { saved: String },
    #[error(
        "the state file's guest RAM is in {saved} but the command line's memory-backend-file has mem-path={ours}: give the same file"
    )]
    OtherPath { saved: String, ours: String },
    #[error(
        "guest RAM file {path} is gone ({source}): the saved guest's memory was in it, so the state file cannot be restored"
    )]
    Removed {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "guest RAM file {path} was replaced since the save (saved: device {saved_dev:#x} inode {saved_ino}; now: device {dev:#x} inode {ino}): it does not hold the saved guest's memory; nothing was changed"
    )]
    Replaced {
        path: String,
        saved_dev: u64,
        saved_ino: u64,
        dev: u64,
        ino: u64,
    },
    #[error(
        "guest RAM file {path} was resized or truncated since the save ({saved} bytes then, {now} now): the saved guest's memory is not intact; nothing was changed"
    )]
    Resized { path: String, saved: u64, now: u64 },
    #[error(
        "guest RAM file {path} was replaced or written since the save (same inode number, but its change time moved on): it may not hold the saved guest's memory; nothing was changed"
    )]
    Changed { path: String },
    #[error(
        "the state file's guest RAM file {path} is {size} bytes but the machine has {ram_size} bytes of RAM"
    )]
    SizeNotRam {
        path: String,
        size: u64,
        ram_size: u64,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// QEMU's text for a RAM block that cannot be preserved (migration blocker for every CPR mode).
pub fn not_shared_message(backend_id: &str) -> String {
    format!(
        "Memory region {backend_id} is not compatible with CPR. share=on is required for memory-backend objects, and aux-ram-share=on is required."
    )
}

/// The canonical form of `path` when it exists (the state file names the RAM file by it).
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

impl Vmm {
    /// Fresh RAM as the command line describes it: memfds (`-m`, `memory-backend-memfd`) or
    /// the `memory-backend-file`'s file.
    pub(crate) fn fresh_ram(&self) -> Result<GuestRam, MemoryError> {
        match &self.config.ram_file {
            Some(path) => GuestRam::open_file(
                path,
                self.config.ram_size,
                FileRamOptions {
                    share: self.config.ram_share,
                    prealloc: self.config.prealloc,
                },
            ),
            None => GuestRam::create(
                self.config.ram_size,
                self.config.hugepages,
                self.config.prealloc,
            ),
        }
    }

    /// Every CPR mode needs RAM mapped shared (QEMU refuses share=off the same way).
    pub(crate) fn check_cpr_ram(&self, mode: MigMode) -> Result<(), QmpError> {
        if mode != MigMode::Normal && !self.config.ram_share {
            return Err(QmpError::generic(not_shared_message(
                &self.config.ram_backend_id,
            )));
        }
        if mode == MigMode::CprReboot && self.config.ram_file.is_none() {
            return Err(QmpError::generic(CprRebootError::NotFileBacked.to_string()));
        }
        Ok(())
    }

    /// `migrate file:PATH` in cpr-reboot mode; synchronous (the state is small).
    pub(crate) fn migrate_cpr_reboot(&mut self, path: PathBuf) -> Result<(), QmpError> {
        self.check_cpr_ram(MigMode::CprReboot)?;
        let guest_was_running = self.run_state() == RunState::Running;
        let started = Instant::now();
        self.migration = MigrationRecord {
            status: MigrationStatus::Setup,
            started: Some(started),
            ..MigrationRecord::default()
        };
        self.emit(&EventKind::Migration {
            status: MigrationStatus::Setup,
        });
        match self.save_for_reboot(&path, guest_was_running) {
            Ok(size) => {
                let ms = self.complete_stopped_save();
                log::info!(
                    "cpr-reboot: state saved to {} ({size} bytes, no RAM) in {ms} ms; quit, then start with -incoming file:{}",
                    path.display(),
                    path.display()
                );
                self.emit(&EventKind::Migration {
                    status: MigrationStatus::Completed,
                });
                Ok(())
            }
            Err(reason) => {
                self.fail_migration(&reason, guest_was_running);
                Err(QmpError::generic(reason))
            }
        }
    }

    fn save_for_reboot(&mut self, path: &Path, guest_was_running: bool) -> Result<u64, String> {
        let (state, _) = self
            .capture_for_save(guest_was_running)
            .map_err(|e| e.to_string())?;
        self.migration.setup_time_ms = self.migration.elapsed_ms();
        let Some(machine) = &self.machine else {
            return Err("there is no machine to migrate".into());
        };
        let ram = machine.ram();
        let ram_path = self
            .config
            .ram_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut identity = ram
            .file_identity()
            .ok_or(CprRebootError::NotFileBacked)
            .and_then(|r| {
                r.map_err(|source| CprRebootError::Identity {
                    path: ram_path.clone(),
                    source,
                })
            })
            .map_err(|e| e.to_string())?;
        identity.path = canonical(Path::new(&identity.path)).display().to_string();
        ram.sync_file()
            .map_err(|source| CprRebootError::Sync {
                path: ram_path,
                source,
            })
            .map_err(|e| e.to_string())?;
        let run = SavedRun {
            guest_was_running,
            saved_by_version: crate::version_string(),
            saved_at_unix_ns: cpr_common::timing::realtime_ns(),
        };
        write_state_file(path, &state, &run, RamContents::InFile(&identity))
            .map_err(|e| e.to_string())
    }

    /// The saved guest's RAM: the command line's RAM file, if it is still the saved one.
    /// Opened read-write without creating or resizing it; nothing is written before the
    /// checks pass.
    pub(crate) fn reboot_ram(&self, saved: &RamFileIdentity) -> Result<GuestRam, CprRebootError> {
        use std::os::unix::fs::OpenOptionsExt;
        let ours = self.config.ram_file.as_ref().ok_or_else(|| {
            CprRebootError::NoRamFileOnCommandLine {
                saved: saved.path.clone(),
            }
        })?;
        let path = saved.path.clone();
        if canonical(ours) != Path::new(&saved.path) {
            // A removed file has no canonical form: say that rather than "another path".
            if !ours.exists() {
                return Err(CprRebootError::Removed {
                    path,
                    source: std::io::ErrorKind::NotFound.into(),
                });
            }
            return Err(CprRebootError::OtherPath {
                saved: saved.path.clone(),
                ours: ours.display().to_string(),
            });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(ours)
            .map_err(|source| CprRebootError::Removed {
                path: path.clone(),
                source,
            })?;
        let now = RamFileIdentity::of(ours, &file).map_err(|source| CprRebootError::Identity {
            path: path.clone(),
            source,
        })?;
        if (now.device, now.inode) != (saved.device, saved.inode) {
            return Err(CprRebootError::Replaced {
                path,
                saved_dev: saved.device,
                saved_ino: saved.inode,
                dev: now.device,
                ino: now.inode,
            });
        }
        if now.size != saved.size {
            return Err(CprRebootError::Resized {
                path,
                saved: saved.size,
                now: now.size,
            });
        }
        if now.changed_ns != saved.changed_ns {
            return Err(CprRebootError::Changed { path });
        }
        if saved.size != self.config.ram_size {
            return Err(CprRebootError::SizeNotRam {
                path,
                size: saved.size,
                ram_size: self.config.ram_size,
            });
        }
        // prealloc=on gives the guest's RAM storage up front. The saved guest's file normally
        // has it all already (the saving VMM preallocated it): then faulting every page in
        // here would only build page tables, or read the file from disk, while the guest
        // waits (about 1 s per GiB on the reference machine); they fault in as the guest runs.
        let allocated =
            GuestRam::file_is_allocated(&file).map_err(|source| CprRebootError::Identity {
                path: path.clone(),
                source,
            })?;
        Ok(GuestRam::map_file(
            ours,
            file,
            saved.size,
            FileRamOptions {
                share: true,
                prealloc: self.config.prealloc && !allocated,
            },
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_shared_message_has_qemus_shape() {
        let m = not_shared_message("pc.ram");
        assert!(m.starts_with("Memory region pc.ram is not compatible with CPR."));
        assert!(m.contains("share=on is required for memory-backend objects"));
    }
}
