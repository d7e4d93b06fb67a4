//! 2 MiB huge pages for tests and the benchmark: reserving them for a while, and telling whether
//! a process's mapping is backed by them.

use std::path::Path;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Free 2 MiB pages reserved until this is dropped. The pool only grows, by what is missing, and
/// goes back to its previous size afterwards.
pub struct HugePageReservation {
    previous: Option<u64>,
}

impl HugePageReservation {
    /// Makes at least `mib` MiB of 2 MiB pages free (needs root). Fails, saying why, when the
    /// machine cannot.
    pub fn reserve(mib: u64) -> Result<Self, String> {
        let want_free = mib.div_ceil(2);
        let (total, free) = pool().ok_or("huge pages: /proc/meminfo shows no HugePages_ pool")?;
        if free >= want_free {
            return Ok(HugePageReservation { previous: None });
        }
        let target = total + (want_free - free);
        let reservation = HugePageReservation {
            previous: Some(total),
        };
        std::fs::write(NR_HUGEPAGES, target.to_string())
            .map_err(|e| format!("huge pages: cannot set {NR_HUGEPAGES} to {target}: {e}"))?;
        let (_, free) = pool().unwrap_or((0, 0));
        if free < want_free {
            return Err(format!(
                "huge pages: the machine could make only {free} of {want_free} 2 MiB pages free"
            ));
        }
        Ok(reservation)
    }
}

impl Drop for HugePageReservation {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            let _ = std::fs::write(NR_HUGEPAGES, previous.to_string());
        }
    }
}

/// (HugePages_Total, HugePages_Free) from /proc/meminfo.
fn pool() -> Option<(u64, u64)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().parse::<u64>().ok())
    };
    Some((field("HugePages_Total:")?, field("HugePages_Free:")?))
}

/// The kernel page size (KiB) of `pid`'s first mapping whose path contains `name`, from
/// /proc/PID/smaps: 2048 for a hugetlb mapping, 4 for normal memory.
pub fn mapping_page_size_kib(pid: u32, name: &str) -> Option<u64> {
    mapping_field_kib(pid, name, "KernelPageSize:")
}

/// How much of `pid`'s first mapping whose path contains `name` is resident (KiB, `Rss:` in
/// /proc/PID/smaps): the pages that process has faulted in.
pub fn mapping_rss_kib(pid: u32, name: &str) -> Option<u64> {
    mapping_field_kib(pid, name, "Rss:")
}

/// The `field` (e.g. `Rss:`, a value in kB) of `pid`'s first mapping whose path contains `name`.
fn mapping_field_kib(pid: u32, name: &str, field: &str) -> Option<u64> {
    let smaps =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("smaps")).ok()?;
    let mut in_mapping = false;
    for line in smaps.lines() {
        // A mapping's header line starts with its address range; its fields follow.
        let is_header = line
            .split_whitespace()
            .next()
            .is_some_and(|range| range.contains('-') && !range.ends_with(':'));
        if is_header {
            in_mapping = line.contains(name);
        } else if in_mapping && let Some(rest) = line.strip_prefix(field) {
            return rest.trim().trim_end_matches("kB").trim().parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_stack_has_normal_pages() {
        assert_eq!(
            mapping_page_size_kib(std::process::id(), "[stack]"),
            Some(4)
        );
        assert_eq!(
            mapping_page_size_kib(std::process::id(), "no such mapping"),
            None
        );
        assert!(mapping_rss_kib(std::process::id(), "[stack]").is_some_and(|kib| kib > 0));
    }
}
