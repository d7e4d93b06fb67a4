//! Helpers for the cpr-exec live-update tests.
//!
//! A live update is driven exactly as an operator would: `migrate-set-parameters`
//! (`mode: cpr-exec`, `cpr-exec-command`), then `migrate` to a `file:` URI, on a
//! QMP connection that survives the update. [`cpr_update`] does that and collects
//! what the VMM reports: the `MIGRATION` statuses, the `STOP`/`RESUME` events and
//! `query-migrate` (with its `x-cpr` member) from the process that ended the update.
//!
//! The rest inspects processes through `/proc`: which fd is the QMP listener (for
//! the fault-injection wrapper `cpr-fault`), which fds are guest-RAM memfds, and a
//! normalised view of all open fds so that leaks across an exec show up as a
//! difference.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};

use crate::binaries::{build_binaries, target_dir, workspace_root};
use crate::heartbeat::{HeartbeatLog, assert_ticks_consecutive, parse_heartbeats};
use crate::procfs::{OpenFd, list_fds};
use crate::qmp::{QmpClient, QmpError, event_timestamp};

/// The build tag of the second, differently built `vmm` (its version is `0.1.0+alt`).
pub const ALT_BUILD_TAG: &str = "alt";

/// The target directory of the second build.
pub fn alt_target_dir() -> PathBuf {
    target_dir().join("alt")
}

/// A second `vmm`, built with `CPR_VMM_BUILD_TAG=alt` into `target/alt` (once per
/// test process; env `CPR_ALT_VMM_BIN` overrides and skips the build).
///
/// It is a real second build: its version string (`0.1.0+alt`) and its checksum
/// differ from `target/release/vmm`.
///
/// # Panics
/// If the build fails; the message holds cargo's output.
pub fn alt_vmm_bin() -> PathBuf {
    static OUTCOME: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if let Some(path) = std::env::var_os("CPR_ALT_VMM_BIN") {
        return PathBuf::from(path);
    }
    match OUTCOME.get_or_init(build_alt_vmm) {
        Ok(path) => path.clone(),
        Err(message) => panic!("{message}"),
    }
}

fn build_alt_vmm() -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = workspace_root();
    let dir = alt_target_dir();
    eprintln!(
        "cpr-tests: building the second vmm: CPR_VMM_BUILD_TAG={ALT_BUILD_TAG} \
         CARGO_TARGET_DIR={} cargo build --release -p vmm",
        dir.display()
    );
    let output = Command::new(&cargo)
        .args(["build", "--release", "-p", "vmm"])
        .env("CARGO_TARGET_DIR", &dir)
        .env("CPR_VMM_BUILD_TAG", ALT_BUILD_TAG)
        .current_dir(&root)
        .output()
        .map_err(|e| format!("cannot run {cargo:?} build in {}: {e}", root.display()))?;
    if !output.status.success() {
        return Err(format!(
            "building the alt vmm failed ({})\n--- stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
        ));
    }
    Ok(dir.join("release").join("vmm"))
}

/// A `Command` for `program` whose child inherits no fd but stdin, stdout and
/// stderr: every other fd of this test process (cargo's jobserver pipe, other
/// tests' files) is made close-on-exec in the child just before it executes.
///
/// Tests that judge a VMM's fd hygiene need this, or fds the test harness leaked
/// into the VMM would be blamed on it.
pub fn command_without_inherited_fds(program: impl AsRef<std::ffi::OsStr>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(program);
    // The closure runs between fork and exec.
    // SAFETY: it only makes one async-signal-safe raw syscall (close_range), no allocation.
    unsafe {
        command.pre_exec(|| {
            let rc = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// The fault-injection wrapper (`tests/src/bin/cpr-fault.rs`), built with the
/// workspace's binaries (env `CPR_FAULT_BIN` overrides).
pub fn fault_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CPR_FAULT_BIN") {
        return PathBuf::from(path);
    }
    build_binaries();
    target_dir().join("release").join("cpr-fault")
}

/// What one live update looked like from the QMP connection that asked for it.
#[derive(Debug, Clone)]
pub struct Update {
    /// The `MIGRATION` statuses seen, in order (`active`, then `completed` or `failed`).
    pub statuses: Vec<String>,
    /// The `STOP` event, if the guest was running.
    pub stop: Option<Value>,
    /// The `RESUME` event, if the guest was running.
    pub resume: Option<Value>,
    /// `query-migrate` after the update ended.
    pub info: Value,
}

impl Update {
    /// The final status (`completed`, `failed`).
    pub fn status(&self) -> &str {
        self.info["status"].as_str().unwrap_or("<none>")
    }

    /// `query-migrate`'s `error-desc`, or "" when there is none.
    pub fn error_desc(&self) -> &str {
        self.info["error-desc"].as_str().unwrap_or("")
    }

    /// The `x-cpr` member (`Value::Null` when absent).
    pub fn x_cpr(&self) -> &Value {
        &self.info["x-cpr"]
    }

    /// Guest stopped to guest running, in nanoseconds, as the VMM measured it.
    pub fn blackout_ns(&self) -> Option<u64> {
        self.x_cpr()["blackout-ns"].as_u64()
    }

    pub fn from_version(&self) -> &str {
        self.x_cpr()["from-version"].as_str().unwrap_or("<none>")
    }

    pub fn to_version(&self) -> &str {
        self.x_cpr()["to-version"].as_str().unwrap_or("<none>")
    }

    pub fn rolled_back(&self) -> Option<bool> {
        self.x_cpr()["rolled-back"].as_bool()
    }

    /// The `(name, ns)` phases of the blackout.
    pub fn phases(&self) -> Vec<(String, u64)> {
        self.x_cpr()["phases"]
            .as_array()
            .map(|phases| {
                phases
                    .iter()
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap_or("?").to_string(),
                            p["ns"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `RESUME` minus `STOP` timestamp, in seconds (wall clock of two processes).
    pub fn event_gap_s(&self) -> Option<f64> {
        Some(event_timestamp(self.resume.as_ref()?) - event_timestamp(self.stop.as_ref()?))
    }
}

/// `migrate-set-parameters {"mode": "cpr-exec", "cpr-exec-command": command}`.
pub fn set_cpr_exec_command(qmp: &mut QmpClient, command: &[String]) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-parameters",
        json!({ "mode": "cpr-exec", "cpr-exec-command": command }),
    )
    .map(drop)
}

/// Runs one cpr-exec live update: sets the parameters, `migrate`s to `file:state`,
/// and waits for it to end (see [`wait_update_end`]). `guest_running` says whether
/// the guest runs now, i.e. whether `STOP` and `RESUME` are due.
pub fn cpr_update(
    qmp: &mut QmpClient,
    command: &[String],
    state: &Path,
    guest_running: bool,
    timeout: Duration,
) -> Result<Update, QmpError> {
    set_cpr_exec_command(qmp, command)?;
    qmp.execute(
        "migrate",
        json!({ "uri": format!("file:{}", state.display()) }),
    )?;
    wait_update_end(qmp, guest_running, timeout)
}

/// Waits for the `MIGRATION` event that ends an update (`completed` or `failed`),
/// then for `STOP` and `RESUME` if the guest was running, then asks `query-migrate`.
pub fn wait_update_end(
    qmp: &mut QmpClient,
    guest_running: bool,
    timeout: Duration,
) -> Result<Update, QmpError> {
    let mut statuses = Vec::new();
    loop {
        let event = qmp.wait_event("MIGRATION", timeout)?;
        let status = event["data"]["status"]
            .as_str()
            .unwrap_or("<none>")
            .to_string();
        statuses.push(status.clone());
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            break;
        }
    }
    let (stop, resume) = if guest_running {
        (
            Some(qmp.wait_event("STOP", timeout)?),
            Some(qmp.wait_event("RESUME", timeout)?),
        )
    } else {
        (None, None)
    };
    let info = qmp.execute("query-migrate", Value::Null)?;
    Ok(Update {
        statuses,
        stop,
        resume,
        info,
    })
}

/// The command line of a cpr-exec update through the shim:
/// `cpr-shim SHIM_ARGS -- VMM VMM_ARGS -incoming file:STATE`.
pub fn shim_command(
    shim: &Path,
    shim_args: &[String],
    vmm: &Path,
    vmm_args: &[String],
    state: &Path,
) -> Vec<String> {
    let mut command = vec![shim.display().to_string()];
    command.extend(shim_args.iter().cloned());
    command.push("--".into());
    command.extend(direct_command(vmm, vmm_args, state));
    command
}

/// Update number `i` of a series that alternates builds (even: the second build, odd:
/// `target/release/vmm`) and ways (every third one direct, the others through the shim), as the
/// many-update tests do; returns the command and "direct" or "shim".
pub fn alternating_update(
    i: usize,
    vmm_args: &[String],
    state: &Path,
) -> (Vec<String>, &'static str) {
    let target = if i.is_multiple_of(2) {
        alt_vmm_bin()
    } else {
        crate::vmm_bin()
    };
    if i.is_multiple_of(3) {
        (direct_command(&target, vmm_args, state), "direct")
    } else {
        let command = shim_command(&crate::shim_bin(), &[], &target, vmm_args, state);
        (command, "shim")
    }
}

/// The command line of a direct update (no shim): `VMM VMM_ARGS -incoming file:STATE`.
pub fn direct_command(vmm: &Path, vmm_args: &[String], state: &Path) -> Vec<String> {
    let mut command = vec![vmm.display().to_string()];
    command.extend(vmm_args.iter().cloned());
    command.push("-incoming".into());
    command.push(format!("file:{}", state.display()));
    command
}

/// Checks a complete heartbeat console log (from boot): every vCPU in `0..cpus`
/// printed `start` exactly once, its ticks start at 1 and go up by one, and no
/// line is garbled.
pub fn check_heartbeat_from_boot(text: &str, cpus: u32) -> Result<HeartbeatLog, String> {
    let log = parse_heartbeats(text);
    if !log.malformed.is_empty() {
        return Err(format!("garbled heartbeat lines: {:?}", log.malformed));
    }
    let mut started = log.started.clone();
    started.sort_unstable();
    let expected: Vec<u32> = (0..cpus).collect();
    if started != expected {
        return Err(format!(
            "`heartbeat: cpu N start` lines: {:?}, expected each of {expected:?} exactly once \
             (a repeated start means the guest was rebooted)",
            log.started
        ));
    }
    for cpu in 0..cpus {
        match log.ticks.get(&cpu).and_then(|t| t.first()) {
            Some(1) => {}
            other => return Err(format!("cpu {cpu}: first tick is {other:?}, expected 1")),
        }
    }
    if log.ticks.len() != cpus as usize {
        return Err(format!(
            "ticks from cpus {:?}, expected 0..{cpus}",
            log.ticks.keys().collect::<Vec<_>>()
        ));
    }
    assert_ticks_consecutive(&log.ticks)?;
    Ok(log)
}

/// The inode of the listening UNIX socket bound at `path` (from `/proc/net/unix`).
pub fn listening_socket_inode(path: &Path) -> io::Result<Option<u64>> {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    let table = std::fs::read_to_string("/proc/net/unix")?;
    let wanted = path.display().to_string();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 || fields[7] != wanted {
            continue;
        }
        let flags = u32::from_str_radix(fields[3], 16).unwrap_or(0);
        if flags & SO_ACCEPTCON != 0 {
            return Ok(fields[6].parse().ok());
        }
    }
    Ok(None)
}

/// The fd of `pid` that is the listening socket bound at `path`.
pub fn listener_fd(pid: u32, path: &Path) -> io::Result<Option<i32>> {
    let Some(inode) = listening_socket_inode(path)? else {
        return Ok(None);
    };
    let target = format!("socket:[{inode}]");
    Ok(list_fds(pid)?
        .into_iter()
        .find(|fd| fd.target == target)
        .map(|fd| fd.fd))
}

/// The memfd name of an fd's link target (`/memfd:NAME (deleted)` → `NAME`).
pub fn memfd_name(open: &OpenFd) -> Option<&str> {
    let rest = open.target.strip_prefix("/memfd:")?;
    Some(rest.strip_suffix(" (deleted)").unwrap_or(rest))
}

/// The guest-RAM memfds (`guest-ram-*`) among `fds`.
pub fn ram_memfds(fds: &[OpenFd]) -> Vec<&OpenFd> {
    fds.iter()
        .filter(|fd| memfd_name(fd).is_some_and(|n| n.starts_with("guest-ram")))
        .collect()
}

/// The fd number of the guest-RAM memfd `name` (e.g. `guest-ram-low`) of `pid`.
pub fn ram_fd(pid: u32, name: &str) -> io::Result<Option<i32>> {
    Ok(list_fds(pid)?
        .into_iter()
        .find(|fd| memfd_name(fd) == Some(name))
        .map(|fd| fd.fd))
}

/// What an fd is, without the parts that differ between two equal processes:
/// `socket:[123]` → `socket`; `anon_inode:[eventfd]` and `anon_inode:kvm-vcpu:0` stay;
/// memfds keep their name.
pub fn fd_kind(open: &OpenFd) -> String {
    let target = open.target.as_str();
    if let Some((kind, rest)) = target.split_once(":[")
        && rest
            .strip_suffix(']')
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
    {
        return kind.to_string();
    }
    target
        .strip_suffix(" (deleted)")
        .unwrap_or(target)
        .to_string()
}

/// How many fds of each kind `pid` has open (see [`fd_kind`]).
pub fn fd_kinds(pid: u32) -> io::Result<BTreeMap<String, usize>> {
    let mut kinds = BTreeMap::new();
    for open in list_fds(pid)? {
        *kinds.entry(fd_kind(&open)).or_insert(0) += 1;
    }
    Ok(kinds)
}

/// `(device, inode)` of what `/proc/PID/fd/FD` refers to.
pub fn fd_identity(pid: u32, fd: i32) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))?;
    Ok((meta.dev(), meta.ino()))
}

/// Minimum, median and maximum of `values` (which must not be empty).
pub fn min_median_max(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (sorted[0], median, sorted[n - 1])
}

/// A copy of `vmm` at `dest` (mode 0755) whose compatibility note claims other formats: it
/// reads state files `state` and CPR states `cpr` (oldest, newest), where `None` keeps what
/// the note says. The program itself is unchanged; only the claim the shim reads differs, as
/// in a build of a future version that dropped today's formats.
///
/// # Panics
/// If `vmm` cannot be read or written, or does not hold exactly one note.
pub fn vmm_claiming_formats(
    vmm: &Path,
    dest: &Path,
    state: Option<(u32, u32)>,
    cpr: Option<(u32, u32)>,
) -> PathBuf {
    use cpr_common::compat::{NOTE_NAME, NOTE_TYPE, read_note};
    use std::os::unix::fs::PermissionsExt;
    let mut image = std::fs::read(vmm).unwrap_or_else(|e| panic!("reading {}: {e}", vmm.display()));
    let mut header = Vec::new();
    header.extend_from_slice(&(NOTE_NAME.len() as u32).to_le_bytes());
    header.extend_from_slice(&(cpr_common::compat::DESC_LEN_WITH_FEATURES as u32).to_le_bytes());
    header.extend_from_slice(&NOTE_TYPE.to_le_bytes());
    header.extend_from_slice(&NOTE_NAME);
    let found: Vec<usize> = image
        .windows(header.len())
        .enumerate()
        .filter(|(_, w)| *w == header.as_slice())
        .map(|(at, _)| at)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{}: CPR-VMM notes at {found:?}",
        vmm.display()
    );
    let desc = found[0] + header.len();
    let mut put = |at: usize, (oldest, newest): (u32, u32)| {
        image[at..at + 4].copy_from_slice(&oldest.to_le_bytes());
        image[at + 4..at + 8].copy_from_slice(&newest.to_le_bytes());
    };
    if let Some(versions) = state {
        put(desc, versions);
    }
    if let Some(versions) = cpr {
        put(desc + 8, versions);
    }
    std::fs::write(dest, &image).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755)).unwrap();
    let note = std::fs::File::open(dest)
        .map_err(|e| e.to_string())
        .and_then(|f| read_note(&f).map_err(|e| e.to_string()))
        .unwrap_or_else(|e| panic!("{}: {e}", dest.display()));
    if let Some(versions) = state {
        assert_eq!(note.state_versions, versions);
    }
    if let Some(versions) = cpr {
        assert_eq!(note.cpr_versions, versions);
    }
    dest.to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tempdir::TempDir;
    use std::os::unix::net::UnixListener;

    #[test]
    fn heartbeat_from_boot_accepts_a_clean_log_and_rejects_a_restart() {
        let good = "heartbeat: cpu 1 start\nheartbeat: cpu 0 start\nheartbeat: cpu 0 tick 1\n\
                    heartbeat: cpu 1 tick 1\nheartbeat: cpu 0 tick 2\n";
        let log = check_heartbeat_from_boot(good, 2).unwrap();
        assert_eq!(log.ticks[&0], [1, 2]);
        let restarted = format!("{good}heartbeat: cpu 0 start\nheartbeat: cpu 0 tick 1\n");
        assert!(check_heartbeat_from_boot(&restarted, 2).is_err());
        let gap = "heartbeat: cpu 0 start\nheartbeat: cpu 0 tick 1\nheartbeat: cpu 0 tick 3\n";
        assert!(check_heartbeat_from_boot(gap, 1).is_err());
        let late = "heartbeat: cpu 0 start\nheartbeat: cpu 0 tick 2\n";
        assert!(check_heartbeat_from_boot(late, 1).is_err());
        assert!(check_heartbeat_from_boot(good, 3).is_err());
    }

    #[test]
    fn finds_a_listening_socket_fd_in_our_own_process() {
        let dir = TempDir::new("cprlib").unwrap();
        let path = dir.join("l.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let fd = listener_fd(std::process::id(), &path).unwrap();
        use std::os::fd::AsRawFd;
        assert_eq!(fd, Some(listener.as_raw_fd()));
        assert_eq!(listening_socket_inode(&dir.join("none")).unwrap(), None);
    }

    #[test]
    fn fd_kinds_normalise_inodes() {
        let open = |target: &str| OpenFd {
            fd: 3,
            target: target.into(),
            flags: 0,
        };
        assert_eq!(fd_kind(&open("socket:[1234]")), "socket");
        assert_eq!(fd_kind(&open("pipe:[9]")), "pipe");
        assert_eq!(
            fd_kind(&open("anon_inode:[eventfd]")),
            "anon_inode:[eventfd]"
        );
        assert_eq!(
            fd_kind(&open("/memfd:guest-ram-low (deleted)")),
            "/memfd:guest-ram-low"
        );
        assert_eq!(
            fd_kind(&open("anon_inode:kvm-vcpu:0")),
            "anon_inode:kvm-vcpu:0"
        );
        assert_eq!(
            memfd_name(&open("/memfd:guest-ram-low (deleted)")),
            Some("guest-ram-low")
        );
        assert_eq!(memfd_name(&open("/dev/null")), None);
    }

    #[test]
    fn min_median_max_of_odd_and_even_counts() {
        assert_eq!(min_median_max(&[3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(min_median_max(&[4.0, 1.0, 2.0, 3.0]), (1.0, 2.5, 4.0));
    }

    #[test]
    fn commands_put_incoming_last() {
        let args = vec!["-m".to_string(), "16M".to_string()];
        let cmd = shim_command(
            Path::new("/s"),
            &["--log".into(), "/l".into()],
            Path::new("/v"),
            &args,
            Path::new("/st"),
        );
        assert_eq!(
            cmd,
            [
                "/s",
                "--log",
                "/l",
                "--",
                "/v",
                "-m",
                "16M",
                "-incoming",
                "file:/st"
            ]
        );
    }
}
