//! The CPR state: what one process hands the next across a live update, and the hidden channel
//! that carries it.
//!
//! The old VMM writes a [`CprState`] into a memfd and puts the memfd's fd number in the
//! environment variable [`CPR_STATE_ENV`] before it execs. `cpr-shim` reads it, checks every
//! fd it lists, adds its own timings and rewrites it in place; the new VMM reads it before it
//! creates any memory, takes the fds it lists, then closes the channel and unsets the variable.
//!
//! The payload is a [`crate::container`] with one section, so it is versioned and checksummed
//! like the machine state file.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use crate::container::{ContainerError, ContainerReader, ContainerWriter, FormatSpec};
use crate::fds::{self, FdError};
use crate::timing::PhaseLog;

/// Names the fd of the memfd holding the CPR state (mirrors QEMU's `QEMU_CPR_EXEC_STATE`).
pub const CPR_STATE_ENV: &str = "VMM_CPR_EXEC_STATE";
/// The memfd name of the channel, so a receiver can tell it from an unrelated fd.
pub const CPR_CHANNEL_NAME: &str = "cpr-state";
/// The CPR state is a few kilobytes; anything this large is not one.
const MAX_CPR_STATE_LEN: u64 = 16 << 20;
const SECTION_CPR: u32 = 1;

/// Version 1 is the first; readers accept the current and the previous version.
pub static CPR_STATE_FORMAT: FormatSpec = FormatSpec {
    what: "CPR state",
    magic: *b"CPRVMCPR",
    current_version: 1,
    readable_versions: &[1],
    sections: &[(SECTION_CPR, "cpr")],
};

/// What a preserved fd is, so its receiver knows what to check and what to do with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// A guest RAM region (a sealed memfd); `name` is the region's memfd name.
    GuestRam,
    /// The QMP monitor's listening socket.
    QmpListener,
    /// A connected QMP client; `negotiated` says whether it has sent `qmp_capabilities`.
    QmpClient { negotiated: bool },
    /// The serial console's listening socket (`-serial unix:...,server`).
    ConsoleListener,
    /// The serial console's connected client.
    ConsoleClient,
    /// The serial console's output file (`-serial file:...`).
    ConsoleFile,
    /// The previous VMM's executable, for rollback.
    FallbackExe,
}

impl FdKind {
    /// The file type an fd of this kind must have (None: any).
    pub fn file_type(self) -> Option<u32> {
        match self {
            FdKind::GuestRam | FdKind::FallbackExe | FdKind::ConsoleFile => Some(libc::S_IFREG),
            FdKind::QmpListener
            | FdKind::QmpClient { .. }
            | FdKind::ConsoleListener
            | FdKind::ConsoleClient => Some(libc::S_IFSOCK),
        }
    }
}

/// One fd that crosses the exec, with everything needed to recognise it on the other side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreservedFd {
    pub name: String,
    pub kind: FdKind,
    pub fd: RawFd,
    pub size: u64,
    pub seals: u32,
    pub dev: u64,
    pub ino: u64,
}

/// How to get back to the previous version if the update fails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    /// The previous VMM's executable, opened before the exec (listed in `fds` too), so rollback
    /// works even if its path has been replaced meanwhile.
    pub exe_fd: RawFd,
    /// Where that executable was, for logs.
    pub exe_path: String,
    /// The previous VMM's version string.
    pub version: String,
    /// The argv the previous VMM is re-executed with; it restores from `state_file`.
    pub argv: Vec<String>,
}

/// Whether this is the update itself or the one permitted rollback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Attempt {
    Update,
    /// The update failed for `reason`; the previous version is being restored.
    Rollback {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CprState {
    /// Identifies this update in logs.
    pub update_id: u64,
    pub attempt: Attempt,
    /// Every fd the next process inherits.
    pub fds: Vec<PreservedFd>,
    /// The machine state file written by the old VMM.
    pub state_file: String,
    /// Whether the guest was running before the update (it is resumed only then).
    pub guest_was_running: bool,
    /// Monotonic time at which the old VMM began stopping the vCPUs: the start of the blackout.
    pub stopped_at_ns: u64,
    /// Phase timings so far, appended to by each process.
    pub phases: PhaseLog,
    pub fallback: Fallback,
    /// The program the old VMM executed (the shim, or the new VMM directly).
    pub exec_program: String,
    /// The VMM binary the shim resolved and checked (None without the shim).
    pub resolved_target: Option<String>,
}

impl CprState {
    pub fn fd_named(&self, name: &str) -> Option<&PreservedFd> {
        self.fds.iter().find(|f| f.name == name)
    }

    pub fn fds_of_kind(&self, kind: FdKind) -> impl Iterator<Item = &PreservedFd> {
        self.fds.iter().filter(move |f| f.kind == kind)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CprError {
    #[error("{CPR_STATE_ENV}={value:?} is not an fd number")]
    BadEnv { value: String },
    #[error("the CPR state channel: {0}")]
    Fd(#[from] FdError),
    #[error("fd {fd} named by {CPR_STATE_ENV} is not the CPR state channel (it is {found})")]
    NotChannel { fd: RawFd, found: String },
    #[error("the CPR state is {len} bytes, over the {MAX_CPR_STATE_LEN} byte limit")]
    TooLarge { len: u64 },
    #[error("the CPR state channel: {context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] ContainerError),
}

fn io_err(context: &'static str) -> impl FnOnce(std::io::Error) -> CprError {
    move |source| CprError::Io { context, source }
}

pub fn encode(state: &CprState) -> Result<Vec<u8>, CprError> {
    let mut w = ContainerWriter::new(Vec::new(), &CPR_STATE_FORMAT).map_err(io_err("encoding"))?;
    w.write_section(SECTION_CPR, state)?;
    w.finish().map_err(io_err("encoding"))
}

pub fn decode(bytes: Vec<u8>) -> Result<CprState, CprError> {
    let r = ContainerReader::open(bytes, &CPR_STATE_FORMAT)?;
    Ok(r.read_section(SECTION_CPR)?)
}

/// Creates the channel memfd (close-on-exec; the caller clears that just before its exec).
pub fn create_channel(state: &CprState) -> Result<OwnedFd, CprError> {
    let bytes = encode(state)?;
    let name = std::ffi::CString::new(CPR_CHANNEL_NAME).map_err(|_| CprError::Io {
        context: "naming the channel",
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    // SAFETY: memfd_create with a valid NUL-terminated name; on success we own the new fd.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(io_err("memfd_create")(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut file = File::from(fd);
    file.write_all(&bytes).map_err(io_err("writing"))?;
    Ok(OwnedFd::from(file))
}

/// Replaces the channel's content with `state` (the shim records its timings this way).
pub fn rewrite_channel(fd: &OwnedFd, state: &CprState) -> Result<(), CprError> {
    let bytes = encode(state)?;
    let file = borrow_file(fd);
    file.set_len(0).map_err(io_err("truncating"))?;
    file.write_all_at(&bytes, 0).map_err(io_err("writing"))?;
    Ok(())
}

/// Reads the channel named by [`CPR_STATE_ENV`], if the variable is set. The fd is checked to be
/// the channel memfd before it is read; the returned `OwnedFd` closes it when dropped.
pub fn open_channel_from_env() -> Result<Option<(OwnedFd, CprState)>, CprError> {
    let Some(value) = std::env::var_os(CPR_STATE_ENV) else {
        return Ok(None);
    };
    let value = value.to_string_lossy().into_owned();
    let raw: RawFd = value
        .trim()
        .parse()
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| CprError::BadEnv {
            value: value.clone(),
        })?;
    let link = fds::link_target(raw, CPR_CHANNEL_NAME)?;
    if fds::memfd_name(&link) != Some(CPR_CHANNEL_NAME) {
        return Err(CprError::NotChannel {
            fd: raw,
            found: link,
        });
    }
    // SAFETY: the fd is open (readlink succeeded) and is the channel memfd that this process
    // inherited for exactly this purpose; from here on this OwnedFd is its only owner.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let state = read_channel(&fd)?;
    Ok(Some((fd, state)))
}

pub fn read_channel(fd: &OwnedFd) -> Result<CprState, CprError> {
    let file = borrow_file(fd);
    let len = file.metadata().map_err(io_err("fstat"))?.len();
    if len > MAX_CPR_STATE_LEN {
        return Err(CprError::TooLarge { len });
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(io_err("reading"))?;
    decode(bytes)
}

/// A `File` view of a borrowed fd that does not close it.
fn borrow_file(fd: &OwnedFd) -> std::mem::ManuallyDrop<File> {
    // SAFETY: the File never outlives `fd` (it is used within the caller's borrow) and is wrapped
    // in ManuallyDrop, so it never closes the fd it does not own.
    std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd.as_raw_fd()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> CprState {
        CprState {
            update_id: 7,
            attempt: Attempt::Update,
            fds: vec![PreservedFd {
                name: "guest-ram-low".into(),
                kind: FdKind::GuestRam,
                fd: 5,
                size: 1 << 30,
                seals: fds::RAM_SEALS,
                dev: 1,
                ino: 2,
            }],
            state_file: "/run/vm1.state".into(),
            guest_was_running: true,
            stopped_at_ns: 123,
            phases: PhaseLog::starting_at(123),
            fallback: Fallback {
                exe_fd: 6,
                exe_path: "/opt/vmm/1.0/vmm".into(),
                version: "1.0".into(),
                argv: vec!["vmm".into(), "-m".into(), "1G".into()],
            },
            exec_program: "cpr-shim".into(),
            resolved_target: None,
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let s = sample();
        assert_eq!(decode(encode(&s).unwrap()).unwrap(), s);
    }

    #[test]
    fn channel_round_trip_and_rewrite() {
        let mut s = sample();
        let fd = create_channel(&s).unwrap();
        assert_eq!(read_channel(&fd).unwrap(), s);
        s.resolved_target = Some("/opt/vmm/2.0/vmm".into());
        s.phases.mark_at("shim", 500);
        rewrite_channel(&fd, &s).unwrap();
        assert_eq!(read_channel(&fd).unwrap(), s);
        assert!(fds::is_cloexec(fd.as_raw_fd()).unwrap());
    }

    #[test]
    fn corrupted_channel_is_rejected() {
        let bytes = encode(&sample()).unwrap();
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        assert!(decode(bad).is_err());
        assert!(decode(bytes[..bytes.len() - 1].to_vec()).is_err());
    }
}
