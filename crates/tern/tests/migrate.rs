//! Live migration of the built-in guest between two tern processes, through real KVM.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const MIGRATE: Duration = Duration::from_secs(180);

/// Migrates `src` to a new target at `uri`; checks continuity, the guest's self-check on the
/// target, the source's postmigrate state and the RAM digests. Returns the target.
fn migrate(d: &Path, src: &mut Vmm, tag: &str, uri: &str) -> Vmm {
    let mut dst = target(d, tag, uri, &[]);
    src.q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [
        {"capability": "events", "state": true},
        {"capability": "x-tern-ram-digest", "state": true}]}),
    );
    assert_eq!(src.q.ok("migrate", json!({"uri": uri})), json!({}));
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "completed", "{r}");
    assert!(
        r["downtime"].is_u64() && r["ram"]["transferred"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert_eq!(
        src.q.ok("query-status", json!({})),
        json!({"running": false, "status": "postmigrate"})
    );
    let n_src = paused_last_hb(&mut src.p);
    // The target runs the same guest: its heartbeat continues, no restart.
    continues_on(&mut dst.p, n_src);
    let rd = dst.q.ok("query-migrate", json!({}));
    assert_eq!(rd["status"], "completed", "{rd}");
    assert_eq!(
        dst.q.ok("query-status", json!({})),
        json!({"running": true, "status": "running"})
    );
    assert!(r["x-tern-ram-digest"].is_string());
    assert_eq!(
        r["x-tern-ram-digest"], rd["x-tern-ram-digest"],
        "RAM at the switch-over differs"
    );
    // MIGRATION events, QEMU style.
    let ev = src.q.wait_event("MIGRATION");
    assert!(ev["data"]["status"].is_string());
    dst
}

fn matrix(transport: &str) {
    let _g = exclusive();
    let d = dir(&format!("matrix-{transport}"));
    for rate in [0, 64, 256] {
        let cmdline = format!("tern.wss=512 tern.rate={rate} tern.check=2");
        let mut src = source(&d, &format!("src{rate}"), "1G", &cmdline);
        let uri = match transport {
            "unix" => format!("unix:{}", d.join(format!("mig{rate}.sock")).display()),
            _ => free_tcp_uri(),
        };
        let dst = migrate(&d, &mut src, &format!("dst{rate}"), &uri);
        quit(src);
        quit(dst);
    }
}

#[test]
fn over_unix_at_0_64_256_mib_s() {
    matrix("unix");
}

#[test]
fn over_tcp_at_0_64_256_mib_s() {
    matrix("tcp");
}

#[test]
fn ten_migrations_back_and_forth() {
    let _g = exclusive();
    let d = dir("tenfold");
    let mut vm = source(&d, "gen0", "512M", "tern.wss=128 tern.rate=64 tern.check=1");
    for i in 1..=10 {
        let uri = format!("unix:{}", d.join(format!("m{i}.sock")).display());
        let next = migrate(&d, &mut vm, &format!("gen{i}"), &uri);
        quit(std::mem::replace(&mut vm, next));
    }
    quit(vm);
}

#[test]
fn cancel_leaves_the_source_running() {
    let _g = exclusive();
    let d = dir("cancel");
    let mut src = source(&d, "src", "1G", "tern.wss=512 tern.rate=64 tern.check=1");
    let uri = format!("unix:{}", d.join("mig.sock").display());
    let mut dst = target(&d, "dst", &uri, &[]);
    src.q
        .ok("migrate-set-parameters", json!({"max-bandwidth": 32 << 20}));
    src.q.ok("migrate", json!({"uri": uri}));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(src.q.ok("query-migrate", json!({}))["status"], "active");
    src.q.ok("migrate_cancel", json!({}));
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "cancelled", "{r}");
    source_still_fine(&mut src.p, &mut src.q);
    // The target gives up with a reason and a non-zero exit.
    let st = dst.p.wait_exit(LINE);
    assert_ne!(st.code(), Some(0));
    quit(src);
}

#[test]
fn a_target_killed_mid_way_fails_the_migration_and_the_source_runs_on() {
    let _g = exclusive();
    let d = dir("killed");
    let mut src = source(&d, "src", "1G", "tern.wss=512 tern.rate=64 tern.check=1");
    let uri = free_tcp_uri();
    let mut dst = target(&d, "dst", &uri, &[]);
    src.q
        .ok("migrate-set-parameters", json!({"max-bandwidth": 32 << 20}));
    src.q.ok("migrate", json!({"uri": uri}));
    std::thread::sleep(Duration::from_secs(2));
    dst.p.child.kill().unwrap();
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "failed", "{r}");
    assert!(r["error-desc"].is_string(), "{r}");
    source_still_fine(&mut src.p, &mut src.q);
    quit(src);
}

#[test]
fn a_target_with_other_memory_refuses_and_exits_non_zero() {
    let _g = exclusive();
    let d = dir("refuse");
    let mut src = source(&d, "src", "512M", "tern.wss=128 tern.check=1");
    let uri = format!("unix:{}", d.join("mig.sock").display());
    let sock = d.join("dst.qmp");
    let out = {
        let mut cmd = Command::new(tern_bin());
        cmd.args([
            "run",
            "--incoming",
            &uri,
            "--memory",
            "1G",
            "--vcpus",
            "2",
            "--serial",
            "none",
            "--qmp",
            &format!("unix:{}", sock.display()),
        ]);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // The QMP socket answers only once the migration listener listens (a socket file that
        // exists may not accept yet).
        drop(Qmp::connect(&sock, LINE));
        src.q.ok("migrate", json!({"uri": uri}));
        let deadline = Instant::now() + LINE;
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the target did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains("memory is 1.0G here but 512M in the stream"),
        "{stderr}"
    );
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["error-desc"]
            .as_str()
            .unwrap()
            .contains("memory is 1.0G here"),
        "{r}"
    );
    source_still_fine(&mut src.p, &mut src.q);
    quit(src);
}

#[test]
fn deferred_incoming_and_qmp_parameters() {
    let _g = exclusive();
    let d = dir("defer");
    let mut src = source(&d, "src", "512M", "tern.wss=64 tern.rate=16");
    assert_eq!(src.q.ok("query-migrate", json!({})), json!({}));
    let p = src.q.ok("query-migrate-parameters", json!({}));
    assert_eq!(p["downtime-limit"], 300, "{p}");
    assert_eq!(p["max-bandwidth"], 0, "{p}");
    assert_eq!(p["cpu-throttle-initial"], 20, "{p}");
    assert_eq!(p["x-tern-limit-action"], "fail", "{p}");
    src.q
        .ok("migrate-set-parameters", json!({"downtime-limit": 100}));
    assert_eq!(
        src.q.ok("query-migrate-parameters", json!({}))["downtime-limit"],
        100
    );
    let e = src.q.execute("migrate-set-parameters", json!({"bogus": 1}));
    assert_eq!(e["error"]["desc"], "Parameter 'bogus' is unexpected");
    let e = src.q.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "xbzrle", "state": true}]}),
    );
    assert!(
        e["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("not supported"),
        "{e}"
    );
    let caps = src.q.ok("query-migrate-capabilities", json!({}));
    assert!(caps
        .as_array()
        .unwrap()
        .contains(&json!({"capability": "events", "state": false})));
    let e = src
        .q
        .execute("migrate", json!({"uri": "carrier-pigeon:home"}));
    assert!(
        e["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("invalid migration URI"),
        "{e}"
    );

    let mut dst = target(&d, "dst", "defer", &[]);
    let uri = format!("unix:{}", d.join("mig.sock").display());
    assert_eq!(dst.q.ok("migrate-incoming", json!({"uri": uri})), json!({}));
    let e = dst.q.execute("migrate-incoming", json!({"uri": uri}));
    assert!(e.get("error").is_some());
    src.q.ok("migrate", json!({"uri": uri}));
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "completed", "{r}");
    let first = dst.p.wait_for("a heartbeat on the target", LINE, is_hb);
    assert!(hb(&first).is_some());
    let e = src.q.execute("cont", json!({}));
    assert!(
        e.get("error").is_some(),
        "a migrated-away source must not run: {e}"
    );
    quit(src);
    quit(dst);
}
