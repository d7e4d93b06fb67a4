//! virtio-net end to end with traffic: the `netcheck` driver guest on our virtio-net-pci, a tap
//! in a throw-away network namespace, and a host peer on an `AF_PACKET` socket
//! (`cpr_tests::netcheck`) sending numbered frames at a steady rate while the VM is live-updated
//! (through the shim and directly, alternating builds) or handed over by cpr-transfer. Every
//! host frame must come back exactly once, every guest frame must arrive exactly once and in
//! order; the largest gap in the echo stream is printed per update (it should be about the
//! blackout). The tap is passed as `fd=N` (opened by the test inside the namespace, as a
//! management layer does) or named with `ifname=` (the VMM runs inside the namespace).

use std::os::fd::AsRawFd;
use std::time::Duration;

use cpr_tests::blkcheck::build_guest_bzimage;
use cpr_tests::cpr::{alternating_update, cpr_update, direct_command, shim_command};
use cpr_tests::netcheck::*;
use cpr_tests::netns::{IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, NetNs};
use cpr_tests::transfer::{cpr_channel_arg, migrate_cpr_transfer, wait_migration_end};
use cpr_tests::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(120);

/// Live updates of a VM whose guest echoes a steady stream: `updates` of them, alternating
/// builds, every third one direct and the others through the shim. Prints the largest echo
/// gap and the blackout per update.
fn live_updates_keep_every_frame(test: &str, tap: Tap, updates: usize) {
    let Some(mut vm) = NetVm::start(test, tap) else {
        return;
    };
    let state = vm.dir.join("vm.state");
    vm.wait_echoes(20);
    let mut gaps = Vec::new();
    for i in 0..updates {
        let (command, how) = alternating_update(i, &vm.args, &state);
        vm.peer.take_max_echo_gap(); // a new window starts here
        let update = cpr_update(&mut vm.qmp, &command, &state, true, LONG).unwrap();
        if update.status() != "completed" {
            panic!("update {i} {}: {}", update.status(), update.error_desc());
        }
        vm.wait_echoes(20);
        let gap = vm.peer.take_max_echo_gap();
        let blackout = update.blackout_ns().unwrap_or(0) as f64 / 1e6;
        eprintln!(
            "{test}: update {i:2} ({how}): blackout {blackout:.2} ms, largest echo gap {:.2} ms",
            gap.as_secs_f64() * 1e3
        );
        gaps.push(gap.as_secs_f64() * 1e3);
    }
    let t = vm.finish();
    let (min, median, max) = cpr_tests::cpr::min_median_max(&gaps);
    eprintln!(
        "{test}: {updates} updates, {} host frames echoed once each, {} guest frames in order; \
         largest echo gap per update min {min:.2} median {median:.2} max {max:.2} ms",
        t.host_sent, t.guest.received
    );
}

#[test]
fn fifty_live_updates_with_a_passed_tap_lose_no_frame() {
    live_updates_keep_every_frame(
        "fifty_live_updates_with_a_passed_tap_lose_no_frame",
        Tap::Fd,
        50,
    );
}

#[test]
fn live_updates_with_a_tap_named_inside_the_namespace_lose_no_frame() {
    live_updates_keep_every_frame(
        "live_updates_with_a_tap_named_inside_the_namespace_lose_no_frame",
        Tap::Ifname,
        6,
    );
}

/// A rollback in the middle of the stream (the new VMM crashes just before it resumes the
/// guest): the previous VMM takes the guest and the same tap back, and nothing is lost or
/// doubled; then an exec that fails (no such program) leaves the old VMM running it on.
#[test]
fn a_rollback_and_a_failed_exec_lose_no_frame() {
    let test = "a_rollback_and_a_failed_exec_lose_no_frame";
    let Some(mut vm) = NetVm::start(test, Tap::Fd) else {
        return;
    };
    let state = vm.dir.join("vm.state");
    vm.wait_echoes(20);
    let mut crashing = vm.args.clone();
    crashing.extend(["--cpr-test-fault".to_string(), "crash-before-resume".into()]);
    let missing = vm.dir.join("no-such-vmm");
    for command in [
        shim_command(&shim_bin(), &[], &vmm_bin(), &crashing, &state),
        direct_command(&missing, &vm.args, &state),
    ] {
        vm.peer.take_max_echo_gap();
        let update = cpr_update(&mut vm.qmp, &command, &state, true, LONG).unwrap();
        assert_eq!(update.status(), "failed", "{command:?}");
        vm.wait_echoes(20);
        eprintln!(
            "{test}: {}: largest echo gap {:.2} ms",
            update.error_desc(),
            vm.peer.take_max_echo_gap().as_secs_f64() * 1e3
        );
    }
    vm.finish();
}

/// cpr-transfer: a second VMM (in the namespace too) takes the guest and its tap over the CPR
/// channel; the stream goes on there with nothing lost or doubled.
#[test]
fn cpr_transfer_hands_over_the_tap_without_losing_a_frame() {
    let test = "cpr_transfer_hands_over_the_tap_without_losing_a_frame";
    let Some(mut vm) = NetVm::start(test, Tap::Ifname) else {
        return;
    };
    vm.wait_echoes(20);
    let main = vm.dir.join("main.sock");
    let cpr = vm.dir.join("cpr.sock");
    let socket2 = vm.dir.join("qmp2.sock");
    // The same machine with its own monitor (NetVm's arguments end with `-qmp SOCKET`).
    let mut args = vm.args[..vm.args.len() - 2].to_vec();
    args.extend([
        "-qmp".to_string(),
        qmp_socket_arg(&socket2),
        "-incoming".into(),
        format!("unix:{}", main.display()),
        "-incoming".into(),
        cpr_channel_arg(&cpr),
    ]);
    let mut command = vm.ns.exec_prefix();
    command.push(vmm_bin().display().to_string());
    command.extend(args.iter().cloned());
    let new = VmmProcess::start(&command[0], &command[1..]).unwrap();
    new.wait_for_path(&cpr, LONG).unwrap();
    vm.peer.take_max_echo_gap();
    migrate_cpr_transfer(&mut vm.qmp, &main, &cpr).unwrap();
    let statuses = wait_migration_end(&mut vm.qmp, LONG).unwrap();
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("completed"),
        "{statuses:?}; new VMM: {}",
        new.stderr_text()
    );
    new.wait_for_path(&socket2, LONG).unwrap();
    let mut qmp2 = QmpClient::connect_and_negotiate(&socket2, LONG).unwrap();
    qmp2.execute("cont", Value::Null).unwrap(); // paused after the restore, as in QEMU
    vm.qmp.execute("quit", Value::Null).unwrap();
    let old = std::mem::replace(&mut vm.vmm, new);
    vm.qmp = qmp2;
    old.wait_exit(LONG).unwrap();
    vm.wait_echoes(20);
    let gap = vm.peer.take_max_echo_gap();
    eprintln!(
        "{test}: largest echo gap across the transfer {:.2} ms",
        gap.as_secs_f64() * 1e3
    );
    vm.vmm
        .wait_for_stdout_contains("netcheck: sent ", LONG)
        .unwrap();
    vm.finish();
}

/// No network device: the guest (flat, and the bzImage through `-kernel`) says so and ends the
/// VM with its "no device" status.
#[test]
fn without_a_network_device_netcheck_says_so_and_exits() {
    let dir = TempDir::new("net-nodev").unwrap();
    let kernel = build_guest_bzimage("netcheck", dir.path()).unwrap();
    let kernel = kernel.display().to_string();
    for guest in [["--guest", "netcheck"], ["-kernel", kernel.as_str()]] {
        let vmm = VmmProcess::start_vmm(["-m", "64M"].iter().chain(&guest));
        let code = vmm.wait_exit(LONG).unwrap().code();
        let console = vmm.stdout_text();
        assert!(
            console.contains("netcheck: no virtio-net device found\n"),
            "{console}"
        );
        assert_eq!(
            code,
            Some(i32::from(EXIT_NO_DEVICE)),
            "{guest:?}: {console}"
        );
    }
}

/// The same driver (bzImage) on QEMU's own virtio-net-pci, on a tap in a namespace: every host
/// frame echoed once, every guest frame once and in order, a clean exit. QEMU is not installed
/// in CI: run with `-- --ignored` after `scripts/bench-setup.sh` (or scripts/netcheck-qemu.sh).
#[test]
#[ignore = "needs QEMU (scripts/bench-setup.sh): cargo test --test virtio_net -- --ignored"]
fn qemu_virtio_net_echoes_every_frame() {
    let test = "qemu_virtio_net_echoes_every_frame";
    let qemu = "qemu-system-x86_64";
    if std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .is_err()
    {
        prerequisite_missing(test, &format!("{qemu} is not installed"));
        return;
    }
    let Some(ns) = NetNs::available(test) else {
        return;
    };
    let dir = TempDir::new("net-qemu").unwrap();
    let kernel = build_guest_bzimage("netcheck", dir.path()).unwrap();
    // As offered; without EVENT_IDX and MRG_RXBUF; without MSI-X (the driver polls).
    for (device_options, features) in [
        ("", "event-idx 1 mrg-rxbuf 1"),
        (",event_idx=off,mrg_rxbuf=off", "event-idx 0 mrg-rxbuf 0"),
        (",vectors=0", "msix unavailable, polling"),
    ] {
        let opts = QemuNet {
            qemu,
            kernel: &kernel,
            guest_frames: 300,
            host_frames: 200,
            host_period: HOST_PERIOD,
            timeout: LONG,
            device_options,
        };
        let run = run_on_qemu(&ns, &opts).unwrap();
        let problems = run.problems(300, 200);
        assert!(problems.is_empty(), "{problems:#?}\n{}", run.console);
        assert!(
            run.console.contains(features),
            "{device_options}: {}",
            run.console
        );
        assert!(
            run.console
                .contains("netcheck: sent 300 echoed 200 host 200 gaps 0 dups 0")
        );
    }
}

/// The linux-probe lists what Linux's PCI core and virtio-pci driver would read: both virtio
/// functions (net 0x1041 on a tap, blk 0x1042), their memory BAR, the four virtio structures
/// and the MSI-X capability with its table size.
#[test]
fn linux_probe_lists_the_virtio_functions_and_their_capabilities() {
    let test = "linux_probe_lists_the_virtio_functions_and_their_capabilities";
    let Some(ns) = NetNs::available(test) else {
        return;
    };
    build_binaries();
    let dir = TempDir::new("net-probe").unwrap();
    let kernel = cpr_tests::linux_probe::build_linux_probe(dir.path()).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let tap = ns.open_tap(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).unwrap();
    let passed = nix::unistd::dup(&tap).unwrap(); // inherited: FD_CLOEXEC clear
    let netdev = format!("tap,id=n0,fd={}", passed.as_raw_fd());
    let drive = format!("file={},format=raw,if=virtio", disk.display());
    let kernel = kernel.display().to_string();
    let vmm = VmmProcess::start_vmm([
        "-m",
        "64M",
        "-kernel",
        &kernel,
        "-append",
        "probe.exit_after=1 probe.exit_code=0",
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-pci,netdev=n0",
        "-drive",
        &drive,
    ]);
    drop(passed);
    let status = vmm.wait_exit(LONG).unwrap();
    let text = vmm.stdout_text();
    assert_eq!(status.code(), Some(0), "{text}");
    let report = cpr_tests::linux_probe::parse_probe_output(&text).unwrap();
    assert!(report.ready, "{text}");
    for id in ["1af4:1041", "1af4:1042"] {
        let Some(head) = report.pci.iter().find(|l| l.ends_with(id)) else {
            panic!("{id} is not listed: {:#?}", report.pci);
        };
        let devfn = head.split(' ').nth(1).unwrap();
        let lines: Vec<&String> = report
            .pci
            .iter()
            .filter(|l| l.split(' ').nth(1) == Some(devfn) && *l != head)
            .collect();
        let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
        assert!(has(" bar 0 0xc") && has(" mem64"), "{id}: {lines:#?}");
        for cfg_type in 1..=4 {
            assert!(
                has(&format!(" virtio type {cfg_type} bar ")),
                "{id}: {lines:#?}"
            );
        }
        assert!(
            has(" cap 0x11 at ") && has(" msix table-size "),
            "{id}: {lines:#?}"
        );
    }
}
