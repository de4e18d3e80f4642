//! What several test files of the wire format share.

use tern_wire::{RamRegionDesc, SectionDesc, VmDescription, PAGE_SIZE};

/// A guest of one 64-page region and `sections` device sections (`dev0`, `dev1`, ...).
pub fn desc(sections: usize) -> VmDescription {
    VmDescription {
        machine: serde_json::json!({"memory": 64 * PAGE_SIZE, "vcpus": 1}),
        ram: vec![RamRegionDesc {
            id: 0,
            name: "ram".into(),
            gpa: 0,
            size: 64 * PAGE_SIZE as u64,
        }],
        sections: (0..sections)
            .map(|i| SectionDesc {
                name: format!("dev{i}"),
                instance: 0,
                version: 1,
                min_version: 1,
                fields: vec![],
                subsections: vec![],
            })
            .collect(),
    }
}
