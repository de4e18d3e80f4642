//! Migration statistics, shaped like QEMU's `MigrationInfo` at the edge.

use std::time::Instant;

use serde_json::{json, Value};

/// QEMU's MigrationStatus values that tern uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationStatus {
    None,
    Setup,
    Active,
    /// Postcopy: the guest runs on the target, pages still move (QEMU's name).
    PostcopyActive,
    /// Postcopy: the connection broke after RUN; each side keeps its half of the guest and
    /// waits for a recovery.
    PostcopyPaused,
    /// Recovery: waiting for the other side's new connection.
    PostcopyRecoverSetup,
    /// Recovery: the handshake on the new connection (what the target holds).
    PostcopyRecover,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
}

impl MigrationStatus {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecoverSetup => "postcopy-recover-setup",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
        }
    }

    /// Whether the migration has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Cancelled | MigrationStatus::Completed | MigrationStatus::Failed
        )
    }
}

/// Everything `query-migrate` reports.
#[derive(Clone, Debug)]
pub struct MigrationStats {
    pub status: MigrationStatus,
    pub started: Option<Instant>,
    pub ended: Option<Instant>,
    /// Bytes the socket accepted.
    pub transferred: u64,
    /// The disks a storage migration copies (none: no `disk` object).
    pub disk: Option<crate::participant::DiskCounters>,
    /// Bytes of dirty RAM left (estimate).
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Zero pages (QEMU's `duplicate`).
    pub duplicate: u64,
    /// Pages sent with data.
    pub normal: u64,
    /// Pages dirtied per second, last round.
    pub dirty_pages_rate: u64,
    /// Throughput of the last round in Mbit/s.
    pub mbps: f64,
    /// Dirty bitmap syncs (rounds).
    pub dirty_sync_count: u64,
    /// Pages per second, last round.
    pub pages_per_second: u64,
    /// Bytes sent while the VM ran.
    pub precopy_bytes: u64,
    /// Bytes sent while it was paused.
    pub downtime_bytes: u64,
    pub setup_time_ms: u64,
    pub expected_downtime_ms: u64,
    pub downtime_ms: Option<u64>,
    pub error: Option<String>,
    /// Test aid: digest of guest RAM at the switch-over (source: paused; target: loaded).
    pub ram_digest: Option<u64>,
    /// Auto-converge: percent of vCPU time taken away now.
    pub throttle_percent: u8,
    /// Every precopy round, for the timeline.
    pub rounds: Vec<RoundRecord>,
    /// The stop-and-copy, once done.
    pub switchover: Option<Switchover>,
    /// Why precopy stopped iterating: "converged", "round limit", "time limit", "idle".
    pub stop_reason: Option<&'static str>,
    /// The migration failed after the source committed: the target may be running the guest.
    pub in_doubt: bool,
    /// Test aid: the switch-over step where `x-tern-switchover-fault` holds now.
    pub fault_holding: Option<&'static str>,
    /// Stream bytes of each parallel data channel (`multifd`), in index order.
    pub multifd_channel_bytes: Vec<u64>,
    /// Milliseconds each data channel was busy sending (not waiting for pages).
    pub multifd_channel_busy_ms: Vec<u64>,
    /// How guest writes are tracked in this migration (`get`, `clear` or `ring`), once set up.
    pub dirty_log: Option<&'static str>,
    /// Postcopy, both sides: page requests (source: PAGE_REQUESTs served, a readahead window
    /// being a second one; target: faults that asked for their page).
    pub postcopy_requests: u64,
    /// Postcopy, source: bytes sent after RUN, on the main and the urgent channel.
    pub postcopy_bytes: u64,
    /// Postcopy: when the guest started on the target (seconds since the start).
    pub postcopy_start: Option<f64>,
    /// `x-tern-auto-postcopy`: when and why precopy handed over.
    pub auto_postcopy: Option<String>,
    /// Postcopy, source: every ~100 ms after RUN, (seconds since the start, MiB/s sent, page
    /// requests per second).
    pub postcopy_series: Vec<(f64, f64, f64)>,
    /// Postcopy, target: what the faults cost (`postcopy-blocktime` and the latencies).
    pub postcopy_faults: Option<crate::target::postcopy::FaultStats>,
    /// Postcopy, both sides: every pause and the recovery that ended it.
    pub recoveries: Vec<Recovery>,
    /// A restore from a mapped-layout file: when the guest ran, when every page was in.
    pub restore: Option<crate::restore::RestoreStats>,
}

/// One pause of postcopy and its recovery.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovery {
    /// When it paused, seconds since the start.
    pub paused_at: f64,
    /// Why.
    pub reason: String,
    /// How long until postcopy was active again, ms (`None` while paused).
    pub paused_ms: Option<f64>,
    /// Source: pages it had sent that the target did not hold, sent again.
    pub resent_pages: u64,
    /// Recovery attempts that failed before the one that worked.
    pub failed_attempts: u64,
}

impl Recovery {
    fn to_json(&self) -> Value {
        json!({
            "paused-at": self.paused_at,
            "reason": self.reason,
            "paused-ms": self.paused_ms,
            "resent-pages": self.resent_pages,
            "failed-attempts": self.failed_attempts,
        })
    }
}

/// One precopy round as measured by the source. Times are seconds since the migration began;
/// rates are bytes per second.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundRecord {
    pub round: u64,
    pub start: f64,
    pub end: f64,
    /// Pages sent with data.
    pub pages: u64,
    /// Pages sent as zero ranges.
    pub zero_pages: u64,
    /// Bytes the socket accepted.
    pub bytes: u64,
    /// Pages found dirty by the sync that ended the round.
    pub dirty_pages: u64,
    /// Milliseconds that sync took (collecting the dirty log).
    pub sync_ms: f64,
    /// Milliseconds spent re-arming tracking as pages were sent (manual protect), in the round.
    pub rearm_ms: f64,
    pub bandwidth: f64,
    pub dirty_rate: f64,
    pub expected_downtime_ms: f64,
    /// Auto-converge throttle during the round.
    pub throttle_percent: u8,
}

/// The stop-and-copy, split into its parts (milliseconds from the pause request).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Switchover {
    /// Seconds since the migration began when the guest was asked to stop.
    pub start: f64,
    /// Waiting for the target to catch up before pausing (not downtime).
    pub drain_ms: f64,
    /// Until every vCPU was parked.
    pub pause_ms: f64,
    /// The last collection of the dirty log (part of the time until the last pages were sent).
    pub sync_ms: f64,
    /// Until the last dirty pages were sent.
    pub pages_ms: f64,
    /// Until the CPU and device state was sent.
    pub state_ms: f64,
    /// Until END was written (and, one-way, the channel closed and synced).
    pub end_ms: f64,
    /// Until the target's LOADED: it read END and loaded everything, not running yet.
    pub loaded_ms: f64,
    /// Until the target's RUNNING (after the commit and GO): the downtime.
    pub ack_ms: f64,
    pub pages: u64,
    pub zero_pages: u64,
    pub state_bytes: u64,
    pub bytes: u64,
}

impl Default for MigrationStats {
    fn default() -> Self {
        MigrationStats {
            disk: None,
            status: MigrationStatus::None,
            started: None,
            ended: None,
            transferred: 0,
            remaining: 0,
            total: 0,
            duplicate: 0,
            normal: 0,
            dirty_pages_rate: 0,
            mbps: 0.0,
            dirty_sync_count: 0,
            pages_per_second: 0,
            precopy_bytes: 0,
            downtime_bytes: 0,
            setup_time_ms: 0,
            expected_downtime_ms: 0,
            downtime_ms: None,
            error: None,
            ram_digest: None,
            throttle_percent: 0,
            rounds: Vec::new(),
            switchover: None,
            stop_reason: None,
            in_doubt: false,
            fault_holding: None,
            multifd_channel_bytes: Vec::new(),
            multifd_channel_busy_ms: Vec::new(),
            dirty_log: None,
            postcopy_requests: 0,
            postcopy_bytes: 0,
            postcopy_start: None,
            auto_postcopy: None,
            postcopy_series: Vec::new(),
            recoveries: Vec::new(),
            restore: None,
            postcopy_faults: None,
        }
    }
}

impl MigrationStats {
    /// Milliseconds since the start (to the end, once ended).
    pub fn total_time_ms(&self) -> u64 {
        match (self.started, self.ended) {
            (Some(s), Some(e)) => e.duration_since(s).as_millis() as u64,
            (Some(s), None) => s.elapsed().as_millis() as u64,
            _ => 0,
        }
    }

    /// QEMU's `MigrationInfo` for `query-migrate`.
    pub fn to_qmp(&self) -> Value {
        if self.status == MigrationStatus::None {
            return json!({});
        }
        let mut v = json!({"status": self.status.as_str()});
        if self.status != MigrationStatus::Setup {
            v["ram"] = json!({
                "transferred": self.transferred,
                "remaining": self.remaining,
                "total": self.total,
                "duplicate": self.duplicate,
                "normal": self.normal,
                "normal-bytes": self.normal * 4096,
                "dirty-pages-rate": self.dirty_pages_rate,
                "mbps": self.mbps,
                "dirty-sync-count": self.dirty_sync_count,
                "postcopy-requests": self.postcopy_requests,
                "page-size": 4096,
                "multifd-bytes": self.multifd_channel_bytes.iter().sum::<u64>(),
                "pages-per-second": self.pages_per_second,
                "precopy-bytes": self.precopy_bytes,
                "downtime-bytes": self.downtime_bytes,
                "postcopy-bytes": self.postcopy_bytes,
                "dirty-sync-missed-zero-copy": 0,
            });
        }
        if let (Some(d), true) = (self.disk, self.status != MigrationStatus::Setup) {
            v["disk"] = json!({
                "transferred": d.transferred,
                "remaining": d.remaining,
                "total": d.total,
                "dirty-sync-count": d.dirty_syncs,
            });
        }
        v["total-time"] = json!(self.total_time_ms());
        v["setup-time"] = json!(self.setup_time_ms);
        if matches!(
            self.status,
            MigrationStatus::Completed | MigrationStatus::PostcopyActive
        ) {
            if let Some(d) = self.downtime_ms {
                v["downtime"] = json!(d);
            }
        } else if !self.status.is_final() {
            v["expected-downtime"] = json!(self.expected_downtime_ms);
        }
        if self.throttle_percent > 0 {
            v["cpu-throttle-percentage"] = json!(self.throttle_percent);
        }
        if let Some(e) = &self.error {
            v["error-desc"] = json!(e);
        }
        if self.in_doubt {
            v["x-tern-in-doubt"] = json!(true);
        }
        if let Some(step) = self.fault_holding {
            v["x-tern-fault-holding"] = json!(step);
        }
        if let Some(d) = self.ram_digest {
            v["x-tern-ram-digest"] = json!(format!("{d:016x}"));
        }
        if let Some(m) = self.dirty_log {
            v["x-tern-dirty-log"] = json!(m);
        }
        if let Some(why) = &self.auto_postcopy {
            v["x-tern-auto-postcopy"] = json!(why);
        }
        if let Some(f) = &self.postcopy_faults {
            f.to_qmp(&mut v);
        }
        if let Some(r) = &self.restore {
            v["x-tern-restore"] = json!({
                "mode": if r.on_demand { "on-demand" } else { "full" },
                "running-ms": r.running_ms,
                "filled-ms": r.filled_ms,
                "faults": r.faults,
            });
        }
        if !self.recoveries.is_empty() {
            v["x-tern-postcopy-recoveries"] =
                self.recoveries.iter().map(Recovery::to_json).collect();
        }
        if !self.multifd_channel_bytes.is_empty() {
            // Per data channel: what it sent and how long it was busy sending it.
            v["x-tern-multifd-channels"] = self
                .multifd_channel_bytes
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    json!({"bytes": b, "busy-ms": self.multifd_channel_busy_ms.get(i).copied().unwrap_or(0)})
                })
                .collect();
        }
        v
    }
}

impl MigrationStats {
    /// The timeline: every round, then the stop-and-copy with its downtime split.
    pub fn timeline(&self) -> Value {
        let rounds: Vec<Value> = self
            .rounds
            .iter()
            .map(|r| {
                json!({
                    "round": r.round,
                    "start": r.start,
                    "end": r.end,
                    "pages": r.pages,
                    "zero-pages": r.zero_pages,
                    "bytes": r.bytes,
                    "dirty-pages": r.dirty_pages,
                    "sync-ms": r.sync_ms,
                    "rearm-ms": r.rearm_ms,
                    "bandwidth": r.bandwidth,
                    "dirty-rate": r.dirty_rate,
                    "expected-downtime-ms": r.expected_downtime_ms,
                    "cpu-throttle-percentage": r.throttle_percent,
                })
            })
            .collect();
        let sw = self.switchover.as_ref().map(|s| {
            json!({
                "start": s.start,
                "drain-ms": s.drain_ms,
                "pause-ms": s.pause_ms,
                "sync-ms": s.sync_ms,
                "pages-ms": s.pages_ms,
                "state-ms": s.state_ms,
                "end-ms": s.end_ms,
                "loaded-ms": s.loaded_ms,
                "ack-ms": s.ack_ms,
                "downtime": {
                    "pause": s.pause_ms,
                    "final-sync": s.sync_ms,
                    "final-pages": s.pages_ms - s.pause_ms - s.sync_ms,
                    "device-state": s.state_ms - s.pages_ms,
                    "end": s.end_ms - s.state_ms,
                    "target-load": s.loaded_ms - s.end_ms,
                    "commit-and-run": s.ack_ms - s.loaded_ms,
                    "total": s.ack_ms,
                },
                "pages": s.pages,
                "zero-pages": s.zero_pages,
                "device-state-bytes": s.state_bytes,
                "bytes": s.bytes,
            })
        });
        json!({
            "tern-timeline": 1,
            "status": self.status.as_str(),
            "total-time-ms": self.total_time_ms(),
            "setup-time-ms": self.setup_time_ms,
            "downtime-ms": self.downtime_ms,
            "transferred": self.transferred,
            "total": self.total,
            "normal-pages": self.normal,
            "zero-pages": self.duplicate,
            "stop-reason": self.stop_reason,
            "error": self.error,
            "in-doubt": self.in_doubt,
            "multifd-channel-bytes": self.multifd_channel_bytes,
            "multifd-channel-busy-ms": self.multifd_channel_busy_ms,
            "dirty-log": self.dirty_log,
            "postcopy-start": self.postcopy_start,
            "auto-postcopy": self.auto_postcopy,
            "postcopy-requests": self.postcopy_requests,
            "postcopy-bytes": self.postcopy_bytes,
            "postcopy-recoveries": self.recoveries.iter().map(Recovery::to_json).collect::<Vec<_>>(),
            "postcopy-series": self
                .postcopy_series
                .iter()
                .map(|&(t, mibs, reqs)| json!({"t": t, "mib-per-s": mibs, "requests-per-s": reqs}))
                .collect::<Vec<_>>(),
            "rounds": rounds,
            "switchover": sw,
        })
    }
}
