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
}
