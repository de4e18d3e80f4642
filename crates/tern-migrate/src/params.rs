//! Migration parameters and capabilities, with QEMU's names.

use serde_json::{json, Map, Value};

/// What to do when precopy reaches its round or time limit without converging.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LimitAction {
    /// Give up: the migration fails and the source keeps running.
    #[default]
    Fail,
    /// Stop and copy anyway, with a downtime longer than the limit.
    Switchover,
}

impl LimitAction {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitAction::Fail => "fail",
            LimitAction::Switchover => "switchover",
        }
    }
}

/// A step of the switch-over (`docs/stream-format.md`, *The switch-over*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchoverStep {
    /// END sent (source) or loaded (target); LOADED not yet read (source) or sent (target).
    BeforeLoaded,
    /// LOADED received (source) or sent (target); not committed, no GO yet.
    BeforeGo,
    /// GO sent (source) or received (target); RUNNING not yet read (source), the vCPUs not yet
    /// started (target).
    BeforeRunning,
}

impl SwitchoverStep {
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchoverStep::BeforeLoaded => "before-loaded",
            SwitchoverStep::BeforeGo => "before-go",
            SwitchoverStep::BeforeRunning => "before-running",
        }
    }
}

/// Test aid (`x-tern-switchover-fault`): a fault placed at one step of the switch-over, on the
/// side whose parameter it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchoverFault {
    pub step: SwitchoverStep,
    pub action: FaultAction,
}

/// What a [`SwitchoverFault`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Shut the connection down (both directions) at that step.
    Cut,
    /// Hold that many milliseconds at that step (a cancel or a kill can be placed meanwhile;
    /// `query-migrate` shows `x-tern-fault-holding` during the hold).
    Hold(u64),
    /// Panic in the migration thread at that step (the engine must end the migration as a
    /// failure and, before the commit, resume the source).
    Panic,
}

impl SwitchoverFault {
    /// `STEP:cut` or `STEP:hold:MS`; `""` is none.
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        if s.is_empty() {
            return Ok(None);
        }
        let bad = || {
            format!(
                "Parameter 'x-tern-switchover-fault' expects STEP:cut, STEP:panic or STEP:hold:MS with STEP one of before-loaded, before-go, before-running, not '{s}'"
            )
        };
        let (step, action) = s.split_once(':').ok_or_else(bad)?;
        let step = match step {
            "before-loaded" => SwitchoverStep::BeforeLoaded,
            "before-go" => SwitchoverStep::BeforeGo,
            "before-running" => SwitchoverStep::BeforeRunning,
            _ => return Err(bad()),
        };
        let action = match action.split_once(':') {
            None if action == "cut" => FaultAction::Cut,
            None if action == "panic" => FaultAction::Panic,
            Some(("hold", ms)) => FaultAction::Hold(
                ms.parse::<u64>()
                    .ok()
                    .filter(|&m| m <= 600_000)
                    .ok_or_else(bad)?,
            ),
            _ => return Err(bad()),
        };
        Ok(Some(SwitchoverFault { step, action }))
    }
}

impl std::fmt::Display for SwitchoverFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.action {
            FaultAction::Cut => write!(f, "{}:cut", self.step.as_str()),
            FaultAction::Panic => write!(f, "{}:panic", self.step.as_str()),
            FaultAction::Hold(ms) => write!(f, "{}:hold:{ms}", self.step.as_str()),
        }
    }
}

/// Tunables (`migrate-set-parameters`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationParams {
    /// Bytes per second the socket may accept; 0 = unlimited (QEMU's meaning of 0).
    ///
    /// QEMU defaults to 128 MiB/s, a limit from the days of shared 1 GbE links; it makes every
    /// migration on a modern or local link needlessly slow and, worse, lets fast-dirtying guests
    /// never converge. tern defaults to unlimited: the operator who shares a link sets a cap.
    pub max_bandwidth: u64,
    /// The longest pause the stop-and-copy may take, in milliseconds (QEMU's default, 300).
    pub downtime_limit_ms: u64,
    /// Auto-converge: the first throttle, in percent of vCPU time taken away (QEMU: 20).
    pub cpu_throttle_initial: u8,
    /// Auto-converge: added each time the throttle grows (QEMU: 10).
    pub cpu_throttle_increment: u8,
    /// Auto-converge: the ceiling (QEMU: 99).
    pub max_cpu_throttle: u8,
    /// Auto-converge: near the end, grow only by what the dirty rate still needs (QEMU: off).
    pub cpu_throttle_tailslow: bool,
    /// Auto-converge: the throttle grows when a period's dirtied bytes exceed this percentage of
    /// the bytes sent in it (QEMU's `throttle-trigger-threshold`, 50).
    pub throttle_trigger_threshold: u8,
    /// Precopy rounds before [`MigrationParams::limit_action`] applies; 0 = no limit.
    pub max_rounds: u64,
    /// Milliseconds of precopy before [`MigrationParams::limit_action`] applies; 0 = no limit.
    pub max_precopy_ms: u64,
    /// What reaching either limit does.
    pub limit_action: LimitAction,
    /// Test aid: a fault at one step of the switch-over (`x-tern-switchover-fault`).
    pub switchover_fault: Option<SwitchoverFault>,
    /// The target gives up on a source that sends nothing for this long, in milliseconds
    /// (`x-tern-read-timeout`; a source never pauses its stream for long: 60 s is generous).
    pub read_timeout_ms: u64,
    /// Postcopy, after RUN, both sides: a connection that carries nothing for this long (a
    /// write that blocks, a read that waits) pauses the migration (`x-tern-postcopy-timeout`,
    /// milliseconds): the link is taken for broken, and recovery can reconnect.
    pub postcopy_timeout_ms: u64,
    /// Data channels with the `multifd` capability (QEMU's `multifd-channels`, default 2).
    pub multifd_channels: u8,
    /// How pages with data are compressed (QEMU's `multifd-compression`; tern compresses on
    /// the main stream too, so it also applies without `multifd`).
    pub multifd_compression: MultifdCompression,
    /// zstd's level, 0–20 (QEMU's `multifd-zstd-level`, default 1; 0 is zstd's own default, 3).
    pub multifd_zstd_level: u8,
    /// How guest writes are tracked (`x-tern-dirty-log`).
    pub dirty_log: DirtyLogMode,
    /// Bytes per second once postcopy runs (QEMU's `max-postcopy-bandwidth`); 0 = unlimited.
    pub max_postcopy_bandwidth: u64,
    /// Whether precopy switches to postcopy by itself (`x-tern-auto-postcopy`).
    pub auto_postcopy: AutoPostcopy,
    /// How the target announces the guest's NICs after an incoming migration (QEMU's
    /// `announce-initial`, `announce-max`, `announce-step` in ms, `announce-rounds`).
    pub announce_initial_ms: u64,
    pub announce_max_ms: u64,
    pub announce_rounds: u64,
    pub announce_step_ms: u64,
    /// How the memory moves (`mode`).
    pub mode: MigrationMode,
}

/// How the guest's memory moves (QEMU's `mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MigrationMode {
    /// Copied, page by page.
    #[default]
    Normal,
    /// Handed over: on one host, over a `unix:` socket, the memory's memfd goes to the target
    /// (SCM_RIGHTS) and only the device state is sent.
    CprTransfer,
}

impl MigrationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMode::Normal => "normal",
            MigrationMode::CprTransfer => "cpr-transfer",
        }
    }
}

/// `x-tern-auto-postcopy`: when precopy hands over to postcopy by itself (with `postcopy-ram`).
///
/// The rule: after a round, precopy cannot get under `downtime-limit` when the guest dirtied
/// memory at least as fast as the link carried it in that round (≥ 95% of the measured
/// bandwidth, the margin for measurement noise): the set still to send cannot shrink, so the
/// expected downtime cannot fall. `predict` switches at the first such round (round 1 already
/// measures both rates); `cautious` waits for three such rounds in a row, for a guest whose
/// dirtying comes in bursts. A round that converged ends precopy as usual first. With
/// `auto-converge` on too, postcopy acts first: throttling costs the guest seconds of its CPU,
/// postcopy only the faults on pages not yet moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AutoPostcopy {
    #[default]
    Off,
    Predict,
    Cautious,
}

impl AutoPostcopy {
    pub fn as_str(self) -> &'static str {
        match self {
            AutoPostcopy::Off => "off",
            AutoPostcopy::Predict => "predict",
            AutoPostcopy::Cautious => "cautious",
        }
    }

    /// Rounds in a row that must say "cannot converge" before the switch.
    pub fn rounds(self) -> u64 {
        match self {
            AutoPostcopy::Off => u64::MAX,
            AutoPostcopy::Predict => 1,
            AutoPostcopy::Cautious => 3,
        }
    }
}

/// How the hypervisor's record of guest writes is collected (`x-tern-dirty-log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// Every sync fetches the record and re-arms tracking of every page it names at once
    /// (KVM_GET_DIRTY_LOG on its own).
    Get,
    /// Manual protect: a sync only fetches the record; tracking of a page is re-armed just
    /// before the page is read to be sent (KVM_CLEAR_DIRTY_LOG, in chunks), so a sync costs a
    /// copy of the bitmap and re-arming follows the pages sent. Falls back to `Get` where the
    /// hypervisor lacks it.
    #[default]
    Clear,
    /// The VM was created with a dirty ring (`tern run --dirty-ring-size`): a sync harvests what
    /// the vCPUs pushed, a cost that follows the pages written, not the size of RAM. Not a value
    /// to ask for: a VM with a ring always uses it.
    Ring,
}

impl DirtyLogMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DirtyLogMode::Get => "get",
            DirtyLogMode::Clear => "clear",
            DirtyLogMode::Ring => "ring",
        }
    }
}

/// `multifd-compression` values tern has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MultifdCompression {
    #[default]
    None,
    Zstd,
    Lz4,
}

impl MultifdCompression {
    pub fn as_str(self) -> &'static str {
        match self {
            MultifdCompression::None => "none",
            MultifdCompression::Zstd => "zstd",
            MultifdCompression::Lz4 => "lz4",
        }
    }
}

impl MigrationParams {
    /// The compression the page senders use.
    pub fn compression(&self) -> tern_wire::Compression {
        match self.multifd_compression {
            MultifdCompression::None => tern_wire::Compression::None,
            MultifdCompression::Lz4 => tern_wire::Compression::Lz4,
            MultifdCompression::Zstd => {
                tern_wire::Compression::Zstd(i32::from(self.multifd_zstd_level))
            }
        }
    }
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            max_bandwidth: 0,
            downtime_limit_ms: 300,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            max_cpu_throttle: 99,
            cpu_throttle_tailslow: false,
            throttle_trigger_threshold: 50,
            max_rounds: 0,
            max_precopy_ms: 0,
            limit_action: LimitAction::Fail,
            switchover_fault: None,
            read_timeout_ms: 60_000,
            postcopy_timeout_ms: 10_000,
            multifd_channels: 2,
            multifd_compression: MultifdCompression::None,
            multifd_zstd_level: 1,
            dirty_log: DirtyLogMode::Clear,
            max_postcopy_bandwidth: 0,
            auto_postcopy: AutoPostcopy::Off,
            announce_initial_ms: 50,
            announce_max_ms: 550,
            announce_rounds: 5,
            announce_step_ms: 100,
            mode: MigrationMode::Normal,
        }
    }
}

/// Parameters QEMU has that tern does not implement yet (refused by name).
const NOT_YET: &[&str] = &[
    "xbzrle-cache-size",
    "avail-switchover-bandwidth",
    "compress-level",
];

fn int_in(k: &str, v: &Value, lo: u64, hi: u64) -> Result<u64, String> {
    match v.as_u64() {
        Some(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(format!(
            "Parameter '{k}' expects an integer in the range of {lo} to {hi}"
        )),
    }
}

impl MigrationParams {
    /// `query-migrate-parameters`, with QEMU's names (tern's own ones start with `x-tern-`).
    pub fn to_qmp(&self) -> Value {
        json!({
            "cpu-throttle-initial": self.cpu_throttle_initial,
            "cpu-throttle-increment": self.cpu_throttle_increment,
            "cpu-throttle-tailslow": self.cpu_throttle_tailslow,
            "max-cpu-throttle": self.max_cpu_throttle,
            "throttle-trigger-threshold": self.throttle_trigger_threshold,
            "downtime-limit": self.downtime_limit_ms,
            "max-bandwidth": self.max_bandwidth,
            "x-tern-max-rounds": self.max_rounds,
            "x-tern-max-precopy-time": self.max_precopy_ms,
            "x-tern-limit-action": self.limit_action.as_str(),
            "x-tern-switchover-fault": self.switchover_fault.map(|f| f.to_string()).unwrap_or_default(),
            "x-tern-read-timeout": self.read_timeout_ms,
            "x-tern-postcopy-timeout": self.postcopy_timeout_ms,
            "multifd-channels": self.multifd_channels,
            "multifd-compression": self.multifd_compression.as_str(),
            "multifd-zstd-level": self.multifd_zstd_level,
            "x-tern-dirty-log": self.dirty_log.as_str(),
            "max-postcopy-bandwidth": self.max_postcopy_bandwidth,
            "x-tern-auto-postcopy": self.auto_postcopy.as_str(),
            "announce-initial": self.announce_initial_ms,
            "announce-max": self.announce_max_ms,
            "announce-rounds": self.announce_rounds,
            "announce-step": self.announce_step_ms,
            "mode": self.mode.as_str(),
        })
    }

    /// Applies `migrate-set-parameters` arguments; all or nothing.
    pub fn apply(&mut self, args: &Map<String, Value>) -> Result<(), String> {
        let mut p = *self;
        for (k, v) in args {
            match k.as_str() {
                "downtime-limit" => p.downtime_limit_ms = int_in(k, v, 0, 2_000_000)?,
                "max-bandwidth" => p.max_bandwidth = int_in(k, v, 0, i64::MAX as u64)?,
                "max-postcopy-bandwidth" => {
                    p.max_postcopy_bandwidth = int_in(k, v, 0, i64::MAX as u64)?
                }
                "cpu-throttle-initial" => p.cpu_throttle_initial = int_in(k, v, 1, 99)? as u8,
                "cpu-throttle-increment" => p.cpu_throttle_increment = int_in(k, v, 1, 99)? as u8,
                "max-cpu-throttle" => p.max_cpu_throttle = int_in(k, v, 1, 99)? as u8,
                "throttle-trigger-threshold" => {
                    p.throttle_trigger_threshold = int_in(k, v, 1, 100)? as u8
                }
                "cpu-throttle-tailslow" => {
                    p.cpu_throttle_tailslow = v
                        .as_bool()
                        .ok_or_else(|| format!("Parameter '{k}' expects a boolean"))?
                }
                "x-tern-max-rounds" => p.max_rounds = int_in(k, v, 0, 1_000_000)?,
                "x-tern-max-precopy-time" => p.max_precopy_ms = int_in(k, v, 0, 86_400_000)?,
                "x-tern-limit-action" => {
                    p.limit_action = match v.as_str() {
                        Some("fail") => LimitAction::Fail,
                        Some("switchover") => LimitAction::Switchover,
                        _ => return Err(format!("Parameter '{k}' expects 'fail' or 'switchover'")),
                    }
                }
                "x-tern-read-timeout" => p.read_timeout_ms = int_in(k, v, 100, 86_400_000)?,
                "x-tern-postcopy-timeout" => p.postcopy_timeout_ms = int_in(k, v, 100, 86_400_000)?,
                "multifd-channels" => p.multifd_channels = int_in(k, v, 1, 255)? as u8,
                "multifd-compression" => {
                    p.multifd_compression = match v.as_str() {
                        Some("none") => MultifdCompression::None,
                        Some("zstd") => MultifdCompression::Zstd,
                        Some("lz4") => MultifdCompression::Lz4,
                        Some(other @ ("zlib" | "qpl" | "uadk" | "qatzip")) => {
                            return Err(format!(
                            "Parameter '{k}': {other} is not supported by tern (none, zstd, lz4)"
                        ))
                        }
                        _ => {
                            return Err(format!("Parameter '{k}' expects 'none', 'zstd' or 'lz4'"))
                        }
                    }
                }
                "multifd-zstd-level" => p.multifd_zstd_level = int_in(k, v, 0, 20)? as u8,
                // QEMU's bounds.
                "announce-initial" => p.announce_initial_ms = int_in(k, v, 0, 100_000)?,
                "announce-max" => p.announce_max_ms = int_in(k, v, 0, 100_000)?,
                "announce-rounds" => p.announce_rounds = int_in(k, v, 0, 1000)?,
                "announce-step" => p.announce_step_ms = int_in(k, v, 1, 10_000)?,
                "mode" => {
                    p.mode = match v.as_str() {
                        Some("normal") => MigrationMode::Normal,
                        Some("cpr-transfer") => MigrationMode::CprTransfer,
                        Some(other @ ("cpr-reboot" | "cpr-exec")) => {
                            return Err(format!(
                        "Parameter '{k}': {other} is not supported by tern (normal, cpr-transfer)"
                    ))
                        }
                        _ => {
                            return Err(format!(
                                "Parameter '{k}' expects 'normal' or 'cpr-transfer'"
                            ))
                        }
                    }
                }
                "x-tern-auto-postcopy" => {
                    p.auto_postcopy = match v.as_str() {
                        Some("off") => AutoPostcopy::Off,
                        Some("predict") => AutoPostcopy::Predict,
                        Some("cautious") => AutoPostcopy::Cautious,
                        _ => {
                            return Err(format!(
                                "Parameter '{k}' expects 'off', 'predict' or 'cautious'"
                            ))
                        }
                    }
                }
                "x-tern-dirty-log" => {
                    p.dirty_log = match v.as_str() {
                        Some("get") => DirtyLogMode::Get,
                        Some("clear") => DirtyLogMode::Clear,
                        _ => return Err(format!("Parameter '{k}' expects 'get' or 'clear'")),
                    }
                }
                "x-tern-switchover-fault" => {
                    p.switchover_fault = SwitchoverFault::parse(
                        v.as_str()
                            .ok_or_else(|| format!("Parameter '{k}' expects a string"))?,
                    )?
                }
                other if NOT_YET.contains(&other) => {
                    return Err(format!("Parameter '{other}' is not supported by tern yet"))
                }
                other => return Err(format!("Parameter '{other}' is unexpected")),
            }
        }
        if p.cpu_throttle_initial > p.max_cpu_throttle {
            return Err("cpu-throttle-initial must not exceed max-cpu-throttle".into());
        }
        *self = p;
        Ok(())
    }
}

/// Capabilities (`migrate-set-capabilities`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Emit MIGRATION and MIGRATION_PASS events (QEMU's `events`).
    pub events: bool,
    /// Throttle the vCPUs while the guest dirties faster than the link (QEMU's `auto-converge`).
    pub auto_converge: bool,
    /// Test aid (`x-tern-ram-digest`): both sides digest all guest RAM at the switch-over, the
    /// source while paused, the target after loading; `query-migrate` shows each.
    pub ram_digest: bool,
    /// RAM on parallel data channels (QEMU's `multifd`; `multifd-channels` of them).
    pub multifd: bool,
    /// `migrate-start-postcopy` may switch this migration to postcopy (QEMU's `postcopy-ram`).
    pub postcopy_ram: bool,
    /// Postcopy's requested pages on a connection of their own (QEMU's `postcopy-preempt`).
    pub postcopy_preempt: bool,
    /// The target measures how long vCPUs wait for pages (QEMU's `postcopy-blocktime`).
    pub postcopy_blocktime: bool,
}

impl Capabilities {
    /// Every capability tern knows, with its state.
    pub fn list(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("events", self.events),
            ("auto-converge", self.auto_converge),
            ("x-tern-ram-digest", self.ram_digest),
            ("multifd", self.multifd),
            ("postcopy-ram", self.postcopy_ram),
            ("postcopy-preempt", self.postcopy_preempt),
            ("postcopy-blocktime", self.postcopy_blocktime),
        ]
    }

    /// Sets one by name.
    pub fn set(&mut self, name: &str, on: bool) -> Result<(), String> {
        match name {
            "events" => self.events = on,
            "auto-converge" => self.auto_converge = on,
            "x-tern-ram-digest" => self.ram_digest = on,
            "multifd" => self.multifd = on,
            "postcopy-ram" => self.postcopy_ram = on,
            "postcopy-preempt" => self.postcopy_preempt = on,
            "postcopy-blocktime" => self.postcopy_blocktime = on,
            "xbzrle"
            | "return-path"
            | "pause-before-switchover"
            | "zero-copy-send"
            | "switchover-ack"
            | "dirty-limit"
            | "mapped-ram"
            | "background-snapshot"
            | "x-ignore-shared"
            | "validate-uuid"
            | "late-block-activate"
            | "dirty-bitmaps"
            | "release-ram"
            | "rdma-pin-all"
            | "zero-blocks"
            | "x-colo" => {
                if on {
                    return Err(format!("Capability '{name}' is not supported by tern yet"));
                }
            }
            _ => return Err(format!("Invalid parameter '{name}'")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_apply_all_or_nothing() {
        let mut p = MigrationParams::default();
        let args = json!({"downtime-limit": 50, "cpu-throttle-initial": 30, "x-tern-limit-action": "switchover"});
        p.apply(args.as_object().unwrap()).unwrap();
        assert_eq!(p.downtime_limit_ms, 50);
        assert_eq!(p.cpu_throttle_initial, 30);
        assert_eq!(p.limit_action, LimitAction::Switchover);
        for f in [
            "before-loaded:cut",
            "before-go:hold:1500",
            "before-running:cut",
        ] {
            p.apply(json!({"x-tern-switchover-fault": f}).as_object().unwrap())
                .unwrap();
            assert_eq!(p.switchover_fault.unwrap().to_string(), f);
        }
        p.apply(json!({"x-tern-switchover-fault": ""}).as_object().unwrap())
            .unwrap();
        assert_eq!(p.switchover_fault, None);
        let before = p;
        for bad in [
            json!({"downtime-limit": 10, "max-cpu-throttle": 100}),
            json!({"cpu-throttle-initial": 0}),
            json!({"x-tern-limit-action": "maybe"}),
            json!({"downtime-limit": -1}),
            json!({"cpu-throttle-tailslow": 1}),
            json!({"multifd-channels": 0}),
            json!({"multifd-compression": "zlib"}),
            json!({"multifd-compression": 1}),
            json!({"multifd-zstd-level": 21}),
            json!({"nonsense": 4}),
            json!({"x-tern-switchover-fault": "before-go:explode"}),
            json!({"x-tern-switchover-fault": "later:cut"}),
            json!({"x-tern-switchover-fault": "before-go:hold:x"}),
            json!({"cpu-throttle-initial": 90, "max-cpu-throttle": 80}),
        ] {
            assert!(p.apply(bad.as_object().unwrap()).is_err(), "{bad}");
            assert_eq!(p, before);
        }
    }
}
