//! The host API as a client reaches it: one connection's bytes through the HTTP request parser
//! (pipelined requests, until the stream ends or a request is refused), each request routed and
//! its parameters parsed for every endpoint (the JSON body of a PUT, the query of a GET), a
//! policy compiled where one parsed, and the answer written.
//!
//! Input: the connection's bytes.
//!
//! Invariants: a refused request gets a 4xx/5xx status; a route found matches the request's
//! method and path; a parsed policy compiles or fails with an error (no panic), and survives a
//! JSON round trip.

use std::io::Cursor;

use trap_handler::policy::{Policy, PolicySpec};
use vmm_api::http::{read_request, should_keep_alive, Limits, Request, Response};
use vmm_api::{find_route, params, status_of, ApiError, Endpoint, ROUTES};

pub fn run(data: &[u8]) {
    let limits = Limits {
        max_head: 4096,
        max_headers: 32,
        max_body: 64 * 1024,
        ..Limits::default()
    };
    let mut stream = Cursor::new(data);
    for _ in 0..16 {
        let request = match read_request(&mut stream, &limits) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                assert!(
                    (400..600).contains(&e.status),
                    "status {} for {e}",
                    e.status
                );
                answer(&Response::error(e.status, &e.message));
                return;
            }
        };
        let keep_alive = should_keep_alive(&request);
        match find_route(ROUTES, &request) {
            Ok(route) => {
                assert_eq!(route.method, request.method);
                assert_eq!(
                    request.path,
                    format!("{}{}", vmm_api::API_PREFIX, route.path)
                );
            }
            Err(e) => refused(&e),
        }
        endpoints(&request);
        if !keep_alive {
            return;
        }
    }
}

fn answer(response: &Response) {
    let mut out = Vec::new();
    response.write_to(&mut out, false).expect("write to a Vec");
    assert!(
        out.starts_with(b"HTTP/1.1 "),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}

fn refused(e: &ApiError) {
    let status = status_of(e);
    assert!((400..600).contains(&status), "status {status} for {e}");
    answer(&Response::error(status, &e.to_string()));
}

fn try_params<E: Endpoint>(request: &Request) -> Option<E::Request> {
    match params::<E>(request) {
        Ok(p) => Some(p),
        Err(e) => {
            refused(&e);
            None
        }
    }
}

fn policy(spec: &PolicySpec) {
    let compiled = Policy::compile(spec);
    let text = serde_json::to_string(spec).expect("a policy serializes");
    let again: PolicySpec = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("a parsed policy does not parse back: {e}: {text}"));
    assert_eq!(&again, spec, "the JSON round trip changed the policy");
    assert_eq!(
        compiled.is_ok(),
        Policy::compile(&again).is_ok(),
        "the round trip changed whether the policy compiles: {text}"
    );
}

/// Every endpoint's parameters, whatever the route: the parsers see every request.
fn endpoints(request: &Request) {
    use vmm_api::*;
    if let Some(spec) = try_params::<VmCreate>(request) {
        policy(&spec.policy);
    }
    if let Some(r) = try_params::<VmPolicyPut>(request) {
        policy(&r.policy);
    }
    try_params::<VmmPing>(request);
    try_params::<VmBoot>(request);
    try_params::<VmInfoEndpoint>(request);
    try_params::<VmSnapshot>(request);
    try_params::<VmRestore>(request);
    try_params::<VmSendMigration>(request);
    try_params::<VmReceiveMigration>(request);
}
