//! Storage migration: each disk that is neither shared nor read-only is one more iterative
//! participant, `blk<i>`, sent in the same rounds as RAM with its own dirty bitmap (one bit per
//! 4 KiB block, set by the device after each write). Its records are PARTICIPANT_DATA; the
//! encoding is in docs/stream-format.md, *Block participant*.
//!
//! Why nothing is lost: the device writes the file, then sets the block's bit; a round takes the
//! bits (clearing them), then reads the blocks. A write whose bit was taken before it completed
//! had already reached the file, so the read sees it; a later write sets the bit again and goes
//! in a later round. The last round runs with the VM paused after the devices drained every
//! request, so nothing is written after it.

use std::sync::Arc;

use tern_migrate::participant::DiskCounters;
use tern_migrate::{LoadParticipant, MigrateError, Progress, Result, SaveParticipant};
use tern_wire::{Record, VmDescription};

use crate::disk::{Disk, DISK_BLOCK};

/// Encoding version of the records.
const VERSION: u8 = 1;
const KIND_DATA: u8 = 0;
const KIND_ZERO: u8 = 1;
const HEADER: usize = 16;
/// Blocks per record at most (256 KiB of data).
const MAX_RUN: u64 = 64;

/// The participant's name for disk `index`.
pub fn participant_name(index: usize) -> &'static str {
    const NAMES: [&str; crate::devices::virtio::MAX_DEVICES] = [
        "blk0", "blk1", "blk2", "blk3", "blk4", "blk5", "blk6", "blk7",
    ];
    NAMES[index.min(NAMES.len() - 1)]
}

/// Whether disk `d` is copied by a migration.
pub fn is_copied(d: &Disk) -> bool {
    !d.config().shared && !d.config().readonly
}

/// The source side of one disk.
pub struct BlockSaver {
    disk: Arc<Disk>,
    name: &'static str,
    /// Blocks still to send in this migration.
    to_send: Vec<u64>,
    pending: u64,
    cursor: u64,
    sent_bytes: u64,
    zero_blocks: u64,
    data_blocks: u64,
    syncs: u64,
    buf: Vec<u8>,
}

impl BlockSaver {
    pub fn new(disk: Arc<Disk>, index: usize) -> Self {
        let words = disk.dirty.blocks().div_ceil(64) as usize;
        BlockSaver {
            disk,
            name: participant_name(index),
            to_send: vec![0; words],
            pending: 0,
            cursor: 0,
            sent_bytes: 0,
            zero_blocks: 0,
            data_blocks: 0,
            syncs: 0,
            buf: vec![0; HEADER + (MAX_RUN * DISK_BLOCK) as usize],
        }
    }

    fn blocks(&self) -> u64 {
        self.disk.dirty.blocks()
    }

    fn is_set(&self, b: u64) -> bool {
        self.to_send[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    fn count(&self) -> u64 {
        self.to_send.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Sends the next run of blocks to send at or after the cursor; false at the end.
    fn send_next(&mut self, out: &mut tern_migrate::participant::Out<'_>) -> Result<bool> {
        let n = self.blocks();
        let mut b = self.cursor;
        while b < n && !self.is_set(b) {
            if self.to_send[(b / 64) as usize] == 0 {
                b = (b / 64 + 1) * 64;
            } else {
                b += 1;
            }
        }
        if b >= n {
            self.cursor = n;
            return Ok(false);
        }
        let first = b;
        while b < n && b - first < MAX_RUN && self.is_set(b) {
            self.to_send[(b / 64) as usize] &= !(1 << (b % 64));
            b += 1;
        }
        self.cursor = b;
        let count = b - first;
        self.pending = self.pending.saturating_sub(count);
        let off = first * DISK_BLOCK;
        let len = (count * DISK_BLOCK).min(self.disk.size() - off) as usize;
        // A hole is sent as zeros without reading it (the bit was cleared first: a write that
        // lands in it now is sent again, as for a read).
        let zero = self.disk.is_hole(off, len as u64) || {
            let data = &mut self.buf[HEADER..HEADER + len];
            self.disk.read_at(data, off).map_err(|e| MigrateError::Io {
                what: format!("reading disk {}", self.disk.config().path.display()),
                source: e,
            })?;
            data.iter().all(|&x| x == 0)
        };
        let h = &mut self.buf[..HEADER];
        h[0] = VERSION;
        h[1] = if zero { KIND_ZERO } else { KIND_DATA };
        h[2..4].fill(0);
        h[4..8].copy_from_slice(&(count as u32).to_le_bytes());
        h[8..16].copy_from_slice(&first.to_le_bytes());
        let body = if zero { HEADER } else { HEADER + len };
        out.participant_data(self.name, &self.buf[..body])?;
        self.sent_bytes += body as u64;
        if zero {
            self.zero_blocks += count;
        } else {
            self.data_blocks += count;
        }
        Ok(true)
    }

    fn send_all(&mut self, out: &mut tern_migrate::participant::Out<'_>) -> Result<()> {
        self.cursor = 0;
        while self.send_next(out)? {}
        Ok(())
    }

    /// For `query-migrate`.
    pub fn counters(&self) -> DiskCounters {
        DiskCounters {
            transferred: self.sent_bytes,
            remaining: self.pending * DISK_BLOCK,
            total: self.disk.size(),
            dirty_syncs: self.syncs,
        }
    }
}

impl SaveParticipant for BlockSaver {
    fn name(&self) -> &'static str {
        self.name
    }

    fn save_setup(&mut self, _out: &mut tern_migrate::participant::Out<'_>) -> Result<()> {
        // Tracking first, then everything marked: a write from here on is sent again.
        self.disk.dirty.track(true);
        let n = self.blocks();
        for (i, w) in self.to_send.iter_mut().enumerate() {
            let lo = i as u64 * 64;
            *w = if n - lo >= 64 {
                u64::MAX
            } else {
                (1u64 << (n - lo)) - 1
            };
        }
        self.pending = n;
        self.cursor = 0;
        Ok(())
    }

    fn sync(&mut self) -> Result<u64> {
        let before = self.count();
        self.disk.dirty.take_into(&mut self.to_send);
        self.disk.start_writeback();
        self.pending = self.count();
        self.cursor = 0;
        self.syncs += 1;
        Ok(self.pending.saturating_sub(before) * DISK_BLOCK)
    }

    fn pending(&self) -> u64 {
        self.pending * DISK_BLOCK
    }

    fn iterate(&mut self, out: &mut tern_migrate::participant::Out<'_>) -> Result<bool> {
        self.send_next(out)
    }

    fn complete_precopy(&mut self, out: &mut tern_migrate::participant::Out<'_>) -> Result<()> {
        self.send_all(out)
    }

    /// Progress in RAM's statistics: none (the disk has its own, [`Self::counters`]).
    fn progress(&self) -> Progress {
        Progress::default()
    }

    fn cleanup(&mut self) {
        self.disk.dirty.track(false);
    }

    /// Postcopy moves RAM only: the disk's remaining blocks go now, while the VM is paused,
    /// and then nothing is tracked any more.
    fn postcopy_discard(&mut self, out: &mut tern_migrate::participant::Out<'_>) -> Result<()> {
        self.send_all(out)?;
        self.disk.dirty.track(false);
        Ok(())
    }

    fn disk_counters(&self) -> Option<DiskCounters> {
        Some(self.counters())
    }
}

/// The target side of one disk: writes what arrives into its own file.
pub struct BlockLoader {
    disk: Arc<Disk>,
    name: &'static str,
    index: usize,
    blocks: u64,
    /// Bytes written since writeback was last started.
    unflushed: u64,
    /// The source copies this disk (its description says so): every block must arrive.
    expected: bool,
    /// Blocks received at least once.
    received: Vec<u64>,
}

/// The loader starts writeback after this many bytes, so that the flush before LOADED is short.
const WRITEBACK_EVERY: u64 = 16 << 20;

impl BlockLoader {
    pub fn new(disk: Arc<Disk>, index: usize) -> Self {
        BlockLoader {
            blocks: disk.dirty.blocks(),
            received: vec![0; disk.dirty.blocks().div_ceil(64) as usize],
            disk,
            name: participant_name(index),
            index,
            unflushed: 0,
            expected: false,
        }
    }

    fn bad(&self, why: String) -> MigrateError {
        MigrateError::Vm(format!("{} data: {why}", self.name))
    }
}

impl LoadParticipant for BlockLoader {
    fn name(&self) -> &'static str {
        self.name
    }

    fn load_setup(&mut self, desc: &VmDescription) -> Result<()> {
        self.expected = desc.machine["disks"][self.index]["copied"] == serde_json::json!(true);
        Ok(())
    }

    fn load(&mut self, record: &Record<'_>) -> Result<bool> {
        let Record::Participant { name, data } = record else {
            return Ok(false);
        };
        if *name != self.name {
            return Ok(false);
        }
        let Some(h) = data.get(..HEADER) else {
            return Err(self.bad(format!("{} bytes, shorter than its header", data.len())));
        };
        if !self.expected {
            return Err(self.bad("the source said it would not copy this disk".into()));
        }
        if h[0] != VERSION || h[2..4] != [0, 0] {
            return Err(self.bad(format!(
                "encoding version {}, this build reads {VERSION}",
                h[0]
            )));
        }
        let count = u64::from(u32::from_le_bytes([h[4], h[5], h[6], h[7]]));
        let first = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
        if count == 0 || count > MAX_RUN || first.checked_add(count).is_none_or(|e| e > self.blocks)
        {
            return Err(self.bad(format!(
                "blocks {first}+{count} outside the disk's {}",
                self.blocks
            )));
        }
        let off = first * DISK_BLOCK;
        let len = (count * DISK_BLOCK).min(self.disk.size() - off);
        let io = |e: std::io::Error| MigrateError::Io {
            what: format!("writing disk {}", self.disk.config().path.display()),
            source: e,
        };
        match h[1] {
            KIND_DATA if (data.len() - HEADER) as u64 == len => {
                self.disk.write_at(&data[HEADER..], off).map_err(io)?
            }
            KIND_DATA => {
                return Err(self.bad(format!(
                    "{} bytes of data for {len} bytes of blocks",
                    data.len() - HEADER
                )))
            }
            KIND_ZERO if data.len() == HEADER => {
                if self.disk.discard(off, len).is_err() {
                    self.disk
                        .write_at(&vec![0; len as usize], off)
                        .map_err(io)?;
                }
            }
            k => return Err(self.bad(format!("unknown kind {k} or a body of the wrong size"))),
        }
        for b in first..first + count {
            self.received[(b / 64) as usize] |= 1 << (b % 64);
        }
        self.unflushed += len;
        if self.unflushed >= WRITEBACK_EVERY {
            self.disk.start_writeback();
            self.unflushed = 0;
        }
        Ok(true)
    }

    fn progress(&self) -> Progress {
        Progress::default()
    }

    /// The end of the stream, before LOADED: every block arrived, and what the source's guest
    /// had written (and flushed there) is durable here before the guest can run here.
    fn finish(&mut self) -> Result<()> {
        if !self.expected {
            return Ok(());
        }
        let got: u64 = self
            .received
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        if got != self.blocks {
            return Err(self.bad(format!(
                "the stream ended with {} of its {} blocks never sent",
                self.blocks - got,
                self.blocks
            )));
        }
        self.disk.flush().map_err(|e| MigrateError::Io {
            what: format!("flushing disk {}", self.disk.config().path.display()),
            source: e,
        })
    }

    fn cleanup(&mut self) {}
}
