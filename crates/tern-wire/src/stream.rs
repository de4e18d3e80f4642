//! Streams: a writer that frames records and keeps the totals, and a reader that enforces the
//! format's ordering, limits, region bounds, section rules and END totals.

use std::collections::HashSet;
use std::io::Read;

use crate::desc::VmDescription;
use crate::error::{ErrorKind, WireError};
use crate::frame::RecordReader;
use crate::ram::{self, RamRecord};
use crate::record_type as rt;
use crate::state::Section;
pub use crate::writer::StreamWriter;
use crate::PostcopyCommand;
use crate::{limits, FLAG_OPTIONAL};

/// The totals an END record carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Records before END.
    pub records: u64,
    /// Pages sent as data.
    pub raw_pages: u64,
    /// Pages sent as zero ranges.
    pub zero_pages: u64,
    /// CRC chained over the CRCs of all RAM_PAGES records, in order.
    pub digest: u32,
}

impl Totals {
    pub(crate) fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.records.to_le_bytes());
        b[8..16].copy_from_slice(&self.raw_pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.zero_pages.to_le_bytes());
        b[24..28].copy_from_slice(&self.digest.to_le_bytes());
        b
    }

    fn decode(body: &[u8]) -> Result<Totals, ErrorKind> {
        if body.len() != 32 {
            return Err(ErrorKind::Malformed {
                record: "END",
                reason: format!("body is {} bytes, not 32", body.len()),
            });
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8"));
        if body[28..32] != [0; 4] {
            return Err(ErrorKind::NonZeroReserved("END reserved field"));
        }
        Ok(Totals {
            records: u64_at(0),
            raw_pages: u64_at(8),
            zero_pages: u64_at(16),
            digest: u32::from_le_bytes(body[24..28].try_into().expect("4")),
        })
    }
}

/// A decoded record.
#[derive(Debug)]
pub enum Record<'a> {
    /// The VM description (also kept by the reader: [`StreamReader::description`]).
    Description,
    Ram(RamRecord<'a>),
    Section(Section),
    Postcopy(PostcopyCommand),
    SourceInfo(serde_json::Value),
    /// A PING with its sequence.
    Ping(u64),
    /// Data of an iterative participant other than RAM (PARTICIPANT_DATA).
    Participant {
        name: &'a str,
        data: &'a [u8],
    },
    /// The end of a round on a data channel (rounds strictly increase).
    Sync(u64),
    /// A keepalive.
    Nop,
    /// An OPTIONAL record of a type this build does not know, skipped.
    SkippedOptional {
        ty: u16,
        len: usize,
    },
    /// Mapped layout: where the pages are in the file.
    MappedRam(crate::mapped::MappedRam),
    /// Mapped layout: the CRCs of pages `first_page..` of `region` (little-endian u32s).
    PageCrcs {
        region: u32,
        first_page: u64,
        crcs: &'a [u8],
    },
    End(Totals),
}

/// Reads and validates a stream, one record at a time, in bounded memory.
pub struct StreamReader<R: Read> {
    r: RecordReader<R>,
    desc: Option<VmDescription>,
    region_pages: Vec<(u32, u64)>,
    declared: HashSet<(String, u32)>,
    seen_sections: HashSet<(String, u32)>,
    totals: Totals,
    ended: bool,
    skipped: Vec<(u64, u16)>,
    skipped_total: u64,
    last_sync: Option<u64>,
    check_trailing: bool,
    /// A mapped-layout file (header flag MAPPED): its records' checks.
    mapped: Option<crate::mapped::Check>,
}

/// Skipped OPTIONAL records whose place is kept (the rest are only counted): any stream decodes
/// in bounded memory.
pub const MAX_SKIPPED_KEPT: usize = 64;

impl<R: Read> StreamReader<R> {
    /// Reads and checks the stream header.
    pub fn new(r: R) -> Result<Self, WireError> {
        let mut r = RecordReader::new(r);
        let flags = r.read_stream_header()?;
        Ok(StreamReader {
            mapped: (flags & crate::frame::FLAG_MAPPED != 0).then(Default::default),
            r,
            desc: None,
            region_pages: Vec::new(),
            declared: HashSet::new(),
            seen_sections: HashSet::new(),
            totals: Totals::default(),
            ended: false,
            skipped: Vec::new(),
            skipped_total: 0,
            last_sync: None,
            check_trailing: true,
        })
    }

    /// For a live connection, which stays open after END (the return path uses it): do not
    /// wait for end of input to check that nothing follows END.
    pub fn live(mut self) -> Self {
        self.check_trailing = false;
        self
    }

    /// Whether this is a mapped-layout file (its pages follow END at fixed offsets).
    pub fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }

    /// The VM description, once read.
    pub fn description(&self) -> Option<&VmDescription> {
        self.desc.as_ref()
    }

    /// The first [`MAX_SKIPPED_KEPT`] OPTIONAL records of unknown types that were skipped:
    /// (offset, type).
    pub fn skipped(&self) -> &[(u64, u16)] {
        &self.skipped
    }

    /// How many OPTIONAL records of unknown types were skipped in all.
    pub fn skipped_total(&self) -> u64 {
        self.skipped_total
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.r.offset()
    }

    /// Capacity of the record buffer (bounded by the record limit).
    pub fn buffer_capacity(&self) -> usize {
        self.r.buffer_capacity()
    }

    /// Records read so far (END excluded).
    pub fn records_read(&self) -> u64 {
        self.totals.records
    }

    /// The framed records that follow the stream on a live connection (GO after END).
    pub fn into_records(self) -> RecordReader<R> {
        self.r
    }

    /// The next record; `None` after END (having checked nothing follows it).
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, WireError> {
        self.next_inner(None)
    }

    /// As [`Self::next_record`], but the pages of RAW runs go straight to `placer` as they are
    /// read (a RAM record then says [`RamRecord::placed`]). If the record turns out bad (its
    /// CRC, its totals), the placed pages hold what was read: the caller must treat them as
    /// unchecked until this returns the record.
    pub fn next_record_placing(
        &mut self,
        placer: &mut dyn crate::PagePlacer,
    ) -> Result<Option<Record<'_>>, WireError> {
        self.next_inner(Some(placer))
    }

    fn next_inner(
        &mut self,
        placer: Option<&mut dyn crate::PagePlacer>,
    ) -> Result<Option<Record<'_>>, WireError> {
        if self.ended {
            return Ok(None);
        }
        // Only once the description gave the regions (before it, RAM is out of order).
        let placing = match placer {
            Some(p) if self.desc.is_some() => Some((p, &self.region_pages[..])),
            _ => None,
        };
        let Some(framed) = self.r.advance_placing(placing)? else {
            return Err(WireError::at(
                self.r.offset(),
                ErrorKind::Truncated("the stream ends without END"),
            ));
        };
        let (at, ty, flags, len, crc, placed) = (
            framed.offset,
            framed.ty,
            framed.flags,
            framed.len,
            framed.crc,
            framed.placed,
        );
        let err = |k: ErrorKind| WireError::at(at, k);
        if ty == rt::END {
            if self.desc.is_none() {
                return Err(err(ErrorKind::Order(
                    "END before the VM description".into(),
                )));
            }
            if let Some(m) = &self.mapped {
                m.at_end().map_err(err)?;
            }
            let t = Totals::decode(self.r.body(len)).map_err(err)?;
            let mine = self.totals;
            if t != mine {
                return Err(err(ErrorKind::Totals(format!(
                    "END says {} records, {} raw and {} zero pages, digest {:#010x}; the stream had {}, {}, {}, {:#010x}",
                    t.records, t.raw_pages, t.zero_pages, t.digest,
                    mine.records, mine.raw_pages, mine.zero_pages, mine.digest
                ))));
            }
            // In a mapped-layout file the padding and the pages follow END.
            if self.check_trailing && self.mapped.is_none() && !self.r.at_eof()? {
                return Err(WireError::at(self.r.offset(), ErrorKind::TrailingData));
            }
            self.ended = true;
            return Ok(Some(Record::End(t)));
        }
        let body = self.r.body(len);
        let in_body = |(pos, k): (usize, ErrorKind)| WireError::at(at + 8 + pos as u64, k);
        let known = matches!(
            ty,
            rt::VM_DESCRIPTION
                | rt::RAM_PAGES
                | rt::DEVICE_STATE
                | rt::POSTCOPY_COMMAND
                | rt::SOURCE_INFO
                | rt::PING
                | rt::PARTICIPANT_DATA
                | rt::SYNC
                | rt::NOP
                | rt::END
                | rt::MAPPED_RAM
                | rt::PAGE_CRCS
        );
        if !known {
            if flags & FLAG_OPTIONAL == 0 {
                return Err(err(ErrorKind::UnknownRecordType(ty)));
            }
            if self.skipped.len() < MAX_SKIPPED_KEPT {
                self.skipped.push((at, ty));
            }
            self.skipped_total += 1;
            self.totals.records += 1;
            return Ok(Some(Record::SkippedOptional {
                ty,
                len: body.len(),
            }));
        }
        if self.desc.is_none() && !matches!(ty, rt::VM_DESCRIPTION | rt::SOURCE_INFO) {
            return Err(err(ErrorKind::Order(format!(
                "{} before the VM description",
                rt::name(ty)
            ))));
        }
        let record = match ty {
            rt::VM_DESCRIPTION => {
                if self.desc.is_some() {
                    return Err(err(ErrorKind::Order("a second VM description".into())));
                }
                if body.len() > limits::MAX_DESCRIPTION {
                    return Err(err(ErrorKind::TooLarge {
                        what: "VM description",
                        len: body.len() as u64,
                        max: limits::MAX_DESCRIPTION as u64,
                    }));
                }
                let d: VmDescription = serde_json::from_slice(body)
                    .map_err(|e| err(ErrorKind::Description(e.to_string())))?;
                d.validate().map_err(|e| err(ErrorKind::Description(e)))?;
                self.region_pages = d
                    .ram
                    .iter()
                    .map(|r| (r.id, r.size / crate::PAGE_SIZE as u64))
                    .collect();
                self.declared = d
                    .sections
                    .iter()
                    .map(|s| (s.name.clone(), s.instance))
                    .collect();
                self.desc = Some(d);
                Record::Description
            }
            rt::SOURCE_INFO => {
                let v = serde_json::from_slice(body).map_err(|e| {
                    err(ErrorKind::Malformed {
                        record: "SOURCE_INFO",
                        reason: e.to_string(),
                    })
                })?;
                Record::SourceInfo(v)
            }
            rt::MAPPED_RAM | rt::PAGE_CRCS => {
                let m = self.mapped.as_mut().ok_or_else(|| {
                    err(ErrorKind::Order(format!(
                        "{} in a stream without the mapped layout",
                        rt::name(ty)
                    )))
                })?;
                m.record(ty, body, crc, &self.region_pages, &mut self.totals)
                    .map_err(err)?
            }
            rt::RAM_PAGES if self.mapped.is_some() => {
                return Err(err(ErrorKind::Order(
                    "RAM_PAGES in a mapped-layout file (its pages are at fixed offsets)".into(),
                )))
            }
            rt::RAM_PAGES => {
                let rec = ram::decode(body, placed).map_err(in_body)?;
                let pages = self
                    .region_pages
                    .iter()
                    .find(|(id, _)| *id == rec.region)
                    .map(|(_, p)| *p)
                    .ok_or_else(|| err(ErrorKind::UnknownRegion(rec.region)))?;
                for run in &rec.runs {
                    if run
                        .first_page
                        .checked_add(u64::from(run.count))
                        .is_none_or(|end| end > pages)
                    {
                        return Err(err(ErrorKind::RunOutOfRange {
                            region: rec.region,
                            first: run.first_page,
                            count: run.count,
                            pages,
                        }));
                    }
                }
                // The same pages may come again and again: a hostile stream could overflow a
                // plain sum.
                let overflow = || err(ErrorKind::Totals("the page count overflows".into()));
                self.totals.raw_pages = (self.totals.raw_pages)
                    .checked_add(rec.raw_pages())
                    .ok_or_else(overflow)?;
                self.totals.zero_pages = (self.totals.zero_pages)
                    .checked_add(rec.zero_pages())
                    .ok_or_else(overflow)?;
                self.totals.digest = crc32c::crc32c_append(self.totals.digest, &crc.to_le_bytes());
                Record::Ram(rec)
            }
            rt::DEVICE_STATE => {
                let s = Section::decode(body).map_err(in_body)?;
                let key = (s.name.clone(), s.instance);
                if !self.declared.contains(&key) {
                    return Err(err(ErrorKind::State(crate::StateError::Invalid {
                        section: s.name.clone(),
                        reason: format!("instance {} is not in the VM description", s.instance),
                    })));
                }
                if self.seen_sections.len() >= limits::MAX_SECTIONS
                    || !self.seen_sections.insert(key)
                {
                    return Err(err(ErrorKind::State(crate::StateError::DuplicateSection {
                        section: s.name.clone(),
                        instance: s.instance,
                    })));
                }
                Record::Section(s)
            }
            rt::POSTCOPY_COMMAND => Record::Postcopy(PostcopyCommand::decode(body).map_err(err)?),
            rt::PING => {
                let seq: [u8; 8] = body.try_into().map_err(|_| {
                    err(ErrorKind::Malformed {
                        record: "PING",
                        reason: format!("body is {} bytes, not 8", body.len()),
                    })
                })?;
                Record::Ping(u64::from_le_bytes(seq))
            }
            rt::NOP if body.is_empty() => Record::Nop,
            rt::NOP => {
                return Err(err(ErrorKind::Malformed {
                    record: "NOP",
                    reason: format!("body is {} bytes, not 0", body.len()),
                }))
            }
            rt::SYNC => {
                let round: [u8; 8] = body.try_into().map_err(|_| {
                    err(ErrorKind::Malformed {
                        record: "SYNC",
                        reason: format!("body is {} bytes, not 8", body.len()),
                    })
                })?;
                let round = u64::from_le_bytes(round);
                if self.last_sync.is_some_and(|last| round <= last) {
                    return Err(err(ErrorKind::Order(format!(
                        "SYNC of round {round} after round {}",
                        self.last_sync.unwrap_or(0)
                    ))));
                }
                self.last_sync = Some(round);
                Record::Sync(round)
            }
            rt::PARTICIPANT_DATA => {
                let bad = |reason: &str| {
                    err(ErrorKind::Malformed {
                        record: "PARTICIPANT_DATA",
                        reason: reason.into(),
                    })
                };
                let n = *body.first().ok_or_else(|| bad("empty body"))? as usize;
                if n == 0 || body.len() < 1 + n {
                    return Err(bad("bad name length"));
                }
                let name =
                    std::str::from_utf8(&body[1..1 + n]).map_err(|_| bad("name is not UTF-8"))?;
                Record::Participant {
                    name,
                    data: &body[1 + n..],
                }
            }
            _ => unreachable!("known types are matched above"),
        };
        self.totals.records += 1;
        Ok(Some(record))
    }
}
