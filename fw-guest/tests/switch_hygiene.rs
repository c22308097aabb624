//! Layer-2 and layer-3 hygiene at the switch's tenant ports (issue #12, part 2): what a tenant
//! (root in its guest) may send as, and ARP / neighbour discovery judged field by field so they
//! carry no chosen bytes to the uplink. One case per attack seen, plus the genuine traffic.

mod frames;

use frames::switch::*;
use frames::*;
use fw_guest::filter::{
    Admit, Direction, DropReason, Filter, IpVersion, Op, Protocol, Rule, VerdictRepr,
};
use smoltcp::wire::{IpProtocol, TcpControl};

fn dropped(r: DropReason) -> Admit {
    Admit::Drop(r)
}

/// The gateway (behind the uplink) ARPs for the tenant: the switch learns it.
fn learn_gateway(f: &mut Filter<'_>) {
    f.observe_uplink(&arp(1, G_MAC, BCAST, G_MAC, GW, [0; 6], TENANT), 0);
    assert_eq!(f.neighbors().get(IpVersion::V4, &v4(GW)), Some(G_MAC));
}

#[test]
fn attached_addresses_pass_and_flows_work_as_before() {
    let mut f = switch();
    let syn = tcp(Ip::V4(TENANT), Ip::V4(SERVER), 40000, 80, Seg::Syn);
    assert_eq!(admit(&mut f, &syn), Admit::Pass);
    assert_eq!(f.process(T1, Direction::Egress, &syn, SEC), FWD);
    let ping = icmp4_echo(TENANT, SERVER, true, 7);
    assert_eq!(admit(&mut f, &ping), Admit::Pass);
    assert_eq!(f.process(T1, Direction::Egress, &ping, SEC), FWD);
    let syn6 = tcp(Ip::V6(TENANT6), Ip::V6(SERVER6), 40000, 80, Seg::Syn);
    assert_eq!(admit(&mut f, &syn6), Admit::Pass);
    assert_eq!(f.process(T1, Direction::Egress, &syn6, SEC), FWD);
    // A port the VMM never attached (a static boot-time tenant) is not judged here.
    f.tenancy_mut().set_boot_port(3, 7);
    let mut reply = [0u8; 128];
    let forged = tcp(Ip::V4(GW), Ip::V4(SERVER), 1, 80, Seg::Syn);
    assert_eq!(f.admit(3, &forged, SEC, &mut reply), Admit::Pass);
    let _ = TcpControl::None;
}

#[test]
fn forged_ipv4_source_is_dropped() {
    let mut f = switch();
    for src in [[10, 0, 0, 3], GW, [0, 0, 0, 0]] {
        let frame = tcp(Ip::V4(src), Ip::V4(SERVER), 40000, 80, Seg::Syn);
        assert_eq!(admit(&mut f, &frame), dropped(DropReason::SpoofedSource));
    }
    assert_eq!(f.counters().dropped(DropReason::SpoofedSource), 3);
    // DHCP discover from 0.0.0.0 is the one exception.
    let udp = frames::udp(Ip::V4([0; 4]), Ip::V4([255; 4]), 68, 67);
    assert_eq!(admit(&mut f, &udp), Admit::Pass);
    let not_dhcp = frames::udp(Ip::V4([0; 4]), Ip::V4([255; 4]), 68, 68);
    assert_eq!(admit(&mut f, &not_dhcp), dropped(DropReason::SpoofedSource));
}

#[test]
fn forged_ipv6_source_is_dropped_link_local_allowed() {
    let mut f = switch();
    let mut other = TENANT6;
    other[15] = 9;
    let frame = tcp(Ip::V6(other), Ip::V6(SERVER6), 40000, 80, Seg::Syn);
    assert_eq!(admit(&mut f, &frame), dropped(DropReason::SpoofedSource));
    // fe80::ff:fe00:2 from 02:00:00:00:00:02 (EUI-64, U/L bit flipped).
    let ll = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe, 0, 0, 2];
    assert_eq!(f.tenancy().identity(PORT).link_local(), ll);
    let frame = icmp6_echo(ll, SERVER6, true, 1);
    assert_eq!(admit(&mut f, &frame), Admit::Pass);
    // Another link-local is somebody else's.
    let mut ll2 = ll;
    ll2[15] = 3;
    let frame = icmp6_echo(ll2, SERVER6, true, 1);
    assert_eq!(admit(&mut f, &frame), dropped(DropReason::SpoofedSource));
}

#[test]
fn forged_mac_is_dropped() {
    let mut f = switch();
    let mut frame = tcp(Ip::V4(TENANT), Ip::V4(SERVER), 40000, 80, Seg::Syn);
    frame[6..12].copy_from_slice(&OTHER_MAC);
    assert_eq!(admit(&mut f, &frame), dropped(DropReason::SpoofedMac));
    // ARP whose sender hardware address is not the frame's (and the port's) MAC.
    let a = arp(1, T_MAC, BCAST, OTHER_MAC, TENANT, [0; 6], GW);
    assert_eq!(admit(&mut f, &a), dropped(DropReason::SpoofedMac));
    assert_eq!(f.counters().dropped(DropReason::SpoofedMac), 2);
    // A re-attach with another MAC (the VMM's word) moves the port to it.
    let r = VerdictRepr::attach_with_mac(T1, 9, Some(PORT as u16), None, Some(OTHER_MAC));
    f.apply(&r, 0).unwrap();
    assert_eq!(admit(&mut f, &frame), Admit::Pass);
}

#[test]
fn gratuitous_arp_for_the_gateway_is_dropped() {
    let mut f = switch();
    // Announcement (request and reply forms) claiming 10.0.0.1.
    let req = arp(1, T_MAC, BCAST, T_MAC, GW, [0; 6], GW);
    assert_eq!(admit(&mut f, &req), dropped(DropReason::SpoofedNeighbor));
    let rep = arp(2, T_MAC, BCAST, T_MAC, GW, BCAST, GW);
    assert_eq!(admit(&mut f, &rep), dropped(DropReason::SpoofedNeighbor));
    assert_eq!(f.counters().dropped(DropReason::SpoofedNeighbor), 2);
    // Its own address: a gratuitous ARP and an RFC 5227 probe are fine (the VMM's migration
    // announcement is this frame, 42 bytes).
    let own = arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], TENANT);
    assert_eq!(admit(&mut f, &own), Admit::Pass);
    let probe = arp(1, T_MAC, BCAST, T_MAC, [0; 4], [0; 6], TENANT);
    assert_eq!(admit(&mut f, &probe), Admit::Pass);
}

#[test]
fn arp_request_with_a_chosen_target_never_reaches_the_uplink() {
    let mut f = switch();
    // Off-link target: chosen 4 bytes; dropped.
    let a = arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], [192, 0, 2, 77]);
    assert_eq!(admit(&mut f, &a), dropped(DropReason::NeighborTarget));
    // An on-link address that neither the attachment nor a verdict names: its last octet was a
    // chosen byte on the uplink; now nothing leaves.
    for last in [77, 0x41, 254] {
        let a = arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], [10, 0, 0, last]);
        assert_eq!(admit(&mut f, &a), dropped(DropReason::NeighborTarget));
    }
    // Chosen bytes in the target hardware address: dropped.
    let a = arp(1, T_MAC, BCAST, T_MAC, TENANT, [1, 2, 3, 4, 5, 6], GW);
    assert_eq!(admit(&mut f, &a), dropped(DropReason::NeighborMalformed));
    assert_eq!(f.counters().neighbor_resolved, 0);
    // The gateway, still unknown: the switch sends its own request (broadcast, the tenant's
    // attached MAC and address, zero target MAC, padded), never the tenant's frame; a unicast
    // to a chosen MAC gives the same bytes.
    let canonical = padded(arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], GW));
    for dst in [BCAST, [2, 9, 9, 9, 9, 9]] {
        let a = arp(1, T_MAC, dst, T_MAC, TENANT, [0; 6], GW);
        let (d, built) = admit_reply(&mut f, &a);
        assert_eq!(d, Admit::Uplink(60));
        assert_eq!(built, canonical);
    }
    assert_eq!(f.counters().neighbor_resolved, 2);
    // 10.0.0.5: a verdict of the tenant opens flows to it, so resolving it says nothing the
    // verdict does not let out already. Once the verdicts go, it is refused too.
    let a = arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], SERVER);
    assert_eq!(admit(&mut f, &a), Admit::Uplink(60));
    for (seq, proto, port) in [(3, Protocol::Tcp, 80), (4, Protocol::Icmp, 0)] {
        let rule = Rule::egress_to(IpVersion::V4, proto, v4(SERVER), port);
        let remove = VerdictRepr {
            op: Op::Remove,
            ..VerdictRepr::add(T1, seq, 0, rule)
        };
        f.apply(&remove, 0).unwrap();
    }
    assert_eq!(admit(&mut f, &a), dropped(DropReason::NeighborTarget));
    // Once the gateway answered (seen on the uplink), the switch answers itself with its real
    // MAC.
    learn_gateway(&mut f);
    let a = arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], GW);
    let (d, built) = admit_reply(&mut f, &a);
    assert_eq!(d, Admit::Reply(60));
    assert_eq!(
        built,
        padded(arp(2, G_MAC, T_MAC, G_MAC, GW, T_MAC, TENANT))
    );
    // A unicast refresh to the gateway's MAC too.
    let a = arp(1, T_MAC, G_MAC, T_MAC, TENANT, [0; 6], GW);
    assert_eq!(admit(&mut f, &a), Admit::Reply(60));
    // Another tenant's address on this switch: answered with its MAC.
    let r = VerdictRepr::attach_with_mac(
        T2,
        20,
        Some(2),
        Some((IpVersion::V4, v4(SERVER))),
        Some(OTHER_MAC),
    );
    f.apply(&r, 0).unwrap();
    let a = arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], SERVER);
    let (d, built) = admit_reply(&mut f, &a);
    assert_eq!(d, Admit::Reply(60));
    assert_eq!(
        &built[22..32],
        &[OTHER_MAC.as_slice(), &SERVER].concat()[..]
    );
    // A reply only to a requester the switch saw.
    let rep = arp(2, T_MAC, G_MAC, T_MAC, TENANT, G_MAC, GW);
    assert_eq!(admit(&mut f, &rep), Admit::Pass);
    let rep = arp(
        2,
        T_MAC,
        OTHER_MAC,
        T_MAC,
        TENANT,
        [7, 7, 7, 7, 7, 7],
        [7, 7, 7, 7],
    );
    assert_eq!(admit(&mut f, &rep), dropped(DropReason::NeighborTarget));
}

#[test]
fn oversized_or_padded_arp_is_dropped() {
    let mut f = switch();
    // An announcement of its own address: the one request a tenant still sends out itself.
    let good = arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], TENANT);
    assert_eq!(admit(&mut f, &good), Admit::Pass);
    // Zero padding to the Ethernet minimum is fine.
    assert_eq!(admit(&mut f, &padded(good.clone())), Admit::Pass);
    // Data in the padding, or trailing data beyond the minimum.
    let mut data = good.clone();
    data.extend_from_slice(&[0x41; 18]);
    assert_eq!(admit(&mut f, &data), dropped(DropReason::NeighborMalformed));
    let mut long = good.clone();
    long.resize(200, 0);
    long[150] = 1;
    assert_eq!(admit(&mut f, &long), dropped(DropReason::NeighborMalformed));
    // Zeros beyond the minimum: the length itself would be chosen.
    for len in [61, 64, 200, 1514] {
        let mut zeros = good.clone();
        zeros.resize(len, 0);
        assert_eq!(
            admit(&mut f, &zeros),
            dropped(DropReason::NeighborMalformed)
        );
    }
    // Truncated, or with other lengths than Ethernet/IPv4.
    assert_eq!(
        admit(&mut f, &good[..40]),
        dropped(DropReason::NeighborMalformed)
    );
    let mut odd = good.clone();
    odd[19] = 16;
    assert_eq!(admit(&mut f, &odd), dropped(DropReason::NeighborMalformed));
    assert_eq!(f.counters().dropped(DropReason::NeighborMalformed), 8);
}

#[test]
fn neighbor_solicitation_with_a_chosen_target_is_dropped() {
    let mut f = switch();
    // 2001:db8::dead:beef:1234:5678 carries 8 chosen bytes: dropped.
    let mut chosen = TENANT6;
    chosen[8..].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0x12, 0x34, 0x56, 0x78]);
    assert_eq!(
        admit(&mut f, &ns(TENANT6, chosen)),
        dropped(DropReason::NeighborTarget)
    );
    let off_link = [0x20, 0x01, 0x0d, 0xb9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    assert_eq!(
        admit(&mut f, &ns(TENANT6, off_link)),
        dropped(DropReason::NeighborTarget)
    );
    // Other short interface identifiers of its /64 are not its gateway (8 chosen bits).
    let mut short = TENANT6;
    short[15] = 0x41;
    assert_eq!(
        admit(&mut f, &ns(TENANT6, short)),
        dropped(DropReason::NeighborTarget)
    );
    // The gateway of its /64 (::1), unknown so far: the switch solicits it itself.
    let gw6 = GW6;
    assert_eq!(admit(&mut f, &ns(TENANT6, gw6)), Admit::Uplink(86));
    // From a forged source, or carrying another MAC in its option.
    let mut other = TENANT6;
    other[15] = 9;
    assert_eq!(
        admit(&mut f, &ns(other, gw6)),
        dropped(DropReason::SpoofedSource)
    );
    let mut bad_opt = ns(TENANT6, gw6);
    let n = bad_opt.len();
    bad_opt[n - 6..].copy_from_slice(&OTHER_MAC);
    refill_checksum(&mut bad_opt);
    assert_eq!(admit(&mut f, &bad_opt), dropped(DropReason::SpoofedMac));
    // Chosen bits in the reserved field, or data after the message.
    let mut reserved = ns(TENANT6, gw6);
    reserved[14 + 40 + 5] = 0x42;
    refill_checksum(&mut reserved);
    assert_eq!(
        admit(&mut f, &reserved),
        dropped(DropReason::NeighborMalformed)
    );
    let mut trailing = ns(TENANT6, gw6);
    trailing.extend_from_slice(&[0x42; 8]);
    assert_eq!(
        admit(&mut f, &trailing),
        dropped(DropReason::NeighborMalformed)
    );
    // Chosen bits in the checksum (the receiver drops it, the uplink would carry it).
    let mut checksum = ns(TENANT6, gw6);
    checksum[14 + 40 + 2] ^= 0x5a;
    assert_eq!(
        admit(&mut f, &checksum),
        dropped(DropReason::NeighborMalformed)
    );
    // To a unicast destination of its choice.
    let mut unicast = ns(TENANT6, gw6);
    unicast[0..6].copy_from_slice(&OTHER_MAC);
    assert_eq!(
        admit(&mut f, &unicast),
        dropped(DropReason::NeighborMalformed)
    );
}

#[test]
fn unsolicited_na_for_an_address_not_owned_is_dropped() {
    use smoltcp::wire::{Icmpv6Packet, Icmpv6Repr, NdiscNeighborFlags, NdiscRepr};
    let mut f = switch();
    let na = |target: [u8; 16]| {
        let repr = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags: NdiscNeighborFlags::OVERRIDE,
            target_addr: target.into(),
            lladdr: Some(TENANT_MAC.into()),
        });
        let all = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(
            &TENANT6.into(),
            &all.into(),
            &mut Icmpv6Packet::new_unchecked(&mut buf[..]),
            &smoltcp::phy::ChecksumCapabilities::default(),
        );
        let mut fr = ip_frame_hops(Ip::V6(TENANT6), Ip::V6(all), IpProtocol::Icmpv6, &buf, 255);
        fr[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
        fr
    };
    let mut gw6 = TENANT6;
    gw6[15] = 1;
    assert_eq!(
        admit(&mut f, &na(gw6)),
        dropped(DropReason::SpoofedNeighbor)
    );
    assert_eq!(admit(&mut f, &na(TENANT6)), Admit::Pass);
}

#[test]
fn uplink_learning_ignores_tenant_addresses() {
    let mut f = switch();
    // The uplink cannot claim a tenant's address either (the cache would let ARP out for it).
    f.observe_uplink(&arp(2, OTHER_MAC, T_MAC, OTHER_MAC, TENANT, T_MAC, GW), 0);
    assert_eq!(f.neighbors().get(IpVersion::V4, &v4(TENANT)), None);
    let _ = Op::Attach;
}

#[test]
fn edge_cloud_side_neighbours_must_claim_an_attached_address() {
    use fw_guest::filter::EdgeSide::{Cloud, Outside};
    let mut f = filter_with(64, 8);
    f.apply(
        &VerdictRepr::attach(T1, 1, None, Some((IpVersion::V4, v4(TENANT)))),
        0,
    )
    .unwrap();
    // The attached tenant ARPs for its gateway through the edge: passes.
    let own = arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], GW);
    assert_eq!(f.process_edge(Cloud, Outside, &own, 0), FWD);
    // A sender address nobody attached (a forged one, or the gateway's): dropped and counted.
    for spa in [[10, 0, 0, 3], GW] {
        let forged = arp(1, T_MAC, BCAST, T_MAC, spa, [0; 6], GW);
        assert_eq!(
            f.process_edge(Cloud, Outside, &forged, 0),
            drop(DropReason::SpoofedNeighbor)
        );
    }
    // An IP packet from an unattached source is dropped as before (no tenant to judge for).
    let stray = tcp(Ip::V4([10, 0, 0, 3]), Ip::V4(SERVER), 1, 80, Seg::Syn);
    assert_eq!(
        f.process_edge(Cloud, Outside, &stray, 0),
        drop(DropReason::UnknownTenant)
    );
    assert_eq!(f.counters().dropped(DropReason::SpoofedNeighbor), 2);
}

/// Tenant 2 behind port 2 (MAC `OTHER_MAC`, 10.0.0.3 and 2001:db8::3), beside tenant 1 of
/// [`switch`]; both hold a listen on TCP 443 bound to the wildcard address, as `Adopt` verdicts
/// (what every verdict becomes after a switch restart or a migration).
fn two_listeners() -> Filter<'static> {
    let mut f = switch();
    let mut six = TENANT6;
    six[15] = 3;
    for (seq, addr) in [
        (20, (IpVersion::V4, v4([10, 0, 0, 3]))),
        (21, (IpVersion::V6, six)),
    ] {
        let r = VerdictRepr::attach_with_mac(T2, seq, Some(2), Some(addr), Some(OTHER_MAC));
        f.apply_record(&r.to_bytes(), 0).unwrap();
    }
    let mut seq = 21;
    for tenant in [T1, T2] {
        for version in [IpVersion::V4, IpVersion::V6] {
            let mut rule = Rule::any(Direction::Ingress, version, Protocol::Tcp);
            rule.local_port = 443;
            seq += 1;
            f.apply(&VerdictRepr::adopt(tenant, seq, 0, rule), 0)
                .unwrap();
        }
    }
    f
}

/// `frame` with its Ethernet destination set to `mac`.
fn to_mac(mut frame: Vec<u8>, mac: [u8; 6]) -> Vec<u8> {
    frame[..6].copy_from_slice(&mac);
    frame
}

#[test]
fn a_tenant_port_takes_only_frames_addressed_to_it() {
    let mut f = two_listeners();
    const OUT: [u8; 4] = [198, 51, 100, 7];
    let mut out6 = SERVER6;
    out6[0] = 0x26;
    let mut t2_6 = TENANT6;
    t2_6[15] = 3;
    // Tenant 2's connection from the outside, its MAC not learned yet (flooded to every tenant
    // port): mid-stream, as the outside sends it after a switch restart, and a new SYN.
    for (sport, seg) in [(50000, Seg::Data), (50001, Seg::Syn)] {
        let frame = to_mac(
            tcp(Ip::V4(OUT), Ip::V4([10, 0, 0, 3]), sport, 443, seg),
            OTHER_MAC,
        );
        assert_eq!(
            f.process_to_port(PORT, &frame, SEC),
            drop(DropReason::UnknownTenant),
            "tenant 1's wildcard listen takes tenant 2's {seg:?}"
        );
        assert_eq!(f.process_to_port(2, &frame, SEC), FWD);
        // Aimed at tenant 1's MAC: still not tenant 1's address.
        let aimed = to_mac(frame.clone(), T_MAC);
        assert_eq!(
            f.process_to_port(PORT, &aimed, SEC),
            drop(DropReason::UnknownTenant)
        );
        let frame6 = to_mac(tcp(Ip::V6(out6), Ip::V6(t2_6), sport, 443, seg), OTHER_MAC);
        assert_eq!(
            f.process_to_port(PORT, &frame6, SEC),
            drop(DropReason::UnknownTenant)
        );
        let aimed6 = to_mac(frame6, T_MAC);
        assert_eq!(
            f.process_to_port(PORT, &aimed6, SEC),
            drop(DropReason::UnknownTenant)
        );
    }
    assert_eq!(
        f.conntrack().flows_of(T1),
        0,
        "nothing adopted for tenant 1"
    );
    // Tenant 1's own traffic, to its MAC and address, still reaches it.
    let own = to_mac(
        tcp(Ip::V4(OUT), Ip::V4(TENANT), 50010, 443, Seg::Syn),
        T_MAC,
    );
    assert_eq!(f.process_to_port(PORT, &own, SEC), FWD);
    let own6 = to_mac(
        tcp(Ip::V6(out6), Ip::V6(TENANT6), 50011, 443, Seg::Syn),
        T_MAC,
    );
    assert_eq!(f.process_to_port(PORT, &own6, SEC), FWD);
    // Group destinations are every port's (judged by the verdicts as before).
    let bcast = to_mac(frames::udp(Ip::V4(GW), Ip::V4([255; 4]), 67, 68), BCAST);
    assert_eq!(
        f.process_to_port(PORT, &bcast, SEC),
        drop(DropReason::NoVerdict)
    );
    let arp_req = arp(1, G_MAC, BCAST, G_MAC, GW, [0; 6], TENANT);
    assert_eq!(f.process_to_port(PORT, &arp_req, SEC), FWD);
    // A port the VMM never attached is not judged here.
    f.tenancy_mut().set_boot_port(3, 7);
    assert_eq!(f.process_to_port(3, &own, SEC), drop(DropReason::NoVerdict));
}

#[test]
fn tagged_frames_from_a_tenant_port_are_dropped() {
    let mut f = switch();
    // An allowed flow, a neighbour request the switch would answer, and its own announcement:
    // each passes untagged, none with a tag of the tenant's choosing (VID 0, a priority tag,
    // included: its priority bits are chosen too).
    let syn = tcp(Ip::V4(TENANT), Ip::V4(SERVER), 40000, 80, Seg::Syn);
    assert_eq!(admit(&mut f, &syn), Admit::Pass);
    let announce = padded(arp(1, T_MAC, BCAST, T_MAC, TENANT, [0; 6], TENANT));
    for vid in [0, 1, 100, 4094] {
        for frame in [&syn, &announce] {
            let tagged = vlan_tag(frame, 0x8100, vid);
            assert_eq!(
                admit(&mut f, &tagged),
                dropped(DropReason::VlanTagged),
                "VID {vid}"
            );
        }
    }
    assert_eq!(f.counters().dropped(DropReason::VlanTagged), 8);
}

#[test]
fn unicast_packets_in_group_frames_are_dropped() {
    let mut f = switch();
    // A flow the verdicts open, sent to the broadcast MAC or a multicast one: the edge's
    // outside link would carry it to every machine there.
    let syn = tcp(Ip::V4(TENANT), Ip::V4(SERVER), 40000, 80, Seg::Syn);
    let syn6 = tcp(Ip::V6(TENANT6), Ip::V6(SERVER6), 40000, 80, Seg::Syn);
    for mac in [BCAST, [0x01, 0, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]] {
        for frame in [&syn, &syn6] {
            let mut frame = frame.clone();
            frame[..6].copy_from_slice(&mac);
            assert_eq!(
                admit(&mut f, &frame),
                dropped(DropReason::UnicastToGroup),
                "{mac:02x?}"
            );
        }
    }
    assert_eq!(f.counters().dropped(DropReason::UnicastToGroup), 6);
    // To a unicast MAC, and group packets in group frames, as before.
    assert_eq!(admit(&mut f, &syn), Admit::Pass);
    assert_eq!(admit(&mut f, &syn6), Admit::Pass);
    let dhcp = to_mac(frames::udp(Ip::V4([0; 4]), Ip::V4([255; 4]), 68, 67), BCAST);
    assert_eq!(admit(&mut f, &dhcp), Admit::Pass);
    let subnet = to_mac(
        frames::udp(Ip::V4(TENANT), Ip::V4([10, 0, 0, 255]), 5000, 5000),
        BCAST,
    );
    assert_eq!(admit(&mut f, &subnet), Admit::Pass);
    let mdns = to_mac(
        frames::udp(Ip::V4(TENANT), Ip::V4([224, 0, 0, 251]), 5353, 5353),
        [0x01, 0, 0x5e, 0, 0, 0xfb],
    );
    assert_eq!(admit(&mut f, &mdns), Admit::Pass);
    let mut all_nodes = [0u8; 16];
    all_nodes[0] = 0xff;
    all_nodes[1] = 0x02;
    all_nodes[15] = 1;
    let ping6 = to_mac(
        icmp6_echo(TENANT6, all_nodes, true, 1),
        [0x33, 0x33, 0, 0, 0, 1],
    );
    assert_eq!(admit(&mut f, &ping6), Admit::Pass);
}
