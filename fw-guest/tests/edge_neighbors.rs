//! ARP and neighbour discovery from the outside at the edge: only a gateway's requests for and
//! answers to tenants cross, their link-layer address the frame's source, within the outside's
//! budget. Real frames, explicit clock.

mod frames;

use frames::edge::*;
use frames::*;
use fw_guest::filter::*;

use EdgeSide::{Cloud, Outside};

/// An ARP frame from the outside, every field chosen (Ethernet source `eth_src`).
fn outside_arp(op: u16, eth_src: [u8; 6], sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&[0xff; 6]);
    b.extend_from_slice(&eth_src);
    b.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    b.extend_from_slice(&op.to_be_bytes());
    b.extend_from_slice(&sha);
    b.extend_from_slice(&spa);
    b.extend_from_slice(&[0; 6]);
    b.extend_from_slice(&tpa);
    b.resize(60, 0);
    b
}

#[test]
fn outside_neighbour_frames_cross_only_as_a_gateways_requests_and_answers() {
    use fw_guest::filter::hygiene::OUTSIDE_BURST;
    let mut f = edge(1024, Config::default());
    let (gw, gw_mac, evil) = ([10, 66, 0, 1], GW_MAC.0, [0x02, 0, 0, 0, 0, 0x66]);
    let mut t = 0;
    let mut at = |f: &mut Filter, frame: &[u8]| {
        t += SEC; // within the outside's budget
        f.process_edge(Outside, Cloud, frame, t)
    };
    // The gateway asks for a tenant, and answers a tenant's (the switch's) request.
    assert_eq!(
        at(&mut f, &outside_arp(1, gw_mac, gw_mac, gw, TENANT_IP)),
        FWD
    );
    assert_eq!(
        at(&mut f, &outside_arp(2, gw_mac, gw_mac, gw, TENANT_IP)),
        FWD
    );
    assert_eq!(f.counters().arp, 2);
    // A gratuitous ARP for the gateway (what poisoned the switch), or a request for anything
    // but a tenant: nobody in the cloud needs it.
    assert_eq!(
        at(&mut f, &outside_arp(1, evil, evil, gw, gw)),
        drop(DropReason::NeighborTarget)
    );
    assert_eq!(
        at(&mut f, &outside_arp(2, evil, evil, gw, [10, 66, 0, 9])),
        drop(DropReason::NeighborTarget)
    );
    // Claims of a tenant's address, or of an address the edge does not expect outside (a
    // host's underlay address, another outside host), to a tenant.
    assert_eq!(
        at(
            &mut f,
            &outside_arp(2, evil, evil, OTHER_TENANT_IP, TENANT_IP)
        ),
        drop(DropReason::SpoofedNeighbor)
    );
    for claimed in [[192, 0, 2, 10], [10, 66, 0, 7], [198, 51, 100, 1]] {
        assert_eq!(
            at(&mut f, &outside_arp(2, evil, evil, claimed, TENANT_IP)),
            drop(DropReason::SpoofedNeighbor),
            "{claimed:?}"
        );
    }
    // A sender hardware address that is not the frame's source.
    assert_eq!(
        at(&mut f, &outside_arp(2, evil, gw_mac, gw, TENANT_IP)),
        drop(DropReason::SpoofedMac)
    );
    // IPv6: the gateway (::1 of the tenant's /64) soliciting the tenant passes; anyone else not.
    let mut gw6 = TENANT6_IP;
    gw6[15] = 1;
    let mut ns = ndp_solicit(gw6, TENANT6_IP, 255);
    assert_eq!(at(&mut f, &ns), FWD);
    let mut other6 = TENANT6_IP;
    other6[15] = 0x66;
    ns = ndp_solicit(other6, TENANT6_IP, 255);
    assert_eq!(at(&mut f, &ns), drop(DropReason::SpoofedNeighbor));
    // The gateway's solicitation naming another link-layer address, first or behind another
    // option (a nonce) that hid it, or with options beyond it.
    {
        use frames::switch::{nd_raw, ns_body, solicited};
        let (sol, sol_mac) = solicited(TENANT6_IP);
        let lla = |m: [u8; 6]| [&[1u8, 1][..], &m[..]].concat();
        let nonce = [14u8, 1, 1, 2, 3, 4, 5, 6];
        let ns_with =
            |options: &[u8]| nd_raw(gw_mac, sol_mac, gw6, sol, &ns_body(TENANT6_IP, options));
        assert_eq!(at(&mut f, &ns_with(&lla(gw_mac))), FWD);
        assert_eq!(at(&mut f, &ns_with(&[])), FWD);
        assert_eq!(
            at(&mut f, &ns_with(&lla(evil))),
            drop(DropReason::SpoofedMac)
        );
        for options in [
            [&nonce[..], &lla(evil)[..]].concat(),
            [&lla(gw_mac)[..], &nonce[..]].concat(),
        ] {
            assert_eq!(
                at(&mut f, &ns_with(&options)),
                drop(DropReason::NeighborMalformed)
            );
        }
    }
    // Beyond the budget, even the gateway's frames wait (all at one instant).
    let burst: usize = (0..2 * OUTSIDE_BURST)
        .filter(|_| {
            let frame = outside_arp(1, gw_mac, gw_mac, gw, TENANT_IP);
            f.process_edge(Outside, Cloud, &frame, 100 * SEC) == FWD
        })
        .count();
    assert_eq!(burst, OUTSIDE_BURST as usize);
    // Every drop is counted by its reason.
    assert_eq!(f.counters().dropped(DropReason::NeighborTarget), 2);
    assert_eq!(f.counters().dropped(DropReason::SpoofedNeighbor), 5);
    assert_eq!(f.counters().dropped(DropReason::SpoofedMac), 2);
    assert_eq!(f.counters().dropped(DropReason::NeighborMalformed), 2);
    assert_eq!(
        f.counters().dropped(DropReason::NeighborRate),
        u64::from(OUTSIDE_BURST)
    );
}
