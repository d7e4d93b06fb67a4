//! The `blkcheck` virtio-blk driver guest (`vmm/guests/blkcheck.S`): its sector format, a
//! checker for the disk images it leaves behind, its console lines and its counters block, and
//! building its bzImage flavour for QEMU.
//!
//! blkcheck writes generation G of a 4 KiB-request pass into every sector of its region (the
//! first `min(capacity, 16 MiB)` of the disk, rounded down to 4 KiB), reads everything back,
//! verifies, flushes, and only then counts the pass as done (`blkcheck: pass G done ...`). So
//! after a run whose last completed pass is G, every sector of the region holds generation G,
//! or G + 1 if the pass in flight had already written it. [`check_image`] verifies exactly
//! that; anything else (a stale, misplaced, torn or zeroed sector) is an error naming the
//! sector.
//!
//! `bs=N` (`blkcheck.bs=NK`) makes the requests N bytes and the region a whole number of them,
//! so [`check_image`] (which rounds to 4 KiB) applies as is when the disk's first 16 MiB are a
//! multiple of N; `order=random` (`blkcheck.order=random`) changes only the order in which the
//! requests of a phase are made, each still once, so it changes nothing here.
//!
//! Sector format (512 bytes, 64 little-endian u64 words `q`), sector S, generation G:
//! `q[0] = PATTERN_MAGIC` ("BLKCHECK"), `q[1] = S`, `q[2] = G`, and for `i` in 3..64
//! `q[i] = seed + i * K3` with `seed = S * K1 ^ G * K2` (wrapping arithmetic).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binaries::workspace_root;

/// Bytes per sector (virtio-blk addresses 512-byte sectors whatever the block size).
pub const SECTOR_SIZE: usize = 512;
/// Sectors per request; the region is a multiple of it.
pub const REQUEST_SECTORS: u64 = 8;
/// The region covers at most this many sectors (16 MiB).
pub const REGION_LIMIT_SECTORS: u64 = 32768;
/// `q[0]` of every written sector: "BLKCHECK" little-endian.
pub const PATTERN_MAGIC: u64 = 0x4b43_4548_434b_4c42;
/// Pattern multipliers (see the module documentation).
pub const PATTERN_K1: u64 = 0x9e37_79b9_7f4a_7c15;
/// See [`PATTERN_K1`].
pub const PATTERN_K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
/// See [`PATTERN_K1`].
pub const PATTERN_K3: u64 = 0x1656_67b1_9e37_79f9;
/// Guest-physical address of the counters block (see [`BlkcheckCounters`]).
pub const COUNTERS_ADDR: u64 = 0x30000;
/// Bytes of the counters block that [`BlkcheckCounters::parse`] reads.
pub const COUNTERS_SIZE: usize = 0x58;
/// Exit status when no virtio-blk device is on PCI bus 0.
pub const EXIT_NO_DEVICE: u8 = 0x20;
/// Exit status when the device cannot be driven (`blkcheck: FAILED ...`).
pub const EXIT_DEVICE_ERROR: u8 = 0x21;
/// Exit status after the requested passes when a request failed or a sector mismatched.
pub const EXIT_DATA_ERROR: u8 = 0x22;

/// The 512 bytes blkcheck writes into `sector` in generation `generation`.
pub fn sector_pattern(sector: u64, generation: u64) -> [u8; SECTOR_SIZE] {
    let mut out = [0u8; SECTOR_SIZE];
    for (i, word) in out.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&pattern_word(sector, generation, i).to_le_bytes());
    }
    out
}

fn pattern_word(sector: u64, generation: u64, i: usize) -> u64 {
    match i {
        0 => PATTERN_MAGIC,
        1 => sector,
        2 => generation,
        _ => {
            let seed = sector.wrapping_mul(PATTERN_K1) ^ generation.wrapping_mul(PATTERN_K2);
            seed.wrapping_add((i as u64).wrapping_mul(PATTERN_K3))
        }
    }
}

/// What one sector of an image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectorContent {
    /// Exactly blkcheck's pattern for this sector and this generation.
    Generation(u64),
    /// All zero: never written.
    Unwritten,
    /// Anything else. `claims` is the (sector, generation) its header words name, and `word`
    /// the first 8-byte word that differs from that claim's pattern.
    Corrupt {
        /// `q[1]` and `q[2]` as found.
        claims: (u64, u64),
        /// First wrong word index (0 = the magic).
        word: usize,
    },
}

/// Decodes sector number `sector` from its 512 bytes.
pub fn decode_sector(sector: u64, bytes: &[u8]) -> SectorContent {
    let word = |i: usize| {
        bytes
            .get(i * 8..i * 8 + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes)
    };
    if bytes.len() == SECTOR_SIZE && bytes.iter().all(|&b| b == 0) {
        return SectorContent::Unwritten;
    }
    let claims = (word(1), word(2));
    let first_bad = (0..SECTOR_SIZE / 8)
        .find(|&i| word(i) != pattern_word(sector, claims.1, i))
        .or((bytes.len() != SECTOR_SIZE).then_some(0));
    match first_bad {
        None => SectorContent::Generation(claims.1),
        Some(word) => SectorContent::Corrupt { claims, word },
    }
}

/// The region blkcheck uses on a disk of `disk_bytes` bytes, in sectors.
pub fn region_sectors(disk_bytes: u64) -> u64 {
    (disk_bytes / SECTOR_SIZE as u64).min(REGION_LIMIT_SECTORS) / REQUEST_SECTORS * REQUEST_SECTORS
}

/// Why an image does not hold what blkcheck's last completed pass left.
#[derive(Debug, thiserror::Error)]
pub enum BlkcheckError {
    /// The image could not be read.
    #[error("cannot read the disk image {path}: {source}")]
    Read {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The image is smaller than one request: blkcheck would not have run on it.
    #[error("the disk image is {0} bytes, smaller than one 4 KiB request: nothing to check")]
    TooSmall(u64),
    /// Sectors hold something else than the allowed generations.
    #[error(
        "{count} of {region} sectors do not hold generation {allowed:?} (the last completed \
         pass, or the one in flight); first ones: {first:?}"
    )]
    BadSectors {
        /// How many sectors are wrong.
        count: u64,
        /// Sectors in the region.
        region: u64,
        /// The generations that were allowed.
        allowed: Vec<u64>,
        /// Up to 8 wrong sectors and what they held.
        first: Vec<(u64, SectorContent)>,
    },
}

/// A verified image: how many sectors hold each allowed generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageSummary {
    /// Sectors checked.
    pub region: u64,
    /// Sectors holding the last completed generation (or unwritten, when that is 0).
    pub last: u64,
    /// Sectors already holding the next generation (written by the pass in flight).
    pub next: u64,
}

/// Checks an image in memory: every sector of the region holds generation `last_completed`
/// or `last_completed + 1`; with `last_completed == 0` (no pass done yet), unwritten sectors
/// count as the former.
pub fn check_image_bytes(image: &[u8], last_completed: u64) -> Result<ImageSummary, BlkcheckError> {
    let region = region_sectors(image.len() as u64);
    if region == 0 {
        return Err(BlkcheckError::TooSmall(image.len() as u64));
    }
    let next_gen = last_completed + 1;
    let mut summary = ImageSummary {
        region,
        last: 0,
        next: 0,
    };
    let mut bad = Vec::new();
    let mut count = 0u64;
    for (sector, bytes) in (0..region).zip(image.chunks_exact(SECTOR_SIZE)) {
        match decode_sector(sector, bytes) {
            SectorContent::Generation(g) if g == last_completed => summary.last += 1,
            SectorContent::Unwritten if last_completed == 0 => summary.last += 1,
            SectorContent::Generation(g) if g == next_gen => summary.next += 1,
            other => {
                count += 1;
                if bad.len() < 8 {
                    bad.push((sector, other));
                }
            }
        }
    }
    if count > 0 {
        return Err(BlkcheckError::BadSectors {
            count,
            region,
            allowed: vec![last_completed, next_gen],
            first: bad,
        });
    }
    Ok(summary)
}

/// [`check_image_bytes`] on the region of a disk image file.
pub fn check_image(path: &Path, last_completed: u64) -> Result<ImageSummary, BlkcheckError> {
    let read = |source| BlkcheckError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read)?.len();
    let want = region_sectors(len) * SECTOR_SIZE as u64;
    let mut image = Vec::new();
    use std::io::Read;
    std::fs::File::open(path)
        .map_err(read)?
        .take(want)
        .read_to_end(&mut image)
        .map_err(read)?;
    if (image.len() as u64) < want {
        return Err(read(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the file shrank while it was read",
        )));
    }
    // Pass the real length so that the region is computed from the file, not the slice.
    check_image_bytes(&image, last_completed).map_err(|e| match e {
        BlkcheckError::TooSmall(_) => BlkcheckError::TooSmall(len),
        other => other,
    })
}

/// One `blkcheck: pass G done requests N total T errors E mismatches M ticks K irqs I` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassLine {
    /// The generation completed.
    pub generation: u64,
    /// Requests completed in this pass.
    pub requests: u64,
    /// Requests completed since the start.
    pub total: u64,
    /// I/O errors since the start.
    pub errors: u64,
    /// Mismatched sectors since the start.
    pub mismatches: u64,
    /// Timer ticks this pass took.
    pub ticks: u64,
    /// Queue interrupts since the start.
    pub irqs: u64,
}

/// The pass lines of a console log, in order (partial last lines are ignored).
pub fn parse_pass_lines(console: &str) -> Vec<PassLine> {
    console
        .lines()
        .filter_map(|line| {
            let rest = line.trim_end().strip_prefix("blkcheck: pass ")?;
            let w: Vec<&str> = rest.split(' ').collect();
            let n = |i: usize| w.get(i)?.parse::<u64>().ok();
            match w.as_slice() {
                [
                    _,
                    "done",
                    "requests",
                    _,
                    "total",
                    _,
                    "errors",
                    _,
                    "mismatches",
                    _,
                    "ticks",
                    _,
                    "irqs",
                    _,
                ] => Some(PassLine {
                    generation: n(0)?,
                    requests: n(3)?,
                    total: n(5)?,
                    errors: n(7)?,
                    mismatches: n(9)?,
                    ticks: n(11)?,
                    irqs: n(13)?,
                }),
                _ => None,
            }
        })
        .collect()
}

/// The `blkcheck: MISMATCH ...` lines of a console log.
pub fn mismatch_lines(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| l.starts_with("blkcheck: MISMATCH"))
        .collect()
}

/// blkcheck's counters block (guest-physical [`COUNTERS_ADDR`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkcheckCounters {
    /// Completed requests.
    pub requests: u64,
    /// Passes completed (= the last generation written, verified and flushed).
    pub passes: u64,
    /// Mismatched sectors.
    pub mismatches: u64,
    /// Requests that completed with a status other than OK.
    pub errors: u64,
    /// LAPIC timer ticks.
    pub ticks: u64,
    /// Generation in flight.
    pub generation: u64,
    /// Region size in sectors.
    pub region: u64,
    /// Disk capacity in sectors.
    pub capacity: u64,
    /// 0 starting, 1 running, 2 no device, 3 failed.
    pub state: u64,
    /// Queue (MSI-X) interrupts taken.
    pub irqs: u64,
}

impl BlkcheckCounters {
    /// Reads the block from a dump that starts at [`COUNTERS_ADDR`]; `None` if the dump is
    /// short or the magic is missing (the guest did not get that far).
    pub fn parse(dump: &[u8]) -> Option<Self> {
        let q = |i: usize| {
            dump.get(i * 8..i * 8 + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
        };
        (q(0)? == PATTERN_MAGIC).then_some(())?;
        Some(Self {
            requests: q(1)?,
            passes: q(2)?,
            mismatches: q(3)?,
            errors: q(4)?,
            ticks: q(5)?,
            generation: q(6)?,
            region: q(7)?,
            capacity: q(8)?,
            state: q(9)?,
            irqs: q(10)?,
        })
    }
}

/// Assembles the bzImage flavour of blkcheck (`blkcheck.S` with `--defsym BZIMAGE=1`, linked
/// by `blkcheck-bz.ld`) into `out_dir/blkcheck.bzImage` with GNU binutils, as vmm/build.rs
/// and scripts/blkcheck-qemu.sh do, and returns its path.
pub fn build_blkcheck_bzimage(out_dir: &Path) -> Result<PathBuf, String> {
    build_guest_bzimage("blkcheck", out_dir)
}

/// Assembles the bzImage flavour of the driver guest `name` (`vmm/guests/NAME.S` with
/// `--defsym BZIMAGE=1`, linked by `blkcheck-bz.ld`, which serves every driver guest) into
/// `out_dir/NAME.bzImage`, and returns its path.
pub fn build_guest_bzimage(name: &str, out_dir: &Path) -> Result<PathBuf, String> {
    let guests = workspace_root().join("vmm").join("guests");
    std::fs::create_dir_all(out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let obj = out_dir.join(format!("{name}-bz.o"));
    let elf = out_dir.join(format!("{name}-bz.elf"));
    let image = out_dir.join(format!("{name}.bzImage"));
    let p = |path: &Path| path.display().to_string();
    let steps: [(&str, Vec<String>); 3] = [
        (
            "as",
            vec![
                "--64".into(),
                "--defsym".into(),
                "BZIMAGE=1".into(),
                "-I".into(),
                p(&guests),
                "-o".into(),
                p(&obj),
                p(&guests.join(format!("{name}.S"))),
            ],
        ),
        (
            "ld",
            [
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "-static",
                "--build-id=none",
                "-T",
            ]
            .map(String::from)
            .into_iter()
            .chain([
                p(&guests.join("blkcheck-bz.ld")),
                "-o".into(),
                p(&elf),
                p(&obj),
            ])
            .collect(),
        ),
        (
            "objcopy",
            vec!["-O".into(), "binary".into(), p(&elf), p(&image)],
        ),
    ];
    for (tool, args) in steps {
        let out = Command::new(tool)
            .args(&args)
            .output()
            .map_err(|e| format!("cannot run {tool} (GNU binutils): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(image)
}

/// QEMU's arguments to boot the blkcheck bzImage `kernel` with kernel command line `append` on
/// the raw image `disk` behind a modern-only `-device virtio-blk-pci`: `drive_opts` and
/// `device_opts` are appended to the `-drive` and `-device` options. The guest exits through
/// isa-debug-exit (QEMU's status is then `(code << 1) | 1`). `accels` are tried in order.
pub fn qemu_blkcheck_args(
    accels: &[&str],
    kernel: &Path,
    append: &str,
    disk: &Path,
    [drive_opts, device_opts]: [&str; 2],
) -> Vec<String> {
    let mut args: Vec<String> = accels
        .iter()
        .flat_map(|a| ["-accel".to_string(), a.to_string()])
        .collect();
    args.extend(
        [
            "-m",
            "64M",
            "-nographic",
            "-no-reboot",
            "-monitor",
            "none",
            "-kernel",
            &kernel.display().to_string(),
            "-append",
            append,
            "-drive",
            &format!(
                "file={},format=raw,if=none,id=d0{drive_opts}",
                disk.display()
            ),
            "-device",
            &format!("virtio-blk-pci,drive=d0,disable-legacy=on{device_opts}"),
            "-device",
            "isa-debug-exit,iobase=0x501,iosize=1",
        ]
        .map(String::from),
    );
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image whose sectors hold generation `gen_of(sector)`.
    fn image(sectors: u64, gen_of: impl Fn(u64) -> u64) -> Vec<u8> {
        (0..sectors)
            .flat_map(|s| sector_pattern(s, gen_of(s)))
            .collect()
    }

    const SECTORS: u64 = 256;

    #[test]
    fn pattern_decodes_to_its_generation() {
        let bytes = sector_pattern(1234, 7);
        assert_eq!(&bytes[..8], b"BLKCHECK");
        assert_eq!(decode_sector(1234, &bytes), SectorContent::Generation(7));
        // The same bytes at another sector are misplaced data.
        assert!(matches!(
            decode_sector(1235, &bytes),
            SectorContent::Corrupt {
                claims: (1234, 7),
                word: 1
            }
        ));
        assert_eq!(decode_sector(0, &[0u8; 512]), SectorContent::Unwritten);
    }

    #[test]
    fn constants_match_the_guest_source() {
        let source =
            std::fs::read_to_string(workspace_root().join("vmm/guests/blkcheck.S")).unwrap();
        for (name, value) in [
            ("PAT_MAGIC", PATTERN_MAGIC),
            ("PAT_K1", PATTERN_K1),
            ("PAT_K2", PATTERN_K2),
            ("PAT_K3", PATTERN_K3),
            ("BK_COUNTERS", COUNTERS_ADDR),
            ("REGION_LIMIT", REGION_LIMIT_SECTORS),
            ("EXIT_NO_DEVICE", u64::from(EXIT_NO_DEVICE)),
            ("EXIT_DEVICE_ERROR", u64::from(EXIT_DEVICE_ERROR)),
            ("EXIT_DATA_ERROR", u64::from(EXIT_DATA_ERROR)),
        ] {
            let line = source
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(&format!("{name},")))
                .unwrap_or_else(|| panic!("{name} is not defined in blkcheck.S"));
            let text = line.split_whitespace().nth(2).unwrap();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
                None => text.parse().unwrap(),
            };
            assert_eq!(parsed, value, "{name}");
        }
    }

    #[test]
    fn region_is_whole_requests_up_to_16_mib() {
        assert_eq!(region_sectors(4 << 20), 8192);
        assert_eq!(region_sectors(1 << 30), REGION_LIMIT_SECTORS);
        assert_eq!(region_sectors(4096 + 511), 8);
        assert_eq!(region_sectors(4095), 0);
    }

    #[test]
    fn a_completed_generation_passes() {
        let img = image(SECTORS, |_| 5);
        let s = check_image_bytes(&img, 5).unwrap();
        assert_eq!((s.region, s.last, s.next), (SECTORS, SECTORS, 0));
        // Seen as "4 completed, 5 in flight and all written", it passes too.
        assert_eq!(check_image_bytes(&img, 4).unwrap().next, SECTORS);
    }

    #[test]
    fn a_pass_in_flight_passes() {
        let img = image(SECTORS, |s| if s < 100 { 6 } else { 5 });
        let s = check_image_bytes(&img, 5).unwrap();
        assert_eq!((s.last, s.next), (156, 100));
    }

    #[test]
    fn a_fresh_image_with_a_first_pass_in_flight_passes() {
        let mut img = image(SECTORS, |_| 1);
        img[64 * 512..].fill(0);
        assert_eq!(check_image_bytes(&img, 0).unwrap().next, 64);
        // But unwritten sectors after a completed pass are lost writes.
        assert!(check_image_bytes(&img, 1).is_err());
    }

    #[test]
    fn stale_sectors_fail() {
        let img = image(SECTORS, |s| if s == 77 { 4 } else { 5 });
        let err = check_image_bytes(&img, 5).unwrap_err();
        match &err {
            BlkcheckError::BadSectors { count, first, .. } => {
                assert_eq!(*count, 1);
                assert_eq!(first[0], (77, SectorContent::Generation(4)));
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(err.to_string().contains("1 of 256 sectors"), "{err}");
        // Two generations ahead is not a write in flight either.
        let img = image(SECTORS, |s| if s == 3 { 7 } else { 5 });
        assert!(check_image_bytes(&img, 5).is_err());
    }

    #[test]
    fn a_flipped_bit_fails() {
        let mut img = image(SECTORS, |_| 3);
        img[200 * 512 + 300] ^= 0x10;
        match check_image_bytes(&img, 3).unwrap_err() {
            BlkcheckError::BadSectors { count, first, .. } => {
                assert_eq!(count, 1);
                assert_eq!(
                    first[0],
                    (
                        200,
                        SectorContent::Corrupt {
                            claims: (200, 3),
                            word: 300 / 8
                        }
                    )
                );
            }
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn misplaced_and_torn_sectors_fail() {
        let mut img = image(SECTORS, |_| 9);
        img.copy_within(10 * 512..11 * 512, 11 * 512); // sector 10's data written to 11
        let torn = sector_pattern(40, 10); // half of the next generation, half of this one
        img[40 * 512..40 * 512 + 256].copy_from_slice(&torn[..256]);
        match check_image_bytes(&img, 9).unwrap_err() {
            BlkcheckError::BadSectors { count, first, .. } => {
                assert_eq!(count, 2);
                assert_eq!(first[0].0, 11);
                assert_eq!(first[1].0, 40);
            }
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn zeroed_or_tiny_images_fail() {
        let img = vec![0u8; 8192];
        assert!(check_image_bytes(&img, 2).is_err());
        assert!(matches!(
            check_image_bytes(&[0u8; 1024], 0),
            Err(BlkcheckError::TooSmall(1024))
        ));
    }

    #[test]
    fn check_image_reads_only_the_region_of_a_file() {
        let dir = crate::TempDir::new("blkcheck-image").unwrap();
        let path = dir.join("disk.img");
        let mut img = image(SECTORS, |_| 2);
        img.extend_from_slice(&[0xaa; 100]); // a partial sector after the region
        std::fs::write(&path, &img).unwrap();
        assert_eq!(check_image(&path, 2).unwrap().last, SECTORS);
        img[5] ^= 1;
        std::fs::write(&path, &img).unwrap();
        assert!(check_image(&path, 2).is_err());
        let missing = check_image(&dir.join("nope.img"), 2).unwrap_err();
        assert!(missing.to_string().contains("nope.img"), "{missing}");
    }

    #[test]
    fn console_lines_parse() {
        let text = "blkcheck: capacity 8192 sectors ...\n\
                    blkcheck: pass 1 done requests 2049 total 2049 errors 0 mismatches 0 ticks 93 irqs 118\n\
                    blkcheck: MISMATCH sector 8 expected gen 2 found sector 8 gen 1\n\
                    blkcheck: pass 2 done requests 2049 total 4098 errors 0 mismatches 1 ticks 54 irqs 195\n\
                    blkcheck: pass 3 done requ";
        let passes = parse_pass_lines(text);
        assert_eq!(passes.len(), 2);
        assert_eq!(
            passes[1],
            PassLine {
                generation: 2,
                requests: 2049,
                total: 4098,
                errors: 0,
                mismatches: 1,
                ticks: 54,
                irqs: 195
            }
        );
        assert_eq!(mismatch_lines(text).len(), 1);
    }

    #[test]
    fn counters_parse() {
        let mut dump = vec![0u8; COUNTERS_SIZE];
        dump[..8].copy_from_slice(&PATTERN_MAGIC.to_le_bytes());
        dump[16..24].copy_from_slice(&3u64.to_le_bytes());
        dump[80..88].copy_from_slice(&9u64.to_le_bytes());
        let c = BlkcheckCounters::parse(&dump).unwrap();
        assert_eq!((c.passes, c.irqs), (3, 9));
        assert_eq!(BlkcheckCounters::parse(&dump[..40]), None);
        dump[0] = 0;
        assert_eq!(BlkcheckCounters::parse(&dump), None);
    }
}
