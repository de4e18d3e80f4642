//! Helpers for end-to-end tests: run `tern`, read the guest's serial lines, talk QMP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod netns;

/// Tests that run guests take the machine's cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn exclusive() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn tern_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

/// A test's own directory under the temporary directory. It is removed when the test passes;
/// a failed test (a panic) leaves it for the post-mortem, as does `TERN_KEEP_TEST_DIRS=1`.
/// Disk images and saved streams are large: a CI machine's disk is not, and a suite that left
/// every passing test's files behind ran it out of space (ENOSPC in the middle of a disk test).
pub struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() && std::env::var_os("TERN_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn tmpdir(name: &str) -> TestDir {
    let d = std::env::temp_dir().join(format!("tern-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TestDir(d)
}

/// A process whose stdout lines are collected.
pub struct Proc {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        Proc::spawn_with_stderr(cmd, Stdio::inherit())
    }

    /// [`Proc::spawn`], its standard error going to `stderr` (a file, for a test that reads the
    /// VMM's log).
    pub fn spawn_with_stderr(cmd: &mut Command, stderr: Stdio) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// `tern run` with these arguments.
    pub fn tern_run(args: &[&str]) -> Proc {
        let mut cmd = Command::new(tern_bin());
        cmd.arg("run").args(args);
        Proc::spawn(&mut cmd)
    }

    /// Waits for a line matching `pred`; panics with what was seen on timeout or EOF.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    assert!(
                        !line.contains("check FAIL")
                            && !line.contains("disk FAIL")
                            && !line.contains("net FAIL")
                            && !line.contains("FAULT")
                            && !line.contains("PANIC"),
                        "guest reported a failure while waiting for {what}: {line}"
                    );
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "timed out after {timeout:?} waiting for {what}; last lines: {:?}",
                    self.tail()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "output ended while waiting for {what}; last lines: {:?}",
                    self.tail()
                ),
            }
        }
    }

    /// Like [`Self::wait_for`] but failures are returned, not asserted (for negative tests).
    pub fn wait_raw(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if pred(&line) {
                return Some(line);
            }
        }
    }

    /// Lines received so far but not yet consumed, without waiting.
    pub fn drain(&mut self) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l.clone());
            v.push(l);
        }
        v
    }

    pub fn tail(&self) -> Vec<String> {
        self.seen.iter().rev().take(8).rev().cloned().collect()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number in `tern-guest hb <n> gap_us=<g>`.
pub fn hb(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("tern-guest hb ")?;
    let (n, g) = rest.split_once(" gap_us=")?;
    Some((n.parse().ok()?, g.trim().parse().ok()?))
}

pub fn is_hb(line: &str) -> bool {
    hb(line).is_some()
}

/// Connects to a unix socket that may not be listening yet.
pub fn connect_unix(path: &Path, timeout: Duration) -> UnixStream {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "socket {path:?}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Polls `query-migrate` until the migration ends (or `timeout` passes).
pub fn wait_migration(q: &mut Qmp, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = q.ok("query-migrate", json!({}));
        if matches!(
            r["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            return r;
        }
        assert!(Instant::now() < deadline, "migration did not end: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `query-migrate` until the migration's status is `want` (e.g. under way: "active").
pub fn wait_status(q: &mut Qmp, want: &str) -> Value {
    let deadline = Instant::now() + LINE;
    loop {
        let r = q.ok("query-migrate", json!({}));
        if r["status"] == want {
            return r;
        }
        assert!(Instant::now() < deadline, "never {want}: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `query-migrate` every 20 ms until `pred` holds (at most 180 s, then fails with `what`
/// and the last reply).
pub fn wait_until(q: &mut Qmp, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let r = q.ok("query-migrate", json!({}));
        if pred(&r) {
            return r;
        }
        assert!(t.elapsed() < Duration::from_secs(180), "{what}: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last heartbeat number a *paused* process printed: its last lines may still be on their
/// way through the pipe and the reader thread, so give them a moment first.
pub fn paused_last_hb(p: &mut Proc) -> u64 {
    std::thread::sleep(Duration::from_millis(300));
    last_hb(p)
}

/// The last heartbeat number the process printed so far.
pub fn last_hb(p: &mut Proc) -> u64 {
    p.drain();
    p.seen
        .iter()
        .rev()
        .find_map(|l| hb(l))
        .map(|h| h.0)
        .expect("a heartbeat")
}

/// The migrated guest carries on in `p` where the source stopped at heartbeat `src_hb`: the
/// next heartbeat (not a reboot), then a passing self-check of every page.
pub fn continues_on(p: &mut Proc, src_hb: u64) {
    let first = p.wait_for("a heartbeat on the target", LINE, is_hb);
    let (n, _) = hb(&first).unwrap();
    assert!(
        n > src_hb && n <= src_hb + 2,
        "source stopped at hb {src_hb}, target printed {first}"
    );
    assert!(p
        .seen
        .iter()
        .all(|l| !l.contains("tern-guest ready") && !l.contains("tern-guest boot")));
    p.wait_for("the guest's self-check on the target", LINE, |l| {
        l.starts_with("tern-guest check ok")
    });
}

/// The migration from `src` completes within `timeout` and the guest carries on in `dst` where
/// the source stopped ([`continues_on`]). Returns the source's `query-migrate`.
pub fn completes(src: &mut Vmm, dst: &mut Proc, timeout: Duration, what: &str) -> Value {
    let r = wait_migration(&mut src.q, timeout);
    assert_eq!(r["status"], "completed", "{what}: {r}");
    let n = paused_last_hb(&mut src.p);
    continues_on(dst, n);
    r
}

/// The migration from `src` to `dst` completes within `timeout`, the guest carries on at the
/// target ([`continues_on`]), and both sides report the same RAM digest at the switch-over (the
/// source asked for it: `x-tern-ram-digest`). Returns the source's and the target's
/// `query-migrate`.
pub fn moved_whole(src: &mut Vmm, dst: &mut Vmm, timeout: Duration, what: &str) -> (Value, Value) {
    let r = completes(src, &mut dst.p, timeout, what);
    let rd = dst.q.ok("query-migrate", json!({}));
    assert!(r["x-tern-ram-digest"].is_string(), "{what}: {r}");
    assert_eq!(
        r["x-tern-ram-digest"], rd["x-tern-ram-digest"],
        "{what}: RAM at the switch-over differs"
    );
    (r, rd)
}

/// After a failed or cancelled migration the source's guest still runs: `running` in QMP, new
/// heartbeats, and its self-check still passes.
pub fn source_still_fine(p: &mut Proc, q: &mut Qmp) {
    assert_eq!(
        q.ok("query-status", json!({})),
        json!({"running": true, "status": "running"})
    );
    let before = last_hb(p);
    let (after, _) = hb(&p.wait_for("a heartbeat after the failure", LINE, is_hb)).unwrap();
    assert!(after > before);
    p.wait_for("a self-check after the failure", LINE, |l| {
        l.starts_with("tern-guest check ok")
    });
}

/// A QMP client, negotiated.
pub struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    pub events: Vec<Value>,
}

impl Qmp {
    pub fn connect(path: &Path, timeout: Duration) -> Qmp {
        let (q, greeting) = Qmp::open(path, timeout);
        q.negotiate(greeting)
    }

    /// Connects like [`Qmp::connect`], but while the monitor answers that it has too many
    /// clients, tries again until `timeout`: the sessions of clients that just left end only
    /// when their threads see the hang-up.
    pub fn connect_when_free(path: &Path, timeout: Duration) -> Qmp {
        let deadline = Instant::now() + timeout;
        loop {
            let (q, greeting) = Qmp::open(path, timeout);
            let full = greeting["error"]["desc"]
                .as_str()
                .is_some_and(|d| d.starts_with("too many QMP clients"));
            if !full {
                return q.negotiate(greeting);
            }
            assert!(
                Instant::now() < deadline,
                "the monitor stayed full: {greeting}"
            );
            drop(q);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn open(path: &Path, timeout: Duration) -> (Qmp, Value) {
        let stream = connect_unix(path, timeout);
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut q = Qmp {
            stream,
            reader,
            events: vec![],
        };
        let greeting = q.read();
        (q, greeting)
    }

    fn negotiate(mut self, greeting: Value) -> Qmp {
        let q = &mut self;
        assert!(
            greeting["QMP"]["version"]["qemu"]["major"].is_u64(),
            "{greeting}"
        );
        assert!(greeting["QMP"]["capabilities"].is_array(), "{greeting}");
        let r = q.execute("qmp_capabilities", json!({}));
        assert_eq!(r, json!({"return": {}}));
        self
    }

    pub fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("QMP read");
        assert!(line.ends_with("\r\n"), "QMP lines end with CRLF: {line:?}");
        serde_json::from_str(&line).expect("QMP JSON")
    }

    /// Sends a command and returns its reply (events are kept in `events`).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({"execute": cmd, "arguments": args});
        self.stream
            .write_all(format!("{msg}\r\n").as_bytes())
            .expect("QMP write");
        self.reply()
    }

    /// Sends a command with a descriptor attached (SCM_RIGHTS), as `getfd` expects.
    pub fn execute_with_fd(&mut self, cmd: &str, args: Value, fd: std::os::fd::RawFd) -> Value {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let msg = format!("{}\r\n", json!({"execute": cmd, "arguments": args}));
        self.stream
            .send_with_fd(msg.as_bytes(), fd)
            .expect("QMP sendmsg");
        self.reply()
    }

    /// The next reply; events that come first are kept in `events`.
    fn reply(&mut self) -> Value {
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        let r = self.execute(cmd, args);
        assert!(r.get("return").is_some(), "{cmd} failed: {r}");
        r["return"].clone()
    }

    /// Runs a command that must fail; returns its error description.
    pub fn err(&mut self, cmd: &str, args: Value) -> String {
        let r = self.execute(cmd, args);
        assert!(r.get("error").is_some(), "{cmd} succeeded: {r}");
        r["error"]["desc"].as_str().unwrap_or_default().to_string()
    }

    pub fn wait_event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let v = self.read();
            if v["event"] == name {
                return v;
            }
            self.events.push(v);
        }
    }
}

pub const BOOT: Duration = Duration::from_secs(90);
pub const LINE: Duration = Duration::from_secs(30);

/// A running tern with its QMP socket.
pub struct Vmm {
    pub p: Proc,
    pub q: Qmp,
}

pub fn dir(name: &str) -> TestDir {
    tmpdir(name)
}

pub fn free_tcp_uri() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("tcp:127.0.0.1:{}", l.local_addr().unwrap().port())
}

pub fn source(d: &Path, tag: &str, memory: &str, cmdline: &str) -> Vmm {
    source_with(d, tag, memory, cmdline, &[])
}

/// [`source`] with more `tern run` arguments.
pub fn source_with(d: &Path, tag: &str, memory: &str, cmdline: &str, extra: &[&str]) -> Vmm {
    let sock = d.join(format!("{tag}.qmp"));
    let qmp = format!("unix:{}", sock.display());
    let mut args = vec![
        "--memory",
        memory,
        "--vcpus",
        "2",
        "--cmdline",
        cmdline,
        "--qmp",
        &qmp,
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::tern_run(&args);
    p.wait_for("ready", BOOT, |l| l == "tern-guest ready");
    p.wait_for("a heartbeat", LINE, is_hb);
    let q = Qmp::connect(&sock, LINE);
    Vmm { p, q }
}

pub fn target(d: &Path, tag: &str, uri: &str, extra: &[&str]) -> Vmm {
    let sock = d.join(format!("{tag}.qmp"));
    let qmp = format!("unix:{}", sock.display());
    let mut args = vec!["--incoming", uri, "--qmp", &qmp];
    args.extend_from_slice(extra);
    let p = Proc::tern_run(&args);
    let mut q = Qmp::connect(&sock, LINE);
    assert_eq!(
        q.ok("query-status", json!({})),
        json!({"running": false, "status": "inmigrate"})
    );
    Vmm { p, q }
}

pub fn quit(mut v: Vmm) {
    let _ = v.q.execute("quit", json!({}));
    let status = v.p.wait_exit(LINE);
    assert_eq!(status.code(), Some(0));
}
