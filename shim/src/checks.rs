//! Checks of what the old VMM handed over: every fd, and guest RAM's usability.

use std::os::fd::RawFd;

use cpr_common::container::peek_version;
use cpr_common::cpr::{CPR_STATE_FORMAT, CprState, FdKind};
use cpr_common::fds;

/// Every listed fd must be the very file recorded (same code as the new VMM's and the
/// cpr-transfer receiver's check); RAM memfds must map and be touchable.
pub fn check_fds(state: &CprState, prefault: bool) -> Result<(), String> {
    for rec in &state.fds {
        fds::check_preserved(rec).map_err(|e| e.to_string())?;
        if rec.kind == FdKind::GuestRam {
            touch_ram(rec.fd, rec.size, prefault).map_err(|e| {
                format!(
                    "guest RAM memfd {} ({}) is not usable: {e}",
                    rec.fd, rec.name
                )
            })?;
        }
    }
    Ok(())
}

/// Maps `size` bytes of the memfd shared and reads its first and last page (or, with
/// `prefault`, faults in every page).
fn touch_ram(fd: RawFd, size: u64, prefault: bool) -> std::io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    let len = usize::try_from(size).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // The fd was checked to be a memfd of exactly `size` bytes.
    // SAFETY: a fresh shared mapping of it, unmapped below and never handed out.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let result = if prefault {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: the range is the mapping created above; populating does not change contents.
        if unsafe { libc::madvise(addr, len, MADV_POPULATE_WRITE) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    } else {
        let base = addr.cast::<u8>();
        // Volatile reads keep the compiler from eliding the touch.
        // SAFETY: both offsets are inside the mapping (len > 0).
        unsafe {
            std::ptr::read_volatile(base);
            std::ptr::read_volatile(base.add(len - 1));
        }
        Ok(())
    };
    // SAFETY: unmapping exactly the mapping created above.
    unsafe { libc::munmap(addr, len) };
    result
}

/// The format version the old VMM wrote the CPR state in (from the channel's header).
pub fn channel_version(fd: RawFd) -> Result<u32, String> {
    // SAFETY: the File is wrapped in ManuallyDrop, so the borrowed fd is never closed here.
    let file = std::mem::ManuallyDrop::new(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    peek_version(&*file, &CPR_STATE_FORMAT).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    #[test]
    fn touching_a_memfd_works_and_a_pipe_fails() {
        // SAFETY: memfd_create with a valid name; the fd is owned below.
        let raw = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: fresh fd, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: resizing our own memfd.
        unsafe { libc::ftruncate(fd.as_raw_fd(), 1 << 20) };
        touch_ram(fd.as_raw_fd(), 1 << 20, false).unwrap();
        touch_ram(fd.as_raw_fd(), 1 << 20, true).unwrap();
        let (r, _w) = std::io::pipe().unwrap();
        assert!(touch_ram(r.as_raw_fd(), 4096, false).is_err());
    }
}
