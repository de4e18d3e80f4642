//! Schemas: what a device saves and loads, with the version each field appeared in.

use super::*;

/// A field of a schema.
#[derive(Clone, Copy, Debug)]
pub struct FieldSpec {
    pub name: &'static str,
    pub ty: FieldType,
    /// The section version the field appeared in.
    pub since: u32,
}

/// A subsection a device may send.
#[derive(Clone, Copy, Debug)]
pub struct SubsectionSpec {
    pub name: &'static str,
    pub version: u32,
    pub fields: &'static [FieldSpec],
}

/// A device's state schema.
#[derive(Clone, Copy, Debug)]
pub struct Schema {
    pub name: &'static str,
    /// The version this build saves.
    pub version: u32,
    /// The oldest version this build can load.
    pub min_version: u32,
    pub fields: &'static [FieldSpec],
    pub subsections: &'static [SubsectionSpec],
}

pub(super) fn fields_desc(fields: &[FieldSpec]) -> Vec<FieldDesc> {
    fields
        .iter()
        .map(|f| FieldDesc {
            name: f.name.into(),
            ty: f.ty.name().into(),
            since: f.since,
        })
        .collect()
}

impl Schema {
    /// The schema as listed in the VM description.
    pub fn describe(&self, instance: u32) -> SectionDesc {
        SectionDesc {
            name: self.name.into(),
            instance,
            version: self.version,
            min_version: self.min_version,
            fields: fields_desc(self.fields),
            subsections: self
                .subsections
                .iter()
                .map(|s| SubsectionDesc {
                    name: s.name.into(),
                    version: s.version,
                    fields: fields_desc(s.fields),
                })
                .collect(),
        }
    }

    pub(super) fn field(&self, name: &str) -> Option<&FieldSpec> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// The state of a device or vCPU that migrates.
///
/// There is deliberately no default implementation: a device that cannot migrate must say so in
/// [`MigratableState::save`] by returning [`StateError::NotMigratable`], which fails the migration
/// with its name.
pub trait MigratableState {
    /// The schema this build saves and loads.
    fn schema(&self) -> &'static Schema;
    /// Which instance of the device this is.
    fn instance(&self) -> u32;
    /// Saves the state as a section.
    fn save(&self) -> Result<Section, StateError>;
    /// Loads a section (of any version the schema accepts; older versions go through the
    /// device's upgrade path).
    fn load(&mut self, section: &Section) -> Result<(), StateError>;
}

/// Saves every device; the first that cannot migrate fails the whole save, naming itself.
pub fn save_all(devices: &[&dyn MigratableState]) -> Result<Vec<Section>, StateError> {
    devices.iter().map(|d| d.save()).collect()
}

/// Loads sections into devices, matched by (name, instance). A section without a device, a device
/// without a section, or a section twice fails the load.
pub fn load_all(
    devices: &mut [&mut dyn MigratableState],
    sections: &[Section],
) -> Result<(), StateError> {
    check_sections(sections, |name, instance| {
        devices
            .iter()
            .any(|d| d.schema().name == name && d.instance() == instance)
    })?;
    for d in devices.iter_mut() {
        let s = sections
            .iter()
            .find(|s| s.name == d.schema().name && s.instance == d.instance())
            .ok_or_else(|| StateError::MissingSection {
                section: d.schema().name.into(),
                instance: d.instance(),
            })?;
        d.load(s)?;
    }
    Ok(())
}

/// Checks a stream's sections before any is loaded: none twice, and each one `known` (a device
/// of this target takes it); names the first that is not.
pub fn check_sections(
    sections: &[Section],
    known: impl Fn(&str, u32) -> bool,
) -> Result<(), StateError> {
    for (i, s) in sections.iter().enumerate() {
        if sections[..i]
            .iter()
            .any(|o| o.name == s.name && o.instance == s.instance)
        {
            return Err(StateError::DuplicateSection {
                section: s.name.clone(),
                instance: s.instance,
            });
        }
        if !known(&s.name, s.instance) {
            return Err(StateError::UnexpectedSection {
                section: s.name.clone(),
                instance: s.instance,
            });
        }
    }
    Ok(())
}
