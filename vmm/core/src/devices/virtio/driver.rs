//! The guest's side of virtio-mmio, run from the host: a minimal split-queue driver that programs
//! a transport through its registers and builds descriptor chains in guest memory exactly as a
//! guest driver would. Tests and diagnostics drive devices with it; no VM is needed.
//!
//! It trusts the device it drives no more than it must: used-ring entries are returned as read.
//!
//! Owns: a test driver's queue layouts, descriptor chains and register sequences.
//! Must not: be used for a real guest (it is the host's stand-in for one), or hide what the
//! device returned (used entries are returned as read).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::mmio::{reg, MmioTransport, QueueRings};
use super::status;
use crate::devices::MmioDevice;

/// VRING_DESC_F_NEXT / VRING_DESC_F_WRITE (virtio 1.2 §2.7.5).
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// One buffer of a chain: guest address, length, whether the device writes it.
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

/// A test driver's layout of one split queue: the transport's own [`QueueRings`] (what
/// [`MmioTransport::ready_for_driver`] takes too), placed by [`QueueRings::at`].
impl QueueRings {
    /// Lays a queue of `size` entries out from `base` (page aligned): descriptor table, then the
    /// available ring, then the used ring on the next 4 KiB boundary.
    pub fn at(base: u64, size: u16) -> QueueRings {
        let n = u64::from(size);
        let avail = base + 16 * n;
        let used = (avail + 6 + 2 * n + 0xfff) & !0xfff;
        QueueRings {
            size,
            desc: base,
            avail,
            used,
        }
    }

    /// Bytes from `desc` to the end of the used ring.
    pub fn span(&self) -> u64 {
        self.used + 6 + 8 * u64::from(self.size) - self.desc
    }
}

pub struct GuestDriver {
    mem: GuestMemoryMmap,
    transport: Arc<Mutex<MmioTransport>>,
    queues: Vec<DriverQueue>,
}

struct DriverQueue {
    layout: QueueRings,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl GuestDriver {
    pub fn new(mem: GuestMemoryMmap, transport: Arc<Mutex<MmioTransport>>) -> GuestDriver {
        GuestDriver {
            mem,
            transport,
            queues: Vec::new(),
        }
    }

    pub fn read_reg(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.lock().unwrap().mmio_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write_reg(&self, offset: u64, value: u32) {
        self.transport
            .lock()
            .unwrap()
            .mmio_write(offset, &value.to_le_bytes());
    }

    /// Device configuration bytes.
    pub fn read_config(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.transport
            .lock()
            .unwrap()
            .mmio_read(reg::CONFIG + offset, &mut b);
        b
    }

    /// Runs the initialisation sequence of virtio 1.2 §3.1.1 with the features in `wanted` that
    /// the device offers, one queue per layout. Returns the final status register.
    pub fn init(&mut self, wanted: u64, layouts: &[QueueRings]) -> u32 {
        self.write_reg(reg::STATUS, 0);
        let mut s = status::ACKNOWLEDGE;
        self.write_reg(reg::STATUS, s);
        s |= status::DRIVER;
        self.write_reg(reg::STATUS, s);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.write_reg(reg::DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read_reg(reg::DEVICE_FEATURES)) << (32 * sel);
        }
        let features = offered & wanted;
        for sel in 0..2u32 {
            self.write_reg(reg::DRIVER_FEATURES_SEL, sel);
            self.write_reg(reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        s |= status::FEATURES_OK;
        self.write_reg(reg::STATUS, s);
        if self.read_reg(reg::STATUS) & status::FEATURES_OK == 0 {
            return self.read_reg(reg::STATUS);
        }
        self.queues.clear();
        for (index, layout) in layouts.iter().enumerate() {
            // Rings start zeroed, as a driver allocates them.
            let _ = self.mem.write_slice(
                &vec![0u8; layout.span() as usize],
                GuestAddress(layout.desc),
            );
            self.write_reg(reg::QUEUE_SEL, index as u32);
            self.write_reg(reg::QUEUE_NUM, u32::from(layout.size));
            for (low, addr) in [
                (reg::QUEUE_DESC_LOW, layout.desc),
                (reg::QUEUE_DRIVER_LOW, layout.avail),
                (reg::QUEUE_DEVICE_LOW, layout.used),
            ] {
                self.write_reg(low, addr as u32);
                self.write_reg(low + 4, (addr >> 32) as u32);
            }
            self.write_reg(reg::QUEUE_READY, 1);
            self.queues.push(DriverQueue {
                layout: *layout,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
            });
        }
        s |= status::DRIVER_OK;
        self.write_reg(reg::STATUS, s);
        self.read_reg(reg::STATUS)
    }

    /// Writes one descriptor verbatim (for chains no well-behaved driver would build).
    pub fn write_descriptor(
        &self,
        queue: usize,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let q = &self.queues[queue];
        let at = q.layout.desc + 16 * u64::from(index % q.layout.size);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    /// Builds a chain of `buffers` in free descriptors and publishes it without notifying.
    /// Returns its head index.
    pub fn publish(&mut self, queue: usize, buffers: &[Buffer]) -> u16 {
        let size = self.queues[queue].layout.size;
        let head = self.queues[queue].next_desc;
        for (i, b) in buffers.iter().enumerate() {
            let index = (head + i as u16) % size;
            let last = i + 1 == buffers.len();
            let flags =
                if last { 0 } else { DESC_F_NEXT } | if b.device_writes { DESC_F_WRITE } else { 0 };
            self.write_descriptor(queue, index, b.addr, b.len, flags, (index + 1) % size);
        }
        self.queues[queue].next_desc = (head + buffers.len() as u16) % size;
        self.publish_head(queue, head);
        head
    }

    /// Puts `head` in the next available-ring slot and moves the index (release order, as the
    /// driver's memory barrier).
    pub fn publish_head(&mut self, queue: usize, head: u16) {
        let q = &mut self.queues[queue];
        let slot = q.layout.avail + 4 + 2 * u64::from(q.avail_idx % q.layout.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        self.set_avail_idx(queue, self.queues[queue].avail_idx);
    }

    /// Writes the available index verbatim.
    pub fn set_avail_idx(&self, queue: usize, idx: u16) {
        let q = &self.queues[queue];
        self.mem
            .store(
                idx.to_le(),
                GuestAddress(q.layout.avail + 2),
                Ordering::Release,
            )
            .unwrap();
    }

    /// The available ring's flags (VRING_AVAIL_F_NO_INTERRUPT is bit 0).
    pub fn set_avail_flags(&self, queue: usize, flags: u16) {
        let q = &self.queues[queue];
        self.mem
            .store(
                flags.to_le(),
                GuestAddress(q.layout.avail),
                Ordering::Release,
            )
            .unwrap();
    }

    /// used_event (EVENT_IDX): interrupt once the used index passes it.
    pub fn set_used_event(&self, queue: usize, idx: u16) {
        let q = &self.queues[queue];
        let at = q.layout.avail + 4 + 2 * u64::from(q.layout.size);
        self.mem
            .store(idx.to_le(), GuestAddress(at), Ordering::Release)
            .unwrap();
    }

    /// QueueNotify, as a vCPU's MMIO write.
    pub fn notify(&self, queue: usize) {
        self.write_reg(reg::QUEUE_NOTIFY, queue as u32);
    }

    pub fn used_idx(&self, queue: usize) -> u16 {
        let q = &self.queues[queue];
        u16::from_le(
            self.mem
                .load(GuestAddress(q.layout.used + 2), Ordering::Acquire)
                .unwrap(),
        )
    }

    /// Used entries (head, length) the device added since the last call.
    pub fn take_used(&mut self, queue: usize) -> Vec<(u32, u32)> {
        let end = self.used_idx(queue);
        let q = &mut self.queues[queue];
        let mut out = Vec::new();
        while q.last_used != end {
            let at = q.layout.used + 4 + 8 * u64::from(q.last_used % q.layout.size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((u32::from_le(id), u32::from_le(len)));
            q.last_used = q.last_used.wrapping_add(1);
        }
        out
    }

    /// Waits until the device has used `count` more entries than were taken, up to `timeout`.
    /// It watches the used index, not the interrupt, so it works with interrupts suppressed.
    pub fn wait_used(&self, queue: usize, count: u16, timeout: Duration) -> bool {
        let taken = self.queues[queue].last_used;
        wait_until(timeout, || {
            self.used_idx(queue).wrapping_sub(taken) >= count
        })
    }
}

/// Polls `done` until it holds or `timeout` passes; the device works on its own thread and has
/// no completion signal that interrupt suppression cannot hide.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}
