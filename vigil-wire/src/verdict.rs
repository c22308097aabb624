//! Verdict records: the flows a tier may open.
//!
//! A verdict is produced by the hypervisor when it attributes a `connect`/`bind`/`listen`/`sendmsg`
//! to a whitelisted process, and consumed by the firewall micro-VM (through the ring in
//! [`crate::ring`]) or by the edge (through the authenticated channel). One record is exactly
//! [`RECORD_LEN`] = 64 bytes (one cache line, one ring slot).
//!
//! Layout (Vigil's own ABI, version [`RECORD_VERSION`]; integers little endian because both ends are
//! x86-64 and the micro-VM reads them without swapping; addresses in network byte order as on the
//! wire):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | op: 1 add, 2 remove, 3 flush tenant, 4 attach, 5 adopt, 6 release (see [`Op`]) |
//! | 1 | 1 | direction: 1 egress (connect/sendmsg), 2 ingress (bind/listen) |
//! | 2 | 1 | IP version: 4 or 6 |
//! | 3 | 1 | protocol, IANA number: 6 TCP, 17 UDP, 1 ICMP (v4 only), 58 ICMPv6 (v6 only) |
//! | 4 | 4 | tenant id |
//! | 8 | 8 | sequence number (the producer numbers records 1, 2, 3, ...) |
//! | 16 | 8 | lifetime in milliseconds from the moment the consumer applies it, 0 = no expiry |
//! | 24 | 16 | local (tenant-side) address; IPv4 in the first 4 bytes, rest zero; all zero = any |
//! | 40 | 16 | remote address, same encoding |
//! | 56 | 1 | remote prefix length (0 = any remote, 32/128 = exactly this address) |
//! | 57 | 1 | flags: [`RULE_FLAG_ANY_LOCAL_PORT`] on add/remove/adopt, [`ATTACH_FLAG_MAC`] on attach; others reserved, 0 |
//! | 58 | 2 | local port; for ICMP the echo identifier. 0 only with [`RULE_FLAG_ANY_LOCAL_PORT`] (= any) |
//! | 60 | 2 | lowest remote port |
//! | 62 | 2 | highest remote port (a single port: low = high; any: 0..=65535) |
//!
//! Port 0 never means "every port" by accident: a rule record (`Add`, `Remove`, `Adopt`) with local
//! port 0 must carry flag [`RULE_FLAG_ANY_LOCAL_PORT`], and one with the flag must have local port
//! 0; anything else is refused ([`VerdictError::NoLocalPort`], [`VerdictError::AnyPortWithPort`]).
//! A record of an older producer that meant "any" by 0 alone is thus refused (fails closed).
//!
//! An [`Op::Attach`] record uses only op, tenant, sequence, IP version, local address and local
//! port (the switch port index, [`PORT_NONE`] = none), and, when flag [`ATTACH_FLAG_MAC`] is set,
//! the tenant's MAC address in the first 6 bytes of the remote address (the switch accepts only
//! that Ethernet source on the port); the consumer ignores every other field (the producer should
//! leave them zero). A record without the flag (an older producer) attaches no MAC. An [`Op::FlushTenant`] or [`Op::Release`]
//! record uses only op, tenant and sequence.
//!
//! The lifetime is relative rather than an absolute deadline because the VMM and the micro-VM do
//! not share a clock; ring latency (microseconds) is negligible against lifetimes in seconds.
//!
//! [`Verdict`] is a zero-copy typed view over bytes in the smoltcp `wire` style: `new_checked`
//! checks the length, every accessor is then in bounds. [`VerdictRepr`] is the validated, decoded
//! form (`parse` rejects unknown codes and inconsistent fields) and `emit`s back to bytes.

use core::fmt;

/// Size of one verdict record in bytes (one ring slot).
pub const RECORD_LEN: usize = 64;

/// Version of the record layout above; bumped on any incompatible change (carried in the ring
/// header, see [`crate::ring::RING_VERSION`]).
pub const RECORD_VERSION: u32 = 1;

mod field {
    use core::ops::Range;
    pub const OP: usize = 0;
    pub const DIRECTION: usize = 1;
    pub const IP_VERSION: usize = 2;
    pub const PROTOCOL: usize = 3;
    pub const TENANT: Range<usize> = 4..8;
    pub const SEQ: Range<usize> = 8..16;
    pub const LIFETIME_MS: Range<usize> = 16..24;
    pub const LOCAL_ADDR: Range<usize> = 24..40;
    pub const REMOTE_ADDR: Range<usize> = 40..56;
    pub const REMOTE_PREFIX: usize = 56;
    pub const FLAGS: usize = 57;
    pub const LOCAL_PORT: Range<usize> = 58..60;
    pub const REMOTE_PORT_MIN: Range<usize> = 60..62;
    pub const REMOTE_PORT_MAX: Range<usize> = 62..64;
}

/// What a record asks the consumer to do.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Open the flows described by the record (or refresh the lifetime of an identical verdict).
    Add = 1,
    /// Remove the identical verdict and close the flows it opened.
    Remove = 2,
    /// Remove every verdict of the tenant and close their flows (VM deleted or migrated away);
    /// also forget its switch ports and addresses (everything [`Op::Attach`] gave it).
    FlushTenant = 3,
    /// Tenant `tenant` is now behind switch port `rule.local_port` (an index in the boot
    /// information's device order; [`PORT_NONE`] = no port) and owns address `rule.local_addr`
    /// (version `rule.ip_version`; all zero = no address). Opens no flow. Build it with
    /// [`VerdictRepr::attach`]. Tenant [`crate::boot::TENANT_UNASSIGNED`] detaches the port and
    /// releases the address instead.
    Attach = 4,
    /// Like [`Op::Add`], and flows the rule covers that are already established elsewhere (the
    /// tenant migrated here mid-connection) are adopted: a TCP segment without SYN, or a UDP
    /// datagram in the reply direction, that finds no conntrack entry creates one instead of
    /// being dropped. Build it with [`VerdictRepr::adopt`].
    Adopt = 5,
    /// (Host to edge only.) The sending host gives tenant `tenant` up to whichever host attaches
    /// it next (it migrated away): the edge's VMM hands over the tenant's addresses and keeps its
    /// verdicts and flows. Uses only op, tenant and sequence. Never reaches a firewall micro-VM
    /// (one that gets it refuses it). Build it with [`VerdictRepr::release`].
    Release = 6,
}

impl Op {
    pub const fn from_u8(value: u8) -> Option<Op> {
        match value {
            1 => Some(Op::Add),
            2 => Some(Op::Remove),
            3 => Some(Op::FlushTenant),
            4 => Some(Op::Attach),
            5 => Some(Op::Adopt),
            6 => Some(Op::Release),
            _ => None,
        }
    }

    /// Whether the record carries a flow rule (`Add`, `Remove`, `Adopt`).
    pub const fn has_rule(self) -> bool {
        matches!(self, Op::Add | Op::Remove | Op::Adopt)
    }
}

/// Flag of an [`Op::Attach`] record: the first 6 bytes of the remote address are the tenant's MAC.
pub const ATTACH_FLAG_MAC: u8 = 1;

/// Flag of a rule record (`Add`, `Remove`, `Adopt`): the rule opens every local port (its local
/// port field is then 0). Without it a rule opens exactly its local port, which must not be 0.
pub const RULE_FLAG_ANY_LOCAL_PORT: u8 = 2;

/// `rule.local_port` of an [`Op::Attach`] record that names no switch port.
pub const PORT_NONE: u16 = 0xFFFF;

/// The tenant id under which an edge attaches its *underlay's* addresses (the VXLAN endpoints of
/// its hosts and its own): [`Op::Attach`] records for it make those addresses ones the outside
/// cannot have (dropped there as spoofed sources), and no verdict is ever issued for it, so they
/// open nothing from the cloud side either. The edge's VMM sends them, from what it learns of its
/// hosts, never a hand-typed list.
pub const UNDERLAY_TENANT: u32 = u32::MAX - 1;

/// Which way the verdict opens a flow, seen from the tenant.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The tenant initiates (connect, sendmsg): its first packet leaves the tenant.
    Egress = 1,
    /// A remote initiates toward the tenant's bound/listening port.
    Ingress = 2,
}

impl Direction {
    /// The other direction (the reply direction of a flow opened in `self`).
    pub const fn reverse(self) -> Direction {
        match self {
            Direction::Egress => Direction::Ingress,
            Direction::Ingress => Direction::Egress,
        }
    }
}

/// IP version of the flows a verdict opens.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpVersion {
    V4 = 4,
    V6 = 6,
}

impl IpVersion {
    /// Number of address bits (the largest valid prefix length).
    pub const fn addr_bits(self) -> u8 {
        match self {
            IpVersion::V4 => 32,
            IpVersion::V6 => 128,
        }
    }
}

/// Transport protocol, IANA protocol numbers.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Icmp = 1,
    Tcp = 6,
    Udp = 17,
    Icmpv6 = 58,
}

impl Protocol {
    pub const fn from_u8(value: u8) -> Option<Protocol> {
        match value {
            1 => Some(Protocol::Icmp),
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            58 => Some(Protocol::Icmpv6),
            _ => None,
        }
    }

    /// Whether this is one of the ICMP variants (ports then carry the echo identifier).
    pub const fn is_icmp(self) -> bool {
        matches!(self, Protocol::Icmp | Protocol::Icmpv6)
    }
}

/// Why bytes are not a valid verdict record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictError {
    /// Fewer than [`RECORD_LEN`] bytes.
    Truncated {
        len: usize,
    },
    BadOp(u8),
    BadDirection(u8),
    BadIpVersion(u8),
    BadProtocol(u8),
    /// ICMP with IPv6 or ICMPv6 with IPv4.
    ProtocolVersionMismatch,
    /// Prefix longer than the address.
    BadPrefix(u8),
    /// Lowest remote port above the highest.
    BadPortRange {
        min: u16,
        max: u16,
    },
    /// An IPv4 address with non-zero bytes beyond the first four.
    BadIpv4Encoding,
    /// Reserved flags set.
    ReservedFlags(u8),
    /// A rule with local port 0 and no [`RULE_FLAG_ANY_LOCAL_PORT`]: 0 is not "any" by itself.
    NoLocalPort,
    /// [`RULE_FLAG_ANY_LOCAL_PORT`] with a local port: either one port or any, not both.
    AnyPortWithPort(u16),
}

impl fmt::Display for VerdictError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            VerdictError::Truncated { len } => {
                write!(f, "verdict record truncated: {len} of {RECORD_LEN} bytes")
            }
            VerdictError::BadOp(v) => write!(f, "unknown verdict op {v}"),
            VerdictError::BadDirection(v) => write!(f, "unknown verdict direction {v}"),
            VerdictError::BadIpVersion(v) => write!(f, "unknown IP version {v}"),
            VerdictError::BadProtocol(v) => write!(f, "unsupported protocol {v}"),
            VerdictError::ProtocolVersionMismatch => {
                write!(f, "ICMP protocol does not match the IP version")
            }
            VerdictError::BadPrefix(v) => write!(f, "prefix length {v} longer than the address"),
            VerdictError::BadPortRange { min, max } => {
                write!(f, "remote port range {min}..={max} is empty")
            }
            VerdictError::BadIpv4Encoding => write!(f, "IPv4 address with non-zero padding"),
            VerdictError::ReservedFlags(v) => write!(f, "reserved flags 0x{v:02x} set"),
            VerdictError::NoLocalPort => {
                write!(f, "local port 0 without the any-local-port flag")
            }
            VerdictError::AnyPortWithPort(p) => {
                write!(f, "the any-local-port flag with local port {p}")
            }
        }
    }
}

/// A zero-copy view of a verdict record over a byte buffer.
#[derive(Clone, Copy, Debug)]
pub struct Verdict<T: AsRef<[u8]>> {
    buffer: T,
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}
fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}
fn addr16(b: &[u8]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    a
}

impl<T: AsRef<[u8]>> Verdict<T> {
    /// Wrap a buffer without checking its length; accessors may panic on a short buffer.
    pub const fn new_unchecked(buffer: T) -> Verdict<T> {
        Verdict { buffer }
    }

    /// Wrap a buffer after checking it holds a whole record.
    pub fn new_checked(buffer: T) -> Result<Verdict<T>, VerdictError> {
        let v = Self::new_unchecked(buffer);
        v.check_len()?;
        Ok(v)
    }

    /// Ensure no accessor will panic.
    pub fn check_len(&self) -> Result<(), VerdictError> {
        let len = self.buffer.as_ref().len();
        if len < RECORD_LEN {
            Err(VerdictError::Truncated { len })
        } else {
            Ok(())
        }
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    pub fn op(&self) -> u8 {
        self.b()[field::OP]
    }
    pub fn direction(&self) -> u8 {
        self.b()[field::DIRECTION]
    }
    pub fn ip_version(&self) -> u8 {
        self.b()[field::IP_VERSION]
    }
    pub fn protocol(&self) -> u8 {
        self.b()[field::PROTOCOL]
    }
    pub fn tenant(&self) -> u32 {
        le_u32(&self.b()[field::TENANT])
    }
    pub fn seq(&self) -> u64 {
        le_u64(&self.b()[field::SEQ])
    }
    pub fn lifetime_ms(&self) -> u64 {
        le_u64(&self.b()[field::LIFETIME_MS])
    }
    pub fn local_addr(&self) -> [u8; 16] {
        addr16(&self.b()[field::LOCAL_ADDR])
    }
    pub fn remote_addr(&self) -> [u8; 16] {
        addr16(&self.b()[field::REMOTE_ADDR])
    }
    pub fn remote_prefix(&self) -> u8 {
        self.b()[field::REMOTE_PREFIX]
    }
    pub fn flags(&self) -> u8 {
        self.b()[field::FLAGS]
    }
    pub fn local_port(&self) -> u16 {
        le_u16(&self.b()[field::LOCAL_PORT])
    }
    pub fn remote_port_min(&self) -> u16 {
        le_u16(&self.b()[field::REMOTE_PORT_MIN])
    }
    pub fn remote_port_max(&self) -> u16 {
        le_u16(&self.b()[field::REMOTE_PORT_MAX])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Verdict<T> {
    fn bm(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    pub fn set_op(&mut self, v: u8) {
        self.bm()[field::OP] = v;
    }
    pub fn set_direction(&mut self, v: u8) {
        self.bm()[field::DIRECTION] = v;
    }
    pub fn set_ip_version(&mut self, v: u8) {
        self.bm()[field::IP_VERSION] = v;
    }
    pub fn set_protocol(&mut self, v: u8) {
        self.bm()[field::PROTOCOL] = v;
    }
    pub fn set_tenant(&mut self, v: u32) {
        self.bm()[field::TENANT].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_seq(&mut self, v: u64) {
        self.bm()[field::SEQ].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_lifetime_ms(&mut self, v: u64) {
        self.bm()[field::LIFETIME_MS].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_local_addr(&mut self, v: [u8; 16]) {
        self.bm()[field::LOCAL_ADDR].copy_from_slice(&v);
    }
    pub fn set_remote_addr(&mut self, v: [u8; 16]) {
        self.bm()[field::REMOTE_ADDR].copy_from_slice(&v);
    }
    pub fn set_remote_prefix(&mut self, v: u8) {
        self.bm()[field::REMOTE_PREFIX] = v;
    }
    pub fn set_flags(&mut self, v: u8) {
        self.bm()[field::FLAGS] = v;
    }
    pub fn set_local_port(&mut self, v: u16) {
        self.bm()[field::LOCAL_PORT].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_remote_port_min(&mut self, v: u16) {
        self.bm()[field::REMOTE_PORT_MIN].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_remote_port_max(&mut self, v: u16) {
        self.bm()[field::REMOTE_PORT_MAX].copy_from_slice(&v.to_le_bytes());
    }
}

/// The flows a verdict opens (everything but op, tenant, sequence and lifetime).
///
/// Two verdicts are "the same verdict" (an `Add` refreshes, a `Remove` removes) when their tenant and
/// `Rule` are equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub direction: Direction,
    pub ip_version: IpVersion,
    pub protocol: Protocol,
    /// Tenant-side address, all zero = any. IPv4 in the first 4 bytes.
    pub local_addr: [u8; 16],
    /// Tenant-side port; for ICMP the echo identifier. 0 opens nothing unless `any_local_port`.
    pub local_port: u16,
    /// Every local port (an explicit wildcard, [`RULE_FLAG_ANY_LOCAL_PORT`] on the wire; then
    /// `local_port` is 0). Never implied by port 0 alone.
    pub any_local_port: bool,
    pub remote_addr: [u8; 16],
    /// 0 = any remote.
    pub remote_prefix: u8,
    pub remote_port_min: u16,
    pub remote_port_max: u16,
}

impl Rule {
    /// A rule open to any remote address and port, from any local address, in the given
    /// direction, version and protocol, on no local port yet (set `local_port`, or use
    /// [`Rule::any_port`]); a starting point for builders and tests.
    pub const fn any(direction: Direction, ip_version: IpVersion, protocol: Protocol) -> Rule {
        Rule {
            direction,
            ip_version,
            protocol,
            local_addr: [0; 16],
            local_port: 0,
            any_local_port: false,
            remote_addr: [0; 16],
            remote_prefix: 0,
            remote_port_min: 0,
            remote_port_max: u16::MAX,
        }
    }

    /// [`Rule::any`] on every local port too (the explicit wildcard).
    pub const fn any_port(direction: Direction, ip_version: IpVersion, protocol: Protocol) -> Rule {
        let mut rule = Rule::any(direction, ip_version, protocol);
        rule.any_local_port = true;
        rule
    }

    /// Exactly one flow the tenant opens: protocol, its local address (all zero: any of the
    /// tenant's own, which the switch enforces) and port, the remote address and port. What an
    /// allowed connect or sendto opens.
    pub const fn egress_flow(
        ip_version: IpVersion,
        protocol: Protocol,
        local: [u8; 16],
        local_port: u16,
        remote: [u8; 16],
        remote_port: u16,
    ) -> Rule {
        let mut rule = Rule::egress_to(ip_version, protocol, remote, remote_port);
        rule.any_local_port = false;
        rule.local_addr = local;
        rule.local_port = local_port;
        rule
    }

    /// A rule opening egress to exactly one remote endpoint from any local port (an explicit
    /// wildcard: [`Rule::egress_flow`] is what a connect opens); `remote` in the rule's address
    /// encoding (IPv4 in the first 4 bytes).
    pub const fn egress_to(
        ip_version: IpVersion,
        protocol: Protocol,
        remote: [u8; 16],
        port: u16,
    ) -> Rule {
        let mut rule = Rule::any_port(Direction::Egress, ip_version, protocol);
        rule.remote_addr = remote;
        rule.remote_prefix = ip_version.addr_bits();
        rule.remote_port_min = port;
        rule.remote_port_max = port;
        rule
    }

    /// Whether `remote_addr` (same encoding as the rule's) lies in the rule's remote prefix.
    pub fn remote_addr_matches(&self, addr: &[u8; 16]) -> bool {
        prefix_matches(&self.remote_addr, addr, self.remote_prefix)
    }

    /// Whether the rule opens local port `port`: exactly its own, or any where it says so
    /// explicitly. Port 0 alone opens nothing.
    pub const fn local_port_matches(&self, port: u16) -> bool {
        if self.local_port != 0 {
            self.local_port == port
        } else {
            self.any_local_port
        }
    }

    /// Whether `port` lies in the rule's remote port range.
    pub const fn remote_port_matches(&self, port: u16) -> bool {
        self.remote_port_min <= port && port <= self.remote_port_max
    }
}

/// Whether the first `prefix` bits of `a` and `b` are equal.
pub fn prefix_matches(a: &[u8; 16], b: &[u8; 16], prefix: u8) -> bool {
    let prefix = usize::from(prefix.min(128));
    let full = prefix / 8;
    if a[..full] != b[..full] {
        return false;
    }
    let rest = prefix % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

/// A decoded, validated verdict record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictRepr {
    pub op: Op,
    pub tenant: u32,
    pub seq: u64,
    /// 0 = no expiry.
    pub lifetime_ms: u64,
    /// Ignored (and parsed as a wildcard rule) for [`Op::FlushTenant`]; for [`Op::Attach`] only
    /// `ip_version`, `local_addr` and `local_port` count (see [`VerdictRepr::attach`]).
    pub rule: Rule,
}

impl VerdictRepr {
    /// Decode and validate a record.
    pub fn parse<T: AsRef<[u8]>>(v: &Verdict<T>) -> Result<VerdictRepr, VerdictError> {
        v.check_len()?;
        let op = Op::from_u8(v.op()).ok_or(VerdictError::BadOp(v.op()))?;
        let allowed = match op {
            Op::Attach => ATTACH_FLAG_MAC,
            Op::Add | Op::Remove | Op::Adopt => RULE_FLAG_ANY_LOCAL_PORT,
            Op::FlushTenant | Op::Release => 0,
        };
        if v.flags() & !allowed != 0 {
            return Err(VerdictError::ReservedFlags(v.flags()));
        }
        match op {
            Op::FlushTenant => return Ok(VerdictRepr::flush_tenant(v.tenant(), v.seq())),
            Op::Release => return Ok(VerdictRepr::release(v.tenant(), v.seq())),
            Op::Attach => return Self::parse_attach(v),
            Op::Add | Op::Remove | Op::Adopt => {}
        }
        let direction = match v.direction() {
            1 => Direction::Egress,
            2 => Direction::Ingress,
            other => return Err(VerdictError::BadDirection(other)),
        };
        let ip_version = match v.ip_version() {
            4 => IpVersion::V4,
            6 => IpVersion::V6,
            other => return Err(VerdictError::BadIpVersion(other)),
        };
        let protocol =
            Protocol::from_u8(v.protocol()).ok_or(VerdictError::BadProtocol(v.protocol()))?;
        match (ip_version, protocol) {
            (IpVersion::V4, Protocol::Icmpv6) | (IpVersion::V6, Protocol::Icmp) => {
                return Err(VerdictError::ProtocolVersionMismatch)
            }
            _ => {}
        }
        let local_addr = v.local_addr();
        let remote_addr = v.remote_addr();
        if ip_version == IpVersion::V4
            && (local_addr[4..].iter().any(|&b| b != 0) || remote_addr[4..].iter().any(|&b| b != 0))
        {
            return Err(VerdictError::BadIpv4Encoding);
        }
        let remote_prefix = v.remote_prefix();
        if remote_prefix > ip_version.addr_bits() {
            return Err(VerdictError::BadPrefix(remote_prefix));
        }
        let (min, max) = (v.remote_port_min(), v.remote_port_max());
        if min > max {
            return Err(VerdictError::BadPortRange { min, max });
        }
        let any_local_port = v.flags() & RULE_FLAG_ANY_LOCAL_PORT != 0;
        match (any_local_port, v.local_port()) {
            (false, 0) => return Err(VerdictError::NoLocalPort),
            (true, p) if p != 0 => return Err(VerdictError::AnyPortWithPort(p)),
            _ => {}
        }
        Ok(VerdictRepr {
            op,
            tenant: v.tenant(),
            seq: v.seq(),
            lifetime_ms: v.lifetime_ms(),
            rule: Rule {
                direction,
                ip_version,
                protocol,
                local_addr,
                local_port: v.local_port(),
                any_local_port,
                remote_addr,
                remote_prefix,
                remote_port_min: min,
                remote_port_max: max,
            },
        })
    }

    /// The fields of an [`Op::Attach`] record, in the canonical form [`VerdictRepr::attach`] builds
    /// (so a record round-trips); the fields it does not use are ignored.
    fn parse_attach<T: AsRef<[u8]>>(v: &Verdict<T>) -> Result<VerdictRepr, VerdictError> {
        let local_addr = v.local_addr();
        let addr = if local_addr == [0; 16] {
            None
        } else {
            let ip_version = match v.ip_version() {
                4 => IpVersion::V4,
                6 => IpVersion::V6,
                other => return Err(VerdictError::BadIpVersion(other)),
            };
            if ip_version == IpVersion::V4 && local_addr[4..].iter().any(|&b| b != 0) {
                return Err(VerdictError::BadIpv4Encoding);
            }
            Some((ip_version, local_addr))
        };
        let port = Some(v.local_port()).filter(|&p| p != PORT_NONE);
        let mut mac = None;
        if v.flags() == ATTACH_FLAG_MAC {
            let r = v.remote_addr();
            mac = Some([r[0], r[1], r[2], r[3], r[4], r[5]]);
        }
        Ok(VerdictRepr::attach_with_mac(
            v.tenant(),
            v.seq(),
            port,
            addr,
            mac,
        ))
    }

    /// An [`Op::Add`] record.
    pub const fn add(tenant: u32, seq: u64, lifetime_ms: u64, rule: Rule) -> VerdictRepr {
        VerdictRepr {
            op: Op::Add,
            tenant,
            seq,
            lifetime_ms,
            rule,
        }
    }

    /// An [`Op::Adopt`] record: `Add` that also adopts flows of `rule` established elsewhere
    /// (pushed to the destination host when a tenant migrates, before its vCPUs resume there).
    pub const fn adopt(tenant: u32, seq: u64, lifetime_ms: u64, rule: Rule) -> VerdictRepr {
        VerdictRepr {
            op: Op::Adopt,
            tenant,
            seq,
            lifetime_ms,
            rule,
        }
    }

    /// An [`Op::FlushTenant`] record (its rule is a placeholder nobody reads).
    pub const fn flush_tenant(tenant: u32, seq: u64) -> VerdictRepr {
        VerdictRepr {
            op: Op::FlushTenant,
            tenant,
            seq,
            lifetime_ms: 0,
            rule: Rule::any(Direction::Egress, IpVersion::V4, Protocol::Tcp),
        }
    }

    /// An [`Op::Release`] record (its rule is a placeholder nobody reads).
    pub const fn release(tenant: u32, seq: u64) -> VerdictRepr {
        VerdictRepr {
            op: Op::Release,
            ..VerdictRepr::flush_tenant(tenant, seq)
        }
    }

    /// An [`Op::Attach`] record: `tenant` sits behind switch port `port` (index in the boot
    /// information's device order) and owns `addr` (IPv4 in the first 4 bytes, as
    /// [`v4`] encodes it). `port` `None` (or `Some(PORT_NONE)`) and `addr` `None` (or an
    /// all-zero address) leave that part out. Wire form: op 4, tenant, seq, IP version (4 when
    /// there is no address), local address (zero = none), local port ([`PORT_NONE`] = none),
    /// everything else zero except direction 1 / protocol 6, which the consumer ignores.
    pub const fn attach(
        tenant: u32,
        seq: u64,
        port: Option<u16>,
        addr: Option<(IpVersion, [u8; 16])>,
    ) -> VerdictRepr {
        Self::attach_with_mac(tenant, seq, port, addr, None)
    }

    /// [`VerdictRepr::attach`] that also gives the port its tenant's MAC address (flag
    /// [`ATTACH_FLAG_MAC`], the MAC in the first 6 bytes of the remote address). An all-zero MAC
    /// is no MAC.
    pub const fn attach_with_mac(
        tenant: u32,
        seq: u64,
        port: Option<u16>,
        addr: Option<(IpVersion, [u8; 16])>,
        mac: Option<[u8; 6]>,
    ) -> VerdictRepr {
        let mut rule = Rule::any(Direction::Egress, IpVersion::V4, Protocol::Tcp);
        rule.remote_port_max = 0;
        rule.local_port = match port {
            Some(p) => p,
            None => PORT_NONE,
        };
        if let Some((ip_version, local_addr)) = addr {
            rule.ip_version = ip_version;
            rule.local_addr = local_addr;
        }
        if let Some(m) = mac {
            let mut i = 0;
            while i < 6 {
                rule.remote_addr[i] = m[i];
                i += 1;
            }
        }
        VerdictRepr {
            op: Op::Attach,
            tenant,
            seq,
            lifetime_ms: 0,
            rule,
        }
    }

    /// For an [`Op::Attach`] record: the switch port it names, if any.
    pub const fn attach_port(&self) -> Option<u16> {
        match self.rule.local_port {
            PORT_NONE => None,
            p => Some(p),
        }
    }

    /// For an [`Op::Attach`] record: the MAC address it gives the port, if any.
    pub fn attach_mac(&self) -> Option<[u8; 6]> {
        let r = &self.rule.remote_addr;
        let mac = [r[0], r[1], r[2], r[3], r[4], r[5]];
        (self.op == Op::Attach && mac != [0; 6]).then_some(mac)
    }

    /// For an [`Op::Attach`] record: the address it gives the tenant, if any.
    pub fn attach_addr(&self) -> Option<(IpVersion, [u8; 16])> {
        (self.rule.local_addr != [0; 16]).then_some((self.rule.ip_version, self.rule.local_addr))
    }

    /// Decode and validate a record from raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<VerdictRepr, VerdictError> {
        Self::parse(&Verdict::new_checked(bytes)?)
    }

    /// Write the record into `v` (which must hold [`RECORD_LEN`] bytes; checked).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        v: &mut Verdict<T>,
    ) -> Result<(), VerdictError> {
        v.check_len()?;
        v.bm()[..RECORD_LEN].fill(0);
        v.set_op(self.op as u8);
        v.set_tenant(self.tenant);
        v.set_seq(self.seq);
        v.set_lifetime_ms(self.lifetime_ms);
        let r = &self.rule;
        v.set_direction(r.direction as u8);
        v.set_ip_version(r.ip_version as u8);
        v.set_protocol(r.protocol as u8);
        v.set_local_addr(r.local_addr);
        v.set_remote_addr(r.remote_addr);
        v.set_remote_prefix(r.remote_prefix);
        v.set_local_port(r.local_port);
        v.set_remote_port_min(r.remote_port_min);
        v.set_remote_port_max(r.remote_port_max);
        if self.attach_mac().is_some() {
            v.set_flags(ATTACH_FLAG_MAC);
        }
        if self.op.has_rule() && r.any_local_port {
            v.set_flags(RULE_FLAG_ANY_LOCAL_PORT);
        }
        Ok(())
    }

    /// Encode into a fresh record.
    pub fn to_bytes(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        // Cannot fail: the buffer is exactly RECORD_LEN long.
        let _ = self.emit(&mut Verdict::new_unchecked(&mut out[..]));
        out
    }
}

/// Encode an IPv4 address into the 16-byte field encoding.
pub const fn v4(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VerdictRepr {
        VerdictRepr {
            op: Op::Add,
            tenant: 7,
            seq: 42,
            lifetime_ms: 30_000,
            rule: Rule {
                direction: Direction::Egress,
                ip_version: IpVersion::V4,
                protocol: Protocol::Tcp,
                local_addr: v4([10, 0, 0, 2]),
                local_port: 40_000,
                any_local_port: false,
                remote_addr: v4([10, 0, 0, 5]),
                remote_prefix: 32,
                remote_port_min: 443,
                remote_port_max: 443,
            },
        }
    }

    #[test]
    fn roundtrip_and_layout() {
        let r = sample();
        let bytes = r.to_bytes();
        assert_eq!(bytes[0], 1);
        assert_eq!(bytes[3], 6);
        assert_eq!(&bytes[4..8], &7u32.to_le_bytes());
        assert_eq!(&bytes[24..28], &[10, 0, 0, 2]);
        assert_eq!(&bytes[60..62], &443u16.to_le_bytes());
        assert_eq!(&bytes[58..60], &40_000u16.to_le_bytes());
        assert_eq!(bytes[57], 0, "one local port: no flag");
        assert_eq!(VerdictRepr::from_bytes(&bytes), Ok(r));
    }

    #[test]
    fn port_zero_is_any_only_under_its_flag() {
        // The explicit wildcard round-trips under its flag.
        let any = VerdictRepr::add(
            7,
            1,
            0,
            Rule::egress_to(IpVersion::V4, Protocol::Tcp, v4([10, 0, 0, 5]), 443),
        );
        let b = any.to_bytes();
        assert_eq!(
            (b[57], &b[58..60]),
            (RULE_FLAG_ANY_LOCAL_PORT, &[0u8, 0][..])
        );
        let back = VerdictRepr::from_bytes(&b).unwrap();
        assert_eq!(back, any);
        assert!(back.rule.local_port_matches(1) && back.rule.local_port_matches(65535));
        // Port 0 without the flag (an older producer's "any") is refused.
        let mut old = b;
        old[57] = 0;
        assert_eq!(
            VerdictRepr::from_bytes(&old),
            Err(VerdictError::NoLocalPort)
        );
        // The flag with a port is refused too.
        let mut both = sample().to_bytes();
        both[57] = RULE_FLAG_ANY_LOCAL_PORT;
        assert_eq!(
            VerdictRepr::from_bytes(&both),
            Err(VerdictError::AnyPortWithPort(40_000))
        );
        // In memory, 0 opens nothing unless flagged; an explicit port opens only itself.
        let none = Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Udp);
        assert!(!none.local_port_matches(0) && !none.local_port_matches(7777));
        let one = sample().rule;
        assert!(one.local_port_matches(40_000) && !one.local_port_matches(40_001));
        // Exactly one flow: both addresses, both ports.
        let flow = Rule::egress_flow(
            IpVersion::V4,
            Protocol::Tcp,
            v4([10, 0, 0, 2]),
            40_000,
            v4([10, 0, 0, 5]),
            443,
        );
        assert_eq!(flow, one);
        // The flag means nothing on a flush, and attach keeps its own.
        let mut flush = VerdictRepr::flush_tenant(1, 1).to_bytes();
        flush[57] = RULE_FLAG_ANY_LOCAL_PORT;
        assert_eq!(
            VerdictRepr::from_bytes(&flush),
            Err(VerdictError::ReservedFlags(RULE_FLAG_ANY_LOCAL_PORT))
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().to_bytes();
        for len in 0..RECORD_LEN {
            assert_eq!(
                VerdictRepr::from_bytes(&bytes[..len]),
                Err(VerdictError::Truncated { len })
            );
        }
    }

    #[test]
    fn invalid_fields_rejected() {
        let good = sample().to_bytes();
        let cases: [(usize, u8, VerdictError); 7] = [
            (0, 9, VerdictError::BadOp(9)),
            (1, 0, VerdictError::BadDirection(0)),
            (2, 5, VerdictError::BadIpVersion(5)),
            (3, 2, VerdictError::BadProtocol(2)),
            (3, 58, VerdictError::ProtocolVersionMismatch),
            (56, 33, VerdictError::BadPrefix(33)),
            (57, 1, VerdictError::ReservedFlags(1)),
        ];
        for (off, val, err) in cases {
            let mut b = good;
            b[off] = val;
            assert_eq!(VerdictRepr::from_bytes(&b), Err(err), "offset {off}");
        }
        let mut b = good;
        b[30] = 1; // padding of the IPv4 local address
        assert_eq!(
            VerdictRepr::from_bytes(&b),
            Err(VerdictError::BadIpv4Encoding)
        );
        let mut b = good;
        b[60..62].copy_from_slice(&500u16.to_le_bytes());
        assert_eq!(
            VerdictRepr::from_bytes(&b),
            Err(VerdictError::BadPortRange { min: 500, max: 443 })
        );
    }

    #[test]
    fn op_codes_are_stable() {
        for (op, code) in [
            (Op::Add, 1u8),
            (Op::Remove, 2),
            (Op::FlushTenant, 3),
            (Op::Attach, 4),
            (Op::Adopt, 5),
            (Op::Release, 6),
        ] {
            assert_eq!(op as u8, code);
            assert_eq!(Op::from_u8(code), Some(op));
        }
        assert_eq!(Op::from_u8(0), None);
        assert_eq!(Op::from_u8(7), None);
        let r = VerdictRepr::release(7, 9);
        assert_eq!(VerdictRepr::from_bytes(&r.to_bytes()), Ok(r));
    }

    #[test]
    fn adopt_roundtrips_and_validates_like_add() {
        let r = VerdictRepr::adopt(7, 43, 1000, sample().rule);
        let bytes = r.to_bytes();
        assert_eq!(bytes[0], 5);
        assert_eq!(VerdictRepr::from_bytes(&bytes), Ok(r));
        let mut bad = bytes;
        bad[56] = 40;
        assert_eq!(
            VerdictRepr::from_bytes(&bad),
            Err(VerdictError::BadPrefix(40))
        );
        assert_eq!(VerdictRepr::add(7, 42, 30_000, sample().rule), sample());
    }

    #[test]
    fn attach_roundtrip_and_layout() {
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        let cases = [
            (Some(3), Some((IpVersion::V4, v4([10, 0, 0, 2])))),
            (None, Some((IpVersion::V6, v6))),
            (Some(0), None),
            (None, None),
        ];
        for (port, addr) in cases {
            let r = VerdictRepr::attach(9, 11, port, addr);
            assert_eq!(r.op, Op::Attach);
            assert_eq!(r.attach_port(), port);
            assert_eq!(r.attach_addr(), addr);
            let bytes = r.to_bytes();
            assert_eq!(bytes[0], 4);
            assert_eq!(&bytes[4..8], &9u32.to_le_bytes());
            assert_eq!(&bytes[8..16], &11u64.to_le_bytes());
            assert_eq!(&bytes[58..60], &port.unwrap_or(PORT_NONE).to_le_bytes());
            assert_eq!(&bytes[24..40], &addr.map_or([0; 16], |a| a.1));
            if let Some((version, _)) = addr {
                assert_eq!(bytes[2], version as u8);
            }
            // Unused fields are zero on the wire (direction/protocol aside, which are ignored).
            assert!(bytes[16..24]
                .iter()
                .chain(&bytes[40..58])
                .chain(&bytes[60..])
                .all(|&b| b == 0));
            assert_eq!(VerdictRepr::from_bytes(&bytes), Ok(r), "{port:?} {addr:?}");
        }
        // PORT_NONE is "no port" either way.
        assert_eq!(
            VerdictRepr::attach(1, 1, Some(PORT_NONE), None),
            VerdictRepr::attach(1, 1, None, None)
        );
    }

    #[test]
    fn attach_ignores_unused_fields_and_checks_the_address() {
        let r = VerdictRepr::attach(5, 2, Some(1), Some((IpVersion::V4, v4([10, 0, 0, 7]))));
        let mut b = r.to_bytes();
        // Garbage where an Attach record has nothing to say: ignored.
        b[1] = 0xee;
        b[3] = 0xee;
        b[16..24].fill(0xee);
        b[40..57].fill(0xee);
        b[60..64].fill(0xee);
        assert_eq!(VerdictRepr::from_bytes(&b), Ok(r));
        let mut b = r.to_bytes();
        b[2] = 5;
        assert_eq!(
            VerdictRepr::from_bytes(&b),
            Err(VerdictError::BadIpVersion(5))
        );
        let mut b = r.to_bytes();
        b[35] = 1;
        assert_eq!(
            VerdictRepr::from_bytes(&b),
            Err(VerdictError::BadIpv4Encoding)
        );
        let mut b = r.to_bytes();
        b[57] = 2;
        assert_eq!(
            VerdictRepr::from_bytes(&b),
            Err(VerdictError::ReservedFlags(2))
        );
        // Without an address the version byte does not matter (a producer may leave it 0).
        let mut b = VerdictRepr::attach(5, 2, Some(1), None).to_bytes();
        b[2] = 0;
        assert_eq!(
            VerdictRepr::from_bytes(&b),
            Ok(VerdictRepr::attach(5, 2, Some(1), None))
        );
    }

    #[test]
    fn attach_carries_a_mac_under_its_flag() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let addr = Some((IpVersion::V4, v4([10, 0, 0, 7])));
        let r = VerdictRepr::attach_with_mac(5, 2, Some(1), addr, Some(mac));
        let b = r.to_bytes();
        assert_eq!(b[57], ATTACH_FLAG_MAC);
        assert_eq!(&b[40..46], &mac);
        let back = VerdictRepr::from_bytes(&b).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.attach_mac(), Some(mac));
        // Without the flag (an older producer) the bytes there are ignored: no MAC.
        let old = VerdictRepr::attach(5, 2, Some(1), addr);
        assert_eq!(old.to_bytes()[57], 0);
        assert_eq!(old.attach_mac(), None);
        let mut b2 = b;
        b2[57] = 0;
        assert_eq!(VerdictRepr::from_bytes(&b2), Ok(old));
        // The flag means nothing on other records.
        let mut add = sample().to_bytes();
        add[57] = ATTACH_FLAG_MAC;
        assert_eq!(
            VerdictRepr::from_bytes(&add),
            Err(VerdictError::ReservedFlags(ATTACH_FLAG_MAC))
        );
    }

    #[test]
    fn flush_tenant_uses_only_tenant_and_seq() {
        let r = VerdictRepr::flush_tenant(4, 99);
        let mut b = r.to_bytes();
        assert_eq!(b[0], 3);
        b[24..57].fill(0x55);
        b[58..64].fill(0x55);
        b[1] = 9;
        assert_eq!(VerdictRepr::from_bytes(&b), Ok(r));
    }

    #[test]
    fn prefixes() {
        let a = v4([10, 1, 2, 3]);
        assert!(prefix_matches(&a, &v4([10, 1, 2, 200]), 24));
        assert!(!prefix_matches(&a, &v4([10, 1, 3, 3]), 24));
        assert!(prefix_matches(&a, &v4([10, 1, 3, 3]), 22));
        assert!(!prefix_matches(&a, &v4([10, 1, 4, 3]), 22));
        assert!(prefix_matches(&a, &[0xff; 16], 0));
        assert!(prefix_matches(&a, &a, 128));
    }
}
