//! Migration parameters and capabilities, with QEMU's names.

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
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            max_bandwidth: 0,
            downtime_limit_ms: 300,
        }
    }
}

/// Capabilities (`migrate-set-capabilities`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Emit MIGRATION and MIGRATION_PASS events (QEMU's `events`).
    pub events: bool,
    /// Test aid (`x-tern-ram-digest`): both sides digest all guest RAM at the switch-over, the
    /// source while paused, the target after loading; `query-migrate` shows each.
    pub ram_digest: bool,
}

impl Capabilities {
    /// Every capability tern knows, with its state, in QEMU's order of names.
    pub fn list(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("events", self.events),
            ("x-tern-ram-digest", self.ram_digest),
        ]
    }

    /// Sets one by name.
    pub fn set(&mut self, name: &str, on: bool) -> Result<(), String> {
        match name {
            "events" => self.events = on,
            "x-tern-ram-digest" => self.ram_digest = on,
            "auto-converge"
            | "postcopy-ram"
            | "multifd"
            | "xbzrle"
            | "return-path"
            | "pause-before-switchover"
            | "zero-copy-send"
            | "postcopy-preempt"
            | "switchover-ack"
            | "dirty-limit"
            | "mapped-ram"
            | "background-snapshot"
            | "x-ignore-shared"
            | "validate-uuid"
            | "late-block-activate"
            | "dirty-bitmaps"
            | "postcopy-blocktime"
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
