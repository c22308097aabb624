//! The edge's SYN proxy (issue #13) against the filter as the edge runs it
//! ([`Filter::process_edge_mut`]): cookie SYN-ACKs instead of state under a flood, the handshake
//! replayed to the tenant on a valid cookie, sequence translation for the life of the flow,
//! forged and stale cookies refused, and floods of 20,000 and 200,000 SYNs during and after which a
//! legitimate client connects at once while another tenant sees no proxy at all. Real frames
//! (smoltcp-built and smoltcp-checked, checksums included), explicit clock.

mod frames;

use frames::*;
use fw_guest::filter::*;
use smoltcp::wire::{EthernetFrame, Icmpv4Packet, IpAddress, Ipv4Packet, TcpPacket};
use vigil_wire::verdict::v4;

use EdgeSide::{Cloud, Outside};

const TENANT_IP: [u8; 4] = [10, 66, 0, 2];
const OTHER_TENANT_IP: [u8; 4] = [10, 66, 0, 3];
const CLIENT_IP: [u8; 4] = [198, 51, 100, 7];
const PORT: u16 = 7000;
const C_ISN: u32 = 0xffff_ff00;
const S_ISN: u32 = 0x7000_0000;

/// Thresholds small enough for the tests to reach with a few SYNs.
fn proxy() -> SynProxy {
    SynProxy {
        secret: [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210],
        per_dst: 8,
        per_tenant: 16,
        global: 256,
    }
}

/// The edge with T1 at `TENANT_IP` and T2 at `OTHER_TENANT_IP`, port 7000 of each open to anyone.
fn edge(flows: usize, synproxy: Option<SynProxy>) -> Filter<'static> {
    let flows = Box::leak(vec![FlowSlot::EMPTY; slots_for(flows)].into_boxed_slice());
    let verdicts = Box::leak(vec![VerdictSlot::EMPTY; 64].into_boxed_slice());
    let index = Box::leak(vec![IndexSlot::EMPTY; 128].into_boxed_slice());
    let config = Config {
        synproxy,
        ..Config::default()
    };
    let mut f = Filter::new(flows, verdicts, index, config).unwrap();
    let mut seq = Seq(0);
    for (t, ip) in [(T1, TENANT_IP), (T2, OTHER_TENANT_IP)] {
        f.apply(
            &VerdictRepr::attach(t, seq.next(), None, Some((IpVersion::V4, v4(ip)))),
            0,
        )
        .unwrap();
        let open = Rule {
            local_port: PORT,
            ..Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Tcp)
        };
        f.apply(&VerdictRepr::add(t, seq.next(), 0, open), 0)
            .unwrap();
    }
    f
}

fn spec(control: TcpControl, seq: u32, ack: Option<u32>, win: u16) -> TcpSpec {
    TcpSpec {
        control,
        seq,
        ack,
        win,
        wscale: None,
    }
}

/// What the edge did with one frame: its decision, the frame as forwarded, and what it sent.
struct Out {
    d: Decision,
    frame: Vec<u8>,
    to_cloud: Option<Vec<u8>>,
    to_outside: Option<Vec<u8>>,
}

fn run(f: &mut Filter, from: EdgeSide, mut frame: Vec<u8>, now: u64) -> Out {
    let to = match from {
        Outside => Cloud,
        Cloud => Outside,
    };
    let mut r = EdgeReplies::new();
    let d = f.process_edge_mut(from, to, &mut frame, &mut r, now);
    Out {
        d,
        frame,
        to_cloud: r.frame(Cloud).map(<[u8]>::to_vec),
        to_outside: r.frame(Outside).map(<[u8]>::to_vec),
    }
}

#[allow(clippy::too_many_arguments)]
fn from_client(
    f: &mut Filter,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    s: TcpSpec,
    payload: &[u8],
    now: u64,
) -> Out {
    let frame = tcp_spec(Ip::V4(src), Ip::V4(dst), sport, PORT, s, payload);
    run(f, Outside, frame, now)
}

fn from_tenant(f: &mut Filter, dport: u16, s: TcpSpec, payload: &[u8], now: u64) -> Out {
    let frame = tcp_spec(
        Ip::V4(TENANT_IP),
        Ip::V4(CLIENT_IP),
        PORT,
        dport,
        s,
        payload,
    );
    run(f, Cloud, frame, now)
}

/// A TCP segment's fields as a receiver reads them, after checking both checksums.
#[derive(Debug)]
struct Read {
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    syn: bool,
    ack_flag: bool,
    win: u16,
    mss: Option<u16>,
}

fn read(frame: &[u8]) -> Read {
    let eth = EthernetFrame::new_checked(frame).expect("ethernet");
    let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
    assert!(ip.verify_checksum(), "IPv4 header checksum");
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
    assert!(
        tcp.verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst)),
        "TCP checksum"
    );
    let opts = tcp.options();
    let mss = (opts.len() >= 4 && opts[0] == 2 && opts[1] == 4)
        .then(|| u16::from_be_bytes([opts[2], opts[3]]));
    Read {
        src: src.octets(),
        dst: dst.octets(),
        sport: tcp.src_port(),
        dport: tcp.dst_port(),
        seq: tcp.seq_number().0 as u32,
        ack: tcp.ack_number().0 as u32,
        syn: tcp.syn(),
        ack_flag: tcp.ack(),
        win: tcp.window_len(),
        mss,
    }
}

/// SYNs from spoofed sources to T1's port until the proxy answers for its destination.
fn engage(f: &mut Filter, now: u64) {
    let mut n = 0u16;
    loop {
        let src = [203, 0, 113, (n % 250) as u8 + 1];
        let o = from_client(
            f,
            src,
            TENANT_IP,
            1000 + n,
            spec(TcpControl::Syn, 7, None, 1000),
            b"",
            now,
        );
        n += 1;
        if o.d == Decision::Answered {
            return;
        }
        assert_eq!(o.d, FWD, "SYN {n} before the proxy engaged");
        assert!(n < 64, "the proxy never engaged");
    }
}

/// A full client connect to `dst`:7000 from `sport` at `now`, through the proxy or not; then one
/// data segment each way. Returns whether the proxy handled it. Panics if the connect fails.
fn legit_connect(f: &mut Filter, dst: [u8; 4], sport: u16, now: u64) -> bool {
    let syn = spec(TcpControl::Syn, C_ISN, None, 64240);
    let o = from_client(f, CLIENT_IP, dst, sport, syn, b"", now);
    let tenant_port = |f: &mut Filter, s: TcpSpec, payload: &[u8]| {
        let frame = tcp_spec(Ip::V4(dst), Ip::V4(CLIENT_IP), PORT, sport, s, payload);
        run(f, Cloud, frame, now)
    };
    match o.d {
        Decision::Forward => {
            let sa = tenant_port(f, spec(TcpControl::Syn, S_ISN, Some(C_ISN + 1), 65160), b"");
            assert_eq!(sa.d, FWD, "SYN-ACK");
            let ack = spec(TcpControl::None, C_ISN + 1, Some(S_ISN + 1), 502);
            assert_eq!(from_client(f, CLIENT_IP, dst, sport, ack, b"", now).d, FWD);
            let data = spec(TcpControl::Psh, C_ISN + 1, Some(S_ISN + 1), 502);
            assert_eq!(
                from_client(f, CLIENT_IP, dst, sport, data, b"GET /", now).d,
                FWD
            );
            let reply = spec(TcpControl::Psh, S_ISN + 1, Some(C_ISN + 6), 509);
            assert_eq!(tenant_port(f, reply, b"hello").d, FWD);
            false
        }
        Decision::Answered => {
            let synack = read(o.to_outside.as_deref().expect("a cookie SYN-ACK"));
            let cookie = synack.seq;
            let ack = spec(
                TcpControl::None,
                C_ISN + 1,
                Some(cookie.wrapping_add(1)),
                502,
            );
            let a = from_client(f, CLIENT_IP, dst, sport, ack, b"", now);
            assert_eq!(a.d, Decision::Answered, "the cookie ACK");
            let sa = tenant_port(f, spec(TcpControl::Syn, S_ISN, Some(C_ISN + 1), 65160), b"");
            assert_eq!(sa.d, Decision::Answered, "the tenant's SYN-ACK");
            let data = spec(
                TcpControl::Psh,
                C_ISN + 1,
                Some(cookie.wrapping_add(1)),
                502,
            );
            let d = from_client(f, CLIENT_IP, dst, sport, data, b"GET /", now);
            assert_eq!(d.d, FWD);
            assert_eq!(read(&d.frame).ack, S_ISN + 1);
            let reply = spec(TcpControl::Psh, S_ISN + 1, Some(C_ISN + 6), 509);
            let r = tenant_port(f, reply, b"hello");
            assert_eq!(r.d, FWD);
            assert_eq!(read(&r.frame).seq, cookie.wrapping_add(1));
            true
        }
        d => panic!("legitimate SYN from port {sport}: {d:?}"),
    }
}

#[test]
fn a_cookie_handshake_is_replayed_to_the_tenant_and_translated_for_the_flow() {
    let mut f = edge(4096, Some(proxy()));
    engage(&mut f, 0);
    let used = f.conntrack().used();
    let sent = f.counters().syncookies_sent;

    // The client's SYN: answered by the edge, nothing created.
    let syn = spec(TcpControl::Syn, C_ISN, None, 64240);
    let o = from_client(&mut f, CLIENT_IP, TENANT_IP, 40000, syn, b"", 5 * SEC);
    assert_eq!(o.d, Decision::Answered);
    assert!(o.to_cloud.is_none());
    assert_eq!(
        f.conntrack().used(),
        used,
        "a SYN under the proxy creates no state"
    );
    assert_eq!(f.counters().syncookies_sent, sent + 1);
    let sa = read(o.to_outside.as_deref().unwrap());
    assert_eq!(
        (sa.src, sa.dst, sa.sport, sa.dport),
        (TENANT_IP, CLIENT_IP, PORT, 40000)
    );
    assert!(sa.syn && sa.ack_flag);
    assert_eq!(sa.ack, C_ISN.wrapping_add(1));
    assert_eq!(sa.win, 0, "no data before the tenant answers");
    assert_eq!(sa.mss, Some(1460), "the client's MSS (1460) is encoded");
    let cookie = sa.seq;

    // Its ACK: the SYN replayed to the tenant with the client's ISN and MSS.
    let ack = spec(
        TcpControl::None,
        C_ISN.wrapping_add(1),
        Some(cookie.wrapping_add(1)),
        502,
    );
    let o = from_client(&mut f, CLIENT_IP, TENANT_IP, 40000, ack, b"", 5 * SEC);
    assert_eq!(o.d, Decision::Answered);
    let syn = read(o.to_cloud.as_deref().expect("the replayed SYN"));
    assert_eq!(
        (syn.src, syn.dst, syn.sport, syn.dport),
        (CLIENT_IP, TENANT_IP, 40000, PORT)
    );
    assert!(syn.syn && !syn.ack_flag);
    assert_eq!(syn.seq, C_ISN);
    assert_eq!(syn.mss, Some(1460));
    assert_eq!(f.conntrack().used(), used + 1);
    assert_eq!(f.counters().syncookies_valid, 1);

    // A segment from the client before the tenant answered is not let through; it replays the
    // SYN again (the first may have been lost).
    let early = spec(
        TcpControl::Psh,
        C_ISN.wrapping_add(1),
        Some(cookie.wrapping_add(1)),
        502,
    );
    let o = from_client(&mut f, CLIENT_IP, TENANT_IP, 40000, early, b"x", 5 * SEC);
    assert_eq!(o.d, Decision::Answered);
    let again = read(o.to_cloud.as_deref().expect("the SYN again"));
    assert!(again.syn && !again.ack_flag && again.seq == C_ISN);
    assert_eq!(again.mss, Some(1460));
    // ... but not for a segment whose acknowledgment is no cookie.
    let bogus = spec(
        TcpControl::Psh,
        C_ISN.wrapping_add(1),
        Some(cookie ^ 0x0055_5500),
        502,
    );
    let o = from_client(&mut f, CLIENT_IP, TENANT_IP, 40000, bogus, b"x", 5 * SEC);
    assert!(matches!(o.d, Decision::Drop(_)), "{:?}", o.d);
    assert_eq!(f.conntrack().used(), used + 1);

    // The tenant's SYN-ACK: acknowledged by the edge, and the client's window opened.
    let sa = spec(TcpControl::Syn, S_ISN, Some(C_ISN.wrapping_add(1)), 65160);
    let o = from_tenant(&mut f, 40000, sa, b"", 5 * SEC);
    assert_eq!(o.d, Decision::Answered);
    let ack = read(o.to_cloud.as_deref().expect("the edge's ACK to the tenant"));
    assert_eq!(
        (ack.src, ack.dst, ack.sport, ack.dport),
        (CLIENT_IP, TENANT_IP, 40000, PORT)
    );
    assert!(ack.ack_flag && !ack.syn);
    assert_eq!((ack.seq, ack.ack), (C_ISN.wrapping_add(1), S_ISN + 1));
    assert_eq!(ack.win, 502);
    let upd = read(o.to_outside.as_deref().expect("the window update"));
    assert_eq!((upd.src, upd.dst), (TENANT_IP, CLIENT_IP));
    assert_eq!(
        (upd.seq, upd.ack),
        (cookie.wrapping_add(1), C_ISN.wrapping_add(1))
    );
    assert_eq!(upd.win, 65160);
    assert_eq!(f.counters().synproxy_established, 1);

    // Data both ways: acknowledgments from the outside and sequence numbers from the tenant are
    // translated, with valid checksums (`read` checks them).
    let mut c = C_ISN.wrapping_add(1);
    let mut s = S_ISN + 1;
    let mut last_to_client = Vec::new();
    for round in 0..50u32 {
        let payload = [round as u8; 100];
        let data = spec(
            TcpControl::Psh,
            c,
            Some(s.wrapping_sub(S_ISN).wrapping_add(cookie)),
            502,
        );
        let o = from_client(
            &mut f,
            CLIENT_IP,
            TENANT_IP,
            40000,
            data,
            &payload,
            (6 + u64::from(round)) * SEC,
        );
        assert_eq!(o.d, FWD, "client data, round {round}");
        let r = read(&o.frame);
        assert_eq!(
            (r.seq, r.ack),
            (c, s),
            "the tenant sees its own sequence space"
        );
        c = c.wrapping_add(100);
        let reply = spec(TcpControl::Psh, s, Some(c), 509);
        let o = from_tenant(
            &mut f,
            40000,
            reply,
            &payload[..50],
            (6 + u64::from(round)) * SEC,
        );
        assert_eq!(o.d, FWD, "tenant data, round {round}");
        let r = read(&o.frame);
        assert_eq!(
            r.seq,
            s.wrapping_sub(S_ISN).wrapping_add(cookie),
            "the client sees the cookie's"
        );
        assert_eq!(r.ack, c);
        last_to_client = o.frame.clone();
        s = s.wrapping_add(50);
    }

    // An ICMP error from a router on the way quotes the tenant's last segment as the outside saw
    // it (cookie sequence space, not yet acknowledged): the tenant gets it with its own sequence
    // number, and a valid ICMP checksum (or its stack would ignore it: path MTU discovery).
    let router = [203, 0, 113, 1];
    let icmp = icmp4_unreachable(router, TENANT_IP, &last_to_client[14..]);
    let o = run(&mut f, Outside, icmp, 59 * SEC);
    assert_eq!(
        o.d, FWD,
        "an error quoting the flow's in-flight segment passes"
    );
    let ip = Ipv4Packet::new_checked(&o.frame[14..]).unwrap();
    let error = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert!(error.verify_checksum(), "the ICMP checksum was updated");
    // The quote is cut short (its header's total length is the whole segment's): read by hand.
    let quoted = error.data();
    let l4 = usize::from(quoted[0] & 0x0f) * 4;
    let quoted_seq = u32::from_be_bytes(quoted[l4 + 4..l4 + 8].try_into().unwrap());
    assert_eq!(
        quoted_seq,
        s.wrapping_sub(50),
        "the quoted sequence number is the tenant's own"
    );

    // A blind injector who guessed the tenant's real sequence space is out of window.
    let blind = spec(TcpControl::Psh, c, Some(s), 502);
    let o = from_client(&mut f, CLIENT_IP, TENANT_IP, 40000, blind, b"x", 60 * SEC);
    assert_eq!(o.d, drop(DropReason::TcpOutOfWindow));
}

#[test]
fn forged_and_stale_cookies_are_refused_and_create_nothing() {
    let mut f = edge(4096, Some(proxy()));
    // No cookie out yet: a stray ACK is just an ACK without a flow.
    let stray = spec(TcpControl::None, 5, Some(6), 502);
    let o = from_client(&mut f, CLIENT_IP, TENANT_IP, 41000, stray, b"", 0);
    assert_eq!(o.d, drop(DropReason::InvalidTcpState));

    engage(&mut f, 0);
    let syn = spec(TcpControl::Syn, C_ISN, None, 64240);
    let o = from_client(&mut f, CLIENT_IP, TENANT_IP, 41000, syn, b"", SEC);
    let cookie = read(o.to_outside.as_deref().unwrap()).seq;
    let used = f.conntrack().used();

    let ack = |ack: u32| spec(TcpControl::None, C_ISN.wrapping_add(1), Some(ack), 502);
    // Wrong cookie (every bit of its hash-protected low 24 bits flipped, or its time moved).
    for forged in [
        cookie ^ 0x00ff_ffff,
        cookie.wrapping_add(1 << 24),
        cookie ^ 0x100,
        0,
        u32::MAX,
    ] {
        let o = from_client(
            &mut f,
            CLIENT_IP,
            TENANT_IP,
            41000,
            ack(forged.wrapping_add(1)),
            b"",
            SEC,
        );
        assert_eq!(
            o.d,
            drop(DropReason::SynCookieInvalid),
            "forged {forged:#x}"
        );
        assert!(o.to_cloud.is_none() && o.to_outside.is_none());
    }
    // The right cookie from another port, another address, or with another ISN.
    let o = from_client(
        &mut f,
        CLIENT_IP,
        TENANT_IP,
        41001,
        ack(cookie.wrapping_add(1)),
        b"",
        SEC,
    );
    assert_eq!(o.d, drop(DropReason::SynCookieInvalid));
    let o = from_client(
        &mut f,
        [198, 51, 100, 8],
        TENANT_IP,
        41000,
        ack(cookie.wrapping_add(1)),
        b"",
        SEC,
    );
    assert_eq!(o.d, drop(DropReason::SynCookieInvalid));
    let other_isn = spec(
        TcpControl::None,
        C_ISN.wrapping_add(1001),
        Some(cookie.wrapping_add(1)),
        502,
    );
    let o = from_client(&mut f, CLIENT_IP, TENANT_IP, 41000, other_isn, b"", SEC);
    assert_eq!(o.d, drop(DropReason::SynCookieInvalid));
    // A blind attacker's guesses: 20,000 random acknowledgments, none accepted.
    let mut x = 0x9e37_79b9_u32;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let o = from_client(&mut f, CLIENT_IP, TENANT_IP, 41000, ack(x), b"", SEC);
        assert_eq!(o.d, drop(DropReason::SynCookieInvalid));
    }
    assert_eq!(f.conntrack().used(), used, "no forged ACK created an entry");
    assert_eq!(f.counters().syncookies_valid, 0);

    // Stale: the right ACK 3 minutes later (cookies still being sent) is refused.
    let again = spec(TcpControl::Syn, 1, None, 64240);
    let o = from_client(
        &mut f,
        [203, 0, 113, 99],
        TENANT_IP,
        9,
        again,
        b"",
        190 * SEC,
    );
    assert_eq!(o.d, Decision::Answered);
    let o = from_client(
        &mut f,
        CLIENT_IP,
        TENANT_IP,
        41000,
        ack(cookie.wrapping_add(1)),
        b"",
        190 * SEC,
    );
    assert_eq!(o.d, drop(DropReason::SynCookieInvalid));
    // ... while within its lifetime (64 to 128 s) it is accepted.
    let mut g = edge(4096, Some(proxy()));
    engage(&mut g, 0);
    let o = from_client(&mut g, CLIENT_IP, TENANT_IP, 41000, syn, b"", 63 * SEC);
    let cookie = read(o.to_outside.as_deref().unwrap()).seq;
    let o = from_client(
        &mut g,
        CLIENT_IP,
        TENANT_IP,
        41000,
        ack(cookie.wrapping_add(1)),
        b"",
        127 * SEC,
    );
    assert_eq!(o.d, Decision::Answered);
}

/// A flood of `n` SYNs to T1:7000 from random spoofed sources and ports over `secs` seconds; a
/// legitimate client connects every `n / 20` SYNs and after the flood, each at the instant it
/// asks (the same clock reading: well within 1 s). T2 connects alongside and is never proxied.
fn flood(n: u32, secs: u64) {
    let mut f = edge(65_536, Some(SynProxy::new([7, 9])));
    let mut x = 0x2545_f491_u32;
    let mut proxied = 0;
    let mut peak_half_open = 0;
    let start = std::time::Instant::now();
    for k in 0..n {
        let now = u64::from(k) * secs * SEC / u64::from(n);
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let src = [
            100 + (x >> 28) as u8,
            (x >> 20) as u8,
            (x >> 12) as u8,
            x as u8 | 1,
        ];
        let syn = spec(TcpControl::Syn, x, None, 1024);
        let o = from_client(
            &mut f,
            src,
            TENANT_IP,
            (x >> 8) as u16 | 1024,
            syn,
            b"",
            now,
        );
        assert!(
            matches!(o.d, Decision::Forward | Decision::Answered),
            "flood SYN {k}: {:?}",
            o.d
        );
        peak_half_open = peak_half_open.max(f.conntrack().half_open());
        if k % (n / 20) == n / 40 {
            let port = 30_000 + (k / (n / 20)) as u16;
            proxied += u32::from(legit_connect(&mut f, TENANT_IP, port, now));
            assert!(
                !legit_connect(&mut f, OTHER_TENANT_IP, port, now),
                "T2 was proxied"
            );
        }
    }
    let elapsed = start.elapsed();
    assert!(
        proxied >= 15,
        "most connects during the flood went through the proxy: {proxied}"
    );
    let c = *f.counters();
    assert!(
        c.syncookies_sent >= u64::from(n) * 3 / 4,
        "cookies {}",
        c.syncookies_sent
    );
    // State stays bounded by the proxy's threshold, far below the half-open limit.
    let limits = f.conntrack().half_open_limits();
    assert!(
        peak_half_open <= 512,
        "half-open peak {peak_half_open} (limit {})",
        limits.global
    );
    assert_eq!(c.dropped(DropReason::HalfOpenLimit), 0);
    assert_eq!(c.dropped(DropReason::TableFull), 0);
    // After the flood: at once, and once the flood's entries have timed out.
    let end = secs * SEC;
    legit_connect(&mut f, TENANT_IP, 50_000, end);
    legit_connect(&mut f, OTHER_TENANT_IP, 50_000, end);
    f.sweep(end + 6 * SEC, usize::MAX);
    assert!(
        !legit_connect(&mut f, TENANT_IP, 50_001, end + 6 * SEC),
        "proxy still engaged"
    );
    eprintln!(
        "flood of {n} SYNs: {:.0} SYNs/s through the filter ({} cookies, {} proxied connects, \
         half-open peak {peak_half_open})",
        f64::from(n) / elapsed.as_secs_f64(),
        c.syncookies_sent,
        proxied
    );
}

#[test]
fn a_20k_syn_flood_leaves_legitimate_connects_working() {
    flood(20_000, 18);
}

#[test]
fn a_200k_syn_flood_leaves_legitimate_connects_working() {
    flood(200_000, 20);
}

#[test]
fn without_pressure_syns_pass_untouched_and_the_switch_never_proxies() {
    let mut f = edge(4096, Some(proxy()));
    assert!(!legit_connect(&mut f, TENANT_IP, 42000, 0));
    assert_eq!(f.counters().syncookies_sent, 0);
    // `process_edge` (no rewriting possible) never proxies, even under pressure.
    let mut g = edge(4096, Some(proxy()));
    for n in 0..64u16 {
        let frame = tcp_spec(
            Ip::V4([203, 0, 113, 1]),
            Ip::V4(TENANT_IP),
            1000 + n,
            PORT,
            spec(TcpControl::Syn, 7, None, 1000),
            b"",
        );
        assert_eq!(g.process_edge(Outside, Cloud, &frame, 0), FWD);
    }
    assert_eq!(g.counters().syncookies_sent, 0);
}

#[test]
fn a_lost_handshake_ack_is_made_good_by_the_clients_window_probe() {
    let mut f = edge(4096, Some(proxy()));
    engage(&mut f, 0);
    let syn = spec(TcpControl::Syn, C_ISN, None, 64240);
    let o = from_client(&mut f, CLIENT_IP, TENANT_IP, 43000, syn, b"", SEC);
    let cookie = read(o.to_outside.as_deref().unwrap()).seq;
    // The ACK is lost. The client, facing a zero window, probes with SND.UNA - 1 = its ISN.
    let probe = spec(TcpControl::None, C_ISN, Some(cookie.wrapping_add(1)), 502);
    let o = from_client(&mut f, CLIENT_IP, TENANT_IP, 43000, probe, b"", 2 * SEC);
    assert_eq!(o.d, Decision::Answered);
    let syn = read(o.to_cloud.as_deref().expect("the replayed SYN"));
    assert!(syn.syn && syn.seq == C_ISN);
    // The tenant answers; the flow completes as usual.
    let sa = spec(TcpControl::Syn, S_ISN, Some(C_ISN.wrapping_add(1)), 65160);
    assert_eq!(
        from_tenant(&mut f, 43000, sa, b"", 2 * SEC).d,
        Decision::Answered
    );
    let data = spec(
        TcpControl::Psh,
        C_ISN.wrapping_add(1),
        Some(cookie.wrapping_add(1)),
        502,
    );
    let o = from_client(&mut f, CLIENT_IP, TENANT_IP, 43000, data, b"GET /", 2 * SEC);
    assert_eq!(o.d, FWD);
    assert_eq!(read(&o.frame).ack, S_ISN + 1);
}

/// A flood generator that starts over with the same numbers (or clients retransmitting their
/// SYNs) while the entries of the first SYNs still live, answered by the tenant, and the proxy
/// engages midway: each repeated SYN is forwarded or answered with a cookie, never dropped as
/// out of window.
#[test]
fn repeated_syns_on_live_half_open_entries_are_not_out_of_window() {
    let mut f = edge(4096, Some(proxy()));
    let per_dst = proxy().per_dst as u16;
    let syn = |n: u16| {
        spec(
            TcpControl::Syn,
            0x1000_0000 + u32::from(n) * 7919,
            None,
            1024,
        )
    };
    let src = |n: u16| [203, 0, 113, n as u8 + 1];
    // First round: half the entries in one second, half in the next; the tenant answers each.
    for n in 0..per_dst {
        let now = if n < per_dst / 2 {
            SEC / 2
        } else {
            SEC + SEC / 100
        };
        let o = from_client(&mut f, src(n), TENANT_IP, 2000 + n, syn(n), b"", now);
        assert_eq!(o.d, FWD, "SYN {n}");
        let isn = 0x3000_0000 ^ (u32::from(2000 + n) << 8);
        let sa = spec(
            TcpControl::Syn,
            isn,
            Some(0x1000_0000 + u32::from(n) * 7919 + 1),
            64240,
        );
        let frame = tcp_spec(Ip::V4(TENANT_IP), Ip::V4(src(n)), PORT, 2000 + n, sa, b"");
        assert_eq!(run(&mut f, Cloud, frame, now).d, FWD, "SYN-ACK {n}");
    }
    // Second round, the same SYNs in the same order, when the first half has expired and the
    // second has not.
    for n in 0..per_dst {
        let now = 5 * SEC + SEC / 2;
        let o = from_client(&mut f, src(n), TENANT_IP, 2000 + n, syn(n), b"", now);
        assert!(
            o.d == FWD || o.d == Decision::Answered,
            "SYN {n} again: {:?}",
            o.d
        );
    }
    assert_eq!(f.counters().dropped(DropReason::TcpOutOfWindow), 0);
}

/// The end-to-end flood test's traffic (tests/tests/edge_flood.rs), replayed against the filter:
/// 20,000 SYNs at 5,000/s, then the same generator started over for 200,000 at 20,000/s, the
/// tenant answering every SYN that reaches it: no segment is out of window.
#[test]
fn the_end_to_end_floods_replayed_drop_nothing_out_of_window() {
    for gap_ms in (1_000..2_400u64).step_by(50) {
        for delay_us in [200u64, 5_000, 60_000] {
            let mut f = edge(65536, Some(SynProxy::new([1, 2])));
            let mut now = SEC / 3;
            for (count, pps) in [(20_000u64, 5_000u64), (30_000, 20_000)] {
                let mut x = 0x9e37_79b9_u32;
                for k in 0..count {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    let src = [198, 18 + (x >> 31) as u8, (x >> 16) as u8, x as u8 | 1];
                    let sport = 1024 + ((x >> 8) % 60_000) as u16;
                    let at = now + k * SEC / pps;
                    let o = from_client(
                        &mut f,
                        src,
                        TENANT_IP,
                        sport,
                        spec(TcpControl::Syn, x, None, 1024),
                        b"",
                        at,
                    );
                    if o.d == FWD {
                        let isn = 0x3000_0000 ^ (u32::from(sport) << 8);
                        let sa = spec(TcpControl::Syn, isn, Some(x.wrapping_add(1)), 64240);
                        let frame = tcp_spec(Ip::V4(TENANT_IP), Ip::V4(src), PORT, sport, sa, b"");
                        let d = run(&mut f, Cloud, frame, at + delay_us * 1000).d;
                        assert_eq!(
                            d, FWD,
                            "SYN-ACK to flood SYN {k} (gap {gap_ms} ms, delay {delay_us} us)"
                        );
                    } else {
                        assert_eq!(
                            o.d,
                            Decision::Answered,
                            "flood SYN {k} (gap {gap_ms} ms, delay {delay_us} us)"
                        );
                    }
                }
                now += count * SEC / pps + gap_ms * SEC / 1000;
            }
            assert_eq!(f.counters().dropped(DropReason::TcpOutOfWindow), 0);
        }
    }
}
