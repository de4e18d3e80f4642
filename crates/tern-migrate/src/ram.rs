//! RAM, the first iterative participant: dirty bitmaps in, RAM_PAGES records out.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tern_wire::{RamRun, Record, RunData, VmDescription, ENC_RAW, ENC_ZERO, PAGE_SIZE};

use crate::participant::{LoadParticipant, Out, Progress, SaveParticipant};
use crate::{MigrateError, RegionInfo, Result, SourceVm, TargetVm};

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
        }
    }

    /// Sends one batch of dirty pages from the cursor. Returns false when the round is done.
    fn send_batch(&mut self, out: &mut Out<'_>) -> Result<bool> {
        let (mut ri, mut from) = self.cursor;
        // Find the next region with a dirty page.
        let first = loop {
            let Some(r) = self.regions.get(ri) else {
                self.cursor = (ri, 0);
                return Ok(false);
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
        let id = region.info.id;
        // Copy the pages out, then describe them as data and zero runs.
        let mut at = 0;
        for &(s, n) in &runs {
            let len = n as usize * PAGE_SIZE;
            self.vm
                .ram()
                .read_pages(id, s, &mut self.buf[at..at + len])?;
            at += len;
        }
        let mut wire: Vec<RamRun<'_>> = Vec::with_capacity(runs.len() * 2);
        let mut at = 0;
        for &(s, n) in &runs {
            let mut k = 0;
            while k < n {
                let zero = is_zero(&self.buf[at..at + PAGE_SIZE]);
                let start_k = k;
                let start_at = at;
                while k < n && is_zero(&self.buf[at..at + PAGE_SIZE]) == zero {
                    k += 1;
                    at += PAGE_SIZE;
                }
                let count = k - start_k;
                if zero {
                    self.counters.zero += count;
                    wire.push(RamRun {
                        first_page: s + start_k,
                        data: RunData::Zero(count as u32),
                    });
                } else {
                    self.counters.normal += count;
                    wire.push(RamRun {
                        first_page: s + start_k,
                        data: RunData::Raw(&self.buf[start_at..at]),
                    });
                }
            }
        }
        out.ram_pages(id, &wire)?;
        Ok(true)
    }
}

impl SaveParticipant for RamSaver {
    fn name(&self) -> &'static str {
        "ram"
    }

    fn save_setup(&mut self, out: &mut Out<'_>) -> Result<()> {
        self.vm.ram().start_dirty_log()?;
        self.logging = true;
        // Round 1: every page that may hold data; the rest is known zero, and goes now.
        for r in self.regions.iter_mut() {
            for range in self.vm.ram().populated(r.info.id) {
                r.set_range(range);
            }
        }
        self.cursor = (0, 0);
        self.counters.zero += send_holes(&*self.vm, out)?;
        Ok(())
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
        Progress {
            data_pages: self.counters.normal,
            zero_pages: self.counters.zero,
        }
    }

    fn pending(&self) -> u64 {
        self.regions.iter().map(Dirty::count).sum::<u64>() * PAGE
    }

    fn iterate(&mut self, out: &mut Out<'_>) -> Result<bool> {
        self.send_batch(out)
    }

    fn complete_precopy(&mut self, out: &mut Out<'_>) -> Result<()> {
        self.sync()?;
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
fn send_holes(vm: &dyn SourceVm, out: &mut Out<'_>) -> Result<u64> {
    let mut total = 0;
    for info in vm.ram().regions() {
        let pages = info.size / PAGE;
        let mut holes = Vec::new();
        let mut next = 0;
        for r in vm.ram().populated(info.id) {
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
                    runs.push(RamRun {
                        first_page: s,
                        data: RunData::Zero(c as u32),
                    });
                    total += c;
                    s += c;
                    n -= c;
                }
            }
            out.ram_pages(info.id, &runs)?;
        }
    }
    Ok(total)
}

/// Receives guest RAM.
pub struct RamLoader {
    vm: Arc<dyn TargetVm>,
    region_pages: Vec<(u32, u64)>,
    /// Pages written with data.
    pub pages: u64,
    /// Pages made zero.
    pub zero: u64,
    /// Zero ranges (region, first page, count) seen before the first page with data: the
    /// source's never-written memory. Everything else will arrive, so it is prefaulted.
    holes: Vec<(u32, u64, u64)>,
    /// The prefault helper, once started; set to stop it.
    prefault_stop: Option<Arc<AtomicBool>>,
    /// First page (counted across regions, in stream order) past the furthest page with data
    /// received so far: the prefault helper stays within [`PREFAULT_AHEAD`] of it.
    frontier: Arc<AtomicU64>,
    /// Where each region starts in that count.
    bases: Vec<(u32, u64)>,
}

/// Pages the prefault helper populates at a time (2 MiB).
const PREFAULT_CHUNK: u64 = 512;
/// How far (in pages: 256 MiB) the prefault helper may run ahead of the data received, so that
/// a peer that announces much memory and then sends little cannot make it fill the host.
pub const PREFAULT_AHEAD: u64 = 65536;

impl RamLoader {
    /// Starts a thread that allocates, in stream order, every page not known to stay zero, so
    /// that the loader's copies do not pay for first touches (on this kind of host a first
    /// touch of shared memory costs more than the copy).
    fn start_prefault(&mut self) {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.prefault_stop = Some(stop.clone());
        let mut ranges = Vec::new();
        for &(region, pages) in &self.region_pages {
            let mut holes: Vec<(u64, u64)> = self
                .holes
                .iter()
                .filter(|h| h.0 == region)
                .map(|h| (h.1, h.2))
                .collect();
            holes.sort_unstable();
            let mut next = 0;
            for (start, count) in holes {
                if start > next {
                    ranges.push((region, next, start - next));
                }
                next = next.max(start.saturating_add(count));
            }
            if next < pages {
                ranges.push((region, next, pages - next));
            }
        }
        tracing::debug!(
            ranges = ranges.len(),
            pages = ranges.iter().map(|r| r.2).sum::<u64>(),
            "prefault helper started"
        );
        let vm = self.vm.clone();
        let frontier = self.frontier.clone();
        let bases = self.bases.clone();
        let spawned = std::thread::Builder::new()
            .name("ram-prefault".into())
            .spawn(move || {
                for (region, first, count) in ranges {
                    let base = bases.iter().find(|b| b.0 == region).map_or(0, |b| b.1);
                    let mut p = first;
                    while p < first + count {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        // Never further ahead of the data than PREFAULT_AHEAD.
                        if base + p > frontier.load(Ordering::Relaxed) + PREFAULT_AHEAD {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            continue;
                        }
                        let n = PREFAULT_CHUNK.min(first + count - p);
                        vm.ram().prefault(region, p, n);
                        p += n;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::debug!("no prefault helper: {e}");
        }
    }
}

impl Drop for RamLoader {
    fn drop(&mut self) {
        if let Some(s) = &self.prefault_stop {
            s.store(true, Ordering::Relaxed);
        }
    }
}

impl RamLoader {
    pub fn new(vm: Arc<dyn TargetVm>) -> Self {
        RamLoader {
            vm,
            region_pages: Vec::new(),
            pages: 0,
            zero: 0,
            holes: Vec::new(),
            prefault_stop: None,
            frontier: Arc::new(AtomicU64::new(0)),
            bases: Vec::new(),
        }
    }
}

impl LoadParticipant for RamLoader {
    fn name(&self) -> &'static str {
        "ram"
    }

    fn progress(&self) -> Progress {
        Progress {
            data_pages: self.pages,
            zero_pages: self.zero,
        }
    }

    fn load_setup(&mut self, desc: &VmDescription) -> Result<()> {
        // The stream's regions must be this VM's, exactly: sizes from the peer are trusted for
        // nothing else (the prefault helper walks them).
        let mine = self.vm.ram().regions();
        let same = desc.ram.len() == mine.len()
            && desc
                .ram
                .iter()
                .zip(&mine)
                .all(|(d, m)| d.id == m.id && d.gpa == m.gpa && d.size == m.size);
        if !same {
            let show = |v: Vec<(u32, u64, u64)>| {
                v.iter()
                    .map(|(id, gpa, size)| format!("{id}: {size:#x} bytes at {gpa:#x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(MigrateError::Mismatch(format!(
                "the stream's RAM regions [{}] are not this VM's [{}]",
                show(desc.ram.iter().map(|r| (r.id, r.gpa, r.size)).collect()),
                show(mine.iter().map(|r| (r.id, r.gpa, r.size)).collect()),
            )));
        }
        self.region_pages = desc.ram.iter().map(|r| (r.id, r.size / PAGE)).collect();
        let mut base = 0;
        self.bases = self
            .region_pages
            .iter()
            .map(|&(id, pages)| {
                let b = (id, base);
                base += pages;
                b
            })
            .collect();
        Ok(())
    }

    fn load(&mut self, record: &Record<'_>) -> Result<bool> {
        let Record::Ram(ram) = record else {
            return Ok(false);
        };
        for run in &ram.runs {
            if self.prefault_stop.is_none() {
                if run.encoding == ENC_ZERO {
                    if self.holes.len() < 1 << 20 {
                        self.holes
                            .push((ram.region, run.first_page, u64::from(run.count)));
                    }
                } else {
                    self.start_prefault();
                }
            }
            match run.encoding {
                ENC_RAW => {
                    self.vm
                        .ram()
                        .write_pages(ram.region, run.first_page, ram.data(run))?;
                    self.pages = self.pages.saturating_add(u64::from(run.count));
                    let base = self
                        .bases
                        .iter()
                        .find(|b| b.0 == ram.region)
                        .map_or(0, |b| b.1);
                    self.frontier.fetch_max(
                        base + run.first_page + u64::from(run.count),
                        Ordering::Relaxed,
                    );
                }
                ENC_ZERO => {
                    self.vm
                        .ram()
                        .zero_pages(ram.region, run.first_page, u64::from(run.count))?;
                    self.zero = self.zero.saturating_add(u64::from(run.count));
                }
                other => {
                    return Err(MigrateError::Vm(format!(
                        "RAM encoding {other} reached the loader"
                    )))
                }
            }
        }
        Ok(true)
    }

    fn cleanup(&mut self) {
        if let Some(s) = &self.prefault_stop {
            s.store(true, Ordering::Relaxed);
        }
    }
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
