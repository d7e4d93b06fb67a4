//! A throw-away network namespace with a tap device in it, for the virtio-net tests.
//!
//! [`NetNs::create`] makes a uniquely named namespace (`ip netns add`) and a persistent tap
//! inside it (`ip tuntap add ... mode tap`), sets the tap up and turns IPv6 off on it (so the
//! kernel does not send its own router solicitations into the test's traffic). Dropping the
//! [`NetNs`] deletes the tap and the namespace, also when the test panics. [`NetNs::available`]
//! does the same but first checks what it needs (root, `/dev/net/tun`, the `ip` tool) and skips
//! or, under CI, fails through [`crate::prerequisite_missing`] when something is missing.
//!
//! Code that must run inside the namespace (open a socket there, open the tap by name) runs on
//! a dedicated thread that joined the namespace with `setns` ([`NetNs::run`]); a socket or tap
//! fd made there stays in the namespace and can be used from any thread afterwards. A process
//! (the VMM with `ifname=`) is started inside it with the [`NetNs::exec_prefix`] command
//! (`ip netns exec NAME ...`).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};
use thiserror::Error;

use crate::prereq::prerequisite_missing;

/// What went wrong creating or using a test network namespace.
#[derive(Debug, Error)]
pub enum NetNsError {
    /// An `ip` command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// An `ip` command could not be started.
    #[error("cannot run `{command}`: {source} (the tests need iproute2's `ip`)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    /// The namespace's file under /run/netns could not be opened.
    #[error("cannot open the namespace file {path}: {source}")]
    OpenNs {
        path: String,
        source: std::io::Error,
    },
    /// `setns` into the namespace failed.
    #[error("cannot enter network namespace {name}: {source}")]
    Setns { name: String, source: nix::Error },
    /// The thread running code inside the namespace panicked.
    #[error("the thread running inside network namespace {0} panicked")]
    ThreadPanicked(String),
    /// /dev/net/tun could not be opened or TUNSETIFF failed.
    #[error("cannot attach to tap {tap} in {name}: {what}: {source}")]
    Tap {
        name: String,
        tap: String,
        what: &'static str,
        source: std::io::Error,
    },
}

/// A network namespace with one tap device (up, no IPv6) in it; both removed on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    tap: String,
}

/// `TUNSETIFF`, `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Tap device (frames with an Ethernet header).
pub const IFF_TAP: libc::c_short = 0x0002;
/// No packet-information header in front of each frame.
pub const IFF_NO_PI: libc::c_short = 0x1000;
/// A `virtio_net_hdr` in front of each frame.
pub const IFF_VNET_HDR: libc::c_short = 0x4000;

impl NetNs {
    /// Creates `cprt-<pid>-<n>` with the tap `cprt<pid%100000>n<n>` (at most 15 characters).
    pub fn create() -> Result<Self, NetNsError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("cprt-{pid}-{n}");
        let tap = format!("cprt{}n{}", pid % 100_000, n % 1000);
        ip(&["netns", "add", &name])?;
        // From here on, Drop removes what exists.
        let ns = NetNs { name, tap };
        ip(&[
            "-n", &ns.name, "tuntap", "add", "dev", &ns.tap, "mode", "tap",
        ])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns.name, "link", "set", &ns.tap, "up"])?;
        let sysctl = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", ns.tap);
        // Best effort: without IPv6 the tap carries only the test's frames.
        let _ = ns.run(move || std::fs::write(&sysctl, "1"));
        Ok(ns)
    }

    /// [`NetNs::create`] after checking what it needs; `None` when the test must return (the
    /// skip was recorded, see [`crate::prerequisite_missing`]; under CI that panics instead).
    pub fn available(test: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            prerequisite_missing(test, "network namespaces and taps need root");
            return None;
        }
        if !Path::new("/dev/net/tun").exists() {
            prerequisite_missing(test, "/dev/net/tun does not exist (no tun/tap support)");
            return None;
        }
        match Self::create() {
            Ok(ns) => Some(ns),
            Err(e) => {
                prerequisite_missing(test, &format!("cannot create a network namespace: {e}"));
                None
            }
        }
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tap device's name inside the namespace.
    pub fn tap(&self) -> &str {
        &self.tap
    }

    /// The tap's interface index inside the namespace.
    pub fn tap_index(&self) -> Result<u32, NetNsError> {
        let tap = self.tap.clone();
        self.run(move || nix::net::if_::if_nametoindex(tap.as_str()))?
            .map_err(|e| self.tap_error("if_nametoindex", e.into()))
    }

    fn tap_error(&self, what: &'static str, source: std::io::Error) -> NetNsError {
        NetNsError::Tap {
            name: self.name.clone(),
            tap: self.tap.clone(),
            what,
            source,
        }
    }

    /// The command prefix that runs a program inside the namespace: `ip netns exec NAME`.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// Runs `f` on a new thread that has joined the namespace and returns its result.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetNsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let path = format!("/run/netns/{}", self.name);
        let ns_file = File::open(&path).map_err(|source| NetNsError::OpenNs {
            path: path.clone(),
            source,
        })?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(ns_file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                        NetNsError::Setns {
                            name: self.name.clone(),
                            source,
                        }
                    })?;
                    Ok(f())
                })
                .join()
                .map_err(|_| NetNsError::ThreadPanicked(self.name.clone()))?
        })
    }

    /// Opens /dev/net/tun inside the namespace and attaches it to the tap with `flags`
    /// (e.g. `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), as a management layer does before it passes
    /// the fd to the VMM (`-netdev tap,fd=N`). The fd is close-on-exec.
    pub fn open_tap(&self, flags: libc::c_short) -> Result<OwnedFd, NetNsError> {
        let tap = self.tap.clone();
        self.run(move || -> Result<OwnedFd, (&'static str, std::io::Error)> {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .map_err(|e| ("open /dev/net/tun", e))?;
            // SAFETY: ifreq is plain old data; all-zero is a valid value.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (dst, src) in req.ifr_name.iter_mut().zip(tap.bytes()) {
                *dst = src as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = flags;
            // TUNSETIFF reads an ifreq.
            // SAFETY: `req` is a valid, initialised ifreq outliving the call; the fd is open.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
            if rc < 0 {
                return Err(("TUNSETIFF", std::io::Error::last_os_error()));
            }
            Ok(OwnedFd::from(file))
        })?
        .map_err(|(what, e)| self.tap_error(what, e))
    }

    /// Opens an `AF_PACKET` raw socket (all protocols) bound to the tap, inside the namespace.
    pub fn packet_socket(&self) -> Result<OwnedFd, NetNsError> {
        let index = self.tap_index()?;
        self.run(move || -> Result<OwnedFd, (&'static str, std::io::Error)> {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2) call; the result is checked before use.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                )
            };
            if fd < 0 {
                return Err(("socket(AF_PACKET)", std::io::Error::last_os_error()));
            }
            // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = index as i32;
            // SAFETY: `addr` is a valid sockaddr_ll and the length passed is its size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast::<libc::sockaddr>(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(("bind(AF_PACKET)", std::io::Error::last_os_error()));
            }
            Ok(fd)
        })?
        .map_err(|(what, e)| self.tap_error(what, e))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // The tap first (a VMM still holding it does not keep it alive), then the namespace.
        if let Err(e) = ip(&["-n", &self.name, "link", "del", &self.tap]) {
            eprintln!("cpr-tests: removing tap {}: {e}", self.tap);
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cpr-tests: removing network namespace {}: {e}", self.name);
        }
    }
}

/// Runs `ip ARGS...`, failing with its stderr.
fn ip(args: &[&str]) -> Result<(), NetNsError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetNsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetNsError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns_exists(name: &str) -> bool {
        Path::new("/run/netns").join(name).exists()
    }

    #[test]
    fn namespace_and_tap_exist_and_are_removed_on_drop() {
        let Some(ns) = NetNs::available("netns::namespace_and_tap_exist_and_are_removed_on_drop")
        else {
            return;
        };
        let name = ns.name().to_string();
        assert!(ns_exists(&name));
        assert!(ns.tap().len() <= 15);
        // The tap is inside the namespace, not here.
        let tap = ns.tap().to_string();
        assert!(nix::net::if_::if_nametoindex(tap.as_str()).is_err());
        assert!(ns.tap_index().unwrap() > 0, "tap {tap} is not in {name}");
        let fd = ns.open_tap(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).unwrap();
        let sock = ns.packet_socket().unwrap();
        drop((fd, sock));
        drop(ns);
        assert!(!ns_exists(&name), "{name} was not removed");
    }

    #[test]
    fn removed_on_panic() {
        let Some(ns) = NetNs::available("netns::removed_on_panic") else {
            return;
        };
        let name = ns.name().to_string();
        let result = std::panic::catch_unwind(move || {
            let _ns = ns;
            panic!("test failure");
        });
        assert!(result.is_err());
        assert!(!ns_exists(&name), "{name} was not removed after a panic");
    }
}
