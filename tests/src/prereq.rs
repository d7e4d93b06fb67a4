//! What a test does when something it needs is not there (root, a tmpfs mount, huge pages, a
//! kernel package download): never a silent pass.
//!
//! - Under CI (`CI` set to anything but empty, `0` or `false`; CI services set `CI=true`), a
//!   missing prerequisite fails the test with a message saying what was missing: a CI run
//!   cannot go green by skipping.
//! - Elsewhere, the test returns early, and the skip is printed to stderr and appended as one
//!   line to `SKIP_FILE` under the target directory, which `scripts/test.sh` empties before the
//!   run and prints at its end (libtest swallows the output of tests that pass).

use std::io::Write;
use std::path::PathBuf;

use crate::binaries::target_dir;

/// The file (under the cargo target directory) every skipped test appends one line to.
pub const SKIP_FILE: &str = "test-skips.txt";

/// Where skips are recorded: `TARGET/test-skips.txt`.
pub fn skip_file() -> PathBuf {
    target_dir().join(SKIP_FILE)
}

/// Whether this run is a CI run (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| means_ci(&v))
}

fn means_ci(value: &str) -> bool {
    !matches!(value.trim(), "" | "0" | "false" | "FALSE" | "False")
}

/// `test` cannot run here because `why`. Under CI this panics (the test fails, saying so);
/// elsewhere it records the skip (stderr and [`skip_file`]) and returns, and the caller returns
/// from the test.
///
/// # Panics
/// Under CI, always.
pub fn prerequisite_missing(test: &str, why: &str) {
    if in_ci() {
        panic!(
            "{test}: a prerequisite is missing and CI is set, so this is a failure, not a skip: \
             {why}"
        );
    }
    let line = format!("SKIPPED {test}: {why}");
    eprintln!("{line}");
    let path = skip_file();
    let recorded = std::fs::create_dir_all(target_dir()).and_then(|()| {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        // One write per line, so concurrent tests do not interleave within a line.
        file.write_all(format!("{}\n", line.replace('\n', " | ")).as_bytes())
    });
    if let Err(e) = recorded {
        eprintln!(
            "cpr-tests: cannot record the skip in {}: {e}",
            path.display()
        );
    }
}

/// Panics unless the test runs as root: [`prerequisite_missing`] when not root.
/// Returns whether the test can go on.
pub fn require_root(test: &str, what_for: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    prerequisite_missing(test, &format!("{what_for} needs root"));
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_values() {
        assert!(means_ci("true"));
        assert!(means_ci("1"));
        assert!(!means_ci("false"));
        assert!(!means_ci(""));
        assert!(!means_ci("0"));
    }
}
