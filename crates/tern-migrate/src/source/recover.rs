//! Postcopy recovery on the source (`docs/stream-format.md`, *Recovery*): after RUN a broken
//! or silent connection pauses the migration instead of losing the guest; `migrate` with
//! `resume: true` reconnects, learns what the target holds, and the rest is sent again.

use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use tern_wire::{ChannelRole, PostcopyCommand, ReturnMessage, StreamWriter};

use super::return_path::TargetEvent;
use super::{hello, Link, ReturnPath, Session};
use crate::control::MigrationControl;
use crate::rate::RateLimited;
use crate::stats::{MigrationStatus, Recovery};
use crate::transport::{Canceller, Channel, Uri};
use crate::{MigrateError, Result};

/// How long the target may take to say what it holds.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// After RUN a step failed with `e`: `Ok(why)` if the migration pauses (the link is taken for
/// broken, or `migrate-pause` asked for it), `Err` if the guest is lost (the target's process
/// is gone: it closed without PAUSED, or it failed and said so).
pub(super) fn pause_or_lost(
    ctl: &MigrationControl,
    link: &mut Link,
    e: MigrateError,
) -> Result<String> {
    if ctl.take_pause() {
        return Ok("migrate-pause".into());
    }
    let ms = ctl.params.postcopy_timeout_ms;
    // The urgent sender's failure, if it came first, is the one to classify.
    let urgent = link
        .urgent_failed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let e = match urgent {
        Some(u) if u.is_timeout() => {
            return Ok(format!(
                "the target took nothing on the urgent channel for {ms} ms"
            ))
        }
        Some(u @ MigrateError::Wire(_)) => u,
        _ => e,
    };
    match e {
        MigrateError::PostcopyPaused(why) => Ok(why),
        e if e.is_timeout() => Ok(format!("the target took nothing for {ms} ms")),
        MigrateError::Wire(w) if matches!(w.kind, tern_wire::ErrorKind::Io(_)) => {
            // The connection ended or broke under a write: a target that paused said so first.
            let Some(ret) = link.ret.as_mut() else {
                return Ok(format!("the connection broke ({w})"));
            };
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match ret.next(deadline.saturating_duration_since(Instant::now())) {
                    None => {
                        return Ok(format!(
                            "the connection broke ({w}) and the target said nothing"
                        ))
                    }
                    Some(TargetEvent::Message(ReturnMessage::Paused)) => {
                        return Ok("the target paused".into())
                    }
                    Some(TargetEvent::Message(ReturnMessage::Error { message, .. })) => {
                        return Err(MigrateError::GuestLost(format!(
                            "the target failed after it started the guest: {message}"
                        )))
                    }
                    Some(TargetEvent::Message(_)) => {}
                    // (Our own migrate-pause, meanwhile, closes the connection too.)
                    Some(TargetEvent::Closed(_)) if ctl.take_pause() => {
                        return Ok("migrate-pause".into())
                    }
                    Some(TargetEvent::Closed(why)) => return Err(super::postcopy::gone(why)),
                }
            }
        }
        e @ MigrateError::GuestLost(_) => Err(e),
        other => Err(MigrateError::GuestLost(format!(
            "postcopy failed after the target started the guest ({other}); the pages not yet \
             sent are still here"
        ))),
    }
}

/// Pauses (the old connections are dropped) and waits for `migrate resume=true`; returns once
/// a recovery worked. Failed attempts leave the migration paused for the next one.
pub(super) fn pause_and_recover(
    ctl: &MigrationControl,
    session: &mut Session,
    link: &mut Link,
    why: String,
) -> Result<()> {
    tracing::warn!("postcopy paused: {why}");
    let t_pause = Instant::now();
    drop_connections(ctl, link);
    let started = ctl.stats().started.unwrap_or(t_pause);
    {
        let mut s = ctl.stats();
        s.error = Some(format!("postcopy paused: {why}"));
        s.recoveries.push(Recovery {
            paused_at: t_pause.duration_since(started).as_secs_f64(),
            reason: why,
            ..Recovery::default()
        });
    }
    ctl.clear_recovery();
    ctl.set_status(MigrationStatus::PostcopyPaused);
    let mut failed = 0;
    loop {
        let Some(uri) = ctl.wait_recovery() else {
            return Err(MigrateError::GuestLost(
                "migrate_cancel while postcopy was paused: the migration is given up; this \
                 host holds only the pages not yet sent, and stays paused"
                    .into(),
            ));
        };
        ctl.take_pause();
        match reconnect(ctl, session, link, &uri) {
            Ok(resent) => {
                let mut s = ctl.stats();
                s.error = None;
                if let Some(r) = s.recoveries.last_mut() {
                    r.paused_ms = Some(t_pause.elapsed().as_secs_f64() * 1000.0);
                    r.resent_pages = resent;
                    r.failed_attempts = failed;
                }
                drop(s);
                tracing::info!(resent, "postcopy recovered through {uri}");
                // A migrate-pause that came while connecting, with nothing to shut yet, is
                // taken now: the new connection pauses at once.
                if ctl.pause_asked() {
                    if let Some(c) = &link.conn {
                        c.shutdown();
                    }
                }
                ctl.set_status(MigrationStatus::PostcopyActive);
                return Ok(());
            }
            Err(e) => {
                failed += 1;
                tracing::warn!("postcopy recovery through {uri} failed: {e}");
                drop_connections(ctl, link);
                ctl.stats().error = Some(format!(
                    "postcopy paused; recovery through {uri} failed: {e}{}",
                    if matches!(&e, MigrateError::Io { .. }) {
                        " (is migrate-recover running on the target? If the target's process \
                         is gone, so is the guest: only the pages not yet sent are here)"
                    } else {
                        ""
                    }
                ));
                ctl.set_status(MigrationStatus::PostcopyPaused);
            }
        }
    }
}

/// Shuts the migration's connections and ends their threads; the stream writer goes to a sink.
fn drop_connections(ctl: &MigrationControl, link: &mut Link) {
    for c in link.conn.iter().chain(&link.urgent_conn) {
        c.shutdown();
    }
    if let Some(ret) = &link.ret {
        ret.route_requests(None);
    }
    if let Some(t) = link.urgent_thread.take() {
        let _ = t.join();
    }
    // Its failure, if any, belonged to the old connection.
    link.urgent_failed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    link.urgent = None;
    link.urgent_conn = None;
    if let Some(r) = link.ret.take() {
        r.join();
    }
    if let Ok(blank) = StreamWriter::new(Box::new(std::io::sink()) as Box<dyn Write + Send>) {
        drop(std::mem::replace(&mut link.out, blank));
    }
    link.conn = None;
    ctl.clear_conn();
}

/// One recovery attempt: connect, say who we are, learn what the target holds. Returns the
/// pages that go again.
fn reconnect(
    ctl: &MigrationControl,
    session: &mut Session,
    link: &mut Link,
    uri: &Uri,
) -> Result<u64> {
    ctl.set_status(MigrationStatus::PostcopyRecoverSetup);
    if !matches!(uri, Uri::Tcp(..) | Uri::Unix(_)) {
        return Err(MigrateError::Vm(format!(
            "postcopy recovery needs a tcp: or unix: URI, not {uri}"
        )));
    }
    let Channel { conn, end } = super::open(uri, None, ctl)?;
    end.detach();
    ctl.set_conn(Canceller::Socket(conn.clone()));
    link.conn = Some(conn.clone());
    hello(&conn, link.session, ChannelRole::Main, 0, 1)?;
    conn.set_write_timeout(Some(Duration::from_millis(ctl.params.postcopy_timeout_ms)))
        .map_err(MigrateError::io("setting the write timeout"))?;
    let writer: Box<dyn Write + Send> = Box::new(BufWriter::with_capacity(
        256 << 10,
        RateLimited::new(
            conn.clone(),
            ctl.bandwidth_limit.clone(),
            ctl.accepted_counter(),
        ),
    ));
    let mut out = StreamWriter::new(writer)?;
    out.description(&super::precopy::describe(&*session.vm))?;
    out.postcopy(&PostcopyCommand::Resume)?;
    out.flush()?;
    link.out = out;
    link.ret = Some(ReturnPath::start(conn)?);
    ctl.set_status(MigrationStatus::PostcopyRecover);
    let regions = session.vm.ram().regions();
    // Where the next RECEIVED of each region must start.
    let mut next: Vec<(u32, u64, u64)> = regions
        .iter()
        .map(|r| (r.id, 0u64, r.size / tern_wire::PAGE_SIZE as u64))
        .collect();
    let mut resent = 0;
    // An inactivity deadline: a big guest's RECEIVED messages take as long as they take.
    let mut deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let ret = link.ret.as_mut().expect("just set");
    loop {
        match ret.next(deadline.saturating_duration_since(Instant::now())) {
            None => {
                return Err(MigrateError::Vm(format!(
                    "the target said nothing of what it holds for {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                )))
            }
            Some(TargetEvent::Message(ReturnMessage::Received {
                region,
                first_page,
                words,
            })) => {
                let Some(n) = next.iter_mut().find(|n| n.0 == region) else {
                    return Err(MigrateError::Vm(format!(
                        "RECEIVED names unknown region {region}"
                    )));
                };
                if first_page != n.1 || first_page >= n.2 {
                    return Err(MigrateError::Vm(format!(
                        "RECEIVED of region {region} at page {first_page}, expected page {}",
                        n.1
                    )));
                }
                n.1 += words.len() as u64 * 64;
                deadline = Instant::now() + HANDSHAKE_TIMEOUT;
                for p in session.parts.iter_mut() {
                    resent += p.postcopy_held(region, first_page, &words)?;
                }
            }
            Some(TargetEvent::Message(ReturnMessage::ResumeAck)) => {
                if let Some(n) = next.iter().find(|n| n.1 < n.2) {
                    return Err(MigrateError::Vm(format!(
                        "RESUME_ACK before region {} was covered (up to page {} of {})",
                        n.0, n.1, n.2
                    )));
                }
                return Ok(resent);
            }
            Some(TargetEvent::Message(ReturnMessage::Error { message, .. })) => {
                return Err(MigrateError::TargetRefused(message))
            }
            Some(TargetEvent::Message(m)) => {
                return Err(MigrateError::Vm(format!(
                    "the target sent {m:?} before RESUME_ACK"
                )))
            }
            Some(TargetEvent::Closed(why)) => {
                return Err(MigrateError::Vm(format!(
                    "the target closed the connection during recovery{}",
                    why.map(|w| format!(" ({w})")).unwrap_or_default()
                )))
            }
        }
    }
}
