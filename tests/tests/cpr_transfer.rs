//! End-to-end tests of cpr-transfer (issue 6): a separately started new VMM takes the guest
//! from the old one; guest RAM crosses as memfds over the CPR channel, machine state over the
//! main channel.
//!
//! Every test drives real `vmm` processes on /dev/kvm as an operator would (the new VMM
//! started with `-incoming unix:MAIN -incoming cpr,...` or `-incoming defer`, the old one
//! told `migrate-set-parameters {"mode": "cpr-transfer"}` + `migrate` with both channels) and
//! judges the result by what the guest shows:
//!
//! - the heartbeat guest numbers its ticks per vCPU, so the old VMM's console followed by the
//!   new one's must hold strictly consecutive ticks, and the new one no `start` line;
//! - the memcheck guest increments one byte per page, so a stopped dump of its range must be
//!   consistent (all equal but one drop by exactly 1), and its last page must hold the number
//!   of sweeps both consoles reported.
//!
//! Failures are driven three ways: a real new VMM killed at an exact step (a relay on the main
//! channel holds the hand-over between two messages), a fake new side written here that
//! misbehaves at each step of the protocol (`cpr_common::transfer`), and a fake old side
//! feeding a real new VMM malformed messages and fds. The old VMM must report `failed` with a
//! clear `error-desc`, keep the guest (paused only if it had stopped it) and lose nothing;
//! a new VMM that cannot take the guest must exit with status 1 and say why.

use std::io::Write;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use cpr_common::cpr::{FdKind, PreservedFd};
use cpr_common::transfer::Kind;
use cpr_tests::memcheck::{PAGE_SIZE, stop_and_check_sampled};
use cpr_tests::transfer::*;
use cpr_tests::*;
use serde_json::{Value, json};

/// Generous limit for anything the guest or a VMM has to do.
const LONG: Duration = Duration::from_secs(60);
const HEARTBEAT: &str = "heartbeat,hz=100";
/// The old VMM's own limit for a new VMM to commit after the guest stopped.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// `nobody`.
const OTHER_UID: u32 = 65534;

// ---------------------------------------------------------------------------
// helpers

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn heartbeat_args(cpus: u32) -> Vec<String> {
    strings(&["-m", "16M", "-smp", &cpus.to_string(), "--guest", HEARTBEAT])
}

fn memcheck_args(mem: &str, cpus: u32) -> Vec<String> {
    strings(&["-m", mem, "-smp", &cpus.to_string(), "--guest", "memcheck"])
}

fn mib(args: &[String]) -> u64 {
    let i = args.iter().position(|a| a == "-m").expect("-m");
    args[i + 1]
        .trim_end_matches('M')
        .parse::<u64>()
        .expect("-m NM")
        << 20
}

fn status(qmp: &mut QmpClient) -> String {
    let reply = qmp.execute("query-status", Value::Null).unwrap();
    reply["status"].as_str().unwrap().to_string()
}

fn query_migrate(qmp: &mut QmpClient) -> Value {
    qmp.execute("query-migrate", Value::Null).unwrap()
}

/// "MIGRATION setup", "STOP", ...: an event list in a form that compares well.
fn summarize(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e["data"]["status"].as_str() {
            Some(s) if e["event"] == "MIGRATION" => format!("MIGRATION {s}"),
            _ => e["event"].as_str().unwrap_or("?").to_string(),
        })
        .collect()
}

/// The events the old VMM must send for a transfer that ended with `end`: `stop` if the guest
/// was running when the old VMM stopped it, `active` if the old VMM got as far as sending the
/// machine state.
fn old_side_events(stop: bool, active: bool, end: &str) -> Vec<String> {
    let mut v = vec!["MIGRATION setup".to_string()];
    if stop {
        v.push("STOP".into());
    }
    if active {
        v.push("MIGRATION active".into());
    }
    v.push(format!("MIGRATION {end}"));
    v
}

/// The guest's completed memcheck sweeps in `text`.
fn sweeps(text: &str) -> usize {
    text.bytes().filter(|&b| b == b'B').count()
}

/// A running VM (an old side): its process, monitor and the machine arguments a new side needs.
struct Vm {
    qmp: QmpClient,
    vmm: VmmProcess,
    args: Vec<String>,
}

impl Vm {
    fn boot(dir: &TempDir, name: &str, args: &[String]) -> Vm {
        let socket = dir.join(format!("{name}.qmp"));
        let mut full = args.to_vec();
        full.push("-qmp".into());
        full.push(qmp_socket_arg(&socket));
        let vmm = VmmProcess::start_vmm(&full);
        let mut qmp = QmpClient::connect_and_negotiate(&socket, LONG).expect("QMP connection");
        qmp.set_timeout(LONG);
        Vm {
            qmp,
            vmm,
            args: args.to_vec(),
        }
    }

    /// Boots the heartbeat guest with `cpus` vCPUs as `old` and waits until every vCPU printed
    /// 5 ticks.
    fn boot_heartbeat(dir: &TempDir, cpus: u32) -> Vm {
        let vm = Vm::boot(dir, "old", &heartbeat_args(cpus));
        vm.vmm.wait_for_all_ticks(cpus, 5, LONG).unwrap();
        vm
    }

    /// Boots the memcheck guest with `mem` of RAM and `cpus` vCPUs as `old` and waits until it
    /// completed 2 sweeps.
    fn boot_memcheck(dir: &TempDir, mem: &str, cpus: u32) -> Vm {
        let vm = Vm::boot(dir, "old", &memcheck_args(mem, cpus));
        vm.wait_sweeps(2);
        vm
    }

    fn status(&mut self) -> String {
        status(&mut self.qmp)
    }

    fn ram(&self) -> u64 {
        mib(&self.args)
    }

    /// Waits until the memcheck guest completed `more` sweeps beyond what it showed so far.
    fn wait_sweeps(&self, more: usize) {
        let now = sweeps(&self.vmm.stdout_text());
        self.vmm
            .wait_for_output(|t| sweeps(t) >= now + more, LONG)
            .unwrap();
    }

    /// Waits until every vCPU printed `more` ticks beyond its last one so far.
    fn wait_ticks(&self, cpus: u32, more: u64) {
        let now: Vec<u64> = (0..cpus)
            .map(|c| self.vmm.last_tick(c).unwrap_or(0))
            .collect();
        let target = now.iter().copied().max().unwrap_or(0) + more;
        self.vmm.wait_for_all_ticks(cpus, target, LONG).unwrap();
    }

    /// Quits the VMM and returns everything it printed.
    fn quit(mut self) -> String {
        self.qmp.execute("quit", Value::Null).unwrap();
        let status = self.vmm.wait_exit(LONG).unwrap();
        assert_eq!(status.code(), Some(0), "{}", self.vmm.stderr_text());
        self.vmm.stdout_text()
    }
}

/// Stops a memcheck VM, dumps its range and checks it; also checks that the last page holds
/// the number of sweeps the consoles reported (`earlier` from previous VMMs plus this one's).
fn stop_and_check_memcheck(vm: &mut Vm, earlier: usize, dump: &Path) {
    if vm.status() == "running" {
        vm.qmp.execute("stop", Value::Null).unwrap();
    }
    check_memcheck_now(vm, earlier, dump);
}

/// [`stop_and_check_memcheck`] for a guest that is already stopped.
fn check_memcheck_now(vm: &mut Vm, earlier: usize, dump: &Path) {
    assert_eq!(vm.status(), "paused");
    let ram = vm.ram();
    let bytes = dump_memcheck_range(&mut vm.qmp, ram, dump).unwrap();
    check_memcheck_dump(&bytes).unwrap();
    let last = bytes[bytes.len() - PAGE_SIZE];
    vm.vmm
        .wait_for_output(
            |text| {
                let n = ((earlier + sweeps(text)) % 256) as u8;
                last == n || last == n.wrapping_add(1)
            },
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("RAM says {last} sweeps (mod 256), the consoles disagree: {e}"));
}

/// Checks that the new VMM's ticks continue the old VMM's exactly: the first tick after the
/// old one's last is that tick + 1 on every vCPU, all consecutive, no vCPU restarted. Waits
/// for `more` ticks per vCPU on the new VMM first.
fn assert_ticks_continue(old_out: &str, new: &VmmProcess, cpus: u32, more: usize) {
    let new_out = assert_ticks_go_on(
        old_out,
        new,
        cpus,
        more,
        LONG,
        "the transfer",
        "the new VMM's first tick must follow the old one's last",
    );
    let log = parse_heartbeats(&new_out);
    assert!(
        log.started.is_empty(),
        "the guest rebooted on the new VMM:\n{new_out}"
    );
    let whole = parse_heartbeats(&format!("{old_out}{new_out}"));
    assert!(
        whole.malformed.is_empty(),
        "garbled output: {:?}",
        whole.malformed
    );
}

/// Checks that a heartbeat guest's whole console (one process) holds one `start` per vCPU and
/// consecutive ticks from 1, after waiting for `more` ticks beyond what it shows now.
fn assert_ticks_whole(vm: &Vm, cpus: u32, more: u64) {
    vm.wait_ticks(cpus, more);
    let out = vm.vmm.stdout_text();
    let log = parse_heartbeats(&out);
    assert_eq!(log.started.len(), cpus as usize, "{:?}", log.started);
    assert!(log.malformed.is_empty(), "{:?}", log.malformed);
    assert_ticks_consecutive(&log.ticks).unwrap();
    for cpu in 0..cpus {
        assert_eq!(log.ticks[&cpu][0], 1, "cpu {cpu}");
    }
}

/// The new side's `query-migrate` after a completed transfer.
fn check_new_side_info(info: &Value) -> u64 {
    assert_eq!(info["status"], "completed", "{info}");
    let cpr = &info["x-cpr"];
    let blackout = cpr["blackout-ns"]
        .as_u64()
        .unwrap_or_else(|| panic!("no x-cpr.blackout-ns: {info}"));
    assert!(
        blackout > 0 && blackout < 30_000_000_000,
        "blackout {blackout} ns: {info}"
    );
    let phases = cpr["phases"].as_array().expect("x-cpr.phases");
    assert!(!phases.is_empty(), "{info}");
    let mut sum = 0;
    for p in phases {
        assert!(p["name"].as_str().is_some_and(|n| !n.is_empty()), "{info}");
        sum += p["ns"].as_u64().expect("phase ns");
    }
    assert_eq!(
        sum, blackout,
        "the phases must add up to the blackout: {info}"
    );
    assert_eq!(cpr["rolled-back"], false, "{info}");
    assert!(
        cpr["from-version"].as_str().is_some_and(|v| !v.is_empty()),
        "{info}"
    );
    assert!(
        cpr["to-version"].as_str().is_some_and(|v| !v.is_empty()),
        "{info}"
    );
    assert_eq!(
        info["downtime"].as_u64(),
        Some(blackout / 1_000_000),
        "{info}"
    );
    blackout
}

/// How the new side learns its main channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Incoming {
    /// `-incoming unix:MAIN`.
    Unix,
    /// `-incoming defer`, then `migrate-incoming {"channels": [main]}`.
    DeferChannels,
    /// `-incoming defer`, then `migrate-incoming {"uri": "unix:MAIN"}`.
    DeferUri,
}

/// A completed transfer.
struct Transferred {
    /// The new side, now running the guest.
    new: Vm,
    /// The old side's events from `migrate` to the end, in order.
    old_events: Vec<Value>,
    /// The new side's events from `migrate-incoming` to the end (only with `-incoming defer`:
    /// otherwise the transfer may end before the monitor could be connected).
    new_events: Vec<Value>,
    /// The new side's `query-migrate`.
    info: Value,
    /// x-cpr blackout-ns.
    blackout_ns: u64,
}

/// Starts a new side called `name` and transfers `old`'s guest into it; checks everything both
/// sides report about a successful transfer. `old` is left in postmigrate.
fn transfer(
    dir: &TempDir,
    old: &mut Vm,
    name: &str,
    incoming: Incoming,
    spelling: CprSpelling,
) -> Transferred {
    let main = match incoming {
        Incoming::Unix => MainChannel::Unix,
        _ => MainChannel::Defer,
    };
    let target = Target::start(dir.path(), name, &old.args, main, spelling, LONG).unwrap();
    assert!(
        !target.qmp_path.exists(),
        "the new VMM started its monitor before it got the old VMM's RAM"
    );
    let running = old.status() == "running";
    let _ = old.qmp.events();
    let reply = migrate_cpr_transfer(&mut old.qmp, &target.main_path, &target.cpr_path).unwrap();
    assert_eq!(reply, json!({}));
    let mut qmp = target.connect_qmp(LONG).unwrap();
    let mut new_events = Vec::new();
    if main == MainChannel::Defer {
        assert_eq!(status(&mut qmp), "inmigrate");
        assert!(!target.main_path.exists());
        // Nothing stops until the new side has its main channel.
        assert_eq!(old.status(), if running { "running" } else { "paused" });
        let args = match incoming {
            Incoming::DeferUri => {
                json!({"uri": format!("unix:{}", target.main_path.display())})
            }
            _ => json!({"channels": [unix_channel("main", &target.main_path)]}),
        };
        assert_eq!(qmp.execute("migrate-incoming", args).unwrap(), json!({}));
        new_events = collect_events_until(&mut qmp, LONG, is_migration_end).unwrap();
        let expected: Vec<&str> = if running {
            vec!["RESUME", "MIGRATION completed"]
        } else {
            vec!["MIGRATION completed"]
        };
        assert_eq!(summarize(&new_events), expected, "{new_events:?}");
    }
    let old_events = collect_events_until(&mut old.qmp, LONG, is_migration_end).unwrap();
    assert_eq!(
        summarize(&old_events),
        old_side_events(running, true, "completed"),
        "{old_events:?}"
    );
    let old_info = query_migrate(&mut old.qmp);
    assert_eq!(old_info["status"], "completed", "{old_info}");
    assert_eq!(old.status(), "postmigrate");
    let info = query_migrate(&mut qmp);
    let blackout_ns = check_new_side_info(&info);
    assert_eq!(status(&mut qmp), if running { "running" } else { "paused" });
    if let (Some(stop), Some(resume)) = (
        old_events.iter().find(|e| e["event"] == "STOP"),
        new_events.iter().find(|e| e["event"] == "RESUME"),
    ) {
        // Wall-clock event times of two processes against the VMM's monotonic figure (1 ms
        // for the microsecond rounding of timestamps).
        let gap_ns = (event_timestamp(resume) - event_timestamp(stop)) * 1e9;
        assert!(
            gap_ns + 1e6 >= blackout_ns as f64,
            "STOP (old) to RESUME (new) is {gap_ns} ns, shorter than the blackout {blackout_ns} ns"
        );
    }
    // Both channels' socket files are gone: nothing is left to connect to.
    assert!(!target.cpr_path.exists(), "{}", target.cpr_path.display());
    assert!(!target.main_path.exists(), "{}", target.main_path.display());
    Transferred {
        new: Vm {
            qmp,
            vmm: target.vmm,
            args: old.args.clone(),
        },
        old_events,
        new_events,
        info,
        blackout_ns,
    }
}

/// Shows that a memcheck guest lost nothing (after a failed transfer): transfers it from `old`
/// to a real new side called `name`, quits `old`, lets it sweep twice more there and checks its
/// memory (dumped to `dir/dump`) and sweep count.
fn memcheck_moves_intact(
    dir: &TempDir,
    mut old: Vm,
    name: &str,
    spelling: CprSpelling,
    dump: &str,
) {
    let t = transfer(dir, &mut old, name, Incoming::Unix, spelling);
    let old_out = old.quit();
    let mut new = t.new;
    new.wait_sweeps(2);
    stop_and_check_memcheck(&mut new, sweeps(&old_out), &dir.join(dump));
}

/// Waits for the old side's migration to fail; checks the events (no RESUME, STOP only if
/// `stopped`), `query-migrate` and the run state, and that `error-desc` holds every needle.
/// Returns `error-desc`.
fn assert_old_side_failed(vm: &mut Vm, stopped: bool, needles: &[&str]) -> String {
    let events = collect_events_until(&mut vm.qmp, LONG, is_migration_end).unwrap();
    assert_eq!(
        summarize(&events),
        old_side_events(stopped, stopped, "failed"),
        "{events:?}"
    );
    let info = query_migrate(&mut vm.qmp);
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap_or("").to_string();
    for needle in needles {
        assert!(
            desc.contains(needle),
            "error-desc should mention {needle:?}: {desc:?}"
        );
    }
    assert_eq!(vm.status(), if stopped { "paused" } else { "running" });
    desc
}

/// `cont` on a paused guest (e.g. after a failed transfer) resumes it, with a RESUME event.
fn cont_if_paused(vm: &mut Vm) {
    if vm.status() == "paused" {
        let _ = vm.qmp.events();
        assert_eq!(vm.qmp.execute("cont", Value::Null).unwrap(), json!({}));
        vm.qmp.wait_event("RESUME", LONG).unwrap();
    }
    assert_eq!(vm.status(), "running");
}

/// A new VMM that is expected to give up: waits for exit status 1 and returns stderr, which
/// must say why (every needle) in a `vmm: ` line.
fn assert_new_side_exits(target: &Target, needles: &[&str]) -> String {
    let status = target.vmm.wait_exit(LONG).unwrap();
    let stderr = target.vmm.stderr_text();
    assert_eq!(
        status.code(),
        Some(1),
        "the new VMM should exit with status 1, got {status}; stderr:\n{stderr}"
    );
    let line = stderr
        .lines()
        .find(|l| l.starts_with("vmm: "))
        .unwrap_or_else(|| panic!("no `vmm: ` line on stderr:\n{stderr}"));
    for needle in needles {
        assert!(
            line.contains(needle),
            "the new VMM's error should mention {needle:?}: {line:?}\n{stderr}"
        );
    }
    assert_eq!(
        target.vmm.stdout_text(),
        "",
        "the guest must not have run on a new VMM that failed"
    );
    stderr
}

// ---------------------------------------------------------------------------
// successful transfers

#[test]
fn heartbeat_one_vcpu_continues_on_the_new_side() {
    let dir = TempDir::new("xhb1").unwrap();
    let mut old = Vm::boot_heartbeat(&dir, 1);
    let t = transfer(&dir, &mut old, "n1", Incoming::Unix, CprSpelling::KeyValue);
    let old_out = old.quit();
    assert_ticks_continue(&old_out, &t.new.vmm, 1, 10);
    assert!(t.blackout_ns > 0);
}

#[test]
fn heartbeat_two_vcpus_continue_with_the_json_cpr_channel() {
    let dir = TempDir::new("xhb2").unwrap();
    let mut old = Vm::boot_heartbeat(&dir, 2);
    let t = transfer(&dir, &mut old, "n1", Incoming::Unix, CprSpelling::Json);
    let old_out = old.quit();
    assert_ticks_continue(&old_out, &t.new.vmm, 2, 10);
    assert_eq!(t.info["x-cpr"]["rolled-back"], false);
}

#[test]
fn memcheck_memory_is_consistent_on_the_new_side() {
    let dir = TempDir::new("xmc1").unwrap();
    let mut old = Vm::boot_memcheck(&dir, "64M", 1);
    let t = transfer(&dir, &mut old, "n1", Incoming::Unix, CprSpelling::KeyValue);
    let old_out = old.quit();
    assert!(old_out.starts_with('A'), "{old_out}");
    let mut new = t.new;
    new.wait_sweeps(3);
    stop_and_check_memcheck(&mut new, sweeps(&old_out), &dir.join("dump"));
    assert!(
        !new.vmm.stdout_text().contains('A'),
        "memcheck restarted on the new VMM"
    );
    // And it goes on.
    cont_if_paused(&mut new);
    new.wait_sweeps(1);
}

/// RAM above 4 GiB: a 5 GiB memcheck guest sweeping one page every 16 MiB of all RAM (both
/// regions) is consistent on the new side, read from the new VMM's RAM memfds.
#[test]
fn memcheck_sampled_across_5_gib_is_consistent_on_the_new_side() {
    const RAM: u64 = 5 << 30;
    let dir = TempDir::new("xmc5g").unwrap();
    let args = strings(&["-m", "5G", "-smp", "1", "--guest", "memcheck,sweep=sampled"]);
    let mut old = Vm::boot(&dir, "old", &args);
    old.wait_sweeps(3);
    let t = transfer(&dir, &mut old, "n1", Incoming::Unix, CprSpelling::KeyValue);
    let old_out = old.quit();
    assert!(old_out.starts_with('A'), "{old_out}");
    let mut new = t.new;
    new.wait_sweeps(2);
    let pid = new.vmm.pid();
    if let Err(e) = stop_and_check_sampled(&mut new.qmp, pid, RAM) {
        panic!("on the new side: {e}");
    }
    assert!(
        !new.vmm.stdout_text().contains('A'),
        "memcheck restarted on the new VMM"
    );
    cont_if_paused(&mut new);
    new.wait_sweeps(1);
}

#[test]
fn memcheck_two_vcpus_with_incoming_defer_and_migrate_incoming_channels() {
    let dir = TempDir::new("xmc2").unwrap();
    let mut old = Vm::boot_memcheck(&dir, "32M", 2);
    let t = transfer(
        &dir,
        &mut old,
        "n1",
        Incoming::DeferChannels,
        CprSpelling::Json,
    );
    assert!(t.old_events.iter().any(|e| e["event"] == "STOP"));
    let old_out = old.quit();
    let mut new = t.new;
    new.wait_sweeps(3);
    stop_and_check_memcheck(&mut new, sweeps(&old_out), &dir.join("dump"));
    assert!(!new.vmm.stdout_text().contains('A'));
}

#[test]
fn heartbeat_two_vcpus_with_incoming_defer_and_migrate_incoming_uri() {
    let dir = TempDir::new("xdefu").unwrap();
    let mut old = Vm::boot_heartbeat(&dir, 2);
    let t = transfer(
        &dir,
        &mut old,
        "n1",
        Incoming::DeferUri,
        CprSpelling::KeyValue,
    );
    assert_eq!(t.new_events.len(), 2, "{:?}", t.new_events);
    let old_out = old.quit();
    let mut new = t.new;
    assert_ticks_continue(&old_out, &new.vmm, 2, 10);
    // Only once.
    let again = new.qmp.execute(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", dir.join("again").display())}),
    );
    assert!(again.is_err(), "{again:?}");
    assert_eq!(new.status(), "running");
}

/// A guest that was paused arrives paused, byte for byte, and runs on `cont`.
#[test]
fn a_paused_guest_arrives_paused_with_identical_memory() {
    let dir = TempDir::new("xpause").unwrap();
    let mut old = Vm::boot_memcheck(&dir, "32M", 1);
    old.qmp.execute("stop", Value::Null).unwrap();
    old.qmp.wait_event("STOP", LONG).unwrap();
    let ram = old.ram();
    let before = dump_memcheck_range(&mut old.qmp, ram, &dir.join("d1")).unwrap();
    check_memcheck_dump(&before).unwrap();
    let t = transfer(
        &dir,
        &mut old,
        "n1",
        Incoming::DeferChannels,
        CprSpelling::KeyValue,
    );
    let old_out = old.quit();
    let mut new = t.new;
    assert_eq!(new.status(), "paused");
    let after = dump_memcheck_range(&mut new.qmp, ram, &dir.join("d2")).unwrap();
    assert!(
        before == after,
        "guest memory changed across a paused transfer"
    );
    assert_eq!(new.vmm.stdout_text(), "", "the paused guest ran");
    cont_if_paused(&mut new);
    new.wait_sweeps(2);
    stop_and_check_memcheck(&mut new, sweeps(&old_out), &dir.join("d3"));
}

/// Each new side becomes the next old side.
#[test]
fn a_guest_moves_through_a_chain_of_transfers() {
    let dir = TempDir::new("xchain").unwrap();
    let mut vm = Vm::boot_heartbeat(&dir, 2);
    let mut history = String::new();
    let spellings = [CprSpelling::KeyValue, CprSpelling::Json];
    for hop in 0..4 {
        let incoming = if hop % 2 == 0 {
            Incoming::Unix
        } else {
            Incoming::DeferChannels
        };
        let name = format!("n{hop}");
        let t = transfer(&dir, &mut vm, &name, incoming, spellings[hop % 2]);
        history += &vm.quit();
        assert_ticks_continue(&history, &t.new.vmm, 2, 3);
        vm = t.new;
    }
    let log = parse_heartbeats(&format!("{history}{}", vm.vmm.stdout_text()));
    assert_eq!(log.started.len(), 2, "{:?}", log.started);
    for cpu in 0..2 {
        assert_eq!(log.ticks[&cpu][0], 1);
    }
}

/// `stop` on the new VMM while it waits means "do not start the guest when the transfer
/// completes", as in QEMU; a main channel that is not a UNIX socket is refused meanwhile.
#[test]
fn stop_on_the_waiting_new_side_makes_the_guest_arrive_paused() {
    let dir = TempDir::new("xstop").unwrap();
    let mut old = Vm::boot_heartbeat(&dir, 2);
    let target = Target::start(
        dir.path(),
        "n1",
        &old.args,
        MainChannel::Defer,
        CprSpelling::Json,
        LONG,
    )
    .unwrap();
    let _ = old.qmp.events();
    migrate_cpr_transfer(&mut old.qmp, &target.main_path, &target.cpr_path).unwrap();
    let mut qmp = target.connect_qmp(LONG).unwrap();
    let file = json!({"uri": format!("file:{}", dir.join("f").display())});
    match qmp.execute("migrate-incoming", file) {
        Err(QmpError::Command { desc, .. }) => assert!(desc.contains("unix"), "{desc}"),
        other => panic!("migrate-incoming from a file during a cpr-transfer: {other:?}"),
    }
    assert_eq!(status(&mut qmp), "inmigrate");
    qmp.execute("stop", Value::Null).unwrap();
    assert_eq!(status(&mut qmp), "inmigrate");
    let main = json!({"channels": [unix_channel("main", &target.main_path)]});
    qmp.execute("migrate-incoming", main).unwrap();
    let new_events = collect_events_until(&mut qmp, LONG, is_migration_end).unwrap();
    assert_eq!(summarize(&new_events), ["MIGRATION completed"]);
    let old_events = collect_events_until(&mut old.qmp, LONG, is_migration_end).unwrap();
    assert_eq!(
        summarize(&old_events),
        old_side_events(true, true, "completed")
    );
    check_new_side_info(&query_migrate(&mut qmp));
    assert_eq!(status(&mut qmp), "paused");
    let old_out = old.quit();
    assert_eq!(target.vmm.stdout_text(), "", "the guest ran while paused");
    qmp.execute("cont", Value::Null).unwrap();
    qmp.wait_event("RESUME", LONG).unwrap();
    assert_eq!(status(&mut qmp), "running");
    assert_ticks_continue(&old_out, &target.vmm, 2, 10);
}

// ---------------------------------------------------------------------------
// a real new side that dies

/// The new VMM killed after it took the RAM (waiting for `migrate-incoming`): the old one
/// never stopped the guest; nothing is lost and a later transfer works.
#[test]
fn new_side_killed_after_taking_the_ram_leaves_the_guest_running() {
    let dir = TempDir::new("xkill1").unwrap();
    let mut old = Vm::boot_memcheck(&dir, "16M", 1);
    let target = Target::start(
        dir.path(),
        "n1",
        &old.args,
        MainChannel::Defer,
        CprSpelling::KeyValue,
        LONG,
    )
    .unwrap();
    let _ = old.qmp.events();
    migrate_cpr_transfer(&mut old.qmp, &target.main_path, &target.cpr_path).unwrap();
    let mut new_qmp = target.connect_qmp(LONG).unwrap();
    assert_eq!(status(&mut new_qmp), "inmigrate");
    target.vmm.send_signal(Signal::SIGKILL).unwrap();
    target.vmm.wait_exit(LONG).unwrap();
    assert_old_side_failed(&mut old, false, &["n1.main"]);
    old.wait_sweeps(2);
    stop_and_check_memcheck(&mut old, 0, &dir.join("d1"));
    cont_if_paused(&mut old);
    old.wait_sweeps(1);
    // The guest still moves.
    memcheck_moves_intact(&dir, old, "n2", CprSpelling::KeyValue, "d2");
}

/// Starts a real new side `name` whose main channel the old VMM reaches through a relay, and
/// starts the transfer. Returns the new side and the relay, with the old VMM connected to it.
fn relayed_transfer(dir: &TempDir, old: &mut Vm, name: &str) -> (Target, RelayedMain) {
    let target = Target::start(
        dir.path(),
        name,
        &old.args,
        MainChannel::Unix,
        CprSpelling::KeyValue,
        LONG,
    )
    .unwrap();
    let relay_path = dir.join(format!("{name}.relay"));
    let relay = MainRelay::listen(&relay_path, &target.main_path).unwrap();
    let _ = old.qmp.events();
    migrate_cpr_transfer(&mut old.qmp, &relay_path, &target.cpr_path).unwrap();
    let relayed = relay.accept(LONG).unwrap();
    (target, relayed)
}

/// The new VMM killed once it had built the VM and said READY, before the old one saw it.
#[test]
fn new_side_killed_before_ready_arrives_leaves_the_guest_running() {
    let dir = TempDir::new("xkill2").unwrap();
    let mut old = Vm::boot_heartbeat(&dir, 2);
    let (target, relayed) = relayed_transfer(&dir, &mut old, "n1");
    relayed.take_from_new(Kind::Ready, LONG).unwrap();
    target.vmm.send_signal(Signal::SIGKILL).unwrap();
    target.vmm.wait_exit(LONG).unwrap();
    drop(relayed);
    assert_old_side_failed(&mut old, false, &["closed"]);
    assert_ticks_whole(&old, 2, 10);
}

/// The new VMM killed after the old one stopped the guest and sent its state: the guest
/// stays paused on the old VMM (which cannot know the new one is gone for good), its memory
/// is intact, and `cont` resumes it where it stopped.
#[test]
fn new_side_killed_after_the_guest_stopped_leaves_it_paused_and_cont_resumes() {
    let dir = TempDir::new("xkill3").unwrap();
    let mut old = Vm::boot_memcheck(&dir, "16M", 1);
    let (target, relayed) = relayed_transfer(&dir, &mut old, "n1");
    let ready = relayed.take_from_new(Kind::Ready, LONG).unwrap();
    relayed.give_to_old(&ready).unwrap();
    relayed.take_from_old(Kind::State, LONG).unwrap();
    target.vmm.send_signal(Signal::SIGKILL).unwrap();
    target.vmm.wait_exit(LONG).unwrap();
    drop(relayed);
    assert_old_side_failed(&mut old, true, &["closed"]);
    check_memcheck_now(&mut old, 0, &dir.join("d1"));
    cont_if_paused(&mut old);
    old.wait_sweeps(3);
    stop_and_check_memcheck(&mut old, 0, &dir.join("d2"));
    cont_if_paused(&mut old);
    memcheck_moves_intact(&dir, old, "n2", CprSpelling::Json, "d3");
}

/// A new VMM started with another `-smp` takes the RAM but refuses the state: it says why
/// and exits; the old VMM reports the new one's reason and `cont` resumes the guest.
#[test]
fn new_side_with_another_vcpu_count_refuses_the_state_and_cont_resumes() {
    let dir = TempDir::new("xsmp").unwrap();
    let mut old = Vm::boot_heartbeat(&dir, 1);
    let target = Target::start(
        dir.path(),
        "n1",
        &heartbeat_args(2),
        MainChannel::Unix,
        CprSpelling::KeyValue,
        LONG,
    )
    .unwrap();
    let _ = old.qmp.events();
    migrate_cpr_transfer(&mut old.qmp, &target.main_path, &target.cpr_path).unwrap();
    assert_new_side_exits(&target, &["incoming cpr-transfer failed", "-smp"]);
    assert_old_side_failed(&mut old, true, &["-smp"]);
    cont_if_paused(&mut old);
    assert_ticks_whole(&old, 1, 10);
}

/// A new VMM started with another `-m` cannot map the RAM: it exits saying so, and the old VMM
/// (which never stopped the guest) reports that reason, not a confusing follow-up error.
#[test]
fn new_side_with_another_ram_size_exits_and_the_old_side_says_why() {
    let dir = TempDir::new("xram").unwrap();
    let mut old = Vm::boot_heartbeat(&dir, 1);
    let target = Target::start(
        dir.path(),
        "n1",
        &strings(&["-m", "32M", "--guest", HEARTBEAT]),
        MainChannel::Unix,
        CprSpelling::KeyValue,
        LONG,
    )
    .unwrap();
    let _ = old.qmp.events();
    migrate_cpr_transfer(&mut old.qmp, &target.main_path, &target.cpr_path).unwrap();
    assert_new_side_exits(&target, &[LOW_RAM_REGION, "16777216", "33554432"]);
    assert_old_side_failed(&mut old, false, &[LOW_RAM_REGION, "16777216"]);
    assert_ticks_whole(&old, 1, 10);
}

// ---------------------------------------------------------------------------
// a fake new side

/// One way for a fake new side to misbehave.
#[derive(Clone, Copy, Debug)]
enum Misdeed {
    /// On the CPR channel, a frame instead of closing it.
    FrameOnCpr(Kind),
    /// Closes the CPR channel without listening on the main channel.
    NoMainChannel,
    /// On the main channel, instead of READY (the guest still runs) or, after READY, instead
    /// of COMMIT (the guest is stopped):
    Raw(&'static [u8]),
    Frame(Kind),
    Error,
    Close,
    BadMagic,
    BadChecksum,
    Oversized,
    WrongVersion,
    UnknownKind,
    TruncatedHeader,
    TruncatedPayload,
}

const FAKE_ERROR: &str = "fake new side: no room for this guest";

impl Misdeed {
    /// The bytes to send on the main channel, or None to close it.
    fn bytes(self) -> Option<Vec<u8>> {
        let commit = frame_bytes(Kind::Commit, b"");
        let with_payload = frame_bytes(Kind::Commit, b"payload");
        Some(match self {
            Misdeed::Raw(b) => b.to_vec(),
            Misdeed::Frame(kind) => frame_bytes(kind, b""),
            Misdeed::Error => frame_bytes(Kind::Error, FAKE_ERROR.as_bytes()),
            Misdeed::BadMagic => {
                let mut b = commit;
                b[..4].copy_from_slice(b"XPRC");
                b
            }
            Misdeed::BadChecksum => {
                let mut b = with_payload;
                b[HEADER_LEN] ^= 0x20;
                b
            }
            Misdeed::Oversized => {
                let mut b = commit;
                b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
                b
            }
            Misdeed::WrongVersion => {
                let mut b = commit;
                b[4..6].copy_from_slice(&(VERSION + 8).to_le_bytes());
                b
            }
            Misdeed::UnknownKind => {
                let mut b = commit;
                b[6..8].copy_from_slice(&99u16.to_le_bytes());
                b
            }
            Misdeed::TruncatedHeader => commit[..7].to_vec(),
            Misdeed::TruncatedPayload => with_payload[..HEADER_LEN + 3].to_vec(),
            Misdeed::Close | Misdeed::FrameOnCpr(_) | Misdeed::NoMainChannel => return None,
        })
    }

    /// What the old side's error-desc must say.
    fn needles(self) -> Vec<String> {
        let v: Vec<&str> = match self {
            Misdeed::FrameOnCpr(Kind::Error) => vec![FAKE_ERROR],
            Misdeed::FrameOnCpr(kind) => return vec!["cpr channel".into(), format!("{kind:?}")],
            Misdeed::NoMainChannel => vec!["main channel", ".main"],
            Misdeed::Raw(_) | Misdeed::BadMagic => vec!["bad magic"],
            Misdeed::Frame(kind) => return vec!["expected".into(), format!("got {kind:?}")],
            Misdeed::Error => vec![FAKE_ERROR],
            Misdeed::Close => vec!["closed"],
            Misdeed::BadChecksum => vec!["checksum"],
            Misdeed::Oversized => vec!["4294967295", "limit"],
            Misdeed::WrongVersion => vec!["version"],
            Misdeed::UnknownKind => vec!["kind 99"],
            Misdeed::TruncatedHeader => vec!["closed", "7 bytes"],
            Misdeed::TruncatedPayload => vec!["closed", "19 bytes"],
        };
        v.into_iter().map(String::from).collect()
    }
}

/// Starts a cpr-transfer of `vm`'s guest to a fake new side listening on `dir/NAME.cpr` (and,
/// once it opens it, `dir/NAME.main`) and lets the fake take HELLO with the guest's RAM. The
/// old VMM's earlier events are dropped, so that what it sends from `migrate` on can be checked.
fn transfer_to_fake(dir: &TempDir, vm: &mut Vm, name: &str) -> FakeNewSide {
    let (cpr, main) = (
        dir.join(format!("{name}.cpr")),
        dir.join(format!("{name}.main")),
    );
    let mut fake = FakeNewSide::listen(&cpr, &main).unwrap();
    let _ = vm.qmp.events();
    migrate_cpr_transfer(&mut vm.qmp, &main, &cpr).unwrap();
    fake.take_hello(LONG).unwrap();
    fake
}

/// Runs one transfer from `vm` into a fake new side that takes HELLO (checking it), opens the
/// main channel and then, if `after_ready`, says READY, takes STATE (checking the guest RAM it
/// got while the old VMM holds the guest stopped) and misbehaves instead of committing;
/// otherwise misbehaves instead of READY. Checks that the old VMM failed as it should, then
/// that the guest's memory is consistent and that it runs again.
fn fake_new_side_case(
    dir: &TempDir,
    vm: &mut Vm,
    case: usize,
    misdeed: Misdeed,
    after_ready: bool,
) {
    let what = format!("case {case} ({misdeed:?}, after READY: {after_ready})");
    eprintln!("{what}");
    let mut fake = transfer_to_fake(dir, vm, &format!("c{case}"));
    let hello = fake.hello.clone().expect("HELLO taken");
    assert_eq!(hello.fds.len(), 1, "{what}: {hello:?}");
    assert_eq!(hello.fds[0].name, LOW_RAM_REGION, "{what}");
    assert_eq!(hello.fds[0].kind, FdKind::GuestRam, "{what}");
    assert_eq!(hello.fds[0].size, vm.ram(), "{what}");
    assert_eq!(fake.ram.len(), 1, "{what}");
    match misdeed {
        Misdeed::FrameOnCpr(kind) => {
            let payload: &[u8] = if kind == Kind::Error {
                FAKE_ERROR.as_bytes()
            } else {
                b""
            };
            cpr_common::transfer::send(fake.cpr.as_ref().unwrap(), kind, payload, &[]).unwrap();
        }
        Misdeed::NoMainChannel => fake.cpr = None,
        _ => {
            fake.open_main(LONG).unwrap();
            if after_ready {
                let state = fake.ready_and_take_state(LONG).unwrap();
                assert_eq!(&state[8..16], b"CPRVMMST", "{what}: not a state file");
                // The guest is stopped: the memfd that came with HELLO is its RAM.
                let ram = read_at(
                    &fake.ram[0],
                    MEMCHECK_BASE,
                    (vm.ram() - MEMCHECK_BASE) as usize,
                )
                .unwrap();
                check_memcheck_dump(&ram)
                    .unwrap_or_else(|e| panic!("{what}: the received RAM memfd: {e}"));
                assert_eq!(vm.status(), "finish-migrate", "{what}");
            }
            match misdeed.bytes() {
                Some(bytes) => {
                    fake.send_raw(&bytes).unwrap();
                    // Truncated messages end with the connection.
                    if matches!(
                        misdeed,
                        Misdeed::TruncatedHeader | Misdeed::TruncatedPayload
                    ) {
                        fake.main().shutdown(Shutdown::Write).unwrap();
                    }
                }
                None => fake.main = None,
            }
        }
    }
    let needles = misdeed.needles();
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let desc = assert_old_side_failed(vm, after_ready, &needles);
    eprintln!("{what}: error-desc {desc:?}");
    // The old VMM let go of the fake: it closed the channel.
    if let Some(main) = &fake.main {
        read_until_closed(main, LONG)
            .unwrap_or_else(|e| panic!("{what}: the old VMM kept the main channel open: {e}"));
    }
    drop(fake);
    if after_ready {
        check_memcheck_now(vm, 0, &dir.join(format!("c{case}.dump")));
    } else {
        stop_and_check_memcheck(vm, 0, &dir.join(format!("c{case}.dump")));
    }
    cont_if_paused(vm);
    vm.wait_sweeps(1);
}

/// Boots a 1-vCPU memcheck guest in a fresh directory called `dir_name` and plays every one of
/// `cases` on it with a fake new side ([`fake_new_side_case`], before or after READY). Then, if
/// `then` names a CPR channel spelling, shows that nothing was lost: the guest still moves to a
/// real new VMM with its memory intact.
fn fake_new_side_cases(
    dir_name: &str,
    after_ready: bool,
    cases: &[Misdeed],
    then: Option<CprSpelling>,
) {
    let dir = TempDir::new(dir_name).unwrap();
    let mut vm = Vm::boot_memcheck(&dir, "16M", 1);
    for (i, &misdeed) in cases.iter().enumerate() {
        fake_new_side_case(&dir, &mut vm, i, misdeed, after_ready);
    }
    let Some(spelling) = then else { return };
    memcheck_moves_intact(&dir, vm, "n1", spelling, "dump");
}

/// A fake new side misbehaving before READY: the guest never stops.
#[test]
fn fake_new_side_misbehaving_before_ready_never_stops_the_guest() {
    let cases = [
        Misdeed::Raw(b"HTTP/1.1 400 Bad Request\r\n\r\n"),
        Misdeed::Error,
        Misdeed::Close,
        Misdeed::Frame(Kind::Commit),
        Misdeed::BadMagic,
        Misdeed::BadChecksum,
        Misdeed::Oversized,
        Misdeed::TruncatedHeader,
        Misdeed::TruncatedPayload,
        Misdeed::FrameOnCpr(Kind::Ready),
        Misdeed::FrameOnCpr(Kind::Error),
    ];
    fake_new_side_cases("xfake1", false, &cases, Some(CprSpelling::KeyValue));
}

/// A fake new side that closes the CPR channel but never listens on the main channel (as a
/// new VMM that died right after taking the RAM): the error names the main channel.
#[test]
fn fake_new_side_without_a_main_channel_is_reported_as_such() {
    fake_new_side_cases("xfake2", false, &[Misdeed::NoMainChannel], None);
}

/// A fake new side misbehaving after the old VMM stopped the guest: it stays paused until
/// `cont`, and its memory is intact.
#[test]
fn fake_new_side_failing_after_the_stop_leaves_the_guest_paused_until_cont() {
    let cases = [
        Misdeed::Close,
        Misdeed::Error,
        Misdeed::Raw(b"COMMIT, honestly!"),
        Misdeed::BadMagic,
        Misdeed::BadChecksum,
        Misdeed::Oversized,
        Misdeed::WrongVersion,
        Misdeed::UnknownKind,
        Misdeed::TruncatedHeader,
        Misdeed::TruncatedPayload,
        Misdeed::Frame(Kind::Ready),
    ];
    fake_new_side_cases("xfake3", true, &cases, Some(CprSpelling::Json));
}

/// A new side that says READY, takes the state and then never answers: the old VMM gives up
/// after its commit timeout and keeps the guest paused for `cont`.
#[test]
fn a_new_side_that_never_commits_fails_the_migration_after_the_timeout() {
    let dir = TempDir::new("xslow").unwrap();
    let mut vm = Vm::boot_heartbeat(&dir, 1);
    let mut fake = transfer_to_fake(&dir, &mut vm, "f");
    let info = query_migrate(&mut vm.qmp);
    assert_eq!(info["status"], "setup", "{info}");
    assert_eq!(vm.status(), "running");
    fake.open_main(LONG).unwrap();
    fake.ready_and_take_state(LONG).unwrap();
    let stopped = Instant::now();
    let info = query_migrate(&mut vm.qmp);
    assert_eq!(info["status"], "active", "{info}");
    assert_eq!(vm.status(), "finish-migrate");
    let desc = assert_old_side_failed(&mut vm, true, &["30s"]);
    let waited = stopped.elapsed();
    assert!(
        waited >= COMMIT_TIMEOUT - Duration::from_secs(1),
        "gave up after {waited:?}: {desc}"
    );
    read_until_closed(fake.main(), LONG).unwrap();
    cont_if_paused(&mut vm);
    assert_ticks_whole(&vm, 1, 10);
}

/// Refuses a second `migrate` while a cpr-transfer is in flight; it must not reach `other`.
fn assert_second_migrate_refused(vm: &mut Vm, other: &mut FakeNewSide, main2: &Path, cpr2: &Path) {
    match vm.qmp.execute("migrate", migrate_channels(main2, cpr2)) {
        Err(QmpError::Command { desc, .. }) => assert!(desc.contains("in progress"), "{desc}"),
        other => panic!("a second migrate during a cpr-transfer: {other:?}"),
    }
    // `migrate` connects and sends HELLO before it replies: had it gone anywhere, the
    // connection would be waiting now.
    assert!(
        other.accept_cpr(Duration::ZERO).is_err(),
        "the second migrate handed the guest's RAM to another new side"
    );
}

/// While a hand-over is in flight the old VMM must not start a second one: it would hand
/// the same RAM to two new VMMs.
#[test]
fn a_second_migrate_is_refused_while_a_transfer_is_in_flight() {
    let dir = TempDir::new("xbusy").unwrap();
    let mut vm = Vm::boot_heartbeat(&dir, 1);
    let (cpr2, main2) = (dir.join("g.cpr"), dir.join("g.main"));
    let mut other = FakeNewSide::listen(&cpr2, &main2).unwrap();
    let mut fake = transfer_to_fake(&dir, &mut vm, "f");
    // RAM handed over, main channel not open yet.
    assert_second_migrate_refused(&mut vm, &mut other, &main2, &cpr2);
    fake.open_main(LONG).unwrap();
    fake.ready_and_take_state(LONG).unwrap();
    // Guest stopped, state sent.
    assert_second_migrate_refused(&mut vm, &mut other, &main2, &cpr2);
    fake.send(Kind::Error, FAKE_ERROR.as_bytes()).unwrap();
    assert_old_side_failed(&mut vm, true, &[FAKE_ERROR]);
    cont_if_paused(&mut vm);
    assert_ticks_whole(&vm, 1, 10);
}

/// Once the guest is stopped and its state sent, the new VMM may resume it any moment on the
/// same memory: `cont` on the old VMM must be refused until the hand-over has failed.
#[test]
fn cont_is_refused_while_the_new_side_may_run_the_guest() {
    let dir = TempDir::new("xcont").unwrap();
    let mut vm = Vm::boot_heartbeat(&dir, 1);
    let mut fake = transfer_to_fake(&dir, &mut vm, "f");
    fake.open_main(LONG).unwrap();
    fake.ready_and_take_state(LONG).unwrap();
    assert_eq!(vm.status(), "finish-migrate");
    let cont = vm.qmp.execute("cont", Value::Null);
    assert!(
        cont.is_err(),
        "cont while the new VMM may run the guest: {cont:?}"
    );
    assert_eq!(vm.status(), "finish-migrate");
    fake.send(Kind::Error, FAKE_ERROR.as_bytes()).unwrap();
    assert_old_side_failed(&mut vm, true, &[FAKE_ERROR]);
    cont_if_paused(&mut vm);
    assert_ticks_whole(&vm, 1, 10);
}

// ---------------------------------------------------------------------------
// a fake old side

/// Starts a new side that waits for a (fake) old VMM on its CPR channel.
fn waiting_target(dir: &TempDir, name: &str) -> Target {
    Target::start(
        dir.path(),
        name,
        &heartbeat_args(1),
        MainChannel::Unix,
        CprSpelling::KeyValue,
        LONG,
    )
    .unwrap()
}

/// What a fake old side sends on the CPR channel.
struct FakeHello {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl FakeHello {
    fn raw(bytes: Vec<u8>) -> Self {
        FakeHello {
            bytes,
            fds: Vec::new(),
        }
    }

    /// A well-formed HELLO frame listing `records`, with `fds` attached.
    fn listing(records: Vec<PreservedFd>, fds: Vec<OwnedFd>) -> Self {
        FakeHello {
            bytes: frame_bytes(Kind::Hello, &hello_payload(records)),
            fds,
        }
    }

    /// A HELLO for one RAM fd described by `record`.
    fn one(record: PreservedFd, fd: OwnedFd) -> Self {
        Self::listing(vec![record], vec![fd])
    }
}

/// The record a VMM would write for `fd`, made by hand (for fds common cannot describe).
fn record_by_hand(fd: &OwnedFd, name: &str) -> PreservedFd {
    let st = nix::sys::stat::fstat(fd).unwrap();
    PreservedFd {
        name: name.into(),
        kind: FdKind::GuestRam,
        fd: fd.as_raw_fd(),
        size: st.st_size as u64,
        seals: cpr_common::fds::RAM_SEALS,
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

/// Runs every case, then fails naming each case that failed (their panics are printed as they
/// happen), so that one broken case does not hide the others.
fn run_cases<T>(cases: Vec<(&str, T)>, mut run: impl FnMut(usize, &str, T)) {
    let mut failed = Vec::new();
    for (i, (what, case)) in cases.into_iter().enumerate() {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(i, what, case)));
        if outcome.is_err() {
            failed.push(format!("case {i} ({what})"));
        }
    }
    assert!(failed.is_empty(), "failed: {}", failed.join(", "));
}

/// Sends `hello` from a fake old side to a fresh new side, then expects the new side to
/// answer with an ERROR frame naming the problem and to exit with status 1 saying the same.
fn bad_hello_case(dir: &TempDir, case: usize, what: &str, hello: FakeHello, needles: &[&str]) {
    eprintln!("case {case}: {what}");
    let target = waiting_target(dir, &format!("h{case}"));
    let stream = connect_within(&target.cpr_path, LONG).unwrap();
    if !hello.bytes.is_empty() {
        let raw: Vec<i32> = hello.fds.iter().map(|f| f.as_raw_fd()).collect();
        send_with_fds(&stream, &hello.bytes, &raw).unwrap();
    }
    drop(hello.fds);
    stream.shutdown(Shutdown::Write).unwrap();
    let answer =
        read_until_closed(&stream, LONG).unwrap_or_else(|e| panic!("case {case} ({what}): {e}"));
    let stderr = assert_new_side_exits(&target, needles);
    match decode_error_frame(&answer) {
        Ok(Some(message)) => {
            for needle in needles {
                assert!(
                    message.contains(needle),
                    "case {case} ({what}): the ERROR frame should mention {needle:?}: {message:?}"
                );
            }
        }
        other => panic!(
            "case {case} ({what}): the new VMM should answer with an ERROR frame, got {other:?}\n{stderr}"
        ),
    }
    assert!(
        !target.qmp_path.exists() && !target.cpr_path.exists(),
        "case {case} ({what}): socket files left behind"
    );
}

#[test]
fn malformed_cpr_messages_make_the_new_side_exit_with_a_clear_error() {
    let dir = TempDir::new("xhello").unwrap();
    let hello = frame_bytes(Kind::Hello, &hello_payload(vec![]));
    let mut bad_crc = hello.clone();
    *bad_crc.last_mut().unwrap() ^= 1;
    let mut oversized = hello.clone();
    oversized[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    let mut version = hello.clone();
    version[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
    let mut kind = hello.clone();
    kind[6..8].copy_from_slice(&77u16.to_le_bytes());
    let mut truncated = frame_bytes(Kind::Hello, &[7u8; 100]);
    truncated.truncate(HEADER_LEN + 10);
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "garbage",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            vec!["bad magic"],
        ),
        ("a truncated header", hello[..10].to_vec(), vec!["10 bytes"]),
        (
            "a truncated payload",
            truncated,
            vec!["closed inside a 100-byte payload"],
        ),
        (
            "an oversized length",
            oversized[..HEADER_LEN].to_vec(),
            vec!["limit"],
        ),
        ("a bad checksum", bad_crc, vec!["checksum"]),
        ("another protocol version", version, vec!["version"]),
        ("an unknown kind", kind, vec!["kind 77"]),
        (
            "READY instead of HELLO",
            frame_bytes(Kind::Ready, b""),
            vec!["Hello", "Ready"],
        ),
        (
            "a HELLO payload that is not a HELLO",
            frame_bytes(Kind::Hello, &[0xff; 12]),
            vec!["HELLO"],
        ),
        (
            "ERROR instead of HELLO",
            frame_bytes(Kind::Error, b"the old side gave up"),
            vec!["the old side gave up"],
        ),
    ];
    let cases = cases.into_iter().map(|(w, b, n)| (w, (b, n))).collect();
    run_cases(cases, |i, what, (bytes, needles)| {
        bad_hello_case(&dir, i, what, FakeHello::raw(bytes), &needles)
    });
}

#[test]
fn a_peer_that_closes_at_once_makes_the_new_side_exit() {
    let dir = TempDir::new("xhclose").unwrap();
    let target = waiting_target(&dir, "h");
    let stream = connect_within(&target.cpr_path, LONG).unwrap();
    drop(stream);
    assert_new_side_exits(&target, &["incoming cpr-transfer failed", "closed"]);
}

#[test]
fn bad_ram_fds_in_hello_make_the_new_side_exit_with_a_clear_error() {
    let dir = TempDir::new("xfds").unwrap();
    let size = 16u64 << 20;
    let ram = || ram_memfd(LOW_RAM_REGION, size, true).unwrap();
    let mut cases: Vec<(&str, FakeHello, Vec<&str>)> = Vec::new();

    let fd = ram();
    cases.push((
        "a listed region without its fd",
        FakeHello::listing(vec![ram_record(&fd, LOW_RAM_REGION)], vec![]),
        vec!["0 fds for 1 listed"],
    ));
    cases.push((
        "an fd nobody listed",
        FakeHello::listing(vec![], vec![ram()]),
        vec!["1 fds for 0 listed"],
    ));
    let file = tempfile_fd(&dir, size);
    cases.push((
        "a regular file",
        FakeHello::one(record_by_hand(&file, LOW_RAM_REGION), file),
        vec!["not a memfd"],
    ));
    let (pipe, _keep) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    cases.push((
        "a pipe",
        FakeHello::one(record_by_hand(&pipe, LOW_RAM_REGION), pipe),
        vec!["pipe"],
    ));
    let small = ram_memfd(LOW_RAM_REGION, size / 2, true).unwrap();
    let mut lie = ram_record(&small, LOW_RAM_REGION);
    lie.size = size;
    cases.push((
        "a record that says 16 MiB for an 8 MiB memfd",
        FakeHello::one(lie, small),
        vec!["8388608", "16777216"],
    ));
    let unsealed = ram_memfd(LOW_RAM_REGION, size, false).unwrap();
    let mut record = ram_record(&unsealed, LOW_RAM_REGION);
    record.seals = cpr_common::fds::RAM_SEALS;
    cases.push((
        "an unsealed memfd",
        FakeHello::one(record, unsealed),
        vec!["seals"],
    ));
    let other = ram_memfd("something-else", size, true).unwrap();
    let mut record = ram_record(&other, "something-else");
    record.name = LOW_RAM_REGION.into();
    cases.push((
        "a memfd of another name",
        FakeHello::one(record, other),
        vec!["something-else"],
    ));
    let fd = ram();
    let mut record = ram_record(&fd, LOW_RAM_REGION);
    record.ino += 1;
    cases.push((
        "a record of another inode",
        FakeHello::one(record, fd),
        vec!["swapped"],
    ));
    // Well-formed, but not what this VMM's -m 16M needs.
    let small = ram_memfd(LOW_RAM_REGION, size / 2, true).unwrap();
    cases.push((
        "an 8 MiB region for -m 16M",
        FakeHello::one(ram_record(&small, LOW_RAM_REGION), small),
        vec![LOW_RAM_REGION, "8388608"],
    ));
    let high = ram_memfd("guest-ram-high", size, true).unwrap();
    cases.push((
        "no low RAM region",
        FakeHello::one(ram_record(&high, "guest-ram-high"), high),
        vec![LOW_RAM_REGION],
    ));
    let cases = cases.into_iter().map(|(w, h, n)| (w, (h, n))).collect();
    run_cases(cases, |i, what, (hello, needles)| {
        bad_hello_case(&dir, i, what, hello, &needles)
    });
}

/// A regular file of `size` bytes.
fn tempfile_fd(dir: &TempDir, size: u64) -> OwnedFd {
    let path = dir.join("regular-file");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(size).unwrap();
    OwnedFd::from(file)
}

/// A fake old side gives a valid HELLO, so the new VMM builds the VM and says READY; then it
/// misbehaves on the main channel. The new VMM must exit with status 1 saying why, and answer
/// with ERROR where the connection still allows it.
#[test]
fn the_new_side_exits_when_the_old_side_sends_a_bad_state_or_vanishes() {
    let dir = TempDir::new("xstate").unwrap();
    let stop_ns = 1u64.to_le_bytes();
    let mut garbage_state = stop_ns.to_vec();
    garbage_state.extend_from_slice(b"this is not a state file");
    /// What the fake old side does after READY: bytes to send (None: close) and needles.
    type Case<'a> = (&'a str, Option<Vec<u8>>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        ("closes the main channel", None, vec!["closed"]),
        (
            "a STATE that is not a state file",
            Some(frame_bytes(Kind::State, &garbage_state)),
            vec!["cpr-transfer"],
        ),
        (
            "a STATE too short for its header",
            Some(frame_bytes(Kind::State, b"1234")),
            vec!["STATE"],
        ),
        (
            "COMMIT instead of STATE",
            Some(frame_bytes(Kind::Commit, b"")),
            vec!["expected STATE", "Commit"],
        ),
        (
            "ERROR instead of STATE",
            Some(frame_bytes(Kind::Error, b"old side: disk on fire")),
            vec!["disk on fire"],
        ),
        (
            "garbage",
            Some(b"\x00\x01garbage garbage garbage".to_vec()),
            vec!["bad magic"],
        ),
    ];
    let cases = cases.into_iter().map(|(w, b, n)| (w, (b, n))).collect();
    run_cases(cases, |i, what, (bytes, needles)| {
        eprintln!("case {i}: {what}");
        let target = waiting_target(&dir, &format!("s{i}"));
        let cpr = connect_within(&target.cpr_path, LONG).unwrap();
        let ram = ram_memfd(LOW_RAM_REGION, 16 << 20, true).unwrap();
        cpr_common::transfer::send(
            &cpr,
            Kind::Hello,
            &hello_payload(vec![ram_record(&ram, LOW_RAM_REGION)]),
            &[ram.as_raw_fd()],
        )
        .unwrap();
        // The new VMM closes the CPR channel once it listens on the main one.
        let answer = read_until_closed(&cpr, LONG).unwrap();
        assert!(answer.is_empty(), "case {i}: {answer:02x?}");
        let mut qmp = target.connect_qmp(LONG).unwrap();
        assert_eq!(status(&mut qmp), "inmigrate", "case {i}");
        let main = connect_within(&target.main_path, LONG).unwrap();
        expect_frame(&main, Kind::Ready, LONG).unwrap();
        match &bytes {
            Some(b) => {
                (&main).write_all(b).unwrap();
                main.shutdown(Shutdown::Write).unwrap();
            }
            None => main.shutdown(Shutdown::Both).unwrap(),
        }
        let answer = read_until_closed(&main, LONG).unwrap();
        let mut all = vec!["incoming cpr-transfer failed"];
        all.extend(&needles);
        assert_new_side_exits(&target, &all);
        if bytes.is_some() && !what.starts_with("ERROR") {
            match decode_error_frame(&answer) {
                Ok(Some(message)) => {
                    for needle in &needles {
                        assert!(message.contains(needle), "case {i}: {message:?}");
                    }
                }
                other => panic!("case {i} ({what}): expected an ERROR frame, got {other:?}"),
            }
        }
        drop(ram);
    });
}

// ---------------------------------------------------------------------------
// peers of another UID

/// A process of another UID connecting to the CPR channel is turned away with an ERROR; the
/// new VMM goes on waiting (no monitor yet) and then takes the real old VMM's guest.
#[test]
fn a_peer_with_another_uid_is_refused_and_the_new_side_keeps_waiting() {
    if !require_root(
        "a_peer_with_another_uid_is_refused_and_the_new_side_keeps_waiting",
        "switching to another UID",
    ) {
        return;
    }
    let dir = TempDir::new("xuid").unwrap();
    let mut old = Vm::boot_heartbeat(&dir, 2);
    let target = Target::start(
        dir.path(),
        "n1",
        &old.args,
        MainChannel::Unix,
        CprSpelling::KeyValue,
        LONG,
    )
    .unwrap();
    // connect(2) needs write permission on the socket file.
    std::fs::set_permissions(&target.cpr_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    for attempt in 0..2 {
        let answer = connect_as(&target.cpr_path, OTHER_UID, OTHER_UID, LONG)
            .unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
        match decode_error_frame(&answer) {
            Ok(Some(message)) => {
                assert!(message.contains(&OTHER_UID.to_string()), "{message}");
                assert!(message.contains("not allowed"), "{message}");
            }
            other => panic!("attempt {attempt}: expected an ERROR frame, got {other:?}"),
        }
        assert!(target.vmm.is_running(), "{}", target.vmm.stderr_text());
        assert!(
            !target.qmp_path.exists(),
            "the new VMM started its monitor for a refused peer"
        );
        assert!(target.cpr_path.exists(), "the new VMM stopped listening");
    }
    let _ = old.qmp.events();
    migrate_cpr_transfer(&mut old.qmp, &target.main_path, &target.cpr_path).unwrap();
    let mut qmp = target.connect_qmp(LONG).unwrap();
    let events = collect_events_until(&mut old.qmp, LONG, is_migration_end).unwrap();
    assert_eq!(summarize(&events), old_side_events(true, true, "completed"));
    check_new_side_info(&query_migrate(&mut qmp));
    let old_out = old.quit();
    assert_ticks_continue(&old_out, &target.vmm, 2, 10);
}

/// The old VMM does not hand its RAM to a new side listening as another UID.
#[test]
fn the_old_side_refuses_a_new_side_of_another_uid() {
    if !require_root(
        "the_old_side_refuses_a_new_side_of_another_uid",
        "switching to another UID",
    ) {
        return;
    }
    let dir = TempDir::new("xuid2").unwrap();
    let mut old = Vm::boot_heartbeat(&dir, 1);
    let (cpr, main) = (dir.join("f.cpr"), dir.join("f.main"));
    let foreign = ForeignListener::start(&cpr, OTHER_UID, OTHER_UID).unwrap();
    let _ = old.qmp.events();
    match migrate_cpr_transfer(&mut old.qmp, &main, &cpr) {
        Err(QmpError::Command { desc, .. }) => {
            assert!(desc.contains(&OTHER_UID.to_string()), "{desc}");
            assert!(desc.contains("not allowed"), "{desc}");
        }
        other => panic!("migrate to a new side of another UID: {other:?}"),
    }
    assert_old_side_failed(&mut old, false, &["not allowed"]);
    drop(foreign);
    assert_ticks_whole(&old, 1, 10);
}

// ---------------------------------------------------------------------------
// QMP arguments

#[test]
fn migrate_arguments_that_cannot_do_a_cpr_transfer_are_refused() {
    let dir = TempDir::new("xargs").unwrap();
    let mut vm = Vm::boot_heartbeat(&dir, 1);
    set_cpr_transfer_mode(&mut vm.qmp).unwrap();
    let params = vm
        .qmp
        .execute("query-migrate-parameters", Value::Null)
        .unwrap();
    assert_eq!(params["mode"], "cpr-transfer", "{params}");
    let (main, cpr) = (dir.join("x.main"), dir.join("x.cpr"));
    let file =
        json!({"transport": "file", "filename": dir.join("f").display().to_string(), "offset": 0});
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "a unix: URI alone",
            json!({"uri": format!("unix:{}", main.display())}),
            vec!["missing 'cpr' migration channel"],
        ),
        (
            "only a main channel",
            json!({"channels": [unix_channel("main", &main)]}),
            vec!["missing 'cpr' migration channel"],
        ),
        (
            "a file: URI",
            json!({"uri": format!("file:{}", dir.join("f").display())}),
            vec!["unix"],
        ),
        (
            "a file main channel",
            json!({"channels": [{"channel-type": "main", "addr": file}, unix_channel("cpr", &cpr)]}),
            vec!["unix"],
        ),
        (
            "a file cpr channel",
            json!({"channels": [unix_channel("main", &main), {"channel-type": "cpr", "addr": file}]}),
            vec!["'cpr'", "unix"],
        ),
    ];
    let _ = vm.qmp.events();
    for (what, args, needles) in cases {
        match vm.qmp.execute("migrate", args) {
            Err(QmpError::Command { class, desc, .. }) => {
                assert_eq!(class, "GenericError", "{what}");
                for needle in needles {
                    assert!(
                        desc.contains(needle),
                        "{what}: {desc:?} should mention {needle:?}"
                    );
                }
            }
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(vm.status(), "running", "{what}");
    }
    let events = vm.qmp.events();
    assert!(events.iter().all(|e| e["event"] != "STOP"), "{events:?}");
    // A CPR channel nobody listens on fails the migration at once, naming the path.
    match migrate_cpr_transfer(&mut vm.qmp, &main, &cpr) {
        Err(QmpError::Command { desc, .. }) => assert!(desc.contains("x.cpr"), "{desc}"),
        other => panic!("migrate to a CPR channel nobody listens on: {other:?}"),
    }
    assert_old_side_failed(&mut vm, false, &["x.cpr"]);
    assert!(!dir.join("f").exists(), "a file was written");
    assert_ticks_whole(&vm, 1, 10);
}
