//! The target's side of a channel: a listening socket, or a channel already open.

use std::fs::File;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{Channel, Connection, Uri};
use crate::{MigrateError, Result};

/// The target's endpoint: a listening socket, or a channel that is already open.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    Open(Mutex<Option<Channel>>),
}

impl Listener {
    /// Binds a socket (a stale unix socket file is replaced), opens the file or descriptor, or
    /// starts the command, so that errors reach the caller now.
    pub fn bind(uri: &Uri, fd: Option<OwnedFd>) -> Result<Listener> {
        let open = |c: Channel| Ok(Listener::Open(Mutex::new(Some(c))));
        match uri {
            Uri::Tcp(h, p) => Ok(Listener::Tcp(
                TcpListener::bind((h.as_str(), *p))
                    .map_err(MigrateError::io(format!("listening on {uri}")))?,
            )),
            Uri::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Ok(Listener::Unix(
                    UnixListener::bind(p)
                        .map_err(MigrateError::io(format!("listening on {uri}")))?,
                    p.clone(),
                ))
            }
            Uri::File(p) => open(Channel::plain(Connection::file(
                File::open(p).map_err(MigrateError::io(format!("opening {}", p.display())))?,
            ))),
            Uri::Fd(_) => {
                let fd =
                    fd.ok_or_else(|| MigrateError::Vm(format!("{uri}: no such descriptor")))?;
                open(Channel::plain(
                    Connection::from_fd(fd).map_err(MigrateError::io(uri.to_string()))?,
                ))
            }
            Uri::Exec(cmd) => open(Channel::command(cmd, false)?),
        }
    }

    /// Whether another connection can come after one was refused (a listening socket; not an
    /// already open descriptor, file or command).
    pub fn reusable(&self) -> bool {
        !matches!(self, Listener::Open(_))
    }

    /// Waits for the source, or until `cancelled()` says to stop (checked every 100 ms: a
    /// `migrate_cancel` or `quit` on a target that is still waiting for its source).
    pub fn accept_unless(&self, cancelled: &dyn Fn() -> bool) -> Result<Channel> {
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Open(_) => return self.accept(),
        };
        loop {
            if cancelled() {
                return Err(MigrateError::Cancelled);
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call; the listener outlives it.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n > 0 {
                return self.accept();
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(MigrateError::io("waiting for the migration")(e));
                }
            }
        }
    }

    /// Waits for the source.
    pub fn accept(&self) -> Result<Channel> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l
                    .accept()
                    .map_err(MigrateError::io("accepting the migration"))?;
                s.set_nodelay(true)
                    .map_err(MigrateError::io("TCP_NODELAY"))?;
                Ok(Channel::plain(Connection::tcp(s)))
            }
            Listener::Unix(l, _) => Ok(Channel::plain(Connection::unix(
                l.accept()
                    .map_err(MigrateError::io("accepting the migration"))?
                    .0,
            ))),
            Listener::Open(c) => c
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .ok_or_else(|| MigrateError::Vm("this channel was used already".into())),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}
