//! The QMP commands of `tern run`: arguments checked at the edge, then handed to the VM or to
//! the migration manager.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};

use tern_migrate::transport::Uri;
use tern_qmp::{Backend, Command, QmpError, COMMAND_NAMES};
use tern_vmm::{RunState, Vm};

use crate::machine::{App, Phase};

/// QMP commands.
pub(crate) struct RunBackend {
    app: Arc<App>,
}

impl RunBackend {
    pub(crate) fn new(app: Arc<App>) -> Self {
        RunBackend { app }
    }
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

    fn migrate(&self, uri: &str, resume: bool, blk: Option<bool>) -> Result<Value, QmpError> {
        if resume {
            let uri = Uri::parse(uri).map_err(|e| QmpError::generic(e.to_string()))?;
            let ctl = self.paused_migration()?;
            if self.phase() == Phase::InMigrate {
                return Err(QmpError::generic(
                    "This is the target: use migrate-recover here, and migrate with resume on the source",
                ));
            }
            ctl.recover(uri).map_err(QmpError::generic)?;
            return Ok(json!({}));
        }
        let uri = Uri::parse(uri).map_err(|e| QmpError::generic(e.to_string()))?;
        // Disks that are neither shared nor read-only are copied by default, except into a
        // file (a saved VM's disks stay as the guest left them); `blk` says so either way.
        let copy = blk.unwrap_or(!matches!(uri, Uri::File(_)));
        self.app
            .start_outgoing(uri, copy)
            .map_err(QmpError::generic)?;
        Ok(json!({}))
    }

    /// The migration in progress, for postcopy recovery's commands.
    fn paused_migration(&self) -> Result<Arc<tern_migrate::MigrationControl>, QmpError> {
        self.app
            .mig
            .active()
            .ok_or_else(|| QmpError::generic("No migration is in progress"))
    }

    /// `calc-dirty-rate`: tern measures with the dirty log (QEMU's `dirty-bitmap` mode, the
    /// default here since tern has no other), while no migration runs.
    fn calc_dirty_rate(
        &self,
        calc_time: i64,
        unit: Option<&str>,
        sample_pages: Option<u64>,
        mode: Option<String>,
    ) -> Result<Value, QmpError> {
        match mode.as_deref() {
            None | Some("dirty-bitmap") => {}
            Some(other) => {
                return Err(QmpError::generic(format!(
                    "mode '{other}' is not supported by tern: it measures in mode dirty-bitmap"
                )))
            }
        }
        if sample_pages.is_some() {
            return Err(QmpError::generic(
                "sample-pages is for mode page-sampling: tern measures in mode dirty-bitmap",
            ));
        }
        tern_migrate::dirtyrate::DirtyRate::window(calc_time, unit).map_err(QmpError::generic)?;
        let vm = self.vm()?;
        if self.phase() != Phase::Live {
            return Err(QmpError::generic(
                "The guest is not running here: nothing to measure",
            ));
        }
        self.app.mig.begin_measure().map_err(QmpError::generic)?;
        let app = self.app.clone();
        self.app
            .dirty_rate
            .start(vm, calc_time, unit, move || app.mig.end_measure())
            .map_err(|e| {
                self.app.mig.end_measure();
                QmpError::generic(e)
            })?;
        Ok(json!({}))
    }

    fn query_status(&self) -> Value {
        let status = match self.phase() {
            Phase::InMigrate => "inmigrate",
            Phase::PostMigrate => "postmigrate",
            Phase::InDoubt => "paused",
            Phase::Live => match self.app.vm.get().map(|v| v.state()) {
                Some(RunState::Running) => "running",
                _ => "paused",
            },
        };
        json!({"running": status == "running", "status": status})
    }

    /// Decided under the migration manager's lock, so that no migration can start or end (and
    /// hand the guest to a target) between the checks and the resume.
    fn cont(&self) -> Result<Value, QmpError> {
        let vm = self.vm()?;
        if vm.ram().released() {
            return Err(QmpError::generic(
                "The guest's memory was handed to the target at the commit (cpr-transfer): the guest cannot run here any more",
            ));
        }
        let resumed = self
            .app
            .mig
            .when_idle(|| {
                let mut phase = self.app.phase();
                match *phase {
                    // Saved into a file or a command: this copy may go on (a snapshot).
                    Phase::PostMigrate if self.app.resumable.load(Ordering::SeqCst) => {
                        *phase = Phase::Live;
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
                    Phase::InDoubt => {
                        tracing::warn!(
                            "cont after a switch-over in doubt: the operator takes the guest back"
                        );
                        *phase = Phase::Live;
                    }
                    Phase::Live => {}
                }
                let paused = vm.state() == RunState::Paused;
                if paused {
                    vm.resume();
                }
                Ok(paused)
            })
            .ok_or_else(|| {
                QmpError::generic("Guest can not be resumed while a migration is in progress")
            })??;
        if resumed {
            self.app.emit("RESUME", None);
        }
        Ok(json!({}))
    }
}

impl Backend for RunBackend {
    fn execute(&self, command: Command) -> Result<Value, QmpError> {
        let generic = |e: String| QmpError::generic(e);
        match command {
            Command::QueryStatus {} => Ok(self.query_status()),
            Command::Stop {} => {
                let vm = self.vm()?;
                if self.phase() == Phase::Live && vm.state() == RunState::Running {
                    vm.pause();
                    self.app.emit("STOP", None);
                }
                Ok(json!({}))
            }
            Command::Cont {} => self.cont(),
            Command::Quit {} => Ok(json!({})),
            Command::Migrate {
                uri,
                resume,
                blk,
                inc,
                ..
            } => {
                if inc == Some(true) {
                    return Err(generic(
                        "Incremental block migration (inc) is not supported: tern copies the whole disk, then what the guest rewrites".into(),
                    ));
                }
                self.migrate(&uri, resume == Some(true), blk)
            }
            Command::Pmemsave {
                val,
                size,
                filename,
            } => {
                let vm = self.vm()?;
                crate::machine::pmemsave(&vm, val, size, std::path::Path::new(&filename))
                    .map_err(generic)?;
                Ok(json!({}))
            }
            Command::AnnounceSelf {
                initial,
                max,
                rounds,
                step,
                interfaces,
                id: _,
            } => {
                let vm = self.vm()?;
                if self.phase() == Phase::PostMigrate {
                    return Err(generic(
                        "The guest runs elsewhere now (migrated): announcing it here would pull its traffic back"
                            .to_string(),
                    ));
                }
                let p = self.app.mig.params();
                let check = |v: Option<u64>, dflt: u64, name: &str, lo: u64, hi: u64| {
                    let v = v.unwrap_or(dflt);
                    if (lo..=hi).contains(&v) {
                        Ok(v)
                    } else {
                        Err(generic(format!(
                            "Parameter '{name}' expects an integer in the range of {lo} to {hi}"
                        )))
                    }
                };
                let params = tern_vmm::AnnounceParams {
                    initial: check(initial, p.announce_initial_ms, "initial", 0, 100_000)?,
                    max: check(max, p.announce_max_ms, "max", 0, 100_000)?,
                    rounds: check(rounds, p.announce_rounds, "rounds", 0, 1000)?,
                    step: check(step, p.announce_step_ms, "step", 1, 10_000)?,
                };
                let names = vm.nic_names();
                let which = match interfaces {
                    None => None,
                    Some(list) => Some(
                        list.iter()
                            .map(|n| {
                                names.iter().position(|m| m == n).ok_or_else(|| {
                                    generic(format!(
                                        "no network interface '{n}' (this VM has: {})",
                                        names.join(", ")
                                    ))
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()?,
                    ),
                };
                vm.announce(params, which);
                Ok(json!({}))
            }
            Command::ObjectAdd(args) => {
                let creds = crate::objects::tls_creds(&args).map_err(generic)?;
                self.app.mig.add_tls_creds(creds).map_err(generic)?;
                Ok(json!({}))
            }
            Command::ObjectDel { id } => {
                self.app.mig.del_object(&id).map_err(generic)?;
                Ok(json!({}))
            }
            Command::XTernQueryNics {} => {
                let vm = self.vm()?;
                Ok(serde_json::to_value(vm.nics()).unwrap_or_default())
            }
            Command::MigrateCancel {} => {
                self.app.mig.cancel().map_err(|e| generic(e.to_string()))?;
                Ok(json!({}))
            }
            Command::MigrateStartPostcopy {} => {
                let ctl = self.app.mig.active().ok_or_else(|| {
                    generic("migrate-start-postcopy: no outgoing migration is running".to_string())
                })?;
                ctl.start_postcopy().map_err(generic)?;
                Ok(json!({}))
            }
            Command::MigratePause {} => {
                let ctl = self.paused_migration()?;
                ctl.pause().map_err(generic)?;
                Ok(json!({}))
            }
            Command::MigrateRecover { uri } => {
                let uri = Uri::parse(&uri).map_err(|e| generic(e.to_string()))?;
                if self.phase() != Phase::InMigrate {
                    return Err(generic(
                        "migrate-recover is for the target: on the source, migrate with resume"
                            .to_string(),
                    ));
                }
                self.paused_migration()?.recover(uri).map_err(generic)?;
                Ok(json!({}))
            }
            Command::MigrateIncoming { uri } => {
                self.app.start_incoming(&uri).map_err(generic)?;
                Ok(json!({}))
            }
            Command::QueryMigrate {} => Ok(self
                .app
                .mig
                .current()
                .map(|c| c.snapshot().to_qmp())
                .unwrap_or_else(|| json!({}))),
            Command::QueryMigrateParameters {} => Ok(self.app.mig.params_qmp()),
            Command::CalcDirtyRate {
                calc_time,
                calc_time_unit,
                sample_pages,
                mode,
            } => self.calc_dirty_rate(calc_time, calc_time_unit.as_deref(), sample_pages, mode),
            Command::QueryDirtyRate { calc_time_unit } => {
                Ok(self.app.dirty_rate.to_qmp(calc_time_unit.as_deref()))
            }
            Command::MigrateSetParameters(args) => {
                self.app.mig.set_parameters(&args).map_err(generic)?;
                Ok(json!({}))
            }
            Command::QueryMigrateCapabilities {} => Ok(json!(self
                .app
                .mig
                .caps()
                .list()
                .into_iter()
                .map(|(c, s)| json!({"capability": c, "state": s}))
                .collect::<Vec<_>>())),
            Command::MigrateSetCapabilities { capabilities } => {
                let pairs: Vec<(&str, bool)> = capabilities
                    .iter()
                    .map(|c| (c.capability.as_str(), c.state))
                    .collect();
                self.app.mig.set_capabilities(&pairs).map_err(generic)?;
                Ok(json!({}))
            }
            Command::QueryVersion {} => Ok(json!({"qemu": {"micro": 0, "minor": 0, "major": 10},
                      "package": concat!("tern ", env!("CARGO_PKG_VERSION"))})),
            Command::QueryCommands {} => Ok(json!(COMMAND_NAMES
                .iter()
                .map(|n| json!({"name": n}))
                .collect::<Vec<_>>())),
            // Test aid, named like QEMU's experimental commands: write a u64 into guest RAM.
            Command::XTernWriteGuestMemory { addr, value } => {
                self.vm()?.write_guest_u64(addr, value).map_err(generic)?;
                Ok(json!({}))
            }
            Command::HumanMonitorCommand { command_line, .. } => {
                let (out, quit) = crate::hmp::execute(self, &command_line);
                if quit {
                    self.quit();
                }
                Ok(json!(out))
            }
        }
    }

    fn quit(&self) {
        self.app.shutdown("host-qmp-quit");
    }
}
