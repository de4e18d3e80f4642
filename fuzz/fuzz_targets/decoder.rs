//! Any input: the stream decoder (the mapped layout's records included), the return path's
//! message decoder and MAPPED_RAM's decoder return a value or a typed error and never panic; the
//! stream decoder never holds more than one record's worth of buffer — read buffered (then every
//! compressed run is decompressed, as `tern verify` does) and read in place into a small memory
//! (as a target does).
//! Built with cfg(fuzzing), the decoder skips its CRC checks so that mutations reach the parsers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_wire::{limits, ErrorKind, PagePlacer, Record, StreamReader, PAGE_SIZE};

/// Guest memory of the regions the stream describes, capped: placing past the cap is refused.
struct Mem(Vec<u8>);

impl PagePlacer for Mem {
    fn place(
        &mut self,
        _region: u32,
        first_page: u64,
        count: u32,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), ErrorKind>,
    ) -> Result<(), ErrorKind> {
        let at = first_page as usize * PAGE_SIZE;
        let len = count as usize * PAGE_SIZE;
        match self.0.get_mut(at..at.saturating_add(len)) {
            Some(dst) => fill(dst),
            None => Err(ErrorKind::Placement("past the fuzzer's memory".into())),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut scratch = Vec::new();
    if let Ok(mut r) = StreamReader::new(data) {
        while let Ok(Some(rec)) = r.next_record() {
            if let Record::Ram(ram) = &rec {
                for run in ram.runs.iter().filter(|r| r.encoding > tern_wire::ENC_ZERO) {
                    scratch.resize(run.count as usize * PAGE_SIZE, 0);
                    let _ = tern_wire::decompress_run(run.encoding, ram.data(run), &mut scratch);
                }
            }
            assert!(r.buffer_capacity() <= limits::MAX_RECORD + 16);
        }
    }
    // The return path's messages (postcopy recovery's RECEIVED among them) and the mapped
    // layout's MAPPED_RAM, against a two-region description.
    let _ = tern_wire::ReturnMessage::decode(data);
    let _ = tern_wire::mapped::MappedRam::decode(data, &[(0, 64), (1, 1 << 40)]);
    let mut mem = Mem(vec![0; 64 * PAGE_SIZE]);
    if let Ok(mut r) = StreamReader::new(data) {
        while let Ok(Some(_)) = r.next_record_placing(&mut mem) {
            assert!(r.buffer_capacity() <= limits::MAX_RECORD + 16);
        }
    }
});
