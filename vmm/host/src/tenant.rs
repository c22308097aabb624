//! One tenant VM on the host: its entry in the tenant table, its state and what `vm.info`
//! reports.
//!
//! Owns: [`Tenant`], [`VmState`], [`VmInfo`] and the VM thread of a tenant. Must not: touch the
//! tiers or the table of other tenants (the host does, in `lifecycle`).

use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use vmm_core::devices::virtio::net::{NetCounters, NetStats};
use vmm_core::introspect::Introspection;
use vmm_core::run_control::RunControl;
use vmm_core::vcpu::StopReason;
use vmm_core::vm::{Vm, VmError, VmHandle, VmOutcome};

use crate::{HostError, VmSpec};

/// How long a pause waits for the vCPUs to park.
pub(crate) const PAUSE_LIMIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Built, not booted.
    Created,
    Running,
    Paused,
    /// The guest stopped (powered off, crashed); `vm.info` says how.
    Shutdown,
}

/// What `vm.info` reports.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    pub id: String,
    pub state: VmState,
    pub tenant: u32,
    pub switch_port: usize,
    pub ip: IpAddr,
    pub mac: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub created_unix_ms: u64,
    /// How the guest stopped (state `shutdown`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Its network device's counters on this host (they start at zero where it migrated in):
    /// frames each way, drops by cause, ring errors, interrupts.
    pub net: Vec<NetStats>,
}

pub(crate) struct Tenant {
    pub(crate) spec: VmSpec,
    pub(crate) tenant: u32,
    /// Index into the switch's tenant ports.
    pub(crate) slot: usize,
    pub(crate) state: VmState,
    /// Built and waiting for `vm.boot`.
    pub(crate) vm: Option<Vm>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) control: Arc<RunControl>,
    pub(crate) handle: VmHandle,
    pub(crate) introspection: Option<Arc<Introspection>>,
    pub(crate) thread: Option<JoinHandle<Result<VmOutcome, VmError>>>,
    pub(crate) stop_reason: Option<String>,
    pub(crate) created_unix_ms: u64,
    /// Its network devices' live counters.
    pub(crate) net: Vec<Arc<NetCounters>>,
    /// Restored from a snapshot and not resumed yet: the first `vm.resume` announces it (see
    /// `Host::announce`), with the edge's acknowledgement of its claim to wait for.
    pub(crate) announce_on_resume: Option<Option<edge::link::Queued>>,
    /// Being sent to another host (`send_migration`): nothing else may act on it meanwhile.
    pub(crate) migrating: bool,
}

/// What a tenant VM's thread runs when the VM stopped on its own (the reason, and whether it
/// crashed): the host's [`Host::vm_stopped_on_its_own`](crate::Host), which closes its port.
pub(crate) type OnOwnStop = Box<dyn FnOnce(String, bool) + Send>;

/// Runs a VM on its own thread. A VM that stops on its own (the guest powered off, or a vCPU
/// or device thread failed: `Crashed`) is handed to `on_own_stop` on that thread, at once; a
/// stop the host asked for is the host's own business.
pub(crate) fn start_vm(
    id: &str,
    vm: Vm,
    on_own_stop: OnOwnStop,
) -> Result<JoinHandle<Result<VmOutcome, VmError>>, HostError> {
    // A snapshot or migration asked for right after this returns waits for the vCPUs to start.
    let control = vm.run_control();
    control.mark_starting();
    std::thread::Builder::new()
        .name(format!("{id}-vm"))
        .spawn(move || {
            let outcome = vm.run(None);
            let (reason, crashed) = match &outcome {
                Ok(o) if o.stop == StopReason::Requested => return outcome,
                Ok(o) => (
                    format!("{:?}", o.stop),
                    matches!(o.stop, StopReason::Crashed(_)),
                ),
                Err(e) => (e.to_string(), true),
            };
            on_own_stop(reason, crashed);
            outcome
        })
        .map_err(|e| {
            control.cancel_start();
            HostError::internal("cannot start the VM thread", e)
        })
}

impl Tenant {
    /// A tenant entry for `vm`, which is kept to boot later (`Created`) or already running on
    /// `thread`.
    pub(crate) fn new(
        spec: VmSpec,
        tenant: u32,
        slot: usize,
        vm: &Vm,
        introspection: Option<Arc<Introspection>>,
        state: VmState,
    ) -> Tenant {
        Tenant {
            tenant,
            slot,
            state,
            stop: vm.stop_handle(),
            control: vm.run_control(),
            handle: vm.handle(),
            net: vm.net_counters(),
            announce_on_resume: None,
            migrating: false,
            introspection,
            vm: None,
            thread: None,
            stop_reason: None,
            created_unix_ms: now_unix_ms(),
            spec,
        }
    }

    /// Refuses an action on a tenant being migrated to another host: a policy replaced here
    /// would be lost there (the target builds it from the spec sent first), a delete would
    /// leave it running there, and a resume would run it here after its last pages were sent.
    pub(crate) fn not_migrating(&self, verb: &str) -> Result<(), HostError> {
        if self.migrating {
            return Err(HostError::WrongState {
                id: self.spec.id.clone(),
                state: self.state,
                allowed: format!("it is migrating to another host: it {verb} once that ended"),
            });
        }
        Ok(())
    }

    /// Notices a guest that stopped on its own.
    pub(crate) fn refresh(&mut self) {
        if matches!(self.state, VmState::Running | VmState::Paused)
            && self.thread.as_ref().is_some_and(|t| t.is_finished())
        {
            let outcome = self.thread.take().map(|t| t.join());
            self.stop_reason = Some(match outcome {
                Some(Ok(Ok(o))) => format!("{:?}", o.stop),
                Some(Ok(Err(e))) => e.to_string(),
                _ => "the VM thread panicked".into(),
            });
            self.state = VmState::Shutdown;
        }
    }

    pub(crate) fn info(&self) -> VmInfo {
        VmInfo {
            id: self.spec.id.clone(),
            state: self.state,
            tenant: self.tenant,
            switch_port: self.slot + 1,
            ip: self.spec.ip,
            mac: self.spec.mac.clone(),
            memory_mib: self.spec.memory_mib,
            vcpus: self.spec.vcpus,
            created_unix_ms: self.created_unix_ms,
            stop_reason: self.stop_reason.clone(),
            net: self.net.iter().map(|c| c.snapshot()).collect(),
        }
    }
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
