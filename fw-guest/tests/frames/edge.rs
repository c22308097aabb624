//! The edge the attack tests share (edge_attacks.rs, edge_neighbors.rs): one tenant with an open
//! port behind it, an outside client, and the handshake between them.

use fw_guest::filter::*;
use vigil_wire::verdict::v4;

use super::*;
use EdgeSide::{Cloud, Outside};

/// The tenant behind the edge, its open port, an outside client.
pub const TENANT_IP: [u8; 4] = [10, 66, 0, 2];
pub const OTHER_TENANT_IP: [u8; 4] = [10, 66, 0, 3];
pub const CLIENT_IP: [u8; 4] = [198, 51, 100, 7];
pub const PORT: u16 = 7000;
pub const TENANT6_IP: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const CLIENT6_IP: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];

/// Client and server initial sequence numbers: the client's wraps past 2^32 within the test.
pub const C_ISN: u32 = 0xffff_f000;
pub const S_ISN: u32 = 0x7000_0000;

pub fn seg(
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    win: u16,
    wscale: Option<u8>,
) -> TcpSpec {
    TcpSpec {
        control,
        seq,
        ack,
        win,
        wscale,
    }
}

/// The edge with T1 at `TENANT_IP` (and `TENANT6_IP`), T2 at `OTHER_TENANT_IP`, and an ingress
/// verdict opening T1's port 7000 (both IP versions) to anyone.
pub fn edge(flows: usize, config: Config) -> Filter<'static> {
    let flows = Box::leak(vec![FlowSlot::EMPTY; slots_for(flows)].into_boxed_slice());
    let verdicts = Box::leak(vec![VerdictSlot::EMPTY; 64].into_boxed_slice());
    let index = Box::leak(vec![IndexSlot::EMPTY; 128].into_boxed_slice());
    let mut f = Filter::new(flows, verdicts, index, config).unwrap();
    let mut seq = Seq(0);
    for (t, addr) in [
        (T1, (IpVersion::V4, v4(TENANT_IP))),
        (T1, (IpVersion::V6, TENANT6_IP)),
        (T2, (IpVersion::V4, v4(OTHER_TENANT_IP))),
    ] {
        f.apply(&VerdictRepr::attach(t, seq.next(), None, Some(addr)), 0)
            .unwrap();
    }
    for version in [IpVersion::V4, IpVersion::V6] {
        let open = Rule {
            local_port: PORT,
            ..Rule::any(Direction::Ingress, version, Protocol::Tcp)
        };
        f.apply(&VerdictRepr::add(T1, seq.next(), 0, open), 0)
            .unwrap();
    }
    f
}

pub fn inbound(f: &mut Filter, sport: u16, spec: TcpSpec, payload: &[u8], now: u64) -> Decision {
    let frame = tcp_spec(
        Ip::V4(CLIENT_IP),
        Ip::V4(TENANT_IP),
        sport,
        PORT,
        spec,
        payload,
    );
    f.process_edge(Outside, Cloud, &frame, now)
}

pub fn outbound(f: &mut Filter, dport: u16, spec: TcpSpec, payload: &[u8], now: u64) -> Decision {
    let frame = tcp_spec(
        Ip::V4(TENANT_IP),
        Ip::V4(CLIENT_IP),
        PORT,
        dport,
        spec,
        payload,
    );
    f.process_edge(Cloud, Outside, &frame, now)
}

/// A real handshake from the client's `sport` (window scale 7 both ways), then 100 bytes from the
/// client, acknowledged. Returns (client's next seq, server's next seq).
pub fn connect(f: &mut Filter, sport: u16, now: u64) -> (u32, u32) {
    use TcpControl::{None as Ack, Psh, Syn};
    let (c, s) = (C_ISN, S_ISN);
    let syn = seg(Syn, c, None, 64240, Some(7));
    assert_eq!(inbound(f, sport, syn, b"", now), FWD);
    let syn_ack = seg(Syn, s, Some(c + 1), 65160, Some(7));
    assert_eq!(outbound(f, sport, syn_ack, b"", now), FWD);
    let ack = seg(Ack, c + 1, Some(s + 1), 502, None);
    assert_eq!(inbound(f, sport, ack, b"", now), FWD);
    let data = seg(Psh, c + 1, Some(s + 1), 502, None);
    assert_eq!(inbound(f, sport, data, &[7; 100], now), FWD);
    let c_next = c.wrapping_add(101);
    let acked = seg(Ack, s + 1, Some(c_next), 509, None);
    assert_eq!(outbound(f, sport, acked, b"", now), FWD);
    (c_next, s + 1)
}

pub fn state_of(f: &Filter, sport: u16) -> TcpState {
    let key = FlowKey::from_packet(
        T1,
        Direction::Ingress,
        IpVersion::V4,
        Protocol::Tcp,
        v4(CLIENT_IP),
        v4(TENANT_IP),
        sport,
        PORT,
    );
    f.conntrack()
        .iter()
        .find(|s| s.key() == Some(key))
        .map(|s| s.tcp_state())
        .expect("flow tracked")
}

/// A small deterministic generator (xorshift) for attacker-chosen numbers.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
}
