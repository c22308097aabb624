//! Devices the VMM emulates, and the bus that routes vCPU MMIO and port I/O exits to them.

pub mod tap;
pub mod virtio;

/// A device reached through guest-physical MMIO. Offsets are relative to the device's window.
/// Implementations must accept any offset and any access size (1..=8 bytes) without panicking:
/// the guest chooses both.
pub trait MmioDevice: Send {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}

/// Description of one virtio-mmio device for the ACPI tables and the guest command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}
