use tern_wire::{StateError, WireError};

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration stream: {0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    State(#[from] StateError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid migration URI '{0}': expected tcp:HOST:PORT, unix:PATH, fd:NAME, exec:COMMAND or file:PATH")]
    BadUri(String),
    #[error("the target refused the migration: {0}")]
    TargetRefused(String),
    #[error("the target closed the connection before acknowledging")]
    NoAck,
    #[error("the switch-over is in doubt: {0}; the target may be running the guest: check it before `cont` here")]
    InDoubt(String),
    #[error("migration cancelled")]
    Cancelled,
    #[error("{0}")]
    Vm(String),
    #[error("precopy did not converge: {0}")]
    NotConverging(String),
    #[error("the stream does not match this machine: {0}")]
    Mismatch(String),
    /// Postcopy, after RUN: the other side is gone, and with it the half of the guest it held.
    #[error("the guest is lost: {0}")]
    GuestLost(String),
    /// Postcopy, after RUN: the other side stopped answering; this side keeps its half.
    #[error("postcopy paused: {0}")]
    PostcopyPaused(String),
}

impl MigrateError {
    /// A panic in a migration thread, as an error (`payload` from `catch_unwind`).
    pub(crate) fn panicked(payload: Box<dyn std::any::Any + Send>) -> MigrateError {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        MigrateError::Vm(format!(
            "internal error (a panic in the migration thread: {what})"
        ))
    }

    /// Whether a read or write hit its socket's timeout.
    pub(crate) fn is_timeout(&self) -> bool {
        let io = match self {
            MigrateError::Wire(w) => match &w.kind {
                tern_wire::ErrorKind::Io(io) => io,
                _ => return false,
            },
            MigrateError::Io { source, .. } => source,
            _ => return false,
        };
        matches!(
            io.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrateError {
        let what = what.into();
        move |source| MigrateError::Io { what, source }
    }
}
