//! The tern test guest, ring-3 part.
//!
//! Knobs (kernel command line): `tern.wss=<MiB>` working set (256), `tern.rate=<MiB/s>` pages
//! dirtied per second over all vCPUs (0), `tern.pattern=seq|random|hot` (seq; hot = 90% of writes
//! to 10% of the set), `tern.check=<s>` self-check period (2; 0 = off), `tern.hb=<ms>` heartbeat
//! period (100), `tern.exit=<s>` power off after that many seconds (0 = never), `tern.tsc_khz=`
//! (override; otherwise read from kvmclock), `tern.entropy=<0..100>` how much of each page is
//! incompressible (100; the rest of the page repeats one word, so that compression has
//! something to gain: 0 compresses about a hundredfold, 50 about twofold),
//! `tern.disk_rate=<MiB/s>` blocks written per second to the first virtio-blk device of the
//! `virtio_mmio.device=` entries (0; see disk.rs), whose written blocks are read back and checked
//! once per check period, `tern.ip=<a.b.c.d>/<len>` the address of the first virtio-net device
//! of those entries (none: the device is left alone) and `tern.gw=<a.b.c.d>` its default route
//! (none), for the network workload (see net.rs): ping and ARP, a TCP sink on port 5001 that
//! checks a stream of little-endian u64 counters, a TCP source of that stream on port 5002, and
//! a gratuitous ARP whenever the device asks for an announce (after a migration).
//!
//! Every page of the working set holds a pattern derived from (page index, generation); the
//! generations live in a table in guest RAM, updated like a seqlock (odd while the page is being
//! rewritten). Page `i` is written only by vCPU `i % ncpus`; vCPU 0 also prints the heartbeat and
//! verifies every page once per check period, a slice at a time so that it never stalls.
//!
//! Output lines: `tern-guest boot ...`, `tern-guest ready`, `tern-guest hb <n> gap_us=<max>`,
//! `tern-guest check ok <pages>` / `tern-guest check FAIL page=<i> ...`, `tern-guest exit`; with
//! a disk: `tern-guest disk found addr=<hex> blocks=<n> queue=<N>`, `tern-guest disk ok
//! <verified> writes=<n>` / `tern-guest disk FAIL block=<i> ...`, and `tern-guest disk FAIL <why>`
//! or `tern-guest disk warning: <what>` when a device or request fails; with a net device:
//! `tern-guest net up mac=<aa:bb:cc:dd:ee:ff> ip=<a.b.c.d/len> queue=<N>` (or `tern-guest net
//! idle (no tern.ip=)`), `tern-guest net ok sink=<bytes> source=<bytes> rx_frames=<n>
//! tx_frames=<n>` once per check period (2 s if checks are off; totals since boot), `tern-guest
//! net sink closed bytes=<n>`, `tern-guest net source closed bytes=<n>` (acknowledged by the
//! peer) at the end of each connection, `tern-guest net announce <n>` after each announce,
//! `tern-guest net FAIL sink offset=<o> got=<b> want=<b>` (the first bad byte of a connection),
//! and `tern-guest net FAIL <why>` when the device or an announce fails.

#![no_std]
#![no_main]

mod boot;

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

const PAGE: u64 = 4096;
const WORDS: usize = 512;
const MAX_CPUS: usize = 32;
const MAX_RANGES: usize = 16;
/// Guest-physical memory below this holds the image, stacks and page tables.
const RAM_FLOOR: u64 = 16 << 20;
/// The static page tables map this much.
const RAM_CEIL: u64 = 64 << 30;

/// Written by a VMM that honours the "Tern" note: how many vCPUs run this guest.
#[no_mangle]
pub static tern_ncpus: AtomicU32 = AtomicU32::new(1);

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    Seq,
    Random,
    Hot,
}

#[derive(Clone, Copy)]
struct Range {
    base: u64,
    pages: u64,
}

#[derive(Clone, Copy)]
struct Config {
    ncpus: u64,
    wss_pages: u64,
    rate_pps: u64,
    pattern: Pattern,
    check_s: u64,
    hb_ms: u64,
    exit_s: u64,
    /// Words of each page that follow the incompressible pattern; the rest repeat one word.
    varied_words: usize,
    tsc_hz: u64,
    gen_base: u64,
    ranges: [Range; MAX_RANGES],
    nranges: usize,
}

/// Set by vCPU 0 before it raises `PHASE`, read by the others after.
static mut CONFIG: Config = Config {
    ncpus: 1,
    wss_pages: 0,
    rate_pps: 0,
    pattern: Pattern::Seq,
    check_s: 2,
    hb_ms: 100,
    exit_s: 0,
    varied_words: WORDS,
    tsc_hz: 0,
    gen_base: 0,
    ranges: [Range { base: 0, pages: 0 }; MAX_RANGES],
    nranges: 0,
};
/// 0 = booting, 1 = fill your pages, 2 = run.
static PHASE: AtomicU32 = AtomicU32::new(0);
static FILLED: AtomicU32 = AtomicU32::new(0);
static PRINT_LOCK: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    puts(b"tern-guest PANIC\n\0");
    loop {
        core::hint::spin_loop();
    }
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; CR4.TSD is clear so ring 3 may use it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Writes a NUL-terminated string to the serial port through the ring-0 #UD service.
fn puts(s: &[u8]) {
    while PRINT_LOCK
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    // SAFETY: the #UD handler reads the NUL-terminated string at %rsi, writes it to COM1 and
    // resumes after the ud2; it clobbers only %rax and %rsi.
    unsafe {
        core::arch::asm!("ud2", inout("rax") 0u64 => _, inout("rsi") s.as_ptr() => _);
    }
    PRINT_LOCK.store(false, Ordering::Release);
}

fn power_off() -> ! {
    // SAFETY: service 1 of the #UD handler writes the power-off port and does not return.
    unsafe {
        core::arch::asm!("ud2", in("rax") 1u64, options(noreturn));
    }
}

/// One output line, formatted on the stack.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }
    /// Prints the line; returns its length.
    fn send(mut self) -> usize {
        let end = self.len.min(self.buf.len() - 2);
        self.buf[end] = b'\n';
        self.buf[end + 1] = 0;
        puts(&self.buf[..end + 2]);
        end + 1
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() - 2 {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

macro_rules! say {
    ($($arg:tt)*) => {{
        let mut l = Line::new();
        let _ = write!(l, $($arg)*);
        l.send()
    }};
}

// After `say!`, which they use.
mod disk;
mod mmio;
mod net;
mod pages;
mod setup;

use pages::{fill_own, verify_page, Dirtier};

fn config() -> &'static Config {
    // SAFETY: CONFIG is written only by vCPU 0 before PHASE is raised with Release; every reader
    // got here after observing PHASE >= 1 with Acquire, and nobody writes it afterwards.
    unsafe { &*core::ptr::addr_of!(CONFIG) }
}

/// The first word of a page (or disk block) that does not match its generation's pattern.
struct Bad {
    page: u64,
    gen: u64,
    word: usize,
    got: u64,
    want: u64,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn muldiv(a: u64, b: u64, c: u64) -> u64 {
    (u128::from(a) * u128::from(b) / u128::from(c.max(1))) as u64
}

/// vCPU 0's duties: heartbeat, self-check, exit timer.
struct Monitor {
    hb: u64,
    hb_ticks: u64,
    next_hb: u64,
    last: u64,
    max_gap: u64,
    chk_pos: u64,
    chk_t0: u64,
    chk_bad: u64,
    first_bad: Option<Bad>,
    boot: u64,
    /// Cheapest print seen, in TSC ticks per byte (x16): printing exits to the VMM for every
    /// byte, so its own cost is not a stall, but a print that took longer than that was one.
    print_cost16: u64,
}

impl Monitor {
    /// Accounts for a print that started at `start` and wrote `len` bytes.
    fn printed(&mut self, start: u64, len: usize) {
        let end = rdtsc();
        let took = end.wrapping_sub(start);
        let len = len.max(1) as u64;
        self.print_cost16 = self.print_cost16.min(took * 16 / len);
        let stall = took.saturating_sub(self.print_cost16 * len / 16);
        if stall > self.max_gap {
            self.max_gap = stall;
        }
        self.last = end;
    }

    fn step(&mut self, cfg: &Config, now: u64) {
        let gap = now.wrapping_sub(self.last);
        if gap > self.max_gap {
            self.max_gap = gap;
        }
        self.last = now;

        if cfg.check_s > 0 {
            let period = cfg.check_s * cfg.tsc_hz;
            let due =
                muldiv(now.wrapping_sub(self.chk_t0), cfg.wss_pages, period).min(cfg.wss_pages);
            let until = due.min(self.chk_pos + 64);
            while self.chk_pos < until {
                if let Err(b) = verify_page(cfg, self.chk_pos) {
                    self.chk_bad += 1;
                    if self.first_bad.is_none() {
                        self.first_bad = Some(b);
                    }
                }
                self.chk_pos += 1;
            }
            if self.chk_pos >= cfg.wss_pages {
                let t = rdtsc();
                let n = match self.first_bad.take() {
                    None => say!("tern-guest check ok {}", cfg.wss_pages),
                    Some(b) => say!(
                        "tern-guest check FAIL page={} gen={} word={} got={:#x} want={:#x} bad_pages={} of {}",
                        b.page, b.gen, b.word, b.got, b.want, self.chk_bad, cfg.wss_pages
                    ),
                };
                self.chk_pos = 0;
                self.chk_bad = 0;
                self.chk_t0 += period;
                if now.wrapping_sub(self.chk_t0) > period {
                    self.chk_t0 = now;
                }
                self.printed(t, n);
            }
        }

        if now >= self.next_hb {
            self.hb += 1;
            let gap_us = muldiv(self.max_gap, 1_000_000, cfg.tsc_hz);
            self.max_gap = 0;
            let t = rdtsc();
            let n = say!("tern-guest hb {} gap_us={}", self.hb, gap_us);
            self.next_hb += self.hb_ticks;
            if self.next_hb < now {
                self.next_hb = now + self.hb_ticks;
            }
            self.printed(t, n);
        }

        if cfg.exit_s > 0 && now.wrapping_sub(self.boot) >= cfg.exit_s * cfg.tsc_hz {
            say!("tern-guest exit");
            power_off();
        }
    }
}

#[no_mangle]
pub extern "C" fn guest_main(cpu: u64, start_info: u64) -> ! {
    if cpu == 0 {
        let boot = rdtsc();
        let (mut disk, mut net) = setup::setup(start_info);
        PHASE.store(1, Ordering::Release);
        let cfg = config();
        fill_own(cfg, 0);
        FILLED.fetch_add(1, Ordering::AcqRel);
        while u64::from(FILLED.load(Ordering::Acquire)) < cfg.ncpus {
            core::hint::spin_loop();
        }
        let t = rdtsc();
        let n = say!("tern-guest ready");
        // The baseline cost of printing, at most 100 us a byte.
        let print_cost16 =
            (rdtsc().wrapping_sub(t) * 16 / n as u64).min(muldiv(1600, cfg.tsc_hz, 1_000_000));
        PHASE.store(2, Ordering::Release);
        let now = rdtsc();
        let mut mon = Monitor {
            hb: 0,
            hb_ticks: muldiv(cfg.hb_ms, cfg.tsc_hz, 1000),
            next_hb: now + muldiv(cfg.hb_ms, cfg.tsc_hz, 1000),
            last: now,
            max_gap: 0,
            chk_pos: 0,
            chk_t0: now,
            chk_bad: 0,
            first_bad: None,
            boot,
            print_cost16,
        };
        run(cfg, 0, Some(&mut mon), disk.as_mut(), net.as_mut());
    }
    while PHASE.load(Ordering::Acquire) < 1 {
        core::hint::spin_loop();
    }
    let cfg = config();
    if cpu >= cfg.ncpus {
        loop {
            core::hint::spin_loop();
        }
    }
    fill_own(cfg, cpu);
    FILLED.fetch_add(1, Ordering::AcqRel);
    while PHASE.load(Ordering::Acquire) < 2 {
        core::hint::spin_loop();
    }
    run(cfg, cpu, None, None, None)
}

/// vCPU 0 passes its Monitor and the disk and network, if any.
fn run(
    cfg: &Config,
    cpu: u64,
    mut mon: Option<&mut Monitor>,
    mut disk: Option<&mut disk::Disk>,
    mut net: Option<&mut net::Net>,
) -> ! {
    let mut d = Dirtier::new(cfg, cpu);
    loop {
        let now = rdtsc();
        d.step(cfg, now);
        if let Some(m) = mon.as_deref_mut() {
            m.step(cfg, now);
            if let Some(k) = disk.as_deref_mut() {
                k.step(cfg, m, now);
            }
            if let Some(n) = net.as_deref_mut() {
                n.step(cfg, m, now);
            }
        }
        core::hint::spin_loop();
    }
}

// The freestanding build has no libc: the memory routines the compiler calls, in string
// instructions so that the compiler cannot turn them back into calls to themselves.

/// # Safety
/// As C's `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes valid, non-overlapping buffers of `n` bytes.
    unsafe {
        core::arch::asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _,
            inout("rcx") n => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is safe when dst is below src or the buffers do not overlap.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy with the direction flag set, cleared again before returning.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld", inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _, inout("rcx") n => _, options(nostack));
    }
    dst
}

/// # Safety
/// As C's `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid buffer of `n` bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _,
            in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: both buffers are `n` bytes long.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As C's `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
