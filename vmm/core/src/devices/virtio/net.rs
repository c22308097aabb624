//! virtio-net (virtio 1.2 §5.1): one receive and one transmit queue, a MAC address, link status,
//! no offloads. Frames travel between the queues and a [`FrameLink`] (a TAP device, or one end of
//! a datagram socket pair) on one backend thread per device, started when the driver sets
//! DRIVER_OK and stopped when it resets the device or the device is dropped.
//!
//! Every frame carries a 12-byte `virtio_net_hdr_v1` (§5.1.6) ahead of it in the queues; with no
//! offload features negotiated it is all zero on receive (num_buffers = 1) and ignored on
//! transmit. Frames in and out are counted, drops by cause.
//!
//! Must not: lose a received frame without counting it, loop on a ring that lies about its
//! indices, or block anything but its own thread.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::Serialize;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    features, interrupt, read_config_bytes, Activation, Interrupt, VirtioDevice, VirtioError,
    DEVICE_ID_NET,
};
use crate::devices::tap::Tap;

/// Queue indices (virtio 1.2 §5.1.2: receiveq1 is 0, transmitq1 is 1).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Size we offer for each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1` (virtio 1.2 §5.1.6): flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset (u8, u8, 4 × u16), num_buffers (u16).
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in that header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// VIRTIO_NET_F_MAC (§5.1.3): the device has a MAC address in its configuration.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_STATUS (§5.1.3): the configuration has a link status field.
pub const F_STATUS: u64 = 1 << 16;
/// VIRTIO_NET_S_LINK_UP (§5.1.4).
const S_LINK_UP: u16 = 1;
/// VRING_AVAIL_F_NO_INTERRUPT (§2.7.7): the driver does not want used-buffer interrupts.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Largest frame moved either way: a 64 KiB IP datagram in an Ethernet frame with a VLAN tag.
/// The guest cannot send more without GSO; a host-side MTU above it is cut by the kernel read.
pub const MAX_FRAME: usize = 65_536 + 18;
/// Rounds of "drain, re-enable notifications, re-check" before the backend yields to its other
/// events (it notifies itself to come back).
const MAX_ROUNDS: usize = 8;

/// Where a device's frames go: one datagram per Ethernet frame, non-blocking.
pub trait FrameLink: AsRawFd + Send {
    /// Receives one frame into `buf`; `WouldBlock` when none is waiting.
    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame.
    fn send_frame(&self, frame: &[u8]) -> io::Result<usize>;
}

impl FrameLink for Tap {
    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_frame(buf)
    }
    fn send_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.write_frame(frame)
    }
}

/// One end of a `socketpair(AF_UNIX, SOCK_DGRAM)`, set non-blocking by the caller: a link to
/// another device or process in the same host (and the tests' way to see frames without root).
impl FrameLink for UnixDatagram {
    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
    fn send_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.send(frame)
    }
}

/// Live counters of one device, updated by its backend thread.
#[derive(Debug, Default)]
pub struct NetCounters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped_too_big: AtomicU64,
    rx_bad_buffers: AtomicU64,
    rx_waits_for_buffers: AtomicU64,
    rx_link_errors: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped_malformed: AtomicU64,
    tx_link_errors: AtomicU64,
    queue_errors: AtomicU64,
    interrupts: AtomicU64,
}

/// A snapshot of [`NetCounters`]. Bytes are frame bytes (the virtio-net header not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from the link larger than the guest's receive buffer: dropped.
    pub rx_dropped_too_big: u64,
    /// Receive buffers the guest gave at addresses outside its memory: returned empty.
    pub rx_bad_buffers: u64,
    /// Times a frame from the link had to wait for the guest to post receive buffers (the link
    /// is not read meanwhile; frames queue in the kernel, which counts its own drops).
    pub rx_waits_for_buffers: u64,
    pub rx_link_errors: u64,
    /// Frames sent to the link.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Transmit chains shorter than the header, longer than MAX_FRAME, or outside guest memory.
    pub tx_dropped_malformed: u64,
    /// Frames the link refused (interface down, no buffer space).
    pub tx_link_errors: u64,
    /// Rings whose indices were invalid (a broken or hostile driver).
    pub queue_errors: u64,
    /// Used-buffer interrupts raised.
    pub interrupts: u64,
}

impl NetCounters {
    pub fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped_too_big: get(&self.rx_dropped_too_big),
            rx_bad_buffers: get(&self.rx_bad_buffers),
            rx_waits_for_buffers: get(&self.rx_waits_for_buffers),
            rx_link_errors: get(&self.rx_link_errors),
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped_malformed: get(&self.tx_dropped_malformed),
            tx_link_errors: get(&self.tx_link_errors),
            queue_errors: get(&self.queue_errors),
            interrupts: get(&self.interrupts),
        }
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

struct Worker {
    stop: EventFd,
    handle: JoinHandle<Box<dyn FrameLink>>,
}

/// A virtio-net device. Wrap it in an [`super::mmio::MmioTransport`].
pub struct Net {
    config: [u8; 8],
    link: Option<Box<dyn FrameLink>>,
    counters: Arc<NetCounters>,
    worker: Option<Worker>,
}

impl Net {
    /// A device with MAC address `mac` whose frames go to `link`.
    pub fn new(link: Box<dyn FrameLink>, mac: [u8; 6]) -> Net {
        let mut config = [0u8; 8];
        // struct virtio_net_config (§5.1.4): mac[6], status (le16).
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        Net {
            config,
            link: Some(link),
            counters: Arc::new(NetCounters::default()),
            worker: None,
        }
    }

    /// The device's counters; the handle stays valid after the device moves into its transport.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            let _ = worker.stop.write(1);
            match worker.handle.join() {
                Ok(link) => self.link = Some(link),
                Err(_) => eprintln!("virtio-net: the backend thread panicked; the link is lost"),
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | F_MAC | F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR semantics we do not offer;
        // the status is read-only.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        self.stop_worker();
        let Activation {
            mem,
            queues,
            queue_events,
            interrupt,
            acked_features,
        } = activation;
        let (Ok([rx, tx]), Ok([rx_event, tx_event])) = (
            <[Queue; 2]>::try_from(queues),
            <[EventFd; 2]>::try_from(queue_events),
        ) else {
            return Err(VirtioError::BadQueue(2));
        };
        let link_fd = self
            .link
            .as_ref()
            .ok_or(VirtioError::NoBackend)?
            .as_raw_fd();
        let stop = EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd)?;
        // Everything that can fail is set up before the link moves to the thread.
        let epoll = Epoll::new().map_err(VirtioError::Thread)?;
        for (fd, token) in [
            (rx_event.as_raw_fd(), Token::RxQueue),
            (tx_event.as_raw_fd(), Token::TxQueue),
            (stop.as_raw_fd(), Token::Stop),
            (link_fd, Token::Link),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token as u64),
                )
                .map_err(VirtioError::Thread)?;
        }
        let stop_for_thread = stop.try_clone().map_err(VirtioError::EventFd)?;
        let link = self.link.take().ok_or(VirtioError::NoBackend)?;
        let backend = Backend {
            mem,
            rx,
            tx,
            rx_event,
            tx_event,
            stop: stop_for_thread,
            interrupt,
            event_idx: acked_features & features::RING_EVENT_IDX != 0,
            link,
            link_fd,
            link_armed: true,
            epoll,
            counters: self.counters.clone(),
            pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: vec![0; MAX_FRAME],
        };
        let handle = std::thread::Builder::new()
            .name("vigil-virtio-net".into())
            .spawn(move || backend.run())
            .map_err(VirtioError::Thread)?;
        self.worker = Some(Worker { stop, handle });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
enum Token {
    RxQueue = 0,
    TxQueue = 1,
    Link = 2,
    Stop = 3,
}

/// What the backend thread owns while the device runs.
struct Backend {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    rx_event: EventFd,
    tx_event: EventFd,
    stop: EventFd,
    interrupt: Arc<Interrupt>,
    event_idx: bool,
    link: Box<dyn FrameLink>,
    link_fd: RawFd,
    /// Whether the link is in the epoll set (it is not while a frame waits for RX buffers).
    link_armed: bool,
    epoll: Epoll,
    counters: Arc<NetCounters>,
    /// Length of a frame read from the link that no RX buffer has taken yet (in `rx_buf`).
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

/// A ring's indices are invalid: stop using it until the driver notifies again.
struct RingBroken;

impl Backend {
    /// Moves frames until told to stop; gives the link back.
    fn run(mut self) -> Box<dyn FrameLink> {
        // Work the driver queued before DRIVER_OK, or notified before the thread existed.
        self.process_tx();
        self.process_rx();
        let mut events = vec![EpollEvent::default(); 4];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("virtio-net: epoll_wait failed, device stopped: {e}");
                    return self.link;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    t if t == Token::Stop as u64 => {
                        let _ = self.stop.read();
                        return self.link;
                    }
                    t if t == Token::TxQueue as u64 => {
                        let _ = self.tx_event.read();
                        self.process_tx();
                    }
                    t if t == Token::RxQueue as u64 => {
                        let _ = self.rx_event.read();
                        self.process_rx();
                    }
                    _ => self.process_rx(),
                }
            }
        }
    }

    fn pop<'m>(
        queue: &mut Queue,
        mem: &'m GuestMemoryMmap,
        counters: &NetCounters,
    ) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, RingBroken> {
        // iter() rather than pop_descriptor_chain(), which hides an invalid avail index.
        match queue.iter(mem) {
            Ok(mut chains) => Ok(chains.next()),
            Err(_) => {
                bump(&counters.queue_errors, 1);
                Err(RingBroken)
            }
        }
    }

    /// Transmit: every available chain becomes one frame on the link.
    fn process_tx(&mut self) {
        // A handle of our own, so chains can borrow it while `self` changes.
        let mem = self.mem.clone();
        let mut used = false;
        for round in 1..=MAX_ROUNDS {
            // Kicks are useless while we drain; re-enabled below.
            let _ = self.tx.disable_notification(&self.mem);
            let mut popped = 0usize;
            while popped < usize::from(self.tx.size()) {
                let chain = match Self::pop(&mut self.tx, &mem, &self.counters) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(RingBroken) => {
                        self.signal_used(TX_QUEUE, used);
                        return;
                    }
                };
                popped += 1;
                let head = chain.head_index();
                self.transmit(&mem, chain);
                if self.tx.add_used(&self.mem, head, 0).is_err() {
                    bump(&self.counters.queue_errors, 1);
                }
                used = true;
            }
            match self.tx.enable_notification(&self.mem) {
                Ok(false) => break,
                // More arrived: another round, unless the ring says there is more and yields
                // nothing (a lying avail index), which would spin.
                Ok(true) if popped == 0 && round > 1 => {
                    bump(&self.counters.queue_errors, 1);
                    break;
                }
                Ok(true) if round == MAX_ROUNDS => {
                    // Let RX and stop events in, then come back.
                    let _ = self.tx_event.write(1);
                }
                Ok(true) => {}
                Err(_) => {
                    bump(&self.counters.queue_errors, 1);
                    break;
                }
            }
        }
        self.signal_used(TX_QUEUE, used);
    }

    fn transmit(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) {
        let Ok(mut reader) = Reader::new(mem, chain) else {
            bump(&self.counters.tx_dropped_malformed, 1);
            return;
        };
        let total = reader.available_bytes();
        if total < NET_HDR_LEN || total - NET_HDR_LEN > MAX_FRAME {
            bump(&self.counters.tx_dropped_malformed, 1);
            return;
        }
        let len = total - NET_HDR_LEN;
        let mut header = [0u8; NET_HDR_LEN];
        if reader.read_exact(&mut header).is_err()
            || reader.read_exact(&mut self.tx_buf[..len]).is_err()
        {
            bump(&self.counters.tx_dropped_malformed, 1);
            return;
        }
        match self.link.send_frame(&self.tx_buf[..len]) {
            Ok(_) => {
                bump(&self.counters.tx_frames, 1);
                bump(&self.counters.tx_bytes, len as u64);
            }
            Err(_) => bump(&self.counters.tx_link_errors, 1),
        }
    }

    /// Receive: frames from the link into RX buffers while both last.
    fn process_rx(&mut self) {
        let mem = self.mem.clone();
        let mut delivered = false;
        let mut rechecked = false;
        let budget = 2 * usize::from(self.rx.size()).max(1);
        let mut done = false;
        for _ in 0..budget {
            let len = match self.pending {
                Some(len) => len,
                None => match self.link.recv_frame(&mut self.rx_buf) {
                    Ok(len) => {
                        self.pending = Some(len);
                        len
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        done = true;
                        break;
                    }
                    Err(_) => {
                        // The link is broken (a TAP whose interface was deleted): stop reading
                        // it rather than spin on a readable error.
                        bump(&self.counters.rx_link_errors, 1);
                        self.set_link_armed(false);
                        self.signal_used(RX_QUEUE, delivered);
                        return;
                    }
                },
            };
            match Self::pop(&mut self.rx, &mem, &self.counters) {
                Ok(Some(chain)) => {
                    rechecked = false;
                    if self.receive(&mem, chain, len) {
                        delivered = true;
                    }
                }
                Ok(None) => match self.rx.enable_notification(&self.mem) {
                    // A buffer arrived while we looked: take it.
                    Ok(true) if !rechecked => rechecked = true,
                    Ok(false) => {
                        bump(&self.counters.rx_waits_for_buffers, 1);
                        self.set_link_armed(false);
                        self.signal_used(RX_QUEUE, delivered);
                        return;
                    }
                    // "More" that never comes: a lying avail index. Wait for a notify.
                    Ok(true) | Err(_) => {
                        bump(&self.counters.queue_errors, 1);
                        self.set_link_armed(false);
                        self.signal_used(RX_QUEUE, delivered);
                        return;
                    }
                },
                Err(RingBroken) => {
                    self.set_link_armed(false);
                    self.signal_used(RX_QUEUE, delivered);
                    return;
                }
            }
        }
        if done {
            self.set_link_armed(true);
        } else {
            // Budget spent with frames and buffers left: come back after the other events.
            let _ = self.rx_event.write(1);
        }
        self.signal_used(RX_QUEUE, delivered);
    }

    /// Puts the pending frame of `len` bytes into `chain`. Returns whether a used entry was added.
    fn receive(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        len: usize,
    ) -> bool {
        let head = chain.head_index();
        let writer = Writer::new(mem, chain);
        let used_len = match writer {
            Err(_) => {
                // A buffer outside guest memory: hand it back empty, keep the frame for the
                // next buffer. Linux counts it as a length error.
                bump(&self.counters.rx_bad_buffers, 1);
                0
            }
            Ok(writer) if writer.available_bytes() < NET_HDR_LEN + len => {
                // Too big for this buffer, and the driver posts buffers of one size: drop the
                // frame, keep the buffer for the next one.
                bump(&self.counters.rx_dropped_too_big, 1);
                self.pending = None;
                self.rx.go_to_previous_position();
                return false;
            }
            Ok(mut writer) => {
                let mut header = [0u8; NET_HDR_LEN];
                header[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
                    .copy_from_slice(&1u16.to_le_bytes());
                if writer.write_all(&header).is_ok()
                    && writer.write_all(&self.rx_buf[..len]).is_ok()
                {
                    self.pending = None;
                    bump(&self.counters.rx_frames, 1);
                    bump(&self.counters.rx_bytes, len as u64);
                    (NET_HDR_LEN + len) as u32
                } else {
                    bump(&self.counters.rx_bad_buffers, 1);
                    0
                }
            }
        };
        if self.rx.add_used(&self.mem, head, used_len).is_err() {
            bump(&self.counters.queue_errors, 1);
        }
        true
    }

    fn set_link_armed(&mut self, armed: bool) {
        if self.link_armed == armed {
            return;
        }
        let events = if armed {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        if self
            .epoll
            .ctl(
                ControlOperation::Modify,
                self.link_fd,
                EpollEvent::new(events, Token::Link as u64),
            )
            .is_ok()
        {
            self.link_armed = armed;
        }
    }

    /// Raises the interrupt after used-ring updates, unless the driver suppressed it.
    fn signal_used(&mut self, queue: usize, used: bool) {
        if !used {
            return;
        }
        let q = if queue == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        };
        let wanted = match q.needs_notification(&self.mem) {
            // With EVENT_IDX, needs_notification() read used_event; without it, the driver's
            // VRING_AVAIL_F_NO_INTERRUPT flag (avail ring offset 0) decides.
            Ok(true) if !self.event_idx => self
                .mem
                .read_obj::<u16>(GuestAddress(q.avail_ring()))
                .map_or(true, |flags| {
                    u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0
                }),
            Ok(wanted) => wanted,
            Err(_) => true,
        };
        if wanted {
            bump(&self.counters.interrupts, 1);
            self.interrupt.signal(interrupt::USED_BUFFER);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::driver::{wait_until, Buffer, GuestDriver, QueueLayout};
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::status;
    use std::sync::Mutex;
    use std::time::Duration;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const RAM: u64 = 4 << 20;
    const QSIZE: u16 = 16;
    const DATA: u64 = 0x10_0000;
    const WAIT: Duration = Duration::from_secs(10);

    struct Rig {
        mem: GuestMemoryMmap,
        driver: GuestDriver,
        transport: Arc<Mutex<MmioTransport>>,
        counters: Arc<NetCounters>,
        peer: UnixDatagram,
    }

    fn rig(features: u64) -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let net = Net::new(Box::new(ours), MAC);
        let counters = net.counters();
        let transport = Arc::new(Mutex::new(
            MmioTransport::new(mem.clone(), Box::new(net)).unwrap(),
        ));
        let mut driver = GuestDriver::new(mem.clone(), transport.clone());
        let s = driver.init(
            features,
            &[
                QueueLayout::at(0x1_0000, QSIZE),
                QueueLayout::at(0x2_0000, QSIZE),
            ],
        );
        assert_ne!(s & status::DRIVER_OK, 0, "status {s:#x}");
        assert_eq!(s & status::DEVICE_NEEDS_RESET, 0);
        peer.set_read_timeout(Some(WAIT)).unwrap();
        Rig {
            mem,
            driver,
            transport,
            counters,
            peer,
        }
    }

    fn frame(len: usize, tag: u8) -> Vec<u8> {
        let mut f = vec![tag; len];
        f[..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&MAC);
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        f
    }

    fn all_features() -> u64 {
        u64::MAX
    }

    #[test]
    fn configuration_space_has_mac_and_link_up() {
        let r = rig(all_features());
        assert_eq!(r.driver.read_config(0, 6), MAC);
        assert_eq!(r.driver.read_config(6, 2), vec![1, 0]);
        assert_eq!(r.driver.read_config(8, 4), vec![0; 4]);
        assert_eq!(
            r.driver
                .read_reg(crate::devices::virtio::mmio::reg::DEVICE_ID),
            1
        );
    }

    #[test]
    fn transmitted_chain_becomes_one_frame_on_the_link() {
        for features in [all_features(), features::VERSION_1] {
            let mut r = rig(features);
            let f = frame(300, 0xab);
            // Header and the first bytes in one descriptor, the rest in another: layout is free
            // with VERSION_1.
            r.mem
                .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(DATA))
                .unwrap();
            r.mem
                .write_slice(&f[..100], GuestAddress(DATA + 12))
                .unwrap();
            r.mem
                .write_slice(&f[100..], GuestAddress(DATA + 0x1000))
                .unwrap();
            let head = r.driver.publish(
                TX_QUEUE,
                &[
                    Buffer {
                        addr: DATA,
                        len: 112,
                        device_writes: false,
                    },
                    Buffer {
                        addr: DATA + 0x1000,
                        len: 200,
                        device_writes: false,
                    },
                ],
            );
            r.driver.notify(TX_QUEUE);
            let mut got = vec![0u8; 2048];
            let n = r.peer.recv(&mut got).unwrap();
            assert_eq!(&got[..n], &f[..]);
            assert!(r.driver.wait_used(TX_QUEUE, 1, WAIT));
            assert_eq!(r.driver.take_used(TX_QUEUE), vec![(u32::from(head), 0)]);
            let s = r.counters.snapshot();
            assert_eq!((s.tx_frames, s.tx_bytes), (1, 300));
            assert!(wait_until(WAIT, || r
                .transport
                .lock()
                .unwrap()
                .interrupt()
                .raised()
                >= 1));
            assert_eq!(
                r.transport.lock().unwrap().interrupt().status() & interrupt::USED_BUFFER,
                1
            );
        }
    }

    #[test]
    fn frame_from_the_link_lands_in_a_receive_buffer_with_a_zero_header() {
        let mut r = rig(all_features());
        let head = r.driver.publish(
            RX_QUEUE,
            &[Buffer {
                addr: DATA,
                len: 1526,
                device_writes: true,
            }],
        );
        r.driver.notify(RX_QUEUE);
        let f = frame(60, 0x11);
        r.peer.send(&f).unwrap();
        assert!(r.driver.wait_used(RX_QUEUE, 1, WAIT));
        assert_eq!(
            r.driver.take_used(RX_QUEUE),
            vec![(u32::from(head), (NET_HDR_LEN + 60) as u32)]
        );
        let mut got = vec![0u8; NET_HDR_LEN + 60];
        r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(&got[..10], &[0; 10]);
        assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
        assert_eq!(&got[12..], &f[..]);
        let s = r.counters.snapshot();
        assert_eq!((s.rx_frames, s.rx_bytes), (1, 60));
    }

    #[test]
    fn frames_wait_for_buffers_and_arrive_in_order() {
        let mut r = rig(all_features());
        for tag in 1..=3u8 {
            r.peer.send(&frame(64 + usize::from(tag), tag)).unwrap();
        }
        assert!(wait_until(WAIT, || r
            .counters
            .snapshot()
            .rx_waits_for_buffers
            >= 1));
        for i in 0..3u64 {
            r.driver.publish(
                RX_QUEUE,
                &[Buffer {
                    addr: DATA + i * 0x1000,
                    len: 2048,
                    device_writes: true,
                }],
            );
            r.driver.notify(RX_QUEUE);
            assert!(r.driver.wait_used(RX_QUEUE, 1, WAIT));
            let used = r.driver.take_used(RX_QUEUE);
            assert_eq!(used.len(), 1);
            let tag = i as u8 + 1;
            assert_eq!(used[0].1 as usize, NET_HDR_LEN + 64 + usize::from(tag));
            let mut byte = [0u8];
            r.mem
                .read_slice(&mut byte, GuestAddress(DATA + i * 0x1000 + 12 + 20))
                .unwrap();
            assert_eq!(byte[0], tag);
        }
        let s = r.counters.snapshot();
        assert_eq!(s.rx_frames, 3);
        assert_eq!(s.rx_dropped_too_big, 0);
    }

    #[test]
    fn a_frame_too_big_for_the_buffer_is_dropped_and_counted_and_the_buffer_reused() {
        let mut r = rig(all_features());
        let head = r.driver.publish(
            RX_QUEUE,
            &[Buffer {
                addr: DATA,
                len: (NET_HDR_LEN + 100) as u32,
                device_writes: true,
            }],
        );
        r.driver.notify(RX_QUEUE);
        r.peer.send(&frame(200, 1)).unwrap();
        r.peer.send(&frame(50, 2)).unwrap();
        assert!(r.driver.wait_used(RX_QUEUE, 1, WAIT));
        assert_eq!(
            r.driver.take_used(RX_QUEUE),
            vec![(u32::from(head), (NET_HDR_LEN + 50) as u32)]
        );
        let s = r.counters.snapshot();
        assert_eq!((s.rx_dropped_too_big, s.rx_frames), (1, 1));
    }

    #[test]
    fn hostile_transmit_chains_are_returned_and_counted() {
        let mut r = rig(all_features());
        // Outside guest RAM; shorter than the header; a self-referencing loop; longer than
        // MAX_FRAME (spread over many descriptors of the same 64 KiB).
        r.driver.publish(
            TX_QUEUE,
            &[Buffer {
                addr: RAM - 8,
                len: 64,
                device_writes: false,
            }],
        );
        r.driver.publish(
            TX_QUEUE,
            &[Buffer {
                addr: DATA,
                len: 4,
                device_writes: false,
            }],
        );
        let head = r.driver.publish(
            TX_QUEUE,
            &[Buffer {
                addr: DATA,
                len: 64,
                device_writes: false,
            }],
        );
        r.driver.write_descriptor(TX_QUEUE, head, DATA, 64, 1, head);
        r.driver.publish(
            TX_QUEUE,
            &[
                Buffer {
                    addr: DATA,
                    len: 0xffff,
                    device_writes: false,
                },
                Buffer {
                    addr: DATA,
                    len: 0xffff,
                    device_writes: false,
                },
            ],
        );
        r.driver.notify(TX_QUEUE);
        assert!(r.driver.wait_used(TX_QUEUE, 4, WAIT));
        assert_eq!(r.driver.take_used(TX_QUEUE).len(), 4);
        let s = r.counters.snapshot();
        assert_eq!(s.tx_dropped_malformed, 3, "{s:?}");
        // The loop is cut at the queue size by virtio-queue: 16 × 64 bytes went out as one frame.
        assert_eq!(s.tx_frames, 1, "{s:?}");
        let mut got = vec![0u8; 4096];
        assert_eq!(
            r.peer.recv(&mut got).unwrap(),
            usize::from(QSIZE) * 64 - NET_HDR_LEN
        );

        // The device still works.
        r.mem
            .write_slice(&frame(80, 9), GuestAddress(DATA + 0x2000 + 12))
            .unwrap();
        r.driver.publish(
            TX_QUEUE,
            &[Buffer {
                addr: DATA + 0x2000,
                len: 92,
                device_writes: false,
            }],
        );
        r.driver.notify(TX_QUEUE);
        assert_eq!(r.peer.recv(&mut got).unwrap(), 80);
    }

    #[test]
    fn a_lying_available_index_neither_hangs_nor_crashes() {
        let r = rig(all_features());
        r.driver.set_avail_idx(TX_QUEUE, 1000);
        r.driver.notify(TX_QUEUE);
        r.driver.set_avail_idx(RX_QUEUE, 500);
        r.driver.notify(RX_QUEUE);
        r.peer.send(&frame(60, 1)).unwrap();
        assert!(wait_until(WAIT, || r.counters.snapshot().queue_errors >= 2));
        // A reset still stops the thread promptly (the test would hang otherwise).
        r.driver
            .write_reg(crate::devices::virtio::mmio::reg::STATUS, 0);
        assert!(!r.transport.lock().unwrap().is_active());
    }

    #[test]
    fn receive_buffers_outside_memory_are_returned_empty() {
        let mut r = rig(all_features());
        let bad = r.driver.publish(
            RX_QUEUE,
            &[Buffer {
                addr: RAM + 0x1000,
                len: 2048,
                device_writes: true,
            }],
        );
        let good = r.driver.publish(
            RX_QUEUE,
            &[Buffer {
                addr: DATA,
                len: 2048,
                device_writes: true,
            }],
        );
        r.driver.notify(RX_QUEUE);
        r.peer.send(&frame(70, 3)).unwrap();
        assert!(r.driver.wait_used(RX_QUEUE, 2, WAIT));
        assert_eq!(
            r.driver.take_used(RX_QUEUE),
            vec![
                (u32::from(bad), 0),
                (u32::from(good), (NET_HDR_LEN + 70) as u32)
            ]
        );
        assert_eq!(r.counters.snapshot().rx_bad_buffers, 1);
    }

    #[test]
    fn interrupts_respect_suppression() {
        // EVENT_IDX: used_event far ahead means "do not interrupt yet".
        let mut r = rig(all_features());
        r.driver.set_used_event(TX_QUEUE, 100);
        r.mem
            .write_slice(&frame(60, 1), GuestAddress(DATA + 12))
            .unwrap();
        r.driver.publish(
            TX_QUEUE,
            &[Buffer {
                addr: DATA,
                len: 72,
                device_writes: false,
            }],
        );
        r.driver.notify(TX_QUEUE);
        assert!(r.driver.wait_used(TX_QUEUE, 1, WAIT));
        assert_eq!(r.counters.snapshot().interrupts, 0);
        // used_event = 1: the next used entry (index 1 → 2) crosses it.
        r.driver.take_used(TX_QUEUE);
        r.driver.set_used_event(TX_QUEUE, 1);
        r.driver.publish(
            TX_QUEUE,
            &[Buffer {
                addr: DATA,
                len: 72,
                device_writes: false,
            }],
        );
        r.driver.notify(TX_QUEUE);
        assert!(wait_until(WAIT, || r.counters.snapshot().interrupts == 1));

        // Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT.
        let mut r = rig(features::VERSION_1 | F_MAC);
        r.driver.set_avail_flags(TX_QUEUE, 1);
        r.mem
            .write_slice(&frame(60, 1), GuestAddress(DATA + 12))
            .unwrap();
        r.driver.publish(
            TX_QUEUE,
            &[Buffer {
                addr: DATA,
                len: 72,
                device_writes: false,
            }],
        );
        r.driver.notify(TX_QUEUE);
        assert!(r.driver.wait_used(TX_QUEUE, 1, WAIT));
        assert_eq!(r.counters.snapshot().interrupts, 0);
        r.driver.set_avail_flags(TX_QUEUE, 0);
        r.driver.publish(
            TX_QUEUE,
            &[Buffer {
                addr: DATA,
                len: 72,
                device_writes: false,
            }],
        );
        r.driver.notify(TX_QUEUE);
        assert!(wait_until(WAIT, || r.counters.snapshot().interrupts == 1));
    }

    #[test]
    fn reset_gives_the_link_back_and_the_device_runs_again() {
        let mut r = rig(all_features());
        r.driver
            .write_reg(crate::devices::virtio::mmio::reg::STATUS, 0);
        assert!(!r.transport.lock().unwrap().is_active());
        let s = r.driver.init(
            all_features(),
            &[
                QueueLayout::at(0x3_0000, QSIZE),
                QueueLayout::at(0x4_0000, QSIZE),
            ],
        );
        assert_ne!(s & status::DRIVER_OK, 0);
        r.mem
            .write_slice(&frame(60, 7), GuestAddress(DATA + 12))
            .unwrap();
        r.driver.publish(
            TX_QUEUE,
            &[Buffer {
                addr: DATA,
                len: 72,
                device_writes: false,
            }],
        );
        r.driver.notify(TX_QUEUE);
        let mut got = [0u8; 128];
        assert_eq!(r.peer.recv(&mut got).unwrap(), 60);
        assert_eq!(got[20], 7);
    }
}
