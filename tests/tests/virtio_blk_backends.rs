//! virtio-blk's host side from the outside.
//!
//! Cache modes: `cache=none` opens the image with O_DIRECT (the guest's driver works on it,
//! and the O_DIRECT open file is the fd a live update hands over, flags and all), `query-block`
//! says so as QEMU does, and a file system that refuses O_DIRECT is one clear error at start
//! naming the option. O_DIRECT needs a disk file system: the images live in the build's target
//! directory, not in the temporary directory (often a tmpfs).
//!
//! Block devices: a loop device the test makes over a file in the build's target directory
//! (detached again whatever happens) is the guest's disk: its size comes from the device
//! (BLKGETSIZE64), the blkcheck guest's I/O on it goes on across live updates (through the
//! shim and directly) with nothing lost, and the file behind it holds what the guest
//! completed. Where loop devices cannot be made (no `losetup`, not root, no loop driver) the
//! test says so and passes: that is a property of the machine, not of the VMM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cpr_tests::blkcheck::{
    BlkcheckCounters, COUNTERS_ADDR, COUNTERS_SIZE, check_image, mismatch_lines, parse_pass_lines,
};
use cpr_tests::cpr::{cpr_update, direct_command, shim_command};
use cpr_tests::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);
/// O_DIRECT in fdinfo's `flags:` (octal 040000 on x86-64).
const O_DIRECT_FLAG: u32 = 0o40000;

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A directory in the build's target directory (a disk file system), removed on drop.
struct DiskDir(PathBuf);

impl DiskDir {
    fn new(name: &str) -> Self {
        let p = target_dir().join("test-disks").join(format!(
            "{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        DiskDir(p)
    }
}

impl Drop for DiskDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh raw image of `mib` MiB at `path`.
fn image(path: &Path, mib: u64) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
}

/// Whether the one fd of `pid` open on `path`'s inode has O_DIRECT.
fn is_direct(pid: u32, path: &Path) -> bool {
    let flags = disk_fd_flags(pid, path);
    assert_eq!(flags.len(), 1, "one fd on the image: {flags:?}");
    flags[0] & O_DIRECT_FLAG != 0
}

/// The fdinfo flags of the fds of `pid` open on `path`'s inode.
fn disk_fd_flags(pid: u32, path: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    list_fds(pid)
        .unwrap()
        .into_iter()
        .filter(|f| {
            cpr_tests::cpr::fd_identity(pid, f.fd).is_ok_and(|id| id == (meta.dev(), meta.ino()))
        })
        .map(|f| f.flags)
        .collect()
}

/// Starts `vmm args` (a blkcheck guest with its monitor on `socket`), waits until the guest
/// has completed its first pass, and returns it with its monitor and `query-block`'s answer.
fn start_blkcheck(args: &[String], socket: &Path) -> (VmmProcess, QmpClient, Value) {
    let vmm = VmmProcess::start_vmm(args);
    vmm.wait_for_path(socket, LONG).unwrap();
    let mut qmp = QmpClient::connect_and_negotiate(socket, LONG).unwrap();
    vmm.wait_for_stdout_contains("blkcheck: pass 1 done", LONG)
        .unwrap();
    let blocks = qmp.execute("query-block", Value::Null).unwrap();
    (vmm, qmp, blocks)
}

/// The number of `blkcheck: pass G done` lines on the console so far.
fn passes(vmm: &VmmProcess) -> usize {
    parse_pass_lines(&vmm.stdout_text()).len()
}

/// blkcheck at depth 8 on a `cache=none` image, through live updates (shim and direct, both
/// I/O paths): the image is open with O_DIRECT before and after every update (the same open
/// file), query-block says `direct`, the guest's I/O goes on with no mismatch and no error, and
/// the image holds what the guest completed.
#[test]
fn cache_none_works_and_its_o_direct_fd_is_what_live_updates_hand_over() {
    build_binaries();
    let tmp = TempDir::new("blk-cache").unwrap();
    let disks = DiskDir::new("blk-cache");
    for aio in ["threads", "io_uring"] {
        let disk = disks.0.join(format!("disk-{aio}.img"));
        image(&disk, 2);
        let socket = tmp.join(format!("qmp-{aio}.sock"));
        let drive = format!(
            "file={},format=raw,if=virtio,cache=none,aio={aio}",
            disk.display()
        );
        let args = strings(&[
            "-qmp",
            &qmp_socket_arg(&socket),
            "-drive",
            &drive,
            "--guest",
            "blkcheck,depth=8",
            "-m",
            "64M",
        ]);
        let (vmm, mut qmp, blocks) = start_blkcheck(&args, &socket);
        let cache = &blocks[0]["inserted"]["cache"];
        assert_eq!(
            (&cache["direct"], &cache["no-flush"], &cache["writeback"]),
            (&Value::Bool(true), &Value::Bool(false), &Value::Bool(true)),
            "{blocks}"
        );
        let info = qmp.hmp("info block").unwrap();
        assert!(
            info.contains("Cache mode:       writeback, direct"),
            "{info}"
        );
        assert!(is_direct(vmm.pid(), &disk), "opened with O_DIRECT");
        let state = tmp.join(format!("vm-{aio}.state"));
        for i in 0..4 {
            let seen = passes(&vmm);
            let command = if i % 2 == 0 {
                shim_command(&shim_bin(), &[], &vmm_bin(), &args, &state)
            } else {
                direct_command(&vmm_bin(), &args, &state)
            };
            let update = cpr_update(&mut qmp, &command, &state, true, LONG).unwrap();
            assert_eq!(
                update.status(),
                "completed",
                "aio={aio} update {i}: {}",
                update.error_desc()
            );
            assert!(
                is_direct(vmm.pid(), &disk),
                "still O_DIRECT after update {i}"
            );
            // The guest's I/O goes on: another whole pass, verified.
            vmm.wait_for_output(|t| parse_pass_lines(t).len() > seen, LONG)
                .unwrap();
        }
        qmp.execute("stop", Value::Null).unwrap();
        let dump = qmp
            .pmemsave(COUNTERS_ADDR, COUNTERS_SIZE as u64, &tmp.join("counters"))
            .unwrap();
        let c = BlkcheckCounters::parse(&dump).expect("blkcheck's counters block");
        qmp.execute("quit", Value::Null).unwrap();
        vmm.wait_exit(LONG).unwrap();
        let console = vmm.stdout_text();
        assert_eq!(mismatch_lines(&console), Vec::<&str>::new(), "{console}");
        assert_eq!((c.mismatches, c.errors), (0, 0), "{c:?}");
        check_image(&disk, c.passes).unwrap();
    }
}

/// A live update whose new command line says `cache=none` for a disk opened without it: the
/// handed-over open file is switched to O_DIRECT (and back by a later update without it).
#[test]
fn an_update_to_another_cache_mode_switches_the_open_file() {
    build_binaries();
    let tmp = TempDir::new("blk-cache-switch").unwrap();
    let disks = DiskDir::new("blk-cache-switch");
    let disk = disks.0.join("disk.img");
    image(&disk, 1);
    let socket = tmp.join("qmp.sock");
    let args = |cache: &str| {
        strings(&[
            "-m",
            "16M",
            "--guest",
            "heartbeat",
            "-drive",
            &format!("file={},format=raw,if=virtio,cache={cache}", disk.display()),
            "-qmp",
            &qmp_socket_arg(&socket),
        ])
    };
    let vmm = VmmProcess::start_vmm(args("writeback"));
    vmm.wait_for_path(&socket, LONG).unwrap();
    let mut qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
    assert!(!is_direct(vmm.pid(), &disk));
    let state = tmp.join("vm.state");
    for (cache, want) in [("none", true), ("writeback", false)] {
        let command = direct_command(&vmm_bin(), &args(cache), &state);
        let update = cpr_update(&mut qmp, &command, &state, true, LONG).unwrap();
        assert_eq!(update.status(), "completed", "{}", update.error_desc());
        assert_eq!(
            is_direct(vmm.pid(), &disk),
            want,
            "after the update to cache={cache}"
        );
    }
    qmp.execute("quit", Value::Null).unwrap();
    vmm.wait_exit(LONG).unwrap();
}

/// A ramfs mounted by the test, unmounted (and its mount point removed) on drop.
struct Ramfs(PathBuf);

impl Ramfs {
    fn mount(dir: &Path) -> Result<Self, String> {
        let point = dir.join("ramfs");
        std::fs::create_dir(&point).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "ramfs", "cpr-test-ramfs"])
            .arg(&point)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&point);
            return Err(format!(
                "mount -t ramfs failed (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Ramfs(point))
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// An image on a file system without O_DIRECT (ramfs here: tmpfs has had O_DIRECT since Linux
/// 6.6) with `cache=none`, or `cache.direct=on`: one error at start naming the option; the same
/// image with `cache=writeback` starts.
#[test]
fn cache_none_on_a_file_system_without_o_direct_is_one_clear_error_at_start() {
    build_binaries();
    let tmp = TempDir::new("blk-cache-ramfs").unwrap();
    let ramfs = match Ramfs::mount(tmp.path()) {
        Ok(r) => r,
        Err(why) => {
            prerequisite_missing(
                "cache_none_on_a_file_system_without_o_direct_is_one_clear_error_at_start",
                &why,
            );
            return;
        }
    };
    let disk = ramfs.0.join("disk.img");
    image(&disk, 1);
    for opts in ["cache=none", "cache.direct=on", "cache=directsync"] {
        let drive = format!("file={},format=raw,if=virtio,{opts}", disk.display());
        let out = assert_vmm_startup_error(
            &strings(&["-drive", &drive, "--guest", "heartbeat", "-m", "16M"]),
            &[
                &disk.display().to_string(),
                "does not support O_DIRECT",
                "cache=none",
                "cache.direct=on",
            ],
            LONG,
        );
        assert_eq!(
            out.matches("O_DIRECT").count(),
            1,
            "one error, said once: {out}"
        );
    }
    let vmm = VmmProcess::start_vmm(strings(&[
        "-m",
        "16M",
        "--guest",
        "heartbeat,exit-after=1",
        "-drive",
        &format!(
            "file={},format=raw,if=virtio,cache=writeback",
            disk.display()
        ),
    ]));
    let status = vmm.wait_exit(LONG).unwrap();
    assert!(status.success(), "{}", vmm.stderr_text());
}

const DISK_MIB: u64 = 2;

/// The loop device `losetup` attached, detached on drop.
struct Loop {
    device: PathBuf,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// Attaches a loop device to `backing`, or says why it cannot.
fn attach_loop(backing: &Path) -> Result<Loop, String> {
    let out = Command::new("losetup")
        .arg("--find")
        .arg("--show")
        .arg(backing)
        .output()
        .map_err(|e| format!("losetup cannot run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    Ok(Loop { device })
}

#[test]
fn a_block_device_disk_keeps_working_across_live_updates() {
    build_binaries();
    let tmp = TempDir::new("blk-loop").unwrap();
    let backing = target_dir().join(format!("blk-loop-{}.img", std::process::id()));
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _remove = Remove(&backing);
    let lo = match attach_loop(&backing) {
        Ok(lo) => lo,
        Err(why) => {
            eprintln!("skipped: no loop device can be made here: {why}");
            return;
        }
    };
    // Through the page cache, and with O_DIRECT (its alignment asked of the device).
    let mut last_pass = 0;
    for cache in ["writeback", "none"] {
        let socket = tmp.join(format!("qmp-{cache}.sock"));
        let drive = format!(
            "if=none,id=lo0,file={},format=raw,cache={cache}",
            lo.device.display()
        );
        let args: Vec<String> = [
            "--guest",
            "blkcheck,depth=8",
            "-m",
            "64M",
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=lo0",
            "-qmp",
            &qmp_socket_arg(&socket),
        ]
        .map(String::from)
        .to_vec();
        let (vmm, mut qmp, blocks) = start_blkcheck(&args, &socket);
        assert_eq!(
            blocks[0]["inserted"]["image"]["virtual-size"].as_u64(),
            Some(DISK_MIB << 20),
            "the device's size: {blocks}"
        );
        let state = tmp.join(format!("vm-{cache}.state"));
        for i in 0..4 {
            let seen = parse_pass_lines(&vmm.stdout_text()).len();
            let command = if i % 2 == 1 {
                direct_command(&vmm_bin(), &args, &state)
            } else {
                shim_command(&shim_bin(), &[], &vmm_bin(), &args, &state)
            };
            let update = cpr_update(&mut qmp, &command, &state, true, LONG).unwrap();
            assert_eq!(
                update.status(),
                "completed",
                "cache={cache} update {i}: {}",
                update.error_desc()
            );
            // Another whole pass, written and verified, after the update.
            vmm.wait_for_output(|t| parse_pass_lines(t).len() > seen, LONG)
                .unwrap();
        }
        // Stopped (every request in flight completes), then gone; its console says what it
        // saw: the device's capacity, and no mismatch and no error.
        qmp.execute("stop", Value::Null).unwrap();
        qmp.execute("quit", Value::Null).unwrap();
        vmm.wait_exit(LONG).unwrap();
        let console = vmm.stdout_text();
        let capacity = format!("blkcheck: capacity {} sectors", (DISK_MIB << 20) / 512);
        assert!(console.contains(&capacity), "{console}");
        assert_eq!(mismatch_lines(&console), Vec::<&str>::new(), "{console}");
        let last = parse_pass_lines(&console).pop().expect("pass lines");
        assert_eq!(
            (last.mismatches, last.errors),
            (0, 0),
            "cache={cache}: {last:?}"
        );
        last_pass = last.generation;
    }
    drop(lo);
    check_image(&backing, last_pass).unwrap();
}
