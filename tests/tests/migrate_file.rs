//! End-to-end tests of whole-machine save and restore (issue 3): `migrate` to a
//! `file:` URI (QMP and HMP), restore with `-incoming file:PATH` and
//! `-incoming defer` + `migrate-incoming`, `query-migrate` and `MIGRATION`
//! events, the state file's protection against corruption, truncation and
//! being restored into a different machine, and saves that fail (ENOSPC, an
//! unwritable path) without harming the guest.
//!
//! Continuity is checked through the guests themselves: the heartbeat guest's
//! tick numbers must continue exactly where the saved process left them, on
//! every vCPU, and the memcheck guest's memory must stay consistent.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cpr_tests::heartbeat::TickCounter;
use cpr_tests::memcheck::{PAGE_SIZE, stop_and_check_sampled};
use cpr_tests::*;
use serde_json::{Value, json};

/// Generous limit for anything the guest or the VMM has to do.
const LONG: Duration = Duration::from_secs(60);
const HEARTBEAT: &str = "heartbeat,hz=100";

// ---------------------------------------------------------------------------
// helpers

/// A VM's command line: everything but `-qmp` and `-incoming`.
#[derive(Clone)]
struct Machine {
    args: Vec<String>,
}

impl Machine {
    fn heartbeat(cpus: u32) -> Self {
        Self::new(&["-m", "16M", "-smp", &cpus.to_string(), "--guest", HEARTBEAT])
    }

    fn memcheck(mem: &str) -> Self {
        Self::new(&["-m", mem, "--guest", "memcheck"])
    }

    fn new(args: &[&str]) -> Self {
        Machine {
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Starts the VM with a QMP socket `name.sock` in `dir` and `extra` args.
    fn start(&self, dir: &TempDir, name: &str, extra: &[&str]) -> (VmmProcess, PathBuf) {
        let socket = dir.join(format!("{name}.sock"));
        let mut args = self.args.clone();
        args.push("-qmp".into());
        args.push(qmp_socket_arg(&socket));
        args.extend(extra.iter().map(|s| s.to_string()));
        (VmmProcess::start_vmm(&args), socket)
    }

    /// Starts the VM restoring from `state`.
    fn restore(&self, dir: &TempDir, name: &str, state: &Path) -> (VmmProcess, PathBuf) {
        self.start(dir, name, &["-incoming", &file_uri(state)])
    }
}

fn file_uri(path: &Path) -> String {
    format!("file:{}", path.display())
}

fn connect(socket: &Path) -> QmpClient {
    QmpClient::connect_and_negotiate(socket, LONG).expect("QMP connection")
}

fn status(qmp: &mut QmpClient) -> String {
    let reply = qmp.execute("query-status", Value::Null).unwrap();
    reply["status"].as_str().unwrap().to_string()
}

/// Waits for the next `MIGRATION` event and returns its status.
fn next_migration_status(qmp: &mut QmpClient) -> String {
    let event = qmp.wait_event("MIGRATION", LONG).unwrap();
    event_timestamp(&event);
    event["data"]["status"].as_str().unwrap().to_string()
}

/// Waits until the migration ended; returns every status its events reported.
fn wait_migration_end(qmp: &mut QmpClient) -> Vec<String> {
    let mut statuses = Vec::new();
    loop {
        let status = next_migration_status(qmp);
        let end = status == "completed" || status == "failed" || status == "cancelled";
        statuses.push(status);
        if end {
            return statuses;
        }
    }
}

/// `migrate` to `path` and wait for it to complete.
fn migrate_to(qmp: &mut QmpClient, path: &Path) {
    let reply = qmp
        .execute("migrate", json!({"uri": file_uri(path)}))
        .unwrap();
    assert_eq!(reply, json!({}));
    let statuses = wait_migration_end(qmp);
    let info = qmp.execute("query-migrate", Value::Null).unwrap();
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("completed"),
        "migration to {} ended with {statuses:?}: {info}",
        path.display()
    );
}

/// Quits the VMM through QMP and returns everything it printed.
fn quit(vmm: &VmmProcess, qmp: &mut QmpClient) -> String {
    qmp.execute("quit", Value::Null).unwrap();
    let status = vmm.wait_exit(LONG).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vmm.stderr_text());
    vmm.stdout_text()
}

/// Waits until the restored process printed `more` ticks on every vCPU, then
/// checks that the numbering continued exactly: the first tick after the old
/// process's last is that tick + 1, on every vCPU, and no vCPU restarted.
fn assert_ticks_continue(old_out: &str, new: &VmmProcess, cpus: u32, more: usize) {
    let new_out = assert_ticks_go_on(
        old_out,
        new,
        cpus,
        more,
        LONG,
        "the save",
        "the restored guest's first tick must follow the saved one",
    );
    let log = parse_heartbeats(&new_out);
    assert!(log.started.is_empty(), "the guest rebooted:\n{new_out}");
    assert!(
        parse_heartbeats(&format!("{old_out}{new_out}"))
            .malformed
            .is_empty(),
        "garbled output:\n{new_out}"
    );
}

/// A "nothing may happen" window: three times what 20 ticks took on vCPU 0
/// of `vmm`, at least 1 s.
fn quiet_window(vmm: &VmmProcess) -> Duration {
    let first = vmm.wait_for_tick(0, 1, LONG).unwrap();
    let start = Instant::now();
    vmm.wait_for_tick(0, first + 20, LONG).unwrap();
    (start.elapsed() * 3).clamp(Duration::from_secs(1), Duration::from_secs(15))
}

/// Number of completed sweeps memcheck reported in `text`.
fn sweeps(text: &str) -> usize {
    text.bytes().filter(|&b| b == b'B').count()
}

/// Stops a memcheck VM, dumps its range and checks the dump; also checks that
/// the last page holds the number of sweeps the console reported (`total`
/// computes that from the VMM's stdout so far).
fn stop_and_check_memcheck(
    vmm: &VmmProcess,
    qmp: &mut QmpClient,
    ram: u64,
    dump: &Path,
    total: impl Fn(&str) -> usize,
) -> Vec<u8> {
    qmp.execute("stop", Value::Null).unwrap();
    let bytes = dump_memcheck_range(qmp, ram, dump).unwrap();
    check_memcheck_dump(&bytes).unwrap();
    let last = bytes[bytes.len() - PAGE_SIZE];
    vmm.wait_for_output(
        |text| {
            let n = (total(text) % 256) as u8;
            last == n || last == n.wrapping_add(1)
        },
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("RAM says {last} sweeps (mod 256), the console disagrees: {e}"));
    bytes
}

/// Files in `dir`, sorted.
fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Runs `vmm args` expecting a start-up failure: status 1, nothing on stdout,
/// one line on stderr starting with `vmm: ` and containing every needle.
/// Returns the line.
fn assert_restore_fails(args: &[String], needles: &[&str]) -> String {
    let vmm = VmmProcess::start_vmm(args);
    let status = vmm.wait_exit(LONG).unwrap();
    let stderr = vmm.stderr_text();
    assert_eq!(
        status.code(),
        Some(1),
        "vmm {args:?} should fail with status 1, got {status}; stderr:\n{stderr}\nstdout:\n{}",
        vmm.stdout_text()
    );
    assert_eq!(
        vmm.stdout_text(),
        "",
        "vmm {args:?}: nothing of a rejected state may run"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "vmm {args:?}: one line expected:\n{stderr}");
    assert!(lines[0].starts_with("vmm: "), "{stderr}");
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "vmm {args:?}: the error should mention {needle:?}: {stderr}"
        );
    }
    lines[0].to_string()
}

/// Saves a running 2-vCPU heartbeat VM to `dir/state` and quits it.
/// Returns the machine, the state file and the old process's output.
fn saved_heartbeat(dir: &TempDir, cpus: u32) -> (Machine, PathBuf, String) {
    let machine = Machine::heartbeat(cpus);
    let (vmm, socket) = machine.start(dir, "old", &[]);
    vmm.wait_for_all_ticks(cpus, 5, LONG).unwrap();
    let mut qmp = connect(&socket);
    let state = dir.join("state");
    migrate_to(&mut qmp, &state);
    assert_eq!(status(&mut qmp), "postmigrate");
    let out = quit(&vmm, &mut qmp);
    (machine, state, out)
}

// ---------------------------------------------------------------------------
// the state file format (see vmm/src/migration/format.rs, common/src/container.rs)

const FOOTER_LEN: usize = 32;
const ENTRY_LEN: usize = 32;
const HEADER_LEN: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Section {
    id: u32,
    offset: usize,
    length: usize,
}

fn section_name(id: u32) -> &'static str {
    match id {
        1 => "run",
        2 => "description",
        3 => "vcpus",
        4 => "vm",
        5 => "devices",
        6 => "ram",
        _ => "?",
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Parses the footer and section table; returns the table offset and sections.
fn parse_sections(file: &[u8]) -> (usize, Vec<Section>) {
    assert_eq!(&file[..8], b"CPRVMMST");
    let footer = &file[file.len() - FOOTER_LEN..];
    assert_eq!(&footer[24..32], b"CPRVMEND");
    let table_off = le_u64(&footer[0..8]) as usize;
    let count = le_u32(&footer[8..12]) as usize;
    assert_eq!(le_u64(&footer[16..24]) as usize, file.len());
    assert_eq!(table_off + count * ENTRY_LEN, file.len() - FOOTER_LEN);
    let sections = file[table_off..table_off + count * ENTRY_LEN]
        .chunks_exact(ENTRY_LEN)
        .map(|e| Section {
            id: le_u32(&e[0..4]),
            offset: le_u64(&e[8..16]) as usize,
            length: le_u64(&e[16..24]) as usize,
        })
        .collect();
    (table_off, sections)
}

// ---------------------------------------------------------------------------
// heartbeat: save and restore continue the ticks

fn heartbeat_continues_after_restore(cpus: u32) {
    let dir = TempDir::new("mighb").unwrap();
    let machine = Machine::heartbeat(cpus);
    let (old, socket) = machine.start(&dir, "old", &[]);
    old.wait_for_all_ticks(cpus, 5, LONG).unwrap();
    let mut qmp = connect(&socket);
    let state = dir.join("state");
    migrate_to(&mut qmp, &state);
    qmp.wait_event("STOP", LONG).unwrap();
    assert_eq!(status(&mut qmp), "postmigrate");
    assert_eq!(
        qmp.hmp("info status").unwrap(),
        "VM status: paused (postmigrate)\r\n"
    );
    // The file is private and complete: mode 0600, no temporary left over.
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600, "state file mode {mode:o}");
    assert_eq!(list_dir(dir.path()), ["old.sock", "state"]);
    let old_out = quit(&old, &mut qmp);

    let (new, socket) = machine.restore(&dir, "new", &state);
    assert_ticks_continue(&old_out, &new, cpus, 20);
    let mut qmp = connect(&socket);
    assert_eq!(status(&mut qmp), "running");
    // Still going, and the restored guest can be saved and restored again.
    let again = dir.join("state2");
    migrate_to(&mut qmp, &again);
    let new_out = quit(&new, &mut qmp);
    let (third, _socket) = machine.restore(&dir, "third", &again);
    assert_ticks_continue(&format!("{old_out}{new_out}"), &third, cpus, 10);
}

#[test]
fn heartbeat_one_vcpu_continues_after_save_and_restore() {
    heartbeat_continues_after_restore(1);
}

#[test]
fn heartbeat_two_vcpus_continue_after_save_and_restore() {
    heartbeat_continues_after_restore(2);
}

/// Many save/restore hops in a row: whatever instant each save hits (in
/// `hlt`, in a timer interrupt, half-way through printing a line), the
/// console and the tick numbering carry on exactly.
#[test]
fn heartbeat_survives_many_save_restore_hops() {
    let dir = TempDir::new("mighops").unwrap();
    let cpus = 2;
    let machine = Machine::heartbeat(cpus);
    let (mut vmm, mut socket) = machine.start(&dir, "hop0", &[]);
    vmm.wait_for_all_ticks(cpus, 3, LONG).unwrap();
    let mut history = String::new();
    for hop in 1..=16 {
        let mut qmp = connect(&socket);
        let state = dir.join(format!("state{hop}"));
        migrate_to(&mut qmp, &state);
        history.push_str(&quit(&vmm, &mut qmp));
        drop(qmp);
        let (next, next_socket) = machine.restore(&dir, &format!("hop{hop}"), &state);
        assert_ticks_continue(&history, &next, cpus, 3);
        (vmm, socket) = (next, next_socket);
    }
    let log = parse_heartbeats(&format!("{history}{}", vmm.stdout_text()));
    assert_eq!(log.started.len(), cpus as usize, "{:?}", log.started);
    for cpu in 0..cpus {
        assert_eq!(log.ticks[&cpu][0], 1);
        assert!(log.ticks[&cpu].len() >= 3 + 16 * 3, "{:?}", log.ticks[&cpu]);
    }
}

// ---------------------------------------------------------------------------
// memcheck

#[test]
fn memcheck_memory_is_consistent_after_restore_and_more_sweeps() {
    let dir = TempDir::new("migmem").unwrap();
    let ram: u64 = 64 << 20;
    let machine = Machine::memcheck("64M");
    let (old, socket) = machine.start(&dir, "old", &[]);
    old.wait_for_output(|text| sweeps(text) >= 2, LONG).unwrap();
    let mut qmp = connect(&socket);
    let state = dir.join("state");
    migrate_to(&mut qmp, &state);
    let old_out = quit(&old, &mut qmp);
    assert!(old_out.starts_with('A'), "{old_out}");
    let old_sweeps = sweeps(&old_out);

    let (new, socket) = machine.restore(&dir, "new", &state);
    new.wait_for_output(|text| sweeps(text) >= 3, LONG).unwrap();
    let mut qmp = connect(&socket);
    stop_and_check_memcheck(&new, &mut qmp, ram, &dir.join("dump"), |text| {
        old_sweeps + sweeps(text)
    });
    assert!(
        !new.stdout_text().contains('A'),
        "memcheck restarted after the restore"
    );
}

/// RAM above 4 GiB, which migration to a file copies region by region: a 5 GiB memcheck guest
/// sweeping one page every 16 MiB of all RAM is consistent in the old VMM after the save and in
/// the restored one after more sweeps, whose every sample moved on by the same count but for
/// the sweep in progress.
#[test]
fn memcheck_sampled_across_5_gib_is_consistent_after_save_and_restore() {
    const RAM: u64 = 5 << 30;
    let dir = TempDir::new("migmem5g").unwrap();
    let machine = Machine::new(&["-m", "5G", "--guest", "memcheck,sweep=sampled"]);
    let (old, socket) = machine.start(&dir, "old", &[]);
    old.wait_for_output(|text| sweeps(text) >= 3, LONG).unwrap();
    let mut qmp = connect(&socket);
    let state = dir.join("state");
    migrate_to(&mut qmp, &state);
    // The old VMM is stopped now, its RAM as it was saved.
    let saved = stop_and_check_sampled(&mut qmp, old.pid(), RAM)
        .unwrap_or_else(|e| panic!("in the old VMM after the save: {e}"));
    quit(&old, &mut qmp);

    let (new, socket) = machine.restore(&dir, "new", &state);
    new.wait_for_output(|text| sweeps(text) >= 2, LONG).unwrap();
    let mut qmp = connect(&socket);
    let restored = stop_and_check_sampled(&mut qmp, new.pid(), RAM)
        .unwrap_or_else(|e| panic!("in the restored VMM: {e}"));
    // Each sample went up by the restored VMM's sweeps (n, or n + 1 for the pages the sweep in
    // progress already passed): a region restored wrong or not at all shows here.
    let steps: std::collections::BTreeSet<u8> = saved
        .iter()
        .zip(&restored)
        .map(|(a, b)| b.wrapping_sub(*a))
        .collect();
    let even = match steps.iter().copied().collect::<Vec<_>>()[..] {
        [_] => true,
        [a, b] => b == a.wrapping_add(1) || a == b.wrapping_add(1),
        _ => false,
    };
    assert!(
        even,
        "samples moved on by different counts across the restore: {steps:?}"
    );
    assert!(
        !new.stdout_text().contains('A'),
        "memcheck restarted after the restore"
    );
}

/// Saving a paused VM and restoring it gives byte-identical guest memory.
#[test]
fn memcheck_memory_is_identical_after_a_paused_save_and_restore() {
    let dir = TempDir::new("migmemeq").unwrap();
    let ram: u64 = 32 << 20;
    let machine = Machine::memcheck("32M");
    let (old, socket) = machine.start(&dir, "old", &[]);
    old.wait_for_output(|text| sweeps(text) >= 2, LONG).unwrap();
    let mut qmp = connect(&socket);
    let before = stop_and_check_memcheck(&old, &mut qmp, ram, &dir.join("dump1"), sweeps);
    let state = dir.join("state");
    migrate_to(&mut qmp, &state);
    let old_out = quit(&old, &mut qmp);

    let (new, socket) = machine.restore(&dir, "new", &state);
    let mut qmp = connect(&socket);
    assert_eq!(status(&mut qmp), "paused");
    let after = dump_memcheck_range(&mut qmp, ram, &dir.join("dump2")).unwrap();
    assert!(before == after, "guest RAM differs after the restore");
    // The guest's low memory (page tables, code, stacks) came back too.
    let low = qmp.pmemsave(0, 1 << 20, &dir.join("low")).unwrap();
    assert!(low.iter().any(|&b| b != 0), "low memory is empty");
    qmp.execute("cont", Value::Null).unwrap();
    new.wait_for_output(|text| sweeps(text) >= 2, LONG).unwrap();
    let old_sweeps = sweeps(&old_out);
    stop_and_check_memcheck(&new, &mut qmp, ram, &dir.join("dump3"), |text| {
        old_sweeps + sweeps(text)
    });
}

// ---------------------------------------------------------------------------
// paused save, -incoming defer, HMP

#[test]
fn a_vm_saved_while_paused_restores_paused() {
    let dir = TempDir::new("migpause").unwrap();
    let cpus = 2;
    let machine = Machine::heartbeat(cpus);
    let (old, socket) = machine.start(&dir, "old", &[]);
    old.wait_for_all_ticks(cpus, 5, LONG).unwrap();
    let window = quiet_window(&old);
    let mut qmp = connect(&socket);
    qmp.execute("stop", Value::Null).unwrap();
    qmp.wait_event("STOP", LONG).unwrap();
    let saved = read_tick_counters(&mut qmp, cpus, &dir.join("c1")).unwrap();
    let state = dir.join("state");
    migrate_to(&mut qmp, &state);
    // Saving a paused VM sends no second STOP.
    let events = qmp.events();
    assert!(
        events
            .iter()
            .all(|e| e["event"] != "STOP" && e["event"] != "RESUME"),
        "{events:?}"
    );
    let old_out = quit(&old, &mut qmp);

    let (new, socket) = machine.restore(&dir, "new", &state);
    let mut qmp = connect(&socket);
    assert_eq!(status(&mut qmp), "paused");
    assert_eq!(qmp.hmp("info status").unwrap(), "VM status: paused\r\n");
    let restored: Vec<TickCounter> = read_tick_counters(&mut qmp, cpus, &dir.join("c2")).unwrap();
    assert_eq!(saved, restored, "the tick counters in RAM changed");
    // Nothing runs until `cont`.
    let started = Instant::now();
    let printed = wait_until(window, || !new.stdout_text().is_empty());
    assert!(
        !printed,
        "the paused restored guest printed after {:?}:\n{}",
        started.elapsed(),
        new.stdout_text()
    );
    assert_eq!(
        read_tick_counters(&mut qmp, cpus, &dir.join("c3")).unwrap(),
        saved
    );
    assert_eq!(status(&mut qmp), "paused");
    qmp.execute("cont", Value::Null).unwrap();
    qmp.wait_event("RESUME", LONG).unwrap();
    assert_eq!(status(&mut qmp), "running");
    assert_ticks_continue(&old_out, &new, cpus, 10);
}

#[test]
fn incoming_defer_waits_for_migrate_incoming() {
    let dir = TempDir::new("migdefer").unwrap();
    let machine = Machine::heartbeat(2);
    let (old, socket) = machine.start(&dir, "old", &[]);
    old.wait_for_all_ticks(2, 5, LONG).unwrap();
    let mut qmp = connect(&socket);
    // Without -incoming defer, migrate-incoming is refused.
    let state = dir.join("state");
    match qmp.execute("migrate-incoming", json!({"uri": file_uri(&state)})) {
        Err(QmpError::Command { class, desc, .. }) => {
            assert_eq!(class, "GenericError");
            assert!(desc.contains("-incoming"), "{desc}");
        }
        other => panic!("migrate-incoming without -incoming defer: {other:?}"),
    }
    assert_eq!(status(&mut qmp), "running");
    migrate_to(&mut qmp, &state);
    let old_out = quit(&old, &mut qmp);

    let (new, socket) = machine.start(&dir, "new", &["-incoming", "defer"]);
    let mut qmp = connect(&socket);
    let reply = qmp.execute("query-status", Value::Null).unwrap();
    assert_eq!(reply["status"], "inmigrate", "{reply}");
    assert_eq!(reply["running"], false, "{reply}");
    // A failed migrate-incoming leaves it waiting, with nothing running.
    let missing = dir.join("no-such-state");
    match qmp.execute("migrate-incoming", json!({"uri": file_uri(&missing)})) {
        Err(QmpError::Command { desc, .. }) => {
            assert!(desc.contains("no-such-state"), "{desc}");
        }
        other => panic!("migrate-incoming from a missing file: {other:?}"),
    }
    assert_eq!(status(&mut qmp), "inmigrate");
    assert_eq!(new.stdout_text(), "");

    assert_eq!(
        qmp.execute("migrate-incoming", json!({"uri": file_uri(&state)}))
            .unwrap(),
        json!({})
    );
    qmp.wait_event("RESUME", LONG).unwrap();
    assert_eq!(status(&mut qmp), "running");
    assert_ticks_continue(&old_out, &new, 2, 10);
    // Only once.
    assert!(
        qmp.execute("migrate-incoming", json!({"uri": file_uri(&state)}))
            .is_err()
    );
    assert_eq!(status(&mut qmp), "running");
}

/// `stop` while waiting in `inmigrate` means "do not start the guest when the
/// incoming migration completes", as in QEMU.
#[test]
fn stop_while_waiting_for_migrate_incoming_restores_paused() {
    let dir = TempDir::new("migdstop").unwrap();
    let (machine, state, old_out) = saved_heartbeat(&dir, 1);
    let (new, socket) = machine.start(&dir, "new", &["-incoming", "defer"]);
    let mut qmp = connect(&socket);
    qmp.execute("stop", Value::Null).unwrap();
    assert_eq!(status(&mut qmp), "inmigrate");
    qmp.execute("migrate-incoming", json!({"uri": file_uri(&state)}))
        .unwrap();
    assert_eq!(status(&mut qmp), "paused");
    qmp.execute("cont", Value::Null).unwrap();
    qmp.wait_event("RESUME", LONG).unwrap();
    assert_ticks_continue(&old_out, &new, 1, 5);
    let events = qmp.events();
    assert!(
        events.iter().all(|e| e["event"] != "RESUME"),
        "the guest was resumed twice: {events:?}"
    );
}

#[test]
fn hmp_migrate_detached_to_a_file_works() {
    let dir = TempDir::new("mighmp").unwrap();
    let machine = Machine::heartbeat(1);
    let (old, socket) = machine.start(&dir, "old", &[]);
    old.wait_for_tick(0, 5, LONG).unwrap();
    let mut qmp = connect(&socket);
    let state = dir.join("state");
    let text = qmp
        .hmp(&format!("migrate -d {}", file_uri(&state)))
        .unwrap();
    assert_eq!(text, "");
    let statuses = wait_migration_end(&mut qmp);
    assert_eq!(statuses.last().unwrap(), "completed", "{statuses:?}");
    assert_eq!(
        qmp.hmp("info status").unwrap(),
        "VM status: paused (postmigrate)\r\n"
    );
    assert!(state.is_file());
    let old_out = quit(&old, &mut qmp);
    let (new, _socket) = machine.restore(&dir, "new", &state);
    assert_ticks_continue(&old_out, &new, 1, 10);
}

// ---------------------------------------------------------------------------
// query-migrate and events

#[test]
fn query_migrate_and_migration_events_report_the_save() {
    let dir = TempDir::new("miginfo").unwrap();
    let machine = Machine::heartbeat(2);
    let (vmm, socket) = machine.start(&dir, "old", &[]);
    vmm.wait_for_all_ticks(2, 3, LONG).unwrap();
    let mut qmp = connect(&socket);
    assert_eq!(
        qmp.execute("query-migrate", Value::Null).unwrap(),
        json!({}),
        "no migration yet"
    );
    let params = qmp
        .execute("query-migrate-parameters", Value::Null)
        .unwrap();
    assert_eq!(params["mode"], "normal", "{params}");
    qmp.execute("migrate-set-parameters", json!({"mode": "normal"}))
        .unwrap();

    let state = dir.join("state");
    qmp.execute("migrate", json!({"uri": file_uri(&state)}))
        .unwrap();
    let mut events = Vec::new();
    loop {
        let event = qmp.wait_event("MIGRATION", LONG).unwrap();
        let status = event["data"]["status"].as_str().unwrap().to_string();
        events.push(event);
        if status == "completed" || status == "failed" {
            break;
        }
    }
    let statuses: Vec<&str> = events
        .iter()
        .map(|e| e["data"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["setup", "active", "completed"]);
    for pair in events.windows(2) {
        assert!(event_timestamp(&pair[0]) <= event_timestamp(&pair[1]));
    }
    let stop = qmp.wait_event("STOP", LONG).unwrap();
    assert!(event_timestamp(&stop) <= event_timestamp(events.last().unwrap()));

    let info = qmp.execute("query-migrate", Value::Null).unwrap();
    assert_eq!(info["status"], "completed", "{info}");
    for field in ["total-time", "downtime", "setup-time"] {
        assert!(info[field].is_u64(), "{field} missing: {info}");
    }
    let total_time = info["total-time"].as_u64().unwrap();
    assert!(info["downtime"].as_u64().unwrap() <= total_time, "{info}");
    assert!(info["setup-time"].as_u64().unwrap() <= total_time, "{info}");
    let ram = &info["ram"];
    let size = std::fs::metadata(&state).unwrap().len();
    assert_eq!(ram["total"], 16 << 20, "{info}");
    assert_eq!(ram["remaining"], 0, "{info}");
    let transferred = ram["transferred"].as_u64().unwrap();
    assert!(
        transferred > 0 && transferred <= size,
        "transferred {transferred}, file {size}: {info}"
    );
    // Zero pages are skipped: this small guest touches few pages.
    assert!(size < 4 << 20, "a 16 MiB heartbeat VM saved {size} bytes");
    assert!(info.get("error-desc").is_none(), "{info}");
    let text = qmp.hmp("info migrate").unwrap();
    assert!(text.contains("completed"), "{text}");
}

/// Checks one `query-migrate` answer taken while a save of a VM with `ram`
/// bytes of RAM may be running; returns (status, transferred, remaining).
fn check_progress(info: &Value, ram: u64) -> (String, u64, u64) {
    let status = info["status"].as_str().unwrap().to_string();
    assert!(
        ["setup", "active", "completed"].contains(&status.as_str()),
        "{info}"
    );
    for field in ["total-time", "setup-time"] {
        assert!(info[field].is_u64(), "{field} missing: {info}");
    }
    let stats = &info["ram"];
    if status == "setup" && stats.is_null() {
        return (status, 0, ram);
    }
    // As in QEMU, `total` is the RAM size from the start, and `remaining`
    // counts down from it: a save that has not copied anything yet must not
    // look finished.
    assert_eq!(stats["total"], ram, "ram.total while {status}: {info}");
    let transferred = stats["transferred"].as_u64().unwrap();
    let remaining = stats["remaining"].as_u64().unwrap();
    assert!(remaining <= ram, "{info}");
    if status == "completed" {
        assert_eq!(remaining, 0, "{info}");
        assert!(transferred > 0, "{info}");
    }
    (status, transferred, remaining)
}

#[test]
fn query_migrate_reports_ram_progress_while_the_save_runs() {
    let dir = TempDir::new("migprog").unwrap();
    // Right after `migrate` returns, many times over (the moment the save
    // thread has not reached RAM yet is the interesting one).
    let machine = Machine::heartbeat(1);
    let (vmm, socket) = machine.start(&dir, "small", &[]);
    vmm.wait_for_tick(0, 2, LONG).unwrap();
    let mut qmp = connect(&socket);
    let state = dir.join("state");
    for round in 0..20 {
        qmp.execute("migrate", json!({"uri": file_uri(&state)}))
            .unwrap();
        let info = qmp.execute("query-migrate", Value::Null).unwrap();
        eprintln!("round {round}: {info}");
        check_progress(&info, 16 << 20);
        let statuses = wait_migration_end(&mut qmp);
        assert_eq!(statuses.last().unwrap(), "completed", "{statuses:?}");
        check_progress(
            &qmp.execute("query-migrate", Value::Null).unwrap(),
            16 << 20,
        );
        // `cont` resumes the source after a completed migration, as in QEMU.
        qmp.execute("cont", Value::Null).unwrap();
        assert_eq!(status(&mut qmp), "running");
    }
    let last = vmm.last_tick(0).unwrap();
    vmm.wait_for_tick(0, last + 5, LONG).unwrap();

    // Throughout a bigger save: progress only moves forward.
    let ram: u64 = 128 << 20;
    let (big, socket) = Machine::memcheck("128M").start(&dir, "big", &[]);
    big.wait_for_output(|text| sweeps(text) >= 1, LONG).unwrap();
    let mut qmp = connect(&socket);
    qmp.execute("migrate", json!({"uri": file_uri(&dir.join("big-state"))}))
        .unwrap();
    let (mut transferred, mut remaining) = (0, ram);
    let mut seen = Vec::new();
    loop {
        let info = qmp.execute("query-migrate", Value::Null).unwrap();
        let (status, t, r) = check_progress(&info, ram);
        assert!(
            t >= transferred && r <= remaining,
            "progress went back: {info}"
        );
        (transferred, remaining) = (t, r);
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if status == "completed" {
            break;
        }
    }
    eprintln!("statuses seen while polling: {seen:?}");
    // ~99 MiB of non-zero pages (the memcheck range) were written.
    assert!(transferred > 98 << 20, "{transferred}");
}

// ---------------------------------------------------------------------------
// corrupted, truncated and mismatched state files

#[test]
fn corrupted_or_truncated_state_files_are_rejected() {
    let dir = TempDir::new("migbad").unwrap();
    let (machine, state, old_out) = saved_heartbeat(&dir, 2);
    let good = std::fs::read(&state).unwrap();
    let (table_off, sections) = parse_sections(&good);
    let ids: Vec<u32> = sections.iter().map(|s| s.id).collect();
    assert_eq!(
        ids,
        [1, 2, 3, 4, 5, 6],
        "sections of a normal-mode state file"
    );
    let bad = dir.join("bad");
    let restore_args = |path: &Path| {
        let mut args = machine.args.clone();
        args.push("-incoming".into());
        args.push(file_uri(path));
        args
    };
    let rejected = |bytes: &[u8], needles: &[&str], what: &str| {
        std::fs::write(&bad, bytes).unwrap();
        let line = assert_restore_fails(&restore_args(&bad), needles);
        eprintln!("{what}: {line}");
    };

    // A flipped byte inside every section: at its start, middle and end.
    // Decoded sections are checksummed before use; RAM is streamed, so a
    // damaged run record may be reported as such before the checksum is.
    for s in &sections {
        assert!(s.length > 0, "{s:?}");
        let name = format!("'{}'", section_name(s.id));
        for at in [s.offset, s.offset + s.length / 2, s.offset + s.length - 1] {
            let mut bytes = good.clone();
            bytes[at] ^= 0x40;
            let needles: &[&str] = if s.id == 6 {
                &["state file"]
            } else {
                &["state file", &name, "checksum"]
            };
            std::fs::write(&bad, &bytes).unwrap();
            let line = assert_restore_fails(&restore_args(&bad), needles);
            if s.id == 6 {
                assert!(line.to_lowercase().contains("ram"), "{line}");
            }
            eprintln!("byte {at} in {name}: {line}");
        }
    }
    // The header: magic, version, flags.
    for (at, needle) in [(0, "magic"), (9, "version"), (12, "checksum")] {
        let mut bytes = good.clone();
        bytes[at] ^= 0x01;
        rejected(
            &bytes,
            &["state file", needle],
            &format!("header byte {at}"),
        );
    }
    // The section table: every field of the first and last entry, and the gap
    // between two sections' entries.
    let table_len = sections.len() * ENTRY_LEN;
    for at in [
        table_off,
        table_off + 8,
        table_off + 16,
        table_off + 24,
        table_off + table_len / 2,
        table_off + table_len - 8,
    ] {
        let mut bytes = good.clone();
        bytes[at] ^= 0x01;
        rejected(&bytes, &["state file"], &format!("table byte {at}"));
    }
    // The footer: table offset, count, checksum, length, end magic.
    for at in [0, 8, 12, 16, 24, 31] {
        let mut bytes = good.clone();
        bytes[good.len() - FOOTER_LEN + at] ^= 0x01;
        rejected(&bytes, &["state file"], &format!("footer byte {at}"));
    }

    // Truncated at several offsets, inside and between every part.
    let mut cuts = vec![
        0,
        1,
        8,
        HEADER_LEN,
        HEADER_LEN + 1,
        table_off,
        table_off + 1,
        good.len() - FOOTER_LEN,
        good.len() - 1,
    ];
    for s in &sections {
        cuts.push(s.offset + s.length / 2);
        cuts.push(s.offset + s.length);
    }
    cuts.sort_unstable();
    cuts.dedup();
    for cut in cuts.into_iter().filter(|&c| c < good.len()) {
        rejected(&good[..cut], &["state file"], &format!("cut at {cut}"));
    }
    // Appended to.
    let mut longer = good.clone();
    longer.extend_from_slice(b"junk");
    rejected(&longer, &["state file"], "appended");
    // Missing.
    assert_restore_fails(&restore_args(&dir.join("missing")), &["missing"]);

    // The pristine file still restores (the rejections were about the damage).
    let (new, _socket) = machine.restore(&dir, "new", &state);
    assert_ticks_continue(&old_out, &new, 2, 5);
}

#[test]
fn restoring_into_a_different_machine_names_the_differences() {
    let dir = TempDir::new("migdiff").unwrap();
    let (machine, state, old_out) = saved_heartbeat(&dir, 2);
    let uri = file_uri(&state);
    let run = |args: &[&str], needles: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(["-incoming".to_string(), uri.clone()]);
        let line = assert_restore_fails(&all, needles);
        eprintln!("{args:?}: {line}");
        line
    };
    // The part of the message about `what`, up to the next difference.
    let about = |line: &str, what: &str| -> String {
        let at = line
            .find(what)
            .unwrap_or_else(|| panic!("no {what:?} in {line}"));
        line[at..].split(';').next().unwrap().to_string()
    };
    let smp = run(&["-m", "16M", "-smp", "1", "--guest", HEARTBEAT], &["-smp"]);
    let part = about(&smp, "vCPU");
    assert!(part.contains('2') && part.contains('1'), "{smp}");
    assert!(!smp.contains("RAM") && !smp.contains("(-m)"), "{smp}");
    let mem = run(&["-m", "32M", "-smp", "2", "--guest", HEARTBEAT], &["(-m)"]);
    let part = about(&mem, "RAM");
    assert!(part.contains("16") && part.contains("32"), "{mem}");
    assert!(!mem.contains("vCPU"), "{mem}");
    let guest = run(&["-m", "16M", "-smp", "2", "--guest", "memcheck"], &[]);
    let part = about(&guest, "guest");
    assert!(
        part.contains("heartbeat") && part.contains("memcheck"),
        "{guest}"
    );
    let all = run(&["-m", "32M", "-smp", "4", "--guest", "memcheck"], &[]);
    assert!(about(&all, "vCPU").contains('4'), "{all}");
    assert!(about(&all, "RAM").contains("32"), "{all}");
    assert!(about(&all, "guest").contains("memcheck"), "{all}");
    // The right command line restores it.
    let (new, _socket) = machine.restore(&dir, "new", &state);
    assert_ticks_continue(&old_out, &new, 2, 5);
}

// ---------------------------------------------------------------------------
// failing saves

/// A small tmpfs mounted for the test, unmounted on drop.
struct SmallTmpfs {
    path: PathBuf,
}

impl SmallTmpfs {
    /// `None` when it cannot be mounted: a failure under CI, a recorded skip elsewhere.
    fn mount(path: PathBuf, size: &str) -> Option<Self> {
        const TEST: &str = "a_save_that_runs_out_of_space_fails_and_the_guest_keeps_running";
        std::fs::create_dir_all(&path).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output();
        match output {
            Ok(o) if o.status.success() => Some(SmallTmpfs { path }),
            Ok(o) => {
                prerequisite_missing(
                    TEST,
                    &format!(
                        "cannot mount a tmpfs at {}: {}",
                        path.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                );
                None
            }
            Err(e) => {
                prerequisite_missing(TEST, &format!("cannot run mount: {e}"));
                None
            }
        }
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Busy (e.g. a VMM still holds a file): detach it instead.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// After a failed `migrate`: the events, `query-migrate` and the VM's state.
fn assert_save_failed(qmp: &mut QmpClient, accepted: bool, needle: &str) -> Value {
    let statuses = wait_migration_end(qmp);
    assert_eq!(statuses.last().unwrap(), "failed", "{statuses:?}");
    if accepted {
        assert_eq!(statuses.first().unwrap(), "setup", "{statuses:?}");
    }
    let info = qmp.execute("query-migrate", Value::Null).unwrap();
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap_or_default();
    assert!(
        desc.contains(needle),
        "error-desc should mention {needle:?}: {info}"
    );
    // The guest was running, so it runs again.
    qmp.wait_event("RESUME", LONG).unwrap();
    assert_eq!(status(qmp), "running");
    info
}

#[test]
fn a_save_that_runs_out_of_space_fails_and_the_guest_keeps_running() {
    let dir = TempDir::new("migenospc").unwrap();
    let Some(small) = SmallTmpfs::mount(dir.join("small"), "512k") else {
        return;
    };
    let ram: u64 = 64 << 20;
    let machine = Machine::memcheck("64M");
    let (vmm, socket) = machine.start(&dir, "vm", &[]);
    // After a sweep every page of the range is non-zero: ~63 MiB to save.
    vmm.wait_for_output(|text| sweeps(text) >= 1, LONG).unwrap();
    let mut qmp = connect(&socket);
    let target = small.path.join("state");
    let accepted = qmp
        .execute("migrate", json!({"uri": file_uri(&target)}))
        .is_ok();
    assert_save_failed(&mut qmp, accepted, "No space left on device");
    assert_eq!(
        list_dir(&small.path),
        Vec::<String>::new(),
        "the failed save left files behind"
    );
    // The guest goes on sweeping, and its memory is intact.
    let before = sweeps(&vmm.stdout_text());
    vmm.wait_for_output(|text| sweeps(text) >= before + 2, LONG)
        .unwrap();
    stop_and_check_memcheck(&vmm, &mut qmp, ram, &dir.join("dump"), sweeps);
    qmp.execute("cont", Value::Null).unwrap();
    assert!(vmm.is_running());
    drop(qmp);
    drop(vmm);
    drop(small);
}

#[test]
fn a_save_to_an_unwritable_path_fails_and_the_guest_keeps_running() {
    let dir = TempDir::new("migunwr").unwrap();
    let machine = Machine::heartbeat(2);
    let (vmm, socket) = machine.start(&dir, "vm", &[]);
    vmm.wait_for_all_ticks(2, 3, LONG).unwrap();
    let mut qmp = connect(&socket);
    let target = dir.join("no-such-dir").join("state");
    let accepted = qmp
        .execute("migrate", json!({"uri": file_uri(&target)}))
        .is_ok();
    assert_save_failed(&mut qmp, accepted, "no-such-dir");
    assert_eq!(list_dir(dir.path()), ["vm.sock"]);
    // A path that is a directory cannot be replaced by the state file.
    let occupied = dir.join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    let accepted = qmp
        .execute("migrate", json!({"uri": file_uri(&occupied)}))
        .is_ok();
    assert_save_failed(&mut qmp, accepted, "occupied");
    assert_eq!(list_dir(dir.path()), ["occupied", "vm.sock"]);
    assert!(list_dir(&occupied).is_empty());
    let last: Vec<u64> = (0..2).map(|cpu| vmm.last_tick(cpu).unwrap()).collect();
    for cpu in 0..2 {
        vmm.wait_for_tick(cpu, last[cpu as usize] + 10, LONG)
            .unwrap();
    }
    assert_ticks_consecutive(&parse_heartbeat_ticks(&vmm.stdout_text())).unwrap();
    // A later save to a good path works.
    let state = dir.join("state");
    migrate_to(&mut qmp, &state);
    let old_out = quit(&vmm, &mut qmp);
    let (new, _socket) = machine.restore(&dir, "new", &state);
    assert_ticks_continue(&old_out, &new, 2, 5);
}

#[test]
fn unknown_modes_and_non_file_uris_are_rejected() {
    let dir = TempDir::new("miguri").unwrap();
    let machine = Machine::heartbeat(1);
    let (vmm, socket) = machine.start(&dir, "vm", &[]);
    vmm.wait_for_tick(0, 2, LONG).unwrap();
    let mut qmp = connect(&socket);

    match qmp.execute("migrate-set-parameters", json!({"mode": "bogus"})) {
        Err(QmpError::Command { class, desc, .. }) => {
            assert_eq!(class, "GenericError");
            assert_eq!(desc, "Parameter 'mode' does not accept value 'bogus'");
        }
        other => panic!("mode bogus: {other:?}"),
    }
    let params = qmp
        .execute("query-migrate-parameters", Value::Null)
        .unwrap();
    assert_eq!(params["mode"], "normal", "{params}");

    let elsewhere = dir.join("elsewhere");
    for uri in [
        "tcp:127.0.0.1:4444".to_string(),
        format!("unix:{}", elsewhere.display()),
        format!("exec:cat > {}", elsewhere.display()),
        "fd:3".to_string(),
        "bogus".to_string(),
    ] {
        match qmp.execute("migrate", json!({"uri": uri})) {
            Err(QmpError::Command { class, desc, .. }) => {
                assert_eq!(class, "GenericError", "{uri}");
                let scheme = uri.split(':').next().unwrap();
                assert!(
                    desc.contains("file:") || desc.contains(scheme),
                    "{uri}: the error should say what is wrong: {desc}"
                );
                eprintln!("{uri}: {desc}");
            }
            other => panic!("migrate to {uri}: {other:?}"),
        }
        assert_eq!(status(&mut qmp), "running", "after migrate to {uri}");
    }
    match qmp.execute("migrate", json!({})) {
        Err(QmpError::Command { desc, .. }) => assert!(desc.contains("uri"), "{desc}"),
        other => panic!("migrate without uri: {other:?}"),
    }
    let text = qmp.hmp("migrate -d tcp:127.0.0.1:4444").unwrap();
    assert!(text.starts_with("Error: "), "{text}");
    // None of them started a save, created files or stopped the guest.
    let events = qmp.events();
    assert!(
        events
            .iter()
            .all(|e| e["event"] != "STOP" && e["data"]["status"] != "completed"),
        "{events:?}"
    );
    assert!(!elsewhere.exists());
    assert_eq!(status(&mut qmp), "running");
    // An empty file name: refused at once, or a save that fails cleanly.
    if qmp.execute("migrate", json!({"uri": "file:"})).is_ok() {
        assert_save_failed(&mut qmp, true, "");
    }
    assert_eq!(list_dir(dir.path()), ["vm.sock"]);
    let last = vmm.last_tick(0).unwrap();
    vmm.wait_for_tick(0, last + 10, LONG).unwrap();
}
