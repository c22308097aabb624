//! The edge's per-sender delivery order: which of a host's authenticated datagrams may be applied
//! now, which are held until the gap before them fills, and which are duplicates or stale.
//!
//! Each sender (host) numbers its datagrams consecutively within a run that starts at its epoch
//! (`vigil_wire::auth`). The edge follows the newest run it has seen from each sender: a datagram
//! of a newer run starts over from that run's epoch (the host restarted), one of an older run is
//! refused, and within the run datagrams are applied strictly in sequence order, each at most
//! once. Out-of-order ones are held, at most [`HOLD_LIMIT`] ahead of the next expected.
//!
//! Owns: that state, bounded ([`MAX_SENDERS`] senders, [`HOLD_LIMIT`] held datagrams each).
//! Must not: authenticate (only datagrams whose tag verified reach it), or apply anything.

use std::collections::{BTreeMap, HashMap};

use vigil_wire::auth::AuthError;
use vigil_wire::verdict::RECORD_LEN;

/// Hosts one edge follows (a full table refuses new senders rather than forgetting old ones,
/// which would let an old run of the forgotten one be applied again).
pub const MAX_SENDERS: usize = 1024;
/// Datagrams held per sender ahead of a gap: larger gaps are refused (the host retransmits).
pub const HOLD_LIMIT: u64 = 32;

/// Records of one datagram.
pub type Records = Vec<[u8; RECORD_LEN]>;

/// What to do with an offered datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// It is the next one: apply it, then call [`Streams::applied`]. `restarted` carries the
    /// epoch of the sender's previous run when this datagram started a new one.
    Ready { restarted: Option<u64> },
    /// Ahead of the next expected: held until the gap before it fills.
    Held,
    /// Applied already (or held already): ignore it, acknowledge again.
    Duplicate,
}

#[derive(Debug)]
struct Stream {
    epoch: u64,
    /// Every sequence number below it was applied.
    next: u64,
    held: BTreeMap<u64, Records>,
    /// The previous run's epoch, until the new run's first datagram is reported ready.
    restarted_from: Option<u64>,
}

/// Delivery state of every sender.
#[derive(Debug, Default)]
pub struct Streams {
    senders: HashMap<u32, Stream>,
}

impl Streams {
    pub fn new() -> Streams {
        Streams::default()
    }

    /// Judges an authenticated datagram `seq` of run `epoch` from `sender`. Held datagrams keep
    /// their records; anything refused changes nothing.
    pub fn offer(
        &mut self,
        sender: u32,
        epoch: u64,
        seq: u64,
        records: &[[u8; RECORD_LEN]],
    ) -> Result<Offer, AuthError> {
        let mut restarted = None;
        match self.senders.get(&sender) {
            Some(s) if epoch < s.epoch => {
                return Err(AuthError::StaleEpoch {
                    sender,
                    epoch,
                    current: s.epoch,
                })
            }
            Some(s) if epoch > s.epoch => restarted = Some(s.epoch),
            Some(_) => {}
            None if self.senders.len() >= MAX_SENDERS => {
                return Err(AuthError::TooManySenders { sender })
            }
            None => {}
        }
        // A datagram of a run's start always begins at its epoch (the sender numbers from it).
        if restarted.is_some() || !self.senders.contains_key(&sender) {
            if seq.saturating_sub(epoch) >= HOLD_LIMIT {
                return Err(AuthError::TooFarAhead {
                    sender,
                    seq,
                    next: epoch,
                });
            }
            self.senders.insert(
                sender,
                Stream {
                    epoch,
                    next: epoch,
                    held: BTreeMap::new(),
                    restarted_from: restarted,
                },
            );
        }
        let Some(s) = self.senders.get_mut(&sender) else {
            return Err(AuthError::TooManySenders { sender });
        };
        if seq < s.next || s.held.contains_key(&seq) {
            return Ok(Offer::Duplicate);
        }
        if seq == s.next {
            return Ok(Offer::Ready {
                restarted: s.restarted_from.take(),
            });
        }
        if seq - s.next >= HOLD_LIMIT {
            return Err(AuthError::TooFarAhead {
                sender,
                seq,
                next: s.next,
            });
        }
        s.held.insert(seq, records.to_vec());
        Ok(Offer::Held)
    }

    /// The datagram that [`Streams::offer`] called ready was applied: the next one may go.
    pub fn applied(&mut self, sender: u32) {
        if let Some(s) = self.senders.get_mut(&sender) {
            s.next += 1;
        }
    }

    /// The datagram that [`Streams::offer`] called ready could not be applied: it will come
    /// again, and the restart it reported is reported again with it.
    pub fn not_applied(&mut self, sender: u32, restarted: Option<u64>) {
        if let Some(s) = self.senders.get_mut(&sender) {
            s.restarted_from = s.restarted_from.or(restarted);
        }
    }

    /// The held datagram that is next now, if any (apply it, then call [`Streams::applied`]).
    pub fn take_ready(&mut self, sender: u32) -> Option<(u64, Records)> {
        let s = self.senders.get_mut(&sender)?;
        let records = s.held.remove(&s.next)?;
        Some((s.next, records))
    }

    /// Puts back a datagram taken with [`Streams::take_ready`] that could not be applied.
    pub fn put_back(&mut self, sender: u32, seq: u64, records: Records) {
        if let Some(s) = self.senders.get_mut(&sender) {
            if seq == s.next {
                s.held.insert(seq, records);
            }
        }
    }

    /// `(epoch, next)` of the sender's run: what an ack says.
    pub fn position(&self, sender: u32) -> Option<(u64, u64)> {
        self.senders.get(&sender).map(|s| (s.epoch, s.next))
    }

    /// Datagrams held for all senders.
    pub fn held(&self) -> usize {
        self.senders.values().map(|s| s.held.len()).sum()
    }

    /// Senders followed.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u8) -> Records {
        vec![[n; RECORD_LEN]]
    }

    /// Offers `seq` and applies whatever becomes ready; returns the applied records in order.
    fn deliver(s: &mut Streams, epoch: u64, seq: u64) -> Vec<u8> {
        let mut out = Vec::new();
        if let Ok(Offer::Ready { .. }) = s.offer(1, epoch, seq, &rec(seq as u8)) {
            out.push(seq as u8);
            s.applied(1);
            while let Some((_, r)) = s.take_ready(1) {
                out.push(r[0][0]);
                s.applied(1);
            }
        }
        out
    }

    #[test]
    fn applies_in_order_holds_gaps_ignores_duplicates() {
        let mut s = Streams::new();
        assert_eq!(deliver(&mut s, 10, 10), vec![10]);
        assert_eq!(deliver(&mut s, 10, 12), Vec::<u8>::new());
        assert_eq!(s.offer(1, 10, 12, &rec(12)), Ok(Offer::Duplicate));
        assert_eq!(deliver(&mut s, 10, 13), Vec::<u8>::new());
        assert_eq!(s.held(), 2);
        assert_eq!(deliver(&mut s, 10, 11), vec![11, 12, 13]);
        assert_eq!(s.position(1), Some((10, 14)));
        assert_eq!(s.offer(1, 10, 11, &rec(11)), Ok(Offer::Duplicate));
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn a_lost_first_datagram_is_waited_for() {
        let mut s = Streams::new();
        assert_eq!(deliver(&mut s, 100, 101), Vec::<u8>::new());
        assert_eq!(deliver(&mut s, 100, 100), vec![100, 101]);
    }

    #[test]
    fn newer_runs_restart_older_runs_are_refused() {
        let mut s = Streams::new();
        deliver(&mut s, 10, 10);
        deliver(&mut s, 10, 11);
        // The new run's second datagram first: held, and the restart is reported with the first.
        assert_eq!(s.offer(1, 50, 51, &rec(0)), Ok(Offer::Held));
        assert_eq!(
            s.offer(1, 50, 50, &rec(0)),
            Ok(Offer::Ready {
                restarted: Some(10)
            })
        );
        s.applied(1);
        assert!(s.take_ready(1).is_some());
        s.applied(1);
        assert_eq!(
            s.offer(1, 10, 12, &rec(0)),
            Err(AuthError::StaleEpoch {
                sender: 1,
                epoch: 10,
                current: 50
            })
        );
        assert_eq!(s.position(1), Some((50, 52)));
    }

    #[test]
    fn holding_is_bounded() {
        let mut s = Streams::new();
        deliver(&mut s, 1, 1);
        assert!(matches!(
            s.offer(1, 1, 2 + HOLD_LIMIT, &rec(0)),
            Err(AuthError::TooFarAhead { .. })
        ));
        assert!(matches!(
            s.offer(2, 1, 1 + HOLD_LIMIT, &rec(0)),
            Err(AuthError::TooFarAhead { .. })
        ));
        assert_eq!(s.offer(1, 1, 1 + HOLD_LIMIT, &rec(0)), Ok(Offer::Held));
        assert_eq!(s.len(), 1, "a refused first datagram takes no slot");
        for sender in 2..=MAX_SENDERS as u32 {
            s.offer(sender, 1, 1, &rec(0)).unwrap();
        }
        assert_eq!(
            s.offer(5000, 1, 1, &rec(0)),
            Err(AuthError::TooManySenders { sender: 5000 })
        );
    }
}
