//! Tenant records in etcd that cannot stand together, refused when written (a real etcd,
//! Debian's `etcd-server`; the test skips, saying so, only where the binary is absent).
//!
//! Tenants on different hosts meet at the edge, which holds their addresses and verdicts by
//! tenant number (a 32-bit hash of the id): two ids with one number, or two tenants with one IP
//! or MAC, on two hosts were only found out there (a collision, or, once the first was released
//! for a migration, the second taking over its addresses). `vigil cluster put` refuses them.

use serde_json::json;
use vigil_tests::etcd::Etcd;
use vmm_cluster::keys::TenantRecord;
use vmm_cluster::ClusterError;

fn record(id: &str, host: &str, ip: &str, mac: &str) -> TenantRecord {
    TenantRecord {
        host: host.into(),
        spec: serde_json::from_value(json!({"id": id, "kernel": "/k", "mac": mac, "ip": ip,
            "policy": {"allow": []}}))
        .unwrap(),
    }
}

#[test]
fn records_that_collide_across_hosts_are_refused_when_written() {
    let Some(etcd) = Etcd::try_start("records").unwrap_or_else(|e| panic!("{e}")) else {
        eprintln!("SKIPPED: no etcd binary on PATH (scripts/setup installs etcd-server)");
        return;
    };
    let store = etcd.store();
    // FNV-1a 32 of t439599 and t622382 is one number.
    store
        .put_tenant(&record("t439599", "a", "10.0.0.2", "52:54:00:00:00:02"))
        .unwrap();
    for (bad, what) in [
        (
            record("t622382", "b", "10.0.0.3", "52:54:00:00:00:03"),
            "same tenant number",
        ),
        (
            record("web", "b", "10.0.0.2", "52:54:00:00:00:04"),
            "ip 10.0.0.2",
        ),
        (
            record("web", "b", "10.0.0.4", "52:54:00:00:00:02"),
            "mac 52:54:00:00:00:02",
        ),
    ] {
        match store.put_tenant(&bad) {
            Err(ClusterError::Conflict { reason, .. }) => {
                assert!(reason.contains(what), "{reason}")
            }
            other => panic!("{} written beside t439599: {other:?}", bad.spec.id),
        }
        assert!(store.tenant(&bad.spec.id).unwrap().is_none());
    }
    // The tenant itself may be written again (moved, its policy changed), and others beside it.
    store
        .put_tenant(&record("t439599", "b", "10.0.0.2", "52:54:00:00:00:02"))
        .unwrap();
    store
        .put_tenant(&record("web", "b", "10.0.0.4", "52:54:00:00:00:04"))
        .unwrap();
    assert_eq!(store.tenants().unwrap().len(), 2);
}
