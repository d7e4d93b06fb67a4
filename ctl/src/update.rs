//! `update`: live-update a set of VMs to one target binary, canary first, then N at a time.
//!
//! Every VM is checked before any is touched (reachable, a cpr-vmm monitor, not in an update,
//! its formats readable by the target, its command line known); then each update runs exactly
//! as an operator would by hand: `migrate-set-parameters` (cpr-exec, the command line the VMM
//! reports plus `-incoming file:STATE`, through `cpr-shim --sha256`), `migrate`, and the
//! `MIGRATION` event on the same connection. The rollout stops at the first failure or blackout
//! over the limit; VMs not yet started are left alone.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::qmp::{Qmp, QmpError};
use crate::stage::{self, SHA_FILE, StageError, VmmBinary};

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(
        "{path}: the staged sha256 file says {recorded} but the binary hashes to {actual}: it changed since it was staged; stage it again"
    )]
    ShaMismatch {
        path: PathBuf,
        recorded: String,
        actual: String,
    },
    #[error(
        "{socket}: the VMM is in a migration already (query-migrate: {status}); wait for it to end"
    )]
    Busy { socket: PathBuf, status: String },
    #[error(
        "{socket}: the VMM ({version}) cannot report its command line (x-query-cpr-command-line: {why}); update this VM by hand once"
    )]
    NoCommandLine {
        socket: PathBuf,
        version: String,
        why: String,
    },
    #[error("{socket}: the same VMM (pid {pid}) as {other}")]
    Duplicate {
        socket: PathBuf,
        other: PathBuf,
        pid: u32,
    },
    #[error("{path}: cannot list the directory: {source}")]
    ListDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no VM sockets given (or none in the directories given)")]
    NoSockets,
    #[error("{path}: cpr-shim not found there ({source}); give its path with --shim")]
    Shim {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{socket} and {other} would both write their state to {state}: give sockets with different names, or no --state-dir"
    )]
    StateClash {
        socket: PathBuf,
        other: PathBuf,
        state: PathBuf,
    },
    #[error("--x-test-fault {0}: expected SOCKET=FAULT")]
    BadTestFault(String),
}

/// Everything `update` was asked to do.
pub struct Options {
    pub target: PathBuf,
    pub shim: PathBuf,
    pub parallel: usize,
    pub canary: usize,
    pub max_blackout_ms: Option<f64>,
    pub state_dir: Option<PathBuf>,
    pub timeout: Duration,
    /// Test only: `(socket, fault)` adds `--cpr-test-fault FAULT` to that VM's new command line.
    pub test_faults: Vec<(PathBuf, String)>,
}

/// A VM that passed the checks, ready to update.
struct Vm {
    socket: PathBuf,
    qmp: Qmp,
    version: String,
    argv: Vec<String>,
    running: bool,
}

/// How one VM's update ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Unchanged,
    OverLimit,
    Failed,
    NotReached,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Unchanged => "already-on-target",
            Outcome::OverLimit => "completed-over-limit",
            Outcome::Failed => "failed",
            Outcome::NotReached => "not-reached",
        }
    }

    /// Whether the VM runs the target after it.
    pub fn on_target(self) -> bool {
        matches!(
            self,
            Outcome::Completed | Outcome::Unchanged | Outcome::OverLimit
        )
    }
}

/// One VM's line in the report.
#[derive(Debug, Clone)]
pub struct VmReport {
    pub socket: PathBuf,
    pub pid_before: u32,
    pub pid_after: Option<u32>,
    pub from_version: String,
    pub to_version: Option<String>,
    pub blackout_ns: Option<u64>,
    pub phases: Value,
    pub outcome: Outcome,
    pub reason: Option<String>,
}

impl VmReport {
    /// A VM's line before its update has run.
    fn before(vm: &Vm, outcome: Outcome, reason: Option<String>) -> VmReport {
        VmReport {
            socket: vm.socket.clone(),
            pid_before: vm.qmp.pid,
            pid_after: None,
            from_version: vm.version.clone(),
            to_version: None,
            blackout_ns: None,
            phases: Value::Null,
            outcome,
            reason,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "socket": self.socket.display().to_string(),
            "pid-before": self.pid_before,
            "pid-after": self.pid_after,
            "from-version": self.from_version,
            "to-version": self.to_version,
            "blackout-ns": self.blackout_ns,
            "phases": self.phases,
            "outcome": self.outcome.as_str(),
            "reason": self.reason,
        })
    }
}

/// The whole rollout.
pub struct Report {
    pub target: VmmBinary,
    pub vms: Vec<VmReport>,
    pub stopped: Option<String>,
}

impl Report {
    pub fn all_on_target(&self) -> bool {
        self.vms.iter().all(|v| v.outcome.on_target())
    }

    pub fn clean(&self) -> bool {
        self.all_on_target() && self.stopped.is_none()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "target": {
                "path": self.target.path.display().to_string(),
                "version": self.target.compat.version,
                "sha256": self.target.sha256,
            },
            "all-on-target": self.all_on_target(),
            "stopped": self.stopped,
            "vms": self.vms.iter().map(VmReport::to_json).collect::<Vec<_>>(),
        })
    }
}

/// Socket paths: each argument, or the sockets in it when it is a directory (sorted).
pub fn expand_sockets(args: &[PathBuf]) -> Result<Vec<PathBuf>, UpdateError> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = Vec::new();
    for arg in args {
        if !arg.is_dir() {
            out.push(arg.clone());
            continue;
        }
        let entries = std::fs::read_dir(arg).map_err(|source| UpdateError::ListDir {
            path: arg.clone(),
            source,
        })?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
            .map(|e| e.path())
            .collect();
        found.sort();
        out.extend(found);
    }
    if out.is_empty() {
        return Err(UpdateError::NoSockets);
    }
    Ok(out)
}

/// Resolves the target once (a `current` symlink is followed now, so every VM gets the same
/// binary even if something is staged meanwhile), reads its note and hashes it.
pub fn resolve_target(path: &Path) -> Result<VmmBinary, UpdateError> {
    let real = std::fs::canonicalize(path).map_err(|source| StageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let binary = VmmBinary::inspect(&real)?;
    let sha_file = real.with_file_name(SHA_FILE);
    if let Ok(text) = std::fs::read_to_string(&sha_file) {
        let recorded = text.trim().to_string();
        if recorded != binary.sha256 {
            return Err(UpdateError::ShaMismatch {
                path: real,
                recorded,
                actual: binary.sha256,
            });
        }
    }
    Ok(binary)
}

/// Connects to every VM and checks it can be updated; any problem is returned before a VM
/// is touched.
fn preflight(
    sockets: &[PathBuf],
    target: &VmmBinary,
) -> Result<(Vec<Vm>, Vec<UpdateError>), UpdateError> {
    let mut vms: Vec<Vm> = Vec::new();
    let mut problems = Vec::new();
    for socket in sockets {
        match check_vm(socket, target) {
            Ok(vm) => {
                if let Some(other) = vms.iter().find(|v| v.qmp.pid == vm.qmp.pid) {
                    problems.push(UpdateError::Duplicate {
                        socket: socket.clone(),
                        other: other.socket.clone(),
                        pid: vm.qmp.pid,
                    });
                } else {
                    vms.push(vm);
                }
            }
            Err(e) => problems.push(e),
        }
    }
    Ok((vms, problems))
}

fn check_vm(socket: &Path, target: &VmmBinary) -> Result<Vm, UpdateError> {
    let mut qmp = Qmp::connect(socket)?;
    let version = qmp.version();
    let migrate = qmp
        .execute("query-migrate", Value::Null)
        .map_err(|e| qmp.busy_or(e))?;
    let status = migrate["status"].as_str().unwrap_or("none").to_string();
    if matches!(
        status.as_str(),
        "setup" | "active" | "device" | "cancelling" | "pre-switchover"
    ) {
        return Err(UpdateError::Busy {
            socket: socket.to_path_buf(),
            status,
        });
    }
    let line = qmp
        .execute("x-query-cpr-command-line", Value::Null)
        .map_err(|e| UpdateError::NoCommandLine {
            socket: socket.to_path_buf(),
            version: version.clone(),
            why: e.to_string(),
        })?;
    let argv: Vec<String> = line["argv"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if argv.is_empty() {
        return Err(UpdateError::NoCommandLine {
            socket: socket.to_path_buf(),
            version,
            why: "an empty argv".into(),
        });
    }
    if version != target.compat.version {
        let running = stage::running_compat(socket, qmp.pid)?;
        target.check_takes_over(socket, &running)?;
    }
    let status = qmp.execute("query-status", Value::Null)?;
    Ok(Vm {
        socket: socket.to_path_buf(),
        running: status["running"].as_bool().unwrap_or(false),
        qmp,
        version,
        argv,
    })
}

/// Where a VM's state file goes: `--state-dir/NAME.state`, or beside its socket.
fn state_path(socket: &Path, state_dir: Option<&Path>) -> PathBuf {
    let name = socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vm".into());
    let dir = state_dir
        .map(Path::to_path_buf)
        .or_else(|| socket.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    dir.join(format!("{name}.cpr-state"))
}

/// The `cpr-exec-command` for one VM.
fn exec_command(vm: &Vm, opts: &Options, target: &VmmBinary, state: &Path) -> Vec<String> {
    let mut log = state.as_os_str().to_owned();
    log.push(".log");
    let mut command = vec![
        opts.shim.display().to_string(),
        "--sha256".into(),
        target.sha256.clone(),
        "--log".into(),
        PathBuf::from(log).display().to_string(),
        "--".into(),
        target.path.display().to_string(),
    ];
    command.extend(vm.argv.iter().skip(1).cloned());
    if let Some((_, fault)) = opts.test_faults.iter().find(|(s, _)| *s == vm.socket) {
        command.push("--cpr-test-fault".into());
        command.push(fault.clone());
    }
    command.push("-incoming".into());
    command.push(format!("file:{}", state.display()));
    command
}

/// Updates one VM; never panics on what the VMM says.
fn update_one(vm: &mut Vm, opts: &Options, target: &VmmBinary) -> VmReport {
    let mut report = VmReport::before(vm, Outcome::Failed, None);
    if vm.version == target.compat.version {
        report.outcome = Outcome::Unchanged;
        report.to_version = Some(vm.version.clone());
        report.pid_after = Some(vm.qmp.pid);
        return report;
    }
    let state = state_path(&vm.socket, opts.state_dir.as_deref());
    let command = exec_command(vm, opts, target, &state);
    let started = vm
        .qmp
        .execute(
            "migrate-set-parameters",
            json!({ "mode": "cpr-exec", "cpr-exec-command": command }),
        )
        .and_then(|_| {
            vm.qmp.execute(
                "migrate",
                json!({ "uri": format!("file:{}", state.display()) }),
            )
        });
    if let Err(e) = started {
        // Refused before the guest stopped: leave the VM as it was.
        let _ = vm
            .qmp
            .execute("migrate-set-parameters", json!({ "mode": "normal" }));
        report.reason = Some(format!("refused, guest untouched: {e}"));
        report.pid_after = Some(vm.qmp.pid);
        report.to_version = Some(vm.version.clone());
        return report;
    }
    let ended = wait_end(&mut vm.qmp, opts.timeout);
    let info = vm.qmp.execute("query-migrate", Value::Null);
    // A fresh connection says who runs the VM now (a rescue may have changed the PID).
    match Qmp::connect(&vm.socket) {
        Ok(after) => {
            report.pid_after = Some(after.pid);
            report.to_version = Some(after.version());
        }
        Err(e) => report.reason = Some(format!("cannot reach the VM after the update: {e}")),
    }
    if let Ok(info) = &info {
        let x = &info["x-cpr"];
        report.blackout_ns = x["blackout-ns"].as_u64();
        report.phases = x["phases"].clone();
    }
    let status = match (&ended, &info) {
        (Err(e), _) => {
            report.reason = Some(e.to_string());
            return report;
        }
        (Ok(_), Ok(info)) => info["status"].as_str().unwrap_or("none").to_string(),
        (Ok(s), Err(_)) => s.clone(),
    };
    let on_target = report.to_version.as_deref() == Some(target.compat.version.as_str());
    if status != "completed" || !on_target {
        let desc = info
            .as_ref()
            .ok()
            .and_then(|i| i["error-desc"].as_str().map(String::from));
        report.reason = Some(match desc {
            Some(d) => format!("{status}: {d}"),
            None => format!(
                "{status}; the VM runs {}",
                report.to_version.as_deref().unwrap_or("an unknown version")
            ),
        });
        return report;
    }
    report.outcome = Outcome::Completed;
    if let (Some(limit), Some(ns)) = (opts.max_blackout_ms, report.blackout_ns)
        && ns as f64 / 1e6 > limit
    {
        report.outcome = Outcome::OverLimit;
        report.reason = Some(format!(
            "blackout {:.3} ms over --max-blackout-ms {limit}",
            ns as f64 / 1e6
        ));
    }
    report
}

/// Waits for the `MIGRATION` event that ends the update; returns its status.
fn wait_end(qmp: &mut Qmp, timeout: Duration) -> Result<String, QmpError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let event = qmp.wait_event("MIGRATION", left)?;
        let status = event["data"]["status"].as_str().unwrap_or("").to_string();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            return Ok(status);
        }
    }
}

fn print_progress(index: usize, total: usize, r: &VmReport) {
    let blackout = r
        .blackout_ns
        .map(|ns| format!("{:.3} ms", ns as f64 / 1e6))
        .unwrap_or_else(|| "-".into());
    let pid = match r.pid_after {
        Some(after) if after == r.pid_before => format!("pid {after}"),
        Some(after) => format!("pid {} -> {after}", r.pid_before),
        None => format!("pid {} -> ?", r.pid_before),
    };
    println!(
        "[{}/{total}] {}: {} -> {}: {}, blackout {blackout}, {pid}{}",
        index + 1,
        r.socket.display(),
        r.from_version,
        r.to_version.as_deref().unwrap_or("?"),
        r.outcome.as_str(),
        r.reason
            .as_deref()
            .map(|w| format!(" ({w})"))
            .unwrap_or_default()
    );
}

/// Runs the rollout. `Err` only when nothing was touched (bad input, a VM that cannot be
/// updated); the report says the rest.
pub fn run(sockets: &[PathBuf], opts: &Options) -> Result<Report, Vec<UpdateError>> {
    let sockets = expand_sockets(sockets).map_err(|e| vec![e])?;
    let target = resolve_target(&opts.target).map_err(|e| vec![e])?;
    if let Err(source) = std::fs::metadata(&opts.shim) {
        return Err(vec![UpdateError::Shim {
            path: opts.shim.clone(),
            source,
        }]);
    }
    let (vms, mut problems) = preflight(&sockets, &target).map_err(|e| vec![e])?;
    for (i, vm) in vms.iter().enumerate() {
        let state = state_path(&vm.socket, opts.state_dir.as_deref());
        if let Some(other) = vms[..i]
            .iter()
            .find(|o| state_path(&o.socket, opts.state_dir.as_deref()) == state)
        {
            problems.push(UpdateError::StateClash {
                socket: vm.socket.clone(),
                other: other.socket.clone(),
                state,
            });
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let total = vms.len();
    println!(
        "updating {total} VM(s) to {} ({}, sha256 {}): canary {}, then {} at a time",
        target.compat.version,
        target.path.display(),
        target.sha256,
        opts.canary.min(total),
        opts.parallel.max(1)
    );
    let reports: Vec<Mutex<VmReport>> = vms
        .iter()
        .map(|vm| {
            Mutex::new(VmReport::before(
                vm,
                Outcome::NotReached,
                Some("not started: the rollout stopped before this VM".into()),
            ))
        })
        .collect();
    let vms: Vec<Mutex<Vm>> = vms.into_iter().map(Mutex::new).collect();
    let stop = AtomicBool::new(false);
    let stopped: Mutex<Option<String>> = Mutex::new(None);
    let next = AtomicUsize::new(0);
    let work = |limit: usize| {
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok(i) = next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |i| {
                (i < limit).then_some(i + 1)
            }) else {
                return;
            };
            let Ok(mut vm) = vms[i].lock() else { return };
            if vm.version != target.compat.version {
                let paused = if vm.running { "" } else { " (guest paused)" };
                println!(
                    "[{}/{total}] {}: updating{paused}",
                    i + 1,
                    vm.socket.display()
                );
            }
            let r = update_one(&mut vm, opts, &target);
            print_progress(i, total, &r);
            if !matches!(r.outcome, Outcome::Completed | Outcome::Unchanged) {
                stop.store(true, Ordering::SeqCst);
                if let Ok(mut s) = stopped.lock()
                    && s.is_none()
                {
                    *s = Some(format!(
                        "{}: {}",
                        r.socket.display(),
                        r.reason
                            .clone()
                            .unwrap_or_else(|| r.outcome.as_str().into())
                    ));
                }
            }
            if let Ok(mut slot) = reports[i].lock() {
                *slot = r;
            }
        }
    };
    // Canary: one at a time.
    work(opts.canary.min(total));
    std::thread::scope(|s| {
        for _ in 0..opts.parallel.max(1) {
            s.spawn(|| work(total));
        }
    });
    let vms = reports
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect();
    let stopped = stopped.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok(Report {
        target,
        vms,
        stopped,
    })
}

/// Parses `--x-test-fault SOCKET=FAULT`.
pub fn parse_test_fault(text: &str) -> Result<(PathBuf, String), UpdateError> {
    match text.rsplit_once('=') {
        Some((socket, fault)) if !socket.is_empty() && !fault.is_empty() => {
            Ok((PathBuf::from(socket), fault.to_string()))
        }
        _ => Err(UpdateError::BadTestFault(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_go_beside_the_socket_or_in_the_state_dir() {
        let socket = Path::new("/run/vms/web1.qmp");
        assert_eq!(
            state_path(socket, None),
            PathBuf::from("/run/vms/web1.cpr-state")
        );
        assert_eq!(
            state_path(socket, Some(Path::new("/var/lib/cpr"))),
            PathBuf::from("/var/lib/cpr/web1.cpr-state")
        );
    }

    #[test]
    fn test_faults_need_a_socket_and_a_fault() {
        assert_eq!(
            parse_test_fault("/run/a=b.qmp=exit-before-resume").unwrap(),
            (
                PathBuf::from("/run/a=b.qmp"),
                "exit-before-resume".to_string()
            )
        );
        for bad in ["", "=x", "/run/a.qmp=", "no-equals"] {
            assert!(parse_test_fault(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_completed_updates_count_as_on_target() {
        for (outcome, on) in [
            (Outcome::Completed, true),
            (Outcome::Unchanged, true),
            (Outcome::OverLimit, true),
            (Outcome::Failed, false),
            (Outcome::NotReached, false),
        ] {
            assert_eq!(outcome.on_target(), on, "{}", outcome.as_str());
        }
    }

    #[test]
    fn directories_expand_to_their_sockets_in_order() {
        let dir = std::env::temp_dir().join(format!("cpr-ctl-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _b = std::os::unix::net::UnixListener::bind(dir.join("b.qmp")).unwrap();
        let _a = std::os::unix::net::UnixListener::bind(dir.join("a.qmp")).unwrap();
        std::fs::write(dir.join("a.cpr-state"), b"not a socket").unwrap();
        let found = expand_sockets(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(found, vec![dir.join("a.qmp"), dir.join("b.qmp")]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(expand_sockets(&[]), Err(UpdateError::NoSockets)));
    }
}
