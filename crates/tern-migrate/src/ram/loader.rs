//! RAM on the target: pages written where they belong, and a helper that allocates ahead of
//! them (bounded by what has arrived).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tern_wire::{ErrorKind, PagePlacer, RamRecord, Record, VmDescription, ENC_RAW, ENC_ZERO};

use super::PAGE;
use crate::participant::{LoadParticipant, Progress};
use crate::{MigrateError, Result, TargetRam, TargetVm};

/// Lets a stream reader put RAW pages straight into guest RAM.
pub(crate) struct Placer<'a>(pub(crate) &'a dyn TargetRam);

impl PagePlacer for Placer<'_> {
    fn place(
        &mut self,
        region: u32,
        first_page: u64,
        count: u32,
        fill: &mut dyn FnMut(&mut [u8]) -> std::result::Result<(), ErrorKind>,
    ) -> std::result::Result<(), ErrorKind> {
        let mut filled = Ok(());
        self.0
            .fill_pages(region, first_page, u64::from(count), &mut |dst| {
                filled = fill(dst)
            })
            .map_err(|e| ErrorKind::Placement(e.to_string()))?;
        filled
    }
}

/// Puts a RAM record into guest RAM: RAW data (unless the reader placed it already), zero
/// ranges, compressed runs decompressed in place. Calls `claim` before it touches a run's
/// pages (the reader claimed the placed ones), `landed` with the end of every run with data;
/// returns the pages with data and the zero pages.
pub(crate) fn apply(
    ram: &dyn TargetRam,
    rec: &RamRecord<'_>,
    claim: &mut dyn FnMut(u32, u64, u64) -> Result<()>,
    mut landed: impl FnMut(u64),
) -> Result<(u64, u64)> {
    let (mut data, mut zero) = (0u64, 0u64);
    for run in &rec.runs {
        let count = u64::from(run.count);
        if !(rec.placed && run.encoding == ENC_RAW) {
            claim(rec.region, run.first_page, count)?;
        }
        match run.encoding {
            ENC_ZERO => {
                ram.zero_pages(rec.region, run.first_page, count)?;
                zero += count;
                continue;
            }
            ENC_RAW if rec.placed => {}
            ENC_RAW => ram.write_pages(rec.region, run.first_page, rec.data(run))?,
            enc => {
                let mut done = Ok(());
                ram.fill_pages(rec.region, run.first_page, count, &mut |dst| {
                    done = tern_wire::decompress_run(enc, rec.data(run), dst)
                })?;
                done.map_err(|k| MigrateError::Vm(k.to_string()))?;
            }
        }
        data += count;
        landed(run.first_page + count);
    }
    Ok((data, zero))
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
    prefault_thread: Option<std::thread::JoinHandle<()>>,
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
        match spawned {
            Ok(t) => self.prefault_thread = Some(t),
            Err(e) => tracing::debug!("no prefault helper: {e}"),
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
            prefault_thread: None,
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
            ..Default::default()
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
        if self.prefault_stop.is_none() {
            for run in &ram.runs {
                if run.encoding != ENC_ZERO {
                    self.start_prefault();
                    break;
                }
                if self.holes.len() < 1 << 20 {
                    self.holes
                        .push((ram.region, run.first_page, u64::from(run.count)));
                }
            }
        }
        let base = self
            .bases
            .iter()
            .find(|b| b.0 == ram.region)
            .map_or(0, |b| b.1);
        let frontier = &self.frontier;
        // One thread writes these pages (the main channel, without data channels): no claims.
        let (data, zero) = apply(self.vm.ram(), ram, &mut |_, _, _| Ok(()), |end| {
            frontier.fetch_max(base + end, Ordering::Relaxed);
        })?;
        self.pages = self.pages.saturating_add(data);
        self.zero = self.zero.saturating_add(zero);
        Ok(true)
    }

    fn cleanup(&mut self) {
        if let Some(s) = &self.prefault_stop {
            s.store(true, Ordering::Relaxed);
        }
        // Joined: postcopy drops pages right after, and a populate still in flight could map
        // a zero page over one just dropped (it stops within one 2 MiB chunk).
        if let Some(t) = self.prefault_thread.take() {
            let _ = t.join();
        }
    }
}
