//! virtio devices over the virtio-mmio transport (virtio 1.2, "modern" devices only).
//!
//! [`mmio::MmioTransport`] owns the register file a guest driver programs (features, queues,
//! status, interrupt status) and hands the configured queues to a [`VirtioDevice`] when the
//! driver sets DRIVER_OK. The device then moves data on its own thread and raises interrupts
//! through the shared [`Interrupt`]; the transport never touches the queues again until reset.
//! [`net::Net`] is the one device so far.
//!
//! Owns: the device-independent virtio vocabulary (status and feature bits, the interrupt, the
//! activation a device gets, the [`VirtioDevice`] trait, [`VirtioError`]).
//! Must not: trust anything in the queues or registers (the guest writes them), or block the vCPU
//! thread that calls the transport.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::GuestMemoryMmap;
use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod driver;
pub mod mmio;
pub mod net;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Feature bits independent of the device type (virtio 1.2 §6).
pub mod features {
    /// VIRTIO_RING_F_EVENT_IDX: used_event / avail_event suppression (§2.7.10).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// VIRTIO_F_VERSION_1: a modern (non-legacy) device.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Bits of the interrupt status register (virtio 1.2 §4.2.2, InterruptStatus).
pub mod interrupt {
    /// A used ring was updated.
    pub const USED_BUFFER: u32 = 1;
    /// The device configuration changed.
    pub const CONFIG_CHANGE: u32 = 2;
}

/// virtio device IDs (virtio 1.2 §5).
pub const DEVICE_ID_NET: u32 = 1;

#[derive(Debug, Error)]
pub enum VirtioError {
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("registering {what} with KVM: {source}")]
    Kvm {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("queue {0} is not ready or lies outside guest memory")]
    BadQueue(usize),
    #[error("starting the device thread: {0}")]
    Thread(#[source] io::Error),
    #[error("the device has no backend (it failed or was never given one)")]
    NoBackend,
    #[error("in-process link: {0}")]
    Link(#[source] net::memlink::MemLinkError),
    #[error("readying the device for its driver: {0}")]
    NotReadied(&'static str),
}

/// The device-to-driver interrupt: the InterruptStatus bits the guest reads and acknowledges,
/// and the eventfd that raises the line (registered as a KVM irqfd on the device's GSI).
///
/// The line is an edge (irqfd pulses the IOAPIC pin); the guest driver reads the status, acks,
/// then drains the rings, so a used-ring update that lands during its handler either is seen by
/// that pass or raises a fresh edge.
///
/// A polling driver (a micro-VM's) suppresses the interrupt; what it needs instead is a wake when
/// it rests in its idle exit: [`Interrupt::set_poller`] gives the device its doorbell, rung when
/// a used-ring update raised no interrupt.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    event: EventFd,
    raised: AtomicU64,
    poller: std::sync::OnceLock<std::sync::Arc<crate::idle::IdleDoorbell>>,
}

impl Interrupt {
    pub fn new() -> Result<Interrupt, VirtioError> {
        Ok(Interrupt {
            status: AtomicU32::new(0),
            event: EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd)?,
            raised: AtomicU64::new(0),
            poller: std::sync::OnceLock::new(),
        })
    }

    /// The doorbell of the polling driver behind this device (set once, before it runs).
    pub fn set_poller(&self, doorbell: std::sync::Arc<crate::idle::IdleDoorbell>) {
        let _ = self.poller.set(doorbell);
    }

    /// Used buffers the driver was not interrupted for: wake it if it rests polling.
    #[inline]
    pub fn wake_poller(&self) {
        if let Some(doorbell) = self.poller.get() {
            doorbell.ring();
        }
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.raised.fetch_add(1, Ordering::Relaxed);
        // The only failure is a counter overflow after 2^64-2 unread writes: the line is raised
        // already then.
        let _ = self.event.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd behind the line (register it with `VmFd::register_irqfd`).
    pub fn eventfd(&self) -> &EventFd {
        &self.event
    }

    /// How many times the line was raised since the device was built.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    /// One per queue, in queue order, configured and valid in `mem`.
    pub queues: Vec<Queue>,
    /// One per queue: signalled when the driver notifies that queue (by a vCPU's MMIO write to
    /// QueueNotify, or directly by KVM through an ioeventfd).
    pub queue_events: Vec<EventFd>,
    pub interrupt: std::sync::Arc<Interrupt>,
    /// The features the driver acknowledged (a subset of the device's).
    pub acked_features: u64,
    /// What of `mem` the device may write (not the pages the VM's write traps guard).
    pub writes: crate::write_trap::DeviceWrites,
}

/// A virtio device type behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device ID (§5).
    fn device_type(&self) -> u32;
    /// Features the device offers (VERSION_1 included).
    fn features(&self) -> u64;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts moving data.
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError>;
    /// Stops moving data and forgets the queues (the driver reset the device). The device must
    /// be able to activate again afterwards.
    fn reset(&mut self);
}

/// Reads `data.len()` bytes of `space` at `offset`; what lies past the end reads as zero.
pub(crate) fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| space.get(at))
            .copied()
            .unwrap_or(0);
    }
}
