//! tern's live-migration engine, generic over the VM it moves.
//!
//! Precopy in three stages: (1) setup — dirty tracking on, the VM description sent, all RAM
//! counted dirty; (2) rounds — each sends the pages dirtied since the last sync, at most once per
//! round, zero pages as ranges; after each round the [`convergence`] rule decides whether the rest
//! fits in the downtime limit; (3) stop-and-copy — pause, last pages, CPU and device sections,
//! END, then the switch-over below.
//!
//! The VM is reached through the traits below, implemented by `tern-vmm` for KVM and by
//! [`fake::FakeVm`] for tests. The VM lists its [`SaveParticipant`]s/[`LoadParticipant`]s (RAM
//! first); the engine walks that list and never names RAM, so other iterative state (block
//! storage) joins without touching the engine.
//!
//! The switch-over is a two-phase commit (`docs/stream-format.md`): the target loads and answers
//! LOADED without running; the source commits — its point of no return — and sends GO; the target
//! runs and answers RUNNING. Before the commit every failure resumes the source; after it the
//! source never resumes by itself.

mod control;
pub mod convergence;
pub mod dirtyrate;
mod error;
pub mod fake;
pub mod manager;
mod params;
pub mod participant;
mod ram;
mod rate;
mod restore;
mod source;
mod stats;
mod target;
pub mod transport;

use std::ops::Range;
use std::sync::Arc;

pub use control::{CancelRefused, MigrationControl, MigrationEvent};
pub use error::MigrateError;
pub use manager::MigrationManager;
pub use params::{
    AutoPostcopy, Capabilities, DirtyLogMode, FaultAction, LimitAction, MigrationMode,
    MigrationParams, MultifdCompression, SwitchoverFault, SwitchoverStep,
};
pub use participant::{LoadParticipant, Progress, SaveParticipant};
pub use ram::{RamLoader, RamSaver};
pub use restore::{restore_mapped, RestoreStats};
pub use source::precopy::describe;
pub use source::run_outgoing;
pub use stats::{MigrationStats, MigrationStatus};
pub use target::postcopy::FaultStats;
pub use target::{run_incoming, IncomingOutcome};
pub use tern_wire::{Section, SectionDesc, VmDescription};

/// Result of engine operations.
pub type Result<T> = std::result::Result<T, MigrateError>;

/// A RAM region as the engine sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    pub id: u32,
    pub name: String,
    pub gpa: u64,
    pub size: u64,
}

/// Guest RAM on the source.
pub trait GuestRam: Send + Sync {
    /// The regions, in order.
    fn regions(&self) -> Vec<RegionInfo>;
    /// Turns dirty tracking on (guest writes through the hypervisor, VMM writes through its own
    /// bitmap). Pages written from now on show up in [`GuestRam::sync_dirty`]. Returns the mode
    /// in use: `mode`, [`DirtyLogMode::Get`] where the hypervisor lacks manual protect, or
    /// [`DirtyLogMode::Ring`] for a VM created with a dirty ring.
    fn start_dirty_log(&self, mode: DirtyLogMode) -> Result<DirtyLogMode>;
    /// ORs into `bitmap` (one bit per page, LSB first) the pages of `region` written since the
    /// last call or since tracking started; returns how many bits it newly set.
    ///
    /// In [`DirtyLogMode::Get`] and [`DirtyLogMode::Ring`] this also clears the record and
    /// re-arms tracking of those pages.
    /// In [`DirtyLogMode::Clear`] it does neither: a page reported stays reported (and its
    /// further writes unrecorded) until [`GuestRam::clear_dirty`] names it. The VMM's own
    /// bitmap is cleared by every sync in both modes (it records every write).
    fn sync_dirty(&self, region: u32, bitmap: &mut [u64]) -> Result<u64>;
    /// [`DirtyLogMode::Clear`]: re-arms tracking of the pages of `region` set in `bits` (bit `i`
    /// is page `first_page + i`; `first_page` a multiple of 64) and forgets that they were
    /// written. A write after this call shows up in the next sync, so it must come *before* the
    /// pages are read to be sent; a page named here that is not read afterwards would lose the
    /// writes before it. Nothing to do in the other modes.
    fn clear_dirty(&self, region: u32, first_page: u64, bits: &[u64]) -> Result<()>;
    /// Turns dirty tracking off.
    fn stop_dirty_log(&self);
    /// Copies whole pages starting at `first_page` into `out` (a multiple of the page size).
    /// The guest may be running: torn pages are re-sent because they are dirty.
    fn read_pages(&self, region: u32, first_page: u64, out: &mut [u8]) -> Result<()>;
    /// Page ranges of `region` that may hold data; everything else is known to be zero.
    fn populated(&self, region: u32) -> Vec<Range<u64>>;
}

/// The VM being migrated away.
pub trait SourceVm: Send + Sync {
    /// Guest RAM.
    fn ram(&self) -> &dyn GuestRam;
    /// Machine configuration for the VM description (memory, vCPUs...).
    fn machine(&self) -> serde_json::Value;
    /// Schemas of the sections [`SourceVm::save_state`] will produce.
    fn state_schemas(&self) -> Vec<SectionDesc>;
    /// Pauses every vCPU (returns once all are parked).
    fn pause(&self) -> Result<()>;
    /// Resumes the vCPUs.
    fn resume(&self) -> Result<()>;
    /// Whether the guest runs now (a guest paused before the migration stays paused after a
    /// failure).
    fn is_running(&self) -> bool;
    /// Auto-converge: takes `percent` of every vCPU's time away (0 = run freely).
    fn set_throttle(&self, percent: u8);
    /// Saves CPU and device state; the VM is paused.
    fn save_state(&self) -> Result<Vec<Section>>;
    /// A digest of all guest RAM (test aid: source at the stop vs target after load).
    fn ram_digest(&self) -> u64;
    /// Bytes of CPU and device state, for the downtime estimate.
    fn state_size_hint(&self) -> u64;
    /// The migration completed: the guest runs on the target, never again here (devices drop
    /// what waited for it: a NIC's frames; a memory handed over is unmapped).
    fn migrated_away(&self) {}
    /// Called as every outgoing migration starts: with `on`, the guest's memory will be handed
    /// over (`mode` `cpr-transfer`) — returns the descriptor that holds it, and RAM is then no
    /// participant of this migration; without, it moves as usual.
    fn handover_memory(&self, on: bool) -> Result<Option<std::os::fd::OwnedFd>> {
        match on {
            false => Ok(None),
            true => Err(MigrateError::Vm(
                "this VM cannot hand its memory over".into(),
            )),
        }
    }
    /// Makes the VM's storage durable, the guest stopped (the switch-over, however the guest
    /// came to be stopped); an error fails the migration before anything is committed.
    fn flush_storage(&self) -> Result<()> {
        Ok(())
    }
    /// What moves iteratively, in the order the engine walks it (RAM: [`RamSaver`]).
    fn save_participants(self: Arc<Self>) -> Vec<Box<dyn SaveParticipant>>;
}

/// Guest RAM on the target.
pub trait TargetRam: Send + Sync {
    /// The RAM regions, as the source's [`GuestRam::regions`] describes its own: a stream whose
    /// regions differ is refused before a page is written.
    fn regions(&self) -> Vec<RegionInfo>;
    /// Allocates pages that are about to be written, without changing them (best effort; runs
    /// on a helper thread while the stream is loaded, so that the loader does not pay for first
    /// touches).
    fn prefault(&self, region: u32, first_page: u64, count: u64);
    /// Writes whole pages.
    fn write_pages(&self, region: u32, first_page: u64, data: &[u8]) -> Result<()>;
    /// Makes pages zero.
    fn zero_pages(&self, region: u32, first_page: u64, count: u64) -> Result<()>;
    /// Lets `fill` write `count` whole pages where they belong (the stream's data read or
    /// decompressed straight into guest RAM, copied once). The default goes through a buffer
    /// and [`TargetRam::write_pages`]; `count` is bounded by the record limits.
    fn fill_pages(
        &self,
        region: u32,
        first_page: u64,
        count: u64,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<()> {
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(tern_wire::PAGE_SIZE))
            .ok_or_else(|| MigrateError::Vm("page run overflows".into()))?;
        let mut buf = vec![0u8; len];
        fill(&mut buf);
        self.write_pages(region, first_page, &buf)
    }
    /// Postcopy (at ADVISE): checks that this RAM can have its missing pages fault in and
    /// returns the means to do it, or says why not.
    fn postcopy(&self) -> Result<Arc<dyn PostcopyRam>> {
        Err(MigrateError::Vm(
            "this target cannot serve page faults".into(),
        ))
    }
}

/// A page the guest touched before it arrived: the region, the page, the thread that waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    pub region: u32,
    pub page: u64,
    pub tid: u32,
}

/// Guest RAM on a postcopy target (`docs/stream-format.md`, *Postcopy*).
pub trait PostcopyRam: Send + Sync {
    /// Drops pages (DISCARD): once [`PostcopyRam::listen`] ran, the guest's next touch of them
    /// faults.
    fn discard(&self, region: u32, first_page: u64, count: u64) -> Result<()>;
    /// [`PostcopyRam::discard`] for many ranges (first page, count) of one region.
    fn discard_ranges(&self, region: u32, ranges: &[(u64, u64)]) -> Result<()> {
        for &(first, count) in ranges {
            self.discard(region, first, count)?;
        }
        Ok(())
    }
    /// From now on a touch of a missing page waits for it (at the first DISCARD, or LISTEN).
    fn listen(&self) -> Result<()>;
    /// LISTEN, every DISCARD done: the guest is about to run on missing pages. A backing that
    /// would make each first fault costly (see the implementation) changes that here, until
    /// [`PostcopyRam::finish`].
    fn before_faults(&self) {}
    /// Places whole pages atomically and wakes whoever waits on them; false if they were there
    /// already (then nothing changed).
    fn place(&self, region: u32, first_page: u64, data: &[u8]) -> Result<bool>;
    /// Places zero pages, as [`PostcopyRam::place`].
    fn place_zero(&self, region: u32, first_page: u64, count: u64) -> Result<bool>;
    /// Waits up to `timeout` for faults; an empty list on a timeout or an
    /// [`PostcopyRam::interrupt`].
    fn faults(&self, timeout: std::time::Duration) -> Result<Vec<PageFault>>;
    /// Ends a [`PostcopyRam::faults`] wait now (the thread serving faults stops). Without it
    /// the wait runs to its timeout.
    fn interrupt(&self) {}
    /// Every page is here: faults are served by the kernel again (missing pages are zero).
    fn finish(&self) -> Result<()>;
    /// The vCPU a thread runs, if it is one (for per-vCPU blocktime).
    fn vcpu_of(&self, tid: u32) -> Option<usize>;
    /// How many vCPUs the VM has.
    fn vcpus(&self) -> usize;
}

/// The VM being migrated in.
pub trait TargetVm: Send + Sync {
    /// Guest RAM.
    fn ram(&self) -> &dyn TargetRam;
    /// Loads CPU and device state (all sections of the stream).
    fn load_state(&self, sections: &[Section]) -> Result<()>;
    /// The sections [`TargetVm::load_state`] takes: a stream that declares any other, or lacks
    /// one, is refused as soon as its description arrives.
    fn state_schemas(&self) -> Vec<SectionDesc>;
    /// The counterparts of the source's participants (RAM: [`RamLoader`]).
    fn load_participants(self: Arc<Self>) -> Vec<Box<dyn LoadParticipant>>;
    /// Starts the guest (once: only on the source's GO, or at the end of a one-way stream).
    fn resume(&self) -> Result<()>;
    /// Stops the vCPUs of a guest started here that must not go on (a restore that found a
    /// corrupt page after the guest ran). By default nothing: the process ends soon after.
    fn stop_guest(&self) {}
    /// A digest of all guest RAM, computed the same way as the source's.
    fn ram_digest(&self) -> u64;
}

/// The RAM digest both sides compute: CRC32C of each MiB, folded into 64 bits in order.
#[derive(Clone, Copy, Debug)]
pub struct RamDigest(u64);

impl Default for RamDigest {
    fn default() -> Self {
        RamDigest(0xcbf2_9ce4_8422_2325)
    }
}

impl RamDigest {
    /// Adds one chunk (at most 1 MiB; chunks must be cut the same way on both sides).
    pub fn update(&mut self, chunk: &[u8]) {
        self.0 = (self.0 ^ u64::from(tern_wire::crc32c(chunk))).wrapping_mul(0x0100_0000_01b3);
    }

    /// The value.
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// The digest of a sequence of buffers, each cut into 1 MiB chunks.
pub fn digest_chunks<'a>(bufs: impl Iterator<Item = &'a [u8]>) -> u64 {
    let mut d = RamDigest::default();
    for b in bufs {
        for c in b.chunks(1 << 20) {
            d.update(c);
        }
    }
    d.finish()
}

/// Builds the target VM from the stream's description (or checks a pre-built one against it).
pub type TargetFactory<'a> =
    Box<dyn FnOnce(&VmDescription) -> Result<Arc<dyn TargetVm>> + Send + 'a>;
