//! Postcopy recovery through real KVM: after RUN a broken link (a veth taken down between two
//! network namespaces) or `migrate-pause` leaves both sides `postcopy-paused` with the guest in
//! two halves; `migrate-recover` on the target and `migrate` with `resume` on the source join
//! them again, any number of times, and the guest's self-check of every page passes on the
//! target. A target killed while paused leaves the source paused, saying what that means.

mod common;

use std::time::{Duration, Instant};

use common::netns::Link;
use common::*;
use serde_json::{json, Value};

const MIGRATE: Duration = Duration::from_secs(180);
/// The time either side gives a silent connection after RUN before it pauses.
const SILENCE_MS: u64 = 1000;

fn status(q: &mut Qmp) -> String {
    q.ok("query-migrate", json!({}))["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Both sides paused, then recovered through `uri`; returns once both are active again (or
/// the migration completed meanwhile).
fn recover(src: &mut Vmm, dst: &mut Vmm, uri: &str) {
    for (side, v) in [("source", &mut *src), ("target", &mut *dst)] {
        wait_until(&mut v.q, &format!("the {side} paused"), |r| {
            r["status"] == "postcopy-paused"
        });
    }
    dst.q.ok("migrate-recover", json!({"uri": uri}));
    wait_until(&mut dst.q, "the target listening", |r| {
        r["status"] == "postcopy-recover-setup"
    });
    src.q.ok("migrate", json!({"uri": uri, "resume": true}));
    for (side, v) in [("source", &mut *src), ("target", &mut *dst)] {
        wait_until(&mut v.q, &format!("the {side} recovered"), |r| {
            matches!(r["status"].as_str(), Some("postcopy-active" | "completed"))
        });
    }
}

/// The recoveries both sides report: `n` of them, each with how long it was paused.
fn recoveries(q: &mut Qmp, n: usize) -> Vec<Value> {
    let r = q.ok("query-migrate", json!({}));
    let list = r["x-tern-postcopy-recoveries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(list.len(), n, "{r}");
    for x in &list {
        assert!(x["paused-ms"].as_f64().is_some(), "{r}");
    }
    list
}

/// Both sides pause after `SILENCE_MS`; the target listens on `uri` (it was started with
/// `--incoming defer`); the source, with `params`, migrates there and switches to postcopy at
/// once. Returns when the source reports `postcopy-active`.
fn postcopy_between(src: &mut Vmm, dst: &mut Vmm, uri: &str, preempt: bool, params: Value) {
    for v in [&mut *src, &mut *dst] {
        v.q.ok(
            "migrate-set-parameters",
            json!({"x-tern-postcopy-timeout": SILENCE_MS}),
        );
    }
    dst.q.ok("migrate-incoming", json!({"uri": uri}));
    src.q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": true},
                                {"capability": "postcopy-preempt", "state": preempt}]}),
    );
    src.q.ok("migrate-set-parameters", params);
    src.q.ok("migrate", json!({"uri": uri}));
    src.q.ok("migrate-start-postcopy", json!({}));
    wait_until(&mut src.q, "postcopy-active", |r| {
        r["status"] == "postcopy-active"
    });
}

/// Source and target over a unix socket, postcopy started at once and capped at 32 MiB/s.
fn paused_pair(d: &std::path::Path, tag: &str, preempt: bool) -> (Vmm, Vmm) {
    let mut src = source(
        d,
        &format!("src-{tag}"),
        "1G",
        "tern.wss=512 tern.rate=1024 tern.check=1 tern.pattern=random",
    );
    let uri = format!("unix:{}", d.join(format!("{tag}.sock")).display());
    let mut dst = target(d, &format!("dst-{tag}"), "defer", &[]);
    postcopy_between(
        &mut src,
        &mut dst,
        &uri,
        preempt,
        // 32 MiB/s once postcopy runs: its phase lasts several seconds, time for the pauses.
        json!({"max-bandwidth": 128u64 << 20, "max-postcopy-bandwidth": 32u64 << 20}),
    );
    (src, dst)
}

#[test]
fn migrate_pause_on_either_side_then_recover_completes_with_every_page() {
    let _g = exclusive();
    let d = dir("pc-recover-pause");
    // With postcopy-preempt: the target's pause must reach the source as PAUSED although its
    // urgent connection ends too.
    let (mut src, mut dst) = paused_pair(&d, "pause", true);
    // Outside postcopy, or on a migration that is not paused, the commands say why.
    let e = src.q.err(
        "migrate",
        json!({"uri": "unix:/nonexistent", "resume": true}),
    );
    assert!(e.contains("only valid when postcopy is paused"), "{e}");
    std::thread::sleep(Duration::from_millis(500));
    src.q.ok("migrate-pause", json!({}));
    recover(
        &mut src,
        &mut dst,
        &format!("unix:{}", d.join("r1.sock").display()),
    );
    std::thread::sleep(Duration::from_millis(500));
    // The target pauses: it says PAUSED, so the source pauses too instead of taking the guest
    // for lost. (The postcopy phase lasts several seconds: it is still running.)
    assert_eq!(status(&mut dst.q), "postcopy-active");
    dst.q.ok("migrate-pause", json!({}));
    recover(
        &mut src,
        &mut dst,
        &format!("unix:{}", d.join("r2.sock").display()),
    );
    completes(&mut src, &mut dst.p, MIGRATE, "after the pauses");
    let rd = wait_migration(&mut dst.q, MIGRATE);
    assert_eq!(rd["status"], "completed", "{rd}");
    let on_src = recoveries(&mut src.q, 2);
    let on_dst = recoveries(&mut dst.q, 2);
    assert_eq!(on_src[0]["reason"], "migrate-pause", "{on_src:?}");
    assert_eq!(on_src[1]["reason"], "the target paused", "{on_src:?}");
    assert_eq!(on_dst[1]["reason"], "migrate-pause", "{on_dst:?}");
    eprintln!(
        "recoveries: source {}, target {}",
        Value::Array(on_src),
        Value::Array(on_dst)
    );
    quit(src);
    quit(dst);
}

#[test]
fn a_target_killed_while_paused_leaves_the_source_paused_saying_so() {
    let _g = exclusive();
    let d = dir("pc-recover-kill");
    let (mut src, dst) = paused_pair(&d, "kill", false);
    std::thread::sleep(Duration::from_millis(300));
    src.q.ok("migrate-pause", json!({}));
    wait_until(&mut src.q, "the source paused", |r| {
        r["status"] == "postcopy-paused"
    });
    drop(dst);
    let uri = format!("unix:{}", d.join("gone.sock").display());
    src.q.ok("migrate", json!({"uri": uri, "resume": true}));
    let r = wait_until(&mut src.q, "the failed recovery", |r| {
        r["status"] == "postcopy-paused"
            && r["error-desc"]
                .as_str()
                .is_some_and(|e| e.contains("recovery through"))
    });
    let why = r["error-desc"].as_str().unwrap();
    assert!(why.contains("so is the guest"), "{r}");
    // The source keeps its half and never runs the guest by itself.
    assert_eq!(
        src.q.ok("query-status", json!({})),
        json!({"running": false, "status": "paused"})
    );
    let e = src.q.err("cont", json!({}));
    assert!(e.contains("migration is in progress"), "{e}");
    // The operator gives the paused migration up: failed, in doubt, the source still paused.
    src.q.ok("migrate_cancel", json!({}));
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["x-tern-in-doubt"], true, "{r}");
    assert!(
        r["error-desc"]
            .as_str()
            .unwrap_or("")
            .contains("migrate_cancel while postcopy was paused"),
        "{r}"
    );
    assert_eq!(
        src.q.ok("query-status", json!({})),
        json!({"running": false, "status": "paused"})
    );
    drop(src);
}

/// A tiny xorshift generator: the moments of the breaks, printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn postcopy_survives_the_link_going_down_at_random_moments_between_two_namespaces() {
    let _g = exclusive();
    let d = dir("pc-recover-netns");
    let link = Link::up("1gbit");
    let seed = std::env::var("TERN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("TERN_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    let runs = std::env::var("TERN_RECOVERY_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let started = Instant::now();
    for run in 0..runs {
        // The last run breaks twice.
        let breaks = if run + 1 == runs { 2 } else { 1 };
        let mut src = link.source(
            &d,
            &format!("src{run}"),
            "tern.wss=512 tern.rate=256 tern.check=1 tern.pattern=random",
        );
        let port = 47800 + run * 4;
        let uri = format!("tcp:10.78.0.2:{port}");
        // Deferred: the target's timeout is set before it listens.
        let mut dst = link.target(&d, &format!("dst{run}"), "defer");
        postcopy_between(&mut src, &mut dst, &uri, run % 2 == 1, json!({}));
        let mut done = 0;
        for b in 0..breaks {
            // A random moment in the first two seconds of postcopy (it takes about eight).
            let at = rng.below(2000);
            std::thread::sleep(Duration::from_millis(at));
            if status(&mut src.q) != "postcopy-active" {
                break;
            }
            link.set(false);
            let t_down = Instant::now();
            for v in [&mut src, &mut dst] {
                wait_until(&mut v.q, "paused by the break", |r| {
                    r["status"] == "postcopy-paused"
                });
            }
            std::thread::sleep(Duration::from_millis(500 + rng.below(1000)));
            link.set(true);
            let r_uri = format!("tcp:10.78.0.2:{}", port + 1 + b);
            recover(&mut src, &mut dst, &r_uri);
            eprintln!(
                "run {run} break {b}: at {at} ms into postcopy, link down for {} ms",
                t_down.elapsed().as_millis()
            );
            done += 1;
        }
        let r = completes(&mut src, &mut dst.p, MIGRATE, &format!("run {run}"));
        let list = recoveries(&mut src.q, done);
        let paused = |l: &[Value]| {
            l.iter()
                .map(|x| format!("{:.0}", x["paused-ms"].as_f64().unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join("+")
        };
        let on_dst = recoveries(&mut dst.q, done);
        eprintln!(
            "run {run}: total {} ms, {} page requests; paused ms: source {}, target {}; \
             recoveries {}",
            r["total-time"],
            r["ram"]["postcopy-requests"],
            paused(&list),
            paused(&on_dst),
            Value::Array(list)
        );
        quit(src);
        quit(dst);
        // Bounded in time as well as in count (CI has a budget).
        if started.elapsed() > Duration::from_secs(300) {
            eprintln!("stopping after {} runs: 300 s spent", run + 1);
            break;
        }
    }
}
