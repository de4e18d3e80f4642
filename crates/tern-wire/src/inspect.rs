//! Reading a whole stream for `tern analyze` and `tern verify`.

use std::collections::BTreeMap;
use std::io::Read;

use serde_json::{json, Value as Json};

use crate::error::WireError;
use crate::record_type;
use crate::stream::{Record, StreamReader, Totals};
use crate::Section;

/// Per-region RAM figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionStats {
    pub records: u64,
    pub raw_pages: u64,
    pub zero_pages: u64,
    /// Of the pages with data, those sent compressed, and the bytes they took.
    pub compressed_pages: u64,
    pub compressed_bytes: u64,
    /// Bytes of RAM_PAGES records on the wire, framing included.
    pub bytes: u64,
}

/// What a stream holds.
#[derive(Debug, Default)]
pub struct Analysis {
    /// Per record type name: (count, bytes on the wire).
    pub records: BTreeMap<&'static str, (u64, u64)>,
    pub regions: BTreeMap<u32, RegionStats>,
    /// Sections with their size on the wire.
    pub sections: Vec<(Section, u64)>,
    pub description: Option<crate::VmDescription>,
    pub source_info: Option<Json>,
    pub skipped: Vec<(u64, u16)>,
    /// All skipped optional records (only the first ones are listed in `skipped`).
    pub skipped_total: u64,
    pub postcopy_commands: u64,
    /// A mapped-layout file: where its pages are (they follow END; `tern verify` reads them).
    pub mapped: Option<crate::mapped::MappedRam>,
    pub totals: Option<Totals>,
    pub bytes: u64,
}

/// A stream that failed validation: what was read before the error, and the error.
#[derive(Debug)]
pub struct AnalyzeError {
    pub partial: Analysis,
    pub error: WireError,
}

/// Reads a stream to its end, validating everything. On error returns what was read so far.
pub fn analyze<R: Read>(input: R) -> Result<Analysis, Box<AnalyzeError>> {
    let mut a = Analysis::default();
    // Compressed runs are decompressed here, so that a stream that verifies also loads.
    let mut scratch = Vec::new();
    let mut r = match StreamReader::new(input) {
        Ok(r) => r,
        Err(error) => return Err(Box::new(AnalyzeError { partial: a, error })),
    };
    loop {
        let before = r.offset();
        let rec = match r.next_record() {
            Ok(Some(rec)) => rec,
            Ok(None) => break,
            Err(error) => {
                a.skipped = r.skipped().to_vec();
                a.skipped_total = r.skipped_total();
                a.bytes = r.offset();
                return Err(Box::new(AnalyzeError { partial: a, error }));
            }
        };
        let mut ram_region = None;
        let (name, extra): (&'static str, Option<Section>) = match rec {
            Record::Description => ("VM_DESCRIPTION", None),
            Record::SourceInfo(v) => {
                a.source_info = Some(v);
                ("SOURCE_INFO", None)
            }
            Record::Ram(ram) => {
                let s = a.regions.entry(ram.region).or_default();
                for run in ram.runs.iter().filter(|r| r.encoding > crate::ENC_ZERO) {
                    scratch.resize(run.count as usize * crate::PAGE_SIZE, 0);
                    if let Err(kind) =
                        crate::decompress_run(run.encoding, ram.data(run), &mut scratch)
                    {
                        let error = WireError::at(before, kind);
                        a.bytes = r.offset();
                        return Err(Box::new(AnalyzeError { partial: a, error }));
                    }
                    s.compressed_pages += u64::from(run.count);
                    s.compressed_bytes += ram.data(run).len() as u64;
                }
                s.records += 1;
                s.raw_pages = s.raw_pages.saturating_add(ram.raw_pages());
                s.zero_pages = s.zero_pages.saturating_add(ram.zero_pages());
                ram_region = Some(ram.region);
                ("RAM_PAGES", None)
            }
            Record::Section(sec) => ("DEVICE_STATE", Some(sec)),
            Record::Ping(_) => ("PING", None),
            Record::Sync(_) => ("SYNC", None),
            Record::Nop => ("NOP", None),
            Record::Participant { .. } => ("PARTICIPANT_DATA", None),
            Record::Postcopy(_) => {
                a.postcopy_commands += 1;
                ("POSTCOPY_COMMAND", None)
            }
            Record::SkippedOptional { ty, .. } => (record_type::name(ty), None),
            Record::MappedRam(m) => {
                a.mapped = Some(m);
                ("MAPPED_RAM", None)
            }
            Record::PageCrcs { region, crcs, .. } => {
                let n = (crcs.len() / 4) as u64;
                let zero = crate::mapped::zero_page_crc();
                let zeros = (0..crcs.len() / 4)
                    .filter(|&i| crate::mapped::page_crc(crcs, i) == zero)
                    .count() as u64;
                let s = a.regions.entry(region).or_default();
                s.records += 1;
                s.raw_pages += n - zeros;
                s.zero_pages += zeros;
                ("PAGE_CRCS", None)
            }
            Record::End(t) => {
                a.totals = Some(t);
                ("END", None)
            }
        };
        // The END record checks for trailing data, which may read one byte past it.
        let size = r.offset() - before;
        let e = a.records.entry(name).or_insert((0, 0));
        e.0 += 1;
        e.1 += size;
        if let Some(region) = ram_region.and_then(|id| a.regions.get_mut(&id)) {
            region.bytes += size;
        }
        if let Some(sec) = extra {
            a.sections.push((sec, size));
        }
    }
    a.description = r.description().cloned();
    a.skipped = r.skipped().to_vec();
    a.skipped_total = r.skipped_total();
    a.bytes = r.offset();
    Ok(a)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

impl Analysis {
    /// A human summary.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "stream: {} bytes ({})\n",
            self.bytes,
            mib(self.bytes)
        ));
        s.push_str("records:\n");
        for (name, (n, b)) in &self.records {
            s.push_str(&format!("  {name:<18} {n:>9}  {:>12}\n", mib(*b)));
        }
        if !self.skipped.is_empty() {
            s.push_str("skipped optional records of unknown type:\n");
            for (at, ty) in &self.skipped {
                s.push_str(&format!("  type {ty:#06x} at byte {at}\n"));
            }
            let more = self.skipped_total.saturating_sub(self.skipped.len() as u64);
            if more > 0 {
                s.push_str(&format!("  ... and {more} more\n"));
            }
        }
        if let Some(m) = &self.mapped {
            s.push_str(&format!(
                "layout: mapped (pages at fixed offsets from byte {}, file of at least {} bytes)\n",
                m.area_offset,
                m.end()
            ));
        }
        s.push_str("RAM:\n");
        for (id, r) in &self.regions {
            let name = self
                .description
                .as_ref()
                .and_then(|d| d.ram.iter().find(|x| x.id == *id))
                .map(|x| format!("{} gpa {:#x} size {}", x.name, x.gpa, mib(x.size)))
                .unwrap_or_default();
            s.push_str(&format!(
                "  region {id} ({name}): {} records, {} on the wire, {} pages with data ({}), {} zero pages\n",
                r.records,
                mib(r.bytes),
                r.raw_pages,
                mib(r.raw_pages * crate::PAGE_SIZE as u64),
                r.zero_pages
            ));
            if r.compressed_pages > 0 {
                s.push_str(&format!(
                    "    {} of them compressed into {} ({:.1}x)\n",
                    r.compressed_pages,
                    mib(r.compressed_bytes),
                    (r.compressed_pages * crate::PAGE_SIZE as u64) as f64
                        / r.compressed_bytes.max(1) as f64
                ));
            }
        }
        s.push_str("sections:\n");
        for (sec, size) in &self.sections {
            s.push_str(&format!(
                "  {:<24} instance {:<3} version {:<3} {:>6} bytes, {} fields, {} subsections{}\n",
                sec.name,
                sec.instance,
                sec.version,
                size,
                sec.fields.len(),
                sec.subsections.len(),
                if sec.subsections.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        sec.subsections
                            .iter()
                            .map(|x| x.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ));
        }
        if let Some(t) = &self.totals {
            s.push_str(&format!(
                "end: {} records, {} pages with data, {} zero pages, digest {:#010x}\n",
                t.records, t.raw_pages, t.zero_pages, t.digest
            ));
        }
        s
    }

    /// A full dump: description, record counts, RAM, every section with its field values.
    pub fn to_json(&self) -> Json {
        json!({
            "bytes": self.bytes,
            "description": self.description,
            "source_info": self.source_info,
            "records": self.records.iter().map(|(k, (n, b))| (k.to_string(), json!({"count": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
            "ram": self.regions.iter().map(|(id, r)| json!({
                "region": id, "records": r.records, "bytes": r.bytes, "raw_pages": r.raw_pages, "zero_pages": r.zero_pages,
                "compressed_pages": r.compressed_pages, "compressed_bytes": r.compressed_bytes,
            })).collect::<Vec<_>>(),
            "sections": self.sections.iter().map(|(s, size)| {
                let mut j = s.to_json();
                j["size"] = json!(size);
                j
            }).collect::<Vec<_>>(),
            "skipped": self.skipped.iter().map(|(at, ty)| json!({"offset": at, "type": ty})).collect::<Vec<_>>(),
            "skipped_total": self.skipped_total,
            "layout": if self.mapped.is_some() { "mapped" } else { "stream" },
            "mapped": self.mapped.as_ref().map(|m| json!({
                "area_offset": m.area_offset,
                "regions": m.regions.iter().map(|r| json!({"region": r.id, "pages": r.pages, "data_offset": r.data_offset})).collect::<Vec<_>>(),
            })),
            "end": self.totals.map(|t| json!({
                "records": t.records, "raw_pages": t.raw_pages, "zero_pages": t.zero_pages, "digest": t.digest,
            })),
        })
    }
}
