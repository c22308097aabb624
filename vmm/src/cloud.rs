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
use vigil_wire::verdict::{Direction, IpVersion, Op, Protocol, Rule, VerdictRepr, RECORD_LEN};

use crate::host::HostKind;
use crate::introspect::{tenant_id, Introspection, VerdictSink};
use crate::net_config::{parse_mac, NetConfig};
use crate::run_control::RunControl;
use crate::verdict_region::{FirewallCounters, VerdictRegion};
use crate::vm::{ConsoleConfig, LinkConfig, Payload, Vm, VmConfig, VmError, VmOutcome};

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
    introspection: Option<Arc<Introspection>>,
    thread: Option<JoinHandle<Result<VmOutcome, VmError>>>,
    stop_reason: Option<String>,
    created_unix_ms: u64,
}

impl Tenant {
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
        let switch_vm = Vm::create(&switch_config, kind)
            .map_err(|e| format!("the switch micro-VM: {e}"))?;
        let region = switch_vm
            .verdict_region()
            .ok_or("the switch micro-VM has no verdict region")?;
        let stop = switch_vm.stop_handle();
        let thread = std::thread::Builder::new()
            .name("switch".into())
            .spawn(move || switch_vm.run(None))
            .map_err(|e| format!("cannot start the switch thread: {e}"))?;
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
        crate::events::bus().emit(
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

    fn attach_record(&self, tenant: u32, slot: usize, ip: IpAddr) -> [u8; RECORD_LEN] {
        let (version, addr) = ip_fields(ip);
        let mut rule = Rule::any(Direction::Egress, version, Protocol::Tcp);
        rule.local_addr = addr;
        rule.local_port = (slot + 1) as u16;
        VerdictRepr {
            op: Op::Attach,
            tenant,
            seq: self.next_control_seq(),
            lifetime_ms: 0,
            rule,
        }
        .to_bytes()
    }

    fn flush_record(&self, tenant: u32) -> [u8; RECORD_LEN] {
        VerdictRepr {
            op: Op::FlushTenant,
            tenant,
            seq: self.next_control_seq(),
            lifetime_ms: 0,
            rule: Rule::any(Direction::Egress, IpVersion::V4, Protocol::Tcp),
        }
        .to_bytes()
    }

    /// Sends control records to both tiers and waits until the switch took them. Returns the
    /// milliseconds until the switch had applied them.
    fn reconfigure(&self, records: &[[u8; RECORD_LEN]]) -> Result<f64, HostError> {
        let started = Instant::now();
        if let Some(edge) = &self.edge {
            edge.send(records);
        }
        let position = self.switch.region.push_tracked(records).map_err(|e| {
            HostError::unavailable(format!("the switch's verdict ring refused the update: {e:?}"))
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

    fn emit(&self, kind: &str, id: &str, extra: serde_json::Value) {
        let mut body = serde_json::json!({"host": self.config.name, "vm": id});
        if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        crate::events::bus().emit(kind, &body);
    }

    /// `vm.create`: builds the VM (not booted), plugs it into a switch port, opens nothing yet.
    pub fn create(&self, spec: VmSpec) -> Result<VmInfo, HostError> {
        let started = Instant::now();
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
        let release_port = || {
            let mut ports = self.switch.ports.lock().unwrap_or_else(|p| p.into_inner());
            ports[slot].1 = None;
        };
        let result = self.build(&spec, mac, tenant, slot);
        let (vm, introspection) = match result {
            Ok(built) => built,
            Err(e) => {
                release_port();
                return Err(e);
            }
        };
        // The tiers learn the tenant's port and address before it can send anything.
        let applied = match self.reconfigure(&[self.attach_record(tenant, slot, spec.ip)]) {
            Ok(ms) => ms,
            Err(e) => {
                release_port();
                return Err(e);
            }
        };
        let entry = Tenant {
            tenant,
            slot,
            state: VmState::Created,
            stop: vm.stop_handle(),
            control: vm.run_control(),
            introspection,
            vm: Some(vm),
            thread: None,
            stop_reason: None,
            created_unix_ms: now_unix_ms(),
            spec,
        };
        let info = entry.info();
        let mut tenants = self.tenants();
        tenants.insert(entry.spec.id.clone(), entry);
        drop(tenants);
        let total = started.elapsed().as_secs_f64() * 1e3;
        self.times.lock().unwrap_or_else(|p| p.into_inner()).create_ms = Some(applied);
        self.emit(
            "reconfig",
            &info.id,
            serde_json::json!({"action": "create", "tenant": tenant, "switch_port": slot + 1,
                "ip": info.ip, "tiers_ms": applied, "total_ms": total}),
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
        let policy_path = self.config.state_dir.join(format!("{}.policy.json", spec.id));
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
        let t = tenants.get_mut(id).ok_or_else(|| HostError::not_found(id))?;
        t.refresh();
        let Some(vm) = t.vm.take() else {
            return Err(HostError::conflict(format!(
                "VM {id:?} is {:?}; only a created VM boots",
                t.state
            )));
        };
        let thread = std::thread::Builder::new()
            .name(format!("{id}-vm"))
            .spawn(move || vm.run(None))
            .map_err(|e| HostError::internal(format!("cannot start the VM thread: {e}")))?;
        t.thread = Some(thread);
        t.state = VmState::Running;
        let info = t.info();
        drop(tenants);
        self.emit("vm_booted", id, serde_json::json!({}));
        Ok(info)
    }

    pub fn info(&self, id: &str) -> Result<VmInfo, HostError> {
        let mut tenants = self.tenants();
        let t = tenants.get_mut(id).ok_or_else(|| HostError::not_found(id))?;
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
        let mut tenants = self.tenants();
        let t = tenants.get_mut(id).ok_or_else(|| HostError::not_found(id))?;
        t.refresh();
        if t.state != VmState::Running {
            return Err(HostError::conflict(format!(
                "VM {id:?} is {:?}; only a running VM pauses",
                t.state
            )));
        }
        t.control
            .pause(PAUSE_LIMIT)
            .map_err(|e| HostError::internal(format!("pause: {e}")))?;
        t.state = VmState::Paused;
        let info = t.info();
        drop(tenants);
        self.emit("vm_paused", id, serde_json::json!({}));
        Ok(info)
    }

    pub fn resume(&self, id: &str) -> Result<VmInfo, HostError> {
        let mut tenants = self.tenants();
        let t = tenants.get_mut(id).ok_or_else(|| HostError::not_found(id))?;
        t.refresh();
        if t.state != VmState::Paused {
            return Err(HostError::conflict(format!(
                "VM {id:?} is {:?}; only a paused VM resumes",
                t.state
            )));
        }
        t.control.resume();
        t.state = VmState::Running;
        let info = t.info();
        drop(tenants);
        self.emit("vm_resumed", id, serde_json::json!({}));
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
        let applied = self.reconfigure(&[self.flush_record(t.tenant)]);
        {
            let mut ports = self.switch.ports.lock().unwrap_or_else(|p| p.into_inner());
            ports[t.slot].1 = None;
        }
        let applied = applied?;
        self.times.lock().unwrap_or_else(|p| p.into_inner()).delete_ms = Some(applied);
        self.emit(
            "reconfig",
            id,
            serde_json::json!({"action": "delete", "tenant": t.tenant, "tiers_ms": applied,
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
            let t = tenants.get_mut(id).ok_or_else(|| HostError::not_found(id))?;
            if let Some(i) = &t.introspection {
                i.replace_policy(spec.clone())
                    .map_err(|e| HostError::bad_request(format!("policy: {e}")))?;
            }
            t.spec.policy = spec;
            (t.tenant, t.slot, t.spec.ip)
        };
        let applied =
            self.reconfigure(&[self.flush_record(tenant), self.attach_record(tenant, slot, ip)])?;
        self.times.lock().unwrap_or_else(|p| p.into_inner()).policy_ms = Some(applied);
        self.emit(
            "reconfig",
            id,
            serde_json::json!({"action": "policy", "tenant": tenant, "tiers_ms": applied}),
        );
        Ok(())
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
        crate::events::bus().emit(
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
