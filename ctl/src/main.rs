//! `cpr-ctl`: the operator's rollout tool for cpr-vmm live updates.
//!
//! ```text
//! cpr-ctl stage NEW_VMM --root DIR [SOCKET...]   install DIR/<version>/vmm, switch DIR/current
//! cpr-ctl unstage --root DIR                      switch DIR/current back to DIR/previous
//! cpr-ctl update [--to PATH | --root DIR] [--parallel N] [--canary K] [--max-blackout-ms X]
//!                [--report FILE] SOCKET...        live-update every VM, canary first
//! cpr-ctl status [--json] SOCKET...               version, state, PID, last update of each VM
//! ```
//!
//! Exit status: 0 when everything asked for was done (for `update`: every VM runs the target
//! and no blackout was over the limit), 1 when a rollout stopped or a VM failed, 2 when the
//! input was refused and no VM was touched.

mod qmp;
mod stage;
mod status;
mod update;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Where `--root` is when it is not given.
const DEFAULT_ROOT: &str = "/opt/cpr-vmm";

#[derive(Parser)]
#[command(
    name = "cpr-ctl",
    version,
    about = "Stage a new VMM and live-update every VM on a host to it"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install NEW_VMM as ROOT/<version>/vmm and make it ROOT/current (the version comes from
    /// the binary's note); with SOCKETs, first check it can take over each of those VMs.
    Stage {
        new_vmm: PathBuf,
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Running VMs (QMP sockets) whose state and CPR formats it must read.
        sockets: Vec<PathBuf>,
    },
    /// Switch ROOT/current back to the version staged before it (then run update to move the
    /// VMs back).
    Unstage {
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
    },
    /// Live-update each VM (QMP socket, or a directory of them) to the target, canary first.
    Update {
        /// The target VMM binary (default: ROOT/current/vmm, resolved once at start).
        #[arg(long)]
        to: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// How many VMs to update at the same time after the canaries.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// How many VMs to update first, one at a time.
        #[arg(long, default_value_t = 1)]
        canary: usize,
        /// Stop the rollout after an update whose blackout is longer than this.
        #[arg(long)]
        max_blackout_ms: Option<f64>,
        /// Write the JSON report here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// The cpr-shim binary (default: the one beside cpr-ctl).
        #[arg(long)]
        shim: Option<PathBuf>,
        /// Where the state files go (default: beside each VM's socket, NAME.cpr-state).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// How long one VM's update may take, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        /// Test only: SOCKET=FAULT adds --cpr-test-fault FAULT to that VM's new command line.
        #[arg(long = "x-test-fault", hide = true)]
        test_faults: Vec<String>,
        #[arg(required = true)]
        sockets: Vec<PathBuf>,
    },
    /// Version, run state, PID, last update outcome and blackout of each VM.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        sockets: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Stage {
            new_vmm,
            root,
            sockets,
        } => match stage::stage(&new_vmm, &root, &sockets) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => refused(&[e]),
        },
        Cmd::Unstage { root } => match stage::unstage(&root) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => refused(&[e]),
        },
        Cmd::Status { json, sockets } => match update::expand_sockets(&sockets) {
            Ok(sockets) if status::status(&sockets, json) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::from(1),
            Err(e) => refused(&[e]),
        },
        Cmd::Update {
            to,
            root,
            parallel,
            canary,
            max_blackout_ms,
            report,
            shim,
            state_dir,
            timeout_s,
            test_faults,
            sockets,
        } => {
            let test_faults = match test_faults
                .iter()
                .map(|t| update::parse_test_fault(t))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(f) => f,
                Err(e) => return refused(&[e]),
            };
            let opts = update::Options {
                target: to.unwrap_or_else(|| root.join(stage::CURRENT).join(stage::BINARY)),
                shim: shim.unwrap_or_else(default_shim),
                parallel,
                canary,
                max_blackout_ms,
                state_dir,
                timeout: Duration::from_secs(timeout_s),
                test_faults,
            };
            match update::run(&sockets, &opts) {
                Err(problems) => refused(&problems),
                Ok(r) => {
                    let json = r.to_json();
                    let mut status = if r.clean() { 0 } else { 1 };
                    if let Some(path) = &report
                        && let Err(e) = std::fs::write(path, format!("{json:#}\n"))
                    {
                        eprintln!("cpr-ctl: writing the report to {}: {e}", path.display());
                        status = 1;
                    }
                    let done = r.vms.iter().filter(|v| v.outcome.on_target()).count();
                    match &r.stopped {
                        Some(why) => println!(
                            "stopped: {why}; {done} of {} VM(s) on {}, the others left as they were",
                            r.vms.len(),
                            r.target.compat.version
                        ),
                        None => println!(
                            "done: {done} of {} VM(s) on {}",
                            r.vms.len(),
                            r.target.compat.version
                        ),
                    }
                    ExitCode::from(status)
                }
            }
        }
    }
}

/// Prints why nothing was done; exit status 2.
fn refused<E: std::fmt::Display>(problems: &[E]) -> ExitCode {
    for p in problems {
        eprintln!("cpr-ctl: {p}");
    }
    eprintln!("cpr-ctl: nothing was changed");
    ExitCode::from(2)
}

/// `cpr-shim` in the directory of this executable.
fn default_shim() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("cpr-shim")))
        .unwrap_or_else(|| PathBuf::from("cpr-shim"))
}
