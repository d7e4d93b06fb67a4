//! End-to-end tests of Linux-guest boot (issue 7): `-kernel`, `-initrd`, `-append`, the e820
//! map, MP table and MADT, APs started by the guest through INIT/SIPI, the i8042 reset, and
//! live update, migration to a file and cpr-transfer of a guest booted this way.
//!
//! Real Linux cannot finish booting on this machine's nested KVM, so most tests boot the
//! boot-protocol probe (`vmm/guests/linux-probe.S`, built by `cpr_tests::linux_probe`): a file in
//! real bzImage format that the VMM loads exactly like a kernel, and that prints what it found in
//! `boot_params` (e820 map, command line, initrd address, size and CRC-32C, MP table, ACPI MADT)
//! before running the heartbeat loop on every vCPU. The same probe is also wrapped into an ELF
//! `vmlinux` (see [`probe_as_elf`]) to check the ELF path. Every value it reports is compared with
//! an independent statement of what the VMM must pass ([`expected_e820`], [`expected_initrd_addr`],
//! [`crc32c`] of the file the test wrote).
//!
//! Continuity across updates is judged as in the other suites: per-vCPU tick numbers must go on
//! exactly (no gap, no repeat, no second `start`), and the probe's boot lines must appear once.
//!
//! The last test boots a real Debian cloud kernel (fetched by `scripts/fetch-debian-kernel.sh`
//! into `target/debian-kernel`, reused by later runs; when the package cannot be had, or with
//! `CPR_SKIP_DEBIAN_KERNEL=1`, it fails under `CI=true` and is recorded as skipped elsewhere, see
//! `cpr_tests::prereq`) and checks Linux's own first lines: `Linux
//! version`, `Command line:` equal to what was passed, and the `BIOS-provided physical RAM map`
//! equal to the VMM's e820 map.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use cpr_tests::cpr::{Update, check_heartbeat_from_boot, cpr_update, shim_command};
use cpr_tests::heartbeat::parse_heartbeats;
use cpr_tests::linux_probe::*;
use cpr_tests::transfer::{
    CprSpelling, MainChannel, Target, collect_events_until, is_migration_end, migrate_cpr_transfer,
};
use cpr_tests::*;
use serde_json::{Value, json};

/// Generous limit for anything the guest or a VMM has to do.
const LONG: Duration = Duration::from_secs(60);
/// How long a real kernel may take to print its first lines here (they come after ~15-25 s on
/// an idle machine; other tests run at the same time).
const LINUX_LINES_TIMEOUT: Duration = Duration::from_secs(180);
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The probe's heartbeat rate in most tests.
const HZ: u32 = 50;

/// Where the VMM loads a bzImage that prefers 16 MiB (the probe's `pref_address`).
const PROBE_LOAD_ADDR: u64 = 0x100_0000;
/// Where the VMM puts `boot_params`.
const BOOT_PARAMS_ADDR: u64 = 0x7000;
const IOAPIC_ADDR: u64 = 0xfec0_0000;
const ACPI_RSDP_ADDR: u64 = 0xe0000;
/// The probe's globals (see the header comment of linux-probe.S).
const PROBE_GLOBALS: u64 = 0x4000;
const G_STARTED: usize = 0x04;
const G_CPUS: usize = 0x0c;
const G_CMDLINE: usize = 0x20;
const CMDLINE_ADDR: u64 = 0x20000;
/// Offsets in a bzImage's setup header.
const HDR_XLOADFLAGS: usize = 0x236;
const HDR_PREF_ADDRESS: usize = 0x258;
const HDR_INIT_SIZE: usize = 0x260;

// ---------------------------------------------------------------------------
// helpers: images, command lines, expected values

/// The probe bzImage, built once per test process into `target/linux-probe/`.
fn probe() -> PathBuf {
    static IMAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build_linux_probe(&target_dir().join("linux-probe")))
        .clone()
        .unwrap_or_else(|e| panic!("building the linux probe: {e}"))
}

/// A private copy of the probe (for tests that change, move or delete the file, or boot "any
/// path").
fn probe_copy(dir: &TempDir, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(probe(), &path).unwrap();
    path
}

/// The probe with its setup header changed by `patch`, written to `dir/name`.
fn patched_probe(dir: &TempDir, name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(probe()).unwrap();
    patch(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// An x86-64 ELF64 executable with one `PT_LOAD` segment at physical (and virtual) `paddr`
/// holding `payload`, `memsz` bytes in memory, entered at `paddr + entry_offset`.
fn elf_image(payload: &[u8], paddr: u64, memsz: u64, entry_offset: u64, machine: u16) -> Vec<u8> {
    const DATA_OFFSET: u64 = 0x1000;
    let mut elf = Vec::new();
    // ELF header.
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // ELFCLASS64, little-endian, version 1, SysV
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&machine.to_le_bytes());
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&(paddr + entry_offset).to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    // Program header.
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
    elf.extend_from_slice(&DATA_OFFSET.to_le_bytes()); // p_offset
    elf.extend_from_slice(&paddr.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&paddr.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&(payload.len() as u64).to_le_bytes()); // p_filesz
    elf.extend_from_slice(&memsz.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.resize(DATA_OFFSET as usize, 0);
    elf.extend_from_slice(payload);
    elf
}

/// Where the probe runs when booted as an ELF `vmlinux` (not its bzImage `pref_address`, so the
/// report shows which path loaded it).
const ELF_PROBE_ADDR: u64 = 0x200_0000;

/// The probe as an uncompressed ELF `vmlinux`, the way `scripts/extract-vmlinux` turns a
/// bzImage into one: its protected-mode payload (position independent, 64-bit entry at +0x200)
/// in one segment at [`ELF_PROBE_ADDR`], `init_size` bytes in memory. Written to `dir/name`.
fn probe_as_elf(dir: &TempDir, name: &str) -> PathBuf {
    let bz = std::fs::read(probe()).unwrap();
    let setup = (usize::from(bz[0x1f1]) + 1) * 512;
    let init_size = u32::from_le_bytes(bz[HDR_INIT_SIZE..HDR_INIT_SIZE + 4].try_into().unwrap());
    let elf = elf_image(
        &bz[setup..],
        ELF_PROBE_ADDR,
        u64::from(init_size),
        0x200,
        62,
    );
    let path = dir.join(name);
    std::fs::write(&path, elf).unwrap();
    path
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `-m MEM -smp CPUS -kernel KERNEL [-initrd INITRD] [-append APPEND]`.
fn machine_args(
    mem: &str,
    cpus: u32,
    kernel: &Path,
    initrd: Option<&Path>,
    append: Option<&str>,
) -> Vec<String> {
    let mut args = strings(&["-m", mem, "-smp", &cpus.to_string(), "-kernel"]);
    args.push(kernel.display().to_string());
    if let Some(initrd) = initrd {
        args.push("-initrd".into());
        args.push(initrd.display().to_string());
    }
    if let Some(append) = append {
        args.push("-append".into());
        args.push(append.into());
    }
    args
}

/// `args` with the value after `-kernel` replaced by `kernel`.
fn with_kernel(args: &[String], kernel: &Path) -> Vec<String> {
    let mut args = args.to_vec();
    let at = args.iter().position(|a| a == "-kernel").expect("-kernel") + 1;
    args[at] = kernel.display().to_string();
    args
}

/// Writes an initrd of `size` pattern bytes to `dir/name`; returns its path and contents.
fn initrd(dir: &TempDir, name: &str, size: usize, seed: u32) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    let bytes = pattern_bytes(size, seed);
    build_initrd(&path, &bytes).unwrap();
    (path, bytes)
}

/// End of the RAM region at address 0 for `-m ram`: RAM above 3 GiB moves to 4 GiB.
fn low_ram_end(ram: u64) -> u64 {
    ram.min(3 * GIB)
}

/// Where the VMM must put an initrd of `size` bytes: as high as possible, page aligned, below
/// both the end of low RAM and the probe's `initrd_addr_max` (2 GiB - 1).
fn expected_initrd_addr(ram: u64, size: u64) -> u64 {
    let limit = low_ram_end(ram).min(0x8000_0000);
    (limit - size) & !0xfff
}

/// What the probe must have reported for a machine with `ram` bytes and `cpus` vCPUs booted
/// with `cmdline` and `initrd` (its contents), the probe loaded at `load_addr` with `header`.
struct Expected<'a> {
    ram: u64,
    cpus: u32,
    cmdline: &'a str,
    initrd: Option<&'a [u8]>,
    hz: u32,
    load_addr: u64,
    header: ProbeHeader,
}

impl<'a> Expected<'a> {
    /// The probe as a bzImage.
    fn bzimage(ram: u64, cpus: u32, cmdline: &'a str, initrd: Option<&'a [u8]>) -> Self {
        Expected {
            ram,
            cpus,
            cmdline,
            initrd,
            hz: HZ,
            load_addr: PROBE_LOAD_ADDR,
            header: ProbeHeader {
                version: 0x020c,
                loader: 0xff,
                code32_start: PROBE_LOAD_ADDR,
                magic_ok: true,
            },
        }
    }

    /// The probe as an ELF vmlinux: no setup header of its own, so the VMM fills only the
    /// fields a kernel checks (magic, boot flag, loader type).
    fn elf(ram: u64, cpus: u32, cmdline: &'a str, initrd: Option<&'a [u8]>) -> Self {
        Expected {
            load_addr: ELF_PROBE_ADDR,
            header: ProbeHeader {
                version: 0,
                loader: 0xff,
                code32_start: 0,
                magic_ok: true,
            },
            ..Self::bzimage(ram, cpus, cmdline, initrd)
        }
    }

    fn check(&self, report: &ProbeReport, text: &str) {
        let ctx = || format!("probe output:\n{text}");
        assert!(report.ready, "no `probe: ready`; {}", ctx());
        assert_eq!(report.load_addr, Some(self.load_addr), "{}", ctx());
        assert_eq!(report.boot_params, Some(BOOT_PARAMS_ADDR), "{}", ctx());
        assert_eq!(report.header, Some(self.header), "{}", ctx());
        assert_eq!(
            report.e820,
            expected_e820(self.ram),
            "e820 map for {} MiB; {}",
            self.ram >> 20,
            ctx()
        );
        assert_eq!(report.cmdline.as_deref(), Some(self.cmdline), "{}", ctx());
        match self.initrd {
            None => {
                assert!(report.initrd_none, "{}", ctx());
                assert_eq!(report.initrd, None, "{}", ctx());
            }
            Some(bytes) => {
                let size = bytes.len() as u64;
                assert!(!report.initrd_none, "{}", ctx());
                assert_eq!(
                    report.initrd,
                    Some((expected_initrd_addr(self.ram, size), size, crc32c(bytes))),
                    "initrd (addr, size, crc32c); {}",
                    ctx()
                );
            }
        }
        assert_eq!(
            report.mptable,
            Some(ProbeMpTable {
                cpus: self.cpus,
                ioapic_id: self.cpus,
                ioapic_addr: IOAPIC_ADDR,
                checksum_ok: true,
            }),
            "{}",
            ctx()
        );
        assert_eq!(
            report.acpi,
            Some(ProbeAcpi {
                rsdp: ACPI_RSDP_ADDR,
                cpus: self.cpus,
                ioapic_id: self.cpus,
                ioapic_addr: IOAPIC_ADDR,
                checksum_ok: true,
            }),
            "{}",
            ctx()
        );
        assert_eq!(report.hz, Some(self.hz), "{}", ctx());
        let aps: Vec<(u32, u32, bool)> = (1..self.cpus).map(|i| (i, i, true)).collect();
        assert_eq!(report.aps, aps, "every AP must start; {}", ctx());
    }
}

/// Parses the probe lines of `text`, failing the test with the output if they are malformed.
fn report_of(text: &str) -> ProbeReport {
    parse_probe_output(text).unwrap_or_else(|e| panic!("{e}\nprobe output:\n{text}"))
}

/// Waits until the probe printed `probe: ready`; returns the output and its report.
fn wait_ready(vmm: &VmmProcess) -> (String, ProbeReport) {
    let text = vmm
        .wait_for_output(|t| t.contains("probe: ready\n"), LONG)
        .unwrap();
    let report = report_of(&text);
    (text, report)
}

/// How many times the probe booted in `text`.
fn boots(text: &str) -> usize {
    text.matches("probe: linux-probe 1 at ").count()
}

/// Boots `args`, lets the probe print `probe.exit_after` ticks and exit with
/// `probe.exit_code`; the command line must hold both. Returns the output.
fn run_to_exit(args: &[String], exit_code: i32) -> String {
    let vmm = VmmProcess::start_vmm(args);
    let status = vmm.wait_exit(LONG).unwrap();
    let text = vmm.stdout_text();
    assert_eq!(
        status.code(),
        Some(exit_code),
        "vmm {args:?} should exit with the probe's exit code; stderr:\n{}\nstdout:\n{text}",
        vmm.stderr_text()
    );
    text
}

/// A command line that makes the probe tick at [`HZ`] and exit with `code` after 3 ticks on
/// vCPU 0, followed by `extra`.
fn exiting_cmdline(code: i32, extra: &str) -> String {
    format!("console=ttyS0 probe.hz={HZ} probe.exit_after=3 probe.exit_code={code} {extra}")
        .trim_end()
        .to_string()
}

/// Checks the ticks of a run that ended with `probe.exit_after=3`: vCPU 0 printed exactly
/// 1, 2, 3; every vCPU started once and counted from 1.
fn check_exit_after_3(text: &str, cpus: u32) {
    let log = parse_heartbeats(text);
    assert_eq!(
        log.ticks.get(&0).map(Vec::as_slice),
        Some(&[1, 2, 3][..]),
        "{text}"
    );
    let mut started = log.started.clone();
    started.sort_unstable();
    assert_eq!(started, (0..cpus).collect::<Vec<_>>(), "{text}");
    assert!(log.malformed.is_empty(), "{:?}", log.malformed);
    assert_ticks_consecutive(&log.ticks).unwrap();
}

/// Asserts that `vmm args` fails at start-up (see [`assert_vmm_startup_error`]: status 1, nothing
/// on stdout, one `vmm: ` line on stderr holding every needle). Returns the line.
#[track_caller]
fn assert_startup_error(args: &[String], needles: &[&str]) -> String {
    assert_vmm_startup_error(args, needles, LONG)
}

// ---------------------------------------------------------------------------
// helpers: a probe VM with its monitor

/// A running probe VM: its monitor, process, machine arguments (all but `-qmp` and
/// `-incoming`) and monitor socket. Fields drop in order: the connection, then the process.
struct Vm {
    qmp: QmpClient,
    vmm: VmmProcess,
    args: Vec<String>,
    socket: PathBuf,
}

impl Vm {
    /// Starts `vmm ARGS -qmp unix:DIR/NAME.qmp` (plus `extra`) and connects to its monitor.
    fn start(dir: &TempDir, name: &str, args: &[String], extra: &[String]) -> Vm {
        let socket = dir.join(format!("{name}.qmp"));
        let mut full = args.to_vec();
        full.push("-qmp".into());
        full.push(qmp_socket_arg(&socket));
        full.extend(extra.iter().cloned());
        let vmm = VmmProcess::start_vmm(&full);
        vmm.wait_for_path(&socket, LONG).unwrap();
        let mut qmp = QmpClient::connect_and_negotiate(&socket, LONG).expect("QMP connection");
        qmp.set_timeout(LONG);
        Vm {
            qmp,
            vmm,
            args: args.to_vec(),
            socket,
        }
    }

    /// The command line of a cpr-exec successor with machine arguments `args`: the same
    /// monitor socket (the new VMM takes over the listener and the connected clients).
    fn successor_args(&self, args: &[String]) -> Vec<String> {
        let mut args = args.to_vec();
        args.push("-qmp".into());
        args.push(qmp_socket_arg(&self.socket));
        args
    }

    fn status(&mut self) -> String {
        let reply = self.qmp.execute("query-status", Value::Null).unwrap();
        reply["status"].as_str().unwrap().to_string()
    }

    /// Waits until every vCPU printed `more` ticks beyond its last one so far.
    fn wait_ticks(&self, cpus: u32, more: u64) {
        for cpu in 0..cpus {
            let last = self.vmm.last_tick(cpu).unwrap_or(0);
            self.vmm.wait_for_tick(cpu, last + more, LONG).unwrap();
        }
    }

    fn stop(&mut self) {
        assert_eq!(self.qmp.execute("stop", Value::Null).unwrap(), json!({}));
        self.qmp.wait_event("STOP", LONG).unwrap();
    }

    fn cont(&mut self) {
        assert_eq!(self.qmp.execute("cont", Value::Null).unwrap(), json!({}));
        self.qmp.wait_event("RESUME", LONG).unwrap();
    }

    /// The probe's globals page, read from guest RAM.
    fn globals(&mut self, scratch: &Path) -> Vec<u8> {
        self.qmp.pmemsave(PROBE_GLOBALS, 0x100, scratch).unwrap()
    }

    /// The probe's per-vCPU `(ticks taken, last tick printed)` counters, read from guest RAM.
    fn counters(&mut self, cpus: u32, scratch: &Path) -> Vec<(u64, u64)> {
        let bytes = self
            .qmp
            .pmemsave(
                PROBE_PERCPU_BASE,
                PROBE_PERCPU_STRIDE * u64::from(cpus),
                scratch,
            )
            .unwrap();
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        (0..cpus as usize)
            .map(|i| {
                let base = i * PROBE_PERCPU_STRIDE as usize;
                (u64_at(base), u64_at(base + 8))
            })
            .collect()
    }

    /// `migrate` to `file:state` and wait until it completed; the VM is then `postmigrate`.
    fn migrate_to_file(&mut self, state: &Path) {
        let reply = self
            .qmp
            .execute(
                "migrate",
                json!({"uri": format!("file:{}", state.display())}),
            )
            .unwrap();
        assert_eq!(reply, json!({}));
        let events = collect_events_until(&mut self.qmp, LONG, is_migration_end).unwrap();
        let info = self.qmp.execute("query-migrate", Value::Null).unwrap();
        assert_eq!(info["status"], "completed", "{info}; events {events:?}");
        assert_eq!(self.status(), "postmigrate");
    }

    /// Quits through QMP (exit status 0) and returns everything the guest printed.
    fn quit(mut self) -> String {
        self.qmp.execute("quit", Value::Null).unwrap();
        let status = self.vmm.wait_exit(LONG).unwrap();
        assert_eq!(status.code(), Some(0), "{}", self.vmm.stderr_text());
        self.vmm.stdout_text()
    }
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

/// Checks an update that ended in the same process: completed, not rolled back.
fn assert_update_completed(update: &Update) {
    assert_eq!(update.status(), "completed", "{:?}", update.info);
    assert_eq!(
        update.statuses.last().map(String::as_str),
        Some("completed"),
        "{:?}",
        update.statuses
    );
    assert_eq!(update.rolled_back(), Some(false), "{:?}", update.info);
}

/// Checks that `new`'s guest output continues `old_out` exactly (waiting for `more` ticks per
/// vCPU on `new` first): every vCPU's first tick on `new` is its last on the old side + 1, all
/// consecutive, and the probe neither rebooted nor restarted a vCPU.
fn assert_ticks_continue(old_out: &str, new: &VmmProcess, cpus: u32, more: usize) {
    let new_out = assert_ticks_go_on(
        old_out,
        new,
        cpus,
        more,
        LONG,
        "the update",
        "the first tick after the update must follow the last one before",
    );
    let log = parse_heartbeats(&new_out);
    assert!(
        log.started.is_empty(),
        "a vCPU restarted after the update:\n{new_out}"
    );
    assert_eq!(boots(&new_out), 0, "the probe rebooted:\n{new_out}");
    let whole = format!("{old_out}{new_out}");
    assert!(
        parse_heartbeats(&whole).malformed.is_empty(),
        "garbled output:\n{whole}"
    );
    check_heartbeat_from_boot(&whole, cpus).unwrap();
}

// ---------------------------------------------------------------------------
// what the probe finds: RAM sizes, command lines, initrds

#[test]
fn probe_sees_64m_without_initrd_or_command_line() {
    let args = strings(&["-m", "64M", "-kernel", probe().to_str().unwrap()]);
    let vmm = VmmProcess::start_vmm(&args);
    let (text, report) = wait_ready(&vmm);
    let expected = Expected {
        hz: PROBE_DEFAULT_HZ,
        ..Expected::bzimage(64 * MIB, 1, "", None)
    };
    expected.check(&report, &text);
    vmm.wait_for_tick(0, 3, LONG).unwrap();
    vmm.send_signal(Signal::SIGTERM).unwrap();
    assert!(
        vmm.wait_exit(LONG).unwrap().success(),
        "{}",
        vmm.stderr_text()
    );
    check_heartbeat_from_boot(&vmm.stdout_text(), 1).unwrap();
}

#[test]
fn probe_sees_1g_and_a_small_initrd_of_odd_size() {
    let dir = TempDir::new("lx1g").unwrap();
    let (path, bytes) = initrd(&dir, "initrd", 4097, 1);
    let cmdline = exiting_cmdline(7, "");
    let args = machine_args("1G", 1, &probe(), Some(&path), Some(&cmdline));
    let text = run_to_exit(&args, 7);
    Expected::bzimage(GIB, 1, &cmdline, Some(&bytes)).check(&report_of(&text), &text);
    check_exit_after_3(&text, 1);
}

/// 5 GiB: 3 GiB below the PCI hole, 2 GiB from 4 GiB up. The initrd stays below the probe's
/// `initrd_addr_max` (2 GiB).
#[test]
fn probe_sees_5g_with_ram_above_the_32bit_hole() {
    let dir = TempDir::new("lx5g").unwrap();
    let (path, bytes) = initrd(&dir, "initrd", 8192, 2);
    let cmdline = exiting_cmdline(9, "");
    let args = machine_args("5G", 2, &probe(), Some(&path), Some(&cmdline));
    let text = run_to_exit(&args, 9);
    let report = report_of(&text);
    Expected::bzimage(5 * GIB, 2, &cmdline, Some(&bytes)).check(&report, &text);
    assert_eq!(report.e820.len(), 4, "{text}");
    assert_eq!(report.e820[3], (4 * GIB, 2 * GIB, 1), "{text}");
    check_exit_after_3(&text, 2);
}

/// RAM ending exactly at the 3 GiB PCI hole has no high part; 2 MiB more starts one at 4 GiB.
#[test]
fn probe_sees_ram_ending_at_and_just_past_the_pci_hole() {
    let cmdline = exiting_cmdline(3, "");
    for (mem, ram, entries) in [("3G", 3 * GIB, 3), ("3074M", 3 * GIB + 2 * MIB, 4)] {
        let args = machine_args(mem, 1, &probe(), None, Some(&cmdline));
        let text = run_to_exit(&args, 3);
        let report = report_of(&text);
        Expected::bzimage(ram, 1, &cmdline, None).check(&report, &text);
        assert_eq!(report.e820.len(), entries, "-m {mem}:\n{text}");
    }
}

/// The longest command line the probe's setup header allows (`cmdline_size` 2047) arrives
/// whole; one byte more is refused at start-up (see `bad_input_...`).
#[test]
fn probe_reads_a_command_line_of_the_maximum_length() {
    let mut cmdline = exiting_cmdline(5, "pad=");
    while cmdline.len() < PROBE_CMDLINE_SIZE {
        cmdline.push(char::from(b'a' + (cmdline.len() % 26) as u8));
    }
    cmdline.replace_range(PROBE_CMDLINE_SIZE - 3.., "END");
    assert_eq!(cmdline.len(), PROBE_CMDLINE_SIZE);
    let args = machine_args("64M", 1, &probe(), None, Some(&cmdline));
    let text = run_to_exit(&args, 5);
    Expected::bzimage(64 * MIB, 1, &cmdline, None).check(&report_of(&text), &text);
}

/// Spaces, quotes, backslashes and every other printable character arrive verbatim; only
/// leading and trailing spaces are dropped (documented in `LinuxBootConfig::cmdline`).
#[test]
fn probe_reads_spaces_and_quotes_verbatim() {
    let inner = exiting_cmdline(
        6,
        r#"root="/dev/disk/by-label/my root"  init='/bin/sh -c "echo hi"' a\b ~!@#$%^&*()_+{}|:<>?`-=[];,./ end"#,
    );
    let append = format!("   {inner}  ");
    let args = machine_args("64M", 1, &probe(), None, Some(&append));
    let text = run_to_exit(&args, 6);
    Expected::bzimage(64 * MIB, 1, &inner, None).check(&report_of(&text), &text);
}

/// About 1 MiB of initrd (of odd size), placed at the top of RAM and checksummed whole by the
/// guest (~3 s here).
#[test]
fn probe_checksums_a_1mib_initrd_at_the_top_of_ram() {
    let dir = TempDir::new("lx1m").unwrap();
    let (path, bytes) = initrd(&dir, "initrd", (1 << 20) - 3, 3);
    let cmdline = exiting_cmdline(8, "");
    let args = machine_args("256M", 1, &probe(), Some(&path), Some(&cmdline));
    let text = run_to_exit(&args, 8);
    Expected::bzimage(256 * MIB, 1, &cmdline, Some(&bytes)).check(&report_of(&text), &text);
    check_exit_after_3(&text, 1);
}

/// The same probe as an uncompressed ELF `vmlinux`: the VMM loads its segment at its physical
/// address and enters it at the ELF entry point with the same boot_params.
#[test]
fn probe_as_an_elf_vmlinux_sees_the_same_boot_values() {
    let dir = TempDir::new("lxelf").unwrap();
    let kernel = probe_as_elf(&dir, "vmlinux");
    let (path, bytes) = initrd(&dir, "initrd", 12345, 4);
    let cmdline = exiting_cmdline(4, r#"quoted="a b""#);
    let args = machine_args("1G", 2, &kernel, Some(&path), Some(&cmdline));
    let text = run_to_exit(&args, 4);
    Expected::elf(GIB, 2, &cmdline, Some(&bytes)).check(&report_of(&text), &text);
    check_exit_after_3(&text, 2);

    // An ELF kernel has no cmdline_size: x86's COMMAND_LINE_SIZE (2048 with the NUL) applies.
    let mut long = exiting_cmdline(4, "x=");
    long.extend(std::iter::repeat_n('y', 2047 - long.len()));
    let args = machine_args("64M", 1, &kernel, None, Some(&long));
    let text = run_to_exit(&args, 4);
    Expected::elf(64 * MIB, 1, &long, None).check(&report_of(&text), &text);
    long.push('z');
    let args = machine_args("64M", 1, &kernel, None, Some(&long));
    assert_startup_error(&args, &["command line", "2048", "2047"]);
}

// ---------------------------------------------------------------------------
// SMP: APs come up through INIT/SIPI from the guest

fn smp_boot(cpus: u32) {
    let dir = TempDir::new("lxsmp").unwrap();
    let (path, bytes) = initrd(&dir, "initrd", 3000, 5);
    let cmdline = format!("console=ttyS0 probe.hz={HZ}");
    let args = machine_args("64M", cpus, &probe(), Some(&path), Some(&cmdline));
    let mut vm = Vm::start(&dir, "vm", &args, &[]);
    let (text, report) = wait_ready(&vm.vmm);
    Expected::bzimage(64 * MIB, cpus, &cmdline, Some(&bytes)).check(&report, &text);
    vm.wait_ticks(cpus, 5);
    let text = vm.vmm.stdout_text();
    check_heartbeat_from_boot(&text, cpus).unwrap();

    // The monitor lists every vCPU, each on its own thread of the VMM.
    let reply = vm.qmp.execute("query-cpus-fast", Value::Null).unwrap();
    let list = reply.as_array().unwrap();
    assert_eq!(list.len(), cpus as usize, "{reply}");
    let mut threads = Vec::new();
    for (index, cpu) in list.iter().enumerate() {
        assert_eq!(cpu["cpu-index"], index, "{reply}");
        let tid = cpu["thread-id"].as_u64().unwrap();
        assert!(
            Path::new(&format!("/proc/{}/task/{tid}", vm.vmm.pid())).exists(),
            "{reply}"
        );
        threads.push(tid);
    }
    threads.sort_unstable();
    threads.dedup();
    assert_eq!(threads.len(), cpus as usize, "{reply}");

    // The guest's own counters agree with what it printed (read while paused).
    vm.stop();
    let counters = vm.counters(cpus, &dir.join("percpu"));
    let globals = vm.globals(&dir.join("globals"));
    assert_eq!(u32_at(&globals, G_CPUS), cpus);
    assert_eq!(u32_at(&globals, G_STARTED), cpus - 1, "APs in long mode");
    // The probe stores "last printed" right after a line's newline: the console shows that
    // tick (once the pipe is drained), or one more if the vCPU stopped in between.
    let printed = vm
        .vmm
        .wait_for_output(
            |t| (0..cpus).all(|cpu| last_tick_printed(t, cpu) >= counters[cpu as usize].1),
            LONG,
        )
        .unwrap();
    for cpu in 0..cpus {
        let (taken, last_printed) = counters[cpu as usize];
        let shown = last_tick_printed(&printed, cpu);
        assert!(
            last_printed >= 5 && taken >= shown && shown <= last_printed + 1,
            "cpu {cpu}: RAM says {taken} ticks taken, {last_printed} printed; the console shows {shown}"
        );
    }
    vm.cont();
    vm.wait_ticks(cpus, 3);
    let out = vm.quit();
    check_heartbeat_from_boot(&out, cpus).unwrap();
}

/// The last tick `cpu` printed in `text` (complete lines only), 0 if none.
fn last_tick_printed(text: &str, cpu: u32) -> u64 {
    parse_heartbeat_ticks(text)
        .get(&cpu)
        .and_then(|t| t.last().copied())
        .unwrap_or(0)
}

#[test]
fn two_vcpus_the_second_started_by_init_sipi_both_tick() {
    smp_boot(2);
}

#[test]
fn four_vcpus_all_started_by_init_sipi_all_tick() {
    smp_boot(4);
}

// ---------------------------------------------------------------------------
// live update, migration to a file, cpr-transfer

/// A 2-vCPU probe VM with a small initrd, ticking at [`HZ`], after `probe: ready` and 5 ticks.
/// Returns the VM, its command line and its initrd's contents (the report has been checked).
fn running_probe(dir: &TempDir, name: &str) -> (Vm, String, Vec<u8>) {
    let (path, bytes) = initrd(dir, "initrd", 5000, 6);
    let cmdline = format!("console=ttyS0 probe.hz={HZ}");
    let args = machine_args("64M", 2, &probe(), Some(&path), Some(&cmdline));
    let vm = Vm::start(dir, name, &args, &[]);
    let (text, report) = wait_ready(&vm.vmm);
    Expected::bzimage(64 * MIB, 2, &cmdline, Some(&bytes)).check(&report, &text);
    vm.vmm.wait_for_all_ticks(2, 5, LONG).unwrap();
    (vm, cmdline, bytes)
}

#[test]
fn probe_keeps_running_across_cpr_exec_through_the_shim() {
    let dir = TempDir::new("lxcpr").unwrap();
    let (mut vm, _, _) = running_probe(&dir, "vm");
    let pid = vm.vmm.pid();
    let state = dir.join("state");

    let args = vm.successor_args(&vm.args);
    let command = shim_command(&shim_bin(), &[], &vmm_bin(), &args, &state);
    let update = cpr_update(&mut vm.qmp, &command, &state, true, LONG).unwrap();
    assert_update_completed(&update);
    assert!(vm.vmm.is_running(), "the VMM process {pid} exited");
    assert_eq!(vm.status(), "running");
    vm.wait_ticks(2, 10);
    let text = vm.vmm.stdout_text();
    check_heartbeat_from_boot(&text, 2).unwrap();
    assert_eq!(boots(&text), 1, "the probe rebooted:\n{text}");

    // Again, into a VMM given the kernel under another path (the image is in guest RAM: any
    // path will do) and with vCPU 1 listed by the monitor afterwards.
    let moved = probe_copy(&dir, "moved.bzImage");
    let args = vm.successor_args(&with_kernel(&vm.args, &moved));
    let command = shim_command(&shim_bin(), &[], &vmm_bin(), &args, &state);
    let update = cpr_update(&mut vm.qmp, &command, &state, true, LONG).unwrap();
    assert_update_completed(&update);
    let cpus = vm.qmp.execute("query-cpus-fast", Value::Null).unwrap();
    assert_eq!(cpus.as_array().map(Vec::len), Some(2), "{cpus}");
    vm.wait_ticks(2, 10);
    let text = vm.vmm.stdout_text();
    check_heartbeat_from_boot(&text, 2).unwrap();
    assert_eq!(boots(&text), 1, "the probe rebooted:\n{text}");

    // The updated VMM can still reset the guest: it boots the kernel again.
    let before = report_of(&text);
    vm.qmp.execute("system_reset", Value::Null).unwrap();
    vm.qmp.wait_event("RESET", LONG).unwrap();
    let text = vm
        .vmm
        .wait_for_output(|t| t.matches("probe: ready\n").count() == 2, LONG)
        .unwrap();
    let all = split_boots(&text);
    assert_eq!(all.len(), 2, "{text}");
    assert_eq!(report_of(&all[1]), before, "{text}");
    vm.quit();
}

/// A guest restored from a file resets itself through the i8042 (whose state crossed in the
/// file): the new VMM sends `RESET` and the probe boots again there.
#[test]
fn a_restored_probe_can_reset_itself_through_the_i8042() {
    let dir = TempDir::new("lxmrst").unwrap();
    let cmdline = format!("console=ttyS0 probe.hz={HZ} probe.reset_after=100");
    let args = machine_args("64M", 2, &probe(), None, Some(&cmdline));
    let mut old = Vm::start(&dir, "old", &args, &[]);
    old.vmm.wait_for_all_ticks(2, 3, LONG).unwrap();
    let state = dir.join("state");
    old.migrate_to_file(&state);
    let old_out = old.quit();
    assert!(
        !old_out.contains("probe: reset"),
        "saved too late: the probe had reset already"
    );
    let incoming = strings(&["-incoming", &format!("file:{}", state.display())]);
    let mut new = Vm::start(&dir, "new", &args, &incoming);
    let event = new.qmp.wait_event("RESET", LONG).unwrap();
    assert_eq!(
        event["data"],
        json!({"guest": true, "reason": "guest-reset"}),
        "{event}"
    );
    let text = new
        .vmm
        .wait_for_output(|t| t.contains("probe: ready\n"), LONG)
        .unwrap();
    let whole = format!("{old_out}{text}");
    let all = split_boots(&whole);
    assert_eq!(all.len(), 2, "{whole}");
    let first = report_of(&all[0]);
    assert!(first.reset, "{whole}");
    let again = report_of(&all[1]);
    Expected::bzimage(64 * MIB, 2, &cmdline, None).check(&again, &all[1]);
    assert_eq!(
        parse_heartbeat_ticks(&all[0])[&0].last(),
        Some(&100),
        "{whole}"
    );
    new.quit();
}

#[test]
fn probe_keeps_running_across_migrate_to_file_and_incoming() {
    let dir = TempDir::new("lxmig").unwrap();
    let (mut old, _, _) = running_probe(&dir, "old");
    let state = dir.join("state");
    old.migrate_to_file(&state);
    let args = old.args.clone();
    let old_out = old.quit();

    // Restored with the kernel under another path: the image is in the saved RAM.
    let moved = probe_copy(&dir, "moved.bzImage");
    let incoming = strings(&["-incoming", &format!("file:{}", state.display())]);
    let mut new = Vm::start(&dir, "new", &with_kernel(&args, &moved), &incoming);
    assert_ticks_continue(&old_out, &new.vmm, 2, 10);
    assert_eq!(new.status(), "running");
    let new_out = new.quit();
    assert_eq!(boots(&format!("{old_out}{new_out}")), 1);

    // The state of a -kernel machine needs a -kernel machine of the same size.
    let file = format!("file:{}", state.display());
    let mut heartbeat = strings(&["-m", "64M", "-smp", "2", "--guest", "heartbeat"]);
    heartbeat.extend(strings(&["-incoming", &file]));
    assert_startup_error(&heartbeat, &["guest"]);
    let mut bigger = machine_args("128M", 2, &moved, None, None);
    bigger.extend(strings(&["-incoming", &file]));
    assert_startup_error(&bigger, &["RAM"]);
}

#[test]
fn probe_keeps_running_across_cpr_transfer() {
    let dir = TempDir::new("lxxfer").unwrap();
    let (mut old, _, _) = running_probe(&dir, "old");
    let moved = probe_copy(&dir, "moved.bzImage");
    let args = with_kernel(&old.args, &moved);
    let target = Target::start(
        dir.path(),
        "new",
        &args,
        MainChannel::Unix,
        CprSpelling::KeyValue,
        LONG,
    )
    .unwrap();
    let reply = migrate_cpr_transfer(&mut old.qmp, &target.main_path, &target.cpr_path).unwrap();
    assert_eq!(reply, json!({}));
    let events = collect_events_until(&mut old.qmp, LONG, is_migration_end).unwrap();
    let info = old.qmp.execute("query-migrate", Value::Null).unwrap();
    assert_eq!(info["status"], "completed", "{info}; events {events:?}");
    assert_eq!(old.status(), "postmigrate");
    let mut qmp = target.connect_qmp(LONG).unwrap();
    let reply = qmp.execute("query-status", Value::Null).unwrap();
    assert_eq!(reply["status"], "running", "{reply}");
    let old_out = old.quit();
    let mut new = Vm {
        qmp,
        vmm: target.vmm,
        args,
        socket: target.qmp_path,
    };
    assert_ticks_continue(&old_out, &new.vmm, 2, 10);
    let cpus = new.qmp.execute("query-cpus-fast", Value::Null).unwrap();
    assert_eq!(cpus.as_array().map(Vec::len), Some(2), "{cpus}");
    let out = new.quit();
    assert_eq!(boots(&format!("{old_out}{out}")), 1);
}

/// How a paused probe is moved to a new VMM.
#[derive(Clone, Copy, Debug)]
enum Mode {
    CprExec,
    File,
    Transfer,
}

/// Boots a 2-vCPU probe with a 512 KiB initrd and stops it while vCPU 0 is still checksumming
/// the initrd, i.e. before it has sent vCPU 1 INIT/SIPI: the probe reads its MP table (setting
/// the processor count) only after that, and the AP start after that. Moves the paused guest
/// with `mode`, checks that vCPU 1 still waits on the new side, resumes, and checks that vCPU 1
/// then comes up through INIT/SIPI, the initrd checksum is right, and every tick is there once.
fn update_while_the_ap_waits_for_sipi(mode: Mode) {
    let dir = TempDir::new("lxsipi").unwrap();
    let (path, bytes) = initrd(&dir, "initrd", 512 << 10, 7);
    let cmdline = format!("console=ttyS0 probe.hz={HZ}");
    let args = machine_args("64M", 2, &probe(), Some(&path), Some(&cmdline));
    let mut vm = Vm::start(&dir, "old", &args, &[]);
    vm.vmm
        .wait_for_output(|t| t.contains("probe: initrd 0x"), LONG)
        .unwrap();
    vm.stop();
    let globals = vm.globals(&dir.join("g-old"));
    assert_eq!(
        u32_at(&globals, G_CMDLINE) as u64,
        CMDLINE_ADDR,
        "the probe has read its command line"
    );
    assert_eq!(
        (u32_at(&globals, G_CPUS), u32_at(&globals, G_STARTED)),
        (0, 0),
        "stopped too late: vCPU 0 had finished the initrd checksum (the initrd is too small \
         for this machine's speed?)\n{}",
        vm.vmm.stdout_text()
    );

    let state = dir.join("state");
    let (mut vm, old_out) = match mode {
        Mode::CprExec => {
            let successor = vm.successor_args(&args);
            let command = shim_command(&shim_bin(), &[], &vmm_bin(), &successor, &state);
            let update = cpr_update(&mut vm.qmp, &command, &state, false, LONG).unwrap();
            assert_update_completed(&update);
            (vm, String::new())
        }
        Mode::File => {
            vm.migrate_to_file(&state);
            let old_out = vm.quit();
            let incoming = strings(&["-incoming", &format!("file:{}", state.display())]);
            (Vm::start(&dir, "new", &args, &incoming), old_out)
        }
        Mode::Transfer => {
            let target = Target::start(
                dir.path(),
                "new",
                &args,
                MainChannel::Unix,
                CprSpelling::Json,
                LONG,
            )
            .unwrap();
            migrate_cpr_transfer(&mut vm.qmp, &target.main_path, &target.cpr_path).unwrap();
            let events = collect_events_until(&mut vm.qmp, LONG, is_migration_end).unwrap();
            let info = vm.qmp.execute("query-migrate", Value::Null).unwrap();
            assert_eq!(info["status"], "completed", "{info}; {events:?}");
            let old_out = vm.quit();
            let qmp = target.connect_qmp(LONG).unwrap();
            let new = Vm {
                qmp,
                vmm: target.vmm,
                args: args.clone(),
                socket: target.qmp_path,
            };
            (new, old_out)
        }
    };
    assert_eq!(
        vm.status(),
        "paused",
        "{mode:?}: a paused guest arrives paused"
    );
    let globals = vm.globals(&dir.join("g-new"));
    assert_eq!(
        (u32_at(&globals, G_CPUS), u32_at(&globals, G_STARTED)),
        (0, 0),
        "{mode:?}: the guest ran while paused"
    );
    let cpus = vm.qmp.execute("query-cpus-fast", Value::Null).unwrap();
    assert_eq!(cpus.as_array().map(Vec::len), Some(2), "{cpus}");

    vm.cont();
    let text = vm
        .vmm
        .wait_for_output(
            |t| {
                let whole = format!("{old_out}{t}");
                whole.contains("probe: ready\n")
                    && parse_heartbeat_ticks(&whole)
                        .get(&1)
                        .is_some_and(|t| t.len() >= 5)
            },
            LONG,
        )
        .unwrap();
    let whole = format!("{old_out}{text}");
    let report = report_of(&whole);
    Expected::bzimage(64 * MIB, 2, &cmdline, Some(&bytes)).check(&report, &whole);
    check_heartbeat_from_boot(&whole, 2).unwrap();
    assert_eq!(boots(&whole), 1, "{mode:?}: the probe rebooted:\n{whole}");
    let out = vm.quit();
    check_heartbeat_from_boot(&format!("{old_out}{out}"), 2).unwrap();
}

#[test]
fn cpr_exec_while_vcpu1_waits_for_sipi() {
    update_while_the_ap_waits_for_sipi(Mode::CprExec);
}

#[test]
fn migrate_to_file_while_vcpu1_waits_for_sipi() {
    update_while_the_ap_waits_for_sipi(Mode::File);
}

#[test]
fn cpr_transfer_while_vcpu1_waits_for_sipi() {
    update_while_the_ap_waits_for_sipi(Mode::Transfer);
}

// ---------------------------------------------------------------------------
// resets

/// Splits the output of a probe that booted several times into one text per boot (each from its
/// `probe: linux-probe` line; what a reset cut short stays at the end of the previous one).
fn split_boots(text: &str) -> Vec<String> {
    const MARK: &str = "probe: linux-probe 1 at ";
    text.match_indices(MARK)
        .map(|(at, _)| at)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| text[w[0]..w[1]].to_string())
        .chain(text.rfind(MARK).map(|at| text[at..].to_string()))
        .collect()
}

/// Checks one boot's heartbeat: every vCPU started once and counted from 1.
fn check_boot_ticks(boot: &str, cpus: u32) -> BTreeMap<u32, Vec<u64>> {
    let log = parse_heartbeats(boot);
    let mut started = log.started.clone();
    started.sort_unstable();
    assert_eq!(started, (0..cpus).collect::<Vec<_>>(), "{boot}");
    for cpu in 0..cpus {
        assert_eq!(
            log.ticks.get(&cpu).and_then(|t| t.first()),
            Some(&1),
            "cpu {cpu} counts from 1 after each boot:\n{boot}"
        );
    }
    assert_ticks_consecutive(&log.ticks).unwrap();
    log.ticks
}

/// `probe.reset_after=5`: after its fifth tick vCPU 0 resets the machine through the i8042 as
/// Linux's `reboot` does. Each reset must send `RESET` (guest, guest-reset) and boot the probe
/// again from scratch, with the same boot values and vCPU 1 started again by INIT/SIPI.
#[test]
fn guest_reset_through_the_i8042_boots_the_probe_again() {
    let dir = TempDir::new("lxrst").unwrap();
    let (path, bytes) = initrd(&dir, "initrd", 2000, 8);
    let cmdline = format!("console=ttyS0 probe.hz={HZ} probe.reset_after=5");
    let args = machine_args("64M", 2, &probe(), Some(&path), Some(&cmdline));
    let mut vm = Vm::start(&dir, "vm", &args, &[]);
    for _ in 0..2 {
        let event = vm.qmp.wait_event("RESET", LONG).unwrap();
        assert_eq!(
            event["data"],
            json!({"guest": true, "reason": "guest-reset"}),
            "{event}"
        );
    }
    let text = vm
        .vmm
        .wait_for_output(|t| t.matches("probe: ready\n").count() >= 3, LONG)
        .unwrap();
    assert_eq!(vm.status(), "running");
    let all = split_boots(&text);
    assert!(all.len() >= 3, "{text}");
    // Every boot but the last is complete: it ended with vCPU 0's reset.
    let first = report_of(&all[0]);
    for (n, boot) in all[..all.len() - 1].iter().enumerate() {
        let report = report_of(boot);
        assert!(
            report.reset,
            "boot {n} did not end with `probe: reset`:\n{boot}"
        );
        Expected::bzimage(64 * MIB, 2, &cmdline, Some(&bytes)).check(&report, boot);
        assert_eq!(report, first, "boot {n}");
        let ticks = check_boot_ticks(boot, 2);
        assert_eq!(ticks[&0], [1, 2, 3, 4, 5], "boot {n}:\n{boot}");
    }
    let resets = text.matches("probe: reset\n").count();
    let events = vm.qmp.events();
    let more = events.iter().filter(|e| e["event"] == "RESET").count();
    assert!(
        resets >= 2 && 2 + more <= resets,
        "{resets} resets printed, {} RESET events seen",
        2 + more
    );
    vm.quit();
}

/// `system_reset` boots the kernel again: the probe starts from scratch with the same boot
/// values (the initrd's checksum included) and starts vCPU 1 again through INIT/SIPI.
#[test]
fn system_reset_boots_the_probe_again() {
    let dir = TempDir::new("lxsysr").unwrap();
    let (mut vm, cmdline, bytes) = running_probe(&dir, "vm");
    let before = report_of(&vm.vmm.stdout_text());
    assert_eq!(
        vm.qmp.execute("system_reset", Value::Null).unwrap(),
        json!({})
    );
    let event = vm.qmp.wait_event("RESET", LONG).unwrap();
    assert_eq!(
        event["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"}),
        "{event}"
    );
    let text = vm
        .vmm
        .wait_for_output(
            |t| {
                split_boots(t).get(1).is_some_and(|b| {
                    b.contains("probe: ready\n")
                        && (0..2).all(|cpu| {
                            parse_heartbeat_ticks(b)
                                .get(&cpu)
                                .is_some_and(|t| t.len() >= 5)
                        })
                })
            },
            LONG,
        )
        .unwrap();
    let all = split_boots(&text);
    assert_eq!(all.len(), 2, "{text}");
    let after = report_of(&all[1]);
    Expected::bzimage(64 * MIB, 2, &cmdline, Some(&bytes)).check(&after, &all[1]);
    assert_eq!(after, before);
    check_boot_ticks(&all[1], 2);
    assert_eq!(vm.status(), "running");
    let cpus = vm.qmp.execute("query-cpus-fast", Value::Null).unwrap();
    assert_eq!(cpus.as_array().map(Vec::len), Some(2), "{cpus}");
    vm.quit();
}

/// A kernel file removed after start-up (a common operator habit with temporary files): QEMU
/// keeps the images it loaded and reset boots them again. Whatever the VMM does, it must not be
/// left half reset: no vCPUs, a dead guest and `running` in `query-status`.
#[test]
fn system_reset_after_the_kernel_file_was_removed() {
    let dir = TempDir::new("lxrm").unwrap();
    let kernel = probe_copy(&dir, "gone.bzImage");
    let cmdline = format!("console=ttyS0 probe.hz={HZ}");
    let args = machine_args("64M", 2, &kernel, None, Some(&cmdline));
    let mut vm = Vm::start(&dir, "vm", &args, &[]);
    wait_ready(&vm.vmm);
    vm.vmm.wait_for_all_ticks(2, 3, LONG).unwrap();
    std::fs::remove_file(&kernel).unwrap();
    let reply = vm.qmp.execute("system_reset", Value::Null);
    let cpus = vm.qmp.execute("query-cpus-fast", Value::Null).unwrap();
    let status = vm.status();
    assert!(
        reply.is_ok(),
        "system_reset failed ({reply:?}); afterwards query-status says {status:?} and \
         query-cpus-fast {cpus}"
    );
    assert_eq!(cpus.as_array().map(Vec::len), Some(2), "{cpus}");
    vm.vmm
        .wait_for_output(
            |t| boots(t) == 2 && t.matches("probe: ready\n").count() == 2,
            LONG,
        )
        .unwrap();
    vm.quit();
}

/// The same with a reset asked for by the guest (i8042 pulse, as Linux's `reboot` does): the
/// guest must boot again, not be left without vCPUs while the VMM says it is running.
#[test]
fn guest_reset_after_the_kernel_file_was_removed() {
    let dir = TempDir::new("lxrmg").unwrap();
    let kernel = probe_copy(&dir, "gone.bzImage");
    let cmdline = format!("console=ttyS0 probe.hz={HZ} probe.reset_after=20");
    let args = machine_args("64M", 2, &kernel, None, Some(&cmdline));
    let mut vm = Vm::start(&dir, "vm", &args, &[]);
    wait_ready(&vm.vmm);
    std::fs::remove_file(&kernel).unwrap();
    vm.vmm
        .wait_for_output(|t| t.contains("probe: reset\n"), LONG)
        .unwrap();
    // A reboot takes well under a second here; do not wait a minute for one that failed.
    let rebooted = vm.vmm.wait_for_output(
        |t| t.matches("probe: ready\n").count() == 2,
        Duration::from_secs(20),
    );
    let cpus = vm.qmp.execute("query-cpus-fast", Value::Null).unwrap();
    let status = vm.status();
    let events = vm.qmp.events();
    assert!(
        rebooted.is_ok(),
        "the guest did not boot again after its reset; query-status says {status:?}, \
         query-cpus-fast {cpus}, events {events:?}; VMM log:\n{}",
        vm.vmm.stderr_text()
    );
    let reset = events.iter().find(|e| e["event"] == "RESET");
    assert_eq!(
        reset.map(|e| &e["data"]),
        Some(&json!({"guest": true, "reason": "guest-reset"})),
        "{events:?}"
    );
    assert_eq!(cpus.as_array().map(Vec::len), Some(2), "{cpus}");
    vm.quit();
}

// ---------------------------------------------------------------------------
// bad input

#[test]
fn bad_kernels_initrds_and_command_lines_each_give_one_clear_error() {
    let dir = TempDir::new("lxbad").unwrap();
    let probe = probe();
    let run = |mem: &str,
               kernel: &Path,
               initrd: Option<&Path>,
               append: Option<&str>,
               needles: &[&str]| {
        assert_startup_error(&machine_args(mem, 1, kernel, initrd, append), needles)
    };

    // Not a kernel: text, an empty file, a directory, a missing file.
    let text = dir.join("notes.txt");
    std::fs::write(&text, "this is not a kernel\n".repeat(100)).unwrap();
    run(
        "64M",
        &text,
        None,
        None,
        &["notes.txt", "not a Linux kernel"],
    );
    let empty = dir.join("zero-bytes");
    std::fs::write(&empty, b"").unwrap();
    run(
        "64M",
        &empty,
        None,
        None,
        &["zero-bytes", "not a Linux kernel"],
    );
    run(
        "64M",
        dir.path(),
        None,
        None,
        &["kernel", "not a regular file"],
    );
    let missing = dir.join("no-such-kernel");
    run(
        "64M",
        &missing,
        None,
        None,
        &["no-such-kernel", "No such file"],
    );

    // Kernels that cannot be booted: a 32-bit-only bzImage, a truncated one, an ELF for another
    // machine.
    let bits32 = patched_probe(&dir, "32bit.bzImage", |b| {
        b[HDR_XLOADFLAGS] = 0;
        b[HDR_XLOADFLAGS + 1] = 0;
    });
    run("64M", &bits32, None, None, &["32bit.bzImage", "64-bit"]);
    let truncated = patched_probe(&dir, "short.bzImage", |b| b.truncate(0x400 + 0x100));
    run("64M", &truncated, None, None, &["short.bzImage", "shorter"]);
    let i386 = dir.join("i386.elf");
    std::fs::write(&i386, elf_image(&[0xf4; 0x400], 0x100_0000, 0x400, 0, 3)).unwrap();
    run("64M", &i386, None, None, &["i386.elf", "x86-64"]);

    // Kernels that do not fit: a bzImage preferring 1 GiB in 64 MiB, an ELF whose segment
    // reaches past the end of RAM.
    let high = patched_probe(&dir, "high.bzImage", |b| {
        b[HDR_PREF_ADDRESS..HDR_PREF_ADDRESS + 8].copy_from_slice(&(GIB).to_le_bytes());
    });
    run("64M", &high, None, None, &["high.bzImage", "does not fit"]);
    let huge = dir.join("huge.elf");
    std::fs::write(
        &huge,
        elf_image(&[0xf4; 0x400], 0x100_0000, 100 * MIB, 0, 62),
    )
    .unwrap();
    run("64M", &huge, None, None, &["huge.elf", "does not fit"]);

    // Initrds: one larger than the RAM above the kernel (sparse: costs nothing), an empty one,
    // a missing one, a directory.
    let big = dir.join("big.initrd");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(60 * MIB)
        .unwrap();
    run(
        "64M",
        &probe,
        Some(&big),
        None,
        &["big.initrd", "does not fit"],
    );
    run(
        "64M",
        &probe,
        Some(&empty),
        None,
        &["initrd", "zero-bytes", "empty"],
    );
    let missing = dir.join("no-such-initrd");
    run(
        "64M",
        &probe,
        Some(&missing),
        None,
        &["initrd", "no-such-initrd"],
    );
    run(
        "64M",
        &probe,
        Some(dir.path()),
        None,
        &["initrd", "not a regular file"],
    );

    // Command lines: one byte over the probe's cmdline_size, a control character.
    let long = "a".repeat(PROBE_CMDLINE_SIZE + 1);
    run(
        "64M",
        &probe,
        None,
        Some(&long),
        &["command line", "2048", "2047"],
    );
    run(
        "64M",
        &probe,
        None,
        Some("console=ttyS0\tquiet"),
        &["command line", "0x09"],
    );

    // Options that need -kernel, and -kernel with a built-in guest.
    let initrd = dir.join("i");
    std::fs::write(&initrd, b"x").unwrap();
    let line = assert_startup_error(
        &strings(&["-m", "64M", "-initrd", initrd.to_str().unwrap()]),
        &["-kernel"],
    );
    assert!(line.contains("-initrd"), "{line}");
    assert_startup_error(
        &strings(&["-m", "64M", "--guest", "heartbeat", "-append", "quiet"]),
        &["-append", "-kernel"],
    );
    assert_startup_error(
        &strings(&[
            "-m",
            "64M",
            "--guest",
            "heartbeat",
            "-kernel",
            probe.to_str().unwrap(),
        ]),
        &["-kernel", "--guest"],
    );
}

// ---------------------------------------------------------------------------
// a real Debian kernel

/// Fetches (or reuses) the Debian cloud kernel's vmlinux; `None` when it cannot be had here,
/// recorded as a skip outside CI and a failure under CI (`prerequisite_missing`).
fn debian_vmlinux() -> Option<PathBuf> {
    const DEBIAN_TEST: &str = "debian_kernel_prints_our_command_line_and_e820_map";
    if std::env::var_os("CPR_SKIP_DEBIAN_KERNEL").is_some() {
        prerequisite_missing(DEBIAN_TEST, "CPR_SKIP_DEBIAN_KERNEL is set");
        return None;
    }
    let script = workspace_root().join("scripts/fetch-debian-kernel.sh");
    let cache = target_dir().join("debian-kernel");
    let output = match Command::new("bash").arg(&script).arg(&cache).output() {
        Ok(output) => output,
        Err(e) => {
            prerequisite_missing(
                DEBIAN_TEST,
                &format!("cannot run {}: {e}", script.display()),
            );
            return None;
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => {}
        Some(2) => {
            prerequisite_missing(
                DEBIAN_TEST,
                &format!("the kernel package cannot be had here: {}", stderr.trim()),
            );
            return None;
        }
        _ => panic!(
            "{} {} failed ({}):\n{stderr}",
            script.display(),
            cache.display(),
            output.status
        ),
    }
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(path.is_file(), "the script printed {path:?}, not a file");
    Some(path)
}

/// Whether `text` holds a complete line containing `needle`.
fn has_line(text: &str, needle: &str) -> bool {
    text.find(needle)
        .is_some_and(|at| text[at..].contains('\n'))
}

/// Whether Linux's log shows everything this test checks: `Linux version`, `Command line:`, the
/// `BIOS-provided physical RAM map`, and what follows it up to `last_pfn =` (always printed,
/// from the e820 map, after the hypervisor detection and the kvm-clock set-up).
fn linux_lines_complete(text: &str) -> bool {
    [
        "Linux version",
        "Command line: ",
        "BIOS-provided physical RAM map:",
        "last_pfn = ",
    ]
    .iter()
    .all(|needle| has_line(text, needle))
}

/// The range Linux printed on its `RAMDISK: [mem 0xSTART-0xEND]` line (end inclusive).
fn parse_linux_ramdisk(text: &str) -> Option<(u64, u64)> {
    let at = text.find("RAMDISK: [mem 0x")? + "RAMDISK: [mem ".len();
    let (range, _) = text[at..].split_once(']')?;
    let (start, end) = range.split_once('-')?;
    let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x")?, 16).ok();
    Some((hex(start)?, hex(end)?))
}

/// One real-kernel boot: `-m mem -smp cpus`, optionally with an initrd of `initrd` bytes.
struct LinuxBoot {
    mem: &'static str,
    ram: u64,
    cpus: u32,
    initrd: Option<u64>,
}

/// A real Debian kernel checks our boot path itself. Two machines boot at once: 512 MiB with one
/// vCPU, and 5 GiB (RAM above the 32-bit hole) with two vCPUs and a 64 KiB initrd. Each must
/// print `Linux version`, a `Command line:` equal to `-append`, and a `BIOS-provided physical RAM
/// map` equal to the VMM's e820 map, and find KVM and kvmclock through CPUID; the second also
/// where it found the initrd (`RAMDISK:`, where the VMM put it) and the ACPI RSDP. Then the VMs
/// are killed: the rest of the boot fails on this host's nested KVM.
#[test]
fn debian_kernel_prints_our_command_line_and_e820_map() {
    let Some(vmlinux) = debian_vmlinux() else {
        return;
    };
    let dir = TempDir::new("lxdeb").unwrap();
    let cmdline = r#"console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 cpr.test="boot lines""#;
    let boots = [
        LinuxBoot {
            mem: "512M",
            ram: 512 * MIB,
            cpus: 1,
            initrd: None,
        },
        LinuxBoot {
            mem: "5G",
            ram: 5 * GIB,
            cpus: 2,
            initrd: Some(64 << 10),
        },
    ];
    let vms: Vec<Vm> = boots
        .iter()
        .enumerate()
        .map(|(n, boot)| {
            let initrd = boot
                .initrd
                .map(|size| initrd(&dir, &format!("initrd{n}"), size as usize, 9).0);
            let args = machine_args(
                boot.mem,
                boot.cpus,
                &vmlinux,
                initrd.as_deref(),
                Some(cmdline),
            );
            Vm::start(&dir, &format!("vm{n}"), &args, &[])
        })
        .collect();
    for (boot, vm) in boots.iter().zip(&vms) {
        let what = format!("-m {} -smp {}", boot.mem, boot.cpus);
        let text = vm
            .vmm
            .wait_for_output(
                |t| {
                    linux_lines_complete(t)
                        && (boot.initrd.is_none()
                            || (has_line(t, "RAMDISK: ") && has_line(t, "ACPI: RSDP ")))
                },
                LINUX_LINES_TIMEOUT,
            )
            .unwrap();
        let version = text.find("Linux version").unwrap();
        let command = text.find("Command line: ").unwrap();
        let map = text.find("BIOS-provided physical RAM map:").unwrap();
        assert!(version < command && command < map, "{what}:\n{text}");
        assert_eq!(
            parse_linux_cmdline(&text).as_deref(),
            Some(cmdline),
            "{what}: Linux's `Command line:` differs from -append:\n{text}"
        );
        let e820 = parse_linux_e820(&text).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"));
        assert_eq!(
            e820,
            expected_e820(boot.ram),
            "{what}: Linux's BIOS-provided map differs from the VMM's e820 map:\n{text}"
        );
        // CPUID shows the KVM signature and kvmclock.
        assert!(
            has_line(&text, "Hypervisor detected: KVM") && text.contains("kvm-clock: Using msrs"),
            "{what}: Linux did not find KVM or kvmclock:\n{text}"
        );
        if let Some(size) = boot.initrd {
            let start = expected_initrd_addr(boot.ram, size);
            assert_eq!(
                parse_linux_ramdisk(&text),
                Some((start, start + size.next_multiple_of(4096) - 1)),
                "{what}: where Linux found the initrd:\n{text}"
            );
            assert!(
                text.contains("ACPI: RSDP 0x00000000000E0000 "),
                "{what}: Linux found the RSDP elsewhere:\n{text}"
            );
        }
        let line = text[version..].lines().next().unwrap_or("");
        eprintln!("{what} booted: {line}");
    }
    // Done: the rest of the boot fails on this host's nested KVM. Dropping kills the VMMs.
    drop(vms);

    // The kernel needs more RAM than 16 MiB: one clear error.
    assert_startup_error(
        &machine_args("16M", 1, &vmlinux, None, None),
        &["vmlinux", "does not fit"],
    );
}
