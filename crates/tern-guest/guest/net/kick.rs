//! After a migration: getting a TCP sender going again at once.
//!
//! While the guest was paused for the switch, its peers' acknowledgements went to the old host
//! and were lost there. A sender whose window is all in flight then waits for its retransmission
//! timeout before it sends again — smoltcp's is at least 1 s (RFC 6298), far longer than the
//! downtime. So when the device asks for an announce, the guest also sends each connected peer a
//! SYN on the established connection: a peer never accepts it, whatever its sequence number, and
//! answers with a "challenge ACK" of where it stands (RFC 5961, 4; Linux
//! `tcp_send_challenge_ack`), and that acknowledgement releases the window at once. (A segment
//! without flags would be simpler in theory, but Linux drops one without ACK, SYN or RST before it
//! looks at its sequence number; one with ACK could acknowledge data we never received if its
//! sequence number fell inside the window.)
//!
//! The peer's MAC comes from the frames it sent us (`Peers`): smoltcp's neighbour cache is
//! private, and every peer of a connection has sent us frames.

/// The last few IPv4 peers seen on the wire, as (IP, MAC).
pub struct Peers {
    seen: [([u8; 4], [u8; 6]); 8],
    next: usize,
}

impl Peers {
    pub const fn new() -> Peers {
        Peers {
            seen: [([0; 4], [0; 6]); 8],
            next: 0,
        }
    }

    /// Notes the sender of an IPv4 frame.
    pub fn learn(&mut self, frame: &[u8]) {
        if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
            return;
        }
        let mut ip = [0u8; 4];
        ip.copy_from_slice(&frame[26..30]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&frame[6..12]);
        if let Some(e) = self.seen.iter_mut().find(|e| e.0 == ip) {
            e.1 = mac;
            return;
        }
        self.seen[self.next] = (ip, mac);
        self.next = (self.next + 1) % self.seen.len();
    }

    pub fn mac(&self, ip: [u8; 4]) -> Option<[u8; 6]> {
        self.seen
            .iter()
            .find(|e| e.0 == ip && e.0 != [0; 4])
            .map(|e| e.1)
    }
}

/// Where a probe goes: our and the peer's MAC, address and port.
pub struct Flow {
    pub mac: [u8; 6],
    pub peer_mac: [u8; 6],
    pub ip: [u8; 4],
    pub peer_ip: [u8; 4],
    pub port: u16,
    pub peer_port: u16,
}

/// The probe's length: Ethernet, IPv4 and TCP headers (54 bytes), padded to 60.
pub const PROBE_LEN: usize = 60;

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// Writes a probe of `f` with sequence number `seq` into `b` ([`PROBE_LEN`] bytes).
pub fn probe(f: &Flow, seq: u32, b: &mut [u8]) {
    b.fill(0);
    b[0..6].copy_from_slice(&f.peer_mac);
    b[6..12].copy_from_slice(&f.mac);
    b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut b[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes()); // total length
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&f.ip);
    ip[16..20].copy_from_slice(&f.peer_ip);
    let c = fold(sum16(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut b[34..54];
    tcp[0..2].copy_from_slice(&f.port.to_be_bytes());
    tcp[2..4].copy_from_slice(&f.peer_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4; // header length: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes()); // window

    // The pseudo-header: addresses, protocol, TCP length.
    let pseudo = sum16(&f.ip) + sum16(&f.peer_ip) + 6 + 20;
    let c = fold(pseudo + sum16(tcp));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}
