//! RAM_PAGES records: runs of pages of one region, raw or zero.

use std::ops::Range;

use crate::error::ErrorKind;
use crate::{limits, PAGE_SIZE};

/// Run encodings.
pub const ENC_RAW: u8 = 0;
pub const ENC_ZERO: u8 = 1;
/// Reserved for later versions.
pub const ENC_LZ4: u8 = 2;
pub const ENC_ZSTD: u8 = 3;
pub const ENC_XOR_DELTA: u8 = 4;

const RUN_HEADER: usize = 16;

/// What a run carries, for encoding.
#[derive(Clone, Copy, Debug)]
pub enum RunData<'a> {
    /// Whole pages of data (a multiple of the page size).
    Raw(&'a [u8]),
    /// This many zero pages.
    Zero(u32),
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
            RunData::Zero(n) => u64::from(n),
        }
    }
}

fn malformed(reason: impl Into<String>) -> ErrorKind {
    ErrorKind::Malformed {
        record: "RAM_PAGES",
        reason: reason.into(),
    }
}

/// The fixed parts of a record (region, count, run headers), for the writer to interleave with
/// the runs' data. Returns the header bytes and, per run, the range of its header in them.
pub(crate) fn encode_headers(region: u32, runs: &[RamRun<'_>]) -> Result<Vec<u8>, ErrorKind> {
    if runs.len() > limits::MAX_RUNS {
        return Err(ErrorKind::TooLarge {
            what: "RAM run count",
            len: runs.len() as u64,
            max: limits::MAX_RUNS as u64,
        });
    }
    let mut h = Vec::with_capacity(8 + runs.len() * RUN_HEADER);
    h.extend_from_slice(&region.to_le_bytes());
    h.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for run in runs {
        let (count, enc) = match run.data {
            RunData::Raw(d) => {
                if d.is_empty() || d.len() % PAGE_SIZE != 0 {
                    return Err(malformed(format!(
                        "raw run of {} bytes is not whole pages",
                        d.len()
                    )));
                }
                let n =
                    u32::try_from(d.len() / PAGE_SIZE).map_err(|_| malformed("run too long"))?;
                (n, ENC_RAW)
            }
            RunData::Zero(0) => return Err(malformed("zero run of 0 pages")),
            RunData::Zero(n) => (n, ENC_ZERO),
        };
        h.extend_from_slice(&run.first_page.to_le_bytes());
        h.extend_from_slice(&count.to_le_bytes());
        h.extend_from_slice(&[enc, 0, 0, 0]);
    }
    Ok(h)
}

/// The body parts of a record: headers interleaved with data, in wire order.
pub(crate) fn body_parts<'a>(headers: &'a [u8], runs: &[RamRun<'a>]) -> Vec<&'a [u8]> {
    let mut parts = Vec::with_capacity(1 + runs.len() * 2);
    parts.push(&headers[..8]);
    for (i, run) in runs.iter().enumerate() {
        let at = 8 + i * RUN_HEADER;
        parts.push(&headers[at..at + RUN_HEADER]);
        if let RunData::Raw(d) = run.data {
            parts.push(d);
        }
    }
    parts
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
}

impl<'a> RamRecord<'a> {
    /// The data of a RAW run (empty for ZERO runs).
    pub fn data(&self, run: &RunRef) -> &'a [u8] {
        &self.body[run.data.clone()]
    }

    /// Pages sent as data.
    pub fn raw_pages(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.encoding == ENC_RAW)
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

/// Parses a body; errors carry the offset in the body.
pub(crate) fn decode(body: &[u8]) -> Result<RamRecord<'_>, (usize, ErrorKind)> {
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
    for _ in 0..n {
        if body.len() - pos < RUN_HEADER {
            return Err((pos, malformed("run header past the end of the body")));
        }
        let first_page = u64_at(body, pos);
        let count = u32_at(body, pos + 8);
        let encoding = body[pos + 12];
        if body[pos + 13..pos + 16].iter().any(|&b| b != 0) {
            return Err((pos + 13, ErrorKind::NonZeroReserved("run reserved bytes")));
        }
        if count == 0 {
            return Err((pos + 8, malformed("run of 0 pages")));
        }
        let start = pos + RUN_HEADER;
        let len = match encoding {
            ENC_RAW => (count as usize)
                .checked_mul(PAGE_SIZE)
                .ok_or((pos + 8, malformed("run too long")))?,
            ENC_ZERO => 0,
            other => return Err((pos + 12, ErrorKind::UnsupportedEncoding(other))),
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
    Ok(RamRecord { region, runs, body })
}
