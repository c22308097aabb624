//! A tenant's life on the host through the API: create (check the spec, reserve a port, build
//! the VM, attach it on both tiers), boot, pause, resume, info, list, delete, and policy
//! replacement.
//!
//! - Create: the tenant's policy is compiled and its hooks are ready before its first
//!   instruction (they are programmed when its vCPUs start); it gets a free switch port, and an
//!   `Attach` record (port, address) goes to the switch ring and, signed, to the edge.
//! - Delete: the VM stops, then a `FlushTenant` record removes every verdict, conntrack entry,
//!   port and address of the tenant on both tiers; the port is free again.
//! - A VM that stops on its own (the guest powered off or reset, a vCPU or device thread
//!   crashed): the same `FlushTenant` goes to both tiers at once, from the VM's own thread, so
//!   its port forwards nothing more and nothing it opened stays open (fail closed); the port
//!   stays the tenant's until `vm.delete`. A `vm_stopped` event says so (`flushed`).
//! - Policy replace: later calls follow the new policy; the tenant is flushed and re-attached, so
//!   nothing the old policy opened stays open.
//!
//! Owns: the tenant table's entries and the switch ports they hold. Must not: let one tenant's
//! failure (bad config, a crashed guest) take down the host or another tenant.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use trap_handler::policy::{Policy, PolicySpec};
use vmm_core::config::TierSink;
use vmm_core::introspect::{tenant_id, Introspection};
use vmm_core::net_config::parse_mac;
use vmm_core::run_control::RunControl;
use vmm_core::vm::{ConsoleConfig, LinkConfig, Payload, Vm, VmConfig, VmError, VmOutcome};

use crate::claims::{Claim, ClaimGuard};
use crate::config::{valid_id, MAX_ID_LEN};
use crate::tenant::{start_vm, OnOwnStop, Tenant, PAUSE_LIMIT};
use crate::tiers::TenantTiers;
use crate::{Host, HostError, VmInfo, VmSpec, VmState};

/// A VM built for a spec on a reserved port, not yet in the tenant table.
pub(crate) struct Prepared<'a> {
    pub(crate) vm: Vm,
    pub(crate) introspection: Option<Arc<Introspection>>,
    pub(crate) tenant: u32,
    pub(crate) slot: usize,
    pub(crate) mac: [u8; 6],
    /// Held until the tenant is in the table, or its build failed.
    pub(crate) claim: ClaimGuard<'a>,
}

impl Host {
    /// `vm.create`: builds the VM (not booted), plugs it into a switch port, opens nothing yet.
    pub fn create(&self, spec: VmSpec) -> Result<VmInfo, HostError> {
        let started = Instant::now();
        let Prepared {
            vm,
            introspection,
            tenant,
            slot,
            mac,
            claim: _claim,
        } = self.prepare(&spec)?;
        let release_port = || {
            self.switch.release(slot);
        };
        // The tiers learn the tenant's port and address before it can send anything.
        let applied = match self.reconfigure(
            &[self.switch_attach(tenant, slot, spec.ip, Some(mac))],
            &[self.edge_attach(tenant, spec.ip)],
        ) {
            Ok(ms) => ms,
            Err(e) => {
                // The switch may hold (or a restarted one be given) the Attach: take it back.
                self.switch.forget(self.flush_record(tenant), tenant);
                release_port();
                return Err(e);
            }
        };
        let mut entry = Tenant::new(spec, tenant, slot, &vm, introspection, VmState::Created);
        entry.vm = Some(vm);
        let info = entry.info();
        let mut tenants = self.tenants();
        tenants.insert(entry.spec.id.clone(), entry);
        drop(tenants);
        let total = started.elapsed().as_secs_f64() * 1e3;
        self.reconfigured(
            |t| &mut t.create_ms,
            &info.id,
            applied,
            serde_json::json!({"action": "create", "tenant": tenant, "switch_port": slot + 1,
                "ip": info.ip, "total_ms": total}),
        );
        Ok(info)
    }

    pub(crate) fn build(
        &self,
        spec: &VmSpec,
        mac: [u8; 6],
        tenant: u32,
        slot: usize,
    ) -> Result<(Vm, Option<Arc<Introspection>>), HostError> {
        let link = {
            let ports = self.switch.ports.lock().unwrap_or_else(|p| p.into_inner());
            LinkConfig {
                tenant,
                mac,
                ..ports[slot].0.clone()
            }
        };
        // The port's link is by memory: nothing waits in it between tenants (frames the switch
        // sent toward a departed tenant were completed as link errors when its device stopped).
        let config = VmConfig {
            name: spec.id.clone(),
            mem_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            payload: Payload::Linux {
                kernel: spec.kernel.clone(),
                initramfs: spec.initramfs.clone(),
                cmdline: spec.cmdline.clone(),
            },
            console: ConsoleConfig {
                log: Some(self.config.state_dir.join(format!("{}.console", spec.id))),
                stdout: self.config.console_stdout,
                markers: Vec::new(),
            },
            nets: Vec::new(),
            policy: Some(spec.policy.clone()),
            verdict_sink: Some(TierSink(Arc::new(TenantTiers {
                switch: self.switch.clone(),
                edge: self.edge.clone(),
            }))),
            links: vec![link],
            debug: self.config.debug.clone(),
        };
        let vm = Vm::create(&config, self.kind).map_err(|e| match e {
            VmError::ReadFile { .. } | VmError::KernelImage { .. } | VmError::BadMemorySize(_) => {
                HostError::InvalidImage(e)
            }
            // No vCPUs, too many NICs: the caller's spec, answered as such (400), not as a host
            // failure.
            VmError::Config(config) => HostError::InvalidSpec(config.to_string()),
            other => HostError::Vm(other),
        })?;
        let introspection = vm.introspection();
        Ok((vm, introspection))
    }

    /// `vm.boot`: starts a created VM's vCPUs.
    pub fn boot(&self, id: &str) -> Result<VmInfo, HostError> {
        let mut tenants = self.tenants();
        let t = tenants
            .get_mut(id)
            .ok_or_else(|| HostError::not_found(id))?;
        t.refresh();
        let Some(vm) = t.vm.take() else {
            return Err(HostError::WrongState {
                id: id.into(),
                state: t.state,
                allowed: "only a created VM boots".into(),
            });
        };
        t.thread = Some(start_vm(id, vm, self.on_own_stop(id, t.tenant))?);
        t.state = VmState::Running;
        let info = t.info();
        drop(tenants);
        self.emit("vm_booted", id, serde_json::json!({}));
        Ok(info)
    }

    pub fn info(&self, id: &str) -> Result<VmInfo, HostError> {
        let mut tenants = self.tenants();
        let t = tenants
            .get_mut(id)
            .ok_or_else(|| HostError::not_found(id))?;
        t.refresh();
        Ok(t.info())
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let mut tenants = self.tenants();
        tenants
            .values_mut()
            .map(|t| {
                t.refresh();
                t.info()
            })
            .collect()
    }

    pub fn pause(&self, id: &str) -> Result<VmInfo, HostError> {
        self.transition(
            id,
            VmState::Running,
            "pauses",
            VmState::Paused,
            "vm_paused",
            |t| {
                t.control
                    .pause(PAUSE_LIMIT)
                    .map_err(|e| HostError::internal("pause", e))
            },
        )
    }

    /// Resumes a paused VM. The first resume of a restored one announces it, from a thread of
    /// its own (it may wait for the edge): the snapshot may come from another host, where the
    /// network last saw the tenant.
    pub fn resume(self: &Arc<Self>, id: &str) -> Result<VmInfo, HostError> {
        let mut announce = None;
        let info = self.transition(
            id,
            VmState::Paused,
            "resumes",
            VmState::Running,
            "vm_resumed",
            |t| {
                t.control.resume();
                announce = t
                    .announce_on_resume
                    .take()
                    .map(|claim| (t.slot, t.tenant, claim));
                Ok(())
            },
        )?;
        let mac = parse_mac(&info.mac);
        if let (Some((slot, tenant, claim)), Some(mac)) = (announce, mac) {
            let (host, vm, ip) = (self.clone(), id.to_string(), info.ip);
            let spawned = std::thread::Builder::new()
                .name("announce".into())
                .spawn(move || host.announce(&vm, slot, mac, tenant, ip, claim));
            if let Err(e) = spawned {
                log::warn!("{id}: cannot start the announcement: {e}");
            }
        }
        Ok(info)
    }

    /// Moves VM `id` from state `from` to `to` by `action`: 404 for an unknown VM, 409 in any
    /// other state; an event `event` on success.
    pub(crate) fn transition(
        &self,
        id: &str,
        from: VmState,
        verb: &str,
        to: VmState,
        event: &str,
        action: impl FnOnce(&mut Tenant) -> Result<(), HostError>,
    ) -> Result<VmInfo, HostError> {
        let mut tenants = self.tenants();
        let t = tenants
            .get_mut(id)
            .ok_or_else(|| HostError::not_found(id))?;
        t.refresh();
        t.not_migrating(verb)?;
        if t.state != from {
            return Err(HostError::WrongState {
                id: id.into(),
                state: t.state,
                allowed: format!("only a {} VM {verb}", format!("{from:?}").to_lowercase()),
            });
        }
        action(t)?;
        t.state = to;
        let info = t.info();
        drop(tenants);
        self.emit(event, id, serde_json::json!({}));
        Ok(info)
    }

    /// `vm.delete`: stops the VM (whatever its state) and removes every trace of it from both
    /// tiers.
    pub fn delete(&self, id: &str) -> Result<(), HostError> {
        let started = Instant::now();
        // Its id, number and addresses stay claimed until its stop and flush are done: a new
        // tenant attached under its number before this flush would be flushed by it.
        let (t, _claim) = {
            let mut tenants = self.tenants();
            tenants
                .get(id)
                .ok_or_else(|| HostError::not_found(id))?
                .not_migrating("is deleted")?;
            let t = tenants.remove(id).ok_or_else(|| HostError::not_found(id))?;
            let mut claims = self.claims.lock();
            let claim = self.claims.take(&mut claims, Claim::of(&t.spec));
            (t, claim)
        };
        self.stop_tenant(t.stop.clone(), &t.control, t.thread);
        self.stopped_on_own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&t.tenant);
        let flush = self.flush_record(t.tenant);
        let applied = self.reconfigure(&[flush], &[flush]);
        if applied.is_err() {
            // The VM is gone: no restarted switch may be given its port or verdicts.
            self.switch.forget(flush, t.tenant);
        }
        self.switch.release(t.slot);
        let applied = applied?;
        self.reconfigured(
            |t| &mut t.delete_ms,
            id,
            applied,
            serde_json::json!({"action": "delete", "tenant": t.tenant,
                "total_ms": started.elapsed().as_secs_f64() * 1e3}),
        );
        Ok(())
    }

    pub(crate) fn stop_tenant(
        &self,
        stop: Arc<AtomicBool>,
        control: &RunControl,
        thread: Option<JoinHandle<Result<VmOutcome, VmError>>>,
    ) {
        stop.store(true, Ordering::Release);
        control.resume();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// What tenant `id`'s VM thread runs if the VM stops on its own: see
    /// [`Host::vm_stopped_on_its_own`].
    pub(crate) fn on_own_stop(&self, id: &str, tenant: u32) -> OnOwnStop {
        let (host, id) = (self.me.clone(), id.to_string());
        Box::new(move |reason, crashed| match host.upgrade() {
            Some(host) => host.vm_stopped_on_its_own(&id, tenant, &reason, crashed),
            None => vmm_core::events::bus().emit(
                "vm_stopped",
                &serde_json::json!({"vm": id, "reason": reason, "crashed": crashed}),
            ),
        })
    }

    /// A tenant VM stopped without being asked (powered off, reset, crashed): nothing of it may
    /// stay open. Its switch port, verdicts and flows are flushed from both tiers now (the port
    /// stays reserved to it until `vm.delete`), and a `vm_stopped` event says how it stopped
    /// and whether the flush was applied. Runs on the VM's thread (no tenant-table lock).
    pub(crate) fn vm_stopped_on_its_own(&self, id: &str, tenant: u32, reason: &str, crashed: bool) {
        self.stopped_on_own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant);
        let flush = self.flush_record(tenant);
        let applied = self.reconfigure(&[flush], &[flush]);
        if applied.is_err() {
            // The switch is restarting or gone: no new one may be given this tenant again.
            self.switch.forget(flush, tenant);
        }
        let mut event = serde_json::json!({"reason": reason, "crashed": crashed,
            "flushed": applied.is_ok()});
        match &applied {
            Ok(ms) => event["tiers_ms"] = (*ms).into(),
            Err(e) => event["flush_error"] = e.to_string().into(),
        }
        if let Err(e) = &applied {
            log::warn!(
                "host {}: VM {id} stopped ({reason}); flushing it: {e}",
                self.name()
            );
        }
        self.emit("vm_stopped", id, event);
    }

    /// The spec tenant `id` runs with (its policy the one in force).
    pub fn spec(&self, id: &str) -> Result<VmSpec, HostError> {
        let tenants = self.tenants();
        let t = tenants.get(id).ok_or_else(|| HostError::not_found(id))?;
        let mut spec = t.spec.clone();
        if let Some(i) = &t.introspection {
            spec.policy = i.policy_spec();
        }
        Ok(spec)
    }

    pub fn policy(&self, id: &str) -> Result<PolicySpec, HostError> {
        let tenants = self.tenants();
        let t = tenants.get(id).ok_or_else(|| HostError::not_found(id))?;
        Ok(t.introspection
            .as_ref()
            .map_or_else(|| t.spec.policy.clone(), |i| i.policy_spec()))
    }

    /// Replaces a tenant's policy: later calls follow it, and whatever the old one opened is
    /// closed on both tiers (flush, then re-attach).
    pub fn replace_policy(&self, id: &str, spec: PolicySpec) -> Result<(), HostError> {
        Policy::compile(&spec).map_err(|e| HostError::InvalidPolicy(e.to_string()))?;
        let (tenant, slot, ip, mac, stopped) = {
            let mut tenants = self.tenants();
            let t = tenants
                .get_mut(id)
                .ok_or_else(|| HostError::not_found(id))?;
            t.refresh();
            t.not_migrating("takes a new policy")?;
            if let Some(i) = &t.introspection {
                i.replace_policy(spec.clone())
                    .map_err(|e| HostError::InvalidPolicy(e.to_string()))?;
            }
            t.spec.policy = spec;
            let stopped = t.state == VmState::Shutdown;
            (t.tenant, t.slot, t.spec.ip, parse_mac(&t.spec.mac), stopped)
        };
        let flush = self.flush_record(tenant);
        // A VM that stopped was flushed then; its port stays closed (no VM behind it).
        let applied = if stopped {
            self.reconfigure(&[flush], &[flush])?
        } else {
            self.reconfigure(
                &[flush, self.switch_attach(tenant, slot, ip, mac)],
                &[flush, self.edge_attach(tenant, ip)],
            )?
        };
        if !stopped && self.stopped_on_own(tenant) {
            // The VM stopped after the look above, and its stop's flush may have come before
            // this attach (it marks the tenant first): flush again, so a stopped VM keeps
            // nothing attached in either tier.
            self.reconfigure(&[flush], &[flush])?;
        }
        self.reconfigured(
            |t| &mut t.policy_ms,
            id,
            applied,
            serde_json::json!({"action": "policy", "tenant": tenant}),
        );
        Ok(())
    }

    fn stopped_on_own(&self, tenant: u32) -> bool {
        self.stopped_on_own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&tenant)
    }

    /// Checks a spec and builds its VM on a reserved port (create's first half). Its id, number
    /// and addresses stay claimed until the caller put it in the table (or gave up) and
    /// dropped `claim`.
    pub(crate) fn prepare(&self, spec: &VmSpec) -> Result<Prepared<'_>, HostError> {
        if !valid_id(&spec.id) {
            return Err(HostError::InvalidSpec(format!(
                "id {:?}: use 1 to {MAX_ID_LEN} letters, digits, '-', '_' or '.'",
                spec.id
            )));
        }
        if spec.id == crate::switch::SWITCH_NAME {
            // Its console log would be the switch micro-VM's (`state_dir/switch.console`).
            return Err(HostError::InvalidSpec(format!(
                "id {:?} is the host's own (its switch micro-VM); choose another",
                spec.id
            )));
        }
        let mac = parse_mac(&spec.mac).ok_or_else(|| {
            HostError::InvalidSpec(format!(
                "mac {:?} is not a unicast MAC address like 52:54:00:12:34:56",
                spec.mac
            ))
        })?;
        if spec.vcpus == 0 || spec.vcpus > 8 {
            return Err(HostError::InvalidSpec("vcpus: 1 to 8".into()));
        }
        // The host's own options, appended after it, must take effect (no open quote, no `--`).
        vmm_core::config::check_cmdline(&spec.cmdline)
            .map_err(|e| HostError::InvalidSpec(e.to_string()))?;
        if spec.ip.is_unspecified() || spec.ip.is_multicast() {
            return Err(HostError::InvalidSpec(format!(
                "ip {}: a tenant needs a unicast address",
                spec.ip
            )));
        }
        Policy::compile(&spec.policy).map_err(|e| HostError::InvalidPolicy(e.to_string()))?;
        if self.shutdown.load(Ordering::Acquire) {
            return Err(HostError::ShuttingDown);
        }
        // Reserve the id and a port before the (slow) build, so concurrent creates conflict
        // cleanly.
        let tenant = tenant_id(&spec.id);
        let (slot, claim) = {
            let tenants = self.tenants();
            // A tenant being built or deleted is not in the table: its claim stands for it.
            let mut claims = self.claims.lock();
            if let Some(taken) = claims.iter().find_map(|c| c.conflict(spec)) {
                return Err(taken);
            }
            if tenants.contains_key(&spec.id) {
                return Err(HostError::IdTaken {
                    id: spec.id.clone(),
                });
            }
            if let Some(other) = tenants.values().find(|t| tenant_id(&t.spec.id) == tenant) {
                return Err(HostError::TenantNumberTaken {
                    other: other.spec.id.clone(),
                    tenant,
                });
            }
            if let Some(other) = tenants
                .values()
                .find(|t| t.spec.ip == spec.ip || parse_mac(&t.spec.mac) == Some(mac))
            {
                return Err(HostError::AddressTaken {
                    other: other.spec.id.clone(),
                    ip: other.spec.ip,
                    mac: other.spec.mac.clone(),
                });
            }
            let mut ports = self.switch.ports.lock().unwrap_or_else(|p| p.into_inner());
            let slot = ports
                .iter()
                .position(|(_, owner)| owner.is_none())
                .ok_or(HostError::NoFreePort { ports: ports.len() })?;
            ports[slot].1 = Some(spec.id.clone());
            (slot, self.claims.take(&mut claims, Claim::of(spec)))
        };
        match self.build(spec, mac, tenant, slot) {
            Ok((vm, introspection)) => Ok(Prepared {
                vm,
                introspection,
                tenant,
                slot,
                mac,
                claim,
            }),
            Err(e) => {
                self.switch.release(slot);
                Err(e)
            }
        }
    }
}
