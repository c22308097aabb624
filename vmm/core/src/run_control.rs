//! Pausing and resuming a running VM's vCPUs from another thread (the API).
//!
//! A pause request sets a flag and kicks every vCPU thread out of KVM_RUN with a signal; each vCPU
//! sees the flag at the top of its loop (between two exits, so no exit is half handled) and parks
//! until resumed or stopped. `pause` returns once every vCPU is parked: from then on no guest
//! instruction runs.
//!
//! A vCPU can also stop the others for a moment ([`RunControl::stop_others`]): it holds them
//! parked while it changes what every vCPU depends on (the memory slots of the write traps, the
//! breakpoints of the introspection), and they resume when the returned [`OthersStopped`] drops.
//! Such a hold and an API pause combine: a parked vCPU runs again only once neither holds it.
//!
//! Owns: the pause flag, the registry of a running VM's vCPU threads, their parking, and the
//! collection of the states they capture as they park.
//! Must not: issue KVM ioctls itself (each vCPU captures its own state on its own thread), or
//! block a caller past the limit it gave.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::snapshot::{SnapshotError, VcpuSnapshot};

/// Why a pause or a capture did not happen.
#[derive(Debug, Error)]
pub enum RunControlError {
    #[error("the VM is already paused: resume it first, or capture while running")]
    AlreadyPaused,
    #[error("the VM is not running")]
    NotRunning,
    #[error("{parked} of {vcpus} vCPUs parked after {ms} ms")]
    NotParked {
        parked: usize,
        vcpus: usize,
        ms: u128,
    },
    #[error("{captured} of {vcpus} vCPUs captured their state")]
    NotCaptured { captured: usize, vcpus: usize },
    #[error(transparent)]
    Capture(#[from] SnapshotError),
    #[error("another vCPU is already holding the others stopped")]
    Busy,
    #[error("the VM runs {running} vCPU threads, {vcpus} expected")]
    Threads { running: usize, vcpus: usize },
}

/// How often a parked vCPU looks at the VM's stop flag (stop requests do not notify this
/// control's condition variable).
const PARKED_STOP_POLL: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Parking {
    /// vCPU threads of the running VM (empty before `Vm::run` and after it returns).
    threads: Vec<libc::pthread_t>,
    parked: usize,
    /// Each parked vCPU's captured state, when the pause asked for it (by vCPU index).
    captured: std::collections::BTreeMap<u8, Result<VcpuSnapshot, SnapshotError>>,
}

#[derive(Default)]
pub struct RunControl {
    pause: AtomicBool,
    /// A vCPU holds the others parked ([`stop_others`](Self::stop_others)).
    held: AtomicBool,
    /// Parking vCPUs capture their state (a snapshot or a migration is under way).
    capture: AtomicBool,
    /// The VM's run was started but its vCPU threads are not registered yet: a pause or capture
    /// waits for them rather than finding the VM "not running" (a snapshot right after a boot).
    starting: AtomicBool,
    parking: Mutex<Parking>,
    changed: Condvar,
}

// SAFETY: pthread_t is an opaque thread id; it is only passed to pthread_kill.
unsafe impl Send for RunControl {}
// SAFETY: as above; all mutable state is behind the mutex.
unsafe impl Sync for RunControl {}

impl RunControl {
    pub fn is_paused(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// Whether a vCPU must park at the top of its loop: the VM is paused, or another vCPU holds
    /// the others stopped. (The holder itself is inside an exit handler while it holds.)
    pub(crate) fn must_park(&self) -> bool {
        self.is_paused() || self.held.load(Ordering::Acquire)
    }

    /// Parks every vCPU but the caller's (a vCPU thread, outside KVM_RUN) and returns once they
    /// are parked: from then until the returned guard drops, no other vCPU runs a guest
    /// instruction. `vcpus` is how many the VM has; with one, nothing is paused (the caller is
    /// the only vCPU and it is not in KVM_RUN). Fails when another vCPU holds them already, when
    /// the VM's threads are not all registered, or when they do not park within `limit`.
    pub(crate) fn stop_others(
        &self,
        vcpus: usize,
        limit: Duration,
    ) -> Result<OthersStopped<'_>, RunControlError> {
        if vcpus <= 1 {
            return Ok(OthersStopped { control: None });
        }
        if self
            .held
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(RunControlError::Busy);
        }
        let guard = OthersStopped {
            control: Some(self),
        };
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let deadline = Instant::now() + limit;
        let mut parking = self.parking.lock().unwrap_or_else(|p| p.into_inner());
        if parking.threads.len() != vcpus {
            return Err(RunControlError::Threads {
                running: parking.threads.len(),
                vcpus,
            });
        }
        loop {
            if parking.parked + 1 >= parking.threads.len() {
                return Ok(guard);
            }
            // The caller's own thread is not kicked: it is not in KVM_RUN.
            for &thread in parking.threads.iter().filter(|&&t| t != me) {
                // SAFETY: as in `pause`: registered threads are alive.
                unsafe { libc::pthread_kill(thread, vmm_sys_util::signal::SIGRTMIN()) };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RunControlError::NotParked {
                    parked: parking.parked,
                    vcpus: parking.threads.len() - 1,
                    ms: limit.as_millis(),
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(5));
            parking = self
                .changed
                .wait_timeout(parking, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn release_others(&self) {
        self.held.store(false, Ordering::Release);
        let _guard = self.parking.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }

    /// Says that the VM's run is about to start on another thread (before that thread is
    /// spawned): until it registers its vCPU threads, or stops, a pause or capture waits for it.
    pub fn mark_starting(&self) {
        self.starting.store(true, Ordering::Release);
    }

    /// The run announced by [`mark_starting`](Self::mark_starting) will not happen (its thread
    /// could not be spawned).
    pub fn cancel_start(&self) {
        self.starting.store(false, Ordering::Release);
        let _guard = self.parking.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }

    /// Registers the vCPU threads (`Vm::run`); an empty list when the VM stops.
    pub(crate) fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        self.starting.store(false, Ordering::Release);
        let mut parking = self.parking.lock().unwrap_or_else(|p| p.into_inner());
        parking.threads = threads;
        parking.parked = 0;
        self.changed.notify_all();
    }

    /// Pauses (see [`pause`](Self::pause)) and returns every vCPU's state, captured by the vCPU
    /// threads themselves as they park. The VM stays paused.
    pub fn pause_and_capture(&self, limit: Duration) -> Result<Vec<VcpuSnapshot>, RunControlError> {
        if self.is_paused() {
            return Err(RunControlError::AlreadyPaused);
        }
        let deadline = Instant::now() + limit;
        {
            let mut parking = self.parking.lock().unwrap_or_else(|p| p.into_inner());
            parking.captured.clear();
            // A run that was started registers its threads moments later.
            while parking.threads.is_empty() && self.starting.load(Ordering::Acquire) {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                parking = self
                    .changed
                    .wait_timeout(parking, (deadline - now).min(Duration::from_millis(5)))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if parking.threads.is_empty() {
                return Err(RunControlError::NotRunning);
            }
        }
        self.capture.store(true, Ordering::Release);
        let captured = self
            .pause(limit)
            .and_then(|()| self.wait_captured(deadline));
        self.capture.store(false, Ordering::Release);
        Ok(captured?.into_values().collect::<Result<_, _>>()?)
    }

    /// Waits until every parked vCPU has captured its state. A vCPU can still count as parked
    /// from a pause that a `resume` just ended (it has not woken yet): it sees the new pause and
    /// the capture request in its wait loop, and captures there.
    fn wait_captured(
        &self,
        deadline: Instant,
    ) -> Result<std::collections::BTreeMap<u8, Result<VcpuSnapshot, SnapshotError>>, RunControlError>
    {
        let mut parking = self.parking.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if parking.captured.len() >= parking.threads.len() {
                return Ok(std::mem::take(&mut parking.captured));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RunControlError::NotCaptured {
                    captured: parking.captured.len(),
                    vcpus: parking.threads.len(),
                });
            }
            // Wakes parked vCPUs so they see the capture request now, not at their next poll.
            self.changed.notify_all();
            let wait = (deadline - now).min(Duration::from_millis(5));
            parking = self
                .changed
                .wait_timeout(parking, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stops guest execution: returns once every vCPU is parked (immediately for a VM that does
    /// not run). Errors when the vCPUs do not all park within `limit` (the pause stays requested).
    pub fn pause(&self, limit: Duration) -> Result<(), RunControlError> {
        self.pause.store(true, Ordering::Release);
        let deadline = Instant::now() + limit;
        let mut parking = self.parking.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if parking.parked >= parking.threads.len() {
                return Ok(());
            }
            for &thread in &parking.threads {
                // SAFETY: the threads are alive while registered (Vm::run clears the list before
                // it joins them, under this mutex).
                unsafe { libc::pthread_kill(thread, vmm_sys_util::signal::SIGRTMIN()) };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RunControlError::NotParked {
                    parked: parking.parked,
                    vcpus: parking.threads.len(),
                    ms: limit.as_millis(),
                });
            }
            // Kicks can race with a vCPU entering KVM_RUN: kick again every few milliseconds.
            let wait = (deadline - now).min(Duration::from_millis(5));
            parking = self
                .changed
                .wait_timeout(parking, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
        let _guard = self.parking.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }

    /// Called by a vCPU thread that saw the pause flag: captures its state if asked (`capture`
    /// runs on the vCPU's own thread, which owns its file descriptor), then waits until resumed
    /// or `stop` is set.
    pub(crate) fn park(
        &self,
        stop: &AtomicBool,
        index: u8,
        mut capture: impl FnMut() -> Result<VcpuSnapshot, SnapshotError>,
    ) {
        let captured = self.capture.load(Ordering::Acquire).then(&mut capture);
        let mut parking = self.parking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(captured) = captured {
            parking.captured.insert(index, captured);
        }
        parking.parked += 1;
        self.changed.notify_all();
        while self.must_park() && !stop.load(Ordering::Acquire) {
            // A capture requested while this vCPU was already parked (a pause that follows a
            // resume before this thread woke) is taken here, on the vCPU's own thread.
            if self.capture.load(Ordering::Acquire) && !parking.captured.contains_key(&index) {
                drop(parking);
                let captured = capture();
                parking = self.parking.lock().unwrap_or_else(|p| p.into_inner());
                parking.captured.insert(index, captured);
                self.changed.notify_all();
                continue;
            }
            parking = self
                .changed
                .wait_timeout(parking, PARKED_STOP_POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        parking.parked = parking.parked.saturating_sub(1);
    }
}

/// The other vCPUs are parked while this lives ([`RunControl::stop_others`]); dropping it lets
/// them run again.
pub(crate) struct OthersStopped<'a> {
    /// None when the VM has one vCPU (nothing was stopped).
    control: Option<&'a RunControl>,
}

impl Drop for OthersStopped<'_> {
    fn drop(&mut self) {
        if let Some(control) = self.control {
            control.release_others();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use super::*;

    /// A stand-in for a vCPU loop: counts "guest instructions" unless it must park.
    fn fake_vcpu(
        control: Arc<RunControl>,
        stop: Arc<AtomicBool>,
        index: u8,
        ran: Arc<AtomicU64>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if control.must_park() {
                    control.park(&stop, index, || unreachable!("no capture asked"));
                    continue;
                }
                ran.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    }

    #[test]
    fn one_vcpu_stops_the_others_until_its_guard_drops() {
        extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        let _ =
            vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), noop);
        let control = Arc::new(RunControl::default());
        let stop = Arc::new(AtomicBool::new(false));
        let counters: Vec<_> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let others: Vec<_> = counters
            .iter()
            .zip(1..)
            .map(|(ran, index)| fake_vcpu(control.clone(), stop.clone(), index, ran.clone()))
            .collect();
        let mut threads: Vec<_> = others
            .iter()
            .map(std::os::unix::thread::JoinHandleExt::as_pthread_t)
            .collect();
        // SAFETY: no preconditions; this test thread plays vCPU 0.
        threads.push(unsafe { libc::pthread_self() });
        control.set_threads(threads);

        // With one vCPU nothing is held.
        let alone = control.stop_others(1, Duration::from_secs(1)).unwrap();
        assert!(!control.must_park());
        drop(alone);

        let held = control.stop_others(3, Duration::from_secs(5)).unwrap();
        assert!(control.must_park());
        assert!(matches!(
            control.stop_others(3, Duration::from_secs(1)),
            Err(RunControlError::Busy)
        ));
        let before: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        std::thread::sleep(Duration::from_millis(30));
        let after: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(before, after, "no other vCPU ran while held");
        // An API resume does not release what a vCPU holds.
        control.resume();
        assert!(control.must_park());
        drop(held);
        assert!(!control.must_park());
        let deadline = Instant::now() + Duration::from_secs(5);
        while counters
            .iter()
            .zip(&after)
            .any(|(c, a)| c.load(Ordering::Relaxed) <= *a)
        {
            assert!(Instant::now() < deadline, "the others run again");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The wrong thread count is refused rather than trusted.
        assert!(matches!(
            control.stop_others(4, Duration::from_secs(1)),
            Err(RunControlError::Threads {
                running: 3,
                vcpus: 4
            })
        ));
        assert!(!control.must_park(), "a refused hold releases");
        stop.store(true, Ordering::Release);
        for thread in others {
            thread.join().unwrap();
        }
    }
}
