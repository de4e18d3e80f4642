//! virtio-blk on a raw file: read, write, flush, get-id and discard, served synchronously by the
//! event thread (see the module above for what happens to queued requests at a pause).

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use tern_wire::{
    FieldSpec, FieldType, Schema, Section, SectionBuilder, SectionReader, StateError, Value,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::BitmapSlice;

use super::{VirtioDevice, F_VERSION_1};
use crate::disk::{Disk, SECTOR};
use crate::memory::GuestMemory;

pub const DEVICE_ID: u32 = 2;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const QUEUE_SIZE: u16 = 128;
/// Bytes moved between the file and guest memory per step.
const CHUNK: usize = 1 << 20;
/// Requests served per batch (per hold of the transport's lock).
const MAX_BATCH: usize = 4;
/// Largest segment (`size_max`) and request: with `seg_max` segments of this, a driver never
/// makes a larger one; a request past it is an error. Bounds the time one batch holds the lock.
const SIZE_MAX: u32 = 256 << 10;
const REQUEST_MAX: usize = (QUEUE_SIZE as usize - 2) * SIZE_MAX as usize;
/// Most sectors one discard segment covers (1 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Most discard segments in one request.
const MAX_DISCARD_SEG: u32 = 32;

static BLOCK: Schema = Schema {
    name: "virtio-blk",
    version: 1,
    min_version: 1,
    fields: &[
        FieldSpec {
            name: "capacity",
            ty: FieldType::U64,
            since: 1,
        },
        FieldSpec {
            name: "readonly",
            ty: FieldType::Bool,
            since: 1,
        },
        FieldSpec {
            name: "blk_size",
            ty: FieldType::U32,
            since: 1,
        },
    ],
    subsections: &[],
};

/// A virtio-blk device.
pub struct Block {
    disk: Arc<Disk>,
    id: String,
    acked: u64,
    /// [`CHUNK`] bytes aligned for O_DIRECT.
    bounce: crate::disk::AlignedBuf,
}

impl Block {
    pub fn new(disk: Arc<Disk>, index: usize) -> Self {
        let id = disk
            .config()
            .serial
            .clone()
            .unwrap_or_else(|| format!("tern{index}"));
        Block {
            disk,
            id,
            acked: 0,
            bounce: crate::disk::AlignedBuf::new(CHUNK),
        }
    }

    fn buf(&mut self, len: usize) -> &mut [u8] {
        &mut self.bounce.get()[..len]
    }

    /// Serves one request; returns its status and the bytes written into guest memory.
    fn request(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<u32, String> {
        let mut reader = chain
            .clone()
            .reader(mem)
            .map_err(|e| format!("request: {e}"))?;
        let mut writer = chain.writer(mem).map_err(|e| format!("request: {e}"))?;
        let writable = writer.available_bytes();
        if writable == 0 {
            return Err("a request without a status byte".into());
        }
        let mut status_w = writer
            .split_at(writable - 1)
            .map_err(|e| format!("request: {e}"))?;
        let mut hdr = [0u8; 16];
        reader
            .read_exact(&mut hdr)
            .map_err(|_| "a request shorter than its header".to_string())?;
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        let latency = self.disk.config().latency_ms;
        if latency > 0 {
            std::thread::sleep(Duration::from_millis(latency));
        }
        let data_len = match ty {
            T_IN => writer.available_bytes(),
            _ => reader.available_bytes(),
        };
        if data_len > REQUEST_MAX {
            status_w
                .write_all(&[S_IOERR])
                .map_err(|e| format!("status byte: {e}"))?;
            return Ok(1);
        }
        let (status, written) = match ty {
            T_IN => {
                let len = writer.available_bytes();
                match self.span(sector, len) {
                    Some(off) => self.read(off, len, &mut writer),
                    None => (S_IOERR, 0),
                }
            }
            T_OUT => {
                let len = reader.available_bytes();
                match self.span(sector, len) {
                    Some(_) if self.disk.config().readonly => (S_IOERR, 0),
                    Some(off) => (self.write(off, len, &mut reader), 0),
                    None => (S_IOERR, 0),
                }
            }
            T_FLUSH => match self.disk.flush() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    tracing::warn!("disk {}: flush: {e}", self.disk.config().path.display());
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let mut id = [0u8; 20];
                id[..self.id.len()].copy_from_slice(self.id.as_bytes());
                let n = writer.available_bytes().min(20);
                match writer.write_all(&id[..n]) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            T_DISCARD if self.acked & F_DISCARD != 0 => (self.discard(&mut reader), 0),
            _ => (S_UNSUPP, 0),
        };
        status_w
            .write_all(&[status])
            .map_err(|e| format!("status byte: {e}"))?;
        Ok(written + 1)
    }

    /// The logical block size the guest is told: with O_DIRECT the host file system may need
    /// 4 KiB-aligned I/O, and the guest then issues nothing smaller.
    fn blk_size(&self) -> u32 {
        if self.disk.config().direct {
            4096
        } else {
            512
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they lie within the disk.
    fn span(&self, sector: u64, len: usize) -> Option<u64> {
        let off = sector.checked_mul(SECTOR)?;
        let end = off.checked_add(len as u64)?;
        ((len as u64).is_multiple_of(SECTOR) && end <= self.disk.size()).then_some(off)
    }

    fn read<B: BitmapSlice>(
        &mut self,
        mut off: u64,
        len: usize,
        w: &mut virtio_queue::Writer<'_, B>,
    ) -> (u8, u32) {
        let disk = self.disk.clone();
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            let buf = self.buf(n);
            if let Err(e) = disk.read_at(buf, off) {
                tracing::warn!("disk {}: read at {off}: {e}", disk.config().path.display());
                return (S_IOERR, (len - left) as u32);
            }
            if w.write_all(buf).is_err() {
                return (S_IOERR, (len - left) as u32);
            }
            off += n as u64;
            left -= n;
        }
        (S_OK, len as u32)
    }

    fn write<B: BitmapSlice>(
        &mut self,
        mut off: u64,
        len: usize,
        r: &mut virtio_queue::Reader<'_, B>,
    ) -> u8 {
        let disk = self.disk.clone();
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            let buf = self.buf(n);
            if r.read_exact(buf).is_err() {
                return S_IOERR;
            }
            if let Err(e) = disk.write_at(buf, off) {
                tracing::warn!("disk {}: write at {off}: {e}", disk.config().path.display());
                return S_IOERR;
            }
            off += n as u64;
            left -= n;
        }
        S_OK
    }

    fn discard<B: BitmapSlice>(&mut self, r: &mut virtio_queue::Reader<'_, B>) -> u8 {
        if self.disk.config().readonly {
            return S_IOERR;
        }
        let segs = r.available_bytes() / 16;
        if segs == 0 || segs > MAX_DISCARD_SEG as usize || !r.available_bytes().is_multiple_of(16) {
            return S_IOERR;
        }
        for _ in 0..segs {
            let mut s = [0u8; 16];
            if r.read_exact(&mut s).is_err() {
                return S_IOERR;
            }
            let sector = u64::from_le_bytes(s[0..8].try_into().unwrap_or_default());
            let count = u32::from_le_bytes(s[8..12].try_into().unwrap_or_default());
            if count > MAX_DISCARD_SECTORS {
                return S_IOERR;
            }
            let len = u64::from(count) * SECTOR;
            let Some(off) = self.span(sector, len as usize) else {
                return S_IOERR;
            };
            match self.disk.discard(off, len) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return S_UNSUPP,
                Err(_) => return S_IOERR,
            }
        }
        S_OK
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        let ro = if self.disk.config().readonly { F_RO } else { 0 };
        F_VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_DISCARD | ro
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[QUEUE_SIZE]
    }

    /// `struct virtio_blk_config` up to the discard fields.
    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; 48];
        c[0..8].copy_from_slice(&(self.disk.size() / SECTOR).to_le_bytes());
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
                                                                             // blk_size: with O_DIRECT the host file system may need 4 KiB-aligned I/O; say so, and
                                                                             // the guest issues nothing smaller.
        let blk: u32 = if self.disk.config().direct { 4096 } else { 512 };
        c[20..24].copy_from_slice(&blk.to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
        c
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<usize, String> {
        // A few requests at a time: the caller holds the transport's lock meanwhile and takes
        // it again for the next batch, so that a vCPU reading a register, or the pause, never
        // waits long behind a guest that keeps its queue full.
        // `iter` (not `pop_descriptor_chain`, which logs every bad index it meets): a broken
        // available ring is one error, and the device then needs a reset.
        let chains: Vec<_> = queue
            .iter(mem)
            .map_err(|e| format!("avail ring: {e:?}"))?
            .take(MAX_BATCH)
            .collect();
        let n = chains.len();
        for chain in chains {
            let head = chain.head_index();
            let len = self.request(chain, mem)?;
            queue
                .add_used(mem, head, len)
                .map_err(|e| format!("used ring: {e:?}"))?;
        }
        Ok(n)
    }

    fn flush(&mut self) {
        if let Err(e) = self.disk.flush() {
            tracing::warn!("disk {}: flush: {e}", self.disk.config().path.display());
        }
    }

    fn schema(&self) -> &'static Schema {
        &BLOCK
    }

    fn save(&self, instance: u32) -> Result<Section, StateError> {
        SectionBuilder::new(&BLOCK, instance)
            .field("capacity", Value::U64(self.disk.size()))?
            .field("readonly", Value::Bool(self.disk.config().readonly))?
            .field("blk_size", Value::U32(self.blk_size()))?
            .build()
    }

    fn load(&mut self, section: &Section) -> Result<(), StateError> {
        let s = SectionReader::new(&BLOCK, section)?;
        let device = format!("virtio-blk/{}", section.instance);
        let size = s.u64("capacity")?;
        if size != self.disk.size() {
            return Err(StateError::NotMigratable {
                device,
                reason: format!(
                    "the source's disk is {size} bytes, this VM's ({}) {}",
                    self.disk.config().path.display(),
                    self.disk.size()
                ),
            });
        }
        let ro = matches!(s.value("readonly")?, Value::Bool(true));
        if ro != self.disk.config().readonly {
            return Err(StateError::NotMigratable {
                device,
                reason: format!(
                    "readonly={} on the source, {} here",
                    if ro { "on" } else { "off" },
                    if ro { "off" } else { "on" }
                ),
            });
        }
        let blk = s.u32("blk_size")?;
        if blk != self.blk_size() {
            return Err(StateError::NotMigratable {
                device: format!("virtio-blk/{}", section.instance),
                reason: format!(
                    "the guest uses {blk}-byte blocks, this VM's disk {} (direct= differs)",
                    self.blk_size()
                ),
            });
        }
        Ok(())
    }
}
