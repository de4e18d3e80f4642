//! The built-in test guest, as a PVH ELF image.
//!
//! The guest is built from `guest/` by `build.rs` (see its module docs for the knobs and the
//! lines it prints). QEMU and Cloud Hypervisor boot the very same image: write it out with
//! `tern guest write PATH`.

/// The guest ELF image.
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tern-guest.elf"));

#[cfg(test)]
mod tests {
    use super::GUEST_ELF;

    #[test]
    fn image_is_an_x86_64_elf_with_pvh_and_tern_notes() {
        assert_eq!(&GUEST_ELF[..4], b"\x7fELF");
        assert_eq!(GUEST_ELF[4], 2, "64-bit");
        let has = |needle: &[u8]| GUEST_ELF.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"Xen\0"), "PVH note");
        assert!(has(b"Tern\0"), "Tern AP note");
    }
}
