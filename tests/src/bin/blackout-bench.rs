//! blackout-bench: how long the guest is stopped by a live update, at several RAM sizes.
//!
//! ```text
//! cargo run --release -p cpr-tests --bin blackout-bench -- [--sizes 256M,1G,4G,16G]
//!     [--updates 20] [--qemu-reps 10] [--no-qemu] [--hugepages] [--dist] [--json FILE]
//!     [--no-disk] [--disk-only] [--no-net] [--file-modes-only]
//! ```
//!
//! `--file-modes-only` measures only the migration to a file and cpr-reboot (one run each per
//! size); with 16G, set TMPDIR to a directory on a disk: the state file and the RAM file are
//! as large as guest RAM.
//!
//! For each size, with guest RAM pre-faulted (`--prealloc`) and the `memcheck` guest sweeping:
//! - cpr-exec through `cpr-shim`, `--updates` times: blackout from the VMM's own figure (old VMM
//!   stops the vCPUs → new VMM resumes them) and from the STOP/RESUME event timestamps, min,
//!   median, p99, and the median of every phase;
//! - the guest's first full memcheck sweep after each update against steady-state sweeps (the
//!   cost of rebuilding page tables lazily);
//! - normal `migrate` to a file plus `-incoming` restore of the same VM (copy-everything);
//! - cpr-reboot of the same VM with its RAM in a `memory-backend-file` (in the bench's temporary
//!   directory): save device state (the RAM file fsynced), quit, start a new process, restore
//!   mapping the RAM file in place (no RAM copy);
//! - KVM alone creating a VM and registering that much RAM (`KVM reg`): a floor under any
//!   exec-based update on this host, since the new process must do it while the guest waits;
//!   and, once, how long one exec of a minimal static C program takes (the floor under each of
//!   an update's two execs; needs `cc -static`);
//! - with `--dist`, the cpr-exec blackout again with the deployment build of `vmm` and
//!   `cpr-shim` (scripts/build-dist.sh: statically linked, which spares each of the update's two
//!   execs the dynamic loader, and whole-program optimised);
//! - with network traffic (`--no-net` skips it): frames lost across at least 50 updates of a
//!   `netcheck` VM whose peer sends a frame every 1 ms, and the largest echo gap per update
//!   against the blackout, located (`cpr_tests::netcheck::bench`);
//! - at the first size, cpr-exec through `cpr-shim --sha256` against the same update without
//!   it, alternating (the deployment build with `--dist`);
//! - QEMU's cpr-transfer and cpr-exec pauses for the same size, when `scripts/bench-setup.sh`
//!   has installed them (see `cpr_tests::qemu_bench`);
//! - at the first size (`--no-disk` skips it, `--disk-only` runs only this): cpr-exec with a
//!   virtio-blk disk idle against the same with `blkcheck` keeping 8 requests in flight, and
//!   QEMU's cpr-transfer pause with the same guest (blkcheck's bzImage) keeping 8 requests in
//!   flight on QEMU's `-device virtio-blk-pci`.
//!
//! Prints a table and writes JSON (default `target/bench/blackout-<unix time>.json`). Every
//! figure is labelled with the machine it ran on; timings are reported, never asserted.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cpr_tests::blkcheck::build_blkcheck_bzimage;
use cpr_tests::hugepages::HugePageReservation;
use cpr_tests::qemu_bench::{
    Measurement, QemuGuest, QemuInstall, qemu_cpr_exec, qemu_cpr_transfer, qemu_cpr_transfer_with,
};
use cpr_tests::stats::{median, summary};
use cpr_tests::{
    QmpClient, TempDir, VmmProcess, build_binaries, event_timestamp, shim_bin, vmm_bin,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

struct Options {
    sizes_mib: Vec<u64>,
    updates: usize,
    qemu_reps: usize,
    qemu: bool,
    hugepages: bool,
    dist_build: bool,
    /// Also measure a cpr-exec with the disk busy against idle, at the first size.
    disk: bool,
    /// Only the disk measurement.
    disk_only: bool,
    /// Also measure frames lost and the echo gap across updates with network traffic.
    net: bool,
    json: Option<PathBuf>,
    /// Only migrate-to-file and cpr-reboot (`--file-modes-only`).
    file_modes_only: bool,
}

fn parse_size_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('G' | 'g') => (&s[..s.len() - 1], 1024),
        Some('M' | 'm') => (&s[..s.len() - 1], 1),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("bad size {s}: use e.g. 256M or 4G"))
}

fn parse_options() -> Result<Options, String> {
    let mut o = Options {
        sizes_mib: vec![256, 1024, 4096, 16384],
        updates: 20,
        qemu_reps: 10,
        qemu: true,
        hugepages: false,
        dist_build: false,
        disk: true,
        disk_only: false,
        net: true,
        json: None,
        file_modes_only: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--sizes" => {
                o.sizes_mib = value()?
                    .split(',')
                    .map(parse_size_mib)
                    .collect::<Result<_, _>>()?
            }
            "--updates" => o.updates = value()?.parse().map_err(|_| "bad --updates")?,
            "--qemu-reps" => o.qemu_reps = value()?.parse().map_err(|_| "bad --qemu-reps")?,
            "--no-qemu" => o.qemu = false,
            "--hugepages" => o.hugepages = true,
            "--dist" => o.dist_build = true,
            "--no-disk" => o.disk = false,
            "--disk-only" => o.disk_only = true,
            "--no-net" => o.net = false,
            "--json" => o.json = Some(PathBuf::from(value()?)),
            "--file-modes-only" => o.file_modes_only = true,
            "--help" | "-h" => {
                return Err(
                    "usage: blackout-bench [--sizes 256M,1G,4G,16G] [--updates 20] \
                            [--qemu-reps 10] [--no-qemu] [--hugepages] [--dist] [--no-disk] [--disk-only] [--no-net] \
                            [--json FILE] [--file-modes-only]"
                        .into(),
                );
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.file_modes_only {
        // Only the two file modes: no disk, network or QEMU parts.
        o.disk = false;
        o.net = false;
        o.qemu = false;
    }
    Ok(o)
}

/// What this ran on, for every figure's label.
fn machine_label() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map(|k| k / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm (software-assisted, shadow paging)"
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "kvm_intel"
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd"
    } else {
        "unknown"
    };
    json!({
        "hostname": read("/proc/sys/kernel/hostname").trim(),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_gib * 10.0).round() / 10.0,
        "kvm": kvm,
        "date_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    })
}

/// Which `vmm` and `cpr-shim` to run.
#[derive(Clone)]
struct Binaries {
    vmm: PathBuf,
    shim: PathBuf,
}

impl Binaries {
    fn default_build() -> Self {
        Binaries {
            vmm: vmm_bin(),
            shim: shim_bin(),
        }
    }

    /// The deployment build from scripts/build-dist.sh: statically linked (no dynamic loader at
    /// either exec of an update) and whole-program optimised.
    fn dist_build() -> Self {
        let (vmm, shim) = cpr_tests::dist_binaries();
        Binaries { vmm, shim }
    }
}

/// A memcheck VM whose sweeps are timed from its serial output.
struct SweepingVm {
    vmm: VmmProcess,
    qmp: QmpClient,
    args: Vec<String>,
    /// Number of sweeps ('B') seen so far and when the last one was seen.
    sweeps_seen: usize,
}

impl SweepingVm {
    fn start(
        bins: &Binaries,
        dir: &Path,
        ram_mib: u64,
        hugepages: bool,
        incoming: Option<&str>,
    ) -> Result<Self, String> {
        let mut memory: Vec<String> = vec!["-m".into(), format!("{ram_mib}M"), "--prealloc".into()];
        if hugepages {
            memory.push("--hugepages".into());
        }
        Self::start_with(bins, dir, memory, incoming)
    }

    /// The memcheck VM with guest RAM as `memory` (command-line arguments) describes it.
    fn start_with(
        bins: &Binaries,
        dir: &Path,
        memory: Vec<String>,
        incoming: Option<&str>,
    ) -> Result<Self, String> {
        let socket = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&socket);
        let mut args: Vec<String> = memory;
        args.extend([
            "-smp".into(),
            "1".into(),
            "--guest".into(),
            "memcheck".into(),
            "-name".into(),
            "bench".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", socket.display()),
        ]);
        let mut run_args = args.clone();
        if let Some(inc) = incoming {
            run_args.push("-incoming".into());
            run_args.push(inc.into());
        }
        let vmm =
            VmmProcess::start(&bins.vmm, &run_args).map_err(|e| format!("starting vmm: {e}"))?;
        vmm.wait_for_path(&socket, WAIT)
            .map_err(|e| e.to_string())?;
        let mut qmp = QmpClient::connect_and_negotiate(&socket, WAIT).map_err(|e| e.to_string())?;
        qmp.set_timeout(WAIT);
        Ok(SweepingVm {
            vmm,
            qmp,
            args,
            sweeps_seen: 0,
        })
    }

    fn sweeps(&self) -> usize {
        self.vmm
            .stdout_bytes()
            .iter()
            .filter(|b| **b == b'B')
            .count()
    }

    /// Waits for the next completed sweep; returns when it was seen.
    fn next_sweep(&mut self) -> Result<Instant, String> {
        let target = self.sweeps_seen + 1;
        let deadline = Instant::now() + WAIT;
        loop {
            let n = self.sweeps();
            if n >= target {
                self.sweeps_seen = n;
                return Ok(Instant::now());
            }
            if Instant::now() > deadline || !self.vmm.is_running() {
                return Err(format!(
                    "no memcheck sweep within {WAIT:?}; stderr: {}",
                    self.vmm.stderr_text()
                ));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Median duration of `n` consecutive sweeps, in ms.
    fn steady_sweep_ms(&mut self, n: usize) -> Result<f64, String> {
        self.sweeps_seen = self.sweeps();
        let mut last = self.next_sweep()?;
        let mut d = Vec::new();
        for _ in 0..n {
            let t = self.next_sweep()?;
            d.push((t - last).as_secs_f64() * 1e3);
            last = t;
        }
        Ok(median(&d))
    }

    /// Waits until the previous update's teardown helper has exited, so every update starts
    /// from a quiet machine (helpers are children of the VMM's PID).
    fn wait_quiet(&self) {
        let children = format!("/proc/{0}/task/{0}/children", self.vmm.pid());
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if std::fs::read_to_string(&children)
                .map(|s| s.trim().is_empty())
                .unwrap_or(true)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// One cpr-exec update through the shim (given `shim_args`); returns the measurements.
fn one_update(
    vm: &mut SweepingVm,
    bins: &Binaries,
    state: &Path,
    shim_args: &[String],
) -> Result<Value, String> {
    let mut command: Vec<String> = vec![bins.shim.display().to_string()];
    command.extend(shim_args.iter().cloned());
    command.extend(["--".into(), bins.vmm.display().to_string()]);
    command.extend(vm.args.iter().cloned());
    command.extend(["-incoming".into(), format!("file:{}", state.display())]);
    vm.qmp
        .execute(
            "migrate-set-parameters",
            json!({"mode": "cpr-exec", "cpr-exec-command": command}),
        )
        .map_err(|e| e.to_string())?;
    let _ = vm.qmp.events();
    vm.qmp
        .execute(
            "migrate",
            json!({"uri": format!("file:{}", state.display())}),
        )
        .map_err(|e| e.to_string())?;
    let stop = vm.qmp.wait_event("STOP", WAIT).map_err(|e| e.to_string())?;
    let resume = vm
        .qmp
        .wait_event("RESUME", WAIT)
        .map_err(|e| e.to_string())?;
    let info = vm
        .qmp
        .execute("query-migrate", Value::Null)
        .map_err(|e| e.to_string())?;
    if info["status"] != "completed" {
        return Err(format!("update did not complete: {info}"));
    }
    let cpr = &info["x-cpr"];
    let events_ms = (event_timestamp(&resume) - event_timestamp(&stop)) * 1e3;
    Ok(json!({
        "blackout_ms": cpr["blackout-ns"].as_f64().unwrap_or(f64::NAN) / 1e6,
        "events_ms": events_ms,
        "phases": cpr["phases"],
    }))
}

/// What a series of live updates measured, summarised the same way for every mode.
#[derive(Default)]
struct Samples {
    blackouts_ms: Vec<f64>,
    events_ms: Vec<f64>,
    /// Phase name -> (its position in the first update that had it, every duration in ms).
    phases: BTreeMap<String, (usize, Vec<f64>)>,
    first_sweeps_ms: Vec<f64>,
}

impl Samples {
    /// One update: the VMM's blackout figure, the STOP->RESUME event gap and x-cpr `phases`.
    fn record(&mut self, blackout_ms: f64, events_ms: f64, phases: &Value) {
        self.blackouts_ms.push(blackout_ms);
        self.events_ms.push(events_ms);
        for (order, p) in phases.as_array().into_iter().flatten().enumerate() {
            let name = p["name"].as_str().unwrap_or("?").to_string();
            let entry = self.phases.entry(name).or_insert((order, Vec::new()));
            entry.1.push(p["ns"].as_f64().unwrap_or(0.0) / 1e6);
        }
    }

    /// The first full memcheck sweep after an update: the sweep in progress at the update ends
    /// partly before it, so the one after that.
    fn record_first_sweep(&mut self, vm: &mut SweepingVm) -> Result<(), String> {
        vm.sweeps_seen = vm.sweeps();
        let b1 = vm.next_sweep()?;
        let b2 = vm.next_sweep()?;
        self.first_sweeps_ms.push((b2 - b1).as_secs_f64() * 1e3);
        Ok(())
    }

    /// The summary, with the first-sweep figures under `first_sweep_key`.
    fn summarize(self, steady_sweep_ms: f64, first_sweep_key: &str) -> Value {
        let mut ordered: Vec<(usize, String, f64)> = self
            .phases
            .into_iter()
            .map(|(name, (order, v))| (order, name, median(&v)))
            .collect();
        ordered.sort_by_key(|(o, _, _)| *o);
        let phase_medians: Vec<Value> = ordered
            .into_iter()
            .map(|(_, name, ms)| json!({"name": name, "median_ms": ms}))
            .collect();
        let mut out = json!({
            "blackout_ms": summary(&self.blackouts_ms),
            "stop_to_resume_events_ms": summary(&self.events_ms),
            "phase_medians_ms": phase_medians,
            "steady_sweep_ms": steady_sweep_ms,
            "first_sweep_slowdown": median(&self.first_sweeps_ms) / steady_sweep_ms,
        });
        out[first_sweep_key] = summary(&self.first_sweeps_ms);
        out
    }
}

fn bench_cpr_exec(
    bins: &Binaries,
    dir: &Path,
    ram_mib: u64,
    updates: usize,
    hugepages: bool,
) -> Result<Value, String> {
    let mut vm = SweepingVm::start(bins, dir, ram_mib, hugepages, None)?;
    let pid = vm.vmm.pid();
    let steady = vm.steady_sweep_ms(3)?;
    let state = dir.join("vm.state");
    let mut samples = Samples::default();
    for i in 0..updates {
        vm.wait_quiet();
        let m = one_update(&mut vm, bins, &state, &[])?;
        samples.record(
            m["blackout_ms"].as_f64().unwrap_or(f64::NAN),
            m["events_ms"].as_f64().unwrap_or(f64::NAN),
            &m["phases"],
        );
        samples.record_first_sweep(&mut vm)?;
        eprint!("\r  {ram_mib} MiB cpr-exec: update {}/{updates}", i + 1);
    }
    eprintln!();
    if vm.vmm.pid() != pid {
        return Err("the PID changed".into());
    }
    let _ = vm.qmp.execute("quit", Value::Null);
    let _ = vm.vmm.wait_exit(WAIT);
    Ok(samples.summarize(steady, "first_sweep_after_update_ms"))
}

/// cpr-exec through `cpr-shim --sha256 HASH` against the same update without it, alternating
/// on one machine. The old VMM hashes the target before the guest stops, so the difference is
/// what the shim's check of the handed-over target adds to the blackout.
fn bench_sha256(
    bins: &Binaries,
    dir: &Path,
    ram_mib: u64,
    updates: usize,
) -> Result<Value, String> {
    let hash = std::fs::File::open(&bins.vmm)
        .and_then(|f| cpr_common::target::sha256_of(&f))
        .map_err(|e| format!("hashing {}: {e}", bins.vmm.display()))?;
    let mut vm = SweepingVm::start(bins, dir, ram_mib, false, None)?;
    let state = dir.join("vm.state");
    let with_hash = ["--sha256".to_string(), hash];
    let (mut plain, mut hashed) = (Samples::default(), Samples::default());
    for i in 0..updates * 2 {
        vm.wait_quiet();
        let (args, into) = if i % 2 == 0 {
            (&[][..], &mut plain)
        } else {
            (&with_hash[..], &mut hashed)
        };
        let m = one_update(&mut vm, bins, &state, args)?;
        into.record(
            m["blackout_ms"].as_f64().unwrap_or(f64::NAN),
            m["events_ms"].as_f64().unwrap_or(f64::NAN),
            &m["phases"],
        );
        eprint!(
            "\r  {ram_mib} MiB cpr-exec with and without --sha256: update {}/{}",
            i + 1,
            updates * 2
        );
    }
    eprintln!();
    let _ = vm.qmp.execute("quit", Value::Null);
    let _ = vm.vmm.wait_exit(WAIT);
    // The shim's own phase is the direct measure of what --sha256 costs it; the blackouts
    // also carry whatever else the host was doing.
    let shim_checks = |s: &Samples| {
        s.phases
            .get("shim checks")
            .map_or(f64::NAN, |p| median(&p.1))
    };
    Ok(json!({
        "without": summary(&plain.blackouts_ms),
        "with_sha256": summary(&hashed.blackouts_ms),
        "median_difference_ms": median(&hashed.blackouts_ms) - median(&plain.blackouts_ms),
        "shim_checks_ms": {"without": shim_checks(&plain), "with_sha256": shim_checks(&hashed)},
    }))
}

/// cpr-exec with the guest's disk busy: `blkcheck` keeping 8 requests in flight on a
/// virtio-blk disk, against the same machine whose guest leaves the disk idle (`heartbeat`).
/// Every request in flight completes before the state is saved, so the difference is what a
/// busy disk adds to the blackout.
fn bench_disk_io(
    bins: &Binaries,
    dir: &Path,
    ram_mib: u64,
    updates: usize,
) -> Result<Value, String> {
    let disk = dir.join("bench-disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(2 << 20))
        .map_err(|e| format!("creating the disk image: {e}"))?;
    let state = dir.join("vm.state");
    let mut out = serde_json::Map::new();
    for (key, guest) in [("idle", "heartbeat"), ("busy", "blkcheck,depth=8")] {
        let socket = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&socket);
        let args: Vec<String> = [
            "-m",
            &format!("{ram_mib}M"),
            "--guest",
            guest,
            "--prealloc",
            "-drive",
            &format!("file={},format=raw,if=virtio", disk.display()),
            "-qmp",
            &format!("unix:{},server=on,wait=off", socket.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vmm = VmmProcess::start(&bins.vmm, &args).map_err(|e| format!("starting vmm: {e}"))?;
        vmm.wait_for_path(&socket, WAIT)
            .map_err(|e| e.to_string())?;
        if key == "busy" {
            vmm.wait_for_stdout_contains("blkcheck: pass 1 done", WAIT)
                .map_err(|e| e.to_string())?;
        }
        let mut qmp = QmpClient::connect_and_negotiate(&socket, WAIT).map_err(|e| e.to_string())?;
        qmp.set_timeout(WAIT);
        let mut vm = SweepingVm {
            vmm,
            qmp,
            args,
            sweeps_seen: 0,
        };
        let mut blackouts = Vec::new();
        for i in 0..updates {
            vm.wait_quiet();
            let m = one_update(&mut vm, bins, &state, &[])?;
            blackouts.push(m["blackout_ms"].as_f64().unwrap_or(f64::NAN));
            eprint!(
                "\r  {ram_mib} MiB cpr-exec, disk {key}: update {}/{updates}",
                i + 1
            );
        }
        eprintln!();
        if key == "busy" && vm.vmm.stdout_text().contains("blkcheck: MISMATCH") {
            return Err("the guest read back a wrong sector".into());
        }
        let _ = vm.qmp.execute("quit", Value::Null);
        let _ = vm.vmm.wait_exit(WAIT);
        out.insert(key.into(), summary(&blackouts));
    }
    Ok(Value::Object(out))
}

/// cpr-transfer, `updates` times in a chain: each new VMM (same arguments, so with
/// `--prealloc` like the cpr-exec measurement) takes the guest and becomes the next old one.
/// New VMMs start with `-incoming defer`, so their monitor is connected before the hand-over
/// and their RESUME event is seen; the blackout starts only once they listen on the main
/// channel, so this does not lengthen it. Blackout from the new VMM's own figure (x-cpr
/// blackout-ns: old VMM stops the vCPUs → new VMM resumes them) and from the old VMM's STOP
/// to the new VMM's RESUME event timestamps.
fn bench_cpr_transfer(
    dir: &Path,
    ram_mib: u64,
    updates: usize,
    hugepages: bool,
) -> Result<Value, String> {
    use cpr_tests::transfer::{
        CprSpelling, MainChannel, Target, migrate_cpr_transfer, unix_channel,
    };
    let dir = dir.join("xfer");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut vm = SweepingVm::start(&Binaries::default_build(), &dir, ram_mib, hugepages, None)?;
    // The machine arguments without the monitor: each new VMM gets its own socket.
    let mut machine_args = Vec::new();
    let mut args = vm.args.iter();
    while let Some(a) = args.next() {
        if a == "-qmp" {
            args.next();
        } else {
            machine_args.push(a.clone());
        }
    }
    let steady = vm.steady_sweep_ms(3)?;
    let mut samples = Samples::default();
    for i in 0..updates {
        let target = Target::start(
            &dir,
            &format!("t{i}"),
            &machine_args,
            MainChannel::Defer,
            CprSpelling::KeyValue,
            WAIT,
        )
        .map_err(|e| e.to_string())?;
        let _ = vm.qmp.events();
        migrate_cpr_transfer(&mut vm.qmp, &target.main_path, &target.cpr_path)
            .map_err(|e| e.to_string())?;
        let mut qmp = target.connect_qmp(WAIT)?;
        qmp.execute(
            "migrate-incoming",
            json!({"channels": [unix_channel("main", &target.main_path)]}),
        )
        .map_err(|e| e.to_string())?;
        let resume = qmp.wait_event("RESUME", WAIT).map_err(|e| e.to_string())?;
        let stop = vm.qmp.wait_event("STOP", WAIT).map_err(|e| e.to_string())?;
        let info = qmp
            .execute("query-migrate", Value::Null)
            .map_err(|e| e.to_string())?;
        if info["status"] != "completed" {
            return Err(format!("transfer {i} did not complete: {info}"));
        }
        let cpr = &info["x-cpr"];
        samples.record(
            cpr["blackout-ns"].as_f64().unwrap_or(f64::NAN) / 1e6,
            (event_timestamp(&resume) - event_timestamp(&stop)) * 1e3,
            &cpr["phases"],
        );
        // The old VMM is done once it has seen COMMIT.
        loop {
            let ev = vm
                .qmp
                .wait_event("MIGRATION", WAIT)
                .map_err(|e| e.to_string())?;
            match ev["data"]["status"].as_str() {
                Some("completed") => break,
                Some("failed") => return Err(format!("transfer {i} failed on the old VMM: {ev}")),
                _ => {}
            }
        }
        let _ = vm.qmp.execute("quit", Value::Null);
        let _ = vm.vmm.wait_exit(WAIT);
        qmp.set_timeout(WAIT);
        vm = SweepingVm {
            vmm: target.vmm,
            qmp,
            args: machine_args.clone(),
            sweeps_seen: 0,
        };
        samples.record_first_sweep(&mut vm)?;
        eprint!(
            "\r  {ram_mib} MiB cpr-transfer: transfer {}/{updates}",
            i + 1
        );
    }
    eprintln!();
    let _ = vm.qmp.execute("quit", Value::Null);
    let _ = vm.vmm.wait_exit(WAIT);
    let mut out = samples.summarize(steady, "first_sweep_after_transfer_ms");
    out["note"] = json!(
        "a chain of transfers, each new VMM started with -incoming defer (its monitor connected before the hand-over)"
    );
    Ok(out)
}

/// A minimal statically linked C program that measures one exec of itself: run with no
/// argument, it stamps CLOCK_MONOTONIC and execs itself with the stamp; the new image prints the
/// nanoseconds from just before `execve` to its `main`.
const EXEC_FLOOR_SOURCE: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static unsigned long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long long)t.tv_sec * 1000000000ULL + (unsigned long long)t.tv_nsec;
}
int main(int argc, char **argv) {
    unsigned long long now = now_ns();
    if (argc > 1) {
        printf("%llu\n", now - strtoull(argv[1], NULL, 10));
        return 0;
    }
    char stamp[32];
    snprintf(stamp, sizeof stamp, "%llu", now_ns());
    char *args[] = {argv[0], stamp, NULL};
    execv("/proc/self/exe", args);
    perror("execv");
    return 1;
}
"#;

/// How long one exec of a minimal statically linked program takes on this machine, from just
/// before `execve` to its `main`: the floor under each of an update's two execs. Needs a C
/// compiler with static glibc (`cc -static`).
fn bench_exec_floor(dir: &Path, reps: usize) -> Result<Value, String> {
    let source = dir.join("exec-floor.c");
    let program = dir.join("exec-floor");
    std::fs::write(&source, EXEC_FLOOR_SOURCE).map_err(|e| format!("{}: {e}", source.display()))?;
    let built = std::process::Command::new("cc")
        .args(["-O2", "-static", "-o"])
        .arg(&program)
        .arg(&source)
        .output()
        .map_err(|e| format!("cc: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "cc -static failed: {}",
            String::from_utf8_lossy(&built.stderr).trim()
        ));
    }
    let mut ms = Vec::new();
    for _ in 0..reps {
        let out = std::process::Command::new(&program)
            .output()
            .map_err(|e| format!("{}: {e}", program.display()))?;
        let ns: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                format!(
                    "exec-floor printed {:?}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })?;
        ms.push(ns as f64 / 1e6);
    }
    Ok(summary(&ms))
}

/// What KVM alone charges for two steps an exec-based update cannot move out of the blackout:
/// creating a VM, and registering `ram_mib` of RAM with it from a fresh, unpopulated mapping of
/// a memfd (as a new VMM does right after exec), split below 3 GiB and from 4 GiB up as the VMM
/// splits it. On a shadow-paging host the registration grows with RAM size (KVM allocates
/// metadata for every 4 KiB page up front), which puts a size-dependent floor under the
/// cpr-exec blackout; cpr-transfer pays it before the guest stops.
fn bench_kvm_floor(ram_mib: u64, reps: usize) -> Result<Value, String> {
    const LOW_RAM_END: u64 = 3 << 30;
    const HIGH_RAM_START: u64 = 4 << 30;
    let size = ram_mib << 20;
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by `memfd` below.
    let fd = unsafe { libc::memfd_create(c"bench-kvm-floor".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new fd that nothing else owns.
    let memfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(memfd.try_clone().map_err(|e| e.to_string())?)
        .set_len(size)
        .map_err(|e| format!("sizing the memfd: {e}"))?;
    // It is unmapped below, before the memfd is closed.
    // SAFETY: a new shared mapping of our own memfd; it aliases no Rust object.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            memfd.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let low = size.min(LOW_RAM_END);
    let slots = [
        (0u32, 0u64, 0u64, low),
        (1, HIGH_RAM_START, low, size - low),
    ];
    let mut create_ms = Vec::new();
    let mut register_ms = Vec::new();
    let mut failure = None;
    'reps: for _ in 0..reps {
        let t0 = Instant::now();
        let vm = match kvm.create_vm() {
            Ok(vm) => vm,
            Err(e) => {
                failure = Some(format!("KVM_CREATE_VM: {e}"));
                break;
            }
        };
        let t1 = Instant::now();
        for &(slot, gpa, offset, len) in slots.iter().filter(|s| s.3 > 0) {
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: len,
                userspace_addr: base as u64 + offset,
            };
            // SAFETY: the region lies inside our live mapping, which outlives `vm`.
            if let Err(e) = unsafe { vm.set_user_memory_region(region) } {
                failure = Some(format!("KVM_SET_USER_MEMORY_REGION: {e}"));
                break 'reps;
            }
        }
        register_ms.push(t1.elapsed().as_secs_f64() * 1e3);
        create_ms.push((t1 - t0).as_secs_f64() * 1e3);
    }
    // SAFETY: unmapping the mapping made above; every VM using it has been dropped.
    unsafe { libc::munmap(base, size as usize) };
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(json!({"create_vm_ms": summary(&create_ms), "register_ram_ms": summary(&register_ms)}))
}

/// Normal migration to a file, then `-incoming defer` + `migrate-incoming` in a new process.
fn bench_normal(dir: &Path, ram_mib: u64) -> Result<Value, String> {
    bench_via_file(dir, ram_mib, None)
}

/// cpr-reboot: guest RAM in a memory-backend-file (in `dir`), device state only to the state
/// file, the process quits, a new one maps the same RAM file in place (no RAM copy).
fn bench_cpr_reboot(dir: &Path, ram_mib: u64) -> Result<Value, String> {
    let ram = dir.join("guest.ram");
    let _ = std::fs::remove_file(&ram);
    let result = bench_via_file(dir, ram_mib, Some(&ram));
    let _ = std::fs::remove_file(&ram);
    result
}

/// Save to a file and restore in a new process: normal mode (RAM copied into the state file)
/// or, with `ram_file`, cpr-reboot (RAM stays in that file).
fn bench_via_file(dir: &Path, ram_mib: u64, ram_file: Option<&Path>) -> Result<Value, String> {
    let src_dir = dir.join("src");
    let dst_dir = dir.join("dst");
    std::fs::create_dir_all(&src_dir).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&dst_dir).map_err(|e| e.to_string())?;
    let bins = Binaries::default_build();
    let memory = || match ram_file {
        Some(path) => vec![
            "-object".to_string(),
            format!(
                "memory-backend-file,id=pc.ram,size={ram_mib}M,mem-path={},share=on,prealloc=on",
                path.display()
            ),
            "-machine".to_string(),
            "memory-backend=pc.ram".to_string(),
        ],
        None => vec!["-m".into(), format!("{ram_mib}M"), "--prealloc".into()],
    };
    let mut src = SweepingVm::start_with(&bins, &src_dir, memory(), None)?;
    src.steady_sweep_ms(1)?;
    let state = dir.join("bench.state");
    if ram_file.is_some() {
        src.qmp
            .execute("migrate-set-parameters", json!({"mode": "cpr-reboot"}))
            .map_err(|e| e.to_string())?;
    }
    let _ = src.qmp.events();
    src.qmp
        .execute(
            "migrate",
            json!({"uri": format!("file:{}", state.display())}),
        )
        .map_err(|e| e.to_string())?;
    let stop = src
        .qmp
        .wait_event("STOP", WAIT)
        .map_err(|e| e.to_string())?;
    loop {
        let ev = src
            .qmp
            .wait_event("MIGRATION", WAIT)
            .map_err(|e| e.to_string())?;
        match ev["data"]["status"].as_str() {
            Some("completed") => break,
            Some("failed") => return Err(format!("migration to a file failed: {ev}")),
            _ => {}
        }
    }
    let saved = src
        .qmp
        .execute("query-migrate", Value::Null)
        .map_err(|e| e.to_string())?;
    let _ = src.qmp.execute("quit", Value::Null);
    let _ = src.vmm.wait_exit(WAIT);
    let file_mib = std::fs::metadata(&state)
        .map(|m| m.len() as f64 / 1048576.0)
        .unwrap_or(0.0);
    let mut dst = SweepingVm::start_with(&bins, &dst_dir, memory(), Some("defer"))?;
    let t = Instant::now();
    dst.qmp
        .execute(
            "migrate-incoming",
            json!({"uri": format!("file:{}", state.display())}),
        )
        .map_err(|e| e.to_string())?;
    let resume = dst
        .qmp
        .wait_event("RESUME", WAIT)
        .map_err(|e| e.to_string())?;
    let restore_ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = dst.qmp.execute("quit", Value::Null);
    let _ = dst.vmm.wait_exit(WAIT);
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_dir_all(&src_dir);
    let _ = std::fs::remove_dir_all(&dst_dir);
    Ok(json!({
        "save_ms": saved["total-time"],
        "restore_ms": restore_ms,
        "stop_to_resume_ms": (event_timestamp(&resume) - event_timestamp(&stop)) * 1e3,
        "state_file_mib": file_mib,
        "note": "stop-to-resume includes starting the destination process (with prealloc) between save and restore",
    }))
}

/// The summary of QEMU's pauses, with its version; or why there are none.
fn qemu_pauses(r: Result<Vec<Measurement>, String>) -> Value {
    match r {
        Ok(m) => {
            let mut s = summary(&m.iter().map(|x| x.pause_ms).collect::<Vec<_>>());
            if let Some(first) = m.first() {
                s["qemu_version"] = json!(first.qemu_version.to_string());
            }
            s
        }
        Err(e) => json!({"unavailable": e}),
    }
}

/// QEMU's cpr-transfer pause with its disk idle (the boot-sector guest) and with blkcheck's
/// bzImage keeping 8 requests in flight on `-device virtio-blk-pci`, `reps` updates each.
fn bench_disk_qemu(install: &QemuInstall, ram_mib: u64, reps: usize, workdir: &Path) -> Value {
    if let Err(why) = &install.transfer {
        return json!({"unavailable": why});
    }
    let busy = build_blkcheck_bzimage(workdir).map(|kernel| QemuGuest::Blkcheck {
        kernel,
        depth: 8,
        disk_mib: 16,
    });
    let mut out = serde_json::Map::new();
    for (key, guest) in [("idle", Ok(QemuGuest::BootSector)), ("busy", busy)] {
        eprintln!("  {ram_mib} MiB QEMU cpr-transfer, disk {key}");
        let pauses =
            guest.and_then(|g| qemu_cpr_transfer_with(install, ram_mib, reps, workdir, &g));
        out.insert(key.into(), qemu_pauses(pauses));
    }
    Value::Object(out)
}

fn bench_qemu(install: &QemuInstall, ram_mib: u64, reps: usize, workdir: &Path) -> Value {
    let pauses = qemu_pauses;
    let transfer = match &install.transfer {
        Ok(q) => {
            eprintln!("  {ram_mib} MiB QEMU cpr-transfer ({})", q.version);
            pauses(qemu_cpr_transfer(install, ram_mib, reps, workdir))
        }
        Err(why) => json!({"unavailable": why}),
    };
    let exec = match &install.exec {
        Ok(q) => {
            eprintln!("  {ram_mib} MiB QEMU cpr-exec ({})", q.version);
            pauses(qemu_cpr_exec(install, ram_mib, reps, workdir))
        }
        Err(why) => json!({"unavailable": why}),
    };
    json!({"qemu_cpr_transfer_pause_ms": transfer, "qemu_cpr_exec_pause_ms": exec})
}

fn fmt_ms(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
        None => "-".into(),
    }
}

fn print_table(results: &[Value]) {
    println!();
    println!(
        "{:>8} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11} {:>11}",
        "RAM",
        "min ms",
        "median",
        "p99",
        "events",
        "dist",
        "KVM reg",
        "sweep x",
        "xfer ms",
        "normal ms",
        "reboot ms",
        "QEMU xfer",
        "QEMU exec"
    );
    for r in results {
        let c = &r["cpr_exec"];
        let b = &c["blackout_ms"];
        println!(
            "{:>8} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11} {:>11}",
            r["label"].as_str().unwrap_or("?"),
            fmt_ms(&b["min"]),
            fmt_ms(&b["median"]),
            fmt_ms(&b["p99"]),
            fmt_ms(&c["stop_to_resume_events_ms"]["median"]),
            fmt_ms(&r["cpr_exec_dist"]["blackout_ms"]["median"]),
            fmt_ms(&r["kvm_floor"]["register_ram_ms"]["median"]),
            c["first_sweep_slowdown"]
                .as_f64()
                .map(|x| format!("{x:.2}"))
                .unwrap_or("-".into()),
            fmt_ms(&r["cpr_transfer"]["blackout_ms"]["median"]),
            fmt_ms(&r["normal"]["stop_to_resume_ms"]),
            fmt_ms(&r["cpr_reboot"]["stop_to_resume_ms"]),
            fmt_ms(&r["qemu"]["qemu_cpr_transfer_pause_ms"]["median"]),
            fmt_ms(&r["qemu"]["qemu_cpr_exec_pause_ms"]["median"]),
        );
    }
    for (mode, title) in [
        ("cpr_exec", "cpr-exec"),
        ("cpr_exec_dist", "cpr-exec, deployment build"),
    ] {
        print_phase_medians(results, mode, title);
    }
}

/// The disk part: our cpr-exec blackout and QEMU's cpr-transfer pause, disk idle and with 8
/// requests in flight.
fn print_disk_table(disk_io: &Value) {
    if let Some(e) = disk_io["error"].as_str() {
        println!("\nblackout with disk I/O in flight: not measured: {e}");
        return;
    }
    if disk_io.is_null() {
        return;
    }
    println!(
        "\nblackout at {} MiB with a virtio-blk disk idle / with blkcheck keeping 8 requests in flight:",
        disk_io["ram_mib"]
    );
    println!(
        "{:<34} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "", "disk", "updates", "min ms", "median", "p99"
    );
    let q = &disk_io["qemu_cpr_transfer_pause_ms"];
    let qemu_name = format!(
        "QEMU {} cpr-transfer",
        q["busy"]["qemu_version"]
            .as_str()
            .or(q["idle"]["qemu_version"].as_str())
            .unwrap_or("")
    );
    let rows = [
        ("cpr-vmm cpr-exec", &disk_io["blackout_ms"]),
        (qemu_name.as_str(), q),
    ];
    for (name, figures) in rows {
        if let Some(why) = figures["unavailable"].as_str() {
            println!("{name:<34} not measured: {why}");
            continue;
        }
        for key in ["idle", "busy"] {
            let f = &figures[key];
            match f["unavailable"].as_str() {
                Some(why) => println!("{name:<34} {key:>7} not measured: {why}"),
                None if f.is_null() => {}
                None => println!(
                    "{name:<34} {key:>7} {:>9} {:>9} {:>9} {:>9}",
                    f["n"].to_string(),
                    fmt_ms(&f["min"]),
                    fmt_ms(&f["median"]),
                    fmt_ms(&f["p99"])
                ),
            }
        }
    }
}

/// One row per phase, one column per run that measured `mode`.
fn print_phase_medians(results: &[Value], mode: &str, title: &str) {
    let runs: Vec<&Value> = results
        .iter()
        .filter(|r| r[mode]["phase_medians_ms"].is_array())
        .collect();
    let Some(first) = runs.first() else {
        return;
    };
    print!("\nphase medians (ms), {title}:\n  {:<34}", "");
    for r in &runs {
        print!(" {:>8}", r["label"].as_str().unwrap_or("?"));
    }
    println!();
    let names = first[mode]["phase_medians_ms"]
        .as_array()
        .into_iter()
        .flatten();
    for (i, phase) in names.enumerate() {
        print!("  {:<34}", phase["name"].as_str().unwrap_or("?"));
        for r in &runs {
            let ms = r[mode]["phase_medians_ms"][i]["median_ms"].as_f64();
            print!(
                " {:>8}",
                ms.map(|x| format!("{x:.3}")).unwrap_or("-".into())
            );
        }
        println!();
    }
}

fn main() {
    let o = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    build_binaries();
    // State files live where an operator would put them: on tmpfs (/run, /dev/shm). The QEMU
    // runs use the same directory, so both sides pay the same for files.
    if std::env::var_os("TMPDIR").is_none() && Path::new("/dev/shm").is_dir() {
        // SAFETY: still single-threaded here; nothing reads the environment concurrently.
        unsafe { std::env::set_var("TMPDIR", "/dev/shm") };
    }
    let machine = machine_label();
    eprintln!("blackout-bench on {machine}");
    let skipped = json!({"error": "skipped (--file-modes-only or --disk-only)"});
    let exec_floor = match o.file_modes_only || o.disk_only {
        true => skipped.clone(),
        false => TempDir::new("exec-floor")
            .map_err(|e| e.to_string())
            .and_then(|d| bench_exec_floor(d.path(), o.updates))
            .unwrap_or_else(|e| json!({"error": e})),
    };
    let default_bins = Binaries::default_build();
    let dist_bins = o.dist_build.then(Binaries::dist_build);
    let qemu = o.qemu.then(QemuInstall::detect);
    if let Some(q) = &qemu {
        eprintln!("{}", q.describe());
    }
    let mut results = Vec::new();
    let mut variants: Vec<(u64, bool)> = o.sizes_mib.iter().map(|s| (*s, false)).collect();
    if o.disk_only {
        variants.clear();
    } else if o.hugepages {
        variants.extend(o.sizes_mib.iter().map(|s| (*s, true)));
    }
    for (ram_mib, hugepages) in variants {
        let label = format!(
            "{}{}",
            if ram_mib >= 1024 {
                format!("{}G", ram_mib / 1024)
            } else {
                format!("{ram_mib}M")
            },
            if hugepages { " 2M" } else { "" }
        );
        let dir = match TempDir::new("blackout-bench") {
            Ok(d) => d,
            Err(e) => {
                eprintln!("cannot create a work directory: {e}");
                std::process::exit(1);
            }
        };
        let reservation = hugepages.then(|| HugePageReservation::reserve(ram_mib + 16));
        let cpr = match &reservation {
            _ if o.file_modes_only => Value::Null,
            Some(Err(e)) => json!({"error": e}),
            _ => bench_cpr_exec(&default_bins, dir.path(), ram_mib, o.updates, hugepages)
                .unwrap_or_else(|e| json!({"error": e})),
        };
        let transfer = match &reservation {
            _ if o.file_modes_only => Value::Null,
            Some(Err(e)) => json!({"error": e}),
            _ => bench_cpr_transfer(dir.path(), ram_mib, o.updates, hugepages)
                .unwrap_or_else(|e| json!({"error": e})),
        };
        drop(reservation);
        let cpr_dist = match (&dist_bins, hugepages) {
            (Some(b), false) => bench_cpr_exec(b, dir.path(), ram_mib, o.updates, false)
                .unwrap_or_else(|e| json!({"error": e})),
            _ => Value::Null,
        };
        let kvm_floor = if hugepages || o.file_modes_only {
            Value::Null
        } else {
            bench_kvm_floor(ram_mib, o.updates).unwrap_or_else(|e| json!({"error": e}))
        };
        let normal = if hugepages {
            Value::Null
        } else {
            bench_normal(dir.path(), ram_mib).unwrap_or_else(|e| json!({"error": e}))
        };
        let cpr_reboot = if hugepages {
            Value::Null
        } else {
            bench_cpr_reboot(dir.path(), ram_mib).unwrap_or_else(|e| json!({"error": e}))
        };
        let qemu = match &qemu {
            Some(q) if !hugepages => bench_qemu(q, ram_mib, o.qemu_reps, dir.path()),
            _ => Value::Null,
        };
        results.push(json!({"label": label, "ram_mib": ram_mib, "hugepages": hugepages, "cpr_exec": cpr, "cpr_exec_dist": cpr_dist, "cpr_transfer": transfer, "kvm_floor": kvm_floor, "normal": normal, "cpr_reboot": cpr_reboot, "qemu": qemu}));
    }
    if !o.disk_only {
        print_table(&results);
    }
    let disk_io = match (o.disk || o.disk_only, o.sizes_mib.first()) {
        (true, Some(&ram_mib)) => TempDir::new("blackout-disk")
            .map_err(|e| e.to_string())
            .and_then(|d| {
                let ours = bench_disk_io(&default_bins, d.path(), ram_mib, o.updates)?;
                let qemu = match &qemu {
                    Some(q) => bench_disk_qemu(q, ram_mib, o.qemu_reps, d.path()),
                    None => Value::Null,
                };
                Ok(json!({"ram_mib": ram_mib, "blackout_ms": ours, "qemu_cpr_transfer_pause_ms": qemu}))
            })
            .unwrap_or_else(|e: String| json!({"error": e})),
        _ => Value::Null,
    };
    print_disk_table(&disk_io);
    let net = if o.net && !o.disk_only {
        use cpr_tests::netcheck::bench;
        bench::echo_gaps(o.updates.max(50), bench::ECHO_GAP_PERIOD, WAIT)
            .unwrap_or_else(|e| json!({"error": e}))
    } else {
        Value::Null
    };
    if !net.is_null() {
        println!("\n{}", cpr_tests::netcheck::bench::echo_gaps_report(&net));
    }
    let frame_rate = if o.net && !o.disk_only {
        let host_qemu = match &qemu {
            None => Err("not measured (--no-qemu)".to_string()),
            Some(q) => q
                .transfer
                .as_ref()
                .map(|h| h.binary.display().to_string())
                .map_err(Clone::clone),
        };
        let rates = cpr_tests::netcheck::bench::frame_rates(
            host_qemu.as_deref().map_err(Clone::clone),
            Duration::from_secs(2),
            5,
            WAIT,
        )
        .unwrap_or_else(|e| json!({"error": e}));
        println!(
            "\n{}",
            cpr_tests::netcheck::bench::frame_rates_report(&rates)
        );
        rates
    } else {
        Value::Null
    };
    let sha_bins = dist_bins.as_ref().unwrap_or(&default_bins);
    let sha256 = match o.sizes_mib.first().filter(|_| !o.disk_only) {
        Some(_) if o.file_modes_only => skipped.clone(),
        Some(&ram_mib) => TempDir::new("blackout-sha256")
            .map_err(|e| e.to_string())
            .and_then(|d| bench_sha256(sha_bins, d.path(), ram_mib, o.updates))
            .map(|mut v| {
                v["ram_mib"] = json!(ram_mib);
                v
            })
            .unwrap_or_else(|e| json!({"error": e})),
        None => Value::Null,
    };
    if let Some(e) = sha256["error"].as_str() {
        println!("\ncpr-exec with cpr-shim --sha256: not measured: {e}");
    } else if !sha256.is_null() {
        println!(
            "\ncpr-exec at {} MiB ({} build) through cpr-shim: median {} ms without --sha256, \
             {} ms with it (difference {} ms); the shim's checks: median {} ms without, {} ms with \
             (the old VMM hashes the target before the stop)",
            sha256["ram_mib"],
            if dist_bins.is_some() {
                "deployment"
            } else {
                "default"
            },
            fmt_ms(&sha256["without"]["median"]),
            fmt_ms(&sha256["with_sha256"]["median"]),
            fmt_ms(&sha256["median_difference_ms"]),
            fmt_ms(&sha256["shim_checks_ms"]["without"]),
            fmt_ms(&sha256["shim_checks_ms"]["with_sha256"]),
        );
    }
    match exec_floor["error"].as_str() {
        Some(e) => println!("\nexec of a minimal static program: not measured: {e}"),
        None if exec_floor.is_null() => {}
        None => println!(
            "\nexec of a minimal static program (floor under each of the two execs): \
             min {} median {} ms",
            fmt_ms(&exec_floor["min"]),
            fmt_ms(&exec_floor["median"])
        ),
    }
    let report = json!({"machine": machine, "updates_per_size": o.updates, "exec_floor_ms": exec_floor, "results": results, "disk_io": disk_io, "sha256": sha256, "net": net, "frame_rate": frame_rate});
    let path = o.json.clone().unwrap_or_else(|| {
        cpr_tests::target_dir().join("bench").join(format!(
            "blackout-{}.json",
            machine["date_unix"].as_u64().unwrap_or(0)
        ))
    });
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    match std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    ) {
        Ok(()) => println!("\nJSON: {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
    println!("machine: {machine}");
}
