//! The target: resolve it once, open it, and check it is a VMM that reads what it is handed.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cpr_common::compat::{self, Compat, CompatError};
use cpr_common::container::{ContainerError, peek_version};
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

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no target given")]
    NoTarget,
    #[error("target {name} was not found in PATH")]
    NotInPath { name: String },
    #[error("target {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("target {} is not a regular file", path.display())]
    NotRegularFile { path: PathBuf },
    #[error("target {} is not executable", path.display())]
    NotExecutable { path: PathBuf },
    #[error("hashing {}: {source}", path.display())]
    Hash {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("target {} has sha256 {actual}, expected {expected}", path.display())]
    Sha256Mismatch {
        path: PathBuf,
        actual: String,
        expected: String,
    },
    #[error("target {} cannot take a live update: {source}", path.display())]
    NoCompatNote {
        path: PathBuf,
        #[source]
        source: CompatError,
    },
    #[error("state file {path}: {source}")]
    StateFileOpen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    StateFileVersion {
        path: String,
        #[source]
        source: ContainerError,
    },
    #[error(
        "target {} (version {}) reads state-file formats {}..={}, but {state_file} is format {found}",
        path.display(), compat.version, compat.state_versions.0, compat.state_versions.1
    )]
    StateFormat {
        path: PathBuf,
        compat: Compat,
        state_file: String,
        found: u32,
    },
    #[error(
        "target {} (version {}) reads CPR-state formats {}..={}, but this update's is format {found}",
        path.display(), compat.version, compat.cpr_versions.0, compat.cpr_versions.1
    )]
    CprFormat {
        path: PathBuf,
        compat: Compat,
        found: u32,
    },
}

pub fn check(
    argv: &[String],
    expected_sha256: Option<&str>,
    state_file: &str,
    cpr_version: u32,
) -> Result<Checked, TargetError> {
    let requested = argv.first().ok_or(TargetError::NoTarget)?;
    let path = find_program(requested)?;
    let resolved = std::fs::canonicalize(&path).map_err(|source| TargetError::Open {
        path: path.clone(),
        source,
    })?;
    let open_err = |source| TargetError::Open {
        path: resolved.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&resolved)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(TargetError::NotRegularFile { path: resolved });
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(TargetError::NotExecutable { path: resolved });
    }
    let sha256 = match expected_sha256 {
        Some(expected) => {
            let actual = sha256_of(&file).map_err(|source| TargetError::Hash {
                path: resolved.clone(),
                source,
            })?;
            if actual != expected {
                return Err(TargetError::Sha256Mismatch {
                    path: resolved,
                    actual,
                    expected: expected.to_string(),
                });
            }
            Some(actual)
        }
        None => None,
    };
    let compat = compat::read_note(&file).map_err(|source| TargetError::NoCompatNote {
        path: resolved.clone(),
        source,
    })?;
    let state = File::open(state_file).map_err(|source| TargetError::StateFileOpen {
        path: state_file.to_string(),
        source,
    })?;
    let state_version = peek_version(&state, &STATE_FILE_FORMAT).map_err(|source| {
        TargetError::StateFileVersion {
            path: state_file.to_string(),
            source,
        }
    })?;
    if !compat.reads_state(state_version) {
        return Err(TargetError::StateFormat {
            path: resolved,
            compat,
            state_file: state_file.to_string(),
            found: state_version,
        });
    }
    if !compat.reads_cpr(cpr_version) {
        return Err(TargetError::CprFormat {
            path: resolved,
            compat,
            found: cpr_version,
        });
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
fn find_program(name: &str) -> Result<PathBuf, TargetError> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable_file(p))
        .ok_or_else(|| TargetError::NotInPath {
            name: name.to_string(),
        })
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
            .unwrap()
            .to_string();
        assert!(err.contains("cannot take a live update"), "{err}");
        let err = check(&["/nonexistent/vmm".into()], None, "/x", 1)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/vmm"), "{err}");
        let err = check(&["/etc".into()], None, "/x", 1)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn sha256_mismatch_is_refused() {
        let err = check(&["/bin/sh".into()], Some(&"0".repeat(64)), "/x", 1)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("expected 000"), "{err}");
    }
}
