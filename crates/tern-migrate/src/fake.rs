//! An in-memory VM for testing the engine without KVM: RAM in vectors, a dirty bitmap that its
//! "guest" writes mark, a pause flag, and one small device section.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tern_wire::{
    FieldSpec, FieldType, Schema, Section, SectionBuilder, SectionDesc, SectionReader, Value,
    PAGE_SIZE,
};

use crate::{GuestRam, MigrateError, RegionInfo, Result, SourceVm, TargetRam, TargetVm};

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
    dirty: Mutex<Vec<u64>>,
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
                    dirty: Mutex::new(vec![0; (size / PAGE).div_ceil(64) as usize]),
                })
                .collect(),
            logging: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            running: AtomicBool::new(true),
            writes: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            throttle: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            unmigratable: AtomicBool::new(false),
        })
    }

    /// A guest write of `byte` over page `page` of `region`; refused while paused.
    pub fn guest_write(&self, region: u32, page: u64, byte: u8) -> bool {
        if self.paused.load(Ordering::SeqCst) || !self.running.load(Ordering::SeqCst) {
            return false;
        }
        let r = &self.regions[region as usize];
        let at = (page * PAGE) as usize;
        r.mem.lock().unwrap()[at..at + PAGE_SIZE].fill(byte);
        if self.logging.load(Ordering::SeqCst) {
            r.dirty.lock().unwrap()[(page / 64) as usize] |= 1 << (page % 64);
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        true
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
    fn start_dirty_log(&self) -> Result<()> {
        for r in &self.regions {
            r.dirty.lock().unwrap().fill(0);
        }
        self.logging.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn sync_dirty(&self, region: u32, bitmap: &mut [u64]) -> Result<()> {
        let mut d = self.regions[region as usize].dirty.lock().unwrap();
        for (b, w) in bitmap.iter_mut().zip(d.iter_mut()) {
            *b |= *w;
            *w = 0;
        }
        Ok(())
    }
    fn stop_dirty_log(&self) {
        self.logging.store(false, Ordering::SeqCst);
    }
    fn read_pages(&self, region: u32, first_page: u64, out: &mut [u8]) -> Result<()> {
        let m = self.regions[region as usize].mem.lock().unwrap();
        let at = (first_page * PAGE) as usize;
        out.copy_from_slice(&m[at..at + out.len()]);
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
}

impl TargetRam for FakeVm {
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
    fn resume(&self) -> Result<()> {
        SourceVm::resume(self)
    }
    fn ram_digest(&self) -> u64 {
        SourceVm::ram_digest(self)
    }
}
