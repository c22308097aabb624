//! The cluster on etcd, end to end: a real etcd (Debian's `etcd-server`), a real `vigil edge`
//! (its outside TAP in a network namespace) and a real `vigil host`, both joined to etcd, and the
//! `vigil cluster` front end writing desired state.
//!
//! The host registers under a lease; a tenant put for it is created and booted there; a policy
//! change is re-applied (the host's `vm.policy` serves the new one, and both tiers were
//! reconfigured); a delete removes it; and when the host process is killed, its lease expires
//! and the edge flushes the tenants that host attached (`edge_host_lost`) and fences it.
//!
//! Keys: the hosts have no key files. Each signs its verdict datagrams with its own key from
//! etcd (made when it joins), and the edge holds each host's sender id to that key. So a datagram
//! for a host's sender id under the edge's shared key, or under another key, is refused. A
//! rotation (`vigil cluster rotate-key`) reaches both ends, and verdicts go on flowing.
//!
//! The tenant is the Debian kernel, created and booted but not waited for (as in api.rs): no
//! guest traffic is needed here. The test skips, saying so, only where the etcd binary is absent
//! (scripts/setup installs it, so CI never skips it).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vigil_tests::etcd::Etcd;
use vigil_tests::outside::free_udp_port;
use vigil_tests::rest::{api, metric};
use vigil_tests::workload::{idle_policy, vm_spec};
use vigil_tests::{fw_guest_elf, tenant_dir, Namespace, TempDir, VigilCommand, VigilProcess};
use vigil_wire::auth::{self, Header, MAX_DATAGRAM};
use vmm_core::introspect::tenant_id;

const KEY_HEX: &str = "5c2a7e11b0c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8";
const TAP: &str = "vgcltap0";
const SENDER: u32 = 7;
const TTL_S: &str = "1";
const EVENT_LIMIT: Duration = Duration::from_secs(120);

fn write(dir: &Path, name: &str, value: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, value.to_string()).unwrap();
    path
}

#[test]
fn a_host_runs_what_etcd_assigns_it_and_its_death_closes_its_tenants_at_the_edge() {
    let Some(etcd) = Etcd::try_start("cluster").unwrap_or_else(|e| panic!("{e}")) else {
        eprintln!("SKIPPED: no etcd binary on PATH (scripts/setup installs etcd-server)");
        return;
    };
    let store = etcd.store();
    let dir = TempDir::new("vigil-cluster-test");
    let pid = std::process::id();
    let netns =
        Namespace::try_with_tap(&format!("vgcl{pid}"), TAP).unwrap_or_else(|e| panic!("{e}"));
    let key_file = dir.join("channel.key");
    std::fs::write(&key_file, format!("{KEY_HEX}\n")).unwrap();
    let cloud = format!("127.0.0.1:{}", free_udp_port().unwrap());
    let control = format!("127.0.0.1:{}", free_udp_port().unwrap());

    // The edge joins the cluster and watches the hosts.
    let edge = VigilCommand::new("edge")
        .args(["edge", "--elf"])
        .arg(fw_guest_elf())
        .args(["--outside", &format!("tap={TAP},netns={}", netns.name)])
        .args(["--cloud", &format!("local={cloud}")])
        .args(["--control", &control])
        .arg("--key-file")
        .arg(&key_file)
        .args(["--name", "edge1", "--etcd", etcd.endpoint()])
        .args(["--etcd-lease-ttl", TTL_S])
        .start("verdict channel on")
        .unwrap_or_else(|e| panic!("vigil edge not up: {e}"));
    let edges = store.edges().unwrap();
    assert_eq!(edges.len(), 1, "{edges:?}");
    assert_eq!(edges[0].name, "edge1");
    assert_eq!(edges[0].control, control);

    // The host registers under a lease, with its sender id and capacity.
    let socket = dir.join("a.sock");
    let mut host = start_host(&etcd, "a", SENDER, &socket, &cloud, &control);
    // Its key was made in etcd, and the edge holds its sender id to it.
    let keys = etcd.cli_json(&["keys", "a"]);
    assert_eq!(keys["current"], 1, "{keys}");
    edge.wait_event(EVENT_LIMIT, "the edge takes host a's key", |e| {
        e["event"] == "edge_host_keys" && e["sender"] == SENDER && e["key_ids"] == json!([1])
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // Datagrams for host a's sender id that are not under its key are refused: the edge's
    // shared key no longer speaks for it, nor does another key under its key id.
    let forge = |key_id: u16, key: &[u8]| {
        let header = Header {
            key_id,
            sender: SENDER,
            seq: 1,
            epoch: 1,
            ..Header::default()
        };
        let mut out = [0u8; MAX_DATAGRAM];
        let len = auth::seal(key, &header, &[], &mut out).unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.send_to(&out[..len], &control).unwrap();
    };
    let shared = hex::decode(KEY_HEX).unwrap();
    // (Host a's own first datagrams, sent under key 1 before the edge took it, were refused as
    // unknown_key too: the detail names the key id.)
    for (key_id, reason) in [(0, "unknown_key"), (1, "bad_tag")] {
        forge(key_id, &shared);
        edge.wait_event(EVENT_LIMIT, "the forged datagram refused", |e| {
            e["event"] == "edge_rejected"
                && e["reason"] == reason
                && (key_id != 0 || e["detail"].as_str().is_some_and(|d| d.contains("key id 0")))
        })
        .unwrap_or_else(|e| panic!("key id {key_id}: {e}"));
    }
    let hosts = etcd.cli_json(&["hosts"]);
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");
    assert_eq!(hosts[0]["name"], "a");
    assert_eq!(hosts[0]["sender"], SENDER);
    assert_eq!(hosts[0]["ttl_s"], 1);
    assert_eq!(hosts[0]["capacity"]["tenant_ports"], 2);
    assert!(hosts[0]["lease"].as_i64().unwrap_or(0) != 0, "{hosts}");

    // A tenant put for host a: created and booted there.
    let spec = vm_spec(
        &tenant_dir(),
        "web",
        "10.0.0.2",
        "52:54:00:00:00:02",
        &idle_policy(),
    );
    let spec_file = write(dir.path(), "web.json", &spec);
    let status = etcd.cli_json(&[
        "put",
        &spec_file.to_string_lossy(),
        "--host",
        "a",
        "--wait",
        "120",
    ]);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["action"], "create");
    let (code, info) = api(&socket, "GET", "vm.info?id=web", None);
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["state"], "running", "{info}");
    let listed = etcd.cli_json(&["list"]);
    assert_eq!(listed[0]["id"], "web");
    assert_eq!(listed[0]["host"], "a");

    // Host a's key rotated in etcd: the edge takes the new one (keeping the old while datagrams
    // under it may be in flight), the host signs with it, and verdicts go on flowing.
    let rotated = etcd.cli_json(&["rotate-key", "a"]);
    assert_eq!(rotated["current"], 2, "{rotated}");
    host.wait_event(EVENT_LIMIT, "host a signs with key 2", |e| {
        e["event"] == "cluster_keys_installed" && e["edge_key_id"] == 2
    })
    .unwrap_or_else(|e| panic!("{e}"));
    edge.wait_event(EVENT_LIMIT, "the edge takes key 2", |e| {
        e["event"] == "edge_host_keys" && e["sender"] == SENDER && e["key_ids"] == json!([1, 2])
    })
    .unwrap_or_else(|e| panic!("{e}"));

    // A new policy: re-applied on both tiers (flush, re-attach) by the host's own path.
    let policy = json!({"allow": [{"op": "connect", "exe": "/bin/busybox", "protocol": "tcp",
                                   "cidr": "10.0.0.1/32", "ports": "8080"}]});
    let policy_file = write(dir.path(), "policy.json", &policy);
    let status = etcd.cli_json(&[
        "policy",
        "web",
        "--set",
        &policy_file.to_string_lossy(),
        "--wait",
        "60",
    ]);
    assert_eq!(status["action"], "policy", "{status}");
    assert_eq!(status["state"], "running", "{status}");
    let reconfig = host
        .wait_event(EVENT_LIMIT, "the policy's reconfig", |e| {
            e["event"] == "reconfig" && e["action"] == "policy" && e["vm"] == "web"
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(reconfig["tiers_ms"].as_f64().is_some(), "{reconfig}");
    // The re-attach reached the edge under the new key.
    edge.wait_event(EVENT_LIMIT, "host a's verdicts after the rotation", |e| {
        e["event"] == "edge_verdicts" && e["sender"] == SENDER && e["applied"] == true
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (code, served) = api(&socket, "GET", "vm.policy?id=web", None);
    assert_eq!(code, 200, "{served}");
    assert_eq!(served, policy);
    // A policy that does not compile never reaches etcd.
    let bad_file = write(dir.path(), "bad.json", &json!({"allow": [{"op": "fly"}]}));
    let out = etcd.cli(&["policy", "web", "--set", &bad_file.to_string_lossy()]);
    assert!(!out.status.success());
    assert_eq!(
        store.tenant("web").unwrap().unwrap().0.spec.policy,
        serde_json::from_value(policy).unwrap()
    );

    // Deleted in etcd: deleted on the host (flushed from both tiers).
    ok_empty(etcd.cli(&["delete", "web"]), "delete");
    host.wait_event(EVENT_LIMIT, "the delete's reconfig", |e| {
        e["event"] == "reconfig" && e["action"] == "delete" && e["vm"] == "web"
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (code, _) = api(&socket, "GET", "vm.info?id=web", None);
    assert_eq!(code, 404);

    // Another tenant on host a, then host a dies: its lease expires and the edge flushes what
    // host a attached (the tenant), fencing the host.
    let spec = vm_spec(
        &tenant_dir(),
        "db",
        "10.0.0.3",
        "52:54:00:00:00:03",
        &idle_policy(),
    );
    let spec_file = write(dir.path(), "db.json", &spec);
    etcd.cli_json(&[
        "put",
        &spec_file.to_string_lossy(),
        "--host",
        "a",
        "--wait",
        "120",
    ]);
    // The edge acknowledged every datagram of host a, db's Attach included (it owns the tenant
    // from then on). No event says so: the host's metric is read until it does.
    let deadline = Instant::now() + EVENT_LIMIT;
    loop {
        let (code, text) = api(&socket, "GET", "metrics", None);
        assert_eq!(code, 200);
        let text = text.as_str().unwrap_or_default().to_string();
        if metric(&text, "vigil_edge_unacked_datagrams") == Some("0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "host a's datagrams unacknowledged: {text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = Instant::now();
    // SAFETY: kill(2) on our own child's pid, not reaped yet.
    unsafe { libc::kill(host.id() as libc::pid_t, libc::SIGKILL) };
    host.wait();
    let lost = edge
        .wait_event(EVENT_LIMIT, "edge_host_lost for host a", |e| {
            e["event"] == "edge_host_lost" && e["host"] == "a"
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let failover = killed.elapsed();
    assert_eq!(lost["sender"], SENDER, "{lost}");
    assert_eq!(lost["applied"], true, "{lost}");
    let flushed: Vec<u64> = lost["flushed_tenants"]
        .as_array()
        .unwrap_or_else(|| panic!("{lost}"))
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(flushed, vec![u64::from(tenant_id("db"))], "{lost}");
    assert!(store.hosts().unwrap().is_empty());
    // Not before the lease could expire (1 s TTL; etcd checks expiry every 500 ms).
    assert!(failover >= Duration::from_millis(500), "{failover:?}");
    eprintln!(
        "cluster: host killed -> edge flushed its tenants in {failover:?} (lease TTL {TTL_S} s)"
    );

    // The tenant starts on another host from its record in etcd, with its policy.
    let db_policy = json!({"allow": [{"op": "connect", "comm": "psql", "protocol": "tcp",
                                      "cidr": "10.0.0.9/32", "ports": "5432"}]});
    let db_policy_file = write(dir.path(), "db-policy.json", &db_policy);
    etcd.cli_json(&["policy", "db", "--set", &db_policy_file.to_string_lossy()]);
    let socket_b = dir.join("b.sock");
    let host_b = start_host(&etcd, "b", SENDER + 1, &socket_b, &cloud, &control);
    let status = etcd.cli_json(&["move", "db", "b", "--wait", "120"]);
    assert_eq!(status["host"], "b", "{status}");
    assert_eq!(status["state"], "running", "{status}");
    let (code, info) = api(&socket_b, "GET", "vm.info?id=db", None);
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["ip"], "10.0.0.3");
    let (_, served) = api(&socket_b, "GET", "vm.policy?id=db", None);
    assert_eq!(served, db_policy);

    // Assigned to a host that is not there: host b deletes it (flushed), and reports nothing.
    etcd.cli_json(&["move", "db", "nowhere"]);
    host_b
        .wait_event(EVENT_LIMIT, "db deleted on b", |e| {
            e["event"] == "cluster_reconciled" && e["action"] == "delete" && e["vm"] == "db"
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (code, _) = api(&socket_b, "GET", "vm.info?id=db", None);
    assert_eq!(code, 404);
    assert!(store.status("db").unwrap().is_none());
}

fn start_host(
    etcd: &Etcd,
    name: &str,
    sender: u32,
    socket: &Path,
    cloud: &str,
    control: &str,
) -> VigilProcess {
    VigilCommand::new(format!("host {name}"))
        .args(["host", "--api-socket"])
        .arg(socket)
        .arg("--switch-elf")
        .arg(fw_guest_elf())
        .args(["--uplink", &format!("vxlan={cloud}"), "--tenant-ports", "2"])
        .args(["--edge-control", control])
        .args(["--host-id", &sender.to_string(), "--name", name])
        .args(["--etcd", etcd.endpoint(), "--etcd-lease-ttl", TTL_S])
        .start("serving")
        .unwrap_or_else(|e| panic!("vigil host {name} not up: {e}"))
}

fn ok_empty(out: Output, what: &str) {
    assert!(
        out.status.success(),
        "vigil cluster {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
