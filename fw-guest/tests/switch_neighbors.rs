//! ARP and neighbour discovery at the switch's tenant ports (issue #12, part 2): the switch
//! answers what it knows (proxy ARP and NDP), resolves only legitimate targets itself, lets no
//! tenant-built request out, drops malformed or oversized frames, and bounds how many neighbour
//! frames a port sends to the uplink; what the uplink claims moves no live binding (only the
//! answer to the switch's own request does) and floods push none out. Crafted frames through
//! the native filter.

mod frames;

use frames::switch::*;
use frames::*;
use fw_guest::filter::neighbor::{BURST, REFILL_NS, REPLY_MAX};
use fw_guest::filter::{Admit, DropReason, Filter, IpVersion, VerdictRepr};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, Icmpv6Packet, Icmpv6Repr, Ipv6Packet, NdiscNeighborFlags,
    NdiscRepr, RawHardwareAddress,
};

fn dropped(r: DropReason) -> Admit {
    Admit::Drop(r)
}

/// The uplink's gateway advertises 2001:db8::1 at `G_MAC`, as a router (an NA to all nodes).
fn learn_gateway6(f: &mut Filter<'_>) {
    let all_nodes = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let na = nd_raw(
        G_MAC,
        [0x33, 0x33, 0, 0, 0, 1],
        GW6,
        all_nodes,
        &na_body(0x80 | 0x20, GW6, G_MAC),
    );
    f.observe_uplink(&na, 0);
    assert_eq!(
        f.neighbors().entry(IpVersion::V6, &GW6),
        Some((G_MAC, true))
    );
}

/// The NA in `frame` as smoltcp reads it (checksum verified), with its IPv6 source and
/// destination, hop limit and Ethernet addresses.
fn parse_nd(frame: &[u8]) -> (NdiscRepr<'_>, [u8; 16], [u8; 16], u8, [u8; 6], [u8; 6]) {
    let eth = EthernetFrame::new_checked(frame).unwrap();
    let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
    assert_eq!(usize::from(ip.payload_len()), ip.payload().len());
    let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
    assert!(
        icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()),
        "bad ICMPv6 checksum"
    );
    let repr = Icmpv6Repr::parse(
        &ip.src_addr(),
        &ip.dst_addr(),
        &icmp,
        &ChecksumCapabilities::default(),
    )
    .unwrap();
    let Icmpv6Repr::Ndisc(nd) = repr else {
        panic!("not neighbour discovery: {repr:?}")
    };
    (
        nd,
        ip.src_addr().octets(),
        ip.dst_addr().octets(),
        ip.hop_limit(),
        eth.dst_addr().0,
        eth.src_addr().0,
    )
}

fn lladdr(m: [u8; 6]) -> Option<RawHardwareAddress> {
    Some(EthernetAddress(m).into())
}

#[test]
fn ns_for_the_gateway_is_answered_by_the_switch_with_a_correct_na() {
    let mut f = switch();
    learn_gateway6(&mut f);
    let ll = f.tenancy().identity(PORT).link_local();
    for src in [TENANT6, ll] {
        let (d, built) = admit_reply(&mut f, &ns(src, GW6));
        assert_eq!(d, Admit::Reply(86), "from {src:?}");
        let (nd, ip_src, ip_dst, hops, eth_dst, eth_src) = parse_nd(&built);
        assert_eq!(
            nd,
            NdiscRepr::NeighborAdvert {
                flags: NdiscNeighborFlags::ROUTER
                    | NdiscNeighborFlags::SOLICITED
                    | NdiscNeighborFlags::OVERRIDE,
                target_addr: GW6.into(),
                lladdr: lladdr(G_MAC),
            }
        );
        // From the target, to the soliciting address and MAC, hop limit 255 (RFC 4861 §7.1.2).
        assert_eq!((ip_src, ip_dst, hops), (GW6, src, 255));
        assert_eq!((eth_dst, eth_src), (T_MAC, G_MAC));
    }
    // A unicast NUD probe to the gateway's address and MAC: answered the same way.
    let mut nud = ndp_solicit(TENANT6, GW6, 255);
    nud[0..6].copy_from_slice(&G_MAC);
    nud[14 + 24..14 + 40].copy_from_slice(&GW6);
    refill_checksum(&mut nud);
    let (d, built) = admit_reply(&mut f, &nud);
    assert_eq!(d, Admit::Reply(86));
    assert_eq!(parse_nd(&built).1, GW6);
    // A tenant attached here (2001:db8::5 on port 2): its MAC, not a router.
    let r = VerdictRepr::attach_with_mac(
        T2,
        20,
        Some(2),
        Some((IpVersion::V6, SERVER6)),
        Some(OTHER_MAC),
    );
    f.apply(&r, 0).unwrap();
    let (d, built) = admit_reply(&mut f, &ns(TENANT6, SERVER6));
    assert_eq!(d, Admit::Reply(86));
    let (nd, ..) = parse_nd(&built);
    assert_eq!(
        nd,
        NdiscRepr::NeighborAdvert {
            flags: NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE,
            target_addr: SERVER6.into(),
            lladdr: lladdr(OTHER_MAC),
        }
    );
    assert_eq!(f.counters().neighbor_answered, 4);
    assert_eq!(f.counters().neighbor_resolved, 0);
}

#[test]
fn ns_for_an_unknown_target_is_never_forwarded() {
    let mut f = switch();
    // 2001:db8::41:4243 (chosen bytes), an off-link address, a short identifier other than
    // the gateway's, another tenant's link-local: dropped, nothing built.
    let mut chosen = TENANT6;
    chosen[12..].copy_from_slice(&[0, 0x41, 0x42, 0x43]);
    let off_link = [0x20, 0x01, 0x0d, 0xb9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let mut short = TENANT6;
    short[15] = 7;
    let other_ll = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe, 0, 0, 9];
    for target in [chosen, off_link, short, other_ll] {
        let (d, built) = admit_reply(&mut f, &ns(TENANT6, target));
        assert_eq!(d, dropped(DropReason::NeighborTarget), "{target:?}");
        assert!(built.is_empty());
    }
    assert_eq!(f.counters().dropped(DropReason::NeighborTarget), 4);
    // The gateway (::1) and 2001:db8::5 (a verdict opens TCP to it), unknown: the switch sends
    // its own solicitation, from the tenant's attached address and MAC, with a correct checksum;
    // the tenant's frame (here from its link-local, without an option) goes nowhere.
    let ll = f.tenancy().identity(PORT).link_local();
    for target in [GW6, SERVER6] {
        let mut plain = nd_raw(
            T_MAC,
            solicited(target).1,
            ll,
            solicited(target).0,
            &ns_body(target, &[]),
        );
        refill_checksum(&mut plain);
        let (d, built) = admit_reply(&mut f, &plain);
        assert_eq!(d, Admit::Uplink(86));
        let (nd, src, dst, hops, eth_dst, eth_src) = parse_nd(&built);
        assert_eq!(
            nd,
            NdiscRepr::NeighborSolicit {
                target_addr: target.into(),
                lladdr: lladdr(T_MAC),
            }
        );
        assert_eq!((src, dst, hops), (TENANT6, solicited(target).0, 255));
        assert_eq!((eth_dst, eth_src), (solicited(target).1, T_MAC));
        assert_ne!(built, plain);
    }
    assert_eq!(f.counters().neighbor_resolved, 2);
    // The uplink answers (the NA goes to the tenant, and the switch learns it): from then on the
    // switch answers the tenant itself.
    let na = nd_raw(
        G_MAC,
        T_MAC,
        GW6,
        TENANT6,
        &na_body(0x40 | 0x20, GW6, G_MAC),
    );
    f.observe_uplink(&na, 0);
    assert_eq!(admit(&mut f, &ns(TENANT6, GW6)), Admit::Reply(86));
    assert_eq!(f.counters().neighbor_resolved, 2);
}

#[test]
fn malformed_or_oversized_nd_is_dropped_and_counted() {
    let mut f = switch();
    let (sn, sn_mac) = solicited(GW6);
    let slla = [
        1, 1, T_MAC[0], T_MAC[1], T_MAC[2], T_MAC[3], T_MAC[4], T_MAC[5],
    ];
    let ns_with = |opts: &[u8]| nd_raw(T_MAC, sn_mac, TENANT6, sn, &ns_body(GW6, opts));
    // The genuine form passes this far (the switch resolves the gateway).
    assert_eq!(admit(&mut f, &ns_with(&slla)), Admit::Uplink(86));
    let malformed = f.counters().dropped(DropReason::NeighborMalformed);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // A second option after the link-layer one (a nonce, RFC 3971 type 14), an unknown option,
    // two link-layer options, an option of length 2 (16 bytes, 8 chosen), a target link-layer
    // option in a solicitation.
    let nonce = [14, 1, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46];
    cases.push(("nonce", ns_with(&[slla, nonce].concat())));
    cases.push(("unknown", ns_with(&[200, 1, 0, 0, 0, 0, 0, 0])));
    cases.push(("two slla", ns_with(&[slla, slla].concat())));
    let mut long = vec![1, 2];
    long.extend_from_slice(&T_MAC);
    long.extend_from_slice(&[0x41; 8]);
    cases.push(("long option", ns_with(&long)));
    cases.push(("tlla", ns_with(&[2, 1, 2, 0, 0, 0, 0, 2])));
    // Zero padding after the message (its length would be chosen), data after it.
    let mut pad = ns_with(&slla);
    pad.extend_from_slice(&[0; 8]);
    cases.push(("zero padding", pad));
    let mut data = ns_with(&slla);
    data.extend_from_slice(b"chosen!!");
    cases.push(("trailing data", data));
    // Truncated: the payload length says more than the frame holds.
    let full = ns_with(&slla);
    cases.push(("truncated", full[..full.len() - 4].to_vec()));
    // Hop limit other than 255 (forwarded by a router: RFC 4861 §7.1.1), a non-zero code,
    // traffic class bits, a non-zero flow label.
    let mut hops = ns_with(&slla);
    hops[14 + 7] = 64;
    cases.push(("hop limit", hops));
    let mut code = ns_with(&slla);
    code[14 + 40 + 1] = 7;
    refill_checksum(&mut code);
    cases.push(("code", code));
    let mut tclass = ns_with(&slla);
    tclass[14] = 0x6f;
    cases.push(("traffic class", tclass));
    let mut flow = ns_with(&slla);
    flow[14 + 3] = 0x42;
    cases.push(("flow label", flow));
    // An NA with flags outside R/S/O.
    let all_nodes = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let na = nd_raw(
        T_MAC,
        [0x33, 0x33, 0, 0, 0, 1],
        TENANT6,
        all_nodes,
        &na_body(0x20 | 0x01, TENANT6, T_MAC),
    );
    cases.push(("na flags", na));
    let n = cases.len() as u64;
    for (name, frame) in &cases {
        assert_eq!(
            admit(&mut f, frame),
            dropped(DropReason::NeighborMalformed),
            "{name}"
        );
    }
    assert_eq!(
        f.counters().dropped(DropReason::NeighborMalformed),
        malformed + n
    );
    // A source link-layer option naming another MAC than the port's (and the frame's).
    let other = [1, 1, OTHER_MAC[0], 0, 0, 0, 0, OTHER_MAC[5]];
    assert_eq!(
        admit(&mut f, &ns_with(&other)),
        dropped(DropReason::SpoofedMac)
    );
    // The Ethernet source not the port's MAC, the option right.
    let mut eth = ns_with(&slla);
    eth[6..12].copy_from_slice(&OTHER_MAC);
    assert_eq!(admit(&mut f, &eth), dropped(DropReason::SpoofedMac));
    assert_eq!(f.counters().dropped(DropReason::SpoofedMac), 2);
    assert_eq!(f.counters().neighbor_resolved, 1);
}

#[test]
fn dad_and_own_announcements_still_work() {
    let mut f = switch();
    let ll = f.tenancy().identity(PORT).link_local();
    // DAD (RFC 4862): from ::, to the solicited-node address, no option, for its link-local
    // and its attached address. These go out as the tenant sent them.
    for target in [ll, TENANT6] {
        let (sn, sn_mac) = solicited(target);
        let dad = nd_raw(T_MAC, sn_mac, [0; 16], sn, &ns_body(target, &[]));
        assert_eq!(admit(&mut f, &dad), Admit::Pass, "{target:?}");
    }
    // DAD for somebody else's address, or with a source link-layer option (RFC 4862 §5.4.2).
    let (sn, sn_mac) = solicited(GW6);
    let dad = nd_raw(T_MAC, sn_mac, [0; 16], sn, &ns_body(GW6, &[]));
    assert_eq!(admit(&mut f, &dad), dropped(DropReason::SpoofedNeighbor));
    let (sn, sn_mac) = solicited(TENANT6);
    let slla = [
        1, 1, T_MAC[0], T_MAC[1], T_MAC[2], T_MAC[3], T_MAC[4], T_MAC[5],
    ];
    let dad = nd_raw(T_MAC, sn_mac, [0; 16], sn, &ns_body(TENANT6, &slla));
    assert_eq!(admit(&mut f, &dad), dropped(DropReason::SpoofedNeighbor));
    // An unsolicited NA for its own address to all nodes (after DAD), an ARP probe and an
    // announcement: out as sent.
    let all_nodes = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let na = nd_raw(
        T_MAC,
        [0x33, 0x33, 0, 0, 0, 1],
        ll,
        all_nodes,
        &na_body(0x20, ll, T_MAC),
    );
    assert_eq!(admit(&mut f, &na), Admit::Pass);
    let probe = arp(1, T_MAC, BCAST, T_MAC, [0; 4], [0; 6], TENANT);
    assert_eq!(admit(&mut f, &padded(probe)), Admit::Pass);
    assert_eq!(f.counters().neighbor_resolved, 0);
}

#[test]
fn requests_beyond_the_budget_are_refused_before_their_target_is_judged() {
    // Judging a target walks the verdict table (the tenant holds verdicts, so the walk is not
    // skipped); on the shared switch a flood of requests must cost one bucket check each, so the
    // budget comes first: past it, a refused target is NeighborRate, never judged again.
    let mut f = switch();
    let mut reply = [0u8; REPLY_MAX];
    let unknown = arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], [10, 0, 0, 77]);
    let gw = arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], GW);
    let t0 = 5 * SEC;
    for i in 0..BURST {
        assert_eq!(
            f.admit(PORT, &unknown, t0, &mut reply),
            dropped(DropReason::NeighborTarget),
            "request {i}"
        );
    }
    for i in 0..1000 {
        assert_eq!(
            f.admit(PORT, &unknown, t0, &mut reply),
            dropped(DropReason::NeighborRate),
            "request {i}"
        );
    }
    assert_eq!(
        f.counters().dropped(DropReason::NeighborTarget),
        u64::from(BURST)
    );
    // The refused targets spent the port's own tokens: its gateway waits for the next one.
    assert_eq!(
        f.admit(PORT, &gw, t0, &mut reply),
        dropped(DropReason::NeighborRate)
    );
    assert_eq!(
        f.admit(PORT, &gw, t0 + REFILL_NS, &mut reply),
        Admit::Uplink(60)
    );
}

#[test]
fn neighbor_frames_to_the_uplink_are_budgeted_per_port() {
    let mut f = switch();
    let mut reply = [0u8; REPLY_MAX];
    let announce = padded(arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], TENANT));
    let gw = arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], GW);
    let t0 = 5 * SEC;
    // A burst of BURST frames at one instant, the tenant's own and the switch's requests for
    // it alike; then nothing until a token comes back.
    for i in 0..BURST {
        let frame = if i % 2 == 0 { &announce } else { &gw };
        assert!(
            matches!(
                f.admit(PORT, frame, t0, &mut reply),
                Admit::Pass | Admit::Uplink(60)
            ),
            "frame {i}"
        );
    }
    assert_eq!(
        f.admit(PORT, &announce, t0, &mut reply),
        dropped(DropReason::NeighborRate)
    );
    assert_eq!(
        f.admit(PORT, &gw, t0 + REFILL_NS - 1, &mut reply),
        dropped(DropReason::NeighborRate)
    );
    // One token per REFILL_NS.
    assert_eq!(
        f.admit(PORT, &gw, t0 + REFILL_NS, &mut reply),
        Admit::Uplink(60)
    );
    assert_eq!(
        f.admit(PORT, &announce, t0 + REFILL_NS, &mut reply),
        dropped(DropReason::NeighborRate)
    );
    // Over one second: 4 tokens, never more than BURST however long the wait.
    let t1 = t0 + REFILL_NS + 4 * REFILL_NS;
    for _ in 0..4 {
        assert_eq!(f.admit(PORT, &announce, t1, &mut reply), Admit::Pass);
    }
    assert_eq!(
        f.admit(PORT, &announce, t1, &mut reply),
        dropped(DropReason::NeighborRate)
    );
    let t2 = t1 + 3600 * SEC;
    let passed = (0..2 * BURST)
        .filter(|_| f.admit(PORT, &announce, t2, &mut reply) == Admit::Pass)
        .count();
    assert_eq!(passed, BURST as usize);
    assert_eq!(
        f.counters().dropped(DropReason::NeighborRate),
        4 + BURST as u64
    );
    // What the switch answers itself costs nothing: the gateway, once learned, is answered with
    // the bucket empty.
    f.observe_uplink(&arp(2, G_MAC, T_MAC, G_MAC, GW, T_MAC, TENANT), t2);
    assert_eq!(f.admit(PORT, &gw, t2, &mut reply), Admit::Reply(60));
    // Another port has its own bucket.
    let r = VerdictRepr::attach_with_mac(
        T2,
        20,
        Some(2),
        Some((IpVersion::V4, v4(SERVER))),
        Some(OTHER_MAC),
    );
    f.apply(&r, 0).unwrap();
    let other = padded(arp(1, OTHER_MAC, BCAST, OTHER_MAC, SERVER, [0; 6], SERVER));
    assert_eq!(f.admit(2, &other, t2, &mut reply), Admit::Pass);
}

#[test]
fn an_unsolicited_claim_never_moves_a_live_binding_nor_pushes_it_out() {
    use fw_guest::filter::hygiene::{NEIGHBORS, NEIGHBOR_STALE_NS};
    let mut f = switch();
    let evil = [0x02, 0, 0, 0, 0, 0x66];
    // The gateway asks for the tenant: learned.
    f.observe_uplink(&arp(1, G_MAC, BCAST, G_MAC, GW, [0; 6], TENANT), 0);
    assert_eq!(f.neighbors().get(IpVersion::V4, &v4(GW)), Some(G_MAC));
    // A gratuitous ARP, a forged request's sender and an unsolicited reply, all claiming the
    // gateway at another MAC: the binding stays (the switch keeps answering tenants with the
    // gateway's MAC, not the attacker's).
    for (n, op) in [(1, 1u16), (2, 1), (3, 2)] {
        let tpa = if n == 1 { GW } else { TENANT };
        f.observe_uplink(&arp(op, evil, BCAST, evil, GW, [0; 6], tpa), n * SEC);
    }
    assert_eq!(f.neighbors().get(IpVersion::V4, &v4(GW)), Some(G_MAC));
    assert_eq!(f.neighbors().conflicts, 3);
    let ask = padded(arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], GW));
    let mut reply = [0u8; REPLY_MAX];
    assert_eq!(f.admit(PORT, &ask, 4 * SEC, &mut reply), Admit::Reply(60));
    assert_eq!(reply[22..28], G_MAC, "the answer names the gateway's MAC");
    // A flood of claims for other addresses fills the free entries, and pushes nothing out.
    for n in 0..4 * NEIGHBORS as u8 {
        let claimed = [10, 0, 0, 100 + n];
        f.observe_uplink(&arp(1, evil, BCAST, evil, claimed, [0; 6], TENANT), 5 * SEC);
    }
    assert_eq!(f.neighbors().get(IpVersion::V4, &v4(GW)), Some(G_MAC));
    // The gateway speaking keeps its binding live; one silent past the stale time (replaced,
    // say) is learned anew from whoever claims the address.
    f.observe_uplink(&arp(1, G_MAC, BCAST, G_MAC, GW, [0; 6], TENANT), 60 * SEC);
    let late = 60 * SEC + NEIGHBOR_STALE_NS - SEC;
    f.observe_uplink(&arp(1, evil, BCAST, evil, GW, [0; 6], TENANT), late);
    assert_eq!(f.neighbors().get(IpVersion::V4, &v4(GW)), Some(G_MAC));
    let later = 60 * SEC + NEIGHBOR_STALE_NS;
    f.observe_uplink(
        &arp(1, OTHER_MAC, BCAST, OTHER_MAC, GW, [0; 6], TENANT),
        later,
    );
    assert_eq!(f.neighbors().get(IpVersion::V4, &v4(GW)), Some(OTHER_MAC));
}

#[test]
fn the_first_answer_to_the_switchs_own_request_binds_its_target() {
    let mut f = switch();
    let evil = [0x02, 0, 0, 0, 0, 0x66];
    // Every entry holds a live claim (a flood).
    for n in 0..16u8 {
        let claimed = [10, 0, 0, 100 + n];
        f.observe_uplink(&arp(1, evil, BCAST, evil, claimed, [0; 6], TENANT), 0);
    }
    // The tenant asks for its gateway, which the switch does not know: it asks the uplink.
    let ask = padded(arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], GW));
    let mut reply = [0u8; REPLY_MAX];
    assert!(matches!(
        f.admit(PORT, &ask, SEC, &mut reply),
        Admit::Uplink(_)
    ));
    // The first answer binds the gateway, in a table full of live entries.
    let answer = |mac| arp(2, mac, T_MAC, mac, GW, T_MAC, TENANT);
    f.observe_uplink(&answer(G_MAC), SEC + 1000);
    assert_eq!(f.neighbors().get(IpVersion::V4, &v4(GW)), Some(G_MAC));
    // A second answer (a racing spoofer) is a claim like any other.
    f.observe_uplink(&answer(evil), SEC + 2000);
    assert_eq!(f.neighbors().get(IpVersion::V4, &v4(GW)), Some(G_MAC));
    // An answer for a target the switch never asked for binds nothing in a full table.
    let unasked = [10, 0, 0, 77];
    f.observe_uplink(&arp(2, evil, T_MAC, evil, unasked, T_MAC, TENANT), 2 * SEC);
    assert_eq!(f.neighbors().get(IpVersion::V4, &v4(unasked)), None);
}

#[test]
fn claims_the_switch_does_not_believe_never_reach_the_tenants() {
    let mut f = switch();
    let evil = [0x02, 0, 0, 0, 0, 0x66];
    // The gateway asks for the tenant: learned, and the request goes on to the tenant.
    assert_eq!(
        f.observe_uplink(&arp(1, G_MAC, BCAST, G_MAC, GW, [0; 6], TENANT), 0),
        None
    );
    // Someone on the edge's outside link sends the gateway's request from its own MAC (the edge
    // passes it: the gateway's address, asking for a tenant, its MAC the frame's source), or an
    // unsolicited reply: a Linux tenant would rebind its gateway to that MAC. Not delivered.
    for (n, op) in [(1, 1u16), (2, 2)] {
        let tha = if op == 2 { T_MAC } else { [0; 6] };
        let forged = arp(op, evil, BCAST, evil, GW, tha, TENANT);
        assert_eq!(
            f.observe_uplink(&forged, n * SEC),
            Some(DropReason::SpoofedNeighbor),
            "op {op}"
        );
    }
    assert_eq!(f.counters().dropped(DropReason::SpoofedNeighbor), 2);
    // The gateway itself still reaches the tenant.
    assert_eq!(
        f.observe_uplink(&arp(1, G_MAC, BCAST, G_MAC, GW, [0; 6], TENANT), 3 * SEC),
        None
    );

    // IPv6: the gateway's solicitation for the tenant, then a forged one from another MAC, and
    // one hiding the forged link-layer address behind another option (a nonce), which the
    // switch did not read and a tenant does.
    learn_gateway6(&mut f);
    let (_, sol_mac) = solicited(TENANT6);
    let (sol, _) = solicited(TENANT6);
    let lla = |m: [u8; 6]| [&[1u8, 1][..], &m[..]].concat();
    let ns_from =
        |src_mac, options: &[u8]| nd_raw(src_mac, sol_mac, GW6, sol, &ns_body(TENANT6, options));
    assert_eq!(
        f.observe_uplink(&ns_from(G_MAC, &lla(G_MAC)), 4 * SEC),
        None
    );
    assert_eq!(
        f.observe_uplink(&ns_from(evil, &lla(evil)), 4 * SEC),
        Some(DropReason::SpoofedNeighbor)
    );
    let nonce = [14u8, 1, 1, 2, 3, 4, 5, 6];
    let hidden = [&nonce[..], &lla(evil)[..]].concat();
    assert_eq!(
        f.observe_uplink(&ns_from(G_MAC, &hidden), 4 * SEC),
        Some(DropReason::NeighborMalformed)
    );
    // No option claims nothing.
    assert_eq!(f.observe_uplink(&ns_from(G_MAC, &[]), 4 * SEC), None);
    assert_eq!(
        f.neighbors().entry(IpVersion::V6, &GW6),
        Some((G_MAC, true))
    );
}
