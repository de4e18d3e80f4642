//! Bad input to `tern run`: one clear line on stderr, a non-zero exit, never a panic.

mod common;

use std::process::Command;

use common::*;

fn fails_clearly(args: &[&str], expect: &str) {
    let out = Command::new(tern_bin()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_ne!(out.status.code(), Some(101), "{args:?} panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: want one line, got {stderr:?}");
    assert!(lines[0].starts_with("tern: error: "), "{args:?}: {stderr}");
    assert!(
        lines[0].contains(expect),
        "{args:?}: {stderr} lacks {expect:?}"
    );
}

#[test]
fn missing_kernel_file() {
    fails_clearly(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "cannot open the kernel /nonexistent/vmlinux",
    );
}

#[test]
fn garbage_kernel_file() {
    let d = tmpdir("garbage");
    let k = d.join("garbage.elf");
    std::fs::write(&k, b"\x7fELF but not really a kernel at all").unwrap();
    fails_clearly(
        &["run", "--kernel", k.to_str().unwrap()],
        "not a loadable ELF",
    );
    let empty = d.join("empty");
    std::fs::write(&empty, b"").unwrap();
    fails_clearly(
        &["run", "--kernel", empty.to_str().unwrap()],
        "not a loadable ELF",
    );
}

#[test]
fn memory_zero_too_small_or_too_large() {
    fails_clearly(&["run", "--memory", "0"], "--memory must be more than 0");
    fails_clearly(&["run", "--memory", "8M"], "memory must be at least 32 MiB");
    fails_clearly(&["run", "--memory", "64T"], "more than this host has");
    fails_clearly(&["run", "--memory", "lots"], "not a size");
}

#[test]
fn a_dirty_ring_of_a_size_kvm_does_not_take() {
    for size in ["1000", "512", "1048576"] {
        fails_clearly(
            &["run", "--dirty-ring-size", size],
            "dirty-ring-size must be a power of two from 1024 to",
        );
    }
}

#[test]
fn vcpus_zero_or_too_many() {
    fails_clearly(
        &["run", "--vcpus", "0"],
        "--vcpus must be between 1 and 32, not 0",
    );
    fails_clearly(
        &["run", "--vcpus", "1000"],
        "--vcpus must be between 1 and 32, not 1000",
    );
}

#[test]
fn unusable_kvm_device() {
    fails_clearly(
        &["run", "--kvm-device", "/nonexistent/kvm"],
        "cannot open /nonexistent/kvm",
    );
    let d = tmpdir("kvmdev");
    let f = d.join("not-kvm");
    std::fs::write(&f, b"").unwrap();
    fails_clearly(
        &["run", "--kvm-device", f.to_str().unwrap()],
        "is not a usable KVM device",
    );
}

#[test]
fn bad_serial_and_qmp_arguments() {
    fails_clearly(&["run", "--serial", "tcp:1.2.3.4:5"], "--serial");
    fails_clearly(&["run", "--qmp", "tcp:localhost:4444"], "--qmp");
}

#[test]
fn dev_kvm_that_the_user_cannot_open() {
    // As root /dev/kvm is always openable; drop to `nobody` (the binary is copied somewhere it
    // may execute) to see the real permission error.
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the suite runs as root here"
    );
    let d = tmpdir("nobody");
    let bin = d.join("tern");
    std::fs::copy(tern_bin(), &bin).unwrap();
    for p in [&*d, bin.as_path()] {
        let mut perm = std::fs::metadata(p).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(p, perm).unwrap();
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["run", "--memory", "64M"])
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        stderr.trim(),
        "tern: error: cannot open /dev/kvm: Permission denied (os error 13)"
    );
}
