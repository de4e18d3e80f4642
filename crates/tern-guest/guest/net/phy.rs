//! The net device's receive and transmit queues as a smoltcp `phy::Device`.
//!
//! Every packet on either queue is preceded by the 12-byte `virtio_net_hdr_v1`. Receive: each
//! descriptor is one 2048-byte device-writable buffer (without VIRTIO_NET_F_MRG_RXBUF a buffer
//! must hold 12 + 1514 bytes), descriptor `i` always buffer `i`; every buffer is posted at start
//! and re-posted as soon as smoltcp consumed its frame. Transmit: a slot is one descriptor and
//! one 2048-byte buffer holding an all-zero header and the frame; slots come back when the device
//! has used them. Neither side notifies the device itself: `kick` does, once per batch.

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::vq::{Vq, DESC_F_WRITE, MAX_QUEUE};

/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const HDR_LEN: usize = 12;
/// The size of every receive and transmit buffer.
pub const BUF: u64 = 2048;
/// The largest Ethernet frame (without FCS) either way.
pub const MTU: usize = 1514;
const ETH_HDR: usize = 14;

pub struct Rx {
    vq: Vq,
    bufs: u64,
    pub frames: u64,
    /// Used elements that named no buffer of ours or held no frame: dropped.
    pub errors: u64,
    /// Buffers re-posted since the last `kick`.
    dirty: bool,
    /// Who sent us IPv4 frames (for the probes after a migration).
    pub peers: super::kick::Peers,
}

impl Rx {
    /// Takes the receive queue and its `size` buffers at `bufs` (`BUF` bytes each, in RAM that
    /// `carve` handed out), and posts them all.
    pub fn new(vq: Vq, bufs: u64) -> Rx {
        let mut rx = Rx {
            vq,
            bufs,
            frames: 0,
            errors: 0,
            dirty: false,
            peers: super::kick::Peers::new(),
        };
        for i in 0..rx.vq.size() {
            rx.post(i);
        }
        rx
    }

    pub fn size(&self) -> u16 {
        self.vq.size()
    }

    /// The device published more used elements than the ring holds.
    pub fn overrun(&self) -> bool {
        self.vq.overrun
    }

    fn buf(&self, i: u16) -> u64 {
        self.bufs + u64::from(i) * BUF
    }

    /// Hands buffer `i` (which the device no longer holds) to the device again.
    fn post(&mut self, i: u16) {
        self.vq
            .set_desc(i, self.buf(i), BUF as u32, DESC_F_WRITE, 0);
        self.vq.push(i);
        self.dirty = true;
    }

    /// The next received frame, as (buffer, frame length); not consumed. Drops what is not one.
    fn next(&mut self) -> Option<(u16, usize)> {
        loop {
            let (id, len) = self.vq.peek()?;
            let len = len as usize;
            if id < u32::from(self.vq.size()) && (HDR_LEN + ETH_HDR..=BUF as usize).contains(&len) {
                return Some((id as u16, len - HDR_LEN));
            }
            self.vq.advance();
            self.errors += 1;
            if id < u32::from(self.vq.size()) {
                self.post(id as u16);
            }
        }
    }

    /// Notifies the device if buffers were re-posted.
    pub fn kick(&mut self) {
        if self.dirty {
            self.dirty = false;
            self.vq.kick();
        }
    }
}

pub struct Tx {
    vq: Vq,
    bufs: u64,
    /// Slots the device does not hold: `free[..nfree]`; `busy` marks the others.
    free: [u16; MAX_QUEUE as usize],
    nfree: usize,
    busy: [bool; MAX_QUEUE as usize],
    pub frames: u64,
    /// Used elements that named no slot in flight: ignored.
    pub errors: u64,
}

impl Tx {
    /// Takes the transmit queue and its `size` buffers at `bufs` (`BUF` bytes each, in RAM that
    /// `carve` handed out and zeroed).
    pub fn new(vq: Vq, bufs: u64) -> Tx {
        let mut tx = Tx {
            vq,
            bufs,
            free: [0; MAX_QUEUE as usize],
            nfree: 0,
            busy: [false; MAX_QUEUE as usize],
            frames: 0,
            errors: 0,
        };
        for i in (0..tx.vq.size()).rev() {
            tx.free[tx.nfree] = i;
            tx.nfree += 1;
        }
        tx
    }

    pub fn size(&self) -> u16 {
        self.vq.size()
    }

    /// The device published more used elements than the ring holds.
    pub fn overrun(&self) -> bool {
        self.vq.overrun
    }

    /// Takes back the slots the device has sent.
    pub fn reclaim(&mut self) {
        while let Some((id, _)) = self.vq.pop() {
            let i = id as usize;
            if i >= self.vq.size() as usize || !self.busy[i] {
                self.errors += 1;
                continue;
            }
            self.busy[i] = false;
            self.free[self.nfree] = i as u16;
            self.nfree += 1;
        }
    }

    /// Whether a frame can be queued now.
    pub fn has_room(&mut self) -> bool {
        if self.nfree == 0 {
            self.reclaim();
        }
        self.nfree > 0
    }

    /// Queues a frame of `len` bytes that `f` writes; `has_room` must have said yes.
    pub fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        assert!(len <= BUF as usize - HDR_LEN && self.nfree > 0);
        self.nfree -= 1;
        let i = self.free[self.nfree];
        self.busy[usize::from(i)] = true;
        let buf = self.bufs + u64::from(i) * BUF;
        // SAFETY: slot i's buffer, BUF bytes of RAM that `carve` gave the driver; the slot was
        // free, so the device does not read it, and nothing else refers to it while `f` runs.
        let b = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, HDR_LEN + len) };
        b[..HDR_LEN].fill(0);
        let r = f(&mut b[HDR_LEN..]);
        self.vq.set_desc(i, buf, (HDR_LEN + len) as u32, 0, 0);
        self.vq.push(i);
        self.frames += 1;
        r
    }

    /// Makes the queued frames visible to the device and notifies it.
    pub fn kick(&mut self) {
        self.vq.kick();
    }
}

/// Both data queues: the device smoltcp's interface runs on.
pub struct Phy {
    pub rx: Rx,
    pub tx: Tx,
}

impl Phy {
    /// Notifies the device of what the last round added, one exit per queue at most.
    pub fn kick(&mut self) {
        self.rx.kick();
        self.tx.kick();
    }
}

pub struct RxToken<'a> {
    rx: &'a mut Rx,
    id: u16,
    len: usize,
}

pub struct TxToken<'a> {
    tx: &'a mut Tx,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let buf = self.rx.buf(self.id) + HDR_LEN as u64;
        // SAFETY: buffer `id`'s frame, which the device wrote before it published the used
        // element (`next` checked that `len` fits the buffer); the buffer is not re-posted until
        // `f` returns, so nothing writes it meanwhile.
        let frame = unsafe { core::slice::from_raw_parts(buf as *const u8, self.len) };
        self.rx.peers.learn(frame);
        let r = f(frame);
        self.rx.vq.advance();
        self.rx.frames += 1;
        self.rx.post(self.id);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        self.tx.send(len, f)
    }
}

impl phy::Device for Phy {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    /// A received frame, with room to answer it (else it waits in the ring).
    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if !self.tx.has_room() {
            return None;
        }
        let (id, len) = self.rx.next()?;
        Some((
            RxToken {
                rx: &mut self.rx,
                id,
                len,
            },
            TxToken { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        if !self.tx.has_room() {
            return None;
        }
        Some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        // No offloads were negotiated: smoltcp computes and checks every checksum.
        caps
    }
}

/// A gratuitous ARP for `ip` from `mac` (a broadcast request for our own address), padded to
/// Ethernet's 60-byte minimum.
pub fn garp(mac: [u8; 6], ip: [u8; 4], b: &mut [u8]) {
    b.fill(0);
    b[0..6].fill(0xff);
    b[6..12].copy_from_slice(&mac);
    b[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    b[14..16].copy_from_slice(&1u16.to_be_bytes()); // htype: Ethernet
    b[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // ptype: IPv4
    b[18] = 6;
    b[19] = 4;
    b[20..22].copy_from_slice(&1u16.to_be_bytes()); // op: request
    b[22..28].copy_from_slice(&mac);
    b[28..32].copy_from_slice(&ip);
    // Target MAC (32..38) stays zero.
    b[38..42].copy_from_slice(&ip);
}

/// The length of the frame `garp` writes.
pub const GARP_LEN: usize = 60;
