//! A stand-in for the edge's end of the verdict channel, for tests of a host (its link, its
//! tiers) that need no edge micro-VM: the channel's own receiver (`edge::channel::
//! VerdictReceiver`, the one `vigil edge` runs) on a thread, which keeps every record it is
//! handed and answers with the room and refusals the test chose, as the edge's tables would.
//! Tests of the real edge's tables use `vigil edge` (`edge_trust.rs`, `edge.rs`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edge::channel::{Applied, VerdictReceiver};
use vigil_wire::verdict::VerdictRepr;

/// Which records the stand-in's "tables" refuse: `Some(outcome code)` refuses it.
pub type RefusePredicate = Box<dyn Fn(&VerdictRepr) -> Option<u8> + Send>;

/// The edge's receiving end on its own thread (stopped when dropped).
pub struct EdgeStandIn {
    addr: SocketAddr,
    records: Arc<(Mutex<Vec<VerdictRepr>>, Condvar)>,
    room: Arc<AtomicU32>,
    refuse: Arc<Mutex<Option<RefusePredicate>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EdgeStandIn {
    /// Listens on a free port of 127.0.0.1 under `key`, with room for 1,024 verdicts and no
    /// refusals.
    pub fn bind(key: &[u8]) -> EdgeStandIn {
        EdgeStandIn::bind_at("127.0.0.1:0".parse().unwrap(), key)
    }

    /// Listens on `addr` (a restarted edge: same address, a new boot id, nothing remembered).
    pub fn bind_at(addr: SocketAddr, key: &[u8]) -> EdgeStandIn {
        let mut rx = VerdictReceiver::bind(addr, key.to_vec()).expect("the edge stand-in binds");
        let addr = rx.local_addr().unwrap();
        let records = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let room = Arc::new(AtomicU32::new(1024));
        let refuse: Arc<Mutex<Option<RefusePredicate>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (kept, r, f, s) = (records.clone(), room.clone(), refuse.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                let _ = rx.recv_reporting(Duration::from_millis(20), |d| {
                    let mut report = Applied {
                        room: r.load(Ordering::Acquire),
                        ..Applied::default()
                    };
                    let refuse = f.lock().unwrap();
                    let mut list = kept.0.lock().unwrap();
                    for (i, raw) in d.records.iter().enumerate() {
                        let Ok(v) = VerdictRepr::from_bytes(raw) else {
                            continue;
                        };
                        match refuse.as_ref().and_then(|f| f(&v)) {
                            Some(code) => {
                                if report.refused == 0 {
                                    report.reason = code;
                                }
                                report.refused |= 1 << i;
                            }
                            None => list.push(v),
                        }
                    }
                    kept.1.notify_all();
                    Some(report)
                });
            }
        });
        EdgeStandIn {
            addr,
            records,
            room,
            refuse,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The room its acks announce from now on.
    pub fn set_room(&self, room: u32) {
        self.room.store(room, Ordering::Release);
    }

    /// Its "tables" refuse what `f` says from now on.
    pub fn refuse(&self, f: RefusePredicate) {
        *self.refuse.lock().unwrap() = Some(f);
    }

    /// Every record it applied so far, once `done` says they are enough (or `limit` passed).
    pub fn wait_records(
        &self,
        limit: Duration,
        done: impl Fn(&[VerdictRepr]) -> bool,
    ) -> Vec<VerdictRepr> {
        let deadline = Instant::now() + limit;
        let (list, arrived) = &*self.records;
        let mut now = list.lock().unwrap();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if done(&now) || left.is_zero() {
                return now.clone();
            }
            now = arrived.wait_timeout(now, left).unwrap().0;
        }
    }
}

impl Drop for EdgeStandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
