//! A VXLAN tunnel endpoint in user space (RFC 7348): Ethernet frames of a virtio-net device
//! travel inside UDP datagrams to other Vigil nodes. A host's switch-tier uplink and an edge
//! node's cloud port are such endpoints; the guest behind them sees plain Ethernet.
//!
//! Forwarding follows a VXLAN bridge's FDB: the sender of each datagram is learned as the home of
//! the inner frame's source MAC; a frame to a learned MAC goes to that peer alone, anything else
//! (broadcast, multicast, unknown) to every configured and learned peer. A tenant that migrates
//! is learned at its new host as soon as a frame of it arrives from there.
//!
//! The underlay (the hosts' network) is trusted to carry frames, not verdicts: verdicts travel on
//! their own authenticated channel. Datagrams that are not VXLAN, or carry another VNI, are
//! dropped and counted.
//!
//! Who may send: an endpoint given a [`PeerTrust`] (an edge's cloud port) takes frames only from
//! underlay addresses in it, or from its configured peers; the edge node puts there the address
//! of each host that authenticated on the verdict channel. A frame from any other UDP sender is
//! dropped and counted (`rx_unauthenticated`): it is neither delivered nor learned, so it cannot
//! move a MAC's location. The check is by source IP address: it holds as far as the underlay keeps
//! one host from sending with another's address (what a VXLAN underlay must do anyway, as VXLAN
//! itself authenticates nothing, RFC 7348 §7). An endpoint without a trust set (a standalone
//! `--net local=`) learns from any sender, as a VXLAN bridge does.
//!
//! Owns: the VXLAN encapsulation, the learned FDB, the peers, who may send, and the drop
//! counters. Must not: forward a datagram of another VNI, one that is not VXLAN or one from an
//! untrusted sender (with a trust set), or carry verdicts.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::devices::virtio::net::FrameLink;

/// IANA-assigned VXLAN UDP port (RFC 7348 §5).
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN header: flags (I bit = 0x08), 3 reserved bytes, 24-bit VNI, 1 reserved byte.
pub const VXLAN_HEADER_LEN: usize = 8;
const FLAG_VNI_VALID: u8 = 0x08;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Learned MAC addresses kept (a full table stops learning; floods still reach everyone).
const MAX_LEARNED: usize = 4096;

/// Underlay addresses trusted at most (hosts of one edge).
pub const MAX_TRUSTED: usize = 4096;

/// The underlay addresses an endpoint takes frames from, shared with whoever vouches for them
/// (the edge node adds each host that authenticated on the verdict channel).
#[derive(Default)]
pub struct PeerTrust {
    addrs: RwLock<HashSet<IpAddr>>,
    /// Datagrams refused because their sender was not trusted (every endpoint using the set).
    refused: AtomicU64,
}

impl PeerTrust {
    pub fn new() -> Arc<PeerTrust> {
        Arc::new(PeerTrust::default())
    }

    /// Trusts `ip` from now on; false when [`MAX_TRUSTED`] addresses are trusted already.
    pub fn trust(&self, ip: IpAddr) -> bool {
        if self.contains(ip) {
            return true;
        }
        let mut addrs = self.addrs.write().unwrap_or_else(|p| p.into_inner());
        if addrs.len() >= MAX_TRUSTED {
            return false;
        }
        addrs.insert(ip);
        true
    }

    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ip)
    }

    /// Datagrams refused so far because their sender was not trusted.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.addrs.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    pub tx_unicast: AtomicU64,
    pub tx_flooded: AtomicU64,
    /// Frames with no peer to go to (nothing configured, nothing learned yet).
    pub tx_no_peer: AtomicU64,
}

struct Fdb {
    /// Peers every flood reaches (configured).
    static_peers: Vec<SocketAddr>,
    learned: HashMap<[u8; 6], SocketAddr>,
}

/// One VXLAN endpoint: a bound, non-blocking UDP socket and its forwarding table.
pub struct Vxlan {
    socket: UdpSocket,
    vni: u32,
    fdb: Mutex<Fdb>,
    counters: std::sync::Arc<VxlanCounters>,
    scratch: Mutex<Vec<u8>>,
    /// With one, frames are taken only from its addresses and the configured peers'.
    trust: Option<Arc<PeerTrust>>,
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
        Ok(Vxlan {
            socket,
            vni,
            fdb: Mutex::new(Fdb {
                static_peers: peers,
                learned: HashMap::new(),
            }),
            counters: Default::default(),
            scratch: Mutex::new(vec![0; VXLAN_HEADER_LEN + super::virtio::net::MAX_FRAME]),
            trust: None,
        })
    }

    /// Takes frames only from `trust`'s addresses and the configured peers' from now on.
    pub fn with_trust(mut self, trust: Arc<PeerTrust>) -> Vxlan {
        self.trust = Some(trust);
        self
    }

    fn trusted(&self, from: &SocketAddr) -> bool {
        let Some(trust) = &self.trust else {
            return true;
        };
        if trust.contains(from.ip()) {
            return true;
        }
        let fdb = self.fdb.lock().unwrap_or_else(|p| p.into_inner());
        fdb.static_peers.iter().any(|p| p.ip() == from.ip())
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub fn counters(&self) -> std::sync::Arc<VxlanCounters> {
        self.counters.clone()
    }

    /// The peer a MAC address was last seen behind.
    pub fn peer_of(&self, mac: &[u8; 6]) -> Option<SocketAddr> {
        self.fdb.lock().ok()?.learned.get(mac).copied()
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
    let frame = &datagram[VXLAN_HEADER_LEN..];
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
    /// trusted host, or it is not VXLAN of our VNI or does not fit `buf`. Public for the fuzz targets, which feed
    /// datagrams without a socket in between.
    pub fn accept_datagram(
        &self,
        datagram: &[u8],
        from: SocketAddr,
        buf: &mut [u8],
    ) -> Option<usize> {
        bump(&self.counters.rx_datagrams);
        if !self.trusted(&from) {
            bump(&self.counters.rx_unauthenticated);
            if let Some(trust) = &self.trust {
                bump(&trust.refused);
            }
            return None;
        }
        let Some(frame) = decapsulate(datagram, self.vni).filter(|f| f.len() <= buf.len()) else {
            bump(&self.counters.rx_dropped);
            return None;
        };
        let src: [u8; 6] = frame[6..12].try_into().unwrap_or([1; 6]);
        if src[0] & 1 == 0 {
            if let Ok(mut fdb) = self.fdb.lock() {
                if fdb.learned.len() < MAX_LEARNED || fdb.learned.contains_key(&src) {
                    fdb.learned.insert(src, from);
                }
            }
        }
        buf[..frame.len()].copy_from_slice(frame);
        Some(frame.len())
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

impl FrameLink for Vxlan {
    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (len, from) = self.socket.recv_from(&mut scratch)?;
            if let Some(n) = self.accept_datagram(&scratch[..len], from, buf) {
                return Ok(n);
            }
        }
    }

    fn send_frame(&self, frame: &[u8]) -> io::Result<usize> {
        let mut datagram = Vec::with_capacity(VXLAN_HEADER_LEN + frame.len());
        datagram.extend_from_slice(&self.header());
        datagram.extend_from_slice(frame);
        let dst: Option<[u8; 6]> = frame.get(..6).and_then(|d| d.try_into().ok());
        let targets: Vec<SocketAddr> = {
            let fdb = self.fdb.lock().unwrap_or_else(|p| p.into_inner());
            match dst.and_then(|d| fdb.learned.get(&d)) {
                Some(peer) => vec![*peer],
                None => {
                    let mut all = fdb.static_peers.clone();
                    for peer in fdb.learned.values() {
                        if !all.contains(peer) {
                            all.push(*peer);
                        }
                    }
                    all
                }
            }
        };
        match targets.len() {
            0 => {
                bump(&self.counters.tx_no_peer);
                return Ok(frame.len());
            }
            1 => bump(&self.counters.tx_unicast),
            _ => bump(&self.counters.tx_flooded),
        }
        let mut last_error = None;
        for peer in targets {
            if let Err(e) = self.socket.send_to(&datagram, peer) {
                last_error = Some(e);
            }
        }
        match last_error {
            Some(e) => Err(e),
            None => Ok(frame.len()),
        }
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
    fn rejects_a_vni_over_24_bits() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(Vxlan::bind(any, vec![], MAX_VNI + 1).is_err());
    }
}
