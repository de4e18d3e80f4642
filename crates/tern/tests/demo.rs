//! `tern demo`, the README's first command, end to end: it migrates the guest live and reports.

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_demo_migrates_live_and_writes_a_report() {
    let _g = exclusive();
    let d = tmpdir("demo");
    let out = Command::new(tern_bin())
        .args(["demo", "--dir", d.to_str().unwrap()])
        .output()
        .expect("tern demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The guest carried on at the target and its own check of every page passed there.
    let target = std::fs::read_to_string(d.join("target.log")).unwrap();
    assert!(
        target.lines().any(|l| l.starts_with("tern-guest check ok")),
        "{target}"
    );
    assert!(
        !target.contains("tern-guest ready"),
        "the target did not reboot the guest"
    );
    assert!(!target.contains("FAIL"), "{target}");
    for want in ["total time", "downtime as felt", "bytes", "report"] {
        assert!(text.contains(want), "no '{want}' in:\n{text}");
    }
    let svg = std::fs::read_to_string(d.join("timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("downtime"));
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("timeline.json")).unwrap()).unwrap();
    assert_eq!(t["status"], "completed");
    assert!(!t["rounds"].as_array().unwrap().is_empty());
    assert!(t["switchover"]["downtime"]["total"].as_f64().unwrap() > 0.0);
}
