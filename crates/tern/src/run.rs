//! `tern run`: boot a VM (or receive one), serve its control socket until it stops.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

use tern_migrate::transport::Uri;
use tern_qmp::Server;
use tern_vmm::machine::host_memory;
use tern_vmm::MemoryBackend;
use tern_vmm::{SerialOutput, Vm, VmConfig, VmExit};

use crate::backend::RunBackend;
use crate::machine::{App, IncomingState, MachineSpec, Phase};
use crate::size::{human, parse_size};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// ELF kernel with a PVH entry; default: the built-in test guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// An initial RAM disk for the kernel (Linux's initrd; a PVH module for an ELF kernel).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
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
    /// What backs guest RAM: anon (private memory with transparent huge pages, QEMU's
    /// memory-backend-ram: the cheapest to fill, the default), memfd (shareable with another
    /// process) or memfd-hugetlb (2 MiB pages from the host's reserved pool).
    #[arg(long, default_value = "anon")]
    pub memory_backend: MemoryBackend,
    /// Track the guest's writes for migration with a dirty ring of this many entries per vCPU
    /// (QEMU's dirty-ring-size: a power of two, 1024 up to what KVM offers; this host: 65536)
    /// instead of the dirty bitmap: collecting then costs what the guest wrote, not the size of
    /// its RAM (see README, "Dirty tracking"). 0, the default: the bitmap.
    #[arg(long, default_value_t = 0)]
    pub dirty_ring_size: u32,
    /// A virtio-blk disk on a raw file: path=FILE[,readonly=on][,direct=on][,shared=on]
    /// [,serial=ID] (repeat for more; a target gives the same disks, its own files of the same
    /// size, or with shared=on the very same storage).
    #[arg(long = "disk", value_name = "path=FILE,...")]
    pub disks: Vec<String>,
    /// A virtio-net device on an existing TAP: tap=NAME[,mac=52:54:00:12:34:56], or fd=N for
    /// an attached TAP's inherited descriptor (repeat for more; a target gives the same MACs,
    /// each on its own TAP).
    #[arg(long = "net", value_name = "tap=NAME,...")]
    pub nets: Vec<String>,
    /// An object, as QEMU's -object: tls-creds-x509,id=ID,dir=DIR,endpoint=server|client
    /// [,verify-peer=on|off] (then migrate-set-parameters tls-creds=ID; repeatable).
    #[arg(long = "object", value_name = "TYPE,id=ID,...")]
    pub objects: Vec<String>,
    #[command(flatten)]
    pub consoles: Consoles,
    /// Do not start the guest (QEMU's -S): it waits, paused, for QMP `cont`; with --incoming,
    /// the migrated guest is loaded and paused instead of run.
    #[arg(short = 'S')]
    pub paused: bool,
    /// Wait for a migration instead of booting: tcp:HOST:PORT, unix:PATH, fd:N, exec:COMMAND,
    /// file:PATH, or defer (then QMP `migrate-incoming` names the URI).
    #[arg(long)]
    pub incoming: Option<String>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    pub kvm_device: PathBuf,
    /// `tern restore --on-demand`: a mapped-layout file's pages are read as the guest touches
    /// them.
    #[arg(skip)]
    pub on_demand: bool,
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
    /// Mode of the QMP and HMP sockets, in octal. They can run shell commands (exec:
    /// migrations), write files and guest RAM: only their owner may connect unless widened
    /// here (e.g. 0660 for a group).
    #[arg(long, default_value = "0600", value_parser = parse_mode)]
    pub monitor_mode: u32,
}

fn parse_mode(s: &str) -> std::result::Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("'{s}' is not a file mode in octal (0600, 0660...)"))
}

/// Removes the monitor sockets when `tern run` ends, however it ends.
pub(crate) struct SocketFiles(pub(crate) Vec<PathBuf>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Whatever way `tern run` ends, the monitor's clients are first sent what is queued for them
/// (the reply to the command that ended it, SHUTDOWN): replies go out on their own threads.
struct FlushMonitor(Arc<App>);

impl Drop for FlushMonitor {
    fn drop(&mut self) {
        if let Some(s) = self.0.server.get() {
            s.flush(std::time::Duration::from_secs(1));
        }
    }
}

/// The `--disk` options, parsed, each opened once to name a bad one now (missing, read-only,
/// a size that is not whole sectors) rather than when a migration arrives.
pub(crate) fn parse_disks(specs: &[String]) -> Result<Vec<tern_vmm::DiskConfig>> {
    // All open at once, so that one file given twice is refused too (its lock).
    let mut open = Vec::new();
    let mut cfgs = Vec::new();
    for s in specs {
        let cfg = tern_vmm::DiskConfig::parse(s).map_err(|e| anyhow::anyhow!("--disk {s}: {e}"))?;
        open.push(tern_vmm::Disk::open(&cfg)?);
        cfgs.push(cfg);
    }
    Ok(cfgs)
}

/// The `--net` options, parsed, each TAP checked now (it exists, is a TAP, is free) rather than
/// when a migration arrives.
pub(crate) fn parse_nets(specs: &[String], first_slot: usize) -> Result<Vec<tern_vmm::NetConfig>> {
    if specs.len() + first_slot > 8 {
        bail!(
            "at most 8 virtio devices (disks and networks), not {}",
            specs.len() + first_slot
        );
    }
    let mut cfgs: Vec<tern_vmm::NetConfig> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let cfg =
            tern_vmm::NetConfig::parse(s, i).map_err(|e| anyhow::anyhow!("--net {s}: {e}"))?;
        if cfgs.iter().any(|c| c.tap == cfg.tap) {
            bail!("--net {s}: the same TAP is given twice");
        }
        if cfgs.iter().any(|c| c.mac == cfg.mac) {
            bail!("--net {s}: two NICs with one MAC address");
        }
        tern_vmm::tap::Tap::check(&cfg).map_err(|e| anyhow::anyhow!("--net {s}: {e}"))?;
        cfgs.push(cfg);
    }
    Ok(cfgs)
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
    read_file("kernel", path, tern_vmm::boot::KERNEL_MAX)
}

/// A whole file of at most `max` bytes.
fn read_file(what: &str, path: &PathBuf, max: usize) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("cannot open the {what} {}", path.display()))?;
    let mut buf = Vec::new();
    f.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    if buf.len() > max {
        bail!(
            "the {what} {} is larger than {} MiB",
            path.display(),
            max >> 20
        );
    }
    Ok(buf)
}

/// SIGTERM and SIGINT end `tern run` as `quit` does. They are blocked here, before any thread is
/// spawned (threads inherit the mask; child processes get a clean one from std), and taken by one
/// thread with sigwait(2), so no handler runs in a vCPU or at an awkward moment.
fn block_termination_signals() -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set we own, sigaddset adds to it, and pthread_sigmask
    // changes only this thread's mask (which the threads spawned later inherit).
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut());
        set.assume_init()
    }
}

/// Waits for SIGTERM or SIGINT on its own thread, then shuts the VM down.
fn on_termination_signal(set: libc::sigset_t, app: Arc<App>) {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: sigwait reads the set we own and writes the signal's number into `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                tracing::info!(sig, "signal: shutting down");
                app.shutdown("host-signal");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no signal thread ({e}): SIGTERM and SIGINT are ignored");
    }
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let signals = block_termination_signals();
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
    if args.incoming.is_some() && args.initrd.is_some() {
        bail!("--incoming and --initrd exclude each other: the guest comes from the stream");
    }
    if args.incoming.is_some() && args.kernel.is_some() {
        bail!("--incoming and --kernel exclude each other: the guest comes from the stream");
    }
    let disks = parse_disks(&args.disks)?;
    let nets = parse_nets(&args.nets, disks.len())?;
    if args.incoming.as_deref() != Some("defer") {
        if let Some(n) = nets.iter().find_map(|n| match &n.tap {
            tern_vmm::tap::TapSource::FdName(name) => Some(name),
            _ => None,
        }) {
            bail!(
                "--net fd={n}: a descriptor passed by name (QMP getfd) is for a target started \
                 with --incoming defer, whose VM is built when the migration arrives; here give \
                 tap=NAME or an inherited fd=N"
            );
        }
    }
    if let Some(inc) = args.incoming.as_deref() {
        if inc != "defer" {
            Uri::parse(inc).map_err(|e| anyhow::anyhow!("--incoming: {e}"))?;
        }
    }

    let app = App::new(
        if args.incoming.is_some() {
            Phase::InMigrate
        } else {
            Phase::Live
        },
        MachineSpec {
            memory,
            memory_backend: args.memory_backend,
            dirty_ring_size: args.dirty_ring_size,
            vcpus: args.vcpus,
            serial: serial.clone(),
            kvm_path: args.kvm_device.clone(),
            on_demand: args.on_demand,
            disks: disks.clone(),
            nets: nets.clone(),
            autostart: !args.paused,
        },
    );
    for spec in &args.objects {
        let creds = crate::objects::parse_cli(spec)
            .and_then(|m| crate::objects::tls_creds(&m))
            .map_err(|e| anyhow::anyhow!("--object {spec}: {e}"))?;
        app.mig
            .add_tls_creds(creds)
            .map_err(|e| anyhow::anyhow!("--object {spec}: {e}"))?;
    }

    // The monitor sockets first: a path another tern serves is refused before anything starts.
    // (Clients that connect now get their greeting once the sockets are served, below.)
    let mode = args.consoles.monitor_mode;
    let bind = |p: &PathBuf| {
        tern_qmp::listen::bind_private(p, mode)
            .with_context(|| format!("cannot listen on {}", p.display()))
    };
    let qmp_listener = qmp_path.as_ref().map(bind).transpose()?;
    let mut sockets = SocketFiles(qmp_path.iter().cloned().collect());
    let hmp_listener = hmp_path.as_ref().map(bind).transpose()?;
    sockets.0.extend(hmp_path.iter().cloned());
    *app.sockets.lock().unwrap_or_else(|e| e.into_inner()) = sockets.0.clone();
    let _flush = FlushMonitor(app.clone());

    if args.incoming.is_none() {
        let kernel = match &args.kernel {
            Some(p) => read_kernel(p)?,
            None => tern_guest::GUEST_ELF.to_vec(),
        };
        let initrd = args
            .initrd
            .as_ref()
            .map(|p| read_file("initrd", p, tern_vmm::boot_linux::INITRD_MAX))
            .transpose()?;
        let cfg = VmConfig {
            kernel,
            initrd,
            cmdline: args.cmdline.clone(),
            memory: memory.unwrap_or(1 << 30),
            memory_backend: args.memory_backend,
            dirty_ring_size: args.dirty_ring_size,
            vcpus: args.vcpus.unwrap_or(1),
            serial,
            kvm_path: args.kvm_device.clone(),
            disks,
            nets,
        };
        let vm = match args.paused {
            false => Vm::start(cfg)?,
            true => Vm::boot_paused(cfg)?,
        };
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

    on_termination_signal(signals, app.clone());
    let backend = Arc::new(RunBackend::new(app.clone()));
    if let (Some(path), Some(listener)) = (&qmp_path, qmp_listener) {
        let srv = Server::new(path);
        let _ = app.server.set(srv.clone());
        srv.serve(listener, backend.clone())
            .context("cannot start the QMP server")?;
    }
    if let (Some(path), Some(listener)) = (&hmp_path, hmp_listener) {
        crate::hmp::serve(listener, path, backend.clone())
            .with_context(|| format!("cannot serve {}", path.display()))?;
    }

    let t0 = std::time::Instant::now();
    if let Err(why) = app.wait_incoming() {
        if app.quitting.load(std::sync::atomic::Ordering::SeqCst) {
            app.emit_shutdown(false, app.quit_reason());
            return Ok(ExitCode::SUCCESS);
        }
        bail!("incoming migration failed: {why}");
    }
    if let Some(inc) = args.incoming.as_deref().filter(|i| i.starts_with("file:")) {
        let on_demand = app
            .mig
            .current()
            .and_then(|c| c.snapshot().restore)
            .filter(|r| r.on_demand);
        match on_demand {
            Some(r) => eprintln!(
                "tern: restored {} on demand: the guest ran after {:.0} ms, every page was in \
                 after {} ms ({} pages faulted in first)",
                &inc[5..],
                r.running_ms,
                t0.elapsed().as_millis(),
                r.faults
            ),
            None => eprintln!(
                "tern: restored {} in {} ms",
                &inc[5..],
                t0.elapsed().as_millis()
            ),
        }
    }

    let vm = app
        .vm
        .get()
        .cloned()
        .context("no VM after the incoming migration")?;
    match vm.wait_exit() {
        VmExit::Shutdown(reason) => {
            app.emit_shutdown(!reason.starts_with("host-"), reason);
            tracing::info!(reason, "VM shut down");
            drop(sockets);
            Ok(ExitCode::SUCCESS)
        }
        VmExit::Error(msg) => bail!("{msg}"),
    }
}
