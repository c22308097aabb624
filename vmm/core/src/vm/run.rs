//! Running a VM: one thread per vCPU, the wait for the first to stop (or a timeout, or a stop
//! signal), the profiler's sampling kicks, and the outcome.
//!
//! Owns: the vCPU threads' lifetimes, SIGTERM/SIGINT handling for running VMs, the RIP profile
//! file, and the [`VmOutcome`] of a run.
//! Must not: handle exits (the vCPUs do) or let a vCPU failure take the process down.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Vm, VmError, VmOutcome};
use crate::vcpu::{StopReason, VcpuStats};
use crate::verdict_region::VerdictRegion;

impl Vm {
    /// Runs the VM until it stops or `timeout` passes. vCPUs run on their own threads; a vCPU
    /// that fails stops its VM, never the process.
    pub fn run(self, timeout: Option<Duration>) -> Result<VmOutcome, VmError> {
        let started = self.created;
        let stop = self.stop.clone();
        let first_reason: Arc<(Mutex<Option<StopReason>>, Condvar)> =
            Arc::new((Mutex::new(None), Condvar::new()));
        install_kick_handler();
        let mut handles: Vec<std::thread::JoinHandle<_>> = Vec::new();
        for mut vcpu in self.vcpus {
            let stop = stop.clone();
            let control = self.control.clone();
            let first_reason = first_reason.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{}-vcpu{}", self.name, vcpu.index))
                .spawn(move || {
                    let reason = vcpu.run(&stop, &control);
                    stop.store(true, Ordering::Release);
                    let (lock, cvar) = &*first_reason;
                    let mut slot = lock.lock().unwrap_or_else(|p| p.into_inner());
                    if slot.is_none() {
                        *slot = Some(reason);
                    }
                    cvar.notify_all();
                    (vcpu.stats, vcpu.rip_samples)
                })
                .map_err(VmError::Thread)?;
            handles.push(handle);
        }
        {
            use std::os::unix::thread::JoinHandleExt;
            self.control
                .set_threads(handles.iter().map(|h| h.as_pthread_t()).collect());
        }
        let sampler = self.profile.as_ref().map(|_| {
            use std::os::unix::thread::JoinHandleExt;
            let threads: Vec<libc::pthread_t> = handles.iter().map(|h| h.as_pthread_t()).collect();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(10));
                    for &thread in &threads {
                        // SAFETY: the vCPU threads are joined only after this sampler is.
                        unsafe { libc::pthread_kill(thread, vmm_sys_util::signal::SIGRTMIN()) };
                    }
                }
            })
        });
        // Wait for the first vCPU to stop (or the timeout), then stop the others.
        {
            let (lock, cvar) = &*first_reason;
            let mut slot = lock.lock().unwrap_or_else(|p| p.into_inner());
            while slot.is_none() {
                // SIGTERM/SIGINT (see `stop_on_signals`) stop the VM cleanly.
                if STOP_SIGNALLED.load(Ordering::Acquire) || stop.load(Ordering::Acquire) {
                    *slot = Some(StopReason::Requested);
                    break;
                }
                let mut wait = SIGNAL_POLL;
                if let Some(limit) = timeout {
                    let left = limit.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        *slot = Some(StopReason::Crashed(format!(
                            "timed out after {} s",
                            limit.as_secs()
                        )));
                        break;
                    }
                    wait = wait.min(left);
                }
                slot = cvar
                    .wait_timeout(slot, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        stop.store(true, Ordering::Release);
        // No more pause kicks at threads that are about to end.
        self.control.set_threads(Vec::new());
        if let Some(sampler) = sampler {
            let _ = sampler.join();
        }
        let mut stats = VcpuStats::default();
        for handle in handles {
            // A vCPU blocked in KVM_RUN returns on a signal; repeat until it has noticed `stop`.
            while !handle.is_finished() {
                use std::os::unix::thread::JoinHandleExt;
                // SAFETY: the pthread is alive (not finished, not joined yet).
                unsafe {
                    libc::pthread_kill(handle.as_pthread_t(), vmm_sys_util::signal::SIGRTMIN())
                };
                std::thread::sleep(Duration::from_millis(5));
            }
            match handle.join() {
                Ok((vcpu_stats, samples)) => {
                    stats.merge(&vcpu_stats);
                    if let Some(samples) = samples {
                        if let Some(path) = &self.profile {
                            write_profile(path, &samples);
                        }
                    }
                }
                Err(_) => {
                    let (lock, _) = &*first_reason;
                    *lock.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(StopReason::Crashed("a vCPU thread panicked".into()));
                }
            }
        }
        // Every event of the run is out before the outcome line.
        if let Some(introspection) = &self.introspection {
            introspection.flush_events(Duration::from_secs(5));
        }
        let markers: BTreeMap<String, u64> = self.bus.console_markers().into_iter().collect();
        let stop_reason = first_reason
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or(StopReason::Requested);
        Ok(VmOutcome {
            name: self.name,
            stop: stop_reason,
            host: self.host.to_string(),
            wall_ms: started.elapsed().as_millis() as u64,
            markers,
            vmm_rss_kib: resident_kib(),
            stats,
            firewall: self
                .verdict_region
                .as_deref()
                .and_then(VerdictRegion::counters),
        })
    }
}

/// Set by SIGTERM or SIGINT once [`stop_on_signals`] is installed: running VMs stop as if asked to
/// (`StopReason::Requested`), and report their outcome.
static STOP_SIGNALLED: AtomicBool = AtomicBool::new(false);
/// How often a waiting `Vm::run` looks at [`STOP_SIGNALLED`].
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Whether SIGTERM or SIGINT arrived since `stop_on_signals`.
pub fn stop_signalled() -> bool {
    STOP_SIGNALLED.load(Ordering::Acquire)
}

/// Makes SIGTERM and SIGINT stop running VMs cleanly instead of killing the VMM.
pub fn stop_on_signals() {
    extern "C" fn on_signal(_: libc::c_int) {
        // Only an atomic store: async-signal-safe.
        STOP_SIGNALLED.store(true, Ordering::Release);
    }
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Writes the RIP histogram to `path` (`VIGIL_PROFILE`): one "count rip" line each, most
/// frequent first.
fn write_profile(path: &Path, samples: &BTreeMap<u64, u64>) {
    let mut rows: Vec<(u64, u64)> = samples.iter().map(|(rip, n)| (*n, *rip)).collect();
    rows.sort_unstable_by(|a, b| b.cmp(a));
    let text: String = rows
        .iter()
        .map(|(n, rip)| format!("{n} {rip:#x}\n"))
        .collect();
    if let Err(e) = fs::write(path, text) {
        log::warn!("vigil: cannot write the profile to {}: {e}", path.display());
    }
}

/// VmRSS of this process from /proc/self/status, KiB (0 if unreadable).
fn resident_kib() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The vCPU kick signal only has to interrupt KVM_RUN; its handler does nothing.
fn install_kick_handler() {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    let _ = vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), noop);
}
