//! The mapped layout: a stream written in it reads back page for page; its records are checked
//! like any stream's (a hostile MAPPED_RAM or PAGE_CRCS is a typed error); a corrupt page or a
//! short file is caught.

use std::os::unix::fs::FileExt;

use tern_wire::mapped::{encode_page_crcs, zero_page_crc, MappedRam};
use tern_wire::{
    record_type, ErrorKind, MappedFile, RamRegionDesc, RamRun, Record, RecordWriter, RunData,
    StreamReader, StreamWriter, VmDescription, FLAG_MAPPED, PAGE_SIZE,
};

const PAGES: u64 = 300;

fn desc() -> VmDescription {
    VmDescription {
        ram: vec![
            RamRegionDesc {
                id: 0,
                name: "low".into(),
                gpa: 0,
                size: PAGES * PAGE_SIZE as u64,
            },
            RamRegionDesc {
                id: 1,
                name: "high".into(),
                gpa: 1 << 32,
                size: 70 * PAGE_SIZE as u64,
            },
        ],
        ..Default::default()
    }
}

fn page(p: u64) -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| (p as usize * 7 + i) as u8).collect()
}

/// A plain stream: pages 10..20 and 100 of region 0 with data, page 5 of region 1; page 15
/// later zeroed.
fn stream() -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.description(&desc()).unwrap();
    let data: Vec<u8> = (10..20).flat_map(page).collect();
    w.ram_pages(
        0,
        &[RamRun {
            first_page: 10,
            data: RunData::Raw(&data),
        }],
    )
    .unwrap();
    w.ram_pages(
        0,
        &[RamRun {
            first_page: 100,
            data: RunData::Raw(&page(100)),
        }],
    )
    .unwrap();
    w.ram_pages(
        1,
        &[RamRun {
            first_page: 5,
            data: RunData::Raw(&page(5)),
        }],
    )
    .unwrap();
    w.ram_pages(
        0,
        &[RamRun {
            first_page: 15,
            data: RunData::Zero(1),
        }],
    )
    .unwrap();
    w.finish().unwrap().0
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tern-mapped-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn written(name: &str) -> (std::path::PathBuf, std::fs::File) {
    let p = tmp(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    tern_wire::write_mapped(&stream()[..], &f).unwrap();
    (p, f)
}

#[test]
fn a_mapped_file_reads_back_page_for_page() {
    let (p, _) = written("ok.tern");
    let m = MappedFile::open(std::fs::File::open(&p).unwrap()).unwrap();
    assert_eq!(m.layout.area_offset % (2 << 20), 0);
    assert_eq!(m.totals.raw_pages, 11);
    assert_eq!(m.totals.zero_pages, PAGES + 70 - 11);
    let mut buf = vec![0u8; PAGE_SIZE];
    for (ri, p, want) in [
        (0, 10, page(10)),
        (0, 19, page(19)),
        (0, 100, page(100)),
        (1, 5, page(5)),
        (0, 15, vec![0; PAGE_SIZE]),
        (0, 0, vec![0; PAGE_SIZE]),
    ] {
        m.read_pages(ri, p, &mut buf).unwrap();
        assert_eq!(buf, want, "page {p} of region index {ri}");
        assert_eq!(m.is_zero(ri, p), want.iter().all(|&b| b == 0));
    }
    assert_eq!(m.verify_pages().unwrap(), 11);
    // A sequential reader sees a whole stream (what follows END is the pages).
    let bytes = std::fs::read(&p).unwrap();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    assert!(r.is_mapped());
    let mut crcs = 0;
    while let Some(rec) = r.next_record().unwrap() {
        if let Record::PageCrcs { .. } = rec {
            crcs += 1;
        }
    }
    assert_eq!(crcs, 2);
    // The zero page's CRC is the one the spec gives.
    assert_eq!(zero_page_crc(), 0x98f9_4189);
}

#[test]
fn a_corrupt_page_or_a_short_file_is_caught() {
    let (p, f) = written("bad.tern");
    let m = MappedFile::open(std::fs::File::open(&p).unwrap()).unwrap();
    let at = m.layout.regions[0].page_offset(12) + 99;
    drop(m);
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 1], at).unwrap();
    let m = MappedFile::open(std::fs::File::open(&p).unwrap()).unwrap();
    let e = m.verify_pages().unwrap_err().to_string();
    assert!(
        e.contains("page 12 of region 0 does not match its CRC"),
        "{e}"
    );
    let mut buf = vec![0u8; PAGE_SIZE];
    assert!(m.read_pages(0, 12, &mut buf).is_err());
    m.read_pages(0, 13, &mut buf).unwrap();
    assert!(
        m.read_pages(0, PAGES, &mut buf).is_err(),
        "past the region's end"
    );
    let end = m.layout.end();
    drop(m);
    f.set_len(end - 1).unwrap();
    let e = MappedFile::open(std::fs::File::open(&p).unwrap())
        .err()
        .unwrap();
    assert!(matches!(e.kind, ErrorKind::Truncated(_)), "{e}");
}

/// A mapped stream's records, written by hand.
fn records(mapped: &[u8], crcs: &[Vec<u8>]) -> Vec<u8> {
    let mut w = RecordWriter::new(Vec::new());
    w.write_stream_header(FLAG_MAPPED).unwrap();
    let d = serde_json::to_vec(&desc()).unwrap();
    w.write(record_type::VM_DESCRIPTION, 0, &d).unwrap();
    w.write(record_type::MAPPED_RAM, 0, mapped).unwrap();
    for c in crcs {
        w.write(record_type::PAGE_CRCS, 0, c).unwrap();
    }
    w.into_inner()
}

fn first_error(bytes: &[u8]) -> String {
    let mut r = StreamReader::new(bytes).unwrap();
    loop {
        match r.next_record() {
            Ok(Some(_)) => {}
            Ok(None) => return "no error".into(),
            Err(e) => return e.to_string(),
        }
    }
}

#[test]
fn hostile_mapped_records_are_typed_errors() {
    let good = MappedRam::new(2 << 20, &[(0, PAGES), (1, 70)]);
    let zeros = |n: usize| vec![zero_page_crc(); n];
    // Regions that are not the description's, overlapping, unaligned, cut short.
    let mut wrong_pages = MappedRam::new(2 << 20, &[(0, PAGES + 1), (1, 70)]);
    let mut overlap = good.clone();
    overlap.regions[1].data_offset -= PAGE_SIZE as u64;
    let unaligned = MappedRam::new((2 << 20) + 1, &[(0, PAGES), (1, 70)]);
    for (what, body) in [
        ("pages", wrong_pages.encode()),
        ("overlap", overlap.encode()),
        ("unaligned", unaligned.encode()),
        ("short", good.encode()[..20].to_vec()),
    ] {
        let e = first_error(&records(&body, &[]));
        assert!(e.contains("MAPPED_RAM"), "{what}: {e}");
    }
    wrong_pages.regions.truncate(1);
    assert!(first_error(&records(&wrong_pages.encode(), &[])).contains("MAPPED_RAM"));
    // CRCs out of order, past the end, of the wrong length, or too many.
    for (what, crcs) in [
        ("order", vec![encode_page_crcs(0, 1, &zeros(10))]),
        ("region", vec![encode_page_crcs(1, 0, &zeros(10))]),
        (
            "past",
            vec![encode_page_crcs(0, 0, &zeros(PAGES as usize + 1))],
        ),
        ("many", vec![encode_page_crcs(0, 0, &zeros(65_537))]),
        (
            "length",
            vec![encode_page_crcs(0, 0, &zeros(3))[..20].to_vec()],
        ),
    ] {
        let e = first_error(&records(&good.encode(), &crcs));
        assert!(e.contains("PAGE_CRCS"), "{what}: {e}");
    }
    // END before every page has its CRC.
    let mut bytes = records(
        &good.encode(),
        &[encode_page_crcs(0, 0, &zeros(PAGES as usize))],
    );
    let mut w = RecordWriter::new(Vec::new());
    w.write(record_type::END, 0, &[0; 32]).unwrap();
    bytes.extend(w.into_inner());
    let e = first_error(&bytes);
    assert!(e.contains("END before the CRCs of region 1"), "{e}");
    // RAM_PAGES has no place in a mapped file.
    let mut bytes = records(&good.encode(), &[]);
    let mut w = RecordWriter::new(Vec::new());
    w.write(record_type::RAM_PAGES, 0, &[0; 16]).unwrap();
    bytes.extend(w.into_inner());
    let e = first_error(&bytes);
    assert!(e.contains("RAM_PAGES in a mapped-layout file"), "{e}");
}
