//! Faults a user can cause, through real KVM (issue 11, as its items land).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A save that fails over an existing snapshot leaves the snapshot as it was (the stream goes to
/// a temporary file beside it, renamed only when complete), and the VM runs on; a save that
/// completes replaces it.
#[test]
fn a_failed_save_keeps_the_old_snapshot_and_the_vm_running() {
    let _g = exclusive();
    let d = dir("save-atomic");
    let mut src = source(&d, "src", "1G", "tern.wss=256 tern.rate=16 tern.check=1");
    let file = d.join("vm.tern");
    std::fs::write(&file, b"the old snapshot").unwrap();
    // Slow enough to interrupt: the save of a stopped guest is one rate-limited round.
    src.q
        .ok("migrate-set-parameters", json!({"max-bandwidth": 16 << 20}));
    // `tern save` of this VM into `file`.
    let save = || {
        let mut c = Command::new(tern_bin());
        c.args(["save", "--qmp"])
            .arg(format!("unix:{}", d.join("src.qmp").display()))
            .arg(&file);
        c
    };
    let mut child = save().spawn().unwrap();
    wait_status(&mut src.q, "active");
    // SAFETY: kill(2) on our own child, which has not been waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(
        child.wait().unwrap().code(),
        Some(3),
        "a cancelled save exits 3"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"the old snapshot");
    let left: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tern-save"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    source_still_fine(&mut src.p, &mut src.q);

    // A save that completes replaces the old file with a stream that verifies.
    src.q
        .ok("migrate-set-parameters", json!({"max-bandwidth": 0}));
    let out = save().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verify = Command::new(tern_bin())
        .arg("verify")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    quit(src);
}

fn mode_of(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The monitor sockets are the owner's only (unless widened), a path another tern serves is
/// refused (it used to be unlinked, orphaning that VM), and they are removed at exit.
#[test]
fn monitor_sockets_are_private_exclusive_and_removed_at_exit() {
    let _g = exclusive();
    let d = dir("sockets");
    let (qmp, hmp) = (d.join("a.qmp"), d.join("a.hmp"));
    let mut a = Proc::tern_run(&[
        "--memory",
        "64M",
        "--cmdline",
        "tern.wss=8 tern.check=0",
        "--qmp",
        &format!("unix:{}", qmp.display()),
        "--hmp",
        &format!("unix:{}", hmp.display()),
    ]);
    a.wait_for("ready", BOOT, |l| l == "tern-guest ready");
    let mut q = Qmp::connect(&qmp, LINE);
    assert_eq!(mode_of(&qmp), 0o600);
    assert_eq!(mode_of(&hmp), 0o600);
    // A second tern on the same path is refused and leaves the first alone.
    let out = Command::new(tern_bin())
        .args(["run", "--memory", "64M", "--serial", "none", "--qmp"])
        .arg(format!("unix:{}", qmp.display()))
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another process listens"), "{err}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    let _ = q.execute("quit", json!({}));
    assert_eq!(a.wait_exit(LINE).code(), Some(0));
    assert!(!qmp.exists() && !hmp.exists(), "sockets left behind");

    // Widened on request; removed also when a VM that never came (incoming) quits.
    let mut b = Proc::tern_run(&[
        "--incoming",
        "defer",
        "--monitor-mode",
        "0660",
        "--qmp",
        &format!("unix:{}", qmp.display()),
    ]);
    let mut q = Qmp::connect(&qmp, LINE);
    assert_eq!(mode_of(&qmp), 0o660);
    let _ = q.execute("quit", json!({}));
    assert_eq!(b.wait_exit(LINE).code(), Some(0));
    assert!(!qmp.exists(), "socket left behind");
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Out of descriptors (EMFILE), the accept loop waits instead of spinning, and serves again
/// once descriptors are free.
#[test]
fn an_accept_loop_out_of_descriptors_does_not_spin() {
    use std::os::unix::process::CommandExt;
    let _g = exclusive();
    let d = dir("emfile");
    let qmp = d.join("e.qmp");
    let mut cmd = Command::new(tern_bin());
    cmd.args(["run", "--incoming", "defer", "--qmp"])
        .arg(format!("unix:{}", qmp.display()));
    // SAFETY: setrlimit(2) in the child between fork and exec touches only that process's limits.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 48,
                rlim_max: 48,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut p = Proc::spawn(&mut cmd);
    drop(Qmp::connect(&qmp, LINE));
    // More clients than it has descriptors: the kernel queues the rest, accept fails EMFILE.
    let hogs: Vec<_> = (0..80)
        .map(|_| std::os::unix::net::UnixStream::connect(&qmp).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = cpu_ticks(p.child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(p.child.id()) - t0;
    eprintln!("out of descriptors: {used} ticks of CPU in 2 s");
    // 2 s at 100 ticks/s: a spinning loop uses ~200; waiting 100 ms between tries uses ~0.
    assert!(
        used < 40,
        "{used} ticks of CPU in 2 s while out of descriptors"
    );
    drop(hogs);
    // The hogs' sessions end as their threads see the hang-up; until then the monitor is full
    // and says so (CI once connected before they had).
    let mut q = Qmp::connect_when_free(&qmp, LINE);
    let _ = q.execute("quit", json!({}));
    assert_eq!(p.wait_exit(LINE).code(), Some(0));
}

/// `migrate_cancel` and `quit` on a target stop the load at once and the source, told so, runs
/// on (before, a target's cancel did nothing, and a `quit` took effect only after the guest was
/// received and acknowledged: the source was paused for good and the target gone).
#[test]
fn cancel_or_quit_on_the_target_stops_the_load_and_the_source_runs_on() {
    let _g = exclusive();
    let d = dir("target-stop");
    for how in ["migrate_cancel", "quit"] {
        let mut src = source(
            &d,
            &format!("src-{how}"),
            "1G",
            "tern.wss=256 tern.rate=16 tern.check=1",
        );
        let uri = format!("unix:{}", d.join(format!("{how}.sock")).display());
        let mut dst = target(&d, &format!("dst-{how}"), &uri, &[]);
        src.q
            .ok("migrate-set-parameters", json!({"max-bandwidth": 16 << 20}));
        src.q.ok("migrate", json!({"uri": uri}));
        wait_status(&mut src.q, "active");
        wait_status(&mut dst.q, "active");
        let r = dst.q.execute(how, json!({}));
        assert!(r.get("return").is_some(), "{how}: {r}");
        let st = dst.p.wait_exit(LINE);
        if how == "quit" {
            assert_eq!(st.code(), Some(0), "quit exits 0");
        } else {
            assert_ne!(st.code(), Some(0), "a cancelled incoming migration fails");
        }
        let r = wait_migration(&mut src.q, LINE);
        assert_eq!(r["status"], "failed", "{how}: {r}");
        source_still_fine(&mut src.p, &mut src.q);
        quit(src);
    }
}

/// What a hand-made source says first on its connection: the hello of a one-channel migration.
fn main_hello(s: &mut impl std::io::Write) {
    let hello = tern_wire::ChannelHello {
        session: [1; 16],
        role: tern_wire::ChannelRole::Main,
        index: 0,
        channels: 1,
    };
    tern_wire::RecordWriter::new(s)
        .write(tern_wire::record_type::CHANNEL_HELLO, 0, &hello.encode())
        .unwrap();
}

fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        >> 10
}

/// A peer that announces a big guest and then sends one page and idles cannot make the target
/// fill host memory: its prefault helper stays within 256 MiB of the data received. (Before,
/// it populated all of the announced RAM at once.)
#[test]
fn a_peer_that_announces_much_and_sends_little_cannot_fill_the_target() {
    use std::io::Write;
    use tern_wire::{RamRun, RunData, StreamReader, StreamWriter};
    let _g = exclusive();
    let d = dir("announce");
    // A valid description of a 4 GiB guest, from a real save.
    let mut src = source(&d, "src", "4G", "tern.wss=8 tern.check=1");
    let file = d.join("4g.tern");
    src.q.ok(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    assert_eq!(wait_migration(&mut src.q, LINE)["status"], "completed");
    quit(src);
    let mut r = StreamReader::new(std::fs::File::open(&file).unwrap()).unwrap();
    while r.description().is_none() {
        r.next_record().unwrap();
    }
    let desc = r.description().unwrap().clone();

    let uri = format!("unix:{}", d.join("announce.sock").display());
    let mut dst = target(&d, "dst", &uri, &[]);
    let mut s = connect_unix(&d.join("announce.sock"), LINE);
    main_hello(&mut s);
    {
        let mut w = StreamWriter::new(&mut s).unwrap();
        w.description(&desc).unwrap();
        let page = vec![0x42u8; 4096];
        w.ram_pages(
            0,
            &[RamRun {
                first_page: 256,
                data: RunData::Raw(&page),
            }],
        )
        .unwrap();
    }
    s.flush().unwrap();
    wait_status(&mut dst.q, "active");
    let mut peak = 0;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(rss_mib(dst.p.child.id()));
    }
    eprintln!("target RSS peak {peak} MiB after one page of a 4 GiB guest");
    assert!(peak < 768, "target RSS {peak} MiB after one page");
    drop(s);
    assert_ne!(dst.p.wait_exit(LINE).code(), Some(0));
}

/// `migrate_cancel` on a target still waiting for its source stops the wait at once (before, it
/// said "cancelling" and the accept went on for ever).
#[test]
fn cancel_on_a_target_still_waiting_for_its_source_stops_the_wait() {
    let _g = exclusive();
    let d = dir("wait-cancel");
    let mut dst = target(&d, "dst", &free_tcp_uri(), &[]);
    let r = dst.q.execute("migrate_cancel", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    let t0 = Instant::now();
    let st = dst.p.wait_exit(LINE);
    assert_ne!(st.code(), Some(0), "a cancelled incoming migration fails");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

/// A port scan or an idle client does not take the source's place: the target drops a
/// connection that does not open with a valid hello (after 10 s for one that says nothing) and
/// keeps listening; the real source then migrates. (Before, the first connection was the only
/// one, and garbage made a waiting target exit.)
#[test]
fn a_port_scan_or_an_idle_peer_does_not_take_the_sources_place() {
    use std::io::Write;
    let _g = exclusive();
    let d = dir("scan");
    let mut src = source(&d, "src", "256M", "tern.wss=32 tern.rate=16 tern.check=1");
    let uri = free_tcp_uri();
    let mut dst = target(&d, "dst", &uri, &[]);
    let addr = uri.trim_start_matches("tcp:");
    let mut scan = std::net::TcpStream::connect(addr).unwrap();
    scan.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let _idle = std::net::TcpStream::connect(addr).unwrap();
    src.q.ok("migrate", json!({"uri": uri}));
    completes(
        &mut src,
        &mut dst.p,
        Duration::from_secs(120),
        "a scanned port",
    );
    quit(dst);
    quit(src);
}

/// A source that goes silent mid-stream is given up on after `x-tern-read-timeout`, and the
/// target exits instead of waiting for ever.
#[test]
fn a_silent_source_times_out() {
    use std::io::Write;
    let _g = exclusive();
    let d = dir("silent");
    let uri = free_tcp_uri();
    let mut dst = target(&d, "dst", "defer", &[]);
    dst.q.ok(
        "migrate-set-parameters",
        json!({"x-tern-read-timeout": 1000}),
    );
    dst.q.ok("migrate-incoming", json!({"uri": uri}));
    let mut s = std::net::TcpStream::connect(uri.trim_start_matches("tcp:")).unwrap();
    main_hello(&mut s);
    tern_wire::RecordWriter::new(&mut s)
        .write_stream_header(0)
        .unwrap();
    s.flush().unwrap();
    let t0 = Instant::now();
    let st = dst.p.wait_exit(LINE);
    assert_ne!(st.code(), Some(0));
    eprintln!("a silent source was given up on after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    drop(s);
}

/// SIGTERM and SIGINT shut `tern run` down as `quit` does: the SHUTDOWN event (reason
/// "host-signal", as QEMU), exit status 0, the monitor socket removed.
#[test]
fn sigterm_and_sigint_shut_tern_run_down_cleanly() {
    let _g = exclusive();
    let d = dir("signals");
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let qmp = d.join(format!("s{sig}.qmp"));
        let mut p = Proc::tern_run(&[
            "--memory",
            "64M",
            "--cmdline",
            "tern.wss=8 tern.check=0",
            "--qmp",
            &format!("unix:{}", qmp.display()),
        ]);
        p.wait_for("ready", BOOT, |l| l == "tern-guest ready");
        let mut q = Qmp::connect(&qmp, LINE);
        // SAFETY: kill(2) on our own child, which has not been waited for.
        unsafe { libc::kill(p.child.id() as i32, sig) };
        let ev = q.wait_event("SHUTDOWN");
        assert_eq!(ev["data"]["reason"], "host-signal", "{ev}");
        assert_eq!(ev["data"]["guest"], false, "{ev}");
        assert_eq!(p.wait_exit(LINE).code(), Some(0), "signal {sig}");
        assert!(!qmp.exists(), "socket left behind");
    }
}
