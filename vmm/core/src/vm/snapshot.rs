//! Capturing a running VM's state (through its [`VmHandle`]) and loading a snapshot into a fresh
//! VM (see [`crate::snapshot`] for what a snapshot holds).
//!
//! Owns: the order of a capture (vCPUs park and capture, devices quiesce, then the VM's
//! interrupt controllers) and of a restore (RAM, VM, vCPUs, devices), and their errors.
//! Must not: write snapshot files or streams (callers do), or resume a VM it did not pause.

use std::time::Duration;

use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{Vm, VmError, VmHandle};
use crate::bus::BusError;
use crate::run_control::RunControlError;
use crate::snapshot::{SnapshotError, VmSnapshot};

/// Why a capture failed (the VM may be left paused: the caller resumes it).
#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(transparent)]
    Pause(#[from] RunControlError),
    #[error("KVM_GET_IRQCHIP {chip_id}: {source}")]
    Irqchip {
        chip_id: u32,
        source: kvm_ioctls::Error,
    },
}

/// Why a snapshot could not be loaded (shown after "restore: ").
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error(
        "shape: the snapshot has {} MiB and {} vCPUs, this VM {} MiB and {}",
        .snapshot_mem >> 20, .snapshot_vcpus, .mem >> 20, .vcpus
    )]
    Shape {
        snapshot_mem: u64,
        snapshot_vcpus: usize,
        mem: u64,
        vcpus: usize,
    },
    #[error("RAM: {0}")]
    Ram(std::io::Error),
    #[error("RAM: {0}")]
    RamAddress(vm_memory::GuestMemoryError),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU: {0}")]
    Vcpu(SnapshotError),
    #[error("devices: {0}")]
    Devices(BusError),
}

impl From<RestoreError> for VmError {
    fn from(e: RestoreError) -> Self {
        VmError::Restore(e)
    }
}

impl VmHandle {
    /// Pauses the VM and captures everything but RAM; devices stop touching RAM, so RAM can be
    /// copied next. The VM stays paused: `resume_after_capture` lets it go on (a snapshot), or
    /// the caller stops it (a migration's source).
    pub fn capture(&self, limit: Duration) -> Result<VmSnapshot, CaptureError> {
        let vcpus = self.control.pause_and_capture(limit)?;
        let transports = self.bus.save_devices();
        let mut irqchips = Vec::new();
        for chip_id in 0..3 {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(|source| CaptureError::Irqchip { chip_id, source })?;
            irqchips.push(chip);
        }
        Ok(VmSnapshot {
            mem_bytes: self.memory.iter().map(|r| r.len()).sum(),
            vcpus,
            irqchips,
            pit: self.fd.get_pit2().ok(),
            clock: self.fd.get_clock().ok(),
            serial: self.bus.save_serial(),
            transports,
        })
    }
}

impl Vm {
    /// Loads a snapshot into this freshly created VM (before `run`): RAM from `pages` (a
    /// `snapshot::write_memory` stream), then the VM, vCPU and device state. Returns the MSRs
    /// KVM refused (reported, not fatal).
    pub fn restore(
        &mut self,
        snapshot: &VmSnapshot,
        pages: &mut impl std::io::Read,
    ) -> Result<Vec<u32>, VmError> {
        self.check_shape(snapshot)?;
        self.clear_ram()?;
        crate::snapshot::read_memory(&self.memory, pages).map_err(RestoreError::Ram)?;
        self.restore_state(snapshot)
    }

    fn check_shape(&self, snapshot: &VmSnapshot) -> Result<(), VmError> {
        let mem_size: u64 = self.memory.iter().map(|r| r.len()).sum();
        if snapshot.mem_bytes != mem_size || snapshot.vcpus.len() != self.vcpus.len() {
            return Err(RestoreError::Shape {
                snapshot_mem: snapshot.mem_bytes,
                snapshot_vcpus: snapshot.vcpus.len(),
                mem: mem_size,
                vcpus: self.vcpus.len(),
            }
            .into());
        }
        Ok(())
    }

    /// Zeroes RAM (what `create` loaded is not the guest's any more) before pages of a
    /// snapshot or a migration's rounds arrive: the pages go back to the kernel, which maps zero
    /// pages on the next touch.
    pub fn clear_ram(&self) -> Result<(), VmError> {
        for region in self.memory.iter() {
            let host = self
                .memory
                .get_host_address(region.start_addr())
                .map_err(RestoreError::RamAddress)?;
            // SAFETY: the range is one anonymous private mapping the VM owns; nothing else uses it
            // before the vCPUs run.
            let rc =
                unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(RestoreError::Ram(std::io::Error::last_os_error()).into());
            }
        }
        Ok(())
    }

    /// Loads the VM, vCPU and device state of `snapshot` into this fresh VM whose RAM already
    /// holds the guest's pages (`clear_ram` and a migration's page rounds).
    pub fn restore_state(&mut self, snapshot: &VmSnapshot) -> Result<Vec<u32>, VmError> {
        self.check_shape(snapshot)?;
        let kvm = |what| move |source| RestoreError::Kvm { what, source };
        for chip in &snapshot.irqchips {
            self.fd.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        if let Some(pit) = &snapshot.pit {
            self.fd.set_pit2(pit).map_err(kvm("KVM_SET_PIT2"))?;
        }
        if let Some(clock) = &snapshot.clock {
            // A KVM without a settable clock (or a guest without kvmclock) loses nothing here.
            let _ = self.fd.set_clock(clock);
        }
        let mut refused = Vec::new();
        for (vcpu, state) in self.vcpus.iter_mut().zip(&snapshot.vcpus) {
            refused.extend(vcpu.restore(state).map_err(RestoreError::Vcpu)?);
        }
        self.bus.restore_serial(&snapshot.serial);
        self.bus
            .restore_devices(&snapshot.transports)
            .map_err(RestoreError::Devices)?;
        Ok(refused)
    }
}
