//! Versioned device state: sections of self-describing fields, optional subsections, schemas.
//!
//! A device declares a [`Schema`]: its section name, the version it saves, the oldest version it
//! can load, each field with the version it appeared in, and the subsections it may send. Saving
//! goes through a [`SectionBuilder`] (fields checked against the schema, each subsection sent only
//! if its `needed` predicate holds); loading goes through a [`SectionReader`], which refuses
//! versions outside the schema's range and anything it does not know — an unknown field or
//! subsection fails the load, naming it, rather than being dropped. Fields newer than the stream's
//! section version are absent and the device's upgrade path fills them.

use crate::desc::{FieldDesc, SectionDesc, SubsectionDesc};
use crate::error::{ErrorKind, StateError};
use crate::limits;

/// A field value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Bool(bool),
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    I64(i64),
    Bytes(Vec<u8>),
    Str(String),
    U64s(Vec<u64>),
}

/// Field types, as tagged on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    Bool = 1,
    U8 = 2,
    U16 = 3,
    U32 = 4,
    U64 = 5,
    I64 = 6,
    Bytes = 7,
    Str = 8,
    U64s = 9,
}

impl FieldType {
    /// The type's name in the VM description.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::Bool => "bool",
            FieldType::U8 => "u8",
            FieldType::U16 => "u16",
            FieldType::U32 => "u32",
            FieldType::U64 => "u64",
            FieldType::I64 => "i64",
            FieldType::Bytes => "bytes",
            FieldType::Str => "str",
            FieldType::U64s => "u64s",
        }
    }

    fn from_tag(t: u8) -> Option<Self> {
        Some(match t {
            1 => FieldType::Bool,
            2 => FieldType::U8,
            3 => FieldType::U16,
            4 => FieldType::U32,
            5 => FieldType::U64,
            6 => FieldType::I64,
            7 => FieldType::Bytes,
            8 => FieldType::Str,
            9 => FieldType::U64s,
            _ => return None,
        })
    }
}

impl Value {
    /// Its type.
    pub fn ty(&self) -> FieldType {
        match self {
            Value::Bool(_) => FieldType::Bool,
            Value::U8(_) => FieldType::U8,
            Value::U16(_) => FieldType::U16,
            Value::U32(_) => FieldType::U32,
            Value::U64(_) => FieldType::U64,
            Value::I64(_) => FieldType::I64,
            Value::Bytes(_) => FieldType::Bytes,
            Value::Str(_) => FieldType::Str,
            Value::U64s(_) => FieldType::U64s,
        }
    }

    /// As JSON, for `tern analyze --json` (bytes as hex).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::Bool(b) => json!(b),
            Value::U8(v) => json!(v),
            Value::U16(v) => json!(v),
            Value::U32(v) => json!(v),
            Value::U64(v) => json!(v),
            Value::I64(v) => json!(v),
            Value::Bytes(b) => json!(b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
            Value::Str(s) => json!(s),
            Value::U64s(v) => json!(v),
        }
    }
}

/// A subsection: optional state sent only when needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subsection {
    pub name: String,
    pub version: u32,
    pub fields: Vec<(String, Value)>,
    pub subsections: Vec<Subsection>,
}

/// One device's or vCPU's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub instance: u32,
    pub version: u32,
    pub fields: Vec<(String, Value)>,
    pub subsections: Vec<Subsection>,
}

impl Section {
    /// Looks a field up.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Encodes the section as a DEVICE_STATE body.
    pub fn encode(&self) -> Result<Vec<u8>, ErrorKind> {
        let mut out = Vec::new();
        put_name(&mut out, &self.name)?;
        out.extend_from_slice(&self.instance.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        encode_body(&mut out, &self.fields, &self.subsections, 0)?;
        Ok(out)
    }

    /// Decodes a DEVICE_STATE body; errors carry the offset in the body.
    pub fn decode(body: &[u8]) -> Result<Section, (usize, ErrorKind)> {
        let mut c = Cursor { b: body, pos: 0 };
        let name = c.name()?;
        let instance = c.u32()?;
        let version = c.u32()?;
        let (fields, subsections) = decode_body(&mut c, 0)?;
        if c.pos != body.len() {
            return Err((
                c.pos,
                malformed(format!("{} bytes after the section", body.len() - c.pos)),
            ));
        }
        Ok(Section {
            name,
            instance,
            version,
            fields,
            subsections,
        })
    }

    /// As JSON, for `tern analyze --json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "instance": self.instance,
            "version": self.version,
            "fields": fields_json(&self.fields),
            "subsections": self.subsections.iter().map(Subsection::to_json).collect::<Vec<_>>(),
        })
    }
}

impl Subsection {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "version": self.version,
            "fields": fields_json(&self.fields),
            "subsections": self.subsections.iter().map(Subsection::to_json).collect::<Vec<_>>(),
        })
    }
}

fn fields_json(fields: &[(String, Value)]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (n, v) in fields {
        m.insert(n.clone(), v.to_json());
    }
    serde_json::Value::Object(m)
}

fn malformed(reason: impl Into<String>) -> ErrorKind {
    ErrorKind::Malformed {
        record: "DEVICE_STATE",
        reason: reason.into(),
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) -> Result<(), ErrorKind> {
    if name.is_empty() || name.len() > limits::MAX_NAME {
        return Err(malformed(format!(
            "name {name:?} is empty or longer than {} bytes",
            limits::MAX_NAME
        )));
    }
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

fn put_len(out: &mut Vec<u8>, len: usize) -> Result<(), ErrorKind> {
    let l = u32::try_from(len).map_err(|_| malformed("value too long"))?;
    out.extend_from_slice(&l.to_le_bytes());
    Ok(())
}

fn encode_body(
    out: &mut Vec<u8>,
    fields: &[(String, Value)],
    subsections: &[Subsection],
    depth: usize,
) -> Result<(), ErrorKind> {
    if fields.len() > limits::MAX_FIELDS {
        return Err(malformed(format!(
            "{} fields (limit {})",
            fields.len(),
            limits::MAX_FIELDS
        )));
    }
    if subsections.len() > limits::MAX_SUBSECTIONS {
        return Err(malformed(format!(
            "{} subsections (limit {})",
            subsections.len(),
            limits::MAX_SUBSECTIONS
        )));
    }
    if depth > limits::MAX_DEPTH {
        return Err(malformed(format!(
            "subsections nested deeper than {}",
            limits::MAX_DEPTH
        )));
    }
    put_len(out, fields.len())?;
    for (name, v) in fields {
        put_name(out, name)?;
        out.push(v.ty() as u8);
        match v {
            Value::Bool(b) => out.push(u8::from(*b)),
            Value::U8(x) => out.push(*x),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bytes(b) => {
                put_len(out, b.len())?;
                out.extend_from_slice(b);
            }
            Value::Str(s) => {
                put_len(out, s.len())?;
                out.extend_from_slice(s.as_bytes());
            }
            Value::U64s(v) => {
                put_len(out, v.len())?;
                for x in v {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    put_len(out, subsections.len())?;
    for s in subsections {
        put_name(out, &s.name)?;
        out.extend_from_slice(&s.version.to_le_bytes());
        let mut inner = Vec::new();
        encode_body(&mut inner, &s.fields, &s.subsections, depth + 1)?;
        put_len(out, inner.len())?;
        out.extend_from_slice(&inner);
    }
    Ok(())
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

type DecodeResult<T> = Result<T, (usize, ErrorKind)>;
type Fields = Vec<(String, Value)>;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> DecodeResult<&'a [u8]> {
        if self.b.len() - self.pos < n {
            return Err((
                self.pos,
                malformed(format!(
                    "needs {n} more bytes, {} left",
                    self.b.len() - self.pos
                )),
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> DecodeResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> DecodeResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> DecodeResult<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn name(&mut self) -> DecodeResult<String> {
        let at = self.pos;
        let n = self.u8()? as usize;
        if n == 0 {
            return Err((at, malformed("empty name")));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| (at, malformed("name is not UTF-8")))
    }
    /// A length that must fit in what is left, in units of `unit` bytes.
    fn len(&mut self, unit: usize) -> DecodeResult<usize> {
        let at = self.pos;
        let n = self.u32()? as usize;
        if n > (self.b.len() - self.pos) / unit {
            return Err((
                at,
                malformed(format!("length {n} runs past the end of the body")),
            ));
        }
        Ok(n)
    }
}

fn decode_body(c: &mut Cursor<'_>, depth: usize) -> DecodeResult<(Fields, Vec<Subsection>)> {
    let at = c.pos;
    let nfields = c.len(3)?;
    if nfields > limits::MAX_FIELDS {
        return Err((
            at,
            malformed(format!("{nfields} fields (limit {})", limits::MAX_FIELDS)),
        ));
    }
    let mut fields = Vec::with_capacity(nfields);
    for _ in 0..nfields {
        let name = c.name()?;
        let tat = c.pos;
        let ty = FieldType::from_tag(c.u8()?).ok_or((tat, malformed("unknown field type")))?;
        let v = match ty {
            FieldType::Bool => match c.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                _ => return Err((tat + 1, malformed("bool is neither 0 nor 1"))),
            },
            FieldType::U8 => Value::U8(c.u8()?),
            FieldType::U16 => Value::U16(u16::from_le_bytes(c.take(2)?.try_into().expect("2"))),
            FieldType::U32 => Value::U32(c.u32()?),
            FieldType::U64 => Value::U64(c.u64()?),
            FieldType::I64 => Value::I64(c.u64()? as i64),
            FieldType::Bytes => {
                let n = c.len(1)?;
                Value::Bytes(c.take(n)?.to_vec())
            }
            FieldType::Str => {
                let n = c.len(1)?;
                let sat = c.pos;
                Value::Str(
                    String::from_utf8(c.take(n)?.to_vec())
                        .map_err(|_| (sat, malformed("string is not UTF-8")))?,
                )
            }
            FieldType::U64s => {
                let n = c.len(8)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(c.u64()?);
                }
                Value::U64s(v)
            }
        };
        fields.push((name, v));
    }
    let at = c.pos;
    let nsub = c.len(9)?;
    if nsub > limits::MAX_SUBSECTIONS {
        return Err((
            at,
            malformed(format!(
                "{nsub} subsections (limit {})",
                limits::MAX_SUBSECTIONS
            )),
        ));
    }
    if nsub > 0 && depth >= limits::MAX_DEPTH {
        return Err((
            at,
            malformed(format!(
                "subsections nested deeper than {}",
                limits::MAX_DEPTH
            )),
        ));
    }
    let mut subsections = Vec::with_capacity(nsub);
    for _ in 0..nsub {
        let name = c.name()?;
        let version = c.u32()?;
        let blen = c.len(1)?;
        let start = c.pos;
        let inner = c.take(blen)?;
        let mut ic = Cursor { b: inner, pos: 0 };
        let (f, s) = decode_body(&mut ic, depth + 1).map_err(|(p, k)| (start + p, k))?;
        if ic.pos != inner.len() {
            return Err((start + ic.pos, malformed("bytes left in a subsection")));
        }
        subsections.push(Subsection {
            name,
            version,
            fields: f,
            subsections: s,
        });
    }
    Ok((fields, subsections))
}

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

fn fields_desc(fields: &[FieldSpec]) -> Vec<FieldDesc> {
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

    fn field(&self, name: &str) -> Option<&FieldSpec> {
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

    fn err_field(&self, field: &str) -> StateError {
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

fn check_fields(
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

    fn check_complete(&self) -> Result<(), StateError> {
        check_fields(
            &format!("{}/{}", self.section, self.spec.name),
            self.spec.fields,
            self.spec.version,
            &self.sub.fields,
        )
    }
}

/// Reads a section that has been checked against a schema.
pub struct SectionReader<'a> {
    schema: &'static Schema,
    section: &'a Section,
}

fn check_known(
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

    fn missing(&self, name: &str) -> StateError {
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
        if !devices
            .iter()
            .any(|d| d.schema().name == s.name && d.instance() == s.instance)
        {
            return Err(StateError::UnexpectedSection {
                section: s.name.clone(),
                instance: s.instance,
            });
        }
    }
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
