//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`, QEMU's `-accel kvm,dirty-ring-size=N`): each vCPU
//! pushes the pages it writes, while logging is on, into a ring shared with the VMM; the VMM
//! harvests the entries and `KVM_RESET_DIRTY_RINGS` write-protects the harvested pages again.
//! Collecting costs what was written, not the size of RAM (no bitmap of the whole slot is
//! copied); the price is that it must be chosen before the vCPUs exist, that a full ring stops
//! its vCPU until harvested (`KVM_EXIT_DIRTY_RING_FULL`: the vCPU thread harvests its own ring),
//! and that `KVM_GET_DIRTY_LOG` is then unavailable.
//!
//! kvm-ioctls 0.25 has none of this: the capability, the mapping at `KVM_DIRTY_LOG_PAGE_OFFSET`,
//! the entry protocol and the reset ioctl are written here on kvm-bindings' structures.
//!
//! No page is lost: a write to a write-protected page makes KVM push an entry and unprotect the
//! page. A harvester (the migration thread at a sync, or a vCPU whose ring is full) collects the
//! entries, has KVM reset them — which write-protects those pages again — and only *then* marks
//! the pages in [`DirtyRings`]'s bitmaps, where a sync can take them. A write between the
//! collection and the reset leaves no entry, but the page cannot have been taken yet, so it is
//! read after the reset and that read sees the write. (Marking before the reset would let a
//! sync on another thread take the page, send it, and miss a write made before the reset.)

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVMIO, KVM_CAP_DIRTY_LOG_RING, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use crate::DirtyBitmap;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// The entry was pushed by KVM and not yet harvested.
const GFN_DIRTY: u32 = 1;
/// The VMM harvested the entry; KVM may re-protect the page and reuse the slot.
const GFN_RESET: u32 = 2;
const ENTRY: usize = std::mem::size_of::<kvm_dirty_gfn>();
/// The exit a vCPU takes when its ring is (softly) full.
pub(crate) const EXIT_DIRTY_RING_FULL: u32 = 31;

/// The largest ring KVM offers here, in entries (0 if it has none).
pub fn max_entries(vm: &VmFd) -> u32 {
    let bytes = vm.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING));
    (bytes.max(0) as usize / ENTRY) as u32
}

/// One vCPU's ring, mapped from its fd.
struct Ring {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    /// The next entry to harvest (KVM's `fetch_index`, kept by the VMM).
    fetch: u32,
}

// SAFETY: the mapping is shared memory that lives until `Drop`; access goes through the ring's
// mutex on our side and the entry protocol (atomic flags) against KVM.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `base` is the mapping of `entries` entries made in `DirtyRings::new`, unmapped
        // once, here.
        unsafe { libc::munmap(self.base.cast(), self.entries as usize * ENTRY) };
    }
}

/// Every vCPU's ring, and the pages harvested from them per memory slot.
pub struct DirtyRings {
    rings: Vec<Mutex<Ring>>,
    harvested: Vec<DirtyBitmap>,
    /// A duplicate of the VM fd, for the reset (vCPU threads reset too).
    vm: OwnedFd,
}

impl DirtyRings {
    /// Turns the ring on for the VM: before any vCPU is created. `entries` is a power of two.
    pub(crate) fn enable(vm: &VmFd, entries: u32) -> std::io::Result<()> {
        let max = max_entries(vm);
        if !entries.is_power_of_two() || entries < 1024 || entries > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("dirty-ring-size must be a power of two from 1024 to {max} here (got {entries})"),
            ));
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_DIRTY_LOG_RING,
            ..Default::default()
        };
        cap.args[0] = u64::from(entries) * ENTRY as u64;
        vm.enable_cap(&cap).map_err(std::io::Error::from)
    }

    /// Maps each vCPU's ring; `slot_bytes` are the sizes of the memory slots, in slot order.
    pub(crate) fn new(
        vm: &VmFd,
        vcpus: &[&VcpuFd],
        entries: u32,
        slot_bytes: &[u64],
    ) -> std::io::Result<Self> {
        let mut rings = Vec::new();
        for v in vcpus {
            let len = entries as usize * ENTRY;
            // SAFETY: maps `len` bytes of the vCPU fd at KVM's ring offset, shared and writable
            // as KVM requires; the result is checked before use.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    v.as_raw_fd(),
                    i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * 4096,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            rings.push(Mutex::new(Ring {
                base: p.cast(),
                entries,
                fetch: 0,
            }));
        }
        // SAFETY: dup of a valid fd; the duplicate is owned by the returned OwnedFd.
        let fd = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirtyRings {
            rings,
            harvested: slot_bytes
                .iter()
                .map(|&b| <DirtyBitmap as vm_memory::bitmap::NewBitmap>::with_len(b as usize))
                .collect(),
            // SAFETY: `fd` was just created and is owned by nothing else.
            vm: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Harvests vCPU `index`'s ring (or every ring, with `None`), lets KVM re-protect what was
    /// harvested, then records the pages. Returns the entries harvested.
    pub(crate) fn harvest(&self, index: Option<usize>) -> std::io::Result<u64> {
        let mut pages: Vec<(u32, u64)> = Vec::new();
        for (i, r) in self.rings.iter().enumerate() {
            if index.is_some_and(|x| x != i) {
                continue;
            }
            let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                // SAFETY: `fetch % entries` is inside the mapping.
                let e = unsafe { r.base.add((r.fetch % r.entries) as usize) };
                // SAFETY: `flags` is a u32 in shared memory that KVM writes; reading it through
                // an atomic orders the reads of `slot` and `offset` after KVM's publication.
                let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
                if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                    break;
                }
                // SAFETY: the entry is published (GFN_DIRTY) and KVM leaves it alone until reset.
                let (slot, offset) = unsafe {
                    (
                        std::ptr::read_volatile(std::ptr::addr_of!((*e).slot)),
                        std::ptr::read_volatile(std::ptr::addr_of!((*e).offset)),
                    )
                };
                pages.push((slot, offset));
                flags.store(GFN_RESET, Ordering::Release);
                r.fetch = r.fetch.wrapping_add(1);
            }
        }
        // A vCPU with a full ring resets even when another thread collected its entries and
        // has not reset them yet: otherwise it would exit with a full ring again at once.
        if !pages.is_empty() || index.is_some() {
            // SAFETY: a VM fd; the ioctl takes no argument.
            let ret = unsafe { ioctl(&self.vm, KVM_RESET_DIRTY_RINGS()) };
            if ret < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        for &(slot, offset) in &pages {
            // Address space 0 only: tern creates no slots in another (SMM).
            if slot >> 16 != 0 {
                tracing::warn!(
                    slot,
                    "a dirty-ring entry for another address space; ignored"
                );
                continue;
            }
            if let Some(b) = self.harvested.get(slot as usize) {
                b.mark_page(offset as usize);
            }
        }
        Ok(pages.len() as u64)
    }

    /// ORs the pages harvested from `slot` into `out` and forgets them; returns how many bits
    /// were newly set in `out`.
    pub(crate) fn take_into(&self, slot: usize, out: &mut [u64]) -> u64 {
        self.harvested.get(slot).map_or(0, |b| b.take_into(out))
    }

    /// Forgets everything harvested (logging starts).
    pub(crate) fn reset(&self) {
        for b in &self.harvested {
            b.reset();
        }
    }
}
