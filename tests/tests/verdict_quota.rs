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

use vigil_tests::restart::{egress, Rig, OUTSIDE_IP};
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
