//! The virtio-net device as its transport sees it: device type, features, queue sizes, the
//! configuration space (MAC address, link status), and the backend thread's life (started on
//! activation, stopped on reset or drop, the link handed back each time).
//!
//! Owns: [`Net`], its configuration space and its worker thread.
//! Must not: move frames itself (the backend thread does), or lose the link when the thread
//! stops (it comes back with the thread's result, unless the thread panicked).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{Backend, MemBackend, Token};
use super::guest_queue::GuestQueue;
use super::link::FrameBatch;
use super::memlink::MemLinkEnd;
use super::{FrameLink, NetCounters, MAX_FRAME, NET_FEATURES, NET_QUEUE_SIZES, S_LINK_UP};

/// The backend thread's state, by attachment.
enum Thread {
    Frames(Box<Backend>),
    Memory(MemBackend),
}
use crate::devices::virtio::{
    features, read_config_bytes, Activation, VirtioDevice, VirtioError, DEVICE_ID_NET,
};
use crate::devices::{panic_message, DeviceFault};

struct Worker {
    stop: EventFd,
    handle: JoinHandle<Attachment>,
}

/// What a device's frames travel over.
pub(super) enum Attachment {
    /// A file descriptor (TAP, VXLAN socket, datagram socket): one system call per frame.
    Frames(Box<dyn FrameLink>),
    /// An in-process link by memory ([`MemLinkEnd`]).
    Memory(MemLinkEnd),
}

/// A virtio-net device. Wrap it in an [`crate::devices::virtio::mmio::MmioTransport`].
pub struct Net {
    config: [u8; 8],
    link: Option<Attachment>,
    /// The end of a memory link, kept to detach it even if the backend thread dies.
    memory_end: Option<MemLinkEnd>,
    /// The claim on the memory link's side while the device runs.
    memory_generation: u64,
    counters: Arc<NetCounters>,
    worker: Option<Worker>,
    /// The backend thread's name (the VM's, so failpoints and `ps` can tell them apart).
    thread_name: String,
    /// Where a panicking backend thread reports (None: it only logs, the device goes quiet).
    fault: Option<Arc<DeviceFault>>,
}

impl Net {
    /// A device with MAC address `mac` whose frames go to `link`.
    pub fn new(link: Box<dyn FrameLink>, mac: [u8; 6]) -> Net {
        Net::attached(Attachment::Frames(link), mac)
    }

    /// A device with MAC address `mac` on one end of an in-process link by memory.
    pub fn with_memory_link(end: MemLinkEnd, mac: [u8; 6]) -> Net {
        let mut net = Net::attached(Attachment::Memory(end.clone()), mac);
        net.memory_end = Some(end);
        net
    }

    fn attached(link: Attachment, mac: [u8; 6]) -> Net {
        let mut config = [0u8; 8];
        // struct virtio_net_config (§5.1.4): mac[6], status (le16).
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        Net {
            config,
            link: Some(link),
            memory_end: None,
            memory_generation: 0,
            counters: Arc::new(NetCounters::default()),
            worker: None,
            thread_name: "vigil-virtio-net".into(),
            fault: None,
        }
    }

    /// Names the backend thread and gives it the VM's [`DeviceFault`]: a panic on that thread
    /// then stops the VM (with the panic as its reason) instead of leaving a deaf device.
    pub fn with_fault(mut self, thread_name: String, fault: Arc<DeviceFault>) -> Net {
        self.thread_name = thread_name;
        self.fault = Some(fault);
        self
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
                Err(_) => match &self.memory_end {
                    // A memory link's end is shared state: take it back so the queues leave
                    // the link (and the side can be claimed again).
                    Some(end) => {
                        log::error!("virtio-net: the backend thread panicked; link detached");
                        self.link = Some(Attachment::Memory(end.clone()));
                    }
                    None => {
                        log::error!("virtio-net: the backend thread panicked; the link is lost")
                    }
                },
            }
            if let Some(Attachment::Memory(end)) = &self.link {
                // Nothing of this guest's memory is touched by the link after this.
                end.detach(self.memory_generation);
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
        NET_FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &NET_QUEUE_SIZES
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
            writes,
        } = activation;
        let (Ok([rx, tx]), Ok([rx_event, tx_event])) = (
            <[Queue; 2]>::try_from(queues),
            <[EventFd; 2]>::try_from(queue_events),
        ) else {
            return Err(VirtioError::BadQueue(2));
        };
        let event_idx = acked_features & features::RING_EVENT_IDX != 0;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd)?;
        let stop_for_thread = stop.try_clone().map_err(VirtioError::EventFd)?;
        // Everything that can fail is set up before the link moves to the thread.
        let epoll = Epoll::new().map_err(VirtioError::Thread)?;
        let mut watched = vec![
            (rx_event.as_raw_fd(), Token::RxQueue),
            (tx_event.as_raw_fd(), Token::TxQueue),
            (stop.as_raw_fd(), Token::Stop),
        ];
        let link_fd = match self.link.as_ref().ok_or(VirtioError::NoBackend)? {
            Attachment::Frames(link) => Some(link.as_raw_fd()),
            Attachment::Memory(_) => None,
        };
        if let Some(fd) = link_fd {
            watched.push((fd, Token::Link));
        }
        for (fd, token) in watched {
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token as u64),
            ) {
                return Err(VirtioError::Thread(e));
            }
        }
        let link = self.link.take().ok_or(VirtioError::NoBackend)?;
        let backend = match link {
            Attachment::Frames(link) => Thread::Frames(Box::new(Backend {
                rx_batch: link.batch_slot().map(FrameBatch::new),
                rx_next: 0,
                tx_batch: link.batch_slot().map(FrameBatch::new),
                mem: Arc::new(mem),
                writes: writes.clone(),
                rx,
                tx,
                rx_event,
                tx_event,
                stop: stop_for_thread,
                interrupt,
                event_idx,
                link,
                link_fd: link_fd.unwrap_or(-1),
                link_armed: true,
                epoll,
                counters: self.counters.clone(),
                pending: None,
                rx_buf: vec![0; MAX_FRAME],
                tx_buf: vec![0; MAX_FRAME],
            })),
            Attachment::Memory(end) => {
                let queue = |q| {
                    GuestQueue::new(
                        mem.clone(),
                        q,
                        interrupt.clone(),
                        event_idx,
                        self.counters.clone(),
                    )
                    .with_device_writes(writes.clone())
                };
                self.memory_generation = end.claim();
                end.attach(self.memory_generation, queue(rx), queue(tx));
                Thread::Memory(MemBackend {
                    end,
                    rx_event,
                    tx_event,
                    stop: stop_for_thread,
                    epoll,
                })
            }
        };
        let (name, fault) = (self.thread_name.clone(), self.fault.clone());
        let handle = std::thread::Builder::new()
            .name(self.thread_name.clone())
            .spawn(move || {
                let run = || match backend {
                    Thread::Frames(b) => Attachment::Frames(b.run()),
                    Thread::Memory(b) => Attachment::Memory(b.run()),
                };
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                    Ok(link) => link,
                    Err(payload) => {
                        let why = format!(
                            "virtio-net device thread {name} panicked: {}",
                            panic_message(payload.as_ref())
                        );
                        match &fault {
                            Some(fault) => fault.fail(why),
                            None => log::error!("{why}"),
                        }
                        // The link went down with the thread: unwind on (the join sees it).
                        std::panic::resume_unwind(payload)
                    }
                }
            })
            .map_err(VirtioError::Thread)?;
        self.worker = Some(Worker { stop, handle });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}
