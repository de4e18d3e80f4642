//! A QMP-compatible control socket.
//!
//! Speaks QEMU's wire protocol: the greeting, capabilities negotiation, one JSON object per line
//! in each direction (CRLF-terminated, QEMU's spacing), `id` echoed, errors as
//! `{"error": {"class", "desc"}}`, events with a timestamp. The commands themselves are the
//! [`Backend`]'s; this crate owns the session rules.

mod commands;
mod format;
pub mod listen;
mod server;

pub use commands::{CapabilityState, Command, COMMAND_NAMES};
pub use format::to_qemu_json;
pub use server::{Backend, QmpError, Server};
