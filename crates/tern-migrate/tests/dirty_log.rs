//! Dirty tracking against the fake VM, whose log behaves as KVM's does in each mode: a page
//! written right after the engine read it — the write a wrong order of "read the page" and
//! "re-arm its tracking" would lose — reaches the target, with and without data channels.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tern_migrate::fake::FakeVm;
use tern_migrate::{
    run_outgoing, Capabilities, DirtyLogMode, MigrationParams, MigrationStatus, SourceVm,
};

mod common;

use common::*;

/// Migrates a 16 MiB fake guest in `mode` while a guest thread keeps writing, with the write
/// after the read armed on `page` of round 1; returns the number of re-arming calls the engine
/// made.
fn write_after_read(name: &str, mode: DirtyLogMode, multifd: bool, page: u64) -> u64 {
    let u = uri(name);
    let src = FakeVm::new(&[16 * MIB]);
    fill(&src, 4096);
    let dst = FakeVm::new_target(&[16 * MIB]);
    let (tctl, t) = target(&u, dst.clone(), None);
    src.write_after_read(0, page, 0xee);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let (src, stop) = (src.clone(), stop.clone());
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                src.guest_write(0, (i * 13) % 4096, (i % 200) as u8 + 3);
                i += 1;
                if i.is_multiple_of(32) {
                    thread::sleep(Duration::from_micros(300));
                }
            }
        })
    };
    let (ctl, _) = control_with(
        MigrationParams {
            downtime_limit_ms: 50,
            dirty_log: mode,
            multifd_channels: 2,
            ..Default::default()
        },
        Capabilities {
            ram_digest: true,
            multifd,
            ..Default::default()
        },
    );
    run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl).unwrap();
    stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    t.join().unwrap().unwrap();
    let s = ctl.snapshot();
    assert_eq!(s.status, MigrationStatus::Completed);
    assert!(src.wrote_after_read(), "{name}: the armed write happened");
    assert_eq!(s.dirty_log, Some(mode.as_str()), "{name}");
    assert_eq!(
        src.contents(),
        dst.contents(),
        "{name}: the page written right after its read reached the target"
    );
    assert_eq!(s.ram_digest, tctl.snapshot().ram_digest, "{name}");
    src.clears.load(Ordering::SeqCst)
}

#[test]
fn a_page_written_right_after_it_was_read_is_sent_again_in_every_mode() {
    // Pages near the start, the middle and the last page: the first, an inner and the last
    // chunk of re-arming.
    for (i, page) in [5u64, 2100, 4095].into_iter().enumerate() {
        let clears = write_after_read(&format!("clear{i}"), DirtyLogMode::Clear, false, page);
        assert!(clears > 0, "manual protect re-armed pages");
        let clears = write_after_read(&format!("get{i}"), DirtyLogMode::Get, false, page);
        assert_eq!(clears, 0, "KVM_GET_DIRTY_LOG alone re-arms nothing by hand");
    }
}

#[test]
fn with_data_channels_a_page_is_re_armed_before_a_channel_reads_it() {
    for (i, page) in [7u64, 3000].into_iter().enumerate() {
        let clears = write_after_read(&format!("mfd-clear{i}"), DirtyLogMode::Clear, true, page);
        assert!(clears > 0);
    }
}

#[test]
fn the_fake_log_loses_the_write_when_re_armed_after_the_read() {
    // The model the tests above rely on: in manual-protect mode a page reported dirty stays
    // writable, so a write after the read and before the re-arming leaves no record.
    use tern_migrate::GuestRam;
    let vm = FakeVm::new(&[MIB]);
    assert_eq!(
        vm.start_dirty_log(DirtyLogMode::Clear).unwrap(),
        DirtyLogMode::Clear
    );
    let mut bits = vec![0u64; 4];
    assert!(vm.guest_write(0, 3, 1));
    assert_eq!(vm.sync_dirty(0, &mut bits).unwrap(), 1);
    // Read, then the guest writes again, then re-arm: that write is gone.
    assert!(vm.guest_write(0, 3, 2));
    vm.clear_dirty(0, 0, &[1 << 3]).unwrap();
    let mut next = vec![0u64; 4];
    assert_eq!(
        vm.sync_dirty(0, &mut next).unwrap(),
        0,
        "the wrong order loses it"
    );
    // Re-armed first, then written: recorded.
    assert!(vm.guest_write(0, 3, 3));
    assert_eq!(
        vm.sync_dirty(0, &mut next).unwrap(),
        1,
        "the right order keeps it"
    );
}
