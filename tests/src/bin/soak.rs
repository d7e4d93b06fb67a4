//! soak: many consecutive live updates of several guests at once, checking after every update
//! that nothing was lost and that nothing leaks.
//!
//! ```text
//! cargo run --release -p cpr-tests --bin soak -- [--updates 1000] [--check-every 50]
//!     [--guests memcheck,heartbeat,blkcheck] [--json FILE]
//! ```
//! (`scripts/soak.sh` runs it with the defaults.) Each guest runs in its own VM with 2 vCPUs;
//! the VMs are updated in turn, alternating the two builds (`target/release/vmm` and the
//! `0.1.0+alt` build) and the shim and direct paths, so each VM sees every combination. After
//! every update the update must have completed; every `--check-every` updates and at the end:
//! - memcheck: guest memory consistent (stopped, dumped, checked);
//! - heartbeat: every vCPU's console ticks consecutive (no line lost or duplicated);
//! - blkcheck: no mismatch on the console, its I/O counters still rising, and at the end the
//!   disk image holds the last generation the guest completed;
//! - every VM: fd count, thread count and mapping count equal to the first sample, RSS within
//!   16 MiB of it.
//!
//! Prints a summary (updates done and failed, blackout min/median/p99/max per guest, resource
//! samples) and exits 0 only if every update completed and every check held.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cpr_tests::blkcheck::{check_image, mismatch_lines, parse_pass_lines};
use cpr_tests::cpr::{alt_vmm_bin, cpr_update, direct_command, shim_command};
use cpr_tests::heartbeat::{assert_ticks_consecutive, parse_heartbeat_ticks};
use cpr_tests::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
const RSS_SLACK_KIB: u64 = 16 << 10;

struct Options {
    updates: usize,
    check_every: usize,
    guests: Vec<String>,
    json: Option<PathBuf>,
}

fn parse_options() -> Result<Options, String> {
    let mut o = Options {
        updates: 1000,
        check_every: 50,
        guests: vec!["memcheck".into(), "heartbeat".into(), "blkcheck".into()],
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--updates" => o.updates = value()?.parse().map_err(|_| "bad --updates")?,
            "--check-every" => {
                o.check_every = value()?.parse().map_err(|_| "bad --check-every")?;
            }
            "--guests" => o.guests = value()?.split(',').map(str::to_string).collect(),
            "--json" => o.json = Some(PathBuf::from(value()?)),
            _ => {
                return Err("usage: soak [--updates 1000] [--check-every 50] \
                     [--guests memcheck,heartbeat,blkcheck] [--json FILE]"
                    .into());
            }
        }
    }
    if o.check_every == 0 || o.guests.is_empty() {
        return Err("--check-every must be > 0 and --guests not empty".into());
    }
    Ok(o)
}

/// Resources a leak across updates would make grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Resources {
    fds: usize,
    threads: usize,
    mappings: usize,
    rss_kib: u64,
}

fn resources(pid: u32) -> Result<Resources, String> {
    let read = |what: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{what}"))
            .map_err(|e| format!("/proc/{pid}/{what}: {e}"))
    };
    let status = read("status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Resources {
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map_err(|e| e.to_string())?
            .count(),
        threads: field("Threads:") as usize,
        mappings: read("maps")?.lines().count(),
        rss_kib: field("VmRSS:"),
    })
}

struct SoakVm {
    guest: String,
    process: VmmProcess,
    qmp: QmpClient,
    args: Vec<String>,
    state: PathBuf,
    dir: TempDir,
    disk: Option<PathBuf>,
    blackouts_ms: Vec<f64>,
    first: Option<Resources>,
    last: Option<Resources>,
    blk_requests_seen: u64,
}

const RAM_MIB: u64 = 64;

impl SoakVm {
    fn start(guest: &str) -> Result<SoakVm, String> {
        let dir = TempDir::new(&format!("soak-{guest}")).map_err(|e| e.to_string())?;
        let socket = dir.join("qmp.sock");
        let mut args: Vec<String> = ["-m", &format!("{RAM_MIB}M"), "-smp", "2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut disk = None;
        match guest {
            "memcheck" => args.extend(["--guest".into(), "memcheck".into()]),
            "heartbeat" => args.extend(["--guest".into(), "heartbeat,hz=20".into()]),
            "blkcheck" => {
                let image = dir.join("disk.img");
                std::fs::File::create(&image)
                    .and_then(|f| f.set_len(32 << 20))
                    .map_err(|e| format!("creating the disk: {e}"))?;
                args.extend([
                    "--guest".into(),
                    "blkcheck,depth=8".into(),
                    "-drive".into(),
                    format!("file={},format=raw,if=virtio", image.display()),
                ]);
                disk = Some(image);
            }
            other => return Err(format!("unknown guest {other}")),
        }
        args.extend(["-qmp".into(), qmp_socket_arg(&socket)]);
        let process = VmmProcess::start(vmm_bin(), &args).map_err(|e| e.to_string())?;
        process
            .wait_for_path(&socket, WAIT)
            .map_err(|e| e.to_string())?;
        let mut qmp = QmpClient::connect_and_negotiate(&socket, WAIT).map_err(|e| e.to_string())?;
        qmp.set_timeout(WAIT);
        let state = dir.join("vm.state");
        Ok(SoakVm {
            guest: guest.to_string(),
            process,
            qmp,
            args,
            state,
            dir,
            disk,
            blackouts_ms: Vec::new(),
            first: None,
            last: None,
            blk_requests_seen: 0,
        })
    }

    fn update(&mut self, n: usize) -> Result<(), String> {
        let target = if n.is_multiple_of(2) {
            vmm_bin()
        } else {
            alt_vmm_bin()
        };
        let command = if (n / 2).is_multiple_of(2) {
            shim_command(&shim_bin(), &[], &target, &self.args, &self.state)
        } else {
            direct_command(&target, &self.args, &self.state)
        };
        let update = cpr_update(&mut self.qmp, &command, &self.state, true, WAIT)
            .map_err(|e| format!("update {n}: {e}"))?;
        if update.status() != "completed" {
            return Err(format!(
                "update {n} ({}): {} {}",
                target.display(),
                update.status(),
                update.error_desc()
            ));
        }
        self.blackouts_ms
            .push(update.x_cpr()["blackout-ns"].as_f64().unwrap_or(f64::NAN) / 1e6);
        Ok(())
    }

    /// The guest's own checks and the resource sample.
    fn check(&mut self, final_check: bool) -> Result<(), String> {
        let console = self.process.stdout_text();
        match self.guest.as_str() {
            "memcheck" => {
                let done = console.matches('B').count();
                self.process
                    .wait_for_output(|t| t.matches('B').count() > done, WAIT)
                    .map_err(|e| e.to_string())?;
                self.qmp
                    .execute("stop", Value::Null)
                    .map_err(|e| e.to_string())?;
                let dump = dump_memcheck_range(
                    &mut self.qmp,
                    RAM_MIB << 20,
                    &self.dir.join("memcheck.dump"),
                )
                .map_err(|e| e.to_string())?;
                check_memcheck_dump(&dump).map_err(|e| format!("memcheck: {e}"))?;
                self.qmp
                    .execute("cont", Value::Null)
                    .map_err(|e| e.to_string())?;
                if self.process.stdout_text().matches('A').count() != 1 {
                    return Err("memcheck: the guest restarted".into());
                }
            }
            "heartbeat" => {
                assert_ticks_consecutive(&parse_heartbeat_ticks(&console))
                    .map_err(|e| format!("heartbeat: {e}"))?;
            }
            "blkcheck" => {
                let bad = mismatch_lines(&console);
                if !bad.is_empty() {
                    return Err(format!("blkcheck: {}", bad.join("; ")));
                }
                let passes = parse_pass_lines(&console);
                let requests = passes.last().map_or(0, |p| p.total);
                if requests <= self.blk_requests_seen && !final_check {
                    // Not yet: wait for the next pass line, which shows I/O went on.
                    let lines = passes.len();
                    self.process
                        .wait_for_output(|t| parse_pass_lines(t).len() > lines, WAIT)
                        .map_err(|e| format!("blkcheck made no progress: {e}"))?;
                }
                self.blk_requests_seen = parse_pass_lines(&self.process.stdout_text())
                    .last()
                    .map_or(0, |p| p.total);
                if final_check && let Some(image) = &self.disk {
                    self.qmp
                        .execute("stop", Value::Null)
                        .map_err(|e| e.to_string())?;
                    let last = parse_pass_lines(&self.process.stdout_text())
                        .last()
                        .map_or(0, |p| p.generation);
                    check_image(image, last).map_err(|e| format!("disk image: {e}"))?;
                    self.qmp
                        .execute("cont", Value::Null)
                        .map_err(|e| e.to_string())?;
                }
            }
            _ => {}
        }
        let now = resources(self.process.pid())?;
        let first = *self.first.get_or_insert(now);
        self.last = Some(now);
        if now.fds != first.fds
            || now.threads != first.threads
            || now.mappings != first.mappings
            || now.rss_kib > first.rss_kib + RSS_SLACK_KIB
        {
            return Err(format!(
                "{}: resources grew: first {first:?}, now {now:?}",
                self.guest
            ));
        }
        Ok(())
    }
}

fn summary(v: &[f64]) -> Value {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return Value::Null;
    }
    let at = |q: f64| s[((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1];
    json!({"n": s.len(), "min": s[0], "median": at(0.5), "p99": at(0.99), "max": s[s.len() - 1]})
}

fn run(o: &Options) -> Result<Value, (String, Value)> {
    build_binaries();
    let _ = alt_vmm_bin();
    let mut vms = Vec::new();
    for g in &o.guests {
        vms.push(SoakVm::start(g).map_err(|e| (e, Value::Null))?);
    }
    // The first samples once every guest is busy.
    for vm in &mut vms {
        vm.check(false).map_err(|e| (e, Value::Null))?;
    }
    let started = Instant::now();
    let report = |vms: &[SoakVm], done: usize| {
        json!({
            "updates_per_vm": done,
            "seconds": started.elapsed().as_secs_f64(),
            "vms": vms.iter().map(|vm| json!({
                "guest": vm.guest,
                "blackout_ms": summary(&vm.blackouts_ms),
                "first": vm.first.map(|r| format!("{r:?}")),
                "last": vm.last.map(|r| format!("{r:?}")),
            })).collect::<Vec<_>>(),
        })
    };
    let mut failure = None;
    let mut done = 0;
    'updates: for n in 0..o.updates {
        for vm in &mut vms {
            if let Err(e) = vm.update(n) {
                failure = Some(format!("{}: {e}", vm.guest));
                break 'updates;
            }
        }
        done = n + 1;
        if done % o.check_every == 0 || done == o.updates {
            for vm in &mut vms {
                if let Err(e) = vm.check(done == o.updates) {
                    failure = Some(format!("after update {done}: {e}"));
                    break 'updates;
                }
            }
            eprintln!(
                "soak: {done}/{} updates per VM, {:.0} s",
                o.updates,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let r = report(&vms, done);
    for vm in &mut vms {
        let _ = vm.qmp.execute("quit", Value::Null);
        let _ = vm.process.wait_exit(WAIT);
    }
    match failure {
        None => Ok(r),
        Some(e) => Err((e, r)),
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
    let (ok, report, error) = match run(&o) {
        Ok(r) => (true, r, None),
        Err((e, r)) => (false, r, Some(e)),
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    if let Some(path) = &o.json {
        let _ = std::fs::write(
            path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        );
    }
    match error {
        None => println!("soak: PASS"),
        Some(e) => println!("soak: FAIL: {e}"),
    }
    std::process::exit(if ok { 0 } else { 1 });
}
