//! Booting Linux from a bzImage, through the 32-bit boot protocol (Documentation/arch/x86/boot.rst):
//! the protected-mode kernel loaded at 1 MiB by linux-loader, a `boot_params` ("zero page") with
//! the setup header, the command line, the initrd and the e820 map, and the boot CPU entering
//! `code32_start` in flat 32-bit protected mode with paging off, `%esi` pointing at the zero page,
//! `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18.
//!
//! This host (kvm-pvm) cannot run a stock kernel; what is tested here is the loading: what a
//! kernel would find in guest memory.

use std::io::Cursor;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{BootInfo, CMDLINE_ADDR, CMDLINE_MAX};
use crate::memory::{self, GuestRam};
use crate::{Error, Result};

/// Where the zero page goes.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Largest initrd accepted.
pub const INITRD_MAX: usize = 1 << 30;
/// The boot protocol's `type_of_loader` for a loader without an assigned ID.
const LOADER_UNDEFINED: u8 = 0xff;
/// `initrd_addr_max` of kernels before boot protocol 2.03.
const INITRD_ADDR_MAX_OLD: u64 = 0x37ff_ffff;
/// E820 entries the zero page holds.
const E820_MAX: usize = 128;

/// Whether `image` is a bzImage (the `HdrS` magic of the setup header).
pub fn is_bzimage(image: &[u8]) -> bool {
    image.get(0x202..0x206) == Some(b"HdrS")
}

/// Loads a bzImage, the command line (`cmdline`, already with the devices) and an initrd.
pub fn load(
    ram: &GuestRam,
    image: &[u8],
    cmdline: &[u8],
    initrd: Option<&[u8]>,
) -> Result<BootInfo> {
    let mem = ram.memory();
    let loaded = BzImage::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(memory::HIGH_RAM_START)),
    )
    .map_err(|e| Error::KernelLoad(format!("not a loadable bzImage: {e}")))?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| Error::KernelLoad("the bzImage has no setup header".into()))?;
    if cmdline.len() > CMDLINE_MAX {
        return Err(Error::InvalidConfig(format!(
            "the command line is {} bytes, more than {CMDLINE_MAX}",
            cmdline.len()
        )));
    }
    let (version, cmdline_size) = (hdr.version, hdr.cmdline_size);
    // `cmdline` ends with its NUL; `cmdline_size` counts without it.
    let text = cmdline.len().saturating_sub(1);
    if version >= 0x0206 && cmdline_size > 0 && text > cmdline_size as usize {
        return Err(Error::InvalidConfig(format!(
            "the command line is {text} bytes, this kernel takes {cmdline_size}"
        )));
    }
    mem.write_slice(cmdline, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| Error::KernelLoad(format!("writing the command line: {e}")))?;
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;

    let e820 = memory::e820(ram.regions());
    if let Some(initrd) = initrd {
        let addr_max = hdr.initrd_addr_max;
        let max = if version >= 0x0203 && addr_max != 0 {
            u64::from(addr_max)
        } else {
            INITRD_ADDR_MAX_OLD
        };
        // Above what the kernel occupies once decompressed (`init_size`, boot protocol 2.10),
        // not only above the compressed image.
        let init_size = if version >= 0x020a {
            u64::from(hdr.init_size)
        } else {
            0
        };
        let end = loaded.kernel_end.max(loaded.kernel_load.0 + init_size);
        let (at, size) = place_initrd(ram, max, end, initrd)?;
        hdr.ramdisk_image = at as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    if e820.len() > E820_MAX {
        return Err(Error::KernelLoad(format!(
            "{} e820 entries, the zero page holds {E820_MAX}",
            e820.len()
        )));
    }
    for (i, (addr, size, ty)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *ty,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| Error::KernelLoad(format!("writing the zero page: {e}")))?;

    // __BOOT_CS 0x10 and __BOOT_DS 0x18, as the 32-bit boot protocol asks; a TSS at 0x20.
    let gdt: [u64; 5] = [
        0,
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ];
    mem.write_obj(gdt, GuestAddress(crate::boot::BOOT_GDT_ADDR))
        .map_err(|e| Error::KernelLoad(format!("writing the boot GDT: {e}")))?;
    Ok(BootInfo {
        entry: loaded.kernel_load.0,
        ap_entry: None,
        start_info: ZERO_PAGE_ADDR,
        linux: true,
    })
}

/// Puts the initrd as high as the kernel allows (at or below `max`, below the 32-bit hole),
/// page-aligned, above the kernel. Returns (address, size).
pub(crate) fn place_initrd(
    ram: &GuestRam,
    max: u64,
    kernel_end: u64,
    initrd: &[u8],
) -> Result<(u64, u64)> {
    if initrd.len() > INITRD_MAX {
        return Err(Error::InvalidConfig(format!(
            "the initrd is {} bytes, more than the {} MiB limit",
            initrd.len(),
            INITRD_MAX >> 20
        )));
    }
    let low_end = ram
        .regions()
        .iter()
        .find(|r| r.start <= memory::HIGH_RAM_START)
        .map_or(0, |r| r.start + r.size)
        .min(memory::MMIO_HOLE_START);
    let top = low_end.min(max.saturating_add(1));
    let size = initrd.len() as u64;
    let at = top.saturating_sub(size) & !0xfff;
    if size == 0 || at < kernel_end.next_multiple_of(4096) || at + size > top {
        return Err(Error::InvalidConfig(format!(
            "the initrd ({size} bytes) does not fit between the kernel's end ({kernel_end:#x}) \
             and {top:#x}: give the guest more memory"
        )));
    }
    ram.memory()
        .write_slice(initrd, GuestAddress(at))
        .map_err(|e| Error::KernelLoad(format!("writing the initrd: {e}")))?;
    Ok((at, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// A bzImage as far as a loader can tell: the setup header of boot protocol 2.15 and a
    /// protected-mode part of `payload`.
    pub(crate) fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        img[0x260..0x264].copy_from_slice(&(16u32 << 20).to_le_bytes()); // init_size
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn a_bzimage_its_command_line_initrd_and_e820_are_where_the_zero_page_says() {
        let ram = GuestRam::new(256 << 20).unwrap();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let initrd: Vec<u8> = (0..300_000u32).map(|i| (i * 13 + 1) as u8).collect();
        let img = fake_bzimage(&payload);
        assert!(is_bzimage(&img));
        let cmd = b"console=ttyS0 virtio_mmio.device=512@0xfeb00000:5\0";
        let b = load(&ram, &img, cmd, Some(&initrd)).unwrap();
        assert!(b.linux && b.entry == 0x10_0000 && b.start_info == ZERO_PAGE_ADDR);
        let mem = ram.memory();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        // The kernel at code32_start.
        let mut k = vec![0u8; payload.len()];
        mem.read_slice(&mut k, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(k, payload);
        // The command line.
        let hdr = p.hdr;
        assert_eq!({ hdr.type_of_loader }, 0xff);
        let mut c = vec![0u8; cmd.len()];
        mem.read_slice(&mut c, GuestAddress(u64::from(hdr.cmd_line_ptr)))
            .unwrap();
        assert_eq!(&c[..], &cmd[..]);
        // The initrd: page-aligned, below the hole and initrd_addr_max, above the kernel.
        let (at, size) = (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size));
        assert_eq!(size, initrd.len() as u64);
        assert!(at % 4096 == 0 && at >= 0x10_0000 + (16 << 20) && at + size <= 256 << 20);
        let mut r = vec![0u8; initrd.len()];
        mem.read_slice(&mut r, GuestAddress(at)).unwrap();
        assert_eq!(r, initrd);
        // The e820 map: RAM as tern lays it out.
        let want = memory::e820(ram.regions());
        assert_eq!(p.e820_entries as usize, want.len());
        for (i, (a, s, t)) in want.into_iter().enumerate() {
            let e = p.e820_table[i];
            assert_eq!(({ e.addr }, { e.size }, { e.r#type }), (a, s, t));
        }
    }

    #[test]
    fn bad_images_and_initrds_are_named() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let e = load(&ram, b"HdrS but nothing else", b"\0", None).unwrap_err();
        assert!(e.to_string().contains("not a loadable bzImage"), "{e}");
        let img = fake_bzimage(&[1; 4096]);
        let huge = vec![1u8; 80 << 20];
        let e = load(&ram, &img, b"\0", Some(&huge)).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        let mut long = vec![b'a'; 2049];
        long.push(0);
        let e = load(&ram, &img, &long, None).unwrap_err();
        assert!(e.to_string().contains("this kernel takes 2048"), "{e}");
        // Exactly the kernel's limit, and its NUL: taken.
        long.truncate(2048);
        long.push(0);
        load(&ram, &img, &long, None).unwrap();
    }
}
