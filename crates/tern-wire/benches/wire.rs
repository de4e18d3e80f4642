//! Throughput of RAM page records (4 KiB pages, CRC32C) against a plain memcpy of the same bytes,
//! measured in the same run; then a long stream decoded through a pipe, for its peak memory.
//!
//! `cargo bench -p tern-wire --bench wire` (env: TERN_BENCH_MIB, default 256; TERN_BENCH_BIG_GIB,
//! default 64, 0 to skip).

use std::hint::black_box;
use std::io::{BufReader, BufWriter};
use std::time::Instant;

use tern_wire::{
    RamRegionDesc, RamRun, Record, RunData, StreamReader, StreamWriter, VmDescription, PAGE_SIZE,
};

const PAGES_PER_RECORD: usize = 256;
const REPS: usize = 5;

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn best<F: FnMut()>(mut f: F) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..REPS {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn desc(size: u64) -> VmDescription {
    VmDescription {
        ram: vec![RamRegionDesc {
            id: 0,
            name: "ram".into(),
            gpa: 0,
            size,
        }],
        ..Default::default()
    }
}

fn encode(src: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut w = StreamWriter::new(&mut *out).unwrap();
    w.description(&desc(src.len() as u64)).unwrap();
    for (i, chunk) in src.chunks(PAGES_PER_RECORD * PAGE_SIZE).enumerate() {
        w.ram_pages(
            0,
            &[RamRun {
                first_page: (i * PAGES_PER_RECORD) as u64,
                data: RunData::Raw(chunk),
            }],
        )
        .unwrap();
    }
    w.finish().unwrap();
}

fn decode(stream: &[u8], dst: Option<&mut [u8]>) -> u64 {
    let mut r = StreamReader::new(stream).unwrap();
    let mut pages = 0;
    let mut dst = dst;
    while let Some(rec) = r.next_record().unwrap() {
        if let Record::Ram(ram) = rec {
            for run in &ram.runs {
                pages += u64::from(run.count);
                if let Some(d) = dst.as_deref_mut() {
                    let at = run.first_page as usize * PAGE_SIZE;
                    let data = ram.data(run);
                    d[at..at + data.len()].copy_from_slice(data);
                }
            }
        }
    }
    pages
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

fn main() {
    let mib: usize = std::env::var("TERN_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let n = mib << 20;
    let src: Vec<u8> = (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8 | 1)
        .collect();
    let mut dst = vec![0u8; n];
    let mut out = Vec::with_capacity(n + n / 64 + 4096);
    encode(&src, &mut out); // warm up, fault everything in

    let t_memcpy = best(|| {
        dst.copy_from_slice(black_box(&src));
        black_box(&dst);
    });
    let t_encode = best(|| encode(black_box(&src), &mut out));
    let t_decode = best(|| {
        black_box(decode(black_box(&out), None));
    });
    let t_decode_apply = best(|| {
        black_box(decode(black_box(&out), Some(&mut dst)));
    });
    assert_eq!(dst, src);
    let t_crc = best(|| {
        black_box(crc32c::crc32c(black_box(&src)));
    });
    println!("RAM page records, {mib} MiB of 4 KiB pages, {PAGES_PER_RECORD} pages per record, best of {REPS}:");
    let m = gbps(n, t_memcpy);
    for (name, t) in [
        ("memcpy (same bytes)", t_memcpy),
        ("crc32c alone", t_crc),
        ("encode (frame + CRC + copy into a buffer)", t_encode),
        ("decode (frame + CRC + checks)", t_decode),
        ("decode + copy into guest memory", t_decode_apply),
    ] {
        println!(
            "  {name:<44} {:>6.2} GB/s  ({:.2}x memcpy)",
            gbps(n, t),
            gbps(n, t) / m
        );
    }
    println!(
        "  stream size {} bytes for {} bytes of pages (overhead {:.3}%)",
        out.len(),
        n,
        (out.len() - n) as f64 * 100.0 / n as f64
    );

    let big: u64 = std::env::var("TERN_BENCH_BIG_GIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    if big == 0 {
        return;
    }
    drop((src, dst, out));
    let before = peak_rss_kib();
    let (reader, writer) = std::io::pipe().unwrap();
    let t = Instant::now();
    let producer = std::thread::spawn(move || {
        let chunk = vec![0xa5u8; 1024 * PAGE_SIZE];
        let region = 1u64 << 30;
        let mut w = StreamWriter::new(BufWriter::with_capacity(1 << 20, writer)).unwrap();
        w.description(&desc(region)).unwrap();
        let records = big * 256; // 4 MiB each
        for i in 0..records {
            let first = (i % 256) * 1024;
            w.ram_pages(
                0,
                &[RamRun {
                    first_page: first,
                    data: RunData::Raw(&chunk),
                }],
            )
            .unwrap();
        }
        w.finish().unwrap().1
    });
    let mut r = StreamReader::new(BufReader::with_capacity(1 << 20, reader)).unwrap();
    let mut pages = 0u64;
    let mut max_buf = 0;
    while let Some(rec) = r.next_record().unwrap() {
        if let Record::Ram(ram) = rec {
            pages += ram.raw_pages();
        }
        max_buf = max_buf.max(r.buffer_capacity());
    }
    let totals = producer.join().unwrap();
    assert_eq!(totals.raw_pages, pages);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "long stream: {big} GiB of pages decoded through a pipe in {secs:.1} s ({:.2} GB/s); \
         decoder buffer peak {} KiB; process peak RSS {} MiB before, {} MiB after",
        gbps((pages as usize) * PAGE_SIZE, secs),
        max_buf >> 10,
        before >> 10,
        peak_rss_kib() >> 10
    );
}
