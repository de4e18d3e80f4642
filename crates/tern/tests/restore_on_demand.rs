//! `tern save --layout mapped` and `tern restore [--on-demand]` through real KVM: a guest with
//! a 4 GiB working set is saved with every page at a fixed offset, restored in full and on
//! demand (its heartbeat continues and its self-check of every page passes either way, and the
//! time to its first heartbeat is printed for both); a corrupt page fails the restore naming
//! the page before the guest sees it, and a truncated file fails before the guest runs.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// The working set, MiB (`TERN_RESTORE_WSS_MIB` to try others).
fn wss_mib() -> u64 {
    std::env::var("TERN_RESTORE_WSS_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4096)
}

/// `tern restore [extra] FILE` until the first heartbeat: returns the process, the time it took
/// and that heartbeat's number.
fn restore(d: &std::path::Path, file: &std::path::Path, extra: &[&str]) -> (Vmm, Duration, u64) {
    let sock = d.join(format!("restore{}.qmp", extra.len()));
    let _ = std::fs::remove_file(&sock);
    let qmp = format!("unix:{}", sock.display());
    let mut cmd = Command::new(tern_bin());
    cmd.arg("restore")
        .args(extra)
        .args(["--qmp", &qmp])
        .arg(file);
    let t0 = Instant::now();
    let mut p = Proc::spawn(&mut cmd);
    let first = p.wait_for("a heartbeat after the restore", BOOT, is_hb);
    let took = t0.elapsed();
    let (n, _) = hb(&first).unwrap();
    let q = Qmp::connect(&sock, LINE);
    (Vmm { p, q }, took, n)
}

/// The restored guest goes on (a later heartbeat) and its self-check of every page passes.
fn carries_on(v: &mut Vmm, first: u64) {
    let next = v.p.wait_for("the next heartbeat", LINE, is_hb);
    assert!(hb(&next).unwrap().0 > first, "{next}");
    let check =
        v.p.wait_for("the self-check", Duration::from_secs(120), |l| {
            l.starts_with("tern-guest check")
        });
    assert!(check.starts_with("tern-guest check ok"), "{check}");
}

/// `tern restore` with a time limit: its exit status and what it printed.
fn restore_fails(file: &std::path::Path) -> (Option<i32>, String, String) {
    let out = Command::new("timeout")
        .args(["-k", "10", "120", tern_bin(), "restore", "--on-demand"])
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_mapped_save_restores_in_full_and_on_demand_and_a_bad_file_never_runs_a_wrong_page() {
    let _g = exclusive();
    let d = dir("restore-on-demand");
    let wss = wss_mib();
    let memory = format!("{}M", wss + 1024);
    let src = source(
        &d,
        "src",
        &memory,
        &format!("tern.wss={wss} tern.rate=64 tern.check=20 tern.pattern=random"),
    );
    let file = d.join("guest.tern");
    let t = Instant::now();
    let saved = Command::new(tern_bin())
        .args(["save", "--layout", "mapped", "--qmp"])
        .arg(format!("unix:{}", d.join("src.qmp").display()))
        .arg(&file)
        .status()
        .unwrap();
    assert!(saved.success());
    eprintln!(
        "saved {wss} MiB of working set in {} ms",
        t.elapsed().as_millis()
    );
    let mut src = src;
    let last = paused_last_hb(&mut src.p);
    quit(src);
    // Its records and every page check out.
    let v = Command::new(tern_bin())
        .arg("verify")
        .arg(&file)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&v.stdout);
    assert!(
        v.status.success() && said.contains("mapped layout"),
        "{said}"
    );

    let (mut full, full_t, n) = restore(&d, &file, &[]);
    assert_eq!(
        n,
        last + 1,
        "the full restore's guest goes on where it stopped"
    );
    carries_on(&mut full, n);
    quit(full);

    let (mut od, od_t, n) = restore(&d, &file, &["--on-demand"]);
    assert_eq!(
        n,
        last + 1,
        "the on-demand restore's guest goes on where it stopped"
    );
    // Running (not "inmigrate") while the pages are still being filled in.
    assert_eq!(
        od.q.ok("query-status", json!({})),
        json!({"running": true, "status": "running"})
    );
    carries_on(&mut od, n);
    let r = wait_migration(&mut od.q, Duration::from_secs(120));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["x-tern-restore"]["mode"], "on-demand", "{r}");
    eprintln!(
        "{wss} MiB working set: first heartbeat after a full restore {} ms, on demand {} ms \
         (running after {} ms, every page in after {} ms, {} pages faulted in first)",
        full_t.as_millis(),
        od_t.as_millis(),
        r["x-tern-restore"]["running-ms"],
        r["x-tern-restore"]["filled-ms"],
        r["x-tern-restore"]["faults"]
    );
    // The guest still runs once every page is in.
    let _ = od.p.wait_for("a heartbeat after the fill", LINE, is_hb);
    quit(od);

    // One flipped bit in a page with data: verify names it, the restore fails naming it and the
    // guest never reports a wrong page.
    let a = json!(Command::new(tern_bin())
        .args(["analyze", "--json"])
        .arg(&file)
        .output()
        .map(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap())
        .unwrap());
    let area = a["mapped"]["regions"][0]["data_offset"].as_u64().unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let mut page = vec![0u8; 4096];
    let mut p = 0;
    loop {
        f.read_exact_at(&mut page, area + p * 4096).unwrap();
        if page.iter().any(|&b| b != 0) {
            break;
        }
        p += 1;
    }
    page[123] ^= 0x10;
    f.write_all_at(&page, area + p * 4096).unwrap();
    let v = Command::new(tern_bin())
        .arg("verify")
        .arg(&file)
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&v.stderr);
    assert!(!v.status.success(), "{why}");
    assert!(
        why.contains(&format!("page {p} of region 0 does not match its CRC")),
        "{why}"
    );
    let (code, out, err) = restore_fails(&file);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains(&format!("page {p} of region 0 does not match")),
        "{err}"
    );
    assert!(
        !out.contains("check FAIL"),
        "the guest saw a wrong page: {out}"
    );

    // Cut short: refused before the guest runs.
    f.set_len(area + 4096).unwrap();
    let (code, out, err) = restore_fails(&file);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(err.contains("ends before the last page"), "{err}");
    assert!(!out.contains("tern-guest hb"), "the guest ran: {out}");
    let _ = std::fs::remove_file(&file);
}
