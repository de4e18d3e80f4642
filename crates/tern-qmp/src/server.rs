//! The QMP server: sockets, sessions, negotiation, replies and events.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::time::{SystemTime, UNIX_EPOCH};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use serde_json::{json, Map, Value};

use crate::commands::Command;
use crate::format::to_qemu_json;

/// Longest accepted input line; a longer one closes the session.
pub const MAX_LINE: usize = 1 << 20;

/// A QMP error: QEMU's error class and a human description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
    /// A `CommandNotFound` for `name`.
    pub fn not_found(name: &str) -> Self {
        QmpError {
            class: "CommandNotFound",
            desc: format!("The command {name} has not been found"),
        }
    }
}

/// What the VMM does with commands.
pub trait Backend: Send + Sync + 'static {
    /// Runs one command (never `qmp_capabilities`, `getfd` or `closefd`, which the session
    /// answers).
    fn execute(&self, command: Command) -> Result<Value, QmpError>;
    /// Called after the reply to a successful `quit` has been written.
    fn quit(&self);
}

struct Client {
    out: Mutex<UnixStream>,
    negotiated: Mutex<bool>,
    /// Descriptors that came with the input (SCM_RIGHTS), for the next `getfd`.
    received: Arc<Mutex<Vec<File>>>,
}

/// Reads a QMP session's bytes and keeps any descriptor passed along with them.
struct FdReader {
    stream: UnixStream,
    received: Arc<Mutex<Vec<File>>>,
}

/// At most this many passed descriptors wait for a `getfd`; more are closed.
const MAX_PENDING_FDS: usize = 16;

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (n, fd) = self
            .stream
            .recv_with_fd(buf)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if let Some(f) = fd {
            // recvmsg gave it without close-on-exec; a duplicate has it (F_DUPFD_CLOEXEC), so
            // that a later `exec:` migration's command does not inherit the descriptor.
            let f = f.try_clone()?;
            let mut r = self.received.lock().unwrap_or_else(|e| e.into_inner());
            if r.len() < MAX_PENDING_FDS {
                r.push(f);
            }
        }
        Ok(n)
    }
}

impl Client {
    fn send(&self, v: &Value) -> io::Result<()> {
        let mut line = to_qemu_json(v);
        line.push_str("\r\n");
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.write_all(line.as_bytes())
    }
}

/// A listening QMP socket and its sessions.
pub struct Server {
    path: PathBuf,
    clients: Mutex<Vec<Arc<Client>>>,
    version: (u32, u32, u32),
    /// Descriptors named by `getfd`, shared by all sessions.
    fds: Mutex<HashMap<String, OwnedFd>>,
}

impl Server {
    /// A server for the socket at `path` (bound with [`crate::listen::bind_private`], then
    /// handed to [`Server::serve`]).
    pub fn new(path: &Path) -> Arc<Server> {
        Arc::new(Server {
            path: path.to_path_buf(),
            clients: Mutex::new(Vec::new()),
            version: (10, 0, 0),
            fds: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts clients on a background thread, each served on its own thread.
    pub fn serve(
        self: &Arc<Self>,
        listener: UnixListener,
        backend: Arc<dyn Backend>,
    ) -> io::Result<()> {
        let server = self.clone();
        std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || {
                let what = format!("QMP on {}", server.path.display());
                crate::listen::accept_loop(listener, &what, |stream| {
                    let (server, backend) = (server.clone(), backend.clone());
                    let _ =
                        std::thread::Builder::new()
                            .name("qmp-client".into())
                            .spawn(move || {
                                if let Err(e) = server.session(stream, &*backend) {
                                    tracing::debug!("QMP session ended: {e}");
                                }
                            });
                });
            })?;
        Ok(())
    }

    /// Sends an event to every negotiated client.
    pub fn emit(&self, event: &str, data: Option<Value>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut v = json!({
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
            "event": event,
        });
        if let Some(d) = data {
            v["data"] = d;
        }
        let clients = self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for c in clients {
            if *c.negotiated.lock().unwrap_or_else(|e| e.into_inner()) {
                let _ = c.send(&v);
            }
        }
    }

    fn session(&self, stream: UnixStream, backend: &dyn Backend) -> io::Result<()> {
        let client = Arc::new(Client {
            out: Mutex::new(stream.try_clone()?),
            negotiated: Mutex::new(false),
            received: Arc::new(Mutex::new(Vec::new())),
        });
        let (major, minor, micro) = self.version;
        client.send(&json!({"QMP": {
            "version": {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": ""},
            "capabilities": ["oob"]}}))?;
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(client.clone());
        let result = self.read_loop(stream, &client, backend);
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| !Arc::ptr_eq(c, &client));
        result
    }

    fn read_loop(
        &self,
        stream: UnixStream,
        client: &Client,
        backend: &dyn Backend,
    ) -> io::Result<()> {
        let mut reader = BufReader::new(FdReader {
            stream,
            received: client.received.clone(),
        });
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)?;
            if n == 0 {
                return Ok(());
            }
            if line.len() > MAX_LINE {
                client.send(&json!({"error": {"class": "GenericError",
                    "desc": format!("QMP input exceeds {MAX_LINE} bytes")}}))?;
                return Ok(());
            }
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            let (reply, quit) = self.handle(text.trim(), client, backend);
            client.send(&reply)?;
            if quit {
                backend.quit();
            }
        }
    }

    /// Handles one input line; returns the reply and whether it was a successful `quit`.
    fn handle(&self, text: &str, client: &Client, backend: &dyn Backend) -> (Value, bool) {
        let input: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                return (
                    error_reply(None, QmpError::generic(format!("JSON parse error, {e}"))),
                    false,
                )
            }
        };
        let Value::Object(obj) = input else {
            return (
                error_reply(None, QmpError::generic("QMP input must be a JSON object")),
                false,
            );
        };
        let id = obj.get("id").cloned();
        let cmd = match (obj.get("execute"), obj.get("exec-oob")) {
            (Some(Value::String(c)), None) | (None, Some(Value::String(c))) => c.clone(),
            (Some(_), Some(_)) => {
                return (
                    error_reply(
                        id,
                        QmpError::generic("QMP input must not have both 'execute' and 'exec-oob'"),
                    ),
                    false,
                )
            }
            (None, None) => {
                return (
                    error_reply(id, QmpError::generic("QMP input lacks member 'execute'")),
                    false,
                )
            }
            _ => {
                return (
                    error_reply(
                        id,
                        QmpError::generic("QMP input member 'execute' must be a string"),
                    ),
                    false,
                )
            }
        };
        for key in obj.keys() {
            if !matches!(
                key.as_str(),
                "execute" | "exec-oob" | "arguments" | "id" | "control"
            ) {
                return (
                    error_reply(
                        id,
                        QmpError::generic(format!("QMP input member '{key}' is unexpected")),
                    ),
                    false,
                );
            }
        }
        let empty = Map::new();
        let args = match obj.get("arguments") {
            None => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => {
                return (
                    error_reply(
                        id,
                        QmpError::generic("QMP input member 'arguments' must be an object"),
                    ),
                    false,
                )
            }
        };
        let mut negotiated = client.negotiated.lock().unwrap_or_else(|e| e.into_inner());
        if cmd == "qmp_capabilities" {
            if *negotiated {
                return (
                    error_reply(
                        id,
                        QmpError {
                            class: "CommandNotFound",
                            desc: "Capabilities negotiation is already complete, command ignored"
                                .into(),
                        },
                    ),
                    false,
                );
            }
            if let Some(caps) = args.get("enable") {
                let ok = caps
                    .as_array()
                    .is_some_and(|a| a.iter().all(|c| c == "oob"));
                if !ok {
                    return (
                        error_reply(
                            id,
                            QmpError::generic("Capability negotiation supports only 'oob'"),
                        ),
                        false,
                    );
                }
            }
            *negotiated = true;
            return (ok_reply(id, json!({})), false);
        }
        if !*negotiated {
            return (
                error_reply(
                    id,
                    QmpError {
                        class: "CommandNotFound",
                        desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
                    },
                ),
                false,
            );
        }
        drop(negotiated);
        let result = match cmd.as_str() {
            "getfd" => self.getfd(args, client),
            "closefd" => self.closefd(args),
            _ => Command::parse(&cmd, args).and_then(|c| backend.execute(c)),
        };
        match result {
            Ok(v) => (ok_reply(id, v), cmd == "quit"),
            Err(e) => (error_reply(id, e), false),
        }
    }
}

impl Server {
    /// Takes the descriptor `getfd` stored under `name` (as QEMU's `fd:NAME` migration does).
    pub fn take_fd(&self, name: &str) -> Option<OwnedFd> {
        self.fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    fn getfd(&self, args: &Map<String, Value>, client: &Client) -> Result<Value, QmpError> {
        for k in args.keys() {
            if k != "fdname" {
                return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
            }
        }
        let name = match args.get("fdname") {
            Some(Value::String(n))
                if !n.is_empty() && !n.starts_with(|c: char| c.is_ascii_digit()) =>
            {
                n.clone()
            }
            Some(Value::String(_)) => {
                return Err(QmpError::generic(
                    "File descriptor names must not be empty or start with a digit",
                ))
            }
            _ => return Err(QmpError::generic("Parameter 'fdname' is missing")),
        };
        let f = client
            .received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .ok_or_else(|| QmpError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
        self.fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, OwnedFd::from(f));
        Ok(json!({}))
    }

    fn closefd(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let name = args
            .get("fdname")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::generic("Parameter 'fdname' is missing"))?;
        self.take_fd(name)
            .map(|_| json!({}))
            .ok_or_else(|| QmpError::generic(format!("File descriptor named '{name}' not found")))
    }
}

fn ok_reply(id: Option<Value>, v: Value) -> Value {
    let mut r = json!({"return": v});
    if let Some(id) = id {
        r["id"] = id;
    }
    r
}

fn error_reply(id: Option<Value>, e: QmpError) -> Value {
    let mut r = json!({"error": {"class": e.class, "desc": e.desc}});
    if let Some(id) = id {
        r["id"] = id;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    struct Echo;
    impl Backend for Echo {
        fn execute(&self, command: Command) -> Result<Value, QmpError> {
            match command {
                Command::QueryStatus {} => Ok(json!({"running": true, "status": "running"})),
                Command::Quit {} => Ok(json!({})),
                other => Err(QmpError::not_found(other.name())),
            }
        }
        fn quit(&self) {}
    }

    fn session() -> (Server, Client, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let server = Server {
            path: PathBuf::new(),
            clients: Mutex::new(vec![]),
            version: (10, 0, 0),
            fds: Mutex::new(HashMap::new()),
        };
        let client = Client {
            out: Mutex::new(a),
            negotiated: Mutex::new(false),
            received: Arc::new(Mutex::new(Vec::new())),
        };
        (server, client, b)
    }

    #[test]
    fn negotiation_rules() {
        let (s, c, _peer) = session();
        let (r, _) = s.handle(r#"{"execute":"query-status","id":1}"#, &c, &Echo);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(r["id"], 1);
        let (r, _) = s.handle(
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#,
            &c,
            &Echo,
        );
        assert_eq!(r, json!({"return": {}}));
        let (r, _) = s.handle(r#"{"execute":"qmp_capabilities"}"#, &c, &Echo);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        let (r, _) = s.handle(
            r#"{"execute":"query-status","id":"__qmp#00001"}"#,
            &c,
            &Echo,
        );
        assert_eq!(
            r,
            json!({"return": {"running": true, "status": "running"}, "id": "__qmp#00001"})
        );
        let (_, quit) = s.handle(r#"{"execute":"quit"}"#, &c, &Echo);
        assert!(quit);
    }

    #[test]
    fn malformed_input_gets_generic_errors() {
        let (s, c, _peer) = session();
        *c.negotiated.lock().unwrap() = true;
        for bad in [
            "{",
            "[1]",
            "42",
            r#"{"arguments":{}}"#,
            r#"{"execute":7}"#,
            r#"{"execute":"stop","arguments":[]}"#,
            r#"{"execute":"stop","bogus":1}"#,
        ] {
            let (r, quit) = s.handle(bad, &c, &Echo);
            assert_eq!(r["error"]["class"], "GenericError", "{bad}");
            assert!(!quit);
        }
        let (r, _) = s.handle(r#"{"execute":"nope"}"#, &c, &Echo);
        assert_eq!(r["error"]["desc"], "The command nope has not been found");
        let (r, _) = s.handle(
            r#"{"execute":"query-status","arguments":{"x":1}}"#,
            &c,
            &Echo,
        );
        assert_eq!(r["error"]["desc"], "Parameter 'x' is unexpected");
    }

    #[test]
    fn getfd_names_a_passed_descriptor_and_closefd_drops_it() {
        let (s, c, _peer) = session();
        s.handle(r#"{"execute":"qmp_capabilities"}"#, &c, &Echo);
        let (r, _) = s.handle(
            r#"{"execute":"getfd","arguments":{"fdname":"mig"},"id":7}"#,
            &c,
            &Echo,
        );
        assert_eq!(
            r["error"]["desc"],
            "No file descriptor supplied via SCM_RIGHTS"
        );
        assert_eq!(r["id"], 7);
        let (x, _y) = UnixStream::pair().unwrap();
        c.received
            .lock()
            .unwrap()
            .push(File::from(OwnedFd::from(x)));
        let (r, _) = s.handle(
            r#"{"execute":"getfd","arguments":{"fdname":"1bad"}}"#,
            &c,
            &Echo,
        );
        assert!(r["error"]["desc"].as_str().unwrap().contains("digit"));
        let (r, _) = s.handle(
            r#"{"execute":"getfd","arguments":{"fdname":"mig"}}"#,
            &c,
            &Echo,
        );
        assert_eq!(r, json!({"return": {}}));
        assert!(s.take_fd("mig").is_some());
        assert!(s.take_fd("mig").is_none(), "taken once");
        let (r, _) = s.handle(
            r#"{"execute":"closefd","arguments":{"fdname":"mig"}}"#,
            &c,
            &Echo,
        );
        assert!(r["error"]["desc"].as_str().unwrap().contains("not found"));
    }

    #[test]
    fn descriptors_sent_with_a_command_are_received() {
        let (a, b) = UnixStream::pair().unwrap();
        let (x, _y) = UnixStream::pair().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let mut r = FdReader {
            stream: a,
            received: received.clone(),
        };
        b.send_with_fd(&b"{}\n"[..], x.as_raw_fd()).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(r.read(&mut buf).unwrap(), 3);
        assert_eq!(received.lock().unwrap().len(), 1);
    }
}
