//! Hand-built TCP segments in Ethernet/IPv4 frames, as a tenant behind a host's uplink sends
//! them to the edge through a VXLAN endpoint, and waiting for the ones that come back.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Instant;

use vmm_core::devices::virtio::net::{FrameLink, MAX_FRAME};
use vmm_core::devices::vxlan::Vxlan;

/// TCP flag bits (RFC 9293 §3.1).
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// EtherType IPv4 (IEEE 802 numbers), IP protocol TCP (IANA).
pub const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
pub const IPPROTO_TCP: u8 = 6;

/// One's-complement sum of 16-bit big-endian words (RFC 1071), not yet inverted.
pub fn sum16(bytes: &[u8], mut sum: u32) -> u32 {
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    sum
}

pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One TCP segment without options or payload, in an Ethernet/IPv4 frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
}

impl Segment {
    /// The frame, with correct IPv4 header and TCP checksums (the Linux receiver checks both).
    pub fn frame(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(54);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ETHERTYPE_IPV4);
        // IPv4 header (RFC 791): version 4, IHL 5, total length 40, DF, TTL 64.
        let mut ip = [
            0x45,
            0,
            0,
            40,
            0,
            0,
            0x40,
            0,
            64,
            IPPROTO_TCP,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        ip[12..16].copy_from_slice(&self.src.ip().octets());
        ip[16..20].copy_from_slice(&self.dst.ip().octets());
        let csum = fold(sum16(&ip, 0));
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        f.extend_from_slice(&ip);
        // TCP header (RFC 9293): data offset 5 words, window 64240.
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&self.src.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&self.dst.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&self.ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = self.flags;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        // Pseudo-header: source, destination, zero, protocol, TCP length.
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&self.src.ip().octets());
        pseudo[4..8].copy_from_slice(&self.dst.ip().octets());
        pseudo[9] = IPPROTO_TCP;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        let csum = fold(sum16(&tcp, sum16(&pseudo, 0)));
        tcp[16..18].copy_from_slice(&csum.to_be_bytes());
        f.extend_from_slice(&tcp);
        f
    }

    /// The TCP segment in an Ethernet/IPv4 frame, if it is one (length-checked throughout).
    pub fn parse(frame: &[u8]) -> Option<Segment> {
        if frame.len() < 14 || frame[12..14] != ETHERTYPE_IPV4 {
            return None;
        }
        let ip = &frame[14..];
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != IPPROTO_TCP {
            return None;
        }
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let tcp = ip.get(ihl..)?;
        if ihl < 20 || tcp.len() < 20 {
            return None;
        }
        let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        let word = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
        Some(Segment {
            dst_mac: frame[0..6].try_into().ok()?,
            src_mac: frame[6..12].try_into().ok()?,
            src: SocketAddrV4::new(addr(&ip[12..16]), port(&tcp[0..2])),
            dst: SocketAddrV4::new(addr(&ip[16..20]), port(&tcp[2..4])),
            seq: word(&tcp[4..8]),
            ack: word(&tcp[8..12]),
            flags: tcp[13],
        })
    }

    pub fn is_syn_ack(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK
    }

    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    }
}

/// The first TCP segment arriving at `link` before `until` that `pred` accepts (others are
/// skipped), or `None` at the deadline.
pub fn wait_segment(
    link: &Vxlan,
    until: Instant,
    mut pred: impl FnMut(&Segment) -> bool,
) -> Option<Segment> {
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        loop {
            match link.recv_frame(&mut buf) {
                Ok(n) => {
                    if let Some(s) = Segment::parse(&buf[..n]).filter(|s| pred(s)) {
                        return Some(s);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("the test's VXLAN endpoint: {e}"),
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut fd = libc::pollfd {
            fd: link.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut fd, 1, ms) };
    }
}
