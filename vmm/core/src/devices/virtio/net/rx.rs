//! The receive path of a virtio-net device: frames from the link into the buffers the driver
//! posts, each behind a zero `virtio_net_hdr_v1` with num_buffers = 1.
//!
//! Owns: reading the link while receive buffers last (a batch per call where the link batches),
//! the frame waiting for a buffer and the rest of its batch, the drop of a frame too big for the
//! driver's buffers, handing back buffers outside guest memory.
//! Must not: lose a frame it read without counting it, allocate per frame (one buffer and one
//! batch, reused), or read the link while no buffer can take what it reads (the link is disarmed
//! meanwhile; a batch already read waits in order).

use std::io;

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};

use super::backend::{Backend, Held, RingBroken};
use super::counters::bump;
use super::segments::Segments;
use super::{NET_HDR_LEN, NUM_BUFFERS_OFFSET, RX_QUEUE};

impl Backend {
    /// Receive: frames from the link into RX buffers while both last.
    pub(super) fn process_rx(&mut self) {
        let mem = self.mem.clone();
        let mut delivered = false;
        let mut rechecked = false;
        let budget = 2 * usize::from(self.rx.size()).max(1);
        let mut done = false;
        let mut handled = 0;
        while handled < budget {
            let held = match self.hold_frame() {
                Ok(held) => held,
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
            };
            handled += 1;
            match Self::pop(&mut self.rx, &mem, &self.counters) {
                Ok(Some(chain)) => {
                    rechecked = false;
                    if self.receive(chain, held) {
                        delivered = true;
                    }
                }
                Ok(None) => match self.rx.enable_notification(&*self.mem) {
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

    /// The frame waiting for an RX buffer: the one held already, else the next of the last
    /// batch, else one read from the link now (a batch of them when the link batches).
    fn hold_frame(&mut self) -> io::Result<Held> {
        if let Some(held) = self.pending {
            return Ok(held);
        }
        loop {
            if let Some(batch) = &self.rx_batch {
                while self.rx_next < batch.len() {
                    let i = self.rx_next;
                    let len = batch.frame(i).len();
                    if len == 0 {
                        // A read that found nothing while a later one found a frame.
                        self.rx_next += 1;
                    } else if len >= batch.slot_size() {
                        // Cut to its slot: the interface's MTU grew. The link reads one frame
                        // per call from now on.
                        bump(&self.counters.rx_dropped_cut, 1);
                        self.rx_next += 1;
                    } else {
                        self.pending = Some(Held::Batch(i));
                        return Ok(Held::Batch(i));
                    }
                }
            }
            bump(&self.counters.rx_link_calls, 1);
            match (&mut self.rx_batch, self.link.batch_slot()) {
                (Some(batch), Some(slot)) if slot == batch.slot_size() => {
                    batch.clear();
                    self.rx_next = 0;
                    self.link.recv_batch(batch)?;
                }
                _ => {
                    let len = self.link.recv_frame(&mut self.rx_buf)?;
                    self.pending = Some(Held::Buf(len));
                    return Ok(Held::Buf(len));
                }
            }
        }
    }

    /// Puts the held frame into `chain`. Returns whether a used entry was added.
    fn receive(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, held: Held) -> bool {
        let frame: &[u8] = match (held, &self.rx_batch) {
            (Held::Buf(len), _) => &self.rx_buf[..len],
            (Held::Batch(i), Some(batch)) => batch.frame(i),
            (Held::Batch(_), None) => &[],
        };
        let len = frame.len();
        let head = chain.head_index();
        let mut to_bufs = Segments::new();
        let used_len = match to_bufs.fill_chain(chain, true, &self.writes) {
            None => {
                // A buffer outside guest memory: hand it back empty, keep the frame for the
                // next buffer. Linux counts it as a length error.
                bump(&self.counters.rx_bad_buffers, 1);
                0
            }
            Some(to) if to.total < NET_HDR_LEN + len => {
                // Too big for this buffer, and the driver posts buffers of one size: drop the
                // frame, keep the buffer for the next one.
                bump(&self.counters.rx_dropped_too_big, 1);
                self.release(held);
                self.rx.go_to_previous_position();
                return false;
            }
            Some(to) => {
                let mut header = [0u8; NET_HDR_LEN];
                header[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
                    .copy_from_slice(&1u16.to_le_bytes());
                to.write_at(0, &header);
                to.write_at(NET_HDR_LEN, frame);
                self.release(held);
                bump(&self.counters.rx_frames, 1);
                bump(&self.counters.rx_bytes, len as u64);
                (NET_HDR_LEN + len) as u32
            }
        };
        if self.rx.add_used(&*self.mem, head, used_len).is_err() {
            bump(&self.counters.queue_errors, 1);
        }
        true
    }

    /// The held frame is done with (delivered or dropped).
    #[inline]
    fn release(&mut self, held: Held) {
        self.pending = None;
        if let Held::Batch(i) = held {
            self.rx_next = i + 1;
        }
    }
}
