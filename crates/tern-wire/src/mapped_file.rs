//! Mapped-layout files (`docs/stream-format.md`, *Mapped layout*): [`write_mapped`] turns a
//! stream into one, placing each page at its offset as it arrives; [`MappedFile`] opens one,
//! checks its records and length before anything runs, and reads any page, checked against its
//! CRC.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

use crate::error::{ErrorKind, WireError};
use crate::mapped::{zero_page_crc, MappedRam, MAX_PAGE_CRCS};
use crate::stream::{Record, StreamReader, StreamWriter, Totals};
use crate::{record_size, Section, VmDescription, ENC_RAW, ENC_ZERO, PAGE_SIZE};

/// Room kept before the pages for the device state (a few KiB today).
pub const STATE_RESERVE: u64 = 8 << 20;

/// The page area starts on a 2 MiB boundary (huge-page friendly for a reader that maps it).
const AREA_BOUNDARY: u64 = 2 << 20;

const PAGE: u64 = PAGE_SIZE as u64;

fn io_at(offset: u64) -> impl Fn(std::io::Error) -> WireError {
    move |e| WireError::at(offset, e.into())
}

/// A `Write` at a position of a file (the records of a mapped file, from offset 0).
struct At<'a> {
    file: &'a File,
    pos: u64,
}

impl std::io::Write for At<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write_all_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Zeros a page written before and found zero later (a page never written is a hole, which
/// reads as zeros: this crate has no `unsafe`, so no hole punching).
fn zero(file: &File, offset: u64) -> std::io::Result<()> {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    file.write_all_at(&ZERO, offset)
}

/// Reads a stream from `input` and writes it to `out` (empty, or truncated first) in the mapped
/// layout. Returns the totals of the written file's records.
pub fn write_mapped<R: Read>(input: R, out: &File) -> Result<Totals, WireError> {
    let mut r = StreamReader::new(input)?;
    let mut info = None;
    let mut state: Vec<Section> = Vec::new();
    let mut state_bytes = 0u64;
    // Per region (by index): the layout, each page's CRC, which pages hold data in the file.
    let mut layout: Option<MappedRam> = None;
    let mut crcs: Vec<Vec<u32>> = Vec::new();
    let mut data: Vec<Vec<u64>> = Vec::new();
    let mut buf = Vec::new();
    out.set_len(0).map_err(io_at(0))?;
    loop {
        let at = r.offset();
        let rec = r.next_record()?;
        match rec {
            Some(Record::SourceInfo(v)) => info = Some(v),
            Some(Record::Description) => {
                let d = r.description().expect("just read");
                let regions: Vec<(u32, u64)> =
                    d.ram.iter().map(|x| (x.id, x.size / PAGE)).collect();
                let area = area_offset(d, info.as_ref(), &regions)?;
                let m = MappedRam::new(area, &regions);
                out.set_len(m.end()).map_err(io_at(at))?;
                crcs = regions
                    .iter()
                    .map(|&(_, p)| vec![zero_page_crc(); p as usize])
                    .collect();
                data = regions
                    .iter()
                    .map(|&(_, p)| vec![0u64; p.div_ceil(64) as usize])
                    .collect();
                layout = Some(m);
            }
            Some(Record::Ram(rec)) => {
                let m = layout.as_ref().expect("RAM comes after the description");
                let ri = m
                    .regions
                    .iter()
                    .position(|x| x.id == rec.region)
                    .expect("the reader checked the region");
                let region = m.regions[ri];
                for run in &rec.runs {
                    let (first, n) = (run.first_page, u64::from(run.count));
                    let bytes: &[u8] = match run.encoding {
                        ENC_ZERO => {
                            for p in first..first + n {
                                let (w, b) = ((p / 64) as usize, 1u64 << (p % 64));
                                if data[ri][w] & b != 0 {
                                    zero(out, region.page_offset(p)).map_err(io_at(at))?;
                                    data[ri][w] &= !b;
                                }
                                crcs[ri][p as usize] = zero_page_crc();
                            }
                            continue;
                        }
                        ENC_RAW => rec.data(run),
                        enc => {
                            buf.resize(n as usize * PAGE_SIZE, 0);
                            crate::decompress_run(enc, rec.data(run), &mut buf)
                                .map_err(|k| WireError::at(at, k))?;
                            &buf
                        }
                    };
                    out.write_all_at(bytes, region.page_offset(first))
                        .map_err(io_at(at))?;
                    for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
                        let p = first + i as u64;
                        crcs[ri][p as usize] = crc32c::crc32c(page);
                        data[ri][(p / 64) as usize] |= 1 << (p % 64);
                    }
                }
            }
            Some(Record::Section(s)) => {
                state_bytes += s.encode().map(|b| b.len() as u64).unwrap_or(0);
                state.push(s);
            }
            Some(Record::End(_)) | None => break,
            Some(Record::Ping(_) | Record::Nop | Record::SkippedOptional { .. }) => {}
            Some(other) => {
                return Err(WireError::at(
                    at,
                    ErrorKind::Order(format!(
                        "{} cannot go into a mapped-layout file",
                        record_name(&other)
                    )),
                ))
            }
        }
    }
    let (Some(m), Some(desc)) = (layout, r.description()) else {
        return Err(WireError::at(
            r.offset(),
            ErrorKind::Order("no VM description".into()),
        ));
    };
    if state_bytes > STATE_RESERVE {
        return Err(WireError::at(
            r.offset(),
            ErrorKind::TooLarge {
                what: "device state for the mapped layout's reserved space",
                len: state_bytes,
                max: STATE_RESERVE,
            },
        ));
    }
    // The records, from offset 0, now that every CRC is known.
    let mut w = StreamWriter::new_mapped(At { file: out, pos: 0 })?;
    if let Some(v) = &info {
        w.source_info(v)?;
    }
    w.description(desc)?;
    w.mapped_ram(&m)?;
    for (ri, region) in m.regions.iter().enumerate() {
        for (i, chunk) in crcs[ri].chunks(MAX_PAGE_CRCS).enumerate() {
            w.page_crcs(region.id, (i * MAX_PAGE_CRCS) as u64, chunk)?;
        }
    }
    for s in &state {
        w.section(s)?;
    }
    let (at, totals) = w.finish()?;
    if at.pos > m.area_offset {
        return Err(WireError::at(
            at.pos,
            ErrorKind::TooLarge {
                what: "records before the mapped pages",
                len: at.pos,
                max: m.area_offset,
            },
        ));
    }
    out.sync_all().map_err(io_at(at.pos))?;
    Ok(totals)
}

/// Where the pages start: after the records (whose size is known from the description but for
/// the device state, given [`STATE_RESERVE`]), on a 2 MiB boundary.
fn area_offset(
    d: &VmDescription,
    info: Option<&serde_json::Value>,
    regions: &[(u32, u64)],
) -> Result<u64, WireError> {
    let mut len = 32u64;
    if let Some(i) = info {
        len += record_size(json_len(i)) as u64;
    }
    len += record_size(json_len(d)) as u64;
    len += record_size(16 + 24 * regions.len()) as u64;
    for &(_, pages) in regions {
        let full = pages / MAX_PAGE_CRCS as u64;
        let rest = (pages % MAX_PAGE_CRCS as u64) as usize;
        len += full * record_size(16 + 4 * MAX_PAGE_CRCS) as u64;
        if rest > 0 {
            len += record_size(16 + 4 * rest) as u64;
        }
    }
    len += record_size(32) as u64 + STATE_RESERVE;
    Ok(len.div_ceil(AREA_BOUNDARY) * AREA_BOUNDARY)
}

/// The JSON length of what the writer serialises.
fn json_len<T: serde::Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map(|v| v.len()).unwrap_or(0)
}

/// A record's kind, for an error.
fn record_name(r: &Record<'_>) -> &'static str {
    match r {
        Record::Postcopy(_) => "POSTCOPY_COMMAND",
        Record::Participant { .. } => "PARTICIPANT_DATA",
        Record::Sync(_) => "SYNC",
        Record::MappedRam(_) | Record::PageCrcs { .. } => "a mapped layout's record",
        _ => "this record",
    }
}

/// A mapped-layout file whose records were read and checked.
pub struct MappedFile {
    file: File,
    pub desc: VmDescription,
    pub sections: Vec<Section>,
    pub layout: MappedRam,
    /// Each page's CRC, per region (by index).
    crcs: Vec<Vec<u32>>,
    pub totals: Totals,
}

impl MappedFile {
    /// Reads the records (the whole stream up to END, every check of any stream) and checks
    /// the file holds every page's place.
    pub fn open(file: File) -> Result<MappedFile, WireError> {
        let mut r = StreamReader::new(std::io::BufReader::new(&file))?;
        if !r.is_mapped() {
            return Err(WireError::at(
                0,
                ErrorKind::Order("not a mapped-layout file (save with --layout mapped)".into()),
            ));
        }
        let mut layout = None;
        let mut crcs: Vec<Vec<u32>> = Vec::new();
        let mut sections = Vec::new();
        let totals = loop {
            let at = r.offset();
            match r.next_record()? {
                Some(Record::MappedRam(m)) => {
                    crcs = vec![Vec::new(); m.regions.len()];
                    layout = Some(m);
                }
                Some(Record::PageCrcs {
                    region, crcs: c, ..
                }) => {
                    let m = layout.as_ref().expect("checked by the reader");
                    let ri = m
                        .regions
                        .iter()
                        .position(|x| x.id == region)
                        .expect("checked");
                    crcs[ri].extend((0..c.len() / 4).map(|i| crate::mapped::page_crc(c, i)));
                }
                Some(Record::Section(s)) => sections.push(s),
                Some(Record::End(t)) => break t,
                Some(_) => {}
                None => {
                    return Err(WireError::at(at, ErrorKind::Truncated("no END")));
                }
            }
        };
        let desc = r
            .description()
            .cloned()
            .expect("END comes after the description");
        drop(r);
        let layout = layout.expect("END checked MAPPED_RAM came");
        let len = file.metadata().map_err(io_at(0))?.len();
        if len < layout.end() {
            return Err(WireError::at(
                len,
                ErrorKind::Truncated("the file ends before the last page's place"),
            ));
        }
        Ok(MappedFile {
            file,
            desc,
            sections,
            layout,
            crcs,
            totals,
        })
    }

    /// The CRC of page `p` of region index `ri`.
    pub fn crc(&self, ri: usize, p: u64) -> u32 {
        self.crcs[ri][p as usize]
    }

    /// Whether page `p` of region index `ri` is a zero page (no need to read it).
    pub fn is_zero(&self, ri: usize, p: u64) -> bool {
        self.crc(ri, p) == zero_page_crc()
    }

    /// Reads `buf.len() / 4096` pages from page `first` of region index `ri` and checks each
    /// against its CRC; the error names the first page that does not match.
    pub fn read_pages(&self, ri: usize, first: u64, buf: &mut [u8]) -> Result<(), WireError> {
        let r = self.layout.regions[ri];
        let n = (buf.len() / PAGE_SIZE) as u64;
        if first.checked_add(n).is_none_or(|e| e > r.pages) {
            return Err(WireError::at(
                r.page_offset(first),
                ErrorKind::Malformed {
                    record: "page",
                    reason: format!("pages {first}+{n} past region {}'s end", r.id),
                },
            ));
        }
        let at = r.page_offset(first);
        self.file.read_exact_at(buf, at).map_err(io_at(at))?;
        for (i, page) in buf.chunks(PAGE_SIZE).enumerate() {
            let p = first + i as u64;
            if crc32c::crc32c(page) != self.crc(ri, p) {
                return Err(WireError::at(
                    r.page_offset(p),
                    ErrorKind::Malformed {
                        record: "page",
                        reason: format!(
                            "page {p} of region {} does not match its CRC: the file is corrupt",
                            r.id
                        ),
                    },
                ));
            }
        }
        Ok(())
    }

    /// Reads every page and checks it (`tern verify`): returns the pages with data.
    pub fn verify_pages(&self) -> Result<u64, WireError> {
        let mut buf = vec![0u8; 256 * PAGE_SIZE];
        let mut data = 0;
        for (ri, r) in self.layout.regions.iter().enumerate() {
            let mut p = 0;
            while p < r.pages {
                let n = (r.pages - p).min(256);
                self.read_pages(ri, p, &mut buf[..n as usize * PAGE_SIZE])?;
                data += (p..p + n).filter(|&q| !self.is_zero(ri, q)).count() as u64;
                p += n;
            }
        }
        Ok(data)
    }
}
