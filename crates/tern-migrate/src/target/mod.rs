//! The target side, as a receive state machine:
//!
//! ```text
//! (accept) ─▶ Header ─▶ Receiving ─▶ Ended ─▶ Loaded ─(GO)─▶ Running
//!                └──────────┴──────────┴─────────┴─▶ failed: ERROR to the source; the guest never ran
//! ```
//!
//! Accepting waits for a connection that opens with a valid CHANNEL_HELLO; any other is dropped
//! and the next awaited. A source that then stops sending is given up on after
//! `x-tern-read-timeout`.
//!
//! On a two-way channel the guest starts only on the source's GO, and only here
//! ([`State::Running`] is entered in one place). A one-way stream (a file, a pipe) has nobody to
//! commit: its reader runs the guest once END was checked and the state loaded.

mod accept;
mod data;
mod listen;
pub(crate) mod postcopy;
mod readahead;
mod recover;

use std::io::BufReader;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_wire::{
    record_type, Record, RecordReader, RecordWriter, ReturnMessage, Section, StreamReader,
};

use crate::control::MigrationControl;
use crate::params::SwitchoverStep;
use crate::participant::{self, LoadParticipant};
use crate::stats::{MigrationStats, MigrationStatus};
use crate::transport::{Canceller, Channel, Connection, Listener};
use crate::{MigrateError, Result, SectionDesc, TargetFactory, TargetVm, VmDescription};

/// How long a target that sent LOADED waits for GO before it gives up (without running).
const GO_TIMEOUT: Duration = Duration::from_secs(30);

/// What an incoming migration produced.
pub struct IncomingOutcome {
    /// The running guest.
    pub vm: Arc<dyn TargetVm>,
}

/// Where the receiver is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading the stream header.
    Header,
    /// Records, until END.
    Receiving,
    /// END read and checked; loading the device state.
    Ended,
    /// LOADED sent; waiting for GO. The guest does not run.
    Loaded,
    /// GO received: the vCPUs run.
    Running,
}

/// Receives a migration on `listener` (see [`accept::accept_source`]). On failure the source is told why
/// on the return path (if the channel has one).
pub fn run_incoming(
    listener: &Listener,
    factory: TargetFactory<'_>,
    ctl: &MigrationControl,
) -> Result<IncomingOutcome> {
    let cancelled = || ctl.is_cancelled();
    let tls = ctl.tls();
    let tls = tls.as_deref();
    let accepted = accept::accept_source(listener, &cancelled, tls).and_then(|(ch, hello)| {
        let (data, urgent) = match &hello {
            Some(h) if h.channels > 1 => accept::accept_data(listener, h, &cancelled, tls)?,
            _ => (Vec::new(), None),
        };
        Ok((ch, data, urgent, hello.map(|h| h.session)))
    });
    let (channel, data, urgent, session) = accepted.inspect_err(|e| {
        ctl.stats().error = Some(e.to_string());
        ctl.finalize(if ctl.is_cancelled() {
            MigrationStatus::Cancelled
        } else {
            MigrationStatus::Failed
        });
    })?;
    {
        let mut s = ctl.stats();
        *s = MigrationStats {
            started: Some(Instant::now()),
            ..MigrationStats::default()
        };
    }
    ctl.set_status(MigrationStatus::Active);
    // A hand-over's memory came with the hello; the VM factory takes it.
    ctl.set_received_fds(channel.conn.take_fds());
    let Channel { conn, end } = channel;
    let two_way = conn.two_way();
    if two_way {
        let all = std::iter::once(&conn)
            .chain(&data)
            .chain(&urgent)
            .map(|c| Canceller::Socket(c.clone()))
            .collect();
        ctl.set_conn(Canceller::Many(all));
        // A source that stops sending is given up on (the switch-over's waits set their own).
        let t = Duration::from_millis(ctl.params.read_timeout_ms);
        // The urgent connection of postcopy-preempt idles whenever the guest faults nothing:
        // it has no timeout of its own (the main channel's covers the source).
        if let Some(u) = &urgent {
            u.set_read_timeout(None)
                .map_err(MigrateError::io("clearing the urgent channel's timeout"))?;
        }
        for c in std::iter::once(&conn).chain(&data) {
            c.set_read_timeout(Some(t))
                .map_err(MigrateError::io("setting the read timeout"))?;
        }
    }
    let mut rx = Receiver {
        conn: conn.clone(),
        two_way,
        state: State::Header,
        vm: None,
        parts: Vec::new(),
        sections: Vec::new(),
        section_bytes: 0,
        data_conns: data,
        data: None,
        postcopy: None,
        urgent,
        session,
    };
    // A panic is a failed incoming migration (the guest never ran here unless GO came).
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rx.run(factory, ctl)))
        .unwrap_or_else(|p| Err(MigrateError::panicked(p)))
        .map_err(|e| accept::timed_out(e, ctl.params.read_timeout_ms));
    for p in rx.parts.iter_mut() {
        p.cleanup();
    }
    end.detach();
    // The connections are no longer this migration's to cancel.
    ctl.clear_conn();
    match result {
        Ok(vm) => {
            ctl.finalize(MigrationStatus::Completed);
            Ok(IncomingOutcome { vm })
        }
        Err(e) => {
            tracing::warn!(state = ?rx.state, "incoming migration failed: {e}");
            if two_way {
                let _ = send(
                    &conn,
                    &ReturnMessage::Error {
                        code: 1,
                        message: e.to_string(),
                    },
                );
                conn.shutdown();
            }
            ctl.stats().error = Some(e.to_string());
            ctl.finalize(if ctl.is_cancelled() {
                MigrationStatus::Cancelled
            } else {
                MigrationStatus::Failed
            });
            Err(e)
        }
    }
}

/// Sends one return message whole: the postcopy fault thread sends too, and two records must
/// not interleave on the connection.
fn send(conn: &Connection, msg: &ReturnMessage) -> Result<()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    RecordWriter::new(conn.clone()).write(record_type::RETURN_MESSAGE, 0, &msg.encode())?;
    Ok(())
}

struct Receiver {
    conn: Connection,
    two_way: bool,
    state: State,
    vm: Option<Arc<dyn TargetVm>>,
    parts: Vec<Box<dyn LoadParticipant>>,
    sections: Vec<Section>,
    /// Stream bytes of the sections kept until END.
    section_bytes: u64,
    /// Parallel channels: their connections until the VM exists, then their readers.
    data_conns: Vec<Connection>,
    data: Option<data::DataReceivers>,
    /// Postcopy, from ADVISE.
    postcopy: Option<postcopy::Postcopy>,
    /// Postcopy-preempt: the connection that carries the pages the target asked for.
    urgent: Option<Connection>,
    /// The session id of the main channel's hello (a postcopy recovery must say it again).
    session: Option<[u8; 16]>,
}

/// How the records before the device state ended.
enum Received {
    /// END: its record count, and whether the source asked for the RAM digest.
    End { records: u64, digest: bool },
    /// Postcopy's LISTEN: the records before it.
    Listen { records: u64 },
}

/// Device state a target keeps until END, at most (all of it is a few KiB today).
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// The sections a stream declares must be exactly the ones this target loads: one it does not
/// have, or one it lacks, fails the migration now, before any page is received.
pub(crate) fn check_declared_sections(desc: &VmDescription, mine: &[SectionDesc]) -> Result<()> {
    let key = |name: &str, instance: u32| (name.to_owned(), instance);
    for s in &desc.sections {
        if !mine
            .iter()
            .any(|m| key(&m.name, m.instance) == key(&s.name, s.instance))
        {
            return Err(MigrateError::Mismatch(format!(
                "the stream carries state of '{}' (instance {}), which this target does not have",
                s.name, s.instance
            )));
        }
    }
    for m in mine {
        if !desc
            .sections
            .iter()
            .any(|s| key(&m.name, m.instance) == key(&s.name, s.instance))
        {
            return Err(MigrateError::Mismatch(format!(
                "this target's '{}' (instance {}) has no state in the stream",
                m.name, m.instance
            )));
        }
    }
    Ok(())
}

impl Receiver {
    fn enter(&mut self, state: State) {
        tracing::debug!(?state, "incoming migration");
        self.state = state;
    }

    fn run(
        &mut self,
        factory: TargetFactory<'_>,
        ctl: &MigrationControl,
    ) -> Result<Arc<dyn TargetVm>> {
        self.enter(State::Header);
        // A small buffer: record headers are gathered, but bodies are read in chunks larger than
        // it, which go straight from the socket into the decoder's buffer (a bigger one would
        // copy every page once more).
        let r = StreamReader::new(BufReader::with_capacity(16 << 10, self.conn.clone()))?;
        // A socket stays open after END (GO comes on it); a file or pipe must end right after it.
        let mut r = if self.two_way { r.live() } else { r };
        self.enter(State::Receiving);
        let (records, want_digest) = match self.receive(&mut r, factory, ctl)? {
            Received::End { records, digest } => (records, digest),
            Received::Listen { records } => return self.postcopy_run(&mut r, records, ctl),
        };
        if let Some(pc) = self.postcopy.take() {
            if pc.discarded.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(MigrateError::Vm(
                    "END after DISCARD without LISTEN: pages were dropped, the guest cannot run \
                     here without postcopy"
                        .into(),
                ));
            }
            tracing::info!("postcopy was advised and not used: the migration ended in precopy");
        }
        self.enter(State::Ended);
        let vm = self
            .vm
            .clone()
            .ok_or_else(|| MigrateError::Vm("the stream had no VM description".into()))?;
        let t = Instant::now();
        vm.load_state(&self.sections)?;
        let t_state = t.elapsed();
        if want_digest {
            ctl.stats().ram_digest = Some(vm.ram_digest());
        }
        if self.two_way {
            ctl.fault_at(SwitchoverStep::BeforeLoaded);
            send(&self.conn, &ReturnMessage::Loaded { records })?;
            self.enter(State::Loaded);
            ctl.fault_at(SwitchoverStep::BeforeGo);
            self.await_go(r.into_records())?;
            // GO: the guest is ours now, and runs here whatever else happens (a cancel that
            // raced GO in is refused from here, or too late to matter: the source committed).
            if ctl.commit().is_err() {
                tracing::warn!("a cancel raced GO; the guest runs here, as the source expects");
            }
            ctl.fault_at(SwitchoverStep::BeforeRunning);
        }
        self.enter(State::Running);
        vm.resume()?;
        ctl.guest_running();
        if self.two_way {
            // The guest runs here whatever happens to this message: a source that misses it
            // reports the switch-over in doubt and stays paused.
            if let Err(e) = send(&self.conn, &ReturnMessage::Running) {
                tracing::warn!("RUNNING could not be sent: {e}");
            }
        }
        tracing::info!(
            "incoming: END read; state loaded in {t_state:?}, running after {:?}",
            t.elapsed()
        );
        Ok(vm)
    }

    /// Reads records until END (or postcopy's LISTEN).
    fn receive(
        &mut self,
        r: &mut StreamReader<BufReader<Connection>>,
        factory: TargetFactory<'_>,
        ctl: &MigrationControl,
    ) -> Result<Received> {
        let mut factory = Some(factory);
        let mut want_digest = false;
        loop {
            let mut described = false;
            let at = r.offset();
            // Pages are placed from here only without data channels (with them, RAM here is an
            // error, and only they may write guest RAM).
            let next = match &self.vm {
                Some(vm) if self.data.is_none() => {
                    r.next_record_placing(&mut crate::ram::Placer(vm.ram()))
                }
                _ => r.next_record(),
            };
            let next = next.map_err(|e| {
                // A data channel that failed shut this one: its reason is the one to give.
                match self.data.as_ref().and_then(|d| d.failure()) {
                    Some(why) => MigrateError::Vm(why),
                    None => e.into(),
                }
            })?;
            match next {
                None => return Err(MigrateError::Vm("the stream ended without END".into())),
                Some(Record::Description) => described = true,
                Some(Record::Ram(_)) if self.data.is_some() => {
                    return Err(MigrateError::Vm(
                        "RAM pages on the main channel of a migration with data channels".into(),
                    ))
                }
                Some(Record::Sync(_)) => {
                    return Err(MigrateError::Vm("SYNC on the main channel".into()))
                }
                Some(rec @ (Record::Ram(_) | Record::Participant { .. })) => {
                    if self.vm.is_none() {
                        return Err(MigrateError::Vm("data before the VM description".into()));
                    }
                    let mut taken = false;
                    for p in self.parts.iter_mut() {
                        if p.load(&rec)? {
                            taken = true;
                            break;
                        }
                    }
                    if !taken {
                        return Err(MigrateError::Vm(match rec {
                            Record::Participant { name, .. } => format!(
                                "the stream carries data of '{name}', which this target does not have"
                            ),
                            _ => "no participant takes RAM pages".into(),
                        }));
                    }
                }
                Some(Record::Section(s)) => {
                    // Declared in the description (the reader checked), so known here (checked
                    // when it arrived) and not seen before: at most one of each of this
                    // target's sections is kept, and no more than MAX_STATE_BYTES in all.
                    self.section_bytes += r.offset().saturating_sub(at);
                    if self.section_bytes > MAX_STATE_BYTES {
                        return Err(MigrateError::Vm(format!(
                            "the stream's device state exceeds {} MiB",
                            MAX_STATE_BYTES >> 20
                        )));
                    }
                    self.sections.push(s)
                }
                Some(Record::Nop) => {}
                Some(Record::Ping(sequence)) => {
                    // With data channels: caught up means on every channel too (the source
                    // pings with the round it has just synced).
                    if let Some(d) = &self.data {
                        d.shared.wait_reached(sequence)?;
                    }
                    // One-way (a file, a pipe): nobody to answer.
                    if self.two_way {
                        send(&self.conn, &ReturnMessage::Ack { sequence })?;
                    }
                }
                Some(Record::SourceInfo(v)) => {
                    want_digest = v
                        .get("x-tern-ram-digest")
                        .and_then(|x| x.as_bool())
                        .unwrap_or(false);
                }
                Some(Record::Postcopy(c)) => {
                    if let Some(records) = self.postcopy_command(c, r.records_read(), ctl)? {
                        return Ok(Received::Listen { records });
                    }
                }
                Some(Record::SkippedOptional { ty, .. }) => {
                    tracing::info!("skipped an optional record of unknown type {ty:#x}");
                }
                Some(Record::MappedRam(_) | Record::PageCrcs { .. }) => {
                    return Err(MigrateError::Vm(
                        "a mapped-layout file: restore it with tern restore (it is read at fixed \
                         offsets, not as a stream)"
                            .into(),
                    ))
                }
                Some(Record::End(t)) => {
                    // The main channel's END counts once every data channel reached its own.
                    if let Some(d) = self.data.take() {
                        let shared = d.shared.clone();
                        d.finish()?;
                        let p = participant::total(self.parts.iter(), |p| p.progress());
                        let mut s = ctl.stats();
                        s.normal = p.data_pages + shared.progress().data_pages;
                        s.duplicate = p.zero_pages + shared.progress().zero_pages;
                    }
                    for p in self.parts.iter_mut() {
                        p.finish()?;
                    }
                    // Everything has arrived: helpers (RAM's prefault) stop now rather than
                    // compete with the switch-over for the CPU.
                    for p in self.parts.iter_mut() {
                        p.cleanup();
                    }
                    return Ok(Received::End {
                        records: t.records,
                        digest: want_digest,
                    });
                }
            }
            if described {
                let desc = r
                    .description()
                    .cloned()
                    .ok_or_else(|| MigrateError::Vm("no VM description".into()))?;
                let make = factory
                    .take()
                    .ok_or_else(|| MigrateError::Vm("second VM description".into()))?;
                let vm = make(&desc)?;
                check_declared_sections(&desc, &vm.state_schemas())?;
                self.parts = vm.clone().load_participants();
                for p in self.parts.iter_mut() {
                    p.load_setup(&desc)?;
                }
                if !self.data_conns.is_empty() {
                    let conns = std::mem::take(&mut self.data_conns);
                    self.data = Some(data::DataReceivers::start(
                        conns,
                        vm.clone(),
                        &desc,
                        self.conn.clone(),
                    )?);
                }
                ctl.stats().total = desc.ram.iter().fold(0, |a, x| a.saturating_add(x.size));
                self.vm = Some(vm);
            }
            let mut p = participant::total(self.parts.iter(), |p| p.progress());
            if let Some(d) = &self.data {
                p += d.shared.progress();
            }
            let mut s = ctl.stats();
            s.transferred = r.offset() + self.data.as_ref().map_or(0, |d| d.shared.bytes());
            s.normal = p.data_pages;
            s.duplicate = p.zero_pages;
        }
    }

    /// After LOADED: exactly one GO, within [`GO_TIMEOUT`]. Anything else — a timeout, the
    /// connection closing, another record — and the guest must not run here.
    fn await_go(&mut self, mut rr: RecordReader<BufReader<Connection>>) -> Result<()> {
        self.conn
            .set_read_timeout(Some(GO_TIMEOUT))
            .map_err(MigrateError::io("setting the GO timeout"))?;
        let rec = rr.next_record().map_err(|e| {
            MigrateError::Vm(format!(
                "no GO from the source ({e}); the guest was not started here"
            ))
        })?;
        match rec {
            Some(rec) if rec.ty == record_type::GO && rec.body.is_empty() => Ok(()),
            Some(rec) => Err(MigrateError::Vm(format!(
                "{} instead of GO after LOADED; the guest was not started here",
                record_type::name(rec.ty)
            ))),
            None => Err(MigrateError::Vm(
                "the source closed the connection before GO; the guest was not started here".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd(name: &str, instance: u32) -> SectionDesc {
        SectionDesc {
            name: name.into(),
            instance,
            version: 1,
            min_version: 1,
            fields: vec![],
            subsections: vec![],
        }
    }

    #[test]
    fn declared_sections_must_be_exactly_the_targets() {
        let mine = [sd("cpu", 0), sd("cpu", 1), sd("serial-16550", 0)];
        let mut desc = VmDescription {
            sections: mine.to_vec(),
            ..Default::default()
        };
        assert!(check_declared_sections(&desc, &mine).is_ok());
        desc.sections.push(sd("virtio-gpu", 0));
        let e = check_declared_sections(&desc, &mine)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'virtio-gpu' (instance 0)") && e.contains("does not have"),
            "{e}"
        );
        desc.sections.pop();
        desc.sections.remove(1);
        let e = check_declared_sections(&desc, &mine)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'cpu' (instance 1) has no state"), "{e}");
    }
}
