//! The process's event stream: every JSON event line (socket decisions, verdicts, tamper,
//! reconfigurations, rejected verdict datagrams) goes to stdout and to every subscriber (the
//! API's `/api/v1/events` stream).
//!
//! Subscribers get a bounded queue each: one that falls behind loses events (counted) rather than
//! slowing the trap path or the logger down; one that goes away is forgotten.
//!
//! Owns: the process-wide bus, its subscribers and their loss counters.
//! Must not: block a publisher on a slow subscriber, or change a line it carries (it publishes
//! what it is given).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

/// Events a subscriber may have queued before it loses some.
const SUBSCRIBER_QUEUE: usize = 4096;

pub struct EventBus {
    subscribers: Mutex<Vec<SyncSender<Arc<str>>>>,
    /// Lines a slow subscriber lost.
    pub lost: AtomicU64,
    pub published: AtomicU64,
    /// Whether lines also go to stdout (on unless a caller turns it off).
    quiet: AtomicBool,
}

static BUS: OnceLock<EventBus> = OnceLock::new();

/// The process's bus.
pub fn bus() -> &'static EventBus {
    BUS.get_or_init(|| EventBus {
        subscribers: Mutex::new(Vec::new()),
        lost: AtomicU64::new(0),
        published: AtomicU64::new(0),
        quiet: AtomicBool::new(false),
    })
}

impl EventBus {
    /// A new subscriber's queue: every line published from now on.
    pub fn subscribe(&self) -> Receiver<Arc<str>> {
        let (tx, rx) = sync_channel(SUBSCRIBER_QUEUE);
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    /// Stops copying lines to stdout (subscribers still get them).
    pub fn set_quiet(&self, quiet: bool) {
        self.quiet.store(quiet, Ordering::Relaxed);
    }

    /// Publishes one event line (a JSON object, no newline).
    pub fn publish(&self, line: &str) {
        self.published.fetch_add(1, Ordering::Relaxed);
        if !self.quiet.load(Ordering::Relaxed) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        if subscribers.is_empty() {
            return;
        }
        let shared: Arc<str> = Arc::from(line);
        subscribers.retain(|s| match s.try_send(shared.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// Publishes `{"event": kind, ...body}`; `body` must serialize to a JSON object.
    pub fn emit<T: serde::Serialize>(&self, kind: &str, body: &T) {
        let (Ok(kind), Ok(body)) = (serde_json::to_string(kind), serde_json::to_string(body))
        else {
            return;
        };
        // `"event"` first, then the body's fields in their order.
        match body.strip_prefix('{') {
            Some("}") => self.publish(&format!("{{\"event\":{kind}}}")),
            Some(fields) => self.publish(&format!("{{\"event\":{kind},{fields}")),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_get_lines_and_slow_ones_lose_without_blocking() {
        let bus = EventBus {
            subscribers: Mutex::new(Vec::new()),
            lost: AtomicU64::new(0),
            published: AtomicU64::new(0),
            quiet: AtomicBool::new(true),
        };
        let fast = bus.subscribe();
        let slow = bus.subscribe();
        for i in 0..SUBSCRIBER_QUEUE + 3 {
            bus.publish(&format!("{{\"n\":{i}}}"));
            let _ = fast.try_recv().unwrap();
        }
        assert_eq!(bus.lost.load(Ordering::Relaxed), 3);
        assert_eq!(&*slow.try_recv().unwrap(), "{\"n\":0}");
        drop(slow);
        bus.publish("{}");
        assert_eq!(bus.subscribers.lock().unwrap().len(), 1);
        bus.emit("x", &serde_json::json!({"vm": "a"}));
        let _ = fast.try_recv().unwrap();
        assert_eq!(&*fast.try_recv().unwrap(), r#"{"event":"x","vm":"a"}"#);
    }
}
