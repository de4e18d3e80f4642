//! Dirty tracking on the source: KVM's dirty log in either mode, and the bitmap of the writes
//! the VMM itself makes into guest memory.
//!
//! KVM's log: `KVM_GET_DIRTY_LOG` alone fetches a slot's bitmap and write-protects every page it
//! names, at every sync. With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` on, the fetch only copies the
//! bitmap, and `KVM_CLEAR_DIRTY_LOG` write-protects the pages it is given, when the saver is
//! about to read them (the order that makes this safe is written beside the saver, in
//! tern-migrate's `RamSaver::arm`). kvm-ioctls 0.25 has neither the capability's name nor a
//! wrapper for the clear ioctl, and its fetch allocates a new bitmap at every call; the two
//! ioctls are issued here with kvm-bindings' structures, into a buffer that is kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: fetching the log no longer write-protects.
const MANUAL_PROTECT_ENABLE: u64 = 1;

const PAGE: usize = 4096;

/// Turns manual protect on or off for the VM (only while no slot logs: the mode applies to the
/// logging that the next `KVM_SET_USER_MEMORY_REGION` starts). Off is always possible; on fails
/// where KVM lacks the capability.
pub(crate) fn set_manual_protect(vm: &VmFd, on: bool) -> std::io::Result<()> {
    if vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) <= 0 {
        return match on {
            true => Err(std::io::Error::from_raw_os_error(libc::ENOTSUP)),
            false => Ok(()),
        };
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = if on { MANUAL_PROTECT_ENABLE } else { 0 };
    vm.enable_cap(&cap).map_err(std::io::Error::from)
}

/// Fetches the dirty bitmap of `slot`, a slot of `pages` pages (one bit per page), into `out`,
/// which must hold at least that many bits.
pub(crate) fn get_log(vm: &VmFd, slot: u32, pages: u64, out: &mut [u64]) -> std::io::Result<()> {
    if (out.len() as u64) < pages.div_ceil(64) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: out.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd; KVM writes one bit per page of the slot (rounded up to 64) into
    // `dirty_bitmap`, and `out` was checked to hold that many bits for a slot of `pages` pages
    // (the caller names the slot's size); it lives for the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Write-protects the pages of `slot` set in `bits` (bit `i` is page `first_page + i`) and drops
/// KVM's record of them. `first_page` is a multiple of 64; the pages end at a multiple of 64 or
/// at the end of the slot.
pub(crate) fn clear_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bits: &[u64],
) -> std::io::Result<()> {
    if bits.len() < (num_pages as usize).div_ceil(64) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let clear = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bits.as_ptr() as *mut _,
        },
    };
    // SAFETY: `vm` is a VM fd; KVM only reads `num_pages` bits from `dirty_bitmap`, and `bits`
    // was checked to hold that many; it lives for the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The pages of one region the VMM wrote (device DMA, the VMM's own writes), for vm-memory to
/// mark as it writes. vm-memory's `AtomicBitmap` can only be collected whole — an atomic swap
/// of every word, a cost that grows with the guest's RAM at every sync although the VMM rarely
/// writes; this one adds a summary bit per 64 words (per 16 MiB of guest memory), so collecting
/// it costs one word per GiB plus what was written.
#[derive(Debug, Default)]
pub struct DirtyBitmap {
    words: Vec<AtomicU64>,
    groups: Vec<AtomicU64>,
    pages: usize,
}

impl DirtyBitmap {
    fn new(bytes: usize) -> Self {
        let pages = bytes.div_ceil(PAGE);
        let words = pages.div_ceil(64);
        DirtyBitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            groups: (0..words.div_ceil(64 * 64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            pages,
        }
    }

    /// Records a write to `page` (ignored past the end).
    pub(crate) fn mark_page(&self, page: usize) {
        if page >= self.pages {
            return;
        }
        let w = page / 64;
        // The word first, then its summary bit: a collector that clears the summary bit and
        // then misses the word's bit (set after it looked) finds the summary bit set again.
        self.words[w].fetch_or(1 << (page % 64), Ordering::SeqCst);
        self.groups[w / 4096].fetch_or(1 << ((w / 64) % 64), Ordering::SeqCst);
    }

    /// ORs the pages written since the last call into `out` and forgets them; returns how many
    /// bits were newly set in `out`.
    pub fn take_into(&self, out: &mut [u64]) -> u64 {
        let mut new = 0;
        for (gi, g) in self.groups.iter().enumerate() {
            let mut bits = g.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let first_word = (gi * 64 + bits.trailing_zeros() as usize) * 64;
                bits &= bits - 1;
                for w in first_word..(first_word + 64).min(self.words.len()) {
                    let v = self.words[w].swap(0, Ordering::SeqCst);
                    if let Some(o) = out.get_mut(w) {
                        new += u64::from((v & !*o).count_ones());
                        *o |= v;
                    }
                }
            }
        }
        new
    }

    /// Forgets every write.
    pub fn reset(&self) {
        for g in &self.groups {
            g.store(0, Ordering::SeqCst);
        }
        for w in &self.words {
            w.store(0, Ordering::SeqCst);
        }
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let last = offset.saturating_add(len - 1) / PAGE;
        for page in offset / PAGE..=last.min(self.pages.saturating_sub(1)) {
            self.mark_page(page);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = offset / PAGE;
        page < self.pages && self.words[page / 64].load(Ordering::SeqCst) & (1 << (page % 64)) != 0
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyBitmap {
    fn with_len(len: usize) -> Self {
        DirtyBitmap::new(len)
    }
}

/// Scratch space for fetching KVM's bitmap, kept between syncs.
#[derive(Debug, Default)]
pub(crate) struct LogBuffer(Mutex<Vec<u64>>);

impl LogBuffer {
    /// Runs `f` with a buffer of `words` words (not cleared: KVM overwrites all of a slot's
    /// bitmap).
    pub(crate) fn with<R>(&self, words: usize, f: impl FnOnce(&mut [u64]) -> R) -> R {
        let mut b = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() < words {
            b.resize(words, 0);
        }
        f(&mut b[..words])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_bitmap_gives_back_exactly_what_was_marked() {
        // 3 GiB and a bit: several groups, a last word that is not full.
        let b = DirtyBitmap::new((3 << 30) + 5 * PAGE);
        let pages = (3 << 30) / PAGE + 5;
        b.mark_dirty(0, 1);
        b.mark_dirty(PAGE * 100 + 10, PAGE); // straddles pages 100 and 101
        b.mark_dirty((pages - 1) * PAGE, PAGE * 10); // past the end: clipped
        b.mark_dirty(PAGE * 300_000, 0);
        b.mark_dirty(PAGE * 600_000, 3 * PAGE);
        assert!(b.dirty_at(PAGE * 101) && !b.dirty_at(PAGE * 102));
        let mut out = vec![0u64; pages.div_ceil(64)];
        out[0] = 1; // already set: not counted as new
        assert_eq!(b.take_into(&mut out), 6);
        let got: Vec<usize> = (0..pages)
            .filter(|&p| out[p / 64] & (1 << (p % 64)) != 0)
            .collect();
        assert_eq!(got, vec![0, 100, 101, 600_000, 600_001, 600_002, pages - 1]);
        let mut again = vec![0u64; out.len()];
        b.take_into(&mut again);
        assert!(again.iter().all(|&w| w == 0), "taking forgets");
        b.mark_dirty(PAGE * 7, 1);
        b.reset();
        b.take_into(&mut again);
        assert!(again.iter().all(|&w| w == 0), "reset forgets");
    }
}
