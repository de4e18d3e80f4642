//! The tern migration stream (`docs/stream-format.md`): framing, record types, versioned device
//! state and a validating streaming decoder.
//!
//! Pure Rust over [`std::io::Read`]/[`std::io::Write`]; no OS calls, no unsafe code, no KVM. A
//! decoder holds at most one record body in memory, checks every length against the limits before
//! trusting it, and reports every problem as a [`WireError`] with the byte offset it starts at.

#![forbid(unsafe_code)]

mod compress;
mod control;
mod desc;
mod error;
mod frame;
pub mod inspect;
pub mod mapped;
mod mapped_file;
mod postcopy;
mod ram;
mod state;
mod stream;
mod writer;

pub use compress::{decompress_run, Compression, Compressor};
pub use control::{
    ChannelHello, ChannelRole, ReturnMessage, MAX_RECEIVED_WORDS, MAX_RETURN_MESSAGE,
};
pub use crc32c::crc32c;
pub use desc::{FieldDesc, RamRegionDesc, SectionDesc, SubsectionDesc, VmDescription};
pub use error::{ErrorKind, StateError, WireError};
pub use frame::{
    record_size, PagePlacer, RawRecord, RecordReader, RecordWriter, FLAG_HANDOVER, FLAG_MAPPED,
};
pub use mapped_file::{write_mapped, MappedFile, STATE_RESERVE};
pub use postcopy::{PostcopyCommand, MAX_DISCARD_RANGES};
pub use ram::{
    encoding_name, RamRecord, RamRun, RunData, RunRef, ENC_LZ4, ENC_RAW, ENC_XOR_DELTA, ENC_ZERO,
    ENC_ZSTD, MAX_COMPRESSED_PAGES,
};
pub use state::{
    check_sections, load_all, save_all, FieldSpec, FieldType, MigratableState, Schema, Section,
    SectionBuilder, SectionReader, Subsection, SubsectionBuilder, SubsectionReader, SubsectionSpec,
    Value,
};
pub use stream::{Record, StreamReader, StreamWriter, Totals, MAX_SKIPPED_KEPT};

/// Stream magic.
pub const MAGIC: [u8; 8] = *b"TERNSTRM";
/// Format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Page size of version 1.
pub const PAGE_SIZE: usize = 4096;
/// Size of the stream header.
pub const HEADER_LEN: usize = 32;

/// Record types.
pub mod record_type {
    pub const VM_DESCRIPTION: u16 = 0x0001;
    pub const RAM_PAGES: u16 = 0x0002;
    pub const DEVICE_STATE: u16 = 0x0003;
    pub const POSTCOPY_COMMAND: u16 = 0x0004;
    pub const RETURN_MESSAGE: u16 = 0x0005;
    pub const SOURCE_INFO: u16 = 0x0006;
    pub const PING: u16 = 0x0007;
    pub const GO: u16 = 0x0008;
    pub const CHANNEL_HELLO: u16 = 0x0009;
    pub const PARTICIPANT_DATA: u16 = 0x000a;
    pub const SYNC: u16 = 0x000b;
    pub const NOP: u16 = 0x000c;
    pub const MAPPED_RAM: u16 = 0x000d;
    pub const PAGE_CRCS: u16 = 0x000e;
    pub const END: u16 = 0x00ff;

    /// A human name for a record type.
    pub fn name(ty: u16) -> &'static str {
        match ty {
            VM_DESCRIPTION => "VM_DESCRIPTION",
            RAM_PAGES => "RAM_PAGES",
            DEVICE_STATE => "DEVICE_STATE",
            POSTCOPY_COMMAND => "POSTCOPY_COMMAND",
            RETURN_MESSAGE => "RETURN_MESSAGE",
            SOURCE_INFO => "SOURCE_INFO",
            PING => "PING",
            GO => "GO",
            CHANNEL_HELLO => "CHANNEL_HELLO",
            PARTICIPANT_DATA => "PARTICIPANT_DATA",
            SYNC => "SYNC",
            NOP => "NOP",
            MAPPED_RAM => "MAPPED_RAM",
            PAGE_CRCS => "PAGE_CRCS",
            END => "END",
            _ => "unknown",
        }
    }
}

/// Record flag: a decoder that does not know the type may skip the record.
pub const FLAG_OPTIONAL: u16 = 1;

/// Decoder limits (see the spec's table).
pub mod limits {
    /// Largest record body.
    pub const MAX_RECORD: usize = 16 << 20;
    /// Largest VM description.
    pub const MAX_DESCRIPTION: usize = 1 << 20;
    /// Most RAM regions.
    pub const MAX_REGIONS: usize = 64;
    /// Most sections in a description and in a stream.
    pub const MAX_SECTIONS: usize = 4096;
    /// Most runs in one RAM_PAGES record.
    pub const MAX_RUNS: usize = 65_536;
    /// Most fields in a section or subsection.
    pub const MAX_FIELDS: usize = 1024;
    /// Most subsections per level.
    pub const MAX_SUBSECTIONS: usize = 256;
    /// Deepest subsection nesting.
    pub const MAX_DEPTH: usize = 4;
    /// Longest name.
    pub const MAX_NAME: usize = 255;
}
