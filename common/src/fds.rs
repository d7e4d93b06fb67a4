//! fd hygiene and the checks that an inherited fd is what the CPR state says it is.
//!
//! Preserved fds are close-on-exec at all times except across the update's own `exec`, so they
//! never leak into unrelated children. When an fd does cross an exec, its receiver checks it
//! against its record (name, type, size, seals, device and inode) before trusting it: a closed,
//! reused or swapped fd number is detected here, by the same code in the shim, the new VMM and
//! the cpr-transfer receiver. The records themselves ([`PreservedFd`], [`FdKind`]) are defined
//! here too, so this module depends on nothing else in the crate.
//!
//! The checks take fd numbers, not `BorrowedFd`s, on purpose: a number read from a record may be
//! closed or reused by now, and finding that out is their job. That is why they call `fcntl` and
//! `fstat` through `libc` rather than through nix's `AsFd`-based wrappers.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use serde::{Deserialize, Serialize};

/// What a preserved fd is, so its receiver knows what to check and what to do with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// A guest RAM region (a sealed memfd); `name` is the region's memfd name.
    GuestRam,
    /// The QMP monitor's listening socket.
    QmpListener,
    /// A connected QMP client; `negotiated` says whether it has sent `qmp_capabilities`.
    QmpClient { negotiated: bool },
    /// The serial console's listening socket (`-serial unix:...,server`).
    ConsoleListener,
    /// The serial console's connected client.
    ConsoleClient,
    /// The serial console's output file (`-serial file:...`).
    ConsoleFile,
    /// The previous VMM's executable, for rollback.
    FallbackExe,
    /// A sealed memfd with a copy of the machine state file, for a rollback that finds the file
    /// damaged.
    StateCopy,
    /// Closing it lets the previous VMM's teardown helper free the old address space and KVM
    /// VM: the new VMM closes it once the guest runs, so that work stays out of the blackout.
    TeardownRelease,
    /// A host fd an emulated device owns (a disk image, a tap, a socket); `name` is the one
    /// the device declared, and the file type is recorded so the receiver checks it too.
    DeviceBackend { file_type: u32 },
    /// A device's tap (a `/dev/net/tun` fd attached to a tap interface). Every such fd has the
    /// same device and inode, so the interface name (NUL-padded) and flags that `TUNGETIFF`
    /// reports are what say it is still the same tap. [`describe`] records a device backend
    /// that is a tap this way. Appended last, so every other record encodes as before.
    TapDevice { ifname: [u8; 16], flags: u16 },
    /// All guest RAM in one regular file (`memory-backend-file`): no memfd name and no seals,
    /// but its size, device and inode are checked. Appended last so a CPR state without it
    /// keeps its encoding (the previous release decodes it).
    GuestRamFile,
}

impl FdKind {
    /// The file type an fd of this kind must have (None: any).
    pub fn file_type(self) -> Option<u32> {
        match self {
            FdKind::GuestRam
            | FdKind::GuestRamFile
            | FdKind::FallbackExe
            | FdKind::ConsoleFile
            | FdKind::StateCopy => Some(libc::S_IFREG),
            FdKind::QmpListener
            | FdKind::QmpClient { .. }
            | FdKind::ConsoleListener
            | FdKind::ConsoleClient => Some(libc::S_IFSOCK),
            FdKind::TeardownRelease => Some(libc::S_IFIFO),
            FdKind::DeviceBackend { file_type } => Some(file_type),
            FdKind::TapDevice { .. } => Some(libc::S_IFCHR),
        }
    }

    /// Whether a device owns it (handed back to the device by name at restore).
    pub fn is_device_backend(self) -> bool {
        matches!(
            self,
            FdKind::DeviceBackend { .. } | FdKind::TapDevice { .. }
        )
    }
}

/// One fd that crosses the exec, with everything needed to recognise it on the other side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreservedFd {
    pub name: String,
    pub kind: FdKind,
    pub fd: RawFd,
    pub size: u64,
    pub seals: u32,
    pub dev: u64,
    pub ino: u64,
}

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
    #[error(
        "fd {fd} ({name}) is tap {found}, expected tap {expected}: the fd was swapped for another tap"
    )]
    WrongTap {
        fd: RawFd,
        name: String,
        expected: String,
        found: String,
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
    // Raw, not nix: `fd` may not be open (EBADF is reported), and this runs in the signal-safe
    // exec path (see `exec`), where only plain syscalls on prepared data are allowed.
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
    // Raw, not nix: `fd` may not be open; that is reported, not assumed away.
    // SAFETY: F_GETFD only reads the fd's flags; an invalid fd yields EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(sys_err(fd, "fd", "F_GETFD", nix::errno::Errno::last()));
    }
    Ok(flags & libc::FD_CLOEXEC != 0)
}

pub fn identity(fd: RawFd, name: &str) -> Result<FdIdentity, FdError> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // Raw, not nix: `fd` is a recorded number that may be closed or reused by now (nix's fstat
    // would need a `BorrowedFd`, i.e. the promise that it is open).
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
    // Raw, not nix: as in `identity`, `fd` is a number that may no longer be open.
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

/// The interface a `/dev/net/tun` fd is attached to: its name (NUL-padded) and flags.
pub fn tap_interface(fd: RawFd, name: &str) -> Result<([u8; 16], u16), FdError> {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // Raw, as in `identity`: `fd` is a recorded number that may be closed or reused by now.
    // TUNGETIFF writes an ifreq into `req`, which lives for the call; other files refuse it
    // (ENOTTY, EBADFD).
    // SAFETY: as just said, the kernel writes only into `req`.
    let rc = unsafe { libc::ioctl(fd, libc::TUNGETIFF as _, &mut req) };
    if rc < 0 {
        return Err(sys_err(fd, name, "TUNGETIFF", nix::errno::Errno::last()));
    }
    let mut ifname = [0u8; 16];
    for (d, s) in ifname.iter_mut().zip(req.ifr_name.iter()) {
        *d = *s as u8;
    }
    // SAFETY: TUNGETIFF filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags } as u16;
    Ok((ifname, flags))
}

fn tap_text(ifname: &[u8; 16], flags: u16) -> String {
    let end = ifname.iter().position(|b| *b == 0).unwrap_or(ifname.len());
    format!(
        "'{}' (flags {flags:#x})",
        String::from_utf8_lossy(&ifname[..end])
    )
}

/// Records what `fd` is now, so that a receiver can check it later. A character-device
/// backend that is a tap is recorded as [`FdKind::TapDevice`].
pub fn describe(fd: BorrowedFd<'_>, name: &str, kind: FdKind) -> Result<PreservedFd, FdError> {
    let raw = fd.as_raw_fd();
    let id = identity(raw, name)?;
    let kind = match kind {
        FdKind::DeviceBackend {
            file_type: libc::S_IFCHR,
        } => match tap_interface(raw, name) {
            Ok((ifname, flags)) => FdKind::TapDevice { ifname, flags },
            Err(_) => kind,
        },
        other => other,
    };
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
    if let FdKind::TapDevice { ifname, flags } = expected.kind {
        let (found_name, found_flags) = tap_interface(fd, name)?;
        if (found_name, found_flags) != (ifname, flags) {
            return Err(FdError::WrongTap {
                fd,
                name: name.to_string(),
                expected: tap_text(&ifname, flags),
                found: tap_text(&found_name, found_flags),
            });
        }
    }
    if matches!(expected.kind, FdKind::GuestRam | FdKind::GuestRamFile)
        && found.size != expected.size
    {
        return Err(FdError::WrongSize {
            fd,
            name: name.to_string(),
            expected: expected.size,
            found: found.size,
        });
    }
    if expected.kind == FdKind::GuestRam {
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
    use std::os::fd::{AsFd, OwnedFd};

    fn memfd(name: &str, size: u64, seal: bool) -> OwnedFd {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&fd, size as i64).unwrap();
        if seal {
            let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
            fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).unwrap();
        }
        fd
    }

    #[test]
    fn a_ram_file_is_checked_by_identity_and_size_without_seals() {
        let path = std::env::temp_dir().join(format!("fds-ramfile-{}", std::process::id()));
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let rec = describe(file.as_fd(), "guest-ram-file", FdKind::GuestRamFile).unwrap();
        assert_eq!((rec.size, rec.seals), (1 << 20, 0));
        check_preserved(&rec).unwrap();
        file.set_len(2 << 20).unwrap();
        let e = check_preserved(&rec).unwrap_err();
        assert!(matches!(e, FdError::WrongSize { .. }), "{e}");
        let _ = std::fs::remove_file(&path);
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

    /// A tap attached to `name` (non-persistent: gone when the fd closes), or None where taps
    /// cannot be made (no /dev/net/tun, no permission).
    fn tap(name: &str) -> Option<OwnedFd> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .ok()?;
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads an ifreq that lives for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        (rc == 0).then(|| OwnedFd::from(file))
    }

    #[test]
    fn a_tap_is_recorded_by_name_and_flags_and_a_swapped_tap_is_caught() {
        let pid = std::process::id() % 100_000;
        let (Some(a), Some(b)) = (tap(&format!("cfa{pid}")), tap(&format!("cfb{pid}"))) else {
            eprintln!("skipped: cannot create taps here");
            return;
        };
        let rec = describe(
            a.as_fd(),
            "netdev:n0",
            FdKind::DeviceBackend {
                file_type: libc::S_IFCHR,
            },
        )
        .unwrap();
        let FdKind::TapDevice { ifname, flags } = rec.kind else {
            panic!("a tap is recorded as a tap: {rec:?}");
        };
        assert!(ifname.starts_with(format!("cfa{pid}").as_bytes()));
        assert_ne!(flags & libc::IFF_TAP as u16, 0);
        assert!(rec.kind.is_device_backend());
        check_preserved(&rec).unwrap();
        // Same device and inode (every /dev/net/tun fd has them), another tap: caught.
        nix::unistd::dup2(&b, &mut unsafe_clone(&a)).unwrap();
        let err = check_preserved(&rec).unwrap_err();
        assert!(matches!(err, FdError::WrongTap { .. }), "{err}");
        assert!(err.to_string().contains(&format!("cfb{pid}")), "{err}");
    }

    /// A second owner of `fd`'s number, for dup2 to replace what it refers to; forgotten
    /// afterwards so that the number is closed once, by `fd`'s owner.
    fn unsafe_clone(fd: &OwnedFd) -> std::mem::ManuallyDrop<OwnedFd> {
        // SAFETY: the clone is never dropped (ManuallyDrop), so the number is closed once.
        std::mem::ManuallyDrop::new(unsafe {
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd.as_raw_fd())
        })
    }

    #[test]
    fn records_of_the_earlier_kinds_encode_as_before() {
        // The tap kind was appended last: a device backend still has index 9, so a record
        // written before it existed decodes the same.
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(
            FdKind::DeviceBackend {
                file_type: libc::S_IFREG,
            },
            config,
        )
        .unwrap();
        assert_eq!(bytes[0], 9);
        let bytes = bincode::serde::encode_to_vec(
            FdKind::TapDevice {
                ifname: [0; 16],
                flags: 0,
            },
            config,
        )
        .unwrap();
        assert_eq!(bytes[0], 10);
    }
}
