//! End-to-end tests of cpr-exec live update (issue 4): replace the running VMM
//! with another binary in the same process, guest RAM kept in place.
//!
//! Every test drives real `vmm` processes on /dev/kvm the way an operator does
//! (QMP `migrate-set-parameters` + `migrate`, or the HMP text of the issue) and
//! judges the result by what the guest itself shows:
//!
//! - the heartbeat guest numbers its ticks per vCPU, so the whole console log of
//!   a run must hold one `start` per vCPU and strictly consecutive ticks from 1:
//!   no tick lost, repeated or restarted across any update or rollback;
//! - the memcheck guest keeps incrementing one byte per page, so a stopped dump
//!   of its range must be consistent (all equal but for one drop by exactly 1).
//!
//! Faults are injected with `cpr-fault` (tests/src/bin/cpr-fault.rs), a wrapper
//! put in front of the shim in `cpr-exec-command`; it damages fds, the CPR
//! channel or the state file in the VMM's own process, then executes the shim.
//! Each fault must end with the guest running, the same PID, the reason in
//! `query-migrate` and a `MIGRATION` `failed` event, and a VM that can still be
//! updated afterwards.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cpr_tests::cpr::{
    Update, alt_vmm_bin, check_heartbeat_from_boot, command_without_inherited_fds, cpr_update,
    direct_command, fault_bin, fd_identity, fd_kind, fd_kinds, listener_fd, memfd_name,
    min_median_max, ram_fd, ram_memfds, set_cpr_exec_command, shim_command, vmm_claiming_formats,
    wait_update_end,
};
use cpr_tests::heartbeat::parse_heartbeats;
use cpr_tests::hugepages::{HugePageReservation, mapping_page_size_kib, mapping_rss_kib};
use cpr_tests::memcheck::stop_and_check_sampled;
use cpr_tests::*;
use serde_json::{Value, json};

/// Generous limit for anything the guest or the VMM has to do.
const LONG: Duration = Duration::from_secs(60);
const HEARTBEAT: &str = "heartbeat,hz=100";

// ---------------------------------------------------------------------------
// helpers

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A running VM with its QMP connection, its scratch directory and the
/// arguments a successor VMM needs (everything but `-incoming`).
///
/// Fields drop in order: the connection, then the process (killed with its
/// process group), then the scratch directory.
struct Vm {
    qmp: QmpClient,
    process: VmmProcess,
    socket: PathBuf,
    state: PathBuf,
    args: Vec<String>,
    dir: TempDir,
}

impl Vm {
    /// Starts `vmm MACHINE_ARGS -qmp unix:DIR/qmp.sock,...`.
    fn start(prefix: &str, machine_args: &[&str]) -> Self {
        Self::start_with_env(prefix, machine_args, &[])
    }

    fn start_with_env(prefix: &str, machine_args: &[&str], env: &[(&str, String)]) -> Self {
        let dir = TempDir::new(prefix).unwrap();
        let socket = dir.join("qmp.sock");
        let mut args = strings(machine_args);
        args.push("-qmp".into());
        args.push(qmp_socket_arg(&socket));
        Self::spawn(dir, socket, args, env)
    }

    /// Starts `vmm ARGS` where ARGS already names `socket` in `-qmp`.
    fn spawn(dir: TempDir, socket: PathBuf, args: Vec<String>, env: &[(&str, String)]) -> Self {
        build_binaries();
        let started = Instant::now();
        let process = loop {
            // Only stdio is inherited, so every other fd the VMM holds is its own.
            let mut command = command_without_inherited_fds(vmm_bin());
            command.args(&args).envs(env.iter().map(|(k, v)| (*k, v)));
            match VmmProcess::spawn(command) {
                Ok(process) => break process,
                // A concurrent `cargo build` is replacing the binary: wait for it.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ExecutableFileBusy | std::io::ErrorKind::NotFound
                    ) && started.elapsed() < LONG =>
                {
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot start {}: {e}", vmm_bin().display()),
            }
        };
        process.wait_for_path(&socket, LONG).unwrap();
        let qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
        let state = dir.join("vm.state");
        Vm {
            dir,
            socket,
            state,
            args,
            process,
            qmp,
        }
    }

    fn heartbeat(prefix: &str, cpus: u32) -> Self {
        Self::start(
            prefix,
            &["-m", "16M", "-smp", &cpus.to_string(), "--guest", HEARTBEAT],
        )
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// A new QMP connection is answered (`query-status`) by process `pid`: the PID of the
    /// process serving the socket, from its peer credentials, not the one saved at spawn.
    fn assert_qmp_answered_by(&self, pid: u32) {
        let mut client = QmpClient::connect_and_negotiate(&self.socket, LONG).unwrap();
        client.execute("query-status", Value::Null).unwrap();
        let server = client.server_pid().unwrap();
        assert_eq!(server, pid, "QMP is answered by PID {server}, not by {pid}");
        assert!(
            self.process.try_wait().is_none(),
            "the VMM process {pid} exited"
        );
    }

    /// `cpr-shim [shim_args] -- VMM ARGS -incoming file:STATE`.
    fn via_shim(&self, shim_args: &[String], vmm: &Path) -> Vec<String> {
        shim_command(&shim_bin(), shim_args, vmm, &self.args, &self.state)
    }

    /// `VMM ARGS -incoming file:STATE`, no shim.
    fn direct(&self, vmm: &Path) -> Vec<String> {
        direct_command(vmm, &self.args, &self.state)
    }

    /// One live update of the running guest with `command`.
    fn update(&mut self, command: &[String]) -> Update {
        cpr_update(&mut self.qmp, command, &self.state, true, LONG)
            .unwrap_or_else(|e| panic!("live update with {command:?}: {e}"))
    }

    /// One live update through the shim into `vmm`, which must complete.
    fn update_ok(&mut self, vmm: &Path) -> Update {
        let command = self.via_shim(&[], vmm);
        let update = self.update(&command);
        assert_completed(&update);
        update
    }

    fn status(&mut self) -> String {
        let reply = self.qmp.execute("query-status", Value::Null).unwrap();
        reply["status"].as_str().unwrap().to_string()
    }

    /// The binary the process runs now (`/proc/PID/exe`).
    fn exe(&self) -> PathBuf {
        std::fs::read_link(format!("/proc/{}/exe", self.pid())).unwrap()
    }

    /// The process is alive, still our child (same PID) and runs `binary`.
    fn assert_same_process_runs(&self, binary: &Path) {
        assert!(
            self.process.try_wait().is_none(),
            "the VMM process {} exited",
            self.pid()
        );
        assert_eq!(
            self.exe(),
            binary.canonicalize().unwrap(),
            "pid {} runs another binary than expected",
            self.pid()
        );
    }

    /// Waits until every vCPU printed at least `more` ticks beyond its last one.
    fn wait_ticks_advance(&self, cpus: u32, more: u64) {
        let last: Vec<u64> = (0..cpus)
            .map(|cpu| self.process.last_tick(cpu).unwrap_or(0))
            .collect();
        for (cpu, last) in last.iter().enumerate() {
            self.process
                .wait_for_tick(cpu as u32, last + more, LONG)
                .unwrap();
        }
    }

    /// Checks the whole console log of the run (see `check_heartbeat_from_boot`).
    fn assert_heartbeat_continuous(&self, cpus: u32) {
        if let Err(e) = check_heartbeat_from_boot(&self.process.stdout_text(), cpus) {
            panic!("heartbeat continuity: {e}");
        }
    }

    /// For a memcheck guest with `ram` bytes: waits for two more sweeps, stops the guest, checks
    /// the dump of its range (`what` says when, in the failure), lets it run again and waits for
    /// one more sweep. The guest must never have restarted (one `A`).
    fn assert_memcheck_consistent(&mut self, ram: u64, what: &str) {
        let sweeps = |vm: &Vm| vm.process.stdout_text().matches('B').count();
        let done = sweeps(self);
        self.process
            .wait_for_output(|text| text.matches('B').count() >= done + 2, LONG)
            .unwrap();
        self.qmp.execute("stop", Value::Null).unwrap();
        self.qmp.wait_event("STOP", LONG).unwrap();
        let name = format!("dump-{}", what.replace(' ', "-"));
        let dump = dump_memcheck_range(&mut self.qmp, ram, &self.dir.join(name)).unwrap();
        if let Err(e) = check_memcheck_dump(&dump) {
            panic!("{what}: {e}");
        }
        assert_ne!(dump[0], 0, "{what}: the guest never swept its memory");
        self.qmp.execute("cont", Value::Null).unwrap();
        self.qmp.wait_event("RESUME", LONG).unwrap();
        let done = sweeps(self);
        self.process
            .wait_for_output(|text| text.matches('B').count() > done, LONG)
            .unwrap();
        assert_eq!(
            self.process.stdout_text().matches('A').count(),
            1,
            "{what}: the guest restarted"
        );
    }

    /// Quits through QMP; the process must exit with status 0.
    fn quit(mut self) {
        self.qmp.execute("quit", Value::Null).unwrap();
        let status = self.process.wait_exit(LONG).unwrap();
        assert_eq!(status.code(), Some(0), "{}", self.process.stderr_text());
    }
}

/// The update completed in a new process: x-cpr present, not rolled back, the
/// phases add up to the blackout.
fn assert_completed(update: &Update) {
    assert_eq!(
        update.statuses,
        ["active", "completed"],
        "MIGRATION events; query-migrate: {}",
        update.info
    );
    assert_eq!(update.status(), "completed", "{}", update.info);
    assert_eq!(update.rolled_back(), Some(false), "{}", update.info);
    let blackout = update
        .blackout_ns()
        .unwrap_or_else(|| panic!("no x-cpr.blackout-ns: {}", update.info));
    assert!(blackout > 0, "{}", update.info);
    assert_eq!(
        update.info["downtime"].as_u64(),
        Some(blackout / 1_000_000),
        "downtime (ms) is the blackout: {}",
        update.info
    );
    let phases = update.phases();
    assert!(phases.len() >= 3, "{}", update.info);
    let sum: u64 = phases.iter().map(|(_, ns)| ns).sum();
    assert!(
        sum.abs_diff(blackout) <= 1_000_000,
        "the phases add up to {sum} ns, the blackout is {blackout} ns: {}",
        update.info
    );
}

/// The update failed, the guest runs again and the reason names the cause.
fn assert_failed(update: &Update, causes: &[&str], rolled_back: bool) {
    assert_eq!(
        update.statuses.last().map(String::as_str),
        Some("failed"),
        "MIGRATION events {:?}; query-migrate: {}",
        update.statuses,
        update.info
    );
    assert_eq!(update.status(), "failed", "{}", update.info);
    let desc = update.error_desc();
    for cause in causes {
        assert!(
            desc.contains(cause),
            "error-desc does not mention {cause:?}: {desc:?}"
        );
    }
    if rolled_back {
        assert_eq!(
            update.rolled_back(),
            Some(true),
            "a rollback must be reported in x-cpr: {}",
            update.info
        );
    } else {
        assert!(
            update.rolled_back() != Some(true),
            "no rollback was expected: {}",
            update.info
        );
    }
    assert!(update.stop.is_some() && update.resume.is_some());
}

/// What `pid` holds once the teardown helper of the last update was reaped and its KVM VM
/// released: no child, one KVM VM (waits for that, failing with `when` if it never comes).
fn settled_holdings(pid: u32, when: &str) -> Holdings {
    let mut last = None;
    let settled = wait_until(LONG, || {
        last = holdings(pid).ok();
        last.is_some_and(|h| h.children == 0 && h.kvm_vms == 1)
    });
    assert!(
        settled,
        "{when}: the VMM still holds {last:?} (want no child and one KVM VM)"
    );
    last.unwrap()
}

fn shim_log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Now, in seconds since the epoch (the clock of QMP event timestamps).
fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn phase_summary(update: &Update) -> String {
    update
        .phases()
        .iter()
        .map(|(name, ns)| format!("{name} {:.2}", ms(*ns)))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// the update itself

#[test]
fn update_through_the_shim_keeps_the_pid_and_both_vcpus_ticking() {
    let mut vm = Vm::heartbeat("shim2", 2);
    let pid = vm.pid();
    vm.wait_ticks_advance(2, 5);
    let before = vm.process.stdout_text();
    let log = vm.dir.join("shim.log");
    let command = vm.via_shim(&strings(&["--log", log.to_str().unwrap()]), &vmm_bin());
    let update = vm.update(&command);
    assert_completed(&update);
    assert_eq!(update.from_version(), update.to_version());
    vm.assert_qmp_answered_by(pid);
    vm.assert_same_process_runs(&vmm_bin());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("-incoming"),
        "pid {pid} was not re-executed as the incoming VMM"
    );
    assert_eq!(vm.status(), "running");

    // Both vCPUs continue where they stopped: the first tick after the update
    // is the last before + 1 and no vCPU started again.
    vm.wait_ticks_advance(2, 10);
    let after = vm.process.stdout_text();
    let old = parse_heartbeats(&before);
    let all = parse_heartbeats(&after);
    for cpu in 0..2 {
        let last_before = *old.ticks[&cpu].last().unwrap();
        let ticks = &all.ticks[&cpu];
        let index = ticks.iter().position(|&t| t == last_before).unwrap();
        assert_eq!(
            ticks.get(index + 1),
            Some(&(last_before + 1)),
            "cpu {cpu}: tick after {last_before}"
        );
    }
    vm.assert_heartbeat_continuous(2);

    // STOP (old process) to RESUME (new process) is the reported blackout.
    let blackout_s = update.blackout_ns().unwrap() as f64 / 1e9;
    let gap = update.event_gap_s().unwrap();
    eprintln!(
        "blackout {:.3} ms, STOP->RESUME {:.3} ms; phases (ms): {}",
        blackout_s * 1e3,
        gap * 1e3,
        phase_summary(&update)
    );
    assert!(
        (gap - blackout_s).abs() < 0.050,
        "STOP->RESUME {gap:.6} s vs blackout {blackout_s:.6} s"
    );

    // The shim logged the update: same pid, from and to binaries, outcome.
    let lines = shim_log_lines(&log);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["pid"], json!(pid), "{line}");
    assert_eq!(line["outcome"], "exec", "{line}");
    assert_eq!(
        line["to"]["resolved"].as_str(),
        vmm_bin().canonicalize().unwrap().to_str(),
        "{line}"
    );
    assert_eq!(line["from"]["version"], update.from_version(), "{line}");
    vm.quit();
}

#[test]
fn update_directly_without_the_shim() {
    let mut vm = Vm::heartbeat("direct", 1);
    vm.wait_ticks_advance(1, 5);
    let command = vm.direct(&vmm_bin());
    let update = vm.update(&command);
    assert_completed(&update);
    assert!(
        !update
            .phases()
            .iter()
            .any(|(name, _)| name.contains("shim")),
        "no shim ran, yet the phases name one: {}",
        phase_summary(&update)
    );
    vm.assert_same_process_runs(&vmm_bin());
    vm.wait_ticks_advance(1, 10);
    // And once more, so the second update starts from an updated process.
    let command = vm.direct(&vmm_bin());
    assert_completed(&vm.update(&command));
    vm.wait_ticks_advance(1, 10);
    vm.assert_heartbeat_continuous(1);
    vm.quit();
}

#[test]
fn memcheck_memory_is_consistent_after_an_update() {
    const RAM: u64 = 64 << 20;
    let mut vm = Vm::start("memchk", &["-m", "64M", "-smp", "2", "--guest", "memcheck"]);
    vm.process
        .wait_for_output(
            |text| text.starts_with('A') && text.matches('B').count() >= 2,
            LONG,
        )
        .unwrap();
    assert_completed(&vm.update(&vm.via_shim(&[], &vmm_bin())));
    vm.assert_memcheck_consistent(RAM, "after the update");
    vm.quit();
}

/// RAM above 4 GiB: a 5 GiB memcheck guest sweeping one page every 16 MiB of all RAM (both
/// regions) is consistent after a live update, read from the RAM memfds of the process.
#[test]
fn memcheck_sampled_across_5_gib_is_consistent_after_an_update() {
    const RAM: u64 = 5 << 30;
    let mut vm = Vm::start(
        "mem5g",
        &["-m", "5G", "-smp", "1", "--guest", "memcheck,sweep=sampled"],
    );
    let sweeps = |vm: &Vm| vm.process.stdout_text().matches('B').count();
    vm.process
        .wait_for_output(
            |text| text.starts_with('A') && text.matches('B').count() >= 3,
            LONG,
        )
        .unwrap();
    assert_completed(&vm.update(&vm.via_shim(&[], &vmm_bin())));
    let done = sweeps(&vm);
    vm.process
        .wait_for_output(|text| text.matches('B').count() >= done + 2, LONG)
        .unwrap();
    let pid = vm.pid();
    if let Err(e) = stop_and_check_sampled(&mut vm.qmp, pid, RAM) {
        panic!("after the update: {e}");
    }
    vm.qmp.execute("cont", Value::Null).unwrap();
    assert_eq!(vm.process.stdout_text().matches('A').count(), 1);
    vm.quit();
}

/// The memcheck guest's memory is intact after a rollback, whether the shim refused the target
/// (the previous VMM restores from the state file) or the new VMM had already mapped RAM and
/// restored the machine when it crashed.
#[test]
fn memcheck_memory_is_consistent_after_rollbacks() {
    const RAM: u64 = 64 << 20;
    let mut vm = Vm::start("memrb", &["-m", "64M", "-smp", "2", "--guest", "memcheck"]);
    vm.process
        .wait_for_output(
            |text| text.starts_with('A') && text.matches('B').count() >= 2,
            LONG,
        )
        .unwrap();
    let refused = shim_command(
        &shim_bin(),
        &[],
        Path::new("/bin/true"),
        &vm.args,
        &vm.state,
    );
    assert_failed(&vm.update(&refused), &["cannot take a live update"], true);
    vm.assert_memcheck_consistent(RAM, "after the shim refused the target");

    let mut crashing = vm.via_shim(&[], &vmm_bin());
    let at = crashing.len() - 2;
    crashing.splice(
        at..at,
        strings(&["--cpr-test-fault", "crash-before-resume"]),
    );
    assert_failed(&vm.update(&crashing), &["crashed before resuming"], true);
    vm.assert_memcheck_consistent(RAM, "after the new VMM crashed before resuming");
    vm.quit();
}

#[test]
fn a_paused_guest_stays_paused_and_its_memory_is_untouched() {
    const RAM: u64 = 32 << 20;
    let mut vm = Vm::start("paused", &["-m", "32M", "--guest", "memcheck"]);
    vm.process
        .wait_for_output(|text| text.matches('B').count() >= 2, LONG)
        .unwrap();
    vm.qmp.execute("stop", Value::Null).unwrap();
    vm.qmp.wait_event("STOP", LONG).unwrap();
    let before = dump_memcheck_range(&mut vm.qmp, RAM, &vm.dir.join("before")).unwrap();
    check_memcheck_dump(&before).unwrap();

    let command = vm.via_shim(&[], &vmm_bin());
    let update = cpr_update(&mut vm.qmp, &command, &vm.state, false, LONG).unwrap();
    assert_completed(&update);
    assert_eq!(vm.status(), "paused");
    let events: Vec<String> = vm
        .qmp
        .events()
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        !events.iter().any(|e| e == "RESUME" || e == "STOP"),
        "a paused guest must not be resumed (or stopped) by an update: {events:?}"
    );
    let after = dump_memcheck_range(&mut vm.qmp, RAM, &vm.dir.join("after")).unwrap();
    assert!(
        before == after,
        "guest memory changed across the update of a paused guest"
    );
    let sweeps = vm.process.stdout_text().matches('B').count();
    vm.qmp.execute("cont", Value::Null).unwrap();
    vm.qmp.wait_event("RESUME", LONG).unwrap();
    vm.process
        .wait_for_output(|text| text.matches('B').count() > sweeps, LONG)
        .unwrap();
    vm.quit();
}

/// `-m SIZE,hugepages=on` backs guest RAM with 2 MiB hugetlb pages, and a live update keeps
/// them (the new VMM maps the same hugetlb memfd). On a machine that cannot reserve 2 MiB pages it
/// fails under CI and is recorded as skipped elsewhere (`prerequisite_missing`).
#[test]
fn hugepage_backed_guest_updates() {
    const RAM_MIB: u64 = 16;
    let _reservation = match HugePageReservation::reserve(RAM_MIB + 4) {
        Ok(r) => r,
        Err(e) => {
            prerequisite_missing("hugepage_backed_guest_updates", &e);
            return;
        }
    };
    let memory = format!("{RAM_MIB}M,hugepages=on");
    let mut vm = Vm::start("huge", &["-m", &memory, "-smp", "1", "--guest", HEARTBEAT]);
    let page_kib = |vm: &Vm| mapping_page_size_kib(vm.pid(), "guest-ram-low");
    assert_eq!(page_kib(&vm), Some(2048), "guest RAM is not on 2 MiB pages");
    vm.wait_ticks_advance(1, 3);
    vm.update_ok(&vmm_bin());
    assert_eq!(page_kib(&vm), Some(2048), "after the update");
    vm.wait_ticks_advance(1, 3);
    vm.assert_heartbeat_continuous(1);
    vm.quit();
}

/// The deployment build (scripts/build-dist.sh) is statically linked, and live-updates to and
/// from the `cargo build --release` binaries in both directions, each through its own shim.
/// `-m SIZE,prealloc=on` faults all of guest RAM into the VMM's page tables at boot (resident
/// in /proc/PID/smaps); without it, the heartbeat guest leaves most of its RAM untouched. (An
/// update does not pre-fault again in the new VMM, as QEMU's cpr modes do not: the pages are
/// already allocated in the memfd; `cpr-shim --prefault` is the tool for that, tested below.)
#[test]
fn prealloc_populates_guest_ram() {
    const RAM_KIB: u64 = 32 << 10;
    let rss = |vm: &Vm| mapping_rss_kib(vm.pid(), "guest-ram-low").unwrap();
    let lazy = Vm::start("nopre", &["-m", "32M", "-smp", "1", "--guest", HEARTBEAT]);
    lazy.wait_ticks_advance(1, 2);
    let lazy_rss = rss(&lazy);
    assert!(
        lazy_rss < RAM_KIB / 2,
        "without prealloc {lazy_rss} KiB of {RAM_KIB} are resident: the check below means nothing"
    );
    lazy.quit();

    let vm = Vm::start(
        "prealloc",
        &["-m", "32M,prealloc=on", "-smp", "1", "--guest", HEARTBEAT],
    );
    assert_eq!(rss(&vm), RAM_KIB, "at boot");
    vm.wait_ticks_advance(1, 2);
    vm.quit();
}

#[test]
fn deployment_build_updates_to_and_from_the_release_build() {
    const CPUS: u32 = 2;
    let (dist_vmm, dist_shim) = dist_binaries();
    for binary in [&dist_vmm, &dist_shim] {
        assert!(
            is_statically_linked(binary).unwrap(),
            "{} must not need the dynamic loader",
            binary.display()
        );
    }
    let mut vm = Vm::heartbeat("dist", CPUS);
    let pid = vm.pid();
    vm.wait_ticks_advance(CPUS, 3);
    let to_dist = shim_command(&dist_shim, &[], &dist_vmm, &vm.args, &vm.state);
    let update = vm.update(&to_dist);
    assert_completed(&update);
    vm.assert_same_process_runs(&dist_vmm);
    vm.wait_ticks_advance(CPUS, 2);
    vm.update_ok(&vmm_bin());
    vm.assert_same_process_runs(&vmm_bin());
    vm.assert_qmp_answered_by(pid);
    vm.wait_ticks_advance(CPUS, 3);
    vm.assert_heartbeat_continuous(CPUS);
    vm.quit();
}

#[test]
fn fifty_updates_alternating_between_two_builds() {
    const UPDATES: usize = 50;
    const CPUS: u32 = 2;
    let alt = alt_vmm_bin();
    let main = vmm_bin();
    let mut vm = Vm::heartbeat("fifty", CPUS);
    let pid = vm.pid();
    let log = vm.dir.join("shim.log");
    vm.wait_ticks_advance(CPUS, 3);
    let package = |vm: &mut Vm| {
        let version = vm.qmp.execute("query-version", Value::Null).unwrap();
        version["package"].as_str().unwrap().to_string()
    };
    let first_package = package(&mut vm);
    assert!(!first_package.contains("+alt"), "{first_package}");

    let mut blackouts = Vec::new();
    let mut gaps = Vec::new();
    let mut versions: Vec<String> = Vec::new();
    // What the process holds once the previous version's teardown helper is done: recorded
    // after the first update, and the same after the last one.
    let mut after_first: Option<Holdings> = None;
    let started = Instant::now();
    for i in 0..UPDATES {
        let (target, is_alt) = if i % 2 == 0 {
            (&alt, true)
        } else {
            (&main, false)
        };
        let command = vm.via_shim(&strings(&["--log", log.to_str().unwrap()]), target);
        let update = vm.update(&command);
        assert_completed(&update);
        let to = update.to_version().to_string();
        assert_eq!(to.contains("+alt"), is_alt, "update {i}: to-version {to}");
        if let Some(previous) = versions.last() {
            assert_eq!(update.from_version(), previous, "update {i}");
            assert_ne!(&to, previous, "update {i}: the versions must alternate");
        }
        assert!(
            package(&mut vm).contains(&to),
            "update {i}: query-version does not show {to}"
        );
        vm.assert_qmp_answered_by(pid);
        vm.assert_same_process_runs(target);
        versions.push(to);
        blackouts.push(ms(update.blackout_ns().unwrap()));
        gaps.push(update.event_gap_s().unwrap() * 1e3);
        // Each version runs the guest before the next update.
        vm.wait_ticks_advance(CPUS, 1);
        if i == 0 {
            let settled = settled_holdings(pid, "after the first update");
            eprintln!("after the first update the VMM holds {settled:?}");
            after_first = Some(settled);
        }
    }
    let after_first = after_first.unwrap();
    let mut last = None;
    let same = wait_until(LONG, || {
        last = holdings(pid).ok();
        last == Some(after_first)
    });
    assert!(
        same,
        "after {UPDATES} updates the VMM holds {last:?}, after the first {after_first:?}: \
         the teardown helpers or KVM VMs were not released"
    );
    let elapsed = started.elapsed();
    vm.wait_ticks_advance(CPUS, 5);
    vm.assert_heartbeat_continuous(CPUS);

    let lines = shim_log_lines(&log);
    assert_eq!(lines.len(), UPDATES, "one shim log line per update");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["pid"], json!(pid), "{line}");
        assert_eq!(line["outcome"], "exec", "{line}");
        assert_eq!(line["to"]["version"], json!(versions[i]), "{line}");
    }
    let (min, median, max) = min_median_max(&blackouts);
    let (gmin, gmedian, gmax) = min_median_max(&gaps);
    eprintln!(
        "{UPDATES} updates in {:.2} s; blackout ms min {min:.2} median {median:.2} max {max:.2}; \
         STOP->RESUME ms min {gmin:.2} median {gmedian:.2} max {gmax:.2}",
        elapsed.as_secs_f64()
    );
    vm.quit();
}

#[test]
fn hmp_update_exactly_as_in_the_usage() {
    build_binaries();
    let dir = TempDir::new("hmp").unwrap();
    let socket = dir.join("vm1.qmp");
    let state = dir.join("vm1.state");
    let vmm = vmm_bin().display().to_string();
    let machine = format!(
        "-m 1G -machine aux-ram-share=on -qmp unix:{},server=on,wait=off --guest {HEARTBEAT}",
        socket.display()
    );
    let args: Vec<String> = machine.split(' ').map(str::to_string).collect();
    // `cpr-shim` by name, found in PATH as an operator would install it.
    let shim_dir = shim_bin().parent().unwrap().display().to_string();
    let path = format!("{shim_dir}:{}", std::env::var("PATH").unwrap_or_default());
    let mut vm = Vm::spawn(dir, socket, args, &[("PATH", path)]);
    let pid = vm.pid();
    vm.wait_ticks_advance(1, 3);

    for round in 0..2 {
        // Parameters do not carry over an update: set them before each one.
        let lines = [
            "migrate_set_parameter mode cpr-exec".to_string(),
            format!(
                "migrate_set_parameter cpr-exec-command cpr-shim -- {vmm} {machine} -incoming file:{}",
                state.display()
            ),
        ];
        for line in &lines {
            let out = vm.qmp.hmp(line).unwrap();
            assert_eq!(out, "", "{line}");
        }
        let params = vm
            .qmp
            .execute("query-migrate-parameters", Value::Null)
            .unwrap();
        assert_eq!(params["mode"], "cpr-exec", "{params}");
        let command = params["cpr-exec-command"].as_array().unwrap();
        assert_eq!(command[0], "cpr-shim");
        assert_eq!(command[1], "--");
        assert_eq!(
            command.last().unwrap(),
            &json!(format!("file:{}", state.display()))
        );

        let out = vm
            .qmp
            .hmp(&format!("migrate -d file:{}", state.display()))
            .unwrap();
        assert_eq!(out, "", "migrate -d prints nothing");
        let update = wait_update_end(&mut vm.qmp, true, LONG).unwrap();
        assert_completed(&update);
        vm.assert_qmp_answered_by(pid);
        vm.assert_same_process_runs(&vmm_bin());
        let status = vm.qmp.hmp("info status").unwrap();
        assert!(status.contains("running"), "round {round}: {status:?}");
        let params = vm
            .qmp
            .execute("query-migrate-parameters", Value::Null)
            .unwrap();
        assert_eq!(params["mode"], "normal", "not carried over: {params}");
        assert!(
            params["cpr-exec-command"]
                .as_array()
                .is_none_or(|c| c.is_empty()),
            "not carried over: {params}"
        );
        vm.wait_ticks_advance(1, 5);
    }
    vm.assert_heartbeat_continuous(1);
    vm.quit();
}

#[test]
fn qmp_clients_survive_and_the_socket_never_refuses() {
    let mut vm = Vm::heartbeat("qmpsurv", 1);
    let mut watcher = QmpClient::connect_and_negotiate(&vm.socket, LONG).unwrap();
    let mut fresh = QmpClient::connect(&vm.socket, LONG).unwrap();
    vm.wait_ticks_advance(1, 3);

    // Clients connecting all through the update: each one is accepted and
    // greeted, by whichever process is there. Each records when it started to
    // connect and when its greeting came (wall clock, as QMP timestamps are).
    let stop = Arc::new(AtomicBool::new(false));
    let greeted = Arc::new(AtomicU32::new(0));
    let hammer = {
        let stop = Arc::clone(&stop);
        let greeted = Arc::clone(&greeted);
        let socket = vm.socket.clone();
        thread::spawn(move || {
            let mut failures = Vec::new();
            let mut spans = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = unix_seconds();
                let attempt = UnixStream::connect(&socket).and_then(|stream| {
                    stream.set_read_timeout(Some(LONG))?;
                    let mut line = String::new();
                    BufReader::new(stream).read_line(&mut line)?;
                    Ok(line)
                });
                match attempt {
                    Ok(line) if line.contains("\"QMP\"") => {
                        spans.push((started, unix_seconds()));
                        greeted.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(line) => failures.push(format!("no greeting: {line:?}")),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (failures, spans)
        })
    };
    assert!(wait_until(LONG, || greeted.load(Ordering::SeqCst) > 0));
    let command = vm.via_shim(&[], &vmm_bin());
    let update = vm.update(&command);
    stop.store(true, Ordering::Relaxed);
    let (failures, spans) = hammer.join().unwrap();
    assert_completed(&update);
    assert!(failures.is_empty(), "connections failed: {failures:?}");
    // Connections that were open while the guest was stopped for the update
    // (connect started before RESUME, greeting after STOP): the old process
    // was gone or going for part of that time, and they were still greeted.
    let (stopped, resumed) = (
        event_timestamp(update.stop.as_ref().unwrap()),
        event_timestamp(update.resume.as_ref().unwrap()),
    );
    let during = spans
        .iter()
        .filter(|(started, greeted)| *started <= resumed && *greeted >= stopped)
        .count();
    eprintln!(
        "{during} of {} connections overlapped the blackout ({:.2} ms)",
        spans.len(),
        (resumed - stopped) * 1e3
    );
    assert!(
        during >= 1,
        "no connection overlapped the update's blackout [{stopped:.6}, {resumed:.6}]: \
         the test proved nothing about the socket during the update"
    );

    // The passive negotiated client saw the whole update on its connection, in
    // order: STOP, RESUME, then MIGRATION completed.
    let mut seen = Vec::new();
    while !seen.iter().any(|s: &String| s == "MIGRATION completed") {
        let event = watcher.wait_any_event(LONG).unwrap();
        let name = event["event"].as_str().unwrap_or("<no name>").to_string();
        seen.push(match event["data"]["status"].as_str() {
            Some(status) if name == "MIGRATION" => format!("{name} {status}"),
            _ => name,
        });
    }
    let order: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .filter(|s| matches!(*s, "STOP" | "RESUME" | "MIGRATION completed"))
        .collect();
    assert_eq!(
        order,
        ["STOP", "RESUME", "MIGRATION completed"],
        "the watcher's events: {seen:?}"
    );
    let status = watcher.execute("query-status", Value::Null).unwrap();
    assert_eq!(status["status"], "running");
    // The client that had not negotiated yet still can, with no second greeting,
    // and it was sent no events before that.
    fresh.negotiate().unwrap();
    let early: Vec<Value> = fresh.events();
    assert!(early.is_empty(), "events before negotiation: {early:?}");
    let info = fresh.execute("query-migrate", Value::Null).unwrap();
    assert_eq!(info["status"], "completed");
    vm.wait_ticks_advance(1, 5);
    vm.assert_heartbeat_continuous(1);
    vm.quit();
}

#[test]
fn staged_layout_is_resolved_once_and_rollback_survives_a_replaced_binary() {
    use std::os::unix::fs::symlink;
    let mut vm = Vm::heartbeat("staged", 1);
    let pid = vm.pid();
    // /opt/vmm/2.0/vmm with /opt/vmm/current -> 2.0, as an operator stages it.
    let opt = vm.dir.join("opt/vmm");
    std::fs::create_dir_all(opt.join("2.0")).unwrap();
    let staged = opt.join("2.0/vmm");
    std::fs::copy(vmm_bin(), &staged).unwrap();
    symlink("2.0", opt.join("current")).unwrap();
    let log = vm.dir.join("shim.log");
    let log_args = strings(&["--log", log.to_str().unwrap()]);
    vm.wait_ticks_advance(1, 3);

    let command = vm.via_shim(&log_args, &opt.join("current/vmm"));
    assert_completed(&vm.update(&command));
    vm.assert_same_process_runs(&staged);
    let lines = shim_log_lines(&log);
    assert_eq!(
        lines[0]["to"]["resolved"].as_str(),
        staged.canonicalize().unwrap().to_str(),
        "the shim records the resolved target: {}",
        lines[0]
    );
    vm.wait_ticks_advance(1, 5);

    // The running binary's path is replaced (2.0 uninstalled); an update that
    // fails must still roll back into it, from the fd the CPR state keeps.
    std::fs::remove_file(&staged).unwrap();
    std::fs::write(&staged, b"#!/bin/sh\nexit 1\n").unwrap();
    let mut command = vm.via_shim(&log_args, &vmm_bin());
    let at = command.len() - 2;
    command.splice(at..at, strings(&["--cpr-test-fault", "exit-before-resume"]));
    let update = vm.update(&command);
    assert_failed(&update, &["exit-before-resume"], true);
    vm.assert_qmp_answered_by(pid);
    let exe = vm.exe().display().to_string();
    assert!(
        exe.starts_with(&staged.canonicalize().unwrap().display().to_string())
            && exe.ends_with("(deleted)"),
        "the guest should be back on the replaced 2.0 binary, runs {exe}"
    );
    assert_eq!(vm.status(), "running");
    vm.wait_ticks_advance(1, 5);
    vm.assert_heartbeat_continuous(1);
    vm.quit();
}

// ---------------------------------------------------------------------------
// the serial console

#[test]
fn serial_file_keeps_appending_across_updates() {
    let dir_name = "serfile";
    let dir = TempDir::new(dir_name).unwrap();
    let console = dir.join("console.log");
    let socket = dir.join("qmp.sock");
    let serial = format!("file:{}", console.display());
    let args = strings(&[
        "-m",
        "16M",
        "--guest",
        HEARTBEAT,
        "-serial",
        &serial,
        "-qmp",
        &qmp_socket_arg(&socket),
    ]);
    let mut vm = Vm::spawn(dir, socket, args, &[]);
    let read = || std::fs::read_to_string(&console).unwrap_or_default();
    let last_tick = |text: &str| {
        parse_heartbeats(text)
            .ticks
            .get(&0)
            .and_then(|t| t.last().copied())
    };
    assert!(wait_until(LONG, || last_tick(&read()) >= Some(5)));
    for _ in 0..2 {
        let command = vm.via_shim(&[], &vmm_bin());
        assert_completed(&vm.update(&command));
        let target = last_tick(&read()).unwrap() + 5;
        assert!(
            wait_until(LONG, || last_tick(&read()) >= Some(target)),
            "no ticks in {} after the update",
            console.display()
        );
    }
    if let Err(e) = check_heartbeat_from_boot(&read(), 1) {
        panic!("{}: {e}", console.display());
    }
    assert!(
        !vm.process.stdout_text().contains("heartbeat"),
        "console output went to stdout"
    );
    vm.quit();
}

#[test]
fn serial_unix_client_stays_connected_and_loses_no_byte() {
    let dir = TempDir::new("serunix").unwrap();
    let console = dir.join("console.sock");
    let socket = dir.join("qmp.sock");
    let serial = format!("unix:{},server,wait=off", console.display());
    let args = strings(&[
        "-m",
        "16M",
        "-smp",
        "2",
        "--guest",
        HEARTBEAT,
        "-serial",
        &serial,
        "-qmp",
        &qmp_socket_arg(&socket),
    ]);
    let mut vm = Vm::spawn(dir, socket, args, &[]);
    vm.process.wait_for_path(&console, LONG).unwrap();
    let client = UnixStream::connect(&console).unwrap();
    let received = Arc::new(Mutex::new(Vec::<u8>::new()));
    let closed = Arc::new(AtomicBool::new(false));
    let reader = {
        let received = Arc::clone(&received);
        let closed = Arc::clone(&closed);
        let mut stream = client.try_clone().unwrap();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
            closed.store(true, Ordering::SeqCst);
        })
    };
    // What the client saw, from its first complete line on (it may have
    // connected in the middle of one).
    let seen = || {
        let bytes = received.lock().unwrap().clone();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        match text.find('\n') {
            Some(i) => text[i + 1..].to_string(),
            None => String::new(),
        }
    };
    let last_ticks = |text: &str| {
        let ticks = parse_heartbeats(text).ticks;
        (0..2)
            .map(|cpu| ticks.get(&cpu).and_then(|t| t.last().copied()).unwrap_or(0))
            .collect::<Vec<u64>>()
    };
    assert!(wait_until(LONG, || last_ticks(&seen())
        .iter()
        .all(|&t| t >= 5)));
    for _ in 0..2 {
        let command = vm.via_shim(&[], &vmm_bin());
        assert_completed(&vm.update(&command));
        let targets: Vec<u64> = last_ticks(&seen()).iter().map(|t| t + 10).collect();
        assert!(
            wait_until(LONG, || {
                last_ticks(&seen())
                    .iter()
                    .zip(&targets)
                    .all(|(t, want)| t >= want)
            }),
            "the console client got no ticks after the update: {:?}",
            seen()
        );
        assert!(
            !closed.load(Ordering::SeqCst),
            "the console connection was closed"
        );
    }
    let text = seen();
    let log = parse_heartbeats(&text);
    assert!(log.malformed.is_empty(), "garbled: {:?}", log.malformed);
    // The client may have connected in time to see the first `start` lines,
    // but no vCPU may start twice.
    let mut started = log.started.clone();
    started.sort_unstable();
    started.dedup();
    assert_eq!(
        started.len(),
        log.started.len(),
        "the guest restarted: {text}"
    );
    assert_eq!(log.ticks.len(), 2, "{text}");
    if let Err(e) = assert_ticks_consecutive(&log.ticks) {
        panic!("bytes lost on the console socket: {e}");
    }
    client.shutdown(std::net::Shutdown::Both).unwrap();
    reader.join().unwrap();
    vm.quit();
}

// ---------------------------------------------------------------------------
// fd hygiene

/// Every fd but stdin/stdout/stderr must be close-on-exec outside the exec window.
fn assert_all_cloexec(pid: u32, when: &str) {
    let leaky: Vec<OpenFd> = list_fds(pid)
        .unwrap()
        .into_iter()
        .filter(|fd| fd.fd > 2 && !fd.is_cloexec())
        .collect();
    assert!(
        leaky.is_empty(),
        "{when}: fds without close-on-exec would leak into the next exec: {leaky:#?}"
    );
}

/// Outside the exec window: every guest-RAM memfd is close-on-exec, and neither
/// the CPR channel nor an executable (the rollback fd) is still open.
fn assert_no_update_leftovers(pid: u32, when: &str) {
    let fds = list_fds(pid).unwrap();
    let exes: Vec<PathBuf> = [vmm_bin(), shim_bin()]
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    for fd in &fds {
        if memfd_name(fd).is_some_and(|n| n.starts_with("guest-ram")) {
            assert!(
                fd.is_cloexec(),
                "{when}: RAM memfd not close-on-exec: {fd:?}"
            );
        }
        assert!(
            memfd_name(fd) != Some("cpr-state"),
            "{when}: the CPR state channel is still open: {fd:?}"
        );
        assert!(
            !exes.iter().any(|exe| Path::new(&fd.target) == exe),
            "{when}: an executable is still open: {fd:?}"
        );
    }
}

#[test]
fn fds_are_close_on_exec_and_nothing_inherited_is_left_over() {
    // 4 GiB: two RAM regions (below and above the PCI hole); memfds are lazy.
    let mut vm = Vm::start(
        "fds",
        &[
            "-m",
            "4G",
            "--guest",
            HEARTBEAT,
            "-machine",
            "aux-ram-share=on",
        ],
    );
    let pid = vm.pid();
    vm.wait_ticks_advance(1, 3);
    let fds_before = list_fds(pid).unwrap();
    let ram_before = ram_memfds(&fds_before);
    let names: Vec<&str> = ram_before.iter().filter_map(|fd| memfd_name(fd)).collect();
    assert_eq!(
        names,
        ["guest-ram-low", "guest-ram-high"],
        "{fds_before:#?}"
    );
    for fd in &ram_before {
        assert!(fd.is_cloexec(), "old process: {fd:?}");
    }
    assert_no_update_leftovers(pid, "before the update");
    let identities: Vec<(u64, u64)> = ram_before
        .iter()
        .map(|fd| fd_identity(pid, fd.fd).unwrap())
        .collect();
    let kinds_before = fd_kinds(pid).unwrap();

    for round in 0..3 {
        let command = vm.via_shim(&[], &vmm_bin());
        assert_completed(&vm.update(&command));
        vm.wait_ticks_advance(1, 2);
        let fds = list_fds(pid).unwrap();
        let ram = ram_memfds(&fds);
        // The very same memfds (device and inode), close-on-exec again.
        let found: Vec<(u64, u64)> = ram
            .iter()
            .map(|fd| fd_identity(pid, fd.fd).unwrap())
            .collect();
        assert_eq!(found, identities, "round {round}: RAM memfds {ram:#?}");
        for fd in &ram {
            assert!(fd.is_cloexec(), "round {round}, new process: {fd:?}");
        }
        assert_no_update_leftovers(pid, &format!("round {round}"));
        // Same kinds and counts as the freshly booted process: nothing inherited
        // is left over, and nothing accumulates update after update.
        let kinds = fd_kinds(pid).unwrap();
        assert_eq!(
            kinds,
            kinds_before,
            "round {round}: open fds differ from the freshly booted VMM's; now: {:#?}",
            fds.iter()
                .map(|fd| (fd.fd, fd_kind(fd), fd.is_cloexec()))
                .collect::<Vec<_>>()
        );
        assert_all_cloexec(pid, &format!("round {round}"));
    }
    vm.assert_heartbeat_continuous(1);
    vm.quit();
}

#[test]
fn fds_of_a_freshly_booted_vmm_are_close_on_exec() {
    let vm = Vm::heartbeat("fdboot", 2);
    vm.wait_ticks_advance(2, 2);
    assert_all_cloexec(vm.pid(), "freshly booted VMM");
    vm.quit();
}

// ---------------------------------------------------------------------------
// faults: each ends with the guest running, the same PID, the reason reported,
// and a VM that can be updated again.

/// Runs an update with `command` that must fail, with `causes` in `error-desc`
/// (and a rollback reported when `rolled_back`), then checks the guest, and
/// that a normal update still works afterwards.
fn fault_case(vm: &mut Vm, command: &[String], causes: &[&str], rolled_back: bool) {
    fault_case_with(vm, command, causes, rolled_back, true);
}

/// [`fault_case`]; `check_fds` also checks that nothing of the failed update is
/// left open (off where the fault itself plants an fd the VMM cannot know about).
fn fault_case_with(
    vm: &mut Vm,
    command: &[String],
    causes: &[&str],
    rolled_back: bool,
    check_fds: bool,
) {
    let pid = vm.pid();
    let exe = vm.exe();
    vm.wait_ticks_advance(1, 3);
    let update = vm.update(command);
    eprintln!(
        "update with {:?}... failed as expected: {}",
        &command[..command.len().min(4)],
        update.error_desc()
    );
    assert_failed(&update, causes, rolled_back);
    vm.assert_qmp_answered_by(pid);
    vm.assert_same_process_runs(&exe);
    assert_eq!(vm.status(), "running");
    if check_fds {
        assert_no_update_leftovers(pid, "after the failed update");
    }
    vm.wait_ticks_advance(1, 5);

    // The VM is intact: it updates normally afterwards.
    let update = vm.update_ok(&vmm_bin());
    assert_eq!(update.rolled_back(), Some(false));
    vm.wait_ticks_advance(1, 5);
    vm.assert_heartbeat_continuous(1);
}

/// `cpr-fault ACTION -- cpr-shim -- vmm ARGS -incoming file:STATE`.
fn with_fault(vm: &Vm, action: &[String]) -> Vec<String> {
    let mut command = vec![fault_bin().display().to_string()];
    command.extend(action.iter().cloned());
    command.push("--".into());
    command.extend(vm.via_shim(&[], &vmm_bin()));
    command
}

#[test]
fn fault_missing_command_is_refused_without_stopping_the_guest() {
    let mut vm = Vm::heartbeat("nocmd", 1);
    vm.wait_ticks_advance(1, 3);
    vm.qmp
        .execute("migrate-set-parameters", json!({"mode": "cpr-exec"}))
        .unwrap();
    assert_migrate_refused_with_the_guest_running(&mut vm, &["cpr-exec-command"]);
    // Setting the command now makes the same request work.
    assert_completed(&vm.update(&vm.via_shim(&[], &vmm_bin())));
    vm.wait_ticks_advance(1, 5);
    vm.assert_heartbeat_continuous(1);
    vm.quit();
}

/// `migrate` (with the parameters already set) is refused with a GenericError naming `needles`,
/// before anything stops: no STOP or RESUME event, no state file, the guest ticking on.
fn assert_migrate_refused_with_the_guest_running(vm: &mut Vm, needles: &[&str]) {
    let error = vm
        .qmp
        .execute(
            "migrate",
            json!({"uri": format!("file:{}", vm.state.display())}),
        )
        .unwrap_err();
    assert_eq!(error.class(), Some("GenericError"), "{error}");
    for needle in needles {
        assert!(error.to_string().contains(needle), "{error}");
    }
    assert_eq!(vm.status(), "running");
    // Events precede the reply they belong to; none may have come.
    let events: Vec<Value> = vm.qmp.events();
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "STOP" || e["event"] == "RESUME"),
        "the guest was stopped or resumed: {events:?}"
    );
    assert!(!vm.state.exists(), "a state file was written");
    vm.wait_ticks_advance(1, 5);
}

#[test]
fn fault_nonexistent_program_resumes_the_guest() {
    let mut vm = Vm::heartbeat("noprog", 1);
    let missing = vm.dir.join("no-such-dir/vmm-2.0");
    let command = direct_command(&missing, &vm.args, &vm.state);
    fault_case(
        &mut vm,
        &command,
        &[missing.to_str().unwrap(), "No such file or directory"],
        false,
    );
    vm.quit();
}

#[test]
fn fault_argument_list_too_long_resumes_the_guest() {
    let mut vm = Vm::heartbeat("e2big", 1);
    let mut command = vm.via_shim(&[], &vmm_bin());
    // One 200 KB argument: over the kernel's per-string limit (128 KiB).
    command.insert(1, "--log".into());
    command.insert(2, format!("/tmp/{}", "x".repeat(200 << 10)));
    fault_case(&mut vm, &command, &["Argument list too long"], false);
    vm.quit();
}

#[test]
fn fault_swapped_fds_are_refused_by_the_shim_and_rolled_back() {
    let mut vm = Vm::heartbeat("swap", 1);
    let ram = ram_fd(vm.pid(), "guest-ram-low").unwrap().unwrap();
    let listener = listener_fd(vm.pid(), &vm.socket).unwrap().unwrap();
    let command = with_fault(&vm, &strings(&["--swap", &format!("{ram},{listener}")]));
    fault_case(
        &mut vm,
        &command,
        &[&format!("fd {ram} (guest-ram-low)")],
        true,
    );
    vm.quit();
}

#[test]
fn fault_closed_ram_fd_is_refused_by_the_shim_and_rolled_back() {
    let mut vm = Vm::heartbeat("moved", 1);
    let ram = ram_fd(vm.pid(), "guest-ram-low").unwrap().unwrap();
    let command = with_fault(&vm, &strings(&["--move", &ram.to_string()]));
    fault_case(
        &mut vm,
        &command,
        &[&format!("fd {ram} (guest-ram-low) is not open")],
        true,
    );
    vm.quit();
}

#[test]
fn fault_wrong_size_ram_memfd_is_refused_by_the_shim_and_rolled_back() {
    let mut vm = Vm::heartbeat("wrongsz", 1);
    let ram = ram_fd(vm.pid(), "guest-ram-low").unwrap().unwrap();
    let command = with_fault(&vm, &strings(&["--replace-ram", &ram.to_string()]));
    // The planted memfd (same name, other size) stays at fd {ram}: only the
    // wrapper knows it is not the VMM's.
    fault_case_with(
        &mut vm,
        &command,
        &[&format!("fd {ram} (guest-ram-low)")],
        true,
        false,
    );
    vm.quit();
}

#[test]
fn fault_corrupted_cpr_state_is_refused_by_the_shim_and_rolled_back() {
    let mut vm = Vm::heartbeat("chan", 1);
    let command = with_fault(&vm, &strings(&["--corrupt-channel"]));
    fault_case(&mut vm, &command, &["CPR state channel is damaged"], true);
    vm.quit();
}

/// A `--sha256` the target does not have is refused by `migrate` itself: the old VMM hashes
/// the target before it stops anything, so the guest never pauses.
#[test]
fn fault_sha256_mismatch_is_refused_before_the_guest_stops() {
    let mut vm = Vm::heartbeat("sha", 1);
    vm.wait_ticks_advance(1, 3);
    let wrong = "0".repeat(64);
    let command = vm.via_shim(&strings(&["--sha256", &wrong]), &vmm_bin());
    set_cpr_exec_command(&mut vm.qmp, &command).unwrap();
    assert_migrate_refused_with_the_guest_running(
        &mut vm,
        &["sha256", &format!("expected {wrong}")],
    );
    vm.assert_heartbeat_continuous(1);
    vm.quit();
}

/// The SHA-256 of the new VMM is computed by the old VMM before the guest stops, not in the
/// blackout; the shim executes the file it was handed after checking it is unchanged, and hashes
/// it again itself when it changed after the check (here: touched between the old VMM and the
/// shim).
#[test]
fn sha256_is_checked_before_the_stop_and_again_by_the_shim_if_the_target_changed() {
    let mut vm = Vm::heartbeat("shaok", 1);
    let target = vm.dir.join("vmm-next");
    std::fs::copy(vmm_bin(), &target).unwrap();
    let hash = cpr_common::target::sha256_of(&std::fs::File::open(&target).unwrap()).unwrap();
    // A file changed in the last two seconds is left to the shim (its timestamps may be too
    // coarse to show a later change): wait until the copy has settled.
    let settled = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&target)
        .unwrap()
        .modified()
        .unwrap()
        .elapsed()
        .unwrap_or_default()
        < Duration::from_millis(2100)
    {
        assert!(Instant::now() < settled, "the copy never settled");
        thread::sleep(Duration::from_millis(100));
    }
    let log = vm.dir.join("shim.log");
    let shim_args = strings(&["--sha256", &hash, "--log", log.to_str().unwrap()]);
    let checked_by = |log: &Path| -> String {
        let text = std::fs::read_to_string(log).unwrap();
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        last["to"]["sha256_checked_by"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };

    assert_completed(&vm.update(&vm.via_shim(&shim_args, &target)));
    assert_eq!(checked_by(&log), "old-vmm-before-stop");
    vm.wait_ticks_advance(1, 3);

    let mut touched = vec![
        fault_bin().display().to_string(),
        "--touch".into(),
        target.display().to_string(),
        "--".into(),
    ];
    touched.extend(vm.via_shim(&shim_args, &target));
    assert_completed(&vm.update(&touched));
    assert_eq!(checked_by(&log), "shim");
    vm.wait_ticks_advance(1, 3);
    vm.assert_heartbeat_continuous(1);
    vm.quit();
}

#[test]
fn fault_target_that_is_not_a_vmm_is_refused_by_the_shim_and_rolled_back() {
    let mut vm = Vm::heartbeat("notvmm", 1);
    let command = shim_command(
        &shim_bin(),
        &[],
        Path::new("/bin/true"),
        &vm.args,
        &vm.state,
    );
    fault_case(&mut vm, &command, &["cannot take a live update"], true);
    vm.quit();
}

#[test]
fn fault_new_vmm_exits_before_resume_and_is_rolled_back() {
    let mut vm = Vm::heartbeat("exitbr", 1);
    let mut command = vm.via_shim(&[], &vmm_bin());
    let at = command.len() - 2;
    command.splice(at..at, strings(&["--cpr-test-fault", "exit-before-resume"]));
    fault_case(&mut vm, &command, &["exit-before-resume"], true);
    vm.quit();
}

#[test]
fn fault_new_vmm_crashes_before_resume_and_is_rolled_back() {
    let mut vm = Vm::heartbeat("crashbr", 1);
    let mut command = vm.via_shim(&[], &vmm_bin());
    let at = command.len() - 2;
    command.splice(
        at..at,
        strings(&["--cpr-test-fault", "crash-before-resume"]),
    );
    fault_case(&mut vm, &command, &["crashed before resuming"], true);
    vm.quit();
}

#[test]
fn fault_corrupted_state_file_keeps_the_guest() {
    let mut vm = Vm::heartbeat("statef", 1);
    let state = vm.state.display().to_string();
    let command = with_fault(&vm, &strings(&["--corrupt-file", &state]));
    fault_case(&mut vm, &command, &[&state], true);
    vm.quit();
}

// ---------------------------------------------------------------------------
// refusals and last resorts

/// Far beyond any format this project has written.
const FUTURE_FORMAT: (u32, u32) = (1000, 1000);

/// The shim's `--log` holds one line for a refused update: this process, outcome `rollback`,
/// the reason.
fn assert_refusal_logged(log: &Path, pid: u32, cause: &str) {
    let lines = shim_log_lines(log);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["pid"], json!(pid), "{line}");
    assert_eq!(line["outcome"], "rollback", "{line}");
    let reason = line["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(cause), "{cause:?} not in {line}");
}

/// A refused target, through the shim with `--log`: a fault case, and the refusal is logged.
fn refused_target_case(vm: &mut Vm, target: &Path, cause: &str) {
    let log = vm.dir.join("refused.log");
    let command = vm.via_shim(&strings(&["--log", log.to_str().unwrap()]), target);
    let pid = vm.pid();
    fault_case(vm, &command, &[cause], true);
    assert_refusal_logged(&log, pid, cause);
}

#[test]
fn fault_target_that_cannot_read_this_state_file_format_is_refused_and_logged() {
    let mut vm = Vm::heartbeat("futstate", 1);
    let future = vm.dir.join("vmm-future-state");
    vmm_claiming_formats(&vmm_bin(), &future, Some(FUTURE_FORMAT), None);
    refused_target_case(&mut vm, &future, "reads state-file formats 1000..=1000");
    vm.quit();
}

#[test]
fn fault_target_that_cannot_read_this_cpr_state_format_is_refused_and_logged() {
    let mut vm = Vm::heartbeat("futcpr", 1);
    let future = vm.dir.join("vmm-future-cpr");
    vmm_claiming_formats(&vmm_bin(), &future, None, Some(FUTURE_FORMAT));
    refused_target_case(&mut vm, &future, "reads CPR-state formats 1000..=1000");
    vm.quit();
}

#[test]
fn fault_target_that_is_not_executable_is_refused_and_logged() {
    use std::os::unix::fs::PermissionsExt;
    let mut vm = Vm::heartbeat("noexec", 1);
    let target = vm.dir.join("vmm-not-executable");
    std::fs::copy(vmm_bin(), &target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused_target_case(&mut vm, &target, "is not executable");
    vm.quit();
}

#[test]
fn fault_missing_target_through_the_shim_is_refused_and_logged() {
    let mut vm = Vm::heartbeat("notarget", 1);
    let target = vm.dir.join("no-such-dir/vmm-2.0");
    let cause = format!("target {}: No such file or directory", target.display());
    refused_target_case(&mut vm, &target, &cause);
    vm.quit();
}

/// `cpr-shim --prefault` allocates every page of guest RAM (the memfd's allocated size) while
/// checking it, where the guest had touched few of them.
#[test]
fn shim_prefault_allocates_every_page_of_guest_ram() {
    use std::os::unix::fs::MetadataExt;
    const RAM: u64 = 64 << 20;
    let allocated = |vm: &Vm| {
        let fd = ram_fd(vm.pid(), "guest-ram-low").unwrap().unwrap();
        let meta = std::fs::metadata(format!("/proc/{}/fd/{fd}", vm.pid())).unwrap();
        meta.blocks() * 512
    };
    let mut vm = Vm::start(
        "prefault",
        &["-m", "64M", "-smp", "1", "--guest", HEARTBEAT],
    );
    vm.wait_ticks_advance(1, 2);
    let before = allocated(&vm);
    assert!(
        before < RAM / 2,
        "{before} bytes allocated before the update: the check below means nothing"
    );
    // Without --prefault, an update leaves the memfd as it was.
    vm.update_ok(&vmm_bin());
    assert!(allocated(&vm) < RAM / 2, "an update without --prefault");
    let command = vm.via_shim(&strings(&["--prefault"]), &vmm_bin());
    assert_completed(&vm.update(&command));
    assert_eq!(allocated(&vm), RAM, "after an update with --prefault");
    vm.wait_ticks_advance(1, 3);
    vm.assert_heartbeat_continuous(1);
    vm.quit();
}

/// The last resort: the previous VMM's binary fd is gone, so the shim refuses the update and the
/// rollback itself cannot run. The process ends with exit status 1 and the documented message,
/// and the refusal is in the shim's log.
#[test]
fn a_rollback_that_fails_ends_the_process_with_the_documented_message() {
    let mut vm = Vm::heartbeat("rbfail", 1);
    vm.wait_ticks_advance(1, 3);
    let log = vm.dir.join("shim.log");
    let command = without_a_way_back(
        &vm,
        vm.via_shim(&strings(&["--log", log.to_str().unwrap()]), &vmm_bin()),
    );
    let (status, stderr) = update_that_ends_the_process(&mut vm, &command);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cpr-shim: live update refused:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cpr-shim: rollback failed, the guest is lost:"),
        "{stderr}"
    );
    assert_refusal_logged(&log, vm.pid(), "(fallback-exe) is not open");
}

/// The same last resort in the new VMM: it fails before resuming the guest (no shim), and its
/// rollback cannot execute the previous binary. It ends with the documented message.
#[test]
fn a_failing_rollback_from_the_new_vmm_ends_the_process_with_the_documented_message() {
    let mut vm = Vm::heartbeat("rbfail2", 1);
    vm.wait_ticks_advance(1, 3);
    let mut direct = vm.direct(&vmm_bin());
    let at = direct.len() - 2;
    direct.splice(at..at, strings(&["--cpr-test-fault", "exit-before-resume"]));
    let command = without_a_way_back(&vm, direct);
    let (status, stderr) = update_that_ends_the_process(&mut vm, &command);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("live update failed and the guest could not be recovered")
            && stderr.contains("exit-before-resume")
            && stderr.contains("rollback exec of"),
        "{stderr}"
    );
}

/// `cpr-fault --close-exe THIS_VMM -- COMMAND`: the previous VMM's binary fd is closed before
/// COMMAND runs, so no rollback can execute it.
fn without_a_way_back(vm: &Vm, command: Vec<String>) -> Vec<String> {
    let mut wrapped = vec![
        fault_bin().display().to_string(),
        "--close-exe".into(),
        vm.exe().display().to_string(),
        "--".into(),
    ];
    wrapped.extend(command);
    wrapped
}

/// Starts an update with `command` that must end the process; returns its exit status and
/// stderr.
fn update_that_ends_the_process(
    vm: &mut Vm,
    command: &[String],
) -> (std::process::ExitStatus, String) {
    set_cpr_exec_command(&mut vm.qmp, command).unwrap();
    vm.qmp
        .execute(
            "migrate",
            json!({"uri": format!("file:{}", vm.state.display())}),
        )
        .unwrap();
    let status = vm.process.wait_exit(LONG).unwrap();
    (status, vm.process.stderr_text())
}

// ---------------------------------------------------------------------------
// rescue: the program an update executes dies or hangs before the guest runs again

/// The processes whose command line carries `needle` (by /proc/PID/cmdline).
fn processes_with_arg(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == needle.as_bytes()))
        })
        .collect()
}

/// The parent of `pid`, from /proc/PID/stat.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with('Z')))
        == Some(false)
}

/// The one live process that serves the VM's QMP socket, found by its command line (the
/// socket's peer credentials name the process that created the listener, which a rescue does
/// not change). A previous address space's teardown helper shares the command line of the
/// process it was cloned from until it finishes: waited for.
fn serving_pid(vm: &Vm) -> u32 {
    let arg = qmp_socket_arg(&vm.socket);
    let deadline = Instant::now() + LONG;
    loop {
        let live: Vec<u32> = processes_with_arg(&arg)
            .into_iter()
            .filter(|p| alive(*p))
            .collect();
        if live.len() == 1 {
            return live[0];
        }
        assert!(
            Instant::now() < deadline,
            "processes serving {arg}: {live:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until no rescue guard whose parent is `pid` is left.
fn assert_no_guard_left(pid: u32) {
    let deadline = Instant::now() + LONG;
    loop {
        let guards: Vec<u32> = processes_with_arg("--cpr-rescue-guard")
            .into_iter()
            .filter(|g| parent_of(*g) == Some(pid))
            .collect();
        if guards.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "rescue guards {guards:?} of {pid} are still there"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// One update whose program dies or hangs before it resumes the guest: the update fails with
/// `causes`, the guest runs again on the same QMP socket path (in this process if `same_pid`,
/// else in the process of the update's rescue guard) from where it stopped, and the VM then
/// updates normally with no guard left behind. Returns the PID that now runs the VM.
fn rescued_case(
    vm: &mut Vm,
    command: &[String],
    deadline_ms: u64,
    causes: &[&str],
    same_pid: bool,
) -> u32 {
    let pid = vm.pid();
    vm.qmp
        .execute(
            "migrate-set-parameters",
            json!({"x-cpr-deadline-ms": deadline_ms}),
        )
        .unwrap();
    vm.wait_ticks_advance(1, 3);
    let update = vm.update(command);
    eprintln!("rescued as expected: {}", update.error_desc());
    assert_failed(&update, causes, true);
    let server = serving_pid(vm);
    if same_pid {
        assert_eq!(server, pid, "the VM moved to another process");
    } else {
        assert_ne!(server, pid, "the killed process cannot be serving QMP");
    }
    assert_eq!(vm.status(), "running");
    vm.wait_ticks_advance(1, 5);
    vm.assert_heartbeat_continuous(1);
    assert_completed(&vm.update(&vm.via_shim(&[], &vmm_bin())));
    assert_eq!(serving_pid(vm), server, "a live update keeps the PID");
    assert_no_guard_left(server);
    vm.wait_ticks_advance(1, 3);
    vm.assert_heartbeat_continuous(1);
    server
}

/// Ends a VM that a guard rescued into another process: `quit`, then that process is gone.
fn quit_rescued(mut vm: Vm, pid: u32) {
    vm.qmp.execute("quit", Value::Null).unwrap();
    let deadline = Instant::now() + LONG;
    while alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} did not quit");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The update's program SIGKILLs itself (`sh -c 'kill -9 $$'`): nothing of ours runs in that
/// process again, and the guard restarts the previous VMM.
#[test]
fn rescue_when_the_updates_program_is_killed() {
    let mut vm = Vm::heartbeat("rsckill", 1);
    // "-qmp" is sh's $0 here: the command must look like it keeps the monitor.
    let command = strings(&["/bin/sh", "-c", "kill -9 $$", "-qmp"]);
    let pid = rescued_case(
        &mut vm,
        &command,
        60_000,
        &["ended before the guest ran again", "guard restarted"],
        false,
    );
    quit_rescued(vm, pid);
}

/// The update's program never resumes the guest (not our VMM): at the deadline the guard kills
/// it and restarts the previous VMM.
#[test]
fn rescue_when_the_updates_program_hangs() {
    let mut vm = Vm::heartbeat("rschang", 1);
    let command = strings(&["/bin/sh", "-c", "exec sleep 600", "-qmp"]);
    let pid = rescued_case(
        &mut vm,
        &command,
        1000,
        &["had not resumed the guest", "the guard killed it"],
        false,
    );
    quit_rescued(vm, pid);
}

/// The new VMM is SIGKILLed right after it read the CPR state, and (next update) with the
/// machine restored just before it resumes: both times the guard restarts the previous VMM,
/// with guest memory consistent.
#[test]
fn rescue_when_the_new_vmm_is_killed_before_resume() {
    const RAM: u64 = 64 << 20;
    let mut vm = Vm::start("rscvmm", &["-m", "64M", "-smp", "2", "--guest", "memcheck"]);
    vm.process
        .wait_for_output(
            |text| text.starts_with('A') && text.matches('B').count() >= 2,
            LONG,
        )
        .unwrap();
    for fault in ["kill-at-start", "kill-before-resume"] {
        vm.qmp
            .execute(
                "migrate-set-parameters",
                json!({"x-cpr-deadline-ms": 60_000}),
            )
            .unwrap();
        let mut command = vm.via_shim(&[], &vmm_bin());
        let at = command.len() - 2;
        command.splice(at..at, strings(&["--cpr-test-fault", fault]));
        let update = vm.update(&command);
        assert_failed(&update, &["ended before the guest ran again"], true);
        vm.assert_memcheck_consistent(RAM, &format!("after the rescue from {fault}"));
    }
    let server = serving_pid(&vm);
    assert_ne!(server, vm.pid());
    quit_rescued(vm, server);
}

/// A new VMM of this release that hangs before it resumes is asked at the deadline to roll
/// back by itself: the guest comes back in the same process.
#[test]
fn rescue_when_the_new_vmm_hangs_rolls_back_in_the_same_process() {
    let mut vm = Vm::heartbeat("rscself", 1);
    let mut command = vm.via_shim(&[], &vmm_bin());
    let at = command.len() - 2;
    command.splice(at..at, strings(&["--cpr-test-fault", "hang-before-resume"]));
    rescued_case(
        &mut vm,
        &command,
        1000,
        &["had not resumed the guest by the update's deadline"],
        true,
    );
    vm.quit();
}

/// SIGTERM in the middle of an update (here between the old VMM's exec and the shim) is neither
/// lost nor fatal: the update completes, then the VMM shuts down cleanly (SHUTDOWN event,
/// socket removed, exit status 0).
#[test]
fn sigterm_during_an_update_shuts_down_cleanly_after_it() {
    let mut vm = Vm::heartbeat("sigterm", 1);
    vm.wait_ticks_advance(1, 3);
    let command = with_fault(&vm, &strings(&["--sigterm"]));
    set_cpr_exec_command(&mut vm.qmp, &command).unwrap();
    vm.qmp
        .execute(
            "migrate",
            json!({"uri": format!("file:{}", vm.state.display())}),
        )
        .unwrap();
    let shutdown = vm.qmp.wait_event("SHUTDOWN", LONG).unwrap();
    assert_eq!(shutdown["data"]["reason"], "host-signal", "{shutdown}");
    let statuses: Vec<String> = vm
        .qmp
        .events()
        .iter()
        .filter(|e| e["event"] == "MIGRATION")
        .map(|e| e["data"]["status"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("completed"),
        "the update finished before the shutdown: {statuses:?}"
    );
    let status = vm.process.wait_exit(LONG).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vm.process.stderr_text());
    assert!(!vm.socket.exists(), "the QMP socket file was left behind");
}
