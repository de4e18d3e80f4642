//! Errors.

use std::io;

/// A stream error and the byte offset where the offending item starts.
#[derive(Debug, thiserror::Error)]
#[error("at byte {offset}: {kind}")]
pub struct WireError {
    /// Offset from the start of the stream.
    pub offset: u64,
    /// What went wrong.
    pub kind: ErrorKind,
}

impl WireError {
    pub(crate) fn at(offset: u64, kind: ErrorKind) -> Self {
        WireError { offset, kind }
    }
}

/// What went wrong in a stream.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("the stream is truncated ({0})")]
    Truncated(&'static str),
    #[error("bad magic: not a tern migration stream")]
    BadMagic,
    #[error("format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("unknown mandatory header flags {0:#x}")]
    UnknownFlags(u32),
    #[error("page size {0} is not supported (version 1 uses 4096)")]
    BadPageSize(u32),
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    RecordChecksum { stored: u32, computed: u32 },
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("non-zero {0}")]
    NonZeroReserved(&'static str),
    #[error("unknown mandatory record type {0:#06x}")]
    UnknownRecordType(u16),
    #[error("record out of order: {0}")]
    Order(String),
    #[error("malformed {record}: {reason}")]
    Malformed {
        record: &'static str,
        reason: String,
    },
    #[error("bad VM description: {0}")]
    Description(String),
    #[error("RAM region {0} is not in the VM description")]
    UnknownRegion(u32),
    #[error("RAM run of {count} pages at page {first} is outside region {region} ({pages} pages)")]
    RunOutOfRange {
        region: u32,
        first: u64,
        count: u32,
        pages: u64,
    },
    #[error("cannot place RAM pages: {0}")]
    Placement(String),
    #[error("RAM encoding {0} is not supported")]
    UnsupportedEncoding(u8),
    #[error("END totals do not match: {0}")]
    Totals(String),
    #[error("data after the END record")]
    TrailingData,
    #[error(transparent)]
    State(#[from] StateError),
}

/// Errors of versioned device state, named after the section they concern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("device {device} cannot be migrated: {reason}")]
    NotMigratable { device: String, reason: String },
    #[error("expected section {expected}, got {found}")]
    WrongSection { expected: String, found: String },
    #[error("section {section} version {version} is newer than this build supports ({max})")]
    VersionTooNew {
        section: String,
        version: u32,
        max: u32,
    },
    #[error("section {section} version {version} is older than this build can load ({min})")]
    VersionTooOld {
        section: String,
        version: u32,
        min: u32,
    },
    #[error("section {section}: unknown field {field}")]
    UnknownField { section: String, field: String },
    #[error("section {section}: missing field {field}")]
    MissingField { section: String, field: String },
    #[error("section {section}: field {field} is {found}, expected {expected}")]
    WrongType {
        section: String,
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("section {section}: field {field} appears twice")]
    DuplicateField { section: String, field: String },
    #[error("section {section}: unknown subsection {subsection}")]
    UnknownSubsection { section: String, subsection: String },
    #[error("section {section}: subsection {subsection} version {version} is newer than this build supports ({max})")]
    SubsectionTooNew {
        section: String,
        subsection: String,
        version: u32,
        max: u32,
    },
    #[error("no section for device {section} instance {instance} in the stream")]
    MissingSection { section: String, instance: u32 },
    #[error("section {section} instance {instance} has no device here")]
    UnexpectedSection { section: String, instance: u32 },
    #[error("section {section} instance {instance} appears twice")]
    DuplicateSection { section: String, instance: u32 },
    #[error("section {section}: {reason}")]
    Invalid { section: String, reason: String },
}
