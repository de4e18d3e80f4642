//! What a migration shares with the control socket: statistics, status events, the bandwidth
//! knob, and cancellation — which the source's point of no return closes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::params::{FaultAction, SwitchoverStep};
use crate::stats::{MigrationStats, MigrationStatus};
use crate::transport::Canceller;
use crate::{Capabilities, MigrateError, MigrationParams, Result};

/// Something that happened, for the control socket to turn into events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationEvent {
    /// The status changed (QMP `MIGRATION`).
    Status(MigrationStatus),
    /// A new round started (QMP `MIGRATION_PASS`).
    Pass(u64),
}

/// See [`MigrationControl::before_final`].
type FinalHook = Box<dyn FnOnce(&MigrationStats) + Send>;
type RunningHook = Box<dyn FnOnce() + Send>;
type Pauser = Box<dyn Fn() + Send + Sync>;

/// Why `migrate_cancel` was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CancelRefused {
    #[error("The migration has passed its point of no return (the target was told to run the guest); it cannot be cancelled")]
    Committed,
}

/// Where cancellation stands against the commit; one lock decides which came first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Commit {
    Open,
    Cancelled,
    Committed,
}

/// Shared between the migration thread and the control socket.
pub struct MigrationControl {
    stats: Mutex<MigrationStats>,
    commit: Mutex<Commit>,
    cancelled: AtomicBool,
    conn: Mutex<Option<Canceller>>,
    /// Set once the channel was shut down (a cancel, a fault, the end).
    channel_shut: AtomicBool,
    /// `migrate-start-postcopy` was asked for.
    postcopy: AtomicBool,
    /// Postcopy recovery: `migrate-pause` was asked for, and the URI a `migrate-recover`
    /// (target) or `migrate resume=true` (source) gave, for the paused migration thread.
    pause: AtomicBool,
    recovery: Mutex<Option<crate::transport::Uri>>,
    recovery_cv: std::sync::Condvar,
    /// `migrate_cancel` while postcopy was paused: the migration gives its half up.
    abandoned: AtomicBool,
    /// The target's way to pause (see [`MigrationControl::pause`]).
    pauser: Mutex<Option<Pauser>>,
    /// `max-bandwidth`, changeable while migrating.
    pub bandwidth_limit: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    pub(crate) params: MigrationParams,
    caps: Capabilities,
    events: Box<dyn Fn(MigrationEvent) + Send + Sync>,
    /// What the VMM does just before the status becomes final (QEMU's order: the run state
    /// changes first, so nobody sees "completed" with the old run state; the timeline is
    /// written before anyone is told the migration ended).
    before_final: Mutex<Option<FinalHook>>,
    /// What the VMM does once the guest runs before the migration ended.
    on_running: Mutex<Option<RunningHook>>,
    /// TLS on every connection of this migration (`tls-creds`).
    tls: Mutex<Option<Arc<crate::transport::tls::TlsSettings>>>,
    /// Descriptors the source passed (a hand-over's memory), until the VM is built.
    received_fds: Mutex<Vec<std::os::fd::OwnedFd>>,
}

impl MigrationControl {
    /// A control block for one migration, in status `setup` from the start (so that a
    /// `query-migrate` right after `migrate` sees it).
    pub fn new(
        params: MigrationParams,
        caps: Capabilities,
        events: Box<dyn Fn(MigrationEvent) + Send + Sync>,
    ) -> Arc<Self> {
        Arc::new(MigrationControl {
            stats: Mutex::new(MigrationStats {
                status: MigrationStatus::Setup,
                started: Some(Instant::now()),
                ..MigrationStats::default()
            }),
            commit: Mutex::new(Commit::Open),
            cancelled: AtomicBool::new(false),
            conn: Mutex::new(None),
            postcopy: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            recovery: Mutex::new(None),
            recovery_cv: std::sync::Condvar::new(),
            abandoned: AtomicBool::new(false),
            pauser: Mutex::new(None),
            channel_shut: AtomicBool::new(false),
            bandwidth_limit: Arc::new(AtomicU64::new(params.max_bandwidth)),
            accepted: Arc::new(AtomicU64::new(0)),
            tls: Mutex::new(None),
            received_fds: Mutex::new(Vec::new()),
            params,
            caps,
            events,
            before_final: Mutex::new(None),
            on_running: Mutex::new(None),
        })
    }

    /// Runs `f` once the guest runs here: at GO, at postcopy's RUN (long before every page is
    /// in), or when an on-demand restore starts it.
    pub fn on_guest_running(&self, f: impl FnOnce() + Send + 'static) {
        *self.on_running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Secures every connection of this migration with `tls` (set before it starts).
    pub fn set_tls(&self, tls: Option<Arc<crate::transport::tls::TlsSettings>>) {
        *self.tls.lock().unwrap_or_else(|e| e.into_inner()) = tls;
    }

    /// Keeps what came over the main connection with the source's hello.
    pub(crate) fn set_received_fds(&self, fds: Vec<std::os::fd::OwnedFd>) {
        *self.received_fds.lock().unwrap_or_else(|e| e.into_inner()) = fds;
    }

    /// The descriptors the source passed with its hello (`mode` `cpr-transfer`: the memory).
    pub fn take_received_fds(&self) -> Vec<std::os::fd::OwnedFd> {
        std::mem::take(&mut *self.received_fds.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The migration's TLS, if any.
    pub fn tls(&self) -> Option<Arc<crate::transport::tls::TlsSettings>> {
        self.tls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The guest runs here (see [`Self::on_guest_running`]).
    pub(crate) fn guest_running(&self) {
        let f = self
            .on_running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(f) = f {
            f();
        }
    }

    /// Runs `f` with the final statistics just before the status becomes final.
    pub fn before_final(&self, f: impl FnOnce(&MigrationStats) + Send + 'static) {
        *self.before_final.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Ends the migration with `status`: the VMM's hook first, then the status (and its event).
    pub(crate) fn finalize(&self, status: MigrationStatus) {
        let hook = self
            .before_final
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(f) = hook {
            let mut s = self.snapshot();
            s.status = status;
            s.ended = Some(Instant::now());
            f(&s);
        }
        self.set_status(status);
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

    /// Moves to `active` unless a cancel is already under way.
    pub(crate) fn set_active(&self) {
        if !self.is_cancelled() {
            self.set_status(MigrationStatus::Active);
        }
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

    /// Emits the current status again (QEMU's MIGRATION event for `setup`, which the status
    /// already had when the control block was made).
    pub(crate) fn announce(&self) {
        let status = self.stats().status;
        (self.events)(MigrationEvent::Status(status));
    }

    pub(crate) fn pass(&self, n: u64) {
        (self.events)(MigrationEvent::Pass(n));
    }

    /// `migrate-start-postcopy`: the source switches to postcopy at its next step (or right
    /// after setup). Refused without the `postcopy-ram` capability, or once the migration ended.
    pub fn start_postcopy(&self) -> std::result::Result<(), String> {
        if !self.caps.postcopy_ram {
            return Err(
                "Enable postcopy with migrate_set_capability before the start of migration".into(),
            );
        }
        let status = self.stats().status;
        if status.is_final() || status == MigrationStatus::PostcopyActive {
            return Err(format!(
                "Postcopy cannot start: the migration is {}",
                status.as_str()
            ));
        }
        self.postcopy.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// `migrate-pause`: postcopy pauses as if the link had broken. The target's hook (see
    /// [`Self::set_pauser`]) says PAUSED and closes its side for writing; without one (the
    /// source) the connections are shut, waking a writer blocked on them. Valid in
    /// `postcopy-active` and while recovering.
    pub fn pause(&self) -> std::result::Result<(), String> {
        let status = self.stats().status;
        if !matches!(
            status,
            MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyRecover
                | MigrationStatus::PostcopyRecoverSetup
        ) {
            return Err(format!(
                "migrate-pause is only valid during postcopy-active (the migration is {})",
                status.as_str()
            ));
        }
        self.pause.store(true, Ordering::SeqCst);
        let pauser = self.pauser.lock().unwrap_or_else(|e| e.into_inner());
        match pauser.as_ref() {
            Some(p) => p(),
            None => {
                if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    c.cancel();
                }
            }
        }
        // A recovery waiting for its connection stops waiting.
        self.recovery_cv.notify_all();
        Ok(())
    }

    /// How `migrate-pause` stops the current connection (the target's: PAUSED, then its side
    /// closed for writing; never its reads, which would make the kernel answer the source's
    /// data with a reset that can discard PAUSED).
    pub(crate) fn set_pauser(&self, p: Option<Pauser>) {
        *self.pauser.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Postcopy moves on (RUN, or a recovery): `postcopy-active`, unless the migration paused
    /// meanwhile (then it stays paused: only a recovery makes it active again).
    pub(crate) fn postcopy_active(&self) {
        let paused = matches!(
            self.stats().status,
            MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecover
                | MigrationStatus::PostcopyRecoverSetup
        );
        if !paused {
            self.set_status(MigrationStatus::PostcopyActive);
        }
    }

    /// Whether `migrate-pause` was asked for since the last recovery; taking it clears it.
    pub(crate) fn take_pause(&self) -> bool {
        self.pause.swap(false, Ordering::SeqCst)
    }

    /// Whether `migrate-pause` was asked for (not cleared).
    pub(crate) fn pause_asked(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    /// `migrate-recover URI` (target) or `migrate` with `resume: true` (source): the paused
    /// migration reconnects through `uri`. Valid only in `postcopy-paused`.
    pub fn recover(&self, uri: crate::transport::Uri) -> std::result::Result<(), String> {
        let status = self.stats().status;
        if status != MigrationStatus::PostcopyPaused {
            return Err(format!(
                "Recovery is only valid when postcopy is paused (the migration is {})",
                status.as_str()
            ));
        }
        if !matches!(
            uri,
            crate::transport::Uri::Tcp(..) | crate::transport::Uri::Unix(_)
        ) {
            return Err(format!(
                "postcopy recovery needs a tcp: or unix: URI, not {uri}"
            ));
        }
        *self.recovery.lock().unwrap_or_else(|e| e.into_inner()) = Some(uri);
        self.recovery_cv.notify_all();
        Ok(())
    }

    /// The paused migration thread: waits for the URI of a recovery; `None` once
    /// `migrate_cancel` gave the migration up.
    pub(crate) fn wait_recovery(&self) -> Option<crate::transport::Uri> {
        let mut g = self.recovery.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.abandoned.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(u) = g.take() {
                return Some(u);
            }
            g = self.recovery_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A pause begins: a recovery URI given before it (to the last pause) is forgotten.
    pub(crate) fn clear_recovery(&self) {
        *self.recovery.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The source's own decision to switch (`x-tern-auto-postcopy`).
    pub(crate) fn request_postcopy(&self) {
        self.postcopy.store(true, Ordering::SeqCst);
    }

    /// Whether `migrate-start-postcopy` was asked for.
    pub(crate) fn postcopy_requested(&self) -> bool {
        self.postcopy.load(Ordering::SeqCst)
    }

    /// The capabilities this migration runs with.
    pub fn caps(&self) -> Capabilities {
        self.caps
    }

    /// The channel's canceller; a cancel that came before it (while connecting) applies at once.
    pub(crate) fn set_conn(&self, c: Canceller) {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if self.channel_shut.load(Ordering::SeqCst) {
            c.cancel();
        }
        *slot = Some(c);
    }

    /// Drops the canceller (and so this block's handle on the channel).
    pub(crate) fn clear_conn(&self) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Stops the channel (a blocked read or write fails at once).
    pub(crate) fn shut_channel(&self) {
        let slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        self.channel_shut.store(true, Ordering::SeqCst);
        if let Some(c) = slot.as_ref() {
            c.cancel();
        }
    }

    /// Cancels: the migration thread stops at the next record (or its blocked read or write
    /// fails) and resumes the source. Refused once the source has committed to the switch-over.
    pub fn cancel(&self) -> std::result::Result<(), CancelRefused> {
        {
            let mut c = self.commit.lock().unwrap_or_else(|e| e.into_inner());
            match *c {
                Commit::Committed if self.stats().status == MigrationStatus::PostcopyPaused => {
                    // Postcopy is paused and the operator gives it up: the paused thread ends,
                    // reporting the guest lost on this side (it keeps what it has).
                    self.abandoned.store(true, Ordering::SeqCst);
                    drop(c);
                    let _g = self.recovery.lock().unwrap_or_else(|e| e.into_inner());
                    self.recovery_cv.notify_all();
                    return Ok(());
                }
                Commit::Committed => return Err(CancelRefused::Committed),
                Commit::Cancelled => return Ok(()),
                Commit::Open => *c = Commit::Cancelled,
            }
            self.cancelled.store(true, Ordering::SeqCst);
        }
        {
            let mut s = self.stats();
            if !s.status.is_final() {
                s.status = MigrationStatus::Cancelling;
            }
        }
        (self.events)(MigrationEvent::Status(MigrationStatus::Cancelling));
        self.shut_channel();
        Ok(())
    }

    /// The point of no return: from here cancelling is refused. Fails if a cancel came first,
    /// or if the channel was shut down (a cut: nothing can be committed over it).
    pub(crate) fn commit(&self) -> Result<()> {
        let mut c = self.commit.lock().unwrap_or_else(|e| e.into_inner());
        match *c {
            Commit::Cancelled => Err(MigrateError::Cancelled),
            _ if self.channel_shut.load(Ordering::SeqCst) => Err(MigrateError::Vm(
                "the migration channel was shut down before the commit".into(),
            )),
            _ => {
                *c = Commit::Committed;
                Ok(())
            }
        }
    }

    /// Whether the commit was made (GO may have gone out).
    pub(crate) fn is_committed(&self) -> bool {
        *self.commit.lock().unwrap_or_else(|e| e.into_inner()) == Commit::Committed
    }

    /// Whether `migrate_cancel` was taken.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub(crate) fn check_cancel(&self) -> Result<()> {
        if self.is_cancelled() {
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

    /// Test aid: applies `x-tern-switchover-fault` if it names `step`. A hold ends early when
    /// the migration is cancelled.
    pub(crate) fn fault_at(&self, step: SwitchoverStep) {
        let Some(f) = self.params.switchover_fault.filter(|f| f.step == step) else {
            return;
        };
        tracing::warn!("x-tern-switchover-fault: {f}");
        match f.action {
            FaultAction::Cut => self.shut_channel(),
            FaultAction::Panic => panic!("x-tern-switchover-fault: a panic at {}", step.as_str()),
            FaultAction::Hold(ms) => {
                self.stats().fault_holding = Some(step.as_str());
                let until = Instant::now() + std::time::Duration::from_millis(ms);
                while Instant::now() < until && !self.is_cancelled() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                self.stats().fault_holding = None;
            }
        }
    }
}
