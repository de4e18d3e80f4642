//! CPUID: KVM's supported set, filtered per vCPU.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf that carries the TSC and APIC bus frequencies (the VMware/KVM convention).
const TIMING_LEAF: u32 = 0x4000_0010;
const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;

/// Adjusts KVM's supported CPUID for vCPU `index` of `count`.
///
/// - leaf 1: APIC id, logical count, the hypervisor bit, HTT when there is more than one vCPU;
/// - leaves 0xB/0x1F: x2APIC id;
/// - leaf 7: no IA32_ARCH_CAPABILITIES (kvm-pvm cannot set MSR 0x10a, and it is a host detail);
/// - leaf 0x40000010: the TSC frequency in kHz, when known, so a guest need not calibrate.
pub fn filter(supported: &CpuId, index: u32, count: u32, tsc_khz: Option<u32>) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    let mut has_kvm_leaf = false;
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | (count.min(255) << 16);
                e.ecx |= 1 << 31;
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => e.edx = index,
            7 if e.index == 0 => e.edx &= !(1 << 29),
            KVM_SIGNATURE_LEAF => {
                has_kvm_leaf = true;
                if tsc_khz.is_some() {
                    e.eax = e.eax.max(TIMING_LEAF);
                }
            }
            _ => {}
        }
    }
    entries.retain(|e| e.function != TIMING_LEAF);
    if let (true, Some(khz)) = (has_kvm_leaf, tsc_khz) {
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: khz,
            ebx: 1_000_000,
            ..Default::default()
        });
    }
    CpuId::from_entries(&entries).unwrap_or_else(|_| supported.clone())
}

/// Feature bits that must not be asked of a host that lacks them: (leaf, subleaf, register,
/// mask of bits the VMM itself sets or that follow guest state, which are not checked).
pub(crate) const FEATURE_REGS: &[(u32, u32, &str, u32)] = &[
    (1, 0, "ecx", (1 << 31) | (1 << 27)),
    (1, 0, "edx", (1 << 28) | (1 << 9)),
    (7, 0, "ebx", 0),
    (7, 0, "ecx", 1 << 4),
    (7, 0, "edx", 1 << 29),
    (7, 1, "eax", 0),
    (0xd, 1, "eax", 0),
    (0x8000_0001, 0, "ecx", 0),
    (0x8000_0001, 0, "edx", 0),
];

pub(crate) fn reg(e: &kvm_cpuid_entry2, r: &str) -> u32 {
    match r {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

/// Whether `e` is leaf `leaf`, subleaf `sub` (the subleaf counts only where KVM says it does).
pub(crate) fn is_leaf(e: &kvm_cpuid_entry2, leaf: u32, sub: u32) -> bool {
    e.function == leaf
        && (e.index == sub || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
}

/// Every CPU feature bit of `source` that `host` lacks, named as `CPUID.leaf.sub:REG[bit n]`.
pub fn missing_features(source: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Vec<String> {
    let mut out = Vec::new();
    for &(leaf, sub, r, ignore) in FEATURE_REGS {
        let Some(s) = source.iter().find(|e| is_leaf(e, leaf, sub)) else {
            continue;
        };
        let have = host
            .iter()
            .find(|e| is_leaf(e, leaf, sub))
            .map_or(0, |e| reg(e, r));
        let mut missing = reg(s, r) & !have & !ignore;
        while missing != 0 {
            let bit = missing.trailing_zeros();
            out.push(format!(
                "CPUID.{leaf:#x}.{sub}:{}[bit {bit}]",
                r.to_uppercase()
            ));
            missing &= missing - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_1234,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                edx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: KVM_SIGNATURE_LEAF,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn sets_apic_id_hypervisor_bit_and_timing_leaf() {
        let c = filter(&sample(), 3, 4, Some(2_000_000));
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x1234);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_eq!(e[1].edx & (1 << 29), 0);
        assert_eq!(e[2].eax, TIMING_LEAF);
        let t = e.iter().find(|e| e.function == TIMING_LEAF).unwrap();
        assert_eq!(t.eax, 2_000_000);
    }
}
