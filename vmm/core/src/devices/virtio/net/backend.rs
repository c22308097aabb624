//! The backend thread of one running virtio-net device: its event loop (queue notifications, the
//! link becoming readable, the stop event) and what both data paths share: taking chains off a
//! ring that may lie, arming the link, raising the used-buffer interrupt.
//!
//! Owns: everything the thread holds while the device runs ([`Backend`]), the epoll tokens.
//! Must not: block on anything but its epoll, spin on a ring whose indices are invalid, or raise
//! an interrupt the driver suppressed.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::counters::{bump, NetCounters};
use super::link::FrameBatch;
use super::memlink::MemLinkEnd;
use super::{FrameLink, RX_QUEUE, VRING_AVAIL_F_NO_INTERRUPT};
use crate::devices::virtio::{interrupt, Interrupt};
use crate::write_trap::DeviceWrites;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub(super) enum Token {
    RxQueue = 0,
    TxQueue = 1,
    Link = 2,
    Stop = 3,
}

/// What the backend thread owns while the device runs.
pub(super) struct Backend {
    /// Shared, so a data path can hold a handle of its own while `self` changes without
    /// cloning the memory map (a clone allocates).
    pub(super) mem: Arc<GuestMemoryMmap>,
    /// What of `mem` the device may write (receive buffers on guarded pages are refused).
    pub(super) writes: DeviceWrites,
    pub(super) rx: Queue,
    pub(super) tx: Queue,
    pub(super) rx_event: EventFd,
    pub(super) tx_event: EventFd,
    pub(super) stop: EventFd,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) event_idx: bool,
    pub(super) link: Box<dyn FrameLink>,
    pub(super) link_fd: RawFd,
    /// Whether the link is in the epoll set (it is not while a frame waits for RX buffers).
    pub(super) link_armed: bool,
    pub(super) epoll: Epoll,
    pub(super) counters: Arc<NetCounters>,
    /// A frame read from the link that no RX buffer has taken yet.
    pub(super) pending: Option<Held>,
    /// The frames of the last batched read (a link that batches), delivered in order.
    pub(super) rx_batch: Option<FrameBatch>,
    /// The next frame of `rx_batch` to deliver.
    pub(super) rx_next: usize,
    /// Frames gathered from the TX queue for the link's next batched write.
    pub(super) tx_batch: Option<FrameBatch>,
    pub(super) rx_buf: Vec<u8>,
    pub(super) tx_buf: Vec<u8>,
}

/// Where the frame waiting for an RX buffer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Held {
    /// `rx_buf[..len]`: read one frame per call.
    Buf(usize),
    /// Frame `i` of `rx_batch`.
    Batch(usize),
}

/// The backend thread of a device on an in-process link: its guest's TX kicks pump the outbound
/// direction, its RX kicks (buffers posted) the inbound one; the queues live in the link.
pub(super) struct MemBackend {
    pub(super) end: MemLinkEnd,
    pub(super) rx_event: EventFd,
    pub(super) tx_event: EventFd,
    pub(super) stop: EventFd,
    pub(super) epoll: Epoll,
}

impl MemBackend {
    /// Moves frames until told to stop; gives the link end back (still attached: the device
    /// detaches it after the join).
    pub(super) fn run(self) -> MemLinkEnd {
        // What waited before the device came up, either way.
        self.pump(self.end.side);
        self.pump(self.end.peer());
        let mut events = vec![EpollEvent::default(); 4];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-net: epoll_wait failed, device stopped: {e}");
                    return self.end;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    t if t == Token::Stop as u64 => {
                        let _ = self.stop.read();
                        return self.end;
                    }
                    t if t == Token::TxQueue as u64 => {
                        let _ = self.tx_event.read();
                        self.pump(self.end.side);
                    }
                    _ => {
                        let _ = self.rx_event.read();
                        self.pump(self.end.peer());
                    }
                }
            }
        }
    }

    /// Pumps direction `k`; with budget left over it comes back after the other events.
    fn pump(&self, k: usize) {
        if self.end.pump(k) {
            let again = if k == self.end.side {
                &self.tx_event
            } else {
                &self.rx_event
            };
            let _ = again.write(1);
        }
    }
}

/// A ring's indices are invalid: stop using it until the driver notifies again.
pub(super) struct RingBroken;

/// The `device.net` failpoint, checked at each wake-up: true when it says to stop (an error);
/// a panic happens inside.
fn failpoint_stops() -> bool {
    if crate::failpoints::check_thread("device.net").is_some() {
        log::error!("virtio-net: failpoint device.net (error): device stopped");
        return true;
    }
    false
}

impl Backend {
    /// Moves frames until told to stop; gives the link back.
    pub(super) fn run(mut self) -> Box<dyn FrameLink> {
        // The first pass is a wake-up too: a frame the guest queued before this thread ran
        // would otherwise move without one.
        if failpoint_stops() {
            return self.link;
        }
        // Work the driver queued before DRIVER_OK, or notified before the thread existed.
        self.process_tx();
        self.process_rx();
        let mut events = vec![EpollEvent::default(); 4];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-net: epoll_wait failed, device stopped: {e}");
                    return self.link;
                }
            };
            if failpoint_stops() {
                return self.link;
            }
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

    #[inline]
    pub(super) fn pop<'m>(
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

    #[inline]
    pub(super) fn set_link_armed(&mut self, armed: bool) {
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
    #[inline]
    pub(super) fn signal_used(&mut self, queue: usize, used: bool) {
        if !used {
            return;
        }
        let q = if queue == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        };
        let wanted = match q.needs_notification(&*self.mem) {
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
        } else {
            self.interrupt.wake_poller();
        }
    }
}
