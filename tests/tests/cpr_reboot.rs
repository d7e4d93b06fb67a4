//! End-to-end tests of cpr-reboot (issue 15): guest RAM in a `memory-backend-file`, device state
//! saved by `migrate file:PATH` in mode cpr-reboot, the process ended, and a new VMM started with
//! the same options and `-incoming file:PATH` mapping the same RAM file in place.
//!
//! Continuity is checked through the guests: heartbeat ticks continue exactly on every vCPU,
//! memcheck's memory stays consistent. Every bad case (RAM file replaced, resized, truncated,
//! removed; another machine) is one start-up error and leaves the RAM file as it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cpr_tests::*;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

fn connect(socket: &Path) -> QmpClient {
    QmpClient::connect_and_negotiate(socket, LONG).expect("QMP connection")
}

fn status(qmp: &mut QmpClient) -> String {
    qmp.run_state().unwrap()
}

/// The RAM backend as an operator writes it, keyval form.
fn file_backend(ram: &Path, size: &str) -> Vec<String> {
    cpr_tests::transfer::memory_backend_file(ram, size)
}

/// The same as libvirt writes it: JSON `-object`, size in bytes.
fn file_backend_json(ram: &Path, bytes: u64) -> Vec<String> {
    vec![
        "-object".into(),
        json!({"qom-type": "memory-backend-file", "id": "pc.ram", "mem-path": ram.display().to_string(),
               "share": true, "x-use-canonical-path-for-ramblock-id": false, "size": bytes})
        .to_string(),
        "-machine".into(),
        "pc-i440fx-9.2,usb=off,dump-guest-core=off,memory-backend=pc.ram".into(),
    ]
}

fn start(args: &[String], dir: &TempDir, name: &str, extra: &[&str]) -> (VmmProcess, PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    let mut all = args.to_vec();
    all.push("-qmp".into());
    all.push(qmp_socket_arg(&socket));
    all.extend(extra.iter().map(|s| s.to_string()));
    (VmmProcess::start_vmm(&all), socket)
}

/// cpr-reboot save to `state`; the VMM stays in postmigrate. Returns the `migrate` reply or
/// its error text.
fn cpr_reboot_save(qmp: &mut QmpClient, state: &Path) -> Result<(), String> {
    qmp.execute("migrate-set-parameters", json!({"mode": "cpr-reboot"}))
        .unwrap();
    qmp.execute("migrate", json!({"uri": file_uri(state)}))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn quit(vmm: &VmmProcess, qmp: &mut QmpClient) -> String {
    qmp.execute("quit", Value::Null).unwrap();
    let status = vmm.wait_exit(LONG).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vmm.stderr_text());
    vmm.stdout_text()
}

fn sweeps(text: &str) -> usize {
    text.bytes().filter(|&b| b == b'B').count()
}

/// Saves a running VM (`args`) with cpr-reboot and quits it; checks what the save promises.
fn save_and_quit(args: &[String], dir: &TempDir, ready: impl Fn(&VmmProcess)) -> (PathBuf, String) {
    let (vmm, socket) = start(args, dir, "old", &[]);
    ready(&vmm);
    let mut qmp = connect(&socket);
    let state = dir.join("state");
    cpr_reboot_save(&mut qmp, &state).unwrap();
    assert_eq!(status(&mut qmp), "postmigrate");
    let info = qmp.execute("query-migrate", Value::Null).unwrap();
    assert_eq!(info["status"], "completed", "{info}");
    // Device state only: far smaller than the guest's RAM (16 MiB at least).
    let len = std::fs::metadata(&state).unwrap().len();
    assert!(
        len < 1 << 20,
        "state file is {len} bytes: RAM pages were copied"
    );
    let out = quit(&vmm, &mut qmp);
    (state, out)
}

fn heartbeat_continues(dir: &TempDir, ram: &Path, cpus: u32) {
    let mut args = file_backend(ram, "16M");
    args.extend(["-smp", &cpus.to_string(), "--guest", "heartbeat,hz=100"].map(String::from));
    let (state, old_out) = save_and_quit(&args, dir, |vmm| {
        vmm.wait_for_all_ticks(cpus, 5, LONG).unwrap();
    });
    let (new, socket) = start(&args, dir, "new", &["-incoming", &file_uri(&state)]);
    let new_out = assert_ticks_go_on(
        &old_out,
        &new,
        cpus,
        20,
        LONG,
        "the cpr-reboot save",
        "the restored guest's first tick must follow the saved one",
    );
    assert!(
        parse_heartbeats(&new_out).started.is_empty(),
        "rebooted:\n{new_out}"
    );
    let mut qmp = connect(&socket);
    assert_eq!(status(&mut qmp), "running");
    quit(&new, &mut qmp);
}

#[test]
fn heartbeat_two_vcpus_continue_across_save_exit_restart() {
    let dir = TempDir::new("cprreboot-hb").unwrap();
    heartbeat_continues(&dir, &dir.join("guest.ram"), 2);
}

fn memcheck_consistent(dir: &TempDir, ram: &Path) {
    let bytes: u64 = 64 << 20;
    let mut args = file_backend_json(ram, bytes);
    args.extend(["--guest", "memcheck"].map(String::from));
    let (state, old_out) = save_and_quit(&args, dir, |vmm| {
        vmm.wait_for_output(|t| sweeps(t) >= 2, LONG).unwrap();
    });
    let old_sweeps = sweeps(&old_out);
    let (new, socket) = start(&args, dir, "new", &["-incoming", &file_uri(&state)]);
    new.wait_for_output(|t| sweeps(t) >= 2, LONG).unwrap();
    let mut qmp = connect(&socket);
    qmp.execute("stop", Value::Null).unwrap();
    let dump = dump_memcheck_range(&mut qmp, bytes, &dir.join("dump")).unwrap();
    check_memcheck_dump(&dump).unwrap();
    let last = dump[dump.len() - cpr_tests::memcheck::PAGE_SIZE];
    let total = old_sweeps + sweeps(&new.stdout_text());
    assert!(
        last == (total % 256) as u8 || last == (total % 256) as u8 + 1,
        "RAM says {last} sweeps, the console {total}"
    );
    assert!(!new.stdout_text().contains('A'), "memcheck restarted");
    quit(&new, &mut qmp);
}

#[test]
fn memcheck_memory_is_consistent_across_save_exit_restart_json_object() {
    let dir = TempDir::new("cprreboot-mem").unwrap();
    memcheck_consistent(&dir, &dir.join("guest.ram"));
}

/// A filesystem the test mounts (root only), unmounted when dropped (also when the test
/// fails).
struct TestMount(PathBuf);

impl TestMount {
    /// Mounts `fstype` with `options` on `dir/mnt`; None (the test skipped, saying why) when
    /// it cannot.
    fn mount(test: &str, dir: &TempDir, fstype: &str, options: &str) -> Option<TestMount> {
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let output = std::process::Command::new("mount")
            .args(["-t", fstype, "-o", options, fstype])
            .arg(&mnt)
            .output();
        match output {
            Ok(o) if o.status.success() => Some(TestMount(mnt)),
            Ok(o) => {
                let why = String::from_utf8_lossy(&o.stderr).trim().to_string();
                prerequisite_missing(test, &format!("mount -t {fstype} failed: {why}"));
                None
            }
            Err(e) => {
                prerequisite_missing(test, &format!("cannot run mount: {e}"));
                None
            }
        }
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

#[test]
fn memcheck_with_the_ram_file_on_a_tmpfs() {
    let test = "memcheck_with_the_ram_file_on_a_tmpfs";
    if !require_root(test, "mounting a tmpfs") {
        return;
    }
    let dir = TempDir::new("cprreboot-tmpfs").unwrap();
    let Some(guard) = TestMount::mount(test, &dir, "tmpfs", "size=128m,mode=0700") else {
        return;
    };
    let mnt = guard.0.clone();
    memcheck_consistent(&dir, &mnt.join("guest.ram"));
    drop(guard);
    assert!(!mnt.join("guest.ram").exists(), "tmpfs still mounted");
}

/// The RAM file on hugetlbfs (2 MiB pages, mounted by the test): the file is sized in whole
/// huge pages, its pages stay in the filesystem while no process runs, and the restarted VMM
/// maps them in place. Needs root and 2 MiB pages it can reserve (skipped, saying so,
/// otherwise); the pool goes back to its size afterwards.
#[test]
fn memcheck_with_the_ram_file_on_hugetlbfs() {
    use cpr_tests::hugepages::{HugePageReservation, mapping_page_size_kib};
    let test = "memcheck_with_the_ram_file_on_hugetlbfs";
    if !require_root(test, "mounting hugetlbfs") {
        return;
    }
    // Declared first, dropped last: after the file is gone with the mount.
    let _reservation = match HugePageReservation::reserve(64 + 4) {
        Ok(r) => r,
        Err(e) => {
            prerequisite_missing(test, &e);
            return;
        }
    };
    let dir = TempDir::new("cprreboot-huge-file").unwrap();
    let Some(guard) = TestMount::mount(test, &dir, "hugetlbfs", "pagesize=2M,mode=0700") else {
        return;
    };
    let ram = guard.0.join("guest.ram");
    memcheck_consistent(&dir, &ram);
    let (kib, size) = {
        use std::os::unix::fs::MetadataExt;
        let (vmm, socket) = start(
            &[
                file_backend_json(&ram, 64 << 20),
                vec!["--guest".into(), "memcheck".into()],
            ]
            .concat(),
            &dir,
            "again",
            &[],
        );
        vmm.wait_for_output(|t| t.contains('A'), LONG).unwrap();
        let kib = mapping_page_size_kib(vmm.pid(), "guest.ram");
        quit(&vmm, &mut connect(&socket));
        (kib, std::fs::metadata(&ram).unwrap().size())
    };
    assert_eq!(kib, Some(2048), "guest RAM not on 2 MiB pages");
    assert_eq!(size, 64 << 20);
    // Not a whole number of huge pages: one clear error, nothing created.
    let odd = guard.0.join("odd.ram");
    let mut args = file_backend(&odd, "17M");
    args.extend(["--guest", "heartbeat"].map(String::from));
    assert_vmm_startup_error(
        &args,
        &["hugetlbfs", "2 MiB pages", "whole huge pages"],
        LONG,
    );
    assert!(
        !odd.exists(),
        "a refused start left the RAM file it created"
    );
    drop(guard);
    assert!(!ram.exists(), "hugetlbfs still mounted");
}

/// A saved 16 MiB heartbeat VM, for the bad cases. Returns its args and state file.
fn saved_for_bad_cases(dir: &TempDir, ram: &Path) -> (Vec<String>, PathBuf) {
    let mut args = file_backend(ram, "16M");
    args.extend(["--guest", "heartbeat,hz=100"].map(String::from));
    let (state, _) = save_and_quit(&args, dir, |vmm| {
        vmm.wait_for_all_ticks(1, 3, LONG).unwrap();
    });
    (args, state)
}

fn restore_fails(args: &[String], state: &Path, ram: &Path, needles: &[&str]) {
    let before = std::fs::read(ram).ok();
    let mut all = args.to_vec();
    all.extend(["-incoming".to_string(), file_uri(state)]);
    assert_vmm_startup_error(&all, needles, LONG);
    assert_eq!(std::fs::read(ram).ok(), before, "the RAM file was modified");
}

#[test]
fn every_bad_case_is_one_error_and_leaves_the_ram_file_alone() {
    let dir = TempDir::new("cprreboot-bad").unwrap();
    let ram = dir.join("guest.ram");
    let (args, state) = saved_for_bad_cases(&dir, &ram);
    let saved = std::fs::read(&ram).unwrap();

    // Another machine: checked before the RAM file is even opened.
    let mut two = args.clone();
    two.extend(["-smp", "2"].map(String::from));
    restore_fails(&two, &state, &ram, &["vCPUs", "-smp"]);

    // Resized (grown) and truncated.
    let f = std::fs::OpenOptions::new().write(true).open(&ram).unwrap();
    f.set_len(32 << 20).unwrap();
    restore_fails(&args, &state, &ram, &["resized or truncated", "16777216"]);
    f.set_len(8 << 20).unwrap();
    restore_fails(&args, &state, &ram, &["resized or truncated", "8388608"]);
    drop(f);

    // Restored to the saved size, but written since: its change time moved on.
    let f = std::fs::OpenOptions::new().write(true).open(&ram).unwrap();
    f.set_len(16 << 20).unwrap();
    drop(f);
    restore_fails(&args, &state, &ram, &["replaced or written since the save"]);

    // Replaced by another file of the right size and content (kept open, so its inode number
    // cannot be the saved one's; a reused number is the case above).
    let moved = dir.join("moved.ram");
    std::fs::rename(&ram, &moved).unwrap();
    std::fs::write(&ram, &saved).unwrap();
    restore_fails(&args, &state, &ram, &["was replaced", "inode"]);

    // Removed: nothing is created in its place.
    std::fs::remove_file(&ram).unwrap();
    restore_fails(&args, &state, &ram, &["is gone"]);
    assert!(!ram.exists(), "a restore created the RAM file");

    // memfd RAM on the command line cannot restore a cpr-reboot save.
    let mut memfd = vec!["-m".to_string(), "16M".to_string()];
    memfd.extend(["--guest", "heartbeat,hz=100"].map(String::from));
    restore_fails(&memfd, &state, &ram, &["memory-backend-file", "mem-path="]);
}

#[test]
fn memfd_ram_and_share_off_are_refused_and_the_guest_keeps_running() {
    let dir = TempDir::new("cprreboot-refuse").unwrap();
    for (args, needle) in [
        (vec!["-m", "16M"], "cpr-reboot needs guest RAM in a file"),
        (
            vec![
                "-object",
                "memory-backend-memfd,id=mem0,size=16M,share=off",
                "-machine",
                "memory-backend=mem0",
            ],
            "Memory region mem0 is not compatible with CPR. share=on is required",
        ),
    ] {
        let mut args: Vec<String> = args.into_iter().map(String::from).collect();
        args.extend(["--guest", "heartbeat,hz=100"].map(String::from));
        let (vmm, socket) = start(&args, &dir, "vm", &[]);
        vmm.wait_for_all_ticks(1, 3, LONG).unwrap();
        let mut qmp = connect(&socket);
        let e = cpr_reboot_save(&mut qmp, &dir.join("state")).unwrap_err();
        assert!(e.contains(needle), "{e}");
        assert!(!dir.join("state").exists());
        assert_eq!(status(&mut qmp), "running");
        let t = vmm.last_tick(0).unwrap();
        vmm.wait_for_tick(0, t + 3, LONG).unwrap();
        quit(&vmm, &mut qmp);
    }
}

#[test]
fn a_ram_file_of_another_size_is_refused_at_start() {
    let dir = TempDir::new("cprreboot-size").unwrap();
    let ram = dir.join("guest.ram");
    std::fs::write(&ram, vec![7u8; 4096]).unwrap();
    let mut args = file_backend(&ram, "16M");
    args.extend(["--guest", "heartbeat"].map(String::from));
    assert_vmm_startup_error(&args, &["is 4096 bytes", "not resized"], LONG);
    assert_eq!(std::fs::read(&ram).unwrap(), vec![7u8; 4096]);
}

/// Inodes of the files mapped by process `pid` at `path` (from /proc/PID/maps).
fn mapped_inodes(pid: u32, path: &Path) -> Vec<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let wanted = path.display().to_string();
    maps.lines()
        .filter(|l| l.ends_with(&wanted))
        .filter_map(|l| l.split_whitespace().nth(4)?.parse().ok())
        .collect()
}

/// cpr-exec with a memory-backend-file: the file's fd crosses the exec (checked by device,
/// inode and size) and the new VMM maps the same file in place; memcheck stays consistent.
#[test]
fn cpr_exec_hands_over_a_ram_file_in_place() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("cprreboot-exec").unwrap();
    let ram = dir.join("guest.ram");
    let bytes: u64 = 64 << 20;
    let mut args = file_backend(&ram, "64M");
    args.extend(["--guest", "memcheck"].map(String::from));
    let (vmm, socket) = start(&args, &dir, "vm", &[]);
    vmm.wait_for_output(|t| sweeps(t) >= 2, LONG).unwrap();
    let inode = std::fs::metadata(&ram).unwrap().ino();
    assert!(mapped_inodes(vmm.pid(), &ram).contains(&inode));
    let mut qmp = connect(&socket);
    let mut vmm_args = args.clone();
    vmm_args.extend(["-qmp".to_string(), qmp_socket_arg(&socket)]);
    let command =
        cpr_tests::cpr::shim_command(&shim_bin(), &[], &vmm_bin(), &vmm_args, &dir.join("state"));
    let update =
        cpr_tests::cpr::cpr_update(&mut qmp, &command, &dir.join("state"), true, LONG).unwrap();
    assert_eq!(update.status(), "completed", "{}", update.info);
    let before = sweeps(&vmm.stdout_text());
    vmm.wait_for_output(|t| sweeps(t) >= before + 2, LONG)
        .unwrap();
    // The same process (exec keeps the pid), the same file, mapped again in place.
    let maps = mapped_inodes(vmm.pid(), &ram);
    assert!(
        !maps.is_empty() && maps.iter().all(|i| *i == inode),
        "{maps:?}"
    );
    assert_eq!(std::fs::metadata(&ram).unwrap().len(), bytes);
    qmp.execute("stop", Value::Null).unwrap();
    let dump = dump_memcheck_range(&mut qmp, bytes, &dir.join("dump")).unwrap();
    check_memcheck_dump(&dump).unwrap();
    assert!(
        !vmm.stdout_text()[1..].contains('A'),
        "memcheck restarted after the update"
    );
    quit(&vmm, &mut qmp);
}

/// `-object memory-backend-memfd,...,hugetlb=on,hugetlbsize=2M` (JSON, as libvirt writes it):
/// guest RAM on 2 MiB pages, kept across a cpr-exec update. Needs huge pages reserved
/// (`prerequisite_missing` otherwise).
#[test]
fn hugetlb_memfd_backend_object_updates() {
    use cpr_tests::hugepages::{HugePageReservation, mapping_page_size_kib};
    let _reservation = match HugePageReservation::reserve(16 + 4) {
        Ok(r) => r,
        Err(e) => {
            prerequisite_missing("hugetlb_memfd_backend_object_updates", &e);
            return;
        }
    };
    let dir = TempDir::new("cprreboot-huge").unwrap();
    let object = json!({"qom-type": "memory-backend-memfd", "id": "pc.ram", "hugetlb": true,
                        "hugetlbsize": 2097152, "share": true, "size": 16u64 << 20});
    let args: Vec<String> = [
        "-object",
        &object.to_string(),
        "-machine",
        "pc,memory-backend=pc.ram",
        "--guest",
        "heartbeat,hz=100",
    ]
    .map(String::from)
    .to_vec();
    let (vmm, socket) = start(&args, &dir, "vm", &[]);
    vmm.wait_for_all_ticks(1, 3, LONG).unwrap();
    assert_eq!(
        mapping_page_size_kib(vmm.pid(), "guest-ram-low"),
        Some(2048)
    );
    let mut qmp = connect(&socket);
    let mut vmm_args = args.clone();
    vmm_args.extend(["-qmp".to_string(), qmp_socket_arg(&socket)]);
    let state = dir.join("state");
    let command = cpr_tests::cpr::shim_command(&shim_bin(), &[], &vmm_bin(), &vmm_args, &state);
    let update = cpr_tests::cpr::cpr_update(&mut qmp, &command, &state, true, LONG).unwrap();
    assert_eq!(update.status(), "completed", "{}", update.info);
    assert_eq!(
        mapping_page_size_kib(vmm.pid(), "guest-ram-low"),
        Some(2048)
    );
    let t = vmm.last_tick(0).unwrap();
    vmm.wait_for_tick(0, t + 3, LONG).unwrap();
    quit(&vmm, &mut qmp);
}
