//! Layer-2 and layer-3 hygiene at a switch's tenant ports: what a tenant may send as, and the
//! neighbour protocols (ARP, IPv6 neighbour discovery) that bypass the verdicts.
//!
//! A tenant port's identity ([`PortIdentity`]) is what `Attach` records gave it: a MAC and up to
//! [`super::tenancy::PORT_ADDRS`] addresses per family. A frame from the port must carry that MAC
//! as its Ethernet source, and an IP packet one of those addresses (or the EUI-64 link-local of
//! the MAC; or, for a DHCP discover, 0.0.0.0) as its source. ARP and neighbour discovery are
//! judged field by field, because they reach the uplink without a verdict: every byte of them
//! must be one the switch can predict, so they carry no tenant-chosen data out of the host.
//!
//! - ARP (RFC 826, Ethernet/IPv4 only): exactly 28 bytes, padding up to the Ethernet minimum all
//!   zero; sender MAC = the port's MAC, sender IP = one of its addresses (0.0.0.0 for an RFC 5227
//!   probe). A request for a target the switch knows (a neighbour learned from the uplink's own
//!   ARP, [`Filter::observe_uplink`], or another tenant's attached address) is answered by the
//!   switch itself (proxy ARP: the reply goes back out of the same port, with the neighbour's real
//!   MAC, so the tenant's frames then reach it). A request for an unknown target goes out only if
//!   broadcast, with a zero target MAC, for an address in the /24 of the tenant's own (its
//!   gateway, learned from the answer): at most one chosen byte per frame, the last octet. A reply
//!   must answer a requester the switch saw (learned from the uplink, or a local tenant).
//! - Neighbour discovery (RFC 4861 §4.3/§4.4): an NS or NA of exactly 24 bytes, or 32 with one
//!   link-layer address option carrying the port's MAC; code, reserved bits, traffic class and
//!   flow label zero, checksum right; an NA's target one of the tenant's addresses; an NS's target its own (DAD,
//!   RFC 4862, from `::`), a neighbour the switch learned from the uplink, or an address of its
//!   /64 whose interface identifier is at most 0xff (a gateway such as `::1`); its destination
//!   the target's solicited-node multicast (or the learned neighbour itself).
//!
//! Ports with no identity (a boot-time tenant the VMM never attached: the static `vigil run`
//! configuration) are not judged here: there is nothing to judge against.
//!
//! The uplink neighbour table is small ([`NEIGHBORS`] entries, oldest replaced) and filled only
//! from uplink frames, which a tenant cannot send.

use core::net::Ipv6Addr;

use smoltcp::wire::{
    ArpOperation, ArpPacket, EthernetFrame, EthernetProtocol, Icmpv6Packet, Ipv4Packet,
};
use vigil_wire::ring::DropReason;

use super::parse::{ETHERTYPE_QINQ, ETHERTYPE_VLAN};
use super::tenancy::PortIdentity;
use super::Filter;
use vigil_wire::verdict::IpVersion;

/// Uplink neighbours remembered (gateway and the few hosts a tenant talks to on-link).
pub const NEIGHBORS: usize = 16;
/// Ethernet header without a tag.
const ETH_HEADER: usize = 14;
/// Ethernet minimum frame without FCS (IEEE 802.3 §3.2.8): shorter frames are padded to it.
pub const ETH_MIN: usize = 60;
/// ARP for Ethernet/IPv4 (RFC 826): 8 bytes of header, 2 × (6 + 4) addresses.
const ARP_LEN: usize = 28;
/// IPv6 header (RFC 8200).
const IPV6_HEADER: usize = 40;
/// NS/NA body without options (type, code, checksum, reserved/flags, target): RFC 4861 §4.3.
const ND_LEN: usize = 24;
/// One link-layer address option for Ethernet (type, length 1, MAC): RFC 4861 §4.6.1.
const ND_LLA_LEN: usize = 8;
const ICMPV6_NS: u8 = 135;
const ICMPV6_NA: u8 = 136;
const ND_OPT_SLLA: u8 = 1;
const ND_OPT_TLLA: u8 = 2;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const BROADCAST: [u8; 6] = [0xff; 6];

/// What [`Filter::admit`] decided about a frame from a tenant port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Judge it as usual ([`Filter::process`]).
    Pass,
    /// The switch answered it: send the first `n` bytes of the reply buffer back out of the port
    /// the frame came from; the frame itself goes nowhere.
    Reply(usize),
    /// Dropped (and counted).
    Drop(DropReason),
}

/// Neighbours seen on the uplink (IPv4 in the first 4 bytes of the address).
#[derive(Clone, Copy, Debug)]
pub struct Neighbors {
    entries: [(u8, [u8; 16], [u8; 6]); NEIGHBORS],
    next: usize,
}

impl Default for Neighbors {
    fn default() -> Self {
        Self::new()
    }
}

impl Neighbors {
    pub const fn new() -> Neighbors {
        Neighbors {
            entries: [(0, [0; 16], [0; 6]); NEIGHBORS],
            next: 0,
        }
    }

    /// The MAC of uplink neighbour `addr`.
    pub fn get(&self, version: IpVersion, addr: &[u8; 16]) -> Option<[u8; 6]> {
        self.entries
            .iter()
            .find(|(v, a, _)| *v == version as u8 && a == addr)
            .map(|e| e.2)
    }

    fn learn(&mut self, version: IpVersion, addr: [u8; 16], mac: [u8; 6]) {
        if addr == [0; 16] || mac[0] & 1 != 0 || mac == [0; 6] {
            return;
        }
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|(v, a, _)| *v == version as u8 && *a == addr)
        {
            e.2 = mac;
            return;
        }
        self.entries[self.next] = (version as u8, addr, mac);
        self.next = (self.next + 1) % NEIGHBORS;
    }
}

fn v4(a: &[u8]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

fn v4_16(a: [u8; 4]) -> [u8; 16] {
    vigil_wire::verdict::v4(a)
}

fn a16(a: &[u8]) -> [u8; 16] {
    let mut o = [0; 16];
    o.copy_from_slice(&a[..16]);
    o
}

fn mac(a: &[u8]) -> [u8; 6] {
    [a[0], a[1], a[2], a[3], a[4], a[5]]
}

/// The EtherType and the L3 bytes of a frame (one 802.1Q tag skipped), or `None`.
fn l3(frame: &[u8]) -> Option<(u16, &[u8], usize)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ethertype = u16::from(eth.ethertype());
    if ethertype == ETHERTYPE_VLAN {
        let inner = frame.get(ETH_HEADER + 2..ETH_HEADER + 4)?;
        let t = u16::from_be_bytes([inner[0], inner[1]]);
        if t == ETHERTYPE_VLAN || t == ETHERTYPE_QINQ {
            return None;
        }
        return Some((t, &frame[ETH_HEADER + 4..], ETH_HEADER + 4));
    }
    Some((ethertype, &frame[ETH_HEADER..], ETH_HEADER))
}

/// Whether every byte of `frame` after `end` is zero (Ethernet padding carries nothing).
fn zero_padding(frame: &[u8], end: usize) -> bool {
    frame.get(end..).is_some_and(|p| p.iter().all(|&b| b == 0))
}

/// The solicited-node multicast address of `target` (RFC 4291 §2.7.1) and its MAC (RFC 2464 §7).
fn solicited_node(target: &[u8; 16]) -> ([u8; 16], [u8; 6]) {
    let mut a = [0u8; 16];
    a[0] = 0xff;
    a[1] = 0x02;
    a[11] = 0x01;
    a[12] = 0xff;
    a[13..].copy_from_slice(&target[13..]);
    (a, [0x33, 0x33, 0xff, target[13], target[14], target[15]])
}

impl<'a> Filter<'a> {
    /// Judge a frame from tenant port `port` before it is forwarded (see the module doc). A proxy
    /// answer is built in `reply` (at least [`ETH_MIN`] bytes; shorter: the request is dropped as
    /// [`DropReason::NeighborTarget`]). Drops are counted.
    pub fn admit(&mut self, port: usize, frame: &[u8], reply: &mut [u8]) -> Admit {
        let id = *self.tenancy.identity(port);
        if id == PortIdentity::default() {
            return Admit::Pass;
        }
        let a = self.admit_inner(&id, frame, reply);
        if let Admit::Drop(r) = a {
            self.counters.drops[r as usize] += 1;
        }
        a
    }

    fn admit_inner(&mut self, id: &PortIdentity, frame: &[u8], reply: &mut [u8]) -> Admit {
        let Some((ethertype, body, at)) = l3(frame) else {
            return Admit::Pass; // `process` counts it as malformed.
        };
        if id.mac == [0; 6] || frame[6..12] != id.mac {
            return Admit::Drop(DropReason::SpoofedMac);
        }
        match EthernetProtocol::from(ethertype) {
            EthernetProtocol::Arp => self.admit_arp(id, frame, body, at, reply),
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = Ipv4Packet::new_checked(body) else {
                    return Admit::Pass;
                };
                let h = ip.as_ref();
                let src = v4(&h[12..16]);
                if id.has_v4(src) || (src == [0; 4] && dhcp_discover(&ip)) {
                    Admit::Pass
                } else {
                    Admit::Drop(DropReason::SpoofedSource)
                }
            }
            EthernetProtocol::Ipv6 => {
                if body.len() < IPV6_HEADER {
                    return Admit::Pass;
                }
                if body[6] == IPPROTO_ICMPV6
                    && matches!(body.get(IPV6_HEADER), Some(&ICMPV6_NS) | Some(&ICMPV6_NA))
                {
                    return self.admit_nd(id, frame, body, at);
                }
                if id.has_v6(&a16(&body[8..24])) {
                    Admit::Pass
                } else {
                    Admit::Drop(DropReason::SpoofedSource)
                }
            }
            EthernetProtocol::Unknown(_) => Admit::Pass,
        }
    }

    fn admit_arp(
        &mut self,
        id: &PortIdentity,
        frame: &[u8],
        body: &[u8],
        at: usize,
        reply: &mut [u8],
    ) -> Admit {
        let Ok(arp) = ArpPacket::new_checked(body) else {
            return Admit::Drop(DropReason::NeighborMalformed);
        };
        if body.len() < ARP_LEN
            || arp.hardware_len() != 6
            || arp.protocol_len() != 4
            || u16::from(arp.protocol_type()) != 0x0800
            || u16::from(arp.hardware_type()) != 1
            || !zero_padding(frame, at + ARP_LEN)
        {
            return Admit::Drop(DropReason::NeighborMalformed);
        }
        let b = &body[..ARP_LEN];
        let (sha, spa, tha, tpa) = (
            mac(&b[8..14]),
            v4(&b[14..18]),
            mac(&b[18..24]),
            v4(&b[24..28]),
        );
        let dst = mac(&frame[0..6]);
        if sha != id.mac {
            return Admit::Drop(DropReason::SpoofedMac);
        }
        // RFC 5227 probe: sender 0.0.0.0, for the tenant's own address.
        let probe = spa == [0; 4] && id.has_v4(tpa);
        if !probe && !id.has_v4(spa) {
            return Admit::Drop(DropReason::SpoofedNeighbor);
        }
        match arp.operation() {
            ArpOperation::Request => {
                if probe || spa == tpa {
                    // A probe or an announcement of its own address: every byte predictable.
                    return if dst == BROADCAST && tha == [0; 6] {
                        Admit::Pass
                    } else {
                        Admit::Drop(DropReason::NeighborMalformed)
                    };
                }
                if let Some(m) = self.neighbor_mac(IpVersion::V4, &v4_16(tpa)) {
                    return arp_reply(reply, m, tpa, id.mac, spa);
                }
                if dst == BROADCAST && tha == [0; 6] && id.on_link_v4(tpa) {
                    Admit::Pass
                } else {
                    Admit::Drop(DropReason::NeighborTarget)
                }
            }
            ArpOperation::Reply => {
                // Answers a requester the switch knows, to its MAC.
                match self.neighbor_mac(IpVersion::V4, &v4_16(tpa)) {
                    Some(m) if m == tha && dst == tha => Admit::Pass,
                    _ => Admit::Drop(DropReason::NeighborTarget),
                }
            }
            _ => Admit::Drop(DropReason::NeighborMalformed),
        }
    }

    fn admit_nd(&mut self, id: &PortIdentity, frame: &[u8], body: &[u8], at: usize) -> Admit {
        let payload = usize::from(u16::from_be_bytes([body[4], body[5]]));
        let nd = &body[IPV6_HEADER..];
        let src = a16(&body[8..24]);
        let dst = a16(&body[24..40]);
        let emac = mac(&frame[0..6]);
        // Version 6, traffic class and flow label zero; hop limit 255; exact length; code 0.
        let fixed = body[0] == 0x60
            && body[1..4] == [0; 3]
            && body[7] == 255
            && (payload == ND_LEN || payload == ND_LEN + ND_LLA_LEN)
            && nd.len() >= payload
            && zero_padding(frame, at + IPV6_HEADER + payload)
            && nd[1] == 0;
        // The checksum too: a wrong one is 16 chosen bits the receiver drops, but the uplink
        // carries.
        let checksum_ok = fixed
            && Icmpv6Packet::new_checked(&nd[..payload])
                .is_ok_and(|p| p.verify_checksum(&Ipv6Addr::from(src), &Ipv6Addr::from(dst)));
        if !checksum_ok {
            return Admit::Drop(DropReason::NeighborMalformed);
        }
        let target = a16(&nd[8..24]);
        let option = (payload > ND_LEN).then(|| &nd[ND_LEN..ND_LEN + ND_LLA_LEN]);
        let ns = nd[0] == ICMPV6_NS;
        let want_opt = if ns { ND_OPT_SLLA } else { ND_OPT_TLLA };
        if let Some(o) = option {
            if o[0] != want_opt || o[1] != 1 {
                return Admit::Drop(DropReason::NeighborMalformed);
            }
            if o[2..8] != id.mac {
                return Admit::Drop(DropReason::SpoofedMac);
            }
        }
        if ns {
            if nd[4..8] != [0; 4] {
                return Admit::Drop(DropReason::NeighborMalformed);
            }
            let dad = src == [0; 16];
            if dad {
                // RFC 4862 §5.4.2: from ::, no source link-layer option, for its own address.
                if option.is_some() || !id.has_v6(&target) {
                    return Admit::Drop(DropReason::SpoofedNeighbor);
                }
            } else if !id.has_v6(&src) {
                return Admit::Drop(DropReason::SpoofedSource);
            }
            let (sn, sn_mac) = solicited_node(&target);
            let to_solicited = dst == sn && emac == sn_mac;
            let known = self.neighbor_mac(IpVersion::V6, &target);
            let unicast_known = known.is_some_and(|m| dst == target && emac == m);
            let gateway_like = id.on_link_v6(&target) && target[8..15] == [0; 7] && target[15] != 0;
            let allowed = dad || id.has_v6(&target) || known.is_some() || gateway_like;
            if !allowed {
                Admit::Drop(DropReason::NeighborTarget)
            } else if to_solicited || unicast_known {
                Admit::Pass
            } else {
                Admit::Drop(DropReason::NeighborMalformed)
            }
        } else {
            // NA: flags R/S/O only (RFC 4861 §4.4), for an address of the tenant's, from it.
            if nd[4] & 0x1f != 0 || nd[5..8] != [0; 3] {
                return Admit::Drop(DropReason::NeighborMalformed);
            }
            if !id.has_v6(&target) || !id.has_v6(&src) {
                return Admit::Drop(DropReason::SpoofedNeighbor);
            }
            let all_nodes = {
                let mut a = [0u8; 16];
                a[0] = 0xff;
                a[1] = 0x02;
                a[15] = 1;
                a
            };
            let ok = (dst == all_nodes && emac == [0x33, 0x33, 0, 0, 0, 1])
                || self
                    .neighbor_mac(IpVersion::V6, &dst)
                    .is_some_and(|m| m == emac);
            if ok {
                Admit::Pass
            } else {
                Admit::Drop(DropReason::NeighborTarget)
            }
        }
    }

    /// The MAC of `addr`: an uplink neighbour, or an address attached to a tenant port here.
    fn neighbor_mac(&self, version: IpVersion, addr: &[u8; 16]) -> Option<[u8; 6]> {
        // A tenant attached here first: what the VMM says beats what the uplink said before.
        self.tenancy
            .port_of(version, addr)
            .map(|(_, id)| id.mac)
            .filter(|m| *m != [0; 6])
            .or_else(|| self.neighbors.get(version, addr))
    }

    /// Learn the uplink's neighbours from its own ARP and neighbour discovery frames (call for
    /// every frame arriving on an uplink port; anything else is ignored at the cost of an
    /// EtherType compare). An address attached to a tenant is never learned from the uplink.
    pub fn observe_uplink(&mut self, frame: &[u8]) {
        let Some((ethertype, body, _)) = l3(frame) else {
            return;
        };
        match ethertype {
            0x0806 => {
                let Ok(arp) = ArpPacket::new_checked(body) else {
                    return;
                };
                if body.len() < ARP_LEN || arp.hardware_len() != 6 || arp.protocol_len() != 4 {
                    return;
                }
                let (sha, spa) = (mac(&body[8..14]), v4_16(v4(&body[14..18])));
                if self.tenancy.owner(IpVersion::V4, &spa).is_none() {
                    self.neighbors.learn(IpVersion::V4, spa, sha);
                }
            }
            0x86dd => {
                if body.len() < IPV6_HEADER + ND_LEN + ND_LLA_LEN || body[6] != IPPROTO_ICMPV6 {
                    return;
                }
                let nd = &body[IPV6_HEADER..];
                let (addr, opt) = match nd[0] {
                    ICMPV6_NS => (a16(&body[8..24]), ND_OPT_SLLA),
                    ICMPV6_NA => (a16(&nd[8..24]), ND_OPT_TLLA),
                    _ => return,
                };
                let o = &nd[ND_LEN..ND_LEN + ND_LLA_LEN];
                if body[7] == 255
                    && o[0] == opt
                    && o[1] == 1
                    && self.tenancy.owner(IpVersion::V6, &addr).is_none()
                {
                    self.neighbors.learn(IpVersion::V6, addr, mac(&o[2..8]));
                }
            }
            _ => {}
        }
    }

    /// Edge, cloud side: an ARP whose sender address, or a neighbour solicitation whose source
    /// (its target for DAD from `::`), or an advertisement whose target, is not an address
    /// attached to some tenant: [`DropReason::SpoofedNeighbor`]. Anything else: `None` (judged as
    /// usual). The switch tier checked the rest of the fields at the tenant's port.
    pub(super) fn edge_cloud_neighbor(&self, frame: &[u8]) -> Option<DropReason> {
        let (ethertype, body, _) = l3(frame)?;
        let owned = |v: IpVersion, a: &[u8; 16]| self.tenancy.owner(v, a).is_some();
        match ethertype {
            0x0806 => {
                let spa = v4_16(v4(body.get(14..18)?));
                (!owned(IpVersion::V4, &spa)).then_some(DropReason::SpoofedNeighbor)
            }
            0x86dd => {
                if body.len() < IPV6_HEADER + ND_LEN || body[6] != IPPROTO_ICMPV6 {
                    return None;
                }
                let nd = &body[IPV6_HEADER..];
                let (src, target) = (a16(&body[8..24]), a16(&nd[8..24]));
                let ok = match nd[0] {
                    ICMPV6_NS if src == [0; 16] => owned(IpVersion::V6, &target),
                    ICMPV6_NS => owned(IpVersion::V6, &src),
                    ICMPV6_NA => owned(IpVersion::V6, &target),
                    _ => return None,
                };
                (!ok).then_some(DropReason::SpoofedNeighbor)
            }
            _ => None,
        }
    }

    /// The uplink neighbours learned so far.
    pub fn neighbors(&self) -> &Neighbors {
        &self.neighbors
    }
}

/// Whether an IPv4 packet from 0.0.0.0 is a DHCP client message (RFC 2131 §4.1: UDP 68 → 67, to
/// the limited broadcast).
fn dhcp_discover(ip: &Ipv4Packet<&[u8]>) -> bool {
    let h = ip.as_ref();
    let hl = usize::from(h[0] & 0x0f) * 4;
    h[9] == IPPROTO_UDP && h[16..20] == [255; 4] && h.get(hl..hl + 4) == Some(&[0, 68, 0, 67][..])
}

/// The proxy ARP reply: `owner_mac` has `owner_ip`, told to `to_mac`/`to_ip` (RFC 826), padded
/// with zeros to the Ethernet minimum.
fn arp_reply(
    out: &mut [u8],
    owner_mac: [u8; 6],
    owner_ip: [u8; 4],
    to_mac: [u8; 6],
    to_ip: [u8; 4],
) -> Admit {
    let Some(o) = out.get_mut(..ETH_MIN) else {
        return Admit::Drop(DropReason::NeighborTarget);
    };
    o.fill(0);
    o[0..6].copy_from_slice(&to_mac);
    o[6..12].copy_from_slice(&owner_mac);
    o[12..14].copy_from_slice(&[0x08, 0x06]);
    // Ethernet (1), IPv4 (0x0800), lengths 6 and 4, operation reply (2).
    o[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]);
    o[22..28].copy_from_slice(&owner_mac);
    o[28..32].copy_from_slice(&owner_ip);
    o[32..38].copy_from_slice(&to_mac);
    o[38..42].copy_from_slice(&to_ip);
    Admit::Reply(ETH_MIN)
}
