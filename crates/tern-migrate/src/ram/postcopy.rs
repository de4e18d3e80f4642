//! RAM under postcopy (`docs/stream-format.md`, *Postcopy*): what the target must drop, and
//! the pages it asks for.

use super::{RamSaver, BATCH_PAGES};
use crate::participant::Out;
use crate::Result;

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
            if self.regions[ri].test_and_clear(p) {
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
}
