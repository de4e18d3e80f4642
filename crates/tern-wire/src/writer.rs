//! Writing a stream (`docs/stream-format.md`): the header, then records, END with the totals.

use std::io::Write;

use crate::desc::VmDescription;
use crate::error::{ErrorKind, WireError};
use crate::frame::RecordWriter;
use crate::ram::{self, RamRun};
use crate::record_type as rt;
use crate::state::Section;
use crate::stream::Totals;
use crate::PostcopyCommand;
use crate::{limits, FLAG_OPTIONAL};

/// Writes a stream. Wrap a socket or file in a `BufWriter`: small headers are written as-is.
pub struct StreamWriter<W: Write> {
    w: RecordWriter<W>,
    totals: Totals,
}

impl<W: Write> StreamWriter<W> {
    /// Starts a stream (writes its header).
    pub fn new(w: W) -> Result<Self, WireError> {
        let mut w = RecordWriter::new(w);
        w.write_stream_header(0)?;
        Ok(StreamWriter {
            w,
            totals: Totals::default(),
        })
    }

    /// Starts a stream whose guest memory is handed over, not sent (header flag HANDOVER: a
    /// reader that does not know it refuses the stream).
    pub fn new_handover(w: W) -> Result<Self, WireError> {
        let mut w = RecordWriter::new(w);
        w.write_stream_header(crate::FLAG_HANDOVER)?;
        Ok(StreamWriter {
            w,
            totals: Totals::default(),
        })
    }

    /// Starts a mapped-layout file's records (header flag MAPPED).
    pub fn new_mapped(w: W) -> Result<Self, WireError> {
        let mut w = RecordWriter::new(w);
        w.write_stream_header(crate::FLAG_MAPPED)?;
        Ok(StreamWriter {
            w,
            totals: Totals::default(),
        })
    }

    /// Mapped layout: where the pages are (right after the description).
    pub fn mapped_ram(&mut self, m: &crate::mapped::MappedRam) -> Result<(), WireError> {
        self.record(rt::MAPPED_RAM, 0, &[&m.encode()]).map(drop)
    }

    /// Mapped layout: the CRCs of pages `first_page..` of `region` (counted into END's totals
    /// and digest).
    pub fn page_crcs(
        &mut self,
        region: u32,
        first_page: u64,
        crcs: &[u32],
    ) -> Result<(), WireError> {
        let body = crate::mapped::encode_page_crcs(region, first_page, crcs);
        let crc = self.record(rt::PAGE_CRCS, 0, &[&body])?;
        let zero = crate::mapped::zero_page_crc();
        let zeros = crcs.iter().filter(|&&c| c == zero).count() as u64;
        self.totals.zero_pages += zeros;
        self.totals.raw_pages += crcs.len() as u64 - zeros;
        self.totals.digest = crc32c::crc32c_append(self.totals.digest, &crc.to_le_bytes());
        Ok(())
    }

    fn record(&mut self, ty: u16, flags: u16, parts: &[&[u8]]) -> Result<u32, WireError> {
        let crc = self.w.write_parts(ty, flags, parts)?;
        self.totals.records += 1;
        Ok(crc)
    }

    /// The VM description (first record).
    pub fn description(&mut self, d: &VmDescription) -> Result<(), WireError> {
        d.validate()
            .map_err(|e| WireError::at(self.w.offset(), ErrorKind::Description(e)))?;
        let json = serde_json::to_vec(d)
            .map_err(|e| WireError::at(self.w.offset(), ErrorKind::Description(e.to_string())))?;
        if json.len() > limits::MAX_DESCRIPTION {
            return Err(WireError::at(
                self.w.offset(),
                ErrorKind::TooLarge {
                    what: "VM description",
                    len: json.len() as u64,
                    max: limits::MAX_DESCRIPTION as u64,
                },
            ));
        }
        self.record(rt::VM_DESCRIPTION, 0, &[&json]).map(drop)
    }

    /// Source information, as an optional record.
    pub fn source_info(&mut self, info: &serde_json::Value) -> Result<(), WireError> {
        let json = serde_json::to_vec(info)
            .map_err(|e| WireError::at(self.w.offset(), ErrorKind::Description(e.to_string())))?;
        self.record(rt::SOURCE_INFO, FLAG_OPTIONAL, &[&json])
            .map(drop)
    }

    /// One RAM_PAGES record of `region`.
    pub fn ram_pages(&mut self, region: u32, runs: &[RamRun<'_>]) -> Result<(), WireError> {
        let (headers, ends) =
            ram::encode_headers(region, runs).map_err(|k| WireError::at(self.w.offset(), k))?;
        let parts = ram::body_parts(&headers, &ends, runs);
        let crc = self.record(rt::RAM_PAGES, 0, &parts)?;
        self.totals.digest = crc32c::crc32c_append(self.totals.digest, &crc.to_le_bytes());
        for r in runs {
            match r.data {
                crate::RunData::Raw(_) | crate::RunData::Compressed { .. } => {
                    self.totals.raw_pages += r.pages()
                }
                crate::RunData::Zero(_) => self.totals.zero_pages += r.pages(),
            }
        }
        Ok(())
    }

    /// One device section.
    pub fn section(&mut self, s: &Section) -> Result<(), WireError> {
        let body = s.encode().map_err(|k| WireError::at(self.w.offset(), k))?;
        self.record(rt::DEVICE_STATE, 0, &[&body]).map(drop)
    }

    /// A PING: a live target acknowledges it once everything before it is loaded.
    pub fn ping(&mut self, sequence: u64) -> Result<(), WireError> {
        self.record(rt::PING, 0, &[&sequence.to_le_bytes()])
            .map(drop)
    }

    /// SYNC: every page of `round` on this (data) channel came before it.
    pub fn sync(&mut self, round: u64) -> Result<(), WireError> {
        self.record(rt::SYNC, 0, &[&round.to_le_bytes()]).map(drop)
    }

    /// NOP: nothing, OPTIONAL (a keepalive on a channel that has nothing else to say).
    pub fn nop(&mut self) -> Result<(), WireError> {
        self.record(rt::NOP, FLAG_OPTIONAL, &[]).map(drop)
    }

    /// A postcopy command.
    pub fn postcopy(&mut self, c: &PostcopyCommand) -> Result<(), WireError> {
        self.record(rt::POSTCOPY_COMMAND, 0, &[&c.encode()])
            .map(drop)
    }

    /// Data of an iterative participant other than RAM (`name`: 1..=255 bytes).
    pub fn participant_data(&mut self, name: &str, data: &[u8]) -> Result<(), WireError> {
        let n = u8::try_from(name.len())
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                WireError::at(
                    self.w.offset(),
                    ErrorKind::Malformed {
                        record: "PARTICIPANT_DATA",
                        reason: format!("participant name of {} bytes", name.len()),
                    },
                )
            })?;
        self.record(rt::PARTICIPANT_DATA, 0, &[&[n], name.as_bytes(), data])
            .map(drop)
    }

    /// Any record, as is (for tools and tests).
    pub fn raw_record(&mut self, ty: u16, flags: u16, body: &[u8]) -> Result<(), WireError> {
        self.record(ty, flags, &[body]).map(drop)
    }

    /// Writes END and flushes; returns the writer and the totals.
    pub fn finish(mut self) -> Result<(W, Totals), WireError> {
        let totals = self.totals;
        self.w.write(rt::END, 0, &totals.encode())?;
        self.w.flush()?;
        Ok((self.w.into_inner(), totals))
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.w.offset()
    }

    /// Totals so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// The underlying writer (to flush a socket between rounds).
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.w.flush()
    }
}
