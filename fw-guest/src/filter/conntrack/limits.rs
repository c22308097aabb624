//! The table's bounds and clocks: idle timeouts by protocol and state, how many half-open and
//! unreplied entries it holds and for whom, and each tenant's quota.
//!
//! Owns: [`Timeouts`], [`HalfOpenLimits`], the default quotas, [`Unreplied`] (whose entries an
//! eviction may take). Must not: count or evict entries (the table and `evict` do).

use super::TcpState;

/// Per-protocol idle timeouts, whole seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Half-open: SYN passed, no SYN-ACK yet (short: SYN floods must not pin the table).
    pub tcp_syn_sent: u32,
    pub tcp_syn_ack: u32,
    pub tcp_established: u32,
    pub tcp_fin_wait: u32,
    pub tcp_closing: u32,
    pub tcp_closed: u32,
    /// UDP flow that has seen no reply.
    pub udp_unreplied: u32,
    pub udp_replied: u32,
    pub icmp: u32,
}

impl Default for Timeouts {
    /// Close to Linux nf_conntrack's defaults, with much shorter half-open states (5 s: a client's
    /// SYN retransmissions, 1 s then 3 s apart, refresh the entry; a flood's entries are gone in
    /// seconds) and a shorter closed state.
    fn default() -> Self {
        Timeouts {
            tcp_syn_sent: 5,
            tcp_syn_ack: 5,
            tcp_established: 5 * 24 * 3600,
            tcp_fin_wait: 120,
            tcp_closing: 60,
            tcp_closed: 10,
            udp_unreplied: 30,
            udp_replied: 120,
            icmp: 30,
        }
    }
}

impl Timeouts {
    pub fn tcp(&self, s: TcpState) -> u32 {
        match s {
            TcpState::None | TcpState::Closed => self.tcp_closed,
            TcpState::SynSent => self.tcp_syn_sent,
            // Provisional as a SYN-ACK's entry is: the handshake's other half is missing.
            TcpState::SynAckSeen | TcpState::Adopted => self.tcp_syn_ack,
            TcpState::Established => self.tcp_established,
            TcpState::FinWait => self.tcp_fin_wait,
            TcpState::Closing => self.tcp_closing,
        }
    }
}

/// How many half-open entries the table holds before new SYNs must make room (see
/// [`Conntrack::half_open_full`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HalfOpenLimits {
    /// All tenants together.
    pub global: usize,
    /// One tenant.
    pub per_tenant: usize,
}

/// The most entries one tenant may hold: half the table by default
/// ([`Conntrack::set_flow_quota`]), so one tenant filling its share leaves the other half to the
/// rest (issue #12). At least 16.
pub fn default_flow_quota(capacity: usize) -> usize {
    (capacity / 2).max(16)
}

/// The most unreplied entries opened toward one tenant (UDP datagrams, ICMP echo requests from
/// its far side: anyone can send one, from any forged source) it may hold by default: an eighth
/// of the table, as its half-open TCP entries (at least 16). Beyond it, the tenant's own oldest
/// such entry makes room: state the far side creates never takes the room the tenant's own
/// flows need (its quota is half the table), nor, with the half-open limit, more than a quarter
/// of the table per tenant.
pub fn default_inbound_quota(capacity: usize) -> usize {
    (capacity / 8).max(16)
}

/// Which unreplied entries [`Conntrack::evict_unreplied`] may remove for a new entry of a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreplied {
    /// The tenant's own, opened toward it (its inbound quota is full).
    Inbound,
    /// The tenant's own, either direction (it is at its flow quota).
    Own,
    /// The tenant's own, or those opened toward a tenant holding more of them than this one
    /// (the table is full).
    Table,
}

impl HalfOpenLimits {
    /// Half the table for all half-open entries, an eighth for one tenant (at least 16 each): a
    /// flood at one tenant leaves 7/8 of the table to everyone else, and floods at every tenant
    /// together leave half of it to established flows.
    pub fn for_capacity(capacity: usize) -> HalfOpenLimits {
        HalfOpenLimits {
            global: (capacity / 2).max(16),
            per_tenant: (capacity / 8).max(16),
        }
    }
}
