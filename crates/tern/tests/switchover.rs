//! The switch-over through real KVM: at each step (before LOADED, between LOADED and GO, between
//! GO and RUNNING) the connection is cut, the source is cancelled, or the target is killed with
//! SIGKILL. Each time the guest runs in at most one process; in exactly one wherever the protocol
//! knows who won; the running copy's heartbeat continues and its self-check passes; the in-doubt
//! case says so. And racing `migrate` commands start exactly one migration.

mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SETTLE: Duration = Duration::from_secs(120);

/// What the test does at the fault's step.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The source cuts the connection at that step.
    Cut,
    /// `migrate_cancel` on the source while it holds at that step.
    Cancel,
    /// SIGKILL to the target while one side holds at that step.
    KillTarget,
}

/// Who runs the guest afterwards.
#[derive(Debug, PartialEq, Eq)]
enum Winner {
    Source,
    Target,
    /// Reported in doubt, and nobody runs it: the operator resumes the source.
    NobodyInDoubt,
}

fn query(q: &mut Qmp) -> Value {
    q.ok("query-migrate", json!({}))
}

/// Polls `query-migrate` until `x-tern-fault-holding` names `step`.
fn wait_holding(q: &mut Qmp, step: &str) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let r = query(q);
        if r["x-tern-fault-holding"] == step {
            return;
        }
        assert!(Instant::now() < deadline, "never held at {step}: {r}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status(q: &mut Qmp) -> String {
    q.ok("query-status", json!({}))["status"]
        .as_str()
        .unwrap()
        .to_string()
}

/// One case: migrate a small busy guest with `fault` at `step`, then check who runs it.
fn case(d: &Path, step: &str, fault: Fault, want: Winner) {
    let tag = format!("{step}-{fault:?}");
    let mut src = source(
        d,
        &format!("src-{tag}"),
        "256M",
        "tern.wss=64 tern.rate=32 tern.check=1 tern.hb=50",
    );
    let mut dst = target(d, &format!("dst-{tag}"), "defer", &[]);
    let uri = format!("unix:{}", d.join(format!("{tag}.sock")).display());
    // Where the hold or the cut is placed: a killed target after GO must have *received* GO, so
    // that hold is the target's; every other fault is the source's.
    let (src_fault, dst_fault) = match (fault, step) {
        // After GO the target holds before it runs, so that RUNNING cannot beat the cut.
        (Fault::Cut, "before-running") => (format!("{step}:cut"), format!("{step}:hold:3000")),
        (Fault::Cut, _) => (format!("{step}:cut"), String::new()),
        (Fault::KillTarget, "before-loaded" | "before-running") => {
            (String::new(), format!("{step}:hold:3000"))
        }
        _ => (format!("{step}:hold:3000"), String::new()),
    };
    if !dst_fault.is_empty() {
        dst.q.ok(
            "migrate-set-parameters",
            json!({"x-tern-switchover-fault": dst_fault}),
        );
    }
    dst.q.ok("migrate-incoming", json!({"uri": uri}));
    if !src_fault.is_empty() {
        src.q.ok(
            "migrate-set-parameters",
            json!({"x-tern-switchover-fault": src_fault}),
        );
    }
    src.q.ok("migrate", json!({"uri": uri}));
    match fault {
        Fault::Cut => {}
        Fault::Cancel => {
            wait_holding(&mut src.q, step);
            let r = src.q.execute("migrate_cancel", json!({}));
            if step == "before-running" {
                let e = r["error"]["desc"].as_str().unwrap_or_default().to_string();
                assert!(e.contains("point of no return"), "{r}");
            } else {
                assert!(r.get("return").is_some(), "{r}");
            }
        }
        Fault::KillTarget => {
            if dst_fault.is_empty() {
                wait_holding(&mut src.q, step);
            } else {
                wait_holding(&mut dst.q, step);
            }
            dst.p.child.kill().unwrap();
        }
    }
    let r = wait_migration(&mut src.q, SETTLE);
    let in_doubt = r["x-tern-in-doubt"] == true;
    match want {
        Winner::Source => {
            assert!(!in_doubt, "{r}");
            let expected = if matches!(fault, Fault::Cancel) {
                "cancelled"
            } else {
                "failed"
            };
            assert_eq!(r["status"], expected, "{r}");
            if matches!(fault, Fault::KillTarget) && step == "before-go" {
                // Seen before the commit, not by a failing GO.
                let e = r["error-desc"].as_str().unwrap_or_default();
                assert!(e.contains("went away after LOADED"), "{r}");
            }
            source_still_fine(&mut src.p, &mut src.q);
            // The target never ran the guest: it exits without a heartbeat.
            let st = dst.p.wait_exit(SETTLE);
            assert_ne!(st.code(), Some(0), "the target must fail");
            dst.p.drain();
            assert!(
                !dst.p.seen.iter().any(|l| is_hb(l)),
                "the target ran the guest: {:?}",
                dst.p.tail()
            );
            quit(src);
        }
        Winner::Target => {
            if matches!(fault, Fault::Cut) {
                // The source cut after GO: it cannot know, and says so.
                assert_eq!(r["status"], "failed", "{r}");
                assert!(in_doubt, "{r}");
                assert!(
                    r["error-desc"].as_str().unwrap().contains("may be running"),
                    "{r}"
                );
                assert_eq!(status(&mut src.q), "paused");
            } else {
                assert_eq!(r["status"], "completed", "{r}");
                assert_eq!(status(&mut src.q), "postmigrate");
            }
            let n_src = paused_last_hb(&mut src.p);
            continues_on(&mut dst.p, n_src);
            assert_eq!(status(&mut dst.q), "running");
            // The paused source prints nothing more.
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(last_hb(&mut src.p), n_src, "the source ran again");
            quit(src);
            quit(dst);
        }
        Winner::NobodyInDoubt => {
            assert_eq!(r["status"], "failed", "{r}");
            assert!(in_doubt, "{r}");
            assert_eq!(status(&mut src.q), "paused");
            // No new migration from an in-doubt source.
            let e = src
                .q
                .execute("migrate", json!({"uri": "exec:cat > /dev/null"}));
            assert!(
                e["error"]["desc"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("in doubt"),
                "{e}"
            );
            dst.p.wait_exit(SETTLE);
            // The operator checked the target (dead) and resumes the source.
            src.q.ok("cont", json!({}));
            source_still_fine(&mut src.p, &mut src.q);
            quit(src);
        }
    }
}

#[test]
fn faults_at_every_switchover_step_never_run_the_guest_twice() {
    let _g = exclusive();
    let d = dir("switchover");
    let t0 = Instant::now();
    for (step, fault, want) in [
        ("before-loaded", Fault::Cut, Winner::Source),
        ("before-go", Fault::Cut, Winner::Source),
        ("before-running", Fault::Cut, Winner::Target),
        ("before-loaded", Fault::Cancel, Winner::Source),
        ("before-go", Fault::Cancel, Winner::Source),
        ("before-running", Fault::Cancel, Winner::Target),
        ("before-loaded", Fault::KillTarget, Winner::Source),
        ("before-go", Fault::KillTarget, Winner::Source),
        ("before-running", Fault::KillTarget, Winner::NobodyInDoubt),
    ] {
        let t = Instant::now();
        case(&d, step, fault, want);
        eprintln!(
            "switch-over fault {fault:?} at {step}: ok in {:?}",
            t.elapsed()
        );
    }
    eprintln!("fault matrix: {:?}", t0.elapsed());
}

#[test]
fn racing_migrate_commands_start_exactly_one() {
    let _g = exclusive();
    let d = dir("race");
    let src = source(&d, "src", "256M", "tern.wss=64 tern.rate=16 tern.check=1");
    let sock = d.join("src.qmp");
    let mut a = src.q;
    let mut b = Qmp::connect(&sock, LINE);
    let mut p = src.p;
    // Slow enough that the winner is still running when the loser asks.
    a.ok("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
    let barrier = Arc::new(Barrier::new(2));
    let t0 = Instant::now();
    for i in 0..50 {
        let uri = "exec:cat > /dev/null";
        let bb = barrier.clone();
        let other = std::thread::spawn(move || {
            bb.wait();
            let r = b.execute("migrate", json!({"uri": uri}));
            (b, r)
        });
        barrier.wait();
        let ra = a.execute("migrate", json!({"uri": uri}));
        let (b2, rb) = other.join().unwrap();
        b = b2;
        let ok = [&ra, &rb]
            .iter()
            .filter(|r| r.get("return").is_some())
            .count();
        assert_eq!(ok, 1, "iteration {i}: {ra} / {rb}");
        let err = if ra.get("error").is_some() { &ra } else { &rb };
        assert_eq!(
            err["error"]["desc"], "There's a migration process in progress",
            "iteration {i}"
        );
        let r = a.ok("query-migrate", json!({}));
        assert!(
            matches!(r["status"].as_str(), Some("setup" | "active")),
            "{r}"
        );
        a.ok("migrate_cancel", json!({}));
        let r = wait_migration(&mut a, SETTLE);
        assert_eq!(r["status"], "cancelled", "iteration {i}: {r}");
        if i < 3 {
            eprintln!("iteration {i} done at {:?}", t0.elapsed());
        }
    }
    eprintln!("50 racing starts: {:?}", t0.elapsed());
    source_still_fine(&mut p, &mut a);
    quit(Vmm { p, q: a });
}

/// `tern save` right after the guest is ready, 50 times, with a busy guest beside it: each save
/// completes (a `query-migrate` right after `migrate` used to see no migration yet, and the save
/// then failed leaving the guest stopped and the file empty).
#[test]
fn tern_save_right_after_ready_completes_fifty_times_on_a_loaded_machine() {
    let _g = exclusive();
    let d = dir("save50");
    // The load: a guest dirtying memory as fast as it can, on the other core.
    let _busy = source(
        &d,
        "busy",
        "256M",
        "tern.wss=128 tern.rate=100000 tern.check=0",
    );
    let t0 = Instant::now();
    for i in 0..50 {
        let sock = d.join(format!("g{i}.qmp"));
        let mut p = Proc::tern_run(&[
            "--memory",
            "64M",
            "--cmdline",
            "tern.wss=8 tern.rate=16 tern.check=0",
            "--qmp",
            &format!("unix:{}", sock.display()),
        ]);
        p.wait_for("ready", BOOT, |l| l == "tern-guest ready");
        let file = d.join(format!("g{i}.tern"));
        let out = std::process::Command::new(tern_bin())
            .args(["save", "--qmp", &format!("unix:{}", sock.display())])
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("save completed"),
            "save {i}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::fs::metadata(&file).unwrap().len() > 8 << 20,
            "save {i}"
        );
        std::fs::remove_file(&file).unwrap();
        let mut q = Qmp::connect(&sock, LINE);
        let _ = q.execute("quit", json!({}));
        assert_eq!(p.wait_exit(LINE).code(), Some(0));
    }
    eprintln!("50 saves: {:?}", t0.elapsed());
}
