//! A small stderr logger: quiet by default (warnings and errors), `-v`/`-vv`/`-vvv` or
//! `VMM_LOG=info|debug|trace` for more. Lines carry a monotonic timestamp and the PID, which
//! stays the same across live updates, so one log reads as one VM's history.

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

/// The VM's name (-name), shown in every line.
static VM_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ns = cpr_common::timing::monotonic_ns();
        let name = VM_NAME.get().map(String::as_str).unwrap_or("");
        eprintln!(
            "[{:>6}.{:06}] vmm[{}]{}{} {:<5} {}",
            ns / 1_000_000_000,
            (ns / 1000) % 1_000_000,
            std::process::id(),
            if name.is_empty() { "" } else { " " },
            name,
            record.level(),
            record.args()
        );
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

pub fn init(verbose: u8, name: Option<&str>) {
    if let Some(name) = name {
        let _ = VM_NAME.set(name.to_string());
    }
    let from_flag = match verbose {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    let from_env = std::env::var("VMM_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok());
    let level = from_env.map_or(from_flag, |e| e.max(from_flag));
    // A second init (never expected) keeps the first logger.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
