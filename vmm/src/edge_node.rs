//! An edge node: the fw-guest micro-VM booted firmware-less in the edge role between the outside
//! world (a TAP device, in its own network namespace) and the cloud (a VXLAN endpoint the hosts'
//! switch uplinks reach), fed with verdicts that hosts send over the authenticated channel.
//!
//! Verdict datagrams are verified here, in the edge's VMM (HMAC, replay window; `edge::channel`)
//! and only then put into the micro-VM's verdict ring. A forged, replayed or malformed datagram
//! is dropped, counted and reported as an `edge_rejected` event.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edge::channel::{Received, VerdictReceiver};
use vigil_wire::boot::Role;

use crate::api::http::{self, Method, Request, Response};
use crate::host::HostKind;
use crate::net_config::NetConfig;
use crate::verdict_region::{FirewallCounters, VerdictRegion};
use crate::vm::{ConsoleConfig, Payload, Vm, VmConfig, VmError, VmOutcome};

/// How long the receiver waits for the micro-VM to take accepted records.
const APPLY_LIMIT: Duration = Duration::from_secs(2);

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
    pub fn start(config: EdgeConfig) -> Result<Arc<Edge>, String> {
        let vm_config = VmConfig {
            name: config.name.clone(),
            mem_mib: 32,
            vcpus: 1,
            payload: Payload::MicroVm {
                elf: config.elf.clone(),
                role: Role::Edge,
                verdicts: Vec::new(),
            },
            console: ConsoleConfig {
                log: config.console_log.clone(),
                stdout: false,
                markers: Vec::new(),
            },
            nets: vec![
                NetConfig {
                    tenant: 0,
                    ..config.outside.clone()
                },
                NetConfig {
                    // Any non-zero id marks a cloud port (the edge finds tenants by address).
                    tenant: 1,
                    ..config.cloud.clone()
                },
            ],
            policy: None,
            links: Vec::new(),
        };
        let receiver = VerdictReceiver::bind(config.control, config.key.clone())
            .map_err(|e| format!("the verdict channel at {}: {e}", config.control))?;
        let control_addr = receiver
            .local_addr()
            .map_err(|e| format!("the verdict channel: {e}"))?;
        let vm = Vm::create(&vm_config, HostKind::detect())
            .map_err(|e| format!("the edge micro-VM: {e}"))?;
        let region = vm
            .verdict_region()
            .ok_or("the edge micro-VM has no verdict region")?;
        let stop = vm.stop_handle();
        let vm_thread = std::thread::Builder::new()
            .name("edge-vm".into())
            .spawn(move || vm.run(None))
            .map_err(|e| format!("cannot start the edge VM thread: {e}"))?;
        if !crate::cloud::wait_ready(&region, &vm_thread) {
            stop.store(true, Ordering::Release);
            let _ = vm_thread.join();
            return Err(format!(
                "the edge micro-VM did not come up within {} s{}",
                crate::cloud::READY_LIMIT.as_secs(),
                config
                    .console_log
                    .as_ref()
                    .map(|p| format!(" (its console: {})", p.display()))
                    .unwrap_or_default()
            ));
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
            .map_err(|e| format!("cannot start the verdict receiver: {e}"))?;
        crate::events::bus().emit(
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
                    crate::events::bus().emit(
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
                    crate::events::bus().emit(
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
                    crate::events::bus().emit(
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

    fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut line = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        line(
            "vigil_edge_accepted_records_total",
            "counter",
            "Verdict records accepted from hosts.",
            vec![(
                String::new(),
                self.stats.accepted_records.load(Ordering::Relaxed) as f64,
            )],
        );
        line(
            "vigil_edge_rejected_datagrams_total",
            "counter",
            "Verdict datagrams rejected (forged, replayed, malformed), by reason.",
            self.rejected()
                .into_iter()
                .map(|(r, n)| (format!("{{reason=\"{r}\"}}"), n as f64))
                .collect(),
        );
        line(
            "vigil_edge_last_apply_ms",
            "gauge",
            "Milliseconds from receipt of the last accepted datagram to the micro-VM taking it.",
            vec![(
                String::new(),
                self.stats.last_apply_us.load(Ordering::Relaxed) as f64 / 1e3,
            )],
        );
        if let Some(c) = self.counters() {
            line(
                "vigil_edge_forwarded_total",
                "counter",
                "Frames the edge forwarded.",
                vec![(String::new(), c.forwarded as f64)],
            );
            line(
                "vigil_edge_flows_active",
                "gauge",
                "Conntrack entries in use at the edge.",
                vec![(String::new(), c.flows_active as f64)],
            );
            line(
                "vigil_edge_dropped_total",
                "counter",
                "Frames the edge dropped, by reason.",
                c.drops
                    .iter()
                    .map(|(r, n)| (format!("{{reason=\"{r}\"}}"), *n as f64))
                    .collect(),
            );
        }
        out
    }

    fn handle(&self, request: Request, stream: &mut UnixStream) -> http::Outcome {
        let path = request.path.strip_prefix(crate::api::API_PREFIX);
        let response = match (&request.method, path) {
            (Method::Get, Some("edge.ping")) => Response::json(
                200,
                &serde_json::json!({
                    "edge": self.config.name,
                    "uptime_s": self.started.elapsed().as_secs(),
                    "control": self.control_addr.to_string(),
                    "running": self.running(),
                    // The micro-VM formats its counters once its tables and ports are up.
                    "ready": self.counters().is_some(),
                }),
            ),
            (Method::Get, Some("edge.counters")) => Response::json(
                200,
                &serde_json::json!({
                    "firewall": self.counters(),
                    "accepted_records": self.accepted_records(),
                    "rejected": self.rejected(),
                }),
            ),
            (Method::Get, Some("metrics")) => Response::text(
                200,
                "text/plain; version=0.0.4",
                self.metrics_text().into_bytes(),
            ),
            (Method::Get, Some("events")) => {
                crate::api::stream_events(stream, &[&self.stop]);
                return http::Outcome::Streamed;
            }
            (Method::Put, Some("edge.shutdown")) => {
                self.stop();
                Response::empty(204)
            }
            (_, Some("edge.ping" | "edge.counters" | "metrics" | "events" | "edge.shutdown")) => {
                Response::error(405, "wrong method (GET for reads, PUT for edge.shutdown)")
            }
            _ => Response::error(
                404,
                &format!(
                    "no endpoint {} on an edge (edge.ping, edge.counters, metrics, events, \
                     edge.shutdown)",
                    request.path
                ),
            ),
        };
        http::Outcome::Respond(response)
    }

    /// Serves the edge's small API until it stops.
    pub fn serve(self: &Arc<Edge>, listener: UnixListener) {
        let edge = self.clone();
        let handler =
            Arc::new(move |request: Request, stream: &mut UnixStream| edge.handle(request, stream));
        http::serve(listener, crate::api::limits(), handler, self.stop.clone());
    }
}
