//! `tern run`: boot a VM (or receive one), serve its control socket until it stops.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};

use tern_migrate::transport::{inherited_fd, Listener, Uri};
use tern_migrate::{
    run_incoming, run_outgoing, Capabilities, MigrateError, MigrationEvent, MigrationManager,
    SourceVm, TargetVm,
};
use tern_qmp::Server;
use tern_vmm::machine::{host_memory, HostInfo, MachineDescription, Requested};
use tern_vmm::{MachineConfig, RunState, SerialOutput, Vm, VmConfig, VmExit};

use crate::backend::RunBackend;

use crate::size::{human, parse_size};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// ELF kernel with a PVH entry; default: the built-in test guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line (the built-in guest reads tern.wss, tern.rate, tern.pattern,
    /// tern.check, tern.hb, tern.exit).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest RAM: 512M, 1G, 4G... (a bare number is MiB). Default 1G; with --incoming, taken
    /// from the stream unless given (then it must match).
    #[arg(long)]
    pub memory: Option<String>,
    /// Number of vCPUs (1-32). Default 1; with --incoming, as for --memory.
    #[arg(long)]
    pub vcpus: Option<u32>,
    #[command(flatten)]
    pub consoles: Consoles,
    /// Wait for a migration instead of booting: tcp:HOST:PORT, unix:PATH, fd:N, exec:COMMAND,
    /// file:PATH, or defer (then QMP `migrate-incoming` names the URI).
    #[arg(long)]
    pub incoming: Option<String>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    pub kvm_device: PathBuf,
}

/// Where the guest's serial console and the control sockets go (`tern run`, `tern restore`).
#[derive(Args, Debug)]
pub struct Consoles {
    /// Serial console: stdio, file:PATH, unix:PATH or none.
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    /// QMP control socket: unix:PATH.
    #[arg(long)]
    pub qmp: Option<String>,
    /// Human monitor socket (QEMU's HMP commands, for `socat - unix:PATH`): unix:PATH.
    #[arg(long)]
    pub hmp: Option<String>,
}

fn parse_serial(s: &str) -> Result<SerialOutput> {
    Ok(match s.split_once(':') {
        None if s == "stdio" => SerialOutput::Stdio,
        None if s == "none" || s == "null" => SerialOutput::Null,
        Some(("file", p)) if !p.is_empty() => SerialOutput::File(p.into()),
        Some(("unix", p)) if !p.is_empty() => SerialOutput::Unix(p.into()),
        _ => bail!("--serial '{s}': expected stdio, file:PATH, unix:PATH or none"),
    })
}

pub(crate) fn parse_unix(what: &str, s: &str) -> Result<PathBuf> {
    match s.split_once(':') {
        Some(("unix", p)) if !p.is_empty() => Ok(p.into()),
        _ => bail!("{what} '{s}': expected unix:PATH"),
    }
}

fn check_memory(memory: u64) -> Result<()> {
    if memory == 0 {
        bail!("--memory must be more than 0");
    }
    if let Some(host) = host_memory() {
        if memory > host {
            bail!(
                "--memory {} is more than this host has ({})",
                human(memory),
                human(host)
            );
        }
    }
    Ok(())
}

fn check_vcpus(vcpus: u32) -> Result<()> {
    if vcpus == 0 || vcpus > tern_vmm::MAX_VCPUS {
        bail!(
            "--vcpus must be between 1 and {}, not {vcpus}",
            tern_vmm::MAX_VCPUS
        );
    }
    Ok(())
}

fn read_kernel(path: &PathBuf) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("cannot open the kernel {}", path.display()))?;
    let mut buf = Vec::new();
    f.take(tern_vmm::boot::KERNEL_MAX as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read the kernel {}", path.display()))?;
    if buf.len() > tern_vmm::boot::KERNEL_MAX {
        bail!(
            "the kernel {} is larger than {} MiB",
            path.display(),
            tern_vmm::boot::KERNEL_MAX >> 20
        );
    }
    Ok(buf)
}

/// What the process is doing, as QMP's `query-status` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for, or receiving, a migration.
    InMigrate,
    /// The guest is ours (running or paused).
    Live,
    /// Migrated away; paused until `quit`.
    PostMigrate,
}

/// The process's state, shared with the QMP backend and the migration threads.
pub(crate) struct App {
    pub(crate) vm: OnceLock<Arc<Vm>>,
    phase: Mutex<Phase>,
    server: OnceLock<Arc<Server>>,
    /// Parameters, capabilities and the migration: one owner, one lock to start one.
    pub(crate) mig: MigrationManager,
    pub(crate) incoming: Mutex<IncomingState>,
    incoming_cv: Condvar,
    machine: MachineSpec,
    /// After a migration into a file or a command, the guest may continue here (`cont`).
    pub(crate) resumable: AtomicBool,
}

/// The target's machine options, if given (the stream must match them).
struct MachineSpec {
    memory: Option<u64>,
    vcpus: Option<u32>,
    serial: SerialOutput,
    kvm_path: PathBuf,
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
    pub(crate) fn emit(&self, event: &str, data: Option<Value>) {
        if let Some(s) = self.server.get() {
            s.emit(event, data);
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

    fn set_incoming(&self, s: IncomingState) {
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
        let listener = listener.expect("bound when begin succeeds");
        let app = self.clone();
        std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || {
                let result = listener
                    .accept()
                    .and_then(|conn| run_incoming(conn, app.factory(), &ctl).map(|_| ()));
                app.mig.finish(&ctl, || match result {
                    Ok(()) => {
                        *app.phase() = Phase::Live;
                        app.emit("RESUME", None);
                        app.set_incoming(IncomingState::Done);
                    }
                    Err(e) => app.set_incoming(IncomingState::Failed(e.to_string())),
                });
            })
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Starts an outgoing migration to `uri` on a thread, if the guest is ours to migrate and
    /// no other migration runs (one decision, under the migration manager's lock).
    pub(crate) fn start_outgoing(self: &Arc<Self>, uri: Uri) -> Result<(), String> {
        let vm = self
            .vm
            .get()
            .cloned()
            .ok_or("The VM is not there yet: an incoming migration is pending")?;
        let mut fd = None;
        let ctl = self.mig.begin(
            || {
                if *self.phase() != Phase::Live {
                    return Err("Cannot migrate: the guest is not ours to migrate (incoming or already migrated)".into());
                }
                fd = self.resolve_fd(&uri)?;
                Ok(())
            },
            self.events(),
        )?;
        let app = self.clone();
        let was_running = vm.state() == RunState::Running;
        std::thread::Builder::new()
            .name("migration-out".into())
            .spawn(move || {
                let result = run_outgoing(vm.clone() as Arc<dyn SourceVm>, &uri, fd, &ctl);
                if let Some(path) = app.mig.timeline() {
                    let mut t = ctl.snapshot().timeline();
                    t["uri"] = json!(uri.to_string());
                    let text = serde_json::to_string_pretty(&t).unwrap_or_default();
                    if let Err(e) = std::fs::write(&path, text + "\n") {
                        tracing::warn!("cannot write the timeline {}: {e}", path.display());
                    }
                }
                app.mig.finish(&ctl, || match result {
                    Ok(()) => {
                        app.resumable
                            .store(matches!(uri, Uri::File(_) | Uri::Exec(_)), Ordering::SeqCst);
                        *app.phase() = Phase::PostMigrate;
                        if was_running {
                            app.emit("STOP", None);
                        }
                    }
                    Err(e) => tracing::warn!("migration to {uri} failed: {e}"),
                });
            })
            .map_err(|e| format!("cannot start the migration thread: {e}"))?;
        Ok(())
    }

    /// Builds the target VM from the stream's description, checked against our options and this
    /// host first (every mismatch named), before anything is allocated.
    fn factory(self: &Arc<Self>) -> tern_migrate::TargetFactory<'static> {
        let app = self.clone();
        Box::new(move |desc| {
            let m =
                MachineDescription::from_stream(&desc.machine).map_err(MigrateError::Mismatch)?;
            let host = HostInfo::probe(&app.machine.kvm_path).map_err(MigrateError::Vm)?;
            let wanted = Requested {
                memory: app.machine.memory,
                vcpus: app.machine.vcpus,
            };
            let mismatches = m.mismatches(&host, &wanted);
            if !mismatches.is_empty() {
                return Err(MigrateError::Mismatch(mismatches.join("; ")));
            }
            let vm = Vm::create(&MachineConfig {
                memory: m.memory,
                vcpus: m.vcpus,
                serial: app.machine.serial.clone(),
                kvm_path: app.machine.kvm_path.clone(),
            })
            .map_err(|e| MigrateError::Vm(format!("{e:#}")))?;
            let _ = app.vm.set(vm.clone());
            Ok(vm as Arc<dyn TargetVm>)
        })
    }

    /// Waits for an incoming migration to finish; returns the reason if it failed.
    fn wait_incoming(&self) -> Result<(), String> {
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

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let memory = args
        .memory
        .as_deref()
        .map(|m| parse_size(m).map_err(|e| anyhow::anyhow!("--memory {e}")))
        .transpose()?;
    if let Some(m) = memory {
        check_memory(m)?;
    }
    if let Some(v) = args.vcpus {
        check_vcpus(v)?;
    }
    let serial = parse_serial(&args.consoles.serial)?;
    let qmp_path = args
        .consoles
        .qmp
        .as_deref()
        .map(|s| parse_unix("--qmp", s))
        .transpose()?;
    let hmp_path = args
        .consoles
        .hmp
        .as_deref()
        .map(|s| parse_unix("--hmp", s))
        .transpose()?;
    if args.incoming.is_some() && args.kernel.is_some() {
        bail!("--incoming and --kernel exclude each other: the guest comes from the stream");
    }
    if let Some(inc) = args.incoming.as_deref() {
        if inc != "defer" {
            Uri::parse(inc).map_err(|e| anyhow::anyhow!("--incoming: {e}"))?;
        }
    }

    let app = Arc::new(App {
        vm: OnceLock::new(),
        phase: Mutex::new(if args.incoming.is_some() {
            Phase::InMigrate
        } else {
            Phase::Live
        }),
        server: OnceLock::new(),
        mig: MigrationManager::default(),
        incoming: Mutex::new(IncomingState::None),
        incoming_cv: Condvar::new(),
        machine: MachineSpec {
            memory,
            vcpus: args.vcpus,
            serial: serial.clone(),
            kvm_path: args.kvm_device.clone(),
        },
        resumable: AtomicBool::new(false),
    });

    if args.incoming.is_none() {
        let kernel = match &args.kernel {
            Some(p) => read_kernel(p)?,
            None => tern_guest::GUEST_ELF.to_vec(),
        };
        let vm = Vm::start(VmConfig {
            kernel,
            cmdline: args.cmdline.clone(),
            memory: memory.unwrap_or(1 << 30),
            vcpus: args.vcpus.unwrap_or(1),
            serial,
            kvm_path: args.kvm_device.clone(),
        })?;
        let _ = app.vm.set(vm);
    }

    // Listen for the migration before the control socket answers, so that a client that sees
    // the socket can migrate to us at once.
    match args.incoming.as_deref() {
        None => {}
        Some("defer") => app.set_incoming(IncomingState::Deferred),
        Some(uri) => {
            app.set_incoming(IncomingState::Deferred);
            app.start_incoming(uri).map_err(anyhow::Error::msg)?
        }
    }

    let backend = Arc::new(RunBackend::new(app.clone()));
    if let Some(path) = &qmp_path {
        let (srv, listener) =
            Server::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
        let _ = app.server.set(srv.clone());
        srv.serve(listener, backend.clone())
            .context("cannot start the QMP server")?;
    }
    if let Some(path) = &hmp_path {
        crate::hmp::serve(path, backend.clone())
            .with_context(|| format!("cannot listen on {}", path.display()))?;
    }

    let t0 = std::time::Instant::now();
    if let Err(why) = app.wait_incoming() {
        bail!("incoming migration failed: {why}");
    }
    if let Some(inc) = args.incoming.as_deref().filter(|i| i.starts_with("file:")) {
        eprintln!(
            "tern: restored {} in {} ms",
            &inc[5..],
            t0.elapsed().as_millis()
        );
    }

    let vm = app
        .vm
        .get()
        .cloned()
        .context("no VM after the incoming migration")?;
    match vm.wait_exit() {
        VmExit::Shutdown(reason) => {
            app.emit(
                "SHUTDOWN",
                Some(json!({"guest": reason != "host-qmp-quit", "reason": reason})),
            );
            tracing::info!(reason, "VM shut down");
            Ok(ExitCode::SUCCESS)
        }
        VmExit::Error(msg) => bail!("{msg}"),
    }
}
