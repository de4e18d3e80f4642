//! Parallel data channels on the source (`docs/stream-format.md`, *Parallel channels*).
//!
//! The RAM participant hands batches of dirty pages to [`DataChannels`]; each channel's thread
//! reads the pages out of guest memory, finds the zero ones and writes RAM_PAGES records on its
//! own connection. A batch goes to the channel with the shortest queue. At the end of every round
//! the engine calls [`DataChannels::sync`], which puts SYNC(round) behind every channel's pages and
//! waits until each channel has written it: the target applies no page of the next round before
//! every channel reached that SYNC, so an older copy of a page never lands after a newer one.

use std::collections::VecDeque;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tern_wire::{Compression, Compressor, StreamWriter, VmDescription, PAGE_SIZE};

use crate::rate::RateLimited;
use crate::transport::Connection;
use crate::{MigrateError, Result, SourceVm};

/// Batches a channel may have queued before the RAM participant waits.
const QUEUE: usize = 4;

/// Work for one data channel.
pub(crate) enum Job {
    /// Dirty pages of `region` as (first page, count) runs: read, checked for zeros, sent.
    Pages { region: u32, runs: Vec<(u64, u64)> },
    /// Ranges known to be zero (never written), sent as they are.
    Zero { region: u32, runs: Vec<(u64, u32)> },
    /// The end of a round.
    Sync(u64),
    /// The end of the channel's stream.
    End,
}

#[derive(Default)]
struct State {
    queues: Vec<VecDeque<Job>>,
    /// The last round each channel has written SYNC for.
    synced: Vec<Option<u64>>,
    ended: Vec<bool>,
    failed: Option<String>,
    /// Where the search for the least busy channel starts next.
    next: usize,
}

/// What every channel adds up to.
#[derive(Default)]
pub(crate) struct Counters {
    /// Pages sent with data, and as zero ranges.
    pub(crate) normal: AtomicU64,
    pub(crate) zero: AtomicU64,
    /// Stream bytes per channel.
    pub(crate) bytes: Vec<AtomicU64>,
    /// Nanoseconds each channel spent on its jobs (reading, compressing, writing pages), as
    /// opposed to waiting for them: a channel busy all the time is the bottleneck.
    pub(crate) busy_ns: Vec<AtomicU64>,
}

/// The data channels of one outgoing migration.
pub struct DataChannels {
    state: Mutex<State>,
    changed: Condvar,
    pub(crate) counters: Counters,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The connections, to shut down when the channels stop (a thread may be blocked writing).
    conns: Vec<Connection>,
}

impl DataChannels {
    /// Starts a thread per connection; each first writes its stream header and `desc`.
    pub(crate) fn start(
        vm: Arc<dyn SourceVm>,
        conns: Vec<Connection>,
        desc: &VmDescription,
        compression: Compression,
        limit: Arc<AtomicU64>,
        accepted: Arc<AtomicU64>,
    ) -> Result<Arc<DataChannels>> {
        let n = conns.len();
        let channels = Arc::new(DataChannels {
            state: Mutex::new(State {
                queues: (0..n).map(|_| VecDeque::new()).collect(),
                synced: vec![None; n],
                ended: vec![false; n],
                failed: None,
                next: 0,
            }),
            changed: Condvar::new(),
            counters: Counters {
                bytes: (0..n).map(|_| AtomicU64::new(0)).collect(),
                busy_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
                ..Counters::default()
            },
            threads: Mutex::new(Vec::new()),
            conns: conns.clone(),
        });
        for (i, conn) in conns.into_iter().enumerate() {
            let writer: Box<dyn Write + Send> = Box::new(BufWriter::with_capacity(
                256 << 10,
                // max-bandwidth is for the whole migration: each channel gets its share.
                RateLimited::new(conn, limit.clone(), accepted.clone()).shared_by(n as u64),
            ));
            let (c, vm, desc) = (channels.clone(), vm.clone(), desc.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("multifd-{i}"))
                .spawn(move || {
                    // A panic is a failed channel like any other (the migration fails).
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        c.run(i, StreamWriter::new(writer)?, &*vm, &desc, compression)
                    }))
                    .unwrap_or_else(|p| Err(MigrateError::panicked(p)));
                    if let Err(e) = r {
                        c.fail(format!("data channel {i}: {e}"));
                    }
                });
            match spawned {
                Ok(t) => channels
                    .threads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(t),
                Err(e) => {
                    channels.stop();
                    return Err(MigrateError::io("starting a data channel thread")(e));
                }
            }
        }
        Ok(channels)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, why: String) {
        let mut s = self.lock();
        if s.failed.is_none() {
            tracing::warn!("{why}");
            s.failed = Some(why);
        }
        self.changed.notify_all();
    }

    fn failure(s: &State) -> Result<()> {
        match &s.failed {
            Some(why) => Err(MigrateError::Vm(why.clone())),
            None => Ok(()),
        }
    }

    /// Queues pages on the least busy channel (waits while every queue is full). A cancel
    /// shuts the connections down, which fails the channels and ends the wait.
    pub(crate) fn send(&self, job: Job) -> Result<()> {
        let mut s = self.lock();
        loop {
            Self::failure(&s)?;
            // The shortest queue; among equals, the one after the last chosen, so that even
            // small rounds spread over every channel.
            let n = s.queues.len();
            let start = s.next;
            let (i, len) = (0..n)
                .map(|k| (start + k) % n)
                .map(|i| (i, s.queues[i].len()))
                .min_by_key(|&(_, len)| len)
                .expect("at least one data channel");
            if len < QUEUE {
                s.next = (i + 1) % n;
                s.queues[i].push_back(job);
                self.changed.notify_all();
                return Ok(());
            }
            s = self.wait(s);
        }
    }

    fn wait<'a>(&self, s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        // Timed: a cancel is noticed even if no channel moves.
        self.changed
            .wait_timeout(s, Duration::from_millis(100))
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Ends `round` on every channel and waits until each has written its SYNC. `tick` runs at
    /// least every 100 ms meanwhile (a cancel check, the main channel's keepalive); an error
    /// from it ends the wait.
    pub(crate) fn sync(&self, round: u64, tick: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        {
            let mut s = self.lock();
            for q in s.queues.iter_mut() {
                q.push_back(Job::Sync(round));
            }
        }
        self.changed.notify_all();
        self.wait_until(tick, |s| {
            s.synced.iter().all(|r| r.is_some_and(|r| r >= round))
        })
    }

    /// The last round: SYNC, then END on every channel; waits until all are written.
    pub(crate) fn finish(&self, round: u64, tick: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.sync(round, tick)?;
        {
            let mut s = self.lock();
            for q in s.queues.iter_mut() {
                q.push_back(Job::End);
            }
        }
        self.changed.notify_all();
        self.wait_until(tick, |s| s.ended.iter().all(|&e| e))
    }

    fn wait_until(
        &self,
        tick: &mut dyn FnMut() -> Result<()>,
        done: impl Fn(&State) -> bool,
    ) -> Result<()> {
        loop {
            {
                let s = self.lock();
                Self::failure(&s)?;
                if done(&s) {
                    return Ok(());
                }
                drop(self.wait(s));
            }
            tick()?;
        }
    }

    /// Stream bytes of each channel so far.
    pub(crate) fn bytes(&self) -> Vec<u64> {
        self.counters
            .bytes
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    /// Puts each channel's bytes and busy time into the statistics.
    pub(crate) fn report(&self, s: &mut crate::stats::MigrationStats) {
        s.multifd_channel_bytes = self.bytes();
        s.multifd_channel_busy_ms = self
            .counters
            .busy_ns
            .iter()
            .map(|b| b.load(Ordering::Relaxed) / 1_000_000)
            .collect();
    }

    /// Stops every channel thread (after success or failure: their connections are shut down,
    /// so none stays blocked in a write) and waits for them.
    pub(crate) fn stop(&self) {
        {
            let mut s = self.lock();
            if s.failed.is_none() {
                s.failed = Some("data channels stopped".into());
            }
        }
        self.changed.notify_all();
        for c in &self.conns {
            c.shutdown();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }

    /// One channel's thread: takes its jobs in order until END or a failure.
    fn run(
        &self,
        i: usize,
        mut out: StreamWriter<Box<dyn Write + Send>>,
        vm: &dyn SourceVm,
        desc: &VmDescription,
        compression: Compression,
    ) -> Result<()> {
        out.description(desc)?;
        let mut buf = vec![0u8; crate::ram::BATCH_PAGES * PAGE_SIZE];
        let mut compressor = Compressor::new(compression)
            .map_err(|e| MigrateError::Vm(format!("compression: {e}")))?;
        loop {
            let job = {
                let mut s = self.lock();
                loop {
                    if s.failed.is_some() {
                        return Ok(());
                    }
                    if let Some(j) = s.queues[i].pop_front() {
                        self.changed.notify_all();
                        break j;
                    }
                    s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            };
            let busy = std::time::Instant::now();
            let add_busy = |c: &Counters| {
                c.busy_ns[i].fetch_add(busy.elapsed().as_nanos() as u64, Ordering::Relaxed)
            };
            match job {
                Job::Pages { region, runs } => {
                    let (normal, zero) = crate::ram::send_pages(
                        vm,
                        &mut out,
                        region,
                        &runs,
                        &mut buf,
                        &mut compressor,
                    )?;
                    self.counters.normal.fetch_add(normal, Ordering::Relaxed);
                    self.counters.zero.fetch_add(zero, Ordering::Relaxed);
                }
                Job::Zero { region, runs } => {
                    let pages = crate::ram::send_zero_runs(&mut out, region, &runs)?;
                    self.counters.zero.fetch_add(pages, Ordering::Relaxed);
                }
                Job::Sync(round) => {
                    out.sync(round)?;
                    out.flush()?;
                    self.counters.bytes[i].store(out.bytes_written(), Ordering::Relaxed);
                    self.lock().synced[i] = Some(round);
                    self.changed.notify_all();
                }
                Job::End => {
                    out.finish()?;
                    add_busy(&self.counters);
                    self.lock().ended[i] = true;
                    self.changed.notify_all();
                    return Ok(());
                }
            }
            add_busy(&self.counters);
            self.counters.bytes[i].store(out.bytes_written(), Ordering::Relaxed);
        }
    }
}
