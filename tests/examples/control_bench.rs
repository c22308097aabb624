//! Control-plane latencies of real `vigil host` and `vigil edge` processes, measured through their
//! REST APIs and event streams. Prints one JSON object per figure (see scripts/bench), the median
//! as `value`:
//!   api_latency_ms          GET vmm.ping round trip over the Unix socket (one connection each)
//!   api_latency_ms_loaded   the same while 1,000 clients ping and list, with its baseline
//!   reconfig_create_ms      vm.create: from the host's reconfiguration to the switch micro-VM
//!                           having applied the tenant's Attach (`tiers_ms` of the reconfig event)
//!   reconfig_delete_ms      vm.delete: the same for the tenant's FlushTenant
//!   reconfig_migrate_ms     a migrated tenant: the target's switch having taken its port, address
//!                           and adopted verdicts (`tiers_ms` of the target's migrated_in event)
//!   migration_downtime_ms   source pause -> the target runs it (the source's reply), over TCP,
//!                           pre-copy, with stop-and-copy runs of the same run as the baseline
//!   edge_reconfig_ms        a signed Attach+Add datagram: receipt at the edge -> the edge
//!                           micro-VM having taken the records (`apply_ms` of edge_verdicts)
//!
//! The hosts' switch uplinks are VXLAN endpoints towards a local UDP port nobody answers (no
//! network needed); the edge's outside port is a TAP in a network namespace made here. Every
//! process, namespace and directory made here is removed on exit, on error too.
//!
//! Usage: cargo run --release -p vigil-tests --example control_bench -- FW_GUEST_ELF TENANT_DIR [ROUNDS]
//! Needs the `vigil` binary next to the example's directory (cargo build --release -p vigil --bin
//! vigil; `VIGIL_BIN` overrides) and root (network namespaces, /dev/kvm).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use edge::link::{Class, LinkConfig, VerdictLink};
use serde_json::{json, Value};
use vigil_tests::load::ApiLoad;
use vigil_tests::outside::free_udp_port;
use vigil_tests::rest::{self, Events};
use vigil_tests::workload::{idle_policy, vm_spec};
use vigil_tests::{try_vigil_bin, Namespace, TempDir, VigilCommand, VigilProcess};
use vigil_wire::verdict::{IpVersion, Protocol, Rule, VerdictRepr};
use vmm_core::host_kind::HostKind;

/// Bound on one API call (vm.create reads and unpacks the tenant kernel).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the edge micro-VM taking its first record (it may still be booting).
const START_TIMEOUT: Duration = vigil_tests::process::START_TIMEOUT;
/// Bound on an event showing up after the call that causes it.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// GET vmm.ping requests for api_latency_ms.
const PINGS: usize = 1000;
/// How long the tenant runs (booting) before its first migration: long enough that its kernel
/// has touched memory and its vCPU is busy in guest code, as a live tenant's would be.
const MIGRATE_WARMUP: Duration = Duration::from_secs(3);
/// The migrated tenant's RAM.
const MIGRATE_MIB: u64 = 256;
/// Goals (ms) from the project's targets: tiers reconfigured within 1 ms, the edge within 10 ms.
const GOAL_RECONFIG: &str = "<= 1";
const GOAL_EDGE: &str = "<= 10";
/// Names of what a run makes, followed by its pid.
const NETNS_PREFIX: &str = "vcb";
const DIR_PREFIX: &str = "vigil-cbench-";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

// ---------------------------------------------------------------------------------------------
// Figures

struct Samples(Vec<f64>);

impl Samples {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// Nearest-rank percentile.
    fn percentile(&self, p: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    fn min(&self) -> f64 {
        self.0.iter().copied().fold(f64::INFINITY, f64::min)
    }

    fn max(&self) -> f64 {
        self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Prints one figure: the median of `samples` and its spread, plus `extra` fields.
fn emit(metric: &str, samples: &Samples, host: &str, extra: Value) {
    let mut record = json!({
        "metric": metric, "value": round3(samples.median()), "unit": "ms",
        "runs": samples.0.len(), "min": round3(samples.min()), "max": round3(samples.max()),
        "host": host,
    });
    if let (Some(record), Value::Object(extra)) = (record.as_object_mut(), extra) {
        record.extend(extra);
    }
    println!("{record}");
}

// ---------------------------------------------------------------------------------------------
// Processes, namespaces, directories (the harness's guards remove each when dropped)

/// Starts `vigil ARGS` (dying with this process, so that even a killed benchmark leaves no VMM
/// behind) and waits until it prints a line containing `ready`. Its stdout (the event log) is
/// drained quietly; its stderr goes on to ours.
fn start_vigil(name: &str, args: &[String], ready: &str) -> Result<VigilProcess> {
    Ok(VigilCommand::with_bin(name, try_vigil_bin()?)
        .args(args)
        .quiet_stdout()
        .die_with_parent()
        .start(ready)?)
}

/// Whether process `pid` is alive (the suffix of a name made by an earlier run).
fn pid_alive(pid: &str) -> bool {
    Path::new("/proc").join(pid).exists()
}

/// What an earlier run that was killed (no destructors) left: its namespace and directory, both
/// named after its pid.
fn remove_stale() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if let Some(pid) = name.strip_prefix(NETNS_PREFIX) {
                if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && !pid_alive(pid) {
                    let _ = Command::new("ip").args(["netns", "del", name]).status();
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(&format!("{DIR_PREFIX}run-")) {
                if pid.bytes().all(|b| b.is_ascii_digit()) && !pid_alive(pid) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The API and the event stream

fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    Ok(rest::try_call(socket, method, path, body, CALL_TIMEOUT)?)
}

/// A call that must succeed (2xx); returns its JSON body.
fn call_ok(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    Ok(rest::try_call_ok(socket, method, path, body, CALL_TIMEOUT)?)
}

/// A subscription to a process's `/api/v1/events`, live once this returns.
fn subscribe(socket: &Path) -> Result<Events> {
    Ok(Events::subscribe(socket, CALL_TIMEOUT, EVENT_TIMEOUT)?)
}

fn f64_of(v: &Value, field: &str) -> Result<f64> {
    v[field]
        .as_f64()
        .ok_or_else(|| format!("no number {field:?} in {v}").into())
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// Hosts

struct HostProc {
    // The process removes its socket when dropped (its directory goes with the run's).
    _process: VigilProcess,
    socket: PathBuf,
}

fn start_host(name: &str, elf: &Path, root: &Path) -> Result<HostProc> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let socket = dir.join("api.sock");
    let args: Vec<String> = vec![
        "host".into(),
        "--api-socket".into(),
        socket.display().to_string(),
        "--switch-elf".into(),
        elf.display().to_string(),
        "--uplink".into(),
        "vxlan=127.0.0.1:9".into(),
        "--tenant-ports".into(),
        "2".into(),
        "--name".into(),
        name.into(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--migration-keys".into(),
        root.join("migration-keys.json").display().to_string(),
    ];
    let mut process = start_vigil(&format!("host {name}"), &args, "serving")?;
    process.shutdown_with(&socket, "vmm.shutdown");
    Ok(HostProc {
        _process: process,
        socket,
    })
}

fn spec(tenant_dir: &Path, id: &str, n: u8, policy: &Value) -> Value {
    let (ip, mac) = (format!("10.88.0.{n}"), format!("52:54:00:88:00:{n:02x}"));
    vm_spec(tenant_dir, id, &ip, &mac, policy)
}

fn bench_api_latency(host: &HostProc, kind: &str) -> Result<()> {
    let mut rtt = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        let start = Instant::now();
        let (status, _) = call(&host.socket, "GET", "vmm.ping", None)?;
        rtt.push(ms_since(start));
        if status != 200 {
            return Err(format!("vmm.ping answered {status}").into());
        }
    }
    let samples = Samples(rtt);
    emit(
        "api_latency_ms",
        &samples,
        kind,
        json!({"p99": round3(samples.percentile(99.0)),
               "note": "GET vmm.ping over the Unix socket, a new connection per request"}),
    );
    Ok(())
}

/// Concurrent clients for api_latency_ms_loaded.
const LOAD_CLIENTS: usize = 1000;
/// Probe pings measured under that load (and without it, first).
const LOADED_PINGS: usize = 300;

/// `vmm.ping` latency while 1,000 clients send `vmm.ping`/`vm.list` back to back, against the
/// same probe without the load, measured in this run on this host.
fn bench_api_latency_loaded(host: &HostProc, kind: &str) -> Result<()> {
    let probe = |n: usize| -> Result<Samples> {
        let mut rtt = Vec::with_capacity(n);
        for _ in 0..n {
            let start = Instant::now();
            let (status, _) = call(&host.socket, "GET", "vmm.ping", None)?;
            rtt.push(ms_since(start));
            if status != 200 {
                return Err(format!("vmm.ping answered {status}").into());
            }
        }
        Ok(Samples(rtt))
    };
    let baseline = probe(LOADED_PINGS)?;
    let load = ApiLoad::start(&host.socket, LOAD_CLIENTS);
    let clients = load.clients();
    // Every client is sending before the probe starts.
    std::thread::sleep(Duration::from_secs(1));
    let (before, _) = load.counts();
    let started = Instant::now();
    let loaded = probe(LOADED_PINGS);
    let (after, _) = load.counts();
    let seconds = started.elapsed().as_secs_f64();
    let (_, failed) = load.stop();
    let loaded = loaded?;
    emit(
        "api_latency_ms_loaded",
        &loaded,
        kind,
        json!({"p99": round3(loaded.percentile(99.0)),
               "baseline_p50": round3(baseline.median()),
               "baseline_p99": round3(baseline.percentile(99.0)),
               "clients": clients, "load_requests_per_s": (after - before) as f64 / seconds,
               "load_failed": failed,
               "note": "GET vmm.ping over the Unix socket while 1,000 clients send vmm.ping and \
                        vm.list back to back (a new connection each); baseline: the same probe \
                        without them, this run"}),
    );
    Ok(())
}

fn bench_create_delete(
    host: &HostProc,
    tenant_dir: &Path,
    rounds: usize,
    kind: &str,
) -> Result<()> {
    let events = subscribe(&host.socket)?;
    let policy = idle_policy();
    let (mut create, mut delete) = (Vec::new(), Vec::new());
    let (mut api_create, mut api_delete, mut host_create) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let id = format!("cb{i}");
        let body = spec(tenant_dir, &id, 10 + (i % 200) as u8, &policy);
        let start = Instant::now();
        call_ok(&host.socket, "PUT", "vm.create", Some(&body))?;
        api_create.push(ms_since(start));
        let (_, event) = events
            .wait(|e| e["event"] == "reconfig" && e["action"] == "create" && e["vm"] == *id)?;
        create.push(f64_of(&event, "tiers_ms")?);
        host_create.push(f64_of(&event, "total_ms")?);

        let start = Instant::now();
        call_ok(&host.socket, "PUT", "vm.delete", Some(&json!({"id": id})))?;
        api_delete.push(ms_since(start));
        let (_, event) = events
            .wait(|e| e["event"] == "reconfig" && e["action"] == "delete" && e["vm"] == *id)?;
        delete.push(f64_of(&event, "tiers_ms")?);
    }
    let (api_create, api_delete, host_create) = (
        Samples(api_create),
        Samples(api_delete),
        Samples(host_create),
    );
    emit(
        "reconfig_create_ms",
        &Samples(create),
        kind,
        json!({"goal": GOAL_RECONFIG,
               "api_create_ms": round3(api_create.median()),
               "host_create_total_ms": round3(host_create.median()),
               "note": "tiers_ms: Attach sent -> the switch micro-VM applied it (the edge gets \
                        the signed record at the same moment); api_create_ms is the whole \
                        vm.create call, which reads and unpacks the tenant kernel and builds the VM"}),
    );
    emit(
        "reconfig_delete_ms",
        &Samples(delete),
        kind,
        json!({"goal": GOAL_RECONFIG,
               "api_delete_ms": round3(api_delete.median()),
               "note": "tiers_ms: FlushTenant sent -> the switch micro-VM applied it; \
                        api_delete_ms is the whole vm.delete call"}),
    );
    Ok(())
}

struct Migration {
    tiers_ms: f64,
    downtime_ms: f64,
    capture_ms: f64,
    restore_ms: f64,
    pages_sent: f64,
    pages_total: f64,
    /// Pre-copy was used (asked for, and this KVM logs dirty pages).
    precopy: bool,
    /// Bytes of each pre-copy round, then of the final step (during the pause).
    round_bytes: Vec<u64>,
    final_bytes: f64,
    final_pages: f64,
}

/// Moves tenant `id` from `from` to `to` over TCP and reads the figures of both sides.
fn migrate(
    from: &HostProc,
    to: &HostProc,
    to_events: &Events,
    id: &str,
    precopy: bool,
) -> Result<Migration> {
    let url = format!("tcp:127.0.0.1:{}", vigil_tests::outside::free_tcp_port()?);
    call_ok(
        &to.socket,
        "PUT",
        "vm.receive-migration",
        Some(&json!({ "receiver_url": url })),
    )?;
    let reply = call_ok(
        &from.socket,
        "PUT",
        "vm.send-migration",
        Some(&json!({"id": id, "destination_url": url, "precopy": precopy})),
    )?;
    let (_, event) = to_events.wait(|e| e["event"] == "migrated_in" && e["vm"] == *id)?;
    if reply["transport"] != "tcp" {
        return Err(format!("not over TCP: {reply}").into());
    }
    Ok(Migration {
        tiers_ms: f64_of(&event, "tiers_ms")?,
        downtime_ms: f64_of(&reply, "downtime_ms")?,
        capture_ms: f64_of(&reply, "capture_ms")?,
        restore_ms: f64_of(&reply, "target_restore_ms")?,
        pages_sent: f64_of(&reply, "pages_sent")?,
        pages_total: f64_of(&reply, "pages_total")?,
        precopy: reply["precopy"] == true,
        round_bytes: reply["rounds"]
            .as_array()
            .map(|r| r.iter().filter_map(|r| r["bytes"].as_u64()).collect())
            .unwrap_or_default(),
        final_bytes: f64_of(&reply, "final_bytes")?,
        final_pages: f64_of(&reply, "final_pages")?,
    })
}

fn bench_migration(
    a: &HostProc,
    elf: &Path,
    root: &Path,
    tenant_dir: &Path,
    rounds: usize,
    kind: &str,
) -> Result<()> {
    let b = start_host("cbench-b", elf, root)?;
    let (a_events, b_events) = (subscribe(&a.socket)?, subscribe(&b.socket)?);
    let id = "mig";
    let mut tenant = spec(tenant_dir, id, 250, &idle_policy());
    tenant["memory_mib"] = json!(MIGRATE_MIB);
    call_ok(&a.socket, "PUT", "vm.create", Some(&tenant))?;
    call_ok(&a.socket, "PUT", "vm.boot", Some(&json!({ "id": id })))?;
    // Not a synchronisation: the tenant is meant to be running guest code when it moves.
    std::thread::sleep(MIGRATE_WARMUP);
    // Pre-copy and stop-and-copy (the baseline) alternate, there and back, in the same run.
    let (mut precopy, mut stop_copy) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        precopy.push(migrate(a, &b, &b_events, id, true)?);
        precopy.push(migrate(&b, a, &a_events, id, true)?);
        stop_copy.push(migrate(a, &b, &b_events, id, false)?);
        stop_copy.push(migrate(&b, a, &a_events, id, false)?);
    }
    // It is back on A; A goes away at the end, with it.
    let _ = call(&a.socket, "PUT", "vm.delete", Some(&json!({ "id": id })));
    let field =
        |runs: &[Migration], f: fn(&Migration) -> f64| Samples(runs.iter().map(f).collect());
    let all: Vec<&Migration> = precopy.iter().chain(&stop_copy).collect();
    emit(
        "reconfig_migrate_ms",
        &Samples(all.iter().map(|m| m.tiers_ms).collect()),
        kind,
        json!({"goal": GOAL_RECONFIG,
               "note": "the target's switch micro-VM took the tenant's port, address and \
                        adopted verdicts (tiers_ms of migrated_in), before its vCPUs resumed"}),
    );
    let baseline = field(&stop_copy, |m| m.downtime_ms);
    let used = precopy.iter().all(|m| m.precopy);
    emit(
        "migration_downtime_ms",
        &field(&precopy, |m| m.downtime_ms),
        kind,
        json!({"transport": "tcp", "precopy": used,
               "goal": "<= 20",
               "baseline_stop_and_copy_ms": round3(baseline.median()),
               "baseline_stop_and_copy_p90_ms": round3(baseline.percentile(90.0)),
               "baseline_pages_sent": field(&stop_copy, |m| m.pages_sent).median(),
               "rounds": field(&precopy, |m| m.round_bytes.len() as f64).median(),
               "bytes_per_round": precopy.iter().map(|m| m.round_bytes.clone()).collect::<Vec<_>>(),
               "final_pages": field(&precopy, |m| m.final_pages).median(),
               "final_bytes": field(&precopy, |m| m.final_bytes).median(),
               "capture_ms": round3(field(&precopy, |m| m.capture_ms).median()),
               "target_restore_ms": round3(field(&precopy, |m| m.restore_ms).median()),
               "pages_sent": field(&precopy, |m| m.pages_sent).median(),
               "pages_total": field(&precopy, |m| m.pages_total).median(),
               "memory_mib": MIGRATE_MIB,
               "note": "source pause -> the target runs it; two host processes on one machine \
                        over TCP (loopback), authenticated, HMAC-sealed frames; pre-copy runs \
                        alternate with stop-and-copy runs (the baseline) in the same run; a \
                        tenant mid-boot (no TCP connection: tests/tests/cloud.rs migrates a \
                        booted one with an open connection)"}),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The edge

fn random_key_hex() -> Result<String> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(hex::encode(key))
}

fn bench_edge(elf: &Path, root: &Path, rounds: usize, kind: &str) -> Result<()> {
    let dir = root.join("edge");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let netns =
        Namespace::try_with_tap(&format!("{NETNS_PREFIX}{}", std::process::id()), "vcbtap0")?;
    let key_hex = random_key_hex()?;
    let key_file = dir.join("key");
    std::fs::write(&key_file, &key_hex).map_err(|e| format!("{}: {e}", key_file.display()))?;
    let socket = dir.join("api.sock");
    let control = format!("127.0.0.1:{}", free_udp_port()?);
    let args: Vec<String> = vec![
        "edge".into(),
        "--elf".into(),
        elf.display().to_string(),
        "--outside".into(),
        format!("tap=vcbtap0,netns={}", netns.name),
        "--cloud".into(),
        format!("local=127.0.0.1:{}", free_udp_port()?),
        "--control".into(),
        control.clone(),
        "--key-file".into(),
        key_file.display().to_string(),
        "--api-socket".into(),
        socket.display().to_string(),
        "--name".into(),
        "cbench-edge".into(),
    ];
    let mut edge = start_vigil("edge", &args, "verdict channel on")?;
    edge.shutdown_with(&socket, "edge.shutdown");
    let events = subscribe(&socket)?;
    let key = edge::channel::key_from_hex(&key_hex).map_err(|e| e.to_string())?;
    let sender = VerdictLink::connect(control.as_str(), key, 7, 1, LinkConfig::default())
        .map_err(|e| format!("verdict channel to {control}: {e}"))?;
    let tenant = 42;
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[10, 88, 2, 2]);
    let mut remote = [0u8; 16];
    remote[..4].copy_from_slice(&[192, 0, 2, 1]);
    let mut record_seq = 1u64;
    let mut records = |port: u16| {
        let attach = VerdictRepr::attach(tenant, record_seq, None, Some((IpVersion::V4, addr)));
        let rule = Rule::egress_to(IpVersion::V4, Protocol::Tcp, remote, port);
        let add = VerdictRepr::add(tenant, record_seq + 1, 0, rule);
        record_seq += 2;
        [attach.to_bytes(), add.to_bytes()]
    };
    // The edge micro-VM may still be booting: the first datagram counts once it was applied.
    let warm_deadline = Instant::now() + START_TIMEOUT;
    loop {
        let seq = sender
            .send(&records(1), Class::Verdict)
            .map_err(|e| format!("send to the edge: {e}"))?
            .first_seq;
        let (_, event) = events.wait(|e| e["event"] == "edge_verdicts" && e["seq"] == seq)?;
        if event["applied"] == true {
            break;
        }
        if Instant::now() > warm_deadline {
            return Err("the edge micro-VM never took a record".into());
        }
    }
    let (mut apply, mut end_to_end) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let batch = records(1000 + (i % 60000) as u16);
        let start = Instant::now();
        let seq = sender
            .send(&batch, Class::Verdict)
            .map_err(|e| format!("send to the edge: {e}"))?
            .first_seq;
        let (arrived, event) = events.wait(|e| e["event"] == "edge_verdicts" && e["seq"] == seq)?;
        if event["applied"] != true {
            return Err(format!("the edge did not apply datagram {seq}: {event}").into());
        }
        apply.push(f64_of(&event, "apply_ms")?);
        end_to_end.push((arrived - start).as_secs_f64() * 1e3);
    }
    let end_to_end = Samples(end_to_end);
    emit(
        "edge_reconfig_ms",
        &Samples(apply),
        kind,
        json!({"goal": GOAL_EDGE,
               "end_to_end_ms": round3(end_to_end.median()),
               "end_to_end_max_ms": round3(end_to_end.max()),
               "records_per_datagram": 2,
               "note": "apply_ms: signed datagram received and verified -> the edge micro-VM \
                        took the Attach+Add records; end_to_end_ms: VerdictLink::send -> \
                        the edge_verdicts event read from the edge's API stream"}),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: control_bench FW_GUEST_ELF TENANT_DIR [ROUNDS]");
        return std::process::ExitCode::from(2);
    }
    let elf = PathBuf::from(&args[1]);
    let tenant_dir = PathBuf::from(&args[2]);
    let rounds: usize = match args.get(3).map(|r| r.parse()) {
        None => 20,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("control_bench: ROUNDS must be a positive number");
            return std::process::ExitCode::from(2);
        }
    };
    match run(&elf, &tenant_dir, rounds) {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("control_bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs every part; a part that fails is reported and the others still run. Returns how many
/// parts failed.
fn run(elf: &Path, tenant_dir: &Path, rounds: usize) -> Result<usize> {
    for file in [
        elf.to_path_buf(),
        tenant_dir.join("vmlinuz"),
        tenant_dir.join("initramfs.cpio"),
    ] {
        if !file.is_file() {
            return Err(format!("{} is missing", file.display()).into());
        }
    }
    let kind = match HostKind::detect() {
        HostKind::Emulating => "emulating",
        HostKind::Hardware => "hardware",
    };
    remove_stale();
    let root = TempDir::try_new(&format!("{DIR_PREFIX}run"))?;
    std::fs::write(
        root.path().join("migration-keys.json"),
        vigil_tests::workload::migration_keys_json(&["cbench-a", "cbench-b"]),
    )?;
    let mut failed = 0;
    let mut part = |name: &str, result: Result<()>| {
        if let Err(e) = result {
            eprintln!("control_bench: {name} failed: {e}");
            failed += 1;
        }
    };
    {
        let host = start_host("cbench-a", elf, root.path())?;
        part("api_latency", bench_api_latency(&host, kind));
        part("api_latency_loaded", bench_api_latency_loaded(&host, kind));
        part(
            "create/delete",
            bench_create_delete(&host, tenant_dir, rounds, kind),
        );
        // A migration round moves the tenant there and back (~1-3 s under emulation).
        let migrations = rounds.clamp(1, 5);
        part(
            "migration",
            bench_migration(&host, elf, root.path(), tenant_dir, migrations, kind),
        );
    }
    part("edge", bench_edge(elf, root.path(), rounds.max(20), kind));
    Ok(failed)
}
