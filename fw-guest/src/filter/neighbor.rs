//! ARP and IPv6 neighbour discovery from a switch's tenant ports: what of them may reach the
//! uplink, and what the switch answers or asks itself.
//!
//! Owns: the field-by-field judgement of a tenant's ARP (RFC 826) and NS/NA (RFC 4861 §4.3/§4.4),
//! the switch's own answers (proxy ARP and proxy NDP) and its own requests on a tenant's behalf,
//! which targets a tenant may have resolved, and the per-port budget of neighbour frames (its
//! bucket type also meters the edge's neighbour frames from the outside).
//! Must not: let a tenant-built request out, resolve a target no attachment or verdict makes
//! legitimate, allocate, keep state beyond the fixed per-port budget (the requests it sends are
//! remembered, for their answers, by [`super::hygiene::Neighbors`]), or walk the verdict table
//! for a frame the port's budget does not cover.
//!
//! Neighbour protocols reach the uplink without a verdict, so a tenant (root in its guest, or a
//! process asking the kernel through netlink to resolve addresses of its choosing) could use
//! them to carry data out: 4 chosen bytes per ARP request, 16 per solicitation. The rules:
//!
//! - **A target the switch knows is answered by the switch** and nothing leaves: a neighbour
//!   learned from the uplink's own ARP/NDP ([`Filter::observe_uplink`]) or an address attached to
//!   another tenant port here. ARP gets a reply with the neighbour's real MAC; an NS gets an NA
//!   (solicited and override set, the router flag as the uplink's own NA said, target link-layer
//!   option, checksum computed), from the target to the soliciting address. Multicast and
//!   unicast (NUD) solicitations alike.
//! - **A tenant's request is never forwarded.** For an unknown target the switch may instead
//!   send its own request: built by the switch from the port's attached MAC, an attached address
//!   (the first one of the target's /24 or /64; the link-local one for a link-local target) and
//!   the target, to the broadcast / solicited-node address, with a zero target hardware address,
//!   no padding. Every byte of it is fixed by the attachment and the target; the tenant's
//!   padding, length, destination MAC, target hardware address, option or source address choice
//!   go nowhere. The answer comes back to the tenant's MAC through the uplink, and the switch
//!   learns it, so later requests are answered here.
//! - **Only legitimate targets are resolved:** the port's gateway (`.1` of an attached /24,
//!   `::1` of an attached /64: the addresses Vigil's subnets give their gateway), or an address a
//!   live egress verdict of the tenant covers (the verdict already lets that tenant send chosen
//!   bytes to that address, so naming it in a request adds no capacity). Anything else:
//!   [`DropReason::NeighborTarget`]. IPv4 targets must be on-link (the attached /24).
//! - **Everything a tenant still sends** (its DAD probe from `::` or `0.0.0.0`, announcements of
//!   its own addresses, replies to a requester the switch saw, NAs for its own addresses) has an
//!   exact length (ARP: 28 bytes, the Ethernet minimum with zero padding at most; NS/NA: 24 bytes
//!   or 32 with the one link-layer option, no padding), zero reserved bits and a correct checksum,
//!   and names only the tenant's own addresses and MAC. Wrong lengths, unknown or extra options,
//!   an option whose MAC is not the port's: [`DropReason::NeighborMalformed`] /
//!   [`DropReason::SpoofedMac`].
//! - **Budget.** Every neighbour frame that leaves for the uplink on a port's behalf (its own
//!   frames above, and the switch's requests for it) takes a token from the port's bucket:
//!   [`BURST`] at most, one more every [`REFILL_NS`] (4 per second). An empty bucket:
//!   [`DropReason::NeighborRate`]. A request for a target the switch does not know takes its
//!   token before the target is judged, and keeps it if the target is refused: judging it walks
//!   the verdict table, which on the shared switch must cost the asking port, at its rate, not
//!   every port. The switch's own answers cost nothing (they go back to the port).
//!
//! **What remains** (a tenant with no verdict at all, trying to signal the uplink): the choice
//! among what it may send, and when. Per frame, the choices are its own addresses (at most
//! [`super::tenancy::PORT_ADDRS`] per family plus the link-local), the learned neighbours it may
//! answer ([`super::hygiene::NEIGHBORS`]), the NA flags, whether the option is present, and the
//! few legitimate unknown targets; well under 8 bits in all. At 4 frames a second (bursts of 8),
//! that is at most 32 bits a second per port from choice, plus the timing of the frames: with a
//! 1 ms resolution seen from the uplink, about 10 bits per frame more, 40 bits a second. A tenant
//! with a verdict has its verdict's flows for data anyway; these bounds are for the neighbour
//! protocols alone.

use core::net::Ipv6Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags,
    NdiscRepr, RawHardwareAddress,
};
use vigil_wire::ring::DropReason;
use vigil_wire::verdict::IpVersion;

use super::hygiene::{Admit, ETH_MIN};
use super::tenancy::{PortIdentity, MAX_PORTS};
use super::Filter;

/// ARP for Ethernet/IPv4 (RFC 826): 8 bytes of header, 2 × (6 + 4) addresses.
pub(super) const ARP_LEN: usize = 28;
/// IPv6 header (RFC 8200).
pub(super) const IPV6_HEADER: usize = 40;
/// NS/NA body without options (type, code, checksum, reserved/flags, target): RFC 4861 §4.3.
pub(super) const ND_LEN: usize = 24;
/// One link-layer address option for Ethernet (type, length 1, MAC): RFC 4861 §4.6.1.
pub(super) const ND_LLA_LEN: usize = 8;
pub(super) const ICMPV6_NS: u8 = 135;
pub(super) const ICMPV6_NA: u8 = 136;
pub(super) const ND_OPT_SLLA: u8 = 1;
pub(super) const ND_OPT_TLLA: u8 = 2;
/// The NA's router flag (RFC 4861 §4.4).
pub(super) const NA_ROUTER: u8 = 0x80;
/// The NA's solicited flag (RFC 4861 §4.4).
pub(super) const NA_SOLICITED: u8 = 0x40;
const BROADCAST: [u8; 6] = [0xff; 6];
/// An untagged NS or NA with one link-layer option: Ethernet + IPv6 + 32 bytes.
pub const ND_FRAME: usize = 14 + IPV6_HEADER + ND_LEN + ND_LLA_LEN;
/// The largest frame the switch builds for [`Filter::admit`] (the reply buffer's minimum).
pub const REPLY_MAX: usize = ND_FRAME;

/// Neighbour frames a port may send to the uplink in a burst.
pub const BURST: u32 = 8;
/// One more token per this many nanoseconds (4 a second).
pub const REFILL_NS: u64 = 250_000_000;

/// Per-port token buckets of neighbour frames toward the uplink (and, with its own rate, the
/// edge's bucket for those from the outside).
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    tokens: [u32; MAX_PORTS],
    /// When the bucket last gained a token (caller clock, ns).
    last_ns: [u64; MAX_PORTS],
    burst: u32,
    refill_ns: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Self::new()
    }
}

impl Budget {
    pub const fn new() -> Budget {
        Budget::with_rate(BURST, REFILL_NS)
    }

    /// Buckets of `burst` tokens, one more every `refill_ns` (at least 1).
    pub const fn with_rate(burst: u32, refill_ns: u64) -> Budget {
        Budget {
            tokens: [burst; MAX_PORTS],
            last_ns: [0; MAX_PORTS],
            burst,
            refill_ns: if refill_ns == 0 { 1 } else { refill_ns },
        }
    }

    /// Take one token of `port`'s bucket at `now_ns`; false when it is empty.
    pub fn take(&mut self, port: usize, now_ns: u64) -> bool {
        let (Some(tokens), Some(last)) = (self.tokens.get_mut(port), self.last_ns.get_mut(port))
        else {
            return false;
        };
        let (burst, refill) = (self.burst, self.refill_ns);
        if *tokens >= burst {
            *last = now_ns;
        } else {
            let gained = now_ns.saturating_sub(*last) / refill;
            if gained > 0 {
                *tokens = (u64::from(*tokens) + gained).min(u64::from(burst)) as u32;
                *last = if *tokens >= burst {
                    now_ns
                } else {
                    *last + gained * refill
                };
            }
        }
        if *tokens == 0 {
            return false;
        }
        *tokens -= 1;
        true
    }
}

fn v4(a: &[u8]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

fn a16(a: &[u8]) -> [u8; 16] {
    let mut o = [0; 16];
    o.copy_from_slice(&a[..16]);
    o
}

fn mac(a: &[u8]) -> [u8; 6] {
    [a[0], a[1], a[2], a[3], a[4], a[5]]
}

/// The solicited-node multicast address of `target` (RFC 4291 §2.7.1) and its MAC (RFC 2464 §7).
pub(super) fn solicited_node(target: &[u8; 16]) -> ([u8; 16], [u8; 6]) {
    let mut a = [0u8; 16];
    a[0] = 0xff;
    a[1] = 0x02;
    a[11] = 0x01;
    a[12] = 0xff;
    a[13..].copy_from_slice(&target[13..]);
    (a, [0x33, 0x33, 0xff, target[13], target[14], target[15]])
}

/// The port's gateway: `.1` of an attached /24, `::1` of an attached /64.
fn gateway(id: &PortIdentity, version: IpVersion, target: &[u8; 16]) -> bool {
    match version {
        IpVersion::V4 => target[3] == 1 && id.on_link_v4(v4(target)),
        IpVersion::V6 => target[8..15] == [0; 7] && target[15] == 1 && id.on_link_v6(target),
    }
}

fn link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

impl<'a> Filter<'a> {
    /// A neighbour frame of the tenant's own goes to the uplink if the port's budget allows.
    fn pass_budgeted(&mut self, port: usize, now_ns: u64) -> Admit {
        if self.neighbor_budget.take(port, now_ns) {
            Admit::Pass
        } else {
            Admit::Drop(DropReason::NeighborRate)
        }
    }

    /// Whether the switch may resolve `target` for the tenant behind `port` (see the module doc).
    /// Not the gateway: a walk over the verdict table, so only after a token was taken.
    fn may_resolve(
        &self,
        port: usize,
        id: &PortIdentity,
        version: IpVersion,
        target: &[u8; 16],
        now_ns: u64,
    ) -> bool {
        gateway(id, version, target)
            || self
                .verdicts
                .opens_egress_to(self.tenancy.port(port), version, target, now_ns)
    }

    /// The switch's own request for an unknown `target`, built in `out`, if the port's budget
    /// allows and `target` is legitimate. The token is taken before the target is judged, and
    /// kept whatever the judgement: the judgement walks the verdict table, and the switch is
    /// shared, so a tenant asking for targets it may not have resolved spends its own budget,
    /// not every tenant's CPU (a flood costs one bucket check a frame).
    fn resolve(
        &mut self,
        port: usize,
        id: &PortIdentity,
        version: IpVersion,
        target: &[u8; 16],
        now_ns: u64,
        out: &mut [u8],
    ) -> Admit {
        if out.len() < REPLY_MAX {
            return Admit::Drop(DropReason::NeighborTarget);
        }
        if !self.neighbor_budget.take(port, now_ns) {
            return Admit::Drop(DropReason::NeighborRate);
        }
        if !self.may_resolve(port, id, version, target, now_ns) {
            return Admit::Drop(DropReason::NeighborTarget);
        }
        self.counters.neighbor_resolved += 1;
        // Its answer may bind or move the target's entry (claims cannot: see `Neighbors`).
        self.neighbors.expect(version, *target, now_ns);
        let n = match version {
            IpVersion::V4 => {
                let t = v4(target);
                // The caller checked the target is on-link: some attached address shares its /24.
                let from = id
                    .v4
                    .iter()
                    .copied()
                    .find(|a| *a != [0; 4] && a[..3] == t[..3])
                    .unwrap_or([0; 4]);
                arp_frame(
                    out,
                    ArpOperation::Request,
                    BROADCAST,
                    id.mac,
                    from,
                    [0; 6],
                    t,
                )
            }
            IpVersion::V6 => {
                let from = if link_local(target) {
                    id.link_local()
                } else {
                    id.v6
                        .iter()
                        .copied()
                        .find(|a| *a != [0; 16] && a[..8] == target[..8])
                        .unwrap_or_else(|| id.link_local())
                };
                let (sn, sn_mac) = solicited_node(target);
                let ns = NdiscRepr::NeighborSolicit {
                    target_addr: Ipv6Addr::from(*target),
                    lladdr: lladdr(id.mac),
                };
                nd_frame(out, sn_mac, id.mac, from, sn, ns)
            }
        };
        Admit::Uplink(n)
    }

    /// An ARP frame from tenant port `port` (its L3 bytes `body` at offset `at` of `frame`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn admit_arp(
        &mut self,
        port: usize,
        id: &PortIdentity,
        frame: &[u8],
        body: &[u8],
        at: usize,
        now_ns: u64,
        reply: &mut [u8],
    ) -> Admit {
        let Ok(arp) = ArpPacket::new_checked(body) else {
            return Admit::Drop(DropReason::NeighborMalformed);
        };
        // Exactly the message, or the message zero-padded to the Ethernet minimum: nothing in
        // the length or the padding.
        let end = at + ARP_LEN;
        let length_ok = frame.len() == end || (end < ETH_MIN && frame.len() == ETH_MIN);
        if body.len() < ARP_LEN
            || !length_ok
            || arp.hardware_len() != 6
            || arp.protocol_len() != 4
            || u16::from(arp.protocol_type()) != 0x0800
            || u16::from(arp.hardware_type()) != 1
            || frame[end..].iter().any(|&b| b != 0)
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
                if tha != [0; 6] {
                    // Linux and RFC 5227 leave it zero in requests: 6 chosen bytes otherwise.
                    return Admit::Drop(DropReason::NeighborMalformed);
                }
                if probe || spa == tpa {
                    // A probe or an announcement of its own address: every byte predictable.
                    return if dst == BROADCAST {
                        self.pass_budgeted(port, now_ns)
                    } else {
                        Admit::Drop(DropReason::NeighborMalformed)
                    };
                }
                let target = vigil_wire::verdict::v4(tpa);
                if let Some((m, _)) = self.neighbor_entry(IpVersion::V4, &target) {
                    self.counters.neighbor_answered += 1;
                    return arp_reply(reply, m, tpa, id.mac, spa);
                }
                if !id.on_link_v4(tpa) {
                    return Admit::Drop(DropReason::NeighborTarget);
                }
                self.resolve(port, id, IpVersion::V4, &target, now_ns, reply)
            }
            ArpOperation::Reply => {
                // Answers a requester the switch knows, to its MAC.
                let to = vigil_wire::verdict::v4(tpa);
                match self.neighbor_entry(IpVersion::V4, &to) {
                    Some((m, _)) if m == tha && dst == tha => self.pass_budgeted(port, now_ns),
                    _ => Admit::Drop(DropReason::NeighborTarget),
                }
            }
            _ => Admit::Drop(DropReason::NeighborMalformed),
        }
    }

    /// An NS or NA from tenant port `port` (its IPv6 bytes `body` at offset `at` of `frame`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn admit_nd(
        &mut self,
        port: usize,
        id: &PortIdentity,
        frame: &[u8],
        body: &[u8],
        at: usize,
        now_ns: u64,
        reply: &mut [u8],
    ) -> Admit {
        let payload = usize::from(u16::from_be_bytes([body[4], body[5]]));
        let nd = &body[IPV6_HEADER..];
        let src = a16(&body[8..24]);
        let dst = a16(&body[24..40]);
        let emac = mac(&frame[0..6]);
        // Version 6, traffic class and flow label zero; hop limit 255; code 0; the exact length
        // (24 bytes, or 32 with one option; longer than the Ethernet minimum, so no padding).
        let fixed = body[0] == 0x60
            && body[1..4] == [0; 3]
            && body[7] == 255
            && (payload == ND_LEN || payload == ND_LEN + ND_LLA_LEN)
            && frame.len() == at + IPV6_HEADER + payload
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
            self.admit_ns(
                port,
                id,
                src,
                dst,
                emac,
                target,
                option.is_some(),
                now_ns,
                reply,
            )
        } else {
            self.admit_na(port, id, nd, src, dst, emac, target, now_ns)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn admit_ns(
        &mut self,
        port: usize,
        id: &PortIdentity,
        src: [u8; 16],
        dst: [u8; 16],
        emac: [u8; 6],
        target: [u8; 16],
        has_option: bool,
        now_ns: u64,
        reply: &mut [u8],
    ) -> Admit {
        let (sn, sn_mac) = solicited_node(&target);
        let to_solicited = dst == sn && emac == sn_mac;
        if src == [0; 16] {
            // DAD (RFC 4862 §5.4.2): from ::, to the solicited-node address, no source
            // link-layer option, for its own address.
            if has_option || !id.has_v6(&target) {
                return Admit::Drop(DropReason::SpoofedNeighbor);
            }
            return if to_solicited {
                self.pass_budgeted(port, now_ns)
            } else {
                Admit::Drop(DropReason::NeighborMalformed)
            };
        }
        if !id.has_v6(&src) {
            return Admit::Drop(DropReason::SpoofedSource);
        }
        // Multicast to the target's solicited-node address, or unicast to the target (NUD).
        if !to_solicited && (dst != target || emac[0] & 1 != 0) {
            return Admit::Drop(DropReason::NeighborMalformed);
        }
        if id.has_v6(&target) {
            // Its own address: nobody else has it (the VMM attached it here).
            return Admit::Drop(DropReason::NeighborTarget);
        }
        if let Some((m, router)) = self.neighbor_entry(IpVersion::V6, &target) {
            self.counters.neighbor_answered += 1;
            let mut flags = NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE;
            if router {
                flags |= NdiscNeighborFlags::ROUTER;
            }
            let na = NdiscRepr::NeighborAdvert {
                flags,
                target_addr: Ipv6Addr::from(target),
                lladdr: lladdr(m),
            };
            if reply.len() < ND_FRAME {
                return Admit::Drop(DropReason::NeighborTarget);
            }
            return Admit::Reply(nd_frame(reply, id.mac, m, target, src, na));
        }
        self.resolve(port, id, IpVersion::V6, &target, now_ns, reply)
    }

    #[allow(clippy::too_many_arguments)]
    fn admit_na(
        &mut self,
        port: usize,
        id: &PortIdentity,
        nd: &[u8],
        src: [u8; 16],
        dst: [u8; 16],
        emac: [u8; 6],
        target: [u8; 16],
        now_ns: u64,
    ) -> Admit {
        // Flags R/S/O only (RFC 4861 §4.4), for an address of the tenant's, from it.
        if nd[4] & 0x1f != 0 || nd[5..8] != [0; 3] {
            return Admit::Drop(DropReason::NeighborMalformed);
        }
        if !id.has_v6(&target) || !id.has_v6(&src) {
            return Admit::Drop(DropReason::SpoofedNeighbor);
        }
        let mut all_nodes = [0u8; 16];
        all_nodes[0] = 0xff;
        all_nodes[1] = 0x02;
        all_nodes[15] = 1;
        let ok = (dst == all_nodes && emac == [0x33, 0x33, 0, 0, 0, 1])
            || self
                .neighbor_entry(IpVersion::V6, &dst)
                .is_some_and(|(m, _)| m == emac);
        if ok {
            self.pass_budgeted(port, now_ns)
        } else {
            Admit::Drop(DropReason::NeighborTarget)
        }
    }
}

/// An Ethernet/IPv4 ARP frame (RFC 826), zero-padded to the Ethernet minimum; its length.
fn arp_frame(
    o: &mut [u8],
    operation: ArpOperation,
    eth_dst: [u8; 6],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
) -> usize {
    let o = &mut o[..ETH_MIN];
    o.fill(0);
    let mut frame = EthernetFrame::new_unchecked(&mut *o);
    EthernetRepr {
        src_addr: EthernetAddress(sha),
        dst_addr: EthernetAddress(eth_dst),
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut frame);
    ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr: EthernetAddress(sha),
        source_protocol_addr: spa.into(),
        target_hardware_addr: EthernetAddress(tha),
        target_protocol_addr: tpa.into(),
    }
    .emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    ETH_MIN
}

/// The proxy ARP reply: `owner_mac` has `owner_ip`, told to `to_mac`/`to_ip`.
fn arp_reply(
    out: &mut [u8],
    owner_mac: [u8; 6],
    owner_ip: [u8; 4],
    to_mac: [u8; 6],
    to_ip: [u8; 4],
) -> Admit {
    if out.len() < ETH_MIN {
        return Admit::Drop(DropReason::NeighborTarget);
    }
    Admit::Reply(arp_frame(
        out,
        ArpOperation::Reply,
        to_mac,
        owner_mac,
        owner_ip,
        to_mac,
        to_ip,
    ))
}

/// An untagged NS or NA (`nd`) from `eth_src`/`src` to `eth_dst`/`dst`, hop limit 255 (RFC 4861
/// §7.1), its checksum computed; its length ([`ND_FRAME`] with one link-layer option).
fn nd_frame(
    o: &mut [u8],
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    nd: NdiscRepr<'_>,
) -> usize {
    let icmp = Icmpv6Repr::Ndisc(nd);
    let (src, dst) = (Ipv6Addr::from(src), Ipv6Addr::from(dst));
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp.buffer_len(),
        hop_limit: 255,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(eth_src),
        dst_addr: EthernetAddress(eth_dst),
        ethertype: EthernetProtocol::Ipv6,
    };
    let len = eth.buffer_len() + ip.buffer_len() + icmp.buffer_len();
    let o = &mut o[..len];
    o.fill(0);
    let mut frame = EthernetFrame::new_unchecked(&mut *o);
    eth.emit(&mut frame);
    let mut packet = Ipv6Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet);
    icmp.emit(
        &src,
        &dst,
        &mut Icmpv6Packet::new_unchecked(packet.payload_mut()),
        &ChecksumCapabilities::default(),
    );
    len
}

/// `m` as a link-layer address option's address.
fn lladdr(m: [u8; 6]) -> Option<RawHardwareAddress> {
    Some(EthernetAddress(m).into())
}
