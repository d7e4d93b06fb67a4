//! cpr-exec: live update by exec, in the same process, guest RAM kept in place.
//!
//! Old side ([`prepare_exec`]): with the vCPUs stopped and the machine state written to the state
//! file (no RAM pages), describe every fd that must survive (RAM memfds, the QMP listener and
//! clients, console fds, the old executable for rollback) in a [`CprState`], put it in the
//! channel memfd, and exec the cpr-exec-command. If the exec fails, [`PreparedExec::undo`] puts
//! everything back and the caller resumes the guest.
//!
//! New side ([`Incoming`]): before creating any memory, take the inherited fds by name, check them
//! with the same code the shim uses ([`cpr_common::fds::check_preserved`]), map the RAM memfds
//! (no copy), and keep a rollback exec armed until the guest runs again: any failure before that,
//! including a crash, re-executes the previous VMM, which restores the guest from the same state.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::{Duration, Instant, SystemTime};

use cpr_common::compat::CompatNote;
use cpr_common::cpr::{
    self, CPR_STATE_ENV, CprState, FALLBACK_ENV, Fallback, Inherited, PreservedFd,
};
use cpr_common::cpr::{Attempt, FdKind};
use cpr_common::exec::TeardownHelper;
use cpr_common::exec::{ExecPlan, ExecTarget};
use cpr_common::fds;
use cpr_common::target::{CHECKED_TARGET_ENV, CheckedTarget};
use cpr_common::timing::{PhaseLog, monotonic_ns};

use crate::cli::CprTestFault;
use crate::control::{IncomingError, StartError, Vmm};
use crate::devices::{HandedOverFds, HostFd};
use crate::machine::Source;
use crate::memory::RegionLayout;
use crate::memory::{GuestRam, MemoryError, RAM_FILE_NAME};
use crate::migration::MigrationError;
use crate::migration::format::{RamContents, SavedRun, StateFile, StateFileError};
use crate::migration::format::{encode_state, write_state_bytes};
use crate::migration::rescue::{GuardLink, RESCUE_ENV, RescueGuard};
use crate::migration::{MigrationRecord, MigrationStatus};
use crate::qmp::protocol::{CprPhase, CprUpdateInfo, EventKind, QmpError, RunState};

/// The ELF note that tells `cpr-shim` which formats this binary reads (see
/// [`cpr_common::compat`]); it costs the shim a few small reads, not a run of the binary.
#[used]
#[unsafe(link_section = ".note.cpr-vmm")]
pub static COMPAT_NOTE: CompatNote = CompatNote::new(
    (
        oldest(super::format::STATE_FILE_FORMAT.readable_versions),
        super::format::STATE_FORMAT_VERSION,
    ),
    (
        oldest(cpr::CPR_STATE_FORMAT.readable_versions),
        cpr::CPR_STATE_FORMAT.current_version,
    ),
    crate::VERSION,
)
.with_features(cpr_common::compat::FEATURE_RESCUE | cpr_common::compat::FEATURE_SIGNALS);

const fn oldest(versions: &[u32]) -> u32 {
    let mut min = u32::MAX;
    let mut i = 0;
    while i < versions.len() {
        if versions[i] < min {
            min = versions[i];
        }
        i += 1;
    }
    min
}

#[derive(Debug, thiserror::Error)]
pub enum CprExecError {
    #[error("guest RAM region '{name}' is not a shareable memfd: {detail}")]
    RamNotShareable { name: String, detail: String },
    #[error("preparing the CPR state: {0}")]
    Cpr(#[from] cpr::CprError),
    #[error("preparing the exec: {0}")]
    Exec(#[from] cpr_common::exec::ExecError),
    #[error("opening this VMM's own executable for rollback: {0}")]
    OwnExe(std::io::Error),
    #[error("describing fd {name}: {source}")]
    Describe {
        name: String,
        #[source]
        source: fds::FdError,
    },
    #[error("inherited fd check failed: {0}")]
    FdCheck(#[from] fds::FdError),
    #[error("the CPR state lists no memfd for RAM region '{0}'")]
    MissingRegion(String),
    #[error(
        "the previous VMM handed over guest RAM in a memory-backend-file, but this command line has none: give the same -object memory-backend-file,...,share=on and -machine memory-backend=ID"
    )]
    RamFileNotOnCommandLine,
    #[error("inherited RAM region '{name}' is {found} bytes, the state file says {expected}")]
    RegionSize {
        name: String,
        expected: u64,
        found: u64,
    },
    #[error("mapping inherited RAM: {0}")]
    Memory(#[from] MemoryError),
    #[error("two preserved fds are both named '{0}'")]
    DuplicateName(String),
    #[error("keeping a copy of the state for rollback: {0}")]
    StateCopy(String),
    #[error("the new VMM's command line {0}")]
    CommandLine(String),
}

/// What the new command line must keep of what the running VMM hands over, checked by the new
/// VMM before it builds anything (a mismatch rolls back): every inherited monitor or console
/// socket is served on at its path, and the state comes from where the CPR state says.
pub fn check_command_line(
    state: &CprState,
    config: &crate::cli::Config,
) -> Result<(), CprExecError> {
    use crate::cli::{IncomingSpec, SerialSpec};
    let refuse = |why: String| Err(CprExecError::CommandLine(why));
    for rec in &state.fds {
        let bound = || bound_path(rec.fd);
        match rec.kind {
            FdKind::QmpListener => match &config.qmp {
                None => {
                    return refuse(format!(
                        "has no -qmp, but the running VMM's QMP monitor{} is handed over: repeat its -qmp option, or the VM could no longer be managed",
                        bound().map(|p| format!(" on {p}")).unwrap_or_default()
                    ));
                }
                Some(q) => {
                    if let Some(p) = bound()
                        && std::path::Path::new(&p) != q.path
                    {
                        return refuse(format!(
                            "gives -qmp {}, but the monitor handed over listens on {p}",
                            q.path.display()
                        ));
                    }
                }
            },
            FdKind::ConsoleListener => {
                let ours = match &config.serial {
                    SerialSpec::UnixServer(p) => Some(p.clone()),
                    _ => None,
                };
                let theirs = bound();
                if ours.as_deref() != theirs.as_deref().map(std::path::Path::new) {
                    return refuse(format!(
                        "does not serve the serial console socket{} handed over: repeat -serial unix:PATH,server",
                        theirs.map(|p| format!(" {p}")).unwrap_or_default()
                    ));
                }
            }
            _ => {}
        }
    }
    match &config.incoming {
        None => Ok(()),
        Some(IncomingSpec::File(p)) if same_file_path(p, &state.state_file) => Ok(()),
        Some(IncomingSpec::File(p)) => refuse(format!(
            "says -incoming file:{}, but the state of this update is in {} (leave -incoming out, or name that file)",
            p.display(),
            state.state_file
        )),
        Some(_) => refuse(
            "asks for another incoming migration; a live update's state comes with the exec (-incoming file:STATE or none)"
                .into(),
        ),
    }
}

/// Where a listening UNIX socket is bound.
fn bound_path(fd: RawFd) -> Option<String> {
    use nix::sys::socket::{UnixAddr, getsockname};
    let addr: UnixAddr = getsockname(fd).ok()?;
    addr.path().map(|p| p.display().to_string())
}

fn same_file_path(a: &Path, b: &str) -> bool {
    let b = Path::new(b);
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// The `--sha256` value given to cpr-shim in a cpr-exec command, if any: `Some(None)` when the
/// option is there without a value. The shim's options are those before its `--`.
fn shim_sha256(shim_args: &[String]) -> Option<Option<&str>> {
    let mut args = shim_args.iter();
    while let Some(a) = args.next() {
        match a.strip_prefix("--sha256") {
            Some("") => return Some(args.next().map(String::as_str)),
            Some(rest) if rest.starts_with('=') => return Some(rest.strip_prefix('=')),
            _ => {}
        }
    }
    None
}

fn is_sha256_hex(v: &str) -> bool {
    v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `migrate-set-parameters`' check of a cpr-exec command: a malformed `--sha256` for the shim is
/// refused now, not after the guest has stopped.
pub fn check_command_syntax(command: &[String]) -> Result<(), CprExecError> {
    let shim_part = command
        .iter()
        .position(|a| a == "--")
        .map_or(command, |i| &command[..i]);
    match shim_sha256(shim_part) {
        Some(value) if !value.is_some_and(is_sha256_hex) => {
            Err(CprExecError::CommandLine(format!(
                "gives cpr-shim --sha256 {}: it takes the target binary's SHA-256 as 64 hex digits",
                value.unwrap_or("(nothing)")
            )))
        }
        _ => Ok(()),
    }
}

/// Where cpr-shim is in a cpr-exec command (possibly behind a wrapper), with its own options
/// and the target's argv.
fn shim_invocation(command: &[String]) -> Option<(&[String], &[String])> {
    let at = command.iter().position(|a| {
        Path::new(a)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("cpr-shim"))
    })?;
    let rest = &command[at + 1..];
    let dashes = rest.iter().position(|a| a == "--")?;
    Some((&rest[..dashes], &rest[dashes + 1..]))
}

/// Whether the first program of a cpr-exec command reads termination signals left pending (and
/// blocked) across the exec: cpr-shim does and decides for its own target; a VMM whose note has
/// `FEATURE_SIGNALS` does; a VMM of an older release does not, and gets them unblocked. A
/// program that is not a VMM (a wrapper that executes one) keeps them as they are.
pub fn keeps_signals_blocked(command: &[String]) -> bool {
    if shim_invocation(command).is_some() {
        return true;
    }
    let Some(program) = command.first() else {
        return true;
    };
    match cpr_common::target::open_target(program) {
        Ok(t) => cpr_common::compat::read_note(&t.file)
            .map_or(true, |c| c.has(cpr_common::compat::FEATURE_SIGNALS)),
        Err(_) => true,
    }
}

/// The slow part of the shim's check, done before the guest stops: with `cpr-shim --sha256`,
/// resolve the target and hash it now. A mismatch refuses the update with the guest still
/// running. A match is handed to the shim open, with the file's stamp, so the shim only checks
/// that it is unchanged and executes exactly those bytes (see `cpr_common::target`). A target
/// modified in the last seconds is left for the shim to hash (its stamp cannot be trusted yet).
pub fn precheck_target(command: &[String]) -> Result<Option<(CheckedTarget, File)>, CprExecError> {
    let Some((shim_args, target)) = shim_invocation(command) else {
        return Ok(None);
    };
    let Some(Some(expected)) = shim_sha256(shim_args) else {
        return Ok(None);
    };
    let Some(requested) = target.first() else {
        return Ok(None);
    };
    let hashed_at = SystemTime::now();
    // On a thread of its own: the milliseconds of hashing are then not charged to the VMM
    // thread, which a busy host's scheduler would otherwise run less eagerly during the
    // blackout that follows.
    let (requested_owned, expected) = (requested.clone(), expected.to_ascii_lowercase());
    let checked = std::thread::Builder::new()
        .name("hash-target".into())
        .spawn(move || CheckedTarget::check(&requested_owned, &expected))
        .map_err(|e| CprExecError::CommandLine(format!("cannot start hashing the target: {e}")))?
        .join()
        .map_err(|_| CprExecError::CommandLine("hashing the target failed".into()))?;
    let (record, file) = checked.map_err(|e| {
        CprExecError::CommandLine(format!("names a target cpr-shim would refuse: {e}"))
    })?;
    if !record.settled(hashed_at) {
        log::info!(
            "live update: {} changed in the last seconds; cpr-shim will hash it again during the update",
            record.resolved
        );
        return Ok(None);
    }
    Ok(Some((record, file)))
}

/// The old side's check of a cpr-exec command before it stops anything: an `-incoming
/// file:PATH` in it must be the update's state file, and a VMM with a monitor must hand it to a
/// command line that has one (the new VMM checks again, exactly, and rolls back).
pub fn check_exec_command(
    command: &[String],
    state_file: &Path,
    has_monitor: bool,
) -> Result<(), CprExecError> {
    let mut has_qmp = false;
    let mut args = command.iter().peekable();
    while let Some(a) = args.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with('-') => (n, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        match name {
            "-qmp" | "--qmp" => has_qmp = true,
            "-incoming" | "--incoming" => {
                let value = inline.or_else(|| args.peek().map(|v| v.to_string()));
                if let Some(path) = value.as_deref().and_then(|v| v.strip_prefix("file:"))
                    && !same_file_path(Path::new(path), &state_file.display().to_string())
                {
                    return Err(CprExecError::CommandLine(format!(
                        "says -incoming file:{path}, but migrate writes the state to {} (leave -incoming out, or name that file)",
                        state_file.display()
                    )));
                }
            }
            _ => {}
        }
    }
    if has_monitor && !has_qmp {
        return Err(CprExecError::CommandLine(
            "has no -qmp: the QMP monitor would be lost and the VM could no longer be managed (repeat this VMM's -qmp option)"
                .into(),
        ));
    }
    Ok(())
}

/// Refuses cpr-exec when any RAM region is not a sealed memfd that can be inherited.
pub fn check_ram_shareable(ram: &GuestRam) -> Result<(), CprExecError> {
    // A RAM file (memory-backend-file, share=on) is handed over as one fd, checked by identity.
    if ram.backing_file().is_some() {
        return Ok(());
    }
    for region in ram.regions() {
        let rec =
            fds::describe(region.fd(), &region.layout.name, FdKind::GuestRam).map_err(|e| {
                CprExecError::RamNotShareable {
                    name: region.layout.name.clone(),
                    detail: e.to_string(),
                }
            })?;
        fds::check_preserved(&rec).map_err(|e| CprExecError::RamNotShareable {
            name: region.layout.name.clone(),
            detail: e.to_string(),
        })?;
    }
    Ok(())
}

/// The previous VMM's argv for a rollback: its own, restoring from `state_file`.
pub fn fallback_argv(argv: &[String], state_file: &Path) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len() + 2);
    let mut skip_value = false;
    for (i, a) in argv.iter().enumerate() {
        if skip_value {
            skip_value = false;
            continue;
        }
        if i > 0 && (a == "-incoming" || a == "--incoming") {
            skip_value = true;
            continue;
        }
        if i > 0 && (a.starts_with("-incoming=") || a.starts_with("--incoming=")) {
            continue;
        }
        out.push(a.clone());
    }
    out.push("-incoming".into());
    out.push(format!("file:{}", state_file.display()));
    out
}

/// Everything the old VMM needs to exec, prepared while the guest is stopped.
pub struct PreparedExec {
    plan: ExecPlan,
    channel: OwnedFd,
    own_exe: OwnedFd,
    _state_copy: OwnedFd,
    _checked_target: Option<File>,
}

/// Inputs for the CPR state, gathered by the caller from the machine, monitor and console.
pub struct ExecInputs<'a> {
    pub command: &'a [String],
    pub state_file: &'a Path,
    /// The state file's bytes; a sealed copy crosses the exec for the rollback.
    pub state_bytes: &'a [u8],
    pub guest_was_running: bool,
    pub stopped_at_ns: u64,
    pub phases: PhaseLog,
    pub own_argv: &'a [String],
    pub ram: &'a GuestRam,
    /// (kind, name, fd) of the monitor's and console's fds.
    pub other_fds: Vec<(FdKind, String, RawFd)>,
    /// The host fds the machine's devices own.
    pub device_fds: Vec<HostFd>,
    /// The target binary, hashed before the stop ([`precheck_target`]), for the shim.
    pub checked_target: Option<(CheckedTarget, File)>,
    /// The rescue guard started before the stop, and its deadline (0: none).
    pub guard: Option<(&'a RescueGuard, u64)>,
}

/// Builds the CPR state and the exec plan. Nothing is changed yet: the fds stay close-on-exec
/// until [`PreparedExec::exec`].
pub fn prepare_exec(inputs: ExecInputs<'_>) -> Result<PreparedExec, CprExecError> {
    let own_exe = File::open("/proc/self/exe").map_err(CprExecError::OwnExe)?;
    let own_exe_path = std::fs::read_link("/proc/self/exe")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "vmm".into());
    let own_exe = OwnedFd::from(own_exe);
    let mut preserved = Vec::new();
    if let Some(file) = inputs.ram.backing_file() {
        preserved.push(describe(
            file.as_raw_fd(),
            RAM_FILE_NAME,
            FdKind::GuestRamFile,
        )?);
    } else {
        for region in inputs.ram.regions() {
            preserved.push(describe(
                region.fd().as_raw_fd(),
                &region.layout.name,
                FdKind::GuestRam,
            )?);
        }
    }
    for (kind, name, fd) in &inputs.other_fds {
        preserved.push(describe(*fd, name, *kind)?);
    }
    for host in &inputs.device_fds {
        preserved.push(super::describe_device_fd(host).map_err(|source| {
            CprExecError::Describe {
                name: host.name.clone(),
                source,
            }
        })?);
    }
    preserved.push(describe(
        own_exe.as_raw_fd(),
        "fallback-exe",
        FdKind::FallbackExe,
    )?);
    let state_copy = sealed_copy(STATE_COPY_NAME, inputs.state_bytes)?;
    preserved.push(describe(
        state_copy.as_raw_fd(),
        STATE_COPY_NAME,
        FdKind::StateCopy,
    )?);
    for (i, rec) in preserved.iter().enumerate() {
        if preserved[..i].iter().any(|other| other.name == rec.name) {
            return Err(CprExecError::DuplicateName(rec.name.clone()));
        }
    }
    let mut phases = inputs.phases;
    phases.mark("prepare the exec");
    let state = CprState {
        update_id: inputs.stopped_at_ns ^ u64::from(std::process::id()),
        attempt: Attempt::Update,
        fds: preserved,
        state_file: inputs.state_file.display().to_string(),
        guest_was_running: inputs.guest_was_running,
        stopped_at_ns: inputs.stopped_at_ns,
        phases,
        fallback: Fallback {
            exe_fd: own_exe.as_raw_fd(),
            exe_path: own_exe_path,
            version: crate::version_string(),
            argv: fallback_argv(inputs.own_argv, inputs.state_file),
        },
        exec_program: inputs.command.first().cloned().unwrap_or_default(),
        resolved_target: None,
    };
    let bytes = cpr::encode(&state)?;
    let channel = cpr::create_channel(&state)?;
    let mut inherit: Vec<RawFd> = state.fds.iter().map(|f| f.fd).collect();
    inherit.push(channel.as_raw_fd());
    let program = std::ffi::CString::new(inputs.command[0].as_bytes()).map_err(|_| {
        cpr_common::exec::ExecError::Nul {
            what: "the program name".into(),
        }
    })?;
    let mut env = vec![
        (CPR_STATE_ENV, channel.as_raw_fd().to_string()),
        (FALLBACK_ENV, cpr::encode_env_copy(&bytes)),
    ];
    let checked_target = inputs.checked_target.map(|(record, file)| {
        inherit.push(file.as_raw_fd());
        env.push((CHECKED_TARGET_ENV, record.to_env()));
        file
    });
    if let Some((guard, deadline_ms)) = inputs.guard {
        match guard.hand_over(&state, &bytes, deadline_ms) {
            Ok(fd) => {
                inherit.push(fd);
                env.push((RESCUE_ENV, fd.to_string()));
            }
            Err(e) => log::warn!("{e}; this update goes on without a rescue guard"),
        }
    }
    let plan = ExecPlan::new(
        ExecTarget::Path(program),
        inputs.command,
        &env,
        &[CHECKED_TARGET_ENV, RESCUE_ENV],
        inherit,
    )?;
    Ok(PreparedExec {
        plan,
        channel,
        own_exe,
        _state_copy: state_copy,
        _checked_target: checked_target,
    })
}

/// The name of the sealed memfd holding a copy of the state file, for a rollback that finds the
/// file damaged.
pub const STATE_COPY_NAME: &str = "cpr-state-file-copy";

/// A memfd holding `bytes`, sealed against any change.
fn sealed_copy(name: &str, bytes: &[u8]) -> Result<OwnedFd, CprExecError> {
    let err = |e: std::io::Error| CprExecError::StateCopy(e.to_string());
    let memfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .close_on_exec(true)
        .create(name)
        .map_err(|e| CprExecError::StateCopy(e.to_string()))?;
    std::io::Write::write_all(&mut memfd.as_file(), bytes).map_err(err)?;
    memfd
        .add_seals(&[
            memfd::FileSeal::SealWrite,
            memfd::FileSeal::SealShrink,
            memfd::FileSeal::SealGrow,
            memfd::FileSeal::SealSeal,
        ])
        .map_err(|e| CprExecError::StateCopy(e.to_string()))?;
    Ok(OwnedFd::from(memfd.into_file()))
}

fn describe(fd: RawFd, name: &str, kind: FdKind) -> Result<PreservedFd, CprExecError> {
    // SAFETY: `fd` is open for the duration of this call (owned by the caller's objects).
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fds::describe(borrowed, name, kind).map_err(|source| CprExecError::Describe {
        name: name.to_string(),
        source,
    })
}

impl PreparedExec {
    pub fn program(&self) -> &str {
        self.plan.program()
    }

    /// Executes; returns only on failure, with the error and what is needed to undo.
    pub fn exec(self) -> (std::io::Error, Self) {
        let err = self.plan.exec();
        (err, self)
    }

    /// After a failed exec: every fd is close-on-exec again; the channel and the executable fd
    /// are closed when `self` is dropped.
    pub fn undo(self) {
        self.plan.restore_cloexec();
        drop(self.channel);
        drop(self.own_exe);
    }
}

/// The fatal-signal rollback, armed while an incoming update has not resumed the guest.
static ARMED_ROLLBACK: AtomicPtr<ExecPlan> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn rollback_on_fatal_signal(sig: libc::c_int) {
    let plan = ARMED_ROLLBACK.swap(std::ptr::null_mut(), Ordering::SeqCst);
    if !plan.is_null() {
        // `exec` only makes async-signal-safe syscalls.
        // SAFETY: the pointer came from Box::into_raw in `arm` and was swapped out: we own it.
        let _ = unsafe { &*plan }.exec();
    }
    // The exec failed or nothing was armed: die of the original signal.
    // SAFETY: restoring the default action and re-raising are async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// The rollback the update's rescue guard asks for (SIGUSR2) when its deadline passes.
static ARMED_DEADLINE_ROLLBACK: AtomicPtr<ExecPlan> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn rollback_on_deadline(_sig: libc::c_int) {
    let plan = ARMED_DEADLINE_ROLLBACK.swap(std::ptr::null_mut(), Ordering::SeqCst);
    if !plan.is_null() {
        // `exec` only makes async-signal-safe syscalls.
        // SAFETY: the pointer came from Box::into_raw in `arm` and was swapped out: we own it.
        let _ = unsafe { &*plan }.exec();
    }
    // Nothing armed (the guest already runs) or the exec failed: the guard decides next.
}

/// Installs `plan` in `slot`, freeing what was there.
fn install_plan(slot: &AtomicPtr<ExecPlan>, plan: Option<ExecPlan>) {
    let new = plan.map_or(std::ptr::null_mut(), |p| Box::into_raw(Box::new(p)));
    let old = slot.swap(new, Ordering::SeqCst);
    if !old.is_null() {
        // SAFETY: `old` came from Box::into_raw and was swapped out, so we own it.
        drop(unsafe { Box::from_raw(old) });
    }
}

const FATAL_SIGNALS: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
];

/// An incoming cpr-exec update, from the moment the CPR state is read until the guest runs.
pub struct Incoming {
    pub state: CprState,
    channel: Option<OwnedFd>,
    /// The inherited fds by name, with whether the new VMM took a duplicate of it. The originals
    /// stay open, untouched, until the guest runs: a rollback passes them on whatever the new
    /// VMM did with its duplicates.
    fds: HashMap<String, (PreservedFd, OwnedFd, bool)>,
    pub phases: PhaseLog,
    /// The update's rescue guard, told when the guest runs (and passed on by a rollback).
    guard: Option<GuardLink>,
}

impl Incoming {
    /// Takes ownership of everything the CPR state lists. If something is wrong (a damaged
    /// channel, an fd that is not what was recorded), returns the problem: the caller must roll
    /// back.
    ///
    /// A rollback is lenient where an update is strict: the previous VMM finds its fds by device
    /// and inode wherever they now are (a swapped or moved fd number), because it is the last
    /// chance to keep the guest.
    #[allow(clippy::result_large_err)] // the error carries the Incoming needed to roll back
    pub fn new(inherited: Inherited, started_ns: u64) -> Result<Self, (Self, String)> {
        let Inherited {
            state,
            channel,
            channel_problem,
        } = inherited;
        let lenient = matches!(state.attempt, Attempt::Rollback { .. });
        let mut phases = state.phases.clone();
        phases.mark_at("exec to VMM start", started_ns);
        let mut fds = HashMap::new();
        let mut problem = match channel_problem {
            Some(p) if !lenient => Some(format!("the CPR state channel is damaged: {p}")),
            _ => None,
        };
        let mut open_fds: Option<HashMap<(u64, u64), RawFd>> = None;
        for rec in &state.fds {
            if rec.kind == FdKind::FallbackExe {
                continue;
            }
            let found = match fds::check_preserved(rec) {
                Ok(_) => Some(rec.fd),
                Err(e) if lenient => {
                    let by_identity = open_fds.get_or_insert_with(open_fds_by_identity);
                    let moved = by_identity.get(&(rec.dev, rec.ino)).copied();
                    match moved {
                        Some(fd) => {
                            log::warn!(
                                "inherited {} found at fd {fd} instead of {}",
                                rec.name,
                                rec.fd
                            );
                        }
                        None => log::warn!("inherited {} is lost: {e}", rec.name),
                    }
                    moved
                }
                Err(e) => {
                    problem.get_or_insert_with(|| format!("inherited fd check failed: {e}"));
                    None
                }
            };
            let Some(raw) = found else { continue };
            if fds
                .values()
                .any(|(r, _, _): &(PreservedFd, OwnedFd, bool)| r.fd == raw)
            {
                continue;
            }
            // `raw` is open and is the very file the CPR state recorded (same device and inode,
            // checked above).
            // SAFETY: it was inherited for exactly this purpose and this is its only owner.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // Close-on-exec again at once; a rollback clears it on what it passes on.
            let _ = fds::set_cloexec(raw, true);
            let mut rec = rec.clone();
            rec.fd = raw;
            fds.insert(rec.name.clone(), (rec, fd, false));
        }
        let incoming = Incoming {
            state,
            channel,
            fds,
            phases,
            guard: None,
        };
        match problem {
            Some(p) => Err((incoming, p)),
            None => Ok(incoming),
        }
    }

    /// The update's rescue guard (see [`super::rescue`]), if the old VMM started one.
    pub fn set_guard(&mut self, guard: Option<GuardLink>) {
        self.guard = guard;
    }

    /// Arms the rollback for crashes (fatal signals and panics), and for the rescue guard's
    /// request at its deadline (SIGUSR2), until [`Incoming::disarm`].
    pub fn arm(&self) {
        let version = crate::version_string();
        let crashed = format!("the new VMM (version {version}) crashed before resuming the guest");
        let Ok(plan) = self.rollback_plan(&crashed) else {
            return;
        };
        install_plan(&ARMED_ROLLBACK, Some(plan));
        let late = format!(
            "the new VMM (version {version}) had not resumed the guest by the update's deadline (x-cpr-deadline-ms)"
        );
        install_plan(&ARMED_DEADLINE_ROLLBACK, self.rollback_plan(&late).ok());
        for sig in FATAL_SIGNALS {
            // SAFETY: installing a plain handler; it only makes async-signal-safe calls.
            unsafe {
                libc::signal(
                    sig,
                    rollback_on_fatal_signal as *const () as libc::sighandler_t,
                )
            };
        }
        // SAFETY: as above.
        unsafe {
            libc::signal(
                libc::SIGUSR2,
                rollback_on_deadline as *const () as libc::sighandler_t,
            )
        };
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            rollback_on_fatal_signal(libc::SIGABRT);
        }));
    }

    /// The guest runs: no rollback from here on.
    pub fn disarm(&self) {
        install_plan(&ARMED_ROLLBACK, None);
        install_plan(&ARMED_DEADLINE_ROLLBACK, None);
        for sig in FATAL_SIGNALS {
            // SAFETY: restoring the default disposition.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
        // A guard's request that crosses the guest's resume must not kill the VMM.
        // SAFETY: ignoring a signal.
        unsafe { libc::signal(libc::SIGUSR2, libc::SIG_IGN) };
        let _ = std::panic::take_hook();
    }

    fn rollback_plan(&self, reason: &str) -> Result<ExecPlan, cpr::CprError> {
        let keep: Vec<(&str, RawFd)> = self
            .guard
            .iter()
            .map(|g| (super::rescue::RESCUE_ENV, g.fd()))
            .collect();
        cpr::rollback_plan(
            &self.state,
            self.channel.as_ref().map(|c| c.as_raw_fd()),
            reason,
            &keep,
        )
    }

    /// Re-executes the previous VMM with `reason`. Returns only if that is impossible (a rollback
    /// was already attempted, or the exec failed), with the reason the guest is lost.
    pub fn roll_back(&self, reason: &str) -> String {
        self.disarm();
        log::error!("live update failed: {reason}; rolling back to the previous VMM");
        match self.rollback_plan(reason) {
            Ok(plan) => {
                let err = plan.exec();
                format!(
                    "{reason}; rollback exec of {} failed: {err}",
                    plan.program()
                )
            }
            Err(e) => e.to_string(),
        }
    }

    /// Maps the inherited RAM memfds for `regions` (from the state file), checking that the
    /// CPR state lists each one with the same size; or the inherited RAM file, in place, when
    /// the previous VMM had `memory-backend-file` RAM (`ram_file`: this command line's
    /// mem-path, which must name it too).
    pub fn take_ram(
        &mut self,
        regions: &[RegionLayout],
        ram_file: Option<&std::path::Path>,
    ) -> Result<GuestRam, CprExecError> {
        let total: u64 = regions.iter().map(|r| r.size).sum();
        if let Some((rec, _, _)) = self
            .fds
            .get(RAM_FILE_NAME)
            .filter(|(rec, _, _)| rec.kind == FdKind::GuestRamFile)
        {
            if rec.size != total {
                return Err(CprExecError::RegionSize {
                    name: RAM_FILE_NAME.to_string(),
                    expected: total,
                    found: rec.size,
                });
            }
            let path = ram_file.ok_or(CprExecError::RamFileNotOnCommandLine)?;
            let fd = self
                .take_fd(FdKind::GuestRamFile, RAM_FILE_NAME)
                .ok_or_else(|| CprExecError::MissingRegion(RAM_FILE_NAME.to_string()))?;
            let options = crate::memory::FileRamOptions {
                share: true,
                prealloc: false,
            };
            return Ok(GuestRam::map_file(path, File::from(fd), total, options)?);
        }
        for region in regions {
            let (rec, _, _) = self
                .fds
                .get(&region.name)
                .filter(|(rec, _, _)| rec.kind == FdKind::GuestRam)
                .ok_or_else(|| CprExecError::MissingRegion(region.name.clone()))?;
            if rec.size != region.size {
                return Err(CprExecError::RegionSize {
                    name: region.name.clone(),
                    expected: region.size,
                    found: rec.size,
                });
            }
        }
        let ram = GuestRam::from_fds(regions, |r| self.take_fd(FdKind::GuestRam, &r.name))?;
        Ok(ram)
    }

    /// A close-on-exec duplicate of the inherited fd of `kind` named `name`, if there is one.
    pub fn take_fd(&mut self, kind: FdKind, name: &str) -> Option<OwnedFd> {
        let (rec, original, taken) = self.fds.get_mut(name)?;
        if rec.kind != kind {
            return None;
        }
        let dup = original.try_clone().ok()?;
        *taken = true;
        Some(dup)
    }

    /// The copy of the state file the old VMM kept (for a rollback whose file is damaged).
    pub fn state_copy(&mut self) -> Option<Vec<u8>> {
        let file = File::from(self.take_fd(FdKind::StateCopy, STATE_COPY_NAME)?);
        // Positioned reads: the fd shares its offset with the writer's, which is at the end.
        let len = file.metadata().ok()?.len();
        let mut bytes = vec![0u8; usize::try_from(len).ok()?];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0).ok()?;
        Some(bytes)
    }

    /// Duplicates of every inherited fd whose kind matches `pred`, in fd order.
    pub fn take_all(&mut self, pred: impl Fn(FdKind) -> bool) -> Vec<(PreservedFd, OwnedFd)> {
        let mut out = Vec::new();
        for (rec, original, taken) in self.fds.values_mut() {
            if pred(rec.kind)
                && let Ok(dup) = original.try_clone()
            {
                *taken = true;
                out.push((rec.clone(), dup));
            }
        }
        out.sort_by_key(|(rec, _)| rec.fd);
        out
    }

    /// The guest runs on the new VMM: rollback is over. Closes the inherited originals (the
    /// new VMM owns duplicates of what it uses), the channel and the previous executable.
    pub fn finish(&mut self) {
        self.disarm();
        if let Some(guard) = self.guard.take() {
            guard.report_resumed();
        }
        for (name, (rec, original, taken)) in self.fds.drain() {
            if !taken {
                log::debug!(
                    "closing inherited fd {} ({name}): not used by this VMM",
                    rec.fd
                );
            }
            drop(original);
        }
        self.channel = None;
        let exe = self
            .state
            .fds
            .iter()
            .find(|f| f.kind == FdKind::FallbackExe && f.fd == self.state.fallback.exe_fd);
        if let Some(rec) = exe
            && fds::check_preserved(rec).is_ok()
        {
            // The fd is the previous executable, inherited for rollback only (identity checked
            // just above), and rollback is over.
            // SAFETY: nothing else in this process uses it.
            unsafe { libc::close(rec.fd) };
        }
    }
}

/// Every open fd of this process by (device, inode), for finding moved fds.
fn open_fds_by_identity() -> HashMap<(u64, u64), RawFd> {
    let mut map = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        if let Ok(id) = fds::identity(fd, "scan") {
            map.entry((id.dev, id.ino)).or_insert(fd);
        }
    }
    map
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// Unsets the channel variables so they do not leak to anything this process starts. Must be
/// called while the process is still single-threaded.
pub fn clear_channel_env() {
    // Called at the start of main, before any thread exists.
    // SAFETY: so nothing reads the environment concurrently.
    unsafe {
        std::env::remove_var(CPR_STATE_ENV);
        std::env::remove_var(FALLBACK_ENV);
        std::env::remove_var(cpr_common::target::CHECKED_TARGET_ENV);
    }
}

/// A cpr-exec update ready to exec once the `migrate` reply is out.
pub(crate) struct PendingExec {
    prepared: PreparedExec,
    /// Its socket crosses the exec; released if the exec fails.
    guard: Option<RescueGuard>,
    /// The program executed is a VMM of an older release that handles SIGTERM & co. itself.
    unblock_signals: bool,
    /// Keeps the old address space and KVM VM alive past the exec, so tearing them down is not
    /// part of the blackout.
    _teardown: Option<TeardownHelper>,
    state_file: PathBuf,
    guest_was_running: bool,
}

/// Replies and events still queued for a QMP client when the update execs are written for at
/// most this long (the connection itself survives; only a client that stopped reading loses
/// them).
const EXEC_DRAIN_TIMEOUT: Duration = Duration::from_millis(20);

impl Vmm {
    /// cpr-exec, old side: stop, save state without RAM, prepare the exec. The exec itself
    /// happens once the reply to `migrate` is out ([`Vmm::exec_update`]).
    pub(crate) fn migrate_cpr_exec(&mut self, state_file: PathBuf) -> Result<(), QmpError> {
        let command = self.params.cpr_exec_command.clone().unwrap_or_default();
        if command.is_empty() {
            return Err(QmpError::generic(
                "cpr-exec mode requires the migration parameter cpr-exec-command (the program to execute, then its arguments)",
            ));
        }
        let Some(machine) = &mut self.machine else {
            return Err(QmpError::generic(
                "Guest is waiting for an incoming migration",
            ));
        };
        check_ram_shareable(machine.ram()).map_err(|e| QmpError::generic(e.to_string()))?;
        check_exec_command(&command, &state_file, self.monitor.is_some())
            .map_err(|e| QmpError::generic(e.to_string()))?;
        // Hashing the target takes milliseconds: here, not in the blackout.
        let checked_target =
            precheck_target(&command).map_err(|e| QmpError::generic(e.to_string()))?;
        let unblock_signals = !keeps_signals_blocked(&command);
        // Output still queued for slow clients goes out now, while the guest runs: waiting for
        // it after the stop would lengthen the blackout.
        if let Some(m) = &mut self.monitor {
            m.drain_output(EXEC_DRAIN_TIMEOUT);
        }
        let Some(machine) = &mut self.machine else {
            return Err(QmpError::generic(
                "Guest is waiting for an incoming migration",
            ));
        };
        // Before the guest stops: the guard and the helper cost the blackout nothing here.
        let guard = RescueGuard::spawn()
            .map_err(|e| log::warn!("no rescue guard for this update: {e}"))
            .ok();
        let deadline_ms = self
            .params
            .x_cpr_deadline_ms
            .unwrap_or(super::rescue::DEFAULT_DEADLINE_MS);
        let teardown = TeardownHelper::spawn()
            .map_err(|e| {
                log::warn!("no teardown helper ({e}); the exec will tear down RAM mappings itself")
            })
            .ok();
        let guest_was_running = self.run_state == RunState::Running;
        let stop_wall = SystemTime::now();
        let stopped_at = monotonic_ns();
        let mut phases = PhaseLog::starting_at(stopped_at);
        self.migration = MigrationRecord {
            status: MigrationStatus::Setup,
            started: Some(Instant::now()),
            ..MigrationRecord::default()
        };
        let saved = machine.pause_and_save();
        phases.mark("stop vCPUs and save vCPU state");
        let prepared = saved.map_err(MigrationError::from).and_then(|state| {
            let run = SavedRun {
                guest_was_running,
                saved_by_version: crate::version_string(),
                saved_at_unix_ns: cpr_common::timing::realtime_ns(),
            };
            let label = state_file.display().to_string();
            let bytes = encode_state(Vec::new(), &state, &run, RamContents::Preserved, &label)?;
            write_state_bytes(&state_file, &bytes)?;
            phases.mark("write state file");
            let device_fds = machine.device_host_fds()?;
            let mut other_fds = self
                .monitor
                .as_ref()
                .map(|m| m.preserved_fds())
                .unwrap_or_default();
            other_fds.extend(self.console.preserved_fds());
            if let Some(t) = &teardown {
                other_fds.push((
                    FdKind::TeardownRelease,
                    "teardown-release".to_string(),
                    t.release_fd(),
                ));
            }
            prepare_exec(ExecInputs {
                command: &command,
                state_file: &state_file,
                state_bytes: &bytes,
                guest_was_running,
                stopped_at_ns: stopped_at,
                phases,
                own_argv: &self.config.argv,
                ram: machine.ram(),
                other_fds,
                device_fds,
                checked_target,
                guard: guard.as_ref().map(|g| (g, deadline_ms)),
            })
            .map_err(MigrationError::from)
        });
        if guest_was_running {
            let _ = self.set_run_state(RunState::FinishMigrate);
            if let Some(m) = &mut self.monitor {
                m.broadcast_at(&EventKind::Stop, stop_wall);
            }
        }
        match prepared {
            Ok(prepared) => {
                self.emit(&EventKind::Migration {
                    status: MigrationStatus::Active,
                });
                self.pending_exec = Some(PendingExec {
                    prepared,
                    guard,
                    unblock_signals,
                    _teardown: teardown,
                    state_file,
                    guest_was_running,
                });
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&state_file);
                let reason = format!("cpr-exec: {e}");
                self.fail_migration(&reason, guest_was_running);
                Err(QmpError::generic(reason))
            }
        }
    }

    /// Executes the cpr-exec-command. Returns only if the exec failed; then everything is put
    /// back and the guest resumes.
    pub(crate) fn exec_update(&mut self, pending: PendingExec) {
        if let Some(m) = &mut self.monitor {
            // The guest is stopped: what a client's socket takes now (STOP, the reply to
            // `migrate`) is written without waiting; a client that stopped reading loses it
            // rather than lengthening the guest's pause.
            m.flush_nonblocking();
        }
        log::info!("live update: executing {}", pending.prepared.program());
        let dropped = if pending.unblock_signals {
            cpr_common::exec::unblock_termination_signals_dropping_pending()
        } else {
            Vec::new()
        };
        let (err, prepared) = pending.prepared.exec();
        let _ = cpr_common::exec::block_termination_signals();
        let reason = format!("exec of {} failed: {err}", prepared.program());
        log::error!("live update failed: {reason}; resuming the guest");
        prepared.undo();
        if let Some(guard) = pending.guard {
            guard.release();
        }
        let _ = std::fs::remove_file(&pending.state_file);
        self.fail_migration(&reason, pending.guest_was_running);
        if !dropped.is_empty() {
            log::info!("terminated by {dropped:?} during the failed update");
            self.shutdown(crate::qmp::protocol::ShutdownCause::HostSignal, 0);
        }
    }

    /// cpr-exec, new side: restore over the inherited RAM and resume the guest.
    pub(crate) fn start_cpr_incoming(&mut self, incoming: &mut Incoming) -> Result<(), StartError> {
        self.sync_console_fds();
        let _ = self.set_run_state(RunState::Inmigrate);
        let path = PathBuf::from(&incoming.state.state_file);
        let label = path.display().to_string();
        let loaded = std::fs::read(&path)
            .map_err(|source| StateFileError::Open {
                path: label.clone(),
                source,
            })
            .and_then(|bytes| StateFile::from_bytes(bytes, &label));
        let file = match loaded {
            Ok(f) => f,
            // A rollback is the last chance for the guest: if the file went bad, use the copy
            // the old VMM kept in a sealed memfd.
            Err(e) if matches!(incoming.state.attempt, Attempt::Rollback { .. }) => {
                log::warn!("{e}; restoring from the copy kept across the exec");
                let bytes = incoming.state_copy().ok_or(IncomingError::File(e))?;
                StateFile::from_bytes(bytes, "the kept copy of the state file")
                    .map_err(IncomingError::from)?
            }
            Err(e) => return Err(IncomingError::from(e).into()),
        };
        file.check_machine(&self.described_machine())
            .map_err(IncomingError::from)?;
        incoming.phases.mark("read state file");
        let ram = incoming.take_ram(
            &file.state.description.regions,
            self.config.ram_file.as_deref(),
        )?;
        incoming.phases.mark("map memory");
        let host_fds = HandedOverFds::new(
            incoming
                .take_all(FdKind::is_device_backend)
                .into_iter()
                .map(|(rec, fd)| (rec.name, fd))
                .collect(),
        );
        let (machine, rx) = self.build_machine(
            ram,
            Source::Restore {
                state: &file.state,
                host_fds,
            },
            Some(&mut incoming.phases),
        )?;
        self.install_machine(machine, rx)
            .map_err(StartError::Setup)?;
        match self.config.cpr_test_fault {
            Some(CprTestFault::ExitBeforeResume) => return Err(StartError::TestFault),
            Some(CprTestFault::CrashBeforeResume) => {
                log::error!("test fault injected: crashing before resume");
                std::process::abort();
            }
            Some(CprTestFault::KillBeforeResume) => {
                log::error!("test fault injected: SIGKILL before resume");
                // SAFETY: raising a signal; the process ends here.
                unsafe { libc::raise(libc::SIGKILL) };
            }
            Some(CprTestFault::HangBeforeResume) => {
                log::error!("test fault injected: hanging before resume");
                loop {
                    std::thread::park();
                }
            }
            Some(CprTestFault::KillAtStart) | None => {}
        }
        let state = &incoming.state;
        let guest_was_running = state.guest_was_running;
        if guest_was_running && let Some(m) = &mut self.machine {
            m.resume();
        }
        let resumed_at = monotonic_ns();
        let resumed_wall = SystemTime::now();
        incoming.disarm();
        incoming.phases.mark_at("resume vCPUs", resumed_at);
        let blackout_ns = resumed_at.saturating_sub(state.stopped_at_ns);
        let rolled_back = match &incoming.state.attempt {
            Attempt::Rollback { reason } => Some(reason.clone()),
            Attempt::Update => None,
        };
        self.finish_incoming_update(
            blackout_ns,
            resumed_wall,
            &incoming.phases,
            incoming.state.fallback.version.clone(),
            rolled_back.clone(),
            guest_was_running,
        );
        // Last, after the events: this also lets the previous process's teardown start on the
        // other CPU.
        incoming.finish();
        match &rolled_back {
            None => log::info!(
                "live update from {} to {} complete: blackout {:.3} ms",
                incoming.state.fallback.version,
                crate::version_string(),
                blackout_ns as f64 / 1e6
            ),
            Some(reason) => log::warn!(
                "live update failed ({reason}); this VMM ({}) took the guest back after {:.3} ms",
                crate::version_string(),
                blackout_ns as f64 / 1e6
            ),
        }
        Ok(())
    }

    /// The new side of a live update (either cpr mode) has resumed the guest (or left it paused
    /// as it was): record what query-migrate reports and tell the QMP clients. `rolled_back` is
    /// the failed update's reason when this process is the previous version taking the guest back.
    pub(crate) fn finish_incoming_update(
        &mut self,
        blackout_ns: u64,
        resumed_wall: SystemTime,
        phases: &PhaseLog,
        from_version: String,
        rolled_back: Option<String>,
        running: bool,
    ) {
        let status = if rolled_back.is_some() {
            MigrationStatus::Failed
        } else {
            MigrationStatus::Completed
        };
        // One line per update, for operators: outcome, versions, blackout.
        match &rolled_back {
            None => log::info!(
                "live update completed: vmm {from_version} -> {}, blackout {:.3} ms",
                crate::version_string(),
                blackout_ns as f64 / 1e6
            ),
            Some(reason) => log::warn!(
                "live update failed and rolled back to vmm {}: {reason}; guest paused {:.3} ms",
                crate::version_string(),
                blackout_ns as f64 / 1e6
            ),
        }
        self.migration = MigrationRecord {
            status,
            total_time_ms: Some(blackout_ns / 1_000_000),
            downtime_ms: Some(blackout_ns / 1_000_000),
            cpr: Some(CprUpdateInfo {
                blackout_ns,
                phases: phases
                    .phases
                    .iter()
                    .map(|p| CprPhase {
                        name: p.name.clone(),
                        ns: p.ns,
                    })
                    .collect(),
                from_version,
                to_version: crate::version_string(),
                rolled_back: rolled_back.is_some(),
            }),
            error: rolled_back,
            ..MigrationRecord::default()
        };
        if running {
            let _ = self.set_run_state(RunState::Running);
            // Stamped with the moment the vCPUs were resumed, so that STOP to RESUME is the
            // blackout the VMM reports.
            if let Some(m) = &mut self.monitor {
                m.broadcast_at(&EventKind::Resume, resumed_wall);
            }
        } else {
            let _ = self.set_run_state(RunState::Paused);
        }
        self.emit(&EventKind::Migration { status });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_argv_replaces_incoming() {
        let argv: Vec<String> = [
            "vmm",
            "-m",
            "1G",
            "-incoming",
            "file:/old",
            "--incoming=defer",
            "-smp",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = fallback_argv(&argv, Path::new("/run/vm.state"));
        assert_eq!(
            out,
            vec![
                "vmm",
                "-m",
                "1G",
                "-smp",
                "2",
                "-incoming",
                "file:/run/vm.state"
            ]
        );
    }

    #[test]
    fn this_binary_carries_its_compat_note() {
        let exe = File::open("/proc/self/exe").unwrap();
        let c = cpr_common::compat::read_note(&exe).unwrap();
        assert!(c.reads_state(super::super::format::STATE_FORMAT_VERSION));
        assert!(c.reads_cpr(cpr::CPR_STATE_FORMAT.current_version));
        assert_eq!(c.version, crate::VERSION);
    }
}

#[cfg(test)]
mod command_tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sha256_must_be_64_hex_digits() {
        let good = "ab".repeat(32);
        assert!(check_command_syntax(&v(&["cpr-shim", "--sha256", &good, "--", "vmm"])).is_ok());
        assert!(
            check_command_syntax(&v(&["cpr-shim", &format!("--sha256={good}"), "--", "vmm"]))
                .is_ok()
        );
        for bad in ["abc", &"zz".repeat(32), ""] {
            let e = check_command_syntax(&v(&["cpr-shim", "--sha256", bad, "--", "vmm"]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("64 hex digits"), "{e}");
        }
        assert!(check_command_syntax(&v(&["cpr-shim", "--sha256"])).is_err());
        // After `--` it is the VMM's argument list, not the shim's.
        assert!(check_command_syntax(&v(&["cpr-shim", "--", "vmm", "--sha256", "x"])).is_ok());
    }

    #[test]
    fn the_shim_and_its_target_are_found_behind_a_wrapper() {
        let cmd = v(&[
            "/opt/cpr-fault",
            "--touch",
            "x",
            "--",
            "/usr/bin/cpr-shim",
            "--sha256",
            "ab",
            "--",
            "/opt/vmm-2",
            "-m",
            "1G",
        ]);
        let (shim_args, target) = shim_invocation(&cmd).unwrap();
        assert_eq!(shim_args, v(&["--sha256", "ab"]));
        assert_eq!(target[0], "/opt/vmm-2");
        assert_eq!(shim_sha256(shim_args), Some(Some("ab")));
        // A direct exec of a VMM has no shim: nothing is hashed before the stop.
        assert!(shim_invocation(&v(&["/opt/vmm-2", "-m", "1G"])).is_none());
        assert!(matches!(
            precheck_target(&v(&["/opt/vmm-2", "-m", "1G"])),
            Ok(None)
        ));
        // A target that does not exist is refused before the stop, naming it.
        let e = precheck_target(&v(&[
            "cpr-shim",
            "--sha256",
            &"ab".repeat(32),
            "--",
            "/nonexistent/vmm",
        ]))
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("/nonexistent/vmm"), "{e}");
    }

    #[test]
    fn the_exec_command_keeps_the_monitor_and_the_state_file() {
        let state = Path::new("/run/vm.state");
        let with_qmp = v(&["vmm", "-qmp", "unix:/run/q,server=on,wait=off"]);
        assert!(check_exec_command(&with_qmp, state, true).is_ok());
        let e = check_exec_command(&v(&["vmm", "-m", "1G"]), state, true).unwrap_err();
        assert!(e.to_string().contains("has no -qmp"), "{e}");
        assert!(check_exec_command(&v(&["vmm", "-m", "1G"]), state, false).is_ok());
        let mut wrong = with_qmp.clone();
        wrong.extend(v(&["-incoming", "file:/run/other.state"]));
        assert!(check_exec_command(&wrong, state, true).is_err());
        let mut right = with_qmp.clone();
        right.extend(v(&["--incoming=file:/run/vm.state"]));
        assert!(check_exec_command(&right, state, true).is_ok());
    }
}
