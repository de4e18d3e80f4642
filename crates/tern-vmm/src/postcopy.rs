//! The target's guest RAM under postcopy: pages dropped at DISCARD, MISSING faults through a
//! userfaultfd ([`crate::uffd`]), pages placed whole.

use std::sync::Arc;
use std::time::Duration;

use tern_migrate::{MigrateError, PageFault, PostcopyRam, Result};

use crate::memory::MemoryBackend;
use crate::uffd::{Placed, Userfault};
use crate::vm::Vm;

const PAGE: u64 = 4096;

/// Postcopy on a [`Vm`]: its RAM regions and the userfaultfd that serves them.
pub(crate) struct VmPostcopy {
    vm: Arc<Vm>,
    uf: Userfault,
    /// (host address, size) per region.
    regions: Vec<(u64, u64)>,
}

impl VmPostcopy {
    /// Checks that the VM's RAM can fault in page by page and opens the userfaultfd.
    pub(crate) fn new(vm: Arc<Vm>) -> Result<Self> {
        let backend = vm.ram().backend();
        if backend == MemoryBackend::MemfdHugetlb {
            return Err(MigrateError::Vm(
                "postcopy cannot place reserved huge pages page by page (memory-backend \
                 memfd-hugetlb on the target): use anon or memfd"
                    .into(),
            ));
        }
        let uf = Userfault::open(backend != MemoryBackend::Anon)
            .map_err(|e| MigrateError::Vm(format!("postcopy needs userfaultfd here: {e}")))?;
        let regions = vm
            .ram()
            .regions()
            .iter()
            .zip(vm.ram().host_addrs())
            .map(|(r, h)| (h, r.size))
            .collect();
        Ok(VmPostcopy { vm, uf, regions })
    }

    fn at(&self, region: u32, first_page: u64, bytes: u64) -> Result<u64> {
        let (host, size) = *self
            .regions
            .get(region as usize)
            .ok_or_else(|| MigrateError::Vm(format!("no RAM region {region}")))?;
        let end = first_page
            .checked_mul(PAGE)
            .and_then(|s| s.checked_add(bytes))
            .ok_or_else(|| MigrateError::Vm("page range overflows".into()))?;
        if end > size {
            return Err(MigrateError::Vm(format!(
                "pages past the end of region {region}"
            )));
        }
        Ok(host + first_page * PAGE)
    }
}

fn err(e: std::io::Error) -> MigrateError {
    MigrateError::Vm(format!("postcopy: {e}"))
}

impl PostcopyRam for VmPostcopy {
    fn discard(&self, region: u32, first_page: u64, count: u64) -> Result<()> {
        self.at(region, first_page, count.saturating_mul(PAGE))?;
        if !self.vm.ram().discard(region as usize, first_page, count) {
            return Err(MigrateError::Vm(format!(
                "cannot drop {count} pages at page {first_page} of region {region}"
            )));
        }
        Ok(())
    }

    fn discard_ranges(&self, region: u32, ranges: &[(u64, u64)]) -> Result<()> {
        for &(first, count) in ranges {
            self.at(region, first, count.saturating_mul(PAGE))?;
        }
        if !self.vm.ram().discard_ranges(region as usize, ranges) {
            return Err(MigrateError::Vm(format!(
                "cannot drop {} ranges of pages of region {region}",
                ranges.len()
            )));
        }
        Ok(())
    }

    fn listen(&self) -> Result<()> {
        for &(host, size) in &self.regions {
            self.uf.register(host, size).map_err(err)?;
        }
        Ok(())
    }

    /// Anonymous RAM asks for transparent huge pages (memory.rs). A MISSING fault in a 2 MiB
    /// range with nothing mapped yet then makes the kernel allocate *and zero* a huge page
    /// before it looks at the userfaultfd, free it, and only then report the fault: 2 MiB
    /// cleared on the vCPU for every fresh 2 MiB range, which is nearly all of them when
    /// postcopy starts before any page was sent. Measured from the start (bench/postcopy.py
    /// --switch start, perf): clear_page was 6% of the target vCPU's samples, ~30 ms of its
    /// time in the first 300 ms; none with this. So huge pages are off while faults are
    /// handed over, and back on at [`Self::finish`] (khugepaged may collapse the 4 KiB pages
    /// later). Not for the VM's whole life: with huge pages off on the target, the DISCARDs
    /// after precopy's rounds dropped a range slower (3.9 against 2.8 µs with one madvise per
    /// range; bench/results-postcopy-2026-12-06.txt); the advice changes no page already
    /// mapped. Also for on-demand restore, where every page starts missing. The advice itself
    /// takes ~0.2 ms for 1 GiB. Advice only: a refusal changes speed, not behaviour.
    fn before_faults(&self) {
        self.vm.ram().advise_anon(libc::MADV_NOHUGEPAGE);
    }

    fn place(&self, region: u32, first_page: u64, data: &[u8]) -> Result<bool> {
        let dst = self.at(region, first_page, data.len() as u64)?;
        Ok(self.uf.copy(dst, data).map_err(err)? == Placed::Done)
    }

    fn place_zero(&self, region: u32, first_page: u64, count: u64) -> Result<bool> {
        let len = count.saturating_mul(PAGE);
        let dst = self.at(region, first_page, len)?;
        Ok(self.uf.zero(dst, len).map_err(err)? == Placed::Done)
    }

    fn faults(&self, timeout: Duration) -> Result<Vec<PageFault>> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let faults = self.uf.faults(ms).map_err(err)?;
        Ok(faults
            .into_iter()
            .filter_map(|f| {
                self.regions
                    .iter()
                    .position(|&(h, s)| f.addr >= h && f.addr < h + s)
                    .map(|i| PageFault {
                        region: i as u32,
                        page: (f.addr - self.regions[i].0) / PAGE,
                        tid: f.tid,
                    })
            })
            .collect())
    }

    fn interrupt(&self) {
        self.uf.interrupt();
    }

    fn finish(&self) -> Result<()> {
        let unregistered = self
            .regions
            .iter()
            .try_for_each(|&(host, size)| self.uf.unregister(host, size));
        // Huge pages back on whatever happened: their advice only changes speed.
        self.vm.ram().advise_anon(libc::MADV_HUGEPAGE);
        unregistered.map_err(err)
    }

    fn vcpu_of(&self, tid: u32) -> Option<usize> {
        // vCPU threads are named vcpuN (vm.rs).
        let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
        comm.trim().strip_prefix("vcpu")?.parse().ok()
    }

    fn vcpus(&self) -> usize {
        self.vm.vcpus() as usize
    }
}
