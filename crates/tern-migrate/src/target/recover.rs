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

/// Tells the source this side pauses: PAUSED, then the main connection closed for writing
/// (never for reading: data arriving on a socket shut for reading is answered with a reset,
/// which can discard PAUSED before it arrives). Over a dead link PAUSED may not arrive; the source then
/// pauses by its own timeout.
pub(super) fn announce_pause(main: &Connection, urgent: Option<&Connection>) {
    let _ = main.set_write_timeout(Some(Duration::from_secs(1)));
    if let Err(e) = send(main, &ReturnMessage::Paused) {
        tracing::debug!("PAUSED could not be sent: {e}");
    }
    main.shutdown_write();
    if let Some(u) = urgent {
        // The urgent connection carries nothing from here to the source, so nothing of ours
        // can be lost to a reset: it is shut whole, which ends its reader at once (else the
        // thread would wait for the source's close, which over a link that was down may come
        // seconds late, and COMPLETE with it: CI caught the source pausing meanwhile).
        u.shutdown();
    }
}

/// From RUN (and each recovery) on: `migrate-pause` says PAUSED on `main` and closes it for
/// writing; the source answers by closing, which ends the stream thread's read.
pub(super) fn pause_on_request(
    ctl: &MigrationControl,
    main: &Connection,
    urgent: Option<&Connection>,
) {
    let (main, urgent) = (main.clone(), urgent.cloned());
    ctl.set_pauser(Some(Box::new(move || {
        announce_pause(&main, urgent.as_ref())
    })));
}

/// The stream on `old` failed with `e` after the guest started here: pause (PAUSED to the
/// source, if `migrate-pause` did not say it already and the source can still hear it), then
/// wait for `migrate-recover` and return the recovered stream. Failed attempts leave the
/// migration paused for the next one; `migrate_cancel` while paused gives it up.
pub(super) fn pause_and_recover(
    pc: &Postcopy,
    ctl: &MigrationControl,
    old: &Connection,
    urgent: Option<&Connection>,
    who: &Identity<'_>,
    e: MigrateError,
) -> Result<Resumed> {
    ctl.set_pauser(None);
    let asked = ctl.take_pause();
    let why = if asked {
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
    if !asked {
        announce_pause(old, urgent);
    }
    // The old connection stays open (not read, not closed) until the migration ends.
    pc.set_conn(None);
    ctl.clear_conn();
    ctl.clear_recovery();
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
        let Some(uri) = ctl.wait_recovery() else {
            return Err(MigrateError::GuestLost(
                "migrate_cancel while postcopy was paused: the pages not yet received will \
                 not come (the guest here waits for them)"
                    .into(),
            ));
        };
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
                pause_on_request(ctl, &r.conn, None);
                ctl.take_pause();
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

/// One recovery attempt: listen, take the source's connection if it is this migration's (any
/// other is refused and the next awaited), say what is here, ask again for what faults wait on.
fn reconnect(
    pc: &Postcopy,
    ctl: &MigrationControl,
    uri: &crate::transport::Uri,
    who: &Identity<'_>,
) -> Result<Resumed> {
    // Listening before it says so: a source told to resume once it sees this status must
    // find someone (CI-like runs caught a resume refused in between).
    let listener = Listener::bind(uri, None)?;
    ctl.set_status(MigrationStatus::PostcopyRecoverSetup);
    let refuse = |conn: &Connection, why: String| {
        let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
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
    let (conn, r) = loop {
        // `migrate-pause` stops the wait.
        let (Channel { conn, end }, hello) = accept::accept_source(
            &listener,
            &|| ctl.pause_asked(),
            ctl.tls().as_deref(),
        )
        .map_err(|e| match e {
            MigrateError::Cancelled => MigrateError::Vm("migrate-pause while waiting".into()),
            e => e,
        })?;
        end.detach();
        match open_resumed(conn.clone(), hello, who) {
            Ok(r) => break (conn, r),
            Err(why) => {
                let e = refuse(&conn, why);
                tracing::warn!("postcopy recovery: {e}; still waiting");
            }
        }
    };
    ctl.set_conn(Canceller::Socket(conn.clone()));
    ctl.set_status(MigrationStatus::PostcopyRecover);
    let t = Duration::from_millis(ctl.params.postcopy_timeout_ms);
    conn.set_write_timeout(Some(t))
        .map_err(MigrateError::io("setting the postcopy timeout"))?;
    for m in pc.received() {
        send(&conn, &m)?;
    }
    send(&conn, &ReturnMessage::ResumeAck)?;
    // From here the source sends: a failure below is a break like any other (the next read
    // fails and postcopy pauses again), never a failed attempt.
    pc.set_conn(Some(conn.clone()));
    for (region, page) in pc.waiting() {
        let ask = ReturnMessage::PageRequest {
            region,
            first_page: page,
            count: 1,
        };
        if let Err(e) = send(&conn, &ask) {
            tracing::debug!("a page request could not be sent again: {e}");
            break;
        }
    }
    if let Err(e) = conn.set_read_timeout(Some(t)) {
        tracing::warn!("cannot set the postcopy timeout: {e}");
    }
    Ok(Resumed { reader: r, conn })
}

/// A recovering source's opening: the same session, one channel, the same VM, RESUME.
fn open_resumed(
    conn: Connection,
    hello: Option<tern_wire::ChannelHello>,
    who: &Identity<'_>,
) -> std::result::Result<StreamReader<BufReader<Connection>>, String> {
    let Some(hello) = hello else {
        return Err("a recovery needs a two-way connection".into());
    };
    if Some(hello.session) != who.session || hello.channels != 1 {
        return Err("this connection is not the paused migration's (another session id)".into());
    }
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| format!("setting the handshake timeout: {e}"))?;
    let mut r = StreamReader::new(BufReader::with_capacity(16 << 10, conn))
        .map_err(|e| e.to_string())?
        .live();
    let described = matches!(r.next_record(), Ok(Some(Record::Description)));
    if !described {
        return Err("a recovery starts with VM_DESCRIPTION".into());
    }
    if r.description() != who.desc {
        return Err("the recovering source describes another VM".into());
    }
    if !matches!(
        r.next_record(),
        Ok(Some(Record::Postcopy(PostcopyCommand::Resume)))
    ) {
        return Err("a recovery's VM_DESCRIPTION is followed by RESUME".into());
    }
    Ok(r)
}
