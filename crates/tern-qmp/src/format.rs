//! QEMU's JSON spacing: `{"a": 1, "b": [1, 2]}`.

use std::io;

use serde_json::ser::Formatter;
use serde_json::Value;

struct QemuFormatter;

/// QEMU separates array items and object members with ", ".
fn separator<W: ?Sized + io::Write>(w: &mut W, first: bool) -> io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

impl Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separator(w, first)
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separator(w, first)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

/// Serialises a value the way QEMU prints it on a QMP socket.
pub fn to_qemu_json(v: &Value) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    serde::Serialize::serialize(v, &mut ser).expect("serialising a Value into memory cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spacing_matches_qemu() {
        let v = json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}});
        assert_eq!(
            to_qemu_json(&v),
            r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#
        );
        assert_eq!(to_qemu_json(&json!({"return": {}})), r#"{"return": {}}"#);
        assert_eq!(to_qemu_json(&json!([1, 2])), "[1, 2]");
    }
}
