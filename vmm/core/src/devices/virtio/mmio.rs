//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): one 4 KiB window per device with
//! the register layout below, device configuration space from offset 0x100.
//!
//! Every register is 32 bits wide and 32-bit aligned; any other access to them reads as zero and
//! writes nothing (the spec leaves it undefined, the guest chooses offset and size). The
//! configuration space accepts any width.
//!
//! Owns: the register file of one device (features, queue configuration, status, interrupt
//! status), activation at DRIVER_OK and reset, saving and restoring that state.
//! Must not: touch the queues once the device is active (the device's thread owns them), or act
//! on a register write the spec does not allow in the current status.

use std::sync::Arc;

use crate::GuestMemoryMmap;
use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{features, status, Activation, Interrupt, VirtioDevice, VirtioError};
use crate::devices::{DeviceRestoreError, MmioDevice, MmioDeviceInfo};
use crate::write_trap::DeviceWrites;

/// Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-mmio interface.
pub const VERSION: u32 = 2;
/// PCI-style vendor ID reported to the guest ("VGIL"); drivers do not match on it.
pub const VENDOR_ID: u32 = 0x4c49_4756;

/// Where one split queue's three parts lie in guest memory, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueRings {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The transport of one device. Give it to the VM's bus at the device's window; see
/// [`MmioTransport::register_with_kvm`] for the interrupt line and the fast notify path.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    active: bool,
    /// What of guest RAM the device may write: its used rings and receive buffers stay off the
    /// pages the VM's write traps guard.
    writes: DeviceWrites,
    /// DRIVER_OKs refused because the device could not start: the guest repeats them as often
    /// as it likes, and each one is logged only when this count reaches a power of two.
    activation_failures: u64,
}

impl MmioTransport {
    /// Wraps `device`. `mem` is the guest's RAM, which the device reads its queues from.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
    ) -> Result<MmioTransport, VirtioError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &max in device.queue_max_sizes() {
            // A device's maximum is a power of two up to 32768 by construction; anything else
            // is a bug in the device, not guest input.
            queues.push(Queue::new(max).map_err(|_| VirtioError::BadQueue(queues.len()))?);
            queue_events.push(EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new()?),
            queues,
            queue_events,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            active: false,
            activation_failures: 0,
            writes: DeviceWrites::default(),
        })
    }

    /// Keeps the device's writes off the pages `writes` guards (a tenant's write traps): a used
    /// ring there refuses DRIVER_OK, a receive buffer there is returned empty.
    pub fn with_device_writes(mut self, writes: DeviceWrites) -> MmioTransport {
        self.writes = writes;
        self
    }

    /// The interrupt line's eventfd (for `VmFd::register_irqfd`).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// One eventfd per queue, signalled on a notify of that queue.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Registers the interrupt eventfd as a KVM irqfd on `device.gsi` (the VM must have its
    /// in-kernel irqchip) and one ioeventfd per queue on QueueNotify at `device.base`, matched
    /// on the queue index the driver writes: KVM then signals the queue without a userspace exit.
    /// Without this call the transport still works (QueueNotify writes that reach
    /// [`MmioDevice::mmio_write`] signal the same eventfds) but the guest gets no interrupts.
    pub fn register_with_kvm(&self, vm: &VmFd, device: &MmioDeviceInfo) -> Result<(), VirtioError> {
        vm.register_irqfd(self.interrupt.eventfd(), device.gsi)
            .map_err(|source| VirtioError::Kvm {
                what: format!("irqfd on GSI {}", device.gsi),
                source,
            })?;
        let notify = device.base + reg::QUEUE_NOTIFY;
        for (index, event) in self.queue_events.iter().enumerate() {
            // Linux's vm_notify() writes the 32-bit queue index; a u32 datamatch is a 4-byte one.
            vm.register_ioevent(event, &IoEventAddress::Mmio(notify), index as u32)
                .map_err(|source| VirtioError::Kvm {
                    what: format!("ioeventfd for queue {index} at {notify:#x}"),
                    source,
                })?;
        }
        Ok(())
    }

    /// Initializes the device on its driver's behalf, through the register writes the driver
    /// would make (virtio 1.2 §3.1.1, §4.2.3.2): `features` accepted, queue `i` of
    /// `queues[i].size` entries at its rings, then DRIVER_OK, which activates the device. For a
    /// guest that its boot information tells so (the micro-VM's `BOOT_FLAG_PORTS_READY`): on an
    /// emulating host each register access of its own is an exit, ~36 a port. An `Err` leaves
    /// the device reset, as a driver's failed initialization would.
    pub fn ready_for_driver(
        &mut self,
        features: u64,
        queues: &[QueueRings],
    ) -> Result<(), VirtioError> {
        let refused = |transport: &mut Self, why| {
            transport.write_register(reg::STATUS, 0);
            Err(VirtioError::NotReadied(why))
        };
        if queues.len() != self.queues.len() {
            return refused(self, "the device has another number of queues");
        }
        let mut device_status = status::ACKNOWLEDGE | status::DRIVER;
        self.write_register(reg::STATUS, 0);
        self.write_register(reg::STATUS, status::ACKNOWLEDGE);
        self.write_register(reg::STATUS, device_status);
        for sel in 0..2u32 {
            self.write_register(reg::DRIVER_FEATURES_SEL, sel);
            self.write_register(reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        device_status |= status::FEATURES_OK;
        self.write_register(reg::STATUS, device_status);
        if self.read_register(reg::STATUS) & status::FEATURES_OK == 0 {
            return refused(self, "the device refused the features");
        }
        for (index, rings) in queues.iter().enumerate() {
            self.write_register(reg::QUEUE_SEL, index as u32);
            if self.read_register(reg::QUEUE_NUM_MAX) < u32::from(rings.size) {
                return refused(self, "a queue is larger than the device takes");
            }
            self.write_register(reg::QUEUE_NUM, u32::from(rings.size));
            for (low, addr) in [
                (reg::QUEUE_DESC_LOW, rings.desc),
                (reg::QUEUE_DRIVER_LOW, rings.avail),
                (reg::QUEUE_DEVICE_LOW, rings.used),
            ] {
                self.write_register(low, addr as u32);
                self.write_register(low + 4, (addr >> 32) as u32);
            }
            self.write_register(reg::QUEUE_READY, 1);
        }
        self.write_register(reg::STATUS, device_status | status::DRIVER_OK);
        if !self.active {
            return refused(self, "the device did not start with these queues");
        }
        Ok(())
    }

    /// The device status register (for tests and diagnostics).
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    /// Whether the device is running (DRIVER_OK accepted).
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may be written only between FEATURES_OK and DRIVER_OK, and only while
    /// the selected queue is not ready (§4.2.3.2).
    fn queue_writable(&self) -> bool {
        !self.active
            && self.device_status & status::FEATURES_OK != 0
            && self.device_status & status::FAILED == 0
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.device_status,
            // No shared memory regions: their length reads as all ones (§4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            // The configuration never changes while the driver runs.
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            // Features are frozen once FEATURES_OK is set (§3.1.1).
            reg::DRIVER_FEATURES if self.device_status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if self.queue_writable() => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    // Invalid sizes (zero, not a power of two, over the maximum) are refused
                    // and leave the old size; is_valid() checks again at DRIVER_OK.
                    let _ = q.try_set_size(u16::try_from(value).unwrap_or(0));
                }
            }
            reg::QUEUE_READY if self.queue_writable() => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if self.queue_writable() =>
            {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    let (low, high) = if offset & 4 == 0 {
                        (Some(value), None)
                    } else {
                        (None, Some(value))
                    };
                    // Misaligned addresses are refused and leave the old value. virtio-queue's
                    // setters log an error line for each: a guest writing them in a loop wrote
                    // the host's log without end, hence its `try_` forms, which log nothing.
                    let merge = |old: u64| {
                        let low = low.map_or(old & 0xffff_ffff, u64::from);
                        let high = high.map_or(old >> 32, u64::from);
                        GuestAddress(high << 32 | low)
                    };
                    let _ = match offset & !4 {
                        reg::QUEUE_DESC_LOW => q.try_set_desc_table_address(merge(q.desc_table())),
                        reg::QUEUE_DRIVER_LOW => {
                            q.try_set_avail_ring_address(merge(q.avail_ring()))
                        }
                        _ => q.try_set_used_ring_address(merge(q.used_ring())),
                    };
                }
            }
            reg::QUEUE_NOTIFY => {
                if let Some(event) = self.queue_events.get(value as usize) {
                    // Overflow of the eventfd counter only happens with the event pending.
                    let _ = event.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (§3.1.1); anything else is ignored.
        if value & self.device_status != self.device_status {
            return;
        }
        let added = value & !self.device_status;
        let mut value = value;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & features::VERSION_1 != 0;
            if !acceptable {
                // The driver reads the status back and gives up (§3.1.1 step 6).
                value &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 && !self.active {
            if value & status::FEATURES_OK == 0 {
                value &= !status::DRIVER_OK;
            } else if let Err(e) = self.activate() {
                // The device cannot run with what the driver gave it: tell the driver (§2.1.2).
                self.activation_failures += 1;
                if self.activation_failures.is_power_of_two() {
                    log::error!(
                        "virtio-mmio: device {} failed to activate: {e} ({} times so far)",
                        self.device.device_type(),
                        self.activation_failures
                    );
                }
                value |= status::DEVICE_NEEDS_RESET;
                self.interrupt.signal(super::interrupt::CONFIG_CHANGE);
            }
        }
        self.device_status = value;
    }

    fn activate(&mut self) -> Result<(), VirtioError> {
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut queue_events = Vec::with_capacity(self.queues.len());
        for (index, (queue, event)) in self.queues.iter().zip(&self.queue_events).enumerate() {
            if !rings_in_ram(queue, &self.mem, &self.writes) {
                return Err(VirtioError::BadQueue(index));
            }
            let mut queue =
                Queue::try_from(queue.state()).map_err(|_| VirtioError::BadQueue(index))?;
            queue.set_event_idx(event_idx);
            queues.push(queue);
            queue_events.push(event.try_clone().map_err(VirtioError::EventFd)?);
        }
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
            writes: self.writes.clone(),
        })?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        for event in &self.queue_events {
            // Drop notifications meant for the old queues.
            let _ = event.read();
        }
        self.interrupt.clear();
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }
}

/// Whether `queue` is ready and its three parts lie in guest RAM: virtio-queue's `is_valid`
/// without its error line per refusal (the guest repeats a refused DRIVER_OK at will). Sizes
/// as virtio 1.2 §2.7: 16-byte descriptors; avail and used rings with 4 bytes of header, 2 of
/// event index, and 2- and 8-byte elements.
fn rings_in_ram(queue: &Queue, mem: &GuestMemoryMmap, writes: &DeviceWrites) -> bool {
    use vm_memory::GuestMemoryBackend;
    let size = usize::from(queue.size());
    queue.ready()
        && [
            (queue.desc_table(), 16 * size),
            (queue.avail_ring(), 6 + 2 * size),
            (queue.used_ring(), 6 + 8 * size),
        ]
        .into_iter()
        .all(|(addr, len)| mem.check_range(GuestAddress(addr), len))
        // The device writes the used ring (entries, index, avail_event).
        && writes.allows(queue.used_ring(), 6 + 8 * size)
}

impl MmioTransport {
    /// Sets every queue's position to where its used ring in guest RAM says the device stood
    /// (with the device quiesced every buffer it took was returned, so next_avail == next_used),
    /// then activates the device.
    fn reactivate_from_memory(&mut self) -> Result<(), DeviceRestoreError> {
        use vm_memory::Bytes;
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if !queue.ready() {
                continue;
            }
            // struct virtq_used (virtio 1.2 §2.7.8): le16 flags, le16 idx, ...
            let idx: u16 = self
                .mem
                .read_obj::<u16>(GuestAddress(queue.used_ring().wrapping_add(2)))
                .map_err(|source| DeviceRestoreError::UsedRing { index, source })?;
            queue.set_next_avail(u16::from_le(idx));
            queue.set_next_used(u16::from_le(idx));
        }
        self.activate()?;
        // Wake the driver: whatever completed while the VM was stopped gets looked at.
        self.interrupt.signal(super::interrupt::USED_BUFFER);
        Ok(())
    }
}

impl MmioDevice for MmioTransport {
    fn save(&mut self) -> Option<crate::snapshot::TransportSnapshot> {
        let was_active = self.active;
        if self.active {
            // Joins the device's worker: nothing writes guest memory after this.
            self.device.reset();
            self.active = false;
        }
        Some(crate::snapshot::TransportSnapshot {
            device_status: self.device_status,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            active: was_active,
            queues: self
                .queues
                .iter()
                .map(|q| crate::snapshot::QueueConfig {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                })
                .collect(),
        })
    }

    fn resume_after_save(&mut self) {
        if !self.active && self.device_status & status::DRIVER_OK != 0 {
            if let Err(e) = self.reactivate_from_memory() {
                log::error!("virtio-mmio: the device did not restart after a snapshot: {e}");
            }
        }
    }

    fn restore(
        &mut self,
        state: &crate::snapshot::TransportSnapshot,
    ) -> Result<(), DeviceRestoreError> {
        if state.queues.len() != self.queues.len() {
            return Err(DeviceRestoreError::QueueCount {
                saved: state.queues.len(),
                present: self.queues.len(),
            });
        }
        for (queue, saved) in self.queues.iter_mut().zip(&state.queues) {
            queue.reset();
            if saved.size > queue.max_size() {
                return Err(DeviceRestoreError::QueueSize(saved.size));
            }
            queue.set_size(saved.size);
            let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
            let (l, h) = split(saved.desc_table);
            queue.set_desc_table_address(l, h);
            let (l, h) = split(saved.avail_ring);
            queue.set_avail_ring_address(l, h);
            let (l, h) = split(saved.used_ring);
            queue.set_used_ring_address(l, h);
            queue.set_ready(saved.ready);
        }
        self.device_status = state.device_status;
        self.driver_features = state.driver_features & self.device.features();
        self.queue_sel = state.queue_sel;
        if state.interrupt_status != 0 {
            self.interrupt.signal(state.interrupt_status);
        }
        if state.active {
            self.reactivate_from_memory()?;
        }
        Ok(())
    }

    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
