//! `vmm`: a small KVM virtual machine monitor whose headline feature is live update by exec.
//!
//! Start-up follows the flow in DESIGN.md: parse the command line, then either boot a built-in
//! guest, or restore a saved machine (`-incoming`), and hand the machine to the control loop
//! ([`control`]), which serves the QMP monitor and carries out migrations.

mod boot;
mod cli;
mod control;
mod cpuid;
mod devices;
mod logger;
mod machine;
mod memory;
mod migration;
mod qmp;
mod vcpu;

use std::process::ExitCode;

use clap::Parser;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Tells apart builds of the same release (set CPR_VMM_BUILD_TAG when building), e.g. the two
/// binaries a live-update test alternates between; reported by `query-version` and in logs.
pub const BUILD_TAG: Option<&str> = option_env!("CPR_VMM_BUILD_TAG");

/// "0.1.0", or "0.1.0+TAG" for a tagged build.
pub fn version_string() -> String {
    match BUILD_TAG {
        Some(tag) => format!("{VERSION}+{tag}"),
        None => VERSION.to_string(),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let args = cli::Args::parse_from(cli::normalize_qemu_spellings(argv.clone()));
    logger::init(args.verbose);
    let config = match cli::Config::from_args(args, argv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(1);
        }
    };
    match control::run(config) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(1)
        }
    }
}
