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
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{features, status, Activation, Interrupt, VirtioDevice, VirtioError};
use crate::devices::{DeviceRestoreError, MmioDevice, MmioDeviceInfo};

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
        })
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
                    // Misaligned addresses are refused by virtio-queue and leave the old value.
                    match offset & !4 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                        reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
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
                log::error!(
                    "virtio-mmio: device {} failed to activate: {e}",
                    self.device.device_type()
                );
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
            if !queue.is_valid(&self.mem) {
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

impl MmioTransport {
    /// Sets every queue's position to where its used ring in guest RAM says the device stood
    /// (with the device quiesced every buffer it took was returned, so next_avail == next_used),
    /// then activates the device.
    fn reactivate_from_memory(&mut self) -> Result<(), DeviceRestoreError> {
        use vm_memory::{Bytes, GuestAddress};
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
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct Recorder {
        activations: Vec<(usize, u64, bool)>,
        resets: usize,
        config: [u8; 8],
    }

    struct TestDevice(Arc<Mutex<Recorder>>);

    const TEST_FEATURES: u64 = features::VERSION_1 | features::RING_EVENT_IDX | 1 << 5;

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            TEST_FEATURES
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.0.lock().unwrap().config, offset, data)
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let mut r = self.0.lock().unwrap();
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = r.config.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
        }
        fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
            self.0.lock().unwrap().activations.push((
                a.queues.len(),
                a.acked_features,
                a.queues[0].event_idx_enabled(),
            ));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    const DRIVER_OK_STATUS: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    fn transport() -> (MmioTransport, Arc<Mutex<Recorder>>) {
        let mem = crate::anonymous_memory(0x10_0000, true).unwrap();
        let rec = Arc::new(Mutex::new(Recorder {
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            ..Default::default()
        }));
        let t = MmioTransport::new(mem, Box::new(TestDevice(rec.clone()))).unwrap();
        (t, rec)
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.mmio_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, offset: u64, value: u32) {
        t.mmio_write(offset, &value.to_le_bytes());
    }

    /// Programs both queues at valid addresses in the first MiB.
    fn set_up_queues(t: &mut MmioTransport) {
        for (q, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            w(t, reg::QUEUE_SEL, q);
            w(t, reg::QUEUE_NUM, 8);
            w(t, reg::QUEUE_DESC_LOW, base);
            w(t, reg::QUEUE_DESC_HIGH, 0);
            w(t, reg::QUEUE_DRIVER_LOW, base + 0x800);
            w(t, reg::QUEUE_DEVICE_LOW, base + 0x1000);
            w(t, reg::QUEUE_READY, 1);
        }
    }

    #[test]
    fn a_device_readied_for_its_driver_runs_as_if_the_driver_had_set_it_up() {
        let (mut t, rec) = transport();
        let rings = |base: u64, size: u16| QueueRings {
            size,
            desc: base,
            avail: base + 0x800,
            used: base + 0x1000,
        };
        t.ready_for_driver(features::VERSION_1, &[rings(0x1000, 16), rings(0x4000, 8)])
            .unwrap();
        assert!(t.is_active());
        assert_eq!(r(&mut t, reg::STATUS), DRIVER_OK_STATUS);
        assert_eq!(
            rec.lock().unwrap().activations,
            vec![(2, features::VERSION_1, false)]
        );
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        // The driver may still reset it and start over.
        w(&mut t, reg::STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(rec.lock().unwrap().resets, 1);

        // What a driver could not get, the VMM cannot either: each leaves the device reset.
        let refusals: [(u64, Vec<QueueRings>); 4] = [
            (features::VERSION_1, vec![rings(0x1000, 16)]),
            (
                features::VERSION_1,
                vec![rings(0x1000, 16), rings(0x4000, 16)],
            ),
            (1 << 40, vec![rings(0x1000, 16), rings(0x4000, 8)]),
            (
                features::VERSION_1,
                vec![rings(0x1000, 16), rings(0x10_0000, 8)],
            ),
        ];
        for (wanted, queues) in refusals {
            let (mut t, rec) = transport();
            assert!(matches!(
                t.ready_for_driver(wanted, &queues),
                Err(VirtioError::NotReadied(_))
            ));
            assert!(!t.is_active());
            assert_eq!(r(&mut t, reg::STATUS), 0);
            assert!(rec.lock().unwrap().activations.is_empty());
        }
    }

    fn negotiate(t: &mut MmioTransport, driver_features: u64) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, driver_features as u32);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, (driver_features >> 32) as u32);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), (1 << 29) | (1 << 5));
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 8);
        w(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "no third queue");
        assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
        // Configuration space at any width, zero past its end.
        let mut b = [0u8; 2];
        t.mmio_read(reg::CONFIG + 1, &mut b);
        assert_eq!(b, [2, 3]);
        let mut b = [0xaau8; 8];
        t.mmio_read(reg::CONFIG + 6, &mut b);
        assert_eq!(b, [7, 8, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn full_negotiation_activates_once_and_reset_returns_to_zero() {
        let (mut t, rec) = transport();
        negotiate(&mut t, features::VERSION_1 | features::RING_EVENT_IDX);
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        set_up_queues(&mut t);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        w(&mut t, reg::STATUS, ok);
        assert_eq!(r(&mut t, reg::STATUS), ok);
        assert!(t.is_active());
        assert_eq!(
            rec.lock().unwrap().activations,
            vec![(2, features::VERSION_1 | features::RING_EVENT_IDX, true)]
        );
        // Queue registers are frozen while running.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        // Writing DRIVER_OK again does not activate twice.
        w(&mut t, reg::STATUS, ok);
        assert_eq!(rec.lock().unwrap().activations.len(), 1);

        t.interrupt().signal(super::super::interrupt::USED_BUFFER);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);

        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert!(!t.is_active());
        assert_eq!(rec.lock().unwrap().resets, 1);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        // And it can be brought up again.
        negotiate(&mut t, features::VERSION_1);
        set_up_queues(&mut t);
        w(&mut t, reg::STATUS, ok);
        assert!(t.is_active());
        assert_eq!(
            rec.lock().unwrap().activations[1],
            (2, features::VERSION_1, false)
        );
    }

    #[test]
    fn features_the_device_lacks_or_legacy_drivers_are_refused() {
        for bad in [features::VERSION_1 | 1 << 7, 1 << 5] {
            let (mut t, _) = transport();
            negotiate(&mut t, bad);
            assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0, "{bad:#x}");
            // DRIVER_OK without FEATURES_OK does not start the device either.
            w(
                &mut t,
                reg::STATUS,
                status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
            );
            assert!(!t.is_active());
        }
    }

    #[test]
    fn queue_addresses_are_frozen_once_ready() {
        let (mut t, rec) = transport();
        negotiate(&mut t, features::VERSION_1);
        set_up_queues(&mut t);
        w(&mut t, reg::QUEUE_SEL, 1);
        w(&mut t, reg::QUEUE_DEVICE_LOW, 0xfff0_0000);
        w(&mut t, reg::QUEUE_NUM, 2);
        assert_eq!(t.queues[1].used_ring(), 0x5000);
        assert_eq!(t.queues[1].size(), 8);
        w(&mut t, reg::STATUS, DRIVER_OK_STATUS);
        assert!(t.is_active());
        assert_eq!(rec.lock().unwrap().activations.len(), 1);
    }

    #[test]
    fn queues_outside_memory_or_unconfigured_need_reset_instead_of_running() {
        // Queue 0's used ring beyond the 1 MiB of RAM.
        let (mut t, rec) = transport();
        negotiate(&mut t, features::VERSION_1);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 8);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        w(&mut t, reg::QUEUE_DRIVER_LOW, 0x1800);
        w(&mut t, reg::QUEUE_DEVICE_LOW, 0xfff0_0000);
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::QUEUE_SEL, 1);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x4000);
        w(&mut t, reg::QUEUE_DRIVER_LOW, 0x4800);
        w(&mut t, reg::QUEUE_DEVICE_LOW, 0x5000);
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::STATUS, DRIVER_OK_STATUS);
        assert!(!t.is_active());
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, reg::INTERRUPT_STATUS) & 2, 0);
        assert!(rec.lock().unwrap().activations.is_empty());

        // A queue the driver never made ready.
        let (mut t, rec) = transport();
        negotiate(&mut t, features::VERSION_1);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        w(&mut t, reg::QUEUE_DRIVER_LOW, 0x1800);
        w(&mut t, reg::QUEUE_DEVICE_LOW, 0x2000);
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::STATUS, DRIVER_OK_STATUS);
        assert!(!t.is_active());
        assert!(rec.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn bad_queue_sizes_are_refused() {
        let (mut t, _) = transport();
        negotiate(&mut t, features::VERSION_1);
        w(&mut t, reg::QUEUE_SEL, 0);
        for bad in [0, 3, 32, 0x1_0010] {
            w(&mut t, reg::QUEUE_NUM, bad);
            assert_eq!(t.queues[0].size(), 16, "{bad}");
        }
        w(&mut t, reg::QUEUE_NUM, 4);
        assert_eq!(t.queues[0].size(), 4);
        // A misaligned descriptor table is refused too.
        w(&mut t, reg::QUEUE_DESC_LOW, 0x1001);
        assert_eq!(t.queues[0].desc_table(), 0);
    }

    #[test]
    fn notify_signals_the_queue_event() {
        let (mut t, _) = transport();
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        assert!(t.queue_events()[0].read().is_err(), "queue 0 not signalled");
        // Out-of-range queue indices are ignored.
        w(&mut t, reg::QUEUE_NOTIFY, 9);
        w(&mut t, reg::QUEUE_NOTIFY, u32::MAX);
    }

    #[test]
    fn any_offset_and_size_is_harmless() {
        let (mut t, _) = transport();
        for offset in (0..0x1000u64).chain([u64::MAX - 8, u64::MAX, 1 << 40]) {
            for len in [0usize, 1, 2, 3, 4, 5, 8, 16] {
                let mut b = vec![0x5au8; len];
                t.mmio_read(offset, &mut b);
                if offset < reg::CONFIG && !(len == 4 && offset % 4 == 0) {
                    assert!(b.iter().all(|&x| x == 0), "{offset:#x}/{len}");
                }
                t.mmio_write(offset, &b);
            }
        }
        // Unaligned or odd-sized writes to STATUS did nothing.
        let (mut t, _) = transport();
        t.mmio_write(reg::STATUS, &[1, 0]);
        t.mmio_write(reg::STATUS + 1, &[1, 0, 0, 0]);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn a_saved_transport_restores_into_a_fresh_one_and_runs_again() {
        let (mut t, _) = transport();
        negotiate(&mut t, features::VERSION_1);
        set_up_queues(&mut t);
        w(&mut t, reg::STATUS, DRIVER_OK_STATUS);
        let saved = t.save().expect("a transport has state");
        assert!(saved.active && !t.is_active(), "save quiesces the device");
        let (mut fresh, rec) = transport();
        fresh.restore(&saved).unwrap();
        assert!(fresh.is_active());
        assert_eq!(r(&mut fresh, reg::STATUS), DRIVER_OK_STATUS);
        assert_eq!(rec.lock().unwrap().activations.len(), 1);
    }

    #[test]
    fn restore_refuses_a_state_of_another_shape_and_names_why() {
        let (mut t, _) = transport();
        negotiate(&mut t, features::VERSION_1);
        set_up_queues(&mut t);
        w(&mut t, reg::STATUS, DRIVER_OK_STATUS);
        let saved = t.save().unwrap();

        let mut one_queue = saved.clone();
        one_queue.queues.pop();
        let e = transport().0.restore(&one_queue).unwrap_err();
        assert!(matches!(
            e,
            DeviceRestoreError::QueueCount {
                saved: 1,
                present: 2
            }
        ));
        assert_eq!(e.to_string(), "the saved device has 1 queues, this one 2");

        let mut too_big = saved.clone();
        too_big.queues[1].size = 32;
        let e = transport().0.restore(&too_big).unwrap_err();
        assert_eq!(e.to_string(), "a saved queue of 32 entries");

        // A used ring outside guest RAM: the restart cannot read where the device stood.
        let mut lost = saved.clone();
        lost.queues[0].used_ring = 0x4000_0000;
        let e = transport().0.restore(&lost).unwrap_err();
        assert!(
            matches!(e, DeviceRestoreError::UsedRing { index: 0, .. }),
            "{e}"
        );
        assert!(e.to_string().starts_with("queue 0: used ring unreadable: "));
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn a_device_without_state_refuses_a_restore() {
        struct Stateless;
        impl MmioDevice for Stateless {
            fn mmio_read(&mut self, _offset: u64, _data: &mut [u8]) {}
            fn mmio_write(&mut self, _offset: u64, _data: &[u8]) {}
        }
        let e = Stateless
            .restore(&crate::snapshot::TransportSnapshot::default())
            .unwrap_err();
        assert!(matches!(e, DeviceRestoreError::NoState));
        assert_eq!(e.to_string(), "this device has no state to restore");
    }
}
