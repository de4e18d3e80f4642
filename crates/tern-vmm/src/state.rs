//! CPU and device state as versioned `tern-wire` sections.
//!
//! Order, on save (the VM paused, every vCPU parked after completing its pending I/O):
//! 1. devices first (serial), then KVM's in-kernel devices (PIC master, PIC slave, IOAPIC, PIT),
//!    then the KVM clock;
//! 2. per vCPU: MP state first, then regs, sregs, XSAVE, XCRs, debug registers, LAPIC, MSRs
//!    (with the TSC and the wall-clock time it was read at), vCPU events last.
//!
//! On load the reverse holds where it matters: per vCPU the CPUID first (KVM checks MSRs and
//! XSAVE against it), then MP state, sregs, regs, XSAVE, XCRs, debug registers, LAPIC, MSRs, vCPU
//! events last (they carry pending exceptions and NMIs that the other setters could clear); then
//! irqchip and PIT; the clock last, advanced by the time the VM was stopped, and the TSC is
//! advanced by the same wall-clock time, so the guest's clocks keep real time across the move
//! and the guest sees its pause.
//!
//! KVM structures travel as their byte images (`zerocopy`), one field each.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use tern_wire::{
    FieldSpec, FieldType, Schema, Section, SectionBuilder, SectionDesc, SectionReader, StateError,
    Value,
};
use vm_superio::serial::SerialState;
use zerocopy::{FromBytes, IntoBytes};

use crate::vcpu::lock;
use crate::vm::Vm;

const MSR_IA32_TSC: u32 = 0x10;

const fn bytes(name: &'static str) -> FieldSpec {
    FieldSpec {
        name,
        ty: FieldType::Bytes,
        since: 1,
    }
}

pub(crate) static CPU: Schema = Schema {
    name: "cpu",
    version: 1,
    min_version: 1,
    fields: &[
        FieldSpec {
            name: "mp_state",
            ty: FieldType::U32,
            since: 1,
        },
        FieldSpec {
            name: "regs",
            ty: FieldType::Bytes,
            since: 1,
        },
        FieldSpec {
            name: "sregs",
            ty: FieldType::Bytes,
            since: 1,
        },
        FieldSpec {
            name: "xsave",
            ty: FieldType::Bytes,
            since: 1,
        },
        FieldSpec {
            name: "xcrs",
            ty: FieldType::Bytes,
            since: 1,
        },
        FieldSpec {
            name: "debugregs",
            ty: FieldType::Bytes,
            since: 1,
        },
        FieldSpec {
            name: "lapic",
            ty: FieldType::Bytes,
            since: 1,
        },
        FieldSpec {
            name: "msrs",
            ty: FieldType::U64s,
            since: 1,
        },
        FieldSpec {
            name: "tsc_realtime_ns",
            ty: FieldType::U64,
            since: 1,
        },
        FieldSpec {
            name: "vcpu_events",
            ty: FieldType::Bytes,
            since: 1,
        },
        FieldSpec {
            name: "cpuid",
            ty: FieldType::Bytes,
            since: 1,
        },
    ],
    subsections: &[],
};

static IRQCHIP: Schema = Schema {
    name: "kvm-irqchip",
    version: 1,
    min_version: 1,
    fields: &[FieldSpec {
        name: "chip",
        ty: FieldType::Bytes,
        since: 1,
    }],
    subsections: &[],
};

static PIT: Schema = Schema {
    name: "kvm-pit",
    version: 1,
    min_version: 1,
    fields: &[FieldSpec {
        name: "state",
        ty: FieldType::Bytes,
        since: 1,
    }],
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

static SERIAL: Schema = Schema {
    name: "serial-16550",
    version: 1,
    min_version: 1,
    fields: &[
        FieldSpec {
            name: "dll",
            ty: FieldType::U8,
            since: 1,
        },
        FieldSpec {
            name: "dlh",
            ty: FieldType::U8,
            since: 1,
        },
        FieldSpec {
            name: "ier",
            ty: FieldType::U8,
            since: 1,
        },
        FieldSpec {
            name: "iir",
            ty: FieldType::U8,
            since: 1,
        },
        FieldSpec {
            name: "lcr",
            ty: FieldType::U8,
            since: 1,
        },
        FieldSpec {
            name: "lsr",
            ty: FieldType::U8,
            since: 1,
        },
        FieldSpec {
            name: "mcr",
            ty: FieldType::U8,
            since: 1,
        },
        FieldSpec {
            name: "msr",
            ty: FieldType::U8,
            since: 1,
        },
        FieldSpec {
            name: "scr",
            ty: FieldType::U8,
            since: 1,
        },
        bytes("rx_fifo"),
    ],
    subsections: &[],
};

/// Irqchips in save order: PIC master, PIC slave, IOAPIC.
const CHIPS: [u32; 3] = [0, 1, 2];

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Invalid {
        section: what.into(),
        reason: e.to_string(),
    }
}

fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn from_bytes<T: FromBytes>(section: &str, field: &str, b: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(b).map_err(|_| StateError::Invalid {
        section: section.into(),
        reason: format!(
            "field {field} is {} bytes, expected {}",
            b.len(),
            std::mem::size_of::<T>()
        ),
    })
}

/// The schemas of every section this VM saves, for the VM description.
pub(crate) fn schemas(vcpus: u32) -> Vec<SectionDesc> {
    let mut v = vec![SERIAL.describe(0)];
    v.extend(CHIPS.iter().map(|&c| IRQCHIP.describe(c)));
    v.push(PIT.describe(0));
    v.push(CLOCK.describe(0));
    v.extend((0..vcpus).map(|i| CPU.describe(i)));
    v
}

/// MSRs this vCPU can read: KVM's list, less the ones it refuses to read back.
fn readable_msrs(vm: &Vm, vcpu: &VcpuFd) -> Result<Vec<kvm_msr_entry>, StateError> {
    let list = vm
        .kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut entries: Vec<kvm_msr_entry> = list
        .as_slice()
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    loop {
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Invalid {
            section: "cpu".into(),
            reason: format!("MSR list: {e:?}"),
        })?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if n == entries.len() {
            return Ok(msrs.as_slice().to_vec());
        }
        // KVM stops at the first MSR it cannot read: leave that one out.
        tracing::debug!(msr = entries[n].index, "MSR not readable, not migrated");
        entries.remove(n);
    }
}

fn save_vcpu(vm: &Vm, index: u32, vcpu: &VcpuFd) -> Result<Section, StateError> {
    let mp = vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
    let debugregs = vcpu
        .get_debug_regs()
        .map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let msrs = readable_msrs(vm, vcpu)?;
    let tsc_realtime = realtime_ns();
    let events = vcpu
        .get_vcpu_events()
        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    // What tern set, not KVM_GET_CPUID2: on kvm-pvm that returns the host's own leaves, not
    // the table the VMM installed.
    let cpuid = crate::cpuid::filter(&vm.supported_cpuid, index, vm.vcpus(), vm.tsc_khz);
    let cpuid_bytes: Vec<u8> = cpuid
        .as_slice()
        .iter()
        .flat_map(|e| e.as_bytes().to_vec())
        .collect();
    SectionBuilder::new(&CPU, index)
        .field("mp_state", Value::U32(mp.mp_state))?
        .field("regs", Value::Bytes(regs.as_bytes().to_vec()))?
        .field("sregs", Value::Bytes(sregs.as_bytes().to_vec()))?
        .field("xsave", Value::Bytes(xsave.as_bytes().to_vec()))?
        .field("xcrs", Value::Bytes(xcrs.as_bytes().to_vec()))?
        .field("debugregs", Value::Bytes(debugregs.as_bytes().to_vec()))?
        .field("lapic", Value::Bytes(lapic.as_bytes().to_vec()))?
        .field(
            "msrs",
            Value::U64s(
                msrs.iter()
                    .flat_map(|m| [u64::from(m.index), m.data])
                    .collect(),
            ),
        )?
        .field("tsc_realtime_ns", Value::U64(tsc_realtime))?
        .field("vcpu_events", Value::Bytes(events.as_bytes().to_vec()))?
        .field("cpuid", Value::Bytes(cpuid_bytes))?
        .build()
}

/// Saves the whole machine; every vCPU must be parked.
pub(crate) fn save(vm: &Vm) -> Result<Vec<Section>, StateError> {
    let mut out = Vec::new();
    let serial = vm
        .devices
        .serial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .state();
    out.push(
        SectionBuilder::new(&SERIAL, 0)
            .field("dll", Value::U8(serial.baud_divisor_low))?
            .field("dlh", Value::U8(serial.baud_divisor_high))?
            .field("ier", Value::U8(serial.interrupt_enable))?
            .field("iir", Value::U8(serial.interrupt_identification))?
            .field("lcr", Value::U8(serial.line_control))?
            .field("lsr", Value::U8(serial.line_status))?
            .field("mcr", Value::U8(serial.modem_control))?
            .field("msr", Value::U8(serial.modem_status))?
            .field("scr", Value::U8(serial.scratch))?
            .field("rx_fifo", Value::Bytes(serial.in_buffer.clone()))?
            .build()?,
    );
    for chip_id in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.vm_fd
            .get_irqchip(&mut chip)
            .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        out.push(
            SectionBuilder::new(&IRQCHIP, chip_id)
                .field("chip", Value::Bytes(chip.as_bytes().to_vec()))?
                .build()?,
        );
    }
    let pit = vm.vm_fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
    out.push(
        SectionBuilder::new(&PIT, 0)
            .field("state", Value::Bytes(pit.as_bytes().to_vec()))?
            .build()?,
    );
    let clock = vm.vm_fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
    out.push(
        SectionBuilder::new(&CLOCK, 0)
            .field("clock_ns", Value::U64(clock.clock))?
            .field("flags", Value::U32(clock.flags))?
            .field("realtime_ns", Value::U64(realtime_ns()))?
            .build()?,
    );
    for (i, fd) in vm.vcpu_fds.iter().enumerate() {
        out.push(save_vcpu(vm, i as u32, &lock(fd))?);
    }
    Ok(out)
}

fn find<'a>(sections: &'a [Section], name: &str, instance: u32) -> Result<&'a Section, StateError> {
    sections
        .iter()
        .find(|s| s.name == name && s.instance == instance)
        .ok_or_else(|| StateError::MissingSection {
            section: name.into(),
            instance,
        })
}

/// Checks that this host supports every CPU feature the source's vCPUs had; names the first one
/// it lacks.
pub fn check_cpuid(source: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Result<(), String> {
    match crate::cpuid::missing_features(source, host).first() {
        Some(m) => Err(format!(
            "the source's CPU feature {m} is not supported by this host"
        )),
        None => Ok(()),
    }
}

fn load_vcpu(vm: &Vm, s: &Section, vcpu: &VcpuFd, now_ns: u64) -> Result<(), StateError> {
    let r = SectionReader::new(&CPU, s)?;
    let sec = "cpu";
    // How long the vCPU was away: its TSC kept counting meanwhile.
    let elapsed_ns = now_ns.saturating_sub(r.u64("tsc_realtime_ns")?);
    let cpuid_bytes = r.bytes("cpuid")?;
    let esz = std::mem::size_of::<kvm_cpuid_entry2>();
    if cpuid_bytes.len() % esz != 0 || cpuid_bytes.len() / esz > kvm_bindings::KVM_MAX_CPUID_ENTRIES
    {
        return Err(StateError::Invalid {
            section: sec.into(),
            reason: "bad CPUID table".into(),
        });
    }
    let entries: Vec<kvm_cpuid_entry2> = cpuid_bytes
        .chunks(esz)
        .map(|c| from_bytes(sec, "cpuid", c))
        .collect::<Result<_, _>>()?;
    check_cpuid(&entries, vm.supported_cpuid.as_slice()).map_err(|reason| StateError::Invalid {
        section: sec.into(),
        reason,
    })?;
    let cpuid = CpuId::from_entries(&entries).map_err(|e| StateError::Invalid {
        section: sec.into(),
        reason: format!("{e:?}"),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: r.u32("mp_state")?,
    })
    .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    vcpu.set_sregs(&from_bytes::<kvm_sregs>(sec, "sregs", r.bytes("sregs")?)?)
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&from_bytes::<kvm_regs>(sec, "regs", r.bytes("regs")?)?)
        .map_err(kvm_err("KVM_SET_REGS"))?;
    let xsave = from_bytes::<kvm_xsave>(sec, "xsave", r.bytes("xsave")?)?;
    // SAFETY: a legacy-sized kvm_xsave taken from KVM_GET_XSAVE on the source; KVM checks its
    // contents against the CPUID just set.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&from_bytes::<kvm_xcrs>(sec, "xcrs", r.bytes("xcrs")?)?)
        .map_err(kvm_err("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&from_bytes::<kvm_debugregs>(
        sec,
        "debugregs",
        r.bytes("debugregs")?,
    )?)
    .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&from_bytes::<kvm_lapic_state>(
        sec,
        "lapic",
        r.bytes("lapic")?,
    )?)
    .map_err(kvm_err("KVM_SET_LAPIC"))?;
    let Value::U64s(pairs) = r.value("msrs")? else {
        return Err(StateError::Invalid {
            section: sec.into(),
            reason: "msrs".into(),
        });
    };
    if pairs.len() % 2 != 0 {
        return Err(StateError::Invalid {
            section: sec.into(),
            reason: "odd MSR list".into(),
        });
    }
    let tsc_khz = u64::from(vm.tsc_khz.unwrap_or(0));
    let mut entries: Vec<kvm_msr_entry> = pairs
        .chunks(2)
        .map(|p| kvm_msr_entry {
            index: p[0] as u32,
            data: p[1],
            ..Default::default()
        })
        .collect();
    for e in entries.iter_mut().filter(|e| e.index == MSR_IA32_TSC) {
        // The TSC kept counting while the guest was away.
        e.data = e
            .data
            .wrapping_add(elapsed_ns.saturating_mul(tsc_khz) / 1_000_000);
    }
    let msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Invalid {
        section: sec.into(),
        reason: format!("{e:?}"),
    })?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(StateError::Invalid {
            section: sec.into(),
            reason: format!("this host refused MSR {:#x}", entries[n].index),
        });
    }
    vcpu.set_vcpu_events(&from_bytes::<kvm_vcpu_events>(
        sec,
        "vcpu_events",
        r.bytes("vcpu_events")?,
    )?)
    .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Loads the whole machine into a VM whose vCPUs have not started.
pub(crate) fn load(vm: &Vm, sections: &[Section]) -> Result<(), StateError> {
    let known: Vec<(String, u32)> = schemas(vm.vcpus())
        .into_iter()
        .map(|d| (d.name, d.instance))
        .collect();
    for s in sections {
        if !known.iter().any(|(n, i)| *n == s.name && *i == s.instance) {
            return Err(StateError::UnexpectedSection {
                section: s.name.clone(),
                instance: s.instance,
            });
        }
    }
    let now = realtime_ns();
    let serial = SectionReader::new(&SERIAL, find(sections, "serial-16550", 0)?)?;
    let b = |n: &str| -> Result<u8, StateError> {
        match serial.value(n)? {
            Value::U8(v) => Ok(*v),
            _ => Err(StateError::Invalid {
                section: "serial-16550".into(),
                reason: n.into(),
            }),
        }
    };
    let state = SerialState {
        baud_divisor_low: b("dll")?,
        baud_divisor_high: b("dlh")?,
        interrupt_enable: b("ier")?,
        interrupt_identification: b("iir")?,
        line_control: b("lcr")?,
        line_status: b("lsr")?,
        modem_control: b("mcr")?,
        modem_status: b("msr")?,
        scratch: b("scr")?,
        in_buffer: serial.bytes("rx_fifo")?.to_vec(),
    };
    {
        let mut dev = vm.devices.serial.lock().unwrap_or_else(|e| e.into_inner());
        let out = std::mem::replace(dev.writer_mut(), crate::serial::SerialSink::null());
        let irq = vm
            .devices
            .serial_irq
            .try_clone()
            .map_err(|e| StateError::Invalid {
                section: "serial-16550".into(),
                reason: e.to_string(),
            })?;
        *dev = crate::serial::SerialDevice::from_state(
            &state,
            crate::serial::IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| StateError::Invalid {
            section: "serial-16550".into(),
            reason: format!("{e:?}"),
        })?;
    }
    let clock_sec = SectionReader::new(&CLOCK, find(sections, "kvm-clock", 0)?)?;
    let elapsed = now.saturating_sub(clock_sec.u64("realtime_ns")?);
    for (i, fd) in vm.vcpu_fds.iter().enumerate() {
        let s = find(sections, "cpu", i as u32)?;
        load_vcpu(vm, s, &lock(fd), now)?;
    }
    for chip_id in CHIPS {
        let r = SectionReader::new(&IRQCHIP, find(sections, "kvm-irqchip", chip_id)?)?;
        let chip: kvm_irqchip = from_bytes("kvm-irqchip", "chip", r.bytes("chip")?)?;
        if chip.chip_id != chip_id {
            return Err(StateError::Invalid {
                section: "kvm-irqchip".into(),
                reason: "chip id mismatch".into(),
            });
        }
        vm.vm_fd
            .set_irqchip(&chip)
            .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    let r = SectionReader::new(&PIT, find(sections, "kvm-pit", 0)?)?;
    let pit: kvm_pit_state2 = from_bytes("kvm-pit", "state", r.bytes("state")?)?;
    vm.vm_fd.set_pit2(&pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: clock_sec.u64("clock_ns")?.wrapping_add(elapsed),
        ..Default::default()
    };
    vm.vm_fd
        .set_clock(&clock)
        .map_err(kvm_err("KVM_SET_CLOCK"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, ebx: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_check_names_the_missing_feature() {
        let host = [e(7, 0, 0b1011, 0), e(1, 0, 0, 0)];
        assert!(check_cpuid(&[e(7, 0, 0b0011, 0)], &host).is_ok());
        let err = check_cpuid(&[e(7, 0, 0b0111, 0)], &host).unwrap_err();
        assert_eq!(
            err,
            "the source's CPU feature CPUID.0x7.0:EBX[bit 2] is not supported by this host"
        );
        // The hypervisor bit is the VMM's own business.
        assert!(check_cpuid(&[e(1, 0, 0, 1 << 31)], &host).is_ok());
    }
}
