//! The machine manager of `tern run`: the VM, what the process is doing with it (live,
//! receiving, migrated away), and the migrations that start, end and change that — each decided
//! under the migration manager's one lock. The QMP backend and the human monitor drive it.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use serde_json::{json, Value};
use tern_migrate::transport::{inherited_fd, Listener, Uri};
use tern_migrate::{
    run_incoming, run_outgoing, Capabilities, MigrateError, MigrationEvent, MigrationManager,
    MigrationStatus, SourceVm, TargetVm,
};
use tern_qmp::Server;
use tern_vmm::machine::{HostInfo, MachineDescription, Requested};
use tern_vmm::{MachineConfig, RunState, SerialOutput, Vm};

/// What the process is doing, as QMP's `query-status` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for, or receiving, a migration.
    InMigrate,
    /// The guest is ours (running or paused).
    Live,
    /// Migrated away; paused until `quit`.
    PostMigrate,
    /// The last switch-over is in doubt (GO went out, RUNNING never came): the target may run
    /// the guest. Paused; no new migration until the operator's `cont` takes the guest back.
    InDoubt,
}

/// The process's state, shared with the QMP backend and the migration threads.
pub(crate) struct App {
    pub(crate) vm: OnceLock<Arc<Vm>>,
    phase: Mutex<Phase>,
    pub(crate) server: OnceLock<Arc<Server>>,
    /// Parameters, capabilities and the migration: one owner, one lock to start one.
    pub(crate) mig: MigrationManager,
    /// The latest `calc-dirty-rate`.
    pub(crate) dirty_rate: Arc<tern_migrate::dirtyrate::DirtyRate>,
    pub(crate) incoming: Mutex<IncomingState>,
    incoming_cv: Condvar,
    machine: MachineSpec,
    /// After a migration into a file or a command, the guest may continue here (`cont`).
    pub(crate) resumable: AtomicBool,
    /// The monitor sockets, removed when the process ends.
    pub(crate) sockets: Mutex<Vec<PathBuf>>,
    /// `quit` (or a signal) was asked for: an incoming migration it stopped is not a failure.
    pub(crate) quitting: AtomicBool,
    /// Why: QEMU's SHUTDOWN reason ("host-qmp-quit", "host-signal").
    quit_reason: Mutex<&'static str>,
    /// The incoming migration reads a saved file (a restore), not a live source.
    incoming_from_file: AtomicBool,
    /// What this host offers, asked of KVM while the target waits (a throw-away VM: some
    /// milliseconds that would otherwise fall inside the migration).
    host: Mutex<Option<HostInfo>>,
}

/// The target's machine options, if given (the stream must match them).
pub(crate) struct MachineSpec {
    pub(crate) memory: Option<u64>,
    pub(crate) memory_backend: tern_vmm::MemoryBackend,
    pub(crate) dirty_ring_size: u32,
    pub(crate) vcpus: Option<u32>,
    pub(crate) serial: SerialOutput,
    pub(crate) kvm_path: PathBuf,
    /// A restore from a mapped-layout file reads pages on demand.
    pub(crate) on_demand: bool,
    /// `--disk` options, in slot order.
    pub(crate) disks: Vec<tern_vmm::DiskConfig>,
    /// `--net` options, in the slots after the disks.
    pub(crate) nets: Vec<tern_vmm::NetConfig>,
    /// False with `-S`: a migrated guest is loaded and waits for `cont`.
    pub(crate) autostart: bool,
}

/// Whether `path` is a file in the mapped layout (its stream header says so).
pub(crate) fn is_mapped(path: &std::path::Path) -> bool {
    use std::io::Read;
    // Only a regular file: reading a pipe's first bytes here would take them from the reader.
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return false;
    }
    let mut h = [0u8; 16];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut h))
        .is_ok_and(|()| {
            &h[0..8] == b"TERNSTRM"
                && u32::from_le_bytes([h[12], h[13], h[14], h[15]]) & tern_wire::FLAG_MAPPED != 0
        })
}

pub(crate) enum IncomingState {
    /// No `--incoming`.
    None,
    /// `--incoming defer`, waiting for `migrate-incoming`.
    Deferred,
    /// Listening or loading.
    Running,
    /// Done: the guest runs here.
    Done,
    /// Failed, with the reason.
    Failed(String),
}

impl App {
    pub(crate) fn new(phase: Phase, machine: MachineSpec) -> Arc<App> {
        Arc::new(App {
            vm: OnceLock::new(),
            phase: Mutex::new(phase),
            server: OnceLock::new(),
            mig: MigrationManager::default(),
            dirty_rate: Arc::default(),
            incoming: Mutex::new(IncomingState::None),
            incoming_cv: Condvar::new(),
            machine,
            resumable: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
            quitting: AtomicBool::new(false),
            quit_reason: Mutex::new("host-qmp-quit"),
            incoming_from_file: AtomicBool::new(false),
            host: Mutex::new(None),
        })
    }

    pub(crate) fn emit(&self, event: &str, data: Option<Value>) {
        if let Some(s) = self.server.get() {
            s.emit(event, data);
        }
    }

    /// Sends SHUTDOWN and waits (briefly) until the monitor clients have been sent it: the
    /// process exits next.
    pub(crate) fn emit_shutdown(&self, guest: bool, reason: &str) {
        if let Some(s) = self.server.get() {
            s.emit("SHUTDOWN", Some(json!({"guest": guest, "reason": reason})));
            s.flush(std::time::Duration::from_secs(1));
        }
    }

    /// Why the process is quitting.
    pub(crate) fn quit_reason(&self) -> &'static str {
        *self.quit_reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the process as QMP `quit` does (`reason`: QEMU's SHUTDOWN reason). A migration in
    /// progress is cancelled first: an incoming one stops and its source runs on; an outgoing one
    /// stops and leaves the target nothing to run. (After the commit the cancel is refused and
    /// the guest is the target's.)
    pub(crate) fn shutdown(&self, reason: &'static str) {
        *self.quit_reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.quitting.store(true, Ordering::SeqCst);
        let _ = self.mig.cancel();
        match self.vm.get() {
            Some(vm) => vm.request_exit(tern_vmm::VmExit::Shutdown(reason)),
            None => {
                // No VM yet (an incoming migration pending): the process ends here.
                self.emit_shutdown(false, reason);
                for p in self
                    .sockets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                {
                    let _ = std::fs::remove_file(p);
                }
                std::process::exit(0);
            }
        }
    }

    pub(crate) fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// QMP's MIGRATION and MIGRATION_PASS events, if the `events` capability is on.
    fn events(
        self: &Arc<Self>,
    ) -> impl Fn(Capabilities) -> Box<dyn Fn(MigrationEvent) + Send + Sync> {
        let app = Arc::downgrade(self);
        move |caps| {
            let app = app.clone();
            Box::new(move |ev| {
                let Some(app) = app.upgrade() else { return };
                if !caps.events {
                    return;
                }
                match ev {
                    MigrationEvent::Status(s) => {
                        app.emit("MIGRATION", Some(json!({"status": s.as_str()})))
                    }
                    MigrationEvent::Pass(n) => app.emit("MIGRATION_PASS", Some(json!({"pass": n}))),
                }
            })
        }
    }

    pub(crate) fn set_incoming(&self, s: IncomingState) {
        *self.incoming.lock().unwrap_or_else(|e| e.into_inner()) = s;
        self.incoming_cv.notify_all();
    }

    /// The descriptor an `fd:` URI names: a QMP `getfd` name or an inherited number.
    pub(crate) fn resolve_fd(&self, uri: &Uri) -> Result<Option<OwnedFd>, String> {
        let Uri::Fd(name) = uri else { return Ok(None) };
        if let Some(n) = uri.fd_number() {
            return inherited_fd(n).map(Some).map_err(|e| e.to_string());
        }
        self.server
            .get()
            .and_then(|s| s.take_fd(name))
            .map(Some)
            .ok_or_else(|| format!("File descriptor named '{name}' has not been found"))
    }

    /// Binds the listener now (so errors reach the caller) and receives on a thread. Only
    /// when no incoming migration was started yet (`--incoming URI`, or `defer` until the first
    /// `migrate-incoming`), decided under the migration manager's lock.
    pub(crate) fn start_incoming(self: &Arc<Self>, uri: &str) -> Result<(), String> {
        let uri = Uri::parse(uri).map_err(|e| e.to_string())?;
        self.mig
            .check_tls(tern_migrate::transport::tls::TlsEndpoint::Server)?;
        if let Ok(h) = HostInfo::probe(&self.machine.kvm_path) {
            *self.host.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        }
        let mut listener = None;
        let ctl = self.mig.begin(
            || {
                let mut inc = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
                if !matches!(*inc, IncomingState::Deferred) {
                    return Err("'-incoming' was not specified on the command line".into());
                }
                let fd = self.resolve_fd(&uri)?;
                listener = Some(Listener::bind(&uri, fd).map_err(|e| e.to_string())?);
                *inc = IncomingState::Running;
                Ok(())
            },
            self.events(),
        )?;
        self.incoming_cv.notify_all();
        self.incoming_from_file
            .store(matches!(uri, Uri::File(_)), Ordering::SeqCst);
        let listener = listener.expect("bound when begin succeeds");
        let mapped = match &uri {
            Uri::File(p) if is_mapped(p) => Some(p.clone()),
            _ => None,
        };
        let weak = Arc::downgrade(self);
        ctl.before_final(move |s| {
            if let (Some(app), MigrationStatus::Completed) = (weak.upgrade(), s.status) {
                *app.phase() = Phase::Live;
            }
        });
        // Once the guest runs here, the network learns where it is (at GO, at postcopy's RUN, or
        // when an on-demand restore starts it; QEMU announces at the same points). An on-demand
        // restore runs the guest while pages still come: it is live from then.
        let (weak, restore) = (Arc::downgrade(self), mapped.is_some());
        let announced = Arc::new(AtomicBool::new(false));
        let once = announced.clone();
        ctl.on_guest_running(move || {
            if let Some(app) = weak.upgrade() {
                if restore {
                    *app.phase() = Phase::Live;
                }
                if !once.swap(true, Ordering::SeqCst) {
                    app.announce_guest();
                }
            }
        });
        let (app, keep) = (self.clone(), ctl.clone());
        std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || {
                let result = match &mapped {
                    // Pages at fixed offsets: restored in full, or on demand.
                    Some(path) => std::fs::File::open(path)
                        .map_err(|e| MigrateError::Vm(format!("{}: {e}", path.display())))
                        .and_then(|f| tern_wire::MappedFile::open(f).map_err(MigrateError::Wire))
                        .and_then(|f| {
                            tern_migrate::restore_mapped(
                                f,
                                app.factory(None),
                                &ctl,
                                app.machine.on_demand,
                            )
                        })
                        .map(|_| ()),
                    None => {
                        run_incoming(&listener, app.factory(Some(ctl.clone())), &ctl).map(|_| ())
                    }
                };
                app.mig.finish(&ctl, || match result {
                    Ok(()) => {
                        // A restore that loaded everything first starts the guest only now.
                        if !announced.swap(true, Ordering::SeqCst) {
                            app.announce_guest();
                        }
                        app.emit("RESUME", None);
                        app.set_incoming(IncomingState::Done);
                    }
                    Err(e) => app.set_incoming(IncomingState::Failed(e.to_string())),
                });
            })
            .map_err(|e| {
                let why = format!("cannot start the migration thread: {e}");
                self.mig.abandon(&keep, &why);
                self.set_incoming(IncomingState::Failed(why.clone()));
                why
            })?;
        Ok(())
    }

    /// Starts an outgoing migration to `uri` on a thread, if the guest is ours to migrate and
    /// no other migration runs (one decision, under the migration manager's lock).
    pub(crate) fn start_outgoing(
        self: &Arc<Self>,
        uri: Uri,
        copy_disks: bool,
    ) -> Result<(), String> {
        let vm = self
            .vm
            .get()
            .cloned()
            .ok_or("The VM is not there yet: an incoming migration is pending")?;
        self.mig
            .check_tls(tern_migrate::transport::tls::TlsEndpoint::Client)?;
        let mut fd = None;
        let ctl = self.mig.begin(
            || {
                match *self.phase() {
                    Phase::Live => {}
                    Phase::InDoubt => return Err("Cannot migrate: the last switch-over is in doubt (the target may be running the guest); check the target, then `cont` here to take the guest back".into()),
                    _ => return Err("Cannot migrate: the guest is not ours to migrate (incoming or already migrated)".into()),
                }
                fd = self.resolve_fd(&uri)?;
                // Under the manager's lock, once this migration is sure to start: no other
                // migration reads it meanwhile (a refused `migrate` changes nothing).
                vm.set_copy_disks(copy_disks);
                Ok(())
            },
            self.events(),
        )?;
        // Before anyone hears the migration ended: the timeline is on disk, and a completed
        // source is in postmigrate.
        let (weak, timeline, u) = (Arc::downgrade(self), self.mig.timeline(), uri.clone());
        ctl.before_final(move |s| {
            if let Some(path) = timeline {
                let mut t = s.timeline();
                t["uri"] = json!(u.to_string());
                let text = serde_json::to_string_pretty(&t).unwrap_or_default();
                if let Err(e) = std::fs::write(&path, text + "\n") {
                    tracing::warn!("cannot write the timeline {}: {e}", path.display());
                }
            }
            let Some(app) = weak.upgrade() else { return };
            if s.status == MigrationStatus::Completed {
                // A shared disk has passed to whoever reads the stream: never two guests on it.
                let shared = app.vm.get().is_some_and(|v| v.has_shared_disks());
                app.resumable.store(
                    matches!(u, Uri::File(_) | Uri::Exec(_)) && !shared,
                    Ordering::SeqCst,
                );
                *app.phase() = Phase::PostMigrate;
            } else if s.in_doubt {
                *app.phase() = Phase::InDoubt;
            }
        });
        let (app, keep) = (self.clone(), ctl.clone());
        let was_running = vm.state() == RunState::Running;
        std::thread::Builder::new()
            .name("migration-out".into())
            .spawn(move || {
                let result = run_outgoing(vm.clone() as Arc<dyn SourceVm>, &uri, fd, &ctl);
                app.mig.finish(&ctl, || match result {
                    Ok(()) => {
                        if was_running {
                            app.emit("STOP", None);
                        }
                    }
                    Err(e) => tracing::warn!("migration to {uri} failed: {e}"),
                });
            })
            .map_err(|e| {
                let why = format!("cannot start the migration thread: {e}");
                self.mig.abandon(&keep, &why);
                why
            })?;
        Ok(())
    }

    /// Builds the target VM from the stream's description, checked against our options and this
    /// host first (every mismatch named), before anything is allocated.
    fn factory(
        self: &Arc<Self>,
        ctl: Option<Arc<tern_migrate::MigrationControl>>,
    ) -> tern_migrate::TargetFactory<'static> {
        let app = self.clone();
        Box::new(move |desc| {
            // A hand-over (cpr-transfer): the guest's memory came with the source's hello.
            let memory_fd = match desc.machine.get("x-tern-handover") {
                Some(serde_json::Value::Bool(true)) => {
                    let fd = ctl
                        .as_ref()
                        .and_then(|c| c.take_received_fds().into_iter().next())
                        .ok_or_else(|| {
                            MigrateError::Vm(
                                "the source hands its memory over (cpr-transfer), but no \
                                 descriptor came with it (it needs a unix: socket on this host)"
                                    .into(),
                            )
                        })?;
                    Some(Arc::new(fd))
                }
                _ => None,
            };
            let m =
                MachineDescription::from_stream(&desc.machine).map_err(MigrateError::Mismatch)?;
            let cached = app.host.lock().unwrap_or_else(|e| e.into_inner()).take();
            let mut host = match cached {
                Some(h) => h,
                None => HostInfo::probe(&app.machine.kvm_path).map_err(MigrateError::Vm)?,
            };
            if memory_fd.is_some() {
                // The memory handed over exists already: it takes nothing more of the host's.
                host.available = None;
            }
            let disks = app
                .machine
                .disks
                .iter()
                .map(|c| tern_vmm::Disk::open(c).map(|d| d.describe()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| MigrateError::Vm(format!("{e:#}")))?;
            let wanted = Requested {
                memory: app.machine.memory,
                vcpus: app.machine.vcpus,
                disks,
                nets: app
                    .machine
                    .nets
                    .iter()
                    .map(|n| tern_vmm::tap::format_mac(&n.mac))
                    .collect(),
                live: !app.incoming_from_file.load(Ordering::SeqCst),
            };
            let mismatches = m.mismatches(&host, &wanted);
            if !mismatches.is_empty() {
                return Err(MigrateError::Mismatch(mismatches.join("; ")));
            }
            // TAP descriptors passed with getfd are taken now; the VM attaches through its own
            // duplicates, and these close when the VM is built (or fails to be).
            let mut nets = app.machine.nets.clone();
            let mut passed = Vec::new();
            for n in &mut nets {
                if let tern_vmm::tap::TapSource::FdName(name) = &n.tap {
                    let fd = app
                        .server
                        .get()
                        .and_then(|s| s.take_fd(name))
                        .ok_or_else(|| {
                            MigrateError::Vm(format!(
                                "--net fd={name}: no descriptor was passed under that name \
                                 (QMP getfd {name} before migrate-incoming)"
                            ))
                        })?;
                    n.tap = tern_vmm::tap::TapSource::Fd(std::os::fd::AsRawFd::as_raw_fd(&fd));
                    passed.push(fd);
                }
            }
            let vm = Vm::create(&MachineConfig {
                memory: m.memory,
                memory_backend: app.machine.memory_backend,
                dirty_ring_size: app.machine.dirty_ring_size,
                vcpus: m.vcpus,
                serial: app.machine.serial.clone(),
                kvm_path: app.machine.kvm_path.clone(),
                disks: app.machine.disks.clone(),
                nets,
                memory_fd,
            })
            .map_err(|e| MigrateError::Vm(format!("{e:#}")))?;
            drop(passed);
            vm.set_autostart(app.machine.autostart);
            let _ = app.vm.set(vm.clone());
            Ok(vm as Arc<dyn TargetVm>)
        })
    }

    /// Announces the guest's NICs with the migration parameters' schedule.
    pub(crate) fn announce_guest(&self) {
        if let Some(vm) = self.vm.get() {
            vm.announce(announce_params(&self.mig.params()), None);
        }
    }

    /// Waits for an incoming migration to finish; returns the reason if it failed.
    pub(crate) fn wait_incoming(&self) -> Result<(), String> {
        let mut s = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*s {
                IncomingState::None | IncomingState::Done => return Ok(()),
                IncomingState::Failed(why) => return Err(why.clone()),
                _ => s = self.incoming_cv.wait(s).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

/// QMP `pmemsave`: `size` bytes of guest-physical memory from `addr` into `path`, a MiB at a time
/// (the range must be RAM).
pub(crate) fn pmemsave(
    vm: &Vm,
    addr: u64,
    size: u64,
    path: &std::path::Path,
) -> Result<(), String> {
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress};
    let _access = vm
        .ram()
        .read_access()
        .ok_or("The guest's memory was handed to another process (cpr-transfer)")?;
    let end = addr
        .checked_add(size)
        .ok_or_else(|| format!("Invalid parameter 'size': {addr:#x} + {size:#x} overflows"))?;
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path)
            .map_err(|e| format!("Could not open '{}': {e}", path.display()))?,
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut at = addr;
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        vm.ram()
            .memory()
            .read_slice(&mut buf[..n], GuestAddress(at))
            .map_err(|e| format!("Invalid parameter 'val': {at:#x} is not RAM ({e})"))?;
        f.write_all(&buf[..n])
            .map_err(|e| format!("writing '{}': {e}", path.display()))?;
        at += n as u64;
    }
    f.flush()
        .map_err(|e| format!("writing '{}': {e}", path.display()))
}

/// QEMU's `announce-*` migration parameters, as the VMM takes them.
pub(crate) fn announce_params(p: &tern_migrate::MigrationParams) -> tern_vmm::AnnounceParams {
    tern_vmm::AnnounceParams {
        initial: p.announce_initial_ms,
        max: p.announce_max_ms,
        rounds: p.announce_rounds,
        step: p.announce_step_ms,
    }
}
