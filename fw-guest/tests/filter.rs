//! Frame-sequence tests of the stateful filter: real frames built with smoltcp, fed through
//! `Filter::process` with an explicit clock.

mod frames;

use std::sync::atomic::AtomicU64;

use frames::*;
use fw_guest::filter::*;
use smoltcp::wire::{EthernetProtocol, IpProtocol};
use vigil_wire::ring;
use vigil_wire::verdict::v4;

const OTHER: [u8; 4] = [10, 0, 0, 6];

use Direction::{Egress as EG, Ingress as IN};

fn filter(flow_capacity: usize, verdict_capacity: usize) -> Filter<'static> {
    filter_with(flow_capacity, verdict_capacity)
}

fn connect_rule(
    ip: IpVersion,
    proto: Protocol,
    local: [u8; 16],
    remote: [u8; 16],
    port: u16,
) -> Rule {
    Rule {
        local_addr: local,
        remote_addr: remote,
        remote_prefix: ip.addr_bits(),
        remote_port_min: port,
        remote_port_max: port,
        ..Rule::any_port(Direction::Egress, ip, proto)
    }
}

fn add(f: &mut Filter, seq: &mut Seq, tenant: u32, rule: Rule, lifetime_ms: u64, now: u64) {
    f.apply(
        &VerdictRepr {
            op: Op::Add,
            tenant,
            seq: seq.next(),
            lifetime_ms,
            rule,
        },
        now,
    )
    .unwrap();
}

fn https_rule() -> Rule {
    connect_rule(IpVersion::V4, Protocol::Tcp, v4(TENANT), v4(SERVER), 443)
}

/// A filter with an egress verdict tenant → server:443 and an established connection from port
/// 40000.
fn established() -> (Filter<'static>, Seq) {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    add(&mut f, &mut seq, T1, https_rule(), 0, 0);
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    assert_eq!(f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Syn), 0), FWD);
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::SynAck), 0),
        FWD
    );
    assert_eq!(f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Ack), 0), FWD);
    (f, seq)
}

fn only_flow_state(f: &Filter) -> TcpState {
    let flows: Vec<_> = f.conntrack().iter().collect();
    assert_eq!(flows.len(), 1);
    flows[0].tcp_state()
}

#[test]
fn allowed_tcp_flow_handshake_and_data() {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    add(&mut f, &mut seq, T1, https_rule(), 0, 0);
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    assert_eq!(f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Syn), 0), FWD);
    assert_eq!(only_flow_state(&f), TcpState::SynSent);
    // A retransmitted SYN passes and creates nothing new.
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Syn), SEC),
        FWD
    );
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::SynAck), SEC),
        FWD
    );
    assert_eq!(only_flow_state(&f), TcpState::SynAckSeen);
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Ack), SEC),
        FWD
    );
    assert_eq!(only_flow_state(&f), TcpState::Established);
    for _ in 0..3 {
        assert_eq!(
            f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Data), 2 * SEC),
            FWD
        );
        assert_eq!(
            f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Data), 2 * SEC),
            FWD
        );
    }
    let c = f.counters();
    assert_eq!(c.flows_created, 1);
    assert_eq!(c.forwarded, 10);
    assert_eq!(c.drops.iter().sum::<u64>(), 0);
    // The flow's entry remembers who opened it.
    assert_eq!(f.conntrack().iter().next().unwrap().origin(), EG);
}

#[test]
fn no_verdict_is_dropped_and_counted() {
    let (mut f, _) = established();
    let (a, b, c) = (Ip::V4(TENANT), Ip::V4(SERVER), Ip::V4(OTHER));
    // Another destination, another port, another tenant with the same addresses, inbound SYN.
    assert_eq!(
        f.process(T1, EG, &tcp(a, c, 40001, 443, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40001, 80, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T2, EG, &tcp(a, b, 40001, 443, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40001, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    // The established flow belongs to tenant 1 only.
    assert_eq!(
        f.process(T2, IN, &tcp(b, a, 443, 40000, Seg::Data), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T1, EG, &udp(a, b, 5000, 443), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(f.counters().dropped(DropReason::NoVerdict), 6);
    assert_eq!(f.conntrack().used(), 1);
}

#[test]
fn tcp_without_handshake_is_invalid() {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    add(&mut f, &mut seq, T1, https_rule(), 0, 0);
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    // Mid-stream pick-up is refused even though a verdict exists.
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Ack), 0),
        drop(DropReason::InvalidTcpState)
    );
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Data), 0),
        drop(DropReason::InvalidTcpState)
    );
    // An inbound SYN-ACK nobody asked for has no verdict in its direction.
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::SynAck), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(f.conntrack().used(), 0);
    // After the SYN, data before the SYN-ACK is invalid.
    assert_eq!(f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Syn), 0), FWD);
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Data), 0),
        drop(DropReason::InvalidTcpState)
    );
    // And a SYN inside an established connection is invalid.
    let (mut f, _) = established();
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Syn), 0),
        drop(DropReason::InvalidTcpState)
    );
}

#[test]
fn tcp_fin_teardown() {
    let (mut f, _) = established();
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Fin), SEC),
        FWD
    );
    assert_eq!(only_flow_state(&f), TcpState::FinWait);
    // Half-close: the other side may still send data, then its FIN after it.
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Data), SEC),
        FWD
    );
    let fin = TcpSpec {
        control: TcpControl::Fin,
        seq: ISN + 1 + 18,
        ack: Some(ISN + 2),
        win: 64240,
        wscale: None,
    };
    assert_eq!(
        f.process(T1, IN, &tcp_spec(b, a, 443, 40000, fin, b""), SEC),
        FWD
    );
    assert_eq!(only_flow_state(&f), TcpState::Closing);
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Ack), SEC),
        FWD
    );
    // The closing entry times out (60 s) and the port is free again: a new SYN opens a new flow.
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Ack), 62 * SEC),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Syn), 62 * SEC),
        FWD
    );
    assert_eq!(only_flow_state(&f), TcpState::SynSent);
}

#[test]
fn tcp_rst_closes_and_syn_reopens() {
    let (mut f, _) = established();
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Rst), SEC),
        FWD
    );
    assert_eq!(only_flow_state(&f), TcpState::Closed);
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Data), SEC),
        drop(DropReason::InvalidTcpState)
    );
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Data), SEC),
        drop(DropReason::InvalidTcpState)
    );
    // An inbound SYN cannot re-open an egress-only flow.
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Syn), SEC),
        drop(DropReason::InvalidTcpState)
    );
    // The opener's SYN re-opens through the verdict.
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Syn), 2 * SEC),
        FWD
    );
    assert_eq!(only_flow_state(&f), TcpState::SynSent);
    assert_eq!(f.counters().flows_created, 2);
    // A closed entry disappears after its 10 s timeout. (The responder's RST refusing a SYN must
    // acknowledge it, RFC 9293 §3.10.7.3.)
    let refuse = TcpSpec {
        control: TcpControl::Rst,
        seq: 0,
        ack: Some(ISN + 1),
        win: 0,
        wscale: None,
    };
    assert_eq!(
        f.process(T1, IN, &tcp_spec(b, a, 443, 40000, refuse, b""), 3 * SEC),
        FWD
    );
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Ack), 14 * SEC),
        drop(DropReason::NoVerdict)
    );
}

#[test]
fn udp_idle_timeouts() {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    let dns = [10, 0, 0, 53];
    add(
        &mut f,
        &mut seq,
        T1,
        connect_rule(IpVersion::V4, Protocol::Udp, [0; 16], v4(dns), 53),
        0,
        0,
    );
    let (a, d) = (Ip::V4(TENANT), Ip::V4(dns));
    // Unreplied: 30 s.
    assert_eq!(f.process(T1, EG, &udp(a, d, 5000, 53), 0), FWD);
    assert_eq!(
        f.process(T1, IN, &udp(d, a, 53, 5000), 31 * SEC),
        drop(DropReason::NoVerdict)
    );
    // Replied: 120 s from the last packet.
    assert_eq!(f.process(T1, EG, &udp(a, d, 5001, 53), 100 * SEC), FWD);
    assert_eq!(f.process(T1, IN, &udp(d, a, 53, 5001), 129 * SEC), FWD);
    assert_eq!(f.process(T1, IN, &udp(d, a, 53, 5001), 248 * SEC), FWD);
    assert_eq!(
        f.process(T1, IN, &udp(d, a, 53, 5001), 369 * SEC),
        drop(DropReason::NoVerdict)
    );
    // The verdict still opens new datagrams.
    assert_eq!(f.process(T1, EG, &udp(a, d, 5001, 53), 369 * SEC), FWD);
}

#[test]
fn tcp_half_open_times_out() {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    add(&mut f, &mut seq, T1, https_rule(), 0, 0);
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    assert_eq!(f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Syn), 0), FWD);
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::SynAck), 31 * SEC),
        drop(DropReason::NoVerdict)
    );
    // The sweep reclaims the expired entry.
    assert_eq!(f.conntrack().used(), 1);
    assert_eq!(f.sweep(31 * SEC, 1000), 1);
    assert_eq!(f.conntrack().used(), 0);
    assert_eq!(f.counters().flows_expired, 1);
}

#[test]
fn table_full_refuses_new_flows_never_evicts_live_ones() {
    let mut f = filter(14, 4);
    let cap = f.conntrack().capacity();
    assert!(cap >= 14);
    let mut seq = Seq(0);
    let web = Rule {
        local_port: 80,
        ..Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Tcp)
    };
    add(&mut f, &mut seq, T1, web, 0, 0);
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    for p in 0..cap as u16 {
        assert_eq!(
            f.process(T1, IN, &tcp(b, a, 1000 + p, 80, Seg::Syn), 0),
            FWD,
            "flow {p}"
        );
        assert_eq!(
            f.process(T1, EG, &tcp(a, b, 80, 1000 + p, Seg::SynAck), 0),
            FWD
        );
        assert_eq!(
            f.process(T1, IN, &tcp(b, a, 1000 + p, 80, Seg::Ack), 0),
            FWD
        );
    }
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 9999, 80, Seg::Syn), 0),
        drop(DropReason::TableFull)
    );
    // Established flows are past the half-open timeout but live: still refused, still passing.
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 9999, 80, Seg::Syn), 100 * SEC),
        drop(DropReason::TableFull)
    );
    for p in 0..cap as u16 {
        assert_eq!(
            f.process(T1, IN, &tcp(b, a, 1000 + p, 80, Seg::Data), 100 * SEC),
            FWD
        );
    }
    assert_eq!(f.counters().dropped(DropReason::TableFull), 2);
    // Close one flow by RST; once its closed timeout passes, its slot is reclaimed for a new flow.
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 1000, 80, Seg::Rst), 100 * SEC),
        FWD
    );
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 9999, 80, Seg::Syn), 105 * SEC),
        drop(DropReason::TableFull)
    );
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 9999, 80, Seg::Syn), 111 * SEC),
        FWD
    );
    assert_eq!(f.conntrack().used(), cap);
}

fn sample_frames() -> Vec<(&'static str, Vec<u8>)> {
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    let (a6, b6) = (Ip::V6(TENANT6), Ip::V6(SERVER6));
    let syn = tcp(a, b, 40000, 443, Seg::Syn);
    let quoted = syn[14..].to_vec();
    vec![
        ("tcp4 syn", syn.clone()),
        ("tcp4 data", tcp(a, b, 40000, 443, Seg::Data)),
        ("udp4", udp(a, b, 5000, 53)),
        ("tcp6 syn", tcp(a6, b6, 40000, 443, Seg::Syn)),
        ("udp6", udp(a6, b6, 5000, 53)),
        ("icmp4 echo", icmp4_echo(TENANT, SERVER, true, 7)),
        (
            "icmp4 unreachable",
            icmp4_unreachable(SERVER, TENANT, &quoted),
        ),
        ("icmp6 echo", icmp6_echo(TENANT6, SERVER6, true, 7)),
        ("ndp ns", ndp_solicit(TENANT6, SERVER6, 255)),
        ("arp", arp_request(TENANT, SERVER)),
        ("vlan tcp4", vlan_tag(&syn, 0x8100, 42)),
    ]
}

#[test]
fn every_truncation_of_valid_frames_is_malformed_never_a_panic() {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    add(&mut f, &mut seq, T1, https_rule(), 0, 0);
    for (name, frame) in sample_frames() {
        for len in 0..frame.len() {
            let d = f.process(T1, EG, &frame[..len], 0);
            assert_eq!(
                d,
                drop(DropReason::Malformed),
                "{name} cut to {len} of {}",
                frame.len()
            );
        }
        // The whole frame is never malformed.
        assert_ne!(
            f.process(T1, EG, &frame, 0),
            drop(DropReason::Malformed),
            "{name}"
        );
    }
}

#[test]
fn lying_headers_are_malformed() {
    let mut f = filter(64, 16);
    let syn = tcp(Ip::V4(TENANT), Ip::V4(SERVER), 40000, 443, Seg::Syn);
    let cases: [(&str, usize, u8); 5] = [
        ("ipv4 ihl 4", 14, 0x44),
        ("ipv4 ihl 15", 14, 0x4f),
        ("ip version 5", 14, 0x55),
        ("ipv4 total length 0xff..", 16, 0xff),
        ("tcp data offset 4", 14 + 20 + 12, 0x40),
    ];
    for (name, off, val) in cases {
        let mut fr = syn.clone();
        fr[off] = val;
        assert_eq!(
            f.process(T1, EG, &fr, 0),
            drop(DropReason::Malformed),
            "{name}"
        );
    }
    // An ICMP error whose quoted packet is cut inside the transport header.
    let quoted = &syn[14..14 + 20 + 4];
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quoted);
    let fr = ip_frame(Ip::V4(SERVER), Ip::V4(TENANT), IpProtocol::Icmp, &icmp);
    assert_eq!(f.process(T1, IN, &fr, 0), drop(DropReason::Malformed));
}

#[test]
fn ipv4_header_length_below_the_fixed_header_is_malformed() {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    // Source port 12: with IHL 4 the datagram's bytes from the destination address on read as a
    // well-formed UDP header (ports 2560 → 5, length 12), so only the IHL itself can refuse it.
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    let rule = connect_rule(IpVersion::V4, Protocol::Udp, v4(TENANT), v4(SERVER), 53);
    add(&mut f, &mut seq, T1, rule, 0, 0);
    let datagram = udp(a, b, 12, 53);
    assert_eq!(f.process(T1, EG, &datagram, 0), FWD);
    for ihl in 0..5u8 {
        let mut fr = datagram.clone();
        fr[14] = 0x40 | ihl;
        assert_eq!(
            f.process(T1, EG, &fr, 0),
            drop(DropReason::Malformed),
            "ihl {ihl}"
        );
    }
    // A quoted header in an ICMP error is held to the same.
    let query = udp(a, b, 40000, 53);
    assert_eq!(f.process(T1, EG, &query, 0), FWD);
    let error = icmp_error(b, a, &query[14..]);
    assert_eq!(f.process(T1, IN, &error, 0), FWD);
    let mut short = error.clone();
    short[14 + 20 + 8] = 0x44;
    assert_eq!(f.process(T1, IN, &short, 0), drop(DropReason::Malformed));
}

/// xorshift64*: deterministic pseudo-random bytes for the fuzz loop.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn mutated_and_random_frames_never_panic() {
    let (mut f, _) = established();
    let samples = sample_frames();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for i in 0..60_000u64 {
        let (_, base) = &samples[(rng.next() % samples.len() as u64) as usize];
        let mut fr = base.clone();
        if i % 10 == 0 {
            // Pure garbage of random length behind a plausible EtherType.
            let len = (rng.next() % 200) as usize;
            fr = (0..len).map(|_| rng.next() as u8).collect();
            if len >= 14 && i % 20 == 0 {
                fr[12..14].copy_from_slice(&[0x08, 0x00]);
            }
        } else {
            for _ in 0..1 + rng.next() % 4 {
                let pos = (rng.next() % fr.len() as u64) as usize;
                fr[pos] = rng.next() as u8;
            }
            if rng.next().is_multiple_of(4) {
                fr.truncate((rng.next() % fr.len() as u64) as usize);
            }
        }
        let dir = if rng.next().is_multiple_of(2) { EG } else { IN };
        let _ = f.process(T1, dir, &fr, i * 1_000_000);
    }
    let c = f.counters();
    assert_eq!(c.forwarded + c.drops.iter().sum::<u64>(), 60_000 + 3);
}

#[test]
fn ipv6_flows() {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    add(
        &mut f,
        &mut seq,
        T1,
        connect_rule(IpVersion::V6, Protocol::Tcp, TENANT6, SERVER6, 443),
        0,
        0,
    );
    add(
        &mut f,
        &mut seq,
        T1,
        connect_rule(IpVersion::V6, Protocol::Icmpv6, [0; 16], SERVER6, 0),
        0,
        0,
    );
    let (a, b) = (Ip::V6(TENANT6), Ip::V6(SERVER6));
    assert_eq!(f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Syn), 0), FWD);
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::SynAck), 0),
        FWD
    );
    assert_eq!(f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Ack), 0), FWD);
    assert_eq!(f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Data), 0), FWD);
    // The IPv4 verdict space is separate: the same ports over IPv4 have no verdict.
    let v4syn = tcp(Ip::V4(TENANT), Ip::V4(SERVER), 40000, 443, Seg::Syn);
    assert_eq!(f.process(T1, EG, &v4syn, 0), drop(DropReason::NoVerdict));
    // ICMPv6 echo out and back.
    assert_eq!(
        f.process(T1, EG, &icmp6_echo(TENANT6, SERVER6, true, 9), 0),
        FWD
    );
    assert_eq!(
        f.process(T1, IN, &icmp6_echo(SERVER6, TENANT6, false, 9), 0),
        FWD
    );
    assert_eq!(
        f.process(T1, IN, &icmp6_echo(SERVER6, TENANT6, false, 10), 0),
        drop(DropReason::NoVerdict)
    );
    // Neighbour discovery passes only with hop limit 255.
    assert_eq!(
        f.process(T1, EG, &ndp_solicit(TENANT6, SERVER6, 255), 0),
        FWD
    );
    assert_eq!(
        f.process(T1, EG, &ndp_solicit(TENANT6, SERVER6, 64), 0),
        drop(DropReason::Malformed)
    );
    assert_eq!(f.counters().ndp, 1);
    // An extension header (hop-by-hop, next header 0) is not walked.
    let l4 = tcp_bytes(a, b, 40001, 443, Seg::Syn, b"");
    let mut hbh = vec![6u8, 0, 1, 4, 0, 0, 0, 0];
    hbh.extend_from_slice(&l4);
    let fr = ip_frame(a, b, IpProtocol::HopByHop, &hbh);
    assert_eq!(
        f.process(T1, EG, &fr, 0),
        drop(DropReason::UnsupportedProtocol)
    );
}

#[test]
fn vlan_tagged_frames() {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    add(&mut f, &mut seq, T1, https_rule(), 0, 0);
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    let syn = vlan_tag(&tcp(a, b, 40000, 443, Seg::Syn), 0x8100, 100);
    assert_eq!(f.process(T1, EG, &syn, 0), FWD);
    // The tag is not part of the flow: the untagged reply belongs to the same flow.
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::SynAck), 0),
        FWD
    );
    assert_eq!(f.conntrack().used(), 1);
    // Tagged frames without a verdict are dropped like untagged ones.
    let other = vlan_tag(&tcp(a, Ip::V4(OTHER), 40000, 443, Seg::Syn), 0x8100, 100);
    assert_eq!(f.process(T1, EG, &other, 0), drop(DropReason::NoVerdict));
    // Stacked tags: S-tag outside, or two C-tags.
    let qinq = vlan_tag(
        &vlan_tag(&tcp(a, b, 40001, 443, Seg::Syn), 0x8100, 5),
        0x88a8,
        7,
    );
    assert_eq!(f.process(T1, EG, &qinq, 0), drop(DropReason::VlanStacked));
    let double = vlan_tag(
        &vlan_tag(&tcp(a, b, 40001, 443, Seg::Syn), 0x8100, 5),
        0x8100,
        7,
    );
    assert_eq!(f.process(T1, EG, &double, 0), drop(DropReason::VlanStacked));
    // A tagged ARP passes.
    assert_eq!(
        f.process(
            T1,
            EG,
            &vlan_tag(&arp_request(TENANT, SERVER), 0x8100, 3),
            0
        ),
        FWD
    );
}

#[test]
fn arp_passes_other_ethertypes_do_not() {
    let mut f = filter(16, 4);
    assert_eq!(f.process(T1, EG, &arp_request(TENANT, SERVER), 0), FWD);
    assert_eq!(f.process(T1, IN, &arp_request(SERVER, TENANT), 0), FWD);
    assert_eq!(f.counters().arp, 2);
    // LLDP (0x88cc).
    let lldp = ethernet(EthernetProtocol::Unknown(0x88cc), &[0u8; 46]);
    assert_eq!(f.process(T1, EG, &lldp, 0), drop(DropReason::NonIp));
    // ARP for another protocol than IPv4 is malformed here.
    let mut arp = arp_request(TENANT, SERVER);
    arp[14 + 2] = 0x86;
    arp[14 + 3] = 0xdd;
    assert_eq!(f.process(T1, EG, &arp, 0), drop(DropReason::Malformed));
    // IPv4 fragments are not reassembled.
    let mut frag = tcp(Ip::V4(TENANT), Ip::V4(SERVER), 1, 2, Seg::Syn);
    frag[14 + 6] = 0x20; // more fragments
    assert_eq!(f.process(T1, EG, &frag, 0), drop(DropReason::Fragment));
    // GRE (47) is not a supported protocol.
    let gre = ip_frame(
        Ip::V4(TENANT),
        Ip::V4(SERVER),
        IpProtocol::Unknown(47),
        &[0u8; 8],
    );
    assert_eq!(
        f.process(T1, EG, &gre, 0),
        drop(DropReason::UnsupportedProtocol)
    );
}

#[test]
fn verdict_removal_closes_its_flows() {
    let (mut f, mut seq) = established();
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    f.apply(
        &VerdictRepr {
            op: Op::Remove,
            tenant: T1,
            seq: seq.next(),
            lifetime_ms: 0,
            rule: https_rule(),
        },
        SEC,
    )
    .unwrap();
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Data), SEC),
        drop(DropReason::Revoked)
    );
    assert_eq!(f.conntrack().used(), 0);
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Data), SEC),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40001, 443, Seg::Syn), SEC),
        drop(DropReason::NoVerdict)
    );
    // Removing it again is an error, counted.
    let again = VerdictRepr {
        op: Op::Remove,
        tenant: T1,
        seq: seq.next(),
        lifetime_ms: 0,
        rule: https_rule(),
    };
    assert_eq!(f.apply(&again, SEC), Err(ApplyError::NotFound));
    assert_eq!(f.counters().verdicts_rejected, 1);
}

#[test]
fn flush_tenant_closes_only_that_tenant() {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    add(&mut f, &mut seq, T1, https_rule(), 0, 0);
    let dns = connect_rule(IpVersion::V4, Protocol::Udp, [0; 16], v4(SERVER), 53);
    add(&mut f, &mut seq, T1, dns, 0, 0);
    add(&mut f, &mut seq, T2, https_rule(), 0, 0);
    for t in [T1, T2] {
        assert_eq!(f.process(t, EG, &tcp(a, b, 40000, 443, Seg::Syn), 0), FWD);
    }
    assert_eq!(f.process(T1, EG, &udp(a, b, 5000, 53), 0), FWD);
    assert_eq!(f.conntrack().used(), 3);
    f.apply(
        &VerdictRepr {
            op: Op::FlushTenant,
            tenant: T1,
            seq: seq.next(),
            lifetime_ms: 0,
            rule: https_rule(),
        },
        SEC,
    )
    .unwrap();
    assert_eq!(f.verdicts().len(), 1);
    // The flush itself closed tenant 1's flows, without any packet or sweep.
    assert_eq!(f.counters().flows_revoked, 2);
    assert_eq!(f.conntrack().used(), 1);
    assert_eq!(f.sweep(SEC, 1000), 0);
    assert_eq!(
        f.process(T1, IN, &udp(b, a, 53, 5000), SEC),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T2, IN, &tcp(b, a, 443, 40000, Seg::SynAck), SEC),
        FWD
    );
}

#[test]
fn verdict_expiry_stops_new_flows_keeps_open_ones() {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    add(&mut f, &mut seq, T1, https_rule(), 1500, 0);
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Syn), SEC),
        FWD
    );
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40001, 443, Seg::Syn), 2 * SEC),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::SynAck), 2 * SEC),
        FWD
    );
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Ack), 2 * SEC),
        FWD
    );
    // The expired verdict stays while it holds a flow; the sweep frees it once the flow is gone.
    assert_eq!(f.sweep(3 * SEC, 100), 0);
    assert_eq!(f.verdicts().len(), 1);
    assert_eq!(
        f.process(T1, IN, &tcp(b, a, 443, 40000, Seg::Rst), 3 * SEC),
        FWD
    );
    assert_eq!(f.sweep(20 * SEC, 100), 2);
    assert_eq!(f.verdicts().len(), 0);
    // A refreshed verdict (same rule, new lifetime) opens again.
    add(&mut f, &mut seq, T1, https_rule(), 1000, 20 * SEC);
    assert_eq!(
        f.process(T1, EG, &tcp(a, b, 40002, 443, Seg::Syn), 20 * SEC),
        FWD
    );
}

#[test]
fn bind_verdict_with_remote_prefix_and_port_range() {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    let ssh = Rule {
        local_port: 22,
        remote_addr: v4([192, 168, 0, 0]),
        remote_prefix: 16,
        remote_port_min: 1024,
        remote_port_max: 65535,
        ..Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Tcp)
    };
    add(&mut f, &mut seq, T1, ssh, 0, 0);
    let a = Ip::V4(TENANT);
    let inside = Ip::V4([192, 168, 7, 9]);
    assert_eq!(
        f.process(T1, IN, &tcp(inside, a, 50000, 22, Seg::Syn), 0),
        FWD
    );
    assert_eq!(
        f.process(T1, EG, &tcp(a, inside, 22, 50000, Seg::SynAck), 0),
        FWD
    );
    assert_eq!(
        f.process(T1, IN, &tcp(inside, a, 50000, 22, Seg::Ack), 0),
        FWD
    );
    assert_eq!(f.conntrack().iter().next().unwrap().origin(), IN);
    let outside = Ip::V4([10, 9, 9, 9]);
    assert_eq!(
        f.process(T1, IN, &tcp(outside, a, 50000, 22, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T1, IN, &tcp(inside, a, 80, 22, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    assert_eq!(
        f.process(T1, IN, &tcp(inside, a, 50000, 23, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
    // A bind verdict does not let the tenant connect out from port 22.
    assert_eq!(
        f.process(T1, EG, &tcp(a, inside, 22, 50001, Seg::Syn), 0),
        drop(DropReason::NoVerdict)
    );
}

#[test]
fn icmp_echo_and_errors() {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    add(
        &mut f,
        &mut seq,
        T1,
        connect_rule(IpVersion::V4, Protocol::Icmp, [0; 16], v4(SERVER), 0),
        0,
        0,
    );
    add(&mut f, &mut seq, T1, https_rule(), 0, 0);
    assert_eq!(
        f.process(T1, EG, &icmp4_echo(TENANT, SERVER, true, 77), 0),
        FWD
    );
    assert_eq!(
        f.process(T1, IN, &icmp4_echo(SERVER, TENANT, false, 77), 0),
        FWD
    );
    assert_eq!(
        f.process(T1, IN, &icmp4_echo(SERVER, TENANT, false, 78), 0),
        drop(DropReason::NoVerdict)
    );
    // The remote cannot ping the tenant through an egress verdict.
    assert_eq!(
        f.process(T1, IN, &icmp4_echo(SERVER, TENANT, true, 77), 0),
        drop(DropReason::IcmpUnsupported)
    );
    assert_eq!(
        f.process(T1, IN, &icmp4_echo(SERVER, TENANT, true, 79), 0),
        drop(DropReason::NoVerdict)
    );
    // An ICMP error about a tracked flow passes; about an unknown one it does not.
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    let syn = tcp(a, b, 40000, 443, Seg::Syn);
    assert_eq!(f.process(T1, EG, &syn, 0), FWD);
    assert_eq!(
        f.process(T1, IN, &icmp4_unreachable(SERVER, TENANT, &syn[14..]), 0),
        FWD
    );
    let stray = tcp(a, b, 40009, 443, Seg::Syn);
    assert_eq!(
        f.process(T1, IN, &icmp4_unreachable(SERVER, TENANT, &stray[14..]), 0),
        drop(DropReason::NoVerdict)
    );
    // An error quoting the tenant's echo request (e.g. time exceeded on the way) passes too.
    let echo = icmp4_echo(TENANT, SERVER, true, 77);
    assert_eq!(
        f.process(T1, IN, &icmp4_unreachable(OTHER, TENANT, &echo[14..]), 0),
        FWD
    );
}

/// One family's resolver exchange: the tenant, its server, an address of neither, and the
/// frames of the query and its reply.
struct Exchange {
    tenant: Ip,
    server: Ip,
    other: Ip,
    query: Vec<u8>,
    reply: Vec<u8>,
}

/// A tenant with a resolver flow (UDP to the server's port 53, one query and its reply seen) in
/// each family.
fn resolver_flows() -> (Filter<'static>, [Exchange; 2]) {
    let mut f = filter(64, 16);
    let mut seq = Seq(0);
    let mut other6 = SERVER6;
    other6[15] = 6;
    let families = [
        (IpVersion::V4, Ip::V4(TENANT), Ip::V4(SERVER), Ip::V4(OTHER)),
        (
            IpVersion::V6,
            Ip::V6(TENANT6),
            Ip::V6(SERVER6),
            Ip::V6(other6),
        ),
    ];
    let exchanges = families.map(|(version, tenant, server, other)| {
        let (local, remote) = match (tenant, server) {
            (Ip::V4(a), Ip::V4(b)) => (v4(a), v4(b)),
            (Ip::V6(a), Ip::V6(b)) => (a, b),
            _ => unreachable!(),
        };
        let rule = connect_rule(version, Protocol::Udp, local, remote, 53);
        add(&mut f, &mut seq, T1, rule, 0, 0);
        let query = udp(tenant, server, 40000, 53);
        let reply = udp(server, tenant, 53, 40000);
        assert_eq!(f.process(T1, EG, &query, 0), FWD);
        assert_eq!(f.process(T1, IN, &reply, 0), FWD);
        Exchange {
            tenant,
            server,
            other,
            query,
            reply,
        }
    });
    (f, exchanges)
}

#[test]
fn icmp_errors_go_back_to_the_quoted_sender() {
    let (mut f, exchanges) = resolver_flows();
    for x in exchanges {
        let (a, b, other) = (x.tenant, x.server, x.other);
        let (query, reply) = (&x.query[14..], &x.reply[14..]);
        // The tenant's port was closed when the reply came: it tells the server.
        assert_eq!(
            f.process(T1, EG, &icmp_error(a, b, reply), SEC),
            FWD,
            "{a:?}"
        );
        // The same quote addressed to anyone else would carry the tenant's bytes wherever it
        // likes (the exfiltration the check closes).
        assert_eq!(
            f.process(T1, EG, &icmp_error(a, other, reply), SEC),
            drop(DropReason::IcmpUnsupported),
            "{a:?}"
        );
        // A tenant reports only what reached it: the error comes from the quoted destination.
        assert_eq!(
            f.process(T1, EG, &icmp_error(other, b, reply), SEC),
            drop(DropReason::IcmpUnsupported),
            "{a:?}"
        );
        // From the outside any router on the path may report the tenant's query, to the tenant.
        assert_eq!(
            f.process(T1, IN, &icmp_error(other, a, query), SEC),
            FWD,
            "{a:?}"
        );
        assert_eq!(
            f.process(T1, IN, &icmp_error(b, a, query), SEC),
            FWD,
            "{a:?}"
        );
        // An error about the tenant's query sent to someone else is not the tenant's business.
        assert_eq!(
            f.process(T1, IN, &icmp_error(b, other, query), SEC),
            drop(DropReason::IcmpUnsupported),
            "{a:?}"
        );
    }
}

#[test]
fn icmp_errors_are_no_longer_than_the_rfcs_allow() {
    let (mut f, exchanges) = resolver_flows();
    // RFC 1812 §4.3.2.3: 576 bytes for IPv4; RFC 4443 §2.4 (c): the IPv6 minimum MTU, 1280.
    for (x, max) in exchanges.into_iter().zip([576, 1280]) {
        let (a, b) = (x.tenant, x.server);
        let ip_header = if matches!(a, Ip::V4(_)) { 20 } else { 40 };
        // Outer IP header, ICMP header, quoted IP and UDP headers, and the quoted reply's payload.
        let quoted_payload = |total: usize| vec![0x5a; total - ip_header - 8 - ip_header - 8];
        for (total, expect) in [
            (max, FWD),
            (max + 1, drop(DropReason::IcmpUnsupported)),
            (1500, drop(DropReason::IcmpUnsupported)),
        ] {
            let reply = udp_bytes(b, a, 53, 40000, &quoted_payload(total));
            let quoted = ip_frame(b, a, IpProtocol::Udp, &reply);
            let error = icmp_error(a, b, &quoted[14..]);
            assert_eq!(error.len(), 14 + total);
            assert_eq!(f.process(T1, EG, &error, SEC), expect, "{a:?} {total}");
            // The same from the outside about the tenant's own (long) datagram.
            let query = udp_bytes(a, b, 40000, 53, &quoted_payload(total));
            let quoted = ip_frame(a, b, IpProtocol::Udp, &query);
            let error = icmp_error(b, a, &quoted[14..]);
            assert_eq!(f.process(T1, IN, &error, SEC), expect, "{a:?} {total}");
        }
    }
}

#[test]
fn verdict_records_through_the_ring() {
    // The VMM's path: records pushed into the shared ring, popped and applied by the micro-VM.
    let region: Vec<AtomicU64> = (0..ring::ring_bytes(8) / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    ring::format(&region, 8).unwrap();
    let mut producer = ring::Producer::attach(&region).unwrap();
    let mut consumer = ring::Consumer::attach(&region).unwrap();
    let add = VerdictRepr {
        op: Op::Add,
        tenant: T1,
        seq: 1,
        lifetime_ms: 0,
        rule: https_rule(),
    };
    producer.push(&add.to_bytes()).unwrap();
    let mut garbage = add.to_bytes();
    garbage[0] = 77;
    producer.push(&garbage).unwrap();
    producer
        .push(&VerdictRepr { seq: 5, ..add }.to_bytes())
        .unwrap();

    let mut f = filter(16, 4);
    let mut rec = [0u8; ring::SLOT_BYTES];
    let mut results = vec![];
    while consumer.pop(&mut rec).unwrap() {
        results.push(f.apply_record(&rec, 0));
    }
    assert_eq!(results.len(), 3);
    assert_eq!(results[0], Ok(()));
    assert!(matches!(results[1], Err(ApplyError::Invalid(_))));
    assert_eq!(results[2], Ok(()), "identical verdict refreshes");
    assert_eq!(f.verdicts().len(), 1);
    assert_eq!(f.counters().verdict_seq_gaps, 1);
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    assert_eq!(f.process(T1, EG, &tcp(a, b, 40000, 443, Seg::Syn), 0), FWD);

    // Publish counters to the shared block and read them back as the VMM would.
    let block: Vec<AtomicU64> = (0..ring::counters_bytes(2) / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    let w = ring::CountersWriter::format(&block, 2).unwrap();
    f.process(T1, EG, &tcp(a, Ip::V4(OTHER), 1, 2, Seg::Syn), 0);
    f.counters().publish(&w, f.conntrack().used() as u64);
    let r = ring::CountersReader::attach(&block).unwrap();
    assert_eq!(r.drops(DropReason::NoVerdict), 1);
    assert_eq!(r.global(ring::GLOBAL_FORWARDED), Some(1));
    assert_eq!(r.global(ring::GLOBAL_FLOWS_ACTIVE), Some(1));
}

#[test]
fn verdict_table_full_and_many_verdicts() {
    let mut f = filter(64, 32);
    // One tenant may fill the whole table here (quotas: tests/exact_flows.rs).
    f.set_tenant_verdict_quota(64);
    let mut seq = Seq(0);
    for p in 0..32u16 {
        add(
            &mut f,
            &mut seq,
            T1,
            connect_rule(IpVersion::V4, Protocol::Tcp, [0; 16], v4(SERVER), 1000 + p),
            0,
            0,
        );
    }
    let extra = VerdictRepr {
        op: Op::Add,
        tenant: T1,
        seq: seq.next(),
        lifetime_ms: 0,
        rule: connect_rule(IpVersion::V4, Protocol::Tcp, [0; 16], v4(SERVER), 5000),
    };
    assert_eq!(f.apply(&extra, 0), Err(ApplyError::TableFull));
    let (a, b) = (Ip::V4(TENANT), Ip::V4(SERVER));
    for p in 0..32u16 {
        assert_eq!(
            f.process(T1, EG, &tcp(a, b, 40000 + p, 1000 + p, Seg::Syn), 0),
            FWD,
            "port {p}"
        );
    }
}

#[test]
fn flow_entry_fits_the_budget() {
    // The hash slot every flow takes: an IPv4 key, expiry, verdict, state, and the indices of
    // what the pools hold for TCP and IPv6 flows (32 bytes each, as long as the table).
    assert_eq!(std::mem::size_of::<FlowSlot>(), 32);
    assert_eq!(std::mem::size_of::<TcpExt>(), 32);
    assert_eq!(std::mem::size_of::<V6Addrs>(), 32);
    let table = table_slots_for(65536) * std::mem::size_of::<FlowSlot>();
    assert!(
        table <= 5 << 19,
        "{table} bytes of hash slots for 64k flows"
    );
    assert_eq!(slots_for(65536), 3 * table_slots_for(65536));
}
