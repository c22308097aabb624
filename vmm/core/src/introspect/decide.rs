//! What an attributed socket operation means for the firewall: whether the policy governs it at
//! all, and the verdict rules an allowed call opens on the tiers.
//!
//! Owns: the address families under the policy, the mapping of an allowed connect, sendmsg, bind
//! or listen to `vigil-wire` rules (direction, protocol, addresses, ports, the dual-stack
//! wildcard), whether that call must wait for its local port (see `ports`), and which question
//! the policy is asked at the hook ([`hook_verdict`]: a listen whose port is not known yet).
//!
//! One verdict, one flow: a connect or sendto opens exactly its socket's flow (protocol, both
//! addresses, both ports), a bind or listen exactly its local port. A port the kernel has not
//! assigned yet is never written as 0 ("any"): the call waits for it at a port point, or opens
//! nothing (a `bind(:0)`: the port it gets later opens when it listens; a UDP socket bound to
//! :0 receives only replies to its own sends, which conntrack passes). Raw sockets open nothing:
//! they write their own headers, so no verdict could say which flow they mean.
//! Must not: touch guest memory, registers or the outbox (it works on an [`Attribution`] already
//! read), or decide allow/deny by itself (the tenant's policy does).

use std::net::IpAddr;

use trap_handler::attribution::{Attribution, SocketOp};
use trap_handler::policy::{Policy, Verdict};
use vigil_wire::verdict::{Direction, IpVersion, Protocol, Rule};

use super::ports::{unmapped, PortPoint, SockEnds};

/// `SOCK_STREAM`, `SOCK_RAW` (include/linux/net.h).
const SOCK_STREAM: u16 = 1;
const SOCK_RAW: u16 = 3;

/// Address families under the policy: every one but the local ones, AF_UNIX (1) and AF_NETLINK
/// (16), which are allowed and logged. AF_INET, AF_INET6 and AF_PACKET reach the network, and so
/// may families Vigil has no rules for (AF_XDP, AF_VSOCK...): governed, they are denied (IP rules
/// match IP sockets only, packet rules AF_PACKET only).
#[inline]
pub(super) fn governed_family(family: u16) -> bool {
    !matches!(family, 1 | 16)
}

/// What the policy says of an attributed call at its hook, given where it would wait for its
/// port (`wait`, from [`port_point`]). The firewall governs network flows: local IPC and
/// configuration sockets (unix, netlink) are allowed, and still logged; AF_PACKET is raw network
/// access and stays under the policy. A `listen()` on a socket never bound is decided at its
/// port point, with the port the kernel assigns; here it is refused at once unless some rule of
/// the caller's identity could allow a port (a call no port could be allowed to must not hold a
/// slot of the bounded table of waiting calls: a process could fill it with listens that never
/// reach their port point, and every other process's calls would be refused).
pub(super) fn hook_verdict(
    policy: &Policy,
    a: &mut Attribution,
    wait: Option<PortPoint>,
) -> Verdict {
    if !governed_family(a.family) {
        return Verdict::Allow;
    }
    if wait == Some(PortPoint::Listening) {
        return policy.could_allow_some_port(a);
    }
    policy.decide_noting(a)
}

/// Where an allowed call must wait for its local port before its verdict can say which flow it
/// opens (`ends`: its socket's ends now, where they could be read), or `None` when it can be
/// issued now (or opens nothing).
pub(super) fn port_point(a: &Attribution, ends: Option<&SockEnds>) -> Option<PortPoint> {
    let local_port = ends.map_or(0, |e| e.local_port);
    match (a.op, Protocol::from_u8(u8::try_from(a.protocol).ok()?)?) {
        _ if a.sock_type == SOCK_RAW => None,
        // A TCP connect (or a Fast Open sendto) learns its source address and port in
        // tcp_v4_connect / tcp_v6_connect: always at tcp_connect. A sendto on a connected
        // stream opens no new flow ([`hook_rules`]).
        (SocketOp::Connect, Protocol::Tcp) if a.sock_type == SOCK_STREAM => {
            Some(PortPoint::TcpConnect)
        }
        (SocketOp::Sendmsg, Protocol::Tcp)
            if a.sock_type == SOCK_STREAM && ends.is_some_and(|e| e.remote_port == 0) =>
        {
            Some(PortPoint::TcpConnect)
        }
        (SocketOp::Connect | SocketOp::Sendmsg, Protocol::Udp) if local_port == 0 => {
            Some(PortPoint::UdpSend)
        }
        (SocketOp::Listen, Protocol::Tcp) if a.port.unwrap_or(0) == 0 => Some(PortPoint::Listening),
        _ => None,
    }
}

/// The verdict record an allowed operation opens, if its protocol is one the tiers filter and
/// its flow is known: for a connect or sendmsg, `ends` must hold the socket's local port (its
/// local address, where specified, too); for a bind or listen, the attribution's own port.
pub(super) fn verdict_rule(a: &Attribution, ends: Option<&SockEnds>) -> Option<Rule> {
    if a.sock_type == SOCK_RAW {
        return None;
    }
    let protocol = Protocol::from_u8(u8::try_from(a.protocol).ok()?)?;
    // An IPv4-mapped address (`::ffff:a.b.c.d` on a dual-stack socket) is IPv4 on the wire.
    let (ip_version, addr) = wire_addr(unmapped(a.addr?));
    let port = a.port.unwrap_or(0);
    let mut rule = match a.op {
        _ if protocol.is_icmp() => {
            // ICMP has no ports: the echo identifier is not known at connect time. An explicit
            // wildcard.
            let direction = match a.op {
                SocketOp::Connect | SocketOp::Sendmsg => Direction::Egress,
                SocketOp::Bind | SocketOp::Listen => Direction::Ingress,
            };
            let mut rule = Rule::any_port(direction, ip_version, protocol);
            if direction == Direction::Egress {
                rule.remote_addr = addr;
                rule.remote_prefix = ip_version.addr_bits();
            } else {
                rule.local_addr = addr;
            }
            return Some(rule);
        }
        SocketOp::Connect | SocketOp::Sendmsg => {
            let ends = ends.filter(|e| e.local_port != 0)?;
            // The local address where the socket has one of the flow's version; otherwise any
            // of the tenant's own (the switch admits no other source).
            let local = ends
                .local
                .map(|l| wire_addr(unmapped(l)))
                .filter(|(v, _)| *v == ip_version)
                .map_or([0; 16], |(_, l)| l);
            Rule::egress_flow(ip_version, protocol, local, ends.local_port, addr, port)
        }
        SocketOp::Bind | SocketOp::Listen => {
            if port == 0 {
                // bind(:0): the port is not known; it opens when the socket listens.
                return None;
            }
            let mut rule = Rule::any(Direction::Ingress, ip_version, protocol);
            rule.local_addr = addr;
            rule.local_port = port;
            rule
        }
    };
    rule.any_local_port = false;
    Some(rule)
}

/// An address in the verdict encoding (IPv4 in the first 4 bytes).
fn wire_addr(addr: IpAddr) -> (IpVersion, [u8; 16]) {
    match addr {
        IpAddr::V4(v4) => {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            (IpVersion::V4, bytes)
        }
        IpAddr::V6(v6) => (IpVersion::V6, v6.octets()),
    }
}

/// The rules one allowed call opens, without a heap allocation on the trap path: at most two,
/// one per allowed call. Reads as a slice.
pub(super) struct CallRules {
    rules: [Rule; 2],
    len: usize,
}

impl CallRules {
    /// No rule (a call that opens nothing).
    pub(super) fn none() -> CallRules {
        let none = Rule::any(Direction::Egress, IpVersion::V4, Protocol::Tcp);
        CallRules {
            rules: [none; 2],
            len: 0,
        }
    }
}

impl std::ops::Deref for CallRules {
    type Target = [Rule];
    fn deref(&self) -> &[Rule] {
        &self.rules[..self.len]
    }
}

/// The rules an allowed call that waits for no port point opens at its hook. A `sendmsg` on a
/// stream socket opens none: waiting for no port point, the socket is connected already
/// (`port_point` sends an unconnected one's Fast Open `sendto` to `tcp_connect`), and the
/// kernel sends on a connected stream to its peer whatever `msg_name` says (`tcp_sendmsg`
/// ignores it; with `MSG_FASTOPEN` the call fails with `EISCONN`). The flow it uses is the one
/// its connect opened; a rule from the socket's port to the named address would open a flow
/// that does not exist, and spend the tenant's quota on it.
pub(super) fn hook_rules(a: &Attribution, ends: Option<&SockEnds>) -> CallRules {
    if a.op == SocketOp::Sendmsg && a.sock_type == SOCK_STREAM {
        return CallRules::none();
    }
    verdict_rules(a, ends)
}

/// Every rule an allowed call opens: its own, and for a bind/listen on the IPv6 wildcard of a
/// dual-stack socket the IPv4 wildcard too (Linux sockets are dual-stack unless IPV6_V6ONLY or
/// bindv6only say otherwise, and then IPv4 peers reach them as well). An IPv6-only socket opens
/// no IPv4 port: that port is not its own, and whatever other socket held it (a UDP socket
/// another process had autobound there, by a send that names no destination and so reaches no
/// decision) received what came to it.
pub(super) fn verdict_rules(a: &Attribution, ends: Option<&SockEnds>) -> CallRules {
    let Some(rule) = verdict_rule(a, ends) else {
        return CallRules::none();
    };
    let mut v4 = rule;
    v4.ip_version = IpVersion::V4;
    let dual_stack = rule.direction == Direction::Ingress
        && rule.ip_version == IpVersion::V6
        && rule.local_addr == [0; 16]
        && rule.protocol != Protocol::Icmpv6
        && !a.v6only;
    CallRules {
        rules: [rule, v4],
        len: if dual_stack { 2 } else { 1 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use trap_handler::attribution::Process;
    use vigil_wire::verdict::{Op, VerdictRepr};

    fn attribution(op: SocketOp, addr: &str, port: u16, protocol: u16) -> Attribution {
        Attribution {
            op,
            family: 2,
            sock_type: 1,
            protocol,
            addr: Some(addr.parse().unwrap()),
            port: Some(port),
            foreign_sockaddr: None,
            v6only: false,
            process: Process {
                pid: 7,
                tgid: 7,
                comm: "nc".into(),
                exe: Some("/bin/busybox".into()),
                uid: 0,
                ppid: 1,
                parent_comm: "sh".into(),
                exe_file: None,
                exe_error: None,
            },
            identity_error: None,
        }
    }

    fn ends(local: &str, local_port: u16) -> SockEnds {
        SockEnds {
            local: Some(local.parse().unwrap()),
            local_port,
            remote: None,
            remote_port: 0,
        }
    }

    #[test]
    fn connect_opens_exactly_one_flow() {
        let a = attribution(SocketOp::Connect, "10.77.0.1", 8080, 6);
        // Before the kernel picked the source port: nothing yet, the call waits at tcp_connect.
        assert_eq!(port_point(&a, None), Some(PortPoint::TcpConnect));
        assert!(verdict_rule(&a, None).is_none());
        assert!(verdict_rule(&a, Some(&ends("10.77.0.2", 0))).is_none());
        let rule = verdict_rule(&a, Some(&ends("10.77.0.2", 40_000))).unwrap();
        assert_eq!(rule.direction, Direction::Egress);
        assert_eq!(rule.protocol, Protocol::Tcp);
        assert_eq!(rule.remote_prefix, 32);
        assert_eq!(
            &rule.remote_addr[..4],
            &Ipv4Addr::new(10, 77, 0, 1).octets()
        );
        assert_eq!((rule.remote_port_min, rule.remote_port_max), (8080, 8080));
        assert_eq!((rule.local_port, rule.any_local_port), (40_000, false));
        assert_eq!(&rule.local_addr[..4], &[10, 77, 0, 2]);
        assert!(rule.local_port_matches(40_000) && !rule.local_port_matches(40_001));
        // The record round-trips through the wire format the tiers parse.
        let record = VerdictRepr {
            op: Op::Add,
            tenant: 9,
            seq: 1,
            lifetime_ms: 1,
            rule,
        }
        .to_bytes();
        assert_eq!(VerdictRepr::from_bytes(&record).unwrap().rule, rule);
        // A local address of the other version (a dual-stack socket) is "any of the tenant's".
        let mapped = verdict_rule(&a, Some(&ends("::", 40_000))).unwrap();
        assert_eq!(mapped.local_addr, [0; 16]);
    }

    #[test]
    fn a_dual_stack_wildcard_listener_opens_both_versions_and_mapped_addresses_are_ipv4() {
        let rules = verdict_rules(&attribution(SocketOp::Listen, "::", 7000, 6), None);
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].ip_version, IpVersion::V6);
        assert_eq!(rules[1].ip_version, IpVersion::V4);
        assert!(rules.iter().all(|r| r.local_port == 7000
            && !r.any_local_port
            && r.direction == Direction::Ingress));
        // A specific IPv6 address is IPv6 only.
        assert_eq!(
            verdict_rules(&attribution(SocketOp::Bind, "fd00::2", 7000, 6), None).len(),
            1
        );
        // So is the wildcard of an IPV6_V6ONLY socket, TCP or UDP, bound or listening: the
        // IPv4 port is another socket's.
        for (op, proto) in [
            (SocketOp::Bind, 17),
            (SocketOp::Listen, 6),
            (SocketOp::Bind, 6),
        ] {
            let mut v6only = attribution(op, "::", 7000, proto);
            v6only.v6only = true;
            let rules = verdict_rules(&v6only, None);
            assert_eq!(rules.len(), 1, "{op:?} {proto}");
            assert_eq!(rules[0].ip_version, IpVersion::V6);
        }
        // connect() to ::ffff:10.0.0.1 is an IPv4 flow.
        let mapped = verdict_rules(
            &attribution(SocketOp::Connect, "::ffff:10.0.0.1", 80, 6),
            Some(&ends("10.0.0.2", 5000)),
        );
        assert_eq!(mapped.len(), 1);
        assert_eq!(mapped[0].ip_version, IpVersion::V4);
        assert_eq!(&mapped[0].remote_addr[..4], &[10, 0, 0, 1]);
    }

    #[test]
    fn bind_opens_the_local_port_to_any_remote() {
        let rule = verdict_rule(&attribution(SocketOp::Bind, "0.0.0.0", 8050, 6), None).unwrap();
        assert_eq!(rule.direction, Direction::Ingress);
        assert_eq!((rule.local_port, rule.any_local_port), (8050, false));
        assert_eq!(rule.remote_prefix, 0);
        assert_eq!((rule.remote_port_min, rule.remote_port_max), (0, u16::MAX));
    }

    #[test]
    fn port_zero_never_opens_every_port() {
        // bind(:0), TCP or UDP: nothing now (the port is not known), and no port point: a TCP
        // socket opens its port when it listens, a UDP one gets only replies to its sends.
        for proto in [6, 17] {
            let bind0 = attribution(SocketOp::Bind, "0.0.0.0", 0, proto);
            assert!(verdict_rules(&bind0, None).is_empty(), "{proto}");
            assert_eq!(port_point(&bind0, None), None);
        }
        // listen() on a socket never bound: decided where the kernel assigns the port.
        let listen0 = attribution(SocketOp::Listen, "0.0.0.0", 0, 6);
        assert!(verdict_rules(&listen0, None).is_empty());
        assert_eq!(port_point(&listen0, None), Some(PortPoint::Listening));
        // A listen on a bound socket opens its port at once.
        let listen = attribution(SocketOp::Listen, "0.0.0.0", 7000, 6);
        assert_eq!(port_point(&listen, None), None);
        assert_eq!(verdict_rules(&listen, None)[0].local_port, 7000);
        // A UDP sendto from an unbound socket waits for the autobind; a bound one does not.
        let send = attribution(SocketOp::Sendmsg, "10.0.0.9", 53, 17);
        assert_eq!(
            port_point(&send, Some(&ends("0.0.0.0", 0))),
            Some(PortPoint::UdpSend)
        );
        assert_eq!(port_point(&send, Some(&ends("0.0.0.0", 33_000))), None);
        let rule = verdict_rule(&send, Some(&ends("0.0.0.0", 33_000))).unwrap();
        assert_eq!((rule.local_addr, rule.local_port), ([0; 16], 33_000));
    }

    /// A listen() on a socket never bound waits for its port only where some rule of the
    /// caller's identity could allow one: otherwise it is refused at its hook, and holds no
    /// slot of the waiting table (a process could fill the table with listens whose port point
    /// never comes).
    #[test]
    fn a_listen_no_port_could_be_allowed_to_is_refused_at_its_hook() {
        let policy = Policy::from_json(
            r#"{"allow": [{"op": "listen", "comm": "httpd", "protocol": "tcp", "ports": "7000"}]}"#,
        )
        .unwrap();
        let mut listen0 = attribution(SocketOp::Listen, "0.0.0.0", 0, 6);
        let wait = port_point(&listen0, None);
        assert_eq!(wait, Some(PortPoint::Listening));
        assert_eq!(hook_verdict(&policy, &mut listen0, wait), Verdict::Deny);
        // A process some rule could allow: it waits, and its port point decides the port.
        listen0.process.comm = "httpd".into();
        assert_eq!(hook_verdict(&policy, &mut listen0, wait), Verdict::Allow);
        assert_eq!(policy.decide(&listen0), Verdict::Deny, "port 0 is no grant");
        // Any other call is decided at once, with its own port.
        let mut listen = attribution(SocketOp::Listen, "0.0.0.0", 7001, 6);
        listen.process.comm = "httpd".into();
        assert_eq!(hook_verdict(&policy, &mut listen, None), Verdict::Deny);
        listen.port = Some(7000);
        assert_eq!(hook_verdict(&policy, &mut listen, None), Verdict::Allow);
        // Local sockets are not governed.
        let mut unix = attribution(SocketOp::Listen, "0.0.0.0", 0, 0);
        unix.family = 1;
        assert_eq!(hook_verdict(&policy, &mut unix, None), Verdict::Allow);
    }

    #[test]
    fn raw_sockets_open_nothing() {
        let mut raw = attribution(SocketOp::Sendmsg, "10.0.0.9", 80, 6);
        raw.sock_type = 3;
        assert!(verdict_rules(&raw, Some(&ends("10.0.0.2", 6))).is_empty());
        assert_eq!(port_point(&raw, None), None);
    }

    #[test]
    fn a_sendto_on_a_connected_stream_opens_no_new_flow() {
        // sendto(10.0.0.9:80) on a stream connected to 10.0.0.1:443 from port 40000: the data
        // goes to 10.0.0.1:443; no flow from 40000 to 10.0.0.9:80 exists to open.
        let send = attribution(SocketOp::Sendmsg, "10.0.0.9", 80, 6);
        let mut connected = ends("10.0.0.2", 40_000);
        connected.remote = Some("10.0.0.1".parse().unwrap());
        connected.remote_port = 443;
        assert_eq!(port_point(&send, Some(&connected)), None);
        assert!(hook_rules(&send, Some(&connected)).is_empty());
        // A datagram socket's sendto does open its flow, and a connect its own.
        let mut dgram = attribution(SocketOp::Sendmsg, "10.0.0.9", 53, 17);
        dgram.sock_type = 2;
        let mut bound = ends("10.0.0.2", 33_000);
        bound.remote_port = 0;
        assert_eq!(hook_rules(&dgram, Some(&bound)).len(), 1);
        let connect = attribution(SocketOp::Connect, "10.0.0.9", 53, 17);
        assert_eq!(hook_rules(&connect, Some(&bound)).len(), 1);
        // An unconnected stream's sendto (TCP Fast Open) connects: it waits for tcp_connect,
        // where its flow opens once the kernel has given it its source port.
        let mut unconnected = ends("0.0.0.0", 0);
        unconnected.remote_port = 0;
        assert_eq!(
            port_point(&send, Some(&unconnected)),
            Some(PortPoint::TcpConnect)
        );
    }

    #[test]
    fn sendmsg_with_a_destination_opens_an_egress_like_connect() {
        let e = ends("10.0.0.2", 33_000);
        let send = verdict_rule(
            &attribution(SocketOp::Sendmsg, "10.0.0.9", 53, 17),
            Some(&e),
        )
        .unwrap();
        let connect = verdict_rule(
            &attribution(SocketOp::Connect, "10.0.0.9", 53, 17),
            Some(&e),
        )
        .unwrap();
        assert_eq!(send, connect);
        assert_eq!(send.protocol, Protocol::Udp);
        assert_eq!(send.direction, Direction::Egress);
    }

    #[test]
    fn icmp_opens_every_echo_identifier_explicitly() {
        let rule = verdict_rule(&attribution(SocketOp::Connect, "10.0.0.1", 7, 1), None).unwrap();
        assert!(rule.protocol.is_icmp());
        assert!(rule.any_local_port && rule.local_port == 0);
        assert_eq!(rule.remote_prefix, 32);
        assert_eq!((rule.remote_port_min, rule.remote_port_max), (0, u16::MAX));
    }

    #[test]
    fn unfiltered_protocols_and_addressless_calls_produce_no_record() {
        let e = ends("10.0.0.2", 1000);
        assert!(verdict_rule(
            &attribution(SocketOp::Connect, "10.0.0.1", 1, 132),
            Some(&e)
        )
        .is_none());
        let mut no_addr = attribution(SocketOp::Connect, "10.0.0.1", 1, 6);
        no_addr.addr = None;
        assert!(verdict_rule(&no_addr, Some(&e)).is_none());
        assert!(verdict_rules(&no_addr, Some(&e)).is_empty());
    }

    #[test]
    fn only_network_families_are_governed() {
        assert!(governed_family(2) && governed_family(10) && governed_family(17));
        // Families without rules of their own reach the network or the host: governed (denied).
        assert!(
            governed_family(44) && governed_family(40) && governed_family(0),
            "xdp, vsock"
        );
        assert!(
            !governed_family(1) && !governed_family(16),
            "unix and netlink are local"
        );
    }
}
