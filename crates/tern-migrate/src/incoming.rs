//! The target side: read the stream, build or check the VM, load, resume, acknowledge.

use std::io::BufReader;
use std::sync::Arc;
use std::time::Instant;

use tern_wire::{record_type, Record, RecordWriter, ReturnMessage, StreamReader};

use crate::outgoing::MigrationControl;
use crate::ram::RamLoader;
use crate::stats::{MigrationStats, MigrationStatus};
use crate::transport::{Channel, Connection};
use crate::{LoadParticipant, MigrateError, Result, TargetFactory, TargetVm};

/// What an incoming migration produced.
pub struct IncomingOutcome {
    /// The running guest.
    pub vm: Arc<dyn TargetVm>,
}

fn send(conn: Connection, msg: &ReturnMessage) -> Result<()> {
    let mut w = RecordWriter::new(conn);
    w.write(record_type::RETURN_MESSAGE, 0, &msg.encode())?;
    Ok(())
}

/// Receives a migration on `channel`. On failure the source is told why on the return path
/// (if the channel has one).
pub fn run_incoming(
    channel: Channel,
    factory: TargetFactory<'_>,
    ctl: &MigrationControl,
) -> Result<IncomingOutcome> {
    {
        let mut s = ctl.stats();
        *s = MigrationStats {
            started: Some(Instant::now()),
            ..MigrationStats::default()
        };
    }
    ctl.set_status(MigrationStatus::Active);
    let Channel { conn, end } = channel;
    let clone = || {
        conn.try_clone()
            .map_err(MigrateError::io("cloning the connection"))
    };
    let ret = if conn.two_way() {
        Some((clone()?, clone()?))
    } else {
        None
    };
    let result = incoming(conn, ret.as_ref().map(|r| &r.0), factory, ctl);
    end.detach();
    match result {
        Ok(vm) => {
            if let Some((ret, _)) = ret {
                let sequence = ctl.stats().normal;
                send(ret, &ReturnMessage::Ack { sequence })?;
            }
            ctl.set_status(MigrationStatus::Completed);
            Ok(IncomingOutcome { vm })
        }
        Err(e) => {
            if let Some((ret, ret2)) = ret {
                let _ = send(
                    ret,
                    &ReturnMessage::Error {
                        code: 1,
                        message: e.to_string(),
                    },
                );
                ret2.shutdown();
            }
            ctl.stats().error = Some(e.to_string());
            ctl.set_status(MigrationStatus::Failed);
            Err(e)
        }
    }
}

fn incoming(
    conn: Connection,
    ret: Option<&Connection>,
    factory: TargetFactory<'_>,
    ctl: &MigrationControl,
) -> Result<Arc<dyn TargetVm>> {
    let mut pings = ret
        .map(|c| {
            c.try_clone()
                .map(RecordWriter::new)
                .map_err(MigrateError::io("cloning the connection"))
        })
        .transpose()?;
    // A socket stays open after END (the acknowledgement goes back on it); a file or pipe must
    // end right after it.
    // A small buffer: record headers are gathered, but bodies are read in chunks larger than it,
    // which go straight from the socket into the decoder's buffer (a bigger one would copy every
    // page once more).
    let r = StreamReader::new(BufReader::with_capacity(16 << 10, conn))?;
    let mut r = if ret.is_some() { r.live() } else { r };
    let mut factory = Some(factory);
    let mut vm: Option<Arc<dyn TargetVm>> = None;
    let mut loader: Option<RamLoader> = None;
    let mut sections = Vec::new();
    let mut want_digest = false;
    let mut ended = false;
    while !ended {
        let mut described = false;
        match r.next_record()? {
            None => break,
            Some(Record::Description) => described = true,
            Some(rec @ Record::Ram(_)) => {
                let l = loader
                    .as_mut()
                    .ok_or_else(|| MigrateError::Vm("RAM before the VM".into()))?;
                l.load(&rec)?;
            }
            Some(Record::Section(s)) => sections.push(s),
            Some(Record::Ping(sequence)) => {
                // One-way (a file, a pipe): nobody to answer.
                if let Some(p) = pings.as_mut() {
                    p.write(
                        record_type::RETURN_MESSAGE,
                        0,
                        &ReturnMessage::Ack { sequence }.encode(),
                    )?;
                }
            }
            Some(Record::SourceInfo(v)) => {
                want_digest = v
                    .get("x-tern-ram-digest")
                    .and_then(|x| x.as_bool())
                    .unwrap_or(false);
            }
            Some(Record::Postcopy(c)) => {
                return Err(MigrateError::Vm(format!(
                    "postcopy is not supported yet (got {c:?})"
                )));
            }
            Some(Record::SkippedOptional { ty, .. }) => {
                tracing::info!("skipped an optional record of unknown type {ty:#x}");
            }
            Some(Record::End(_)) => ended = true,
        }
        if described {
            let desc = r
                .description()
                .cloned()
                .ok_or_else(|| MigrateError::Vm("no VM description".into()))?;
            let make = factory
                .take()
                .ok_or_else(|| MigrateError::Vm("second VM description".into()))?;
            let v = make(&desc)?;
            let mut l = RamLoader::new(v.clone());
            l.load_setup(&desc)?;
            ctl.stats().total = desc.ram.iter().map(|x| x.size).sum();
            loader = Some(l);
            vm = Some(v);
        }
        let mut s = ctl.stats();
        s.transferred = r.offset();
        if let Some(l) = &loader {
            s.normal = l.pages;
            s.duplicate = l.zero;
        }
    }
    let vm = vm.ok_or_else(|| MigrateError::Vm("the stream had no VM description".into()))?;
    let t = Instant::now();
    tracing::debug!("incoming: END read");
    vm.load_state(&sections)?;
    let t_state = t.elapsed();
    if want_digest {
        ctl.stats().ram_digest = Some(vm.ram_digest());
    }
    vm.resume()?;
    tracing::info!(
        "incoming: END read; state loaded in {:?}, resumed after {:?}",
        t_state,
        t.elapsed()
    );
    Ok(vm)
}
