//! Migration state as the monitor sees it. Read and changed with atomics only, so the
//! out-of-band commands (`migrate-pause`, `migrate-recover`) can act on it from the monitor
//! thread without the big lock. Until live migration lands, no migration ever starts and both
//! commands answer QEMU's errors for the `none` state.

use std::sync::atomic::{AtomicU8, Ordering};

use api::MigrationStatus;
use qmp::QmpError;

/// QEMU's text when `migrate-pause` is used outside postcopy (QEMU 9.1 and later).
const PAUSE_WRONG_STATE: &str =
    "migrate-pause is currently only supported during postcopy-active or postcopy-recover state";
/// QEMU's text when `migrate-recover` is used while postcopy is not paused.
const RECOVER_WRONG_STATE: &str = "Migrate recover can only be run when postcopy is paused.";

/// The VM's migration status, shared by the monitor thread and the VMM.
#[derive(Debug)]
pub struct MigrationState {
    status: AtomicU8,
}

impl Default for MigrationState {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrationState {
    /// No migration has happened.
    pub fn new() -> Self {
        MigrationState {
            status: AtomicU8::new(Self::encode(MigrationStatus::None)),
        }
    }

    fn encode(status: MigrationStatus) -> u8 {
        MigrationStatus::ALL
            .iter()
            .position(|s| *s == status)
            .unwrap_or(0) as u8
    }

    /// The current status.
    pub fn status(&self) -> MigrationStatus {
        let index = usize::from(self.status.load(Ordering::Acquire));
        MigrationStatus::ALL
            .get(index)
            .copied()
            .unwrap_or(MigrationStatus::None)
    }

    /// `migrate-pause`: breaks a postcopy migration's connection on purpose.
    pub fn pause(&self) -> Result<(), QmpError> {
        match self.status() {
            MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover => Err(
                QmpError::generic("postcopy migration is not available in this build"),
            ),
            _ => Err(QmpError::generic(PAUSE_WRONG_STATE)),
        }
    }

    /// `migrate-recover`: listens on `uri` for the source to resume a paused postcopy.
    pub fn recover(&self, _uri: &str) -> Result<(), QmpError> {
        match self.status() {
            MigrationStatus::PostcopyPaused => Err(QmpError::generic(
                "postcopy migration is not available in this build",
            )),
            _ => Err(QmpError::generic(RECOVER_WRONG_STATE)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_refuse_without_a_migration() {
        let state = MigrationState::new();
        assert_eq!(state.status(), MigrationStatus::None);
        assert_eq!(state.pause().unwrap_err().desc, PAUSE_WRONG_STATE);
        assert_eq!(
            state.recover("unix:/x").unwrap_err().desc,
            RECOVER_WRONG_STATE
        );
    }
}
