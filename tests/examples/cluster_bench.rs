//! The cluster on etcd (a real etcd, `vigil edge` and `vigil host` joined to it). Prints one JSON
//! object per figure (see scripts/bench), the median as `value`:
//!   etcd_reconfig_ms   a tenant's policy put into etcd -> both tiers applied it: the host's
//!                      switch (its `reconfig` event, action policy) and the edge (the host's
//!                      Flush+Attach datagram applied: `edge_verdicts`), whichever is later,
//!                      each event's arrival on the tiers' API streams; baseline: the same policy
//!                      change through the host's REST API (`PUT vm.policy`), same run
//!   host_failover_ms   the host process killed (SIGKILL) -> the edge flushed the tenants it had
//!                      attached (`edge_host_lost` on the edge's stream), under the named lease
//!                      TTL; with `edge_flush_ms`, the flush itself
//!   etcd_migration_ms  a tenant's desired host changed in etcd -> the new host's report that it
//!                      runs it, migrated live (TCP, pre-copy) by the two hosts' agents, with the
//!                      migration's downtime and rounds; baseline: the same migration asked of the
//!                      hosts directly (receive, then send), same run, alternating. In-process
//!                      hosts with their agents (no edge), the Debian kernel as the tenant
//!
//! The host's switch uplink is a VXLAN endpoint towards the edge's cloud port on loopback; the
//! edge's outside port is a TAP in a network namespace made here. The tenant is the Debian
//! kernel, created and booted (its boot is not waited for: only the control plane is measured).
//!
//! Usage: cargo run --release -p vigil-tests --example cluster_bench -- FW_GUEST_ELF TENANT_DIR
//!        [ROUNDS] [LEASE_TTL_S]
//! Needs the `vigil` binary (cargo build --release -p vigil; `VIGIL_BIN` overrides), etcd on PATH
//! (scripts/setup) and root (network namespaces, /dev/kvm).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vigil_tests::etcd::Etcd;
use vigil_tests::hosts::in_process_host;
use vigil_tests::outside::free_tcp_port;
use vigil_tests::outside::free_udp_port;
use vigil_tests::rest::{self, Events};
use vigil_tests::workload::vm_spec;
use vigil_tests::workload::{idle_policy, migration_keys_json};
use vigil_tests::{try_vigil_bin, Namespace, TempDir, VigilCommand, VigilProcess};
use vmm_cluster::keys::TenantRecord;
use vmm_cluster::{AgentConfig, HostAgent, Store};
use vmm_core::host_kind::HostKind;
use vmm_host::{MigrationKeys, MigrationOptions, VmSpec};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const KEY_HEX: &str = "9d3c1a0b7e6f5d4c3b2a19081726354453627180f9e8d7c6b5a4938271605f4e";
const SENDER: u32 = 3;
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn policy(port: u16) -> Value {
    json!({"allow": [{"op": "connect", "exe": "/bin/busybox", "protocol": "tcp",
                      "cidr": "10.0.0.1/32", "ports": port.to_string()}]})
}

struct Cloud {
    etcd: Etcd,
    elf: PathBuf,
    dir: TempDir,
    cloud: String,
    control: String,
    ttl: String,
    edge_socket: PathBuf,
    _edge: VigilProcess,
    _netns: Namespace,
}

impl Cloud {
    fn start(elf: &Path, ttl: u64) -> Result<Cloud> {
        let etcd = Etcd::try_start("bench")?.ok_or("no etcd binary on PATH (scripts/setup)")?;
        let dir = TempDir::try_new("vigil-cluster-bench")?;
        let netns = Namespace::try_with_tap(&format!("vclb{}", std::process::id()), "vclbtap0")?;
        let key_file = dir.join("channel.key");
        std::fs::write(&key_file, KEY_HEX)?;
        let cloud = format!("127.0.0.1:{}", free_udp_port()?);
        let control = format!("127.0.0.1:{}", free_udp_port()?);
        let edge_socket = dir.join("edge.sock");
        let mut edge = VigilCommand::with_bin("edge", try_vigil_bin()?)
            .args(["edge", "--elf"])
            .arg(elf)
            .args(["--outside", &format!("tap=vclbtap0,netns={}", netns.name)])
            .args(["--cloud", &format!("local={cloud}")])
            .args(["--control", &control])
            .arg("--key-file")
            .arg(&key_file)
            .arg("--api-socket")
            .arg(&edge_socket)
            .args(["--name", "bench-edge", "--etcd", etcd.endpoint()])
            .args(["--etcd-lease-ttl", &ttl.to_string()])
            .quiet_stdout()
            .die_with_parent()
            .start("verdict channel on")?;
        edge.shutdown_with(&edge_socket, "edge.shutdown");
        Ok(Cloud {
            etcd,
            elf: elf.to_path_buf(),
            dir,
            cloud,
            control,
            ttl: ttl.to_string(),
            edge_socket,
            _edge: edge,
            _netns: netns,
        })
    }

    fn host(&self, socket: &Path) -> Result<VigilProcess> {
        let _ = std::fs::remove_file(socket);
        Ok(VigilCommand::with_bin("host", try_vigil_bin()?)
            .args(["host", "--api-socket"])
            .arg(socket)
            .arg("--switch-elf")
            .arg(&self.elf)
            .args([
                "--uplink",
                &format!("vxlan={}", self.cloud),
                "--tenant-ports",
                "2",
            ])
            .args(["--edge-control", &self.control])
            .args(["--host-id", &SENDER.to_string(), "--name", "a"])
            .args([
                "--etcd",
                self.etcd.endpoint(),
                "--etcd-lease-ttl",
                &self.ttl,
            ])
            .quiet_stdout()
            .die_with_parent()
            .start("serving")?)
    }
}

/// Waits until both tiers applied the policy change that started at `t0`; returns the later
/// arrival.
fn both_tiers(host: &Events, edge: &Events, t0: Instant) -> Result<(f64, f64)> {
    let (switch_at, _) = host.wait(|e| e["event"] == "reconfig" && e["action"] == "policy")?;
    let (edge_at, _) = edge.wait(|e| {
        e["event"] == "edge_verdicts"
            && e["sender"] == SENDER
            && e["applied"] == true
            && e["records"].as_u64().unwrap_or(0) >= 2
    })?;
    Ok((
        ms(switch_at.saturating_duration_since(t0)),
        ms(edge_at.saturating_duration_since(t0)),
    ))
}

fn bench_reconfig(cloud: &Cloud, tenant_dir: &Path, rounds: usize, kind: &str) -> Result<()> {
    let socket = cloud.dir.join("a.sock");
    let mut host = cloud.host(&socket)?;
    host.shutdown_with(&socket, "vmm.shutdown");
    let store = Store::connect(&[cloud.etcd.endpoint().to_string()])?;
    let spec = vm_spec(
        tenant_dir,
        "rc",
        "10.0.0.2",
        "52:54:00:00:00:02",
        &policy(1),
    );
    let revision = store.put_tenant(&TenantRecord {
        host: "a".into(),
        spec: serde_json::from_value(spec)?,
    })?;
    let status = store
        .wait_status("rc", revision, CALL_TIMEOUT)?
        .ok_or("host a never reported tenant rc")?;
    if status.state != "running" {
        return Err(format!("host a could not run tenant rc: {status:?}").into());
    }
    let host_events = Events::subscribe(&socket, CALL_TIMEOUT, EVENT_TIMEOUT)?;
    let edge_events = Events::subscribe(&cloud.edge_socket, CALL_TIMEOUT, EVENT_TIMEOUT)?;
    let (mut via_etcd, mut via_api, mut switch_only) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        // Through etcd: the agent sees the put and re-applies it through the host's path.
        let new: trap_handler::policy::PolicySpec =
            serde_json::from_value(policy(2000 + i as u16))?;
        let t0 = Instant::now();
        store.update_tenant("rc", |r| r.spec.policy = new.clone())?;
        let (switch, edge) = both_tiers(&host_events, &edge_events, t0)?;
        via_etcd.push(switch.max(edge));
        switch_only.push(switch);
        // Baseline: the same change through the host's REST API, no etcd.
        let body = json!({"id": "rc", "policy": policy(4000 + i as u16)});
        let t0 = Instant::now();
        rest::try_call_ok(&socket, "PUT", "vm.policy", Some(&body), CALL_TIMEOUT)?;
        let (switch, edge) = both_tiers(&host_events, &edge_events, t0)?;
        via_api.push(switch.max(edge));
    }
    println!(
        "{}",
        json!({"metric": "etcd_reconfig_ms", "value": round3(median(&via_etcd)), "unit": "ms",
               "runs": rounds, "host": kind,
               "min": round3(via_etcd.iter().copied().fold(f64::INFINITY, f64::min)),
               "max": round3(via_etcd.iter().copied().fold(0.0, f64::max)),
               "switch_ms": round3(median(&switch_only)),
               "baseline_api_ms": round3(median(&via_api)),
               "note": "policy put into etcd -> the host's switch and the edge both applied the \
                        tenant's flush+attach (later of the two events' arrival); baseline: the \
                        same change by PUT vm.policy on the host's API, this run"})
    );
    drop(host_events);
    drop(edge_events);
    store.delete_tenant("rc")?;
    Ok(())
}

fn bench_failover(cloud: &Cloud, tenant_dir: &Path, rounds: usize, kind: &str) -> Result<()> {
    let store = Store::connect(&[cloud.etcd.endpoint().to_string()])?;
    let edge_events = Events::subscribe(&cloud.edge_socket, CALL_TIMEOUT, EVENT_TIMEOUT)?;
    let spec = vm_spec(
        tenant_dir,
        "fo",
        "10.0.0.3",
        "52:54:00:00:00:03",
        &policy(80),
    );
    let record = TenantRecord {
        host: "a".into(),
        spec: serde_json::from_value(spec)?,
    };
    let (mut failover, mut flush) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let socket = cloud.dir.join("fo.sock");
        let mut host = cloud.host(&socket)?;
        let revision = store.put_tenant(&record)?;
        match store.wait_status("fo", revision, CALL_TIMEOUT)? {
            Some(s) if s.state == "running" => {}
            other => {
                return Err(format!("host a did not run tenant fo (its status: {other:?})").into())
            }
        }
        // The edge took the host's Attach of the tenant.
        edge_events.wait(|e| {
            e["event"] == "edge_verdicts" && e["sender"] == SENDER && e["applied"] == true
        })?;
        let killed = Instant::now();
        // SAFETY: kill(2) on our own child's pid, not reaped yet.
        unsafe { libc::kill(host.id() as libc::pid_t, libc::SIGKILL) };
        // (A host that stopped cleanly before left an edge_host_lost with nothing to flush.)
        let (at, event) = edge_events.wait(|e| {
            e["event"] == "edge_host_lost"
                && e["host"] == "a"
                && e["flushed_tenants"]
                    .as_array()
                    .is_some_and(|t| !t.is_empty())
        })?;
        host.wait();
        let flushed = event["flushed_tenants"].as_array().map_or(0, Vec::len);
        if event["applied"] != true || flushed != 1 {
            return Err(format!("the edge did not flush the tenant: {event}").into());
        }
        failover.push(ms(at.saturating_duration_since(killed)));
        flush.push(event["flush_ms"].as_f64().unwrap_or(f64::NAN));
    }
    store.delete_tenant("fo")?;
    println!(
        "{}",
        json!({"metric": "host_failover_ms", "value": round3(median(&failover)), "unit": "ms",
               "runs": rounds, "host": kind, "lease_ttl_s": cloud.ttl.parse::<u64>().unwrap_or(0),
               "min": round3(failover.iter().copied().fold(f64::INFINITY, f64::min)),
               "max": round3(failover.iter().copied().fold(0.0, f64::max)),
               "edge_flush_ms": round3(median(&flush)),
               "note": "host process SIGKILLed -> its lease expired in etcd -> the edge flushed \
                        the tenant it had attached (edge_host_lost on the edge's API stream); \
                        edge_flush_ms: the flush alone, this run"})
    );
    Ok(())
}

/// Moves tenant `mv` between two in-process hosts, alternating a move through etcd (their agents
/// migrate it) and the same migration asked of the hosts directly.
fn bench_migration(tenant_dir: &Path, rounds: usize, kind: &str) -> Result<()> {
    let Some(etcd) = Etcd::try_start("bench-migrate")? else {
        return Err("no etcd binary on PATH (scripts/setup installs etcd-server)".into());
    };
    let store = Store::connect(&[etcd.endpoint().to_string()])?;
    // The in-process hosts' events go to the subscription below, not to stdout (figures only).
    vmm_core::events::bus().set_quiet(true);
    let dir = TempDir::new("vigil-bench-migrate");
    let keys = MigrationKeys::from_json(&migration_keys_json(&["bm-a", "bm-b"]))?;
    let hosts = [
        in_process_host("bm-a", &dir, &keys),
        in_process_host("bm-b", &dir, &keys),
    ];
    let urls = [0, 1].map(|_| format!("tcp:127.0.0.1:{}", free_tcp_port().unwrap_or(0)));
    let mut agents = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        agents.push(HostAgent::start(
            host.clone(),
            AgentConfig {
                endpoints: vec![etcd.endpoint().to_string()],
                name: ["bm-a", "bm-b"][i].into(),
                sender: 10 + i as u32,
                api_socket: None,
                tenant_ports: 2,
                lease_ttl_s: 5,
                migration_url: Some(urls[i].clone()),
            },
        )?);
    }
    let events = vmm_core::events::bus().subscribe();
    let mut spec: VmSpec = serde_json::from_value(vm_spec(
        tenant_dir,
        "mv",
        "10.0.0.4",
        "52:54:00:00:00:04",
        &idle_policy(),
    ))?;
    spec.memory_mib = 256;
    let revision = store.put_tenant(&TenantRecord {
        host: "bm-a".into(),
        spec,
    })?;
    match store.wait_status("mv", revision, CALL_TIMEOUT)? {
        Some(s) if s.state == "running" => {}
        other => return Err(format!("bm-a did not run tenant mv: {other:?}").into()),
    }
    let (mut via_etcd, mut downtime, mut direct, mut direct_downtime) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut last_rounds = Value::Null;
    // Where it runs: 0 (A) or 1 (B), and what etcd says.
    let mut at = 0usize;
    for _ in 0..rounds {
        // Through etcd: the record's host changes; the new host's report ends it.
        let to = 1 - at;
        let name = ["bm-a", "bm-b"][to];
        let t0 = Instant::now();
        let revision = store.update_tenant("mv", |r| r.host = name.into())?;
        match store.wait_status("mv", revision, CALL_TIMEOUT)? {
            Some(s) if s.host == name && s.action == "migrate" => {}
            other => return Err(format!("the move to {name} did not migrate: {other:?}").into()),
        }
        via_etcd.push(ms(t0.elapsed()));
        let event = loop {
            let line = events.recv_timeout(EVENT_TIMEOUT)?;
            if line.contains("\"event\":\"cluster_migrated\"") {
                break serde_json::from_str::<Value>(line.trim_start_matches(|c| c != '{'))?;
            }
        };
        downtime.push(
            event["migration"]["downtime_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
        last_rounds = event["migration"]["rounds"].clone();
        at = to;
        // Directly, back and forth with the agents out of it: the same hosts, the same VM. (The
        // record names where it runs afterwards, so the agents have nothing to do.)
        let back = 1 - at;
        hosts[back].receive_migration(&urls[back])?;
        let t0 = Instant::now();
        let report = hosts[at].send_migration("mv", &urls[back], MigrationOptions::default())?;
        direct.push(ms(t0.elapsed()));
        direct_downtime.push(report["downtime_ms"].as_f64().unwrap_or(f64::NAN));
        hosts[at].receive_migration(&urls[at])?;
        hosts[back].send_migration("mv", &urls[at], MigrationOptions::default())?;
    }
    store.delete_tenant("mv")?;
    drop(agents);
    for host in &hosts {
        host.shutdown();
    }
    println!(
        "{}",
        json!({"metric": "etcd_migration_ms", "value": round3(median(&via_etcd)), "unit": "ms",
               "runs": rounds, "host": kind, "transport": "tcp", "precopy": true,
               "downtime_ms": round3(median(&downtime)),
               "baseline_direct_ms": round3(median(&direct)),
               "baseline_direct_downtime_ms": round3(median(&direct_downtime)),
               "rounds_last": last_rounds, "memory_mib": 256,
               "note": "desired host changed in etcd -> the new host's status (migrate): both \
                        agents, the listen record, the live migration; baseline: the hosts asked \
                        directly (receive + send), same run, alternating"})
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(elf), Some(tenant_dir)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: cluster_bench FW_GUEST_ELF TENANT_DIR [ROUNDS] [LEASE_TTL_S]");
        return std::process::ExitCode::from(2);
    };
    let rounds = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(10);
    let ttl = args.get(4).and_then(|r| r.parse().ok()).unwrap_or(1);
    let kind = match HostKind::detect() {
        HostKind::Emulating => "emulating",
        HostKind::Hardware => "hardware",
    };
    let run = || -> Result<()> {
        let cloud = Cloud::start(Path::new(elf), ttl)?;
        bench_reconfig(&cloud, Path::new(tenant_dir), rounds, kind)?;
        bench_failover(&cloud, Path::new(tenant_dir), rounds.clamp(1, 5), kind)?;
        bench_migration(Path::new(tenant_dir), rounds.clamp(1, 5), kind)
    };
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster_bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
