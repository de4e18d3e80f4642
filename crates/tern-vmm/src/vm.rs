//! The VM: KVM objects, memory, devices and vCPU threads, and its lifecycle.

use std::ffi::CString;
use std::os::fd::FromRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;

use kvm_bindings::CpuId;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::boot::{self, BootInfo};
use crate::devices::cpu::Vcpu;
use crate::devices::kvm::{Clock, IrqChip, Pit};
use crate::devices::serial::{SerialPort, ShutdownPort};
use crate::devices::virtio::mmio::VirtioMmio;
use crate::devices::virtio::net::NetStats;
use crate::devices::virtio::{self, event::EventThread};
use crate::devices::{DeviceManager, LoadStage};
use crate::dirty_ring::DirtyRings;
use crate::disk::{Disk, DiskConfig};
use crate::error::kvm as kvm_err;
use crate::memory::{GuestRam, MemoryBackend};
use crate::serial::{IrqTrigger, SerialDevice, SerialOutput, SerialSink, COM1_BASE, COM1_IRQ};
use crate::tap::NetConfig;
use crate::vcpu::{self, Control};
use crate::{cpuid, Error, Result, MAX_VCPUS};

/// Port the built-in guest (and QEMU's q35 ACPI PM1a control) powers off through.
pub const SHUTDOWN_PORT: u16 = 0x604;
/// Where KVM puts the TSS it needs on Intel (three pages below the 4 GiB boundary area).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// How a VM is built.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The ELF kernel image.
    pub kernel: Vec<u8>,
    /// Kernel command line.
    pub cmdline: String,
    /// An initial RAM disk (Linux's initrd; a PVH module for an ELF kernel).
    pub initrd: Option<Vec<u8>>,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// What backs guest RAM.
    pub memory_backend: MemoryBackend,
    /// Entries of each vCPU's dirty ring; 0 tracks writes with the dirty bitmap instead.
    pub dirty_ring_size: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Serial console output.
    pub serial: SerialOutput,
    /// The KVM device node.
    pub kvm_path: PathBuf,
    /// virtio-blk disks, in slot order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices on TAPs, in the slots after the disks.
    pub nets: Vec<NetConfig>,
}

/// Whether the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

/// Why a VM stopped for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest shut down (QEMU's SHUTDOWN reason string).
    Shutdown(&'static str),
    /// The VM cannot go on.
    Error(String),
}

/// The device manager and the exit notification, shared with the vCPU threads.
pub(crate) struct Devices {
    pub(crate) manager: DeviceManager,
    /// The dirty rings, if the VM tracks writes with them (vCPU threads harvest a full one).
    pub(crate) dirty_rings: Option<Arc<DirtyRings>>,
    exit: Mutex<Option<VmExit>>,
    exit_cv: Condvar,
}

impl Devices {
    /// Records the first reason the VM stopped and wakes whoever waits for it.
    pub(crate) fn report_exit(&self, exit: VmExit) {
        let mut e = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some(exit);
        }
        self.exit_cv.notify_all();
    }
}

/// A virtual machine.
pub struct Vm {
    pub(crate) kvm: Kvm,
    pub(crate) vm_fd: VmFd,
    pub(crate) ram: GuestRam,
    pub(crate) devices: Arc<Devices>,
    pub(crate) control: Arc<Control>,
    pub(crate) vcpu_fds: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// This VM, for threads that must not keep it alive (the throttle timer).
    pub(crate) me: std::sync::Weak<Vm>,
    /// Whether the throttle timer thread runs.
    pub(crate) throttle_thread: Mutex<bool>,
    state: Mutex<RunState>,
    started: std::sync::atomic::AtomicBool,
    vcpus: u32,
    pub(crate) supported_cpuid: CpuId,
    pub(crate) tsc_khz: Option<u32>,
    pub(crate) dirty_logging: std::sync::atomic::AtomicBool,
    /// The dirty log runs in manual-protect mode.
    pub(crate) dirty_manual: std::sync::atomic::AtomicBool,
    pub(crate) dirty_buf: crate::dirty::LogBuffer,
    boot: Mutex<Option<BootInfo>>,
    /// The disks behind the virtio-blk devices, in slot order.
    pub(crate) disks: Vec<Arc<Disk>>,
    /// The virtio-net devices and their counters, in slot order.
    pub(crate) nets: Vec<(Arc<VirtioMmio>, Arc<NetStats>)>,
    /// The MACs of the virtio-net devices, in slot order.
    pub(crate) net_macs: Vec<[u8; 6]>,
    /// Which announce schedule runs (a new one stops the one before).
    pub(crate) announce_gen: std::sync::atomic::AtomicU64,
    /// Serves the virtio devices' queues (dropped, it stops).
    _virtio_io: Option<EventThread>,
    /// `-S` on a target: GO loads the guest but does not run it.
    pub(crate) hold_at_go: std::sync::atomic::AtomicBool,
    /// Whether the next migration copies the disks that are neither shared nor read-only.
    pub(crate) copy_disks: std::sync::atomic::AtomicBool,
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

pub(crate) fn open_kvm(path: &std::path::Path) -> Result<Kvm> {
    let display = path.display().to_string();
    let cpath = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::OpenKvm {
        path: display.clone(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let fd = Kvm::open_with_cloexec_at(&cpath, true).map_err(|e| Error::OpenKvm {
        path: display.clone(),
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let kvm = unsafe { Kvm::from_raw_fd(fd) };
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(Error::NotKvm {
            path: display,
            source: std::io::Error::from_raw_os_error(-version),
        });
    }
    if version != 12 {
        return Err(Error::KvmApiVersion(version));
    }
    Ok(kvm)
}

/// The machine without its software: RAM size, vCPUs, devices.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub memory: u64,
    pub memory_backend: MemoryBackend,
    /// Entries of each vCPU's dirty ring (QEMU's `dirty-ring-size`); 0: the dirty bitmap.
    pub dirty_ring_size: u32,
    pub vcpus: u32,
    pub serial: SerialOutput,
    pub kvm_path: PathBuf,
    /// virtio-blk disks, in slot order (a target's must match the source's).
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, after the disks (a target's must match the source's).
    pub nets: Vec<NetConfig>,
    /// Guest RAM handed over by another process (`cpr-transfer`): map this memfd instead of
    /// allocating.
    pub memory_fd: Option<Arc<std::os::fd::OwnedFd>>,
}

impl Vm {
    /// Builds the VM and boots `cfg.kernel` on it: the vCPUs run when this returns.
    pub fn start(cfg: VmConfig) -> Result<Arc<Vm>> {
        let vm = Vm::boot_paused(cfg)?;
        vm.start_vcpus()?;
        Ok(vm)
    }

    /// Builds the VM and boots `cfg.kernel` on it, the vCPUs waiting for [`Vm::resume`] (QEMU's
    /// `-S`).
    pub fn boot_paused(cfg: VmConfig) -> Result<Arc<Vm>> {
        let vm = Vm::create(&MachineConfig {
            memory: cfg.memory,
            memory_backend: cfg.memory_backend,
            dirty_ring_size: cfg.dirty_ring_size,
            vcpus: cfg.vcpus,
            serial: cfg.serial.clone(),
            kvm_path: cfg.kvm_path.clone(),
            disks: cfg.disks.clone(),
            nets: cfg.nets.clone(),
            memory_fd: None,
        })?;
        vm.boot(&cfg.kernel, &cfg.cmdline, cfg.initrd.as_deref())?;
        Ok(vm)
    }

    /// Whether a migration's GO starts the vCPUs (true) or leaves the loaded guest paused until
    /// [`Vm::resume`] (`-S`).
    pub fn set_autostart(&self, on: bool) {
        self.hold_at_go
            .store(!on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a disk is `shared=on` (its ownership passes with a migration).
    pub fn has_shared_disks(&self) -> bool {
        self.disks.iter().any(|d| d.config().shared)
    }

    /// Whether the next migration copies the disks that are neither shared nor read-only (not
    /// into a saved file: there they stay as the guest left them).
    pub fn set_copy_disks(&self, on: bool) {
        self.copy_disks
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Builds the machine (KVM VM, RAM, irqchip, PIT, serial, vCPUs) without booting anything.
    pub fn create(cfg: &MachineConfig) -> Result<Arc<Vm>> {
        Self::create_with(cfg, |_| {})
    }

    /// [`Vm::create`], with `extra` adding devices to the manager before the vCPUs join it.
    pub(crate) fn create_with(
        cfg: &MachineConfig,
        extra: impl FnOnce(&mut DeviceManager),
    ) -> Result<Arc<Vm>> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(Error::InvalidConfig(format!(
                "vcpus must be between 1 and {MAX_VCPUS}, not {}",
                cfg.vcpus
            )));
        }
        let kvm = open_kvm(&cfg.kvm_path)?;
        let max = kvm.get_max_vcpus();
        if cfg.vcpus as usize > max {
            return Err(Error::InvalidConfig(format!(
                "this host's KVM allows at most {max} vCPUs, not {}",
                cfg.vcpus
            )));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCap(name));
            }
        }
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let ram = match &cfg.memory_fd {
            Some(fd) => GuestRam::from_memfd(
                cfg.memory,
                std::fs::File::from(fd.try_clone().map_err(|e| Error::Io {
                    what: "dup of the memory handed over".into(),
                    source: e,
                })?),
            )?,
            None => GuestRam::with_backend(cfg.memory, cfg.memory_backend)?,
        };
        set_memory_slots(&vm_fd, &ram, 0)?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| Error::Io {
            what: "eventfd for the serial IRQ".into(),
            source: e,
        })?;
        vm_fd
            .register_irqfd(&irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let irq_clone = irq.try_clone().map_err(|e| Error::Io {
            what: "eventfd for the serial IRQ".into(),
            source: e,
        })?;
        // One list: I/O dispatch, quiesce, the VM description, save and load all walk it.
        let mut manager = DeviceManager::default();
        let sink = SerialSink::open(&cfg.serial).map_err(|e| Error::Io {
            what: format!("opening the serial output {:?}", cfg.serial),
            source: e,
        })?;
        manager.add_device(
            Arc::new(SerialPort::new(
                SerialDevice::new(IrqTrigger(irq), sink),
                irq_clone,
            )),
            COM1_BASE..COM1_BASE + 8,
            LoadStage::Devices,
        );
        manager.add_stateless_port(
            Arc::new(ShutdownPort),
            SHUTDOWN_PORT..SHUTDOWN_PORT + 2,
            "a write-only power-off latch: nothing to carry",
        );
        for chip in [0, 1, 2] {
            manager.add_state(Arc::new(IrqChip(chip)), LoadStage::Interrupts);
        }
        manager.add_state(Arc::new(Pit), LoadStage::Interrupts);
        manager.add_state(Arc::new(Clock), LoadStage::Clock);
        let virtio = virtio::attach(&vm_fd, &ram, &cfg.disks, &cfg.nets, &mut manager)?;
        extra(&mut manager);

        if cfg.dirty_ring_size > 0 {
            DirtyRings::enable(&vm_fd, cfg.dirty_ring_size).map_err(|e| Error::Io {
                what: "enabling the dirty ring".into(),
                source: e,
            })?;
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpu_fds = Vec::new();
        let mut tsc_khz = None;
        for i in 0..cfg.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            tsc_khz = fd.get_tsc_khz().ok();
            fd.set_cpuid2(&cpuid::filter(&supported_cpuid, i, cfg.vcpus, tsc_khz))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            let fd = Arc::new(Mutex::new(fd));
            manager.add_state(
                Arc::new(Vcpu {
                    index: i,
                    fd: fd.clone(),
                }),
                LoadStage::Vcpus,
            );
            vcpu_fds.push(fd);
        }

        let dirty_rings = if cfg.dirty_ring_size > 0 {
            let fds: Vec<_> = vcpu_fds.iter().map(|f| vcpu::lock(f)).collect();
            let refs: Vec<&kvm_ioctls::VcpuFd> = fds.iter().map(|g| &**g).collect();
            let sizes: Vec<u64> = ram.regions().iter().map(|r| r.size).collect();
            let rings =
                DirtyRings::new(&vm_fd, &refs, cfg.dirty_ring_size, &sizes).map_err(|e| {
                    Error::Io {
                        what: "mapping the dirty rings".into(),
                        source: e,
                    }
                })?;
            Some(Arc::new(rings))
        } else {
            None
        };

        static SIGNAL: Once = Once::new();
        let mut sig_result = Ok(());
        SIGNAL.call_once(|| {
            sig_result = register_signal_handler(kick_signal(), vcpu::kick_handler);
        });
        sig_result.map_err(|e| Error::Io {
            what: "installing the vCPU kick signal handler".into(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;

        Ok(Arc::new_cyclic(|me| Vm {
            me: me.clone(),
            throttle_thread: Mutex::new(false),
            kvm,
            vm_fd,
            ram,
            devices: Arc::new(Devices {
                manager,
                dirty_rings,
                exit: Mutex::new(None),
                exit_cv: Condvar::new(),
            }),
            control: Arc::new(Control::new(cfg.vcpus)),
            vcpu_fds,
            threads: Mutex::new(Vec::new()),
            state: Mutex::new(RunState::Paused),
            started: std::sync::atomic::AtomicBool::new(false),
            vcpus: cfg.vcpus,
            supported_cpuid,
            tsc_khz,
            dirty_logging: std::sync::atomic::AtomicBool::new(false),
            dirty_manual: std::sync::atomic::AtomicBool::new(false),
            dirty_buf: Default::default(),
            boot: Mutex::new(None),
            disks: virtio.disks,
            nets: virtio.nets,
            net_macs: cfg.nets.iter().map(|n| n.mac).collect(),
            announce_gen: Default::default(),
            _virtio_io: virtio.thread,
            hold_at_go: std::sync::atomic::AtomicBool::new(false),
            copy_disks: std::sync::atomic::AtomicBool::new(true),
        }))
    }

    /// Loads a kernel and puts the vCPUs in its PVH entry state.
    pub fn boot(&self, kernel: &[u8], cmdline: &str, initrd: Option<&[u8]>) -> Result<()> {
        // Each virtio device is announced as Linux (and QEMU's microvm) expects.
        let mut cmdline = cmdline.to_string();
        for i in 0..self.disks.len() + self.nets.len() {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&virtio::cmdline_entry(i));
        }
        let boot = boot::load(&self.ram, kernel, &cmdline, self.vcpus, initrd)?;
        if self.vcpus > 1 && boot.ap_entry.is_none() {
            tracing::warn!(
                "the kernel names no AP entry (Tern note); vCPUs 1.. will wait for INIT/SIPI"
            );
        }
        for (i, fd) in self.vcpu_fds.iter().enumerate() {
            if i == 0 || boot.ap_entry.is_some() {
                vcpu::setup(&vcpu::lock(fd), &boot, i as u32)?;
            }
        }
        *self.boot.lock().unwrap_or_else(|e| e.into_inner()) = Some(boot);
        Ok(())
    }

    /// Starts the vCPU threads (once).
    pub fn start_vcpus(&self) -> Result<()> {
        if self.started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.devices.manager.resume();
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for (i, fd) in self.vcpu_fds.iter().enumerate() {
            let (d, c, fd) = (self.devices.clone(), self.control.clone(), fd.clone());
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu::run(fd, i as u32, d, c))
                .map_err(|e| Error::Io {
                    what: "spawning a vCPU thread".into(),
                    source: e,
                })?;
            threads.push(h);
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = RunState::Running;
        Ok(())
    }

    pub(crate) fn kick_all(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for t in threads.iter() {
            // SAFETY: the pthread handle belongs to a thread we spawned and have not joined;
            // the kick signal has a handler installed, so delivery cannot kill the process.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Pauses every vCPU and returns once all are parked outside `KVM_RUN`.
    pub fn pause(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == RunState::Paused || !self.started.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // The devices first: what the guest queues while its vCPUs park is served by the
        // quiesce below, counted as in flight at the pause.
        self.devices.manager.hold();
        self.control.request_pause();
        self.kick_all();
        self.control.wait_parked();
        *state = RunState::Paused;
        // Devices finish what is half done (a console's partial line: a migration would lose it).
        self.devices.manager.quiesce();
    }

    /// Asks every vCPU to stop and returns at once: a vCPU blocked in the kernel on a page that
    /// will never come (a failed on-demand restore) cannot park, and waiting for it would hang.
    /// The others stop within a kick.
    pub fn halt(&self) {
        // The devices too: they serve nothing more (without waiting for one stuck on a page).
        self.devices.manager.hold();
        if self.started.load(std::sync::atomic::Ordering::SeqCst) {
            self.control.request_pause();
            self.kick_all();
        }
    }

    /// Resumes every vCPU and returns once all have left the parking lot (or starts them, on a
    /// VM that never ran).
    pub fn resume(&self) {
        if !self.started.load(std::sync::atomic::Ordering::SeqCst) {
            if let Err(e) = self.start_vcpus() {
                self.request_exit(VmExit::Error(format!("cannot start the vCPUs: {e}")));
            }
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == RunState::Running {
            return;
        }
        self.devices.manager.resume();
        self.control.resume();
        *state = RunState::Running;
    }

    /// Writes `value` at guest address `addr` as a device would (recorded in the VMM's dirty
    /// bitmap), only while the guest runs: a paused guest's memory is frozen — a migration may
    /// be sending its last pages. Holding the run state's lock orders the write wholly before
    /// or after a pause.
    pub fn write_guest_u64(&self, addr: u64, value: u64) -> std::result::Result<(), String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state != RunState::Running {
            return Err("the guest is paused: its memory is frozen".into());
        }
        use vm_memory::Bytes;
        self.ram
            .memory()
            .write_obj(value, vm_memory::GuestAddress(addr))
            .map_err(|e| format!("cannot write at {addr:#x}: {e}"))
    }

    /// Whether the guest runs.
    pub fn state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the VM stops for good.
    pub fn wait_exit(&self) -> VmExit {
        let mut e = self.devices.exit.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(exit) = e.clone() {
                return exit;
            }
            e = self
                .devices
                .exit_cv
                .wait(e)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Ends the VM from the host side (QMP `quit`): wakes `wait_exit` with this reason.
    pub fn request_exit(&self, exit: VmExit) {
        self.devices.report_exit(exit);
    }

    /// Stops the vCPU threads and joins them.
    pub fn shutdown(&self) {
        self.control.request_stop();
        self.kick_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// How the guest was booted (None for a VM that came from a migration).
    pub fn boot_info(&self) -> Option<BootInfo> {
        *self.boot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }
}

/// Registers the RAM regions as KVM memory slots (slot = region index) with `flags`.
pub(crate) fn set_memory_slots(vm_fd: &VmFd, ram: &GuestRam, flags: u32) -> Result<()> {
    for (slot, (region, host)) in ram.regions().iter().zip(ram.host_addrs()).enumerate() {
        let mr = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start,
            memory_size: region.size,
            userspace_addr: host,
        };
        // SAFETY: the mapping at `host` is `region.size` bytes of guest RAM owned by `ram`,
        // which lives as long as the VM (both are fields of `Vm`).
        unsafe { vm_fd.set_user_memory_region(mr) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}
