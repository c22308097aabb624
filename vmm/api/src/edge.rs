//! The edge node's small API: `edge.ping`, `edge.counters`, `metrics`, `events` and
//! `edge.shutdown`, served on a Unix socket by the same HTTP server as the host's API.
//!
//! Owns: the mapping of the edge node's state to HTTP. Must not: change the node's behaviour
//! (that is `edge::node`'s).

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use edge::node::Edge;

use crate::http::{self, Method, Request, Response};

/// Serves the edge's API until the node stops.
pub fn serve(edge: Arc<Edge>, listener: UnixListener) {
    let stop = edge.stop_flag();
    let handler = Arc::new(move |request: Request| handle(&edge, request));
    http::serve(listener, crate::limits(), handler, stop);
}

fn handle(edge: &Arc<Edge>, request: Request) -> http::Outcome {
    let path = request.path.strip_prefix(crate::API_PREFIX);
    let response = match (&request.method, path) {
        (Method::Get, Some("edge.ping")) => Response::json(
            200,
            &serde_json::json!({
                "edge": edge.name(),
                "uptime_s": edge.uptime().as_secs(),
                "control": edge.control_addr().to_string(),
                "boot_id": edge.boot_id(),
                "running": edge.running(),
                // The micro-VM formats its counters once its tables and ports are up.
                "ready": edge.counters().is_some(),
            }),
        ),
        (Method::Get, Some("edge.counters")) => {
            let (hosts, refused) = edge.underlay_counters();
            Response::json(
                200,
                &serde_json::json!({
                    "firewall": edge.counters(),
                    "accepted_records": edge.accepted_records(),
                    "rejected": edge.rejected(),
                    "channel": edge.channel_counters(),
                    "underlay": {"trusted_hosts": hosts, "refused_frames": refused,
                        "foreign_source_frames": edge.foreign_source_frames()},
                    "ownership": edge.ownership(),
                }),
            )
        }
        (Method::Get, Some("metrics")) => Response::text(
            200,
            "text/plain; version=0.0.4",
            metrics_text(edge).into_bytes(),
        ),
        (Method::Get, Some("events")) => {
            let stop = edge.stop_flag();
            return http::Outcome::Stream(Box::new(move |mut stream: UnixStream| {
                crate::stream_events(&mut stream, &[&stop])
            }));
        }
        (Method::Put, Some("edge.shutdown")) => {
            // Answered first; the node's teardown (its micro-VM's thread joined) runs after the
            // 204 is written, on a thread of its own, so no client waits for it.
            let edge = edge.clone();
            return http::Outcome::RespondThen(
                Response::empty(204),
                Box::new(move || {
                    let stopper = edge.clone();
                    let spawned = std::thread::Builder::new()
                        .name("edge-shutdown".into())
                        .spawn(move || stopper.stop());
                    if spawned.is_err() {
                        edge.stop();
                    }
                }),
            );
        }
        (_, Some("edge.ping" | "edge.counters" | "metrics" | "events" | "edge.shutdown")) => {
            Response::error(405, "wrong method (GET for reads, PUT for edge.shutdown)")
        }
        _ => Response::error(
            404,
            &format!(
                "no endpoint {} on an edge (edge.ping, edge.counters, metrics, events, \
                 edge.shutdown)",
                request.path
            ),
        ),
    };
    http::Outcome::Respond(response)
}

fn metrics_text(edge: &Edge) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    line(
        "vigil_edge_accepted_records_total",
        "counter",
        "Verdict records accepted from hosts.",
        vec![(String::new(), edge.accepted_records() as f64)],
    );
    line(
        "vigil_edge_rejected_datagrams_total",
        "counter",
        "Verdict datagrams rejected (forged, replayed, malformed), by reason.",
        edge.rejected()
            .into_iter()
            .map(|(r, n)| (format!("{{reason=\"{r}\"}}"), n as f64))
            .collect(),
    );
    let channel = edge.channel_counters();
    for (name, key, kind, help) in [
        (
            "vigil_edge_duplicate_datagrams_total",
            "duplicates",
            "counter",
            "Authentic verdict datagrams applied before (retransmissions), ignored and acked again.",
        ),
        (
            "vigil_edge_held_datagrams",
            "held_now",
            "gauge",
            "Verdict datagrams held ahead of a gap in their host's sequence.",
        ),
        (
            "vigil_edge_acks_sent_total",
            "acks_sent",
            "counter",
            "Acknowledgements sent to hosts.",
        ),
        (
            "vigil_edge_host_restarts_total",
            "sender_restarts",
            "counter",
            "Hosts that started a new run (their previous run's tenants are flushed).",
        ),
    ] {
        line(
            name,
            kind,
            help,
            vec![(String::new(), channel[key].as_f64().unwrap_or(0.0))],
        );
    }
    let (hosts, refused) = edge.underlay_counters();
    line(
        "vigil_edge_trusted_hosts",
        "gauge",
        "Underlay addresses of hosts that authenticated on the verdict channel.",
        vec![(String::new(), hosts as f64)],
    );
    line(
        "vigil_edge_underlay_refused_total",
        "counter",
        "VXLAN datagrams refused because their underlay sender is not an authenticated host.",
        vec![(String::new(), refused as f64)],
    );
    line(
        "vigil_edge_foreign_source_total",
        "counter",
        "VXLAN frames refused because they spoke for an address another host (or the underlay) holds.",
        vec![(String::new(), edge.foreign_source_frames() as f64)],
    );
    line(
        "vigil_edge_refused_records_total",
        "counter",
        "Authentic host records refused: they named another host's tenant or address, or the underlay's.",
        vec![(String::new(), edge.refused_records() as f64)],
    );
    line(
        "vigil_edge_last_apply_ms",
        "gauge",
        "Milliseconds from receipt of the last accepted datagram to the micro-VM taking it.",
        vec![(String::new(), edge.last_apply_us() as f64 / 1e3)],
    );
    if let Some(c) = edge.counters() {
        line(
            "vigil_edge_forwarded_total",
            "counter",
            "Frames the edge forwarded.",
            vec![(String::new(), c.forwarded as f64)],
        );
        line(
            "vigil_edge_flows_active",
            "gauge",
            "Conntrack entries in use at the edge.",
            vec![(String::new(), c.flows_active as f64)],
        );
        line(
            "vigil_edge_dropped_total",
            "counter",
            "Frames the edge dropped, by reason.",
            c.drops
                .iter()
                .map(|(r, n)| (format!("{{reason=\"{r}\"}}"), *n as f64))
                .collect(),
        );
    }
    out
}
