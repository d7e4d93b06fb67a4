//! `vmm`: a small KVM virtual machine monitor whose headline feature is live update by exec.
//!
//! Start-up follows the flow in docs/ARCHITECTURE.md: parse the command line, then either boot a built-in
//! guest, or restore a saved machine (`-incoming`), and hand the machine to the control loop
//! ([`control`]), which serves the QMP monitor and carries out migrations.
//! The modules live in the `vmm` library (src/lib.rs), which the fuzz targets also use.

use std::process::ExitCode;

use clap::Parser;
use vmm::{cli, control, logger, migration};

fn main() -> ExitCode {
    let started_ns = cpr_common::timing::monotonic_ns();
    // The rescue guard of a live update is this same program in another role.
    let raw_args: Vec<String> = std::env::args_os()
        .take(3)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if raw_args.get(1).map(String::as_str) == Some(migration::rescue::GUARD_ARG) {
        return migration::rescue::guard_main(&raw_args);
    }
    // Before any thread exists, so that every thread inherits it: termination signals are read
    // from a signalfd by the control loop, and one that arrives during a live update stays
    // pending across its execs for the VMM that runs the guest afterwards.
    if let Err(e) = cpr_common::exec::block_termination_signals() {
        eprintln!("vmm: blocking SIGTERM/SIGINT/SIGHUP: {e}");
        return ExitCode::from(1);
    }
    // A live update hands over its state first: read it before anything else, and clear the
    // channel variables while this process is still single-threaded.
    let inherited = cpr_common::cpr::inherited_from_env();
    let guard = migration::rescue::GuardLink::take_from_env();
    migration::cpr_exec::clear_channel_env();
    // Every argument must be text: a lossy conversion could turn a path into another one.
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let not_text = std::env::args_os()
        .enumerate()
        .find(|(_, a)| a.to_str().is_none())
        .map(|(i, a)| {
            let after = argv
                .get(i.wrapping_sub(1))
                .filter(|_| i > 0)
                .map(|p| format!(" (after {p})"))
                .unwrap_or_default();
            format!(
                "argument {i}{after} is not valid UTF-8: {}",
                a.to_string_lossy()
            )
        });
    let parsed = match &not_text {
        Some(why) => Err(why.clone()),
        None => cli::Args::try_parse_from(cli::normalize_qemu_spellings(argv.clone()))
            .map_err(|e| e.to_string()),
    };
    match &parsed {
        Ok(args) => logger::init(args.verbose, args.name.as_deref()),
        Err(_) => logger::init(0, None),
    }

    let incoming = match inherited {
        Ok(None) => None,
        Ok(Some(inherited)) => match migration::cpr_exec::Incoming::new(inherited, started_ns) {
            Ok(mut incoming) => {
                incoming.set_guard(guard);
                Some(incoming)
            }
            Err((mut incoming, problem)) => {
                incoming.set_guard(guard);
                return give_up(incoming.roll_back(&problem));
            }
        },
        Err(e) => {
            // Nothing says where the previous version is: the guest cannot be recovered.
            eprintln!("vmm: live update: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(i) = &incoming {
        i.arm();
    }

    let config = parsed
        .and_then(|args| cli::Config::from_args(args, argv.clone()).map_err(|e| e.to_string()));
    let config = match (config, &incoming) {
        (Ok(c), _) => c,
        (Err(e), Some(incoming)) => {
            return give_up(incoming.roll_back(&format!(
                "the new VMM rejected its command line: {}",
                e.trim()
            )));
        }
        (Err(e), None) => {
            // clap's own messages (usage, --help, --version) print as clap formats them.
            if not_text.is_none()
                && let Err(clap_err) =
                    cli::Args::try_parse_from(cli::normalize_qemu_spellings(argv.clone()))
            {
                clap_err.exit();
            }
            eprintln!("vmm: {e}");
            return ExitCode::from(1);
        }
    };
    if incoming.is_some() && config.cpr_test_fault == Some(cli::CprTestFault::KillAtStart) {
        log::error!("test fault injected: SIGKILL at start");
        // SAFETY: raising a signal; the process ends here.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    // Disk images are looked at only by a VMM that opens them by path; a live update's (and
    // cpr-transfer's) disks come with the update, and their paths may be long gone.
    if incoming.is_none()
        && config.cpr_channel.is_none()
        && let Err(e) = cli::drives::check_images(&config.disks)
    {
        eprintln!("vmm: {e}");
        return ExitCode::from(1);
    }
    // Taps likewise: a live update's new VMM takes the one handed over.
    if incoming.is_none()
        && config.cpr_channel.is_none()
        && let Err(e) = cli::nics::check_taps(&config.nics)
    {
        eprintln!("vmm: {e}");
        return ExitCode::from(1);
    }
    let mut incoming = incoming;
    if let Some(i) = &mut incoming {
        i.phases.mark("read CPR state and check fds");
    }
    // cpr-transfer: the CPR channel comes before any memory or the monitor exist.
    let transfer = match (&config.cpr_channel, &incoming) {
        (Some(path), None) => match migration::cpr_transfer::accept_cpr(path) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("vmm: incoming cpr-transfer failed: {e}");
                return ExitCode::from(1);
            }
        },
        _ => None,
    };
    match control::run(config, incoming, transfer) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(1)
        }
    }
}

/// A live update failed and so did the rollback: say why and end.
fn give_up(reason: String) -> ExitCode {
    eprintln!("vmm: live update failed and the guest could not be recovered: {reason}");
    ExitCode::from(1)
}
