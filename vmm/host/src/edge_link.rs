//! The host's end of the verdict channel to the edge: an [`edge::link::VerdictLink`] (signed,
//! numbered, retransmitted until the edge acknowledges) shared by the tenants' verdict sinks and
//! the host's control records, with counters.
//!
//! Owns: the host's link to the edge, its first sequence number (above any a previous run of this
//! host used), and the counters of what was sent. Must not: sign, number or retransmit datagrams
//! itself (the link does), or decide what to send (that is `tiers`).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use std::time::Duration;

use edge::link::{
    first_seq_from_clock, Class, EdgeOutcome, EdgeRestartHook, LinkConfig, LinkError, Queued,
    RefusedHook, VerdictLink,
};
use vigil_wire::auth::MAX_RECORDS;
use vigil_wire::verdict::RECORD_LEN;

use crate::EdgeLinkConfig;

/// Verdicts to the edge: signed datagrams on the channel, numbered per host run, acknowledged.
pub(crate) struct EdgeLink {
    link: VerdictLink,
    pub(crate) sent_records: AtomicU64,
    /// Batches the link refused (its window of unacknowledged datagrams was full).
    pub(crate) send_errors: AtomicU64,
    /// Verdicts the edge refused after their calls had gone on, taken back at the switch
    /// (`Host::edge_revoked`: refused grants only, not the refused take-back of a denied call).
    pub(crate) revoked_records: AtomicU64,
}

/// What the host's metrics show of the link.
#[derive(Clone, Copy, Debug, Default)]
pub struct EdgeLinkStats {
    pub sent_records: u64,
    pub refused_batches: u64,
    pub retransmits: u64,
    pub acked_datagrams: u64,
    pub outstanding: u64,
    pub unreachable: bool,
    pub edge_restarts: u64,
    /// Records the edge's tables refused, and of those the grants whose calls had gone on
    /// (taken back at the switch afterwards).
    pub refused_records: u64,
    pub revoked_records: u64,
}

impl EdgeLink {
    /// The run's first sequence number is the wall clock in microseconds: above any number this
    /// sender id used before (a restarted host reuses its id; the edge follows its newest run).
    pub(crate) fn new(config: EdgeLinkConfig) -> io::Result<EdgeLink> {
        let link = VerdictLink::connect_keyed(
            config.control,
            (config.key_id, config.key),
            config.sender,
            first_seq_from_clock(),
            LinkConfig::default(),
        )?;
        Ok(EdgeLink {
            link,
            sent_records: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            revoked_records: AtomicU64::new(0),
        })
    }

    /// Signs with key `key_id` from now on.
    pub(crate) fn set_key(&self, key_id: u16, key: Vec<u8>) -> io::Result<()> {
        self.link.set_key(key_id, key)
    }

    pub(crate) fn key_id(&self) -> u16 {
        self.link.key_id()
    }

    /// Calls `hook` when the edge turns out to have restarted (see `Host::resync_edge`).
    pub(crate) fn on_edge_restart(&self, hook: EdgeRestartHook) {
        self.link.on_edge_restart(hook);
    }

    /// Calls `hook` with verdicts the edge refused that no call waited for.
    pub(crate) fn on_refused(&self, hook: RefusedHook) {
        self.link.on_refused(hook);
    }

    /// A call's verdicts to the edge: `Applied` at once when the edge's room makes them
    /// certain, otherwise what the edge's ack says within `limit`. Queued nothing when the
    /// window is full (`None`).
    pub(crate) fn deliver(
        &self,
        records: &[[u8; RECORD_LEN]],
        limit: Duration,
    ) -> Option<EdgeOutcome> {
        let queued = self.counted(records, self.link.send_waited(records, Class::Verdict))?;
        if queued.certain {
            return Some(EdgeOutcome::Applied);
        }
        Some(self.link.wait_outcome(&queued, limit))
    }

    /// Counts what a send of `records` did: the records queued, or the refused batch (logged).
    fn counted(
        &self,
        records: &[[u8; RECORD_LEN]],
        sent: Result<Queued, LinkError>,
    ) -> Option<Queued> {
        match sent {
            Ok(queued) => {
                self.sent_records
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                Some(queued)
            }
            Err(e) => {
                log::warn!("records for the edge not queued: {e}");
                self.send_errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether `records` of class `class` would be queued now (the window has room).
    pub(crate) fn has_room(&self, records: usize, class: Class) -> bool {
        let limit = match class {
            Class::Verdict => LinkConfig::default().window,
            Class::Control => LinkConfig::default().control_window,
        };
        self.link.outstanding() + records.div_ceil(MAX_RECORDS).max(1) <= limit
    }

    /// Queues records for the edge (sent at once, retransmitted until acknowledged). Returns
    /// whether they were queued; a refusal (window full: the edge is unreachable) is counted.
    pub(crate) fn send(&self, records: &[[u8; RECORD_LEN]], class: Class) -> bool {
        self.counted(records, self.link.send(records, class))
            .is_some()
    }

    /// [`EdgeLink::send`] for a caller that wants to know when the edge judged the records, and
    /// whether it refused any (see [`EdgeLink::wait`]): their refusals go to it, never to the
    /// host's hook. `None` (counted) when the window is full.
    pub(crate) fn send_tracked(
        &self,
        records: &[[u8; RECORD_LEN]],
        class: Class,
    ) -> Option<Queued> {
        self.counted(records, self.link.send_awaited(records, class))
    }

    /// Waits up to `limit` until the edge acknowledged `queued` (it acknowledges once it judged
    /// the records), and says whether it refused any of the verdicts among them.
    pub(crate) fn wait(&self, queued: &Queued, limit: Duration) -> EdgeOutcome {
        self.link.wait_outcome(queued, limit)
    }

    pub(crate) fn stats(&self) -> EdgeLinkStats {
        let s = self.link.stats();
        EdgeLinkStats {
            sent_records: self.sent_records.load(Ordering::Relaxed),
            refused_batches: self.send_errors.load(Ordering::Relaxed),
            retransmits: s.retransmits.load(Ordering::Relaxed),
            acked_datagrams: s.acked_datagrams.load(Ordering::Relaxed),
            outstanding: self.link.outstanding() as u64,
            unreachable: self.link.unreachable(),
            edge_restarts: s.edge_restarts.load(Ordering::Relaxed),
            refused_records: s.refused_records.load(Ordering::Relaxed),
            revoked_records: self.revoked_records.load(Ordering::Relaxed),
        }
    }
}
