//! The switch-over's two-phase commit against the fake VM: a fault at every step, on either
//! side, and the guest runs on exactly one side wherever the protocol knows who won — never on
//! two.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tern_migrate::fake::FakeVm;
use tern_migrate::{
    run_outgoing, MigrationControl, MigrationParams, MigrationStatus, SourceVm, SwitchoverFault,
};

fn fault(s: &str) -> MigrationParams {
    MigrationParams {
        switchover_fault: SwitchoverFault::parse(s).unwrap(),
        ..MigrationParams::default()
    }
}

/// Waits until `ctl` holds at a fault's step.
fn holding(ctl: &MigrationControl, step: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctl.snapshot().fault_holding != Some(step) {
        assert!(Instant::now() < deadline, "never held at {step}");
        thread::sleep(Duration::from_millis(5));
    }
}

struct Run {
    src: Arc<FakeVm>,
    dst: Arc<FakeVm>,
    ctl: Arc<MigrationControl>,
    out: thread::JoinHandle<tern_migrate::Result<()>>,
    target: thread::JoinHandle<Result<(), String>>,
}

/// Starts a migration of a small busy-free guest with these faults on each side.
fn start(name: &str, source: MigrationParams, target: MigrationParams) -> Run {
    let u = uri(name);
    let src = FakeVm::new(&[4 * MIB]);
    fill(&src, 512);
    let dst = FakeVm::new_target(&[4 * MIB]);
    let (_, t) = target_with(&u, dst.clone(), None, target);
    let (ctl, _) = control(source);
    let (s, c) = (src.clone(), ctl.clone());
    let out = thread::spawn(move || run_outgoing(s as Arc<dyn SourceVm>, &u, None, &c));
    Run {
        src,
        dst,
        ctl,
        out,
        target: t,
    }
}

/// Who runs the guest once everything settled: (source, target).
fn settle(r: Run) -> (bool, bool, tern_migrate::MigrationStats, Result<(), String>) {
    let res = r.out.join().unwrap();
    let t = r.target.join().unwrap();
    let s = r.ctl.snapshot();
    assert_eq!(res.is_ok(), s.status == MigrationStatus::Completed, "{s:?}");
    (r.src.is_running(), r.dst.is_running(), s, t)
}

/// The source won: it runs, the target never started the guest.
fn source_won(r: Run, status: MigrationStatus) {
    let dst = r.dst.clone();
    let (src_runs, dst_runs, s, t) = settle(r);
    assert!(
        src_runs && !dst_runs,
        "source {src_runs}, target {dst_runs}"
    );
    assert_eq!(s.status, status, "{s:?}");
    assert!(!s.in_doubt);
    assert_eq!(
        dst.resumes.load(Ordering::SeqCst),
        0,
        "the target never ran"
    );
    assert!(t.is_err(), "the target fails its incoming migration");
}

/// The target won: it runs, the source stays paused.
fn target_won(r: Run) -> tern_migrate::MigrationStats {
    let src = r.src.clone();
    let resumes = src.resumes.load(Ordering::SeqCst);
    let (src_runs, dst_runs, s, _) = settle(r);
    assert!(
        !src_runs && dst_runs,
        "source {src_runs}, target {dst_runs}"
    );
    assert_eq!(src.resumes.load(Ordering::SeqCst), resumes);
    s
}

#[test]
fn without_faults_the_target_runs_after_go() {
    let r = start(
        "clean",
        MigrationParams::default(),
        MigrationParams::default(),
    );
    let s = target_won(r);
    assert_eq!(s.status, MigrationStatus::Completed);
    let sw = s.switchover.unwrap();
    assert!(
        sw.end_ms <= sw.loaded_ms && sw.loaded_ms <= sw.ack_ms,
        "{sw:?}"
    );
    assert_eq!(s.downtime_ms, Some(sw.ack_ms as u64));
}

#[test]
fn a_cut_before_loaded_or_before_go_resumes_the_source() {
    for step in ["before-loaded", "before-go"] {
        let r = start(
            step,
            fault(&format!("{step}:cut")),
            MigrationParams::default(),
        );
        source_won(r, MigrationStatus::Failed);
    }
}

#[test]
fn a_cut_after_go_leaves_the_source_paused_and_says_in_doubt() {
    // The target holds after GO, so that RUNNING cannot beat the cut.
    let r = start(
        "cut-running",
        fault("before-running:cut"),
        fault("before-running:hold:300"),
    );
    let src = r.src.clone();
    let (src_runs, _, s, _) = settle(r);
    assert!(!src_runs, "committed: the source must not resume by itself");
    assert_eq!(s.status, MigrationStatus::Failed);
    assert!(s.in_doubt, "{s:?}");
    let e = s.error.unwrap();
    assert!(e.contains("may be running"), "{e}");
    assert_eq!(src.resumes.load(Ordering::SeqCst), 0);
}

#[test]
fn a_cancel_before_the_commit_wins_and_after_it_is_refused() {
    for step in ["before-loaded", "before-go"] {
        let r = start(
            &format!("cancel-{step}"),
            fault(&format!("{step}:hold:10000")),
            MigrationParams::default(),
        );
        holding(&r.ctl, step);
        r.ctl.cancel().unwrap();
        source_won(r, MigrationStatus::Cancelled);
    }
    let r = start(
        "cancel-running",
        fault("before-running:hold:3000"),
        MigrationParams::default(),
    );
    holding(&r.ctl, "before-running");
    let e = r.ctl.cancel().unwrap_err().to_string();
    assert!(e.contains("point of no return"), "{e}");
    let s = target_won(r);
    assert_eq!(s.status, MigrationStatus::Completed);
}

#[test]
fn a_target_that_fails_before_loaded_or_dies_after_it_leaves_the_source_running() {
    // The target breaks after loading, before LOADED.
    let r = start(
        "t-loaded",
        MigrationParams::default(),
        fault("before-loaded:cut"),
    );
    source_won(r, MigrationStatus::Failed);
    // The target is gone after LOADED, before GO: the source sees it before committing.
    let r = start("t-go", fault("before-go:hold:300"), fault("before-go:cut"));
    source_won(r, MigrationStatus::Failed);
}

#[test]
fn a_target_cut_after_go_runs_and_the_source_reports_in_doubt() {
    let r = start(
        "t-running",
        MigrationParams::default(),
        fault("before-running:cut"),
    );
    let s = target_won(r);
    assert_eq!(s.status, MigrationStatus::Failed);
    assert!(s.in_doubt, "{s:?}");
}

#[test]
fn a_second_participant_migrates_without_engine_changes() {
    let u = uri("disk");
    let src = FakeVm::new(&[4 * MIB]).with_disk(64);
    fill(&src, 256);
    for b in 0..64 {
        src.disk_write(b, b as u8 + 1);
    }
    let dst = FakeVm::new_target(&[4 * MIB]).with_disk(64);
    let (_, t) = target(&u, dst.clone(), None);
    let (ctl, _) = control(MigrationParams::default());
    // The guest keeps writing its disk during precopy.
    let (s2, stop) = (
        src.clone(),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let st = stop.clone();
    let writer = thread::spawn(move || {
        let mut i = 0usize;
        while !st.load(Ordering::SeqCst) {
            s2.disk_write(i % 64, (i % 200) as u8 + 7);
            i += 1;
            thread::sleep(Duration::from_micros(200));
        }
    });
    run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl).unwrap();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    t.join().unwrap().unwrap();
    assert_eq!(src.disk_contents(), dst.disk_contents());
    assert_eq!(src.contents(), dst.contents());
    // A target without that participant refuses, naming it, and the source runs on.
    let u = uri("disk-refused");
    let src = FakeVm::new(&[4 * MIB]).with_disk(8);
    let dst = FakeVm::new_target(&[4 * MIB]);
    let (_, t) = target(&u, dst, None);
    let (ctl, _) = control(MigrationParams::default());
    let e = run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl).unwrap_err();
    assert!(e.to_string().contains("fake-disk"), "{e}");
    assert!(t.join().unwrap().unwrap_err().contains("fake-disk"));
    assert!(src.is_running());
}

#[test]
fn a_panic_in_a_migration_thread_ends_the_migration_as_the_protocol_says() {
    // Before the commit: a failure, the source resumes, the target never runs.
    let r = start(
        "panic-loaded",
        fault("before-loaded:panic"),
        MigrationParams::default(),
    );
    let ctl = r.ctl.clone();
    source_won(r, MigrationStatus::Failed);
    let e = ctl.snapshot().error.unwrap();
    assert!(e.contains("internal error"), "{e}");
    // After GO: the target runs, the source stays paused and says the outcome is in doubt.
    let r = start(
        "panic-running",
        fault("before-running:panic"),
        fault("before-running:hold:300"),
    );
    let s = target_won(r);
    assert_eq!(s.status, MigrationStatus::Failed);
    assert!(s.in_doubt, "{s:?}");
    // In the target, before LOADED: the source resumes.
    let r = start(
        "panic-target",
        MigrationParams::default(),
        fault("before-loaded:panic"),
    );
    source_won(r, MigrationStatus::Failed);
}
