//! The committed golden state files keep loading (issue 3's compatibility
//! policy: a VMM reads its own state-file format and the previous one).
//!
//! `vmm/tests/golden/state-vN.bin` was written by the real VMM of format
//! version N from `vmm -m 16M -smp 2 --guest heartbeat` a few ticks after boot
//! (see `vmm/tests/golden/README.md`). Restoring each must continue the
//! heartbeat exactly: the first tick each vCPU prints is the one after the last
//! tick it had printed when it was saved. Every version the VMM declares
//! readable must have its file here, and every file here must be tested.
//!
//! To regenerate a file (only when the format version changes, and then as
//! a new `state-vN.bin` next to the old ones):
//! `CPR_WRITE_GOLDEN=vmm/tests/golden/state-vN.bin cargo test --release -p cpr-tests --test golden -- --ignored --nocapture`

use std::path::{Path, PathBuf};
use std::time::Duration;

use cpr_common::state_file::{STATE_FILE_FORMAT, STATE_FORMAT_VERSION};
use cpr_tests::*;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

/// The machine the golden files were saved from; a restore must say the same.
const GOLDEN_ARGS: [&str; 6] = ["-m", "16M", "-smp", "2", "--guest", "heartbeat"];
const GOLDEN_CPUS: u32 = 2;

/// One committed state file and what it must hold (also recorded in the README).
struct Golden {
    /// File name in `vmm/tests/golden/`.
    file: &'static str,
    /// The format version in its header.
    version: u32,
    /// The last tick each vCPU had printed when it was saved (the test also
    /// reads them from the file).
    last_printed: [u64; 2],
    /// Devices in its `devices` section (the section starts with their count,
    /// a bincode varint): version 1 has the serial port; version 2 adds the
    /// i8042, the CMOS/RTC and the PCI configuration ports; version 3 stores
    /// every device by id and adds the debug-exit port, the PCI MMIO window and
    /// the PCI host bridge.
    devices: u8,
}

const GOLDEN_FILES: [Golden; 3] = [
    Golden {
        file: "state-v1.bin",
        version: 1,
        last_printed: [5, 5],
        devices: 1,
    },
    Golden {
        file: "state-v2.bin",
        version: 2,
        last_printed: [5, 5],
        devices: 4,
    },
    Golden {
        file: "state-v3.bin",
        version: 3,
        last_printed: [5, 5],
        devices: 7,
    },
];

fn golden_dir() -> PathBuf {
    workspace_root().join("vmm/tests/golden")
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// The bytes of section `id` of a state file (container layout: footer with
/// the table offset and count at the end, 32-byte table entries).
fn section(file: &[u8], id: u32) -> &[u8] {
    let footer = &file[file.len() - 32..];
    assert_eq!(&footer[24..32], b"CPRVMEND", "no end marker");
    let table = le_u64(&footer[0..8]) as usize;
    let count = le_u32(&footer[8..12]) as usize;
    let entry = file[table..table + count * 32]
        .chunks_exact(32)
        .find(|e| le_u32(e) == id)
        .unwrap_or_else(|| panic!("no section {id}"));
    let offset = le_u64(&entry[8..16]) as usize;
    let length = le_u64(&entry[16..24]) as usize;
    &file[offset..offset + length]
}

/// Reads `len` bytes at guest-physical `addr` (low RAM region, index 0 at
/// guest address 0) from the `ram` section's runs of non-zero pages:
/// `region u32 | 0 u32 | offset u64 | pages u64 | pages * 4 KiB`.
fn saved_ram(file: &[u8], addr: u64, len: usize) -> Vec<u8> {
    let mut ram = section(file, 6);
    while !ram.is_empty() {
        let region = le_u32(&ram[0..4]);
        let offset = le_u64(&ram[8..16]);
        let bytes = le_u64(&ram[16..24]) as usize * 4096;
        let data = &ram[24..24 + bytes];
        if region == 0 && offset <= addr && addr + len as u64 <= offset + bytes as u64 {
            let at = (addr - offset) as usize;
            return data[at..at + len].to_vec();
        }
        ram = &ram[24 + bytes..];
    }
    // Pages that are not saved are zero.
    vec![0; len]
}

/// The last tick each vCPU had printed, from the heartbeat's per-vCPU area
/// (u64 counter at 0x7100 + 64*cpu, u64 last printed tick at +8).
fn saved_last_printed(file: &[u8]) -> Vec<u64> {
    (0..u64::from(GOLDEN_CPUS))
        .map(|cpu| le_u64(&saved_ram(file, 0x7100 + 64 * cpu + 8, 8)))
        .collect()
}

/// Restores `state` and checks that the heartbeat continues exactly where it
/// was saved. Returns the restored VMM's output.
fn restore_and_check(dir: &TempDir, state: &Path, last_printed: &[u64]) -> String {
    let socket = dir.join("qmp.sock");
    let mut args: Vec<String> = GOLDEN_ARGS.iter().map(|s| s.to_string()).collect();
    args.extend([
        "-incoming".to_string(),
        format!("file:{}", state.display()),
        "-qmp".to_string(),
        qmp_socket_arg(&socket),
    ]);
    let vmm = VmmProcess::start_vmm(&args);
    let out = vmm
        .wait_for_output(
            |text| {
                let ticks = parse_heartbeat_ticks(text);
                (0..GOLDEN_CPUS).all(|cpu| ticks.get(&cpu).is_some_and(|t| t.len() >= 5))
            },
            LONG,
        )
        .unwrap();
    let log = parse_heartbeats(&out);
    assert!(log.started.is_empty(), "the guest rebooted:\n{out}");
    assert!(log.malformed.is_empty(), "{:?}", log.malformed);
    assert!(
        out.starts_with("heartbeat: cpu "),
        "the restored guest began in the middle of a line:\n{out}"
    );
    assert_ticks_consecutive(&log.ticks).unwrap();
    for cpu in 0..GOLDEN_CPUS {
        assert_eq!(
            log.ticks[&cpu][0],
            last_printed[cpu as usize] + 1,
            "cpu {cpu}: the first tick after the restore must follow the saved one:\n{out}"
        );
    }
    let mut qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
    let status = qmp.execute("query-status", Value::Null).unwrap();
    assert_eq!(status["status"], "running", "{status}");
    let counters = read_tick_counters(&mut qmp, GOLDEN_CPUS, &dir.join("counters")).unwrap();
    for (cpu, counter) in counters.iter().enumerate() {
        assert!(counter.last_printed >= last_printed[cpu] + 4, "{counter:?}");
    }
    qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(vmm.wait_exit(LONG).unwrap().code(), Some(0));
    out
}

/// Checks a golden file's header and contents, then restores a copy of it.
fn check_golden(g: &Golden) {
    let path = golden_dir().join(g.file);
    let golden = std::fs::read(&path).unwrap_or_else(|e| {
        panic!("{}: {e}", path.display());
    });
    assert_eq!(&golden[..8], b"CPRVMMST", "{}", g.file);
    assert_eq!(
        le_u32(&golden[8..12]),
        g.version,
        "{}: format version",
        g.file
    );
    assert!(
        golden.len() < 512 << 10,
        "{}: {} bytes",
        g.file,
        golden.len()
    );
    assert_eq!(
        section(&golden, 5).first(),
        Some(&g.devices),
        "{}: device count",
        g.file
    );
    let last_printed = saved_last_printed(&golden);
    assert_eq!(
        last_printed, g.last_printed,
        "{}: the file does not hold the ticks recorded in the README",
        g.file
    );

    // Restore from a copy, so nothing can ever modify the committed file.
    let dir = TempDir::new("golden").unwrap();
    let copy = dir.join(g.file);
    std::fs::copy(&path, &copy).unwrap();
    restore_and_check(&dir, &copy, &last_printed);
    assert_eq!(std::fs::read(&path).unwrap(), golden);
}

#[test]
fn the_v1_golden_state_file_still_restores() {
    check_golden(&GOLDEN_FILES[0]);
}

#[test]
fn the_v2_golden_state_file_restores() {
    check_golden(&GOLDEN_FILES[1]);
}

/// Every version the VMM reads has a golden file tested above, the current
/// one included, and every `state-v*.bin` in the directory is tested.
#[test]
fn every_readable_format_version_has_a_tested_golden_file() {
    let tested: Vec<u32> = GOLDEN_FILES.iter().map(|g| g.version).collect();
    let mut readable = STATE_FILE_FORMAT.readable_versions.to_vec();
    readable.sort_unstable();
    assert_eq!(
        tested, readable,
        "golden files tested vs versions the VMM reads: add state-vN.bin for a new version \
         (see vmm/tests/golden/README.md) and retire unreadable ones"
    );
    assert!(tested.contains(&STATE_FORMAT_VERSION));
    for g in &GOLDEN_FILES {
        assert_eq!(g.file, format!("state-v{}.bin", g.version));
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("state-v") && name.ends_with(".bin"))
        .collect();
    on_disk.sort();
    let listed: Vec<&str> = GOLDEN_FILES.iter().map(|g| g.file).collect();
    assert_eq!(on_disk, listed, "golden files on disk vs tested");
}

/// Writes a new golden file to `$CPR_WRITE_GOLDEN` (relative to the workspace
/// root). Saves are retried until one lands between two ticks (not in the
/// middle of printing a line), so the file restores to clean output.
#[test]
#[ignore = "writes a golden state file; run by hand with CPR_WRITE_GOLDEN=path"]
fn regenerate_golden_state_file() {
    let Some(target) = std::env::var_os("CPR_WRITE_GOLDEN") else {
        panic!("set CPR_WRITE_GOLDEN to the path to write (e.g. vmm/tests/golden/state-v1.bin)");
    };
    let target = workspace_root().join(target);
    for attempt in 1..=10 {
        let dir = TempDir::new("golden-gen").unwrap();
        let socket = dir.join("qmp.sock");
        let mut args: Vec<String> = GOLDEN_ARGS.iter().map(|s| s.to_string()).collect();
        args.extend(["-qmp".to_string(), qmp_socket_arg(&socket)]);
        let vmm = VmmProcess::start_vmm(&args);
        vmm.wait_for_all_ticks(GOLDEN_CPUS, 5, LONG).unwrap();
        let mut qmp = QmpClient::connect_and_negotiate(&socket, LONG).unwrap();
        let state = dir.join("state");
        let uri = format!("file:{}", state.display());
        qmp.execute("migrate", json!({ "uri": uri })).unwrap();
        loop {
            let event = qmp.wait_event("MIGRATION", LONG).unwrap();
            match event["data"]["status"].as_str().unwrap() {
                "completed" => break,
                "failed" => panic!("{event}"),
                _ => {}
            }
        }
        qmp.execute("quit", Value::Null).unwrap();
        vmm.wait_exit(LONG).unwrap();
        let old_out = vmm.stdout_text();
        let bytes = std::fs::read(&state).unwrap();
        let last_printed = saved_last_printed(&bytes);
        let clean = old_out.ends_with('\n')
            && (0..GOLDEN_CPUS).all(|cpu| vmm.last_tick(cpu) == Some(last_printed[cpu as usize]));
        if !clean {
            eprintln!("attempt {attempt}: saved in the middle of a line, again");
            continue;
        }
        let check = TempDir::new("golden-chk").unwrap();
        restore_and_check(&check, &state, &last_printed);
        // Written, not copied: the saved file is private (0600), the committed one need not be.
        std::fs::write(&target, &bytes).unwrap();
        eprintln!(
            "wrote {} ({} bytes); last printed ticks {last_printed:?}",
            target.display(),
            bytes.len()
        );
        return;
    }
    panic!("no clean save in 10 attempts");
}
