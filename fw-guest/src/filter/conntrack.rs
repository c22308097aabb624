//! The connection-tracking table: open addressing with linear probing over caller-supplied memory
//! of 32-byte slots; no heap, no pointers, no per-entry overhead beyond the slot itself.
//!
//! - Lookups cost O(1) expected probes, independent of the table size: the table never fills past
//!   its load limit ([`MAX_LOAD_NUM`]/[`MAX_LOAD_DEN`] of the slots), and a seeded hash spreads
//!   attacker-chosen keys.
//! - A slot holds what every flow needs: an IPv4 flow's whole key, its expiry, verdict and state.
//!   What only some flows need lives in two pools beside the table, one entry per flow that needs
//!   it: a TCP flow's windows ([`TcpExt`]), an IPv6 flow's addresses ([`V6Addrs`]). The pools
//!   hand out their entries from the front and reuse freed ones first, so only as many of their
//!   pages are ever touched as flows of that kind were live at once: 64k UDP flows over IPv4 touch
//!   the table alone (2.3 MiB, where one 80-byte slot for every flow took 5.7).
//! - Deletion is backward-shift (no tombstones), so probe lengths do not degrade with churn.
//! - Time is supplied by the caller (whole seconds of a monotonic clock): expired entries are
//!   reused in place when a probe meets them, reclaimed by an incremental [`Conntrack::sweep`], and
//!   never count as live. An established entry is never evicted to make room: a full table
//!   refuses new flows instead.
//! - TCP is tracked by sequence numbers (see [`TcpExt::track`]): per direction the highest
//!   sequence number sent, the highest edge the peer's window allows, and the largest window, in
//!   the manner of Linux's `tcp_in_window` (after G. van Rooij, "Real stateful TCP packet
//!   filtering in IP Filter", 2001).
//! - Half-open TCP entries (SYN seen, handshake not complete; or adopted mid-stream and not yet
//!   answered, [`TcpState::Adopted`]) are counted, globally and per tenant and per destination
//!   bucket, so a SYN flood (or a flood of forged mid-stream segments) can be bounded (see
//!   [`Conntrack::half_open_full`] and [`Conntrack::evict_half_open`]) and the edge's SYN proxy
//!   can tell when to answer SYNs itself ([`Conntrack::half_open_of`],
//!   [`Conntrack::half_open_at`]).
//! - Every tenant's entries are counted exactly ([`tenants`]): a tenant at its flow quota
//!   ([`Conntrack::at_quota`]) opens nothing more, whatever room the table has for others.
//! - Unreplied UDP and ICMP echo entries are provisional as half-open TCP ones are: one forged
//!   datagram makes one, so they are evictable ([`Conntrack::evict_unreplied`], soonest to
//!   expire first), and those opened from the tenant's far side are counted per tenant and
//!   bounded ([`Conntrack::inbound_full`]). Only the other direction's packet (a reply) makes
//!   such an entry one that is never evicted; for an entry opened toward the tenant, the far
//!   side's packet after the tenant's answer: a tenant answers forged datagrams and pings too
//!   (a DNS server, any echo), so its answer proves nothing about the far side (as Linux marks a
//!   UDP entry assured only once it outlives its first reply).

use vigil_wire::verdict::{Direction, Protocol};

use super::flow::{hash_fields, kind_parts, reduce, FlowKey, KIND_V6};
use super::parse::{TcpFlags, TcpSeg, MAX_WSCALE, NO_WSCALE};
use super::verdicts::VerdictRef;

mod entry;
mod evict;
mod limits;
mod tcp;
pub mod tenants;
use entry::{addresses_of, packed_addrs, Pool, NO_TCP, SCALE_NONE};
pub use entry::{Flow, FlowSlot, TcpExt, V6Addrs, MAX_VERDICT_SLOTS};
pub use limits::{default_flow_quota, default_inbound_quota, HalfOpenLimits, Timeouts, Unreplied};
pub use tcp::{tcp_step, TcpStep, TcpWindow, Track};
use tenants::TenantCounts;

/// Load limit: at most 7/8 of the slots hold entries (linear probing stays at a few probes per
/// hit; misses, which only new flows pay, average ~32).
pub const MAX_LOAD_NUM: usize = 7;
pub const MAX_LOAD_DEN: usize = 8;

/// Hash slots a table of `flows` entries needs under the load limit.
pub const fn table_slots_for(flows: usize) -> usize {
    (flows * MAX_LOAD_DEN).div_ceil(MAX_LOAD_NUM)
}

/// The memory a table is given is split in this many equal parts: its hash slots, its TCP pool
/// and its IPv6 pool. A pool as long as the table never runs out (each entry holds at most one
/// entry of each pool), and its entries that are never used are never touched.
const PARTS: usize = 3;

/// [`FlowSlot`]s of memory a table of `flows` entries takes ([`Conntrack::new`] splits it into
/// its hash slots and its two pools, all 32-byte entries).
pub const fn slots_for(flows: usize) -> usize {
    PARTS * table_slots_for(flows)
}

/// TCP state of a tracked connection (low nibble of [`FlowSlot::state`]).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// Not TCP.
    None = 0,
    /// The opener's SYN passed.
    SynSent = 1,
    /// The responder's SYN-ACK passed.
    SynAckSeen = 2,
    Established = 3,
    /// One side sent FIN (see the FIN flags for which).
    FinWait = 4,
    /// Both sides sent FIN; the last ACKs may pass.
    Closing = 5,
    /// Reset (or a closed connection): only ACK/RST pass, a new SYN from the opener re-opens.
    Closed = 6,
    /// Taken over mid-stream through an `Op::Adopt` verdict, one side seen so far. Provisional:
    /// any host can send one segment with an adoptable 4-tuple (a bare ACK is enough), so the
    /// entry lives [`Timeouts::tcp_syn_ack`] and is half-open (counted and evicted as a SYN's
    /// entry is) until the other side answers in window; it then becomes `Established`, or
    /// `FinWait` / `Closing` if FINs were seen ([`confirmed_state`]).
    Adopted = 7,
}

impl TcpState {
    /// The TCP state held in a state byte.
    pub fn from_bits(b: u8) -> TcpState {
        match b & STATE_MASK {
            1 => TcpState::SynSent,
            2 => TcpState::SynAckSeen,
            3 => TcpState::Established,
            4 => TcpState::FinWait,
            5 => TcpState::Closing,
            6 => TcpState::Closed,
            7 => TcpState::Adopted,
            _ => TcpState::None,
        }
    }
}

const STATE_MASK: u8 = 0x07;
/// The flow's handshake was completed by the edge's SYN proxy: the responder's sequence numbers
/// are translated by [`FlowSlot::seq_offset`] (see `filter::synproxy`).
pub(crate) const F_PROXIED: u8 = 0x08;
/// The flow was opened by a packet travelling toward the tenant.
const F_ORIGIN_INGRESS: u8 = 0x80;
/// A packet travelled in the reply direction.
const F_REPLIED: u8 = 0x40;
/// The opener sent FIN.
const F_FIN_ORIG: u8 = 0x20;
/// The responder sent FIN.
const F_FIN_REPLY: u8 = 0x10;
/// (UDP, ICMP echo: the FIN bits are TCP's) an entry opened toward its tenant that the tenant
/// answered: the far side's next packet confirms it ([`Conntrack::answered`]).
const F_ANSWERED: u8 = F_FIN_REPLY;

fn origin_bit_of(origin: Direction) -> u8 {
    match origin {
        Direction::Egress => 0,
        Direction::Ingress => F_ORIGIN_INGRESS,
    }
}

/// Whether an entry is an unreplied one that is not TCP (UDP, ICMP echo): provisional, evictable.
#[inline]
fn unreplied(kind: u8, state: u8) -> bool {
    kind != 0 && kind & !KIND_V6 != Protocol::Tcp as u8 && state & F_REPLIED == 0
}

/// What a UDP datagram or echo message does to its entry (opened in `origin`; `orig`: it travels
/// that way; `replied`, `state`: the entry's): `Some(true)` confirms it (replied: never evicted,
/// [`Conntrack::mark_replied`]), `Some(false)` is the tenant's answer to an entry opened toward
/// it ([`Conntrack::answered`]: still provisional, since anyone can make a tenant answer with a
/// forged datagram or ping), `None` changes nothing but the expiry. An entry the tenant opened is
/// confirmed by the far side's reply; one opened toward the tenant by the far side's next packet
/// after the tenant's answer.
#[inline(always)]
pub(crate) fn confirms(origin: Direction, orig: bool, replied: bool, state: u8) -> Option<bool> {
    if replied {
        return Some(true);
    }
    match (origin, orig) {
        (Direction::Egress, false) => Some(true),
        (Direction::Ingress, false) => Some(false),
        (Direction::Ingress, true) if state & F_ANSWERED != 0 => Some(true),
        _ => None,
    }
}

/// Whether an entry is [`unreplied`] and was opened by a packet travelling toward its tenant
/// (counted against the tenant's inbound quota).
#[inline]
fn unreplied_inbound(kind: u8, state: u8) -> bool {
    unreplied(kind, state) && state & F_ORIGIN_INGRESS != 0
}

#[inline]
fn half_open(kind: u8, state: u8) -> bool {
    kind != 0
        && matches!(
            TcpState::from_bits(state),
            TcpState::SynSent | TcpState::SynAckSeen | TcpState::Adopted
        )
}

/// The state byte of an [`TcpState::Adopted`] entry whose other side has now answered: the FINs
/// seen while it was provisional say where the connection is (other bits kept).
pub fn confirmed_state(state: u8) -> u8 {
    let high = state & !STATE_MASK;
    let to = match (high & F_FIN_ORIG != 0, high & F_FIN_REPLY != 0) {
        (false, false) => TcpState::Established,
        (true, true) => TcpState::Closing,
        _ => TcpState::FinWait,
    };
    high | to as u8
}

/// Result of a probe for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A live entry with this key sits at the index.
    Found(usize),
    /// No live entry; a new one may be written at the index (an empty slot, or an expired entry
    /// on the key's probe path that can be overwritten in place).
    Vacant(usize),
}

/// Half-open entries are also counted per destination (tenant, tenant-side address and port),
/// in this many buckets of a keyed hash: the SYN proxy engages for a flooded service before its
/// tenant's whole share is taken. Destinations sharing a bucket share its count (the proxy then
/// answers for both, which costs them nothing but a cookie round trip).
pub const DST_BUCKETS: usize = 256;
/// Separates the destination buckets' hash from the flow hash under the same seed.
const DST_SALT: u64 = 0x6473_745f_6275_636b;

#[inline]
fn dst_bucket(seed: u64, tenant: u32, local: &[u8; 16], local_port: u16) -> usize {
    (hash_fields(
        seed ^ DST_SALT,
        tenant,
        0,
        local,
        &[0; 16],
        local_port,
        0,
        3,
    ) as usize)
        % DST_BUCKETS
}

/// The table over caller-supplied memory.
pub struct Conntrack<'a> {
    slots: &'a mut [FlowSlot],
    /// TCP flows' windows.
    tcp: Pool<'a, TcpExt>,
    /// IPv6 flows' addresses.
    v6: Pool<'a, V6Addrs>,
    /// Occupied slots (live or expired-not-yet-reclaimed).
    used: usize,
    max: usize,
    seed: u64,
    sweep_cursor: usize,
    /// Half-open entries (live or expired-not-yet-reclaimed), all and per destination bucket.
    half_open: usize,
    half_open_dst: [u32; DST_BUCKETS],
    /// Entries and half-open entries per tenant.
    tenants: TenantCounts,
    limits: HalfOpenLimits,
    quota: usize,
    /// Most unreplied entries opened toward one tenant ([`default_inbound_quota`]).
    inbound_quota: usize,
    /// Half-open insertions so far (its low 16 bits stamp each half-open entry's age).
    half_open_clock: u16,
    evict_cursor: usize,
}

impl<'a> Conntrack<'a> {
    /// Wrap (and clear) `memory`: a third of it becomes the hash slots, the rest the two pools
    /// ([`slots_for`] says how much `flows` entries need). Holds up to 7/8 of the hash slots'
    /// number of flows; `None` if that leaves fewer than 2 slots.
    pub fn new(memory: &'a mut [FlowSlot], seed: u64) -> Option<Conntrack<'a>> {
        memory.fill(FlowSlot::EMPTY);
        Conntrack::new_empty(memory, seed)
    }

    /// [`new`](Self::new) over memory the caller vouches is all [`FlowSlot::EMPTY`] already
    /// (zeroed): nothing is written, so no page of the table is touched until flows arrive, and
    /// a pool's pages only as its entries are first used. Slots that are not empty would read
    /// as entries (wrong answers, never unsafety: a slot is plain integers), so only a zeroing
    /// VMM's word is taken for it. The pools' contents are never read before they are written.
    pub fn new_empty(memory: &'a mut [FlowSlot], seed: u64) -> Option<Conntrack<'a>> {
        let n = memory.len() / PARTS;
        if n < 2 || n > u32::MAX as usize / 2 {
            return None;
        }
        let (slots, rest) = memory.split_at_mut(n);
        let (tcp, v6) = rest.split_at_mut(n);
        // SAFETY: TcpExt and V6Addrs are repr(C) structs of integers and integer arrays, as long
        // as a FlowSlot and no more aligned (asserted above), so every bit pattern is a valid
        // value and `n` of them fit, aligned, in `n` FlowSlots; the three parts are disjoint and
        // borrowed for 'a, as the new slices are.
        let (tcp, v6) = unsafe {
            (
                core::slice::from_raw_parts_mut(tcp.as_mut_ptr().cast::<TcpExt>(), n),
                core::slice::from_raw_parts_mut(v6.as_mut_ptr().cast::<V6Addrs>(), n),
            )
        };
        let max = (n * MAX_LOAD_NUM / MAX_LOAD_DEN).clamp(1, n - 1);
        Some(Conntrack {
            slots,
            tcp: Pool::new(tcp),
            v6: Pool::new(v6),
            used: 0,
            max,
            seed,
            sweep_cursor: 0,
            half_open: 0,
            half_open_dst: [0; DST_BUCKETS],
            tenants: TenantCounts::new(),
            limits: HalfOpenLimits::for_capacity(max),
            quota: default_flow_quota(max),
            inbound_quota: default_inbound_quota(max),
            half_open_clock: 0,
            evict_cursor: 0,
        })
    }

    pub fn set_half_open_limits(&mut self, limits: HalfOpenLimits) {
        self.limits = limits;
    }

    pub fn half_open_limits(&self) -> HalfOpenLimits {
        self.limits
    }

    /// Half-open entries (expired ones not yet reclaimed included).
    pub fn half_open(&self) -> usize {
        self.half_open
    }

    /// Half-open entries of `tenant`.
    pub fn half_open_of(&self, tenant: u32) -> usize {
        self.tenants.half_open(tenant)
    }

    /// Half-open entries in the destination bucket of `key`'s tenant-side address and port.
    pub fn half_open_at(&self, key: &FlowKey) -> usize {
        self.half_open_dst[dst_bucket(self.seed, key.tenant, &key.local, key.local_port)] as usize
    }

    /// Whether a new half-open entry for `tenant` must first make room: the tenant or the whole
    /// table is at its half-open limit.
    #[inline]
    pub fn half_open_full(&self, tenant: u32) -> bool {
        self.half_open >= self.limits.global
            || self.tenants.half_open(tenant) >= self.limits.per_tenant
    }

    /// Entries `tenant` holds (expired ones not yet reclaimed included).
    pub fn flows_of(&self, tenant: u32) -> usize {
        self.tenants.flows(tenant)
    }

    pub fn set_flow_quota(&mut self, quota: usize) {
        self.quota = quota.max(1);
    }

    pub fn flow_quota(&self) -> usize {
        self.quota
    }

    pub fn set_inbound_quota(&mut self, quota: usize) {
        self.inbound_quota = quota.max(1);
    }

    pub fn inbound_quota(&self) -> usize {
        self.inbound_quota
    }

    /// Unreplied entries opened toward `tenant` (expired ones not yet reclaimed included).
    pub fn inbound_of(&self, tenant: u32) -> usize {
        self.tenants.inbound(tenant)
    }

    /// Whether a new unreplied entry opened toward `tenant` must first make room: the tenant
    /// holds its inbound quota of them.
    #[inline]
    pub fn inbound_full(&self, tenant: u32) -> bool {
        self.tenants.inbound(tenant) >= self.inbound_quota
    }

    /// Whether `tenant` may hold no further entry: it is at its flow quota, or (never in practice)
    /// the per-tenant counts have no room for one more tenant.
    #[inline]
    pub fn at_quota(&self, tenant: u32) -> bool {
        self.tenants.flows(tenant) >= self.quota || !self.tenants.can_count(tenant)
    }

    /// Half-open accounting for an entry of `tenant` at `local`:`local_port` that became
    /// (`add`) or stopped being half-open.
    #[inline(never)]
    fn count_half_open(&mut self, tenant: u32, local: &[u8; 16], local_port: u16, add: bool) {
        let d = dst_bucket(self.seed, tenant, local, local_port);
        if add {
            self.half_open += 1;
            self.half_open_dst[d] += 1;
        } else {
            self.half_open -= 1;
            self.half_open_dst[d] = self.half_open_dst[d].saturating_sub(1);
        }
    }

    /// Feed a TCP segment to the entry at `i` (see [`TcpExt::track`]). An entry without TCP
    /// state (never a TCP one) has no window a segment could be in.
    #[inline(always)]
    pub fn track(&mut self, i: usize, orig: bool, f: TcpFlags, seg: &TcpSeg) -> Track {
        let state = self.slots[i].state;
        match self.tcp_mut(i) {
            Some(t) => t.track(state, orig, f, seg),
            None => Track::OutOfWindow,
        }
    }

    /// Whether the FIN of segment `seg` from the opener (`orig`) or the responder of the TCP entry
    /// at `i` closes that side's stream as far as the entry has seen it: the segment starts at
    /// or before the sender's highest sequence number so far (no hole before it) and its FIN
    /// lies at or beyond it (or just below it: a retransmitted FIN), as the receiver needs it
    /// to close (RFC 9293 §3.10.7.4: a FIN past a hole waits for the hole). A FIN anywhere else
    /// in the window is out of order, or forged blind; taken as a FIN, it moved a live
    /// connection's entry to FIN-wait (2 minutes) for good, so an idle connection died under a
    /// blind attacker who landed one in the window. A side never seen (an adopted entry's) has
    /// nothing to compare with: its FIN counts.
    pub fn fin_in_place(&self, i: usize, orig: bool, seg: &TcpSeg) -> bool {
        let Some(t) = self.tcp_ref(i) else {
            return true;
        };
        let w = t.window(orig);
        // Past the FIN (`seq + len` counts it).
        let end = seg.seq.wrapping_add(seg.len);
        let at_or_before = |a: u32, b: u32| (b.wrapping_sub(a) as i32) >= 0;
        w.maxwin == 0 || (at_or_before(seg.seq, w.end) && at_or_before(w.end, end))
    }

    /// Forget the windows of the entry at `i` (see [`TcpExt::adopt_windows`]).
    pub fn adopt_windows(&mut self, i: usize) {
        if let Some(t) = self.tcp_mut(i) {
            t.adopt_windows();
        }
    }

    /// Whether both sides of the TCP entry at `i` have sent a segment that passed (an adopted
    /// entry's confirmation).
    pub fn both_sides_seen(&self, i: usize) -> bool {
        match self.slots[i].tcp {
            0 => false,
            t => self
                .tcp
                .get(t as usize - 1)
                .is_some_and(|x| x.win[0].maxwin != 0 && x.win[1].maxwin != 0),
        }
    }

    /// The TCP state of the entry at `i`, if it has any.
    #[inline(always)]
    fn tcp_ref(&self, i: usize) -> Option<&TcpExt> {
        match self.slots[i].tcp {
            0 => None,
            t => self.tcp.get(t as usize - 1),
        }
    }

    fn tcp_mut(&mut self, i: usize) -> Option<&mut TcpExt> {
        match self.slots[i].tcp {
            0 => None,
            t => self.tcp.get_mut(t as usize - 1),
        }
    }

    /// What the pools hold for `s`: its TCP state ([`NO_TCP`] if none) and IPv6 addresses.
    #[inline(always)]
    fn pooled(&self, s: &FlowSlot) -> (&TcpExt, Option<&V6Addrs>) {
        let tcp = match s.tcp {
            0 => &NO_TCP,
            t => self.tcp.get(t as usize - 1).unwrap_or(&NO_TCP),
        };
        (tcp, self.addresses_entry(s))
    }

    /// The addresses of the entry in `s` (IPv4 in the first 4 bytes, rest zero).
    fn addresses(&self, s: &FlowSlot) -> ([u8; 16], [u8; 16]) {
        addresses_of(s, self.addresses_entry(s))
    }

    /// An IPv6 entry's pooled addresses (`None` for IPv4).
    #[inline(always)]
    fn addresses_entry(&self, s: &FlowSlot) -> Option<&V6Addrs> {
        if s.is_v6() {
            self.v6.get(s.v6_index())
        } else {
            None
        }
    }

    /// Whether the entry in `s` holds `key` (`kind` and `packed` are the key's, computed once
    /// per probe).
    #[inline(always)]
    fn matches(&self, s: &FlowSlot, key: &FlowKey, kind: u8, packed: &[u8; 8]) -> bool {
        if s.tenant != key.tenant
            || s.local_port != key.local_port
            || s.remote_port != key.remote_port
            || s.kind != kind
        {
            return false;
        }
        if kind & KIND_V6 == 0 {
            s.addrs == *packed
        } else {
            s.addrs[4..] == packed[4..] && self.v6_matches(s, key)
        }
    }

    /// Whether an IPv6 entry's pooled addresses are `key`'s (out of line: see `v6_fold`).
    #[inline(never)]
    fn v6_matches(&self, s: &FlowSlot, key: &FlowKey) -> bool {
        self.v6
            .get(s.v6_index())
            .is_some_and(|p| p.local == key.local && p.remote == key.remote)
    }

    /// The flow hash of the entry in `s` (its home slot), as [`Conntrack::hash`] of its key.
    fn slot_hash(&self, s: &FlowSlot) -> u32 {
        let (local, remote) = self.addresses(s);
        hash_fields(
            self.seed,
            s.tenant,
            s.kind,
            &local,
            &remote,
            s.local_port,
            s.remote_port,
            0,
        )
    }

    /// Give back what the pools hold for a slot that left the table.
    fn release_pooled(&mut self, s: &FlowSlot) {
        if s.tcp != 0 {
            self.tcp.release(s.tcp as usize - 1);
        }
        if s.is_v6() {
            self.v6.release(s.v6_index());
        }
    }

    /// Most entries the table holds.
    pub fn capacity(&self) -> usize {
        self.max
    }

    /// Number of slots (a sweep with this budget examines every one).
    pub fn slots_len(&self) -> usize {
        self.slots.len()
    }

    /// Occupied slots, expired entries not yet reclaimed included.
    pub fn used(&self) -> usize {
        self.used
    }

    pub fn is_full(&self) -> bool {
        self.used >= self.max
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() {
            0
        } else {
            i + 1
        }
    }

    #[inline]
    pub fn hash(&self, key: &FlowKey) -> u32 {
        key.hash(self.seed)
    }

    /// Start loading the home slot of `hash` into the cache. A packet loop that hashes a burst of
    /// frames first and looks them up second overlaps the memory latency of large tables.
    #[inline]
    pub fn prefetch(&self, hash: u32) {
        #[cfg(target_arch = "x86_64")]
        {
            let i = reduce(hash, self.slots.len());
            let p = self.slots[i..].as_ptr().cast::<i8>();
            // SAFETY: prefetch is a hint; it never faults, and `p` points into the table.
            unsafe {
                core::arch::x86_64::_mm_prefetch(p, core::arch::x86_64::_MM_HINT_T0);
                // A 32-byte slot spans two cache lines when the table is not 32-byte aligned.
                core::arch::x86_64::_mm_prefetch(
                    p.wrapping_add(core::mem::size_of::<FlowSlot>() - 1),
                    core::arch::x86_64::_MM_HINT_T0,
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = hash;
    }

    /// Find `key` (hash from [`Conntrack::hash`]).
    #[inline(always)]
    pub fn lookup(&self, key: &FlowKey, hash: u32, now_s: u32) -> Probe {
        let kind = key.kind();
        let packed = packed_addrs(key, kind);
        let mut i = reduce(hash, self.slots.len());
        let mut reuse = None;
        // The load limit guarantees an empty slot; the bound only makes termination obvious.
        for _ in 0..self.slots.len() {
            let s = &self.slots[i];
            if s.is_empty() {
                return Probe::Vacant(reuse.unwrap_or(i));
            }
            let live = s.is_live(now_s);
            if self.matches(s, key, kind, &packed) {
                // Keys are unique in the table, so an expired twin is the place to reopen.
                return if live {
                    Probe::Found(i)
                } else {
                    Probe::Vacant(i)
                };
            }
            if !live && reuse.is_none() {
                reuse = Some(i);
            }
            i = self.next(i);
        }
        Probe::Vacant(reuse.unwrap_or(i))
    }

    /// The entry at `i`.
    #[inline(always)]
    pub fn slot(&self, i: usize) -> Flow<'_> {
        self.view(&self.slots[i])
    }

    #[inline(always)]
    fn view<'t>(&'t self, slot: &'t FlowSlot) -> Flow<'t> {
        let (tcp, v6) = self.pooled(slot);
        Flow { slot, tcp, v6 }
    }

    /// Whether `insert` at a [`Probe::Vacant`] index needs a free slot (it does unless it
    /// overwrites an expired entry).
    pub fn needs_room(&self, i: usize) -> bool {
        self.slots[i].is_empty()
    }

    /// Write a new entry at a [`Probe::Vacant`] index. Returns the expired entry it overwrote, if
    /// any (the caller releases its verdict reference). The caller checks [`Conntrack::is_full`]
    /// first when [`Conntrack::needs_room`].
    pub fn insert(
        &mut self,
        i: usize,
        key: &FlowKey,
        origin: Direction,
        tcp: TcpState,
        verdict: VerdictRef,
        expires: u32,
    ) -> Option<FlowSlot> {
        let old = self.slots[i];
        let old = if old.is_empty() {
            self.used += 1;
            None
        } else {
            self.forget(&old);
            self.release_pooled(&old);
            Some(old)
        };
        let kind = key.kind();
        let state = origin_bit_of(origin) | tcp as u8;
        let ho = half_open(kind, state);
        self.tenants
            .add(key.tenant, ho, unreplied_inbound(kind, state));
        let stamp = if ho {
            self.count_half_open(key.tenant, &key.local, key.local_port, true);
            self.half_open_clock = self.half_open_clock.wrapping_add(1);
            self.half_open_clock
        } else {
            0
        };
        // The pools are as long as the table, so they cannot run dry (see `PARTS`); if they
        // did, the flow would keep no TCP state (no segment passes: fail closed) or an IPv6
        // address entry no key matches (the flow is never found and expires).
        let tcp = if key.protocol == vigil_wire::verdict::Protocol::Tcp {
            let ext = TcpExt {
                aux: u32::from(stamp),
                ..TcpExt::EMPTY
            };
            self.tcp.alloc(ext).map_or(0, |t| t + 1)
        } else {
            0
        };
        // An IPv4 key holds its addresses in the first 4 bytes, the rest zero (the verdict
        // encoding, as the parser builds it): the slot keeps those 4, and its hash is the key's.
        debug_assert!(
            kind & KIND_V6 != 0 || (key.local[4..] == [0; 12] && key.remote[4..] == [0; 12]),
            "an IPv4 flow key with address bytes past the fourth"
        );
        let mut addrs = packed_addrs(key, kind);
        if kind & KIND_V6 != 0 {
            let pair = V6Addrs {
                local: key.local,
                remote: key.remote,
            };
            let at = self.v6.alloc(pair).unwrap_or(u32::MAX);
            addrs[..4].copy_from_slice(&at.to_le_bytes());
        }
        self.slots[i] = FlowSlot {
            tenant: key.tenant,
            local_port: key.local_port,
            remote_port: key.remote_port,
            expires,
            verdict_slot: verdict.slot as u16,
            verdict_gen: verdict.gen,
            addrs,
            tcp,
            kind,
            state,
            _pad: [0; 2],
        };
        old
    }

    /// The counts of an entry that leaves the table (before its pooled state is given back).
    fn forget(&mut self, old: &FlowSlot) {
        let ho = old.is_half_open();
        self.tenants
            .remove(old.tenant, ho, unreplied_inbound(old.kind, old.state));
        if ho {
            let local = self.addresses(old).0;
            self.count_half_open(old.tenant, &local, old.local_port, false);
        }
    }

    /// Mark the (new) entry at `i` as completed by the SYN proxy; `cookie` is the ISN the opener
    /// was given: it stands as the responder's end until the responder's SYN-ACK (see
    /// `filter::synproxy`).
    pub fn set_proxied(&mut self, i: usize, cookie: u32) {
        self.slots[i].state |= F_PROXIED;
        if let Some(t) = self.tcp_mut(i) {
            t.win[1].end = cookie.wrapping_add(1);
            t.win[1].maxend = cookie.wrapping_add(1);
        }
    }

    /// A proxied entry's sequence offset, once its responder's SYN-ACK has passed.
    pub fn set_seq_offset(&mut self, i: usize, offset: u32) {
        if let Some(t) = self.tcp_mut(i) {
            t.aux = offset;
        }
    }

    /// Update a found entry's state byte and expiry.
    #[inline(always)]
    pub fn touch(&mut self, i: usize, state: u8, expires: u32) {
        let s = &mut self.slots[i];
        let was = s.state;
        s.state = state;
        s.expires = expires;
        if was != state {
            self.state_changed(i, was);
        }
    }

    /// Half-open accounting for a state change of the entry at `i` (from `was`).
    #[inline(never)]
    fn state_changed(&mut self, i: usize, was: u8) {
        let s = self.slots[i];
        let (before, now) = (half_open(s.kind, was), half_open(s.kind, s.state));
        if before != now {
            let local = self.addresses(&s).0;
            self.count_half_open(s.tenant, &local, s.local_port, now);
            self.tenants.set_half_open(s.tenant, now);
            if !now && s.state & F_PROXIED != 0 {
                // The stamp is no longer needed; the offset is written after the SYN-ACK.
                if let Some(t) = self.tcp_mut(i) {
                    t.aux = 0;
                }
            }
        }
    }

    /// The tenant answered the entry at `i`, opened toward it and not confirmed: it stays
    /// unreplied (evictable, on the tenant's inbound quota) with expiry `expires`, and the far
    /// side's next packet confirms it ([`Conntrack::mark_replied`]).
    #[inline]
    pub fn answered(&mut self, i: usize, expires: u32) {
        let s = &mut self.slots[i];
        s.state |= F_ANSWERED;
        s.expires = expires;
    }

    /// Set the replied flag and expiry of a found entry (from then on it is never evicted).
    #[inline]
    pub fn mark_replied(&mut self, i: usize, expires: u32) {
        let s = &mut self.slots[i];
        let first = s.state & F_REPLIED == 0;
        s.expires = expires;
        if first {
            self.first_reply(i);
        }
    }

    /// The inbound count of an entry's first reply (once per entry: off the fast path).
    #[inline(never)]
    fn first_reply(&mut self, i: usize) {
        let s = &mut self.slots[i];
        let inbound = unreplied_inbound(s.kind, s.state);
        s.state |= F_REPLIED;
        if inbound {
            let tenant = s.tenant;
            self.tenants.inbound_replied(tenant);
        }
    }

    /// Remove the entry at `i` (backward-shift deletion) and return its slot: its own fields
    /// (tenant, verdict, state) are as they were; what the pools held for it is given back.
    pub fn remove(&mut self, mut i: usize) -> FlowSlot {
        let removed = self.slots[i];
        if removed.is_empty() {
            return removed;
        }
        let n = self.slots.len();
        let mut j = i;
        for _ in 0..n {
            j = self.next(j);
            let e = self.slots[j];
            if e.is_empty() {
                break;
            }
            let home = reduce(self.slot_hash(&e), n);
            // Entry j stays unless moving it back to i keeps it on its probe path, i.e. unless its
            // home lies cyclically in (i, j].
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.slots[i] = e;
                i = j;
            }
        }
        self.slots[i] = FlowSlot::EMPTY;
        self.used -= 1;
        self.forget(&removed);
        self.release_pooled(&removed);
        removed
    }

    /// Examine up to `budget` slots from a rotating cursor. `judge` sees each occupied slot and
    /// whether it has expired, and returns whether to remove it (it releases what the entry holds).
    /// Returns the number removed.
    pub fn sweep(
        &mut self,
        now_s: u32,
        budget: usize,
        mut judge: impl FnMut(&FlowSlot, bool) -> bool,
    ) -> usize {
        let mut removed = 0;
        let mut examined = 0;
        let budget = budget.min(self.slots.len());
        // Each step either advances the cursor (at most `budget` times) or removes an entry (at
        // most `used` times), so the loop is bounded.
        while examined < budget {
            let i = self.sweep_cursor;
            let s = self.slots[i];
            if !s.is_empty() && judge(&s, !s.is_live(now_s)) {
                self.remove(i);
                removed += 1;
                // A later entry may have shifted into slot i: look at it again.
                continue;
            }
            self.sweep_cursor = self.next(i);
            examined += 1;
        }
        removed
    }

    /// Iterate over the entries (diagnostics, tests).
    pub fn iter(&self) -> impl Iterator<Item = Flow<'_>> {
        self.slots
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| self.view(s))
    }
}

#[cfg(test)]
mod tests;
