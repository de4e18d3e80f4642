//! Reading RAM records in place: RAW pages go straight to their memory, compressed runs are
//! decompressed there, and the result is exactly what the buffered reader gives; a corrupted
//! byte in placed data still fails the record.

use tern_wire::{
    decompress_run, Compression, Compressor, ErrorKind, PagePlacer, RamRegionDesc, RamRun, Record,
    RunData, StreamReader, StreamWriter, VmDescription, ENC_RAW, ENC_ZERO, PAGE_SIZE,
};

const PAGES: usize = 64;

fn desc() -> VmDescription {
    VmDescription {
        machine: serde_json::json!({"memory": PAGES * PAGE_SIZE, "vcpus": 1}),
        ram: vec![RamRegionDesc {
            id: 0,
            name: "low".into(),
            gpa: 0,
            size: (PAGES * PAGE_SIZE) as u64,
        }],
        sections: vec![],
    }
}

/// A stream with every encoding; each page's content names it (or is noise).
fn stream() -> (Vec<u8>, Vec<u8>) {
    let mut want = vec![0u8; PAGES * PAGE_SIZE];
    for p in 0..PAGES {
        let page = &mut want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        if p % 3 == 0 {
            for (i, b) in page.iter_mut().enumerate() {
                *b = ((i * 7 + p * 13) ^ (i >> 5)) as u8;
            }
        } else {
            page.fill(p as u8);
        }
    }
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.description(&desc()).unwrap();
    let mut lz4 = Compressor::new(Compression::Lz4).unwrap();
    let mut zstd = Compressor::new(Compression::Zstd(3)).unwrap();
    let l4 = lz4.compress(&want[8 * PAGE_SIZE..16 * PAGE_SIZE]).unwrap();
    let (zenc, zdata) = zstd
        .compress(&want[20 * PAGE_SIZE..40 * PAGE_SIZE])
        .unwrap();
    w.ram_pages(
        0,
        &[
            RamRun {
                first_page: 0,
                data: RunData::Raw(&want[..8 * PAGE_SIZE]),
            },
            RamRun {
                first_page: 8,
                data: RunData::Compressed {
                    encoding: l4.0,
                    pages: 8,
                    data: l4.1,
                },
            },
            RamRun {
                first_page: 16,
                data: RunData::Zero(4),
            },
            RamRun {
                first_page: 20,
                data: RunData::Compressed {
                    encoding: zenc,
                    pages: 20,
                    data: zdata,
                },
            },
            RamRun {
                first_page: 40,
                data: RunData::Raw(&want[40 * PAGE_SIZE..]),
            },
        ],
    )
    .unwrap();
    want[16 * PAGE_SIZE..20 * PAGE_SIZE].fill(0);
    (w.finish().unwrap().0, want)
}

struct Mem(Vec<u8>, u32);

impl PagePlacer for Mem {
    fn place(
        &mut self,
        region: u32,
        first_page: u64,
        count: u32,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), ErrorKind>,
    ) -> Result<(), ErrorKind> {
        assert_eq!(region, 0);
        self.1 += count;
        let at = first_page as usize * PAGE_SIZE;
        fill(&mut self.0[at..at + count as usize * PAGE_SIZE])
    }
}

/// Loads every record into `mem`, placing or not.
fn load(bytes: &[u8], place: bool) -> Result<Mem, tern_wire::WireError> {
    let mut mem = Mem(vec![0xee; PAGES * PAGE_SIZE], 0);
    let mut r = StreamReader::new(bytes)?;
    loop {
        let rec = if place {
            let mut placer = Mem(std::mem::take(&mut mem.0), 0);
            let rec = r.next_record_placing(&mut placer);
            mem.0 = placer.0;
            mem.1 += placer.1;
            rec?
        } else {
            r.next_record()?
        };
        match rec {
            Some(Record::Ram(ram)) => {
                assert_eq!(ram.placed, place);
                for run in &ram.runs {
                    let at = run.first_page as usize * PAGE_SIZE;
                    let dst = &mut mem.0[at..at + run.count as usize * PAGE_SIZE];
                    match run.encoding {
                        ENC_RAW if ram.placed => assert!(ram.data(run).is_empty()),
                        ENC_RAW => dst.copy_from_slice(ram.data(run)),
                        ENC_ZERO => dst.fill(0),
                        enc => decompress_run(enc, ram.data(run), dst).unwrap(),
                    }
                }
            }
            Some(Record::End(t)) => {
                assert_eq!(t.raw_pages, PAGES as u64 - 4);
                assert_eq!(t.zero_pages, 4);
            }
            Some(_) => {}
            None => return Ok(mem),
        }
    }
}

#[test]
fn placed_and_buffered_reads_agree_for_every_encoding() {
    let (bytes, want) = stream();
    let buffered = load(&bytes, false).unwrap();
    let placed = load(&bytes, true).unwrap();
    assert!(buffered.0 == want, "the buffered read differs");
    assert!(placed.0 == want, "the placed read differs");
    assert_eq!(placed.1, 8 + 24, "only RAW runs are placed");
}

#[test]
fn a_corrupted_placed_page_fails_the_record() {
    let (bytes, _) = stream();
    // The description record comes first; the first RAW page lies well inside the RAM record.
    let at = bytes.len() - 40 * 1024;
    let mut bad = bytes.clone();
    bad[at] ^= 1;
    let e = load(&bad, true)
        .err()
        .expect("a corrupted page is an error");
    assert!(matches!(e.kind, ErrorKind::RecordChecksum { .. }), "{e}");
    // Truncated in the middle of placed data: an error, not a hang or a panic.
    let e = load(&bytes[..bytes.len() - 30 * 1024], true)
        .err()
        .expect("truncated");
    assert!(matches!(e.kind, ErrorKind::Truncated(_)), "{e}");
}

#[test]
fn a_compressed_run_that_does_not_decompress_fails_verification() {
    // The writer checksums what it is given: only decompressing can tell that this is garbage.
    let garbage = [0xffu8; 64];
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.description(&desc()).unwrap();
    w.ram_pages(
        0,
        &[RamRun {
            first_page: 0,
            data: RunData::Compressed {
                encoding: tern_wire::ENC_ZSTD,
                pages: 2,
                data: &garbage,
            },
        }],
    )
    .unwrap();
    let bytes = w.finish().unwrap().0;
    let e = tern_wire::inspect::analyze(&bytes[..]).expect_err("garbage verified");
    assert!(
        matches!(e.error.kind, ErrorKind::Malformed { .. }),
        "{}",
        e.error
    );
    assert!(e.error.to_string().contains("zstd run"), "{}", e.error);
}
