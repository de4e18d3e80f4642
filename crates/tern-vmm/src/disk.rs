//! Disks: the `--disk` option, the raw file behind a virtio-blk device, and the bitmap of the
//! blocks the guest wrote while a storage migration tracks them.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{Error, Result};

/// The unit of the disk's dirty bitmap and of the storage migration's records.
pub const DISK_BLOCK: u64 = 4096;
/// A sector, the unit of virtio-blk's addresses.
pub const SECTOR: u64 = 512;
/// Largest disk accepted (the dirty bitmap is one bit per 4 KiB: 64 MiB of bitmap at the most).
pub const DISK_MAX: u64 = 2 << 40;

/// One `--disk` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// The guest may not write (VIRTIO_BLK_F_RO); the file is opened read-only.
    pub readonly: bool,
    /// O_DIRECT: the host's page cache is bypassed.
    pub direct: bool,
    /// The same file is the disk on both sides of a migration (shared storage): nothing of it is
    /// copied, ownership passes at the commit.
    pub shared: bool,
    /// What VIRTIO_BLK_T_GET_ID answers (at most 20 bytes); default `tern<index>`.
    pub serial: Option<String>,
    /// Test knob: every request is held this long before it is served, so that a pause finds
    /// requests in flight.
    pub latency_ms: u64,
}

impl DiskConfig {
    /// Parses `path=FILE[,readonly=on][,direct=on][,shared=on][,serial=ID]` (a bare `FILE` is
    /// `path=FILE`).
    pub fn parse(spec: &str) -> std::result::Result<DiskConfig, String> {
        if spec.is_empty() {
            return Err("no path=FILE".into());
        }
        let mut cfg = DiskConfig {
            path: PathBuf::new(),
            readonly: false,
            direct: false,
            shared: false,
            serial: None,
            latency_ms: 0,
        };
        let onoff = |k: &str, v: &str| match v {
            "on" | "true" | "yes" => Ok(true),
            "off" | "false" | "no" => Ok(false),
            _ => Err(format!("{k}={v}: expected on or off")),
        };
        for (i, part) in spec.split(',').enumerate() {
            match part.split_once('=') {
                Some(("path", v)) => cfg.path = v.into(),
                Some(("readonly", v)) => cfg.readonly = onoff("readonly", v)?,
                Some(("direct", v)) => cfg.direct = onoff("direct", v)?,
                Some(("shared", v)) => cfg.shared = onoff("shared", v)?,
                Some(("serial", v)) if v.len() <= 20 => cfg.serial = Some(v.into()),
                Some(("serial", _)) => return Err("serial= is at most 20 bytes".into()),
                Some(("x-latency-ms", v)) => {
                    cfg.latency_ms = v
                        .parse()
                        .ok()
                        .filter(|&ms| ms <= 10_000)
                        .ok_or_else(|| format!("x-latency-ms={v}: expected 0..10000"))?
                }
                None if i == 0 && !part.is_empty() => cfg.path = part.into(),
                _ => {
                    return Err(format!(
                        "unknown disk option '{part}' (path=FILE, readonly=on, direct=on, \
                         shared=on, serial=ID)"
                    ))
                }
            }
        }
        if cfg.path.as_os_str().is_empty() {
            return Err("no path=FILE".into());
        }
        Ok(cfg)
    }
}

/// A raw disk image, opened.
pub struct Disk {
    pub(crate) cfg: DiskConfig,
    file: File,
    size: u64,
    /// The blocks written since the tracking started, while it runs.
    pub(crate) dirty: DirtyBlocks,
    /// The first flush that failed and nobody has taken yet: Linux reports a writeback error
    /// once per open file, so whoever flushes first must keep it for the switch-over to see.
    flush_error: Mutex<Option<std::io::Error>>,
}

impl Disk {
    /// Opens the file: it must exist, be a whole number of sectors, and be writable unless
    /// `readonly=on`.
    pub fn open(cfg: &DiskConfig) -> Result<Disk> {
        let p = cfg.path.display();
        let bad = |why: String| Error::InvalidConfig(format!("disk {p}: {why}"));
        let meta = std::fs::metadata(&cfg.path).map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() && !meta.file_type().is_block_device_like() {
            return Err(bad("not a regular file or block device".into()));
        }
        if !cfg.readonly && meta.permissions().readonly() {
            return Err(bad(
                "the file is read-only: add readonly=on, or make it writable".into(),
            ));
        }
        let mut o = OpenOptions::new();
        o.read(true).write(!cfg.readonly);
        if cfg.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(&cfg.path).map_err(|e| {
            bad(match e.raw_os_error() {
                Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) if !cfg.readonly => {
                    format!("{e}: add readonly=on to use it read-only")
                }
                Some(libc::EINVAL) if cfg.direct => {
                    format!("{e}: this file system does not take direct=on")
                }
                _ => e.to_string(),
            })
        })?;
        lock(&file, !cfg.shared, cfg.readonly).map_err(bad)?;
        let size = file_size(&file).map_err(|e| bad(e.to_string()))?;
        if size == 0 || size % SECTOR != 0 {
            return Err(bad(format!(
                "its size, {size} bytes, is not a positive multiple of {SECTOR}"
            )));
        }
        if size > DISK_MAX {
            return Err(bad(format!("larger than {} TiB", DISK_MAX >> 40)));
        }
        Ok(Disk {
            cfg: cfg.clone(),
            file,
            size,
            dirty: DirtyBlocks::new(size.div_ceil(DISK_BLOCK)),
            flush_error: Mutex::new(None),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn config(&self) -> &DiskConfig {
        &self.cfg
    }

    /// As a migration stream describes it.
    pub fn describe(&self) -> crate::machine::DiskDescription {
        use std::os::unix::fs::MetadataExt;
        let meta = self.file.metadata().ok();
        crate::machine::DiskDescription {
            size: self.size,
            readonly: self.cfg.readonly,
            shared: self.cfg.shared,
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            dev: meta.as_ref().map_or(0, |m| m.dev()),
            ino: meta.as_ref().map_or(0, |m| m.ino()),
            path: self.cfg.path.display().to_string(),
            copied: false,
        }
    }

    /// Reads at `offset` (within the disk). With `direct=on` a buffer that O_DIRECT cannot take
    /// (not 4 KiB-aligned) goes through an aligned copy.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if self.cfg.direct && !aligned(buf) {
            let mut b = AlignedBuf::new(buf.len());
            self.file.read_exact_at(b.get(), offset)?;
            buf.copy_from_slice(b.get());
            return Ok(());
        }
        self.file.read_exact_at(buf, offset)
    }

    /// Writes at `offset` (within the disk), then marks the blocks dirty: in that order, so that
    /// a storage migration that clears a block's bit and then reads it sees this write or sends
    /// the block again.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let r = if self.cfg.direct && !aligned(buf) {
            let mut b = AlignedBuf::new(buf.len());
            b.get().copy_from_slice(buf);
            self.file.write_all_at(b.get(), offset)
        } else {
            self.file.write_all_at(buf, offset)
        };
        // Even a failed write may have changed part of the range.
        self.dirty.mark(offset, buf.len() as u64);
        r
    }

    /// Whether `[offset, offset + len)` holds no data at all (a hole of a sparse file, by
    /// SEEK_DATA): it reads as zeros without being read. False when the file system cannot say.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        // SAFETY: lseek on a descriptor we own; it only moves this description's offset, which
        // nothing else uses (every read and write here is positional).
        let data = unsafe {
            libc::lseek(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                libc::SEEK_DATA,
            )
        };
        if data < 0 {
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        data as u64 >= offset.saturating_add(len)
    }

    /// Forgets what the host caches of the file (shared storage, before the guest runs here:
    /// the other host wrote it since).
    pub fn drop_cache(&self) {
        if self.cfg.direct {
            return;
        }
        // SAFETY: posix_fadvise on a descriptor we own, with integer arguments only.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }

    /// Makes every completed write durable. A failure is also kept until
    /// [`Self::take_flush_error`] (the guest's own flush may be the one that sees it).
    pub fn flush(&self) -> std::io::Result<()> {
        if self.cfg.readonly {
            return Ok(());
        }
        self.file.sync_data().inspect_err(|e| {
            let mut kept = self.flush_error.lock().unwrap_or_else(|p| p.into_inner());
            kept.get_or_insert_with(|| std::io::Error::new(e.kind(), e.to_string()));
        })
    }

    /// Flushes, and fails if this flush or any earlier one since the last call failed.
    pub fn flush_checked(&self) -> std::io::Result<()> {
        let now = self.flush();
        let kept = self
            .flush_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match (now, kept) {
            (_, Some(e)) | (Err(e), None) => Err(e),
            (Ok(()), None) => Ok(()),
        }
    }

    /// Starts writing back what is cached of the file, without waiting: the flush that must
    /// wait (at a pause, before LOADED) then finds little left to do.
    pub fn start_writeback(&self) {
        if self.cfg.readonly {
            return;
        }
        // SAFETY: sync_file_range on a descriptor we own, with integer arguments only.
        unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }

    /// Deallocates a range (reads as zeros afterwards); Err(Unsupported) where the file system
    /// cannot.
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a descriptor we own, with plain integer arguments; it touches no
        // memory of ours.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.dirty.mark(offset, len);
        Ok(())
    }
}

/// Takes an OFD lock on the whole file: exclusive for a disk that is not shared (no other
/// process or `--disk` may use it meanwhile: two VMs on one disk corrupt it), shared for a
/// read-only one and for `shared=on` storage, whose ownership the migration hands over.
fn lock(file: &File, exclusive_use: bool, readonly: bool) -> std::result::Result<(), String> {
    if !exclusive_use {
        return Ok(());
    }
    let mut fl: libc::flock = // SAFETY: flock is plain old data; all zeros is a valid value.
        unsafe { std::mem::zeroed() };
    fl.l_type = if readonly {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK on a descriptor we own, with a pointer to a flock that lives across
    // the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => {
            "in use by another VM or --disk (it is locked); give shared=on only for storage that \
             is meant to be shared during a migration"
                .to_string()
        }
        _ => format!("cannot lock it: {e}"),
    })
}

fn aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(4096) && buf.len().is_multiple_of(512)
}

/// A buffer whose start is 4 KiB-aligned, for O_DIRECT (no `unsafe` allocation: a larger
/// vector, used from its first aligned byte).
pub struct AlignedBuf {
    v: Vec<u8>,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        AlignedBuf {
            v: vec![0; len + 4096],
            len,
        }
    }

    pub fn get(&mut self) -> &mut [u8] {
        let start = (4096 - self.v.as_ptr() as usize % 4096) % 4096;
        &mut self.v[start..start + self.len]
    }
}

/// Size of a file or block device.
fn file_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

trait BlockDeviceLike {
    fn is_block_device_like(&self) -> bool;
}

impl BlockDeviceLike for std::fs::FileType {
    fn is_block_device_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_block_device(self)
    }
}

/// One bit per [`DISK_BLOCK`] of the disk, set by writes while tracking is on.
pub struct DirtyBlocks {
    on: AtomicBool,
    words: Vec<AtomicU64>,
    blocks: u64,
    /// Serialises `take` against itself (two participants never share a disk; this is cheap).
    take: Mutex<()>,
}

impl DirtyBlocks {
    fn new(blocks: u64) -> Self {
        DirtyBlocks {
            on: AtomicBool::new(false),
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            blocks,
            take: Mutex::new(()),
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Starts (clearing every bit) or stops tracking.
    pub fn track(&self, on: bool) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
        self.on.store(on, Ordering::SeqCst);
    }

    fn mark(&self, offset: u64, len: u64) {
        if !self.on.load(Ordering::SeqCst) || len == 0 {
            return;
        }
        let first = offset / DISK_BLOCK;
        let last = ((offset + len - 1) / DISK_BLOCK).min(self.blocks.saturating_sub(1));
        let mut b = first;
        while b <= last {
            // The bits of [b, last] within b's word, at once.
            let lo = b % 64;
            let hi = (last - (b - lo)).min(63);
            let bits = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            self.words[(b / 64) as usize].fetch_or(bits, Ordering::SeqCst);
            b = b - lo + 64;
        }
    }

    /// ORs the bits set since the last call into `out` (one bit per block) and clears them.
    pub fn take_into(&self, out: &mut [u64]) {
        let _g = self.take.lock().unwrap_or_else(|e| e.into_inner());
        for (o, w) in out.iter_mut().zip(&self.words) {
            *o |= w.swap(0, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_option_parses_and_names_what_is_wrong() {
        let d = DiskConfig::parse("path=/a,readonly=on,direct=off,shared=on,serial=xy").unwrap();
        assert_eq!(d.path, PathBuf::from("/a"));
        assert!(d.readonly && !d.direct && d.shared);
        assert_eq!(d.serial.as_deref(), Some("xy"));
        assert_eq!(DiskConfig::parse("/b").unwrap().path, PathBuf::from("/b"));
        for (bad, says) in [
            ("", "no path"),
            ("readonly=on", "no path"),
            ("path=/a,readonly=maybe", "expected on or off"),
            ("path=/a,cache=none", "unknown disk option 'cache=none'"),
            ("path=/a,serial=123456789012345678901", "20 bytes"),
        ] {
            let e = DiskConfig::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn writes_mark_their_blocks_only_while_tracked() {
        let dir = std::env::temp_dir().join(format!("tern-disk-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 64 * 4096]).unwrap();
        let d = Disk::open(&DiskConfig::parse(dir.to_str().unwrap()).unwrap()).unwrap();
        d.write_at(&[1; 512], 0).unwrap();
        let mut bits = vec![0u64; 1];
        d.dirty.take_into(&mut bits);
        assert_eq!(bits[0], 0);
        d.dirty.track(true);
        d.write_at(&[1; 8192], 4096 * 3 + 512).unwrap();
        d.dirty.take_into(&mut bits);
        assert_eq!(bits[0], 0b111 << 3);
        // Past the end: clipped to the last block (63).
        d.dirty.mark(4096 * 62, 4096 * 10);
        bits[0] = 0;
        d.dirty.take_into(&mut bits);
        assert_eq!(bits[0], 0b11 << 62);
        bits[0] = 0;
        d.dirty.take_into(&mut bits);
        assert_eq!(bits[0], 0, "taken bits are cleared");
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn a_range_across_words_marks_every_block_once() {
        let d = DirtyBlocks::new(200);
        d.track(true);
        d.mark(4096 * 60, 4096 * 70);
        let mut bits = vec![0u64; 4];
        d.take_into(&mut bits);
        assert_eq!(bits, [0xf << 60, u64::MAX, (1 << 2) - 1, 0]);
    }
}
