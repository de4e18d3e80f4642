//! The engine's view of a KVM VM: guest RAM with KVM's dirty log ORed with the VMM's own bitmap,
//! pause and resume, and the machine state.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tern_migrate::{
    DirtyLogMode, GuestRam, LoadParticipant, MigrateError, PostcopyRam, RamLoader, RamSaver,
    RegionInfo, Result, SaveParticipant, SectionDesc, SourceVm, TargetRam, TargetVm,
};
use tern_wire::Section;
use vm_memory::GuestMemoryBackend;

use crate::memory::RamRegion;
use crate::vm::{set_memory_slots, Vm};

const PAGE: u64 = 4096;

fn region_name(r: &RamRegion) -> String {
    if r.start < crate::memory::MMIO_HOLE_END {
        "ram-below-4g".into()
    } else {
        "ram-above-4g".into()
    }
}

impl Vm {
    fn region(&self, id: u32) -> Result<(RamRegion, u64)> {
        let regions = self.ram.regions();
        let r = *regions
            .get(id as usize)
            .ok_or_else(|| MigrateError::Vm(format!("no RAM region {id}")))?;
        Ok((r, self.ram.host_addrs()[id as usize]))
    }

    fn check_range(&self, id: u32, first_page: u64, bytes: u64) -> Result<(RamRegion, u64)> {
        let (r, host) = self.region(id)?;
        let end = first_page
            .checked_mul(PAGE)
            .and_then(|s| s.checked_add(bytes))
            .ok_or_else(|| MigrateError::Vm("page range overflows".into()))?;
        if end > r.size {
            return Err(MigrateError::Vm(format!(
                "pages past the end of region {id}"
            )));
        }
        Ok((r, host))
    }

    /// Guest pages KVM itself writes on the guest's behalf (paravirtual clock and steal time,
    /// named by the vCPUs' MSRs). KVM rewrites them on the target, so a RAM comparison between
    /// source and target leaves them out.
    fn hypervisor_pages(&self) -> Vec<u64> {
        const PV_MSRS: [u32; 3] = [0x4b56_4d01, 0x12, 0x4b56_4d03];
        let mut pages = Vec::new();
        for fd in &self.vcpu_fds {
            let v = crate::vcpu::lock(fd);
            let entries: Vec<kvm_bindings::kvm_msr_entry> = PV_MSRS
                .iter()
                .map(|&index| kvm_bindings::kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let Ok(mut msrs) = kvm_bindings::Msrs::from_entries(&entries) else {
                continue;
            };
            let n = v.get_msrs(&mut msrs).unwrap_or(0);
            for m in &msrs.as_slice()[..n] {
                if m.data & 1 != 0 {
                    pages.push((m.data & !0xfff) / PAGE);
                }
            }
        }
        pages
    }

    /// Digest of all guest RAM, in region order, without the hypervisor's own pages (the VM
    /// must be paused or not started).
    pub fn ram_digest_now(&self) -> u64 {
        let skip = self.hypervisor_pages();
        let mut digest = tern_migrate::RamDigest::default();
        let zero_mib = vec![0u8; 1 << 20];
        for (id, (r, h)) in self
            .ram
            .regions()
            .iter()
            .zip(self.ram.host_addrs())
            .enumerate()
        {
            // Never-written memory is zero: digest it without faulting it in.
            let data = GuestRam::populated(self, id as u32);
            let has_data = |first: u64, pages: u64| {
                data.iter()
                    .any(|d| d.start < first + pages && first < d.end)
            };
            // SAFETY: each region is `size` bytes mapped for the VM's lifetime; the vCPUs are
            // parked or not started, and the VMM writes guest RAM only from its vCPU threads.
            let sl = unsafe { std::slice::from_raw_parts(h as *const u8, r.size as usize) };
            for (ci, c) in sl.chunks(1 << 20).enumerate() {
                if !has_data((ci as u64) << 8, (c.len() as u64) / PAGE) {
                    digest.update(&zero_mib[..c.len()]);
                    continue;
                }
                let first = (r.start + ((ci as u64) << 20)) / PAGE;
                let hits: Vec<u64> = skip
                    .iter()
                    .filter(|&&p| p >= first && p < first + 256)
                    .copied()
                    .collect();
                if hits.is_empty() {
                    digest.update(c);
                } else {
                    let mut copy = c.to_vec();
                    for p in hits {
                        let at = ((p - first) * PAGE) as usize;
                        let end = (at + PAGE as usize).min(copy.len());
                        copy[at..end].fill(0);
                    }
                    digest.update(&copy);
                }
            }
        }
        digest.finish()
    }
}

impl GuestRam for Vm {
    fn regions(&self) -> Vec<RegionInfo> {
        self.ram
            .regions()
            .iter()
            .enumerate()
            .map(|(i, r)| RegionInfo {
                id: i as u32,
                name: region_name(r),
                gpa: r.start,
                size: r.size,
            })
            .collect()
    }

    fn start_dirty_log(&self, mode: DirtyLogMode) -> Result<DirtyLogMode> {
        let rings = self.devices.dirty_rings.as_ref();
        let manual = rings.is_none()
            && mode == DirtyLogMode::Clear
            && match crate::dirty::set_manual_protect(&self.vm_fd, true) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "manual dirty-log protect unavailable ({e}): using KVM_GET_DIRTY_LOG alone"
                    );
                    false
                }
            };
        if !manual && rings.is_none() {
            crate::dirty::set_manual_protect(&self.vm_fd, false)
                .map_err(|e| MigrateError::Vm(format!("dirty-log mode: {e}")))?;
        }
        self.dirty_manual.store(manual, Ordering::SeqCst);
        if let Some(r) = rings {
            // Entries left from an earlier logging period name pages it already handled.
            r.harvest(None)
                .map_err(|e| MigrateError::Vm(format!("harvesting the dirty rings: {e}")))?;
            r.reset();
        }
        // Logging starts with every page write-protected (KVM_DIRTY_LOG_INITIALLY_SET is not
        // asked for), in every mode.
        set_memory_slots(
            &self.vm_fd,
            &self.ram,
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
        )
        .map_err(|e| MigrateError::Vm(format!("enabling the dirty log: {e:#}")))?;
        for region in self.ram.memory().iter() {
            std::ops::Deref::deref(region).bitmap().reset();
        }
        self.dirty_logging.store(true, Ordering::SeqCst);
        Ok(match (rings.is_some(), manual) {
            (true, _) => DirtyLogMode::Ring,
            (false, true) => DirtyLogMode::Clear,
            (false, false) => DirtyLogMode::Get,
        })
    }

    fn sync_dirty(&self, region: u32, bitmap: &mut [u64]) -> Result<u64> {
        let (r, _) = self.region(region)?;
        let words = (r.size / PAGE).div_ceil(64) as usize;
        if bitmap.len() < words {
            return Err(MigrateError::Vm(format!(
                "dirty bitmap of {} words for region {region} of {words}",
                bitmap.len()
            )));
        }
        let mut new = match self.devices.dirty_rings.as_ref() {
            Some(rings) => {
                // Harvests every ring for every region: the first region's sync finds them
                // all, the others find what was written since.
                rings
                    .harvest(None)
                    .map_err(|e| MigrateError::Vm(format!("harvesting the dirty rings: {e}")))?;
                rings.take_into(region as usize, bitmap)
            }
            None => self.dirty_buf.with(words, |kvm| {
                crate::dirty::get_log(&self.vm_fd, region, r.size / PAGE, kvm)
                    .map_err(|e| MigrateError::Vm(format!("KVM_GET_DIRTY_LOG: {e}")))?;
                let mut new = 0;
                for (b, k) in bitmap.iter_mut().zip(kvm.iter()) {
                    new += u64::from((*k & !*b).count_ones());
                    *b |= *k;
                }
                Ok::<_, MigrateError>(new)
            })?,
        };
        if let Some(m) = self.ram.memory().iter().nth(region as usize) {
            new += std::ops::Deref::deref(m).bitmap().take_into(bitmap);
        }
        Ok(new)
    }

    fn clear_dirty(&self, region: u32, first_page: u64, bits: &[u64]) -> Result<()> {
        if !self.dirty_manual.load(Ordering::SeqCst) {
            return Ok(());
        }
        let (r, _) = self.region(region)?;
        let pages = r.size / PAGE;
        let num = (bits.len() as u64 * 64).min(pages.saturating_sub(first_page));
        let num = u32::try_from(num)
            .map_err(|_| MigrateError::Vm("too many pages to clear at once".into()))?;
        crate::dirty::clear_log(&self.vm_fd, region, first_page, num, bits)
            .map_err(|e| MigrateError::Vm(format!("KVM_CLEAR_DIRTY_LOG: {e}")))
    }

    fn stop_dirty_log(&self) {
        if self.dirty_logging.swap(false, Ordering::SeqCst) {
            if let Err(e) = set_memory_slots(&self.vm_fd, &self.ram, 0) {
                tracing::warn!("disabling the dirty log: {e:#}");
            }
            // Harvested or not, the rings' entries must be handed back, or they fill up.
            if let Some(Err(e)) = self.devices.dirty_rings.as_ref().map(|r| r.harvest(None)) {
                tracing::warn!("emptying the dirty rings: {e}");
            }
        }
    }

    fn read_pages(&self, region: u32, first_page: u64, out: &mut [u8]) -> Result<()> {
        let (_, host) = self.check_range(region, first_page, out.len() as u64)?;
        // SAFETY: the range was checked to lie inside the region's mapping, which lives as long
        // as the VM. The guest may write it concurrently: a torn copy is harmless because the
        // dirty log then holds the page for the next round.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (host + first_page * PAGE) as *const u8,
                out.as_mut_ptr(),
                out.len(),
            );
        }
        Ok(())
    }

    fn populated(&self, region: u32) -> Vec<Range<u64>> {
        self.ram.populated(region as usize)
    }
}

impl Vm {
    /// Memory handed over by the source is the guest's as it runs there: no record of the stream
    /// may write it (the source could resume on it until the commit).
    fn not_handed_in(&self) -> Result<()> {
        if self.ram.handed_in() {
            return Err(MigrateError::Vm(
                "the guest's memory was handed over: the stream may not write it".into(),
            ));
        }
        Ok(())
    }
}

fn flush_checked(d: &crate::Disk) -> Result<()> {
    d.flush_checked().map_err(|e| MigrateError::Io {
        what: format!("flushing disk {}", d.config().path.display()),
        source: e,
    })
}

impl SourceVm for Vm {
    fn ram(&self) -> &dyn GuestRam {
        self
    }

    fn machine(&self) -> serde_json::Value {
        let cpuid = crate::cpuid::filter(&self.supported_cpuid, 0, self.vcpus(), self.tsc_khz);
        let mut m = crate::machine::MachineDescription::new(
            self.ram.size(),
            self.vcpus(),
            self.tsc_khz,
            cpuid.as_slice(),
        );
        let copy = self.copy_disks.load(Ordering::SeqCst);
        m.disks = self
            .disks
            .iter()
            .map(|d| {
                let mut desc = d.describe();
                desc.copied = copy && crate::migration_block::is_copied(d);
                desc
            })
            .collect();
        m.nets = self.net_macs.iter().map(crate::tap::format_mac).collect();
        serde_json::to_value(m).unwrap_or_default()
    }

    fn state_schemas(&self) -> Vec<SectionDesc> {
        self.devices.manager.schemas()
    }

    fn pause(&self) -> Result<()> {
        // Most of the disks' flush happens here, while the guest still runs; the pause then
        // flushes only what was written in the last moment, and `flush_storage` checks it.
        for d in &self.disks {
            flush_checked(d)?;
        }
        Vm::pause(self);
        Ok(())
    }

    /// A disk that cannot be made durable fails the migration before anything is committed
    /// (shared storage: the target would miss writes the guest saw complete).
    fn flush_storage(&self) -> Result<()> {
        for d in &self.disks {
            flush_checked(d)?;
        }
        Ok(())
    }

    fn resume(&self) -> Result<()> {
        Vm::resume(self);
        Ok(())
    }

    fn migrated_away(&self) {
        self.retire_devices();
        // Handed over: the target runs the guest on these very pages; we never touch them again.
        if self.ram.handing_out() {
            self.ram.release();
        }
    }

    fn handover_memory(&self, on: bool) -> Result<Option<std::os::fd::OwnedFd>> {
        self.ram
            .hand_out(on)
            .map(|f| f.map(std::os::fd::OwnedFd::from))
            .map_err(|e| MigrateError::Vm(format!("{e:#}")))
    }

    fn is_running(&self) -> bool {
        self.state() == crate::RunState::Running
    }

    fn set_throttle(&self, percent: u8) {
        Vm::set_throttle(self, percent);
    }

    fn save_state(&self) -> Result<Vec<Section>> {
        Ok(self.devices.manager.save(self)?)
    }

    fn ram_digest(&self) -> u64 {
        self.ram_digest_now()
    }

    fn state_size_hint(&self) -> u64 {
        u64::from(self.vcpus()) * (8 << 10) + (4 << 10)
    }

    fn save_participants(self: Arc<Self>) -> Vec<Box<dyn SaveParticipant>> {
        let mut parts: Vec<Box<dyn SaveParticipant>> = Vec::new();
        // Memory handed over (cpr-transfer) is the target's as it is: nothing of it is sent.
        if !self.ram.handing_out() {
            parts.push(Box::new(RamSaver::new(self.clone())));
        }
        let copy = self.copy_disks.load(Ordering::SeqCst);
        for (i, d) in self.disks.iter().enumerate() {
            if copy && crate::migration_block::is_copied(d) {
                parts.push(Box::new(crate::migration_block::BlockSaver::new(
                    d.clone(),
                    i,
                )));
            }
        }
        parts
    }
}

/// `madvise` advice that faults pages in writable without touching their contents (Linux 5.14;
/// not in the libc crate yet).
const MADV_POPULATE_WRITE: libc::c_int = 23;

impl TargetRam for Vm {
    fn regions(&self) -> Vec<RegionInfo> {
        GuestRam::regions(self)
    }

    fn postcopy(&self) -> Result<Arc<dyn PostcopyRam>> {
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| MigrateError::Vm("the VM is going away".into()))?;
        Ok(Arc::new(crate::postcopy::VmPostcopy::new(me)?))
    }

    fn prefault(&self, region: u32, first_page: u64, count: u64) {
        let Some(bytes) = count.checked_mul(PAGE) else {
            return;
        };
        let Ok((_, host)) = self.check_range(region, first_page, bytes) else {
            return;
        };
        // SAFETY: the range lies inside the region's mapping (checked); MADV_POPULATE_WRITE
        // allocates and maps the pages but never changes what they hold, so it cannot race
        // with the loader's writes in any way that matters. Best effort: errors are ignored.
        unsafe {
            libc::madvise(
                (host + first_page * PAGE) as *mut libc::c_void,
                bytes as usize,
                MADV_POPULATE_WRITE,
            )
        };
    }

    fn write_pages(&self, region: u32, first_page: u64, data: &[u8]) -> Result<()> {
        self.not_handed_in()?;
        let (_, host) = self.check_range(region, first_page, data.len() as u64)?;
        // SAFETY: checked to lie inside the region's mapping; the target's vCPUs do not run yet.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (host + first_page * PAGE) as *mut u8,
                data.len(),
            );
        }
        Ok(())
    }

    fn fill_pages(
        &self,
        region: u32,
        first_page: u64,
        count: u64,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<()> {
        self.not_handed_in()?;
        let bytes = count
            .checked_mul(PAGE)
            .ok_or_else(|| MigrateError::Vm("page run overflows".into()))?;
        let (_, host) = self.check_range(region, first_page, bytes)?;
        // SAFETY: the range was checked to lie inside the region's mapping, which lives as long
        // as the VM. Nothing else reads or writes these pages while the slice lives: the
        // target's vCPUs do not run before the stream is complete; without data channels only
        // the main channel's thread writes guest RAM; with them, only their threads do, and
        // each claims a page for its round before writing it (tern-migrate's target/data.rs:
        // a page claimed twice in a round fails the migration before it is touched). The
        // prefault helper's MADV_POPULATE_WRITE changes no byte and takes no reference.
        let dst = unsafe {
            std::slice::from_raw_parts_mut((host + first_page * PAGE) as *mut u8, bytes as usize)
        };
        fill(dst);
        Ok(())
    }

    fn zero_pages(&self, region: u32, first_page: u64, count: u64) -> Result<()> {
        self.not_handed_in()?;
        let bytes = count
            .checked_mul(PAGE)
            .ok_or_else(|| MigrateError::Vm("zero run overflows".into()))?;
        let (_, host) = self.check_range(region, first_page, bytes)?;
        // Large runs: give the memory back; untouched memory costs nothing.
        if count >= 16 && self.ram.discard(region as usize, first_page, count) {
            return Ok(());
        }
        // SAFETY: checked range inside the mapping; the vCPUs do not run yet.
        unsafe { std::ptr::write_bytes((host + first_page * PAGE) as *mut u8, 0, bytes as usize) };
        Ok(())
    }
}

impl TargetVm for Vm {
    fn ram(&self) -> &dyn TargetRam {
        self
    }

    fn load_state(&self, sections: &[Section]) -> Result<()> {
        Ok(self.devices.manager.load(
            self,
            sections,
            &crate::devices::LoadCtx {
                now_ns: crate::devices::realtime_ns(),
            },
        )?)
    }

    fn state_schemas(&self) -> Vec<SectionDesc> {
        self.devices.manager.schemas()
    }

    fn load_participants(self: Arc<Self>) -> Vec<Box<dyn LoadParticipant>> {
        let mut parts: Vec<Box<dyn LoadParticipant>> = Vec::new();
        // Memory handed over by the source holds the guest already: nothing to load.
        if !self.ram.handed_in() {
            parts.push(Box::new(RamLoader::new(self.clone())));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if crate::migration_block::is_copied(d) {
                parts.push(Box::new(crate::migration_block::BlockLoader::new(
                    d.clone(),
                    i,
                )));
            }
        }
        parts
    }

    fn resume(&self) -> Result<()> {
        // Shared storage: the source wrote it until the pause; what this host cached of it
        // before is stale.
        for d in self.disks.iter().filter(|d| d.config().shared) {
            d.drop_cache();
        }
        if self.hold_at_go.load(Ordering::SeqCst) {
            tracing::info!("the migrated guest waits for cont (-S)");
            return Ok(());
        }
        self.start_vcpus()
            .map_err(|e| MigrateError::Vm(format!("starting the vCPUs: {e:#}")))
    }

    fn stop_guest(&self) {
        // Not `pause`, which waits for every vCPU to park: the one that faulted on the bad
        // page never will.
        Vm::halt(self);
    }

    fn ram_digest(&self) -> u64 {
        self.ram_digest_now()
    }
}
