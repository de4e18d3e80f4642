//! The VM description record: a self-describing JSON summary of the stream.

use serde::{Deserialize, Serialize};

use crate::limits;

/// The VM description.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmDescription {
    /// Free-form machine configuration (memory, vCPUs, CPUID...).
    #[serde(default)]
    pub machine: serde_json::Value,
    /// RAM regions that RAM_PAGES records may name.
    pub ram: Vec<RamRegionDesc>,
    /// Every section the stream carries, with its schema.
    pub sections: Vec<SectionDesc>,
}

/// A RAM region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegionDesc {
    pub id: u32,
    pub name: String,
    pub gpa: u64,
    pub size: u64,
}

/// A section's schema as sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionDesc {
    pub name: String,
    pub instance: u32,
    pub version: u32,
    pub min_version: u32,
    pub fields: Vec<FieldDesc>,
    #[serde(default)]
    pub subsections: Vec<SubsectionDesc>,
}

/// A subsection's schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubsectionDesc {
    pub name: String,
    pub version: u32,
    pub fields: Vec<FieldDesc>,
}

/// A field's schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldDesc {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub since: u32,
}

impl VmDescription {
    /// Checks the description against the limits and its own consistency.
    pub fn validate(&self) -> Result<(), String> {
        if self.ram.len() > limits::MAX_REGIONS {
            return Err(format!(
                "{} RAM regions (limit {})",
                self.ram.len(),
                limits::MAX_REGIONS
            ));
        }
        if self.sections.len() > limits::MAX_SECTIONS {
            return Err(format!(
                "{} sections (limit {})",
                self.sections.len(),
                limits::MAX_SECTIONS
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for r in &self.ram {
            if !ids.insert(r.id) {
                return Err(format!("RAM region id {} appears twice", r.id));
            }
            if r.size % crate::PAGE_SIZE as u64 != 0 {
                return Err(format!(
                    "RAM region {} size {} is not a multiple of the page size",
                    r.id, r.size
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for s in &self.sections {
            if s.name.is_empty() || s.name.len() > limits::MAX_NAME {
                return Err(format!("section name {:?} is empty or too long", s.name));
            }
            if !names.insert((s.name.as_str(), s.instance)) {
                return Err(format!(
                    "section {} instance {} appears twice",
                    s.name, s.instance
                ));
            }
        }
        Ok(())
    }

    /// Size in pages of region `id`.
    pub fn region_pages(&self, id: u32) -> Option<u64> {
        self.ram
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.size / crate::PAGE_SIZE as u64)
    }
}
