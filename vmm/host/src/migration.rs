//! Live migration between hosts over TCP (see `migration_link` for the transport and its
//! authentication): the source copies RAM while the VM runs (pre-copy: dirty-page rounds), then
//! pauses it and sends the pages still dirty with the vCPU, device and introspection state; the
//! target restores it, takes it over on its switch (Adopt records, so established flows go on)
//! and announces where it is now. Where KVM cannot log dirty pages, or pre-copy was not asked
//! for, the whole RAM goes during the pause (stop-and-copy).
//!
//! Owns: the migration protocol (header, steps, replies, version) and its source end (the
//! target's is `migration_in`). Must not: lose the VM on a failure: until the target runs it,
//! the source resumes it.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_core::dirty_log::DirtyPages;
use vmm_core::snapshot::{read_json, write_json, PAGE};
use vmm_core::GuestMemoryMmap;

use crate::migration_link::{self, tcp_target};
use crate::tenant::PAUSE_LIMIT;
use crate::{Host, HostError, VmSpec, VmState};

/// The migration protocol's first message (source to target, after the handshake).
#[derive(Serialize, Deserialize)]
pub(crate) struct MigrationHeader {
    pub version: u32,
    pub spec: VmSpec,
    pub source_host: String,
    /// After the final step the source sends a digest of every page and the target checks
    /// its RAM against them (a test of the dirty tracking; it lengthens the pause).
    #[serde(default)]
    pub verify: bool,
}

/// How a VM migrates.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct MigrationOptions {
    /// Dirty-page rounds while the VM runs (where KVM logs dirty pages), then a short pause;
    /// otherwise (or where it cannot) stop-and-copy.
    pub precopy: bool,
    /// Check every page at the target against the source's (during the pause: for tests).
    pub verify: bool,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            precopy: true,
            verify: false,
        }
    }
}

/// One 64-bit digest (SipHash) per page of RAM, in page order.
pub(crate) fn page_digests(memory: &GuestMemoryMmap) -> Vec<u64> {
    use std::hash::Hasher;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut out = Vec::new();
    let mut page = [0u8; PAGE];
    for region in memory.iter() {
        for n in 0..region.len() / PAGE as u64 {
            use vm_memory::Bytes;
            let gpa = region.start_addr().0 + n * PAGE as u64;
            let ok = memory
                .read_slice(&mut page, vm_memory::GuestAddress(gpa))
                .is_ok();
            let mut h = std::hash::DefaultHasher::new();
            h.write(&page);
            out.push(if ok { h.finish() } else { 0 });
        }
    }
    out
}

/// What follows, from the source: a round of pages (a page stream), or the final step (the VM
/// state, a page stream, the introspection state).
#[derive(Serialize, Deserialize)]
pub(crate) enum Step {
    Pages { round: u32 },
    Final,
}

/// The target's answers.
#[derive(Serialize, Deserialize)]
pub(crate) struct MigrationReply {
    pub ok: bool,
    pub error: Option<String>,
    /// In the final reply: ms to restore the VM, ms until its switch took the tenant over.
    pub restore_ms: f64,
    pub tiers_ms: f64,
    /// In the final reply: ms from the final step's arrival to this reply.
    #[serde(default)]
    pub target_ms: f64,
}

pub(crate) const MIGRATION_VERSION: u32 = 2;
/// How long a target waits for its source, and either end for the other's next message.
pub(crate) const MIGRATION_WAIT: Duration = Duration::from_secs(120);
/// Pre-copy rounds at most (round 0, the whole RAM, included).
const MAX_ROUNDS: u32 = 12;
/// Stop iterating once what is dirty would take this long to send at the measured rate.
const STOP_COPY_BUDGET: Duration = Duration::from_millis(4);
/// ... or is at most this many pages.
const STOP_PAGES: u64 = 64;
/// A round that leaves more than this share of the previous one dirty did not converge; two
/// such rounds in a row end the iteration (the rest goes during the pause, as stop-and-copy).
const CONVERGENCE: f64 = 0.9;

/// `tcp:HOST:PORT` → where to connect.
pub fn migration_target(url: &str) -> Result<&str, HostError> {
    tcp_target(url).ok_or_else(|| HostError::InvalidUrl {
        url: url.into(),
        form: "tcp:HOST:PORT",
    })
}

/// One pre-copy round as reported.
#[derive(Clone, Debug, Serialize)]
pub struct Round {
    pub round: u32,
    pub pages: u64,
    pub bytes: u64,
    pub ms: f64,
}

/// Writes the pages `pages` lists (all of them, zero or not: a page may have become zero), then
/// the end marker.
fn write_pages(
    memory: &GuestMemoryMmap,
    pages: impl Iterator<Item = u64>,
    out: &mut impl Write,
) -> std::io::Result<u64> {
    use vm_memory::{Bytes, GuestAddress};
    let mut page = [0u8; PAGE];
    let mut sent = 0;
    for n in pages {
        memory
            .read_slice(&mut page, GuestAddress(n * PAGE as u64))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        out.write_all(&n.to_le_bytes())?;
        out.write_all(&page)?;
        sent += 1;
    }
    out.write_all(&vmm_core::snapshot::END_OF_PAGES.to_le_bytes())?;
    Ok(sent)
}

/// After a failed send: the reason a target that refused mid-stream gave, if it gave one.
fn target_said(reader: &mut migration_link::SealedReader<TcpStream>) -> String {
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(1)));
    match read_json::<MigrationReply>(reader, 1 << 16) {
        Ok(MigrationReply { error: Some(e), .. }) => format!(" (the target: {e})"),
        _ => String::new(),
    }
}

fn merge(into: &mut DirtyPages, from: &DirtyPages) {
    for (a, b) in into.bits.iter_mut().zip(&from.bits) {
        *a |= b;
    }
}

impl Host {
    /// `vm.send-migration`: moves a running VM to the host listening at `url` (`tcp:HOST:PORT`):
    /// authenticate, copy RAM while it runs (`precopy`, where KVM logs dirty pages), pause, send
    /// the rest and its state, and once the target runs it, drop it here (the switch forgets it;
    /// the edge keeps its verdicts and flows, which the tenant goes on using from the target). On
    /// any failure before the target runs it, the VM resumes here and nothing is lost.
    pub fn send_migration(
        &self,
        id: &str,
        url: &str,
        options: MigrationOptions,
    ) -> Result<serde_json::Value, HostError> {
        let precopy = options.precopy;
        let target = migration_target(url)?.to_string();
        if let Err(e) = self.migration_keys().own(&self.config.name) {
            return Err(HostError::MigrationAuth {
                id: id.into(),
                url: url.into(),
                reason: e.to_string(),
            });
        }
        let (spec, handle, introspection, tenant) = {
            let mut tenants = self.tenants();
            let t = tenants
                .get_mut(id)
                .ok_or_else(|| HostError::not_found(id))?;
            t.refresh();
            if t.state != VmState::Running {
                return Err(HostError::WrongState {
                    id: id.into(),
                    state: t.state,
                    allowed: "only a running VM migrates".into(),
                });
            }
            // Migrating from here on: no other action may touch it meanwhile.
            t.state = VmState::Paused;
            t.migrating = true;
            (
                t.spec.clone(),
                t.handle.clone(),
                t.introspection.clone(),
                t.tenant,
            )
        };
        // Set once the edge was told the tenant is leaving (see below).
        let released = std::cell::Cell::new(false);
        let set_state = |state| {
            if let Some(t) = self.tenants().get_mut(id) {
                t.state = state;
                t.migrating = false;
            }
        };
        let slots = handle.slots().clone();
        let failed = |e: String, resume: bool| {
            slots.stop_logging();
            if released.get() {
                // It stays here: this host claims it back at the edge (at once if the target
                // never claimed it, else once the target releases it).
                self.tell_edge(&[self.edge_attach(tenant, spec.ip)]);
            }
            if resume {
                handle.resume_after_capture();
            }
            set_state(VmState::Running);
            self.emit(
                "migration_failed",
                id,
                serde_json::json!({"to": url, "error": e}),
            );
            HostError::MigrationFailed {
                id: id.into(),
                url: url.into(),
                reason: e,
            }
        };
        let stream = target
            .to_socket_addrs()
            .and_then(|mut addrs| {
                addrs
                    .next()
                    .ok_or_else(|| std::io::Error::other("the name has no address"))
            })
            .and_then(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(10)));
        let stream = match stream {
            Ok(s) => s,
            Err(source) => {
                let _ = failed(format!("cannot reach {target}: {source}"), false);
                return Err(HostError::TargetUnreachable { target, source });
            }
        };
        let _ = stream.set_nodelay(true);
        // Either end waits for the other at most this long, reading or writing: a target that
        // stops reading (hung, or a zero window) fails the migration, and the paused tenant
        // resumes here, rather than staying paused until TCP gives up.
        let _ = stream.set_read_timeout(Some(MIGRATION_WAIT));
        let _ = stream.set_write_timeout(Some(MIGRATION_WAIT));
        let mut session =
            match migration_link::connect(stream, &self.migration_keys(), &self.config.name) {
                Ok(s) => s,
                Err(e) => {
                    let _ = failed(format!("authentication: {e}"), false);
                    return Err(HostError::MigrationAuth {
                        id: id.into(),
                        url: url.into(),
                        reason: e.to_string(),
                    });
                }
            };
        let header = MigrationHeader {
            version: MIGRATION_VERSION,
            spec: spec.clone(),
            source_host: self.config.name.clone(),
            verify: options.verify,
        };
        let sent = write_json(&mut session.writer, &header).and_then(|()| session.writer.flush());
        if let Err(e) = sent {
            return Err(failed(format!("sending the header: {e}"), false));
        }
        match read_json::<MigrationReply>(&mut session.reader, 1 << 16) {
            Ok(reply) if reply.ok => {}
            Ok(reply) => {
                return Err(failed(
                    format!("the target refused: {}", reply.error.unwrap_or_default()),
                    false,
                ))
            }
            Err(e) => return Err(failed(format!("no answer from the target: {e}"), false)),
        }
        let memory = handle.memory();
        let total_pages = slots.ram().size / PAGE as u64;
        // Pre-copy, where this KVM logs dirty pages.
        let precopy_error = if precopy {
            vmm_core::dirty_log::supported()
                .and_then(|()| slots.start_logging(memory))
                .err()
                .map(|e| e.to_string())
        } else {
            Some("not asked for".into())
        };
        let mut rounds: Vec<Round> = Vec::new();
        let mut pending: Option<DirtyPages> = None;
        let mut converged = precopy_error.is_none();
        if precopy_error.is_none() {
            let copied = (|| -> Result<(), String> {
                let mut rate = 0.0f64; // bytes per second
                let mut shrinking_failures = 0;
                for round in 0..MAX_ROUNDS {
                    let started = Instant::now();
                    let before = session.writer.sent;
                    write_json(&mut session.writer, &Step::Pages { round })
                        .map_err(|e| e.to_string())?;
                    let pages = if round == 0 {
                        vmm_core::snapshot::write_memory(memory, &mut session.writer)
                            .map_err(|e| e.to_string())?
                            .0
                    } else {
                        let dirty = pending.take().expect("a dirty set to send");
                        write_pages(memory, dirty.iter(), &mut session.writer)
                            .map_err(|e| e.to_string())?
                    };
                    session.writer.flush().map_err(|e| e.to_string())?;
                    let secs = started.elapsed().as_secs_f64();
                    let bytes = session.writer.sent - before;
                    if secs > 0.0 && bytes > 64 * PAGE as u64 {
                        rate = bytes as f64 / secs;
                    }
                    rounds.push(Round {
                        round,
                        pages,
                        bytes,
                        ms: secs * 1e3,
                    });
                    let dirty = slots.take_dirty(memory).map_err(|e| e.to_string())?;
                    let left = dirty.count();
                    pending = Some(dirty);
                    let budget = (rate * STOP_COPY_BUDGET.as_secs_f64()) as u64 / PAGE as u64;
                    if left <= STOP_PAGES.max(budget) {
                        return Ok(());
                    }
                    if round > 0 && left as f64 > pages as f64 * CONVERGENCE {
                        shrinking_failures += 1;
                        if shrinking_failures >= 2 {
                            converged = false;
                            return Ok(());
                        }
                    } else {
                        shrinking_failures = 0;
                    }
                }
                converged = false;
                Ok(())
            })();
            if let Err(e) = copied {
                let why = target_said(&mut session.reader);
                return Err(failed(format!("pre-copy: {e}{why}"), false));
            }
        }
        // The edge hands the tenant's addresses (and with them its verdicts and flows) to the
        // host that attaches it next: the target, once it restored it. Sent before the state, so
        // that the target's claim normally finds it released.
        self.tell_edge(&[self.edge_release(tenant)]);
        released.set(true);
        let paused = Instant::now();
        let snapshot = match handle.capture(PAUSE_LIMIT) {
            Ok(s) => s,
            Err(e) => {
                // Some vCPUs may have parked: let them go on.
                handle.control().resume();
                return Err(failed(format!("capturing the VM: {e}"), false));
            }
        };
        let captured_ms = paused.elapsed().as_secs_f64() * 1e3;
        let introspection_state = introspection.as_ref().map(|i| i.export_state());
        let before = session.writer.sent;
        let mut dirty_ms = 0.0;
        let sent = (|| -> Result<(u64, u64), String> {
            write_json(&mut session.writer, &Step::Final).map_err(|e| e.to_string())?;
            write_json(&mut session.writer, &snapshot).map_err(|e| e.to_string())?;
            let pages = match pending.take() {
                Some(mut dirty) => {
                    // What the pause left dirty since the last look, with what was left over.
                    let t = Instant::now();
                    let last = slots.take_dirty(memory).map_err(|e| e.to_string())?;
                    merge(&mut dirty, &last);
                    dirty_ms = t.elapsed().as_secs_f64() * 1e3;
                    write_pages(memory, dirty.iter(), &mut session.writer)
                        .map_err(|e| e.to_string())?
                }
                None => {
                    vmm_core::snapshot::write_memory(memory, &mut session.writer)
                        .map_err(|e| e.to_string())?
                        .0
                }
            };
            write_json(&mut session.writer, &introspection_state).map_err(|e| e.to_string())?;
            if options.verify {
                for digest in page_digests(memory) {
                    session
                        .writer
                        .write_all(&digest.to_le_bytes())
                        .map_err(|e| e.to_string())?;
                }
            }
            session.writer.flush().map_err(|e| e.to_string())?;
            Ok((pages, total_pages))
        })();
        let (final_pages, pages_total) = match sent {
            Ok(p) => p,
            Err(e) => {
                let why = target_said(&mut session.reader);
                return Err(failed(format!("sending the state: {e}{why}"), true));
            }
        };
        let final_bytes = session.writer.sent - before;
        let sent_ms = paused.elapsed().as_secs_f64() * 1e3;
        let reply = match read_json::<MigrationReply>(&mut session.reader, 1 << 16) {
            Ok(r) if r.ok => r,
            Ok(r) => {
                return Err(failed(
                    format!(
                        "the target could not restore it: {}",
                        r.error.unwrap_or_default()
                    ),
                    true,
                ))
            }
            Err(e) => return Err(failed(format!("no word from the target: {e}"), true)),
        };
        let downtime_ms = paused.elapsed().as_secs_f64() * 1e3;
        slots.stop_logging();
        self.drop_migrated(id);
        self.times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .migration_downtime_ms = Some(downtime_ms);
        let pages_sent: u64 = rounds.iter().map(|r| r.pages).sum::<u64>() + final_pages;
        let report = serde_json::json!({
            "to": url,
            "target_host": session.peer,
            "transport": "tcp",
            "precopy": precopy_error.is_none(),
            "precopy_unavailable": precopy_error,
            "converged": converged,
            "verified": options.verify,
            "rounds": rounds,
            "final_pages": final_pages,
            "final_bytes": final_bytes,
            "bytes_total": session.writer.sent,
            "downtime_ms": downtime_ms,
            "capture_ms": captured_ms,
            "final_dirty_ms": dirty_ms,
            "final_sent_ms": sent_ms,
            "target_ms": reply.target_ms,
            "target_restore_ms": reply.restore_ms,
            "target_tiers_ms": reply.tiers_ms,
            "pages_sent": pages_sent,
            "pages_total": pages_total,
        });
        self.emit("migrated_out", id, report.clone());
        Ok(report)
    }

    /// The target runs the VM: it is gone from here. The switch here forgets the tenant; the
    /// edge must not (the flows live on).
    fn drop_migrated(&self, id: &str) {
        let Some(t) = self.tenants().remove(id) else {
            return;
        };
        self.stop_tenant(t.stop.clone(), &t.control, t.thread);
        let flush = self.flush_record(t.tenant);
        let applied = self.reconfigure(&[flush], &[]);
        if applied.is_err() {
            self.switch.forget(flush, t.tenant);
        }
        self.switch.release(t.slot);
        if let Err(e) = applied {
            self.emit(
                "reconfig_failed",
                id,
                serde_json::json!({"error": e.to_string()}),
            );
        }
    }
}
