//! Frame builders for the filter tests, written with smoltcp's `emit` functions so the bytes are
//! what a real stack sends (checksums included), and the fixtures every filter test shares.
#![allow(dead_code)]

use core::net::{Ipv4Addr, Ipv6Addr};

pub mod edge;
pub mod switch;

use smoltcp::phy::ChecksumCapabilities;
pub use smoltcp::wire::TcpControl;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr,
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, NdiscRepr, TcpPacket,
    TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

pub const TENANT_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 2]);
pub const GW_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 1]);

/// What kind of TCP segment to build.
#[derive(Clone, Copy, Debug)]
pub enum Seg {
    Syn,
    SynAck,
    Ack,
    Data,
    Fin,
    Rst,
}

#[derive(Clone, Copy, Debug)]
pub enum Ip {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Ip {
    fn addr(self) -> IpAddress {
        match self {
            Ip::V4(a) => IpAddress::Ipv4(Ipv4Addr::from(a)),
            Ip::V6(a) => IpAddress::Ipv6(Ipv6Addr::from(a)),
        }
    }
}

pub fn ethernet(ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: TENANT_MAC,
        dst_addr: GW_MAC,
        ethertype,
    };
    let mut buf = vec![0u8; repr.buffer_len() + payload.len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    repr.emit(&mut frame);
    frame.payload_mut().copy_from_slice(payload);
    buf
}

/// Wrap transport bytes in an IP header and an Ethernet frame.
pub fn ip_frame(src: Ip, dst: Ip, proto: IpProtocol, l4: &[u8]) -> Vec<u8> {
    ip_frame_hops(src, dst, proto, l4, 64)
}

pub fn ip_frame_hops(src: Ip, dst: Ip, proto: IpProtocol, l4: &[u8], hops: u8) -> Vec<u8> {
    match (src, dst) {
        (Ip::V4(s), Ip::V4(d)) => ethernet(EthernetProtocol::Ipv4, &ipv4_packet(s, d, proto, l4)),
        (Ip::V6(s), Ip::V6(d)) => {
            let repr = Ipv6Repr {
                src_addr: Ipv6Addr::from(s),
                dst_addr: Ipv6Addr::from(d),
                next_header: proto,
                payload_len: l4.len(),
                hop_limit: hops,
            };
            let mut buf = vec![0u8; repr.buffer_len() + l4.len()];
            let mut p = Ipv6Packet::new_unchecked(&mut buf[..]);
            repr.emit(&mut p);
            p.payload_mut().copy_from_slice(l4);
            ethernet(EthernetProtocol::Ipv6, &buf)
        }
        _ => panic!("mixed IP versions"),
    }
}

pub fn ipv4_packet(s: [u8; 4], d: [u8; 4], proto: IpProtocol, l4: &[u8]) -> Vec<u8> {
    let repr = Ipv4Repr {
        src_addr: Ipv4Addr::from(s),
        dst_addr: Ipv4Addr::from(d),
        next_header: proto,
        payload_len: l4.len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; repr.buffer_len() + l4.len()];
    let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
    repr.emit(&mut p, &ChecksumCapabilities::default());
    p.payload_mut().copy_from_slice(l4);
    buf
}

/// Both ends of every fixture connection start at ISN 1000: the SYN and SYN-ACK carry seq 1000,
/// every later segment seq 1001 and ack 1001, so a fixture conversation is in window for the
/// sequence tracking (data retransmits from 1001; a RST carries 1001, exact until its sender sent
/// data).
pub const ISN: u32 = 1000;

pub fn tcp_bytes(src: Ip, dst: Ip, sport: u16, dport: u16, seg: Seg, payload: &[u8]) -> Vec<u8> {
    let (control, ack) = match seg {
        Seg::Syn => (TcpControl::Syn, None),
        Seg::SynAck => (TcpControl::Syn, Some(ISN + 1)),
        Seg::Ack => (TcpControl::None, Some(ISN + 1)),
        Seg::Data => (TcpControl::Psh, Some(ISN + 1)),
        Seg::Fin => (TcpControl::Fin, Some(ISN + 1)),
        Seg::Rst => (TcpControl::Rst, None),
    };
    let seq = if matches!(seg, Seg::Syn | Seg::SynAck) {
        ISN
    } else {
        ISN + 1
    };
    let spec = TcpSpec {
        control,
        seq,
        ack,
        win: 64240,
        wscale: None,
    };
    tcp_spec_bytes(src, dst, sport, dport, &spec, payload)
}

/// A TCP segment with explicit sequence-space fields.
#[derive(Clone, Copy, Debug)]
pub struct TcpSpec {
    pub control: TcpControl,
    pub seq: u32,
    pub ack: Option<u32>,
    pub win: u16,
    pub wscale: Option<u8>,
}

pub fn tcp_spec_bytes(
    src: Ip,
    dst: Ip,
    sport: u16,
    dport: u16,
    spec: &TcpSpec,
    payload: &[u8],
) -> Vec<u8> {
    let syn = matches!(spec.control, TcpControl::Syn);
    let repr = TcpRepr {
        src_port: sport,
        dst_port: dport,
        control: spec.control,
        seq_number: TcpSeqNumber(spec.seq as i32),
        ack_number: spec.ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: spec.win,
        window_scale: spec.wscale,
        max_seg_size: syn.then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    let mut p = TcpPacket::new_unchecked(&mut buf[..]);
    repr.emit(
        &mut p,
        &src.addr(),
        &dst.addr(),
        &ChecksumCapabilities::default(),
    );
    buf
}

/// A TCP frame with explicit sequence-space fields.
pub fn tcp_spec(
    src: Ip,
    dst: Ip,
    sport: u16,
    dport: u16,
    spec: TcpSpec,
    payload: &[u8],
) -> Vec<u8> {
    let l4 = tcp_spec_bytes(src, dst, sport, dport, &spec, payload);
    ip_frame(src, dst, IpProtocol::Tcp, &l4)
}

pub fn tcp(src: Ip, dst: Ip, sport: u16, dport: u16, seg: Seg) -> Vec<u8> {
    let payload: &[u8] = if matches!(seg, Seg::Data) {
        b"GET / HTTP/1.1\r\n\r\n"
    } else {
        b""
    };
    let l4 = tcp_bytes(src, dst, sport, dport, seg, payload);
    ip_frame(src, dst, IpProtocol::Tcp, &l4)
}

/// A TCP frame whose total size (Ethernet header included, FCS excluded) is `frame_len`.
pub fn tcp_sized(src: Ip, dst: Ip, sport: u16, dport: u16, frame_len: usize) -> Vec<u8> {
    let overhead = 14 + 20 + 20;
    let payload = vec![0xabu8; frame_len.saturating_sub(overhead)];
    let l4 = tcp_bytes(src, dst, sport, dport, Seg::Data, &payload);
    ip_frame(src, dst, IpProtocol::Tcp, &l4)
}

pub fn udp_bytes(src: Ip, dst: Ip, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: sport,
        dst_port: dport,
    };
    let mut buf = vec![0u8; repr.header_len() + payload.len()];
    let mut p = UdpPacket::new_unchecked(&mut buf[..]);
    repr.emit(
        &mut p,
        &src.addr(),
        &dst.addr(),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
    buf
}

pub fn udp(src: Ip, dst: Ip, sport: u16, dport: u16) -> Vec<u8> {
    let l4 = udp_bytes(src, dst, sport, dport, b"query");
    ip_frame(src, dst, IpProtocol::Udp, &l4)
}

pub fn icmp4_echo(src: [u8; 4], dst: [u8; 4], request: bool, ident: u16) -> Vec<u8> {
    let repr = if request {
        Icmpv4Repr::EchoRequest {
            ident,
            seq_no: 1,
            data: b"ping",
        }
    } else {
        Icmpv4Repr::EchoReply {
            ident,
            seq_no: 1,
            data: b"ping",
        }
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut buf[..]),
        &ChecksumCapabilities::default(),
    );
    ip_frame(Ip::V4(src), Ip::V4(dst), IpProtocol::Icmp, &buf)
}

/// An ICMPv4 port-unreachable from `src` to `dst` quoting the IPv4 packet `quoted`.
pub fn icmp4_unreachable(src: [u8; 4], dst: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let q = Ipv4Packet::new_checked(quoted).unwrap();
    let header = Ipv4Repr {
        src_addr: q.src_addr(),
        dst_addr: q.dst_addr(),
        next_header: q.next_header(),
        payload_len: q.payload().len(),
        hop_limit: 64,
    };
    let repr = Icmpv4Repr::DstUnreachable {
        reason: Icmpv4DstUnreachable::PortUnreachable,
        header,
        data: &q.payload()[..8],
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut buf[..]),
        &ChecksumCapabilities::default(),
    );
    ip_frame(Ip::V4(src), Ip::V4(dst), IpProtocol::Icmp, &buf)
}

/// An ICMP destination unreachable (ICMPv4 port unreachable, ICMPv6 port unreachable) from `src`
/// to `dst` quoting all of the IP packet `quoted` (as a host quotes as much as fits), checksum
/// filled.
pub fn icmp_error(src: Ip, dst: Ip, quoted: &[u8]) -> Vec<u8> {
    // Type and code: RFC 792 (3, 3), RFC 4443 §3.1 (1, 4).
    let (kind, code, proto) = match src {
        Ip::V4(_) => (3, 3, IpProtocol::Icmp),
        Ip::V6(_) => (1, 4, IpProtocol::Icmpv6),
    };
    let mut l4 = vec![kind, code, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(quoted);
    match (src, dst) {
        (Ip::V4(_), _) => Icmpv4Packet::new_unchecked(&mut l4[..]).fill_checksum(),
        (Ip::V6(s), Ip::V6(d)) => Icmpv6Packet::new_unchecked(&mut l4[..])
            .fill_checksum(&Ipv6Addr::from(s), &Ipv6Addr::from(d)),
        _ => panic!("mixed IP versions"),
    }
    ip_frame(src, dst, proto, &l4)
}

pub fn icmp6_echo(src: [u8; 16], dst: [u8; 16], request: bool, ident: u16) -> Vec<u8> {
    let repr = if request {
        Icmpv6Repr::EchoRequest {
            ident,
            seq_no: 1,
            data: b"ping",
        }
    } else {
        Icmpv6Repr::EchoReply {
            ident,
            seq_no: 1,
            data: b"ping",
        }
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(
        &Ipv6Addr::from(src),
        &Ipv6Addr::from(dst),
        &mut Icmpv6Packet::new_unchecked(&mut buf[..]),
        &ChecksumCapabilities::default(),
    );
    ip_frame(Ip::V6(src), Ip::V6(dst), IpProtocol::Icmpv6, &buf)
}

/// A neighbour solicitation for `target` with the given hop limit.
pub fn ndp_solicit(src: [u8; 16], target: [u8; 16], hops: u8) -> Vec<u8> {
    let repr = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: Ipv6Addr::from(target),
        lladdr: Some(TENANT_MAC.into()),
    });
    // Solicited-node multicast address ff02::1:ffXX:XXXX (RFC 4291 §2.7.1).
    let mut dst = [0u8; 16];
    dst[0] = 0xff;
    dst[1] = 0x02;
    dst[11] = 1;
    dst[12] = 0xff;
    dst[13..].copy_from_slice(&target[13..]);
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(
        &Ipv6Addr::from(src),
        &Ipv6Addr::from(dst),
        &mut Icmpv6Packet::new_unchecked(&mut buf[..]),
        &ChecksumCapabilities::default(),
    );
    ip_frame_hops(Ip::V6(src), Ip::V6(dst), IpProtocol::Icmpv6, &buf, hops)
}

pub fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: TENANT_MAC,
        source_protocol_addr: Ipv4Addr::from(sender),
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: Ipv4Addr::from(target),
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(&mut ArpPacket::new_unchecked(&mut buf[..]));
    ethernet(EthernetProtocol::Arp, &buf)
}

/// Insert an 802.1Q tag (TPID `tpid`, VLAN `vid`) after the MAC addresses.
pub fn vlan_tag(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&tpid.to_be_bytes());
    out.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

// Fixtures shared by the filter tests.

pub const T1: u32 = 1;
pub const T2: u32 = 2;
pub const TENANT: [u8; 4] = [10, 0, 0, 2];
pub const SERVER: [u8; 4] = [10, 0, 0, 5];
pub const TENANT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
pub const SEC: u64 = 1_000_000_000;
pub const FWD: fw_guest::filter::Decision = fw_guest::filter::Decision::Forward;

pub fn drop(r: fw_guest::filter::DropReason) -> fw_guest::filter::Decision {
    fw_guest::filter::Decision::Drop(r)
}

/// A filter over leaked boxed tables (tests only): room for `flow_capacity` flows and
/// `verdict_capacity` verdicts.
pub fn filter_with(
    flow_capacity: usize,
    verdict_capacity: usize,
) -> fw_guest::filter::Filter<'static> {
    use fw_guest::filter::*;
    let flows = Box::leak(vec![FlowSlot::EMPTY; slots_for(flow_capacity)].into_boxed_slice());
    let verdicts = Box::leak(vec![VerdictSlot::EMPTY; verdict_capacity].into_boxed_slice());
    let index = Box::leak(vec![IndexSlot::EMPTY; verdict_capacity * 2].into_boxed_slice());
    Filter::new(flows, verdicts, index, Config::default()).unwrap()
}

/// Verdict sequence numbers, 1 up.
pub struct Seq(pub u64);

impl Seq {
    pub fn next(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}
