//! Boot: load an ELF kernel, enter it through its PVH entry.
//!
//! The guest gets, as QEMU and Cloud Hypervisor give it, an `hvm_start_info` with the command line
//! and the e820 memory map; the BSP starts in 32-bit protected mode with paging off and `%ebx`
//! pointing at the start info. A kernel may also carry a "Tern" note (type 1) naming an AP entry
//! and the address of a u32 that receives the vCPU count: tern then starts each AP at that entry
//! in the same state, with `%esi` = its index (no INIT/SIPI, which kvm-pvm cannot emulate).

use std::io::Cursor;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{self, GuestRam};
use crate::{Error, Result};

/// Where the boot structures go (all below the EBDA, never touched by the loaded image).
pub const BOOT_GDT_ADDR: u64 = 0x500;
pub const START_INFO_ADDR: u64 = 0x6000;
pub const MEMMAP_ADDR: u64 = 0x7000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line.
pub const CMDLINE_MAX: usize = 4096;
/// Largest kernel image accepted.
pub const KERNEL_MAX: usize = 512 << 20;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const TERN_NOTE_SMP: u32 = 1;

/// What the vCPUs need to start.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// 32-bit PVH entry of the BSP.
    pub entry: u64,
    /// Entry of the APs, when the kernel names one.
    pub ap_entry: Option<u64>,
    /// Address of the start info (PVH, for `%ebx`) or of the zero page (Linux, for `%esi`).
    pub start_info: u64,
    /// Linux's 32-bit boot protocol (a bzImage), not PVH.
    pub linux: bool,
}

/// Where the PVH module list goes (the initrd's entry).
pub const MODLIST_ADDR: u64 = 0x6800;

/// Loads `image` (an ELF with a PVH entry, or a bzImage) and `initrd` into guest RAM and writes
/// the boot structures.
pub fn load(
    ram: &GuestRam,
    image: &[u8],
    cmdline: &str,
    vcpus: u32,
    initrd: Option<&[u8]>,
) -> Result<BootInfo> {
    if image.len() > KERNEL_MAX {
        return Err(Error::KernelLoad(format!(
            "image is {} bytes, more than the {} MiB limit",
            image.len(),
            KERNEL_MAX >> 20
        )));
    }
    let mem = ram.memory();
    if crate::boot_linux::is_bzimage(image) {
        return crate::boot_linux::load(ram, image, &cmdline_bytes(cmdline)?, initrd);
    }
    let result = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(memory::HIGH_RAM_START)),
    )
    .map_err(|e| Error::KernelLoad(format!("not a loadable ELF kernel: {e}")))?;
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => {
            return Err(Error::KernelLoad(
                "the ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)".into(),
            ))
        }
    };

    let mut ap_entry = None;
    if let Some((ap, ncpus_addr)) = tern_note(image) {
        mem.write_obj(vcpus, GuestAddress(ncpus_addr))
            .map_err(|e| Error::KernelLoad(format!("Tern note names a bad address: {e}")))?;
        ap_entry = Some(ap);
    }

    mem.write_slice(&cmdline_bytes(cmdline)?, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| Error::KernelLoad(format!("writing the command line: {e}")))?;
    let module = initrd
        .map(|i| crate::boot_linux::place_initrd(ram, u64::MAX, result.kernel_end, i))
        .transpose()?;

    let map: Vec<hvm_memmap_table_entry> = memory::e820(ram.regions())
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        nr_modules: u32::from(module.is_some()),
        modlist_paddr: if module.is_some() { MODLIST_ADDR } else { 0 },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&map, GuestAddress(MEMMAP_ADDR));
    if let Some((paddr, size)) = module {
        let m = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[m], GuestAddress(MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|e| Error::KernelLoad(format!("writing the PVH start info: {e}")))?;

    // A flat GDT for the entry state (code 0x08, data 0x10, TSS 0x18), as the PVH ABI implies.
    let gdt: [u64; 4] = [
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ];
    mem.write_obj(gdt, GuestAddress(BOOT_GDT_ADDR))
        .map_err(|e| Error::KernelLoad(format!("writing the boot GDT: {e}")))?;

    Ok(BootInfo {
        entry,
        ap_entry,
        start_info: START_INFO_ADDR,
        linux: false,
    })
}

/// The command line as the guest gets it: checked by linux-loader, NUL-terminated.
fn cmdline_bytes(cmdline: &str) -> Result<Vec<u8>> {
    let mut cl = Cmdline::new(CMDLINE_MAX)
        .map_err(|e| Error::InvalidConfig(format!("command line: {e}")))?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline)
            .map_err(|e| Error::InvalidConfig(format!("command line: {e}")))?;
    }
    let cstr = cl
        .as_cstring()
        .map_err(|e| Error::InvalidConfig(format!("command line: {e}")))?;
    Ok(cstr.into_bytes_with_nul())
}

fn le_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn le_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}
fn le_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

/// The "Tern" SMP note of an ELF64 image: (AP entry, address of the vCPU count).
/// Bounds are checked everywhere; a malformed image simply has no note.
pub fn tern_note(image: &[u8]) -> Option<(u64, u64)> {
    const PT_NOTE: u32 = 4;
    let phoff = usize::try_from(le_u64(image, 0x20)?).ok()?;
    let phentsize = usize::from(le_u16(image, 0x36)?);
    let phnum = usize::from(le_u16(image, 0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if le_u32(image, ph)? != PT_NOTE {
            continue;
        }
        let off = usize::try_from(le_u64(image, ph + 8)?).ok()?;
        let size = usize::try_from(le_u64(image, ph + 32)?).ok()?;
        let notes = image.get(off..off.checked_add(size)?)?;
        let mut pos = 0;
        while pos + 12 <= notes.len() {
            let namesz = le_u32(notes, pos)? as usize;
            let descsz = le_u32(notes, pos + 4)? as usize;
            let ty = le_u32(notes, pos + 8)?;
            let name_at = pos + 12;
            let desc_at = name_at.checked_add(namesz.next_multiple_of(4))?;
            let name = notes.get(name_at..name_at.checked_add(namesz)?)?;
            if name == b"Tern\0" && ty == TERN_NOTE_SMP && descsz >= 16 {
                return Some((le_u64(notes, desc_at)?, le_u64(notes, desc_at + 8)?));
            }
            pos = desc_at.checked_add(descsz.next_multiple_of(4))?;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_has_no_note_and_does_not_panic() {
        assert_eq!(tern_note(b""), None);
        assert_eq!(tern_note(&[0xff; 100]), None);
        let mut elf = vec![0u8; 64];
        elf[0x20] = 0xff; // phoff far away
        elf[0x38] = 3;
        assert_eq!(tern_note(&elf), None);
    }

    #[test]
    fn garbage_kernel_is_a_clear_error() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let err = load(&ram, b"this is not an ELF", "", 1, None).unwrap_err();
        assert!(err.to_string().contains("not a loadable ELF"), "{err}");
    }
}
