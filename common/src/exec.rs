//! Prepared execs: everything an `exec` needs is built in advance, so the exec itself (and the
//! few syscalls around it) can run anywhere, including inside a fatal-signal handler, which may
//! not allocate.
//!
//! The same plan serves the three execs of a live update: the old VMM executing the
//! cpr-exec-command, the shim executing the new VMM, and a rollback executing the previous VMM
//! from its preserved fd.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::fds;

/// What to execute.
#[derive(Debug)]
pub enum ExecTarget {
    /// A path; without a '/', searched in PATH like a shell would (not signal-safe).
    Path(CString),
    /// An open executable (`execveat(fd, "", AT_EMPTY_PATH)`), immune to its path being replaced.
    Fd(RawFd),
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{what} contains a NUL byte")]
    Nul { what: String },
    #[error("empty command: nothing to execute")]
    Empty,
}

/// A ready-to-run exec.
#[derive(Debug)]
pub struct ExecPlan {
    target: ExecTarget,
    program: String,
    // The CStrings own the bytes the pointer arrays point at; both live as long as the plan.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    env_ptrs: Vec<*const libc::c_char>,
    /// fds to make inheritable just before the exec.
    inherit: Vec<RawFd>,
    /// Bytes to store in a memfd (the CPR channel) just before the exec.
    channel: Option<(RawFd, Vec<u8>)>,
}

// SAFETY: the raw pointers point into CStrings owned by the same plan and are never written
// through; sharing a plan between threads (or with a signal handler) only reads them.
unsafe impl Send for ExecPlan {}
// SAFETY: see above; all methods take &self and only read.
unsafe impl Sync for ExecPlan {}

fn cstring(what: &str, bytes: &[u8]) -> Result<CString, ExecError> {
    CString::new(bytes).map_err(|_| ExecError::Nul {
        what: what.to_string(),
    })
}

impl ExecPlan {
    /// `argv[0]` is passed as given; `env_set` entries replace (or add to) this process's
    /// environment, and `env_remove` names are dropped from it.
    pub fn new(
        target: ExecTarget,
        argv: &[String],
        env_set: &[(&str, String)],
        env_remove: &[&str],
        inherit: Vec<RawFd>,
    ) -> Result<Self, ExecError> {
        if argv.is_empty() {
            return Err(ExecError::Empty);
        }
        let program = match &target {
            ExecTarget::Path(p) => p.to_string_lossy().into_owned(),
            ExecTarget::Fd(fd) => format!("fd {fd} ({})", argv[0]),
        };
        let argv_c = argv
            .iter()
            .map(|a| cstring("an argument", a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut env_c = Vec::new();
        for (key, value) in std::env::vars_os() {
            let k = key.as_bytes();
            if env_set.iter().any(|(name, _)| name.as_bytes() == k)
                || env_remove.iter().any(|name| name.as_bytes() == k)
            {
                continue;
            }
            let mut entry = k.to_vec();
            entry.push(b'=');
            entry.extend_from_slice(OsStr::new(&value).as_bytes());
            env_c.push(cstring("an environment variable", &entry)?);
        }
        for (name, value) in env_set {
            env_c.push(cstring(name, format!("{name}={value}").as_bytes())?);
        }
        let argv_ptrs = null_terminated(&argv_c);
        let env_ptrs = null_terminated(&env_c);
        Ok(ExecPlan {
            target,
            program,
            _argv: argv_c,
            argv_ptrs,
            _env: env_c,
            env_ptrs,
            inherit,
            channel: None,
        })
    }

    /// Writes `content` into the memfd `fd` (replacing what it held) just before the exec.
    pub fn with_channel_content(mut self, fd: RawFd, content: Vec<u8>) -> Self {
        self.channel = Some((fd, content));
        self
    }

    /// What is executed, for messages.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// Makes the inherited fds inheritable, stores the channel content, and executes. Returns
    /// only if the exec failed, with its error. Async-signal-safe: only fcntl, ftruncate, pwrite
    /// and the exec syscall on memory prepared in advance.
    pub fn exec(&self) -> std::io::Error {
        if let Some((fd, content)) = &self.channel {
            // Failures surface when the receiver validates the channel. Raw libc on purpose, like
            // the exec below: this may run in a signal handler, so only plain syscalls on data
            // prepared in advance (nix's wrappers want a `BorrowedFd` and may allocate).
            // SAFETY: plain syscalls on an fd number with a buffer owned by the plan.
            unsafe {
                libc::ftruncate(*fd, 0);
                libc::pwrite(*fd, content.as_ptr().cast(), content.len(), 0);
            }
        }
        for fd in &self.inherit {
            let _ = fds::set_cloexec(*fd, false);
        }
        match &self.target {
            ExecTarget::Path(path) => {
                // path, argv and envp are NUL-terminated strings in NULL-terminated arrays. Raw
                // libc on purpose: nix's execve builds its pointer arrays (allocates) at call
                // time, which a signal handler may not do.
                // SAFETY: they are owned by the plan and exec only reads them.
                unsafe {
                    if path.as_bytes().contains(&b'/') {
                        libc::execve(
                            path.as_ptr(),
                            self.argv_ptrs.as_ptr(),
                            self.env_ptrs.as_ptr(),
                        );
                    } else {
                        libc::execvpe(
                            path.as_ptr(),
                            self.argv_ptrs.as_ptr(),
                            self.env_ptrs.as_ptr(),
                        );
                    }
                }
            }
            ExecTarget::Fd(fd) => {
                // SAFETY: as above; "" with AT_EMPTY_PATH executes the file `fd` refers to.
                unsafe {
                    libc::execveat(
                        *fd,
                        c"".as_ptr(),
                        self.argv_ptrs.as_ptr().cast(),
                        self.env_ptrs.as_ptr().cast(),
                        libc::AT_EMPTY_PATH,
                    );
                }
            }
        }
        std::io::Error::last_os_error()
    }

    /// After a failed exec: makes the inherited fds close-on-exec again.
    pub fn restore_cloexec(&self) {
        for fd in &self.inherit {
            let _ = fds::set_cloexec(*fd, true);
        }
    }
}

/// Keeps this process's address space and open files alive past its next exec, so the exec does
/// not wait for them to be torn down.
///
/// An exec normally frees the old address space (page tables for all of guest RAM) and closes
/// every close-on-exec fd (the KVM VM, whose destruction frees its MMU state) before the new
/// program runs: tens to hundreds of milliseconds of blackout, growing with RAM. The helper is a
/// task sharing the address space (CLONE_VM) with its own copy of the fd table: while it lives,
/// the exec drops only a reference. The helper waits on a pipe whose write end only this process
/// holds; when the last copy of the write end is closed, the helper sees end-of-file and exits,
/// and the teardown runs in the helper, on another CPU.
///
/// Who closes the write end decides when the teardown runs: left close-on-exec, the exec itself
/// (the teardown then competes with the new program's start-up); passed across the exec (see
/// [`TeardownHelper::release_fd`]), the new program, once it no longer minds. The helper is a
/// child of this process; the program after the exec reaps it.
pub struct TeardownHelper {
    pid: libc::pid_t,
    /// Write end of the release pipe (close-on-exec); taken (closed) only in Drop.
    release: Option<OwnedFd>,
    /// The helper's stack, and the pipe's read end number at its start, in our memory.
    stack: *mut libc::c_void,
}

const HELPER_STACK: usize = 64 << 10;

impl TeardownHelper {
    pub fn spawn() -> std::io::Result<Self> {
        let (read_fd, write_fd) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (read_end, write_end) = (read_fd.as_raw_fd(), write_fd.as_raw_fd());
        // The helper's stack: unmapped in Drop, or freed with the old address space after an exec.
        // SAFETY: a new anonymous private mapping aliases nothing.
        let stack = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                HELPER_STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if stack == libc::MAP_FAILED {
            // The pipe's two ends are closed as they go out of scope.
            return Err(std::io::Error::last_os_error());
        }
        // The helper's two arguments live at the bottom of its stack mapping.
        // SAFETY: the mapping is at least 8 bytes and writable; nothing else uses it yet.
        unsafe { *(stack as *mut [libc::c_int; 2]) = [read_end, write_end] };
        // The child runs `helper_main` on the fresh stack (top, 16-byte aligned) and shares our
        // memory, but only touches its stack and makes raw syscalls (no TLS, no allocation,
        // no errno).
        // SAFETY: so it cannot disturb this process.
        let pid = unsafe {
            libc::clone(
                helper_main,
                (stack as *mut u8).add(HELPER_STACK - 64).cast(),
                libc::CLONE_VM | libc::SIGCHLD,
                stack,
            )
        };
        let clone_error = std::io::Error::last_os_error();
        // The parent does not need the read end (the helper has its own copy of the fd table).
        drop(read_fd);
        if pid < 0 {
            // SAFETY: unmapping the stack created above; no helper exists to use it.
            unsafe { libc::munmap(stack, HELPER_STACK) };
            return Err(clone_error);
        }
        Ok(TeardownHelper {
            pid,
            release: Some(write_fd),
            stack,
        })
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The pipe end whose closing releases the helper (close-on-exec unless made inheritable).
    pub fn release_fd(&self) -> RawFd {
        self.release.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }
}

impl Drop for TeardownHelper {
    /// The exec did not happen: release the helper and reap it.
    fn drop(&mut self) {
        // Closing our write end makes the helper exit; waitpid reaps exactly that child.
        drop(self.release.take());
        let pid = Pid::from_raw(self.pid);
        while waitpid(pid, None) == Err(Errno::EINTR) {}
        // SAFETY: the helper has exited, so its stack is no longer used and can be unmapped.
        unsafe { libc::munmap(self.stack, HELPER_STACK) };
    }
}

/// Raw x86-64 syscall without touching errno (the helper shares memory, and errno lives in the
/// parent thread's TLS).
///
/// # Safety
/// The caller must pass a syscall and arguments that are valid for it.
#[cfg(target_arch = "x86_64")]
unsafe fn raw_syscall3(nr: libc::c_long, a: usize, b: usize, c: usize) -> isize {
    let ret: isize;
    // The `syscall` instruction with the Linux x86-64 calling convention.
    // SAFETY: rcx and r11, which the kernel clobbers, are declared clobbered.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

extern "C" fn helper_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the two fds the parent stored before clone.
    let [read_end, write_end] = unsafe { *(arg as *const [libc::c_int; 2]) };
    let all: [u64; 1] = [!0];
    // SAFETY: raw syscalls on our own fds and signal mask; see raw_syscall3.
    unsafe {
        // No signal handler of the parent may ever run here.
        raw_syscall3(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK as usize,
            all.as_ptr() as usize,
            8,
        );
        // Only the parent may hold the write end, so that its exec (or Drop) releases us.
        raw_syscall3(libc::SYS_close, write_end as usize, 0, 0);
        // The teardown we exist for can wait: at idle priority it never takes a core from the
        // new VMM or the guest's vCPUs, which matter while the teardown (~34 ms per GiB) runs.
        // Best effort: if the kernel refuses, the teardown runs at normal priority.
        let idle = libc::sched_param { sched_priority: 0 };
        raw_syscall3(
            libc::SYS_sched_setscheduler,
            0,
            libc::SCHED_IDLE as usize,
            &idle as *const libc::sched_param as usize,
        );
        let mut byte = 0u8;
        loop {
            let n = raw_syscall3(
                libc::SYS_read,
                read_end as usize,
                &mut byte as *mut u8 as usize,
                1,
            );
            if n != -(libc::EINTR as isize) {
                break;
            }
        }
        raw_syscall3(libc::SYS_exit, 0, 0, 0);
    }
    0
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The signals that ask a VMM to shut down cleanly (SIGHUP as QEMU treats it).
pub const TERMINATION_SIGNALS: [nix::sys::signal::Signal; 3] = [
    nix::sys::signal::Signal::SIGTERM,
    nix::sys::signal::Signal::SIGINT,
    nix::sys::signal::Signal::SIGHUP,
];

pub fn termination_sigset() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in TERMINATION_SIGNALS {
        set.add(s);
    }
    set
}

/// Blocks the termination signals in the calling thread (and every thread it starts later).
/// A VMM does so first thing and reads them from a signalfd: blocked signals stay pending
/// across `exec`, so one that arrives during a live update is handled by the VMM that runs
/// after it, instead of being lost or killing the process half-way.
pub fn block_termination_signals() -> nix::Result<()> {
    termination_sigset().thread_block()
}

/// For an exec into a program that does not read them from a signalfd (a VMM of an older
/// release): drops the pending termination signals and unblocks them, so the program's own
/// handlers work. Returns the signals dropped.
pub fn unblock_termination_signals_dropping_pending() -> Vec<nix::sys::signal::Signal> {
    let set = termination_sigset();
    let mut dropped = Vec::new();
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        // SAFETY: sigtimedwait with a zero timeout only takes a pending signal of `set`.
        let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &zero) };
        match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) if sig > 0 => dropped.push(s),
            _ => break,
        }
    }
    let _ = set.thread_unblock();
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{WaitPidFlag, WaitStatus};

    #[test]
    fn failed_exec_reports_and_restores() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let fd = w.as_raw_fd();
        let plan = ExecPlan::new(
            ExecTarget::Path(c"/nonexistent/program".into()),
            &["x".to_string()],
            &[("CPR_TEST", "1".into())],
            &[],
            vec![fd],
        )
        .unwrap();
        let err = plan.exec();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        assert!(!fds::is_cloexec(fd).unwrap());
        plan.restore_cloexec();
        assert!(fds::is_cloexec(fd).unwrap());
        drop(r);
    }

    #[test]
    fn teardown_helper_lives_until_released() {
        let helper = TeardownHelper::spawn().unwrap();
        let pid = helper.pid();
        assert_eq!(
            waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)),
            Ok(WaitStatus::StillAlive),
            "the helper must wait for the exec"
        );
        // It lowers itself to idle priority on its own, soon after it starts.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // SAFETY: querying the policy of our own live (unreaped) child.
        while unsafe { libc::sched_getscheduler(pid) } != libc::SCHED_IDLE {
            assert!(
                std::time::Instant::now() < deadline,
                "the helper never switched to SCHED_IDLE"
            );
            std::thread::yield_now();
        }
        drop(helper); // releases and reaps
        // The pid is reaped, so it is no longer our child.
        assert_eq!(
            waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)),
            Err(Errno::ECHILD)
        );
    }

    #[test]
    fn rejects_nul_and_empty() {
        assert!(matches!(
            ExecPlan::new(ExecTarget::Fd(3), &[], &[], &[], vec![]),
            Err(ExecError::Empty)
        ));
        assert!(ExecPlan::new(ExecTarget::Fd(3), &["a\0b".into()], &[], &[], vec![]).is_err());
    }
}
