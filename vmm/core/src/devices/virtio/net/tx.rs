//! The transmit path of a virtio-net device: every chain the driver makes available becomes one
//! frame on the link (its `virtio_net_hdr_v1` read and ignored: no offloads are offered).
//!
//! Owns: draining the transmit queue, validating each chain (header present, frame not above
//! `MAX_FRAME`, inside guest memory), sending (gathered into batches where the link batches,
//! each sent when full and at the end of each round), counting.
//! Must not: allocate per frame (one buffer and one batch, reused), send part of a malformed
//! chain, reorder frames, or drain forever (a bounded number of rounds, then it yields to the
//! other events).

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, QueueT};

use super::backend::{Backend, RingBroken};
use super::counters::bump;
use super::segments::Segments;
use super::{MAX_FRAME, MAX_ROUNDS, NET_HDR_LEN, TX_QUEUE};

impl Backend {
    /// Transmit: every available chain becomes one frame on the link.
    pub(super) fn process_tx(&mut self) {
        // A handle of our own, so chains can borrow it while `self` changes.
        let mem = self.mem.clone();
        let mut used = false;
        for round in 1..=MAX_ROUNDS {
            // Kicks are useless while we drain; re-enabled below.
            let _ = self.tx.disable_notification(&*self.mem);
            let mut popped = 0usize;
            while popped < usize::from(self.tx.size()) {
                let chain = match Self::pop(&mut self.tx, &mem, &self.counters) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(RingBroken) => {
                        self.flush_tx();
                        self.signal_used(TX_QUEUE, used);
                        return;
                    }
                };
                popped += 1;
                let head = chain.head_index();
                self.transmit(chain);
                if self.tx.add_used(&*self.mem, head, 0).is_err() {
                    bump(&self.counters.queue_errors, 1);
                }
                used = true;
            }
            // The round's frames go out before the guest is told its buffers are free again
            // (they were copied, but a batch must not wait behind the next kick).
            self.flush_tx();
            match self.tx.enable_notification(&*self.mem) {
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

    fn transmit(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) {
        let mut from_bufs = Segments::new();
        let Some(from) = from_bufs.fill_chain(chain, false, &self.writes) else {
            bump(&self.counters.tx_dropped_malformed, 1);
            return;
        };
        if from.total < NET_HDR_LEN || from.total - NET_HDR_LEN > MAX_FRAME {
            bump(&self.counters.tx_dropped_malformed, 1);
            return;
        }
        // The header is ignored: no offloads are offered.
        let len = from.total - NET_HDR_LEN;
        // A batching link: gather the frame into the next slot; it goes out with the batch.
        if let Some(batch) = self.tx_batch.as_mut().filter(|b| len < b.slot_size()) {
            let Some(slot) = batch.next_slot() else {
                // Never full here: a full batch is flushed as soon as it fills.
                bump(&self.counters.tx_link_errors, 1);
                return;
            };
            from.read_at(NET_HDR_LEN, &mut slot[..len]);
            batch.commit(len);
            if batch.is_full() {
                self.flush_tx();
            }
            return;
        }
        from.read_at(NET_HDR_LEN, &mut self.tx_buf[..len]);
        // Frames gathered before this one go first.
        self.flush_tx();
        bump(&self.counters.tx_link_calls, 1);
        match self.link.send_frame(&self.tx_buf[..len]) {
            Ok(_) => {
                bump(&self.counters.tx_frames, 1);
                bump(&self.counters.tx_bytes, len as u64);
            }
            Err(_) => bump(&self.counters.tx_link_errors, 1),
        }
    }

    /// Sends the gathered batch, if any, in one call; counts what the link took and refused.
    pub(super) fn flush_tx(&mut self) {
        let Some(batch) = self.tx_batch.as_mut().filter(|b| !b.is_empty()) else {
            return;
        };
        bump(&self.counters.tx_link_calls, 1);
        let n = batch.len();
        let sent = self.link.send_batch(batch).unwrap_or(0).min(n);
        let bytes: usize = (0..sent).map(|i| batch.frame(i).len()).sum();
        bump(&self.counters.tx_frames, sent as u64);
        bump(&self.counters.tx_bytes, bytes as u64);
        bump(&self.counters.tx_link_errors, (n - sent) as u64);
        batch.clear();
    }
}
