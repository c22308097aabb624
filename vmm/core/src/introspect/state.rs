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
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;
use trap_handler::attribution::SocketOp;
use vigil_wire::verdict::{Direction, Op, Rule, VerdictError, VerdictRepr, RECORD_LEN};

use super::logger::LogEntry;
use super::{Delivery, Introspection, VerdictSink};

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
    /// An empty outbox whose first record gets sequence number 1. Both queues are allocated at
    /// their bound, so a trap never grows one (a reallocation and a copy, the larger one by
    /// `mmap`), and every page of them is written here, so a trap never takes one's first touch
    /// (a page fault: ~1.5 µs a page, ~23 ns a record on this emulating host). The outbox still
    /// costs ~350 ns a call while it fills against ~70 ns once full (phase timing in the trap
    /// benchmark): that is mostly cold cache lines, which this does not change. The pages would
    /// be resident after the first 4,096 verdicts anyway (a `VecDeque` cycles through its whole
    /// buffer): 320 KiB per tenant, from the start.
    pub(super) fn new() -> VerdictOutbox {
        VerdictOutbox {
            next_seq: 1,
            pending: resident_queue(PENDING_VERDICTS),
            overflowed: 0,
            granted: resident_queue(GRANTED_KEPT),
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

    /// Forgets every verdict granted and every record still waiting for a tier (a policy
    /// replacement revokes them). Sequence numbers go on.
    pub(super) fn revoke_all(&mut self) {
        self.granted.clear();
        self.pending.clear();
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

/// An empty queue of `capacity` records whose whole buffer has been written once (resident).
fn resident_queue(capacity: usize) -> VecDeque<[u8; RECORD_LEN]> {
    let mut queue = VecDeque::with_capacity(capacity);
    queue.extend(std::iter::repeat_n([0u8; RECORD_LEN], queue.capacity()));
    queue.clear();
    queue
}

/// What a migration carries of a tenant's introspection besides its policy (which travels in
/// the VM spec): where the kernel is, the software breakpoints already written into guest RAM,
/// the verdict sequence, the verdicts granted so far.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct IntrospectionState {
    pub slide: u64,
    /// (operation, address, length of the instruction the int3 covers).
    pub soft_placed: Option<Vec<(SocketOp, u64, u64)>>,
    /// The port points placed, likewise (absent from an older host's state: none).
    #[serde(default)]
    pub port_placed: Option<Vec<(super::PortPoint, u64, u64)>>,
    pub next_seq: u64,
    /// Granted verdict records, hex.
    pub granted: Vec<String>,
    /// Calls waiting at a port point when the state was taken (absent from an older host's
    /// state: none). The target does not complete them: they fail closed there.
    #[serde(default)]
    pub waiting: Vec<super::ports::WaitingCall>,
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
/// How long an allowed call waits for its tiers to take its verdicts (the switch micro-VM drains
/// its ring every few microseconds when it runs) before it is denied instead.
pub(super) const DELIVERY_WAIT: Duration = Duration::from_millis(5);
/// Most verdict records one call produces (a dual-stack bind or listen opens IPv6 and IPv4).
pub(super) const MAX_RULES_PER_CALL: usize = 4;

/// A call's verdicts did not reach the tiers: the call is denied (fail closed) and counted
/// ([`Introspection::undelivered_calls`]); its event's error names why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Undelivered {
    /// The tiers stayed busy for [`DELIVERY_WAIT`]: `ring_full` (the switch's ring),
    /// `edge_window_full` (the edge stopped acknowledging).
    #[error(
        "verdict_refused ({0}): the firewall tiers did not take the call's verdict within {ms} \
         ms: the call is denied",
        ms = DELIVERY_WAIT.as_millis()
    )]
    Timeout(&'static str),
    /// A tier refused them (`over_quota`, `table_full`, ...), did not confirm them in time
    /// (`switch_timeout`), or is restarting (`switch_restarting`).
    #[error(
        "verdict_refused ({0}): the firewall tiers refused the call's verdict: the call is denied"
    )]
    Refused(&'static str),
    /// The `verdict.push` failpoint failed the delivery (fault injection).
    #[error("failpoint verdict.push: the call's verdict was not delivered: the call is denied")]
    Injected,
    /// The policy the call was decided under was replaced before its verdict was granted (the
    /// replacement revoked everything granted before it): nothing is granted, the call is
    /// denied, and a retry is decided by the policy now in force.
    #[error(
        "policy_replaced: the policy the call was decided under was replaced before its verdict \
         was granted: the call is denied"
    )]
    PolicyReplaced,
}

/// Offers `records` to `tiers` until they take them (all at once), refuse them, or
/// [`DELIVERY_WAIT`] passes while they are busy.
fn deliver_bounded(
    tiers: &dyn VerdictSink,
    records: &[[u8; RECORD_LEN]],
) -> Result<(), Undelivered> {
    let deadline = Instant::now() + DELIVERY_WAIT;
    // At least one retry however long this thread was descheduled: the bound is on waiting, and
    // a host too loaded to come back within it still gets its second offer.
    let mut first = true;
    loop {
        match tiers.deliver(records) {
            Delivery::Taken => return Ok(()),
            Delivery::Refused(reason) => return Err(Undelivered::Refused(reason)),
            Delivery::Busy(reason) if !first && Instant::now() >= deadline => {
                return Err(Undelivered::Timeout(reason))
            }
            Delivery::Busy(_) => {}
        }
        first = false;
        std::thread::yield_now();
    }
}

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
            port_placed: self.port_placed.get().cloned(),
            next_seq: outbox.next_seq,
            granted: outbox.granted.iter().map(hex::encode).collect(),
            waiting: self.pending().export(),
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
            let _ = self
                .port_placed
                .set(state.port_placed.clone().unwrap_or_default());
        }
        self.pending().import(&state.waiting, Instant::now());
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

    /// Produces the verdict records of an allowed operation and delivers them to the tiers,
    /// all or none, before the vCPU resumes; returns the first one's sequence number (None when
    /// the operation opens nothing on the tiers). A batch the tiers do not take within
    /// [`DELIVERY_WAIT`] (the switch's ring stays full) is not granted: the caller denies the
    /// call, so no call is allowed in the guest while its flow is dropped on the wire. Without
    /// tiers (a VM not plugged into any), the records wait for [`Self::take_verdicts`].
    ///
    /// `decided_under` is the epoch of the policy that allowed the call
    /// ([`Self::decide_under_policy`]): if the policy was replaced since, nothing is granted
    /// ([`Undelivered::PolicyReplaced`]). Checked under the outbox's lock, which the
    /// replacement holds while it swaps the policy and revokes what was granted.
    pub(super) fn produce_verdicts(
        &self,
        rules: &[Rule],
        decided_under: u64,
    ) -> Result<Option<u64>, Undelivered> {
        if rules.is_empty() {
            return Ok(None);
        }
        // Error: the tiers "did not take" the batch, so the call is denied (fail closed).
        if crate::failpoints::check_thread("verdict.push").is_some() {
            self.undelivered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(Undelivered::Injected);
        }
        let mut records = [[0u8; RECORD_LEN]; MAX_RULES_PER_CALL];
        let records = &mut records[..rules.len().min(MAX_RULES_PER_CALL)];
        let first = {
            let mut outbox = self.outbox();
            if self.policy_epoch() != decided_under {
                self.undelivered
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(Undelivered::PolicyReplaced);
            }
            let first = outbox.next_seq;
            for (record, rule) in records.iter_mut().zip(rules) {
                *record = granted_record(self.tenant, outbox.take_seq(), *rule);
            }
            match &self.tiers {
                Some(tiers) => deliver_bounded(tiers.as_ref(), records).inspect_err(|_| {
                    self.undelivered
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                })?,
                None => records.iter().for_each(|r| outbox.keep_pending(*r)),
            }
            records.iter().for_each(|r| outbox.grant(*r));
            first
        };
        for record in records.iter() {
            // Formatted by the logger thread, off the trap path.
            let _ = self.events.send(LogEntry::Verdict(*record));
        }
        Ok(Some(first))
    }

    /// Allowed calls denied because their verdicts did not reach the tiers ([`Undelivered`]).
    pub fn undelivered_calls(&self) -> u64 {
        self.undelivered.load(std::sync::atomic::Ordering::Relaxed)
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

    /// The Debian tenant kernel's profile (built by scripts/build-tenant-image), analysed once.
    fn real_profile() -> trap_handler::KernelProfile {
        static PROFILE: std::sync::OnceLock<trap_handler::KernelProfile> =
            std::sync::OnceLock::new();
        PROFILE
            .get_or_init(|| {
                let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../build/tenant/vmlinux");
                let bytes = std::fs::read(&path).unwrap_or_else(|e| {
                    panic!("{}: {e} (run scripts/build-tenant-image)", path.display())
                });
                trap_handler::analyze_vmlinux(&bytes)
                    .expect("the tenant kernel analyses")
                    .profile
            })
            .clone()
    }

    fn policy() -> trap_handler::policy::PolicySpec {
        serde_json::from_str(r#"{"allow": [{"op": "connect", "exe": "/bin/busybox"}]}"#).unwrap()
    }

    fn introspection(tiers: Option<std::sync::Arc<dyn VerdictSink>>) -> Introspection {
        Introspection::new("t", real_profile(), policy(), tiers, None).unwrap()
    }

    /// Tiers that refuse the first `refusals` offers, then take everything.
    struct SlowTiers {
        refusals: std::sync::atomic::AtomicU32,
        taken: std::sync::Mutex<Vec<[u8; RECORD_LEN]>>,
    }

    impl SlowTiers {
        fn new(refusals: u32) -> std::sync::Arc<SlowTiers> {
            std::sync::Arc::new(SlowTiers {
                refusals: refusals.into(),
                taken: Default::default(),
            })
        }
    }

    impl VerdictSink for SlowTiers {
        fn deliver(&self, records: &[[u8; RECORD_LEN]]) -> Delivery {
            use std::sync::atomic::Ordering;
            if self
                .refusals
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Delivery::Busy("ring_full");
            }
            self.taken.lock().unwrap().extend_from_slice(records);
            Delivery::Taken
        }
    }

    /// A tier that refuses every record for good, as a switch at its tenant's quota does.
    struct RefusingTiers(std::sync::atomic::AtomicU32);

    impl VerdictSink for RefusingTiers {
        fn deliver(&self, _: &[[u8; RECORD_LEN]]) -> Delivery {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Delivery::Refused("over_quota")
        }
    }

    /// A call allowed by a policy that is replaced before its verdict is granted: the
    /// replacement revoked everything granted and the host flushes the tiers, so a grant after
    /// it would open, under the new policy, a flow only the old one allowed. Not granted; the
    /// call is denied and counted, and a call decided under the new policy is granted.
    #[test]
    fn a_verdict_decided_under_a_replaced_policy_is_not_granted() {
        let tiers = SlowTiers::new(0);
        let i = introspection(Some(tiers.clone()));
        let (_, old) = i.decide_under_policy(|_| ());
        i.replace_policy(serde_json::from_str(r#"{"allow": []}"#).unwrap())
            .unwrap();
        assert_eq!(
            i.produce_verdicts(&[egress(80)], old),
            Err(Undelivered::PolicyReplaced)
        );
        assert!(tiers.taken.lock().unwrap().is_empty());
        assert!(i.export_state().granted.is_empty());
        assert_eq!(i.undelivered_calls(), 1);
        let (_, new) = i.decide_under_policy(|_| ());
        assert_ne!(new, old);
        assert_eq!(i.produce_verdicts(&[egress(81)], new).unwrap(), Some(1));
        assert_eq!(tiers.taken.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_refused_verdict_denies_the_call_at_once_and_says_why() {
        let tiers = std::sync::Arc::new(RefusingTiers(0.into()));
        let i = introspection(Some(tiers.clone()));
        let err = i
            .produce_verdicts(&[egress(80)], i.policy_epoch())
            .unwrap_err();
        assert_eq!(err, Undelivered::Refused("over_quota"));
        assert!(
            err.to_string().starts_with("verdict_refused (over_quota)"),
            "{err}"
        );
        // Refused for good: no retry (a retry could not change the quota's answer).
        assert_eq!(tiers.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(i.export_state().granted.is_empty());
        assert!(i.take_verdicts().0.is_empty());
    }

    #[test]
    fn verdicts_reach_the_tiers_before_the_call_goes_on() {
        // One refusal: the retry after it is made whatever the host's load (three refusals
        // could outlast the 5 ms bound on a loaded host, and then the call is rightly denied).
        let tiers = SlowTiers::new(1);
        let i = introspection(Some(tiers.clone()));
        let seq = i
            .produce_verdicts(&[egress(80), egress(81)], i.policy_epoch())
            .unwrap();
        assert_eq!(seq, Some(1));
        assert_eq!(
            tiers.taken.lock().unwrap().len(),
            2,
            "both, after a refusal"
        );
        assert_eq!(i.export_state().granted.len(), 2);
        assert_eq!(i.take_verdicts().0.len(), 0, "nothing left waiting");
        assert_eq!(i.produce_verdicts(&[], i.policy_epoch()).unwrap(), None);
    }

    #[test]
    fn verdicts_the_tiers_never_take_are_not_granted() {
        let tiers = SlowTiers::new(u32::MAX);
        let i = introspection(Some(tiers.clone()));
        let started = Instant::now();
        assert_eq!(
            i.produce_verdicts(&[egress(80)], i.policy_epoch()),
            Err(Undelivered::Timeout("ring_full"))
        );
        assert!(
            started.elapsed() >= DELIVERY_WAIT,
            "the call waited, bounded"
        );
        assert!(tiers.taken.lock().unwrap().is_empty());
        assert!(
            i.export_state().granted.is_empty(),
            "a migration does not re-issue it"
        );
        assert!(
            i.take_verdicts().0.is_empty(),
            "no tier gets it later either"
        );
        assert!(Undelivered::Timeout("ring_full")
            .to_string()
            .contains("denied"));
        assert_eq!(i.undelivered_calls(), 1, "counted");
    }

    /// Fault injection at the verdict push (`verdict.push=error`): the call is denied, nothing
    /// reaches the tiers or is granted, the denial is counted and its event's error names the
    /// failpoint. Only this test's own thread is aimed at.
    #[test]
    fn an_injected_verdict_push_failure_denies_the_call_and_counts_it() {
        crate::failpoints::arm("verdict.push@fp-push-vcpu=error");
        let tiers = SlowTiers::new(0);
        let i = std::sync::Arc::new(introspection(Some(tiers.clone())));
        let on_vcpu = {
            let i = i.clone();
            std::thread::Builder::new()
                .name("fp-push-vcpu0".into())
                .spawn(move || i.produce_verdicts(&[egress(80)], i.policy_epoch()))
                .unwrap()
                .join()
                .unwrap()
        };
        assert_eq!(on_vcpu, Err(Undelivered::Injected));
        assert!(tiers.taken.lock().unwrap().is_empty(), "nothing delivered");
        assert!(i.export_state().granted.is_empty(), "nothing granted");
        assert_eq!(i.undelivered_calls(), 1);
        let error = Undelivered::Injected.to_string();
        assert!(error.contains("failpoint verdict.push") && error.contains("denied"));
        // Another thread (another VM's vCPU) is not aimed at: its call goes through.
        assert_eq!(
            i.produce_verdicts(&[egress(81)], i.policy_epoch()).unwrap(),
            Some(1)
        );
        assert_eq!(tiers.taken.lock().unwrap().len(), 1);
        assert_eq!(i.undelivered_calls(), 1);
    }

    #[test]
    fn a_full_switch_ring_refuses_the_whole_batch() {
        let size = 8 << 20;
        let memory = crate::anonymous_memory(size, true).unwrap();
        let region = std::sync::Arc::new(
            crate::verdict_region::VerdictRegion::reserve(&memory, size as u64).unwrap(),
        );
        // Nobody consumes: fill the ring to one free slot.
        let mut pushed = 0;
        while region.push(&[[1u8; RECORD_LEN], [1u8; RECORD_LEN]]).is_ok() {
            pushed += 2;
        }
        region.push(&[[1u8; RECORD_LEN]]).ok();
        assert!(pushed > 0);
        let i = introspection(Some(region.clone()));
        assert_eq!(
            i.produce_verdicts(&[egress(80), egress(81)], i.policy_epoch()),
            Err(Undelivered::Timeout("ring_full")),
            "two records, at most one slot: none goes in"
        );
        assert!(i.export_state().granted.is_empty());
    }

    #[test]
    fn without_tiers_verdicts_wait_for_one() {
        let i = introspection(None);
        assert_eq!(
            i.produce_verdicts(&[egress(80)], i.policy_epoch()).unwrap(),
            Some(1)
        );
        let (waiting, overflowed) = i.take_verdicts();
        assert_eq!((waiting.len(), overflowed), (1, 0));
    }

    #[test]
    fn a_replaced_policy_forgets_what_the_old_one_granted() {
        let i = introspection(None);
        i.produce_verdicts(&[egress(80), egress(81)], i.policy_epoch())
            .unwrap();
        assert_eq!(i.export_state().granted.len(), 2);
        i.replace_policy(policy()).unwrap();
        let state = i.export_state();
        assert!(
            state.granted.is_empty(),
            "a later migration re-issues nothing"
        );
        assert!(
            i.take_verdicts().0.is_empty(),
            "no tier gets the old verdicts later"
        );
        assert!(state.next_seq > 2, "sequence numbers go on");
        // What the new policy grants is kept as before.
        i.produce_verdicts(&[egress(82)], i.policy_epoch()).unwrap();
        assert_eq!(i.export_state().granted.len(), 1);
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
        // Allocated at their bound: filling them never grows them (no allocation on a trap).
        let capacities = |o: &VerdictOutbox| (o.pending.capacity(), o.granted.capacity());
        let at_start = capacities(&outbox);
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
        assert_eq!(capacities(&outbox), at_start, "a queue grew");
    }

    /// Pages of `len` bytes from `start` that are not resident in this process (`mincore`).
    fn pages_not_resident(start: *const u8, len: usize) -> usize {
        let page = 4096;
        let first = start as usize & !(page - 1);
        let span = start as usize + len - first;
        let mut vec = vec![0u8; span.div_ceil(page)];
        // SAFETY: `first..first + span` covers a live allocation of ours (rounded out to its
        // pages, which are mapped); `vec` has one byte per page.
        let rc = unsafe { libc::mincore(first as *mut libc::c_void, span, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 0).count()
    }

    #[test]
    fn a_new_outbox_has_every_page_of_its_queues_resident() {
        // Without the first write at creation, std's allocator maps a 256 KiB buffer fresh and
        // leaves its pages untouched: a trap would take their first touches.
        for (mut queue, bound) in [
            (resident_queue(PENDING_VERDICTS), PENDING_VERDICTS),
            (resident_queue(GRANTED_KEPT), GRANTED_KEPT),
        ] {
            assert!(queue.is_empty() && queue.capacity() >= bound);
            // An emptied queue writes its next record at the buffer's start.
            queue.push_back([1; RECORD_LEN]);
            let start = queue.as_slices().0.as_ptr().cast::<u8>();
            assert_eq!(
                pages_not_resident(start, queue.capacity() * RECORD_LEN),
                0,
                "a queue of {bound} records has pages a trap would touch first"
            );
        }
        let outbox = VerdictOutbox::new();
        assert!(outbox.pending.is_empty() && outbox.granted.is_empty());
        assert_eq!(outbox.next_seq, 1);
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
