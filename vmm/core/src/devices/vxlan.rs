//! A VXLAN tunnel endpoint in user space (RFC 7348): Ethernet frames of a virtio-net device
//! travel inside UDP datagrams to other Vigil nodes. A host's switch-tier uplink and an edge
//! node's cloud port are such endpoints; the guest behind them sees plain Ethernet.
//!
//! Forwarding follows a VXLAN bridge's FDB: the sender of each datagram is learned as the home of
//! the inner frame's source MAC; a frame to a learned MAC goes to that peer alone, anything else
//! (broadcast, multicast, unknown) to every configured and learned peer. A tenant that migrates
//! is learned at its new host as soon as a frame of it arrives from there, and at an edge as soon
//! as its address is bound to the new host (below).
//!
//! The underlay (the hosts' network) is trusted to carry frames, not verdicts: verdicts travel on
//! their own authenticated channel. Datagrams that are not VXLAN, or carry another VNI, are
//! dropped and counted.
//!
//! Who may send: an endpoint with configured peers (a host's switch uplink, whose peer is its
//! edge) takes frames only from those peers' underlay addresses; an endpoint given a
//! [`PeerTrust`] (an edge's cloud port) also from the addresses in it: the edge node puts there
//! the address of each host that authenticated on the verdict channel. A frame from any other UDP
//! sender is dropped and counted (`rx_unauthenticated`, and [`PeerTrust::refused`]): it is
//! neither delivered nor learned, so it cannot move a MAC's location. The check is by source IP
//! address: it holds as far as the underlay keeps one host from sending with another's address
//! (what a VXLAN underlay must do anyway, as VXLAN itself authenticates nothing, RFC 7348 §7). An
//! endpoint with neither peers nor a trust set (a standalone `--net local=`) learns from any
//! sender, as a VXLAN bridge does.
//!
//! Whose addresses: a [`PeerTrust`] also binds tenant addresses to the host that attached them
//! ([`PeerTrust::bind`]; the edge node keeps it in step with its attachments) and marks the
//! underlay's own addresses as nobody's. A frame from a trusted host whose source address (for
//! ARP the sender address, for neighbour discovery the target too) is bound to another host, or
//! to nobody, is dropped and counted (`rx_foreign_source`, [`PeerTrust::foreign`]) before it is
//! delivered or learned: a host's data path speaks only for the tenants that host attached. An
//! address bound to no one passes here; the edge's firewall drops it (`unknown_tenant`).
//!
//! Where bound addresses live: with a [`PeerTrust`], each learned MAC also remembers the address
//! its last frame spoke for. When that address is bound to another host (a migration's handover,
//! or a flush and a new attach: [`PeerTrust::moves`]), the MAC is re-pointed at the new host
//! before the next frame goes out: at the port the new host's other frames came from, else this
//! endpoint's own port (VXLAN endpoints share one, 4789). The bindings, which follow the
//! authenticated channel, decide; the migrated tenant's announcement, or its first frame, only
//! confirms it. Without that, a lost announcement left the tenant's traffic going to the host it
//! left until the tenant spoke.
//!
//! Batches: the device's frames move [`BATCH`] datagrams per system call (`recvmmsg`,
//! `sendmmsg`: [`mmsg`]), each frame straight into or out of its batch slot. Slots are
//! [`BATCH_SLOT`] bytes: every frame a switch or edge micro-VM sends fits (its buffers are 2 KiB);
//! a larger frame to send goes out alone, a larger datagram received is dropped and counted
//! (`rx_dropped`). `VIGIL_VXLAN_IO=frame` moves one datagram per call (the benchmark's baseline).
//!
//! Owns: the VXLAN encapsulation, the learned FDB, the peers, who may send, and the drop
//! counters. Must not: forward a datagram of another VNI, one that is not VXLAN, one from an
//! untrusted sender, or one speaking for an address bound to another sender; carry verdicts; or
//! allocate per frame sent (the datagram and its targets are reused; only the first frame after
//! a binding moved walks the learned MACs, and may allocate for those to re-point).

mod mmsg;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::devices::virtio::net::{FrameBatch, FrameLink, BATCH};

/// IANA-assigned VXLAN UDP port (RFC 7348 §5).
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN header: flags (I bit = 0x08), 3 reserved bytes, 24-bit VNI, 1 reserved byte.
pub const VXLAN_HEADER_LEN: usize = 8;
const FLAG_VNI_VALID: u8 = 0x08;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Learned MAC addresses kept (a full table stops learning; floods still reach everyone).
const MAX_LEARNED: usize = 4096;

/// Bytes per batch slot (a frame; its VXLAN header travels apart): the micro-VMs' 2 KiB
/// buffers, less their 12-byte virtio-net header, fit with room to spare.
pub const BATCH_SLOT: usize = 2048;

/// Whether VXLAN endpoints batch their I/O: yes unless `VIGIL_VXLAN_IO=frame`.
fn batching_wanted() -> bool {
    std::env::var("VIGIL_VXLAN_IO").map_or(true, |v| v != "frame")
}

/// Underlay addresses trusted at most (hosts of one edge).
pub const MAX_TRUSTED: usize = 4096;

/// The underlay addresses an endpoint takes frames from, shared with whoever vouches for them
/// (the edge node adds each host that authenticated on the verdict channel), and the tenant
/// addresses each of them may send from.
#[derive(Default)]
pub struct PeerTrust {
    state: RwLock<TrustState>,
    /// Addresses bound to a new host (see [`PeerTrust::moves`]).
    moves: AtomicU64,
    /// Datagrams refused because their sender was not trusted (every endpoint using the set).
    refused: AtomicU64,
    /// Frames refused because they spoke for an address bound to another sender, or to nobody.
    foreign: AtomicU64,
}

#[derive(Default)]
struct TrustState {
    addrs: HashSet<IpAddr>,
    /// Attached address → the underlay address of the host that attached it (`None`: nobody
    /// may send from it, an underlay address).
    bound: HashMap<IpAddr, Option<IpAddr>>,
}

/// Most bound addresses (the edge's firewall holds 256; this is a wide margin).
pub const MAX_BOUND: usize = 65_536;

/// What a [`PeerTrust`] says about one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// From a trusted sender, speaking only for its own addresses (or unbound ones).
    Pass,
    /// From an untrusted sender.
    Untrusted,
    /// From a trusted sender, speaking for an address bound to another sender or to nobody.
    Foreign,
}

impl PeerTrust {
    pub fn new() -> Arc<PeerTrust> {
        Arc::new(PeerTrust::default())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, TrustState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, TrustState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Trusts `ip` from now on; false when [`MAX_TRUSTED`] addresses are trusted already.
    pub fn trust(&self, ip: IpAddr) -> bool {
        if self.contains(ip) {
            return true;
        }
        let mut state = self.write();
        if state.addrs.len() >= MAX_TRUSTED {
            return false;
        }
        state.addrs.insert(ip);
        true
    }

    /// Trusts `ip` no more (a host that moved to another underlay address).
    pub fn untrust(&self, ip: IpAddr) {
        self.write().addrs.remove(&ip);
    }

    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.read().addrs.contains(&ip)
    }

    /// Binds attached address `addr` to the underlay sender `host` (`None`: to nobody, for the
    /// underlay's own addresses); false when [`MAX_BOUND`] addresses are bound already.
    pub fn bind(&self, addr: IpAddr, host: Option<IpAddr>) -> bool {
        let mut state = self.write();
        if state.bound.len() >= MAX_BOUND && !state.bound.contains_key(&addr) {
            return false;
        }
        let before = state.bound.insert(addr, host);
        if host.is_some() && before != Some(host) {
            self.moves.fetch_add(1, Ordering::Release);
        }
        true
    }

    /// How many times an address was bound to a host it was not bound to just before (a
    /// migration's handover; also a first binding, or one after an unbind, which may follow
    /// a host's flush): an endpoint that sees it change re-points the MACs it learned for
    /// addresses that now live elsewhere.
    #[inline]
    pub fn moves(&self) -> u64 {
        self.moves.load(Ordering::Acquire)
    }

    /// Releases `addr` (detached or flushed): any trusted sender may speak for it again (and the
    /// firewall drops it for want of an owner).
    pub fn unbind(&self, addr: IpAddr) {
        self.write().bound.remove(&addr);
    }

    /// Who `addr` is bound to: `None` unbound, `Some(None)` nobody, `Some(Some(host))`.
    pub fn binding(&self, addr: IpAddr) -> Option<Option<IpAddr>> {
        self.read().bound.get(&addr).copied()
    }

    /// Bound addresses.
    pub fn bound_len(&self) -> usize {
        self.read().bound.len()
    }

    /// Judges a datagram from `from` whose inner frame is `frame` (`None`: not VXLAN of ours;
    /// only the sender is judged), with `peers` trusted too. Counts what it refuses.
    #[inline]
    pub fn judge(&self, from: IpAddr, peers: &[IpAddr], frame: Option<&[u8]>) -> Judgement {
        let state = self.read();
        if !state.addrs.contains(&from) && !peers.contains(&from) {
            drop(state);
            bump(&self.refused);
            return Judgement::Untrusted;
        }
        if state.bound.is_empty() {
            return Judgement::Pass;
        }
        let Some(frame) = frame else {
            return Judgement::Pass;
        };
        let own = |a: Option<IpAddr>| match a.and_then(|a| state.bound.get(&a)) {
            None => true,
            Some(host) => *host == Some(from),
        };
        let (first, second) = claims(frame);
        if own(first) && own(second) {
            Judgement::Pass
        } else {
            drop(state);
            bump(&self.foreign);
            Judgement::Foreign
        }
    }

    /// Datagrams refused so far because their sender was not trusted.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Frames refused so far because they spoke for an address bound to another sender.
    pub fn foreign(&self) -> u64 {
        self.foreign.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.read().addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;

/// The addresses an Ethernet frame speaks for: an IPv4 or IPv6 packet's source, an ARP packet's
/// sender address, and a neighbour solicitation's or advertisement's target (RFC 4861 §4.3/4.4;
/// with no other IPv6 header before it). One 802.1Q tag is looked through, as the firewall does
/// (it drops a second tag). Anything shorter than its header claims nothing (the firewall drops
/// it as malformed). No allocation, no copy.
pub fn claims(frame: &[u8]) -> (Option<IpAddr>, Option<IpAddr>) {
    let ethertype = |at: usize| {
        frame
            .get(at..at + 2)
            .map(|t| u16::from_be_bytes([t[0], t[1]]))
    };
    let (ethertype, at) = match ethertype(12) {
        Some(ETHERTYPE_VLAN) => (ethertype(16), 18),
        other => (other, 14),
    };
    let body = frame.get(at..).unwrap_or_default();
    let v4 = |b: &[u8]| -> Option<IpAddr> {
        let a: [u8; 4] = b.try_into().ok()?;
        Some(IpAddr::from(a))
    };
    let v6 = |b: &[u8]| -> Option<IpAddr> {
        let a: [u8; 16] = b.try_into().ok()?;
        Some(IpAddr::from(a))
    };
    match ethertype {
        Some(ETHERTYPE_IPV4) => (body.get(12..16).and_then(v4), None),
        // RFC 826: sender protocol address after htype, ptype, hlen, plen, op and the sender MAC.
        Some(ETHERTYPE_ARP) => (body.get(14..18).and_then(v4), None),
        Some(ETHERTYPE_IPV6) => {
            let src = body.get(8..24).and_then(v6);
            // Next header ICMPv6, type NS (135) or NA (136): the target follows 8 bytes in.
            let target = match (body.get(6), body.get(40)) {
                (Some(58), Some(135 | 136)) => body.get(48..64).and_then(v6),
                _ => None,
            };
            (src, target)
        }
        _ => (None, None),
    }
}

impl fmt::Debug for PeerTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerTrust({} addresses)", self.len())
    }
}

/// Counters of one endpoint.
#[derive(Debug, Default)]
pub struct VxlanCounters {
    pub rx_datagrams: AtomicU64,
    /// Datagrams too short, without the I flag, or with another VNI.
    pub rx_dropped: AtomicU64,
    /// Datagrams from an underlay address that is neither trusted nor a configured peer.
    pub rx_unauthenticated: AtomicU64,
    /// Frames from a trusted sender speaking for an address bound to another one.
    pub rx_foreign_source: AtomicU64,
    pub tx_unicast: AtomicU64,
    pub tx_flooded: AtomicU64,
    /// Frames with no peer to go to (nothing configured, nothing learned yet).
    pub tx_no_peer: AtomicU64,
}

struct Fdb {
    /// Peers every flood reaches (configured).
    static_peers: Vec<SocketAddr>,
    learned: HashMap<[u8; 6], Learned>,
    /// [`PeerTrust::moves`] when the learned MACs were last checked against the bindings.
    moves_seen: u64,
}

/// Where a MAC was last seen, and which address its frame spoke for there (with a trust set).
#[derive(Clone, Copy, Debug)]
struct Learned {
    peer: SocketAddr,
    speaks_for: Option<IpAddr>,
}

impl Fdb {
    /// Re-points every learned MAC whose address is bound to another host now (see the module
    /// doc): at that host's port as its other MACs show it, else at `own_port`.
    fn follow_bindings(&mut self, trust: &PeerTrust, own_port: u16) {
        let moved: Vec<([u8; 6], IpAddr)> = self
            .learned
            .iter()
            .filter_map(|(mac, l)| match trust.binding(l.speaks_for?) {
                Some(Some(host)) if host != l.peer.ip() => Some((*mac, host)),
                _ => None,
            })
            .collect();
        for (mac, host) in moved {
            let port = self
                .learned
                .values()
                .find(|l| l.peer.ip() == host)
                .map_or(own_port, |l| l.peer.port());
            if let Some(l) = self.learned.get_mut(&mac) {
                l.peer = SocketAddr::new(host, port);
            }
        }
    }
}

/// One VXLAN endpoint: a bound, non-blocking UDP socket and its forwarding table.
pub struct Vxlan {
    socket: UdpSocket,
    vni: u32,
    fdb: Mutex<Fdb>,
    counters: std::sync::Arc<VxlanCounters>,
    scratch: Mutex<Vec<u8>>,
    /// What a frame sent goes out as (header and frame), and where: reused, so sending
    /// allocates nothing once it has held the largest frame and the most peers.
    tx: Mutex<(Vec<u8>, Vec<SocketAddr>)>,
    /// With one, frames are taken only from its addresses and the configured peers', and only
    /// for the addresses it binds to their sender.
    trust: Option<Arc<PeerTrust>>,
    /// The configured peers' underlay addresses (fixed at bind).
    peer_ips: Vec<IpAddr>,
    /// The bound local port: where a re-pointed MAC's new host is assumed to listen when none
    /// of its frames showed its port yet.
    own_port: u16,
    /// Moves [`BATCH`] datagrams per system call (see the module doc).
    batching: bool,
    /// Where a batch's frames go: (frame index, peer) per datagram, reused.
    tx_list: Mutex<Vec<(usize, SocketAddr)>>,
}

impl Vxlan {
    /// Binds `local` and floods to `peers` until it learns better.
    pub fn bind(local: SocketAddr, peers: Vec<SocketAddr>, vni: u32) -> io::Result<Vxlan> {
        if vni > MAX_VNI {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("VNI {vni} does not fit in 24 bits"),
            ));
        }
        let socket = UdpSocket::bind(local)?;
        socket.set_nonblocking(true)?;
        if local.is_ipv4() {
            // A full-size frame plus its 50 bytes of encapsulation exceeds a 1500-byte underlay:
            // let the kernel fragment the datagram rather than refuse it (EMSGSIZE). An underlay
            // with an MTU of 1550 or more never fragments.
            let dont: libc::c_int = libc::IP_PMTUDISC_DONT;
            // SAFETY: setsockopt on a valid UDP socket with an int option.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    (&dont as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        let peer_ips = peers.iter().map(|p| p.ip()).collect();
        let own_port = socket.local_addr()?.port();
        Ok(Vxlan {
            socket,
            peer_ips,
            own_port,
            vni,
            fdb: Mutex::new(Fdb {
                static_peers: peers,
                learned: HashMap::new(),
                moves_seen: 0,
            }),
            counters: Default::default(),
            scratch: Mutex::new(vec![0; VXLAN_HEADER_LEN + super::virtio::net::MAX_FRAME]),
            tx: Mutex::new((Vec::new(), Vec::new())),
            trust: None,
            batching: batching_wanted(),
            tx_list: Mutex::new(Vec::with_capacity(BATCH)),
        })
    }

    /// Takes frames only from `trust`'s addresses and the configured peers' from now on.
    pub fn with_trust(mut self, trust: Arc<PeerTrust>) -> Vxlan {
        self.trust = Some(trust);
        self
    }

    /// Whether a datagram from `from` carrying `frame` may be taken (see the module doc); counts
    /// a refusal.
    #[inline]
    fn admitted(&self, from: &SocketAddr, frame: Option<&[u8]>) -> bool {
        let judgement = match &self.trust {
            Some(trust) => trust.judge(from.ip(), &self.peer_ips, frame),
            None if self.peer_ips.is_empty() || self.peer_ips.contains(&from.ip()) => {
                Judgement::Pass
            }
            None => Judgement::Untrusted,
        };
        match judgement {
            Judgement::Pass => true,
            Judgement::Untrusted => {
                bump(&self.counters.rx_unauthenticated);
                false
            }
            Judgement::Foreign => {
                bump(&self.counters.rx_foreign_source);
                false
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub fn counters(&self) -> std::sync::Arc<VxlanCounters> {
        self.counters.clone()
    }

    /// The peer a MAC address was last seen behind.
    pub fn peer_of(&self, mac: &[u8; 6]) -> Option<SocketAddr> {
        Some(self.fdb.lock().ok()?.learned.get(mac)?.peer)
    }

    fn header(&self) -> [u8; VXLAN_HEADER_LEN] {
        let vni = self.vni.to_be_bytes();
        [FLAG_VNI_VALID, 0, 0, 0, vni[1], vni[2], vni[3], 0]
    }
}

/// The inner Ethernet frame of a VXLAN datagram of `vni`, or `None` when the datagram is too
/// short for the VXLAN header and an Ethernet header, lacks the I flag, or carries another VNI.
pub fn decapsulate(datagram: &[u8], vni: u32) -> Option<&[u8]> {
    let header = datagram.get(..VXLAN_HEADER_LEN)?;
    decapsulate_parts(header, &datagram[VXLAN_HEADER_LEN..], vni)
}

/// [`decapsulate`] of a datagram received as its header (8 bytes) and its frame.
fn decapsulate_parts<'a>(header: &[u8], frame: &'a [u8], vni: u32) -> Option<&'a [u8]> {
    let their_vni = u32::from_be_bytes([0, header[4], header[5], header[6]]);
    // An inner frame needs at least its Ethernet header.
    if frame.len() < 14 || header[0] & FLAG_VNI_VALID == 0 || their_vni != vni {
        return None;
    }
    Some(frame)
}

impl Vxlan {
    /// Takes one received datagram from `from`: its inner frame copied into `buf` (its length
    /// returned) and its source MAC learned behind `from`; `None` (counted) when `from` is not a
    /// trusted host or the frame speaks for another host's address, or it is not VXLAN of our VNI
    /// or does not fit `buf`. Public for the fuzz targets, which feed
    /// datagrams without a socket in between.
    pub fn accept_datagram(
        &self,
        datagram: &[u8],
        from: SocketAddr,
        buf: &mut [u8],
    ) -> Option<usize> {
        let (header, frame) = datagram.split_at(VXLAN_HEADER_LEN.min(datagram.len()));
        if !self.accept_parts(header, frame, frame.len() <= buf.len(), from) {
            return None;
        }
        buf[..frame.len()].copy_from_slice(frame);
        Some(frame.len())
    }

    /// Judges a datagram received as its VXLAN header and its frame (`fits`: whether the frame
    /// is whole and fits where it is to go), and learns its source MAC; whether it is taken.
    fn accept_parts(&self, header: &[u8], frame: &[u8], fits: bool, from: SocketAddr) -> bool {
        bump(&self.counters.rx_datagrams);
        let frame = (header.len() == VXLAN_HEADER_LEN)
            .then(|| decapsulate_parts(header, frame, self.vni))
            .flatten()
            .filter(|_| fits);
        if !self.admitted(&from, frame) {
            return false;
        }
        let Some(frame) = frame else {
            bump(&self.counters.rx_dropped);
            return false;
        };
        let src: [u8; 6] = frame[6..12].try_into().unwrap_or([1; 6]);
        if src[0] & 1 == 0 {
            // The address it spoke for, where bindings can move it (the edge).
            let speaks_for = self.trust.as_ref().and_then(|_| claims(frame).0);
            if let Ok(mut fdb) = self.fdb.lock() {
                if fdb.learned.len() < MAX_LEARNED || fdb.learned.contains_key(&src) {
                    fdb.learned.insert(
                        src,
                        Learned {
                            peer: from,
                            speaks_for,
                        },
                    );
                }
            }
        }
        true
    }

    /// The peers a frame goes to (into `targets`, cleared first), counted as unicast, flooded
    /// or without a peer.
    fn targets_of(&self, frame: &[u8], targets: &mut Vec<SocketAddr>) {
        targets.clear();
        let dst: Option<[u8; 6]> = frame.get(..6).and_then(|d| d.try_into().ok());
        {
            let mut fdb = self.fdb.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(trust) = &self.trust {
                let moves = trust.moves();
                if moves != fdb.moves_seen {
                    fdb.moves_seen = moves;
                    fdb.follow_bindings(trust, self.own_port);
                }
            }
            match dst.and_then(|d| fdb.learned.get(&d)) {
                Some(l) => targets.push(l.peer),
                None => {
                    targets.extend_from_slice(&fdb.static_peers);
                    for l in fdb.learned.values() {
                        if !targets.contains(&l.peer) {
                            targets.push(l.peer);
                        }
                    }
                }
            }
        }
        match targets.len() {
            0 => bump(&self.counters.tx_no_peer),
            1 => bump(&self.counters.tx_unicast),
            _ => bump(&self.counters.tx_flooded),
        }
    }
}

impl AsRawFd for Vxlan {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Refused datagrams one `recv_frame` call reads at most before it returns.
const REFUSED_PER_CALL: usize = 64;

impl FrameLink for Vxlan {
    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        // A flood of refused datagrams ends the call now and then as "nothing yet": the device
        // thread then sees its other events (a stop, a reset) before it reads on.
        for _ in 0..REFUSED_PER_CALL {
            let (len, from) = self.socket.recv_from(&mut scratch)?;
            if let Some(n) = self.accept_datagram(&scratch[..len], from, buf) {
                return Ok(n);
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn send_frame(&self, frame: &[u8]) -> io::Result<usize> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let (datagram, targets) = &mut *tx;
        datagram.clear();
        datagram.extend_from_slice(&self.header());
        datagram.extend_from_slice(frame);
        self.targets_of(frame, targets);
        let mut last_error = None;
        for peer in targets.iter() {
            if let Err(e) = self.socket.send_to(datagram, peer) {
                last_error = Some(e);
            }
        }
        match last_error {
            Some(e) => Err(e),
            None => Ok(frame.len()),
        }
    }

    fn batch_slot(&self) -> Option<usize> {
        self.batching.then_some(BATCH_SLOT)
    }

    fn recv_batch(&self, batch: &mut FrameBatch) -> io::Result<usize> {
        let mut headers = [[0u8; VXLAN_HEADER_LEN]; BATCH];
        let mut got = [mmsg::Received {
            from: None,
            len: 0,
            truncated: false,
        }; BATCH];
        let n = mmsg::recv(self.socket.as_raw_fd(), batch, &mut headers, &mut got)?;
        let slot = batch.slot_size();
        for (i, g) in got.iter().enumerate().take(n) {
            let frame_len = g.len.saturating_sub(VXLAN_HEADER_LEN).min(slot);
            let header = &headers[i][..VXLAN_HEADER_LEN.min(g.len)];
            // A datagram the kernel cut, or a frame filling its slot, does not fit.
            let fits = !g.truncated && frame_len < slot;
            let taken = match g.from {
                Some(from) => {
                    let frame = &batch.slot_mut(i)[..frame_len];
                    self.accept_parts(header, frame, fits, from)
                }
                None => {
                    bump(&self.counters.rx_datagrams);
                    bump(&self.counters.rx_unauthenticated);
                    false
                }
            };
            // A slot of length 0 is skipped by the device.
            batch.set_len(i, if taken { frame_len } else { 0 });
        }
        batch.set_count(n);
        Ok(n)
    }

    fn send_batch(&self, batch: &FrameBatch) -> io::Result<usize> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let targets = &mut tx.1;
        let mut list = self.tx_list.lock().unwrap_or_else(|p| p.into_inner());
        list.clear();
        for i in 0..batch.len() {
            self.targets_of(batch.frame(i), targets);
            list.extend(targets.iter().map(|peer| (i, *peer)));
        }
        let sent = mmsg::send(self.socket.as_raw_fd(), &self.header(), batch, &list)?;
        // Frames before the first datagram not sent went out whole (a frame without a peer
        // counts as sent, as one alone does).
        Ok(match list.get(sent) {
            Some((frame, _)) => *frame,
            None => batch.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(payload);
        f
    }

    fn wait_frame(link: &Vxlan, buf: &mut [u8]) -> usize {
        let mut poll = libc::pollfd {
            fd: link.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd, alive for the call.
            let ready = unsafe { libc::poll(&mut poll, 1, 5000) };
            assert!(ready > 0, "no frame in 5 s");
            match link.recv_frame(buf) {
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn floods_then_learns_and_filters_foreign_vnis() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let edge = Vxlan::bind(any, vec![], 7).unwrap();
        let host = Vxlan::bind(any, vec![edge.local_addr().unwrap()], 7).unwrap();
        let tenant = [0x52, 0x54, 0, 0, 0, 2];
        let outside = [0x52, 0x54, 0, 0, 0, 1];
        // Host to edge: flooded (only the configured peer), learned by the edge.
        let f = frame([0xff; 6], tenant, b"hello");
        host.send_frame(&f).unwrap();
        let mut buf = vec![0u8; 2048];
        let n = wait_frame(&edge, &mut buf);
        assert_eq!(&buf[..n], &f[..]);
        assert_eq!(edge.peer_of(&tenant), Some(host.local_addr().unwrap()));
        // Edge back to the tenant: unicast to the learned host.
        let reply = frame(tenant, outside, b"world");
        edge.send_frame(&reply).unwrap();
        let n = wait_frame(&host, &mut buf);
        assert_eq!(&buf[..n], &reply[..]);
        assert_eq!(edge.counters.tx_unicast.load(Ordering::Relaxed), 1);
        // A datagram with another VNI, and a runt, are dropped; the next good one comes through.
        let raw = UdpSocket::bind(any).unwrap();
        let mut foreign = vec![FLAG_VNI_VALID, 0, 0, 0, 0, 0, 8, 0];
        foreign.extend_from_slice(&f);
        raw.send_to(&foreign, edge.local_addr().unwrap()).unwrap();
        raw.send_to(&[FLAG_VNI_VALID, 0, 0], edge.local_addr().unwrap())
            .unwrap();
        host.send_frame(&f).unwrap();
        let n = wait_frame(&edge, &mut buf);
        assert_eq!(&buf[..n], &f[..]);
        assert_eq!(edge.counters.rx_dropped.load(Ordering::Relaxed), 2);
        // The foreign sender was not learned as anyone's home.
        assert_eq!(edge.peer_of(&tenant), Some(host.local_addr().unwrap()));
    }

    /// Waits until `link`'s socket is readable (5 s at most).
    fn wait_readable(link: &Vxlan) {
        let mut poll = libc::pollfd {
            fd: link.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, alive for the call.
        let ready = unsafe { libc::poll(&mut poll, 1, 5000) };
        assert!(ready > 0, "nothing in 5 s");
    }

    #[test]
    fn batches_carry_frames_in_order_and_judge_each_datagram() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let edge = Vxlan::bind(any, vec![], 7).unwrap();
        let host = Vxlan::bind(any, vec![edge.local_addr().unwrap()], 7).unwrap();
        assert_eq!(host.batch_slot(), Some(BATCH_SLOT));
        let tenant = [0x52, 0x54, 0, 0, 0, 2];
        // Host to edge: three frames in one sendmmsg, in order, each with its header.
        let mut out = FrameBatch::new(BATCH_SLOT);
        let frames: Vec<Vec<u8>> = (0..3u8)
            .map(|i| frame([0xff; 6], tenant, &vec![i; 60 + usize::from(i) * 500]))
            .collect();
        for f in &frames {
            let slot = out.next_slot().unwrap();
            slot[..f.len()].copy_from_slice(f);
            out.commit(f.len());
        }
        assert_eq!(host.send_batch(&out).unwrap(), 3);
        // Then, from a raw sender (as if trusted: the edge has no trust set and no peers):
        // another VNI, a datagram larger than a slot, and a good frame.
        let raw = UdpSocket::bind(any).unwrap();
        let to = edge.local_addr().unwrap();
        let header = [FLAG_VNI_VALID, 0, 0, 0, 0, 0, 7, 0];
        let mut foreign = vec![FLAG_VNI_VALID, 0, 0, 0, 0, 0, 8, 0];
        foreign.extend_from_slice(&frames[0]);
        raw.send_to(&foreign, to).unwrap();
        let mut big = header.to_vec();
        big.extend_from_slice(&frame([0xff; 6], tenant, &[9; BATCH_SLOT + 100]));
        raw.send_to(&big, to).unwrap();
        let mut good = header.to_vec();
        good.extend_from_slice(&frames[1]);
        raw.send_to(&good, to).unwrap();
        // All six arrive, in one recvmmsg or a few; the three refused have length 0.
        let mut got = Vec::new();
        let mut batch = FrameBatch::new(BATCH_SLOT);
        while got.len() < 6 {
            wait_readable(&edge);
            batch.clear();
            match edge.recv_batch(&mut batch) {
                Ok(n) => got.extend((0..n).map(|i| batch.frame(i).to_vec())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        }
        let lens: Vec<usize> = got.iter().map(Vec::len).collect();
        assert_eq!(&got[..3], &frames[..], "in order, whole");
        assert_eq!(lens[3..], [0, 0, frames[1].len()], "{lens:?}");
        assert_eq!(got[5], frames[1]);
        assert_eq!(edge.counters.rx_dropped.load(Ordering::Relaxed), 2);
        assert_eq!(edge.counters.rx_datagrams.load(Ordering::Relaxed), 6);
        // The edge learned the tenant behind the raw sender (its last frame), and sends back:
        // a unicast batch reaches it whole.
        assert_eq!(edge.peer_of(&tenant), Some(raw.local_addr().unwrap()));
        let mut back = FrameBatch::new(BATCH_SLOT);
        let reply = frame(tenant, [0x52, 0x54, 0, 0, 0, 1], b"reply");
        back.next_slot().unwrap()[..reply.len()].copy_from_slice(&reply);
        back.commit(reply.len());
        assert_eq!(edge.send_batch(&back).unwrap(), 1);
        let mut buf = [0u8; 4096];
        raw.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let n = raw.recv(&mut buf).unwrap();
        assert_eq!(&buf[..VXLAN_HEADER_LEN], &header);
        assert_eq!(&buf[VXLAN_HEADER_LEN..n], &reply[..]);
        assert_eq!(edge.counters.tx_unicast.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_batch_from_untrusted_senders_delivers_nothing() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let trust = PeerTrust::new();
        let edge = Vxlan::bind(any, vec![], 7)
            .unwrap()
            .with_trust(trust.clone());
        let stranger = Vxlan::bind(any, vec![edge.local_addr().unwrap()], 7).unwrap();
        let tenant = [0x52, 0x54, 0, 0, 0, 2];
        let mut out = FrameBatch::new(BATCH_SLOT);
        for i in 0..4u8 {
            let f = frame([0xff; 6], tenant, &[i; 64]);
            out.next_slot().unwrap()[..f.len()].copy_from_slice(&f);
            out.commit(f.len());
        }
        assert_eq!(stranger.send_batch(&out).unwrap(), 4);
        let mut seen = 0;
        let mut batch = FrameBatch::new(BATCH_SLOT);
        while seen < 4 {
            wait_readable(&edge);
            batch.clear();
            if let Ok(n) = edge.recv_batch(&mut batch) {
                assert!((0..n).all(|i| batch.frame(i).is_empty()));
                seen += n;
            }
        }
        assert_eq!(edge.counters.rx_unauthenticated.load(Ordering::Relaxed), 4);
        assert_eq!(
            edge.peer_of(&tenant),
            None,
            "nothing learned from a stranger"
        );
        assert_eq!(trust.refused(), 4);
    }

    #[test]
    fn a_flood_of_refused_datagrams_returns_to_the_device_thread_now_and_then() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let trust = PeerTrust::new();
        let edge = Vxlan::bind(any, vec![], 7)
            .unwrap()
            .with_trust(trust.clone());
        let forger = Vxlan::bind(any, vec![edge.local_addr().unwrap()], 7).unwrap();
        let f = frame([0xff; 6], [0x52, 0x54, 0, 0, 0, 9], b"refused");
        for _ in 0..REFUSED_PER_CALL + 10 {
            forger.send_frame(&f).unwrap();
        }
        let mut buf = vec![0u8; 2048];
        // Every datagram is queued on the loopback socket before the first call reads.
        while edge.counters.rx_unauthenticated.load(Ordering::Relaxed) == 0 {
            let mut poll = libc::pollfd {
                fd: edge.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, alive for the call.
            assert!(unsafe { libc::poll(&mut poll, 1, 5000) } > 0);
            assert_eq!(
                edge.recv_frame(&mut buf).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
        }
        assert_eq!(
            trust.refused(),
            REFUSED_PER_CALL as u64,
            "one call stops after its share, with the rest still queued"
        );
        assert_eq!(
            edge.recv_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(trust.refused(), REFUSED_PER_CALL as u64 + 10);
    }

    #[test]
    fn with_a_trust_set_only_trusted_senders_are_heard_or_learned() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let trust = PeerTrust::new();
        let edge = Vxlan::bind(any, vec![], 7)
            .unwrap()
            .with_trust(trust.clone());
        // The genuine host sends from 127.0.0.1; the forger from 127.0.0.2 (another underlay
        // address on the same machine).
        let host = Vxlan::bind(any, vec![edge.local_addr().unwrap()], 7).unwrap();
        let forger_addr: SocketAddr = "127.0.0.2:0".parse().unwrap();
        let forger = Vxlan::bind(forger_addr, vec![edge.local_addr().unwrap()], 7).unwrap();
        let tenant = [0x52, 0x54, 0, 0, 0, 2];
        let f = frame([0xff; 6], tenant, b"from the host");
        let mut buf = vec![0u8; 2048];
        // Before the host is vouched for, even its frames are refused.
        host.send_frame(&f).unwrap();
        let mut poll = libc::pollfd {
            fd: edge.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, alive for the call.
        assert!(unsafe { libc::poll(&mut poll, 1, 5000) } > 0);
        assert_eq!(
            edge.recv_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(trust.trust(host.local_addr().unwrap().ip()));
        host.send_frame(&f).unwrap();
        let n = wait_frame(&edge, &mut buf);
        assert_eq!(&buf[..n], &f[..]);
        assert_eq!(edge.peer_of(&tenant), Some(host.local_addr().unwrap()));
        assert_eq!(edge.counters.rx_unauthenticated.load(Ordering::Relaxed), 1);
        // A forged frame with the tenant's MAC from an untrusted address: not delivered (the
        // next frame out is the host's), and the MAC stays where it was.
        let forged = frame([0xff; 6], tenant, b"forged");
        forger.send_frame(&forged).unwrap();
        let again = frame([0xff; 6], tenant, b"the host again");
        host.send_frame(&again).unwrap();
        let n = wait_frame(&edge, &mut buf);
        assert_eq!(&buf[..n], &again[..]);
        assert_eq!(edge.peer_of(&tenant), Some(host.local_addr().unwrap()));
        assert_eq!(edge.counters.rx_unauthenticated.load(Ordering::Relaxed), 2);
        assert_eq!(trust.refused(), 2);
    }

    #[test]
    fn an_endpoint_with_a_peer_hears_only_that_peer() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let edge = Vxlan::bind(any, vec![], 7).unwrap();
        // The host's uplink: its one peer is the edge (127.0.0.1).
        let host = Vxlan::bind(any, vec![edge.local_addr().unwrap()], 7).unwrap();
        let forger = Vxlan::bind(
            "127.0.0.2:0".parse().unwrap(),
            vec![host.local_addr().unwrap()],
            7,
        )
        .unwrap();
        let tenant = [0x52, 0x54, 0, 0, 0, 2];
        let outside = [0x52, 0x54, 0, 0, 0, 1];
        let mut buf = vec![0u8; 2048];
        let forged = frame(tenant, outside, b"forged");
        forger.send_frame(&forged).unwrap();
        let genuine = frame(tenant, outside, b"from the edge");
        // The edge has learned nothing yet: it sends to the host directly.
        let mut datagram = edge.header().to_vec();
        datagram.extend_from_slice(&genuine);
        edge.socket
            .send_to(&datagram, host.local_addr().unwrap())
            .unwrap();
        let n = wait_frame(&host, &mut buf);
        assert_eq!(&buf[..n], &genuine[..]);
        assert_eq!(host.counters.rx_unauthenticated.load(Ordering::Relaxed), 1);
        assert_eq!(host.peer_of(&outside), Some(edge.local_addr().unwrap()));
    }

    fn ipv4_frame(src_mac: [u8; 6], src: [u8; 4]) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&[10, 66, 0, 1]);
        frame([0x52, 0x54, 0, 0, 0, 1], src_mac, &ip)
    }

    /// A migrated tenant whose announcement never reached the edge: the binding's move alone
    /// re-points its MAC, at the new host's port as that host's other frames showed it, or at
    /// the edge's own port for a host the edge has not heard from yet.
    #[test]
    fn a_learned_mac_follows_its_address_binding_to_the_new_host() {
        let edge = Vxlan::bind("127.0.0.3:0".parse().unwrap(), vec![], 7).unwrap();
        let trust = PeerTrust::new();
        let edge = edge.with_trust(trust.clone());
        let edge_at = edge.local_addr().unwrap();
        let host = |ip: &str, port: u16| {
            Vxlan::bind(SocketAddr::new(ip.parse().unwrap(), port), vec![edge_at], 7).unwrap()
        };
        // A and B at ports of their own; C at the edge's port, and silent until it receives.
        let (a, b, c) = (
            host("127.0.0.1", 0),
            host("127.0.0.2", 0),
            host("127.0.0.4", edge_at.port()),
        );
        for h in [&a, &b, &c] {
            assert!(trust.trust(h.local_addr().unwrap().ip()));
        }
        let (tenant, neighbour) = (IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 0, 3]));
        let (mac, neighbour_mac) = ([0x52, 0x54, 0, 0, 0, 2], [0x52, 0x54, 0, 0, 0, 3]);
        let a_ip = a.local_addr().unwrap().ip();
        assert!(trust.bind(tenant, Some(a_ip)));
        assert!(trust.bind(neighbour, Some(b.local_addr().unwrap().ip())));
        let mut buf = vec![0u8; 2048];
        // The tenant speaks from A, B's other tenant from B: both learned.
        for (from, frame) in [
            (&a, ipv4_frame(mac, [10, 0, 0, 2])),
            (&b, ipv4_frame(neighbour_mac, [10, 0, 0, 3])),
        ] {
            from.send_frame(&frame).unwrap();
            let n = wait_frame(&edge, &mut buf);
            assert_eq!(&buf[..n], &frame[..]);
        }
        assert_eq!(edge.peer_of(&mac), Some(a.local_addr().unwrap()));
        let to_tenant = frame(mac, [0x52, 0x54, 0, 0, 0, 1], b"after the move");
        // Rebinding to the same host moves nothing.
        let moves = trust.moves();
        assert!(trust.bind(tenant, Some(a_ip)));
        assert_eq!(trust.moves(), moves);
        // The tenant moves to B: the next frame to it goes to B's port, not to A.
        assert!(trust.bind(tenant, Some(b.local_addr().unwrap().ip())));
        assert_eq!(trust.moves(), moves + 1);
        edge.send_frame(&to_tenant).unwrap();
        let n = wait_frame(&b, &mut buf);
        assert_eq!(&buf[..n], &to_tenant[..]);
        assert_eq!(edge.peer_of(&mac), Some(b.local_addr().unwrap()));
        // Then to C, which the edge never heard from (its own port), through an unbind (a
        // flush) first.
        trust.unbind(tenant);
        assert!(trust.bind(tenant, Some(c.local_addr().unwrap().ip())));
        edge.send_frame(&to_tenant).unwrap();
        let n = wait_frame(&c, &mut buf);
        assert_eq!(&buf[..n], &to_tenant[..]);
        assert_eq!(edge.peer_of(&mac), Some(c.local_addr().unwrap()));
        // Nothing reached A after the move, and B's other tenant stayed where it was.
        assert_eq!(a.counters.rx_datagrams.load(Ordering::Relaxed), 0);
        assert_eq!(edge.peer_of(&neighbour_mac), Some(b.local_addr().unwrap()));
    }

    #[test]
    fn a_host_speaks_only_for_the_addresses_bound_to_it() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let trust = PeerTrust::new();
        let edge = Vxlan::bind(any, vec![], 7)
            .unwrap()
            .with_trust(trust.clone());
        let a = Vxlan::bind(any, vec![edge.local_addr().unwrap()], 7).unwrap();
        let b = Vxlan::bind(
            "127.0.0.2:0".parse().unwrap(),
            vec![edge.local_addr().unwrap()],
            7,
        )
        .unwrap();
        let (a_ip, b_ip) = (a.local_addr().unwrap().ip(), b.local_addr().unwrap().ip());
        assert!(trust.trust(a_ip) && trust.trust(b_ip));
        let (mine, theirs, underlay) = ([10, 0, 0, 2], [10, 0, 0, 3], [192, 0, 2, 1]);
        assert!(trust.bind(IpAddr::from(mine), Some(a_ip)));
        assert!(trust.bind(IpAddr::from(theirs), Some(b_ip)));
        assert!(trust.bind(IpAddr::from(underlay), None));
        let mac = [0x52, 0x54, 0, 0, 0, 2];
        let mut buf = vec![0u8; 2048];
        // A speaks for B's address, then for the underlay's: refused, not learned.
        a.send_frame(&ipv4_frame([0x52, 0x54, 0, 0, 0, 3], theirs))
            .unwrap();
        a.send_frame(&ipv4_frame([0x52, 0x54, 0, 0, 0, 4], underlay))
            .unwrap();
        // Its own address, and one bound to nobody (the firewall's business): taken.
        let own = ipv4_frame(mac, mine);
        a.send_frame(&own).unwrap();
        let n = wait_frame(&edge, &mut buf);
        assert_eq!(&buf[..n], &own[..]);
        let unbound = ipv4_frame(mac, [10, 0, 0, 9]);
        a.send_frame(&unbound).unwrap();
        let n = wait_frame(&edge, &mut buf);
        assert_eq!(&buf[..n], &unbound[..]);
        // B for its own.
        let theirs_frame = ipv4_frame([0x52, 0x54, 0, 0, 0, 3], theirs);
        b.send_frame(&theirs_frame).unwrap();
        let n = wait_frame(&edge, &mut buf);
        assert_eq!(&buf[..n], &theirs_frame[..]);
        assert_eq!(edge.counters.rx_foreign_source.load(Ordering::Relaxed), 2);
        assert_eq!(trust.foreign(), 2);
        assert_eq!(edge.peer_of(&[0x52, 0x54, 0, 0, 0, 4]), None);
        assert_eq!(
            edge.peer_of(&[0x52, 0x54, 0, 0, 0, 3]),
            Some(b.local_addr().unwrap())
        );
        // Unbound again (detached): anyone trusted may carry it to the firewall.
        trust.unbind(IpAddr::from(theirs));
        a.send_frame(&theirs_frame).unwrap();
        let n = wait_frame(&edge, &mut buf);
        assert_eq!(&buf[..n], &theirs_frame[..]);
    }

    #[test]
    fn claims_are_the_source_the_arp_sender_and_the_nd_target() {
        let mac = [0x52, 0x54, 0, 0, 0, 2];
        let f = ipv4_frame(mac, [10, 0, 0, 2]);
        assert_eq!(claims(&f), (Some(IpAddr::from([10, 0, 0, 2])), None));
        // Through one 802.1Q tag.
        let mut tagged = f[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0, 5]);
        tagged.extend_from_slice(&f[12..]);
        assert_eq!(claims(&tagged), claims(&f));
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[10, 0, 0, 7]);
        arp.extend_from_slice(&[0; 10]);
        let mut arp_frame = frame([0xff; 6], mac, &[]);
        arp_frame[12..14].copy_from_slice(&[0x08, 0x06]);
        arp_frame.extend_from_slice(&arp);
        assert_eq!(
            claims(&arp_frame),
            (Some(IpAddr::from([10, 0, 0, 7])), None)
        );
        let mut ns = vec![0x60, 0, 0, 0, 0, 24, 58, 255];
        ns.extend_from_slice(&[0; 16]);
        ns.extend_from_slice(&[0xff; 16]);
        ns.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
        let target = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        ns.extend_from_slice(&target);
        let mut ns_frame = frame([0xff; 6], mac, &[]);
        ns_frame[12..14].copy_from_slice(&[0x86, 0xdd]);
        ns_frame.extend_from_slice(&ns);
        assert_eq!(
            claims(&ns_frame),
            (Some(IpAddr::from([0u8; 16])), Some(IpAddr::from(target)))
        );
        // Runts and other EtherTypes claim nothing.
        assert_eq!(claims(&f[..20]), (None, None));
        assert_eq!(claims(&[0u8; 10]), (None, None));
    }

    #[test]
    fn rejects_a_vni_over_24_bits() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(Vxlan::bind(any, vec![], MAX_VNI + 1).is_err());
    }
}
