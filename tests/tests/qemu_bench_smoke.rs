//! Smoke test of the QEMU side of the blackout benchmark: two QEMU
//! cpr-transfer and two cpr-exec updates of a 256 MiB guest, with the QEMUs
//! that `scripts/bench-setup.sh` installs.
//!
//! Not part of the default run (`#[ignore]`): it measures QEMU, not cpr-vmm,
//! and needs two QEMUs that `scripts/test.sh` does not install (QEMU 10 from
//! bookworm-backports and a debootstrapped Debian sid chroot for QEMU >= 10.2:
//! hundreds of MB and minutes on every CI run). Run it on purpose, after the
//! set-up, where it fails (never skips) when either QEMU is missing:
//!
//! ```text
//! sudo scripts/bench-setup.sh
//! cargo test --release -p cpr-tests --test qemu_bench_smoke -- --ignored
//! ```
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
#[ignore = "needs the QEMUs of scripts/bench-setup.sh; run with --ignored after it"]
fn qemu_cpr_pauses_are_measured() {
    let qemu = QemuInstall::detect();
    eprintln!("{}", qemu.describe());
    let dir = TempDir::new("qbench").unwrap();

    assert!(
        qemu.cpr_transfer_available(),
        "no QEMU >= 10.0 for cpr-transfer: run `sudo scripts/bench-setup.sh` first"
    );
    {
        let measurements = qemu_cpr_transfer(&qemu, RAM_MIB, REPS, dir.path()).unwrap();
        check(&measurements, CprMode::CprTransfer);
        assert!(
            measurements
                .iter()
                .all(|m| m.resume_source == ResumeSource::QmpEvent)
        );
    }

    assert!(
        qemu.cpr_exec_available(),
        "no QEMU >= 10.2 in the sid chroot for cpr-exec: run `sudo scripts/bench-setup.sh` first"
    );
    {
        let measurements = qemu_cpr_exec(&qemu, RAM_MIB, REPS, dir.path()).unwrap();
        check(&measurements, CprMode::CprExec);
        assert!(
            measurements
                .iter()
                .all(|m| m.touched_pages == RAM_MIB * 256)
        );
    }
}
