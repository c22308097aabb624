//! The REST API on a Unix socket, in cloud-hypervisor's style: `/api/v1/<object>.<action>`,
//! JSON bodies, PUT for actions, GET for reads. Each endpoint is one type implementing
//! [`Endpoint`] with its request and response; [`ROUTES`] lists them all, and
//! `vmm/api/openapi.json` describes the same set (a test checks that they agree).
//!
//! Requests are strict: unknown fields, wrong types, malformed JSON, oversize bodies, unknown VM
//! ids and actions in the wrong state get a 4xx with a JSON `{"error": ...}` that says what is
//! wrong; the host keeps running.

pub mod edge;
mod endpoints;
mod error;
mod events_stream;
pub mod http;
mod metrics;
mod routes;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use vmm_host::Host;

pub use endpoints::*;
pub use error::{status_of, ApiError};
pub use events_stream::stream_events;
pub use metrics::metrics_text;
pub use routes::{find_route, params, Handler, Route, ROUTES};

/// Largest request body (a VM spec with a long policy fits many times over).
pub const MAX_BODY: usize = 256 * 1024;
pub const API_PREFIX: &str = "/api/v1/";

/// Serves `routes` for `host` on `listener` until the host is asked to shut down
/// (`vmm.shutdown`) or `stop` is set; then tears the host down ([`Host::shutdown`]) while the
/// server drains its clients, and returns once both are done. `vmm.shutdown` itself only asks
/// ([`Host::request_shutdown`]): its answer goes out at once, and the teardown never waits on a
/// client (nor the clients on the teardown).
pub fn serve(host: Arc<Host>, listener: UnixListener, stop: Arc<AtomicBool>) {
    let handler_host = host.clone();
    let handler_stop = stop.clone();
    let handler =
        Arc::new(move |request: Request| routes::handle(&handler_host, request, &handler_stop));
    let watcher_stop = stop.clone();
    let watcher = std::thread::Builder::new()
        .name("vigil-api-stop".into())
        .spawn(move || {
            while !host.wait_shutdown_requested(STOP_WAIT)
                && !watcher_stop.load(std::sync::atomic::Ordering::Acquire)
            {}
            watcher_stop.store(true, std::sync::atomic::Ordering::Release);
            host.shutdown();
        });
    http::serve(listener, limits(), handler, stop);
    if let Ok(watcher) = watcher {
        let _ = watcher.join();
    }
}

/// How often the stop watcher looks at `stop` (set by a signal) between shutdown requests,
/// which wake it at once.
const STOP_WAIT: Duration = Duration::from_millis(50);

pub fn limits() -> http::Limits {
    http::Limits {
        max_body: MAX_BODY,
        priority: is_control,
        ..http::Limits::default()
    }
}

/// `vmm.ping`, `vmm.shutdown` (and the edge's `edge.ping`, `edge.shutdown`): answered on the
/// server's priority lane, whatever load the other endpoints carry.
fn is_control(request: &Request) -> bool {
    matches!(
        request.path.strip_prefix(API_PREFIX),
        Some("vmm.ping" | "vmm.shutdown" | "edge.ping" | "edge.shutdown")
    )
}

/// Why the API socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{0} is in use by a running server (stop it, or pick another --api-socket)")]
    InUse(std::path::PathBuf),
    #[error("cannot remove the stale socket {path}: {source}")]
    Stale {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0} exists and is not a socket: it is left alone (pick another --api-socket)")]
    NotASocket(std::path::PathBuf),
    #[error("cannot bind {path}: {source}")]
    Bind {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Binds the API socket (replacing a stale socket no process listens on; anything else at the
/// path is refused).
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    use std::os::unix::fs::FileTypeExt;
    // Only a socket is ever removed: a mistyped --api-socket must not delete a file.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| BindError::Stale {
            path: path.to_path_buf(),
            source,
        })?;
    }
    UnixListener::bind(path).map_err(|source| BindError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_host::VmSpec;

    fn openapi() -> serde_json::Value {
        let text = include_str!("../openapi.json");
        serde_json::from_str(text).expect("vmm/api/openapi.json is JSON")
    }

    #[test]
    fn binding_replaces_only_a_stale_socket() {
        let dir = std::env::temp_dir().join(format!("vigil-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("notes.txt");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(bind(&file), Err(BindError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me", "left alone");
        let socket = dir.join("api.sock");
        let live = bind(&socket).unwrap();
        assert!(matches!(bind(&socket), Err(BindError::InUse(_))));
        drop(live);
        bind(&socket).expect("a stale socket is replaced");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The OpenAPI file and the server describe the same endpoints: every route is documented
    /// with its method, and every documented operation is served.
    #[test]
    fn openapi_file_matches_the_routes() {
        let doc = openapi();
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented = std::collections::BTreeSet::new();
        for (path, ops) in paths {
            for method in ops.as_object().unwrap().keys() {
                documented.insert((
                    method.to_uppercase(),
                    path.trim_start_matches('/').to_string(),
                ));
            }
        }
        let served: std::collections::BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.as_str().to_string(), r.path.to_string()))
            .collect();
        assert_eq!(documented, served);
        assert_eq!(doc["servers"][0]["url"], "http://localhost/api/v1");
    }

    /// The request schemas name the fields the request types accept (unknown fields are refused
    /// by both), and the required ones are the ones without defaults.
    #[test]
    fn openapi_request_schemas_match_the_types() {
        let doc = openapi();
        let schemas = &doc["components"]["schemas"];
        let fields = |name: &str| -> (Vec<String>, Vec<String>) {
            let s = &schemas[name];
            assert_eq!(
                s["additionalProperties"], false,
                "{name} must refuse unknown fields"
            );
            let mut all: Vec<String> = s["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            let mut required: Vec<String> = s["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            all.sort();
            required.sort();
            (all, required)
        };
        // Serialize a full spec and check the schema lists exactly its fields.
        let spec: VmSpec = serde_json::from_value(serde_json::json!({
            "id": "a", "kernel": "/k", "initramfs": "/i", "mac": "52:54:00:00:00:01",
            "ip": "10.0.0.2", "policy": {"allow": []}}))
        .unwrap();
        let mut keys: Vec<String> = serde_json::to_value(&spec)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        keys.sort();
        let (all, required) = fields("VmSpec");
        assert_eq!(all, keys);
        assert_eq!(required, ["id", "ip", "kernel", "mac", "policy"]);
        // Every required field really is required: leaving one out is refused.
        for field in &required {
            let mut value = serde_json::to_value(&spec).unwrap();
            value.as_object_mut().unwrap().remove(field);
            assert!(serde_json::from_value::<VmSpec>(value).is_err(), "{field}");
        }
        for (name, required) in [
            ("VmId", vec!["id"]),
            ("VmDestination", vec!["destination_url", "id"]),
            ("VmMigration", vec!["destination_url", "id"]),
            ("VmSource", vec!["source_url"]),
            ("VmReceiver", vec!["receiver_url"]),
            ("PolicyReplace", vec!["id", "policy"]),
        ] {
            assert_eq!(fields(name).1, required, "{name}");
        }
    }
}
