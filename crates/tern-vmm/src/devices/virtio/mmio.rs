//! The virtio-mmio transport, version 2: the register file a driver sees, the queues it sets
//! up, and their state as a migration section (`virtio-mmio`, one instance per slot).

use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tern_wire::{
    FieldSpec, FieldType, Schema, Section, SectionBuilder, SectionReader, StateError, Value,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::{DeviceState, LoadCtx, MmioIo};
use crate::memory::GuestMemory;
use crate::vm::Vm;

const MAGIC: u32 = 0x7472_6976;
const VENDOR: u32 = 0x4e52_4554; // "TERN"

const fn field(name: &'static str, ty: FieldType) -> FieldSpec {
    FieldSpec { name, ty, since: 1 }
}

static TRANSPORT: Schema = Schema {
    name: "virtio-mmio",
    version: 1,
    min_version: 1,
    fields: &[
        field("device_type", FieldType::U32),
        field("device_features_sel", FieldType::U32),
        field("driver_features", FieldType::U64),
        field("driver_features_sel", FieldType::U32),
        field("status", FieldType::U32),
        field("queue_sel", FieldType::U32),
        field("interrupt_status", FieldType::U32),
        field("config_generation", FieldType::U32),
        // Per queue: max_size, size, ready, desc_table, avail_ring, used_ring, next_avail,
        // next_used, event_idx.
        field("queues", FieldType::U64s),
    ],
    subsections: &[],
};
const QUEUE_WORDS: usize = 9;

struct Regs {
    device: Box<dyn VirtioDevice>,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    status: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<Queue>,
}

/// One virtio-mmio slot and the device behind it.
pub struct VirtioMmio {
    index: u32,
    regs: Mutex<Regs>,
    /// The VM is paused or pausing: nothing is served (guest memory is frozen for the
    /// migration). Outside the lock, so that a pause never waits for it.
    paused: AtomicBool,
    mem: Arc<GuestMemory>,
    irq: EventFd,
    /// One per queue: signalled by KVM (ioeventfd) or by the vCPU on a QueueNotify store.
    pub(crate) notify: Vec<EventFd>,
}

fn new_queues(sizes: &[u16]) -> Vec<Queue> {
    sizes
        .iter()
        // A power of two up to 32768 is always a valid size.
        .map(|&s| Queue::new(s).expect("queue size is a power of two"))
        .collect()
}

impl VirtioMmio {
    /// Slot `index`, its interrupt raised through `irq` (an irqfd).
    pub(crate) fn new(
        index: u32,
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemory>,
        irq: EventFd,
    ) -> std::io::Result<Self> {
        let queues = new_queues(device.queue_max_sizes());
        let notify = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<std::io::Result<_>>()?;
        Ok(VirtioMmio {
            index,
            regs: Mutex::new(Regs {
                device,
                device_features_sel: 0,
                driver_features: 0,
                driver_features_sel: 0,
                status: 0,
                queue_sel: 0,
                interrupt_status: 0,
                config_generation: 0,
                queues,
            }),
            // Until the vCPUs run (a target serves nothing before GO).
            paused: AtomicBool::new(true),
            mem,
            irq,
            notify,
        })
    }

    fn regs(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest-physical address of the QueueNotify register.
    pub fn notify_addr(&self) -> u64 {
        MMIO_BASE + u64::from(self.index) * MMIO_SIZE + 0x50
    }

    /// Serves one batch of queue `q`. If it had work, the queue's eventfd is signalled again
    /// so that the event thread comes back to it after whatever else waits (a stop, another
    /// device): a guest that keeps its queue full never holds the thread.
    pub(crate) fn serve(&self, q: usize) {
        if self.serve_locked(&mut self.regs(), q) > 0 {
            let _ = self.notify[q].write(1);
        }
    }

    /// Serves queue `q`; returns how many requests completed.
    fn serve_locked(&self, r: &mut Regs, q: usize) -> usize {
        if self.paused.load(Ordering::SeqCst)
            || r.status & S_DRIVER_OK == 0
            || r.status & S_NEEDS_RESET != 0
        {
            return 0;
        }
        let Regs { device, queues, .. } = r;
        let Some(queue) = queues.get_mut(q) else {
            return 0;
        };
        if !queue.ready() {
            return 0;
        }
        match device.process_queue(q, queue, &self.mem) {
            Ok(0) => 0,
            Ok(n) => {
                if queue.needs_notification(&*self.mem).unwrap_or(true) {
                    r.interrupt_status |= INT_VRING;
                    let _ = self.irq.write(1);
                }
                n
            }
            Err(why) => {
                tracing::warn!(
                    slot = self.index,
                    queue = q,
                    "virtio: {why}; the device needs a reset"
                );
                r.status |= S_NEEDS_RESET;
                r.interrupt_status |= 2;
                let _ = self.irq.write(1);
                0
            }
        }
    }

    /// The device's backend descriptor and the queue its readiness is for.
    pub(crate) fn backend(&self) -> Option<(std::os::fd::RawFd, usize)> {
        self.regs().device.backend()
    }

    /// Announces the guest (after a migration): the device does what it can on its own (a NIC's
    /// RARP), and if it asks the guest to announce itself, the configuration-change interrupt —
    /// not while the VM is paused (its state may be being saved; a `-S` target's guest is
    /// announced by the rounds after `cont`).
    pub(crate) fn announce(&self) {
        let mut r = self.regs();
        let driver_ok = r.status & S_DRIVER_OK != 0
            && r.status & S_NEEDS_RESET == 0
            && !self.paused.load(Ordering::SeqCst);
        if r.device.announce(driver_ok) {
            r.config_generation = r.config_generation.wrapping_add(1);
            r.interrupt_status |= INT_CONFIG;
            let _ = self.irq.write(1);
        }
    }

    /// The guest runs elsewhere now: the device drops what waited for it (see the device).
    pub(crate) fn retire(&self) -> Option<String> {
        self.regs().device.retire()
    }

    fn reset(r: &mut Regs) {
        r.status = 0;
        r.driver_features = 0;
        r.device_features_sel = 0;
        r.driver_features_sel = 0;
        r.queue_sel = 0;
        r.interrupt_status = 0;
        r.queues = new_queues(r.device.queue_max_sizes());
    }

    fn set_status(&self, r: &mut Regs, v: u32) {
        if v == 0 {
            Self::reset(r);
            return;
        }
        let mut v = v;
        if v & S_FEATURES_OK != 0 && r.status & S_FEATURES_OK == 0 {
            // Only VERSION_1 drivers, and only features the device offers.
            let ok = r.driver_features & F_VERSION_1 != 0
                && r.driver_features & !r.device.features() == 0;
            if ok {
                r.device.set_acked_features(r.driver_features);
            } else {
                v &= !S_FEATURES_OK;
            }
        }
        r.status = v;
        if v & S_DRIVER_OK != 0 {
            for (q, n) in self.notify.iter().enumerate() {
                if r.queues[q].ready() {
                    let _ = n.write(1);
                }
            }
        }
    }

    fn queue_addr(r: &mut Regs, reg: u64, v: u32) {
        let sel = r.queue_sel as usize;
        let Some(q) = r.queues.get_mut(sel) else {
            return;
        };
        if q.ready() {
            return;
        }
        match reg {
            0x80 => q.set_desc_table_address(Some(v), None),
            0x84 => q.set_desc_table_address(None, Some(v)),
            0x90 => q.set_avail_ring_address(Some(v), None),
            0x94 => q.set_avail_ring_address(None, Some(v)),
            0xa0 => q.set_used_ring_address(Some(v), None),
            0xa4 => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }
}

impl MmioIo for VirtioMmio {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let r = self.regs();
        if offset >= 0x100 {
            let cfg = r.device.config();
            for (i, b) in data.iter_mut().enumerate() {
                *b = cfg.get((offset - 0x100) as usize + i).copied().unwrap_or(0);
            }
            return;
        }
        let sel = r.queue_sel as usize;
        let v = match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => r.device.device_type(),
            0x0c => VENDOR,
            0x10 => match r.device_features_sel {
                0 => r.device.features() as u32,
                1 => (r.device.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => r.queues.get(sel).map_or(0, |q| u32::from(q.max_size())),
            0x44 => r.queues.get(sel).map_or(0, |q| u32::from(q.ready())),
            0x60 => r.interrupt_status,
            0x70 => r.status,
            0xfc => r.config_generation,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            // No device here takes config writes (virtio-blk's writeback toggle is not offered).
            return;
        }
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(b);
        if offset == 0x50 {
            // KVM's ioeventfd takes these first; this is the path when it could not be set up.
            tracing::trace!(
                slot = self.index,
                queue = v,
                "QueueNotify through an MMIO exit"
            );
            if let Some(n) = self.notify.get(v as usize) {
                let _ = n.write(1);
            }
            return;
        }
        let mut r = self.regs();
        match offset {
            0x14 => r.device_features_sel = v,
            0x20 if r.status & S_FEATURES_OK == 0 => match r.driver_features_sel {
                0 => r.driver_features = (r.driver_features & !0xffff_ffff) | u64::from(v),
                1 => r.driver_features = (r.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            0x24 => r.driver_features_sel = v,
            0x30 => r.queue_sel = v,
            0x38 => {
                let sel = r.queue_sel as usize;
                if let Some(q) = r.queues.get_mut(sel).filter(|q| !q.ready()) {
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                let sel = r.queue_sel as usize;
                if let Some(q) = r.queues.get_mut(sel) {
                    q.set_ready(v == 1);
                }
            }
            0x64 => r.interrupt_status &= !v,
            0x70 => self.set_status(&mut r, v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => Self::queue_addr(&mut r, offset, v),
            _ => {}
        }
    }

    fn hold(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Every vCPU is parked: waits out the batch the event thread may be serving (the lock),
    /// makes what completed durable, and serves nothing more until [`Self::resume`]. Requests
    /// the driver made available and nobody took yet stay in the ring (see the module
    /// documentation): they are counted here, for the log.
    fn quiesce(&self) {
        self.paused.store(true, Ordering::SeqCst);
        let mut r = self.regs();
        r.device.flush();
        let queued: u32 = r
            .queues
            .iter()
            .filter(|q| q.ready())
            .filter_map(|q| {
                let avail = q.avail_idx(&*self.mem, Ordering::Acquire).ok()?;
                Some(u32::from((avail - Wrapping(q.next_avail())).0))
            })
            .sum();
        if queued > 0 {
            tracing::info!(
                "virtio-mmio/{}: {queued} request(s) queued at the pause; they stay in the ring and are served where the guest runs next",
                self.index
            );
        }
    }

    fn resume(&self) {
        let r = self.regs();
        self.paused.store(false, Ordering::SeqCst);
        // Anything the driver queued while we were stopped (a loaded guest's) is served now.
        for n in &self.notify {
            let _ = n.write(1);
        }
        // An edge the irqfd raised just before the pause may have reached the interrupt
        // controller after its state was saved: raise it again (a driver reads the status
        // first, so a spare edge is harmless).
        if r.interrupt_status != 0 {
            let _ = self.irq.write(1);
        }
    }
}

fn invalid(reason: String) -> StateError {
    StateError::Invalid {
        section: TRANSPORT.name.into(),
        reason,
    }
}

impl DeviceState for VirtioMmio {
    fn schema(&self) -> &'static Schema {
        &TRANSPORT
    }
    fn instance(&self) -> u32 {
        self.index
    }

    fn save(&self, _vm: &Vm) -> Result<Section, StateError> {
        let r = self.regs();
        let mut queues = Vec::with_capacity(r.queues.len() * QUEUE_WORDS);
        for q in &r.queues {
            let s = q.state();
            queues.extend([
                u64::from(s.max_size),
                u64::from(s.size),
                u64::from(s.ready),
                s.desc_table,
                s.avail_ring,
                s.used_ring,
                u64::from(s.next_avail),
                u64::from(s.next_used),
                u64::from(s.event_idx_enabled),
            ]);
        }
        SectionBuilder::new(&TRANSPORT, self.index)
            .field("device_type", Value::U32(r.device.device_type()))?
            .field("device_features_sel", Value::U32(r.device_features_sel))?
            .field("driver_features", Value::U64(r.driver_features))?
            .field("driver_features_sel", Value::U32(r.driver_features_sel))?
            .field("status", Value::U32(r.status))?
            .field("queue_sel", Value::U32(r.queue_sel))?
            .field("interrupt_status", Value::U32(r.interrupt_status))?
            .field("config_generation", Value::U32(r.config_generation))?
            .field("queues", Value::U64s(queues))?
            .build()
    }

    fn load(&self, _vm: &Vm, section: &Section, _: &LoadCtx) -> Result<(), StateError> {
        let s = SectionReader::new(&TRANSPORT, section)?;
        let mut r = self.regs();
        let ty = s.u32("device_type")?;
        if ty != r.device.device_type() {
            return Err(StateError::NotMigratable {
                device: format!("virtio-mmio/{}", self.index),
                reason: format!(
                    "the source has a device of type {ty} in this slot, this VM one of type {}",
                    r.device.device_type()
                ),
            });
        }
        let driver_features = s.u64("driver_features")?;
        let missing = driver_features & !r.device.features();
        if missing != 0 {
            return Err(StateError::NotMigratable {
                device: format!("virtio-mmio/{}", self.index),
                reason: format!(
                    "the guest uses features {missing:#x} that this VM's device does not offer"
                ),
            });
        }
        let words = match s.value("queues")? {
            Value::U64s(w) => w,
            _ => return Err(invalid("queues is not a list of u64".into())),
        };
        if words.len() != r.queues.len() * QUEUE_WORDS {
            return Err(invalid(format!(
                "{} queue words, expected {} for {} queues",
                words.len(),
                r.queues.len() * QUEUE_WORDS,
                r.queues.len()
            )));
        }
        let mut queues = Vec::with_capacity(r.queues.len());
        for (i, w) in words.chunks(QUEUE_WORDS).enumerate() {
            let u16_of = |v: u64, what: &str| {
                u16::try_from(v).map_err(|_| invalid(format!("queue {i}: {what} {v} too large")))
            };
            let max = r.queues[i].max_size();
            if w[0] != u64::from(max) {
                return Err(invalid(format!(
                    "queue {i}: the source's holds {} entries at most, ours {max}",
                    w[0]
                )));
            }
            let state = QueueState {
                max_size: max,
                size: u16_of(w[1], "size")?,
                ready: w[2] != 0,
                desc_table: w[3],
                avail_ring: w[4],
                used_ring: w[5],
                next_avail: u16_of(w[6], "next_avail")?,
                next_used: u16_of(w[7], "next_used")?,
                event_idx_enabled: w[8] != 0,
            };
            queues.push(Queue::try_from(state).map_err(|e| invalid(format!("queue {i}: {e:?}")))?);
        }
        r.device.set_acked_features(driver_features);
        r.device_features_sel = s.u32("device_features_sel")?;
        r.driver_features = driver_features;
        r.driver_features_sel = s.u32("driver_features_sel")?;
        r.status = s.u32("status")?;
        r.queue_sel = s.u32("queue_sel")?;
        r.interrupt_status = s.u32("interrupt_status")?;
        r.config_generation = s.u32("config_generation")?;
        r.queues = queues;
        Ok(())
    }
}

/// The device's own section (its configuration), beside the transport's.
pub struct DeviceSection(pub(crate) Arc<VirtioMmio>, pub(crate) &'static Schema);

impl DeviceSection {
    pub(crate) fn new(dev: Arc<VirtioMmio>) -> Self {
        let schema = dev.regs().device.schema();
        DeviceSection(dev, schema)
    }
}

impl DeviceState for DeviceSection {
    fn schema(&self) -> &'static Schema {
        self.1
    }
    fn instance(&self) -> u32 {
        self.0.index
    }
    fn save(&self, _vm: &Vm) -> Result<Section, StateError> {
        self.0.regs().device.save(self.0.index)
    }
    fn load(&self, _vm: &Vm, section: &Section, _: &LoadCtx) -> Result<(), StateError> {
        self.0.regs().device.load(section)
    }
}
