//! The human monitor: QEMU's HMP commands for migration, typed through `socat - unix:PATH`
//! (`--hmp`) or sent as QMP `human-monitor-command`. Each command is carried out through the
//! same QMP backend, so both monitors behave alike.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tern_qmp::{Backend, Command};

use crate::backend::RunBackend;
use crate::size::parse_size;

/// Longest accepted command line.
const MAX_LINE: u64 = 64 << 10;
/// Human monitor sessions served at once; one more is refused.
const MAX_CLIENTS: usize = 32;

const PROMPT: &str = "(qemu) ";

const HELP: &str = "\
calc_dirty_rate [-b] second -- start measuring the guest's dirty rate (mode dirty-bitmap)
cont|c -- resume emulation
help|? [cmd] -- show the help
info dirty_rate -- show the last dirty rate measurement
info migrate -- show migration status
info migrate_capabilities -- show current migration capabilities
info migrate_parameters -- show current migration parameters
info status -- show the current VM status (running|paused)
migrate [-d] [-r] uri -- migrate to URI (tcp:HOST:PORT, unix:PATH, fd:NAME, exec:CMD, file:PATH)
\t -d to return at once rather than wait for the end
\t -r to resume a paused postcopy migration through URI
migrate_cancel -- cancel the current VM migration
migrate_start_postcopy -- switch the running migration to postcopy
migrate_pause -- pause a postcopy migration (as if its link broke)
announce_self [net0,...] -- send RARPs and ask the guest to announce itself (announce-* schedule)
migrate_recover uri -- on the target: take a paused postcopy migration's source back on URI
migrate_incoming uri -- continue an incoming migration from URI
migrate_set_capability capability state -- enable or disable a capability (on|off)
migrate_set_parameter parameter value -- set a migration parameter
quit|q -- quit the emulator
stop|s -- stop emulation
";

/// Serves the human monitor on `listener` (bound at `path`); each client gets a banner, a prompt
/// per command, and plain-text replies.
pub fn serve(
    listener: std::os::unix::net::UnixListener,
    path: &Path,
    backend: Arc<RunBackend>,
) -> std::io::Result<()> {
    let what = format!("HMP on {}", path.display());
    std::thread::Builder::new()
        .name("hmp-accept".into())
        .spawn(move || {
            let slots = tern_qmp::listen::Slots::new(MAX_CLIENTS);
            let refusal = format!("Error: too many monitor clients (at most {MAX_CLIENTS})\r\n");
            tern_qmp::listen::accept_loop(
                listener,
                &what,
                &slots,
                refusal.as_bytes(),
                |stream, slot| {
                    let backend = backend.clone();
                    let _ =
                        std::thread::Builder::new()
                            .name("hmp-client".into())
                            .spawn(move || {
                                if let Err(e) = session(stream, &backend) {
                                    tracing::debug!("HMP session ended: {e}");
                                }
                                drop(slot);
                            });
                },
            );
        })?;
    Ok(())
}

fn session(stream: std::os::unix::net::UnixStream, backend: &RunBackend) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    write!(
        out,
        "tern {} monitor (QEMU HMP commands) - type 'help' for more information\r\n{PROMPT}",
        env!("CARGO_PKG_VERSION")
    )?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.len() as u64 > MAX_LINE {
            // The rest of that line goes unread into nothing: memory stays bounded and the
            // session carries on with the next line.
            skip_line(&mut reader)?;
            write!(
                out,
                "Error: the command line is longer than {MAX_LINE} bytes\r\n{PROMPT}"
            )?;
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let (reply, quit) = execute(backend, text.trim());
        for l in reply.lines() {
            write!(out, "{l}\r\n")?;
        }
        if quit {
            out.flush()?;
            backend.quit();
            return Ok(());
        }
        write!(out, "{PROMPT}")?;
    }
}

/// Consumes input up to and including the next newline (or the end), keeping none of it.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

/// Runs one command line; returns its output and whether it was `quit`.
pub fn execute(backend: &RunBackend, line: &str) -> (String, bool) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&cmd, rest)) = words.split_first() else {
        return (String::new(), false);
    };
    let result = match cmd {
        "help" | "?" => Ok(HELP.to_string()),
        "quit" | "q" => return (String::new(), true),
        "stop" | "s" => qmp(backend, "stop", json!({})).map(|_| String::new()),
        "cont" | "c" => qmp(backend, "cont", json!({})).map(|_| String::new()),
        "info" => info(backend, rest),
        "migrate" => migrate(backend, rest),
        "migrate_incoming" => match rest {
            [uri] => qmp(backend, "migrate-incoming", json!({"uri": uri})).map(|_| String::new()),
            _ => Err("usage: migrate_incoming URI".into()),
        },
        "migrate_cancel" => qmp(backend, "migrate_cancel", json!({})).map(|_| String::new()),
        "migrate_start_postcopy" => {
            qmp(backend, "migrate-start-postcopy", json!({})).map(|_| String::new())
        }
        "migrate_pause" => qmp(backend, "migrate-pause", json!({})).map(|_| String::new()),
        "announce_self" => match rest {
            [] => qmp(backend, "announce-self", json!({})).map(|_| String::new()),
            [names] => qmp(
                backend,
                "announce-self",
                json!({"interfaces": names.split(',').collect::<Vec<_>>()}),
            )
            .map(|_| String::new()),
            _ => Err("usage: announce_self [net0,net1,...]".into()),
        },
        "migrate_recover" => match rest {
            [uri] => qmp(backend, "migrate-recover", json!({"uri": uri})).map(|_| String::new()),
            _ => Err("usage: migrate_recover URI".into()),
        },
        "migrate_set_capability" => match rest {
            [name, state] => match *state {
                "on" | "off" => qmp(
                    backend,
                    "migrate-set-capabilities",
                    json!({"capabilities": [{"capability": name, "state": *state == "on"}]}),
                )
                .map(|_| String::new()),
                other => Err(format!("'{other}' is not a state: use on or off")),
            },
            _ => Err("usage: migrate_set_capability CAPABILITY on|off".into()),
        },
        "calc_dirty_rate" => {
            let secs = match rest {
                ["-b", s] | [s] => s.parse::<i64>().ok(),
                _ => None,
            };
            match (secs, rest.first()) {
                (_, Some(&"-r")) => {
                    Err("tern measures in mode dirty-bitmap (-b), not dirty-ring".into())
                }
                (Some(s), _) => qmp(
                    backend,
                    "calc-dirty-rate",
                    json!({"calc-time": s, "mode": "dirty-bitmap"}),
                )
                .map(|_| String::new()),
                (None, _) => Err("usage: calc_dirty_rate [-b] SECONDS".into()),
            }
        }
        "migrate_set_parameter" => match rest {
            [name, value] => set_parameter(backend, name, value),
            _ => Err("usage: migrate_set_parameter PARAMETER VALUE".into()),
        },
        other => Err(format!("unknown command: '{other}' (try 'help')")),
    };
    match result {
        Ok(s) => (s, false),
        Err(e) => (format!("Error: {e}\n"), false),
    }
}

fn qmp(backend: &RunBackend, cmd: &str, args: Value) -> Result<Value, String> {
    let empty = Map::new();
    let args = args.as_object().unwrap_or(&empty);
    Command::parse(cmd, args)
        .and_then(|c| backend.execute(c))
        .map_err(|e| e.desc)
}

fn info(backend: &RunBackend, rest: &[&str]) -> Result<String, String> {
    match rest {
        ["status"] => {
            let s = qmp(backend, "query-status", json!({}))?;
            let status = s["status"].as_str().unwrap_or("unknown");
            Ok(if status == "running" {
                "VM status: running\n".into()
            } else if status == "paused" {
                "VM status: paused\n".into()
            } else {
                format!("VM status: paused ({status})\n")
            })
        }
        ["migrate"] => Ok(format_migrate(&qmp(backend, "query-migrate", json!({}))?)),
        ["dirty_rate"] => {
            let d = qmp(backend, "query-dirty-rate", json!({}))?;
            let mut out = format!(
                "Status: {}\nStart Time: {} (s)\nPeriod: {} (sec)\nMode: {}\n",
                d["status"].as_str().unwrap_or("?"),
                d["start-time"],
                d["calc-time"],
                d["mode"].as_str().unwrap_or("?")
            );
            out.push_str(&match d["dirty-rate"].as_i64() {
                Some(r) => format!("Dirty rate: {r} (MB/s)\n"),
                None => "Dirty rate: (not ready)\n".into(),
            });
            Ok(out)
        }
        ["migrate_parameters"] => {
            let p = qmp(backend, "query-migrate-parameters", json!({}))?;
            let mut out = String::new();
            for (k, v) in p.as_object().into_iter().flatten() {
                let v = match v {
                    Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let unit = match k.as_str() {
                    "downtime-limit" | "x-tern-max-precopy-time" => " ms",
                    "max-bandwidth" => " bytes/second",
                    "cpu-throttle-initial"
                    | "cpu-throttle-increment"
                    | "max-cpu-throttle"
                    | "throttle-trigger-threshold" => "%",
                    _ => "",
                };
                out.push_str(&format!("{k}: {v}{unit}\n"));
            }
            Ok(out)
        }
        ["migrate_capabilities"] => {
            let c = qmp(backend, "query-migrate-capabilities", json!({}))?;
            let mut out = String::new();
            for item in c.as_array().into_iter().flatten() {
                let on = item["state"].as_bool().unwrap_or(false);
                out.push_str(&format!(
                    "{}: {}\n",
                    item["capability"].as_str().unwrap_or("?"),
                    if on { "on" } else { "off" }
                ));
            }
            Ok(out)
        }
        [] => Err(
            "usage: info status|migrate|migrate_parameters|migrate_capabilities|dirty_rate".into(),
        ),
        [what, ..] => Err(format!(
            "'info {what}' is not known here (status, migrate, migrate_parameters, migrate_capabilities, dirty_rate)"
        )),
    }
}

/// `info migrate`, in the words QEMU's monitor uses.
fn format_migrate(m: &Value) -> String {
    let Some(status) = m["status"].as_str() else {
        return "No migration has been started\n".into();
    };
    let mut out = format!("Migration status: {status}\n");
    let ms = |k: &str| m[k].as_u64();
    if let Some(t) = ms("total-time") {
        out.push_str(&format!("total time: {t} ms\n"));
    }
    if let Some(t) = ms("expected-downtime") {
        out.push_str(&format!("expected downtime: {t} ms\n"));
    }
    if let Some(t) = ms("downtime") {
        out.push_str(&format!("downtime: {t} ms\n"));
    }
    if let Some(t) = ms("setup-time") {
        out.push_str(&format!("setup: {t} ms\n"));
    }
    let ram = &m["ram"];
    if ram.is_object() {
        let kb = |k: &str| ram[k].as_u64().unwrap_or(0) >> 10;
        let n = |k: &str| ram[k].as_u64().unwrap_or(0);
        out.push_str(&format!("transferred ram: {} kbytes\n", kb("transferred")));
        out.push_str(&format!(
            "throughput: {:.2} mbps\n",
            ram["mbps"].as_f64().unwrap_or(0.0)
        ));
        out.push_str(&format!("remaining ram: {} kbytes\n", kb("remaining")));
        out.push_str(&format!("total ram: {} kbytes\n", kb("total")));
        out.push_str(&format!("duplicate: {} pages\n", n("duplicate")));
        out.push_str(&format!("normal: {} pages\n", n("normal")));
        out.push_str(&format!("normal bytes: {} kbytes\n", kb("normal-bytes")));
        out.push_str(&format!("dirty sync count: {}\n", n("dirty-sync-count")));
        out.push_str("page size: 4 kbytes\n");
        out.push_str(&format!("pages-per-second: {}\n", n("pages-per-second")));
        out.push_str(&format!(
            "dirty pages rate: {} pages\n",
            n("dirty-pages-rate")
        ));
        out.push_str(&format!("precopy ram: {} kbytes\n", kb("precopy-bytes")));
        out.push_str(&format!("downtime ram: {} kbytes\n", kb("downtime-bytes")));
    }
    if let Some(p) = ms("cpu-throttle-percentage") {
        out.push_str(&format!("cpu throttle percentage: {p}\n"));
    }
    if let Some(e) = m["error-desc"].as_str() {
        out.push_str(&format!("error description: {e}\n"));
    }
    out
}

fn migrate(backend: &RunBackend, rest: &[&str]) -> Result<String, String> {
    let (detach, uri) = match rest {
        ["-d", uri] => (true, *uri),
        // A resume returns at once: the migration it continues was started before.
        ["-r", uri] | ["-d", "-r", uri] | ["-r", "-d", uri] => {
            qmp(backend, "migrate", json!({"uri": uri, "resume": true}))?;
            return Ok(String::new());
        }
        [uri] if !uri.starts_with('-') => (false, *uri),
        _ => return Err("usage: migrate [-d] [-r] URI".into()),
    };
    qmp(backend, "migrate", json!({"uri": uri}))?;
    if detach {
        return Ok(String::new());
    }
    // Without -d the monitor waits for the end, as QEMU's does.
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let m = qmp(backend, "query-migrate", json!({}))?;
        match m["status"].as_str() {
            Some("completed") => {
                return Ok(format!(
                    "migration completed: {} ms in total, {} ms of downtime, {} kbytes sent\n",
                    m["total-time"].as_u64().unwrap_or(0),
                    m["downtime"].as_u64().unwrap_or(0),
                    m["ram"]["transferred"].as_u64().unwrap_or(0) >> 10
                ))
            }
            Some("failed") => {
                return Err(format!(
                    "migration failed: {}",
                    m["error-desc"].as_str().unwrap_or("no reason given")
                ))
            }
            Some("cancelled") => return Err("migration cancelled".into()),
            _ => {}
        }
    }
}

fn set_parameter(backend: &RunBackend, name: &str, value: &str) -> Result<String, String> {
    let v: Value = match name {
        // As in QEMU's monitor: a size, a bare number being MiB (per second).
        "max-bandwidth" => json!(parse_size(value)?),
        "cpu-throttle-tailslow" => match value {
            "on" => json!(true),
            "off" => json!(false),
            other => return Err(format!("'{other}' is not a state: use on or off")),
        },
        "x-tern-limit-action"
        | "x-tern-timeline"
        | "multifd-compression"
        | "mode"
        | "tls-creds"
        | "tls-hostname"
        | "tls-authz"
        | "x-tern-auto-postcopy"
        | "x-tern-dirty-log" => json!(value),
        _ => json!(value
            .parse::<u64>()
            .map_err(|_| format!("'{value}' is not a number for {name}"))?),
    };
    let mut args = Map::new();
    args.insert(name.to_string(), v);
    qmp(backend, "migrate-set-parameters", Value::Object(args)).map(|_| String::new())
}
