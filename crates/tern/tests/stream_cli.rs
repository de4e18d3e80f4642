//! `tern analyze` and `tern verify` on streams written by tern-wire.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use tern_wire::{
    RamRegionDesc, RamRun, RunData, Section, SectionDesc, StreamWriter, Value, VmDescription,
    PAGE_SIZE,
};

fn stream() -> Vec<u8> {
    let page = vec![0x11u8; 2 * PAGE_SIZE];
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.description(&VmDescription {
        machine: serde_json::json!({"memory": 1 << 20, "vcpus": 1}),
        ram: vec![RamRegionDesc {
            id: 0,
            name: "ram-below-4g".into(),
            gpa: 0,
            size: 1 << 20,
        }],
        sections: vec![SectionDesc {
            name: "cpu".into(),
            instance: 0,
            version: 3,
            min_version: 1,
            fields: vec![],
            subsections: vec![],
        }],
    })
    .unwrap();
    w.ram_pages(
        0,
        &[
            RamRun {
                first_page: 0,
                data: RunData::Raw(&page),
            },
            RamRun {
                first_page: 2,
                data: RunData::Zero(254),
            },
        ],
    )
    .unwrap();
    w.section(&Section {
        name: "cpu".into(),
        instance: 0,
        version: 3,
        fields: vec![("rip".into(), Value::U64(0x100000))],
        subsections: vec![],
    })
    .unwrap();
    w.finish().unwrap().0
}

fn tern(args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut child = Command::new(tern_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sin = child.stdin.take().unwrap();
    if let Some(b) = stdin {
        sin.write_all(b).unwrap();
    }
    drop(sin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn verify_accepts_a_valid_stream_from_a_file_and_stdin() {
    let d = tmpdir("verify-ok");
    let f = d.join("s.tern");
    std::fs::write(&f, stream()).unwrap();
    let (code, out, err) = tern(&["verify", f.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": ok: "), "{out}");
    assert!(
        out.contains("2 pages with data, 254 zero pages, 1 sections"),
        "{out}"
    );
    let (code, out, _) = tern(&["verify", "-"], Some(&stream()));
    assert_eq!(code, 0);
    assert!(out.starts_with("-: ok: "), "{out}");
}

#[test]
fn verify_rejects_one_flipped_bit_with_its_offset() {
    let d = tmpdir("verify-bad");
    let mut s = stream();
    let n = s.len();
    s[n / 2] ^= 0x10;
    let f = d.join("bad.tern");
    std::fs::write(&f, &s).unwrap();
    let (code, _, err) = tern(&["verify", f.to_str().unwrap()], None);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("at byte "), "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");
    let (code, _, err) = tern(&["verify", "/nonexistent/stream"], None);
    assert_eq!(code, 1);
    assert!(err.contains("cannot open /nonexistent/stream"), "{err}");
}

#[test]
fn analyze_summarises_and_dumps_json() {
    let (code, out, err) = tern(&["analyze", "-"], Some(&stream()));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("RAM_PAGES"), "{out}");
    assert!(out.contains("region 0 (ram-below-4g"), "{out}");
    assert!(out.contains("2 pages with data"), "{out}");
    assert!(out.contains("254 zero pages"), "{out}");
    assert!(out.contains("cpu"), "{out}");
    assert!(out.contains("version 3"), "{out}");
    let (code, out, _) = tern(&["analyze", "--json", "-"], Some(&stream()));
    assert_eq!(code, 0);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["sections"][0]["fields"]["rip"], 0x100000);
    assert_eq!(j["description"]["ram"][0]["size"], 1 << 20);
    assert_eq!(j["ram"][0]["zero_pages"], 254);
    assert!(j["error"].is_null());
    // Truncated: a partial summary and exit 1.
    let s = stream();
    let (code, _, err) = tern(&["analyze", "-"], Some(&s[..s.len() - 3]));
    assert_eq!(code, 1);
    assert!(err.contains("truncated"), "{err}");
}
