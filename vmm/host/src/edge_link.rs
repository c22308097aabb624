//! The host's end of the verdict channel to the edge: an [`edge::channel::VerdictSender`]
//! shared by the tenants' verdict sinks and the host's control records, with counters.
//!
//! Owns: the host's sender on the channel, its first sequence number (above any a previous run
//! of this host used), and the counters of what was sent. Must not: sign or number datagrams
//! itself (the channel does), or decide what to send (that is `tiers`).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use edge::channel::VerdictSender;
use vigil_wire::auth::MAX_RECORDS;
use vigil_wire::verdict::RECORD_LEN;

use crate::EdgeLinkConfig;

/// Verdicts to the edge: signed datagrams on the channel, numbered per host.
pub(crate) struct EdgeLink {
    sender: Mutex<VerdictSender>,
    pub(crate) sent_records: AtomicU64,
    pub(crate) send_errors: AtomicU64,
}

/// The first sequence number of a host's run: the wall clock in microseconds, so that it is
/// above any number this sender id used before (a restarted host reuses its id; the edge's
/// replay window remembers the highest number it saw).
fn first_seq() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
        .max(1)
}

impl EdgeLink {
    pub(crate) fn new(config: EdgeLinkConfig) -> io::Result<EdgeLink> {
        let sender = VerdictSender::connect(config.control, config.key, config.sender)?
            .with_first_seq(first_seq())?;
        Ok(EdgeLink {
            sender: Mutex::new(sender),
            sent_records: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
        })
    }

    /// Signs and sends records (in as many datagrams as they need); a datagram that fails is
    /// counted and the rest are still sent. Returns whether all went out.
    pub(crate) fn send(&self, records: &[[u8; RECORD_LEN]]) -> bool {
        let mut sender = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        let mut ok = true;
        for chunk in records.chunks(MAX_RECORDS) {
            match sender.send(chunk) {
                Ok(_) => {
                    self.sent_records
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    log::debug!("verdict datagram to the edge not sent: {e}");
                    self.send_errors.fetch_add(1, Ordering::Relaxed);
                    ok = false;
                }
            }
        }
        ok
    }
}
