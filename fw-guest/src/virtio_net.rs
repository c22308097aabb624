//! A polling virtio-net driver over virtio-mmio (virtio 1.2 §4.2, split virtqueues §2.7), for the
//! micro-VM's switch ports. No interrupts: the packet loop polls the used rings (no exit), and a
//! queue notification (one MMIO write, one exit) is made at most once per batch, and only when the
//! device asked for kicks (VRING_USED_F_NO_NOTIFY clear): a device that polls (a memory link's
//! pump while frames flow) costs no exit at all.
//!
//! Memory is identity-mapped in the micro-VM, so the addresses of the queues and buffers given to
//! the device are their virtual addresses. Everything the device writes (used ring entries,
//! lengths) is checked before use: a device that lies cannot make the driver read or write out
//! of its buffers.
//!
//! A forwarded frame is not copied ([`Port::forward`]): its receive buffer moves to the output
//! port's transmit ring, and the free buffer of that transmit descriptor takes its place in the
//! receive ring. So a buffer belongs to whichever descriptor points at it, not to the queue whose
//! storage holds it, and the payload past the headers never enters the micro-VM's cache: the
//! device that wrote it reads it back out.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

/// Entries per queue (the VMM's device offers 256).
pub const QUEUE_SIZE: usize = 256;
/// Bytes per buffer: the 12-byte header and a 1514-byte frame plus a VLAN tag (1530) fit; a
/// longer frame is dropped by the device and counted (`rx_dropped_too_big`). 1536, not 2048: a
/// queue's 256 buffers take 384 KiB, and a flood touches every one of them (2.7 buffers a page:
/// even 64-byte frames fault in all the pages), so each busy queue holds 128 KiB less resident
/// (`fw_guest_ram_mib`), with the same throughput at 64 and 1514 bytes (3 alternating pairs).
pub const BUF_SIZE: usize = 1536;
/// `struct virtio_net_hdr_v1` with no offloads (§5.1.6).
pub const NET_HDR_LEN: usize = 12;

mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
}

const MAGIC: u32 = 0x7472_6976; // "virt"
const DEVICE_ID_NET: u32 = 1;
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
/// VIRTIO_F_VERSION_1 is feature bit 32: bit 0 of the second feature word.
const F_VERSION_1_HIGH: u32 = 1;
const DESC_F_WRITE: u16 = 2;
/// VRING_AVAIL_F_NO_INTERRUPT: we poll.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// VRING_USED_F_NO_NOTIFY (§2.7.10): the device polls this queue, a kick would only cost an exit.
const USED_F_NO_NOTIFY: u16 = 1;
const RX: u32 = 0;
const TX: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    NotVirtio,
    NotNet(u32),
    FeaturesRejected,
    QueueTooSmall(u32),
}

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(2))]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_SIZE],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(4))]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_SIZE],
    avail_event: u16,
}

/// One split virtqueue and storage for as many buffers. Each descriptor points at exactly one
/// buffer of the micro-VM's queues, and no two at the same one; which one changes as
/// [`Port::forward`] swaps buffers between rings. Buffers are reached only through descriptor
/// addresses (written by the driver alone), never through `bufs`.
#[repr(C, align(4096))]
pub struct Queue {
    desc: [Desc; QUEUE_SIZE],
    avail: Avail,
    used: Used,
    bufs: [[u8; BUF_SIZE]; QUEUE_SIZE],
    /// Next avail slot we fill (free running).
    avail_idx: u16,
    /// Next used entry we consume (free running).
    used_idx: u16,
    /// TX only: descriptors handed to the device and not yet returned.
    in_flight: u16,
}

// A VMM that readies the ports (`BOOT_FLAG_PORTS_READY`) programs the device with queues at
// these offsets before the micro-VM runs: the layout here and vigil-wire's must agree.
const _: () = {
    use vigil_wire::boot::port_queue;
    assert!(QUEUE_SIZE == port_queue::SIZE as usize);
    assert!(core::mem::offset_of!(Queue, desc) as u64 == port_queue::DESC);
    assert!(core::mem::offset_of!(Queue, avail) as u64 == port_queue::AVAIL);
    assert!(core::mem::offset_of!(Queue, used) as u64 == port_queue::USED);
    assert!(core::mem::size_of::<Queue>() as u64 == port_queue::BYTES);
};

/// All-zero is a valid initial queue: statics of this type live in .bss.
impl Queue {
    pub const ZERO: Queue = Queue {
        desc: [Desc {
            addr: 0,
            len: 0,
            flags: 0,
            next: 0,
        }; QUEUE_SIZE],
        avail: Avail {
            flags: 0,
            idx: 0,
            ring: [0; QUEUE_SIZE],
            used_event: 0,
        },
        used: Used {
            flags: 0,
            idx: 0,
            ring: [UsedElem { id: 0, len: 0 }; QUEUE_SIZE],
            avail_event: 0,
        },
        bufs: [[0; BUF_SIZE]; QUEUE_SIZE],
        avail_idx: 0,
        used_idx: 0,
        in_flight: 0,
    };

    /// Zeroes everything but the buffers: the rings as a fresh queue has them. A buffer's bytes
    /// are never read before they are written (the device fills a receive buffer, [`Port::send`]
    /// a transmit one, header included), so its pages stay untouched until a frame needs them:
    /// a guest's first touch of a page is an exit on an emulating host, and the buffers are
    /// 384 KiB a queue.
    fn reset_rings(&mut self) {
        let zero = Desc {
            addr: 0,
            len: 0,
            flags: 0,
            next: 0,
        };
        self.desc = [zero; QUEUE_SIZE];
        self.avail.flags = 0;
        self.avail.idx = 0;
        self.avail.ring = [0; QUEUE_SIZE];
        self.avail.used_event = 0;
        self.used.flags = 0;
        self.used.idx = 0;
        self.used.ring = [UsedElem { id: 0, len: 0 }; QUEUE_SIZE];
        self.used.avail_event = 0;
        self.avail_idx = 0;
        self.used_idx = 0;
        self.in_flight = 0;
    }
}

/// One port: a virtio-net device and its two queues.
/// Writes `value` unless `slot` holds it already (a line shared with the device stays clean).
#[inline(always)]
fn write_if_changed<T: PartialEq + Copy>(slot: &mut T, value: T) {
    if *slot != value {
        *slot = value;
    }
}

/// A prefetch hint for the line at `p` (never a memory access: any address is harmless).
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 only hints the cache; it cannot fault or change memory.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
}

/// A received frame, in place in its receive buffer. The driver owns the buffer from
/// [`Port::recv`] until that port's next [`Port::recycle`], unless [`Port::forward`] hands it
/// to a transmit ring before.
pub struct RxFrame {
    /// The buffer, header first.
    buf: *mut u8,
    /// The frame's length, header excluded.
    len: usize,
    /// The receive descriptor's address: where a forward puts the buffer that replaces this one.
    desc_addr: *mut u64,
}

impl RxFrame {
    /// The frame's bytes, writable (the edge's SYN proxy rewrites frames in place).
    ///
    /// # Safety
    /// The frame's port has not recycled since `recv` returned it, the frame has not been
    /// forwarded, and no other reference to its bytes is live while the result is.
    pub unsafe fn bytes_mut<'b>(&self) -> &'b mut [u8] {
        // SAFETY: `buf` is a whole buffer of BUF_SIZE bytes, `len` at most BUF_SIZE -
        // NET_HDR_LEN (`recv` clamps it); the caller vouches for ownership and uniqueness.
        unsafe { core::slice::from_raw_parts_mut(self.buf.add(NET_HDR_LEN), self.len) }
    }
}

pub struct Port<'a> {
    base: usize,
    rx: &'a mut Queue,
    tx: &'a mut Queue,
    /// Received frames waiting to be re-posted (their descriptor ids), in used order.
    rx_done: u16,
    tx_pending: bool,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    /// Frames dropped because the transmit queue was full.
    pub tx_full: u64,
    /// Queue notifications written (each one an exit to the VMM).
    pub kicks: u64,
}

impl<'a> Port<'a> {
    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `base` is the device's register window (from the boot information, mapped for
        // ring 3); registers are 32-bit and aligned.
        unsafe { read_volatile((self.base + offset) as *const u32) }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { write_volatile((self.base + offset) as *mut u32, value) }
    }

    /// Initializes the device at `base` (§3.1.1) and fills its receive queue.
    ///
    /// # Safety
    /// `base` must be a mapped virtio-mmio register window, and the queues must be identity
    /// mapped (their addresses are handed to the device as guest-physical addresses).
    pub unsafe fn init(base: u64, rx: &'a mut Queue, tx: &'a mut Queue) -> Result<Self, InitError> {
        let mut port = Self::new(base, rx, tx);
        let status = port.negotiate()?;
        port.post_buffers();
        port.write(reg::STATUS, status | STATUS_DRIVER_OK);
        port.write(reg::QUEUE_NOTIFY, RX);
        Ok(port)
    }

    /// Takes over a device the VMM initialized as [`Port::init`] would have (it set DRIVER_OK
    /// with these queues: `BOOT_FLAG_PORTS_READY`), writing no register but the receive queue's
    /// notify. The queues' rings are all zero.
    ///
    /// # Safety
    /// As for [`Port::init`]; also, the device at `base` runs with `rx` and `tx` as its queues 0
    /// and 1, of [`QUEUE_SIZE`] entries, and their rings hold nothing but zeros.
    pub unsafe fn adopt(base: u64, rx: &'a mut Queue, tx: &'a mut Queue) -> Self {
        let mut port = Self::new(base, rx, tx);
        for queue in [&mut *port.rx, &mut *port.tx] {
            queue.avail.flags = AVAIL_F_NO_INTERRUPT;
        }
        port.fill_descriptors();
        port.post_buffers();
        port.write(reg::QUEUE_NOTIFY, RX);
        port
    }

    fn new(base: u64, rx: &'a mut Queue, tx: &'a mut Queue) -> Self {
        Port {
            base: base as usize,
            rx,
            tx,
            rx_done: 0,
            tx_pending: false,
            rx_frames: 0,
            rx_bytes: 0,
            tx_frames: 0,
            tx_full: 0,
            kicks: 0,
        }
    }

    /// Device initialization up to FEATURES_OK and the queues' registers (virtio 1.2 §3.1.1,
    /// §4.2.3.2); returns the status to add DRIVER_OK to.
    fn negotiate(&mut self) -> Result<u32, InitError> {
        if self.read(reg::MAGIC) != MAGIC || self.read(reg::VERSION) != 2 {
            return Err(InitError::NotVirtio);
        }
        let id = self.read(reg::DEVICE_ID);
        if id != DEVICE_ID_NET {
            return Err(InitError::NotNet(id));
        }
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, STATUS_ACKNOWLEDGE);
        self.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Only VERSION_1: no offloads (frames are whole), no MAC needed (a switch port).
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        if self.read(reg::DEVICE_FEATURES) & F_VERSION_1_HIGH == 0 {
            return Err(InitError::FeaturesRejected);
        }
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, 0);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, F_VERSION_1_HIGH);
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(reg::STATUS, status);
        if self.read(reg::STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(InitError::FeaturesRejected);
        }
        for q in [RX, TX] {
            self.write(reg::QUEUE_SEL, q);
            let max = self.read(reg::QUEUE_NUM_MAX);
            if (max as usize) < QUEUE_SIZE {
                return Err(InitError::QueueTooSmall(max));
            }
            self.write(reg::QUEUE_NUM, QUEUE_SIZE as u32);
            let queue: &mut Queue = if q == RX {
                &mut *self.rx
            } else {
                &mut *self.tx
            };
            queue.reset_rings();
            queue.avail.flags = AVAIL_F_NO_INTERRUPT;
            let desc = addr_of!(queue.desc) as u64;
            let avail = addr_of!(queue.avail) as u64;
            let used = addr_of!(queue.used) as u64;
            self.write(reg::QUEUE_DESC_LOW, desc as u32);
            self.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.write(reg::QUEUE_DRIVER_LOW, avail as u32);
            self.write(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
            self.write(reg::QUEUE_DEVICE_LOW, used as u32);
            self.write(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
            self.write(reg::QUEUE_READY, 1);
        }
        self.fill_descriptors();
        Ok(status)
    }

    /// Points each descriptor at its own queue's buffer: receive ones device-writable.
    fn fill_descriptors(&mut self) {
        for (queue, flags) in [(&mut *self.rx, DESC_F_WRITE), (&mut *self.tx, 0)] {
            for (i, d) in queue.desc.iter_mut().enumerate() {
                d.addr = addr_of!(queue.bufs[i]) as u64;
                d.len = BUF_SIZE as u32;
                d.flags = flags;
            }
        }
    }

    /// Gives every receive buffer to the device (published, not notified).
    fn post_buffers(&mut self) {
        // Every receive buffer to the device. The transmit ring's entries are the identity too
        // (descriptors go out in order), written once here: `send` never writes them again.
        for i in 0..QUEUE_SIZE {
            self.rx.avail.ring[i] = i as u16;
            self.tx.avail.ring[i] = i as u16;
        }
        self.rx.avail_idx = QUEUE_SIZE as u16;
        fence(Ordering::Release);
        // SAFETY: the avail ring is shared with the device; written with a volatile store.
        unsafe { write_volatile(addr_of_mut!(self.rx.avail.idx), self.rx.avail_idx) };
    }

    /// The next received frame, or None. Call [`Port::recycle`] when done with the frames of a
    /// batch.
    pub fn recv(&mut self) -> Option<RxFrame> {
        // SAFETY: the used ring is written by the device; read with volatile loads.
        let device_idx = unsafe { read_volatile(addr_of!(self.rx.used.idx)) };
        if device_idx == self.rx.used_idx {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = self.rx.used_idx as usize % QUEUE_SIZE;
        // SAFETY: as above.
        let elem = unsafe { read_volatile(addr_of!(self.rx.used.ring[slot])) };
        self.rx.used_idx = self.rx.used_idx.wrapping_add(1);
        // Re-post the descriptor at once (its buffer is read before the next recv call, or
        // replaced by a forward): the device only sees it after `recycle` publishes the index.
        let id = (elem.id as usize) % QUEUE_SIZE;
        let avail_slot = self.rx.avail_idx as usize % QUEUE_SIZE;
        // The device returns buffers in order, so the entry mostly holds `id` already: written
        // only when it changes, the line the device reads next stays clean in its cache.
        write_if_changed(&mut self.rx.avail.ring[avail_slot], id as u16);
        self.rx.avail_idx = self.rx.avail_idx.wrapping_add(1);
        // Start loading the next frame's buffer while this one is judged.
        if device_idx != self.rx.used_idx {
            let next = self.rx.used_idx as usize % QUEUE_SIZE;
            // SAFETY: as above.
            let next = unsafe { read_volatile(addr_of!(self.rx.used.ring[next])) };
            prefetch(self.rx.desc[next.id as usize % QUEUE_SIZE].addr as *const u8);
        }
        self.rx_done += 1;
        let len = (elem.len as usize).min(BUF_SIZE);
        let frame = RxFrame {
            buf: self.rx.desc[id].addr as *mut u8,
            len: len.saturating_sub(NET_HDR_LEN),
            desc_addr: addr_of_mut!(self.rx.desc[id].addr),
        };
        if len >= NET_HDR_LEN {
            self.rx_frames += 1;
            self.rx_bytes += frame.len as u64;
        }
        Some(frame)
    }

    /// Gives the buffers of received frames back to the device.
    pub fn recycle(&mut self) {
        if self.rx_done == 0 {
            return;
        }
        self.rx_done = 0;
        fence(Ordering::Release);
        // SAFETY: the avail ring is shared with the device.
        unsafe { write_volatile(addr_of_mut!(self.rx.avail.idx), self.rx.avail_idx) };
        if Self::device_wants_kick(self.rx) {
            self.write(reg::QUEUE_NOTIFY, RX);
            self.kicks += 1;
        }
    }

    /// Whether the device asked to be notified (§2.7.10: it clears VRING_USED_F_NO_NOTIFY when
    /// it stops polling). The avail index is published before the flag is read (a full fence),
    /// so a device that turns kicks on and then re-checks the index cannot miss this update.
    fn device_wants_kick(queue: &Queue) -> bool {
        fence(Ordering::SeqCst);
        // SAFETY: the used ring is written by the device; read with a volatile load.
        let flags = unsafe { read_volatile(addr_of!(queue.used.flags)) };
        flags & USED_F_NO_NOTIFY == 0
    }

    /// Takes back transmit descriptors the device has finished with.
    fn reclaim_tx(&mut self) {
        // SAFETY: device-written index, volatile read.
        let device_idx = unsafe { read_volatile(addr_of!(self.tx.used.idx)) };
        let done = device_idx
            .wrapping_sub(self.tx.used_idx)
            .min(self.tx.in_flight);
        self.tx.used_idx = self.tx.used_idx.wrapping_add(done);
        self.tx.in_flight -= done;
    }

    /// The transmit descriptor the next frame takes, or None when all are in flight (counted).
    /// Descriptors are used in order, so the next free one is `avail_idx mod QUEUE_SIZE`
    /// whenever fewer than QUEUE_SIZE are in flight.
    fn free_tx(&mut self) -> Option<usize> {
        if self.tx.in_flight as usize == QUEUE_SIZE {
            self.reclaim_tx();
            if self.tx.in_flight as usize == QUEUE_SIZE {
                self.tx_full += 1;
                return None;
            }
        }
        Some(self.tx.avail_idx as usize % QUEUE_SIZE)
    }

    /// Queues descriptor `id`, its buffer holding a frame of `len` bytes behind the header.
    fn queue_tx(&mut self, id: usize, len: usize) {
        // Frames of one size in a row (a bulk flow, a flood) leave the length clean for the
        // device; the avail entry is always `id` (set at init).
        write_if_changed(&mut self.tx.desc[id].len, (NET_HDR_LEN + len) as u32);
        self.tx.avail_idx = self.tx.avail_idx.wrapping_add(1);
        let next = self.tx.avail_idx as usize % QUEUE_SIZE;
        prefetch(self.tx.desc[next].addr as *const u8);
        self.tx.in_flight += 1;
        self.tx_frames += 1;
        self.tx_pending = true;
    }

    /// Queues a copy of `frame` for transmission (sent at the next [`Port::flush`]). False when
    /// the ring is full, or the frame longer than a buffer holds (dropped, never cut short).
    pub fn send(&mut self, frame: &[u8]) -> bool {
        if frame.len() > BUF_SIZE - NET_HDR_LEN {
            return false;
        }
        let Some(id) = self.free_tx() else {
            return false;
        };
        let buf = self.tx.desc[id].addr as *mut u8;
        // SAFETY: a free transmit descriptor's buffer is the driver's (no receive ring holds
        // it, the device is done with it); the frame fits behind the header.
        unsafe {
            core::ptr::write_bytes(buf, 0, NET_HDR_LEN);
            core::ptr::copy_nonoverlapping(frame.as_ptr(), buf.add(NET_HDR_LEN), frame.len());
        }
        self.queue_tx(id, frame.len());
        true
    }

    /// Queues a received frame for transmission without copying it: its buffer moves to this
    /// port's transmit ring, and the transmit descriptor's free buffer takes its place in the
    /// receive ring (the device sees it at the receiving port's next [`Port::recycle`]). False
    /// when the ring is full: the frame stays in its receive buffer.
    ///
    /// # Safety
    /// `frame` came from [`Port::recv`] on a port whose `recycle` has not run since, it was
    /// not forwarded before, and no reference to its bytes is used after this call.
    pub unsafe fn forward(&mut self, frame: RxFrame) -> bool {
        let Some(id) = self.free_tx() else {
            return false;
        };
        let spare = self.tx.desc[id].addr;
        // SAFETY: the receive buffer is the driver's (the caller's contract); its first
        // NET_HDR_LEN bytes are the header, outside the frame's bytes. The receive descriptor
        // is the driver's until the receiving port publishes it again. Transmit headers carry
        // no offloads and num_buffers 0 (virtio 1.2 §5.1.6.2.1); the device wrote 1 there.
        unsafe {
            core::ptr::write_bytes(frame.buf, 0, NET_HDR_LEN);
            frame.desc_addr.write(spare);
        }
        self.tx.desc[id].addr = frame.buf as u64;
        self.queue_tx(id, frame.len);
        true
    }

    /// Publishes queued frames to the device (one notification).
    pub fn flush(&mut self) {
        if !self.tx_pending {
            self.reclaim_tx();
            return;
        }
        self.tx_pending = false;
        fence(Ordering::Release);
        // SAFETY: the avail ring is shared with the device.
        unsafe { write_volatile(addr_of_mut!(self.tx.avail.idx), self.tx.avail_idx) };
        if Self::device_wants_kick(self.tx) {
            self.write(reg::QUEUE_NOTIFY, TX);
            self.kicks += 1;
        }
        self.reclaim_tx();
    }
}
