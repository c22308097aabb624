//! Live migration between hosts over a Unix socket: the source pauses the VM, sends its state,
//! RAM and introspection state; the target restores it, takes it over on its switch (Adopt
//! records, so established flows go on) and announces where it is now.
//!
//! Owns: the migration protocol (header, replies, version) and both of its ends. Must not: lose
//! the VM on a failure: until the target runs it, the source resumes it.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vigil_wire::verdict::RECORD_LEN;
use vmm_core::snapshot::{read_json, write_json, VmSnapshot};

use crate::snapshot::{import_introspection, MAX_STATE_DOC};
use crate::tenant::{start_vm, Tenant, PAUSE_LIMIT};
use crate::{Host, HostError, VmSpec, VmState};

/// The migration protocol's first message (source to target).
#[derive(Serialize, Deserialize)]
struct MigrationHeader {
    version: u32,
    spec: VmSpec,
    source_host: String,
}

/// The target's answers.
#[derive(Serialize, Deserialize)]
struct MigrationReply {
    ok: bool,
    error: Option<String>,
    /// In the final reply: ms to restore the VM, ms until its switch took the tenant over.
    restore_ms: f64,
    tiers_ms: f64,
}

const MIGRATION_VERSION: u32 = 1;
/// How long a target waits for its source.
const MIGRATION_WAIT: Duration = Duration::from_secs(120);

/// `unix:/path` → the path.
pub fn unix_path(url: &str) -> Result<PathBuf, HostError> {
    match url.strip_prefix("unix:") {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        _ => Err(HostError::InvalidUrl {
            url: url.into(),
            form: "unix:/absolute/path",
        }),
    }
}

/// A gratuitous ARP from the tenant (who-has its own address, broadcast): sent on its behalf
/// after a migration so that the switch, the edge's VXLAN table and outside hosts learn where it
/// is now (virtio-net's GUEST_ANNOUNCE does this from inside the guest; the tenant's kernel was
/// not asked to).
fn announcement(mac: [u8; 6], ip: IpAddr) -> Option<Vec<u8>> {
    let IpAddr::V4(ip) = ip else {
        return None;
    };
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac);
    // EtherType ARP; htype Ethernet, ptype IPv4, hlen 6, plen 4, op request (RFC 826).
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip.octets());
    Some(frame)
}

impl Host {
    /// `vm.send-migration`: moves a running VM to the host listening at `url`: pause, send its
    /// state and RAM, and once the target runs it, drop it here (the switch forgets it; the edge
    /// keeps its verdicts and flows, which the tenant goes on using from the target). On any
    /// failure before the target runs it, the VM resumes here and nothing is lost.
    pub fn send_migration(&self, id: &str, url: &str) -> Result<serde_json::Value, HostError> {
        let path = unix_path(url)?;
        let (spec, handle, introspection) = {
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
            // Paused from here on: no other action may touch it meanwhile.
            t.state = VmState::Paused;
            (t.spec.clone(), t.handle.clone(), t.introspection.clone())
        };
        let set_state = |state| {
            if let Some(t) = self.tenants().get_mut(id) {
                t.state = state;
            }
        };
        let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                set_state(VmState::Running);
                return Err(HostError::TargetUnreachable { path, source: e });
            }
        };
        let _ = stream.set_read_timeout(Some(MIGRATION_WAIT));
        let failed = |e: String, resume: bool| {
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
        let header = MigrationHeader {
            version: MIGRATION_VERSION,
            spec: spec.clone(),
            source_host: self.config.name.clone(),
        };
        if let Err(e) = write_json(&mut stream, &header) {
            return Err(failed(format!("sending the header: {e}"), false));
        }
        match read_json::<MigrationReply>(&mut stream, 1 << 16) {
            Ok(reply) if reply.ok => {}
            Ok(reply) => {
                return Err(failed(
                    format!("the target refused: {}", reply.error.unwrap_or_default()),
                    false,
                ))
            }
            Err(e) => return Err(failed(format!("no answer from the target: {e}"), false)),
        }
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
        let sent = (|| -> std::io::Result<(u64, u64)> {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut stream);
            write_json(&mut out, &snapshot)?;
            let pages = vmm_core::snapshot::write_memory(handle.memory(), &mut out)?;
            write_json(&mut out, &introspection_state)?;
            std::io::Write::flush(&mut out)?;
            Ok(pages)
        })();
        let (pages_sent, pages_total) = match sent {
            Ok(p) => p,
            Err(e) => return Err(failed(format!("sending the state: {e}"), true)),
        };
        let reply = match read_json::<MigrationReply>(&mut stream, 1 << 16) {
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
        // The target runs it: it is gone from here.
        let t = self.tenants().remove(id);
        if let Some(t) = t {
            self.stop_tenant(t.stop.clone(), &t.control, t.thread);
            // The switch here forgets the tenant; the edge must not (the flows live on).
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
        self.times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .migration_downtime_ms = Some(downtime_ms);
        let report = serde_json::json!({
            "to": url,
            "downtime_ms": downtime_ms,
            "capture_ms": captured_ms,
            "target_restore_ms": reply.restore_ms,
            "target_tiers_ms": reply.tiers_ms,
            "pages_sent": pages_sent,
            "pages_total": pages_total,
        });
        self.emit("migrated_out", id, report.clone());
        Ok(report)
    }

    /// `vm.receive-migration`: listens at `url` for one migrating VM (in the background; the
    /// call returns once the socket listens).
    pub fn receive_migration(self: &Arc<Self>, url: &str) -> Result<(), HostError> {
        let path = unix_path(url)?;
        if self.shutdown.load(Ordering::Acquire) {
            return Err(HostError::ShuttingDown);
        }
        let _ = std::fs::remove_file(&path);
        let listener =
            std::os::unix::net::UnixListener::bind(&path).map_err(|e| HostError::Path {
                what: format!("cannot listen at {}", path.display()),
                source: e,
            })?;
        let host = self.clone();
        let url = url.to_string();
        std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || {
                let result = host.accept_migration(&listener);
                let _ = std::fs::remove_file(&path);
                if let Err(e) = result {
                    host.emit(
                        "migration_failed",
                        "",
                        serde_json::json!({"at": url, "error": e}),
                    );
                }
            })
            .map_err(|e| HostError::internal("cannot start the receiver", e))?;
        Ok(())
    }

    pub(crate) fn accept_migration(
        &self,
        listener: &std::os::unix::net::UnixListener,
    ) -> Result<(), String> {
        // Wait for the source, but not forever.
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + MIGRATION_WAIT;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err("no source connected".into());
                    }
                    let mut poll = libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(listener),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut poll, 1, 500) };
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        let _ = stream.set_read_timeout(Some(MIGRATION_WAIT));
        let reply = |stream: &mut std::os::unix::net::UnixStream, r: MigrationReply| {
            let _ = write_json(stream, &r);
        };
        let refuse = |stream: &mut std::os::unix::net::UnixStream, e: String| {
            reply(
                stream,
                MigrationReply {
                    ok: false,
                    error: Some(e.clone()),
                    restore_ms: 0.0,
                    tiers_ms: 0.0,
                },
            );
            e
        };
        let header: MigrationHeader =
            read_json(&mut stream, 1 << 20).map_err(|e| format!("header: {e}"))?;
        if header.version != MIGRATION_VERSION {
            return Err(refuse(
                &mut stream,
                format!(
                    "migration protocol {} (this host speaks {MIGRATION_VERSION})",
                    header.version
                ),
            ));
        }
        let spec = header.spec;
        let id = spec.id.clone();
        // Build the VM (slow: the kernel is read and checked) while the source still runs it.
        let prepared = self.prepare(&spec);
        let (vm, introspection, tenant, slot, mac) = match prepared {
            Ok(p) => p,
            Err(e) => return Err(refuse(&mut stream, e.to_string())),
        };
        let release = || {
            // Whatever of the tenant the switch took (or its book would give a restarted one).
            self.switch.forget(self.flush_record(tenant), tenant);
            self.switch.release(slot);
        };
        reply(
            &mut stream,
            MigrationReply {
                ok: true,
                error: None,
                restore_ms: 0.0,
                tiers_ms: 0.0,
            },
        );
        let mut vm = vm;
        let arrived = Instant::now();
        let restored = (|| -> Result<Vec<[u8; RECORD_LEN]>, String> {
            let mut input = std::io::BufReader::with_capacity(1 << 20, &mut stream);
            let snapshot: VmSnapshot =
                read_json(&mut input, MAX_STATE_DOC).map_err(|e| format!("state: {e}"))?;
            vm.restore(&snapshot, &mut input)
                .map_err(|e| e.to_string())?;
            let state: Option<vmm_core::introspect::IntrospectionState> =
                read_json(&mut input, MAX_STATE_DOC).map_err(|e| format!("introspection: {e}"))?;
            import_introspection(&introspection, &state)
        })();
        let adopted = match restored {
            Ok(a) => a,
            Err(e) => {
                release();
                return Err(refuse(&mut stream, e));
            }
        };
        let restore_ms = arrived.elapsed().as_secs_f64() * 1e3;
        // This switch takes the tenant over before it runs: its port and address, and its
        // verdicts as Adopt (its flows are established; they continue mid-stream here).
        let mut records = vec![self.switch_attach(tenant, slot, spec.ip, Some(mac))];
        records.extend(adopted.iter().copied());
        let tiers_ms = match self.reconfigure(&records, &[]) {
            Ok(ms) => ms,
            Err(e) => {
                release();
                return Err(refuse(&mut stream, e.to_string()));
            }
        };
        let mut entry = Tenant::new(
            spec.clone(),
            tenant,
            slot,
            &vm,
            introspection,
            VmState::Running,
        );
        entry.thread = Some(
            start_vm(&id, vm, self.on_own_stop(&id, tenant))
                .map_err(|e| refuse(&mut stream, e.to_string()))?,
        );
        self.tenants().insert(id.clone(), entry);
        // Tell the network where the tenant is now.
        if let Some(frame) = announcement(mac, spec.ip) {
            let ports = self.switch.ports.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = ports[slot].0.link.send_frame(&frame) {
                log::warn!("{id}: cannot announce the migrated tenant: {e}");
            }
        }
        reply(
            &mut stream,
            MigrationReply {
                ok: true,
                error: None,
                restore_ms,
                tiers_ms,
            },
        );
        self.times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .migrate_ms = Some(tiers_ms);
        self.emit(
            "migrated_in",
            &id,
            serde_json::json!({"from": header.source_host, "tenant": tenant,
                "switch_port": slot + 1, "restore_ms": restore_ms, "tiers_ms": tiers_ms,
                "adopted_verdicts": adopted.len()}),
        );
        Ok(())
    }
}
