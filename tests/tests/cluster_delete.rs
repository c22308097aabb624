//! A delete the host refuses stays the agent's to finish (a real etcd, Debian's `etcd-server`;
//! the test skips, saying so, only where the binary is absent).
//!
//! `Host::delete` answers 409 while an API-started migration of the tenant runs. The agent took
//! any failed delete for done and dropped the tenant from its table: when the migration then
//! failed and the tenant resumed here, it ran on unreported (no status) and nothing deleted it.
//! Now the failure is reported (`failed`, action `delete`, the reason) and the delete retried.

use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use vigil_tests::etcd::Etcd;
use vigil_tests::hosts::in_process_host;
use vigil_tests::workload::{idle_policy, vm_spec};
use vigil_tests::{tenant_dir, TempDir};
use vmm_cluster::keys::TenantRecord;
use vmm_cluster::{AgentConfig, HostAgent};
use vmm_host::migration_link::MigrationKeys;
use vmm_host::MigrationOptions;

const WAIT: Duration = Duration::from_secs(120);
/// Well past the agent's retry interval (`DELETE_RETRY`, 1 s).
const RETRIED_WITHIN: Duration = Duration::from_secs(20);

#[test]
fn a_delete_refused_during_a_migration_is_reported_and_retried() {
    let Some(etcd) = Etcd::try_start("undeleted").unwrap_or_else(|e| panic!("{e}")) else {
        eprintln!("SKIPPED: no etcd binary on PATH (scripts/setup installs etcd-server)");
        return;
    };
    vmm_core::events::bus().set_quiet(true);
    let store = etcd.store();
    let dir = TempDir::new("vigil-cluster-undeleted");
    let host = in_process_host("ud-a", &dir, &MigrationKeys::default());
    let _agent = HostAgent::start(
        host.clone(),
        AgentConfig {
            endpoints: vec![etcd.endpoint().to_string()],
            name: "ud-a".into(),
            sender: 1,
            api_socket: None,
            tenant_ports: 2,
            lease_ttl_s: 5,
            migration_url: None,
        },
    )
    .unwrap_or_else(|e| panic!("the agent: {e}"));
    let mut spec: vmm_host::VmSpec = serde_json::from_value(vm_spec(
        &tenant_dir(),
        "held",
        "10.97.0.2",
        "52:54:00:97:00:02",
        &idle_policy(),
    ))
    .unwrap();
    spec.memory_mib = 128;
    let rev = store
        .put_tenant(&TenantRecord {
            host: "ud-a".into(),
            spec,
        })
        .unwrap();
    let status = store
        .wait_status("held", rev, WAIT)
        .unwrap()
        .expect("a report");
    assert_eq!(status.state, "running", "{status:?}");

    // An operator's API migration to a target that takes the connection and says nothing: the
    // tenant is migrating (delete answers 409) until the test closes it.
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp:{}", target.local_addr().unwrap());
    let sender = {
        let host = host.clone();
        std::thread::spawn(move || host.send_migration("held", &url, MigrationOptions::default()))
    };
    let (mut conn, _) = target.accept().unwrap();

    assert!(store.delete_tenant("held").unwrap());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        match store.status("held").unwrap() {
            Some(s) if s.action == "delete" => break s,
            _ => {
                assert!(Instant::now() < deadline, "no report of the refused delete");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert_eq!(status.state, "failed", "{status:?}");
    assert!(
        status.error.as_deref().unwrap_or("").contains("migrating"),
        "{status:?}"
    );
    assert!(host.info("held").is_ok(), "deleted during its migration");

    // The migration fails: the tenant resumes here, and the agent's retry deletes it.
    conn.shutdown(std::net::Shutdown::Both).ok();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    drop((conn, target));
    assert!(sender.join().unwrap().is_err(), "the migration failed");
    let deadline = Instant::now() + RETRIED_WITHIN;
    while host.info("held").is_ok() {
        assert!(
            Instant::now() < deadline,
            "the tenant runs on unreported: the refused delete was never retried"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
