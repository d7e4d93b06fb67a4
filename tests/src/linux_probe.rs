//! The `linux-probe` boot-protocol test guest: building it and reading what it prints.
//!
//! `vmm/guests/linux-probe.S` (linked by `vmm/guests/linux-probe.ld`) assembles into a file in
//! real bzImage format: a setup header at 0x1f1 with "HdrS", boot protocol 2.12, XLF_KERNEL_64,
//! a relocatable kernel preferring 16 MiB, and a protected-mode payload whose 64-bit entry point
//! is at payload offset 0x200. The VMM boots it with `-kernel` exactly like a Linux bzImage. Its
//! code reads `boot_params` from RSI and prints one `probe: ...` line per finding (see
//! [`ProbeReport`] and the source's header comment), then runs the heartbeat loop on every vCPU
//! (`heartbeat: cpu N tick T`), starting the APs itself with INIT/SIPI.
//!
//! The initrd checksum is CRC-32C (Castagnoli; [`crc32c`]).
//!
//! Guest memory the probe uses (for `pmemsave` checks): per-vCPU areas at
//! [`PROBE_PERCPU_BASE`] `+ 64 * i` (`+0` u64 ticks taken, `+8` u64 last tick printed, the same
//! layout as the built-in heartbeat's areas at 0x7100).
//!
//! For real kernels, [`expected_e820`], [`parse_linux_e820`] and [`parse_linux_cmdline`] compare
//! Linux's first boot lines with what the VMM passed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::binaries::workspace_root;

/// Guest-physical address of vCPU 0's per-vCPU area in the probe.
pub const PROBE_PERCPU_BASE: u64 = 0x5000;
/// Distance between two vCPUs' areas.
pub const PROBE_PERCPU_STRIDE: u64 = 64;
/// Most vCPUs the probe runs (more in the MP table are not started).
pub const PROBE_MAX_CPUS: u32 = 16;
/// The longest command line the probe's setup header accepts (`cmdline_size`).
pub const PROBE_CMDLINE_SIZE: usize = 2047;
/// The probe's default heartbeat rate (`probe.hz=N` on the command line changes it).
pub const PROBE_DEFAULT_HZ: u32 = 10;

const SETUP_HEADER_MAGIC_OFFSET: usize = 0x202;

/// Where the probe's sources are.
pub fn probe_source_dir() -> PathBuf {
    workspace_root().join("vmm").join("guests")
}

/// Assembles `vmm/guests/linux-probe.S` with GNU binutils (`as`, `ld`, `objcopy`) into
/// `out_dir/linux-probe.bzImage` and returns its path. Checks the result's setup header.
/// Safe to call from several tests at once (the file is replaced atomically).
pub fn build_linux_probe(out_dir: &Path) -> Result<PathBuf, String> {
    static BUILD: AtomicU64 = AtomicU64::new(0);
    let src = probe_source_dir();
    let source = src.join("linux-probe.S");
    let script = src.join("linux-probe.ld");
    std::fs::create_dir_all(out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let tag = format!(
        "{}-{}",
        std::process::id(),
        BUILD.fetch_add(1, Ordering::Relaxed)
    );
    let object = out_dir.join(format!("linux-probe-{tag}.o"));
    let elf = out_dir.join(format!("linux-probe-{tag}.elf"));
    let image_tmp = out_dir.join(format!("linux-probe-{tag}.bzImage"));
    let image = out_dir.join("linux-probe.bzImage");

    let result = (|| {
        run_tool(
            Command::new("as")
                .arg("--64")
                .arg("-I")
                .arg(&src)
                .arg("-o")
                .arg(&object)
                .arg(&source),
        )?;
        run_tool(
            Command::new("ld")
                .args([
                    "-m",
                    "elf_x86_64",
                    "-nostdlib",
                    "-static",
                    "--build-id=none",
                ])
                .arg("-T")
                .arg(&script)
                .arg("-o")
                .arg(&elf)
                .arg(&object),
        )?;
        run_tool(
            Command::new("objcopy")
                .args(["-O", "binary"])
                .arg(&elf)
                .arg(&image_tmp),
        )?;
        let bytes = std::fs::read(&image_tmp)
            .map_err(|e| format!("cannot read {}: {e}", image_tmp.display()))?;
        check_bzimage(&bytes)?;
        std::fs::rename(&image_tmp, &image).map_err(|e| {
            format!(
                "cannot rename {} to {}: {e}",
                image_tmp.display(),
                image.display()
            )
        })
    })();
    for leftover in [&object, &elf, &image_tmp] {
        let _ = std::fs::remove_file(leftover);
    }
    result.map(|()| image)
}

/// Writes an initrd file with these contents.
pub fn build_initrd(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("cannot write initrd {}: {e}", path.display()))
}

/// `size` bytes of a deterministic pseudo-random pattern (xorshift from `seed`), so that a
/// misplaced or truncated initrd changes its checksum.
pub fn pattern_bytes(size: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// CRC-32C (Castagnoli: reflected polynomial 0x82f63b78, initial value and final XOR
/// 0xffffffff), what the probe prints for the initrd. `crc32c(b"123456789") == 0xe3069283`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let table: [u32; 256] = std::array::from_fn(|i| {
        (0..8).fold(i as u32, |c, _| {
            if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            }
        })
    });
    !bytes.iter().fold(!0u32, |crc, &b| {
        table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// What the probe printed about its boot (the `probe: ...` lines).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeReport {
    /// Where the probe found itself loaded (`probe: linux-probe 1 at ADDR boot_params ADDR`).
    pub load_addr: Option<u64>,
    pub boot_params: Option<u64>,
    /// `probe: hdr version V loader L code32_start C magic ok|bad`.
    pub header: Option<ProbeHeader>,
    /// The e820 map: `(addr, size, type)`; the count line's value is checked against it.
    pub e820: Vec<(u64, u64, u32)>,
    /// The command line, exactly as the guest read it.
    pub cmdline: Option<String>,
    /// `(addr, size, crc32c)`, or None for `probe: initrd none` / no line yet.
    pub initrd: Option<(u64, u64, u32)>,
    /// Whether `probe: initrd none` was printed.
    pub initrd_none: bool,
    /// The MP table the probe found.
    pub mptable: Option<ProbeMpTable>,
    /// The ACPI tables it found through `boot_params.acpi_rsdp_addr` (RSDP, XSDT, MADT).
    pub acpi: Option<ProbeAcpi>,
    /// The heartbeat rate it uses.
    pub hz: Option<u32>,
    /// `(vCPU index, APIC id, started)` per AP it tried to start.
    pub aps: Vec<(u32, u32, bool)>,
    /// The `probe: pci ...` lines (without `probe: `): every function on bus 0 with its BARs
    /// and capabilities.
    pub pci: Vec<String>,
    /// `probe: ready` was printed (all probe lines are complete).
    pub ready: bool,
    /// `probe: reset` was printed: vCPU 0 is about to reset the machine through the i8042
    /// (`probe.reset_after=N`).
    pub reset: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeHeader {
    pub version: u16,
    pub loader: u8,
    pub code32_start: u64,
    pub magic_ok: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeAcpi {
    pub rsdp: u64,
    /// Enabled local APICs in the MADT.
    pub cpus: u32,
    pub ioapic_id: u32,
    pub ioapic_addr: u64,
    /// RSDP (both), XSDT and MADT checksums.
    pub checksum_ok: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeMpTable {
    pub cpus: u32,
    pub ioapic_id: u32,
    pub ioapic_addr: u64,
    pub checksum_ok: bool,
}

fn hex(word: &str) -> Result<u64, String> {
    word.strip_prefix("0x")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| format!("{word:?} is not a 0x-prefixed hex number"))
}

fn dec<T: std::str::FromStr>(word: &str) -> Result<T, String> {
    word.parse()
        .map_err(|_| format!("{word:?} is not a decimal number"))
}

/// Parses the complete `probe: ` lines of the serial output. Errors name the malformed line.
pub fn parse_probe_output(text: &str) -> Result<ProbeReport, String> {
    let mut report = ProbeReport::default();
    let mut e820_count = None;
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    for raw in text[..end].lines() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let Some(start) = line.find("probe: ") else {
            continue;
        };
        let rest = &line[start + "probe: ".len()..];
        let bad = |why: String| format!("malformed probe line {line:?}: {why}");
        if let Some(cmdline) = rest.strip_prefix("cmdline ") {
            report.cmdline = Some(cmdline.to_string());
            continue;
        }
        if rest == "cmdline" {
            report.cmdline = Some(String::new());
            continue;
        }
        let words: Vec<&str> = rest.split(' ').collect();
        match words.as_slice() {
            ["linux-probe", _, "at", load, "boot_params", bp] => {
                report.load_addr = Some(hex(load).map_err(bad)?);
                report.boot_params = Some(hex(bp).map_err(bad)?);
            }
            [
                "hdr",
                "version",
                v,
                "loader",
                l,
                "code32_start",
                c,
                "magic",
                m,
            ] => {
                report.header = Some(ProbeHeader {
                    version: hex(v).map_err(bad)? as u16,
                    loader: hex(l).map_err(bad)? as u8,
                    code32_start: hex(c).map_err(bad)?,
                    magic_ok: *m == "ok",
                });
            }
            ["e820", n, "entries"] => e820_count = Some(dec::<usize>(n).map_err(bad)?),
            ["e820", addr, size, kind] => report.e820.push((
                hex(addr).map_err(bad)?,
                hex(size).map_err(bad)?,
                dec(kind).map_err(bad)?,
            )),
            ["initrd", "none"] => report.initrd_none = true,
            ["initrd", addr, size, crc] => {
                report.initrd = Some((
                    hex(addr).map_err(bad)?,
                    hex(size).map_err(bad)?,
                    hex(crc).map_err(bad)? as u32,
                ))
            }
            ["mptable", "none"] => {}
            ["mptable", "cpus", n, "ioapic", id, addr, "checksum", ok] => {
                report.mptable = Some(ProbeMpTable {
                    cpus: dec(n).map_err(bad)?,
                    ioapic_id: dec(id).map_err(bad)?,
                    ioapic_addr: hex(addr).map_err(bad)?,
                    checksum_ok: *ok == "ok",
                })
            }
            ["acpi", "none"] => {}
            [
                "acpi",
                "rsdp",
                rsdp,
                "madt",
                "cpus",
                n,
                "ioapic",
                id,
                addr,
                "checksum",
                ok,
            ] => {
                report.acpi = Some(ProbeAcpi {
                    rsdp: hex(rsdp).map_err(bad)?,
                    cpus: dec(n).map_err(bad)?,
                    ioapic_id: dec(id).map_err(bad)?,
                    ioapic_addr: hex(addr).map_err(bad)?,
                    checksum_ok: *ok == "ok",
                })
            }
            ["heartbeat", "hz", hz] => report.hz = Some(dec(hz).map_err(bad)?),
            ["cpu", cpu, "apic", apic, "started"] => {
                report
                    .aps
                    .push((dec(cpu).map_err(bad)?, dec(apic).map_err(bad)?, true))
            }
            ["cpu", cpu, "apic", apic, "did", "not", "start"] => {
                report
                    .aps
                    .push((dec(cpu).map_err(bad)?, dec(apic).map_err(bad)?, false))
            }
            ["pci", _, ..] => report.pci.push(rest.to_string()),
            ["ready"] => report.ready = true,
            ["reset"] => report.reset = true,
            // Fault reports and messages from the unsupported entry points.
            _ => return Err(bad("unexpected line".to_string())),
        }
    }
    if let Some(n) = e820_count
        && report.ready
        && n != report.e820.len()
    {
        return Err(format!(
            "the probe announced {n} e820 entries but printed {}",
            report.e820.len()
        ));
    }
    Ok(report)
}

/// The e820 map the VMM gives a Linux guest with `ram_size` bytes of RAM (`-m`), as
/// `(addr, size, type)` with type 1 = usable, 2 = reserved: RAM below 0x9fc00 usable, the EBDA
/// and BIOS area 0x9fc00..1 MiB reserved, RAM from 1 MiB to the 3 GiB PCI hole usable, and the
/// rest of RAM usable from 4 GiB. An independent statement of the layout for tests to compare
/// against the probe's and Linux's reports.
pub fn expected_e820(ram_size: u64) -> Vec<(u64, u64, u32)> {
    const EBDA: u64 = 0x9fc00;
    const HIMEM: u64 = 0x10_0000;
    const LOW_LIMIT: u64 = 3 << 30;
    const HIGH_START: u64 = 4 << 30;
    let low = ram_size.min(LOW_LIMIT);
    let mut map = Vec::new();
    let mut push = |start: u64, end: u64, kind: u32| {
        if end > start {
            map.push((start, end - start, kind));
        }
    };
    push(0, low.min(EBDA), 1);
    push(EBDA, low.min(HIMEM), 2);
    push(HIMEM, low, 1);
    if ram_size > low {
        push(HIGH_START, HIGH_START + (ram_size - low), 1);
    }
    map
}

/// The e820 map Linux printed under `BIOS-provided physical RAM map:`, from its lines
/// `BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable` (end inclusive), as
/// `(addr, size, type)`: usable = 1, reserved = 2, ACPI data = 3, ACPI NVS = 4, unusable = 5;
/// other names are an error.
pub fn parse_linux_e820(text: &str) -> Result<Vec<(u64, u64, u32)>, String> {
    let mut map = Vec::new();
    for line in text.lines() {
        let Some(at) = line.find("BIOS-e820: [mem ") else {
            continue;
        };
        let rest = &line[at + "BIOS-e820: [mem ".len()..];
        let bad = || format!("malformed Linux e820 line {line:?}");
        let (range, name) = rest.split_once("] ").ok_or_else(bad)?;
        let (start, end) = range.split_once('-').ok_or_else(bad)?;
        let (start, end) = (hex(start).map_err(|_| bad())?, hex(end).map_err(|_| bad())?);
        let kind = match name.trim() {
            "usable" => 1,
            "reserved" => 2,
            "ACPI data" => 3,
            "ACPI NVS" => 4,
            "unusable" => 5,
            _ => return Err(bad()),
        };
        map.push((start, end.wrapping_sub(start).wrapping_add(1), kind));
    }
    Ok(map)
}

/// The command line Linux printed on its `Command line: ...` line (its first one, right after
/// `Linux version`), without the timestamp prefix.
pub fn parse_linux_cmdline(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let at = line
            .find("] Command line: ")
            .map(|i| i + "] Command line: ".len());
        let at = at.or_else(|| line.starts_with("Command line: ").then_some(14))?;
        Some(line[at..].trim_end_matches('\r').to_string())
    })
}

/// Checks the setup header of a freshly built probe.
fn check_bzimage(bytes: &[u8]) -> Result<(), String> {
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if bytes.get(SETUP_HEADER_MAGIC_OFFSET..SETUP_HEADER_MAGIC_OFFSET + 4) != Some(b"HdrS") {
        return Err("the built probe has no HdrS setup header".into());
    }
    let version = u16_at(0x206).unwrap_or(0);
    let xloadflags = u16_at(0x236).unwrap_or(0);
    if version < 0x020c || xloadflags & 1 == 0 {
        return Err(format!(
            "the built probe's header says protocol {version:#x}, xloadflags {xloadflags:#x}"
        ));
    }
    let setup_size = (usize::from(bytes[0x1f1]) + 1) * 512;
    let payload = bytes.len().saturating_sub(setup_size);
    let syssize = u32_at(0x1f4).unwrap_or(0) as usize * 16;
    let init_size = u32_at(0x260).unwrap_or(0) as usize;
    if payload <= 0x200 || syssize < payload || init_size < payload {
        return Err(format!(
            "the built probe's sizes are inconsistent: payload {payload}, syssize*16 {syssize}, \
             init_size {init_size}"
        ));
    }
    Ok(())
}

/// Runs a build tool, turning a failure into a message with its output.
fn run_tool(cmd: &mut Command) -> Result<(), String> {
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd.output().map_err(|e| {
        format!(
            "cannot run `{shown}`: {e} (the probe is built with GNU binutils: \
             `apt-get install binutils`)"
        )
    })?;
    if !out.status.success() {
        return Err(format!(
            "`{shown}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn pattern_is_deterministic() {
        assert_eq!(pattern_bytes(64, 7), pattern_bytes(64, 7));
        assert_ne!(pattern_bytes(64, 7), pattern_bytes(64, 8));
    }

    #[test]
    fn builds_a_bzimage() {
        let dir = std::env::temp_dir().join(format!("linux-probe-build-{}", std::process::id()));
        let path = build_linux_probe(&dir).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[0x202..0x206], b"HdrS");
        assert_eq!(u16::from_le_bytes([bytes[0x1fe], bytes[0x1ff]]), 0xaa55);
        // The 64-bit entry point (payload offset 0x200) starts with cli; cld.
        let setup = (usize::from(bytes[0x1f1]) + 1) * 512;
        assert_eq!(&bytes[setup + 0x200..setup + 0x202], &[0xfa, 0xfc]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn expected_e820_follows_the_vmm_layout() {
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        assert_eq!(
            expected_e820(64 * MIB),
            vec![(0, 0x9fc00, 1), (0x9fc00, 0x60400, 2), (MIB, 63 * MIB, 1)]
        );
        assert_eq!(
            expected_e820(5 * GIB),
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x60400, 2),
                (MIB, 3 * GIB - MIB, 1),
                (4 * GIB, 2 * GIB, 1)
            ]
        );
    }

    #[test]
    fn parses_linux_boot_lines() {
        let log = "\
[    0.000000] Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org)\n\
[    0.000000] Command line: console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1\n\
[    0.000000] BIOS-provided physical RAM map:\n\
[    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable\n\
[    0.000000] BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved\n\
[    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable\n\
[   23.019286] Kernel command line: console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1\n";
        assert_eq!(
            parse_linux_e820(log).unwrap(),
            expected_e820(512 << 20),
            "the map Debian's 6.1 kernel printed here for -m 512M"
        );
        assert_eq!(
            parse_linux_cmdline(log).as_deref(),
            Some("console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1")
        );
        assert!(parse_linux_e820("BIOS-e820: [mem 0x0-0xfff] weird\n").is_err());
        assert_eq!(parse_linux_cmdline("nothing here\n"), None);
    }

    #[test]
    fn parses_probe_output() {
        let text = "\
probe: linux-probe 1 at 0x1000000 boot_params 0x7000\n\
probe: hdr version 0x20c loader 0xff code32_start 0x1000000 magic ok\n\
probe: e820 2 entries\n\
probe: e820 0x0 0x9fc00 1\n\
probe: e820 0x100000 0x3f00000 1\n\
probe: cmdline console=ttyS0 probe.hz=50\n\
probe: initrd 0x3ffe000 0x2000 0xe3069283\n\
probe: mptable cpus 2 ioapic 2 0xfec00000 checksum ok\n\
probe: acpi rsdp 0xe0000 madt cpus 2 ioapic 2 0xfec00000 checksum ok\n\
probe: heartbeat hz 50\n\
heartbeat: cpu 0 start\n\
probe: cpu 1 apic 1 started\n\
probe: ready\n\
heartbeat: cpu 0 tick 1\n\
probe: e820 0x0 0x9fc00";
        let r = parse_probe_output(text).unwrap();
        assert_eq!(r.load_addr, Some(0x100_0000));
        assert_eq!(r.boot_params, Some(0x7000));
        assert_eq!(
            r.header,
            Some(ProbeHeader {
                version: 0x20c,
                loader: 0xff,
                code32_start: 0x100_0000,
                magic_ok: true
            })
        );
        assert_eq!(r.e820, vec![(0, 0x9fc00, 1), (0x10_0000, 0x3f0_0000, 1)]);
        assert_eq!(r.cmdline.as_deref(), Some("console=ttyS0 probe.hz=50"));
        assert_eq!(r.initrd, Some((0x3ffe000, 0x2000, 0xe306_9283)));
        assert_eq!(r.mptable.map(|m| (m.cpus, m.ioapic_id)), Some((2, 2)));
        assert_eq!(
            r.acpi,
            Some(ProbeAcpi {
                rsdp: 0xe0000,
                cpus: 2,
                ioapic_id: 2,
                ioapic_addr: 0xfec0_0000,
                checksum_ok: true
            })
        );
        assert_eq!(r.hz, Some(50));
        assert_eq!(r.aps, vec![(1, 1, true)]);
        assert!(r.ready);
        assert!(parse_probe_output("probe: e820 zz entries\n").is_err());
        let empty = parse_probe_output("probe: cmdline \nprobe: initrd none\n").unwrap();
        assert_eq!(empty.cmdline.as_deref(), Some(""));
        assert!(empty.initrd_none);
    }
}
