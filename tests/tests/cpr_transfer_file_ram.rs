//! End-to-end tests of cpr-transfer with guest RAM in a `memory-backend-file` (issue 15): the
//! old VMM hands the RAM file's open fd to the new VMM over the CPR channel (SCM_RIGHTS, with
//! its device, inode and size, checked by the same code as cpr-exec's), and the new VMM maps
//! that very file in place, never opening the path again. The new VMM's command line must name
//! the same backend (mem-path and size); otherwise it refuses before the old VMM stops the
//! guest, which keeps running there.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use cpr_tests::memcheck::PAGE_SIZE;
use cpr_tests::transfer::*;
use cpr_tests::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

/// `-object memory-backend-file,...` for `ram` of `size`, and `guest`.
fn file_ram_args(ram: &Path, size: &str, guest: &str) -> Vec<String> {
    let mut args = memory_backend_file(ram, size);
    args.extend(["--guest".to_string(), guest.to_string()]);
    args
}

fn sweeps(text: &str) -> usize {
    text.bytes().filter(|&b| b == b'B').count()
}

/// A running old side.
struct Old {
    vmm: VmmProcess,
    qmp: QmpClient,
}

impl Old {
    fn boot(dir: &TempDir, args: &[String]) -> Old {
        let socket = dir.join("old.qmp");
        let mut all = args.to_vec();
        all.extend(["-qmp".to_string(), qmp_socket_arg(&socket)]);
        let vmm = VmmProcess::start_vmm(&all);
        let mut qmp = QmpClient::connect_and_negotiate(&socket, LONG).expect("QMP connection");
        qmp.set_timeout(LONG);
        Old { vmm, qmp }
    }

    fn status(&mut self) -> String {
        self.qmp.run_state().unwrap()
    }

    /// Quits the (postmigrate) old VMM and checks that the heartbeat guest's ticks go on
    /// exactly on `new` (`more` of them).
    fn quit_and_check_ticks_on(self, new: &VmmProcess, more: usize) {
        let old_out = self.quit();
        assert_ticks_go_on(
            &old_out,
            new,
            1,
            more,
            LONG,
            "the transfer",
            "the new VMM's first tick must follow the old one's last",
        );
    }

    /// Quits the (postmigrate) old VMM; returns what its guest printed.
    fn quit(mut self) -> String {
        self.qmp.execute("quit", Value::Null).unwrap();
        let status = self.vmm.wait_exit(LONG).unwrap();
        assert_eq!(status.code(), Some(0), "{}", self.vmm.stderr_text());
        self.vmm.stdout_text()
    }
}

/// A transfer that must complete: returns the new side and its monitor; `old` is left in
/// postmigrate.
fn transfer(dir: &TempDir, old: &mut Old, name: &str, new_args: &[String]) -> (Target, QmpClient) {
    let target = start_transfer_to(dir.path(), name, new_args, &mut old.qmp, LONG);
    let statuses = wait_migration_end(&mut old.qmp, LONG).unwrap();
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("completed"),
        "{statuses:?}; new side:\n{}",
        target.vmm.stderr_text()
    );
    assert_eq!(old.status(), "postmigrate");
    let mut qmp = target.connect_qmp(LONG).unwrap();
    assert_eq!(qmp.run_state().unwrap(), "running");
    (target, qmp)
}

/// The new VMM maps the file of inode `ino` (and the old one, gone, cannot).
fn assert_maps_the_file(pid: u32, ino: u64) {
    let maps = mappings_of_inode(pid, ino);
    assert!(
        !maps.is_empty(),
        "pid {pid} does not map the RAM file (inode {ino})"
    );
}

#[test]
fn memcheck_is_consistent_and_the_new_vmm_maps_the_same_file() {
    let dir = TempDir::new("xferfile-mem").unwrap();
    let ram = dir.join("guest.ram");
    let bytes: u64 = 64 << 20;
    let args = file_ram_args(&ram, "64M", "memcheck");
    let mut old = Old::boot(&dir, &args);
    old.vmm.wait_for_output(|t| sweeps(t) >= 2, LONG).unwrap();
    let ino = std::fs::metadata(&ram).unwrap().ino();
    assert_maps_the_file(old.vmm.pid(), ino);
    let (new, mut qmp) = transfer(&dir, &mut old, "new", &args);
    let old_sweeps = sweeps(&old.quit());
    new.vmm.wait_for_output(|t| sweeps(t) >= 2, LONG).unwrap();
    // Another process, the same inode, the file neither replaced nor resized.
    assert_maps_the_file(new.vmm.pid(), ino);
    let meta = std::fs::metadata(&ram).unwrap();
    assert_eq!((meta.ino(), meta.len()), (ino, bytes));
    qmp.execute("stop", Value::Null).unwrap();
    let dump = dump_memcheck_range(&mut qmp, bytes, &dir.join("dump")).unwrap();
    check_memcheck_dump(&dump).unwrap();
    let last = dump[dump.len() - PAGE_SIZE];
    let total = ((old_sweeps + sweeps(&new.vmm.stdout_text())) % 256) as u8;
    assert!(
        last == total || last == total.wrapping_add(1),
        "RAM says {last} sweeps (mod 256), the consoles {total}"
    );
    assert!(!new.vmm.stdout_text().contains('A'), "memcheck restarted");
    qmp.execute("quit", Value::Null).unwrap();
    new.vmm.wait_exit(LONG).unwrap();
}

/// The RAM file renamed after the old VMM opened it: the new VMM, started with the same
/// command line (naming the old path, now missing), takes the open file and never creates
/// one at that path.
#[test]
fn a_ram_file_renamed_since_the_start_is_handed_over_all_the_same() {
    let dir = TempDir::new("xferfile-mv").unwrap();
    let ram = dir.join("guest.ram");
    let args = file_ram_args(&ram, "16M", "heartbeat,hz=100");
    let mut old = Old::boot(&dir, &args);
    old.vmm.wait_for_all_ticks(1, 5, LONG).unwrap();
    let ino = std::fs::metadata(&ram).unwrap().ino();
    let moved = dir.join("moved.ram");
    std::fs::rename(&ram, &moved).unwrap();
    let (new, mut qmp) = transfer(&dir, &mut old, "new", &args);
    old.quit_and_check_ticks_on(&new.vmm, 10);
    assert!(!ram.exists(), "the new VMM created a file at the old path");
    assert_eq!(std::fs::metadata(&moved).unwrap().ino(), ino);
    assert_maps_the_file(new.vmm.pid(), ino);
    qmp.execute("quit", Value::Null).unwrap();
    new.vmm.wait_exit(LONG).unwrap();
}

/// A new VMM whose command line names another mem-path, another size or memfd RAM refuses the
/// RAM before the old VMM stops the guest: it exits saying why, the old VMM reports the same
/// reason and its guest keeps running; nothing is created at the other path.
#[test]
fn a_new_vmm_with_another_backend_is_refused_and_the_guest_keeps_running() {
    let dir = TempDir::new("xferfile-bad").unwrap();
    let ram = dir.join("guest.ram");
    let other = dir.join("other.ram");
    let args = file_ram_args(&ram, "16M", "heartbeat,hz=100");
    let mut old = Old::boot(&dir, &args);
    old.vmm.wait_for_all_ticks(1, 3, LONG).unwrap();
    let other_path = other.display().to_string();
    let ram_path = ram.display().to_string();
    let memfd: Vec<String> = ["-m", "16M", "--guest", "heartbeat,hz=100"]
        .map(String::from)
        .to_vec();
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "another mem-path",
            file_ram_args(&other, "16M", "heartbeat,hz=100"),
            vec!["mem-path=", &other_path, &ram_path],
        ),
        (
            "another size",
            file_ram_args(&ram, "32M", "heartbeat,hz=100"),
            vec!["16777216", "size=33554432"],
        ),
        ("memfd RAM", memfd, vec!["memory-backend-file", &ram_path]),
    ];
    for (i, (what, new_args, needles)) in cases.into_iter().enumerate() {
        let target = start_transfer_to(dir.path(), &format!("n{i}"), &new_args, &mut old.qmp, LONG);
        let status = target.vmm.wait_exit(LONG).unwrap();
        let stderr = target.vmm.stderr_text();
        assert_eq!(status.code(), Some(1), "{what}: {stderr}");
        let statuses = wait_migration_end(&mut old.qmp, LONG).unwrap();
        assert_eq!(
            statuses.last().map(String::as_str),
            Some("failed"),
            "{what}"
        );
        let info = old.qmp.execute("query-migrate", Value::Null).unwrap();
        let desc = info["error-desc"].as_str().unwrap_or_default().to_string();
        for needle in &needles {
            assert!(stderr.contains(needle), "{what}: {needle:?} in {stderr}");
            assert!(desc.contains(needle), "{what}: {needle:?} in {desc}");
        }
        assert_eq!(old.status(), "running", "{what}");
        let t = old.vmm.last_tick(0).unwrap();
        old.vmm.wait_for_tick(0, t + 3, LONG).unwrap();
        assert!(
            !other.exists(),
            "{what}: a file was created at {other_path}"
        );
    }
    assert_eq!(std::fs::metadata(&ram).unwrap().len(), 16 << 20);
    // The guest still moves: to a new VMM with the right command line.
    let (new, mut qmp) = transfer(&dir, &mut old, "good", &args);
    old.quit_and_check_ticks_on(&new.vmm, 5);
    qmp.execute("quit", Value::Null).unwrap();
    new.vmm.wait_exit(LONG).unwrap();
}
