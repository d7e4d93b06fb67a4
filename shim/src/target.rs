//! The target: resolve it once, open it, and check it is a VMM that reads what it is handed.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cpr_common::compat::{self, Compat};
use cpr_common::container::peek_version;
use cpr_common::state_file::STATE_FILE_FORMAT;
use sha2::{Digest, Sha256};

/// A target that passed every check, opened: it is executed through this very file.
pub struct Checked {
    pub file: File,
    /// The target's real path (symlinks such as a staged layout's `current` resolved).
    pub resolved: PathBuf,
    /// argv for the target: as given, starting with the name it was asked for.
    pub argv: Vec<String>,
    pub compat: Compat,
    pub sha256: Option<String>,
}

pub fn check(
    argv: &[String],
    expected_sha256: Option<&str>,
    state_file: &str,
    cpr_version: u32,
) -> Result<Checked, String> {
    let requested = argv.first().ok_or("no target given")?;
    let path = find_program(requested)?;
    let resolved =
        std::fs::canonicalize(&path).map_err(|e| format!("target {}: {e}", path.display()))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&resolved)
        .map_err(|e| format!("target {}: {e}", resolved.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("target {}: {e}", resolved.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "target {} is not a regular file",
            resolved.display()
        ));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("target {} is not executable", resolved.display()));
    }
    let sha256 = match expected_sha256 {
        Some(expected) => {
            let actual =
                sha256_of(&file).map_err(|e| format!("hashing {}: {e}", resolved.display()))?;
            if actual != expected {
                return Err(format!(
                    "target {} has sha256 {actual}, expected {expected}",
                    resolved.display()
                ));
            }
            Some(actual)
        }
        None => None,
    };
    let compat = compat::read_note(&file).map_err(|e| {
        format!(
            "target {} cannot take a live update: {e}",
            resolved.display()
        )
    })?;
    let state = File::open(state_file).map_err(|e| format!("state file {state_file}: {e}"))?;
    let state_version =
        peek_version(&state, &STATE_FILE_FORMAT).map_err(|e| format!("{state_file}: {e}"))?;
    if !compat.reads_state(state_version) {
        return Err(format!(
            "target {} (version {}) reads state-file formats {}..={}, but {state_file} is format {state_version}",
            resolved.display(),
            compat.version,
            compat.state_versions.0,
            compat.state_versions.1
        ));
    }
    if !compat.reads_cpr(cpr_version) {
        return Err(format!(
            "target {} (version {}) reads CPR-state formats {}..={}, but this update's is format {cpr_version}",
            resolved.display(),
            compat.version,
            compat.cpr_versions.0,
            compat.cpr_versions.1
        ));
    }
    Ok(Checked {
        file,
        resolved,
        argv: argv.to_vec(),
        compat,
        sha256,
    })
}

/// `name` itself if it contains a '/', else the first executable `name` in PATH.
fn find_program(name: &str) -> Result<PathBuf, String> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable_file(p))
        .ok_or_else(|| format!("target {name} was not found in PATH"))
}

fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn sha256_of(file: &File) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut reader = file;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_without_the_note_is_refused_with_its_path() {
        let err = check(&["sh".into()], None, "/nonexistent", 1)
            .err()
            .unwrap();
        assert!(err.contains("cannot take a live update"), "{err}");
        let err = check(&["/nonexistent/vmm".into()], None, "/x", 1)
            .err()
            .unwrap();
        assert!(err.contains("/nonexistent/vmm"), "{err}");
        let err = check(&["/etc".into()], None, "/x", 1).err().unwrap();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn sha256_mismatch_is_refused() {
        let err = check(&["/bin/sh".into()], Some(&"0".repeat(64)), "/x", 1)
            .err()
            .unwrap();
        assert!(err.contains("expected 000"), "{err}");
    }
}
