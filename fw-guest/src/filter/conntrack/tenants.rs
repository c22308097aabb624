//! Per-tenant entry counts of the conntrack table: live-or-expired entries, half-open TCP entries
//! and unreplied entries opened from the tenant's far side (UDP, ICMP echo) of each tenant,
//! exactly (no shared hash buckets), for the flow quota (issue #12), the half-open limits (issue
//! #13) and the inbound quota.
//!
//! Owns: a small open-addressing map tenant → counts, inside the [`super::Conntrack`] struct (no
//! caller storage: at most [`TENANT_SLOTS`] tenants hold entries at once; the edge attaches at most
//! [`crate::filter::MAX_ADDRS`] addresses, the switch has at most `MAX_PORTS` tenant ports).
//! Must not: allocate, or be consulted on the established-flow fast path (only when an entry is
//! created, removed, changes between half-open and not, or sees its first reply).

/// Tenants that may hold conntrack entries at once (twice the edge's address table: the map stays
/// at most half full when every attached address is a different tenant).
pub const TENANT_SLOTS: usize = 512;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Count {
    tenant: u32,
    /// Entries of the tenant in the table (live or expired-not-yet-reclaimed); 0: a free slot.
    flows: u32,
    /// Of which half-open TCP entries.
    half_open: u32,
    /// Of which unreplied entries opened by a packet travelling toward the tenant.
    inbound: u32,
}

/// Tenant → (entries, half-open entries).
pub struct TenantCounts {
    slots: [Count; TENANT_SLOTS],
    used: usize,
}

#[inline]
fn home(tenant: u32) -> usize {
    // Fibonacci hashing onto the power-of-two table.
    (tenant.wrapping_mul(0x9e37_79b9) >> (32 - TENANT_SLOTS.trailing_zeros())) as usize
}

#[inline]
fn next(i: usize) -> usize {
    (i + 1) % TENANT_SLOTS
}

impl TenantCounts {
    pub const fn new() -> TenantCounts {
        TenantCounts {
            slots: [Count {
                tenant: 0,
                flows: 0,
                half_open: 0,
                inbound: 0,
            }; TENANT_SLOTS],
            used: 0,
        }
    }

    fn find(&self, tenant: u32) -> Result<usize, Option<usize>> {
        let mut i = home(tenant);
        for _ in 0..TENANT_SLOTS {
            let c = &self.slots[i];
            if c.flows == 0 {
                return Err(Some(i));
            }
            if c.tenant == tenant {
                return Ok(i);
            }
            i = next(i);
        }
        Err(None)
    }

    /// Entries `tenant` holds.
    #[inline]
    pub fn flows(&self, tenant: u32) -> usize {
        self.find(tenant)
            .map_or(0, |i| self.slots[i].flows as usize)
    }

    /// Half-open entries `tenant` holds.
    #[inline]
    pub fn half_open(&self, tenant: u32) -> usize {
        self.find(tenant)
            .map_or(0, |i| self.slots[i].half_open as usize)
    }

    /// Unreplied entries opened toward `tenant` that it holds.
    #[inline]
    pub fn inbound(&self, tenant: u32) -> usize {
        self.find(tenant)
            .map_or(0, |i| self.slots[i].inbound as usize)
    }

    /// Whether a new entry of `tenant` has a place to be counted (the map has room for a tenant
    /// that holds none yet; it always does while fewer than [`TENANT_SLOTS`] tenants hold entries).
    pub fn can_count(&self, tenant: u32) -> bool {
        self.find(tenant).is_ok() || self.used < TENANT_SLOTS - 1
    }

    /// A new entry of `tenant` (half-open or not, unreplied inbound or not). The caller checked
    /// [`TenantCounts::can_count`].
    pub fn add(&mut self, tenant: u32, half_open: bool, inbound: bool) {
        let i = match self.find(tenant) {
            Ok(i) => i,
            Err(Some(i)) => {
                self.used += 1;
                self.slots[i] = Count {
                    tenant,
                    flows: 0,
                    half_open: 0,
                    inbound: 0,
                };
                i
            }
            // Unreachable after `can_count`; counting nothing keeps the table consistent.
            Err(None) => return,
        };
        let c = &mut self.slots[i];
        c.flows += 1;
        c.half_open += u32::from(half_open);
        c.inbound += u32::from(inbound);
    }

    /// An entry of `tenant` went (it was half-open or not, unreplied inbound or not).
    pub fn remove(&mut self, tenant: u32, half_open: bool, inbound: bool) {
        let Ok(i) = self.find(tenant) else { return };
        let c = &mut self.slots[i];
        c.flows = c.flows.saturating_sub(1);
        if half_open {
            c.half_open = c.half_open.saturating_sub(1);
        }
        if inbound {
            c.inbound = c.inbound.saturating_sub(1);
        }
        if c.flows == 0 {
            self.delete(i);
        }
    }

    /// An entry of `tenant` became half-open (`true`) or stopped being so.
    pub fn set_half_open(&mut self, tenant: u32, half_open: bool) {
        if let Ok(i) = self.find(tenant) {
            let c = &mut self.slots[i];
            c.half_open = if half_open {
                c.half_open + 1
            } else {
                c.half_open.saturating_sub(1)
            };
        }
    }

    /// An unreplied inbound entry of `tenant` saw its first reply.
    pub fn inbound_replied(&mut self, tenant: u32) {
        if let Ok(i) = self.find(tenant) {
            let c = &mut self.slots[i];
            c.inbound = c.inbound.saturating_sub(1);
        }
    }

    /// Backward-shift deletion (as the flow table's).
    fn delete(&mut self, mut i: usize) {
        self.used -= 1;
        let mut j = i;
        loop {
            j = next(j);
            let e = self.slots[j];
            if e.flows == 0 {
                break;
            }
            let h = home(e.tenant);
            let stays = if i <= j {
                i < h && h <= j
            } else {
                i < h || h <= j
            };
            if !stays {
                self.slots[i] = e;
                i = j;
            }
        }
        self.slots[i] = Count::default();
    }

    /// Forget everything (the table was cleared).
    pub fn clear(&mut self) {
        *self = TenantCounts::new();
    }
}

impl Default for TenantCounts {
    fn default() -> Self {
        TenantCounts::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_adds_and_removes_with_collisions() {
        let mut t = TenantCounts::new();
        // Tenants that share a home slot and wrap around the end.
        let tenants: [u32; 6] = [1, 2, 3, 1 + (1 << 23), 7, 9];
        for (n, &tenant) in tenants.iter().enumerate() {
            for k in 0..=n {
                t.add(tenant, k % 2 == 0, k % 3 == 0);
            }
        }
        for (n, &tenant) in tenants.iter().enumerate() {
            assert_eq!(t.flows(tenant), n + 1);
            assert_eq!(t.half_open(tenant), n / 2 + 1);
            assert_eq!(t.inbound(tenant), n / 3 + 1);
        }
        for &tenant in &tenants[..3] {
            while t.flows(tenant) > 0 {
                t.remove(tenant, t.half_open(tenant) > 0, t.inbound(tenant) > 0);
            }
        }
        for (n, &tenant) in tenants.iter().enumerate().skip(3) {
            assert_eq!(t.flows(tenant), n + 1, "tenant {tenant} lost by a deletion");
        }
        assert_eq!(t.used, 3);
    }
}
