//! virtio-net from the outside: the command-line and tap checks at start (one clear error
//! each), a tap passed by fd or opened by name inside a network namespace, and the tap fd
//! across a live update (the very same tap, never opened again by name).
//!
//! The guest's side (a driver sending and receiving across updates) is the `netcheck` built-in
//! guest's.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use cpr_tests::cpr::{cpr_update, direct_command, shim_command};
use cpr_tests::netns::{IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, NetNs};
use cpr_tests::transfer::{
    CprSpelling, MainChannel, Target, migrate_cpr_transfer, wait_migration_end,
};
use cpr_tests::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn base_args() -> Vec<String> {
    strings(&["-m", "16M", "--guest", "heartbeat"])
}

/// Lets the next VMM started inherit `fd` (as a management layer passes a tap), until dropped.
struct Inherited(RawFd);

impl Inherited {
    fn new(fd: &OwnedFd) -> Self {
        cpr_common::fds::set_cloexec(fd.as_raw_fd(), false).unwrap();
        Inherited(fd.as_raw_fd())
    }
}

impl Drop for Inherited {
    fn drop(&mut self) {
        let _ = cpr_common::fds::set_cloexec(self.0, true);
    }
}

/// The /dev/net/tun fds `pid` holds that are attached to the tap `name` (fdinfo's `iff:`).
fn tun_fds(pid: u32, name: &str) -> Vec<OpenFd> {
    let attached = |fd: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).is_ok_and(|info| {
            info.lines()
                .any(|l| l.strip_prefix("iff:").is_some_and(|v| v.trim() == name))
        })
    };
    list_fds(pid)
        .unwrap()
        .into_iter()
        .filter(|f| f.target == "/dev/net/tun" && attached(f.fd))
        .collect()
}

/// A running VM with a NIC on `ns`'s tap, passed by fd as a management layer does (its copy
/// closed once the VMM holds its own).
struct PassedTapVm {
    dir: TempDir,
    /// The machine's arguments, without the monitor.
    machine: Vec<String>,
    /// All of them.
    args: Vec<String>,
    process: VmmProcess,
    qmp: QmpClient,
}

impl PassedTapVm {
    fn start(ns: &NetNs, prefix: &str, device: &str) -> Self {
        let tap = ns.open_tap(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).unwrap();
        let dir = TempDir::new(prefix).unwrap();
        let socket = dir.join("qmp.sock");
        let mut machine = base_args();
        machine.extend(strings(&[
            "-netdev",
            &format!("tap,id=n0,fd={}", tap.as_raw_fd()),
            "-device",
            device,
        ]));
        let mut args = machine.clone();
        args.extend(strings(&["-qmp", &qmp_socket_arg(&socket)]));
        let process = {
            let _inherit = Inherited::new(&tap);
            VmmProcess::start_vmm(&args)
        };
        drop(tap);
        process.wait_for_path(&socket, LONG).unwrap();
        let qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
        PassedTapVm {
            dir,
            machine,
            args,
            process,
            qmp,
        }
    }
}

#[test]
fn bad_nics_are_refused_at_start_with_one_clear_error() {
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let not_a_tap = OwnedFd::from(file);
    let not_a_tap_text = format!("fd {} is not a tap device", not_a_tap.as_raw_fd());
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            strings(&["-device", "virtio-net-pci,netdev=nope"]),
            vec!["netdev 'nope' does not exist"],
        ),
        (
            strings(&["-device", "e1000,netdev=n0"]),
            vec!["unknown device", "virtio-net-pci"],
        ),
        (
            strings(&[
                "-netdev",
                "tap,id=n0,ifname=cprx0,script=no,downscript=no",
                "-device",
                "virtio-net-pci,netdev=n0",
                "-device",
                "virtio-net-pci,netdev=n0",
            ]),
            vec!["netdev 'n0' is used by two devices"],
        ),
        (
            strings(&[
                "-netdev",
                "tap,id=n0,ifname=cprx0,script=no,downscript=no",
                "-device",
                "virtio-net-pci,netdev=n0,mac=52:54:00:12:34",
            ]),
            vec!["MAC address '52:54:00:12:34' does not parse"],
        ),
        (
            strings(&[
                "-netdev",
                "tap,id=n0,ifname=cprx0,script=/etc/qemu-ifup",
                "-device",
                "virtio-net-pci,netdev=n0",
            ]),
            vec!["script=/etc/qemu-ifup is not supported", "script=no"],
        ),
        (
            strings(&[
                "-netdev",
                "tap,id=n0,fd=77",
                "-device",
                "virtio-net-pci,netdev=n0",
            ]),
            vec!["netdev 'n0'", "fd 77 is not open"],
        ),
        (
            strings(&[
                "-netdev",
                &format!("tap,id=n0,fd={}", not_a_tap.as_raw_fd()),
                "-device",
                "virtio-net-pci,netdev=n0",
            ]),
            vec!["netdev 'n0'", &not_a_tap_text],
        ),
    ];
    let _inherit = Inherited::new(&not_a_tap);
    for (extra, needles) in cases {
        let mut args = base_args();
        args.extend(extra);
        assert_vmm_startup_error(&args, &needles, LONG);
    }
}

/// Without permission on /dev/net/tun (an unprivileged user), the VMM says what it needs.
#[test]
fn no_permission_on_dev_net_tun_is_one_clear_error() {
    if !nix::unistd::geteuid().is_root() {
        prerequisite_missing(
            "no_permission_on_dev_net_tun_is_one_clear_error",
            "needs root to drop to another user",
        );
        return;
    }
    build_binaries();
    let mut args = strings(&[
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ]);
    args.push(vmm_bin().display().to_string());
    args.extend(base_args());
    args.extend(strings(&[
        "-netdev",
        "tap,id=n0,ifname=cprx1,script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=n0",
    ]));
    let vmm = VmmProcess::start("setpriv", &args).unwrap();
    let status = vmm.wait_exit(LONG).unwrap();
    let stderr = vmm.stderr_text();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("vmm: netdev 'n0': "), "{stderr}");
    assert!(
        stderr.contains("/dev/net/tun") || stderr.contains("permission"),
        "{stderr}"
    );
}

/// A tap opened without a vnet header cannot carry the guest's frames: refused by name.
#[test]
fn a_passed_tap_without_a_vnet_header_is_refused() {
    let Some(ns) = NetNs::available("a_passed_tap_without_a_vnet_header_is_refused") else {
        return;
    };
    let tap = ns.open_tap(IFF_TAP | IFF_NO_PI).unwrap();
    let _inherit = Inherited::new(&tap);
    let mut args = base_args();
    args.extend(strings(&[
        "-netdev",
        &format!("tap,id=n0,fd={}", tap.as_raw_fd()),
        "-device",
        "virtio-net-pci,netdev=n0",
    ]));
    assert_vmm_startup_error(&args, &["netdev 'n0'", "IFF_VNET_HDR", ns.tap()], LONG);
}

/// A VM with a NIC on a tap passed by fd: the monitor shows it, and a live update (through
/// the shim, then directly) carries the same tap, close-on-exec, without opening it again.
#[test]
fn a_passed_tap_is_shown_and_survives_live_updates() {
    let Some(ns) = NetNs::available("a_passed_tap_is_shown_and_survives_live_updates") else {
        return;
    };
    let PassedTapVm {
        dir,
        args,
        process,
        mut qmp,
        ..
    } = PassedTapVm::start(
        &ns,
        "net-exec",
        "virtio-net-pci,netdev=n0,id=eth0,mac=52:54:00:ab:cd:ef",
    );
    let pid = process.pid();
    let filters = qmp.execute("query-rx-filter", Value::Null).unwrap();
    assert_eq!(filters[0]["name"], "eth0", "{filters}");
    assert_eq!(filters[0]["main-mac"], "52:54:00:ab:cd:ef", "{filters}");
    let text = qmp.hmp("info network").unwrap();
    assert!(text.contains("macaddr=52:54:00:ab:cd:ef"), "{text}");
    assert!(text.contains(&format!("ifname={}", ns.tap())), "{text}");
    let before = tun_fds(pid, ns.tap());
    assert_eq!(
        before.len(),
        2,
        "the passed fd and the VMM's own copy: {before:?}"
    );
    assert_eq!(
        before.iter().filter(|f| f.is_cloexec()).count(),
        1,
        "{before:?}"
    );

    let state = dir.join("vm.state");
    let command = shim_command(&shim_bin(), &[], &vmm_bin(), &args, &state);
    let update = cpr_update(&mut qmp, &command, &state, true, LONG).unwrap();
    assert_eq!(update.status(), "completed", "{}", update.error_desc());
    assert_eq!(process.pid(), pid);
    let after = tun_fds(pid, ns.tap());
    assert_eq!(
        after.len(),
        2,
        "the new VMM holds the same tap (plus the fd it was started with): {after:?}"
    );
    assert_eq!(
        after.iter().filter(|f| f.is_cloexec()).count(),
        1,
        "re-marked close-on-exec after the update: {after:?}"
    );
    let text = qmp.hmp("info network").unwrap();
    assert!(text.contains(&format!("ifname={}", ns.tap())), "{text}");
    let command = direct_command(&vmm_bin(), &args, &state);
    let update = cpr_update(&mut qmp, &command, &state, true, LONG).unwrap();
    assert_eq!(update.status(), "completed", "{}", update.error_desc());
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    qmp.execute("quit", Value::Null).unwrap();
    process.wait_exit(LONG).unwrap();
}

/// A new command line without the NIC is refused by the new VMM (the state has a device it
/// lacks) and the rollback brings the guest back on the old VMM with the same tap.
#[test]
fn an_update_that_forgets_the_nic_rolls_back_with_the_tap() {
    let Some(ns) = NetNs::available("an_update_that_forgets_the_nic_rolls_back_with_the_tap")
    else {
        return;
    };
    let dir = TempDir::new("net-forget").unwrap();
    let socket = dir.join("qmp.sock");
    let mut args = ns.exec_prefix();
    args.push(vmm_bin().display().to_string());
    let vmm_args_start = args.len();
    args.extend(base_args());
    args.extend(strings(&[
        "-netdev",
        &format!("tap,id=n0,ifname={},script=no,downscript=no", ns.tap()),
        "-device",
        "virtio-net-pci,netdev=n0",
        "-qmp",
        &qmp_socket_arg(&socket),
    ]));
    build_binaries();
    let process = VmmProcess::start(&args[0], &args[1..]).unwrap();
    process.wait_for_path(&socket, LONG).unwrap();
    let mut qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
    // `ip netns exec` execs the VMM: the process is the VMM from here on.
    let pid = process.pid();
    assert_eq!(tun_fds(pid, ns.tap()).len(), 1);
    let without: Vec<String> = args[vmm_args_start..]
        .iter()
        .filter(|a| !a.contains("n0") && *a != "-netdev" && *a != "-device")
        .cloned()
        .collect();
    let state = dir.join("vm.state");
    let command = shim_command(&shim_bin(), &[], &vmm_bin(), &without, &state);
    let update = cpr_update(&mut qmp, &command, &state, true, LONG).unwrap();
    assert_eq!(update.status(), "failed");
    assert!(
        update.error_desc().contains("virtio-net:n0"),
        "{}",
        update.error_desc()
    );
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    let held = tun_fds(pid, ns.tap());
    assert_eq!(
        held.len(),
        1,
        "the rolled-back VMM holds the same tap: {held:?}"
    );
    assert!(held[0].is_cloexec(), "{held:?}");
    let text = qmp.hmp("info network").unwrap();
    assert!(text.contains(&format!("ifname={}", ns.tap())), "{text}");
    qmp.execute("quit", Value::Null).unwrap();
    process.wait_exit(LONG).unwrap();
}

/// cpr-transfer hands the tap to the new VMM by SCM_RIGHTS: the new VMM holds the same tap
/// (it never had the fd number its command line names), and shows it.
#[test]
fn a_cpr_transfer_hands_the_same_tap_over() {
    let Some(ns) = NetNs::available("a_cpr_transfer_hands_the_same_tap_over") else {
        return;
    };
    let PassedTapVm {
        dir,
        machine,
        process: old,
        mut qmp,
        ..
    } = PassedTapVm::start(&ns, "net-transfer", "virtio-net-pci,netdev=n0,id=eth0");
    let target = Target::start(
        dir.path(),
        "new",
        &machine,
        MainChannel::Unix,
        CprSpelling::KeyValue,
        LONG,
    )
    .unwrap();
    migrate_cpr_transfer(&mut qmp, &target.main_path, &target.cpr_path).unwrap();
    let statuses = wait_migration_end(&mut qmp, LONG).unwrap();
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("completed"),
        "{statuses:?}"
    );
    let held = tun_fds(target.vmm.pid(), ns.tap());
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].is_cloexec(), "{held:?}");
    let mut new_qmp = target.connect_qmp(LONG).unwrap();
    let text = new_qmp.hmp("info network").unwrap();
    assert!(text.contains(&format!("ifname={}", ns.tap())), "{text}");
    new_qmp.execute("quit", Value::Null).unwrap();
    target.vmm.wait_exit(LONG).unwrap();
    // The old VMM may already have ended once the guest was handed over.
    let _ = qmp.execute("quit", Value::Null);
    old.wait_exit(LONG).unwrap();
}

/// `ifname=` inside a namespace: the VMM attaches to the operator's tap by name.
#[test]
fn a_tap_named_on_the_command_line_is_attached() {
    let Some(ns) = NetNs::available("a_tap_named_on_the_command_line_is_attached") else {
        return;
    };
    build_binaries();
    let dir = TempDir::new("net-ifname").unwrap();
    let socket = dir.join("qmp.sock");
    let mut args = ns.exec_prefix();
    args.push(vmm_bin().display().to_string());
    args.extend(base_args());
    args.extend(strings(&[
        "-nic",
        &format!(
            "tap,ifname={},script=no,downscript=no,model=virtio-net-pci",
            ns.tap()
        ),
        "-qmp",
        &qmp_socket_arg(&socket),
    ]));
    let process = VmmProcess::start(&args[0], &args[1..]).unwrap();
    process.wait_for_path(&socket, LONG).unwrap();
    let mut qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
    let text = qmp.hmp("info network").unwrap();
    assert!(
        text.contains(&format!("ifname={},script=no", ns.tap())),
        "{text}"
    );
    assert!(
        text.contains("macaddr=52:54:00:12:34:56"),
        "QEMU's default MAC: {text}"
    );
    qmp.execute("quit", Value::Null).unwrap();
    process.wait_exit(LONG).unwrap();
}
