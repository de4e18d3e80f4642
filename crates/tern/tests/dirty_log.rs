//! Dirty tracking through real KVM in each mode — `KVM_GET_DIRTY_LOG` alone (`get`), manual
//! protect with re-arming as pages are sent (`clear`, the default) and the dirty ring (`tern run
//! --dirty-ring-size`, small here so that vCPUs fill it and harvest it themselves) — with each
//! pattern of the guest, while the VMM itself writes guest memory outside the guest's working
//! set during precopy. The guest's self-check covers its working set; the RAM digests at the
//! switch-over cover every page, the VMM's writes included.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const MIGRATE: Duration = Duration::from_secs(180);

#[test]
fn every_dirty_log_mode_moves_a_dirtying_guest_and_the_vmms_own_writes() {
    let _g = exclusive();
    let d = dir("dirtylog");
    for (i, (mode, pattern)) in [
        ("get", "seq"),
        ("clear", "random"),
        ("clear", "hot"),
        ("ring", "seq"),
        ("ring", "random"),
    ]
    .into_iter()
    .enumerate()
    {
        let what = format!("{mode}, pattern {pattern}");
        let cmdline = format!("tern.wss=256 tern.rate=64 tern.pattern={pattern} tern.check=1");
        let extra: &[&str] = match mode {
            "ring" => &["--dirty-ring-size", "1024"],
            _ => &[],
        };
        let mut src = source_with(&d, &format!("src{i}"), "512M", &cmdline, extra);
        let uri = free_tcp_uri();
        let mut dst = target(&d, &format!("dst{i}"), &uri, &[]);
        src.q.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "x-tern-ram-digest", "state": true}]}),
        );
        // A capped link: precopy takes seconds, so the VMM's writes below land between rounds.
        src.q.ok(
            "migrate-set-parameters",
            json!({"max-bandwidth": 128u64 << 20,
                   "x-tern-dirty-log": if mode == "get" { "get" } else { "clear" }}),
        );
        src.q.ok("migrate", json!({"uri": uri}));
        // The VMM writes pages far above the working set (which ends near 273 MiB), each write
        // a new value, for as long as precopy runs.
        let (mut writes, started) = (0u64, Instant::now());
        loop {
            let r = src.q.ok("query-migrate", json!({}));
            if r["status"] != "active" && r["status"] != "setup" {
                break;
            }
            if started.elapsed() > MIGRATE {
                panic!("{what}: still migrating after {MIGRATE:?}: {r}");
            }
            let addr = (400u64 << 20) + (writes % 512) * 4096 + (writes % 7) * 8;
            let v = src.q.execute(
                "x-tern-write-guest-memory",
                json!({"addr": addr, "value": 0x7e57_0000_0000u64 + writes}),
            );
            if v.get("error").is_some() {
                // The switch-over paused the guest: the VMM's memory is frozen with it.
                break;
            }
            writes += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            writes >= 20,
            "{what}: only {writes} VMM writes during precopy"
        );
        let (r, _) = moved_whole(&mut src, &mut dst, MIGRATE, &what);
        assert_eq!(r["x-tern-dirty-log"], mode, "{what}: {r}");
        assert!(
            r["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 3,
            "{what}: several rounds: {r}"
        );
        quit(src);
        quit(dst);
    }
}
