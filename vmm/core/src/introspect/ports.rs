//! Exact ports: the points where the guest kernel has given a socket its local port, and the
//! calls that wait there for it.
//!
//! The LSM hooks run before the kernel picks a local port: `connect()` on a TCP socket (the
//! source port comes from `inet_hash_connect`), `listen()` on a socket never bound, a UDP
//! `sendto()`/`connect()` on an unbound socket (autobind in `inet_send_prepare` /
//! `inet_dgram_connect`). Such a call is attributed (and, but for `listen`, decided) at its hook,
//! then kept here, keyed by its `struct sock`, until the function that runs once the port is
//! assigned is entered: `tcp_connect` (saddr, sport, daddr, dport all set; before the SYN is
//! built), `inet_hash`/`inet6_hash` (`inet_csk_listen_start` calls `->hash` right after
//! `->get_port`; before the socket is in the listening hash), `udp_sendmsg`/`udpv6_sendmsg`
//! (after the autobind; before the datagram is built). There an `int3` ("port point", placed like
//! the software hooks) reads the socket's own ends, and the call's verdict opens exactly that
//! flow before the vCPU resumes, or the function returns `-EPERM`, which each caller's own
//! error path handles (`tcp_v4_connect`'s `failure:`, `inet_csk_listen_start` back to CLOSE,
//! `udp_sendmsg` to the caller): fail closed.
//!
//! Owns: the port points and their symbols, the bounded table of waiting calls, reading a
//! socket's local and remote ends from guest memory.
//! Must not: decide by itself (the policy does, through [`super::Introspection`]), trust what it
//! reads (bounded reads; a socket whose ends disagree with what was decided is denied), or grow
//! without bound.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use trap_handler::attribution::Attribution;
use trap_handler::mem::{GuestPhys, MemError, VirtReader};
use trap_handler::profile::{Field, KernelProfile};

/// Where a waiting call is completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortPoint {
    /// `inet_hash` / `inet6_hash` entry, from `inet_csk_listen_start`: the listener's port.
    Listening,
    /// `tcp_connect` entry: the connection's source address and port.
    TcpConnect,
    /// `udp_sendmsg` / `udpv6_sendmsg` entry: the autobound source port.
    UdpSend,
}

impl PortPoint {
    /// The kernel functions (Debian's 6.1) each point traps at the entry of.
    pub const SYMBOLS: [(PortPoint, &'static str); 5] = [
        (PortPoint::Listening, "inet_hash"),
        (PortPoint::Listening, "inet6_hash"),
        (PortPoint::TcpConnect, "tcp_connect"),
        (PortPoint::UdpSend, "udp_sendmsg"),
        (PortPoint::UdpSend, "udpv6_sendmsg"),
    ];

    pub fn name(self) -> &'static str {
        match self {
            PortPoint::Listening => "listening",
            PortPoint::TcpConnect => "tcp_connect",
            PortPoint::UdpSend => "udp_send",
        }
    }
}

/// Most calls waiting for their port at once (per VM). A full table never refuses a call: it
/// makes room (see [`PendingPorts::insert`]).
pub(super) const MAX_PENDING: usize = 256;
/// Most calls one process (thread group) may have waiting at once. Its port point comes in the
/// same system call, on the same task, so a process has about as many genuinely waiting as it
/// has threads in a socket call at that moment; the rest are calls whose port point never came
/// (the call failed in between: no route, no free port; a UDP `connect()` that never sends, as
/// glibc's `getaddrinfo` makes to sort addresses). A process at its cap makes room among its
/// own calls, oldest first: whatever it does, it holds at most this many slots and never takes
/// another process's.
pub(super) const MAX_PENDING_PER_TGID: usize = 16;
/// How long a waiting call keeps its place in a full table. Its port point comes in the same
/// system call, on the same task, under the socket's lock (microseconds of guest time, but many
/// VM exits on a host that emulates guest ring 0: seconds under load), or never (the call
/// failed in between, e.g. no route); only a full table evicts, and calls older than this first.
/// A newer call on the same socket keeps the older one's age (see [`PendingPorts::insert`]).
pub(super) const PENDING_TTL: Duration = Duration::from_secs(60);

/// A call waiting for its port.
#[derive(Clone, Debug)]
pub(super) struct Pending {
    pub sk: u64,
    pub point: PortPoint,
    /// The attributed call (the process, the destination decided on). For a `listen` not yet
    /// decided: the policy decides at the port point, with the port filled in.
    pub attribution: Attribution,
    /// Whether the policy already allowed it (connect, sendmsg) or decides at the port point
    /// (listen: a `ports` rule applies to the port the kernel assigns; any call waiting while
    /// the policy was replaced).
    pub decided: bool,
    /// The epoch of the policy it was decided under (see `Introspection::decide_under_policy`):
    /// its verdict is granted only while that policy is in force.
    pub epoch: u64,
    /// VMM work at the LSM hook, added to the call's event.
    pub work_ns: u64,
    pub since: Instant,
}

/// A call that was waiting for its port when its tenant migrated (or was snapshotted): what the
/// target needs to fail it closed at its port point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingCall {
    pub sk: u64,
    pub point: PortPoint,
    pub tgid: u32,
}

/// The bounded table of waiting calls (see [`MAX_PENDING`]).
#[derive(Default)]
pub(super) struct PendingPorts {
    calls: Vec<Pending>,
    /// Calls that waited on the source host of a migration. Not completed here (their decision
    /// stayed on the source): at their port point they fail closed, -EPERM, with an event.
    /// At most [`MAX_PENDING`], each kept [`PENDING_TTL`].
    migrated: Vec<(WaitingCall, Instant)>,
    /// Calls that left the table without reaching their port point, and why: the guest's call
    /// returned already, so each still owes its event
    /// ([`take_unfinished`](Self::take_unfinished)). At most [`MAX_PENDING`] (older ones go
    /// first).
    unfinished: Vec<(Pending, Left)>,
}

/// Why a call left the table without reaching its port point. It opened nothing (no verdict
/// was issued for it): if its port point still comes, it passes with no call waiting, and its
/// flow stays closed at the tiers (fail closed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Left {
    /// A newer call on its socket took its place.
    Replaced,
    /// Its socket was freed and reused (another process or point at that `struct sock`).
    Reused,
    /// Older than [`PENDING_TTL`] in a full table.
    Expired,
    /// Its process had [`MAX_PENDING_PER_TGID`] calls waiting and made another: its oldest went.
    ProcessFull,
    /// The table was full and its process held the most calls waiting (at least as many as the
    /// process of the call that needed room): its oldest went.
    TableFull,
    /// The VM stopped first.
    VmStopped,
}

impl Left {
    /// For the call's event.
    pub(super) fn why(self) -> &'static str {
        match self {
            Left::Replaced => "a newer call on its socket came first",
            Left::Reused => "its socket was freed and reused",
            Left::Expired => "it waited longer than its time in a full table",
            Left::ProcessFull => {
                "its process made more calls waiting for their port than it may hold; its oldest \
                 went"
            }
            Left::TableFull => {
                "the table of waiting calls was full and its process held the most of them; its \
                 oldest went"
            }
            Left::VmStopped => {
                "the VM stopped first (had it migrated, its target denies the call at the port \
                 point, with an event of its own)"
            }
        }
    }
}

impl PendingPorts {
    /// Keeps `call` until its port point. Never refuses, and never lets one process take another
    /// process's place beyond its share:
    ///
    /// - a newer call on the same socket replaces the older and keeps its age (`since`), where
    ///   that call is the same process's or not yet expired: calling `listen()` or `connect()`
    ///   again on a socket whose port point never comes does not keep its slot alive;
    /// - a process with [`MAX_PENDING_PER_TGID`] calls waiting loses its own oldest;
    /// - a full table drops what is older than [`PENDING_TTL`], then the oldest call of the
    ///   process holding the most (the caller's own when it holds as many as any): a process with
    ///   few calls waiting always gets a place, at the cost of the heaviest holder.
    ///
    /// Calls that leave are kept for their events ([`take_unfinished`](Self::take_unfinished)).
    /// Allocates nothing once the table's vectors have grown.
    pub fn insert(&mut self, mut call: Pending, now: Instant) {
        let tgid = call.attribution.process.tgid;
        if let Some(at) = self.calls.iter().position(|c| c.sk == call.sk) {
            let old = self.calls.swap_remove(at);
            if old.attribution.process.tgid == tgid
                || now.saturating_duration_since(old.since) < PENDING_TTL
            {
                call.since = call.since.min(old.since);
            }
            self.unfinished(old, Left::Replaced);
        }
        let (own, own_oldest) = self.held_by(tgid);
        if own >= MAX_PENDING_PER_TGID {
            if let Some(at) = own_oldest {
                self.evict(at, Left::ProcessFull);
            }
        }
        if self.calls.len() >= MAX_PENDING {
            let mut i = 0;
            while i < self.calls.len() {
                if now.saturating_duration_since(self.calls[i].since) >= PENDING_TTL {
                    self.evict(i, Left::Expired);
                } else {
                    i += 1;
                }
            }
        }
        if self.calls.len() >= MAX_PENDING {
            if let Some(at) = self.heaviest_holders_oldest(tgid) {
                self.evict(at, Left::TableFull);
            }
        }
        self.calls.push(call);
    }

    /// How many calls thread group `tgid` has waiting, and where its oldest is.
    fn held_by(&self, tgid: u32) -> (usize, Option<usize>) {
        let mut count = 0;
        let mut oldest: Option<usize> = None;
        for (i, c) in self.calls.iter().enumerate() {
            if c.attribution.process.tgid == tgid {
                count += 1;
                if oldest.is_none_or(|o| c.since < self.calls[o].since) {
                    oldest = Some(i);
                }
            }
        }
        (count, oldest)
    }

    /// The call to evict from a full table for a call of `tgid`: the oldest of the thread group
    /// holding the most calls, `tgid`'s own when it holds at least as many as any other (ties
    /// never cost another process). O(n log n) over a stack array: no allocation.
    fn heaviest_holders_oldest(&self, tgid: u32) -> Option<usize> {
        let n = self.calls.len().min(MAX_PENDING);
        let mut by_tgid = [(0u32, 0u16); MAX_PENDING];
        for (i, c) in self.calls.iter().take(n).enumerate() {
            by_tgid[i] = (c.attribution.process.tgid, i as u16);
        }
        by_tgid[..n].sort_unstable();
        // (count, oldest call's index) of the heaviest other holder, and of `tgid`.
        let mut heaviest: Option<(usize, usize)> = None;
        let mut own: Option<(usize, usize)> = None;
        for group in by_tgid[..n].chunk_by(|a, b| a.0 == b.0) {
            let oldest = group
                .iter()
                .map(|&(_, i)| usize::from(i))
                .min_by_key(|&i| self.calls[i].since)?;
            let held = (group.len(), oldest);
            if group[0].0 == tgid {
                own = Some(held);
            } else if heaviest.is_none_or(|(count, at)| {
                group.len() > count
                    || (group.len() == count && self.calls[oldest].since < self.calls[at].since)
            }) {
                heaviest = Some(held);
            }
        }
        match (own, heaviest) {
            (Some((mine, at)), Some((theirs, _))) if mine >= theirs => Some(at),
            (Some((_, at)), None) => Some(at),
            (_, Some((_, at))) => Some(at),
            (None, None) => None,
        }
    }

    fn evict(&mut self, at: usize, why: Left) {
        let old = self.calls.swap_remove(at);
        self.unfinished(old, why);
    }

    /// Takes the call waiting on `sk` at `point` for thread group `tgid`, if one is there. A
    /// call on `sk` of another point or process is dropped (a stale entry whose socket was freed
    /// and reused must not lend its verdict).
    pub fn take(&mut self, sk: u64, point: PortPoint, tgid: u32) -> Option<Pending> {
        let at = self.calls.iter().position(|c| c.sk == sk)?;
        let call = self.calls.swap_remove(at);
        if call.point == point && call.attribution.process.tgid == tgid {
            return Some(call);
        }
        self.unfinished(call, Left::Reused);
        None
    }

    fn unfinished(&mut self, call: Pending, why: Left) {
        if self.unfinished.len() >= MAX_PENDING {
            self.unfinished.remove(0);
        }
        self.unfinished.push((call, why));
    }

    /// The calls that left without reaching their port point since the last look, and why (see
    /// `unfinished`).
    pub fn take_unfinished(&mut self) -> Vec<(Pending, Left)> {
        std::mem::take(&mut self.unfinished)
    }

    /// Every call still waiting, and those that left unfinished: the VM stopped, none will
    /// reach its port point.
    pub fn take_all(&mut self) -> Vec<(Pending, Left)> {
        let mut all = std::mem::take(&mut self.unfinished);
        all.extend(self.calls.drain(..).map(|c| (c, Left::VmStopped)));
        all
    }

    /// Every waiting call is decided again at its port point, by the policy then in force (a
    /// policy replacement: nothing the old policy allowed is granted after it).
    pub fn undecide_all(&mut self) {
        self.calls.iter_mut().for_each(|c| c.decided = false);
    }

    #[cfg(test)]
    pub fn clear(&mut self) {
        self.calls.clear();
        self.migrated.clear();
        self.unfinished.clear();
    }

    /// Calls waiting, and calls a migration left stranded.
    pub fn len(&self) -> usize {
        self.calls.len() + self.migrated.len()
    }

    /// The calls waiting now, for a migration (see [`WaitingCall`]).
    pub fn export(&self) -> Vec<WaitingCall> {
        self.calls
            .iter()
            .map(|c| WaitingCall {
                sk: c.sk,
                point: c.point,
                tgid: c.attribution.process.tgid,
            })
            .chain(self.migrated.iter().map(|(w, _)| *w))
            .take(MAX_PENDING)
            .collect()
    }

    /// Takes over a migrated tenant's waiting calls, to fail them closed (at most
    /// [`MAX_PENDING`]).
    pub fn import(&mut self, waiting: &[WaitingCall], now: Instant) {
        self.migrated = waiting
            .iter()
            .take(MAX_PENDING)
            .map(|w| (*w, now))
            .collect();
    }

    /// Whether a call on `sk` at `point` of thread group `tgid` waited across a migration (then
    /// it is denied). Each entry answers once; entries older than [`PENDING_TTL`] go.
    pub fn take_migrated(&mut self, sk: u64, point: PortPoint, tgid: u32, now: Instant) -> bool {
        self.migrated
            .retain(|(_, since)| now.saturating_duration_since(*since) < PENDING_TTL);
        let Some(at) = self.migrated.iter().position(|(w, _)| w.sk == sk) else {
            return false;
        };
        let (w, _) = self.migrated.swap_remove(at);
        w.point == point && w.tgid == tgid
    }
}

/// A socket's own ends, as the kernel holds them (`struct sock_common`). Unspecified addresses
/// are `None`; an IPv6 socket whose peer is IPv4-mapped reports its IPv4 fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SockEnds {
    pub local: Option<IpAddr>,
    pub local_port: u16,
    pub remote: Option<IpAddr>,
    pub remote_port: u16,
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// Largest span of a `struct sock` [`read_ends`] reads at once (`skc_daddr` ..
/// `skc_v6_rcv_saddr`: 88 bytes on 6.1).
const SOCK_COMMON_SPAN: usize = 256;

fn specified(addr: IpAddr) -> Option<IpAddr> {
    (!addr.is_unspecified()).then_some(addr)
}

/// The `struct sock` of a `struct socket` (the LSM hooks' first argument).
pub(super) fn sock_of<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    profile: &KernelProfile,
    socket: u64,
) -> Result<u64, MemError> {
    r.read_field_u64(socket, profile.socket.sk.offset)
}

/// Reads `sk`'s ends (bounded reads of guest memory; nothing here is trusted beyond its type);
/// `None` for a socket that is not IPv4 or IPv6.
pub(super) fn read_ends<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    profile: &KernelProfile,
    sk: u64,
) -> Result<Option<SockEnds>, MemError> {
    let s = &profile.sock;
    // One read of the socket's common part (`struct sock_common`: 88 bytes on 6.1).
    let fields = [
        s.skc_family,
        s.skc_num,
        s.skc_dport,
        s.skc_rcv_saddr,
        s.skc_daddr,
        s.skc_v6_daddr,
        s.skc_v6_rcv_saddr,
    ];
    let lo = fields.iter().map(|f| f.offset).min().unwrap_or(0);
    let hi = fields.iter().map(|f| f.offset + f.size).max().unwrap_or(0);
    let mut buf = [0u8; SOCK_COMMON_SPAN];
    let span = r.read_span(sk, lo, hi, &mut buf)?;
    let family = span.u16(s.skc_family.offset);
    let local_port = span.u16(s.skc_num.offset);
    let remote_port = u16::from_be(span.u16(s.skc_dport.offset));
    let v4 = |f: Field| {
        let mut ip = [0u8; 4];
        ip.copy_from_slice(span.bytes(f.offset, 4));
        IpAddr::V4(Ipv4Addr::from(ip))
    };
    let v6 = |f: Field| {
        let mut ip = [0u8; 16];
        ip.copy_from_slice(span.bytes(f.offset, 16));
        Ipv6Addr::from(ip)
    };
    let (local, remote) = match family {
        AF_INET => (v4(s.skc_rcv_saddr), v4(s.skc_daddr)),
        AF_INET6 => {
            let remote = v6(s.skc_v6_daddr);
            if remote.to_ipv4_mapped().is_some() {
                // tcp_v6_connect / udpv6_sendmsg hand an IPv4-mapped peer to the IPv4 code,
                // which fills the IPv4 fields.
                (v4(s.skc_rcv_saddr), v4(s.skc_daddr))
            } else {
                (IpAddr::V6(v6(s.skc_v6_rcv_saddr)), IpAddr::V6(remote))
            }
        }
        // Not an IP socket: no ends.
        _ => return Ok(None),
    };
    Ok(Some(SockEnds {
        local: specified(local),
        local_port,
        remote: specified(remote),
        remote_port,
    }))
}

/// The address as the tiers see it: IPv4-mapped IPv6 is IPv4.
pub(super) fn unmapped(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trap_handler::attribution::{Process, SocketOp};

    fn call(sk: u64, tgid: u32, point: PortPoint, since: Instant) -> Pending {
        Pending {
            sk,
            point,
            attribution: Attribution {
                op: SocketOp::Connect,
                family: 2,
                sock_type: 1,
                protocol: 6,
                addr: Some("10.0.0.1".parse().unwrap()),
                port: Some(80),
                foreign_sockaddr: None,
                v6only: false,
                process: Process {
                    pid: tgid,
                    tgid,
                    comm: "nc".into(),
                    exe: None,
                    uid: 0,
                    ppid: 1,
                    parent_comm: "sh".into(),
                    exe_file: None,
                    exe_error: None,
                },
                identity_error: None,
            },
            decided: true,
            epoch: 0,
            work_ns: 0,
            since,
        }
    }

    #[test]
    fn a_waiting_call_is_taken_once_by_its_socket_point_and_process() {
        let now = Instant::now();
        let mut p = PendingPorts::default();
        p.insert(call(0x1000, 7, PortPoint::TcpConnect, now), now);
        assert!(p.take(0x2000, PortPoint::TcpConnect, 7).is_none());
        assert!(p.take(0x1000, PortPoint::TcpConnect, 7).is_some());
        assert!(p.take(0x1000, PortPoint::TcpConnect, 7).is_none(), "once");
        // Another process, or another point, on the same socket: dropped, never lent.
        p.insert(call(0x1000, 7, PortPoint::TcpConnect, now), now);
        assert!(p.take(0x1000, PortPoint::TcpConnect, 8).is_none());
        assert_eq!(p.len(), 0, "the stale entry is gone");
        p.insert(call(0x1000, 7, PortPoint::Listening, now), now);
        assert!(p.take(0x1000, PortPoint::UdpSend, 7).is_none());
        // A slow guest (many exits between the hook and the port point) still finds its call.
        p.insert(call(0x1000, 7, PortPoint::TcpConnect, now), now);
        assert!(p.take(0x1000, PortPoint::TcpConnect, 7).is_some());
    }

    /// A call that leaves without its port point (replaced on its socket, its socket reused by
    /// another process, or the VM stopping) is kept for its event: every call gets exactly one.
    #[test]
    fn calls_that_never_reach_their_port_point_still_owe_their_event() {
        let now = Instant::now();
        let mut p = PendingPorts::default();
        p.insert(call(0x1000, 7, PortPoint::UdpSend, now), now);
        assert!(p.take_unfinished().is_empty(), "waiting is not unfinished");
        // A newer call on the same socket replaces it.
        p.insert(call(0x1000, 7, PortPoint::UdpSend, now), now);
        let replaced = p.take_unfinished();
        assert_eq!(replaced.len(), 1);
        assert_eq!((replaced[0].0.sk, replaced[0].1), (0x1000, Left::Replaced));
        // The socket freed and reused by another process: the stale call is unfinished.
        assert!(p.take(0x1000, PortPoint::UdpSend, 8).is_none());
        let reused = p.take_unfinished();
        assert_eq!((reused.len(), reused[0].1), (1, Left::Reused));
        // The VM stops: whatever still waits is handed over, once.
        p.insert(call(0x2000, 7, PortPoint::UdpSend, now), now);
        p.insert(call(0x3000, 7, PortPoint::TcpConnect, now), now);
        let all = p.take_all();
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|(_, left)| *left == Left::VmStopped));
        assert!(p.take_all().is_empty());
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn calls_waiting_across_a_migration_fail_closed_once_on_the_target() {
        let now = Instant::now();
        let mut source = PendingPorts::default();
        source.insert(call(0x1000, 7, PortPoint::TcpConnect, now), now);
        source.insert(call(0x2000, 8, PortPoint::Listening, now), now);
        let waiting = source.export();
        assert_eq!(waiting.len(), 2);
        // The state travels as JSON.
        let text = serde_json::to_string(&waiting).unwrap();
        let waiting: Vec<WaitingCall> = serde_json::from_str(&text).unwrap();

        let mut target = PendingPorts::default();
        target.import(&waiting, now);
        assert_eq!(target.len(), 2, "the port points look, not pass untouched");
        // Not a call to complete: nothing to take.
        assert!(target.take(0x1000, PortPoint::TcpConnect, 7).is_none());
        assert!(target.take_migrated(0x1000, PortPoint::TcpConnect, 7, now));
        assert!(
            !target.take_migrated(0x1000, PortPoint::TcpConnect, 7, now),
            "once"
        );
        // Another process on a reused socket is not the stranded call (and clears it).
        assert!(!target.take_migrated(0x2000, PortPoint::Listening, 99, now));
        assert_eq!(target.len(), 0);
        // A stranded call whose port point never comes goes after the TTL.
        target.import(&waiting, now);
        assert!(!target.take_migrated(0x3000, PortPoint::UdpSend, 1, now + PENDING_TTL));
        assert_eq!(target.len(), 0);
        // Bounded whatever the state says.
        let many = vec![waiting[0]; 10 * MAX_PENDING];
        target.import(&many, now);
        assert_eq!(target.len(), MAX_PENDING);
    }

    /// Whether `sk`'s call is waiting.
    fn waits(p: &PendingPorts, sk: u64) -> bool {
        p.calls.iter().any(|c| c.sk == sk)
    }

    /// How many calls `tgid` has waiting.
    fn held(p: &PendingPorts, tgid: u32) -> usize {
        p.held_by(tgid).0
    }

    #[test]
    fn the_table_is_bounded_and_old_calls_make_room() {
        let t0 = Instant::now();
        let mut p = PendingPorts::default();
        // One call each of MAX_PENDING processes.
        for sk in 0..MAX_PENDING as u64 {
            p.insert(call(sk, sk as u32, PortPoint::TcpConnect, t0), t0);
        }
        // A newer call on a socket already waiting replaces it.
        p.insert(call(3, 3, PortPoint::TcpConnect, t0), t0);
        assert_eq!(p.len(), MAX_PENDING);
        assert_eq!(p.take_unfinished().len(), 1);
        let later = t0 + PENDING_TTL;
        p.insert(call(9999, 1, PortPoint::TcpConnect, later), later);
        assert_eq!(p.len(), 1, "the expired calls went");
        let left = p.take_unfinished();
        assert_eq!(left.len(), MAX_PENDING);
        assert!(left.iter().all(|(_, why)| *why == Left::Expired));
        p.undecide_all();
        assert!(!p.take(9999, PortPoint::TcpConnect, 1).unwrap().decided);
        p.clear();
        assert_eq!(p.len(), 0);
    }

    /// One process making calls whose port point never comes (listen() with every local port
    /// taken, connect() with no route, in a network namespace of its own) holds at most its
    /// share; another process's calls still wait, and its own older ones make room.
    #[test]
    fn one_process_cannot_fill_the_table() {
        let t0 = Instant::now();
        let mut p = PendingPorts::default();
        p.insert(call(0x1, 7, PortPoint::TcpConnect, t0), t0);
        for sk in 0..10 * MAX_PENDING as u64 {
            let now = t0 + Duration::from_millis(sk);
            p.insert(call(0x10_000 + sk, 666, PortPoint::Listening, now), now);
            assert!(held(&p, 666) <= MAX_PENDING_PER_TGID);
        }
        assert_eq!(held(&p, 666), MAX_PENDING_PER_TGID);
        assert!(waits(&p, 0x1), "another process's call is never taken");
        // Its newest calls stay, its oldest went, each with its event.
        assert!(waits(&p, 0x10_000 + 10 * MAX_PENDING as u64 - 1));
        let left = p.take_unfinished();
        assert_eq!(left.len(), MAX_PENDING, "the newest of them, bounded");
        assert!(left
            .iter()
            .all(|(c, why)| *why == Left::ProcessFull && c.attribution.process.tgid == 666));
        // A process calling from another one still gets its place.
        let now = t0 + Duration::from_secs(1);
        p.insert(call(0x2, 8, PortPoint::UdpSend, now), now);
        assert!(waits(&p, 0x1) && waits(&p, 0x2));
    }

    /// Many processes each at their cap fill the table: a process with fewer calls waiting
    /// still gets a place, taken from the heaviest holder, and the heavy holders then make room
    /// among their own calls, never its.
    #[test]
    fn a_full_table_makes_room_at_the_heaviest_holder() {
        let t0 = Instant::now();
        let mut p = PendingPorts::default();
        let attackers = (MAX_PENDING / MAX_PENDING_PER_TGID) as u32;
        let mut sk = 0x10_000;
        let mut fill = |p: &mut PendingPorts, now: Instant| {
            for tgid in 1000..1000 + attackers {
                for _ in 0..MAX_PENDING_PER_TGID {
                    sk += 1;
                    p.insert(call(sk, tgid, PortPoint::Listening, now), now);
                }
            }
        };
        fill(&mut p, t0);
        assert_eq!(p.len(), MAX_PENDING);
        p.take_unfinished();
        // A victim's connect: in, and what left is an attacker's oldest.
        let now = t0 + Duration::from_secs(1);
        p.insert(call(0x1, 7, PortPoint::TcpConnect, now), now);
        assert!(waits(&p, 0x1));
        let left = p.take_unfinished();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1, Left::TableFull);
        assert!(left[0].0.attribution.process.tgid >= 1000);
        // The attackers keep making calls: each evicts its own, the victim's call stays.
        fill(&mut p, now + Duration::from_secs(1));
        assert!(waits(&p, 0x1));
        assert_eq!(p.len(), MAX_PENDING);
        // Equal holders: the caller's own call goes, not another's of the same weight.
        let mut p = PendingPorts::default();
        for sk in 0..MAX_PENDING as u64 {
            p.insert(call(sk, sk as u32, PortPoint::TcpConnect, t0), t0);
        }
        p.take_unfinished();
        p.insert(call(0x5_000, 3, PortPoint::TcpConnect, now), now);
        let left = p.take_unfinished();
        assert_eq!((left[0].0.sk, left[0].1), (3, Left::TableFull));
        assert_eq!(p.len(), MAX_PENDING);
    }

    /// Calling again on a socket whose port point never comes (listen() every minute) does not
    /// renew its call's place: the call keeps its first age and expires from a full table.
    #[test]
    fn calling_again_on_a_waiting_socket_keeps_its_age() {
        let t0 = Instant::now();
        let mut p = PendingPorts::default();
        p.insert(call(0x1, 666, PortPoint::Listening, t0), t0);
        // The socket handed to another process of the attacker's (fork) within its time: the
        // same.
        let now = t0 + PENDING_TTL - Duration::from_secs(1);
        p.insert(call(0x1, 667, PortPoint::Listening, now), now);
        assert_eq!(p.calls[0].since, t0);
        for minute in 1..=5u32 {
            let now = t0 + PENDING_TTL * minute + Duration::from_secs(1);
            p.insert(call(0x1, 667, PortPoint::Listening, now), now);
            assert_eq!(p.calls[0].since, t0, "minute {minute}");
        }
        let now = t0 + PENDING_TTL * 6;
        // A full table: it is the expired one that goes.
        for sk in 0..MAX_PENDING as u64 - 1 {
            p.insert(call(0x100 + sk, sk as u32, PortPoint::TcpConnect, now), now);
        }
        p.take_unfinished();
        p.insert(call(0x2, 7, PortPoint::TcpConnect, now), now);
        assert!(!waits(&p, 0x1) && waits(&p, 0x2));
        let left = p.take_unfinished();
        assert_eq!(
            (left.len(), left[0].0.sk, left[0].1),
            (1, 0x1, Left::Expired)
        );
        // A stale call of another process on a socket since freed and reused lends no age past
        // its time: the new call is fresh.
        let mut p = PendingPorts::default();
        p.insert(call(0x1, 5, PortPoint::UdpSend, t0), t0);
        let now = t0 + PENDING_TTL * 2;
        p.insert(call(0x1, 9, PortPoint::TcpConnect, now), now);
        assert_eq!(p.calls[0].since, now);
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        assert_eq!(
            unmapped("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            unmapped("fd00::1".parse().unwrap()),
            "fd00::1".parse::<IpAddr>().unwrap()
        );
    }
}
