//! The source's postcopy (`docs/stream-format.md`, *Postcopy*): pause, DISCARD what the target
//! holds stale or not at all, the device state, LISTEN; the two-phase commit with LOADED, RUN
//! and RUNNING; then every page left, those the target asks for first; END and COMPLETE.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tern_wire::{PostcopyCommand, ReturnMessage};

use super::return_path::TargetEvent;
use super::switchover::{
    end_stream, stop_and_sync, LOADED_TIMEOUT, RUNNING_TIMEOUT, SWITCHOVER_SPIN,
};
use super::{recover, update_counters, Link, Phase, Session};
use crate::control::MigrationControl;
use crate::participant::Out;
use crate::stats::{MigrationStatus, Switchover};
use crate::{MigrateError, Result};

/// Says ADVISE at setup (the target checks it can serve page faults, and refuses now if not).
pub(super) fn advise(
    ctl: &MigrationControl,
    vm: &dyn crate::SourceVm,
    two_way: bool,
    out: &mut crate::participant::Out<'_>,
) -> Result<()> {
    if !two_way {
        return Err(MigrateError::Vm(
            "postcopy needs a two-way channel (tcp:, unix: or a socket passed with fd:)".into(),
        ));
    }
    if ctl.caps().multifd {
        return Err(MigrateError::Vm(
            "postcopy-ram with multifd is not supported by tern yet: turn one of them off".into(),
        ));
    }
    let total_pages = vm.ram().regions().iter().map(|r| r.size / 4096).sum();
    out.postcopy(&PostcopyCommand::Advise {
        page_size: 4096,
        total_pages,
    })?;
    Ok(())
}

pub(super) fn run(
    ctl: &MigrationControl,
    session: &mut Session,
    link: &mut Link,
    started: Instant,
    rounds: u64,
) -> Result<()> {
    let secs = |t: Instant| t.duration_since(started).as_secs_f64();
    let stop = stop_and_sync(ctl, session, rounds)?;
    let t_pause = stop.t_pause;
    let out = &mut link.out;
    // Everything still to send is stale or absent at the target: it faults from now on.
    for p in session.parts.iter_mut() {
        p.postcopy_discard(out)?;
    }
    if link.urgent.is_some() {
        // Postcopy-preempt: from now on requests are served on the urgent stream, by a thread
        // of its own, straight from the return path.
        let senders: Vec<_> = session
            .parts
            .iter_mut()
            .filter_map(|p| p.postcopy_urgent())
            .collect();
        let mut uout = link.urgent.take().expect("checked");
        let (tx, rx) = mpsc::channel::<(u32, u64, u64)>();
        let served = link.urgent_requests.clone();
        let failed = link.urgent_failed.clone();
        let t = std::thread::Builder::new()
            .name("postcopy-urgent".into())
            .spawn(move || -> Result<Out<'static>> {
                let r = (|| {
                    while let Ok((region, first, count)) = rx.recv() {
                        served.fetch_add(1, Ordering::Relaxed);
                        for s in &senders {
                            s.send(&mut uout, region, first, count)?;
                        }
                        uout.flush()?;
                    }
                    Ok(())
                })();
                if let Err(e) = r {
                    // Pages it claimed will not arrive: the failure must show now, not after
                    // the whole scan (the main loop looks at `failed` after every batch; the
                    // main connection stays open so that a target's PAUSED can still come).
                    tracing::warn!("postcopy urgent sender: {e}");
                    *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    return Err(MigrateError::Vm("the postcopy urgent sender failed".into()));
                }
                Ok(uout)
            })
            .map_err(MigrateError::io("starting the postcopy urgent sender"))?;
        link.urgent_thread = Some(t);
        link.ret
            .as_ref()
            .expect("advise checked the return path")
            .route_requests(Some(tx));
    }
    let out = &mut link.out;
    let t_pages = t_pause.elapsed();
    let b_state = ctl.accepted();
    out.flush()?;
    for s in &session.vm.save_state()? {
        out.section(s)?;
    }
    let records = out.totals().records;
    out.postcopy(&PostcopyCommand::Listen)?;
    out.flush()?;
    let t_state = t_pause.elapsed();
    let state_sent = ctl.accepted() - b_state;
    // (No RAM digest: the target runs the guest before its RAM is complete, so the two would
    // never match; the guest's own self-check is the test.)
    session.enter(Phase::AwaitLoaded);
    link.ret
        .as_mut()
        .expect("advise checked the return path")
        .set_spin(SWITCHOVER_SPIN);
    // Loading vCPU state makes the target touch guest pages: their requests come meanwhile.
    let loaded = serving(session, link, "LOADED", LOADED_TIMEOUT, |m| match m {
        ReturnMessage::Loaded { records } => Some(*records),
        _ => None,
    })?;
    if loaded != records {
        return Err(MigrateError::Vm(format!(
            "the target loaded {loaded} records, the stream had {records} before LISTEN"
        )));
    }
    let t_loaded = t_pause.elapsed();
    commit_serving(ctl, session, link)?;
    // RUN goes whole or not at all: a failed write leaves an incomplete record, which the
    // target does not act on, so the source still resumes.
    link.out
        .postcopy(&PostcopyCommand::Run)
        .and_then(|()| link.out.flush())
        .map_err(|e| {
            MigrateError::Vm(format!(
                "sending RUN failed ({e}); the target cannot have it, so the source runs on"
            ))
        })?;
    session.enter(Phase::Committed);
    tracing::info!("postcopy: RUN sent; the guest is the target's now");
    // From now on a socket that takes nothing for this long is a broken link: postcopy pauses.
    let t = Some(Duration::from_millis(ctl.params.postcopy_timeout_ms));
    for c in link.conn.iter().chain(&link.urgent_conn) {
        if let Err(e) = c.set_write_timeout(t) {
            tracing::warn!("cannot set the postcopy write timeout: {e}");
        }
    }
    let running = serving(session, link, "RUNNING", RUNNING_TIMEOUT, |m| {
        matches!(m, ReturnMessage::Running).then_some(())
    });
    if let Err(e) = running {
        // The target may run the guest already: a break pauses here as it does later. Only a
        // target that went away is in doubt (it may have died before starting the guest).
        match recover::pause_or_lost(ctl, link, e) {
            Ok(why) => recover::pause_and_recover(ctl, session, link, why)?,
            Err(e) => {
                return Err(MigrateError::InDoubt(format!(
                    "RUNNING did not arrive: {e}"
                )))
            }
        }
    }
    let t_running = link
        .ret
        .as_ref()
        .expect("two-way")
        .arrived()
        .map_or_else(|| t_pause.elapsed(), |at| at.duration_since(t_pause));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    {
        let p1 = session.progress();
        let mut s = ctl.stats();
        s.downtime_ms = Some(t_running.as_millis() as u64);
        s.switchover = Some(Switchover {
            start: secs(t_pause),
            drain_ms: 0.0,
            pause_ms: ms(stop.t_paused),
            sync_ms: stop.sync_ms,
            pages_ms: ms(t_pages),
            state_ms: ms(t_state),
            end_ms: ms(t_state),
            loaded_ms: ms(t_loaded),
            ack_ms: ms(t_running),
            pages: p1.data_pages - stop.p0.data_pages,
            zero_pages: p1.zero_pages - stop.p0.zero_pages,
            state_bytes: state_sent,
            bytes: ctl.accepted() - stop.b0,
        });
        s.postcopy_start = Some(secs(Instant::now()));
        update_counters(&mut s, session, ctl.accepted());
    }
    ctl.set_status(MigrationStatus::PostcopyActive);
    ctl.bandwidth_limit
        .store(ctl.params.max_postcopy_bandwidth, Ordering::Relaxed);
    let b_post = ctl.accepted();
    after_run(ctl, session, link, b_post).map_err(|e| match e {
        e @ (MigrateError::GuestLost(_) | MigrateError::PostcopyPaused(_)) => e,
        // A write failed: the connection is gone from under us.
        MigrateError::Wire(w) => MigrateError::GuestLost(format!(
            "the connection to the target broke after it started the guest ({w}); the pages \
             not yet sent are still here"
        )),
        // Whatever else failed after RUN, the guest ran on the target: never a plain failure
        // that would let the source be resumed or migrated as if nothing happened.
        other => MigrateError::GuestLost(format!(
            "postcopy failed after the target started the guest ({other}); the pages not yet \
             sent are still here"
        )),
    })
}

/// Sends what the target asked for (every participant that has it), now.
fn serve(
    session: &mut Session,
    link: &mut Link,
    region: u32,
    first_page: u64,
    count: u64,
) -> Result<()> {
    for p in session.parts.iter_mut() {
        p.postcopy_serve(&mut link.out, region, first_page, count)?;
    }
    link.out.flush()?;
    Ok(())
}

/// The point of no return, as in precopy (`switchover::commit`), except that page requests
/// that came meanwhile are served, not dropped: the target asks for a page once.
fn commit_serving(ctl: &MigrationControl, session: &mut Session, link: &mut Link) -> Result<()> {
    ctl.check_cancel()?;
    loop {
        let ret = link.ret.as_mut().expect("two-way");
        match ret.next(Duration::ZERO) {
            None => break,
            Some(TargetEvent::Message(ReturnMessage::PageRequest {
                region,
                first_page,
                count,
            })) => serve(session, link, region, first_page, count)?,
            Some(TargetEvent::Message(ReturnMessage::Error { message, .. })) => {
                return Err(MigrateError::Vm(format!(
                    "the target refused after LOADED ({message}); not committing"
                )))
            }
            Some(TargetEvent::Message(m)) => {
                tracing::warn!("unexpected return message {m:?}; ignored")
            }
            Some(TargetEvent::Closed(why)) => {
                return Err(MigrateError::Vm(format!(
                    "the target went away after LOADED ({}); not committing",
                    why.unwrap_or_else(|| "it closed the connection".into())
                )))
            }
        }
    }
    ctl.commit()
}

/// Waits for the message `want` takes, serving page requests meanwhile.
fn serving<T>(
    session: &mut Session,
    link: &mut Link,
    what: &str,
    timeout: Duration,
    want: impl Fn(&ReturnMessage) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let ret = link.ret.as_mut().expect("two-way");
        let left = deadline.saturating_duration_since(Instant::now());
        match ret.next(left) {
            None => {
                return Err(MigrateError::Vm(format!(
                    "the target did not send {what} within {} s",
                    timeout.as_secs()
                )))
            }
            Some(TargetEvent::Message(ReturnMessage::PageRequest {
                region,
                first_page,
                count,
            })) => serve(session, link, region, first_page, count)?,
            Some(TargetEvent::Message(m)) => match want(&m) {
                Some(t) => return Ok(t),
                None => {
                    return Err(match m {
                        ReturnMessage::Error { message, .. } => {
                            MigrateError::TargetRefused(message)
                        }
                        ReturnMessage::Paused => {
                            MigrateError::PostcopyPaused("the target paused".into())
                        }
                        other => MigrateError::Vm(format!(
                            "the target sent {other:?} while {what} was expected"
                        )),
                    })
                }
            },
            Some(TargetEvent::Closed(None)) => return Err(MigrateError::NoAck),
            Some(TargetEvent::Closed(Some(why))) => {
                return Err(MigrateError::Vm(format!(
                    "the target's connection failed while {what} was expected: {why}"
                )))
            }
        }
    }
}

/// After RUN: requested pages first, then the background scan, until nothing is left; END;
/// COMPLETE. A broken link pauses and, once recovered, the rest goes on the new connection.
fn after_run(
    ctl: &MigrationControl,
    session: &mut Session,
    link: &mut Link,
    b_post: u64,
) -> Result<()> {
    let mut requests = 0u64;
    while let Err(e) = send_rest(ctl, session, link, b_post, &mut requests) {
        let why = recover::pause_or_lost(ctl, link, e)?;
        recover::pause_and_recover(ctl, session, link, why)?;
    }
    session.enter(Phase::Done);
    let mut s = ctl.stats();
    update_counters(&mut s, session, ctl.accepted());
    s.remaining = 0;
    s.postcopy_requests = requests + link.urgent_requests.load(Ordering::Relaxed);
    s.postcopy_bytes = ctl.accepted() - b_post;
    Ok(())
}

/// What is left to send on the current connection, END, and the wait for COMPLETE.
fn send_rest(
    ctl: &MigrationControl,
    session: &mut Session,
    link: &mut Link,
    b_post: u64,
    requests: &mut u64,
) -> Result<()> {
    let silence = Duration::from_millis(ctl.params.postcopy_timeout_ms);
    let ret = link.ret.as_mut().expect("two-way");
    ret.set_spin(Duration::ZERO);
    let mut batches = 0u64;
    // The timeline's postcopy series: what went and what was asked for, every ~100 ms.
    let started = ctl.stats().started.unwrap_or_else(Instant::now);
    let mut sample = (Instant::now(), ctl.accepted(), 0u64);
    loop {
        // Requests first: everything the target asked for so far.
        let mut wanted = Vec::new();
        let ret = link.ret.as_mut().expect("two-way");
        loop {
            match ret.next(Duration::ZERO) {
                None => break,
                Some(TargetEvent::Message(ReturnMessage::PageRequest {
                    region,
                    first_page,
                    count,
                })) => wanted.push((region, first_page, count)),
                Some(ev) => unexpected(ev)?,
            }
        }
        if link
            .urgent_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Err(MigrateError::Vm("the postcopy urgent sender failed".into()));
        }
        let served = !wanted.is_empty();
        for (region, first, count) in wanted {
            *requests += 1;
            for p in session.parts.iter_mut() {
                p.postcopy_serve(&mut link.out, region, first, count)?;
            }
        }
        if served {
            link.out.flush()?;
        }
        let mut more = false;
        for p in session.parts.iter_mut() {
            if p.iterate(&mut link.out)? {
                more = true;
                break;
            }
        }
        batches += 1;
        if sample.0.elapsed() >= Duration::from_millis(100) || !more {
            let asked = *requests + link.urgent_requests.load(Ordering::Relaxed);
            let dt = sample.0.elapsed().as_secs_f64().max(1e-6);
            let point = (
                sample.0.duration_since(started).as_secs_f64() + dt,
                (ctl.accepted() - sample.1) as f64 / dt / f64::from(1u32 << 20),
                (asked.saturating_sub(sample.2)) as f64 / dt,
            );
            ctl.stats().postcopy_series.push(point);
            sample = (Instant::now(), ctl.accepted(), asked);
        }
        if batches.is_multiple_of(16) || !more {
            link.out.flush()?;
            let mut s = ctl.stats();
            update_counters(&mut s, session, ctl.accepted());
            s.postcopy_requests = *requests + link.urgent_requests.load(Ordering::Relaxed);
            s.postcopy_bytes = ctl.accepted() - b_post;
        }
        if !more {
            break;
        }
    }
    if let Some(t) = link.urgent_thread.take() {
        // Every page went: the urgent stream ends first (the target holds both ENDs).
        link.ret.as_ref().expect("two-way").route_requests(None);
        let mut uout = t
            .join()
            .map_err(|_| MigrateError::Vm("the postcopy urgent sender panicked".into()))??;
        let t = end_stream(&mut uout)?;
        tracing::debug!(records = t.records, "postcopy: urgent stream ended");
    }
    let totals = end_stream(&mut link.out)?;
    tracing::debug!(
        records = totals.records,
        requests = *requests,
        "postcopy: every page sent, END"
    );
    let ret = link.ret.as_mut().expect("two-way");
    // Requests still in flight for pages that went meanwhile are answered by what was sent.
    // After END the target still finishes (its last pages, its threads) before COMPLETE: at
    // least 10 s, so that a short x-tern-postcopy-timeout does not pause a source whose target
    // is about to complete (a pause then would outlive the migration on the other side).
    let silence = silence.max(Duration::from_secs(10));
    let deadline = Instant::now() + silence;
    loop {
        match ret.next(deadline.saturating_duration_since(Instant::now())) {
            None => {
                return Err(MigrateError::PostcopyPaused(format!(
                    "the target did not confirm it holds every page within {} ms",
                    silence.as_millis()
                )))
            }
            Some(TargetEvent::Message(ReturnMessage::Complete { records })) => {
                if records != totals.records {
                    tracing::warn!(
                        "the target counted {records} records, the stream had {}",
                        totals.records
                    );
                }
                return Ok(());
            }
            Some(TargetEvent::Message(ReturnMessage::PageRequest { .. })) => {}
            Some(ev) => unexpected(ev)?,
        }
    }
}

/// After RUN, anything but what the loop waits for: the target failed or went away (the guest
/// is lost), or said something out of place (ignored).
fn unexpected(ev: TargetEvent) -> Result<()> {
    match ev {
        TargetEvent::Message(ReturnMessage::Error { message, .. }) => Err(MigrateError::GuestLost(
            format!("the target failed after it started the guest: {message}"),
        )),
        TargetEvent::Message(ReturnMessage::Paused) => {
            Err(MigrateError::PostcopyPaused("the target paused".into()))
        }
        TargetEvent::Message(m) => {
            tracing::warn!("postcopy: unexpected return message {m:?}; ignored");
            Ok(())
        }
        TargetEvent::Closed(why) => Err(gone(why)),
    }
}

/// The target's end of the connection closed after RUN: its process is gone, and the guest
/// that ran there with it.
pub(super) fn gone(why: Option<String>) -> MigrateError {
    MigrateError::GuestLost(format!(
        "the target closed the connection after it started the guest{}; this host holds only \
         the pages not yet sent, and stays paused",
        why.map(|w| format!(" ({w})")).unwrap_or_default()
    ))
}
