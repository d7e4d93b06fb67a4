//! Smoke test of the QEMU side of the blackout benchmark: two QEMU
//! cpr-transfer and two cpr-exec updates of a 256 MiB guest, when the QEMUs
//! that `scripts/bench-setup.sh` installs are there. Without them it prints
//! why and passes, so it never fails a machine that has no QEMU.
//!
//! Timings are only sanity-checked (positive, under 10 s), never compared.

use cpr_tests::TempDir;
use cpr_tests::qemu_bench::{
    CprMode, Measurement, QemuInstall, ResumeSource, qemu_cpr_exec, qemu_cpr_transfer, summarize,
};

const RAM_MIB: u64 = 256;
const REPS: usize = 2;

fn check(measurements: &[Measurement], mode: CprMode) {
    assert_eq!(measurements.len(), REPS, "{measurements:#?}");
    for m in measurements {
        assert_eq!(m.mode, mode);
        assert_eq!(m.ram_mib, RAM_MIB);
        assert!(
            m.pause_ms > 0.0 && m.pause_ms < 10_000.0,
            "{mode} pause out of range: {m:#?}"
        );
        assert!(m.guest_progress > 0, "{m:#?}");
        if let Some(trace) = m.trace_pause_ms {
            assert!(trace > 0.0 && trace < 10_000.0, "{m:#?}");
        }
    }
    let summary = summarize(measurements).unwrap();
    eprintln!(
        "{mode} at {RAM_MIB} MiB: median {:.2} ms (min {:.2}, max {:.2}); {}",
        summary.median_ms,
        summary.min_ms,
        summary.max_ms,
        serde_json::to_string(measurements).unwrap()
    );
}

#[test]
fn qemu_cpr_pauses_are_measured() {
    let qemu = QemuInstall::detect();
    eprintln!("{}", qemu.describe());
    let dir = TempDir::new("qbench").unwrap();

    if qemu.cpr_transfer_available() {
        let measurements = qemu_cpr_transfer(&qemu, RAM_MIB, REPS, dir.path()).unwrap();
        check(&measurements, CprMode::CprTransfer);
        assert!(
            measurements
                .iter()
                .all(|m| m.resume_source == ResumeSource::QmpEvent)
        );
    } else {
        eprintln!("SKIP qemu cpr-transfer: QEMU >= 10.0 not installed (scripts/bench-setup.sh)");
    }

    if qemu.cpr_exec_available() {
        let measurements = qemu_cpr_exec(&qemu, RAM_MIB, REPS, dir.path()).unwrap();
        check(&measurements, CprMode::CprExec);
        assert!(
            measurements
                .iter()
                .all(|m| m.touched_pages == RAM_MIB * 256)
        );
    } else {
        eprintln!("SKIP qemu cpr-exec: no QEMU >= 10.2 in the sid chroot (scripts/bench-setup.sh)");
    }
}
