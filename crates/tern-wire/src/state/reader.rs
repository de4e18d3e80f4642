//! Reading sections and subsections checked against their schema.

use super::*;

/// Reads a section that has been checked against a schema.
pub struct SectionReader<'a> {
    schema: &'static Schema,
    section: &'a Section,
}

pub(super) fn check_known(
    section: &str,
    specs: &[FieldSpec],
    version: u32,
    fields: &[(String, Value)],
) -> Result<(), StateError> {
    for (n, v) in fields {
        let spec = specs
            .iter()
            .find(|f| f.name == n && f.since <= version)
            .ok_or_else(|| StateError::UnknownField {
                section: section.into(),
                field: n.clone(),
            })?;
        if spec.ty != v.ty() {
            return Err(StateError::WrongType {
                section: section.into(),
                field: n.clone(),
                expected: spec.ty.name(),
                found: v.ty().name(),
            });
        }
    }
    check_fields(section, specs, version, fields)
}

impl<'a> SectionReader<'a> {
    /// Checks `section` against `schema`: name, version range, fields, subsections.
    pub fn new(schema: &'static Schema, section: &'a Section) -> Result<Self, StateError> {
        let name = schema.name;
        if section.name != name {
            return Err(StateError::WrongSection {
                expected: name.into(),
                found: section.name.clone(),
            });
        }
        if section.version > schema.version {
            return Err(StateError::VersionTooNew {
                section: name.into(),
                version: section.version,
                max: schema.version,
            });
        }
        if section.version < schema.min_version {
            return Err(StateError::VersionTooOld {
                section: name.into(),
                version: section.version,
                min: schema.min_version,
            });
        }
        check_known(name, schema.fields, section.version, &section.fields)?;
        for (i, sub) in section.subsections.iter().enumerate() {
            let spec = schema
                .subsections
                .iter()
                .find(|s| s.name == sub.name)
                .ok_or_else(|| StateError::UnknownSubsection {
                    section: name.into(),
                    subsection: sub.name.clone(),
                })?;
            if section.subsections[..i].iter().any(|s| s.name == sub.name) {
                return Err(StateError::Invalid {
                    section: name.into(),
                    reason: format!("subsection {} appears twice", sub.name),
                });
            }
            if sub.version > spec.version {
                return Err(StateError::SubsectionTooNew {
                    section: name.into(),
                    subsection: sub.name.clone(),
                    version: sub.version,
                    max: spec.version,
                });
            }
            if let Some(nested) = sub.subsections.first() {
                return Err(StateError::UnknownSubsection {
                    section: format!("{name}/{}", sub.name),
                    subsection: nested.name.clone(),
                });
            }
            check_known(
                &format!("{name}/{}", sub.name),
                spec.fields,
                sub.version,
                &sub.fields,
            )?;
        }
        Ok(SectionReader { schema, section })
    }

    /// The version the source saved.
    pub fn version(&self) -> u32 {
        self.section.version
    }

    /// A field's value, if the saved version has it.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.section.field(name)
    }

    pub(super) fn missing(&self, name: &str) -> StateError {
        StateError::MissingField {
            section: self.schema.name.into(),
            field: name.into(),
        }
    }

    /// A field that every accepted version has.
    pub fn value(&self, name: &str) -> Result<&'a Value, StateError> {
        self.get(name).ok_or_else(|| self.missing(name))
    }

    /// A u64 field.
    pub fn u64(&self, name: &str) -> Result<u64, StateError> {
        match self.value(name)? {
            Value::U64(v) => Ok(*v),
            _ => Err(self.missing(name)),
        }
    }

    /// A u32 field.
    pub fn u32(&self, name: &str) -> Result<u32, StateError> {
        match self.value(name)? {
            Value::U32(v) => Ok(*v),
            _ => Err(self.missing(name)),
        }
    }

    /// A bytes field.
    pub fn bytes(&self, name: &str) -> Result<&'a [u8], StateError> {
        match self.value(name)? {
            Value::Bytes(v) => Ok(v),
            _ => Err(self.missing(name)),
        }
    }

    /// A subsection, if the source sent it.
    pub fn subsection(&self, name: &str) -> Option<SubsectionReader<'a>> {
        self.section
            .subsections
            .iter()
            .find(|s| s.name == name)
            .map(|sub| SubsectionReader { sub })
    }
}

/// Reads a checked subsection.
pub struct SubsectionReader<'a> {
    sub: &'a Subsection,
}

impl<'a> SubsectionReader<'a> {
    /// A field's value.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.sub
            .fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// The subsection's version.
    pub fn version(&self) -> u32 {
        self.sub.version
    }
}
