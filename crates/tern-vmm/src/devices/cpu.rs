//! A vCPU's state: MP state first, then registers, sregs, XSAVE, XCRs, debug registers, LAPIC,
//! MSRs (with the TSC and the wall-clock time it was read at), vCPU events last; and the CPUID
//! table the VMM installed. On load the CPUID goes first (KVM checks MSRs and XSAVE against it),
//! the events last (they carry pending exceptions and NMIs that the other setters could clear);
//! the TSC is advanced by the wall-clock time the guest was away, so its clock keeps real time
//! and it sees its pause.
//!
//! KVM structures travel as their byte images (`zerocopy`), one field each.

use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use tern_wire::{
    FieldSpec, FieldType, Schema, Section, SectionBuilder, SectionReader, StateError, Value,
};
use zerocopy::IntoBytes;

use super::{from_bytes, kvm_err, realtime_ns, DeviceState, LoadCtx};
use crate::vcpu::lock;
use crate::vm::Vm;

const MSR_IA32_TSC: u32 = 0x10;

/// One vCPU, as a device-manager entry.
pub struct Vcpu {
    pub(crate) index: u32,
    pub(crate) fd: Arc<Mutex<VcpuFd>>,
}

impl DeviceState for Vcpu {
    fn schema(&self) -> &'static Schema {
        &CPU
    }
    fn instance(&self) -> u32 {
        self.index
    }
    fn save(&self, vm: &Vm) -> Result<Section, StateError> {
        save_vcpu(vm, self.index, &lock(&self.fd))
    }
    fn load(&self, vm: &Vm, s: &Section, ctx: &LoadCtx) -> Result<(), StateError> {
        load_vcpu(vm, s, &lock(&self.fd), ctx.now_ns)
    }
}

static CPU: Schema = Schema {
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
        .map(|p| {
            Ok(kvm_msr_entry {
                index: u32::try_from(p[0]).map_err(|_| StateError::Invalid {
                    section: sec.into(),
                    reason: format!("MSR index {:#x} is not 32-bit", p[0]),
                })?,
                data: p[1],
                ..Default::default()
            })
        })
        .collect::<Result<_, StateError>>()?;
    // The TSC kept counting while the guest was away (in u128: hours at GHz overflow u64).
    let advance = u128::from(elapsed_ns) * u128::from(tsc_khz) / 1_000_000;
    let advance = u64::try_from(advance).unwrap_or(u64::MAX);
    for e in entries.iter_mut().filter(|e| e.index == MSR_IA32_TSC) {
        e.data = e.data.wrapping_add(advance);
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
