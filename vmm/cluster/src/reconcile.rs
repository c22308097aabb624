//! What a host does about one tenant: the difference between the desired record in etcd and
//! what the host agent applied, as one action.
//!
//! Owns: [`plan`]. Must not: act (the agent does, through `vmm_host::Host`).

use trap_handler::policy::PolicySpec;
use vmm_host::VmSpec;

use crate::keys::TenantRecord;

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create and boot it here.
    Create(VmSpec),
    /// Only the policy changed: re-apply it on both tiers (`Host::replace_policy`).
    Policy(PolicySpec),
    /// Something else in the spec changed: delete it here and create it anew.
    Recreate(VmSpec),
    /// It is gone, or assigned to another host: delete it here (flushed from both tiers).
    Delete,
    /// It migrated in from the host that ran it and runs here now: take it as applied (never
    /// planned: the agent's migration steps decide it).
    Adopt(VmSpec),
    /// It runs here exactly as desired, under a newer revision of its record (the same record
    /// put again): nothing to change, but the status must name the new revision, or whoever
    /// waits for it would wait for ever.
    Confirm,
    Nothing,
}

/// The action that takes host `me` from `applied` (the spec it runs, if any) to `desired` (the
/// tenant's record, if it exists).
pub fn plan(me: &str, applied: Option<&VmSpec>, desired: Option<&TenantRecord>) -> Action {
    let desired = desired.filter(|d| d.host == me);
    match (applied, desired) {
        (None, None) => Action::Nothing,
        (Some(_), None) => Action::Delete,
        (None, Some(d)) => Action::Create(d.spec.clone()),
        (Some(a), Some(d)) if *a == d.spec => Action::Confirm,
        (Some(a), Some(d)) => {
            let mut same_but_policy = a.clone();
            same_but_policy.policy = d.spec.policy.clone();
            if same_but_policy == d.spec {
                Action::Policy(d.spec.policy.clone())
            } else {
                Action::Recreate(d.spec.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(policy: &str, memory: u64) -> VmSpec {
        serde_json::from_value(serde_json::json!({"id": "web", "kernel": "/k",
            "mac": "52:54:00:00:00:02", "ip": "10.0.0.2", "memory_mib": memory,
            "policy": {"allow": [{"op": "connect", "comm": policy}]}}))
        .unwrap()
    }

    fn record(host: &str, spec: VmSpec) -> TenantRecord {
        TenantRecord {
            host: host.into(),
            spec,
        }
    }

    #[test]
    fn each_difference_has_its_action() {
        let a = spec("curl", 256);
        assert_eq!(plan("a", None, None), Action::Nothing);
        assert_eq!(
            plan("a", None, Some(&record("a", a.clone()))),
            Action::Create(a.clone())
        );
        assert_eq!(
            plan("a", None, Some(&record("b", a.clone()))),
            Action::Nothing
        );
        assert_eq!(
            plan("a", Some(&a), Some(&record("a", a.clone()))),
            Action::Confirm
        );
        let b = spec("wget", 256);
        assert_eq!(
            plan("a", Some(&a), Some(&record("a", b.clone()))),
            Action::Policy(b.policy.clone())
        );
        let c = spec("wget", 512);
        assert_eq!(
            plan("a", Some(&a), Some(&record("a", c.clone()))),
            Action::Recreate(c)
        );
        assert_eq!(plan("a", Some(&a), None), Action::Delete);
        assert_eq!(
            plan("a", Some(&a), Some(&record("b", a.clone()))),
            Action::Delete
        );
    }
}
