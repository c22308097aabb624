//! A tenant moved in etcd with a new policy in the same write (a `vigil cluster put` naming its
//! new host and an edited policy, or a policy change while it migrates): it migrates live, and
//! then runs under the record's policy, not the one its source sent in the migration's header.
//! The new host took the migrated tenant as applied whatever its record said: the report named
//! the new revision while the tenant ran under the old policy (a revocation lost in a move).
//!
//! Two in-process hosts joined to a real etcd (Debian's `etcd-server`; skips, saying so, only
//! where the binary is absent); the tenant is Debian's kernel in early boot, as in
//! cluster_migrate.rs.

use std::sync::Arc;
use std::time::Duration;

use trap_handler::policy::PolicySpec;
use vigil_tests::etcd::Etcd;
use vigil_tests::hosts::in_process_host;
use vigil_tests::outside::free_tcp_port;
use vigil_tests::workload::{idle_policy, vm_spec};
use vigil_tests::{tenant_dir, TempDir};
use vmm_cluster::keys::TenantRecord;
use vmm_cluster::{AgentConfig, HostAgent};
use vmm_host::migration_link::MigrationKeys;
use vmm_host::{Host, VmSpec, VmState};

const ID: &str = "repol";
const WAIT: Duration = Duration::from_secs(120);

#[test]
fn a_tenant_moved_with_a_new_policy_runs_the_records_policy_after_its_migration() {
    let Some(etcd) = Etcd::try_start("cluster-move-policy").unwrap_or_else(|e| panic!("{e}"))
    else {
        eprintln!("SKIPPED: no etcd binary on PATH (scripts/setup installs etcd-server)");
        return;
    };
    vmm_core::events::bus().set_quiet(true);
    let store = etcd.store();
    let dir = TempDir::new("vigil-cluster-move-policy");
    let agent = |host: &Arc<Host>, name: &str, sender: u32| {
        HostAgent::start(
            host.clone(),
            AgentConfig {
                endpoints: vec![etcd.endpoint().to_string()],
                name: name.into(),
                sender,
                api_socket: None,
                tenant_ports: 2,
                lease_ttl_s: 5,
                migration_url: Some(format!("tcp:127.0.0.1:{}", free_tcp_port().unwrap())),
            },
        )
        .unwrap_or_else(|e| panic!("the agent of {name}: {e}"))
    };
    let keys = MigrationKeys::default();
    let a = in_process_host("rp-a", &dir, &keys);
    let b = in_process_host("rp-b", &dir, &keys);
    let _agent_a = agent(&a, "rp-a", 1);
    let _agent_b = agent(&b, "rp-b", 2);
    // Each host holds the other's migration key (from etcd) before the move.
    let deadline = std::time::Instant::now() + WAIT;
    while a.migration_keys().hosts().count() < 2 || b.migration_keys().hosts().count() < 2 {
        assert!(std::time::Instant::now() < deadline, "keys never installed");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut spec: VmSpec = serde_json::from_value(vm_spec(
        &tenant_dir(),
        ID,
        "10.95.0.2",
        "52:54:00:95:00:02",
        &idle_policy(),
    ))
    .unwrap();
    spec.memory_mib = 128;
    let rev = store
        .put_tenant(&TenantRecord {
            host: "rp-a".into(),
            spec: spec.clone(),
        })
        .unwrap();
    let status = store
        .wait_status(ID, rev, WAIT)
        .unwrap()
        .expect("A's report");
    assert_eq!(
        (status.host.as_str(), status.state.as_str()),
        ("rp-a", "running")
    );

    // One write: to host B, under a narrower policy.
    let narrower: PolicySpec = serde_json::from_value(serde_json::json!({"allow": [
        {"op": "connect", "exe": "/bin/busybox", "protocol": "tcp", "cidr": "10.95.0.1/32",
         "ports": "443"}]}))
    .unwrap();
    assert_ne!(narrower, spec.policy);
    let rev = store
        .update_tenant(ID, |r| {
            r.host = "rp-b".into();
            r.spec.policy = narrower.clone();
        })
        .unwrap();
    let status = store
        .wait_status(ID, rev, WAIT)
        .unwrap()
        .expect("B's report");
    assert_eq!(
        (status.host.as_str(), status.state.as_str()),
        ("rp-b", "running"),
        "{status:?}"
    );
    // It migrated (A holds nothing of it), and runs under the record's policy.
    assert_eq!(b.info(ID).unwrap().state, VmState::Running);
    assert!(a.list().is_empty(), "A still runs it");
    assert_eq!(
        b.policy(ID).unwrap(),
        narrower,
        "B runs the policy its source sent"
    );
}
