//! Revocation at the edge under datagram loss, and VXLAN that hears only authenticated hosts.
//!
//! The `vigil edge` process runs in its own network namespace (the underlay). The test plays a
//! host there, as `tests/tests/edge.rs` does: Vigil's own VXLAN endpoint stands in for the host's
//! switch uplink, and `edge::link::VerdictLink` (the host VMM's link: retransmitted until the
//! edge acknowledges) carries its verdicts. The outside is a TAP in a second namespace with real
//! Linux TCP behind it. No tenant or switch micro-VM boots.
//!
//! The underlay loses datagrams at random: `tc qdisc ... netem loss N%` on the namespace's
//! loopback, or, where the kernel has no netem (this machine's), an nftables rule in the same
//! namespace that drops N% of its UDP datagrams at random (`numgen random mod 100 < N`), which is
//! the same per-datagram loss (a sender there sees `EPERM` for a dropped datagram; every sender
//! treats that as a loss). Both directions lose: verdicts and acks, and VXLAN frames.
//!
//! Each round, a tenant is attached and opens TCP flows to the outside (real SYN-ACKs come
//! back), then deleted (`FlushTenant`). Checked: after the delete the edge holds no flow and no
//! attachment of it (conntrack counters back to zero, its frames dropped as `unknown_tenant`), and
//! after a new attach without a verdict its SYN finds no verdict (`no_verdict`). The time from the
//! delete until the edge's counters show every flow closed is printed as
//! `{"metric":"edge_revoke_ms","loss_pct":N,...}` (reported, not asserted; `scripts/bench` runs
//! this test for `edge_revoke_ms_loss0` and `edge_revoke_ms_loss30`).
//!
//! Also checked, without loss: a VXLAN frame from an underlay address that never authenticated on
//! the verdict channel, carrying the tenant's MAC and addresses, is refused (counted, not
//! delivered), and the tenant's location stays with its host.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edge::link::{Class, LinkConfig, VerdictLink};
use serde_json::Value;
use vigil_wire::verdict::{v4, IpVersion, Protocol, Rule, VerdictRepr};
use vmm_core::devices::virtio::net::FrameLink;
use vmm_core::devices::vxlan::Vxlan;

use vigil_tests::rest::{edge_counters as counters, wait_edge_counters as wait_counters};
use vigil_tests::segment::{wait_segment, Segment, TCP_RST, TCP_SYN};
use vigil_tests::{drop_count as drops, fw_guest_elf, Namespace, TempDir, VigilCommand};

const TAP: &str = "vg-eloss0";
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 68, 0, 1);
const TENANT_IP: Ipv4Addr = Ipv4Addr::new(10, 68, 0, 2);
const TENANT_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0x68, 2];
const TENANT: u32 = 9;
const HOST_ID: u32 = 1;
const PORT: u16 = 8080;
const VNI: u32 = 43;
const CONTROL: &str = "127.0.0.1:4790";
const CLOUD: &str = "127.0.0.1:4789";
const KEY_HEX: &str = "5e3c1a9e5b2d4c6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5";
/// Flows each round opens before the delete.
const FLOWS: u16 = 3;
const ROUNDS: usize = 10;
/// Generous: with 30% loss a datagram is lost several times in a row now and then.
const LIMIT: Duration = Duration::from_secs(20);

/// Random loss on the underlay namespace's loopback: netem where the kernel has it, else
/// nftables. Removed with [`Loss::clear`] (and when the namespace goes).
struct Loss {
    ns: String,
    netem: bool,
}

impl Loss {
    fn set(ns: &Namespace, pct: u32) -> Loss {
        let run = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &ns.name])
                .args(args)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let loss = format!("{pct}%");
        if run(&[
            "tc", "qdisc", "replace", "dev", "lo", "root", "netem", "loss", &loss,
        ]) {
            return Loss {
                ns: ns.name.clone(),
                netem: true,
            };
        }
        let pct = pct.to_string();
        let nft = run(&["nft", "add", "table", "inet", "vigil_loss"])
            && run(&[
                "nft",
                "add",
                "chain",
                "inet",
                "vigil_loss",
                "out",
                "{ type filter hook output priority 0; }",
            ])
            && run(&[
                "nft",
                "add",
                "rule",
                "inet",
                "vigil_loss",
                "out",
                "meta",
                "l4proto",
                "udp",
                "numgen",
                "random",
                "mod",
                "100",
                "<",
                &pct,
                "counter",
                "drop",
            ]);
        assert!(
            nft,
            "neither netem nor nftables can drop datagrams in {}",
            ns.name
        );
        Loss {
            ns: ns.name.clone(),
            netem: false,
        }
    }

    fn clear(self) {
        let args: &[&str] = if self.netem {
            &["tc", "qdisc", "del", "dev", "lo", "root"]
        } else {
            &["nft", "delete", "table", "inet", "vigil_loss"]
        };
        let ok = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "could not remove the loss in {}", self.ns);
    }
}

fn flows(c: &Value) -> u64 {
    c["firewall"]["flows_active"].as_u64().unwrap_or(0)
}

/// Sends `syn` until its SYN-ACK comes back through the edge (datagrams may be lost).
fn open_flow(uplink: &Vxlan, syn: &Segment, socket: &Path) {
    let deadline = Instant::now() + LIMIT;
    loop {
        // Under nftables loss a dropped datagram is an EPERM here: a loss like any other.
        let _ = uplink.send_frame(&syn.frame());
        let retry = (Instant::now() + Duration::from_millis(200)).min(deadline);
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

/// Sends `syn` until the edge counts it dropped for `reason`; asserts no answer ever came.
fn dropped_as(uplink: &Vxlan, syn: &Segment, socket: &Path, reason: &str) {
    let before = drops(&counters(socket), reason);
    let deadline = Instant::now() + LIMIT;
    // A sequence number of its own: an answer to this SYN acknowledges it. The outside's
    // SYN-ACKs to the same ports' earlier SYNs (duplicates under loss, already delivered
    // while the flow was open and still queued on the test's socket) are not answers to it.
    let probe = Segment {
        seq: syn.seq ^ 0x5a5a_0000,
        ..*syn
    };
    loop {
        let _ = uplink.send_frame(&probe.frame());
        let answer = wait_segment(uplink, Instant::now() + Duration::from_millis(100), |s| {
            s.src == probe.dst && s.dst == probe.src && s.ack == probe.seq.wrapping_add(1)
        });
        assert_eq!(
            answer, None,
            "{} got an answer after its revocation",
            syn.src
        );
        if drops(&counters(socket), reason) > before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} drop in {LIMIT:?}: {}",
            counters(socket)
        );
    }
}

/// One loss level: ROUNDS attach/open/delete rounds; returns the revocation times (ms).
#[allow(clippy::too_many_arguments)]
fn rounds(
    pct: u32,
    underlay: &Namespace,
    socket: &Path,
    link: &VerdictLink,
    uplink: &Vxlan,
    tap_mac: [u8; 6],
    next_seq: &mut dyn FnMut() -> u64,
    port_base: u16,
) -> Vec<f64> {
    let loss = Loss::set(underlay, pct);
    let remote = v4(OUTSIDE_IP.octets());
    let attach = |seq| {
        VerdictRepr::attach(
            TENANT,
            seq,
            None,
            Some((IpVersion::V4, v4(TENANT_IP.octets()))),
        )
        .to_bytes()
    };
    let syn = |src_port| Segment {
        src_mac: TENANT_MAC,
        dst_mac: tap_mac,
        src: SocketAddrV4::new(TENANT_IP, src_port),
        dst: SocketAddrV4::new(OUTSIDE_IP, PORT),
        seq: 0x1000_0000,
        ack: 0,
        flags: TCP_SYN,
    };
    let mut revoke_ms = Vec::new();
    for round in 0..ROUNDS {
        let base = port_base + (round as u16) * 10;
        // Attached again, but no verdict yet: what the last round's delete revoked stays closed.
        let t = link.send(&[attach(next_seq())], Class::Control).unwrap();
        assert!(link.wait_acked(t.last_ticket, LIMIT), "attach acknowledged");
        dropped_as(uplink, &syn(base), socket, "no_verdict");
        // The verdict, and flows it opens.
        let add = VerdictRepr::add(
            TENANT,
            next_seq(),
            0,
            Rule::egress_to(IpVersion::V4, Protocol::Tcp, remote, PORT),
        );
        let t = link.send(&[add.to_bytes()], Class::Verdict).unwrap();
        assert!(
            link.wait_acked(t.last_ticket, LIMIT),
            "verdict acknowledged"
        );
        for i in 1..=FLOWS {
            open_flow(uplink, &syn(base + i), socket);
        }
        let open = flows(&counters(socket));
        assert!(open >= u64::from(FLOWS), "{open} flows open");
        // The delete: from here until the edge shows every flow closed.
        let flush = VerdictRepr::flush_tenant(TENANT, next_seq()).to_bytes();
        let started = Instant::now();
        let t = link.send(&[flush], Class::Control).unwrap();
        let c = wait_counters(socket, LIMIT, "every flow closed", |c| flows(c) == 0);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        assert!(link.wait_acked(t.last_ticket, LIMIT), "flush acknowledged");
        assert_eq!(flows(&c), 0);
        revoke_ms.push(ms);
        // Nothing of the tenant is left: its address is no one's, so even a flow it had open
        // is refused as unknown_tenant.
        dropped_as(uplink, &syn(base + 1), socket, "unknown_tenant");
        // Quiet the outside's half-open connections (they retransmit SYN-ACKs otherwise).
        for i in 1..=FLOWS {
            let rst = Segment {
                seq: 0x1000_0001,
                flags: TCP_RST,
                ..syn(base + i)
            };
            let _ = uplink.send_frame(&rst.frame());
        }
    }
    loss.clear();
    revoke_ms
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

#[test]
fn revocations_reach_the_edge_under_loss_and_vxlan_hears_only_hosts() {
    let pid = std::process::id();
    let outside = Namespace::create(&format!("vg-elo-{pid}"), TAP, &OUTSIDE_IP.to_string());
    for key in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        let _ = outside.exec(&["sysctl", "-qw", key]);
    }
    let lladdr = TENANT_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert!(outside.exec(&[
        "ip",
        "neigh",
        "replace",
        &TENANT_IP.to_string(),
        "lladdr",
        &lladdr,
        "nud",
        "permanent",
        "dev",
        TAP,
    ]));
    let tap_mac = outside.mac_of(TAP);
    let _listener: TcpListener = outside.tcp_listener(SocketAddrV4::new(OUTSIDE_IP, PORT));
    let underlay = Namespace::bare(&format!("vg-elu-{pid}"));

    let dir = TempDir::new("vigil-edge-loss");
    let key_file = dir.join("channel.key");
    std::fs::write(&key_file, format!("{KEY_HEX}\n")).unwrap();
    let socket = dir.join("edge.sock");
    let console = dir.join("console.log");
    let _edge = VigilCommand::new("edge")
        .netns(&underlay.name)
        .args(["edge", "--elf"])
        .arg(fw_guest_elf())
        .args(["--outside", &format!("tap={TAP},netns={}", outside.name)])
        .args(["--cloud", &format!("local={CLOUD},vni={VNI}")])
        .args(["--control", CONTROL])
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

    // The host's side, in the underlay namespace: its link and its switch uplink.
    let key = edge::channel::key_from_hex(KEY_HEX).unwrap();
    let (link, uplink) = underlay
        .spawn(move || {
            let cloud: SocketAddr = CLOUD.parse().unwrap();
            let link = VerdictLink::connect(CONTROL, key, HOST_ID, 1, LinkConfig::default())
                .expect("verdict link");
            let uplink = Vxlan::bind("127.0.0.1:0".parse().unwrap(), vec![cloud], VNI)
                .expect("VXLAN uplink");
            (link, uplink)
        })
        .join()
        .unwrap();
    let mut seq = 0u64;
    let mut next_seq = || {
        seq += 1;
        seq
    };

    // Forged VXLAN: a frame from an underlay address that never authenticated, with the
    // tenant's MAC and address, under a verdict that would let it through. Refused before the
    // micro-VM sees it; the tenant's replies still go to its host.
    let remote = v4(OUTSIDE_IP.octets());
    let records = [
        VerdictRepr::attach(
            TENANT,
            next_seq(),
            None,
            Some((IpVersion::V4, v4(TENANT_IP.octets()))),
        )
        .to_bytes(),
        VerdictRepr::add(
            TENANT,
            next_seq(),
            0,
            Rule::egress_to(IpVersion::V4, Protocol::Tcp, remote, PORT),
        )
        .to_bytes(),
    ];
    let t = link.send(&records, Class::Control).unwrap();
    assert!(link.wait_acked(t.last_ticket, LIMIT));
    let syn = |src_port| Segment {
        src_mac: TENANT_MAC,
        dst_mac: tap_mac,
        src: SocketAddrV4::new(TENANT_IP, src_port),
        dst: SocketAddrV4::new(OUTSIDE_IP, PORT),
        seq: 0x1000_0000,
        ack: 0,
        flags: TCP_SYN,
    };
    open_flow(&uplink, &syn(30_000), &socket);
    let forger: UdpSocket = underlay.udp_socket("127.0.0.2:0");
    let before = counters(&socket);
    let mut datagram = vec![0x08, 0, 0, 0];
    datagram.extend_from_slice(&VNI.to_be_bytes()[1..]);
    datagram.push(0);
    datagram.extend_from_slice(&syn(30_001).frame());
    forger
        .send_to(&datagram, CLOUD.parse::<SocketAddr>().unwrap())
        .unwrap();
    let after = wait_counters(&socket, LIMIT, "the forged frame refused", |c| {
        c["underlay"]["refused_frames"].as_u64() > before["underlay"]["refused_frames"].as_u64()
    });
    // Had it reached the firewall, its verdict would have opened a flow and the outside's
    // SYN-ACK would come back to the tenant's host (`forwarded` is no measure: the outside
    // retransmits its SYN-ACK of the first flow meanwhile).
    assert_eq!(
        after["firewall"]["flows_created"], before["firewall"]["flows_created"],
        "the forged frame reached the firewall: {after}"
    );
    let forged_syn = syn(30_001);
    let answer = wait_segment(&uplink, Instant::now() + Duration::from_secs(1), |s| {
        s.dst == forged_syn.src
    });
    assert_eq!(answer, None, "the forged SYN was answered");
    assert_eq!(after["underlay"]["trusted_hosts"], 1, "{after}");
    // The location did not move: the next genuine flow's answer comes to the host's uplink.
    open_flow(&uplink, &syn(30_002), &socket);
    let flush = VerdictRepr::flush_tenant(TENANT, next_seq()).to_bytes();
    let t = link.send(&[flush], Class::Control).unwrap();
    assert!(link.wait_acked(t.last_ticket, LIMIT));
    wait_counters(&socket, LIMIT, "the first flows closed", |c| flows(c) == 0);

    let mut figures = Vec::new();
    for (pct, base) in [(0u32, 31_000u16), (30, 32_000)] {
        let retransmits = link
            .stats()
            .retransmits
            .load(std::sync::atomic::Ordering::Relaxed);
        let ms = rounds(
            pct,
            &underlay,
            &socket,
            &link,
            &uplink,
            tap_mac,
            &mut next_seq,
            base,
        );
        let retransmits = link
            .stats()
            .retransmits
            .load(std::sync::atomic::Ordering::Relaxed)
            - retransmits;
        let line = serde_json::json!({
            "metric": "edge_revoke_ms", "loss_pct": pct, "rounds": ms.len(),
            "median": median(&ms), "max": ms.iter().copied().fold(0.0, f64::max),
            "mean": ms.iter().sum::<f64>() / ms.len() as f64,
            "samples": ms, "link_retransmits": retransmits,
        });
        println!("{line}");
        figures.push(line);
    }
    let c = counters(&socket);
    eprintln!("final edge counters: {c}");
    assert!(
        figures[1]["link_retransmits"].as_u64() > Some(0),
        "30% loss lost nothing? {}",
        figures[1]
    );
}
