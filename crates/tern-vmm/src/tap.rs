//! Networks: the `--net` option and the TAP device behind a virtio-net device.
//!
//! tern attaches to a TAP that exists (`ip tuntap add dev NAME mode tap`, put on a bridge by
//! whoever runs the host's network), or to a TAP descriptor it inherits (`fd=N`, QEMU's
//! `-netdev tap,fd=N`): creating interfaces and wiring them is the host's business, and a name
//! that does not exist is a mistake worth an error rather than a new, unconnected interface.
//! Written by hand: the rust-vmm crates have no TAP (Cloud Hypervisor's `net_util` is not
//! published); what is needed here is one ioctl.
//!
//! Frames cross as they are, without a virtio-net header on the TAP (no IFF_VNET_HDR): the device
//! offers no offloads, so the 12-byte header carries nothing, and the kernel never parses a
//! header the guest wrote.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::{Error, Result};

const IFNAMSIZ: usize = 16;
const IFF_TUN: i16 = 0x0001;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOR('T', 210, unsigned int)`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

/// Where the TAP comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapSource {
    /// An existing TAP interface, by name.
    Name(String),
    /// A descriptor of an attached TAP, inherited from whoever started tern.
    Fd(RawFd),
    /// A descriptor of an attached TAP that QMP `getfd` will pass under this name (a target
    /// started with `--incoming defer`: its VM is built when the migration arrives); the caller
    /// turns it into [`TapSource::Fd`] before the VM is built.
    FdName(String),
}

/// One `--net` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: TapSource,
    /// The guest's MAC address (VIRTIO_NET_F_MAC); a migration's target must give the same.
    pub mac: [u8; 6],
}

/// QEMU's default MAC for NIC `index`: 52:54:00:12:34:56, 57...
pub fn default_mac(index: usize) -> [u8; 6] {
    [
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ]
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let h: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    h.join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with dashes): six hex bytes, not a multicast address.
pub fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
    let bad = || format!("mac={s} is not a MAC address (six hex bytes: 52:54:00:12:34:56)");
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "mac={s} is a multicast address: a NIC needs a unicast one (first byte even)"
        ));
    }
    Ok(mac)
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=MAC]` or `fd=N[,mac=MAC]` for NIC `index` (its default MAC).
    pub fn parse(spec: &str, index: usize) -> std::result::Result<NetConfig, String> {
        let mut tap = None;
        let mut mac = None;
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("tap" | "ifname", v)) if tap.is_none() => {
                    if v.is_empty() || v.len() >= IFNAMSIZ || v.contains('/') {
                        return Err(format!(
                            "tap={v}: an interface name is 1 to 15 characters without '/'"
                        ));
                    }
                    tap = Some(TapSource::Name(v.into()));
                }
                Some(("fd", v)) if tap.is_none() => {
                    tap = Some(match v.parse::<RawFd>() {
                        Ok(fd) if fd >= 0 => TapSource::Fd(fd),
                        _ if !v.is_empty()
                            && !v.starts_with(|c: char| c.is_ascii_digit() || c == '-')
                            && v.chars()
                                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
                        {
                            TapSource::FdName(v.into())
                        }
                        _ => {
                            return Err(format!(
                                "fd={v}: expected a descriptor number, or the name a QMP getfd \
                                 passes it under"
                            ))
                        }
                    });
                }
                Some(("tap" | "ifname" | "fd", _)) => {
                    return Err("give one of tap=NAME or fd=N, once".into())
                }
                Some(("mac", v)) => mac = Some(parse_mac(v)?),
                _ => {
                    return Err(format!(
                        "unknown net option '{part}' (tap=NAME or fd=N, mac=MAC)"
                    ))
                }
            }
        }
        Ok(NetConfig {
            tap: tap.ok_or("no tap=NAME (an existing TAP device) or fd=N")?,
            mac: mac.unwrap_or_else(|| default_mac(index)),
        })
    }
}

/// An attached TAP: non-blocking, frames without a packet-information header.
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> Self {
        IfReq {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }
    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidConfig(msg)
}

fn unresolved(name: &str) -> Error {
    invalid(format!(
        "fd={name}: no descriptor was passed under that name (QMP getfd {name} before the VM is \
         built: with --incoming defer, before migrate-incoming)"
    ))
}

/// The interface an attached TAP descriptor belongs to, if `fd` is one (without IFF_PI).
fn tap_fd_name(fd: RawFd) -> Result<String> {
    // SAFETY: F_GETFD only reads the descriptor's flags; an invalid one fails with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(invalid(format!(
            "fd={fd}: no such open descriptor (pass an attached TAP's descriptor)"
        )));
    }
    let mut req = IfReq::new();
    // SAFETY: TUNGETIFF writes a `struct ifreq` (IfReq's layout) for a tun descriptor and fails
    // with EBADFD/ENOTTY/EINVAL on anything else.
    let rc = unsafe { libc::ioctl(fd, TUNGETIFF, &mut req as *mut IfReq) };
    if rc < 0 || req.flags & IFF_TAP == 0 || req.flags & IFF_TUN != 0 {
        return Err(invalid(format!(
            "fd={fd} is not an attached TAP device's descriptor"
        )));
    }
    if req.flags & IFF_NO_PI == 0 {
        return Err(invalid(format!(
            "fd={fd}: the TAP was attached with packet information headers (IFF_NO_PI missing)"
        )));
    }
    if req.flags & IFF_VNET_HDR != 0 {
        return Err(invalid(format!(
            "fd={fd}: the TAP was attached with virtio-net headers (IFF_VNET_HDR): tern's frames \
             cross the TAP without them; attach it with IFF_TAP | IFF_NO_PI only"
        )));
    }
    Ok(req.name())
}

impl Tap {
    /// Attaches to the TAP `cfg` names.
    pub fn open(cfg: &NetConfig) -> Result<Tap> {
        match &cfg.tap {
            TapSource::Name(n) => Tap::open_name(n),
            TapSource::Fd(fd) => Tap::from_fd(*fd),
            TapSource::FdName(n) => Err(unresolved(n)),
        }
    }

    fn open_name(name: &str) -> Result<Tap> {
        if name.is_empty() || name.len() >= IFNAMSIZ {
            return Err(invalid(format!(
                "tap={name}: an interface name is 1 to 15 characters"
            )));
        }
        let sys = Path::new("/sys/class/net").join(name);
        if !sys.exists() {
            return Err(invalid(format!(
                "no network interface named {name} here (create the TAP first: ip tuntap add \
                 dev {name} mode tap, and put it on a bridge)"
            )));
        }
        let flags = std::fs::read_to_string(sys.join("tun_flags"))
            .ok()
            .and_then(|s| i64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
            .ok_or_else(|| {
                invalid(format!(
                    "{name} is not a TAP device (not a tun/tap interface)"
                ))
            })?;
        if flags & i64::from(IFF_TAP) == 0 {
            return Err(invalid(format!(
                "{name} is a TUN device (layer 3); virtio-net needs a TAP (ip tuntap add dev \
                 {name} mode tap)"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| Error::Io {
                what: "opening /dev/net/tun".into(),
                source: e,
            })?;
        let mut req = IfReq::new();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = IFF_TAP | IFF_NO_PI;
        // SAFETY: TUNSETIFF reads (and may update) a `struct ifreq`, which IfReq lays out (name,
        // then the flags union member, padded to 40 bytes); the descriptor is /dev/net/tun.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            let why = match e.raw_os_error() {
                Some(libc::EBUSY) => format!(
                    "TAP {name} is in use by another process (a VMM already attached to it?)"
                ),
                Some(libc::EPERM) => format!(
                    "not allowed to attach to TAP {name} (its owner or group is another user's; \
                     CAP_NET_ADMIN or ip tuntap add ... user USER)"
                ),
                Some(libc::EINVAL) => format!(
                    "cannot attach to TAP {name}: it was made multi-queue (tern attaches one \
                     queue: ip tuntap add dev {name} mode tap, without multi_queue)"
                ),
                _ => format!("cannot attach to TAP {name}: {e}"),
            };
            return Err(invalid(why));
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        tap.warn_if_down();
        Ok(tap)
    }

    /// Checks what `cfg` names without keeping it (a descriptor stays open, unowned): a
    /// target refuses a bad `--net` at start, not when a migration arrives.
    pub fn check(cfg: &NetConfig) -> Result<()> {
        match &cfg.tap {
            TapSource::Name(n) => Tap::open_name(n).map(drop),
            TapSource::Fd(fd) => tap_fd_name(*fd).map(drop),
            // Passed later; checked when the VM is built.
            TapSource::FdName(_) => Ok(()),
        }
    }

    /// Attaches through a duplicate of `fd` (the caller keeps, and closes, its own).
    fn from_fd(fd: RawFd) -> Result<Tap> {
        let name = tap_fd_name(fd)?;
        // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor of the open file `fd` (checked open
        // above); nothing else refers to the new one.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(Error::Io {
                what: format!("duplicating the TAP descriptor fd={fd}"),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `dup` was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(dup) };
        // SAFETY: F_GETFL/F_SETFL on our descriptor: non-blocking (the file description is
        // shared with whoever passed it, who gave the TAP to tern).
        unsafe {
            let fl = libc::fcntl(dup, libc::F_GETFL);
            libc::fcntl(dup, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let tap = Tap { file, name };
        tap.warn_if_down();
        Ok(tap)
    }

    fn warn_if_down(&self) {
        let flags = std::fs::read_to_string(format!("/sys/class/net/{}/flags", self.name))
            .ok()
            .and_then(|s| i64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok());
        if flags.is_some_and(|f| f & 1 == 0) {
            tracing::warn!(
                "TAP {} is down: the guest's frames are dropped until `ip link set {} up`",
                self.name,
                self.name
            );
        }
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One frame into `buf`; `Ok(None)` when none waits.
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        (&self.file).write(frame).map(|_| ())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// A RARP "reverse request" from `mac` to everyone: what QEMU sends for each NIC after a
/// migration, so that switches (and a Linux bridge's MAC learning) move `mac` to the port it
/// now comes from. 60 bytes (the minimum Ethernet frame without FCS).
pub fn rarp_frame(mac: &[u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // ETH_P_RARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(mac); // sender hardware address
    f[32..38].copy_from_slice(mac); // target hardware address
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_options_parse_and_bad_ones_say_why() {
        let c = NetConfig::parse("tap=tap0,mac=52:54:00:aa:bb:cc", 0).unwrap();
        assert_eq!(c.tap, TapSource::Name("tap0".into()));
        assert_eq!(c.mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        assert_eq!(NetConfig::parse("tap=t", 2).unwrap().mac, default_mac(2));
        assert_eq!(NetConfig::parse("fd=7", 0).unwrap().tap, TapSource::Fd(7));
        let err = |s: &str| NetConfig::parse(s, 0).unwrap_err();
        assert!(err("tap=t,mac=52:54:00:12:34").contains("not a MAC address"));
        assert!(err("tap=t,mac=zz:54:00:12:34:56").contains("not a MAC address"));
        assert!(err("tap=t,mac=01:00:5e:00:00:01").contains("multicast"));
        assert!(err("mac=52:54:00:12:34:56").contains("no tap=NAME"));
        assert!(err("tap=a,fd=3").contains("one of"));
        assert!(err("tap=averyveryverylongname").contains("1 to 15"));
        assert!(err("tap=t,model=e1000").contains("unknown net option"));
        assert!(err("fd=-1").contains("descriptor number"));
        assert_eq!(
            NetConfig::parse("fd=tap-a", 0).unwrap().tap,
            TapSource::FdName("tap-a".into())
        );
        assert!(err("fd=a/b").contains("getfd"));
    }

    #[test]
    fn a_missing_tap_is_named() {
        let e = Tap::open(&NetConfig::parse("tap=tern-nosuch0", 0).unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no network interface named tern-nosuch0"), "{e}");
        let e = Tap::open(&NetConfig::parse("tap=lo", 0).unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("lo is not a TAP device"), "{e}");
    }

    #[test]
    fn rarp_is_a_broadcast_reverse_request_from_the_mac() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(&mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
    }
}
