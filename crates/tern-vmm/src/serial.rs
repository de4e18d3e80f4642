//! The 16550 UART at 0x3f8 (IRQ 4), from vm-superio, and where its output goes.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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

/// Line-buffered sink for the UART.
pub struct SerialSink {
    line: Vec<u8>,
    target: Target,
}

enum Target {
    Stdout,
    File(File),
    Unix(Arc<Mutex<Option<UnixStream>>>),
    Null,
}

impl SerialSink {
    /// Opens the output (for a unix socket: binds it and accepts clients in the background).
    pub fn open(out: &SerialOutput) -> io::Result<Self> {
        let target = match out {
            SerialOutput::Stdio => Target::Stdout,
            SerialOutput::Null => Target::Null,
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
                                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
                            }
                        }
                    })?;
                Target::Unix(client)
            }
        };
        Ok(SerialSink {
            line: Vec::with_capacity(256),
            target,
        })
    }

    /// A sink that drops everything.
    pub fn null() -> Self {
        SerialSink {
            line: Vec::new(),
            target: Target::Null,
        }
    }

    fn emit(&mut self) {
        let line = std::mem::take(&mut self.line);
        let res = match &mut self.target {
            Target::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&line).and_then(|_| out.flush())
            }
            Target::File(f) => f.write_all(&line),
            Target::Unix(c) => {
                let mut guard = c.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_mut().map(|s| s.write_all(&line)) {
                    Some(Err(_)) => {
                        *guard = None;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            Target::Null => Ok(()),
        };
        if let Err(e) = res {
            tracing::warn!("serial output: {e}");
        }
        self.line = line;
        self.line.clear();
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
