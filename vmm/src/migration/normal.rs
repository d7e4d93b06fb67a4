//! "normal" mode: the whole machine, RAM included, to a file; restored in a new process.
//!
//! The guest is stopped for the whole save (this is the simple, non-live variant, and the
//! O(RAM) baseline the live-update benchmarks compare against). The save runs on its own thread
//! so `query-migrate` can report progress; the VMM thread is woken when it ends.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::format::{
    RamContents, RamProgress, SavedRun, StateFile, StateFileError, write_state_file,
};
use super::state::MachineState;
use crate::memory::{GuestRam, MemoryError, RamView};

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
}

/// Creates fresh RAM for the saved machine and fills it from the file (checksum verified).
pub fn load_ram(
    file: &StateFile,
    hugepages: bool,
    prealloc: bool,
) -> Result<GuestRam, IncomingRamError> {
    let ram = GuestRam::create(file.state.description.ram_size, hugepages, prealloc)?;
    file.load_ram(&ram.view())?;
    Ok(ram)
}
