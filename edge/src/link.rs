//! A host's sending end of the verdict channel: signs verdict records into numbered datagrams,
//! sends them to the edge, and retransmits each until the edge acknowledges it.
//!
//! Owns: the host's run (its epoch and sequence numbers), the edge boot id it addresses, the
//! window of unacknowledged datagrams, the retransmission timers (exponential backoff from
//! [`LinkConfig::rto_initial`] up to [`LinkConfig::rto_max`]), the thread that reads acks and
//! retransmits, and the reachability of the edge (`edge_unreachable` / `edge_reachable`
//! events). Must not: decide what to send (the host's tiers do), or block a caller on the network
//! (a full window is an error at once, [`LinkError::Backlog`]).
//!
//! Runs and restarts:
//! - a run's epoch is its first sequence number; [`VerdictLink::connect`] takes the first one
//!   from the caller (a host takes the wall clock in microseconds, above any number an earlier
//!   run of it used). Should the edge follow a newer run of this sender id than ours (the clock
//!   went back), its ack names that run and we start a new one above it.
//! - the edge's boot id is learned from its first ack (the link sends an empty datagram at once
//!   to get one). When it changes, the edge restarted and remembers nothing of ours: the
//!   unacknowledged datagrams are renumbered into a new run and sent again, the
//!   `edge_restarted` event reports it, and the host's hook ([`VerdictLink::on_edge_restart`])
//!   re-sends what still stands (what the old edge applied is gone with it).
//!
//! Datagrams are acknowledged cumulatively and in order, so the window is a queue: the oldest
//! unacknowledged datagram is at the front. Each datagram keeps a ticket (a number that survives
//! renumbering) for [`VerdictLink::wait_acked`].
//!
//! Refusals: the edge's tables may refuse a verdict (a tenant's quota, a full table, a tenant
//! the host does not own there). Its acks say how many more verdicts it takes for certain (the
//! room) and which records of its recent datagrams it refused. A batch the room covers is
//! certain ([`Queued::certain`]); for one it does not, the caller waits for the verdict with
//! [`VerdictLink::wait_outcome`]. A refusal of a batch nobody waits for (the room was wrong:
//! other hosts filled the shared table first) goes to the host's hook
//! ([`VerdictLink::on_refused`]), which takes the verdict back at its own tier. A claim of a
//! tenant's address is always waited for ([`VerdictLink::send_awaited`]), whatever the room:
//! the room counts verdicts, and a claim's refusal (a collision) is for its sender to handle.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vigil_wire::ack::{claimed_key_id, open_ack, Refusal, ACK_LEN};
use vigil_wire::auth::{self, Header, MAX_DATAGRAM, MAX_RECORDS};
use vigil_wire::verdict::RECORD_LEN;

use crate::channel::check_key;

/// Timers and bounds of a link.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// First retransmission after this long without an ack (doubling each time).
    pub rto_initial: Duration,
    /// Longest wait between retransmissions of one datagram.
    pub rto_max: Duration,
    /// Unacknowledged datagrams accepted for verdicts ([`Class::Verdict`]).
    pub window: usize,
    /// Unacknowledged datagrams accepted in all, control records ([`Class::Control`]) included:
    /// revocations get room that verdicts cannot take.
    pub control_window: usize,
    /// The edge counts as unreachable once the oldest datagram waits this long for its ack.
    pub unreachable_after: Duration,
    /// The underlay address to send from (`None`: the one the route to the edge picks). The
    /// edge binds the host's tenants to the address its datagrams come from.
    pub local: Option<IpAddr>,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            rto_initial: Duration::from_millis(10),
            rto_max: Duration::from_millis(500),
            window: 256,
            control_window: 1024,
            unreachable_after: Duration::from_secs(2),
            local: None,
        }
    }
}

/// What a batch of records is, for the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Verdicts of tenants' calls: refused once [`LinkConfig::window`] datagrams wait.
    Verdict,
    /// The host's own records (attach, flush): room up to [`LinkConfig::control_window`].
    Control,
}

/// Why records were not queued.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{outstanding} datagrams to the edge are unacknowledged (the edge is unreachable or slow); refused")]
    Backlog { outstanding: usize },
    #[error("verdict sequence numbers exhausted")]
    Exhausted,
}

/// Link counters (all since the link started).
#[derive(Debug, Default)]
pub struct LinkStats {
    pub sent_datagrams: AtomicU64,
    pub sent_records: AtomicU64,
    pub retransmits: AtomicU64,
    pub acked_datagrams: AtomicU64,
    pub acks_received: AtomicU64,
    /// Acks that failed authentication or named another sender.
    pub acks_rejected: AtomicU64,
    /// Authentic acks of another edge run about another run of this sender (replayed).
    pub acks_stale: AtomicU64,
    pub refused_batches: AtomicU64,
    /// Records the edge's tables refused (its acks said so).
    pub refused_records: AtomicU64,
    /// Refused batches nobody waited for (each handed to the hook once).
    pub refused_unwaited: AtomicU64,
    pub send_errors: AtomicU64,
    pub edge_restarts: AtomicU64,
    pub new_runs: AtomicU64,
}

/// Where a queued batch went: its tickets (for [`VerdictLink::wait_acked`]) and, for the record,
/// the sequence numbers it got (a later new run renumbers them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queued {
    pub first_ticket: u64,
    pub last_ticket: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The edge's last word on its room covers this batch and everything before it still
    /// unacknowledged: its tables take every record of it.
    pub certain: bool,
}

/// What became of a waited batch at the edge ([`VerdictLink::wait_outcome`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeOutcome {
    /// Acknowledged, nothing refused.
    Applied,
    /// Acknowledged, and these records were refused (bit `i`: the batch's record `i`; a batch
    /// of more than 64 records refused beyond the 64th reads as all refused). `reason` is an
    /// [`vigil_wire::outcome::Outcome`] code.
    Refused { records: u64, reason: u8 },
    /// Not acknowledged within the limit: whether the edge applied it is unknown.
    Unconfirmed,
}

/// Who hears a queued batch's refusals: its sender, waiting ([`VerdictLink::wait_outcome`]),
/// or the [`VerdictLink::on_refused`] hook.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Waiter {
    /// The hook.
    None,
    /// The sender, unless the edge's room makes the batch certain (then the hook).
    UnlessCertain,
    /// The sender.
    Always,
}

/// What a host does with records the edge refused that nobody waited for: each with the
/// refusal's reason code.
pub type RefusedHook = Box<dyn Fn(&[[u8; RECORD_LEN]], u8) + Send + Sync>;

/// Waited batches' refusals kept for their waiters (the oldest go first).
const REPORTS_KEPT: usize = 256;

struct Pending {
    ticket: u64,
    seq: u64,
    records: Vec<[u8; RECORD_LEN]>,
    queued: Instant,
    next_send: Instant,
    rto: Duration,
    /// A caller waits for its outcome ([`VerdictLink::wait_outcome`]): a refusal goes to it,
    /// not to the hook.
    waited: bool,
}

struct State {
    epoch: u64,
    next_seq: u64,
    /// 0 until the first ack.
    edge_boot: u64,
    next_ticket: u64,
    outstanding: VecDeque<Pending>,
    /// Records in `outstanding`.
    outstanding_records: usize,
    /// The edge's room as of its ack with the highest `next` in this run (`room_next`).
    room: u64,
    room_next: u64,
    /// Refusals of waited datagrams: (ticket, refused record bitmap, reason).
    reports: VecDeque<(u64, u32, u8)>,
    unreachable: bool,
}

/// Keys the link keeps from earlier rotations, to open acks sealed with them.
const KEPT_OLD_KEYS: usize = 3;

/// The key datagrams are sealed with now, by id, and the few before it (acks for datagrams sent
/// under them may still arrive).
struct LinkKeys {
    current: (u16, Vec<u8>),
    old: VecDeque<(u16, Vec<u8>)>,
}

impl LinkKeys {
    fn get(&self, id: u16) -> Option<&[u8]> {
        std::iter::once(&self.current)
            .chain(self.old.iter())
            .find(|(k, _)| *k == id)
            .map(|(_, key)| key.as_slice())
    }
}

struct Shared {
    socket: UdpSocket,
    /// The address the socket sends from, signed into every datagram: the edge takes this
    /// host's datagrams only from it (a copy relayed from elsewhere is refused).
    underlay: Option<IpAddr>,
    keys: Mutex<LinkKeys>,
    sender: u32,
    config: LinkConfig,
    state: Mutex<State>,
    acked: Condvar,
    stop: AtomicBool,
    stats: LinkStats,
    /// Called (on the link's thread, no lock held) when the edge turns out to have restarted.
    on_edge_restart: Mutex<Option<EdgeRestartHook>>,
    /// Called (on the link's thread, no lock held) with refused records nobody waited for.
    on_refused: Mutex<Option<RefusedHook>>,
}

/// What a host does when its edge restarted (re-send what still stands: the edge lost it).
pub type EdgeRestartHook = Box<dyn Fn() + Send + Sync>;

/// A host's reliable link to one edge.
pub struct VerdictLink {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A first sequence number above any an earlier run of this host used: the wall clock in
/// microseconds (non-zero).
pub fn first_seq_from_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
        .max(1)
}

fn emit(kind: &str, sender: u32, extra: serde_json::Value) {
    let mut body = serde_json::json!({ "sender": sender });
    if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    vmm_core::events::bus().emit(kind, &body);
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seals and sends one pending datagram under the current run and edge boot id.
    fn transmit(&self, state: &State, p: &Pending) {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let (key_id, key) = &keys.current;
        let header = Header {
            key_id: *key_id,
            sender: self.sender,
            seq: p.seq,
            epoch: state.epoch,
            edge_boot: state.edge_boot,
            timestamp_ms: now_ms(),
            underlay: self.underlay,
        };
        let mut datagram = [0u8; MAX_DATAGRAM];
        let sent = auth::seal(key, &header, &p.records, &mut datagram)
            .map_err(io::Error::other)
            .and_then(|len| self.socket.send(&datagram[..len]));
        match sent {
            Ok(_) => {
                self.stats.sent_datagrams.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // Retransmitted on its timer like a lost datagram (e.g. ICMP port unreachable
                // from an edge that is not up yet surfaces here as ConnectionRefused).
                log::debug!("verdict datagram to the edge not sent: {e}");
                self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Starts a new run at `epoch`: the outstanding datagrams are renumbered from it, in order,
    /// and due at once.
    fn new_run(&self, state: &mut State, epoch: u64) {
        state.epoch = epoch;
        let now = Instant::now();
        let mut seq = epoch;
        for p in state.outstanding.iter_mut() {
            p.seq = seq;
            seq += 1;
            p.next_send = now;
            p.rto = self.config.rto_initial;
        }
        state.next_seq = seq;
        // The room was the old run's word (or the old edge's).
        state.room = 0;
        state.room_next = 0;
        self.stats.new_runs.fetch_add(1, Ordering::Relaxed);
    }

    fn on_ack(&self, bytes: &[u8]) {
        let mut unwaited = Vec::new();
        let restarted = self.take_ack(bytes, &mut unwaited);
        if !unwaited.is_empty() {
            self.stats
                .refused_unwaited
                .fetch_add(unwaited.len() as u64, Ordering::Relaxed);
            let hook = self.on_refused.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hook) = hook.as_ref() {
                for (records, reason) in &unwaited {
                    hook(records, *reason);
                }
            }
        }
        if restarted {
            let hook = self
                .on_edge_restart
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(hook) = hook.as_ref() {
                hook();
            }
        }
    }

    /// Applies an ack; whether it revealed a restarted edge. Refused records of datagrams
    /// nobody waits for go to `unwaited` (with the reason code).
    fn take_ack(&self, bytes: &[u8], unwaited: &mut Vec<(Vec<[u8; RECORD_LEN]>, u8)>) -> bool {
        let opened = {
            let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            claimed_key_id(bytes)
                .and_then(|id| keys.get(id))
                .map(|key| open_ack(key, bytes))
        };
        let ack = match opened {
            Some(Ok(ack)) if ack.sender == self.sender => ack,
            _ => {
                self.stats.acks_rejected.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        };
        self.stats.acks_received.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        if ack.edge_boot != state.edge_boot && ack.epoch != state.epoch {
            // Another run of the edge speaks of another run of ours: an ack recorded before one
            // of them restarted, replayed (authentic, but not fresh). Believed, it made this host
            // start a new run and re-send everything, and the edge flush all of this host's
            // tenants, as often as it was replayed. A restarted edge answers a datagram of this
            // run, so it is heard from that ack on.
            self.stats.acks_stale.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if ack.edge_boot != state.edge_boot {
            let first_contact = state.edge_boot == 0;
            state.edge_boot = ack.edge_boot;
            if first_contact {
                // Nothing of ours was applied by any edge yet (it applies only datagrams naming
                // its boot id): the same run, sent again now with the id.
                let now = Instant::now();
                for p in state.outstanding.iter_mut() {
                    p.next_send = now;
                }
            } else {
                self.stats.edge_restarts.fetch_add(1, Ordering::Relaxed);
                let epoch = state.next_seq;
                self.new_run(&mut state, epoch);
                emit(
                    "edge_restarted",
                    self.sender,
                    serde_json::json!({"edge_boot": format!("{:#x}", ack.edge_boot),
                        "resent": state.outstanding.len()}),
                );
                return true;
            }
            return false;
        }
        if ack.epoch > state.epoch {
            // The edge follows a newer run of this sender id than ours: start one above it.
            let epoch = state.next_seq.max(ack.epoch.saturating_add(1));
            self.new_run(&mut state, epoch);
            return false;
        }
        if ack.epoch != state.epoch || ack.next == 0 {
            return false;
        }
        if ack.next >= state.room_next {
            state.room = u64::from(ack.room);
            state.room_next = ack.next;
        }
        let refusal_of =
            |seq: u64| -> Option<&Refusal> { ack.refusals().iter().find(|r| r.seq == seq) };
        let mut acked = 0;
        while state.outstanding.front().is_some_and(|p| p.seq < ack.next) {
            let Some(p) = state.outstanding.pop_front() else {
                break;
            };
            state.outstanding_records -= p.records.len();
            acked += 1;
            let Some(refusal) = refusal_of(p.seq) else {
                continue;
            };
            self.stats
                .refused_records
                .fetch_add(u64::from(refusal.records.count_ones()), Ordering::Relaxed);
            if p.waited {
                if state.reports.len() == REPORTS_KEPT {
                    state.reports.pop_front();
                }
                state
                    .reports
                    .push_back((p.ticket, refusal.records, refusal.reason));
            } else {
                let refused: Vec<[u8; RECORD_LEN]> = p
                    .records
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| refusal.records & (1u32 << (*i as u32 & 31)) != 0)
                    .map(|(_, r)| *r)
                    .collect();
                unwaited.push((refused, refusal.reason));
            }
        }
        if acked > 0 {
            self.stats
                .acked_datagrams
                .fetch_add(acked, Ordering::Relaxed);
            if state.unreachable {
                state.unreachable = false;
                emit(
                    "edge_reachable",
                    self.sender,
                    serde_json::json!({"outstanding": state.outstanding.len()}),
                );
            }
            self.acked.notify_all();
        }
        false
    }

    /// Retransmits what is due; returns when the next datagram falls due.
    fn retransmit_due(&self) -> Option<Instant> {
        let mut state = self.lock();
        let now = Instant::now();
        let mut due = Vec::new();
        for (i, p) in state.outstanding.iter_mut().enumerate() {
            if p.next_send <= now {
                p.next_send = now + p.rto;
                p.rto = (p.rto * 2).min(self.config.rto_max);
                due.push(i);
            }
        }
        for i in due {
            self.transmit(&state, &state.outstanding[i]);
            self.stats.retransmits.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(oldest) = state.outstanding.front() {
            let waited = now.duration_since(oldest.queued);
            if waited >= self.config.unreachable_after && !state.unreachable {
                state.unreachable = true;
                log::warn!(
                    "the edge has not acknowledged verdict datagrams for {waited:?} ({} waiting)",
                    state.outstanding.len()
                );
                emit(
                    "edge_unreachable",
                    self.sender,
                    serde_json::json!({"outstanding": state.outstanding.len(),
                        "waited_ms": waited.as_millis() as u64}),
                );
            }
        }
        state.outstanding.iter().map(|p| p.next_send).min()
    }

    /// The link's thread: reads acks and retransmits on time, sleeping in `recv` in between.
    fn run(&self) {
        let mut buf = [0u8; ACK_LEN + 1];
        let mut timeout = None;
        while !self.stop.load(Ordering::Acquire) {
            let wait = self
                .retransmit_due()
                .map_or(Duration::from_millis(100), |at| {
                    at.saturating_duration_since(Instant::now())
                })
                .clamp(Duration::from_millis(1), Duration::from_millis(100));
            if timeout != Some(wait) {
                if let Err(e) = self.socket.set_read_timeout(Some(wait)) {
                    log::warn!("verdict link: {e}");
                    std::thread::sleep(wait);
                    continue;
                }
                timeout = Some(wait);
            }
            match self.socket.recv(&mut buf) {
                Ok(len) => self.on_ack(&buf[..len]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                // ICMP errors from an edge that is down come back on a connected socket: the
                // timers retry; sleep the wait so a refusing edge is no busy loop.
                Err(_) => std::thread::sleep(wait),
            }
        }
    }
}

impl VerdictLink {
    /// A link from sender `sender` to the edge's control address, its run starting at
    /// `first_seq` (non-zero; see [`first_seq_from_clock`]). Sends an empty datagram at once to
    /// learn the edge's boot id.
    pub fn connect(
        edge: impl ToSocketAddrs,
        key: Vec<u8>,
        sender: u32,
        first_seq: u64,
        config: LinkConfig,
    ) -> io::Result<VerdictLink> {
        VerdictLink::connect_keyed(edge, (0, key), sender, first_seq, config)
    }

    /// [`VerdictLink::connect`] signing with key `key_id` (0: the edge's shared key; 1 and up:
    /// this host's own keys, which the edge holds by the same ids).
    pub fn connect_keyed(
        edge: impl ToSocketAddrs,
        (key_id, key): (u16, Vec<u8>),
        sender: u32,
        first_seq: u64,
        config: LinkConfig,
    ) -> io::Result<VerdictLink> {
        check_key(&key)?;
        if first_seq == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "sequence numbers start at 1",
            ));
        }
        let edge = edge.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the edge's control address resolves to nothing",
            )
        })?;
        let local: SocketAddr = match (config.local, edge) {
            (Some(ip), _) => (ip, 0).into(),
            (None, SocketAddr::V4(_)) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            (None, SocketAddr::V6(_)) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local)?;
        socket.connect(edge)?;
        // Connected: the kernel chose the source address its datagrams carry.
        let underlay = Some(socket.local_addr()?.ip()).filter(|ip| !ip.is_unspecified());
        let shared = Arc::new(Shared {
            socket,
            underlay,
            keys: Mutex::new(LinkKeys {
                current: (key_id, key),
                old: VecDeque::new(),
            }),
            sender,
            config,
            state: Mutex::new(State {
                epoch: first_seq,
                next_seq: first_seq,
                edge_boot: 0,
                next_ticket: 1,
                outstanding: VecDeque::new(),
                outstanding_records: 0,
                room: 0,
                room_next: 0,
                reports: VecDeque::new(),
                unreachable: false,
            }),
            acked: Condvar::new(),
            stop: AtomicBool::new(false),
            stats: LinkStats::default(),
            on_edge_restart: Mutex::new(None),
            on_refused: Mutex::new(None),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("edge-link".into())
            .spawn(move || worker.run())?;
        let link = VerdictLink {
            shared,
            thread: Some(thread),
        };
        link.send(&[], Class::Control)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(link)
    }

    /// Queues `records` ([`MAX_RECORDS`] per datagram, in order, all or none) and sends them at
    /// once; they are retransmitted until acknowledged. An empty batch is one empty datagram.
    pub fn send(&self, records: &[[u8; RECORD_LEN]], class: Class) -> Result<Queued, LinkError> {
        self.queue(records, class, Waiter::None)
    }

    /// [`send`](Self::send) for a caller that will wait for the outcome unless it is certain
    /// ([`Queued::certain`]): then call [`wait_outcome`](Self::wait_outcome) with it, and a
    /// refusal goes to that call instead of the [`on_refused`](Self::on_refused) hook.
    pub fn send_waited(
        &self,
        records: &[[u8; RECORD_LEN]],
        class: Class,
    ) -> Result<Queued, LinkError> {
        self.queue(records, class, Waiter::UnlessCertain)
    }

    /// [`send`](Self::send) for a caller that waits for the outcome whatever the room says (a
    /// claim: the room counts verdicts): call [`wait_outcome`](Self::wait_outcome) with it; a
    /// refusal always goes to that call, never to the [`on_refused`](Self::on_refused) hook.
    pub fn send_awaited(
        &self,
        records: &[[u8; RECORD_LEN]],
        class: Class,
    ) -> Result<Queued, LinkError> {
        self.queue(records, class, Waiter::Always)
    }

    fn queue(
        &self,
        records: &[[u8; RECORD_LEN]],
        class: Class,
        waiter: Waiter,
    ) -> Result<Queued, LinkError> {
        let shared = &self.shared;
        let datagrams = records.len().div_ceil(MAX_RECORDS).max(1);
        let limit = match class {
            Class::Verdict => shared.config.window,
            Class::Control => shared.config.control_window,
        };
        let mut state = shared.lock();
        if state.outstanding.len() + datagrams > limit {
            shared.stats.refused_batches.fetch_add(1, Ordering::Relaxed);
            return Err(LinkError::Backlog {
                outstanding: state.outstanding.len(),
            });
        }
        let now = Instant::now();
        let first_seq = state.next_seq;
        let first_ticket = state.next_ticket;
        let certain = state.edge_boot != 0
            && (state.outstanding_records + records.len()) as u64 <= state.room;
        let waited = match waiter {
            Waiter::None => false,
            Waiter::UnlessCertain => !certain,
            Waiter::Always => true,
        };
        let mut chunks: Vec<&[[u8; RECORD_LEN]]> = records.chunks(MAX_RECORDS).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let seq = state.next_seq;
            state.next_seq = seq.checked_add(1).ok_or(LinkError::Exhausted)?;
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let p = Pending {
                ticket,
                seq,
                records: chunk.to_vec(),
                queued: now,
                next_send: now + shared.config.rto_initial,
                rto: (shared.config.rto_initial * 2).min(shared.config.rto_max),
                waited,
            };
            shared.transmit(&state, &p);
            shared
                .stats
                .sent_records
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            state.outstanding_records += p.records.len();
            state.outstanding.push_back(p);
        }
        Ok(Queued {
            first_ticket,
            last_ticket: state.next_ticket - 1,
            first_seq,
            last_seq: state.next_seq - 1,
            certain,
        })
    }

    /// Waits up to `limit` until the edge acknowledged `queued` (sent with
    /// [`send_waited`](Self::send_waited)), and says which of its records the edge refused.
    pub fn wait_outcome(&self, queued: &Queued, limit: Duration) -> EdgeOutcome {
        if !self.wait_acked(queued.last_ticket, limit) {
            return EdgeOutcome::Unconfirmed;
        }
        let mut state = self.shared.lock();
        let (mut records, mut reason) = (0u64, None);
        state.reports.retain(|(ticket, refused, why)| {
            if !(queued.first_ticket..=queued.last_ticket).contains(ticket) {
                return true;
            }
            let shift = (ticket - queued.first_ticket) * MAX_RECORDS as u64;
            records |= if shift < 64 {
                u64::from(*refused) << shift
            } else {
                u64::MAX
            };
            reason.get_or_insert(*why);
            false
        });
        match reason {
            None => EdgeOutcome::Applied,
            Some(reason) => EdgeOutcome::Refused { records, reason },
        }
    }

    /// Calls `hook` with records the edge refused in batches nobody waited for (see the
    /// module's Refusals).
    pub fn on_refused(&self, hook: RefusedHook) {
        *self
            .shared
            .on_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Waits until every datagram up to `ticket` is acknowledged, or `limit` passes; whether it
    /// was.
    pub fn wait_acked(&self, ticket: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut state = self.shared.lock();
        loop {
            if state.outstanding.front().is_none_or(|p| p.ticket > ticket) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .shared
                .acked
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Calls `hook` whenever the edge turns out to have restarted (after the unacknowledged
    /// datagrams went out again in a new run): the host re-sends what still stands.
    pub fn on_edge_restart(&self, hook: EdgeRestartHook) {
        *self
            .shared
            .on_edge_restart
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Signs with key `key_id` from now on (a rotation). Datagrams not yet acknowledged are
    /// sealed with it when sent again; acks sealed with the last few keys before it still count.
    pub fn set_key(&self, key_id: u16, key: Vec<u8>) -> io::Result<()> {
        check_key(&key)?;
        let mut keys = self.shared.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.current.0 == key_id {
            keys.current.1 = key;
            return Ok(());
        }
        let before = std::mem::replace(&mut keys.current, (key_id, key));
        keys.old.retain(|(id, _)| *id != key_id);
        keys.old.push_front(before);
        keys.old.truncate(KEPT_OLD_KEYS);
        Ok(())
    }

    /// The id of the key datagrams are sealed with now.
    pub fn key_id(&self) -> u16 {
        self.shared
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .current
            .0
    }

    /// Datagrams waiting for their ack.
    pub fn outstanding(&self) -> usize {
        self.shared.lock().outstanding.len()
    }

    /// Whether the edge is overdue with its acks (see [`LinkConfig::unreachable_after`]).
    pub fn unreachable(&self) -> bool {
        self.shared.lock().unreachable
    }

    /// The edge's boot id, once an ack told it (0 before).
    pub fn edge_boot(&self) -> u64 {
        self.shared.lock().edge_boot
    }

    /// The counters.
    pub fn stats(&self) -> &LinkStats {
        &self.shared.stats
    }

    /// The local address datagrams leave from.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.socket.local_addr()
    }
}

impl Drop for VerdictLink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
