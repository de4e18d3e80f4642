//! Compression of RAM runs (`multifd-compression`): LZ4 blocks (`lz4_flex`) and zstd frames
//! (`zstd`), one per run, so that each run decompresses on its own, straight into its pages.

use crate::error::ErrorKind;
use crate::ram::{encoding_name, RamRun, RunData, ENC_LZ4, ENC_ZSTD};

fn malformed(reason: String) -> ErrorKind {
    ErrorKind::Malformed {
        record: "RAM_PAGES",
        reason,
    }
}

/// How runs are compressed (QEMU's `multifd-compression` values that tern has).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    None,
    Lz4,
    /// zstd at this level (1..=20, QEMU's `multifd-zstd-level`).
    Zstd(i32),
}

/// Compresses runs for one sending thread (it keeps a zstd context and the output buffer).
pub struct Compressor {
    kind: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    out: Vec<u8>,
}

impl Compressor {
    pub fn new(kind: Compression) -> Result<Self, ErrorKind> {
        let zstd = match kind {
            Compression::Zstd(level) => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| malformed(format!("zstd level {level}: {e}")))?,
            ),
            _ => None,
        };
        Ok(Compressor {
            kind,
            zstd,
            out: Vec::new(),
        })
    }

    /// True unless the compression is `none`.
    pub fn is_on(&self) -> bool {
        self.kind != Compression::None
    }

    /// Compresses `pages` onto the end of the output buffer: the encoding and the compressed
    /// length, or `None` (nothing kept) if that would not save an eighth of the bytes — then
    /// the run goes raw: the target's copy is cheaper than a decompression that gains nothing.
    fn append(&mut self, pages: &[u8]) -> Option<(u8, usize)> {
        let start = self.out.len();
        let bound = match self.kind {
            Compression::None => return None,
            Compression::Lz4 => lz4_flex::block::get_maximum_output_size(pages.len()),
            Compression::Zstd(_) => zstd::zstd_safe::compress_bound(pages.len()),
        };
        self.out.resize(start + bound, 0);
        let dst = &mut self.out[start..];
        let got = match (self.kind, self.zstd.as_mut()) {
            (Compression::Zstd(_), Some(z)) => {
                z.compress_to_buffer(pages, dst).ok().map(|n| (ENC_ZSTD, n))
            }
            (Compression::Lz4, _) => lz4_flex::block::compress_into(pages, dst)
                .ok()
                .map(|n| (ENC_LZ4, n)),
            _ => None,
        };
        match got {
            Some((enc, n)) if n < pages.len() - pages.len() / 8 => {
                self.out.truncate(start + n);
                Some((enc, n))
            }
            _ => {
                self.out.truncate(start);
                None
            }
        }
    }

    /// One run's pages compressed, with their encoding; `None` if it does not pay.
    pub fn compress(&mut self, pages: &[u8]) -> Option<(u8, &[u8])> {
        self.out.clear();
        let (enc, n) = self.append(pages)?;
        Some((enc, &self.out[..n]))
    }

    /// Replaces the data of the RAW runs that compress well with their compressed form.
    pub fn compress_runs<'a>(&'a mut self, runs: &mut [RamRun<'a>]) {
        if !self.is_on() {
            return;
        }
        self.out.clear();
        let mut packed = Vec::new();
        for (i, run) in runs.iter().enumerate() {
            if let RunData::Raw(d) = run.data {
                let start = self.out.len();
                if let Some((enc, n)) = self.append(d) {
                    packed.push((i, enc, start..start + n));
                }
            }
        }
        let this: &'a Self = self;
        for (i, encoding, range) in packed {
            let pages = runs[i].pages() as u32;
            runs[i].data = RunData::Compressed {
                encoding,
                pages,
                data: &this.out[range],
            };
        }
    }
}

thread_local! {
    /// A zstd context per thread, reused across runs (creating one costs more than a run).
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses a compressed run's data into `dst`, which it must fill exactly.
pub fn decompress_run(encoding: u8, src: &[u8], dst: &mut [u8]) -> Result<(), ErrorKind> {
    let name = encoding_name(encoding);
    let bad = |reason: String| malformed(format!("{name} run: {reason}"));
    let n = match encoding {
        ENC_LZ4 => lz4_flex::block::decompress_into(src, dst).map_err(|e| bad(e.to_string()))?,
        ENC_ZSTD => ZSTD.with(|z| {
            let mut z = z.borrow_mut();
            if z.is_none() {
                *z = Some(zstd::bulk::Decompressor::new().map_err(|e| bad(e.to_string()))?);
            }
            let d = z.as_mut().expect("set above");
            d.decompress_to_buffer(src, dst)
                .map_err(|e| bad(e.to_string()))
        })?,
        other => return Err(ErrorKind::UnsupportedEncoding(other)),
    };
    if n != dst.len() {
        return Err(bad(format!(
            "{n} bytes decompressed where the run holds {}",
            dst.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_round_trip_and_incompressible_ones_stay_raw() {
        let text: Vec<u8> = (0..8 * 4096).map(|i| b"tern migrates "[i % 14]).collect();
        let noise: Vec<u8> = (0..4096u32)
            .flat_map(|i| (i.wrapping_mul(2_654_435_761) ^ (i >> 3)).to_le_bytes())
            .collect();
        for kind in [
            Compression::Lz4,
            Compression::Zstd(1),
            Compression::Zstd(19),
        ] {
            let mut c = Compressor::new(kind).unwrap();
            let (enc, data) = c.compress(&text).unwrap();
            assert!(data.len() < text.len() / 8, "{kind:?}: {}", data.len());
            let mut back = vec![0u8; text.len()];
            decompress_run(enc, data, &mut back).unwrap();
            assert_eq!(back, text);
            // The wrong size, or garbage, is an error and never a panic.
            let data = data.to_vec();
            assert!(decompress_run(enc, &data, &mut back[..4096]).is_err());
            assert!(decompress_run(enc, &data, &mut vec![0u8; 16 * 4096]).is_err());
            assert!(decompress_run(enc, &noise[..100], &mut back).is_err());
            assert!(c.compress(&noise).is_none(), "{kind:?}: noise compressed");
        }
        assert!(Compressor::new(Compression::None)
            .unwrap()
            .compress(&text)
            .is_none());
    }
}
