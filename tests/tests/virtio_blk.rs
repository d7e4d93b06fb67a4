//! virtio-blk disks from the outside: the command-line checks, and the disk's host fd across
//! every migration mode (the very same open file after a live update, even when its path was
//! renamed or replaced; re-opened by path only by a restore from a file).
//!
//! The guest's side (a driver doing I/O across updates) is the `blkcheck` built-in guest's.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cpr_tests::blkcheck::{
    BlkcheckCounters, COUNTERS_ADDR, COUNTERS_SIZE, check_image, mismatch_lines,
};
use cpr_tests::cpr::{cpr_update, direct_command, fd_identity, shim_command};
use cpr_tests::*;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A raw image of `sectors` 512-byte sectors.
fn image(dir: &Path, name: &str, sectors: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(sectors * 512).unwrap();
    p
}

/// The fds of `pid` that are `path`'s inode (by device and inode, not by name).
fn fds_on_inode(pid: u32, dev: u64, ino: u64) -> Vec<OpenFd> {
    list_fds(pid)
        .unwrap()
        .into_iter()
        .filter(|f| fd_identity(pid, f.fd).is_ok_and(|id| id == (dev, ino)))
        .collect()
}

struct DiskVm {
    dir: TempDir,
    args: Vec<String>,
    process: VmmProcess,
    qmp: QmpClient,
    dev: u64,
    ino: u64,
}

impl DiskVm {
    fn start(prefix: &str, drive_args: &[String]) -> Self {
        build_binaries();
        let dir = TempDir::new(prefix).unwrap();
        let disk = image(dir.path(), "disk.img", 2048);
        let meta = std::fs::metadata(&disk).unwrap();
        let socket = dir.join("qmp.sock");
        let mut args = strings(&["-m", "16M", "--guest", "heartbeat"]);
        for a in drive_args {
            args.push(a.replace("DISK", disk.to_str().unwrap()));
        }
        args.push("-qmp".into());
        args.push(qmp_socket_arg(&socket));
        let process = VmmProcess::start_vmm(&args);
        process.wait_for_path(&socket, LONG).unwrap();
        let qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
        DiskVm {
            dir,
            args,
            process,
            qmp,
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    fn disk_fds(&self) -> Vec<OpenFd> {
        fds_on_inode(self.process.pid(), self.dev, self.ino)
    }

    fn status(&mut self) -> String {
        let v = self.qmp.execute("query-status", Value::Null).unwrap();
        v["status"].as_str().unwrap_or_default().to_string()
    }
}

#[test]
fn bad_disks_are_one_clear_error_at_start() {
    let dir = TempDir::new("blk-bad").unwrap();
    let raw = image(dir.path(), "ok.img", 8);
    let qcow = dir.join("q.img");
    std::fs::write(&qcow, b"QFI\xfb\0\0\0\x03").unwrap();
    let raw = raw.to_str().unwrap();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            strings(&["-drive", "file=/nonexistent/disk.img,format=raw,if=virtio"]),
            vec!["/nonexistent/disk.img", "No such file"],
        ),
        (
            strings(&[
                "-drive",
                &format!("file={},format=raw", dir.path().display()),
            ]),
            vec!["not a regular file or block device"],
        ),
        (
            strings(&["-drive", &format!("file={raw},format=qcow2")]),
            vec!["'qcow2' is not supported", "qemu-img convert"],
        ),
        (
            strings(&["-drive", &format!("file={},if=virtio", qcow.display())]),
            vec!["'qcow2' is not supported"],
        ),
        (
            strings(&["-device", "virtio-blk-pci,drive=nope"]),
            vec!["drive 'nope' does not exist"],
        ),
        (
            strings(&[
                "-drive",
                &format!("if=none,id=d0,file={raw},format=raw"),
                "-device",
                "virtio-blk-pci,drive=d0",
                "-device",
                "virtio-blk-pci,drive=d0",
            ]),
            vec!["drive 'd0' is used by two devices"],
        ),
        (
            strings(&[
                "-add-fd",
                "fd=77,set=1",
                "-drive",
                "file=/dev/fdset/1,format=raw",
            ]),
            vec!["fd 77 is not open"],
        ),
    ];
    for (extra, needles) in cases {
        let mut args = strings(&["-m", "16M", "--guest", "heartbeat"]);
        args.extend(extra);
        assert_vmm_startup_error(&args, &needles, LONG);
    }
}

/// The disk survives a live update through the shim as the same open file, close-on-exec,
/// although its path was renamed away before the update; the guest keeps running.
#[test]
fn the_disk_is_the_same_open_file_after_a_live_update_even_renamed() {
    let mut vm = DiskVm::start(
        "blk-exec",
        &strings(&[
            "-drive",
            "file=DISK,format=raw,if=none,id=d0",
            "-device",
            "virtio-blk-pci,drive=d0",
        ]),
    );
    let pid = vm.process.pid();
    let before = vm.disk_fds();
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(before[0].is_cloexec());
    // The image moves and another file takes its name: the guest's disk must not change.
    let path = vm.dir.join("disk.img");
    std::fs::rename(&path, vm.dir.join("moved.img")).unwrap();
    image(vm.dir.path(), "disk.img", 4096);
    let state = vm.dir.join("vm.state");
    let command = shim_command(&shim_bin(), &[], &vmm_bin(), &vm.args, &state);
    let update = cpr_update(&mut vm.qmp, &command, &state, true, LONG).unwrap();
    assert_eq!(update.status(), "completed", "{}", update.error_desc());
    assert_eq!(vm.process.pid(), pid);
    let after = vm.disk_fds();
    assert_eq!(
        after.len(),
        1,
        "the new VMM holds the original image: {after:?}"
    );
    assert!(
        after[0].is_cloexec(),
        "re-marked close-on-exec after the update"
    );
    assert_eq!(vm.status(), "running");
    // A second update, directly, carries it on, with nothing at the image's path at all: the
    // new VMM must not need it.
    std::fs::remove_file(vm.dir.join("disk.img")).unwrap();
    let command = direct_command(&vmm_bin(), &vm.args, &state);
    let update = cpr_update(&mut vm.qmp, &command, &state, true, LONG).unwrap();
    assert_eq!(update.status(), "completed", "{}", update.error_desc());
    assert_eq!(vm.disk_fds().len(), 1);
    vm.qmp.execute("quit", Value::Null).unwrap();
    vm.process.wait_exit(LONG).unwrap();
}

/// A new command line without the disk is refused by the new VMM (the state has a device it
/// lacks), and the rollback brings the guest back on the old VMM, disk and all.
#[test]
fn an_update_that_forgets_the_disk_rolls_back_with_the_disk() {
    let mut vm = DiskVm::start(
        "blk-forget",
        &strings(&["-drive", "file=DISK,format=raw,if=virtio"]),
    );
    let state = vm.dir.join("vm.state");
    let without: Vec<String> = vm
        .args
        .iter()
        .filter(|a| !a.contains("disk.img") && *a != "-drive")
        .cloned()
        .collect();
    let command = shim_command(&shim_bin(), &[], &vmm_bin(), &without, &state);
    let update = cpr_update(&mut vm.qmp, &command, &state, true, LONG).unwrap();
    assert_eq!(update.status(), "failed");
    assert!(
        update.error_desc().contains("virtio-blk:virtio0"),
        "{}",
        update.error_desc()
    );
    assert_eq!(vm.status(), "running");
    assert_eq!(vm.disk_fds().len(), 1);
}

/// cpr-transfer hands the disk fd to the new VMM by SCM_RIGHTS: the new process holds the same
/// inode, although the path was renamed after the old VMM started.
#[test]
fn cpr_transfer_hands_the_same_disk_to_the_new_vmm() {
    let mut old = DiskVm::start(
        "blk-xfer",
        &strings(&["-drive", "file=DISK,format=raw,if=virtio"]),
    );
    std::fs::rename(old.dir.join("disk.img"), old.dir.join("moved.img")).unwrap();
    // The new side's command line still names the old path (now missing): it must not open it.
    image(old.dir.path(), "disk.img", 2048);
    let (new, _, new_socket) = cpr_transfer(old.dir.path(), &old.args, &mut old.qmp);
    let mut qmp2 = QmpClient::connect_and_negotiate(&new_socket, LONG).unwrap();
    let v = qmp2.execute("query-status", Value::Null).unwrap();
    assert_eq!(v["status"], "running");
    let held = fds_on_inode(new.pid(), old.dev, old.ino);
    assert_eq!(
        held.len(),
        1,
        "the new VMM holds the original image: {held:?}"
    );
    qmp2.execute("quit", Value::Null).unwrap();
    new.wait_exit(LONG).unwrap();
}

/// Migration to a file saves the device state, not the disk; a restore in a new process opens
/// the image by path again, and refuses an image of another size.
#[test]
fn a_restore_from_a_file_reopens_the_disk_and_checks_its_size() {
    let mut vm = DiskVm::start(
        "blk-file",
        &strings(&["-drive", "file=DISK,format=raw,if=virtio"]),
    );
    let state = vm.dir.join("vm.state");
    save_to_file(&mut vm.qmp, &state);
    vm.qmp.execute("quit", Value::Null).unwrap();
    vm.process.wait_exit(LONG).unwrap();
    let mut args: Vec<String> = vm
        .args
        .iter()
        .take_while(|a| *a != "-qmp")
        .cloned()
        .collect();
    args.extend(strings(&[
        "-incoming",
        &format!("file:{}", state.display()),
    ]));
    let restored = VmmProcess::start_vmm(&args);
    restored
        .wait_for_stdout_contains("heartbeat: cpu 0 tick", LONG)
        .unwrap();
    let held = fds_on_inode(restored.pid(), vm.dev, vm.ino);
    assert_eq!(held.len(), 1);
    restored.send_signal(Signal::SIGTERM).unwrap();
    restored.wait_exit(LONG).unwrap();
    // The image grew: the restore is refused, naming the drive and both sizes.
    std::fs::File::options()
        .write(true)
        .open(vm.dir.join("disk.img"))
        .unwrap()
        .set_len(4096 * 512)
        .unwrap();
    assert_vmm_startup_error(
        &args,
        &["drive 'virtio0'", "4096 sectors", "2048 sectors"],
        LONG,
    );
}

/// Starts the new side of a cpr-transfer for a VM started with `old_args` in `dir`, runs the
/// hand-over from `old` and waits until it completed. Returns the new VMM, its arguments and
/// its QMP socket.
fn cpr_transfer(
    dir: &Path,
    old_args: &[String],
    old: &mut QmpClient,
) -> (VmmProcess, Vec<String>, PathBuf) {
    let main = dir.join("main.sock");
    let cpr = dir.join("cpr.sock");
    let new_socket = dir.join("qmp2.sock");
    let mut args: Vec<String> = old_args
        .iter()
        .take_while(|a| *a != "-qmp")
        .cloned()
        .collect();
    args.extend(strings(&[
        "-qmp",
        &qmp_socket_arg(&new_socket),
        "-incoming",
        &format!("unix:{}", main.display()),
        "-incoming",
        &format!(
            "cpr,addr.transport=socket,addr.type=unix,addr.path={}",
            cpr.display()
        ),
    ]));
    let new = VmmProcess::start_vmm(&args);
    new.wait_for_path(&cpr, LONG).unwrap();
    old.execute("migrate-set-parameters", json!({"mode": "cpr-transfer"}))
        .unwrap();
    old.execute(
        "migrate",
        json!({"channels": [
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": main}},
            {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": cpr}},
        ]}),
    )
    .unwrap();
    loop {
        let ev = old.wait_event("MIGRATION", LONG).unwrap();
        match ev["data"]["status"].as_str() {
            Some("completed") => break,
            Some("failed") => {
                let info = old.execute("query-migrate", Value::Null).unwrap();
                panic!(
                    "cpr-transfer failed: {info}; new VMM: {}",
                    new.stderr_text()
                )
            }
            _ => {}
        }
    }
    new.wait_for_path(&new_socket, LONG).unwrap();
    (new, args, new_socket)
}

/// `migrate` to `state` (normal mode) and wait until it completed.
fn save_to_file(qmp: &mut QmpClient, state: &Path) {
    qmp.execute(
        "migrate",
        json!({"uri": format!("file:{}", state.display())}),
    )
    .unwrap();
    loop {
        let ev = qmp.wait_event("MIGRATION", LONG).unwrap();
        match ev["data"]["status"].as_str() {
            Some("completed") => break,
            Some("failed") => panic!("{ev}"),
            _ => {}
        }
    }
}

/// The blkcheck guest's counters, read while it runs.
fn blkcheck_counters(qmp: &mut QmpClient, dir: &Path) -> BlkcheckCounters {
    let dump = qmp
        .pmemsave(COUNTERS_ADDR, COUNTERS_SIZE as u64, &dir.join("counters"))
        .unwrap();
    BlkcheckCounters::parse(&dump).expect("blkcheck's counters block")
}

/// Waits until the guest has completed more requests than `than`.
fn wait_requests_above(qmp: &mut QmpClient, dir: &Path, than: u64) -> BlkcheckCounters {
    wait_counter_above(qmp, dir, than, "requests", |c| c.requests)
}

/// Waits until the guest's counter `name` (read by `counter`) is above `than`.
fn wait_counter_above(
    qmp: &mut QmpClient,
    dir: &Path,
    than: u64,
    name: &str,
    counter: impl Fn(&BlkcheckCounters) -> u64,
) -> BlkcheckCounters {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let c = blkcheck_counters(qmp, dir);
        if counter(&c) > than {
            return c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest's {name} stopped at {}: {c:?}",
            counter(&c)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A blkcheck guest at depth 8 on a fresh 2 MiB disk, with a QMP monitor, past its first pass.
struct IoVm {
    dir: TempDir,
    disk: PathBuf,
    args: Vec<String>,
    vmm: VmmProcess,
    qmp: QmpClient,
}

impl IoVm {
    fn start(prefix: &str) -> Self {
        Self::start_guest(prefix, "blkcheck,depth=8")
    }

    /// The same with another `--guest` spec.
    fn start_guest(prefix: &str, guest: &str) -> Self {
        build_binaries();
        let dir = TempDir::new(prefix).unwrap();
        let disk = image(dir.path(), "disk.img", 4096);
        let socket = dir.join("qmp.sock");
        let args = strings(&[
            "-m",
            "64M",
            "--guest",
            guest,
            "-drive",
            &format!("file={},format=raw,if=virtio", disk.display()),
            "-qmp",
            &qmp_socket_arg(&socket),
        ]);
        let vmm = VmmProcess::start_vmm(&args);
        vmm.wait_for_path(&socket, LONG).unwrap();
        let qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
        vmm.wait_for_stdout_contains("blkcheck: pass 1 done", LONG)
            .unwrap();
        IoVm {
            dir,
            disk,
            args,
            vmm,
            qmp,
        }
    }

    /// Live update number `i` into `target` (`direct`ly or through the shim), which must
    /// complete.
    fn update(&mut self, i: usize, target: &Path, direct: bool) {
        let state = self.dir.join("vm.state");
        let command = if direct {
            direct_command(target, &self.args, &state)
        } else {
            shim_command(&shim_bin(), &[], target, &self.args, &state)
        };
        let update = cpr_update(&mut self.qmp, &command, &state, true, LONG).unwrap();
        assert_eq!(
            update.status(),
            "completed",
            "update {i}: {}",
            update.error_desc()
        );
    }

    /// Migrates the VM to a file, quits, and restores it in a new VMM with `-incoming`; also
    /// returns the counters as saved.
    fn restore_from_file(mut self) -> (IoVm, BlkcheckCounters) {
        let state = self.dir.join("vm.state");
        save_to_file(&mut self.qmp, &state);
        let c = blkcheck_counters(&mut self.qmp, self.dir.path());
        self.qmp.execute("quit", Value::Null).unwrap();
        self.vmm.wait_exit(LONG).unwrap();
        let mut args = self.args.clone();
        args.extend(strings(&[
            "-incoming",
            &format!("file:{}", state.display()),
        ]));
        let vmm = VmmProcess::start_vmm(&args);
        let socket = self.dir.join("qmp.sock");
        vmm.wait_for_path(&socket, LONG).unwrap();
        let qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
        let vm = IoVm {
            dir: self.dir,
            disk: self.disk,
            args,
            vmm,
            qmp,
        };
        (vm, c)
    }

    /// Hands the VM to a new VMM by cpr-transfer and quits this one.
    fn transfer(mut self) -> IoVm {
        let (vmm, args, socket) = cpr_transfer(self.dir.path(), &self.args, &mut self.qmp);
        self.qmp.execute("quit", Value::Null).unwrap();
        self.vmm.wait_exit(LONG).unwrap();
        let qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
        IoVm {
            dir: self.dir,
            disk: self.disk,
            args,
            vmm,
            qmp,
        }
    }

    /// Stops the guest, checks it saw no mismatch and no error, quits, and checks the image.
    fn finish(mut self) -> BlkcheckCounters {
        self.qmp.execute("stop", Value::Null).unwrap();
        let c = blkcheck_counters(&mut self.qmp, self.dir.path());
        self.qmp.execute("quit", Value::Null).unwrap();
        self.vmm.wait_exit(LONG).unwrap();
        let console = self.vmm.stdout_text();
        assert_eq!(mismatch_lines(&console), Vec::<&str>::new(), "{console}");
        assert_eq!((c.mismatches, c.errors), (0, 0), "{c:?}");
        check_image(&self.disk, c.passes).unwrap();
        c
    }
}

/// A rollback with I/O in flight (the new VMM crashes just before it resumes the guest): the
/// old VMM takes the guest and its disk back, and the guest's I/O goes on, intact.
#[test]
fn a_rollback_with_io_in_flight_loses_no_write() {
    let mut vm = IoVm::start("blk-rollback");
    let state = vm.dir.join("vm.state");
    let before = blkcheck_counters(&mut vm.qmp, vm.dir.path()).requests;
    let mut crashing = vm.args.clone();
    crashing.extend(strings(&["--cpr-test-fault", "crash-before-resume"]));
    let command = shim_command(&shim_bin(), &[], &vmm_bin(), &crashing, &state);
    let update = cpr_update(&mut vm.qmp, &command, &state, true, LONG).unwrap();
    assert_eq!(update.status(), "failed");
    wait_requests_above(&mut vm.qmp, vm.dir.path(), before);
    // And a good update afterwards still works.
    let command = shim_command(&shim_bin(), &[], &vmm_bin(), &vm.args, &state);
    let update = cpr_update(&mut vm.qmp, &command, &state, true, LONG).unwrap();
    assert_eq!(update.status(), "completed", "{}", update.error_desc());
    let now = blkcheck_counters(&mut vm.qmp, vm.dir.path()).requests;
    wait_requests_above(&mut vm.qmp, vm.dir.path(), now);
    vm.finish();
}

/// Migration to a file with I/O in flight, then `-incoming` in a new process on the same disk:
/// the guest carries on verifying what it wrote before.
#[test]
fn a_restore_from_a_file_with_io_in_flight_loses_no_write() {
    let (mut restored_vm, c) = IoVm::start("blk-iofile").restore_from_file();
    wait_requests_above(&mut restored_vm.qmp, restored_vm.dir.path(), c.requests);
    // A whole pass more: every sector written before the save is read back right.
    let passes = c.passes;
    restored_vm
        .vmm
        .wait_for_stdout_contains(&format!("blkcheck: pass {} done", passes + 1), LONG)
        .unwrap();
    restored_vm.finish();
}

/// The heart of it: 50 live updates while the guest keeps 8 requests in flight. Through the shim
/// and directly, alternating two builds: the guest's I/O goes on after every update, it never
/// reads back a wrong sector, no request fails, and the image on the host holds exactly the
/// generations the guest completed.
#[test]
fn live_updates_with_disk_io_in_flight_lose_no_write() {
    const UPDATES: usize = 50;
    let alt = cpr_tests::cpr::alt_vmm_bin();
    let mut vm = IoVm::start("blk-io");
    let mut seen = blkcheck_counters(&mut vm.qmp, vm.dir.path()).requests;
    for i in 0..UPDATES {
        let target = if i % 2 == 0 { alt.clone() } else { vmm_bin() };
        vm.update(i, &target, i % 3 == 0);
        let c = wait_requests_above(&mut vm.qmp, vm.dir.path(), seen);
        assert_eq!((c.mismatches, c.errors), (0, 0), "after update {i}: {c:?}");
        seen = c.requests;
    }
    vm.vmm
        .wait_for_output(|t| t.matches("blkcheck: pass ").count() >= 3, LONG)
        .unwrap();
    let c = vm.finish();
    eprintln!(
        "{UPDATES} updates with I/O in flight: {} requests, {} passes",
        c.requests, c.passes
    );
}

/// Waits until the guest has taken more queue interrupts than `than`.
fn wait_irqs_above(qmp: &mut QmpClient, dir: &Path, than: u64) -> BlkcheckCounters {
    wait_counter_above(qmp, dir, than, "queue interrupts", |c| c.irqs)
}

/// A driver that leaves MSI-X off gets INTx: blkcheck with `irq=intx` reads the interrupt line
/// (slot 1's IOAPIC pin, 17), routes it level-triggered through the IOAPIC and acks by reading
/// the ISR. Its queue interrupts keep coming and its data stays intact across live updates
/// (through the shim and directly), a migration to a file restored with `-incoming`, and a
/// cpr-transfer: the pin's state and the ISR cross them all.
#[test]
fn a_driver_on_intx_keeps_its_interrupts_and_data_across_updates() {
    const UPDATES: usize = 6;
    let mut vm = IoVm::start_guest("blk-intx", "blkcheck,depth=8,irq=intx");
    let console = vm.vmm.stdout_text();
    assert!(
        console.contains("blkcheck: intx pin 1 line 17 vector 0x41 apic 0\n"),
        "{console}"
    );
    assert!(!console.contains("msix"), "{console}");
    let mut seen = blkcheck_counters(&mut vm.qmp, vm.dir.path());
    assert!(seen.irqs > 0, "{seen:?}");
    for i in 0..UPDATES {
        vm.update(i, &vmm_bin(), i % 2 == 0);
        wait_requests_above(&mut vm.qmp, vm.dir.path(), seen.requests);
        // Not one interrupt that happened to be pending: they keep coming.
        let c = wait_irqs_above(&mut vm.qmp, vm.dir.path(), seen.irqs + 20);
        assert_eq!((c.mismatches, c.errors), (0, 0), "after update {i}: {c:?}");
        seen = c;
    }
    let (mut vm, saved) = vm.restore_from_file();
    let c = wait_irqs_above(&mut vm.qmp, vm.dir.path(), saved.irqs);
    assert_eq!(
        (c.mismatches, c.errors),
        (0, 0),
        "after the file restore: {c:?}"
    );
    seen = c;
    let mut vm = vm.transfer();
    // Passes the previous VMM printed are not in this one's output: count from here.
    let c = wait_irqs_above(&mut vm.qmp, vm.dir.path(), seen.irqs);
    vm.vmm
        .wait_for_stdout_contains(&format!("blkcheck: pass {} done", c.passes + 1), LONG)
        .unwrap();
    let c = vm.finish();
    eprintln!(
        "INTx across {UPDATES} updates, a file restore and a cpr-transfer: {} requests, \
         {} passes, {} irqs",
        c.requests, c.passes, c.irqs
    );
}

/// cpr-transfer with I/O in flight: the new VMM gets the disk by SCM_RIGHTS and the guest's I/O
/// goes on there, intact.
#[test]
fn cpr_transfer_with_io_in_flight_loses_no_write() {
    let mut old = IoVm::start("blk-ioxfer");
    let before = blkcheck_counters(&mut old.qmp, old.dir.path()).requests;
    let mut vm = old.transfer();
    wait_requests_above(&mut vm.qmp, vm.dir.path(), before);
    let c = blkcheck_counters(&mut vm.qmp, vm.dir.path());
    vm.vmm
        .wait_for_stdout_contains(&format!("blkcheck: pass {} done", c.passes + 1), LONG)
        .unwrap();
    vm.finish();
}

/// With a second vCPU (which sets up the shared IDT after vCPU 0 may already drive the disk),
/// blkcheck completes a pass and exits with success: the queue interrupt's gate survives.
#[test]
fn blkcheck_completes_a_pass_with_two_vcpus() {
    build_binaries();
    let dir = TempDir::new("blk2cpu").unwrap();
    let disk = image(dir.path(), "disk.img", 65536);
    let process = VmmProcess::start(
        vmm_bin(),
        strings(&[
            "-m",
            "64M",
            "-smp",
            "2",
            "--guest",
            "blkcheck,depth=8,exit-after=1",
            "-drive",
            &format!("file={},format=raw,if=virtio", disk.display()),
        ]),
    )
    .unwrap();
    let status = process.wait_exit(Duration::from_secs(120)).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{}\n{}",
        process.stdout_text(),
        process.stderr_text()
    );
    assert!(process.stdout_text().contains("blkcheck: pass 1 done"));
}

/// A disk image the VMM's user may not open is one clear error at start, naming the image.
#[test]
fn a_disk_without_permission_is_one_clear_error_at_start() {
    use std::os::unix::fs::PermissionsExt;
    if !require_root(
        "a_disk_without_permission_is_one_clear_error_at_start",
        "dropping to another user",
    ) {
        return;
    }
    build_binaries();
    let dir = TempDir::new("blk-perm").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let disk = image(dir.path(), "root-only.img", 8);
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, stderr) = run_vmm_as_nobody(
        &strings(&[
            "-m",
            "16M",
            "--guest",
            "heartbeat",
            "-drive",
            &format!("file={},format=raw,if=virtio", disk.display()),
        ]),
        LONG,
    )
    .unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&disk.display().to_string()) && stderr.contains("Permission denied"),
        "{stderr}"
    );
}
