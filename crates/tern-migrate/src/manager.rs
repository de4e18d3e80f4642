//! The one owner of a VM's migration settings and of "the" migration: parameters, capabilities,
//! the timeline path, and the migration in progress. Starting a migration is one decision under
//! one lock, so two `migrate` commands racing on two monitor connections start exactly one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value};

use crate::control::{CancelRefused, MigrationControl, MigrationEvent};
use crate::transport::tls::{TlsCreds, TlsSettings};
use crate::{Capabilities, MigrationParams};

/// QEMU's words for "another migration runs".
pub const IN_PROGRESS: &str = "There's a migration process in progress";
/// A dirty rate measurement holds the dirty log.
pub const MEASURING: &str =
    "A dirty rate measurement is running (calc-dirty-rate): migrate once query-dirty-rate says measured";

struct Inner {
    params: MigrationParams,
    caps: Capabilities,
    timeline: Option<PathBuf>,
    /// The latest migration, and whether its thread has finished with it.
    current: Option<(Arc<MigrationControl>, bool)>,
    /// A `calc-dirty-rate` runs (it owns the dirty log: no migration may start meanwhile).
    measuring: bool,
    /// `tls-creds-x509` objects by id (`object-add`, `--object`).
    objects: HashMap<String, Arc<TlsCreds>>,
    /// `tls-creds`, `tls-hostname`, `tls-authz` ("" for none).
    tls: [String; 3],
}

/// The TLS migration parameters, in [`Inner::tls`]'s order.
const TLS_PARAMS: [&str; 3] = ["tls-creds", "tls-hostname", "tls-authz"];

impl Inner {
    /// The TLS a new migration takes (none without `tls-creds`), built from `tls`.
    fn tls_settings_of(&self, tls: &[String; 3]) -> Result<Option<Arc<TlsSettings>>, String> {
        if tls[0].is_empty() {
            return Ok(None);
        }
        let creds = self.objects.get(&tls[0]).cloned().ok_or_else(|| {
            format!(
                "No TLS credentials with id '{}' (object-add a tls-creds-x509 first)",
                tls[0]
            )
        })?;
        let name = |s: &String| (!s.is_empty()).then(|| s.clone());
        TlsSettings::new(creds, name(&tls[1]), name(&tls[2])).map(|s| Some(Arc::new(s)))
    }

    fn tls_settings(&self) -> Result<Option<Arc<TlsSettings>>, String> {
        self.tls_settings_of(&self.tls)
    }

    /// The migration in progress: its thread has not finished and its status is not final (a
    /// final status is published only after the VMM's run state changed: see
    /// [`MigrationControl::before_final`]).
    fn active(&self) -> Option<&Arc<MigrationControl>> {
        match &self.current {
            Some((c, false)) if !c.snapshot().status.is_final() => Some(c),
            _ => None,
        }
    }
}

/// See the module documentation.
pub struct MigrationManager {
    inner: Mutex<Inner>,
}

impl Default for MigrationManager {
    fn default() -> Self {
        MigrationManager {
            inner: Mutex::new(Inner {
                params: MigrationParams::default(),
                caps: Capabilities::default(),
                timeline: None,
                current: None,
                measuring: false,
                objects: HashMap::new(),
                tls: Default::default(),
            }),
        }
    }
}

impl MigrationManager {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The parameters new migrations take.
    pub fn params(&self) -> MigrationParams {
        self.lock().params
    }

    /// The capabilities new migrations take.
    pub fn caps(&self) -> Capabilities {
        self.lock().caps
    }

    /// Where the source writes each migration's timeline (`x-tern-timeline`).
    pub fn timeline(&self) -> Option<PathBuf> {
        self.lock().timeline.clone()
    }

    /// `query-migrate-parameters`.
    pub fn params_qmp(&self) -> Value {
        let g = self.lock();
        let mut v = g.params.to_qmp();
        for (k, t) in TLS_PARAMS.iter().zip(&g.tls) {
            v[*k] = Value::String(t.clone());
        }
        v["x-tern-timeline"] = Value::String(
            g.timeline
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
        v
    }

    /// `migrate-set-parameters`, all or nothing; `max-bandwidth` also applies to the migration
    /// in progress.
    pub fn set_parameters(&self, args: &Map<String, Value>) -> Result<(), String> {
        let mut rest = args.clone();
        let timeline = match rest.remove("x-tern-timeline") {
            None => None,
            Some(Value::String(p)) => Some(p),
            Some(_) => {
                return Err(
                    "Parameter 'x-tern-timeline' expects a file path (\"\" for none)".into(),
                )
            }
        };
        let mut tls: [Option<String>; 3] = Default::default();
        for (k, slot) in TLS_PARAMS.iter().zip(&mut tls) {
            match rest.remove(*k) {
                None => {}
                Some(Value::String(s)) => *slot = Some(s),
                Some(_) => return Err(format!("Parameter '{k}' expects a string")),
            }
        }
        let mut g = self.lock();
        let mut next = g.tls.clone();
        for (t, new) in next.iter_mut().zip(tls) {
            if let Some(v) = new {
                *t = v;
            }
        }
        // The credentials and names together, checked now (a bad name, tls-authz without
        // verify-peer): never at a connection.
        g.tls_settings_of(&next)?;
        let mut p = g.params;
        p.apply(&rest)?;
        g.params = p;
        g.tls = next;
        if let Some(t) = timeline {
            g.timeline = (!t.is_empty()).then(|| PathBuf::from(t));
        }
        if let Some(c) = g.active() {
            c.bandwidth_limit.store(p.max_bandwidth, Ordering::Relaxed);
        }
        Ok(())
    }

    /// `migrate-set-capabilities`: `(name, state)` pairs, all or nothing; refused while a
    /// migration runs.
    pub fn set_capabilities(&self, list: &[(&str, bool)]) -> Result<(), String> {
        let mut g = self.lock();
        if g.active().is_some() {
            return Err(IN_PROGRESS.into());
        }
        let mut caps = g.caps;
        for (name, on) in list {
            caps.set(name, *on)?;
        }
        g.caps = caps;
        Ok(())
    }

    /// The latest migration, finished or not (`query-migrate`).
    pub fn current(&self) -> Option<Arc<MigrationControl>> {
        self.lock().current.as_ref().map(|(c, _)| c.clone())
    }

    /// The migration in progress, if any.
    pub fn active(&self) -> Option<Arc<MigrationControl>> {
        self.lock().active().cloned()
    }

    /// Runs `f` under the manager's lock if no migration is in progress (so that none can start
    /// or end meanwhile: `cont` decides this way whether the guest is still ours to resume).
    pub fn when_idle<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let g = self.lock();
        g.active().is_none().then(f)
    }

    /// Starts a migration: under one lock, refuses if one is in progress or if `allowed` says
    /// no (the VM's own state, checked atomically with the start), else makes the control block
    /// — in status `setup` already — and records it. The caller then runs it on a thread and
    /// calls [`MigrationManager::finish`] when that thread is done with it.
    pub fn begin(
        &self,
        allowed: impl FnOnce() -> Result<(), String>,
        events: impl Fn(Capabilities) -> Box<dyn Fn(MigrationEvent) + Send + Sync>,
    ) -> Result<Arc<MigrationControl>, String> {
        let mut g = self.lock();
        if g.active().is_some() {
            return Err(IN_PROGRESS.into());
        }
        if g.measuring {
            return Err(MEASURING.into());
        }
        let tls = g.tls_settings()?;
        allowed()?;
        let ctl = MigrationControl::new(g.params, g.caps, events(g.caps));
        ctl.set_tls(tls);
        g.current = Some((ctl.clone(), false));
        Ok(ctl)
    }

    /// Whether the TLS parameters suit the side `endpoint` (a source needs client credentials,
    /// a target server ones); refused before a migration starts.
    pub fn check_tls(&self, endpoint: crate::transport::tls::TlsEndpoint) -> Result<(), String> {
        match self.lock().tls_settings()? {
            Some(t) => t.expect(endpoint),
            None => Ok(()),
        }
    }

    /// `object-add` of a `tls-creds-x509` (loaded by the caller); its id must be new.
    pub fn add_tls_creds(&self, creds: TlsCreds) -> Result<(), String> {
        let mut g = self.lock();
        if g.objects.contains_key(&creds.id) {
            return Err(format!("An object with id '{}' exists already", creds.id));
        }
        g.objects.insert(creds.id.clone(), Arc::new(creds));
        Ok(())
    }

    /// `object-del`: refused while `tls-creds` names it.
    pub fn del_object(&self, id: &str) -> Result<(), String> {
        let mut g = self.lock();
        if g.tls[0] == id {
            return Err(format!("Object '{id}' is in use (tls-creds)"));
        }
        g.objects
            .remove(id)
            .map(drop)
            .ok_or_else(|| format!("object '{id}' not found"))
    }

    /// Takes the dirty log for a `calc-dirty-rate` if no migration and no other measurement
    /// runs; [`Self::end_measure`] gives it back.
    pub fn begin_measure(&self) -> Result<(), String> {
        let mut g = self.lock();
        if g.active().is_some() {
            return Err(IN_PROGRESS.into());
        }
        if g.measuring {
            return Err("A dirty rate measurement is already running".into());
        }
        g.measuring = true;
        Ok(())
    }

    /// The measurement is over.
    pub fn end_measure(&self) {
        self.lock().measuring = false;
    }

    /// The migration thread is done with `ctl`; then `after` runs, outside the lock (what must
    /// change atomically with the end of the migration — the run state — changed before its
    /// status became final).
    pub fn finish(&self, ctl: &Arc<MigrationControl>, after: impl FnOnce()) {
        {
            let mut g = self.lock();
            if let Some((c, done)) = g.current.as_mut() {
                if Arc::ptr_eq(c, ctl) {
                    *done = true;
                }
            }
        }
        after();
    }

    /// The migration `begin` gave could not start (its thread could not be spawned): it is
    /// failed with `why`, and another may begin.
    pub fn abandon(&self, ctl: &Arc<MigrationControl>, why: &str) {
        ctl.stats().error = Some(why.to_owned());
        ctl.finalize(crate::MigrationStatus::Failed);
        self.finish(ctl, || {});
    }

    /// `migrate_cancel`: cancels the migration in progress (nothing to do if none).
    pub fn cancel(&self) -> Result<(), CancelRefused> {
        match self.active() {
            Some(c) => c.cancel(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    fn quiet(_: Capabilities) -> Box<dyn Fn(MigrationEvent) + Send + Sync> {
        Box::new(|_| {})
    }

    #[test]
    fn racing_starts_start_exactly_one() {
        for _ in 0..50 {
            let m = Arc::new(MigrationManager::default());
            let barrier = Arc::new(Barrier::new(4));
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (m, b) = (m.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        m.begin(|| Ok(()), quiet).is_ok()
                    })
                })
                .collect();
            let started = handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&ok| ok)
                .count();
            assert_eq!(started, 1);
            let c = m.active().unwrap();
            assert_eq!(c.snapshot().status, crate::MigrationStatus::Setup);
            assert!(m.set_capabilities(&[("events", true)]).is_err());
            assert!(m.when_idle(|| ()).is_none(), "busy while it runs");
            m.finish(&c, || {});
            assert!(m.active().is_none());
            assert_eq!(m.when_idle(|| 7), Some(7));
            assert!(m.begin(|| Err("migrated away".into()), quiet).is_err());
            assert!(m.begin(|| Ok(()), quiet).is_ok());
        }
    }

    #[test]
    fn a_migration_that_never_started_is_failed_and_frees_the_manager() {
        let m = MigrationManager::default();
        let c = m.begin(|| Ok(()), quiet).unwrap();
        m.abandon(&c, "cannot start the migration thread: EAGAIN");
        let s = c.snapshot();
        assert_eq!(s.status, crate::MigrationStatus::Failed);
        assert!(s.error.unwrap().contains("EAGAIN"));
        assert!(m.active().is_none());
        assert!(m.begin(|| Ok(()), quiet).is_ok());
    }
}
