//! The default-deny stateful packet filter.
//!
//! A frame is judged for one tenant in one [`Direction`] (the caller knows both from the switch
//! port it arrived on and the port it leaves by; tenant-to-tenant traffic is judged twice: egress
//! for the sender, ingress for the receiver). Outcomes:
//! - ARP and IPv6 neighbour solicitation/advertisement pass (tenants and the gateway need them;
//!   from a tenant port the switch first checks them field by field, answers what it knows and
//!   resolves on the tenant's behalf what it may, so no tenant-built request reaches the uplink
//!   ([`Filter::admit`], [`neighbor`]); `admit` also checks every frame's Ethernet and IP source
//!   against the port's attachment: [`hygiene`]; the edge lets in from the outside only its
//!   gateways' requests for and answers to tenants, and the switch believes an unsolicited claim
//!   from the uplink only for an address nobody holds: [`Neighbors`]);
//! - a packet of a tracked flow passes if it fits the flow's state (either direction: the reply
//!   direction of a tracked flow passes);
//! - an opening packet (TCP SYN, any UDP datagram, ICMP echo request) passes if a verdict opens it,
//!   and creates a conntrack entry;
//! - an ICMP error passes if the packet it quotes belongs to a tracked flow (and, for TCP, its
//!   quoted sequence number is one its sender has in flight: [`DropReason::IcmpOutOfWindow`]),
//!   it is addressed to the quoted packet's sender (and, from a tenant, sent by the quoted
//!   packet's destination), and it is no longer than RFC 1812 / RFC 4443 allow (576 bytes for
//!   IPv4, 1280 for IPv6): otherwise [`DropReason::IcmpUnsupported`];
//! - everything else is dropped and counted by [`DropReason`].
//!
//! TCP is tracked by sequence numbers as well as flags ([`FlowSlot::track`]): a segment outside
//! its flow's window is dropped as [`DropReason::TcpOutOfWindow`], and a RST closes the flow only
//! when its sequence number is exactly the expected one (an in-window but inexact RST passes to
//! the endpoint, which answers it with a challenge ACK, RFC 5961, and only shortens the entry's
//! timeout here). Half-open TCP entries are bounded per tenant and globally
//! ([`conntrack::HalfOpenLimits`]): a SYN over the limit replaces the oldest half-open entry of its
//! tenant (or of a tenant with more of them), never an established flow, so a legitimate
//! handshake completes during a SYN flood as long as it is not among the oldest ones. Beyond a
//! lower threshold the edge answers SYNs from the outside itself with SYN cookies and creates
//! state only for completed handshakes ([`synproxy`], [`Filter::process_edge_mut`]). Every tenant
//! holds at most its quota of conntrack entries ([`Conntrack::at_quota`],
//! [`DropReason::FlowQuota`]), so one tenant filling its share leaves the others working.
//! Unreplied UDP and ICMP echo entries are provisional as half-open ones are (one forged datagram
//! makes one): those opened toward a tenant are bounded by its inbound quota
//! ([`Conntrack::inbound_full`], an eighth of the table by default; beyond it its own entry of
//! that kind that expires soonest makes room), and a tenant at its flow quota, or a new flow
//! finding the table full, replaces an unreplied entry (its own, or one opened toward a tenant
//! holding more of them) before it is refused. A flood from forged sources thus holds neither a
//! tenant at its quota nor the table full; once the other side answers, an entry is never evicted
//! (for an entry opened toward the tenant, once the far side speaks again after the tenant's
//! answer: a tenant answers forged datagrams and pings too; `conntrack::confirms`).
//!
//! An [`Op::Adopt`] verdict also takes over flows established elsewhere (a tenant that migrated
//! here mid-connection): a TCP segment with ACK and without SYN or RST, or a UDP datagram
//! travelling against the verdict's direction, that matches it and finds no entry creates an
//! entry instead of being dropped. A plain `Add` never does (a mid-stream pick-up is dropped as
//! before). An adopted TCP entry is provisional ([`TcpState::Adopted`]: half-open, short-lived)
//! until the other side answers in window, since anyone can forge the segment that creates it.
//!
//! Who a frame belongs to is the caller's business in the switch role (the port it arrived on,
//! from [`Tenancy`]); in the edge role [`Filter::process_edge`] finds the tenant from the address
//! table. Both tables are filled by [`Op::Attach`] records (see [`tenancy`]).
//!
//! All state lives in caller-supplied slices sized at construction; the data path never
//! allocates. Time comes from the caller as monotonic nanoseconds; the filter has no clock.

mod admission;
mod adoption;
pub mod conntrack;
pub mod flow;
pub mod hygiene;
pub mod neighbor;
pub mod parse;
pub mod synproxy;
pub mod tenancy;
pub mod verdicts;
mod window_sample;

pub use conntrack::{
    default_flow_quota, slots_for, table_slots_for, Conntrack, Flow, FlowSlot, HalfOpenLimits,
    Probe, TcpExt, TcpState, TcpWindow, Timeouts, Track, V6Addrs, MAX_VERDICT_SLOTS,
};
pub use flow::FlowKey;
pub use hygiene::{Admit, Neighbors};
pub use parse::{parse, IpMeta, Parsed, TcpFlags, TcpSeg, L4};
pub use synproxy::{EdgeReplies, SynProxy};
pub use tenancy::{
    AttachError, PortIdentity, Tenancy, MAX_ADDRS, MAX_PORTS, PORT_ADDRS, UPLINK_TENANT,
};
pub use verdicts::{
    AddError, AddOutcome, IndexSlot, VerdictRef, VerdictSlot, VerdictTable, MAX_TENANTS,
};
pub use vigil_wire::ring::DropReason;
pub use vigil_wire::verdict::{Direction, IpVersion, Op, Protocol, Rule, VerdictRepr};

use vigil_wire::outcome::{Outcome, OutcomeWriter};
use vigil_wire::ring::{self, CountersWriter};
use vigil_wire::verdict::VerdictError;

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Forward,
    Drop(DropReason),
    /// (Edge, [`Filter::process_edge_mut`]) the SYN proxy consumed the frame and answered it (see
    /// [`EdgeReplies`]).
    Answered,
}

/// Filter counters (the micro-VM publishes them to the shared counters block).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub forwarded: u64,
    /// ARP frames passed (included in `forwarded`).
    pub arp: u64,
    /// Neighbour discovery frames passed (included in `forwarded`).
    pub ndp: u64,
    /// ARP requests and neighbour solicitations from tenant ports the switch answered itself.
    pub neighbor_answered: u64,
    /// Requests the switch sent to the uplink on a tenant port's behalf ([`neighbor`]).
    pub neighbor_resolved: u64,
    pub drops: [u64; DropReason::COUNT],
    pub flows_created: u64,
    pub flows_expired: u64,
    pub flows_revoked: u64,
    /// Flows taken over mid-stream through an [`Op::Adopt`] verdict (included in
    /// `flows_created`).
    pub flows_adopted: u64,
    /// Live half-open TCP entries removed to make room for a new SYN (SYN flood pressure).
    pub half_open_evicted: u64,
    /// Live unreplied UDP / ICMP echo entries removed to make room for a new entry (a tenant at
    /// its inbound or flow quota, or a full table).
    pub unreplied_evicted: u64,
    /// SYNs the edge's SYN proxy answered with a cookie (no state created).
    pub syncookies_sent: u64,
    /// ACKs whose cookie was valid: an entry was created and the SYN replayed to the tenant.
    pub syncookies_valid: u64,
    /// Proxied handshakes the tenant completed (its SYN-ACK acknowledged by the edge).
    pub synproxy_established: u64,
    pub verdicts_applied: u64,
    pub verdicts_rejected: u64,
    /// Verdicts refused because their tenant held its quota (included in `verdicts_rejected`).
    pub verdicts_over_quota: u64,
    /// Verdict records whose sequence number was not the previous one plus one.
    pub verdict_seq_gaps: u64,
    /// The last segment dropped as out of window and the windows it was judged against
    /// (`count` 0: none yet).
    pub last_out_of_window: ring::WindowSample,
}

impl Counters {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// Copy into the shared counters block (global and per-reason counters; per-port counters
    /// belong to the packet loop).
    pub fn publish(&self, w: &CountersWriter<'_>, flows_active: u64) {
        w.set_global(ring::GLOBAL_FORWARDED, self.forwarded);
        w.set_global(ring::GLOBAL_ARP, self.arp + self.ndp);
        w.set_global(ring::GLOBAL_VERDICTS_APPLIED, self.verdicts_applied);
        w.set_global(ring::GLOBAL_VERDICTS_REJECTED, self.verdicts_rejected);
        w.set_global(ring::GLOBAL_FLOWS_ACTIVE, flows_active);
        w.set_global(ring::GLOBAL_FLOWS_CREATED, self.flows_created);
        w.set_global(ring::GLOBAL_FLOWS_ADOPTED, self.flows_adopted);
        w.set_global(ring::GLOBAL_FLOWS_REVOKED, self.flows_revoked);
        for r in DropReason::ALL {
            w.set_drop(r, self.drops[r as usize]);
        }
        if self.last_out_of_window.count != 0 {
            w.set_sample(&self.last_out_of_window.to_words());
        }
    }
}

/// Filter configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub timeouts: Timeouts,
    /// Secret seed of the table hashes (from the boot information).
    pub hash_seed: u64,
    /// Slots a packet that finds the table full may sweep for expired entries before giving up.
    pub sweep_on_full: usize,
    /// Half-open limits; `None`: [`HalfOpenLimits::for_capacity`] of the flow table.
    pub half_open: Option<HalfOpenLimits>,
    /// Slots a SYN over the half-open limit (or a new flow finding the table full) may examine for
    /// an entry to replace.
    pub evict_scan: usize,
    /// The edge's SYN proxy; `None`: off (the switch, and an edge without a secret).
    pub synproxy: Option<SynProxy>,
    /// Most entries one tenant may hold; `None`: [`default_flow_quota`] of the flow table.
    pub flow_quota: Option<usize>,
    /// Most unreplied UDP / ICMP echo entries opened toward one tenant it may hold; `None`:
    /// [`conntrack::default_inbound_quota`] of the flow table.
    pub inbound_quota: Option<usize>,
    /// The caller vouches that the flow memory and the verdict index are all zero bytes already
    /// (an empty table, an empty index): they are not cleared, so their pages are not all
    /// touched at once (a micro-VM on the zeroed RAM its VMM handed over). Verdict slots are
    /// never cleared: each is written when first needed.
    pub tables_zeroed: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeouts: Timeouts::default(),
            hash_seed: 0x243f_6a88_85a3_08d3,
            sweep_on_full: 64,
            half_open: None,
            evict_scan: 512,
            synproxy: None,
            flow_quota: None,
            inbound_quota: None,
            tables_zeroed: false,
        }
    }
}

/// Why a verdict record was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyError {
    Invalid(VerdictError),
    /// No room for a new verdict.
    TableFull,
    /// The tenant holds its quota of verdicts (see [`VerdictTable::set_tenant_quota`]).
    OverQuota,
    /// `Remove` of a verdict that is not present.
    NotFound,
    /// An `Attach` the port/address tables refused.
    Attach(AttachError),
    /// A record for the edge's VMM ([`Op::Release`]): never a firewall's.
    NotForFirewall,
}

/// Which side of the edge a port is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeSide {
    /// The internet side (boot tenant 0).
    Outside,
    /// A cloud port: many tenants, told apart by address.
    Cloud,
}

/// Why the filter could not be built from the given storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupError {
    /// Fewer than 2 flow slots, or more than 2^32.
    FlowSlots,
    /// No verdict slot, more than [`MAX_VERDICT_SLOTS`], or an index not larger than the slab.
    VerdictSlots,
}

/// Seconds of the caller's monotonic clock (conntrack timeouts are whole seconds; a `u32` of
/// seconds lasts 136 years).
#[inline]
fn secs(now_ns: u64) -> u32 {
    (now_ns / 1_000_000_000).min(u64::from(u32::MAX)) as u32
}

pub struct Filter<'a> {
    conntrack: Conntrack<'a>,
    verdicts: VerdictTable<'a>,
    config: Config,
    counters: Counters,
    last_seq: u64,
    tenancy: Tenancy,
    neighbors: Neighbors,
    /// Neighbour frames each tenant port may still send to the uplink.
    neighbor_budget: neighbor::Budget,
    /// (Edge) neighbour frames the outside may still send in (bucket 0).
    outside_budget: neighbor::Budget,
    /// The SYN proxy's cookie function (`None`: no proxy).
    cookies: Option<synproxy::Cookies>,
    /// When the proxy last answered a SYN (ACKs are checked for cookies only while some may be
    /// out).
    last_cookie_s: Option<u32>,
    /// The frame being judged came from the outside through [`Filter::process_edge_mut`].
    proxy_here: bool,
    /// What the proxy decided about it.
    pending: synproxy::Pending,
}

impl<'a> Filter<'a> {
    /// Build a filter over caller-supplied storage (statics in the micro-VM, boxed slices on a
    /// host). `flows` should come from [`slots_for`]; `verdict_index` should be at least twice as
    /// long as `verdicts`.
    pub fn new(
        flows: &'a mut [FlowSlot],
        verdicts: &'a mut [VerdictSlot],
        verdict_index: &'a mut [IndexSlot],
        config: Config,
    ) -> Result<Filter<'a>, SetupError> {
        let mut conntrack = if config.tables_zeroed {
            Conntrack::new_empty(flows, config.hash_seed)
        } else {
            Conntrack::new(flows, config.hash_seed)
        }
        .ok_or(SetupError::FlowSlots)?;
        if let Some(limits) = config.half_open {
            conntrack.set_half_open_limits(limits);
        }
        conntrack.set_flow_quota(
            config
                .flow_quota
                .unwrap_or(default_flow_quota(conntrack.capacity())),
        );
        conntrack.set_inbound_quota(
            config
                .inbound_quota
                .unwrap_or(conntrack::default_inbound_quota(conntrack.capacity())),
        );
        let mut config = config;
        if let Some(p) = config.synproxy.as_mut() {
            // The proxy answers before the half-open limits are reached.
            let l = conntrack.half_open_limits();
            p.global = p.global.min(l.global / 2).max(1);
            p.per_tenant = p.per_tenant.min(l.per_tenant / 2).max(1);
            p.per_dst = p.per_dst.min(p.per_tenant).max(1);
        }
        if verdicts.len() > MAX_VERDICT_SLOTS {
            return Err(SetupError::VerdictSlots);
        }
        let verdicts = VerdictTable::new(
            verdicts,
            verdict_index,
            config.tables_zeroed,
            config.hash_seed,
        )
        .ok_or(SetupError::VerdictSlots)?;
        Ok(Filter {
            conntrack,
            verdicts,
            config,
            counters: Counters::default(),
            last_seq: 0,
            tenancy: Tenancy::new(),
            neighbors: Neighbors::new(),
            neighbor_budget: neighbor::Budget::new(),
            outside_budget: neighbor::Budget::with_rate(
                hygiene::OUTSIDE_BURST,
                hygiene::OUTSIDE_REFILL_NS,
            ),
            cookies: config.synproxy.map(|p| synproxy::Cookies::new(p.secret)),
            last_cookie_s: None,
            proxy_here: false,
            pending: synproxy::Pending::None,
        })
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn conntrack(&self) -> &Conntrack<'a> {
        &self.conntrack
    }

    pub fn verdicts(&self) -> &VerdictTable<'a> {
        &self.verdicts
    }

    /// Sets the most verdicts one tenant may hold (see [`VerdictTable::set_tenant_quota`]).
    pub fn set_tenant_verdict_quota(&mut self, quota: usize) {
        self.verdicts.set_tenant_quota(quota);
    }

    /// The port and address tables ([`Op::Attach`] fills them).
    pub fn tenancy(&self) -> &Tenancy {
        &self.tenancy
    }

    /// For the packet loop: boot-time port assignment, [`Tenancy::take_port_changes`].
    pub fn tenancy_mut(&mut self) -> &mut Tenancy {
        &mut self.tenancy
    }

    /// Count a drop the caller decided (e.g. a frame from an unassigned port) and return it.
    pub fn drop_frame(&mut self, reason: DropReason) -> Decision {
        self.counters.drops[reason as usize] += 1;
        Decision::Drop(reason)
    }

    /// Applies every record waiting in the verdict ring (the micro-VM calls this before it reads
    /// the next frames). Returns how many records were taken; a ring the producer corrupted stops
    /// the drain with its error (records already applied stay applied).
    pub fn drain_ring(
        &mut self,
        ring: &mut vigil_wire::ring::Consumer<'_>,
        now_ns: u64,
    ) -> Result<usize, vigil_wire::ring::RingError> {
        self.drain_ring_reporting(ring, now_ns, None)
    }

    /// [`drain_ring`](Self::drain_ring), writing each record's outcome into the region's outcome
    /// log (`vigil_wire::outcome`) as soon as it is applied: the VMM waits for it before the call
    /// that produced the record returns, so a refused verdict denies its call.
    pub fn drain_ring_reporting(
        &mut self,
        ring: &mut vigil_wire::ring::Consumer<'_>,
        now_ns: u64,
        outcomes: Option<&OutcomeWriter<'_>>,
    ) -> Result<usize, vigil_wire::ring::RingError> {
        let mut record = [0u8; vigil_wire::ring::SLOT_BYTES];
        let mut taken = 0;
        loop {
            let position = ring.position();
            if !ring.pop(&mut record)? {
                break;
            }
            // A bad record is counted as rejected; the ring goes on.
            let outcome = self.apply_record_outcome(&record, now_ns);
            if let Some(log) = outcomes {
                log.record(position, outcome, self.verdicts.room());
            }
            taken += 1;
        }
        Ok(taken)
    }

    /// Applies one raw record and says what became of it, as the outcome log reports it.
    pub fn apply_record_outcome(&mut self, record: &[u8], now_ns: u64) -> Outcome {
        let v = match VerdictRepr::from_bytes(record) {
            Ok(v) => v,
            Err(_) => {
                self.counters.verdicts_rejected += 1;
                return Outcome::Invalid;
            }
        };
        let adds = matches!(v.op, Op::Add | Op::Adopt);
        let held = adds && self.verdicts.holds(v.tenant, &v.rule);
        match self.apply(&v, now_ns) {
            Ok(()) if held => Outcome::Refreshed,
            Ok(()) if adds => Outcome::Added,
            Ok(()) => Outcome::Done,
            // A Release is the edge VMM's record and never reaches a firewall on purpose.
            Err(ApplyError::Invalid(_) | ApplyError::NotForFirewall) => Outcome::Invalid,
            Err(ApplyError::TableFull) => Outcome::TableFull,
            Err(ApplyError::OverQuota) => Outcome::OverQuota,
            Err(ApplyError::NotFound) => Outcome::NotFound,
            Err(ApplyError::Attach(_)) => Outcome::AttachRefused,
        }
    }

    /// Apply one raw verdict record (as popped from the ring).
    pub fn apply_record(&mut self, record: &[u8], now_ns: u64) -> Result<(), ApplyError> {
        match VerdictRepr::from_bytes(record) {
            Ok(v) => self.apply(&v, now_ns),
            Err(e) => {
                self.counters.verdicts_rejected += 1;
                Err(ApplyError::Invalid(e))
            }
        }
    }

    /// Apply one decoded verdict.
    pub fn apply(&mut self, v: &VerdictRepr, now_ns: u64) -> Result<(), ApplyError> {
        if v.seq != self.last_seq.wrapping_add(1) {
            self.counters.verdict_seq_gaps += 1;
        }
        self.last_seq = v.seq;
        let result = match v.op {
            Op::Add | Op::Adopt => self
                .verdicts
                .insert(
                    v.tenant,
                    &v.rule,
                    v.seq,
                    v.lifetime_ms,
                    now_ns,
                    v.op == Op::Adopt,
                )
                .map(|_| ())
                .map_err(|e| match e {
                    verdicts::AddError::TableFull => ApplyError::TableFull,
                    verdicts::AddError::OverQuota => {
                        self.counters.verdicts_over_quota += 1;
                        ApplyError::OverQuota
                    }
                }),
            Op::Remove => {
                if self.verdicts.remove(v.tenant, &v.rule) {
                    Ok(())
                } else {
                    Err(ApplyError::NotFound)
                }
            }
            Op::FlushTenant => {
                self.flush_tenant(v.tenant, now_ns);
                Ok(())
            }
            Op::Attach => self
                .tenancy
                .attach_with_mac(v.tenant, v.attach_port(), v.attach_addr(), v.attach_mac())
                .map_err(ApplyError::Attach),
            Op::Release => Err(ApplyError::NotForFirewall),
        };
        match result {
            Ok(()) => self.counters.verdicts_applied += 1,
            Err(_) => self.counters.verdicts_rejected += 1,
        }
        result
    }

    /// Everything of `tenant` goes, now: its verdicts, its ports and addresses, and every
    /// conntrack entry it has (a full scan of the flow table, control path only: ~75k slots for
    /// the default 64k flows). Live entries count as revoked, expired ones as expired. Returns the
    /// number of entries removed.
    pub fn flush_tenant(&mut self, tenant: u32, now_ns: u64) -> usize {
        self.verdicts.flush_tenant(tenant);
        self.tenancy.flush(tenant);
        let counters = &mut self.counters;
        let verdicts = &mut self.verdicts;
        let all = self.conntrack.slots_len();
        // One full turn of the sweep cursor examines every slot (see `Conntrack::sweep`).
        self.conntrack.sweep(secs(now_ns), all, |s, expired| {
            if s.tenant() != tenant {
                return false;
            }
            verdicts.release(s.verdict());
            if expired {
                counters.flows_expired += 1;
            } else {
                counters.flows_revoked += 1;
            }
            true
        })
    }

    /// Reclaim up to `budget` conntrack slots and verdict slots: expired flows, flows of removed
    /// verdicts, expired verdicts without flows. Call from the idle path of the packet loop.
    pub fn sweep(&mut self, now_ns: u64, budget: usize) -> usize {
        self.sweep_flows(secs(now_ns), budget) + self.verdicts.sweep(now_ns, budget)
    }

    fn sweep_flows(&mut self, now_s: u32, budget: usize) -> usize {
        let verdicts = &mut self.verdicts;
        let counters = &mut self.counters;
        self.conntrack.sweep(now_s, budget, |s, expired| {
            if expired {
                verdicts.release(s.verdict());
                counters.flows_expired += 1;
                true
            } else if !verdicts.is_current(s.verdict()) {
                counters.flows_revoked += 1;
                true
            } else {
                false
            }
        })
    }

    /// Judge one frame for `tenant`, travelling in `dir` (egress: leaving the tenant).
    #[inline]
    pub fn process(&mut self, tenant: u32, dir: Direction, frame: &[u8], now_ns: u64) -> Decision {
        self.judge(frame, |f, meta| f.ip(tenant, dir, meta, now_ns))
    }

    /// Judge one frame at the edge, arriving from a port on side `from` and leaving by one on
    /// side `to`. The tenant comes from the address table: a frame leaving the cloud is judged
    /// egress for the owner of its source address, a frame entering the cloud ingress for the
    /// owner of its destination address; a cloud-to-cloud frame both ways (as the switch judges
    /// tenant-to-tenant traffic). No owner: [`DropReason::UnknownTenant`]. ARP and neighbour
    /// discovery pass as in [`Filter::process`], except that from the cloud side they must claim
    /// an attached address ([`DropReason::SpoofedNeighbor`]), and from the outside only an
    /// expected gateway's requests for and answers to a tenant pass, at a bounded rate
    /// ([`Filter::edge_outside_neighbor`]). Outside-to-outside has no tenant to judge for and is
    /// dropped as `UnknownTenant` too (the packet loop never asks).
    pub fn process_edge(
        &mut self,
        from: EdgeSide,
        to: EdgeSide,
        frame: &[u8],
        now_ns: u64,
    ) -> Decision {
        let neighbor = match from {
            EdgeSide::Cloud => self.edge_cloud_neighbor(frame),
            EdgeSide::Outside => self.edge_outside_neighbor(frame, now_ns),
        }
        .or_else(|| hygiene::unicast_to_group(frame));
        if let Some(reason) = neighbor {
            return self.drop_frame(reason);
        }
        self.judge(frame, |f, meta| f.edge_ip(from, to, meta, now_ns))
    }

    fn edge_ip(&mut self, from: EdgeSide, to: EdgeSide, m: &IpMeta, now_ns: u64) -> Decision {
        if from == EdgeSide::Outside && to == EdgeSide::Outside {
            return Decision::Drop(DropReason::UnknownTenant);
        }
        if from == EdgeSide::Outside && self.spoofed_outside(m) {
            return Decision::Drop(DropReason::SpoofedSource);
        }
        if from == EdgeSide::Cloud {
            let Some(tenant) = self.tenancy.owner(m.ip_version, &m.src) else {
                return Decision::Drop(DropReason::UnknownTenant);
            };
            let d = self.ip(tenant, Direction::Egress, m, now_ns);
            if d != Decision::Forward || to == EdgeSide::Outside {
                return d;
            }
        }
        let Some(tenant) = self.tenancy.owner(m.ip_version, &m.dst) else {
            return Decision::Drop(DropReason::UnknownTenant);
        };
        self.ip(tenant, Direction::Ingress, m, now_ns)
    }

    /// Whether a packet arriving from the outside carries a source address the outside cannot
    /// have: an address attached to a cloud tenant (the address table), or one no router forwards
    /// as a source: IPv4 0/8 (RFC 1122 §3.2.1.3: "this network", unspecified included), 127/8
    /// loopback, 169.254/16 link-local (RFC 3927), 224/4 multicast, 240/4 reserved with the limited
    /// broadcast 255.255.255.255, and the network and broadcast address of the /24 around a cloud
    /// address ([`Tenancy::is_subnet_edge_v4`]); IPv6 `::` and `::1`, `ff00::/8` multicast,
    /// `fe80::/10` link-local, `::ffff:0:0/96` IPv4-mapped (RFC 4291 §2.5.5.2: never on the wire).
    ///
    /// Private ranges (RFC 1918, ULA) are not refused: an edge's outside may be a private network
    /// (a lab, a corporate LAN; the end-to-end test's outside is 10.66.0.0/24). An edge facing the
    /// internet would add them (BCP 38 / RFC 3704 bogon filtering) in its policy.
    fn spoofed_outside(&self, m: &IpMeta) -> bool {
        if self.tenancy.owner(m.ip_version, &m.src).is_some() {
            return true;
        }
        let a = &m.src;
        match m.ip_version {
            IpVersion::V4 => {
                matches!(a[0], 0 | 127 | 224..=255)
                    || (a[0] == 169 && a[1] == 254)
                    || self.tenancy.is_subnet_edge_v4([a[0], a[1], a[2], a[3]])
            }
            IpVersion::V6 => {
                let head = u128::from_be_bytes(*a);
                head <= 1
                    || a[0] == 0xff
                    || (a[0] == 0xfe && a[1] & 0xc0 == 0x80)
                    || head >> 32 == 0xffff
            }
        }
    }

    /// Parses a frame, passes ARP and neighbour discovery, hands IP packets to `ip`, and counts
    /// the outcome (shared by the switch's and the edge's entry points).
    #[inline]
    fn judge(&mut self, frame: &[u8], ip: impl FnOnce(&mut Self, &IpMeta) -> Decision) -> Decision {
        let d = match parse(frame) {
            Err(reason) => Decision::Drop(reason),
            Ok(Parsed::Arp) => {
                self.counters.arp += 1;
                Decision::Forward
            }
            Ok(Parsed::NeighborDiscovery) => {
                self.counters.ndp += 1;
                Decision::Forward
            }
            Ok(Parsed::Ip(meta)) => ip(self, &meta),
        };
        match d {
            Decision::Forward => self.counters.forwarded += 1,
            Decision::Drop(r) => self.counters.drops[r as usize] += 1,
            // Counted by what the proxy sent (`syncookies_sent`, ...).
            Decision::Answered => {}
        }
        d
    }

    fn ip(&mut self, tenant: u32, dir: Direction, m: &IpMeta, now_ns: u64) -> Decision {
        let now_s = secs(now_ns);
        let (sport, dport) = match m.l4 {
            L4::Tcp {
                src_port, dst_port, ..
            }
            | L4::Udp { src_port, dst_port } => (src_port, dst_port),
            // Both directions of an echo exchange carry the same identifier; it stands in the
            // tenant-side port of the key.
            L4::EchoRequest { ident } | L4::EchoReply { ident } => match dir {
                Direction::Egress => (ident, 0),
                Direction::Ingress => (0, ident),
            },
            L4::IcmpError { inner } => return self.icmp_error(tenant, dir, m, &inner, now_s),
        };
        let key = FlowKey::from_packet(
            tenant,
            dir,
            m.ip_version,
            m.protocol,
            m.src,
            m.dst,
            sport,
            dport,
        );
        let hash = self.conntrack.hash(&key);
        match self.conntrack.lookup(&key, hash, now_s) {
            Probe::Found(i) => match self.existing(i, dir, &m.l4, now_s) {
                Some(d) => d,
                // A SYN re-opening a closed connection: judged as a new flow.
                None => {
                    let old = self.conntrack.remove(i);
                    self.verdicts.release(old.verdict());
                    let Probe::Vacant(i) = self.conntrack.lookup(&key, hash, now_s) else {
                        return Decision::Drop(DropReason::InvalidTcpState);
                    };
                    self.open(i, &key, hash, dir, &m.l4, now_ns)
                }
            },
            Probe::Vacant(i) => self.open(i, &key, hash, dir, &m.l4, now_ns),
        }
    }

    /// A packet of the tracked flow at slot `i`. `None`: re-open as a new flow.
    #[inline(always)]
    fn existing(&mut self, i: usize, dir: Direction, l4: &L4, now_s: u32) -> Option<Decision> {
        // The fields needed, not the pooled ones (a view: nothing more is read).
        let e = self.conntrack.slot(i);
        let (verdict, origin, state_byte, replied) =
            (e.verdict(), e.origin(), e.state_byte(), e.replied());
        if !self.verdicts.is_current(verdict) {
            self.conntrack.remove(i);
            self.counters.flows_revoked += 1;
            return Some(Decision::Drop(DropReason::Revoked));
        }
        let t = &self.config.timeouts;
        let orig = dir == origin;
        match *l4 {
            L4::Tcp { flags, seg, .. } => {
                let mut seg = seg;
                if state_byte & conntrack::F_PROXIED != 0 {
                    if let Some(d) = self.proxied_segment(i, orig, flags, &mut seg, now_s) {
                        return Some(d);
                    }
                }
                self.tracked_segment(i, orig, flags, &seg, state_byte, now_s)
            }
            L4::Udp { .. } => {
                match conntrack::confirms(origin, orig, replied, state_byte) {
                    Some(true) => self
                        .conntrack
                        .mark_replied(i, now_s.saturating_add(t.udp_replied)),
                    Some(false) => self
                        .conntrack
                        .answered(i, now_s.saturating_add(t.udp_unreplied)),
                    None => {
                        self.conntrack
                            .touch(i, state_byte, now_s.saturating_add(t.udp_unreplied))
                    }
                }
                Some(Decision::Forward)
            }
            L4::EchoRequest { .. } | L4::EchoReply { .. } => {
                let request = matches!(l4, L4::EchoRequest { .. });
                if request != orig {
                    // A request against the flow's direction, or a reply along it.
                    return Some(Decision::Drop(DropReason::IcmpUnsupported));
                }
                let expires = now_s.saturating_add(t.icmp);
                match conntrack::confirms(origin, orig, replied, state_byte) {
                    Some(true) => self.conntrack.mark_replied(i, expires),
                    Some(false) => self.conntrack.answered(i, expires),
                    None => self.conntrack.touch(i, state_byte, expires),
                }
                Some(Decision::Forward)
            }
            L4::IcmpError { .. } => Some(Decision::Drop(DropReason::IcmpUnsupported)),
        }
    }

    /// A TCP segment of the tracked flow at slot `i` (state byte `state_byte`). `None`: re-open.
    #[inline(always)]
    fn tracked_segment(
        &mut self,
        i: usize,
        orig: bool,
        flags: TcpFlags,
        seg: &TcpSeg,
        state_byte: u8,
        now_s: u32,
    ) -> Option<Decision> {
        let mut flags = flags;
        if flags.fin && !flags.syn && !flags.rst && !self.conntrack.fin_in_place(i, orig, seg) {
            // Not where its sender's stream ends: its endpoint holds it out of order (or drops
            // it, if forged), so the entry does not move toward its end for it.
            flags.fin = false;
        }
        let t = &self.config.timeouts;
        match conntrack::tcp_step(state_byte, orig, flags) {
            conntrack::TcpStep::Pass(state) => {
                let (state, timeout) = match self.conntrack.track(i, orig, flags, seg) {
                    Track::OutOfWindow => {
                        self.sample_out_of_window(i, orig, flags, seg, now_s);
                        return Some(Decision::Drop(DropReason::TcpOutOfWindow));
                    }
                    // The endpoint decides; if it took the reset, the entry goes soon.
                    Track::InWindowRst => {
                        let current = t.tcp(TcpState::from_bits(state_byte));
                        (state_byte, current.min(t.tcp_closed))
                    }
                    Track::ExactRst if TcpState::from_bits(state_byte) == TcpState::Adopted => {
                        // Nothing to keep: one side never knew the connection.
                        let old = self.conntrack.remove(i);
                        self.verdicts.release(old.verdict());
                        self.counters.flows_expired += 1;
                        return Some(Decision::Forward);
                    }
                    Track::InWindow if TcpState::from_bits(state) == TcpState::Adopted => {
                        let state = if self.conntrack.both_sides_seen(i) {
                            conntrack::confirmed_state(state)
                        } else {
                            state
                        };
                        (state, t.tcp(TcpState::from_bits(state)))
                    }
                    Track::InWindow | Track::ExactRst => (state, t.tcp(TcpState::from_bits(state))),
                };
                self.conntrack
                    .touch(i, state, now_s.saturating_add(timeout));
                Some(Decision::Forward)
            }
            conntrack::TcpStep::Invalid => Some(Decision::Drop(DropReason::InvalidTcpState)),
            conntrack::TcpStep::Reopen => None,
        }
    }

    /// A packet without a tracked flow: open one if it is an opening packet and a verdict allows
    /// (or adopt it mid-stream if an [`Op::Adopt`] verdict covers it).
    fn open(
        &mut self,
        i: usize,
        key: &FlowKey,
        hash: u32,
        dir: Direction,
        l4: &L4,
        now_ns: u64,
    ) -> Decision {
        let now_s = secs(now_ns);
        let t = &self.config.timeouts;
        let (opening, tcp, timeout) = match *l4 {
            L4::Tcp { flags, .. } => (
                flags.syn && !flags.ack && !flags.rst && !flags.fin,
                TcpState::SynSent,
                t.tcp_syn_sent,
            ),
            L4::Udp { .. } => (true, TcpState::None, t.udp_unreplied),
            L4::EchoRequest { .. } => (true, TcpState::None, t.icmp),
            L4::EchoReply { .. } | L4::IcmpError { .. } => (false, TcpState::None, 0),
        };
        let verdict = self.verdicts.find(key, dir, now_ns);
        if let (true, L4::Tcp { flags, seg, .. }, Some(v)) = (self.proxy_here, l4, verdict) {
            match self.proxy_open(i, key, hash, *flags, seg, v, now_s) {
                None => {}
                // Not a cookie, but perhaps a migrated flow's segment: adoption decides.
                Some(Decision::Drop(DropReason::SynCookieInvalid))
                    if self.verdicts.adopting() != 0 => {}
                Some(d) => return d,
            }
        }
        if !opening || verdict.is_none() {
            if let Some((adopter, origin)) = self.adopter(key, dir, l4, verdict, now_ns) {
                return self.adopt(i, key, hash, origin, dir, l4, adopter, now_s);
            }
        }
        let Some(verdict) = verdict else {
            return Decision::Drop(DropReason::NoVerdict);
        };
        if !opening {
            // A verdict exists but the flow was never opened: mid-stream TCP, a stray reply.
            return Decision::Drop(if matches!(l4, L4::Tcp { .. }) {
                DropReason::InvalidTcpState
            } else {
                DropReason::NoVerdict
            });
        }
        let mut i = i;
        if tcp == TcpState::None
            && dir == Direction::Ingress
            && self.conntrack.inbound_full(key.tenant)
        {
            i = match self.evict_inbound(key, hash, now_s) {
                Ok(i) => i,
                Err(d) => return d,
            };
        }
        let mut i = match self.within_quota(i, key, hash, tcp == TcpState::SynSent, now_s) {
            Ok(i) => i,
            Err(d) => return d,
        };
        if tcp == TcpState::SynSent && self.conntrack.half_open_full(key.tenant) {
            i = match self.evict_half_open(key, hash, now_s) {
                Ok(i) => i,
                Err(d) => return d,
            };
        }
        let i = match self.make_room(i, key, hash, now_s) {
            Ok(i) => i,
            Err(d) => return d,
        };
        self.insert_flow(i, key, dir, tcp, verdict, now_s.saturating_add(timeout));
        if let L4::Tcp { flags, seg, .. } = l4 {
            // The opener's window starts at its SYN.
            self.conntrack.track(i, true, *flags, seg);
        }
        Decision::Forward
    }
}
