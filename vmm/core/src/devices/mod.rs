//! Devices the VMM emulates, and the bus that routes vCPU MMIO and port I/O exits to them.
//!
//! Owns: the [`MmioDevice`] trait every device window implements, the description of a virtio-mmio
//! device for ACPI and the command line, and the device modules (virtio, TAP, VXLAN).
//! Must not: trust the offsets, sizes or data a guest's access carries.

use thiserror::Error;

pub mod tap;
pub mod virtio;
pub mod vxlan;

/// How a device thread that failed (panicked) stops its VM: it records why and sets the VM's
/// stop flag; the VM's run ends with `StopReason::Crashed(why)`, the rest of the process goes on.
#[derive(Debug)]
pub struct DeviceFault {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reason: std::sync::Mutex<Option<String>>,
}

impl DeviceFault {
    pub fn new(stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> DeviceFault {
        DeviceFault {
            stop,
            reason: std::sync::Mutex::new(None),
        }
    }

    /// Records the first failure and stops the VM.
    pub fn fail(&self, why: String) {
        log::error!("{why}: stopping the VM");
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        reason.get_or_insert(why);
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The first failure recorded, if any.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The message a panic carried (`panic!("...")` or a formatted one), for a stop reason.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// A device reached through guest-physical MMIO. Offsets are relative to the device's window.
/// Implementations must accept any offset and any access size (1..=8 bytes) without panicking:
/// the guest chooses both.
pub trait MmioDevice: Send {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
    /// Stops the device from touching guest memory and returns its state (for a snapshot or a
    /// migration); None for a device without state to carry.
    fn save(&mut self) -> Option<crate::snapshot::TransportSnapshot> {
        None
    }
    /// Starts moving data again after `save` (the snapshot was only a snapshot).
    fn resume_after_save(&mut self) {}
    /// Loads a saved state into this (fresh) device, after guest RAM was restored.
    fn restore(
        &mut self,
        _state: &crate::snapshot::TransportSnapshot,
    ) -> Result<(), DeviceRestoreError> {
        Err(DeviceRestoreError::NoState)
    }
}

/// Why a device did not take a saved state, or did not restart from it.
#[derive(Debug, Error)]
pub enum DeviceRestoreError {
    #[error("this device has no state to restore")]
    NoState,
    #[error("the saved device has {saved} queues, this one {present}")]
    QueueCount { saved: usize, present: usize },
    #[error("a saved queue of {0} entries")]
    QueueSize(u16),
    #[error("queue {index}: used ring unreadable: {source}")]
    UsedRing {
        index: usize,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error(transparent)]
    Activate(#[from] virtio::VirtioError),
}

/// Description of one virtio-mmio device for the ACPI tables and the guest command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}
