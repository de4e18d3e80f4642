//! The source side, as a phase machine:
//!
//! ```text
//! Setup ─▶ Precopy ─▶ StopAndCopy ─▶ AwaitLoaded ─▶ Committed ─▶ Done
//!   └──────────┴────────────┴─────────────┴─▶ failed / cancelled: the source resumes
//!                                                Committed ─▶ failed in doubt: it stays paused
//! ```
//!
//! One guard ([`Session`]) owns the decision to resume the guest, and the phase it holds says
//! whether the point of no return was passed. Each phase is a function in `precopy` or
//! `switchover`; a return-path thread turns what the target says into typed events.

pub(crate) mod multifd;
mod postcopy;
pub(crate) mod precopy;
mod recover;
mod return_path;
mod switchover;

use std::io::{BufWriter, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_wire::{record_type, ChannelHello, ChannelRole, RecordWriter, StreamWriter};

use crate::control::MigrationControl;
use crate::participant::{self, Out, SaveParticipant};
use crate::rate::RateLimited;
use crate::stats::{MigrationStats, MigrationStatus};
use crate::transport::{Canceller, Channel, ChannelEnd, Connection, Uri};
use crate::{MigrateError, Result, SourceVm};

pub(crate) use return_path::ReturnPath;

/// Where an outgoing migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Connecting, describing the VM, marking everything to send.
    Setup,
    /// Rounds while the guest runs.
    Precopy,
    /// The guest is paused; the last pages, the device state and END go out.
    StopAndCopy,
    /// Waiting for the target's LOADED.
    AwaitLoaded,
    /// The point of no return was passed: the guest is the target's to run.
    Committed,
    /// RUNNING arrived (or a one-way stream was completed).
    Done,
}

/// One guard for the whole outgoing migration: whatever way it ends, tracking stops and the
/// throttle is released; a source it paused runs again unless the migration was committed.
pub(crate) struct Session {
    vm: Arc<dyn SourceVm>,
    parts: Vec<Box<dyn SaveParticipant>>,
    paused: bool,
    phase: Phase,
}

impl Session {
    fn enter(&mut self, phase: Phase) {
        tracing::debug!(?phase, "outgoing migration");
        self.phase = phase;
    }

    fn progress(&self) -> participant::Progress {
        participant::total(self.parts.iter(), |p| p.progress())
    }

    fn pending(&self) -> u64 {
        self.parts.iter().map(|p| p.pending()).sum()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for p in self.parts.iter_mut() {
            p.cleanup();
        }
        self.vm.set_throttle(0);
        if self.paused && self.phase < Phase::Committed {
            if let Err(e) = self.vm.resume() {
                tracing::error!("cannot resume the source after a failed migration: {e}");
            }
        }
    }
}

/// The channel as the phases use it.
pub(crate) struct Link {
    pub(crate) out: Out<'static>,
    /// Postcopy-preempt: the stream of the pages the target asks for, and its connection.
    pub(crate) urgent: Option<Out<'static>>,
    pub(crate) urgent_conn: Option<Connection>,
    /// Postcopy-preempt: the urgent sender, which gives the stream back when it ends.
    pub(crate) urgent_thread: Option<std::thread::JoinHandle<Result<Out<'static>>>>,
    /// Page requests the urgent sender served.
    pub(crate) urgent_requests: Arc<std::sync::atomic::AtomicU64>,
    /// Postcopy-preempt: why the urgent sender stopped, if it failed.
    pub(crate) urgent_failed: Arc<std::sync::Mutex<Option<MigrateError>>>,
    /// The session id of the channel hellos (a recovery's connection says it again).
    pub(crate) session: [u8; 16],
    /// The return path (two-way channels only).
    pub(crate) ret: Option<ReturnPath>,
    pub(crate) end: Option<ChannelEnd>,
    /// Two-way channels: for GO, written after END. (A one-way channel keeps no second handle:
    /// a command must see end of input once the stream's writer is dropped.)
    pub(crate) conn: Option<Connection>,
    /// Parallel channels: their connections until setup starts them, then the channels.
    pub(crate) data_conns: Vec<Connection>,
    pub(crate) data: Option<Arc<multifd::DataChannels>>,
}

impl Drop for Link {
    /// Whatever way the migration ends (a panic included), the data channel threads end.
    fn drop(&mut self) {
        if let Some(d) = self.data.take() {
            d.stop();
        }
    }
}

/// Runs a migration to `uri` on the calling thread until it completes, fails or is cancelled.
/// `fd` is the descriptor an `fd:` URI names (resolved by the caller).
pub fn run_outgoing(
    vm: Arc<dyn SourceVm>,
    uri: &Uri,
    fd: Option<OwnedFd>,
    ctl: &MigrationControl,
) -> Result<()> {
    {
        // The status stays what `MigrationControl::new` made it (`setup`): a `query-migrate`
        // between `migrate` and here must not see "nothing".
        let mut s = ctl.stats();
        s.started = Some(Instant::now());
        s.total = vm.ram().regions().iter().map(|r| r.size).sum();
    }
    ctl.announce();
    // A panic is a failed migration, never a status left non-final: unwinding dropped the
    // Session, which resumed the source unless GO had gone out; the channel is shut so the target
    // stops waiting; after the commit the outcome is in doubt.
    let vm2 = vm.clone();
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| outgoing(vm, uri, fd, ctl)))
            .unwrap_or_else(|p| {
                ctl.shut_channel();
                let e = MigrateError::panicked(p);
                if ctl.is_committed() {
                    Err(MigrateError::InDoubt(e.to_string()))
                } else {
                    Err(e)
                }
            });
    // After a migration into a file or a command the guest may continue here (`cont`): keep
    // what waits for it. Memory handed over is the target's from the commit, even when the end
    // is in doubt: nothing may run on it here again.
    let handed = ctl.params.mode == crate::MigrationMode::CprTransfer && ctl.is_committed();
    let away = result.is_ok() && !matches!(uri, Uri::File(_) | Uri::Exec(_));
    if handed && !away {
        // In doubt: before anyone may `cont` (the final status allows it).
        vm2.migrated_away();
    }
    let status = match &result {
        Ok(()) => MigrationStatus::Completed,
        Err(MigrateError::Cancelled) => MigrationStatus::Cancelled,
        Err(e @ (MigrateError::GuestLost(_) | MigrateError::PostcopyPaused(_))) => {
            tracing::error!("{e}");
            {
                // The source stays paused: only the operator may take the guest back (`cont`
                // resumes it as it was at the switch, without what it did on the target).
                let mut s = ctl.stats();
                s.error = Some(e.to_string());
                s.in_doubt = true;
            }
            match e {
                MigrateError::PostcopyPaused(_) => MigrationStatus::PostcopyPaused,
                _ => MigrationStatus::Failed,
            }
        }
        Err(e @ MigrateError::InDoubt(_)) => {
            tracing::error!("{e}");
            let mut s = ctl.stats();
            s.error = Some(e.to_string());
            s.in_doubt = true;
            MigrationStatus::Failed
        }
        Err(e) if ctl.is_cancelled() => {
            tracing::info!("migration cancelled ({e})");
            MigrationStatus::Cancelled
        }
        Err(e) => {
            ctl.stats().error = Some(e.to_string());
            MigrationStatus::Failed
        }
    };
    {
        let mut s = ctl.stats();
        s.transferred = ctl.accepted();
        s.throttle_percent = 0;
    }
    ctl.finalize(status);
    // Completed: the source is in postmigrate (nothing runs the guest here again), so the
    // cleanup — unmapping memory handed over costs milliseconds per GiB the guest touched —
    // need not delay the migration's end.
    if away {
        vm2.migrated_away();
    }
    result
}

/// A random session id for the channel hello.
fn session_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom(2) writes at most `id.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        // No entropy source: the id only tells connections apart, uniqueness suffices.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id.copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
    id
}

fn outgoing(
    vm: Arc<dyn SourceVm>,
    uri: &Uri,
    fd: Option<OwnedFd>,
    ctl: &MigrationControl,
) -> Result<()> {
    if ctl.caps().multifd && !matches!(uri, Uri::Tcp(..) | Uri::Unix(_)) {
        return Err(MigrateError::Vm(format!(
            "multifd needs a tcp: or unix: URI (the target accepts several connections), not {uri}"
        )));
    }
    let handover = ctl.params.mode == crate::MigrationMode::CprTransfer;
    if handover {
        let refuse = |why: String| Err(MigrateError::Vm(format!("mode cpr-transfer: {why}")));
        if !matches!(uri, Uri::Unix(_)) {
            return refuse(format!(
                "the memory is handed over a unix: socket to a target on this host, not {uri}"
            ));
        }
        if ctl.caps().postcopy_ram {
            return refuse("no memory moves, so postcopy-ram does not apply".into());
        }
        if ctl.tls().is_some() {
            return refuse("a hand-over stays on this host: tls-creds does not apply".into());
        }
    }
    // Every migration says whether it hands the memory over (a failed hand-over's mark goes).
    let memfd = vm.handover_memory(handover)?;
    let channel = open(uri, fd, ctl)?;
    // (A cancel that came while connecting applies now.)
    ctl.set_conn(channel.canceller());
    // Each connection says hello as soon as it is open, the main one first: the target reads the
    // main hello before it accepts the data channels.
    let session = session_id();
    let (data, urgent) = match data_channels(&channel.conn, uri, session, ctl, memfd) {
        Ok(d) => d,
        Err(e) => {
            ctl.shut_channel();
            channel.end.detach();
            ctl.clear_conn();
            return Err(e);
        }
    };
    let Channel { conn, end } = channel;
    let mut end = Some(end);
    let result = transfer(vm, ctl, conn, data, urgent, session, &mut end);
    if result.is_err() {
        // Stop the other end: a socket is shut down, a command is killed.
        ctl.shut_channel();
    }
    if let Some(e) = end.take() {
        // A command that was not waited for is reaped in the background.
        e.detach();
    }
    ctl.clear_conn();
    result
}

/// Connects to `uri`, and with `tls-creds` secures the connection (the handshake, the target's
/// acceptance) before a byte of the stream goes out.
pub(super) fn open(uri: &Uri, fd: Option<OwnedFd>, ctl: &MigrationControl) -> Result<Channel> {
    if ctl.tls().is_some() && matches!(uri, Uri::File(_) | Uri::Exec(_)) {
        return Err(MigrateError::Vm(format!(
            "TLS needs a socket (tcp:, unix:, or an fd: that is one), not {uri}"
        )));
    }
    let mut ch = Channel::connect(uri, fd)?;
    if let Some(tls) = ctl.tls() {
        let host = match uri {
            Uri::Tcp(h, _) => Some(h.as_str()),
            _ => None,
        };
        ch.conn = ch.conn.tls_client(&tls, host)?;
    }
    Ok(ch)
}

/// Says the main channel's hello and, with the `multifd` capability, connects and greets
/// `multifd-channels` data channels to `uri` (a `tcp:` or `unix:` one, checked before: the target
/// must be able to accept several connections).
/// ... and, with `postcopy-ram` and `postcopy-preempt`, the postcopy-urgent connection, last.
fn data_channels(
    main: &Connection,
    uri: &Uri,
    session: [u8; 16],
    ctl: &MigrationControl,
    memfd: Option<OwnedFd>,
) -> Result<(Vec<Connection>, Option<Connection>)> {
    let n = if ctl.caps().multifd {
        u16::from(ctl.params.multifd_channels)
    } else {
        0
    };
    let caps = ctl.caps();
    let urgent = caps.postcopy_ram && caps.postcopy_preempt && main.two_way();
    if urgent && !matches!(uri, Uri::Tcp(..) | Uri::Unix(_)) {
        return Err(MigrateError::Vm(format!(
            "postcopy-preempt needs a tcp: or unix: URI (the target accepts a second connection), not {uri}"
        )));
    }
    let all = 1 + n + u16::from(urgent);
    if let Some(fd) = memfd {
        // The memory's descriptor goes with the hello's bytes (SCM_RIGHTS).
        let mut bytes = Vec::new();
        let h = ChannelHello {
            session,
            role: ChannelRole::Main,
            index: 0,
            channels: all,
        };
        RecordWriter::new(&mut bytes).write(record_type::CHANNEL_HELLO, 0, &h.encode())?;
        main.send_with_fds(&bytes, &[std::os::fd::AsRawFd::as_raw_fd(&fd)])
            .map_err(MigrateError::io("handing the memory over"))?;
    } else if main.two_way() {
        hello(main, session, ChannelRole::Main, 0, all)?;
    }
    let data = (0..n)
        .map(|i| {
            ctl.check_cancel()?;
            let c = open(uri, None, ctl)?.conn;
            hello(&c, session, ChannelRole::Data, i, all)?;
            Ok(c)
        })
        .collect::<Result<Vec<_>>>()?;
    let urgent = if urgent {
        ctl.check_cancel()?;
        let c = open(uri, None, ctl)?.conn;
        hello(&c, session, ChannelRole::PostcopyUrgent, 0, all)?;
        Some(c)
    } else {
        None
    };
    Ok((data, urgent))
}

/// Everything between the connection and its teardown. `end` is taken while the stream runs and
/// given back unless it was completed.
fn transfer(
    vm: Arc<dyn SourceVm>,
    ctl: &MigrationControl,
    conn: Connection,
    data: Vec<Connection>,
    urgent: Option<Connection>,
    session_id: [u8; 16],
    end: &mut Option<ChannelEnd>,
) -> Result<()> {
    ctl.check_cancel()?;
    let two_way = conn.two_way().then(|| conn.clone());
    if let (Some(c), false) = (&two_way, data.is_empty() && urgent.is_none()) {
        let all = std::iter::once(c)
            .chain(&data)
            .chain(&urgent)
            .map(|c| Canceller::Socket(c.clone()))
            .collect();
        ctl.set_conn(Canceller::Many(all));
    }
    let writer: Box<dyn Write + Send> = Box::new(BufWriter::with_capacity(
        256 << 10,
        RateLimited::new(conn, ctl.bandwidth_limit.clone(), ctl.accepted_counter()),
    ));
    let out = if ctl.params.mode == crate::MigrationMode::CprTransfer {
        StreamWriter::new_handover(writer)?
    } else {
        StreamWriter::new(writer)?
    };
    // Nothing below returns early until the teardown, which ends this thread.
    let ret = match &two_way {
        Some(c) => Some(ReturnPath::start(c.clone())?),
        None => None,
    };
    // The urgent channel's bytes count with the rest (`transferred`, `postcopy-bytes`), but
    // no cap holds a page a vCPU waits for (max-postcopy-bandwidth is for the background).
    let urgent_out = match urgent.clone() {
        Some(c) => Some(StreamWriter::new(Box::new(BufWriter::with_capacity(
            64 << 10,
            RateLimited::new(c, Arc::default(), ctl.accepted_counter()),
        )) as Box<dyn Write + Send>)?),
        None => None,
    };
    let mut link = Link {
        out,
        urgent: urgent_out,
        urgent_conn: urgent,
        urgent_thread: None,
        urgent_requests: Arc::default(),
        urgent_failed: Arc::default(),
        session: session_id,
        ret,
        end: end.take(),
        conn: two_way,
        data_conns: data,
        data: None,
    };
    let mut session = Session {
        vm: vm.clone(),
        parts: vm.save_participants(),
        paused: false,
        phase: Phase::Setup,
    };
    let result = phases(ctl, &mut session, &mut link);
    // The guest first: a source this migration paused runs again now unless GO (or, one-way,
    // END to a live reader) went out.
    drop(session);
    let had_data = link.data.is_some();
    if result.is_err() {
        // The data channels stop at once (their connections shut), the return path stays open
        // for the target's reason.
        if let Some(d) = link.data.take() {
            d.stop();
        }
    }
    let result = match result {
        // A write failed: the target may have said why before closing.
        Err(MigrateError::Wire(e)) if matches!(e.kind, tern_wire::ErrorKind::Io(_)) => {
            match link
                .ret
                .as_mut()
                .and_then(|r| r.reason(Duration::from_secs(2)))
            {
                Some(reason) => Err(MigrateError::TargetRefused(reason)),
                None => ctl.check_cancel().and(Err(MigrateError::Wire(e))),
            }
        }
        // A data channel failed: the target may have said why on the main channel.
        Err(e @ MigrateError::Vm(_)) if had_data => match link
            .ret
            .as_mut()
            .and_then(|r| r.reason(Duration::from_secs(2)))
        {
            Some(reason) => Err(MigrateError::TargetRefused(reason)),
            None => ctl.check_cancel().and(Err(e)),
        },
        other => other,
    };
    // The channel is done: a target still waiting sees it close (before GO that means it must
    // not run), a failed command is killed before the writer's buffer would block on it, and
    // the return-path thread ends.
    if result.is_err() {
        ctl.shut_channel();
    }
    if let Some(d) = link.data.take() {
        // Done, or their connections were just shut: the threads end.
        d.stop();
    }
    if let Some(c) = &link.conn {
        c.shutdown();
    }
    if let Some(c) = &link.urgent_conn {
        c.shutdown();
    }
    // The stream's writer goes (a command sees end of input); `link` itself lives on for its
    // guard of the data channels.
    if let Ok(blank) = StreamWriter::new(Box::new(std::io::sink()) as Box<dyn Write + Send>) {
        drop(std::mem::replace(&mut link.out, blank));
    }
    if let Some(r) = link.ret.take() {
        r.join();
    }
    *end = link.end.take();
    result
}

/// The first record on a live connection (`docs/stream-format.md`, CHANNEL_HELLO).
fn hello(
    conn: &Connection,
    session: [u8; 16],
    role: ChannelRole,
    index: u16,
    channels: u16,
) -> Result<()> {
    let h = ChannelHello {
        session,
        role,
        index,
        channels,
    };
    let mut w = RecordWriter::new(conn.clone());
    w.write(record_type::CHANNEL_HELLO, 0, &h.encode())?;
    Ok(())
}

fn phases(ctl: &MigrationControl, session: &mut Session, link: &mut Link) -> Result<()> {
    let started = ctl.stats().started.unwrap_or_else(Instant::now);
    precopy::setup(ctl, session, link, started)?;
    session.enter(Phase::Precopy);
    ctl.set_active();
    let rounds = precopy::rounds(ctl, session, link, started)?;
    if ctl.postcopy_requested() {
        postcopy::run(ctl, session, link, started, rounds)
    } else {
        switchover::run(ctl, session, link, started, rounds)
    }
}

/// Copies the participants' progress into the statistics.
fn update_counters(s: &mut MigrationStats, session: &Session, accepted: u64) {
    let p = session.progress();
    s.normal = p.data_pages;
    s.duplicate = p.zero_pages;
    let mut disk = None;
    for c in session.parts.iter().filter_map(|p| p.disk_counters()) {
        *disk.get_or_insert_with(crate::participant::DiskCounters::default) += c;
    }
    let d = disk.unwrap_or_default();
    // RAM's numbers without the disks' (their own object).
    s.remaining = session.pending().saturating_sub(d.remaining);
    s.transferred = accepted.saturating_sub(d.transferred);
    s.disk = disk;
}
