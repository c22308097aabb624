//! A tenant's verdict records and the state a migration carries: the outbox of records not yet
//! taken by a tier, the sequence they are numbered from, the verdicts granted so far, and their
//! export and import.
//!
//! Owns: verdict sequence numbers, the outbox (bounded, oldest dropped and counted), the granted
//! verdicts kept for a migration, [`IntrospectionState`] and its import (`Adopt` records for the
//! target's tiers).
//! Must not: decide anything (the policy and `decide` do), block a vCPU beyond the outbox lock,
//! or accept a migrated verdict of another tenant.

use std::collections::VecDeque;

use serde::Serialize;
use thiserror::Error;
use trap_handler::attribution::SocketOp;
use vigil_wire::verdict::{Direction, Op, Rule, VerdictError, VerdictRepr, RECORD_LEN};

use super::logger::LogEntry;
use super::Introspection;

/// Verdict records kept for a tier that has not taken them yet.
const PENDING_VERDICTS: usize = 4096;
/// How long a connect verdict stays open for a flow that has not started (the tier's conntrack
/// carries an established flow after that).
const CONNECT_VERDICT_LIFETIME_MS: u64 = 60_000;
/// Granted verdicts kept for a migration.
const GRANTED_KEPT: usize = 1024;

/// Verdict records not yet taken by a firewall tier.
pub(super) struct VerdictOutbox {
    next_seq: u64,
    pending: VecDeque<[u8; RECORD_LEN]>,
    overflowed: u64,
    /// The most recent verdicts granted (at most `GRANTED_KEPT`): what a migration hands to the
    /// target's tiers so the tenant's established flows go on there.
    granted: VecDeque<[u8; RECORD_LEN]>,
}

impl VerdictOutbox {
    /// An empty outbox whose first record gets sequence number 1.
    pub(super) fn new() -> VerdictOutbox {
        VerdictOutbox {
            next_seq: 1,
            pending: VecDeque::new(),
            overflowed: 0,
            granted: VecDeque::new(),
        }
    }

    /// Takes the next sequence number.
    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Keeps a granted record for a migration (the oldest goes when `GRANTED_KEPT` are kept).
    fn grant(&mut self, record: [u8; RECORD_LEN]) {
        if self.granted.len() == GRANTED_KEPT {
            self.granted.pop_front();
        }
        self.granted.push_back(record);
    }

    /// Keeps a record for a tier that asks later (the oldest goes, counted, when full).
    fn keep_pending(&mut self, record: [u8; RECORD_LEN]) {
        if self.pending.len() == PENDING_VERDICTS {
            self.pending.pop_front();
            self.overflowed += 1;
        }
        self.pending.push_back(record);
    }
}

/// What a migration carries of a tenant's introspection besides its policy (which travels in
/// the VM spec): where the kernel is, the software breakpoints already written into guest RAM,
/// the verdict sequence, the verdicts granted so far.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct IntrospectionState {
    pub slide: u64,
    /// (operation, address, length of the instruction the int3 covers).
    pub soft_placed: Option<Vec<(SocketOp, u64, u64)>>,
    pub next_seq: u64,
    /// Granted verdict records, hex.
    pub granted: Vec<String>,
}

/// Why a migrated tenant's state was not taken over.
#[derive(Debug, Error)]
pub enum ImportError {
    #[error("granted verdict {index} is not hex of a {RECORD_LEN}-byte record: {source}")]
    NotHex {
        index: usize,
        #[source]
        source: hex::FromHexError,
    },
    /// `VerdictError` is `no_std` and has no `Error` impl: carried as a value.
    #[error("granted verdict {index} is not a verdict record: {error}")]
    BadRecord { index: usize, error: VerdictError },
    #[error("a granted verdict of tenant {found} in tenant {tenant}")]
    ForeignTenant { found: u32, tenant: u32 },
}

/// The bytes of a granted verdict as [`IntrospectionState`] carries them.
fn unhex(text: &str) -> Result<[u8; RECORD_LEN], hex::FromHexError> {
    let mut out = [0u8; RECORD_LEN];
    hex::decode_to_slice(text, &mut out)?;
    Ok(out)
}

/// Re-issues a granted verdict for this host's tiers: `Adopt`, numbered `seq`, and a connect
/// verdict's lifetime renewed.
fn adopt(mut v: VerdictRepr, seq: u64) -> [u8; RECORD_LEN] {
    v.op = Op::Adopt;
    v.seq = seq;
    // Connect verdicts expire (they only open new flows for a while); adopting an established
    // flow needs the verdict now, so it gets a fresh lifetime.
    if v.lifetime_ms != 0 {
        v.lifetime_ms = CONNECT_VERDICT_LIFETIME_MS;
    }
    v.to_bytes()
}

/// The verdict record of an allowed operation.
fn granted_record(tenant: u32, seq: u64, rule: Rule) -> [u8; RECORD_LEN] {
    let lifetime_ms = match rule.direction {
        Direction::Egress => CONNECT_VERDICT_LIFETIME_MS,
        Direction::Ingress => 0,
    };
    VerdictRepr {
        op: Op::Add,
        tenant,
        seq,
        lifetime_ms,
        rule,
    }
    .to_bytes()
}

impl Introspection {
    /// The state a migration carries (see [`IntrospectionState`]).
    pub fn export_state(&self) -> IntrospectionState {
        let outbox = self.outbox();
        IntrospectionState {
            slide: self.slide(),
            soft_placed: self.soft_placed.get().cloned(),
            next_seq: outbox.next_seq,
            granted: outbox.granted.iter().map(hex::encode).collect(),
        }
    }

    /// Takes over a migrated tenant's state (before its vCPUs run here). Returns the granted
    /// verdicts, re-issued as `Adopt` records for this host's tiers: the flows they opened are
    /// established already and continue mid-stream here.
    pub fn import_state(
        &self,
        state: &IntrospectionState,
    ) -> Result<Vec<[u8; RECORD_LEN]>, ImportError> {
        self.slide
            .store(state.slide, std::sync::atomic::Ordering::Release);
        if let Some(placed) = &state.soft_placed {
            // The int3 bytes are in the migrated RAM already: record them, never place again.
            let _ = self.soft_placed.set(placed.clone());
        }
        let mut outbox = self.outbox();
        outbox.next_seq = outbox.next_seq.max(state.next_seq);
        let mut adopted = Vec::new();
        for (index, text) in state.granted.iter().enumerate() {
            let bytes = unhex(text).map_err(|source| ImportError::NotHex { index, source })?;
            let v = VerdictRepr::from_bytes(&bytes)
                .map_err(|error| ImportError::BadRecord { index, error })?;
            if v.tenant != self.tenant {
                return Err(ImportError::ForeignTenant {
                    found: v.tenant,
                    tenant: self.tenant,
                });
            }
            let seq = outbox.take_seq();
            let record = adopt(v, seq);
            outbox.granted.push_back(record);
            if outbox.granted.len() > GRANTED_KEPT {
                outbox.granted.pop_front();
            }
            adopted.push(record);
        }
        Ok(adopted)
    }

    /// The next sequence number of this tenant's verdict records (the host numbers its own
    /// control records for the tenant from the same counter).
    pub fn next_seq(&self) -> u64 {
        self.outbox().take_seq()
    }

    /// Verdict records not yet taken by a tier, oldest first, and how many were dropped because
    /// nobody took them.
    pub fn take_verdicts(&self) -> (Vec<[u8; RECORD_LEN]>, u64) {
        let mut outbox = self.outbox();
        let overflowed = std::mem::take(&mut outbox.overflowed);
        (outbox.pending.drain(..).collect(), overflowed)
    }

    /// Produces the verdict record of an allowed operation; returns its sequence number.
    pub(super) fn produce_verdict(&self, rule: Rule) -> u64 {
        let (seq, record) = {
            let mut outbox = self.outbox();
            let seq = outbox.take_seq();
            let record = granted_record(self.tenant, seq, rule);
            outbox.grant(record);
            // Straight into the switch's ring when there is one (the micro-VM drains it before
            // it reads the next frames, so the flow's first packet finds its verdict); kept for a
            // tier that asks later otherwise, or when the ring is full.
            let delivered = self
                .tiers
                .as_ref()
                .is_some_and(|tiers| tiers.deliver(&[record]));
            if !delivered {
                outbox.keep_pending(record);
            }
            (seq, record)
        };
        // Formatted by the logger thread, off the trap path.
        let _ = self.events.send(LogEntry::Verdict(record));
        seq
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, VerdictOutbox> {
        self.verdicts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_wire::verdict::{IpVersion, Protocol};

    fn egress(port: u16) -> Rule {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        Rule::egress_to(IpVersion::V4, Protocol::Tcp, addr, port)
    }

    fn ingress(port: u16) -> Rule {
        let mut rule = Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Tcp);
        rule.local_port = port;
        rule
    }

    #[test]
    fn granted_records_carry_tenant_seq_and_a_lifetime_by_direction() {
        let out = VerdictRepr::from_bytes(&granted_record(7, 3, egress(80))).unwrap();
        assert_eq!((out.op, out.tenant, out.seq), (Op::Add, 7, 3));
        assert_eq!(out.lifetime_ms, CONNECT_VERDICT_LIFETIME_MS);
        assert_eq!(out.rule, egress(80));
        let listen = VerdictRepr::from_bytes(&granted_record(7, 4, ingress(22))).unwrap();
        assert_eq!(
            listen.lifetime_ms, 0,
            "a listener's verdict does not expire"
        );
    }

    #[test]
    fn adoption_renumbers_and_renews_only_expiring_verdicts() {
        let mut connect = VerdictRepr::from_bytes(&granted_record(7, 3, egress(80))).unwrap();
        connect.lifetime_ms = 5;
        let adopted = VerdictRepr::from_bytes(&adopt(connect, 40)).unwrap();
        assert_eq!((adopted.op, adopted.seq), (Op::Adopt, 40));
        assert_eq!(adopted.lifetime_ms, CONNECT_VERDICT_LIFETIME_MS);
        assert_eq!(adopted.rule, connect.rule);
        let listen = VerdictRepr::from_bytes(&granted_record(7, 4, ingress(22))).unwrap();
        assert_eq!(
            VerdictRepr::from_bytes(&adopt(listen, 41))
                .unwrap()
                .lifetime_ms,
            0
        );
    }

    #[test]
    fn the_outbox_keeps_the_newest_and_counts_what_it_dropped() {
        let mut outbox = VerdictOutbox::new();
        assert_eq!((outbox.take_seq(), outbox.take_seq()), (1, 2));
        for i in 0..PENDING_VERDICTS + 3 {
            outbox.keep_pending(granted_record(1, i as u64, egress(1)));
        }
        assert_eq!(outbox.pending.len(), PENDING_VERDICTS);
        assert_eq!(outbox.overflowed, 3);
        let oldest = VerdictRepr::from_bytes(&outbox.pending[0]).unwrap();
        assert_eq!(oldest.seq, 3);
        for i in 0..GRANTED_KEPT + 1 {
            outbox.grant(granted_record(1, i as u64, egress(1)));
        }
        assert_eq!(outbox.granted.len(), GRANTED_KEPT);
        assert_eq!(VerdictRepr::from_bytes(&outbox.granted[0]).unwrap().seq, 1);
    }

    #[test]
    fn granted_verdicts_travel_as_hex_and_bad_text_is_refused() {
        let record = granted_record(7, 3, egress(80));
        assert_eq!(unhex(&hex::encode(record)).unwrap(), record);
        assert_eq!(unhex(&hex::encode_upper(record)).unwrap(), record);
        assert!(unhex("abc").is_err());
        assert!(unhex(&"zz".repeat(RECORD_LEN)).is_err());
        assert!(unhex(&"00".repeat(RECORD_LEN + 1)).is_err());
    }

    #[test]
    fn import_errors_name_the_verdict() {
        let e = ImportError::NotHex {
            index: 2,
            source: unhex("x").unwrap_err(),
        };
        assert!(e.to_string().starts_with("granted verdict 2 is not hex"));
        assert!(std::error::Error::source(&e).is_some());
        let e = ImportError::ForeignTenant {
            found: 1,
            tenant: 2,
        };
        assert_eq!(e.to_string(), "a granted verdict of tenant 1 in tenant 2");
    }
}
