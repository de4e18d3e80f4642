//! Guest RAM, split around the 32-bit PCI hole, in one of three backings ([`MemoryBackend`]):
//! anonymous memory with transparent huge pages (the default: the cheapest first touch on this
//! kind of host, `bench/first-touch.py`), a memfd (shareable: what a local hand-over needs), or
//! a memfd of reserved huge pages.
//!
//! A bitmap ([`crate::DirtyBitmap`]) records the writes the VMM itself makes, so that they can
//! be ORed with KVM's dirty log.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::str::FromStr;

pub use vm_memory;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{Error, Result};

/// Guest memory with the VMM-side dirty bitmap.
pub type GuestMemory = vm_memory::GuestMemoryMmap<crate::DirtyBitmap>;

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

/// What backs guest RAM (`tern run --memory-backend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryBackend {
    /// Private anonymous memory with transparent huge pages asked for (QEMU's
    /// `memory-backend-ram`): a first touch costs a fifth of a memfd's here.
    #[default]
    Anon,
    /// A memfd mapped shared (QEMU's `memory-backend-memfd`): another process can map it.
    Memfd,
    /// A memfd of 2 MiB huge pages from the host's reserved pool (`vm.nr_hugepages`).
    MemfdHugetlb,
}

impl MemoryBackend {
    /// The option's value for this backend.
    pub fn name(self) -> &'static str {
        match self {
            MemoryBackend::Anon => "anon",
            MemoryBackend::Memfd => "memfd",
            MemoryBackend::MemfdHugetlb => "memfd-hugetlb",
        }
    }
}

impl FromStr for MemoryBackend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "anon" | "ram" => Ok(MemoryBackend::Anon),
            "memfd" => Ok(MemoryBackend::Memfd),
            "memfd-hugetlb" | "hugetlb" => Ok(MemoryBackend::MemfdHugetlb),
            other => Err(format!(
                "unknown memory backend {other:?}: anon, memfd or memfd-hugetlb"
            )),
        }
    }
}

mod handover;
mod pages;

/// Size of the huge pages a `memfd-hugetlb` backend uses.
const HUGE_PAGE: u64 = 2 << 20;

/// Guest RAM: its backing and mapping.
pub struct GuestRam {
    backend: MemoryBackend,
    /// The memory was handed over by another process (`cpr-transfer`), or handed away and
    /// unmapped here (see `handover`).
    handover: std::sync::atomic::AtomicU8,
    /// Readers of guest memory outside the guest (pmemsave) hold it shared; a hand-over's
    /// release takes it whole, so that no read ever meets the unmapped range.
    access: std::sync::RwLock<()>,
    /// The memfd, for the memfd backends.
    memfd: Option<File>,
    regions: Vec<RamRegion>,
    mem: std::sync::Arc<GuestMemory>,
}

/// A fresh memfd of `size` bytes.
fn create_memfd(size: u64, hugetlb: bool) -> Result<File> {
    // 2 MiB pages whatever the host's default huge page size.
    let flags = libc::MFD_CLOEXEC
        | if hugetlb {
            libc::MFD_HUGETLB | libc::MFD_HUGE_2MB
        } else {
            0
        };
    // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"tern-guest-ram".as_ptr(), flags) };
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
    Ok(memfd)
}

/// 2 MiB huge pages in the host's pool that no mapping has reserved yet.
fn free_huge_pages() -> u64 {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{f}"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM in the default backing.
    pub fn new(size: u64) -> Result<Self> {
        Self::with_backend(size, MemoryBackend::default())
    }

    /// Creates `size` bytes of guest RAM backed as asked.
    pub fn with_backend(size: u64, backend: MemoryBackend) -> Result<Self> {
        if size < MIN_MEMORY {
            return Err(Error::InvalidConfig(format!(
                "memory must be at least {} MiB",
                MIN_MEMORY >> 20
            )));
        }
        let regions = layout(size);
        let memfd = match backend {
            MemoryBackend::Anon => None,
            MemoryBackend::Memfd => Some(create_memfd(size, false)?),
            MemoryBackend::MemfdHugetlb => {
                if !size.is_multiple_of(HUGE_PAGE) {
                    return Err(Error::InvalidConfig(format!(
                        "memory-backend memfd-hugetlb needs a multiple of 2 MiB, not {size} bytes"
                    )));
                }
                // The mapping does not reserve the pages (vm-memory maps with MAP_NORESERVE):
                // a pool too small would show up as a SIGBUS in the guest, so check it now.
                let (need, free) = (size / HUGE_PAGE, free_huge_pages());
                if free < need {
                    return Err(Error::Memory(format!(
                        "memory-backend memfd-hugetlb needs {need} free 2 MiB huge pages, the \
                         host has {free} unreserved (reserve them: sysctl vm.nr_hugepages)"
                    )));
                }
                Some(create_memfd(size, true)?)
            }
        };
        Self::map(regions, backend, memfd)
    }

    /// Maps `regions` of `memfd` (anonymous memory without one).
    fn map(regions: Vec<RamRegion>, backend: MemoryBackend, memfd: Option<File>) -> Result<Self> {
        let ranges: Vec<_> = regions
            .iter()
            .map(|r| {
                Ok((
                    GuestAddress(r.start),
                    usize::try_from(r.size)
                        .map_err(|_| Error::Memory("region too large".into()))?,
                    match &memfd {
                        Some(f) => Some(FileOffset::new(
                            f.try_clone()
                                .map_err(|e| Error::Memory(format!("dup memfd: {e}")))?,
                            r.file_offset,
                        )),
                        None => None,
                    },
                ))
            })
            .collect::<Result<_>>()?;
        let mem = GuestMemory::from_ranges_with_files(ranges)
            .map_err(|e| Error::Memory(format!("mapping guest RAM: {e}")))?;
        let ram = GuestRam {
            backend,
            handover: Default::default(),
            access: Default::default(),
            memfd,
            regions,
            mem: std::sync::Arc::new(mem),
        };
        // Huge pages where the host grants them (THP `madvise` mode is common), and no
        // copy-on-write sharing with a child we fork (an `exec:` migration) while KVM maps the
        // pages.
        for advice in [libc::MADV_HUGEPAGE, libc::MADV_DONTFORK] {
            ram.advise_anon(advice);
        }
        Ok(ram)
    }

    /// The backing.
    pub fn backend(&self) -> MemoryBackend {
        self.backend
    }

    /// The vm-memory view.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The vm-memory view, shared (devices keep one).
    pub fn shared_memory(&self) -> std::sync::Arc<GuestMemory> {
        self.mem.clone()
    }

    /// The RAM regions, in guest-physical order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The memfd that backs all regions, for the memfd backends.
    pub fn memfd(&self) -> Option<&File> {
        self.memfd.as_ref()
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Gives `advice` for every region of anonymous RAM (memfd backings get none): huge pages
    /// on or off, no fork. Advice only: a refusal changes speed, not behaviour.
    pub fn advise_anon(&self, advice: libc::c_int) {
        if self.backend != MemoryBackend::Anon {
            return;
        }
        for (host, r) in self.host_addrs().into_iter().zip(&self.regions) {
            // SAFETY: the region's own mapping, which lives as long as `self`; the advice
            // given here changes no contents.
            if unsafe { libc::madvise(host as *mut libc::c_void, r.size as usize, advice) } != 0 {
                tracing::debug!("madvise({advice}): {}", std::io::Error::last_os_error());
            }
        }
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
        let ram = GuestRam::with_backend(64 << 20, MemoryBackend::Memfd).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(ram.memfd().unwrap(), &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn backend_names_parse() {
        for b in [
            MemoryBackend::Anon,
            MemoryBackend::Memfd,
            MemoryBackend::MemfdHugetlb,
        ] {
            assert_eq!(b.name().parse::<MemoryBackend>(), Ok(b));
        }
        assert!("tmpfs"
            .parse::<MemoryBackend>()
            .unwrap_err()
            .contains("anon, memfd"));
    }
}
