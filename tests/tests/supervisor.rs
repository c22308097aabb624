//! The switch supervisor: the host's switch micro-VM is killed (fault injection: its vCPU stops
//! as on a crash) while a tenant holds an established TCP connection and sends a stream of UDP
//! datagrams, some opened by a verdict and some not. A new switch boots and is given every
//! attachment and verdict before its ports open: the TCP connection goes on, the opened stream
//! flows again, not one datagram without a verdict ever reaches the outside. Then a real guest
//! fault (the switch's RAM zeroed under it: it resets) restarts it the same way, and a crash loop
//! ends with the tier closed (no verdict taken, nothing forwarded) and reported.
//!
//! No Debian tenant boots (see `vigil_tests::restart`): the tenant is a network namespace behind
//! the tenant's switch port, and its verdicts go through the tenant's own verdict sink.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vigil_tests::restart::{egress, Rig, OUTSIDE_IP};
use vigil_wire::verdict::Protocol;

const ECHO: u16 = 7000;
const OPENED_UDP: u16 = 7001;
const CLOSED_UDP: u16 = 7002;
const LATER: u16 = 7003;
const LIMIT: Duration = Duration::from_secs(30);

fn echo_line(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>, text: &str) -> String {
    stream.write_all(format!("{text}\n").as_bytes()).unwrap();
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map(|_| line)
        .unwrap_or_default()
}

/// Receives datagrams on `socket` until one whose first 8 bytes (a sequence number) are at
/// least `at_least`; returns it, or None after `LIMIT`.
fn wait_seq(socket: &UdpSocket, at_least: u64) -> Option<u64> {
    socket.set_read_timeout(Some(LIMIT)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        let n = socket.recv(&mut buf).ok()?;
        if n >= 8 {
            let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
            if seq >= at_least {
                return Some(seq);
            }
        }
    }
}

#[test]
fn a_killed_switch_restarts_with_every_verdict_and_flow_and_leaks_nothing() {
    let rig = Rig::start("s");
    let outside = &rig.outside;
    let echo = outside.tcp_listener((OUTSIDE_IP, ECHO));
    let later = outside.tcp_listener((OUTSIDE_IP, LATER));
    let opened = outside.udp_socket((OUTSIDE_IP, OPENED_UDP));
    let closed = outside.udp_socket((OUTSIDE_IP, CLOSED_UDP));
    std::thread::spawn(move || {
        let (stream, _) = echo.accept().unwrap();
        let mut out = stream.try_clone().unwrap();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if out.write_all(format!("{line}\n").as_bytes()).is_err() {
                break;
            }
        }
    });
    assert!(rig
        .host
        .grant_for_test(
            "t1",
            &[
                egress(Protocol::Tcp, ECHO),
                egress(Protocol::Udp, OPENED_UDP)
            ]
        )
        .unwrap());

    // An established connection through the first switch.
    let mut stream = rig
        .tenant
        .spawn(|| {
            let addr = (OUTSIDE_IP.parse::<std::net::IpAddr>().unwrap(), ECHO).into();
            TcpStream::connect_timeout(&addr, LIMIT)
        })
        .join()
        .unwrap()
        .expect("connect through the switch");
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    assert_eq!(echo_line(&mut stream, &mut reader, "before"), "before\n");

    // The tenant sends all along: a numbered stream to the opened port, and to the closed one.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        rig.tenant.spawn(move || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let _ = socket.send_to(&seq.to_le_bytes(), (OUTSIDE_IP, CLOSED_UDP));
                let _ = socket.send_to(&seq.to_le_bytes(), (OUTSIDE_IP, OPENED_UDP));
                sent.store(seq, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(500));
            }
            // Last, a marker on the opened port: once it is out, so is everything before it.
            let _ = socket.send_to(&u64::MAX.to_le_bytes(), (OUTSIDE_IP, OPENED_UDP));
        })
    };
    assert!(wait_seq(&opened, 1).is_some(), "the opened stream flows");

    rig.host.kill_switch();
    let stopped = rig
        .wait_event("switch_stopped", LIMIT)
        .expect("switch_stopped");
    assert_eq!(stopped["generation"], 1, "{stopped}");
    let restored = rig
        .wait_event("switch_restored", LIMIT)
        .expect("switch_restored");
    let after_restore = sent.load(Ordering::Relaxed) + 1;
    assert_eq!(restored["attachments"], 1, "{restored}");
    assert_eq!(restored["verdicts"], 2, "{restored}");
    assert_eq!(restored["generation"], 2, "{restored}");
    let status = rig.host.switch_status();
    assert!(status.open && status.restarts == 1, "{status:?}");

    // The established flow goes on through the new switch (adopted mid-stream), the opened
    // stream flows again, and a verdict granted now opens a new flow.
    assert_eq!(echo_line(&mut stream, &mut reader, "after"), "after\n");
    assert!(
        wait_seq(&opened, after_restore).is_some(),
        "the opened stream flows after the restart"
    );
    assert!(rig
        .host
        .grant_for_test("t1", &[egress(Protocol::Tcp, LATER)])
        .unwrap());
    rig.tenant
        .spawn(|| {
            let addr = (OUTSIDE_IP.parse::<std::net::IpAddr>().unwrap(), LATER).into();
            TcpStream::connect_timeout(&addr, LIMIT)
        })
        .join()
        .unwrap()
        .expect("a new flow after the restart");
    drop(later);
    let counters = rig
        .host
        .switch_counters()
        .expect("the new switch's counters");
    assert!(counters.flows_adopted >= 1, "{counters:?}");

    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    assert!(wait_seq(&opened, u64::MAX).is_some(), "the last marker");
    closed.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        closed.recv(&mut buf).is_err(),
        "a datagram with no verdict passed (of {} sent, before, during and after the restart)",
        sent.load(Ordering::Relaxed)
    );

    // A guest fault, not a stop request: the switch's RAM is zeroed under it.
    assert!(rig.host.crash_switch());
    let stopped = rig
        .wait_event("switch_stopped", LIMIT)
        .expect("switch_stopped");
    assert!(
        !stopped["reason"]
            .as_str()
            .unwrap_or("")
            .contains("Requested"),
        "{stopped}"
    );
    eprintln!("the faulted switch: {stopped}");
    let restored = rig
        .wait_event("switch_restored", LIMIT)
        .expect("switch_restored after a guest fault");
    assert_eq!(restored["verdicts"], 3, "{restored}");
    assert_eq!(echo_line(&mut stream, &mut reader, "faulted"), "faulted\n");

    // A crash loop: restarts back off, and after the bound the tier stays closed.
    for generation in 4..=6 {
        rig.host.kill_switch();
        let restored = rig
            .wait_event("switch_restored", LIMIT)
            .expect("switch_restored");
        assert_eq!(restored["generation"], generation, "{restored}");
    }
    rig.host.kill_switch();
    let failed = rig
        .wait_event("switch_failed", LIMIT)
        .expect("switch_failed");
    assert_eq!(failed["restarts"], 5, "{failed}");
    assert!(!rig.host.switch_status().open);
    assert!(rig.host.switch_counters().is_none());
    assert!(
        !rig.host
            .grant_for_test("t1", &[egress(Protocol::Tcp, 7004)])
            .unwrap(),
        "a closed tier takes no verdict (the call would be denied)"
    );
    // Nothing is forwarded: the established connection gets no answer (bounded wait: there is
    // no event for a frame that never comes).
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    stream.write_all(b"closed\n").unwrap();
    let mut line = String::new();
    assert!(
        reader.read_line(&mut line).is_err(),
        "a closed tier forwarded: {line:?}"
    );
}

/// The edge restarting: it lost every table; the host re-sends each tenant's address and
/// verdicts from its book. The edge's end here is the channel's own receiver (the one `vigil
/// edge` runs), bound afresh on the same port as a restarted edge would be: a new boot id, so the
/// host's link starts a new run (and its restart hook resyncs by itself as well).
#[test]
fn a_restarted_edge_gets_every_address_and_verdict_again() {
    use vigil_wire::verdict::Op;
    let key = vec![0x5a; 32];
    let receiver = vigil_tests::edge_standin::EdgeStandIn::bind(&key);
    let control = receiver.addr();
    let dir = vigil_tests::TempDir::new("vigil-resync");
    vmm_core::events::bus().set_quiet(true);
    let host = vmm_host::Host::start(vmm_host::HostConfig {
        name: "resync".into(),
        switch_elf: vigil_tests::fw_guest_elf(),
        uplink: "vxlan=127.0.0.1:9,local=127.0.0.1:0".parse().unwrap(),
        tenant_ports: 1,
        edge: Some(vmm_host::EdgeLinkConfig {
            control,
            key: key.clone(),
            key_id: 0,
            sender: 9,
        }),
        state_dir: dir.join("state"),
        console_stdout: false,
        debug: vmm_core::knobs::DebugKnobs::default(),
        migration_keys: Default::default(),
    })
    .expect("host");
    let spec: vmm_host::VmSpec = serde_json::from_value(vigil_tests::workload::vm_spec(
        &vigil_tests::tenant_dir(),
        "e1",
        "10.92.0.2",
        "52:54:00:92:00:02",
        &vigil_tests::workload::idle_policy(),
    ))
    .unwrap();
    let tenant = host.create(spec).expect("create").tenant;
    let rules = [
        egress(Protocol::Tcp, ECHO),
        egress(Protocol::Udp, OPENED_UDP),
    ];
    assert!(host.grant_for_test("e1", &rules).unwrap());
    let first = receiver.wait_records(LIMIT, |r| r.len() >= 3);
    assert_eq!(first.len(), 3, "{first:?}");

    // The edge restarts: same address, nothing remembered.
    drop(receiver);
    let restarted = vigil_tests::edge_standin::EdgeStandIn::bind_at(control, &key);
    assert_eq!(host.resync_edge(), 3);
    let again = restarted.wait_records(LIMIT, |r| r.len() >= 3);
    // The link's restart hook resyncs by itself too once the new edge's ack names its boot id:
    // the same three records may come twice (applying them again changes nothing).
    assert!(again.len() == 3 || again.len() == 6, "{again:?}");
    let shape = |v: &vigil_wire::verdict::VerdictRepr| (v.op, v.tenant, v.rule);
    assert!(
        again[3..]
            .iter()
            .map(shape)
            .eq(again[..again.len() - 3].iter().map(shape)),
        "{again:?}"
    );
    assert_eq!((again[0].op, again[0].tenant), (Op::Attach, tenant));
    assert_eq!(&again[0].rule.local_addr[..4], &[10, 92, 0, 2]);
    for (v, rule) in again[1..].iter().zip(rules) {
        assert_eq!((v.op, v.tenant, v.rule), (Op::Adopt, tenant, rule));
    }
    host.shutdown();
}
