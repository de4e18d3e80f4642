//! Robustness of the decoder against every kind of damage: truncation at every byte, every
//! single flipped bit, bad lengths, bad headers, records out of order, and a bounded-time
//! structure-aware mutation fuzzer. Every failure must be a typed error with an offset inside
//! the input; nothing may panic or allocate past the limits. Round trips: `round_trip.rs`.

use std::time::{Duration, Instant};

use tern_wire::{
    limits, record_type, ErrorKind, PostcopyCommand, RamRegionDesc, RamRun, RecordReader,
    RecordWriter, RunData, Section, SectionDesc, StreamReader, StreamWriter, Subsection, Value,
    VmDescription, WireError, PAGE_SIZE,
};

fn desc(sections: &[(&str, u32)]) -> VmDescription {
    VmDescription {
        machine: serde_json::json!({"memory": 80 * PAGE_SIZE, "vcpus": 1}),
        ram: vec![
            RamRegionDesc {
                id: 0,
                name: "low".into(),
                gpa: 0,
                size: 64 * PAGE_SIZE as u64,
            },
            RamRegionDesc {
                id: 1,
                name: "high".into(),
                gpa: 1 << 32,
                size: 16 * PAGE_SIZE as u64,
            },
        ],
        sections: sections
            .iter()
            .map(|(n, i)| SectionDesc {
                name: n.to_string(),
                instance: *i,
                version: 1,
                min_version: 1,
                fields: vec![],
                subsections: vec![],
            })
            .collect(),
    }
}

fn section(name: &str, instance: u32) -> Section {
    Section {
        name: name.into(),
        instance,
        version: 1,
        fields: vec![
            ("rip".into(), Value::U64(0xffff_8000_0000_1234)),
            ("flags".into(), Value::U32(2)),
            ("regs".into(), Value::U64s(vec![1, 2, 3])),
            ("lapic".into(), Value::Bytes(vec![0xab; 40])),
            ("on".into(), Value::Bool(true)),
        ],
        subsections: vec![Subsection {
            name: "extra".into(),
            version: 1,
            fields: vec![("note".into(), Value::Str("hi".into()))],
            subsections: vec![],
        }],
    }
}

/// A small stream exercising every record type.
fn sample() -> Vec<u8> {
    let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 + 1) as u8).collect();
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.source_info(&serde_json::json!({"tern": "test"})).unwrap();
    w.description(&desc(&[("cpu", 0), ("serial", 0)])).unwrap();
    w.ram_pages(
        0,
        &[
            RamRun {
                first_page: 0,
                data: RunData::Zero(60),
            },
            RamRun {
                first_page: 60,
                data: RunData::Raw(&page),
            },
        ],
    )
    .unwrap();
    w.ram_pages(
        1,
        &[RamRun {
            first_page: 3,
            data: RunData::Zero(2),
        }],
    )
    .unwrap();
    w.postcopy(&PostcopyCommand::Discard {
        region: 0,
        ranges: vec![(1, 2)],
    })
    .unwrap();
    w.section(&section("cpu", 0)).unwrap();
    w.section(&section("serial", 0)).unwrap();
    w.finish().unwrap().0
}

/// Reads a whole stream; checks the memory bound on the way.
fn decode_all(bytes: &[u8]) -> Result<u64, WireError> {
    let mut r = StreamReader::new(bytes)?;
    let mut n = 0;
    while r.next_record()?.is_some() {
        n += 1;
        assert!(r.buffer_capacity() <= limits::MAX_RECORD + 16);
    }
    Ok(n)
}

fn assert_typed_error(bytes: &[u8], what: &str) -> WireError {
    match decode_all(bytes) {
        Ok(n) => panic!("{what}: decoded {n} records without error"),
        Err(e) => {
            assert!(
                e.offset <= bytes.len() as u64,
                "{what}: offset {} past input {}",
                e.offset,
                bytes.len()
            );
            e
        }
    }
}

#[test]
fn sample_decodes() {
    let s = sample();
    assert_eq!(decode_all(&s).unwrap(), 8);
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    let s = sample();
    for n in 0..s.len() {
        let e = assert_typed_error(&s[..n], &format!("truncated at {n}"));
        assert!(
            matches!(e.kind, ErrorKind::Truncated(_)),
            "truncated at {n}: {e}"
        );
    }
}

#[test]
fn every_single_flipped_bit_is_detected() {
    let s = sample();
    let mut copy = s.clone();
    for byte in 0..s.len() {
        for bit in 0..8 {
            copy[byte] ^= 1 << bit;
            assert_typed_error(&copy, &format!("bit {bit} of byte {byte}"));
            copy[byte] ^= 1 << bit;
        }
    }
}

#[test]
fn bad_headers() {
    let s = sample();
    let mut m = s.clone();
    m[0] = b'Q';
    assert!(matches!(
        assert_typed_error(&m, "magic").kind,
        ErrorKind::BadMagic
    ));
    let mut v = s.clone();
    v[8] = 9;
    let e = assert_typed_error(&v, "version");
    assert!(
        matches!(
            e.kind,
            ErrorKind::UnsupportedVersion {
                found: 9,
                supported: 1
            }
        ),
        "{e}"
    );
    assert_eq!(e.offset, 0);
    assert!(matches!(
        assert_typed_error(b"", "empty").kind,
        ErrorKind::Truncated(_)
    ));
}

/// A stream with one hand-made record after a valid description.
fn with_record(ty: u16, body: &[u8]) -> Vec<u8> {
    let mut w = RecordWriter::new(Vec::new());
    w.write_stream_header(0).unwrap();
    let d = serde_json::to_vec(&desc(&[("cpu", 0)])).unwrap();
    w.write(record_type::VM_DESCRIPTION, 0, &d).unwrap();
    w.write(ty, 0, body).unwrap();
    w.into_inner()
}

#[test]
fn zero_max_and_over_max_lengths() {
    for ty in [
        record_type::VM_DESCRIPTION,
        record_type::RAM_PAGES,
        record_type::DEVICE_STATE,
        record_type::POSTCOPY_COMMAND,
        record_type::END,
        record_type::SOURCE_INFO,
    ] {
        let e = assert_typed_error(&with_record(ty, b""), "empty body");
        assert!(!matches!(e.kind, ErrorKind::Io(_)), "{e}");
    }
    // A header claiming the largest body, then nothing: truncated, buffer bounded.
    let mut s = with_record(record_type::RAM_PAGES, b"");
    let at = s.len() - 16;
    s.truncate(at);
    let mut head = vec![2u8, 0, 0, 0];
    head.extend_from_slice(&(limits::MAX_RECORD as u32).to_le_bytes());
    s.extend_from_slice(&head);
    assert!(matches!(
        assert_typed_error(&s, "max").kind,
        ErrorKind::Truncated(_)
    ));
    // One byte over the limit: refused before reading.
    let n = s.len();
    s[n - 4..].copy_from_slice(&(limits::MAX_RECORD as u32 + 1).to_le_bytes());
    let e = assert_typed_error(&s, "over max");
    assert!(matches!(e.kind, ErrorKind::TooLarge { .. }), "{e}");
    assert_eq!(e.offset, at as u64);
    // A writer refuses to produce one.
    let big = vec![0u8; limits::MAX_RECORD + 1];
    let mut w = RecordWriter::new(std::io::sink());
    assert!(w.write(record_type::SOURCE_INFO, 0, &big).is_err());
}

#[test]
fn records_out_of_order_and_other_rule_violations() {
    let page = vec![1u8; PAGE_SIZE];
    let ram_first = {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.ram_pages(
            0,
            &[RamRun {
                first_page: 0,
                data: RunData::Raw(&page),
            }],
        )
        .unwrap();
        w.description(&desc(&[])).unwrap();
        w.finish().unwrap().0
    };
    assert!(matches!(
        assert_typed_error(&ram_first, "RAM first").kind,
        ErrorKind::Order(_)
    ));

    let twice = {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.description(&desc(&[])).unwrap();
        w.description(&desc(&[])).unwrap();
        w.finish().unwrap().0
    };
    assert!(matches!(
        assert_typed_error(&twice, "two descriptions").kind,
        ErrorKind::Order(_)
    ));

    let no_end = {
        let mut w = RecordWriter::new(Vec::new());
        w.write_stream_header(0).unwrap();
        w.write(
            record_type::VM_DESCRIPTION,
            0,
            &serde_json::to_vec(&desc(&[])).unwrap(),
        )
        .unwrap();
        w.into_inner()
    };
    assert!(matches!(
        assert_typed_error(&no_end, "no END").kind,
        ErrorKind::Truncated(_)
    ));

    let mut trailing = sample();
    trailing.extend_from_slice(&[0; 8]);
    assert!(matches!(
        assert_typed_error(&trailing, "trailing").kind,
        ErrorKind::TrailingData
    ));

    let out_of_range = {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.description(&desc(&[])).unwrap();
        w.ram_pages(
            1,
            &[RamRun {
                first_page: 15,
                data: RunData::Zero(2),
            }],
        )
        .unwrap();
        w.finish().unwrap().0
    };
    assert!(matches!(
        assert_typed_error(&out_of_range, "range").kind,
        ErrorKind::RunOutOfRange { .. }
    ));

    let unknown_region = {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.description(&desc(&[])).unwrap();
        w.ram_pages(
            9,
            &[RamRun {
                first_page: 0,
                data: RunData::Zero(1),
            }],
        )
        .unwrap();
        w.finish().unwrap().0
    };
    assert!(matches!(
        assert_typed_error(&unknown_region, "region").kind,
        ErrorKind::UnknownRegion(9)
    ));

    let undeclared = {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.description(&desc(&[("cpu", 0)])).unwrap();
        w.section(&section("gpu", 0)).unwrap();
        w.finish().unwrap().0
    };
    assert!(matches!(
        assert_typed_error(&undeclared, "undeclared").kind,
        ErrorKind::State(_)
    ));

    let duplicate = {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.description(&desc(&[("cpu", 0)])).unwrap();
        w.section(&section("cpu", 0)).unwrap();
        w.section(&section("cpu", 0)).unwrap();
        w.finish().unwrap().0
    };
    assert!(matches!(
        assert_typed_error(&duplicate, "duplicate").kind,
        ErrorKind::State(_)
    ));

    let run = |encoding: u8, pages: u32, tail: &[u8]| {
        let mut body = Vec::new();
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&pages.to_le_bytes());
        body.extend_from_slice(&[encoding, 0, 0, 0]);
        body.extend_from_slice(tail);
        with_record(record_type::RAM_PAGES, &body)
    };
    assert!(matches!(
        assert_typed_error(&run(tern_wire::ENC_XOR_DELTA, 1, &[]), "xor").kind,
        ErrorKind::UnsupportedEncoding(4)
    ));
    // Compressed runs: a length that is missing or runs past the body, a run too long to
    // decompress in bounded memory.
    for (encoding, pages, tail, what) in [
        (tern_wire::ENC_LZ4, 1, &[][..], "no length"),
        (
            tern_wire::ENC_ZSTD,
            1,
            &[9, 0, 0, 0, 1, 2][..],
            "length past the body",
        ),
        (
            tern_wire::ENC_LZ4,
            tern_wire::MAX_COMPRESSED_PAGES + 1,
            &[0, 0, 0, 0][..],
            "too long",
        ),
    ] {
        assert!(
            matches!(
                assert_typed_error(&run(encoding, pages, tail), what).kind,
                ErrorKind::Malformed { .. }
            ),
            "{what}"
        );
    }
    // Many small compressed runs may not add up to more than one record of raw pages: a few
    // hundred bytes of zstd could otherwise make a reader decompress gigabytes.
    let bomb = {
        let mut body = Vec::new();
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&2u32.to_le_bytes());
        for first in [0u64, 0] {
            body.extend_from_slice(&first.to_le_bytes());
            body.extend_from_slice(&tern_wire::MAX_COMPRESSED_PAGES.to_le_bytes());
            body.extend_from_slice(&[tern_wire::ENC_ZSTD, 0, 0, 0]);
            body.extend_from_slice(&0u32.to_le_bytes());
        }
        with_record(record_type::RAM_PAGES, &body)
    };
    let e = assert_typed_error(&bomb, "bomb");
    assert!(
        e.to_string().contains("more than 4096 pages in one record"),
        "{e}"
    );
}

/// Splits a stream into (header, records as (type, flags, body)).
fn split(bytes: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
    let mut r = RecordReader::new(bytes);
    r.read_stream_header().unwrap();
    let mut v = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        v.push((rec.ty, rec.flags, rec.body.to_vec()));
    }
    v
}

fn join(records: &[(u16, u16, Vec<u8>)]) -> Vec<u8> {
    let mut w = RecordWriter::new(Vec::new());
    w.write_stream_header(0).unwrap();
    for (t, f, b) in records {
        w.write(*t, *f, b).unwrap();
    }
    w.into_inner()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Structure-aware mutation fuzzing for a bounded time (TERN_FUZZ_SECS, default 3): bodies are
/// mutated and re-framed with valid CRCs so the parsers behind the checksum are exercised.
#[test]
fn mutation_fuzz_never_panics() {
    let secs: u64 = std::env::var("TERN_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let base = split(&sample());
    let interesting: [u32; 7] = [
        0,
        1,
        0x7f,
        0xff,
        0xffff,
        u32::MAX,
        limits::MAX_RECORD as u32,
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut execs, mut accepted) = (0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..256 {
            let mut recs = base.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(recs.len());
                let body = &mut recs[i].2;
                match rng.below(7) {
                    0 if !body.is_empty() => {
                        let at = rng.below(body.len());
                        body[at] ^= 1 << rng.below(8);
                    }
                    1 if body.len() >= 4 => {
                        let at = rng.below(body.len() - 3);
                        let v = interesting[rng.below(interesting.len())];
                        body[at..at + 4].copy_from_slice(&v.to_le_bytes());
                    }
                    2 if !body.is_empty() => {
                        let n = rng.below(body.len());
                        body.truncate(n);
                    }
                    3 => {
                        let at = rng.below(body.len() + 1);
                        body.insert(at, rng.next() as u8);
                    }
                    4 => {
                        let j = rng.below(recs.len());
                        recs.swap(i, j);
                    }
                    5 => {
                        let r = recs[i].clone();
                        recs.insert(rng.below(recs.len() + 1), r);
                    }
                    _ => {
                        recs[i].0 = rng.next() as u16;
                        recs[i].1 = (rng.next() & 1) as u16;
                    }
                }
            }
            let bytes = join(&recs);
            match decode_all(&bytes) {
                Ok(_) => accepted += 1,
                Err(e) => assert!(e.offset <= bytes.len() as u64),
            }
            // Raw damage too, checksum and all.
            let mut raw = bytes;
            let at = rng.below(raw.len());
            raw[at] = rng.next() as u8;
            let _ = decode_all(&raw);
            execs += 2;
        }
    }
    eprintln!(
        "mutation fuzz: {execs} executions in {secs} s, {accepted} mutated streams still valid"
    );
    assert!(execs > 1000);
}
