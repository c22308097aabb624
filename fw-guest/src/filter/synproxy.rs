//! The edge's SYN proxy (issue #13), in the manner of netfilter's SYNPROXY target.
//!
//! While a SYN flood holds more half-open entries than a threshold (for the whole table, for the
//! tenant, or for the destination address and port: [`SynProxy`]), a SYN from the outside that
//! a verdict would open is not forwarded and creates no state: the edge answers it itself with a
//! SYN-ACK whose ISN is a SYN cookie ([`Cookies`]: a keyed SipHash of the 4-tuple, a 64-second time
//! counter and the MSS, as Linux's `syncookies.c` lays it out) and a zero window. Only an ACK
//! carrying a valid cookie (its sender has the address it claims and answered within the cookie's
//! lifetime) creates a conntrack entry; the edge then replays the handshake to the tenant (a SYN
//! with the client's ISN and MSS), and on the tenant's SYN-ACK acknowledges it itself and opens the
//! client's window. From then on the tenant's sequence numbers differ from the cookie by a fixed
//! offset, kept in the entry ([`FlowSlot::seq_offset`]): the edge subtracts it from the tenant's
//! sequence numbers and adds it to the client's acknowledgments, for the life of the flow, with
//! the checksums updated incrementally (RFC 1624).
//!
//! Cookies carry no window scale, SACK or timestamp option (neither SYN-ACK nor the replayed SYN
//! offers them), so a proxied connection runs without them, as one accepted by Linux's cookies
//! without timestamps does.
//!
//! Owns: the cookie secret and encoding, the proxy's decisions (when to answer, what a cookie
//! proves), the frames it builds, the sequence translation of proxied flows.
//! Must not: create state for a SYN, allocate, or answer anything it has not parsed itself.

use core::hash::Hasher;
use core::net::{Ipv4Addr, Ipv6Addr};

use siphasher::sip::SipHasher24;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, TcpSeqNumber};

use super::conntrack::{self, TcpStep, Track};
use super::{
    parse, Decision, DropReason, EdgeSide, Filter, FlowKey, IpVersion, TcpFlags, TcpSeg, TcpState,
};

/// MSS values a cookie can carry (2 bits): the largest not above the client's is encoded. 1220
/// is IPv6's minimum (1280 - 60), 1440/1460 the common Ethernet paths.
pub const MSS_TABLE: [u16; 4] = [536, 1220, 1440, 1460];
/// Seconds per step of the cookie's time counter.
pub const COOKIE_PERIOD_S: u32 = 64;
/// Steps a cookie stays valid after the one it was made in (so 64 to 128 s, as Linux's 2 minutes).
pub const COOKIE_MAX_AGE: u32 = 1;
/// Largest frame the proxy builds: Ethernet with one 802.1Q tag, IPv6, TCP with an MSS option.
pub const REPLY_BYTES: usize = 18 + 40 + 24;
/// IPv4 TTL / IPv6 hop limit of the frames the proxy builds.
const HOP_LIMIT: u8 = 64;

/// When the proxy answers SYNs itself, and its secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynProxy {
    /// The cookie key (from the boot information's randomness; see `main.rs`).
    pub secret: [u64; 2],
    /// Half-open entries of one destination (tenant, address, port; hashed buckets).
    pub per_dst: usize,
    /// Half-open entries of one tenant.
    pub per_tenant: usize,
    /// Half-open entries of the whole table.
    pub global: usize,
}

impl SynProxy {
    /// Engage at 64 half-open entries for one destination, 256 for one tenant, 2048 in all
    /// (a busy server's SYN backlog; [`Filter::new`] keeps each below half its half-open limit).
    pub fn new(secret: [u64; 2]) -> SynProxy {
        SynProxy {
            secret,
            per_dst: 64,
            per_tenant: 256,
            global: 2048,
        }
    }
}

/// The cookie function: SipHash-2-4 under the proxy's 128-bit secret.
#[derive(Clone, Copy, Debug)]
pub struct Cookies {
    k0: u64,
    k1: u64,
}

/// A flow's addresses and ports as the client's segments carry them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// Why an ACK's cookie was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieError {
    /// Made more than [`COOKIE_MAX_AGE`] periods ago (or in the future).
    Stale,
    /// Not made by this secret for this 4-tuple and ISN.
    Forged,
}

impl Cookies {
    pub fn new(secret: [u64; 2]) -> Cookies {
        Cookies {
            k0: secret[0],
            k1: secret[1],
        }
    }

    fn hash(&self, t: &Tuple, count: u32, which: u8) -> u32 {
        let mut h = SipHasher24::new_with_keys(self.k0, self.k1);
        h.write(&t.src);
        h.write(&t.dst);
        h.write_u16(t.sport);
        h.write_u16(t.dport);
        h.write_u32(count);
        h.write_u8(which);
        h.finish() as u32
    }

    /// The cookie ISN for a SYN of `t` with sequence number `isn`, in time step `count`, carrying
    /// MSS index `mss` (< 4): `H1(t) + isn + (count << 24) + ((H2(t, count) + mss) mod 2^24)`.
    pub fn make(&self, t: &Tuple, isn: u32, count: u32, mss: u32) -> u32 {
        let low = self.hash(t, count, 2).wrapping_add(mss) & 0x00ff_ffff;
        self.hash(t, 0, 1)
            .wrapping_add(isn)
            .wrapping_add(count << 24)
            .wrapping_add(low)
    }

    /// Check the cookie `cookie` (the ACK's acknowledgment minus one) of a SYN of `t` with
    /// sequence number `isn` (the ACK's sequence number minus one) at time step `now`; the MSS
    /// index it carries.
    pub fn check(&self, t: &Tuple, isn: u32, cookie: u32, now: u32) -> Result<u32, CookieError> {
        let c = cookie.wrapping_sub(self.hash(t, 0, 1)).wrapping_sub(isn);
        let age = now.wrapping_sub(c >> 24) & 0xff;
        if age > COOKIE_MAX_AGE {
            return Err(CookieError::Stale);
        }
        let count = now.wrapping_sub(age);
        let mss = c.wrapping_sub(self.hash(t, count, 2)) & 0x00ff_ffff;
        if mss as usize >= MSS_TABLE.len() {
            return Err(CookieError::Forged);
        }
        Ok(mss)
    }
}

/// The cookie time step of a time in seconds.
#[inline]
pub fn cookie_count(now_s: u32) -> u32 {
    now_s / COOKIE_PERIOD_S
}

/// The MSS index for a client's MSS option (0: none, which means 536, RFC 9293 §3.7.1).
pub fn mss_index(mss: u16) -> u32 {
    MSS_TABLE.iter().rposition(|&m| m <= mss).unwrap_or(0) as u32
}

/// Frames the edge sends for the frame it was given (see [`Filter::process_edge_mut`]): a
/// [`Decision::Answered`] frame is consumed and these go instead.
#[derive(Clone, Copy, Debug)]
pub struct EdgeReplies {
    /// A frame for the cloud side (the tenant), `cloud_len` bytes; 0: none.
    pub cloud: [u8; REPLY_BYTES],
    pub cloud_len: usize,
    /// A frame for the outside, `outside_len` bytes; 0: none.
    pub outside: [u8; REPLY_BYTES],
    pub outside_len: usize,
}

impl EdgeReplies {
    pub const fn new() -> EdgeReplies {
        EdgeReplies {
            cloud: [0; REPLY_BYTES],
            cloud_len: 0,
            outside: [0; REPLY_BYTES],
            outside_len: 0,
        }
    }

    /// The frame to send toward `side`, if any.
    pub fn frame(&self, side: EdgeSide) -> Option<&[u8]> {
        match side {
            EdgeSide::Cloud => Some(&self.cloud[..self.cloud_len]),
            EdgeSide::Outside => Some(&self.outside[..self.outside_len]),
        }
        .filter(|f| !f.is_empty())
    }
}

impl Default for EdgeReplies {
    fn default() -> Self {
        EdgeReplies::new()
    }
}

/// What the proxy decided about the frame being judged, for [`Filter::process_edge_mut`] to carry
/// out once the filter's decision is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Pending {
    #[default]
    None,
    /// A forwarded segment of a proxied flow: subtract from its sequence number (tenant to
    /// outside) or add to its acknowledgment (outside to tenant).
    Translate { seq_sub: u32, ack_add: u32 },
    /// A forwarded ICMP error to the tenant quoting one of its segments of a proxied flow, as the
    /// outside saw it: add to the quoted sequence number, so the tenant's stack finds its own
    /// (Linux's `tcp_v4_err` ignores an error whose quoted sequence is not in flight, which would
    /// black-hole path MTU discovery for proxied flows).
    QuotedSeq { seq_add: u32 },
    /// Answer the SYN with a cookie SYN-ACK.
    CookieSynAck { cookie: u32, isn: u32, mss: u16 },
    /// The ACK carried a valid cookie: replay the SYN to the tenant.
    SynToTenant { isn: u32, win: u16, mss: u16 },
    /// The tenant's SYN-ACK: acknowledge it, and open the client's window.
    Established {
        client_next: u32,
        server_next: u32,
        client_win: u16,
        server_win: u16,
        cookie_next: u32,
    },
}

/// A TCP segment the proxy writes.
struct Out {
    seq: u32,
    ack: u32,
    syn: bool,
    ack_flag: bool,
    win: u16,
    /// MSS option (0: none).
    mss: u16,
}

/// Where a frame's IP header starts (after Ethernet and at most one 802.1Q tag; `parse` already
/// refused stacked tags) and its IP version.
fn l3(frame: &[u8]) -> Option<(usize, IpVersion)> {
    let mut at = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    if ethertype == parse::ETHERTYPE_VLAN {
        at += 4;
        ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    }
    match ethertype {
        0x0800 => Some((at + 2, IpVersion::V4)),
        0x86dd => Some((at + 2, IpVersion::V6)),
        _ => None,
    }
}

/// Where the TCP header of a frame `parse` accepted as TCP starts.
fn tcp_at(frame: &[u8]) -> Option<usize> {
    let (ip, version) = l3(frame)?;
    let ihl = match version {
        IpVersion::V4 => usize::from(frame.get(ip)? & 0x0f) * 4,
        IpVersion::V6 => 40,
    };
    // `parse` refused a shorter IHL already; a frame it did not judge is not rewritten.
    (ihl >= parse::IPV4_HEADER && frame.len() >= ip + ihl + 20).then_some(ip + ihl)
}

/// One's-complement checksum update for a 32-bit field changing from `old` to `new`
/// (RFC 1624 eq. 3: HC' = ~(~HC + ~m + m')).
fn csum_update(check: u16, old: u32, new: u32) -> u16 {
    let mut sum = u32::from(!check);
    for (o, n) in [(old >> 16, new >> 16), (old & 0xffff, new & 0xffff)] {
        sum += u32::from(!(o as u16)) + n;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Rewrite a 32-bit field of the TCP header at `tcp` (offset `field`) and fix the checksum.
fn rewrite_u32(frame: &mut [u8], tcp: usize, field: usize, f: impl Fn(u32) -> u32) {
    let at = tcp + field;
    let old = u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
    let new = f(old);
    frame[at..at + 4].copy_from_slice(&new.to_be_bytes());
    let check = u16::from_be_bytes([frame[tcp + 16], frame[tcp + 17]]);
    let check = csum_update(check, old, new);
    frame[tcp + 16..tcp + 18].copy_from_slice(&check.to_be_bytes());
}

/// Add `seq_add` to the sequence number of the TCP segment quoted by the ICMP error in `frame`
/// (a frame `parse` accepted as an ICMP error quoting TCP, so every offset below was checked
/// there; a frame that is not what it should be is left alone), and fix the ICMP checksum. The
/// ICMPv6 pseudo-header does not change, so the same incremental update serves both versions.
fn rewrite_quoted_seq(frame: &mut [u8], seq_add: u32) {
    // The ICMP header starts where a TCP header would.
    let Some((_, version)) = l3(frame) else {
        return;
    };
    let Some(icmp) = tcp_at(frame) else {
        return;
    };
    let quoted = icmp + 8;
    let quoted_l4 = match version {
        IpVersion::V4 => match frame.get(quoted) {
            Some(first) if usize::from(first & 0x0f) * 4 >= parse::IPV4_HEADER => {
                quoted + usize::from(first & 0x0f) * 4
            }
            _ => return,
        },
        IpVersion::V6 => quoted + 40,
    };
    let at = quoted_l4 + 4;
    if frame.len() < at + 4 {
        return;
    }
    let old = u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
    let new = old.wrapping_add(seq_add);
    frame[at..at + 4].copy_from_slice(&new.to_be_bytes());
    let check = u16::from_be_bytes([frame[icmp + 2], frame[icmp + 3]]);
    frame[icmp + 2..icmp + 4].copy_from_slice(&csum_update(check, old, new).to_be_bytes());
}

/// Build a TCP segment into `out` from the frame `like` (a frame `parse` accepted as TCP): the same
/// Ethernet header (with its tag) and addresses, swapped when `swap` (an answer), with the
/// segment `seg`. Returns the frame's length, or 0 if `like` is not what it should be.
fn build(like: &[u8], swap: bool, seg: &Out, out: &mut [u8; REPLY_BYTES]) -> usize {
    let Some((ip, version)) = l3(like) else {
        return 0;
    };
    let Some(tcp_in) = tcp_at(like) else {
        return 0;
    };
    out.fill(0);
    out[..ip].copy_from_slice(&like[..ip]);
    if swap {
        out[..6].copy_from_slice(&like[6..12]);
        out[6..12].copy_from_slice(&like[..6]);
    }
    let tcp_len = if seg.mss != 0 { 24 } else { 20 };
    let ports = [
        u16::from_be_bytes([like[tcp_in], like[tcp_in + 1]]),
        u16::from_be_bytes([like[tcp_in + 2], like[tcp_in + 3]]),
    ];
    let (sport, dport) = if swap {
        (ports[1], ports[0])
    } else {
        (ports[0], ports[1])
    };
    let (src, dst, ip_len): (IpAddress, IpAddress, usize) = match version {
        IpVersion::V4 => {
            let a = |at: usize| Ipv4Addr::new(like[at], like[at + 1], like[at + 2], like[at + 3]);
            let (s, d) = (a(ip + 12), a(ip + 16));
            let (s, d) = if swap { (d, s) } else { (s, d) };
            let mut p = Ipv4Packet::new_unchecked(&mut out[ip..ip + 20 + tcp_len]);
            p.set_version(4);
            p.set_header_len(20);
            p.set_total_len((20 + tcp_len) as u16);
            p.clear_flags();
            p.set_dont_frag(true);
            p.set_hop_limit(HOP_LIMIT);
            p.set_next_header(IpProtocol::Tcp);
            p.set_src_addr(s);
            p.set_dst_addr(d);
            p.fill_checksum();
            (IpAddress::Ipv4(s), IpAddress::Ipv4(d), 20)
        }
        IpVersion::V6 => {
            let a = |at: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&like[at..at + 16]);
                Ipv6Addr::from(b)
            };
            let (s, d) = (a(ip + 8), a(ip + 24));
            let (s, d) = if swap { (d, s) } else { (s, d) };
            let mut p = Ipv6Packet::new_unchecked(&mut out[ip..ip + 40 + tcp_len]);
            p.set_version(6);
            p.set_payload_len(tcp_len as u16);
            p.set_next_header(IpProtocol::Tcp);
            p.set_hop_limit(HOP_LIMIT);
            p.set_src_addr(s);
            p.set_dst_addr(d);
            (IpAddress::Ipv6(s), IpAddress::Ipv6(d), 40)
        }
    };
    let at = ip + ip_len;
    let mut t = TcpPacket::new_unchecked(&mut out[at..at + tcp_len]);
    t.set_src_port(sport);
    t.set_dst_port(dport);
    t.set_seq_number(TcpSeqNumber(seg.seq as i32));
    t.set_ack_number(TcpSeqNumber(if seg.ack_flag { seg.ack as i32 } else { 0 }));
    t.set_header_len(tcp_len as u8);
    t.clear_flags();
    t.set_syn(seg.syn);
    t.set_ack(seg.ack_flag);
    t.set_window_len(seg.win);
    if seg.mss != 0 {
        let o = t.options_mut();
        o[..4].copy_from_slice(&[2, 4, (seg.mss >> 8) as u8, seg.mss as u8]);
    }
    t.fill_checksum(&src, &dst);
    at + tcp_len
}

impl Filter<'_> {
    /// Judge a frame at the edge as [`Filter::process_edge`] does, with the SYN proxy: `frame` may
    /// be rewritten in place (the sequence translation of a proxied flow) before it is forwarded,
    /// and a [`Decision::Answered`] frame is consumed: `replies` then holds what to send instead.
    pub fn process_edge_mut(
        &mut self,
        from: EdgeSide,
        to: EdgeSide,
        frame: &mut [u8],
        replies: &mut EdgeReplies,
        now_ns: u64,
    ) -> Decision {
        replies.cloud_len = 0;
        replies.outside_len = 0;
        self.pending = Pending::None;
        self.proxy_here = from == EdgeSide::Outside && self.cookies.is_some();
        let d = self.process_edge(from, to, frame, now_ns);
        self.proxy_here = false;
        let pending = core::mem::take(&mut self.pending);
        match (d, pending) {
            (_, Pending::None) => d,
            (Decision::Forward, Pending::Translate { seq_sub, ack_add }) => {
                if let Some(tcp) = tcp_at(frame) {
                    if seq_sub != 0 {
                        rewrite_u32(frame, tcp, 4, |s| s.wrapping_sub(seq_sub));
                    }
                    // An ACK flag is what made the tracker add it (see `proxied_segment`).
                    if ack_add != 0 {
                        rewrite_u32(frame, tcp, 8, |a| a.wrapping_add(ack_add));
                    }
                }
                d
            }
            (Decision::Forward, Pending::QuotedSeq { seq_add }) => {
                rewrite_quoted_seq(frame, seq_add);
                d
            }
            (Decision::Answered, p) => {
                self.answer(frame, p, replies);
                d
            }
            (d, _) => d,
        }
    }

    /// Build the frames of a [`Decision::Answered`].
    fn answer(&mut self, frame: &[u8], p: Pending, r: &mut EdgeReplies) {
        match p {
            Pending::CookieSynAck { cookie, isn, mss } => {
                let seg = Out {
                    seq: cookie,
                    ack: isn.wrapping_add(1),
                    syn: true,
                    ack_flag: true,
                    // No data before the tenant has answered: the window opens then.
                    win: 0,
                    mss,
                };
                r.outside_len = build(frame, true, &seg, &mut r.outside);
                self.counters.syncookies_sent += 1;
            }
            Pending::SynToTenant { isn, win, mss } => {
                let seg = Out {
                    seq: isn,
                    ack: 0,
                    syn: true,
                    ack_flag: false,
                    win,
                    mss,
                };
                r.cloud_len = build(frame, false, &seg, &mut r.cloud);
                self.counters.syncookies_valid += 1;
            }
            Pending::Established {
                client_next,
                server_next,
                client_win,
                server_win,
                cookie_next,
            } => {
                let to_tenant = Out {
                    seq: client_next,
                    ack: server_next,
                    syn: false,
                    ack_flag: true,
                    win: client_win,
                    mss: 0,
                };
                r.cloud_len = build(frame, true, &to_tenant, &mut r.cloud);
                let window_update = Out {
                    seq: cookie_next,
                    ack: client_next,
                    syn: false,
                    ack_flag: true,
                    win: server_win,
                    mss: 0,
                };
                r.outside_len = build(frame, false, &window_update, &mut r.outside);
                self.counters.synproxy_established += 1;
            }
            Pending::None | Pending::Translate { .. } | Pending::QuotedSeq { .. } => {}
        }
    }

    /// Whether the proxy answers a SYN for `key` (see [`SynProxy`]).
    fn proxy_engaged(&self, key: &FlowKey) -> bool {
        let p = &self.config.synproxy;
        let Some(p) = p else { return false };
        let ct = &self.conntrack;
        ct.half_open() >= p.global
            || ct.half_open_of(key.tenant) >= p.per_tenant
            || ct.half_open_at(key) >= p.per_dst
    }

    /// The client's tuple of a key (the outside's address and port are the key's remote side).
    fn tuple(key: &FlowKey) -> Tuple {
        Tuple {
            src: key.remote,
            dst: key.local,
            sport: key.remote_port,
            dport: key.local_port,
        }
    }

    /// From `open`: a TCP segment from the outside that finds no entry, with a verdict that opens
    /// its flow. `Some` when the proxy takes it: a SYN answered with a cookie, an ACK with a
    /// valid cookie (an entry is created and the SYN replayed to the tenant), or an ACK with an
    /// invalid one while cookies are out (dropped). `None`: judged as usual.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn proxy_open(
        &mut self,
        i: usize,
        key: &FlowKey,
        hash: u32,
        flags: TcpFlags,
        seg: &TcpSeg,
        verdict: super::VerdictRef,
        now_s: u32,
    ) -> Option<Decision> {
        let cookies = self.cookies?;
        if !self.proxy_here {
            return None;
        }
        let t = Self::tuple(key);
        if flags.syn && !flags.ack && !flags.rst && !flags.fin {
            if !self.proxy_engaged(key) {
                return None;
            }
            let mss = mss_index(seg.mss);
            let cookie = cookies.make(&t, seg.seq, cookie_count(now_s), mss);
            self.pending = Pending::CookieSynAck {
                cookie,
                isn: seg.seq,
                mss: MSS_TABLE[mss as usize],
            };
            self.last_cookie_s = Some(now_s);
            return Some(Decision::Answered);
        }
        let recent = self
            .last_cookie_s
            .is_some_and(|s| now_s.wrapping_sub(s) <= COOKIE_PERIOD_S * (COOKIE_MAX_AGE + 1));
        if !(flags.ack && !flags.syn && !flags.rst && !flags.fin && recent) {
            return None;
        }
        let cookie = seg.ack.wrapping_sub(1);
        let count = cookie_count(now_s);
        // The handshake's ACK carries the ISN plus one. If it was lost, the client (which believes
        // it is connected, with a zero window) sends zero-window probes carrying the ISN itself
        // (RFC 9293 §3.8.6.1: SND.UNA - 1), which must complete the handshake as well.
        let mut isn = seg.seq.wrapping_sub(1);
        let mut checked = cookies.check(&t, isn, cookie, count);
        if checked.is_err() && seg.len == 0 {
            isn = seg.seq;
            checked = cookies.check(&t, isn, cookie, count);
        }
        let mss = match checked {
            Ok(mss) => MSS_TABLE[mss as usize],
            Err(_) => return Some(Decision::Drop(DropReason::SynCookieInvalid)),
        };
        // A completed handshake: the entry the SYN would have made, made now.
        let syn = TcpSeg {
            seq: isn,
            ack: 0,
            win: seg.win,
            wscale: parse::NO_WSCALE,
            mss,
            len: 1,
        };
        let syn_flags = TcpFlags {
            syn: true,
            ..TcpFlags::default()
        };
        let i = match self.make_entry(i, key, hash, super::Direction::Ingress, verdict, now_s) {
            Ok(i) => i,
            Err(d) => return Some(d),
        };
        self.conntrack.track(i, true, syn_flags, &syn);
        self.conntrack.set_proxied(i, cookie);
        self.pending = Pending::SynToTenant {
            isn,
            win: seg.win,
            mss,
        };
        Some(Decision::Answered)
    }

    /// From `existing`: a TCP segment of a proxied flow (slot `i`). The tenant's SYN-ACK to the
    /// replayed SYN completes the handshake here (`Some`); any other segment is translated
    /// (`seg` in place for the tracker, [`Pending::Translate`] for the frame) and judged as usual
    /// (`None`).
    pub(super) fn proxied_segment(
        &mut self,
        i: usize,
        orig: bool,
        flags: TcpFlags,
        seg: &mut TcpSeg,
        now_s: u32,
    ) -> Option<Decision> {
        let s = self.conntrack.slot(i);
        let (state_byte, offset) = (s.state_byte(), s.seq_offset());
        let state = TcpState::from_bits(state_byte);
        if state == TcpState::SynSent && !orig && flags.syn && flags.ack && !flags.rst {
            return Some(self.proxy_synack(i, flags, seg, now_s));
        }
        if state == TcpState::SynSent && orig && flags.ack && !flags.syn && !flags.rst {
            return self.replay_again(i, seg, now_s);
        }
        if orig {
            if flags.ack {
                seg.ack = seg.ack.wrapping_add(offset);
                self.pending = Pending::Translate {
                    seq_sub: 0,
                    ack_add: offset,
                };
            }
        } else {
            self.pending = Pending::Translate {
                seq_sub: offset,
                ack_add: 0,
            };
        }
        None
    }

    /// A client segment while the tenant has not answered the replayed SYN (lost on the way, or
    /// its SYN-ACK was): the SYN is replayed again, if the segment still carries a valid cookie.
    fn replay_again(&mut self, i: usize, seg: &TcpSeg, now_s: u32) -> Option<Decision> {
        let cookies = self.cookies?;
        let s = self.conntrack.slot(i);
        let client = s.window(true);
        let isn = client.end.wrapping_sub(1);
        let key = s.key()?;
        let t = Self::tuple(&key);
        let mss = cookies
            .check(&t, isn, seg.ack.wrapping_sub(1), cookie_count(now_s))
            .ok()?;
        self.pending = Pending::SynToTenant {
            isn,
            win: client.maxwin.min(u32::from(u16::MAX)) as u16,
            mss: MSS_TABLE[mss as usize],
        };
        Some(Decision::Answered)
    }

    /// The tenant's SYN-ACK on a proxied entry: track it, acknowledge it on the client's behalf
    /// (tracked too: the entry is established), keep the offset, and answer both sides.
    fn proxy_synack(&mut self, i: usize, flags: TcpFlags, seg: &TcpSeg, now_s: u32) -> Decision {
        let s = self.conntrack.slot(i);
        let cookie = s.window(false).end.wrapping_sub(1);
        let client = s.window(true);
        let client_win = client.maxwin.min(u32::from(u16::MAX)) as u16;
        let TcpStep::Pass(state) = conntrack::tcp_step(s.state_byte(), false, flags) else {
            return Decision::Drop(DropReason::InvalidTcpState);
        };
        if self.conntrack.track(i, false, flags, seg) != Track::InWindow {
            self.sample_out_of_window(i, false, flags, seg, now_s);
            return Decision::Drop(DropReason::TcpOutOfWindow);
        }
        let t = self.config.timeouts;
        self.conntrack
            .touch(i, state, now_s.saturating_add(t.tcp_syn_ack));
        let server_next = seg.seq.wrapping_add(1);
        let client_next = client.end;
        let ack = TcpSeg {
            seq: client_next,
            ack: server_next,
            win: client_win,
            wscale: parse::NO_WSCALE,
            mss: 0,
            len: 0,
        };
        let ack_flags = TcpFlags {
            ack: true,
            ..TcpFlags::default()
        };
        let state_byte = self.conntrack.slot(i).state_byte();
        if let TcpStep::Pass(state) = conntrack::tcp_step(state_byte, true, ack_flags) {
            self.conntrack.track(i, true, ack_flags, &ack);
            self.conntrack
                .touch(i, state, now_s.saturating_add(t.tcp_established));
        }
        let offset = seg.seq.wrapping_sub(cookie);
        self.conntrack.set_seq_offset(i, offset);
        self.pending = Pending::Established {
            client_next,
            server_next,
            client_win,
            server_win: seg.win,
            cookie_next: cookie.wrapping_add(1),
        };
        Decision::Answered
    }

    /// An entry for a new flow at `i` (from a [`Probe::Vacant`]), within the tenant's quota and
    /// half-open limit (see `open`), counted as created; its slot.
    pub(super) fn make_entry(
        &mut self,
        mut i: usize,
        key: &FlowKey,
        hash: u32,
        origin: super::Direction,
        verdict: super::VerdictRef,
        now_s: u32,
    ) -> Result<usize, Decision> {
        i = self.within_quota(i, key, hash, true, now_s)?;
        if self.conntrack.half_open_full(key.tenant) {
            i = self.evict_half_open(key, hash, now_s)?;
        }
        let i = self.make_room(i, key, hash, now_s)?;
        let timeout = self.config.timeouts.tcp_syn_sent;
        self.insert_flow(
            i,
            key,
            origin,
            TcpState::SynSent,
            verdict,
            now_s.saturating_add(timeout),
        );
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple() -> Tuple {
        Tuple {
            src: vigil_wire::verdict::v4([198, 51, 100, 7]),
            dst: vigil_wire::verdict::v4([10, 66, 0, 2]),
            sport: 40000,
            dport: 7000,
        }
    }

    #[test]
    fn cookies_round_trip_and_refuse_forgeries() {
        let c = Cookies::new([1, 2]);
        let t = tuple();
        for mss in 0..4 {
            let cookie = c.make(&t, 12345, 100, mss);
            assert_eq!(c.check(&t, 12345, cookie, 100), Ok(mss));
            assert_eq!(c.check(&t, 12345, cookie, 101), Ok(mss));
            assert_eq!(c.check(&t, 12345, cookie, 102), Err(CookieError::Stale));
        }
        let cookie = c.make(&t, 12345, 100, 3);
        let other = Tuple { sport: 40001, ..t };
        assert!(c.check(&other, 12345, cookie, 100).is_err());
        assert!(c.check(&t, 12345 + 1000, cookie, 100).is_err());
        assert!(Cookies::new([1, 3]).check(&t, 12345, cookie, 100).is_err());
    }

    #[test]
    fn checksum_update_matches_a_full_recompute() {
        // RFC 1624's example shape: a field change keeps the sum consistent.
        let words = [
            0x4500u16, 0x0073, 0x0000, 0x4000, 0x4011, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
        ];
        let sum = |w: &[u16]| {
            let mut s: u32 = w.iter().map(|&x| u32::from(x)).sum();
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            !(s as u16)
        };
        let before = sum(&words);
        let mut changed = words;
        changed[5] = 0x1234;
        changed[6] = 0xfffe;
        let old = (u32::from(words[5]) << 16) | u32::from(words[6]);
        let new = (u32::from(changed[5]) << 16) | u32::from(changed[6]);
        assert_eq!(csum_update(before, old, new), sum(&changed));
    }
}
