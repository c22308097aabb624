//! Tenant records in etcd that cannot stand together, refused when written (a real etcd,
//! Debian's `etcd-server`; the test skips, saying so, only where the binary is absent).
//!
//! Tenants on different hosts meet at the edge, which holds their addresses and verdicts by
//! tenant number (a 32-bit hash of the id): two ids with one number, or two tenants with one IP
//! or MAC, on two hosts were only found out there (a collision, or, once the first was released
//! for a migration, the second taking over its addresses). `vigil cluster put` refuses them.
//!
//! A record that cannot be read (written by hand with a mistake, or with a field an older agent
//! does not know) leaves the tenant its host runs as it is: the agent took it for deleted and
//! deleted the running tenant.

use std::time::Duration;

use serde_json::json;
use vigil_tests::etcd::Etcd;
use vigil_tests::hosts::in_process_host;
use vigil_tests::workload::{idle_policy, vm_spec};
use vigil_tests::{tenant_dir, TempDir};
use vmm_cluster::keys::TenantRecord;
use vmm_cluster::{AgentConfig, ClusterError, HostAgent};
use vmm_host::migration_link::MigrationKeys;
use vmm_host::VmState;

const WAIT: Duration = Duration::from_secs(120);

/// Writes `value` at `key` as an operator's etcdctl would, past every check of `vigil cluster`
/// (etcd's JSON gateway: key and value in base64); the write's revision.
fn put_raw(etcd: &Etcd, key: &str, value: &str) -> i64 {
    let body = json!({"key": base64_lite(key.as_bytes()), "value": base64_lite(value.as_bytes())})
        .to_string();
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-X",
            "POST",
            "--data-binary",
            &body,
        ])
        .arg(format!("{}/v3/kv/put", etcd.endpoint()))
        .output()
        .expect("run curl");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    reply["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {reply}"))
}

/// Standard base64 with padding (RFC 4648 §4), for the gateway's JSON.
fn base64_lite(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

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

#[test]
fn a_record_that_cannot_be_read_leaves_the_running_tenant_alone() {
    let Some(etcd) = Etcd::try_start("unreadable").unwrap_or_else(|e| panic!("{e}")) else {
        eprintln!("SKIPPED: no etcd binary on PATH (scripts/setup installs etcd-server)");
        return;
    };
    vmm_core::events::bus().set_quiet(true);
    let store = etcd.store();
    let dir = TempDir::new("vigil-cluster-unreadable");
    let host = in_process_host("ur-a", &dir, &MigrationKeys::default());
    let _agent = HostAgent::start(
        host.clone(),
        AgentConfig {
            endpoints: vec![etcd.endpoint().to_string()],
            name: "ur-a".into(),
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
        "kept",
        "10.96.0.2",
        "52:54:00:96:00:02",
        &idle_policy(),
    ))
    .unwrap();
    spec.memory_mib = 128;
    let record = TenantRecord {
        host: "ur-a".into(),
        spec,
    };
    let rev = store.put_tenant(&record).unwrap();
    let status = store
        .wait_status("kept", rev, WAIT)
        .unwrap()
        .expect("a report");
    assert_eq!(status.state, "running", "{status:?}");

    // A field this agent does not know, then a value that is not JSON at all.
    let mut unknown = serde_json::to_value(&record).unwrap();
    unknown["spec"]["gpu"] = json!(true);
    for value in [
        unknown.to_string(),
        "{\"host\": \"ur-a\", \"spec\": ".to_string(),
    ] {
        let rev = put_raw(&etcd, "/vigil/tenants/kept", &value);
        let status = store
            .wait_status("kept", rev, WAIT)
            .unwrap()
            .expect("a report of the unreadable revision");
        assert_eq!(
            (status.state.as_str(), status.action.as_str()),
            ("failed", "keep"),
            "{status:?}"
        );
        let info = host
            .info("kept")
            .unwrap_or_else(|e| panic!("the tenant is gone: {e}"));
        assert_eq!(info.state, VmState::Running);
    }
    // Readable again: it runs as it was, nothing recreated.
    let rev = store.put_tenant(&record).unwrap();
    let status = store
        .wait_status("kept", rev, WAIT)
        .unwrap()
        .expect("a report");
    assert_eq!(
        (status.state.as_str(), status.action.as_str()),
        ("running", "confirm"),
        "{status:?}"
    );
    // Deleted: deleted.
    assert!(store.delete_tenant("kept").unwrap());
    let deadline = std::time::Instant::now() + WAIT;
    while host.info("kept").is_ok() {
        assert!(std::time::Instant::now() < deadline, "never deleted");
        std::thread::sleep(Duration::from_millis(20));
    }
}
