//! What an attributed socket operation means for the firewall: whether the policy governs it at
//! all, and the verdict rules an allowed call opens on the tiers.
//!
//! Owns: the address families under the policy, the mapping of an allowed connect, sendmsg, bind
//! or listen to `vigil-wire` rules (direction, protocol, addresses, ports, the dual-stack
//! wildcard).
//! Must not: touch guest memory, registers or the outbox (it works on an [`Attribution`] already
//! read), or decide allow/deny (the tenant's policy does).

use std::net::IpAddr;

use trap_handler::attribution::{Attribution, SocketOp};
use vigil_wire::verdict::{Direction, IpVersion, Protocol, Rule};

/// Address families under the policy: every one but the local ones, AF_UNIX (1) and AF_NETLINK
/// (16), which are allowed and logged. AF_INET, AF_INET6 and AF_PACKET reach the network, and so
/// may families Vigil has no rules for (AF_XDP, AF_VSOCK...): governed, they are denied (IP rules
/// match IP sockets only, packet rules AF_PACKET only).
#[inline]
pub(super) fn governed_family(family: u16) -> bool {
    !matches!(family, 1 | 16)
}

/// The verdict record an allowed operation opens, if its protocol is one the tiers filter.
pub(super) fn verdict_rule(a: &Attribution) -> Option<Rule> {
    let protocol = Protocol::from_u8(u8::try_from(a.protocol).ok()?)?;
    // An IPv4-mapped address (`::ffff:a.b.c.d` on a dual-stack socket) is IPv4 on the wire.
    let addr = match a.addr? {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let (ip_version, addr) = match addr {
        IpAddr::V4(v4) => {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            (IpVersion::V4, bytes)
        }
        IpAddr::V6(v6) => (IpVersion::V6, v6.octets()),
    };
    let port = a.port.unwrap_or(0);
    let mut rule = match a.op {
        SocketOp::Connect | SocketOp::Sendmsg => Rule::egress_to(ip_version, protocol, addr, port),
        SocketOp::Bind | SocketOp::Listen => {
            let mut rule = Rule::any(Direction::Ingress, ip_version, protocol);
            rule.local_addr = addr;
            rule.local_port = port;
            rule
        }
    };
    if protocol.is_icmp() {
        // ICMP has no ports: the echo identifier is not known at connect time.
        rule.local_port = 0;
        rule.remote_port_min = 0;
        rule.remote_port_max = u16::MAX;
    }
    Some(rule)
}

/// The rules one call opens (at most two), held without an allocation: the trap path makes
/// one per allowed call. Reads as a slice.
pub(super) struct CallRules {
    rules: [Rule; 2],
    len: usize,
}

impl std::ops::Deref for CallRules {
    type Target = [Rule];
    fn deref(&self) -> &[Rule] {
        &self.rules[..self.len]
    }
}

/// Every rule an allowed call opens: its own, and for a bind/listen on the IPv6 wildcard the
/// IPv4 wildcard too (Linux sockets are dual-stack unless IPV6_V6ONLY or bindv6only say
/// otherwise, and then IPv4 peers reach them as well).
pub(super) fn verdict_rules(a: &Attribution) -> CallRules {
    let Some(rule) = verdict_rule(a) else {
        let none = Rule::any(Direction::Egress, IpVersion::V4, Protocol::Tcp);
        return CallRules {
            rules: [none; 2],
            len: 0,
        };
    };
    let mut v4 = rule;
    v4.ip_version = IpVersion::V4;
    let dual_stack = rule.direction == Direction::Ingress
        && rule.ip_version == IpVersion::V6
        && rule.local_addr == [0; 16];
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

    #[test]
    fn connect_opens_exactly_one_remote_endpoint() {
        let rule = verdict_rule(&attribution(SocketOp::Connect, "10.77.0.1", 8080, 6)).unwrap();
        assert_eq!(rule.direction, Direction::Egress);
        assert_eq!(rule.protocol, Protocol::Tcp);
        assert_eq!(rule.remote_prefix, 32);
        assert_eq!(
            &rule.remote_addr[..4],
            &Ipv4Addr::new(10, 77, 0, 1).octets()
        );
        assert_eq!((rule.remote_port_min, rule.remote_port_max), (8080, 8080));
        assert_eq!(rule.local_port, 0);
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
    }

    #[test]
    fn a_dual_stack_wildcard_listener_opens_both_versions_and_mapped_addresses_are_ipv4() {
        let rules = verdict_rules(&attribution(SocketOp::Listen, "::", 7000, 6));
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].ip_version, IpVersion::V6);
        assert_eq!(rules[1].ip_version, IpVersion::V4);
        assert!(rules
            .iter()
            .all(|r| r.local_port == 7000 && r.direction == Direction::Ingress));
        // A specific IPv6 address is IPv6 only.
        assert_eq!(
            verdict_rules(&attribution(SocketOp::Bind, "fd00::2", 7000, 6)).len(),
            1
        );
        // connect() to ::ffff:10.0.0.1 is an IPv4 flow.
        let mapped = verdict_rules(&attribution(SocketOp::Connect, "::ffff:10.0.0.1", 80, 6));
        assert_eq!(mapped.len(), 1);
        assert_eq!(mapped[0].ip_version, IpVersion::V4);
        assert_eq!(&mapped[0].remote_addr[..4], &[10, 0, 0, 1]);
    }

    #[test]
    fn bind_opens_the_local_port_to_any_remote() {
        let rule = verdict_rule(&attribution(SocketOp::Bind, "0.0.0.0", 8050, 6)).unwrap();
        assert_eq!(rule.direction, Direction::Ingress);
        assert_eq!(rule.local_port, 8050);
        assert_eq!(rule.remote_prefix, 0);
        assert_eq!((rule.remote_port_min, rule.remote_port_max), (0, u16::MAX));
    }

    #[test]
    fn sendmsg_with_a_destination_opens_an_egress_like_connect() {
        let send = verdict_rule(&attribution(SocketOp::Sendmsg, "10.0.0.9", 53, 17)).unwrap();
        let connect = verdict_rule(&attribution(SocketOp::Connect, "10.0.0.9", 53, 17)).unwrap();
        assert_eq!(send, connect);
        assert_eq!(send.protocol, Protocol::Udp);
        assert_eq!(send.direction, Direction::Egress);
    }

    #[test]
    fn icmp_opens_every_port() {
        let rule = verdict_rule(&attribution(SocketOp::Connect, "10.0.0.1", 7, 1)).unwrap();
        assert!(rule.protocol.is_icmp());
        assert_eq!(rule.local_port, 0);
        assert_eq!((rule.remote_port_min, rule.remote_port_max), (0, u16::MAX));
    }

    #[test]
    fn unfiltered_protocols_and_addressless_calls_produce_no_record() {
        assert!(verdict_rule(&attribution(SocketOp::Connect, "10.0.0.1", 1, 132)).is_none());
        let mut no_addr = attribution(SocketOp::Connect, "10.0.0.1", 1, 6);
        no_addr.addr = None;
        assert!(verdict_rule(&no_addr).is_none());
        assert!(verdict_rules(&no_addr).is_empty());
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
