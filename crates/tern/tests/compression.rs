//! Compressed RAM (`multifd-compression` zstd and lz4) between two tern processes and into a
//! saved file, through real KVM, with a guest whose pages compress (`tern.entropy`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const MIGRATE: Duration = Duration::from_secs(180);

fn ram(r: &Value, key: &str) -> u64 {
    r["ram"][key].as_u64().unwrap_or(0)
}

#[test]
fn zstd_on_channels_and_lz4_on_the_main_stream_carry_a_compressible_guest() {
    let _g = exclusive();
    let d = dir("compression");
    for (i, (channels, compression, level)) in
        [(Some(2), "zstd", 3), (None, "lz4", 1), (Some(8), "lz4", 1)]
            .into_iter()
            .enumerate()
    {
        let what = format!("{compression} with {channels:?} channels");
        let cmdline = "tern.wss=256 tern.rate=64 tern.pattern=random tern.entropy=10 tern.check=1";
        let mut src = source(&d, &format!("src{i}"), "512M", cmdline);
        let uri = free_tcp_uri();
        let mut dst = target(&d, &format!("dst{i}"), &uri, &[]);
        src.q.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "multifd", "state": channels.is_some()},
                {"capability": "x-tern-ram-digest", "state": true}]}),
        );
        src.q.ok(
            "migrate-set-parameters",
            json!({"multifd-channels": channels.unwrap_or(2),
                   "multifd-compression": compression, "multifd-zstd-level": level}),
        );
        let p = src.q.ok("query-migrate-parameters", json!({}));
        assert_eq!(p["multifd-compression"], compression, "{p}");
        src.q.ok("migrate", json!({"uri": uri}));
        let (r, _) = moved_whole(&mut src, &mut dst, MIGRATE, &what);
        dst.p.wait_for("a self-check on the target", LINE, |l| {
            l.starts_with("tern-guest check ok")
        });
        // A tenth of each page varies: the stream is far smaller than the pages it carried.
        let (sent, data) = (ram(&r, "transferred"), ram(&r, "normal-bytes"));
        assert!(
            data >= 256 << 20 && sent < data / 3,
            "{what}: {sent} bytes sent for {data} bytes of pages: {r}"
        );
        eprintln!(
            "{what}: {} ms, {} MiB sent for {} MiB of pages",
            r["total-time"],
            sent >> 20,
            data >> 20
        );
        quit(src);
        quit(dst);
    }
}

fn tern(args: &[&str]) -> std::process::Output {
    Command::new(tern_bin()).args(args).output().expect("tern")
}

fn restore(d: &Path, tag: &str, file: &Path) -> Vmm {
    let sock = d.join(format!("{tag}.qmp"));
    let mut cmd = Command::new(tern_bin());
    cmd.arg("restore")
        .arg(file)
        .arg("--qmp")
        .arg(format!("unix:{}", sock.display()));
    let p = Proc::spawn(&mut cmd);
    let q = Qmp::connect(&sock, LINE);
    Vmm { p, q }
}

#[test]
fn a_compressed_save_verifies_analyzes_and_restores() {
    let _g = exclusive();
    let d = dir("compression-save");
    let mut src = source(
        &d,
        "src",
        "512M",
        "tern.wss=128 tern.rate=32 tern.entropy=30 tern.check=1",
    );
    src.q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-tern-ram-digest", "state": true}]}),
    );
    let file = d.join("vm.tern");
    let qmp = format!("unix:{}", d.join("src.qmp").display());
    let out = tern(&[
        "save",
        "--qmp",
        &qmp,
        "--compress",
        "zstd:5",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = src.q.ok("query-migrate", json!({}));
    let n = paused_last_hb(&mut src.p);
    let len = std::fs::metadata(&file).unwrap().len();
    assert!(len < 96 << 20, "{len} bytes for 128 MiB of 30% entropy");
    let verify = tern(&["verify", file.to_str().unwrap()]);
    assert!(verify.status.success(), "{verify:?}");
    let analyze = tern(&["analyze", file.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&analyze.stdout);
    assert!(
        analyze.status.success() && text.contains("compressed into"),
        "{text}"
    );
    let mut dst = restore(&d, "dst", &file);
    continues_on(&mut dst.p, n);
    let rd = dst.q.ok("query-migrate", json!({}));
    assert_eq!(report["x-tern-ram-digest"], rd["x-tern-ram-digest"]);
    dst.p.wait_for("a self-check after the restore", LINE, |l| {
        l.starts_with("tern-guest check ok")
    });
    quit(dst);
    quit(src);
}
