//! Checking memory dumps of the `memcheck` guest.
//!
//! The memcheck guest sweeps over guest RAM incrementing the first byte of
//! every 4 KiB page in `[1 MiB, min(RAM, 100 MiB))`, in address order. A dump
//! taken while the guest is stopped is therefore either constant, or has a
//! prefix one higher than the rest (the sweep stopped in the middle). Any
//! other shape means memory was lost, duplicated or torn — exactly what a
//! CPR live update must never do.

use std::path::Path;

use crate::qmp::{QmpClient, QmpError};

/// Guest-physical address where the swept range (and every dump) starts.
pub const MEMCHECK_BASE: u64 = 1 << 20;
/// The sweep never goes beyond this guest-physical address.
pub const MEMCHECK_LIMIT: u64 = 100 << 20;
/// The guest touches the first byte of each page of this size.
pub const PAGE_SIZE: usize = 4096;

/// Size of the dump to take for a VM with `ram_bytes` of RAM.
pub fn memcheck_dump_size(ram_bytes: u64) -> u64 {
    ram_bytes.min(MEMCHECK_LIMIT).saturating_sub(MEMCHECK_BASE)
}

/// The sampled bytes: offset 0 of every page of the dump.
pub fn memcheck_samples(dump: &[u8]) -> Vec<u8> {
    dump.iter().step_by(PAGE_SIZE).copied().collect()
}

/// Guest-physical address of page `index` of a dump.
fn page_address(index: usize) -> u64 {
    MEMCHECK_BASE + (index * PAGE_SIZE) as u64
}

/// Checks a dump that starts at guest-physical [`MEMCHECK_BASE`].
///
/// Consistent means: all samples are equal, except that the value may drop by
/// exactly 1 (mod 256) at one single place. The error names the offending
/// page, its address and the values around it.
pub fn check_memcheck_dump(dump: &[u8]) -> Result<(), String> {
    check_in_sweep_order(&memcheck_samples(dump), page_address)
}

/// The rule of [`check_memcheck_dump`] for `samples` taken in sweep order, sample `i` from
/// guest-physical `address(i)`.
fn check_in_sweep_order(samples: &[u8], address: impl Fn(usize) -> u64) -> Result<(), String> {
    let page_address = address;
    if samples.is_empty() {
        return Err("memcheck dump is empty".into());
    }
    let mut first_drop: Option<usize> = None;
    for (index, pair) in samples.windows(2).enumerate() {
        let page = index + 1;
        let (before, after) = (pair[0], pair[1]);
        if after == before {
            continue;
        }
        let describe = |problem: String| {
            format!(
                "memcheck dump inconsistent at page {page} (guest-physical {:#x}): value {after:#04x} \
                 after {before:#04x} at page {index}: {problem}; first value {:#04x}, {} pages sampled",
                page_address(page),
                samples[0],
                samples.len(),
            )
        };
        if after != before.wrapping_sub(1) {
            let delta = after.wrapping_sub(before);
            let problem = if delta < 128 {
                format!("an increase by {delta}")
            } else {
                format!("a drop by {}", before.wrapping_sub(after))
            };
            return Err(describe(problem));
        }
        if let Some(earlier) = first_drop {
            return Err(describe(format!(
                "a second drop (the first was at page {earlier}, guest-physical {:#x})",
                page_address(earlier)
            )));
        }
        first_drop = Some(page);
    }
    Ok(())
}

/// Dumps the memcheck range of a VM with `ram_bytes` of RAM to `path` (an
/// absolute path the VMM can write) and returns the bytes.
///
/// Stop the guest (QMP `stop`) first, or the dump is torn by the running
/// sweep and may legitimately fail [`check_memcheck_dump`].
pub fn dump_memcheck_range(
    qmp: &mut QmpClient,
    ram_bytes: u64,
    path: &Path,
) -> Result<Vec<u8>, QmpError> {
    qmp.pmemsave(MEMCHECK_BASE, memcheck_dump_size(ram_bytes), path)
}

/// `memcheck,sweep=sampled` touches one page every this many bytes (the VMM's
/// `boot::MEMCHECK_SAMPLE_STRIDE`).
pub const SAMPLE_STRIDE: u64 = 16 << 20;
/// RAM above `LOW_RAM_LIMIT` goes to a second region from here (the VMM's memory layout).
pub const HIGH_RAM_START: u64 = 4 << 30;
/// The first region holds at most this much RAM.
pub const LOW_RAM_LIMIT: u64 = 3 << 30;

/// Guest-physical addresses the sampled sweep touches, in sweep order, for a VM with
/// `ram_bytes` of RAM: every [`SAMPLE_STRIDE`] from [`MEMCHECK_BASE`] below the low region's
/// end, then every stride from [`HIGH_RAM_START`] below the end of the high region.
pub fn sampled_addresses(ram_bytes: u64) -> Vec<u64> {
    let low_end = ram_bytes.min(LOW_RAM_LIMIT);
    let high_end = HIGH_RAM_START + ram_bytes.saturating_sub(LOW_RAM_LIMIT);
    let low = (MEMCHECK_BASE..low_end).step_by(SAMPLE_STRIDE as usize);
    let high = (HIGH_RAM_START..high_end).step_by(SAMPLE_STRIDE as usize);
    low.chain(high).collect()
}

/// The sampled bytes of a stopped `memcheck,sweep=sampled` guest with `ram_bytes` of RAM, in
/// sweep order, read from the RAM memfds that process `pid` holds (`guest-ram-low` from
/// guest-physical 0, `guest-ram-high` from [`HIGH_RAM_START`]) through `/proc/PID/fd`.
pub fn read_sampled_bytes(pid: u32, ram_bytes: u64) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let fds = crate::procfs::list_fds(pid).map_err(|e| format!("fds of {pid}: {e}"))?;
    let open = |name: &str| -> Result<std::fs::File, String> {
        let target = format!("/memfd:{name} (deleted)");
        let fd = fds
            .iter()
            .find(|fd| fd.target == target)
            .ok_or_else(|| format!("process {pid} holds no memfd {name}: {fds:?}"))?;
        let path = format!("/proc/{pid}/fd/{}", fd.fd);
        std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))
    };
    let low = open("guest-ram-low")?;
    let high = if ram_bytes > LOW_RAM_LIMIT {
        Some(open("guest-ram-high")?)
    } else {
        None
    };
    let mut samples = Vec::new();
    for address in sampled_addresses(ram_bytes) {
        let (file, offset) = match &high {
            Some(high) if address >= HIGH_RAM_START => (high, address - HIGH_RAM_START),
            _ => (&low, address),
        };
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, offset)
            .map_err(|e| format!("reading guest-physical {address:#x}: {e}"))?;
        samples.push(byte[0]);
    }
    Ok(samples)
}

/// Checks the sampled bytes of [`read_sampled_bytes`] by the rule of [`check_memcheck_dump`],
/// and that the sweep reached RAM above 4 GiB (the last sample is not 0) when there is some.
pub fn check_sampled_bytes(samples: &[u8], ram_bytes: u64) -> Result<(), String> {
    let addresses = sampled_addresses(ram_bytes);
    if samples.len() != addresses.len() {
        return Err(format!(
            "{} samples for {} sampled addresses",
            samples.len(),
            addresses.len()
        ));
    }
    check_in_sweep_order(samples, |i| addresses[i])?;
    if samples.last() == Some(&0) {
        return Err(format!(
            "the last sampled page (guest-physical {:#x}) was never incremented",
            addresses[addresses.len() - 1]
        ));
    }
    Ok(())
}

/// Stops a `memcheck,sweep=sampled` guest (QMP `stop`) served by process `pid`, reads its
/// sampled bytes from RAM and checks them ([`check_sampled_bytes`]). Returns the bytes.
pub fn stop_and_check_sampled(
    qmp: &mut QmpClient,
    pid: u32,
    ram_bytes: u64,
) -> Result<Vec<u8>, String> {
    qmp.execute("stop", serde_json::Value::Null)
        .map_err(|e| format!("stop: {e}"))?;
    let samples = read_sampled_bytes(pid, ram_bytes)?;
    check_sampled_bytes(&samples, ram_bytes)?;
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_qmp::serve;
    use crate::tempdir::TempDir;
    use serde_json::json;
    use std::time::Duration;

    /// A dump whose pages start with `samples`; the rest of each page is
    /// noise that the checker must ignore.
    fn dump_from(samples: &[u8]) -> Vec<u8> {
        let mut dump = vec![0xA5; samples.len() * PAGE_SIZE];
        for (page, &value) in samples.iter().enumerate() {
            dump[page * PAGE_SIZE] = value;
        }
        dump
    }

    #[test]
    fn sampled_addresses_cover_both_regions() {
        let small = sampled_addresses(64 << 20);
        assert_eq!(small, [1 << 20, 17 << 20, 33 << 20, 49 << 20]);
        let big = sampled_addresses(5 << 30);
        assert_eq!(big.len(), 192 + 128);
        assert_eq!(big[191], (1 << 20) + 191 * SAMPLE_STRIDE);
        assert_eq!(big[192], HIGH_RAM_START);
        assert_eq!(*big.last().unwrap(), (6 << 30) - SAMPLE_STRIDE);
        let mut samples = vec![3u8; big.len()];
        assert_eq!(check_sampled_bytes(&samples, 5 << 30), Ok(()));
        samples[250] = 4;
        let error = check_sampled_bytes(&samples, 5 << 30).unwrap_err();
        assert!(error.contains("0x13a000000"), "{error}");
        let zeros = vec![0u8; big.len()];
        assert!(check_sampled_bytes(&zeros, 5 << 30).is_err());
    }

    #[test]
    fn constant_dumps_are_consistent() {
        assert_eq!(check_memcheck_dump(&dump_from(&[7; 100])), Ok(()));
        assert_eq!(check_memcheck_dump(&dump_from(&[0])), Ok(()));
    }

    #[test]
    fn a_single_drop_by_one_is_consistent() {
        assert_eq!(check_memcheck_dump(&dump_from(&[8, 8, 8, 7, 7])), Ok(()));
        assert_eq!(check_memcheck_dump(&dump_from(&[8, 7])), Ok(()));
    }

    #[test]
    fn a_drop_across_the_wrap_is_consistent() {
        assert_eq!(
            check_memcheck_dump(&dump_from(&[0x00, 0x00, 0xFF, 0xFF])),
            Ok(())
        );
    }

    #[test]
    fn two_drops_are_reported_with_both_pages() {
        let error = check_memcheck_dump(&dump_from(&[9, 9, 8, 8, 7])).unwrap_err();
        assert!(
            error.contains("page 4 (guest-physical 0x104000)"),
            "{error}"
        );
        assert!(error.contains("second drop"), "{error}");
        assert!(error.contains("page 2"), "{error}");
    }

    #[test]
    fn a_drop_by_two_is_reported() {
        let error = check_memcheck_dump(&dump_from(&[9, 9, 7])).unwrap_err();
        assert!(error.contains("page 2"), "{error}");
        assert!(error.contains("drop by 2"), "{error}");
        assert!(error.contains("0x07 after 0x09"), "{error}");
    }

    #[test]
    fn an_increase_is_reported() {
        let error = check_memcheck_dump(&dump_from(&[5, 5, 5, 6])).unwrap_err();
        assert!(error.contains("page 3"), "{error}");
        assert!(error.contains("increase by 1"), "{error}");
        // Wrapping upwards (0xFF -> 0x00) is an increase too.
        let error = check_memcheck_dump(&dump_from(&[0xFF, 0x00])).unwrap_err();
        assert!(error.contains("increase by 1"), "{error}");
    }

    #[test]
    fn only_offset_zero_of_each_page_is_sampled() {
        let mut dump = dump_from(&[3, 3, 2]);
        dump[1] = 0;
        dump[PAGE_SIZE + 17] = 200;
        assert_eq!(check_memcheck_dump(&dump), Ok(()));
        // A trailing partial page still has its offset 0 sampled.
        dump.extend_from_slice(&[9, 9]);
        assert!(check_memcheck_dump(&dump).is_err());
    }

    #[test]
    fn an_empty_dump_is_an_error() {
        assert!(check_memcheck_dump(&[]).is_err());
    }

    #[test]
    fn the_dump_covers_1mib_to_min_ram_100mib() {
        assert_eq!(memcheck_dump_size(64 << 20), 63 << 20);
        assert_eq!(memcheck_dump_size(4 << 30), 99 << 20);
        assert_eq!(memcheck_dump_size(512 << 10), 0);
    }

    #[test]
    fn dump_memcheck_range_uses_pmemsave_and_reads_the_file() {
        let dir = TempDir::new("memchk").unwrap();
        let socket = dir.join("qmp.sock");
        let server = serve(&socket, Duration::ZERO, |mut conn| {
            conn.greet_and_negotiate();
            let request = conn.recv();
            assert_eq!(request["execute"], "pmemsave");
            let args = &request["arguments"];
            assert_eq!(args["val"], json!(1 << 20));
            assert_eq!(args["size"], json!(3 << 20));
            let size = args["size"].as_u64().unwrap() as usize;
            let dump = dump_from(&vec![4; size / PAGE_SIZE]);
            std::fs::write(args["filename"].as_str().unwrap(), dump).unwrap();
            conn.reply(&request, json!({}));
        });
        let mut qmp = QmpClient::connect_and_negotiate(&socket, Duration::from_secs(5)).unwrap();
        let dump = dump_memcheck_range(&mut qmp, 4 << 20, &dir.join("dump")).unwrap();
        assert_eq!(dump.len(), 3 << 20);
        assert_eq!(check_memcheck_dump(&dump), Ok(()));
        server.join().unwrap();
    }
}
