//! What a tenant in transition holds: a VM being built (create, restore, migration in) is not
//! in the tenant table until its slow build and the tiers' reconfiguration are done, and a VM
//! being deleted has left it before its stop and flush. Its id, tenant number and addresses
//! stay taken meanwhile, so a second create, restore or migration of the same id (or of another
//! id with its tenant number or address) is refused instead of running beside it: the later
//! insert replaced the first entry in the table, and a replaced VM that ran went on with no
//! entry (no `vm.delete` reached it, its port stayed held), under the same tenant number as the
//! new one.
//!
//! Owns: the list of claims and the guard that gives one back. Must not: touch the tenant table
//! or the tiers (`lifecycle` checks both under the table's lock, then claims).

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use vmm_core::introspect::tenant_id;
use vmm_core::net_config::parse_mac;

use crate::{HostError, VmSpec};

/// One tenant in transition.
#[derive(Clone, Debug)]
pub(crate) struct Claim {
    /// Which take made it (unique in the host): a guard gives back its own claim only, never
    /// another of the same id (a delete's, taken the moment the tenant entered the table).
    serial: u64,
    pub(crate) id: String,
    pub(crate) tenant: u32,
    pub(crate) ip: IpAddr,
    pub(crate) mac: Option<[u8; 6]>,
    mac_text: String,
}

impl Claim {
    pub(crate) fn of(spec: &VmSpec) -> Claim {
        Claim {
            serial: 0,
            id: spec.id.clone(),
            tenant: tenant_id(&spec.id),
            ip: spec.ip,
            mac: parse_mac(&spec.mac),
            mac_text: spec.mac.clone(),
        }
    }

    /// Why `spec` cannot be taken while `self` is (None: it can).
    pub(crate) fn conflict(&self, spec: &VmSpec) -> Option<HostError> {
        if self.id == spec.id {
            return Some(HostError::IdTaken {
                id: spec.id.clone(),
            });
        }
        if self.tenant == tenant_id(&spec.id) {
            return Some(HostError::TenantNumberTaken {
                other: self.id.clone(),
                tenant: self.tenant,
            });
        }
        let mac = parse_mac(&spec.mac);
        if self.ip == spec.ip || (mac.is_some() && self.mac == mac) {
            return Some(HostError::AddressTaken {
                other: self.id.clone(),
                ip: self.ip,
                mac: self.mac_text.clone(),
            });
        }
        None
    }
}

/// The claims of a host, and the serial of the next one taken.
#[derive(Default)]
pub(crate) struct Claims(Mutex<Vec<Claim>>, std::sync::atomic::AtomicU64);

impl Claims {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Vec<Claim>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `claim` (the caller checked it conflicts with nothing, under the tenant table's
    /// lock); given back when the guard drops.
    pub(crate) fn take(&self, claims: &mut Vec<Claim>, mut claim: Claim) -> ClaimGuard<'_> {
        let serial = self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        claim.serial = serial;
        claims.push(claim);
        ClaimGuard {
            claims: self,
            serial,
        }
    }
}

/// Holds one claim; gives it back on drop (after the tenant entered the table, or its build
/// failed, or its delete finished).
pub(crate) struct ClaimGuard<'a> {
    claims: &'a Claims,
    serial: u64,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        let mut claims = self.claims.lock();
        if let Some(at) = claims.iter().position(|c| c.serial == self.serial) {
            claims.swap_remove(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, ip: &str, mac: &str) -> VmSpec {
        serde_json::from_value(serde_json::json!({"id": id, "kernel": "/k", "mac": mac,
            "ip": ip, "policy": {"allow": []}}))
        .unwrap()
    }

    #[test]
    fn a_claim_keeps_its_id_number_and_addresses_until_given_back() {
        let claims = Claims::default();
        let a = spec("a", "10.0.0.2", "52:54:00:00:00:02");
        let guard = {
            let mut list = claims.lock();
            claims.take(&mut list, Claim::of(&a))
        };
        let conflict = |s: &VmSpec| claims.lock().iter().find_map(|c| c.conflict(s));
        assert!(matches!(
            conflict(&spec("a", "10.0.0.9", "52:54:00:00:00:09")),
            Some(HostError::IdTaken { .. })
        ));
        // FNV-1a 32 of these two ids is the same number.
        let mut list = claims.lock();
        let _b = claims.take(
            &mut list,
            Claim::of(&spec("t439599", "10.0.0.3", "52:54:00:00:00:03")),
        );
        drop(list);
        assert!(matches!(
            conflict(&spec("t622382", "10.0.0.4", "52:54:00:00:00:04")),
            Some(HostError::TenantNumberTaken { .. })
        ));
        assert!(matches!(
            conflict(&spec("c", "10.0.0.2", "52:54:00:00:00:05")),
            Some(HostError::AddressTaken { .. })
        ));
        assert!(matches!(
            conflict(&spec("c", "10.0.0.5", "52:54:00:00:00:02")),
            Some(HostError::AddressTaken { .. })
        ));
        assert!(conflict(&spec("c", "10.0.0.5", "52:54:00:00:00:05")).is_none());
        drop(guard);
        assert!(conflict(&spec("a", "10.0.0.9", "52:54:00:00:00:09")).is_none());
    }

    #[test]
    fn a_guard_gives_back_its_own_claim_not_another_of_the_same_id() {
        // Two claims of one id (a delete's, and a build's of the same id under other
        // addresses): each guard gives back its own, whatever their order in the list.
        let claims = Claims::default();
        let take = |s: &VmSpec| {
            let mut list = claims.lock();
            claims.take(&mut list, Claim::of(s))
        };
        let deleting = take(&spec("a", "10.0.0.3", "52:54:00:00:00:03"));
        let building = take(&spec("a", "10.0.0.2", "52:54:00:00:00:02"));
        drop(building);
        let conflict = |s: &VmSpec| claims.lock().iter().find_map(|c| c.conflict(s));
        assert!(conflict(&spec("b", "10.0.0.2", "52:54:00:00:00:04")).is_none());
        assert!(matches!(
            conflict(&spec("b", "10.0.0.3", "52:54:00:00:00:04")),
            Some(HostError::AddressTaken { .. })
        ));
        drop(deleting);
        assert!(conflict(&spec("a", "10.0.0.3", "52:54:00:00:00:03")).is_none());
    }
}
