//! The monitor sockets: who may connect, what happens to a path another process serves, and an
//! accept loop that never spins.
//!
//! The monitor can run shell commands (`exec:` migrations), create and replace files and write
//! guest RAM, so its sockets are created with mode 0600 (the owner only) unless the operator
//! widens it; the mode is set on a temporary name before the socket appears at its path, so no
//! other user can connect in between.

use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The default mode of a monitor socket.
pub const DEFAULT_MODE: u32 = 0o600;

/// Binds a unix socket at `path` with `mode`. A stale socket file (nobody listening) is replaced;
/// a path where another process listens, or that is not a socket, is refused.
pub fn bind_private(path: &Path, mode: u32) -> io::Result<UnixListener> {
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another process listens on {} (is another tern running with it?)",
                path.display()
            ),
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a socket path names a file"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.bind", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// The sessions of one socket, counted against a limit.
#[derive(Debug, Clone)]
pub struct Slots {
    used: Arc<AtomicUsize>,
    max: usize,
}

/// One session's place among its socket's [`Slots`], given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Slots {
    /// At most `max` sessions at once.
    pub fn new(max: usize) -> Self {
        Slots {
            used: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// A place for one more session, if there is one.
    pub fn take(&self) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.used.clone()))
    }
}

/// Accepts connections for ever, handing each to `serve` with its slot. A connection beyond the
/// limit of `slots` is sent `refusal` and closed. An accept that fails (out of descriptors:
/// EMFILE) is retried after a pause instead of at once, so the loop never spins.
pub fn accept_loop(
    listener: UnixListener,
    what: &str,
    slots: &Slots,
    refusal: &[u8],
    mut serve: impl FnMut(UnixStream, Slot),
) {
    let mut warned = false;
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                warned = false;
                match slots.take() {
                    Some(slot) => serve(s, slot),
                    None => {
                        tracing::warn!("{what}: {} sessions already; one more refused", slots.max);
                        // A new socket's buffer takes the few bytes at once; never wait here.
                        let _ = s.set_nonblocking(true);
                        let _ = (&s).write_all(refusal);
                    }
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!("{what}: accept failed ({e}); retrying every 100 ms");
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_sockets_refuse_live_paths_and_replace_stale_ones() {
        let d = std::env::temp_dir().join(format!("tern-listen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("m.sock");
        let l = bind_private(&p, DEFAULT_MODE).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = bind_private(&p, DEFAULT_MODE).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        drop(l);
        // Stale now: replaced, with a wider mode if asked.
        let _l = bind_private(&p, 0o660).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let f = d.join("plain");
        std::fs::write(&f, b"keep me").unwrap();
        assert!(bind_private(&f, DEFAULT_MODE).is_err());
        assert_eq!(std::fs::read(&f).unwrap(), b"keep me");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn slots_count_sessions_up_to_the_limit() {
        let slots = Slots::new(2);
        let a = slots.take().unwrap();
        let _b = slots.take().unwrap();
        assert!(slots.take().is_none());
        drop(a);
        assert!(slots.take().is_some());
    }
}
