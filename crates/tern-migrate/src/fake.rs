//! An in-memory VM for testing the engine without KVM: RAM in vectors, a dirty bitmap that its
//! "guest" writes mark, a pause flag, one small device section, and optionally a disk that
//! migrates as a second participant (the engine knows neither by name).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tern_wire::{
    FieldSpec, FieldType, Schema, Section, SectionBuilder, SectionDesc, SectionReader, Value,
    PAGE_SIZE,
};

use crate::participant::{LoadParticipant, Out, Progress, SaveParticipant};
use crate::{
    DirtyLogMode, GuestRam, MigrateError, RamLoader, RamSaver, RegionInfo, Result, SourceVm,
    TargetRam, TargetVm,
};

const PAGE: u64 = PAGE_SIZE as u64;

static FAKE_CPU: Schema = Schema {
    name: "fake-cpu",
    version: 1,
    min_version: 1,
    fields: &[FieldSpec {
        name: "writes",
        ty: FieldType::U64,
        since: 1,
    }],
    subsections: &[],
};

struct Region {
    info: RegionInfo,
    mem: Mutex<Vec<u8>>,
    dirty: Mutex<Tracking>,
}

/// The fake hypervisor's dirty log, modelled on KVM's: in [`DirtyLogMode::Clear`] a write is
/// recorded only if tracking of its page is armed, and recording disarms it (KVM write-protects
/// the page; the first write faults, is logged and makes the page writable) until
/// `clear_dirty` re-arms it. In [`DirtyLogMode::Get`] every sync re-arms what it reports, so
/// every write is recorded.
struct Tracking {
    dirty: Vec<u64>,
    armed: Vec<u64>,
}

impl Tracking {
    fn new(words: usize) -> Self {
        Tracking {
            dirty: vec![0; words],
            armed: vec![!0; words],
        }
    }
    fn write(&mut self, page: u64, mode: DirtyLogMode) {
        let (i, b) = ((page / 64) as usize, 1u64 << (page % 64));
        if mode == DirtyLogMode::Get || self.armed[i] & b != 0 {
            self.dirty[i] |= b;
            self.armed[i] &= !b;
        }
    }
}

/// The fake VM.
pub struct FakeVm {
    regions: Vec<Region>,
    logging: AtomicBool,
    paused: AtomicBool,
    running: AtomicBool,
    writes: AtomicU64,
    /// Pause and resume calls, for tests.
    pub pauses: AtomicU64,
    pub resumes: AtomicU64,
    /// The auto-converge throttle the engine set last.
    pub throttle: AtomicU64,
    /// A device that refuses to migrate.
    pub unmigratable: AtomicBool,
    /// The fake disk: blocks of one page, and which were written since the last sync.
    disk: Mutex<(Vec<u8>, Vec<bool>)>,
    /// Held by every guest write from its check of `paused` to its end, and by `pause`: once
    /// `pause` returns no write is in flight (as vCPUs parked by KVM), so nothing changes RAM
    /// after the engine's last sync.
    vcpus: Mutex<()>,
    /// The dirty log is in manual-protect mode.
    clear_mode: AtomicBool,
    /// `clear_dirty` calls, for tests.
    pub clears: AtomicU64,
    write_after_read: Mutex<Option<(u32, u64, u8)>>,
}

impl FakeVm {
    /// A VM with regions of these sizes (bytes, multiples of the page size).
    pub fn new(sizes: &[u64]) -> Arc<Self> {
        Arc::new(FakeVm {
            regions: sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| Region {
                    info: RegionInfo {
                        id: i as u32,
                        name: format!("fake{i}"),
                        gpa: (i as u64) << 32,
                        size,
                    },
                    mem: Mutex::new(vec![0; size as usize]),
                    dirty: Mutex::new(Tracking::new((size / PAGE).div_ceil(64) as usize)),
                })
                .collect(),
            logging: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            vcpus: Mutex::new(()),
            running: AtomicBool::new(true),
            writes: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            throttle: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            unmigratable: AtomicBool::new(false),
            disk: Mutex::new((Vec::new(), Vec::new())),
            clear_mode: AtomicBool::new(false),
            clears: AtomicU64::new(0),
            write_after_read: Mutex::new(None),
        })
    }

    /// Gives the VM a disk of `blocks` pages (a second participant: "fake-disk").
    pub fn with_disk(self: Arc<Self>, blocks: usize) -> Arc<Self> {
        *self.disk.lock().unwrap() = (vec![0; blocks * PAGE_SIZE], vec![false; blocks]);
        self
    }

    /// A guest write of `byte` over disk block `block`; refused while paused.
    pub fn disk_write(&self, block: usize, byte: u8) -> bool {
        let _vcpu = self.vcpus.lock().unwrap();
        if !self.is_running() {
            return false;
        }
        let mut d = self.disk.lock().unwrap();
        d.0[block * PAGE_SIZE..(block + 1) * PAGE_SIZE].fill(byte);
        d.1[block] = true;
        true
    }

    /// A copy of the disk.
    pub fn disk_contents(&self) -> Vec<u8> {
        self.disk.lock().unwrap().0.clone()
    }

    fn has_disk(&self) -> bool {
        !self.disk.lock().unwrap().0.is_empty()
    }

    /// A guest write of `byte` over page `page` of `region`; refused while paused.
    pub fn guest_write(&self, region: u32, page: u64, byte: u8) -> bool {
        let _vcpu = self.vcpus.lock().unwrap();
        if self.paused.load(Ordering::SeqCst) || !self.running.load(Ordering::SeqCst) {
            return false;
        }
        let r = &self.regions[region as usize];
        let at = (page * PAGE) as usize;
        r.mem.lock().unwrap()[at..at + PAGE_SIZE].fill(byte);
        if self.logging.load(Ordering::SeqCst) {
            r.dirty.lock().unwrap().write(page, self.mode());
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Test aid: the next time the engine reads `page` of `region` to send it, the guest writes
    /// `byte` over it right after the copy (the write that a wrong order of "read the page" and
    /// "re-arm its tracking" would lose).
    pub fn write_after_read(&self, region: u32, page: u64, byte: u8) {
        *self.write_after_read.lock().unwrap() = Some((region, page, byte));
    }

    /// Whether the armed write of [`FakeVm::write_after_read`] has happened.
    pub fn wrote_after_read(&self) -> bool {
        self.write_after_read.lock().unwrap().is_none()
    }

    fn mode(&self) -> DirtyLogMode {
        if self.clear_mode.load(Ordering::SeqCst) {
            DirtyLogMode::Clear
        } else {
            DirtyLogMode::Get
        }
    }

    /// Whether the guest runs.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst) && !self.paused.load(Ordering::SeqCst)
    }

    /// A copy of all RAM.
    pub fn contents(&self) -> Vec<Vec<u8>> {
        self.regions
            .iter()
            .map(|r| r.mem.lock().unwrap().clone())
            .collect()
    }

    /// A target: created stopped, started by `resume`.
    pub fn new_target(sizes: &[u64]) -> Arc<Self> {
        let vm = Self::new(sizes);
        vm.running.store(false, Ordering::SeqCst);
        vm
    }

    /// Guest writes so far (the device state).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
}

impl GuestRam for FakeVm {
    fn regions(&self) -> Vec<RegionInfo> {
        self.regions.iter().map(|r| r.info.clone()).collect()
    }
    fn start_dirty_log(&self, mode: DirtyLogMode) -> Result<DirtyLogMode> {
        for r in &self.regions {
            let mut t = r.dirty.lock().unwrap();
            *t = Tracking::new(t.dirty.len());
        }
        self.clear_mode
            .store(mode == DirtyLogMode::Clear, Ordering::SeqCst);
        self.logging.store(true, Ordering::SeqCst);
        Ok(mode)
    }
    fn sync_dirty(&self, region: u32, bitmap: &mut [u64]) -> Result<u64> {
        let mut t = self.regions[region as usize].dirty.lock().unwrap();
        let get = self.mode() == DirtyLogMode::Get;
        let mut new = 0;
        for (b, w) in bitmap.iter_mut().zip(t.dirty.iter_mut()) {
            new += u64::from((*w & !*b).count_ones());
            *b |= *w;
            if get {
                *w = 0;
            }
        }
        Ok(new)
    }
    fn clear_dirty(&self, region: u32, first_page: u64, bits: &[u64]) -> Result<()> {
        assert_eq!(first_page % 64, 0, "KVM clears whole words");
        let mut t = self.regions[region as usize].dirty.lock().unwrap();
        let first = (first_page / 64) as usize;
        for (i, &m) in bits.iter().enumerate() {
            let was = t.dirty[first + i] & m;
            t.dirty[first + i] &= !m;
            t.armed[first + i] |= was;
        }
        self.clears.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn stop_dirty_log(&self) {
        self.logging.store(false, Ordering::SeqCst);
    }
    fn read_pages(&self, region: u32, first_page: u64, out: &mut [u8]) -> Result<()> {
        {
            let m = self.regions[region as usize].mem.lock().unwrap();
            let at = (first_page * PAGE) as usize;
            out.copy_from_slice(&m[at..at + out.len()]);
        }
        let pages = first_page..first_page + (out.len() / PAGE_SIZE) as u64;
        let hook = {
            let mut h = self.write_after_read.lock().unwrap();
            match *h {
                Some((r, p, _)) if r == region && pages.contains(&p) => h.take(),
                _ => None,
            }
        };
        if let Some((r, p, byte)) = hook {
            self.guest_write(r, p, byte);
        }
        Ok(())
    }
    fn populated(&self, region: u32) -> Vec<Range<u64>> {
        let pages = self.regions[region as usize].info.size / PAGE;
        std::iter::once(0..pages).collect()
    }
}

impl SourceVm for FakeVm {
    fn ram(&self) -> &dyn GuestRam {
        self
    }
    fn machine(&self) -> serde_json::Value {
        serde_json::json!({"fake": true, "regions": self.regions.len()})
    }
    fn state_schemas(&self) -> Vec<SectionDesc> {
        vec![FAKE_CPU.describe(0)]
    }
    fn pause(&self) -> Result<()> {
        let _vcpus = self.vcpus.lock().unwrap();
        self.paused.store(true, Ordering::SeqCst);
        self.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) -> Result<()> {
        self.paused.store(false, Ordering::SeqCst);
        self.running.store(true, Ordering::SeqCst);
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn is_running(&self) -> bool {
        FakeVm::is_running(self)
    }
    fn set_throttle(&self, percent: u8) {
        self.throttle.store(u64::from(percent), Ordering::SeqCst);
    }
    fn save_state(&self) -> Result<Vec<Section>> {
        if self.unmigratable.load(Ordering::SeqCst) {
            return Err(tern_wire::StateError::NotMigratable {
                device: "fake-gpu".into(),
                reason: "host state".into(),
            }
            .into());
        }
        Ok(vec![SectionBuilder::new(&FAKE_CPU, 0)
            .field("writes", Value::U64(self.writes()))?
            .build()?])
    }
    fn ram_digest(&self) -> u64 {
        let c = self.contents();
        crate::digest_chunks(c.iter().map(|v| &v[..]))
    }
    fn state_size_hint(&self) -> u64 {
        64
    }
    fn save_participants(self: Arc<Self>) -> Vec<Box<dyn SaveParticipant>> {
        let mut v: Vec<Box<dyn SaveParticipant>> = vec![Box::new(RamSaver::new(self.clone()))];
        if self.has_disk() {
            v.push(Box::new(DiskSaver {
                vm: self,
                todo: Vec::new(),
                sent: 0,
            }));
        }
        v
    }
}

impl TargetRam for FakeVm {
    fn regions(&self) -> Vec<RegionInfo> {
        GuestRam::regions(self)
    }

    fn prefault(&self, _region: u32, _first_page: u64, _count: u64) {}

    fn write_pages(&self, region: u32, first_page: u64, data: &[u8]) -> Result<()> {
        let r = self
            .regions
            .get(region as usize)
            .ok_or_else(|| MigrateError::Vm("no such region".into()))?;
        let at = (first_page * PAGE) as usize;
        r.mem.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn zero_pages(&self, region: u32, first_page: u64, count: u64) -> Result<()> {
        let r = self
            .regions
            .get(region as usize)
            .ok_or_else(|| MigrateError::Vm("no such region".into()))?;
        let at = (first_page * PAGE) as usize;
        r.mem.lock().unwrap()[at..at + (count * PAGE) as usize].fill(0);
        Ok(())
    }
}

impl TargetVm for FakeVm {
    fn ram(&self) -> &dyn TargetRam {
        self
    }
    fn state_schemas(&self) -> Vec<SectionDesc> {
        SourceVm::state_schemas(self)
    }
    fn load_state(&self, sections: &[Section]) -> Result<()> {
        let s = sections
            .iter()
            .find(|s| s.name == "fake-cpu")
            .ok_or_else(|| tern_wire::StateError::MissingSection {
                section: "fake-cpu".into(),
                instance: 0,
            })?;
        let r = SectionReader::new(&FAKE_CPU, s)?;
        self.writes.store(r.u64("writes")?, Ordering::SeqCst);
        Ok(())
    }
    fn load_participants(self: Arc<Self>) -> Vec<Box<dyn LoadParticipant>> {
        let mut v: Vec<Box<dyn LoadParticipant>> = vec![Box::new(RamLoader::new(self.clone()))];
        if self.has_disk() {
            v.push(Box::new(DiskLoader {
                vm: self,
                loaded: 0,
            }));
        }
        v
    }
    fn resume(&self) -> Result<()> {
        SourceVm::resume(self)
    }
    fn ram_digest(&self) -> u64 {
        SourceVm::ram_digest(self)
    }
}

/// Blocks per PARTICIPANT_DATA record of the fake disk.
const DISK_BATCH: usize = 16;

/// The fake disk's source side: each record holds (u64 block, one page of data) pairs.
struct DiskSaver {
    vm: Arc<FakeVm>,
    todo: Vec<usize>,
    sent: u64,
}

impl DiskSaver {
    fn send(&mut self, out: &mut Out<'_>, all: bool) -> Result<bool> {
        while !self.todo.is_empty() {
            let n = self.todo.len().min(DISK_BATCH);
            let mut body = Vec::with_capacity(n * (8 + PAGE_SIZE));
            {
                let d = self.vm.disk.lock().unwrap();
                for b in self.todo.drain(..n) {
                    body.extend_from_slice(&(b as u64).to_le_bytes());
                    body.extend_from_slice(&d.0[b * PAGE_SIZE..(b + 1) * PAGE_SIZE]);
                }
            }
            out.participant_data("fake-disk", &body)?;
            self.sent += n as u64;
            if !all {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl SaveParticipant for DiskSaver {
    fn name(&self) -> &'static str {
        "fake-disk"
    }
    fn save_setup(&mut self, _out: &mut Out<'_>) -> Result<()> {
        let mut d = self.vm.disk.lock().unwrap();
        d.1.fill(false);
        self.todo = (0..d.1.len()).collect();
        Ok(())
    }
    fn sync(&mut self) -> Result<u64> {
        let mut d = self.vm.disk.lock().unwrap();
        let mut found = 0;
        for (b, dirty) in d.1.iter_mut().enumerate() {
            if std::mem::take(dirty) && !self.todo.contains(&b) {
                self.todo.push(b);
                found += 1;
            }
        }
        Ok(found * PAGE)
    }
    fn pending(&self) -> u64 {
        self.todo.len() as u64 * PAGE
    }
    fn iterate(&mut self, out: &mut Out<'_>) -> Result<bool> {
        self.send(out, false)
    }
    fn complete_precopy(&mut self, out: &mut Out<'_>) -> Result<()> {
        self.send(out, true).map(drop)
    }
    fn progress(&self) -> Progress {
        Progress {
            data_pages: self.sent,
            zero_pages: 0,
            ..Default::default()
        }
    }
    fn cleanup(&mut self) {}
}

/// The fake disk's target side.
struct DiskLoader {
    vm: Arc<FakeVm>,
    loaded: u64,
}

impl LoadParticipant for DiskLoader {
    fn name(&self) -> &'static str {
        "fake-disk"
    }
    fn load_setup(&mut self, _desc: &tern_wire::VmDescription) -> Result<()> {
        Ok(())
    }
    fn load(&mut self, record: &tern_wire::Record<'_>) -> Result<bool> {
        let tern_wire::Record::Participant {
            name: "fake-disk",
            data,
        } = record
        else {
            return Ok(false);
        };
        let mut d = self.vm.disk.lock().unwrap();
        let bad = || MigrateError::Vm("fake-disk: bad record".into());
        if data.len() % (8 + PAGE_SIZE) != 0 {
            return Err(bad());
        }
        for chunk in data.chunks(8 + PAGE_SIZE) {
            let b = u64::from_le_bytes(chunk[..8].try_into().expect("8")) as usize;
            let at = b
                .checked_mul(PAGE_SIZE)
                .filter(|&a| a < d.0.len())
                .ok_or_else(bad)?;
            d.0[at..at + PAGE_SIZE].copy_from_slice(&chunk[8..]);
            self.loaded += 1;
        }
        Ok(true)
    }
    fn progress(&self) -> Progress {
        Progress {
            data_pages: self.loaded,
            zero_pages: 0,
            ..Default::default()
        }
    }
    fn cleanup(&mut self) {}
}
