//! `netcheck-qemu [GUEST_FRAMES [HOST_FRAMES [HOST_RATE]]]` (defaults 500 400 200): boots the
//! netcheck guest's bzImage on QEMU's own virtio-net-pci, on a tap in a fresh network namespace,
//! with the host peer of `cpr_tests::netcheck` sending HOST_FRAMES numbered frames at HOST_RATE
//! frames/s once the guest is ready; the guest exits after sending GUEST_FRAMES of its own (one
//! per 100 Hz timer tick). Prints the guest's console and one summary line; exit status 0 if
//! every host frame was echoed exactly once, every guest frame came once and in order, and the
//! guest exited cleanly; 1 otherwise; 2 on bad usage or when QEMU or namespaces are missing.
//!
//! Environment: QEMU (default qemu-system-x86_64), NETCHECK_TIMEOUT (seconds, default 300),
//! NETCHECK_DEVICE_OPTIONS (appended to `-device virtio-net-pci,...`, e.g.
//! `,event_idx=off,mrg_rxbuf=off` or `,vectors=0`).

use std::process::ExitCode;
use std::time::Duration;

use cpr_tests::TempDir;
use cpr_tests::blkcheck::build_guest_bzimage;
use cpr_tests::netcheck::{QemuNet, run_on_qemu};
use cpr_tests::netns::NetNs;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: u64| match args.get(i) {
        None => Some(default),
        Some(a) => a.parse::<u64>().ok().filter(|&n| n > 0),
    };
    let (Some(guest_frames), Some(host_frames), Some(rate)) =
        (num(0, 500), num(1, 400), num(2, 200))
    else {
        eprintln!(
            "usage: netcheck-qemu [GUEST_FRAMES [HOST_FRAMES [HOST_RATE]]] (positive numbers)"
        );
        return ExitCode::from(2);
    };
    let qemu = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let timeout = std::env::var("NETCHECK_TIMEOUT")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(300);
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("netcheck-qemu: cannot create a network namespace with a tap (root?): {e}");
            return ExitCode::from(2);
        }
    };
    let dir = match TempDir::new("netcheck-qemu") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("netcheck-qemu: cannot create a temporary directory: {e}");
            return ExitCode::from(2);
        }
    };
    let kernel = match build_guest_bzimage("netcheck", dir.path()) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("netcheck-qemu: building netcheck.bzImage failed: {e}");
            return ExitCode::from(2);
        }
    };
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let device_options = std::env::var("NETCHECK_DEVICE_OPTIONS").unwrap_or_default();
    let opts = QemuNet {
        qemu: &qemu,
        kernel: &kernel,
        guest_frames,
        host_frames,
        host_period: period,
        timeout: Duration::from_secs(timeout),
        device_options: &device_options,
    };
    let run = match run_on_qemu(&ns, &opts) {
        Ok(run) => run,
        Err(e) => {
            eprintln!("netcheck-qemu: FAILED: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", run.console);
    let t = &run.tally;
    let problems = run.problems(guest_frames, host_frames);
    let secs = run.run_time.as_secs_f64();
    println!(
        "netcheck-qemu: {} accel {} host-sent {} echoed {} guest-frames {} run-seconds {secs:.2} \
         guest-frames/s {:.0} echoes/s {:.0}",
        if problems.is_empty() { "ok" } else { "FAILED" },
        run.accel,
        t.host_sent,
        t.echoes.len(),
        t.guest.received,
        t.guest.received as f64 / secs,
        t.echoes.len() as f64 / secs,
    );
    for p in &problems {
        println!("netcheck-qemu: {p}");
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
