//! virtio-net on a TAP: a receive, a transmit and a control queue, served by the event thread
//! (the TAP's readiness wakes it for the receive queue), the MAC and the link status in the
//! configuration space, and the guest announce (VIRTIO_NET_F_GUEST_ANNOUNCE).
//!
//! Frames and a migration. Transmit: what the guest queued and the device did not take stays in
//! the ring (guest RAM), sent by whichever side runs the guest next, as for virtio-blk.
//! Receive: while the guest is paused the device reads nothing, so **frames for the guest wait
//! in the TAP's queue** (the kernel holds up to its `txqueuelen`, 500 for a TAP by default, and
//! drops beyond). If the migration fails they are delivered on resume; if it completes they
//! were for a guest that now runs elsewhere, and the source drops them when it retires the
//! device, counted (`frames dropped at the switch`; TCP resends them). The one frame the
//! device may hold — read from the TAP when the guest had no buffer for it — is carried in the
//! device's section and delivered first on the target.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tern_wire::{
    FieldSpec, FieldType, Schema, Section, SectionBuilder, SectionReader, StateError, Value,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{VirtioDevice, F_VERSION_1};
use crate::memory::GuestMemory;
use crate::tap::{format_mac, rarp_frame, Tap};

pub const DEVICE_ID: u32 = 1;

const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_GUEST_ANNOUNCE: u64 = 1 << 21;

/// Configuration status bits.
const S_LINK_UP: u16 = 1;
const S_ANNOUNCE: u16 = 2;

const CTRL_ANNOUNCE: u8 = 3;
const CTRL_ANNOUNCE_ACK: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;

/// `struct virtio_net_hdr_v1`: with VERSION_1 it always has `num_buffers`.
const HDR: usize = 12;
const RX: usize = 0;
const TX: usize = 1;
const CTRL: usize = 2;
const QUEUE_SIZES: &[u16] = &[256, 256, 64];
/// Frames moved per batch (per hold of the transport's lock).
const MAX_BATCH: usize = 64;
/// Most frames the source drops from its TAP when the guest has left (a TAP queues 500 by
/// default).
const RETIRE_MAX: u64 = 4096;
/// The largest frame either way: no offloads are offered, so 1514 bytes plus VLAN tags; a TAP
/// never gives more than its MTU, and a larger frame from the guest is dropped.
const FRAME_MAX: usize = 65_536;

static NET: Schema = Schema {
    name: "virtio-net",
    version: 1,
    min_version: 1,
    fields: &[
        FieldSpec {
            name: "mac",
            ty: FieldType::Bytes,
            since: 1,
        },
        FieldSpec {
            name: "status",
            ty: FieldType::U16,
            since: 1,
        },
        // The frame read from the TAP that no receive buffer took yet (empty: none).
        FieldSpec {
            name: "rx_pending",
            ty: FieldType::Bytes,
            since: 1,
        },
    ],
    subsections: &[],
};

/// What a NIC counted; read without the device's lock.
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames the guest had no room for (a receive buffer shorter than the frame).
    pub rx_dropped: AtomicU64,
    /// Frames the TAP refused, or malformed ones from the guest.
    pub tx_errors: AtomicU64,
    /// Frames that waited in the TAP when the guest left (a completed migration).
    pub dropped_at_switch: AtomicU64,
    /// RARP rounds sent, and guest announces asked for.
    pub rarps: AtomicU64,
    pub guest_announces: AtomicU64,
}

/// A virtio-net device.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    acked: u64,
    status: u16,
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
    pub(crate) stats: Arc<NetStats>,
    warned_small: bool,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6], stats: Arc<NetStats>) -> Self {
        Net {
            tap,
            mac,
            acked: 0,
            status: S_LINK_UP,
            pending: None,
            buf: vec![0; FRAME_MAX],
            stats,
            warned_small: false,
        }
    }

    /// Moves frames from the TAP into receive buffers; returns how many were delivered.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<usize, String> {
        let mut n = 0;
        while n < MAX_BATCH {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.tap.recv(&mut self.buf) {
                    Ok(Some(len)) => self.buf[..len].to_vec(),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("TAP {}: read: {e}", self.tap.name());
                        break;
                    }
                },
            };
            let chain = queue
                .iter(mem)
                .map_err(|e| format!("receive ring: {e:?}"))?
                .next();
            let Some(chain) = chain else {
                // No buffer: the frame waits here (and in the section), the rest in the TAP.
                self.pending = Some(frame);
                break;
            };
            let head = chain.head_index();
            let mut w = chain
                .writer(mem)
                .map_err(|e| format!("receive buffer: {e}"))?;
            let len = if w.available_bytes() < HDR + frame.len() {
                self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                if !self.warned_small {
                    self.warned_small = true;
                    tracing::warn!(
                        "virtio-net: a receive buffer of {} bytes for a {}-byte frame: dropped",
                        w.available_bytes(),
                        HDR + frame.len()
                    );
                }
                0
            } else {
                let mut hdr = [0u8; HDR];
                hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
                w.write_all(&hdr)
                    .and_then(|_| w.write_all(&frame))
                    .map_err(|e| format!("receive buffer: {e}"))?;
                self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .rx_bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                (HDR + frame.len()) as u32
            };
            queue
                .add_used(mem, head, len)
                .map_err(|e| format!("used ring: {e:?}"))?;
            n += 1;
        }
        Ok(n)
    }

    /// Sends what the guest queued on the TAP; returns how many frames it took.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<usize, String> {
        let chains: Vec<_> = queue
            .iter(mem)
            .map_err(|e| format!("transmit ring: {e:?}"))?
            .take(MAX_BATCH)
            .collect();
        let n = chains.len();
        for chain in chains {
            let head = chain.head_index();
            let mut r = chain.reader(mem).map_err(|e| format!("transmit: {e}"))?;
            let total = r.available_bytes();
            if total < HDR || total - HDR > FRAME_MAX {
                self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
            } else {
                let mut hdr = [0u8; HDR];
                let len = total - HDR;
                r.read_exact(&mut hdr)
                    .and_then(|_| r.read_exact(&mut self.buf[..len]))
                    .map_err(|e| format!("transmit: {e}"))?;
                match self.tap.send(&self.buf[..len]) {
                    Ok(()) => {
                        self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                        self.stats.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|e| format!("used ring: {e:?}"))?;
        }
        Ok(n)
    }

    /// Control commands: only the announce acknowledgement is known.
    fn control(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<usize, String> {
        let chains: Vec<_> = queue
            .iter(mem)
            .map_err(|e| format!("control ring: {e:?}"))?
            .take(MAX_BATCH)
            .collect();
        let n = chains.len();
        for chain in chains {
            let head = chain.head_index();
            let mut r = chain
                .clone()
                .reader(mem)
                .map_err(|e| format!("control: {e}"))?;
            let mut w = chain.writer(mem).map_err(|e| format!("control: {e}"))?;
            let mut cmd = [0u8; 2];
            let ack = match r.read_exact(&mut cmd) {
                Ok(()) if cmd == [CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK] => {
                    self.status &= !S_ANNOUNCE;
                    CTRL_OK
                }
                _ => CTRL_ERR,
            };
            let written = match w.available_bytes() {
                0 => 0,
                avail => {
                    let mut tail = w.split_at(avail - 1).map_err(|e| format!("control: {e}"))?;
                    tail.write_all(&[ack])
                        .map_err(|e| format!("control: {e}"))?;
                    1
                }
            };
            queue
                .add_used(mem, head, written)
                .map_err(|e| format!("used ring: {e:?}"))?;
        }
        Ok(n)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }

    /// `struct virtio_net_config`: mac, status, max_virtqueue_pairs (1).
    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; 12];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&self.status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<usize, String> {
        match index {
            RX => self.receive(queue, mem),
            TX => self.transmit(queue, mem),
            CTRL => self.control(queue, mem),
            _ => Ok(0),
        }
    }

    fn flush(&mut self) {}

    fn backend(&self) -> Option<(RawFd, usize)> {
        Some((self.tap.as_raw_fd(), RX))
    }

    fn announce(&mut self, driver_ok: bool) -> bool {
        if let Err(e) = self.tap.send(&rarp_frame(&self.mac)) {
            tracing::warn!(
                "TAP {}: cannot send the RARP announce: {e}",
                self.tap.name()
            );
        }
        self.stats.rarps.fetch_add(1, Ordering::Relaxed);
        // The guest reads the status only with F_STATUS, and acknowledges on the control queue.
        let need = F_GUEST_ANNOUNCE | F_CTRL_VQ | F_STATUS;
        let guest = driver_ok && self.acked & need == need;
        if guest {
            self.status |= S_ANNOUNCE;
            self.stats.guest_announces.fetch_add(1, Ordering::Relaxed);
        }
        guest
    }

    fn retire(&mut self) -> Option<String> {
        // The held frame went with the device's section: the target delivers it.
        self.pending = None;
        // What waits in the TAP, but no more than its queue can hold: frames still arriving
        // (the network has not heard the announce yet) are not counted for ever.
        let mut dropped = 0u64;
        while dropped < RETIRE_MAX {
            match self.tap.recv(&mut self.buf) {
                Ok(Some(_)) => dropped += 1,
                _ => break,
            }
        }
        self.stats
            .dropped_at_switch
            .fetch_add(dropped, Ordering::Relaxed);
        Some(format!(
            "virtio-net {} (TAP {}): {dropped} frame(s) for the guest waited here while it was \
             paused for the switch and are dropped (the guest runs on the target; TCP resends them)",
            format_mac(&self.mac),
            self.tap.name()
        ))
    }

    fn schema(&self) -> &'static Schema {
        &NET
    }

    fn save(&self, instance: u32) -> Result<Section, StateError> {
        SectionBuilder::new(&NET, instance)
            .field("mac", Value::Bytes(self.mac.to_vec()))?
            .field("status", Value::U16(self.status))?
            .field(
                "rx_pending",
                Value::Bytes(self.pending.clone().unwrap_or_default()),
            )?
            .build()
    }

    fn load(&mut self, section: &Section) -> Result<(), StateError> {
        let s = SectionReader::new(&NET, section)?;
        let mac = s.bytes("mac")?;
        if mac != self.mac {
            let theirs = <[u8; 6]>::try_from(mac)
                .map(|m| format_mac(&m))
                .unwrap_or_else(|_| format!("a {}-byte value", mac.len()));
            return Err(StateError::NotMigratable {
                device: format!("virtio-net/{}", section.instance),
                reason: format!(
                    "the guest's MAC is {theirs} on the source, {} here (give the target \
                     --net ...,mac={theirs})",
                    format_mac(&self.mac)
                ),
            });
        }
        let status = match s.value("status")? {
            Value::U16(v) => *v,
            _ => 0,
        };
        let pending = s.bytes("rx_pending")?;
        if pending.len() > FRAME_MAX {
            return Err(StateError::Invalid {
                section: NET.name.into(),
                reason: format!("a pending frame of {} bytes", pending.len()),
            });
        }
        self.status = (status & S_ANNOUNCE) | S_LINK_UP;
        self.pending = (!pending.is_empty()).then(|| pending.to_vec());
        Ok(())
    }
}
