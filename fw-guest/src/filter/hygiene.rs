//! Layer-2 and layer-3 hygiene at a switch's tenant ports: what a tenant may send as, and the
//! neighbour protocols (ARP, IPv6 neighbour discovery) that bypass the verdicts.
//!
//! A tenant port's identity ([`PortIdentity`]) is what `Attach` records gave it: a MAC and up to
//! [`super::tenancy::PORT_ADDRS`] addresses per family. A frame from the port must be untagged
//! (the port is an access port: a tenant-chosen 802.1Q tag would pick the VLAN, or the priority,
//! of its frames on the edge's outside link; [`DropReason::VlanTagged`]), carry that MAC as its
//! Ethernet source, and an IP packet one of those addresses (or the EUI-64 link-local of the
//! MAC; or, for a DHCP discover, 0.0.0.0) as its source, and a unicast one a unicast Ethernet
//! destination ([`DropReason::UnicastToGroup`]). ARP and neighbour discovery are
//! judged field by field, because they reach the uplink without a verdict: every byte of them
//! must be one the switch can predict, so they carry no tenant-chosen data out of the host.
//! The other way, a port takes only what is addressed to it: its MAC or a group, and IP packets
//! for its own addresses or a group ([`Filter::process_to_port`]), so a frame the switch floods,
//! or one aimed at the port's MAC, cannot reach it through a verdict bound to no address.
//!
//! ARP and neighbour discovery (what may reach the uplink, what the switch answers itself, what
//! it resolves on a tenant's behalf, and the residual channel) are in [`super::neighbor`].
//!
//! Ports with no identity (a boot-time tenant the VMM never attached: the static `vigil run`
//! configuration) are not judged here: there is nothing to judge against.
//!
//! The uplink neighbour table is small ([`NEIGHBORS`] entries) and filled only from uplink frames,
//! which a tenant cannot send; the uplink is not trusted either ([`Neighbors`]: an unsolicited
//! claim never moves a live binding nor pushes one out).

use smoltcp::wire::{ArpOperation, ArpPacket, EthernetFrame, EthernetProtocol, Ipv4Packet};
use vigil_wire::ring::DropReason;

use super::neighbor::{
    ARP_LEN, ICMPV6_NA, ICMPV6_NS, IPV6_HEADER, NA_ROUTER, NA_SOLICITED, ND_LEN, ND_LLA_LEN,
    ND_OPT_SLLA, ND_OPT_TLLA,
};
use super::parse::{self, ETHERTYPE_QINQ, ETHERTYPE_VLAN};
use super::tenancy::PortIdentity;
use super::{Decision, Direction, Filter};
use vigil_wire::verdict::IpVersion;

/// Uplink neighbours remembered (gateway and the few hosts a tenant talks to on-link).
pub const NEIGHBORS: usize = 16;
/// Neighbour frames the edge lets in from the outside in a burst (its gateways asking for
/// tenants, and answering them).
pub const OUTSIDE_BURST: u32 = 64;
/// One more every this many nanoseconds (32 a second: a gateway re-confirms each tenant it talks
/// to every 30-40 s, so a few hundred tenants).
pub const OUTSIDE_REFILL_NS: u64 = 31_250_000;
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

/// One uplink neighbour (IPv4 in the first 4 bytes of the address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Neighbor {
    /// `IpVersion as u8`; 0: a free entry.
    version: u8,
    addr: [u8; 16],
    mac: [u8; 6],
    /// Its last NA said it is a router.
    router: bool,
    /// When a frame from `mac` last claimed `addr` (caller clock, ns).
    seen_ns: u64,
}

const FREE: Neighbor = Neighbor {
    version: 0,
    addr: [0; 16],
    mac: [0; 6],
    router: false,
    seen_ns: 0,
};

/// A binding that no frame from its MAC has claimed for this long is stale: an unsolicited
/// claim may move it, and a new neighbour may take its entry. A live neighbour speaks more often
/// (Linux re-confirms a neighbour in use every 30-40 s; a gateway that sends to a tenant asks
/// for it, which the switch sees).
pub const NEIGHBOR_STALE_NS: u64 = 120_000_000_000;
/// How long an answer to the switch's own request is awaited.
pub const ANSWER_WINDOW_NS: u64 = 3_000_000_000;
/// Requests of the switch's own awaiting an answer.
const PENDING: usize = 8;

/// Neighbours seen on the uplink, and the switch's own requests awaiting their answer.
///
/// What the uplink says is believed only so far: a frame that merely claims an address (a
/// request's sender, a gratuitous ARP, an unsolicited NA) binds an address nobody holds, in a
/// free or stale entry, and never moves a live binding to another MAC nor pushes one out; the
/// first answer to a request the switch sent itself ([`Neighbors::expect`]) binds or moves it,
/// and may replace the least recently confirmed entry. A live binding moves only when its
/// neighbour has not spoken for [`NEIGHBOR_STALE_NS`].
#[derive(Clone, Copy, Debug)]
pub struct Neighbors {
    entries: [Neighbor; NEIGHBORS],
    /// (version, target, until_ns) of the switch's requests not yet answered; version 0: free.
    pending: [(u8, [u8; 16], u64); PENDING],
    next_pending: usize,
    /// Unsolicited claims that would have moved a live binding (ignored).
    pub conflicts: u64,
}

impl Default for Neighbors {
    fn default() -> Self {
        Self::new()
    }
}

impl Neighbors {
    pub const fn new() -> Neighbors {
        Neighbors {
            entries: [FREE; NEIGHBORS],
            pending: [(0, [0; 16], 0); PENDING],
            next_pending: 0,
            conflicts: 0,
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
            .find(|e| e.version == version as u8 && e.addr == *addr)
            .map(|e| (e.mac, e.router))
    }

    /// The switch sent a request for `target` at `now_ns`: its first answer is believed.
    pub(super) fn expect(&mut self, version: IpVersion, target: [u8; 16], now_ns: u64) {
        self.pending[self.next_pending] = (version as u8, target, now_ns + ANSWER_WINDOW_NS);
        self.next_pending = (self.next_pending + 1) % PENDING;
    }

    /// Whether a frame naming `addr` as its sender answers a request of the switch's (the
    /// request is then answered: later answers are claims like any other).
    fn answers(&mut self, version: IpVersion, addr: &[u8; 16], now_ns: u64) -> bool {
        let Some(p) = self
            .pending
            .iter_mut()
            .find(|p| p.0 == version as u8 && p.1 == *addr && now_ns < p.2)
        else {
            return false;
        };
        p.0 = 0;
        true
    }

    /// Learn `addr` at `mac` at `now_ns`; `router`: what an NA said (`None`: not an NA, keep
    /// what is known); `answer`: the frame answers the switch's own request (see the type's doc).
    /// Whether the table now binds `addr` to `mac` (a claim it refused, or could not record, is
    /// one the tenants must not hear either: [`Filter::observe_uplink`]); the unspecified
    /// address claims nothing.
    fn learn(
        &mut self,
        version: IpVersion,
        addr: [u8; 16],
        mac: [u8; 6],
        router: Option<bool>,
        answer: bool,
        now_ns: u64,
    ) -> bool {
        if addr == [0; 16] {
            return true;
        }
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return false;
        }
        let stale = |e: &Neighbor| now_ns.saturating_sub(e.seen_ns) >= NEIGHBOR_STALE_NS;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.version == version as u8 && e.addr == addr)
        {
            if e.mac != mac && !answer && !stale(e) {
                // Another MAC claims a live binding unasked: a spoofer, most likely (a gateway
                // that really moved is learned once its old MAC has gone quiet, or from the
                // answer to the switch's next request).
                self.conflicts += 1;
                return false;
            }
            e.mac = mac;
            e.router = router.unwrap_or(e.router);
            e.seen_ns = now_ns;
            return true;
        }
        let free = self.entries.iter().position(|e| e.version == 0);
        let slot = free
            .or_else(|| self.entries.iter().position(stale))
            .or_else(|| {
                // Only an answer pushes a live neighbour out (the least recently heard): the
                // switch's requests are bounded by the ports' budgets, claims are not.
                answer.then(|| {
                    (0..NEIGHBORS)
                        .min_by_key(|&i| self.entries[i].seen_ns)
                        .unwrap_or(0)
                })
            });
        let Some(slot) = slot else {
            self.conflicts += 1;
            return false;
        };
        self.entries[slot] = Neighbor {
            version: version as u8,
            addr,
            mac,
            router: router.unwrap_or(false),
            seen_ns: now_ns,
        };
        true
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
        if frame.get(12..14) == Some(&ETHERTYPE_VLAN.to_be_bytes()[..]) {
            return Admit::Drop(DropReason::VlanTagged);
        }
        let Some((ethertype, body, at)) = l3(frame) else {
            return Admit::Pass; // `process` counts it as malformed.
        };
        if id.mac == [0; 6] || frame[6..12] != id.mac {
            return Admit::Drop(DropReason::SpoofedMac);
        }
        // A unicast packet goes to one machine's MAC: in a group frame it would reach every
        // machine on the way (the edge's outside link floods it), a listener on that segment
        // included, whatever address the verdict opens.
        let group = frame[0] & 1 != 0;
        match EthernetProtocol::from(ethertype) {
            EthernetProtocol::Arp => self.admit_arp(port, id, frame, body, at, now_ns, reply),
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = parse::ipv4_checked(body) else {
                    return Admit::Pass; // `process` counts it as malformed.
                };
                let h = ip.as_ref();
                let src = v4(&h[12..16]);
                if !(id.has_v4(src) || (src == [0; 4] && dhcp_discover(&ip))) {
                    return Admit::Drop(DropReason::SpoofedSource);
                }
                let d = v4(&h[16..20]);
                if group
                    && d[0] & 0xf0 != 0xe0
                    && d != [255; 4]
                    && !(d[3] == 255 && id.on_link_v4(d))
                {
                    return Admit::Drop(DropReason::UnicastToGroup);
                }
                Admit::Pass
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
                if !id.has_v6(&a16(&body[8..24])) {
                    return Admit::Drop(DropReason::SpoofedSource);
                }
                if group && body[24] != 0xff {
                    return Admit::Drop(DropReason::UnicastToGroup);
                }
                Admit::Pass
            }
            EthernetProtocol::Unknown(_) => Admit::Pass,
        }
    }

    /// Judge a frame the switch is about to deliver to tenant port `port` (from the uplink or
    /// another tenant port) at `now_ns`: ingress for the port's tenant ([`Filter::process`]),
    /// once it is addressed to the port. A port with an identity takes only unicast frames for
    /// its own MAC, and IP packets for one of its own addresses (its EUI-64 link-local included)
    /// or for a group: IPv4 multicast, the limited broadcast or its /24's broadcast, IPv6
    /// multicast. Anything else is [`DropReason::UnknownTenant`] (counted).
    ///
    /// Why: a verdict may name no local address (a listen on the wildcard address: any of the
    /// tenant's own), and the switch floods an uplink frame whose destination MAC it has not
    /// learned (a tenant silent since the switch started, or restarted) to every tenant port.
    /// Without this check such a frame for tenant C matched tenant B's wildcard verdict on the
    /// same port number and was delivered to B too, and after a restart, when every verdict
    /// adopts, B's entry adopted C's established connections: B read C's traffic. A tenant could
    /// also reach another through a verdict to any third address by aiming the frame at the
    /// other's MAC.
    pub fn process_to_port(&mut self, port: usize, frame: &[u8], now_ns: u64) -> Decision {
        if let Some(reason) = self.misaddressed(port, frame) {
            return self.drop_frame(reason);
        }
        self.process(self.tenancy.port(port), Direction::Ingress, frame, now_ns)
    }

    /// Why a frame is not addressed to tenant port `port` (see [`Filter::process_to_port`]);
    /// `None`: it is, or the port has no identity, or the frame is not IP (the filter judges
    /// what it cannot parse).
    fn misaddressed(&self, port: usize, frame: &[u8]) -> Option<DropReason> {
        let id = self.tenancy.identity(port);
        if *id == PortIdentity::default() {
            return None;
        }
        let dst_mac = mac(frame.get(..6)?);
        if dst_mac[0] & 1 == 0 && dst_mac != id.mac {
            return Some(DropReason::UnknownTenant);
        }
        let (ethertype, body, _) = l3(frame)?;
        let ours = match ethertype {
            0x0800 => {
                let ip = parse::ipv4_checked(body).ok()?;
                let d = v4(&ip.as_ref()[16..20]);
                id.has_v4(d)
                    || d[0] & 0xf0 == 0xe0
                    || d == [255; 4]
                    || (d[3] == 255 && id.on_link_v4(d))
            }
            0x86dd => {
                let d = a16(body.get(24..40)?);
                d[0] == 0xff || id.has_v6(&d)
            }
            _ => return None,
        };
        (!ours).then_some(DropReason::UnknownTenant)
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
    /// every frame arriving on an uplink port at `now_ns`; anything else is ignored at the cost
    /// of an EtherType compare). An address attached to a tenant is never learned from the
    /// uplink, and a live binding moves only for an answer to the switch's own request (see
    /// [`Neighbors`]).
    ///
    /// `Some`: the frame must not reach the tenant ports (drop it, counted here). A tenant's stack
    /// believes what it hears: Linux rebinds a neighbour to the sender's link-layer address of
    /// any ARP packet or solicitation naming it, unasked. So what the switch refuses to believe
    /// the tenants must not hear: a claim of another MAC for an address the switch holds live,
    /// or one it could not record ([`DropReason::SpoofedNeighbor`]); and neighbour discovery
    /// whose options are not exactly one link-layer address option (another option before it
    /// would hide a claim the switch does not read: [`DropReason::NeighborMalformed`]). The
    /// edge lets only its gateways' addresses through, but not their MACs: anyone on its outside
    /// link could otherwise have sent "who has the tenant, tell the gateway" from its own MAC
    /// and become every tenant's gateway.
    pub fn observe_uplink(&mut self, frame: &[u8], now_ns: u64) -> Option<DropReason> {
        let reason = self.uplink_claim(frame, now_ns);
        if let Some(r) = reason {
            self.counters.drops[r as usize] += 1;
        }
        reason
    }

    fn uplink_claim(&mut self, frame: &[u8], now_ns: u64) -> Option<DropReason> {
        let (ethertype, body, _) = l3(frame)?;
        let (version, addr, lla, router, answer) = match ethertype {
            0x0806 => {
                // Anything else is malformed to `process`.
                let arp = ArpPacket::new_checked(body).ok()?;
                if body.len() < ARP_LEN || arp.hardware_len() != 6 || arp.protocol_len() != 4 {
                    return None;
                }
                let (sha, spa) = (mac(&body[8..14]), v4_16(v4(&body[14..18])));
                let answer = arp.operation() == ArpOperation::Reply
                    && self.tenancy.owner(IpVersion::V4, &spa).is_none()
                    && self.neighbors.answers(IpVersion::V4, &spa, now_ns);
                (IpVersion::V4, spa, sha, None, answer)
            }
            0x86dd => {
                if body.len() < IPV6_HEADER + ND_LEN || body[6] != IPPROTO_ICMPV6 {
                    return None;
                }
                let nd = &body[IPV6_HEADER..];
                let (addr, opt, router) = match nd[0] {
                    ICMPV6_NS => (a16(&body[8..24]), ND_OPT_SLLA, None),
                    ICMPV6_NA => (a16(&nd[8..24]), ND_OPT_TLLA, Some(nd[4] & NA_ROUTER != 0)),
                    _ => return None,
                };
                if body[7] != 255 || addr == [0; 16] {
                    // Dropped by `process` / DAD, which claims nothing.
                    return None;
                }
                // The options, as far as the IPv6 payload length says (what the tenant reads).
                let end = IPV6_HEADER + usize::from(u16::from_be_bytes([body[4], body[5]]));
                let opts = body.get(IPV6_HEADER + ND_LEN..end)?;
                let lla = match opts {
                    [] => return None,
                    [o, 1, m @ ..] if *o == opt && m.len() == ND_LLA_LEN - 2 => mac(m),
                    _ => return Some(DropReason::NeighborMalformed),
                };
                // A solicited NA (RFC 4861 §4.4: S set) may answer the switch's request.
                let answer = nd[0] == ICMPV6_NA
                    && nd[4] & NA_SOLICITED != 0
                    && self.tenancy.owner(IpVersion::V6, &addr).is_none()
                    && self.neighbors.answers(IpVersion::V6, &addr, now_ns);
                (IpVersion::V6, addr, lla, router, answer)
            }
            _ => return None,
        };
        if self.tenancy.owner(version, &addr).is_some() {
            // Never learned from the uplink (what the VMM attached beats what the uplink says);
            // the edge lets no claim of a tenant's address out of its outside.
            return None;
        }
        let believed = self
            .neighbors
            .learn(version, addr, lla, router, answer, now_ns);
        (!believed).then_some(DropReason::SpoofedNeighbor)
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

    /// Edge, outside side: ARP and neighbour discovery from the outside reach the cloud (and the
    /// switches' neighbour tables, [`Filter::observe_uplink`]) only as what the cloud needs from
    /// there: its gateways' requests for a tenant's address and their answers to a tenant's
    /// request. The sender must be a gateway the edge expects ([`super::Tenancy::is_gateway`]: `.1` /
    /// `::1` of an attached subnet, never a tenant's address), its link-layer address the
    /// frame's Ethernet source, and the target (the ARP target, the NS target, the NA's IPv6
    /// destination) an attached address; an NA must be solicited. Gratuitous ARPs and unsolicited
    /// NAs, claims of tenant or any other addresses, and requests for anything but a tenant are
    /// dropped ([`DropReason::SpoofedNeighbor`], [`DropReason::SpoofedMac`],
    /// [`DropReason::NeighborTarget`], [`DropReason::NeighborMalformed`]); so is whatever passes
    /// beyond the outside's budget ([`OUTSIDE_BURST`], one more every [`OUTSIDE_REFILL_NS`]:
    /// [`DropReason::NeighborRate`]), whose token is taken before the gateway check (a walk
    /// over the address table). `None`: pass, counted by [`Filter::process_edge`] as ARP / NDP.
    pub(super) fn edge_outside_neighbor(
        &mut self,
        frame: &[u8],
        now_ns: u64,
    ) -> Option<DropReason> {
        let (ethertype, body, _) = l3(frame)?;
        let src_mac = mac(&frame[6..12]);
        let owned = |f: &Self, v: IpVersion, a: &[u8; 16]| f.tenancy.owner(v, a).is_some();
        let (version, sender, target) = match ethertype {
            0x0806 => {
                let Ok(arp) = ArpPacket::new_checked(body) else {
                    return Some(DropReason::NeighborMalformed);
                };
                if body.len() < ARP_LEN
                    || arp.hardware_len() != 6
                    || arp.protocol_len() != 4
                    || !matches!(arp.operation(), ArpOperation::Request | ArpOperation::Reply)
                {
                    return Some(DropReason::NeighborMalformed);
                }
                if mac(&body[8..14]) != src_mac {
                    return Some(DropReason::SpoofedMac);
                }
                let (spa, tpa) = (v4_16(v4(&body[14..18])), v4_16(v4(&body[24..28])));
                (IpVersion::V4, spa, tpa)
            }
            0x86dd => {
                if body.len() < IPV6_HEADER + ND_LEN || body[6] != IPPROTO_ICMPV6 {
                    return None; // not neighbour discovery: judged as usual.
                }
                let nd = &body[IPV6_HEADER..];
                let (src, dst, target) = (a16(&body[8..24]), a16(&body[24..40]), a16(&nd[8..24]));
                let (sender, to, opt) = match nd[0] {
                    // A gateway asking for a tenant's address (DAD from `::` is no gateway's).
                    ICMPV6_NS => (src, target, ND_OPT_SLLA),
                    // A gateway's answer, to the tenant that asked.
                    ICMPV6_NA if nd[4] & NA_SOLICITED != 0 => (target, dst, ND_OPT_TLLA),
                    ICMPV6_NA => return Some(DropReason::NeighborTarget),
                    _ => return None,
                };
                // Its options (as far as the IPv6 payload length says: what a receiver reads)
                // are none or its link-layer address option alone, naming the frame's source:
                // another option first would hide one that names someone else.
                let end = IPV6_HEADER + usize::from(u16::from_be_bytes([body[4], body[5]]));
                match body.get(IPV6_HEADER + ND_LEN..end) {
                    Some([]) => {}
                    Some([o, 1, m @ ..]) if *o == opt && m.len() == ND_LLA_LEN - 2 => {
                        if *m != src_mac {
                            return Some(DropReason::SpoofedMac);
                        }
                    }
                    _ => return Some(DropReason::NeighborMalformed),
                }
                (IpVersion::V6, sender, to)
            }
            _ => return None,
        };
        if owned(self, version, &sender) {
            return Some(DropReason::SpoofedNeighbor);
        }
        if !owned(self, version, &target) {
            return Some(DropReason::NeighborTarget);
        }
        if !self.outside_budget.take(0, now_ns) {
            return Some(DropReason::NeighborRate);
        }
        if !self.tenancy.is_gateway(version, &sender) {
            return Some(DropReason::SpoofedNeighbor);
        }
        None
    }

    /// The uplink neighbours learned so far.
    pub fn neighbors(&self) -> &Neighbors {
        &self.neighbors
    }
}

/// (Edge) [`DropReason::UnicastToGroup`] for a unicast IP packet in a broadcast or multicast
/// frame: the cloud port floods such a frame to every host (and each switch to every tenant
/// port), so one frame from the outside became one per host. The cost on the common path is a
/// bit test of the destination MAC.
#[inline]
pub(super) fn unicast_to_group(frame: &[u8]) -> Option<DropReason> {
    if frame.first()? & 1 == 0 {
        return None;
    }
    let (ethertype, body, _) = l3(frame)?;
    let unicast = match ethertype {
        0x0800 => {
            let d = body.get(16..20)?;
            d[0] & 0xf0 != 0xe0 && d != [255; 4]
        }
        0x86dd => *body.get(24)? != 0xff,
        _ => return None,
    };
    unicast.then_some(DropReason::UnicastToGroup)
}

/// Whether an IPv4 packet from 0.0.0.0 is a DHCP client message (RFC 2131 §4.1: UDP 68 → 67, to
/// the limited broadcast). `ip` is from [`parse::ipv4_checked`]: its header length is at least 20.
fn dhcp_discover(ip: &Ipv4Packet<&[u8]>) -> bool {
    let h = ip.as_ref();
    let hl = usize::from(h[0] & 0x0f) * 4;
    h[9] == IPPROTO_UDP && h[16..20] == [255; 4] && h.get(hl..hl + 4) == Some(&[0, 68, 0, 67][..])
}
