//! The target's postcopy (`docs/stream-format.md`, *Postcopy*): which pages it holds, a fault
//! thread that asks the source for the others, pages placed whole as they arrive, and what the
//! faults cost (QEMU 10.1's `postcopy-blocktime`, `postcopy-latency` and their kin).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern_wire::{RamRecord, ReturnMessage, ENC_RAW, ENC_ZERO, PAGE_SIZE};

use super::readahead::Readahead;
use crate::transport::Connection;
use crate::{MigrateError, PostcopyRam, RegionInfo, Result};

/// Buckets of `postcopy-latency-dist`: bucket i counts faults served in [2^i, 2^(i+1)) µs.
const DIST_BUCKETS: usize = 32;

/// What the faults cost, for `query-migrate` on the target.
#[derive(Clone, Debug, Default)]
pub struct FaultStats {
    /// Faults that asked the source for their page (the readahead window asked for after one
    /// is not counted again).
    pub requests: u64,
    /// Faults on pages known to be zero, served here.
    pub zero_faults: u64,
    /// Time during which every vCPU waited for a page at once, ms.
    pub blocktime_ms: u64,
    /// Time each vCPU waited for pages, ms.
    pub vcpu_blocktime_ms: Vec<u64>,
    /// Remote faults: count and summed latency (fault to page placed), ns; all and per vCPU.
    pub faults: u64,
    pub latency_ns_sum: u128,
    pub vcpu_faults: Vec<u64>,
    pub vcpu_latency_ns_sum: Vec<u128>,
    /// Log2 buckets of remote-fault latency in µs.
    pub dist: Vec<u64>,
    /// Remote faults over time: per 100 ms since LISTEN, (faults served, summed latency ns).
    pub series: Vec<(u64, u128)>,
    /// Whether blocktime is reported (`postcopy-blocktime` on the target).
    pub report_blocktime: bool,
}

impl FaultStats {
    /// Adds QEMU's fields to a `query-migrate` reply.
    pub fn to_qmp(&self, v: &mut Value) {
        if let Some(ram) = v.get_mut("ram") {
            ram["postcopy-requests"] = json!(self.requests);
        }
        if !self.report_blocktime {
            return;
        }
        v["postcopy-blocktime"] = json!(self.blocktime_ms);
        v["postcopy-vcpu-blocktime"] = json!(self.vcpu_blocktime_ms);
        let mean = |n: u64, sum: u128| {
            if n == 0 {
                0
            } else {
                (sum / u128::from(n)) as u64
            }
        };
        v["postcopy-latency"] = json!(mean(self.faults, self.latency_ns_sum));
        v["postcopy-vcpu-latency"] = json!(self
            .vcpu_faults
            .iter()
            .zip(&self.vcpu_latency_ns_sum)
            .map(|(&n, &s)| mean(n, s))
            .collect::<Vec<_>>());
        v["postcopy-latency-dist"] = json!(self.dist);
        v["x-tern-postcopy-latency-series"] = json!(self
            .series
            .iter()
            .enumerate()
            .filter(|(_, &(n, _))| n > 0)
            .map(|(i, &(n, sum))| json!({
                "t": i as f64 / 10.0,
                "faults": n,
                "mean-latency-us": (sum / u128::from(n) / 1000) as u64,
            }))
            .collect::<Vec<_>>());
        v["x-tern-postcopy-zero-faults"] = json!(self.zero_faults);
    }
}

/// Faults waiting for a page: when the first came, and which vCPUs wait.
struct Waiting {
    since: Instant,
    vcpus: Vec<(usize, Instant)>,
    others: u64,
}

/// The running account of who waits, for blocktime.
struct Account {
    stats: FaultStats,
    /// When fault handling began (the series counts from here).
    start: Instant,
    pending: HashMap<(u32, u64), Waiting>,
    blocked: Vec<bool>,
    all_blocked_since: Option<Instant>,
}

impl Account {
    fn block(&mut self, vcpu: usize, now: Instant) {
        if vcpu < self.blocked.len() && !self.blocked[vcpu] {
            self.blocked[vcpu] = true;
            if self.blocked.iter().all(|&b| b) {
                self.all_blocked_since = Some(now);
            }
        }
    }

    fn unblock(&mut self, vcpu: usize, since: Instant, now: Instant) {
        if vcpu >= self.blocked.len() || !self.blocked[vcpu] {
            return;
        }
        if let Some(t) = self.all_blocked_since.take() {
            self.stats.blocktime_ms += now.duration_since(t).as_millis() as u64;
        }
        self.blocked[vcpu] = false;
        self.stats.vcpu_blocktime_ms[vcpu] += now.duration_since(since).as_millis() as u64;
    }

    fn latency(&mut self, vcpu: Option<usize>, d: Duration) {
        let ns = d.as_nanos();
        self.stats.faults += 1;
        self.stats.latency_ns_sum += ns;
        if let Some(i) = vcpu.filter(|&i| i < self.stats.vcpu_faults.len()) {
            self.stats.vcpu_faults[i] += 1;
            self.stats.vcpu_latency_ns_sum[i] += ns;
        }
        // At most 10 minutes of 100 ms buckets are kept (a bounded report).
        let bucket = (self.start.elapsed().as_millis() / 100) as usize;
        if bucket < 6000 {
            if self.stats.series.len() <= bucket {
                self.stats.series.resize(bucket + 1, (0, 0));
            }
            self.stats.series[bucket].0 += 1;
            self.stats.series[bucket].1 += ns;
        }
        let us = (d.as_micros() as u64).max(1);
        let b = (63 - us.leading_zeros() as usize).min(DIST_BUCKETS - 1);
        self.stats.dist[b] += 1;
    }
}

/// One region's pages: set = the target holds the page (or knows it is zero).
struct Held {
    bits: Vec<AtomicU64>,
    pages: u64,
}

impl Held {
    fn get(&self, p: u64) -> bool {
        self.bits[(p / 64) as usize].load(Ordering::Acquire) & (1 << (p % 64)) != 0
    }
    fn set(&self, first: u64, count: u64, on: bool) {
        for p in first..(first + count).min(self.pages) {
            let b = 1u64 << (p % 64);
            if on {
                self.bits[(p / 64) as usize].fetch_or(b, Ordering::AcqRel);
            } else {
                self.bits[(p / 64) as usize].fetch_and(!b, Ordering::AcqRel);
            }
        }
    }
    fn missing(&self) -> u64 {
        self.pages
            - self
                .bits
                .iter()
                .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
                .sum::<u64>()
    }
}

/// Postcopy on the target, from ADVISE to END.
pub(crate) struct Postcopy {
    ram: Arc<dyn PostcopyRam>,
    held: Arc<Vec<Held>>,
    account: Arc<Mutex<Account>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
    /// The connection page requests go on (`None` while postcopy is paused).
    asks: Arc<Mutex<Option<Connection>>>,
    pub(crate) listening: bool,
    /// Guest RAM is registered for faults (from the first DISCARD on).
    registered: AtomicBool,
    /// A DISCARD came: pages are missing, so the guest may only run through postcopy.
    pub(crate) discarded: AtomicBool,
}

impl Postcopy {
    /// At ADVISE: every page counts as held until DISCARD names it (the source has sent every
    /// page at least once before the switch, or names it).
    pub(crate) fn new(ram: Arc<dyn PostcopyRam>, regions: &[RegionInfo], report: bool) -> Self {
        let vcpus = ram.vcpus();
        let held = regions
            .iter()
            .map(|r| {
                let pages = r.size / PAGE_SIZE as u64;
                let words = pages.div_ceil(64) as usize;
                let h = Held {
                    bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
                    pages,
                };
                h.set(0, pages, true);
                h
            })
            .collect();
        Postcopy {
            ram,
            held: Arc::new(held),
            account: Arc::new(Mutex::new(Account {
                stats: FaultStats {
                    vcpu_blocktime_ms: vec![0; vcpus],
                    vcpu_faults: vec![0; vcpus],
                    vcpu_latency_ns_sum: vec![0; vcpus],
                    dist: vec![0; DIST_BUCKETS],
                    report_blocktime: report,
                    ..Default::default()
                },
                start: Instant::now(),
                pending: HashMap::new(),
                blocked: vec![false; vcpus],
                all_blocked_since: None,
            })),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
            asks: Arc::new(Mutex::new(None)),
            listening: false,
            registered: AtomicBool::new(false),
            discarded: AtomicBool::new(false),
        }
    }

    /// Registers guest RAM for faults, once: before the first page is dropped, so that nothing
    /// (khugepaged collapsing a huge page over dropped pages, say) can map a zero page where a
    /// dropped page will come; nothing touches guest RAM between DISCARD and LISTEN, when the
    /// fault thread starts.
    fn register(&self) -> Result<()> {
        if !self.registered.swap(true, Ordering::SeqCst) {
            self.ram.listen()?;
        }
        Ok(())
    }

    /// DISCARD: the pages fault from now on.
    pub(crate) fn discard(&self, region: u32, ranges: &[(u64, u64)]) -> Result<()> {
        self.register()?;
        self.discarded.store(true, Ordering::SeqCst);
        let h = self
            .held
            .get(region as usize)
            .ok_or_else(|| MigrateError::Vm(format!("DISCARD names unknown region {region}")))?;
        for &(first, count) in ranges {
            if count == 0 || first.checked_add(count).is_none_or(|e| e > h.pages) {
                return Err(MigrateError::Vm(format!(
                    "DISCARD of pages {first}+{count} past region {region}'s end"
                )));
            }
        }
        self.ram.discard_ranges(region, ranges)?;
        for &(first, count) in ranges {
            h.set(first, count, false);
        }
        Ok(())
    }

    /// LISTEN: missing pages fault; the fault thread asks the source for them on `conn`.
    pub(crate) fn listen(&mut self, conn: Connection) -> Result<()> {
        self.register()?;
        self.ram.before_faults();
        self.listening = true;
        self.account.lock().unwrap_or_else(|e| e.into_inner()).start = Instant::now();
        *self.asks.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
        let (ram, held, account, stop, asks) = (
            self.ram.clone(),
            self.held.clone(),
            self.account.clone(),
            self.stop.clone(),
            self.asks.clone(),
        );
        let t = std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || fault_loop(&*ram, &held, &account, &stop, &asks))
            .map_err(MigrateError::io("starting the postcopy fault thread"))?;
        self.thread = Some(t);
        Ok(())
    }

    /// Recovery: where page requests go from now on (`None` while paused: faults are only
    /// remembered, and asked for again by [`Self::waiting`] once a connection is back).
    pub(crate) fn set_conn(&self, conn: Option<Connection>) {
        *self.asks.lock().unwrap_or_else(|e| e.into_inner()) = conn;
    }

    /// Recovery: the pages faults wait for.
    pub(crate) fn waiting(&self) -> Vec<(u32, u64)> {
        let a = self.account.lock().unwrap_or_else(|e| e.into_inner());
        a.pending.keys().copied().collect()
    }

    /// Recovery: what this target holds, as RECEIVED messages covering every region in order.
    pub(crate) fn received(&self) -> Vec<ReturnMessage> {
        let mut out = Vec::new();
        for (region, h) in self.held.iter().enumerate() {
            let words: Vec<u64> = h.bits.iter().map(|w| w.load(Ordering::Acquire)).collect();
            for (i, chunk) in words.chunks(tern_wire::MAX_RECEIVED_WORDS).enumerate() {
                out.push(ReturnMessage::Received {
                    region: region as u32,
                    first_page: (i * tern_wire::MAX_RECEIVED_WORDS * 64) as u64,
                    words: chunk.to_vec(),
                });
            }
        }
        out
    }

    /// Places a record's pages (after RUN). Returns (pages with data, zero pages).
    pub(crate) fn place(&self, rec: &RamRecord<'_>) -> Result<(u64, u64)> {
        let h = self
            .held
            .get(rec.region as usize)
            .ok_or_else(|| MigrateError::Vm(format!("pages of unknown region {}", rec.region)))?;
        let (mut data, mut zero) = (0, 0);
        for run in &rec.runs {
            let count = u64::from(run.count);
            match run.encoding {
                ENC_ZERO => {
                    self.ram.place_zero(rec.region, run.first_page, count)?;
                    zero += count;
                }
                ENC_RAW => {
                    self.ram.place(rec.region, run.first_page, rec.data(run))?;
                    data += count;
                }
                enc => {
                    let mut buf = vec![0u8; count as usize * PAGE_SIZE];
                    tern_wire::decompress_run(enc, rec.data(run), &mut buf)
                        .map_err(|k| MigrateError::Vm(k.to_string()))?;
                    self.ram.place(rec.region, run.first_page, &buf)?;
                    data += count;
                }
            }
            h.set(run.first_page, count, true);
            self.arrived(rec.region, run.first_page, count);
        }
        Ok((data, zero))
    }

    /// Pages arrived: whoever waited for them runs again.
    fn arrived(&self, region: u32, first: u64, count: u64) {
        let now = Instant::now();
        let mut a = self.account.lock().unwrap_or_else(|e| e.into_inner());
        if a.pending.is_empty() {
            return;
        }
        for p in first..first + count {
            if let Some(w) = a.pending.remove(&(region, p)) {
                for (vcpu, since) in w.vcpus {
                    a.unblock(vcpu, since, now);
                    a.latency(Some(vcpu), now.duration_since(since));
                }
                for _ in 0..w.others {
                    a.latency(None, now.duration_since(w.since));
                }
            }
        }
    }

    /// END: every page must be here; fault handling ends. Returns the final statistics.
    pub(crate) fn finish(&mut self) -> Result<FaultStats> {
        let missing: u64 = self.held.iter().map(Held::missing).sum();
        if missing > 0 {
            return Err(MigrateError::GuestLost(format!(
                "the stream ended with {missing} pages never received"
            )));
        }
        // Every page is here: faults go back to the kernel first, then the thread stops.
        self.ram.finish()?;
        if let Err(e) = self.stop_thread() {
            tracing::warn!("postcopy fault thread: {e}");
        }
        Ok(self.stats())
    }

    /// Before RUN, on failure: the guest never ran, so fault handling may end whatever is
    /// missing (a load of the device state waiting on a page is let go).
    pub(crate) fn release(&self) {
        if self.registered.load(Ordering::SeqCst) {
            let _ = self.ram.finish();
        }
    }

    /// The statistics so far.
    pub(crate) fn stats(&self) -> FaultStats {
        self.account
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats
            .clone()
    }

    fn stop_thread(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        // Not to wait out the thread's poll (50 ms) before COMPLETE goes back.
        self.ram.interrupt();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(MigrateError::Vm(
                "the postcopy fault thread panicked".into(),
            )),
            None => Ok(()),
        }
    }

    /// After RUN, on failure: the guest waits for pages that will not come. The fault
    /// handling is kept registered (closing it would let the guest read zeros where its pages
    /// should be): its descriptor is deliberately never closed.
    pub(crate) fn abandon(mut self) {
        let _ = self.stop_thread();
        std::mem::forget(self.ram.clone());
    }
}

impl Drop for Postcopy {
    /// The fault thread ends with it (whatever way postcopy ended; `abandon` keeps the
    /// registration itself).
    fn drop(&mut self) {
        let _ = self.stop_thread();
    }
}

fn fault_loop(
    ram: &dyn PostcopyRam,
    held: &[Held],
    account: &Mutex<Account>,
    stop: &AtomicBool,
    asks: &Mutex<Option<Connection>>,
) -> Result<()> {
    let mut readahead = Readahead::new(ram.vcpus());
    // Which vCPU a thread is, read once per thread (/proc, on the path of every fault).
    let mut vcpus: HashMap<u32, usize> = HashMap::new();
    while !stop.load(Ordering::SeqCst) {
        for f in ram.faults(Duration::from_millis(50))? {
            let Some(h) = held.get(f.region as usize) else {
                continue;
            };
            if h.get(f.page) {
                // Held but not mapped: a page that was never written, so zero.
                ram.place_zero(f.region, f.page, 1)?;
                account
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .stats
                    .zero_faults += 1;
                continue;
            }
            let now = Instant::now();
            // Only a thread found to be a vCPU is remembered: a read of /proc that failed
            // once must not make a vCPU count as "other" for good.
            let vcpu = match vcpus.get(&f.tid) {
                Some(&v) => Some(v),
                None => ram.vcpu_of(f.tid).inspect(|&v| {
                    vcpus.insert(f.tid, v);
                }),
            };
            let first = {
                let mut a = account.lock().unwrap_or_else(|e| e.into_inner());
                let first = !a.pending.contains_key(&(f.region, f.page));
                let w = a.pending.entry((f.region, f.page)).or_insert(Waiting {
                    since: now,
                    vcpus: Vec::new(),
                    others: 0,
                });
                match vcpu {
                    Some(v) if !w.vcpus.iter().any(|&(x, _)| x == v) => w.vcpus.push((v, now)),
                    Some(_) => {}
                    None => w.others += 1,
                }
                if let Some(v) = vcpu {
                    a.block(v, now);
                }
                // It may have arrived between the check above and here: the loader marks a
                // page held before it looks for waiters (under this lock), so either it found
                // this entry or this check sees the page.
                if h.get(f.page) {
                    if let Some(w) = a.pending.remove(&(f.region, f.page)) {
                        for (v, since) in w.vcpus {
                            a.unblock(v, since, now);
                        }
                    }
                    continue;
                }
                if first {
                    a.stats.requests += 1;
                }
                first
            };
            let conn = asks.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let (true, Some(conn)) = (first, conn) {
                // The faulting page alone first, then the rest of the window: with
                // postcopy-preempt each request is its own record, so the faulting page never
                // waits for the readahead's pages to be read and placed (on the main channel
                // both go out in the same flush, behind the background pages anyway).
                let window = readahead.window(vcpu, f.region, f.page, h.pages);
                let asks = [(f.page, 1), (f.page + 1, window - 1)];
                for (first_page, count) in asks.into_iter().filter(|a| a.1 > 0) {
                    let ask = ReturnMessage::PageRequest {
                        region: f.region,
                        first_page,
                        count,
                    };
                    // A broken link is the stream thread's to notice (postcopy pauses): the
                    // fault stays waiting and is asked for again once a recovery reconnects.
                    if let Err(e) = super::send(&conn, &ask) {
                        tracing::debug!("postcopy: a page request could not be sent: {e}");
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}
