//! Per-tenant allow-list: default deny; a rule allows an operation by executable (or, as an
//! explicit weaker option, by comm), socket family, protocol, address range and port range.
//!
//! An `exe` rule names a file as seen from the tenant's initial mount namespace (init's), and
//! the file is what counts, not the name: the first attributed process whose executable is that
//! path on a mount of init's namespace (not a bind mount) pins the file's identity ([`FileId`]:
//! device, inode, generation, ctime) to the path. Afterwards a process at that path with another
//! identity (mounted over, replaced, renamed onto) gets no rule of it, and a process whose path
//! is anything else (another mount namespace, a hard link) gets the rules of the pinned paths of
//! its file. Either way the calling instruction must be the executable's code
//! ([`CodeOrigin::is_exe_code`]), the file the one `execve` opened, and no other process may
//! steer the task's system calls ([`crate::exec::Steered`]). The pins live as long as the
//! compiled policy.
//!
//! A rule's address range is held against the address on the wire: an IPv4-mapped IPv6
//! address is the IPv4 address a dual-stack socket reaches with it.
//!
//! Lookup cost does not grow with the list: rules are indexed by executable (and comm) and only
//! the rules of those buckets are tried; a decision allocates nothing unless it has to explain
//! an identity failure.

use std::collections::HashMap as StdHashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::attribution::{Attribution, SocketOp};
use crate::exec::FileId;
use crate::profile::abi;

/// The policy's tables, looked up on every hooked call: keyed by paths, comms and file ids the
/// policy names (a guest can only look them up, never add a key, so a keyed-hash DoS does not
/// apply), with foldhash rather than SipHash (three lookups a call: 82-98 ns a decision warm
/// with SipHash).
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

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

/// The sockets a rule is about: IP (AF_INET, AF_INET6; the default) or packet (AF_PACKET: raw
/// frames, never matched by an IP rule, and only by a rule that says `"family": "packet"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Ip,
    Packet,
}

impl Family {
    fn is_ip(&self) -> bool {
        *self == Family::Ip
    }
}

/// One rule as written in the policy file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub op: SocketOp,
    /// Executable path in init's mount namespace; the file found there is pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// Process name (comm): weaker, a process can rename itself. Only used when `exe` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// `ip` (absent) or `packet`; a packet rule has no protocol, cidr or ports.
    #[serde(default, skip_serializing_if = "Family::is_ip")]
    pub family: Family,
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
    op: SocketOp,
    family: Family,
    protocol: Protocol,
    net: Option<(IpAddr, u8)>,
    ports: Option<(u16, u16)>,
}

/// The files pinned to the policy's `exe` paths, both ways.
#[derive(Clone, Debug, Default)]
struct PinTable {
    by_path: HashMap<String, FileId>,
    /// The paths each pinned file answers to (one, or several hard links named by the policy).
    by_id: HashMap<FileId, Vec<String>>,
}

/// The pin table, shared by every vCPU deciding with this policy.
#[derive(Debug, Default)]
struct Pins(Mutex<PinTable>);

impl Pins {
    fn lock(&self) -> std::sync::MutexGuard<'_, PinTable> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clone for Pins {
    fn clone(&self) -> Self {
        Pins(Mutex::new(self.lock().clone()))
    }
}

/// A compiled policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    by_exe: HashMap<String, Vec<Rule>>,
    by_comm: HashMap<String, Vec<Rule>>,
    pins: Pins,
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
    if len > max {
        return None;
    }
    // A range within `::ffff:0:0/96` is a range of IPv4 addresses (see [`on_the_wire`]).
    Some(match addr {
        IpAddr::V6(v6) if len >= 96 && v6.to_ipv4_mapped().is_some() => {
            (on_the_wire(addr), len - 96)
        }
        _ => (addr, len),
    })
}

/// The address as the network sees it: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is the
/// IPv4 address `a.b.c.d`. A dual-stack IPv6 socket given one connects and sends over IPv4
/// (`tcp_v6_connect`, `udpv6_sendmsg` and `ip6_datagram_connect` hand it to the IPv4 code), and
/// the verdict opens that IPv4 flow; so a rule's range is held against this form. Held against
/// the written form, a rule for every IPv6 address (`::/0`) let any IPv4 address through as
/// `::ffff:a.b.c.d` (`curl http://[::ffff:1.2.3.4]/`), and an IPv4 rule missed a mapped address
/// of its own range.
fn on_the_wire(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
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

/// The operation whose rules decide `op`: a `sendmsg` that names its destination is a connect.
fn rule_op(op: SocketOp) -> SocketOp {
    match op {
        SocketOp::Sendmsg => SocketOp::Connect,
        other => other,
    }
}

/// How a rule's port range is held against a call's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortMatch {
    /// The call's own port (the normal decision).
    Exact,
    /// Any port: the kernel has not assigned the call's port yet (a `listen()` on a socket never
    /// bound), so the question is whether some port could be allowed at all.
    Any,
}

impl Rule {
    fn matches(&self, a: &Attribution, port: PortMatch) -> bool {
        if self.op != rule_op(a.op) {
            return false;
        }
        match self.family {
            // Raw frames: the socket's own family, nothing else (no addresses, no protocol).
            Family::Packet => return a.family == abi::AF_PACKET,
            // An IP rule is about IP sockets only, and a sockaddr of another family is no
            // address of theirs.
            Family::Ip => {
                if !matches!(a.family, abi::AF_INET | abi::AF_INET6) || a.foreign_sockaddr.is_some()
                {
                    return false;
                }
            }
        }
        let protocol_ok = match self.protocol {
            Protocol::Any => true,
            // By the socket's protocol, not its type: SCTP and MPTCP are stream sockets too.
            Protocol::Tcp => a.protocol == abi::IPPROTO_TCP,
            Protocol::Udp => a.protocol == abi::IPPROTO_UDP,
        };
        let net_ok = match (self.net, a.addr) {
            (None, _) => true,
            (Some(net), Some(addr)) => in_cidr(on_the_wire(addr), net),
            (Some(_), None) => false,
        };
        let ports_ok = match (self.ports, a.port) {
            (None, _) => true,
            // ICMP has no ports: the port an ICMP socket's sockaddr carries is ignored by the
            // kernel (or is the echo identifier, which its verdict does not carry: it opens
            // every one). A rule that names ports is about protocols that have them.
            (Some(_), _) if matches!(a.protocol, abi::IPPROTO_ICMP | abi::IPPROTO_ICMPV6) => false,
            (Some(_), _) if port == PortMatch::Any => true,
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
            if r.family == Family::Packet
                && (net.is_some() || ports.is_some() || r.protocol != Protocol::Any)
            {
                return Err(bad(
                    "a `\"family\": \"packet\"` rule has no protocol, cidr or ports (raw frames \
                     have none)",
                ));
            }
            let rule = Rule {
                op: rule_op(r.op),
                family: r.family,
                protocol: r.protocol,
                net,
                ports,
            };
            match (&r.exe, &r.comm) {
                (Some(exe), _) => policy.by_exe.entry(exe.clone()).or_default().push(rule),
                (None, Some(comm)) => policy.by_comm.entry(comm.clone()).or_default().push(rule),
                (None, None) => return Err(bad("a rule names `exe` (or, weaker, `comm`)")),
            }
        }
        Ok(policy)
    }

    /// Default deny: allowed only if a rule of the process's executable (see the module doc:
    /// the file, pinned) or of its comm matches. A `sendmsg` that names its destination (UDP
    /// `sendto`, TCP Fast Open) is decided by the `connect` rules: it reaches that destination
    /// just as a connect would.
    pub fn decide(&self, a: &Attribution) -> Verdict {
        self.decide_explained(a).0
    }

    /// [`decide`](Self::decide), recording in `a.identity_error` why the executable's rules did
    /// not apply (for the event).
    pub fn decide_noting(&self, a: &mut Attribution) -> Verdict {
        let (verdict, why) = self.decide_explained(a);
        a.identity_error = why;
        verdict
    }

    /// The verdict, and why the executable's rules did not apply where that is why it was not
    /// allowed by them.
    pub fn decide_explained(&self, a: &Attribution) -> (Verdict, Option<String>) {
        self.decide_matching(a, PortMatch::Exact)
    }

    /// Whether a rule of the caller's identity could allow `a` on *some* port (its port range
    /// aside), recording in `a.identity_error` why the executable's rules did not apply. For a
    /// call whose port the kernel has not assigned yet (a `listen()` on a socket never bound):
    /// `Deny` means no port it could be given is allowed, so the call is refused at once
    /// instead of waiting for its port (a wait that costs a slot of a bounded table); `Allow`
    /// is no grant, the exact port is decided once known ([`decide_noting`](Self::decide_noting)).
    pub fn could_allow_some_port(&self, a: &mut Attribution) -> Verdict {
        let (verdict, why) = self.decide_matching(a, PortMatch::Any);
        a.identity_error = why;
        verdict
    }

    fn decide_matching(&self, a: &Attribution, port: PortMatch) -> (Verdict, Option<String>) {
        // Most policies name executables only: no comm to look up then.
        let by_comm = !self.by_comm.is_empty()
            && self
                .by_comm
                .get(&*a.process.comm.text())
                .is_some_and(|rules| rules.iter().any(|r| r.matches(a, port)));
        let (by_exe, why) = self.exe_allows(a, port);
        let verdict = if by_exe || by_comm {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        (verdict, why)
    }

    /// Whether a rule of the process's executable file allows `a`, and why the executable's
    /// rules did not apply when they did not.
    fn exe_allows(&self, a: &Attribution, port: PortMatch) -> (bool, Option<String>) {
        let Some(path) = a.process.exe.as_deref() else {
            return (false, None);
        };
        let named = self.by_exe.get(path);
        if named.is_none() && self.by_exe.is_empty() {
            return (false, None);
        }
        let Some(file) = &a.process.exe_file else {
            let why = named.map(|_| {
                format!(
                    "{path}: the executable's identity is unknown ({})",
                    a.process.exe_error.as_deref().unwrap_or("not read")
                )
            });
            return (false, why);
        };
        let matches = |rules: &Vec<Rule>| rules.iter().any(|r| r.matches(a, port));
        let mut pins = self.pins.lock();
        let pinned_paths = pins.by_id.get(&file.id).map(Vec::len).unwrap_or(0);
        if named.is_none() && pinned_paths == 0 {
            return (false, None);
        }
        if !file.from_exec {
            return (
                false,
                Some(format!(
                    "{path}: the process named its executable itself (prctl PR_SET_MM), it did \
                     not execute it: its file ({}) lends no identity",
                    file.id
                )),
            );
        }
        if let Some(by) = file.steered {
            return (
                false,
                Some(format!(
                    "{path}: another process steers its system calls ({by:?}): what it makes \
                     the program do lends no identity"
                )),
            );
        }
        if !file.code.is_exe_code() {
            return (
                false,
                Some(format!(
                    "{path}: the calling code ({:?}, rip {:#x}) is not the executable's",
                    file.code, file.rip
                )),
            );
        }
        let mut why = None;
        // The path, as init's mount namespace sees it.
        if let Some(rules) = named {
            if !file.init_mnt_ns {
                why = Some(format!(
                    "{path} is not on a mount of init's mount namespace and its file ({}) is \
                     not pinned to it",
                    file.id
                ));
            } else {
                match pins.by_path.get(path) {
                    Some(pinned) if *pinned == file.id => return (matches(rules), None),
                    Some(pinned) => {
                        why = Some(format!(
                            "identity mismatch: {path} is pinned to {pinned}, this is {}",
                            file.id
                        ))
                    }
                    None if file.bind_mount => {
                        why = Some(format!(
                            "{path} is reached through a bind mount: its file ({}) is not pinned",
                            file.id
                        ))
                    }
                    None => {
                        pins.by_path.insert(path.to_string(), file.id);
                        pins.by_id
                            .entry(file.id)
                            .or_default()
                            .push(path.to_string());
                        return (matches(rules), None);
                    }
                }
            }
        }
        // The file, under whichever names the policy pinned it (a hard link, another namespace).
        if let Some(paths) = pins.by_id.get(&file.id) {
            let allowed = paths.iter().filter_map(|p| self.by_exe.get(p)).any(matches);
            return (allowed, if allowed { None } else { why });
        }
        (false, why)
    }

    /// The file pinned to an `exe` path, if any.
    pub fn pinned(&self, path: &str) -> Option<FileId> {
        self.pins.lock().by_path.get(path).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::Process;
    use crate::exec::{CodeOrigin, ExeFile, Steered};

    fn id(ino: u64) -> FileId {
        FileId {
            dev: 1,
            ino,
            generation: 7,
            ctime_sec: 1_700_000_000,
            ctime_nsec: 5,
        }
    }

    /// The genuine executable's file (inode 100), run from init's mount namespace.
    fn genuine() -> ExeFile {
        ExeFile {
            id: id(100),
            init_mnt_ns: true,
            bind_mount: false,
            code: CodeOrigin::Exe,
            from_exec: true,
            steered: None,
            rip: 0x40_1000,
        }
    }

    fn attribution(op: SocketOp, exe: &str, comm: &str, addr: &str, port: u16) -> Attribution {
        Attribution {
            op,
            family: abi::AF_INET,
            sock_type: abi::SOCK_STREAM,
            protocol: abi::IPPROTO_TCP,
            addr: Some(addr.parse().unwrap()),
            port: Some(port),
            foreign_sockaddr: None,
            v6only: false,
            process: Process {
                pid: 10,
                tgid: 10,
                comm: comm.into(),
                exe: Some(exe.into()),
                uid: 0,
                ppid: 1,
                parent_comm: "sh".into(),
                // /tmp/bb is a hard link of /bin/busybox; every other name is another file.
                exe_file: Some(match exe {
                    "/bin/busybox" | "/tmp/bb" => genuine(),
                    other => ExeFile {
                        id: id(1000 + other.len() as u64),
                        ..genuine()
                    },
                }),
                exe_error: None,
            },
            identity_error: None,
        }
    }

    fn with_file(mut a: Attribution, f: ExeFile) -> Attribution {
        a.process.exe_file = Some(f);
        a
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

    /// A ping socket's sockaddr port is no port (the kernel ignores it, or takes it as the echo
    /// identifier, which the ICMP verdict does not carry): a rule that names ports, meant for
    /// TCP or UDP, does not let ICMP through because the caller wrote an allowed port there.
    #[test]
    fn a_rule_with_ports_does_not_match_icmp() {
        let policy = Policy::from_json(
            r#"{"allow": [
                {"op": "connect", "exe": "/bin/busybox", "cidr": "10.77.0.0/24", "ports": "8080"},
                {"op": "bind", "exe": "/bin/busybox", "ports": "7000"},
                {"op": "connect", "exe": "/bin/busybox", "cidr": "10.78.0.0/24"}
            ]}"#,
        )
        .unwrap();
        for (op, addr, port) in [
            (SocketOp::Connect, "10.77.0.1", 8080),
            (SocketOp::Sendmsg, "10.77.0.1", 8080),
            (SocketOp::Bind, "0.0.0.0", 7000),
        ] {
            let mut a = attribution(op, "/bin/busybox", "ping", addr, port);
            a.sock_type = abi::SOCK_DGRAM;
            for protocol in [abi::IPPROTO_ICMP, abi::IPPROTO_ICMPV6] {
                a.protocol = protocol;
                assert_eq!(policy.decide(&a), Verdict::Deny, "{op:?} {protocol}");
            }
            a.protocol = abi::IPPROTO_UDP;
            assert_eq!(policy.decide(&a), Verdict::Allow, "{op:?} udp");
        }
        // A rule without ports still lets ICMP reach its range.
        let mut ping = attribution(SocketOp::Sendmsg, "/bin/busybox", "ping", "10.78.0.1", 0);
        ping.protocol = abi::IPPROTO_ICMP;
        assert_eq!(policy.decide(&ping), Verdict::Allow);
    }

    /// A dual-stack IPv6 socket given `::ffff:a.b.c.d` connects to the IPv4 address `a.b.c.d`,
    /// and the verdict opens that IPv4 flow: ranges are held against the address on the wire.
    #[test]
    fn an_ipv4_mapped_address_is_decided_as_the_ipv4_address_it_reaches() {
        let policy = Policy::from_json(
            r#"{"allow": [
                {"op": "connect", "exe": "/bin/busybox", "cidr": "::/0", "ports": "443"},
                {"op": "connect", "exe": "/bin/busybox", "cidr": "10.77.0.0/24", "ports": "80"},
                {"op": "connect", "exe": "/bin/busybox", "cidr": "::ffff:10.78.0.0/120", "ports": "81"}
            ]}"#,
        )
        .unwrap();
        let connect = |addr: &str, port: u16| {
            let mut a = attribution(SocketOp::Connect, "/bin/busybox", "nc", addr, port);
            a.family = abi::AF_INET6;
            policy.decide(&a)
        };
        // Every IPv6 address is not every IPv4 address.
        assert_eq!(connect("2001:db8::1", 443), Verdict::Allow);
        assert_eq!(connect("::ffff:1.2.3.4", 443), Verdict::Deny);
        assert_eq!(connect("::ffff:10.77.0.1", 443), Verdict::Deny);
        // The IPv4 range holds for its mapped addresses, and only for them.
        assert_eq!(connect("::ffff:10.77.0.1", 80), Verdict::Allow);
        assert_eq!(connect("::ffff:10.77.1.1", 80), Verdict::Deny);
        // A range written in the mapped form is that IPv4 range.
        assert_eq!(connect("::ffff:10.78.0.9", 81), Verdict::Allow);
        let v4 = attribution(SocketOp::Connect, "/bin/busybox", "nc", "10.78.0.9", 81);
        assert_eq!(policy.decide(&v4), Verdict::Allow);
        assert_eq!(connect("::ffff:10.79.0.9", 81), Verdict::Deny);
    }

    #[test]
    fn non_ip_sockets_are_never_matched_by_ip_rules() {
        let policy = Policy::from_json(
            r#"{"allow": [
                {"op": "connect", "exe": "/bin/busybox", "cidr": "10.77.0.0/24"},
                {"op": "connect", "exe": "/bin/busybox"},
                {"op": "connect", "exe": "/bin/rawsyn", "family": "packet"}
            ]}"#,
        )
        .unwrap();
        let ip = attribution(SocketOp::Sendmsg, "/bin/busybox", "nc", "10.77.0.1", 80);
        assert_eq!(policy.decide(&ip), Verdict::Allow);
        // A packet socket whose sockaddr_ll reads like 10.77.0.1:80 (and whose ethertype reads
        // as protocol 6): no IP rule, with or without a cidr, matches it.
        let mut packet = ip.clone();
        packet.family = abi::AF_PACKET;
        packet.protocol = abi::IPPROTO_TCP;
        assert_eq!(policy.decide(&packet), Verdict::Deny);
        for family in [abi::AF_NETLINK, abi::AF_UNIX, 40 /* AF_VSOCK */] {
            packet.family = family;
            assert_eq!(policy.decide(&packet), Verdict::Deny, "family {family}");
        }
        // An IP socket given a sockaddr of another family has no address for an IP rule.
        let mut foreign = ip.clone();
        foreign.addr = None;
        foreign.port = None;
        foreign.foreign_sockaddr = Some(abi::AF_PACKET);
        assert_eq!(policy.decide(&foreign), Verdict::Deny);
        // Packet sockets only by a rule that names them.
        let mut raw = attribution(SocketOp::Sendmsg, "/bin/rawsyn", "rawsyn", "0.0.0.0", 0);
        raw.family = abi::AF_PACKET;
        (raw.addr, raw.port) = (None, None);
        assert_eq!(policy.decide(&raw), Verdict::Allow);
        raw.family = abi::AF_INET;
        assert_eq!(
            policy.decide(&raw),
            Verdict::Deny,
            "a packet rule is not an IP rule"
        );
        // A packet rule has no IP constraints.
        assert!(Policy::from_json(
            r#"{"allow": [{"op": "connect", "exe": "/a", "family": "packet", "ports": "80"}]}"#
        )
        .is_err());
        let spec: PolicySpec =
            serde_json::from_str(r#"{"allow": [{"op": "bind", "comm": "x", "family": "packet"}]}"#)
                .unwrap();
        let text = serde_json::to_string(&spec).unwrap();
        assert!(text.contains(r#""family":"packet""#), "{text}");
        assert_eq!(serde_json::from_str::<PolicySpec>(&text).unwrap(), spec);
    }

    #[test]
    fn the_first_genuine_run_pins_the_file_and_other_files_at_the_path_are_denied() {
        let policy = Policy::from_json(POLICY).unwrap();
        let ok = attribution(SocketOp::Connect, "/bin/busybox", "nc", "10.77.0.1", 8080);
        // A bind mount in init's namespace does not pin.
        let over = ExeFile {
            bind_mount: true,
            id: id(666),
            ..genuine()
        };
        let mut a = with_file(ok.clone(), over);
        assert_eq!(policy.decide_noting(&mut a), Verdict::Deny);
        assert!(a.identity_error.unwrap().contains("bind mount"));
        assert_eq!(policy.pinned("/bin/busybox"), None);
        // Nor does a private namespace.
        let private = ExeFile {
            init_mnt_ns: false,
            id: id(666),
            ..genuine()
        };
        assert_eq!(
            policy.decide(&with_file(ok.clone(), private.clone())),
            Verdict::Deny
        );
        assert_eq!(policy.pinned("/bin/busybox"), None);

        assert_eq!(policy.decide(&ok), Verdict::Allow);
        assert_eq!(policy.pinned("/bin/busybox"), Some(id(100)));
        // Replaced (another inode, or the same inode written: its ctime moved) after pinning.
        let mut written = id(100);
        written.ctime_sec += 1;
        for other in [id(101), written] {
            let mut a = with_file(
                ok.clone(),
                ExeFile {
                    id: other,
                    ..genuine()
                },
            );
            assert_eq!(policy.decide_noting(&mut a), Verdict::Deny);
            let why = a.identity_error.unwrap();
            assert!(
                why.starts_with("identity mismatch: /bin/busybox is pinned to"),
                "{why}"
            );
        }
        // The genuine file in a container's namespace, or under a hard link: the same file.
        let container = ExeFile {
            init_mnt_ns: false,
            ..genuine()
        };
        assert_eq!(
            policy.decide(&with_file(ok.clone(), container)),
            Verdict::Allow
        );
        let link = attribution(SocketOp::Connect, "/tmp/bb", "nc", "10.77.0.1", 8080);
        assert_eq!(policy.decide(&link), Verdict::Allow);
        // The attacker's program bind-mounted over it in a private namespace.
        let mut a = with_file(ok.clone(), private);
        assert_eq!(policy.decide_noting(&mut a), Verdict::Deny);
        assert!(a.identity_error.unwrap().contains("not pinned"));
        // A copy (another inode) under another name.
        let copy = with_file(
            attribution(
                SocketOp::Connect,
                "/tmp/busybox-other",
                "nc",
                "10.77.0.1",
                8080,
            ),
            ExeFile {
                id: id(102),
                ..genuine()
            },
        );
        assert_eq!(policy.decide(&copy), Verdict::Deny);
        // The pinned file's identity, borrowed by code that is not its own.
        for code in [
            CodeOrigin::Anonymous,
            CodeOrigin::Foreign,
            CodeOrigin::Kernel,
        ] {
            let mut a = with_file(ok.clone(), ExeFile { code, ..genuine() });
            assert_eq!(policy.decide_noting(&mut a), Verdict::Deny, "{code:?}");
            assert!(a.identity_error.unwrap().contains("not the executable's"));
        }
        // The pinned file named as the executable by prctl(PR_SET_MM) rather than executed.
        let mut a = with_file(
            ok.clone(),
            ExeFile {
                from_exec: false,
                ..genuine()
            },
        );
        assert_eq!(policy.decide_noting(&mut a), Verdict::Deny);
        assert!(a.identity_error.unwrap().contains("did not execute it"));
        // A task another process steers (a tracer, a seccomp listener), or one that cannot be
        // told (a filter chain too long to walk).
        for by in [Steered::Traced, Steered::SeccompListener, Steered::Unknown] {
            let mut a = with_file(
                ok.clone(),
                ExeFile {
                    steered: Some(by),
                    ..genuine()
                },
            );
            assert_eq!(policy.decide_noting(&mut a), Verdict::Deny, "{by:?}");
            assert!(a
                .identity_error
                .unwrap()
                .contains("steers its system calls"));
        }
        let lib = with_file(
            ok.clone(),
            ExeFile {
                code: CodeOrigin::Library,
                ..genuine()
            },
        );
        assert_eq!(policy.decide(&lib), Verdict::Allow);
        // An unreadable identity applies no exe rule; comm rules still apply.
        let mut unknown = ok.clone();
        unknown.process.exe_file = None;
        unknown.process.exe_error = Some("maple tree: pivots out of order".into());
        assert_eq!(policy.decide(&unknown), Verdict::Deny);
        let mut httpd = attribution(SocketOp::Bind, "/x", "httpd", "0.0.0.0", 8050);
        httpd.process.exe_file = None;
        assert_eq!(policy.decide(&httpd), Verdict::Allow);
    }

    #[test]
    fn a_port_not_yet_assigned_is_allowed_only_where_some_rule_of_the_identity_could_allow_it() {
        let policy = Policy::from_json(
            r#"{"allow": [
                {"op": "listen", "exe": "/bin/busybox", "protocol": "tcp", "ports": "7000-7010"},
                {"op": "listen", "comm": "httpd", "cidr": "10.0.0.0/8", "ports": "80"}
            ]}"#,
        )
        .unwrap();
        // listen() on a socket never bound: port 0 until the kernel picks one.
        let listen0 =
            |exe: &str, comm: &str, addr: &str| attribution(SocketOp::Listen, exe, comm, addr, 0);
        let mut a = listen0("/bin/busybox", "nc", "0.0.0.0");
        assert_eq!(policy.decide(&a), Verdict::Deny, "no rule allows port 0");
        assert_eq!(policy.could_allow_some_port(&mut a), Verdict::Allow);
        let mut a = listen0("/x", "httpd", "10.1.2.3");
        assert_eq!(policy.could_allow_some_port(&mut a), Verdict::Allow);
        // No rule of the identity, a rule of another operation or protocol, an address outside
        // the rule's range, code that is not the executable's: no port could be allowed.
        let mut udp = listen0("/bin/busybox", "nc", "0.0.0.0");
        udp.protocol = abi::IPPROTO_UDP;
        let mut injected = listen0("/bin/busybox", "nc", "0.0.0.0");
        injected.process.exe_file.as_mut().unwrap().code = CodeOrigin::Anonymous;
        for mut a in [
            listen0("/bin/evil", "evil", "0.0.0.0"),
            attribution(SocketOp::Bind, "/bin/busybox", "nc", "0.0.0.0", 0),
            udp,
            listen0("/x", "httpd", "192.168.0.1"),
            injected,
        ] {
            assert_eq!(policy.could_allow_some_port(&mut a), Verdict::Deny, "{a:?}");
        }
        let mut a = listen0("/bin/busybox", "nc", "0.0.0.0");
        a.process.exe_file.as_mut().unwrap().code = CodeOrigin::Foreign;
        assert_eq!(policy.could_allow_some_port(&mut a), Verdict::Deny);
        assert!(a.identity_error.unwrap().contains("not the executable's"));
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
