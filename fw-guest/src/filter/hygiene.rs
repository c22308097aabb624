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
//! ARP and neighbour discovery (what may reach the uplink, what the switch answers itself, what
//! it resolves on a tenant's behalf, and the residual channel) are in [`super::neighbor`].
//!
//! Ports with no identity (a boot-time tenant the VMM never attached: the static `vigil run`
//! configuration) are not judged here: there is nothing to judge against.
//!
//! The uplink neighbour table is small ([`NEIGHBORS`] entries, oldest replaced) and filled only
//! from uplink frames, which a tenant cannot send.

use smoltcp::wire::{ArpPacket, EthernetFrame, EthernetProtocol, Ipv4Packet};
use vigil_wire::ring::DropReason;

use super::neighbor::{
    ARP_LEN, ICMPV6_NA, ICMPV6_NS, IPV6_HEADER, NA_ROUTER, ND_LEN, ND_LLA_LEN, ND_OPT_SLLA,
    ND_OPT_TLLA,
};
use super::parse::{self, ETHERTYPE_QINQ, ETHERTYPE_VLAN};
use super::tenancy::PortIdentity;
use super::Filter;
use vigil_wire::verdict::IpVersion;

/// Uplink neighbours remembered (gateway and the few hosts a tenant talks to on-link).
pub const NEIGHBORS: usize = 16;
/// Ethernet header without a tag.
const ETH_HEADER: usize = 14;
/// Ethernet minimum frame without FCS (IEEE 802.3 §3.2.8): shorter frames are padded to it.
pub const ETH_MIN: usize = 60;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

/// What [`Filter::admit`] decided about a frame from a tenant port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Judge it as usual ([`Filter::process`]).
    Pass,
    /// The switch answered it: send the first `n` bytes of the reply buffer back out of the port
    /// the frame came from; the frame itself goes nowhere.
    Reply(usize),
    /// The switch resolves the frame's target itself: send the first `n` bytes of the reply
    /// buffer (a request the switch built) out of the uplink port(s); the frame goes nowhere.
    Uplink(usize),
    /// Dropped (and counted).
    Drop(DropReason),
}

/// One neighbour: version, address, MAC, and whether its last NA said it is a router.
type Neighbor = (u8, [u8; 16], [u8; 6], bool);

/// Neighbours seen on the uplink (IPv4 in the first 4 bytes of the address).
#[derive(Clone, Copy, Debug)]
pub struct Neighbors {
    entries: [Neighbor; NEIGHBORS],
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
            entries: [(0, [0; 16], [0; 6], false); NEIGHBORS],
            next: 0,
        }
    }

    /// The MAC of uplink neighbour `addr`.
    pub fn get(&self, version: IpVersion, addr: &[u8; 16]) -> Option<[u8; 6]> {
        self.entry(version, addr).map(|(m, _)| m)
    }

    /// The MAC of uplink neighbour `addr`, and whether it is a router (its last NA said so).
    pub fn entry(&self, version: IpVersion, addr: &[u8; 16]) -> Option<([u8; 6], bool)> {
        self.entries
            .iter()
            .find(|(v, a, _, _)| *v == version as u8 && a == addr)
            .map(|e| (e.2, e.3))
    }

    /// Learn `addr` at `mac`; `router`: what an NA said (`None`: not an NA, keep what is known).
    fn learn(&mut self, version: IpVersion, addr: [u8; 16], mac: [u8; 6], router: Option<bool>) {
        if addr == [0; 16] || mac[0] & 1 != 0 || mac == [0; 6] {
            return;
        }
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|(v, a, _, _)| *v == version as u8 && *a == addr)
        {
            e.2 = mac;
            e.3 = router.unwrap_or(e.3);
            return;
        }
        self.entries[self.next] = (version as u8, addr, mac, router.unwrap_or(false));
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

impl<'a> Filter<'a> {
    /// Judge a frame from tenant port `port` at `now_ns` before it is forwarded (see the module
    /// doc). A proxy answer or the switch's own request is built in `reply` (at least
    /// [`super::neighbor::REPLY_MAX`] bytes; shorter: the request is dropped as
    /// [`DropReason::NeighborTarget`]). Drops are counted.
    pub fn admit(&mut self, port: usize, frame: &[u8], now_ns: u64, reply: &mut [u8]) -> Admit {
        let id = *self.tenancy.identity(port);
        if id == PortIdentity::default() {
            return Admit::Pass;
        }
        let a = self.admit_inner(port, &id, frame, now_ns, reply);
        if let Admit::Drop(r) = a {
            self.counters.drops[r as usize] += 1;
        }
        a
    }

    fn admit_inner(
        &mut self,
        port: usize,
        id: &PortIdentity,
        frame: &[u8],
        now_ns: u64,
        reply: &mut [u8],
    ) -> Admit {
        let Some((ethertype, body, at)) = l3(frame) else {
            return Admit::Pass; // `process` counts it as malformed.
        };
        if id.mac == [0; 6] || frame[6..12] != id.mac {
            return Admit::Drop(DropReason::SpoofedMac);
        }
        match EthernetProtocol::from(ethertype) {
            EthernetProtocol::Arp => self.admit_arp(port, id, frame, body, at, now_ns, reply),
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = parse::ipv4_checked(body) else {
                    return Admit::Pass; // `process` counts it as malformed.
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
                    return self.admit_nd(port, id, frame, body, at, now_ns, reply);
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

    /// The MAC of `addr` and whether it is a router: an uplink neighbour, or an address attached
    /// to a tenant port here (not a router).
    pub(super) fn neighbor_entry(
        &self,
        version: IpVersion,
        addr: &[u8; 16],
    ) -> Option<([u8; 6], bool)> {
        // A tenant attached here first: what the VMM says beats what the uplink said before.
        self.tenancy
            .port_of(version, addr)
            .map(|(_, id)| (id.mac, false))
            .filter(|(m, _)| *m != [0; 6])
            .or_else(|| self.neighbors.entry(version, addr))
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
                    self.neighbors.learn(IpVersion::V4, spa, sha, None);
                }
            }
            0x86dd => {
                if body.len() < IPV6_HEADER + ND_LEN + ND_LLA_LEN || body[6] != IPPROTO_ICMPV6 {
                    return;
                }
                let nd = &body[IPV6_HEADER..];
                let (addr, opt, router) = match nd[0] {
                    ICMPV6_NS => (a16(&body[8..24]), ND_OPT_SLLA, None),
                    ICMPV6_NA => (a16(&nd[8..24]), ND_OPT_TLLA, Some(nd[4] & NA_ROUTER != 0)),
                    _ => return,
                };
                let o = &nd[ND_LEN..ND_LEN + ND_LLA_LEN];
                if body[7] == 255
                    && o[0] == opt
                    && o[1] == 1
                    && self.tenancy.owner(IpVersion::V6, &addr).is_none()
                {
                    self.neighbors
                        .learn(IpVersion::V6, addr, mac(&o[2..8]), router);
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
/// the limited broadcast). `ip` is from [`parse::ipv4_checked`]: its header length is at least 20.
fn dhcp_discover(ip: &Ipv4Packet<&[u8]>) -> bool {
    let h = ip.as_ref();
    let hl = usize::from(h[0] & 0x0f) * 4;
    h[9] == IPPROTO_UDP && h[16..20] == [255; 4] && h.get(hl..hl + 4) == Some(&[0, 68, 0, 67][..])
}
