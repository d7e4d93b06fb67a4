//! The VMM's run state (`query-status`), and the one place it changes.
//!
//! Every change goes through [`Vmm::set_run_state`], which refuses a transition the table below
//! does not allow, so a bug in a migration mode shows as a clear error instead of a VM that
//! reports `running` while its vCPUs are stopped. The table is QEMU's (`runstate_transitions_def`
//! in `system/runstate.c`) restricted to the states this VMM uses.

use super::Vmm;
use crate::qmp::protocol::{QmpError, RunState};

/// A run-state change the table does not allow.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid run state transition: '{}' -> '{}'", from.as_str(), to.as_str())]
pub struct RunStateError {
    pub from: RunState,
    pub to: RunState,
}

impl From<RunStateError> for QmpError {
    fn from(e: RunStateError) -> Self {
        QmpError::generic(e.to_string())
    }
}

/// Whether the machine may go from `from` to `to`. Staying in a state is always allowed.
pub fn allowed(from: RunState, to: RunState) -> bool {
    use RunState::*;
    if from == to {
        return true;
    }
    match from {
        Prelaunch => matches!(
            to,
            Running | Paused | Inmigrate | FinishMigrate | InternalError | Shutdown
        ),
        Inmigrate => matches!(to, Running | Paused | InternalError | Shutdown),
        Running => matches!(to, Paused | FinishMigrate | InternalError | Shutdown),
        Paused => matches!(
            to,
            Running | FinishMigrate | Postmigrate | InternalError | Shutdown
        ),
        FinishMigrate => matches!(
            to,
            Running | Paused | Postmigrate | InternalError | Shutdown
        ),
        Postmigrate => matches!(
            to,
            Running | Paused | FinishMigrate | InternalError | Shutdown
        ),
        InternalError => matches!(to, Running | Paused | FinishMigrate | Shutdown),
        Shutdown => matches!(to, Paused | FinishMigrate),
        _ => false,
    }
}

impl Vmm {
    /// Moves to `to`, or refuses (and logs) a transition the table does not allow.
    pub(crate) fn set_run_state(&mut self, to: RunState) -> Result<(), RunStateError> {
        let from = self.run_state;
        if !allowed(from, to) {
            let e = RunStateError { from, to };
            log::error!("{e} refused");
            return Err(e);
        }
        if from != to {
            log::debug!("run state: {} -> {}", from.as_str(), to.as_str());
        }
        self.run_state = to;
        Ok(())
    }

    pub(crate) fn run_state(&self) -> RunState {
        self.run_state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunState::*;

    const USED: [RunState; 8] = [
        Prelaunch,
        Inmigrate,
        Running,
        Paused,
        FinishMigrate,
        Postmigrate,
        InternalError,
        Shutdown,
    ];

    #[test]
    fn every_path_the_vmm_takes_is_allowed() {
        let paths: &[&[RunState]] = &[
            // boot, stop, cont, quit
            &[Prelaunch, Running, Paused, Running, Shutdown],
            // -incoming file/defer, restored running or paused
            &[Prelaunch, Inmigrate, Running],
            &[Prelaunch, Inmigrate, Paused, Running],
            // migrate to file, then cont (QEMU allows it) or a second migrate
            &[Running, FinishMigrate, Postmigrate, Running],
            &[
                Paused,
                FinishMigrate,
                Postmigrate,
                FinishMigrate,
                Postmigrate,
            ],
            // a failed save resumes the guest, or leaves it paused
            &[Running, FinishMigrate, Running],
            &[Running, FinishMigrate, Paused],
            // cpr-transfer from a paused guest hands over without finish-migrate
            &[Paused, Postmigrate],
            // a vCPU failure, then reset and cont
            &[Running, InternalError, Running],
            &[Paused, InternalError, Shutdown],
        ];
        for path in paths {
            for pair in path.windows(2) {
                assert!(allowed(pair[0], pair[1]), "{:?} -> {:?}", pair[0], pair[1]);
            }
        }
    }

    #[test]
    fn impossible_transitions_are_refused() {
        for (from, to) in [
            (Shutdown, Running),
            (Postmigrate, Inmigrate),
            (Running, Inmigrate),
            (Running, Postmigrate),
            (Inmigrate, Postmigrate),
            (Inmigrate, FinishMigrate),
            (Running, Prelaunch),
        ] {
            assert!(!allowed(from, to), "{from:?} -> {to:?}");
        }
        for s in USED {
            assert!(allowed(s, s));
            assert!(!allowed(s, Prelaunch) || s == Prelaunch);
        }
    }

    #[test]
    fn the_refusal_names_both_states() {
        let e = RunStateError {
            from: Shutdown,
            to: Running,
        };
        assert_eq!(
            e.to_string(),
            "invalid run state transition: 'shutdown' -> 'running'"
        );
    }
}
