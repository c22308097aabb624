//! A cloud host: the switch-tier firewall micro-VM and the tenant VMs created on it through the
//! API, with the firewall tiers reconfigured as tenants come and go.
//!
//! - Create: the tenant's policy is compiled and its hooks are ready before its first
//!   instruction (they are programmed when its vCPUs start); it gets a free switch port, and an
//!   `Attach` record (port, address) goes to the switch ring and, signed, to the edge.
//! - Delete: the VM stops, then a `FlushTenant` record removes every verdict, conntrack entry,
//!   port and address of the tenant on both tiers; the port is free again.
//! - Policy replace: later calls follow the new policy; the tenant is flushed and re-attached, so
//!   nothing the old policy opened stays open.
//!
//! Owns: the tenant table and the switch. Must not: let one tenant's failure (bad config, a
//! crashed guest) take down the host or another tenant.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use trap_handler::policy::{Policy, PolicySpec};
use vigil_wire::boot::{Role, TENANT_UNASSIGNED};
use vigil_wire::verdict::{IpVersion, VerdictRepr, RECORD_LEN};

use vmm_core::host_kind::HostKind;
use vmm_core::introspect::{tenant_id, Introspection, VerdictSink};
use vmm_core::net_config::{parse_mac, NetConfig};
use vmm_core::run_control::RunControl;
use vmm_core::snapshot::{read_json, write_json, VmSnapshot};
use vmm_core::verdict_region::{wait_ready, FirewallCounters, VerdictRegion, READY_LIMIT};
use vmm_core::vm::{
    ConsoleConfig, LinkConfig, Payload, Vm, VmConfig, VmError, VmHandle, VmOutcome,
};

/// Most tenant ports a switch offers (the micro-VM serves 8 ports, one is the uplink).
pub const MAX_TENANT_PORTS: usize = 7;
/// How long a reconfiguration waits for the switch micro-VM to take its records.
const SWITCH_APPLY_LIMIT: Duration = Duration::from_secs(2);
/// How long a pause waits for the vCPUs to park.
const PAUSE_LIMIT: Duration = Duration::from_secs(5);
/// Longest VM id (it names files and appears in every event).
const MAX_ID_LEN: usize = 32;

/// Where a host sends the verdicts of its tenants for the edge, and how it signs them.
#[derive(Clone)]
pub struct EdgeLinkConfig {
    /// The edge's verdict channel (UDP).
    pub control: SocketAddr,
    pub key: Vec<u8>,
    /// This host's sender id on the channel (distinct per host).
    pub sender: u32,
}

#[derive(Clone)]
pub struct HostConfig {
    /// Names the host in events.
    pub name: String,
    /// The fw-guest ELF booted as the switch tier.
    pub switch_elf: PathBuf,
    /// The switch's uplink (a TAP, or VXLAN to the edge).
    pub uplink: NetConfig,
    pub tenant_ports: usize,
    pub edge: Option<EdgeLinkConfig>,
    /// Where the host keeps per-tenant files (policies, console logs).
    pub state_dir: PathBuf,
    /// Copy tenant consoles to stdout.
    pub console_stdout: bool,
}

/// A tenant VM as the API creates it (`PUT /api/v1/vm.create`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique on the host: letters, digits, `-`, `_`, `.`; at most 32.
    pub id: String,
    /// bzImage or vmlinux of the tenant kernel.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// The NIC's MAC address (unicast).
    pub mac: String,
    /// The tenant's IP address (the edge finds the tenant of a flow by it).
    pub ip: IpAddr,
    /// The tenant's application policy.
    pub policy: PolicySpec,
}

fn default_cmdline() -> String {
    "console=ttyS0 reboot=k panic=-1".into()
}
fn default_memory() -> u64 {
    256
}
fn default_vcpus() -> u8 {
    1
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Built, not booted.
    Created,
    Running,
    Paused,
    /// The guest stopped (powered off, crashed); `vm.info` says how.
    Shutdown,
}

/// What `vm.info` reports.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    pub id: String,
    pub state: VmState,
    pub tenant: u32,
    pub switch_port: usize,
    pub ip: IpAddr,
    pub mac: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub created_unix_ms: u64,
    /// How the guest stopped (state `shutdown`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
}

/// An API error: the HTTP status and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError {
    pub status: u16,
    pub message: String,
}

impl HostError {
    pub fn bad_request(message: impl Into<String>) -> HostError {
        HostError {
            status: 400,
            message: message.into(),
        }
    }
    pub fn not_found(id: &str) -> HostError {
        HostError {
            status: 404,
            message: format!("no VM with id {id:?} on this host (GET /api/v1/vm.list lists them)"),
        }
    }
    pub fn conflict(message: impl Into<String>) -> HostError {
        HostError {
            status: 409,
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> HostError {
        HostError {
            status: 500,
            message: message.into(),
        }
    }
    pub fn unavailable(message: impl Into<String>) -> HostError {
        HostError {
            status: 503,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

/// Verdicts to the edge: signed datagrams on the channel, numbered per host.
pub struct EdgeLink {
    socket: UdpSocket,
    config: EdgeLinkConfig,
    seq: Mutex<u64>,
    pub sent_records: AtomicU64,
    pub send_errors: AtomicU64,
}

impl EdgeLink {
    pub fn new(config: EdgeLinkConfig) -> std::io::Result<EdgeLink> {
        let bind: SocketAddr = if config.control.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(config.control)?;
        Ok(EdgeLink {
            socket,
            config,
            // Sequence numbers start above any this sender id used before (a restarted host
            // reuses its id; the edge's replay window remembers the highest number it saw).
            seq: Mutex::new(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_micros() as u64),
            ),
            sent_records: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
        })
    }

    /// Signs and sends records (in as many datagrams as they need).
    pub fn send(&self, records: &[[u8; RECORD_LEN]]) -> bool {
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut ok = true;
        for chunk in records.chunks(vigil_wire::auth::MAX_RECORDS) {
            *seq += 1;
            let mut datagram = [0u8; vigil_wire::auth::MAX_DATAGRAM];
            let sent = vigil_wire::auth::seal(
                &self.config.key,
                self.config.sender,
                *seq,
                now_ms,
                chunk,
                &mut datagram,
            )
            .ok()
            .and_then(|len| self.socket.send(&datagram[..len]).ok());
            if sent.is_some() {
                self.sent_records
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            } else {
                self.send_errors.fetch_add(1, Ordering::Relaxed);
                ok = false;
            }
        }
        ok
    }
}

/// A tenant's firewall tiers: its host's switch ring and the edge.
struct TenantTiers {
    switch: Arc<VerdictRegion>,
    edge: Option<Arc<EdgeLink>>,
}

impl VerdictSink for TenantTiers {
    fn deliver(&self, records: &[[u8; RECORD_LEN]]) -> bool {
        if let Some(edge) = &self.edge {
            edge.send(records);
        }
        self.switch.push(records).is_ok()
    }
}

struct Tenant {
    spec: VmSpec,
    tenant: u32,
    /// Index into the switch's tenant ports.
    slot: usize,
    state: VmState,
    /// Built and waiting for `vm.boot`.
    vm: Option<Vm>,
    stop: Arc<AtomicBool>,
    control: Arc<RunControl>,
    handle: VmHandle,
    introspection: Option<Arc<Introspection>>,
    thread: Option<JoinHandle<Result<VmOutcome, VmError>>>,
    stop_reason: Option<String>,
    created_unix_ms: u64,
}

/// Takes over a restored tenant's introspection state, if both ends have one; returns its
/// granted verdicts as `Adopt` records for this host's tiers.
fn import_introspection(
    introspection: &Option<Arc<Introspection>>,
    state: &Option<vmm_core::introspect::IntrospectionState>,
) -> Result<Vec<[u8; RECORD_LEN]>, String> {
    match (introspection, state) {
        (Some(i), Some(state)) => i.import_state(state),
        _ => Ok(Vec::new()),
    }
}

/// Runs a VM on its own thread.
fn start_vm(id: &str, vm: Vm) -> Result<JoinHandle<Result<VmOutcome, VmError>>, HostError> {
    std::thread::Builder::new()
        .name(format!("{id}-vm"))
        .spawn(move || vm.run(None))
        .map_err(|e| HostError::internal(format!("cannot start the VM thread: {e}")))
}

impl Tenant {
    /// A tenant entry for `vm`, which is kept to boot later (`Created`) or already running on
    /// `thread`.
    fn new(
        spec: VmSpec,
        tenant: u32,
        slot: usize,
        vm: &Vm,
        introspection: Option<Arc<Introspection>>,
        state: VmState,
    ) -> Tenant {
        Tenant {
            tenant,
            slot,
            state,
            stop: vm.stop_handle(),
            control: vm.run_control(),
            handle: vm.handle(),
            introspection,
            vm: None,
            thread: None,
            stop_reason: None,
            created_unix_ms: now_unix_ms(),
            spec,
        }
    }

    /// Notices a guest that stopped on its own.
    fn refresh(&mut self) {
        if matches!(self.state, VmState::Running | VmState::Paused)
            && self.thread.as_ref().is_some_and(|t| t.is_finished())
        {
            let outcome = self.thread.take().map(|t| t.join());
            self.stop_reason = Some(match outcome {
                Some(Ok(Ok(o))) => format!("{:?}", o.stop),
                Some(Ok(Err(e))) => e.to_string(),
                _ => "the VM thread panicked".into(),
            });
            self.state = VmState::Shutdown;
        }
    }

    fn info(&self) -> VmInfo {
        VmInfo {
            id: self.spec.id.clone(),
            state: self.state,
            tenant: self.tenant,
            switch_port: self.slot + 1,
            ip: self.spec.ip,
            mac: self.spec.mac.clone(),
            memory_mib: self.spec.memory_mib,
            vcpus: self.spec.vcpus,
            created_unix_ms: self.created_unix_ms,
            stop_reason: self.stop_reason.clone(),
        }
    }
}

/// Latest reconfiguration timings (ms), for the metrics endpoint and the benchmark.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReconfigTimes {
    pub create_ms: Option<f64>,
    pub delete_ms: Option<f64>,
    pub policy_ms: Option<f64>,
    /// Target host: from the migrated state's arrival to its switch having the tenant's port,
    /// address and adopted verdicts.
    pub migrate_ms: Option<f64>,
    /// Source host: from the pause to the target's word that the VM runs there.
    pub migration_downtime_ms: Option<f64>,
}

/// The migration protocol's first message (source to target).
#[derive(Serialize, Deserialize)]
struct MigrationHeader {
    version: u32,
    spec: VmSpec,
    source_host: String,
}

/// The target's answers.
#[derive(Serialize, Deserialize)]
struct MigrationReply {
    ok: bool,
    error: Option<String>,
    /// In the final reply: ms to restore the VM, ms until its switch took the tenant over.
    restore_ms: f64,
    tiers_ms: f64,
}

const MIGRATION_VERSION: u32 = 1;
/// Largest state document (vCPU and device state; RAM travels as pages).
const MAX_STATE_DOC: usize = 16 << 20;
/// How long a target waits for its source.
const MIGRATION_WAIT: Duration = Duration::from_secs(120);

/// `file:///dir` → the directory.
pub fn file_path(url: &str) -> Result<PathBuf, HostError> {
    match url.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        _ => Err(HostError::bad_request(format!(
            "{url:?} is not a file:///absolute/path URL"
        ))),
    }
}

/// `unix:/path` → the path.
pub fn unix_path(url: &str) -> Result<PathBuf, HostError> {
    match url.strip_prefix("unix:") {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        _ => Err(HostError::bad_request(format!(
            "{url:?} is not a unix:/absolute/path URL"
        ))),
    }
}

/// A gratuitous ARP from the tenant (who-has its own address, broadcast): sent on its behalf
/// after a migration so that the switch, the edge's VXLAN table and outside hosts learn where it
/// is now (virtio-net's GUEST_ANNOUNCE does this from inside the guest; the tenant's kernel was
/// not asked to).
fn announcement(mac: [u8; 6], ip: IpAddr) -> Option<Vec<u8>> {
    let IpAddr::V4(ip) = ip else {
        return None;
    };
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac);
    // EtherType ARP; htype Ethernet, ptype IPv4, hlen 6, plen 4, op request (RFC 826).
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip.octets());
    Some(frame)
}

struct SwitchTier {
    region: Arc<VerdictRegion>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<Result<VmOutcome, VmError>>>>,
    /// The tenant end of each port's link, and who holds the port.
    ports: Mutex<Vec<(LinkConfig, Option<String>)>>,
}

pub struct Host {
    config: HostConfig,
    kind: HostKind,
    switch: SwitchTier,
    edge: Option<Arc<EdgeLink>>,
    tenants: Mutex<BTreeMap<String, Tenant>>,
    started: Instant,
    /// Sequence numbers of the host's own records (Attach, FlushTenant).
    control_seq: AtomicU64,
    times: Mutex<ReconfigTimes>,
    shutdown: Arc<AtomicBool>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !id.starts_with('.')
}

fn ip_fields(ip: IpAddr) -> (IpVersion, [u8; 16]) {
    let mut bytes = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (IpVersion::V4, bytes)
        }
        IpAddr::V6(v6) => (IpVersion::V6, v6.octets()),
    }
}

impl Host {
    /// Boots the switch micro-VM and starts serving tenants.
    pub fn start(config: HostConfig) -> Result<Arc<Host>, String> {
        if config.tenant_ports == 0 || config.tenant_ports > MAX_TENANT_PORTS {
            return Err(format!(
                "a host offers 1 to {MAX_TENANT_PORTS} tenant ports, not {}",
                config.tenant_ports
            ));
        }
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            format!(
                "cannot create the state directory {}: {e}",
                config.state_dir.display()
            )
        })?;
        let kind = HostKind::detect();
        let mut ports = Vec::new();
        let mut switch_ends = Vec::new();
        for slot in 0..config.tenant_ports {
            // Locally administered MACs for the switch side of each port (never seen on the wire:
            // the switch forwards frames, it does not originate them).
            let mac = [0x02, 0x56, 0x47, 0, 0, slot as u8 + 1];
            let (tenant_end, switch_end) = LinkConfig::pair(TENANT_UNASSIGNED, mac)
                .map_err(|e| format!("cannot create the links of the switch ports: {e}"))?;
            ports.push((tenant_end, None));
            switch_ends.push(switch_end);
        }
        let switch_config = VmConfig {
            name: format!("{}-switch", config.name),
            mem_mib: 32,
            vcpus: 1,
            payload: Payload::MicroVm {
                elf: config.switch_elf.clone(),
                role: Role::Switch,
                verdicts: Vec::new(),
            },
            console: ConsoleConfig {
                log: Some(config.state_dir.join("switch.console")),
                stdout: false,
                markers: Vec::new(),
            },
            nets: vec![NetConfig {
                tenant: 0,
                ..config.uplink.clone()
            }],
            policy: None,
            links: switch_ends,
        };
        let switch_vm =
            Vm::create(&switch_config, kind).map_err(|e| format!("the switch micro-VM: {e}"))?;
        let region = switch_vm
            .verdict_region()
            .ok_or("the switch micro-VM has no verdict region")?;
        let stop = switch_vm.stop_handle();
        let thread = std::thread::Builder::new()
            .name("switch".into())
            .spawn(move || switch_vm.run(None))
            .map_err(|e| format!("cannot start the switch thread: {e}"))?;
        // Serve only once the switch applies records at once (it formats its counters block
        // when its tables and ports are up).
        if !wait_ready(&region, &thread) {
            stop.store(true, Ordering::Release);
            let _ = thread.join();
            return Err(format!(
                "the switch micro-VM did not come up within {} s (its console: {})",
                READY_LIMIT.as_secs(),
                config.state_dir.join("switch.console").display()
            ));
        }
        let edge = match &config.edge {
            Some(edge) => Some(Arc::new(EdgeLink::new(edge.clone()).map_err(|e| {
                format!("the verdict channel to the edge at {}: {e}", edge.control)
            })?)),
            None => None,
        };
        let host = Arc::new(Host {
            kind,
            switch: SwitchTier {
                region,
                stop,
                thread: Mutex::new(Some(thread)),
                ports: Mutex::new(ports),
            },
            edge,
            tenants: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
            control_seq: AtomicU64::new(1),
            times: Mutex::new(ReconfigTimes::default()),
            shutdown: Arc::new(AtomicBool::new(false)),
            config,
        });
        vmm_core::events::bus().emit(
            "host_started",
            &serde_json::json!({
                "host": host.config.name,
                "kvm": kind.to_string(),
                "tenant_ports": host.config.tenant_ports,
                "uplink": host.config.uplink.backend.to_string(),
                "edge": host.config.edge.as_ref().map(|e| e.control.to_string()),
            }),
        );
        Ok(host)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Set once `vmm.shutdown` ran: the server stops.
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    fn tenants(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Tenant>> {
        self.tenants.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_control_seq(&self) -> u64 {
        self.control_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The switch's Attach: the tenant is behind switch port `slot + 1` (device 0 is the uplink)
    /// and owns `ip`.
    fn switch_attach(&self, tenant: u32, slot: usize, ip: IpAddr) -> [u8; RECORD_LEN] {
        VerdictRepr::attach(
            tenant,
            self.next_control_seq(),
            Some((slot + 1) as u16),
            Some(ip_fields(ip)),
        )
        .to_bytes()
    }

    /// The edge's Attach: the tenant owns `ip` (the edge has no port per tenant).
    fn edge_attach(&self, tenant: u32, ip: IpAddr) -> [u8; RECORD_LEN] {
        VerdictRepr::attach(tenant, self.next_control_seq(), None, Some(ip_fields(ip))).to_bytes()
    }

    fn flush_record(&self, tenant: u32) -> [u8; RECORD_LEN] {
        VerdictRepr::flush_tenant(tenant, self.next_control_seq()).to_bytes()
    }

    /// Sends control records to the edge (signed; it applies them within milliseconds) and to
    /// the switch, and waits until the switch took them. Returns the milliseconds until the
    /// switch had applied them.
    fn reconfigure(
        &self,
        switch: &[[u8; RECORD_LEN]],
        edge: &[[u8; RECORD_LEN]],
    ) -> Result<f64, HostError> {
        let started = Instant::now();
        if let (Some(link), false) = (&self.edge, edge.is_empty()) {
            link.send(edge);
        }
        let records = switch;
        let position = self.switch.region.push_tracked(records).map_err(|e| {
            HostError::unavailable(format!(
                "the switch's verdict ring refused the update: {e:?}"
            ))
        })?;
        if !self
            .switch
            .region
            .wait_consumed(position, SWITCH_APPLY_LIMIT)
        {
            return Err(HostError::unavailable(format!(
                "the switch micro-VM did not take the update within {} s (is it running? see {})",
                SWITCH_APPLY_LIMIT.as_secs(),
                self.config.state_dir.join("switch.console").display()
            )));
        }
        Ok(started.elapsed().as_secs_f64() * 1e3)
    }

    /// Records a reconfiguration's time (the switch had applied it after `tiers_ms`) in the
    /// field `slot` picks, and reports it as a `reconfig` event with `details`.
    fn reconfigured(
        &self,
        slot: impl FnOnce(&mut ReconfigTimes) -> &mut Option<f64>,
        id: &str,
        tiers_ms: f64,
        mut details: serde_json::Value,
    ) {
        *slot(&mut self.times.lock().unwrap_or_else(|p| p.into_inner())) = Some(tiers_ms);
        if let Some(details) = details.as_object_mut() {
            details.insert("tiers_ms".into(), tiers_ms.into());
        }
        self.emit("reconfig", id, details);
    }

    fn emit(&self, kind: &str, id: &str, extra: serde_json::Value) {
        let mut body = serde_json::json!({"host": self.config.name, "vm": id});
        if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        vmm_core::events::bus().emit(kind, &body);
    }

    /// `vm.create`: builds the VM (not booted), plugs it into a switch port, opens nothing yet.
    pub fn create(&self, spec: VmSpec) -> Result<VmInfo, HostError> {
        let started = Instant::now();
        let (vm, introspection, tenant, slot, _mac) = self.prepare(&spec)?;
        let release_port = || {
            self.switch.ports.lock().unwrap_or_else(|p| p.into_inner())[slot].1 = None;
        };
        // The tiers learn the tenant's port and address before it can send anything.
        let applied = match self.reconfigure(
            &[self.switch_attach(tenant, slot, spec.ip)],
            &[self.edge_attach(tenant, spec.ip)],
        ) {
            Ok(ms) => ms,
            Err(e) => {
                release_port();
                return Err(e);
            }
        };
        let mut entry = Tenant::new(spec, tenant, slot, &vm, introspection, VmState::Created);
        entry.vm = Some(vm);
        let info = entry.info();
        let mut tenants = self.tenants();
        tenants.insert(entry.spec.id.clone(), entry);
        drop(tenants);
        let total = started.elapsed().as_secs_f64() * 1e3;
        self.reconfigured(
            |t| &mut t.create_ms,
            &info.id,
            applied,
            serde_json::json!({"action": "create", "tenant": tenant, "switch_port": slot + 1,
                "ip": info.ip, "total_ms": total}),
        );
        Ok(info)
    }

    fn build(
        &self,
        spec: &VmSpec,
        mac: [u8; 6],
        tenant: u32,
        slot: usize,
    ) -> Result<(Vm, Option<Arc<Introspection>>), HostError> {
        let policy_path = self
            .config
            .state_dir
            .join(format!("{}.policy.json", spec.id));
        let text = serde_json::to_string_pretty(&spec.policy)
            .map_err(|e| HostError::internal(e.to_string()))?;
        std::fs::write(&policy_path, text).map_err(|e| {
            HostError::internal(format!("cannot write {}: {e}", policy_path.display()))
        })?;
        let link = {
            let ports = self.switch.ports.lock().unwrap_or_else(|p| p.into_inner());
            LinkConfig {
                tenant,
                mac,
                ..ports[slot].0.clone()
            }
        };
        // Frames a previous tenant left in the port's socket are not this tenant's.
        let mut stale = [0u8; 2048];
        while link.link.recv(&mut stale).is_ok() {}
        let config = VmConfig {
            name: spec.id.clone(),
            mem_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            payload: Payload::Linux {
                kernel: spec.kernel.clone(),
                initramfs: spec.initramfs.clone(),
                cmdline: spec.cmdline.clone(),
            },
            console: ConsoleConfig {
                log: Some(self.config.state_dir.join(format!("{}.console", spec.id))),
                stdout: self.config.console_stdout,
                markers: Vec::new(),
            },
            nets: Vec::new(),
            policy: Some(policy_path),
            links: vec![link],
        };
        let vm = Vm::create(&config, self.kind).map_err(|e| match e {
            VmError::ReadFile { .. } | VmError::KernelImage { .. } | VmError::BadMemorySize(_) => {
                HostError::bad_request(e.to_string())
            }
            other => HostError::internal(other.to_string()),
        })?;
        let introspection = vm.introspection();
        if let Some(i) = &introspection {
            i.connect_tiers(Arc::new(TenantTiers {
                switch: self.switch.region.clone(),
                edge: self.edge.clone(),
            }));
        }
        Ok((vm, introspection))
    }

    /// `vm.boot`: starts a created VM's vCPUs.
    pub fn boot(&self, id: &str) -> Result<VmInfo, HostError> {
        let mut tenants = self.tenants();
        let t = tenants
            .get_mut(id)
            .ok_or_else(|| HostError::not_found(id))?;
        t.refresh();
        let Some(vm) = t.vm.take() else {
            return Err(HostError::conflict(format!(
                "VM {id:?} is {:?}; only a created VM boots",
                t.state
            )));
        };
        t.thread = Some(start_vm(id, vm)?);
        t.state = VmState::Running;
        let info = t.info();
        drop(tenants);
        self.emit("vm_booted", id, serde_json::json!({}));
        Ok(info)
    }

    pub fn info(&self, id: &str) -> Result<VmInfo, HostError> {
        let mut tenants = self.tenants();
        let t = tenants
            .get_mut(id)
            .ok_or_else(|| HostError::not_found(id))?;
        t.refresh();
        Ok(t.info())
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let mut tenants = self.tenants();
        tenants
            .values_mut()
            .map(|t| {
                t.refresh();
                t.info()
            })
            .collect()
    }

    pub fn pause(&self, id: &str) -> Result<VmInfo, HostError> {
        self.transition(
            id,
            VmState::Running,
            "pauses",
            VmState::Paused,
            "vm_paused",
            |t| {
                t.control
                    .pause(PAUSE_LIMIT)
                    .map_err(|e| HostError::internal(format!("pause: {e}")))
            },
        )
    }

    pub fn resume(&self, id: &str) -> Result<VmInfo, HostError> {
        self.transition(
            id,
            VmState::Paused,
            "resumes",
            VmState::Running,
            "vm_resumed",
            |t| {
                t.control.resume();
                Ok(())
            },
        )
    }

    /// Moves VM `id` from state `from` to `to` by `action`: 404 for an unknown VM, 409 in any
    /// other state; an event `event` on success.
    fn transition(
        &self,
        id: &str,
        from: VmState,
        verb: &str,
        to: VmState,
        event: &str,
        action: impl FnOnce(&mut Tenant) -> Result<(), HostError>,
    ) -> Result<VmInfo, HostError> {
        let mut tenants = self.tenants();
        let t = tenants
            .get_mut(id)
            .ok_or_else(|| HostError::not_found(id))?;
        t.refresh();
        if t.state != from {
            return Err(HostError::conflict(format!(
                "VM {id:?} is {:?}; only a {} VM {verb}",
                t.state,
                format!("{from:?}").to_lowercase()
            )));
        }
        action(t)?;
        t.state = to;
        let info = t.info();
        drop(tenants);
        self.emit(event, id, serde_json::json!({}));
        Ok(info)
    }

    /// `vm.delete`: stops the VM (whatever its state) and removes every trace of it from both
    /// tiers.
    pub fn delete(&self, id: &str) -> Result<(), HostError> {
        let started = Instant::now();
        let t = self
            .tenants()
            .remove(id)
            .ok_or_else(|| HostError::not_found(id))?;
        self.stop_tenant(t.stop.clone(), &t.control, t.thread);
        let flush = self.flush_record(t.tenant);
        let applied = self.reconfigure(&[flush], &[flush]);
        {
            let mut ports = self.switch.ports.lock().unwrap_or_else(|p| p.into_inner());
            ports[t.slot].1 = None;
        }
        let applied = applied?;
        self.reconfigured(
            |t| &mut t.delete_ms,
            id,
            applied,
            serde_json::json!({"action": "delete", "tenant": t.tenant,
                "total_ms": started.elapsed().as_secs_f64() * 1e3}),
        );
        Ok(())
    }

    fn stop_tenant(
        &self,
        stop: Arc<AtomicBool>,
        control: &RunControl,
        thread: Option<JoinHandle<Result<VmOutcome, VmError>>>,
    ) {
        stop.store(true, Ordering::Release);
        control.resume();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    pub fn policy(&self, id: &str) -> Result<PolicySpec, HostError> {
        let tenants = self.tenants();
        let t = tenants.get(id).ok_or_else(|| HostError::not_found(id))?;
        Ok(t.introspection
            .as_ref()
            .map_or_else(|| t.spec.policy.clone(), |i| i.policy_spec()))
    }

    /// Replaces a tenant's policy: later calls follow it, and whatever the old one opened is
    /// closed on both tiers (flush, then re-attach).
    pub fn replace_policy(&self, id: &str, spec: PolicySpec) -> Result<(), HostError> {
        Policy::compile(&spec).map_err(|e| HostError::bad_request(format!("policy: {e}")))?;
        let (tenant, slot, ip) = {
            let mut tenants = self.tenants();
            let t = tenants
                .get_mut(id)
                .ok_or_else(|| HostError::not_found(id))?;
            if let Some(i) = &t.introspection {
                i.replace_policy(spec.clone())
                    .map_err(|e| HostError::bad_request(format!("policy: {e}")))?;
            }
            t.spec.policy = spec;
            (t.tenant, t.slot, t.spec.ip)
        };
        let flush = self.flush_record(tenant);
        let applied = self.reconfigure(
            &[flush, self.switch_attach(tenant, slot, ip)],
            &[flush, self.edge_attach(tenant, ip)],
        )?;
        self.reconfigured(
            |t| &mut t.policy_ms,
            id,
            applied,
            serde_json::json!({"action": "policy", "tenant": tenant}),
        );
        Ok(())
    }

    /// `vm.send-migration`: moves a running VM to the host listening at `url`: pause, send its
    /// state and RAM, and once the target runs it, drop it here (the switch forgets it; the edge
    /// keeps its verdicts and flows, which the tenant goes on using from the target). On any
    /// failure before the target runs it, the VM resumes here and nothing is lost.
    pub fn send_migration(&self, id: &str, url: &str) -> Result<serde_json::Value, HostError> {
        let path = unix_path(url)?;
        let (spec, handle, introspection) = {
            let mut tenants = self.tenants();
            let t = tenants
                .get_mut(id)
                .ok_or_else(|| HostError::not_found(id))?;
            t.refresh();
            if t.state != VmState::Running {
                return Err(HostError::conflict(format!(
                    "VM {id:?} is {:?}; only a running VM migrates",
                    t.state
                )));
            }
            // Paused from here on: no other action may touch it meanwhile.
            t.state = VmState::Paused;
            (t.spec.clone(), t.handle.clone(), t.introspection.clone())
        };
        let set_state = |state| {
            if let Some(t) = self.tenants().get_mut(id) {
                t.state = state;
            }
        };
        let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                set_state(VmState::Running);
                return Err(HostError::bad_request(format!(
                    "cannot reach the target at {}: {e} (did it run vm.receive-migration?)",
                    path.display()
                )));
            }
        };
        let _ = stream.set_read_timeout(Some(MIGRATION_WAIT));
        let failed = |e: String, resume: bool| {
            if resume {
                handle.resume_after_capture();
            }
            set_state(VmState::Running);
            self.emit(
                "migration_failed",
                id,
                serde_json::json!({"to": url, "error": e}),
            );
            HostError::internal(format!(
                "migration of {id:?} to {url}: {e}; the VM runs on here"
            ))
        };
        let header = MigrationHeader {
            version: MIGRATION_VERSION,
            spec: spec.clone(),
            source_host: self.config.name.clone(),
        };
        if let Err(e) = write_json(&mut stream, &header) {
            return Err(failed(format!("sending the header: {e}"), false));
        }
        match read_json::<MigrationReply>(&mut stream, 1 << 16) {
            Ok(reply) if reply.ok => {}
            Ok(reply) => {
                return Err(failed(
                    format!("the target refused: {}", reply.error.unwrap_or_default()),
                    false,
                ))
            }
            Err(e) => return Err(failed(format!("no answer from the target: {e}"), false)),
        }
        let paused = Instant::now();
        let snapshot = match handle.capture(PAUSE_LIMIT) {
            Ok(s) => s,
            Err(e) => {
                // Some vCPUs may have parked: let them go on.
                handle.control().resume();
                return Err(failed(format!("capturing the VM: {e}"), false));
            }
        };
        let captured_ms = paused.elapsed().as_secs_f64() * 1e3;
        let introspection_state = introspection.as_ref().map(|i| i.export_state());
        let sent = (|| -> std::io::Result<(u64, u64)> {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut stream);
            write_json(&mut out, &snapshot)?;
            let pages = vmm_core::snapshot::write_memory(handle.memory(), &mut out)?;
            write_json(&mut out, &introspection_state)?;
            std::io::Write::flush(&mut out)?;
            Ok(pages)
        })();
        let (pages_sent, pages_total) = match sent {
            Ok(p) => p,
            Err(e) => return Err(failed(format!("sending the state: {e}"), true)),
        };
        let reply = match read_json::<MigrationReply>(&mut stream, 1 << 16) {
            Ok(r) if r.ok => r,
            Ok(r) => {
                return Err(failed(
                    format!(
                        "the target could not restore it: {}",
                        r.error.unwrap_or_default()
                    ),
                    true,
                ))
            }
            Err(e) => return Err(failed(format!("no word from the target: {e}"), true)),
        };
        let downtime_ms = paused.elapsed().as_secs_f64() * 1e3;
        // The target runs it: it is gone from here.
        let t = self.tenants().remove(id);
        if let Some(t) = t {
            self.stop_tenant(t.stop.clone(), &t.control, t.thread);
            // The switch here forgets the tenant; the edge must not (the flows live on).
            let flush = self.flush_record(t.tenant);
            let applied = self.reconfigure(&[flush], &[]);
            self.switch.ports.lock().unwrap_or_else(|p| p.into_inner())[t.slot].1 = None;
            if let Err(e) = applied {
                self.emit(
                    "reconfig_failed",
                    id,
                    serde_json::json!({"error": e.message}),
                );
            }
        }
        self.times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .migration_downtime_ms = Some(downtime_ms);
        let report = serde_json::json!({
            "to": url,
            "downtime_ms": downtime_ms,
            "capture_ms": captured_ms,
            "target_restore_ms": reply.restore_ms,
            "target_tiers_ms": reply.tiers_ms,
            "pages_sent": pages_sent,
            "pages_total": pages_total,
        });
        self.emit("migrated_out", id, report.clone());
        Ok(report)
    }

    /// `vm.snapshot`: writes a VM's state to a directory (`file:///dir`): spec, vCPU/VM/device
    /// state, RAM, introspection. A running VM pauses for the capture and goes on; a paused one
    /// stays paused.
    pub fn snapshot(&self, id: &str, url: &str) -> Result<serde_json::Value, HostError> {
        let dir = file_path(url)?;
        let (spec, handle, introspection, was_paused) = {
            let mut tenants = self.tenants();
            let t = tenants
                .get_mut(id)
                .ok_or_else(|| HostError::not_found(id))?;
            t.refresh();
            if !matches!(t.state, VmState::Running | VmState::Paused) {
                return Err(HostError::conflict(format!(
                    "VM {id:?} is {:?}; only a running or paused VM has state to save",
                    t.state
                )));
            }
            (
                t.spec.clone(),
                t.handle.clone(),
                t.introspection.clone(),
                t.state == VmState::Paused,
            )
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| HostError::bad_request(format!("cannot create {}: {e}", dir.display())))?;
        let started = Instant::now();
        if was_paused {
            // Parked vCPUs capture as they park again.
            handle.control().resume();
        }
        let snapshot = handle.capture(PAUSE_LIMIT).map_err(|e| {
            handle.control().resume();
            HostError::internal(format!("capture: {e}"))
        })?;
        let written = (|| -> std::io::Result<(u64, u64)> {
            let write_file = |name: &str, bytes: Vec<u8>| std::fs::write(dir.join(name), bytes);
            write_file("spec.json", serde_json::to_vec_pretty(&spec)?)?;
            let mut state = Vec::new();
            write_json(&mut state, &snapshot)?;
            write_file("state.bin", state)?;
            let mut intro = Vec::new();
            write_json(
                &mut intro,
                &introspection.as_ref().map(|i| i.export_state()),
            )?;
            write_file("introspection.bin", intro)?;
            let mut memory =
                std::io::BufWriter::new(std::fs::File::create(dir.join("memory.bin"))?);
            let pages = vmm_core::snapshot::write_memory(handle.memory(), &mut memory)?;
            std::io::Write::flush(&mut memory)?;
            Ok(pages)
        })();
        handle.resume_devices();
        if !was_paused {
            handle.control().resume();
        }
        let (pages, total) =
            written.map_err(|e| HostError::internal(format!("writing {}: {e}", dir.display())))?;
        let report = serde_json::json!({"to": url, "pages_written": pages, "pages_total": total,
            "ms": started.elapsed().as_secs_f64() * 1e3});
        self.emit("vm_snapshot", id, report.clone());
        Ok(report)
    }

    /// `vm.restore`: creates a VM from a snapshot directory, paused (`vm.resume` starts it),
    /// with its port, address and verdicts on both tiers.
    pub fn restore(&self, url: &str) -> Result<VmInfo, HostError> {
        let dir = file_path(url)?;
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .map_err(|e| HostError::bad_request(format!("{}: {e}", dir.join(name).display())))
        };
        let spec: VmSpec = serde_json::from_slice(&read("spec.json")?)
            .map_err(|e| HostError::bad_request(format!("spec.json: {e}")))?;
        let snapshot: VmSnapshot = read_json(&mut &read("state.bin")?[..], MAX_STATE_DOC)
            .map_err(|e| HostError::bad_request(format!("state.bin: {e}")))?;
        let state: Option<vmm_core::introspect::IntrospectionState> =
            read_json(&mut &read("introspection.bin")?[..], MAX_STATE_DOC)
                .map_err(|e| HostError::bad_request(format!("introspection.bin: {e}")))?;
        let memory = std::fs::File::open(dir.join("memory.bin"))
            .map_err(|e| HostError::bad_request(format!("memory.bin: {e}")))?;
        let (mut vm, introspection, tenant, slot, _mac) = self.prepare(&spec)?;
        let release = || {
            self.switch.ports.lock().unwrap_or_else(|p| p.into_inner())[slot].1 = None;
        };
        let restored = vm
            .restore(&snapshot, &mut std::io::BufReader::new(memory))
            .map_err(|e| e.to_string())
            .and_then(|_| import_introspection(&introspection, &state));
        let adopted = match restored {
            Ok(a) => a,
            Err(e) => {
                release();
                return Err(HostError::bad_request(format!("restore: {e}")));
            }
        };
        let mut switch = vec![self.switch_attach(tenant, slot, spec.ip)];
        switch.extend(adopted.iter().copied());
        let mut edge = vec![self.edge_attach(tenant, spec.ip)];
        edge.extend(adopted.iter().copied());
        if let Err(e) = self.reconfigure(&switch, &edge) {
            release();
            return Err(e);
        }
        // Paused until vm.resume: the vCPUs park before their first instruction.
        let _ = vm.run_control().pause(Duration::ZERO);
        let mut entry = Tenant::new(spec, tenant, slot, &vm, introspection, VmState::Paused);
        let id = entry.spec.id.clone();
        entry.thread = Some(start_vm(&id, vm).inspect_err(|_| release())?);
        let info = entry.info();
        self.tenants().insert(id.clone(), entry);
        self.emit(
            "vm_restored",
            &id,
            serde_json::json!({"from": url, "adopted_verdicts": adopted.len()}),
        );
        Ok(info)
    }

    /// `vm.receive-migration`: listens at `url` for one migrating VM (in the background; the
    /// call returns once the socket listens).
    pub fn receive_migration(self: &Arc<Self>, url: &str) -> Result<(), HostError> {
        let path = unix_path(url)?;
        if self.shutdown.load(Ordering::Acquire) {
            return Err(HostError::unavailable("the host is shutting down"));
        }
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).map_err(|e| {
            HostError::bad_request(format!("cannot listen at {}: {e}", path.display()))
        })?;
        let host = self.clone();
        let url = url.to_string();
        std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || {
                let result = host.accept_migration(&listener);
                let _ = std::fs::remove_file(&path);
                if let Err(e) = result {
                    host.emit(
                        "migration_failed",
                        "",
                        serde_json::json!({"at": url, "error": e}),
                    );
                }
            })
            .map_err(|e| HostError::internal(format!("cannot start the receiver: {e}")))?;
        Ok(())
    }

    fn accept_migration(&self, listener: &std::os::unix::net::UnixListener) -> Result<(), String> {
        // Wait for the source, but not forever.
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + MIGRATION_WAIT;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err("no source connected".into());
                    }
                    let mut poll = libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(listener),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut poll, 1, 500) };
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        let _ = stream.set_read_timeout(Some(MIGRATION_WAIT));
        let reply = |stream: &mut std::os::unix::net::UnixStream, r: MigrationReply| {
            let _ = write_json(stream, &r);
        };
        let refuse = |stream: &mut std::os::unix::net::UnixStream, e: String| {
            reply(
                stream,
                MigrationReply {
                    ok: false,
                    error: Some(e.clone()),
                    restore_ms: 0.0,
                    tiers_ms: 0.0,
                },
            );
            e
        };
        let header: MigrationHeader =
            read_json(&mut stream, 1 << 20).map_err(|e| format!("header: {e}"))?;
        if header.version != MIGRATION_VERSION {
            return Err(refuse(
                &mut stream,
                format!(
                    "migration protocol {} (this host speaks {MIGRATION_VERSION})",
                    header.version
                ),
            ));
        }
        let spec = header.spec;
        let id = spec.id.clone();
        // Build the VM (slow: the kernel is read and checked) while the source still runs it.
        let prepared = self.prepare(&spec);
        let (vm, introspection, tenant, slot, mac) = match prepared {
            Ok(p) => p,
            Err(e) => return Err(refuse(&mut stream, e.message)),
        };
        let release = || {
            self.switch.ports.lock().unwrap_or_else(|p| p.into_inner())[slot].1 = None;
        };
        reply(
            &mut stream,
            MigrationReply {
                ok: true,
                error: None,
                restore_ms: 0.0,
                tiers_ms: 0.0,
            },
        );
        let mut vm = vm;
        let arrived = Instant::now();
        let restored = (|| -> Result<Vec<[u8; RECORD_LEN]>, String> {
            let mut input = std::io::BufReader::with_capacity(1 << 20, &mut stream);
            let snapshot: VmSnapshot =
                read_json(&mut input, MAX_STATE_DOC).map_err(|e| format!("state: {e}"))?;
            vm.restore(&snapshot, &mut input)
                .map_err(|e| e.to_string())?;
            let state: Option<vmm_core::introspect::IntrospectionState> =
                read_json(&mut input, MAX_STATE_DOC).map_err(|e| format!("introspection: {e}"))?;
            import_introspection(&introspection, &state)
        })();
        let adopted = match restored {
            Ok(a) => a,
            Err(e) => {
                release();
                return Err(refuse(&mut stream, e));
            }
        };
        let restore_ms = arrived.elapsed().as_secs_f64() * 1e3;
        // This switch takes the tenant over before it runs: its port and address, and its
        // verdicts as Adopt (its flows are established; they continue mid-stream here).
        let mut records = vec![self.switch_attach(tenant, slot, spec.ip)];
        records.extend(adopted.iter().copied());
        let tiers_ms = match self.reconfigure(&records, &[]) {
            Ok(ms) => ms,
            Err(e) => {
                release();
                return Err(refuse(&mut stream, e.message));
            }
        };
        let mut entry = Tenant::new(
            spec.clone(),
            tenant,
            slot,
            &vm,
            introspection,
            VmState::Running,
        );
        entry.thread = Some(start_vm(&id, vm).map_err(|e| refuse(&mut stream, e.message))?);
        self.tenants().insert(id.clone(), entry);
        // Tell the network where the tenant is now.
        if let Some(frame) = announcement(mac, spec.ip) {
            let ports = self.switch.ports.lock().unwrap_or_else(|p| p.into_inner());
            let _ = ports[slot].0.link.send(&frame);
        }
        reply(
            &mut stream,
            MigrationReply {
                ok: true,
                error: None,
                restore_ms,
                tiers_ms,
            },
        );
        self.times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .migrate_ms = Some(tiers_ms);
        self.emit(
            "migrated_in",
            &id,
            serde_json::json!({"from": header.source_host, "tenant": tenant,
                "switch_port": slot + 1, "restore_ms": restore_ms, "tiers_ms": tiers_ms,
                "adopted_verdicts": adopted.len()}),
        );
        Ok(())
    }

    /// Checks a spec and builds its VM on a reserved port (create's first half).
    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        spec: &VmSpec,
    ) -> Result<(Vm, Option<Arc<Introspection>>, u32, usize, [u8; 6]), HostError> {
        if !valid_id(&spec.id) {
            return Err(HostError::bad_request(format!(
                "id {:?}: use 1 to {MAX_ID_LEN} letters, digits, '-', '_' or '.'",
                spec.id
            )));
        }
        let mac = parse_mac(&spec.mac).ok_or_else(|| {
            HostError::bad_request(format!(
                "mac {:?} is not a unicast MAC address like 52:54:00:12:34:56",
                spec.mac
            ))
        })?;
        if spec.vcpus == 0 || spec.vcpus > 8 {
            return Err(HostError::bad_request("vcpus: 1 to 8"));
        }
        if spec.ip.is_unspecified() || spec.ip.is_multicast() {
            return Err(HostError::bad_request(format!(
                "ip {}: a tenant needs a unicast address",
                spec.ip
            )));
        }
        Policy::compile(&spec.policy)
            .map_err(|e| HostError::bad_request(format!("policy: {e}")))?;
        if self.shutdown.load(Ordering::Acquire) {
            return Err(HostError::unavailable("the host is shutting down"));
        }
        // Reserve the id and a port before the (slow) build, so concurrent creates conflict
        // cleanly.
        let tenant = tenant_id(&spec.id);
        let slot = {
            let tenants = self.tenants();
            if tenants.contains_key(&spec.id) {
                return Err(HostError::conflict(format!(
                    "a VM with id {:?} exists (vm.delete it first)",
                    spec.id
                )));
            }
            if let Some(other) = tenants
                .values()
                .find(|t| t.spec.ip == spec.ip || parse_mac(&t.spec.mac) == Some(mac))
            {
                return Err(HostError::conflict(format!(
                    "VM {:?} already has ip {} or mac {}",
                    other.spec.id, other.spec.ip, other.spec.mac
                )));
            }
            let mut ports = self.switch.ports.lock().unwrap_or_else(|p| p.into_inner());
            let slot = ports.iter().position(|(_, owner)| owner.is_none()).ok_or_else(|| {
                HostError::unavailable(format!(
                    "all {} switch ports are taken (delete a VM, or start the host with more --tenant-ports)",
                    ports.len()
                ))
            })?;
            ports[slot].1 = Some(spec.id.clone());
            slot
        };
        match self.build(spec, mac, tenant, slot) {
            Ok((vm, introspection)) => Ok((vm, introspection, tenant, slot, mac)),
            Err(e) => {
                self.switch.ports.lock().unwrap_or_else(|p| p.into_inner())[slot].1 = None;
                Err(e)
            }
        }
    }

    /// The switch micro-VM's counters.
    pub fn switch_counters(&self) -> Option<FirewallCounters> {
        self.switch.region.counters()
    }

    pub fn reconfig_times(&self) -> ReconfigTimes {
        self.times.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Edge channel counters: (records sent, send errors).
    pub fn edge_counters(&self) -> Option<(u64, u64)> {
        self.edge.as_ref().map(|e| {
            (
                e.sent_records.load(Ordering::Relaxed),
                e.send_errors.load(Ordering::Relaxed),
            )
        })
    }

    /// `vmm.shutdown`: stops every tenant (flushing it from the tiers) and the switch.
    pub fn shutdown(&self) {
        if self.shutdown.swap(true, Ordering::AcqRel) {
            return;
        }
        let ids: Vec<String> = self.tenants().keys().cloned().collect();
        for id in ids {
            let _ = self.delete(&id);
        }
        self.switch.stop.store(true, Ordering::Release);
        if let Some(thread) = self
            .switch
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = thread.join();
        }
        vmm_core::events::bus().emit(
            "host_stopped",
            &serde_json::json!({"host": self.config.name}),
        );
    }

    /// Whether the switch micro-VM still runs.
    pub fn switch_running(&self) -> bool {
        self.switch
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_file_and_log_safe() {
        for good in ["web1", "a", "tenant-7.prod_x"] {
            assert!(valid_id(good), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "x y", &"z".repeat(33), "é"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn specs_reject_unknown_fields_and_fill_defaults() {
        let spec: VmSpec = serde_json::from_str(
            r#"{"id":"w","kernel":"/k","mac":"52:54:00:00:00:02","ip":"10.0.0.2","policy":{"allow":[]}}"#,
        )
        .unwrap();
        assert_eq!((spec.memory_mib, spec.vcpus), (256, 1));
        let err = serde_json::from_str::<VmSpec>(
            r#"{"id":"w","kernel":"/k","mac":"52:54:00:00:00:02","ip":"10.0.0.2","policy":{"allow":[]},"gpu":true}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `gpu`"), "{err}");
    }
}
