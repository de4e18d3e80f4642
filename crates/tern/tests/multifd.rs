//! Parallel data channels (`multifd`) between two tern processes, through real KVM: the guest
//! dirties its memory with each pattern while 1, 2 or 8 channels carry it over tcp and unix.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const MIGRATE: Duration = Duration::from_secs(180);

#[test]
fn one_two_and_eight_channels_over_tcp_and_unix_with_each_pattern() {
    let _g = exclusive();
    let d = dir("multifd");
    for (i, (transport, channels, pattern)) in [
        ("unix", 1, "seq"),
        ("tcp", 2, "random"),
        ("unix", 8, "hot"),
        ("tcp", 8, "seq"),
        ("unix", 2, "random"),
    ]
    .into_iter()
    .enumerate()
    {
        let what = format!("{channels} channels over {transport}, pattern {pattern}");
        let cmdline = format!("tern.wss=256 tern.rate=64 tern.pattern={pattern} tern.check=1");
        let mut src = source(&d, &format!("src{i}"), "512M", &cmdline);
        let uri = match transport {
            "unix" => format!("unix:{}", d.join(format!("mig{i}.sock")).display()),
            _ => free_tcp_uri(),
        };
        let mut dst = target(&d, &format!("dst{i}"), &uri, &[]);
        src.q.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "multifd", "state": true},
                {"capability": "x-tern-ram-digest", "state": true}]}),
        );
        let timeline = d.join(format!("timeline{i}.json"));
        src.q.ok(
            "migrate-set-parameters",
            json!({"multifd-channels": channels, "x-tern-timeline": timeline.to_str().unwrap()}),
        );
        src.q.ok("migrate", json!({"uri": uri}));
        let (r, rd) = moved_whole(&mut src, &mut dst, MIGRATE, &what);
        assert_eq!(rd["status"], "completed", "{what}: {rd}");
        assert!(
            r["ram"]["multifd-bytes"].as_u64().unwrap_or(0) > 0,
            "{what}: {r}"
        );
        let t: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&timeline).unwrap()).unwrap();
        // The timeline has each channel's share, and they add up to multifd-bytes.
        let per: Vec<u64> = t["multifd-channel-bytes"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        assert_eq!(per.len(), channels as usize, "{what}: {per:?}");
        assert!(
            per.iter().all(|&b| b > 0),
            "{what}: every channel carried data: {per:?}"
        );
        assert_eq!(
            Some(per.iter().sum::<u64>()),
            r["ram"]["multifd-bytes"].as_u64()
        );
        // query-migrate has each channel's bytes and busy time; the timeline has the same.
        let each = r["x-tern-multifd-channels"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(each.len(), channels as usize, "{what}: {r}");
        let busy: Vec<u64> = t["multifd-channel-busy-ms"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        assert_eq!(busy.len(), channels as usize, "{what}: {busy:?}");
        let total = r["total-time"].as_u64().unwrap();
        for (c, b) in each.iter().zip(&busy) {
            assert_eq!(c["busy-ms"].as_u64(), Some(*b), "{what}: {r}");
            assert!(*b <= total, "{what}: busy {b} ms in a {total} ms migration");
        }
        // Each round says how long collecting the dirty log took, and the downtime split has
        // the final sync's share.
        let rounds = t["rounds"].as_array().unwrap();
        assert!(
            rounds
                .iter()
                .all(|r| r["sync-ms"].as_f64().is_some_and(|x| x >= 0.0)),
            "{what}: {rounds:?}"
        );
        let split = &t["switchover"]["downtime"];
        let sync = split["final-sync"].as_f64().unwrap();
        assert!(
            sync >= 0.0 && sync <= split["total"].as_f64().unwrap(),
            "{what}: {split}"
        );
        // 256 MiB of pages take a channel a measurable time, whatever the split.
        assert!(busy.iter().sum::<u64>() > 0, "{what}: {busy:?}");
        eprintln!(
            "{what}: {} ms total, {} ms downtime {}, {} MiB",
            r["total-time"],
            r["downtime"],
            t["switchover"]["downtime"],
            r["ram"]["transferred"].as_u64().unwrap_or(0) >> 20
        );
        quit(src);
        quit(dst);
    }
}
