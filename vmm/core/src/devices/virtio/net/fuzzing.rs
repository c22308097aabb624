//! The virtio-net data paths driven synchronously, for the fuzz targets (`fuzz-harness`): the same
//! [`Backend`] the device thread runs, built without the thread, so that one fuzz input (a hostile
//! driver's register writes, descriptors and avail ring) gives one deterministic run.
//!
//! Owns: [`InlineNet`], a [`VirtioDevice`] that keeps its backend instead of starting a thread.
//! Must not: be used outside tests and fuzzing (hidden from the docs; the VMM uses [`super::Net`]).

use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{Backend, Token};
use super::link::FrameBatch;
use super::{FrameLink, NetCounters, NetStats, MAX_FRAME, NET_FEATURES, NET_QUEUE_SIZES};
use crate::devices::virtio::{features, Activation, VirtioDevice, VirtioError, DEVICE_ID_NET};

/// Where the backend lives while the device is active (shared with the fuzz harness).
type Slot = Arc<Mutex<Option<Backend>>>;

/// A virtio-net device whose data paths run when the caller says so ([`InlineHandle`]).
pub struct InlineNet {
    config: [u8; 8],
    link: Option<Box<dyn FrameLink>>,
    counters: Arc<NetCounters>,
    backend: Slot,
}

/// Runs the data paths of an [`InlineNet`] after it moved into its transport.
#[derive(Clone)]
pub struct InlineHandle {
    backend: Slot,
    counters: Arc<NetCounters>,
}

impl InlineHandle {
    /// Drains the transmit queue once (what a TX notify does), if the device is active.
    pub fn process_tx(&self) {
        if let Some(b) = self
            .backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            b.process_tx();
        }
    }

    /// Moves frames from the link into receive buffers (what the link becoming readable does).
    pub fn process_rx(&self) {
        if let Some(b) = self
            .backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            b.process_rx();
        }
    }

    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }
}

impl InlineNet {
    pub fn new(link: Box<dyn FrameLink>, mac: [u8; 6]) -> InlineNet {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&super::S_LINK_UP.to_le_bytes());
        InlineNet {
            config,
            link: Some(link),
            counters: Arc::new(NetCounters::default()),
            backend: Arc::default(),
        }
    }

    pub fn handle(&self) -> InlineHandle {
        InlineHandle {
            backend: self.backend.clone(),
            counters: self.counters.clone(),
        }
    }

    fn stop(&mut self) {
        if let Some(b) = self
            .backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            self.link = Some(b.link);
        }
    }
}

impl VirtioDevice for InlineNet {
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
        crate::devices::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        self.stop();
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
        let link = self.link.take().ok_or(VirtioError::NoBackend)?;
        let link_fd = link.as_raw_fd();
        let epoll = Epoll::new().map_err(VirtioError::Thread)?;
        // Registered as the device thread does, so arming and disarming the link behave alike.
        let _ = epoll.ctl(
            ControlOperation::Add,
            link_fd,
            EpollEvent::new(EventSet::IN, Token::Link as u64),
        );
        *self.backend.lock().unwrap_or_else(|p| p.into_inner()) = Some(Backend {
            rx_batch: link.batch_slot().map(FrameBatch::new),
            rx_next: 0,
            tx_batch: link.batch_slot().map(FrameBatch::new),
            mem: Arc::new(mem),
            writes,
            rx,
            tx,
            rx_event,
            tx_event,
            stop: EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd)?,
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
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }
}
