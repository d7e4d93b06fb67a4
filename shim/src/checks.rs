//! Checks of what the old VMM handed over: every fd, and guest RAM's usability.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use cpr_common::container::{ContainerError, peek_version};
use cpr_common::cpr::{CPR_STATE_FORMAT, CprState, FdKind};
use cpr_common::fds::{self, FdError};
use nix::errno::Errno;
use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap, munmap};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// An inherited fd is not what the CPR state says (closed, swapped, resized...).
    #[error(transparent)]
    Fd(#[from] FdError),
    #[error("guest RAM memfd {fd} ({name}) is not usable: {op} failed: {errno}")]
    RamUnusable {
        fd: RawFd,
        name: String,
        op: &'static str,
        errno: Errno,
    },
    #[error("guest RAM memfd {fd} ({name}) is {size} bytes, more than this process can map")]
    RamTooLarge { fd: RawFd, name: String, size: u64 },
    #[error("the CPR state channel: duplicating its fd: {0}")]
    ChannelDup(#[source] std::io::Error),
    #[error("the CPR state channel's format version: {0}")]
    ChannelVersion(#[source] ContainerError),
}

/// Every listed fd must be the very file recorded (same code as the new VMM's and the
/// cpr-transfer receiver's check); RAM memfds must map and be touchable.
pub fn check_fds(state: &CprState, prefault: bool) -> Result<(), CheckError> {
    for rec in &state.fds {
        fds::check_preserved(rec)?;
        if rec.kind == FdKind::GuestRam {
            // `check_preserved` just found it open, and nothing in the shim closes it.
            // SAFETY: the fd stays open for the borrow, which ends with this iteration.
            let fd = unsafe { BorrowedFd::borrow_raw(rec.fd) };
            let size = usize::try_from(rec.size).map_err(|_| CheckError::RamTooLarge {
                fd: rec.fd,
                name: rec.name.clone(),
                size: rec.size,
            })?;
            touch_ram(fd, size, prefault).map_err(|(op, errno)| CheckError::RamUnusable {
                fd: rec.fd,
                name: rec.name.clone(),
                op,
                errno,
            })?;
        }
    }
    Ok(())
}

/// Maps `len` bytes of the memfd shared and reads its first and last page (or, with
/// `prefault`, faults in every page). On failure, says which call failed.
fn touch_ram(fd: BorrowedFd<'_>, len: usize, prefault: bool) -> Result<(), (&'static str, Errno)> {
    let Some(nonzero_len) = NonZeroUsize::new(len) else {
        return Ok(());
    };
    // The fd was checked to be a memfd of exactly `len` bytes.
    // SAFETY: a fresh shared mapping of it, unmapped below and never handed out.
    let addr = unsafe {
        mmap(
            None,
            nonzero_len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd,
            0,
        )
    }
    .map_err(|e| ("mmap", e))?;
    let result = if prefault {
        // SAFETY: the range is the mapping created above; populating does not change contents.
        unsafe { madvise(addr, len, MmapAdvise::MADV_POPULATE_WRITE) }
            .map_err(|e| ("madvise(MADV_POPULATE_WRITE)", e))
    } else {
        let base = addr.cast::<u8>().as_ptr();
        // Volatile reads keep the compiler from eliding the touch.
        // SAFETY: both offsets are inside the mapping (len > 0).
        unsafe {
            std::ptr::read_volatile(base);
            std::ptr::read_volatile(base.add(len - 1));
        }
        Ok(())
    };
    // SAFETY: unmapping exactly the mapping created above, which nothing refers to any more.
    let _ = unsafe { munmap(addr, len) };
    result
}

/// The format version the old VMM wrote the CPR state in (from the channel's header).
pub fn channel_version(channel: &OwnedFd) -> Result<u32, CheckError> {
    let file = File::from(channel.try_clone().map_err(CheckError::ChannelDup)?);
    peek_version(&file, &CPR_STATE_FORMAT).map_err(CheckError::ChannelVersion)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use std::os::fd::AsFd;

    #[test]
    fn touching_a_memfd_works_and_a_pipe_fails() {
        let fd = memfd_create("t", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, 1 << 20).unwrap();
        touch_ram(fd.as_fd(), 1 << 20, false).unwrap();
        touch_ram(fd.as_fd(), 1 << 20, true).unwrap();
        let (r, _w) = std::io::pipe().unwrap();
        assert!(touch_ram(r.as_fd(), 4096, false).is_err());
    }

    #[test]
    fn the_channel_version_is_read_from_its_header() {
        let fd = memfd_create("cpr-state", MFdFlags::MFD_CLOEXEC).unwrap();
        assert!(matches!(
            channel_version(&fd),
            Err(CheckError::ChannelVersion(_))
        ));
    }
}
