//! One clock for blackout accounting across processes.
//!
//! `CLOCK_MONOTONIC` is system-wide and keeps running across `exec`, so a timestamp taken by the
//! old VMM can be subtracted from one taken by the shim or the new VMM.

use nix::time::{ClockId, clock_gettime};
use serde::{Deserialize, Serialize};

/// Nanoseconds on `CLOCK_MONOTONIC`.
pub fn monotonic_ns() -> u64 {
    // clock_gettime fails only for a clock that does not exist or a bad buffer, and
    // CLOCK_MONOTONIC always exists on Linux: the 0 is never used.
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64
    })
}

/// Nanoseconds since the Unix epoch on `CLOCK_REALTIME` (for event timestamps and logs).
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A named phase of a live update and how long it took.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub ns: u64,
}

/// Records consecutive phases: each `mark` closes the phase that started at the previous mark.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseLog {
    /// Monotonic time of the last mark.
    pub last_mark_ns: u64,
    pub phases: Vec<Phase>,
}

impl PhaseLog {
    pub fn starting_now() -> Self {
        Self::starting_at(monotonic_ns())
    }

    pub fn starting_at(ns: u64) -> Self {
        PhaseLog {
            last_mark_ns: ns,
            phases: Vec::new(),
        }
    }

    /// Ends the current phase, naming it, and starts the next one.
    pub fn mark(&mut self, name: &str) {
        self.mark_at(name, monotonic_ns());
    }

    pub fn mark_at(&mut self, name: &str, now_ns: u64) {
        self.phases.push(Phase {
            name: name.to_string(),
            ns: now_ns.saturating_sub(self.last_mark_ns),
        });
        self.last_mark_ns = now_ns;
    }

    pub fn total_ns(&self) -> u64 {
        self.phases.iter().map(|p| p.ns).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_consecutive() {
        let mut log = PhaseLog::starting_at(100);
        log.mark_at("a", 150);
        log.mark_at("b", 400);
        assert_eq!(
            log.phases[0],
            Phase {
                name: "a".into(),
                ns: 50
            }
        );
        assert_eq!(log.phases[1].ns, 250);
        assert_eq!(log.total_ns(), 300);
        assert_eq!(log.last_mark_ns, 400);
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}
