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

/// Migrates a 16 + 4 MiB fake guest that dirties 4096 pages all along, with `params` and
/// `caps`; checks it completed with the same RAM on both sides and returns the source's
/// statistics.
fn migrate_dirtying(
    name: &str,
    params: MigrationParams,
    caps: Capabilities,
) -> tern_migrate::MigrationStats {
    let u = uri(name);
    let src = FakeVm::new(&[16 * MIB, 4 * MIB]);
    fill(&src, 2000);
    let dst = FakeVm::new_target(&[16 * MIB, 4 * MIB]);
    let (tctl, t) = target(&u, dst.clone(), None);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = dirtier(src.clone(), stop.clone(), 4096);
    let (ctl, _) = control_with(params, caps);
    let r = run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl);
    stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    r.unwrap_or_else(|e| panic!("{name}: {e}"));
    t.join().unwrap().unwrap();
    let s = ctl.snapshot();
    assert_eq!(s.status, MigrationStatus::Completed, "{name}");
    assert_eq!(s.ram_digest, tctl.snapshot().ram_digest, "{name}");
    assert!(src.contents() == dst.contents(), "{name}: RAM differs");
    assert!(dst.is_running(), "{name}");
    s
}

#[test]
fn one_two_and_eight_channels_move_a_dirtying_guest_whole() {
    for n in [1u8, 2, 8] {
        let s = migrate_dirtying(
            &format!("multifd-{n}"),
            MigrationParams {
                downtime_limit_ms: 50,
                multifd_channels: n,
                ..Default::default()
            },
            multifd(),
        );
        assert!(s.dirty_sync_count >= 2, "{n} channels: several rounds");
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

/// A data channel's stream for a hand-made source: `copies` are (round, page, byte), each written
/// just before SYNC(round); a SYNC for each of `rounds`; then END.
fn channel(desc: &tern_wire::VmDescription, copies: &[(u64, u64, u8)], rounds: &[u64]) -> Vec<u8> {
    use tern_wire::{RamRun, RunData, StreamWriter};
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.description(desc).unwrap();
    for &round in rounds {
        for &(r, page, byte) in copies {
            if r == round {
                let data = vec![byte; 4096];
                let run = RamRun {
                    first_page: page,
                    data: RunData::Raw(&data),
                };
                w.ram_pages(0, &[run]).unwrap();
            }
        }
        w.sync(round).unwrap();
    }
    w.finish().unwrap().0
}

/// A hand-made source with two data channels against a real target: channel 1's stream is
/// delivered whole, then (after a pause) channel 0's, then the main stream. Returns the
/// target's first return message, the target VM and how the target ended.
fn hand_made(
    name: &str,
    streams: impl FnOnce(&tern_wire::VmDescription) -> [Vec<u8>; 2],
) -> (tern_wire::ReturnMessage, Arc<FakeVm>, Result<(), String>) {
    use std::io::Write;
    use tern_wire::{
        record_type, ChannelHello, ChannelRole, RecordReader, RecordWriter, ReturnMessage,
        StreamWriter,
    };
    let u = uri(name);
    let model = FakeVm::new(&[4 * MIB]);
    let dst = FakeVm::new_target(&[4 * MIB]);
    let (_tctl, t) = target(&u, dst.clone(), None);
    let tern_migrate::transport::Uri::Unix(path) = &u else {
        unreachable!()
    };
    let connect = |role, index| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        let h = ChannelHello {
            session: [9; 16],
            role,
            index,
            channels: 3,
        };
        RecordWriter::new(&mut s)
            .write(record_type::CHANNEL_HELLO, 0, &h.encode())
            .unwrap();
        s
    };
    let main = connect(ChannelRole::Main, 0);
    let mut data = [connect(ChannelRole::Data, 0), connect(ChannelRole::Data, 1)];
    let desc = tern_migrate::describe(&*model);
    let mut m = StreamWriter::new(main.try_clone().unwrap()).unwrap();
    m.description(&desc).unwrap();
    let [ch0, ch1] = streams(&desc);
    // Written from threads: a target that refuses a channel stops reading it.
    let w1 = {
        let mut d = data[1].try_clone().unwrap();
        thread::spawn(move || d.write_all(&ch1))
    };
    thread::sleep(Duration::from_millis(300));
    let w0 = {
        let mut d = data[0].try_clone().unwrap();
        thread::spawn(move || d.write_all(&ch0))
    };
    for s in model.save_state().unwrap() {
        let _ = m.section(&s);
    }
    let _ = m.finish();
    let mut rr = RecordReader::new(main.try_clone().unwrap());
    let rec = rr.next_record().unwrap().unwrap();
    let msg = ReturnMessage::decode(rec.body).unwrap();
    for d in data.iter_mut() {
        let _ = d.shutdown(std::net::Shutdown::Both);
    }
    let _ = main.shutdown(std::net::Shutdown::Both);
    let _ = (w0.join(), w1.join());
    (msg, dst, t.join().unwrap())
}

/// The target's barrier, deterministically: a page's round-1 copy travels on data channel 0,
/// its round-2 copy on channel 1, and channel 1 is delivered whole before channel 0. Only the
/// SYNC barrier keeps the round-1 copy from landing last. (Without it this fails: checked by
/// removing the wait.)
#[test]
fn the_target_applies_no_page_of_a_later_round_before_every_channel_synced() {
    let (msg, dst, end) = hand_made("multifd-barrier", |d| {
        [
            channel(d, &[(1, 7, 1)], &[0, 1, 2, 3]),
            channel(d, &[(2, 7, 2)], &[0, 1, 2, 3]),
        ]
    });
    assert!(
        matches!(msg, tern_wire::ReturnMessage::Loaded { .. }),
        "{msg:?}"
    );
    assert_eq!(
        dst.contents()[0][7 * 4096],
        2,
        "the round-2 copy landed last"
    );
    assert!(end.is_err(), "no GO: the target does not run");
    assert!(!dst.is_running());
}

/// A data channel that skips a round, or ends short of the others, fails the migration with a
/// reason instead of letting an old copy through or waiting for ever.
#[test]
fn a_data_channel_that_skips_a_round_or_ends_early_is_refused() {
    for (name, rounds0, want) in [
        ("multifd-skip", &[0u64, 2][..], "round 1 was due"),
        ("multifd-short", &[0u64, 1][..], "round 2"),
    ] {
        let (msg, dst, end) = hand_made(name, |d| {
            [
                channel(d, &[(1, 7, 1)], rounds0),
                channel(d, &[(2, 7, 2)], &[0, 1, 2]),
            ]
        });
        match msg {
            tern_wire::ReturnMessage::Error { message, .. } => {
                assert!(message.contains(want), "{name}: {message}")
            }
            other => panic!("{name}: {other:?}"),
        }
        let why = end.unwrap_err();
        assert!(why.contains(want), "{name}: {why}");
        assert!(!dst.is_running());
    }
}

/// One page on two channels in the same round breaks the stream's rule (and two threads must
/// never write one page at once): the target claims each page for its round before writing it,
/// and a second claim fails the migration. In different rounds the same page is fine.
#[test]
fn a_page_sent_twice_in_one_round_is_refused() {
    let (msg, dst, end) = hand_made("multifd-twice", |d| {
        [
            channel(d, &[(1, 7, 1), (2, 9, 1)], &[0, 1, 2]),
            channel(d, &[(1, 7, 2), (2, 7, 2)], &[0, 1, 2]),
        ]
    });
    let want = "page 7 of region 0 came twice in round 1";
    match msg {
        tern_wire::ReturnMessage::Error { message, .. } => {
            assert!(message.contains(want), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(end.unwrap_err().contains(want));
    assert!(!dst.is_running());
    // The same page in rounds 1 and 2 on different channels: accepted.
    let (msg, dst, _) = hand_made("multifd-twice-ok", |d| {
        [
            channel(d, &[(1, 7, 1)], &[0, 1, 2]),
            channel(d, &[(2, 7, 2)], &[0, 1, 2]),
        ]
    });
    assert!(
        matches!(msg, tern_wire::ReturnMessage::Loaded { .. }),
        "{msg:?}"
    );
    assert_eq!(dst.contents()[0][7 * 4096], 2);
}

/// While the data channels carry a long round the main channel has nothing to say: its NOP
/// keepalive (every 5 s) keeps a target with a 6 s read timeout from giving up on it.
#[test]
fn a_long_round_does_not_trip_the_targets_read_timeout_on_the_main_channel() {
    let u = uri("multifd-keepalive");
    let src = FakeVm::new(&[64 * MIB]);
    fill(&src, 16384);
    let dst = FakeVm::new_target(&[64 * MIB]);
    let (_tctl, t) = target_with(
        &u,
        dst.clone(),
        None,
        MigrationParams {
            read_timeout_ms: 6000,
            ..Default::default()
        },
    );
    let (ctl, _) = control_with(
        MigrationParams {
            // About 43 MiB of data at 5 MiB/s: a first round of some 8 s.
            max_bandwidth: 5 * MIB,
            multifd_channels: 2,
            ..Default::default()
        },
        multifd(),
    );
    let t0 = std::time::Instant::now();
    run_outgoing(src.clone() as Arc<dyn SourceVm>, &u, None, &ctl).unwrap();
    assert!(t0.elapsed() > Duration::from_secs(7), "{:?}", t0.elapsed());
    t.join().unwrap().unwrap();
    assert_eq!(src.contents(), dst.contents());
}

/// Compressed pages (the fake guest's pages repeat one byte) arrive whole, on data channels and
/// on the main stream, while the guest dirties them; the stream is much smaller than the pages.
#[test]
fn compressed_pages_arrive_whole_on_channels_and_on_the_main_stream() {
    use tern_migrate::MultifdCompression::{Lz4, Zstd};
    for (i, (channels, compression)) in [(None, Lz4), (Some(2), Zstd), (Some(4), Lz4), (None, Zstd)]
        .into_iter()
        .enumerate()
    {
        let what = format!("{compression:?} with {channels:?} channels");
        let s = migrate_dirtying(
            &format!("multifd-compressed-{i}"),
            MigrationParams {
                downtime_limit_ms: 50,
                multifd_channels: channels.unwrap_or(2),
                multifd_compression: compression,
                multifd_zstd_level: 3,
                // Bounded whatever the machine's speed: then the rest goes in the pause.
                max_rounds: 40,
                limit_action: tern_migrate::LimitAction::Switchover,
                ..Default::default()
            },
            Capabilities {
                ram_digest: true,
                multifd: channels.is_some(),
                ..Default::default()
            },
        );
        // At least the 1333 pages `fill` wrote went with data (how many more depends on how
        // often the dirtier rewrote a page after it was sent: with manual protect, a page
        // written many times between its re-arming and the next sync goes once).
        let data = s.normal * 4096;
        assert!(
            data >= 1333 * 4096 && s.transferred < data / 10,
            "{what}: {} bytes sent for {data} bytes of pages",
            s.transferred
        );
    }
}
