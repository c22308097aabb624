//! A small, strict HTTP/1.1 transport for the REST API on a Unix socket (what
//! `curl --unix-socket /run/vigil.sock http://localhost/api/v1/vm.info` speaks).
//!
//! Owns: parsing requests (RFC 9112 message syntax, bounded by [`Limits`]), writing responses
//! (fixed-length or chunked), an event-driven server with a worker pool ([`serve`]) and the client used
//! by `vigil remote` and the tests ([`request`], [`stream`]).
//! Must not: know any endpoint (the handler given to [`serve`] does), trust a byte from the peer
//! (every malformed, oversize or slow request is an [`HttpError`] with its status, never a panic
//! or an unbounded wait), or support what the API does not need (chunked *request* bodies,
//! `Expect: 100-continue`, absolute-form targets, upgrades).
//!
//! Files: this one holds the shared vocabulary (limits, methods, requests, errors, status texts);
//! `parse` reads requests and heads, `response` writes responses, `server` is the server,
//! `client` the client.

mod client;
mod parse;
mod response;
mod server;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::Serialize;

pub use client::{request, stream, Chunks, ClientError, ClientResponse};
pub use parse::{read_head, read_request};
pub use response::{ChunkedWriter, Response};
pub use server::{serve, Handler, Outcome};
// The helpers the parts share.
use parse::*;

/// Bounds on what one connection may send and how long it may take.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request line plus header section, in bytes (over: 431, or 414 for the request line).
    pub max_head: usize,
    /// Header fields per request (over: 431).
    pub max_headers: usize,
    /// Request body, in bytes (over: 413).
    pub max_body: usize,
    /// Connections held at once by [`serve`]; at the limit, the connection idle the longest
    /// is closed for the new one (503 only when every one has a request in a worker).
    pub max_connections: usize,
    /// Threads that run the handler on complete requests (a request waits in a queue for one).
    pub workers: usize,
    /// Streams ([`Outcome::Stream`]) open at once, each on a thread of its own outside the
    /// workers (over: 503 and close).
    pub max_streams: usize,
    /// Longest time for a whole request to arrive from its first byte, and longest wait for the
    /// next request on a kept-alive connection (over: 408, or close when idle).
    pub read_timeout: Duration,
    /// Longest time for the peer to take a response.
    pub write_timeout: Duration,
    /// Requests served on a lane of their own (one worker, its own queue), ahead of any load on
    /// the others: the server's health and stop endpoints answer however busy the rest is.
    pub priority: fn(&Request) -> bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 16 * 1024,
            max_headers: 64,
            max_body: 1024 * 1024,
            max_connections: 4096,
            workers: 8,
            max_streams: 256,
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            priority: |_| false,
        }
    }
}

/// A request method (RFC 9110 §9). Methods the API does not use keep their name in `Other`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Method {
    #[default]
    Get,
    Put,
    Post,
    Delete,
    Patch,
    Head,
    Other(String),
}

impl Method {
    fn parse(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "POST" => Method::Post,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "HEAD" => Method::Head,
            other => Method::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Head => "HEAD",
            Method::Other(name) => name,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protocol version of a request; it decides the default of keep-alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Version {
    Http10,
    #[default]
    Http11,
}

/// A parsed request: path and query are percent-decoded, the body is exactly Content-Length bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub version: Version,
    /// Decoded path, always starting with `/`.
    pub path: String,
    /// Decoded `key=value` pairs in order (`+` is a space, as in form encoding).
    pub query: Vec<(String, String)>,
    /// Header names as sent; compare them with [`Request::header`].
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of header `name` (case-insensitive, RFC 9110 §5.1).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

pub(super) fn find_header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Whether a connection may carry another request after this one (RFC 9112 §9.3).
pub fn should_keep_alive(request: &Request) -> bool {
    let tokens = || {
        request
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
    };
    if tokens().any(|t| t.eq_ignore_ascii_case("close")) {
        return false;
    }
    match request.version {
        Version::Http11 => true,
        Version::Http10 => tokens().any(|t| t.eq_ignore_ascii_case("keep-alive")),
    }
}

/// A request that cannot be served, with the status to answer it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status,
            status_text(self.status),
            self.message
        )
    }
}

impl std::error::Error for HttpError {}

/// The reason phrase of a status code (RFC 9110 §15).
pub fn status_text(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}
