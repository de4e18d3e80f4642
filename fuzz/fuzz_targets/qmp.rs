//! Any QMP input: the JSON stream splitter yields bounded pieces, and every piece parses to a
//! command or a QMP error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_qmp::json_stream::{Piece, Splitter, MAX_INPUT};
use tern_qmp::Command;

fuzz_target!(|data: &[u8]| {
    let mut s = Splitter::default();
    let mut pieces = Vec::new();
    // Fed in two parts, as a socket may deliver it.
    let cut = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    s.feed(&data[..cut], &mut |p| pieces.push(p));
    s.feed(&data[cut..], &mut |p| pieces.push(p));
    for p in pieces {
        let Piece::Message(m) = p else { continue };
        assert!(m.len() <= MAX_INPUT);
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice(&m) else {
            continue;
        };
        if let (Some(serde_json::Value::String(name)), Some(serde_json::Value::Object(args))) =
            (obj.get("execute"), obj.get("arguments"))
        {
            let _ = Command::parse(name, args);
        }
    }
});
