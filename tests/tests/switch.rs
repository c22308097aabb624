//! The firewall micro-VM as a switch between real TAP devices in two network namespaces: "tenant"
//! (a tenant port, tenant 7) and "outside" (the uplink). Real TCP clients and servers on both
//! sides; the micro-VM's ring-3 packet loop forwards only what a verdict opened (plus ARP), and
//! counts what it drops and why. No Linux tenant boots here (that takes minutes on this host), so
//! the tenant side is a namespace; the frames the micro-VM sees are the same.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use vigil_wire::verdict::{IpVersion, Op, Protocol, Rule, VerdictRepr};

use vigil_tests::outside::{answer_one, Request};
use vigil_tests::process::START_TIMEOUT;
use vigil_tests::{events, fw_guest_elf, Namespace, Stream, TempDir, VigilCommand, VigilProcess};

const TENANT: u32 = 7;
const TENANT_IP: &str = "10.88.0.2";
const OUTSIDE_IP: &str = "10.88.0.1";
const OPEN_PORT: u16 = 8080;
const CLOSED_PORT: u16 = 8081;

fn verdict_hex(port: u16) -> String {
    let mut remote = [0u8; 16];
    remote[..4].copy_from_slice(&OUTSIDE_IP.parse::<std::net::Ipv4Addr>().unwrap().octets());
    let rule = Rule::egress_to(IpVersion::V4, Protocol::Tcp, remote, port);
    let record = VerdictRepr {
        op: Op::Add,
        tenant: TENANT,
        seq: 1,
        lifetime_ms: 0,
        rule,
    }
    .to_bytes();
    hex::encode(record)
}

/// Starts the micro-VM and waits until its switch is up (from its console).
fn start_switch(tenant_ns: &str, outside_ns: &str, verdicts: &Path) -> VigilProcess {
    let vigil = VigilCommand::new("switch")
        .args(["run-microvm", "--elf"])
        .arg(fw_guest_elf())
        .args([
            "--net",
            &format!("tap=tt0,netns={tenant_ns},tenant={TENANT}"),
        ])
        .args(["--net", &format!("tap=to0,netns={outside_ns}")])
        .arg("--verdicts")
        .arg(verdicts)
        .args(["--timeout", "300"])
        .spawn()
        .expect("start vigil");
    vigil
        .wait_line(START_TIMEOUT, "the switch up", |line| {
            if line.stream != Stream::Stdout {
                return false;
            }
            assert!(
                !line.text.contains("vm_stopped"),
                "the micro-VM stopped: {}",
                line.text
            );
            line.text.contains("fw-guest: switch up")
        })
        .expect("the micro-VM's switch came up");
    vigil
}

#[test]
fn switch_forwards_what_a_verdict_opened_and_drops_the_rest_with_a_reason() {
    let pid = std::process::id();
    let tenant = Namespace::create(&format!("vigil-swt{pid}"), "tt0", TENANT_IP);
    let outside = Namespace::create(&format!("vigil-swo{pid}"), "to0", OUTSIDE_IP);
    let dir = TempDir::new("vigil-switch");
    let verdicts = dir.join("verdicts.txt");
    std::fs::write(&verdicts, format!("{}\n", verdict_hex(OPEN_PORT))).unwrap();

    // Servers outside on both ports: one opened by the verdict, one not.
    let open = outside.tcp_listener((OUTSIDE_IP, OPEN_PORT));
    let closed = outside.tcp_listener((OUTSIDE_IP, CLOSED_PORT));
    let server = answer_one(
        open,
        Request::FirstRead,
        b"outside-says-hi",
        Duration::from_secs(30),
    );
    let mut vigil = start_switch(&tenant.name, &outside.name, &verdicts);

    // Opened: the tenant's connect to the verdict's endpoint, both directions of the flow.
    let client = tenant.spawn(|| {
        let addr = (OUTSIDE_IP.parse::<std::net::IpAddr>().unwrap(), OPEN_PORT).into();
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(20))
            .expect("connect through the switch");
        stream.write_all(b"tenant-says-hi").unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    });
    assert_eq!(client.join().unwrap(), "outside-says-hi");
    let (peer, got) = server.join().unwrap();
    drop(closed);
    assert_eq!(peer.ip().to_string(), TENANT_IP);
    assert_eq!(got, "tenant-says-hi");

    // Not opened: the same tenant, the other port. The SYN dies in the micro-VM.
    let blocked = tenant.spawn(|| {
        let addr = (OUTSIDE_IP.parse::<std::net::IpAddr>().unwrap(), CLOSED_PORT).into();
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map(|_| ())
    });
    let err = blocked
        .join()
        .unwrap()
        .expect_err("no verdict: the connect must not succeed");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

    // Stop the micro-VM as an operator would; its counters say what happened.
    let status = vigil.terminate();
    let console: Vec<String> = vigil
        .remaining_lines()
        .filter(|l| l.stream == Stream::Stdout)
        .map(|l| l.text)
        .collect();
    let event = events::vm_stopped(console.iter().map(String::as_str))
        .next()
        .expect("vm_stopped");
    assert!(status.success(), "{event}");
    let firewall = &event["outcome"]["firewall"];
    assert_eq!(firewall["verdicts_applied"], 1, "{firewall}");
    assert!(
        firewall["flows_created"].as_u64().unwrap() >= 1,
        "{firewall}"
    );
    assert!(firewall["forwarded"].as_u64().unwrap() >= 6, "{firewall}");
    assert!(
        firewall["drops"]["no_verdict"].as_u64().unwrap_or(0) >= 1,
        "the unopened SYN was dropped for want of a verdict: {firewall}"
    );
    drop((tenant, outside));
}
