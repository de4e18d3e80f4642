//! The working set's pages: the pattern each holds, and how their owners fill and dirty them and
//! vCPU 0 checks them.

use core::sync::atomic::{fence, AtomicU64, Ordering};

use crate::{muldiv, rdtsc, Bad, Config, Pattern, Rng, PAGE, WORDS};

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

pub fn pattern_base(i: u64, g: u64) -> u64 {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ g.wrapping_add(0x632b_e59b_d9b4_e019)
            .wrapping_mul(0xd6e8_feb8_6659_fd93);
    x ^= x >> 31;
    x | 1
}
const WORD_STEP: u64 = 0xa076_1d64_78bd_642f;

/// Word `j` of a page whose pattern starts at `base`: the first `varied` words step through
/// values no compressor can predict, the rest repeat `base` (never zero: `base` is odd).
pub fn word(base: u64, j: usize, varied: usize) -> u64 {
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

/// Checks page `i` against its generation; retries while its owner rewrites it.
pub fn verify_page(cfg: &Config, i: u64) -> Result<(), Bad> {
    let gen = cfg.gen(i);
    let addr = cfg.page_addr(i) as *const u64;
    // How long this check has waited for a writer, counted only while this vCPU ran: a step
    // of over 10 ms is the VM paused (a migration's switch, a `-S` target waiting for `cont`)
    // or the vCPU descheduled, and the writer could not have finished then either. Counting
    // wall time instead reported a writer caught mid-page by the pause as stuck whenever the
    // pause outlasted 2 s.
    let (mut waited, mut prev) = (0u64, rdtsc());
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
                    bad = Some(Bad {
                        page: i,
                        gen: g1,
                        word: j,
                        got,
                        want,
                    });
                    break;
                }
            }
            fence(Ordering::Acquire);
            if gen.load(Ordering::Relaxed) == g1 {
                return bad.map_or(Ok(()), Err);
            }
        }
        let now = rdtsc();
        let step = now.wrapping_sub(prev);
        prev = now;
        if step < cfg.tsc_hz / 100 {
            waited += step;
        }
        if waited > 2 * cfg.tsc_hz {
            return Err(Bad {
                page: i,
                gen: g1,
                word: 0,
                got: 0,
                want: 0,
            });
        }
        core::hint::spin_loop();
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

pub fn fill_own(cfg: &Config, cpu: u64) {
    let n = owned(cfg, cpu);
    for j in 0..n {
        let i = j * cfg.ncpus + cpu;
        cfg.gen(i).store(0, Ordering::Relaxed);
        fill_page(cfg, cfg.page_addr(i), i, 0);
    }
    fence(Ordering::Release);
}

/// Per-vCPU state of the dirtying loop.
pub struct Dirtier {
    cpu: u64,
    own: u64,
    next: u64,
    rng: Rng,
    t0: u64,
    done: u64,
}

impl Dirtier {
    /// vCPU `cpu`'s dirtier, pacing from now.
    pub fn new(cfg: &Config, cpu: u64) -> Self {
        Dirtier {
            cpu,
            own: owned(cfg, cpu),
            next: 0,
            rng: Rng(0x2545_f491_4f6c_dd1d ^ (cpu + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            t0: rdtsc(),
            done: 0,
        }
    }

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
                if !r.is_multiple_of(10) {
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
    pub fn step(&mut self, cfg: &Config, now: u64) {
        if cfg.rate_pps == 0 || self.own == 0 {
            return;
        }
        let due = muldiv(
            now.wrapping_sub(self.t0),
            cfg.rate_pps,
            cfg.tsc_hz * cfg.ncpus,
        );
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
