//! The QMP server: sockets, sessions, negotiation, replies and events.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::client::{Client, FdReader};
use crate::commands::Command;
use crate::json_stream::{Piece, Splitter};
use crate::listen::Slots;

/// QMP sessions served at once; one more is refused with an error.
pub const MAX_CLIENTS: usize = 32;
/// Descriptors `getfd` may hold by name at once.
pub const MAX_NAMED_FDS: usize = 64;

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
                let refusal = format!(
                    "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"too many QMP \
                     clients (at most {MAX_CLIENTS})\"}}}}\r\n"
                );
                let slots = Slots::new(MAX_CLIENTS);
                crate::listen::accept_loop(
                    listener,
                    &what,
                    &slots,
                    refusal.as_bytes(),
                    |stream, slot| {
                        let (server, backend) = (server.clone(), backend.clone());
                        let _ = std::thread::Builder::new().name("qmp-client".into()).spawn(
                            move || {
                                if let Err(e) = server.session(stream, &*backend) {
                                    tracing::debug!("QMP session ended: {e}");
                                }
                                drop(slot);
                            },
                        );
                    },
                );
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
        for c in self.clients() {
            if c.negotiated.load(Ordering::SeqCst) {
                c.send(&v);
            }
        }
    }

    /// Waits (up to `timeout`) until every client has been sent what is queued for it: before
    /// the process exits, so that the last reply and SHUTDOWN reach their readers.
    pub fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for c in self.clients() {
            c.flush(deadline);
        }
    }

    /// The sessions now (a copy: nothing is sent under the list's lock).
    fn clients(&self) -> Vec<Arc<Client>> {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn session(&self, stream: UnixStream, backend: &dyn Backend) -> io::Result<()> {
        let client = Client::start(&stream)?;
        let (major, minor, micro) = self.version;
        client.send(&json!({"QMP": {
            "version": {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": ""},
            "capabilities": ["oob"]}}));
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(client.clone());
        let result = self.read_loop(stream, &client, backend);
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| !Arc::ptr_eq(c, &client));
        // The replies already queued still go out (bounded: the writer gives up on a dropped
        // client); then the writer thread ends.
        client.flush(Instant::now() + Duration::from_secs(1));
        client.close();
        result
    }

    fn read_loop(
        &self,
        stream: UnixStream,
        client: &Client,
        backend: &dyn Backend,
    ) -> io::Result<()> {
        let mut reader = FdReader {
            stream,
            received: client.received.clone(),
        };
        let mut splitter = Splitter::default();
        let mut buf = vec![0u8; 64 << 10];
        let mut pieces = Vec::new();
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 || client.is_closed() {
                return Ok(());
            }
            splitter.feed(&buf[..n], &mut |p| pieces.push(p));
            for piece in pieces.drain(..) {
                let (reply, quit) = match piece {
                    Piece::Message(m) => match std::str::from_utf8(&m) {
                        Ok(text) => self.handle(text, client, backend),
                        Err(_) => (
                            error_reply(None, QmpError::generic("JSON parse error, invalid UTF-8")),
                            false,
                        ),
                    },
                    Piece::Error(e) => (error_reply(None, QmpError::generic(e)), false),
                };
                client.send(&reply);
                if quit {
                    client.flush(Instant::now() + Duration::from_secs(1));
                    backend.quit();
                }
            }
        }
    }

    /// Handles one message; returns the reply and whether it was a successful `quit`.
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
        if cmd == "qmp_capabilities" {
            if client.negotiated.load(Ordering::SeqCst) {
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
            client.negotiated.store(true, Ordering::SeqCst);
            return (ok_reply(id, json!({})), false);
        }
        if !client.negotiated.load(Ordering::SeqCst) {
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
        let mut fds = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        if fds.len() >= MAX_NAMED_FDS && !fds.contains_key(&name) {
            return Err(QmpError::generic(format!(
                "getfd already holds {MAX_NAMED_FDS} descriptors: closefd one first"
            )));
        }
        let f = client
            .received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .ok_or_else(|| QmpError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
        fds.insert(name, OwnedFd::from(f));
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
    use std::fs::File;

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

    fn session() -> (Server, Arc<Client>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let server = Server {
            path: PathBuf::new(),
            clients: Mutex::new(vec![]),
            version: (10, 0, 0),
            fds: Mutex::new(HashMap::new()),
        };
        let client = Client::start(&a).unwrap();
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
        c.negotiated.store(true, Ordering::SeqCst);
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
    fn getfd_holds_a_bounded_number_of_descriptors() {
        let (s, c, _peer) = session();
        c.negotiated.store(true, Ordering::SeqCst);
        let (x, _y) = UnixStream::pair().unwrap();
        let give = || {
            let f = File::from(OwnedFd::from(x.try_clone().unwrap()));
            c.received.lock().unwrap().push(f);
        };
        for i in 0..MAX_NAMED_FDS {
            give();
            let (r, _) = s.handle(
                &format!(r#"{{"execute":"getfd","arguments":{{"fdname":"f{i}"}}}}"#),
                &c,
                &Echo,
            );
            assert_eq!(r, json!({"return": {}}));
        }
        give();
        let (r, _) = s.handle(
            r#"{"execute":"getfd","arguments":{"fdname":"one-more"}}"#,
            &c,
            &Echo,
        );
        assert!(
            r["error"]["desc"]
                .as_str()
                .unwrap()
                .contains("closefd one first"),
            "{r}"
        );
        // Replacing a held name is allowed; after a closefd a new name fits.
        let (r, _) = s.handle(
            r#"{"execute":"getfd","arguments":{"fdname":"f0"}}"#,
            &c,
            &Echo,
        );
        assert_eq!(r, json!({"return": {}}));
        s.handle(
            r#"{"execute":"closefd","arguments":{"fdname":"f1"}}"#,
            &c,
            &Echo,
        );
        give();
        let (r, _) = s.handle(
            r#"{"execute":"getfd","arguments":{"fdname":"one-more"}}"#,
            &c,
            &Echo,
        );
        assert_eq!(r, json!({"return": {}}));
    }
}
