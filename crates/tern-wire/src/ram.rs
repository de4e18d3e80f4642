//! RAM_PAGES records: runs of pages of one region, raw, zero or compressed (LZ4, zstd).

use std::ops::Range;

use crate::error::ErrorKind;
use crate::{limits, PAGE_SIZE};

/// Run encodings.
pub const ENC_RAW: u8 = 0;
pub const ENC_ZERO: u8 = 1;
/// An LZ4 block (`lz4_flex::block`) of the run's pages.
pub const ENC_LZ4: u8 = 2;
/// A zstd frame of the run's pages.
pub const ENC_ZSTD: u8 = 3;
/// Reserved for later versions.
pub const ENC_XOR_DELTA: u8 = 4;

pub(crate) const RUN_HEADER: usize = 16;
/// Most pages in the compressed runs of one record, together (16 MiB once decompressed, as much
/// as a record of raw pages holds): a reader that checks a run on its own (`tern verify`)
/// decompresses it into memory of that size, and a small record cannot make a reader
/// decompress more than a large one could carry raw.
pub const MAX_COMPRESSED_PAGES: u32 = 4096;

/// Adds a compressed run's pages to a record's `total`, refusing more than
/// [`MAX_COMPRESSED_PAGES`] in all.
pub(crate) fn add_compressed(total: &mut u32, count: u32) -> Result<(), ErrorKind> {
    *total = total.saturating_add(count);
    if *total > MAX_COMPRESSED_PAGES {
        return Err(malformed(format!(
            "compressed runs of more than {MAX_COMPRESSED_PAGES} pages in one record"
        )));
    }
    Ok(())
}

/// A human name for an encoding.
pub fn encoding_name(encoding: u8) -> &'static str {
    match encoding {
        ENC_RAW => "raw",
        ENC_ZERO => "zero",
        ENC_LZ4 => "lz4",
        ENC_ZSTD => "zstd",
        ENC_XOR_DELTA => "xor-delta",
        _ => "unknown",
    }
}

/// What a run carries, for encoding.
#[derive(Clone, Copy, Debug)]
pub enum RunData<'a> {
    /// Whole pages of data (a multiple of the page size).
    Raw(&'a [u8]),
    /// This many zero pages.
    Zero(u32),
    /// `pages` pages compressed with `encoding` ([`ENC_LZ4`] or [`ENC_ZSTD`]).
    Compressed {
        encoding: u8,
        pages: u32,
        data: &'a [u8],
    },
}

/// A run of consecutive pages to encode.
#[derive(Clone, Copy, Debug)]
pub struct RamRun<'a> {
    pub first_page: u64,
    pub data: RunData<'a>,
}

impl RamRun<'_> {
    /// Pages in the run.
    pub fn pages(&self) -> u64 {
        match self.data {
            RunData::Raw(d) => (d.len() / PAGE_SIZE) as u64,
            RunData::Zero(n) | RunData::Compressed { pages: n, .. } => u64::from(n),
        }
    }
}

fn malformed(reason: impl Into<String>) -> ErrorKind {
    ErrorKind::Malformed {
        record: "RAM_PAGES",
        reason: reason.into(),
    }
}

/// The fixed parts of a record (region, count, run headers and, for compressed runs, their
/// lengths), for the writer to interleave with the runs' data. Returns the header bytes and
/// where each run's fixed part ends in them.
pub(crate) fn encode_headers(
    region: u32,
    runs: &[RamRun<'_>],
) -> Result<(Vec<u8>, Vec<usize>), ErrorKind> {
    if runs.len() > limits::MAX_RUNS {
        return Err(ErrorKind::TooLarge {
            what: "RAM run count",
            len: runs.len() as u64,
            max: limits::MAX_RUNS as u64,
        });
    }
    let mut h = Vec::with_capacity(8 + runs.len() * (RUN_HEADER + 4));
    let mut ends = Vec::with_capacity(runs.len());
    h.extend_from_slice(&region.to_le_bytes());
    h.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for run in runs {
        let (count, enc, clen) = match run.data {
            RunData::Raw(d) => {
                if d.is_empty() || d.len() % PAGE_SIZE != 0 {
                    return Err(malformed(format!(
                        "raw run of {} bytes is not whole pages",
                        d.len()
                    )));
                }
                let n =
                    u32::try_from(d.len() / PAGE_SIZE).map_err(|_| malformed("run too long"))?;
                (n, ENC_RAW, None)
            }
            RunData::Zero(0) => return Err(malformed("zero run of 0 pages")),
            RunData::Zero(n) => (n, ENC_ZERO, None),
            RunData::Compressed {
                encoding,
                pages,
                data,
            } => {
                if !matches!(encoding, ENC_LZ4 | ENC_ZSTD)
                    || pages == 0
                    || pages > MAX_COMPRESSED_PAGES
                {
                    return Err(malformed(format!(
                        "compressed run of {pages} pages with encoding {encoding}"
                    )));
                }
                let clen = u32::try_from(data.len()).map_err(|_| malformed("run too long"))?;
                (pages, encoding, Some(clen))
            }
        };
        h.extend_from_slice(&run.first_page.to_le_bytes());
        h.extend_from_slice(&count.to_le_bytes());
        h.extend_from_slice(&[enc, 0, 0, 0]);
        if let Some(clen) = clen {
            h.extend_from_slice(&clen.to_le_bytes());
        }
        ends.push(h.len());
    }
    Ok((h, ends))
}

/// The body parts of a record: headers interleaved with data, in wire order.
pub(crate) fn body_parts<'a>(
    headers: &'a [u8],
    ends: &[usize],
    runs: &[RamRun<'a>],
) -> Vec<&'a [u8]> {
    let mut parts = Vec::with_capacity(1 + runs.len() * 2);
    parts.push(&headers[..8]);
    let mut at = 8;
    for (run, &end) in runs.iter().zip(ends) {
        parts.push(&headers[at..end]);
        at = end;
        match run.data {
            RunData::Raw(d) | RunData::Compressed { data: d, .. } => parts.push(d),
            RunData::Zero(_) => {}
        }
    }
    parts
}

/// A run header's fields (first page, page count, encoding), checked on their own.
pub(crate) fn run_header(h: &[u8]) -> Result<(u64, u32, u8), (usize, ErrorKind)> {
    let first_page = u64_at(h, 0);
    let count = u32_at(h, 8);
    let encoding = h[12];
    if h[13..16].iter().any(|&b| b != 0) {
        return Err((13, ErrorKind::NonZeroReserved("run reserved bytes")));
    }
    if count == 0 {
        return Err((8, malformed("run of 0 pages")));
    }
    match encoding {
        ENC_RAW | ENC_ZERO => {}
        ENC_LZ4 | ENC_ZSTD if count <= MAX_COMPRESSED_PAGES => {}
        ENC_LZ4 | ENC_ZSTD => {
            return Err((
                8,
                malformed(format!(
                    "a compressed run of {count} pages (at most {MAX_COMPRESSED_PAGES})"
                )),
            ))
        }
        other => return Err((12, ErrorKind::UnsupportedEncoding(other))),
    }
    Ok((first_page, count, encoding))
}

/// A decoded run: where its data lies in the record body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRef {
    pub first_page: u64,
    pub count: u32,
    pub encoding: u8,
    pub data: Range<usize>,
}

/// A decoded RAM_PAGES record, borrowing the body.
#[derive(Debug)]
pub struct RamRecord<'a> {
    pub region: u32,
    pub runs: Vec<RunRef>,
    pub body: &'a [u8],
    /// The reader wrote the RAW runs' pages in place as it read them
    /// ([`crate::StreamReader::next_record_placing`]): their data ranges are empty.
    pub placed: bool,
}

impl<'a> RamRecord<'a> {
    /// The data of a RAW run, or the compressed bytes of an LZ4 or ZSTD run (empty for ZERO
    /// runs and for placed RAW runs).
    pub fn data(&self, run: &RunRef) -> &'a [u8] {
        &self.body[run.data.clone()]
    }

    /// Pages sent with data (raw or compressed).
    pub fn raw_pages(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.encoding != ENC_ZERO)
            .map(|r| u64::from(r.count))
            .sum()
    }

    /// Pages sent as zero ranges.
    pub fn zero_pages(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.encoding == ENC_ZERO)
            .map(|r| u64::from(r.count))
            .sum()
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses a body; errors carry the offset in the body. With `placed`, RAW runs carry no data
/// (the reader placed it).
pub(crate) fn decode(body: &[u8], placed: bool) -> Result<RamRecord<'_>, (usize, ErrorKind)> {
    if body.len() < 8 {
        return Err((0, malformed("body shorter than its header")));
    }
    let region = u32_at(body, 0);
    let n = u32_at(body, 4) as usize;
    if n > limits::MAX_RUNS {
        return Err((
            4,
            ErrorKind::TooLarge {
                what: "RAM run count",
                len: n as u64,
                max: limits::MAX_RUNS as u64,
            },
        ));
    }
    // Each run needs at least its header: bound the allocation by what the body can hold.
    if n > (body.len() - 8) / RUN_HEADER {
        return Err((
            4,
            malformed(format!("{n} runs do not fit in {} bytes", body.len())),
        ));
    }
    let mut runs = Vec::with_capacity(n);
    let mut pos = 8;
    let mut compressed = 0;
    for _ in 0..n {
        if body.len() - pos < RUN_HEADER {
            return Err((pos, malformed("run header past the end of the body")));
        }
        let (first_page, count, encoding) =
            run_header(&body[pos..pos + RUN_HEADER]).map_err(|(at, k)| (pos + at, k))?;
        let mut start = pos + RUN_HEADER;
        let len = match encoding {
            ENC_RAW if placed => 0,
            ENC_RAW => (count as usize)
                .checked_mul(PAGE_SIZE)
                .ok_or((pos + 8, malformed("run too long")))?,
            ENC_ZERO => 0,
            _ => {
                add_compressed(&mut compressed, count).map_err(|k| (pos + 8, k))?;
                if body.len() - start < 4 {
                    return Err((
                        start,
                        malformed("compressed length past the end of the body"),
                    ));
                }
                let clen = u32_at(body, start) as usize;
                start += 4;
                clen
            }
        };
        if body.len() - start < len {
            return Err((pos, malformed("run data past the end of the body")));
        }
        runs.push(RunRef {
            first_page,
            count,
            encoding,
            data: start..start + len,
        });
        pos = start + len;
    }
    if pos != body.len() {
        return Err((
            pos,
            malformed(format!("{} bytes after the last run", body.len() - pos)),
        ));
    }
    Ok(RamRecord {
        region,
        runs,
        body,
        placed,
    })
}
