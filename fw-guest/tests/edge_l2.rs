//! The edge's layer 2 toward the cloud: what one frame from the outside may become. A unicast
//! packet in a broadcast or multicast frame is flooded by the cloud port to every host (and by
//! each switch to every tenant port), so it is dropped as `unicast_to_group` before it is
//! judged; group packets (a gateway's solicitation) and unicast frames pass as before.

mod frames;

use frames::*;
use fw_guest::filter::*;
use vigil_wire::verdict::v4;

use EdgeSide::{Cloud, Outside};

const TENANT_IP: [u8; 4] = [10, 66, 0, 2];
const TENANT6_IP: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const CLIENT_IP: [u8; 4] = [198, 51, 100, 7];
const CLIENT6_IP: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];

/// The edge with T1 at `TENANT_IP` and `TENANT6_IP`, TCP 7000 and UDP 5353 open to anyone.
fn edge() -> Filter<'static> {
    let mut f = filter_with(256, 16);
    let mut seq = Seq(0);
    for addr in [(IpVersion::V4, v4(TENANT_IP)), (IpVersion::V6, TENANT6_IP)] {
        f.apply(&VerdictRepr::attach(T1, seq.next(), None, Some(addr)), 0)
            .unwrap();
    }
    for version in [IpVersion::V4, IpVersion::V6] {
        for (protocol, port) in [(Protocol::Tcp, 7000), (Protocol::Udp, 5353)] {
            let open = Rule {
                local_port: port,
                ..Rule::any(Direction::Ingress, version, protocol)
            };
            f.apply(&VerdictRepr::add(T1, seq.next(), 0, open), 0)
                .unwrap();
        }
    }
    f
}

fn to_mac(mut frame: Vec<u8>, mac: [u8; 6]) -> Vec<u8> {
    frame[..6].copy_from_slice(&mac);
    frame
}

#[test]
fn unicast_packets_in_group_frames_from_the_outside_are_dropped() {
    let mut f = edge();
    let packets = [
        tcp(Ip::V4(CLIENT_IP), Ip::V4(TENANT_IP), 40000, 7000, Seg::Syn),
        udp(Ip::V4(CLIENT_IP), Ip::V4(TENANT_IP), 40001, 5353),
        tcp(
            Ip::V6(CLIENT6_IP),
            Ip::V6(TENANT6_IP),
            40002,
            7000,
            Seg::Syn,
        ),
        udp(Ip::V6(CLIENT6_IP), Ip::V6(TENANT6_IP), 40003, 5353),
    ];
    for mac in [
        [0xff; 6],
        [0x01, 0, 0x5e, 0, 0, 1],
        [0x33, 0x33, 0, 0, 0, 1],
    ] {
        for p in &packets {
            let frame = to_mac(p.clone(), mac);
            assert_eq!(
                f.process_edge(Outside, Cloud, &frame, SEC),
                drop(DropReason::UnicastToGroup),
                "{mac:02x?}"
            );
        }
    }
    assert_eq!(f.counters().dropped(DropReason::UnicastToGroup), 12);
    assert_eq!(f.conntrack().used(), 0, "nothing opened");
    // The same packets to the tenant's MAC pass.
    for p in &packets {
        assert_eq!(f.process_edge(Outside, Cloud, p, SEC), FWD);
    }
    // A group packet in a group frame is judged as before (nobody owns a broadcast address).
    let bcast = to_mac(
        udp(Ip::V4(CLIENT_IP), Ip::V4([255; 4]), 40004, 5353),
        [0xff; 6],
    );
    assert_eq!(
        f.process_edge(Outside, Cloud, &bcast, SEC),
        drop(DropReason::UnknownTenant)
    );
}
