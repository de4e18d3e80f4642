//! Participants: whatever state moves iteratively while the guest runs (RAM first, block storage
//! later). The engine walks a list of them and never names one; the VM supplies the list.

use std::io::Write;

use tern_wire::{Record, StreamWriter, VmDescription};

use crate::Result;

/// The stream as a participant writes it.
pub type Out<'a> = StreamWriter<Box<dyn Write + Send + 'a>>;

/// What a participant has moved so far, in pages of 4 KiB (QEMU reports RAM this way; other
/// participants count their blocks in the same unit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Pages sent (or loaded) with data.
    pub data_pages: u64,
    /// Pages sent (or loaded) as known zeros.
    pub zero_pages: u64,
    /// Microseconds spent re-arming change tracking as pages were sent (manual protect: the
    /// share of collecting the dirty log that moved out of the sync).
    pub rearm_us: u64,
}

impl std::ops::AddAssign for Progress {
    fn add_assign(&mut self, o: Progress) {
        self.data_pages += o.data_pages;
        self.zero_pages += o.zero_pages;
        self.rearm_us += o.rearm_us;
    }
}

/// A disk's numbers, for `query-migrate`'s `disk` object (QEMU's, from its old block
/// migration): bytes sent, bytes still to send, the disk's size, rounds of dirty tracking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskCounters {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub dirty_syncs: u64,
}

impl std::ops::AddAssign for DiskCounters {
    fn add_assign(&mut self, o: DiskCounters) {
        self.transferred += o.transferred;
        self.remaining += o.remaining;
        self.total += o.total;
        self.dirty_syncs = self.dirty_syncs.max(o.dirty_syncs);
    }
}

/// A participant on the source.
pub trait SaveParticipant: Send {
    /// Its name, for errors and statistics; also the name its PARTICIPANT_DATA records carry.
    fn name(&self) -> &'static str;
    /// Before the first round: starts tracking changes, marks everything to send, and may write
    /// what it knows already (RAM sends its never-written ranges as zeros).
    fn save_setup(&mut self, out: &mut Out<'_>) -> Result<()>;
    /// The migration has parallel data channels: a participant that can send through them
    /// keeps `channels` and says so (RAM); the others stay on the main stream.
    fn use_channels(
        &mut self,
        _channels: &std::sync::Arc<crate::source::multifd::DataChannels>,
    ) -> bool {
        false
    }
    /// How to compress what it sends (`multifd-compression`), before [`Self::save_setup`]; a
    /// participant that has nothing worth compressing ignores it.
    fn use_compression(&mut self, _compression: tern_wire::Compression) -> Result<()> {
        Ok(())
    }
    /// How to collect the hypervisor's dirty log (`x-tern-dirty-log`), before
    /// [`Self::save_setup`]; a participant that tracks its changes itself ignores it.
    fn use_dirty_log(&mut self, _mode: crate::DirtyLogMode) {}
    /// The dirty-log mode in use once set up, for a participant that uses the hypervisor's.
    fn dirty_log(&self) -> Option<crate::DirtyLogMode> {
        None
    }
    /// Starts a round: collects what changed since the last one. Returns the bytes newly found
    /// dirty.
    fn sync(&mut self) -> Result<u64>;
    /// Bytes still to send in this round (an upper bound: zero pages cost almost nothing).
    fn pending(&self) -> u64;
    /// Sends the next chunk of this round; returns false once the round is done.
    fn iterate(&mut self, out: &mut Out<'_>) -> Result<bool>;
    /// With the VM paused, after the engine's last [`Self::sync`]: sends everything that is left.
    fn complete_precopy(&mut self, out: &mut Out<'_>) -> Result<()>;
    /// Moved so far.
    fn progress(&self) -> Progress;
    /// After success or failure (stops tracking).
    fn cleanup(&mut self);
    /// A disk's counters, if this participant is one (they stay out of RAM's).
    fn disk_counters(&self) -> Option<DiskCounters> {
        None
    }
    /// Postcopy, with the VM paused after the last sync: tells the target what it holds stale
    /// or not at all (DISCARD). After it, [`Self::iterate`] sends what is left, once, without
    /// tracking anything any more. A participant that cannot move by postcopy refuses.
    fn postcopy_discard(&mut self, _out: &mut Out<'_>) -> Result<()> {
        Err(crate::MigrateError::Vm(format!(
            "'{}' cannot move by postcopy",
            self.name()
        )))
    }
    /// Postcopy-preempt, after [`Self::postcopy_discard`]: the sender of requested pages for
    /// the urgent stream, if this participant has pages.
    fn postcopy_urgent(&mut self) -> Option<std::sync::Arc<dyn UrgentPages>> {
        None
    }
    /// Postcopy: sends now what the target asked for, if it is this participant's and still to
    /// send, and goes on from just after it. Returns the pages sent.
    fn postcopy_serve(
        &mut self,
        _out: &mut Out<'_>,
        _region: u32,
        _first_page: u64,
        _count: u64,
    ) -> Result<u64> {
        Ok(0)
    }
    /// Postcopy recovery: the target holds exactly the pages set in `words` (page
    /// `first_page + 64 j + i` is bit i of word j) of `region`, if it is this participant's; the
    /// others are to send, whatever was sent before. Returns how many pages that sends again.
    fn postcopy_held(&mut self, _region: u32, _first_page: u64, _words: &[u64]) -> Result<u64> {
        Ok(0)
    }
}

/// Postcopy-preempt: sends the pages the target asked for on the urgent stream, from a thread
/// of its own, each page at most once between it and the participant's own scan.
pub trait UrgentPages: Send + Sync {
    /// Sends those of the pages still to send; returns how many went.
    fn send(&self, out: &mut Out<'_>, region: u32, first_page: u64, count: u64) -> Result<u64>;
}

/// A participant on the target.
pub trait LoadParticipant: Send {
    /// The name its source counterpart has.
    fn name(&self) -> &'static str;
    /// After the VM description.
    fn load_setup(&mut self, desc: &VmDescription) -> Result<()>;
    /// One record; returns false if the record is not this participant's.
    fn load(&mut self, record: &Record<'_>) -> Result<bool>;
    /// Loaded so far.
    fn progress(&self) -> Progress;
    /// At END, before the target answers LOADED: whatever must hold for the guest to run here
    /// (all of it arrived, it is durable); an error fails the migration with ERROR.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
    /// Once the stream has ended (END) or failed; may come more than once.
    fn cleanup(&mut self);
}

/// Every participant's progress, added up.
pub(crate) fn total<'a, P: ?Sized + 'a>(
    parts: impl Iterator<Item = &'a Box<P>>,
    progress: impl Fn(&P) -> Progress,
) -> Progress {
    let mut t = Progress::default();
    for p in parts {
        t += progress(p);
    }
    t
}
