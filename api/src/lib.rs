//! Skiff's QMP schema and the code generated from it.
//!
//! The schema in `api/schema/*.json` (QEMU's schema language) is the single
//! source of truth.  `build.rs` turns it into:
//!
//! - typed structs and enums with QAPI wire names (this crate's root);
//! - [`InBandCommands`] and [`OobCommands`]: one handler method per command;
//! - [`dispatch_inband`] / [`dispatch_oob`]: argument checking with QEMU's error
//!   texts, the handler call, and conversion of the answer;
//! - [`Commands`], the [`CommandSet`] a QMP monitor serves;
//! - [`COMMAND_NAMES`] / [`command_names`] for `query-commands` and
//!   [`qmp_schema`] for `query-qmp-schema`;
//! - [`Event`], with the wire name and data of every event.
//!
//! Adding a command means adding its definition to the schema and implementing
//! the new trait method; see the top of `api/schema/qapi-schema.json`, which
//! also states the out-of-band contract.

#![warn(missing_docs)]

pub mod visit;

pub use qmp::{CommandMeta, CommandSet};

include!(concat!(env!("OUT_DIR"), "/qapi_generated.rs"));

/// The names of all commands, for `query-commands`.
pub fn command_names() -> &'static [&'static str] {
    COMMAND_NAMES
}

/// The `query-qmp-schema` answer: one SchemaInfo object per command, event and
/// used type, computed at build time by QEMU's introspection rules.
pub fn qmp_schema() -> serde_json::Value {
    static SCHEMA: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            serde_json::from_str(QMP_SCHEMA_JSON).unwrap_or(serde_json::Value::Array(Vec::new()))
        })
        .clone()
}

/// The [`CommandSet`] of this schema: command lookup from the generated table,
/// and out-of-band execution through the wrapped [`OobCommands`] context.
pub struct Commands<H: OobCommands>(pub H);

impl<H: OobCommands> CommandSet for Commands<H> {
    fn lookup(&self, name: &str) -> Option<CommandMeta> {
        command_meta(name)
    }

    fn run_oob(
        &self,
        name: &str,
        arguments: serde_json::Map<String, serde_json::Value>,
        fds: &qmp::MonitorFds,
    ) -> Result<serde_json::Value, qmp::QmpError> {
        dispatch_oob(&self.0, name, arguments, fds)
    }
}

#[cfg(test)]
#[allow(dead_code)]
#[path = "../codegen/mod.rs"]
mod codegen;

#[cfg(test)]
mod tests;
