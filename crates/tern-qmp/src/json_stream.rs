//! QMP input as a JSON stream, as QEMU reads it: a message ends where its outermost object
//! closes, not at a newline. An object without a trailing newline is answered at once, several
//! objects on one line are answered in turn, and input that is not JSON gets an error while the
//! session carries on.
//!
//! The splitter only tracks nesting and strings; the message itself is parsed afterwards by
//! `serde_json`. Memory is bounded: a message larger than [`MAX_INPUT`] or nested deeper than
//! [`MAX_DEPTH`] is reported once and then swallowed (without being kept) until it closes. A
//! 0xFF byte, which can never appear in JSON text, resets the splitter, as in QEMU.

/// Longest accepted message; a longer one is answered with an error and skipped.
pub const MAX_INPUT: usize = 1 << 20;
/// Deepest accepted nesting of objects and arrays (serde_json's own limit is 128).
pub const MAX_DEPTH: usize = 64;

/// What the splitter found in the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// A complete top-level value (or stray text) to parse.
    Message(Vec<u8>),
    /// Input that was skipped, and why.
    Error(String),
}

/// Splits a byte stream into top-level JSON values.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// Collecting text outside any object (a scalar or garbage), up to the next space.
    stray: bool,
    /// Over a limit: the rest of this message is dropped as it arrives.
    discarding: bool,
}

impl Splitter {
    /// Feeds `bytes`, calling `out` for every piece completed by them.
    pub fn feed(&mut self, bytes: &[u8], out: &mut impl FnMut(Piece)) {
        for &b in bytes {
            self.byte(b, out);
        }
    }

    fn reset(&mut self) {
        *self = Splitter::default();
    }

    fn byte(&mut self, b: u8, out: &mut impl FnMut(Piece)) {
        if b == 0xff {
            let pending = self.depth > 0 || self.stray || self.discarding;
            self.reset();
            if pending {
                out(Piece::Error("JSON parse error, input reset by 0xFF".into()));
            }
            return;
        }
        if self.stray {
            if b.is_ascii_whitespace() || b == b'{' || b == b'[' {
                let text = std::mem::take(&mut self.buf);
                let discarded = self.discarding;
                self.reset();
                if !discarded {
                    out(Piece::Message(text));
                }
                if b.is_ascii_whitespace() {
                    return;
                }
                // An object starts right after the stray text: take it below.
            } else {
                self.keep(b, out);
                return;
            }
        }
        if self.depth == 0 {
            match b {
                b'{' | b'[' => self.depth = 1,
                _ if b.is_ascii_whitespace() => return,
                _ => self.stray = true,
            }
            self.keep(b, out);
            return;
        }
        self.keep(b, out);
        if self.in_string {
            match (self.escape, b) {
                (true, _) => self.escape = false,
                (false, b'\\') => self.escape = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_DEPTH && !self.discarding {
                    self.discard(out, format!("JSON nesting deeper than {MAX_DEPTH}"));
                }
            }
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    let text = std::mem::take(&mut self.buf);
                    let discarded = self.discarding;
                    self.reset();
                    if !discarded {
                        out(Piece::Message(text));
                    }
                }
            }
            _ => {}
        }
    }

    /// Keeps `b` as part of the current piece, unless over the size limit.
    fn keep(&mut self, b: u8, out: &mut impl FnMut(Piece)) {
        if self.discarding {
            return;
        }
        if self.buf.len() >= MAX_INPUT {
            self.discard(out, format!("QMP input exceeds {MAX_INPUT} bytes"));
            return;
        }
        self.buf.push(b);
    }

    fn discard(&mut self, out: &mut impl FnMut(Piece), why: String) {
        self.discarding = true;
        self.buf = Vec::new();
        out(Piece::Error(why));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8]) -> Vec<Piece> {
        let mut s = Splitter::default();
        let mut v = Vec::new();
        s.feed(input, &mut |p| v.push(p));
        v
    }

    fn msg(s: &str) -> Piece {
        Piece::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn objects_end_where_they_close_not_at_newlines() {
        assert_eq!(
            split(br#"{"execute":"stop"}"#),
            [msg(r#"{"execute":"stop"}"#)]
        );
        assert_eq!(
            split(b"{\"a\":1}{\"b\":[2]} \r\n{\"c\":\n3}"),
            [msg(r#"{"a":1}"#), msg(r#"{"b":[2]}"#), msg("{\"c\":\n3}")]
        );
        // Braces and escaped quotes inside strings do not count.
        let tricky = r#"{"x":"}\"{[","y":{}}"#;
        assert_eq!(split(tricky.as_bytes()), [msg(tricky)]);
        // Fed a byte at a time, the same.
        let mut s = Splitter::default();
        let mut v = Vec::new();
        for b in tricky.bytes() {
            s.feed(&[b], &mut |p| v.push(p));
        }
        assert_eq!(v, [msg(tricky)]);
    }

    #[test]
    fn stray_text_is_a_piece_of_its_own_and_the_stream_goes_on() {
        assert_eq!(
            split(b"42 garbage{\"a\":1}"),
            [msg("42"), msg("garbage"), msg(r#"{"a":1}"#)]
        );
        assert_eq!(split(b"}\n"), [msg("}")]);
    }

    #[test]
    fn limits_are_reported_once_and_the_next_message_is_read() {
        let deep = format!(
            "{}{}",
            "[".repeat(MAX_DEPTH + 10),
            "]".repeat(MAX_DEPTH + 10)
        );
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        let v = split(format!("{deep}{ok}").as_bytes());
        assert!(
            matches!(&v[0], Piece::Error(e) if e.contains("nesting")),
            "{v:?}"
        );
        assert_eq!(v[1], msg(&ok));
        assert_eq!(v.len(), 2);

        let big = format!("{{\"s\":\"{}\"}}", "x".repeat(MAX_INPUT));
        let v = split(format!("{big}{{}}").as_bytes());
        assert!(
            matches!(&v[0], Piece::Error(e) if e.contains("exceeds")),
            "{v:?}"
        );
        assert_eq!(v[1..], [msg("{}")]);
        let v = split(format!("{} {{}}", "z".repeat(MAX_INPUT + 5)).as_bytes());
        assert_eq!(v.len(), 2, "{:?}", v.first());
        assert_eq!(v[1], msg("{}"));
    }

    #[test]
    fn a_0xff_byte_resets_the_splitter() {
        let v = split(b"{\"a\": [1, \xff{\"b\":2}");
        assert!(matches!(&v[0], Piece::Error(_)));
        assert_eq!(v[1], msg(r#"{"b":2}"#));
        assert_eq!(split(b"\xff{}"), [msg("{}")]);
    }
}
