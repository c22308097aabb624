//! A micro-VM's idle doorbell. Its one vCPU polls its rings and, when nothing happened for a
//! while, rests in an idle exit (`vigil_wire::boot::IDLE_MMIO_ADDR`) for a bounded time. Whoever
//! gives it work wakes it at once: a producer of verdict records, and a network device that put
//! frames in its receive ring (the micro-VM suppresses interrupts, as it polls).
//!
//! No wake is lost: a ring always unparks the vCPU thread once it is known, and an unpark that
//! comes before the park makes the park return at once (`std::thread::park`'s token). A ring
//! while the micro-VM is busy costs one atomic operation, and at most one idle round later.
//!
//! Owns: the resting vCPU thread's handle, resting and ringing. Must not: block a ringer, or
//! keep a vCPU off its CPU longer than asked.

use std::sync::OnceLock;
use std::thread::Thread;
use std::time::Duration;

/// The doorbell of one micro-VM (it has one vCPU).
#[derive(Debug, Default)]
pub struct IdleDoorbell {
    /// The vCPU thread, recorded the first time it rests.
    thread: OnceLock<Thread>,
}

impl IdleDoorbell {
    /// Wakes the micro-VM if it rests, or makes its next rest return at once.
    #[inline]
    pub fn ring(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    /// The vCPU thread rests up to `limit`, unless `work_waiting` says there is work already; a
    /// ring ends the rest early.
    pub fn rest(&self, limit: Duration, work_waiting: impl FnOnce() -> bool) {
        let _ = self.thread.get_or_init(std::thread::current);
        if !work_waiting() {
            std::thread::park_timeout(limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_ring_ends_a_rest_and_one_before_it_is_not_lost() {
        let bell = Arc::new(IdleDoorbell::default());
        let resting = bell.clone();
        let vcpu = std::thread::spawn(move || {
            let started = Instant::now();
            resting.rest(Duration::from_secs(10), || false);
            started.elapsed()
        });
        // Rings before the thread recorded itself do nothing: ring until the rest ends.
        while !vcpu.is_finished() {
            bell.ring();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(vcpu.join().unwrap() < Duration::from_secs(5));
        // This thread rests once (recorded), is rung while not resting, then rests: at once.
        let here = IdleDoorbell::default();
        here.rest(Duration::from_millis(1), || false);
        here.ring();
        let started = Instant::now();
        here.rest(Duration::from_secs(10), || false);
        assert!(started.elapsed() < Duration::from_secs(5));
        // Work waiting: no rest at all.
        let started = Instant::now();
        here.rest(Duration::from_secs(10), || true);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
