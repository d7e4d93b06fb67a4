//! The rescue guard: keeps the guest when the program a cpr-exec update executes dies or hangs
//! before the guest runs again, without needing that program's cooperation.
//!
//! Rollback covers a new VMM that fails, or crashes with a signal it can catch. A process that
//! is SIGKILLed (by an operator, the OOM killer), or that is not our VMM at all and never
//! resumes the guest, runs none of our code. So for the duration of an update a separate small
//! process, the guard, holds what a rollback needs:
//!
//! ```text
//! old VMM: spawn guard (before the stop) ──── vmm --cpr-rescue-guard FD (own process)
//!          stop, save, prepare the exec
//!          hand over: CPR state + every preserved fd ──▶ holds duplicates of all of them
//!          exec (the guard's socket crosses it,              watches the process (pidfd),
//!          named by VMM_CPR_RESCUE)                          its executable, the deadline
//! shim ──▶ new VMM: restore, resume the guest,
//!          then "resumed" on the socket ─────────────▶ exits, dropping everything
//! ```
//!
//! - The process ends before it reports (SIGKILL, a crash nothing caught, `exit`): the guard
//!   places the fds where the CPR state recorded them and executes the previous VMM as a
//!   rollback, which restores the guest from the same state and reports the update `failed` on
//!   the same QMP socket. The guest keeps its RAM, devices and sockets; the PID becomes the
//!   guard's.
//! - The deadline (`x-cpr-deadline-ms`) passes first: a VMM of this release (its ELF note has
//!   [`FEATURE_RESCUE`]) is asked with SIGUSR2 to roll back in its own process; if it has not
//!   reported within a grace period, or the process is something else (a program that is not
//!   our VMM, a hung shim), it is killed and rescued as above.
//! - The process lets go of the socket without reporting while still alive: a VMM of an older
//!   release that does not know the guard. The guard cannot judge it and leaves.
//!
//! Nothing of this runs while no update is in flight, and nothing is left after one.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cpr_common::compat::{self, FEATURE_RESCUE};
use cpr_common::cpr::{self, CprState, FdKind};
use cpr_common::fds;
use cpr_common::transfer::{self, Kind};
use serde::{Deserialize, Serialize};

/// Names the fd of the guard's socket in a process started by a live update.
pub const RESCUE_ENV: &str = "VMM_CPR_RESCUE";
/// `vmm --cpr-rescue-guard FD`: the guard's entry point (the first argument, nothing else).
pub const GUARD_ARG: &str = "--cpr-rescue-guard";
/// The deadline when `x-cpr-deadline-ms` is not set.
pub const DEFAULT_DEADLINE_MS: u64 = 5000;
/// How long a VMM asked to roll back (SIGUSR2) has before it is killed and rescued.
const SELF_ROLLBACK_GRACE: Duration = Duration::from_secs(3);
/// How often the guard looks at the process's executable.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// An update that never hands over (it failed before its exec) closes the socket; this bounds
/// the wait anyway.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);
/// Process exit closes its fds just before it can be waited for: an EOF is followed by the
/// pidfd becoming readable within this time if the process died.
const EXIT_SETTLE: Duration = Duration::from_millis(500);

/// What the old VMM tells the guard, with its fds attached (in `fd_names` order).
#[derive(Debug, Serialize, Deserialize)]
struct GuardOrder {
    pid: u32,
    /// 0: no deadline, only the death of the process is watched.
    deadline_ms: u64,
    /// The program the update executes, for messages.
    program: String,
    /// The encoded CPR state (attempt: update).
    cpr_state: Vec<u8>,
    fd_names: Vec<String>,
}

/// The old VMM's handle on its guard.
pub struct RescueGuard {
    socket: UnixStream,
}

#[derive(Debug, thiserror::Error)]
pub enum RescueError {
    #[error("creating the guard's socket: {0}")]
    Socket(std::io::Error),
    #[error("starting the guard process: {0}")]
    Spawn(std::io::Error),
    #[error("encoding the guard's order: {0}")]
    Encode(String),
    #[error("handing the update to the guard: {0}")]
    Send(transfer::TransferError),
}

impl RescueGuard {
    /// Starts the guard (this same executable); done before the guest stops, so it costs the
    /// blackout nothing.
    pub fn spawn() -> Result<RescueGuard, RescueError> {
        let (ours, theirs) = UnixStream::pair().map_err(RescueError::Socket)?;
        // The child must inherit its end; every other fd of this process stays close-on-exec.
        fds::set_cloexec(theirs.as_raw_fd(), false)
            .map_err(|e| RescueError::Socket(std::io::Error::other(e.to_string())))?;
        let spawned = std::process::Command::new("/proc/self/exe")
            .arg0(OsStr::new("vmm-rescue-guard"))
            .args([GUARD_ARG, &theirs.as_raw_fd().to_string()])
            .spawn();
        drop(theirs);
        spawned.map_err(RescueError::Spawn)?;
        // The child is reaped by the SIGCHLD handler of whichever VMM runs in this process then.
        Ok(RescueGuard { socket: ours })
    }

    /// Gives the guard everything a rollback needs; `fds` are `(name, fd)` of the CPR state's
    /// preserved fds. Returns the fd to pass across the exec (named by [`RESCUE_ENV`]).
    pub fn hand_over(
        &self,
        state: &CprState,
        cpr_state: &[u8],
        deadline_ms: u64,
    ) -> Result<RawFd, RescueError> {
        // The teardown helper's pipe is the one fd the guard must not hold: the helper frees
        // the old address space when it closes.
        let kept: Vec<_> = state
            .fds
            .iter()
            .filter(|f| f.kind != FdKind::TeardownRelease)
            .collect();
        let order = GuardOrder {
            pid: std::process::id(),
            deadline_ms,
            program: state.exec_program.clone(),
            cpr_state: cpr_state.to_vec(),
            fd_names: kept.iter().map(|f| f.name.clone()).collect(),
        };
        let payload = bincode::serde::encode_to_vec(&order, bincode::config::standard())
            .map_err(|e| RescueError::Encode(e.to_string()))?;
        let raw: Vec<RawFd> = kept.iter().map(|f| f.fd).collect();
        transfer::send(&self.socket, Kind::Hello, &payload, &raw).map_err(RescueError::Send)?;
        Ok(self.socket.as_raw_fd())
    }

    /// The exec failed and this VMM keeps the guest: the guard can go.
    pub fn release(self) {
        let _ = transfer::send(&self.socket, Kind::Commit, &[], &[]);
    }
}

/// The new VMM's side: the guard's socket, taken from [`RESCUE_ENV`] at start (while the
/// process is single-threaded) and kept until the guest runs.
pub struct GuardLink {
    socket: UnixStream,
}

impl GuardLink {
    /// Takes the socket named by [`RESCUE_ENV`] and unsets the variable. An fd that is not a
    /// socket is left alone (and ignored).
    pub fn take_from_env() -> Option<GuardLink> {
        let value = std::env::var(RESCUE_ENV).ok();
        // Called at the start of main, before any thread exists.
        // SAFETY: so nothing reads the environment concurrently.
        unsafe { std::env::remove_var(RESCUE_ENV) };
        let raw: RawFd = value?.trim().parse().ok().filter(|fd| *fd > 2)?;
        let id = fds::identity(raw, "rescue guard").ok()?;
        if id.file_type != libc::S_IFSOCK {
            log::warn!("{RESCUE_ENV}={raw} is not a socket; ignored");
            return None;
        }
        // The fd is open and a socket (checked just above), inherited for this purpose only.
        // SAFETY: nothing else in this process owns it.
        let socket = unsafe { UnixStream::from_raw_fd(raw) };
        let _ = fds::set_cloexec(raw, true);
        Some(GuardLink { socket })
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// The guest runs: the guard can go.
    pub fn report_resumed(self) {
        if let Err(e) = transfer::send(&self.socket, Kind::Commit, &[], &[]) {
            log::warn!("telling the update's rescue guard the guest runs: {e}");
        }
    }
}

// --- the guard process --------------------------------------------------------------------

enum Outcome {
    /// The VMM reported the guest running.
    Resumed,
    /// Not ours to judge any more (said why).
    LetGo(String),
    /// Restart the previous VMM, for this reason.
    Rescue(String),
}

/// `vmm --cpr-rescue-guard FD`.
pub fn guard_main(args: &[String]) -> ExitCode {
    let Some(raw) = args.get(2).and_then(|a| a.parse::<RawFd>().ok()) else {
        eprintln!("vmm: {GUARD_ARG} is started by a VMM during a live update, with an fd");
        return ExitCode::from(2);
    };
    if !matches!(fds::identity(raw, "rescue guard"), Ok(i) if i.file_type == libc::S_IFSOCK) {
        eprintln!("vmm rescue guard: fd {raw} is not the socket of a live update");
        return ExitCode::from(2);
    }
    // Checked open and a socket just above; passed by the parent for this purpose.
    // SAFETY: nothing else in this process owns it.
    let socket = unsafe { UnixStream::from_raw_fd(raw) };
    let _ = fds::set_cloexec(raw, true);
    let _ = socket.set_read_timeout(Some(ORDER_TIMEOUT));
    let frame = match transfer::expect(&socket, Kind::Hello) {
        Ok(f) => f,
        // The update failed before its exec (or never came): nothing to guard.
        Err(_) => return ExitCode::SUCCESS,
    };
    // Bounded like every decoder here: a length in the payload never makes the guard allocate
    // more than the frame could hold.
    let limited = bincode::config::standard().with_limit::<{ transfer::MAX_PAYLOAD as usize }>();
    let order: GuardOrder = match bincode::serde::decode_from_slice(&frame.payload, limited) {
        Ok((o, _)) => o,
        Err(e) => {
            eprintln!("vmm rescue guard: unreadable order ({e}); not guarding this update");
            return ExitCode::from(1);
        }
    };
    match watch(&socket, &order) {
        Outcome::Resumed => ExitCode::SUCCESS,
        Outcome::LetGo(why) => {
            eprintln!(
                "vmm rescue guard: {why}; no longer guarding pid {}",
                order.pid
            );
            ExitCode::SUCCESS
        }
        Outcome::Rescue(reason) => {
            drop(socket);
            rescue(order, frame.fds, &reason)
        }
    }
}

/// An open pidfd for `pid` (readable once the process has ended).
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall just returned this new fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Waits up to `timeout` for `fd` to become readable.
fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, count 1.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0 && p.revents != 0
}

/// What the process runs now, as (device, inode) of its executable and its note, if any.
fn running(pid: u32) -> Option<((u64, u64), Option<compat::Compat>)> {
    let path = format!("/proc/{pid}/exe");
    let meta = std::fs::metadata(&path).ok()?;
    let note = File::open(&path)
        .ok()
        .and_then(|f| compat::read_note(&f).ok());
    Some(((meta.dev(), meta.ino()), note))
}

fn describe(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "an unknown program".into())
}

fn watch(socket: &UnixStream, order: &GuardOrder) -> Outcome {
    let pid = order.pid;
    let Ok(pidfd) = pidfd_open(pid) else {
        return Outcome::Rescue(format!(
            "the process (pid {pid}) ended before the guest ran again"
        ));
    };
    let started = Instant::now();
    let mut deadline =
        (order.deadline_ms > 0).then(|| started + Duration::from_millis(order.deadline_ms));
    let mut asked_to_roll_back = false;
    let mut seen: Option<(u64, u64)> = None;
    let mut ours = false;
    let mut last_program = order.program.clone();
    loop {
        let mut polled = [
            libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds, count 2.
        unsafe { libc::poll(polled.as_mut_ptr(), 2, POLL_INTERVAL.as_millis() as i32) };
        let ended = |detail: &str| {
            Outcome::Rescue(format!(
                "the process (pid {pid}, running {last_program}) ended {detail}before the guest ran again"
            ))
        };
        if polled[1].revents != 0 {
            return ended("");
        }
        if polled[0].revents != 0 {
            let _ = socket.set_read_timeout(Some(Duration::from_secs(1)));
            match transfer::recv(socket) {
                Ok(f) if f.kind == Kind::Commit => return Outcome::Resumed,
                _ => {
                    if readable(pidfd.as_raw_fd(), EXIT_SETTLE) {
                        return ended("");
                    }
                    return Outcome::LetGo(format!(
                        "the process runs {last_program}, which let go of the guard without saying the guest runs (a VMM of a release without the guard)"
                    ));
                }
            }
        }
        if let Some((id, note)) = running(pid)
            && seen != Some(id)
        {
            seen = Some(id);
            last_program = describe(pid);
            match note {
                Some(c) if !c.has(FEATURE_RESCUE) => {
                    return Outcome::LetGo(format!(
                        "the update runs VMM version {} ({last_program}), which does not report to the guard",
                        c.version
                    ));
                }
                Some(_) => ours = true,
                None => ours = false,
            }
        }
        if let Some(at) = deadline
            && Instant::now() >= at
        {
            if ours && !asked_to_roll_back {
                eprintln!(
                    "vmm rescue guard: the update has not resumed the guest after {} ms; asking pid {pid} ({last_program}) to roll back",
                    order.deadline_ms
                );
                // SAFETY: sending a signal to a process; no memory involved.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR2) };
                asked_to_roll_back = true;
                deadline = Some(Instant::now() + SELF_ROLLBACK_GRACE);
                continue;
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            readable(pidfd.as_raw_fd(), Duration::from_secs(10));
            return Outcome::Rescue(format!(
                "the update had not resumed the guest {} ms after it began (pid {pid} was running {last_program}); the guard killed it",
                started.elapsed().as_millis()
            ));
        }
    }
}

/// Executes the previous VMM as a rollback with the fds where the CPR state recorded them.
/// Returns only if that is impossible.
fn rescue(order: GuardOrder, received: Vec<OwnedFd>, reason: &str) -> ExitCode {
    let mut state = match cpr::decode(order.cpr_state) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "vmm rescue guard: {reason}, and the CPR state is unreadable ({e}): the guest is lost"
            );
            return ExitCode::from(1);
        }
    };
    state.fds.retain(|f| order.fd_names.contains(&f.name));
    let reason = format!(
        "{reason}; the update's guard restarted the previous VMM as pid {}",
        std::process::id()
    );
    eprintln!("vmm rescue guard: {reason}");
    // First every received fd above every recorded number, then each down to its number.
    let floor = state.fds.iter().map(|f| f.fd).max().unwrap_or(2) + 1;
    let mut high = Vec::new();
    for (name, fd) in order.fd_names.iter().zip(received) {
        // SAFETY: F_DUPFD_CLOEXEC makes a new fd from one we own; it returns -1 on error.
        let moved = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
        if moved >= 0 {
            // SAFETY: the fcntl just created it; nothing else owns it.
            high.push((name.clone(), unsafe { OwnedFd::from_raw_fd(moved) }));
        }
    }
    for (name, fd) in high {
        if let Some(rec) = state.fds.iter().find(|f| f.name == name) {
            // The previous VMM finds the fd at its recorded number (and, being a rollback, also
            // by device and inode wherever it is).
            // SAFETY: dup2 between two fds; no memory is involved.
            unsafe { libc::dup2(fd.as_raw_fd(), rec.fd) };
        }
        // The high copy is close-on-exec and goes; the copy at the recorded number stays.
        drop(fd);
    }
    match cpr::rollback_plan(&state, None, &reason, &[]) {
        Ok(plan) => {
            let err = plan.exec();
            eprintln!(
                "vmm rescue guard: executing {} failed ({err}): the guest is lost",
                plan.program()
            );
        }
        Err(e) => eprintln!("vmm rescue guard: {e}: the guest is lost"),
    }
    ExitCode::from(1)
}
