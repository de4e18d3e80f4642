//! When to stop iterating: a pure function of what was measured.

/// What the last round measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// Bytes per second the link carried in the last round (as accepted by the socket).
    pub bandwidth: f64,
    /// Bytes of RAM dirty now (what the stop-and-copy would send, an upper bound).
    pub dirty_bytes: u64,
    /// Bytes per second the guest dirties (distinct pages found per sync interval).
    pub dirty_rate: f64,
    /// Bytes of CPU and device state the stop-and-copy sends.
    pub state_bytes: u64,
    /// Bytes per second the target loads at (copy into guest RAM), if known.
    pub target_load_rate: f64,
    /// Fixed costs of the switch-over in seconds: pausing, the final dirty sync, the target's
    /// state load and resume, the acknowledgement's round trip.
    pub fixed_overhead: f64,
}

/// Expected downtime in seconds if the VM stopped now: everything the stop-and-copy sends,
/// through the link and through the target's load, plus the fixed costs.
pub fn expected_downtime(m: &Measured) -> f64 {
    let bytes = (m.dirty_bytes + m.state_bytes) as f64;
    let link = if m.bandwidth > 0.0 {
        bytes / m.bandwidth
    } else {
        f64::INFINITY
    };
    // The target loads while it receives; only what it cannot overlap adds up, and loading is
    // normally faster than the link. Count the slower of the two.
    let load = if m.target_load_rate > 0.0 {
        bytes / m.target_load_rate
    } else {
        0.0
    };
    link.max(load) + m.fixed_overhead
}

/// Below this much dirty RAM another round is not worth its sync.
const SMALL: u64 = 4 << 20;

/// Whether to stop and copy now: when the expected downtime fits in the limit *and* another
/// round would not cut it by at least a quarter. A round sends `dirty_bytes` in
/// `dirty_bytes / bandwidth` seconds, while the guest dirties `dirty_rate` times that; if that
/// is more than three quarters of what is dirty now, iterating again buys little and costs
/// total time (and a guest dirtying faster than the link would never get there).
pub fn converged(m: &Measured, downtime_limit_ms: u64) -> bool {
    if expected_downtime(m) * 1000.0 > downtime_limit_ms as f64 {
        return false;
    }
    if m.dirty_bytes <= SMALL || m.bandwidth <= 0.0 {
        return true;
    }
    let next = m.dirty_rate * (m.dirty_bytes as f64 / m.bandwidth);
    next >= m.dirty_bytes as f64 * 0.75
}

/// Auto-converge: how much vCPU time to take away from a guest that dirties faster than the
/// link. QEMU's rule, restated: after a sync (from the second on), if the bytes dirtied since
/// the previous sync exceed `throttle-trigger-threshold` percent of the bytes sent meanwhile, the
/// period counts as "high"; on every second high period the throttle grows — first to
/// `cpu-throttle-initial`, then by `cpu-throttle-increment` (with `cpu-throttle-tailslow`, only
/// by what the ratio of sent to dirtied bytes says is missing), never above `max-cpu-throttle`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Throttle {
    /// Percent of vCPU time taken away now.
    pub percent: u8,
    high: u32,
}

impl Throttle {
    /// Called after each sync but the first; returns the new percentage if it changed.
    pub fn after_sync(
        &mut self,
        p: &crate::MigrationParams,
        dirtied_bytes: u64,
        sent_bytes: u64,
    ) -> Option<u8> {
        let threshold = sent_bytes as f64 * f64::from(p.throttle_trigger_threshold) / 100.0;
        if (dirtied_bytes as f64) <= threshold {
            return None;
        }
        self.high += 1;
        if self.high < 2 {
            return None;
        }
        self.high = 0;
        let max = p.max_cpu_throttle.min(99);
        let next = if self.percent == 0 {
            p.cpu_throttle_initial
        } else {
            let mut inc = f64::from(p.cpu_throttle_increment);
            if p.cpu_throttle_tailslow && dirtied_bytes > 0 {
                let cpu_now = 100.0 - f64::from(self.percent);
                let cpu_ideal = cpu_now * (sent_bytes as f64 / dirtied_bytes as f64);
                inc = inc.min((cpu_now - cpu_ideal).ceil()).max(1.0);
            }
            (f64::from(self.percent) + inc).min(255.0) as u8
        }
        .min(max);
        if next == self.percent {
            return None;
        }
        self.percent = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(bandwidth: f64, dirty: u64) -> Measured {
        Measured {
            bandwidth,
            dirty_bytes: dirty,
            dirty_rate: 0.0,
            state_bytes: 100_000,
            target_load_rate: 0.0,
            fixed_overhead: 0.002,
        }
    }

    #[test]
    fn fits_when_the_rest_goes_through_in_time() {
        // 1 GB/s, 100 MB dirty, a guest dirtying 600 MB/s: another round would leave 60 MB,
        // not worth it; 0.1 s + state + overhead < 300 ms.
        let mut x = m(1e9, 100_000_000);
        x.dirty_rate = 800e6;
        assert!(converged(&x, 300));
        // 400 MB dirty: 0.4 s > 300 ms.
        assert!(!converged(&m(1e9, 400_000_000), 300));
    }

    #[test]
    fn iterates_again_while_a_round_cuts_the_downtime() {
        // 60 MB dirty at 1 GB/s with the guest dirtying 64 MB/s: the next round leaves ~4 MB.
        let mut x = m(1e9, 60_000_000);
        x.dirty_rate = 64e6;
        assert!(!converged(&x, 300));
        x.dirty_rate = 500e6;
        assert!(!converged(&x, 300), "a round would still cut it by half");
        x.dirty_rate = 800e6;
        assert!(converged(&x, 300));
        // Little left: stop.
        x.dirty_bytes = 1 << 20;
        x.dirty_rate = 0.0;
        assert!(converged(&x, 300));
    }

    #[test]
    fn device_state_and_overheads_count() {
        let mut x = m(1e9, 0);
        x.state_bytes = 290_000_000;
        assert!(!converged(&x, 290), "state bytes are part of the downtime");
        let mut y = m(1e9, 0);
        y.fixed_overhead = 0.31;
        assert!(!converged(&y, 300));
    }

    #[test]
    fn a_slow_target_load_bounds_the_estimate() {
        let mut x = m(10e9, 100_000_000);
        x.dirty_rate = 60e9;
        assert!(converged(&x, 50));
        x.target_load_rate = 1e9;
        assert!(!converged(&x, 50));
    }

    #[test]
    fn no_bandwidth_measured_never_converges_and_zero_dirty_does() {
        assert!(!converged(&m(0.0, 1), 300));
        assert!(converged(&m(1e6, 0), 300));
        assert_eq!(expected_downtime(&m(1e9, 0)), 0.0021);
    }

    #[test]
    fn throttle_grows_on_every_second_high_period() {
        let p = crate::MigrationParams::default();
        let mut t = Throttle::default();
        // Dirtying less than half of what was sent: never throttled.
        for _ in 0..5 {
            assert_eq!(t.after_sync(&p, 40, 100), None);
        }
        assert_eq!(t.after_sync(&p, 400, 100), None);
        assert_eq!(t.after_sync(&p, 400, 100), Some(20));
        assert_eq!(t.after_sync(&p, 400, 100), None);
        assert_eq!(t.after_sync(&p, 400, 100), Some(30));
        for _ in 0..30 {
            t.after_sync(&p, 400, 100);
        }
        assert_eq!(t.percent, 99);
        let capped = crate::MigrationParams {
            max_cpu_throttle: 60,
            ..p
        };
        let mut t = Throttle::default();
        for _ in 0..30 {
            t.after_sync(&capped, 400, 100);
        }
        assert_eq!(t.percent, 60);
    }

    #[test]
    fn tailslow_grows_by_what_is_missing() {
        let p = crate::MigrationParams {
            cpu_throttle_tailslow: true,
            cpu_throttle_increment: 30,
            ..Default::default()
        };
        let mut t = Throttle {
            percent: 50,
            high: 1,
        };
        // Sent 90 while 100 were dirtied: 50% CPU now, 45% ideal, so +5 rather than +30.
        assert_eq!(t.after_sync(&p, 100, 90), Some(55));
    }
}
