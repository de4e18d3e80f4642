//! The source side: setup, rounds, stop-and-copy, acknowledgement.

use std::io::{BufWriter, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::json;
use tern_wire::{
    record_type, RamRegionDesc, RecordReader, ReturnMessage, StreamWriter, VmDescription,
};

use crate::convergence::{self, Measured, Throttle};
use crate::params::LimitAction;
use crate::ram::{send_holes, Out, RamSaver};
use crate::rate::RateLimited;
use crate::stats::{MigrationStats, MigrationStatus, RoundRecord, Switchover};
use crate::transport::{Canceller, Channel, ChannelEnd, Connection, Uri};
use crate::{Capabilities, MigrateError, MigrationParams, Result, SaveParticipant, SourceVm};

/// Something that happened, for the control socket to turn into events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationEvent {
    /// The status changed (QMP `MIGRATION`).
    Status(MigrationStatus),
    /// A new round started (QMP `MIGRATION_PASS`).
    Pass(u64),
}

/// Shared between the migration thread and the control socket.
pub struct MigrationControl {
    stats: Mutex<MigrationStats>,
    cancel: AtomicBool,
    conn: Mutex<Option<Canceller>>,
    /// `max-bandwidth`, changeable while migrating.
    pub bandwidth_limit: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    params: MigrationParams,
    caps: Capabilities,
    events: Box<dyn Fn(MigrationEvent) + Send + Sync>,
}

impl MigrationControl {
    /// A control block for one migration.
    pub fn new(
        params: MigrationParams,
        caps: Capabilities,
        events: Box<dyn Fn(MigrationEvent) + Send + Sync>,
    ) -> Arc<Self> {
        Arc::new(MigrationControl {
            // Created when a migration is asked for: from then on it is being set up.
            stats: Mutex::new(MigrationStats {
                status: MigrationStatus::Setup,
                started: Some(Instant::now()),
                ..MigrationStats::default()
            }),
            cancel: AtomicBool::new(false),
            conn: Mutex::new(None),
            bandwidth_limit: Arc::new(AtomicU64::new(params.max_bandwidth)),
            accepted: Arc::new(AtomicU64::new(0)),
            params,
            caps,
            events,
        })
    }

    pub(crate) fn stats(&self) -> MutexGuard<'_, MigrationStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the statistics.
    pub fn snapshot(&self) -> MigrationStats {
        let mut s = self.stats().clone();
        if !s.status.is_final() && s.status != MigrationStatus::None {
            s.transferred = s.transferred.max(self.accepted.load(Ordering::Relaxed));
        }
        s
    }

    pub(crate) fn set_status(&self, status: MigrationStatus) {
        let changed = {
            let mut s = self.stats();
            let changed = s.status != status;
            s.status = status;
            if status.is_final() && s.ended.is_none() {
                s.ended = Some(Instant::now());
            }
            changed
        };
        if changed {
            (self.events)(MigrationEvent::Status(status));
        }
    }

    pub(crate) fn pass(&self, n: u64) {
        (self.events)(MigrationEvent::Pass(n));
    }

    /// The capabilities this migration runs with.
    pub fn caps(&self) -> Capabilities {
        self.caps
    }

    pub(crate) fn set_conn(&self, c: Canceller) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
    }

    /// Cancels: the migration thread stops at the next record (or its blocked write fails) and
    /// resumes the source.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        {
            let mut s = self.stats();
            if !s.status.is_final() {
                s.status = MigrationStatus::Cancelling;
            }
        }
        (self.events)(MigrationEvent::Status(MigrationStatus::Cancelling));
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            c.cancel();
        }
    }

    fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::SeqCst) {
            Err(MigrateError::Cancelled)
        } else {
            Ok(())
        }
    }

    pub(crate) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub(crate) fn accepted_counter(&self) -> Arc<AtomicU64> {
        self.accepted.clone()
    }
}

/// One guard for the whole outgoing migration: whatever way it ends before the target's
/// acknowledgement, dirty logging stops and a source it paused runs again.
struct Session {
    vm: Arc<dyn SourceVm>,
    ram: RamSaver,
    paused: bool,
    acknowledged: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.ram.cleanup();
        self.vm.set_throttle(0);
        if self.paused && !self.acknowledged {
            if let Err(e) = self.vm.resume() {
                tracing::error!("cannot resume the source after a failed migration: {e}");
            }
        }
    }
}

/// Bytes per second assumed before a round was large enough to measure the link.
const UNMEASURED_BANDWIDTH: f64 = 100e6;

/// Fixed costs of a switch-over, in seconds, before anything was measured.
const SWITCHOVER_OVERHEAD: f64 = 0.005;

/// Runs a migration to `uri` on the calling thread until it completes, fails or is cancelled.
/// `fd` is the descriptor an `fd:` URI names (resolved by the caller).
pub fn run_outgoing(
    vm: Arc<dyn SourceVm>,
    uri: &Uri,
    fd: Option<OwnedFd>,
    ctl: &MigrationControl,
) -> Result<()> {
    {
        let mut s = ctl.stats();
        *s = MigrationStats {
            started: Some(Instant::now()),
            total: vm.ram().regions().iter().map(|r| r.size).sum(),
            ..MigrationStats::default()
        };
    }
    ctl.set_status(MigrationStatus::Setup);
    let result = outgoing(vm, uri, fd, ctl);
    if result.is_err() {
        // The target must not wait for a stream that will never end.
        if let Some(c) = ctl.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            c.cancel();
        }
    }
    match &result {
        Ok(()) => ctl.set_status(MigrationStatus::Completed),
        Err(MigrateError::Cancelled) => ctl.set_status(MigrationStatus::Cancelled),
        Err(e) if ctl.cancel.load(Ordering::SeqCst) => {
            tracing::info!("migration cancelled ({e})");
            ctl.set_status(MigrationStatus::Cancelled);
        }
        Err(e) => {
            ctl.stats().error = Some(e.to_string());
            ctl.set_status(MigrationStatus::Failed);
        }
    }
    {
        let mut s = ctl.stats();
        s.transferred = ctl.accepted();
        s.throttle_percent = 0;
    }
    result
}

/// One message from the return path. A read that fails because the migration was cancelled
/// (the canceller shut the socket down) is a cancellation.
fn read_return(c: Connection, ctl: &MigrationControl) -> Result<ReturnMessage> {
    let mut rr = RecordReader::new(c);
    let rec = rr.next_record().map_err(|e| {
        if ctl.cancel.load(Ordering::SeqCst) {
            MigrateError::Cancelled
        } else {
            MigrateError::Wire(e)
        }
    })?;
    match rec {
        Some(rec) if rec.ty == record_type::RETURN_MESSAGE => ReturnMessage::decode(rec.body)
            .map_err(|k| MigrateError::Vm(format!("bad return message: {k}"))),
        Some(rec) => Err(MigrateError::Vm(format!(
            "unexpected record type {:#x} on the return path",
            rec.ty
        ))),
        None => Err(MigrateError::NoAck),
    }
}

/// Waits up to `timeout` for the target's ACK (of `sequence`, if given) on the return path.
fn await_ack(
    c: Connection,
    timeout: Duration,
    sequence: Option<u64>,
    ctl: &MigrationControl,
) -> Result<()> {
    c.set_read_timeout(Some(timeout))
        .map_err(MigrateError::io("return path timeout"))?;
    match read_return(c, ctl)? {
        ReturnMessage::Ack { sequence: s } if sequence.is_none_or(|want| want == s) => Ok(()),
        ReturnMessage::Error { message, .. } => Err(MigrateError::TargetRefused(message)),
        other => Err(MigrateError::Vm(format!(
            "unexpected return message {other:?}"
        ))),
    }
}

/// After a write failed: the target may have said why before closing.
fn target_reason(ret: &mut Option<Connection>, ctl: &MigrationControl) -> Option<String> {
    let c = ret.take()?;
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    match read_return(c, ctl) {
        Ok(ReturnMessage::Error { message, .. }) => Some(message),
        _ => None,
    }
}

fn outgoing(
    vm: Arc<dyn SourceVm>,
    uri: &Uri,
    fd: Option<OwnedFd>,
    ctl: &MigrationControl,
) -> Result<()> {
    let channel = Channel::connect(uri, fd)?;
    ctl.set_conn(
        channel
            .canceller()
            .map_err(MigrateError::io("cloning the connection"))?,
    );
    let Channel { conn, end } = channel;
    let mut ret = if conn.two_way() {
        Some(
            conn.try_clone()
                .map_err(MigrateError::io("cloning the connection"))?,
        )
    } else {
        None
    };
    ctl.check_cancel()?;
    let writer: Box<dyn Write + Send> = Box::new(BufWriter::with_capacity(
        256 << 10,
        RateLimited::new(conn, ctl.bandwidth_limit.clone(), ctl.accepted_counter()),
    ));
    let mut out: Out<'_> = StreamWriter::new(writer)?;
    let mut session = Session {
        vm: vm.clone(),
        ram: RamSaver::new(vm.clone()),
        paused: false,
        acknowledged: false,
    };
    let result = stream(&vm, ctl, &mut out, &mut session, &mut ret, end);
    match result {
        Err(MigrateError::Wire(e)) if matches!(e.kind, tern_wire::ErrorKind::Io(_)) => {
            if let Some(reason) = target_reason(&mut ret, ctl) {
                return Err(MigrateError::TargetRefused(reason));
            }
            ctl.check_cancel()?;
            Err(MigrateError::Wire(e))
        }
        other => other,
    }
}

fn stream(
    vm: &Arc<dyn SourceVm>,
    ctl: &MigrationControl,
    out: &mut Out<'_>,
    session: &mut Session,
    ret: &mut Option<Connection>,
    end: ChannelEnd,
) -> Result<()> {
    let started = ctl.stats().started.unwrap_or_else(Instant::now);
    let desc = VmDescription {
        machine: vm.machine(),
        ram: vm
            .ram()
            .regions()
            .into_iter()
            .map(|r| RamRegionDesc {
                id: r.id,
                name: r.name,
                gpa: r.gpa,
                size: r.size,
            })
            .collect(),
        sections: vm.state_schemas(),
    };
    out.source_info(&json!({
        "tern": env!("CARGO_PKG_VERSION"),
        "x-tern-ram-digest": ctl.caps.ram_digest,
    }))?;
    out.description(&desc)?;
    session.ram.save_setup()?;
    let holes = send_holes(&**vm, out)?;
    session.ram.counters.zero += holes;
    {
        let mut s = ctl.stats();
        s.setup_time_ms = started.elapsed().as_millis() as u64;
        s.remaining = session.ram.pending();
    }
    ctl.set_status(MigrationStatus::Active);

    let state_bytes = vm.state_size_hint();
    let params = ctl.params;
    let limit_ms = params.downtime_limit_ms;
    let mut round = 1u64;
    let mut bandwidth = 0.0f64;
    let mut last_sync = Instant::now();
    let mut throttle = Throttle::default();
    let secs = |t: Instant| t.duration_since(started).as_secs_f64();
    loop {
        ctl.pass(round);
        ctl.stats().dirty_sync_count = round;
        let t0 = Instant::now();
        let b0 = ctl.accepted();
        let (n0, z0) = (session.ram.counters.normal, session.ram.counters.zero);
        let mut batches = 0u64;
        while session.ram.iterate(out)? {
            batches += 1;
            if batches.is_multiple_of(16) {
                ctl.check_cancel()?;
                let mut s = ctl.stats();
                s.normal = session.ram.counters.normal;
                s.duplicate = session.ram.counters.zero;
                s.remaining = session.ram.pending();
                s.transferred = ctl.accepted();
                s.precopy_bytes = s.transferred;
            }
        }
        out.flush()?;
        ctl.check_cancel()?;
        let dt = t0.elapsed().as_secs_f64();
        let bytes = ctl.accepted() - b0;
        if dt > 0.0005 && bytes > 64 << 10 {
            bandwidth = bytes as f64 / dt;
        }
        // What became dirty meanwhile: the next round's work, and what a stop would send now.
        let since = last_sync.elapsed().as_secs_f64();
        let dirtied = session.ram.sync()?;
        let t_end = Instant::now();
        last_sync = t_end;
        let pending = session.ram.pending();
        let dirty_rate = dirtied as f64 * 4096.0 / since.max(1e-6);
        let m = Measured {
            dirty_rate,
            // A round too small to measure the link: assume a slow one.
            bandwidth: if bandwidth > 0.0 {
                bandwidth
            } else {
                UNMEASURED_BANDWIDTH
            },
            dirty_bytes: pending,
            state_bytes,
            target_load_rate: 0.0,
            fixed_overhead: SWITCHOVER_OVERHEAD,
        };
        let expected = convergence::expected_downtime(&m);
        let (pages, zeros) = (
            session.ram.counters.normal - n0,
            session.ram.counters.zero - z0,
        );
        {
            let mut s = ctl.stats();
            s.normal = session.ram.counters.normal;
            s.duplicate = session.ram.counters.zero;
            s.remaining = pending;
            s.transferred = ctl.accepted();
            s.precopy_bytes = s.transferred;
            s.mbps = bandwidth * 8.0 / 1e6;
            s.dirty_pages_rate = (dirty_rate / 4096.0) as u64;
            s.pages_per_second = ((pages + zeros) as f64 / dt.max(1e-6)) as u64;
            s.expected_downtime_ms = (expected * 1000.0).min(u64::MAX as f64) as u64;
            s.rounds.push(RoundRecord {
                round,
                start: secs(t0),
                end: secs(t_end),
                pages,
                zero_pages: zeros,
                bytes,
                dirty_pages: dirtied,
                bandwidth: if dt > 0.0 { bytes as f64 / dt } else { 0.0 },
                dirty_rate,
                expected_downtime_ms: expected * 1000.0,
                throttle_percent: throttle.percent,
            });
        }
        tracing::debug!(
            round,
            bytes,
            dt,
            dirtied,
            pending,
            expected,
            "precopy round done"
        );
        if convergence::converged(&m, limit_ms) {
            ctl.stats().stop_reason = Some("converged");
            break;
        }
        let limit = if params.max_rounds > 0 && round >= params.max_rounds {
            Some(("round limit", format!("{round} rounds")))
        } else if params.max_precopy_ms > 0
            && started.elapsed().as_millis() as u64 >= params.max_precopy_ms
        {
            Some((
                "time limit",
                format!("{} ms of precopy", started.elapsed().as_millis()),
            ))
        } else {
            None
        };
        if let Some((why, what)) = limit {
            let detail = format!(
                "after {what} {:.0} ms of downtime were still expected (limit {limit_ms} ms): the guest dirties {:.0} MiB/s, the link carries {:.0} MiB/s",
                expected * 1000.0,
                dirty_rate / (1 << 20) as f64,
                m.bandwidth / (1 << 20) as f64,
            );
            match params.limit_action {
                LimitAction::Fail => return Err(MigrateError::NotConverging(detail)),
                LimitAction::Switchover => {
                    tracing::warn!("forcing the switch-over: {detail}");
                    ctl.stats().stop_reason = Some(why);
                    break;
                }
            }
        }
        if ctl.caps.auto_converge && round >= 2 {
            if let Some(pct) = throttle.after_sync(&params, dirtied * 4096, bytes) {
                tracing::info!(round, pct, "auto-converge: throttling the vCPUs");
                vm.set_throttle(pct);
                ctl.stats().throttle_percent = pct;
            }
        }
        round += 1;
    }

    // Let the target catch up before the guest stops: whatever it still has to load would
    // otherwise count as downtime. (The guest keeps running meanwhile; the final sync sees what
    // it dirties.) A one-way channel has no one to ask.
    let t_drain = Instant::now();
    if let Some(c) = ret.as_ref() {
        out.ping(round)?;
        out.flush()?;
        let c = c
            .try_clone()
            .map_err(MigrateError::io("cloning the connection"))?;
        await_ack(c, Duration::from_secs(60), Some(round), ctl)?;
    }
    let drain = t_drain.elapsed();
    tracing::debug!("target caught up in {:?}", drain);

    // Stop and copy.
    let t_pause = Instant::now();
    let b0 = ctl.accepted();
    let (n0, z0) = (session.ram.counters.normal, session.ram.counters.zero);
    tracing::debug!("stop-and-copy: pausing");
    if vm.is_running() {
        vm.pause()?;
        session.paused = true;
    }
    // max-bandwidth shares the link while the guest runs; with the guest stopped every
    // millisecond is downtime, so the last pages and the state go at full speed.
    ctl.bandwidth_limit.store(0, Ordering::Relaxed);
    let t_paused = t_pause.elapsed();
    ctl.stats().dirty_sync_count = round + 1;
    session.ram.complete_precopy(out)?;
    out.flush()?;
    let t_pages = t_pause.elapsed();
    let b_pages = ctl.accepted();
    let sections = vm.save_state()?;
    for s in &sections {
        out.section(s)?;
    }
    out.flush()?;
    let t_state = t_pause.elapsed();
    let state_sent = ctl.accepted() - b_pages;
    // END, flushed; a one-way channel is closed and completed (synced, the command exited).
    let blank: Out<'_> = StreamWriter::new(Box::new(std::io::sink()) as Box<dyn Write + Send>)?;
    let full = std::mem::replace(out, blank);
    let (writer, _) = full.finish()?;
    drop(writer);
    if ret.is_none() {
        end.finish()?;
    }
    let t_end = t_pause.elapsed();
    tracing::debug!("stop-and-copy: END sent");
    // Test aid: the RAM the target got, digested while the target loads (the guest is paused and
    // stays so until the acknowledgement).
    if ctl.caps.ram_digest {
        ctl.stats().ram_digest = Some(vm.ram_digest());
    }
    {
        let mut s = ctl.stats();
        s.normal = session.ram.counters.normal;
        s.duplicate = session.ram.counters.zero;
        s.remaining = 0;
        s.transferred = ctl.accepted();
        s.downtime_bytes = ctl.accepted() - b0;
    }
    // The acknowledgement: the target loaded everything and runs the guest.
    if let Some(conn) = ret.take() {
        await_ack(conn, Duration::from_secs(300), None, ctl)?;
    }
    session.acknowledged = true;
    let t_ack = t_pause.elapsed();
    tracing::info!(
        "stop-and-copy: paused after {:?}, last pages sent after {:?}, device state after {:?}, END after {:?}, acknowledged after {:?}",
        t_paused, t_pages, t_state, t_end, t_ack
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut s = ctl.stats();
    s.downtime_ms = Some(t_ack.as_millis() as u64);
    s.switchover = Some(Switchover {
        start: secs(t_pause),
        drain_ms: ms(drain),
        pause_ms: ms(t_paused),
        pages_ms: ms(t_pages),
        state_ms: ms(t_state),
        end_ms: ms(t_end),
        ack_ms: ms(t_ack),
        pages: session.ram.counters.normal - n0,
        zero_pages: session.ram.counters.zero - z0,
        state_bytes: state_sent,
        bytes: s.downtime_bytes,
    });
    Ok(())
}
