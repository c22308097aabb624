//! Per-tenant flow quotas (issue #12): a tenant that fills its share of the conntrack table opens
//! nothing more ([`DropReason::FlowQuota`]) while other tenants keep opening flows, in the switch
//! role ([`Filter::process`]) and at the edge ([`Filter::process_edge`]); a tenant whose entries
//! close or expire gets its room back. Real frames, explicit clock.

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
    for p in 0..QUOTA as u16 {
        assert_eq!(send(&mut f, T1, 10_000 + p, 0), FWD);
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
        assert_eq!(send(&mut f, T2, 10_000 + p, 0), FWD, "T2 flow {p}");
    }
    assert_eq!(send(&mut f, T2, 30_000, 0), drop(DropReason::FlowQuota));
    assert_eq!(f.conntrack().flows_of(T2), QUOTA);
    assert!(!f.conntrack().is_full(), "the table itself had room");
    // T1's flows expire (30 s unreplied UDP): room again.
    assert_eq!(send(&mut f, T1, 20_000, 31 * SEC), FWD);
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
