//! Builds the test guest: the ring-3 program and its ring-0 boot stub (`guest/`) are compiled by
//! the same rustc as a freestanding static library and linked at 1 MiB with binutils' `ld` into a
//! PVH ELF, which `src/lib.rs` embeds.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {what} ({cmd:?}): {e}; the guest needs rustc and binutils' ld")
    });
    assert!(status.success(), "{what} failed: {cmd:?}");
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let lib = out.join("libtern_guest_image.a");
    let elf = out.join("tern-guest.elf");
    for f in [
        "guest/main.rs",
        "guest/boot.rs",
        "guest/setup.rs",
        "guest/pages.rs",
        "guest/disk.rs",
        "guest/disk/mmio.rs",
        "guest/disk/work.rs",
        "guest/link.ld",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    run(
        Command::new(&rustc)
            .args(["--edition", "2021", "--crate-type", "staticlib"])
            .args(["--crate-name", "tern_guest_image"])
            .args(["--target", "x86_64-unknown-linux-gnu"])
            .args(["-C", "panic=abort", "-C", "opt-level=2", "-C", "lto=fat"])
            .args(["-C", "codegen-units=1", "-C", "relocation-model=static"])
            .args(["-C", "debuginfo=0", "-C", "force-frame-pointers=no"])
            .arg("-o")
            .arg(&lib)
            .arg("guest/main.rs")
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
        "rustc (guest)",
    );
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
