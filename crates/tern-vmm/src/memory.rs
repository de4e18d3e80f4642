//! Guest RAM: one memfd, mapped shared, split around the 32-bit PCI hole.
//!
//! The memfd lets a local destination share the memory and lets postcopy register it with
//! userfaultfd later. vm-memory's atomic bitmap records the writes the VMM itself makes, so that
//! they can be ORed with KVM's dirty log.

use std::fs::File;
use std::os::fd::FromRawFd;

pub use vm_memory;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{Error, Result};

/// Guest memory with the VMM-side dirty bitmap.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Start of the 32-bit MMIO hole (PCI, LAPIC, IOAPIC live above it).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the hole: RAM resumes here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The legacy VGA/BIOS area, not RAM.
pub const EBDA_START: u64 = 0x9_fc00;
/// RAM above the legacy area starts here.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Smallest guest the built-in layout supports.
pub const MIN_MEMORY: u64 = 32 << 20;

/// E820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// A contiguous piece of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of this region in the memfd.
    pub file_offset: u64,
}

/// The RAM layout for `size` bytes: below the hole, and the rest from 4 GiB up.
pub fn layout(size: u64) -> Vec<RamRegion> {
    let low = size.min(MMIO_HOLE_START);
    let mut regions = vec![RamRegion {
        start: 0,
        size: low,
        file_offset: 0,
    }];
    if size > low {
        regions.push(RamRegion {
            start: MMIO_HOLE_END,
            size: size - low,
            file_offset: low,
        });
    }
    regions
}

/// The e820 map the guest sees for these regions: (address, size, type).
pub fn e820(regions: &[RamRegion]) -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    for r in regions {
        if r.start == 0 {
            map.push((0, EBDA_START, E820_RAM));
            map.push((EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED));
            if r.size > HIGH_RAM_START {
                map.push((HIGH_RAM_START, r.size - HIGH_RAM_START, E820_RAM));
            }
        } else {
            map.push((r.start, r.size, E820_RAM));
        }
    }
    map
}

/// Guest RAM: the memfd and its mapping.
pub struct GuestRam {
    memfd: File,
    regions: Vec<RamRegion>,
    mem: GuestMemory,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM in a fresh memfd.
    pub fn new(size: u64) -> Result<Self> {
        if size < MIN_MEMORY {
            return Err(Error::InvalidConfig(format!(
                "memory must be at least {} MiB",
                MIN_MEMORY >> 20
            )));
        }
        // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"tern-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Memory(format!(
                "memfd_create: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd
            .set_len(size)
            .map_err(|e| Error::Memory(format!("sizing the memfd to {size} bytes: {e}")))?;
        let regions = layout(size);
        let ranges: Vec<_> = regions
            .iter()
            .map(|r| {
                Ok((
                    GuestAddress(r.start),
                    usize::try_from(r.size)
                        .map_err(|_| Error::Memory("region too large".into()))?,
                    Some(FileOffset::new(
                        memfd
                            .try_clone()
                            .map_err(|e| Error::Memory(format!("dup memfd: {e}")))?,
                        r.file_offset,
                    )),
                ))
            })
            .collect::<Result<_>>()?;
        let mem = GuestMemory::from_ranges_with_files(ranges)
            .map_err(|e| Error::Memory(format!("mapping guest RAM: {e}")))?;
        Ok(GuestRam {
            memfd,
            regions,
            mem,
        })
    }

    /// The vm-memory view.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The RAM regions, in guest-physical order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The memfd that backs all regions.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Host address of each region (same order as [`Self::regions`]).
    pub fn host_addrs(&self) -> Vec<u64> {
        self.mem
            .iter()
            .map(|r| {
                r.get_host_address(vm_memory::MemoryRegionAddress(0))
                    .map(|p| p as u64)
                    .unwrap_or(0)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        let l = layout(1 << 30);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].size, 1 << 30);
    }

    #[test]
    fn large_guest_splits_around_the_hole() {
        let l = layout(6 << 30);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].start + l[0].size, MMIO_HOLE_START);
        assert_eq!(l[1].start, MMIO_HOLE_END);
        assert_eq!(l[0].size + l[1].size, 6 << 30);
        assert_eq!(l[1].file_offset, l[0].size);
    }

    #[test]
    fn e820_skips_legacy_area_and_hole() {
        let map = e820(&layout(5 << 30));
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(
            map[2],
            (HIGH_RAM_START, MMIO_HOLE_START - HIGH_RAM_START, E820_RAM)
        );
        assert_eq!(
            map[3],
            (MMIO_HOLE_END, (5 << 30) - MMIO_HOLE_START, E820_RAM)
        );
    }

    #[test]
    fn guest_ram_is_memfd_backed_and_shared() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(64 << 20).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(ram.memfd(), &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }
}
