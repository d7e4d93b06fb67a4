//! fd hygiene and the checks that an inherited fd is what the CPR state says it is.
//!
//! Preserved fds are close-on-exec at all times except across the update's own `exec`, so they
//! never leak into unrelated children. When an fd does cross an exec, its receiver checks it
//! against its record (name, type, size, seals, device and inode) before trusting it: a closed,
//! reused or swapped fd number is detected here, by the same code in the shim, the new VMM and
//! the cpr-transfer receiver.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use crate::cpr::{FdKind, PreservedFd};

/// Seals every guest-RAM memfd carries: its size can be trusted.
pub const RAM_SEALS: u32 = (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) as u32;

#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error("fd {fd} ({name}) is not open")]
    Closed { fd: RawFd, name: String },
    #[error("fd {fd} ({name}): {op} failed: {errno}")]
    Sys {
        fd: RawFd,
        name: String,
        op: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("fd {fd} ({name}) is not a memfd (it is {found})")]
    NotMemfd {
        fd: RawFd,
        name: String,
        found: String,
    },
    #[error(
        "fd {fd} should be {expected_kind} '{name}' but is '{found}': the fd number was reused for something else"
    )]
    WrongName {
        fd: RawFd,
        name: String,
        expected_kind: &'static str,
        found: String,
    },
    #[error(
        "fd {fd} ({name}) is another file than the one recorded (device:inode {found_dev}:{found_ino}, expected {dev}:{ino}): the fd was swapped"
    )]
    WrongIdentity {
        fd: RawFd,
        name: String,
        dev: u64,
        ino: u64,
        found_dev: u64,
        found_ino: u64,
    },
    #[error(
        "fd {fd} ({name}) is {found} bytes, expected {expected}: the memory was resized or replaced"
    )]
    WrongSize {
        fd: RawFd,
        name: String,
        expected: u64,
        found: u64,
    },
    #[error("fd {fd} ({name}) has seals {found:#x}, expected {expected:#x}")]
    WrongSeals {
        fd: RawFd,
        name: String,
        expected: u32,
        found: u32,
    },
    #[error("fd {fd} ({name}) has the wrong file type: expected {expected}, found {found}")]
    WrongType {
        fd: RawFd,
        name: String,
        expected: &'static str,
        found: &'static str,
    },
}

/// What `fstat` says about an fd: enough to recognise it again after an exec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub file_type: u32,
}

fn sys_err(fd: RawFd, name: &str, op: &'static str, errno: nix::errno::Errno) -> FdError {
    if errno == nix::errno::Errno::EBADF {
        FdError::Closed {
            fd,
            name: name.to_string(),
        }
    } else {
        FdError::Sys {
            fd,
            name: name.to_string(),
            op,
            errno,
        }
    }
}

/// Sets or clears FD_CLOEXEC on `fd`.
pub fn set_cloexec(fd: RawFd, cloexec: bool) -> Result<(), FdError> {
    let name = "fd";
    // SAFETY: F_GETFD/F_SETFD only read and write the fd's flags; an invalid fd yields EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(sys_err(fd, name, "F_GETFD", nix::errno::Errno::last()));
    }
    let new = if cloexec {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    if new != flags {
        // SAFETY: as above, F_SETFD only changes the fd's flags.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, new) } < 0 {
            return Err(sys_err(fd, name, "F_SETFD", nix::errno::Errno::last()));
        }
    }
    Ok(())
}

/// Whether `fd` is open and close-on-exec.
pub fn is_cloexec(fd: RawFd) -> Result<bool, FdError> {
    // SAFETY: F_GETFD only reads the fd's flags; an invalid fd yields EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(sys_err(fd, "fd", "F_GETFD", nix::errno::Errno::last()));
    }
    Ok(flags & libc::FD_CLOEXEC != 0)
}

pub fn identity(fd: RawFd, name: &str) -> Result<FdIdentity, FdError> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a full `struct stat` into the buffer on success; we only read it then.
    let rc = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    if rc < 0 {
        return Err(sys_err(fd, name, "fstat", nix::errno::Errno::last()));
    }
    // SAFETY: fstat returned 0, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    Ok(FdIdentity {
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size as u64,
        file_type: st.st_mode & libc::S_IFMT,
    })
}

/// The seals of a memfd (F_GET_SEALS).
pub fn seals(fd: RawFd, name: &str) -> Result<u32, FdError> {
    // SAFETY: F_GET_SEALS only reads the file's seals; it fails with EINVAL on non-shmem files.
    let rc = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if rc < 0 {
        return Err(sys_err(fd, name, "F_GET_SEALS", nix::errno::Errno::last()));
    }
    Ok(rc as u32)
}

/// Where `/proc/self/fd/N` points: `/memfd:NAME (deleted)` for a memfd.
pub fn link_target(fd: RawFd, name: &str) -> Result<String, FdError> {
    let path = format!("/proc/self/fd/{fd}");
    match std::fs::read_link(&path) {
        Ok(target) => Ok(target.to_string_lossy().into_owned()),
        Err(e) => Err(sys_err(
            fd,
            name,
            "readlink",
            nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        )),
    }
}

/// The name a memfd was created with, or None if the fd is not a memfd.
pub fn memfd_name(link: &str) -> Option<&str> {
    let rest = link.strip_prefix("/memfd:")?;
    Some(rest.strip_suffix(" (deleted)").unwrap_or(rest))
}

/// Records what `fd` is now, so that a receiver can check it later.
pub fn describe(fd: BorrowedFd<'_>, name: &str, kind: FdKind) -> Result<PreservedFd, FdError> {
    let raw = fd.as_raw_fd();
    let id = identity(raw, name)?;
    let seals = if kind == FdKind::GuestRam {
        seals(raw, name)?
    } else {
        0
    };
    Ok(PreservedFd {
        name: name.to_string(),
        kind,
        fd: raw,
        size: id.size,
        seals,
        dev: id.dev,
        ino: id.ino,
    })
}

fn type_name(file_type: u32) -> &'static str {
    match file_type {
        libc::S_IFREG => "regular file",
        libc::S_IFSOCK => "socket",
        libc::S_IFIFO => "pipe",
        libc::S_IFCHR => "character device",
        libc::S_IFDIR => "directory",
        libc::S_IFBLK => "block device",
        libc::S_IFLNK => "symlink",
        _ => "unknown",
    }
}

/// Checks that the fd number in `expected` still refers to the very file that was recorded.
///
/// For guest RAM that means: open, a memfd with the recorded name, the recorded size and seals,
/// and the same device and inode. Other kinds are checked by type and identity.
pub fn check_preserved(expected: &PreservedFd) -> Result<FdIdentity, FdError> {
    let fd = expected.fd;
    let name = expected.name.as_str();
    let found = identity(fd, name)?;
    let expected_type = expected.kind.file_type();
    if let Some(want) = expected_type
        && found.file_type != want
    {
        return Err(FdError::WrongType {
            fd,
            name: name.to_string(),
            expected: type_name(want),
            found: type_name(found.file_type),
        });
    }
    if expected.kind == FdKind::GuestRam {
        let link = link_target(fd, name)?;
        match memfd_name(&link) {
            None => {
                return Err(FdError::NotMemfd {
                    fd,
                    name: name.to_string(),
                    found: link,
                });
            }
            Some(found_name) if found_name != name => {
                return Err(FdError::WrongName {
                    fd,
                    name: name.to_string(),
                    expected_kind: "guest RAM memfd",
                    found: found_name.to_string(),
                });
            }
            Some(_) => {}
        }
    }
    if (found.dev, found.ino) != (expected.dev, expected.ino) {
        return Err(FdError::WrongIdentity {
            fd,
            name: name.to_string(),
            dev: expected.dev,
            ino: expected.ino,
            found_dev: found.dev,
            found_ino: found.ino,
        });
    }
    if expected.kind == FdKind::GuestRam {
        if found.size != expected.size {
            return Err(FdError::WrongSize {
                fd,
                name: name.to_string(),
                expected: expected.size,
                found: found.size,
            });
        }
        let found_seals = seals(fd, name)?;
        if found_seals != expected.seals || found_seals & RAM_SEALS != RAM_SEALS {
            return Err(FdError::WrongSeals {
                fd,
                name: name.to_string(),
                expected: expected.seals,
                found: found_seals,
            });
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn memfd(name: &str, size: u64, seal: bool) -> OwnedFd {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: memfd_create with a valid C string; the returned fd is owned by us.
        let fd = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
        if seal {
            // SAFETY: adding seals to our own memfd.
            let rc = unsafe {
                libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
                )
            };
            assert_eq!(rc, 0);
        }
        fd
    }

    #[test]
    fn a_recorded_memfd_checks_out() {
        let fd = memfd("ram-test", 1 << 20, true);
        let rec = describe(fd.as_fd(), "ram-test", FdKind::GuestRam).unwrap();
        assert_eq!(rec.size, 1 << 20);
        check_preserved(&rec).unwrap();
    }

    #[test]
    fn swapped_resized_unsealed_and_closed_fds_are_caught() {
        let fd = memfd("ram-test", 1 << 20, true);
        let rec = describe(fd.as_fd(), "ram-test", FdKind::GuestRam).unwrap();

        let other = memfd("ram-test", 1 << 20, true);
        let mut swapped = rec.clone();
        swapped.fd = other.as_raw_fd();
        assert!(matches!(
            check_preserved(&swapped),
            Err(FdError::WrongIdentity { .. })
        ));

        let mut bigger = rec.clone();
        bigger.size = 2 << 20;
        assert!(matches!(
            check_preserved(&bigger),
            Err(FdError::WrongSize { .. })
        ));

        let unsealed = memfd("ram-test", 1 << 20, false);
        let mut rec2 = describe(unsealed.as_fd(), "ram-test", FdKind::GuestRam).unwrap();
        rec2.seals = RAM_SEALS;
        assert!(matches!(
            check_preserved(&rec2),
            Err(FdError::WrongSeals { .. })
        ));

        let named = memfd("something-else", 1 << 20, true);
        let mut wrong_name = rec.clone();
        wrong_name.fd = named.as_raw_fd();
        assert!(matches!(
            check_preserved(&wrong_name),
            Err(FdError::WrongName { .. })
        ));

        let raw = fd.as_raw_fd();
        drop(fd);
        let mut closed = rec;
        closed.fd = raw;
        // The number may have been reused by another test thread; either way it must not pass.
        assert!(check_preserved(&closed).is_err());
    }

    #[test]
    fn a_regular_file_is_not_a_memfd() {
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let mut rec = describe(f.as_fd(), "ram-test", FdKind::FallbackExe).unwrap();
        rec.kind = FdKind::GuestRam;
        let err = check_preserved(&rec).unwrap_err();
        assert!(
            matches!(err, FdError::NotMemfd { .. } | FdError::Sys { .. }),
            "{err}"
        );
    }

    #[test]
    fn cloexec_round_trip() {
        let fd = memfd("cloexec-test", 4096, false);
        let raw = fd.as_raw_fd();
        assert!(is_cloexec(raw).unwrap());
        set_cloexec(raw, false).unwrap();
        assert!(!is_cloexec(raw).unwrap());
        set_cloexec(raw, true).unwrap();
        assert!(is_cloexec(raw).unwrap());
    }

    #[test]
    fn memfd_names_parse() {
        assert_eq!(
            memfd_name("/memfd:guest-ram-0 (deleted)"),
            Some("guest-ram-0")
        );
        assert_eq!(memfd_name("/memfd:x"), Some("x"));
        assert_eq!(memfd_name("/tmp/file"), None);
    }
}
