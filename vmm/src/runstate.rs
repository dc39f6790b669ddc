//! The VM's run state, with QEMU's names (qapi/run-state.json `RunState`).

/// What the VM as a whole is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Created with `-S`/`--paused`: never run yet.
    Prelaunch,
    /// vCPUs are running.
    Running,
    /// Stopped by the host (library call or QMP `stop`).
    Paused,
    /// The guest shut down, or the host asked it to end.
    Shutdown,
    /// KVM could not continue running a vCPU (for example an emulation failure).
    InternalError,
    /// Waiting for (or loading) an incoming migration.
    Inmigrate,
    /// Stopped for the switch-over of an outgoing migration.
    FinishMigrate,
    /// An outgoing migration completed; the guest now runs elsewhere.
    Postmigrate,
}

impl RunState {
    /// QEMU's name for the state, as `query-status` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
            RunState::InternalError => "internal-error",
            RunState::Inmigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::Postmigrate => "postmigrate",
        }
    }

    /// Whether vCPUs execute guest code in this state.
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
