//! The device manager: one list of everything that has state in the VM — the serial port, KVM's
//! in-kernel irqchips, PIT and clock, and every vCPU — which drives both port I/O dispatch and
//! migration. The section name is written once, in each device's schema; the VM description, the
//! save and the load all walk this list.
//!
//! A device is added with [`DeviceState`] (no default methods): one without state does not
//! compile into the list. A port that holds nothing at all (the power-off latch) is added with
//! [`DeviceManager::add_stateless_port`], which takes the reason it has no state in words. A
//! device that cannot migrate returns [`StateError::NotMigratable`] from its save, and the
//! migration fails naming it.
//!
//! ```compile_fail
//! use std::sync::Arc;
//! use tern_vmm::devices::{DeviceManager, LoadStage, PioOutcome, PortIo};
//! struct Beeper;
//! impl PortIo for Beeper {
//!     fn write(&self, _: u16, _: &[u8]) -> PioOutcome { PioOutcome::Done }
//!     fn read(&self, _: u16, _: &mut [u8]) {}
//!     fn quiesce(&self) {}
//! }
//! // Beeper has no DeviceState: it cannot be added as a device.
//! DeviceManager::default().add_device(Arc::new(Beeper), 0x61..0x62, LoadStage::Devices);
//! ```
//!
//! The same port, added with the reason it carries nothing, compiles:
//!
//! ```
//! # use std::sync::Arc;
//! # use tern_vmm::devices::{DeviceManager, PioOutcome, PortIo};
//! # struct Beeper;
//! # impl PortIo for Beeper {
//! #     fn write(&self, _: u16, _: &[u8]) -> PioOutcome { PioOutcome::Done }
//! #     fn read(&self, _: u16, _: &mut [u8]) {}
//! #     fn quiesce(&self) {}
//! # }
//! DeviceManager::default().add_stateless_port(Arc::new(Beeper), 0x61..0x62, "a beep has no state");
//! ```
//!
//! Order, on save (the VM paused, every vCPU parked after completing its pending I/O): the list
//! order, which is devices first (serial), then KVM's in-kernel devices (PIC master, PIC slave,
//! IOAPIC, PIT), then the KVM clock, then the vCPUs. On load, by [`LoadStage`]: the vCPUs first
//! (each sets its CPUID before anything that KVM checks against it), then devices, then the
//! interrupt controllers and the PIT, the clock last (advanced by the time the VM was stopped).

pub mod cpu;
pub mod kvm;
pub mod serial;
pub mod virtio;

use std::ops::Range;
use std::sync::Arc;

use tern_wire::{Schema, Section, SectionDesc, StateError};

use crate::vm::Vm;

/// Outcome of a port write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PioOutcome {
    Done,
    /// The guest asked to power off.
    Shutdown,
}

/// When a section loads, relative to the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoadStage {
    Vcpus,
    Devices,
    Interrupts,
    Clock,
}

/// What a load needs to know besides the section.
#[derive(Clone, Copy, Debug)]
pub struct LoadCtx {
    /// Wall-clock time of the load, in ns since the epoch (the guest's clocks are advanced by
    /// the time since the source saved them).
    pub now_ns: u64,
}

/// A device's or a piece of KVM state's migration state. No default methods.
pub trait DeviceState: Send + Sync {
    /// Its schema; the schema's name is the section name.
    fn schema(&self) -> &'static Schema;
    /// Which instance of its kind this is.
    fn instance(&self) -> u32;
    /// Saves the state (the VM is paused).
    fn save(&self, vm: &Vm) -> Result<Section, StateError>;
    /// Loads a section of its schema (any version the schema accepts); the vCPUs do not run.
    fn load(&self, vm: &Vm, section: &Section, ctx: &LoadCtx) -> Result<(), StateError>;
}

/// Port I/O, for devices the guest reaches through `in`/`out`.
pub trait PortIo: Send + Sync {
    /// A write at `offset` from the device's first port.
    fn write(&self, offset: u16, data: &[u8]) -> PioOutcome;
    /// A read at `offset`.
    fn read(&self, offset: u16, data: &mut [u8]);
    /// The vCPUs are parked: finish whatever is half done (a console's partial line).
    fn quiesce(&self);
}

/// Memory-mapped I/O, for devices the guest reaches through loads and stores to addresses with
/// no RAM behind them (virtio-mmio).
pub trait MmioIo: Send + Sync {
    /// A load at `offset` from the device's base.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A store at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
    /// The vCPUs are about to park: serve nothing more for now (what the guest queues meanwhile
    /// waits for [`Self::quiesce`]).
    fn hold(&self);
    /// The vCPUs are parked: finish what the guest asked for, then touch nothing until
    /// [`Self::resume`] (guest memory is frozen for a migration).
    fn quiesce(&self);
    /// The vCPUs are about to run.
    fn resume(&self);
}

struct Entry {
    state: Option<Arc<dyn DeviceState>>,
    io: Option<(Range<u16>, Arc<dyn PortIo>)>,
    mmio: Option<(Range<u64>, Arc<dyn MmioIo>)>,
    stage: LoadStage,
}

/// See the module documentation.
#[derive(Default)]
pub struct DeviceManager {
    entries: Vec<Entry>,
}

impl DeviceManager {
    /// A device with state and ports.
    pub fn add_device<D: DeviceState + PortIo + 'static>(
        &mut self,
        dev: Arc<D>,
        ports: Range<u16>,
        stage: LoadStage,
    ) {
        self.entries.push(Entry {
            state: Some(dev.clone()),
            io: Some((ports, dev)),
            mmio: None,
            stage,
        });
    }

    /// A device with state at guest-physical addresses `range`.
    pub fn add_mmio_device<D: DeviceState + MmioIo + 'static>(
        &mut self,
        dev: Arc<D>,
        range: Range<u64>,
        stage: LoadStage,
    ) {
        self.entries.push(Entry {
            state: Some(dev.clone()),
            io: None,
            mmio: Some((range, dev)),
            stage,
        });
    }

    /// State without ports (KVM's in-kernel devices, vCPUs).
    pub fn add_state<D: DeviceState + 'static>(&mut self, dev: Arc<D>, stage: LoadStage) {
        self.entries.push(Entry {
            state: Some(dev),
            io: None,
            mmio: None,
            stage,
        });
    }

    /// A port that holds no state at all; `why` says why, for whoever reads the code.
    pub fn add_stateless_port<D: PortIo + 'static>(
        &mut self,
        dev: Arc<D>,
        ports: Range<u16>,
        why: &'static str,
    ) {
        let _ = why;
        self.entries.push(Entry {
            state: None,
            io: Some((ports, dev)),
            mmio: None,
            stage: LoadStage::Devices,
        });
    }

    fn port(&self, port: u16) -> Option<(u16, &Arc<dyn PortIo>)> {
        self.entries.iter().find_map(|e| match &e.io {
            Some((r, io)) if r.contains(&port) => Some((port - r.start, io)),
            _ => None,
        })
    }

    /// A guest `out`.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioOutcome {
        match self.port(port) {
            Some((off, io)) => io.write(off, data),
            None => {
                tracing::trace!(port, ?data, "write to an unclaimed port");
                PioOutcome::Done
            }
        }
    }

    /// A guest `in` (an unclaimed port reads all ones, as on real hardware).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match self.port(port) {
            Some((off, io)) => io.read(off, data),
            None => data.fill(0xff),
        }
    }

    fn mmio(&self, addr: u64) -> Option<(u64, &Arc<dyn MmioIo>)> {
        self.entries.iter().find_map(|e| match &e.mmio {
            Some((r, io)) if r.contains(&addr) => Some((addr - r.start, io)),
            _ => None,
        })
    }

    /// A guest store to an address without RAM; false if no device is there.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.mmio(addr)
            .map(|(off, io)| io.write(off, data))
            .is_some()
    }

    /// A guest load from an address without RAM; false if no device is there.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.mmio(addr)
            .map(|(off, io)| io.read(off, data))
            .is_some()
    }

    /// The vCPUs are about to park: devices stop serving until [`Self::quiesce`].
    pub fn hold(&self) {
        for (_, io) in self.entries.iter().filter_map(|e| e.mmio.as_ref()) {
            io.hold();
        }
    }

    /// Every device finishes what is half done (the vCPUs are parked).
    pub fn quiesce(&self) {
        for (_, io) in self.entries.iter().filter_map(|e| e.io.as_ref()) {
            io.quiesce();
        }
        for (_, io) in self.entries.iter().filter_map(|e| e.mmio.as_ref()) {
            io.quiesce();
        }
    }

    /// The vCPUs are about to run: the devices may serve the guest again.
    pub fn resume(&self) {
        for (_, io) in self.entries.iter().filter_map(|e| e.mmio.as_ref()) {
            io.resume();
        }
    }

    fn states(&self) -> impl Iterator<Item = (&Arc<dyn DeviceState>, LoadStage)> {
        self.entries
            .iter()
            .filter_map(|e| e.state.as_ref().map(|s| (s, e.stage)))
    }

    /// The schemas of every section a save produces, for the VM description.
    pub fn schemas(&self) -> Vec<SectionDesc> {
        self.states()
            .map(|(s, _)| s.schema().describe(s.instance()))
            .collect()
    }

    /// Saves every device, in list order.
    pub fn save(&self, vm: &Vm) -> Result<Vec<Section>, StateError> {
        self.states().map(|(s, _)| s.save(vm)).collect()
    }

    /// Loads every device from `sections`, by stage. A section no device takes, a device without
    /// its section, or a section twice fails the load, naming it.
    pub fn load(&self, vm: &Vm, sections: &[Section], ctx: &LoadCtx) -> Result<(), StateError> {
        let key = |s: &Arc<dyn DeviceState>| (s.schema().name, s.instance());
        tern_wire::check_sections(sections, |name, instance| {
            self.states().any(|(d, _)| key(d) == (name, instance))
        })?;
        let mut order: Vec<_> = self.states().collect();
        order.sort_by_key(|(_, stage)| *stage);
        for (d, _) in order {
            let (name, instance) = key(d);
            let s = sections
                .iter()
                .find(|s| s.name == name && s.instance == instance)
                .ok_or_else(|| StateError::MissingSection {
                    section: name.into(),
                    instance,
                })?;
            d.load(vm, s, ctx)?;
        }
        Ok(())
    }
}

/// KVM's error as a state error of `what`.
pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Invalid {
        section: what.into(),
        reason: e.to_string(),
    }
}

/// Wall-clock time in ns since the epoch.
pub(crate) fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A KVM structure from its byte image.
pub(crate) fn from_bytes<T: zerocopy::FromBytes>(
    section: &str,
    field: &str,
    b: &[u8],
) -> Result<T, StateError> {
    T::read_from_bytes(b).map_err(|_| StateError::Invalid {
        section: section.into(),
        reason: format!(
            "field {field} is {} bytes, expected {}",
            b.len(),
            std::mem::size_of::<T>()
        ),
    })
}

/// A one-field section holding a KVM structure's byte image.
pub(crate) const fn bytes_field(name: &'static str) -> tern_wire::FieldSpec {
    tern_wire::FieldSpec {
        name,
        ty: tern_wire::FieldType::Bytes,
        since: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MachineConfig, SerialOutput};
    use tern_migrate::{SourceVm, TargetVm};

    static FUSSY: Schema = Schema {
        name: "test-fussy",
        version: 1,
        min_version: 1,
        fields: &[],
        subsections: &[],
    };

    /// A test-only device whose state lives in the host and cannot move.
    struct Fussy;

    impl DeviceState for Fussy {
        fn schema(&self) -> &'static Schema {
            &FUSSY
        }
        fn instance(&self) -> u32 {
            0
        }
        fn save(&self, _vm: &Vm) -> Result<Section, StateError> {
            Err(StateError::NotMigratable {
                device: FUSSY.name.into(),
                reason: "it holds host state".into(),
            })
        }
        fn load(&self, _vm: &Vm, _s: &Section, _ctx: &LoadCtx) -> Result<(), StateError> {
            Ok(())
        }
    }

    fn machine() -> MachineConfig {
        MachineConfig {
            memory: 32 << 20,
            memory_backend: Default::default(),
            dirty_ring_size: 0,
            vcpus: 2,
            serial: SerialOutput::Null,
            kvm_path: "/dev/kvm".into(),
            disks: vec![],
            nets: vec![],
            memory_fd: None,
        }
    }

    #[test]
    fn one_list_describes_saves_and_loads_every_device() {
        let vm = Vm::create(&machine()).unwrap();
        let names: Vec<String> = SourceVm::state_schemas(&*vm)
            .into_iter()
            .map(|d| format!("{}/{}", d.name, d.instance))
            .collect();
        assert_eq!(
            names,
            [
                "serial-16550/0",
                "kvm-irqchip/0",
                "kvm-irqchip/1",
                "kvm-irqchip/2",
                "kvm-pit/0",
                "kvm-clock/0",
                "cpu/0",
                "cpu/1"
            ]
        );
        let sections = SourceVm::save_state(&*vm).unwrap();
        assert_eq!(sections.len(), names.len());
        let target = Vm::create(&machine()).unwrap();
        TargetVm::load_state(&*target, &sections).unwrap();
        // One section short, or one too many: named.
        let e = TargetVm::load_state(&*target, &sections[1..]).unwrap_err();
        assert!(e.to_string().contains("serial-16550"), "{e}");
        let mut extra = sections.clone();
        extra[0].instance = 7;
        let e = TargetVm::load_state(&*target, &extra).unwrap_err();
        assert!(e.to_string().contains("serial-16550"), "{e}");
    }

    #[test]
    fn a_device_that_cannot_migrate_fails_the_save_naming_itself() {
        let vm = Vm::create_with(&machine(), |m| {
            m.add_state(Arc::new(Fussy), LoadStage::Devices)
        })
        .unwrap();
        assert!(SourceVm::state_schemas(&*vm)
            .iter()
            .any(|d| d.name == "test-fussy"));
        let e = SourceVm::save_state(&*vm).unwrap_err().to_string();
        assert!(e.contains("test-fussy") && e.contains("host state"), "{e}");
        // A target that has it refuses a stream without its section, naming it.
        let plain = Vm::create(&machine()).unwrap();
        let sections = SourceVm::save_state(&*plain).unwrap();
        let e = TargetVm::load_state(&*vm, &sections)
            .unwrap_err()
            .to_string();
        assert!(e.contains("test-fussy"), "{e}");
    }
}
