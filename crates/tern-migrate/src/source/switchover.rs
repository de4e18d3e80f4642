//! The switch-over: let the target catch up, pause, send the rest and END, then the two-phase
//! commit (`docs/stream-format.md`, *The switch-over*): LOADED, the point of no return, GO,
//! RUNNING.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tern_wire::{record_type, RecordWriter, ReturnMessage, StreamWriter};

use super::{update_counters, Link, Phase, Session};
use crate::control::MigrationControl;
use crate::params::SwitchoverStep;
use crate::participant::Out;
use crate::stats::Switchover;
use crate::{MigrateError, Result};

/// How long the target may take to catch up before the pause.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the target may take to load the state after END. Waiting is safe (the target does
/// not run before GO), so this is generous.
pub(super) const LOADED_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the switch-over's waits poll before they sleep (LOADED and RUNNING come within a
/// few milliseconds; a sleeping thread's wake-up costs about that much on a virtualized host).
pub(super) const SWITCHOVER_SPIN: Duration = Duration::from_millis(20);
/// How long the target may take to start its vCPUs after GO.
pub(super) const RUNNING_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn run(
    ctl: &MigrationControl,
    session: &mut Session,
    link: &mut Link,
    started: Instant,
    rounds: u64,
) -> Result<()> {
    let secs = |t: Instant| t.duration_since(started).as_secs_f64();
    let drain = drain(ctl, link, rounds)?;

    // Stop and copy.
    let Stopped {
        t_pause,
        b0,
        p0,
        t_paused,
        sync_ms,
    } = stop_and_sync(ctl, session, rounds)?;
    let out = &mut link.out;
    for p in session.parts.iter_mut() {
        p.complete_precopy(out)?;
    }
    if let Some(d) = &link.data {
        // The last round, then END on every data channel, before the main channel's END.
        d.finish(rounds + 1, &mut || ctl.check_cancel())?;
        d.report(&mut ctl.stats());
    }
    out.flush()?;
    let t_pages = t_pause.elapsed();
    let b_pages = ctl.accepted();
    for s in &session.vm.save_state()? {
        out.section(s)?;
    }
    out.flush()?;
    let t_state = t_pause.elapsed();
    let state_sent = ctl.accepted() - b_pages;
    let totals = end_stream(out)?;
    let one_way = link.ret.is_none();
    if let Some(end) = link.end.take().filter(|_| one_way) {
        // END is out. A command or a pipe may feed a live target that runs the guest from
        // here: the source must not resume by itself any more, and a failure is in doubt. A
        // file is a snapshot: a failure to sync it resumes the source.
        let live = end.reader_may_run();
        if live {
            session.enter(Phase::Committed);
        }
        end.finish().map_err(|e| match e {
            e if live => MigrateError::InDoubt(format!(
                "the whole stream was written, then the channel failed ({e})"
            )),
            e => e,
        })?;
    }
    let t_end = t_pause.elapsed();
    tracing::debug!("stop-and-copy: END sent");
    // Test aid: the RAM the target got, digested while the target loads (the guest is paused and
    // stays so at least until LOADED).
    if ctl.caps().ram_digest {
        ctl.stats().ram_digest = Some(session.vm.ram_digest());
    }
    {
        let mut s = ctl.stats();
        update_counters(&mut s, session, ctl.accepted());
        s.remaining = 0;
        s.downtime_bytes = ctl.accepted() - b0;
    }

    let (t_loaded, t_running) = match link.ret.as_mut() {
        None => {
            session.enter(Phase::Done);
            (t_end, t_end)
        }
        Some(ret) => {
            session.enter(Phase::AwaitLoaded);
            ret.set_spin(SWITCHOVER_SPIN);
            ctl.fault_at(SwitchoverStep::BeforeLoaded);
            let loaded = ret.expect("LOADED", LOADED_TIMEOUT, |m| match m {
                ReturnMessage::Loaded { records } => Some(*records),
                _ => None,
            })?;
            if loaded != totals.records {
                return Err(MigrateError::Vm(format!(
                    "the target loaded {loaded} records, the stream had {}",
                    totals.records
                )));
            }
            // As the socket saw them, not when this thread woke up.
            let since_pause = |r: &super::ReturnPath| {
                r.arrived()
                    .map_or_else(|| t_pause.elapsed(), |at| at.duration_since(t_pause))
            };
            let t_loaded = since_pause(ret);
            ctl.fault_at(SwitchoverStep::BeforeGo);
            commit(ctl, ret)?;
            go(link)?;
            // GO left: from here the target may run the guest, and the source never resumes it
            // by itself.
            session.enter(Phase::Committed);
            tracing::info!("switch-over committed: the guest is the target's now");
            ctl.fault_at(SwitchoverStep::BeforeRunning);
            let ret = link.ret.as_mut().expect("two-way");
            ret.expect("RUNNING", RUNNING_TIMEOUT, |m| {
                matches!(m, ReturnMessage::Running).then_some(())
            })
            .map_err(|e| MigrateError::InDoubt(format!("RUNNING did not arrive: {e}")))?;
            session.enter(Phase::Done);
            (t_loaded, since_pause(ret))
        }
    };
    tracing::info!(
        "stop-and-copy: paused after {t_paused:?}, last pages sent after {t_pages:?}, device state after {t_state:?}, END after {t_end:?}, LOADED after {t_loaded:?}, RUNNING after {t_running:?}"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p1 = session.progress();
    let mut s = ctl.stats();
    s.downtime_ms = Some(t_running.as_millis() as u64);
    s.switchover = Some(Switchover {
        start: secs(t_pause),
        drain_ms: ms(drain),
        pause_ms: ms(t_paused),
        sync_ms,
        pages_ms: ms(t_pages),
        state_ms: ms(t_state),
        end_ms: ms(t_end),
        loaded_ms: ms(t_loaded),
        ack_ms: ms(t_running),
        pages: p1.data_pages - p0.data_pages,
        zero_pages: p1.zero_pages - p0.zero_pages,
        state_bytes: state_sent,
        bytes: s.downtime_bytes,
    });
    Ok(())
}

/// The guest stopped and the last sync made (precopy's stop-and-copy and postcopy's switch).
pub(super) struct Stopped {
    pub(super) t_pause: Instant,
    /// Bytes accepted and progress when the pause began.
    pub(super) b0: u64,
    pub(super) p0: crate::participant::Progress,
    pub(super) t_paused: Duration,
    pub(super) sync_ms: f64,
}

/// Pauses the guest (if it runs) and makes the last sync, timed on its own: with the guest
/// paused its cost is downtime.
pub(super) fn stop_and_sync(
    ctl: &MigrationControl,
    session: &mut Session,
    rounds: u64,
) -> Result<Stopped> {
    session.enter(Phase::StopAndCopy);
    let t_pause = Instant::now();
    let b0 = ctl.accepted();
    let p0 = session.progress();
    if session.vm.is_running() {
        session.vm.pause()?;
        session.paused = true;
    }
    // Also for a guest stopped before (`stop`, `tern save`): what it wrote is durable before
    // the target may take over its storage.
    session.vm.flush_storage()?;
    // max-bandwidth shares the link while the guest runs; with the guest stopped every
    // millisecond is downtime, so what is left goes at full speed.
    ctl.bandwidth_limit.store(0, Ordering::Relaxed);
    let t_paused = t_pause.elapsed();
    ctl.stats().dirty_sync_count = rounds + 1;
    let t_sync = Instant::now();
    for p in session.parts.iter_mut() {
        p.sync()?;
    }
    Ok(Stopped {
        t_pause,
        b0,
        p0,
        t_paused,
        sync_ms: t_sync.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Lets the target catch up before the guest stops: whatever it still has to load would
/// otherwise count as downtime. (The guest keeps running meanwhile; the final sync sees what
/// it dirties.) A one-way channel has no one to ask.
fn drain(ctl: &MigrationControl, link: &mut Link, rounds: u64) -> Result<Duration> {
    let t = Instant::now();
    if let Some(ret) = link.ret.as_mut() {
        link.out.ping(rounds)?;
        link.out.flush()?;
        ret.expect("the PING's ACK", DRAIN_TIMEOUT, |m| match m {
            ReturnMessage::Ack { sequence } if *sequence == rounds => Some(()),
            _ => None,
        })
        .map_err(|e| match e {
            _ if ctl.is_cancelled() => MigrateError::Cancelled,
            e => e,
        })?;
    }
    tracing::debug!("target caught up in {:?}", t.elapsed());
    Ok(t.elapsed())
}

/// Writes END and flushes, leaving a writer that discards (the stream is over). Returns the
/// stream's totals.
pub(super) fn end_stream(out: &mut Out<'static>) -> Result<tern_wire::Totals> {
    let blank: Out<'static> =
        StreamWriter::new(Box::new(std::io::sink()) as Box<dyn Write + Send>)?;
    let full = std::mem::replace(out, blank);
    let (writer, totals) = full.finish()?;
    drop(writer);
    Ok(totals)
}

/// The point of no return, as far as `migrate_cancel` is concerned: refused if a cancel came
/// first, if the channel was shut down, or if the target is already gone (its return path
/// closed, or it said ERROR): committing then would leave the guest running nowhere.
fn commit(ctl: &MigrationControl, ret: &mut super::ReturnPath) -> Result<()> {
    ctl.check_cancel()?;
    if let Some(why) = ret.peer_gone() {
        return Err(MigrateError::Vm(format!(
            "the target went away after LOADED ({why}); not committing"
        )));
    }
    ctl.commit()
}

/// Sends GO. The target runs only on a complete GO record whose CRC checks, and every byte of
/// it goes through the calls below: if one fails, the record is incomplete at the target, which
/// then does not run — so a failure here still resumes the source. Once they all succeeded the
/// bytes may arrive, and the outcome is the target's.
fn go(link: &mut Link) -> Result<()> {
    let conn = link.conn.clone().expect("GO goes on a two-way channel");
    RecordWriter::new(conn)
        .write(record_type::GO, 0, &[])
        .map(drop)
        .map_err(|e| {
            MigrateError::Vm(format!(
                "sending GO failed ({e}); the target cannot have it, so the source runs on"
            ))
        })
}
