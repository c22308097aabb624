//! Pausing and resuming a running VM's vCPUs from another thread (the API).
//!
//! A pause request sets a flag and kicks every vCPU thread out of KVM_RUN with a signal; each vCPU
//! sees the flag at the top of its loop (between two exits, so no exit is half handled) and parks
//! until resumed or stopped. `pause` returns once every vCPU is parked: from then on no guest
//! instruction runs.
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
    /// Parking vCPUs capture their state (a snapshot or a migration is under way).
    capture: AtomicBool,
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

    /// Registers the vCPU threads (`Vm::run`); an empty list when the VM stops.
    pub(crate) fn set_threads(&self, threads: Vec<libc::pthread_t>) {
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
        {
            let mut parking = self.parking.lock().unwrap_or_else(|p| p.into_inner());
            parking.captured.clear();
            if parking.threads.is_empty() {
                return Err(RunControlError::NotRunning);
            }
        }
        self.capture.store(true, Ordering::Release);
        let paused = self.pause(limit);
        self.capture.store(false, Ordering::Release);
        paused?;
        let mut parking = self.parking.lock().unwrap_or_else(|p| p.into_inner());
        let captured = std::mem::take(&mut parking.captured);
        if captured.len() != parking.threads.len() {
            return Err(RunControlError::NotCaptured {
                captured: captured.len(),
                vcpus: parking.threads.len(),
            });
        }
        Ok(captured.into_values().collect::<Result<_, _>>()?)
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
        capture: impl FnOnce() -> Result<VcpuSnapshot, SnapshotError>,
    ) {
        let captured = self.capture.load(Ordering::Acquire).then(capture);
        let mut parking = self.parking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(captured) = captured {
            parking.captured.insert(index, captured);
        }
        parking.parked += 1;
        self.changed.notify_all();
        while self.pause.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
            parking = self
                .changed
                .wait_timeout(parking, PARKED_STOP_POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        parking.parked = parking.parked.saturating_sub(1);
    }
}
