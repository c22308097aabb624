//! The router: the list of routes, finding a request's route, parsing its parameters for the
//! endpoint, and turning the answer into a response.
//!
//! Owns: [`ROUTES`], [`find_route`] (404, 405) and parameter parsing (400). Must not: act on the
//! host other than through an endpoint.

use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use vmm_host::Host;

use crate::endpoints::*;
use crate::error::{error_response, ApiError};
use crate::events_stream::stream_events;
use crate::http::{self, Method, Request, Response};
use crate::metrics::metrics_text;
use crate::API_PREFIX;

/// How a route answers.
#[derive(Clone, Copy)]
pub enum Handler {
    /// JSON request in, JSON (or 204) out.
    Json(fn(&Arc<Host>, &Request) -> Result<Response, ApiError>),
    /// The event stream (chunked, until the client goes away or the host stops).
    Events,
    /// Prometheus text.
    Metrics,
    /// `vmm.shutdown`: JSON in, 204 out, and only once the answer is out is the host asked to
    /// stop ([`Host::request_shutdown`]), so that nothing of the teardown comes before it.
    Shutdown,
}

pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub handler: Handler,
}

/// Parses the parameters of a request for `E`: the JSON body of a PUT, the query string of a GET
/// (public for the fuzz targets: every byte of it comes from the client).
pub fn params<E: Endpoint>(request: &Request) -> Result<E::Request, ApiError> {
    Ok(if E::METHOD == Method::Get {
        if !request.body.is_empty() {
            return Err(ApiError::BadRequest(
                "a GET takes its parameters from the query string, not a body".into(),
            ));
        }
        let mut object = serde_json::Map::new();
        for (key, value) in &request.query {
            if object
                .insert(key.clone(), serde_json::Value::String(value.clone()))
                .is_some()
            {
                return Err(ApiError::BadRequest(format!(
                    "query parameter {key:?} given twice"
                )));
            }
        }
        serde_json::from_value(serde_json::Value::Object(object))
            .map_err(|e| ApiError::BadRequest(format!("query: {e}")))?
    } else {
        let body: &[u8] = if request.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &request.body
        };
        serde_json::from_slice(body).map_err(|e| {
            ApiError::BadRequest(format!(
                "request body: {e} (PUT {}{} takes a JSON object; see vmm/api/openapi.json)",
                API_PREFIX,
                E::PATH
            ))
        })?
    })
}

/// Parses the request for `E` (body for PUT, query for GET) and runs it.
fn run<E: Endpoint>(host: &Arc<Host>, request: &Request) -> Result<Response, ApiError> {
    let params = params::<E>(request)?;
    let response = E::handle(host, params)?;
    let value = serde_json::to_value(&response).map_err(|e| ApiError::Internal(e.to_string()))?;
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
    Route {
        method: <VmmShutdown as Endpoint>::METHOD,
        path: <VmmShutdown as Endpoint>::PATH,
        handler: Handler::Shutdown,
    },
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
pub fn find_route<'r>(routes: &'r [Route], request: &Request) -> Result<&'r Route, ApiError> {
    let Some(path) = request.path.strip_prefix(API_PREFIX) else {
        return Err(ApiError::NoEndpoint(format!(
            "{} is not under {API_PREFIX}",
            request.path
        )));
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
        ApiError::WrongMethod(format!("{} takes {}", request.path, allowed.join(" or ")))
    } else {
        ApiError::NoEndpoint(format!(
            "no endpoint {} (see vmm/api/openapi.json)",
            request.path
        ))
    })
}

pub(crate) fn handle(
    host: &Arc<Host>,
    request: Request,
    server_stop: &Arc<AtomicBool>,
) -> http::Outcome {
    let route = match find_route(ROUTES, &request) {
        Ok(route) => route,
        Err(e) => return http::Outcome::Respond(error_response(&e)),
    };
    let endpoint = request.path.strip_prefix(API_PREFIX).unwrap_or_default();
    if vmm_core::failpoints::check("api.request", endpoint).is_some() {
        return http::Outcome::Respond(error_response(&ApiError::Internal(format!(
            "failpoint api.request (error) at {endpoint}"
        ))));
    }
    match route.handler {
        Handler::Json(f) => http::Outcome::Respond(match f(host, &request) {
            Ok(response) => response,
            Err(e) => error_response(&e),
        }),
        Handler::Shutdown => match run::<VmmShutdown>(host, &request) {
            Ok(response) => {
                let host = host.clone();
                http::Outcome::RespondThen(response, Box::new(move || host.request_shutdown()))
            }
            Err(e) => http::Outcome::Respond(error_response(&e)),
        },
        Handler::Metrics => http::Outcome::Respond(Response::text(
            200,
            "text/plain; version=0.0.4",
            metrics_text(host).into_bytes(),
        )),
        Handler::Events => {
            let stops = [host.shutdown_flag(), server_stop.clone()];
            http::Outcome::Stream(Box::new(move |mut stream: UnixStream| {
                stream_events(&mut stream, &[&stops[0], &stops[1]])
            }))
        }
    }
}
