//! RAM, the first iterative participant: dirty bitmaps in, RAM_PAGES records out.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tern_wire::{Compression, Compressor, RamRun, RunData, StreamWriter, PAGE_SIZE};

use crate::participant::{Out, Progress, SaveParticipant};
use crate::source::multifd::{DataChannels, Job};
use crate::{RegionInfo, Result, SourceVm};

mod loader;
pub use loader::RamLoader;
pub(crate) use loader::{apply, Placer};

/// Pages per RAM_PAGES record (1 MiB of data at most).
pub const BATCH_PAGES: usize = 256;

const PAGE: u64 = PAGE_SIZE as u64;

fn is_zero(page: &[u8]) -> bool {
    // OR-reduce 64-byte blocks; the compiler vectorises the inner loop.
    page.chunks(64).all(|block| {
        block
            .chunks(8)
            .map(|w| {
                let mut b = [0u8; 8];
                b[..w.len()].copy_from_slice(w);
                u64::from_ne_bytes(b)
            })
            .fold(0, |a, w| a | w)
            == 0
    })
}

/// Pages of one region still to send this round, as a bitmap.
struct Dirty {
    info: RegionInfo,
    pages: u64,
    bits: Vec<u64>,
}

impl Dirty {
    fn set_range(&mut self, r: std::ops::Range<u64>) {
        for p in r.start..r.end.min(self.pages) {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    /// The next dirty page at or after `from`.
    fn next_set(&self, from: u64) -> Option<u64> {
        let mut i = (from / 64) as usize;
        if i >= self.bits.len() {
            return None;
        }
        let mut w = self.bits[i] & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                let p = i as u64 * 64 + u64::from(w.trailing_zeros());
                return (p < self.pages).then_some(p);
            }
            i += 1;
            if i >= self.bits.len() {
                return None;
            }
            w = self.bits[i];
        }
    }
    fn test_and_clear(&mut self, p: u64) -> bool {
        let (i, b) = ((p / 64) as usize, p % 64);
        let was = self.bits[i] & (1 << b) != 0;
        self.bits[i] &= !(1 << b);
        was
    }
}

/// Counters the engine turns into statistics.
#[derive(Clone, Copy, Debug, Default)]
pub struct RamCounters {
    /// Pages sent with data.
    pub normal: u64,
    /// Pages sent as zero ranges.
    pub zero: u64,
    /// Pages found dirty by the last sync.
    pub last_sync_dirty: u64,
}

/// Sends guest RAM.
pub struct RamSaver {
    vm: Arc<dyn SourceVm>,
    regions: Vec<Dirty>,
    cursor: (usize, u64),
    buf: Vec<u8>,
    pub counters: RamCounters,
    logging: bool,
    /// Parallel data channels, when the migration has them: pages go there.
    channels: Option<Arc<DataChannels>>,
    /// Compresses the pages sent on the main stream.
    compressor: Compressor,
}

impl RamSaver {
    pub fn new(vm: Arc<dyn SourceVm>) -> Self {
        let regions = vm
            .ram()
            .regions()
            .into_iter()
            .map(|info| {
                let pages = info.size / PAGE;
                Dirty {
                    info,
                    pages,
                    bits: vec![0; pages.div_ceil(64) as usize],
                }
            })
            .collect();
        RamSaver {
            vm,
            regions,
            cursor: (0, 0),
            buf: vec![0; BATCH_PAGES * PAGE_SIZE],
            counters: RamCounters::default(),
            logging: false,
            channels: None,
            compressor: Compressor::new(Compression::None).expect("no compression needs nothing"),
        }
    }

    /// Takes the next batch of dirty pages from the cursor, clearing them: (region, runs of
    /// (first page, count)). None once the round is done.
    fn next_batch(&mut self) -> Option<(u32, Vec<(u64, u64)>)> {
        let (mut ri, mut from) = self.cursor;
        // Find the next region with a dirty page.
        let first = loop {
            let Some(r) = self.regions.get(ri) else {
                self.cursor = (ri, 0);
                return None;
            };
            match r.next_set(from) {
                Some(p) => break p,
                None => {
                    ri += 1;
                    from = 0;
                }
            }
        };
        let region = &mut self.regions[ri];
        // Collect up to BATCH_PAGES dirty pages as runs of consecutive pages.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut taken = 0usize;
        let mut p = first;
        while taken < BATCH_PAGES {
            let Some(q) = region.next_set(p) else { break };
            region.test_and_clear(q);
            match runs.last_mut() {
                Some((s, n)) if *s + *n == q => *n += 1,
                _ => runs.push((q, 1)),
            }
            taken += 1;
            p = q + 1;
        }
        self.cursor = (ri, p);
        Some((region.info.id, runs))
    }

    /// Sends one batch of dirty pages, on the stream or to the data channels. Returns false when
    /// the round is done.
    fn send_batch(&mut self, out: &mut Out<'_>) -> Result<bool> {
        let Some((id, runs)) = self.next_batch() else {
            return Ok(false);
        };
        match &self.channels {
            Some(ch) => ch.send(Job::Pages { region: id, runs })?,
            None => {
                let (normal, zero) = send_pages(
                    &*self.vm,
                    out,
                    id,
                    &runs,
                    &mut self.buf,
                    &mut self.compressor,
                )?;
                self.counters.normal += normal;
                self.counters.zero += zero;
            }
        }
        Ok(true)
    }
}

/// Writes `runs` of `region` (first page, count) as known-zero ranges in one RAM_PAGES record;
/// returns the pages they cover.
pub(crate) fn send_zero_runs<W: Write>(
    out: &mut StreamWriter<W>,
    region: u32,
    runs: &[(u64, u32)],
) -> Result<u64> {
    let wire: Vec<RamRun<'_>> = runs
        .iter()
        .map(|&(first_page, n)| RamRun {
            first_page,
            data: RunData::Zero(n),
        })
        .collect();
    out.ram_pages(region, &wire)?;
    Ok(runs.iter().map(|r| u64::from(r.1)).sum())
}

/// Reads `runs` of `region` into `buf` (at least BATCH_PAGES pages) and writes them as one
/// RAM_PAGES record, zero pages as ranges, pages with data compressed if `compressor` is on
/// and it pays. Returns the pages sent with data and as zeros.
///
/// The copy into `buf` stays: the checksum must cover the bytes sent, and the guest may change
/// a page while it is sent (the page is then dirty again and goes in the next round).
pub(crate) fn send_pages<W: Write>(
    vm: &dyn SourceVm,
    out: &mut StreamWriter<W>,
    region: u32,
    runs: &[(u64, u64)],
    buf: &mut [u8],
    compressor: &mut Compressor,
) -> Result<(u64, u64)> {
    let (mut normal, mut zeros) = (0, 0);
    let mut at = 0;
    for &(s, n) in runs {
        let len = n as usize * PAGE_SIZE;
        vm.ram().read_pages(region, s, &mut buf[at..at + len])?;
        at += len;
    }
    let mut wire: Vec<RamRun<'_>> = Vec::with_capacity(runs.len() * 2);
    let mut at = 0;
    for &(s, n) in runs {
        let mut k = 0;
        while k < n {
            let zero = is_zero(&buf[at..at + PAGE_SIZE]);
            let start_k = k;
            let start_at = at;
            while k < n && is_zero(&buf[at..at + PAGE_SIZE]) == zero {
                k += 1;
                at += PAGE_SIZE;
            }
            let count = k - start_k;
            if zero {
                zeros += count;
                wire.push(RamRun {
                    first_page: s + start_k,
                    data: RunData::Zero(count as u32),
                });
            } else {
                normal += count;
                wire.push(RamRun {
                    first_page: s + start_k,
                    data: RunData::Raw(&buf[start_at..at]),
                });
            }
        }
    }
    compressor.compress_runs(&mut wire);
    out.ram_pages(region, &wire)?;
    Ok((normal, zeros))
}

impl SaveParticipant for RamSaver {
    fn name(&self) -> &'static str {
        "ram"
    }

    fn save_setup(&mut self, out: &mut Out<'_>) -> Result<()> {
        self.vm.ram().start_dirty_log()?;
        self.logging = true;
        // Round 1: every page that may hold data; the rest is known zero, and goes now. One
        // look at what is populated serves both (the dirty log, on already, catches the rest).
        let mut populated = Vec::with_capacity(self.regions.len());
        for r in self.regions.iter_mut() {
            let ranges = self.vm.ram().populated(r.info.id);
            for range in &ranges {
                r.set_range(range.clone());
            }
            populated.push((r.info.id, r.pages, ranges));
        }
        self.cursor = (0, 0);
        self.counters.zero += send_holes(&populated, out, self.channels.as_deref())?;
        Ok(())
    }

    fn use_compression(&mut self, compression: Compression) -> Result<()> {
        self.compressor = Compressor::new(compression)
            .map_err(|e| crate::MigrateError::Vm(format!("compression: {e}")))?;
        Ok(())
    }

    fn use_channels(&mut self, channels: &Arc<DataChannels>) -> bool {
        self.channels = Some(channels.clone());
        true
    }

    fn sync(&mut self) -> Result<u64> {
        let before: u64 = self.regions.iter().map(Dirty::count).sum();
        for r in self.regions.iter_mut() {
            self.vm.ram().sync_dirty(r.info.id, &mut r.bits)?;
        }
        let after: u64 = self.regions.iter().map(Dirty::count).sum();
        self.counters.last_sync_dirty = after - before;
        self.cursor = (0, 0);
        Ok((after - before) * PAGE)
    }

    fn progress(&self) -> Progress {
        let (mut data_pages, mut zero_pages) = (self.counters.normal, self.counters.zero);
        if let Some(ch) = &self.channels {
            data_pages += ch.counters.normal.load(Ordering::Relaxed);
            zero_pages += ch.counters.zero.load(Ordering::Relaxed);
        }
        Progress {
            data_pages,
            zero_pages,
        }
    }

    fn pending(&self) -> u64 {
        self.regions.iter().map(Dirty::count).sum::<u64>() * PAGE
    }

    fn iterate(&mut self, out: &mut Out<'_>) -> Result<bool> {
        self.send_batch(out)
    }

    fn complete_precopy(&mut self, out: &mut Out<'_>) -> Result<()> {
        while self.send_batch(out)? {}
        Ok(())
    }

    fn cleanup(&mut self) {
        if self.logging {
            self.vm.ram().stop_dirty_log();
            self.logging = false;
        }
    }
}

/// The zero ranges of round 1: pages known to hold nothing, sent as ranges so that the stream
/// describes all of RAM (a saved file restores into any memory).
fn send_holes(
    populated: &[(u32, u64, Vec<std::ops::Range<u64>>)],
    out: &mut Out<'_>,
    channels: Option<&DataChannels>,
) -> Result<u64> {
    let mut total = 0;
    for (id, pages, ranges) in populated {
        let (id, pages) = (*id, *pages);
        let mut holes = Vec::new();
        let mut next = 0;
        for r in ranges {
            if r.start > next {
                holes.push((next, r.start - next));
            }
            next = next.max(r.end);
        }
        if next < pages {
            holes.push((next, pages - next));
        }
        for chunk in holes.chunks(1024) {
            let mut runs = Vec::new();
            for &(s, n) in chunk {
                let mut s = s;
                let mut n = n;
                while n > 0 {
                    let c = n.min(u64::from(u32::MAX));
                    runs.push((s, c as u32));
                    s += c;
                    n -= c;
                }
            }
            match channels {
                // Counted by the channel that sends them.
                Some(ch) => ch.send(Job::Zero { region: id, runs })?,
                None => total += send_zero_runs(out, id, &runs)?,
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero(&p));
    }

    #[test]
    fn bitmap_scan() {
        let mut d = Dirty {
            info: RegionInfo {
                id: 0,
                name: "r".into(),
                gpa: 0,
                size: 200 * PAGE,
            },
            pages: 200,
            bits: vec![0; 4],
        };
        d.set_range(3..5);
        d.set_range(130..131);
        d.set_range(199..300);
        assert_eq!(d.count(), 4);
        assert_eq!(d.next_set(0), Some(3));
        assert_eq!(d.next_set(5), Some(130));
        assert_eq!(d.next_set(131), Some(199));
        assert!(d.test_and_clear(199));
        assert_eq!(d.next_set(131), None);
    }
}
