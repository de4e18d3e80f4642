//! The commands, typed: a QMP `execute` and its `arguments` become one [`Command`] at the edge
//! (serde), with QEMU's wording for what is missing, unexpected or of the wrong type; the VMM
//! matches on the enum and never on strings.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::QmpError;

/// One `{"capability": ..., "state": ...}` of `migrate-set-capabilities`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityState {
    pub capability: String,
    pub state: bool,
}

/// Every command the VMM answers (`qmp_capabilities`, `getfd` and `closefd` are the session's
/// own and never reach it).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "execute", content = "arguments", deny_unknown_fields)]
pub enum Command {
    #[serde(rename = "query-status")]
    QueryStatus {},
    #[serde(rename = "stop")]
    Stop {},
    #[serde(rename = "cont")]
    Cont {},
    #[serde(rename = "quit")]
    Quit {},
    #[serde(rename = "migrate")]
    Migrate {
        uri: String,
        /// Accepted and ignored: QMP's `migrate` always returns at once.
        #[serde(default)]
        detach: Option<bool>,
        /// Postcopy recovery: reconnect a paused migration through `uri`.
        #[serde(default)]
        resume: Option<bool>,
        /// QEMU's old block migration flags: `blk` copies the disks that are neither shared nor
        /// read-only (the default, except into a file), false leaves them; `inc` is refused.
        #[serde(default)]
        blk: Option<bool>,
        #[serde(default)]
        inc: Option<bool>,
    },
    #[serde(rename = "migrate_cancel")]
    MigrateCancel {},
    #[serde(rename = "migrate-start-postcopy")]
    MigrateStartPostcopy {},
    /// Postcopy: pause as if the link had broken.
    #[serde(rename = "migrate-pause")]
    MigratePause {},
    /// Postcopy recovery, on the target: listen on `uri` for the paused source.
    #[serde(rename = "migrate-recover")]
    MigrateRecover { uri: String },
    #[serde(rename = "migrate-incoming")]
    MigrateIncoming { uri: String },
    #[serde(rename = "query-migrate")]
    QueryMigrate {},
    #[serde(rename = "query-migrate-parameters")]
    QueryMigrateParameters {},
    /// Checked all or nothing by the migration manager, which knows every parameter.
    #[serde(rename = "migrate-set-parameters")]
    MigrateSetParameters(Map<String, Value>),
    #[serde(rename = "query-migrate-capabilities")]
    QueryMigrateCapabilities {},
    #[serde(rename = "migrate-set-capabilities")]
    MigrateSetCapabilities { capabilities: Vec<CapabilityState> },
    #[serde(rename = "query-version")]
    QueryVersion {},
    #[serde(rename = "query-commands")]
    QueryCommands {},
    #[serde(rename = "human-monitor-command")]
    HumanMonitorCommand {
        #[serde(rename = "command-line")]
        command_line: String,
        #[serde(rename = "cpu-index", default)]
        cpu_index: Option<i64>,
    },
    #[serde(rename = "calc-dirty-rate")]
    CalcDirtyRate {
        #[serde(rename = "calc-time")]
        calc_time: i64,
        #[serde(rename = "calc-time-unit", default)]
        calc_time_unit: Option<String>,
        /// For QEMU's page-sampling mode, which tern does not have.
        #[serde(rename = "sample-pages", default)]
        sample_pages: Option<u64>,
        #[serde(default)]
        mode: Option<String>,
    },
    #[serde(rename = "query-dirty-rate")]
    QueryDirtyRate {
        #[serde(rename = "calc-time-unit", default)]
        calc_time_unit: Option<String>,
    },
    /// Saves `size` bytes of guest-physical memory from `val` into `filename` (QEMU's).
    #[serde(rename = "pmemsave")]
    Pmemsave {
        val: u64,
        size: u64,
        filename: String,
    },
    /// Announces the NICs now (QEMU's): RARP frames and the guest's own announce, on QEMU's
    /// schedule; a parameter left out takes the migration parameter's value.
    #[serde(rename = "announce-self")]
    AnnounceSelf {
        #[serde(default)]
        initial: Option<u64>,
        #[serde(default)]
        max: Option<u64>,
        #[serde(default)]
        rounds: Option<u64>,
        #[serde(default)]
        step: Option<u64>,
        #[serde(default)]
        interfaces: Option<Vec<String>>,
        #[serde(default)]
        id: Option<String>,
    },
    /// Makes an object (QEMU's; tern knows `tls-creds-x509`): the arguments as given.
    #[serde(rename = "object-add")]
    ObjectAdd(Map<String, Value>),
    #[serde(rename = "object-del")]
    ObjectDel { id: String },
    /// Each NIC's counters (frames, bytes, drops, announces).
    #[serde(rename = "x-tern-query-nics")]
    XTernQueryNics {},
    /// Test aid: writes a u64 into guest RAM.
    #[serde(rename = "x-tern-write-guest-memory")]
    XTernWriteGuestMemory { addr: u64, value: u64 },
}

/// Every command name, for `query-commands` (the session's own included).
pub const COMMAND_NAMES: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "stop",
    "cont",
    "quit",
    "migrate",
    "migrate_cancel",
    "migrate-start-postcopy",
    "migrate-pause",
    "migrate-recover",
    "migrate-incoming",
    "query-migrate",
    "query-migrate-parameters",
    "migrate-set-parameters",
    "query-migrate-capabilities",
    "migrate-set-capabilities",
    "query-version",
    "query-commands",
    "human-monitor-command",
    "calc-dirty-rate",
    "query-dirty-rate",
    "pmemsave",
    "announce-self",
    "x-tern-query-nics",
    "object-add",
    "object-del",
    "getfd",
    "closefd",
];

/// The text between the first pair of backquotes of a serde message.
fn quoted(msg: &str) -> Option<&str> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(&msg[start..start + len])
}

impl Command {
    /// Parses `execute` with its `arguments`.
    pub fn parse(name: &str, args: &Map<String, Value>) -> Result<Command, QmpError> {
        if !COMMAND_NAMES.contains(&name) && name != "x-tern-write-guest-memory" {
            return Err(QmpError::not_found(name));
        }
        let v = serde_json::json!({"execute": name, "arguments": args});
        serde_json::from_value(v).map_err(|e| {
            let msg = e.to_string();
            let field = quoted(&msg).unwrap_or("?");
            QmpError::generic(if msg.starts_with("unknown field") {
                format!("Parameter '{field}' is unexpected")
            } else if msg.starts_with("missing field") {
                format!("Parameter '{field}' is missing")
            } else if let Some((_, expected)) = msg.split_once(", expected ") {
                format!("Invalid parameter type, expected: {expected}")
            } else {
                format!("Invalid arguments: {msg}")
            })
        })
    }

    /// The QMP name.
    pub fn name(&self) -> &'static str {
        match self {
            Command::QueryStatus {} => "query-status",
            Command::Stop {} => "stop",
            Command::Cont {} => "cont",
            Command::Quit {} => "quit",
            Command::Migrate { .. } => "migrate",
            Command::MigrateCancel {} => "migrate_cancel",
            Command::MigrateStartPostcopy {} => "migrate-start-postcopy",
            Command::MigratePause {} => "migrate-pause",
            Command::MigrateRecover { .. } => "migrate-recover",
            Command::MigrateIncoming { .. } => "migrate-incoming",
            Command::QueryMigrate {} => "query-migrate",
            Command::QueryMigrateParameters {} => "query-migrate-parameters",
            Command::MigrateSetParameters(_) => "migrate-set-parameters",
            Command::QueryMigrateCapabilities {} => "query-migrate-capabilities",
            Command::MigrateSetCapabilities { .. } => "migrate-set-capabilities",
            Command::QueryVersion {} => "query-version",
            Command::QueryCommands {} => "query-commands",
            Command::HumanMonitorCommand { .. } => "human-monitor-command",
            Command::CalcDirtyRate { .. } => "calc-dirty-rate",
            Command::QueryDirtyRate { .. } => "query-dirty-rate",
            Command::Pmemsave { .. } => "pmemsave",
            Command::AnnounceSelf { .. } => "announce-self",
            Command::ObjectAdd(_) => "object-add",
            Command::ObjectDel { .. } => "object-del",
            Command::XTernQueryNics {} => "x-tern-query-nics",
            Command::XTernWriteGuestMemory { .. } => "x-tern-write-guest-memory",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(name: &str, args: Value) -> Result<Command, String> {
        Command::parse(name, args.as_object().unwrap()).map_err(|e| e.desc)
    }

    #[test]
    fn commands_parse_with_qemus_errors() {
        assert_eq!(parse("stop", json!({})), Ok(Command::Stop {}));
        assert_eq!(
            parse("migrate", json!({"uri": "tcp:h:1", "detach": true})),
            Ok(Command::Migrate {
                uri: "tcp:h:1".into(),
                detach: Some(true),
                resume: None,
                blk: None,
                inc: None
            })
        );
        assert_eq!(
            parse("stop", json!({"x": 1})).unwrap_err(),
            "Parameter 'x' is unexpected"
        );
        assert_eq!(
            parse("migrate", json!({})).unwrap_err(),
            "Parameter 'uri' is missing"
        );
        assert!(parse("migrate", json!({"uri": 5}))
            .unwrap_err()
            .starts_with("Invalid parameter type, expected: a string"));
        assert_eq!(
            parse("nope", json!({})).unwrap_err(),
            "The command nope has not been found"
        );
        assert_eq!(
            parse(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "events", "state": true}]})
            ),
            Ok(Command::MigrateSetCapabilities {
                capabilities: vec![CapabilityState {
                    capability: "events".into(),
                    state: true
                }]
            })
        );
        assert_eq!(
            parse(
                "human-monitor-command",
                json!({"command-line": "info status"})
            ),
            Ok(Command::HumanMonitorCommand {
                command_line: "info status".into(),
                cpu_index: None
            })
        );
        assert!(parse("x-tern-write-guest-memory", json!({"addr": -1, "value": 0})).is_err());
        // Every name parses to itself.
        for n in COMMAND_NAMES {
            if let Ok(c) = Command::parse(n, &Map::new()) {
                assert_eq!(c.name(), *n);
            }
        }
    }
}
