//! Per-tenant flow quotas (issue #12): a tenant that fills its share of the conntrack table opens
//! nothing more ([`DropReason::FlowQuota`]) while other tenants keep opening flows, in the switch
//! role ([`Filter::process`]) and at the edge ([`Filter::process_edge`]); a tenant whose entries
//! close or expire gets its room back. What the far side opens without the tenant's answer
//! (unreplied UDP, ICMP echo, adopted datagrams) is bounded per tenant (the inbound quota) and
//! evictable: spoofed floods hold neither a tenant at its quota nor the table full, and never
//! evict a replied flow. Real frames, explicit clock.

mod frames;

use frames::*;
use fw_guest::filter::*;
use vigil_wire::verdict::v4;

use EdgeSide::{Cloud, Outside};

const QUOTA: usize = 100;

fn filter(quota: Option<usize>) -> Filter<'static> {
    let flows = Box::leak(vec![FlowSlot::EMPTY; slots_for(1024)].into_boxed_slice());
    let verdicts = Box::leak(vec![VerdictSlot::EMPTY; 64].into_boxed_slice());
    let index = Box::leak(vec![IndexSlot::EMPTY; 128].into_boxed_slice());
    let config = Config {
        flow_quota: quota,
        ..Config::default()
    };
    Filter::new(flows, verdicts, index, config).unwrap()
}

/// Egress UDP to anyone for `tenant`, from any local port (the explicit wildcard).
fn allow_udp(f: &mut Filter, tenant: u32, seq: &mut Seq) {
    let rule = Rule::any_port(Direction::Egress, IpVersion::V4, Protocol::Udp);
    f.apply(&VerdictRepr::add(tenant, seq.next(), 0, rule), 0)
        .unwrap();
}

#[test]
fn a_tenant_at_its_quota_opens_nothing_and_others_keep_working_switch() {
    let mut f = filter(Some(QUOTA));
    let mut seq = Seq(0);
    allow_udp(&mut f, T1, &mut seq);
    allow_udp(&mut f, T2, &mut seq);
    let send = |f: &mut Filter, t: u32, port: u16, now: u64| {
        f.process(
            t,
            Direction::Egress,
            &udp(Ip::V4(TENANT), Ip::V4(SERVER), port, 53),
            now,
        )
    };
    // A query and its answer: a replied entry, which nothing evicts (an unreplied one would
    // make room for the tenant's next flow).
    let exchange = |f: &mut Filter, t: u32, port: u16, now: u64| {
        let d = send(f, t, port, now);
        if d != FWD {
            return d;
        }
        f.process(
            t,
            Direction::Ingress,
            &udp(Ip::V4(SERVER), Ip::V4(TENANT), 53, port),
            now,
        )
    };
    for p in 0..QUOTA as u16 {
        assert_eq!(exchange(&mut f, T1, 10_000 + p, 0), FWD);
    }
    assert_eq!(f.conntrack().flows_of(T1), QUOTA);
    // T1 is full: new flows are refused and counted; its open flows still pass.
    for p in 0..50u16 {
        assert_eq!(send(&mut f, T1, 20_000 + p, 0), drop(DropReason::FlowQuota));
    }
    assert_eq!(
        send(&mut f, T1, 10_000, 0),
        FWD,
        "an open flow still passes"
    );
    assert_eq!(f.counters().dropped(DropReason::FlowQuota), 50);
    // T2 opens as many flows as its own quota allows, in the same table.
    for p in 0..QUOTA as u16 {
        assert_eq!(exchange(&mut f, T2, 10_000 + p, 0), FWD, "T2 flow {p}");
    }
    assert_eq!(send(&mut f, T2, 30_000, 0), drop(DropReason::FlowQuota));
    assert_eq!(f.conntrack().flows_of(T2), QUOTA);
    assert!(!f.conntrack().is_full(), "the table itself had room");
    // T1's flows expire (120 s replied UDP): room again.
    assert_eq!(send(&mut f, T1, 20_000, 121 * SEC), FWD);
}

#[test]
fn a_tenant_at_its_quota_opens_nothing_and_others_keep_working_edge() {
    let mut f = filter(Some(QUOTA));
    let mut seq = Seq(0);
    let (t1_ip, t2_ip, outside) = ([10, 66, 0, 2], [10, 66, 0, 3], [198, 51, 100, 7]);
    for (t, ip) in [(T1, t1_ip), (T2, t2_ip)] {
        f.apply(
            &VerdictRepr::attach(t, seq.next(), None, Some((IpVersion::V4, v4(ip)))),
            0,
        )
        .unwrap();
        let open = Rule {
            local_port: 7000,
            ..Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Tcp)
        };
        f.apply(&VerdictRepr::add(t, seq.next(), 0, open), 0)
            .unwrap();
    }
    // The outside opens connections to T1 until its quota is reached (established, so nothing
    // can be evicted), then to T2.
    let connect = |f: &mut Filter, ip: [u8; 4], sport: u16| {
        let syn = tcp(Ip::V4(outside), Ip::V4(ip), sport, 7000, Seg::Syn);
        let d = f.process_edge(Outside, Cloud, &syn, 0);
        if d != FWD {
            return d;
        }
        let sa = tcp(Ip::V4(ip), Ip::V4(outside), 7000, sport, Seg::SynAck);
        assert_eq!(f.process_edge(Cloud, Outside, &sa, 0), FWD);
        let ack = tcp(Ip::V4(outside), Ip::V4(ip), sport, 7000, Seg::Ack);
        f.process_edge(Outside, Cloud, &ack, 0)
    };
    for p in 0..QUOTA as u16 {
        assert_eq!(connect(&mut f, t1_ip, 1000 + p), FWD);
    }
    assert_eq!(connect(&mut f, t1_ip, 5000), drop(DropReason::FlowQuota));
    assert_eq!(
        f.counters().half_open_evicted,
        0,
        "no established flow was touched"
    );
    for p in 0..QUOTA as u16 {
        assert_eq!(connect(&mut f, t2_ip, 1000 + p), FWD, "T2 connect {p}");
    }
    assert_eq!(f.conntrack().flows_of(T1), QUOTA);
    assert_eq!(f.conntrack().flows_of(T2), QUOTA);
}

#[test]
fn the_default_quota_is_half_the_table() {
    let f = filter(None);
    assert_eq!(
        f.conntrack().flow_quota(),
        default_flow_quota(f.conntrack().capacity())
    );
    assert_eq!(f.conntrack().flow_quota(), f.conntrack().capacity() / 2);
}

/// The edge with T1 at 10.66.0.2 and T2 at 10.66.0.3, each with UDP port 5353 open to anyone
/// from the outside and egress UDP and TCP to anyone.
fn open_edge(flows: usize) -> (Filter<'static>, [[u8; 4]; 2]) {
    let flows = Box::leak(vec![FlowSlot::EMPTY; slots_for(flows)].into_boxed_slice());
    let verdicts = Box::leak(vec![VerdictSlot::EMPTY; 64].into_boxed_slice());
    let index = Box::leak(vec![IndexSlot::EMPTY; 128].into_boxed_slice());
    let mut f = Filter::new(flows, verdicts, index, Config::default()).unwrap();
    let mut seq = Seq(0);
    let ips = [[10, 66, 0, 2], [10, 66, 0, 3]];
    for (t, ip) in [(T1, ips[0]), (T2, ips[1])] {
        f.apply(
            &VerdictRepr::attach(t, seq.next(), None, Some((IpVersion::V4, v4(ip)))),
            0,
        )
        .unwrap();
        let open = Rule {
            local_port: 5353,
            ..Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Udp)
        };
        f.apply(&VerdictRepr::add(t, seq.next(), 0, open), 0)
            .unwrap();
        for p in [Protocol::Udp, Protocol::Tcp] {
            let out = Rule::any_port(Direction::Egress, IpVersion::V4, p);
            f.apply(&VerdictRepr::add(t, seq.next(), 0, out), 0)
                .unwrap();
        }
    }
    (f, ips)
}

/// A datagram to `ip`:5353 from a forged outside source that `n` picks.
fn spoofed(n: u32, ip: [u8; 4]) -> Vec<u8> {
    let src = [198, 18 + (n >> 16) as u8 % 2, (n >> 8) as u8, n as u8];
    udp(Ip::V4(src), Ip::V4(ip), 1024 + (n % 50_000) as u16, 5353)
}

#[test]
fn a_spoofed_udp_flood_holds_no_tenant_at_its_quota_nor_the_table_full() {
    let (mut f, [t1_ip, t2_ip]) = open_edge(1024);
    let quota = f.conntrack().flow_quota();
    let inbound = f.conntrack().inbound_quota();
    assert!(inbound < quota);
    let server = [203, 0, 113, 9];
    // A real client's query that T1 answers, and the client's next one: replied (the client
    // hears T1), so the flood never evicts it.
    let client = [198, 51, 100, 7];
    let query = udp(Ip::V4(client), Ip::V4(t1_ip), 40000, 5353);
    let answer = udp(Ip::V4(t1_ip), Ip::V4(client), 5353, 40000);
    assert_eq!(f.process_edge(Outside, Cloud, &query, 0), FWD);
    assert_eq!(f.process_edge(Cloud, Outside, &answer, 0), FWD);
    assert_eq!(f.process_edge(Outside, Cloud, &query, 0), FWD);
    // Twice the quota of datagrams from forged sources at T1 and at T2, within one second
    // (~1.1k a second keeps 32k entries alive over the 30 s unreplied timeout): all delivered.
    for n in 0..2 * quota as u32 {
        for ip in [t1_ip, t2_ip] {
            assert_eq!(
                f.process_edge(Outside, Cloud, &spoofed(n, ip), 0),
                FWD,
                "{n}"
            );
        }
    }
    // What they opened is bounded by the inbound quota, oldest replaced.
    for t in [T1, T2] {
        assert!(f.conntrack().inbound_of(t) <= inbound);
        assert!(f.conntrack().flows_of(t) <= inbound + 1);
    }
    assert!(f.counters().unreplied_evicted > 0);
    assert!(!f.conntrack().is_full());
    // T1 still opens its own flows, UDP and TCP.
    let out = udp(Ip::V4(t1_ip), Ip::V4(server), 50000, 53);
    assert_eq!(f.process_edge(Cloud, Outside, &out, 0), FWD);
    let syn = tcp(Ip::V4(t1_ip), Ip::V4(server), 50001, 443, Seg::Syn);
    assert_eq!(f.process_edge(Cloud, Outside, &syn, 0), FWD);
    // The client's flow survived: its next query passes as the same flow.
    let before = f.counters().flows_created;
    assert_eq!(f.process_edge(Outside, Cloud, &query, SEC), FWD);
    assert_eq!(f.counters().flows_created, before);
    assert_eq!(f.counters().dropped(DropReason::FlowQuota), 0);
    assert_eq!(f.counters().dropped(DropReason::TableFull), 0);
}

#[test]
fn a_flood_the_tenants_answer_holds_no_tenant_at_its_quota_nor_the_table_full() {
    let (mut f, [t1_ip, t2_ip]) = open_edge(1024);
    let ping = Rule::any_port(Direction::Ingress, IpVersion::V4, Protocol::Icmp);
    for t in [T1, T2] {
        f.apply(&VerdictRepr::add(t, 100 + u64::from(t), 0, ping), 0)
            .unwrap();
    }
    let quota = f.conntrack().flow_quota();
    let inbound = f.conntrack().inbound_quota();
    // Forged datagrams and pings to both tenants, each answered (a DNS or mDNS server answers
    // any query, a kernel any ping): the answers go to the forged sources, which never speak
    // again. ~270 datagrams a second kept a tenant at a quota of 32k over the 120-s timeout of
    // a replied entry, and two such tenants filled the table.
    for n in 0..quota as u32 {
        for ip in [t1_ip, t2_ip] {
            let d = spoofed(n, ip);
            let src = [d[26], d[27], d[28], d[29]];
            let sport = u16::from_be_bytes([d[34], d[35]]);
            assert_eq!(f.process_edge(Outside, Cloud, &d, 0), FWD, "{n}");
            let answer = udp(Ip::V4(ip), Ip::V4(src), 5353, sport);
            assert_eq!(f.process_edge(Cloud, Outside, &answer, 0), FWD, "{n}");
            let ident = n as u16;
            let request = icmp4_echo(src, ip, true, ident);
            assert_eq!(f.process_edge(Outside, Cloud, &request, 0), FWD, "{n}");
            let reply = icmp4_echo(ip, src, false, ident);
            assert_eq!(f.process_edge(Cloud, Outside, &reply, 0), FWD, "{n}");
        }
    }
    for t in [T1, T2] {
        assert!(f.conntrack().inbound_of(t) <= inbound, "{t}");
        assert!(!f.conntrack().at_quota(t), "{t}");
    }
    assert!(!f.conntrack().is_full());
    // T1 still opens its own flows.
    let server = [203, 0, 113, 9];
    let out = udp(Ip::V4(t1_ip), Ip::V4(server), 50000, 53);
    assert_eq!(f.process_edge(Cloud, Outside, &out, SEC), FWD);
    let syn = tcp(Ip::V4(t1_ip), Ip::V4(server), 50001, 443, Seg::Syn);
    assert_eq!(f.process_edge(Cloud, Outside, &syn, SEC), FWD);
    // A client that speaks again after the answer hears the tenant: its entry is replied, and
    // the flood no longer evicts it.
    let client = [198, 51, 100, 7];
    let query = udp(Ip::V4(client), Ip::V4(t1_ip), 40000, 5353);
    let answer = udp(Ip::V4(t1_ip), Ip::V4(client), 5353, 40000);
    for d in [&query, &answer, &query] {
        let from = if d == &answer { Cloud } else { Outside };
        let to = if d == &answer { Outside } else { Cloud };
        assert_eq!(f.process_edge(from, to, d, SEC), FWD);
    }
    let inbound_before = f.conntrack().inbound_of(T1);
    for n in 0..quota as u32 {
        let d = spoofed(n + 70_000, t1_ip);
        assert_eq!(f.process_edge(Outside, Cloud, &d, SEC), FWD);
    }
    assert!(f.conntrack().inbound_of(T1) <= inbound.max(inbound_before));
    let before = f.counters().flows_created;
    assert_eq!(f.process_edge(Outside, Cloud, &query, 2 * SEC), FWD);
    assert_eq!(
        f.counters().flows_created,
        before,
        "the client's flow survived"
    );
    assert_eq!(f.counters().dropped(DropReason::FlowQuota), 0);
    assert_eq!(f.counters().dropped(DropReason::TableFull), 0);
}

#[test]
fn unreplied_entries_make_room_when_a_tenant_is_at_quota_or_the_table_is_full() {
    // Inbound quota as large as the flow quota: the flood reaches the flow quota itself (and two
    // tenants' quotas fill the table), as with no inbound quota at all.
    let flows = Box::leak(vec![FlowSlot::EMPTY; slots_for(256)].into_boxed_slice());
    let verdicts = Box::leak(vec![VerdictSlot::EMPTY; 64].into_boxed_slice());
    let index = Box::leak(vec![IndexSlot::EMPTY; 128].into_boxed_slice());
    let config = Config {
        inbound_quota: Some(1 << 20),
        ..Config::default()
    };
    let mut f = Filter::new(flows, verdicts, index, config).unwrap();
    let mut seq = Seq(0);
    let ips = [[10, 66, 0, 2], [10, 66, 0, 3], [10, 66, 0, 4]];
    for (t, ip) in [(T1, ips[0]), (T2, ips[1]), (3, ips[2])] {
        f.apply(
            &VerdictRepr::attach(t, seq.next(), None, Some((IpVersion::V4, v4(ip)))),
            0,
        )
        .unwrap();
        let open = Rule {
            local_port: 5353,
            ..Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Udp)
        };
        f.apply(&VerdictRepr::add(t, seq.next(), 0, open), 0)
            .unwrap();
        let out = Rule::any_port(Direction::Egress, IpVersion::V4, Protocol::Udp);
        f.apply(&VerdictRepr::add(t, seq.next(), 0, out), 0)
            .unwrap();
    }
    let quota = f.conntrack().flow_quota();
    for n in 0..quota as u32 {
        for ip in [ips[0], ips[1]] {
            assert_eq!(f.process_edge(Outside, Cloud, &spoofed(n, ip), 0), FWD);
        }
    }
    assert_eq!(f.conntrack().flows_of(T1), quota);
    assert!(f.conntrack().is_full(), "two tenants' quotas are the table");
    // T1 at its quota opens a flow of its own: an unreplied entry makes room.
    let server = [203, 0, 113, 9];
    let out = udp(Ip::V4(ips[0]), Ip::V4(server), 50000, 53);
    assert_eq!(f.process_edge(Cloud, Outside, &out, SEC), FWD);
    // A third tenant, with nothing in the table, opens flows: the flooded ones make room.
    for p in 0..8 {
        let out = udp(Ip::V4(ips[2]), Ip::V4(server), 50000 + p, 53);
        assert_eq!(f.process_edge(Cloud, Outside, &out, SEC), FWD, "{p}");
    }
    assert_eq!(f.conntrack().flows_of(3), 8);
    assert_eq!(f.counters().dropped(DropReason::FlowQuota), 0);
    assert_eq!(f.counters().dropped(DropReason::TableFull), 0);
}

#[test]
fn an_echo_flood_is_bounded_as_a_udp_flood_is() {
    let (mut f, [t1_ip, _]) = open_edge(1024);
    let mut seq = Seq(100);
    let echo = Rule::any_port(Direction::Ingress, IpVersion::V4, Protocol::Icmp);
    f.apply(&VerdictRepr::add(T1, seq.next(), 0, echo), 0)
        .unwrap();
    let quota = f.conntrack().flow_quota();
    for n in 0..2 * quota as u32 {
        let src = [198, 18, (n >> 8) as u8, n as u8];
        let ping = icmp4_echo(src, t1_ip, true, n as u16);
        assert_eq!(f.process_edge(Outside, Cloud, &ping, 0), FWD, "{n}");
    }
    assert!(f.conntrack().inbound_of(T1) <= f.conntrack().inbound_quota());
    let out = udp(Ip::V4(t1_ip), Ip::V4([203, 0, 113, 9]), 50000, 53);
    assert_eq!(f.process_edge(Cloud, Outside, &out, 0), FWD);
}

#[test]
fn a_forged_reply_to_an_adoptable_verdict_is_no_reply() {
    // The switch after a migration: T1's DNS exchanges re-sent as an Adopt verdict.
    let mut f = filter(None);
    let rule = Rule::egress_to(IpVersion::V4, Protocol::Udp, v4(SERVER), 53);
    f.apply(&VerdictRepr::adopt(T1, 1, 0, rule), 0).unwrap();
    let quota = f.conntrack().flow_quota();
    // Datagrams that look like the server's answers, to every port of T1's (forged: the server
    // never heard from these ports here).
    for p in 0..2 * quota as u16 {
        let forged = udp(Ip::V4(SERVER), Ip::V4(TENANT), 53, 1024 + p);
        assert_eq!(f.process(T1, Direction::Ingress, &forged, 0), FWD, "{p}");
    }
    // Unreplied, opened toward T1: bounded by its inbound quota, not pinned for 120 s.
    assert!(f.conntrack().inbound_of(T1) <= f.conntrack().inbound_quota());
    assert!(f.conntrack().flows_of(T1) <= f.conntrack().inbound_quota());
    assert!(f.conntrack().iter().all(|e| !e.replied()));
    // T1's own query on a fresh port still opens.
    let add = Rule::any_port(Direction::Egress, IpVersion::V4, Protocol::Udp);
    f.apply(&VerdictRepr::add(T1, 2, 0, add), 0).unwrap();
    let q = udp(Ip::V4(TENANT), Ip::V4(SERVER), 60000, 53);
    assert_eq!(f.process(T1, Direction::Egress, &q, 0), FWD);
}
