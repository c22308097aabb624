//! The switch tier: the fw-guest micro-VM in the switch role, with one link per tenant port and
//! the host's uplink.
//!
//! Owns: booting the switch micro-VM, its verdict ring, its ports and who holds each. Must not:
//! decide which tenant gets a port (that is `lifecycle`) or what records it takes (`tiers`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vigil_wire::boot::{Role, TENANT_UNASSIGNED};
use vmm_core::host_kind::HostKind;
use vmm_core::net_config::NetConfig;
use vmm_core::verdict_region::{wait_ready, FirewallCounters, VerdictRegion, READY_LIMIT};
use vmm_core::vm::{ConsoleConfig, LinkConfig, Vm, VmConfig, VmError, VmOutcome};

use crate::{Host, HostConfig, StartError};

pub(crate) struct SwitchTier {
    pub(crate) region: Arc<VerdictRegion>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) thread: Mutex<Option<JoinHandle<Result<VmOutcome, VmError>>>>,
    /// The tenant end of each port's link, and who holds the port.
    pub(crate) ports: Mutex<Vec<(LinkConfig, Option<String>)>>,
}

impl SwitchTier {
    /// Boots the switch micro-VM with `config.tenant_ports` ports and waits until it applies
    /// records.
    pub(crate) fn start(config: &HostConfig, kind: HostKind) -> Result<SwitchTier, StartError> {
        let mut ports = Vec::new();
        let mut switch_ends = Vec::new();
        for slot in 0..config.tenant_ports {
            // Locally administered MACs for the switch side of each port (never seen on the wire:
            // the switch forwards frames, it does not originate them).
            let mac = [0x02, 0x56, 0x47, 0, 0, slot as u8 + 1];
            let (tenant_end, switch_end) =
                LinkConfig::pair(TENANT_UNASSIGNED, mac).map_err(StartError::SwitchLinks)?;
            ports.push((tenant_end, None));
            switch_ends.push(switch_end);
        }
        let switch_config = VmConfig::micro_vm(
            format!("{}-switch", config.name),
            &config.switch_elf,
            Role::Switch,
        )
        .with_console(ConsoleConfig {
            log: Some(config.state_dir.join("switch.console")),
            stdout: false,
            markers: Vec::new(),
        })
        .with_nets(vec![NetConfig {
            tenant: 0,
            ..config.uplink.clone()
        }])
        .with_links(switch_ends)
        .with_debug(config.debug.clone());
        let switch_vm = Vm::create(&switch_config, kind).map_err(StartError::SwitchVm)?;
        let region = switch_vm
            .verdict_region()
            .ok_or(StartError::NoVerdictRegion)?;
        let stop = switch_vm.stop_handle();
        let thread = std::thread::Builder::new()
            .name("switch".into())
            .spawn(move || switch_vm.run(None))
            .map_err(StartError::SwitchThread)?;
        // Serve only once the switch applies records at once (it formats its counters block
        // when its tables and ports are up).
        if !wait_ready(&region, &thread) {
            stop.store(true, Ordering::Release);
            let _ = thread.join();
            return Err(StartError::SwitchNotReady {
                secs: READY_LIMIT.as_secs(),
                console: config.state_dir.join("switch.console"),
            });
        }
        Ok(SwitchTier {
            region,
            stop,
            thread: Mutex::new(Some(thread)),
            ports: Mutex::new(ports),
        })
    }

    /// Marks switch port `slot` free.
    pub(crate) fn release(&self, slot: usize) {
        self.ports.lock().unwrap_or_else(|p| p.into_inner())[slot].1 = None;
    }
}

impl Host {
    /// The switch micro-VM's counters.
    pub fn switch_counters(&self) -> Option<FirewallCounters> {
        self.switch.region.counters()
    }

    /// Whether the switch micro-VM still runs.
    pub fn switch_running(&self) -> bool {
        self.switch
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }
}
