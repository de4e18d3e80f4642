//! The virtio-mmio transport (version 2): the devices the command line names, and their
//! register windows.
//!
//! The devices are the command line's `virtio_mmio.device=<size>@<addr>:<irq>[:<id>]` entries
//! (Linux's format); the disk uses the first block device among them, the network the first net
//! device. Their registers are reached by 32-bit loads and stores to unbacked guest-physical
//! memory, which exit to the VMM as MMIO.

use core::fmt::Write;
use core::ptr::{read_volatile, write_volatile};

use crate::{Line, Range, PAGE, RAM_CEIL, RAM_FLOOR};

const MAX_DEVS: usize = 8;

// virtio-mmio registers.
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
pub const DEVICE_FEATURES: u64 = 0x010;
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
pub const DRIVER_FEATURES: u64 = 0x020;
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
pub const QUEUE_SEL: u64 = 0x030;
pub const QUEUE_NUM_MAX: u64 = 0x034;
pub const QUEUE_NUM: u64 = 0x038;
pub const QUEUE_READY: u64 = 0x044;
pub const QUEUE_NOTIFY: u64 = 0x050;
pub const STATUS: u64 = 0x070;
pub const QUEUE_DESC: u64 = 0x080;
pub const QUEUE_DRIVER: u64 = 0x090;
pub const QUEUE_DEVICE: u64 = 0x0a0;
pub const CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG: u64 = 0x100;
const MAGIC_VALUE: u32 = 0x7472_6976;

// Device IDs.
pub const ID_NET: u32 = 1;
pub const ID_BLOCK: u32 = 2;

// Device status bits.
pub const ACKNOWLEDGE: u32 = 1;
pub const DRIVER: u32 = 2;
pub const DRIVER_OK: u32 = 4;
pub const FEATURES_OK: u32 = 8;
pub const NEEDS_RESET: u32 = 64;
pub const FAILED: u32 = 128;

/// The command line's `virtio_mmio.device=` entries.
pub struct Devs {
    addr: [u64; MAX_DEVS],
    size: [u64; MAX_DEVS],
    n: usize,
    dropped: bool,
}

impl Devs {
    pub fn new() -> Self {
        Devs {
            addr: [0; MAX_DEVS],
            size: [0; MAX_DEVS],
            n: 0,
            dropped: false,
        }
    }

    /// Adds the value of one `virtio_mmio.device=` entry.
    pub fn add(&mut self, val: &[u8]) {
        let Some((size, addr)) = parse_dev(val) else {
            say!(
                "tern-guest disk FAIL cannot parse virtio_mmio.device={}",
                core::str::from_utf8(val).unwrap_or("?")
            );
            return;
        };
        if self.n == MAX_DEVS {
            if !self.dropped {
                say!("tern-guest disk warning: more than {MAX_DEVS} virtio_mmio.device entries, ignoring the rest");
                self.dropped = true;
            }
            return;
        }
        self.addr[self.n] = addr;
        self.size[self.n] = size;
        self.n += 1;
    }
}

/// A number at the start of `s`, `0x` hex or decimal, and what follows it.
fn num(s: &[u8]) -> Option<(u64, &[u8])> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    let n = digits
        .iter()
        .take_while(|&&c| char::from(c).is_digit(radix))
        .count();
    if n == 0 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in &digits[..n] {
        let d = char::from(c).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some((v, &digits[n..]))
}

/// `<size>[K|M|G]@<addr>:<irq>[:<id>]` as (size, addr).
fn parse_dev(s: &[u8]) -> Option<(u64, u64)> {
    let (size, rest) = num(s)?;
    let (shift, rest) = match rest.first() {
        Some(b'k' | b'K') => (10, &rest[1..]),
        Some(b'm' | b'M') => (20, &rest[1..]),
        Some(b'g' | b'G') => (30, &rest[1..]),
        _ => (0, rest),
    };
    let size = size.checked_mul(1 << shift)?;
    let (addr, rest) = num(rest.strip_prefix(b"@")?)?;
    let (_irq, rest) = num(rest.strip_prefix(b":")?)?;
    let rest = match rest.strip_prefix(b":") {
        Some(id) => num(id)?.1,
        None => rest,
    };
    (rest.is_empty() && size > 0).then_some((size, addr))
}

/// The start every driver makes (virtio 1.x, 3.1.1): reset, ACKNOWLEDGE, DRIVER, and the
/// device must offer VIRTIO_F_VERSION_1 (feature bit 32); feature word 0 is selected after.
pub fn start(r: Regs) -> Result<(), &'static str> {
    r.write(STATUS, 0);
    if !(0..1000).any(|_| r.read(STATUS) == 0) {
        return Err("device reset did not complete");
    }
    r.write(STATUS, ACKNOWLEDGE);
    r.write(STATUS, ACKNOWLEDGE | DRIVER);
    r.write(DEVICE_FEATURES_SEL, 1);
    if r.read(DEVICE_FEATURES) & 1 == 0 {
        return Err("device lacks VIRTIO_F_VERSION_1");
    }
    r.write(DEVICE_FEATURES_SEL, 0);
    Ok(())
}

/// A device's register window, checked by `window_ok` (only `first_of` makes one).
#[derive(Clone, Copy)]
pub struct Regs(u64);

impl Regs {
    /// The window's guest-physical address.
    pub fn addr(&self) -> u64 {
        self.0
    }
    pub fn read(&self, off: u64) -> u32 {
        // SAFETY: `window_ok` checked that the window is 4-byte aligned, at least CONFIG + 8
        // bytes (every `off` used is below that), within the identity map that boot.rs makes
        // user-accessible, and not RAM: the load exits to the VMM as MMIO.
        unsafe { read_volatile((self.0 + off) as *const u32) }
    }
    pub fn write(&self, off: u64, v: u32) {
        // SAFETY: as in `read`.
        unsafe { write_volatile((self.0 + off) as *mut u32, v) }
    }
    pub fn write64(&self, off: u64, v: u64) {
        self.write(off, v as u32);
        self.write(off + 4, (v >> 32) as u32);
    }
}

fn window_ok(addr: u64, size: u64, ram: &[Range]) -> Result<(), &'static str> {
    if !addr.is_multiple_of(4) {
        return Err("is not 4-byte aligned");
    }
    if size < CONFIG + 8 {
        return Err("is smaller than 0x108 bytes");
    }
    if addr < RAM_FLOOR || addr.checked_add(size).is_none_or(|end| end > RAM_CEIL) {
        return Err("is outside the guest's map");
    }
    if ram
        .iter()
        .any(|r| addr < r.base + r.pages * PAGE && r.base < addr + size)
    {
        return Err("is RAM");
    }
    Ok(())
}

/// The first of the named devices that is a virtio-mmio version 2 device with ID `id`. With
/// `report`, prints why a named device before it cannot be used (the disk, probed first, reports;
/// the network, probed after it, does not repeat that).
pub fn first_of(devs: &Devs, id: u32, ram: &[Range], report: bool) -> Option<Regs> {
    for i in 0..devs.n {
        let (addr, size) = (devs.addr[i], devs.size[i]);
        if let Err(why) = window_ok(addr, size, ram) {
            if report {
                say!("tern-guest disk FAIL virtio_mmio.device at {addr:#x} {why}");
            }
            continue;
        }
        let r = Regs(addr);
        let magic = r.read(MAGIC);
        if magic != MAGIC_VALUE {
            if report {
                say!("tern-guest disk FAIL no virtio-mmio device at {addr:#x} (magic {magic:#x})");
            }
            continue;
        }
        match r.read(VERSION) {
            2 => {}
            1 => {
                if report {
                    say!("tern-guest disk warning: legacy virtio-mmio at {addr:#x} (run QEMU with -global virtio-mmio.force-legacy=false)");
                }
                continue;
            }
            v => {
                if report {
                    say!("tern-guest disk FAIL unknown virtio-mmio version {v} at {addr:#x}");
                }
                continue;
            }
        }
        if r.read(DEVICE_ID) == id {
            return Some(r);
        }
    }
    None
}
