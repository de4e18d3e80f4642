//! The TCP workload: a sink on port 5001 that checks every byte it receives and a source on
//! port 5002 that sends as fast as the peer takes it. Both carry the same stream: little-endian
//! u64 counters 0, 1, 2, ..., so the byte at stream offset `o` is
//! `(o / 8).to_le_bytes()[o % 8]`. Each port has one socket, listening again once a connection
//! is over (a new connection starts at offset 0; a second client meanwhile is refused).

use core::fmt::Write;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{Socket, State};

use crate::{rdtsc, Line, Monitor};

pub const SINK_PORT: u16 = 5001;
pub const SOURCE_PORT: u16 = 5002;

/// The stream's byte at offset `o`.
fn want(o: u64) -> u8 {
    (o / 8).to_le_bytes()[(o % 8) as usize]
}

/// The first byte of `b` (which starts at stream offset `off`) that is not the stream's, as
/// (offset, got, want).
fn check(off: u64, b: &[u8]) -> Option<(u64, u8, u8)> {
    let mut i = 0;
    // Byte by byte to a word boundary, a word at a time, then the tail byte by byte.
    while i < b.len() && !(off + i as u64).is_multiple_of(8) {
        if b[i] != want(off + i as u64) {
            return Some((off + i as u64, b[i], want(off + i as u64)));
        }
        i += 1;
    }
    while i + 8 <= b.len() {
        let w = (off + i as u64) / 8;
        if b[i..i + 8] != w.to_le_bytes() {
            break; // The loop below finds the byte.
        }
        i += 8;
    }
    while i < b.len() {
        let o = off + i as u64;
        if b[i] != want(o) {
            return Some((o, b[i], want(o)));
        }
        i += 1;
    }
    None
}

/// Fills `b` with the stream from offset `off`.
fn fill(off: u64, b: &mut [u8]) {
    let mut i = 0;
    while i < b.len() && !(off + i as u64).is_multiple_of(8) {
        b[i] = want(off + i as u64);
        i += 1;
    }
    while i + 8 <= b.len() {
        b[i..i + 8].copy_from_slice(&((off + i as u64) / 8).to_le_bytes());
        i += 8;
    }
    while i < b.len() {
        b[i] = want(off + i as u64);
        i += 1;
    }
}

/// Listens again once the socket is closed (or in TIME-WAIT, which `listen` ends).
fn relisten(s: &mut Socket, port: u16) {
    if !s.is_open() {
        // Cannot fail: the socket is not open and the port is not 0.
        let _ = s.listen(port);
    }
}

/// Port 5001: receives the stream and checks every byte.
pub struct Sink {
    handle: SocketHandle,
    /// A connection is in progress (from SYN-RECEIVED until it is closed or reset).
    conn: bool,
    /// Bytes of this connection received and checked.
    off: u64,
    failed: bool,
    /// Bytes of earlier connections.
    done: u64,
}

impl Sink {
    pub fn new(handle: SocketHandle) -> Sink {
        Sink {
            handle,
            conn: false,
            off: 0,
            failed: false,
            done: 0,
        }
    }

    /// Bytes received over all connections.
    pub fn handle(&self) -> SocketHandle {
        self.handle
    }

    pub fn total(&self) -> u64 {
        self.done + self.off
    }

    pub fn step(&mut self, sockets: &mut SocketSet, mon: &mut Monitor) {
        let s = sockets.get_mut::<Socket>(self.handle);
        if s.is_active() && !self.conn {
            self.conn = true;
            self.off = 0;
            self.failed = false;
        }
        // The receive buffer is a ring: at most two contiguous pieces.
        for _ in 0..2 {
            if !s.can_recv() {
                break;
            }
            let (off, failed) = (self.off, self.failed);
            let Ok((n, bad)) = s.recv(|b| {
                let bad = if failed { None } else { check(off, b) };
                (b.len(), (b.len(), bad))
            }) else {
                break;
            };
            self.off += n as u64;
            if let Some((o, got, want)) = bad {
                self.failed = true;
                report!(
                    mon,
                    "tern-guest net FAIL sink offset={} got={} want={}",
                    o,
                    got,
                    want
                );
            }
        }
        // The client has finished sending and we have everything: close our half too.
        if s.state() == State::CloseWait && !s.can_recv() {
            s.close();
        }
        if self.conn && !s.is_active() {
            self.conn = false;
            self.done += self.off;
            report!(mon, "tern-guest net sink closed bytes={}", self.off);
            self.off = 0;
        }
        relisten(s, SINK_PORT);
    }
}

/// Port 5002: sends the stream until the client closes.
pub struct Source {
    handle: SocketHandle,
    conn: bool,
    /// Bytes of this connection handed to the socket, and of those the peer acknowledged.
    off: u64,
    acked: u64,
    done: u64,
    /// The socket's state at the last step.
    prev: State,
}

impl Source {
    pub fn new(handle: SocketHandle) -> Source {
        Source {
            handle,
            conn: false,
            off: 0,
            acked: 0,
            done: 0,
            prev: State::Closed,
        }
    }

    /// Bytes the peer acknowledged, over all connections.
    pub fn total(&self) -> u64 {
        self.done + self.acked
    }

    pub fn handle(&self) -> SocketHandle {
        self.handle
    }

    pub fn step(&mut self, sockets: &mut SocketSet, mon: &mut Monitor) {
        let s = sockets.get_mut::<Socket>(self.handle);
        if s.is_active() && !self.conn {
            self.conn = true;
            self.off = 0;
            self.acked = 0;
        }
        // Whatever the client sends is discarded.
        for _ in 0..2 {
            if !s.can_recv() || s.recv(|b| (b.len(), ())).is_err() {
                break;
            }
        }
        if s.state() == State::CloseWait {
            // The client closed: stop sending (what is queued still goes out before our FIN).
            s.close();
        } else {
            // The transmit buffer is a ring: at most two contiguous pieces free.
            for _ in 0..2 {
                if !s.can_send() {
                    break;
                }
                let off = self.off;
                let Ok(n) = s.send(|b| {
                    fill(off, b);
                    (b.len(), b.len())
                }) else {
                    break;
                };
                self.off += n as u64;
            }
        }
        if s.is_active() {
            // What left the transmit buffer was acknowledged (a reset empties it: not counted).
            self.acked = self.off - s.send_queue() as u64;
        }
        if self.conn && !s.is_active() && matches!(self.prev, State::LastAck | State::Closing) {
            // Our FIN was acknowledged, and with it everything before it.
            self.acked = self.off;
        }
        self.prev = s.state();
        if self.conn && !s.is_active() {
            self.conn = false;
            self.done += self.acked;
            report!(mon, "tern-guest net source closed bytes={}", self.acked);
            self.acked = 0;
            self.off = 0;
        }
        relisten(s, SOURCE_PORT);
    }
}
