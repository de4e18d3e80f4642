use std::io;

/// Errors of the VMM. Messages do not repeat their source: print with `{:#}` for the chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}")]
    OpenKvm { path: String, source: io::Error },
    #[error("{path} is not a usable KVM device")]
    NotKvm { path: String, source: io::Error },
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("{0}")]
    InvalidConfig(String),
    #[error("cannot create guest memory: {0}")]
    Memory(String),
    #[error("cannot read the kernel {path}")]
    KernelFile { path: String, source: io::Error },
    #[error("cannot load the kernel: {0}")]
    KernelLoad(String),
    #[error("{what}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{what}")]
    Io { what: String, source: io::Error },
}

/// Result of VMM operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Wraps a KVM ioctl failure with what was being done.
pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}
