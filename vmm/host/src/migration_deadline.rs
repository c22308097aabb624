//! The whole of an incoming migration runs under one deadline: each read of the source's
//! connection has its own timeout (`MIGRATION_WAIT`), but an authenticated source that sent a
//! byte just within it, again and again, held the target's prepared VM (its RAM) and its switch
//! port for as long as it liked. The deadline allows a real migration of the largest tenant at
//! a slow link's throughput; once it passes, the connection is cut, so the read waiting on it
//! fails at once and the receive discards everything (as for a source that died).
//!
//! Owns: [`ReceiveLimit`] (what the deadline allows) and [`Deadline`] (its watchdog thread).
//! Must not: release anything itself (the receive does, on the failed read it causes).

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an incoming migration may take, from the source's authentication to the VM's
/// state restored: `base`, plus twice the tenant's RAM (pre-copy sends it once, its dirty
/// rounds part of it again) at `min_bytes_per_s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiveLimit {
    /// For what is not the transfer: the header, the VM's build, the source's pause.
    pub base: Duration,
    /// The slowest a live source sends.
    pub min_bytes_per_s: u64,
}

impl Default for ReceiveLimit {
    /// 60 s, and 8 MiB/s (64 Mbit/s, far below any link between hosts): a tenant of the
    /// largest RAM (3 GiB) has 60 + 768 s; one of 256 MiB, 124 s.
    fn default() -> Self {
        ReceiveLimit {
            base: Duration::from_secs(60),
            min_bytes_per_s: 8 << 20,
        }
    }
}

impl ReceiveLimit {
    /// The time allowed for a tenant of `memory_mib`; the header's before the spec is known.
    pub fn total(&self, memory_mib: u64) -> Duration {
        let bytes = memory_mib.saturating_mul(2 << 20);
        let secs = bytes as f64 / self.min_bytes_per_s.max(1) as f64;
        self.base
            .saturating_add(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
    }
}

/// A watchdog that shuts a connection down when its deadline passes (unless finished first).
pub(crate) struct Deadline {
    began: Instant,
    extend: Option<mpsc::Sender<Instant>>,
    passed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Deadline {
    /// Cuts `socket` `allowed` from now.
    pub(crate) fn start(socket: TcpStream, allowed: Duration) -> std::io::Result<Deadline> {
        let began = Instant::now();
        let (extend, moved) = mpsc::channel::<Instant>();
        let passed = Arc::new(AtomicBool::new(false));
        let flag = passed.clone();
        let thread = std::thread::Builder::new()
            .name("migration-deadline".into())
            .spawn(move || {
                let mut at = began.checked_add(allowed);
                loop {
                    let wait = at.map(|at| at.saturating_duration_since(Instant::now()));
                    let next = match wait {
                        Some(wait) => moved.recv_timeout(wait),
                        None => moved
                            .recv()
                            .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    };
                    match next {
                        Ok(later) => at = Some(later),
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            flag.store(true, Ordering::Release);
                            let _ = socket.shutdown(Shutdown::Both);
                            return;
                        }
                    }
                }
            })?;
        Ok(Deadline {
            began,
            extend: Some(extend),
            passed,
            thread: Some(thread),
        })
    }

    /// Moves the deadline to `allowed` from its start.
    pub(crate) fn allow(&self, allowed: Duration) {
        if let (Some(tx), Some(at)) = (&self.extend, self.began.checked_add(allowed)) {
            let _ = tx.send(at);
        }
    }

    /// Whether it passed (the connection was cut).
    pub(crate) fn passed(&self) -> bool {
        self.passed.load(Ordering::Acquire)
    }

    /// Stops the watchdog: nothing is cut after this returns. Whether it had passed.
    pub(crate) fn finish(&mut self) -> bool {
        self.extend = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.passed()
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_allowed_grows_with_the_tenants_ram() {
        let limit = ReceiveLimit::default();
        assert_eq!(limit.total(256), Duration::from_secs(124));
        assert_eq!(limit.total(3072), Duration::from_secs(60 + 768));
        let tiny = ReceiveLimit {
            base: Duration::ZERO,
            min_bytes_per_s: 0,
        };
        assert!(tiny.total(u64::MAX) >= Duration::from_secs(1 << 40));
    }
}
