//! The firewall micro-VM as a switch between real TAP devices in two network namespaces: "tenant"
//! (a tenant port, tenant 7) and "outside" (the uplink). Real TCP clients and servers on both
//! sides; the micro-VM's ring-3 packet loop forwards only what a verdict opened (plus ARP), and
//! counts what it drops and why. No Linux tenant boots here (that takes minutes on this host), so
//! the tenant side is a namespace; the frames the micro-VM sees are the same.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use vigil_wire::verdict::{IpVersion, Op, Protocol, Rule, VerdictRepr};

use vigil_tests::{fw_guest_elf, Namespace};

const TENANT: u32 = 7;
const TENANT_IP: &str = "10.88.0.2";
const OUTSIDE_IP: &str = "10.88.0.1";
const OPEN_PORT: u16 = 8080;
const CLOSED_PORT: u16 = 8081;

fn verdict_hex(port: u16) -> String {
    let mut remote = [0u8; 16];
    remote[..4].copy_from_slice(&OUTSIDE_IP.parse::<std::net::Ipv4Addr>().unwrap().octets());
    let rule = Rule::egress_to(IpVersion::V4, Protocol::Tcp, remote, port);
    VerdictRepr {
        op: Op::Add,
        tenant: TENANT,
        seq: 1,
        lifetime_ms: 0,
        rule,
    }
    .to_bytes()
    .iter()
    .map(|b| format!("{b:02x}"))
    .collect()
}

/// Starts the micro-VM and waits until its switch is up (from its console).
fn start_switch(
    tenant_ns: &str,
    outside_ns: &str,
    verdicts: &PathBuf,
) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(vigil_tests::vigil_bin())
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
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start vigil");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the micro-VM's switch came up");
        assert!(!line.contains("vm_stopped"), "the micro-VM stopped: {line}");
        if line.contains("fw-guest: switch up") {
            break;
        }
    }
    (child, rx)
}

#[test]
fn switch_forwards_what_a_verdict_opened_and_drops_the_rest_with_a_reason() {
    let pid = std::process::id();
    let tenant = Namespace::create(&format!("vigil-swt{pid}"), "tt0", TENANT_IP);
    let outside = Namespace::create(&format!("vigil-swo{pid}"), "to0", OUTSIDE_IP);
    let dir = std::env::temp_dir().join(format!("vigil-switch-{pid}"));
    std::fs::create_dir_all(&dir).unwrap();
    let verdicts = dir.join("verdicts.txt");
    std::fs::write(&verdicts, format!("{}\n", verdict_hex(OPEN_PORT))).unwrap();

    // Servers outside on both ports: one opened by the verdict, one not.
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = outside.spawn(move || {
        let open = TcpListener::bind((OUTSIDE_IP, OPEN_PORT)).expect("bind open port");
        let _closed = TcpListener::bind((OUTSIDE_IP, CLOSED_PORT)).expect("bind closed port");
        ready_tx.send(()).unwrap();
        let (mut stream, peer) = open.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = [0u8; 16];
        let n = stream.read(&mut got).expect("read");
        stream.write_all(b"outside-says-hi").expect("write");
        (peer, String::from_utf8_lossy(&got[..n]).to_string())
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let (mut vigil, console) = start_switch(&tenant.name, &outside.name, &verdicts);

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
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(vigil.id() as i32, libc::SIGTERM) };
    let status = vigil.wait().unwrap();
    let stopped = console
        .iter()
        .find(|l| l.contains("\"vm_stopped\""))
        .expect("vm_stopped");
    std::fs::remove_dir_all(&dir).ok();
    assert!(status.success(), "{stopped}");
    let event: serde_json::Value = serde_json::from_str(&stopped).unwrap();
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
