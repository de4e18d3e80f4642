//! vCPU threads: setup in the PVH entry state, the run loop, and the pause handshake.
//!
//! A pause sets a flag, then kicks every vCPU thread with a signal whose handler sets
//! `immediate_exit` in that thread's `kvm_run`; the thread leaves `KVM_RUN` (or does not enter it)
//! and parks, counting itself. The pauser waits on a condition variable until all have parked —
//! no sleeps. The signal closes the race between checking the flag and entering the guest.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_regs, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot::{BootInfo, BOOT_GDT_ADDR};
use crate::devices::PioOutcome;
use crate::error::kvm;
use crate::vm::{Devices, VmExit};
use crate::Result;

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal's handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Handler of the kick signal: make the current (or next) `KVM_RUN` return at once.
pub(crate) extern "C" fn kick_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` points into this thread's kvm_run mapping, which lives as long as the
        // thread's VcpuFd; the kernel only reads the byte on the next KVM_RUN.
        unsafe { p.write_volatile(1) };
    }
}

/// Sets a vCPU up in the PVH entry state: 32-bit protected mode, flat segments, paging off.
pub(crate) fn setup(vcpu: &VcpuFd, boot: &BootInfo, index: u32) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_bindings::kvm_segment {
        selector: 0x10,
        type_: 0x3,
        ..code
    };
    let tss = kvm_bindings::kvm_segment {
        selector: 0x18,
        limit: 0x67,
        type_: 0xb,
        s: 0,
        db: 0,
        g: 0,
        ..code
    };
    // PVH: code 0x08, data 0x10, TSS 0x18. Linux's 32-bit protocol: __BOOT_CS 0x10,
    // __BOOT_DS 0x18, TSS 0x20 (the GDT boot::load wrote matches).
    let (code, data, tss, entries) = match boot.linux {
        false => (code, data, tss, 4),
        true => (
            kvm_bindings::kvm_segment {
                selector: 0x10,
                ..code
            },
            kvm_bindings::kvm_segment {
                selector: 0x18,
                ..data
            },
            kvm_bindings::kvm_segment {
                selector: 0x20,
                ..tss
            },
            5,
        ),
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = entries * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    if index == 0 && boot.linux {
        regs.rip = boot.entry;
        regs.rsi = boot.start_info;
    } else if index == 0 {
        regs.rip = boot.entry;
        regs.rbx = boot.start_info;
    } else {
        // Only called with an AP entry present.
        regs.rip = boot.ap_entry.unwrap_or(boot.entry);
        regs.rsi = u64::from(index);
    }
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    // APs would otherwise wait for INIT/SIPI, which tern does not send.
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(kvm("KVM_SET_MP_STATE"))?;
    Ok(())
}

/// How long a throttled vCPU runs between two sleeps (QEMU's CPU_THROTTLE_TIMESLICE).
pub(crate) const THROTTLE_TIMESLICE: Duration = Duration::from_millis(10);

/// The pause handshake between the VMM and its vCPU threads.
pub(crate) struct Control {
    pause_requested: AtomicBool,
    stop_requested: AtomicBool,
    /// Auto-converge: percent of vCPU time to sleep away.
    throttle: AtomicU8,
    state: Mutex<ControlState>,
    cv: Condvar,
}

struct ControlState {
    pause: bool,
    parked: u32,
    alive: u32,
}

impl Control {
    pub(crate) fn new(threads: u32) -> Self {
        Control {
            pause_requested: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
            state: Mutex::new(ControlState {
                pause: false,
                parked: 0,
                alive: threads,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks all vCPUs to park; the caller then kicks them and calls [`Self::wait_parked`].
    pub(crate) fn request_pause(&self) {
        let mut s = self.lock();
        s.pause = true;
        self.pause_requested.store(true, Ordering::SeqCst);
        // A throttled vCPU sleeping on the condition variable parks at once.
        self.cv.notify_all();
    }

    pub(crate) fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent, Ordering::SeqCst);
    }

    pub(crate) fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::SeqCst)
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }

    /// A throttled vCPU's sleep after a timeslice in the guest; cut short by a pause or stop.
    fn throttle_sleep(&self) {
        let p = self.throttle();
        if p == 0 {
            return;
        }
        let p = f64::from(p.min(99)) / 100.0;
        let until = Instant::now() + THROTTLE_TIMESLICE.mul_f64(p / (1.0 - p));
        let mut s = self.lock();
        loop {
            let now = Instant::now();
            if now >= until
                || s.pause
                || self.stop_requested.load(Ordering::SeqCst)
                || self.throttle() == 0
            {
                return;
            }
            s = self
                .cv
                .wait_timeout(s, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until every live vCPU thread has parked.
    pub(crate) fn wait_parked(&self) {
        let mut s = self.lock();
        while s.parked < s.alive {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Lets the vCPUs run again and waits until all have left the parking lot.
    pub(crate) fn resume(&self) {
        let mut s = self.lock();
        s.pause = false;
        self.pause_requested.store(false, Ordering::SeqCst);
        self.cv.notify_all();
        while s.parked > 0 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Asks the vCPU threads to exit (they are kicked by the caller).
    pub(crate) fn request_stop(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
        let _s = self.lock();
        self.cv.notify_all();
    }

    fn park(&self) {
        let mut s = self.lock();
        s.parked += 1;
        self.cv.notify_all();
        while s.pause && !self.stop_requested.load(Ordering::SeqCst) {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
        self.cv.notify_all();
    }

    fn thread_exited(&self) {
        let mut s = self.lock();
        s.alive -= 1;
        self.cv.notify_all();
    }
}

/// Body of a vCPU thread: runs the guest until the VM exits or is stopped. The thread holds
/// the vCPU's lock only while in `KVM_RUN`, so that a paused vCPU's state can be read and
/// written by the migration thread.
pub(crate) fn run(
    vcpu: Arc<Mutex<VcpuFd>>,
    index: u32,
    devices: Arc<Devices>,
    control: Arc<Control>,
) {
    let ie: *mut u8 = &mut lock(&vcpu).get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(ie));
    let outcome = run_loop(&vcpu, index, &devices, &control);
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    control.thread_exited();
    if let Some(exit) = outcome {
        devices.report_exit(exit);
    }
}

/// What one `KVM_RUN` led to.
enum Step {
    Continue,
    Interrupted,
    InternalError,
    Exit(VmExit),
}

pub(crate) fn lock(v: &Mutex<VcpuFd>) -> MutexGuard<'_, VcpuFd> {
    v.lock().unwrap_or_else(|e| e.into_inner())
}

fn run_loop(
    vcpu: &Mutex<VcpuFd>,
    index: u32,
    devices: &Devices,
    control: &Control,
) -> Option<VmExit> {
    loop {
        if control.stop_requested.load(Ordering::SeqCst) {
            return None;
        }
        if control.pause_requested.load(Ordering::SeqCst) {
            // Let KVM finish an instruction whose I/O we just emulated, so that the state a
            // migration reads is complete (KVM's rule for KVM_RUN with immediate_exit).
            {
                let mut v = lock(vcpu);
                v.set_kvm_immediate_exit(1);
                let _ = v.run();
                v.set_kvm_immediate_exit(0);
            }
            control.park();
            continue;
        }
        let mut guard = lock(vcpu);
        let vcpu = &mut *guard;
        let step = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => match devices.manager.pio_write(port, data) {
                PioOutcome::Done => Step::Continue,
                PioOutcome::Shutdown => Step::Exit(VmExit::Shutdown("guest-shutdown")),
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                devices.manager.pio_read(port, data);
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !devices.manager.mmio_read(addr, data) {
                    tracing::debug!(vcpu = index, addr, "MMIO read of unbacked memory");
                    data.fill(0xff);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !devices.manager.mmio_write(addr, data) {
                    tracing::debug!(vcpu = index, addr, "MMIO write to unbacked memory");
                }
                Step::Continue
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Step::Continue,
            Ok(VcpuExit::Shutdown) => Step::Exit(VmExit::Shutdown("guest-triple-fault")),
            Ok(VcpuExit::SystemEvent(ty, _)) => Step::Exit(VmExit::Shutdown(
                if ty == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    "guest-reset"
                } else {
                    "guest-shutdown"
                },
            )),
            Ok(VcpuExit::InternalError) => Step::InternalError,
            Ok(VcpuExit::Unsupported(crate::dirty_ring::EXIT_DIRTY_RING_FULL)) => {
                // The ring is full: this vCPU cannot run until it is harvested.
                match devices
                    .dirty_rings
                    .as_ref()
                    .map(|r| r.harvest(Some(index as usize)))
                {
                    Some(Ok(_)) => Step::Continue,
                    Some(Err(e)) => Step::Exit(VmExit::Error(format!(
                        "vCPU {index}: harvesting its dirty ring: {e}"
                    ))),
                    None => Step::Exit(VmExit::Error(format!(
                        "vCPU {index}: dirty ring full without a ring"
                    ))),
                }
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Step::Exit(VmExit::Error(format!(
                "vCPU {index}: VM entry failed (hardware reason {reason:#x} on cpu {cpu})"
            ))),
            Ok(other) => Step::Exit(VmExit::Error(format!(
                "vCPU {index}: unexpected exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Interrupted,
            Err(e) => Step::Exit(VmExit::Error(format!("vCPU {index}: KVM_RUN failed: {e}"))),
        };
        match step {
            Step::Continue => {}
            Step::Interrupted => {
                vcpu.set_kvm_immediate_exit(0);
                drop(guard);
                control.throttle_sleep();
            }
            Step::InternalError => return Some(VmExit::Error(internal_error(vcpu, index))),
            Step::Exit(exit) => return Some(exit),
        }
    }
}

fn internal_error(vcpu: &mut VcpuFd, index: u32) -> String {
    let rip = vcpu.get_regs().map_or(0, |r| r.rip);
    let run = vcpu.get_kvm_run();
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    format!(
        "vCPU {index}: KVM internal error (suberror {}) at rip {rip:#x}",
        internal.suberror
    )
}
