//! QEMU Machine Protocol: wire protocol, monitors and dispatch.
//!
//! - [`json`]: QEMU-compatible streaming JSON parser and writer.
//! - [`request`], [`session`], [`capabilities`]: request validation and
//!   negotiation, independent of any transport.
//! - [`server`]: the monitor thread serving unix/tcp sockets.

#![deny(missing_docs)]

pub mod capabilities;
pub mod command;
pub mod error;
pub mod json;
pub mod message;
pub mod request;
pub mod server;
pub mod session;

pub use command::{CommandMeta, CommandResult, CommandSet};
pub use error::{ErrorClass, QmpError};
pub use message::VersionInfo;
pub use server::{CommandFds, ListenAddr, MonitorFds, QmpServer, ServerConfig, ServerError};
