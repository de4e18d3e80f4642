//! Any input: the stream decoder returns records or a typed error, never panics, and never holds
//! more than one record's worth of buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_wire::{limits, StreamReader};

fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = StreamReader::new(data) {
        while let Ok(Some(_)) = r.next_record() {
            assert!(r.buffer_capacity() <= limits::MAX_RECORD + 16);
        }
    }
});
