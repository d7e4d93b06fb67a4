//! The target of a live update: resolving, opening and hashing the new VMM binary, and the
//! record that lets the old VMM do the slow part (its SHA-256) before the guest stops.
//!
//! With `cpr-shim --sha256 HEX -- NEW_VMM ...` as the cpr-exec command, the old VMM runs
//! [`CheckedTarget::check`] when `migrate` arrives, while the guest still runs: it resolves
//! NEW_VMM, opens it, hashes it and compares. A mismatch refuses the update before anything
//! stops. A match is handed to the shim as an open fd plus a [`FileStamp`] of the file at
//! hashing time, in [`CHECKED_TARGET_ENV`]. The shim adopts the fd only if the file's stamp is
//! unchanged ([`CheckedTarget::adopt`]) and then executes exactly that open file; otherwise it
//! hashes again itself. Either way the bytes executed are the bytes whose hash was checked.
//!
//! The record travels in its own environment variable rather than in the CPR state so that
//! every pairing of releases works: a shim that does not know it ignores it (and hashes), and
//! a shim that finds it missing hashes.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fds;

/// Names the environment variable (set by the old VMM for the shim only) that describes a
/// target already resolved and hashed, and the fd that holds it open.
pub const CHECKED_TARGET_ENV: &str = "VMM_CPR_CHECKED_TARGET";
/// The largest record [`CheckedTarget::from_env`] decodes: two paths and a hash, with room.
const MAX_CHECKED_TARGET_LEN: usize = 64 << 10;

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
}

/// A target binary, resolved and open (close-on-exec) for reading.
pub struct OpenTarget {
    pub file: File,
    /// The real path (symlinks such as a staged layout's `current` resolved).
    pub resolved: PathBuf,
}

/// Resolves `requested` as a shell would (PATH unless it contains a '/'), follows symlinks
/// once, and opens the result; it must be an executable regular file.
pub fn open_target(requested: &str) -> Result<OpenTarget, TargetError> {
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
    Ok(OpenTarget { file, resolved })
}

impl OpenTarget {
    /// Hashes the file and compares with `expected` (lowercase hex); returns the hash.
    pub fn verify_sha256(&self, expected: &str) -> Result<String, TargetError> {
        let actual = sha256_of(&self.file).map_err(|source| TargetError::Hash {
            path: self.resolved.clone(),
            source,
        })?;
        if actual != expected {
            return Err(TargetError::Sha256Mismatch {
                path: self.resolved.clone(),
                actual,
                expected: expected.to_string(),
            });
        }
        Ok(actual)
    }
}

/// `name` itself if it contains a '/', else the first executable `name` in PATH.
pub fn find_program(name: &str) -> Result<PathBuf, TargetError> {
    if name.is_empty() {
        return Err(TargetError::NoTarget);
    }
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

/// The SHA-256 of the whole file as lowercase hex (read from offset 0 whatever the fd's offset).
pub fn sha256_of(file: &File) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = match file.read_at(&mut buf, offset) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// What a file was when it was hashed: any write, truncation, chmod or replacement in place
/// changes the size, the modification time or the change time (which no one can set back).
///
/// Timestamps are only as fine as the kernel's clock tick on file systems without fine-grained
/// timestamps, so a write in the same tick as the last one before the hash could go unseen:
/// a file changed less than [`SETTLE_NS`] before it was hashed is not handed over as checked
/// ([`CheckedTarget::settled`]); the shim hashes it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

/// How long a target must have been left alone before its stamp is trusted.
pub const SETTLE_NS: i128 = 2_000_000_000;

impl FileStamp {
    pub fn of(file: &File) -> std::io::Result<FileStamp> {
        let m = file.metadata()?;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// A target the old VMM resolved and hashed before the stop, held open at `fd`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckedTarget {
    pub fd: RawFd,
    /// The name the cpr-exec command gives (what the shim is asked to run).
    pub requested: String,
    pub resolved: String,
    pub sha256: String,
    pub stamp: FileStamp,
}

/// Why the shim does not adopt a checked target (it then hashes the target itself).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdoptError {
    #[error("{CHECKED_TARGET_ENV} is not a valid record")]
    Malformed,
    #[error("it was checked for {checked}, the shim is asked for {asked}")]
    OtherTarget { checked: String, asked: String },
    #[error("it was checked against another sha256")]
    OtherSha256,
    #[error("its fd {0} is closed or is not a regular file")]
    BadFd(RawFd),
    #[error("{0} changed after it was hashed")]
    Changed(String),
}

impl CheckedTarget {
    /// Resolves, opens and hashes `requested`; refuses a hash other than `expected`.
    pub fn check(requested: &str, expected: &str) -> Result<(CheckedTarget, File), TargetError> {
        let target = open_target(requested)?;
        let sha256 = target.verify_sha256(expected)?;
        let stamp = FileStamp::of(&target.file).map_err(|source| TargetError::Open {
            path: target.resolved.clone(),
            source,
        })?;
        let record = CheckedTarget {
            fd: target.file.as_raw_fd(),
            requested: requested.to_string(),
            resolved: target.resolved.display().to_string(),
            sha256,
            stamp,
        };
        Ok((record, target.file))
    }

    /// Whether the file had been left alone for [`SETTLE_NS`] when it was hashed, so that its
    /// stamp reveals any later change (see [`FileStamp`]).
    pub fn settled(&self, hashed_at: std::time::SystemTime) -> bool {
        let now = hashed_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        now - self.stamp.ctime_ns.max(self.stamp.mtime_ns) >= SETTLE_NS
    }

    /// The value of [`CHECKED_TARGET_ENV`].
    pub fn to_env(&self) -> String {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map(|bytes| bytes.iter().map(|b| format!("{b:02x}")).collect())
            .unwrap_or_default()
    }

    pub fn from_env(value: &str) -> Result<CheckedTarget, AdoptError> {
        if !value.len().is_multiple_of(2) || value.len() > 2 * MAX_CHECKED_TARGET_LEN {
            return Err(AdoptError::Malformed);
        }
        let bytes: Option<Vec<u8>> = (0..value.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(value.get(i..i + 2)?, 16).ok())
            .collect();
        let bytes = bytes.ok_or(AdoptError::Malformed)?;
        // The limit bounds what a length inside the record can make the decoder allocate.
        let config = bincode::config::standard().with_limit::<MAX_CHECKED_TARGET_LEN>();
        match bincode::serde::decode_from_slice(&bytes, config) {
            Ok((record, used)) if used == bytes.len() => Ok(record),
            _ => Err(AdoptError::Malformed),
        }
    }

    /// The shim's side: takes the inherited fd if this record is for the same target and
    /// hash and the file is unchanged since it was hashed. The fd is made close-on-exec (the
    /// exec through it still works), so it never reaches the new VMM as a stray fd.
    pub fn adopt(&self, requested: &str, expected_sha256: &str) -> Result<OpenTarget, AdoptError> {
        if self.requested != requested {
            return Err(AdoptError::OtherTarget {
                checked: self.requested.clone(),
                asked: requested.to_string(),
            });
        }
        if self.sha256 != expected_sha256 {
            return Err(AdoptError::OtherSha256);
        }
        let id =
            fds::identity(self.fd, "checked-target").map_err(|_| AdoptError::BadFd(self.fd))?;
        if id.file_type != libc::S_IFREG {
            return Err(AdoptError::BadFd(self.fd));
        }
        // The number came from the environment and was checked open and a regular file above;
        // the old VMM passed it for exactly this and nothing else in this process owns it.
        // SAFETY: the fd is open (fstat succeeded) and has no other owner here.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(self.fd) });
        fds::set_cloexec(self.fd, true).map_err(|_| AdoptError::BadFd(self.fd))?;
        let now = FileStamp::of(&file).map_err(|_| AdoptError::BadFd(self.fd))?;
        if now != self.stamp {
            return Err(AdoptError::Changed(self.resolved.clone()));
        }
        Ok(OpenTarget {
            file,
            resolved: PathBuf::from(&self.resolved),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (fuzz/corpus/checked_target/crash-84f8c811…): a string length of 7e18
    /// in the record made the decoder try to allocate it and abort the process.
    #[test]
    fn from_env_refuses_a_huge_length_without_allocating_it() {
        let mut bytes = vec![0u8, 0xfd];
        bytes.extend_from_slice(&0x6061_6261_6261_6261u64.to_le_bytes());
        bytes.extend_from_slice(b"abab");
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(CheckedTarget::from_env(&hex), Err(AdoptError::Malformed));
        let too_long = "00".repeat(MAX_CHECKED_TARGET_LEN + 1);
        assert_eq!(
            CheckedTarget::from_env(&too_long),
            Err(AdoptError::Malformed)
        );
    }

    #[test]
    fn from_env_reads_what_to_env_wrote() {
        let record = CheckedTarget {
            fd: 9,
            requested: "vmm".into(),
            resolved: "/opt/vmm/vmm".into(),
            sha256: "ab".repeat(32),
            stamp: FileStamp {
                dev: 1,
                ino: 2,
                size: 3,
                mtime_ns: 4,
                ctime_ns: 5,
            },
        };
        assert_eq!(CheckedTarget::from_env(&record.to_env()), Ok(record));
    }

    fn executable(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cpr-target-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// sha256("abc"), from FIPS 180-2.
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn a_target_is_hashed_and_a_wrong_hash_refused() {
        let d = scratch("hash");
        let p = executable(&d, "vmm", b"abc");
        let name = p.display().to_string();
        let (record, _file) = CheckedTarget::check(&name, ABC).unwrap();
        assert_eq!(record.sha256, ABC);
        // Just written: not settled; the same file seen 3 s later is.
        let now = std::time::SystemTime::now();
        assert!(!record.settled(now));
        assert!(record.settled(now + std::time::Duration::from_secs(3)));
        let e = CheckedTarget::check(&name, &"0".repeat(64)).err().unwrap();
        assert!(e.to_string().contains(&format!("has sha256 {ABC}")), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = CheckedTarget::check(&name, ABC).err().unwrap();
        assert!(e.to_string().contains("not executable"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_record_survives_the_environment_and_garbage_is_refused() {
        let d = scratch("env");
        let p = executable(&d, "vmm", b"abc");
        let (record, _file) = CheckedTarget::check(&p.display().to_string(), ABC).unwrap();
        assert_eq!(CheckedTarget::from_env(&record.to_env()).unwrap(), record);
        for bad in ["", "0", "zz", &record.to_env()[2..]] {
            assert!(CheckedTarget::from_env(bad).is_err(), "{bad:?}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_shim_adopts_only_an_unchanged_file_for_the_same_target_and_hash() {
        let d = scratch("adopt");
        let p = executable(&d, "vmm", b"abc");
        let name = p.display().to_string();
        // Another target, another hash: refused before the fd is touched.
        let (record, file) = CheckedTarget::check(&name, ABC).unwrap();
        assert!(matches!(
            record.adopt("/other/vmm", ABC),
            Err(AdoptError::OtherTarget { .. })
        ));
        assert_eq!(
            record.adopt(&name, &"1".repeat(64)).err(),
            Some(AdoptError::OtherSha256)
        );
        // Unchanged: adopted, and the very same file.
        std::mem::forget(file);
        let adopted = record.adopt(&name, ABC).unwrap();
        assert_eq!(adopted.file.as_raw_fd(), record.fd);
        assert_eq!(sha256_of(&adopted.file).unwrap(), ABC);
        drop(adopted);
        // Written after the hash: refused.
        let (record, file) = CheckedTarget::check(&name, ABC).unwrap();
        std::mem::forget(file);
        std::fs::write(&p, b"abcd").unwrap();
        assert!(matches!(
            record.adopt(&name, ABC),
            Err(AdoptError::Changed(_))
        ));
        let _ = std::fs::remove_dir_all(&d);
    }
}
