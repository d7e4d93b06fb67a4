//! End-to-end tests of `cpr-ctl` (issue 16), the operator's rollout tool: stage a build, roll
//! it out to several real VMMs (canary, then in parallel), stop at a failure or a blackout over
//! the limit, go back with `unstage`, and refuse bad input without touching any VM.
//!
//! Build A is `target/release/vmm` (version 0.1.0), build B the alt build (0.1.0+alt). The
//! tests judge by what the VMs show: their version over QMP, their PID, the memcheck guest's
//! memory, the heartbeat guest's ticks, and the tool's exit status and JSON report.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use cpr_tests::cpr::{
    alt_vmm_bin, check_heartbeat_from_boot, command_without_inherited_fds, vmm_claiming_formats,
};
use cpr_tests::memcheck::{check_memcheck_dump, dump_memcheck_range};
use cpr_tests::*;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);
const RAM: u64 = 64 << 20;

fn ctl_bin() -> PathBuf {
    build_binaries();
    target_dir().join("release").join("cpr-ctl")
}

fn ctl(args: &[&str]) -> Output {
    Command::new(ctl_bin()).args(args).output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A VM of build A in `dir`, with the test's own QMP connection.
struct Vm {
    qmp: QmpClient,
    process: VmmProcess,
    socket: PathBuf,
    memcheck: bool,
}

impl Vm {
    fn start(dir: &Path, name: &str, memcheck: bool) -> Vm {
        build_binaries();
        let socket = dir.join(format!("{name}.qmp"));
        let guest = if memcheck {
            "memcheck"
        } else {
            "heartbeat,hz=100"
        };
        let mut command = command_without_inherited_fds(vmm_bin());
        command.args([
            "-m",
            "64M",
            "-smp",
            "1",
            "--guest",
            guest,
            "-name",
            name,
            "-serial",
            "stdio",
            "-qmp",
            &qmp_socket_arg(&socket),
        ]);
        let process = VmmProcess::spawn(command).unwrap();
        process.wait_for_path(&socket, LONG).unwrap();
        let qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
        Vm {
            qmp,
            process,
            socket,
            memcheck,
        }
    }

    fn wait_running(&self) {
        if self.memcheck {
            self.process.wait_for_stdout_contains("B", LONG).unwrap();
        } else {
            self.process
                .wait_for_stdout_contains("tick 2", LONG)
                .unwrap();
        }
    }

    fn version(&mut self) -> String {
        let v = self.qmp.execute("query-version", Value::Null).unwrap();
        v["package"].as_str().unwrap().to_string()
    }

    fn runs(&mut self, version: &str) -> bool {
        self.version() == format!(" (cpr-vmm {version})")
    }

    fn migrate_status(&mut self) -> Value {
        self.qmp.execute("query-migrate", Value::Null).unwrap()["status"].clone()
    }

    /// The guest's work is intact: memcheck memory consistent, or heartbeat ticks from boot
    /// consecutive (after the guest made progress since the last update).
    fn check_guest(&mut self, dir: &Path, what: &str) {
        if self.memcheck {
            let before = self.process.stdout_text().matches('B').count();
            self.process
                .wait_for_output(|t| t.matches('B').count() > before, LONG)
                .unwrap();
            self.qmp.execute("stop", Value::Null).unwrap();
            let dump = dump_memcheck_range(&mut self.qmp, RAM, &dir.join("dump")).unwrap();
            check_memcheck_dump(&dump).unwrap_or_else(|e| panic!("{what}: {e}"));
            self.qmp.execute("cont", Value::Null).unwrap();
        } else {
            let before = self.process.stdout_text().matches("tick").count();
            self.process
                .wait_for_output(|t| t.matches("tick").count() > before + 2, LONG)
                .unwrap();
            check_heartbeat_from_boot(&self.process.stdout_text(), 1)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
}

/// `ROOT` with build A staged, then build B staged over it (current B, previous A).
fn stage_a_then_b(root: &Path) {
    for bin in [vmm_bin(), alt_vmm_bin()] {
        let out = ctl(&["stage", s(&bin), "--root", s(root)]);
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(
        std::fs::read_link(root.join("current")).unwrap(),
        Path::new("0.1.0+alt")
    );
    assert_eq!(
        std::fs::read_link(root.join("previous")).unwrap(),
        Path::new("0.1.0")
    );
}

fn report(path: &Path) -> Vec<Value> {
    let r: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    r["vms"].as_array().unwrap().clone()
}

/// Five VMs (memcheck and heartbeat, 64 MiB) go from A to B with a canary and two at a time,
/// keeping their PIDs and their guests' work; `unstage` + `update` brings them back to A.
#[test]
fn rollout_to_b_and_back_to_a() {
    let alt = alt_vmm_bin();
    let dir = TempDir::new("ctlroll").unwrap();
    let vms_dir = dir.join("vms");
    std::fs::create_dir(&vms_dir).unwrap();
    let mut vms: Vec<Vm> = (0..5)
        .map(|i| Vm::start(&vms_dir, &format!("vm{i}"), i % 2 == 0))
        .collect();
    vms.iter().for_each(Vm::wait_running);
    let pids: Vec<u32> = vms.iter().map(|v| v.process.pid()).collect();
    let root = dir.join("root");
    stage_a_then_b(&root);
    assert!(root.join("0.1.0+alt/vmm").exists() && alt.exists());

    let report_path = dir.join("report.json");
    let out = ctl(&[
        "update",
        "--root",
        s(&root),
        "--parallel",
        "2",
        "--canary",
        "1",
        "--report",
        s(&report_path),
        s(&vms_dir),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("0.1.0 -> 0.1.0+alt: completed").count(),
        5,
        "{stdout}"
    );
    let vms_report = report(&report_path);
    assert_eq!(vms_report.len(), 5);
    for (vm, pid) in vms.iter_mut().zip(&pids) {
        assert!(vm.runs("0.1.0+alt"));
        assert_eq!(vm.process.pid(), *pid);
        let entry = vms_report
            .iter()
            .find(|e| e["socket"] == json!(s(&vm.socket)))
            .unwrap_or_else(|| panic!("{} missing from the report", vm.socket.display()));
        assert_eq!(entry["outcome"], "completed", "{entry}");
        assert_eq!(entry["pid-before"], json!(pid));
        assert_eq!(entry["pid-after"], json!(pid));
        assert_eq!(entry["from-version"], "0.1.0");
        assert_eq!(entry["to-version"], "0.1.0+alt");
        assert!(entry["blackout-ns"].as_u64().unwrap() > 0, "{entry}");
        assert!(!entry["phases"].as_array().unwrap().is_empty(), "{entry}");
        vm.check_guest(&dir.join("vms"), "after the update to B");
        // What the next update builds on: B's argv, without the update's -incoming.
        let line = vm
            .qmp
            .execute("x-query-cpr-command-line", Value::Null)
            .unwrap();
        let argv: Vec<&str> = line["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(argv[0], s(&root.join("0.1.0+alt/vmm")), "{line}");
        assert!(!argv.iter().any(|a| a.contains("incoming")), "{line}");
        assert!(argv.contains(&"-serial"), "{line}");
        assert_eq!(line["qmp-socket"], json!(s(&vm.socket)));
    }
    let schema = vms[0].qmp.execute("query-qmp-schema", Value::Null).unwrap();
    assert!(
        schema
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "x-query-cpr-command-line" && e["meta-type"] == "command")
    );

    let status = ctl(&["status", "--json", s(&vms_dir)]);
    assert!(status.status.success(), "{}", text(&status));
    let rows: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 5);
    for row in rows.as_array().unwrap() {
        assert_eq!(row["version"], "0.1.0+alt", "{row}");
        assert_eq!(row["last-update"], "completed", "{row}");
        assert!(row["blackout-ns"].as_u64().is_some(), "{row}");
    }

    let out = ctl(&["unstage", "--root", s(&root)]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_link(root.join("current")).unwrap(),
        Path::new("0.1.0")
    );
    let out = ctl(&["update", "--root", s(&root), "--parallel", "2", s(&vms_dir)]);
    assert!(out.status.success(), "{}", text(&out));
    for (vm, pid) in vms.iter_mut().zip(&pids) {
        assert!(vm.runs("0.1.0"));
        assert_eq!(vm.process.pid(), *pid);
        vm.check_guest(&vms_dir, "after the update back to A");
    }
}

/// The new VMM fails for the second VM: that VM rolls back to A, the rollout stops, the third
/// VM is never touched, the report says which and why, and the exit status is non-zero.
#[test]
fn a_failing_vm_stops_the_rollout() {
    let dir = TempDir::new("ctlfail").unwrap();
    let mut vms: Vec<Vm> = (0..3)
        .map(|i| Vm::start(dir.path(), &format!("vm{i}"), i == 1))
        .collect();
    vms.iter().for_each(Vm::wait_running);
    let root = dir.join("root");
    stage_a_then_b(&root);
    let report_path = dir.join("report.json");
    let fault = format!("{}=exit-before-resume", s(&vms[1].socket));
    let out = ctl(&[
        "update",
        "--root",
        s(&root),
        "--canary",
        "1",
        "--parallel",
        "1",
        "--report",
        s(&report_path),
        "--x-test-fault",
        &fault,
        s(&vms[0].socket),
        s(&vms[1].socket),
        s(&vms[2].socket),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("stopped:"), "{stdout}");
    let entries = report(&report_path);
    assert_eq!(entries[0]["outcome"], "completed");
    assert_eq!(entries[1]["outcome"], "failed");
    let reason = entries[1]["reason"].as_str().unwrap();
    assert!(reason.contains("exit-before-resume"), "{reason}");
    assert_eq!(entries[1]["to-version"], "0.1.0");
    assert_eq!(entries[1]["pid-after"], entries[1]["pid-before"]);
    assert_eq!(entries[2]["outcome"], "not-reached");

    assert!(vms[0].runs("0.1.0+alt"));
    assert!(vms[1].runs("0.1.0"));
    assert_eq!(vms[1].migrate_status(), "failed");
    vms[1].check_guest(dir.path(), "after the rollback");
    assert!(vms[2].runs("0.1.0"));
    assert_eq!(
        vms[2].migrate_status(),
        Value::Null,
        "the third VM was touched"
    );
    assert!(vms[2].qmp.events().is_empty());
}

/// A limit below what the machine can do: the first VM's update completes, the tool stops and
/// says why; the second VM stays on A.
#[test]
fn a_blackout_over_the_limit_stops_the_rollout() {
    let dir = TempDir::new("ctllimit").unwrap();
    let mut vms: Vec<Vm> = (0..2)
        .map(|i| Vm::start(dir.path(), &format!("vm{i}"), false))
        .collect();
    vms.iter().for_each(Vm::wait_running);
    let out = ctl(&[
        "update",
        "--to",
        s(&alt_vmm_bin()),
        "--max-blackout-ms",
        "0.001",
        s(&vms[0].socket),
        s(&vms[1].socket),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("completed-over-limit"), "{stdout}");
    assert!(stdout.contains("over --max-blackout-ms 0.001"), "{stdout}");
    assert!(stdout.contains("stopped:"), "{stdout}");
    assert!(vms[0].runs("0.1.0+alt"));
    assert!(vms[1].runs("0.1.0"));
    assert_eq!(vms[1].migrate_status(), Value::Null);
}

/// Runs `update` of `good` plus `bad` and checks it is refused with `needle`, `good` untouched.
fn refused_with(good: &mut Vm, bad: &Path, needle: &str) {
    let out = ctl(&["update", "--to", s(&alt_vmm_bin()), s(&good.socket), s(bad)]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert!(good.runs("0.1.0"));
    assert_eq!(
        good.migrate_status(),
        Value::Null,
        "the good VM was touched"
    );
}

/// Bad input is refused with a clear error and no VM is touched: a socket that is not a VMM's,
/// a stale socket, a VM already in an update, a root without write permission, a non-VMM
/// binary to stage, and one that cannot read the running VM's state format.
#[test]
fn bad_input_is_refused_and_touches_nothing() {
    let dir = TempDir::new("ctlbad").unwrap();
    let mut good = Vm::start(dir.path(), "good", false);
    good.wait_running();

    // A socket whose server is not a VMM's monitor.
    let other = dir.join("other.sock");
    let listener = UnixListener::bind(&other).unwrap();
    let server = std::thread::spawn(move || {
        if let Ok((mut c, _)) = listener.accept() {
            let _ = c.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
        }
    });
    refused_with(&mut good, &other, "not a cpr-vmm monitor");
    server.join().unwrap();

    // A stale socket: the file is there, nobody listens.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    refused_with(&mut good, &stale, "stale socket");

    // A VM in the middle of an update (its update's program never gets to the new VMM).
    let mut busy = Vm::start(dir.path(), "busy", false);
    busy.wait_running();
    busy.qmp
        .execute(
            "migrate-set-parameters",
            json!({"mode": "cpr-exec", "x-cpr-deadline-ms": 60_000,
                   "cpr-exec-command": ["/bin/sh", "-c", "exec sleep 600", "-qmp"]}),
        )
        .unwrap();
    busy.qmp
        .execute(
            "migrate",
            json!({"uri": format!("file:{}", s(&dir.join("busy.state")))}),
        )
        .unwrap();
    busy.qmp.wait_event("STOP", LONG).unwrap();
    let exe = format!("/proc/{}/exe", busy.process.pid());
    assert!(wait_until(LONG, || std::fs::read_link(&exe)
        .is_ok_and(|p| p.ends_with("sleep"))));
    refused_with(&mut good, &busy.socket, "in the middle of a live update");

    // Staging: a binary that is not our VMM, and a root this user cannot write.
    let root = dir.join("root");
    let out = ctl(&["stage", "/bin/sh", "--root", s(&root)]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("not a cpr-vmm VMM binary"),
        "{}",
        text(&out)
    );
    assert!(!root.join("current").exists());

    // A VMM build that cannot read the state format the running VM writes.
    let future = vmm_claiming_formats(&vmm_bin(), &dir.join("future-vmm"), Some((90, 99)), None);
    let out = ctl(&["stage", s(&future), "--root", s(&root), s(&good.socket)]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("cannot take over this VM"),
        "{}",
        text(&out)
    );
    assert!(!root.join("current").exists());

    std::fs::create_dir(&root).unwrap();
    let mut command = Command::new(ctl_bin());
    command.args(["stage", s(&alt_vmm_bin()), "--root", s(&root)]);
    if nix::unistd::geteuid().is_root() {
        // Root may write anywhere: ask as nobody.
        use std::os::unix::process::CommandExt;
        command.uid(65534).gid(65534);
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("not writable"), "{}", text(&out));
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
}
