//! The verdict table: which new flows a tenant may open.
//!
//! Verdicts live in a slab of caller-supplied slots (stable indices, so conntrack entries can
//! point at the verdict that opened them) and are found through an open-addressing index of
//! `(hash, slot)` pairs. A slab slot is first written when a verdict first needs it, and an empty
//! index entry is all zero bytes, so over zeroed memory the table's pages are touched as verdicts
//! arrive, not at boot (4,096 slots and their index are 384 KiB).
//!
//! Every verdict is indexed under exactly one key:
//! - an *exact* verdict (remote address fully specified, one remote port; what a `connect` or a
//!   `sendmsg` produces) under `(tenant, direction, version, protocol, remote address, remote port,
//!   local port)`: one flow, both ports (an explicit any-local-port wildcard under local port 0);
//! - any other verdict (a `bind`/`listen` open to a remote prefix or to anyone) under
//!   `(tenant, direction, version, protocol, local port)`, the wildcard under local port 0.
//!
//! Local port 0 opens nothing by itself: only a rule flagged `any_local_port` (an explicit
//! wildcard) opens every local port ([`Rule::local_port_matches`]).
//!
//! A new flow costs at most four index probes (exact, exact any-local-port, its local port, any
//! local port), each O(1) expected, independent of the number of verdicts.
//!
//! Each tenant holds at most its quota of verdict slots (a quarter of the table, all of one up to 16 slots, unless
//! [`VerdictTable::set_tenant_quota`] says otherwise), so one tenant filling its share leaves the
//! others room.
//!
//! Removing a verdict bumps its slot's generation: flows it opened are closed the next time they
//! are seen (or swept), without scanning the conntrack table. A verdict that merely *expires*
//! stops opening new flows but keeps the flows it already opened; its slot is reclaimed once none
//! remain.

use core::marker::PhantomData;
use core::mem::MaybeUninit;

use heapless::FnvIndexMap;
use vigil_wire::verdict::{Direction, IpVersion, Protocol, Rule};

use super::flow::{hash_fields, kind_byte, reduce, FlowKey};

/// Marks an empty index slot / the end of the free list.
const NONE: u32 = u32::MAX;
/// Distinguishes the verdict index's hash from the conntrack hash with the same seed.
const INDEX_SALT: u64 = 0x5645_5244_4943_5453;
const TAG_EXACT: u8 = 1;
const TAG_LOCAL_PORT: u8 = 2;

/// Storage for one verdict (caller-allocated; see [`VerdictSlot::EMPTY`]): any bytes, zero
/// included, since the table writes a slot before it first reads it.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct VerdictSlot(MaybeUninit<Verdict>);

impl VerdictSlot {
    /// Storage for one slot (all zero bytes, as zeroed memory is).
    pub const EMPTY: VerdictSlot = VerdictSlot(MaybeUninit::zeroed());
}

/// One verdict slot of the slab.
#[derive(Clone, Copy, Debug)]
struct Verdict {
    rule: Rule,
    tenant: u32,
    /// Caller clock, ns; 0 = never.
    expires_ns: u64,
    seq: u64,
    /// Live conntrack entries opened by this verdict (while `gen` is unchanged).
    flows: u32,
    gen: u16,
    live: bool,
    /// Added by `Op::Adopt`: may take over flows established elsewhere.
    adopt: bool,
    next_free: u32,
}

impl Verdict {
    const EMPTY: Verdict = Verdict {
        rule: Rule::any(
            Direction::Egress,
            vigil_wire::verdict::IpVersion::V4,
            Protocol::Tcp,
        ),
        tenant: 0,
        expires_ns: 0,
        seq: 0,
        flows: 0,
        gen: 0,
        live: false,
        adopt: false,
        next_free: NONE,
    };
}

/// One index slot (caller-allocated storage; see [`IndexSlot::EMPTY`]).
#[derive(Clone, Copy, Debug)]
pub struct IndexSlot {
    hash: u32,
    /// The slab slot, complemented: all zero bytes are an empty entry ([`NONE`]).
    not_slot: u32,
}

impl IndexSlot {
    /// An empty entry: all zero bytes, so zeroed memory is an empty index.
    pub const EMPTY: IndexSlot = IndexSlot {
        hash: 0,
        not_slot: 0,
    };

    fn new(hash: u32, slot: u32) -> IndexSlot {
        IndexSlot {
            hash,
            not_slot: !slot,
        }
    }

    /// The slab slot ([`NONE`] for an empty entry).
    #[inline(always)]
    fn slot(&self) -> u32 {
        !self.not_slot
    }
}

/// What `add` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddOutcome {
    Added(u32),
    /// An identical verdict existed; its lifetime and sequence number were renewed.
    Refreshed(u32),
}

/// Most tenants holding verdicts at once (a power of two, as `heapless::FnvIndexMap` requires;
/// as many as the tenancy's address table).
pub const MAX_TENANTS: usize = 256;

/// Why a verdict was not added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddError {
    /// The table has no free slot (after reclaiming expired verdicts without flows).
    TableFull,
    /// The tenant holds its quota of verdicts already (after reclaiming its expired ones), or
    /// [`MAX_TENANTS`] other tenants hold verdicts.
    OverQuota,
}

/// Reference from a conntrack entry to the verdict that opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictRef {
    pub slot: u32,
    pub gen: u16,
}

pub struct VerdictTable<'a> {
    /// The slots written so far (free or live): a prefix of the caller's storage, grown by one
    /// when no written slot is free ([`VerdictTable::grow`]).
    slots: &'a mut [Verdict],
    /// The caller's storage, `capacity` slots from here (borrowed for `'a`).
    storage: *mut Verdict,
    capacity: usize,
    _storage: PhantomData<&'a mut [VerdictSlot]>,
    index: &'a mut [IndexSlot],
    free_head: u32,
    live: usize,
    /// Live verdicts with `adopt` set: while 0, no packet pays for an adoption lookup.
    adopting: usize,
    seed: u64,
    sweep_cursor: usize,
    /// Most verdicts one tenant may hold.
    quota: u32,
    /// Verdicts each tenant holds (tenants with none are absent).
    held: FnvIndexMap<u32, u32, MAX_TENANTS>,
}

/// Index key of a rule (or of the packet side it is matched against).
struct IndexKey {
    tag: u8,
    addr: [u8; 16],
    port: u16,
    /// Exact keys: the local port (0: the any-local-port wildcard).
    local_port: u16,
}

fn is_exact(rule: &Rule) -> bool {
    rule.remote_prefix == rule.ip_version.addr_bits()
        && (rule.protocol.is_icmp() || rule.remote_port_min == rule.remote_port_max)
}

fn index_key(rule: &Rule) -> IndexKey {
    if is_exact(rule) {
        IndexKey {
            tag: TAG_EXACT,
            addr: rule.remote_addr,
            // ICMP has no remote port; its verdicts ignore the range.
            port: if rule.protocol.is_icmp() {
                0
            } else {
                rule.remote_port_min
            },
            local_port: rule.local_port,
        }
    } else {
        IndexKey {
            tag: TAG_LOCAL_PORT,
            addr: [0; 16],
            port: rule.local_port,
            local_port: 0,
        }
    }
}

impl<'a> VerdictTable<'a> {
    /// `index` should have at least twice as many entries as `slots` (load ≤ 1/2 keeps probes
    /// short); it must have more, so probing always ends at an empty index slot. Neither is
    /// read as it is: `index` is cleared unless `index_zeroed` (the caller vouches it is all
    /// zero bytes, which is an empty index, and then no page of it is written here), and a slot
    /// is written before it is first read.
    pub fn new(
        slots: &'a mut [VerdictSlot],
        index: &'a mut [IndexSlot],
        index_zeroed: bool,
        seed: u64,
    ) -> Option<VerdictTable<'a>> {
        if slots.is_empty() || index.len() <= slots.len() || index.len() >= NONE as usize {
            return None;
        }
        let n = slots.len();
        if !index_zeroed {
            index.fill(IndexSlot::EMPTY);
        }
        // VerdictSlot is a transparent MaybeUninit<Verdict>: the same layout as a Verdict.
        let storage = slots.as_mut_ptr().cast::<Verdict>();
        Some(VerdictTable {
            // SAFETY: an empty slice at the start of the storage, which is borrowed for 'a.
            slots: unsafe { core::slice::from_raw_parts_mut(storage, 0) },
            storage,
            capacity: n,
            _storage: PhantomData,
            index,
            free_head: NONE,
            live: 0,
            adopting: 0,
            seed: seed ^ INDEX_SALT,
            sweep_cursor: 0,
            // A quarter of the table, and all of a small one (tests, tiny tiers).
            quota: (n / 4).max(n.min(16)) as u32,
            held: FnvIndexMap::new(),
        })
    }

    /// Sets the most verdicts one tenant may hold (at least 1); verdicts held already stay.
    pub fn set_tenant_quota(&mut self, quota: usize) {
        self.quota = quota.clamp(1, u32::MAX as usize) as u32;
    }

    /// The most verdicts one tenant may hold.
    pub fn tenant_quota(&self) -> usize {
        self.quota as usize
    }

    /// How many new verdicts any tenant could add now for certain: free slots, the quota left
    /// to the tenant that holds most, and tenants that may still start holding verdicts, the
    /// least of the three (each new verdict takes at most one of each). The outcome log
    /// publishes it so the VMM need not wait for records that cannot be refused.
    pub fn room(&self) -> usize {
        let most = self.held.values().copied().max().unwrap_or(0) as usize;
        (self.capacity - self.live)
            .min((self.quota as usize).saturating_sub(most))
            .min(MAX_TENANTS - self.held.len())
    }

    /// Verdicts `tenant` holds now.
    pub fn held_by(&self, tenant: u32) -> usize {
        self.held.get(&tenant).copied().unwrap_or(0) as usize
    }

    /// Whether `tenant` may take one more slot: under its quota, and counted (a tenant not yet
    /// holding any needs room in the per-tenant counts).
    fn has_room(&self, tenant: u32) -> bool {
        match self.held.get(&tenant) {
            Some(&n) => n < self.quota,
            None => self.held.len() < MAX_TENANTS,
        }
    }

    /// Free `tenant`'s expired verdicts that hold no flows (control path: O(capacity)).
    fn reclaim_tenant(&mut self, tenant: u32, now_ns: u64) -> usize {
        let mut n = 0;
        for slot in 0..self.slots.len() {
            let s = &self.slots[slot];
            if s.tenant == tenant && Self::reclaimable(s, now_ns) {
                self.reclaim_slot(slot);
                n += 1;
            }
        }
        n
    }

    /// Number of verdicts present (including expired ones still holding flows).
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Number of verdicts that adopt flows (`Op::Adopt`).
    pub fn adopting(&self) -> usize {
        self.adopting
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes the next slot of the storage never used yet, and makes it the free list's head.
    /// `false` when every slot has been written once (the free list alone then has room).
    fn grow(&mut self) -> bool {
        let written = self.slots.len();
        if written == self.capacity {
            return false;
        }
        self.slots = &mut [];
        // SAFETY: `storage` is the caller's `capacity` slots, borrowed for 'a and reached only
        // through this table; the old prefix slice is gone (taken above), and the new one covers
        // it and the slot after it, which is written before the slice is made, so every slot it
        // covers holds a Verdict.
        self.slots = unsafe {
            self.storage.add(written).write(Verdict {
                next_free: self.free_head,
                ..Verdict::EMPTY
            });
            core::slice::from_raw_parts_mut(self.storage, written + 1)
        };
        self.free_head = written as u32;
        true
    }

    fn hash(&self, tenant: u32, dir: Direction, rule_kind: u8, k: &IndexKey) -> u32 {
        let mut local = [0u8; 16];
        local[..2].copy_from_slice(&k.local_port.to_le_bytes());
        hash_fields(
            self.seed, tenant, rule_kind, &k.addr, &local, k.port, dir as u16, k.tag,
        )
    }

    fn rule_hash(&self, tenant: u32, rule: &Rule) -> u32 {
        self.hash(
            tenant,
            rule.direction,
            kind_byte(rule.ip_version, rule.protocol),
            &index_key(rule),
        )
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.index.len() {
            0
        } else {
            i + 1
        }
    }

    /// Slot of the verdict identical to `(tenant, rule)`, if present.
    /// Whether `tenant` holds a verdict identical to `rule` (an `Add` of it would refresh it).
    pub fn holds(&self, tenant: u32, rule: &Rule) -> bool {
        self.find_identical(tenant, rule).is_some()
    }

    fn find_identical(&self, tenant: u32, rule: &Rule) -> Option<(usize, u32)> {
        let h = self.rule_hash(tenant, rule);
        let mut i = reduce(h, self.index.len());
        for _ in 0..self.index.len() {
            let e = self.index[i];
            if e.slot() == NONE {
                return None;
            }
            if e.hash == h {
                let s = &self.slots[e.slot() as usize];
                if s.live && s.tenant == tenant && s.rule == *rule {
                    return Some((i, e.slot()));
                }
            }
            i = self.next(i);
        }
        None
    }

    /// Add (or refresh) a verdict (`Op::Add`).
    pub fn add(
        &mut self,
        tenant: u32,
        rule: &Rule,
        seq: u64,
        lifetime_ms: u64,
        now_ns: u64,
    ) -> Result<AddOutcome, AddError> {
        self.insert(tenant, rule, seq, lifetime_ms, now_ns, false)
    }

    /// Add (or refresh) a verdict; `adopt`: it may take over flows established elsewhere
    /// (`Op::Adopt`). A refresh takes the new record's `adopt`: the latest record wins.
    pub fn insert(
        &mut self,
        tenant: u32,
        rule: &Rule,
        seq: u64,
        lifetime_ms: u64,
        now_ns: u64,
        adopt: bool,
    ) -> Result<AddOutcome, AddError> {
        let expires_ns = if lifetime_ms == 0 {
            0
        } else {
            // Saturate far out rather than wrap to "never" or into the past.
            now_ns
                .saturating_add(lifetime_ms.saturating_mul(1_000_000))
                .max(1)
        };
        if let Some((_, slot)) = self.find_identical(tenant, rule) {
            let s = &mut self.slots[slot as usize];
            s.expires_ns = expires_ns;
            s.seq = seq;
            if s.adopt != adopt {
                s.adopt = adopt;
                if adopt {
                    self.adopting += 1;
                } else {
                    self.adopting -= 1;
                }
            }
            return Ok(AddOutcome::Refreshed(slot));
        }
        if !self.has_room(tenant) {
            self.reclaim_tenant(tenant, now_ns);
            if !self.has_room(tenant) {
                return Err(AddError::OverQuota);
            }
        }
        if self.free_head == NONE && !self.grow() {
            self.reclaim_all(now_ns);
            if self.free_head == NONE {
                return Err(AddError::TableFull);
            }
        }
        let slot = self.free_head;
        let h = self.rule_hash(tenant, rule);
        {
            let s = &mut self.slots[slot as usize];
            self.free_head = s.next_free;
            s.rule = *rule;
            s.tenant = tenant;
            s.expires_ns = expires_ns;
            s.seq = seq;
            s.flows = 0;
            s.live = true;
            s.adopt = adopt;
            s.next_free = NONE;
        }
        // The index has more entries than the slab, so an empty one exists.
        let mut i = reduce(h, self.index.len());
        while self.index[i].slot() != NONE {
            i = self.next(i);
        }
        self.index[i] = IndexSlot::new(h, slot);
        self.live += 1;
        match self.held.get_mut(&tenant) {
            Some(n) => *n += 1,
            // `has_room` made sure there is room for a new tenant.
            None => {
                let _ = self.held.insert(tenant, 1);
            }
        }
        self.adopting += usize::from(adopt);
        Ok(AddOutcome::Added(slot))
    }

    /// Remove the verdict identical to `(tenant, rule)`; flows it opened are revoked.
    pub fn remove(&mut self, tenant: u32, rule: &Rule) -> bool {
        match self.find_identical(tenant, rule) {
            Some((pos, slot)) => {
                self.unlink(pos, slot);
                true
            }
            None => false,
        }
    }

    /// Remove every verdict of `tenant`; returns how many.
    pub fn flush_tenant(&mut self, tenant: u32) -> usize {
        let mut removed = 0;
        for slot in 0..self.slots.len() {
            let s = self.slots[slot];
            if s.live && s.tenant == tenant {
                if let Some((pos, _)) = self.find_identical(tenant, &s.rule) {
                    self.unlink(pos, slot as u32);
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Drop index entry `pos` (backward-shift deletion: no tombstones, probes stay short) and free
    /// `slot`, bumping its generation.
    fn unlink(&mut self, mut pos: usize, slot: u32) {
        let n = self.index.len();
        let mut j = pos;
        loop {
            j = self.next(j);
            let e = self.index[j];
            if e.slot() == NONE {
                break;
            }
            let home = reduce(e.hash, n);
            // Entry j may move back to `pos` unless its home lies cyclically in (pos, j].
            let stays = if pos <= j {
                pos < home && home <= j
            } else {
                pos < home || home <= j
            };
            if !stays {
                self.index[pos] = e;
                pos = j;
            }
        }
        self.index[pos] = IndexSlot::EMPTY;
        let s = &mut self.slots[slot as usize];
        if let Some(n) = self.held.get_mut(&s.tenant) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&s.tenant);
            }
        }
        self.adopting -= usize::from(s.adopt);
        s.adopt = false;
        s.live = false;
        s.flows = 0;
        s.gen = s.gen.wrapping_add(1);
        s.next_free = self.free_head;
        self.free_head = slot;
        self.live -= 1;
    }

    fn matches(s: &Verdict, key: &FlowKey, dir: Direction, now_ns: u64) -> bool {
        let r = &s.rule;
        s.live
            && s.tenant == key.tenant
            && r.direction == dir
            && r.ip_version == key.ip_version
            && r.protocol == key.protocol
            && (s.expires_ns == 0 || now_ns < s.expires_ns)
            && r.local_port_matches(key.local_port)
            && (r.local_addr == [0; 16] || r.local_addr == key.local)
            && r.remote_addr_matches(&key.remote)
            && (r.protocol.is_icmp() || r.remote_port_matches(key.remote_port))
    }

    fn probe(&self, h: u32, key: &FlowKey, dir: Direction, now_ns: u64) -> Option<u32> {
        let mut i = reduce(h, self.index.len());
        for _ in 0..self.index.len() {
            let e = self.index[i];
            if e.slot() == NONE {
                return None;
            }
            if e.hash == h && Self::matches(&self.slots[e.slot() as usize], key, dir, now_ns) {
                return Some(e.slot());
            }
            i = self.next(i);
        }
        None
    }

    /// A verdict that opens `key` when its first packet travels in `dir`.
    pub fn find(&self, key: &FlowKey, dir: Direction, now_ns: u64) -> Option<VerdictRef> {
        if self.live == 0 {
            return None;
        }
        let kind = key.kind();
        let remote_port = if key.protocol.is_icmp() {
            0
        } else {
            key.remote_port
        };
        let exact = IndexKey {
            tag: TAG_EXACT,
            addr: key.remote,
            port: remote_port,
            local_port: key.local_port,
        };
        let exact_any_port = IndexKey {
            local_port: 0,
            ..exact
        };
        let by_port = IndexKey {
            tag: TAG_LOCAL_PORT,
            addr: [0; 16],
            port: key.local_port,
            local_port: 0,
        };
        let any_port = IndexKey { port: 0, ..by_port };
        let distinct = key.local_port != 0;
        let candidates: [Option<&IndexKey>; 4] = [
            Some(&exact),
            distinct.then_some(&exact_any_port),
            Some(&by_port),
            distinct.then_some(&any_port),
        ];
        for k in candidates.into_iter().flatten() {
            let h = self.hash(key.tenant, dir, kind, k);
            if let Some(slot) = self.probe(h, key, dir, now_ns) {
                return Some(VerdictRef {
                    slot,
                    gen: self.slots[slot as usize].gen,
                });
            }
        }
        None
    }

    /// Whether a live egress verdict of `tenant` lets it open a flow to `remote` (any protocol or
    /// port). A walk of the slab (neighbour resolution's slow path, not per packet).
    pub fn opens_egress_to(
        &self,
        tenant: u32,
        version: IpVersion,
        remote: &[u8; 16],
        now_ns: u64,
    ) -> bool {
        self.held_by(tenant) != 0
            && self.slots.iter().any(|s| {
                s.live
                    && s.tenant == tenant
                    && s.rule.direction == Direction::Egress
                    && s.rule.ip_version == version
                    && (s.expires_ns == 0 || now_ns < s.expires_ns)
                    && s.rule.remote_addr_matches(remote)
            })
    }

    /// Whether the verdict a flow points at is still the one that opened it.
    #[inline]
    pub fn is_current(&self, r: VerdictRef) -> bool {
        match self.slots.get(r.slot as usize) {
            Some(s) => s.live && s.gen == r.gen,
            None => false,
        }
    }

    /// Whether the verdict `r` names is current and came from `Op::Adopt`.
    #[inline]
    pub fn is_adoptable(&self, r: VerdictRef) -> bool {
        self.is_current(r) && self.slots[r.slot as usize].adopt
    }

    /// A flow was opened by `r`.
    pub fn acquire(&mut self, r: VerdictRef) {
        if self.is_current(r) {
            let s = &mut self.slots[r.slot as usize];
            s.flows = s.flows.saturating_add(1);
        }
    }

    /// A flow opened by `r` is gone.
    pub fn release(&mut self, r: VerdictRef) {
        if self.is_current(r) {
            let s = &mut self.slots[r.slot as usize];
            s.flows = s.flows.saturating_sub(1);
        }
    }

    fn reclaimable(s: &Verdict, now_ns: u64) -> bool {
        s.live && s.expires_ns != 0 && now_ns >= s.expires_ns && s.flows == 0
    }

    fn reclaim_slot(&mut self, slot: usize) {
        let s = self.slots[slot];
        if let Some((pos, _)) = self.find_identical(s.tenant, &s.rule) {
            self.unlink(pos, slot as u32);
        }
    }

    /// Free every expired verdict that holds no flows (control path: O(capacity)).
    pub fn reclaim_all(&mut self, now_ns: u64) -> usize {
        let mut n = 0;
        for slot in 0..self.slots.len() {
            if Self::reclaimable(&self.slots[slot], now_ns) {
                self.reclaim_slot(slot);
                n += 1;
            }
        }
        n
    }

    /// Examine up to `budget` slots from a rotating cursor, freeing reclaimable ones.
    pub fn sweep(&mut self, now_ns: u64, budget: usize) -> usize {
        let mut n = 0;
        for _ in 0..budget.min(self.slots.len()) {
            let slot = self.sweep_cursor;
            self.sweep_cursor = if slot + 1 == self.slots.len() {
                0
            } else {
                slot + 1
            };
            if Self::reclaimable(&self.slots[slot], now_ns) {
                self.reclaim_slot(slot);
                n += 1;
            }
        }
        n
    }

    /// Number of flows a verdict currently holds (tests, diagnostics).
    pub fn flows_of(&self, r: VerdictRef) -> Option<u32> {
        self.is_current(r)
            .then(|| self.slots[r.slot as usize].flows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(port: u16) -> Rule {
        Rule {
            local_port: port,
            any_local_port: false,
            ..Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Tcp)
        }
    }

    /// Slots are written one at a time as verdicts need them, freed ones first: the pages of a
    /// zeroed table are touched as verdicts arrive, and the storage's own bytes (here not zero,
    /// as any bytes may be) are never read.
    #[test]
    fn slots_are_written_as_verdicts_need_them() {
        let mut storage = [VerdictSlot::EMPTY; 8];
        // SAFETY: any bytes are a VerdictSlot (a MaybeUninit).
        unsafe { core::ptr::write_bytes(storage.as_mut_ptr(), 0xa5, storage.len()) };
        let mut index = [IndexSlot::EMPTY; 16];
        let mut t = VerdictTable::new(&mut storage, &mut index, true, 7).unwrap();
        assert_eq!((t.capacity(), t.slots.len()), (8, 0));
        for port in 1..=3 {
            assert!(t.add(1, &rule(port), u64::from(port), 0, 0).is_ok());
        }
        assert_eq!(t.slots.len(), 3);
        assert!(t.remove(1, &rule(2)));
        assert!(t.add(1, &rule(4), 4, 0, 0).is_ok());
        assert_eq!(
            t.slots.len(),
            3,
            "a freed slot is reused before a new one is written"
        );
        for port in 5..=9 {
            assert!(t.add(1, &rule(port), u64::from(port), 0, 0).is_ok());
        }
        assert_eq!((t.slots.len(), t.room()), (8, 0));
        assert_eq!(
            t.add(2, &rule(10), 10, 0, 0),
            Err(AddError::TableFull),
            "the ninth verdict of an 8-slot table"
        );
        for port in [1, 3, 4, 5, 6, 7, 8, 9] {
            assert!(t.holds(1, &rule(port)), "verdict for port {port}");
        }
        assert!(!t.holds(1, &rule(2)));
    }
}
