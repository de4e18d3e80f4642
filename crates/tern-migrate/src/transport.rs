//! Transports: `tcp:HOST:PORT` and `unix:PATH`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use crate::{MigrateError, Result};

/// Where to migrate to or from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uri {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl Uri {
    /// Parses `tcp:HOST:PORT` (HOST may be `[v6]`) or `unix:PATH`.
    pub fn parse(s: &str) -> Result<Uri> {
        let bad = || MigrateError::BadUri(s.to_string());
        match s.split_once(':') {
            Some(("unix", p)) if !p.is_empty() => Ok(Uri::Unix(p.into())),
            Some(("tcp", rest)) => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let port: u16 = port.parse().map_err(|_| bad())?;
                if host.is_empty() {
                    return Err(bad());
                }
                Ok(Uri::Tcp(host.to_string(), port))
            }
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uri::Tcp(h, p) if h.contains(':') => write!(f, "tcp:[{h}]:{p}"),
            Uri::Tcp(h, p) => write!(f, "tcp:{h}:{p}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected migration channel.
#[derive(Debug)]
pub enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Connection {
    /// Connects to a listening target.
    pub fn connect(uri: &Uri) -> Result<Connection> {
        match uri {
            Uri::Tcp(h, p) => {
                let addrs: Vec<_> = (h.as_str(), *p)
                    .to_socket_addrs()
                    .map_err(MigrateError::io(format!("resolving {uri}")))?
                    .collect();
                let s = TcpStream::connect(&addrs[..])
                    .map_err(MigrateError::io(format!("connecting to {uri}")))?;
                // The stream's last records (device state, END) and the acknowledgement are small:
                // Nagle plus delayed ACK would add tens of ms to the downtime.
                s.set_nodelay(true)
                    .map_err(MigrateError::io("TCP_NODELAY"))?;
                Ok(Connection::Tcp(s))
            }
            Uri::Unix(p) => Ok(Connection::Unix(
                UnixStream::connect(p).map_err(MigrateError::io(format!("connecting to {uri}")))?,
            )),
        }
    }

    /// Another handle on the same channel (for the return path, or to cancel).
    pub fn try_clone(&self) -> io::Result<Connection> {
        Ok(match self {
            Connection::Tcp(s) => Connection::Tcp(s.try_clone()?),
            Connection::Unix(s) => Connection::Unix(s.try_clone()?),
        })
    }

    /// Shuts both directions down, waking any blocked reader or writer.
    pub fn shutdown(&self) {
        let _ = match self {
            Connection::Tcp(s) => s.shutdown(Shutdown::Both),
            Connection::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Limits how long a read may block.
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_read_timeout(t),
            Connection::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.read(buf),
            Connection::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write(buf),
            Connection::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A bound, listening target endpoint.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds (a stale unix socket file is replaced).
    pub fn bind(uri: &Uri) -> Result<Listener> {
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
        }
    }

    /// Waits for the source.
    pub fn accept(&self) -> Result<Connection> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l
                    .accept()
                    .map_err(MigrateError::io("accepting the migration"))?;
                s.set_nodelay(true)
                    .map_err(MigrateError::io("TCP_NODELAY"))?;
                Ok(Connection::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Connection::Unix(
                l.accept()
                    .map_err(MigrateError::io("accepting the migration"))?
                    .0,
            )),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!(
            Uri::parse("tcp:127.0.0.1:4444").unwrap(),
            Uri::Tcp("127.0.0.1".into(), 4444)
        );
        assert_eq!(
            Uri::parse("tcp:[::1]:5").unwrap(),
            Uri::Tcp("::1".into(), 5)
        );
        assert_eq!(
            Uri::parse("unix:/tmp/x").unwrap(),
            Uri::Unix("/tmp/x".into())
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "udp:1:2",
            "unix:",
            "file:/x",
        ] {
            assert!(Uri::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Uri::parse("tcp:[::1]:5").unwrap().to_string(),
            "tcp:[::1]:5"
        );
    }
}
