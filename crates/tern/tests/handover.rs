//! Moving without copying, through real KVM: `mode` `cpr-transfer` hands the guest's memfd to a
//! tern on the same host over a unix socket (SCM_RIGHTS) and sends only the device state. The
//! guest goes on where it was, its self-check of every page passes, nothing of its RAM crosses
//! the socket, and the old process holds no mapping of the memory afterwards; a failure before
//! the commit leaves the source running on its memory; `tern migrate --mode cpr-transfer` is a
//! live upgrade (the old tern exits).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

fn maps_memory(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .contains("memfd:tern-guest-ram")
}

#[test]
fn a_hand_over_moves_no_memory_and_a_failed_one_leaves_the_source_on_its_own() {
    let _x = exclusive();
    let d = dir("handover");
    let cmdline = "tern.wss=256 tern.rate=64 tern.check=1 tern.hb=20";
    let mut src = source_with(&d, "src", "1G", cmdline, &["--memory-backend", "memfd"]);
    let uri = format!("unix:{}", d.join("h.sock").display());
    src.q
        .ok("migrate-set-parameters", json!({"mode": "cpr-transfer"}));

    // Refused plainly: another transport.
    src.q.ok("migrate", json!({"uri": "tcp:127.0.0.1:1"}));
    let r = wait_migration(&mut src.q, LINE);
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["error-desc"]
            .as_str()
            .unwrap_or("")
            .contains("unix: socket"),
        "{r}"
    );

    // A target that fails before LOADED: the source resumes, on its own memory.
    let mut bad = target(&d, "bad", "defer", &[]);
    bad.q.ok(
        "migrate-set-parameters",
        json!({"x-tern-switchover-fault": "before-loaded:cut"}),
    );
    bad.q.ok("migrate-incoming", json!({"uri": uri}));
    src.q.ok("migrate", json!({"uri": uri}));
    let r = wait_migration(&mut src.q, LINE);
    assert_eq!(r["status"], "failed", "{r}");
    source_still_fine(&mut src.p, &mut src.q);
    assert!(maps_memory(src.p.child.id()), "the source keeps its memory");
    let _ = bad.p.wait_exit(LINE);

    // The hand-over.
    let mut dst = target(&d, "dst", &uri, &[]);
    src.q.ok("migrate", json!({"uri": uri}));
    let r = wait_migration(&mut src.q, Duration::from_secs(60));
    assert_eq!(r["status"], "completed", "{r}");
    let sent = r["ram"]["transferred"].as_u64().unwrap_or(u64::MAX);
    assert!(sent < 1 << 20, "RAM bytes went over the socket: {r}");
    let n = paused_last_hb(&mut src.p);
    continues_on(&mut dst.p, n);
    // The old process holds no mapping of the guest's memory, and refuses to read it.
    assert!(
        !maps_memory(src.p.child.id()),
        "the source still maps the memory it handed over"
    );
    let e = src.q.err(
        "pmemsave",
        json!({"val": 0, "size": 4096, "filename": d.join("p.bin").display().to_string()}),
    );
    assert!(e.contains("handed to another process"), "{e}");
    // And the target can hand it on again (the guest keeps running).
    let (mut third, uri2) = {
        let uri2 = format!("unix:{}", d.join("h2.sock").display());
        (target(&d, "third", &uri2, &[]), uri2)
    };
    let rd = wait_migration(&mut dst.q, LINE);
    assert_eq!(rd["status"], "completed", "{rd}");
    dst.q
        .ok("migrate-set-parameters", json!({"mode": "cpr-transfer"}));
    dst.q.ok("migrate", json!({"uri": uri2}));
    let r = wait_migration(&mut dst.q, Duration::from_secs(60));
    assert_eq!(r["status"], "completed", "{r}");
    let n = paused_last_hb(&mut dst.p);
    continues_on(&mut third.p, n);
    quit(src);
    quit(dst);
    quit(third);
}

/// The live upgrade: `tern migrate --mode cpr-transfer` from an 8 GiB guest with a 4 GiB working
/// set to a new tern on the same host; the old one exits, the guest goes on.
#[test]
fn tern_migrate_hands_a_big_guest_to_a_new_tern_and_the_old_one_exits() {
    let _x = exclusive();
    let d = dir("upgrade");
    let cmdline = "tern.wss=4096 tern.rate=64 tern.check=4 tern.hb=20";
    let mut src = source_with(&d, "src", "8G", cmdline, &["--memory-backend", "memfd"]);
    let uri = format!("unix:{}", d.join("up.sock").display());
    let mut dst = target(&d, "dst", &uri, &[]);
    let out = Command::new(tern_bin())
        .args(["migrate", "--mode", "cpr-transfer", "--qmp"])
        .arg(format!("unix:{}", d.join("src.qmp").display()))
        .arg(&uri)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("the old tern exits"), "{text}");
    let total: u64 = text
        .split("total time ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .expect("the summary's total time");
    // Nothing of the 4 GiB was copied (a copy takes seconds here: bench/compare.py measures
    // about 1.2 GB/s on loopback).
    assert!(
        text.contains("(0 pages with data, 0 zero pages)"),
        "pages went over the socket: {text}"
    );
    assert!(total < 3000, "the hand-over took {total} ms: {text}");
    let st = src.p.wait_exit(LINE);
    assert_eq!(st.code(), Some(0), "the old tern exits cleanly");
    let n = paused_last_hb(&mut src.p);
    continues_on(&mut dst.p, n);
    quit(dst);
}
