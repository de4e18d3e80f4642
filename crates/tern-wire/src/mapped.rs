//! The mapped layout's records (`docs/stream-format.md`, *Mapped layout*): MAPPED_RAM says
//! where each region's pages sit in the file, PAGE_CRCS the CRC of every page. The stream reader
//! checks them with [`Check`]; [`crate::MappedFile`] reads such a file, [`crate::write_mapped`]
//! writes one.

use crate::error::ErrorKind;
use crate::stream::{Record, Totals};
use crate::{record_type as rt, PAGE_SIZE};

/// Most CRCs one PAGE_CRCS record carries.
pub const MAX_PAGE_CRCS: usize = 65_536;

/// Alignment of the page area and of every region in it.
pub const AREA_ALIGN: u64 = PAGE_SIZE as u64;

/// The CRC-32C of a page of zeros.
pub fn zero_page_crc() -> u32 {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    crc32c::crc32c(&ZERO)
}

/// One region's place in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedRegion {
    pub id: u32,
    pub pages: u64,
    /// Where its page 0 is, from the start of the file.
    pub data_offset: u64,
}

impl MappedRegion {
    /// Where page `p` is.
    pub fn page_offset(&self, p: u64) -> u64 {
        self.data_offset + p * PAGE_SIZE as u64
    }
}

/// The MAPPED_RAM record: where the pages are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedRam {
    pub area_offset: u64,
    pub regions: Vec<MappedRegion>,
}

impl MappedRam {
    /// The layout for regions of `(id, pages)`, their pages from `area_offset` on, back to back.
    pub fn new(area_offset: u64, regions: &[(u32, u64)]) -> MappedRam {
        let mut at = area_offset;
        let regions = regions
            .iter()
            .map(|&(id, pages)| {
                let r = MappedRegion {
                    id,
                    pages,
                    data_offset: at,
                };
                at += pages * PAGE_SIZE as u64;
                r
            })
            .collect();
        MappedRam {
            area_offset,
            regions,
        }
    }

    /// Where the last region ends: the least length of a complete file.
    pub fn end(&self) -> u64 {
        self.regions
            .last()
            .map_or(self.area_offset, |r| r.page_offset(r.pages))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + 24 * self.regions.len());
        b.extend_from_slice(&self.area_offset.to_le_bytes());
        b.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        for r in &self.regions {
            b.extend_from_slice(&r.id.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&r.pages.to_le_bytes());
            b.extend_from_slice(&r.data_offset.to_le_bytes());
        }
        b
    }

    /// Decodes a body and checks it against the description's regions `(id, pages)`.
    pub fn decode(body: &[u8], described: &[(u32, u64)]) -> Result<MappedRam, ErrorKind> {
        let bad = |reason: String| ErrorKind::Malformed {
            record: "MAPPED_RAM",
            reason,
        };
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8"));
        if body.len() < 16 {
            return Err(bad(format!("body of {} bytes", body.len())));
        }
        let n = u32_at(8) as usize;
        if body.len() != 16 + 24 * n || u32_at(12) != 0 {
            return Err(bad("its length does not match its region count".into()));
        }
        if n != described.len() {
            return Err(bad(format!(
                "{n} regions; the description has {}",
                described.len()
            )));
        }
        let area_offset = u64_at(0);
        if !area_offset.is_multiple_of(AREA_ALIGN) {
            return Err(bad(format!(
                "area offset {area_offset} is not page-aligned"
            )));
        }
        let mut regions = Vec::with_capacity(n);
        let mut next = area_offset;
        for (i, &(id, pages)) in described.iter().enumerate() {
            let at = 16 + 24 * i;
            let r = MappedRegion {
                id: u32_at(at),
                pages: u64_at(at + 8),
                data_offset: u64_at(at + 16),
            };
            if u32_at(at + 4) != 0 {
                return Err(ErrorKind::NonZeroReserved("MAPPED_RAM region"));
            }
            if r.id != id || r.pages != pages {
                return Err(bad(format!(
                    "region #{i} is {} of {} pages; the description says {id} of {pages}",
                    r.id, r.pages
                )));
            }
            if r.data_offset != next {
                return Err(bad(format!(
                    "region {id} starts at {}, not right after the one before ({next})",
                    r.data_offset
                )));
            }
            next = pages
                .checked_mul(PAGE_SIZE as u64)
                .and_then(|len| next.checked_add(len))
                .ok_or_else(|| bad("the area overflows".into()))?;
            regions.push(r);
        }
        Ok(MappedRam {
            area_offset,
            regions,
        })
    }
}

/// Encodes a PAGE_CRCS body.
pub fn encode_page_crcs(region: u32, first_page: u64, crcs: &[u32]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + 4 * crcs.len());
    b.extend_from_slice(&region.to_le_bytes());
    b.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
    b.extend_from_slice(&first_page.to_le_bytes());
    for c in crcs {
        b.extend_from_slice(&c.to_le_bytes());
    }
    b
}

/// The page CRCs of a PAGE_CRCS body, as little-endian u32s.
pub fn page_crc(crcs: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(crcs[i * 4..i * 4 + 4].try_into().expect("4"))
}

/// What a stream reader keeps to check a mapped-layout stream.
#[derive(Debug, Default)]
pub(crate) struct Check {
    layout: Option<MappedRam>,
    /// The region (index) and page the next PAGE_CRCS must start at.
    next: (usize, u64),
}

impl Check {
    /// A MAPPED_RAM or PAGE_CRCS record; `crc` is the record's own (PAGE_CRCS records chain
    /// into END's digest as RAM_PAGES records do).
    pub(crate) fn record<'a>(
        &mut self,
        ty: u16,
        body: &'a [u8],
        crc: u32,
        described: &[(u32, u64)],
        totals: &mut Totals,
    ) -> Result<Record<'a>, ErrorKind> {
        if ty == rt::MAPPED_RAM {
            if self.layout.is_some() || totals.records > 2 {
                return Err(ErrorKind::Order(
                    "MAPPED_RAM comes once, right after VM_DESCRIPTION".into(),
                ));
            }
            let m = MappedRam::decode(body, described)?;
            self.layout = Some(m.clone());
            self.skip_empty();
            return Ok(Record::MappedRam(m));
        }
        let layout = self
            .layout
            .as_ref()
            .ok_or_else(|| ErrorKind::Order("PAGE_CRCS before MAPPED_RAM".into()))?;
        let bad = |reason: String| ErrorKind::Malformed {
            record: "PAGE_CRCS",
            reason,
        };
        if body.len() < 16 {
            return Err(bad(format!("body of {} bytes", body.len())));
        }
        let region = u32::from_le_bytes(body[0..4].try_into().expect("4"));
        let n = u32::from_le_bytes(body[4..8].try_into().expect("4")) as usize;
        let first_page = u64::from_le_bytes(body[8..16].try_into().expect("8"));
        if n == 0 || n > MAX_PAGE_CRCS || body.len() != 16 + 4 * n {
            return Err(bad(format!("{n} CRCs in a body of {} bytes", body.len())));
        }
        let Some(r) = layout.regions.get(self.next.0) else {
            return Err(ErrorKind::Order(
                "PAGE_CRCS after every page was covered".into(),
            ));
        };
        if region != r.id || first_page != self.next.1 || first_page + n as u64 > r.pages {
            return Err(ErrorKind::Order(format!(
                "PAGE_CRCS of region {region} pages {first_page}+{n}; expected region {} from \
                 page {} (of {})",
                r.id, self.next.1, r.pages
            )));
        }
        self.next.1 += n as u64;
        self.skip_empty();
        let crcs = &body[16..];
        let zero = zero_page_crc();
        let zeros = (0..n).filter(|&i| page_crc(crcs, i) == zero).count() as u64;
        totals.zero_pages += zeros;
        totals.raw_pages += n as u64 - zeros;
        totals.digest = crc32c::crc32c_append(totals.digest, &crc.to_le_bytes());
        Ok(Record::PageCrcs {
            region,
            first_page,
            crcs,
        })
    }

    /// Moves past regions whose pages are all covered.
    fn skip_empty(&mut self) {
        if let Some(l) = &self.layout {
            while l
                .regions
                .get(self.next.0)
                .is_some_and(|r| self.next.1 >= r.pages)
            {
                self.next = (self.next.0 + 1, 0);
            }
        }
    }

    /// At END: the layout was given and every page has its CRC.
    pub(crate) fn at_end(&self) -> Result<(), ErrorKind> {
        match &self.layout {
            None => Err(ErrorKind::Order(
                "a mapped-layout stream without MAPPED_RAM".into(),
            )),
            Some(l) if self.next.0 < l.regions.len() => Err(ErrorKind::Order(format!(
                "END before the CRCs of region {} from page {}",
                l.regions[self.next.0].id, self.next.1
            ))),
            Some(_) => Ok(()),
        }
    }
}
