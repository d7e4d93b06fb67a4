//! Inspecting a process through `/proc` and polling for conditions.
//!
//! CPR passes guest RAM as memfds across `exec`, so leaking one into an
//! unrelated child (or losing one) is a real bug class; these helpers let
//! tests check which descriptors a VMM holds and whether they are
//! close-on-exec.

use std::io;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

/// `O_CLOEXEC` as it appears in `/proc/PID/fdinfo/FD` `flags:` (octal 02000000).
pub const O_CLOEXEC_FLAG: u32 = 0o2_000_000;

/// The `flags:` of `/proc/PID/fdinfo/FD` (the file status flags plus
/// `O_CLOEXEC`), parsed from octal.
pub fn read_proc_fd_flags(pid: u32, fd: i32) -> io::Result<u32> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let info = std::fs::read_to_string(&path)?;
    let invalid =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {what}"));
    let value = info
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))
        .ok_or_else(|| invalid("no flags: line"))?;
    u32::from_str_radix(value.trim(), 8).map_err(|_| invalid("flags: is not octal"))
}

/// One open file descriptor of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFd {
    pub fd: i32,
    /// Where `/proc/PID/fd/FD` points, e.g. `/memfd:guest-ram (deleted)`,
    /// `socket:[1234]` or `anon_inode:kvm-vcpu:0`.
    pub target: String,
    /// The `flags:` from fdinfo.
    pub flags: u32,
}

impl OpenFd {
    pub fn is_cloexec(&self) -> bool {
        self.flags & O_CLOEXEC_FLAG != 0
    }

    /// Whether this is a memfd (the link target starts with `/memfd:`).
    pub fn is_memfd(&self) -> bool {
        self.target.starts_with("/memfd:")
    }
}

/// All open descriptors of `pid`, sorted by number.
///
/// Descriptors that close while being listed are skipped.
pub fn list_fds(pid: u32) -> io::Result<Vec<OpenFd>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let (Ok(target), Ok(flags)) = (
            std::fs::read_link(entry.path()),
            read_proc_fd_flags(pid, fd),
        ) else {
            continue;
        };
        fds.push(OpenFd {
            fd,
            target: target.to_string_lossy().into_owned(),
            flags,
        });
    }
    fds.sort_by_key(|open| open.fd);
    Ok(fds)
}

/// What a process holds that a leak across updates would make grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holdings {
    /// Processes whose parent it is, zombies (not reaped yet) included.
    pub children: usize,
    /// Its threads (`/proc/PID/task`).
    pub threads: usize,
    /// KVM VMs it holds: fds on `anon_inode:kvm-vm`.
    pub kvm_vms: usize,
}

/// Counts `pid`'s children, threads and KVM VM fds.
pub fn holdings(pid: u32) -> io::Result<Holdings> {
    let mut children = 0;
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        if !entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        // A process may exit while the directory is read: it is no longer anyone's child.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses, so split after
        // the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            children += 1;
        }
    }
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))?.count();
    let kvm_vms = list_fds(pid)?
        .iter()
        .filter(|fd| fd.target == "anon_inode:kvm-vm")
        .count();
    Ok(Holdings {
        children,
        threads,
        kvm_vms,
    })
}

/// Polls `condition` until it holds (returns true) or `timeout` passes
/// (returns false); starts at 1 ms between polls and backs off to 20 ms, so
/// fast conditions are seen quickly without burning a core on slow ones.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(1);
    loop {
        if condition() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        thread::sleep(interval.min(deadline - now));
        interval = (interval * 2).min(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use std::os::fd::AsRawFd;

    fn our_pid() -> u32 {
        std::process::id()
    }

    #[test]
    fn std_files_are_close_on_exec_and_dups_are_not() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let flags = read_proc_fd_flags(our_pid(), file.as_raw_fd()).unwrap();
        assert_ne!(flags & O_CLOEXEC_FLAG, 0, "{flags:o}");
        let duplicate = nix::unistd::dup(&file).unwrap();
        let flags = read_proc_fd_flags(our_pid(), duplicate.as_raw_fd()).unwrap();
        assert_eq!(flags & O_CLOEXEC_FLAG, 0, "{flags:o}");
    }

    #[test]
    fn list_fds_shows_memfds_and_their_cloexec_flag() {
        let sealed = memfd_create("cpr-tests-cloexec", MFdFlags::MFD_CLOEXEC).unwrap();
        let leaky = memfd_create("cpr-tests-leaky", MFdFlags::empty()).unwrap();
        let fds = list_fds(our_pid()).unwrap();
        let find = |fd: i32| fds.iter().find(|open| open.fd == fd).unwrap();
        let sealed_entry = find(sealed.as_raw_fd());
        assert!(sealed_entry.is_memfd(), "{sealed_entry:?}");
        assert!(
            sealed_entry.target.contains("cpr-tests-cloexec"),
            "{sealed_entry:?}"
        );
        assert!(sealed_entry.is_cloexec());
        let leaky_entry = find(leaky.as_raw_fd());
        assert!(
            leaky_entry.is_memfd() && !leaky_entry.is_cloexec(),
            "{leaky_entry:?}"
        );
        assert!(fds.windows(2).all(|pair| pair[0].fd < pair[1].fd));
    }

    #[test]
    fn holdings_count_children_and_threads() {
        let before = holdings(our_pid()).unwrap();
        assert!(before.threads >= 1);
        assert_eq!(before.kvm_vms, 0);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let with_child = holdings(our_pid()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(with_child.children >= 1, "{with_child:?}");
    }

    #[test]
    fn missing_fds_are_errors() {
        assert!(read_proc_fd_flags(our_pid(), 1_000_000).is_err());
    }

    #[test]
    fn wait_until_returns_as_soon_as_the_condition_holds() {
        let start = Instant::now();
        let mut calls = 0;
        assert!(wait_until(Duration::from_secs(10), || {
            calls += 1;
            calls == 3
        }));
        assert!(start.elapsed() < Duration::from_secs(1));
        let start = Instant::now();
        assert!(!wait_until(Duration::from_millis(50), || false));
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}
