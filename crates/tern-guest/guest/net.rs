//! A ring-3 virtio-net driver (virtio-mmio version 2, split queues, polled) and the network
//! workload that vCPU 0 drives with it over smoltcp: ICMP echo and ARP (answered by smoltcp), a
//! TCP sink on port 5001 and a TCP source on port 5002 (see `tcp`), and the guest side of
//! VIRTIO_NET_F_GUEST_ANNOUNCE (a gratuitous ARP after a migration). The device's discovery and
//! registers are in `crate::mmio`, a virtqueue in `vq`, the data queues as smoltcp's device in
//! `phy`, the set-up and the control queue here.
//!
//! Features accepted (whatever else the device offers is declined, so that the same driver works
//! with tern's device and QEMU's): VERSION_1 (required), MAC, STATUS, CTRL_VQ and GUEST_ANNOUNCE
//! (the latter only with CTRL_VQ and STATUS). Queues: 0 receive, 1 transmit, 2 control (with
//! CTRL_VQ).
//!
//! The net area, carved from RAM before the working set (after the disk's), page-aligned: three
//! pages per queue (see `vq`), with a control queue one more page for its command (2 bytes at
//! offset 0, the ack byte at 64), then 2 KiB per receive buffer and per transmit slot. The
//! sockets and their buffers are statics.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use smoltcp::iface::{
    Config as IfaceConfig, Interface, PollIngressSingleResult, PollResult, SocketSet, SocketStorage,
};
use smoltcp::socket::tcp::{Socket, SocketBuffer};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address, Ipv4Cidr};

use crate::mmio::{
    self, Regs, ACKNOWLEDGE, CONFIG, CONFIG_GENERATION, DEVICE_FEATURES, DRIVER, DRIVER_FEATURES,
    DRIVER_FEATURES_SEL, DRIVER_OK, FAILED, FEATURES_OK, ID_NET, NEEDS_RESET, STATUS,
};
use crate::setup::carve;
use crate::{muldiv, rdtsc, Config, Line, Monitor, Range, PAGE};

/// Prints a line from the network path, accounted like the Monitor's own prints.
macro_rules! report {
    ($mon:expr, $($arg:tt)*) => {{
        let t = rdtsc();
        let n = say!($($arg)*);
        $mon.printed(t, n);
    }};
}

// After `report!`, which they use.
mod kick;
mod phy;
mod tcp;
mod vq;

use phy::{Phy, Rx, Tx, BUF, GARP_LEN};
use tcp::{Sink, Source};
use vq::{queue_size, Vq, DESC_F_NEXT, DESC_F_WRITE, MAX_QUEUE, VQ_PAGES};

// Feature word 0.
const F_MAC: u32 = 1 << 5;
const F_STATUS: u32 = 1 << 16;
const F_CTRL_VQ: u32 = 1 << 17;
const F_GUEST_ANNOUNCE: u32 = 1 << 21;

// The device configuration: mac[6], then status (u16), read as two aligned 32-bit words. The
// spec asks for accesses as wide as the field, but on this host a 16-bit MMIO load from ring 3
// took 4-8 ms under QEMU where a 32-bit one took a few microseconds, and tern's device and QEMU's
// answer any width. The status is the upper half of the second word.
const S_ANNOUNCE: u32 = 2 << 16;

const CTRL_QUEUE: u32 = 8;
const CLASS_ANNOUNCE: u8 = 3;
const CMD_ANNOUNCE_ACK: u8 = 0;
const CTRL_OK: u8 = 0;

/// How often the config status is read for ANNOUNCE (each read is an exit).
const STATUS_POLL_MS: u64 = 20;
/// How long after a pause the status is polled every millisecond.
const QUICK_POLL_MS: u64 = 100;
/// How long a control command may take.
const CTRL_TIMEOUT_MS: u64 = 1000;

const SOCK_BUF: usize = 64 << 10;

/// The sockets and their buffers (rx and tx for the sink, then for the source).
struct Statics {
    sockets: [SocketStorage<'static>; 2],
    bufs: [[u8; SOCK_BUF]; 4],
}

static mut STATICS: Statics = Statics {
    sockets: [SocketStorage::EMPTY; 2],
    bufs: [[0; SOCK_BUF]; 4],
};
static STATICS_TAKEN: AtomicBool = AtomicBool::new(false);

/// STATICS, the first time only.
fn take_statics() -> Option<&'static mut Statics> {
    if STATICS_TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: the swap above lets only one caller ever get here, so this is the only reference
    // to STATICS there will be.
    Some(unsafe { &mut *core::ptr::addr_of_mut!(STATICS) })
}

/// Probes the named devices and sets up the first net device for address `ip` (and default
/// route `gw`); the net area is carved from `ram`. Without `ip` the device is left alone.
pub fn probe(
    devs: &mmio::Devs,
    ip: Option<([u8; 4], u8)>,
    gw: Option<[u8; 4]>,
    tsc_hz: u64,
    ram: &mut [Range],
) -> Option<Net> {
    let Some(r) = mmio::first_of(devs, ID_NET, ram, false) else {
        if ip.is_some() {
            say!("tern-guest net FAIL tern.ip is set but no virtio-net device was found");
        }
        return None;
    };
    let Some(ip) = ip else {
        say!("tern-guest net idle (no tern.ip=)");
        return None;
    };
    init(r, ip, gw, tsc_hz, ram)
}

/// Marks the device FAILED and prints why.
fn give_up(r: Regs, why: core::fmt::Arguments) -> Option<Net> {
    r.write(STATUS, r.read(STATUS) | FAILED);
    say!("tern-guest net FAIL {why}");
    None
}

fn init(
    r: Regs,
    ip: ([u8; 4], u8),
    gw: Option<[u8; 4]>,
    tsc_hz: u64,
    ram: &mut [Range],
) -> Option<Net> {
    if let Err(why) = crate::mmio::start(r) {
        return give_up(r, format_args!("{why}"));
    }
    let offered = r.read(DEVICE_FEATURES);
    let mut features = offered & (F_MAC | F_STATUS | F_CTRL_VQ);
    if offered & (F_GUEST_ANNOUNCE | F_CTRL_VQ | F_STATUS)
        == F_GUEST_ANNOUNCE | F_CTRL_VQ | F_STATUS
    {
        features |= F_GUEST_ANNOUNCE;
    }
    r.write(DRIVER_FEATURES_SEL, 0);
    r.write(DRIVER_FEATURES, features);
    r.write(DRIVER_FEATURES_SEL, 1);
    r.write(DRIVER_FEATURES, 1);
    r.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    if r.read(STATUS) & FEATURES_OK == 0 {
        return give_up(r, format_args!("device refused FEATURES_OK"));
    }

    let rx_size = match queue_size(r, 0, MAX_QUEUE) {
        Ok(n) => n,
        Err(why) => return give_up(r, format_args!("receiveq {why}")),
    };
    let tx_size = match queue_size(r, 1, MAX_QUEUE) {
        Ok(n) => n,
        Err(why) => return give_up(r, format_args!("transmitq {why}")),
    };
    let ctrl_size = if features & F_CTRL_VQ != 0 {
        match queue_size(r, 2, CTRL_QUEUE) {
            Ok(n) if n >= 2 => Some(n),
            Ok(n) => return give_up(r, format_args!("controlq is too small ({n})")),
            Err(why) => return give_up(r, format_args!("controlq {why}")),
        }
    } else {
        None
    };
    let Some(st) = take_statics() else {
        return give_up(r, format_args!("a second net device"));
    };

    let vq_pages = 2 * VQ_PAGES + ctrl_size.map_or(0, |_| VQ_PAGES + 1);
    let buf_pages = ((u64::from(rx_size) + u64::from(tx_size)) * BUF).div_ceil(PAGE);
    let pages = vq_pages + buf_pages;
    let Some(base) = carve(ram, pages) else {
        return give_up(r, format_args!("no RAM for the net area"));
    };
    // SAFETY: `carve` gave us these pages of RAM, which nothing else uses; the device has no
    // queue yet.
    unsafe { core::ptr::write_bytes(base as *mut u8, 0, (pages * PAGE) as usize) };
    let rx_q = Vq::new(r, 0, rx_size, base);
    let tx_q = Vq::new(r, 1, tx_size, base + VQ_PAGES * PAGE);
    let ctrl = ctrl_size.map(|n| {
        let at = base + 2 * VQ_PAGES * PAGE;
        Ctrl {
            vq: Vq::new(r, 2, n, at),
            buf: at + VQ_PAGES * PAGE,
        }
    });
    let bufs = base + vq_pages * PAGE;
    let mut phy = Phy {
        rx: Rx::new(rx_q, bufs),
        tx: Tx::new(tx_q, bufs + u64::from(rx_size) * BUF),
    };
    r.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    let status = r.read(STATUS);
    if status & NEEDS_RESET != 0 || status & DRIVER_OK == 0 {
        return give_up(
            r,
            format_args!("device did not accept DRIVER_OK (status {status:#x})"),
        );
    }
    // The receive buffers are posted: tell the device.
    phy.rx.kick();

    let mac = if features & F_MAC != 0 {
        let mut mac = None;
        for _ in 0..1000 {
            let g = r.read(CONFIG_GENERATION);
            let (lo, hi) = (
                r.read(CONFIG).to_le_bytes(),
                r.read(CONFIG + 4).to_le_bytes(),
            );
            if r.read(CONFIG_GENERATION) == g {
                mac = Some([lo[0], lo[1], lo[2], lo[3], hi[0], hi[1]]);
                break;
            }
        }
        let Some(mac) = mac else {
            return give_up(r, format_args!("device config generation never settles"));
        };
        mac
    } else {
        // No address from the device: a locally administered one of our own.
        let t = rdtsc().to_le_bytes();
        [0x02, 0x74, t[0], t[1], t[2], t[3]]
    };
    let eth = EthernetAddress(mac);
    if !eth.is_unicast() {
        return give_up(r, format_args!("device MAC {eth} is not unicast"));
    }

    let t0 = rdtsc();
    let mut icfg = IfaceConfig::new(HardwareAddress::Ethernet(eth));
    icfg.random_seed = t0;
    let mut iface = Interface::new(icfg, &mut phy, Instant::from_micros(0));
    let cidr = Ipv4Cidr::new(Ipv4Address::from(ip.0), ip.1);
    iface.update_ip_addrs(|a| {
        // Cannot fail: the list is empty.
        let _ = a.push(IpCidr::Ipv4(cidr));
    });
    if let Some(gw) = gw {
        // Cannot fail: the route table is empty.
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::from(gw));
    }
    let Statics { sockets, bufs } = st;
    let [sink_rx, sink_tx, src_rx, src_tx] = bufs;
    let mut sockets = SocketSet::new(&mut sockets[..]);
    let sink = sockets.add(tcp_socket(sink_rx, sink_tx));
    let source = sockets.add(tcp_socket(src_rx, src_tx));
    Some(Net {
        regs: r,
        phy,
        ctrl,
        can_announce: features & F_GUEST_ANNOUNCE != 0,
        mac,
        cidr,
        iface,
        sockets,
        sink: Sink::new(sink),
        source: Source::new(source),
        tsc_hz,
        last_now: t0,
        clock: 0,
        quick_until: 0,
        failed: false,
        next_status: 0,
        next_ok: 0,
        started: false,
        pending: false,
        announces: 0,
    })
}

/// A TCP socket on two of the static buffers; it gives up on a peer that has not answered for
/// a minute (idle connections are probed every 10 s), so that a vanished client does not keep
/// its port busy forever.
fn tcp_socket(rx: &'static mut [u8], tx: &'static mut [u8]) -> Socket<'static> {
    let mut s = Socket::new(SocketBuffer::new(rx), SocketBuffer::new(tx));
    s.set_timeout(Some(Duration::from_secs(60)));
    s.set_keep_alive(Some(Duration::from_secs(10)));
    s
}

/// The control queue: one command at a time, descriptors 0 (command) and 1 (ack).
struct Ctrl {
    vq: Vq,
    /// The command's page: class and command at 0, the ack byte at 64.
    buf: u64,
}

impl Ctrl {
    /// Sends a command without data and waits for its ack; errors say why it failed. After an
    /// error the queue must not be used again (the command may still be in flight).
    fn command(&mut self, class: u8, cmd: u8, tsc_hz: u64) -> Result<(), &'static str> {
        let (hdr, ack) = (self.buf as *mut u8, (self.buf + 64) as *mut u8);
        // SAFETY: the command's page, RAM that `carve` gave the driver; no command is in flight
        // (the last one completed: after an error there is no next one), so the device does not
        // touch it.
        unsafe {
            hdr.write_volatile(class);
            hdr.add(1).write_volatile(cmd);
            ack.write_volatile(0xff);
        }
        self.vq.set_desc(0, self.buf, 2, DESC_F_NEXT, 1);
        self.vq.set_desc(1, self.buf + 64, 1, DESC_F_WRITE, 0);
        self.vq.push(0);
        self.vq.kick();
        // The time the guest ran while it waited: a pause (a migration) does not count, and
        // the device may serve the queue only once the guest runs again.
        let (limit, step) = (muldiv(CTRL_TIMEOUT_MS, tsc_hz, 1000), tsc_hz / 100);
        let (mut last, mut waited) = (rdtsc(), 0u64);
        while self.vq.pop().is_none() {
            let now = rdtsc();
            waited += now.wrapping_sub(last).min(step);
            last = now;
            if waited > limit {
                return Err("controlq command timed out");
            }
            core::hint::spin_loop();
        }
        // SAFETY: the ack byte, written by the device before it used the chain.
        match unsafe { ack.read_volatile() } {
            CTRL_OK => Ok(()),
            _ => Err("controlq command refused"),
        }
    }
}

/// The driver, the interface and the workload (vCPU 0 only).
pub struct Net {
    regs: Regs,
    phy: Phy,
    ctrl: Option<Ctrl>,
    /// GUEST_ANNOUNCE was negotiated (with CTRL_VQ and STATUS), and no announce failed.
    can_announce: bool,
    mac: [u8; 6],
    cidr: Ipv4Cidr,
    iface: Interface,
    sockets: SocketSet<'static>,
    sink: Sink,
    source: Source,
    tsc_hz: u64,
    /// The TSC at the last step, and smoltcp's time in TSC ticks without pauses.
    last_now: u64,
    clock: u64,
    /// Until then the status is polled every millisecond (after a pause).
    quick_until: u64,
    /// A device failure was reported.
    failed: bool,
    next_status: u64,
    next_ok: u64,
    started: bool,
    /// The device asked for an announce that has not been made yet.
    pending: bool,
    announces: u64,
}

impl Net {
    pub fn print_up(&self) {
        let m = self.mac;
        say!(
            "tern-guest net up mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip={} queue={}",
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5],
            self.cidr,
            self.phy.rx.size()
        );
    }

    /// One round of vCPU 0's network duties: the announce, smoltcp (bounded: at most a receive
    /// queue's worth of frames in, a transmit queue's worth out), the sockets, the report.
    pub fn step(&mut self, cfg: &Config, mon: &mut Monitor, now: u64) {
        let period = if cfg.check_s > 0 { cfg.check_s } else { 2 } * cfg.tsc_hz;
        if !self.started {
            self.started = true;
            self.next_status = now;
            self.next_ok = now + period;
        }
        self.phy.tx.reclaim();
        // A step that comes 10 ms or more after the last one: the guest was paused, perhaps
        // for a migration that just ended here. The device asks for the announce right after
        // the guest runs again, so look at once, then every millisecond for a while, rather
        // than every 20 ms: until then, the acknowledgements our TCP senders wait for go to
        // the old host.
        let d = now.wrapping_sub(self.last_now);
        if d > self.tsc_hz / 100 {
            self.next_status = now;
            self.quick_until = now + muldiv(QUICK_POLL_MS, self.tsc_hz, 1000);
        }
        if self.can_announce && now >= self.next_status {
            let every = if now < self.quick_until {
                1
            } else {
                STATUS_POLL_MS
            };
            self.next_status = now + muldiv(every, self.tsc_hz, 1000);
            if self.regs.read(CONFIG + 4) & S_ANNOUNCE != 0 {
                self.pending = true;
            }
        }
        if self.pending && self.phy.tx.has_room() {
            self.pending = false;
            self.announce(mon);
        }

        // smoltcp's clock leaves out pauses (at most 1 s a step): a migration's downtime or a
        // postcopy stall must not count towards its 60 s connection timeout, which would reset
        // both streams when the guest runs again.
        self.last_now = now;
        self.clock += if d > self.tsc_hz { self.tsc_hz } else { d };
        let t = Instant::from_micros(muldiv(self.clock, 1_000_000, self.tsc_hz) as i64);
        self.iface.poll_maintenance(t);
        for _ in 0..self.phy.rx.size() {
            let r = self
                .iface
                .poll_ingress_single(t, &mut self.phy, &mut self.sockets);
            if r == PollIngressSingleResult::None {
                break;
            }
        }
        self.sink.step(&mut self.sockets, mon);
        self.source.step(&mut self.sockets, mon);
        for _ in 0..self.phy.tx.size() {
            if self.iface.poll_egress(t, &mut self.phy, &mut self.sockets) == PollResult::None {
                break;
            }
        }
        self.phy.kick();

        if now >= self.next_ok {
            let errors = self.phy.rx.errors + self.phy.tx.errors;
            let overrun = self.phy.rx.overrun() || self.phy.tx.overrun();
            if (errors > 0 || overrun) && !self.failed {
                self.failed = true;
                report!(
                    mon,
                    "tern-guest net FAIL device: {} bad used element(s){}",
                    errors,
                    if overrun {
                        ", a used index past the ring"
                    } else {
                        ""
                    }
                );
            }
            report!(
                mon,
                "tern-guest net ok sink={} source={} rx_frames={} tx_frames={} errors={}",
                self.sink.total(),
                self.source.total(),
                self.phy.rx.frames,
                self.phy.tx.frames,
                errors
            );
            self.next_ok += period;
            if self.next_ok < now {
                self.next_ok = now + period;
            }
        }
    }

    /// Asks every connected TCP peer for an acknowledgement (see `kick`).
    fn probe_peers(&mut self) {
        let seq = rdtsc() as u32;
        for h in [self.sink.handle(), self.source.handle()] {
            let s = self.sockets.get::<Socket>(h);
            let (Some(l), Some(r)) = (s.local_endpoint(), s.remote_endpoint()) else {
                continue;
            };
            #[allow(irrefutable_let_patterns)]
            let (IpAddress::Ipv4(ip), IpAddress::Ipv4(peer_ip)) = (l.addr, r.addr) else {
                continue;
            };
            let Some(peer_mac) = self.phy.rx.peers.mac(peer_ip.octets()) else {
                continue;
            };
            let flow = kick::Flow {
                mac: self.mac,
                peer_mac,
                ip: ip.octets(),
                peer_ip: peer_ip.octets(),
                port: l.port,
                peer_port: r.port,
            };
            if !self.phy.tx.has_room() {
                return;
            }
            self.phy
                .tx
                .send(kick::PROBE_LEN, |b| kick::probe(&flow, seq, b));
        }
    }

    /// Answers the device's ANNOUNCE: a gratuitous ARP (past smoltcp, straight onto the transmit
    /// queue), then VIRTIO_NET_CTRL_ANNOUNCE_ACK, which clears the status bit.
    fn announce(&mut self, mon: &mut Monitor) {
        let (mac, ip) = (self.mac, self.cidr.address().octets());
        self.phy.tx.send(GARP_LEN, |b| phy::garp(mac, ip, b));
        self.probe_peers();
        self.phy.tx.kick();
        let Some(ctrl) = self.ctrl.as_mut() else {
            return;
        };
        match ctrl.command(CLASS_ANNOUNCE, CMD_ANNOUNCE_ACK, self.tsc_hz) {
            Ok(()) => {
                self.announces += 1;
                report!(mon, "tern-guest net announce {}", self.announces);
            }
            Err(why) => {
                // Not again: the command may still be in flight, and a device that does not
                // take the ack would have us announce (and print) every 20 ms.
                self.can_announce = false;
                report!(mon, "tern-guest net FAIL announce: {}", why);
            }
        }
    }
}
