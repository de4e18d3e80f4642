//! Parallel data channels on the target (`docs/stream-format.md`, *Parallel channels*): each
//! channel's stream is read on its own thread and its pages written straight into guest RAM; a
//! barrier at every SYNC keeps the rounds in order across channels.

use std::io::BufReader;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tern_wire::{Record, StreamReader, VmDescription, ENC_RAW, ENC_ZERO};

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

    /// Channel `i` reached SYNC(round): waits until every channel has (the rule).
    fn arrive(&self, i: usize, round: u64) -> Result<()> {
        let mut r = self.lock();
        r.reached[i] = Some(round);
        self.changed.notify_all();
        loop {
            if let Some(why) = &r.failed {
                return Err(MigrateError::Vm(why.clone()));
            }
            if r.reached.iter().all(|x| x.is_some_and(|x| x >= round)) {
                return Ok(());
            }
            r = self.changed.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(super) fn progress(&self) -> Progress {
        Progress {
            data_pages: self.data_pages.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
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
    /// Starts a reader per connection, writing into `vm`; `main` is shut down if one fails, so
    /// that the main thread stops waiting on its own stream at once.
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
            ..Shared::default()
        });
        let mut threads = Vec::new();
        for (i, conn) in conns.iter().enumerate() {
            let (s, vm, desc, conn, main) = (
                shared.clone(),
                vm.clone(),
                desc.clone(),
                conn.clone(),
                main.clone(),
            );
            let t = std::thread::Builder::new()
                .name(format!("multifd-in-{i}"))
                .spawn(move || {
                    let r = receive(i, conn.clone(), &*vm, &desc, &s);
                    if let Err(e) = &r {
                        s.fail(format!("data channel {i}: {e}"));
                        conn.shutdown();
                        main.shutdown();
                    }
                    r
                })
                .map_err(MigrateError::io("starting a data channel thread"))?;
            threads.push(t);
        }
        Ok(DataReceivers {
            shared,
            threads,
            conns,
        })
    }

    /// The first failure of any channel, if one failed.
    pub(super) fn failure(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }

    /// Waits until every channel has read its END (the main channel's END was read).
    pub(super) fn finish(mut self) -> Result<()> {
        let mut first = Ok(());
        for t in self.threads.drain(..) {
            let r = t.join().unwrap_or_else(|p| Err(MigrateError::panicked(p)));
            if first.is_ok() {
                first = r;
            }
        }
        first
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
    loop {
        match r.next_record()? {
            None => return Err(MigrateError::Vm("the channel ended without END".into())),
            Some(Record::Description) => {
                if r.description() != Some(desc) {
                    return Err(MigrateError::Vm(
                        "its VM description differs from the main channel's".into(),
                    ));
                }
            }
            Some(Record::Ram(ram)) => {
                for run in &ram.runs {
                    match run.encoding {
                        ENC_RAW => {
                            vm.ram()
                                .write_pages(ram.region, run.first_page, ram.data(run))?;
                            s.data_pages
                                .fetch_add(u64::from(run.count), Ordering::Relaxed);
                        }
                        ENC_ZERO => {
                            vm.ram().zero_pages(
                                ram.region,
                                run.first_page,
                                u64::from(run.count),
                            )?;
                            s.zero_pages
                                .fetch_add(u64::from(run.count), Ordering::Relaxed);
                        }
                        other => {
                            return Err(MigrateError::Vm(format!(
                                "RAM encoding {other} reached the loader"
                            )))
                        }
                    }
                }
            }
            Some(Record::Sync(round)) => s.arrive(i, round)?,
            Some(Record::End(_)) => {
                s.lock().ended[i] = true;
                s.changed.notify_all();
                return Ok(());
            }
            Some(Record::SkippedOptional { .. }) => {}
            Some(other) => {
                return Err(MigrateError::Vm(format!(
                    "{} on a data channel",
                    record_name(&other)
                )))
            }
        }
    }
}

fn record_name(r: &Record<'_>) -> &'static str {
    match r {
        Record::Section(_) => "DEVICE_STATE",
        Record::Ping(_) => "PING",
        Record::SourceInfo(_) => "SOURCE_INFO",
        Record::Postcopy(_) => "POSTCOPY_COMMAND",
        Record::Participant { .. } => "PARTICIPANT_DATA",
        _ => "a record",
    }
}
