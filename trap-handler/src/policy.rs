//! Per-tenant allow-list: default deny; a rule allows an operation by executable path (or, as an
//! explicit weaker option, by comm), protocol, address range and port range.
//!
//! Lookup cost does not grow with the list: rules are indexed by (operation, executable) and only
//! the rules of that bucket (and the comm bucket) are tried.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::attribution::{Attribution, SocketOp};
use crate::profile::abi;

#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("policy is not valid JSON for Vigil's schema: {0}")]
    Json(#[from] serde_json::Error),
    #[error("rule {index}: {message}")]
    Rule { index: usize, message: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Any,
}

/// One rule as written in the policy file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub op: SocketOp,
    /// Executable path, matched exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// Process name (comm): weaker, a process can rename itself. Only used when `exe` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(default = "any_protocol")]
    pub protocol: Protocol,
    /// Address range, e.g. "10.0.0.0/8" (remote for connect, local for bind/listen). Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Port range "443" or "8000-8080". Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<String>,
}

fn any_protocol() -> Protocol {
    Protocol::Any
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub allow: Vec<RuleSpec>,
}

#[derive(Clone, Debug)]
struct Rule {
    protocol: Protocol,
    net: Option<(IpAddr, u8)>,
    ports: Option<(u16, u16)>,
}

/// A compiled policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    by_exe: HashMap<(SocketOp, String), Vec<Rule>>,
    by_comm: HashMap<(SocketOp, String), Vec<Rule>>,
}

fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = text.split_once('/').unwrap_or((text, ""));
    let addr: IpAddr = addr.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = if len.is_empty() {
        max
    } else {
        len.parse().ok()?
    };
    (len <= max).then_some((addr, len))
}

fn parse_ports(text: &str) -> Option<(u16, u16)> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let (low, high): (u16, u16) = (low.trim().parse().ok()?, high.trim().parse().ok()?);
    (low <= high).then_some((low, high))
}

fn in_cidr(addr: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl Rule {
    fn matches(&self, a: &Attribution) -> bool {
        let protocol_ok = match self.protocol {
            Protocol::Any => true,
            // By the socket's protocol, not its type: SCTP and MPTCP are stream sockets too.
            Protocol::Tcp => a.protocol == abi::IPPROTO_TCP,
            Protocol::Udp => a.protocol == abi::IPPROTO_UDP,
        };
        let net_ok = match (self.net, a.addr) {
            (None, _) => true,
            (Some(net), Some(addr)) => in_cidr(addr, net),
            (Some(_), None) => false,
        };
        let ports_ok = match (self.ports, a.port) {
            (None, _) => true,
            (Some((low, high)), Some(port)) => (low..=high).contains(&port),
            (Some(_), None) => false,
        };
        protocol_ok && net_ok && ports_ok
    }
}

impl Policy {
    pub fn from_json(text: &str) -> Result<Policy, PolicyError> {
        Policy::compile(&serde_json::from_str(text)?)
    }

    pub fn compile(spec: &PolicySpec) -> Result<Policy, PolicyError> {
        let mut policy = Policy::default();
        for (index, r) in spec.allow.iter().enumerate() {
            let bad = |message: &str| PolicyError::Rule {
                index,
                message: message.to_string(),
            };
            let net = r
                .cidr
                .as_deref()
                .map(|c| {
                    parse_cidr(c).ok_or_else(|| bad(&format!("`{c}` is not an address range")))
                })
                .transpose()?;
            let ports = r
                .ports
                .as_deref()
                .map(|p| parse_ports(p).ok_or_else(|| bad(&format!("`{p}` is not a port range"))))
                .transpose()?;
            let rule = Rule {
                protocol: r.protocol,
                net,
                ports,
            };
            match (&r.exe, &r.comm) {
                (Some(exe), _) => policy
                    .by_exe
                    .entry((r.op, exe.clone()))
                    .or_default()
                    .push(rule),
                (None, Some(comm)) => policy
                    .by_comm
                    .entry((r.op, comm.clone()))
                    .or_default()
                    .push(rule),
                (None, None) => return Err(bad("a rule names `exe` (or, weaker, `comm`)")),
            }
        }
        Ok(policy)
    }

    /// Default deny: allowed only if a rule of the process's executable (or comm) matches.
    /// A `sendmsg` that names its destination (UDP `sendto`, TCP Fast Open) is decided by the
    /// `connect` rules: it reaches that destination just as a connect would.
    pub fn decide(&self, a: &Attribution) -> Verdict {
        let op = match a.op {
            SocketOp::Sendmsg => SocketOp::Connect,
            other => other,
        };
        let by_exe = a
            .process
            .exe
            .as_ref()
            .and_then(|exe| self.by_exe.get(&(op, exe.clone())));
        let by_comm = self.by_comm.get(&(op, a.process.comm.clone()));
        let allowed = by_exe
            .into_iter()
            .chain(by_comm)
            .flatten()
            .any(|rule| rule.matches(a));
        if allowed {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::Process;

    fn attribution(op: SocketOp, exe: &str, comm: &str, addr: &str, port: u16) -> Attribution {
        Attribution {
            op,
            family: abi::AF_INET,
            sock_type: abi::SOCK_STREAM,
            protocol: abi::IPPROTO_TCP,
            addr: Some(addr.parse().unwrap()),
            port: Some(port),
            process: Process {
                pid: 10,
                tgid: 10,
                comm: comm.into(),
                exe: Some(exe.into()),
                uid: 0,
                ppid: 1,
                parent_comm: "sh".into(),
            },
        }
    }

    const POLICY: &str = r#"{"allow": [
        {"op": "connect", "exe": "/bin/busybox", "protocol": "tcp", "cidr": "10.77.0.0/24", "ports": "8080"},
        {"op": "bind", "comm": "httpd", "ports": "8000-8099"}
    ]}"#;

    #[test]
    fn default_deny_and_exact_matches() {
        let policy = Policy::from_json(POLICY).unwrap();
        let ok = attribution(SocketOp::Connect, "/bin/busybox", "nc", "10.77.0.1", 8080);
        assert_eq!(policy.decide(&ok), Verdict::Allow);
        for denied in [
            attribution(SocketOp::Connect, "/bin/busybox", "nc", "10.77.1.1", 8080),
            attribution(SocketOp::Connect, "/bin/busybox", "nc", "10.77.0.1", 8081),
            attribution(SocketOp::Connect, "/bin/other", "nc", "10.77.0.1", 8080),
            attribution(SocketOp::Bind, "/bin/busybox", "nc", "10.77.0.1", 8080),
        ] {
            assert_eq!(policy.decide(&denied), Verdict::Deny, "{denied:?}");
        }
        assert_eq!(
            policy.decide(&attribution(SocketOp::Bind, "/x", "httpd", "0.0.0.0", 8050)),
            Verdict::Allow
        );
    }

    #[test]
    fn sendto_is_decided_by_connect_rules_and_protocols_by_protocol_number() {
        let policy = Policy::from_json(POLICY).unwrap();
        let sendto = attribution(SocketOp::Sendmsg, "/bin/busybox", "nc", "10.77.0.1", 8080);
        assert_eq!(policy.decide(&sendto), Verdict::Allow);
        let elsewhere = attribution(SocketOp::Sendmsg, "/bin/busybox", "nc", "10.9.9.9", 8080);
        assert_eq!(policy.decide(&elsewhere), Verdict::Deny);
        // An SCTP stream socket is not TCP.
        let mut sctp = attribution(SocketOp::Connect, "/bin/busybox", "nc", "10.77.0.1", 8080);
        sctp.protocol = 132;
        assert_eq!(policy.decide(&sctp), Verdict::Deny);
    }

    #[test]
    fn bad_policies_are_clear_errors() {
        assert!(matches!(Policy::from_json("{"), Err(PolicyError::Json(_))));
        assert!(matches!(
            Policy::from_json(r#"{"allow": [{"op": "connect"}]}"#),
            Err(PolicyError::Rule { index: 0, .. })
        ));
        assert!(Policy::from_json(
            r#"{"allow": [{"op": "connect", "exe": "/a", "cidr": "10.0.0.0/40"}]}"#
        )
        .is_err());
        assert!(Policy::from_json(
            r#"{"allow": [{"op": "connect", "exe": "/a", "ports": "9-1"}]}"#
        )
        .is_err());
        assert!(Policy::from_json(
            r#"{"allow": [{"op": "connect", "exe": "/a", "colour": "red"}]}"#
        )
        .is_err());
    }
}
