//! The disk workload and its self-check, driven by vCPU 0 through the driver in `disk.rs`.
//!
//! Block `b` (4 KiB, sectors 8b..8b+8) holds the pattern of page `b ^ SALT` at its generation;
//! generation 0 means never written by this guest. A table entry is the generation, with `BUSY`
//! set while a request on the block is in flight.

use core::fmt::Write;
use core::ptr::read_volatile;
use core::sync::atomic::{fence, Ordering};

use super::Disk;
use crate::pages::{pattern_base, word};
use crate::{muldiv, rdtsc, Bad, Config, Line, Monitor, Pattern, WORDS};

/// Xored into a block index so that a block's pattern is never a RAM page's.
const SALT: u64 = 0xd15c_b10c_0000_0000;
const BUSY: u64 = 1 << 63;
const GEN_MASK: u64 = (1 << 62) - 1;
/// The self-check reads at most 64 MiB/s (in blocks).
const READ_RATE: u64 = 64 * 256;
/// Table entries the self-check looks at per step, at most.
const SCAN: u64 = 4096;
const STUCK_S: u64 = 30;
/// FAIL lines printed from `step` (other than the pass results) before going quiet.
const MAX_FAILS: u32 = 32;

/// Prints a line from the disk path, accounted like the Monitor's own prints.
macro_rules! report {
    ($mon:expr, $($arg:tt)*) => {{
        let t = rdtsc();
        let n = say!($($arg)*);
        $mon.printed(t, n);
    }};
}

/// Paces work at a rate like `Dirtier::step`: skips ahead after a stall, never bursts.
pub struct Pacer {
    pub t0: u64,
    pub done: u64,
}

impl Pacer {
    /// How many are due by `now` (at most 64); the caller adds what it did to `done`.
    fn due(&mut self, rate: u64, tsc_hz: u64, now: u64) -> u64 {
        let due = muldiv(now.wrapping_sub(self.t0), rate, tsc_hz);
        let slack = (rate / 100).max(64);
        if due > self.done + slack {
            self.done = due - slack / 2;
        }
        due.saturating_sub(self.done).min(64)
    }
}

impl Disk {
    fn entry(&self, b: u64) -> *mut u64 {
        (self.table + b * 8) as *mut u64
    }
    fn get(&self, b: u64) -> u64 {
        // SAFETY: b < blocks: an entry of the generation table in the disk area, touched only
        // by vCPU 0.
        unsafe { self.entry(b).read() }
    }
    fn set(&self, b: u64, v: u64) {
        // SAFETY: as in `get`.
        unsafe { self.entry(b).write(v) }
    }

    /// Whether another FAIL line may be printed from `step`.
    fn may_fail(&mut self, mon: &mut Monitor) -> bool {
        self.fails += 1;
        if self.fails == MAX_FAILS {
            report!(
                mon,
                "tern-guest disk FAIL too many failures, printing no more"
            );
        }
        self.fails < MAX_FAILS
    }

    fn pick(&mut self, cfg: &Config) -> u64 {
        match cfg.pattern {
            Pattern::Seq => {
                let b = self.next;
                self.next = (self.next + 1) % self.blocks;
                b
            }
            Pattern::Random => self.rng.next() % self.blocks,
            Pattern::Hot => {
                let r = self.rng.next();
                let hot = (self.blocks / 10).max(1);
                if !r.is_multiple_of(10) {
                    (r >> 8) % hot
                } else {
                    (r >> 8) % self.blocks
                }
            }
        }
    }

    /// One round of vCPU 0's disk duties: completions, the self-check, writes, stuck requests.
    /// Bounded: at most `qsize` completions, `slots` submissions and `SCAN` table entries.
    pub fn step(&mut self, cfg: &Config, mon: &mut Monitor, now: u64) {
        if !self.started {
            self.started = true;
            self.wpace.t0 = now;
            self.rpace.t0 = now;
            self.pass_t0 = now;
        }
        self.complete(cfg, mon);
        let mut added = false;
        if cfg.check_s > 0 {
            added |= self.check(cfg, mon, now);
        }
        if self.rate > 0 {
            added |= self.write_due(cfg, now);
        }
        if added {
            self.publish();
        }
        for s in 0..self.slots {
            let sl = self.slot[s];
            if sl.busy && !sl.stuck && now.wrapping_sub(sl.t) > STUCK_S * cfg.tsc_hz {
                self.slot[s].stuck = true;
                if self.may_fail(mon) {
                    report!(
                        mon,
                        "tern-guest disk FAIL stuck slot={} block={}",
                        s,
                        sl.block
                    );
                }
            }
        }
    }

    fn complete(&mut self, cfg: &Config, mon: &mut Monitor) {
        // SAFETY: the used ring's idx, in the disk area; the device writes it.
        let used_idx = unsafe { read_volatile((self.used + 2) as *const u16) };
        fence(Ordering::Acquire);
        let mut n = 0;
        while self.last_used != used_idx && n < self.qsize {
            let e = self.used + 4 + 8 * u64::from(self.last_used % self.qsize);
            // SAFETY: a used ring element in the disk area, published by the device.
            let id = unsafe { read_volatile(e as *const u32) };
            self.last_used = self.last_used.wrapping_add(1);
            n += 1;
            let s = (id / 3) as usize;
            if id % 3 != 0 || s >= self.slots {
                if self.may_fail(mon) {
                    report!(mon, "tern-guest disk FAIL bad completion id={}", id);
                }
                continue;
            }
            let sl = self.slot[s];
            if !sl.busy {
                if self.may_fail(mon) {
                    report!(mon, "tern-guest disk FAIL duplicate completion slot={}", s);
                }
                continue;
            }
            self.slot[s].busy = false;
            // SAFETY: slot s's status byte in the disk area, written by the device.
            let status = unsafe { read_volatile(self.status(s)) };
            if sl.write {
                // A failed write leaves the block unknown: not checked until rewritten.
                self.set(sl.block, if status == 0 { sl.gen } else { 0 });
                self.writes += u64::from(status == 0);
            } else {
                self.reads -= 1;
                self.set(sl.block, sl.gen);
                if status == 0 {
                    self.verify(cfg, s, sl.block, sl.gen);
                }
            }
            if status != 0 && self.may_fail(mon) {
                let op = if sl.write { "write" } else { "read" };
                report!(
                    mon,
                    "tern-guest disk FAIL status={} block={} op={}",
                    status,
                    sl.block,
                    op
                );
            }
        }
    }

    fn verify(&mut self, cfg: &Config, s: usize, b: u64, g: u64) {
        let p = self.buf(s);
        let base = pattern_base(b ^ SALT, g);
        self.verified += 1;
        for j in 0..WORDS {
            // SAFETY: slot s's buffer in the disk area; the device completed the read into it.
            let got = unsafe { read_volatile(p.add(j)) };
            let want = word(base, j, cfg.varied_words);
            if got != want {
                self.bad += 1;
                if self.first_bad.is_none() {
                    self.first_bad = Some(Bad {
                        page: b,
                        gen: g,
                        word: j,
                        got,
                        want,
                    });
                }
                return;
            }
        }
    }

    /// Issues the self-check's reads that are due; ends the pass when it covered every block.
    fn check(&mut self, cfg: &Config, mon: &mut Monitor, now: u64) -> bool {
        let mut added = false;
        let mut due = self.rpace.due(READ_RATE, cfg.tsc_hz, now);
        let cap = (self.slots / 2).max(1);
        let end = self.blocks.min(self.pos + SCAN);
        while self.pos < end && due > 0 && self.reads < cap {
            let b = self.pos;
            let e = self.get(b);
            if e & BUSY == 0 && e != 0 {
                let Some(s) = self.free_slot() else { break };
                self.set(b, e | BUSY);
                self.submit(s, false, b, e, now);
                self.reads += 1;
                self.rpace.done += 1;
                due -= 1;
                added = true;
            }
            self.pos += 1;
        }
        if self.pos >= self.blocks
            && self.reads == 0
            && now.wrapping_sub(self.pass_t0) >= cfg.check_s * cfg.tsc_hz
        {
            match self.first_bad.take() {
                None => report!(mon, "tern-guest disk ok {} writes={}", self.verified, self.writes),
                Some(b) => report!(
                    mon,
                    "tern-guest disk FAIL block={} gen={} word={} got={:#x} want={:#x} bad_blocks={} of {}",
                    b.page, b.gen, b.word, b.got, b.want, self.bad, self.verified
                ),
            }
            self.pos = 0;
            self.verified = 0;
            self.bad = 0;
            self.pass_t0 = now;
        }
        added
    }

    /// Issues the writes that are due.
    fn write_due(&mut self, cfg: &Config, now: u64) -> bool {
        let mut added = false;
        for _ in 0..self.wpace.due(self.rate, cfg.tsc_hz, now) {
            let Some(s) = self.free_slot() else { break };
            let b = self.pick(cfg);
            self.wpace.done += 1;
            let e = self.get(b);
            if e & BUSY != 0 {
                continue;
            }
            let g = (e & GEN_MASK) + 1;
            let p = self.buf(s);
            let base = pattern_base(b ^ SALT, g);
            for j in 0..WORDS {
                // SAFETY: slot s's buffer in the disk area; the slot is not in flight, so the
                // device does not touch it.
                unsafe { p.add(j).write(word(base, j, cfg.varied_words)) };
            }
            self.set(b, g | BUSY);
            self.submit(s, true, b, g, now);
            added = true;
        }
        added
    }
}
