//! The transmit path of a virtio-net device: every chain the driver makes available becomes one
//! frame on the link (its `virtio_net_hdr_v1` read and ignored: no offloads are offered).
//!
//! Owns: draining the transmit queue, validating each chain (header present, frame not above
//! `MAX_FRAME`, inside guest memory), sending, counting.
//! Must not: allocate per frame (one buffer, reused), send part of a malformed chain, or drain
//! forever (a bounded number of rounds, then it yields to the other events).

use std::io::Read;

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, QueueT, Reader};

use super::backend::{Backend, RingBroken};
use super::counters::bump;
use super::{MAX_FRAME, MAX_ROUNDS, NET_HDR_LEN, TX_QUEUE};

impl Backend {
    /// Transmit: every available chain becomes one frame on the link.
    pub(super) fn process_tx(&mut self) {
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
}
