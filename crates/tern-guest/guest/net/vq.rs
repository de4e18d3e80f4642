//! A split virtqueue (virtio 1.x, 2.7), polled: the driver side of one queue of the net device.
//!
//! A queue lives in three zeroed pages carved from RAM, one each for the descriptor table
//! (16 * N bytes), the avail ring (6 + 2N) and the used ring (6 + 8N), so N is at most 256. The
//! avail ring asks for no interrupts; the driver polls the used ring, which is a memory read and
//! no VM exit. Buffers are added with `set_desc` + `push` and made visible (and the device
//! notified, which is an exit) by `kick`, so that a batch costs one exit.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use crate::mmio::{
    Regs, QUEUE_DESC, QUEUE_DEVICE, QUEUE_DRIVER, QUEUE_NOTIFY, QUEUE_NUM, QUEUE_NUM_MAX,
    QUEUE_READY, QUEUE_SEL,
};
use crate::PAGE;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// The largest queue used: its descriptor table fills one page.
pub const MAX_QUEUE: u32 = (PAGE / 16) as u32;
/// Pages a queue takes.
pub const VQ_PAGES: u64 = 3;

/// The size to use for queue `index`: the device's maximum, capped at `cap` and rounded down to
/// a power of 2 (a split queue's ring indices wrap at 2^16). Errors say why it cannot be used.
pub fn queue_size(r: Regs, index: u32, cap: u32) -> Result<u16, &'static str> {
    r.write(QUEUE_SEL, index);
    if r.read(QUEUE_READY) != 0 {
        return Err("is already ready after a reset");
    }
    let max = r.read(QUEUE_NUM_MAX);
    if max == 0 {
        return Err("does not exist (QueueNumMax=0)");
    }
    Ok(1u16 << max.min(cap).min(MAX_QUEUE).ilog2())
}

pub struct Vq {
    regs: Regs,
    index: u32,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// The next avail index to fill, the one last made visible to the device, and the next used
    /// index to consume.
    avail_idx: u16,
    published: u16,
    last_used: u16,
    /// The device's used index ran more than a ring ahead of what we consumed: it published
    /// entries that cannot be (a stale or corrupted ring, e.g. restored wrongly after a
    /// migration). Nothing more is read from the queue.
    pub overrun: bool,
}

impl Vq {
    /// Gives queue `index` of the device, `size` entries (from `queue_size`), the `VQ_PAGES`
    /// zeroed pages at `base`, which `carve` handed out and nothing else uses.
    pub fn new(r: Regs, index: u32, size: u16, base: u64) -> Vq {
        let q = Vq {
            regs: r,
            index,
            size,
            desc: base,
            avail: base + PAGE,
            used: base + 2 * PAGE,
            avail_idx: 0,
            published: 0,
            last_used: 0,
            overrun: false,
        };
        // SAFETY: the avail ring's flags, in the queue's pages; the device does not know the
        // ring yet.
        unsafe { write_volatile(q.avail as *mut u16, AVAIL_F_NO_INTERRUPT) };
        r.write(QUEUE_SEL, index);
        r.write(QUEUE_NUM, u32::from(size));
        r.write64(QUEUE_DESC, q.desc);
        r.write64(QUEUE_DRIVER, q.avail);
        r.write64(QUEUE_DEVICE, q.used);
        r.write(QUEUE_READY, 1);
        q
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Writes descriptor `i`. The caller owns it: it is not part of a chain the device holds.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(i < self.size);
        let p = self.desc + 16 * u64::from(i);
        // SAFETY: descriptor i < size <= 256 of the table in the queue's first page; the device
        // reads it only after it is pushed and published, which the caller has not done yet.
        unsafe {
            write_volatile(p as *mut u64, addr);
            write_volatile((p + 8) as *mut u32, len);
            write_volatile((p + 12) as *mut u16, flags);
            write_volatile((p + 14) as *mut u16, next);
        }
    }

    /// Adds the chain that starts at descriptor `head` to the avail ring (visible after `kick`).
    /// The caller never has more than `size` chains outstanding, so the ring cannot overflow.
    pub fn push(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        // SAFETY: an avail ring entry in the queue's second page, beyond the published index,
        // so the device does not read it yet.
        unsafe { write_volatile(slot as *mut u16, head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes the pushed chains visible to the device and notifies it, unless it asked not to be
    /// (VIRTQ_USED_F_NO_NOTIFY: it is polling the queue already). Returns whether it notified.
    pub fn kick(&mut self) -> bool {
        if self.avail_idx == self.published {
            return false;
        }
        fence(Ordering::Release);
        // SAFETY: the avail ring's idx, in the queue's second page.
        unsafe { write_volatile((self.avail + 2) as *mut u16, self.avail_idx) };
        self.published = self.avail_idx;
        // The device must see the new index before we read its flags, or a device that clears
        // NO_NOTIFY and then checks the ring could miss both.
        fence(Ordering::SeqCst);
        // SAFETY: the used ring's flags, in the queue's third page; the device writes them.
        let flags = unsafe { read_volatile(self.used as *const u16) };
        if flags & USED_F_NO_NOTIFY != 0 {
            return false;
        }
        self.regs.write(QUEUE_NOTIFY, self.index);
        true
    }

    /// The next used element (descriptor head, bytes written), without consuming it.
    pub fn peek(&mut self) -> Option<(u32, u32)> {
        // SAFETY: the used ring's idx, in the queue's third page; the device writes it.
        let idx = unsafe { read_volatile((self.used + 2) as *const u16) };
        if idx == self.last_used || self.overrun {
            return None;
        }
        if idx.wrapping_sub(self.last_used) > self.size {
            self.overrun = true;
            return None;
        }
        fence(Ordering::Acquire);
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        // SAFETY: a used ring element in the queue's third page, published by the device
        // before it raised idx past it (the Acquire fence orders our reads after that).
        let (id, len) = unsafe {
            (
                read_volatile(e as *const u32),
                read_volatile((e + 4) as *const u32),
            )
        };
        Some((id, len))
    }

    /// Consumes the element `peek` returned.
    pub fn advance(&mut self) {
        self.last_used = self.last_used.wrapping_add(1);
    }

    /// The next used element, consumed.
    pub fn pop(&mut self) -> Option<(u32, u32)> {
        let e = self.peek()?;
        self.advance();
        Some(e)
    }
}
