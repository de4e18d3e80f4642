//! A QMP-compatible control socket.
//!
//! Speaks QEMU's wire protocol: the greeting, capabilities negotiation, JSON objects read as a
//! stream (several per line or none, see [`json_stream`]) and written one per line
//! (CRLF-terminated, QEMU's spacing), `id` echoed, errors as `{"error": {"class", "desc"}}`,
//! events with a timestamp, queued so that no client can hold up the VM. The commands themselves are the
//! [`Backend`]'s; this crate owns the session rules.

mod client;
mod commands;
mod format;
pub mod json_stream;
pub mod listen;
mod server;

pub use commands::{CapabilityState, Command, COMMAND_NAMES};
pub use format::to_qemu_json;
pub use server::{Backend, QmpError, Server};
