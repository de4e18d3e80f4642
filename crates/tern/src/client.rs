//! A small QMP client for the commands that drive a running tern (`tern migrate`, `tern save`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Longest reply line accepted from the server.
const MAX_LINE: u64 = 16 << 20;

pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<QmpClient> {
        let s = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to the QMP socket {}", path.display()))?;
        let mut c = QmpClient {
            writer: s.try_clone().context("cannot clone the QMP socket")?,
            reader: BufReader::new(s),
        };
        let greeting = c.read()?;
        if greeting.get("QMP").is_none() {
            bail!("{} did not greet like a QMP server", path.display());
        }
        c.execute("qmp_capabilities", json!({}))
            .context("QMP negotiation")?;
        Ok(c)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .context("reading from the QMP socket")?;
        if n == 0 {
            bail!("the QMP server closed the connection");
        }
        serde_json::from_slice(&line).context("the QMP server sent something that is not JSON")
    }

    /// Runs a command; a QMP error becomes an error with its description. Events are skipped.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let mut req = json!({"execute": cmd});
        if args.as_object().is_some_and(|m| !m.is_empty()) {
            req["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&req)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .context("writing to the QMP socket")?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!(
                    "{}",
                    e.get("desc").and_then(Value::as_str).unwrap_or("QMP error")
                );
            }
        }
    }
}
