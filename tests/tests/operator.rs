//! End-to-end tests of what a QEMU operator meets first (issue 17): the QMP commands management
//! software calls when it finds a QEMU-compatible monitor, the HMP commands people type, the
//! command-line options QEMU users reach for, and a clear refusal where this VMM differs.
//!
//! Every test starts real `vmm` processes on /dev/kvm and waits for output or state with
//! generous timeouts, never for a fixed time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cpr_tests::*;
use serde_json::{Value, json};

/// Generous limit for anything the guest or the VMM has to do.
const LONG: Duration = Duration::from_secs(60);
const HEARTBEAT: &str = "heartbeat,hz=100";

fn start(dir: &TempDir, extra: &[&str]) -> (VmmProcess, PathBuf) {
    let socket = dir.join("qmp.sock");
    let qmp = qmp_socket_arg(&socket);
    let mut args = vec!["-m", "16M", "--guest", HEARTBEAT, "-qmp", &qmp];
    args.extend_from_slice(extra);
    let vmm = VmmProcess::start_vmm(&args);
    (vmm, socket)
}

fn connect(socket: &Path) -> QmpClient {
    QmpClient::connect_and_negotiate(socket, LONG).expect("QMP connection")
}

fn quit(vmm: &VmmProcess, qmp: &mut QmpClient) {
    let _ = qmp.execute("quit", Value::Null);
    assert!(vmm.wait_exit(LONG).expect("vmm exits").success());
}

#[test]
fn qmp_answers_what_management_software_asks_first() {
    let dir = TempDir::new("op-qmp").unwrap();
    let (vmm, socket) = start(&dir, &["-name", "web1", "-serial", "null"]);
    let mut qmp = connect(&socket);

    // libvirt's first question: the schema, which lists exactly the commands that exist.
    let schema = qmp.execute("query-qmp-schema", Value::Null).unwrap();
    let schema = schema.as_array().expect("a list of SchemaInfo");
    let commands: Vec<&str> = schema
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .filter_map(|e| e["name"].as_str())
        .collect();
    let implemented: Vec<Value> = qmp
        .execute("query-commands", Value::Null)
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(commands.len(), implemented.len(), "{commands:?}");
    for c in &implemented {
        let name = c["name"].as_str().unwrap();
        assert!(commands.contains(&name), "{name} missing from the schema");
    }
    for name in [
        "query-name",
        "query-kvm",
        "query-events",
        "query-chardev",
        "query-migrate-capabilities",
        "system_powerdown",
        "query-qmp-schema",
    ] {
        assert!(commands.contains(&name), "{name}");
    }
    let msp = schema
        .iter()
        .find(|e| e["name"] == "migrate-set-parameters")
        .unwrap();
    let args = schema
        .iter()
        .find(|e| e["name"] == msp["arg-type"])
        .unwrap();
    assert!(
        args["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "cpr-exec-command"),
        "{args}"
    );

    assert_eq!(
        qmp.execute("query-name", Value::Null).unwrap(),
        json!({"name": "web1"})
    );
    assert_eq!(
        qmp.execute("query-kvm", Value::Null).unwrap(),
        json!({"enabled": true, "present": true})
    );
    let events = qmp.execute("query-events", Value::Null).unwrap();
    for e in ["STOP", "RESUME", "SHUTDOWN", "MIGRATION"] {
        assert!(
            events.as_array().unwrap().contains(&json!({ "name": e })),
            "{events}"
        );
    }
    let chardevs = qmp.execute("query-chardev", Value::Null).unwrap();
    let qmp_filename = format!("unix:{},server=on", socket.display());
    assert_eq!(
        chardevs,
        json!([
            {"label": "compat_monitor0", "filename": qmp_filename, "frontend-open": true},
            {"label": "serial0", "filename": "null", "frontend-open": true},
        ])
    );
    let caps = qmp
        .execute("query-migrate-capabilities", Value::Null)
        .unwrap();
    let caps = caps.as_array().unwrap();
    assert!(caps.contains(&json!({"capability": "events", "state": true})));
    assert!(caps.contains(&json!({"capability": "postcopy-ram", "state": false})));

    // No ACPI here: a clear GenericError, and the guest carries on.
    let e = qmp.execute("system_powerdown", Value::Null).unwrap_err();
    assert_eq!(e.class(), Some("GenericError"), "{e}");
    assert!(e.to_string().contains("no ACPI"), "{e}");
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    quit(&vmm, &mut qmp);
}

#[test]
fn hmp_info_registers_name_kvm_and_pmemsave() {
    let dir = TempDir::new("op-hmp").unwrap();
    let (vmm, socket) = start(&dir, &["-name", "db2", "-smp", "2", "-serial", "null"]);
    let mut qmp = connect(&socket);
    assert_eq!(qmp.hmp("info name").unwrap(), "db2\r\n");
    assert_eq!(qmp.hmp("info kvm").unwrap(), "kvm support: enabled\r\n");

    let regs = qmp.hmp("info registers").unwrap();
    assert!(regs.starts_with("RAX="), "{regs}");
    assert!(regs.contains("\r\nRIP="), "{regs}");
    assert!(regs.contains("\r\nCR0="), "{regs}");
    assert!(!regs.contains("CPU#"), "{regs}");
    let all = qmp.hmp("info registers -a").unwrap();
    assert!(
        all.contains("CPU#0\r\n") && all.contains("CPU#1\r\n"),
        "{all}"
    );
    // Reading registers does not leave the guest stopped.
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    assert!(
        qmp.hmp("info registers 5")
            .unwrap()
            .starts_with("Error: Parameter 'cpu-index' expects a CPU number"),
    );

    let dump = dir.join("dump.bin");
    let line = format!("pmemsave 0x100000 8192 {}", dump.display());
    assert_eq!(qmp.hmp(&line).unwrap(), "");
    assert_eq!(std::fs::metadata(&dump).unwrap().len(), 8192);

    // Postcopy resume is refused; no migration starts.
    let refused = qmp.hmp(&format!("migrate -r file:{}", dir.join("s").display()));
    assert_eq!(
        refused.unwrap(),
        "Error: Cannot resume if there is no paused migration\r\n"
    );
    assert_eq!(
        qmp.execute("query-migrate", Value::Null).unwrap(),
        json!({})
    );
    assert!(!dir.join("s").exists());
    quit(&vmm, &mut qmp);
}

#[test]
fn start_paused_with_s_and_pidfile_like_qemu() {
    let dir = TempDir::new("op-S").unwrap();
    let pidfile = dir.join("vm.pid");
    let pidfile_arg = pidfile.display().to_string();
    let (vmm, socket) = start(&dir, &["-S", "-pidfile", &pidfile_arg, "-serial", "stdio"]);
    let mut qmp = connect(&socket);
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", vmm.pid())
    );
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap(),
        json!({"status": "prelaunch", "running": false})
    );
    // QMP answered while the guest was held: nothing has ticked yet. cont starts it.
    assert_eq!(vmm.stdout_text(), "", "the guest ran before cont");
    qmp.execute("cont", Value::Null).unwrap();
    qmp.wait_event("RESUME", LONG).unwrap();
    vmm.wait_for_all_ticks(1, 3, LONG).unwrap();
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    quit(&vmm, &mut qmp);
    assert!(!pidfile.exists(), "the pidfile outlived the VMM");
}

#[test]
fn qemu_options_that_do_not_apply_say_so() {
    let dir = TempDir::new("op-refuse").unwrap();
    let socket = dir.join("q.sock");
    let sock = socket.display().to_string();
    for (args, needles) in [
        (
            vec!["-daemonize"],
            vec!["not supported: -daemonize", "-pidfile"],
        ),
        (
            vec!["-monitor", "stdio"],
            vec!["not supported: -monitor", "-qmp"],
        ),
        (
            vec!["-chardev", "socket,id=c0,path=/tmp/c0,server=on"],
            vec!["not supported: -chardev"],
        ),
        (
            vec!["-qmp", &format!("unix:{sock}")],
            vec!["client", "server=on,wait=off"],
        ),
        (
            vec!["-qmp", &format!("unix:{sock},server=on")],
            vec!["wait for a client", "add ,wait=off"],
        ),
    ] {
        let mut full = vec!["-m", "16M", "--guest", HEARTBEAT];
        full.extend(args);
        assert_vmm_startup_error(&full, &needles, LONG);
        assert!(!socket.exists());
    }
    // Accepted for compatibility, and --help says so.
    let help = std::process::Command::new(vmm_bin())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for listed in [
        "Accepted for QEMU compatibility",
        "-enable-kvm, -accel kvm",
        "-nographic, -display none",
        "-machine q35",
        "-daemonize, -monitor, -chardev",
        "-pidfile",
        "-S",
        "--log-timestamps",
    ] {
        assert!(help.contains(listed), "--help lacks {listed:?}:\n{help}");
    }
}

#[test]
fn migration_parameters_that_do_nothing_are_refused() {
    let dir = TempDir::new("op-params").unwrap();
    let (vmm, socket) = start(&dir, &["-serial", "null"]);
    let mut qmp = connect(&socket);
    for args in [
        json!({"max-bandwidth": 1000}),
        json!({"multifd-channels": 8}),
        json!({"downtime-limit": 10}),
    ] {
        let e = qmp
            .execute("migrate-set-parameters", args.clone())
            .unwrap_err();
        assert_eq!(e.class(), Some("GenericError"), "{args}: {e}");
        assert!(e.to_string().contains("not supported by this VMM"), "{e}");
    }
    let out = qmp.hmp("migrate_set_parameter max-bandwidth 10M").unwrap();
    assert!(
        out.starts_with("Error: Parameter 'max-bandwidth' is not supported"),
        "{out}"
    );
    // Nothing changed, and what does work still does.
    let params = qmp
        .execute("query-migrate-parameters", Value::Null)
        .unwrap();
    assert_eq!(params["max-bandwidth"], 128 << 20);
    assert_eq!(params["multifd-channels"], 2);
    qmp.execute(
        "migrate-set-parameters",
        json!({"mode": "cpr-exec", "max-bandwidth": 134217728}),
    )
    .unwrap();
    assert_eq!(
        qmp.execute("query-migrate-parameters", Value::Null)
            .unwrap()["mode"],
        "cpr-exec"
    );
    quit(&vmm, &mut qmp);
}

#[test]
fn start_is_logged_once_with_what_an_operator_needs() {
    let dir = TempDir::new("op-log").unwrap();
    let (vmm, socket) = start(
        &dir,
        &[
            "-name",
            "log1",
            "-v",
            "--log-timestamps",
            "wall",
            "-serial",
            "null",
        ],
    );
    let mut qmp = connect(&socket);
    quit(&vmm, &mut qmp);
    let stderr = vmm.stderr_text();
    let started: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(" started: "))
        .collect();
    assert_eq!(started.len(), 1, "{stderr}");
    let line = started[0];
    for needle in [
        "INFO",
        &format!("pid {}", vmm.pid()),
        "name log1",
        "1 vCPU(s) and 16 MiB RAM (memfd)",
        "built-in guest heartbeat",
        &format!("QMP unix:{}", socket.display()),
        "serial null",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line}");
    }
    // Wall-clock UTC timestamp first: 2026-12-06T04:05:06.123456Z
    let stamp = line.split(' ').next().unwrap();
    assert_eq!(stamp.len(), 27, "{line}");
    assert!(
        stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
        "{line}"
    );
}

/// 2 MiB huge pages the host could hand out right now (free, not reserved, plus overcommit).
fn available_huge_pages() -> u64 {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
        + read("nr_overcommit_hugepages").saturating_sub(read("surplus_hugepages"))
}

#[test]
fn hugepages_without_enough_reserved_is_one_clear_error_not_sigbus() {
    // More pages than the host has free, however many that is.
    let mib = ((available_huge_pages() + 16) * 2).max(32);
    let size = format!("{mib}M");
    let sized = format!("{mib}M,hugepages=on");
    let pages = (mib / 2).to_string();
    for args in [
        vec!["-m", &sized, "--guest", "memcheck", "-serial", "null"],
        vec![
            "-m",
            &size,
            "--hugepages",
            "--guest",
            "memcheck",
            "-serial",
            "null",
        ],
    ] {
        assert_vmm_startup_error(
            &args,
            &[
                "/proc/sys/vm/nr_hugepages",
                &format!("needs {pages} free 2 MiB huge pages"),
            ],
            LONG,
        );
    }
}

/// Runs a cpr-exec `migrate` with `command` and returns the QMP answer to it (an error when it
/// is refused before anything stops) and, when it started, the update's end.
fn try_update(qmp: &mut QmpClient, command: &[String], state: &Path) -> Result<String, String> {
    cpr_tests::cpr::set_cpr_exec_command(qmp, command).map_err(|e| e.to_string())?;
    qmp.execute(
        "migrate",
        json!({"uri": format!("file:{}", state.display())}),
    )
    .map_err(|e| e.to_string())?;
    let update = cpr_tests::cpr::wait_update_end(qmp, true, LONG).map_err(|e| e.to_string())?;
    Ok(format!("{}: {}", update.status(), update.error_desc()))
}

/// The monitor is never lost silently: a new command line without -qmp is refused before the
/// guest stops; one that serves it elsewhere is refused by the new VMM and rolled back; an
/// -incoming that contradicts the update's state file is refused too.
#[test]
fn an_update_never_loses_the_monitor_or_reads_the_wrong_state() {
    let dir = TempDir::new("op-monitor").unwrap();
    let (vmm, socket) = start(&dir, &["-serial", "null"]);
    let pid = vmm.pid();
    let mut qmp = connect(&socket);
    let state = dir.join("vm.state");
    let machine: Vec<String> = ["-m", "16M", "--guest", HEARTBEAT, "-serial", "null"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let vmm_path = vmm_bin().display().to_string();

    // No -qmp: refused before anything stops (no STOP event, still running).
    let mut no_qmp = vec![vmm_path.clone()];
    no_qmp.extend(machine.clone());
    let e = try_update(&mut qmp, &no_qmp, &state).unwrap_err();
    assert!(e.contains("has no -qmp"), "{e}");
    let v = qmp.execute("query-status", Value::Null).unwrap();
    assert_eq!(v["status"], "running");

    // -incoming naming another file: refused before anything stops.
    let mut wrong = no_qmp.clone();
    wrong.extend(["-qmp".to_string(), qmp_socket_arg(&socket)]);
    wrong.extend([
        "-incoming".to_string(),
        "file:/tmp/elsewhere.state".to_string(),
    ]);
    let e = try_update(&mut qmp, &wrong, &state).unwrap_err();
    assert!(e.contains("-incoming file:/tmp/elsewhere.state"), "{e}");

    // -qmp on another path: only the new VMM can tell; it refuses and the guest rolls back.
    let mut elsewhere = no_qmp.clone();
    elsewhere.extend(["-qmp".to_string(), qmp_socket_arg(&dir.join("other.sock"))]);
    let outcome = try_update(&mut qmp, &elsewhere, &state).unwrap();
    assert!(
        outcome.starts_with("failed") && outcome.contains("listens on"),
        "{outcome}"
    );
    let v = qmp.execute("query-status", Value::Null).unwrap();
    assert_eq!(v["status"], "running");
    assert!(!dir.join("other.sock").exists());

    // And the right command line still works, without -incoming at all.
    let mut good = no_qmp.clone();
    good.extend(["-qmp".to_string(), qmp_socket_arg(&socket)]);
    let outcome = try_update(&mut qmp, &good, &state).unwrap();
    assert!(outcome.starts_with("completed"), "{outcome}");
    assert_eq!(qmp.server_pid().unwrap(), pid);
    quit(&vmm, &mut qmp);
}

/// A malformed `--sha256` is refused by `migrate-set-parameters`, before any update starts.
#[test]
fn a_malformed_sha256_is_refused_when_the_command_is_set() {
    let dir = TempDir::new("op-sha").unwrap();
    let (vmm, socket) = start(&dir, &["-serial", "null"]);
    let mut qmp = connect(&socket);
    let shim = shim_bin().display().to_string();
    let e = qmp
        .execute(
            "migrate-set-parameters",
            json!({"mode": "cpr-exec", "cpr-exec-command": [shim, "--sha256", "not-a-digest", "--", "vmm"]}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("64 hex digits"), "{e}");
    let params = qmp
        .execute("query-migrate-parameters", Value::Null)
        .unwrap();
    assert_eq!(params["cpr-exec-command"], json!([]), "{params}");
    quit(&vmm, &mut qmp);
}

/// `pmemsave` writes a private file (0600, also over an existing one) and never follows a
/// symlink at the path (which could point at any file the VMM may write).
#[test]
fn pmemsave_writes_a_private_dump_and_refuses_symlinks() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("op-pmem").unwrap();
    let (vmm, socket) = start(&dir, &["-serial", "null"]);
    let mut qmp = connect(&socket);
    let dump = dir.join("dump");
    std::fs::write(&dump, b"old").unwrap();
    std::fs::set_permissions(&dump, std::fs::Permissions::from_mode(0o644)).unwrap();
    qmp.execute(
        "pmemsave",
        json!({"val": 0x100000, "size": 4096, "filename": dump}),
    )
    .unwrap();
    let meta = std::fs::metadata(&dump).unwrap();
    assert_eq!(meta.len(), 4096);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let e = qmp
        .execute(
            "pmemsave",
            json!({"val": 0x100000, "size": 4096, "filename": link}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("Could not open"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    quit(&vmm, &mut qmp);
}

/// Two clients send `migrate` (cpr-exec) at the same moment: one update happens, the other
/// `migrate` is refused as a migration in progress (answered before the exec, or refused by the
/// new VMM as sent during the update), and the VM runs on, not left in postmigrate by a stray
/// migration.
#[test]
fn two_clients_migrating_at_once_make_one_update() {
    use std::io::Write;
    let dir = TempDir::new("op-race").unwrap();
    let (vmm, socket) = start(&dir, &["-serial", "null"]);
    let mut a = connect(&socket);
    let mut b = connect(&socket);
    let state = dir.join("vm.state");
    let mut command = vec![vmm_bin().display().to_string()];
    command.extend(
        ["-m", "16M", "--guest", HEARTBEAT, "-serial", "null", "-qmp"]
            .iter()
            .map(|s| s.to_string()),
    );
    command.push(qmp_socket_arg(&socket));
    cpr_tests::cpr::set_cpr_exec_command(&mut a, &command).unwrap();
    let migrate = json!({"execute": "migrate", "arguments": {"uri": format!("file:{}", state.display())}, "id": "b"});
    b.socket()
        .write_all(format!("{migrate}\n").as_bytes())
        .unwrap();
    let a_reply = a.execute(
        "migrate",
        json!({"uri": format!("file:{}", state.display())}),
    );
    let b_reply = b.execute_raw(b"").unwrap();
    let a_ok = a_reply.is_ok();
    let b_ok = b_reply.get("return").is_some();
    assert!(
        a_ok != b_ok,
        "exactly one migrate is accepted: a {a_reply:?}, b {b_reply}"
    );
    let refused = if a_ok {
        b_reply["error"]["desc"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    } else {
        a_reply.unwrap_err().to_string()
    };
    assert!(
        refused.contains("migration process in progress"),
        "{refused}"
    );
    let update = cpr_tests::cpr::wait_update_end(&mut a, true, LONG).unwrap();
    assert_eq!(update.status(), "completed", "{}", update.error_desc());
    let v = a.execute("query-status", Value::Null).unwrap();
    assert_eq!(v["status"], "running");
    let info = a.execute("query-migrate", Value::Null).unwrap();
    assert_eq!(info["status"], "completed", "{info}");
    quit(&vmm, &mut a);
}
