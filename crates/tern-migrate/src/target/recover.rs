//! Postcopy recovery on the target (`docs/stream-format.md`, *Recovery*): after RUN a source
//! that falls silent, goes away or is paused leaves this side paused with the guest — its vCPUs
//! that touch a missing page wait — until `migrate-recover URI` takes the source's new
//! connection, tells it what is here, and the pages flow again.

use std::io::BufReader;
use std::time::{Duration, Instant};

use tern_wire::{PostcopyCommand, Record, ReturnMessage, StreamReader, VmDescription};

use super::postcopy::Postcopy;
use super::{accept, send};
use crate::control::MigrationControl;
use crate::stats::{MigrationStatus, Recovery};
use crate::transport::{Canceller, Channel, Connection, Listener};
use crate::{MigrateError, Result};

/// How long a recovering source may take to say who it is.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A recovered connection and the stream on it.
pub(super) struct Resumed {
    pub(super) reader: StreamReader<BufReader<Connection>>,
    pub(super) conn: Connection,
}

/// What the migration is, for a recovering source to match.
pub(super) struct Identity<'a> {
    pub(super) session: Option<[u8; 16]>,
    pub(super) desc: Option<&'a VmDescription>,
}

/// The stream on `old` failed with `e` after RUN: pause (PAUSED to the source, if it can still
/// hear it), then wait for `migrate-recover` and return the recovered stream. Failed attempts
/// leave the migration paused for the next one.
pub(super) fn pause_and_recover(
    pc: &Postcopy,
    ctl: &MigrationControl,
    old: &Connection,
    urgent: Option<&Connection>,
    who: &Identity<'_>,
    e: MigrateError,
) -> Result<Resumed> {
    let why = if ctl.take_pause() {
        "migrate-pause".to_string()
    } else if e.is_timeout() {
        format!(
            "the source sent nothing for {} ms (x-tern-postcopy-timeout)",
            ctl.params.postcopy_timeout_ms
        )
    } else {
        format!("the source's stream failed ({e})")
    };
    tracing::warn!("postcopy paused: {why}; the guest waits for its missing pages");
    let t_pause = Instant::now();
    // Said first: a source that sees the connection end without PAUSED takes the guest for
    // lost. Over a dead link it may not arrive (then the source pauses by its own timeout).
    let _ = old.set_write_timeout(Some(Duration::from_secs(1)));
    if let Err(e) = send(old, &ReturnMessage::Paused) {
        tracing::debug!("PAUSED could not be sent: {e}");
    }
    old.shutdown();
    if let Some(u) = urgent {
        u.shutdown();
    }
    pc.set_conn(None);
    ctl.clear_conn();
    let started = ctl.stats().started.unwrap_or(t_pause);
    {
        let mut s = ctl.stats();
        s.error = Some(format!(
            "postcopy paused: {why}; run migrate-recover here and migrate with resume on the \
             source (if the source is gone, so are the pages not yet received)"
        ));
        s.recoveries.push(Recovery {
            paused_at: t_pause.duration_since(started).as_secs_f64(),
            reason: why,
            ..Recovery::default()
        });
    }
    ctl.set_status(MigrationStatus::PostcopyPaused);
    let mut failed = 0;
    loop {
        let uri = ctl.wait_recovery();
        ctl.take_pause();
        match reconnect(pc, ctl, &uri, who) {
            Ok(r) => {
                let mut s = ctl.stats();
                s.error = None;
                if let Some(r) = s.recoveries.last_mut() {
                    r.paused_ms = Some(t_pause.elapsed().as_secs_f64() * 1000.0);
                    r.failed_attempts = failed;
                }
                drop(s);
                tracing::info!("postcopy recovered through {uri}");
                ctl.set_status(MigrationStatus::PostcopyActive);
                return Ok(r);
            }
            Err(e) => {
                failed += 1;
                tracing::warn!("postcopy recovery through {uri} failed: {e}");
                pc.set_conn(None);
                ctl.clear_conn();
                ctl.stats().error = Some(format!(
                    "postcopy paused; recovery through {uri} failed: {e}"
                ));
                ctl.set_status(MigrationStatus::PostcopyPaused);
            }
        }
    }
}

/// One recovery attempt: listen, take the source's connection if it is this migration's, say
/// what is here, ask again for what faults wait on.
fn reconnect(
    pc: &Postcopy,
    ctl: &MigrationControl,
    uri: &crate::transport::Uri,
    who: &Identity<'_>,
) -> Result<Resumed> {
    ctl.set_status(MigrationStatus::PostcopyRecoverSetup);
    let listener = Listener::bind(uri, None)?;
    // `migrate-pause` stops the wait.
    let (Channel { conn, end }, hello) = accept::accept_source(&listener, &|| ctl.pause_asked())
        .map_err(|e| match e {
            MigrateError::Cancelled => MigrateError::Vm("migrate-pause while waiting".into()),
            e => e,
        })?;
    end.detach();
    let Some(hello) = hello else {
        return Err(MigrateError::Vm(
            "a recovery needs a two-way connection".into(),
        ));
    };
    let refuse = |conn: &Connection, why: String| {
        let _ = send(
            conn,
            &ReturnMessage::Error {
                code: 1,
                message: why.clone(),
            },
        );
        conn.shutdown();
        MigrateError::Vm(why)
    };
    if Some(hello.session) != who.session || hello.channels != 1 {
        return Err(refuse(
            &conn,
            "this connection is not the paused migration's (another session id)".into(),
        ));
    }
    ctl.set_conn(Canceller::Socket(conn.clone()));
    ctl.set_status(MigrationStatus::PostcopyRecover);
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(MigrateError::io("setting the handshake timeout"))?;
    let mut r = StreamReader::new(BufReader::with_capacity(16 << 10, conn.clone()))?.live();
    let described = matches!(r.next_record()?, Some(Record::Description));
    if !described {
        return Err(refuse(
            &conn,
            "a recovery starts with VM_DESCRIPTION".into(),
        ));
    }
    if r.description() != who.desc {
        return Err(refuse(
            &conn,
            "the recovering source describes another VM".into(),
        ));
    }
    match r.next_record()? {
        Some(Record::Postcopy(PostcopyCommand::Resume)) => {}
        _ => {
            return Err(refuse(
                &conn,
                "a recovery's VM_DESCRIPTION is followed by RESUME".into(),
            ))
        }
    }
    for m in pc.received() {
        send(&conn, &m)?;
    }
    send(&conn, &ReturnMessage::ResumeAck)?;
    // Faults ask on this connection from now on; those that waited are asked for again.
    pc.set_conn(Some(conn.clone()));
    for (region, page) in pc.waiting() {
        send(
            &conn,
            &ReturnMessage::PageRequest {
                region,
                first_page: page,
                count: 1,
            },
        )?;
    }
    conn.set_read_timeout(Some(Duration::from_millis(ctl.params.postcopy_timeout_ms)))
        .map_err(MigrateError::io("setting the postcopy timeout"))?;
    Ok(Resumed { reader: r, conn })
}
