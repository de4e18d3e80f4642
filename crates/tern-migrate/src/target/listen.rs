//! The target's side of the postcopy commands (`docs/stream-format.md`, *Postcopy*): ADVISE and
//! DISCARD while receiving; after LISTEN the device state, LOADED, RUN — the guest starts
//! here — and the pages, placed as they come, until END and COMPLETE.

use std::io::BufReader;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use tern_wire::{PostcopyCommand, Record, ReturnMessage, StreamReader};

use super::postcopy::Postcopy;
use super::{send, Receiver, State, GO_TIMEOUT};
use crate::control::MigrationControl;
use crate::params::SwitchoverStep;
use crate::transport::Connection;
use crate::{MigrateError, Result, TargetVm};

impl Receiver {
    /// ADVISE and DISCARD: `None`. LISTEN: the records before it.
    pub(super) fn postcopy_command(
        &mut self,
        c: PostcopyCommand,
        records_read: u64,
        ctl: &MigrationControl,
    ) -> Result<Option<u64>> {
        let Some(vm) = self.vm.clone() else {
            return Err(MigrateError::Vm(
                "a postcopy command before the VM description".into(),
            ));
        };
        match c {
            PostcopyCommand::Advise {
                page_size,
                total_pages,
            } => {
                if self.postcopy.is_some() {
                    return Err(MigrateError::Vm("a second ADVISE".into()));
                }
                if !self.two_way {
                    return Err(MigrateError::Vm(
                        "postcopy on a one-way channel: nobody could ask for pages".into(),
                    ));
                }
                if self.data.is_some() {
                    return Err(MigrateError::Vm(
                        "postcopy with data channels is not supported by tern yet".into(),
                    ));
                }
                let regions = vm.ram().regions();
                let mine: u64 = regions.iter().map(|r| r.size / 4096).sum();
                if page_size != 4096 || total_pages != mine {
                    return Err(MigrateError::Vm(format!(
                        "ADVISE of {total_pages} pages of {page_size} bytes; this target has \
                         {mine} pages of 4096"
                    )));
                }
                // Checked now, so that a target that cannot fault pages in refuses before
                // anything is copied.
                let ram = vm.ram().postcopy()?;
                self.postcopy = Some(Postcopy::new(ram, &regions, ctl.caps().postcopy_blocktime));
                Ok(None)
            }
            PostcopyCommand::Discard { region, ranges } => {
                // Precopy is over: helpers that fill RAM stop before a page is dropped.
                self.stop_helpers();
                let t = std::time::Instant::now();
                match &self.postcopy {
                    Some(p) if !p.listening => p.discard(region, &ranges).map(|()| {
                        tracing::debug!(region, ranges = ranges.len(), took = ?t.elapsed(), "postcopy: DISCARD");
                        None
                    }),
                    _ => Err(MigrateError::Vm(
                        "DISCARD without ADVISE, or after LISTEN".into(),
                    )),
                }
            }
            PostcopyCommand::Listen => {
                // Postcopy moves RAM only: every other participant has all its data now, and
                // must hold before the guest can run here (a copied disk: whole and durable).
                for p in self.parts.iter_mut() {
                    p.finish()?;
                }
                self.stop_helpers();
                match &self.postcopy {
                    Some(p) if !p.listening => Ok(Some(records_read.saturating_sub(1))),
                    _ => Err(MigrateError::Vm("LISTEN without ADVISE, or twice".into())),
                }
            }
            PostcopyCommand::Run => Err(MigrateError::Vm("RUN before LISTEN".into())),
            PostcopyCommand::Resume => Err(MigrateError::Vm(
                "RESUME in a migration's first stream (it opens a recovery's)".into(),
            )),
        }
    }

    fn stop_helpers(&mut self) {
        for p in self.parts.iter_mut() {
            p.cleanup();
        }
    }

    /// After LISTEN. The stream is read on a thread of its own from here, so that pages keep
    /// arriving while the device state loads (loading vCPU state makes KVM touch guest pages —
    /// the paravirtual clock — which may be missing: their faults are served like the guest's).
    /// This thread loads the state and sends LOADED; on RUN, read by the stream thread, it
    /// starts the guest and sends RUNNING; the stream thread places pages until END.
    pub(super) fn postcopy_run(
        &mut self,
        r: &mut StreamReader<BufReader<Connection>>,
        records: u64,
        ctl: &MigrationControl,
    ) -> Result<Arc<dyn TargetVm>> {
        let vm = self
            .vm
            .clone()
            .ok_or_else(|| MigrateError::Vm("the stream had no VM description".into()))?;
        let mut pc = self.postcopy.take().expect("LISTEN came after ADVISE");
        let t = std::time::Instant::now();
        pc.listen(self.conn.clone())?;
        tracing::debug!(took = ?t.elapsed(), "postcopy: LISTEN (registered)");
        let (run_tx, run_rx) = mpsc::channel::<()>();
        let conn = self.conn.clone();
        let urgent = self.urgent.clone();
        let desc = r.description().cloned();
        let session = self.session;
        let ran = AtomicBool::new(false);
        // After RUN: whether the guest started here (1) or could not (2); 0 until decided.
        let started = std::sync::atomic::AtomicU8::new(0);
        let recovered = AtomicBool::new(false);
        let outcome = std::thread::scope(|s| {
            let pc = &pc;
            let (ran, recovered, started) = (&ran, &recovered, &started);
            let main_conn = conn.clone();
            let urgent_conn = urgent.clone();
            let desc_ref = desc.as_ref();
            let stream = s.spawn(move || {
                let mut run = Some(run_tx);
                // After a recovery the stream continues on a new connection.
                let mut now: Option<super::recover::Resumed> = None;
                let mut base = 0;
                loop {
                    let (rr, c) = match now.as_mut() {
                        Some(n) => (&mut n.reader, n.conn.clone()),
                        None => (&mut *r, main_conn.clone()),
                    };
                    let e = match stream_pages(pc, rr, ctl, &mut run, ran, base) {
                        Ok(records) => return Ok((records, c)),
                        Err(e) => e,
                    };
                    if !ran.load(Ordering::SeqCst) {
                        // The guest cannot start any more: let a state load that waits on a
                        // page go.
                        pc.release();
                        return Err(e);
                    }
                    // RUN came: wait for the start to be decided; a guest that never started
                    // here has nothing to pause.
                    while started.load(Ordering::SeqCst) == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    if started.load(Ordering::SeqCst) == 2 {
                        return Err(e);
                    }
                    base += rr.offset();
                    let who = super::recover::Identity {
                        session,
                        desc: desc_ref,
                    };
                    let u = if now.is_none() {
                        urgent_conn.as_ref()
                    } else {
                        None
                    };
                    now = Some(super::recover::pause_and_recover(pc, ctl, &c, u, &who, e)?);
                    recovered.store(true, Ordering::SeqCst);
                }
            });
            // Postcopy-preempt: the pages asked for come on a connection of their own. If it
            // fails, the main connection is shut too, so that the failure shows at once
            // (unless this side is pausing: it says PAUSED on the main connection first).
            let main_conn = conn.clone();
            let urgent_stream = urgent.clone().map(|u| {
                let desc = desc.clone();
                s.spawn(move || {
                    let r = urgent_pages(pc, u, desc, ctl);
                    // Before RUN the load fails at once. After it, a broken urgent connection
                    // is the source's to notice (it pauses and closes the main one); shutting
                    // the main connection here could lose PAUSED.
                    if r.is_err() && !ran.load(Ordering::SeqCst) {
                        main_conn.shutdown();
                    }
                    r.map(|n| (n, main_conn))
                })
            });
            let begun = self.start_on_run(&*vm, records, ctl, &run_rx);
            started.store(if begun.is_ok() { 1 } else { 2 }, Ordering::SeqCst);
            if begun.is_err() {
                // The stream threads stop at once; the guest never ran here.
                conn.shutdown();
                if let Some(u) = &urgent {
                    u.shutdown();
                }
            }
            let joined = |t: std::thread::ScopedJoinHandle<'_, Result<(u64, Connection)>>| {
                t.join().unwrap_or_else(|_| {
                    Err(MigrateError::Vm("a postcopy stream thread panicked".into()))
                })
            };
            let mut streamed = joined(stream);
            if let Some(t) = urgent_stream {
                if streamed.is_err() {
                    if let Some(u) = &urgent {
                        u.shutdown();
                    }
                }
                let u = joined(t);
                // After a recovery the urgent connection is gone for good: only the main
                // stream's END counts.
                if streamed.is_ok() && !recovered.load(Ordering::SeqCst) {
                    if let Err(e) = u {
                        streamed = Err(e);
                    }
                }
            }
            (begun, streamed)
        });
        match outcome {
            (Err(e), _) if self.state == State::Running => {
                // The vCPUs were started (some of them at least): keep what they wait on.
                pc.abandon();
                Err(e)
            }
            (Err(e), _) => Err(e),
            (Ok(()), Ok((records, conn))) => {
                let stats = pc.finish()?;
                ctl.stats().postcopy_faults = Some(stats);
                if let Err(e) = send(&conn, &ReturnMessage::Complete { records }) {
                    tracing::warn!("COMPLETE could not be sent: {e}");
                }
                tracing::info!("postcopy: every page is here");
                Ok(vm)
            }
            (Ok(()), Err(e)) => {
                ctl.stats().postcopy_faults = Some(pc.stats());
                pc.abandon();
                Err(match e {
                    e @ MigrateError::GuestLost(_) => e,
                    e => MigrateError::GuestLost(format!(
                        "the source's stream failed after the guest started here ({e}); the \
                         pages not yet received are lost and the guest waits for them"
                    )),
                })
            }
        }
    }

    /// The state, LOADED, then RUN (within GO's time): the vCPUs start, RUNNING goes back.
    fn start_on_run(
        &mut self,
        vm: &dyn TargetVm,
        records: u64,
        ctl: &MigrationControl,
        run: &mpsc::Receiver<()>,
    ) -> Result<()> {
        self.enter(State::Ended);
        let t = std::time::Instant::now();
        vm.load_state(&self.sections)?;
        tracing::debug!(took = ?t.elapsed(), "postcopy: device state loaded");
        ctl.fault_at(SwitchoverStep::BeforeLoaded);
        send(&self.conn, &ReturnMessage::Loaded { records })?;
        self.enter(State::Loaded);
        ctl.fault_at(SwitchoverStep::BeforeGo);
        run.recv_timeout(GO_TIMEOUT).map_err(|e| {
            MigrateError::Vm(match e {
                mpsc::RecvTimeoutError::Timeout => {
                    "no RUN from the source in time; the guest was not started here".into()
                }
                mpsc::RecvTimeoutError::Disconnected => {
                    "the stream failed before RUN; the guest was not started here".into()
                }
            })
        })?;
        if ctl.commit().is_err() {
            // Cancelled as RUN came: the channel is shut, no page could come any more.
            return Err(MigrateError::Vm(
                "cancelled as RUN arrived: the guest was not started here (the source holds \
                 it, in doubt)"
                    .into(),
            ));
        }
        self.enter(State::Running);
        // From now on a source that sends nothing (or takes nothing) for this long pauses
        // postcopy.
        let t = std::time::Duration::from_millis(ctl.params.postcopy_timeout_ms);
        for r in [
            self.conn.set_read_timeout(Some(t)),
            self.conn.set_write_timeout(Some(t)),
        ] {
            if let Err(e) = r {
                tracing::warn!("cannot set the postcopy timeout: {e}");
            }
        }
        vm.resume()?;
        ctl.guest_running();
        super::recover::pause_on_request(ctl, &self.conn, self.urgent.as_ref());
        ctl.postcopy_active();
        if let Err(e) = send(&self.conn, &ReturnMessage::Running) {
            tracing::warn!("RUNNING could not be sent: {e}");
        }
        Ok(())
    }
}

/// The stream after LISTEN: pages (asked for, before RUN; then all the rest), RUN once, END.
/// Returns END's record count.
fn stream_pages(
    pc: &Postcopy,
    r: &mut StreamReader<BufReader<Connection>>,
    ctl: &MigrationControl,
    run: &mut Option<mpsc::Sender<()>>,
    ran: &AtomicBool,
    base: u64,
) -> Result<u64> {
    loop {
        match r.next_record()? {
            Some(Record::Ram(rec)) => {
                let (d, z) = pc.place(&rec)?;
                let mut s = ctl.stats();
                s.normal += d;
                s.duplicate += z;
                s.transferred = base + r.offset();
            }
            Some(Record::Postcopy(PostcopyCommand::Run)) => match run.take() {
                Some(tx) => {
                    ran.store(true, Ordering::SeqCst);
                    let _ = tx.send(());
                }
                None => return Err(MigrateError::Vm("a second RUN".into())),
            },
            Some(Record::Nop) | Some(Record::SkippedOptional { .. }) => {}
            Some(Record::End(t)) if run.is_none() => {
                tracing::debug!(records = t.records, "postcopy: END on the main channel");
                return Ok(t.records);
            }
            Some(other) => {
                return Err(MigrateError::Vm(format!(
                    "{} after LISTEN (only pages, RUN and END may come)",
                    super::data::record_name(&other)
                )))
            }
            None => return Err(MigrateError::Vm("the stream ended without END".into())),
        }
    }
}

/// Postcopy-preempt: the urgent connection's stream (header, the same VM description as the
/// main stream's, RAM_PAGES, END), read from LISTEN on.
fn urgent_pages(
    pc: &Postcopy,
    conn: Connection,
    desc: Option<tern_wire::VmDescription>,
    ctl: &MigrationControl,
) -> Result<u64> {
    // Live: the source keeps the connection open after END (a reader of a file checks that
    // nothing follows END, which here would wait for the connection to close).
    let mut r = StreamReader::new(BufReader::with_capacity(64 << 10, conn))?.live();
    loop {
        match r.next_record()? {
            Some(Record::Description) => {
                if r.description() != desc.as_ref() {
                    return Err(MigrateError::Vm(
                        "the urgent channel describes another VM than the main channel".into(),
                    ));
                }
            }
            Some(Record::Ram(rec)) => {
                tracing::trace!(region = rec.region, "postcopy: urgent pages");
                let (d, z) = pc.place(&rec)?;
                let mut s = ctl.stats();
                s.normal += d;
                s.duplicate += z;
            }
            Some(Record::Nop) | Some(Record::SkippedOptional { .. }) => {}
            Some(Record::End(t)) => {
                tracing::debug!(records = t.records, "postcopy: END on the urgent channel");
                return Ok(t.records);
            }
            Some(other) => {
                return Err(MigrateError::Vm(format!(
                    "{} on the urgent channel (only pages may come)",
                    super::data::record_name(&other)
                )))
            }
            None => {
                return Err(MigrateError::Vm(
                    "the urgent channel ended without END".into(),
                ))
            }
        }
    }
}
