//! A small stderr logger: quiet by default (warnings and errors), `-v`/`-vv`/`-vvv` or
//! `VMM_LOG=info|debug|trace` for more. Lines carry a timestamp (seconds since boot, or UTC
//! wall-clock time with `--log-timestamps wall` or `VMM_LOG_TIMESTAMPS=wall`) and the PID, which
//! stays the same across live updates, so one log reads as one VM's history.

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

/// What the timestamp at the start of each line counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Timestamps {
    /// `[  12.345678]`: seconds since the host booted (CLOCK_MONOTONIC), as the kernel logs.
    Monotonic,
    /// `2026-12-06T04:05:06.123456Z`: UTC wall-clock time, to line up with other logs.
    Wall,
}

/// Set once at start; 1 means wall-clock.
static WALL_CLOCK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Chooses the timestamps of the lines logged from now on. `VMM_LOG_TIMESTAMPS=wall` in the
/// environment asks for wall-clock time too (it also covers the lines before the command line
/// is read).
pub fn set_timestamps(kind: Timestamps) {
    let wall = kind == Timestamps::Wall || env_wants_wall();
    WALL_CLOCK.store(wall, std::sync::atomic::Ordering::Relaxed);
}

fn env_wants_wall() -> bool {
    std::env::var("VMM_LOG_TIMESTAMPS").is_ok_and(|v| v == "wall")
}

/// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` for a time since the Unix epoch (days to a civil date with
/// the usual era arithmetic of the proleptic Gregorian calendar).
fn utc_text(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        since_epoch.subsec_micros()
    )
}

fn timestamp() -> String {
    if WALL_CLOCK.load(std::sync::atomic::Ordering::Relaxed) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return utc_text(now);
    }
    let ns = cpr_common::timing::monotonic_ns();
    format!("[{:>6}.{:06}]", ns / 1_000_000_000, (ns / 1000) % 1_000_000)
}

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
        let name = VM_NAME.get().map(String::as_str).unwrap_or("");
        eprintln!(
            "{} vmm[{}]{}{} {:<5} {}",
            timestamp(),
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
    if env_wants_wall() {
        set_timestamps(Timestamps::Wall);
    }
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_text_is_rfc3339() {
        assert_eq!(utc_text(Duration::ZERO), "1970-01-01T00:00:00.000000Z");
        // 2026-12-06T04:05:06.5Z
        assert_eq!(
            utc_text(Duration::from_millis(1_796_529_906_500)),
            "2026-12-06T04:05:06.500000Z"
        );
        // A leap day.
        assert_eq!(
            utc_text(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000Z"
        );
    }
}
