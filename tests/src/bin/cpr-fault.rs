//! `cpr-fault`: a fault-injection wrapper for cpr-exec live-update tests.
//!
//! ```text
//! cpr-fault [--swap A,B] [--move FD] [--replace-ram FD] [--corrupt-channel]
//!           [--corrupt-file PATH] [--close-exe PATH] [--touch PATH] [--sigterm]
//!           -- PROGRAM [ARGS...]
//! ```
//!
//! Put it first in `cpr-exec-command`, in front of `cpr-shim` (or the new VMM): the
//! old VMM executes it with the preserved fds and the CPR channel inherited; it
//! damages what it was asked to, in its own process (which is the VMM's process),
//! then executes PROGRAM with everything else unchanged (same environment, every
//! other fd still open). The receiver must notice and roll back.
//!
//! - `--swap A,B`: fds A and B trade places.
//! - `--move FD`: FD is moved to a free number >= 100 (FD itself is closed).
//! - `--replace-ram FD`: FD becomes a fresh memfd with the same name but half the
//!   size; the original stays open at a free number >= 100.
//! - `--corrupt-channel`: flips bytes in the middle of the CPR state memfd named by
//!   `VMM_CPR_EXEC_STATE` (through `/proc/self/fd/N`).
//! - `--corrupt-file PATH`: flips one byte in the middle of PATH (the state file).
//! - `--close-exe PATH`: closes every fd open on the file PATH (the previous VMM's binary,
//!   which the old VMM keeps open for a rollback), so a rollback cannot execute it.
//! - `--touch PATH`: sets PATH's modification time to now (its change time follows), as a
//!   write would, without changing its bytes: the new VMM binary the old VMM hashed before the
//!   stop then looks changed to the shim, which must hash it again.
//! - `--sigterm`: sends SIGTERM to its own process (the VMM's) in the middle of the update, as
//!   an operator or a service manager might; the VMM keeps it blocked, so it stays pending.
//!
//! Each action is reported on stderr. Exit status 2 means the wrapper itself failed.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

/// Lowest fd number the wrapper moves things to, far above anything a VMM uses.
const MOVED_FD_BASE: RawFd = 100;

enum Action {
    Swap(RawFd, RawFd),
    Move(RawFd),
    ReplaceRam(RawFd),
    CorruptChannel,
    CorruptFile(String),
    CloseExe(String),
    Touch(String),
    SigTerm,
}

fn parse_fd(text: &str) -> Result<RawFd, String> {
    text.parse()
        .ok()
        .filter(|fd: &RawFd| *fd >= 0)
        .ok_or_else(|| format!("{text:?} is not an fd number"))
}

fn parse_args(args: &[String]) -> Result<(Vec<Action>, Vec<String>), String> {
    let mut actions = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let option = args[i].as_str();
        let mut value = || {
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| format!("{option} needs a value"))
        };
        match option {
            "--" => break,
            "--swap" => {
                let v = value()?;
                let (a, b) = v
                    .split_once(',')
                    .ok_or_else(|| format!("--swap {v}: expected A,B"))?;
                actions.push(Action::Swap(parse_fd(a)?, parse_fd(b)?));
            }
            "--move" => actions.push(Action::Move(parse_fd(&value()?)?)),
            "--replace-ram" => actions.push(Action::ReplaceRam(parse_fd(&value()?)?)),
            "--corrupt-channel" => actions.push(Action::CorruptChannel),
            "--corrupt-file" => actions.push(Action::CorruptFile(value()?)),
            "--close-exe" => actions.push(Action::CloseExe(value()?)),
            "--touch" => actions.push(Action::Touch(value()?)),
            "--sigterm" => actions.push(Action::SigTerm),
            other => return Err(format!("unknown option {other}")),
        }
        i += 1;
    }
    match args.get(i) {
        Some(dashes) if dashes == "--" => Ok((actions, args[i + 1..].to_vec())),
        _ => Err("missing -- PROGRAM [ARGS...]".into()),
    }
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// `fcntl(fd, F_DUPFD, MOVED_FD_BASE)`: a copy of `fd` at a free number >= 100,
/// inheritable across exec.
fn dup_high(fd: RawFd) -> Result<RawFd, String> {
    // SAFETY: F_DUPFD only creates a new descriptor; an invalid fd yields EBADF.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD, MOVED_FD_BASE) };
    if new < 0 {
        return Err(os_error(&format!("duplicating fd {fd}")));
    }
    Ok(new)
}

/// `dup2(from, to)`; the copy at `to` is inheritable.
fn dup_onto(from: RawFd, to: RawFd) -> Result<(), String> {
    // Rearranging the descriptor table is exactly what this program exists to do.
    // SAFETY: dup2 only rearranges this process's descriptor table.
    if unsafe { libc::dup2(from, to) } < 0 {
        return Err(os_error(&format!("dup2({from}, {to})")));
    }
    Ok(())
}

fn close(fd: RawFd) {
    // SAFETY: closing a descriptor this wrapper created or was asked to move.
    unsafe { libc::close(fd) };
}

fn swap(a: RawFd, b: RawFd) -> Result<(), String> {
    let tmp = dup_high(a)?;
    dup_onto(b, a)?;
    dup_onto(tmp, b)?;
    close(tmp);
    eprintln!("cpr-fault: swapped fds {a} and {b}");
    Ok(())
}

fn move_fd(fd: RawFd) -> Result<(), String> {
    let new = dup_high(fd)?;
    close(fd);
    eprintln!("cpr-fault: moved fd {fd} to {new}");
    Ok(())
}

fn replace_ram(fd: RawFd) -> Result<(), String> {
    let link =
        std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|e| format!("fd {fd}: {e}"))?;
    let link = link.to_string_lossy();
    let name = link
        .strip_prefix("/memfd:")
        .map(|rest| rest.strip_suffix(" (deleted)").unwrap_or(rest))
        .ok_or_else(|| format!("fd {fd} is {link}, not a memfd"))?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the buffer on success, and it is only read then.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } < 0 {
        return Err(os_error(&format!("fstat of fd {fd}")));
    }
    // SAFETY: fstat succeeded, so the struct is initialised.
    let size = unsafe { st.assume_init() }.st_size;
    let kept = dup_high(fd)?;
    let cname = CString::new(name).map_err(|_| "memfd name has a NUL".to_string())?;
    // SAFETY: a valid NUL-terminated name; the new fd is owned here.
    let fresh = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_ALLOW_SEALING) };
    if fresh < 0 {
        return Err(os_error("memfd_create"));
    }
    let new_size = size / 2;
    // SAFETY: resizing the memfd just created.
    if unsafe { libc::ftruncate(fresh, new_size) } < 0 {
        return Err(os_error("ftruncate"));
    }
    dup_onto(fresh, fd)?;
    close(fresh);
    eprintln!(
        "cpr-fault: fd {fd} is now a fresh {new_size}-byte memfd '{name}'; \
         the original {size}-byte one is kept at fd {kept}"
    );
    Ok(())
}

fn flip_middle(path: &str, what: &str) -> Result<(), String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{what} {path}: {e}"))?;
    let len = file
        .metadata()
        .map_err(|e| format!("{what} {path}: {e}"))?
        .len();
    if len == 0 {
        return Err(format!("{what} {path} is empty"));
    }
    let offset = len / 2;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset)
        .map_err(|e| format!("reading {what}: {e}"))?;
    let flipped = [byte[0] ^ 0xFF];
    file.write_all_at(&flipped, offset)
        .map_err(|e| format!("writing {what}: {e}"))?;
    eprintln!(
        "cpr-fault: flipped the byte at offset {offset} of {what} {path} ({:#04x} -> {:#04x})",
        byte[0], flipped[0]
    );
    Ok(())
}

fn corrupt_channel() -> Result<(), String> {
    let fd = std::env::var("VMM_CPR_EXEC_STATE")
        .map_err(|_| "VMM_CPR_EXEC_STATE is not set".to_string())?;
    let fd = parse_fd(fd.trim())?;
    flip_middle(&format!("/proc/self/fd/{fd}"), "the CPR state channel")
}

fn close_exe(path: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let wanted = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    let fds = cpr_tests::list_fds(std::process::id()).map_err(|e| format!("listing fds: {e}"))?;
    let closed: Vec<RawFd> = fds
        .iter()
        .filter(|open| {
            std::fs::metadata(format!("/proc/self/fd/{}", open.fd))
                .is_ok_and(|m| m.dev() == wanted.dev() && m.ino() == wanted.ino())
        })
        .map(|open| open.fd)
        .collect();
    if closed.is_empty() {
        return Err(format!("no fd is open on {path}"));
    }
    for fd in &closed {
        close(*fd);
    }
    eprintln!("cpr-fault: closed fds {closed:?}, open on {path}");
    Ok(())
}

fn run(action: &Action) -> Result<(), String> {
    match action {
        Action::Swap(a, b) => swap(*a, *b),
        Action::Move(fd) => move_fd(*fd),
        Action::ReplaceRam(fd) => replace_ram(*fd),
        Action::CorruptChannel => corrupt_channel(),
        Action::CorruptFile(path) => flip_middle(path, "file"),
        Action::CloseExe(path) => close_exe(path),
        Action::SigTerm => {
            // SAFETY: sending a signal to this process; no memory involved.
            if unsafe { libc::kill(libc::getpid(), libc::SIGTERM) } != 0 {
                return Err(os_error("kill(SIGTERM)"));
            }
            eprintln!("cpr-fault: sent SIGTERM to pid {}", std::process::id());
            Ok(())
        }
        Action::Touch(path) => {
            std::fs::File::open(path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()))
                .map_err(|e| format!("touching {path}: {e}"))?;
            eprintln!("cpr-fault: touched {path}");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (actions, program) = match parse_args(&args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("cpr-fault: {e}");
            return ExitCode::from(2);
        }
    };
    let Some((name, rest)) = program.split_first() else {
        eprintln!("cpr-fault: no PROGRAM after --");
        return ExitCode::from(2);
    };
    for action in &actions {
        if let Err(e) = run(action) {
            eprintln!("cpr-fault: {e}");
            return ExitCode::from(2);
        }
    }
    let error = Command::new(name).args(rest).exec();
    eprintln!("cpr-fault: executing {name}: {error}");
    ExitCode::from(2)
}
