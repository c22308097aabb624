//! Frame parsing: Ethernet (with at most one 802.1Q tag), ARP, IPv4, IPv6, TCP, UDP, ICMPv4,
//! ICMPv6, through smoltcp's zero-copy `wire` views. Every view is built with `new_checked`
//! (`check_len`) before any accessor runs, and every hand-read offset is bounds-checked, so no
//! input — truncated, lying about its lengths, or random — can panic.
//!
//! VLAN decision: a frame with one 802.1Q tag (TPID 0x8100) is filtered on its inner packet
//! exactly like an untagged one; the tag is neither part of the flow key (a tenant is identified by
//! the switch port it sits on, not by a tag it can write itself) nor removed (the frame is forwarded
//! as received). Stacked tags (802.1ad S-tag 0x88a8, or a second 0x8100) are dropped and counted
//! as [`DropReason::VlanStacked`]: nothing in Vigil produces them, and double tagging is the
//! classic VLAN-hopping vector. A switch's tenant ports take no tag at all (the switch's
//! `admit`, [`DropReason::VlanTagged`]): a tag that crossed the cloud with a tenant's frame would
//! pick its VLAN where it leaves the edge; tagged frames reach the filter from the outside only.

use smoltcp::wire::{
    ArpHardware, ArpPacket, EthernetFrame, EthernetProtocol, Icmpv4Message, Icmpv4Packet,
    Icmpv6Message, Icmpv6Packet, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
    UdpPacket,
};
use vigil_wire::ring::DropReason;
use vigil_wire::verdict::{IpVersion, Protocol};

/// IEEE 802.1Q customer VLAN tag protocol identifier.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// IEEE 802.1ad service VLAN tag protocol identifier (QinQ outer tag).
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
/// Length of an 802.1Q tag (TPID is the outer EtherType; TCI 2 bytes + inner EtherType 2 bytes).
const VLAN_TAG_LEN: usize = 4;
/// RFC 4861 §7.1.1/§7.1.2: neighbour discovery messages must arrive with hop limit 255 (proof
/// they were not forwarded by a router).
const NDP_HOP_LIMIT: u8 = 255;
/// Length of an ICMP error header (type, code, checksum, 4 bytes unused/MTU/pointer): RFC 792,
/// RFC 4443 §2.1.
const ICMP_ERROR_HEADER: usize = 8;
/// The IPv6 fixed header (RFC 8200 §3).
const IPV6_HEADER: usize = 40;
/// Bytes of the offending packet's transport header an ICMP error must quote to name its flow
/// (ports, or type/code/checksum/identifier for echo): RFC 792 quotes at least 64 bits.
const QUOTED_L4: usize = 8;
/// The most an ICMPv4 error may be, IP header included: RFC 1812 §4.3.2.3 (576 bytes). A longer
/// one is no error a router or host sends, only room for a sender's own bytes riding on a tracked
/// flow's quote: [`DropReason::IcmpUnsupported`].
pub const ICMPV4_ERROR_MAX: usize = 576;
/// The most an ICMPv6 error may be, IPv6 header included: the IPv6 minimum MTU (RFC 4443 §2.4 c).
pub const ICMPV6_ERROR_MAX: usize = 1280;

/// TCP flags the tracker looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
    /// The segment carries payload bytes.
    pub data: bool,
}

/// Sequence-space facts of a TCP segment (for window tracking).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpSeg {
    pub seq: u32,
    /// Acknowledgment number (meaningful when the ACK flag is set).
    pub ack: u32,
    /// Window field as sent (unscaled).
    pub win: u16,
    /// Window scale option (RFC 7323 §2), read from SYN segments only; [`NO_WSCALE`] when absent.
    pub wscale: u8,
    /// Maximum segment size option (RFC 9293 §3.7.1), read from SYN segments only; 0 when absent.
    pub mss: u16,
    /// Sequence space the segment occupies: payload bytes, plus one for SYN and one for FIN.
    pub len: u32,
}

/// [`TcpSeg::wscale`] of a segment without the option (or not a SYN).
pub const NO_WSCALE: u8 = 0xff;
/// TCP option kinds (RFC 9293 §3.1, RFC 7323 §2.2).
const TCPOPT_END: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
const TCPOPT_WSCALE: u8 = 3;
/// RFC 7323 §2.3: a shift above 14 is treated as 14.
pub const MAX_WSCALE: u8 = 14;

/// Transport-level facts about a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: TcpFlags,
        seg: TcpSeg,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    EchoRequest {
        ident: u16,
    },
    EchoReply {
        ident: u16,
    },
    /// An ICMP error (destination unreachable, time exceeded, packet too big, parameter problem)
    /// quoting a packet of some flow.
    IcmpError {
        inner: Quoted,
    },
}

/// The packet quoted in an ICMP error: enough to rebuild its flow key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub protocol: Protocol,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Ports, or the echo identifier in `src_port` (and 0 in `dst_port`) for ICMP echo.
    pub src_port: u16,
    pub dst_port: u16,
    /// The quoted TCP segment's sequence number (0 for other protocols).
    pub seq: u32,
}

/// An IP packet's flow-relevant fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpMeta {
    pub ip_version: IpVersion,
    pub protocol: Protocol,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub l4: L4,
}

/// What a frame is, as far as the filter cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A well-formed Ethernet/IPv4 ARP packet: passes (tenants and the gateway need it).
    Arp,
    /// IPv6 neighbour solicitation or advertisement with hop limit 255: passes (IPv6's ARP).
    NeighborDiscovery,
    Ip(IpMeta),
}

fn v4_field(a: [u8; 4]) -> [u8; 16] {
    vigil_wire::verdict::v4(a)
}

/// Parse one Ethernet frame.
pub fn parse(frame: &[u8]) -> Result<Parsed, DropReason> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| DropReason::Malformed)?;
    let mut ethertype = u16::from(eth.ethertype());
    let mut payload = eth.payload();
    if ethertype == ETHERTYPE_QINQ {
        return Err(DropReason::VlanStacked);
    }
    if ethertype == ETHERTYPE_VLAN {
        if payload.len() < VLAN_TAG_LEN {
            return Err(DropReason::Malformed);
        }
        ethertype = u16::from_be_bytes([payload[2], payload[3]]);
        payload = &payload[VLAN_TAG_LEN..];
        if ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
            return Err(DropReason::VlanStacked);
        }
    }
    match EthernetProtocol::from(ethertype) {
        EthernetProtocol::Arp => parse_arp(payload),
        EthernetProtocol::Ipv4 => parse_ipv4(payload),
        EthernetProtocol::Ipv6 => parse_ipv6(payload),
        EthernetProtocol::Unknown(_) => Err(DropReason::NonIp),
    }
}

fn parse_arp(payload: &[u8]) -> Result<Parsed, DropReason> {
    let arp = ArpPacket::new_checked(payload).map_err(|_| DropReason::Malformed)?;
    // Only Ethernet/IPv4 ARP exists on this network; anything else is malformed for us.
    if arp.hardware_type() != ArpHardware::Ethernet
        || arp.protocol_type() != EthernetProtocol::Ipv4
        || arp.hardware_len() != 6
        || arp.protocol_len() != 4
    {
        return Err(DropReason::Malformed);
    }
    Ok(Parsed::Arp)
}

/// The fixed IPv4 header (RFC 791 §3.1): the least an IHL may say (5 words).
pub const IPV4_HEADER: usize = 20;

/// An IPv4 packet view over `bytes` whose version is 4 and whose header length covers at least
/// the fixed header. smoltcp's `check_len` does not refuse an IHL below 5, and with one its
/// `payload()` starts inside the header (the destination address would be read as ports): every
/// IPv4 header this crate reads goes through here.
pub fn ipv4_checked(bytes: &[u8]) -> Result<Ipv4Packet<&[u8]>, DropReason> {
    let ip = Ipv4Packet::new_checked(bytes).map_err(|_| DropReason::Malformed)?;
    if ip.version() != 4 || usize::from(ip.header_len()) < IPV4_HEADER {
        return Err(DropReason::Malformed);
    }
    Ok(ip)
}

/// IPv4 loose and strict source route options (RFC 791 §3.1, types 131 and 137).
const IPOPT_LSRR: u8 = 0x83;
const IPOPT_SSRR: u8 = 0x89;
const IPOPT_END: u8 = 0;
const IPOPT_NOP: u8 = 1;

/// Whether the options of the IPv4 header `h` (its length checked by [`ipv4_checked`]) carry a
/// source route: the destination the filter judges would then be only the first hop, and each
/// hop that honours the route sends the packet on to the next address in it, one no verdict
/// named (RFC 7126 §4.3, §4.4: drop them). IPv6's routing header is refused the same way, with
/// every extension header. A malformed option list ends the walk (the route, if any, is not
/// where a receiver would find it).
fn source_routed(h: &[u8]) -> bool {
    let end = usize::from(h[0] & 0x0f) * 4;
    let mut i = IPV4_HEADER;
    while i < end {
        match h[i] {
            IPOPT_END => return false,
            IPOPT_NOP => i += 1,
            IPOPT_LSRR | IPOPT_SSRR => return true,
            _ => match h.get(i + 1) {
                Some(&len) if len >= 2 => i += usize::from(len),
                _ => return false,
            },
        }
    }
    false
}

fn parse_ipv4(payload: &[u8]) -> Result<Parsed, DropReason> {
    let ip = ipv4_checked(payload)?;
    // No reassembly: a later fragment has no transport header to match, and letting first
    // fragments through alone would be pointless.
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Err(DropReason::Fragment);
    }
    if usize::from(ip.header_len()) > IPV4_HEADER && source_routed(ip.as_ref()) {
        return Err(DropReason::UnsupportedProtocol);
    }
    // RFC 791 §3.1: source at bytes 12..16, destination at 16..20 of the header `new_checked`
    // has bounds-checked (read directly: no address type built and taken apart again).
    let h = ip.as_ref();
    let src = v4_field([h[12], h[13], h[14], h[15]]);
    let dst = v4_field([h[16], h[17], h[18], h[19]]);
    let body = ip.payload();
    let (protocol, l4) = match ip.next_header() {
        IpProtocol::Tcp => (Protocol::Tcp, parse_tcp(body)?),
        IpProtocol::Udp => (Protocol::Udp, parse_udp(body)?),
        IpProtocol::Icmp => (Protocol::Icmp, parse_icmpv4(body)?),
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    if is_rst(&l4) {
        let (s, d) = (ip.src_addr(), ip.dst_addr());
        if !ip.verify_checksum() || !tcp_checksum_ok(body, &s.into(), &d.into()) {
            return Err(DropReason::Malformed);
        }
    }
    if matches!(l4, L4::IcmpError { .. }) && usize::from(ip.total_len()) > ICMPV4_ERROR_MAX {
        return Err(DropReason::IcmpUnsupported);
    }
    Ok(Parsed::Ip(IpMeta {
        ip_version: IpVersion::V4,
        protocol,
        src,
        dst,
        l4,
    }))
}

fn parse_ipv6(payload: &[u8]) -> Result<Parsed, DropReason> {
    let ip = Ipv6Packet::new_checked(payload).map_err(|_| DropReason::Malformed)?;
    if ip.version() != 6 {
        return Err(DropReason::Malformed);
    }
    let src = ip.src_addr().octets();
    let dst = ip.dst_addr().octets();
    let body = ip.payload();
    // Extension headers (hop-by-hop, routing, fragment, ...) are not walked: the next header must
    // be the transport header itself, otherwise the packet is dropped and counted.
    let (protocol, l4) = match ip.next_header() {
        IpProtocol::Tcp => (Protocol::Tcp, parse_tcp(body)?),
        IpProtocol::Udp => (Protocol::Udp, parse_udp(body)?),
        IpProtocol::Icmpv6 => {
            let icmp = Icmpv6Packet::new_checked(body).map_err(|_| DropReason::Malformed)?;
            match icmp.msg_type() {
                Icmpv6Message::NeighborSolicit | Icmpv6Message::NeighborAdvert => {
                    if ip.hop_limit() != NDP_HOP_LIMIT {
                        return Err(DropReason::Malformed);
                    }
                    return Ok(Parsed::NeighborDiscovery);
                }
                Icmpv6Message::EchoRequest => (
                    Protocol::Icmpv6,
                    L4::EchoRequest {
                        ident: icmp.echo_ident(),
                    },
                ),
                Icmpv6Message::EchoReply => (
                    Protocol::Icmpv6,
                    L4::EchoReply {
                        ident: icmp.echo_ident(),
                    },
                ),
                Icmpv6Message::DstUnreachable
                | Icmpv6Message::PktTooBig
                | Icmpv6Message::TimeExceeded
                | Icmpv6Message::ParamProblem => {
                    if IPV6_HEADER + usize::from(ip.payload_len()) > ICMPV6_ERROR_MAX {
                        return Err(DropReason::IcmpUnsupported);
                    }
                    let quoted = body.get(ICMP_ERROR_HEADER..).ok_or(DropReason::Malformed)?;
                    (
                        Protocol::Icmpv6,
                        L4::IcmpError {
                            inner: parse_quoted_v6(quoted)?,
                        },
                    )
                }
                _ => return Err(DropReason::IcmpUnsupported),
            }
        }
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    if is_rst(&l4) && !tcp_checksum_ok(body, &ip.src_addr().into(), &ip.dst_addr().into()) {
        return Err(DropReason::Malformed);
    }
    Ok(Parsed::Ip(IpMeta {
        ip_version: IpVersion::V6,
        protocol,
        src,
        dst,
        l4,
    }))
}

/// Whether `l4` is a TCP reset or FIN (see [`tcp_checksum_ok`]).
#[inline(always)]
fn is_rst(l4: &L4) -> bool {
    matches!(l4, L4::Tcp { flags, .. } if flags.rst || flags.fin)
}

/// Whether the TCP segment `body` (checked by [`parse_tcp`]) carries a correct checksum.
///
/// Checked for resets and FINs only (rare: one or two a connection, and the segments whose
/// flag alone moves an entry toward its end): an in-window reset shortens its entry's timeout,
/// an exact one closes it, on the assumption that the endpoint sees the same segment and
/// answers an inexact one with a challenge ACK (RFC 5961 §3.2) that passes here; a FIN moves
/// the entry to FIN-wait (2 minutes). A segment with a wrong checksum, which the endpoint
/// drops unseen, broke that: a blind attacker landing one in the window (a few hundred tries
/// against a large scaled window) had an idle connection's entry expire under it 10 s (a
/// reset) or 2 minutes (a FIN) later.
#[inline(never)]
fn tcp_checksum_ok(body: &[u8], src: &IpAddress, dst: &IpAddress) -> bool {
    TcpPacket::new_unchecked(body).verify_checksum(src, dst)
}

#[inline(always)]
fn parse_tcp(body: &[u8]) -> Result<L4, DropReason> {
    let tcp = TcpPacket::new_checked(body).map_err(|_| DropReason::Malformed)?;
    let (syn, fin) = (tcp.syn(), tcp.fin());
    let payload = tcp.payload().len() as u32;
    let (wscale, mss) = if syn {
        syn_options(tcp.options())
    } else {
        (NO_WSCALE, 0)
    };
    Ok(L4::Tcp {
        src_port: tcp.src_port(),
        dst_port: tcp.dst_port(),
        flags: TcpFlags {
            syn,
            ack: tcp.ack(),
            fin,
            rst: tcp.rst(),
            data: payload != 0,
        },
        seg: TcpSeg {
            seq: tcp.seq_number().0 as u32,
            ack: tcp.ack_number().0 as u32,
            win: tcp.window_len(),
            wscale,
            mss,
            len: payload + u32::from(syn) + u32::from(fin),
        },
    })
}

/// The window scale option among `opts` (a SYN's options), or [`NO_WSCALE`], and the MSS option
/// (0 when absent). Bounded by the options' length (at most 40 bytes); a malformed option list
/// ends the walk.
fn syn_options(opts: &[u8]) -> (u8, u16) {
    let (mut wscale, mut mss) = (NO_WSCALE, 0);
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            TCPOPT_END => break,
            TCPOPT_NOP => i += 1,
            kind => {
                let Some(&len) = opts.get(i + 1) else { break };
                if len < 2 {
                    break;
                }
                if kind == TCPOPT_WSCALE && len == 3 {
                    wscale = opts.get(i + 2).map_or(NO_WSCALE, |&s| s.min(MAX_WSCALE));
                }
                if kind == TCPOPT_MSS && len == 4 {
                    if let Some(m) = opts.get(i + 2..i + 4) {
                        mss = u16::from_be_bytes([m[0], m[1]]);
                    }
                }
                i += usize::from(len);
            }
        }
    }
    (wscale, mss)
}

fn parse_udp(body: &[u8]) -> Result<L4, DropReason> {
    let udp = UdpPacket::new_checked(body).map_err(|_| DropReason::Malformed)?;
    Ok(L4::Udp {
        src_port: udp.src_port(),
        dst_port: udp.dst_port(),
    })
}

fn parse_icmpv4(body: &[u8]) -> Result<L4, DropReason> {
    let icmp = Icmpv4Packet::new_checked(body).map_err(|_| DropReason::Malformed)?;
    match icmp.msg_type() {
        Icmpv4Message::EchoRequest => Ok(L4::EchoRequest {
            ident: icmp.echo_ident(),
        }),
        Icmpv4Message::EchoReply => Ok(L4::EchoReply {
            ident: icmp.echo_ident(),
        }),
        Icmpv4Message::DstUnreachable
        | Icmpv4Message::TimeExceeded
        | Icmpv4Message::ParamProblem => {
            let quoted = body.get(ICMP_ERROR_HEADER..).ok_or(DropReason::Malformed)?;
            Ok(L4::IcmpError {
                inner: parse_quoted_v4(quoted)?,
            })
        }
        _ => Err(DropReason::IcmpUnsupported),
    }
}

/// Ports (or echo identifier) from the first bytes of a quoted transport header, and a TCP
/// segment's sequence number (bytes 4..8, within the 64 bits RFC 792 guarantees).
fn quoted_ports(protocol: Protocol, l4: &[u8]) -> Result<(u16, u16, u32), DropReason> {
    let l4 = l4.get(..QUOTED_L4).ok_or(DropReason::Malformed)?;
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    match protocol {
        Protocol::Tcp => Ok((
            port(0),
            port(2),
            u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
        )),
        Protocol::Udp => Ok((port(0), port(2), 0)),
        // Only errors about echo name a flow; ICMPv4 echo request/reply types 8/0 (RFC 792),
        // ICMPv6 128/129 (RFC 4443 §4).
        Protocol::Icmp if l4[0] == 8 || l4[0] == 0 => Ok((port(4), 0, 0)),
        Protocol::Icmpv6 if l4[0] == 128 || l4[0] == 129 => Ok((port(4), 0, 0)),
        _ => Err(DropReason::IcmpUnsupported),
    }
}

/// The IPv4 packet quoted in an ICMPv4 error: usually cut short, so its total length is not
/// checked against the bytes present; only the header and [`QUOTED_L4`] bytes must be there.
fn parse_quoted_v4(q: &[u8]) -> Result<Quoted, DropReason> {
    // RFC 791 header: version/IHL at 0, flags/fragment offset at 6..8, protocol at 9, addresses
    // at 12..16 and 16..20.
    let first = *q.first().ok_or(DropReason::Malformed)?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < IPV4_HEADER || q.len() < ihl {
        return Err(DropReason::Malformed);
    }
    let frag_offset = u16::from_be_bytes([q[6], q[7]]) & 0x1fff;
    if frag_offset != 0 {
        return Err(DropReason::Fragment);
    }
    let protocol = match q[9] {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        1 => Protocol::Icmp,
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    let (src_port, dst_port, seq) = quoted_ports(protocol, &q[ihl..])?;
    Ok(Quoted {
        protocol,
        src: v4_field([q[12], q[13], q[14], q[15]]),
        dst: v4_field([q[16], q[17], q[18], q[19]]),
        src_port,
        dst_port,
        seq,
    })
}

/// The IPv6 packet quoted in an ICMPv6 error (RFC 8200 fixed header: next header at 6, source at
/// 8..24, destination at 24..40).
fn parse_quoted_v6(q: &[u8]) -> Result<Quoted, DropReason> {
    const FIXED: usize = IPV6_HEADER;
    if q.len() < FIXED || q[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    let protocol = match q[6] {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        58 => Protocol::Icmpv6,
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    let (src_port, dst_port, seq) = quoted_ports(protocol, &q[FIXED..])?;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&q[8..24]);
    dst.copy_from_slice(&q[24..40]);
    Ok(Quoted {
        protocol,
        src,
        dst,
        src_port,
        dst_port,
        seq,
    })
}
