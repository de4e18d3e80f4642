//! KVM's in-kernel devices as device-manager entries: the PIC master and slave and the IOAPIC
//! (one `kvm-irqchip` section each), the PIT, and the KVM clock (advanced on load by the time
//! the VM was stopped, so the guest's clock keeps real time).

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use tern_wire::{
    FieldSpec, FieldType, Schema, Section, SectionBuilder, SectionReader, StateError, Value,
};
use zerocopy::IntoBytes;

use super::{bytes_field, from_bytes, kvm_err, realtime_ns, DeviceState, LoadCtx};
use crate::vm::Vm;

static IRQCHIP: Schema = Schema {
    name: "kvm-irqchip",
    version: 1,
    min_version: 1,
    fields: &[bytes_field("chip")],
    subsections: &[],
};

static PIT: Schema = Schema {
    name: "kvm-pit",
    version: 1,
    min_version: 1,
    fields: &[bytes_field("state")],
    subsections: &[],
};

static CLOCK: Schema = Schema {
    name: "kvm-clock",
    version: 1,
    min_version: 1,
    fields: &[
        FieldSpec {
            name: "clock_ns",
            ty: FieldType::U64,
            since: 1,
        },
        FieldSpec {
            name: "flags",
            ty: FieldType::U32,
            since: 1,
        },
        FieldSpec {
            name: "realtime_ns",
            ty: FieldType::U64,
            since: 1,
        },
    ],
    subsections: &[],
};

/// One of the in-kernel interrupt controllers: 0 PIC master, 1 PIC slave, 2 IOAPIC.
pub struct IrqChip(pub u32);

impl DeviceState for IrqChip {
    fn schema(&self) -> &'static Schema {
        &IRQCHIP
    }
    fn instance(&self) -> u32 {
        self.0
    }
    fn save(&self, vm: &Vm) -> Result<Section, StateError> {
        let mut chip = kvm_irqchip {
            chip_id: self.0,
            ..Default::default()
        };
        vm.vm_fd
            .get_irqchip(&mut chip)
            .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        SectionBuilder::new(&IRQCHIP, self.0)
            .field("chip", Value::Bytes(chip.as_bytes().to_vec()))?
            .build()
    }
    fn load(&self, vm: &Vm, s: &Section, _: &LoadCtx) -> Result<(), StateError> {
        let r = SectionReader::new(&IRQCHIP, s)?;
        let chip: kvm_irqchip = from_bytes("kvm-irqchip", "chip", r.bytes("chip")?)?;
        if chip.chip_id != self.0 {
            return Err(StateError::Invalid {
                section: "kvm-irqchip".into(),
                reason: "chip id mismatch".into(),
            });
        }
        vm.vm_fd
            .set_irqchip(&chip)
            .map_err(kvm_err("KVM_SET_IRQCHIP"))
    }
}

/// The in-kernel PIT.
pub struct Pit;

impl DeviceState for Pit {
    fn schema(&self) -> &'static Schema {
        &PIT
    }
    fn instance(&self) -> u32 {
        0
    }
    fn save(&self, vm: &Vm) -> Result<Section, StateError> {
        let pit = vm.vm_fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
        SectionBuilder::new(&PIT, 0)
            .field("state", Value::Bytes(pit.as_bytes().to_vec()))?
            .build()
    }
    fn load(&self, vm: &Vm, s: &Section, _: &LoadCtx) -> Result<(), StateError> {
        let r = SectionReader::new(&PIT, s)?;
        let pit: kvm_pit_state2 = from_bytes("kvm-pit", "state", r.bytes("state")?)?;
        vm.vm_fd.set_pit2(&pit).map_err(kvm_err("KVM_SET_PIT2"))
    }
}

/// The KVM clock.
pub struct Clock;

impl DeviceState for Clock {
    fn schema(&self) -> &'static Schema {
        &CLOCK
    }
    fn instance(&self) -> u32 {
        0
    }
    fn save(&self, vm: &Vm) -> Result<Section, StateError> {
        let clock = vm.vm_fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        SectionBuilder::new(&CLOCK, 0)
            .field("clock_ns", Value::U64(clock.clock))?
            .field("flags", Value::U32(clock.flags))?
            .field("realtime_ns", Value::U64(realtime_ns()))?
            .build()
    }
    fn load(&self, vm: &Vm, s: &Section, ctx: &LoadCtx) -> Result<(), StateError> {
        let r = SectionReader::new(&CLOCK, s)?;
        let elapsed = ctx.now_ns.saturating_sub(r.u64("realtime_ns")?);
        let clock = kvm_clock_data {
            clock: r.u64("clock_ns")?.wrapping_add(elapsed),
            ..Default::default()
        };
        vm.vm_fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))
    }
}
