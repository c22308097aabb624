//! An edge node: the fw-guest micro-VM booted firmware-less in the edge role between the outside
//! world (a TAP device, in its own network namespace) and the cloud (a VXLAN endpoint the hosts'
//! switch uplinks reach), fed with verdicts that hosts send over the authenticated channel.
//!
//! Verdict datagrams are verified here, in the edge's VMM (HMAC, replay window; `edge::channel`)
//! and only then put into the micro-VM's verdict ring. A forged, replayed or malformed datagram
//! is dropped, counted and reported as an `edge_rejected` event.
//!
//! Owns: the edge micro-VM, its verdict ring, the receiving thread and its counters. Must not:
//! put into the ring a record from a datagram that failed a check, or serve HTTP (the API
//! crate's `vmm_api::edge` does).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::channel::{Received, VerdictReceiver};
use vigil_wire::boot::Role;

use vmm_core::net_config::NetConfig;
use vmm_core::verdict_region::{wait_ready, FirewallCounters, VerdictRegion, READY_LIMIT};
use vmm_core::vm::{ConsoleConfig, Vm, VmConfig, VmError, VmOutcome};

/// How long the receiver waits for the micro-VM to take accepted records.
const APPLY_LIMIT: Duration = Duration::from_secs(2);

/// Why an edge node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the verdict channel at {addr}: {source}")]
    Channel {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the verdict channel: {0}")]
    ChannelAddr(#[source] std::io::Error),
    #[error("the edge micro-VM: {0}")]
    Vm(#[source] VmError),
    #[error("the edge micro-VM has no verdict region")]
    NoVerdictRegion,
    #[error("cannot start the edge VM thread: {0}")]
    VmThread(#[source] std::io::Error),
    #[error(
        "the edge micro-VM did not come up within {secs} s{}",
        .console.as_ref().map(|p| format!(" (its console: {})", p.display())).unwrap_or_default()
    )]
    NotReady { secs: u64, console: Option<PathBuf> },
    #[error("cannot start the verdict receiver: {0}")]
    ReceiverThread(#[source] std::io::Error),
}

#[derive(Clone)]
pub struct EdgeConfig {
    pub name: String,
    pub elf: PathBuf,
    /// The internet side (tenant 0 of the micro-VM's ports).
    pub outside: NetConfig,
    /// The cloud side: a VXLAN endpoint that learns its hosts.
    pub cloud: NetConfig,
    /// Where hosts send signed verdicts (UDP).
    pub control: SocketAddr,
    pub key: Vec<u8>,
    pub console_log: Option<PathBuf>,
}

#[derive(Default)]
struct EdgeStats {
    accepted_datagrams: AtomicU64,
    accepted_records: AtomicU64,
    rejected: Mutex<BTreeMap<String, u64>>,
    /// Milliseconds from receipt of the last accepted datagram to the micro-VM having taken it.
    last_apply_us: AtomicU64,
}

pub struct Edge {
    config: EdgeConfig,
    region: Arc<VerdictRegion>,
    stop: Arc<AtomicBool>,
    vm_thread: Mutex<Option<JoinHandle<Result<VmOutcome, VmError>>>>,
    stats: Arc<EdgeStats>,
    control_addr: SocketAddr,
    started: Instant,
}

impl Edge {
    /// Boots the micro-VM and starts taking verdicts.
    pub fn start(config: EdgeConfig) -> Result<Arc<Edge>, StartError> {
        // The edge's one read of the debug knobs (VIGIL_TRACE_EXITS, VIGIL_PROFILE, ...).
        let debug = vmm_core::knobs::DebugKnobs::from_env();
        let kind = debug.host_kind();
        let vm_config = VmConfig::micro_vm(config.name.clone(), &config.elf, Role::Edge)
            .with_console(ConsoleConfig {
                log: config.console_log.clone(),
                stdout: false,
                markers: Vec::new(),
            })
            .with_nets(vec![
                NetConfig {
                    tenant: 0,
                    ..config.outside.clone()
                },
                NetConfig {
                    // Any non-zero id marks a cloud port (the edge finds tenants by address).
                    tenant: 1,
                    ..config.cloud.clone()
                },
            ])
            .with_debug(debug);
        let receiver =
            VerdictReceiver::bind(config.control, config.key.clone()).map_err(|source| {
                StartError::Channel {
                    addr: config.control,
                    source,
                }
            })?;
        let control_addr = receiver.local_addr().map_err(StartError::ChannelAddr)?;
        let vm = Vm::create(&vm_config, kind).map_err(StartError::Vm)?;
        let region = vm.verdict_region().ok_or(StartError::NoVerdictRegion)?;
        let stop = vm.stop_handle();
        let vm_thread = std::thread::Builder::new()
            .name("edge-vm".into())
            .spawn(move || vm.run(None))
            .map_err(StartError::VmThread)?;
        if !wait_ready(&region, &vm_thread) {
            stop.store(true, Ordering::Release);
            let _ = vm_thread.join();
            return Err(StartError::NotReady {
                secs: READY_LIMIT.as_secs(),
                console: config.console_log.clone(),
            });
        }
        let edge = Arc::new(Edge {
            config,
            region,
            stop,
            vm_thread: Mutex::new(Some(vm_thread)),
            stats: Arc::new(EdgeStats::default()),
            control_addr,
            started: Instant::now(),
        });
        let worker = edge.clone();
        std::thread::Builder::new()
            .name("edge-verdicts".into())
            .spawn(move || worker.take_verdicts(receiver))
            .map_err(StartError::ReceiverThread)?;
        vmm_core::events::bus().emit(
            "edge_started",
            &serde_json::json!({
                "edge": edge.config.name,
                "outside": edge.config.outside.backend.to_string(),
                "cloud": edge.config.cloud.backend.to_string(),
                "control": control_addr.to_string(),
            }),
        );
        Ok(edge)
    }

    /// The address the verdict channel listens on.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    fn take_verdicts(&self, mut receiver: VerdictReceiver) {
        while !self.stop.load(Ordering::Acquire) {
            let received = match receiver.recv(Duration::from_millis(200)) {
                Ok(Some(received)) => received,
                Ok(None) => continue,
                Err(e) => {
                    vmm_core::events::bus().emit(
                        "edge_error",
                        &serde_json::json!({"edge": self.config.name, "error": e.to_string()}),
                    );
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            match received {
                Received::Accepted {
                    from,
                    sender,
                    seq,
                    records,
                } => {
                    let arrived = Instant::now();
                    let taken = self
                        .region
                        .push_tracked(&records)
                        .map(|position| self.region.wait_consumed(position, APPLY_LIMIT));
                    let apply_us = arrived.elapsed().as_micros() as u64;
                    self.stats
                        .accepted_datagrams
                        .fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .accepted_records
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                    self.stats.last_apply_us.store(apply_us, Ordering::Relaxed);
                    vmm_core::events::bus().emit(
                        "edge_verdicts",
                        &serde_json::json!({
                            "edge": self.config.name, "from": from.to_string(), "sender": sender,
                            "seq": seq, "records": records.len(),
                            "applied": matches!(taken, Ok(true)),
                            "apply_ms": apply_us as f64 / 1e3,
                        }),
                    );
                }
                Received::Rejected { from, reason } => {
                    let detail = reason.to_string();
                    // Counted by the error's stable name (the detail carries sender-chosen
                    // numbers: keying on it would let a sender grow the map).
                    let reason = reason.name().to_string();
                    *self
                        .stats
                        .rejected
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(reason.clone())
                        .or_default() += 1;
                    vmm_core::events::bus().emit(
                        "edge_rejected",
                        &serde_json::json!({
                            "edge": self.config.name, "from": from.to_string(), "reason": reason,
                            "detail": detail,
                        }),
                    );
                }
            }
        }
    }

    /// The micro-VM's counters.
    pub fn counters(&self) -> Option<FirewallCounters> {
        self.region.counters()
    }

    /// Rejected datagrams by reason.
    pub fn rejected(&self) -> BTreeMap<String, u64> {
        self.stats
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn accepted_records(&self) -> u64 {
        self.stats.accepted_records.load(Ordering::Relaxed)
    }

    /// Stops the micro-VM and the receiver.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self
            .vm_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = thread.join();
        }
    }

    pub fn running(&self) -> bool {
        self.vm_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Time since the node started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Microseconds from receipt of the last accepted datagram to the micro-VM having taken it.
    pub fn last_apply_us(&self) -> u64 {
        self.stats.last_apply_us.load(Ordering::Relaxed)
    }

    /// The flag that stops the node (and whatever serves it).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}
