//! Running a VM: one thread per vCPU, the wait for the first to stop (or a timeout, or a stop
//! signal), the profiler's sampling kicks, and the outcome.
//!
//! Owns: the vCPU threads' lifetimes, SIGTERM/SIGINT handling for running VMs, the RIP profile
//! file, the kicks that make every vCPU arm its syscall fix, and the [`VmOutcome`] of a run.
//! Must not: handle exits (the vCPUs do) or let a vCPU failure take the process down.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::thread::JoinHandleExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Vm, VmError, VmOutcome};
use crate::devices::panic_message;
use crate::vcpu::{StopReason, VcpuStats};
use crate::verdict_region::VerdictRegion;

/// The vCPU threads' handles; each returns its counters and RIP samples.
type VcpuThreads = Vec<JoinHandle<(VcpuStats, Option<BTreeMap<u64, u64>>)>>;

impl Vm {
    /// Runs the VM until it stops or `timeout` passes. vCPUs run on their own threads; a vCPU
    /// that fails stops its VM, never the process.
    pub fn run(mut self, timeout: Option<Duration>) -> Result<VmOutcome, VmError> {
        let started = self.created;
        let stop = self.stop.clone();
        let first = Arc::new(FirstStop::default());
        install_kick_handler();
        let pending: Vec<_> = self
            .vcpus
            .iter()
            .map(|vcpu| vcpu.syscall_fix_pending())
            .collect();
        let threads = match self.spawn_vcpus(&first) {
            Ok(threads) => threads,
            Err(e) => {
                // No run after all: a pause or capture waiting for its threads stops waiting.
                self.control.set_threads(Vec::new());
                return Err(e);
            }
        };
        self.control.set_threads(pthreads(&threads));
        let arming = pending
            .iter()
            .any(Option::is_some)
            .then(|| spawn_syscall_fix_kicker(pthreads(&threads), pending, stop.clone()));
        let sampler = self
            .profile
            .as_ref()
            .map(|_| spawn_sampler(pthreads(&threads), stop.clone()));
        // Wait for the first vCPU to stop (or the timeout), then stop the others.
        first.wait(&stop, started, timeout);
        stop.store(true, Ordering::Release);
        // A device thread that failed stopped the VM through the stop flag: say why.
        if let Some(why) = self.device_fault.reason() {
            first.overwrite(StopReason::Crashed(why));
        }
        // No more pause kicks at threads that are about to end.
        self.control.set_threads(Vec::new());
        if let Some(sampler) = sampler {
            let _ = sampler.join();
        }
        if let Some(arming) = arming {
            let _ = arming.join();
        }
        let stats = self.join_vcpus(threads, &first);
        // Every event of the run is out before the outcome line.
        if let Some(introspection) = &self.introspection {
            introspection.settle_waiting();
            introspection.flush_events(Duration::from_secs(5));
        }
        let markers: BTreeMap<String, u64> = self.bus.console_markers().into_iter().collect();
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        Ok(VmOutcome {
            name: self.name,
            stop: first.reason(),
            host: self.host.to_string(),
            wall_ms: started.elapsed().as_millis() as u64,
            markers,
            vmm_rss_kib: status_kib(&status, "VmRSS:"),
            vmm_rss_file_kib: status_kib(&status, "RssFile:"),
            guest_resident_kib: crate::guest_ram::resident_kib(&self.memory),
            stats,
            firewall: self
                .verdict_region
                .as_deref()
                .and_then(VerdictRegion::counters),
        })
    }

    /// One thread per vCPU; the first to stop records why and stops the VM.
    fn spawn_vcpus(&mut self, first: &Arc<FirstStop>) -> Result<VcpuThreads, VmError> {
        let mut threads = Vec::new();
        for mut vcpu in std::mem::take(&mut self.vcpus) {
            let stop = self.stop.clone();
            let control = self.control.clone();
            let first = first.clone();
            let thread = std::thread::Builder::new()
                .name(format!("{}-vcpu{}", self.name, vcpu.index))
                .spawn(move || {
                    let index = vcpu.index;
                    // A bug on this vCPU's path (an exit handler, a hook, the verdict push)
                    // stops this VM, with the panic as its reason; never the process.
                    let reason = catch_unwind(AssertUnwindSafe(|| vcpu.run(&stop, &control)))
                        .unwrap_or_else(|payload| {
                            StopReason::Crashed(format!(
                                "vCPU {index} panicked: {}",
                                panic_message(payload.as_ref())
                            ))
                        });
                    stop.store(true, Ordering::Release);
                    first.record(reason);
                    (vcpu.stats, vcpu.rip_samples)
                })
                .map_err(VmError::Thread)?;
            threads.push(thread);
        }
        Ok(threads)
    }

    /// Joins the (stopping) vCPU threads, kicking each out of KVM_RUN until it has noticed the
    /// stop; sums their counters and writes the RIP profile.
    fn join_vcpus(&self, threads: VcpuThreads, first: &FirstStop) -> VcpuStats {
        let mut stats = VcpuStats::default();
        for thread in threads {
            // A vCPU blocked in KVM_RUN returns on a signal; repeat until it has noticed `stop`.
            while !thread.is_finished() {
                // SAFETY: the pthread is alive (not finished, not joined yet).
                unsafe {
                    libc::pthread_kill(thread.as_pthread_t(), vmm_sys_util::signal::SIGRTMIN())
                };
                std::thread::sleep(Duration::from_millis(5));
            }
            match thread.join() {
                Ok((vcpu_stats, samples)) => {
                    stats.merge(&vcpu_stats);
                    if let (Some(samples), Some(path)) = (samples, &self.profile) {
                        write_profile(path, &samples);
                    }
                }
                Err(_) => first.overwrite(StopReason::Crashed("a vCPU thread panicked".into())),
            }
        }
        stats
    }
}

fn pthreads(threads: &VcpuThreads) -> Vec<libc::pthread_t> {
    threads.iter().map(|t| t.as_pthread_t()).collect()
}

/// The profiler: kicks every vCPU out of KVM_RUN every 10 ms (each samples its RIP) until `stop`.
fn spawn_sampler(threads: Vec<libc::pthread_t>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(10));
            for &thread in &threads {
                // SAFETY: the vCPU threads are joined only after this sampler is.
                unsafe { libc::pthread_kill(thread, vmm_sys_util::signal::SIGRTMIN()) };
            }
        }
    })
}

/// How often a vCPU whose syscall fix is not armed yet is kicked out of KVM_RUN to look.
const SYSCALL_FIX_KICK: Duration = Duration::from_millis(10);

/// Kicks, every [`SYSCALL_FIX_KICK`], each vCPU whose `pending` flag is still set, until none is
/// or `stop`. The first vCPU sees its #PF handler on its own frequent port writes, but another
/// may make no exit to the VMM between loading its IDT and running user code (its timer, IPIs
/// and `hlt` stay in KVM): without these kicks its first `syscall` would fault into the guest,
/// which kills the process with RIP at the system-call entry.
fn spawn_syscall_fix_kicker(
    threads: Vec<libc::pthread_t>,
    pending: Vec<Option<Arc<AtomicBool>>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Acquire) {
            let mut waiting = false;
            for (&thread, flag) in threads.iter().zip(&pending) {
                if flag.as_ref().is_some_and(|f| f.load(Ordering::Relaxed)) {
                    waiting = true;
                    // SAFETY: the vCPU threads are joined only after this kicker is.
                    unsafe { libc::pthread_kill(thread, vmm_sys_util::signal::SIGRTMIN()) };
                }
            }
            if !waiting {
                return;
            }
            std::thread::sleep(SYSCALL_FIX_KICK);
        }
    })
}

/// Why a run ended: the first vCPU to stop, or the wait itself (stop request, signal, timeout).
#[derive(Default)]
struct FirstStop {
    reason: Mutex<Option<StopReason>>,
    changed: Condvar,
}

impl FirstStop {
    /// Records `reason` unless a reason is already there.
    fn record(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.changed.notify_all();
    }

    /// Replaces whatever was recorded (a vCPU thread panicked).
    fn overwrite(&self, reason: StopReason) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    /// Waits until a reason is recorded, `stop` is set or SIGTERM/SIGINT arrived (see
    /// `stop_on_signals`: both stop the VM cleanly, as `Requested`), or `timeout` since
    /// `started` passes.
    fn wait(&self, stop: &AtomicBool, started: Instant, timeout: Option<Duration>) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        while slot.is_none() {
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
            slot = self
                .changed
                .wait_timeout(slot, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// What was recorded (`Requested` if nothing was).
    fn reason(&self) -> StopReason {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or(StopReason::Requested)
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

/// A KiB figure (`VmRSS:`, `RssFile:`...) of /proc/self/status's text; 0 if absent.
fn status_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The vCPU kick signal only has to interrupt KVM_RUN; its handler does nothing.
fn install_kick_handler() {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    let _ = vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), noop);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins() {
        let first = FirstStop::default();
        first.record(StopReason::Halted);
        first.record(StopReason::Reset);
        first.wait(&AtomicBool::new(false), Instant::now(), None);
        assert_eq!(first.reason(), StopReason::Halted);
        first.overwrite(StopReason::Crashed("a vCPU thread panicked".into()));
        assert!(matches!(first.reason(), StopReason::Crashed(_)));
    }

    #[test]
    fn a_stop_request_or_a_timeout_ends_the_wait() {
        let first = FirstStop::default();
        first.wait(&AtomicBool::new(true), Instant::now(), None);
        assert_eq!(first.reason(), StopReason::Requested);
        let first = FirstStop::default();
        first.wait(
            &AtomicBool::new(false),
            Instant::now(),
            Some(Duration::ZERO),
        );
        assert_eq!(
            first.reason(),
            StopReason::Crashed("timed out after 0 s".into())
        );
        assert_eq!(FirstStop::default().reason(), StopReason::Requested);
    }

    #[test]
    fn a_vcpu_stopping_wakes_the_waiter() {
        let first = Arc::new(FirstStop::default());
        let vcpu = {
            let first = first.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                first.record(StopReason::ExitCode(0));
            })
        };
        first.wait(
            &AtomicBool::new(false),
            Instant::now(),
            Some(Duration::from_secs(10)),
        );
        vcpu.join().unwrap();
        assert_eq!(first.reason(), StopReason::ExitCode(0));
    }

    #[test]
    fn vcpus_are_kicked_until_their_syscall_fix_is_armed() {
        install_kick_handler();
        let kicks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        // A stand-in for a vCPU blocked in KVM_RUN: each kick interrupts its wait.
        let vcpu = {
            let (kicks, done) = (kicks.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Acquire) {
                    // SAFETY: sleeps until a signal is handled; no memory is involved.
                    unsafe { libc::pause() };
                    kicks.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let pending = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let kicker = spawn_syscall_fix_kicker(
            vec![vcpu.as_pthread_t(), vcpu.as_pthread_t()],
            vec![Some(pending.clone()), None],
            stop.clone(),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while kicks.load(Ordering::Relaxed) < 3 {
            assert!(Instant::now() < deadline, "a pending vCPU is kicked");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Armed: the kicker is done with it, and ends once no vCPU is pending.
        pending.store(false, Ordering::Relaxed);
        kicker.join().unwrap();
        assert!(!stop.load(Ordering::Acquire));
        done.store(true, Ordering::Release);
        // A kick can land just before the stand-in's next pause: kick until it has ended.
        while !vcpu.is_finished() {
            // SAFETY: the thread is alive (not finished, not joined yet).
            unsafe { libc::pthread_kill(vcpu.as_pthread_t(), vmm_sys_util::signal::SIGRTMIN()) };
            std::thread::sleep(Duration::from_millis(5));
        }
        vcpu.join().unwrap();
    }

    #[test]
    fn the_profile_lists_the_hottest_rip_first() {
        let path = std::env::temp_dir().join(format!("vigil-profile-{}", std::process::id()));
        let samples = BTreeMap::from([(0x1000, 2), (0x2000, 7), (0x3000, 1)]);
        write_profile(&path, &samples);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "7 0x2000\n2 0x1000\n1 0x3000\n"
        );
        let _ = std::fs::remove_file(&path);
    }
}
