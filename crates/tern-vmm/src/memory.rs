//! Guest RAM, split around the 32-bit PCI hole, in one of three backings ([`MemoryBackend`]):
//! anonymous memory with transparent huge pages (the default: the cheapest first touch on this
//! kind of host, `bench/first-touch.py`), a memfd (shareable: what a local hand-over needs), or
//! a memfd of reserved huge pages.
//!
//! A bitmap ([`crate::DirtyBitmap`]) records the writes the VMM itself makes, so that they can
//! be ORed with KVM's dirty log.

use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd};
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

/// Page size of the ranges below.
const PAGE: u64 = 4096;

impl GuestRam {
    /// Region `index` and the host address of its mapping.
    fn region_at(&self, index: usize) -> Option<(RamRegion, u64)> {
        let r = *self.regions.get(index)?;
        let host = self
            .mem
            .iter()
            .nth(index)?
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .ok()? as u64;
        Some((r, host))
    }

    /// The pages of region `index` that may hold data (ranges of page indices): all others read
    /// as zero. A page the guest only ever read may be included; a page with data never is
    /// left out (if the backing cannot tell, everything is returned).
    pub fn populated(&self, index: usize) -> Vec<Range<u64>> {
        let Some((r, host)) = self.region_at(index) else {
            return Vec::new();
        };
        let all = std::iter::once(0..r.size / PAGE).collect();
        match &self.memfd {
            Some(f) => memfd_data(f, &r).unwrap_or(all),
            None => pagemap_present(host, r.size / PAGE).unwrap_or(all),
        }
    }

    /// Makes `count` pages of region `index` from `first_page` read as zero by giving their
    /// memory back (the next touch allocates afresh). False if the backing refused: then the
    /// caller writes zeros. Only while the guest does not run.
    pub fn discard(&self, index: usize, first_page: u64, count: u64) -> bool {
        let Some((r, host)) = self.region_at(index) else {
            return false;
        };
        let (Some(at), Some(len)) = (first_page.checked_mul(PAGE), count.checked_mul(PAGE)) else {
            return false;
        };
        if at.checked_add(len).is_none_or(|end| end > r.size) {
            return false;
        }
        // A hole punched in huge pages frees whole ones only: a range that does not cover them
        // exactly is written with zeros instead.
        if self.backend == MemoryBackend::MemfdHugetlb
            && (!at.is_multiple_of(HUGE_PAGE) || !len.is_multiple_of(HUGE_PAGE))
        {
            return false;
        }
        let rc = match &self.memfd {
            // SAFETY: fallocate on our own memfd, within the region's range of the file.
            Some(f) => unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (r.file_offset + at) as i64,
                    len as i64,
                )
            },
            // SAFETY: inside the region's private anonymous mapping (checked): after
            // MADV_DONTNEED its pages read as zero, which is what the caller asks for.
            None => unsafe {
                libc::madvise(
                    (host + at) as *mut libc::c_void,
                    len as usize,
                    libc::MADV_DONTNEED,
                )
            },
        };
        rc == 0
    }

    /// [`Self::discard`] for many ranges of region `index` (first page, count) at once: on
    /// anonymous memory one process_madvise(2) per 1024 ranges, which also batches the TLB
    /// flushes (a postcopy switch drops thousands of scattered pages while the guest is paused:
    /// one madvise each cost ~3 µs here). False if any range could not be dropped.
    pub fn discard_ranges(&self, index: usize, ranges: &[(u64, u64)]) -> bool {
        let Some((r, host)) = self.region_at(index) else {
            return false;
        };
        let in_region = |&(first, count): &(u64, u64)| {
            first
                .checked_add(count)
                .and_then(|e| e.checked_mul(PAGE))
                .is_some_and(|end| end <= r.size)
        };
        if self.memfd.is_some() || !ranges.iter().all(in_region) {
            return ranges.iter().all(|&(f, c)| self.discard(index, f, c));
        }
        let Some(pidfd) = self_pidfd() else {
            return ranges.iter().all(|&(f, c)| self.discard(index, f, c));
        };
        // Two threads share a long list (the other side waits meanwhile: it is downtime).
        if ranges.len() >= 4096 {
            let (a, b) = ranges.split_at(ranges.len() / 2);
            return std::thread::scope(|s| {
                let other = s.spawn(|| self.madvise_ranges(&pidfd, host, index, b));
                let mine = self.madvise_ranges(&pidfd, host, index, a);
                other.join().unwrap_or(false) && mine
            });
        }
        self.madvise_ranges(&pidfd, host, index, ranges)
    }

    fn madvise_ranges(
        &self,
        pidfd: &std::os::fd::OwnedFd,
        host: u64,
        index: usize,
        ranges: &[(u64, u64)],
    ) -> bool {
        for chunk in ranges.chunks(1024) {
            let iov: Vec<libc::iovec> = chunk
                .iter()
                .map(|&(first, count)| libc::iovec {
                    iov_base: (host + first * PAGE) as *mut libc::c_void,
                    iov_len: (count * PAGE) as usize,
                })
                .collect();
            let want: usize = iov.iter().map(|v| v.iov_len).sum();
            // SAFETY: every range lies inside this region's private anonymous mapping
            // (checked above); after MADV_DONTNEED its pages read as zero or fault, which is
            // what the caller asks for. The kernel only reads the iovec array we own.
            let done = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    pidfd.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len(),
                    libc::MADV_DONTNEED,
                    0u32,
                )
            };
            if done < 0 || done as usize != want {
                // An older kernel without MADV_DONTNEED here, or a partial run: the rest one
                // by one (dropping a page twice is harmless).
                if !chunk.iter().all(|&(f, c)| self.discard(index, f, c)) {
                    return false;
                }
            }
        }
        true
    }
}

/// A pidfd of this process, for process_madvise(2).
fn self_pidfd() -> Option<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open(2) of our own pid takes no pointers; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    // SAFETY: a new descriptor owned by nothing else.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The ranges of a memfd region that hold data (SEEK_DATA/SEEK_HOLE), or None if the file
/// system cannot say.
fn memfd_data(f: &File, r: &RamRegion) -> Option<Vec<Range<u64>>> {
    let fd = f.as_raw_fd();
    let (start, end) = (r.file_offset as i64, (r.file_offset + r.size) as i64);
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on our own memfd; the results are checked.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `pos`
            }
            return None;
        }
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        out.push(((data - start) as u64 / PAGE)..((hole - start) as u64).div_ceil(PAGE));
        pos = hole;
    }
    Some(out)
}

/// The pages of an anonymous mapping that are present or swapped out (/proc/self/pagemap,
/// bits 63 and 62): an untouched page is neither and reads as zero. Swapped pages count, or
/// their data would be lost. None if pagemap cannot be read.
fn pagemap_present(host: u64, pages: u64) -> Option<Vec<Range<u64>>> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 32768;
    let f = File::open("/proc/self/pagemap").ok()?;
    let mut buf = vec![0u8; (CHUNK * 8) as usize];
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut p = 0;
    while p < pages {
        let n = CHUNK.min(pages - p);
        let bytes = &mut buf[..(n * 8) as usize];
        f.read_exact_at(bytes, (host / PAGE + p) * 8).ok()?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            if e & (3 << 62) != 0 {
                let page = p + i as u64;
                match out.last_mut() {
                    Some(last) if last.end == page => last.end = page + 1,
                    _ => out.push(page..page + 1),
                }
            }
        }
        p += n;
    }
    Some(out)
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

    /// Each backing says which pages hold data, and gives discarded pages back as zeros.
    #[test]
    fn populated_and_discard_follow_the_writes() {
        use vm_memory::Bytes;
        for backend in [MemoryBackend::Anon, MemoryBackend::Memfd] {
            let ram = GuestRam::with_backend(64 << 20, backend).unwrap();
            assert!(ram.memfd().is_some() == (backend == MemoryBackend::Memfd));
            assert!(
                ram.populated(0).is_empty(),
                "{backend:?}: fresh RAM holds nothing"
            );
            for page in [3u64, 4, 100, 16383] {
                ram.memory()
                    .write_obj(page as u32 | 1, GuestAddress(page * PAGE))
                    .unwrap();
            }
            let got: Vec<u64> = ram.populated(0).into_iter().flatten().collect();
            for page in [3u64, 4, 100, 16383] {
                assert!(
                    got.contains(&page),
                    "{backend:?}: page {page} missing in {got:?}"
                );
            }
            // THP may populate a whole 2 MiB around a write, never more than that per write.
            assert!(got.len() <= 4 * 512, "{backend:?}: {} pages", got.len());
            assert!(ram.discard(0, 96, 16));
            assert_eq!(
                ram.memory()
                    .read_obj::<u32>(GuestAddress(100 * PAGE))
                    .unwrap(),
                0
            );
            assert_eq!(
                ram.memory()
                    .read_obj::<u32>(GuestAddress(3 * PAGE))
                    .unwrap(),
                3 | 1
            );
            assert!(!ram.discard(0, 16383, 2), "{backend:?}: past the end");
        }
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
