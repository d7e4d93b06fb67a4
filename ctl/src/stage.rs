//! `stage` and `unstage`: the staged-upgrade layout under a root directory.
//!
//! ```text
//! ROOT/0.1.0/vmm          a staged binary (copied, 0755, fsynced), named by the version in it
//! ROOT/0.1.0/sha256       its SHA-256, lowercase hex
//! ROOT/current -> 0.1.0   what `update --root ROOT` rolls out (switched by rename: atomic)
//! ROOT/previous -> ...    what `unstage` switches `current` back to
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cpr_common::compat::{Compat, read_note};

use crate::qmp::{Qmp, QmpError};

pub const CURRENT: &str = "current";
pub const PREVIOUS: &str = "previous";
pub const SHA_FILE: &str = "sha256";
pub const BINARY: &str = "vmm";

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{path}: cannot open it: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a cpr-vmm VMM binary: {why}")]
    NotVmm { path: PathBuf, why: String },
    #[error(
        "{path}: its version {version:?} cannot name a directory; build it with another version tag"
    )]
    BadVersion { path: PathBuf, version: String },
    #[error("{path}: reading it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(
        "{socket}: the VM runs {running} (state format {state}, CPR format {cpr}); {new} reads state formats {new_state:?} and CPR formats {new_cpr:?}, so it cannot take over this VM"
    )]
    Incompatible {
        socket: PathBuf,
        running: String,
        state: u32,
        cpr: u32,
        new: String,
        new_state: (u32, u32),
        new_cpr: (u32, u32),
    },
    #[error("{socket}: cannot read the running VMM's binary (/proc/{pid}/exe): {why}")]
    RunningBinary {
        socket: PathBuf,
        pid: u32,
        why: String,
    },
    #[error(
        "root {root}: not writable: {source}; run as a user who may write there, or choose another --root"
    )]
    RootNotWritable {
        root: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{dir}: version {version} is already staged with other contents (sha256 {staged}, new {new}); two different builds carry the same version: rebuild one with another version tag"
    )]
    VersionClash {
        dir: PathBuf,
        version: String,
        staged: String,
        new: String,
    },
    #[error("{path}: {what}: {source}")]
    Write {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "{root}: no {PREVIOUS} version to go back to (nothing was staged over another version)"
    )]
    NoPrevious { root: PathBuf },
    #[error("{path}: {why}")]
    Layout { path: PathBuf, why: String },
}

/// A VMM binary: its note and its SHA-256.
#[derive(Debug, Clone)]
pub struct VmmBinary {
    pub path: PathBuf,
    pub compat: Compat,
    pub sha256: String,
}

impl VmmBinary {
    /// Reads the note and hashes `path` (never runs it).
    pub fn inspect(path: &Path) -> Result<VmmBinary, StageError> {
        let file = File::open(path).map_err(|source| StageError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| StageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(StageError::NotVmm {
                path: path.to_path_buf(),
                why: "it is not a regular file".into(),
            });
        }
        let compat = read_note(&file).map_err(|e| StageError::NotVmm {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        let sha256 = cpr_common::target::sha256_of(&file).map_err(|source| StageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(VmmBinary {
            path: path.to_path_buf(),
            compat,
            sha256,
        })
    }

    /// Whether it can take over a VM run by a binary whose note is `running` (which writes the
    /// newest formats it knows).
    pub fn check_takes_over(&self, socket: &Path, running: &Compat) -> Result<(), StageError> {
        let (state, cpr) = (running.state_versions.1, running.cpr_versions.1);
        if self.compat.reads_state(state) && self.compat.reads_cpr(cpr) {
            return Ok(());
        }
        Err(StageError::Incompatible {
            socket: socket.to_path_buf(),
            running: running.version.clone(),
            state,
            cpr,
            new: self.compat.version.clone(),
            new_state: self.compat.state_versions,
            new_cpr: self.compat.cpr_versions,
        })
    }
}

/// The note of the binary a running VMM executes (through /proc, so a replaced path is fine).
pub fn running_compat(socket: &Path, pid: u32) -> Result<Compat, StageError> {
    let err = |why: String| StageError::RunningBinary {
        socket: socket.to_path_buf(),
        pid,
        why,
    };
    let file = File::open(format!("/proc/{pid}/exe")).map_err(|e| err(e.to_string()))?;
    read_note(&file).map_err(|e| err(e.to_string()))
}

/// `cpr-ctl stage NEW --root DIR [SOCKET...]`.
pub fn stage(new: &Path, root: &Path, sockets: &[PathBuf]) -> Result<(), StageError> {
    let binary = VmmBinary::inspect(new)?;
    let version = binary.compat.version.clone();
    if version.is_empty()
        || version.contains('/')
        || version.starts_with('.')
        || [CURRENT, PREVIOUS].contains(&version.as_str())
    {
        return Err(StageError::BadVersion {
            path: new.to_path_buf(),
            version,
        });
    }
    for socket in sockets {
        let qmp = Qmp::connect(socket)?;
        let running = running_compat(socket, qmp.pid)?;
        binary.check_takes_over(socket, &running)?;
    }
    fs::create_dir_all(root).map_err(|source| StageError::RootNotWritable {
        root: root.to_path_buf(),
        source,
    })?;
    check_writable(root)?;

    let dir = root.join(&version);
    let dest = dir.join(BINARY);
    match VmmBinary::inspect(&dest) {
        Ok(staged) if staged.sha256 == binary.sha256 => {}
        Ok(staged) => {
            return Err(StageError::VersionClash {
                dir,
                version,
                staged: staged.sha256,
                new: binary.sha256,
            });
        }
        Err(_) => {
            fs::create_dir_all(&dir).map_err(write_err(&dir, "creating the version directory"))?;
            let bytes = fs::read(new).map_err(|source| StageError::Read {
                path: new.to_path_buf(),
                source,
            })?;
            write_durably(&dest, &bytes, 0o755)?;
        }
    }
    write_durably(
        &dir.join(SHA_FILE),
        format!("{}\n", binary.sha256).as_bytes(),
        0o644,
    )?;
    sync_dir(&dir)?;

    let old = read_link_name(&root.join(CURRENT))?;
    if old.as_deref() == Some(version.as_str()) {
        println!(
            "staged {version} (sha256 {}) at {}; it was already current",
            binary.sha256,
            dest.display()
        );
        return Ok(());
    }
    if let Some(old) = &old {
        switch_link(root, PREVIOUS, old)?;
    }
    switch_link(root, CURRENT, &version)?;
    println!(
        "staged {version} (sha256 {}) at {}; current: {version} (was {})",
        binary.sha256,
        dest.display(),
        old.as_deref().unwrap_or("nothing")
    );
    Ok(())
}

/// `cpr-ctl unstage --root DIR`: `current` back to `previous` (and `previous` to what was current).
pub fn unstage(root: &Path) -> Result<(), StageError> {
    let previous = read_link_name(&root.join(PREVIOUS))?.ok_or_else(|| StageError::NoPrevious {
        root: root.to_path_buf(),
    })?;
    let binary = root.join(&previous).join(BINARY);
    VmmBinary::inspect(&binary)?;
    check_writable(root)?;
    let current = read_link_name(&root.join(CURRENT))?;
    if let Some(current) = &current {
        switch_link(root, PREVIOUS, current)?;
    }
    switch_link(root, CURRENT, &previous)?;
    println!(
        "current: {previous} (was {}); run cpr-ctl update to move the VMs back",
        current.as_deref().unwrap_or("nothing")
    );
    Ok(())
}

fn write_err(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> StageError {
    let path = path.to_path_buf();
    move |source| StageError::Write { path, what, source }
}

fn check_writable(root: &Path) -> Result<(), StageError> {
    let probe = root.join(format!(".cpr-ctl-probe-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|source| StageError::RootNotWritable {
            root: root.to_path_buf(),
            source,
        })?;
    fs::remove_file(&probe).map_err(write_err(&probe, "removing the write probe"))
}

/// Writes `bytes` to `path` through a temporary name, fsynced, then renamed into place.
fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StageError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(write_err(&tmp, "creating"))?;
    file.write_all(bytes).map_err(write_err(&tmp, "writing"))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(write_err(&tmp, "setting its mode"))?;
    file.sync_all().map_err(write_err(&tmp, "syncing"))?;
    fs::rename(&tmp, path).map_err(write_err(path, "renaming into place"))
}

fn sync_dir(dir: &Path) -> Result<(), StageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err(dir, "syncing the directory"))
}

/// The version a `current`/`previous` link names, if the link exists.
fn read_link_name(link: &Path) -> Result<Option<String>, StageError> {
    match fs::read_link(link) {
        Ok(target) => Ok(Some(target.to_string_lossy().into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StageError::Layout {
            path: link.to_path_buf(),
            why: format!("expected a symlink to a version directory: {e}"),
        }),
    }
}

/// Points `root/name` at `version` atomically: a symlink under a temporary name, renamed.
fn switch_link(root: &Path, name: &str, version: &str) -> Result<(), StageError> {
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).map_err(write_err(&tmp, "creating the symlink"))?;
    let link = root.join(name);
    fs::rename(&tmp, &link).map_err(write_err(&link, "switching the symlink"))?;
    sync_dir(root)
}
