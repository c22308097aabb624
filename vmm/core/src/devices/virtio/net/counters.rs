//! What a virtio-net device counts: frames and bytes each way, drops by cause, ring errors,
//! interrupts. The backend thread updates the counters; anyone holding the handle reads them.
//!
//! Owns: [`NetCounters`] (live, relaxed atomics) and [`NetStats`] (a copy, serializable).
//! Must not: cost the data path more than one relaxed atomic add per count and batch (frames and
//! bytes are tallied per batch: see [`Tally`]).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live counters of one device, updated by its backend thread.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub(super) rx_frames: AtomicU64,
    pub(super) rx_bytes: AtomicU64,
    pub(super) rx_dropped_too_big: AtomicU64,
    pub(super) rx_bad_buffers: AtomicU64,
    pub(super) rx_waits_for_buffers: AtomicU64,
    pub(super) rx_link_errors: AtomicU64,
    pub(super) tx_frames: AtomicU64,
    pub(super) tx_bytes: AtomicU64,
    pub(super) tx_dropped_malformed: AtomicU64,
    pub(super) tx_link_errors: AtomicU64,
    pub(super) queue_errors: AtomicU64,
    pub(super) interrupts: AtomicU64,
    pub(super) rx_dropped_cut: AtomicU64,
    pub(super) rx_link_calls: AtomicU64,
    pub(super) tx_link_calls: AtomicU64,
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
    /// Frames a batched read cut to its slot (the interface's MTU grew after it opened): dropped;
    /// the link reads one frame per call from then on.
    pub rx_dropped_cut: u64,
    /// System calls that read the link (one per frame, or one per batch) and that wrote it:
    /// frames over calls is the batching achieved.
    pub rx_link_calls: u64,
    pub tx_link_calls: u64,
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
            rx_dropped_cut: get(&self.rx_dropped_cut),
            rx_link_calls: get(&self.rx_link_calls),
            tx_link_calls: get(&self.tx_link_calls),
        }
    }
}

/// Adds `by` to a counter (relaxed: counters order nothing).
#[inline]
pub(super) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Frames and bytes of one batch, counted in registers and added to the live counters once at
/// its end. Why: a locked add per frame waits for the frame's own stores into the peer guest's
/// cache lines to drain; perf put 70-85% of `HostPort::send`'s samples on those adds.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Tally {
    frames: u64,
    bytes: u64,
}

impl Tally {
    #[inline]
    pub(super) fn add(&mut self, bytes: usize) {
        self.frames += 1;
        self.bytes += bytes as u64;
    }

    pub(super) fn merge(&mut self, other: Tally) {
        self.frames += other.frames;
        self.bytes += other.bytes;
    }

    /// Adds the batch to `frames` and `bytes` (nothing when the batch was empty).
    #[inline]
    pub(super) fn flush(self, frames: &AtomicU64, bytes: &AtomicU64) {
        if self.frames > 0 {
            bump(frames, self.frames);
            bump(bytes, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_copies_every_counter_to_its_own_field() {
        let c = NetCounters::default();
        let fields = [
            &c.rx_frames,
            &c.rx_bytes,
            &c.rx_dropped_too_big,
            &c.rx_bad_buffers,
            &c.rx_waits_for_buffers,
            &c.rx_link_errors,
            &c.tx_frames,
            &c.tx_bytes,
            &c.tx_dropped_malformed,
            &c.tx_link_errors,
            &c.queue_errors,
            &c.interrupts,
            &c.rx_dropped_cut,
            &c.rx_link_calls,
            &c.tx_link_calls,
        ];
        for (i, counter) in fields.iter().enumerate() {
            bump(counter, i as u64 + 1);
        }
        let s = c.snapshot();
        assert_eq!(
            [
                s.rx_frames,
                s.rx_bytes,
                s.rx_dropped_too_big,
                s.rx_bad_buffers,
                s.rx_waits_for_buffers,
                s.rx_link_errors,
                s.tx_frames,
                s.tx_bytes,
                s.tx_dropped_malformed,
                s.tx_link_errors,
                s.queue_errors,
                s.interrupts,
                s.rx_dropped_cut,
                s.rx_link_calls,
                s.tx_link_calls,
            ],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
        );
        assert_eq!(NetCounters::default().snapshot(), NetStats::default());
    }
}
