//! The connection-tracking table: open addressing with linear probing over a caller-supplied slice
//! of 80-byte slots; no heap, no pointers, no per-entry overhead beyond the slot itself.
//!
//! - Lookups cost O(1) expected probes, independent of the table size: the table never fills past
//!   its load limit ([`MAX_LOAD_NUM`]/[`MAX_LOAD_DEN`] of the slots), and a seeded hash spreads
//!   attacker-chosen keys.
//! - Deletion is backward-shift (no tombstones), so probe lengths do not degrade with churn.
//! - Time is supplied by the caller (whole seconds of a monotonic clock): expired entries are
//!   reused in place when a probe meets them, reclaimed by an incremental [`Conntrack::sweep`], and
//!   never count as live. An established entry is never evicted to make room: a full table
//!   refuses new flows instead.
//! - TCP is tracked by sequence numbers (see [`FlowSlot::track`]): per direction the highest
//!   sequence number sent, the highest edge the peer's window allows, and the largest window, in
//!   the manner of Linux's `tcp_in_window` (after G. van Rooij, "Real stateful TCP packet
//!   filtering in IP Filter", 2001).
//! - Half-open TCP entries (SYN seen, handshake not complete) are counted, globally and per tenant
//!   and per destination bucket, so a SYN flood can be bounded (see [`Conntrack::half_open_full`]
//!   and [`Conntrack::evict_half_open`]) and the edge's SYN proxy can tell when to answer SYNs
//!   itself ([`Conntrack::half_open_of`], [`Conntrack::half_open_at`]).
//! - Every tenant's entries are counted exactly ([`tenants`]): a tenant at its flow quota
//!   ([`Conntrack::at_quota`]) opens nothing more, whatever room the table has for others.

use vigil_wire::verdict::Direction;

use super::flow::{hash_fields, kind_parts, reduce, FlowKey};
use super::parse::{TcpFlags, TcpSeg, MAX_WSCALE, NO_WSCALE};
use super::verdicts::VerdictRef;

mod tcp;
pub mod tenants;
pub use tcp::{tcp_step, TcpStep, TcpWindow, Track};
use tenants::TenantCounts;

/// Load limit: at most 7/8 of the slots hold entries (linear probing stays at a few probes per
/// hit; misses, which only new flows pay, average ~32).
pub const MAX_LOAD_NUM: usize = 7;
pub const MAX_LOAD_DEN: usize = 8;

/// Slots needed to hold `flows` entries under the load limit.
pub const fn slots_for(flows: usize) -> usize {
    (flows * MAX_LOAD_DEN).div_ceil(MAX_LOAD_NUM)
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

/// One conntrack slot. `kind == 0` marks an empty slot.
///
/// 80 bytes: the two IPv6-capable addresses are 32 of them, the TCP windows 24; 64k flows at the
/// 7/8 load limit take 74 899 slots × 80 B = 5.71 MiB. The verdict slot index is 16 bits (a
/// verdict table has at most 65 535 slots, [`MAX_VERDICT_SLOTS`]), which leaves room for the SYN
/// proxy's sequence offset in [`FlowSlot::aux`] without growing the slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSlot {
    local: [u8; 16],
    remote: [u8; 16],
    tenant: u32,
    local_port: u16,
    remote_port: u16,
    /// Whole seconds of the caller's clock; the entry is live while `now < expires`.
    expires: u32,
    verdict_slot: u16,
    verdict_gen: u16,
    /// IP version and protocol (see `flow::kind_byte`); 0 = empty slot.
    kind: u8,
    /// TCP state in the low 3 bits, [`F_PROXIED`], direction and FIN flags in the high nibble.
    state: u8,
    /// Window scale shifts: opener's in the low nibble, responder's in the high one;
    /// [`SCALE_NONE`] until the handshake shows both sides sent the option.
    wscale: u8,
    _pad: u8,
    /// TCP windows: `[opener's side, responder's side]`.
    win: [TcpWindow; 2],
    /// While half-open: the age stamp (low 16 bits of the table's half-open insertion counter;
    /// the oldest half-open entry is the one evicted first). Once a proxied flow is established:
    /// the responder's sequence offset (its ISN minus the cookie the opener was given).
    aux: u32,
}

/// Most verdict slots a flow can point at (the slot index is 16 bits in a [`FlowSlot`]).
pub const MAX_VERDICT_SLOTS: usize = u16::MAX as usize;

/// A side's scale nibble before the SYN-ACK settles it (the side sent no option, or not yet).
const SCALE_NONE: u8 = 0xf;

const _: () = assert!(core::mem::size_of::<FlowSlot>() == 80);

impl FlowSlot {
    pub const EMPTY: FlowSlot = FlowSlot {
        local: [0; 16],
        remote: [0; 16],
        tenant: 0,
        local_port: 0,
        remote_port: 0,
        expires: 0,
        verdict_slot: 0,
        verdict_gen: 0,
        kind: 0,
        state: 0,
        win: [TcpWindow {
            end: 0,
            maxend: 0,
            maxwin: 0,
        }; 2],
        wscale: 0,
        _pad: 0,
        aux: 0,
    };

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.kind == 0
    }

    #[inline]
    fn is_live(&self, now_s: u32) -> bool {
        now_s < self.expires
    }

    #[inline]
    fn matches(&self, key: &FlowKey, kind: u8) -> bool {
        self.tenant == key.tenant
            && self.local_port == key.local_port
            && self.remote_port == key.remote_port
            && self.kind == kind
            && self.remote == key.remote
            && self.local == key.local
    }

    /// The key this slot holds (`None` for an empty slot).
    pub fn key(&self) -> Option<FlowKey> {
        let (ip_version, protocol) = kind_parts(self.kind)?;
        Some(FlowKey {
            tenant: self.tenant,
            ip_version,
            protocol,
            local: self.local,
            remote: self.remote,
            local_port: self.local_port,
            remote_port: self.remote_port,
        })
    }

    fn hash(&self, seed: u64) -> u32 {
        hash_fields(
            seed,
            self.tenant,
            self.kind,
            &self.local,
            &self.remote,
            self.local_port,
            self.remote_port,
            0,
        )
    }

    pub fn origin(&self) -> Direction {
        if self.state & F_ORIGIN_INGRESS != 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        }
    }

    pub fn tcp_state(&self) -> TcpState {
        TcpState::from_bits(self.state)
    }

    /// The raw state byte (TCP state and direction/FIN flags) for [`tcp_step`].
    #[inline]
    pub fn state_byte(&self) -> u8 {
        self.state
    }

    pub fn replied(&self) -> bool {
        self.state & F_REPLIED != 0
    }

    pub fn expires(&self) -> u32 {
        self.expires
    }

    pub fn tenant(&self) -> u32 {
        self.tenant
    }

    pub fn verdict(&self) -> VerdictRef {
        VerdictRef {
            slot: u32::from(self.verdict_slot),
            gen: self.verdict_gen,
        }
    }

    /// Whether the edge's SYN proxy completed this flow's handshake (its responder's sequence
    /// numbers are translated).
    #[inline]
    pub fn is_proxied(&self) -> bool {
        self.state & F_PROXIED != 0
    }

    /// The proxied flow's sequence offset: the responder's ISN minus the cookie ISN the opener
    /// saw (0 until the responder's SYN-ACK, and for flows that are not proxied).
    #[inline]
    /// The window-scale nibbles (the opener's in the low one; 0xf: not offered).
    pub fn wscale_nibbles(&self) -> u8 {
        self.wscale
    }

    pub fn seq_offset(&self) -> u32 {
        if self.is_proxied() && !self.is_half_open() {
            self.aux
        } else {
            0
        }
    }

    /// The tenant-side address and port (the destination of a proxied SYN).
    pub fn local(&self) -> (&[u8; 16], u16) {
        (&self.local, self.local_port)
    }

    /// Whether this is a half-open TCP entry (SYN seen, handshake not complete).
    #[inline]
    pub fn is_half_open(&self) -> bool {
        half_open(self.kind, self.state)
    }
}

fn origin_bit_of(origin: Direction) -> u8 {
    match origin {
        Direction::Egress => 0,
        Direction::Ingress => F_ORIGIN_INGRESS,
    }
}

#[inline]
fn half_open(kind: u8, state: u8) -> bool {
    kind != 0
        && matches!(
            TcpState::from_bits(state),
            TcpState::SynSent | TcpState::SynAckSeen
        )
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

/// Per-protocol idle timeouts, whole seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Half-open: SYN passed, no SYN-ACK yet (short: SYN floods must not pin the table).
    pub tcp_syn_sent: u32,
    pub tcp_syn_ack: u32,
    pub tcp_established: u32,
    pub tcp_fin_wait: u32,
    pub tcp_closing: u32,
    pub tcp_closed: u32,
    /// UDP flow that has seen no reply.
    pub udp_unreplied: u32,
    pub udp_replied: u32,
    pub icmp: u32,
}

impl Default for Timeouts {
    /// Close to Linux nf_conntrack's defaults, with much shorter half-open states (5 s: a client's
    /// SYN retransmissions, 1 s then 3 s apart, refresh the entry; a flood's entries are gone in
    /// seconds) and a shorter closed state.
    fn default() -> Self {
        Timeouts {
            tcp_syn_sent: 5,
            tcp_syn_ack: 5,
            tcp_established: 5 * 24 * 3600,
            tcp_fin_wait: 120,
            tcp_closing: 60,
            tcp_closed: 10,
            udp_unreplied: 30,
            udp_replied: 120,
            icmp: 30,
        }
    }
}

impl Timeouts {
    pub fn tcp(&self, s: TcpState) -> u32 {
        match s {
            TcpState::None | TcpState::Closed => self.tcp_closed,
            TcpState::SynSent => self.tcp_syn_sent,
            TcpState::SynAckSeen => self.tcp_syn_ack,
            TcpState::Established => self.tcp_established,
            TcpState::FinWait => self.tcp_fin_wait,
            TcpState::Closing => self.tcp_closing,
        }
    }
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

/// How many half-open entries the table holds before new SYNs must make room (see
/// [`Conntrack::half_open_full`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HalfOpenLimits {
    /// All tenants together.
    pub global: usize,
    /// One tenant.
    pub per_tenant: usize,
}

/// The most entries one tenant may hold: half the table by default
/// ([`Conntrack::set_flow_quota`]), so one tenant filling its share leaves the other half to the
/// rest (issue #12). At least 16.
pub fn default_flow_quota(capacity: usize) -> usize {
    (capacity / 2).max(16)
}

impl HalfOpenLimits {
    /// Half the table for all half-open entries, an eighth for one tenant (at least 16 each): a
    /// flood at one tenant leaves 7/8 of the table to everyone else, and floods at every tenant
    /// together leave half of it to established flows.
    pub fn for_capacity(capacity: usize) -> HalfOpenLimits {
        HalfOpenLimits {
            global: (capacity / 2).max(16),
            per_tenant: (capacity / 8).max(16),
        }
    }
}

/// Candidates a half-open eviction compares (sampled LRU: the oldest of the first few found).
const EVICT_SAMPLE: usize = 8;

/// The table over caller-supplied slots.
pub struct Conntrack<'a> {
    slots: &'a mut [FlowSlot],
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
    /// Half-open insertions so far (its low 16 bits stamp each half-open entry's age).
    half_open_clock: u16,
    evict_cursor: usize,
}

impl<'a> Conntrack<'a> {
    /// Wrap (and clear) `slots`. Holds up to 7/8 of `slots.len()` flows; `None` if there are fewer
    /// than 2 slots.
    pub fn new(slots: &'a mut [FlowSlot], seed: u64) -> Option<Conntrack<'a>> {
        slots.fill(FlowSlot::EMPTY);
        Conntrack::new_empty(slots, seed)
    }

    /// [`new`](Self::new) over slots the caller vouches are all [`FlowSlot::EMPTY`] already
    /// (zeroed memory): nothing is written, so no page of the table is touched until flows
    /// arrive. Slots that are not empty would read as entries (wrong answers, never unsafety:
    /// a slot is plain integers), so only a zeroing VMM's word is taken for it.
    pub fn new_empty(slots: &'a mut [FlowSlot], seed: u64) -> Option<Conntrack<'a>> {
        if slots.len() < 2 || slots.len() > u32::MAX as usize {
            return None;
        }
        let max = (slots.len() * MAX_LOAD_NUM / MAX_LOAD_DEN).clamp(1, slots.len() - 1);
        Some(Conntrack {
            slots,
            used: 0,
            max,
            seed,
            sweep_cursor: 0,
            half_open: 0,
            half_open_dst: [0; DST_BUCKETS],
            tenants: TenantCounts::new(),
            limits: HalfOpenLimits::for_capacity(max),
            quota: default_flow_quota(max),
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

    /// Feed a TCP segment to the entry at `i` (see [`FlowSlot::track`]).
    #[inline(always)]
    pub fn track(&mut self, i: usize, orig: bool, f: TcpFlags, seg: &TcpSeg) -> Track {
        self.slots[i].track(orig, f, seg)
    }

    /// Forget the windows of the entry at `i` (see [`FlowSlot::adopt_windows`]).
    pub fn adopt_windows(&mut self, i: usize) {
        self.slots[i].adopt_windows();
    }

    /// Make room for one half-open entry of `tenant` by removing one entry, examining at most
    /// `budget` slots from a rotating cursor: the first expired entry met, else the oldest of the
    /// first few live half-open entries of `tenant`, or (when the global limit or the table is
    /// what is full) of a tenant with more half-open entries than `tenant`. Established
    /// entries are never candidates. `release` sees the removed entry and whether it had expired.
    /// Returns whether an entry was removed (indices from earlier probes are then stale).
    pub fn evict_half_open(
        &mut self,
        tenant: u32,
        now_s: u32,
        budget: usize,
        mut release: impl FnMut(&FlowSlot, bool),
    ) -> bool {
        let own_count = self.tenants.half_open(tenant);
        let own_full = own_count >= self.limits.per_tenant;
        let n = self.slots.len();
        let mut best: Option<(usize, u16)> = None;
        let mut found = 0;
        let mut i = self.evict_cursor % n;
        for _ in 0..budget.min(n) {
            let s = &self.slots[i];
            if !s.is_empty() {
                if !s.is_live(now_s) {
                    self.evict_cursor = self.next(i);
                    let s = self.remove(i);
                    release(&s, true);
                    return true;
                }
                if s.is_half_open() {
                    let eligible = s.tenant == tenant
                        || (!own_full && self.tenants.half_open(s.tenant) > own_count);
                    if eligible {
                        let age = self.half_open_clock.wrapping_sub(s.aux as u16);
                        if best.is_none_or(|(_, a)| age > a) {
                            best = Some((i, age));
                        }
                        found += 1;
                        if found == EVICT_SAMPLE {
                            i = self.next(i);
                            break;
                        }
                    }
                }
            }
            i = self.next(i);
        }
        self.evict_cursor = i;
        let Some((victim, _)) = best else {
            return false;
        };
        let s = self.remove(victim);
        release(&s, false);
        true
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
                // An 80-byte slot spans two cache lines.
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
    #[inline]
    pub fn lookup(&self, key: &FlowKey, hash: u32, now_s: u32) -> Probe {
        let kind = key.kind();
        let mut i = reduce(hash, self.slots.len());
        let mut reuse = None;
        // The load limit guarantees an empty slot; the bound only makes termination obvious.
        for _ in 0..self.slots.len() {
            let s = &self.slots[i];
            if s.is_empty() {
                return Probe::Vacant(reuse.unwrap_or(i));
            }
            let live = s.is_live(now_s);
            if s.matches(key, kind) {
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

    pub fn slot(&self, i: usize) -> &FlowSlot {
        &self.slots[i]
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
            Some(old)
        };
        let kind = key.kind();
        let state = origin_bit_of(origin) | tcp as u8;
        let ho = half_open(kind, state);
        self.tenants.add(key.tenant, ho);
        let stamp = if ho {
            self.count_half_open(key.tenant, &key.local, key.local_port, true);
            self.half_open_clock = self.half_open_clock.wrapping_add(1);
            self.half_open_clock
        } else {
            0
        };
        self.slots[i] = FlowSlot {
            local: key.local,
            remote: key.remote,
            tenant: key.tenant,
            local_port: key.local_port,
            remote_port: key.remote_port,
            expires,
            verdict_slot: verdict.slot as u16,
            verdict_gen: verdict.gen,
            kind,
            state,
            aux: u32::from(stamp),
            ..FlowSlot::EMPTY
        };
        old
    }

    /// The counts of an entry that leaves the table.
    fn forget(&mut self, old: &FlowSlot) {
        let ho = old.is_half_open();
        self.tenants.remove(old.tenant, ho);
        if ho {
            self.count_half_open(old.tenant, &old.local, old.local_port, false);
        }
    }

    /// Mark the (new) entry at `i` as completed by the SYN proxy; `cookie` is the ISN the opener
    /// was given: it stands as the responder's end until the responder's SYN-ACK (see
    /// `filter::synproxy`).
    pub fn set_proxied(&mut self, i: usize, cookie: u32) {
        let s = &mut self.slots[i];
        s.state |= F_PROXIED;
        s.win[1].end = cookie.wrapping_add(1);
        s.win[1].maxend = cookie.wrapping_add(1);
    }

    /// A proxied entry's sequence offset, once its responder's SYN-ACK has passed.
    pub fn set_seq_offset(&mut self, i: usize, offset: u32) {
        self.slots[i].aux = offset;
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
            self.count_half_open(s.tenant, &s.local, s.local_port, now);
            self.tenants.set_half_open(s.tenant, now);
            if !now && s.state & F_PROXIED != 0 {
                // The stamp is no longer needed; the offset is written after the SYN-ACK.
                self.slots[i].aux = 0;
            }
        }
    }

    /// Set the replied flag and expiry of a found entry.
    #[inline]
    pub fn mark_replied(&mut self, i: usize, expires: u32) {
        let s = &mut self.slots[i];
        s.state |= F_REPLIED;
        s.expires = expires;
    }

    /// Remove the entry at `i` (backward-shift deletion) and return it.
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
            let home = reduce(e.hash(self.seed), n);
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

    /// Iterate over occupied slots (diagnostics, tests).
    pub fn iter(&self) -> impl Iterator<Item = &FlowSlot> {
        self.slots.iter().filter(|s| !s.is_empty())
    }
}

#[cfg(test)]
mod tests;
