//! blkcheck's request orders and sizes (`order=random`, `bs=N`), end to end: the passes
//! complete with no mismatch, every request is made once per phase (the pass counts), and the
//! host-side checker accepts the image, which it would not if the permutation missed a block.
//! On our VMM (`--guest blkcheck,...`) and, `#[ignore]`d like blkcheck_qemu.rs, on QEMU booting
//! the bzImage with the same options on its command line (`blkcheck.order=random
//! blkcheck.bs=64K`).

use std::path::Path;
use std::time::Duration;

use cpr_tests::blkcheck::*;
use cpr_tests::*;

const QEMU: &str = "qemu-system-x86_64";
/// Generous: the guest shares this slow, nested host with other work.
const TIMEOUT: Duration = Duration::from_secs(600);

/// Checks a console of `passes` completed passes of `requests` requests each (the writes,
/// the reads and a FLUSH) that announced `mode_line`, and the image they left (all its
/// `sectors` at the last generation).
fn assert_passes(console: &str, mode_line: &str, requests: u64, sectors: u64, disk: &Path) {
    let passes = 2;
    assert!(console.contains(mode_line), "{console}");
    assert_eq!(mismatch_lines(console), Vec::<&str>::new());
    let lines = parse_pass_lines(console);
    assert_eq!(lines.len() as u64, passes, "{console}");
    assert!(
        lines
            .iter()
            .all(|p| p.requests == requests && p.errors == 0),
        "{console}"
    );
    let summary = check_image(disk, passes).unwrap();
    assert_eq!((summary.last, summary.next), (sectors, 0));
}

/// Runs our VMM's blkcheck with `options` on a zeroed disk of `disk_bytes` until it exits.
fn run_on_vmm(name: &str, disk_bytes: usize, options: &str) -> (TempDir, String) {
    let dir = TempDir::new(name).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; disk_bytes]).unwrap();
    let drive = format!("file={},format=raw,if=virtio", disk.display());
    let guest = format!("blkcheck,{options},exit-after=2,exit-code=0");
    let vmm = VmmProcess::start_vmm(["-m", "64M", "--guest", &guest, "-drive", &drive]);
    let status = vmm.wait_exit(TIMEOUT).unwrap();
    let console = vmm.stdout_text();
    assert_eq!(status.code(), Some(0), "console: {console}");
    (dir, console)
}

#[test]
fn vmm_random_64k_requests_pass_and_the_image_checks_out() {
    // 2 MiB = 32 requests of 64 KiB, a power of two: the permutation has no holes.
    let (dir, console) = run_on_vmm("blkcheck-rand64k", 2 << 20, "order=random,bs=64K,depth=8");
    let mode = "blkcheck: request size 65536 bytes order random\n";
    assert_passes(&console, mode, 2 * 32 + 1, 4096, &dir.join("disk.img"));
}

#[test]
fn vmm_random_4k_requests_cover_a_region_that_is_not_a_power_of_two() {
    // 3 MiB = 768 requests: the permutation runs over 1024 and skips the 256 past the end.
    let (dir, console) = run_on_vmm("blkcheck-rand4k", 3 << 20, "order=random,depth=8");
    let mode = "blkcheck: request size 4096 bytes order random\n";
    assert_passes(&console, mode, 2 * 768 + 1, 6144, &dir.join("disk.img"));
}

#[test]
fn vmm_sequential_16k_requests_pass() {
    let (dir, console) = run_on_vmm("blkcheck-seq16k", 2 << 20, "bs=16K,depth=4");
    let mode = "blkcheck: request size 16384 bytes order sequential\n";
    assert_passes(&console, mode, 2 * 128 + 1, 4096, &dir.join("disk.img"));
}

#[test]
fn vmm_defaults_print_no_mode_line() {
    let (_dir, console) = run_on_vmm("blkcheck-default", 1 << 20, "depth=8");
    assert!(!console.contains("blkcheck: request size"), "{console}");
    assert_eq!(parse_pass_lines(&console).len(), 2, "{console}");
}

#[test]
fn vmm_rejects_a_bad_request_size() {
    for bad in [
        "blkcheck,bs=128K",
        "blkcheck,bs=6K",
        "blkcheck,order=backwards",
    ] {
        assert_vmm_startup_error(
            &["-m", "64M", "--guest", bad],
            &["bs=4K|8K|16K|32K|64K"],
            Duration::from_secs(60),
        );
    }
}

/// The bzImage's command-line spelling of the same options, on QEMU's virtio-blk-pci.
#[test]
#[ignore = "needs QEMU (scripts/bench-setup.sh): cargo test --test blkcheck_modes -- --ignored"]
fn qemu_random_64k_requests_pass_and_the_image_checks_out() {
    let test = "qemu_random_64k_requests_pass_and_the_image_checks_out";
    let installed = std::process::Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        prerequisite_missing(test, &format!("{QEMU} is not installed"));
        return;
    }
    let dir = TempDir::new("blkcheck-modes-qemu").unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 2 << 20]).unwrap();
    let kernel = build_blkcheck_bzimage(dir.path()).unwrap();
    let append = "blkcheck.passes=2 blkcheck.exit_code=0 blkcheck.order=random blkcheck.bs=64K";
    let args = qemu_blkcheck_args(&["kvm", "tcg"], &kernel, append, &disk, ["", ""]);
    let qemu = VmmProcess::start(QEMU, &args).unwrap();
    let status = qemu.wait_exit(TIMEOUT).unwrap();
    let console = qemu.stdout_text().replace('\r', "");
    // isa-debug-exit: QEMU exits with (code << 1) | 1.
    assert_eq!(status.code(), Some(1), "console: {console}");
    let mode = "blkcheck: request size 65536 bytes order random\n";
    assert_passes(&console, mode, 2 * 32 + 1, 4096, &disk);
}
