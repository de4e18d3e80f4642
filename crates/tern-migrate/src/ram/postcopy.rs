//! RAM under postcopy (`docs/stream-format.md`, *Postcopy*): what the target must drop, and
//! the pages it asks for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tern_wire::{Compression, Compressor, PAGE_SIZE};

use super::{send_pages, RamSaver, BATCH_PAGES};
use crate::participant::{Out, UrgentPages};
use crate::{Result, SourceVm};

/// The pages still to send after the switch, per region (by index): whoever sends a page first
/// — the scan or, with postcopy-preempt, the urgent sender — claims it, so each goes once.
pub(crate) struct Claims {
    regions: Vec<Vec<AtomicU64>>,
    /// Pages the urgent sender sent, with data and as zeros.
    pub(crate) normal: AtomicU64,
    pub(crate) zero: AtomicU64,
}

impl Claims {
    /// Claims page `p` of region index `ri`: true if it was still to send.
    pub(crate) fn take(&self, ri: usize, p: u64) -> bool {
        let Some(w) = self.regions.get(ri).and_then(|r| r.get((p / 64) as usize)) else {
            return false;
        };
        let b = 1u64 << (p % 64);
        w.fetch_and(!b, Ordering::AcqRel) & b != 0
    }
}

/// Sends requested pages on the urgent stream (postcopy-preempt).
struct Urgent {
    vm: Arc<dyn SourceVm>,
    claims: Arc<Claims>,
    /// Region ids, by index, and their pages.
    regions: Vec<(u32, u64)>,
    buf: Mutex<(Vec<u8>, Compressor)>,
}

impl UrgentPages for Urgent {
    fn send(&self, out: &mut Out<'_>, region: u32, first_page: u64, count: u64) -> Result<u64> {
        let Some(ri) = self.regions.iter().position(|r| r.0 == region) else {
            return Ok(0);
        };
        let end = first_page.saturating_add(count).min(self.regions[ri].1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut sent = 0;
        let mut b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let (buf, compressor) = &mut *b;
        for p in first_page..end {
            if !self.claims.take(ri, p) {
                continue;
            }
            match runs.last_mut() {
                Some((s, n)) if *s + *n == p => *n += 1,
                _ => runs.push((p, 1)),
            }
            if runs.iter().map(|r| r.1).sum::<u64>() == BATCH_PAGES as u64 {
                let (n, z) = send_pages(&*self.vm, out, region, &runs, buf, compressor)?;
                self.claims.normal.fetch_add(n, Ordering::Relaxed);
                self.claims.zero.fetch_add(z, Ordering::Relaxed);
                sent += n + z;
                runs.clear();
            }
        }
        if !runs.is_empty() {
            let (n, z) = send_pages(&*self.vm, out, region, &runs, buf, compressor)?;
            self.claims.normal.fetch_add(n, Ordering::Relaxed);
            self.claims.zero.fetch_add(z, Ordering::Relaxed);
            sent += n + z;
        }
        Ok(sent)
    }
}

impl RamSaver {
    /// Postcopy, the guest paused after the last sync: DISCARD for every page still to send
    /// (stale or absent at the target); from now on nothing is re-armed and the scan wraps
    /// around until every page went.
    pub(super) fn discard_pending(&mut self, out: &mut Out<'_>) -> Result<()> {
        if self.channels.is_some() {
            return Err(crate::MigrateError::Vm(
                "postcopy with data channels is not supported".into(),
            ));
        }
        self.paused = true;
        self.postcopy = true;
        self.cursor = (0, 0);
        self.claims = Some(Arc::new(Claims {
            regions: self
                .regions
                .iter()
                .map(|r| r.bits.iter().map(|&w| AtomicU64::new(w)).collect())
                .collect(),
            normal: AtomicU64::new(0),
            zero: AtomicU64::new(0),
        }));
        for r in &self.regions {
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            let mut p = 0;
            while let Some(s) = r.next_set(p) {
                let mut e = s + 1;
                while e < r.pages && r.bits[(e / 64) as usize] & (1 << (e % 64)) != 0 {
                    e += 1;
                }
                ranges.push((s, e - s));
                p = e;
                if ranges.len() == tern_wire::MAX_DISCARD_RANGES {
                    out.postcopy(&tern_wire::PostcopyCommand::Discard {
                        region: r.info.id,
                        ranges: std::mem::take(&mut ranges),
                    })?;
                }
            }
            if !ranges.is_empty() {
                out.postcopy(&tern_wire::PostcopyCommand::Discard {
                    region: r.info.id,
                    ranges,
                })?;
            }
        }
        Ok(())
    }

    /// Postcopy: sends the requested pages still to send, and moves the scan just after them.
    pub(super) fn serve(
        &mut self,
        out: &mut Out<'_>,
        region: u32,
        first_page: u64,
        count: u64,
    ) -> Result<u64> {
        let Some(ri) = self.regions.iter().position(|r| r.info.id == region) else {
            return Ok(0);
        };
        let end = first_page.saturating_add(count).min(self.regions[ri].pages);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in first_page..end {
            let claimed = self.claims.as_ref().is_none_or(|c| c.take(ri, p));
            if self.regions[ri].test_and_clear(p) && claimed {
                match runs.last_mut() {
                    Some((s, n)) if *s + *n == p => *n += 1,
                    _ => runs.push((p, 1)),
                }
            }
        }
        let mut sent = 0;
        for chunk in runs.chunks(BATCH_PAGES) {
            // At most BATCH_PAGES runs, but a run may be long: cut to what the buffer holds.
            let mut batch: Vec<(u64, u64)> = Vec::new();
            let mut pages = 0;
            for &(s, n) in chunk {
                let mut s = s;
                let mut n = n;
                while n > 0 {
                    let take = n.min((BATCH_PAGES - pages) as u64);
                    batch.push((s, take));
                    pages += take as usize;
                    s += take;
                    n -= take;
                    if pages == BATCH_PAGES {
                        sent += self.send_runs(out, region, &std::mem::take(&mut batch))?;
                        pages = 0;
                    }
                }
            }
            if !batch.is_empty() {
                sent += self.send_runs(out, region, &batch)?;
            }
        }
        // The scan goes on just after the request: the pages near a fault come next.
        self.cursor = (ri, end);
        Ok(sent)
    }

    /// Recovery: the target holds the pages set in `words`; every other page of the range is
    /// to send (again, if it went before: the link may have lost it). The urgent sender is
    /// gone by now: its claims are folded into the counters and dropped.
    pub(super) fn held(&mut self, region: u32, first_page: u64, words: &[u64]) -> Result<u64> {
        let Some(ri) = self.regions.iter().position(|r| r.info.id == region) else {
            return Ok(0);
        };
        let bad =
            |why: String| crate::MigrateError::Vm(format!("RECEIVED for region {region}: {why}"));
        if let Some(c) = self.claims.take() {
            self.counters.normal += c.normal.load(Ordering::Relaxed);
            self.counters.zero += c.zero.load(Ordering::Relaxed);
        }
        let r = &mut self.regions[ri];
        if !first_page.is_multiple_of(64) || first_page >= r.pages.max(1) {
            return Err(bad(format!(
                "first page {first_page} is not a word of the region"
            )));
        }
        let mut resent = 0;
        for (j, &w) in words.iter().enumerate() {
            let i = (first_page / 64) as usize + j;
            let base = i as u64 * 64;
            let valid = match r.pages.saturating_sub(base) {
                0 => 0,
                n if n >= 64 => u64::MAX,
                n => (1u64 << n) - 1,
            };
            if w & !valid != 0 {
                return Err(bad(format!("pages past the region's end at word {i}")));
            }
            let want = !w & valid;
            let Some(old) = r.bits.get_mut(i) else {
                continue;
            };
            resent += u64::from((want & !*old).count_ones());
            r.left = r.left - u64::from(old.count_ones()) + u64::from(want.count_ones());
            *old = want;
        }
        self.cursor = (0, 0);
        Ok(resent)
    }

    /// Postcopy-preempt: the sender of requested pages, sharing this saver's claims.
    pub(super) fn urgent_sender(&mut self) -> Option<Arc<dyn UrgentPages>> {
        let claims = self.claims.clone()?;
        Some(Arc::new(Urgent {
            vm: self.vm.clone(),
            claims,
            regions: self.regions.iter().map(|r| (r.info.id, r.pages)).collect(),
            buf: Mutex::new((
                vec![0; BATCH_PAGES * PAGE_SIZE],
                Compressor::new(Compression::None).expect("no compression needs nothing"),
            )),
        }))
    }
}
