//! The control plane as the filter sees it: `Attach` (ports and addresses), `FlushTenant` (nothing
//! of the tenant survives), `Adopt` (flows of a migrated tenant continue mid-stream), and the
//! edge role's address-based tenant lookup. Real frames (smoltcp-built), explicit clock.

mod frames;

use std::sync::atomic::AtomicU64;

use frames::*;
use fw_guest::filter::*;
use vigil_wire::boot::TENANT_UNASSIGNED;
use vigil_wire::ring;
use vigil_wire::verdict::{v4, PORT_NONE};

const TENANT_B: [u8; 4] = [10, 0, 0, 3];

use Direction::{Egress as EG, Ingress as IN};

fn filter(flow_capacity: usize) -> Filter<'static> {
    filter_with(flow_capacity, 64)
}

fn https(local: [u8; 4]) -> Rule {
    Rule {
        local_addr: v4(local),
        ..Rule::egress_to(IpVersion::V4, Protocol::Tcp, v4(SERVER), 443)
    }
}

fn dns() -> Rule {
    Rule::egress_to(IpVersion::V4, Protocol::Udp, v4(SERVER), 53)
}

fn tenant_flows(f: &Filter, tenant: u32) -> usize {
    f.conntrack()
        .iter()
        .filter(|s| s.tenant() == tenant)
        .count()
}

/// Tenant `t` with an established HTTPS connection from port `sport`, opened by a plain `Add`.
fn handshake(f: &mut Filter, t: u32, local: [u8; 4], sport: u16) {
    let (a, b) = (Ip::V4(local), Ip::V4(SERVER));
    assert_eq!(f.process(t, EG, &tcp(a, b, sport, 443, Seg::Syn), 0), FWD);
    assert_eq!(
        f.process(t, IN, &tcp(b, a, 443, sport, Seg::SynAck), 0),
        FWD
    );
    assert_eq!(f.process(t, EG, &tcp(a, b, sport, 443, Seg::Ack), 0), FWD);
}

#[test]
fn flush_tenant_leaves_nothing_of_the_tenant() {
    let mut f = filter(1024);
    let mut seq = Seq(0);
    for (t, local) in [(T1, TENANT), (T2, TENANT_B)] {
        f.apply(&VerdictRepr::add(t, seq.next(), 0, https(local)), 0)
            .unwrap();
        f.apply(&VerdictRepr::add(t, seq.next(), 0, dns()), 0)
            .unwrap();
        let port = Some(t as u16);
        let addr = Some((IpVersion::V4, v4(local)));
        f.apply(&VerdictRepr::attach(t, seq.next(), port, addr), 0)
            .unwrap();
    }
    assert_eq!(f.tenancy().port(1), T1);
    assert_eq!(f.tenancy_mut().take_port_changes(), 0b110);
    // Many flows per tenant, so backward-shift deletion during the scan gets exercised.
    for sport in 0..300u16 {
        handshake(&mut f, T1, TENANT, 20000 + sport);
        handshake(&mut f, T2, TENANT_B, 20000 + sport);
    }
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    assert_eq!(f.process(T1, EG, &udp(a, b, 5000, 53), 0), FWD);
    assert_eq!(tenant_flows(&f, T1), 301);
    assert_eq!(tenant_flows(&f, T2), 300);

    f.apply(&VerdictRepr::flush_tenant(T1, seq.next()), SEC)
        .unwrap();
    // Immediately, with no sweep and no packet: no entry, verdict, port or address of T1.
    assert_eq!(tenant_flows(&f, T1), 0);
    assert_eq!(f.conntrack().used(), 300);
    assert_eq!(f.counters().flows_revoked, 301);
    assert_eq!(f.verdicts().len(), 2);
    assert_eq!(f.tenancy().port(1), TENANT_UNASSIGNED);
    assert_eq!(f.tenancy().port(2), T2);
    assert_eq!(f.tenancy().owner(IpVersion::V4, &v4(TENANT)), None);
    assert_eq!(f.tenancy().owner(IpVersion::V4, &v4(TENANT_B)), Some(T2));
    // Mid-stream packets of T1's old flows are dropped; T2's continue.
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 20007, 443, Seg::Data), SEC),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 20007, Seg::Data), SEC),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T1, IN, &udp(b, a, 53, 5000), SEC),
        drop(DropReason::NoVerdict)
    );
    let bb = Ip::V4(TENANT_B);
    for sport in 0..300u16 {
        assert_eq!(
            f.process(T2, IN, &tcp(b, bb, 443, 20000 + sport, Seg::Data), SEC),
            FWD,
            "T2 flow {sport}"
        );
    }
    assert_eq!(tenant_flows(&f, T1), 0);
}

#[test]
fn adopt_takes_over_mid_stream_flows_add_does_not() {
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    // Plain Add: the mid-stream ACK of an unseen flow is dropped, nothing is created.
    let mut f = filter(64);
    f.apply(&VerdictRepr::add(T1, 1, 0, https(TENANT)), 0)
        .unwrap();
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Ack), 0),
        drop(DropReason::InvalidTcpState)
    );
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Data), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(f.conntrack().used(), 0);

    // Adopt: the same ACK passes and creates an entry, provisional until the server answers.
    let mut f = filter(64);
    f.apply(&VerdictRepr::adopt(T1, 1, 0, https(TENANT)), 0)
        .unwrap();
    assert_eq!(f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Ack), 0), FWD);
    let flows: Vec<_> = f.conntrack().iter().collect();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].tcp_state(), TcpState::Adopted);
    assert_eq!(flows[0].origin(), EG);
    assert_eq!(flows[0].tenant(), T1);
    assert_eq!(f.counters().flows_adopted, 1);
    // The flow then behaves as a tracked one: data both ways (the answer makes it established),
    // and a SYN inside it is invalid.
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Data), SEC),
        FWD
    );
    let flow = *f.conntrack().iter().next().unwrap();
    assert_eq!(flow.tcp_state(), TcpState::Established);
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Syn), SEC),
        drop(DropReason::InvalidTcpState)
    );
    // The first packet after a migration may be the server's: adopted in the verdict's
    // reverse direction, the flow still counts as opened by the tenant.
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40001, Seg::Data), SEC),
        FWD
    );
    assert_eq!(f.conntrack().used(), 2);
    // Not adopted: a RST, traffic the rule does not cover, another tenant.
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40002, 443, Seg::Rst), SEC),
        drop(DropReason::InvalidTcpState)
    );
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40002, 444, Seg::Ack), SEC),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T2, EG, &tcp(a, b, 40002, 443, Seg::Ack), SEC),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(f.conntrack().used(), 2);
    // A FIN picked up mid-stream is adopted too (in FIN-wait once the server answers).
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40003, 443, Seg::Fin), SEC),
        FWD
    );
    // Removing the Adopt verdict revokes what it adopted, like any verdict.
    f.apply(
        &VerdictRepr {
            op: Op::Remove,
            ..VerdictRepr::adopt(T1, 2, 0, https(TENANT))
        },
        SEC,
    )
    .unwrap();
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Data), SEC),
        drop(DropReason::Revoked)
    );
}

#[test]
fn adopt_udp_reply_and_refresh_semantics() {
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    let mut f = filter(64);
    // A reply from the server of a UDP exchange the tenant started on its old host.
    f.apply(&VerdictRepr::add(T1, 1, 0, dns()), 0).unwrap();
    assert_eq!(
        f.process(T1, IN, &udp(b, a, 53, 5000), 0),
        drop(DropReason::NoVerdict)
    );
    // Re-sent as Adopt (identical rule): the verdict is refreshed and now adopts.
    f.apply(&VerdictRepr::adopt(T1, 2, 0, dns()), 0).unwrap();
    assert_eq!(f.verdicts().len(), 1);
    assert_eq!(f.process(T1, IN, &udp(b, a, 53, 5000), 0), FWD);
    // Unreplied (evictable, counted against T1's inbound quota) until the tenant's side answers
    // here and the far side speaks again: a datagram that looks like a reply may be forged, and
    // the tenant may answer a forged one.
    let flow = *f.conntrack().iter().next().unwrap();
    assert_eq!((flow.origin(), flow.replied()), (IN, false));
    assert_eq!(f.conntrack().inbound_of(T1), 1);
    assert_eq!(f.process(T1, EG, &udp(a, b, 5000, 53), 0), FWD);
    let flow = *f.conntrack().iter().next().unwrap();
    assert!(!flow.replied());
    assert_eq!(f.conntrack().inbound_of(T1), 1);
    assert_eq!(f.process(T1, IN, &udp(b, a, 53, 5000), 0), FWD);
    let flow = *f.conntrack().iter().next().unwrap();
    assert!(flow.replied());
    assert_eq!(f.conntrack().inbound_of(T1), 0);
    // An Add of the same rule takes adoption away again (the latest record wins).
    assert_eq!(f.verdicts().adopting(), 1);
    f.apply(&VerdictRepr::add(T1, 3, 0, dns()), 0).unwrap();
    assert_eq!(f.verdicts().adopting(), 0);
    assert_eq!(
        f.process(T1, IN, &udp(b, a, 53, 5001), 0),
        drop(DropReason::NoVerdict)
    );
    // IPv6 works the same way.
    let rule6 = Rule::egress_to(IpVersion::V6, Protocol::Tcp, SERVER6, 443);
    f.apply(&VerdictRepr::adopt(T1, 4, 0, rule6), 0).unwrap();
    let (a6, b6) = (Ip::V6(TENANT6), Ip::V6(SERVER6));
    assert_eq!(
        f.process(T1, EG, &tcp(a6, b6, 40000, 443, Seg::Data), 0),
        FWD
    );
    // The counters block carries adoptions and revocations to the VMM.
    let block: Vec<AtomicU64> = (0..ring::counters_bytes(1) / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    let w = ring::CountersWriter::format(&block, 1).unwrap();
    f.counters().publish(&w, 0);
    let r = ring::CountersReader::attach(&block).unwrap();
    assert_eq!(r.global(ring::GLOBAL_FLOWS_ADOPTED), Some(2));
    assert_eq!(r.global(ring::GLOBAL_FLOWS_REVOKED), Some(0));
    assert_eq!(f.verdicts().adopting(), 1);
    f.apply(&VerdictRepr::flush_tenant(T1, 5), 0).unwrap();
    assert_eq!(f.verdicts().adopting(), 0);
    assert_eq!(f.conntrack().used(), 0);
}

#[test]
fn attach_records_through_the_ring() {
    // The VMM's path: Attach/Adopt/FlushTenant records pushed into the shared ring.
    let region: Vec<AtomicU64> = (0..ring::ring_bytes(8) / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    ring::format(&region, 8).unwrap();
    let mut producer = ring::Producer::attach(&region).unwrap();
    let mut consumer = ring::Consumer::attach(&region).unwrap();
    let addr = Some((IpVersion::V4, v4(TENANT)));
    producer
        .push(&VerdictRepr::attach(T1, 1, Some(2), addr).to_bytes())
        .unwrap();
    // The uplink (tenant 0 at boot) cannot be taken; tenant 0 cannot be given anything.
    producer
        .push(&VerdictRepr::attach(T2, 2, Some(0), None).to_bytes())
        .unwrap();
    producer
        .push(&VerdictRepr::attach(0, 3, Some(3), None).to_bytes())
        .unwrap();
    producer
        .push(&VerdictRepr::attach(T2, 4, Some(PORT_NONE), None).to_bytes())
        .unwrap();
    producer
        .push(&VerdictRepr::attach(T2, 5, Some(200), None).to_bytes())
        .unwrap();

    let mut f = filter(16);
    f.tenancy_mut().set_boot_port(0, 0);
    f.tenancy_mut().set_boot_port(1, T2);
    assert_eq!(f.drain_ring(&mut consumer, 0), Ok(5));
    assert_eq!(f.counters().verdicts_applied, 2);
    assert_eq!(f.counters().verdicts_rejected, 3);
    let t = f.tenancy_mut();
    assert_eq!((t.port(0), t.port(1), t.port(2)), (0, T2, T1));
    assert_eq!(t.port(3), TENANT_UNASSIGNED);
    assert_eq!(t.owner(IpVersion::V4, &v4(TENANT)), Some(T1));
    assert_eq!(t.take_port_changes(), 1 << 2);
    // A verdict of T1 with no rule change opens nothing by itself.
    assert_eq!(f.verdicts().len(), 0);
    assert_eq!(
        f.drop_frame(DropReason::UnknownTenant),
        drop(DropReason::UnknownTenant)
    );
    assert_eq!(f.counters().dropped(DropReason::UnknownTenant), 1);
}

#[test]
fn edge_finds_the_tenant_by_address() {
    use EdgeSide::{Cloud, Outside};
    let mut f = filter(64);
    let mut seq = Seq(0);
    let internet = [93, 184, 216, 34];
    let rule = Rule::egress_to(IpVersion::V4, Protocol::Tcp, v4(internet), 443);
    f.apply(&VerdictRepr::add(T1, seq.next(), 0, rule), 0)
        .unwrap();
    let (a, b, x) = (Ip::V4(TENANT), Ip::V4(TENANT_B), Ip::V4(internet));
    // No address attached yet: nobody owns the source.
    assert_eq!(
        f.process_edge(Cloud, Outside, &tcp(a, x, 40000, 443, Seg::Syn), 0),
        drop(DropReason::UnknownTenant)
    );
    for (t, local) in [(T1, TENANT), (T2, TENANT_B)] {
        let addr = Some((IpVersion::V4, v4(local)));
        f.apply(&VerdictRepr::attach(t, seq.next(), None, addr), 0)
            .unwrap();
    }
    assert_eq!(
        f.process_edge(Cloud, Outside, &tcp(a, x, 40000, 443, Seg::Syn), 0),
        FWD
    );
    assert_eq!(
        f.process_edge(Outside, Cloud, &tcp(x, a, 443, 40000, Seg::SynAck), 0),
        FWD
    );
    assert_eq!(
        f.process_edge(Cloud, Outside, &tcp(a, x, 40000, 443, Seg::Ack), 0),
        FWD
    );
    // The flow is T1's (judged egress for the owner of the source).
    assert_eq!(tenant_flows(&f, T1), 1);
    // T2 has no verdict; an outside host cannot open anything toward T1; nobody owns .9.
    assert_eq!(
        f.process_edge(Cloud, Outside, &tcp(b, x, 40000, 443, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process_edge(Outside, Cloud, &tcp(x, a, 443, 40001, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process_edge(
            Outside,
            Cloud,
            &tcp(x, Ip::V4([10, 0, 0, 9]), 443, 1, Seg::Syn),
            0
        ),
        drop(DropReason::UnknownTenant)
    );
    // ARP from the outside passes only as the gateway of an attached subnet asking for (or
    // answering) a tenant (see edge_attacks.rs).
    assert_eq!(
        f.process_edge(Outside, Cloud, &arp_request(internet, [10, 0, 0, 9]), 0),
        drop(DropReason::NeighborTarget)
    );
    assert_eq!(
        f.process_edge(Outside, Cloud, &arp_request([10, 0, 0, 1], TENANT), 0),
        FWD
    );
    // Cloud to cloud: egress for the source's owner and ingress for the destination's.
    assert_eq!(
        f.process_edge(Cloud, Cloud, &tcp(a, b, 1000, 2000, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    // A flush removes T1's address: its established flow is gone at the edge too.
    f.apply(&VerdictRepr::flush_tenant(T1, seq.next()), SEC)
        .unwrap();
    assert_eq!(
        f.process_edge(Outside, Cloud, &tcp(x, a, 443, 40000, Seg::Data), SEC),
        drop(DropReason::UnknownTenant)
    );
    assert_eq!(f.conntrack().used(), 0);
    assert_eq!(f.counters().dropped(DropReason::UnknownTenant), 3);
}
