//! Verdicts that arrive: a call is never allowed in the guest while its flow is dropped on the
//! wire. A tenant fills its verdict quota in the host's switch micro-VM (the real fw-guest image,
//! its real verdict table); the next call's verdict is refused by the switch *after* the ring took
//! it, and the call is denied (its sink says `Refused("over_quota")`), a `verdict_refused` event
//! names the reason, and the flow stays closed on the wire. Another tenant on the same switch
//! still gets its verdicts.
//!
//! No Debian tenant boots (see `vigil_tests::restart`): the verdicts go through the tenant's own
//! verdict sink (`Host::grant_outcome_for_test`), exactly the path a trapped call's take, because
//! the trap path needs the tenant kernel running, which takes minutes here.

use std::net::{IpAddr, TcpStream};
use std::time::Duration;

use vigil_tests::restart::{egress, Rig, OUTSIDE_IP, TENANT_ID};
use vigil_wire::verdict::Protocol;
use vmm_core::introspect::Delivery;
use vmm_host::VmSpec;

const ECHO: u16 = 7100;
const LIMIT: Duration = Duration::from_secs(30);
/// More calls than any tenant's verdict quota (a quarter of the switch's 4,096 verdicts).
const MANY: u16 = 4096;

#[test]
fn a_tenant_at_its_verdict_quota_is_denied_and_told_why_and_others_go_on() {
    let rig = Rig::start_with_ports("q", 2);
    let echo = rig.outside.tcp_listener((OUTSIDE_IP, ECHO));
    std::thread::spawn(move || {
        // Accepts whatever reaches it (nothing should).
        while echo.accept().is_ok() {}
    });

    // Allowed calls, each with its own verdict (UDP flows to distinct ports), until the switch
    // refuses one.
    let mut granted = 0u32;
    let refusal = loop {
        assert!(granted < u32::from(MANY), "no quota after {MANY} verdicts");
        match rig
            .host
            .grant_outcome_for_test("t1", &[egress(Protocol::Udp, 20_000 + granted as u16)])
            .unwrap()
        {
            Delivery::Taken => granted += 1,
            other => break other,
        }
    };
    eprintln!("t1: {granted} verdicts granted, then {refusal:?}");
    assert_eq!(refusal, Delivery::Refused("over_quota"));
    assert!(granted >= 16, "a quota, not a broken switch: {granted}");
    let event = rig
        .wait_event("verdict_refused", LIMIT)
        .expect("a verdict_refused event");
    assert_eq!(event["reason"], "over_quota", "{event}");
    assert_eq!(event["tier"], "switch", "{event}");
    let t1 = vmm_core::introspect::tenant_id("t1");
    assert_eq!(event["tenant"], t1, "{event}");

    // The call that opens the echo port is refused too, and its flow is closed on the wire:
    // the switch never held that verdict.
    assert_eq!(
        rig.host
            .grant_outcome_for_test("t1", &[egress(Protocol::Tcp, ECHO)])
            .unwrap(),
        Delivery::Refused("over_quota")
    );
    let no_verdict = |rig: &Rig| {
        rig.host
            .switch_counters()
            .and_then(|c| c.drops.get("no_verdict").copied())
            .unwrap_or(0)
    };
    let before = no_verdict(&rig);
    let connected = rig
        .tenant
        .spawn(|| {
            let addr = (OUTSIDE_IP.parse::<IpAddr>().unwrap(), ECHO).into();
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
        .join()
        .unwrap();
    assert!(
        connected.is_err(),
        "a flow whose verdict was refused is open"
    );
    assert!(
        no_verdict(&rig) > before,
        "the switch dropped the SYN for want of a verdict"
    );
    let status = rig.host.switch_status();
    assert!(status.refused_calls >= 2, "{status:?}");
    assert!(
        status.verdicts <= granted as usize,
        "the book holds no refused verdict: {status:?}"
    );
    let counters = rig.host.switch_counters().expect("counters");
    assert!(counters.verdicts_rejected >= 2, "{counters:?}");

    // Another tenant on the same switch is not held back by t1's quota.
    let spec: VmSpec = serde_json::from_value(vigil_tests::workload::vm_spec(
        &vigil_tests::tenant_dir(),
        "t2",
        "10.89.0.3",
        "52:54:00:89:00:03",
        &vigil_tests::workload::idle_policy(),
    ))
    .unwrap();
    rig.host.create(spec).expect("create t2");
    for port in 0..64 {
        assert_eq!(
            rig.host
                .grant_outcome_for_test("t2", &[egress(Protocol::Udp, 30_000 + port)])
                .unwrap(),
            Delivery::Taken,
            "t2's verdict {port}"
        );
    }

    // A tenant whose verdicts are flushed (its policy replaced) has its quota back.
    let policy = vigil_tests::workload::idle_policy();
    rig.host
        .replace_policy("t1", serde_json::from_value(policy).unwrap())
        .expect("replace t1's policy");
    assert_eq!(
        rig.host
            .grant_outcome_for_test("t1", &[egress(Protocol::Tcp, ECHO)])
            .unwrap(),
        Delivery::Taken
    );
}

/// The edge's tables refuse a verdict the switch took (here: the edge's stand-in, which refuses
/// what the test says, as a full shared table would; the real edge's reports are checked in
/// `edge_trust.rs`). While the edge's room does not cover a call, the call waits for the edge's
/// ack: refused there, it is denied, the switch's copy is taken back, and the flow is closed on
/// the wire. While the room covers it, the call goes on at once; a refusal then still reaches
/// the host, which takes the verdict back at the switch (`verdict_revoked`), so the tiers agree.
#[test]
fn a_verdict_the_edge_refuses_is_denied_or_taken_back_at_the_switch() {
    use vigil_tests::edge_standin::EdgeStandIn;
    use vigil_wire::outcome::Outcome;
    const REFUSED: u16 = 7101;
    const REFUSED_LATER: u16 = 7102;
    let key = vec![0x6c; 32];
    let edge = EdgeStandIn::bind(&key);
    edge.set_room(0);
    edge.refuse(Box::new(|v| {
        [REFUSED, REFUSED_LATER]
            .contains(&v.rule.remote_port_min)
            .then_some(Outcome::TableFull as u8)
    }));
    let rig = Rig::start_with_edge(
        "qe",
        1,
        Some(vmm_host::EdgeLinkConfig {
            control: edge.addr(),
            key,
            key_id: 0,
            sender: 31,
        }),
    );
    let echo = rig.outside.tcp_listener((OUTSIDE_IP, REFUSED));
    let echo_later = rig.outside.tcp_listener((OUTSIDE_IP, REFUSED_LATER));
    let control = rig.outside.tcp_listener((OUTSIDE_IP, ECHO));
    for listener in [echo, echo_later, control] {
        std::thread::spawn(move || while listener.accept().is_ok() {});
    }
    let no_verdict = |rig: &Rig| {
        rig.host
            .switch_counters()
            .and_then(|c| c.drops.get("no_verdict").copied())
            .unwrap_or(0)
    };
    let connect = |rig: &Rig, port: u16| {
        rig.tenant
            .spawn(move || {
                let addr = (OUTSIDE_IP.parse::<IpAddr>().unwrap(), port).into();
                TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(|_| ())
            })
            .join()
            .unwrap()
    };

    // Control: room 0, the edge takes it: the call waits for the ack and goes on; the flow opens.
    assert_eq!(
        rig.host
            .grant_outcome_for_test(TENANT_ID, &[egress(Protocol::Tcp, ECHO)])
            .unwrap(),
        Delivery::Taken
    );
    connect(&rig, ECHO).expect("the control flow opens through the switch");

    // Room 0, the edge refuses: the call is denied with the edge's reason, and the switch
    // holds nothing of it.
    let held = rig.host.switch_status().verdicts;
    assert_eq!(
        rig.host
            .grant_outcome_for_test(TENANT_ID, &[egress(Protocol::Tcp, REFUSED)])
            .unwrap(),
        Delivery::Refused("edge_table_full")
    );
    let event = rig
        .wait_event("verdict_refused", LIMIT)
        .expect("a verdict_refused event");
    assert_eq!(event["tier"], "edge", "{event}");
    assert_eq!(event["reason"], "edge_table_full", "{event}");
    assert_eq!(
        rig.host.switch_status().verdicts,
        held,
        "the book took it back"
    );
    let before = no_verdict(&rig);
    assert!(
        connect(&rig, REFUSED).is_err(),
        "a refused call's flow is open"
    );
    assert!(no_verdict(&rig) > before, "the switch dropped its SYN");

    // Room 1,024: the call is certain and goes on at once; the edge refuses it all the same (a
    // table other hosts filled). The host hears it from the ack and closes the switch too.
    edge.set_room(1024);
    assert_eq!(
        rig.host
            .grant_outcome_for_test(TENANT_ID, &[egress(Protocol::Udp, 7200)])
            .unwrap(),
        Delivery::Taken,
        "an ack with the room arrives"
    );
    assert_eq!(
        rig.host
            .grant_outcome_for_test(TENANT_ID, &[egress(Protocol::Tcp, REFUSED_LATER)])
            .unwrap(),
        Delivery::Taken,
        "certain by the room: no wait"
    );
    let event = rig
        .wait_event("verdict_revoked", LIMIT)
        .expect("a verdict_revoked event");
    assert_eq!(event["tier"], "edge", "{event}");
    assert_eq!(event["reason"], "edge_table_full", "{event}");
    // Counted once: the edge also refused the take-back (`Remove`) of the first refused call,
    // which revoked nothing.
    assert_eq!(
        rig.host.edge_link_stats().map(|s| s.revoked_records),
        Some(1),
        "vigil_edge_revoked_records_total counts the verdict taken back, and only it"
    );
    let before = no_verdict(&rig);
    assert!(
        connect(&rig, REFUSED_LATER).is_err(),
        "a verdict the edge refused stays open at the switch"
    );
    assert!(no_verdict(&rig) > before, "the switch dropped its SYN");
    // What the edge took, it holds; it never held the refused ones.
    let at_edge = edge.wait_records(LIMIT, |r| r.iter().any(|v| v.rule.remote_port_min == 7200));
    assert!(at_edge.iter().all(
        |v| ![REFUSED, REFUSED_LATER].contains(&v.rule.remote_port_min)
            || v.op == vigil_wire::verdict::Op::Remove
    ));
}
