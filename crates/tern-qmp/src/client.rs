//! One QMP client: what it sent (bytes and passed descriptors) and what it is sent (replies and
//! events, through a bounded queue that its own writer thread drains).
//!
//! Nothing that emits an event ever waits for a client: `emit` only queues, and a client whose
//! queue is full (it stopped reading) is dropped, so a stalled client cannot hold up STOP,
//! RESUME, a migration's events or the SHUTDOWN that `quit` waits for.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::format::to_qemu_json;

/// Messages a client may leave unread before it is dropped.
pub const MAX_QUEUED: usize = 1024;
/// Bytes a client may leave unread before it is dropped.
pub const MAX_QUEUED_BYTES: usize = 8 << 20;
/// At most this many passed descriptors wait for a `getfd`; more are closed.
pub const MAX_PENDING_FDS: usize = 16;

#[derive(Default)]
struct Outbox {
    lines: VecDeque<String>,
    bytes: usize,
    /// A line taken by the writer and not yet fully written.
    writing: bool,
    closed: bool,
}

pub(crate) struct Client {
    stream: UnixStream,
    outbox: Mutex<Outbox>,
    changed: Condvar,
    pub(crate) negotiated: AtomicBool,
    /// Descriptors that came with the input (SCM_RIGHTS), for the next `getfd`.
    pub(crate) received: Arc<Mutex<Vec<File>>>,
}

impl Client {
    /// A client on `stream`, with its writer thread started.
    pub(crate) fn start(stream: &UnixStream) -> io::Result<Arc<Client>> {
        let client = Arc::new(Client {
            stream: stream.try_clone()?,
            outbox: Mutex::new(Outbox::default()),
            changed: Condvar::new(),
            negotiated: AtomicBool::new(false),
            received: Arc::new(Mutex::new(Vec::new())),
        });
        // The writer wakes now and then to notice a drop while a write is stuck.
        client
            .stream
            .set_write_timeout(Some(Duration::from_millis(200)))?;
        let c = client.clone();
        std::thread::Builder::new()
            .name("qmp-writer".into())
            .spawn(move || c.write_loop())?;
        Ok(client)
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `v` for the client; a client that has let its queue fill up is dropped instead.
    pub(crate) fn send(&self, v: &Value) {
        let mut line = to_qemu_json(v);
        line.push_str("\r\n");
        let mut out = self.outbox();
        if out.closed {
            return;
        }
        if out.lines.len() >= MAX_QUEUED || out.bytes + line.len() > MAX_QUEUED_BYTES {
            tracing::warn!(
                queued = out.lines.len(),
                bytes = out.bytes,
                "a QMP client does not read what it is sent; dropped"
            );
            drop(out);
            self.close();
            return;
        }
        out.bytes += line.len();
        out.lines.push_back(line);
        self.changed.notify_all();
    }

    /// Drops the connection: both threads of the session end.
    pub(crate) fn close(&self) {
        self.outbox().closed = true;
        self.changed.notify_all();
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.outbox().closed
    }

    /// Waits until everything queued has been written, the client is gone, or `deadline`.
    pub(crate) fn flush(&self, deadline: Instant) {
        let mut out = self.outbox();
        while !out.closed && (out.writing || !out.lines.is_empty()) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            out = self
                .changed
                .wait_timeout(out, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn write_loop(&self) {
        loop {
            let line = {
                let mut out = self.outbox();
                loop {
                    if out.closed {
                        return;
                    }
                    if let Some(l) = out.lines.pop_front() {
                        out.bytes -= l.len();
                        out.writing = true;
                        break l;
                    }
                    out = self.changed.wait(out).unwrap_or_else(|e| e.into_inner());
                }
            };
            let ok = self.write_fully(line.as_bytes());
            self.outbox().writing = false;
            self.changed.notify_all();
            if !ok {
                self.close();
                return;
            }
        }
    }

    /// Writes all of `bytes`, waiting as long as the client is not dropped.
    fn write_fully(&self, bytes: &[u8]) -> bool {
        let mut done = 0;
        let mut stream = &self.stream;
        while done < bytes.len() {
            match stream.write(&bytes[done..]) {
                Ok(0) => return false,
                Ok(n) => done += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    if self.is_closed() {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        true
    }
}

/// Reads a QMP session's bytes and keeps the descriptors passed along with them.
pub(crate) struct FdReader {
    pub(crate) stream: UnixStream,
    pub(crate) received: Arc<Mutex<Vec<File>>>,
}

/// Descriptors one `recvmsg` may bring (more are closed by the kernel: MSG_CTRUNC).
const FDS_PER_READ: usize = 8;

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (n, fds) = recv_with_fds(&self.stream, buf)?;
        if !fds.is_empty() {
            let mut r = self.received.lock().unwrap_or_else(|e| e.into_inner());
            for fd in fds {
                if r.len() < MAX_PENDING_FDS {
                    r.push(File::from(fd));
                } else {
                    tracing::warn!(
                        "{MAX_PENDING_FDS} passed descriptors await getfd; one more closed"
                    );
                }
            }
        }
        Ok(n)
    }
}

/// `recvmsg` that takes every descriptor passed with the bytes, close-on-exec from the start
/// (MSG_CMSG_CLOEXEC), so that no `exec:` migration's command can inherit one even for a moment.
/// Written here because `vmm-sys-util`'s `recv_with_fd` takes one descriptor and without the
/// flag.
pub(crate) fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    const SPACE: usize = FDS_PER_READ * std::mem::size_of::<libc::c_int>();
    // Aligned for cmsghdr; CMSG_SPACE(SPACE) fits with room to spare.
    let mut control = [0u64; (SPACE + 64) / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid (null pointers, zero lengths); fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(SPACE as u32) } as usize;
    let n = loop {
        // SAFETY: msg points at `iov` (over `buf`) and `control`, both alive and large enough
        // for the lengths given; the kernel writes only within them.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk its control buffer within
    // msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is a header inside the control buffer (checked non-null above).
        let (level, kind, len) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) only computes a size.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(header) / std::mem::size_of::<libc::c_int>();
            // SAFETY: the data of an SCM_RIGHTS header holds `count` descriptors.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            for i in 0..count {
                // SAFETY: within the header's data (see count); read unaligned as the buffer
                // gives no alignment promise for the ints.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel installed `fd` for us with this message: we own it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    #[test]
    fn passed_descriptors_arrive_close_on_exec_and_are_bounded() {
        let (a, b) = UnixStream::pair().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let mut r = FdReader {
            stream: a,
            received: received.clone(),
        };
        let (x, _y) = UnixStream::pair().unwrap();
        b.send_with_fds(&[&b"{}\n"[..]], &[x.as_raw_fd(), x.as_raw_fd()])
            .unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(r.read(&mut buf).unwrap(), 3);
        let got = received.lock().unwrap();
        assert_eq!(got.len(), 2, "both descriptors of one message");
        for f in got.iter() {
            // SAFETY: F_GETFD on a descriptor we own.
            let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
        drop(got);
        for _ in 0..MAX_PENDING_FDS {
            b.send_with_fd(&b"x"[..], x.as_raw_fd()).unwrap();
            assert_eq!(r.read(&mut buf).unwrap(), 1);
        }
        assert_eq!(received.lock().unwrap().len(), MAX_PENDING_FDS);
    }

    #[test]
    fn a_client_that_stops_reading_is_dropped_never_waited_for() {
        let (a, b) = UnixStream::pair().unwrap();
        let c = Client::start(&a).unwrap();
        let line = serde_json::json!({"event": "X", "data": "y".repeat(4096)});
        let t0 = Instant::now();
        for _ in 0..10 * MAX_QUEUED {
            c.send(&line);
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "send never waits");
        assert!(c.is_closed(), "dropped once its queue was full");
        // The peer sees the connection end after what fitted in the socket.
        let mut sink = Vec::new();
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (&b).read_to_end(&mut sink).unwrap();
        assert!(!sink.is_empty());
    }
}
