//! Snapshot to and restore from a directory (`file:///dir`): spec, vCPU/VM/device state, RAM,
//! introspection state.
//!
//! Owns: the snapshot directory's layout and the import of a restored tenant's introspection
//! state (shared with migration). Must not: leave a running VM paused after a snapshot, or a
//! switch port held after a failed restore.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_wire::verdict::RECORD_LEN;
use vmm_core::introspect::Introspection;
use vmm_core::snapshot::{read_json, write_json, VmSnapshot, PAGE};
use vmm_core::vm::input_file;

use crate::lifecycle::Prepared;
use crate::tenant::{start_vm, Tenant, PAUSE_LIMIT};
use crate::{Host, HostError, VmInfo, VmSpec, VmState};

/// Largest state document (vCPU and device state; RAM travels as pages).
pub(crate) const MAX_STATE_DOC: usize = 16 << 20;
/// Largest spec.json read (a spec with its policy; the API takes bodies of at most 1 MiB).
const MAX_SPEC_FILE: u64 = 1 << 20;

/// A snapshot file or step that failed: `what: reason`.
fn invalid(what: &str, reason: impl std::fmt::Display) -> HostError {
    HostError::InvalidSnapshot {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// `file:///dir` → the directory.
pub fn file_path(url: &str) -> Result<PathBuf, HostError> {
    match url.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        _ => Err(HostError::InvalidUrl {
            url: url.into(),
            form: "file:///absolute/path",
        }),
    }
}

/// Takes over a restored tenant's introspection state, if both ends have one; returns its
/// granted verdicts as `Adopt` records for this host's tiers.
pub(crate) fn import_introspection(
    introspection: &Option<Arc<Introspection>>,
    state: &Option<vmm_core::introspect::IntrospectionState>,
) -> Result<Vec<[u8; RECORD_LEN]>, String> {
    match (introspection, state) {
        (Some(i), Some(state)) => i.import_state(state).map_err(|e| e.to_string()),
        _ => Ok(Vec::new()),
    }
}

impl Host {
    /// `vm.snapshot`: writes a VM's state to a directory (`file:///dir`): spec, vCPU/VM/device
    /// state, RAM, introspection. A running VM pauses for the capture and goes on; a paused one
    /// stays paused.
    pub fn snapshot(&self, id: &str, url: &str) -> Result<serde_json::Value, HostError> {
        let dir = file_path(url)?;
        let (spec, handle, introspection, was_paused) = {
            let mut tenants = self.tenants();
            let t = tenants
                .get_mut(id)
                .ok_or_else(|| HostError::not_found(id))?;
            t.refresh();
            t.not_migrating("is saved")?;
            if !matches!(t.state, VmState::Running | VmState::Paused) {
                return Err(HostError::WrongState {
                    id: id.into(),
                    state: t.state,
                    allowed: "only a running or paused VM has state to save".into(),
                });
            }
            (
                t.spec.clone(),
                t.handle.clone(),
                t.introspection.clone(),
                t.state == VmState::Paused,
            )
        };
        std::fs::create_dir_all(&dir).map_err(|e| HostError::Path {
            what: format!("cannot create {}", dir.display()),
            source: e,
        })?;
        let started = Instant::now();
        if was_paused {
            // Parked vCPUs capture as they park again.
            handle.control().resume();
        }
        let snapshot = handle.capture(PAUSE_LIMIT).map_err(|e| {
            handle.control().resume();
            HostError::internal("capture", e)
        })?;
        let written = (|| -> std::io::Result<(u64, u64)> {
            let write_file = |name: &str, bytes: Vec<u8>| std::fs::write(dir.join(name), bytes);
            write_file("spec.json", serde_json::to_vec_pretty(&spec)?)?;
            let mut state = Vec::new();
            write_json(&mut state, &snapshot)?;
            write_file("state.bin", state)?;
            let mut intro = Vec::new();
            write_json(
                &mut intro,
                &introspection.as_ref().map(|i| i.export_state()),
            )?;
            write_file("introspection.bin", intro)?;
            let mut memory =
                std::io::BufWriter::new(std::fs::File::create(dir.join("memory.bin"))?);
            let pages = vmm_core::snapshot::write_memory(handle.memory(), &mut memory)?;
            std::io::Write::flush(&mut memory)?;
            Ok(pages)
        })();
        handle.resume_devices();
        if !was_paused {
            handle.control().resume();
        }
        let (pages, total) =
            written.map_err(|e| HostError::internal(format!("writing {}", dir.display()), e))?;
        let report = serde_json::json!({"to": url, "pages_written": pages, "pages_total": total,
            "ms": started.elapsed().as_secs_f64() * 1e3});
        self.emit("vm_snapshot", id, report.clone());
        Ok(report)
    }

    /// `vm.restore`: creates a VM from a snapshot directory, paused (`vm.resume` starts it),
    /// with its port, address and verdicts on both tiers.
    pub fn restore(&self, url: &str) -> Result<VmInfo, HostError> {
        let dir = file_path(url)?;
        // Each file is read only as a regular file, within a bound for its kind (as a VM's
        // kernel is): a FIFO hung the API worker, `/dev/zero` as a state file grew the read
        // until the host (every VM) died, and as memory.bin was page 0 for ever, spinning.
        let read = |name: &str, max: u64| {
            input_file::read(&dir.join(name), max).map_err(|e| invalid(name, e))
        };
        let state_max = MAX_STATE_DOC as u64 + 4;
        let spec: VmSpec = serde_json::from_slice(&read("spec.json", MAX_SPEC_FILE)?)
            .map_err(|e| invalid("spec.json", e))?;
        let snapshot: VmSnapshot =
            read_json(&mut &read("state.bin", state_max)?[..], MAX_STATE_DOC)
                .map_err(|e| invalid("state.bin", e))?;
        let state: Option<vmm_core::introspect::IntrospectionState> = read_json(
            &mut &read("introspection.bin", state_max)?[..],
            MAX_STATE_DOC,
        )
        .map_err(|e| invalid("introspection.bin", e))?;
        // Every page of the guest's RAM once (its number and bytes), then the end marker.
        let pages = spec.memory_mib.saturating_mul(1 << 20) / PAGE as u64;
        let memory_max = pages.saturating_mul(PAGE as u64 + 8).saturating_add(8);
        let (memory, _) = input_file::open(&dir.join("memory.bin"), memory_max)
            .map_err(|e| invalid("memory.bin", e))?;
        let Prepared {
            mut vm,
            introspection,
            tenant,
            slot,
            claim: _claim,
            ..
        } = self.prepare(&spec)?;
        let release = || {
            // Whatever of the tenant the switch took (or its book would give a restarted one).
            self.switch.forget(self.flush_record(tenant), tenant);
            self.switch.release(slot);
        };
        let restored = vm
            .restore(&snapshot, &mut std::io::BufReader::new(memory))
            .map_err(|e| e.to_string())
            .and_then(|_| import_introspection(&introspection, &state));
        let adopted = match restored {
            Ok(a) => a,
            Err(e) => {
                release();
                return Err(invalid("restore", e));
            }
        };
        let mac = vmm_core::net_config::parse_mac(&spec.mac);
        let mut switch = vec![self.switch_attach(tenant, slot, spec.ip, mac)];
        switch.extend(adopted.iter().copied());
        // The claim of its address on its own, tracked: its first resume announces it once the
        // edge acknowledged the claim (`Host::announce`). The verdicts follow, in order; a
        // refusal of theirs goes to the host's hook, which takes them back at the switch.
        let claim = self.claim_at_edge(tenant, spec.ip);
        if let Err(e) = self.reconfigure(&switch, &adopted) {
            release();
            return Err(e);
        }
        // Paused until vm.resume: the vCPUs park before their first instruction.
        let _ = vm.run_control().pause(Duration::ZERO);
        let mut entry = Tenant::new(spec, tenant, slot, &vm, introspection, VmState::Paused);
        entry.announce_on_resume = Some(claim);
        let id = entry.spec.id.clone();
        entry.thread =
            Some(start_vm(&id, vm, self.on_own_stop(&id, tenant)).inspect_err(|_| release())?);
        let info = entry.info();
        self.tenants().insert(id.clone(), entry);
        self.emit(
            "vm_restored",
            &id,
            serde_json::json!({"from": url, "adopted_verdicts": adopted.len()}),
        );
        Ok(info)
    }
}
