//! Any stream decodes in bounded memory: long streams, a flood of unknown optional records,
//! thousands of sections.

mod common;

use common::desc;
use tern_wire::{
    limits, record_type, ErrorKind, RamRegionDesc, RamRun, Record, RecordWriter, RunData,
    StreamReader, StreamWriter, VmDescription, FLAG_OPTIONAL, PAGE_SIZE,
};

#[test]
fn bounded_memory_on_a_long_stream() {
    // 256 MiB of pages through a pipe: the reader never holds more than one record.
    let (reader, writer) = std::io::pipe().unwrap();
    let producer = std::thread::spawn(move || {
        let data = vec![0x5au8; 1024 * PAGE_SIZE];
        let mut w = StreamWriter::new(std::io::BufWriter::new(writer)).unwrap();
        let d = VmDescription {
            ram: vec![RamRegionDesc {
                id: 0,
                name: "ram".into(),
                gpa: 0,
                size: 1 << 30,
            }],
            ..Default::default()
        };
        w.description(&d).unwrap();
        for i in 0..64u64 {
            w.ram_pages(
                0,
                &[RamRun {
                    first_page: (i % 256) * 1024,
                    data: RunData::Raw(&data),
                }],
            )
            .unwrap();
        }
        w.finish().unwrap().1
    });
    let mut r = StreamReader::new(std::io::BufReader::new(reader)).unwrap();
    let mut pages = 0;
    while let Some(rec) = r.next_record().unwrap() {
        if let Record::Ram(ram) = rec {
            pages += ram.raw_pages();
        }
        assert!(r.buffer_capacity() <= limits::MAX_RECORD + 16);
    }
    let totals = producer.join().unwrap();
    assert_eq!(pages, 64 * 1024);
    assert_eq!(totals.raw_pages, pages);
}

#[test]
fn a_million_unknown_optional_records_are_counted_not_kept() {
    let n = 1_000_000u64;
    let (reader, writer) = std::io::pipe().unwrap();
    let producer = std::thread::spawn(move || {
        let mut w = RecordWriter::new(std::io::BufWriter::new(writer));
        w.write_stream_header(0).unwrap();
        let d = serde_json::to_vec(&desc(0)).unwrap();
        w.write(record_type::VM_DESCRIPTION, 0, &d).unwrap();
        for i in 0..n {
            w.write(0x7000 + (i % 16) as u16, FLAG_OPTIONAL, &[0u8; 8])
                .unwrap();
        }
    });
    let mut r = StreamReader::new(std::io::BufReader::new(reader)).unwrap();
    let mut skipped = 0u64;
    loop {
        match r.next_record() {
            Ok(Some(Record::SkippedOptional { .. })) => skipped += 1,
            Ok(Some(_)) => {}
            Ok(None) => break,
            // The producer stops without END.
            Err(e) => {
                assert!(matches!(e.kind, ErrorKind::Truncated(_)), "{e}");
                break;
            }
        }
        assert!(r.skipped().len() <= tern_wire::MAX_SKIPPED_KEPT);
    }
    producer.join().unwrap();
    assert_eq!(skipped, n);
    assert_eq!(r.skipped_total(), n);
    assert_eq!(r.skipped().len(), tern_wire::MAX_SKIPPED_KEPT);
}

#[test]
fn ten_thousand_large_sections_are_refused_early() {
    let section = |i: usize| tern_wire::Section {
        name: format!("dev{i}"),
        instance: 0,
        version: 1,
        fields: vec![("blob".into(), tern_wire::Value::Bytes(vec![7; 1 << 20]))],
        subsections: vec![],
    };
    // Declared: more than MAX_SECTIONS, so the description itself is refused.
    let mut w = RecordWriter::new(Vec::new());
    w.write_stream_header(0).unwrap();
    let d = serde_json::to_vec(&desc(10_000)).unwrap();
    assert!(d.len() < limits::MAX_DESCRIPTION);
    w.write(record_type::VM_DESCRIPTION, 0, &d).unwrap();
    let bytes = w.into_inner();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let e = r.next_record().unwrap_err();
    assert!(e.to_string().contains("section"), "{e}");

    // Not declared: the first one is refused as it arrives, before the next is read.
    let (reader, writer) = std::io::pipe().unwrap();
    let producer = std::thread::spawn(move || {
        let mut w = StreamWriter::new(std::io::BufWriter::new(writer)).unwrap();
        w.description(&desc(4)).unwrap();
        for i in 0..10_000 {
            if w.section(&section(i)).is_err() {
                return i;
            }
        }
        10_000
    });
    let mut r = StreamReader::new(std::io::BufReader::new(reader)).unwrap();
    let mut kept = 0;
    let e = loop {
        match r.next_record() {
            Ok(Some(Record::Section(_))) => kept += 1,
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert_eq!(kept, 4, "the four declared ones");
    assert!(e.to_string().contains("dev4"), "{e}");
    drop(r);
    assert!(
        producer.join().unwrap() < 10_000,
        "the reader stopped reading"
    );

    // Declared once, sent twice: refused.
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.description(&desc(1)).unwrap();
    w.section(&section(0)).unwrap();
    w.section(&section(0)).unwrap();
    let bytes = w.finish().unwrap().0;
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let e = loop {
        if let Err(e) = r.next_record() {
            break e;
        }
    };
    assert!(e.to_string().contains("dev0"), "{e}");
}

#[test]
fn a_reader_for_small_records_refuses_a_large_one_from_its_header() {
    let mut w = RecordWriter::new(Vec::new());
    w.write(record_type::RETURN_MESSAGE, 0, &vec![0u8; 100 << 10])
        .unwrap();
    let bytes = w.into_inner();
    // Only the header is there: the refusal cannot have needed the body.
    let mut r = tern_wire::RecordReader::new(&bytes[..16]).with_max_body(64 << 10);
    let e = r.next_record().unwrap_err();
    assert!(
        matches!(e.kind, ErrorKind::TooLarge { max, .. } if max == 64 << 10),
        "{e}"
    );
}
