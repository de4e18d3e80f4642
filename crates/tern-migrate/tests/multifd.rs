//! Parallel data channels against the fake VM: every page arrives in its last version whatever
//! the number of channels, and a channel that dies fails the migration with the source running.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tern_migrate::fake::FakeVm;
use tern_migrate::{run_outgoing, Capabilities, MigrationParams, MigrationStatus, SourceVm};

mod common;

use common::*;

fn multifd() -> Capabilities {
    Capabilities {
        ram_digest: true,
        multifd: true,
        ..Default::default()
    }
}

/// Rewrites `pages` pages of region 0 with ever new values until `stop`.
fn dirtier(src: Arc<FakeVm>, stop: Arc<AtomicBool>, pages: u64) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            src.guest_write(0, (i * 7) % pages, (i % 250) as u8 + 3);
            i += 1;
            if i.is_multiple_of(64) {
                thread::sleep(Duration::from_micros(200));
            }
        }
    })
}

#[test]
fn one_two_and_eight_channels_move_a_dirtying_guest_whole() {
    for n in [1u8, 2, 8] {
        let u = uri(&format!("multifd-{n}"));
        let src = FakeVm::new(&[16 * MIB, 4 * MIB]);
        fill(&src, 2000);
        let dst = FakeVm::new_target(&[16 * MIB, 4 * MIB]);
        let (tctl, t) = target(&u, dst.clone(), None);
        let stop = Arc::new(AtomicBool::new(false));
        let guest = dirtier(src.clone(), stop.clone(), 4096);
        let (ctl, _) = control_with(
            MigrationParams {
                downtime_limit_ms: 50,
                multifd_channels: n,
                ..Default::default()
            },
            multifd(),
        );
        let r = run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl);
        stop.store(true, Ordering::SeqCst);
        guest.join().unwrap();
        r.unwrap_or_else(|e| panic!("{n} channels: {e}"));
        t.join().unwrap().unwrap();
        let s = ctl.snapshot();
        assert_eq!(s.status, MigrationStatus::Completed);
        assert_eq!(s.ram_digest, tctl.snapshot().ram_digest, "{n} channels");
        assert_eq!(src.contents(), dst.contents(), "{n} channels");
        assert!(s.dirty_sync_count >= 2, "{n} channels: several rounds");
        assert!(dst.is_running());
    }
}

/// A few hot pages rewritten all the time, over eight channels, through many short rounds:
/// each round's copy of a hot page may travel on another channel than the last one, so a
/// missing barrier at SYNC would let an older copy land last.
#[test]
fn hot_pages_arrive_in_their_last_version() {
    for attempt in 0..5 {
        let u = uri(&format!("multifd-hot-{attempt}"));
        let src = FakeVm::new(&[8 * MIB]);
        fill(&src, 2048);
        let dst = FakeVm::new_target(&[8 * MIB]);
        let (tctl, t) = target(&u, dst.clone(), None);
        let stop = Arc::new(AtomicBool::new(false));
        let guest = dirtier(src.clone(), stop.clone(), 16);
        let (ctl, _) = control_with(
            MigrationParams {
                // Never converges on its own: every round carries the hot pages again.
                downtime_limit_ms: 0,
                max_rounds: 20,
                limit_action: tern_migrate::LimitAction::Switchover,
                multifd_channels: 8,
                ..Default::default()
            },
            multifd(),
        );
        let r = run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl);
        stop.store(true, Ordering::SeqCst);
        guest.join().unwrap();
        r.unwrap();
        t.join().unwrap().unwrap();
        assert_eq!(ctl.snapshot().dirty_sync_count, 21);
        assert_eq!(ctl.snapshot().ram_digest, tctl.snapshot().ram_digest);
        assert_eq!(src.contents(), dst.contents(), "attempt {attempt}");
    }
}

#[test]
fn a_data_channel_that_dies_fails_the_migration_and_the_source_runs_on() {
    let u = uri("multifd-dies");
    let src = FakeVm::new(&[64 * MIB]);
    fill(&src, 16384);
    let tern_migrate::transport::Uri::Unix(path) = &u else {
        unreachable!()
    };
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    let peer = thread::spawn(move || {
        // The main channel and two data channels; the first data channel dies at once, the
        // others are read until the source gives up.
        let conns: Vec<_> = (0..3).map(|_| l.accept().unwrap().0).collect();
        let mut keep = Vec::new();
        for (i, c) in conns.into_iter().enumerate() {
            if i == 1 {
                drop(c);
            } else {
                keep.push(thread::spawn(move || {
                    let _ = std::io::copy(&mut &c, &mut std::io::sink());
                }));
            }
        }
        for k in keep {
            k.join().unwrap();
        }
    });
    let (ctl, _) = control_with(
        MigrationParams {
            multifd_channels: 2,
            ..Default::default()
        },
        multifd(),
    );
    let err = run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl).unwrap_err();
    assert_eq!(ctl.snapshot().status, MigrationStatus::Failed, "{err}");
    assert!(src.is_running(), "{err}");
    peer.join().unwrap();
}

#[test]
fn multifd_over_a_file_is_refused_clearly() {
    let p = std::env::temp_dir().join(format!("tern-multifd-{}.tern", std::process::id()));
    let src = FakeVm::new(&[4 * MIB]);
    let (ctl, _) = control_with(MigrationParams::default(), multifd());
    let err = run_outgoing(
        src.clone() as Arc<dyn SourceVm>,
        &tern_migrate::transport::Uri::File(p.clone()),
        None,
        &ctl,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("multifd needs a tcp: or unix: URI"),
        "{err}"
    );
    assert!(src.is_running());
    let _ = std::fs::remove_file(p);
}

/// The target's barrier, deterministically: a hand-made source sends a page's round-1 copy on
/// data channel 0 and its round-2 copy on channel 1, and delivers channel 1 entirely before
/// channel 0. Only the SYNC barrier keeps the round-1 copy from landing last.
#[test]
fn the_target_applies_no_page_of_a_later_round_before_every_channel_synced() {
    use std::io::Write;
    use tern_wire::{
        record_type, ChannelHello, ChannelRole, RamRegionDesc, RamRun, RecordReader, RecordWriter,
        ReturnMessage, RunData, StreamWriter, VmDescription,
    };
    let u = uri("multifd-barrier");
    let model = FakeVm::new(&[4 * MIB]);
    let dst = FakeVm::new_target(&[4 * MIB]);
    let (_tctl, t) = target(&u, dst.clone(), None);
    let tern_migrate::transport::Uri::Unix(path) = &u else {
        unreachable!()
    };
    let connect = || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    };
    let session = [9u8; 16];
    let hello = |s: &mut std::os::unix::net::UnixStream, role, index| {
        let h = ChannelHello {
            session,
            role,
            index,
            channels: 3,
        };
        RecordWriter::new(s)
            .write(record_type::CHANNEL_HELLO, 0, &h.encode())
            .unwrap();
    };
    let mut main = connect();
    hello(&mut main, ChannelRole::Main, 0);
    let mut data: Vec<_> = (0..2u16)
        .map(|i| {
            let mut s = connect();
            hello(&mut s, ChannelRole::Data, i);
            s
        })
        .collect();
    let desc = VmDescription {
        machine: model.machine(),
        ram: model
            .ram()
            .regions()
            .into_iter()
            .map(|r| RamRegionDesc {
                id: r.id,
                name: r.name,
                gpa: r.gpa,
                size: r.size,
            })
            .collect(),
        sections: model.state_schemas(),
    };
    let mut m = StreamWriter::new(main.try_clone().unwrap()).unwrap();
    m.description(&desc).unwrap();
    let (old, new) = (vec![1u8; 4096], vec![2u8; 4096]);
    let channel = |copy: Option<(u64, &[u8])>| {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.description(&desc).unwrap();
        for round in 0..4 {
            if let Some((r, bytes)) = copy {
                if r == round {
                    w.ram_pages(
                        0,
                        &[RamRun {
                            first_page: 7,
                            data: RunData::Raw(bytes),
                        }],
                    )
                    .unwrap();
                }
            }
            w.sync(round).unwrap();
        }
        w.finish().unwrap().0
    };
    let (ch0, ch1) = (channel(Some((1, &old))), channel(Some((2, &new))));
    // Channel 1 first, all of it; channel 0 only after a pause.
    data[1].write_all(&ch1).unwrap();
    thread::sleep(Duration::from_millis(300));
    data[0].write_all(&ch0).unwrap();
    for s in model.save_state().unwrap() {
        m.section(&s).unwrap();
    }
    let (main_w, _) = m.finish().unwrap();
    drop(main_w);
    // The target answers LOADED once everything is in; its RAM is then final.
    let mut rr = RecordReader::new(main.try_clone().unwrap());
    let rec = rr.next_record().unwrap().unwrap();
    assert!(matches!(
        ReturnMessage::decode(rec.body).unwrap(),
        ReturnMessage::Loaded { .. }
    ));
    assert_eq!(
        dst.contents()[0][7 * 4096],
        2,
        "the round-2 copy landed last"
    );
    main.flush().unwrap();
    drop((main, data, rr));
    assert!(t.join().unwrap().is_err(), "no GO: the target does not run");
}
