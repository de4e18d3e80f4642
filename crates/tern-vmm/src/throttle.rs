//! Auto-converge's vCPU throttle: a timer thread that kicks the vCPUs out of the guest so that
//! they sleep part of their time.

use crate::vcpu;
use crate::vm::Vm;

impl Vm {
    /// Auto-converge: takes `percent` (0-99) of every vCPU's time away. As in QEMU, a timer
    /// kicks each vCPU out of the guest every `10 ms / (1 - p)`, and the vCPU thread then sleeps
    /// `10 ms * p / (1 - p)` (a pause or stop request wakes it at once).
    pub fn set_throttle(&self, percent: u8) {
        let percent = percent.min(99);
        self.control.set_throttle(percent);
        let mut running = self
            .throttle_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if percent == 0 || *running {
            return;
        }
        let me = self.me.clone();
        let spawned = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || loop {
                let Some(vm) = me.upgrade() else { return };
                let p = vm.control.throttle();
                if p == 0 || vm.control.stopping() {
                    *vm.throttle_thread.lock().unwrap_or_else(|e| e.into_inner()) = false;
                    return;
                }
                vm.kick_all();
                drop(vm);
                let run = vcpu::THROTTLE_TIMESLICE.as_secs_f64();
                std::thread::sleep(std::time::Duration::from_secs_f64(
                    run / (1.0 - f64::from(p) / 100.0),
                ));
            });
        match spawned {
            Ok(_) => *running = true,
            Err(e) => tracing::warn!("cannot start the vCPU throttle timer: {e}"),
        }
    }
}
