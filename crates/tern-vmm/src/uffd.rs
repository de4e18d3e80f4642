//! userfaultfd(2) for postcopy: guest RAM is registered for MISSING faults, a thread reads which
//! pages the guest (or KVM on its behalf) touched, and pages are placed whole and atomically with
//! `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`, which also wake whoever waits for them.
//!
//! Why MISSING + COPY and not MINOR + CONTINUE: tern's default guest RAM is private anonymous
//! memory, for which only MISSING faults exist; COPY allocates and fills the page in one step, so
//! the target pays no separate first touch. (MINOR + CONTINUE needs shared memory with a second
//! mapping to fill; Cloud Hypervisor took it for memfd THP mappings, where waking a MISSING fault
//! let KVM map a 2 MiB entry over a 4 KiB page. Placing with COPY installs 4 KiB pages, and
//! this host has shared-memory THP off.) Reserved huge pages (memfd-hugetlb) would need 2 MiB
//! placements: postcopy refuses that backing.
//!
//! The `userfaultfd` crate would do this but its -sys crate runs bindgen, which needs libclang
//! at build time (not on this project's machines); the kernel ABI used here is four ioctls and
//! one 32-byte message, declared by hand from `linux/userfaultfd.h`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
/// Fault messages carry the faulting thread's id.
const FEATURE_THREAD_ID: u64 = 1 << 8;
/// MISSING faults on shared memory (memfd) too.
const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const REGISTER_MODE_MISSING: u64 = 1;
const EVENT_PAGEFAULT: u8 = 0x12;
const PAGE: u64 = 4096;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

ioctl_iowr_nr!(UFFDIO_API_IOCTL, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);

/// One fault: the page's host address (page aligned) and the thread that waits on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub addr: u64,
    pub tid: u32,
}

/// What a placement found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// The page is in place now.
    Done,
    /// It was there already (placed earlier, or never dropped): nothing changed.
    Present,
}

/// A userfaultfd with guest RAM registered on it.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    /// Signalled by [`Userfault::interrupt`]: ends a [`Userfault::faults`] wait at once.
    wake: EventFd,
}

fn os_err(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl Userfault {
    /// Opens a userfaultfd that reports faults from the kernel too (KVM touches guest memory on
    /// the vCPUs' behalf), non-blocking, with the features postcopy needs. Fails, naming why,
    /// where the host does not allow it (no privilege and `vm.unprivileged_userfaultfd` = 0).
    pub fn open(shared: bool) -> std::io::Result<Userfault> {
        // SAFETY: the syscall takes only flags; the result is checked.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(os_err("userfaultfd(2)"));
        }
        // SAFETY: a new descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: FEATURE_THREAD_ID | if shared { FEATURE_MISSING_SHMEM } else { 0 },
            ioctls: 0,
        };
        // SAFETY: a userfaultfd; the kernel reads and writes the struct we own.
        if unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API_IOCTL(), &mut api) } < 0 {
            return Err(os_err("UFFDIO_API"));
        }
        let wake = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        Ok(Userfault { fd, wake })
    }

    /// Registers `[addr, addr + len)` for MISSING faults: from now on a touch of a page that is
    /// not there waits until it is placed.
    pub fn register(&self, addr: u64, len: u64) -> std::io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: a userfaultfd; the kernel reads and writes the struct we own and only records
        // the range (a mapping of ours).
        if unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut r) } < 0 {
            return Err(os_err("UFFDIO_REGISTER"));
        }
        Ok(())
    }

    /// Ends fault handling for the range; threads waiting on it are woken and fault normally
    /// (a missing page of anonymous memory is then a zero page).
    pub fn unregister(&self, addr: u64, len: u64) -> std::io::Result<()> {
        let r = UffdioRange { start: addr, len };
        // SAFETY: a userfaultfd; the kernel reads the struct.
        if unsafe { ioctl_with_ref(&self.fd, UFFDIO_UNREGISTER(), &r) } < 0 {
            return Err(os_err("UFFDIO_UNREGISTER"));
        }
        Ok(())
    }

    /// Ends the current (or the next) [`Userfault::faults`] wait at once: the thread that serves
    /// faults is stopping, and should not sleep out its poll timeout on the way.
    pub fn interrupt(&self) {
        if let Err(e) = self.wake.write(1) {
            tracing::debug!("waking the postcopy fault thread: {e}");
        }
    }

    /// Places `data` (whole pages) at `dst` atomically and wakes the threads waiting on them;
    /// pages already mapped are left as they are and the others still placed. `data` is a
    /// buffer of ours, not guest memory. `Present` if any page was there already.
    pub fn copy(&self, dst: u64, data: &[u8]) -> std::io::Result<Placed> {
        let mut c = UffdioCopy {
            dst,
            src: data.as_ptr() as u64,
            len: data.len() as u64,
            mode: 0,
            copy: 0,
        };
        let mut placed = Placed::Done;
        while c.len > 0 {
            // SAFETY: a userfaultfd; the kernel reads `len` bytes at `src` (inside our buffer,
            // alive for the call) and fills pages at `dst` only where none is mapped, inside a
            // registered range of guest RAM.
            let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY(), &mut c) };
            let done = if ret >= 0 {
                c.len
            } else {
                match std::io::Error::last_os_error().raw_os_error() {
                    // Stopped part way at a page that exists (or interrupted): what was done
                    // is in `copy`; an existing page is skipped and the rest placed.
                    Some(libc::EAGAIN) if c.copy > 0 => c.copy as u64,
                    Some(libc::EAGAIN) => 0,
                    Some(libc::EEXIST) => {
                        placed = Placed::Present;
                        PAGE
                    }
                    _ => return Err(os_err("UFFDIO_COPY")),
                }
            };
            c.dst += done;
            c.src += done;
            c.len -= done;
            c.copy = 0;
        }
        Ok(placed)
    }

    /// Places zero pages over `[dst, dst + len)` and wakes the threads waiting on them.
    pub fn zero(&self, dst: u64, len: u64) -> std::io::Result<Placed> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        let mut placed = Placed::Done;
        while z.range.len > 0 {
            // SAFETY: a userfaultfd; the kernel maps zero pages only where none is mapped,
            // inside a registered range of guest RAM.
            let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_ZEROPAGE(), &mut z) };
            let done = if ret >= 0 {
                z.range.len
            } else {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) if z.zeropage > 0 => z.zeropage as u64,
                    Some(libc::EAGAIN) => 0,
                    // A page that exists is skipped; the rest still placed.
                    Some(libc::EEXIST) => {
                        placed = Placed::Present;
                        PAGE
                    }
                    _ => return Err(os_err("UFFDIO_ZEROPAGE")),
                }
            };
            z.range.start += done;
            z.range.len -= done;
            z.zeropage = 0;
        }
        Ok(placed)
    }

    /// Waits up to `timeout_ms` for faults and returns those that came (none on a timeout).
    pub fn faults(&self, timeout_ms: i32) -> std::io::Result<Vec<Fault>> {
        let mut pfd = [self.fd.as_raw_fd(), self.wake.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two pollfds in an array we own, its length given.
        let n = unsafe { libc::poll(pfd.as_mut_ptr(), pfd.len() as libc::nfds_t, timeout_ms) };
        if pfd[1].revents != 0 {
            // Consumed, so that the next wait waits again; faults pending are read below.
            let _ = self.wake.read();
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => Ok(Vec::new()),
                _ => Err(os_err("poll on the userfaultfd")),
            };
        }
        let mut out = Vec::new();
        let mut buf = [0u8; 32 * 64];
        loop {
            // SAFETY: reads at most `buf.len()` bytes into our buffer.
            let got =
                unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if got < 0 {
                return match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(out),
                    _ => Err(os_err("reading the userfaultfd")),
                };
            }
            // struct uffd_msg: u8 event, 7 bytes reserved, then for a page fault u64 flags,
            // u64 address, u32 ptid.
            for m in buf[..got as usize].chunks_exact(32) {
                if m[0] != EVENT_PAGEFAULT {
                    continue;
                }
                let addr = u64::from_le_bytes(m[16..24].try_into().expect("8"));
                let tid = u32::from_le_bytes(m[24..28].try_into().expect("4"));
                out.push(Fault {
                    addr: addr & !0xfff,
                    tid,
                });
            }
            if (got as usize) < buf.len() {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run that meets a page already in place places all the others (a page both requested
    /// and scanned arrives twice, in runs that overlap).
    #[test]
    fn a_copy_over_a_present_page_places_the_rest() {
        let len = 4 * PAGE as usize;
        // SAFETY: a fresh private anonymous mapping of our own, unmapped at the end.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let at = base as u64;
        let uf =
            Userfault::open(false).expect("userfaultfd (root, or vm.unprivileged_userfaultfd)");
        uf.register(at, len as u64).unwrap();
        assert_eq!(
            uf.copy(at + PAGE, &[7u8; PAGE as usize]).unwrap(),
            Placed::Done
        );
        let data: Vec<u8> = (0..4u8).flat_map(|p| [p + 1; PAGE as usize]).collect();
        assert_eq!(uf.copy(at, &data).unwrap(), Placed::Present);
        assert_eq!(uf.zero(at, len as u64).unwrap(), Placed::Present);
        uf.unregister(at, len as u64).unwrap();
        // SAFETY: the mapping is ours and fully populated now; read it, then unmap it.
        let got = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
        let firsts: Vec<u8> = got.chunks(PAGE as usize).map(|p| p[0]).collect();
        assert_eq!(firsts, vec![1, 7, 3, 4], "page 1 kept, the others placed");
        // SAFETY: unmapping our own mapping, not used after.
        unsafe { libc::munmap(base, len) };
    }

    /// `interrupt` ends a wait at once (and only that one: the next wait waits again).
    #[test]
    fn an_interrupt_ends_the_wait_for_faults() {
        let uf = Userfault::open(false).unwrap();
        let t = std::time::Instant::now();
        assert!(uf.faults(20).unwrap().is_empty());
        assert!(t.elapsed() >= std::time::Duration::from_millis(15));
        uf.interrupt();
        let t = std::time::Instant::now();
        assert!(uf.faults(10_000).unwrap().is_empty());
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
        let t = std::time::Instant::now();
        assert!(uf.faults(20).unwrap().is_empty());
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(15),
            "the wake was consumed"
        );
    }
}
