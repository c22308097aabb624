//! Calls on a host's or an edge's REST API, with Vigil's own client.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use vmm_api::http;

/// One request; the status and the JSON body (`null` when the body is not JSON).
pub fn api(socket: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let r = http::request(
        socket,
        method,
        &format!("/api/v1/{path}"),
        body.as_deref().map(str::as_bytes),
        Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, value)
}

pub fn edge_counters(socket: &Path) -> Value {
    let (status, value) = api(socket, "GET", "edge.counters", None);
    assert_eq!(status, 200, "{value}");
    value
}

pub fn drop_count(counters: &Value, reason: &str) -> u64 {
    counters["firewall"]["drops"][reason].as_u64().unwrap_or(0)
}
