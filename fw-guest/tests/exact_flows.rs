//! One verdict, one flow (#11 exact ports, #12 item 1) and per-tenant verdict quotas (#12 item 3),
//! through `Filter::apply`/`apply_record` and real frames: an egress verdict opens exactly its
//! flow (protocol, both addresses, both ports); local port 0 opens nothing unless a rule says
//! "any" explicitly; one tenant at its quota leaves the others working.

mod frames;

use frames::*;
use fw_guest::filter::*;
use vigil_wire::verdict::{v4, VerdictError, RULE_FLAG_ANY_LOCAL_PORT};

use Direction::{Egress as EG, Ingress as IN};

const OUTSIDE: [u8; 4] = [10, 0, 0, 9];

fn add(f: &mut Filter, seq: &mut Seq, tenant: u32, rule: Rule, lifetime_ms: u64, now: u64) {
    f.apply(
        &VerdictRepr::add(tenant, seq.next(), lifetime_ms, rule),
        now,
    )
    .unwrap();
}

/// What an allowed connect from TENANT:`sport` to SERVER:443 opens.
fn connect_flow(sport: u16) -> Rule {
    Rule::egress_flow(
        IpVersion::V4,
        Protocol::Tcp,
        v4(TENANT),
        sport,
        v4(SERVER),
        443,
    )
}

#[test]
fn an_egress_verdict_opens_exactly_its_flow() {
    let mut f = filter_with(64, 16);
    let mut seq = Seq(0);
    add(&mut f, &mut seq, T1, connect_flow(40_000), 60_000, 0);
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    // Another process of the same tenant, same destination, its own source port: dropped.
    for sport in [40_001, 39_999, 1, 65_535] {
        assert_eq!(
            f.process(T1, EG, &tcp(a, b, sport, 443, Seg::Syn), 0),
            drop(DropReason::NoVerdict),
            "source port {sport}"
        );
    }
    // The same port to another destination port or address: dropped.
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40_000, 444, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T1, EG, &tcp(a, Ip::V4(OUTSIDE), 40_000, 443, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    // UDP to the same endpoints: another protocol, dropped.
    assert_eq!(
        f.process(T1, EG, &udp(a, b, 40_000, 443), 0),
        drop(DropReason::NoVerdict)
    );
    // Another tenant's SYN on the exact same flow: dropped.
    assert_eq!(
        f.process(T2, EG, &tcp(a, b, 40_000, 443, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(f.counters().dropped(DropReason::NoVerdict), 8);
    // The flow itself opens, and its replies pass.
    assert_eq!(f.process(T1, EG, &tcp(a, b, 40_000, 443, Seg::Syn), 0), FWD);
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40_000, Seg::SynAck), 0),
        FWD
    );
    assert_eq!(f.process(T1, EG, &tcp(a, b, 40_000, 443, Seg::Ack), 0), FWD);
    // While it is open, a crafted SYN to the same destination from another port still drops.
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40_002, 443, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    // A verdict naming the local address opens nothing from another address of the tenant.
    assert_eq!(
        f.process(
            T1,
            EG,
            &tcp(Ip::V4([10, 0, 0, 3]), b, 40_000, 443, Seg::Syn),
            0
        ),
        drop(DropReason::NoVerdict)
    );
}

#[test]
fn many_flows_to_one_destination_are_each_their_own() {
    let mut f = filter_with(256, 128);
    f.set_tenant_verdict_quota(128);
    let mut seq = Seq(0);
    for sport in 50_000..50_100u16 {
        add(&mut f, &mut seq, T1, connect_flow(sport), 60_000, 0);
    }
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    for sport in 50_000..50_100u16 {
        assert_eq!(f.process(T1, EG, &tcp(a, b, sport, 443, Seg::Syn), 0), FWD);
    }
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 50_100, 443, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
}

#[test]
fn local_port_zero_opens_nothing_unless_flagged() {
    let mut f = filter_with(64, 16);
    let mut seq = Seq(0);
    // An older producer's listen on an unbound socket: ingress, local port 0, no flag.
    let unbound = Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Tcp);
    let mut record = VerdictRepr::add(T1, seq.next(), 0, unbound).to_bytes();
    assert_eq!(record[57], 0);
    assert_eq!(
        f.apply_record(&record, 0),
        Err(ApplyError::Invalid(VerdictError::NoLocalPort))
    );
    // Even put in the table directly, port 0 without the flag matches no port.
    let (out, t) = (Ip::V4(OUTSIDE), Ip::V4(TENANT));
    for port in [7777, 7000, 1] {
        assert_eq!(
            f.process(T1, IN, &tcp(out, t, 55_000, port, Seg::Syn), 0),
            drop(DropReason::NoVerdict),
            "port {port}"
        );
        assert_eq!(
            f.process(T1, IN, &udp(out, t, 55_000, port), 0),
            drop(DropReason::NoVerdict)
        );
    }
    // Exactly the assigned port answers.
    let listen = Rule {
        local_port: 41_234,
        ..Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Tcp)
    };
    add(&mut f, &mut seq, T1, listen, 0, 0);
    assert_eq!(
        f.process(T1, IN, &tcp(out, t, 55_000, 41_234, Seg::Syn), 0),
        FWD
    );
    assert_eq!(
        f.process(T1, IN, &tcp(out, t, 55_000, 7777, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    // The explicit wildcard does open every port, under its flag.
    let every = Rule::any_port(Direction::Ingress, IpVersion::V4, Protocol::Udp);
    record = VerdictRepr::add(T1, seq.next(), 0, every).to_bytes();
    assert_eq!(record[57], RULE_FLAG_ANY_LOCAL_PORT);
    f.apply_record(&record, 0).unwrap();
    assert_eq!(f.process(T1, IN, &udp(out, t, 55_000, 7777), 0), FWD);
}

#[test]
fn one_tenant_at_its_quota_leaves_the_others_working() {
    let mut f = filter_with(256, 64);
    assert_eq!(f.verdicts().tenant_quota(), 16, "a quarter of the table");
    let mut seq = Seq(0);
    // Tenant 1 floods verdicts: the 17th and later are refused and counted.
    let mut refused = 0;
    for sport in 1_000..1_200u16 {
        let v = VerdictRepr::add(T1, seq.next(), 60_000, connect_flow(sport));
        match f.apply(&v, 0) {
            Ok(()) => {}
            Err(ApplyError::OverQuota) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(refused, 200 - 16);
    assert_eq!(f.verdicts().held_by(T1), 16);
    assert_eq!(f.counters().verdicts_over_quota, refused);
    // Tenant 2 still gets its verdicts and its flows.
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    for sport in 2_000..2_016u16 {
        add(&mut f, &mut seq, T2, connect_flow(sport), 60_000, 0);
        assert_eq!(f.process(T2, EG, &tcp(a, b, sport, 443, Seg::Syn), 0), FWD);
    }
    assert_eq!(f.verdicts().held_by(T2), 16);
    // Tenant 1's granted flows work; its refused ones do not.
    assert_eq!(f.process(T1, EG, &tcp(a, b, 1_000, 443, Seg::Syn), 0), FWD);
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 1_100, 443, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    // Expired verdicts without flows are reclaimed for their own tenant: room again.
    let later = 61 * SEC;
    add(&mut f, &mut seq, T1, connect_flow(3_000), 60_000, later);
    assert_eq!(
        f.verdicts().held_by(T1),
        2,
        "15 expired without flows reclaimed; the one with a flow stays"
    );
    // A flush gives the whole quota back.
    f.flush_tenant(T1, later);
    assert_eq!(f.verdicts().held_by(T1), 0);
}

#[test]
fn adoption_carries_the_exact_flow() {
    let mut f = filter_with(64, 16);
    let mut seq = Seq(0);
    let v = VerdictRepr::adopt(T1, seq.next(), 60_000, connect_flow(40_000));
    f.apply_record(&v.to_bytes(), 0).unwrap();
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    // Mid-stream segments of the migrated flow are adopted; another source port's are not.
    assert_eq!(f.process(T1, EG, &tcp(a, b, 40_000, 443, Seg::Ack), 0), FWD);
    assert_ne!(f.process(T1, EG, &tcp(a, b, 40_001, 443, Seg::Ack), 0), FWD);
    assert_eq!(f.counters().flows_adopted, 1);
}

/// The room the outcome log publishes is a promise: while it is at least 1, the next new verdict
/// of any tenant is applied; it reaches 0 before a refusal, never after; and each record's
/// outcome names what happened to it.
#[test]
fn published_room_never_promises_what_the_table_refuses() {
    use vigil_wire::outcome::Outcome;
    let mut f = filter_with(256, 64);
    let mut seq = Seq(0);
    let quota = f.verdicts().tenant_quota();
    assert_eq!(
        f.verdicts().room(),
        quota,
        "an empty table: the quota bounds it"
    );
    let mut outcomes = Vec::new();
    for (i, sport) in (1_000..1_040u16).enumerate() {
        let promised = f.verdicts().room();
        let record = VerdictRepr::add(T1, seq.next(), 60_000, connect_flow(sport)).to_bytes();
        let outcome = f.apply_record_outcome(&record, 0);
        if promised >= 1 {
            assert_eq!(
                outcome,
                Outcome::Added,
                "record {i}: room {promised} promised"
            );
        }
        assert!(
            f.verdicts().room() <= promised,
            "room only shrinks as verdicts are added"
        );
        outcomes.push(outcome);
    }
    let added = outcomes.iter().filter(|o| **o == Outcome::Added).count();
    assert_eq!(added, quota);
    assert!(outcomes[quota..].iter().all(|o| *o == Outcome::OverQuota));
    assert_eq!(f.verdicts().room(), 0);
    // A refresh of a held verdict is not a refusal, and takes no room.
    let again = VerdictRepr::add(T1, seq.next(), 60_000, connect_flow(1_000)).to_bytes();
    assert_eq!(f.apply_record_outcome(&again, 0), Outcome::Refreshed);
    // Another tenant's room is bounded by the fullest one: 0 here, so the VMM waits and reads
    // the outcome, which says added.
    let other = VerdictRepr::add(T2, seq.next(), 60_000, connect_flow(5_000)).to_bytes();
    assert_eq!(f.apply_record_outcome(&other, 0), Outcome::Added);
    // Not a record, a Remove of nothing: named.
    assert_eq!(f.apply_record_outcome(&[0u8; 64], 0), Outcome::Invalid);
    let mut gone = VerdictRepr::add(T2, seq.next(), 0, connect_flow(6_000));
    gone.op = Op::Remove;
    assert_eq!(
        f.apply_record_outcome(&gone.to_bytes(), 0),
        Outcome::NotFound
    );
    // A flush gives the room back.
    f.flush_tenant(T1, 0);
    assert!(f.verdicts().room() >= quota - 1);
}
