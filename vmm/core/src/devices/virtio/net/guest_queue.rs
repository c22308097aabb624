//! One guest's virtqueue lent to an in-process link ([`super::memlink`]): its used entries
//! published a batch at a time, and the interrupt decision after them.
//!
//! Owns: [`GuestQueue`] and [`Completions`].
//! Must not: trust a head index or ring address from the guest (a head past the table and an
//! address outside its memory are counted as queue errors, never written), or publish the used
//! index before the entries it covers.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::counters::{bump, NetCounters};
use super::VRING_AVAIL_F_NO_INTERRUPT;
use crate::devices::virtio::{interrupt, Interrupt};

/// The most used entries one batch publishes at once.
pub(super) const BATCH: usize = 256;

/// Bytes ahead of the first entry of the avail ring and of the used ring (flags, idx).
const AVAIL_RING_HEADER: u64 = 4;
const USED_RING_HEADER: u64 = 4;

/// Used entries (head, length) of one batch, published together ([`GuestQueue::publish`]).
pub(super) struct Completions {
    at: [(u16, u32); BATCH],
    pub(super) count: usize,
}

impl Completions {
    pub(super) fn new() -> Completions {
        Completions {
            at: [(0, 0); BATCH],
            count: 0,
        }
    }

    #[inline]
    pub(super) fn is_full(&self) -> bool {
        self.count == BATCH
    }

    /// Adds one entry; the caller checks `is_full` first (a full batch drops nothing: it is
    /// published before more chains are taken).
    #[inline]
    pub(super) fn push(&mut self, head: u16, len: u32) {
        if let Some(slot) = self.at.get_mut(self.count) {
            *slot = (head, len);
            self.count += 1;
        }
    }
}

/// One guest queue lent to a link by its device.
pub(super) struct GuestQueue {
    pub(super) mem: GuestMemoryMmap,
    pub(super) queue: Queue,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) event_idx: bool,
    pub(super) counters: Arc<NetCounters>,
    /// Used entries published since the last interrupt decision.
    added: Wrapping<u16>,
}

impl GuestQueue {
    pub(super) fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: Arc<Interrupt>,
        event_idx: bool,
        counters: Arc<NetCounters>,
    ) -> GuestQueue {
        GuestQueue {
            mem,
            queue,
            interrupt,
            event_idx,
            counters,
            added: Wrapping(0),
        }
    }

    /// One used entry on its own (the slow paths).
    #[inline]
    pub(super) fn add_used(&mut self, head: u16, len: u32) {
        let mut one = Completions::new();
        one.push(head, len);
        self.publish(&mut one);
    }

    /// Writes a batch's used entries, then moves the used index once (and empties `done`).
    /// Why not `Queue::add_used` per entry: it stores the index after every entry, and the
    /// driver polling that index on the other core takes its cache line away each time.
    pub(super) fn publish(&mut self, done: &mut Completions) {
        let entries = std::mem::take(&mut done.count);
        if entries == 0 {
            return;
        }
        let size = self.queue.size();
        let ring = GuestAddress(self.queue.used_ring());
        let mut next = Wrapping(self.queue.next_used());
        let mut written = Wrapping(0u16);
        for &(head, len) in &done.at[..entries] {
            // A head from the avail ring is the driver's word: one past the table is refused,
            // as `Queue::add_used` refuses it.
            let elem = (head < size)
                .then(|| ring.checked_add(USED_RING_HEADER + u64::from(next.0 % size) * 8))
                .flatten();
            let Some(elem) = elem else {
                bump(&self.counters.queue_errors, 1);
                continue;
            };
            // virtq_used_elem: le32 id, le32 len, in one store.
            let value = u64::from(head) | (u64::from(len) << 32);
            if self.mem.write_obj(value.to_le(), elem).is_err() {
                bump(&self.counters.queue_errors, 1);
                break;
            }
            next += 1;
            written += 1;
        }
        if written.0 == 0 {
            return;
        }
        // Release: the entries are visible before the index that publishes them.
        let index = ring
            .checked_add(2)
            .map(|at| self.mem.store(next.0.to_le(), at, Ordering::Release));
        if !matches!(index, Some(Ok(()))) {
            bump(&self.counters.queue_errors, 1);
            return;
        }
        self.queue.set_next_used(next.0);
        self.added += written;
    }

    /// Raises the used-buffer interrupt after used-ring updates, unless the driver suppressed it
    /// (`VIRTIO_F_EVENT_IDX`: unless the used index did not pass its `used_event`; without it:
    /// `VRING_AVAIL_F_NO_INTERRUPT`).
    #[inline]
    pub(super) fn signal_used(&mut self) {
        let added = std::mem::replace(&mut self.added, Wrapping(0));
        if added.0 == 0 {
            return;
        }
        // The used index is stored before the driver's word on interrupts is read.
        fence(Ordering::SeqCst);
        let avail = GuestAddress(self.queue.avail_ring());
        let wanted = if self.event_idx {
            let new = Wrapping(self.queue.next_used());
            let old = new - added;
            let used_event = avail
                .checked_add(AVAIL_RING_HEADER + 2 * u64::from(self.queue.size()))
                .and_then(|at| self.mem.load::<u16>(at, Ordering::Relaxed).ok());
            // The virtio spec's vring_need_event(used_event, new, old).
            used_event
                .is_none_or(|event| new - Wrapping(u16::from_le(event)) - Wrapping(1) < new - old)
        } else {
            self.mem.read_obj::<u16>(avail).map_or(true, |flags| {
                u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0
            })
        };
        if wanted {
            bump(&self.counters.interrupts, 1);
            self.interrupt.signal(interrupt::USED_BUFFER);
        } else {
            self.interrupt.wake_poller();
        }
    }

    /// Kicks off (the pump polls) or on (re-checked: `true` when more is available already).
    #[inline]
    pub(super) fn notifications(&mut self, on: bool) -> bool {
        if on {
            match self.queue.enable_notification(&self.mem) {
                Ok(more) => more,
                Err(_) => {
                    bump(&self.counters.queue_errors, 1);
                    false
                }
            }
        } else {
            let _ = self.queue.disable_notification(&self.mem);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn queue(event_idx: bool) -> GuestQueue {
        let mem = crate::anonymous_memory(1 << 20, true).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        GuestQueue::new(
            mem,
            q,
            Arc::new(Interrupt::new().unwrap()),
            event_idx,
            Arc::default(),
        )
    }

    fn used_idx(q: &GuestQueue) -> u16 {
        q.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn publish(q: &mut GuestQueue, entries: &[(u16, u32)]) {
        let mut done = Completions::new();
        for &(head, len) in entries {
            done.push(head, len);
        }
        q.publish(&mut done);
        assert_eq!(done.count, 0, "a published batch is emptied");
    }

    fn interrupts(q: &GuestQueue) -> u64 {
        q.counters.snapshot().interrupts
    }

    #[test]
    fn a_batch_lands_in_order_under_one_index_and_a_head_past_the_table_is_refused() {
        let mut q = queue(false);
        publish(&mut q, &[(3, 60), (SIZE, 1), (7, 1514)]);
        assert_eq!(used_idx(&q), 2, "the refused head takes no entry");
        assert_eq!(q.queue.next_used(), 2);
        let entry = |i: u64| -> (u32, u32) {
            let at = GuestAddress(USED + 4 + 8 * i);
            let id: u32 = q.mem.read_obj(at).unwrap();
            (id, q.mem.read_obj(at.unchecked_add(4)).unwrap())
        };
        assert_eq!((entry(0), entry(1)), ((3, 60), (7, 1514)));
        assert_eq!(q.counters.snapshot().queue_errors, 1);
        // The index wraps with the ring: 16 more entries land from slot 2 around to slot 1.
        publish(&mut q, &[(1, 1); SIZE as usize]);
        assert_eq!(used_idx(&q), 18);
    }

    #[test]
    fn with_event_idx_the_interrupt_comes_when_the_used_index_passes_used_event() {
        let mut q = queue(true);
        // used_event sits after the avail ring's entries.
        let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
        q.mem.write_obj(4u16, used_event).unwrap();
        publish(&mut q, &[(0, 1), (1, 1), (2, 1), (3, 1)]);
        q.signal_used();
        assert_eq!(
            interrupts(&q),
            0,
            "used index 4 has not passed used_event 4"
        );
        publish(&mut q, &[(4, 1), (5, 1)]);
        q.signal_used();
        assert_eq!(interrupts(&q), 1, "used index 6 passed it");
        q.signal_used();
        assert_eq!(interrupts(&q), 1, "nothing new, no interrupt");
        // Across the wrap of the 16-bit index.
        q.queue.set_next_used(u16::MAX - 1);
        q.mem.write_obj(u16::MAX, used_event).unwrap();
        publish(&mut q, &[(0, 1), (1, 1), (2, 1)]);
        assert_eq!(used_idx(&q), 1);
        q.signal_used();
        assert_eq!(interrupts(&q), 2);
    }

    #[test]
    fn without_event_idx_the_avail_flags_decide() {
        let mut q = queue(false);
        q.mem
            .write_obj(VRING_AVAIL_F_NO_INTERRUPT, GuestAddress(AVAIL))
            .unwrap();
        publish(&mut q, &[(0, 1)]);
        q.signal_used();
        assert_eq!(interrupts(&q), 0);
        q.mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        publish(&mut q, &[(1, 1)]);
        q.signal_used();
        assert_eq!(interrupts(&q), 1);
    }
}
