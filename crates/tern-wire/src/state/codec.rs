//! The DEVICE_STATE body: fields and nested subsections, encoded and decoded in bounded memory.

use super::*;

pub(super) fn malformed(reason: impl Into<String>) -> ErrorKind {
    ErrorKind::Malformed {
        record: "DEVICE_STATE",
        reason: reason.into(),
    }
}

pub(super) fn put_name(out: &mut Vec<u8>, name: &str) -> Result<(), ErrorKind> {
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

pub(super) fn put_len(out: &mut Vec<u8>, len: usize) -> Result<(), ErrorKind> {
    let l = u32::try_from(len).map_err(|_| malformed("value too long"))?;
    out.extend_from_slice(&l.to_le_bytes());
    Ok(())
}

pub(super) fn encode_body(
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

pub(super) struct Cursor<'a> {
    pub(super) b: &'a [u8],
    pub(super) pos: usize,
}

pub(super) type DecodeResult<T> = Result<T, (usize, ErrorKind)>;
pub(super) type Fields = Vec<(String, Value)>;

impl<'a> Cursor<'a> {
    pub(super) fn take(&mut self, n: usize) -> DecodeResult<&'a [u8]> {
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
    pub(super) fn u8(&mut self) -> DecodeResult<u8> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u32(&mut self) -> DecodeResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    pub(super) fn u64(&mut self) -> DecodeResult<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    pub(super) fn name(&mut self) -> DecodeResult<String> {
        let at = self.pos;
        let n = self.u8()? as usize;
        if n == 0 {
            return Err((at, malformed("empty name")));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| (at, malformed("name is not UTF-8")))
    }
    /// A length that must fit in what is left, in units of `unit` bytes.
    pub(super) fn len(&mut self, unit: usize) -> DecodeResult<usize> {
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

pub(super) fn decode_body(
    c: &mut Cursor<'_>,
    depth: usize,
) -> DecodeResult<(Fields, Vec<Subsection>)> {
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
