//! Guest memory handed from one process to another on the same host (`mode` `cpr-transfer`):
//! the source passes its memfd, the target maps the very same pages, and after the commit the
//! source unmaps them, so that it can never touch the guest's memory again.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use super::{layout, GuestRam, MemoryBackend, MIN_MEMORY};
use crate::{Error, Result};

/// `GuestRam::handover`: what happened to the memory.
const HANDED_IN: u8 = 1;
const RELEASED: u8 = 2;
const HANDING_OUT: u8 = 3;

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

impl GuestRam {
    /// Maps `size` bytes of guest RAM from a memfd another process handed over; refused unless the
    /// file is exactly that size (a memfd of another guest, or a truncated one, never maps).
    pub fn from_memfd(size: u64, memfd: File) -> Result<Self> {
        if size < MIN_MEMORY {
            return Err(Error::InvalidConfig(format!(
                "memory must be at least {} MiB",
                MIN_MEMORY >> 20
            )));
        }
        let len = memfd
            .metadata()
            .map_err(|e| Error::Memory(format!("the memory handed over: {e}")))?
            .len();
        if len != size {
            return Err(Error::Memory(format!(
                "the memory handed over is {len} bytes, the guest has {size}: refused"
            )));
        }
        // SAFETY: a zeroed statfs is a valid out-parameter; fstatfs only writes it.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs on an open descriptor, writing `st`.
        let rc = unsafe { libc::fstatfs(memfd.as_raw_fd(), &mut st) };
        let backend = if rc == 0 && st.f_type as i64 == HUGETLBFS_MAGIC {
            MemoryBackend::MemfdHugetlb
        } else {
            MemoryBackend::Memfd
        };
        let ram = Self::map(layout(size), backend, Some(memfd))?;
        ram.handover.store(HANDED_IN, Ordering::SeqCst);
        Ok(ram)
    }

    /// Whether this memory came from another process (it is then complete: nothing to load).
    pub fn handed_in(&self) -> bool {
        self.handover.load(Ordering::SeqCst) == HANDED_IN
    }

    /// Marks whether the migration starting now hands this memory over (`on`) or copies it;
    /// returns a descriptor of the memfd to pass. Refused for anonymous memory.
    pub fn hand_out(&self, on: bool) -> Result<Option<File>> {
        let state = self.handover.load(Ordering::SeqCst);
        if state == RELEASED {
            return Err(Error::Memory(
                "the guest's memory is not here any more".into(),
            ));
        }
        if !on {
            if state == HANDING_OUT {
                self.handover.store(0, Ordering::SeqCst);
            }
            return Ok(None);
        }
        let f = self.memfd.as_ref().ok_or_else(|| {
            Error::InvalidConfig(
                "mode cpr-transfer hands the guest's memory over as a memfd: start the VM with \
                 --memory-backend memfd (or memfd-hugetlb)"
                    .into(),
            )
        })?;
        let dup = f
            .try_clone()
            .map_err(|e| Error::Memory(format!("dup memfd: {e}")))?;
        self.handover.store(HANDING_OUT, Ordering::SeqCst);
        Ok(Some(dup))
    }

    /// Whether the migration under way hands this memory over (RAM is then not copied).
    pub fn handing_out(&self) -> bool {
        self.handover.load(Ordering::SeqCst) == HANDING_OUT
    }

    /// Leave to read guest memory from the host side (not the guest's own accesses) for as long
    /// as the guard lives; None once the memory was handed away.
    pub fn read_access(&self) -> Option<std::sync::RwLockReadGuard<'_, ()>> {
        let g = self.access.read().unwrap_or_else(|e| e.into_inner());
        (!self.released()).then_some(g)
    }

    /// Whether this memory was handed away and is no longer mapped here.
    pub fn released(&self) -> bool {
        self.handover.load(Ordering::SeqCst) == RELEASED
    }

    /// The guest runs in another process now, on these very pages: replaces every mapping of
    /// them with inaccessible anonymous memory (the addresses stay reserved, so nothing else
    /// lands there while KVM still names them; nothing here may touch them again).
    pub fn release(&self) {
        // Waits out a host-side reader (pmemsave) in the middle of a read.
        let _w = self.access.write().unwrap_or_else(|e| e.into_inner());
        if self.handover.swap(RELEASED, Ordering::SeqCst) == RELEASED {
            return;
        }
        for (host, r) in self.host_addrs().into_iter().zip(&self.regions) {
            // SAFETY: MAP_FIXED over the region's own mapping, the exact range vm-memory mapped;
            // the guest is stopped for good (its vCPUs parked, its devices held), and host-side
            // readers hold `access`, which we hold whole.
            let p = unsafe {
                libc::mmap(
                    host as *mut libc::c_void,
                    r.size as usize,
                    libc::PROT_NONE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                tracing::warn!(
                    "cannot unmap the guest memory handed over: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::create_memfd;
    use super::*;

    #[test]
    fn memory_of_another_size_is_refused_and_a_hand_over_releases_it() {
        let f = create_memfd(64 << 20, false).unwrap();
        let e = GuestRam::from_memfd(128 << 20, f)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("is 67108864 bytes, the guest has 134217728"),
            "{e}"
        );
        let ram = GuestRam::from_memfd(64 << 20, create_memfd(64 << 20, false).unwrap()).unwrap();
        assert!(ram.handed_in());
        assert!(ram.hand_out(true).unwrap().is_some());
        assert!(ram.handing_out());
        // A migration that copies after a failed hand-over: the mark goes.
        assert!(ram.hand_out(false).unwrap().is_none());
        assert!(!ram.handing_out());
        let anon = GuestRam::new(64 << 20).unwrap();
        let e = anon.hand_out(true).err().unwrap().to_string();
        assert!(e.contains("--memory-backend memfd"), "{e}");
        ram.hand_out(true).unwrap();
        ram.release();
        assert!(ram.released());
        assert!(ram.hand_out(true).is_err());
    }
}
