//! Parallel data channels on the target (`docs/stream-format.md`, *Parallel channels*): each
//! channel's stream is read on its own thread and its pages written straight into guest RAM; a
//! barrier at every SYNC keeps the rounds in order across channels.

use std::io::BufReader;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tern_wire::{Record, StreamReader, VmDescription};

use crate::participant::Progress;
use crate::transport::Connection;
use crate::{MigrateError, Result, TargetVm};

#[derive(Default)]
struct Rounds {
    /// The last SYNC each channel reached.
    reached: Vec<Option<u64>>,
    ended: Vec<bool>,
    failed: Option<String>,
}

/// What the data channels share.
#[derive(Default)]
pub(super) struct Shared {
    rounds: Mutex<Rounds>,
    changed: Condvar,
    pub(super) data_pages: AtomicU64,
    pub(super) zero_pages: AtomicU64,
    /// Stream bytes read on each channel.
    bytes: Vec<AtomicU64>,
    /// Per region, per page: the round (plus one) in which a channel last wrote the page.
    claims: Vec<(u32, Vec<AtomicU32>)>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Rounds> {
        self.rounds.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, why: String) {
        let mut r = self.lock();
        if r.failed.is_none() {
            r.failed = Some(why);
        }
        self.changed.notify_all();
    }

    /// Channel `i` reached SYNC(round): waits until every channel has (the rule). Rounds come
    /// in order from 0, none skipped; a channel that ended short of `round` fails the wait.
    fn arrive(&self, i: usize, round: u64) -> Result<()> {
        let mut r = self.lock();
        let due = r.reached[i].map_or(0, |x| x + 1);
        if round != due {
            return Err(MigrateError::Vm(format!(
                "SYNC of round {round} where round {due} was due"
            )));
        }
        r.reached[i] = Some(round);
        self.changed.notify_all();
        drop(r);
        self.wait_reached(round)
    }

    /// Waits until every channel has reached SYNC(round) (or failed, or ended short of it).
    pub(super) fn wait_reached(&self, round: u64) -> Result<()> {
        let mut r = self.lock();
        loop {
            if let Some(why) = &r.failed {
                return Err(MigrateError::Vm(why.clone()));
            }
            let short = |j: usize| r.reached[j].is_none_or(|x| x < round);
            if let Some(j) = (0..r.reached.len()).find(|&j| r.ended[j] && short(j)) {
                return Err(MigrateError::Vm(format!(
                    "data channel {j} ended before round {round}"
                )));
            }
            if (0..r.reached.len()).all(|j| !short(j)) {
                return Ok(());
            }
            r = self.changed.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Claims `count` pages of `region` for `round` before a channel writes them. The stream
    /// gives each page to one channel per round, so a second claim in the same round is a
    /// broken peer: it fails the migration, and no two threads ever write one page at once.
    fn claim(&self, region: u32, first: u64, count: u64, round: u64) -> Result<()> {
        let tag = u32::try_from(round + 1)
            .map_err(|_| MigrateError::Vm(format!("round {round} on a data channel")))?;
        let pages = self
            .claims
            .iter()
            .find(|c| c.0 == region)
            .map(|c| &c.1)
            .ok_or_else(|| MigrateError::Vm(format!("no RAM region {region}")))?;
        let end = first.saturating_add(count);
        let run = usize::try_from(first)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(a, b)| pages.get(a..b))
            .ok_or_else(|| MigrateError::Vm(format!("pages {first}..{end} of region {region}")))?;
        for (i, p) in run.iter().enumerate() {
            if p.swap(tag, Ordering::Relaxed) == tag {
                return Err(MigrateError::Vm(format!(
                    "page {} of region {region} came twice in round {round}",
                    first + i as u64
                )));
            }
        }
        Ok(())
    }

    /// Stream bytes read on every data channel.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub(super) fn progress(&self) -> Progress {
        Progress {
            data_pages: self.data_pages.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            ..Default::default()
        }
    }
}

/// The running data channels of one incoming migration.
pub(super) struct DataReceivers {
    pub(super) shared: Arc<Shared>,
    threads: Vec<JoinHandle<Result<()>>>,
    conns: Vec<Connection>,
}

impl DataReceivers {
    /// Starts a reader per connection, writing into `vm`; if one fails, `main` stops reading
    /// (its reads end at once; the reason can still be written to the source).
    pub(super) fn start(
        conns: Vec<Connection>,
        vm: Arc<dyn TargetVm>,
        desc: &VmDescription,
        main: Connection,
    ) -> Result<DataReceivers> {
        let n = conns.len();
        let shared = Arc::new(Shared {
            rounds: Mutex::new(Rounds {
                reached: vec![None; n],
                ended: vec![false; n],
                failed: None,
            }),
            bytes: (0..n).map(|_| AtomicU64::new(0)).collect(),
            // Bounded by this VM's RAM (the stream's regions were checked to be its own).
            claims: desc
                .ram
                .iter()
                .map(|r| {
                    let pages = r.size / tern_wire::PAGE_SIZE as u64;
                    (r.id, (0..pages).map(|_| AtomicU32::new(0)).collect())
                })
                .collect(),
            ..Shared::default()
        });
        // Built first, so that a failure to start a thread stops the ones already started.
        let mut this = DataReceivers {
            shared: shared.clone(),
            threads: Vec::new(),
            conns: conns.clone(),
        };
        for (i, conn) in conns.into_iter().enumerate() {
            let (s, vm, desc, main) = (shared.clone(), vm.clone(), desc.clone(), main.clone());
            let t = std::thread::Builder::new()
                .name(format!("multifd-in-{i}"))
                .spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        receive(i, conn.clone(), &*vm, &desc, &s)
                    }))
                    .unwrap_or_else(|p| Err(MigrateError::panicked(p)));
                    if let Err(e) = &r {
                        s.fail(format!("data channel {i}: {e}"));
                        conn.shutdown();
                        main.shutdown_read();
                    }
                    r
                })
                .map_err(MigrateError::io("starting a data channel thread"))?;
            this.threads.push(t);
        }
        Ok(this)
    }

    /// The first failure of any channel, if one failed.
    pub(super) fn failure(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }

    /// Waits until every channel has read its END (the main channel's END was read), all at
    /// the same last round. The first failure stops the other channels at once.
    pub(super) fn finish(mut self) -> Result<()> {
        let mut first = Ok(());
        for t in std::mem::take(&mut self.threads) {
            let r = t.join().unwrap_or_else(|p| Err(MigrateError::panicked(p)));
            if first.is_ok() && r.is_err() {
                self.shared.fail("another data channel failed".into());
                for c in &self.conns {
                    c.shutdown();
                }
                first = r;
            }
        }
        first?;
        let r = self.shared.lock();
        let last = r.reached.first().copied().flatten();
        if r.reached.iter().any(|&x| x != last) {
            return Err(MigrateError::Vm(format!(
                "the data channels ended at different rounds: {:?}",
                r.reached
            )));
        }
        Ok(())
    }
}

impl Drop for DataReceivers {
    /// On any failure: every channel is shut and its thread ends.
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.shared.fail("the incoming migration ended".into());
        for c in &self.conns {
            c.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One data channel: a stream of RAM_PAGES and SYNC records ending with END.
fn receive(
    i: usize,
    conn: Connection,
    vm: &dyn TargetVm,
    desc: &VmDescription,
    s: &Shared,
) -> Result<()> {
    let mut r = StreamReader::new(BufReader::with_capacity(16 << 10, conn))?.live();
    // The round this channel is in: the one after the last SYNC it read.
    let mut round = 0;
    loop {
        let mut placer = ClaimingPlacer {
            ram: vm.ram(),
            shared: s,
            round,
        };
        match r.next_record_placing(&mut placer)? {
            None => return Err(MigrateError::Vm("the channel ended without END".into())),
            Some(Record::Description) => {
                if r.description() != Some(desc) {
                    return Err(MigrateError::Vm(
                        "its VM description differs from the main channel's".into(),
                    ));
                }
            }
            Some(Record::Ram(ram)) => {
                let mut claim = |region, first, count| s.claim(region, first, count, round);
                let (data, zero) = crate::ram::apply(vm.ram(), &ram, &mut claim, |_| {})?;
                s.data_pages.fetch_add(data, Ordering::Relaxed);
                s.zero_pages.fetch_add(zero, Ordering::Relaxed);
            }
            Some(Record::Sync(r)) => {
                s.arrive(i, r)?;
                round = r + 1;
            }
            Some(Record::End(_)) => {
                s.lock().ended[i] = true;
                s.changed.notify_all();
                return Ok(());
            }
            Some(Record::SkippedOptional { .. } | Record::Nop) => {}
            Some(other) => {
                return Err(MigrateError::Vm(format!(
                    "{} on a data channel",
                    record_name(&other)
                )))
            }
        }
        s.bytes[i].store(r.offset(), Ordering::Relaxed);
    }
}

/// Places a data channel's RAW pages in guest RAM once they are claimed for its round.
struct ClaimingPlacer<'a> {
    ram: &'a dyn crate::TargetRam,
    shared: &'a Shared,
    round: u64,
}

impl tern_wire::PagePlacer for ClaimingPlacer<'_> {
    fn place(
        &mut self,
        region: u32,
        first_page: u64,
        count: u32,
        fill: &mut dyn FnMut(&mut [u8]) -> std::result::Result<(), tern_wire::ErrorKind>,
    ) -> std::result::Result<(), tern_wire::ErrorKind> {
        self.shared
            .claim(region, first_page, u64::from(count), self.round)
            .map_err(|e| tern_wire::ErrorKind::Placement(e.to_string()))?;
        crate::ram::Placer(self.ram).place(region, first_page, count, fill)
    }
}

pub(super) fn record_name(r: &Record<'_>) -> &'static str {
    match r {
        Record::Ram(_) => "RAM_PAGES",
        Record::End(_) => "END",
        Record::Description => "VM_DESCRIPTION",
        Record::Section(_) => "DEVICE_STATE",
        Record::Ping(_) => "PING",
        Record::SourceInfo(_) => "SOURCE_INFO",
        Record::Postcopy(_) => "POSTCOPY_COMMAND",
        Record::Participant { .. } => "PARTICIPANT_DATA",
        _ => "a record",
    }
}
