//! Postcopy through real KVM: a guest that dirties faster than the link carries it moves only
//! by postcopy; it runs on the target before its memory arrived, and its self-check of every
//! page there catches a lost or stale page. Failures before RUN resume the source; after RUN
//! the source says the guest is lost.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const MIGRATE: Duration = Duration::from_secs(180);
/// 128 MiB/s: the guest dirties 1024 MiB/s of 512 MiB, so precopy alone never converges.
const LINK: u64 = 128 << 20;
const GUEST: &str = "tern.wss=512 tern.rate=1024 tern.check=1";

fn postcopy_pair(d: &std::path::Path, tag: &str, pattern: &str) -> (Vmm, Vmm) {
    postcopy_pair_with(d, tag, pattern, json!({}), false)
}

/// [`postcopy_pair`] with the target's migration parameters.
fn postcopy_pair_with(
    d: &std::path::Path,
    tag: &str,
    pattern: &str,
    dst_params: Value,
    preempt: bool,
) -> (Vmm, Vmm) {
    let cmdline = format!("{GUEST} tern.pattern={pattern}");
    let mut src = source(d, &format!("src-{tag}"), "1G", &cmdline);
    let uri = format!("unix:{}", d.join(format!("{tag}.sock")).display());
    // Deferred, so that the target's capability is set before it listens (as with QEMU).
    let mut dst = target(d, &format!("dst-{tag}"), "defer", &[]);
    dst.q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-blocktime", "state": true}]}),
    );
    dst.q.ok("migrate-set-parameters", dst_params);
    dst.q.ok("migrate-incoming", json!({"uri": uri}));
    src.q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": true},
                                {"capability": "postcopy-preempt", "state": preempt}]}),
    );
    src.q.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": LINK, "downtime-limit": 300}),
    );
    src.q.ok("migrate", json!({"uri": uri}));
    (src, dst)
}

/// Waits until the source's `query-migrate` satisfies `pred`.
fn wait_until(q: &mut Qmp, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let r = q.ok("query-migrate", json!({}));
        if pred(&r) {
            return r;
        }
        assert!(t.elapsed() < MIGRATE, "{what}: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn postcopy_moves_a_guest_precopy_cannot_after_a_round_and_from_the_start_with_and_without_preempt()
{
    let _g = exclusive();
    let d = dir("postcopy");
    for (tag, pattern, at_start, preempt) in [
        ("seq-round", "seq", false, false),
        ("random-start", "random", true, false),
        ("hot-round", "hot", false, false),
        ("seq-start-preempt", "seq", true, true),
        ("random-round-preempt", "random", false, true),
        ("hot-start-preempt", "hot", true, true),
    ] {
        let what = format!("postcopy {tag}");
        let (mut src, mut dst) = postcopy_pair_with(&d, tag, pattern, json!({}), preempt);
        if !at_start {
            // A full round, and precopy is still far from done.
            let r = wait_until(&mut src.q, &what, |r| {
                r["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2
            });
            assert_eq!(r["status"], "active", "{what}: {r}");
        }
        src.q.ok("migrate-start-postcopy", json!({}));
        let r = wait_until(&mut src.q, &what, |r| {
            !matches!(
                r["status"].as_str(),
                Some("active" | "setup" | "postcopy-active")
            )
        });
        assert_eq!(r["status"], "completed", "{what}: {r}");
        assert!(r["downtime"].as_u64().is_some(), "{what}: {r}");
        let n = paused_last_hb(&mut src.p);
        // The heartbeat goes on at the target and its self-check of every page passes.
        continues_on(&mut dst.p, n);
        let rd = dst.q.ok("query-migrate", json!({}));
        assert_eq!(rd["status"], "completed", "{what}: {rd}");
        let requests = rd["ram"]["postcopy-requests"].as_u64().unwrap_or(0);
        assert!(
            requests > 0,
            "{what}: the running guest asked for pages: {rd}"
        );
        assert!(rd["postcopy-blocktime"].is_u64(), "{what}: {rd}");
        assert!(
            rd["postcopy-latency-dist"].as_array().is_some_and(|a| a
                .iter()
                .filter_map(Value::as_u64)
                .sum::<u64>()
                > 0),
            "{what}: {rd}"
        );
        assert!(
            r["ram"]["postcopy-bytes"].as_u64().unwrap_or(0) > 0,
            "{what}: {r}"
        );
        eprintln!(
            "{what}: total {} ms, downtime {} ms, {requests} requests, blocktime {} ms, mean latency {} us",
            r["total-time"],
            r["downtime"],
            rd["postcopy-blocktime"],
            rd["postcopy-latency"].as_u64().unwrap_or(0) / 1000
        );
        quit(src);
        quit(dst);
    }
}

#[test]
fn a_target_killed_before_run_leaves_the_source_running() {
    let _g = exclusive();
    let d = dir("postcopy-kill-before");
    let (mut src, mut dst) = postcopy_pair_with(
        &d,
        "before",
        "seq",
        json!({"x-tern-switchover-fault": "before-loaded:hold:20000"}),
        false,
    );
    src.q.ok("migrate-start-postcopy", json!({}));
    let t = Instant::now();
    loop {
        let rd = dst.q.ok("query-migrate", json!({}));
        if rd["x-tern-fault-holding"] == "before-loaded" {
            break;
        }
        assert!(
            t.elapsed() < MIGRATE,
            "the target never reached LOADED: {rd}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(dst);
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "failed", "{r}");
    source_still_fine(&mut src.p, &mut src.q);
}

#[test]
fn a_target_killed_after_run_is_reported_as_the_guest_lost() {
    let _g = exclusive();
    let d = dir("postcopy-kill-after");
    let (mut src, dst) = postcopy_pair(&d, "after", "random");
    src.q.ok("migrate-start-postcopy", json!({}));
    wait_until(&mut src.q, "postcopy-active", |r| {
        r["status"] == "postcopy-active"
    });
    drop(dst);
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "failed", "{r}");
    let why = r["error-desc"].as_str().unwrap_or("");
    assert!(why.contains("the guest is lost"), "{r}");
    // The source never runs the guest again by itself.
    assert_eq!(
        src.q.ok("query-status", json!({})),
        json!({"running": false, "status": "paused"})
    );
}
