//! `calc-dirty-rate` / `query-dirty-rate` (QEMU's names and reply shape), mode `dirty-bitmap`:
//! how fast the guest dirties its memory, measured with the tracking a migration uses — the
//! KVM dirty log ORed with the VMM's own bitmap — while no migration runs (the manager makes
//! the two exclude each other: both start and stop the same dirty log).
//!
//! What the figure means: distinct pages written at least once during the window, times the
//! page size, per second. A page written ten times counts once — which is what a migration
//! round would have to send again — so a guest that rewrites a few hot pages shows a lower
//! rate than it writes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{Result, SourceVm};

/// The shortest and longest window (QEMU: 1–60 s, or 100 ms–60 s in milliseconds).
pub const MIN_WINDOW: Duration = Duration::from_millis(100);
pub const MAX_WINDOW: Duration = Duration::from_secs(60);

/// What a measurement found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// Distinct pages dirtied in the window.
    pub pages: u64,
    /// The window as it was (the sleep may overshoot).
    pub window: Duration,
    /// The time the one sync took.
    pub sync: Duration,
    /// How the writes were collected: `get` (the dirty bitmap) or `ring` (a VM with a dirty
    /// ring collects through it).
    pub tracking: &'static str,
}

impl Measured {
    /// MiB per second.
    pub fn rate_mib(&self) -> f64 {
        (self.pages * 4096) as f64 / (1u64 << 20) as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

/// Starts the dirty log, waits `window`, collects what was dirtied, stops the log (whatever
/// happened between).
pub fn measure(vm: &dyn SourceVm, window: Duration) -> Result<Measured> {
    let ram = vm.ram();
    let tracking = ram.start_dirty_log(crate::DirtyLogMode::Get)?.as_str();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let collect = || -> Result<(u64, Duration)> {
        let mut pages = 0;
        let t_sync = Instant::now();
        for r in ram.regions() {
            let mut bits = vec![0u64; (r.size / 4096).div_ceil(64) as usize];
            pages += ram.sync_dirty(r.id, &mut bits)?;
        }
        Ok((pages, t_sync.elapsed()))
    };
    let got = collect();
    let window = t0.elapsed();
    ram.stop_dirty_log();
    let (pages, sync) = got?;
    Ok(Measured {
        pages,
        window: window.saturating_sub(sync),
        sync,
        tracking,
    })
}

/// The state `query-dirty-rate` reports.
#[derive(Clone, Debug, Default)]
struct State {
    status: &'static str,
    start_time_s: u64,
    calc_time: u64,
    millis: bool,
    result: Option<std::result::Result<Measured, String>>,
}

/// The latest measurement of a VM, for `query-dirty-rate`.
#[derive(Default)]
pub struct DirtyRate {
    state: Mutex<State>,
}

/// Seconds since the host booted (QEMU's `start-time` counts on a monotonic clock too).
fn monotonic_s() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own; the result is checked.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc == 0 {
        ts.tv_sec as u64
    } else {
        0
    }
}

impl DirtyRate {
    /// Parses `calc-time` with its unit: the window.
    pub fn window(calc_time: i64, unit: Option<&str>) -> std::result::Result<Duration, String> {
        let d = match unit.unwrap_or("second") {
            "second" => Duration::from_secs(calc_time.max(0) as u64),
            "millisecond" => Duration::from_millis(calc_time.max(0) as u64),
            other => return Err(format!("calc-time-unit '{other}': second or millisecond")),
        };
        if calc_time <= 0 || d < MIN_WINDOW || d > MAX_WINDOW {
            return Err(format!(
                "Parameter 'calc-time' is out of range: {} ms to {} s",
                MIN_WINDOW.as_millis(),
                MAX_WINDOW.as_secs()
            ));
        }
        Ok(d)
    }

    /// Runs a measurement on its own thread; `done` runs after it (the manager's release).
    /// The caller made sure no migration or other measurement runs.
    pub fn start(
        self: &Arc<Self>,
        vm: Arc<dyn SourceVm>,
        calc_time: i64,
        unit: Option<&str>,
        done: impl FnOnce() + Send + 'static,
    ) -> std::result::Result<(), String> {
        let window = Self::window(calc_time, unit)?;
        *self.lock() = State {
            status: "measuring",
            start_time_s: monotonic_s(),
            calc_time: calc_time as u64,
            millis: unit == Some("millisecond"),
            result: None,
        };
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("dirty-rate".into())
            .spawn(move || {
                let r = measure(&*vm, window).map_err(|e| e.to_string());
                if let Err(e) = &r {
                    tracing::warn!("calc-dirty-rate failed: {e}");
                }
                {
                    let mut s = this.lock();
                    s.status = "measured";
                    s.result = Some(r);
                }
                done();
            });
        spawned.map(drop).map_err(|e| {
            self.lock().status = "unstarted";
            format!("cannot start the measurement: {e}")
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `query-dirty-rate`, in QEMU's shape (`calc-time` in the unit asked for, or the one the
    /// measurement was started with), with tern's own details as `x-tern-*`.
    pub fn to_qmp(&self, unit: Option<&str>) -> Value {
        let s = self.lock();
        let status = if s.status.is_empty() {
            "unstarted"
        } else {
            s.status
        };
        let millis = unit.map_or(s.millis, |u| u == "millisecond");
        let calc = match (s.millis, millis) {
            (false, true) => s.calc_time * 1000,
            (true, false) => s.calc_time / 1000,
            _ => s.calc_time,
        };
        let mut v = json!({
            "status": status,
            "start-time": s.start_time_s,
            "calc-time": calc,
            "calc-time-unit": if millis { "millisecond" } else { "second" },
            "mode": "dirty-bitmap",
        });
        match &s.result {
            Some(Ok(m)) => {
                v["dirty-rate"] = json!(m.rate_mib().round() as i64);
                v["x-tern-dirty-pages"] = json!(m.pages);
                v["x-tern-window-ms"] = json!(m.window.as_millis() as u64);
                v["x-tern-sync-ms"] = json!(m.sync.as_secs_f64() * 1000.0);
                v["x-tern-dirty-log"] = json!(m.tracking);
            }
            Some(Err(e)) => v["x-tern-error"] = json!(e),
            None => {}
        }
        v
    }
}
