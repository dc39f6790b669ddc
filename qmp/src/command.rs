//! What the monitor needs to know about the commands it serves.

use serde_json::{Map, Value};

use crate::{MonitorFds, QmpError};

/// What a command returns: its `return` value or an error.
pub type CommandResult = Result<Value, QmpError>;

/// What the monitor needs to know about commands, implemented by the generated api crate.
pub trait CommandSet: Send + Sync + 'static {
    /// `None` when no such command exists.
    fn lookup(&self, name: &str) -> Option<CommandMeta>;
    /// Runs an allow-oob command on the monitor thread: no big lock, no guest RAM, no blocking call.
    /// `fds` are the named descriptors of the monitor the command came from.
    fn run_oob(
        &self,
        name: &str,
        arguments: Map<String, Value>,
        fds: &MonitorFds,
    ) -> Result<Value, QmpError>;
}

/// Static properties of one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandMeta {
    /// Whether the command may run out-of-band (`exec-oob`).
    pub allow_oob: bool,
}
