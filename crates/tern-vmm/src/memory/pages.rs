//! Page-level views and changes of guest RAM: which pages hold data, and giving pages back so
//! that they read as zero (a postcopy DISCARD, a restore of zero pages).

use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd};

use super::{GuestRam, MemoryBackend, RamRegion, HUGE_PAGE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

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
    use vm_memory::GuestAddress;

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
}
