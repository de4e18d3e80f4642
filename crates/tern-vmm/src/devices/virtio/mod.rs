//! virtio over MMIO (version 2, "modern"): the transport ([`mmio::VirtioMmio`]), the devices
//! behind it ([`block::Block`]) and the event thread that serves their queues
//! ([`event::EventThread`]).
//!
//! Where the devices are: slot `i` at [`MMIO_BASE`]` + i * `[`MMIO_SIZE`], interrupt
//! [`IRQ_BASE`]` + i`, the layout QEMU's microvm machine uses, announced to the guest on its
//! command line as `virtio_mmio.device=512@0xfeb00000:5` (Linux's convention).
//!
//! Who does the I/O: never a vCPU. A queue notification is a guest store to QueueNotify, which
//! KVM turns into an eventfd signal (ioeventfd) without leaving the kernel; the event thread
//! waits on those eventfds, serves the queue, and interrupts the guest through an irqfd. Every
//! byte a device writes into guest memory goes through vm-memory, whose bitmap is the VMM's own
//! dirty log: a migration sees it.
//!
//! In-flight requests and migration: **recorded where they already are**, not drained. The
//! backend is synchronous: the event thread takes a request from the available ring, serves it
//! and puts it in the used ring in one step, under the transport's lock, so no request is ever
//! half done when the device state is read (the save takes the same lock). What the guest has
//! made available but the device has not taken yet stays in the available ring, in guest RAM,
//! which the migration carries; the transport's section carries the queue's `next_avail`. At the
//! pause ([`crate::devices::DeviceManager::hold`] before the vCPUs park, `quiesce` after) the
//! device stops taking requests and flushes what it completed; on resume — on the source after a
//! failed migration, or on the target after GO — it looks at its queues again and serves what
//! waits there. So a request completes exactly once, wherever the guest runs next (a saved VM
//! that is also continued is two guests, and each serves its copy of the ring), and no in-flight
//! subsection is needed. Draining the queue at the pause instead would add the time
//! of every queued request to the downtime, and a guest can keep its queue full for ever.

pub mod block;
pub mod event;
pub mod mmio;
pub mod net;

use std::sync::Arc;

use kvm_ioctls::VmFd;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{DeviceManager, LoadStage};
use crate::disk::{Disk, DiskConfig};
use crate::error::kvm as kvm_err;
use crate::memory::{GuestMemory, GuestRam};
use crate::tap::{NetConfig, Tap};
use crate::Error;
use block::Block;
use event::EventThread;
use mmio::VirtioMmio;
use net::{Net, NetStats};

/// First slot's address: the top of the 32-bit hole below the IOAPIC, as in QEMU's microvm.
pub const MMIO_BASE: u64 = 0xfeb0_0000;
/// Each slot's size.
pub const MMIO_SIZE: u64 = 0x200;
/// First slot's interrupt (GSI); the serial port has 4.
pub const IRQ_BASE: u32 = 5;
/// Most virtio devices a VM has (interrupts 5..=12, as microvm).
pub const MAX_DEVICES: usize = 8;

/// VIRTIO_F_VERSION_1: the modern interface (the only one offered).
pub const F_VERSION_1: u64 = 1 << 32;

/// Device status bits.
pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 0x40;
pub const S_FAILED: u32 = 0x80;

/// Interrupt status: the used ring changed.
pub const INT_VRING: u32 = 1;
/// Interrupt status: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A device behind the transport.
pub trait VirtioDevice: Send {
    /// Its virtio device ID (2: block).
    fn device_type(&self) -> u32;
    /// The features it offers.
    fn features(&self) -> u64;
    /// Each queue's largest size.
    fn queue_max_sizes(&self) -> &'static [u16];
    /// Its configuration space.
    fn config(&self) -> Vec<u8>;
    /// The driver accepted `features` (a subset of [`Self::features`]).
    fn set_acked_features(&mut self, features: u64);
    /// Serves what the driver has made available on queue `index` (one batch: what is there
    /// now); returns how many requests it completed. An error means the driver broke the protocol (the device then needs a reset).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<usize, String>;
    /// Makes what it completed durable (the pause, before the state is saved).
    fn flush(&mut self);
    /// The device's own section (its configuration), with the transport's beside it.
    fn save(&self, instance: u32) -> Result<tern_wire::Section, tern_wire::StateError>;
    /// Checks and takes its section: a target whose device differs fails naming it.
    fn load(&mut self, section: &tern_wire::Section) -> Result<(), tern_wire::StateError>;
    /// Its section's schema.
    fn schema(&self) -> &'static tern_wire::Schema;
    /// A descriptor whose readiness means work for a queue (a TAP's frames for the receive
    /// queue): the event thread waits on it too, edge-triggered.
    fn backend(&self) -> Option<(std::os::fd::RawFd, usize)> {
        None
    }
    /// Announces the guest on its network (after a migration); `driver_ok`: the driver runs.
    /// True: the configuration changed, raise its interrupt.
    fn announce(&mut self, _driver_ok: bool) -> bool {
        false
    }
    /// The guest runs elsewhere now (a completed migration): drops what waited for it and says
    /// what that was.
    fn retire(&mut self) -> Option<String> {
        None
    }
}

/// The command-line entry Linux (and the built-in guest) finds slot `index` by.
pub fn cmdline_entry(index: usize) -> String {
    format!(
        "virtio_mmio.device={}@{:#x}:{}",
        MMIO_SIZE,
        MMIO_BASE + index as u64 * MMIO_SIZE,
        IRQ_BASE + index as u32
    )
}

/// What [`attach`] built.
pub(crate) struct Attached {
    pub disks: Vec<Arc<Disk>>,
    pub nets: Vec<(Arc<VirtioMmio>, Arc<NetStats>)>,
    pub thread: Option<EventThread>,
}

/// Opens the disks and the TAPs and puts a virtio-blk device for each disk, then a virtio-net
/// device for each network, in the next virtio-mmio slots, each with an irqfd for its interrupt
/// and ioeventfds for its queue notifications; starts the event thread.
pub(crate) fn attach(
    vm_fd: &VmFd,
    ram: &GuestRam,
    disk_cfgs: &[DiskConfig],
    net_cfgs: &[NetConfig],
    manager: &mut DeviceManager,
) -> crate::Result<Attached> {
    let count = disk_cfgs.len() + net_cfgs.len();
    if count > MAX_DEVICES {
        return Err(Error::InvalidConfig(format!(
            "at most {MAX_DEVICES} virtio devices (disks and networks), not {count}"
        )));
    }
    let mut disks = Vec::new();
    let mut nets = Vec::new();
    let mut devs = Vec::new();
    for cfg in disk_cfgs {
        let disk = Arc::new(Disk::open(cfg)?);
        let dev = Box::new(Block::new(disk.clone(), devs.len()));
        devs.push(add_slot(vm_fd, ram, devs.len(), dev, manager)?);
        disks.push(disk);
    }
    for cfg in net_cfgs {
        let tap = Tap::open(cfg)?;
        let stats = Arc::new(NetStats::default());
        let dev = Box::new(Net::new(tap, cfg.mac, stats.clone()));
        let slot = add_slot(vm_fd, ram, devs.len(), dev, manager)?;
        nets.push((slot.clone(), stats));
        devs.push(slot);
    }
    let thread = match devs.is_empty() {
        true => None,
        false => Some(EventThread::start(devs).map_err(io("starting the virtio event thread"))?),
    };
    Ok(Attached {
        disks,
        nets,
        thread,
    })
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.to_string();
    move |e: std::io::Error| Error::Io { what, source: e }
}

/// Puts `device` in slot `i`.
fn add_slot(
    vm_fd: &VmFd,
    ram: &GuestRam,
    i: usize,
    device: Box<dyn VirtioDevice>,
    manager: &mut DeviceManager,
) -> crate::Result<Arc<VirtioMmio>> {
    let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(io("eventfd for a virtio IRQ"))?;
    vm_fd
        .register_irqfd(&irq, IRQ_BASE + i as u32)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let dev = Arc::new(
        VirtioMmio::new(i as u32, device, ram.shared_memory(), irq)
            .map_err(io("eventfd for a virtio queue"))?,
    );
    for (q, n) in dev.notify.iter().enumerate() {
        let addr = kvm_ioctls::IoEventAddress::Mmio(dev.notify_addr());
        if let Err(e) = vm_fd.register_ioevent(n, &addr, q as u32) {
            // The vCPU then signals the same eventfd from the MMIO exit.
            tracing::warn!("no ioeventfd for virtio slot {i} ({e}): notifications exit");
        }
    }
    let base = MMIO_BASE + i as u64 * MMIO_SIZE;
    manager.add_mmio_device(dev.clone(), base..base + MMIO_SIZE, LoadStage::Devices);
    manager.add_state(
        Arc::new(mmio::DeviceSection::new(dev.clone())),
        LoadStage::Devices,
    );
    Ok(dev)
}
