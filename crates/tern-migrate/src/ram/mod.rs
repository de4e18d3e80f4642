//! RAM, the first iterative participant: dirty bitmaps in, RAM_PAGES records out.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tern_wire::{Compression, Compressor, RamRun, RunData, StreamWriter, PAGE_SIZE};

use crate::participant::{Out, Progress, SaveParticipant};
use crate::source::multifd::{DataChannels, Job};
use crate::{DirtyLogMode, RegionInfo, Result, SourceVm};

mod loader;
mod postcopy;
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

/// Pages whose tracking is re-armed at once, ahead of the send cursor, in manual-protect mode
/// (16 MiB; a multiple of 64 as KVM requires). Smaller chunks mean more ioctls; larger ones a
/// wider window in which a page written after its re-arming but before its read is sent twice.
const CLEAR_CHUNK_PAGES: u64 = 4096;

/// Pages of one region still to send this round, as a bitmap.
struct Dirty {
    info: RegionInfo,
    pages: u64,
    bits: Vec<u64>,
    /// The bits set in `bits`, kept as they change: counting them would cost a pass over a
    /// bitmap that grows with RAM at every sync.
    left: u64,
    /// Manual protect: tracking is re-armed this round for the pages below this one.
    armed_to: u64,
}

impl Dirty {
    fn set_range(&mut self, r: std::ops::Range<u64>) {
        for p in r.start..r.end.min(self.pages) {
            let (w, b) = ((p / 64) as usize, 1u64 << (p % 64));
            self.left += u64::from(self.bits[w] & b == 0);
            self.bits[w] |= b;
        }
    }
    fn count(&self) -> u64 {
        self.left
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
        self.left -= u64::from(was);
        was
    }
}

/// A batch of pages to send: the region and its runs of (first page, count).
type Batch = (u32, Vec<(u64, u64)>);

/// Counters the engine turns into statistics.
#[derive(Clone, Copy, Debug, Default)]
pub struct RamCounters {
    /// Pages sent with data.
    pub normal: u64,
    /// Pages sent as zero ranges.
    pub zero: u64,
    /// Pages found dirty by the last sync.
    pub last_sync_dirty: u64,
    /// Microseconds spent re-arming tracking (manual protect).
    pub rearm_us: u64,
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
    /// The dirty-log mode asked for, then the one in use.
    dirty_log: DirtyLogMode,
    /// The guest is paused for good: nothing needs re-arming any more.
    paused: bool,
    /// Postcopy: the scan wraps around until every page went.
    postcopy: bool,
    /// Postcopy: who sends each page still to send (the scan or the urgent sender).
    claims: Option<Arc<postcopy::Claims>>,
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
                    left: 0,
                    armed_to: 0,
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
            dirty_log: DirtyLogMode::default(),
            paused: false,
            postcopy: false,
            claims: None,
        }
    }

    /// Manual protect: re-arms tracking of the chunk that starts at page `q`'s word, for the
    /// pages of it still to send this round (`q` and after), before any of them is read.
    ///
    /// The correctness argument of manual protect, in order: (1) a sync copies the hypervisor's
    /// record of written pages into `bits`; those pages stay writable and recorded. (2) Here,
    /// before a page is read, its tracking is re-armed: the record of it is dropped and its
    /// next write is recorded again. (3) The page is read (on this thread, or on a data channel
    /// after this call returns and the job is queued). A write before (2) is in what (3) reads;
    /// a write after (2) is in the next sync, so the page goes again. Re-arming *after* the read
    /// would lose a write between the two: the page was writable, so that write left no record,
    /// and re-arming drops the record from (1). So only pages that are still to be read are
    /// named here — never one already sent this round, which may have been written since —
    /// and the mask is cut below `q`.
    fn arm(&mut self, ri: usize, q: u64) -> Result<()> {
        let r = &mut self.regions[ri];
        let start = q & !63;
        let end = (start + CLEAR_CHUNK_PAGES).min(r.pages);
        let mut mask = r.bits[(start / 64) as usize..end.div_ceil(64) as usize].to_vec();
        mask[0] &= !0u64 << (q % 64);
        r.armed_to = end;
        let t = std::time::Instant::now();
        let res = self.vm.ram().clear_dirty(r.info.id, start, &mask);
        self.counters.rearm_us += t.elapsed().as_micros() as u64;
        res
    }

    /// Takes the next batch of dirty pages from the cursor, clearing them: (region, runs of
    /// (first page, count)). None once the round is done.
    fn next_batch(&mut self) -> Result<Option<Batch>> {
        let (mut ri, mut from) = self.cursor;
        // Find the next region with a dirty page.
        let first = loop {
            let Some(r) = self.regions.get(ri) else {
                self.cursor = (ri, 0);
                return Ok(None);
            };
            match r.next_set(from) {
                Some(p) => break p,
                None => {
                    ri += 1;
                    from = 0;
                }
            }
        };
        let rearm = self.dirty_log == DirtyLogMode::Clear && !self.paused;
        // Collect up to BATCH_PAGES dirty pages as runs of consecutive pages.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut taken = 0usize;
        let mut p = first;
        while taken < BATCH_PAGES {
            let Some(q) = self.regions[ri].next_set(p) else {
                break;
            };
            if rearm && q >= self.regions[ri].armed_to {
                self.arm(ri, q)?;
            }
            self.regions[ri].test_and_clear(q);
            if self.claims.as_ref().is_some_and(|c| !c.take(ri, q)) {
                // The urgent sender sent it.
                p = q + 1;
                continue;
            }
            match runs.last_mut() {
                Some((s, n)) if *s + *n == q => *n += 1,
                _ => runs.push((q, 1)),
            }
            taken += 1;
            p = q + 1;
        }
        self.cursor = (ri, p);
        Ok(Some((self.regions[ri].info.id, runs)))
    }

    /// Sends one batch of dirty pages, on the stream or to the data channels. Returns false when
    /// the round is done.
    fn send_batch(&mut self, out: &mut Out<'_>) -> Result<bool> {
        let batch = match self.next_batch()? {
            // Postcopy moved the scan on after a requested page: what it skipped is still due.
            None if self.postcopy && self.regions.iter().any(|r| r.left > 0) => {
                self.cursor = (0, 0);
                self.next_batch()?
            }
            b => b,
        };
        let Some((id, runs)) = batch else {
            return Ok(false);
        };
        match &self.channels {
            Some(ch) => ch.send(Job::Pages { region: id, runs })?,
            None => {
                self.send_runs(out, id, &runs)?;
            }
        }
        Ok(true)
    }

    /// Sends `runs` (at most BATCH_PAGES pages) of `region` on the main stream; returns the
    /// pages sent.
    fn send_runs(&mut self, out: &mut Out<'_>, region: u32, runs: &[(u64, u64)]) -> Result<u64> {
        let (normal, zero) = send_pages(
            &*self.vm,
            out,
            region,
            runs,
            &mut self.buf,
            &mut self.compressor,
        )?;
        self.counters.normal += normal;
        self.counters.zero += zero;
        Ok(normal + zero)
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
        self.dirty_log = self.vm.ram().start_dirty_log(self.dirty_log)?;
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

    fn use_dirty_log(&mut self, mode: DirtyLogMode) {
        self.dirty_log = mode;
    }

    fn dirty_log(&self) -> Option<DirtyLogMode> {
        self.logging.then_some(self.dirty_log)
    }

    fn sync(&mut self) -> Result<u64> {
        let mut new = 0;
        for r in self.regions.iter_mut() {
            let n = self.vm.ram().sync_dirty(r.info.id, &mut r.bits)?;
            r.left += n;
            new += n;
            r.armed_to = 0;
        }
        self.counters.last_sync_dirty = new;
        self.cursor = (0, 0);
        Ok(new * PAGE)
    }

    fn progress(&self) -> Progress {
        let (mut data_pages, mut zero_pages) = (self.counters.normal, self.counters.zero);
        if let Some(ch) = &self.channels {
            data_pages += ch.counters.normal.load(Ordering::Relaxed);
            zero_pages += ch.counters.zero.load(Ordering::Relaxed);
        }
        if let Some(c) = &self.claims {
            data_pages += c.normal.load(Ordering::Relaxed);
            zero_pages += c.zero.load(Ordering::Relaxed);
        }
        Progress {
            data_pages,
            zero_pages,
            rearm_us: self.counters.rearm_us,
        }
    }

    fn pending(&self) -> u64 {
        self.regions.iter().map(Dirty::count).sum::<u64>() * PAGE
    }

    fn iterate(&mut self, out: &mut Out<'_>) -> Result<bool> {
        self.send_batch(out)
    }

    fn complete_precopy(&mut self, out: &mut Out<'_>) -> Result<()> {
        // The guest is paused and will not run here again unless the migration fails, which
        // turns tracking off: what is left needs no re-arming.
        self.paused = true;
        while self.send_batch(out)? {}
        Ok(())
    }

    fn postcopy_discard(&mut self, out: &mut Out<'_>) -> Result<()> {
        self.discard_pending(out)
    }

    fn postcopy_serve(
        &mut self,
        out: &mut Out<'_>,
        region: u32,
        first_page: u64,
        count: u64,
    ) -> Result<u64> {
        self.serve(out, region, first_page, count)
    }

    fn postcopy_urgent(&mut self) -> Option<Arc<dyn crate::participant::UrgentPages>> {
        self.urgent_sender()
    }

    fn postcopy_held(&mut self, region: u32, first_page: u64, words: &[u64]) -> Result<u64> {
        self.held(region, first_page, words)
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
            left: 0,
            armed_to: 0,
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
