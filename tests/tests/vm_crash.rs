//! A tenant VM that stops on its own is closed on both tiers at once, before anyone deletes it:
//! its switch port forwards nothing more, its verdicts and flows are gone from the switch, and
//! the edge is told to flush it (fail closed), with a `vm_stopped` event that says so.
//!
//! The crash is real: the tenant's VM boots and its vCPU thread panics on its first exit (a
//! failpoint, `VIGIL_FAILPOINTS`, vmm/core/src/failpoints.rs: the only thing made up). The
//! traffic is the restart rig's (`vigil_tests::restart`): the tenant's switch port is bridged to
//! a network namespace whose Linux stack keeps sending after the VM died, which is what a port
//! whose VM is gone must not forward. No Debian tenant boots far (its first exit panics).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::Once;
use std::time::{Duration, Instant};

use vigil_tests::restart::{egress, Rig, OUTSIDE_IP, TENANT_ID};
use vigil_wire::verdict::{Op, Protocol};
use vmm_core::verdict_region::FirewallCounters;
use vmm_host::VmState;

const ECHO: u16 = 7100;
const OPENED_UDP: u16 = 7101;
const LIMIT: Duration = Duration::from_secs(30);

/// Arms the failpoints of this file's VMs (read once, when the process first reaches one).
fn arm_failpoints() {
    static ARMED: Once = Once::new();
    ARMED.call_once(|| {
        std::env::set_var(
            "VIGIL_FAILPOINTS",
            format!("vcpu.exit@{TENANT_ID}-vcpu=panic;vcpu.exit@e1-vcpu=panic"),
        );
    });
}

/// The switch's counters once `ready` holds for them (the micro-VM publishes them from its
/// packet loop, moments after it applied a record or judged a frame), or after `LIMIT`.
fn counters_when(rig: &Rig, ready: impl Fn(&FirewallCounters) -> bool) -> FirewallCounters {
    let deadline = Instant::now() + LIMIT;
    loop {
        let counters = rig.host.switch_counters().expect("the switch's counters");
        if ready(&counters) || Instant::now() >= deadline {
            return counters;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VM's state once its thread has returned (moments after its `vm_stopped` event, which the
/// thread sends just before).
fn state_after_stop(host: &vmm_host::Host, id: &str) -> VmState {
    let deadline = Instant::now() + LIMIT;
    loop {
        let state = host.info(id).unwrap().state;
        if state != VmState::Running || Instant::now() >= deadline {
            return state;
        }
        std::thread::yield_now();
    }
}

#[test]
fn a_crashed_vm_is_flushed_from_the_switch_at_once() {
    arm_failpoints();
    let rig = Rig::start("c");
    let echo = rig.outside.tcp_listener((OUTSIDE_IP, ECHO));
    let opened = rig.outside.udp_socket((OUTSIDE_IP, OPENED_UDP));
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
            TENANT_ID,
            &[
                egress(Protocol::Tcp, ECHO),
                egress(Protocol::Udp, OPENED_UDP)
            ]
        )
        .unwrap());

    // Open for business: an echoed line and a datagram, through the switch.
    let mut stream = rig
        .tenant
        .spawn(|| {
            let addr = (OUTSIDE_IP.parse::<IpAddr>().unwrap(), ECHO).into();
            TcpStream::connect_timeout(&addr, LIMIT)
        })
        .join()
        .unwrap()
        .expect("connect through the switch");
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    stream.write_all(b"before\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "before\n");
    let sender = rig
        .tenant
        .spawn(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .join()
        .unwrap()
        .unwrap();
    sender.send_to(b"before", (OUTSIDE_IP, OPENED_UDP)).unwrap();
    opened.set_read_timeout(Some(LIMIT)).unwrap();
    let mut buf = [0u8; 64];
    let n = opened.recv(&mut buf).expect("the opened datagram");
    assert_eq!(&buf[..n], b"before");
    let status = rig.host.switch_status();
    assert_eq!((status.attachments, status.verdicts), (1, 2), "{status:?}");
    let revoked_before = rig.host.switch_counters().unwrap().flows_revoked;

    // The VM boots and its vCPU panics: nobody deletes it.
    rig.host.boot(TENANT_ID).expect("vm.boot");
    let stopped = rig
        .wait_event("vm_stopped", LIMIT)
        .expect("the crashed VM's vm_stopped event");
    eprintln!("{stopped}");
    assert_eq!(stopped["vm"], TENANT_ID, "{stopped}");
    assert_eq!(stopped["crashed"], true, "{stopped}");
    assert_eq!(stopped["flushed"], true, "{stopped}");
    assert!(
        stopped["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("failpoint vcpu.exit"),
        "{stopped}"
    );
    // The switch holds nothing of it (the port stays reserved to it until vm.delete), and
    // closed both of its flows.
    let status = rig.host.switch_status();
    assert_eq!(
        (status.attachments, status.verdicts, status.ports_held),
        (0, 0, 1),
        "{status:?}"
    );
    let counters = counters_when(&rig, |c| c.flows_revoked >= revoked_before + 2);
    assert!(
        counters.flows_revoked >= revoked_before + 2,
        "the TCP and UDP flows are revoked: {counters:?}"
    );

    // The tenant's side goes on sending; the switch forwards nothing from its port any more.
    // Wait until the port has received both frames, then nothing has come out.
    let port = rig.host.info(TENANT_ID).unwrap().switch_port;
    let before = counters.ports[port];
    stream.write_all(b"after\n").unwrap();
    sender.send_to(b"after", (OUTSIDE_IP, OPENED_UDP)).unwrap();
    let counters = counters_when(&rig, |c| c.ports[port].rx_frames >= before.rx_frames + 2);
    let after = counters.ports[port];
    assert!(
        after.rx_frames >= before.rx_frames + 2,
        "the frames reached the switch: {counters:?}"
    );
    assert_eq!(
        after.forwarded, before.forwarded,
        "the dead VM's port forwarded: {counters:?}"
    );
    opened.set_nonblocking(true).unwrap();
    assert!(
        opened.recv(&mut buf).is_err(),
        "a datagram from the dead VM's port passed"
    );
    stream.set_nonblocking(true).unwrap();
    let mut rest = [0u8; 64];
    assert!(
        matches!(std::io::Read::read(&mut stream, &mut rest), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the echo server answered through a flushed switch"
    );

    // vm.info says how it stopped; a policy change does not reopen its port; vm.delete frees
    // the port.
    assert_eq!(state_after_stop(&rig.host, TENANT_ID), VmState::Shutdown);
    assert!(rig.host.policy(TENANT_ID).is_ok());
    rig.host
        .replace_policy(TENANT_ID, rig.host.policy(TENANT_ID).unwrap())
        .unwrap();
    assert_eq!(rig.host.switch_status().attachments, 0);
    rig.host.delete(TENANT_ID).expect("vm.delete");
    assert_eq!(rig.host.switch_status().ports_held, 0);
}

/// The edge hears of it too: a `FlushTenant` for the crashed tenant, without a `vm.delete`.
#[test]
fn a_crashed_vm_is_flushed_from_the_edge_at_once() {
    arm_failpoints();
    let key = vec![0x5b; 32];
    let edge = vigil_tests::edge_standin::EdgeStandIn::bind(&key);
    let control = edge.addr();
    let dir = vigil_tests::TempDir::new("vigil-crash-edge");
    vmm_core::events::bus().set_quiet(true);
    let host = vmm_host::Host::start(vmm_host::HostConfig {
        name: "crash-edge".into(),
        switch_elf: vigil_tests::fw_guest_elf(),
        uplink: "vxlan=127.0.0.1:9,local=127.0.0.1:0".parse().unwrap(),
        tenant_ports: 1,
        edge: Some(vmm_host::EdgeLinkConfig {
            control,
            key,
            key_id: 0,
            sender: 11,
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
        "10.93.0.2",
        "52:54:00:93:00:02",
        &vigil_tests::workload::idle_policy(),
    ))
    .unwrap();
    let tenant = host.create(spec).expect("create").tenant;
    assert!(host
        .grant_for_test("e1", &[egress(Protocol::Tcp, ECHO)])
        .unwrap());
    host.boot("e1").expect("vm.boot");
    // Attach, the verdict, then the flush: nothing else of this tenant comes.
    let ops: Vec<Op> = edge
        .wait_records(LIMIT, |r| r.iter().any(|v| v.op == Op::FlushTenant))
        .iter()
        .filter(|v| v.tenant == tenant)
        .map(|v| v.op)
        .collect();
    assert_eq!(ops, [Op::Attach, Op::Add, Op::FlushTenant]);
    assert_eq!(state_after_stop(&host, "e1"), VmState::Shutdown);
    host.shutdown();
}
