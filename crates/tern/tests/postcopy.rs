//! Postcopy through real KVM: a guest that dirties faster than the link carries it moves only
//! by postcopy; it runs on the target before its memory arrived, and its self-check of every
//! page there catches a lost or stale page. Failures before RUN resume the source; after RUN
//! the source says the guest is lost.

mod common;

use std::time::{Duration, Instant};

use common::netns::Link;
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
    let timeline = d.join(format!("timeline-{tag}.json"));
    src.q.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": LINK, "downtime-limit": 300,
               "x-tern-timeline": timeline.to_str().unwrap()}),
    );
    // x-tern-auto-postcopy, if the tag asks for it.
    if let Some(mode) = tag.strip_prefix("auto-") {
        src.q.ok(
            "migrate-set-parameters",
            json!({"x-tern-auto-postcopy": mode}),
        );
    }
    src.q.ok("migrate", json!({"uri": uri}));
    (src, dst)
}

#[test]
fn postcopy_moves_a_guest_precopy_cannot_after_a_round_and_from_the_start_with_and_without_preempt()
{
    let _g = exclusive();
    let d = dir("postcopy");
    let mut cases = Vec::new();
    for pattern in ["seq", "random", "hot"] {
        for at_start in [false, true] {
            for preempt in [false, true] {
                cases.push((pattern, at_start, preempt));
            }
        }
    }
    for (pattern, at_start, preempt) in cases {
        let tag = format!(
            "{pattern}-{}{}",
            if at_start { "start" } else { "round" },
            if preempt { "-preempt" } else { "" }
        );
        let tag = tag.as_str();
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
        // Over time: the faults the target served, and what the source sent after RUN.
        assert!(
            rd["x-tern-postcopy-latency-series"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "{what}: {rd}"
        );
        let t: Value = serde_json::from_str(
            &std::fs::read_to_string(d.join(format!("timeline-{tag}.json"))).unwrap(),
        )
        .unwrap();
        assert!(t["postcopy-start"].is_f64(), "{what}: {t}");
        assert!(
            t["postcopy-series"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "{what}: {t}"
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

#[test]
fn postcopy_between_two_namespaces_at_1gbit_with_the_guest_dirtying_256_mib_s() {
    let _g = exclusive();
    let d = dir("postcopy-netns");
    let link = Link::up("1gbit");
    let mut src = link.source(
        &d,
        "src",
        "tern.wss=512 tern.rate=256 tern.check=1 tern.pattern=random",
    );
    let uri = "tcp:10.78.0.2:47700";
    let mut dst = link.target(&d, "dst", uri);
    src.q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": true},
                                {"capability": "postcopy-preempt", "state": true}]}),
    );
    src.q.ok("migrate", json!({"uri": uri}));
    // One round over the link, then postcopy.
    let r = wait_until(&mut src.q, "a first round", |r| {
        r["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 || r["status"] == "failed"
    });
    assert_eq!(r["status"], "active", "{r}");
    src.q.ok("migrate-start-postcopy", json!({}));
    let r = wait_until(&mut src.q, "postcopy over the link", |r| {
        !matches!(
            r["status"].as_str(),
            Some("active" | "setup" | "postcopy-active")
        )
    });
    assert_eq!(r["status"], "completed", "{r}");
    let n = paused_last_hb(&mut src.p);
    continues_on(&mut dst.p, n);
    eprintln!(
        "postcopy over 1 Gbit/s: total {} ms, downtime {} ms, {} requests",
        r["total-time"], r["downtime"], r["ram"]["postcopy-requests"]
    );
    quit(src);
    quit(dst);
}

#[test]
fn auto_postcopy_switches_by_itself_when_precopy_cannot_converge() {
    let _g = exclusive();
    let d = dir("postcopy-auto");
    for (tag, mode, min_round) in [
        ("auto-predict", "predict", 1),
        ("auto-cautious", "cautious", 3),
    ] {
        let what = format!("x-tern-auto-postcopy {mode}");
        // Nobody asks for postcopy: the source decides.
        let (mut src, mut dst) = postcopy_pair(&d, tag, "random");
        let r = wait_migration(&mut src.q, MIGRATE);
        assert_eq!(r["status"], "completed", "{what}: {r}");
        let why = r["x-tern-auto-postcopy"].as_str().unwrap_or("");
        assert!(why.starts_with("switched at round "), "{what}: {r}");
        let round: u64 = why["switched at round ".len()..]
            .split(':')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(round >= min_round, "{what}: {why}");
        assert!(
            why.contains("dirty") && why.contains("link"),
            "{what}: {why}"
        );
        let n = paused_last_hb(&mut src.p);
        continues_on(&mut dst.p, n);
        eprintln!("{what}: {why}");
        // The timeline says it too, and its SVG shows the reason over the postcopy phase.
        let tl = d.join(format!("timeline-{tag}.json"));
        let t: Value = serde_json::from_str(&std::fs::read_to_string(&tl).unwrap()).unwrap();
        assert_eq!(t["auto-postcopy"], why, "{what}");
        assert_eq!(t["stop-reason"], "auto-postcopy", "{what}");
        let out = std::process::Command::new(tern_bin())
            .args(["report", tl.to_str().unwrap(), "-o"])
            .arg(d.join(format!("{tag}.svg")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let svg = std::fs::read_to_string(d.join(format!("{tag}.svg"))).unwrap();
        assert!(svg.contains("switched at round"), "{what}");
        quit(src);
        quit(dst);
    }
    // A guest that converges never switches.
    let mut src = source(&d, "calm", "1G", "tern.wss=256 tern.rate=64 tern.check=1");
    let uri = format!("unix:{}", d.join("calm.sock").display());
    let mut dst = target(&d, "calm-dst", &uri, &[]);
    src.q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]}),
    );
    src.q.ok(
        "migrate-set-parameters",
        json!({"x-tern-auto-postcopy": "predict"}),
    );
    src.q.ok("migrate", json!({"uri": uri}));
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "completed", "{r}");
    assert!(r.get("x-tern-auto-postcopy").is_none(), "{r}");
    assert_eq!(r["ram"]["postcopy-bytes"], 0, "{r}");
    let n = paused_last_hb(&mut src.p);
    continues_on(&mut dst.p, n);
    quit(src);
    quit(dst);
}

#[test]
fn auto_postcopy_without_postcopy_ram_is_refused_and_the_source_runs_on() {
    let _g = exclusive();
    let d = dir("postcopy-auto-refused");
    let mut src = source(&d, "src", "1G", GUEST);
    let uri = format!("unix:{}", d.join("m.sock").display());
    let _dst = target(&d, "dst", &uri, &[]);
    src.q.ok(
        "migrate-set-parameters",
        json!({"x-tern-auto-postcopy": "predict"}),
    );
    src.q.ok("migrate", json!({"uri": uri}));
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["error-desc"]
            .as_str()
            .unwrap_or("")
            .contains("needs the postcopy-ram capability"),
        "{r}"
    );
    source_still_fine(&mut src.p, &mut src.q);
}
