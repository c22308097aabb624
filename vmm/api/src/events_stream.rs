//! The `events` endpoint: the event bus as chunked NDJSON, for the host's and the edge's API.
//!
//! Owns: the stream's framing (a `subscribed` line, then one event per chunk) and when it ends.
//! Must not: block the event bus (a slow client only loses its own stream).

use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::http;

/// Streams every event line published from now on, one chunk each, until the client goes away
/// or one of `stops` is set (the host shutting down, the server stopping on a signal).
pub fn stream_events(stream: &mut UnixStream, stops: &[&AtomicBool]) {
    let events = vmm_core::events::bus().subscribe();
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let Ok(mut chunked) = http::ChunkedWriter::start(writer, 200, "application/x-ndjson") else {
        return;
    };
    // The first line says the stream is live: every event after it reaches this client.
    let hello = serde_json::json!({"event": "subscribed", "published_before": vmm_core::events::bus()
        .published
        .load(std::sync::atomic::Ordering::Relaxed)});
    if chunked
        .write_chunk(format!("{hello}\n").as_bytes())
        .is_err()
    {
        return;
    }
    loop {
        match events.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let mut bytes = line.as_bytes().to_vec();
                bytes.push(b'\n');
                if chunked.write_chunk(&bytes).is_err() {
                    return;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if stops
                    .iter()
                    .any(|s| s.load(std::sync::atomic::Ordering::Acquire))
                {
                    let _ = chunked.finish();
                    return;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}
