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
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;

use nix::sys::memfd::MFdFlags;
use serde::{Deserialize, Serialize};

use crate::container::{ContainerError, ContainerReader, ContainerWriter, FormatSpec};
use crate::exec::{ExecError, ExecPlan, ExecTarget};
use crate::fds::{self, FdError};
// The fd records live in `fds` (which checks them); they are part of the CPR state.
pub use crate::fds::{FdKind, PreservedFd};
use crate::timing::PhaseLog;

/// Names the fd of the memfd holding the CPR state (mirrors QEMU's `QEMU_CPR_EXEC_STATE`).
pub const CPR_STATE_ENV: &str = "VMM_CPR_EXEC_STATE";
/// A second copy of the CPR state (hex of the same container), in the environment, so that a
/// damaged channel memfd still leaves enough to roll back to the previous version.
pub const FALLBACK_ENV: &str = "VMM_CPR_FALLBACK";
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
    #[error("{FALLBACK_ENV} is not a valid copy of the CPR state")]
    BadEnvCopy,
    #[error(
        "no usable CPR state: the channel is unreadable ({problem}) and {FALLBACK_ENV} holds no valid copy"
    )]
    NoUsableState { problem: String },
    #[error("preparing the exec: {0}")]
    Exec(#[from] ExecError),
    #[error(
        "rollback already attempted once (the update failed: {first}); now: {now}. Giving up: the previous version could not resume the guest either"
    )]
    RollbackExhausted { first: String, now: String },
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
    let fd = nix::sys::memfd::memfd_create(CPR_CHANNEL_NAME, MFdFlags::MFD_CLOEXEC)
        .map_err(|errno| io_err("memfd_create")(errno.into()))?;
    let mut file = File::from(fd);
    file.write_all(&bytes).map_err(io_err("writing"))?;
    Ok(OwnedFd::from(file))
}

/// Replaces the channel's content with `state` (the shim records its timings this way).
pub fn rewrite_channel(fd: &OwnedFd, state: &CprState) -> Result<(), CprError> {
    let bytes = encode(state)?;
    let file = channel_file(fd)?;
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
    // Raw by necessity: the number comes from the environment, so it is checked through /proc
    // (open, and the channel memfd) before anything owns it.
    // It was inherited for exactly this purpose; from here on this is its only owner.
    // SAFETY: the fd is open (checked above) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let state = read_channel(&fd)?;
    Ok(Some((fd, state)))
}

pub fn read_channel(fd: &OwnedFd) -> Result<CprState, CprError> {
    let file = channel_file(fd)?;
    let len = file.metadata().map_err(io_err("fstat"))?.len();
    if len > MAX_CPR_STATE_LEN {
        return Err(CprError::TooLarge { len });
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(io_err("reading"))?;
    decode(bytes)
}

/// Hex of the encoded state, for [`FALLBACK_ENV`].
pub fn encode_env_copy(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of a [`FALLBACK_ENV`] value (hex), or `None` if it is not hex of whole bytes.
pub fn decode_env_copy(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What a process started by a live update inherited.
pub struct Inherited {
    pub state: CprState,
    /// The channel memfd, if it could be found (a rollback rewrites it).
    pub channel: Option<OwnedFd>,
    /// Why the channel could not be read, when the environment copy was used instead. The update
    /// must then roll back: the channel was damaged.
    pub channel_problem: Option<String>,
}

/// Reads the CPR state this process inherited, if any: from the channel named by
/// [`CPR_STATE_ENV`], or, if that is damaged, from the copy in [`FALLBACK_ENV`].
pub fn inherited_from_env() -> Result<Option<Inherited>, CprError> {
    if std::env::var_os(CPR_STATE_ENV).is_none() {
        return Ok(None);
    }
    let primary = open_channel_from_env();
    let (channel, problem) = match primary {
        Ok(Some((fd, state))) => {
            return Ok(Some(Inherited {
                state,
                channel: Some(fd),
                channel_problem: None,
            }));
        }
        Ok(None) => (None, "the channel is missing".to_string()),
        Err(e) => (channel_fd_if_memfd(), e.to_string()),
    };
    let copy = std::env::var(FALLBACK_ENV)
        .ok()
        .and_then(|t| decode_env_copy(&t))
        .ok_or(CprError::BadEnvCopy)
        .and_then(decode);
    match copy {
        Ok(state) => Ok(Some(Inherited {
            state,
            channel,
            channel_problem: Some(problem),
        })),
        Err(_) => Err(CprError::NoUsableState { problem }),
    }
}

/// The channel fd from the environment if it is at least the channel memfd (even if its content
/// is damaged), so a rollback can rewrite it.
fn channel_fd_if_memfd() -> Option<OwnedFd> {
    let raw: RawFd = std::env::var(CPR_STATE_ENV).ok()?.trim().parse().ok()?;
    let link = fds::link_target(raw, CPR_CHANNEL_NAME).ok()?;
    if fds::memfd_name(&link) != Some(CPR_CHANNEL_NAME) {
        return None;
    }
    // SAFETY: the fd is open and is the inherited channel memfd; nothing else here owns it.
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The exec that returns to the previous VMM, which then restores the guest from the same state
/// and reports `reason`. Fails if a rollback was already attempted (at most one per update).
///
/// `channel` is the channel memfd (rewritten at exec time); without one a new one is created.
/// `keep` are further fds to pass on, each named by an environment variable.
pub fn rollback_plan(
    state: &CprState,
    channel: Option<RawFd>,
    reason: &str,
    keep: &[(&str, RawFd)],
) -> Result<ExecPlan, CprError> {
    if let Attempt::Rollback { reason: first } = &state.attempt {
        return Err(CprError::RollbackExhausted {
            first: first.clone(),
            now: reason.to_string(),
        });
    }
    let mut next = state.clone();
    next.attempt = Attempt::Rollback {
        reason: reason.to_string(),
    };
    let bytes = encode(&next)?;
    let channel_fd = match channel {
        Some(fd) => fd,
        None => {
            use std::os::fd::IntoRawFd;
            create_channel(&next)?.into_raw_fd()
        }
    };
    let mut inherit: Vec<RawFd> = state.fds.iter().map(|f| f.fd).collect();
    inherit.push(channel_fd);
    inherit.push(state.fallback.exe_fd);
    let mut env = vec![
        (CPR_STATE_ENV, channel_fd.to_string()),
        (FALLBACK_ENV, encode_env_copy(&bytes)),
    ];
    for (name, fd) in keep {
        inherit.push(*fd);
        env.push((*name, fd.to_string()));
    }
    let plan = ExecPlan::new(
        ExecTarget::Fd(state.fallback.exe_fd),
        &state.fallback.argv,
        &env,
        &[crate::target::CHECKED_TARGET_ENV],
        inherit,
    )?;
    Ok(plan.with_channel_content(channel_fd, bytes))
}

/// A `File` on a duplicate of the channel fd (closed when dropped; the original stays open).
fn channel_file(fd: &OwnedFd) -> Result<File, CprError> {
    fd.try_clone()
        .map(File::from)
        .map_err(io_err("duplicating the channel fd"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

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
    fn env_copy_round_trips() {
        let bytes = encode(&sample()).unwrap();
        let text = encode_env_copy(&bytes);
        assert_eq!(decode_env_copy(&text).unwrap(), bytes);
        assert!(decode_env_copy("abc").is_none());
        assert!(decode_env_copy("zz").is_none());
    }

    #[test]
    fn only_one_rollback() {
        let mut s = sample();
        s.attempt = Attempt::Rollback {
            reason: "first".into(),
        };
        let err = rollback_plan(&s, Some(3), "second", &[]).unwrap_err();
        assert!(err.to_string().contains("first") && err.to_string().contains("second"));
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
