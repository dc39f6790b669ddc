//! QEMU-compatible JSON: a streaming parser fed arbitrary byte chunks and a
//! writer producing QEMU's exact wire bytes.
//!
//! Values are `serde_json::Value`; objects keep members in wire order
//! (`preserve_order`), and the writer re-orders them the way a QEMU `QDict`
//! iterates.

mod float;
pub mod ghash;
mod lexer;
mod parser;
pub mod qdict;
mod streamer;
mod utf8;
mod writer;

pub use streamer::{JsonStreamer, Message, MAX_NESTING, MAX_TOKEN_COUNT, MAX_TOKEN_SIZE};
pub use writer::{to_line, write_value};
