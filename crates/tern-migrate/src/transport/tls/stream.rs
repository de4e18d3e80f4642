//! An established TLS session shared by a connection's handles: the sender writes, the
//! return-path thread reads, the canceller shuts the socket down, each from its own thread.
//!
//! Locks: `reading` (one reader), `writing` (one writer, held across the socket write, so that
//! records leave in the order rustls numbered them), `state` (the rustls session, held only to
//! encrypt or decrypt, never across socket I/O). Order: `reading` → `writing` → `state`. A
//! reader blocked on the socket holds only `reading`, so writers go on; a writer blocked on a
//! full socket holds `writing`, and a reader that must answer (an alert) waits for it — its
//! output stays queued in the session meanwhile, and whoever drains next sends it first, so
//! records never leave out of order.
//!
//! End of input: the migration stream frames and checksums its own records and ends with END,
//! so a connection closed without TLS's close_notify is reported as a plain end of input, the
//! way an unencrypted one is (a truncation is caught by the stream, with its offset).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard, TryLockError};

/// The socket under a TLS session.
#[derive(Debug)]
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        }
    }
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }
    pub fn set_write_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Read for &Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => (&mut &*s).read(buf),
            Sock::Unix(s) => (&mut &*s).read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => (&mut &*s).write(buf),
            Sock::Unix(s) => (&mut &*s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Ciphertext read from the socket and not yet given to rustls.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// An established TLS session, shared by the connection's handles.
pub struct TlsStream {
    pub(in crate::transport) sock: Sock,
    state: Mutex<rustls::Connection>,
    writing: Mutex<()>,
    reading: Mutex<Pending>,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.sock)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes what rustls has to send.
fn drain(c: &mut rustls::Connection) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out)?;
    }
    Ok(out)
}

impl TlsStream {
    pub(super) fn new(sock: Sock, conn: rustls::Connection) -> TlsStream {
        TlsStream {
            sock,
            state: Mutex::new(conn),
            writing: Mutex::new(()),
            reading: Mutex::new(Pending::default()),
        }
    }

    /// Sends what the session has queued (an alert after a failure), in order with writers.
    fn flush_queued(&self) -> io::Result<()> {
        let _w = lock(&self.writing);
        let out = drain(&mut lock(&self.state))?;
        (&self.sock).write_all(&out)
    }

    /// Tells the peer we are done (close_notify) if no writer is in the middle of a write (a
    /// canceller must never wait for a writer blocked on the socket), then shuts `how` down.
    pub(in crate::transport) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if how != Shutdown::Read {
            let w = match self.writing.try_lock() {
                Ok(w) => Some(w),
                Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(_w) = w {
                let out = {
                    let mut c = lock(&self.state);
                    c.send_close_notify();
                    drain(&mut c)
                };
                if let Ok(out) = out {
                    let _ = (&self.sock).write_all(&out);
                }
            }
        }
        self.sock.shutdown(how)
    }
}

impl Read for &TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut p = lock(&self.reading);
        loop {
            {
                let mut c = lock(&self.state);
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The peer closed without close_notify: the end of input (see the module).
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if p.start < p.end {
                    // Ciphertext we have: give rustls what it takes, decrypt, and look again.
                    let mut slice = &p.buf[p.start..p.end];
                    let before = slice.len();
                    c.read_tls(&mut slice)?;
                    if slice.len() == before {
                        return Err(io::Error::other("TLS: the session takes no more input"));
                    }
                    p.start += before - slice.len();
                    let processed = c.process_new_packets().map_err(io::Error::other);
                    let answer = c.wants_write();
                    drop(c);
                    if answer {
                        // An alert describing a failure, or a key update's answer: best effort.
                        let _ = self.flush_queued();
                    }
                    processed?;
                    continue;
                }
            }
            // Nothing decrypted and nothing pending: wait for the socket, outside the state lock.
            if p.buf.len() < 64 << 10 {
                p.buf.resize(64 << 10, 0);
            }
            let n = (&self.sock).read(&mut p.buf)?;
            if n == 0 {
                return Ok(0);
            }
            p.start = 0;
            p.end = n;
        }
    }
}

impl Write for &TlsStream {
    /// Encrypts what rustls takes of `buf` and writes it out. A write that fails (a timeout)
    /// leaves the session unusable: the records it had numbered are lost; every caller gives
    /// the connection up then.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _w = lock(&self.writing);
        let (n, out) = {
            let mut c = lock(&self.state);
            let n = c.writer().write(buf)?;
            (n, drain(&mut c)?)
        };
        (&self.sock).write_all(&out)?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
