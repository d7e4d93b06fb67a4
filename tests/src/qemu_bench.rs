//! The QEMU side of the blackout benchmark: how long QEMU pauses a guest
//! during its own CPR live updates, measured on this machine in the same run
//! as cpr-vmm's figures.
//!
//! Two QEMU modes are measured, each for one RAM size and `reps` updates:
//!
//! - **cpr-transfer** ([`qemu_cpr_transfer`], QEMU >= 10.0, run from the
//!   host's `qemu-system-x86_64`): a new QEMU is started next to the old one
//!   with `-incoming defer` plus a `cpr` channel (a UNIX socket, over which
//!   the old QEMU passes the guest RAM memfd); the old QEMU gets
//!   `migrate-set-parameters mode=cpr-transfer` and `migrate` with a `main`
//!   and a `cpr` channel, the new one `migrate-incoming` on the main channel
//!   once its monitor is up. The old QEMU stops the guest only after the new
//!   one is fully built, so the pause is just the device-state hand-over.
//!   The repetitions form a chain: the destination of one update is the
//!   source of the next, and the old process is killed after each update.
//! - **cpr-exec** ([`qemu_cpr_exec`], QEMU >= 10.2, run from Debian sid's
//!   `qemu-system-x86_64` in the chroot that `scripts/bench-setup.sh`
//!   builds): `migrate-set-parameters mode=cpr-exec` with a
//!   `cpr-exec-command` that is the same command line plus
//!   `-incoming file:STATE`, then `migrate` to `file:STATE`; QEMU stops the
//!   guest, writes its device state, and execs the new QEMU in the same
//!   process, which maps the preserved memfds, loads the state and resumes.
//!   Before each update every 4 KiB page of guest RAM is touched through
//!   QEMU's own mapping (one byte read with `process_vm_readv` and written
//!   back unchanged with `process_vm_writev`), so QEMU's page tables are as
//!   full as those of a guest that has been running for a while; that is
//!   what makes the exec's address-space teardown cost what it costs.
//!
//! # What the pause is
//!
//! `pause_ms` runs from the old QEMU's `STOP` QMP event to the new QEMU's
//! resume, both by QEMU's own wall-clock timestamps:
//!
//! - cpr-transfer: the destination's `RESUME` QMP event. With `-incoming
//!   defer` our client is connected and negotiated before the destination
//!   can resume, so the event is always caught.
//! - cpr-exec: the monitor does not survive the exec. The old QEMU closes
//!   our connection just before it execs, its listening socket goes with
//!   the exec (a client that connects in between is reset), and the new
//!   QEMU creates a new socket at the same path and serves clients once its
//!   main loop runs, which is about when it resumes the guest; so the new
//!   QEMU's `RESUME` event can only be caught by racing it with connection
//!   attempts during the blackout (QEMU's own qtest instead execs into
//!   `-incoming defer` and sends `migrate-incoming` after reconnecting,
//!   which would put our monitor round trips into the blackout). Every
//!   QEMU here runs with `-trace vm_state_notify -msg timestamp=on`, and
//!   QEMU logs `vm_state_notify running 1` right after emitting `RESUME`
//!   (same function, microseconds apart), so the new QEMU's resume time is
//!   taken from that line on its stderr, and the harness stays idle during
//!   the blackout. [`Measurement::resume_source`] says which was used.
//!
//! [`Measurement::trace_pause_ms`] is the same interval measured only with
//! the trace lines (`running 0` on the old side to `running 1` on the new);
//! in cpr-transfer it cross-checks the QMP figure (it can be a little
//! longer: QEMU sends `STOP` after its state-change handlers, which run
//! after the `running 0` line). For cpr-exec, [`ExecPhases`] splits the
//! pause at QEMU's `cpr_exec` and `cpr_state_load` trace lines. The
//! cpr-exec repetitions are one process chained through its execs.
//!
//! # The guest
//!
//! A 512-byte boot sector on an IDE disk (booted by SeaBIOS) that increments
//! the 32-bit word at guest-physical 0x500 in a tight loop, so a vCPU always
//! runs guest code. The harness reads the word with HMP `xp` to wait for the
//! boot and to check that the guest runs again after each update. Guest RAM
//! is `memory-backend-memfd,share=on,prealloc=on` with
//! `-machine memory-backend=ram0,aux-ram-share=on`, as QEMU's CPR
//! documentation requires.
//!
//! For cpr-exec the exec'd command line has `prealloc=off` by default: the
//! RAM's pages already exist in the preserved memfd, and QEMU would
//! otherwise fault every page into its new page tables inside the blackout
//! (set [`CprExecOptions::keep_prealloc`] to measure that).
//!
//! # The chroot
//!
//! Chroot QEMUs run as `unshare --mount -- sh -c '…mount…; exec chroot ROOT
//! qemu-system-x86_64 …'`: a private mount namespace where /dev, /proc, /sys
//! and the run's own scratch directory (at the same path as outside, so
//! socket and file names are the same on both sides) are bind-mounted; the
//! mounts vanish with the process, nothing stays mounted on the host.
//! `unshare`, `sh` and `chroot` all exec, so the process we spawn *is* QEMU
//! (same pid). The chroot is `$CPR_BENCH_SID_CHROOT`, default
//! [`DEFAULT_SID_CHROOT`]; the mount point directories created inside it are
//! removed again afterwards.
//!
//! Every QEMU runs in its own process group through [`VmmProcess`], which
//! kills and reaps it on every path; every wait has a deadline.

use std::fmt;
use std::fs;
use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::uio::{RemoteIoVec, process_vm_readv, process_vm_writev};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::{Value, json};

use crate::process::{Stream, VmmProcess};
use crate::qmp::{QmpClient, event_timestamp};

/// Where `scripts/bench-setup.sh` builds the Debian sid chroot.
pub const DEFAULT_SID_CHROOT: &str = "/var/tmp/cpr-bench/sid";
/// Environment variable overriding [`DEFAULT_SID_CHROOT`].
pub const SID_CHROOT_ENV: &str = "CPR_BENCH_SID_CHROOT";
/// Environment variable naming the host QEMU binary (default: `qemu-system-x86_64` on `PATH`).
pub const HOST_QEMU_ENV: &str = "CPR_BENCH_HOST_QEMU";
/// QEMU binary inside the chroot.
const CHROOT_QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// First QEMU with cpr-transfer.
pub const CPR_TRANSFER_MIN: QemuVersion = QemuVersion::new(10, 0, 0);
/// First QEMU with cpr-exec.
pub const CPR_EXEC_MIN: QemuVersion = QemuVersion::new(10, 2, 0);

/// Guest-physical address of the boot sector's loop counter.
const BOOT_COUNTER_ADDR: u64 = 0x500;
const PAGE: u64 = 4096;
/// Pages per `process_vm_readv`/`writev` call (IOV_MAX).
const TOUCH_BATCH: usize = 1024;

/// How long a (SeaBIOS) boot into the loop may take; nested KVM is slow at
/// the BIOS's port I/O, a boot takes ~5 s here.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Anything a single migration step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// `--version` runs.
const VERSION_TIMEOUT: Duration = Duration::from_secs(20);

/// The boot sector: `cli; xor ax,ax; mov ds,ax; 1: incl [0x500]; jmp 1b`,
/// padded to 510 bytes and followed by the 0xAA55 signature.
const BOOT_CODE: [u8; 12] = [
    0xfa, // cli
    0x31, 0xc0, // xor %ax,%ax
    0x8e, 0xd8, // mov %ax,%ds
    0x66, 0xff, 0x06, 0x00, 0x05, // 1: incl 0x500
    0xeb, 0xf9, // jmp 1b
];

/// A QEMU version (`major.minor.micro`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl QemuVersion {
    pub const fn new(major: u32, minor: u32, micro: u32) -> Self {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }

    /// Parses `QEMU emulator version 10.0.2 (Debian …)` (or just `10.0.2`).
    pub fn parse(text: &str) -> Option<Self> {
        let rest = match text.find("version ") {
            Some(at) => &text[at + "version ".len()..],
            None => text,
        };
        let word: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = word.split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next().flatten().unwrap_or(0);
        let micro = parts.next().flatten().unwrap_or(0);
        Some(QemuVersion::new(major, minor, micro))
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The host's QEMU (used for cpr-transfer).
#[derive(Debug, Clone, Serialize)]
pub struct HostQemu {
    pub binary: PathBuf,
    pub version: QemuVersion,
    /// First line of `--version`.
    pub version_line: String,
}

/// The QEMU inside the sid chroot (used for cpr-exec).
#[derive(Debug, Clone, Serialize)]
pub struct ChrootQemu {
    pub root: PathBuf,
    /// Path of the binary inside the chroot.
    pub binary: PathBuf,
    pub version: QemuVersion,
    pub version_line: String,
}

/// What QEMU the machine has for the comparison; each side is `Err(reason)`
/// when it cannot be used.
#[derive(Debug, Clone)]
pub struct QemuInstall {
    /// The host's QEMU >= 10.0, for [`qemu_cpr_transfer`].
    pub transfer: Result<HostQemu, String>,
    /// The sid chroot's QEMU >= 10.2, for [`qemu_cpr_exec`].
    pub exec: Result<ChrootQemu, String>,
}

impl QemuInstall {
    /// Looks for the host QEMU (`$CPR_BENCH_HOST_QEMU` or
    /// `qemu-system-x86_64` on `PATH`, needs >= 10.0) and the sid chroot's
    /// (`$CPR_BENCH_SID_CHROOT`, default [`DEFAULT_SID_CHROOT`], needs >=
    /// 10.2 and root). Never fails: a missing piece is an `Err` reason.
    pub fn detect() -> Self {
        let kvm = kvm_usable();
        let transfer = kvm.clone().and_then(|()| detect_host());
        let exec = kvm.and_then(|()| detect_chroot());
        QemuInstall { transfer, exec }
    }

    /// Whether [`qemu_cpr_transfer`] can run.
    pub fn cpr_transfer_available(&self) -> bool {
        self.transfer.is_ok()
    }

    /// Whether [`qemu_cpr_exec`] can run.
    pub fn cpr_exec_available(&self) -> bool {
        self.exec.is_ok()
    }

    /// Two lines for a report, e.g.
    /// `cpr-transfer: QEMU 10.0.2 (/usr/bin/qemu-system-x86_64)`.
    pub fn describe(&self) -> String {
        let transfer = match &self.transfer {
            Ok(q) => format!("QEMU {} ({})", q.version, q.binary.display()),
            Err(why) => format!("unavailable: {why}"),
        };
        let exec = match &self.exec {
            Ok(q) => format!(
                "QEMU {} ({} in chroot {})",
                q.version,
                q.binary.display(),
                q.root.display()
            ),
            Err(why) => format!("unavailable: {why}"),
        };
        format!("cpr-transfer: {transfer}\ncpr-exec: {exec}")
    }
}

fn kvm_usable() -> Result<(), String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs a short command and returns its stdout, bounded in time.
fn run_short(command: Command, what: &str) -> Result<String, String> {
    let process = VmmProcess::spawn(command).map_err(|e| format!("cannot run {what}: {e}"))?;
    let status = process
        .wait_exit(VERSION_TIMEOUT)
        .map_err(|e| format!("{what}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "{what} failed ({status}): {}",
            process.stderr_text().trim()
        ));
    }
    Ok(process.stdout_text())
}

fn version_from_output(output: &str, what: &str) -> Result<(QemuVersion, String), String> {
    let line = output.lines().next().unwrap_or("").trim().to_owned();
    let version =
        QemuVersion::parse(&line).ok_or_else(|| format!("{what}: no version in {line:?}"))?;
    Ok((version, line))
}

fn detect_host() -> Result<HostQemu, String> {
    let binary = match std::env::var_os(HOST_QEMU_ENV) {
        Some(path) => PathBuf::from(path),
        None => find_in_path("qemu-system-x86_64").ok_or(
            "no qemu-system-x86_64 on PATH (run scripts/bench-setup.sh as root)".to_owned(),
        )?,
    };
    let mut command = Command::new(&binary);
    command.arg("--version");
    let what = format!("{} --version", binary.display());
    let (version, version_line) = version_from_output(&run_short(command, &what)?, &what)?;
    if version < CPR_TRANSFER_MIN {
        return Err(format!(
            "host QEMU {version} at {} has no cpr-transfer (needs >= {CPR_TRANSFER_MIN}; \
             scripts/bench-setup.sh installs it from bookworm-backports)",
            binary.display()
        ));
    }
    Ok(HostQemu {
        binary,
        version,
        version_line,
    })
}

fn detect_chroot() -> Result<ChrootQemu, String> {
    let root = std::env::var_os(SID_CHROOT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SID_CHROOT));
    let inside = root.join(CHROOT_QEMU.trim_start_matches('/'));
    if !inside.is_file() {
        return Err(format!(
            "no {} in the sid chroot {} (run scripts/bench-setup.sh as root)",
            CHROOT_QEMU,
            root.display()
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("running QEMU in the sid chroot needs root".into());
    }
    if find_in_path("unshare").is_none() {
        return Err("no unshare (util-linux) on PATH".into());
    }
    let mut command = Command::new("chroot");
    command.arg(&root).arg(CHROOT_QEMU).arg("--version");
    let what = format!("chroot {} {CHROOT_QEMU} --version", root.display());
    let (version, version_line) = version_from_output(&run_short(command, &what)?, &what)?;
    if version < CPR_EXEC_MIN {
        return Err(format!(
            "chroot QEMU {version} has no cpr-exec (needs >= {CPR_EXEC_MIN})"
        ));
    }
    Ok(ChrootQemu {
        root,
        binary: PathBuf::from(CHROOT_QEMU),
        version,
        version_line,
    })
}

/// Which CPR mode a measurement is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CprMode {
    CprTransfer,
    CprExec,
}

impl fmt::Display for CprMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CprMode::CprTransfer => "cpr-transfer",
            CprMode::CprExec => "cpr-exec",
        })
    }
}

/// Where the resume timestamp came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResumeSource {
    /// The new QEMU's `RESUME` QMP event.
    QmpEvent,
    /// The new QEMU's `vm_state_notify running 1` trace line (logged right
    /// after it emits `RESUME`).
    Trace,
}

/// One QEMU live update.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub mode: CprMode,
    pub qemu_version: QemuVersion,
    pub ram_mib: u64,
    /// 0-based index of the update in its run.
    pub rep: usize,
    /// Guest pause: old QEMU's `STOP` event to the new QEMU's resume.
    pub pause_ms: f64,
    /// `STOP` event timestamp (Unix seconds, QEMU's clock).
    pub stop_timestamp: f64,
    /// Resume timestamp (Unix seconds, QEMU's clock).
    pub resume_timestamp: f64,
    pub resume_source: ResumeSource,
    /// The pause by QEMU's `vm_state_notify` trace lines alone, if both
    /// were seen.
    pub trace_pause_ms: Option<f64>,
    /// From sending `migrate` (the harness's wall clock) to the `STOP`
    /// event's timestamp (cpr-transfer: includes building the new QEMU's
    /// machine, and our `migrate-incoming`).
    pub migrate_to_stop_ms: f64,
    /// Pages touched through QEMU's mapping before the update (cpr-exec).
    pub touched_pages: u64,
    /// How long touching them took.
    pub touch_ms: f64,
    /// Guest counter increments seen in a short interval after the update
    /// (proves the vCPU runs again).
    pub guest_progress: u64,
    /// cpr-exec only: where the pause went, by QEMU's trace lines.
    pub exec_phases: Option<ExecPhases>,
}

/// Where a cpr-exec pause went, by QEMU's `cpr_exec` and `cpr_state_load`
/// trace lines (ms).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ExecPhases {
    /// `STOP` to the old QEMU's `cpr_exec`: stop the vCPUs, save the device
    /// state to the file.
    pub stop_to_exec_ms: f64,
    /// `cpr_exec` to the new QEMU's `cpr_state_load`: the exec (including
    /// tearing down the old address space) and the new QEMU's start-up.
    pub exec_to_cpr_load_ms: f64,
    /// `cpr_state_load` to resume: map the preserved RAM, build the
    /// machine, load the device state.
    pub cpr_load_to_resume_ms: f64,
}

/// min / median / p99 / max of the pauses, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PauseSummary {
    pub count: usize,
    pub min_ms: f64,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Summarizes `pause_ms` (nearest-rank percentiles; the median of an even
/// count is the mean of the middle two). `None` for no measurements.
pub fn summarize(measurements: &[Measurement]) -> Option<PauseSummary> {
    let mut pauses: Vec<f64> = measurements.iter().map(|m| m.pause_ms).collect();
    if pauses.is_empty() {
        return None;
    }
    pauses.sort_by(f64::total_cmp);
    let n = pauses.len();
    let median = if n % 2 == 1 {
        pauses[n / 2]
    } else {
        (pauses[n / 2 - 1] + pauses[n / 2]) / 2.0
    };
    let p99_rank = ((0.99 * n as f64).ceil() as usize).clamp(1, n);
    Some(PauseSummary {
        count: n,
        min_ms: pauses[0],
        median_ms: median,
        p99_ms: pauses[p99_rank - 1],
        max_ms: pauses[n - 1],
    })
}

/// The guest a QEMU measurement runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuGuest {
    /// The boot sector counting at 0x500 on an IDE disk: no I/O during the update.
    BootSector,
    /// The blkcheck driver guest's bzImage (`kernel`, see [`crate::blkcheck`]) keeping `depth`
    /// 4 KiB requests in flight on a `-device virtio-blk-pci` disk of `disk_mib` MiB (a fresh
    /// raw image): the update happens with I/O in flight.
    Blkcheck {
        kernel: PathBuf,
        depth: u32,
        disk_mib: u64,
    },
}

impl QemuGuest {
    /// The guest-physical address of a 32-bit word that keeps rising while the guest works:
    /// the boot sector's loop counter, or blkcheck's completed-requests counter.
    fn counter_addr(&self) -> u64 {
        match self {
            QemuGuest::BootSector => BOOT_COUNTER_ADDR,
            QemuGuest::Blkcheck { .. } => crate::blkcheck::COUNTERS_ADDR + 8,
        }
    }

    /// Writes the guest's disk image to `disk`.
    fn write_disk(&self, disk: &Path) -> Result<(), String> {
        match self {
            QemuGuest::BootSector => write_boot_image(disk),
            QemuGuest::Blkcheck { disk_mib, .. } => fs::File::create(disk)
                .and_then(|f| f.set_len(disk_mib << 20))
                .map_err(|e| format!("creating {}: {e}", disk.display())),
        }
    }

    /// The command-line arguments that give the guest its code and its disk.
    fn args(&self, disk: &Path) -> Result<Vec<String>, String> {
        Ok(match self {
            QemuGuest::BootSector => vec![
                "-drive".into(),
                format!("file={},format=raw,if=ide", path_str(disk)?),
            ],
            QemuGuest::Blkcheck { kernel, depth, .. } => vec![
                "-kernel".into(),
                path_str(kernel)?.to_owned(),
                "-append".into(),
                format!("blkcheck.depth={depth}"),
                "-drive".into(),
                format!("file={},format=raw,if=none,id=d0", path_str(disk)?),
                "-device".into(),
                "virtio-blk-pci,drive=d0,disable-legacy=on".into(),
            ],
        })
    }
}

/// Options of [`qemu_cpr_exec_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CprExecOptions {
    /// Keep `prealloc=on` in the exec'd command line (QEMU then faults all
    /// guest RAM into its new page tables inside the blackout).
    pub keep_prealloc: bool,
}

// ---------------------------------------------------------------------------
// running QEMU

/// How a QEMU is started.
#[derive(Clone)]
enum Launcher {
    Host(PathBuf),
    /// In the chroot, with the directory `share` bind-mounted at the same path.
    Chroot {
        root: PathBuf,
        binary: PathBuf,
        share: PathBuf,
    },
}

/// Mounts /dev, /proc, /sys and the shared directory into the chroot in a
/// private mount namespace, then execs `chroot ROOT CMD...`. The mount
/// point of the shared directory exists already ([`MountPoint`]).
const CHROOT_SCRIPT: &str = r#"set -e
root=$1; share=$2; shift 2
mount --rbind /dev "$root/dev"
mount --bind /proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --bind "$share" "$root$share"
exec chroot "$root" "$@""#;

impl Launcher {
    fn command(&self, args: &[String]) -> Command {
        match self {
            Launcher::Host(binary) => {
                let mut command = Command::new(binary);
                command.args(args);
                command
            }
            Launcher::Chroot {
                root,
                binary,
                share,
            } => {
                let mut command = Command::new("unshare");
                command
                    .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
                    .arg(CHROOT_SCRIPT)
                    .arg("cpr-bench-chroot")
                    .arg(root)
                    .arg(share)
                    .arg(binary)
                    .args(args);
                command
            }
        }
    }
}

/// The directories created inside the chroot so that `path` can be
/// bind-mounted at the same path there; removed again (if still empty) on
/// drop, which must come after the QEMU using them is gone.
struct MountPoint {
    created: Vec<PathBuf>,
}

impl MountPoint {
    fn new(root: &Path, path: &Path) -> Result<Self, String> {
        let relative = path
            .strip_prefix("/")
            .map_err(|_| format!("mount point {} is not an absolute path", path.display()))?;
        let mut created = Vec::new();
        let mut dir = root.to_path_buf();
        for part in relative.components() {
            dir.push(part);
            match fs::create_dir(&dir) {
                Ok(()) => created.push(dir.clone()),
                // A symlink here would be followed outside the chroot.
                Err(e)
                    if e.kind() == std::io::ErrorKind::AlreadyExists
                        && fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) => {}
                Err(e) => {
                    drop(MountPoint { created });
                    return Err(format!("creating {} in the chroot: {e}", dir.display()));
                }
            }
        }
        Ok(MountPoint { created })
    }
}

impl Drop for MountPoint {
    fn drop(&mut self) {
        // Deepest first; a directory another run still uses is not empty
        // (it holds that run's own mount point) and stays.
        for dir in self.created.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// One running QEMU (same pid across cpr-exec) and its monitor.
struct QemuVm {
    process: VmmProcess,
    qmp: Option<QmpClient>,
    qmp_path: PathBuf,
    /// Where the guest's progress counter is ([`QemuGuest::counter_addr`]).
    counter_addr: u64,
}

impl QemuVm {
    fn start(
        launcher: &Launcher,
        args: &[String],
        qmp_path: &Path,
        guest: &QemuGuest,
    ) -> Result<Self, String> {
        let process = VmmProcess::spawn(launcher.command(args))
            .map_err(|e| format!("cannot start QEMU: {e}"))?;
        Ok(QemuVm {
            process,
            qmp: None,
            qmp_path: qmp_path.to_owned(),
            counter_addr: guest.counter_addr(),
        })
    }

    /// (Re)connects to the monitor and negotiates, failing early if QEMU dies.
    fn connect(&mut self, timeout: Duration) -> Result<(), String> {
        self.qmp = None;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = left.min(Duration::from_secs(2));
            match QmpClient::connect_and_negotiate(&self.qmp_path, slice) {
                Ok(mut client) => {
                    client.set_timeout(STEP_TIMEOUT);
                    self.qmp = Some(client);
                    return Ok(());
                }
                Err(e) => {
                    if let Some(status) = self.process.try_wait() {
                        return Err(format!(
                            "QEMU exited ({status}) before its monitor answered: {e}{}",
                            self.stderr_tail()
                        ));
                    }
                    if left.is_zero() {
                        return Err(format!(
                            "QEMU monitor {} not ready within {timeout:?}: {e}{}",
                            self.qmp_path.display(),
                            self.stderr_tail()
                        ));
                    }
                    // A connection that was reset (e.g. accepted by a
                    // listener that then went away in an exec): try again.
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    fn qmp(&mut self) -> Result<&mut QmpClient, String> {
        self.qmp
            .as_mut()
            .ok_or_else(|| "internal: QMP not connected".to_owned())
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let result = self.qmp()?.execute(command, arguments);
        result.map_err(|e| format!("QMP {command}: {e}{}", self.stderr_tail()))
    }

    fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, String> {
        let result = self.qmp()?.wait_event(name, timeout);
        result.map_err(|e| format!("waiting for QMP event {name}: {e}{}", self.stderr_tail()))
    }

    fn status(&mut self) -> Result<String, String> {
        let reply = self.execute("query-status", Value::Null)?;
        Ok(reply["status"].as_str().unwrap_or("?").to_owned())
    }

    /// The 32-bit word at guest-physical `addr`, through HMP `xp` (QEMU's own view of
    /// guest memory).
    fn word(&mut self, addr: u64) -> Result<u32, String> {
        let command = format!("xp /1wx {addr:#x}");
        let result = self.qmp()?.hmp(&command);
        let text = result.map_err(|e| format!("HMP {command}: {e}"))?;
        parse_xp_word(&text).ok_or_else(|| format!("cannot parse HMP {command} output {text:?}"))
    }

    /// The guest's progress counter.
    fn counter(&mut self) -> Result<u32, String> {
        self.word(self.counter_addr)
    }

    /// Waits until the guest's counter is rising.
    fn wait_guest_running(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut last = self.counter()?;
        loop {
            thread::sleep(Duration::from_millis(50));
            let now = self.counter()?;
            if now != 0 && now != last {
                return Ok(());
            }
            last = now;
            if Instant::now() >= deadline {
                return Err(format!(
                    "the guest's counter at {:#x} did not start counting within \
                     {timeout:?} (value {now:#x}){}",
                    self.counter_addr,
                    self.stderr_tail()
                ));
            }
        }
    }

    /// How far the counter moved between a first reading and the first later reading that
    /// differs (polled every 20 ms, for up to [`STEP_TIMEOUT`]); an error if it stands still.
    fn guest_progress(&mut self) -> Result<u64, String> {
        let before = self.counter()?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            thread::sleep(Duration::from_millis(20));
            let after = self.counter()?;
            if after != before {
                return Ok(u64::from(after.wrapping_sub(before)));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the guest does not run after the update (counter at {:#x} stuck at \
                     {after:#x}){}",
                    self.counter_addr,
                    self.stderr_tail()
                ));
            }
        }
    }

    /// For blkcheck: an error if the guest counted a mismatched sector or a failed request
    /// (its counters block, read through QEMU).
    fn check_guest_data(&mut self, guest: &QemuGuest) -> Result<(), String> {
        if let QemuGuest::Blkcheck { .. } = guest {
            let base = crate::blkcheck::COUNTERS_ADDR;
            let (mismatches, errors) = (self.word(base + 0x18)?, self.word(base + 0x20)?);
            if mismatches != 0 || errors != 0 {
                return Err(format!(
                    "blkcheck in QEMU counted {mismatches} mismatched sectors and {errors} \
                     failed requests"
                ));
            }
        }
        Ok(())
    }

    /// Timestamps of the trace lines of `event` so far.
    fn trace_event_times(&self, event: &str) -> Vec<f64> {
        trace_event_times(&self.process.stderr_text(), event, "")
    }

    /// Timestamps of the `vm_state_notify running N` trace lines so far.
    fn trace_times(&self, running: bool) -> Vec<f64> {
        trace_state_times(&self.process.stderr_text(), running)
    }

    /// Waits until there are more than `seen` `running N` trace lines and
    /// returns the timestamp of line number `seen` (0-based).
    fn wait_trace(&self, running: bool, seen: usize, timeout: Duration) -> Result<f64, String> {
        let what = format!("trace line vm_state_notify running {}", u8::from(running));
        self.process
            .wait_for_stream(Stream::Stderr, &what, timeout, |text| {
                trace_state_times(text, running).get(seen).copied()
            })
            .map_err(|e| e.to_string())
    }

    /// Waits until QEMU listens on the UNIX socket `path`, without
    /// connecting to it (QEMU would take a probe for its peer).
    fn wait_listening(&self, path: &Path, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if unix_socket_listening(path)? {
                return Ok(());
            }
            if let Some(status) = self.process.try_wait() {
                return Err(format!(
                    "QEMU exited ({status}) before listening on {}{}",
                    path.display(),
                    self.stderr_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "QEMU did not listen on {} within {timeout:?}{}",
                    path.display(),
                    self.stderr_tail()
                ));
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn stderr_tail(&self) -> String {
        let text = self.process.stderr_text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("vm_state_notify"))
            .collect();
        let tail = lines[lines.len().saturating_sub(8)..].join("\n");
        if tail.is_empty() {
            String::new()
        } else {
            format!("\nQEMU stderr (pid {}):\n{tail}", self.pid())
        }
    }
}

/// Whether a UNIX socket bound to `path` is listening, from
/// `/proc/net/unix` (flag `__SO_ACCEPTCON`, 0x10000).
fn unix_socket_listening(path: &Path) -> Result<bool, String> {
    let table =
        fs::read_to_string("/proc/net/unix").map_err(|e| format!("reading /proc/net/unix: {e}"))?;
    let path = path_str(path)?;
    Ok(table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7..].join(" ") == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    }))
}

/// Parses `0000000000000500: 0x0000582a` (HMP `xp /1wx`).
fn parse_xp_word(text: &str) -> Option<u32> {
    let value = text.split(": ").nth(1)?.trim();
    u32::from_str_radix(value.trim_start_matches("0x"), 16).ok()
}

/// Timestamps (Unix seconds) of `vm_state_notify running 0|1` trace lines.
pub fn trace_state_times(stderr: &str, running: bool) -> Vec<f64> {
    let args = if running { "running 1 " } else { "running 0 " };
    trace_event_times(stderr, "vm_state_notify", args)
}

/// Timestamps (Unix seconds) of the trace lines of `event` whose arguments
/// start with `args_prefix`.
///
/// QEMU's `-msg timestamp=on` gives either `PID@SECONDS.MICROS:event args`
/// (QEMU 10.0's log backend) or `YYYY-MM-DDTHH:MM:SS.ffffffZ event args`
/// (11.x); both are the wall clock, like QMP event timestamps.
pub fn trace_event_times(stderr: &str, event: &str, args_prefix: &str) -> Vec<f64> {
    stderr
        .lines()
        .filter_map(parse_trace_line)
        .filter(|(_, name, args)| *name == event && args.starts_with(args_prefix))
        .map(|(time, _, _)| time)
        .collect()
}

/// Splits a trace line into (timestamp, event name, arguments).
fn parse_trace_line(line: &str) -> Option<(f64, &str, &str)> {
    let (time, rest) = match line.split_once('@') {
        Some((pid, rest)) if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) => {
            let (time, rest) = rest.split_once(':')?;
            (time.parse().ok()?, rest)
        }
        _ => {
            let (time, rest) = line.split_once(' ')?;
            (parse_iso8601_utc(time)?, rest)
        }
    };
    let (name, args) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((time, name, args))
}

/// `2026-11-26T11:59:25.273810Z` to Unix seconds.
fn parse_iso8601_utc(text: &str) -> Option<f64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let hour: i64 = t.next()?.parse().ok()?;
    let minute: i64 = t.next()?.parse().ok()?;
    let second: f64 = t.next()?.parse().ok()?;
    // Days from civil (proleptic Gregorian), after Howard Hinnant's algorithm.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hour * 3600 + minute * 60) as f64 + second)
}

// ---------------------------------------------------------------------------
// touching guest RAM through QEMU's mapping

/// QEMU's mapping of the guest RAM memfd: a shared `/memfd:` mapping of
/// exactly `ram_bytes` in `/proc/PID/maps`.
fn find_ram_mapping(pid: u32, ram_bytes: u64) -> Result<u64, String> {
    let path = format!("/proc/{pid}/maps");
    let maps = fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    let mut found = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let name = fields.nth(3).unwrap_or("");
        if !name.starts_with("/memfd:") || !perms.starts_with("rw") || !perms.ends_with('s') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        if end - start == ram_bytes {
            found.push((start, name.to_owned()));
        }
    }
    match found.as_slice() {
        [(start, _)] => Ok(*start),
        [] => Err(format!(
            "no shared /memfd: mapping of {ram_bytes} bytes in {path}"
        )),
        several => {
            // Prefer the memory backend's own memfd.
            let backend: Vec<_> = several
                .iter()
                .filter(|(_, name)| name.contains("memory-backend"))
                .collect();
            match backend.as_slice() {
                [(start, _)] => Ok(*start),
                _ => Err(format!(
                    "several shared /memfd: mappings of {ram_bytes} bytes in {path}: {several:?}"
                )),
            }
        }
    }
}

/// Reads one byte of every page of `[start, start+bytes)` in `pid` and
/// writes the same byte back, so every page is mapped writable in the
/// process's page tables. Returns the number of pages touched.
///
/// The guest never sees a change: each byte gets the value it had, and the
/// boot-sector guest only ever writes at 0x500, never at a page start.
fn touch_pages(pid: u32, start: u64, bytes: u64) -> Result<u64, String> {
    let pid = Pid::from_raw(i32::try_from(pid).map_err(|_| "pid out of range")?);
    let pages = bytes / PAGE;
    let mut buffer = vec![0u8; TOUCH_BATCH];
    let mut page = 0u64;
    while page < pages {
        let count = (pages - page).min(TOUCH_BATCH as u64) as usize;
        let remote: Vec<RemoteIoVec> = (0..count as u64)
            .map(|i| RemoteIoVec {
                base: (start + (page + i) * PAGE) as usize,
                len: 1,
            })
            .collect();
        let read = process_vm_readv(pid, &mut [IoSliceMut::new(&mut buffer[..count])], &remote)
            .map_err(|e| format!("process_vm_readv at page {page}: {e}"))?;
        if read != count {
            return Err(format!(
                "process_vm_readv at page {page}: {read} of {count} bytes"
            ));
        }
        let written = process_vm_writev(pid, &[IoSlice::new(&buffer[..count])], &remote)
            .map_err(|e| format!("process_vm_writev at page {page}: {e}"))?;
        if written != count {
            return Err(format!(
                "process_vm_writev at page {page}: {written} of {count} bytes"
            ));
        }
        page += count as u64;
    }
    Ok(pages)
}

/// Touches all guest RAM of QEMU `pid` through its own mapping.
pub fn touch_guest_ram(pid: u32, ram_bytes: u64) -> Result<u64, String> {
    let start = find_ram_mapping(pid, ram_bytes)?;
    touch_pages(pid, start, ram_bytes)
}

// ---------------------------------------------------------------------------
// the run directory and the machine

/// A fresh directory under the caller's work directory, removed on drop
/// (kept if `KEEP_TEST_DIRS` is set).
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn new(workdir: &Path, tag: &str) -> Result<Self, String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let workdir = fs::canonicalize(workdir)
            .map_err(|e| format!("work directory {}: {e}", workdir.display()))?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = workdir.join(format!("{tag}-{}-{n}", std::process::id()));
        // Longest socket name used below, against sun_path's 108 bytes.
        if path.join("dst-9999.qmp").as_os_str().len() >= 100 {
            return Err(format!(
                "work directory {} is too deep for UNIX socket paths",
                workdir.display()
            ));
        }
        fs::create_dir(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(RunDir { path })
    }

    fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DIRS").is_some() {
            eprintln!("qemu_bench: keeping {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn path_str(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("path is not UTF-8: {}", path.display()))
}

/// Writes the boot sector as a one-sector raw disk image.
fn write_boot_image(path: &Path) -> Result<(), String> {
    let mut sector = [0u8; 512];
    sector[..BOOT_CODE.len()].copy_from_slice(&BOOT_CODE);
    sector[510] = 0x55;
    sector[511] = 0xaa;
    fs::write(path, sector).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The machine's command line without `-qmp` and `-incoming`.
fn machine_args(
    ram_mib: u64,
    guest: &QemuGuest,
    disk: &Path,
    prealloc: bool,
) -> Result<Vec<String>, String> {
    let prealloc = if prealloc { "on" } else { "off" };
    let mut args: Vec<String> = vec![
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-machine".into(),
        "pc,accel=kvm,memory-backend=ram0,aux-ram-share=on".into(),
        "-smp".into(),
        "1".into(),
        "-m".into(),
        format!("{ram_mib}M"),
        "-object".into(),
        format!("memory-backend-memfd,id=ram0,size={ram_mib}M,share=on,prealloc={prealloc}"),
        "-trace".into(),
        "vm_state_notify".into(),
        "-trace".into(),
        "cpr_exec".into(),
        "-trace".into(),
        "cpr_state_load".into(),
        "-msg".into(),
        "timestamp=on".into(),
    ];
    args.extend(guest.args(disk)?);
    Ok(args)
}

fn with_qmp(mut args: Vec<String>, qmp: &Path) -> Result<Vec<String>, String> {
    args.push("-qmp".into());
    args.push(format!("unix:{},server=on,wait=off", path_str(qmp)?));
    Ok(args)
}

/// Time for QEMU to start, including preallocating `ram_mib` (about 0.5 s
/// per GiB on this machine's nested KVM).
fn start_timeout(ram_mib: u64) -> Duration {
    Duration::from_secs(60 + ram_mib.div_ceil(1024) * 5)
}

fn unix_addr(path: &Path) -> Result<Value, String> {
    Ok(json!({ "transport": "socket", "type": "unix", "path": path_str(path)? }))
}

/// The wall clock in Unix seconds (the clock of QEMU's event timestamps).
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn ms_between(from: f64, to: f64) -> f64 {
    (to - from) * 1000.0
}

// ---------------------------------------------------------------------------
// the measurements

/// QEMU cpr-transfer pauses for `reps` updates of one guest with `ram_mib`
/// MiB of pre-faulted RAM, with the host's QEMU. Scratch files go to a new
/// directory under `workdir`, removed afterwards.
pub fn qemu_cpr_transfer(
    qemu: &QemuInstall,
    ram_mib: u64,
    reps: usize,
    workdir: &Path,
) -> Result<Vec<Measurement>, String> {
    qemu_cpr_transfer_with(qemu, ram_mib, reps, workdir, &QemuGuest::BootSector)
}

/// [`qemu_cpr_transfer`] with another guest: [`QemuGuest::Blkcheck`] measures the pause with
/// virtio-blk requests in flight (the guest's request counter must rise before every update
/// and after it, and the guest must count no mismatched sector and no failed request).
pub fn qemu_cpr_transfer_with(
    qemu: &QemuInstall,
    ram_mib: u64,
    reps: usize,
    workdir: &Path,
    guest: &QemuGuest,
) -> Result<Vec<Measurement>, String> {
    let host = qemu
        .transfer
        .as_ref()
        .map_err(|why| format!("cpr-transfer unavailable: {why}"))?;
    let run = RunDir::new(workdir, "qemu-xfer")?;
    let disk = run.join("disk.img");
    guest.write_disk(&disk)?;
    let machine = machine_args(ram_mib, guest, &disk, true)?;
    let launcher = Launcher::Host(host.binary.clone());

    let source_qmp = run.join("src.qmp");
    let mut source = QemuVm::start(
        &launcher,
        &with_qmp(machine.clone(), &source_qmp)?,
        &source_qmp,
        guest,
    )?;
    source.connect(start_timeout(ram_mib))?;
    source.wait_guest_running(BOOT_TIMEOUT)?;

    let mut measurements = Vec::with_capacity(reps);
    for rep in 0..reps {
        // The guest works right up to the update (with blkcheck: requests in flight).
        source.guest_progress()?;
        let cpr = run.join(format!("cpr-{rep}.sock"));
        let main = run.join(format!("mig-{rep}.sock"));
        let dest_qmp = run.join(format!("dst-{rep}.qmp"));
        let mut args = with_qmp(machine.clone(), &dest_qmp)?;
        args.extend([
            "-incoming".into(),
            "defer".into(),
            "-incoming".into(),
            format!(
                "cpr,addr.transport=socket,addr.type=unix,addr.path={}",
                path_str(&cpr)?
            ),
        ]);
        let mut dest = QemuVm::start(&launcher, &args, &dest_qmp, guest)?;
        // The new QEMU listens on the cpr channel first, and opens its
        // monitor only after the old one has sent the CPR state.
        dest.wait_listening(&cpr, start_timeout(ram_mib))?;

        let stops_before = source.trace_times(false).len();
        source.execute("migrate-set-parameters", json!({ "mode": "cpr-transfer" }))?;
        let sent = unix_now();
        source.execute(
            "migrate",
            json!({ "channels": [
                { "channel-type": "main", "addr": unix_addr(&main)? },
                { "channel-type": "cpr", "addr": unix_addr(&cpr)? },
            ]}),
        )?;
        dest.connect(start_timeout(ram_mib))?;
        dest.execute(
            "migrate-incoming",
            json!({ "channels": [{ "channel-type": "main", "addr": unix_addr(&main)? }] }),
        )?;
        let stop = source.wait_event("STOP", STEP_TIMEOUT)?;
        let resume = dest.wait_event("RESUME", STEP_TIMEOUT)?;
        let (stop_ts, resume_ts) = (event_timestamp(&stop), event_timestamp(&resume));

        let trace_stop = source.wait_trace(false, stops_before, STEP_TIMEOUT).ok();
        let trace_resume = dest.wait_trace(true, 0, STEP_TIMEOUT).ok();
        let guest_progress = dest.guest_progress()?;
        let old_status = source.status()?;
        if old_status != "postmigrate" {
            return Err(format!(
                "the old QEMU is {old_status:?} after cpr-transfer, not postmigrate"
            ));
        }
        measurements.push(Measurement {
            mode: CprMode::CprTransfer,
            qemu_version: host.version,
            ram_mib,
            rep,
            pause_ms: ms_between(stop_ts, resume_ts),
            stop_timestamp: stop_ts,
            resume_timestamp: resume_ts,
            resume_source: ResumeSource::QmpEvent,
            trace_pause_ms: trace_stop.zip(trace_resume).map(|(s, r)| ms_between(s, r)),
            migrate_to_stop_ms: ms_between(sent, stop_ts),
            touched_pages: 0,
            touch_ms: 0.0,
            guest_progress,
            exec_phases: None,
        });
        // The old QEMU is killed and reaped; the new one is the next source.
        source = dest;
    }
    source.check_guest_data(guest)?;
    Ok(measurements)
}

/// QEMU cpr-exec pauses for `reps` updates of one guest with `ram_mib` MiB
/// of pre-faulted RAM, with the sid chroot's QEMU (>= 10.2), RAM touched
/// through QEMU's mapping before each update. See the module docs.
pub fn qemu_cpr_exec(
    qemu: &QemuInstall,
    ram_mib: u64,
    reps: usize,
    workdir: &Path,
) -> Result<Vec<Measurement>, String> {
    qemu_cpr_exec_with(qemu, ram_mib, reps, workdir, CprExecOptions::default())
}

/// [`qemu_cpr_exec`] with options.
pub fn qemu_cpr_exec_with(
    qemu: &QemuInstall,
    ram_mib: u64,
    reps: usize,
    workdir: &Path,
    options: CprExecOptions,
) -> Result<Vec<Measurement>, String> {
    let chroot = qemu
        .exec
        .as_ref()
        .map_err(|why| format!("cpr-exec unavailable: {why}"))?;
    let run = RunDir::new(workdir, "qemu-exec")?;
    // Only this run's own directory is shared with the chroot.
    let _mount_point = MountPoint::new(&chroot.root, &run.path)?;
    let disk = run.join("boot.img");
    let guest = QemuGuest::BootSector;
    guest.write_disk(&disk)?;
    let qmp_path = run.join("vm.qmp");
    let first = with_qmp(machine_args(ram_mib, &guest, &disk, true)?, &qmp_path)?;
    let after_exec = with_qmp(
        machine_args(ram_mib, &guest, &disk, options.keep_prealloc)?,
        &qmp_path,
    )?;
    let launcher = Launcher::Chroot {
        root: chroot.root.clone(),
        binary: chroot.binary.clone(),
        share: run.path.clone(),
    };
    let ram_bytes = ram_mib << 20;

    let mut vm = QemuVm::start(&launcher, &first, &qmp_path, &guest)?;
    vm.connect(start_timeout(ram_mib))?;
    vm.wait_guest_running(BOOT_TIMEOUT)?;

    let mut measurements = Vec::with_capacity(reps);
    for rep in 0..reps {
        let state = run.join(format!("vm-{rep}.state"));
        let state_uri = format!("file:{}", path_str(&state)?);

        let touch_start = Instant::now();
        let touched_pages = touch_guest_ram(vm.pid(), ram_bytes)?;
        let touch_ms = touch_start.elapsed().as_secs_f64() * 1000.0;

        let mut exec_command = vec![path_str(&chroot.binary)?.to_owned()];
        exec_command.extend(after_exec.iter().cloned());
        exec_command.extend(["-incoming".to_owned(), state_uri.clone()]);
        vm.execute(
            "migrate-set-parameters",
            json!({ "mode": "cpr-exec", "cpr-exec-command": exec_command }),
        )?;
        let stops_before = vm.trace_times(false).len();
        let resumes_before = vm.trace_times(true).len();
        let execs_before = vm.trace_event_times("cpr_exec").len();
        let loads_before = vm.trace_event_times("cpr_state_load").len();
        let sent = unix_now();
        vm.execute("migrate", json!({ "uri": state_uri }))?;
        // STOP is written before the exec closes the connection.
        let stop = vm.wait_event("STOP", STEP_TIMEOUT)?;
        let stop_ts = event_timestamp(&stop);
        // Stay idle until the new QEMU has resumed the guest.
        let resume_ts = vm
            .wait_trace(true, resumes_before, STEP_TIMEOUT + start_timeout(ram_mib))
            .map_err(|e| format!("the exec'd QEMU did not resume the guest: {e}"))?;
        let trace_stop = vm.trace_times(false).get(stops_before).copied();
        let exec_at = vm.trace_event_times("cpr_exec").get(execs_before).copied();
        let load_at = vm
            .trace_event_times("cpr_state_load")
            .get(loads_before)
            .copied();
        let exec_phases = exec_at.zip(load_at).map(|(exec, load)| ExecPhases {
            stop_to_exec_ms: ms_between(stop_ts, exec),
            exec_to_cpr_load_ms: ms_between(exec, load),
            cpr_load_to_resume_ms: ms_between(load, resume_ts),
        });

        vm.connect(start_timeout(ram_mib))?;
        let status = vm.status()?;
        if status != "running" {
            return Err(format!(
                "the exec'd QEMU is {status:?} after cpr-exec, not running"
            ));
        }
        let guest_progress = vm.guest_progress()?;
        let _ = fs::remove_file(&state);
        measurements.push(Measurement {
            mode: CprMode::CprExec,
            qemu_version: chroot.version,
            ram_mib,
            rep,
            pause_ms: ms_between(stop_ts, resume_ts),
            stop_timestamp: stop_ts,
            resume_timestamp: resume_ts,
            resume_source: ResumeSource::Trace,
            trace_pause_ms: trace_stop.map(|s| ms_between(s, resume_ts)),
            migrate_to_stop_ms: ms_between(sent, stop_ts),
            touched_pages,
            touch_ms,
            guest_progress,
            exec_phases,
        });
    }
    Ok(measurements)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_compare() {
        let v = QemuVersion::parse(
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)",
        )
        .unwrap();
        assert_eq!(v, QemuVersion::new(10, 0, 2));
        assert!(v >= CPR_TRANSFER_MIN && v < CPR_EXEC_MIN);
        assert_eq!(QemuVersion::parse("11.1").unwrap().to_string(), "11.1.0");
        assert!(QemuVersion::parse("QEMU emulator version 11.1.3").unwrap() >= CPR_EXEC_MIN);
        assert_eq!(QemuVersion::parse("nothing here"), None);
    }

    #[test]
    fn trace_lines_of_both_formats_parse() {
        let stderr = "\
15232@1795694251.549486:vm_state_notify running 1 reason 9 (running)
qemu-system-x86_64: warning: something
2026-11-26T11:59:25.111612Z vm_state_notify running 0 reason 7 (finish-migrate)
2026-11-26T11:59:25.273810Z vm_state_notify running 1 reason 9 (running)
";
        let running = trace_state_times(stderr, true);
        assert_eq!(running.len(), 2);
        assert!((running[0] - 1_795_694_251.549_486).abs() < 1e-6);
        // date -u -d 2026-11-26T11:59:25Z +%s
        assert!(
            (running[1] - 1_795_694_365.273_81).abs() < 1e-6,
            "{running:?}"
        );
        assert_eq!(trace_event_times(stderr, "cpr_exec", "").len(), 0);
        let exec = trace_event_times("2026-11-26T11:59:25.119525Z cpr_exec \n", "cpr_exec", "");
        assert_eq!(exec.len(), 1);
        let stopped = trace_state_times(stderr, false);
        assert_eq!(stopped.len(), 1);
        assert!((ms_between(stopped[0], running[1]) - 162.198).abs() < 1e-3);
    }

    #[test]
    fn iso_timestamps_match_the_unix_epoch() {
        assert_eq!(parse_iso8601_utc("1970-01-01T00:00:00.000000Z"), Some(0.0));
        assert_eq!(
            parse_iso8601_utc("2000-03-01T00:00:01.500000Z"),
            Some(951_868_801.5)
        );
        assert_eq!(parse_iso8601_utc("2000-03-01 00:00:01"), None);
    }

    #[test]
    fn hmp_xp_output_parses() {
        assert_eq!(
            parse_xp_word("0000000000000500: 0x0000582a\r\n"),
            Some(0x582a)
        );
        assert_eq!(parse_xp_word("00000500: 0xffffffff"), Some(u32::MAX));
        assert_eq!(parse_xp_word("garbage"), None);
    }

    #[test]
    fn the_boot_sector_is_a_valid_mbr() {
        let dir = crate::TempDir::new("qboot").unwrap();
        let path = dir.join("boot.img");
        write_boot_image(&path).unwrap();
        let image = fs::read(&path).unwrap();
        assert_eq!(image.len(), 512);
        assert_eq!(&image[510..], &[0x55, 0xaa]);
        assert_eq!(&image[..BOOT_CODE.len()], &BOOT_CODE);
    }

    fn measurement(pause_ms: f64) -> Measurement {
        Measurement {
            mode: CprMode::CprTransfer,
            qemu_version: QemuVersion::new(10, 0, 2),
            ram_mib: 256,
            rep: 0,
            pause_ms,
            stop_timestamp: 0.0,
            resume_timestamp: pause_ms / 1000.0,
            resume_source: ResumeSource::QmpEvent,
            trace_pause_ms: None,
            migrate_to_stop_ms: 0.0,
            touched_pages: 0,
            touch_ms: 0.0,
            guest_progress: 1,
            exec_phases: None,
        }
    }

    #[test]
    fn summaries_use_the_middle_and_nearest_rank() {
        assert_eq!(summarize(&[]), None);
        let odd: Vec<_> = [5.0, 1.0, 3.0].map(measurement).into();
        let s = summarize(&odd).unwrap();
        assert_eq!(
            (s.count, s.min_ms, s.median_ms, s.p99_ms, s.max_ms),
            (3, 1.0, 3.0, 5.0, 5.0)
        );
        let even: Vec<_> = [4.0, 1.0, 3.0, 2.0].map(measurement).into();
        assert_eq!(summarize(&even).unwrap().median_ms, 2.5);
    }

    #[test]
    fn touching_pages_keeps_their_contents() {
        // Touch a buffer of our own process through the same syscalls.
        let pages = 8u64;
        let mut memory = vec![0u8; (pages * PAGE) as usize + PAGE as usize];
        let offset = memory.as_ptr().align_offset(PAGE as usize);
        for (i, byte) in memory[offset..].iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        let before = memory.clone();
        let start = memory[offset..].as_ptr() as u64;
        let touched = touch_pages(std::process::id(), start, pages * PAGE).unwrap();
        assert_eq!(touched, pages);
        assert_eq!(memory, before);
    }

    #[test]
    fn listening_unix_sockets_are_recognised() {
        let dir = crate::TempDir::new("qlisten").unwrap();
        let path = dir.join("l.sock");
        assert!(!unix_socket_listening(&path).unwrap());
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(unix_socket_listening(&path).unwrap());
    }

    #[test]
    fn the_ram_mapping_is_found_by_size() {
        // Our own process has no memfd mapping of that size.
        let error = find_ram_mapping(std::process::id(), 3 << 30).unwrap_err();
        assert!(error.contains("no shared /memfd:"), "{error}");
    }

    #[test]
    fn detection_never_panics_and_describes_both_sides() {
        let install = QemuInstall::detect();
        let text = install.describe();
        assert!(
            text.contains("cpr-transfer: ") && text.contains("cpr-exec: "),
            "{text}"
        );
    }
}
