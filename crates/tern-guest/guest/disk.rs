//! A ring-3 virtio-blk driver (virtio-mmio version 2, one split queue, polled) and the disk
//! workload that vCPU 0 drives with it: the device's discovery and registers are in
//! `crate::mmio`, its set-up and the virtqueue here, the workload and its self-check in `work`.
//!
//! The disk area, carved from RAM before the working set (so the dirtier never touches it),
//! page-aligned: the block generation table (8 bytes a block, whole pages), then one page each
//! for the descriptor table (16 * N), the avail ring (6 + 2N), the used ring (6 + 8N) and the
//! request headers (16 bytes a slot at offset 16 * s, status bytes at 256 + s), then one 4 KiB
//! data buffer a slot. A slot is one request: descriptors 3s (header), 3s + 1 (data), 3s + 2
//! (status).

mod work;

use core::fmt::Write;
use core::ptr::write_volatile;
use core::sync::atomic::{fence, Ordering};

use crate::mmio::{
    self, Regs, ACKNOWLEDGE, CONFIG, CONFIG_GENERATION, DEVICE_FEATURES, DRIVER, DRIVER_FEATURES,
    DRIVER_FEATURES_SEL, DRIVER_OK, FAILED, FEATURES_OK, ID_BLOCK, NEEDS_RESET, QUEUE_DESC,
    QUEUE_DEVICE, QUEUE_DRIVER, QUEUE_NOTIFY, QUEUE_NUM, QUEUE_NUM_MAX, QUEUE_READY, QUEUE_SEL,
    STATUS,
};
use crate::setup::carve;
use crate::{Bad, Line, Range, Rng, PAGE};
use work::Pacer;

const MAX_SLOTS: usize = 16;
const MAX_QUEUE: u32 = 64;
const SECTORS_PER_BLOCK: u64 = PAGE / 512;

/// Feature word 0, bit 5.
const VIRTIO_BLK_F_RO: u32 = 1 << 5;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;

/// Probes the named devices and sets up the first block device; the disk area is carved from
/// `ram`. Prints why a named device cannot be used.
pub fn probe(devs: &mmio::Devs, rate_mib: u64, ram: &mut [Range]) -> Option<Disk> {
    if let Some(r) = mmio::first_of(devs, ID_BLOCK, ram, true) {
        return init(r, rate_mib, ram);
    }
    if rate_mib > 0 {
        say!("tern-guest disk FAIL tern.disk_rate is set but no virtio-blk device was found");
    }
    None
}

/// Marks the device FAILED and prints why.
fn give_up(r: Regs, why: core::fmt::Arguments) -> Option<Disk> {
    r.write(STATUS, r.read(STATUS) | FAILED);
    say!("tern-guest disk FAIL {why}");
    None
}

fn init(r: Regs, rate_mib: u64, ram: &mut [Range]) -> Option<Disk> {
    if let Err(why) = crate::mmio::start(r) {
        return give_up(r, format_args!("{why}"));
    }
    if r.read(DEVICE_FEATURES) & VIRTIO_BLK_F_RO != 0 && rate_mib > 0 {
        return give_up(
            r,
            format_args!("device is read-only but tern.disk_rate is set"),
        );
    }
    r.write(DRIVER_FEATURES_SEL, 0);
    r.write(DRIVER_FEATURES, 0);
    r.write(DRIVER_FEATURES_SEL, 1);
    r.write(DRIVER_FEATURES, 1);
    r.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    if r.read(STATUS) & FEATURES_OK == 0 {
        return give_up(r, format_args!("device refused FEATURES_OK"));
    }
    let mut capacity = None;
    for _ in 0..1000 {
        let g = r.read(CONFIG_GENERATION);
        let (lo, hi) = (r.read(CONFIG), r.read(CONFIG + 4));
        if r.read(CONFIG_GENERATION) == g {
            capacity = Some(u64::from(hi) << 32 | u64::from(lo));
            break;
        }
    }
    let Some(capacity) = capacity else {
        return give_up(r, format_args!("device config generation never settles"));
    };
    r.write(QUEUE_SEL, 0);
    if r.read(QUEUE_READY) != 0 {
        return give_up(r, format_args!("queue 0 is already ready after a reset"));
    }
    let max = r.read(QUEUE_NUM_MAX);
    if max == 0 {
        return give_up(r, format_args!("device has no queue 0 (QueueNumMax=0)"));
    }
    // A split queue's size is a power of 2 (the ring indices wrap at 2^16).
    let qsize = 1u32 << max.min(MAX_QUEUE).ilog2();
    let slots = (qsize / 3).min(MAX_SLOTS as u32) as usize;
    if slots == 0 {
        return give_up(r, format_args!("queue 0 is too small (QueueNumMax={max})"));
    }

    // The area must fit one range, and leave most of the RAM to the working set.
    let fixed = 4 + slots as u64;
    let largest = ram.iter().map(|r| r.pages).max().unwrap_or(0);
    let max_blocks = (largest / 4).saturating_sub(fixed) * (PAGE / 8);
    let mut blocks = capacity / SECTORS_PER_BLOCK;
    if blocks == 0 {
        return give_up(
            r,
            format_args!("capacity {capacity} sectors is less than one block"),
        );
    }
    if blocks > max_blocks {
        if max_blocks == 0 {
            return give_up(r, format_args!("no RAM for the disk area"));
        }
        say!("tern-guest disk warning: the table for {blocks} blocks does not fit, using the first {max_blocks}");
        blocks = max_blocks;
    }
    let table_pages = (blocks * 8).div_ceil(PAGE);
    let pages = table_pages + fixed;
    let Some(base) = carve(ram, pages) else {
        return give_up(r, format_args!("no RAM for the disk area"));
    };
    // SAFETY: `carve` gave us these pages of RAM, which nothing else uses; the device has no
    // queue yet.
    unsafe { core::ptr::write_bytes(base as *mut u8, 0, (pages * PAGE) as usize) };
    let desc = base + table_pages * PAGE;
    let d = Disk {
        regs: r,
        addr: r.addr(),
        blocks,
        qsize: qsize as u16,
        slots,
        table: base,
        desc,
        avail: desc + PAGE,
        used: desc + 2 * PAGE,
        hdr: desc + 3 * PAGE,
        data: desc + 4 * PAGE,
        avail_idx: 0,
        last_used: 0,
        slot: [Slot {
            busy: false,
            write: false,
            block: 0,
            gen: 0,
            t: 0,
            stuck: false,
        }; MAX_SLOTS],
        next_slot: 0,
        reads: 0,
        rate: rate_mib * 256,
        wpace: Pacer { t0: 0, done: 0 },
        next: 0,
        rng: Rng(0x8f3a_2c4b_91d7_e605),
        writes: 0,
        rpace: Pacer { t0: 0, done: 0 },
        pos: 0,
        pass_t0: 0,
        verified: 0,
        bad: 0,
        first_bad: None,
        fails: 0,
        started: false,
    };
    // SAFETY: the avail ring's flags, in the disk area; the device does not know the ring yet.
    unsafe { write_volatile(d.avail as *mut u16, VRING_AVAIL_F_NO_INTERRUPT) };
    r.write(QUEUE_NUM, qsize);
    r.write64(QUEUE_DESC, d.desc);
    r.write64(QUEUE_DRIVER, d.avail);
    r.write64(QUEUE_DEVICE, d.used);
    r.write(QUEUE_READY, 1);
    r.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    let status = r.read(STATUS);
    if status & NEEDS_RESET != 0 || status & DRIVER_OK == 0 {
        return give_up(
            r,
            format_args!("device did not accept DRIVER_OK (status {status:#x})"),
        );
    }
    Some(d)
}

#[derive(Clone, Copy)]
struct Slot {
    busy: bool,
    write: bool,
    block: u64,
    /// The generation written, or the one the block had when the read was issued.
    gen: u64,
    /// When the request was published.
    t: u64,
    stuck: bool,
}

/// The driver and the disk workload (vCPU 0 only).
pub struct Disk {
    regs: Regs,
    addr: u64,
    blocks: u64,
    qsize: u16,
    slots: usize,
    table: u64,
    desc: u64,
    avail: u64,
    used: u64,
    hdr: u64,
    data: u64,
    /// The next avail index to publish, and the next used index to consume.
    avail_idx: u16,
    last_used: u16,
    slot: [Slot; MAX_SLOTS],
    next_slot: usize,
    /// Reads in flight.
    reads: usize,
    /// Writes per second, in blocks.
    rate: u64,
    wpace: Pacer,
    next: u64,
    rng: Rng,
    writes: u64,
    rpace: Pacer,
    /// The self-check pass: the next block, when it began, what it found.
    pos: u64,
    pass_t0: u64,
    verified: u64,
    bad: u64,
    first_bad: Option<Bad>,
    fails: u32,
    started: bool,
}

impl Disk {
    pub fn announce(&self) {
        say!(
            "tern-guest disk found addr={:#x} blocks={} queue={}",
            self.addr,
            self.blocks,
            self.qsize
        );
    }

    fn buf(&self, s: usize) -> *mut u64 {
        (self.data + s as u64 * PAGE) as *mut u64
    }
    fn status(&self, s: usize) -> *mut u8 {
        (self.hdr + 256 + s as u64) as *mut u8
    }

    fn free_slot(&mut self) -> Option<usize> {
        for k in 0..self.slots {
            let s = (self.next_slot + k) % self.slots;
            if !self.slot[s].busy {
                // Round robin, so that a slot is reused as late as possible: a duplicate
                // completion then finds it idle.
                self.next_slot = (s + 1) % self.slots;
                return Some(s);
            }
        }
        None
    }

    fn set_desc(&self, i: u64, addr: u64, len: u32, flags: u16, next: u64) {
        let p = self.desc + 16 * i;
        // SAFETY: descriptor i < 3 * slots <= qsize of the descriptor table in the disk area; it
        // belongs to a slot that is not in flight, so the device does not read it meanwhile.
        unsafe {
            write_volatile(p as *mut u64, addr);
            write_volatile((p + 8) as *mut u32, len);
            write_volatile((p + 12) as *mut u16, flags);
            write_volatile((p + 14) as *mut u16, next as u16);
        }
    }

    /// Queues request `s` (not yet visible to the device: see `publish`).
    fn submit(&mut self, s: usize, write: bool, block: u64, gen: u64, now: u64) {
        let hdr = self.hdr + 16 * s as u64;
        let status = self.status(s);
        // SAFETY: slot s's header and status byte in the disk area; the slot is not in flight.
        unsafe {
            write_volatile(
                hdr as *mut u32,
                if write {
                    VIRTIO_BLK_T_OUT
                } else {
                    VIRTIO_BLK_T_IN
                },
            );
            write_volatile((hdr + 4) as *mut u32, 0);
            write_volatile((hdr + 8) as *mut u64, block * SECTORS_PER_BLOCK);
            write_volatile(status, 0xff);
        }
        let head = 3 * s as u64;
        let data_flags = if write { 0 } else { VIRTQ_DESC_F_WRITE };
        self.set_desc(head, hdr, 16, VIRTQ_DESC_F_NEXT, head + 1);
        self.set_desc(
            head + 1,
            self.buf(s) as u64,
            PAGE as u32,
            data_flags | VIRTQ_DESC_F_NEXT,
            head + 2,
        );
        self.set_desc(head + 2, status as u64, 1, VIRTQ_DESC_F_WRITE, 0);
        let ring = self.avail + 4 + 2 * u64::from(self.avail_idx % self.qsize);
        // SAFETY: an avail ring entry in the disk area, beyond the published index.
        unsafe { write_volatile(ring as *mut u16, head as u16) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.slot[s] = Slot {
            busy: true,
            write,
            block,
            gen,
            t: now,
            stuck: false,
        };
    }

    /// Makes the queued requests visible to the device and notifies it.
    fn publish(&self) {
        fence(Ordering::Release);
        // SAFETY: the avail ring's idx, in the disk area.
        unsafe { write_volatile((self.avail + 2) as *mut u16, self.avail_idx) };
        fence(Ordering::SeqCst);
        self.regs.write(QUEUE_NOTIFY, 0);
    }
}
