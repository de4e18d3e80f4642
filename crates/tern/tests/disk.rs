//! virtio-blk through real KVM: the guest writes its disk from ring 3 while it dirties RAM, and
//! the disk moves with it — copied in the same rounds as RAM when each side has its own file,
//! not copied when the storage is shared — or stays in its file across save and restore.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const MIGRATE: Duration = Duration::from_secs(180);
/// The disks that move: big enough to take several rounds beside the guest's RAM, small enough
/// that three of them fit a CI machine's disk (the guest writes every block of its disk).
const DISK: u64 = 256 << 20;
/// The guest writes its disk at 32 MiB/s while it dirties 64 MiB/s of RAM.
const WORKLOAD: &str = "tern.wss=128 tern.rate=64 tern.disk_rate=32 tern.check=2";

fn disk_file(d: &Path, name: &str, size: u64) -> PathBuf {
    let p = d.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

fn disk_arg(p: &Path, extra: &str) -> String {
    format!("path={}{extra}", p.display())
}

/// The number of blocks in a `tern-guest disk ok <n> writes=<w>` line, and its writes.
fn disk_ok(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("tern-guest disk ok ")?;
    let (n, w) = rest.split_once(" writes=")?;
    Some((n.parse().ok()?, w.trim().parse().ok()?))
}

/// Waits for a passing pass over the disk that verified at least one block.
fn disk_checked(p: &mut Proc, what: &str) -> (u64, u64) {
    let l = p.wait_for(what, Duration::from_secs(60), |l| {
        disk_ok(l).is_some_and(|(n, w)| n > 0 && w > 0)
    });
    disk_ok(&l).unwrap()
}

fn digest(p: &Path) -> u64 {
    // FNV-1a over the file, 1 MiB at a time (a 1 GiB file takes about a second).
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h;
        }
        for chunk in buf[..n].chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn with_digest(src: &mut Vmm) {
    src.q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-tern-ram-digest", "state": true}]}),
    );
}

/// Source with its disk, past one passing disk check.
fn disk_source(d: &Path, tag: &str, disk: &str) -> Vmm {
    let mut src = source_with(d, tag, "512M", WORKLOAD, &["--disk", disk]);
    disk_checked(&mut src.p, "a disk check on the source");
    src
}

/// After the switch-over: the target (started with -S) holds the guest paused; `cont` runs it,
/// and it carries on where the source stopped, its RAM and disk checks passing.
fn cont_and_continue(src: &mut Vmm, dst: &mut Vmm, r: &Value) {
    let n = paused_last_hb(&mut src.p);
    let rd = dst.q.ok("query-migrate", json!({}));
    assert_eq!(rd["status"], "completed", "{rd}");
    assert_eq!(
        r["x-tern-ram-digest"], rd["x-tern-ram-digest"],
        "RAM differs"
    );
    dst.q.ok("cont", json!({}));
    continues_on(&mut dst.p, n);
    let (_, writes) = disk_checked(&mut dst.p, "a disk check on the target");
    assert!(writes > 0);
}

#[test]
fn a_disk_of_its_own_moves_in_the_same_rounds_and_matches_at_the_commit() {
    let _g = exclusive();
    let d = dir("disk-copy");
    let (s, t) = (
        disk_file(&d, "src.img", DISK),
        disk_file(&d, "dst.img", DISK),
    );
    let mut src = disk_source(&d, "src", &disk_arg(&s, ""));
    let uri = free_tcp_uri();
    let mut dst = target(&d, "dst", &uri, &["-S", "--disk", &disk_arg(&t, "")]);
    with_digest(&mut src);
    src.q.ok("migrate", json!({"uri": uri}));
    // The disk is reported while it moves, in QEMU's `disk` shape.
    let during = wait_until(&mut src.q, "the disk's statistics", |r| {
        r["disk"]["total"] == json!(DISK) || r["status"] == "completed"
    });
    assert!(during.get("disk").is_some(), "{during}");
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["disk"]["total"], json!(DISK), "{r}");
    assert_eq!(r["disk"]["remaining"], json!(0), "{r}");
    let sent = r["disk"]["transferred"].as_u64().unwrap();
    assert!(sent > 0 && sent < 2 * DISK, "{r}");
    // Both sides are stopped at the commit (the target by -S): the files are the same.
    assert_eq!(
        digest(&s),
        digest(&t),
        "the target's disk differs from the source's"
    );
    cont_and_continue(&mut src, &mut dst, &r);
    quit(src);
    quit(dst);
}

#[test]
fn a_shared_disk_is_not_copied_and_changes_hands_at_the_commit() {
    let _g = exclusive();
    let d = dir("disk-shared");
    let s = disk_file(&d, "shared.img", DISK);
    let arg = disk_arg(&s, ",shared=on");
    let mut src = disk_source(&d, "src", &arg);
    let uri = free_tcp_uri();
    let mut dst = target(&d, "dst", &uri, &["-S", "--disk", &arg]);
    with_digest(&mut src);
    src.q.ok("migrate", json!({"uri": uri}));
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "completed", "{r}");
    assert!(r.get("disk").is_none(), "a shared disk is not copied: {r}");
    // Only RAM (512 MiB, mostly never written) and the state went over.
    assert!(r["ram"]["transferred"].as_u64().unwrap() < 400 << 20, "{r}");
    // The source stopped writing at the pause: the file no longer changes.
    let before = digest(&s);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        before,
        digest(&s),
        "the source wrote the shared disk after the commit"
    );
    cont_and_continue(&mut src, &mut dst, &r);
    quit(src);
    quit(dst);
}

#[test]
fn save_and_restore_leave_the_disk_in_its_file() {
    let _g = exclusive();
    let d = dir("disk-save");
    let s = disk_file(&d, "vm.img", 256 << 20);
    let arg = disk_arg(&s, "");
    let mut src = disk_source(&d, "src", &arg);
    let file = d.join("vm.tern");
    let qmp = format!("unix:{}", d.join("src.qmp").display());
    let out = Command::new(tern_bin())
        .args(["save", "--qmp", &qmp, file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The saved file holds RAM and state, not the disk.
    let saved = std::fs::metadata(&file).unwrap().len();
    assert!(
        saved < 200 << 20,
        "{saved} bytes: the disk went into the file"
    );
    let n = paused_last_hb(&mut src.p);
    quit(src);
    let rq = d.join("dst.qmp");
    let mut cmd = Command::new(tern_bin());
    cmd.arg("restore")
        .arg(&file)
        .args(["--disk", &arg, "--qmp"])
        .arg(format!("unix:{}", rq.display()));
    let p = Proc::spawn(&mut cmd);
    let q = Qmp::connect(&rq, LINE);
    let mut dst = Vmm { p, q };
    continues_on(&mut dst.p, n);
    disk_checked(&mut dst.p, "a disk check after the restore");
    quit(dst);
}

/// The guest goes on writing and checking its disk after a migration that did not happen.
fn source_disk_fine(src: &mut Vmm) {
    source_still_fine(&mut src.p, &mut src.q);
    let (_, w0) = disk_checked(&mut src.p, "a disk check after the failure");
    let (_, w1) = disk_checked(&mut src.p, "another disk check");
    assert!(w1 > w0, "the guest stopped writing its disk");
}

#[test]
fn cancel_and_a_killed_target_leave_the_source_writing_its_disk() {
    let _g = exclusive();
    let d = dir("disk-fail");
    let s = disk_file(&d, "src.img", DISK);
    let mut src = disk_source(&d, "src", &disk_arg(&s, ""));
    // Slow enough that the disk is still moving when we interfere (256 MiB take 16 s).
    src.q
        .ok("migrate-set-parameters", json!({"max-bandwidth": 16 << 20}));
    for (i, how) in ["cancel", "kill"].into_iter().enumerate() {
        let t = disk_file(&d, &format!("dst{i}.img"), DISK);
        let uri = free_tcp_uri();
        let mut dst = target(&d, &format!("dst{i}"), &uri, &["--disk", &disk_arg(&t, "")]);
        src.q.ok("migrate", json!({"uri": uri}));
        wait_until(&mut src.q, "the disk moving", |r| {
            r["disk"]["transferred"].as_u64().unwrap_or(0) > 32 << 20
        });
        match how {
            "cancel" => {
                src.q.ok("migrate_cancel", json!({}));
            }
            _ => {
                dst.p.child.kill().unwrap();
            }
        }
        let r = wait_migration(&mut src.q, MIGRATE);
        assert!(
            r["status"] == "cancelled" || r["status"] == "failed",
            "{how}: {r}"
        );
        source_disk_fine(&mut src);
        let _ = dst.p.child.kill();
        let _ = dst.p.child.wait();
    }
    quit(src);
}

#[test]
fn a_request_queued_at_the_pause_completes_exactly_once_on_the_target() {
    let _g = exclusive();
    let d = dir("disk-inflight");
    let (s, t) = (
        disk_file(&d, "src.img", 4 << 20),
        disk_file(&d, "dst.img", 4 << 20),
    );
    // Every request takes 2 ms, and the guest's check reads as fast as it may: it always has
    // some queued, so the pause finds some; they are served on the target.
    let slow = ",x-latency-ms=2";
    let log = d.join("src.log");
    let sock = d.join("src.qmp");
    let mut cmd = Command::new(tern_bin());
    cmd.env("TERN_LOG", "tern_vmm=info")
        .arg("run")
        .args(["--memory", "256M", "--cmdline"])
        .arg("tern.wss=32 tern.rate=16 tern.disk_rate=1 tern.check=2")
        .args(["--disk", &disk_arg(&s, slow), "--qmp"])
        .arg(format!("unix:{}", sock.display()));
    let p = Proc::spawn_with_stderr(&mut cmd, Stdio::from(std::fs::File::create(&log).unwrap()));
    let q = Qmp::connect(&sock, BOOT);
    let mut src = Vmm { p, q };
    src.p.wait_for("ready", BOOT, |l| l == "tern-guest ready");
    disk_checked(&mut src.p, "a disk check on the source");
    let uri = free_tcp_uri();
    let mut dst = target(&d, "dst", &uri, &["-S", "--disk", &disk_arg(&t, slow)]);
    with_digest(&mut src);
    src.q.ok("migrate", json!({"uri": uri}));
    let r = wait_migration(&mut src.q, MIGRATE);
    assert_eq!(r["status"], "completed", "{r}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("queued at the pause; they stay in the ring"),
        "no request was queued at the pause: {text}"
    );
    assert_eq!(digest(&s), digest(&t));
    // On the target: no completion twice (the guest prints `disk FAIL duplicate completion`),
    // none lost (`disk FAIL stuck`), every block as written.
    cont_and_continue(&mut src, &mut dst, &r);
    disk_checked(&mut dst.p, "a second disk check on the target");
    quit(src);
    quit(dst);
}

#[test]
fn bad_disks_are_named_in_one_line() {
    let d = dir("disk-bad");
    let run = |args: &[&str]| {
        let out = Command::new(tern_bin())
            .arg("run")
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].starts_with("tern: error: "), "{err}");
        lines[0].to_string()
    };
    let missing = d.join("missing.img");
    let e = run(&["--disk", &disk_arg(&missing, "")]);
    assert!(
        e.contains("missing.img") && e.contains("No such file"),
        "{e}"
    );
    let ro = disk_file(&d, "ro.img", 1 << 20);
    let mut perm = std::fs::metadata(&ro).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&ro, perm).unwrap();
    let e = run(&["--disk", &disk_arg(&ro, "")]);
    assert!(e.contains("read-only") && e.contains("readonly=on"), "{e}");
    let twice = disk_file(&d, "twice.img", 1 << 20);
    let e = run(&[
        "--disk",
        &disk_arg(&twice, ""),
        "--disk",
        &disk_arg(&twice, ""),
    ]);
    assert!(e.contains("in use by another VM or --disk"), "{e}");
    let odd = disk_file(&d, "odd.img", 1000);
    let e = run(&["--disk", &disk_arg(&odd, "")]);
    assert!(e.contains("not a positive multiple of 512"), "{e}");
    let e = run(&["--disk", &disk_arg(&odd, ",cache=none")]);
    assert!(e.contains("unknown disk option 'cache=none'"), "{e}");
}

#[test]
fn a_target_whose_disk_does_not_fit_refuses_and_the_source_runs_on() {
    let _g = exclusive();
    let d = dir("disk-mismatch");
    let s = disk_file(&d, "src.img", 256 << 20);
    let small = disk_file(&d, "small.img", 128 << 20);
    let mut src = disk_source(&d, "src", &disk_arg(&s, ""));
    // The source's own file, not marked shared: locked, the target does not even start.
    let out = Command::new(tern_bin())
        .args([
            "run",
            "--incoming",
            &free_tcp_uri(),
            "--disk",
            &disk_arg(&s, ""),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("in use by another VM"),
        "{err}"
    );
    for (i, (arg, says)) in [(disk_arg(&small, ""), "is 134217728 bytes")]
        .into_iter()
        .enumerate()
    {
        let uri = free_tcp_uri();
        let mut dst = target(&d, &format!("dst{i}"), &uri, &["--disk", &arg]);
        src.q.ok("migrate", json!({"uri": uri}));
        let r = wait_migration(&mut src.q, MIGRATE);
        assert_eq!(r["status"], "failed", "{r}");
        let why = r["error-desc"].as_str().unwrap_or_default();
        assert!(why.contains("disk 0") && why.contains(says), "{why}");
        source_disk_fine(&mut src);
        let _ = dst.p.child.kill();
        let _ = dst.p.child.wait();
    }
    quit(src);
}
