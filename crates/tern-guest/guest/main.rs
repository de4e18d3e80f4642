//! The tern test guest, ring-3 part.
//!
//! Knobs (kernel command line): `tern.wss=<MiB>` working set (256), `tern.rate=<MiB/s>` pages
//! dirtied per second over all vCPUs (0), `tern.pattern=seq|random|hot` (seq; hot = 90% of writes
//! to 10% of the set), `tern.check=<s>` self-check period (2; 0 = off), `tern.hb=<ms>` heartbeat
//! period (100), `tern.exit=<s>` power off after that many seconds (0 = never), `tern.tsc_khz=`
//! (override; otherwise read from kvmclock), `tern.entropy=<0..100>` how much of each page is
//! incompressible (100; the rest of the page repeats one word, so that compression has
//! something to gain: 0 compresses about a hundredfold, 50 about twofold).
//!
//! Every page of the working set holds a pattern derived from (page index, generation); the
//! generations live in a table in guest RAM, updated like a seqlock (odd while the page is being
//! rewritten). Page `i` is written only by vCPU `i % ncpus`; vCPU 0 also prints the heartbeat and
//! verifies every page once per check period, a slice at a time so that it never stalls.
//!
//! Output lines: `tern-guest boot ...`, `tern-guest ready`, `tern-guest hb <n> gap_us=<max>`,
//! `tern-guest check ok <pages>` / `tern-guest check FAIL page=<i> ...`, `tern-guest exit`.

#![no_std]
#![no_main]

mod boot;

use core::fmt::Write;
use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};

const PAGE: u64 = 4096;
const WORDS: usize = 512;
const MAX_CPUS: usize = 32;
const MAX_RANGES: usize = 16;
/// Guest-physical memory below this holds the image, stacks and page tables.
const RAM_FLOOR: u64 = 16 << 20;
/// The static page tables map this much.
const RAM_CEIL: u64 = 64 << 30;
const E820_RAM: u32 = 1;

/// Written by a VMM that honours the "Tern" note: how many vCPUs run this guest.
#[no_mangle]
pub static tern_ncpus: AtomicU32 = AtomicU32::new(1);

extern "C" {
    static kvmclock_area: [u32; 16];
}

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
        Line { buf: [0; 256], len: 0 }
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

/// The C string at a guest-physical address (identity-mapped, user-accessible).
fn cstr(addr: u64) -> &'static [u8] {
    if addr == 0 {
        return &[];
    }
    let p = addr as *const u8;
    let mut n = 0;
    // SAFETY: the VMM placed a NUL-terminated command line at `addr` in RAM; we stop at 4 KiB.
    unsafe {
        while n < 4096 && *p.add(n) != 0 {
            n += 1;
        }
        core::slice::from_raw_parts(p, n)
    }
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(v)
}

struct Knobs {
    wss_mib: u64,
    rate_mib: u64,
    pattern: Pattern,
    check_s: u64,
    hb_ms: u64,
    exit_s: u64,
    tsc_khz: u64,
    entropy: u64,
}

fn parse_cmdline(cmd: &[u8]) -> Knobs {
    let mut k = Knobs {
        wss_mib: 256,
        rate_mib: 0,
        pattern: Pattern::Seq,
        check_s: 2,
        hb_ms: 100,
        exit_s: 0,
        tsc_khz: 0,
        entropy: 100,
    };
    for word in cmd.split(|&c| c == b' ' || c == b'\t' || c == b'\n') {
        let Some(eq) = word.iter().position(|&c| c == b'=') else {
            continue;
        };
        let (key, val) = (&word[..eq], &word[eq + 1..]);
        let num = parse_u64(val);
        match (key, num) {
            (b"tern.wss", Some(v)) => k.wss_mib = v,
            (b"tern.rate", Some(v)) => k.rate_mib = v,
            (b"tern.check", Some(v)) => k.check_s = v,
            (b"tern.hb", Some(v)) if v > 0 => k.hb_ms = v,
            (b"tern.exit", Some(v)) => k.exit_s = v,
            (b"tern.tsc_khz", Some(v)) => k.tsc_khz = v,
            (b"tern.entropy", Some(v)) if v <= 100 => k.entropy = v,
            (b"tern.pattern", _) => match val {
                b"seq" => k.pattern = Pattern::Seq,
                b"random" => k.pattern = Pattern::Random,
                b"hot" => k.pattern = Pattern::Hot,
                _ => {
                    say!("tern-guest warning: unknown tern.pattern, using seq");
                }
            },
            _ if key.starts_with(b"tern.") => {
                say!("tern-guest warning: ignoring a bad or unknown tern.* option");
            }
            _ => {}
        }
    }
    k
}

/// The TSC frequency from the kvmclock page that ring 0 registered at boot.
fn kvmclock_tsc_hz() -> Option<u64> {
    // SAFETY: kvmclock_area is a 64-byte static the hypervisor writes a pvclock_vcpu_time_info
    // into; we only read it.
    let area = unsafe { core::ptr::addr_of!(kvmclock_area) as *const u32 };
    for _ in 0..1_000_000 {
        // SAFETY: in bounds of the 64-byte area; volatile because the hypervisor writes it.
        let (version, mul, shift) = unsafe {
            (
                area.read_volatile(),
                area.add(6).read_volatile(),
                (area.add(7).read_volatile() & 0xff) as u8 as i8,
            )
        };
        if version != 0 && version & 1 == 0 && mul != 0 {
            let base = (1_000_000_000u128 << 32) / u128::from(mul);
            let hz = if shift >= 0 {
                base >> shift
            } else {
                base << (-shift)
            };
            return u64::try_from(hz).ok();
        }
        core::hint::spin_loop();
    }
    None
}

fn config() -> &'static Config {
    // SAFETY: CONFIG is written only by vCPU 0 before PHASE is raised with Release; every reader
    // got here after observing PHASE >= 1 with Acquire, and nobody writes it afterwards.
    unsafe { &*core::ptr::addr_of!(CONFIG) }
}

impl Config {
    fn page_addr(&self, mut i: u64) -> u64 {
        for r in &self.ranges[..self.nranges] {
            if i < r.pages {
                return r.base + i * PAGE;
            }
            i -= r.pages;
        }
        unreachable!()
    }
    fn gen(&self, i: u64) -> &'static AtomicU64 {
        // SAFETY: the generation table holds wss_pages u64s at gen_base, in RAM we own.
        unsafe { &*((self.gen_base + i * 8) as *const AtomicU64) }
    }
}

fn pattern_base(i: u64, g: u64) -> u64 {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ g.wrapping_add(0x632b_e59b_d9b4_e019)
            .wrapping_mul(0xd6e8_feb8_6659_fd93);
    x ^= x >> 31;
    x | 1
}
const WORD_STEP: u64 = 0xa076_1d64_78bd_642f;

/// Word `j` of a page whose pattern starts at `base`: the first `varied` words step through
/// values no compressor can predict, the rest repeat `base` (never zero: `base` is odd).
fn word(base: u64, j: usize, varied: usize) -> u64 {
    if j < varied {
        base.wrapping_add(j as u64 * WORD_STEP)
    } else {
        base
    }
}

fn fill_page(cfg: &Config, addr: u64, i: u64, g: u64) {
    let p = addr as *mut u64;
    let base = pattern_base(i, g);
    for j in 0..WORDS {
        // SAFETY: `addr` is a page of the working set, owned by the calling vCPU.
        unsafe { p.add(j).write(word(base, j, cfg.varied_words)) };
    }
}

/// Rewrites page `i` with its next generation (only its owner calls this).
fn dirty_page(cfg: &Config, i: u64) {
    let gen = cfg.gen(i);
    let g = gen.load(Ordering::Relaxed);
    gen.store(g + 1, Ordering::Relaxed);
    fence(Ordering::Release);
    fill_page(cfg, cfg.page_addr(i), i, g + 2);
    gen.store(g + 2, Ordering::Release);
}

struct Bad {
    page: u64,
    gen: u64,
    word: usize,
    got: u64,
    want: u64,
}

/// Checks page `i` against its generation; retries while its owner rewrites it.
fn verify_page(cfg: &Config, i: u64) -> Result<(), Bad> {
    let gen = cfg.gen(i);
    let addr = cfg.page_addr(i) as *const u64;
    let start = rdtsc();
    loop {
        let g1 = gen.load(Ordering::Acquire);
        let base = pattern_base(i, g1);
        let mut bad = None;
        if g1 & 1 == 0 {
            for j in 0..WORDS {
                // SAFETY: a page of the working set; a concurrent writer is detected below.
                let got = unsafe { addr.add(j).read() };
                let want = word(base, j, cfg.varied_words);
                if got != want {
                    bad = Some(Bad { page: i, gen: g1, word: j, got, want });
                    break;
                }
            }
            fence(Ordering::Acquire);
            if gen.load(Ordering::Relaxed) == g1 {
                return bad.map_or(Ok(()), Err);
            }
        }
        if rdtsc().wrapping_sub(start) > 2 * cfg.tsc_hz {
            return Err(Bad { page: i, gen: g1, word: 0, got: 0, want: 0 });
        }
        core::hint::spin_loop();
    }
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

/// The pages vCPU `cpu` owns: `cpu, cpu + n, cpu + 2n, ...`.
fn owned(cfg: &Config, cpu: u64) -> u64 {
    if cpu >= cfg.wss_pages {
        0
    } else {
        (cfg.wss_pages - cpu).div_ceil(cfg.ncpus)
    }
}

fn muldiv(a: u64, b: u64, c: u64) -> u64 {
    (u128::from(a) * u128::from(b) / u128::from(c.max(1))) as u64
}

fn setup(start_info: u64) {
    let ncpus = u64::from(tern_ncpus.load(Ordering::Relaxed).clamp(1, MAX_CPUS as u32));
    // SAFETY: start_info was placed in RAM by the VMM (PVH); hvm_start_info layout.
    let (cmdline_paddr, memmap_paddr, memmap_entries) = unsafe {
        let si = start_info as *const u64;
        let entries = *((start_info + 48) as *const u32);
        (*si.add(3), *si.add(5), entries.min(128))
    };
    let knobs = parse_cmdline(cstr(cmdline_paddr));
    let (tsc_hz, tsc_src) = if knobs.tsc_khz > 0 {
        (knobs.tsc_khz * 1000, "cmdline")
    } else if let Some(hz) = kvmclock_tsc_hz() {
        (hz, "kvmclock")
    } else {
        (2_000_000_000, "guess")
    };

    // Usable RAM above the floor, page-aligned.
    let mut ranges = [Range { base: 0, pages: 0 }; MAX_RANGES];
    let mut nranges = 0;
    let mut ram_top = 0;
    for e in 0..memmap_entries as u64 {
        // SAFETY: hvm_memmap_table_entry {addr u64, size u64, type u32, reserved u32}.
        let (addr, size, ty) = unsafe {
            let p = (memmap_paddr + e * 24) as *const u64;
            (*p, *p.add(1), *(p.add(2) as *const u32))
        };
        if ty != E820_RAM {
            continue;
        }
        ram_top = ram_top.max(addr.saturating_add(size));
        let lo = addr.max(RAM_FLOOR).next_multiple_of(PAGE);
        let hi = addr.saturating_add(size).min(RAM_CEIL) & !(PAGE - 1);
        if hi > lo && nranges < MAX_RANGES {
            ranges[nranges] = Range { base: lo, pages: (hi - lo) / PAGE };
            nranges += 1;
        }
    }
    let avail: u64 = ranges[..nranges].iter().map(|r| r.pages).sum();
    // Each working-set page costs a page of data and 8 bytes of generation table.
    let max_pages = (avail * PAGE / (PAGE + 8)).saturating_sub(1);
    let mut wss_pages = knobs.wss_mib * 256;
    if wss_pages > max_pages {
        say!(
            "tern-guest warning: tern.wss={} MiB does not fit, using {} MiB",
            knobs.wss_mib,
            max_pages / 256
        );
        wss_pages = max_pages;
    }
    // The generation table comes first, carved from the first range(s) large enough.
    let table_pages = (wss_pages * 8).div_ceil(PAGE);
    let mut gen_base = 0;
    for r in ranges[..nranges].iter_mut() {
        if r.pages >= table_pages {
            gen_base = r.base;
            r.base += table_pages * PAGE;
            r.pages -= table_pages;
            break;
        }
    }
    if gen_base == 0 {
        say!("tern-guest FAIL no room for the generation table");
        power_off();
    }
    // SAFETY: only vCPU 0 runs here, before PHASE lets the others read CONFIG.
    unsafe {
        *core::ptr::addr_of_mut!(CONFIG) = Config {
            ncpus,
            wss_pages,
            rate_pps: knobs.rate_mib * 256,
            pattern: knobs.pattern,
            check_s: knobs.check_s,
            hb_ms: knobs.hb_ms,
            exit_s: knobs.exit_s,
            varied_words: WORDS * knobs.entropy as usize / 100,
            tsc_hz,
            gen_base,
            ranges,
            nranges,
        };
    }
    let pat = match knobs.pattern {
        Pattern::Seq => "seq",
        Pattern::Random => "random",
        Pattern::Hot => "hot",
    };
    say!(
        "tern-guest boot cpus={} ram_top_mib={} wss_mib={} rate={} pattern={} check={} hb={} tsc_khz={} ({}) entropy={}",
        ncpus,
        ram_top >> 20,
        wss_pages / 256,
        knobs.rate_mib,
        pat,
        knobs.check_s,
        knobs.hb_ms,
        tsc_hz / 1000,
        tsc_src,
        knobs.entropy
    );
}

fn fill_own(cfg: &Config, cpu: u64) {
    let n = owned(cfg, cpu);
    for j in 0..n {
        let i = j * cfg.ncpus + cpu;
        cfg.gen(i).store(0, Ordering::Relaxed);
        fill_page(cfg, cfg.page_addr(i), i, 0);
    }
    fence(Ordering::Release);
}

/// Per-vCPU state of the dirtying loop.
struct Dirtier {
    cpu: u64,
    own: u64,
    next: u64,
    rng: Rng,
    t0: u64,
    done: u64,
}

impl Dirtier {
    fn pick(&mut self, cfg: &Config) -> u64 {
        let j = match cfg.pattern {
            Pattern::Seq => {
                let j = self.next;
                self.next = (self.next + 1) % self.own;
                j
            }
            Pattern::Random => self.rng.next() % self.own,
            Pattern::Hot => {
                let r = self.rng.next();
                let hot = (self.own / 10).max(1);
                if r % 10 != 0 {
                    (r >> 8) % hot
                } else {
                    (r >> 8) % self.own
                }
            }
        };
        j * cfg.ncpus + self.cpu
    }

    /// Dirties what is due by `now`, at most a small batch; after a stall (the VM was paused,
    /// or the host ran something else) it skips ahead instead of bursting.
    fn step(&mut self, cfg: &Config, now: u64) {
        if cfg.rate_pps == 0 || self.own == 0 {
            return;
        }
        let due = muldiv(now.wrapping_sub(self.t0), cfg.rate_pps, cfg.tsc_hz * cfg.ncpus);
        let slack = (cfg.rate_pps / cfg.ncpus / 100).max(64);
        if due > self.done + slack {
            self.done = due - slack / 2;
        }
        let n = due.saturating_sub(self.done).min(64);
        for _ in 0..n {
            let i = self.pick(cfg);
            dirty_page(cfg, i);
        }
        self.done += n;
    }
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
            let due = muldiv(now.wrapping_sub(self.chk_t0), cfg.wss_pages, period).min(cfg.wss_pages);
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
        setup(start_info);
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
        let print_cost16 = (rdtsc().wrapping_sub(t) * 16 / n as u64).min(muldiv(1600, cfg.tsc_hz, 1_000_000));
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
        run(cfg, 0, Some(&mut mon));
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
    run(cfg, cpu, None)
}

fn run(cfg: &Config, cpu: u64, mut mon: Option<&mut Monitor>) -> ! {
    let mut d = Dirtier {
        cpu,
        own: owned(cfg, cpu),
        next: 0,
        rng: Rng(0x2545_f491_4f6c_dd1d ^ (cpu + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        t0: rdtsc(),
        done: 0,
    };
    loop {
        let now = rdtsc();
        d.step(cfg, now);
        if let Some(m) = mon.as_deref_mut() {
            m.step(cfg, now);
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
