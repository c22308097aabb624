//! Load on a REST API socket, for the tests and the benchmark: many concurrent clients, and the
//! clients that try to starve a server (idle connections, slow-loris, never-reading pipeliners,
//! subscribers that keep a stream open).
//!
//! Owns: the load's threads and connections (stopped and closed on drop). Must not: judge what
//! it measures (the callers assert or print).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_api::http::{self, Chunks};

/// How long a load client waits for one answer before it counts a failure.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// `clients` threads, each sending `GET vmm.ping` and `GET vm.list` in turn, a new connection
/// per request, as fast as they are answered, until stopped.
pub struct ApiLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    answered: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl ApiLoad {
    pub fn start(socket: &Path, clients: usize) -> ApiLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .filter_map(|n| {
                let (socket, stop) = (socket.to_path_buf(), stop.clone());
                let (answered, failed) = (answered.clone(), failed.clone());
                std::thread::Builder::new()
                    .name(format!("api-load-{n}"))
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        let mut i = n;
                        while !stop.load(Ordering::Relaxed) {
                            let path = if i % 2 == 0 {
                                "/api/v1/vmm.ping"
                            } else {
                                "/api/v1/vm.list"
                            };
                            i += 1;
                            match http::request(&socket, "GET", path, None, CLIENT_TIMEOUT) {
                                Ok(r) if r.status == 200 => {
                                    answered.fetch_add(1, Ordering::Relaxed)
                                }
                                _ => failed.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                    })
                    .ok()
            })
            .collect();
        ApiLoad {
            stop,
            threads,
            answered,
            failed,
        }
    }

    /// Client threads running.
    pub fn clients(&self) -> usize {
        self.threads.len()
    }

    /// (requests answered 200, requests that failed) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.answered.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// Stops every client and waits for them; returns [`ApiLoad::counts`].
    pub fn stop(mut self) -> (u64, u64) {
        self.stop_threads();
        self.counts()
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for ApiLoad {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// The clients that hold a server's connections without finishing a request, all at once:
/// `idle` connected and silent, `loris` sending one header byte at a time (a thread keeps them
/// dribbling), `deaf` pipelining requests and never reading the answers, and `subscribers`
/// event streams left open and unread.
pub struct Hostile {
    pub idle: Vec<UnixStream>,
    pub deaf: Vec<UnixStream>,
    pub subscribers: Vec<Chunks>,
    stop: Arc<AtomicBool>,
    loris: Option<JoinHandle<()>>,
}

#[derive(Clone, Copy, Debug)]
pub struct HostileCounts {
    pub idle: usize,
    pub loris: usize,
    pub deaf: usize,
    pub subscribers: usize,
}

impl Hostile {
    pub fn start(socket: &Path, counts: HostileCounts) -> std::io::Result<Hostile> {
        let connect = |socket: &PathBuf| UnixStream::connect(socket);
        let socket = socket.to_path_buf();
        let idle = (0..counts.idle)
            .map(|_| connect(&socket))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut deaf = Vec::new();
        for _ in 0..counts.deaf {
            let mut s = connect(&socket)?;
            s.set_nonblocking(true)?;
            for _ in 0..2000 {
                if s.write_all(b"GET /api/v1/vm.list HTTP/1.1\r\nHost: x\r\n\r\n")
                    .is_err()
                {
                    break;
                }
            }
            deaf.push(s);
        }
        let mut subscribers = Vec::new();
        for _ in 0..counts.subscribers {
            let chunks = http::stream(&socket, "/api/v1/events", CLIENT_TIMEOUT)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            subscribers.push(chunks);
        }
        let mut loris = (0..counts.loris)
            .map(|_| {
                let mut s = connect(&socket)?;
                s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Slow: ")?;
                Ok(s)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let loris_stop = stop.clone();
        let loris = std::thread::spawn(move || {
            // Each one byte every 500 ms; a dropped (timed out) one is opened again.
            while !loris_stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                for s in &mut loris {
                    if s.write_all(b"a").is_err() {
                        if let Ok(mut fresh) = UnixStream::connect(&socket) {
                            let _ = fresh.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Slow: ");
                            *s = fresh;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(500).saturating_sub(started.elapsed()));
            }
        });
        Ok(Hostile {
            idle,
            deaf,
            subscribers,
            stop,
            loris: Some(loris),
        })
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(loris) = self.loris.take() {
            let _ = loris.join();
        }
    }
}
