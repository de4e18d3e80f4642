//! Boots the built-in guest under real KVM and checks what it prints.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn ready(p: &mut Proc) -> String {
    p.wait_for("ready", BOOT, |l| l == "tern-guest ready");
    p.seen
        .iter()
        .find(|l| l.starts_with("tern-guest boot "))
        .cloned()
        .expect("boot line before ready")
}

fn heartbeat_advances(p: &mut Proc) {
    let (a, _) = hb(&p.wait_for("a heartbeat", LINE, is_hb)).unwrap();
    let (b, _) = hb(&p.wait_for("another heartbeat", LINE, is_hb)).unwrap();
    assert!(b > a, "heartbeat went from {a} to {b}");
}

#[test]
fn one_vcpu_boots_and_heartbeats() {
    let _g = exclusive();
    let mut p = Proc::tern_run(&[
        "--memory",
        "512M",
        "--vcpus",
        "1",
        "--cmdline",
        "tern.wss=64",
    ]);
    let boot = ready(&mut p);
    assert!(boot.contains("cpus=1 "), "{boot}");
    heartbeat_advances(&mut p);
    p.wait_for("a self-check", LINE, |l| l == "tern-guest check ok 16384");
}

#[test]
fn two_vcpus_boot_and_share_the_work() {
    let _g = exclusive();
    let mut p = Proc::tern_run(&[
        "--memory",
        "1G",
        "--vcpus",
        "2",
        "--cmdline",
        "tern.wss=256 tern.rate=64",
    ]);
    let boot = ready(&mut p);
    assert!(boot.contains("cpus=2 "), "both vCPUs run the guest: {boot}");
    heartbeat_advances(&mut p);
    p.wait_for("a self-check", LINE, |l| l == "tern-guest check ok 65536");
}

#[test]
fn memory_above_4g_is_split_around_the_hole_and_used() {
    let _g = exclusive();
    // 5 GiB: 3 GiB below the hole, 2 GiB above 4 GiB. A 3.5 GiB working set must use both.
    let mut p = Proc::tern_run(&[
        "--memory",
        "5G",
        "--vcpus",
        "2",
        "--cmdline",
        "tern.wss=3584 tern.check=4",
    ]);
    let boot = ready(&mut p);
    assert!(boot.contains("ram_top_mib=6144 "), "{boot}");
    assert!(boot.contains("wss_mib=3584 "), "{boot}");
    heartbeat_advances(&mut p);
    p.wait_for("a self-check", Duration::from_secs(60), |l| {
        l == "tern-guest check ok 917504"
    });
}

#[test]
fn self_check_passes_while_dirtying_with_each_pattern() {
    let _g = exclusive();
    for pattern in ["seq", "random", "hot"] {
        let cmdline = format!("tern.wss=256 tern.rate=64 tern.pattern={pattern} tern.check=1");
        let mut p = Proc::tern_run(&["--memory", "512M", "--vcpus", "2", "--cmdline", &cmdline]);
        let boot = ready(&mut p);
        assert!(boot.contains(&format!("pattern={pattern} ")), "{boot}");
        for _ in 0..2 {
            p.wait_for("a self-check", LINE, |l| l == "tern-guest check ok 65536");
        }
    }
}

#[test]
fn self_check_catches_a_corrupted_page() {
    let _g = exclusive();
    let dir = tmpdir("corrupt");
    let sock = dir.join("qmp.sock");
    let sock_arg = format!("unix:{}", sock.display());
    let mut p = Proc::tern_run(&[
        "--memory",
        "512M",
        "--cmdline",
        "tern.wss=256 tern.check=1",
        "--qmp",
        &sock_arg,
    ]);
    ready(&mut p);
    p.wait_for("a clean self-check", LINE, |l| {
        l.starts_with("tern-guest check ok")
    });
    let mut q = Qmp::connect(&sock, LINE);
    // The working set starts right after the generation table above 16 MiB; 128 MiB is in it.
    q.ok(
        "x-tern-write-guest-memory",
        json!({"addr": 128u64 << 20, "value": 0x5a5a_5a5a_u64}),
    );
    let fail = p
        .wait_raw(LINE, |l| l.contains("tern-guest check"))
        .expect("a check line after the corruption");
    let fail = if fail.contains("check ok") {
        // That pass may have verified the page before the write landed: the next one must fail.
        p.wait_raw(LINE, |l| l.contains("tern-guest check"))
            .expect("next check")
    } else {
        fail
    };
    assert!(fail.starts_with("tern-guest check FAIL page="), "{fail}");
    assert!(fail.contains("got=0x5a5a5a5a"), "{fail}");
}

#[test]
fn stop_freezes_and_cont_resumes_without_restart() {
    let _g = exclusive();
    let dir = tmpdir("stopcont");
    let sock = dir.join("qmp.sock");
    let sock_arg = format!("unix:{}", sock.display());
    let mut p = Proc::tern_run(&[
        "--memory",
        "512M",
        "--vcpus",
        "2",
        "--cmdline",
        "tern.wss=128 tern.rate=64",
        "--qmp",
        &sock_arg,
    ]);
    ready(&mut p);
    let mut q = Qmp::connect(&sock, LINE);
    assert_eq!(
        q.ok("query-status", json!({})),
        json!({"running": true, "status": "running"})
    );
    p.wait_for("a heartbeat", LINE, is_hb);

    assert_eq!(q.ok("stop", json!({})), json!({}));
    q.wait_event("STOP");
    assert_eq!(
        q.ok("query-status", json!({})),
        json!({"running": false, "status": "paused"})
    );
    // Whatever was in flight when the vCPUs parked arrives now; after that, silence.
    std::thread::sleep(Duration::from_millis(300));
    let before = p.drain();
    let last = before
        .iter()
        .rev()
        .find_map(|l| hb(l))
        .map(|h| h.0)
        .unwrap_or_else(|| p.seen.iter().rev().find_map(|l| hb(l)).unwrap().0);
    let paused_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let during = p.drain();
    assert!(
        during.iter().all(|l| !is_hb(l)),
        "heartbeat while paused: {during:?}"
    );

    assert_eq!(q.ok("cont", json!({})), json!({}));
    q.wait_event("RESUME");
    let paused_for = paused_at.elapsed();
    let (n, gap1) = hb(&p.wait_for("a heartbeat after cont", LINE, is_hb)).unwrap();
    assert_eq!(n, last + 1, "the counter continues, no restart");
    // A heartbeat that was being printed when the vCPUs parked reports the pause one line later.
    let (_, gap2) = hb(&p.wait_for("a second heartbeat after cont", LINE, is_hb)).unwrap();
    let felt = gap1.max(gap2);
    assert!(
        felt as u128 >= paused_for.as_micros() * 9 / 10 - 300_000,
        "the guest felt the pause: gap_us={gap1}, then {gap2}; paused {paused_for:?}; lines {:?}",
        p.tail()
    );
    assert_eq!(
        q.ok("query-status", json!({})),
        json!({"running": true, "status": "running"})
    );
}

#[test]
fn guest_shutdown_exits_zero() {
    let _g = exclusive();
    let mut p = Proc::tern_run(&["--memory", "256M", "--cmdline", "tern.wss=16 tern.exit=2"]);
    ready(&mut p);
    p.wait_for("the guest's exit line", LINE, |l| l == "tern-guest exit");
    let status = p.wait_exit(LINE);
    assert_eq!(status.code(), Some(0));
}

#[test]
fn qmp_quit_exits_zero_with_a_shutdown_event() {
    let _g = exclusive();
    let dir = tmpdir("quit");
    let sock = dir.join("qmp.sock");
    let sock_arg = format!("unix:{}", sock.display());
    let mut p = Proc::tern_run(&[
        "--memory",
        "256M",
        "--cmdline",
        "tern.wss=16",
        "--qmp",
        &sock_arg,
    ]);
    ready(&mut p);
    let mut q = Qmp::connect(&sock, LINE);
    assert_eq!(q.execute("quit", json!({})), json!({"return": {}}));
    let ev = q.wait_event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert!(ev["timestamp"]["seconds"].is_u64());
    assert_eq!(p.wait_exit(LINE).code(), Some(0));
}

#[test]
fn written_guest_boots_under_qemu() {
    let _g = exclusive();
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED written_guest_boots_under_qemu: qemu-system-x86_64 is not installed (scripts/install-qemu.sh installs it; the test script does)");
        return;
    }
    let dir = tmpdir("qemu");
    let elf = dir.join("guest.elf");
    let out = Command::new(tern_bin())
        .args(["guest", "write"])
        .arg(&elf)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read(&elf).unwrap(), tern_guest::GUEST_ELF);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "512M",
        "-smp",
        "1",
    ])
    .args([
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&elf)
    .args(["-append", "tern.wss=64 tern.rate=16 tern.check=1"]);
    let mut p = Proc::spawn(&mut cmd);
    p.wait_for("ready under QEMU", BOOT, |l| l == "tern-guest ready");
    heartbeat_advances(&mut p);
    p.wait_for("a self-check under QEMU", LINE, |l| {
        l == "tern-guest check ok 16384"
    });
}
