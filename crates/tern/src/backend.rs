//! The QMP commands of `tern run`: arguments checked at the edge, then handed to the VM or to
//! the migration manager.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use tern_migrate::transport::Uri;
use tern_qmp::{no_args, Backend, QmpError};
use tern_vmm::memory::vm_memory::{Bytes, GuestAddress};
use tern_vmm::{RunState, Vm, VmExit};

use crate::run::{App, Phase};

/// QMP commands.
pub(crate) struct RunBackend {
    app: Arc<App>,
}

impl RunBackend {
    pub(crate) fn new(app: Arc<App>) -> Self {
        RunBackend { app }
    }
}

fn u64_arg(args: &Map<String, Value>, k: &str) -> Result<Option<u64>, QmpError> {
    match args.get(k) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            QmpError::generic(format!("Parameter '{k}' expects a non-negative integer"))
        }),
    }
}

fn str_arg<'a>(args: &'a Map<String, Value>, k: &str) -> Result<&'a str, QmpError> {
    args.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| QmpError::generic(format!("Parameter '{k}' is missing")))
}

impl RunBackend {
    fn vm(&self) -> Result<Arc<Vm>, QmpError> {
        self.app.vm.get().cloned().ok_or_else(|| {
            QmpError::generic("The VM is not there yet: an incoming migration is pending")
        })
    }

    fn phase(&self) -> Phase {
        *self.app.phase()
    }

    fn migrate(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        for k in args.keys() {
            if !matches!(k.as_str(), "uri" | "detach" | "resume" | "blk" | "inc") {
                return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
            }
        }
        if args.get("resume").and_then(Value::as_bool) == Some(true) {
            return Err(QmpError::generic(
                "Postcopy recovery is not supported by tern yet",
            ));
        }
        let uri =
            Uri::parse(str_arg(args, "uri")?).map_err(|e| QmpError::generic(e.to_string()))?;
        self.app.start_outgoing(uri).map_err(QmpError::generic)?;
        Ok(json!({}))
    }

    fn set_capabilities(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let list = args
            .get("capabilities")
            .and_then(Value::as_array)
            .ok_or_else(|| QmpError::generic("Parameter 'capabilities' is missing"))?;
        let mut pairs = Vec::with_capacity(list.len());
        for item in list {
            let name = item
                .get("capability")
                .and_then(Value::as_str)
                .ok_or_else(|| QmpError::generic("Parameter 'capability' is missing"))?;
            let state = item
                .get("state")
                .and_then(Value::as_bool)
                .ok_or_else(|| QmpError::generic("Parameter 'state' is missing"))?;
            pairs.push((name, state));
        }
        self.app
            .mig
            .set_capabilities(&pairs)
            .map_err(QmpError::generic)?;
        Ok(json!({}))
    }
}

impl Backend for RunBackend {
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match command {
            "query-status" => {
                no_args(args)?;
                let status = match self.phase() {
                    Phase::InMigrate => "inmigrate",
                    Phase::PostMigrate => "postmigrate",
                    Phase::Live => match self.app.vm.get().map(|v| v.state()) {
                        Some(RunState::Running) => "running",
                        _ => "paused",
                    },
                };
                Ok(json!({"running": status == "running", "status": status}))
            }
            "stop" => {
                no_args(args)?;
                let vm = self.vm()?;
                if self.phase() == Phase::Live && vm.state() == RunState::Running {
                    vm.pause();
                    self.app.emit("STOP", None);
                }
                Ok(json!({}))
            }
            "cont" => {
                no_args(args)?;
                let vm = self.vm()?;
                match self.phase() {
                    // Saved into a file or a command: this copy may go on (a snapshot).
                    Phase::PostMigrate if self.app.resumable.load(Ordering::SeqCst) => {
                        *self.app.phase() = Phase::Live;
                    }
                    Phase::PostMigrate => {
                        return Err(QmpError::generic(
                            "The guest was migrated away; it runs on the target now",
                        ))
                    }
                    Phase::InMigrate => {
                        return Err(QmpError::generic(
                            "Guest can not be started: an incoming migration is pending",
                        ))
                    }
                    Phase::Live => {}
                }
                if self.app.mig.active().is_none() && vm.state() == RunState::Paused {
                    vm.resume();
                    self.app.emit("RESUME", None);
                }
                Ok(json!({}))
            }
            "quit" => {
                no_args(args)?;
                Ok(json!({}))
            }
            "migrate" => self.migrate(args),
            "migrate_cancel" => {
                no_args(args)?;
                self.app
                    .mig
                    .cancel()
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                Ok(json!({}))
            }
            "migrate-incoming" => {
                let uri = str_arg(args, "uri")?;
                self.app.start_incoming(uri).map_err(QmpError::generic)?;
                Ok(json!({}))
            }
            "query-migrate" => {
                no_args(args)?;
                Ok(self
                    .app
                    .mig
                    .current()
                    .map(|c| c.snapshot().to_qmp())
                    .unwrap_or_else(|| json!({})))
            }
            "query-migrate-parameters" => {
                no_args(args)?;
                Ok(self.app.mig.params_qmp())
            }
            "migrate-set-parameters" => {
                self.app
                    .mig
                    .set_parameters(args)
                    .map_err(QmpError::generic)?;
                Ok(json!({}))
            }
            "query-migrate-capabilities" => {
                no_args(args)?;
                Ok(json!(self
                    .app
                    .mig
                    .caps()
                    .list()
                    .into_iter()
                    .map(|(c, s)| json!({"capability": c, "state": s}))
                    .collect::<Vec<_>>()))
            }
            "migrate-set-capabilities" => self.set_capabilities(args),
            "query-version" => {
                no_args(args)?;
                Ok(json!({"qemu": {"micro": 0, "minor": 0, "major": 10},
                          "package": concat!("tern ", env!("CARGO_PKG_VERSION"))}))
            }
            "query-commands" => {
                no_args(args)?;
                Ok(json!(COMMANDS
                    .iter()
                    .map(|n| json!({"name": n}))
                    .collect::<Vec<_>>()))
            }
            // Test aid, named like QEMU's experimental commands: write a u64 into guest RAM.
            "x-tern-write-guest-memory" => {
                let (addr, value) = (
                    u64_arg(args, "addr")?
                        .ok_or_else(|| QmpError::generic("Parameter 'addr' is missing"))?,
                    u64_arg(args, "value")?
                        .ok_or_else(|| QmpError::generic("Parameter 'value' is missing"))?,
                );
                self.vm()?
                    .ram()
                    .memory()
                    .write_obj(value, GuestAddress(addr))
                    .map_err(|e| QmpError::generic(format!("cannot write at {addr:#x}: {e}")))?;
                Ok(json!({}))
            }
            "human-monitor-command" => {
                let line = str_arg(args, "command-line")?;
                for k in args.keys() {
                    if !matches!(k.as_str(), "command-line" | "cpu-index") {
                        return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
                    }
                }
                let (out, quit) = crate::hmp::execute(self, line);
                if quit {
                    self.quit();
                }
                Ok(json!(out))
            }
            other => Err(QmpError::not_found(other)),
        }
    }

    fn quit(&self) {
        match self.app.vm.get() {
            Some(vm) => vm.request_exit(VmExit::Shutdown("host-qmp-quit")),
            None => {
                self.app.emit(
                    "SHUTDOWN",
                    Some(json!({"guest": false, "reason": "host-qmp-quit"})),
                );
                std::process::exit(0);
            }
        }
    }
}

const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "stop",
    "cont",
    "quit",
    "migrate",
    "migrate_cancel",
    "migrate-incoming",
    "query-migrate",
    "query-migrate-parameters",
    "migrate-set-parameters",
    "query-migrate-capabilities",
    "migrate-set-capabilities",
    "query-version",
    "query-commands",
    "human-monitor-command",
    "getfd",
    "closefd",
];
