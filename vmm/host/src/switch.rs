//! The switch tier: the fw-guest micro-VM in the switch role, with one link per tenant port and
//! the host's uplink, and the host's authoritative copy of what it holds.
//!
//! Every record that reaches the switch's ring goes through [`SwitchTier::deliver`] (a tenant's
//! verdicts) or [`SwitchTier::apply`] (the host's control records), and is written into the
//! [`Book`](crate::supervisor::Book) in the same step, so a new switch micro-VM can be given
//! everything the old one held (see `supervisor`). While no switch runs (the tier is *closed*),
//! nothing is pushed: a tenant's verdicts are refused (the call is denied) and control records
//! wait for the restarted switch.
//!
//! Owns: booting the switch micro-VM, its verdict ring, its ports and who holds each, the book,
//! the open/closed state. Must not: decide which tenant gets a port (that is `lifecycle`), what
//! records it takes (`tiers`) or when it restarts (`supervisor`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vigil_wire::boot::{Role, TENANT_UNASSIGNED};
use vigil_wire::ring::VERDICT_RING_CAPACITY;
use vigil_wire::verdict::RECORD_LEN;
use vmm_core::config::NetBackend;
use vmm_core::devices::vxlan::PeerTrust;
use vmm_core::host_kind::HostKind;
use vmm_core::introspect::Delivery;
use vmm_core::net_config::NetConfig;
use vmm_core::verdict_region::{
    wait_ready, Delivered, FirewallCounters, VerdictRegion, MAX_DELIVERY, READY_LIMIT,
};
use vmm_core::vm::{ConsoleConfig, LinkConfig, Vm, VmConfig, VmError, VmHandle, VmOutcome};

use crate::supervisor::Book;
use crate::{Host, HostConfig, HostError, StartError};

/// The switch micro-VM's name in the host's state directory (its console log); no tenant may
/// take it as its id.
pub(crate) const SWITCH_NAME: &str = "switch";

pub(crate) type SwitchThread = JoinHandle<Result<VmOutcome, VmError>>;

/// How long a reconfiguration waits for the switch micro-VM to take its records (and, while it
/// restarts, for it to be back).
pub(crate) const SWITCH_APPLY_LIMIT: Duration = Duration::from_secs(2);

/// The running switch micro-VM, if one runs and holds everything the book says.
pub(crate) struct Live {
    pub(crate) region: Option<Arc<VerdictRegion>>,
    pub(crate) stop: Arc<AtomicBool>,
    /// The running switch's RAM and run control (fault injection).
    pub(crate) handle: Option<VmHandle>,
    /// Counts the switch micro-VMs started (1 for the first).
    pub(crate) generation: u64,
    /// The host shuts down: no restart.
    pub(crate) shutting_down: bool,
}

/// A switch micro-VM that is up: its thread, ring and stop flag.
pub(crate) struct Booted {
    pub(crate) thread: SwitchThread,
    pub(crate) region: Arc<VerdictRegion>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) handle: VmHandle,
    pub(crate) boot_ms: f64,
}

pub(crate) struct SwitchTier {
    pub(crate) host_name: String,
    /// A new switch micro-VM's configuration (the same links and uplink each time).
    vm_config: VmConfig,
    kind: HostKind,
    pub(crate) console: std::path::PathBuf,
    pub(crate) live: Mutex<Live>,
    /// Signalled whenever `live` changes (open, closed, shutting down).
    pub(crate) live_changed: Condvar,
    pub(crate) book: Mutex<Book>,
    /// The tenant end of each port's link, and who holds the port.
    pub(crate) ports: Mutex<Vec<(LinkConfig, Option<String>)>>,
    pub(crate) supervisor: Mutex<Option<JoinHandle<()>>>,
    /// Restarts completed, and the last one's stop-to-restored time (µs).
    pub(crate) restarts: AtomicU64,
    pub(crate) last_restart_us: AtomicU64,
    /// Calls whose verdicts the switch refused or did not confirm (the calls were denied).
    pub(crate) refused: AtomicU64,
    /// Who a VXLAN uplink hears: its configured peer (the edge) only; the set counts the
    /// datagrams refused from anyone else (shared by every switch micro-VM the host starts).
    pub(crate) uplink_trust: Option<Arc<PeerTrust>>,
}

impl SwitchTier {
    /// Boots the switch micro-VM with `config.tenant_ports` ports and waits until it applies
    /// records; its supervisor restarts it from then on.
    pub(crate) fn start(
        config: &HostConfig,
        kind: HostKind,
    ) -> Result<Arc<SwitchTier>, StartError> {
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
        let console = config.state_dir.join(format!("{SWITCH_NAME}.console"));
        // A VXLAN uplink takes frames only from its peer, the edge: an empty trust set adds no
        // one and counts what it refuses.
        let mut uplink = config.uplink.clone();
        let mut uplink_trust = None;
        if let NetBackend::Vxlan {
            trust,
            peer: Some(_),
            ..
        } = &mut uplink.backend
        {
            let set = trust.0.get_or_insert_with(PeerTrust::new).clone();
            uplink_trust = Some(set);
        }
        let vm_config = VmConfig::micro_vm(
            format!("{}-switch", config.name),
            &config.switch_elf,
            Role::Switch,
        )
        .with_console(ConsoleConfig {
            log: Some(console.clone()),
            stdout: false,
            markers: Vec::new(),
        })
        .with_nets(vec![NetConfig {
            tenant: 0,
            ..uplink
        }])
        .with_links(switch_ends)
        .with_debug(config.debug.clone());
        let mut tier = SwitchTier {
            host_name: config.name.clone(),
            vm_config,
            kind,
            console,
            live: Mutex::new(Live {
                region: None,
                stop: Arc::new(AtomicBool::new(false)),
                handle: None,
                generation: 0,
                shutting_down: false,
            }),
            live_changed: Condvar::new(),
            book: Mutex::new(Book::default()),
            ports: Mutex::new(ports),
            supervisor: Mutex::new(None),
            restarts: AtomicU64::new(0),
            last_restart_us: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            uplink_trust,
        };
        let booted = tier.boot()?;
        {
            let live = tier.live.get_mut().unwrap_or_else(|p| p.into_inner());
            live.region = Some(booted.region);
            live.stop = booted.stop;
            live.handle = Some(booted.handle);
            live.generation = 1;
        }
        let tier = Arc::new(tier);
        let supervised = tier.clone();
        let supervisor = std::thread::Builder::new()
            .name("switch-supervisor".into())
            .spawn(move || crate::supervisor::supervise(supervised, booted.thread))
            .map_err(StartError::SwitchThread)?;
        *tier.supervisor.lock().unwrap_or_else(|p| p.into_inner()) = Some(supervisor);
        Ok(tier)
    }

    /// Boots a switch micro-VM and waits until it applies records (its ring is empty: it
    /// holds no port, address or verdict yet, so it forwards nothing from a tenant port).
    pub(crate) fn boot(&self) -> Result<Booted, StartError> {
        let started = Instant::now();
        let switch_vm = Vm::create(&self.vm_config, self.kind).map_err(StartError::SwitchVm)?;
        let region = switch_vm
            .verdict_region()
            .ok_or(StartError::NoVerdictRegion)?;
        let stop = switch_vm.stop_handle();
        let handle = switch_vm.handle();
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
                console: self.console.clone(),
            });
        }
        Ok(Booted {
            thread,
            region,
            stop,
            handle,
            boot_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    pub(crate) fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A tenant's verdicts (from its introspection, one call's): into the ring, and once the
    /// switch says it applied every one of them (its outcome log), into the book. A record it
    /// refused (the tenant's verdict quota, a full table) or did not confirm within
    /// `OUTCOME_WAIT` refuses the call, and what the switch did apply of it is taken back
    /// (`Remove` records behind it), so the call is denied with nothing of it open. Refused
    /// while the switch is closed (restarting).
    pub(crate) fn deliver(&self, records: &[[u8; RECORD_LEN]]) -> Delivery {
        let live = self.live();
        let Some(region) = &live.region else {
            return Delivery::Refused("switch_restarting");
        };
        let (reason, revoke) = match region.deliver(records) {
            Delivered::Applied(_) | Delivered::Certain => {
                self.book().apply(records);
                return Delivery::Taken;
            }
            Delivered::Full => return Delivery::Busy("ring_full"),
            Delivered::Refused { reason, added } => (reason, added),
            Delivered::Unconfirmed(reason) => (reason, [true; MAX_DELIVERY]),
        };
        self.refused.fetch_add(1, Ordering::Relaxed);
        if !region.revoke(records, &revoke) {
            // The ring is full: the records taken back stay until the next flush of the tenant.
            log::error!(
                "host {}: a refused call's verdicts could not be taken back (ring full)",
                self.host_name
            );
        }
        Delivery::Refused(reason)
    }

    /// Takes back a call's verdicts that another tier refused: `Remove` records for its
    /// `Add`/`Adopt`s into the ring (behind them) and the book. Does not wait.
    pub(crate) fn withdraw(&self, records: &[[u8; RECORD_LEN]]) {
        let live = self.live();
        if let Some(region) = &live.region {
            for chunk in records.chunks(MAX_DELIVERY) {
                if !region.revoke(chunk, &[true; MAX_DELIVERY][..chunk.len()]) {
                    log::error!(
                        "host {}: verdicts another tier refused could not be taken back at the \
                         switch (ring full); they stay until the tenant's next flush",
                        self.host_name
                    );
                }
            }
        }
        self.book().apply(&crate::tiers::removes(records));
    }

    /// The host's control records: into the ring and the book (waiting up to
    /// `SWITCH_APPLY_LIMIT` for a restarting switch), then waits until the switch took them.
    pub(crate) fn apply(&self, records: &[[u8; RECORD_LEN]]) -> Result<(), HostError> {
        let deadline = Instant::now() + SWITCH_APPLY_LIMIT;
        let timeout = || HostError::SwitchTimeout {
            secs: SWITCH_APPLY_LIMIT.as_secs(),
            console: self.console.clone(),
        };
        let (region, position, generation) = {
            let mut live = self.live();
            while live.region.is_none() {
                if live.shutting_down {
                    return Err(HostError::ShuttingDown);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timeout());
                }
                live = self
                    .live_changed
                    .wait_timeout(live, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let region = live.region.clone().ok_or_else(timeout)?;
            let position = region
                .push_tracked(records)
                .map_err(|e| HostError::SwitchRefused(format!("{e:?}")))?;
            self.book().apply(records);
            (region, position, live.generation)
        };
        if region.wait_consumed(position, SWITCH_APPLY_LIMIT) {
            return Ok(());
        }
        // The switch stopped before it took them: a restarted one took them from the book.
        let live = self.live();
        if live.generation != generation && live.region.is_some() {
            return Ok(());
        }
        Err(timeout())
    }

    /// Forgets a tenant whose attachment failed half way (no VM of it runs here): out of the
    /// book, and flushed from the switch if it runs.
    pub(crate) fn forget(&self, flush: [u8; RECORD_LEN], tenant: u32) {
        let live = self.live();
        if let Some(region) = &live.region {
            let _ = region.push(&[flush]);
        }
        self.book().remove(tenant);
    }

    /// Pushes `records` into a switch that is not open yet, in batches the ring holds, each
    /// taken before the next.
    pub(crate) fn replay(region: &VerdictRegion, records: &[[u8; RECORD_LEN]]) -> bool {
        records
            .chunks(VERDICT_RING_CAPACITY as usize / 2)
            .all(|batch| match region.push_tracked(batch) {
                Ok(position) => region.wait_consumed(position, SWITCH_APPLY_LIMIT),
                Err(_) => false,
            })
    }

    /// Marks switch port `slot` free.
    pub(crate) fn release(&self, slot: usize) {
        self.ports.lock().unwrap_or_else(|p| p.into_inner())[slot].1 = None;
    }

    /// Stops the switch micro-VM and its supervisor (no restart).
    pub(crate) fn shutdown(&self) {
        {
            let mut live = self.live();
            live.shutting_down = true;
            live.stop.store(true, Ordering::Release);
            self.live_changed.notify_all();
        }
        let supervisor = self
            .supervisor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(supervisor) = supervisor {
            let _ = supervisor.join();
        }
    }
}

/// What the host says about its switch tier (`vmm.ping`, metrics, tests).
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwitchStatus {
    /// A switch micro-VM runs and holds everything the host gave the tier.
    pub open: bool,
    /// Switch micro-VMs started so far (1 before any restart).
    pub generation: u64,
    pub restarts: u64,
    /// The last restart: from the stop to forwarding again with everything restored.
    pub last_restart_ms: Option<f64>,
    /// Records the host would give a new switch: attachments and verdicts.
    pub attachments: usize,
    pub verdicts: usize,
    /// Tenant ports held by a VM (of `ports`).
    pub ports_held: usize,
    pub ports: usize,
    /// Calls denied because the switch refused their verdicts (or did not confirm them).
    pub refused_calls: u64,
}

impl Host {
    /// The switch micro-VM's counters (none while it restarts).
    pub fn switch_counters(&self) -> Option<FirewallCounters> {
        self.switch.live().region.as_ref()?.counters()
    }

    /// Whether a switch micro-VM runs and holds everything it should (ports open).
    pub fn switch_running(&self) -> bool {
        self.switch.live().region.is_some()
    }

    pub fn switch_status(&self) -> SwitchStatus {
        let (open, generation) = {
            let live = self.switch.live();
            (live.region.is_some(), live.generation)
        };
        let restarts = self.switch.restarts.load(Ordering::Relaxed);
        let (attachments, verdicts) = self.switch.book().size();
        let (ports_held, ports) = {
            let ports = self.switch.ports.lock().unwrap_or_else(|p| p.into_inner());
            (
                ports.iter().filter(|(_, o)| o.is_some()).count(),
                ports.len(),
            )
        };
        SwitchStatus {
            open,
            generation,
            restarts,
            last_restart_ms: (restarts > 0)
                .then(|| self.switch.last_restart_us.load(Ordering::Relaxed) as f64 / 1e3),
            attachments,
            verdicts,
            ports_held,
            ports,
            refused_calls: self.switch.refused.load(Ordering::Relaxed),
        }
    }

    /// Fault injection: stops the switch micro-VM's vCPU as a crash would (the host does not
    /// shut down), so its supervisor restarts it. For tests and `scripts/bench`.
    pub fn kill_switch(&self) {
        self.switch.live().stop.store(true, Ordering::Release);
    }

    /// Fault injection: zeroes the running switch micro-VM's RAM below its verdict region (its
    /// code, page tables and descriptor tables), so the guest faults its way to a stop (a triple
    /// fault, or an exit the VMM cannot serve) as a corrupted switch would. Returns whether a
    /// switch was running. For tests.
    #[doc(hidden)]
    pub fn crash_switch(&self) -> bool {
        use vm_memory::{Bytes, GuestAddress};
        let live = self.switch.live();
        let (Some(handle), Some(region)) = (&live.handle, &live.region) else {
            return false;
        };
        let zeros = vec![0u8; 1 << 20];
        let mut gpa = 0;
        while gpa < region.gpa {
            let len = (region.gpa - gpa).min(zeros.len() as u64) as usize;
            let _ = handle
                .memory()
                .write_slice(&zeros[..len], GuestAddress(gpa));
            gpa += len as u64;
        }
        true
    }

    /// The running switch micro-VM's verdict region (none while it restarts). For benchmarks
    /// that time a delivery against the same region's bare push.
    #[doc(hidden)]
    pub fn switch_region_for_test(&self) -> Option<Arc<VerdictRegion>> {
        self.switch.live().region.clone()
    }

    /// The tenant end of switch port `slot` (0-based): what a tenant VM's NIC is plugged into.
    /// For tests and benchmarks that stand in for a tenant's NIC (a generator port).
    #[doc(hidden)]
    pub fn port_link(&self, slot: usize) -> Option<vmm_core::devices::virtio::net::HostPort> {
        let ports = self.switch.ports.lock().unwrap_or_else(|p| p.into_inner());
        match ports.get(slot).map(|(link, _)| &link.link) {
            Some(vmm_core::config::LinkEnd::Memory(end)) => Some(end.clone().into_host_port()),
            _ => None,
        }
    }
}
