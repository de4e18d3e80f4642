//! Building sections and subsections against their schema.

use super::*;

/// Builds a section, checking every field against the schema.
pub struct SectionBuilder {
    schema: &'static Schema,
    section: Section,
}

impl SectionBuilder {
    /// Starts a section of the schema's current version.
    pub fn new(schema: &'static Schema, instance: u32) -> Self {
        SectionBuilder {
            schema,
            section: Section {
                name: schema.name.into(),
                instance,
                version: schema.version,
                fields: Vec::new(),
                subsections: Vec::new(),
            },
        }
    }

    pub(super) fn err_field(&self, field: &str) -> StateError {
        StateError::UnknownField {
            section: self.schema.name.into(),
            field: field.into(),
        }
    }

    /// Adds a field declared in the schema.
    pub fn field(mut self, name: &str, v: Value) -> Result<Self, StateError> {
        let spec = self
            .schema
            .field(name)
            .ok_or_else(|| self.err_field(name))?;
        if spec.ty != v.ty() {
            return Err(StateError::WrongType {
                section: self.schema.name.into(),
                field: name.into(),
                expected: spec.ty.name(),
                found: v.ty().name(),
            });
        }
        self.section.fields.push((name.into(), v));
        Ok(self)
    }

    /// Adds a subsection when `needed`; `fill` sets its fields.
    pub fn subsection(
        mut self,
        name: &str,
        needed: bool,
        fill: impl FnOnce(SubsectionBuilder) -> Result<SubsectionBuilder, StateError>,
    ) -> Result<Self, StateError> {
        let spec = self
            .schema
            .subsections
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| StateError::UnknownSubsection {
                section: self.schema.name.into(),
                subsection: name.into(),
            })?;
        if needed {
            let b = fill(SubsectionBuilder {
                section: self.schema.name,
                spec,
                sub: Subsection {
                    name: name.into(),
                    version: spec.version,
                    fields: Vec::new(),
                    subsections: Vec::new(),
                },
            })?;
            b.check_complete()?;
            self.section.subsections.push(b.sub);
        }
        Ok(self)
    }

    /// Finishes: every field of the current version must be set, once.
    pub fn build(self) -> Result<Section, StateError> {
        check_fields(
            self.schema.name,
            self.schema.fields,
            self.schema.version,
            &self.section.fields,
        )?;
        Ok(self.section)
    }
}

pub(super) fn check_fields(
    section: &str,
    specs: &[FieldSpec],
    version: u32,
    fields: &[(String, Value)],
) -> Result<(), StateError> {
    for (i, (n, _)) in fields.iter().enumerate() {
        if fields[..i].iter().any(|(m, _)| m == n) {
            return Err(StateError::DuplicateField {
                section: section.into(),
                field: n.clone(),
            });
        }
    }
    for f in specs.iter().filter(|f| f.since <= version) {
        if !fields.iter().any(|(n, _)| n == f.name) {
            return Err(StateError::MissingField {
                section: section.into(),
                field: f.name.into(),
            });
        }
    }
    Ok(())
}

/// Builds a subsection.
pub struct SubsectionBuilder {
    section: &'static str,
    spec: &'static SubsectionSpec,
    sub: Subsection,
}

impl SubsectionBuilder {
    /// Adds a field declared in the subsection's spec.
    pub fn field(mut self, name: &str, v: Value) -> Result<Self, StateError> {
        let spec = self
            .spec
            .fields
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| StateError::UnknownField {
                section: format!("{}/{}", self.section, self.spec.name),
                field: name.into(),
            })?;
        if spec.ty != v.ty() {
            return Err(StateError::WrongType {
                section: format!("{}/{}", self.section, self.spec.name),
                field: name.into(),
                expected: spec.ty.name(),
                found: v.ty().name(),
            });
        }
        self.sub.fields.push((name.into(), v));
        Ok(self)
    }

    pub(super) fn check_complete(&self) -> Result<(), StateError> {
        check_fields(
            &format!("{}/{}", self.section, self.spec.name),
            self.spec.fields,
            self.spec.version,
            &self.sub.fields,
        )
    }
}
