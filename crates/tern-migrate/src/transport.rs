//! Transports: `tcp:HOST:PORT`, `unix:PATH`, `fd:NAME|N`, `exec:COMMAND` and `file:PATH`.
//!
//! Sockets are two-way: the target answers on the same connection (the return path: PING
//! acknowledgements, the final ACK, or why it refused). Files, pipes and commands are one-way:
//! the source cannot hear the target, so it neither waits for the target before the
//! stop-and-copy nor for an acknowledgement; the migration is complete when the whole stream
//! was written (a command exited with status 0, a file was synced to disk).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::{MigrateError, Result};

pub mod fds;
mod listener;
pub mod tls;
pub use listener::Listener;

/// Where to migrate to or from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uri {
    Tcp(String, u16),
    Unix(PathBuf),
    /// A descriptor: a name given to QMP `getfd`, or the number of an inherited one.
    Fd(String),
    /// A shell command: the source writes the stream to its stdin, the target reads its stdout.
    Exec(String),
    File(PathBuf),
}

impl Uri {
    /// Parses `tcp:HOST:PORT` (HOST may be `[v6]`), `unix:PATH`, `fd:NAME`, `exec:COMMAND` or
    /// `file:PATH`.
    pub fn parse(s: &str) -> Result<Uri> {
        let bad = || MigrateError::BadUri(s.to_string());
        match s.split_once(':') {
            Some(("unix", p)) if !p.is_empty() => Ok(Uri::Unix(p.into())),
            Some(("file", p)) if !p.is_empty() => Ok(Uri::File(p.into())),
            Some(("exec", c)) if !c.trim().is_empty() => Ok(Uri::Exec(c.to_string())),
            Some(("fd", n)) if !n.is_empty() && !n.contains(char::is_whitespace) => {
                Ok(Uri::Fd(n.to_string()))
            }
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

    /// The descriptor number, for `fd:N`.
    pub fn fd_number(&self) -> Option<RawFd> {
        match self {
            Uri::Fd(n) => n.parse().ok(),
            _ => None,
        }
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uri::Tcp(h, p) if h.contains(':') => write!(f, "tcp:[{h}]:{p}"),
            Uri::Tcp(h, p) => write!(f, "tcp:{h}:{p}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
            Uri::Fd(n) => write!(f, "fd:{n}"),
            Uri::Exec(c) => write!(f, "exec:{c}"),
            Uri::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// A descriptor this process inherited, duplicated so the caller owns the copy.
pub fn inherited_fd(n: RawFd) -> Result<OwnedFd> {
    // SAFETY: F_GETFD only queries the descriptor table; an unused number gives EBADF.
    if n < 0 || unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        return Err(MigrateError::Io {
            what: format!("fd:{n}"),
            source: io::Error::from_raw_os_error(libc::EBADF),
        });
    }
    // SAFETY: the descriptor is open (checked above) and stays open while borrowed, since this
    // process only closes inherited descriptors it owns, and it only duplicates it here.
    let borrowed = unsafe { BorrowedFd::borrow_raw(n) };
    borrowed
        .try_clone_to_owned()
        .map_err(MigrateError::io(format!("duplicating fd:{n}")))
}

#[derive(Debug)]
enum Endpoint {
    Tcp(TcpStream),
    /// A unix socket, or any socket passed as a descriptor, and the descriptors that came over
    /// it (a local hand-over's memory), until taken.
    Unix(UnixStream, Mutex<Vec<OwnedFd>>),
    /// A file or a pipe: one-way.
    File(File),
    /// A TLS session over a TCP or unix socket.
    Tls(Box<tls::TlsStream>),
}

/// A connected migration channel. Clones are handles on the *same* descriptor (no `dup`): the
/// sender writes through one, the return-path reader reads through another, and the canceller
/// shuts the socket down through a third, from any thread. (A TLS stream fits the same shape: one
/// shared session behind the handles.)
#[derive(Clone, Debug)]
pub struct Connection(Arc<Endpoint>);

impl Connection {
    fn tcp(s: TcpStream) -> Connection {
        Connection(Arc::new(Endpoint::Tcp(s)))
    }

    fn unix(s: UnixStream) -> Connection {
        Connection(Arc::new(Endpoint::Unix(s, Mutex::new(Vec::new()))))
    }

    fn file(f: File) -> Connection {
        Connection(Arc::new(Endpoint::File(f)))
    }

    /// Whether the other end can answer on this channel.
    pub fn two_way(&self) -> bool {
        !matches!(*self.0, Endpoint::File(_))
    }

    /// Shuts both directions of a socket down, waking any blocked reader or writer.
    pub fn shutdown(&self) {
        let _ = match &*self.0 {
            Endpoint::Tcp(s) => s.shutdown(Shutdown::Both),
            Endpoint::Unix(s, _) => s.shutdown(Shutdown::Both),
            Endpoint::Tls(s) => s.shutdown(Shutdown::Both),
            Endpoint::File(_) => Ok(()),
        };
    }

    /// Stops reads only (a blocked read returns end of input); writes, such as the reason for
    /// a failure, still go out.
    pub fn shutdown_read(&self) {
        let _ = match &*self.0 {
            Endpoint::Tcp(s) => s.shutdown(Shutdown::Read),
            Endpoint::Unix(s, _) => s.shutdown(Shutdown::Read),
            Endpoint::Tls(s) => s.shutdown(Shutdown::Read),
            Endpoint::File(_) => Ok(()),
        };
    }

    /// Stops writes only: the peer reads end of input after what was written; reads go on
    /// (so the kernel never answers the peer's data with a reset).
    pub fn shutdown_write(&self) {
        let _ = match &*self.0 {
            Endpoint::Tcp(s) => s.shutdown(Shutdown::Write),
            Endpoint::Unix(s, _) => s.shutdown(Shutdown::Write),
            Endpoint::Tls(s) => s.shutdown(Shutdown::Write),
            Endpoint::File(_) => Ok(()),
        };
    }

    /// Limits how long a read may block (every handle shares the setting).
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match &*self.0 {
            Endpoint::Tcp(s) => s.set_read_timeout(t),
            Endpoint::Unix(s, _) => s.set_read_timeout(t),
            Endpoint::Tls(s) => s.sock.set_read_timeout(t),
            Endpoint::File(_) => Ok(()),
        }
    }

    /// Limits how long a write may block (every handle shares the setting).
    pub fn set_write_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match &*self.0 {
            Endpoint::Tcp(s) => s.set_write_timeout(t),
            Endpoint::Unix(s, _) => s.set_write_timeout(t),
            Endpoint::Tls(s) => s.sock.set_write_timeout(t),
            Endpoint::File(_) => Ok(()),
        }
    }

    /// Takes the descriptors that came over this connection so far (a unix socket's).
    pub fn take_fds(&self) -> Vec<OwnedFd> {
        match &*self.0 {
            Endpoint::Unix(_, kept) => {
                std::mem::take(&mut *kept.lock().unwrap_or_else(|e| e.into_inner()))
            }
            _ => Vec::new(),
        }
    }

    /// Writes `bytes` with `fds` attached to the first (a unix socket only).
    pub fn send_with_fds(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        match &*self.0 {
            Endpoint::Unix(s, _) => fds::send(s, bytes, fds),
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "descriptors go only over a unix socket",
            )),
        }
    }

    /// Whether this is a regular file (not a socket, pipe or device).
    fn is_regular_file(&self) -> bool {
        match &*self.0 {
            Endpoint::File(f) => f.metadata().is_ok_and(|m| m.file_type().is_file()),
            _ => false,
        }
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Connection> {
        let f = File::from(fd);
        if f.metadata()?.file_type().is_socket() {
            Ok(Connection::unix(UnixStream::from(OwnedFd::from(f))))
        } else {
            Ok(Connection::file(f))
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &*self.0 {
            Endpoint::Tcp(s) => (&mut &*s).read(buf),
            // recvmsg: descriptors sent with the bytes are kept (see `fds`).
            Endpoint::Unix(s, kept) => fds::recv(s, buf, kept),
            Endpoint::Tls(s) => (&mut &**s).read(buf),
            Endpoint::File(f) => (&mut &*f).read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &*self.0 {
            Endpoint::Tcp(s) => (&mut &*s).write(buf),
            Endpoint::Unix(s, _) => (&mut &*s).write(buf),
            Endpoint::Tls(s) => (&mut &**s).write(buf),
            Endpoint::File(f) => (&mut &*f).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What must happen after the stream's last byte: a command to wait for, a file to sync.
#[derive(Debug, Default)]
pub struct ChannelEnd {
    child: Option<(Child, String, Arc<Mutex<bool>>)>,
    sync: Option<File>,
    /// One-way into something that may run the guest as soon as it has read END (a command, a
    /// pipe), rather than into a file (a snapshot).
    live_reader: bool,
}

impl ChannelEnd {
    /// Whether whoever reads this one-way stream may run the guest once it has END (a command
    /// or a pipe may feed a live target; a regular file is a snapshot).
    pub fn reader_may_run(&self) -> bool {
        self.live_reader
    }

    /// Completes the channel once every handle on the stream was dropped (so a command sees
    /// end-of-file): the file is synced, the command must exit with status 0.
    pub fn finish(self) -> Result<()> {
        if let Some(f) = self.sync {
            f.sync_all()
                .map_err(MigrateError::io("syncing the saved file"))?;
        }
        if let Some((mut child, cmd, reaped)) = self.child {
            let status = reap(&mut child, &reaped)
                .map_err(MigrateError::io(format!("waiting for '{cmd}'")))?;
            if !status.success() {
                return Err(MigrateError::Vm(format!(
                    "the command '{cmd}' failed: {status}"
                )));
            }
        }
        Ok(())
    }

    /// Reaps a command in the background, whatever it does (the target's reader is done).
    pub fn detach(self) {
        if let Some((mut child, cmd, reaped)) = self.child {
            let _ = std::thread::Builder::new()
                .name("exec-reaper".into())
                .spawn(move || match reap(&mut child, &reaped) {
                    Ok(s) if !s.success() => tracing::warn!("'{cmd}' exited with {s}"),
                    _ => {}
                });
        }
    }
}

/// Waits for `child` to exit and reaps it, marking it `reaped` (under its lock) between the two:
/// waiting without reaping first (WNOWAIT) keeps its pid, and so its process group id, from
/// being reused until the mark is set, so a [`Canceller`] never signals a stranger's group.
fn reap(child: &mut Child, reaped: &Mutex<bool>) -> std::io::Result<std::process::ExitStatus> {
    let pid = child.id();
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only `info`; WNOWAIT leaves the child to be reaped below.
        let r = unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break; // exited (or an error, which wait() below reports)
        }
    }
    *reaped.lock().unwrap_or_else(|e| e.into_inner()) = true;
    child.wait()
}

/// Stops a channel from another thread: shuts a socket down or kills a command.
#[derive(Debug)]
pub enum Canceller {
    Socket(Connection),
    Command(u32, Arc<Mutex<bool>>),
    /// Every connection of a migration with parallel channels.
    Many(Vec<Canceller>),
    Nothing,
}

impl Canceller {
    pub fn cancel(&self) {
        match self {
            Canceller::Socket(c) => c.shutdown(),
            Canceller::Command(pid, reaped) => {
                // Under the lock `reap` takes before reaping: the child is alive or a zombie
                // while we signal, so its process group id cannot have been reused.
                let reaped = reaped.lock().unwrap_or_else(|e| e.into_inner());
                if !*reaped {
                    if let Ok(pid) = libc::pid_t::try_from(*pid) {
                        // SAFETY: kill(2) has no memory effects; the child leads its own process
                        // group and is not reaped (checked under the lock), so it is ours.
                        unsafe { libc::kill(-pid, libc::SIGTERM) };
                    }
                }
            }
            Canceller::Many(all) => all.iter().for_each(Canceller::cancel),
            Canceller::Nothing => {}
        }
    }
}

/// An open migration channel and what finishing it takes.
#[derive(Debug)]
pub struct Channel {
    pub conn: Connection,
    pub end: ChannelEnd,
}

impl Channel {
    fn plain(conn: Connection) -> Channel {
        Channel {
            conn,
            end: ChannelEnd::default(),
        }
    }

    /// Starts `/bin/sh -c cmd`; the stream goes to its stdin (`outgoing`) or comes from its
    /// stdout.
    fn command(cmd: &str, outgoing: bool) -> Result<Channel> {
        let (stdin, stdout) = if outgoing {
            (Stdio::piped(), Stdio::null())
        } else {
            (Stdio::null(), Stdio::piped())
        };
        // Its own process group, so that a cancel stops the whole pipeline: `sh -c 'cat > f'`
        // may fork `cat`, which would otherwise keep the pipe open after `sh` is gone.
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(cmd)
            .stdin(stdin)
            .stdout(stdout)
            .process_group(0)
            .spawn()
            .map_err(MigrateError::io(format!("starting '{cmd}'")))?;
        let pipe: OwnedFd = match (child.stdin.take(), child.stdout.take()) {
            (Some(i), _) if outgoing => i.into(),
            (_, Some(o)) if !outgoing => o.into(),
            _ => return Err(MigrateError::Vm(format!("'{cmd}' has no pipe"))),
        };
        Ok(Channel {
            conn: Connection::file(File::from(pipe)),
            end: ChannelEnd {
                child: Some((child, cmd.to_string(), Arc::new(Mutex::new(false)))),
                sync: None,
                live_reader: outgoing,
            },
        })
    }

    /// Opens the source's end. `fd` is the descriptor a `fd:` URI names, resolved by the
    /// caller (QMP `getfd`, or [`inherited_fd`]).
    pub fn connect(uri: &Uri, fd: Option<OwnedFd>) -> Result<Channel> {
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
                Ok(Channel::plain(Connection::tcp(s)))
            }
            Uri::Unix(p) => Ok(Channel::plain(Connection::unix(
                UnixStream::connect(p).map_err(MigrateError::io(format!("connecting to {uri}")))?,
            ))),
            Uri::Fd(_) => {
                let fd =
                    fd.ok_or_else(|| MigrateError::Vm(format!("{uri}: no such descriptor")))?;
                let conn = Connection::from_fd(fd).map_err(MigrateError::io(uri.to_string()))?;
                let live_reader = !conn.two_way() && !conn.is_regular_file();
                Ok(Channel {
                    conn,
                    end: ChannelEnd {
                        live_reader,
                        ..ChannelEnd::default()
                    },
                })
            }
            Uri::File(p) => {
                let f = File::create(p)
                    .map_err(MigrateError::io(format!("creating {}", p.display())))?;
                let sync = f
                    .try_clone()
                    .map_err(MigrateError::io("duplicating the file"))?;
                Ok(Channel {
                    conn: Connection::file(f),
                    end: ChannelEnd {
                        child: None,
                        sync: Some(sync),
                        live_reader: false,
                    },
                })
            }
            Uri::Exec(cmd) => Channel::command(cmd, true),
        }
    }

    /// Whether the target can answer.
    pub fn two_way(&self) -> bool {
        self.conn.two_way()
    }

    /// A handle to stop this channel from another thread.
    pub fn canceller(&self) -> Canceller {
        match (&self.conn, &self.end.child) {
            (_, Some((child, _, reaped))) => Canceller::Command(child.id(), reaped.clone()),
            (c, None) if c.two_way() => Canceller::Socket(c.clone()),
            _ => Canceller::Nothing,
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
        assert_eq!(
            Uri::parse("file:/tmp/x").unwrap(),
            Uri::File("/tmp/x".into())
        );
        assert_eq!(
            Uri::parse("exec:cat > /tmp/m").unwrap(),
            Uri::Exec("cat > /tmp/m".into())
        );
        assert_eq!(Uri::parse("fd:mig").unwrap(), Uri::Fd("mig".into()));
        assert_eq!(Uri::parse("fd:7").unwrap().fd_number(), Some(7));
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "udp:1:2",
            "unix:",
            "file:",
            "exec:",
            "exec:  ",
            "fd:",
            "fd:a b",
        ] {
            assert!(Uri::parse(bad).is_err(), "{bad}");
        }
        for s in ["tcp:[::1]:5", "exec:cat > x", "fd:3", "file:/a b"] {
            assert_eq!(Uri::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn descriptors_become_sockets_or_files() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = Connection::from_fd(OwnedFd::from(a)).unwrap();
        assert!(c.two_way());
        let f = tempfile_in_tmp();
        let c = Connection::from_fd(OwnedFd::from(f)).unwrap();
        assert!(!c.two_way());
        assert!(inherited_fd(-1).is_err());
        assert!(inherited_fd(1_000_000).is_err());
    }

    fn tempfile_in_tmp() -> File {
        let p = std::env::temp_dir().join(format!("tern-transport-{}", std::process::id()));
        let f = File::create(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }

    #[test]
    fn exec_round_trip_and_failure() {
        let dir = std::env::temp_dir().join(format!("tern-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("out");
        let uri = Uri::parse(&format!("exec:cat > {}", file.display())).unwrap();
        let Channel { mut conn, end } = Channel::connect(&uri, None).unwrap();
        conn.write_all(b"hello").unwrap();
        drop(conn);
        end.finish().unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"hello");
        let l = Listener::bind(
            &Uri::parse(&format!("exec:cat {}", file.display())).unwrap(),
            None,
        )
        .unwrap();
        let mut ch = l.accept().unwrap();
        let mut got = Vec::new();
        ch.conn.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello");
        assert!(l.accept().is_err());
        let Channel { conn, end } = Channel::connect(&Uri::Exec("exit 3".into()), None).unwrap();
        drop(conn);
        let e = end.finish().unwrap_err().to_string();
        assert!(e.contains("exit 3") && e.contains("failed"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
