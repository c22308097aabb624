//! The control-plane commands of the `vigil` CLI: `vigil host`, `vigil edge`, `vigil remote`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use edge::node::{Edge, EdgeConfig};
use vmm_api::http;
use vmm_core::net_config::NetConfig;
use vmm_host::{EdgeLinkConfig, Host, HostConfig};

/// How long `vigil remote` waits for an answer (vm.create builds the VM: reading and unpacking a
/// kernel, finding its symbols, can take a while on a cold cache).
const REMOTE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Args)]
pub struct HostArgs {
    /// The API socket to serve (cloud-hypervisor style REST API).
    #[arg(long)]
    api_socket: PathBuf,
    /// The fw-guest ELF booted as this host's switch tier.
    #[arg(long)]
    switch_elf: PathBuf,
    /// The switch's uplink: vxlan=EDGE:4789[,vni=N] (to an edge) or tap=NAME[,netns=NS].
    #[arg(long)]
    uplink: NetConfig,
    /// Tenant ports of the switch (1 to 7).
    #[arg(long, default_value_t = 4)]
    tenant_ports: usize,
    /// The edge's verdict channel (UDP address). Datagrams are signed with this host's own key
    /// from etcd (with --etcd), or with the edge's shared key (--edge-key-file).
    #[arg(long)]
    edge_control: Option<SocketAddr>,
    /// The channel's shared key: a file with at least 64 hex digits. Not with --etcd: there
    /// each host signs with its own key (`vigil cluster keys HOST`).
    #[arg(long, requires = "edge_control", conflicts_with = "etcd")]
    edge_key_file: Option<PathBuf>,
    /// This host's sender id on the edge channel (distinct per host).
    #[arg(long, default_value_t = 1)]
    host_id: u32,
    /// Host name in events.
    #[arg(long, default_value = "host")]
    name: String,
    /// Per-tenant files (policies, console logs). Default: next to the API socket.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Copy tenant consoles to stdout.
    #[arg(long)]
    console: bool,
    /// Keys of the hosts this one migrates with, its own (--name) included: a JSON file
    /// {"NAME": "64+ hex digits", ...}. Without it (and without --etcd, whose hosts' keys are
    /// used instead), migration is refused both ways.
    #[arg(long, conflicts_with = "etcd")]
    migration_keys: Option<PathBuf>,
    /// With --etcd: where this host takes tenants migrating in (tcp:ADDR:PORT, reachable from
    /// the other hosts). A tenant moved here in etcd from a live host then migrates live;
    /// without it, it is created here from its spec.
    #[arg(long, requires = "etcd")]
    migration_listen: Option<String>,
    #[command(flatten)]
    cluster: EtcdArgs,
}

/// Joining the cluster (`vigil cluster`): its etcd and this node's lease.
#[derive(Args)]
pub struct EtcdArgs {
    /// etcd endpoints (http://HOST:PORT, comma-separated): register in the cluster; a host runs
    /// the tenants assigned to it there, an edge fences hosts whose registration expires.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// The TTL of this node's lease in etcd (s): a host is taken for dead this long after its
    /// last heartbeat.
    #[arg(long, default_value_t = vmm_cluster::DEFAULT_LEASE_TTL_S)]
    etcd_lease_ttl: i64,
}

#[derive(Args)]
pub struct EdgeArgs {
    /// The fw-guest ELF, booted in the edge role.
    #[arg(long)]
    elf: PathBuf,
    /// The outside (internet) port: tap=NAME[,netns=NS].
    #[arg(long)]
    outside: NetConfig,
    /// The cloud port, where hosts' uplinks arrive: local=ADDR:4789[,vni=N].
    #[arg(long)]
    cloud: NetConfig,
    /// Where hosts send signed verdicts (UDP).
    #[arg(long)]
    control: SocketAddr,
    /// The channel's shared key (key id 0): a file with at least 64 hex digits. Optional with
    /// --etcd, where each registered host is held to its own keys; hosts without keys of their
    /// own may then still sign with this one.
    #[arg(long, required_unless_present = "etcd")]
    key_file: Option<PathBuf>,
    /// Serve the edge's API (edge.ping, edge.counters, metrics, events) here.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    #[arg(long, default_value = "edge")]
    name: String,
    #[arg(long)]
    console_log: Option<PathBuf>,
    #[command(flatten)]
    cluster: EtcdArgs,
}

#[derive(Args)]
pub struct RemoteArgs {
    /// The host's (or edge's) API socket.
    #[arg(long)]
    api_socket: PathBuf,
    #[command(subcommand)]
    action: RemoteAction,
}

#[derive(Subcommand)]
enum RemoteAction {
    /// GET vmm.ping
    Ping,
    /// PUT vmm.shutdown
    Shutdown,
    /// PUT vm.create with a JSON spec (see vmm/api/openapi.json, VmSpec)
    Create {
        /// The spec file, or - for standard input.
        spec: PathBuf,
    },
    /// PUT vm.boot
    Boot { id: String },
    /// GET vm.info
    Info { id: String },
    /// GET vm.list
    List,
    /// PUT vm.delete
    Delete { id: String },
    /// PUT vm.pause
    Pause { id: String },
    /// PUT vm.resume
    Resume { id: String },
    /// PUT vm.snapshot
    Snapshot { id: String, destination_url: String },
    /// PUT vm.restore
    Restore { source_url: String },
    /// PUT vm.send-migration (DESTINATION_URL: tcp:HOST:PORT)
    SendMigration {
        id: String,
        destination_url: String,
        /// Stop-and-copy: no pre-copy rounds.
        #[arg(long)]
        no_precopy: bool,
    },
    /// PUT vm.receive-migration (RECEIVER_URL: tcp:HOST:PORT to listen at)
    ReceiveMigration { receiver_url: String },
    /// GET vm.policy, or PUT it with --set FILE
    Policy {
        id: String,
        #[arg(long)]
        set: Option<PathBuf>,
    },
    /// GET events: print events as they happen, until interrupted
    Events,
    /// GET metrics (Prometheus text)
    Metrics,
    /// Any endpoint: METHOD PATH [BODY] (PATH after /api/v1/)
    Raw {
        method: String,
        path: String,
        body: Option<String>,
    },
}

fn load_key(path: &Path) -> Result<Vec<u8>, String> {
    edge::channel::load_key(path).map_err(|e| e.to_string())
}

fn serve_until_signalled(stop: &Arc<AtomicBool>) {
    // SIGTERM/SIGINT set the VMM's stop flag; mirror it into the server's.
    let stop = stop.clone();
    std::thread::spawn(move || loop {
        if vmm_core::vm::stop_signalled() {
            stop.store(true, Ordering::Release);
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    });
}

/// `debug`: the knobs `main` read, passed to every VM of the host.
/// The key a host signs its datagrams to the edge with, and its id: the shared key from
/// `--edge-key-file` (id 0), or this host's own current key from etcd (made if it has none).
fn edge_key(args: &HostArgs) -> Result<(u16, Vec<u8>), String> {
    if let Some(path) = &args.edge_key_file {
        return Ok((0, load_key(path)?));
    }
    if args.cluster.etcd.is_empty() {
        return Err(
            "--edge-control needs a key: --edge-key-file FILE, or --etcd (this host's own keys)"
                .into(),
        );
    }
    let joining = |e: vmm_cluster::ClusterError| format!("this host's keys in etcd: {e}");
    let store = vmm_cluster::Store::connect(&args.cluster.etcd).map_err(joining)?;
    let keys = store.ensure_host_keys(&args.name).map_err(joining)?;
    let set = keys.edge_keys().map_err(|e| {
        format!(
            "this host's keys in etcd are unusable: {e} (give it a new one: vigil cluster rotate-key {})",
            args.name
        )
    })?;
    let key = set
        .current_key()
        .ok_or_else(|| format!("this host's current key {} is not in etcd", set.current))?
        .to_vec();
    Ok((set.current, key))
}

pub fn host(args: HostArgs, debug: vmm_core::knobs::DebugKnobs) -> ExitCode {
    let edge = match args.edge_control {
        Some(control) => match edge_key(&args) {
            Ok((key_id, key)) => Some(EdgeLinkConfig {
                control,
                key,
                key_id,
                sender: args.host_id,
            }),
            Err(e) => {
                eprintln!("vigil host: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let migration_keys = match &args.migration_keys {
        Some(path) => match vmm_host::MigrationKeys::load(path) {
            Ok(keys) => keys,
            Err(e) => {
                eprintln!("vigil host: {e}");
                return ExitCode::from(2);
            }
        },
        None => vmm_host::MigrationKeys::default(),
    };
    let state_dir = args.state_dir.clone().unwrap_or_else(|| {
        let mut dir = args.api_socket.clone().into_os_string();
        dir.push(".d");
        PathBuf::from(dir)
    });
    let listener = match vmm_api::bind(&args.api_socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vigil host: {e}");
            return ExitCode::from(2);
        }
    };
    vmm_core::vm::stop_on_signals();
    let host = match Host::start(HostConfig {
        name: args.name.clone(),
        switch_elf: args.switch_elf,
        uplink: args.uplink,
        tenant_ports: args.tenant_ports,
        edge,
        state_dir,
        console_stdout: args.console,
        debug,
        migration_keys,
    }) {
        Ok(host) => host,
        Err(e) => {
            eprintln!("vigil host: {e}");
            let _ = std::fs::remove_file(&args.api_socket);
            return ExitCode::from(2);
        }
    };
    let mut agent = None;
    if !args.cluster.etcd.is_empty() {
        match vmm_cluster::HostAgent::start(
            host.clone(),
            vmm_cluster::AgentConfig {
                endpoints: args.cluster.etcd.clone(),
                name: args.name.clone(),
                sender: args.host_id,
                api_socket: Some(args.api_socket.display().to_string()),
                tenant_ports: args.tenant_ports,
                lease_ttl_s: args.cluster.etcd_lease_ttl,
                migration_url: args.migration_listen.clone(),
            },
        ) {
            Ok(a) => agent = Some(a),
            Err(e) => {
                eprintln!("vigil host: joining the cluster: {e}");
                host.shutdown();
                let _ = std::fs::remove_file(&args.api_socket);
                return ExitCode::from(2);
            }
        }
    }
    eprintln!(
        "vigil host: serving {} (try: vigil remote --api-socket {} ping)",
        args.api_socket.display(),
        args.api_socket.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    serve_until_signalled(&stop);
    vmm_api::serve(host.clone(), listener, stop);
    // Tenants first (their flushes reach the edge while this host is admitted), then the
    // registration.
    host.shutdown();
    drop(agent);
    let _ = std::fs::remove_file(&args.api_socket);
    ExitCode::SUCCESS
}

pub fn edge(args: EdgeArgs) -> ExitCode {
    let key = match args.key_file.as_deref().map(load_key).transpose() {
        Ok(key) => key,
        Err(e) => {
            eprintln!("vigil edge: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match args.api_socket.as_deref().map(vmm_api::bind).transpose() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vigil edge: {e}");
            return ExitCode::from(2);
        }
    };
    vmm_core::vm::stop_on_signals();
    let edge = match Edge::start(EdgeConfig {
        name: args.name,
        elf: args.elf,
        outside: args.outside,
        cloud: args.cloud,
        control: args.control,
        key,
        console_log: args.console_log,
    }) {
        Ok(edge) => edge,
        Err(e) => {
            eprintln!("vigil edge: {e}");
            return ExitCode::from(2);
        }
    };
    // Registered before the ready line, so whoever waits for it finds the edge in etcd.
    let mut watch = None;
    if !args.cluster.etcd.is_empty() {
        match vmm_cluster::EdgeWatch::start(
            edge.clone(),
            vmm_cluster::EdgeWatchConfig {
                endpoints: args.cluster.etcd.clone(),
                name: edge.name().to_string(),
                lease_ttl_s: args.cluster.etcd_lease_ttl,
            },
        ) {
            Ok(w) => watch = Some(w),
            Err(e) => {
                eprintln!("vigil edge: joining the cluster: {e}");
                edge.stop();
                return ExitCode::from(2);
            }
        }
    }
    eprintln!(
        "vigil edge: verdict channel on {}{}",
        edge.control_addr(),
        args.api_socket
            .as_ref()
            .map(|p| format!(", API on {}", p.display()))
            .unwrap_or_default()
    );
    let stop = Arc::new(AtomicBool::new(false));
    serve_until_signalled(&stop);
    match listener {
        Some(listener) => {
            // The server stops when the edge does (signal or edge.shutdown).
            let watcher = edge.clone();
            let watch_stop = stop.clone();
            std::thread::spawn(move || {
                while !watch_stop.load(Ordering::Acquire) && watcher.running() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                watcher.stop();
            });
            vmm_api::edge::serve(edge.clone(), listener);
        }
        None => {
            while !stop.load(Ordering::Acquire) && edge.running() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    drop(watch);
    edge.stop();
    if let Some(path) = &args.api_socket {
        let _ = std::fs::remove_file(path);
    }
    ExitCode::SUCCESS
}

pub fn remote(args: RemoteArgs) -> ExitCode {
    let socket = &args.api_socket;
    let (method, path, body): (&str, String, Option<Vec<u8>>) = match args.action {
        RemoteAction::Ping => ("GET", "vmm.ping".into(), None),
        RemoteAction::Shutdown => ("PUT", "vmm.shutdown".into(), None),
        RemoteAction::Create { spec } => {
            let text = if spec.as_os_str() == "-" {
                let mut text = Vec::new();
                let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut text);
                Ok(text)
            } else {
                std::fs::read(&spec)
            };
            match text {
                Ok(text) => ("PUT", "vm.create".into(), Some(text)),
                Err(e) => {
                    eprintln!("vigil remote: {}: {e}", spec.display());
                    return ExitCode::from(2);
                }
            }
        }
        RemoteAction::Boot { id } => ("PUT", "vm.boot".into(), Some(id_body(&id))),
        RemoteAction::Info { id } => ("GET", format!("vm.info?id={}", query(&id)), None),
        RemoteAction::List => ("GET", "vm.list".into(), None),
        RemoteAction::Delete { id } => ("PUT", "vm.delete".into(), Some(id_body(&id))),
        RemoteAction::Pause { id } => ("PUT", "vm.pause".into(), Some(id_body(&id))),
        RemoteAction::Resume { id } => ("PUT", "vm.resume".into(), Some(id_body(&id))),
        RemoteAction::Snapshot {
            id,
            destination_url,
        } => (
            "PUT",
            "vm.snapshot".into(),
            Some(json_body(
                serde_json::json!({"id": id, "destination_url": destination_url}),
            )),
        ),
        RemoteAction::Restore { source_url } => (
            "PUT",
            "vm.restore".into(),
            Some(json_body(serde_json::json!({"source_url": source_url}))),
        ),
        RemoteAction::SendMigration {
            id,
            destination_url,
            no_precopy,
        } => (
            "PUT",
            "vm.send-migration".into(),
            Some(json_body(serde_json::json!({"id": id,
                "destination_url": destination_url, "precopy": !no_precopy}))),
        ),
        RemoteAction::ReceiveMigration { receiver_url } => (
            "PUT",
            "vm.receive-migration".into(),
            Some(json_body(serde_json::json!({"receiver_url": receiver_url}))),
        ),
        RemoteAction::Policy { id, set: None } => {
            ("GET", format!("vm.policy?id={}", query(&id)), None)
        }
        RemoteAction::Policy {
            id,
            set: Some(file),
        } => {
            let policy: serde_json::Value = match std::fs::read_to_string(&file)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("vigil remote: policy {}: {e}", file.display());
                    return ExitCode::from(2);
                }
            };
            (
                "PUT",
                "vm.policy".into(),
                Some(json_body(serde_json::json!({"id": id, "policy": policy}))),
            )
        }
        RemoteAction::Events => return events(socket),
        RemoteAction::Metrics => ("GET", "metrics".into(), None),
        RemoteAction::Raw { method, path, body } => {
            let method: &'static str = match method.to_ascii_uppercase().as_str() {
                "GET" => "GET",
                "PUT" => "PUT",
                "POST" => "POST",
                "DELETE" => "DELETE",
                other => {
                    eprintln!("vigil remote: method {other:?}: use GET, PUT, POST or DELETE");
                    return ExitCode::from(2);
                }
            };
            (method, path, body.map(String::into_bytes))
        }
    };
    let full = format!("{}{}", vmm_api::API_PREFIX, path);
    match http::request(socket, method, &full, body.as_deref(), REMOTE_TIMEOUT) {
        Ok(response) => {
            let text = String::from_utf8_lossy(&response.body);
            let pretty = serde_json::from_slice::<serde_json::Value>(&response.body)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok());
            if (200..300).contains(&response.status) {
                if let Some(pretty) = pretty {
                    println!("{pretty}");
                } else if !text.is_empty() {
                    print!("{text}");
                }
                ExitCode::SUCCESS
            } else {
                let message = serde_json::from_slice::<serde_json::Value>(&response.body)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                    .unwrap_or_else(|| text.to_string());
                eprintln!(
                    "vigil remote: {method} {full}: {}: {message}",
                    response.status
                );
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("vigil remote: {e}");
            ExitCode::from(2)
        }
    }
}

fn events(socket: &Path) -> ExitCode {
    let path = format!("{}events", vmm_api::API_PREFIX);
    match http::stream(socket, &path, REMOTE_TIMEOUT) {
        Ok(chunks) => {
            for chunk in chunks {
                match chunk {
                    Ok(bytes) => {
                        use std::io::Write;
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&bytes);
                        let _ = out.flush();
                    }
                    Err(e) => {
                        eprintln!("vigil remote: event stream: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vigil remote: {e}");
            ExitCode::from(2)
        }
    }
}

fn id_body(id: &str) -> Vec<u8> {
    json_body(serde_json::json!({ "id": id }))
}

fn json_body(value: serde_json::Value) -> Vec<u8> {
    value.to_string().into_bytes()
}

/// Percent-encodes a query value.
fn query(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
