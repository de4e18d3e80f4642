//! The engine against the in-memory fake VM: the state machine and its edge cases, no KVM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use tern_migrate::fake::FakeVm;
use tern_migrate::transport::{Channel, Listener, Uri};
use tern_migrate::{
    run_incoming, run_outgoing, Capabilities, MigrateError, MigrationControl, MigrationEvent,
    MigrationParams, MigrationStatus, SourceVm, TargetVm,
};

mod common;

use common::*;

#[test]
fn idle_migration_copies_everything_and_leaves_the_source_paused() {
    let u = uri("idle");
    let src = FakeVm::new(&[8 * MIB, 4 * MIB]);
    fill(&src, 1024);
    let dst = FakeVm::new_target(&[8 * MIB, 4 * MIB]);
    let (tctl, t) = target(&u, dst.clone(), None);
    let (ctl, events) = control(MigrationParams::default());
    run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl).unwrap();
    t.join().unwrap().unwrap();
    assert_eq!(src.contents(), dst.contents());
    assert_eq!(dst.writes(), src.writes(), "device state travelled");
    assert!(dst.is_running());
    assert!(!src.is_running(), "the source stays paused after success");
    let s = ctl.snapshot();
    assert_eq!(s.status, MigrationStatus::Completed);
    assert!(s.downtime_ms.is_some());
    assert_eq!(s.ram_digest, tctl.snapshot().ram_digest);
    assert!(s.duplicate > 0, "zero pages counted");
    let ev = events.lock().unwrap().clone();
    assert_eq!(
        ev.first(),
        Some(&MigrationEvent::Status(MigrationStatus::Setup))
    );
    assert!(ev.contains(&MigrationEvent::Pass(1)));
    assert_eq!(
        ev.last(),
        Some(&MigrationEvent::Status(MigrationStatus::Completed))
    );
    // Zero pages travel as ranges: the stream is far smaller than RAM.
    assert!(
        s.transferred < 12 * MIB,
        "{} bytes for 12 MiB of mostly zero RAM",
        s.transferred
    );
}

#[test]
fn a_dirtying_guest_converges_and_loses_nothing() {
    let u = uri("dirty");
    let src = FakeVm::new(&[16 * MIB]);
    fill(&src, 4096);
    let dst = FakeVm::new_target(&[16 * MIB]);
    let (tctl, t) = target(&u, dst.clone(), None);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let (src, stop) = (src.clone(), stop.clone());
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                src.guest_write(0, (i * 7) % 4096, (i % 200) as u8 + 3);
                i += 1;
                if i.is_multiple_of(64) {
                    thread::sleep(Duration::from_micros(200));
                }
            }
        })
    };
    let (ctl, _) = control(MigrationParams {
        downtime_limit_ms: 50,
        ..Default::default()
    });
    run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl).unwrap();
    stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    t.join().unwrap().unwrap();
    let s = ctl.snapshot();
    assert_eq!(
        s.ram_digest,
        tctl.snapshot().ram_digest,
        "RAM at the switch-over equals the target's"
    );
    assert_eq!(
        src.contents(),
        dst.contents(),
        "the paused source was not written after the stop"
    );
    assert!(s.dirty_sync_count >= 2);
}

#[test]
fn cancel_resumes_nothing_it_did_not_pause_and_leaves_the_source_running() {
    let u = uri("cancel");
    let src = FakeVm::new(&[64 * MIB]);
    fill(&src, 16384);
    let dst = FakeVm::new_target(&[64 * MIB]);
    let (_tctl, t) = target(&u, dst, None);
    // 4 MiB/s for ~40 MiB of data: long enough to cancel.
    let (ctl, _) = control(MigrationParams {
        max_bandwidth: 4 * MIB,
        ..Default::default()
    });
    let c = ctl.clone();
    let s2 = src.clone();
    let h = thread::spawn(move || run_outgoing(s2 as Arc<dyn SourceVm>, &u, None, &c));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(ctl.snapshot().status, MigrationStatus::Active);
    ctl.cancel().unwrap();
    let r = h.join().unwrap();
    assert!(
        matches!(r, Err(MigrateError::Cancelled) | Err(MigrateError::Wire(_))),
        "{r:?}"
    );
    assert_eq!(ctl.snapshot().status, MigrationStatus::Cancelled);
    assert!(src.is_running());
    assert!(t.join().unwrap().is_err(), "the target sees the stream end");
}

#[test]
fn a_refusing_target_fails_the_migration_with_its_reason() {
    let u = uri("refuse");
    let src = FakeVm::new(&[4 * MIB]);
    fill(&src, 512);
    let (_tctl, t) = target(
        &u,
        FakeVm::new_target(&[4 * MIB]),
        Some("memory size differs: 1G here, 4M in the stream"),
    );
    let (ctl, _) = control(MigrationParams::default());
    let err = run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl).unwrap_err();
    assert!(err.to_string().contains("memory size differs"), "{err}");
    let s = ctl.snapshot();
    assert_eq!(s.status, MigrationStatus::Failed);
    assert!(s.error.unwrap().contains("memory size differs"));
    assert!(src.is_running());
    assert!(t.join().unwrap().is_err());
}

#[test]
fn a_stream_whose_ram_is_not_the_targets_is_refused_before_any_page() {
    let u = uri("regions");
    let src = FakeVm::new(&[4 * MIB]);
    fill(&src, 512);
    let dst = FakeVm::new_target(&[8 * MIB]);
    let (_tctl, t) = target(&u, dst.clone(), None);
    let (ctl, _) = control(MigrationParams::default());
    let err = run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl).unwrap_err();
    assert!(err.to_string().contains("RAM regions"), "{err}");
    let why = t.join().unwrap().unwrap_err();
    assert!(why.contains("are not this VM's"), "{why}");
    assert_eq!(dst.writes(), 0, "not a page written");
    assert!(src.is_running());
}

#[test]
fn a_target_that_dies_mid_way_fails_the_migration_and_the_source_runs_on() {
    let u = uri("dies");
    let src = FakeVm::new(&[64 * MIB]);
    fill(&src, 16384);
    let listener = Listener::bind(&u, None).unwrap();
    let killer = thread::spawn(move || {
        let mut conn = listener.accept().unwrap().conn;
        let mut buf = vec![0u8; 1 << 20];
        std::io::Read::read_exact(&mut conn, &mut buf).unwrap();
        drop(conn); // the target process dies
    });
    let (ctl, _) = control(MigrationParams {
        max_bandwidth: 32 * MIB,
        ..Default::default()
    });
    let err = run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl).unwrap_err();
    killer.join().unwrap();
    assert_eq!(ctl.snapshot().status, MigrationStatus::Failed, "{err}");
    assert!(src.is_running());
}

#[test]
fn a_device_that_cannot_migrate_fails_after_the_pause_and_the_source_is_resumed() {
    let u = uri("unmigratable");
    let src = FakeVm::new(&[4 * MIB]);
    src.unmigratable.store(true, Ordering::SeqCst);
    let (_tctl, t) = target(&u, FakeVm::new_target(&[4 * MIB]), None);
    let (ctl, _) = control(MigrationParams::default());
    let err = run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl).unwrap_err();
    assert!(
        err.to_string().contains("fake-gpu cannot be migrated"),
        "{err}"
    );
    assert!(src.is_running());
    assert_eq!(
        src.pauses.load(Ordering::SeqCst),
        src.resumes.load(Ordering::SeqCst)
    );
    assert!(t.join().unwrap().is_err());
}

#[test]
fn no_target_listening_is_a_clear_failure() {
    let src = FakeVm::new(&[4 * MIB]);
    let (ctl, _) = control(MigrationParams::default());
    let err =
        run_outgoing(src.clone() as Arc<dyn SourceVm>, &uri("nobody"), None, &ctl).unwrap_err();
    assert!(err.to_string().contains("connecting to unix:"), "{err}");
    assert!(src.is_running());
    let _ = Channel::connect(&Uri::Tcp("127.0.0.1".into(), 1), None).unwrap_err();
}

/// A guest that dirties `pages_per_ms` pages of region 0 each millisecond of its own time,
/// giving up the share of time the engine's throttle takes (as vCPU threads would).
fn busy_guest(
    src: Arc<FakeVm>,
    pages_per_ms: u64,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            for _ in 0..pages_per_ms {
                src.guest_write(0, (i * 13) % 4096, (i % 200) as u8 + 3);
                i += 1;
            }
            thread::sleep(Duration::from_millis(1));
            let pct = src.throttle.load(Ordering::SeqCst);
            if pct > 0 {
                thread::sleep(Duration::from_micros(1000 * pct / (100 - pct).max(1)));
            }
        }
    })
}

#[test]
fn a_file_holds_a_stopped_guest_once_and_loads_back() {
    let dir = std::env::temp_dir().join(format!("tern-engine-{}-file", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let u = Uri::File(dir.join("saved"));
    let src = FakeVm::new(&[16 * MIB, 4 * MIB]);
    fill(&src, 2048);
    src.pause().unwrap();
    let pauses = src.pauses.load(Ordering::SeqCst);
    let (ctl, _) = control(MigrationParams::default());
    run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl).unwrap();
    let s = ctl.snapshot();
    assert_eq!(s.status, MigrationStatus::Completed);
    assert_eq!(s.dirty_sync_count, 2, "a stopped guest needs one round");
    assert_eq!(
        src.pauses.load(Ordering::SeqCst),
        pauses,
        "not paused twice"
    );
    let len = std::fs::metadata(dir.join("saved")).unwrap().len();
    let data = (2048 - 2048 / 3) * 4096;
    assert!(len < data + MIB, "{len} bytes for {data} bytes of data");
    assert!(len > data, "{len} bytes for {data} bytes of data");

    let dst = FakeVm::new_target(&[16 * MIB, 4 * MIB]);
    let listener = Listener::bind(&u, None).unwrap();
    let (tctl, _) = control(MigrationParams::default());
    let t = dst.clone();
    run_incoming(
        &listener,
        Box::new(move |_| Ok(t as Arc<dyn TargetVm>)),
        &tctl,
    )
    .unwrap();
    assert_eq!(src.contents(), dst.contents());
    assert_eq!(tctl.snapshot().ram_digest, s.ram_digest);
    // A command that fails before it has the whole stream fails the migration, and the
    // (running) source runs on.
    let src = FakeVm::new(&[4 * MIB]);
    fill(&src, 256);
    let (ctl, _) = control(MigrationParams::default());
    let err = run_outgoing(
        src.clone() as Arc<dyn SourceVm>,
        &Uri::Exec("exit 3".into()),
        None,
        &ctl,
    )
    .unwrap_err();
    assert!(!ctl.snapshot().in_doubt, "{err}");
    assert!(src.is_running());
    // One that fails after END may have fed a live target: in doubt, and the source stays
    // paused for the operator to decide.
    let src = FakeVm::new(&[4 * MIB]);
    fill(&src, 256);
    let (ctl, _) = control(MigrationParams::default());
    let err = run_outgoing(
        src.clone() as Arc<dyn SourceVm>,
        &Uri::Exec("cat > /dev/null; exit 7".into()),
        None,
        &ctl,
    )
    .unwrap_err();
    assert!(err.to_string().contains("exit status: 7"), "{err}");
    assert!(err.to_string().contains("may be running"), "{err}");
    assert!(ctl.snapshot().in_doubt);
    assert!(!src.is_running());
    let _ = std::fs::remove_dir_all(&dir);
}

fn unconvergeable(
    name: &str,
    params: MigrationParams,
    auto_converge: bool,
) -> (Result<(), MigrateError>, Arc<MigrationControl>, Arc<FakeVm>) {
    let u = uri(name);
    let src = FakeVm::new(&[16 * MIB]);
    fill(&src, 4096);
    let dst = FakeVm::new_target(&[16 * MIB]);
    let (_tctl, t) = target(&u, dst.clone(), None);
    let stop = Arc::new(AtomicBool::new(false));
    // ~40 MiB/s of dirtying over a 4 MiB/s link.
    let guest = busy_guest(src.clone(), 10, stop.clone());
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    let ctl = MigrationControl::new(
        MigrationParams {
            max_bandwidth: 4 * MIB,
            downtime_limit_ms: 100,
            ..params
        },
        Capabilities {
            auto_converge,
            ram_digest: true,
            ..Default::default()
        },
        Box::new(move |ev| e.lock().unwrap().push(ev)),
    );
    let r = run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl);
    stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    let tr = t.join().unwrap();
    if r.is_ok() {
        tr.unwrap();
        assert_eq!(src.contents(), dst.contents());
    }
    (r, ctl, src)
}

#[test]
fn the_round_limit_fails_or_forces_the_switchover_as_chosen() {
    let (r, ctl, src) = unconvergeable(
        "limit-fail",
        MigrationParams {
            max_rounds: 4,
            ..Default::default()
        },
        false,
    );
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("did not converge") && e.contains("4 rounds"),
        "{e}"
    );
    assert_eq!(ctl.snapshot().status, MigrationStatus::Failed);
    assert!(src.is_running(), "the source runs on");
    assert_eq!(src.throttle.load(Ordering::SeqCst), 0);

    let (r, ctl, _) = unconvergeable(
        "limit-switch",
        MigrationParams {
            max_precopy_ms: 1500,
            limit_action: tern_migrate::LimitAction::Switchover,
            ..Default::default()
        },
        false,
    );
    r.unwrap();
    let s = ctl.snapshot();
    assert_eq!(s.stop_reason, Some("time limit"));
    assert!(s.total_time_ms() >= 1500);
}

#[test]
fn auto_converge_throttles_until_the_guest_fits_the_link() {
    let (r, ctl, src) = unconvergeable(
        "autoconverge",
        MigrationParams {
            cpu_throttle_initial: 50,
            cpu_throttle_increment: 20,
            max_precopy_ms: 60_000,
            ..Default::default()
        },
        true,
    );
    r.unwrap();
    let s = ctl.snapshot();
    assert_eq!(s.stop_reason, Some("converged"));
    let steps: Vec<u8> = s.rounds.iter().map(|r| r.throttle_percent).collect();
    assert!(steps.iter().any(|&p| p >= 50), "{steps:?}");
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert_eq!(
        src.throttle.load(Ordering::SeqCst),
        0,
        "released at the end"
    );
    assert!(s.to_qmp().get("cpu-throttle-percentage").is_none());
}
