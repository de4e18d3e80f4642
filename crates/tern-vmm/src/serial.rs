//! The 16550 UART at 0x3f8 (IRQ 4), from vm-superio, and where its output goes.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Its legacy interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Where the guest's serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// A listening unix socket; output goes to the connected client (dropped while none is).
    Unix(PathBuf),
    /// Nowhere.
    Null,
}

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Console output the writer has not written yet, at most; beyond it output is dropped (and
/// counted) rather than the vCPU waiting.
pub const MAX_BUFFERED: usize = 1 << 20;

/// Line-buffered sink for the UART. A vCPU never waits on the console: completed lines go to a
/// bounded queue that a writer thread drains to the output, so an unread socket, a full pipe or
/// a stopped terminal stalls only that thread; what does not fit is dropped and counted.
pub struct SerialSink {
    line: Vec<u8>,
    console: Option<Arc<Console>>,
}

enum Target {
    Stdout,
    File(File),
    Unix(Arc<Mutex<Option<UnixStream>>>),
}

#[derive(Default)]
struct Queue {
    chunks: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Bytes dropped since the writer last said so.
    dropped: u64,
    /// A chunk taken by the writer and not yet written.
    busy: bool,
}

/// The queue between the UART and its writer thread.
struct Console {
    queue: Mutex<Queue>,
    changed: Condvar,
    /// Bytes dropped over the console's life.
    dropped_total: AtomicU64,
}

/// Every console of the process, for [`drain_consoles`] at exit.
static CONSOLES: Mutex<Vec<Weak<Console>>> = Mutex::new(Vec::new());

/// Waits (up to `timeout` in all) until every console has written what it queued: called before
/// the process exits, so that the guest's last lines are not lost.
pub fn drain_consoles(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let consoles: Vec<_> = CONSOLES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for c in consoles {
        c.drain(deadline);
    }
}

impl Console {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `chunk`, or drops and counts it if the queue is full. Never blocks on output.
    fn push(&self, chunk: Vec<u8>) {
        let mut q = self.lock();
        if q.bytes + chunk.len() > MAX_BUFFERED {
            q.dropped += chunk.len() as u64;
            self.dropped_total
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            return;
        }
        q.bytes += chunk.len();
        q.chunks.push_back(chunk);
        self.changed.notify_all();
    }

    fn drain(&self, deadline: Instant) {
        let mut q = self.lock();
        while q.busy || !q.chunks.is_empty() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            q = self
                .changed
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn write_loop(&self, mut target: Target) {
        loop {
            let (chunk, dropped) = {
                let mut q = self.lock();
                loop {
                    if let Some(c) = q.chunks.pop_front() {
                        q.bytes -= c.len();
                        q.busy = true;
                        break (c, std::mem::take(&mut q.dropped));
                    }
                    q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            if dropped > 0 {
                tracing::warn!(dropped, "console output nobody read was dropped");
                let note = format!("tern: {dropped} bytes of console output dropped (unread)\n");
                target.write(note.as_bytes());
            }
            target.write(&chunk);
            self.lock().busy = false;
            self.changed.notify_all();
        }
    }
}

impl Target {
    fn write(&mut self, bytes: &[u8]) {
        let res = match self {
            Target::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(bytes).and_then(|_| out.flush())
            }
            Target::File(f) => f.write_all(bytes),
            Target::Unix(c) => {
                let mut guard = c.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(Err(_)) = guard.as_mut().map(|s| s.write_all(bytes)) {
                    *guard = None;
                }
                Ok(())
            }
        };
        if let Err(e) = res {
            tracing::warn!("serial output: {e}");
        }
    }
}

impl SerialSink {
    /// Opens the output (for a unix socket: binds it and accepts clients in the background) and
    /// starts its writer thread.
    pub fn open(out: &SerialOutput) -> io::Result<Self> {
        let target = match out {
            SerialOutput::Stdio => Target::Stdout,
            SerialOutput::Null => return Ok(SerialSink::null()),
            SerialOutput::File(p) => Target::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            SerialOutput::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let listener = UnixListener::bind(p)?;
                let client = Arc::new(Mutex::new(None));
                let slot = client.clone();
                std::thread::Builder::new()
                    .name("serial-accept".into())
                    .spawn(move || {
                        for s in listener.incoming() {
                            match s {
                                Ok(s) => *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(s),
                                // Out of descriptors (EMFILE): wait rather than spin.
                                Err(_) => std::thread::sleep(Duration::from_millis(100)),
                            }
                        }
                    })?;
                Target::Unix(client)
            }
        };
        let console = Arc::new(Console {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            dropped_total: AtomicU64::new(0),
        });
        let c = console.clone();
        std::thread::Builder::new()
            .name("serial-out".into())
            .spawn(move || c.write_loop(target))?;
        let mut all = CONSOLES.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&console));
        Ok(SerialSink {
            line: Vec::with_capacity(256),
            console: Some(console),
        })
    }

    /// A sink that drops everything.
    pub fn null() -> Self {
        SerialSink {
            line: Vec::new(),
            console: None,
        }
    }

    /// Bytes of output dropped so far because nobody read them.
    pub fn dropped(&self) -> u64 {
        self.console
            .as_ref()
            .map_or(0, |c| c.dropped_total.load(Ordering::Relaxed))
    }

    fn emit(&mut self) {
        let line = std::mem::replace(&mut self.line, Vec::with_capacity(256));
        if let Some(c) = &self.console {
            c.push(line);
        }
    }
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= 4096 {
                self.emit();
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.line.is_empty() {
            self.emit();
        }
        Ok(())
    }
}

/// The UART device.
pub type SerialDevice = Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialSink>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unread_console_never_blocks_the_writer_and_counts_what_it_drops() {
        let d = std::env::temp_dir().join(format!("tern-serial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("console.sock");
        let mut sink = SerialSink::open(&SerialOutput::Unix(p.clone())).unwrap();
        // A client that connects and never reads.
        let client = UnixStream::connect(&p).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let line = [b'x'; 99].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        let t0 = Instant::now();
        for _ in 0..100_000 {
            sink.write_all(&line).unwrap();
        }
        sink.flush().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let dropped = sink.dropped();
        // 10 MB written; the socket holds a little and the queue 1 MiB: most was dropped.
        assert!(dropped > 5_000_000, "dropped {dropped}");
        // Reading now drains it, and a note says what was lost.
        let mut r = io::BufReader::new(client);
        let mut got = Vec::new();
        let mut l = String::new();
        r.get_ref()
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        while io::BufRead::read_line(&mut r, &mut l).is_ok_and(|n| n > 0) {
            got.push(std::mem::take(&mut l));
            if got.last().is_some_and(|x| x.contains("dropped")) {
                break;
            }
            sink.write_all(b"more\n").unwrap();
        }
        assert!(got
            .iter()
            .any(|x| x.starts_with("tern: ") && x.contains("dropped")));
        let _ = std::fs::remove_dir_all(&d);
    }
}
