//! An edge node: the fw-guest micro-VM booted firmware-less in the edge role between the outside
//! world (a TAP device, in its own network namespace) and the cloud (a VXLAN endpoint the hosts'
//! switch uplinks reach), fed with verdicts that hosts send over the authenticated channel.
//!
//! Verdict datagrams are verified here, in the edge's VMM (HMAC, edge boot id, each host's run and
//! order; `edge::channel`), put into the micro-VM's verdict ring in order per host, and
//! acknowledged once the micro-VM has taken them. A forged, stale or malformed datagram is
//! dropped, counted and reported as an `edge_rejected` event.
//!
//! Hosts: the underlay address of a host whose datagram was applied becomes trusted on the cloud
//! port (`PeerTrust`): the VXLAN endpoint takes frames, and learns MAC locations, only from such
//! hosts. That address, and the edge's own underlay addresses (those of the network namespace it
//! runs in), are attached under `UNDERLAY_TENANT`, so the outside can never send from them. Each
//! authentic record is judged against the book of who attached what (`edge::owners`): a host
//! speaks only for its own tenants, and the cloud port takes a frame from a host only for the
//! addresses that host attached. When a host starts a new run (it restarted, so its tenants are
//! gone), the tenants it attached last are flushed before its new run's first records. A host the
//! cluster declares dead (its lease in etcd expired: `vmm-cluster`'s edge watch) is fenced: its
//! tenants are flushed at once and its datagrams are not applied until it registers again.
//!
//! Owns: the edge micro-VM, its verdict ring, the receiving thread, the hosts' trust, the book of
//! who attached what, and the counters. Must not: put into the ring a record from a datagram that
//! failed a check, or one the book refused, or serve HTTP (the API crate's `vmm_api::edge` does).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::channel::{
    random_boot_id, Applied, ChannelStats, Delivery, Keyring, Received, SharedKeyring,
    VerdictReceiver,
};
use crate::owners::{Change, Judged, Owners, Refusal, CLAIM_WAIT};
use vigil_wire::boot::Role;
use vigil_wire::outcome::Outcome;
use vigil_wire::verdict::{Op, VerdictRepr, RECORD_LEN};

use vmm_core::config::{NetBackend, Trust};
use vmm_core::devices::vxlan::PeerTrust;
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
    /// The channel's shared key (key id 0), if any. Without one, only hosts given keys of their
    /// own ([`Edge::set_host_keys`], from the cluster) are heard.
    pub key: Option<Vec<u8>>,
    pub console_log: Option<PathBuf>,
}

#[derive(Default)]
struct EdgeStats {
    accepted_datagrams: AtomicU64,
    accepted_records: AtomicU64,
    rejected: Mutex<BTreeMap<String, u64>>,
    /// The channel's counters (order, duplicates, acks), copied after each datagram.
    channel: Mutex<ChannelStats>,
    /// Datagrams held ahead of a gap right now.
    held_now: AtomicU64,
    /// Tenants flushed because the host that attached them restarted.
    restart_flushes: AtomicU64,
    /// Milliseconds from receipt of the last accepted datagram to the micro-VM having taken it.
    last_apply_us: AtomicU64,
    /// Verdicts (`Add`/`Adopt`) the micro-VM refused (its outcome log), by reason.
    verdicts_refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Authentic records the ownership book refused, by reason.
    refused_records: Mutex<BTreeMap<&'static str, u64>>,
    /// Datagrams held back (not acknowledged) because an attach waited for another host.
    claim_waits: AtomicU64,
    /// (hosts, tenants, addresses, underlay addresses) in the book, and tenants handed over.
    book: Mutex<BookView>,
}

/// What the API shows of the book: its sizes (hosts, tenants, addresses, underlay addresses),
/// the tenants handed over, the underlay's addresses.
type BookView = ((usize, usize, usize, usize), u64, Vec<std::net::IpAddr>);

/// The receiving thread's state: the book, and the datagram of each host that waits for another
/// host's release (its sequence number and since when).
#[derive(Default)]
struct Books {
    owners: Owners,
    waiting: HashMap<u32, (u64, Instant)>,
}

pub struct Edge {
    config: EdgeConfig,
    region: Arc<VerdictRegion>,
    stop: Arc<AtomicBool>,
    vm_thread: Mutex<Option<JoinHandle<Result<VmOutcome, VmError>>>>,
    stats: Arc<EdgeStats>,
    control_addr: SocketAddr,
    boot_id: u64,
    trust: Arc<PeerTrust>,
    started: Instant,
    /// Which host (sender) attached each tenant last (a migrated tenant belongs to its new host).
    /// The book of who attached what (the receiving thread's, and `fence_host`'s).
    books: Mutex<Books>,
    /// Hosts declared dead: their datagrams are not applied (nor acknowledged).
    fenced: Mutex<HashSet<u32>>,
    /// The keys the channel checks datagrams with (the receiving thread reads it).
    keyring: SharedKeyring,
}

impl Edge {
    /// Boots the micro-VM and starts taking verdicts.
    pub fn start(config: EdgeConfig) -> Result<Arc<Edge>, StartError> {
        // The edge's one read of the debug knobs (VIGIL_TRACE_EXITS, VIGIL_PROFILE, ...).
        let debug = vmm_core::knobs::DebugKnobs::from_env();
        let kind = debug.host_kind();
        let trust = PeerTrust::new();
        let mut cloud = config.cloud.clone();
        if let NetBackend::Vxlan { trust: t, .. } = &mut cloud.backend {
            *t = Trust(Some(trust.clone()));
        }
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
                    ..cloud
                },
            ])
            .with_debug(debug);
        let channel_error = |source| StartError::Channel {
            addr: config.control,
            source,
        };
        let keyring = match &config.key {
            Some(key) => Keyring::shared(key.clone()).map_err(channel_error)?,
            None => Keyring::own_keys_only(),
        };
        let keyring = Arc::new(RwLock::new(keyring));
        let boot = random_boot_id().map_err(channel_error)?;
        let receiver = VerdictReceiver::bind_keyring(config.control, keyring.clone(), boot)
            .map_err(channel_error)?;
        let control_addr = receiver.local_addr().map_err(StartError::ChannelAddr)?;
        let boot_id = receiver.boot_id();
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
        let own = own_underlay_addrs(&config);
        let edge = Arc::new(Edge {
            config,
            region,
            stop,
            vm_thread: Mutex::new(Some(vm_thread)),
            stats: Arc::new(EdgeStats::default()),
            control_addr,
            boot_id,
            trust,
            started: Instant::now(),
            books: Mutex::new(Books::default()),
            fenced: Mutex::new(HashSet::new()),
            keyring,
        });
        edge.own_underlay(
            &mut edge.books.lock().unwrap_or_else(|p| p.into_inner()),
            &own,
        );
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
                "boot_id": format!("{boot_id:#x}"),
            }),
        );
        Ok(edge)
    }

    /// The address the verdict channel listens on.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// Attaches the edge's own underlay addresses under `UNDERLAY_TENANT` (before any host
    /// speaks) and binds them to nobody on the cloud port.
    fn own_underlay(&self, books: &mut Books, addrs: &[std::net::IpAddr]) {
        let mut changes = Vec::new();
        let records: Vec<[u8; RECORD_LEN]> = addrs
            .iter()
            .filter_map(|a| books.owners.own(*a, &mut changes))
            .map(|v| v.to_bytes())
            .collect();
        self.change_bindings(&changes);
        if !records.is_empty() {
            let taken = self
                .region
                .push_tracked(&records)
                .is_ok_and(|p| self.region.wait_consumed(p, APPLY_LIMIT));
            if !taken {
                log::warn!(
                    "edge {}: the micro-VM did not take its underlay addresses",
                    self.config.name
                );
            }
        }
        self.publish_book(&books.owners);
        vmm_core::events::bus().emit(
            "edge_underlay",
            &serde_json::json!({"edge": self.config.name,
                "own": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>()}),
        );
    }

    fn change_bindings(&self, changes: &[Change]) {
        for c in changes {
            match *c {
                Change::Bind { addr, host } => {
                    if !self.trust.bind(addr, host) {
                        log::warn!("edge {}: too many bound addresses", self.config.name);
                    }
                }
                Change::Unbind(addr) => self.trust.unbind(addr),
                Change::Untrust(addr) => self.trust.untrust(addr),
            }
        }
    }

    fn publish_book(&self, owners: &Owners) {
        *self.stats.book.lock().unwrap_or_else(|p| p.into_inner()) =
            (owners.sizes(), owners.handovers, owners.underlay());
    }

    fn refused(&self, d: &Delivery<'_>, v: &VerdictRepr, why: Refusal) {
        *self
            .stats
            .refused_records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(why.name())
            .or_default() += 1;
        vmm_core::events::bus().emit(
            "edge_refused",
            &serde_json::json!({"edge": self.config.name, "sender": d.sender, "seq": d.seq,
                "from": d.from.to_string(), "op": format!("{:?}", v.op), "tenant": v.tenant,
                "reason": why.name()}),
        );
    }

    /// Puts one in-order datagram into the micro-VM's ring and waits until the micro-VM took it;
    /// whether it did. Before that: the host's underlay address is attached (the first time, or
    /// when it moved), the tenants of the host's previous run are flushed when it restarted, and
    /// each record is judged by the book (`edge::owners`): refused ones are counted and left out,
    /// and a datagram whose attach collides with another host's tenant is not taken (the host
    /// retransmits) until that host releases it or [`CLAIM_WAIT`] has passed.
    fn apply(&self, books: &mut Books, d: &Delivery<'_>) -> Option<Applied> {
        if self
            .fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&d.sender)
        {
            // A dead host's late datagrams stay unacknowledged: it retransmits them, and they
            // apply in order once it registers again.
            return None;
        }
        let decoded: Vec<Option<VerdictRepr>> = d
            .records
            .iter()
            .map(|r| VerdictRepr::from_bytes(r).ok())
            .collect();
        let collides = |owners: &Owners| {
            decoded
                .iter()
                .flatten()
                .any(|v| owners.collides(d.sender, v))
        };
        if collides(&books.owners) {
            let since = match books.waiting.get(&d.sender) {
                Some((seq, since)) if *seq == d.seq => *since,
                _ => {
                    self.stats.claim_waits.fetch_add(1, Ordering::Relaxed);
                    books.waiting.insert(d.sender, (d.seq, Instant::now()));
                    Instant::now()
                }
            };
            if since.elapsed() < CLAIM_WAIT {
                return None;
            }
            // Waited long enough: the colliding records are refused below, the rest applied.
        }
        books.waiting.remove(&d.sender);
        let mut changes = Vec::new();
        let mut records: Vec<[u8; RECORD_LEN]> = Vec::with_capacity(d.records.len() + 2);
        let host_ip = d.from.ip();
        records.extend(
            books
                .owners
                .see_host(d.sender, host_ip, &mut changes)
                .iter()
                .map(|v| v.to_bytes()),
        );
        let mut flushed = Vec::new();
        if d.restarted.is_some() {
            flushed = books.owners.tenants_of(d.sender);
            records.extend(
                flushed
                    .iter()
                    .map(|t| VerdictRepr::flush_tenant(*t, 0).to_bytes()),
            );
        }
        // The host's own records start here (the ones before are the edge's); `index_of` says
        // which of the datagram's records each of them is.
        let first = records.len();
        let mut index_of: Vec<usize> = Vec::with_capacity(d.records.len());
        // What the host hears back: which of its records were refused, and the first reason.
        let mut report = Applied::default();
        let refuse = |report: &mut Applied, index: usize, outcome: Outcome| {
            if report.refused == 0 {
                report.reason = outcome as u8;
            }
            report.refused |= 1u32.checked_shl(index as u32).unwrap_or(0);
        };
        for (index, (raw, v)) in d.records.iter().zip(&decoded).enumerate() {
            let Some(v) = v else {
                // The micro-VM refuses it and counts it (verdicts_rejected).
                records.push(*raw);
                index_of.push(index);
                continue;
            };
            match books.owners.judge(d.sender, v, &mut changes) {
                Judged::Apply => {
                    records.push(*raw);
                    index_of.push(index);
                }
                Judged::Consumed => {}
                Judged::Refuse(why) => {
                    self.refused(d, v, why);
                    match (v.op, why) {
                        (Op::Add | Op::Adopt, _) => refuse(&mut report, index, Outcome::NotOwner),
                        // A claim that did not take: its host hears why, and may claim again
                        // once the other host released the tenant.
                        (Op::Attach, Refusal::Collision) => {
                            refuse(&mut report, index, Outcome::Collision)
                        }
                        (Op::Attach, _) => refuse(&mut report, index, Outcome::AttachRefused),
                        _ => {}
                    }
                }
            }
        }
        // New bindings before the micro-VM knows the addresses; released ones after it forgot
        // them (so no host speaks for an address the firewall still gives a tenant).
        let (unbind, bind): (Vec<Change>, Vec<Change>) = changes
            .into_iter()
            .partition(|c| !matches!(c, Change::Bind { .. }));
        self.change_bindings(&bind);
        let arrived = Instant::now();
        let applied = match self.region.push_tracked(&records) {
            Ok(position) => {
                let mut refused: Vec<(u32, &'static str)> = Vec::new();
                let applied =
                    self.region
                        .wait_outcomes(position, records.len(), APPLY_LIMIT, |i, o| {
                            let Some(Ok(v)) =
                                (i >= first).then(|| VerdictRepr::from_bytes(&records[i]))
                            else {
                                return;
                            };
                            if matches!(v.op, Op::Add | Op::Adopt | Op::Attach)
                                && !o.is_some_and(|o| o.took_effect())
                            {
                                refused.push((v.tenant, o.map_or("outcome_unknown", |o| o.name())));
                                refuse(
                                    &mut report,
                                    index_of[i - first],
                                    o.unwrap_or(Outcome::Invalid),
                                );
                            }
                        });
                if !refused.is_empty() {
                    // The edge's table did not take these. Counted, reported here, and carried
                    // back in the acks, so the host denies the calls (or revokes them at its
                    // switch when it did not wait for this ack).
                    let mut counts = self
                        .stats
                        .verdicts_refused
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    for (tenant, reason) in &refused {
                        *counts.entry(reason).or_default() += 1;
                        vmm_core::events::bus().emit(
                            "verdict_refused",
                            &serde_json::json!({"edge": self.config.name, "tier": "edge",
                            "sender": d.sender, "seq": d.seq, "tenant": tenant, "reason": reason}),
                        );
                    }
                }
                applied
            }
            Err(_) => false,
        };
        self.change_bindings(&unbind);
        if !applied {
            // In the ring, so it will be applied in order; the host retransmits meanwhile, and a
            // copy applied again changes nothing (adds refresh, flushes and attaches repeat).
            log::warn!(
                "edge {}: the micro-VM did not take host {}'s datagram {} within {APPLY_LIMIT:?}",
                self.config.name,
                d.sender,
                d.seq
            );
            self.publish_book(&books.owners);
            return None;
        }
        self.stats
            .last_apply_us
            .store(arrived.elapsed().as_micros() as u64, Ordering::Relaxed);
        if !self.trust.trust(host_ip) {
            log::warn!(
                "edge {}: too many hosts to trust {}",
                self.config.name,
                d.from
            );
        }
        if !flushed.is_empty() {
            let mut unbind = Vec::new();
            books.owners.forget_tenants(&flushed, &mut unbind);
            self.change_bindings(&unbind);
            self.stats
                .restart_flushes
                .fetch_add(flushed.len() as u64, Ordering::Relaxed);
            vmm_core::events::bus().emit(
                "edge_host_restarted",
                &serde_json::json!({"edge": self.config.name, "sender": d.sender,
                    "flushed_tenants": flushed}),
            );
        }
        self.publish_book(&books.owners);
        // This host's share of the room: new verdicts its tenants may add for certain (the
        // tables are shared by every host's tenants).
        report.room =
            (self.region.room() / books.owners.host_count()).min(u32::MAX as usize) as u32;
        Some(report)
    }

    fn take_verdicts(&self, mut receiver: VerdictReceiver) {
        while !self.stop.load(Ordering::Acquire) {
            let received = receiver.recv_reporting(Duration::from_millis(200), |d| {
                let mut books = self.books.lock().unwrap_or_else(|p| p.into_inner());
                self.apply(&mut books, d)
            });
            *self.stats.channel.lock().unwrap_or_else(|p| p.into_inner()) =
                receiver.stats().clone();
            self.stats
                .held_now
                .store(receiver.held_now() as u64, Ordering::Relaxed);
            let received = match received {
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
                Received::Applied {
                    from,
                    sender,
                    seq,
                    datagrams,
                    records,
                } => {
                    self.stats
                        .accepted_datagrams
                        .fetch_add(datagrams as u64, Ordering::Relaxed);
                    self.stats
                        .accepted_records
                        .fetch_add(records as u64, Ordering::Relaxed);
                    vmm_core::events::bus().emit(
                        "edge_verdicts",
                        &serde_json::json!({
                            "edge": self.config.name, "from": from.to_string(), "sender": sender,
                            "seq": seq, "datagrams": datagrams, "records": records,
                            "applied": true,
                            "apply_ms": self.last_apply_us() as f64 / 1e3,
                        }),
                    );
                }
                Received::Held { .. } | Received::Duplicate { .. } => {}
                Received::NotApplied { from, sender, seq } => {
                    vmm_core::events::bus().emit(
                        "edge_verdicts",
                        &serde_json::json!({
                            "edge": self.config.name, "from": from.to_string(), "sender": sender,
                            "seq": seq, "applied": false,
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

    /// Fences host `sender` (the cluster declared it dead): every tenant it attached last is
    /// flushed from the micro-VM (verdicts, flows, address), and its datagrams are not applied
    /// until [`Edge::readmit_host`]. Returns the flushed tenants once the micro-VM took the
    /// flushes, or `None` if it did not within 2 s (they are in its ring, applied in order).
    pub fn fence_host(&self, sender: u32) -> Option<Vec<u32>> {
        // The book's lock orders this against the datagram being applied now.
        let mut books = self.books.lock().unwrap_or_else(|p| p.into_inner());
        self.fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sender);
        let flushed: Vec<u32> = books.owners.tenants_of(sender);
        let mut unbind = Vec::new();
        books.owners.forget_tenants(&flushed, &mut unbind);
        self.change_bindings(&unbind);
        self.publish_book(&books.owners);
        if flushed.is_empty() {
            return Some(flushed);
        }
        let records: Vec<[u8; RECORD_LEN]> = flushed
            .iter()
            .map(|t| VerdictRepr::flush_tenant(*t, 0).to_bytes())
            .collect();
        // In chunks the ring can hold, each retried while the ring is full.
        let deadline = Instant::now() + APPLY_LIMIT;
        let mut taken = true;
        for chunk in records.chunks(32) {
            let position = loop {
                match self.region.push_tracked(chunk) {
                    Ok(position) => break Some(position),
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(_) => break None,
                }
            };
            taken &= position.is_some_and(|p| {
                self.region
                    .wait_consumed(p, deadline.saturating_duration_since(Instant::now()))
            });
        }
        self.stats
            .restart_flushes
            .fetch_add(flushed.len() as u64, Ordering::Relaxed);
        taken.then_some(flushed)
    }

    /// Holds host `sender` to keys of its own, by id (ids 1 and up; the cluster's keys of that
    /// host): from now on only they open its datagrams, the shared key no longer does. An empty
    /// list takes them away: its datagrams then open only under the shared key, if there is one.
    pub fn set_host_keys(&self, sender: u32, keys: Vec<(u16, Vec<u8>)>) -> std::io::Result<()> {
        let ids: Vec<u16> = keys.iter().map(|(id, _)| *id).collect();
        self.keyring
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .set_sender(sender, keys)?;
        log::info!("edge {}: sender {sender} keys {ids:?}", self.config.name);
        Ok(())
    }

    /// The hosts held to keys of their own, with their key ids (never the keys), and whether
    /// a shared key is configured.
    pub fn key_ids(&self) -> (std::collections::BTreeMap<u32, Vec<u16>>, bool) {
        let keyring = self.keyring.read().unwrap_or_else(|p| p.into_inner());
        (keyring.key_ids(), keyring.has_shared())
    }

    /// Applies host `sender`'s datagrams again (it registered anew); whether it was fenced.
    pub fn readmit_host(&self, sender: u32) -> bool {
        self.fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sender)
    }

    /// This run's boot id (hosts address their datagrams to it).
    pub fn boot_id(&self) -> u64 {
        self.boot_id
    }

    /// The channel's delivery counters: (held now, duplicates, acks sent, datagrams not yet
    /// taken, hosts restarted, tenants flushed for them).
    pub fn channel_counters(&self) -> serde_json::Value {
        let c = self
            .stats
            .channel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (own_keys, shared_key) = self.key_ids();
        let own_keys: BTreeMap<String, Vec<u16>> = own_keys
            .into_iter()
            .map(|(sender, ids)| (sender.to_string(), ids))
            .collect();
        serde_json::json!({
            "shared_key": shared_key,
            "host_key_ids": own_keys,
            "accepted_datagrams": c.accepted_datagrams,
            "held_now": self.stats.held_now.load(Ordering::Relaxed),
            "held": c.held,
            "duplicates": c.duplicates,
            "not_applied": c.not_applied,
            "acks_sent": c.acks_sent,
            "sender_restarts": c.sender_restarts,
            "restart_flushed_tenants": self.stats.restart_flushes.load(Ordering::Relaxed),
            "verdicts_refused": *self.stats.verdicts_refused.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }

    /// Hosts trusted on the cloud port, and frames refused from untrusted underlay senders.
    pub fn underlay_counters(&self) -> (usize, u64) {
        (self.trust.len(), self.trust.refused())
    }

    /// Frames from a trusted host refused because they spoke for an address another host (or
    /// the underlay) holds.
    pub fn foreign_source_frames(&self) -> u64 {
        self.trust.foreign()
    }

    /// The book of who attached what: sizes, handovers, refusals, the underlay's addresses.
    pub fn ownership(&self) -> serde_json::Value {
        let ((hosts, tenants, addresses, underlay), handovers, addrs) = self
            .stats
            .book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        serde_json::json!({
            "hosts": hosts,
            "tenants": tenants,
            "addresses": addresses,
            "underlay_addresses": underlay,
            "underlay": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "handovers": handovers,
            "claim_waits": self.stats.claim_waits.load(Ordering::Relaxed),
            "refused_records": *self.stats.refused_records.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }

    /// Authentic records the book refused, all reasons.
    pub fn refused_records(&self) -> u64 {
        self.stats
            .refused_records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
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

/// The edge's own underlay addresses: the control and cloud sockets' addresses when they name
/// one, else every address of the network namespace the edge runs in (its underlay: the outside
/// is a TAP, usually in another namespace; when it is in this one, that interface's addresses are
/// left out). Loopback and link-local addresses are left out: the firewall refuses them from the
/// outside anyway.
fn own_underlay_addrs(config: &EdgeConfig) -> Vec<std::net::IpAddr> {
    let cloud_ip = match &config.cloud.backend {
        NetBackend::Vxlan { local, .. } => Some(local.ip()),
        NetBackend::Tap { .. } => None,
    };
    let outside_here = match &config.outside.backend {
        NetBackend::Tap { name, netns: None } => Some(name.clone()),
        _ => None,
    };
    let wanted = |ip: &std::net::IpAddr| match ip {
        std::net::IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local() && !a.is_unspecified(),
        std::net::IpAddr::V6(a) => {
            !a.is_loopback() && !a.is_unspecified() && (a.segments()[0] & 0xffc0) != 0xfe80
        }
    };
    let named: Vec<std::net::IpAddr> = [Some(config.control.ip()), cloud_ip]
        .into_iter()
        .flatten()
        .filter(|ip| !ip.is_unspecified())
        .collect();
    let mut addrs: Vec<std::net::IpAddr> = if named.len() == 2 {
        named
    } else {
        let mut all = interface_addrs(outside_here.as_deref());
        all.extend(named);
        all
    };
    addrs.retain(wanted);
    addrs.sort();
    addrs.dedup();
    addrs
}

/// Every interface address of this network namespace (`getifaddrs(3)`), but those of `skip`.
fn interface_addrs(skip: Option<&str>) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            log::warn!(
                "the edge's underlay addresses: getifaddrs: {}",
                std::io::Error::last_os_error()
            );
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy();
            if skip == Some(name.as_ref()) {
                continue;
            }
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    out.push(std::net::IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    out.push(std::net::IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        libc::freeifaddrs(list);
    }
    out
}
