//! The receive path of a virtio-net device: frames from the link into the buffers the driver
//! posts, each behind a zero `virtio_net_hdr_v1` with num_buffers = 1.
//!
//! Owns: reading the link while receive buffers last, the one frame waiting for a buffer, the
//! drop of a frame too big for the driver's buffers, handing back buffers outside guest memory.
//! Must not: lose a frame it read without counting it, allocate per frame (one buffer, reused),
//! or read the link while no buffer can take what it reads (the link is disarmed meanwhile).

use std::io::{self, Write};

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT, Writer};

use super::backend::{Backend, RingBroken};
use super::counters::bump;
use super::{NET_HDR_LEN, NUM_BUFFERS_OFFSET, RX_QUEUE};

impl Backend {
    /// Receive: frames from the link into RX buffers while both last.
    pub(super) fn process_rx(&mut self) {
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
}
