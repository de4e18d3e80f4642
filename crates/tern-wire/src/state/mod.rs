//! Versioned device state: sections of self-describing fields, optional subsections, schemas.
//!
//! A device declares a [`Schema`]: its section name, the version it saves, the oldest version it
//! can load, each field with the version it appeared in, and the subsections it may send. Saving
//! goes through a [`SectionBuilder`] (fields checked against the schema, each subsection sent only
//! if its `needed` predicate holds); loading goes through a [`SectionReader`], which refuses
//! versions outside the schema's range and anything it does not know — an unknown field or
//! subsection fails the load, naming it, rather than being dropped. Fields newer than the stream's
//! section version are absent and the device's upgrade path fills them.

mod builder;
mod codec;
mod reader;
mod schema;

use crate::desc::{FieldDesc, SectionDesc, SubsectionDesc};
use crate::error::{ErrorKind, StateError};
use crate::limits;

use builder::check_fields;
pub use builder::{SectionBuilder, SubsectionBuilder};
use codec::{decode_body, encode_body, malformed, put_name, Cursor};
pub use reader::{SectionReader, SubsectionReader};
pub use schema::{
    check_sections, load_all, save_all, FieldSpec, MigratableState, Schema, SubsectionSpec,
};

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

pub(super) fn fields_json(fields: &[(String, Value)]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (n, v) in fields {
        m.insert(n.clone(), v.to_json());
    }
    serde_json::Value::Object(m)
}
