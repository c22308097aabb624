//! Making room in a full table, or for a tenant at one of its limits: a bounded scan from a
//! rotating cursor that takes the first expired entry it meets, else the oldest of a few
//! candidates. Only provisional entries are ever candidates (half-open TCP, unreplied UDP and
//! ICMP echo): an established or replied flow is never evicted.
//!
//! Owns: [`Conntrack::evict_half_open`], [`Conntrack::evict_unreplied`] and their shared scan.
//! Must not: scan more than its budget per call, or remove an entry some other way than
//! [`Conntrack::remove`] (which keeps the counts and pools right).

use super::{unreplied, unreplied_inbound, Conntrack, FlowSlot, Unreplied};

/// Candidates a half-open eviction compares (sampled LRU: the oldest of the first few found).
const EVICT_SAMPLE: usize = 8;

impl Conntrack<'_> {
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
        release: impl FnMut(&FlowSlot, bool),
    ) -> bool {
        let own_count = self.tenants.half_open(tenant);
        let own_full = own_count >= self.limits.per_tenant;
        self.evict(
            now_s,
            budget,
            |ct, s| {
                let eligible = s.is_half_open()
                    && (s.tenant == tenant
                        || (!own_full && ct.tenants.half_open(s.tenant) > own_count));
                eligible.then(|| {
                    let stamp = ct.pooled(s).0.aux as u16;
                    u32::from(ct.half_open_clock.wrapping_sub(stamp))
                })
            },
            release,
        )
    }

    /// Make room for one entry of `tenant` by removing an unreplied UDP or ICMP echo entry
    /// (`scope` says whose), examining at most `budget` slots from the same rotating cursor as
    /// [`Conntrack::evict_half_open`]: the first expired entry met, else, of the first few
    /// candidates, the one that expires soonest (the least recently refreshed). A replied entry
    /// is never a candidate, nor TCP. `release` and the result as for `evict_half_open`.
    pub fn evict_unreplied(
        &mut self,
        tenant: u32,
        scope: Unreplied,
        now_s: u32,
        budget: usize,
        release: impl FnMut(&FlowSlot, bool),
    ) -> bool {
        let own_count = self.tenants.inbound(tenant);
        self.evict(
            now_s,
            budget,
            |ct, s| {
                let eligible = match scope {
                    Unreplied::Inbound => s.tenant == tenant && unreplied_inbound(s.kind, s.state),
                    Unreplied::Own => s.tenant == tenant && unreplied(s.kind, s.state),
                    Unreplied::Table => {
                        (s.tenant == tenant && unreplied(s.kind, s.state))
                            || (unreplied_inbound(s.kind, s.state)
                                && ct.tenants.inbound(s.tenant) > own_count)
                    }
                };
                // Sooner to expire is older.
                eligible.then_some(u32::MAX - s.expires)
            },
            release,
        )
    }

    /// The scan of the evictions: from the rotating cursor, at most `budget` slots; the first
    /// expired entry met goes, else the oldest (`age` largest) of the first [`EVICT_SAMPLE`]
    /// live entries `age` names (`None`: not a candidate).
    fn evict(
        &mut self,
        now_s: u32,
        budget: usize,
        age: impl Fn(&Self, &FlowSlot) -> Option<u32>,
        mut release: impl FnMut(&FlowSlot, bool),
    ) -> bool {
        let n = self.slots.len();
        let mut best: Option<(usize, u32)> = None;
        let mut found = 0;
        let mut i = self.evict_cursor % n;
        for _ in 0..budget.min(n) {
            let s = self.slots[i];
            if !s.is_empty() {
                if !s.is_live(now_s) {
                    self.evict_cursor = self.next(i);
                    let s = self.remove(i);
                    release(&s, true);
                    return true;
                }
                if let Some(a) = age(self, &s) {
                    if best.is_none_or(|(_, b)| a > b) {
                        best = Some((i, a));
                    }
                    found += 1;
                    if found == EVICT_SAMPLE {
                        i = self.next(i);
                        break;
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
}
