//! The monitor sockets against clients that are odd, slow or hostile: QMP read as a JSON stream,
//! events that never wait for a client, a bounded number of sessions, and a structure-aware fuzz
//! of QMP and HMP input bounded in time.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

/// A QMP connection spoken byte by byte, as an arbitrary client would.
struct Raw {
    out: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = connect_unix(path, LINE);
        s.set_read_timeout(Some(LINE)).unwrap();
        let mut r = Raw {
            out: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        };
        let greeting = r.line();
        assert!(greeting["QMP"].is_object(), "{greeting}");
        r
    }

    fn send(&mut self, bytes: &[u8]) {
        self.out.write_all(bytes).unwrap();
    }

    /// The next line, which must be one JSON object.
    fn line(&mut self) -> Value {
        let mut l = String::new();
        let n = self.reader.read_line(&mut l).expect("a QMP line in time");
        assert!(n > 0, "QMP closed");
        assert!(l.ends_with("\r\n"), "{l:?}");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"))
    }

    /// Lines up to the reply carrying `id` (that reply excluded).
    fn until_id(&mut self, id: u64) -> Vec<Value> {
        let mut before = Vec::new();
        loop {
            let v = self.line();
            if v["id"] == id {
                assert!(v["return"].is_object(), "{v}");
                return before;
            }
            before.push(v);
        }
    }
}

fn waiting_target(d: &Path) -> (Proc, std::path::PathBuf, std::path::PathBuf) {
    let qmp = d.join("t.qmp");
    let hmp = d.join("t.hmp");
    let p = Proc::tern_run(&[
        "--incoming",
        &free_tcp_uri(),
        "--qmp",
        &format!("unix:{}", qmp.display()),
        "--hmp",
        &format!("unix:{}", hmp.display()),
    ]);
    (p, qmp, hmp)
}

#[test]
fn qmp_is_read_as_a_json_stream_like_qemus() {
    let d = tmpdir("qmp-stream");
    let (mut p, qmp, _) = waiting_target(&d);
    let mut c = Raw::connect(&qmp);
    // No newline at all: answered at once.
    c.send(br#"{"execute":"qmp_capabilities"}"#);
    assert_eq!(c.line(), json!({"return": {}}));
    // Several on one line, with garbage between: each answered, in order.
    c.send(br#"{"execute":"query-status","id":1}garbage {"execute":"query-status","id":2}"#);
    assert_eq!(c.line()["id"], 1);
    let e = c.line();
    assert_eq!(e["error"]["class"], "GenericError", "{e}");
    assert_eq!(c.line()["id"], 2);
    // One object across several writes and lines.
    c.send(b"{\"execute\":\n");
    std::thread::sleep(Duration::from_millis(50));
    c.send(b" \"query-status\", \"id\": 3}");
    assert_eq!(c.line()["id"], 3);
    // Too deep, too large, not UTF-8: an error each, and the session carries on.
    let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
    let big = format!(
        r#"{{"execute":"stop","arguments":{{"x":"{}"}}}}"#,
        "a".repeat(3 << 20)
    );
    for bad in [
        deep.as_bytes(),
        big.as_bytes(),
        b"{\"execute\":\"\xc3\x28\"}",
    ] {
        c.send(bad);
        c.send(br#"{"execute":"query-status","id":4}"#);
        let before = c.until_id(4);
        assert_eq!(before.len(), 1, "{before:?}");
        assert_eq!(before[0]["error"]["class"], "GenericError", "{before:?}");
    }
    let _ = p.child.kill();
}

#[test]
fn sessions_are_bounded_and_a_refused_one_is_told_why() {
    let d = tmpdir("qmp-limit");
    let (mut p, qmp, hmp) = waiting_target(&d);
    let mut held: Vec<Raw> = (0..32).map(|_| Raw::connect(&qmp)).collect();
    let s = connect_unix(&qmp, LINE);
    s.set_read_timeout(Some(LINE)).unwrap();
    let mut text = String::new();
    (&s).read_to_string(&mut text).unwrap();
    assert!(text.contains("too many QMP clients"), "{text:?}");
    // One leaves: the next one is served.
    drop(held.pop());
    let deadline = Instant::now() + LINE;
    loop {
        let s = connect_unix(&qmp, LINE);
        s.set_read_timeout(Some(LINE)).unwrap();
        let mut first = String::new();
        BufReader::new(&s).read_line(&mut first).unwrap();
        if first.contains("\"QMP\"") {
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {first}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The human monitor has its own bound.
    let hmps: Vec<UnixStream> = (0..32).map(|_| connect_unix(&hmp, LINE)).collect();
    for mut h in &hmps {
        let mut b = [0u8; 8];
        h.read_exact(&mut b).unwrap();
    }
    let s = connect_unix(&hmp, LINE);
    s.set_read_timeout(Some(LINE)).unwrap();
    let mut text = String::new();
    (&s).read_to_string(&mut text).unwrap();
    assert!(text.contains("too many monitor clients"), "{text:?}");
    let _ = p.child.kill();
}

#[test]
fn a_client_that_stops_reading_never_holds_up_the_vm() {
    let _g = exclusive();
    let d = tmpdir("qmp-stall");
    let mut v = source(&d, "src", "64M", "tern.wss=8 tern.check=2");
    let sock = d.join("src.qmp");
    // Negotiated, then never reads again: every event piles up for it.
    let mut stalled = Raw::connect(&sock);
    stalled.send(br#"{"execute":"qmp_capabilities"}"#);
    assert_eq!(stalled.line(), json!({"return": {}}));
    // A second client that reads keeps pausing and resuming: two events a round for both.
    let t0 = Instant::now();
    // 2000 events: more than the 1024 a client may leave unread, plus what its socket holds.
    for _ in 0..1000 {
        v.q.ok("stop", json!({}));
        v.q.ok("cont", json!({}));
        v.q.events.clear();
    }
    eprintln!(
        "1000 stop/cont rounds beside a stalled client: {:?}",
        t0.elapsed()
    );
    // The stalled client was dropped: after what fitted in its socket, the end.
    let mut rest = Vec::new();
    stalled
        .reader
        .get_mut()
        .set_read_timeout(Some(LINE))
        .unwrap();
    stalled
        .reader
        .read_to_end(&mut rest)
        .expect("dropped, so EOF");
    source_still_fine(&mut v.p, &mut v.q);
    // And one more stalled client does not hold up quit either.
    let mut other = Raw::connect(&sock);
    other.send(br#"{"execute":"qmp_capabilities"}"#);
    quit(v);
}

/// A small deterministic generator (xorshift64*): the fuzz is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
}

/// URIs a fuzzed `migrate` may name: none reaches anything or runs anything.
const URIS: &[&str] = &[
    "tcp:127.0.0.1:1",
    "unix:/nonexistent/tern.sock",
    "bogus:x",
    "",
    "fd:nobody",
    "tcp:[::1",
    "tcp:127.0.0.1:99999",
    "tcp:",
];

/// Commands a fuzzed input may name: every command but `quit` (the test-only memory writer is
/// not among them), and one that does not exist.
fn qmp_commands() -> Vec<&'static str> {
    tern_qmp::COMMAND_NAMES
        .iter()
        .copied()
        .filter(|&c| c != "quit")
        .chain(["no-such-command"])
        .collect()
}

const ARG_NAMES: &[&str] = &[
    "uri",
    "detach",
    "resume",
    "fdname",
    "command-line",
    "capabilities",
    "max-bandwidth",
    "downtime-limit",
    "multifd-channels",
    "avail-switchover-bandwidth",
    "capability",
    "state",
    "bogus",
];

fn value(r: &mut Rng, depth: usize) -> Value {
    match r.below(if depth > 4 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(r.below(2) == 0),
        2 => json!(r.next() as i64),
        3 => json!(r.below(1000) as f64 / 7.0),
        4 => json!(r.pick(URIS)),
        5 => json!("x".repeat(r.below(3) * 5000)),
        6 => Value::Array((0..r.below(4)).map(|_| value(r, depth + 1)).collect()),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..r.below(4) {
                m.insert(r.pick(ARG_NAMES).into(), value(r, depth + 1));
            }
            Value::Object(m)
        }
    }
}

fn hmp_line(r: &mut Rng) -> String {
    const WORDS: &[&str] = &[
        "help",
        "?",
        "info",
        "stop",
        "cont",
        "c",
        "migrate",
        "migrate_incoming",
        "migrate_cancel",
        "migrate_set_capability",
        "migrate_set_parameter",
        "frob",
        "",
    ];
    const ARGS: &[&str] = &[
        "status",
        "migrate",
        "migrate_parameters",
        "migrate_capabilities",
        "version",
        "on",
        "off",
        "-d",
        "downtime-limit",
        "max-bandwidth",
        "events",
        "17",
        "-1",
        "99999999999999999999",
        "\u{1F426}",
        "\t",
        "x-tern-read-timeout",
    ];
    let mut line = r.pick(WORDS).to_string();
    for _ in 0..r.below(4) {
        line.push(' ');
        line.push_str(if r.below(3) == 0 {
            r.pick(URIS)
        } else {
            r.pick(ARGS)
        });
    }
    line
}

/// One fuzzed QMP input and whether it is certainly bad (must draw an error).
fn qmp_input(r: &mut Rng) -> (Vec<u8>, bool) {
    let mut cmd = json!({"execute": r.pick(&qmp_commands())});
    if r.below(4) != 0 {
        let mut args = value(r, 0);
        if let Some(m) = args.as_object_mut() {
            if cmd["execute"] == "human-monitor-command" {
                m.insert("command-line".into(), json!(hmp_line(r)));
            }
        }
        cmd["arguments"] = args;
    }
    let text = cmd.to_string().into_bytes();
    match r.below(6) {
        // Truncated, then QEMU's reset byte.
        0 => {
            let cut = 1 + r.below(text.len() - 1);
            let mut t = text[..cut].to_vec();
            t.push(0xff);
            (t, true)
        }
        // Nested past the limit.
        1 => {
            let n = 65 + r.below(300);
            let mut t = br#"{"execute":"stop","arguments":{"x":"#.to_vec();
            t.extend(std::iter::repeat_n(b'[', n));
            t.extend(std::iter::repeat_n(b']', n));
            t.extend_from_slice(b"}}");
            (t, true)
        }
        // Larger than the limit.
        2 => {
            let t = format!(
                r#"{{"execute":"cont","arguments":{{"s":"{}"}}}}"#,
                "y".repeat(1 << 21)
            );
            (t.into_bytes(), true)
        }
        // Bytes at random (then a reset, which may or may not have something to drop).
        3 => {
            let mut t: Vec<u8> = (0..1 + r.below(64)).map(|_| r.next() as u8).collect();
            t.push(0xff);
            (t, false)
        }
        _ => (text, false),
    }
}

#[test]
fn fuzzed_monitor_input_never_panics_hangs_or_goes_unanswered() {
    let _g = exclusive();
    let d = tmpdir("monitor-fuzz");
    let hmp = d.join("src.hmp");
    let mut v = source_with(
        &d,
        "src",
        "64M",
        "tern.wss=8 tern.check=2",
        &["--hmp", &format!("unix:{}", hmp.display())],
    );
    let mut c = Raw::connect(&d.join("src.qmp"));
    c.send(br#"{"execute":"qmp_capabilities"}"#);
    assert_eq!(c.line(), json!({"return": {}}));
    let mut r = Rng(0x7e57_7e57_0000_0001);
    let budget = Duration::from_secs(15);
    let t0 = Instant::now();
    let (mut inputs, mut errors) = (0u64, 0u64);
    let mut id = 1000;
    while t0.elapsed() < budget {
        let (input, bad) = qmp_input(&mut r);
        c.send(&input);
        id += 1;
        c.send(format!(r#"{{"execute":"query-status","id":{id}}}"#).as_bytes());
        let replies = c.until_id(id);
        let errs = replies
            .iter()
            .filter(|v| v["error"]["class"].is_string())
            .count();
        for v in &replies {
            assert!(
                v.get("return").is_some()
                    || v["error"]["desc"].is_string()
                    || v["event"].is_string(),
                "{v}"
            );
        }
        if bad {
            assert!(
                errs >= 1,
                "no error for {:?}",
                String::from_utf8_lossy(&input[..input.len().min(200)])
            );
        }
        inputs += 1;
        errors += errs as u64;
    }
    eprintln!(
        "QMP fuzz: {inputs} inputs in {:?}, {errors} errors",
        t0.elapsed()
    );
    assert!(inputs > 100);

    let s = connect_unix(&hmp, LINE);
    s.set_read_timeout(Some(LINE)).unwrap();
    let mut out = s.try_clone().unwrap();
    let mut reader = BufReader::new(s);
    let until_prompt = |reader: &mut BufReader<UnixStream>| {
        let mut text = Vec::new();
        while !text.ends_with(b"(qemu) ") {
            let mut b = [0u8; 1];
            assert_eq!(
                reader.read(&mut b).expect("a prompt in time"),
                1,
                "HMP closed"
            );
            text.push(b[0]);
        }
        String::from_utf8_lossy(&text).into_owned()
    };
    until_prompt(&mut reader);
    let t1 = Instant::now();
    let mut lines = 0u64;
    while t1.elapsed() < Duration::from_secs(8) {
        let mut line = hmp_line(&mut r).into_bytes();
        if r.below(20) == 0 {
            line = vec![b'z'; 70 << 10];
        }
        line.push(b'\n');
        out.write_all(&line).unwrap();
        let reply = until_prompt(&mut reader);
        if line.len() > 64 << 10 {
            assert!(reply.starts_with("Error:"), "{reply}");
        }
        lines += 1;
    }
    eprintln!("HMP fuzz: {lines} lines in {:?}", t1.elapsed());
    assert!(lines > 50);

    // Whatever the fuzz left: no migration under way, the guest running and intact. (The
    // first client did not read the fuzz's thousands of STOP and RESUME events: it was dropped,
    // as any client that leaves that much unread is; a new one takes over.)
    v.q = Qmp::connect(&d.join("src.qmp"), LINE);
    let _ = v.q.execute("migrate_cancel", json!({}));
    let deadline = Instant::now() + LINE;
    while v.q.ok("query-migrate", json!({}))["status"]
        .as_str()
        .is_some_and(|s| !matches!(s, "completed" | "failed" | "cancelled"))
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    v.q.ok("cont", json!({}));
    source_still_fine(&mut v.p, &mut v.q);
    quit(v);
}
