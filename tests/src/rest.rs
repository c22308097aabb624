//! Calls on a host's or an edge's REST API with Vigil's own client, its event stream, and its
//! counters and metrics.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_api::http::{self, ClientResponse};

use crate::error::{Error, Result};

/// Bound on one call of [`api`] (vm.create reads and unpacks the tenant kernel; a migration
/// copies a tenant).
pub const API_TIMEOUT: Duration = Duration::from_secs(300);

/// One request on `/api/v1/{path}`, the body sent as is (the API test sends bad bodies too).
pub fn try_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<ClientResponse> {
    http::request(
        socket,
        method,
        &format!("{}{path}", vmm_api::API_PREFIX),
        body.map(str::as_bytes),
        timeout,
    )
    .map_err(|source| Error::Api {
        method: method.into(),
        path: path.into(),
        source,
    })
}

/// [`try_request`]; panics if no answer came.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> ClientResponse {
    try_request(socket, method, path, body, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// A response body as JSON: `null` when empty, a JSON string of the text when not JSON.
pub fn json_body(body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// One request with a JSON body; the status and the JSON body (see [`json_body`]).
pub fn try_call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, Value)> {
    let body = body.map(Value::to_string);
    let r = try_request(socket, method, path, body.as_deref(), timeout)?;
    Ok((r.status, json_body(&r.body)))
}

/// A call that must succeed (2xx); its JSON body.
pub fn try_call_ok(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<Value> {
    let (status, value) = try_call(socket, method, path, body, timeout)?;
    if !(200..300).contains(&status) {
        return Err(Error::Status {
            method: method.into(),
            path: path.into(),
            status,
            body: value.to_string(),
        });
    }
    Ok(value)
}

/// One request (bounded by [`API_TIMEOUT`]); the status and the JSON body. Panics if no answer
/// came.
pub fn api(socket: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    try_call(socket, method, path, body.as_ref(), API_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// An edge's counters (`GET edge.counters`, which must answer 200).
pub fn edge_counters(socket: &Path) -> Value {
    let (status, value) = api(socket, "GET", "edge.counters", None);
    assert_eq!(status, 200, "GET edge.counters: {value}");
    value
}

/// Polls an edge's counters (every millisecond) until `done` holds; panics after `limit`.
pub fn wait_edge_counters(
    socket: &Path,
    limit: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let c = edge_counters(socket);
        if done(&c) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; counters: {c}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The firewall's drops for `reason` in a micro-VM's counters (0 when none was counted).
pub fn drop_count(counters: &Value, reason: &str) -> u64 {
    counters["firewall"]["drops"][reason].as_u64().unwrap_or(0)
}

/// The value of Prometheus sample `name` (no labels) in the text of `GET metrics`.
pub fn metric<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(str::trim)
}

/// A subscription to a process's `/api/v1/events`: each event with the instant it arrived here.
pub struct Events {
    rx: Receiver<(Instant, Value)>,
    timeout: Duration,
}

impl Events {
    /// Subscribes and returns once the stream is live (its first line arrived); `read_timeout`
    /// bounds each read of the stream, `timeout` each [`Events::wait`].
    pub fn subscribe(socket: &Path, read_timeout: Duration, timeout: Duration) -> Result<Events> {
        let path = format!("{}events", vmm_api::API_PREFIX);
        let chunks = http::stream(socket, &path, read_timeout).map_err(|source| Error::Api {
            method: "GET".into(),
            path: "events".into(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Events are newline-terminated; a line may span chunks.
            let mut pending = Vec::new();
            for chunk in chunks {
                let Ok(chunk) = chunk else { return };
                let arrived = Instant::now();
                pending.extend_from_slice(&chunk);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    if let Ok(event) = serde_json::from_slice::<Value>(&line) {
                        if tx.send((arrived, event)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let events = Events { rx, timeout };
        events.wait(|e| e["event"] == "subscribed")?;
        Ok(events)
    }

    /// The next event that `matches`, skipping others.
    pub fn wait(&self, matches: impl Fn(&Value) -> bool) -> Result<(Instant, Value)> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((at, event)) if matches(&event) => return Ok((at, event)),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Events(format!(
                        "the awaited event did not come within {} s",
                        self.timeout.as_secs()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Events("the event stream ended".into()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_reads_an_unlabelled_sample_only() {
        let text = "# HELP x\nvigil_switch_flows_active_total 9\nvigil_switch_flows_active 0\n\
                    vigil_vms{state=\"running\"} 1\n";
        assert_eq!(metric(text, "vigil_switch_flows_active"), Some("0"));
        assert_eq!(metric(text, "vigil_vms"), None);
        assert_eq!(metric(text, "nothing"), None);
    }

    #[test]
    fn a_body_that_is_not_json_is_kept_as_text() {
        assert_eq!(json_body(b""), Value::Null);
        assert_eq!(json_body(b"{\"a\":1}")["a"], 1);
        assert_eq!(json_body(b"oops"), Value::String("oops".into()));
    }

    #[test]
    fn drops_of_an_uncounted_reason_are_zero() {
        let c = serde_json::json!({"firewall": {"drops": {"no_verdict": 3}}});
        assert_eq!(drop_count(&c, "no_verdict"), 3);
        assert_eq!(drop_count(&c, "unknown_tenant"), 0);
    }
}
