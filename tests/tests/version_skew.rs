//! Version skew: a guest started on the previous release (`release/previous`, built from that
//! commit) is live-updated to this source and back to the previous release, through this
//! source's cpr-shim, with its memory checked after each update. This is what proves the
//! compatibility policy (a VMM reads its own formats and the previous release's) for the
//! version operators actually run.

use std::path::Path;
use std::time::Duration;

use cpr_tests::cpr::{cpr_update, shim_command};
use cpr_tests::previous_release::previous_release;
use cpr_tests::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);
const RAM: u64 = 64 << 20;

/// The memcheck guest swept its memory twice more; stopped, its memory is what it wrote.
fn assert_memory_consistent(qmp: &mut QmpClient, process: &VmmProcess, dir: &Path, what: &str) {
    let sweeps = |p: &VmmProcess| p.stdout_text().matches('B').count();
    let done = sweeps(process);
    process
        .wait_for_output(|text| text.matches('B').count() >= done + 2, LONG)
        .unwrap();
    qmp.execute("stop", Value::Null).unwrap();
    qmp.wait_event("STOP", LONG).unwrap();
    let dump = dump_memcheck_range(
        qmp,
        RAM,
        &dir.join(format!("dump-{}", what.replace(' ', "-"))),
    )
    .unwrap();
    if let Err(e) = check_memcheck_dump(&dump) {
        panic!("{what}: {e}");
    }
    qmp.execute("cont", Value::Null).unwrap();
    qmp.wait_event("RESUME", LONG).unwrap();
    assert_eq!(
        process.stdout_text().matches('A').count(),
        1,
        "{what}: the guest restarted"
    );
}

#[test]
fn updates_from_the_previous_release_to_this_one_and_back() {
    build_binaries();
    let prev = previous_release();
    let current = String::from_utf8(
        std::process::Command::new(vmm_bin())
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let dir = TempDir::new("skew").unwrap();
    let socket = dir.join("qmp.sock");
    let state = dir.join("vm.state");
    let args: Vec<String> = ["-m", "64M", "-smp", "2", "--guest", "memcheck", "-qmp"]
        .iter()
        .map(|s| s.to_string())
        .chain([qmp_socket_arg(&socket)])
        .collect();
    let process = VmmProcess::start(&prev.vmm, &args).unwrap();
    process.wait_for_path(&socket, LONG).unwrap();
    let mut qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
    process
        .wait_for_output(
            |text| text.starts_with('A') && text.matches('B').count() >= 2,
            LONG,
        )
        .unwrap();
    let pid = process.pid();
    for (target, from, to) in [
        (vmm_bin(), prev.reported_version(), None),
        (
            prev.vmm.clone(),
            String::new(),
            Some(prev.reported_version()),
        ),
    ] {
        let command = shim_command(&shim_bin(), &[], &target, &args, &state);
        let update = cpr_update(&mut qmp, &command, &state, true, LONG).unwrap();
        assert_eq!(update.status(), "completed", "{}", update.info);
        if !from.is_empty() {
            assert_eq!(update.from_version(), from, "{}", update.info);
        }
        match &to {
            Some(v) => assert_eq!(update.to_version(), v, "{}", update.info),
            None => assert!(
                current.contains(update.to_version()),
                "to-version {} is not this source's ({current})",
                update.to_version()
            ),
        }
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
            target.canonicalize().unwrap(),
            "pid {pid} does not run {}",
            target.display()
        );
        eprintln!(
            "{} -> {}: blackout {:.3} ms",
            update.from_version(),
            update.to_version(),
            update.x_cpr()["blackout-ns"].as_f64().unwrap_or(f64::NAN) / 1e6
        );
        assert_memory_consistent(
            &mut qmp,
            &process,
            dir.path(),
            &format!("after the update to {}", update.to_version()),
        );
    }
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(process.wait_exit(LONG).unwrap().code(), Some(0));
}
