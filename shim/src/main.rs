//! `cpr-shim`: the small program between the old and the new VMM in a live update.
//!
//! ```text
//! cpr-shim [--sha256 HEX] [--log FILE] [--prefault] -- NEW_VMM [ARGS...]
//! ```
//!
//! The old VMM executes it with guest RAM and its other fds inherited and the CPR state in the
//! channel memfd (`VMM_CPR_EXEC_STATE`). The shim checks everything the new VMM will rely on,
//! before it is too late to go back cheaply:
//!
//! 1. the CPR state is intact (checksummed; a damaged channel means roll back);
//! 2. every listed fd is open and is the recorded file (memfd name, size, seals, device, inode),
//!    and every RAM memfd can be mapped and touched (`--prefault`: fully);
//! 3. the target resolves (a `current` symlink in a staged layout is resolved once, here), is an
//!    executable regular file, matches `--sha256`, and reads this state file's and this CPR
//!    state's format versions (the note in its ELF image, see `cpr_common::compat`). With
//!    `--sha256` the old VMM has normally resolved and hashed the target before the guest
//!    stopped and hands it over open (`cpr_common::target`); the shim then only verifies that
//!    the file is unchanged, and hashes it itself otherwise.
//!
//! Then it records its timings in the CPR state, appends one JSON line to `--log`, and executes
//! the target through the fd it checked (no window for the path to change). On any failure it
//! rolls back: it executes the previous VMM from its preserved fd, which restores the guest and
//! reports the reason.

mod checks;
mod target;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use cpr_common::cpr::{self, CprState, Inherited};
use cpr_common::exec::{ExecError, ExecPlan, ExecTarget};
use cpr_common::target::CHECKED_TARGET_ENV;
use cpr_common::timing::{monotonic_ns, realtime_ns};

const USAGE: &str = "usage: cpr-shim [--sha256 HEX] [--log FILE] [--prefault] -- NEW_VMM [ARGS...]

Run by a VMM during a live update (migrate-set-parameters mode=cpr-exec,
cpr-exec-command=[\"cpr-shim\", ..., \"--\", \"/path/to/new/vmm\", ...]).
Checks the inherited guest RAM and the target binary, then executes the target;
on any failure, executes the previous VMM, which takes the guest back.

  --sha256 HEX   the target's SHA-256 must be HEX
  --log FILE     append one JSON line per update to FILE
  --prefault     fault in every page of guest RAM while checking it";

/// A command line the shim cannot run with.
#[derive(Clone, Debug, thiserror::Error)]
enum ArgsError {
    #[error("{option} needs a value")]
    MissingValue { option: String },
    #[error("--sha256 {value}: expected 64 hex digits")]
    BadSha256 { value: String },
    #[error("unknown option {option}")]
    Unknown { option: String },
    #[error("no target: put the new VMM and its arguments after --")]
    NoTarget,
}

/// Why the shim refuses an update (and rolls back); the message becomes the rollback's reason.
#[derive(Debug, thiserror::Error)]
enum ShimError {
    #[error("cpr-shim: bad arguments: {0}")]
    Args(#[source] ArgsError),
    #[error("the CPR state channel is damaged: {problem}")]
    DamagedChannel { problem: String },
    #[error("cpr-shim was started for a rollback ({reason}); it only runs forward updates")]
    StartedForRollback { reason: String },
    #[error(transparent)]
    Check(#[from] checks::CheckError),
    #[error(transparent)]
    Target(#[from] target::TargetError),
    #[error("the CPR state channel is missing")]
    ChannelMissing,
    #[error("recording timings in the CPR state: {0}")]
    RecordTimings(#[source] cpr::CprError),
    #[error("preparing to execute {}: {source}", target.display())]
    PrepareExec {
        target: PathBuf,
        #[source]
        source: ExecError,
    },
    #[error("executing {} failed: {source}", target.display())]
    Exec {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default)]
struct Options {
    sha256: Option<String>,
    log: Option<PathBuf>,
    prefault: bool,
    target: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Options, ArgsError> {
    let mut o = Options::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let value = |i: &mut usize| -> Result<String, ArgsError> {
            if let Some((_, v)) = a.split_once('=') {
                return Ok(v.to_string());
            }
            *i += 1;
            args.get(*i)
                .cloned()
                .ok_or_else(|| ArgsError::MissingValue { option: a.clone() })
        };
        match a.split_once('=').map_or(a.as_str(), |(k, _)| k) {
            "--" => {
                o.target = args[i + 1..].to_vec();
                break;
            }
            "--sha256" => {
                let v = value(&mut i)?;
                if v.len() != 64 || !v.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(ArgsError::BadSha256 { value: v });
                }
                o.sha256 = Some(v.to_ascii_lowercase());
            }
            "--log" => o.log = Some(PathBuf::from(value(&mut i)?)),
            "--prefault" => o.prefault = true,
            other => {
                return Err(ArgsError::Unknown {
                    option: other.to_string(),
                });
            }
        }
        i += 1;
    }
    if o.target.is_empty() {
        return Err(ArgsError::NoTarget);
    }
    Ok(o)
}

fn main() -> ExitCode {
    let started_ns = monotonic_ns();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--version") {
        println!("cpr-shim {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let inherited = match cpr::inherited_from_env() {
        Ok(Some(i)) => i,
        Ok(None) => {
            eprintln!(
                "cpr-shim: {} is not set: cpr-shim is run by a VMM during a live update\n{USAGE}",
                cpr::CPR_STATE_ENV
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("cpr-shim: cannot read the CPR state, so cannot roll back either: {e}");
            return ExitCode::from(1);
        }
    };
    let mut state = inherited.state.clone();
    state.phases.mark_at("exec to shim start", started_ns);
    let options = parse_args(&args);
    let outcome = options
        .as_ref()
        .map_err(|e| ShimError::Args(e.clone()))
        .and_then(|o| check_everything(o, &inherited, &mut state));
    state.phases.mark("shim checks");
    let log = options.as_ref().ok().and_then(|o| o.log.clone());
    match outcome {
        Ok(checked) => {
            let failure = hand_over(&inherited, &mut state, &checked, log.as_deref());
            roll_back(&inherited, &state, &failure.to_string(), log.as_deref())
        }
        Err(reason) => roll_back(&inherited, &state, &reason.to_string(), log.as_deref()),
    }
}

/// Runs every check; returns the target, opened, checked and ready to execute.
fn check_everything(
    options: &Options,
    inherited: &Inherited,
    state: &mut CprState,
) -> Result<target::Checked, ShimError> {
    if let Some(problem) = &inherited.channel_problem {
        return Err(ShimError::DamagedChannel {
            problem: problem.clone(),
        });
    }
    if let cpr::Attempt::Rollback { reason } = &state.attempt {
        return Err(ShimError::StartedForRollback {
            reason: reason.clone(),
        });
    }
    checks::check_fds(state, options.prefault)?;
    let channel_version = inherited
        .channel
        .as_ref()
        .map(checks::channel_version)
        .transpose()?
        .unwrap_or(cpr::CPR_STATE_FORMAT.current_version);
    let checked = target::check(
        &options.target,
        options.sha256.as_deref(),
        &state.state_file,
        channel_version,
    )?;
    state.resolved_target = Some(checked.resolved.display().to_string());
    Ok(checked)
}

/// Records the timings and executes the target. Returns only if that failed, with why.
fn hand_over(
    inherited: &Inherited,
    state: &mut CprState,
    checked: &target::Checked,
    log: Option<&std::path::Path>,
) -> ShimError {
    let Some(channel) = &inherited.channel else {
        return ShimError::ChannelMissing;
    };
    if let Err(e) = cpr::rewrite_channel(channel, state) {
        return ShimError::RecordTimings(e);
    }
    append_log(log, state, Some(checked), "exec", None);
    if !checked.compat.has(cpr_common::compat::FEATURE_SIGNALS) {
        // A VMM of an older release handles SIGTERM & co. with handlers of its own: blocked,
        // they would never reach it.
        let dropped = cpr_common::exec::unblock_termination_signals_dropping_pending();
        if !dropped.is_empty() {
            eprintln!(
                "cpr-shim: {} cannot take signals pending across the update; dropped {dropped:?}",
                checked.resolved.display()
            );
        }
    }
    let mut inherit: Vec<i32> = state.fds.iter().map(|f| f.fd).collect();
    inherit.push(channel.as_raw_fd());
    let plan = ExecPlan::new(
        ExecTarget::Fd(checked.file.as_raw_fd()),
        &checked.argv,
        &[],
        &[CHECKED_TARGET_ENV],
        inherit,
    );
    match plan {
        Ok(plan) => ShimError::Exec {
            target: checked.resolved.clone(),
            source: plan.exec(),
        },
        Err(source) => ShimError::PrepareExec {
            target: checked.resolved.clone(),
            source,
        },
    }
}

/// Executes the previous VMM, which takes the guest back and reports `reason`.
fn roll_back(
    inherited: &Inherited,
    state: &CprState,
    reason: &str,
    log: Option<&std::path::Path>,
) -> ExitCode {
    eprintln!("cpr-shim: live update refused: {reason}; rolling back to the previous VMM");
    append_log(log, state, None, "rollback", Some(reason));
    let channel = inherited.channel.as_ref().map(|c| c.as_raw_fd());
    let why = match cpr::rollback_plan(state, channel, reason, &[]) {
        Ok(plan) => format!("executing {} failed: {}", plan.program(), plan.exec()),
        Err(e) => e.to_string(),
    };
    eprintln!("cpr-shim: rollback failed, the guest is lost: {why}");
    ExitCode::from(1)
}

/// Appends one JSON line for this update to the operator's log (failures only warn: the log
/// must never be the reason an update fails).
fn append_log(
    path: Option<&std::path::Path>,
    state: &CprState,
    checked: Option<&target::Checked>,
    outcome: &str,
    reason: Option<&str>,
) {
    let Some(path) = path else { return };
    let phases: serde_json::Map<String, serde_json::Value> = state
        .phases
        .phases
        .iter()
        .map(|p| (p.name.clone(), serde_json::json!(p.ns as f64 / 1e6)))
        .collect();
    let blackout_ms = monotonic_ns().saturating_sub(state.stopped_at_ns) as f64 / 1e6;
    let line = serde_json::json!({
        "time": realtime_ns() as f64 / 1e9,
        "pid": std::process::id(),
        "update_id": state.update_id,
        "from": {"binary": state.fallback.exe_path, "version": state.fallback.version},
        "to": checked.map(|c| serde_json::json!({
            "requested": c.argv.first(),
            "resolved": c.resolved.display().to_string(),
            "version": c.compat.version,
            "sha256": c.sha256.as_ref().map(|(hash, _)| hash),
            "sha256_checked_by": c.sha256.as_ref().map(|(_, by)| match by {
                target::HashedBy::OldVmm => "old-vmm-before-stop",
                target::HashedBy::Shim => "shim",
            }),
        })),
        "state_file": state.state_file,
        "phases_ms": phases,
        "blackout_so_far_ms": blackout_ms,
        "outcome": outcome,
        "reason": reason,
    });
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!(
            "cpr-shim: warning: cannot append to log {}: {e}",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_and_target() {
        let o = parse_args(&args(&[
            "--sha256",
            &"A".repeat(64),
            "--log=/tmp/x",
            "--prefault",
            "--",
            "/opt/vmm",
            "-m",
            "1G",
        ]))
        .unwrap();
        assert_eq!(o.sha256.unwrap(), "a".repeat(64));
        assert_eq!(o.log.unwrap(), PathBuf::from("/tmp/x"));
        assert!(o.prefault);
        assert_eq!(o.target, args(&["/opt/vmm", "-m", "1G"]));
    }

    #[test]
    fn bad_arguments_say_what_is_wrong() {
        let message = |v: &[&str]| parse_args(&args(v)).unwrap_err().to_string();
        assert!(message(&["--"]).contains("no target"));
        assert!(message(&["--sha256", "xyz", "--", "v"]).contains("64 hex"));
        assert!(message(&["--bogus", "--", "v"]).contains("--bogus"));
        assert!(message(&["--log"]).contains("needs a value"));
    }
}
