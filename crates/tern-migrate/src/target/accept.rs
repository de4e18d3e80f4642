//! Accepting an incoming migration's connections: the main one, then its data channels, each
//! opening with a valid CHANNEL_HELLO.

use std::time::{Duration, Instant};

use tern_wire::{record_type, ChannelHello, ChannelRole, RecordReader};

use crate::transport::tls::TlsSettings;
use crate::transport::{Channel, Connection, Listener};
use crate::{MigrateError, Result};

/// How long a new connection may take to say CHANNEL_HELLO before it is dropped.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits on `listener` for a migration source: a connection that does not open with a valid
/// CHANNEL_HELLO within [`HELLO_TIMEOUT`] (a port scan, an idle client, a stray peer) is logged
/// and dropped, and the listener keeps waiting; the source's connection waits in the backlog
/// meanwhile.
pub(super) fn accept_source(
    listener: &Listener,
    cancelled: &dyn Fn() -> bool,
    tls: Option<&TlsSettings>,
) -> Result<(Channel, Option<ChannelHello>)> {
    loop {
        let mut ch = listener.accept_unless(cancelled)?;
        if !ch.two_way() {
            if tls.is_some() {
                return Err(MigrateError::Vm(
                    "TLS needs a socket: tcp:, unix:, or an fd: that is a socket".into(),
                ));
            }
            return Ok((ch, None));
        }
        if let Some(tls) = tls {
            // A peer without a certificate our CA signed gets no further (it is told why, in
            // the TLS alert); the listener keeps waiting for the real source.
            match ch.conn.tls_server(tls) {
                Ok(c) => ch.conn = c,
                Err(e) if listener.reusable() => {
                    tracing::warn!("refused a connection: {e}; still waiting");
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        ch.conn
            .set_read_timeout(Some(HELLO_TIMEOUT))
            .map_err(MigrateError::io("setting the hello timeout"))?;
        match read_hello(&ch.conn).and_then(|h| {
            if h.role != ChannelRole::Main || h.index != 0 {
                return Err(MigrateError::Vm(format!(
                    "a migration starts with its main channel, not {:?} #{}",
                    h.role, h.index
                )));
            }
            if h.channels > MAX_CHANNELS {
                return Err(MigrateError::Vm(format!(
                    "the source opens {} channels; this target takes at most {MAX_CHANNELS}",
                    h.channels
                )));
            }
            Ok(h)
        }) {
            Ok(h) => return Ok((ch, Some(h))),
            Err(e) if listener.reusable() => {
                tracing::warn!(
                    "dropped a connection that is not a tern migration source ({e}); still waiting"
                )
            }
            Err(e) => return Err(e),
        }
    }
}

/// A read that hit the socket's timeout, said in words.
pub(super) fn timed_out(e: MigrateError, ms: u64) -> MigrateError {
    match &e {
        MigrateError::Wire(w)
            if matches!(&w.kind, tern_wire::ErrorKind::Io(io)
            if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)) =>
        {
            MigrateError::Vm(format!(
                "the source sent nothing for {ms} ms (x-tern-read-timeout); giving up at byte {}",
                w.offset
            ))
        }
        _ => e,
    }
}

/// Connections one migration may open (the main one and 255 data channels).
const MAX_CHANNELS: u16 = 256;

/// How long the data channels of a migration may take to connect after its main channel.
const DATA_TIMEOUT: Duration = Duration::from_secs(10);

/// After the main channel: its other `channels - 1` connections — data channels, and at most
/// one postcopy-urgent one — matched by session id, role and index; other connections are
/// logged and dropped. Returns the data channels in index order and the urgent one.
pub(super) fn accept_data(
    listener: &Listener,
    main: &ChannelHello,
    cancelled: &dyn Fn() -> bool,
    tls: Option<&TlsSettings>,
) -> Result<(Vec<Connection>, Option<Connection>)> {
    let n = usize::from(main.channels - 1);
    let mut slots: Vec<Option<Connection>> = vec![None; n];
    let mut urgent: Option<Connection> = None;
    let deadline = Instant::now() + DATA_TIMEOUT;
    while slots.iter().flatten().count() + usize::from(urgent.is_some()) < n {
        let late = || Instant::now() > deadline;
        let ch = match listener.accept_unless(&|| cancelled() || late()) {
            Err(MigrateError::Cancelled) if late() && !cancelled() => {
                return Err(MigrateError::Vm(format!(
                    "only {} of {n} data channels connected within {} s",
                    slots.iter().flatten().count(),
                    DATA_TIMEOUT.as_secs()
                )))
            }
            other => other?,
        };
        let mut ch = ch;
        if let Some(tls) = tls {
            match ch.conn.tls_server(tls) {
                Ok(c) => ch.conn = c,
                Err(e) => {
                    tracing::warn!("refused a connection: {e}; still waiting for data channels");
                    continue;
                }
            }
        }
        ch.conn
            .set_read_timeout(Some(HELLO_TIMEOUT))
            .map_err(MigrateError::io("setting the hello timeout"))?;
        let fits = read_hello(&ch.conn).and_then(|h| {
            let i = usize::from(h.index);
            let slot_free = match h.role {
                ChannelRole::Data => i < n && slots[i].is_none(),
                ChannelRole::PostcopyUrgent => i == 0 && urgent.is_none(),
                ChannelRole::Main => false,
            };
            if h.session != main.session || h.channels != main.channels || !slot_free {
                return Err(MigrateError::Vm(format!(
                    "{:?} #{} of {} channels is not one this migration waits for",
                    h.role, h.index, h.channels
                )));
            }
            Ok((h.role, i))
        });
        match fits {
            Ok((ChannelRole::PostcopyUrgent, _)) => urgent = Some(ch.conn),
            Ok((_, i)) => slots[i] = Some(ch.conn),
            Err(e) => tracing::warn!("dropped a connection ({e}); still waiting for data channels"),
        }
    }
    let data: Vec<Connection> = slots.iter().flatten().cloned().collect();
    if slots[..data.len()].iter().any(Option::is_none) {
        return Err(MigrateError::Vm(
            "the data channels' indexes are not 0..n".into(),
        ));
    }
    Ok((data, urgent))
}

/// A connection's channel hello.
fn read_hello(conn: &Connection) -> Result<ChannelHello> {
    let mut rr = RecordReader::new(conn.clone());
    let rec = rr
        .next_record()?
        .ok_or_else(|| MigrateError::Vm("the connection closed before its hello".into()))?;
    if rec.ty != record_type::CHANNEL_HELLO {
        return Err(MigrateError::Vm(format!(
            "a live migration starts with CHANNEL_HELLO, not {}",
            record_type::name(rec.ty)
        )));
    }
    let h = ChannelHello::decode(rec.body)
        .map_err(|k| MigrateError::Vm(format!("bad channel hello: {k}")))?;
    Ok(h)
}
