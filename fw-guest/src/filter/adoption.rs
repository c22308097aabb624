//! Taking over flows established elsewhere ([`Op::Adopt`] verdicts: after a migration, or a
//! restart of either tier): the first untracked packet of an adoptable 4-tuple becomes a
//! provisional entry, never more than a packet anyone can forge is worth.
//!
//! Owns: which packets an adoption takes ([`Filter::adopter`]) and the entry it makes
//! ([`Filter::adopt`]). Must not: make an entry that outlives a half-open or unreplied one before
//! the other side answered, or admit one past the limits a new flow meets.
//!
//! [`Op::Adopt`]: vigil_wire::verdict::Op::Adopt

use super::conntrack::TcpState;
use super::flow::FlowKey;
use super::parse::L4;
use super::verdicts::VerdictRef;
use super::{Decision, Direction, DropReason, Filter};

impl Filter<'_> {
    /// An [`Op::Adopt`] verdict that takes over the untracked packet `l4` travelling in `dir`,
    /// and the direction the flow was opened in. Only a TCP segment with ACK and without SYN or
    /// RST (a SYN opens normally, a RST has nothing to keep, and every segment of a synchronized
    /// connection carries an ACK, RFC 9293 §3.10.7.4) and a UDP datagram qualify. The verdict may
    /// open the flow either way: the first packet seen after a migration is as likely a reply.
    pub(super) fn adopter(
        &self,
        key: &FlowKey,
        dir: Direction,
        l4: &L4,
        same_dir: Option<VerdictRef>,
        now_ns: u64,
    ) -> Option<(VerdictRef, Direction)> {
        match *l4 {
            _ if self.verdicts.adopting() == 0 => return None,
            L4::Tcp { flags, .. } if flags.ack && !flags.syn && !flags.rst => {}
            L4::Udp { .. } => {}
            _ => return None,
        }
        if let Some(v) = same_dir.filter(|&v| self.verdicts.is_adoptable(v)) {
            return Some((v, dir));
        }
        let back = dir.reverse();
        self.verdicts
            .find(key, back, now_ns)
            .filter(|&v| self.verdicts.is_adoptable(v))
            .map(|v| (v, back))
    }

    /// Take over a flow established elsewhere: a TCP entry opened in `origin`
    /// ([`TcpState::Adopted`]), a UDP entry opened in `dir`, unreplied; then the packet steps it
    /// as a packet of a tracked flow. Anyone can send one segment of an adoptable 4-tuple, so a
    /// TCP entry is admitted as a SYN's is (half-open limits, and its tenant's oldest half-open
    /// entry makes room at its quota) and stays provisional, with a half-open entry's timeout,
    /// until the other side answers in window: forged ACKs cannot pin the table, and the reset
    /// a tenant answers one with removes its entry. A UDP entry is admitted as a new datagram's
    /// is (the inbound quota when it came toward the tenant) and is unreplied, evictable, until
    /// a datagram the other way passes here, whichever way the verdict opened the flow: a forged
    /// datagram that looks like a reply is no reply.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn adopt(
        &mut self,
        i: usize,
        key: &FlowKey,
        hash: u32,
        origin: Direction,
        dir: Direction,
        l4: &L4,
        verdict: VerdictRef,
        now_s: u32,
    ) -> Decision {
        let t = &self.config.timeouts;
        let tcp = matches!(l4, L4::Tcp { .. });
        let (state, timeout, origin) = if tcp {
            (TcpState::Adopted, t.tcp(TcpState::Adopted), origin)
        } else {
            (TcpState::None, t.udp_unreplied, dir)
        };
        let mut i = i;
        if !tcp && dir == Direction::Ingress && self.conntrack.inbound_full(key.tenant) {
            i = match self.evict_inbound(key, hash, now_s) {
                Ok(i) => i,
                Err(d) => return d,
            };
        }
        let mut i = match self.within_quota(i, key, hash, tcp, now_s) {
            Ok(i) => i,
            Err(d) => return d,
        };
        if tcp && self.conntrack.half_open_full(key.tenant) {
            i = match self.evict_half_open(key, hash, now_s) {
                Ok(i) => i,
                Err(d) => return d,
            };
        }
        let i = match self.make_room(i, key, hash, now_s) {
            Ok(i) => i,
            Err(d) => return d,
        };
        self.insert_flow(
            i,
            key,
            origin,
            state,
            verdict,
            now_s.saturating_add(timeout),
        );
        if tcp {
            self.conntrack.adopt_windows(i);
        }
        self.counters.flows_adopted += 1;
        self.existing(i, dir, l4, now_s)
            .unwrap_or(Decision::Drop(DropReason::InvalidTcpState))
    }
}
