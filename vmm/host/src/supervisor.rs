//! The switch supervisor: when the switch micro-VM stops while the host runs (a guest fault, a
//! triple fault, an injected kill), it boots a new one and gives it everything the old one held
//! (every attachment, every verdict, as `Adopt` so established flows go on) before the tier opens
//! again. A crash loop is bounded: restarts back off, and after [`MAX_RESTARTS`] within
//! [`RESTART_WINDOW`] the tier stays closed and says so.
//!
//! While the tier is closed nothing reaches a tenant port but what the new switch decides with
//! what it holds: a new switch starts default-deny with every port unassigned, and the host
//! pushes nothing else until the replay is taken (see `switch`).
//!
//! Events: `switch_stopped` (why), `switch_restarted` (a new one booted), `switch_restored`
//! (it holds everything; the tier is open; `restart_ms` from the stop), `switch_restart_failed`,
//! `switch_failed` (the crash loop's bound was hit; the tier stays closed).
//!
//! Owns: the [`Book`] (the host's authoritative copy of the switch's records), the restart loop
//! and its backoff. Must not: push to a ring other than the new switch's before it opens, or
//! restart a switch the host is shutting down.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_wire::verdict::{Op, VerdictRepr, RECORD_LEN};

use crate::switch::{SwitchThread, SwitchTier};

/// Restarts allowed within [`RESTART_WINDOW`] before the tier stays closed.
pub(crate) const MAX_RESTARTS: usize = 5;
pub(crate) const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// Verdicts kept per tenant (the oldest goes), as many as a migration carries.
const VERDICTS_KEPT: usize = 1024;

/// The wait before restart number `n` (0-based) within the window: none for the first, then
/// 50 ms, doubling.
pub(crate) fn backoff(n: usize) -> Duration {
    match n {
        0 => Duration::ZERO,
        n => Duration::from_millis(50 << (n - 1).min(8)),
    }
}

/// One tenant's records on the switch: its attachment and its verdicts (by rule).
#[derive(Default)]
struct TenantBook {
    attach: Option<[u8; RECORD_LEN]>,
    /// Rule (the record with seq and lifetime zeroed, op Add) -> (age stamp, the record).
    verdicts: HashMap<[u8; RECORD_LEN], (u64, [u8; RECORD_LEN])>,
}

/// What the switch holds, as the host gave it: applied record by record in the order they
/// entered the ring.
#[derive(Default)]
pub(crate) struct Book {
    tenants: BTreeMap<u32, TenantBook>,
    stamp: u64,
}

fn rule_key(v: &VerdictRepr) -> [u8; RECORD_LEN] {
    VerdictRepr {
        op: Op::Add,
        seq: 0,
        lifetime_ms: 0,
        ..*v
    }
    .to_bytes()
}

impl Book {
    pub(crate) fn apply(&mut self, records: &[[u8; RECORD_LEN]]) {
        for record in records {
            // The host made every record: one it cannot read is a bug, not an attack.
            let Ok(v) = VerdictRepr::from_bytes(record) else {
                log::warn!("switch book: a record that does not parse was pushed");
                continue;
            };
            match v.op {
                Op::FlushTenant => {
                    self.tenants.remove(&v.tenant);
                }
                Op::Attach => self.tenants.entry(v.tenant).or_default().attach = Some(*record),
                Op::Add | Op::Adopt => {
                    self.stamp += 1;
                    let book = self.tenants.entry(v.tenant).or_default();
                    book.verdicts.insert(rule_key(&v), (self.stamp, *record));
                    if book.verdicts.len() > VERDICTS_KEPT {
                        if let Some(oldest) = book
                            .verdicts
                            .iter()
                            .min_by_key(|(_, (stamp, _))| *stamp)
                            .map(|(k, _)| *k)
                        {
                            book.verdicts.remove(&oldest);
                        }
                    }
                }
                Op::Remove => {
                    if let Some(book) = self.tenants.get_mut(&v.tenant) {
                        book.verdicts.remove(&rule_key(&v));
                    }
                }
                // The edge's, never the switch's.
                Op::Release => {}
            }
        }
    }

    pub(crate) fn remove(&mut self, tenant: u32) {
        self.tenants.remove(&tenant);
    }

    /// (attachments, verdicts).
    pub(crate) fn size(&self) -> (usize, usize) {
        self.tenants.values().fold((0, 0), |(a, v), t| {
            (a + usize::from(t.attach.is_some()), v + t.verdicts.len())
        })
    }

    /// Everything for a new switch, per tenant its attachment first, then its verdicts oldest
    /// first as `Adopt` (flows they opened are established: the new switch takes them over
    /// mid-stream, as a migration target's does).
    pub(crate) fn replay(&self) -> Vec<[u8; RECORD_LEN]> {
        let mut out = Vec::new();
        for book in self.tenants.values() {
            out.extend(book.attach);
            out.extend(Self::adopted(book));
        }
        out
    }

    /// Every tenant's verdicts as `Adopt`, and each attached tenant's address, for the edge
    /// (which has no ports): (tenant, its Attach's address fields, its verdicts).
    pub(crate) fn for_edge(&self) -> Vec<(u32, Option<VerdictRepr>, Vec<[u8; RECORD_LEN]>)> {
        self.tenants
            .iter()
            .map(|(&tenant, book)| {
                let attach = book.attach.and_then(|a| VerdictRepr::from_bytes(&a).ok());
                (tenant, attach, Self::adopted(book))
            })
            .collect()
    }

    fn adopted(book: &TenantBook) -> Vec<[u8; RECORD_LEN]> {
        let mut verdicts: Vec<_> = book.verdicts.values().collect();
        verdicts.sort_by_key(|(stamp, _)| *stamp);
        verdicts
            .into_iter()
            .filter_map(|(_, r)| VerdictRepr::from_bytes(r).ok())
            .map(|mut v| {
                v.op = Op::Adopt;
                v.to_bytes()
            })
            .collect()
    }
}

fn emit(tier: &SwitchTier, kind: &str, extra: serde_json::Value) {
    let mut body = serde_json::json!({"host": tier.host_name});
    if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    vmm_core::events::bus().emit(kind, &body);
}

/// Watches the switch micro-VM on `thread` (blocked in `join`: no polling) and restarts it
/// whenever it stops while the host runs.
pub(crate) fn supervise(tier: Arc<SwitchTier>, mut thread: SwitchThread) {
    let mut recent: VecDeque<Instant> = VecDeque::new();
    loop {
        let outcome = thread.join();
        let stopped = Instant::now();
        let generation = {
            let mut live = tier.live();
            live.region = None;
            live.handle = None;
            tier.live_changed.notify_all();
            if live.shutting_down {
                return;
            }
            live.generation
        };
        let reason = match outcome {
            Ok(Ok(o)) => format!("{:?}", o.stop),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the switch thread panicked".into(),
        };
        log::warn!(
            "host {}: the switch micro-VM stopped ({reason}); its ports are closed until a new one holds everything",
            tier.host_name
        );
        emit(
            &tier,
            "switch_stopped",
            serde_json::json!({"generation": generation, "reason": reason}),
        );
        match restart(&tier, &mut recent, stopped) {
            Some(next) => thread = next,
            None => return,
        }
    }
}

/// Boots and restores a new switch (backing off between tries); None when the host shuts down
/// or the crash loop's bound was hit (the tier stays closed).
fn restart(
    tier: &SwitchTier,
    recent: &mut VecDeque<Instant>,
    stopped: Instant,
) -> Option<SwitchThread> {
    loop {
        while recent.front().is_some_and(|t| t.elapsed() > RESTART_WINDOW) {
            recent.pop_front();
        }
        if recent.len() >= MAX_RESTARTS {
            log::error!(
                "host {}: the switch micro-VM stopped {} times within {} s; its tier stays closed",
                tier.host_name,
                recent.len(),
                RESTART_WINDOW.as_secs()
            );
            emit(
                tier,
                "switch_failed",
                serde_json::json!({"restarts": recent.len(),
                    "window_s": RESTART_WINDOW.as_secs(), "console": tier.console}),
            );
            return None;
        }
        // Back off, unless the host shuts down meanwhile.
        let wait_until = Instant::now() + backoff(recent.len());
        {
            let mut live = tier.live();
            loop {
                if live.shutting_down {
                    return None;
                }
                let left = wait_until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                live = tier
                    .live_changed
                    .wait_timeout(live, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        recent.push_back(Instant::now());
        // Keep the crashed switch's console next to the new one's.
        let _ = std::fs::rename(&tier.console, tier.console.with_extension("console.prev"));
        let booted = match tier.boot() {
            Ok(b) => b,
            Err(e) => {
                emit(
                    tier,
                    "switch_restart_failed",
                    serde_json::json!({"error": e.to_string()}),
                );
                continue;
            }
        };
        emit(
            tier,
            "switch_restarted",
            serde_json::json!({"boot_ms": booted.boot_ms}),
        );
        // Closed: nobody changes the book until the tier opens (deliver and apply need an
        // open switch).
        let records = tier.book().replay();
        let (attachments, verdicts) = tier.book().size();
        if !SwitchTier::replay(&booted.region, &records) {
            booted.stop.store(true, Ordering::Release);
            let _ = booted.thread.join();
            emit(
                tier,
                "switch_restart_failed",
                serde_json::json!({"error": "the new switch did not take its records"}),
            );
            continue;
        }
        let generation = {
            let mut live = tier.live();
            if live.shutting_down {
                booted.stop.store(true, Ordering::Release);
                drop(live);
                let _ = booted.thread.join();
                return None;
            }
            live.region = Some(booted.region.clone());
            live.stop = booted.stop.clone();
            live.handle = Some(booted.handle.clone());
            live.generation += 1;
            tier.live_changed.notify_all();
            live.generation
        };
        let restart_us = stopped.elapsed().as_micros() as u64;
        tier.restarts.fetch_add(1, Ordering::Relaxed);
        tier.last_restart_us.store(restart_us, Ordering::Relaxed);
        emit(
            tier,
            "switch_restored",
            serde_json::json!({"generation": generation, "attachments": attachments,
                "verdicts": verdicts, "records": records.len(),
                "boot_ms": booted.boot_ms, "restart_ms": restart_us as f64 / 1e3}),
        );
        return Some(booted.thread);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_wire::verdict::{IpVersion, Protocol, Rule};

    fn add(tenant: u32, seq: u64, port: u16) -> [u8; RECORD_LEN] {
        let mut remote = [0u8; 16];
        remote[..4].copy_from_slice(&[10, 0, 0, 1]);
        VerdictRepr {
            op: Op::Add,
            tenant,
            seq,
            lifetime_ms: 60_000,
            rule: Rule::egress_to(IpVersion::V4, Protocol::Tcp, remote, port),
        }
        .to_bytes()
    }

    fn parsed(records: &[[u8; RECORD_LEN]]) -> Vec<VerdictRepr> {
        records
            .iter()
            .map(|r| VerdictRepr::from_bytes(r).unwrap())
            .collect()
    }

    #[test]
    fn the_book_replays_attachments_then_verdicts_as_adopt_and_follows_removes_and_flushes() {
        let mut book = Book::default();
        let attach = VerdictRepr::attach(7, 1, Some(1), None).to_bytes();
        book.apply(&[attach, add(7, 2, 80), add(7, 3, 443), add(9, 1, 22)]);
        // The same rule again refreshes, it is not kept twice.
        book.apply(&[add(7, 4, 80)]);
        let mut remove = VerdictRepr::from_bytes(&add(7, 5, 443)).unwrap();
        remove.op = Op::Remove;
        book.apply(&[remove.to_bytes()]);
        assert_eq!(book.size(), (1, 2));
        let replay = parsed(&book.replay());
        assert_eq!(replay.len(), 3);
        assert_eq!((replay[0].op, replay[0].tenant), (Op::Attach, 7));
        assert_eq!((replay[1].op, replay[1].seq), (Op::Adopt, 4));
        assert_eq!(replay[1].rule.remote_port_min, 80);
        assert_eq!((replay[2].op, replay[2].tenant), (Op::Adopt, 9));
        book.apply(&[VerdictRepr::flush_tenant(7, 9).to_bytes()]);
        assert_eq!(book.size(), (0, 1));
        book.remove(9);
        assert!(book.replay().is_empty());
    }

    #[test]
    fn the_book_keeps_a_bounded_number_of_verdicts_per_tenant_dropping_the_oldest() {
        let mut book = Book::default();
        for port in 0..(VERDICTS_KEPT as u16 + 10) {
            book.apply(&[add(3, u64::from(port) + 1, port)]);
        }
        assert_eq!(book.size(), (0, VERDICTS_KEPT));
        let replay = parsed(&book.replay());
        assert_eq!(replay[0].rule.remote_port_min, 10, "the ten oldest went");
    }

    #[test]
    fn restarts_back_off_and_the_loop_is_bounded() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert!(backoff(1) < backoff(2) && backoff(2) < backoff(3));
        assert!(backoff(MAX_RESTARTS) <= Duration::from_secs(13));
    }
}
