//! The host side of a virtio-net device: a tap interface (`/dev/net/tun`, `IFF_TAP`).
//!
//! The tap is opened with `IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet header
//! (`TUNSETVNETHDRSZ`): every frame read or written starts with a `virtio_net_hdr_v1`, the very
//! header the guest's buffers carry, so a frame crosses between the guest and the tap without
//! being rewritten. Offloads (checksum, TSO, UFO) are switched on with `TUNSETOFFLOAD` only for
//! what the guest negotiated.
//!
//! A tap fd is a preserved host fd: every `/dev/net/tun` fd has the same device and inode, so its
//! identity is its interface name and flags (`TUNGETIFF`), checked at restore.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

/// The vnet header on every frame: `virtio_net_hdr_v1` (with `num_buffers`).
pub const VNET_HDR_LEN: usize =
    std::mem::size_of::<virtio_bindings::virtio_net::virtio_net_hdr_v1>();

/// Flags the VMM opens a tap with.
const TAP_FLAGS: i32 = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// The offloads this VMM may ask of a tap (what a guest can receive).
pub const OFFLOADS_TSO: u32 =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "cannot open /dev/net/tun: {0} (the VMM needs CAP_NET_ADMIN, or a tap opened by the management layer passed with -netdev tap,fd=N)"
    )]
    OpenTun(std::io::Error),
    #[error(
        "cannot attach to tap '{name}': {source} (does another process use it, or does this user lack permission?)"
    )]
    Attach {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface name '{0}' is not valid: 1 to 15 bytes, no '/' or spaces")]
    BadName(String),
    #[error("fd {fd} is not a tap device: {detail}")]
    NotATap { fd: RawFd, detail: String },
    #[error("fd {0} is not open in this process (pass it when starting the VMM)")]
    FdNotOpen(RawFd),
    #[error("tap '{name}': {op}: {source}")]
    Ioctl {
        name: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// An open tap: the fd, and the name and flags it is attached with.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    flags: i16,
}

/// A tap's identity as `TUNGETIFF` reports it.
pub fn interface_of(fd: BorrowedFd<'_>) -> std::io::Result<(String, i16)> {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes an ifreq into `req`, which lives for the call.
    let ret = unsafe { ioctl_with_mut_ref(&fd, libc::TUNGETIFF as _, &mut req) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let name: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    // SAFETY: TUNGETIFF fills the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok((String::from_utf8_lossy(&name).into_owned(), flags))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() < libc::IFNAMSIZ && !name.contains(['/', ' ', '\0', '\t', '\n'])
}

impl Tap {
    /// Opens `/dev/net/tun` and attaches to the tap `name` (created if it does not exist).
    pub fn open_named(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = TAP_FLAGS as i16;
        // SAFETY: TUNSETIFF reads (and updates) an ifreq that lives for the call.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as _, &mut req) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        let tap = Tap::described(OwnedFd::from(file), name)?;
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// Takes a tap the management layer opened (`-netdev tap,fd=N`), as a close-on-exec
    /// duplicate; it must be a tap with a vnet header.
    pub fn from_passed_fd(fd: RawFd) -> Result<Tap, TapError> {
        if fd < 0 || cpr_common::fds::identity(fd, "netdev fd").is_err() {
            return Err(TapError::FdNotOpen(fd));
        }
        // The identity check found it open, and nothing in this process closes it.
        // SAFETY: the fd is open for the duration of this borrow (see above).
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let owned = borrowed
            .try_clone_to_owned()
            .map_err(|_| TapError::FdNotOpen(fd))?;
        let tap = Tap::adopt(owned).map_err(|detail| TapError::NotATap { fd, detail })?;
        if tap.flags & libc::IFF_VNET_HDR as i16 == 0 {
            return Err(TapError::NotATap {
                fd,
                detail: format!(
                    "tap '{}' was opened without IFF_VNET_HDR (open it with vnet_hdr)",
                    tap.name
                ),
            });
        }
        tap.set_vnet_hdr_len()?;
        set_nonblocking(&tap.fd).map_err(|source| TapError::Ioctl {
            name: tap.name.clone(),
            op: "O_NONBLOCK",
            source,
        })?;
        Ok(tap)
    }

    /// A tap fd handed over by the previous VMM: already set up, only its identity is read.
    pub fn adopt(fd: OwnedFd) -> Result<Tap, String> {
        let (name, flags) = interface_of(fd.as_fd_ref()).map_err(|e| format!("TUNGETIFF: {e}"))?;
        if flags & libc::IFF_TAP as i16 == 0 {
            return Err(format!("'{name}' is a tun (layer 3) device, not a tap"));
        }
        Ok(Tap { fd, name, flags })
    }

    fn described(fd: OwnedFd, name: &str) -> Result<Tap, TapError> {
        Tap::adopt(fd).map_err(|detail| TapError::Ioctl {
            name: name.to_string(),
            op: "TUNGETIFF",
            source: std::io::Error::other(detail),
        })
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        let len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int that lives for the call.
        let ret = unsafe { ioctl_with_ref(&self.fd, libc::TUNSETVNETHDRSZ as _, &len) };
        if ret < 0 {
            return Err(self.ioctl_error("TUNSETVNETHDRSZ"));
        }
        Ok(())
    }

    /// Tells the tap which offloads the guest takes (`TUN_F_*`).
    pub fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        Self::set_offloads_on(self.fd.as_raw_fd(), flags).map_err(|source| TapError::Ioctl {
            name: self.name.clone(),
            op: "TUNSETOFFLOAD",
            source,
        })
    }

    pub fn set_offloads_on(fd: RawFd, flags: u32) -> std::io::Result<()> {
        // SAFETY: the caller's fd is open for the call (it owns it); a bad fd fails with EBADF.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_val(&borrowed, libc::TUNSETOFFLOAD as _, flags.into())
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Which offloads the tap accepts (probed once, then all switched off again).
    pub fn supported_offloads(&self) -> u32 {
        let mut ok = 0;
        for flags in [OFFLOADS_TSO, libc::TUN_F_UFO] {
            if self.set_offloads(ok | flags).is_ok() {
                ok |= flags;
            }
        }
        let _ = self.set_offloads(0);
        ok
    }

    fn ioctl_error(&self, op: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            op,
            source: std::io::Error::last_os_error(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn flags(&self) -> i16 {
        self.flags
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

trait AsFdRef {
    fn as_fd_ref(&self) -> BorrowedFd<'_>;
}

impl AsFdRef for OwnedFd {
    fn as_fd_ref(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(())
}

use std::os::unix::fs::OpenOptionsExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_ioctl() {
        for bad in ["", "a/b", "sixteen-chars-xx", "a b"] {
            assert!(
                matches!(Tap::open_named(bad), Err(TapError::BadName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_file_is_not_a_tap() {
        let f = File::open("/proc/self/status").unwrap();
        let e = Tap::from_passed_fd(f.as_raw_fd()).unwrap_err();
        assert!(matches!(e, TapError::NotATap { .. }), "{e}");
        assert!(matches!(
            Tap::from_passed_fd(9999),
            Err(TapError::FdNotOpen(9999))
        ));
    }

    #[test]
    fn a_named_tap_reports_its_name_and_flags() {
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipped: no /dev/net/tun");
            return;
        }
        let name = format!("cprt{}", std::process::id() % 100_000);
        let tap = match Tap::open_named(&name) {
            Ok(t) => t,
            Err(TapError::OpenTun(e)) | Err(TapError::Attach { source: e, .. }) => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(tap.name(), name);
        assert_ne!(tap.flags() & libc::IFF_VNET_HDR as i16, 0);
        let (n, flags) = interface_of(tap.fd.as_fd_ref()).unwrap();
        assert_eq!((n.as_str(), flags), (name.as_str(), tap.flags()));
        assert_ne!(tap.supported_offloads() & libc::TUN_F_CSUM, 0);
    }
}
