//! A VM: guest memory, the in-kernel interrupt controllers, the device bus, vCPU threads, and the
//! boot of its payload (a Linux kernel or the fw-guest micro-VM).
//!
//! Owns: the [`Vm`] and its [`VmHandle`], their errors, and (in submodules) the steps that build
//! a VM ([`builder`]), its run ([`run`]) and its snapshot and restore ([`snapshot`]).
//! Must not: know about hosts, tenants' placement or the API; decide what an exit means (the
//! vCPU's exit dispatch does) or read the environment (knobs come in the [`VmConfig`]).

mod builder;
pub mod input_file;
mod run;
mod snapshot;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::GuestMemoryMmap;
use kvm_ioctls::{Kvm, VmFd};
use serde::Serialize;
use thiserror::Error;

use crate::boot::BootError;
use crate::bus::MmioSlot;
use crate::config::ConfigError;
use crate::devices::MmioDevice;
use crate::dirty_log::MemSlots;
use crate::host_kind::HostKind;
use crate::run_control::RunControl;
use crate::vcpu::{StopReason, Vcpu, VcpuStats};
use crate::verdict_region::{FirewallCounters, VerdictRegion};

// The old paths of what moved out of this module.
pub use crate::bus::{Bus, ConsoleOutput, EventFdTrigger, PioAction};
pub use crate::config::{ConsoleConfig, LinkConfig, Payload, VmConfig};
pub use run::{stop_on_signals, stop_signalled};
pub use snapshot::{CaptureError, RestoreError};

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm ({0}); is KVM available and do you have permission (root or group kvm)?")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM refused {what}: {source}")]
    KvmIoctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// Kept apart from [`VmError::Config`]: callers answer it as the caller's mistake.
    #[error(transparent)]
    BadMemorySize(ConfigError),
    #[error(transparent)]
    Config(ConfigError),
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: input_file::InputFileError,
    },
    #[error("{path}: {source}")]
    KernelImage {
        path: PathBuf,
        source: crate::boot::bzimage::KernelImageError,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot allocate guest memory: {0}")]
    Memory(vm_memory::mmap::FromRangesError),
    #[error("guest memory has no host address: {0}")]
    HostAddress(vm_memory::GuestMemoryError),
    #[error("cannot open the console log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the serial port's interrupt: {0}")]
    SerialIrq(std::io::Error),
    #[error("cannot introspect this kernel: {0}")]
    KernelAnalysis(trap_handler::AnalyzeError),
    #[error(transparent)]
    Introspection(crate::introspect::IntrospectError),
    #[error("network interface {index} ({backend}): {source}")]
    Tap {
        index: usize,
        backend: String,
        source: crate::devices::tap::TapError,
    },
    #[error("network interface {index} ({backend}): {source}")]
    Vxlan {
        index: usize,
        backend: String,
        source: std::io::Error,
    },
    #[error("link {index}: cannot duplicate its socket: {source}")]
    LinkSocket {
        index: usize,
        source: std::io::Error,
    },
    #[error("network interface {index}: {source}")]
    NetDevice {
        index: usize,
        source: crate::devices::virtio::VirtioError,
    },
    #[error("{0}")]
    VerdictRegion(crate::verdict_region::RegionError),
    #[error("verdict ring: {0:?}")]
    VerdictRing(vigil_wire::ring::RingError),
    #[error("boot information: {0:?}")]
    BootInfo(vigil_wire::boot::BootInfoError),
    #[error("{0}")]
    Acpi(crate::acpi::AcpiError),
    #[error("devices must be added before the VM runs")]
    DevicesAfterRun,
    #[error("restore: {0}")]
    Restore(#[source] RestoreError),
    #[error("guest RAM: {0}")]
    MemSlots(crate::dirty_log::DirtyLogError),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
}

impl From<ConfigError> for VmError {
    fn from(e: ConfigError) -> Self {
        match e {
            ConfigError::BadMemorySize(_) => VmError::BadMemorySize(e),
            other => VmError::Config(other),
        }
    }
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmIoctl { what, source }
}

/// How a VM run ended, with what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct VmOutcome {
    pub name: String,
    pub stop: StopReason,
    pub host: String,
    /// From the start of `Vm::create` to the stop.
    pub wall_ms: u64,
    /// First appearance of each console marker, ms since the start of `Vm::create`.
    pub markers: BTreeMap<String, u64>,
    /// Resident memory of the whole VMM process when the VM stopped (guest pages it touched
    /// included), KiB.
    pub vmm_rss_kib: u64,
    /// Of that, file pages (`RssFile`: the VMM's binary and libraries, shared by every VMM
    /// process that runs the same files), KiB.
    pub vmm_rss_file_kib: u64,
    /// Of that, this VM's guest RAM resident in host memory (`mincore`), KiB: RSS minus this is
    /// the VMM's own overhead (with one VM in the process).
    pub guest_resident_kib: u64,
    pub stats: VcpuStats,
    /// What a firewall micro-VM published in its counters block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firewall: Option<FirewallCounters>,
}

/// Pause, capture and resume a VM that runs on another thread.
#[derive(Clone)]
pub struct VmHandle {
    fd: Arc<VmFd>,
    bus: Arc<Bus>,
    memory: GuestMemoryMmap,
    slots: Arc<MemSlots>,
    control: Arc<RunControl>,
}

impl VmHandle {
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn control(&self) -> &Arc<RunControl> {
        &self.control
    }

    /// Lets a captured VM run on (its devices restart where they stood).
    pub fn resume_after_capture(&self) {
        self.bus.resume_devices();
        self.control.resume();
    }

    /// The VM's memslots: dirty logging for a migration's pre-copy.
    pub fn slots(&self) -> &Arc<MemSlots> {
        &self.slots
    }

    /// Restarts the devices of a captured VM but leaves its vCPUs parked.
    pub fn resume_devices(&self) {
        self.bus.resume_devices();
    }
}

/// A VM ready to run.
pub struct Vm {
    name: String,
    host: HostKind,
    // Kept alive for the VM's lifetime: dropping these closes the VM.
    _kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    /// Its memslots (dirty logging, write traps' layout).
    slots: Arc<MemSlots>,
    bus: Arc<Bus>,
    vcpus: Vec<Vcpu>,
    created: Instant,
    introspection: Option<Arc<crate::introspect::Introspection>>,
    /// The micro-VM's verdict ring and counters.
    verdict_region: Option<Arc<VerdictRegion>>,
    /// Its network devices' counters, in device order.
    net_counters: Vec<Arc<crate::devices::virtio::net::NetCounters>>,
    /// Set to stop the VM from outside (another VM's thread, the API).
    stop: Arc<AtomicBool>,
    /// Where a device thread that panicked records why (it sets `stop` too).
    device_fault: Arc<crate::devices::DeviceFault>,
    /// Pauses and resumes the vCPUs from outside (the API).
    control: Arc<RunControl>,
    /// Where the RIP profile goes (`VIGIL_PROFILE`), if sampled.
    profile: Option<PathBuf>,
}

impl Vm {
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Its network devices' counters, in device order (TAP and VXLAN interfaces first, then
    /// the in-process links), live.
    pub fn net_counters(&self) -> Vec<Arc<crate::devices::virtio::net::NetCounters>> {
        self.net_counters.clone()
    }

    /// Stops the VM when set (its `run` returns with `StopReason::Requested`).
    pub fn stop_handle(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// What the API needs to pause, capture and resume this VM while `run` owns it.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            fd: self.fd.clone(),
            bus: self.bus.clone(),
            memory: self.memory.clone(),
            slots: self.slots.clone(),
            control: self.control.clone(),
        }
    }

    /// Pauses and resumes the VM's vCPUs while it runs.
    pub fn run_control(&self) -> Arc<RunControl> {
        self.control.clone()
    }

    /// A firewall micro-VM's verdict ring and counters.
    pub fn verdict_region(&self) -> Option<Arc<VerdictRegion>> {
        self.verdict_region.clone()
    }

    /// A tenant's introspection (hooks, policy, event log), if it runs under a policy.
    pub fn introspection(&self) -> Option<Arc<crate::introspect::Introspection>> {
        self.introspection.clone()
    }

    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Adds an MMIO device at a window (before `run`).
    pub fn add_mmio_device(
        &mut self,
        base: u64,
        size: u64,
        device: Arc<Mutex<dyn MmioDevice>>,
    ) -> Result<(), VmError> {
        let bus = Arc::get_mut(&mut self.bus).ok_or(VmError::DevicesAfterRun)?;
        bus.add_mmio(MmioSlot { base, size, device });
        Ok(())
    }
}
