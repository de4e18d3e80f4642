//! vCPU 0's setup: the knobs from the kernel command line, the TSC frequency and the memory
//! layout, published as CONFIG.

use core::fmt::Write;
use core::sync::atomic::Ordering;

use crate::{
    disk, mmio, net, power_off, tern_ncpus, Config, Line, Pattern, Range, CONFIG, MAX_CPUS,
    MAX_RANGES, PAGE, RAM_CEIL, RAM_FLOOR, WORDS,
};

const E820_RAM: u32 = 1;

extern "C" {
    /// Defined in boot.rs, which registers it with KVM as the kvmclock page.
    static kvmclock_area: [u32; 16];
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
    disk_rate: u64,
    devs: mmio::Devs,
    /// `tern.ip=A.B.C.D/LEN` and `tern.gw=A.B.C.D`.
    ip: Option<([u8; 4], u8)>,
    gw: Option<[u8; 4]>,
}

/// `A.B.C.D`.
fn parse_ipv4(s: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0; 4];
    let mut parts = s.split(|&c| c == b'.');
    for b in &mut ip {
        let part = parts.next()?;
        if part.len() > 3 {
            return None;
        }
        *b = u8::try_from(parse_u64(part)?).ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// `A.B.C.D/LEN`.
fn parse_cidr(s: &[u8]) -> Option<([u8; 4], u8)> {
    let slash = s.iter().position(|&c| c == b'/')?;
    let len = parse_u64(&s[slash + 1..]).filter(|&l| l <= 32)?;
    Some((parse_ipv4(&s[..slash])?, len as u8))
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
        disk_rate: 0,
        devs: mmio::Devs::new(),
        ip: None,
        gw: None,
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
            (b"tern.disk_rate", Some(v)) => k.disk_rate = v,
            (b"virtio_mmio.device", _) => k.devs.add(val),
            (b"tern.ip", _) if parse_cidr(val).is_some() => k.ip = parse_cidr(val),
            (b"tern.gw", _) if parse_ipv4(val).is_some() => k.gw = parse_ipv4(val),
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
    // kvmclock_area is a 64-byte static the hypervisor writes a pvclock_vcpu_time_info into; we
    // only read it (taking its address needs no `unsafe`).
    let area = core::ptr::addr_of!(kvmclock_area) as *const u32;
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

/// Takes `pages` pages from the start of the first range that has them.
pub fn carve(ranges: &mut [Range], pages: u64) -> Option<u64> {
    let r = ranges.iter_mut().find(|r| r.pages >= pages)?;
    let base = r.base;
    r.base += pages * PAGE;
    r.pages -= pages;
    Some(base)
}

/// Lays out memory and publishes CONFIG; returns the disk and the network, if there are.
pub fn setup(start_info: u64) -> (Option<disk::Disk>, Option<net::Net>) {
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
            ranges[nranges] = Range {
                base: lo,
                pages: (hi - lo) / PAGE,
            };
            nranges += 1;
        }
    }
    // The disk and net areas first, so that the working set is what is left.
    let disk = disk::probe(&knobs.devs, knobs.disk_rate, &mut ranges[..nranges]);
    let net = net::probe(
        &knobs.devs,
        knobs.ip,
        knobs.gw,
        tsc_hz,
        &mut ranges[..nranges],
    );
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
    let Some(gen_base) = carve(&mut ranges[..nranges], (wss_pages * 8).div_ceil(PAGE)) else {
        say!("tern-guest FAIL no room for the generation table");
        power_off();
    };
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
        "tern-guest boot cpus={} ram_top_mib={} wss_mib={} rate={} pattern={} check={} hb={} tsc_khz={} ({}) entropy={} disk_rate={}",
        ncpus,
        ram_top >> 20,
        wss_pages / 256,
        knobs.rate_mib,
        pat,
        knobs.check_s,
        knobs.hb_ms,
        tsc_hz / 1000,
        tsc_src,
        knobs.entropy,
        knobs.disk_rate
    );
    if let Some(d) = &disk {
        d.announce();
    }
    if let Some(n) = &net {
        n.print_up();
    }
    (disk, net)
}
