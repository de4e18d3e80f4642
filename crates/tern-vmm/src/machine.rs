//! The machine a stream describes (its VM_DESCRIPTION's `machine` object), typed, and the check a
//! target makes before it allocates anything: every mismatch with its own options and with this
//! host is named, all at once.

use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use crate::cpuid::{self, FEATURE_REGS};

/// How far the source's TSC frequency may be from this host's before the guest's clock would
/// visibly run at another rate (this KVM cannot scale the TSC: `KVM_CAP_TSC_CONTROL` is 0).
/// 250 ppm is about what separate calibrations of one CPU model differ by.
pub const TSC_TOLERANCE_PPM: u64 = 250;

/// One CPUID register the guest may rely on (leaf, subleaf, register name, value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatureWord {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: String,
    pub value: u32,
}

/// The machine as the source describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDescription {
    pub arch: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub vcpus: u32,
    /// The guest's TSC frequency; absent if the source could not read it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
    /// The CPU feature words of the vCPUs (streams before this field had none: the per-vCPU
    /// CPUID check at load time still applies).
    #[serde(default)]
    pub cpu_features: Vec<CpuFeatureWord>,
    /// The virtio-blk disks, in slot order (streams before disks had none).
    #[serde(default)]
    pub disks: Vec<DiskDescription>,
    /// The virtio-net devices' MACs, in slot order after the disks (streams before networks
    /// had none).
    #[serde(default)]
    pub nets: Vec<String>,
}

/// A disk as the source describes it (and as the target sees its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDescription {
    /// Size in bytes.
    pub size: u64,
    pub readonly: bool,
    /// `shared=on`: the same storage on both sides, not copied.
    pub shared: bool,
    /// Which file it is on which boot of which host (`boot_id`, device, inode), so that a
    /// target on the same host can tell the source's own file from a copy.
    pub boot_id: String,
    pub dev: u64,
    pub ino: u64,
    /// The path, for messages.
    pub path: String,
    /// The source sends its blocks in this migration (not into a saved file, never when
    /// shared or read-only).
    #[serde(default)]
    pub copied: bool,
}

/// What the target's own command line asks for (the stream must match what is given).
#[derive(Clone, Debug, Default)]
pub struct Requested {
    pub memory: Option<u64>,
    pub vcpus: Option<u32>,
    /// The target's `--disk` options, described (a stream's disks must match them).
    pub disks: Vec<DiskDescription>,
    /// The target's `--net` MACs (a stream's NICs must match them).
    pub nets: Vec<String>,
    /// The stream comes from a live source (not a saved file): a disk it does not copy must be
    /// shared or read-only, or the guest would run on whatever the target's file holds.
    pub live: bool,
}

/// What this host offers.
#[derive(Clone, Debug)]
pub struct HostInfo {
    /// Total RAM (MemTotal), if known.
    pub memory: Option<u64>,
    /// RAM the host can give now without swapping (MemAvailable), if known.
    pub available: Option<u64>,
    /// The TSC frequency a vCPU gets here, if known.
    pub tsc_khz: Option<u32>,
    /// KVM's supported CPUID.
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

impl HostInfo {
    /// Asks KVM (a throw-away VM with one vCPU, no memory, for the TSC frequency) and
    /// /proc/meminfo.
    pub fn probe(kvm_path: &std::path::Path) -> Result<HostInfo, String> {
        let kvm = crate::vm::open_kvm(kvm_path).map_err(|e| format!("{e:#}"))?;
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?
            .as_slice()
            .to_vec();
        Ok(HostInfo {
            memory: host_memory(),
            available: meminfo("MemAvailable:"),
            tsc_khz: probe_tsc_khz(&kvm),
            cpuid,
        })
    }
}

fn probe_tsc_khz(kvm: &Kvm) -> Option<u32> {
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.get_tsc_khz().ok()
}

/// Total RAM of the host, from /proc/meminfo.
pub fn host_memory() -> Option<u64> {
    meminfo("MemTotal:")
}

/// A /proc/meminfo value in bytes.
fn meminfo(key: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Sizes as `tern` prints them (1.0G, 512M).
pub fn human(bytes: u64) -> String {
    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;
    if bytes >= G {
        format!("{:.1}G", bytes as f64 / G as f64)
    } else {
        format!("{}M", bytes / M)
    }
}

impl MachineDescription {
    /// The description of a machine with this CPUID table (vCPU 0's).
    pub fn new(memory: u64, vcpus: u32, tsc_khz: Option<u32>, cpuid: &[kvm_cpuid_entry2]) -> Self {
        let cpu_features = FEATURE_REGS
            .iter()
            .filter_map(|&(leaf, subleaf, reg, _)| {
                let e = cpuid.iter().find(|e| cpuid::is_leaf(e, leaf, subleaf))?;
                Some(CpuFeatureWord {
                    leaf,
                    subleaf,
                    reg: reg.into(),
                    value: cpuid::reg(e, reg),
                })
            })
            .collect();
        MachineDescription {
            arch: "x86_64".into(),
            memory,
            vcpus,
            tsc_khz,
            cpu_features,
            disks: Vec::new(),
            nets: Vec::new(),
        }
    }

    /// Reads the `machine` object of a stream, naming what is missing or malformed.
    pub fn from_stream(v: &serde_json::Value) -> Result<Self, String> {
        serde_json::from_value(v.clone()).map_err(|e| format!("the machine description: {e}"))
    }

    /// Every way this machine does not fit `host` and the target's own options; empty if it
    /// fits.
    pub fn mismatches(&self, host: &HostInfo, want: &Requested) -> Vec<String> {
        let mut out = Vec::new();
        if self.arch != "x86_64" {
            out.push(format!(
                "the stream is for {}, this host runs x86_64",
                self.arch
            ));
        }
        if self.memory == 0 || !self.memory.is_multiple_of(4096) {
            out.push(format!(
                "the stream's memory size {} is not a whole number of pages",
                self.memory
            ));
        }
        if let Some(mine) = want.memory.filter(|&m| m != self.memory) {
            out.push(format!(
                "memory is {} here but {} in the stream",
                human(mine),
                human(self.memory)
            ));
        }
        if let Some(hostmem) = host.memory.filter(|&h| self.memory > h) {
            out.push(format!(
                "the stream needs {} of RAM, this host has {}",
                human(self.memory),
                human(hostmem)
            ));
        } else if let Some(free) = host.available.filter(|&a| self.memory > a) {
            // The size comes from the peer: no more than the host can give now, unless the
            // operator asked for it on the target's own command line.
            if want.memory.is_none() {
                out.push(format!(
                    "the stream needs {} of RAM, this host has {} available (give --memory {}M \
                     on the target to take it anyway)",
                    human(self.memory),
                    human(free),
                    self.memory >> 20
                ));
            }
        }
        if self.vcpus == 0 || self.vcpus > crate::MAX_VCPUS {
            out.push(format!(
                "the stream has {} vCPUs, tern runs 1 to {}",
                self.vcpus,
                crate::MAX_VCPUS
            ));
        }
        if let Some(mine) = want.vcpus.filter(|&v| v != self.vcpus) {
            out.push(format!(
                "{mine} vCPUs here but {} in the stream",
                self.vcpus
            ));
        }
        if let (Some(src), Some(here)) = (self.tsc_khz, host.tsc_khz) {
            let diff = u64::from(src.abs_diff(here));
            if diff * 1_000_000 > u64::from(src) * TSC_TOLERANCE_PPM {
                out.push(format!(
                    "the guest's TSC runs at {src} kHz, this host's at {here} kHz, and this KVM cannot scale it (more than {TSC_TOLERANCE_PPM} ppm apart: the guest's clock would drift)"
                ));
            }
        }
        out.extend(disk_mismatches(&self.disks, &want.disks, want.live));
        if self.nets.len() != want.nets.len() {
            out.push(format!(
                "the source has {} network device(s), this VM {} (give the target the same --net \
                 options, each with its own TAP and the same mac=)",
                self.nets.len(),
                want.nets.len()
            ));
        } else {
            for (i, (s, m)) in self.nets.iter().zip(&want.nets).enumerate() {
                if s != m {
                    out.push(format!(
                        "network {i}: the guest's MAC is {s} on the source, {m} here (--net ...,mac={s})"
                    ));
                }
            }
        }
        let source: Vec<kvm_cpuid_entry2> = self
            .cpu_features
            .iter()
            .map(|w| {
                let mut e = kvm_cpuid_entry2 {
                    function: w.leaf,
                    index: w.subleaf,
                    flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                };
                match w.reg.as_str() {
                    "eax" => e.eax = w.value,
                    "ebx" => e.ebx = w.value,
                    "ecx" => e.ecx = w.value,
                    _ => e.edx = w.value,
                }
                e
            })
            .collect();
        // One entry per word, looked up on its own: two words of one leaf (ECX and EDX of
        // leaf 1) must not hide each other.
        for e in &source {
            out.extend(
                cpuid::missing_features(std::slice::from_ref(e), &host.cpuid)
                    .into_iter()
                    .map(|m| format!("the source's CPU feature {m} is not supported by this host")),
            );
        }
        out
    }
}

/// Every way the target's disks do not take the source's.
fn disk_mismatches(src: &[DiskDescription], mine: &[DiskDescription], live: bool) -> Vec<String> {
    let mut out = Vec::new();
    if src.len() != mine.len() {
        out.push(format!(
            "the source has {} disk(s), this VM {} (give the target the same --disk options)",
            src.len(),
            mine.len()
        ));
        return out;
    }
    let onoff = |b: bool| if b { "on" } else { "off" };
    for (i, (s, m)) in src.iter().zip(mine).enumerate() {
        if s.size != m.size {
            out.push(format!(
                "disk {i}: the source's ({}) is {} bytes, this VM's ({}) is {} bytes",
                s.path, s.size, m.path, m.size
            ));
        }
        if s.shared != m.shared {
            out.push(format!(
                "disk {i}: shared={} on the source, shared={} here (both sides must say whether it is the same storage)",
                onoff(s.shared),
                onoff(m.shared)
            ));
        }
        if s.readonly != m.readonly {
            out.push(format!(
                "disk {i}: readonly={} on the source, readonly={} here",
                onoff(s.readonly),
                onoff(m.readonly)
            ));
        }
        let same_file = !s.boot_id.is_empty()
            && (s.boot_id.as_str(), s.dev, s.ino) == (m.boot_id.as_str(), m.dev, m.ino);
        if live && !s.copied && !s.shared && !s.readonly {
            out.push(format!(
                "disk {i}: the source does not copy it (migrate with blk false) and it is not shared=on: the guest would run on {} as it is",
                m.path
            ));
        }
        if same_file && s.copied {
            out.push(format!(
                "disk {i}: {} is the source's own disk file: copying it onto itself would corrupt it (say shared=on on both sides, or give the target its own copy)",
                m.path
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostInfo {
        HostInfo {
            memory: Some(8 << 30),
            available: Some(4 << 30),
            tsc_khz: Some(2_000_000),
            cpuid: vec![kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ebx: 0b0011,
                ..Default::default()
            }],
        }
    }

    fn machine() -> MachineDescription {
        MachineDescription::new(1 << 30, 2, Some(2_000_100), &host().cpuid)
    }

    #[test]
    fn a_matching_machine_fits_and_round_trips() {
        let m = machine();
        assert_eq!(m.cpu_features.len(), 3, "EBX, ECX and EDX of leaf 7");
        assert!(m.mismatches(&host(), &Requested::default()).is_empty());
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(MachineDescription::from_stream(&v).unwrap(), m);
        // A stream from before cpu_features still reads.
        let old = serde_json::json!({"memory": 1u64 << 30, "vcpus": 2, "tsc_khz": 2000000, "arch": "x86_64"});
        assert!(MachineDescription::from_stream(&old)
            .unwrap()
            .cpu_features
            .is_empty());
        assert!(MachineDescription::from_stream(
            &serde_json::json!({"vcpus": 2, "arch": "x86_64"})
        )
        .unwrap_err()
        .contains("memory"));
    }

    #[test]
    fn every_mismatch_is_named_at_once() {
        let mut m = machine();
        m.memory = 16 << 30;
        m.vcpus = 4;
        m.tsc_khz = Some(2_100_000);
        m.cpu_features[0].value = 0b0111;
        let got = m.mismatches(
            &host(),
            &Requested {
                memory: Some(1 << 30),
                vcpus: Some(2),
                disks: vec![],
                nets: vec![],
                live: true,
            },
        );
        let all = got.join("\n");
        assert!(
            all.contains("memory is 1.0G here but 16.0G in the stream"),
            "{all}"
        );
        assert!(
            all.contains("needs 16.0G of RAM, this host has 8.0G"),
            "{all}"
        );
        assert!(all.contains("2 vCPUs here but 4 in the stream"), "{all}");
        assert!(all.contains("2100000 kHz"), "{all}");
        assert!(all.contains("CPUID.0x7.0:EBX[bit 2]"), "{all}");
        assert_eq!(got.len(), 5, "{all}");
    }

    #[test]
    fn a_stream_alone_cannot_take_more_than_is_available() {
        let mut m = machine();
        m.memory = 6 << 30;
        let got = m.mismatches(&host(), &Requested::default()).join("\n");
        assert!(
            got.contains("needs 6.0G of RAM, this host has 4.0G available"),
            "{got}"
        );
        assert!(got.contains("--memory 6144M"), "{got}");
        // The operator's own --memory takes it (MemTotal still bounds it).
        let want = Requested {
            memory: Some(6 << 30),
            vcpus: None,
            disks: vec![],
            nets: vec![],
            live: true,
        };
        assert!(m.mismatches(&host(), &want).is_empty());
    }

    #[test]
    fn networks_must_match_in_number_and_mac() {
        let mut m = machine();
        m.nets = vec!["52:54:00:12:34:56".into()];
        let want = |nets: &[&str]| Requested {
            nets: nets.iter().map(|s| s.to_string()).collect(),
            ..Requested::default()
        };
        assert!(m
            .mismatches(&host(), &want(&["52:54:00:12:34:56"]))
            .is_empty());
        let got = m.mismatches(&host(), &want(&[])).join("\n");
        assert!(got.contains("1 network device(s), this VM 0"), "{got}");
        let got = m
            .mismatches(&host(), &want(&["52:54:00:12:34:57"]))
            .join("\n");
        assert!(
            got.contains("MAC is 52:54:00:12:34:56 on the source, 52:54:00:12:34:57 here"),
            "{got}"
        );
    }

    #[test]
    fn disks_must_match_and_a_copy_never_lands_on_the_source_file() {
        let d = |size, shared, ino| DiskDescription {
            size,
            readonly: false,
            shared,
            boot_id: "b".into(),
            dev: 1,
            ino,
            path: format!("/d{ino}"),
            copied: !shared,
        };
        assert!(disk_mismatches(&[d(1 << 30, false, 1)], &[d(1 << 30, false, 2)], true).is_empty());
        assert!(disk_mismatches(&[d(1 << 30, true, 1)], &[d(1 << 30, true, 1)], true).is_empty());
        let e = disk_mismatches(&[d(1 << 30, false, 1)], &[], true).join("; ");
        assert!(e.contains("1 disk(s), this VM 0"), "{e}");
        let e = disk_mismatches(&[d(1 << 30, false, 1)], &[d(1 << 20, false, 2)], true).join("; ");
        assert!(
            e.contains("1073741824 bytes") && e.contains("1048576 bytes"),
            "{e}"
        );
        let e = disk_mismatches(&[d(1 << 30, false, 1)], &[d(1 << 30, true, 2)], true).join("; ");
        assert!(
            e.contains("shared=off on the source, shared=on here"),
            "{e}"
        );
        let e = disk_mismatches(&[d(1 << 30, false, 1)], &[d(1 << 30, false, 1)], true).join("; ");
        assert!(e.contains("source's own disk file"), "{e}");
        let mut uncopied = d(1 << 30, false, 1);
        uncopied.copied = false;
        let e = disk_mismatches(&[uncopied.clone()], &[d(1 << 30, false, 2)], true).join("; ");
        assert!(e.contains("does not copy it"), "{e}");
        assert!(disk_mismatches(&[uncopied], &[d(1 << 30, false, 2)], false).is_empty());
    }
}
