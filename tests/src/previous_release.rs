//! The previous release, built from the commit named in `release/previous`, for the
//! version-skew test: operators update from the version they run, not from a second build of
//! the same source.
//!
//! The commit is extracted with `git archive` into `target/prev-release/src` and built there
//! with `CPR_VMM_BUILD_TAG=prev` (so its version, `VERSION+prev`, tells it apart in reports);
//! the binaries are kept in `target/prev-release/bin` with the commit they came from, and
//! rebuilt only when `release/previous` names another commit. A file lock makes concurrent test
//! processes build it once.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::binaries::{target_dir, workspace_root};

/// The build tag of the previous release's binaries.
pub const PREVIOUS_BUILD_TAG: &str = "prev";

/// The previous release's binaries and what it says it is.
#[derive(Clone, Debug)]
pub struct PreviousRelease {
    pub commit: String,
    /// The version `release/previous` gives; the binaries report `{version}+prev`.
    pub version: String,
    pub vmm: PathBuf,
    pub shim: PathBuf,
}

impl PreviousRelease {
    /// What the previous release's VMM reports as its version.
    pub fn reported_version(&self) -> String {
        format!("{}+{PREVIOUS_BUILD_TAG}", self.version)
    }
}

/// Reads `commit = ...` and `version = ...` from the release file.
pub fn parse_release_file(text: &str) -> Result<(String, String), String> {
    let value = |key: &str| {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
            .ok_or_else(|| format!("no `{key} = ...` line"))
    };
    let commit = value("commit")?;
    if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("commit {commit:?} is not a full 40-digit hash"));
    }
    Ok((commit, value("version")?))
}

/// Builds (or reuses) the previous release; once per test process.
///
/// # Panics
/// If the release file is unreadable, the commit is not in this repository, or the build fails;
/// the message says which.
pub fn previous_release() -> PreviousRelease {
    static OUTCOME: OnceLock<Result<PreviousRelease, String>> = OnceLock::new();
    match OUTCOME.get_or_init(build) {
        Ok(r) => r.clone(),
        Err(message) => panic!("{message}"),
    }
}

fn run(command: &mut Command, what: &str) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({})\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    ))
}

fn build() -> Result<PreviousRelease, String> {
    let root = workspace_root();
    let file = root.join("release").join("previous");
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let (commit, version) =
        parse_release_file(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let dir = target_dir().join("prev-release");
    let bin = dir.join("bin");
    let release = PreviousRelease {
        commit: commit.clone(),
        version,
        vmm: bin.join("vmm"),
        shim: bin.join("cpr-shim"),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let lock = std::fs::File::create(dir.join(".lock"))
        .and_then(|f| f.lock().map(|()| f))
        .map_err(|e| format!("locking {}: {e}", dir.display()))?;
    let stamp = bin.join("commit");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == commit)
        && release.vmm.exists()
        && release.shim.exists()
    {
        return Ok(release);
    }
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    eprintln!(
        "cpr-tests: building the previous release {commit} in {}",
        src.display()
    );
    run(
        Command::new("sh").arg("-c").arg(format!(
            "git -C '{}' archive --format=tar {commit} | tar -x -C '{}'",
            root.display(),
            src.display()
        )),
        &format!("extracting commit {commit} (is it in this repository's history?)"),
    )?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(
        Command::new(&cargo)
            .args(["build", "--release", "--bins", "--locked"])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .env("CPR_VMM_BUILD_TAG", PREVIOUS_BUILD_TAG),
        &format!("building the previous release {commit}"),
    )?;
    std::fs::create_dir_all(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    for name in ["vmm", "cpr-shim"] {
        let built = dir.join("target").join("release").join(name);
        std::fs::copy(&built, bin.join(name))
            .map_err(|e| format!("copying {}: {e}", built.display()))?;
    }
    std::fs::write(&stamp, &commit).map_err(|e| format!("{}: {e}", stamp.display()))?;
    // The sources are not needed once built; the target dir is kept for a rebuild.
    let _ = std::fs::remove_dir_all(&src);
    drop(lock);
    Ok(release)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_release_file_names_a_full_commit_and_a_version() {
        let (c, v) = parse_release_file(
            "# x\ncommit = 0123456789abcdef0123456789abcdef01234567\nversion = 0.1.0\n",
        )
        .unwrap();
        assert_eq!((c.len(), v.as_str()), (40, "0.1.0"));
        assert!(
            parse_release_file("commit = abc\nversion = 1")
                .unwrap_err()
                .contains("40-digit")
        );
        assert!(
            parse_release_file("commit = 0123456789abcdef0123456789abcdef01234567")
                .unwrap_err()
                .contains("version")
        );
        // The repository's own file parses.
        let text = std::fs::read_to_string(workspace_root().join("release/previous")).unwrap();
        parse_release_file(&text).unwrap();
    }
}
