//! The blkcheck virtio-blk driver guest end to end.
//!
//! On our VMM without a disk, `--guest blkcheck` must say that it found no virtio-blk device
//! and exit with its "no device" status (the built-in guest, and the bzImage through `-kernel`
//! and the 64-bit boot entry); with a disk (`-drive ...,if=virtio`) it must complete its passes
//! and leave an image the checker accepts. Against QEMU's own virtio-blk-pci
//! (modern only), the bzImage flavour of the same driver must complete its passes with no
//! mismatch and leave a disk image that the host-side checker accepts; a read-only disk gets
//! read passes and is not written; without MSI-X the driver polls, or takes INTx when told to
//! (`blkcheck.intx=1`); and the guest finds the
//! stale and corrupted sectors of an image the host wrote. The QEMU tests are `#[ignore]`d (CI
//! does not install QEMU): run them with `cargo test --release -p cpr-tests --test
//! blkcheck_qemu -- --ignored` after `scripts/bench-setup.sh`; a missing QEMU is then a recorded
//! skip, or a failure under `CI=true`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cpr_tests::blkcheck::*;
use cpr_tests::*;

const QEMU: &str = "qemu-system-x86_64";
/// Generous: QEMU and the guest share this slow, nested host with other work.
const QEMU_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs our VMM with `args` and checks that blkcheck says it found no device and exits with
/// its "no device" status.
fn assert_no_device_on_vmm(args: &[&str]) {
    let vmm = VmmProcess::start_vmm(args);
    let status = vmm.wait_exit(Duration::from_secs(120)).unwrap();
    let out = vmm.stdout_text();
    assert!(
        out.contains("blkcheck: no virtio-blk device found\n"),
        "console: {out}"
    );
    assert_eq!(
        status.code(),
        Some(i32::from(EXIT_NO_DEVICE)),
        "console: {out}"
    );
}

#[test]
fn vmm_without_a_device_reports_it_and_exits() {
    assert_no_device_on_vmm(&["-m", "64M", "--guest", "blkcheck,depth=4"]);
}

/// The bzImage flavour through our VMM's 64-bit boot protocol entry (`-kernel`): the same.
#[test]
fn vmm_boots_the_bzimage_and_it_reports_no_device() {
    let dir = TempDir::new("blkcheck-bz-vmm").unwrap();
    let kernel = build_blkcheck_bzimage(dir.path()).unwrap();
    assert_no_device_on_vmm(&["-m", "64M", "-kernel", &kernel.display().to_string()]);
}

/// Our VMM's own virtio-blk-pci (`-drive ...,if=virtio`): the same driver completes its passes
/// and leaves an image the checker accepts; its counters block says the same.
#[test]
fn vmm_virtio_blk_passes_and_the_image_checks_out() {
    let dir = TempDir::new("blkcheck-vmm").unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 2 << 20]).unwrap();
    let drive = format!("file={},format=raw,if=virtio", disk.display());
    let vmm = VmmProcess::start_vmm([
        "-m",
        "64M",
        "--guest",
        "blkcheck,depth=16,exit-after=2,exit-code=0",
        "-drive",
        &drive,
    ]);
    let status = vmm.wait_exit(QEMU_TIMEOUT).unwrap();
    let console = vmm.stdout_text();
    assert_eq!(status.code(), Some(0), "console: {console}");
    assert!(
        console.contains(" vector 0x41 apic ") && console.contains(" depth 16 region 4096 "),
        "{console}"
    );
    assert_eq!(mismatch_lines(&console), Vec::<&str>::new());
    let passes = parse_pass_lines(&console);
    assert_eq!(passes.len(), 2, "{console}");
    assert!(passes.iter().all(|p| p.requests == 1025 && p.errors == 0));
    assert!(passes[1].irqs > 0, "no queue interrupts: {console}");
    let summary = check_image(&disk, 2).unwrap();
    assert_eq!((summary.last, summary.next), (4096, 0));
}

#[test]
fn vmm_rejects_a_bad_depth() {
    assert_vmm_startup_error(
        &["-m", "64M", "--guest", "blkcheck,depth=0"],
        &["depth=N"],
        Duration::from_secs(60),
    );
}

/// Whether QEMU is there; when it is not, a recorded skip (a failure under CI=true: these
/// tests are `#[ignore]`d and run on purpose, so QEMU must be there then).
fn qemu_installed(test: &str) -> bool {
    let found = std::process::Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        prerequisite_missing(
            test,
            &format!("{QEMU} is not installed (Debian: apt-get install qemu-system-x86)"),
        );
    }
    found
}

/// Boots the blkcheck bzImage in QEMU on `disk` (KVM, else TCG) until the guest exits through
/// isa-debug-exit; returns QEMU's exit code and the guest's console.
fn run_in_qemu(
    dir: &TempDir,
    disk: &Path,
    drive_opts: &str,
    append: &str,
    device_opts: &str,
) -> (i32, String) {
    let kernel: PathBuf = build_blkcheck_bzimage(dir.path()).unwrap();
    let args = qemu_blkcheck_args(
        &["kvm", "tcg"],
        &kernel,
        append,
        disk,
        [drive_opts, device_opts],
    );
    let qemu = VmmProcess::start(QEMU, &args).unwrap();
    let status = qemu.wait_exit(QEMU_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "QEMU did not finish: {e}\nconsole: {}\nstderr: {}",
            qemu.stdout_text(),
            qemu.stderr_text()
        )
    });
    let console = qemu.stdout_text().replace('\r', "");
    let code = status
        .code()
        .unwrap_or_else(|| panic!("QEMU was killed: {status}\nconsole: {console}"));
    (code, console)
}

/// Writes `image` as the disk, runs blkcheck on it in QEMU with `[-drive options appended,
/// kernel command line, -device virtio-blk-pci options appended]` and hands `check` the disk,
/// QEMU's exit code and the console; says so and does nothing when QEMU is not installed.
fn qemu_run(
    name: &str,
    image: &[u8],
    [drive_opts, append, device_opts]: [&str; 3],
    check: impl FnOnce(&Path, i32, &str),
) {
    if !qemu_installed(name) {
        return;
    }
    let dir = TempDir::new(name).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, image).unwrap();
    let (code, console) = run_in_qemu(&dir, &disk, drive_opts, append, device_opts);
    check(&disk, code, &console);
}

/// isa-debug-exit makes QEMU exit with `(value << 1) | 1`.
fn guest_exit(code: u8) -> i32 {
    (i32::from(code) << 1) | 1
}

#[test]
#[ignore = "needs QEMU (scripts/bench-setup.sh): cargo test --test blkcheck_qemu -- --ignored"]
fn qemu_virtio_blk_passes_and_the_image_checks_out() {
    qemu_run(
        "blkcheck-qemu",
        &vec![0u8; 2 << 20],
        [
            "",
            "blkcheck.passes=2 blkcheck.depth=16 blkcheck.exit_code=0",
            "",
        ],
        |disk, code, console| {
            assert_eq!(code, guest_exit(0), "console: {console}");
            assert!(
                console.contains("blkcheck: msix table ") && console.contains(" vector 0x41 apic "),
                "the driver should use MSI-X on QEMU: {console}"
            );
            assert!(
                console.contains("event-idx 1 flush 1 ro 0"),
                "features: {console}"
            );
            assert!(
                console.contains("capacity 4096 sectors ")
                    && console.contains(" depth 16 region 4096 "),
                "{console}"
            );
            assert_eq!(mismatch_lines(console), Vec::<&str>::new());
            let passes = parse_pass_lines(console);
            assert_eq!(
                passes.iter().map(|p| p.generation).collect::<Vec<_>>(),
                [1, 2],
                "{console}"
            );
            // A pass is 512 writes, 512 reads and a FLUSH of 4 KiB requests over 2 MiB.
            assert!(passes.iter().all(|p| p.requests == 1025 && p.errors == 0));
            assert!(
                passes[1].irqs > passes[0].irqs,
                "no queue interrupts: {console}"
            );
            eprintln!("blkcheck in QEMU: {passes:?}");

            let summary = check_image(disk, 2).unwrap();
            assert_eq!(
                (summary.region, summary.last, summary.next),
                (4096, 4096, 0)
            );
            // The checker is not fooled by an image the run did not leave: a stale generation...
            assert!(check_image(disk, 3).is_err());
            // ... or one corrupted sector.
            let mut bytes = std::fs::read(disk).unwrap();
            bytes[1000 * SECTOR_SIZE + 77] ^= 0x40;
            std::fs::write(disk, &bytes).unwrap();
            let err = check_image(disk, 2).unwrap_err().to_string();
            assert!(err.contains("(1000, Corrupt"), "{err}");
        },
    );
}

#[test]
#[ignore = "needs QEMU (scripts/bench-setup.sh): cargo test --test blkcheck_qemu -- --ignored"]
fn qemu_read_only_disk_is_not_written() {
    let original: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    qemu_run(
        "blkcheck-qemu-ro",
        &original,
        [",readonly=on", "blkcheck.passes=1 blkcheck.exit_code=0", ""],
        |disk, code, console| {
            assert_eq!(code, guest_exit(0), "console: {console}");
            assert!(console.contains(" ro 1\n"), "{console}");
            assert!(
                console.contains("blkcheck: device is read-only: read passes only, no writes"),
                "{console}"
            );
            let passes = parse_pass_lines(console);
            assert_eq!(passes.len(), 1, "{console}");
            // 256 reads of 4 KiB, no FLUSH: nothing was written.
            assert_eq!(
                (passes[0].requests, passes[0].errors),
                (256, 0),
                "{console}"
            );
            assert_eq!(std::fs::read(disk).unwrap(), original);
        },
    );
}

#[test]
#[ignore = "needs QEMU (scripts/bench-setup.sh): cargo test --test blkcheck_qemu -- --ignored"]
fn qemu_without_msix_the_driver_polls() {
    // vectors=0: the function has no MSI-X capability.
    qemu_run(
        "blkcheck-qemu-poll",
        &vec![0u8; 1 << 20],
        ["", "blkcheck.passes=1 blkcheck.exit_code=0", ",vectors=0"],
        |disk, code, console| {
            assert_eq!(code, guest_exit(0), "console: {console}");
            assert!(
                console.contains("blkcheck: msix unavailable, polling\n"),
                "{console}"
            );
            let passes = parse_pass_lines(console);
            assert_eq!(passes.len(), 1, "{console}");
            assert_eq!((passes[0].requests, passes[0].irqs), (513, 0), "{console}");
            check_image(disk, 1).unwrap();
        },
    );
}

/// INTx (`blkcheck.intx=1`) on a function without MSI-X: the driver reads the interrupt line
/// SeaBIOS wrote, routes that IOAPIC pin and takes its queue interrupts there, as it does on our
/// VMM (tests/tests/virtio_blk.rs): the same image works on both.
#[test]
#[ignore = "needs QEMU (scripts/bench-setup.sh): cargo test --test blkcheck_qemu -- --ignored"]
fn qemu_the_driver_on_intx_takes_its_interrupts_through_the_ioapic() {
    qemu_run(
        "blkcheck-qemu-intx",
        &vec![0u8; 1 << 20],
        [
            "",
            "blkcheck.passes=1 blkcheck.exit_code=0 blkcheck.intx=1",
            ",vectors=0",
        ],
        |disk, code, console| {
            assert_eq!(code, guest_exit(0), "console: {console}");
            assert!(console.contains("blkcheck: intx pin 1 line "), "{console}");
            assert!(!console.contains("msix"), "{console}");
            let passes = parse_pass_lines(console);
            assert_eq!(passes.len(), 1, "{console}");
            assert_eq!(passes[0].requests, 513, "{console}");
            assert!(passes[0].irqs > 0, "no INTx interrupts: {console}");
            eprintln!("blkcheck on INTx in QEMU: {passes:?}");
            check_image(disk, 1).unwrap();
        },
    );
}

/// The guest's own verification, against an image the host wrote: the host's pattern is the
/// guest's, and a stale or corrupted sector is reported by number.
#[test]
#[ignore = "needs QEMU (scripts/bench-setup.sh): cargo test --test blkcheck_qemu -- --ignored"]
fn qemu_guest_verifies_an_image_the_host_wrote() {
    let mut image: Vec<u8> = (0..2048u64).flat_map(|s| sector_pattern(s, 41)).collect();
    image[700 * SECTOR_SIZE..701 * SECTOR_SIZE].copy_from_slice(&sector_pattern(700, 40));
    image[1500 * SECTOR_SIZE + 100] ^= 1;
    qemu_run(
        "blkcheck-qemu-verify",
        &image,
        [
            "",
            "blkcheck.verify=41 blkcheck.passes=41 blkcheck.exit_code=0",
            "",
        ],
        |disk, code, console| {
            assert!(
                console.contains("blkcheck: first pass verifies the disk's generation 41\n"),
                "{console}"
            );
            assert_eq!(
                mismatch_lines(console),
                [
                    "blkcheck: MISMATCH sector 700 expected gen 41 found sector 700 gen 40",
                    "blkcheck: MISMATCH sector 1500 expected gen 41 found sector 1500 gen 41 word 12",
                ],
                "{console}"
            );
            let passes = parse_pass_lines(console);
            assert_eq!(passes.len(), 1, "{console}");
            // 256 reads and a FLUSH; then the guest ends with its data-error status.
            assert_eq!((passes[0].generation, passes[0].requests), (41, 257));
            assert_eq!(passes[0].mismatches, 2);
            assert_eq!(code, guest_exit(EXIT_DATA_ERROR), "console: {console}");
            // A verifying pass only reads.
            assert!(
                std::fs::read(disk).unwrap() == image,
                "the verify pass wrote"
            );
        },
    );
}
