//! What the edge trusts on each side, end to end: a real `vigil edge` (the fw-guest micro-VM in
//! the edge role) between an outside network namespace (a TAP, real Linux behind it) and an
//! underlay namespace where the test plays two hosts, as `edge_loss.rs` does: each host is its
//! verdict link (`edge::link::VerdictLink`, the host VMM's own) and its switch uplink (Vigil's
//! own VXLAN endpoint), sending from its own underlay address (192.0.2.10 and .11 on the
//! namespace's loopback). A real `vigil host` (its switch micro-VM, its VXLAN uplink to this
//! edge) joins at the end. No tenant boots.
//!
//! Checked, each against a control that shows the path works:
//! - the underlay's addresses are attached by the edge itself, from what it learns: its own
//!   (192.0.2.1, an address of its namespace) and each host's once it authenticated. A SYN from
//!   the outside with such a source, to a tenant port a verdict opened, is dropped as
//!   `spoofed_source`; the same SYN from an outside address reaches the tenant's host;
//! - a VXLAN frame from host A carrying a source address host B attached (or B's underlay
//!   address) is dropped before the firewall (`foreign_source_frames`); the same frame from B
//!   opens its flow;
//! - host B attaching an address host A attached, or naming A's tenant, is refused
//!   (`collision`, `other_hosts_tenant`) and A's tenant keeps working; a claim B waits for is
//!   answered refused (`Outcome::Collision`) in the edge's ack; after A releases the
//!   tenant (as a migration's source does), B's attach takes it over with its verdicts, and from
//!   then on only B speaks for it;
//! - a forged VXLAN datagram to a real host's uplink from an underlay address that is not its
//!   edge's is refused (`vigil_uplink_refused_total`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edge::link::{Class, LinkConfig, VerdictLink};
use serde_json::Value;
use vigil_wire::verdict::{v4, Direction, IpVersion, Protocol, Rule, VerdictRepr, RECORD_LEN};
use vmm_core::devices::virtio::net::FrameLink;
use vmm_core::devices::vxlan::Vxlan;

use vigil_tests::rest::{self, edge_counters as counters, wait_edge_counters as wait_counters};
use vigil_tests::segment::{wait_segment, Segment, TCP_SYN};
use vigil_tests::{drop_count as drops, fw_guest_elf, Namespace, TempDir, VigilCommand};

const TAP: &str = "vg-etrust0";
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 69, 0, 1);
/// Host A's tenant, then B's.
const TA_IP: Ipv4Addr = Ipv4Addr::new(10, 69, 0, 2);
const TB_IP: Ipv4Addr = Ipv4Addr::new(10, 69, 0, 3);
const TA_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0x69, 2];
const TB_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0x69, 3];
const TA: u32 = 21;
const TB: u32 = 22;
/// A tenant of B's that tries A's address.
const TB2: u32 = 23;
/// The edge's own underlay address, and the two hosts'.
const EDGE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const HOST_A_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const HOST_B_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const PORT: u16 = 8080;
const LISTEN: u16 = 7000;
const VNI: u32 = 44;
const CONTROL_PORT: u16 = 4790;
const CLOUD_PORT: u16 = 4789;
const KEY_HEX: &str = "6e3c1a9e5b2d4c6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5";
const LIMIT: Duration = Duration::from_secs(10);

fn foreign(c: &Value) -> u64 {
    c["underlay"]["foreign_source_frames"].as_u64().unwrap_or(0)
}

fn refused(c: &Value, reason: &str) -> u64 {
    c["ownership"]["refused_records"][reason]
        .as_u64()
        .unwrap_or(0)
}

fn flows_created(c: &Value) -> u64 {
    c["firewall"]["flows_created"].as_u64().unwrap_or(0)
}

struct Host {
    link: VerdictLink,
    uplink: Vxlan,
    seq: u64,
}

impl Host {
    fn new(underlay: &Namespace, id: u32, ip: Ipv4Addr) -> Host {
        let key = edge::channel::key_from_hex(KEY_HEX).unwrap();
        let (link, uplink) = underlay
            .spawn(move || {
                let cloud = SocketAddr::from((EDGE_IP, CLOUD_PORT));
                let control = SocketAddr::from((EDGE_IP, CONTROL_PORT));
                let config = LinkConfig {
                    local: Some(IpAddr::V4(ip)),
                    ..LinkConfig::default()
                };
                let link = VerdictLink::connect(control, key, id, 1, config).expect("verdict link");
                let uplink =
                    Vxlan::bind((ip, 0).into(), vec![cloud], VNI).expect("the host's uplink");
                (link, uplink)
            })
            .join()
            .unwrap();
        Host {
            link,
            uplink,
            seq: 0,
        }
    }

    fn seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Sends `records` and waits until the edge acknowledged them.
    fn send(&mut self, records: &[VerdictRepr]) {
        let bytes: Vec<[u8; RECORD_LEN]> = records.iter().map(|r| r.to_bytes()).collect();
        let t = self.link.send(&bytes, Class::Control).unwrap();
        assert!(
            self.link.wait_acked(t.last_ticket, LIMIT),
            "the edge did not acknowledge {records:?}"
        );
    }

    fn attach(&mut self, tenant: u32, ip: Ipv4Addr) -> VerdictRepr {
        let seq = self.seq();
        VerdictRepr::attach(tenant, seq, None, Some((IpVersion::V4, v4(ip.octets()))))
    }

    fn egress(&mut self, tenant: u32) -> VerdictRepr {
        let seq = self.seq();
        let rule = Rule::egress_to(IpVersion::V4, Protocol::Tcp, v4(OUTSIDE_IP.octets()), PORT);
        VerdictRepr::add(tenant, seq, 0, rule)
    }
}

fn syn(src_mac: [u8; 6], src: Ipv4Addr, src_port: u16, dst_mac: [u8; 6]) -> Segment {
    Segment {
        src_mac,
        dst_mac,
        src: SocketAddrV4::new(src, src_port),
        dst: SocketAddrV4::new(OUTSIDE_IP, PORT),
        seq: 0x1000_0000,
        ack: 0,
        flags: TCP_SYN,
    }
}

/// Sends `syn` from `uplink` until its SYN-ACK comes back through the edge.
fn answered(uplink: &Vxlan, syn: &Segment, socket: &Path) {
    let deadline = Instant::now() + LIMIT;
    loop {
        uplink.send_frame(&syn.frame()).unwrap();
        let retry = (Instant::now() + Duration::from_millis(300)).min(deadline);
        if wait_segment(uplink, retry, |s| {
            s.src == syn.dst && s.dst == syn.src && s.is_syn_ack()
        })
        .is_some()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no SYN-ACK for {} in {LIMIT:?}: {}",
            syn.src,
            counters(socket)
        );
    }
}

/// Sends `syn` once from `uplink`: the edge must count it as a foreign source, open nothing and
/// answer nothing.
fn refused_as_foreign(uplink: &Vxlan, syn: &Segment, socket: &Path) {
    let before = counters(socket);
    uplink.send_frame(&syn.frame()).unwrap();
    let after = wait_counters(socket, LIMIT, "a foreign-source drop", |c| {
        foreign(c) > foreign(&before)
    });
    assert_eq!(
        flows_created(&after),
        flows_created(&before),
        "it reached the firewall"
    );
    let answer = wait_segment(uplink, Instant::now() + Duration::from_millis(500), |s| {
        s.dst == syn.src
    });
    assert_eq!(answer, None, "{} from the wrong host was answered", syn.src);
}

/// Sends an IPv4 packet as is from the namespace (a raw socket: any source address).
fn send_raw(ns: &Namespace, packet: Vec<u8>, dst: Ipv4Addr) {
    ns.spawn(move || {
        // SAFETY: plain socket calls on a descriptor this thread owns; the buffers outlive them.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst.octets()),
                },
                sin_zero: [0; 8],
            };
            let rc = libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert!(rc > 0, "raw send: {}", std::io::Error::last_os_error());
            libc::close(fd);
        }
    })
    .join()
    .unwrap();
}

/// The UDP port a process bound unconnected in `ns` (`ss`), other than `not`.
fn unconnected_udp_port(ns: &Namespace, pid: u32, not: u16) -> u16 {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ss", "-H", "-uanp"])
        .output()
        .expect("ss");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.contains(&format!("pid={pid},")) && l.starts_with("UNCONN"))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .find(|p| *p != not)
        .unwrap_or_else(|| panic!("no unconnected UDP socket of {pid} in:\n{text}"))
}

#[test]
fn the_edge_binds_addresses_to_hosts_and_refuses_the_underlay_from_outside() {
    let pid = std::process::id();
    let outside = Namespace::create(&format!("vg-eto-{pid}"), TAP, &OUTSIDE_IP.to_string());
    for key in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        let _ = outside.exec(&["sysctl", "-qw", key]);
    }
    for (ip, mac) in [(TA_IP, TA_MAC), (TB_IP, TB_MAC)] {
        let lladdr = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        assert!(outside.exec(&[
            "ip",
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &lladdr,
            "nud",
            "permanent",
            "dev",
            TAP,
        ]));
    }
    let tap_mac = outside.mac_of(TAP);
    let _listener: TcpListener = outside.tcp_listener(SocketAddrV4::new(OUTSIDE_IP, PORT));
    let underlay = Namespace::bare(&format!("vg-etu-{pid}"));
    // The edge's own underlay address.
    assert!(underlay.exec(&["ip", "addr", "add", &format!("{EDGE_IP}/32"), "dev", "lo"]));

    let dir = TempDir::new("vigil-edge-trust");
    let key_file = dir.join("channel.key");
    std::fs::write(&key_file, format!("{KEY_HEX}\n")).unwrap();
    let socket = dir.join("edge.sock");
    let console = dir.join("console.log");
    let _edge = VigilCommand::new("edge")
        .netns(&underlay.name)
        .args(["edge", "--elf"])
        .arg(fw_guest_elf())
        .args(["--outside", &format!("tap={TAP},netns={}", outside.name)])
        // Bound to its underlay address: everything here shares one loopback, and a reply from a
        // wildcard socket would leave with the destination's own address as its source.
        .args([
            "--cloud",
            &format!("local={EDGE_IP}:{CLOUD_PORT},vni={VNI}"),
        ])
        .args(["--control", &format!("{EDGE_IP}:{CONTROL_PORT}")])
        .arg("--key-file")
        .arg(&key_file)
        .arg("--api-socket")
        .arg(&socket)
        .arg("--console-log")
        .arg(&console)
        .start("verdict channel on")
        .unwrap_or_else(|e| panic!("vigil edge not up: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("fw-guest: edge up")
    {
        assert!(
            Instant::now() < deadline,
            "the edge micro-VM did not come up"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The hosts' addresses come after the edge started: not its own, learned from the hosts.
    for ip in [HOST_A_IP, HOST_B_IP] {
        assert!(underlay.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]));
    }
    let mut a = Host::new(&underlay, 1, HOST_A_IP);
    let mut b = Host::new(&underlay, 2, HOST_B_IP);
    let mut listen = Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Tcp);
    listen.local_addr = v4(TA_IP.octets());
    listen.local_port = LISTEN;
    let records = [
        a.attach(TA, TA_IP),
        a.egress(TA),
        VerdictRepr::add(TA, a.seq(), 0, listen),
    ];
    a.send(&records);
    let records = [b.attach(TB, TB_IP), b.egress(TB)];
    b.send(&records);
    let c = counters(&socket);
    let underlay_addrs = &c["ownership"]["underlay"];
    for ip in [EDGE_IP, HOST_A_IP, HOST_B_IP] {
        assert!(
            underlay_addrs
                .as_array()
                .is_some_and(|v| v.iter().any(|a| a == &ip.to_string())),
            "{ip} is not attached as the underlay's: {c}"
        );
    }

    // A's tenant speaks first: the edge learns where its MAC is (and its flow opens).
    answered(&a.uplink, &syn(TA_MAC, TA_IP, 40_000, tap_mac), &socket);

    // 1. From the outside, with the underlay's sources, to a port a verdict opened: spoofed.
    //    From an outside address, the same SYN reaches tenant A's host.
    let inbound = |src: Ipv4Addr, port: u16| Segment {
        src_mac: tap_mac,
        dst_mac: TA_MAC,
        src: SocketAddrV4::new(src, port),
        dst: SocketAddrV4::new(TA_IP, LISTEN),
        seq: 0x2000_0000,
        ack: 0,
        flags: TCP_SYN,
    };
    for (n, src) in [HOST_A_IP, EDGE_IP, HOST_B_IP].into_iter().enumerate() {
        let before = drops(&counters(&socket), "spoofed_source");
        let probe = inbound(src, 41_000 + n as u16);
        send_raw(&outside, probe.frame()[14..].to_vec(), TA_IP);
        wait_counters(&socket, LIMIT, "a spoofed_source drop", |c| {
            drops(c, "spoofed_source") > before
        });
        let reached = wait_segment(
            &a.uplink,
            Instant::now() + Duration::from_millis(300),
            |s| s.src == probe.src,
        );
        assert_eq!(reached, None, "a SYN from {src} reached the cloud");
    }
    let genuine = inbound(OUTSIDE_IP, 41_100);
    send_raw(&outside, genuine.frame()[14..].to_vec(), TA_IP);
    let reached = wait_segment(&a.uplink, Instant::now() + LIMIT, |s| s.src == genuine.src);
    assert!(reached.is_some(), "the outside's own SYN did not reach A");

    // 2. Host A's uplink speaking for B's tenant, and for B's underlay address: dropped before
    //    the firewall. B's own uplink: its flow opens.
    let theirs = syn(TB_MAC, TB_IP, 42_000, tap_mac);
    refused_as_foreign(&a.uplink, &theirs, &socket);
    refused_as_foreign(&a.uplink, &syn(TB_MAC, HOST_B_IP, 42_001, tap_mac), &socket);
    answered(&b.uplink, &theirs, &socket);
    answered(&a.uplink, &syn(TA_MAC, TA_IP, 42_002, tap_mac), &socket);

    // 3. B claims A's address for a tenant of its own, and names A's tenant: refused (the
    //    claim after waiting for a release that does not come). A's tenant is still A's.
    let before = counters(&socket);
    let waited = Instant::now();
    let records = [b.attach(TB2, TA_IP), b.egress(TA)];
    b.send(&records);
    let c = wait_counters(&socket, LIMIT, "the collision refused", |c| {
        refused(c, "collision") > refused(&before, "collision")
            && refused(c, "other_hosts_tenant") > refused(&before, "other_hosts_tenant")
    });
    eprintln!(
        "the colliding attach was refused after {:?}: {}",
        waited.elapsed(),
        c["ownership"]
    );
    assert!(c["ownership"]["claim_waits"].as_u64() > before["ownership"]["claim_waits"].as_u64());
    refused_as_foreign(&b.uplink, &syn(TA_MAC, TA_IP, 43_000, tap_mac), &socket);
    answered(&a.uplink, &syn(TA_MAC, TA_IP, 43_001, tap_mac), &socket);
    // A claim B waits for, as a migration's target waits for its claim, hears the collision
    // in the edge's ack (once the claim wait ran out), whatever room the edge announced: the
    // target claims again rather than announce a tenant the edge does not route to it.
    let claim = b.attach(TB2, TA_IP).to_bytes();
    let q = b.link.send_awaited(&[claim], Class::Control).unwrap();
    assert_eq!(
        b.link.wait_outcome(&q, LIMIT),
        edge::link::EdgeOutcome::Refused {
            records: 1,
            reason: vigil_wire::outcome::Outcome::Collision as u8
        },
        "B's colliding claim was not reported refused"
    );

    // The refusal is carried back in the edge's ack: a verdict B waits for, naming A's tenant,
    // comes back refused as `not_owner`. A's own verdicts: the edge's room (its micro-VM's
    // word, shared among the hosts it knows) makes a small batch certain, no wait.
    // Certain by B's room, the refusal goes to B's hook; otherwise to the waiting call.
    let (hook_tx, hook_rx) = std::sync::mpsc::channel();
    let hook_tx = std::sync::Mutex::new(hook_tx);
    b.link.on_refused(Box::new(move |records, reason| {
        let _ = hook_tx.lock().unwrap().send((records.len(), reason));
    }));
    let foreign_verdict = b.egress(TA).to_bytes();
    let q = b
        .link
        .send_waited(&[foreign_verdict], Class::Verdict)
        .unwrap();
    let not_owner = vigil_wire::outcome::Outcome::NotOwner as u8;
    if q.certain {
        assert_eq!(hook_rx.recv_timeout(LIMIT), Ok((1, not_owner)));
    } else {
        assert_eq!(
            b.link.wait_outcome(&q, LIMIT),
            edge::link::EdgeOutcome::Refused {
                records: 1,
                reason: not_owner
            }
        );
    }
    let own_verdict = a.egress(TA).to_bytes();
    let q = a.link.send_waited(&[own_verdict], Class::Verdict).unwrap();
    assert_eq!(
        a.link.wait_outcome(&q, LIMIT),
        edge::link::EdgeOutcome::Applied
    );
    let own_verdict = a.egress(TA).to_bytes();
    let q = a.link.send_waited(&[own_verdict], Class::Verdict).unwrap();
    assert!(q.certain, "the edge's ack announced no room");
    assert!(a.link.wait_acked(q.last_ticket, LIMIT));

    // 4. A releases its tenant (a migration's source does, before it sends the state); B's
    //    attach takes it over, with the verdict A's tenant had. Only B speaks for it now.
    let release = VerdictRepr::release(TA, a.seq());
    a.send(&[release]);
    // B waits for its claim, as a migration's target does: acknowledged, nothing refused.
    let claim = b.attach(TA, TA_IP).to_bytes();
    let q = b.link.send_awaited(&[claim], Class::Control).unwrap();
    assert_eq!(
        b.link.wait_outcome(&q, LIMIT),
        edge::link::EdgeOutcome::Applied
    );
    let c = counters(&socket);
    assert_eq!(c["ownership"]["handovers"], 1, "{c}");
    answered(&b.uplink, &syn(TA_MAC, TA_IP, 44_000, tap_mac), &socket);
    refused_as_foreign(&a.uplink, &syn(TA_MAC, TA_IP, 44_001, tap_mac), &socket);
    let before = counters(&socket);
    let records = [a.egress(TA)];
    a.send(&records);
    wait_counters(&socket, LIMIT, "A's verdict for B's tenant refused", |c| {
        refused(c, "other_hosts_tenant") > refused(&before, "other_hosts_tenant")
    });

    // 5. A real host's uplink (its switch micro-VM's VXLAN endpoint, peer: this edge) refuses
    //    a datagram from another underlay address.
    let host_sock = dir.join("host.sock");
    let host = VigilCommand::new("host")
        .netns(&underlay.name)
        .args(["host", "--api-socket"])
        .arg(&host_sock)
        .arg("--switch-elf")
        .arg(fw_guest_elf())
        .args([
            "--uplink",
            &format!("vxlan={EDGE_IP}:{CLOUD_PORT},vni={VNI}"),
        ])
        .args(["--edge-control", &format!("{EDGE_IP}:{CONTROL_PORT}")])
        .arg("--edge-key-file")
        .arg(&key_file)
        .args(["--host-id", "3", "--tenant-ports", "1", "--name", "trust"])
        .start("serving")
        .unwrap_or_else(|e| panic!("vigil host not up: {e}"));
    let refused_total = || {
        let r = rest::request(&host_sock, "GET", "metrics", None, LIMIT);
        let text = String::from_utf8_lossy(&r.body).to_string();
        rest::metric(&text, "vigil_uplink_refused_total")
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no vigil_uplink_refused_total in:\n{text}"))
    };
    assert_eq!(refused_total(), 0.0);
    let port = unconnected_udp_port(&underlay, host.id(), CLOUD_PORT);
    let forger: UdpSocket = underlay.udp_socket(SocketAddrV4::new(HOST_B_IP, 0));
    let mut datagram = vec![0x08, 0, 0, 0];
    datagram.extend_from_slice(&VNI.to_be_bytes()[1..]);
    datagram.push(0);
    datagram.extend_from_slice(&syn(tap_mac, OUTSIDE_IP, PORT, TA_MAC).frame());
    forger
        .send_to(&datagram, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    while refused_total() < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the host's uplink (port {port}) did not refuse the forged datagram"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("final edge counters: {}", counters(&socket));
}
