//! `tern run`: boot a VM and serve its control socket until it stops.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Map, Value};
use tern_qmp::{no_args, Backend, QmpError, Server};
use tern_vmm::memory::vm_memory::{Bytes, GuestAddress};
use tern_vmm::{RunState, SerialOutput, Vm, VmConfig, VmExit};

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
    /// Guest RAM: 512M, 1G, 4G... (a bare number is MiB).
    #[arg(long, default_value = "1G")]
    pub memory: String,
    /// Number of vCPUs (1-32).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Serial console: stdio, file:PATH, unix:PATH or none.
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    /// QMP control socket: unix:PATH.
    #[arg(long)]
    pub qmp: Option<String>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    pub kvm_device: PathBuf,
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

fn parse_unix(what: &str, s: &str) -> Result<PathBuf> {
    match s.split_once(':') {
        Some(("unix", p)) if !p.is_empty() => Ok(p.into()),
        _ => bail!("{what} '{s}': expected unix:PATH"),
    }
}

/// Total RAM of the host, from /proc/meminfo.
fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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
    let memory = parse_size(&args.memory).map_err(|e| anyhow::anyhow!("--memory {e}"))?;
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
    if args.vcpus == 0 || args.vcpus > tern_vmm::MAX_VCPUS {
        bail!(
            "--vcpus must be between 1 and {}, not {}",
            tern_vmm::MAX_VCPUS,
            args.vcpus
        );
    }
    let serial = parse_serial(&args.serial)?;
    let qmp_path = args
        .qmp
        .as_deref()
        .map(|s| parse_unix("--qmp", s))
        .transpose()?;
    let kernel = match &args.kernel {
        Some(p) => read_kernel(p)?,
        None => tern_guest::GUEST_ELF.to_vec(),
    };

    let vm = Vm::start(VmConfig {
        kernel,
        cmdline: args.cmdline.clone(),
        memory,
        vcpus: args.vcpus,
        serial,
        kvm_path: args.kvm_device.clone(),
    })?;

    let mut server = None;
    if let Some(path) = &qmp_path {
        let (srv, listener) =
            Server::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
        let backend = Arc::new(RunBackend {
            vm: vm.clone(),
            server: OnceLock::new(),
        });
        let _ = backend.server.set(srv.clone());
        srv.serve(listener, backend)
            .context("cannot start the QMP server")?;
        server = Some(srv);
    }

    let exit = vm.wait_exit();
    match exit {
        VmExit::Shutdown(reason) => {
            if let Some(s) = &server {
                s.emit(
                    "SHUTDOWN",
                    Some(json!({"guest": reason != "host-qmp-quit", "reason": reason})),
                );
            }
            tracing::info!(reason, "VM shut down");
            Ok(ExitCode::SUCCESS)
        }
        VmExit::Error(msg) => bail!("{msg}"),
    }
}

/// QMP commands of a running VM.
struct RunBackend {
    vm: Arc<Vm>,
    server: OnceLock<Arc<Server>>,
}

impl RunBackend {
    fn emit(&self, event: &str) {
        if let Some(s) = self.server.get() {
            s.emit(event, None);
        }
    }
}

impl Backend for RunBackend {
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match command {
            "query-status" => {
                no_args(args)?;
                let running = self.vm.state() == RunState::Running;
                Ok(
                    json!({"running": running, "status": if running { "running" } else { "paused" }}),
                )
            }
            "stop" => {
                no_args(args)?;
                if self.vm.state() == RunState::Running {
                    self.vm.pause();
                    self.emit("STOP");
                }
                Ok(json!({}))
            }
            "cont" => {
                no_args(args)?;
                if self.vm.state() == RunState::Paused {
                    self.vm.resume();
                    self.emit("RESUME");
                }
                Ok(json!({}))
            }
            "quit" => {
                no_args(args)?;
                Ok(json!({}))
            }
            "query-version" => {
                no_args(args)?;
                Ok(json!({"qemu": {"micro": 0, "minor": 0, "major": 10},
                          "package": concat!("tern ", env!("CARGO_PKG_VERSION"))}))
            }
            "query-commands" => {
                no_args(args)?;
                Ok(json!([
                    "qmp_capabilities",
                    "query-status",
                    "stop",
                    "cont",
                    "quit",
                    "query-version",
                    "query-commands"
                ]
                .iter()
                .map(|n| json!({"name": n}))
                .collect::<Vec<_>>()))
            }
            // Test aid, named like QEMU's experimental commands: write a u64 into guest RAM.
            "x-tern-write-guest-memory" => {
                let get = |k: &str| {
                    args.get(k).and_then(Value::as_u64).ok_or_else(|| {
                        QmpError::generic(format!("Parameter '{k}' is missing or not a number"))
                    })
                };
                let (addr, value) = (get("addr")?, get("value")?);
                self.vm
                    .ram()
                    .memory()
                    .write_obj(value, GuestAddress(addr))
                    .map_err(|e| QmpError::generic(format!("cannot write at {addr:#x}: {e}")))?;
                Ok(json!({}))
            }
            other => Err(QmpError::not_found(other)),
        }
    }

    fn quit(&self) {
        self.vm.request_exit(VmExit::Shutdown("host-qmp-quit"));
    }
}
