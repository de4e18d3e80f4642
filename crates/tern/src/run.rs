//! `tern run`: boot a VM (or receive one), serve its control socket until it stops.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use tern_migrate::transport::Uri;
use tern_qmp::Server;
use tern_vmm::machine::host_memory;
use tern_vmm::{SerialOutput, Vm, VmConfig, VmExit};

use crate::backend::RunBackend;
use crate::machine::{App, IncomingState, MachineSpec, Phase};
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

    let app = App::new(
        if args.incoming.is_some() {
            Phase::InMigrate
        } else {
            Phase::Live
        },
        MachineSpec {
            memory,
            vcpus: args.vcpus,
            serial: serial.clone(),
            kvm_path: args.kvm_device.clone(),
        },
    );

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
