//! Guest RAM in each backing (`--memory-backend`), migrated between backings through real KVM:
//! the target's choice is its own, the guest cannot tell.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn a_guest_moves_between_anonymous_memory_and_a_memfd_both_ways() {
    let _g = exclusive();
    let d = dir("memory-backend");
    for (i, (from, to, multifd)) in [("anon", "memfd", false), ("memfd", "anon", true)]
        .into_iter()
        .enumerate()
    {
        let what = format!("{from} -> {to}");
        let cmdline = "tern.wss=192 tern.rate=64 tern.pattern=random tern.check=1";
        let mut src = source_with(
            &d,
            &format!("src{i}"),
            "512M",
            cmdline,
            &["--memory-backend", from],
        );
        let uri = format!("unix:{}", d.join(format!("mig{i}.sock")).display());
        let mut dst = target(&d, &format!("dst{i}"), &uri, &["--memory-backend", to]);
        src.q.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "multifd", "state": multifd},
                {"capability": "x-tern-ram-digest", "state": true}]}),
        );
        src.q.ok("migrate", json!({"uri": uri}));
        let (r, _) = moved_whole(&mut src, &mut dst, Duration::from_secs(120), &what);
        // Never-written memory was sent as zero ranges on both backings (the source found
        // its holes), not read page by page.
        let zero = r["ram"]["duplicate"].as_u64().unwrap_or(0);
        assert!(zero >= 40_000, "{what}: only {zero} zero pages: {r}");
        dst.p.wait_for("a self-check on the target", LINE, |l| {
            l.starts_with("tern-guest check ok")
        });
        quit(src);
        quit(dst);
    }
}

fn free_huge_pages() -> u64 {
    let read = |f: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{f}"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

#[test]
fn huge_pages_are_used_when_reserved_and_refused_plainly_when_not() {
    let _g = exclusive();
    let d = dir("memory-backend-hugetlb");
    if free_huge_pages() >= 64 {
        let mut vm = source_with(
            &d,
            "huge",
            "128M",
            "tern.wss=32 tern.rate=16 tern.check=1",
            &["--memory-backend", "memfd-hugetlb"],
        );
        vm.p.wait_for("a self-check", LINE, |l| {
            l.starts_with("tern-guest check ok")
        });
        quit(vm);
        return;
    }
    let out = Command::new(tern_bin())
        .args([
            "run",
            "--memory",
            "128M",
            "--memory-backend",
            "memfd-hugetlb",
        ])
        .args(["--serial", "none"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("needs 64 free 2 MiB huge pages") && err.contains("vm.nr_hugepages"),
        "{err}"
    );
    let out = Command::new(tern_bin())
        .args(["run", "--memory-backend", "tmpfs"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("anon, memfd or memfd-hugetlb"),
        "{err}"
    );
}
