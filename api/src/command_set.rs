//! TEMPORARY stand-ins for `qmp::CommandSet` and `qmp::CommandMeta`, which the
//! qmp crate is about to export with exactly these shapes.  When they land,
//! delete this file and re-export the qmp items from lib.rs instead.

use qmp::QmpError;

/// What the monitor needs to know about a command before running it.
#[derive(Debug, Clone, Copy)]
pub struct CommandMeta {
    /// Whether the command may run out-of-band (`exec-oob`).
    pub allow_oob: bool,
}

/// The command table a QMP monitor serves.
pub trait CommandSet: Send + Sync + 'static {
    /// Looks a command up; `None` means the command does not exist.
    fn lookup(&self, name: &str) -> Option<CommandMeta>;
    /// Runs an out-of-band command on the monitor thread.
    fn run_oob(
        &self,
        name: &str,
        arguments: serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Value, QmpError>;
}
