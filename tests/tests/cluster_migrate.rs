//! Migration orchestrated through etcd (issue #16): a real etcd (Debian's `etcd-server`), three
//! in-process hosts, each with its host agent joined to etcd, and the tenant record's desired host
//! changed with a compare-and-swap, as `vigil cluster move` does.
//!
//! - Moved from host A to host B (both take migrations): B's agent listens and says so in etcd,
//!   A's agent sends the tenant live over TCP (pre-copy), B adopts it; its report says `migrate`,
//!   A holds nothing of it any more, and its switch port came back.
//! - Keys: the hosts start with none; each agent makes its host's key in etcd and installs every
//!   host's, so the migrations authenticate with keys from etcd. B's key is rotated, and B then
//!   migrates the tenant back to A under its new key id.
//! - etcd unreachable (frozen for 2 s, less than the leases' TTL): the hosts keep what they run,
//!   and once it answers again the next move migrates as before.
//! - Moved on to host C (which takes no migrations): B deletes it (flushed) and C creates it
//!   from its spec; the report says `create`.
//! - The new host cannot take it (host D advertises migrations but is shutting down, as a host
//!   about to die): D reports the failure, and C, whose tenant D never listened for, deletes it
//!   after its wait (fail closed: it does not run where etcd says it should not).
//! - The old host is gone (its agent and host stopped, its lease revoked): the new host does not
//!   wait for a migration that cannot come and creates the tenant from its spec.
//!
//! The tenant is Debian's kernel in early boot, as in migration.rs (a running VM writing its
//! memory), not a full boot: no guest traffic is needed here. Skips, saying so, only where the
//! etcd binary is absent (scripts/setup installs it, so CI never skips it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_tests::etcd::Etcd;
use vigil_tests::hosts::in_process_host;
use vigil_tests::outside::free_tcp_port;
use vigil_tests::workload::{idle_policy, vm_spec};
use vigil_tests::{tenant_dir, TempDir};
use vmm_cluster::keys::TenantRecord;
use vmm_cluster::{AgentConfig, HostAgent};
use vmm_host::migration_link::MigrationKeys;
use vmm_host::{Host, VmSpec, VmState};

const ID: &str = "mover";
const WAIT: Duration = Duration::from_secs(120);

/// Moves the tenant to `host` in etcd (compare-and-swap, as `vigil cluster move`) and returns
/// the report of that revision: (host, state, action).
fn move_to(store: &vmm_cluster::Store, host: &str) -> (String, String, String) {
    let rev = store.update_tenant(ID, |r| r.host = host.into()).unwrap();
    let s = store
        .wait_status(ID, rev, WAIT)
        .unwrap()
        .unwrap_or_else(|| panic!("no report of the move to {host}"));
    (s.host, s.state, s.action)
}

/// Waits until `host` runs no tenant and its switch holds no port for one.
fn wait_empty(host: &Host, name: &str) {
    let deadline = Instant::now() + WAIT;
    while !host.list().is_empty() || host.switch_status().ports_held != 0 {
        assert!(
            Instant::now() < deadline,
            "{name} still runs it ({} VMs, {} switch ports held)",
            host.list().len(),
            host.switch_status().ports_held
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for an event line of `kind` that contains `needle`.
fn wait_event(rx: &std::sync::mpsc::Receiver<Arc<str>>, kind: &str, needle: &str) -> String {
    vigil_tests::events::wait_bus_event(rx, kind, needle, WAIT)
}

#[test]
fn a_tenant_moved_in_etcd_migrates_live_where_the_new_host_takes_migrations() {
    let Some(etcd) = Etcd::try_start("cluster-migrate").unwrap_or_else(|e| panic!("{e}")) else {
        eprintln!("SKIPPED: no etcd binary on PATH (scripts/setup installs etcd-server)");
        return;
    };
    vmm_core::events::bus().set_quiet(true);
    let events = vmm_core::events::bus().subscribe();
    let store = etcd.store();
    let dir = TempDir::new("vigil-cluster-migrate");
    let agent = |host: &Arc<Host>, name: &str, sender: u32, listen: bool| {
        let migration_url = listen.then(|| format!("tcp:127.0.0.1:{}", free_tcp_port().unwrap()));
        HostAgent::start(
            host.clone(),
            AgentConfig {
                endpoints: vec![etcd.endpoint().to_string()],
                name: name.into(),
                sender,
                api_socket: None,
                tenant_ports: 2,
                lease_ttl_s: 5,
                migration_url,
            },
        )
        .unwrap_or_else(|e| panic!("the agent of {name}: {e}"))
    };
    // No keys given: the agents take every host's from etcd.
    let keys = MigrationKeys::default();
    let a = in_process_host("mv-a", &dir, &keys);
    let b = in_process_host("mv-b", &dir, &keys);
    let c = in_process_host("mv-c", &dir, &keys);
    let d = in_process_host("mv-d", &dir, &keys);
    let mut agent_a = agent(&a, "mv-a", 1, true);
    let _agent_b = agent(&b, "mv-b", 2, true);
    let _agent_c = agent(&c, "mv-c", 3, false);
    let _agent_d = agent(&d, "mv-d", 4, true);
    // A holds every host's key from etcd (the later agents' keys came by its watch).
    let installed = loop {
        let line = wait_event(&events, "cluster_keys_installed", "\"host\":\"mv-a\"");
        if line.contains("\"mv-d\"") {
            break line;
        }
    };
    let installed: serde_json::Value =
        serde_json::from_str(installed.trim_start_matches(|c| c != '{')).unwrap();
    for host in ["mv-a", "mv-b", "mv-c", "mv-d"] {
        assert_eq!(
            installed["hosts"][host],
            serde_json::json!([1]),
            "{installed}"
        );
    }
    assert_eq!(a.migration_keys().hosts().count(), 4);
    let hosts = store.hosts().unwrap();
    let migration_of = |name: &str| {
        hosts
            .iter()
            .find(|h| h.name == name)
            .and_then(|h| h.migration.clone())
    };
    assert!(migration_of("mv-b").is_some(), "{hosts:?}");
    assert_eq!(migration_of("mv-c"), None, "{hosts:?}");

    // Put for host A: created and booted there.
    let mut spec: VmSpec = serde_json::from_value(vm_spec(
        &tenant_dir(),
        ID,
        "10.94.0.2",
        "52:54:00:94:00:02",
        &idle_policy(),
    ))
    .unwrap();
    spec.memory_mib = 128;
    let rev = store
        .put_tenant(&TenantRecord {
            host: "mv-a".into(),
            spec,
        })
        .unwrap();
    let status = store
        .wait_status(ID, rev, WAIT)
        .unwrap()
        .expect("A's report");
    assert_eq!(
        (
            status.host.as_str(),
            status.state.as_str(),
            status.action.as_str()
        ),
        ("mv-a", "running", "create"),
        "{status:?}"
    );
    assert_eq!(a.info(ID).unwrap().state, VmState::Running);
    let a_ports = a.switch_status().ports_held;
    assert_eq!(a_ports, 1);

    // Moved to B: migrated live, over TCP, with pre-copy.
    let status = move_to(&store, "mv-b");
    let s = (status.0.as_str(), status.1.as_str(), status.2.as_str());
    assert_eq!(s, ("mv-b", "running", "migrate"), "{status:?}");
    let migrated = wait_event(&events, "cluster_migrated", ID);
    let event: serde_json::Value =
        serde_json::from_str(migrated.trim_start_matches(|c| c != '{')).unwrap();
    assert_eq!(event["to"], "mv-b", "{event}");
    assert_eq!(event["migration"]["precopy"], true, "{event}");
    eprintln!(
        "moved A -> B in {:.1} ms (downtime {} ms, rounds {})",
        event["ms"].as_f64().unwrap_or(0.0),
        event["migration"]["downtime_ms"],
        event["migration"]["rounds"]
    );
    assert_eq!(b.info(ID).unwrap().state, VmState::Running);
    assert!(a.list().is_empty(), "A still runs it");
    assert_eq!(a.switch_status().ports_held, 0, "A's switch port came back");
    assert_eq!(b.switch_status().ports_held, 1);
    // A's own report is gone; no listener's record is left behind.
    assert_eq!(
        store.status(ID).unwrap().map(|s| s.host),
        Some("mv-b".into())
    );

    // B's key rotated in etcd: A and B take key 2, and B (the source now) proves itself with
    // it when the tenant moves back to A.
    let rotated = store
        .rotate_host_key("mv-b", &vmm_cluster::keys::new_key_hex().unwrap())
        .unwrap();
    assert_eq!(rotated, 2);
    let mut waiting = vec!["mv-a", "mv-b"];
    while !waiting.is_empty() {
        let line = wait_event(&events, "cluster_keys_installed", "\"mv-b\":[1,2]");
        waiting.retain(|host| !line.contains(&format!("\"host\":\"{host}\"")));
    }
    let status = move_to(&store, "mv-a");
    let s = (status.0.as_str(), status.1.as_str(), status.2.as_str());
    assert_eq!(s, ("mv-a", "running", "migrate"), "{status:?}");
    wait_empty(&b, "B");

    // etcd frozen for 2 s (under the 5 s leases): nothing is lost or moved meanwhile, A still
    // runs the tenant after it, and the next move migrates live as before.
    {
        let _paused = etcd.pause();
        let frozen = Instant::now();
        while frozen.elapsed() < Duration::from_secs(2) {
            assert_eq!(a.info(ID).unwrap().state, VmState::Running);
            assert!(b.list().is_empty());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(a.info(ID).unwrap().state, VmState::Running);
    let status = move_to(&store, "mv-b");
    let s = (status.0.as_str(), status.1.as_str(), status.2.as_str());
    assert_eq!(s, ("mv-b", "running", "migrate"), "{status:?}");
    wait_empty(&a, "A");

    // Moved on to C, which takes no migrations: deleted at B, created at C from its spec.
    let status = move_to(&store, "mv-c");
    let s = (status.0.as_str(), status.1.as_str(), status.2.as_str());
    assert_eq!(s, ("mv-c", "running", "create"), "{status:?}");
    wait_empty(&b, "B");
    assert_eq!(c.info(ID).unwrap().state, VmState::Running);

    // Moved to D, which advertises migrations but cannot take any (shutting down): D reports
    // the failure; C waits for D to listen, in vain, then deletes it.
    d.shutdown();
    let moved = Instant::now();
    let status = move_to(&store, "mv-d");
    assert_eq!(
        (status.0.as_str(), status.1.as_str()),
        ("mv-d", "failed"),
        "{status:?}"
    );
    let failed = wait_event(&events, "cluster_migration_failed", "did not listen");
    assert!(failed.contains("mv-d"), "{failed}");
    wait_empty(&c, "C");
    let waited = moved.elapsed();
    assert!(
        waited >= vmm_cluster::LEAVE_WAIT,
        "C deleted it after {waited:?}, before its wait for D ended"
    );

    // Back on A; then A's host dies (its agent and host stopped: its lease and its report go)
    // and the tenant is moved to B: B creates it from its spec, without waiting for A.
    let status = move_to(&store, "mv-a");
    assert_eq!(
        (status.0.as_str(), status.2.as_str()),
        ("mv-a", "create"),
        "{status:?}"
    );
    agent_a.stop();
    a.shutdown();
    let moved = Instant::now();
    let status = move_to(&store, "mv-b");
    let s = (status.0.as_str(), status.1.as_str(), status.2.as_str());
    assert_eq!(s, ("mv-b", "running", "create"), "{status:?}");
    assert!(
        moved.elapsed() < vmm_cluster::ARRIVE_WAIT,
        "B waited for a migration from a dead host"
    );

    // Deleted: gone from B.
    assert!(store.delete_tenant(ID).unwrap());
    wait_empty(&b, "B");
    for host in [&b, &c] {
        host.shutdown();
    }
}
