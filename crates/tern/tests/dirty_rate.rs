//! `calc-dirty-rate` / `query-dirty-rate` (mode dirty-bitmap) on a guest that dirties 64 MiB/s
//! with each pattern, through real KVM: the reported rate is the distinct pages written in the
//! window, which the test predicts from the guest's own pattern; no migration may start while a
//! measurement holds the dirty log, and one runs fine afterwards.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const RATE_MIB: f64 = 64.0;
const WSS_PAGES: f64 = 256.0 * 256.0;
const VCPUS: f64 = 2.0;

/// Distinct pages the guest's pattern writes in `secs` (each vCPU owns half the set).
fn expected_pages(pattern: &str, secs: f64) -> f64 {
    let own = WSS_PAGES / VCPUS;
    let k = RATE_MIB * 256.0 * secs / VCPUS; // writes per vCPU
    let per_cpu = match pattern {
        "seq" => k.min(own),
        "random" => own * (1.0 - (-k / own).exp()),
        // 90% of writes into a tenth of the set, 10% anywhere in it.
        "hot" => {
            let hot = own / 10.0;
            let (lh, lc) = (0.9 * k / hot + 0.1 * k / own, 0.1 * k / own);
            hot * (1.0 - (-lh).exp()) + (own - hot) * (1.0 - (-lc).exp())
        }
        _ => unreachable!(),
    };
    per_cpu * VCPUS
}

fn measured(q: &mut Qmp) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = q.ok("query-dirty-rate", json!({}));
        if d["status"] == "measured" {
            return d;
        }
        assert_eq!(d["status"], "measuring", "{d}");
        assert!(Instant::now() < deadline, "still measuring: {d}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_dirty_rate_of_each_pattern_is_measured_and_excludes_a_migration() {
    let _g = exclusive();
    let d = dir("dirty-rate");
    for (i, pattern) in ["seq", "random", "hot"].into_iter().enumerate() {
        let cmdline = format!("tern.wss=256 tern.rate=64 tern.pattern={pattern} tern.check=0");
        let mut src = source(&d, &format!("src{i}"), "512M", &cmdline);
        assert_eq!(
            src.q.ok("query-dirty-rate", json!({}))["status"],
            "unstarted"
        );
        src.q.ok(
            "calc-dirty-rate",
            json!({"calc-time": 2, "mode": "dirty-bitmap"}),
        );
        if i == 0 {
            // The dirty log is the measurement's: no migration meanwhile, nor a second one.
            let e = src.q.err("migrate", json!({"uri": free_tcp_uri()}));
            assert!(e.contains("dirty rate measurement is running"), "{e}");
            let e = src.q.err("calc-dirty-rate", json!({"calc-time": 1}));
            assert!(e.contains("already running"), "{e}");
        }
        let m = measured(&mut src.q);
        let secs = m["x-tern-window-ms"].as_f64().unwrap() / 1000.0;
        let want = expected_pages(pattern, secs) * 4096.0 / 1048576.0 / secs;
        let got = m["dirty-rate"].as_f64().unwrap();
        eprintln!("{pattern}: {got} MiB/s measured, {want:.1} expected: {m}");
        assert!(
            (got - want).abs() <= want * 0.25,
            "{pattern}: {got} MiB/s, expected {want:.1}: {m}"
        );
        assert_eq!(m["calc-time"], 2);
        assert_eq!(m["mode"], "dirty-bitmap");
        assert_eq!(
            src.q
                .ok("query-dirty-rate", json!({"calc-time-unit": "millisecond"}))["calc-time"],
            2000
        );
        quit(src);
        if i == 2 {
            // Afterwards a migration tracks its own dirty pages from scratch: the guest
            // continues whole at the target. (This guest checks itself, which the measurements
            // above avoid: on this host's shadow paging, reads can show up as dirty pages.)
            let mut src = source(
                &d,
                "src-mig",
                "512M",
                "tern.wss=256 tern.rate=64 tern.pattern=random tern.check=2",
            );
            src.q.ok("calc-dirty-rate", json!({"calc-time": 1}));
            let m = measured(&mut src.q);
            eprintln!("random, self-checking: {m}");
            let uri = free_tcp_uri();
            let mut dst = target(&d, "dst", &uri, &[]);
            src.q.ok(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "x-tern-ram-digest", "state": true}]}),
            );
            src.q.ok("migrate", json!({"uri": uri}));
            moved_whole(
                &mut src,
                &mut dst,
                Duration::from_secs(120),
                "after a measurement",
            );
            quit(dst);
            quit(src);
        }
    }
    // Arguments QEMU has that tern does not, refused by name; windows out of range.
    let mut vm = source(&d, "args", "256M", "tern.wss=64 tern.rate=0");
    for (args, want) in [
        (
            json!({"calc-time": 1, "mode": "page-sampling"}),
            "dirty-bitmap",
        ),
        (
            json!({"calc-time": 1, "mode": "dirty-ring"}),
            "dirty-bitmap",
        ),
        (
            json!({"calc-time": 1, "sample-pages": 512}),
            "page-sampling",
        ),
        (json!({"calc-time": 0}), "out of range"),
        (json!({"calc-time": 61}), "out of range"),
        (
            json!({"calc-time": 50, "calc-time-unit": "millisecond"}),
            "out of range",
        ),
        (
            json!({"calc-time": 1, "calc-time-unit": "hour"}),
            "second or millisecond",
        ),
    ] {
        let e = vm.q.err("calc-dirty-rate", args.clone());
        assert!(e.contains(want), "{args}: {e}");
    }
    // An idle guest dirties (almost) nothing, measured in milliseconds.
    vm.q.ok(
        "calc-dirty-rate",
        json!({"calc-time": 500, "calc-time-unit": "millisecond"}),
    );
    let m = measured(&mut vm.q);
    assert!(m["dirty-rate"].as_i64().unwrap() <= 2, "{m}");
    assert_eq!(m["calc-time-unit"], "millisecond");
    quit(vm);
}
