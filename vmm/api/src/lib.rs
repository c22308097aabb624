//! The REST API on a Unix socket, in cloud-hypervisor's style: `/api/v1/<object>.<action>`,
//! JSON bodies, PUT for actions, GET for reads. Each endpoint is one type implementing
//! [`Endpoint`] with its request and response; [`ROUTES`] lists them all, and
//! `vmm/api/openapi.json` describes the same set (a test checks that they agree).
//!
//! Requests are strict: unknown fields, wrong types, malformed JSON, oversize bodies, unknown VM
//! ids and actions in the wrong state get a 4xx with a JSON `{"error": ...}` that says what is
//! wrong; the host keeps running.

pub mod edge;
pub mod http;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use trap_handler::policy::PolicySpec;

use http::{Method, Request, Response};
use vmm_host::{Host, HostError, VmInfo, VmSpec};

/// Largest request body (a VM spec with a long policy fits many times over).
pub const MAX_BODY: usize = 256 * 1024;
pub const API_PREFIX: &str = "/api/v1/";

/// One API endpoint.
pub trait Endpoint {
    const METHOD: Method;
    /// Path after `/api/v1/`.
    const PATH: &'static str;
    /// From the JSON body (PUT) or the query string (GET).
    type Request: DeserializeOwned;
    type Response: Serialize;
    fn handle(host: &Arc<Host>, request: Self::Request) -> Result<Self::Response, HostError>;
}

/// A request without parameters (unknown ones are refused).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// A request naming one VM.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmId {
    pub id: String,
}

/// Nothing to say but success (HTTP 204).
#[derive(Debug, Serialize)]
pub struct Done {}

#[derive(Debug, Serialize)]
pub struct Pong {
    pub version: &'static str,
    pub host: String,
    pub uptime_s: u64,
    pub kvm: String,
}

pub struct VmmPing;
impl Endpoint for VmmPing {
    const METHOD: Method = Method::Get;
    const PATH: &'static str = "vmm.ping";
    type Request = NoParams;
    type Response = Pong;
    fn handle(host: &Arc<Host>, _: NoParams) -> Result<Pong, HostError> {
        Ok(Pong {
            version: env!("CARGO_PKG_VERSION"),
            host: host.name().to_string(),
            uptime_s: host.uptime().as_secs(),
            kvm: vmm_core::host_kind::HostKind::detect().to_string(),
        })
    }
}

pub struct VmmShutdown;
impl Endpoint for VmmShutdown {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vmm.shutdown";
    type Request = NoParams;
    type Response = Done;
    fn handle(host: &Arc<Host>, _: NoParams) -> Result<Done, HostError> {
        host.shutdown();
        Ok(Done {})
    }
}

pub struct VmCreate;
impl Endpoint for VmCreate {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.create";
    type Request = VmSpec;
    type Response = VmInfo;
    fn handle(host: &Arc<Host>, spec: VmSpec) -> Result<VmInfo, HostError> {
        host.create(spec)
    }
}

pub struct VmBoot;
impl Endpoint for VmBoot {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.boot";
    type Request = VmId;
    type Response = VmInfo;
    fn handle(host: &Arc<Host>, r: VmId) -> Result<VmInfo, HostError> {
        host.boot(&r.id)
    }
}

pub struct VmInfoEndpoint;
impl Endpoint for VmInfoEndpoint {
    const METHOD: Method = Method::Get;
    const PATH: &'static str = "vm.info";
    type Request = VmId;
    type Response = VmInfo;
    fn handle(host: &Arc<Host>, r: VmId) -> Result<VmInfo, HostError> {
        host.info(&r.id)
    }
}

pub struct VmList;
impl Endpoint for VmList {
    const METHOD: Method = Method::Get;
    const PATH: &'static str = "vm.list";
    type Request = NoParams;
    type Response = Vec<VmInfo>;
    fn handle(host: &Arc<Host>, _: NoParams) -> Result<Vec<VmInfo>, HostError> {
        Ok(host.list())
    }
}

pub struct VmDelete;
impl Endpoint for VmDelete {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.delete";
    type Request = VmId;
    type Response = Done;
    fn handle(host: &Arc<Host>, r: VmId) -> Result<Done, HostError> {
        host.delete(&r.id).map(|()| Done {})
    }
}

pub struct VmPause;
impl Endpoint for VmPause {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.pause";
    type Request = VmId;
    type Response = VmInfo;
    fn handle(host: &Arc<Host>, r: VmId) -> Result<VmInfo, HostError> {
        host.pause(&r.id)
    }
}

pub struct VmResume;
impl Endpoint for VmResume {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.resume";
    type Request = VmId;
    type Response = VmInfo;
    fn handle(host: &Arc<Host>, r: VmId) -> Result<VmInfo, HostError> {
        host.resume(&r.id)
    }
}

/// `vm.snapshot` / `vm.send-migration`: a VM and where its state goes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDestination {
    pub id: String,
    /// `file:///dir` (snapshot) or `unix:/path` (migration).
    pub destination_url: String,
}

/// `vm.restore`: where a snapshot is.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSource {
    pub source_url: String,
}

/// `vm.receive-migration`: where to listen for the source host.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmReceiver {
    pub receiver_url: String,
}

pub struct VmSnapshot;
impl Endpoint for VmSnapshot {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.snapshot";
    type Request = VmDestination;
    type Response = serde_json::Value;
    fn handle(host: &Arc<Host>, r: VmDestination) -> Result<serde_json::Value, HostError> {
        host.snapshot(&r.id, &r.destination_url)
    }
}

pub struct VmRestore;
impl Endpoint for VmRestore {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.restore";
    type Request = VmSource;
    type Response = VmInfo;
    fn handle(host: &Arc<Host>, r: VmSource) -> Result<VmInfo, HostError> {
        host.restore(&r.source_url)
    }
}

pub struct VmSendMigration;
impl Endpoint for VmSendMigration {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.send-migration";
    type Request = VmDestination;
    type Response = serde_json::Value;
    fn handle(host: &Arc<Host>, r: VmDestination) -> Result<serde_json::Value, HostError> {
        host.send_migration(&r.id, &r.destination_url)
    }
}

pub struct VmReceiveMigration;
impl Endpoint for VmReceiveMigration {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.receive-migration";
    type Request = VmReceiver;
    type Response = Done;
    fn handle(host: &Arc<Host>, r: VmReceiver) -> Result<Done, HostError> {
        host.receive_migration(&r.receiver_url).map(|()| Done {})
    }
}

pub struct VmPolicyGet;
impl Endpoint for VmPolicyGet {
    const METHOD: Method = Method::Get;
    const PATH: &'static str = "vm.policy";
    type Request = VmId;
    type Response = PolicySpec;
    fn handle(host: &Arc<Host>, r: VmId) -> Result<PolicySpec, HostError> {
        host.policy(&r.id)
    }
}

/// `PUT vm.policy`: the VM and its new policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyReplace {
    pub id: String,
    pub policy: PolicySpec,
}

pub struct VmPolicyPut;
impl Endpoint for VmPolicyPut {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.policy";
    type Request = PolicyReplace;
    type Response = Done;
    fn handle(host: &Arc<Host>, r: PolicyReplace) -> Result<Done, HostError> {
        host.replace_policy(&r.id, r.policy).map(|()| Done {})
    }
}

/// How a route answers.
#[derive(Clone, Copy)]
pub enum Handler {
    /// JSON request in, JSON (or 204) out.
    Json(fn(&Arc<Host>, &Request) -> Result<Response, HostError>),
    /// The event stream (chunked, until the client goes away or the host stops).
    Events,
    /// Prometheus text.
    Metrics,
}

pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub handler: Handler,
}

/// Parses the request for `E` (body for PUT, query for GET) and runs it.
fn run<E: Endpoint>(host: &Arc<Host>, request: &Request) -> Result<Response, HostError> {
    let params: E::Request = if E::METHOD == Method::Get {
        if !request.body.is_empty() {
            return Err(HostError::bad_request(
                "a GET takes its parameters from the query string, not a body",
            ));
        }
        let mut object = serde_json::Map::new();
        for (key, value) in &request.query {
            if object
                .insert(key.clone(), serde_json::Value::String(value.clone()))
                .is_some()
            {
                return Err(HostError::bad_request(format!(
                    "query parameter {key:?} given twice"
                )));
            }
        }
        serde_json::from_value(serde_json::Value::Object(object))
            .map_err(|e| HostError::bad_request(format!("query: {e}")))?
    } else {
        let body: &[u8] = if request.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &request.body
        };
        serde_json::from_slice(body).map_err(|e| {
            HostError::bad_request(format!(
                "request body: {e} (PUT {}{} takes a JSON object; see vmm/api/openapi.json)",
                API_PREFIX,
                E::PATH
            ))
        })?
    };
    let response = E::handle(host, params)?;
    let value = serde_json::to_value(&response).map_err(|e| HostError::internal(e.to_string()))?;
    if value == serde_json::json!({}) {
        Ok(Response::empty(204))
    } else {
        Ok(Response::json(200, &value))
    }
}

macro_rules! route {
    ($e:ty) => {
        Route {
            method: <$e as Endpoint>::METHOD,
            path: <$e as Endpoint>::PATH,
            handler: Handler::Json(run::<$e>),
        }
    };
}

/// Every route of a host's API.
pub const ROUTES: &[Route] = &[
    route!(VmmPing),
    route!(VmmShutdown),
    route!(VmCreate),
    route!(VmBoot),
    route!(VmInfoEndpoint),
    route!(VmList),
    route!(VmDelete),
    route!(VmPause),
    route!(VmResume),
    route!(VmSnapshot),
    route!(VmRestore),
    route!(VmSendMigration),
    route!(VmReceiveMigration),
    route!(VmPolicyGet),
    route!(VmPolicyPut),
    Route {
        method: Method::Get,
        path: "events",
        handler: Handler::Events,
    },
    Route {
        method: Method::Get,
        path: "metrics",
        handler: Handler::Metrics,
    },
];

/// Finds the route of a request: Ok(route), or the error to answer (404 unknown path, 405
/// known path with another method).
pub fn find_route<'r>(routes: &'r [Route], request: &Request) -> Result<&'r Route, HostError> {
    let Some(path) = request.path.strip_prefix(API_PREFIX) else {
        return Err(HostError {
            status: 404,
            message: format!("{} is not under {API_PREFIX}", request.path),
        });
    };
    let mut known_path = false;
    for route in routes {
        if route.path == path {
            known_path = true;
            if route.method == request.method {
                return Ok(route);
            }
        }
    }
    Err(if known_path {
        let allowed: Vec<String> = routes
            .iter()
            .filter(|r| r.path == path)
            .map(|r| format!("{:?}", r.method).to_uppercase())
            .collect();
        HostError {
            status: 405,
            message: format!("{} takes {}", request.path, allowed.join(" or ")),
        }
    } else {
        HostError {
            status: 404,
            message: format!("no endpoint {} (see vmm/api/openapi.json)", request.path),
        }
    })
}

fn metric(out: &mut String, name: &str, help: &str, kind: &str, samples: &[(String, f64)]) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// The host's counters in Prometheus text format (version 0.0.4).
pub fn metrics_text(host: &Host) -> String {
    let mut out = String::new();
    let vms = host.list();
    let mut by_state = std::collections::BTreeMap::new();
    for vm in &vms {
        *by_state
            .entry(format!("{:?}", vm.state).to_lowercase())
            .or_insert(0.0) += 1.0;
    }
    metric(
        &mut out,
        "vigil_vms",
        "Tenant VMs on this host by state.",
        "gauge",
        &by_state
            .into_iter()
            .map(|(s, n)| (format!("{{state=\"{s}\"}}"), n))
            .collect::<Vec<_>>(),
    );
    if let Some(c) = host.switch_counters() {
        for (name, help, value) in [
            (
                "vigil_switch_forwarded_total",
                "Frames the switch tier forwarded.",
                c.forwarded,
            ),
            (
                "vigil_switch_verdicts_applied_total",
                "Verdict and control records the switch applied.",
                c.verdicts_applied,
            ),
            (
                "vigil_switch_verdicts_rejected_total",
                "Verdict records the switch rejected.",
                c.verdicts_rejected,
            ),
            (
                "vigil_switch_flows_created_total",
                "Flows the switch opened.",
                c.flows_created,
            ),
            (
                "vigil_switch_flows_adopted_total",
                "Established flows the switch took over from a migrated tenant.",
                c.flows_adopted,
            ),
            (
                "vigil_switch_flows_revoked_total",
                "Flows the switch closed because their verdict or tenant went away.",
                c.flows_revoked,
            ),
        ] {
            metric(
                &mut out,
                name,
                help,
                "counter",
                &[(String::new(), value as f64)],
            );
        }
        metric(
            &mut out,
            "vigil_switch_flows_active",
            "Conntrack entries in use in the switch.",
            "gauge",
            &[(String::new(), c.flows_active as f64)],
        );
        metric(
            &mut out,
            "vigil_switch_dropped_total",
            "Frames the switch dropped, by reason.",
            "counter",
            &c.drops
                .iter()
                .map(|(r, n)| (format!("{{reason=\"{r}\"}}"), *n as f64))
                .collect::<Vec<_>>(),
        );
    }
    if let Some((sent, errors)) = host.edge_counters() {
        metric(
            &mut out,
            "vigil_edge_records_sent_total",
            "Verdict records signed and sent to the edge.",
            "counter",
            &[(String::new(), sent as f64)],
        );
        metric(
            &mut out,
            "vigil_edge_send_errors_total",
            "Datagrams to the edge that could not be sent.",
            "counter",
            &[(String::new(), errors as f64)],
        );
    }
    let times = host.reconfig_times();
    metric(
        &mut out,
        "vigil_reconfig_last_ms",
        "Milliseconds from the last reconfiguration to the switch tier applying it.",
        "gauge",
        &[
            ("create", times.create_ms),
            ("delete", times.delete_ms),
            ("policy", times.policy_ms),
        ]
        .into_iter()
        .filter_map(|(a, v)| v.map(|v| (format!("{{action=\"{a}\"}}"), v)))
        .collect::<Vec<_>>(),
    );
    let bus = vmm_core::events::bus();
    metric(
        &mut out,
        "vigil_events_total",
        "Events published on this host.",
        "counter",
        &[(
            String::new(),
            bus.published.load(std::sync::atomic::Ordering::Relaxed) as f64,
        )],
    );
    out
}

/// Serves `routes` for `host` on `listener` until the host shuts down (`vmm.shutdown`) or `stop`
/// is set.
pub fn serve(host: Arc<Host>, listener: UnixListener, stop: Arc<AtomicBool>) {
    let handler_host = host.clone();
    let handler_stop = stop.clone();
    let handler = Arc::new(move |request: Request, stream: &mut UnixStream| {
        handle(&handler_host, request, stream, &handler_stop)
    });
    let shutdown = host.shutdown_flag();
    let watcher_stop = stop.clone();
    // `vmm.shutdown` sets the host's flag; the server stops with it.
    std::thread::spawn(move || {
        while !shutdown.load(std::sync::atomic::Ordering::Acquire)
            && !watcher_stop.load(std::sync::atomic::Ordering::Acquire)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        watcher_stop.store(true, std::sync::atomic::Ordering::Release);
    });
    http::serve(listener, limits(), handler, stop);
}

pub fn limits() -> http::Limits {
    http::Limits {
        max_body: MAX_BODY,
        ..http::Limits::default()
    }
}

fn handle(
    host: &Arc<Host>,
    request: Request,
    stream: &mut UnixStream,
    server_stop: &AtomicBool,
) -> http::Outcome {
    let route = match find_route(ROUTES, &request) {
        Ok(route) => route,
        Err(e) => return http::Outcome::Respond(Response::error(e.status, &e.message)),
    };
    match route.handler {
        Handler::Json(f) => http::Outcome::Respond(match f(host, &request) {
            Ok(response) => response,
            Err(e) => Response::error(e.status, &e.message),
        }),
        Handler::Metrics => http::Outcome::Respond(Response::text(
            200,
            "text/plain; version=0.0.4",
            metrics_text(host).into_bytes(),
        )),
        Handler::Events => {
            stream_events(stream, &[&host.shutdown_flag(), server_stop]);
            http::Outcome::Streamed
        }
    }
}

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

/// Binds the API socket (replacing a stale one no process listens on).
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{} is in use by a running server (stop it, or pick another --api-socket)",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openapi() -> serde_json::Value {
        let text = include_str!("../openapi.json");
        serde_json::from_str(text).expect("vmm/api/openapi.json is JSON")
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
            ("VmSource", vec!["source_url"]),
            ("VmReceiver", vec!["receiver_url"]),
            ("PolicyReplace", vec!["id", "policy"]),
        ] {
            assert_eq!(fields(name).1, required, "{name}");
        }
    }
}
