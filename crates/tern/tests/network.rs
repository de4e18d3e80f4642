//! virtio-net on TAP through real KVM: the study's experiment on one machine. Two "hosts" (network
//! namespaces, each with a bridge and the guest's TAP) and a client share a shaped wire
//! (`scripts/net-hosts.sh`, the same topology `bench/network.py` uses); the client keeps a TCP
//! stream with the guest (`bench/netclient.py`, which checks every byte) while the guest moves.
//! Each test makes its own namespaces and removes them, and is bounded in time.

mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const MAC: &str = "52:54:00:12:34:56";
const GUEST: &str = "tern.ip=10.0.0.10/24 tern.wss=32 tern.rate=8 tern.check=1 tern.hb=20";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The namespaces of one test, removed on drop.
struct Hosts {
    prefix: String,
}

impl Hosts {
    fn up(tag: &str) -> Hosts {
        let prefix = format!("t{tag}{}", std::process::id() % 10_000);
        let ok = Command::new("bash")
            .arg(root().join("scripts/net-hosts.sh"))
            .args(["up", &prefix, "1gbit"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let h = Hosts { prefix };
        assert!(ok, "net-hosts.sh up {}", h.prefix);
        h
    }

    fn ns(&self, host: char) -> String {
        format!("{}{host}", self.prefix)
    }

    /// `tern run` in host `a` or `b`.
    fn tern(&self, host: char, args: &[&str]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host), tern_bin(), "run"])
            .args(args);
        Proc::spawn(&mut cmd)
    }

    /// A guest on host a, its network up and beating.
    fn source(&self, d: &Path) -> Vmm {
        let sock = d.join("src.qmp");
        let qmp = format!("unix:{}", sock.display());
        let net = format!("tap=tap0,mac={MAC}");
        let mut p = self.tern(
            'a',
            &[
                "--memory",
                "256M",
                "--cmdline",
                GUEST,
                "--net",
                &net,
                "--qmp",
                &qmp,
            ],
        );
        p.wait_for("the network", BOOT, |l| l.starts_with("tern-guest net up"));
        p.wait_for("a heartbeat", LINE, is_hb);
        Vmm {
            p,
            q: Qmp::connect(&sock, LINE),
        }
    }

    /// A target on host b, listening on host b's address.
    fn target(&self, d: &Path, tag: &str, extra: &[&str]) -> (Vmm, String) {
        let port = 4400 + std::process::id() % 1000;
        let uri = format!("tcp:10.0.0.2:{port}");
        let sock = d.join(format!("{tag}.qmp"));
        let qmp = format!("unix:{}", sock.display());
        let net = format!("tap=tap0,mac={MAC}");
        let mut args = vec!["--incoming", &uri, "--net", &net, "--qmp", &qmp];
        args.extend_from_slice(extra);
        let p = self.tern('b', &args);
        let q = Qmp::connect(&sock, LINE);
        (Vmm { p, q }, uri)
    }

    /// Pings the guest from the client (ICMP echo, `bench/netclient.py --ping`: this machine
    /// has no ping(8)); true if it answers.
    fn ping(&self) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.ns('c'), "python3"])
            .arg(root().join("bench/netclient.py"))
            .args(["--ping", "10.0.0.10", "--count", "3"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Which port of the wire's switch the guest's MAC is learnt on (a, b or c).
    fn fdb(&self) -> String {
        let out = Command::new("bash")
            .arg(root().join("scripts/net-hosts.sh"))
            .args(["fdb", &self.prefix, MAC])
            .output()
            .expect("net-hosts.sh fdb");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(root().join("scripts/net-hosts.sh"))
            .args(["down", &self.prefix])
            .status();
    }
}

/// The client: streams with the guest (`mode` source: the guest sends a counter; sink: the
/// client does and the guest checks), until `stop` appears.
struct Client {
    child: Child,
    stop: PathBuf,
    out: PathBuf,
}

impl Client {
    fn start(h: &Hosts, d: &Path, mode: &str) -> Client {
        let (stop, out) = (
            d.join(format!("{mode}.stop")),
            d.join(format!("{mode}.json")),
        );
        let port = if mode == "source" { "5002" } else { "5001" };
        let child = Command::new("ip")
            .args(["netns", "exec", &h.ns('c'), "python3"])
            .arg(root().join("bench/netclient.py"))
            .args(["--connect", &format!("10.0.0.10:{port}"), "--mode", mode])
            .arg("--stop")
            .arg(&stop)
            .arg("--out")
            .arg(&out)
            .args(["--seconds", "170"])
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 bench/netclient.py");
        Client { child, stop, out }
    }

    /// Stops the client and returns its report.
    fn finish(mut self) -> Value {
        std::fs::write(&self.stop, b"").unwrap();
        let t = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(t.elapsed() < LINE, "the client did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&self.out).expect("the client's report");
        serde_json::from_str(&text).expect("the client's report is JSON")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bytes(r: &Value) -> u64 {
    r["bytes"].as_u64().unwrap_or(0)
}

/// What the guest's source sent so far, from its next `net ok` line.
fn guest_sent(p: &mut Proc, what: &str) -> u64 {
    let l = p.wait_for(what, LINE, |l| l.starts_with("tern-guest net ok"));
    l.split_whitespace()
        .find_map(|w| w.strip_prefix("source="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits (at most 30 s) until the guest's source has sent more than `than`; returns how much.
fn sent_above(p: &mut Proc, than: u64, what: &str) -> u64 {
    let t = Instant::now();
    loop {
        let n = guest_sent(p, what);
        if n > than {
            return n;
        }
        assert!(
            t.elapsed() < LINE,
            "{what}: the guest sent {n} bytes, no more"
        );
    }
}

#[test]
fn a_tcp_stream_survives_a_migration_between_two_hosts_and_the_bridge_follows_the_guest() {
    let _x = exclusive();
    let t0 = Instant::now();
    let d = dir("net-move");
    let h = Hosts::up("m");
    let mut src = h.source(&d);
    assert!(h.ping(), "the guest answers ping on host a");
    let client = Client::start(&h, &d, "source");
    let sink = Client::start(&h, &d, "sink");
    // Both streams run before the move.
    sent_above(&mut src.p, 0, "the stream to start");
    assert_eq!(h.fdb(), "a", "the switch knows the guest on host a's port");
    let (mut dst, uri) = h.target(&d, "dst", &[]);
    src.q.ok("migrate", json!({"uri": uri}));
    let r = wait_migration(&mut src.q, Duration::from_secs(120));
    assert_eq!(r["status"], "completed", "{r}");
    let done = Instant::now();
    let n = paused_last_hb(&mut src.p);
    continues_on(&mut dst.p, n);
    // The announce: RARP from the target's VMM, and the guest's own gratuitous ARP.
    dst.p.wait_for("the guest's announce", LINE, |l| {
        l.starts_with("tern-guest net announce")
    });
    let mut moved = h.fdb();
    while moved != "b" && done.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
        moved = h.fdb();
    }
    assert_eq!(moved, "b", "the switch learnt the guest on host b's port");
    let nics = dst.q.ok("x-tern-query-nics", json!({}));
    assert!(nics[0]["rarps"].as_u64().unwrap() >= 1, "{nics}");
    assert!(nics[0]["guest-announces"].as_u64().unwrap() >= 1, "{nics}");
    // The streams go on from the new host, every byte in order.
    let after = guest_sent(&mut dst.p, "the stream on host b");
    sent_above(&mut dst.p, after, "more of the stream on host b");
    assert!(h.ping(), "the guest answers ping on host b");
    let rep = client.finish();
    let srep = sink.finish();
    for (what, rep) in [("source", &rep), ("sink", &srep)] {
        assert_eq!(rep["lost"], 0, "{what}: {rep}");
        assert!(bytes(rep) > 0, "{what}: {rep}");
    }
    assert!(
        dst.p.seen.iter().all(|l| !l.contains("net FAIL")),
        "the guest's sink saw every byte in order"
    );
    let srcnics = src.q.ok("x-tern-query-nics", json!({}));
    eprintln!(
        "moved in {} ms (downtime {} ms); stream {}; the source dropped {} frame(s) at the switch; {:?} in all",
        r["total-time"], r["downtime"], rep, srcnics[0]["dropped-at-switch"], t0.elapsed()
    );
    quit(dst);
}

#[test]
fn a_cancelled_migration_leaves_the_sources_network_working() {
    let _x = exclusive();
    let d = dir("net-cancel");
    let h = Hosts::up("c");
    let mut src = h.source(&d);
    let client = Client::start(&h, &d, "source");
    sent_above(&mut src.p, 0, "the stream to start");
    let (dst, uri) = h.target(&d, "dst", &[]);
    // Slow enough that the cancel comes while RAM is still being copied.
    src.q
        .ok("migrate-set-parameters", json!({"max-bandwidth": 4 << 20}));
    src.q.ok("migrate", json!({"uri": uri}));
    wait_status(&mut src.q, "active");
    std::thread::sleep(Duration::from_millis(500));
    src.q.ok("migrate_cancel", json!({}));
    let r = wait_migration(&mut src.q, LINE);
    assert_eq!(r["status"], "cancelled", "{r}");
    drop(dst);
    source_still_fine(&mut src.p, &mut src.q);
    let a = guest_sent(&mut src.p, "the stream after the cancel");
    sent_above(&mut src.p, a, "more of the stream from the source");
    assert!(h.ping(), "the guest still answers ping");
    assert_eq!(h.fdb(), "a");
    // And the guest still moves: to a target whose TAP comes over QMP (`getfd`, QEMU's way for
    // a management layer that opens the TAP itself), as `--incoming defer` lets it.
    let sock = d.join("dst2.qmp");
    let mut p = h.tern(
        'b',
        &[
            "--incoming",
            "defer",
            "--net",
            &format!("fd=tapb,mac={MAC}"),
            "--qmp",
            &format!("unix:{}", sock.display()),
        ],
    );
    let mut q = Qmp::connect(&sock, LINE);
    let tap = open_tap_in(&h.ns('b'), "tap0");
    let r = q.execute_with_fd("getfd", json!({"fdname": "tapb"}), tap.as_raw_fd());
    assert!(r.get("return").is_some(), "{r}");
    drop(tap);
    let uri = format!("tcp:10.0.0.2:{}", 4400 + std::process::id() % 1000);
    q.ok("migrate-incoming", json!({"uri": uri}));
    src.q
        .ok("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.q.ok("migrate", json!({"uri": uri}));
    completes(
        &mut src,
        &mut p,
        Duration::from_secs(120),
        "to a deferred target",
    );
    let a = guest_sent(&mut p, "the stream on host b");
    sent_above(&mut p, a, "more of the stream on host b");
    let rep = client.finish();
    assert_eq!(rep["lost"], 0, "{rep}");
    quit(Vmm { p, q });
}

/// A TAP of namespace `ns` attached on a thread that enters it (the descriptor stays valid when
/// the thread ends).
fn open_tap_in(ns: &str, name: &str) -> std::fs::File {
    let (ns, name) = (ns.to_string(), name.to_string());
    std::thread::spawn(move || {
        let nsf = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        // SAFETY: setns(2) moves only this thread, which ends right after, into the namespace.
        let rc = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {ns}");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        // struct ifreq: the name, then the flags (IFF_TAP | IFF_NO_PI) at offset 16; 40 bytes.
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        req[16..18].copy_from_slice(&0x1002i16.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes the 40-byte ifreq above, on our /dev/net/tun.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), 0x4004_54ca, req.as_mut_ptr()) };
        assert!(
            rc >= 0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        f
    })
    .join()
    .unwrap()
}

#[test]
fn a_guest_saved_and_restored_on_another_host_answers_there() {
    let _x = exclusive();
    let d = dir("net-save");
    let h = Hosts::up("s");
    let mut src = h.source(&d);
    assert!(h.ping());
    let file = d.join("guest.tern");
    src.q.ok(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let r = wait_migration(&mut src.q, Duration::from_secs(60));
    assert_eq!(r["status"], "completed", "{r}");
    let n = paused_last_hb(&mut src.p);
    quit(src);
    let sock = d.join("restored.qmp");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &h.ns('b'), tern_bin(), "restore"])
        .arg(&file)
        .args(["--net", &format!("tap=tap0,mac={MAC}")])
        .args(["--qmp", &format!("unix:{}", sock.display())]);
    let mut p = Proc::spawn(&mut cmd);
    continues_on(&mut p, n);
    p.wait_for("the guest's announce", LINE, |l| {
        l.starts_with("tern-guest net announce")
    });
    assert!(h.ping(), "the restored guest answers ping on host b");
    assert_eq!(h.fdb(), "b");
    let rep = {
        let c = Client::start(&h, &d, "source");
        let a = sent_above(&mut p, 0, "a stream with the restored guest");
        sent_above(&mut p, a, "more of it");
        c.finish()
    };
    assert_eq!(rep["lost"], 0, "{rep}");
    assert!(bytes(&rep) > 0, "{rep}");
    let q = Qmp::connect(&sock, LINE);
    quit(Vmm { p, q });
}

/// A guest that says nothing on the network (no `tern.ip=`: no stack, no guest announce): only
/// the VMM's RARP frames can teach the switch where it is — `announce-self` on host a, then the
/// target's own after the migration to host b.
#[test]
fn rarp_alone_moves_a_silent_guests_mac_to_its_new_port() {
    let _x = exclusive();
    let d = dir("net-rarp");
    let h = Hosts::up("r");
    let sock = d.join("src.qmp");
    let mut p = h.tern(
        'a',
        &[
            "--memory",
            "128M",
            "--cmdline",
            "tern.wss=16 tern.check=1 tern.hb=20",
            "--net",
            &format!("tap=tap0,mac={MAC}"),
            "--qmp",
            &format!("unix:{}", sock.display()),
        ],
    );
    p.wait_for("a heartbeat", BOOT, is_hb);
    let mut src = Vmm {
        p,
        q: Qmp::connect(&sock, LINE),
    };
    assert_eq!(h.fdb(), "none", "a silent guest is unknown to the switch");
    // QEMU's command, one round, on the named NIC; an unknown NIC is refused by name.
    let e = src.q.err("announce-self", json!({"interfaces": ["net7"]}));
    assert!(e.contains("no network interface 'net7'"), "{e}");
    src.q.ok(
        "announce-self",
        json!({"rounds": 1, "interfaces": ["net0"]}),
    );
    let t = Instant::now();
    while h.fdb() != "a" {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the RARP never reached the switch"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut dst, uri) = h.target(&d, "dst", &[]);
    src.q.ok("migrate", json!({"uri": uri}));
    completes(
        &mut src,
        &mut dst.p,
        Duration::from_secs(60),
        "a silent guest",
    );
    let t = Instant::now();
    while h.fdb() != "b" {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the target's RARP never moved the guest"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // QEMU's default schedule: 5 rounds over 350 ms.
    let t = Instant::now();
    let nics = loop {
        let nics = dst.q.ok("x-tern-query-nics", json!({}));
        if nics[0]["rarps"] == 5 || t.elapsed() > Duration::from_secs(3) {
            break nics;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(nics[0]["rarps"], 5, "{nics}");
    assert_eq!(
        nics[0]["guest-announces"], 0,
        "no driver, no guest announce: {nics}"
    );
    // The source, migrated, may not pull the guest back.
    let e = src.q.err("announce-self", json!({}));
    assert!(e.contains("runs elsewhere"), "{e}");
    quit(dst);
}

/// One clear line each, before anything starts.
#[test]
fn a_missing_tap_or_a_malformed_mac_is_one_clear_line() {
    for (net, want) in [
        ("tap=ternnosuch0", "no network interface named ternnosuch0"),
        ("tap=lo", "lo is not a TAP device"),
        ("tap=t0,mac=52:54:00:12:34", "is not a MAC address"),
        ("tap=t0,mac=01:00:5e:00:00:01", "multicast"),
        ("fd=999", "fd=999: no such open descriptor"),
    ] {
        let out = Command::new(tern_bin())
            .args(["run", "--net", net, "--serial", "none"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--net {net} was taken");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "--net {net}: {err}");
        assert!(lines[0].contains(want), "--net {net}: {err}");
    }
}
