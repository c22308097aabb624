//! Room for new conntrack entries, and ICMP errors about tracked flows.
//!
//! Owns: the admission of a new entry (the tenant's flow quota, the half-open limits, the inbound
//! quota of unreplied entries and their evictions, a full table's reclaiming) and the check of an
//! ICMP error's quoted flow and of its addresses against the quoted packet.
//! Must not: evict an established flow or a replied one, or let an ICMP error through for a flow
//! it does not quote in window, or to anyone but the quoted packet's sender.

use super::conntrack::{Conntrack, Probe, Unreplied};
use super::{
    parse, Decision, Direction, DropReason, Filter, FlowKey, IpMeta, Protocol, TcpState, VerdictRef,
};

impl Filter<'_> {
    /// The slot a new entry of `key`'s tenant goes to (`i` from a [`Probe::Vacant`]) when the
    /// tenant is within its flow quota, after reclaiming expired entries (and, for a SYN, its own
    /// oldest half-open ones; else its own unreplied UDP or echo entry that expires soonest) if
    /// it is at it; [`DropReason::FlowQuota`] otherwise. The far side cannot hold a tenant at its
    /// quota: all it can open without the tenant's answer is half-open or unreplied.
    pub(super) fn within_quota(
        &mut self,
        i: usize,
        key: &FlowKey,
        hash: u32,
        syn: bool,
        now_s: u32,
    ) -> Result<usize, Decision> {
        let grows =
            |ct: &Conntrack<'_>, i: usize| ct.needs_room(i) || ct.slot(i).tenant() != key.tenant;
        if !self.conntrack.at_quota(key.tenant) || !grows(&self.conntrack, i) {
            return Ok(i);
        }
        let mut freed = 0;
        for _ in 0..4 {
            let mut n = self.sweep_flows(now_s, self.config.sweep_on_full)
                + usize::from(syn && self.evict_one_half_open(key.tenant, now_s));
            if n == 0 {
                n = usize::from(self.evict_one_unreplied(key.tenant, Unreplied::Own, now_s));
            }
            freed += n;
            if n == 0 || !self.conntrack.at_quota(key.tenant) {
                break;
            }
        }
        if freed == 0 || self.conntrack.at_quota(key.tenant) {
            return Err(Decision::Drop(DropReason::FlowQuota));
        }
        match self.conntrack.lookup(key, hash, now_s) {
            Probe::Vacant(j) => Ok(j),
            Probe::Found(_) => Err(Decision::Drop(DropReason::InvalidTcpState)),
        }
    }

    /// One step of [`Conntrack::evict_half_open`] for `tenant`: the entry it removes gives back
    /// its verdict reference and is counted as expired or as an evicted half-open flow.
    pub(super) fn evict_one_half_open(&mut self, tenant: u32, now_s: u32) -> bool {
        let verdicts = &mut self.verdicts;
        let counters = &mut self.counters;
        self.conntrack
            .evict_half_open(tenant, now_s, self.config.evict_scan, |s, expired| {
                verdicts.release(s.verdict());
                if expired {
                    counters.flows_expired += 1;
                } else {
                    counters.half_open_evicted += 1;
                }
            })
    }

    /// One step of [`Conntrack::evict_unreplied`] for `tenant`: the entry it removes gives back
    /// its verdict reference and is counted as expired or as an evicted unreplied flow.
    pub(super) fn evict_one_unreplied(
        &mut self,
        tenant: u32,
        scope: Unreplied,
        now_s: u32,
    ) -> bool {
        let verdicts = &mut self.verdicts;
        let counters = &mut self.counters;
        self.conntrack.evict_unreplied(
            tenant,
            scope,
            now_s,
            self.config.evict_scan,
            |s, expired| {
                verdicts.release(s.verdict());
                if expired {
                    counters.flows_expired += 1;
                } else {
                    counters.unreplied_evicted += 1;
                }
            },
        )
    }

    /// Make room for a new unreplied entry opened toward `key`'s tenant, which holds its inbound
    /// quota of them: its own such entry that expires soonest goes (see
    /// [`Conntrack::evict_unreplied`]). Returns the slot the new entry goes to;
    /// [`DropReason::FlowQuota`] if nothing could be removed.
    pub(super) fn evict_inbound(
        &mut self,
        key: &FlowKey,
        hash: u32,
        now_s: u32,
    ) -> Result<usize, Decision> {
        let mut evicted = false;
        // A removed expired entry need not have been an inbound one: a few tries.
        for _ in 0..4 {
            evicted |= self.evict_one_unreplied(key.tenant, Unreplied::Inbound, now_s);
            if !self.conntrack.inbound_full(key.tenant) {
                break;
            }
        }
        if !evicted || self.conntrack.inbound_full(key.tenant) {
            return Err(Decision::Drop(DropReason::FlowQuota));
        }
        match self.conntrack.lookup(key, hash, now_s) {
            Probe::Vacant(i) => Ok(i),
            Probe::Found(_) => Err(Decision::Drop(DropReason::InvalidTcpState)),
        }
    }

    /// Make room for a new half-open entry of `key`'s tenant (see
    /// [`Conntrack::evict_half_open`]), and return the slot it goes to.
    pub(super) fn evict_half_open(
        &mut self,
        key: &FlowKey,
        hash: u32,
        now_s: u32,
    ) -> Result<usize, Decision> {
        let mut evicted = false;
        // A removed expired entry need not have been half-open: a few tries.
        for _ in 0..4 {
            evicted |= self.evict_one_half_open(key.tenant, now_s);
            if !self.conntrack.half_open_full(key.tenant) {
                break;
            }
        }
        if !evicted || self.conntrack.half_open_full(key.tenant) {
            return Err(Decision::Drop(DropReason::HalfOpenLimit));
        }
        match self.conntrack.lookup(key, hash, now_s) {
            Probe::Vacant(i) => Ok(i),
            Probe::Found(_) => Err(Decision::Drop(DropReason::InvalidTcpState)),
        }
    }

    /// The slot a new entry for `key` goes to (`i` from a [`Probe::Vacant`]), after reclaiming
    /// expired entries (bounded work) if the table is full, else a half-open or unreplied entry
    /// (its own, or of a tenant holding more of them); established and replied entries are never
    /// evicted.
    pub(super) fn make_room(
        &mut self,
        mut i: usize,
        key: &FlowKey,
        hash: u32,
        now_s: u32,
    ) -> Result<usize, Decision> {
        if self.conntrack.needs_room(i) && self.conntrack.is_full() {
            let mut freed = self.sweep_flows(now_s, self.config.sweep_on_full);
            if freed == 0 {
                // No expired entry: a half-open one of a tenant holding more of them than this
                // one (never an established flow).
                freed = usize::from(self.evict_one_half_open(key.tenant, now_s));
            }
            if freed == 0 {
                // Nor a half-open one: an unreplied UDP or echo entry of its own, or one opened
                // toward a tenant holding more of them (outside floods do not fill the table).
                freed = usize::from(self.evict_one_unreplied(key.tenant, Unreplied::Table, now_s));
            }
            if freed == 0 {
                return Err(Decision::Drop(DropReason::TableFull));
            }
            match self.conntrack.lookup(key, hash, now_s) {
                Probe::Vacant(j) => i = j,
                Probe::Found(_) => return Err(Decision::Drop(DropReason::InvalidTcpState)),
            }
            if self.conntrack.needs_room(i) && self.conntrack.is_full() {
                return Err(Decision::Drop(DropReason::TableFull));
            }
        }
        Ok(i)
    }

    pub(super) fn insert_flow(
        &mut self,
        i: usize,
        key: &FlowKey,
        origin: Direction,
        tcp: TcpState,
        verdict: VerdictRef,
        expires: u32,
    ) {
        if let Some(old) = self.conntrack.insert(i, key, origin, tcp, verdict, expires) {
            self.verdicts.release(old.verdict());
            self.counters.flows_expired += 1;
        }
        self.verdicts.acquire(verdict);
        self.counters.flows_created += 1;
    }

    /// An ICMP error passes when the packet it quotes belongs to a live tracked flow and the error
    /// goes back to that packet's sender. The quoted packet travelled the other way (the error
    /// answers it). A quoted TCP segment must also be one its sender may have in flight
    /// ([`FlowSlot::in_flight`], as Linux's `tcp_v4_err` and RFC 5927 §4.1 ask); a proxied flow's
    /// tenant-side segment is quoted with the sequence number the outside saw, so the offset is
    /// added back first.
    ///
    /// The addresses keep the quote from being a pass for anything: without them, a tenant could
    /// quote one reply of any live flow of its own in an error to an address of its choosing,
    /// with bytes of its own after the quote (at most what the length cap of [`parse`] leaves).
    /// An error is addressed to the quoted packet's source (RFC 792, RFC 4443 §2.2), whoever sends
    /// it: from the outside that may be any router on the path, but a tenant reports only packets
    /// it received, so its error also comes from the quoted packet's destination. Anything else
    /// is [`DropReason::IcmpUnsupported`].
    pub(super) fn icmp_error(
        &mut self,
        tenant: u32,
        dir: Direction,
        m: &IpMeta,
        q: &parse::Quoted,
        now_s: u32,
    ) -> Decision {
        let from_quoted_dst = dir == Direction::Ingress || m.src == q.dst;
        if m.dst != q.src || !from_quoted_dst {
            return Decision::Drop(DropReason::IcmpUnsupported);
        }
        let quoted_dir = dir.reverse();
        let (sport, dport) = match (q.protocol.is_icmp(), quoted_dir) {
            // The echo identifier goes to the tenant-side port, as in `ip`.
            (true, Direction::Ingress) => (0, q.src_port),
            _ => (q.src_port, q.dst_port),
        };
        let key = FlowKey::from_packet(
            tenant,
            quoted_dir,
            m.ip_version,
            q.protocol,
            q.src,
            q.dst,
            sport,
            dport,
        );
        let hash = self.conntrack.hash(&key);
        match self.conntrack.lookup(&key, hash, now_s) {
            Probe::Found(i) if self.verdicts.is_current(self.conntrack.slot(i).verdict()) => {
                let s = self.conntrack.slot(i);
                let orig = quoted_dir == s.origin();
                let seq = if orig {
                    q.seq
                } else {
                    q.seq.wrapping_add(s.seq_offset())
                };
                if q.protocol == Protocol::Tcp && !s.in_flight(orig, seq) {
                    return Decision::Drop(DropReason::IcmpOutOfWindow);
                }
                if q.protocol == Protocol::Tcp && !orig && s.seq_offset() != 0 {
                    // To the tenant of a proxied flow: it must see its own sequence number.
                    self.pending = super::synproxy::Pending::QuotedSeq {
                        seq_add: s.seq_offset(),
                    };
                }
                Decision::Forward
            }
            _ => Decision::Drop(DropReason::NoVerdict),
        }
    }
}
