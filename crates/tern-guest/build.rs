//! Builds the test guest: the ring-3 program and its ring-0 boot stub (`guest/`, its own cargo
//! package, so that it can use smoltcp) are compiled as a freestanding static library for the
//! host's target and linked at 1 MiB with binutils' `ld` into a PVH ELF, which `src/lib.rs`
//! embeds.
//!
//! The guest has its own target directory beside the workspace's (`target/tern-guest-image`):
//! every profile of the VMM (clippy's, the tests', the benchmarks') embeds the same optimised
//! guest, built once.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {what} ({cmd:?}): {e}; the guest needs cargo and binutils' ld")
    });
    assert!(status.success(), "{what} failed: {cmd:?}");
}

/// `<target>/tern-guest-image` from OUT_DIR (`<target>[/<triple>]/<profile>/build/<pkg>/out`),
/// or a directory in OUT_DIR when it does not look like that.
fn guest_target_dir(out: &Path) -> PathBuf {
    match out.ancestors().nth(4) {
        Some(t) if out.ancestors().nth(2).is_some_and(|b| b.ends_with("build")) => {
            t.join("tern-guest-image")
        }
        _ => out.join("tern-guest-image"),
    }
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let elf = out.join("tern-guest.elf");
    let target_dir = guest_target_dir(&out);
    let triple = "x86_64-unknown-linux-gnu";
    println!("cargo:rerun-if-changed=guest");
    // Freestanding, at a fixed address, no frame pointers: the flags no profile can set.
    let flags = ["-Crelocation-model=static", "-Cforce-frame-pointers=no"].join("\x1f");
    run(
        Command::new(&cargo)
            .args(["build", "--release", "--locked", "--quiet"])
            .args(["--manifest-path", "guest/Cargo.toml", "--target", triple])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("CARGO_ENCODED_RUSTFLAGS", flags)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("RUSTC_WORKSPACE_WRAPPER"),
        "cargo build (guest)",
    );
    let lib = target_dir
        .join(triple)
        .join("release")
        .join("libtern_guest_image.a");
    run(
        Command::new("ld")
            .args(["-m", "elf_x86_64", "-static", "-nostdlib", "--gc-sections"])
            .args(["-u", "_start", "-u", "tern_ap_entry", "-T", "guest/link.ld"])
            .arg("-o")
            .arg(&elf)
            .arg(&lib),
        "ld (guest)",
    );
}
