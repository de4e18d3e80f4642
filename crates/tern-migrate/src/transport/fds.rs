//! Descriptors over a unix socket (SCM_RIGHTS): how a local hand-over (`mode` `cpr-transfer`)
//! passes guest memory's memfd to the target. Written by hand: the standard library has no
//! ancillary data, and this crate keeps its dependencies to the engine's needs (vmm-sys-util's
//! `ScmSocket` would do, but belongs to the VMM side).
//!
//! Every read of a unix-socket connection goes through `recvmsg`, so that descriptors attached to
//! any byte are kept (a plain `read` past that byte would close them); at most [`MAX_FDS`] are
//! kept per connection, the rest closed at once.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// Descriptors a connection keeps until they are taken.
pub const MAX_FDS: usize = 4;
/// Room for that many descriptors in one control message.
const CMSG_BUF: usize = 64;

/// Reads into `buf`, keeping the descriptors that came with the bytes in `kept`.
pub fn recv(s: &UnixStream, buf: &mut [u8], kept: &Mutex<Vec<OwnedFd>>) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; CMSG_BUF / 8];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_BUF;
    // SAFETY: recvmsg writes at most `buf.len()` bytes into `buf` and at most CMSG_BUF bytes of
    // control data into `cbuf`, both described by `msg`; the socket is open.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk the control data it wrote
    // and return null past its end.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` points at a control message header inside `cbuf` (see above).
        let (level, ty, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len) };
        if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is the header's size; the data after it is `len - that` bytes
            // of descriptors, inside `cbuf`.
            let data = unsafe { libc::CMSG_DATA(c) } as *const RawFd;
            // SAFETY: pure arithmetic on a constant.
            let hdr = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(hdr) / std::mem::size_of::<RawFd>();
            let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..count {
                // SAFETY: within the message's data (see above); possibly unaligned.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel just installed `fd` in this process for us; nobody else
                // owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if kept.len() < MAX_FDS {
                    kept.push(owned);
                }
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok(n as usize)
}

/// Writes all of `bytes`, the descriptors `fds` attached to the first of them.
pub fn send(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(!bytes.is_empty() && fds.len() <= MAX_FDS);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut cbuf = [0u64; CMSG_BUF / 8];
    let payload = std::mem::size_of_val(fds) as u32;
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: pure arithmetic; at most CMSG_SPACE(16) = 32 bytes, within CMSG_BUF.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as usize;
    // SAFETY: the control buffer holds one header and its data (sized above); CMSG_FIRSTHDR
    // points at its start and CMSG_DATA just past the header.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(payload) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
    }
    let n = loop {
        // SAFETY: sendmsg reads the buffers `msg` describes, all alive for the call.
        let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // The descriptors went with the first byte; the rest is plain.
    io::Write::write_all(&mut &*s, &bytes[n..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn a_descriptor_goes_with_the_bytes_and_extra_ones_are_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile();
        send(&a, b"hello", &[file.as_raw_fd()]).unwrap();
        let kept = Mutex::new(Vec::new());
        let mut buf = [0u8; 16];
        let mut got = 0;
        while got < 5 {
            got += recv(&b, &mut buf[got..], &kept).unwrap();
        }
        assert_eq!(&buf[..5], b"hello");
        let fds = std::mem::take(&mut *kept.lock().unwrap());
        assert_eq!(fds.len(), 1);
        // The same file: what one writes, the other reads.
        let mut other = std::fs::File::from(fds.into_iter().next().unwrap());
        let mut mine = file;
        mine.write_all(b"shared").unwrap();
        other.seek(std::io::SeekFrom::Start(0)).unwrap();
        let mut s = String::new();
        other.read_to_string(&mut s).unwrap();
        assert_eq!(s, "shared");
    }

    fn tempfile() -> std::fs::File {
        let p = std::env::temp_dir().join(format!("tern-fds-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }
}
