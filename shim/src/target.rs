//! The target: resolve it once, open it, and check it is a VMM that reads what it is handed.

use std::fs::File;
use std::path::PathBuf;

use cpr_common::compat::{self, Compat, CompatError};
use cpr_common::container::{ContainerError, peek_version};
use cpr_common::state_file::STATE_FILE_FORMAT;
use cpr_common::target::{
    CHECKED_TARGET_ENV, CheckedTarget, OpenTarget, TargetError as OpenError, open_target,
};

/// A target that passed every check, opened: it is executed through this very file.
pub struct Checked {
    pub file: File,
    /// The target's real path (symlinks such as a staged layout's `current` resolved).
    pub resolved: PathBuf,
    /// argv for the target: as given, starting with the name it was asked for.
    pub argv: Vec<String>,
    pub compat: Compat,
    /// The verified SHA-256 and who computed it (None without `--sha256`).
    pub sha256: Option<(String, HashedBy)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Open(#[from] OpenError),
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

/// How the target's SHA-256 was established.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashedBy {
    /// The old VMM hashed it before the guest stopped; the shim verified it unchanged since.
    OldVmm,
    /// The shim hashed it (no record from the old VMM, or the file changed after it).
    Shim,
}

pub fn check(
    argv: &[String],
    expected_sha256: Option<&str>,
    state_file: &str,
    cpr_version: u32,
) -> Result<Checked, TargetError> {
    let requested = argv.first().ok_or(OpenError::NoTarget)?;
    let (target, sha256) = match expected_sha256 {
        Some(expected) => {
            let (target, hashed_by) = match adopt_checked(requested, expected) {
                Some(t) => (t, HashedBy::OldVmm),
                None => {
                    let t = open_target(requested)?;
                    t.verify_sha256(expected)?;
                    (t, HashedBy::Shim)
                }
            };
            (target, Some((expected.to_string(), hashed_by)))
        }
        None => (open_target(requested)?, None),
    };
    let OpenTarget { file, resolved } = target;
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

/// The target the old VMM hashed before the stop, if it handed one over for this target and
/// hash and the file has not changed since (otherwise the shim hashes it again: says why).
fn adopt_checked(requested: &str, expected: &str) -> Option<OpenTarget> {
    let value = std::env::var(CHECKED_TARGET_ENV).ok()?;
    let adopted = CheckedTarget::from_env(&value).and_then(|r| r.adopt(requested, expected));
    match adopted {
        Ok(t) => Some(t),
        Err(why) => {
            eprintln!(
                "cpr-shim: hashing the target here: the one checked before the stop is not usable ({why})"
            );
            None
        }
    }
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
