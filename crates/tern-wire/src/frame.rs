//! The stream header and record framing: type, flags, length, body, padding, CRC.

use std::io::{self, Read, Write};

use crate::error::{ErrorKind, WireError};
use crate::{limits, FORMAT_VERSION, HEADER_LEN, MAGIC, PAGE_SIZE};

/// Bytes of a record header and of its trailer.
pub(crate) const RECORD_HEADER: usize = 8;
pub(crate) const RECORD_TRAILER: usize = 8;
/// Bodies are checksummed and copied in chunks of this size, so that each chunk is read from
/// memory once and checksummed and copied while in cache.
const CHUNK: usize = 48 << 10;

pub(crate) fn pad_len(len: usize) -> usize {
    (8 - len % 8) % 8
}

/// Total bytes a record with an `len`-byte body occupies.
pub fn record_size(len: usize) -> usize {
    RECORD_HEADER + len + pad_len(len) + RECORD_TRAILER
}

/// Header flag: the file has the mapped layout (`docs/stream-format.md`, *Mapped layout*).
pub const FLAG_MAPPED: u32 = 1;
/// Header flag: the guest's memory is handed over, not in the stream (`cpr-transfer`). A reader
/// that does not know it must refuse the stream (it would run a guest without its memory).
pub const FLAG_HANDOVER: u32 = 2;

/// Encodes the stream header.
pub(crate) fn encode_header(flags: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&flags.to_le_bytes());
    h[16..20].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    let crc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Checks a stream header.
pub(crate) fn decode_header(h: &[u8; HEADER_LEN]) -> Result<u32, ErrorKind> {
    if h[0..8] != MAGIC {
        return Err(ErrorKind::BadMagic);
    }
    let stored = u32_at(h, 24);
    let computed = crc32c::crc32c(&h[0..24]);
    let version = u32_at(h, 8);
    if version != FORMAT_VERSION {
        return Err(ErrorKind::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if stored != computed && !cfg!(fuzzing) {
        return Err(ErrorKind::HeaderChecksum { stored, computed });
    }
    let flags = u32_at(h, 12);
    let known = FLAG_MAPPED | FLAG_HANDOVER;
    if flags & 0xffff & !known != 0 {
        return Err(ErrorKind::UnknownFlags(flags & 0xffff & !known));
    }
    let page = u32_at(h, 16);
    if page as usize != PAGE_SIZE {
        return Err(ErrorKind::BadPageSize(page));
    }
    if u32_at(h, 20) != 0 || u32_at(h, 28) != 0 {
        return Err(ErrorKind::NonZeroReserved("header field"));
    }
    Ok(flags)
}

/// Writes framed records, counting bytes.
pub struct RecordWriter<W: Write> {
    w: W,
    offset: u64,
}

impl<W: Write> RecordWriter<W> {
    /// A writer at offset 0 (no stream header written yet).
    pub fn new(w: W) -> Self {
        RecordWriter { w, offset: 0 }
    }

    /// Writes the stream header with `flags` (0, or [`FLAG_MAPPED`]).
    pub fn write_stream_header(&mut self, flags: u32) -> Result<(), WireError> {
        let h = encode_header(flags);
        self.put(&h)
    }

    fn put(&mut self, b: &[u8]) -> Result<(), WireError> {
        self.w
            .write_all(b)
            .map_err(|e| WireError::at(self.offset, e.into()))?;
        self.offset += b.len() as u64;
        Ok(())
    }

    /// Writes one record whose body is the concatenation of `parts`; returns its CRC.
    pub fn write_parts(&mut self, ty: u16, flags: u16, parts: &[&[u8]]) -> Result<u32, WireError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > limits::MAX_RECORD {
            return Err(WireError::at(
                self.offset,
                ErrorKind::TooLarge {
                    what: "record body",
                    len: len as u64,
                    max: limits::MAX_RECORD as u64,
                },
            ));
        }
        let mut head = [0u8; RECORD_HEADER];
        head[0..2].copy_from_slice(&ty.to_le_bytes());
        head[2..4].copy_from_slice(&flags.to_le_bytes());
        head[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        let mut crc = crc32c::crc32c(&head);
        self.put(&head)?;
        // Checksum each chunk just before copying it out, while it is still in cache.
        for p in parts {
            for chunk in p.chunks(CHUNK) {
                crc = crc32c::crc32c_append(crc, chunk);
                self.put(chunk)?;
            }
        }
        let mut tail = [0u8; 7 + RECORD_TRAILER];
        let pad = pad_len(len);
        tail[pad..pad + 4].copy_from_slice(&crc.to_le_bytes());
        self.put(&tail[..pad + RECORD_TRAILER])?;
        Ok(crc)
    }

    /// Writes one record; returns its CRC.
    pub fn write(&mut self, ty: u16, flags: u16, body: &[u8]) -> Result<u32, WireError> {
        self.write_parts(ty, flags, &[body])
    }

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.w
            .flush()
            .map_err(|e| WireError::at(self.offset, e.into()))
    }

    /// The underlying writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// Gives the underlying writer back.
    pub fn into_inner(self) -> W {
        self.w
    }
}

/// A checked record's framing: offset, type, flags, length of the body as held in the buffer,
/// CRC, and whether RAW page data was placed in memory instead of the buffer.
pub(crate) struct Framed {
    pub offset: u64,
    pub ty: u16,
    pub flags: u16,
    pub len: usize,
    pub crc: u32,
    pub placed: bool,
}

/// A placer and the regions' sizes in pages, for [`RecordReader::advance_placing`].
pub(crate) type Placing<'p, 'r> = (&'p mut dyn PagePlacer, &'r [(u32, u64)]);

/// Where a reader puts the pages of RAW runs as it reads them (guest memory, on a migration
/// target), so that they are copied once, from the socket to their place.
pub trait PagePlacer {
    /// Calls `fill` once with the memory of `count` pages of `region` from `first_page`, for
    /// it to fill completely; the run was checked to lie inside the region. What `fill` writes
    /// is checked (the record's CRC) only after it returns: a reader's caller must not use the
    /// pages before the record is accepted.
    fn place(
        &mut self,
        region: u32,
        first_page: u64,
        count: u32,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), ErrorKind>,
    ) -> Result<(), ErrorKind>;
}

/// A record as framed: its offset, type, flags and checked body.
#[derive(Debug)]
pub struct RawRecord<'a> {
    pub offset: u64,
    pub ty: u16,
    pub flags: u16,
    pub body: &'a [u8],
}

/// Reads framed records, checking lengths, padding and CRCs; holds one body at a time.
pub struct RecordReader<R: Read> {
    r: R,
    offset: u64,
    buf: Vec<u8>,
    /// Largest body accepted (at most [`limits::MAX_RECORD`]).
    max_len: usize,
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<R: Read> RecordReader<R> {
    /// A reader at offset 0.
    pub fn new(r: R) -> Self {
        RecordReader {
            r,
            offset: 0,
            buf: Vec::new(),
            max_len: limits::MAX_RECORD,
        }
    }

    /// Refuses bodies longer than `max` (below [`limits::MAX_RECORD`]) from their header, before
    /// reading them: for channels whose records are all small (the return path).
    pub fn with_max_body(mut self, max: usize) -> Self {
        self.max_len = max.min(limits::MAX_RECORD);
        self
    }

    /// Reads and checks the stream header; returns its flags.
    pub fn read_stream_header(&mut self) -> Result<u32, WireError> {
        let mut h = [0u8; HEADER_LEN];
        let got = read_full(&mut self.r, &mut h).map_err(|e| WireError::at(0, e.into()))?;
        if got < HEADER_LEN {
            return Err(WireError::at(
                0,
                ErrorKind::Truncated("in the stream header"),
            ));
        }
        let flags = decode_header(&h).map_err(|k| WireError::at(0, k))?;
        self.offset = HEADER_LEN as u64;
        Ok(flags)
    }

    /// The next record, or `None` at a clean end of input.
    pub fn next_record(&mut self) -> Result<Option<RawRecord<'_>>, WireError> {
        Ok(self.advance()?.map(|f| RawRecord {
            offset: f.offset,
            ty: f.ty,
            flags: f.flags,
            body: &self.buf[..f.len],
        }))
    }

    /// Body of the record [`Self::advance`] read last.
    pub(crate) fn body(&self, len: usize) -> &[u8] {
        &self.buf[..len]
    }

    /// Reads and checks the next record; its body is then [`Self::body`].
    pub(crate) fn advance(&mut self) -> Result<Option<Framed>, WireError> {
        self.advance_placing(None)
    }

    /// As [`Self::advance`]; with a placer and the regions' sizes, the data of a RAM_PAGES
    /// record's RAW runs goes straight to the placer and the buffer holds the rest.
    pub(crate) fn advance_placing(
        &mut self,
        placing: Option<Placing<'_, '_>>,
    ) -> Result<Option<Framed>, WireError> {
        let at = self.offset;
        let mut head = [0u8; RECORD_HEADER];
        let got = read_full(&mut self.r, &mut head).map_err(|e| WireError::at(at, e.into()))?;
        if got == 0 {
            return Ok(None);
        }
        if got < RECORD_HEADER {
            return Err(WireError::at(
                at,
                ErrorKind::Truncated("in a record header"),
            ));
        }
        let ty = u16::from_le_bytes([head[0], head[1]]);
        let flags = u16::from_le_bytes([head[2], head[3]]);
        let len = u32_at(&head, 4) as usize;
        if len > self.max_len {
            return Err(WireError::at(
                at,
                ErrorKind::TooLarge {
                    what: "record body",
                    len: len as u64,
                    max: self.max_len as u64,
                },
            ));
        }
        let pad = pad_len(len);
        let mut computed = crc32c::crc32c(&head);
        let (held, placed) = match placing {
            Some((placer, regions)) if ty == crate::record_type::RAM_PAGES => {
                let held = self
                    .read_ram_placing(len, &mut computed, placer, regions)
                    .map_err(|k| WireError::at(at, k))?;
                (held, true)
            }
            _ => {
                if self.buf.len() < len {
                    self.buf.resize(len, 0);
                }
                let mut done = 0;
                while done < len {
                    let n = CHUNK.min(len - done);
                    let got = read_full(&mut self.r, &mut self.buf[done..done + n])
                        .map_err(|e| WireError::at(at, e.into()))?;
                    if got < n {
                        return Err(WireError::at(at, ErrorKind::Truncated("in a record body")));
                    }
                    computed = crc32c::crc32c_append(computed, &self.buf[done..done + n]);
                    done += n;
                }
                (len, false)
            }
        };
        let mut tail = [0u8; 7 + RECORD_TRAILER];
        let tail = &mut tail[..pad + RECORD_TRAILER];
        let got = read_full(&mut self.r, tail).map_err(|e| WireError::at(at, e.into()))?;
        if got < tail.len() {
            return Err(WireError::at(at, ErrorKind::Truncated("in a record body")));
        }
        let stored = u32_at(tail, pad);
        // (A fuzzing build skips the check, or its parsers would never see a mutated body.)
        if stored != computed && !cfg!(fuzzing) {
            return Err(WireError::at(
                at,
                ErrorKind::RecordChecksum { stored, computed },
            ));
        }
        if tail[..pad].iter().any(|&b| b != 0) {
            return Err(WireError::at(
                at,
                ErrorKind::NonZeroReserved("record padding"),
            ));
        }
        if u32_at(tail, pad + 4) != 0 {
            return Err(WireError::at(
                at,
                ErrorKind::NonZeroReserved("record trailer"),
            ));
        }
        if flags & !crate::FLAG_OPTIONAL != 0 {
            return Err(WireError::at(
                at,
                ErrorKind::NonZeroReserved("record flags"),
            ));
        }
        self.offset += record_size(len) as u64;
        Ok(Some(Framed {
            offset: at,
            ty,
            flags,
            len: held,
            crc: computed,
            placed,
        }))
    }

    /// Reads a RAM_PAGES body of `len` bytes, RAW data to the placer and the rest (the headers,
    /// compressed data) into the buffer, whose length it returns. Every byte is checksummed
    /// into `crc` as it is read; the checks are those of the buffered decoder, done before the
    /// data they guard is read.
    fn read_ram_placing(
        &mut self,
        len: usize,
        crc: &mut u32,
        placer: &mut dyn PagePlacer,
        regions: &[(u32, u64)],
    ) -> Result<usize, ErrorKind> {
        use crate::ram::{self, RUN_HEADER};
        let malformed = |reason: &str| ErrorKind::Malformed {
            record: "RAM_PAGES",
            reason: reason.into(),
        };
        let mut left = len;
        let mut held = 0;
        if len < 8 {
            return Err(malformed("body shorter than its header"));
        }
        self.take_into_buf(8, &mut left, &mut held, crc)?;
        let region = u32_at(&self.buf, 0);
        let runs = u32_at(&self.buf, 4) as usize;
        if runs > limits::MAX_RUNS {
            return Err(ErrorKind::TooLarge {
                what: "RAM run count",
                len: runs as u64,
                max: limits::MAX_RUNS as u64,
            });
        }
        if runs > (len - 8) / RUN_HEADER {
            return Err(malformed("more runs than the body can hold"));
        }
        let pages = regions
            .iter()
            .find(|(id, _)| *id == region)
            .map(|(_, p)| *p)
            .ok_or(ErrorKind::UnknownRegion(region))?;
        let mut compressed = 0;
        for _ in 0..runs {
            self.take_into_buf(RUN_HEADER, &mut left, &mut held, crc)?;
            let h = &self.buf[held - RUN_HEADER..held];
            let (first, count, encoding) = ram::run_header(h).map_err(|(_, k)| k)?;
            if first
                .checked_add(u64::from(count))
                .is_none_or(|end| end > pages)
            {
                return Err(ErrorKind::RunOutOfRange {
                    region,
                    first,
                    count,
                    pages,
                });
            }
            match encoding {
                crate::ENC_RAW => {
                    let n = (count as usize)
                        .checked_mul(PAGE_SIZE)
                        .filter(|&n| n <= left)
                        .ok_or_else(|| malformed("run data past the end of the body"))?;
                    let r = &mut self.r;
                    placer.place(region, first, count, &mut |dst: &mut [u8]| {
                        if dst.len() != n {
                            return Err(malformed("the placer gave memory of another size"));
                        }
                        for chunk in dst.chunks_mut(CHUNK) {
                            if read_full(&mut *r, chunk)? < chunk.len() {
                                return Err(ErrorKind::Truncated("in a record body"));
                            }
                            *crc = crc32c::crc32c_append(*crc, chunk);
                        }
                        Ok(())
                    })?;
                    left -= n;
                }
                crate::ENC_ZERO => {}
                _ => {
                    ram::add_compressed(&mut compressed, count)?;
                    self.take_into_buf(4, &mut left, &mut held, crc)?;
                    let clen = u32_at(&self.buf, held - 4) as usize;
                    self.take_into_buf(clen, &mut left, &mut held, crc)?;
                }
            }
        }
        if left != 0 {
            return Err(malformed("bytes after the last run"));
        }
        Ok(held)
    }

    /// Reads `n` more body bytes (of the `left` still due) into the buffer after `held`.
    fn take_into_buf(
        &mut self,
        n: usize,
        left: &mut usize,
        held: &mut usize,
        crc: &mut u32,
    ) -> Result<(), ErrorKind> {
        if n > *left {
            return Err(ErrorKind::Malformed {
                record: "RAM_PAGES",
                reason: "run data past the end of the body".into(),
            });
        }
        if self.buf.len() < *held + n {
            self.buf.resize(*held + n, 0);
        }
        let dst = &mut self.buf[*held..*held + n];
        if read_full(&mut self.r, dst)? < n {
            return Err(ErrorKind::Truncated("in a record body"));
        }
        *crc = crc32c::crc32c_append(*crc, dst);
        *held += n;
        *left -= n;
        Ok(())
    }

    /// True if no byte follows.
    pub fn at_eof(&mut self) -> Result<bool, WireError> {
        let mut b = [0u8; 1];
        let got =
            read_full(&mut self.r, &mut b).map_err(|e| WireError::at(self.offset, e.into()))?;
        Ok(got == 0)
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Capacity of the body buffer (bounded by the record limit).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_alignment() {
        for len in [0usize, 1, 7, 8, 9, 4096] {
            let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut w = RecordWriter::new(Vec::new());
            w.write(0x42, 0, &body).unwrap();
            let bytes = w.into_inner();
            assert_eq!(bytes.len(), record_size(len));
            assert_eq!(bytes.len() % 8, 0);
            let mut r = RecordReader::new(&bytes[..]);
            let rec = r.next_record().unwrap().unwrap();
            assert_eq!((rec.ty, rec.flags, rec.body), (0x42, 0, &body[..]));
            assert!(r.next_record().unwrap().is_none());
        }
    }

    #[test]
    fn header_checks() {
        let h = encode_header(0);
        assert_eq!(decode_header(&h).unwrap(), 0);
        assert_eq!(
            decode_header(&encode_header(FLAG_MAPPED)).unwrap(),
            FLAG_MAPPED
        );
        assert_eq!(
            decode_header(&encode_header(FLAG_HANDOVER)).unwrap(),
            FLAG_HANDOVER
        );
        assert!(matches!(
            decode_header(&encode_header(4)),
            Err(ErrorKind::UnknownFlags(4))
        ));
        let mut bad = h;
        bad[0] = b'X';
        assert!(matches!(decode_header(&bad), Err(ErrorKind::BadMagic)));
        let mut bad = h;
        bad[8] = 2;
        assert!(matches!(
            decode_header(&bad),
            Err(ErrorKind::UnsupportedVersion { found: 2, .. })
        ));
        let mut bad = h;
        bad[30] = 1;
        assert!(decode_header(&bad).is_err());
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut rec = [0u8; 8];
        rec[0] = 2;
        rec[4..8].copy_from_slice(&(limits::MAX_RECORD as u32 + 1).to_le_bytes());
        let mut r = RecordReader::new(&rec[..]);
        let e = r.next_record().unwrap_err();
        assert!(matches!(e.kind, ErrorKind::TooLarge { .. }));
        assert_eq!(r.buffer_capacity(), 0);
    }
}
