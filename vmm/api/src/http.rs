//! A small, strict HTTP/1.1 transport for the REST API on a Unix socket (what
//! `curl --unix-socket /run/vigil.sock http://localhost/api/v1/vm.info` speaks).
//!
//! Owns: parsing requests (RFC 9112 message syntax, bounded by [`Limits`]), writing responses
//! (fixed-length or chunked), a thread-per-connection accept loop ([`serve`]) and the client used
//! by `vigil remote` and the tests ([`request`], [`stream`]).
//! Must not: know any endpoint (the handler given to [`serve`] does), trust a byte from the peer
//! (every malformed, oversize or slow request is an [`HttpError`] with its status, never a panic
//! or an unbounded wait), or support what the API does not need (chunked *request* bodies,
//! `Expect: 100-continue`, absolute-form targets, upgrades).

use std::collections::HashMap;
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

/// Bounds on what one connection may send and how long it may take.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request line plus header section, in bytes (over: 431, or 414 for the request line).
    pub max_head: usize,
    /// Header fields per request (over: 431).
    pub max_headers: usize,
    /// Request body, in bytes (over: 413).
    pub max_body: usize,
    /// Connections served at once by [`serve`] (over: 503 and close).
    pub max_connections: usize,
    /// Longest wait for the next byte of a request, or for the next request on a kept-alive
    /// connection (over: 408 and close).
    pub read_timeout: Duration,
    /// Longest wait for the peer to take response bytes.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 16 * 1024,
            max_headers: 64,
            max_body: 1024 * 1024,
            max_connections: 64,
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
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

fn find_header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
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

// ---------------------------------------------------------------------------------------------
// Reading lines and heads (shared by server and client)

/// Why a line could not be read.
enum LineError {
    Io(io::Error),
    /// The byte budget of the head ran out.
    TooLong,
    /// A CR not followed by LF (RFC 9112 §2.2: reject rather than guess).
    BareCr,
    /// EOF after `read` bytes of the line.
    Eof {
        read: usize,
    },
}

/// Reads one line ending in LF (a CR before it is dropped), one byte at a time so that nothing
/// after the line is consumed: a pipelined request stays in the stream. Callers hand in a
/// `BufReader` so this costs no system call per byte. `budget` is what is left of the head.
fn read_line(r: &mut impl Read, budget: &mut usize) -> Result<Vec<u8>, LineError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) => return Err(LineError::Eof { read: line.len() }),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineError::Io(e)),
        }
        if *budget == 0 {
            return Err(LineError::TooLong);
        }
        *budget -= 1;
        if byte[0] == b'\n' {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.contains(&b'\r') {
                return Err(LineError::BareCr);
            }
            return Ok(line);
        }
        line.push(byte[0]);
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// `tchar` of RFC 9110 §5.6.2: what method and header names are made of.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Splits `name: value` (RFC 9112 §5: no whitespace before the colon, OWS around the value).
fn parse_header_line(line: &[u8]) -> Result<(String, String), String> {
    let text = std::str::from_utf8(line).map_err(|_| "header line is not UTF-8".to_string())?;
    if text.starts_with([' ', '\t']) {
        return Err("obsolete line folding in the header section".into());
    }
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("header line without a colon: {text:?}"))?;
    if !is_token(name) {
        return Err(format!("bad header name {name:?}"));
    }
    let value = value.trim_matches([' ', '\t']);
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(format!("control character in header {name}"));
    }
    Ok((name.to_string(), value.to_string()))
}

/// The single body length the Content-Length fields agree on (RFC 9112 §6.3: differing values
/// are an error). `Ok(None)`: no Content-Length. `Err(Some(n))` would be over `max`.
fn content_length(headers: &[(String, String)], max: usize) -> Result<Option<usize>, HttpError> {
    let mut length: Option<usize> = None;
    let values = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim);
    for value in values {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::new(
                400,
                format!("Content-Length {value:?} is not a number"),
            ));
        }
        // All digits: a parse failure can only be overflow, which is over any limit.
        let n = value.parse::<usize>().unwrap_or(usize::MAX);
        if length.is_some_and(|l| l != n) {
            return Err(HttpError::new(
                400,
                "Content-Length given twice with different values",
            ));
        }
        length = Some(n);
    }
    match length {
        Some(n) if n > max => Err(HttpError::new(
            413,
            format!("body of {n} bytes is over the limit of {max}"),
        )),
        other => Ok(other),
    }
}

// ---------------------------------------------------------------------------------------------
// Server side: requests

/// Reads one request. `Ok(None)`: the peer closed the connection before sending a byte (the end
/// of a kept-alive connection). The caller sets the read timeout on the socket; a timeout gives
/// 408, EOF inside a request 400.
pub fn read_request(stream: &mut impl Read, limits: &Limits) -> Result<Option<Request>, HttpError> {
    let mut budget = limits.max_head;
    let io_error = |e: io::Error, started: bool| {
        if is_timeout(&e) {
            let what = if started {
                "the rest of the request"
            } else {
                "a request"
            };
            HttpError::new(408, format!("timed out waiting for {what}"))
        } else {
            HttpError::new(400, format!("reading the request: {e}"))
        }
    };

    // RFC 9112 §2.2: empty lines before the request line are ignored (budget still applies).
    let request_line = loop {
        let started = budget < limits.max_head;
        match read_line(stream, &mut budget) {
            Ok(line) if line.is_empty() => continue,
            Ok(line) => break line,
            Err(LineError::Eof { read: 0 }) if !started => return Ok(None),
            Err(LineError::Eof { .. }) => {
                return Err(HttpError::new(
                    400,
                    "connection closed inside the request line",
                ))
            }
            Err(LineError::Io(e)) => return Err(io_error(e, started)),
            Err(LineError::TooLong) => {
                return Err(HttpError::new(
                    414,
                    format!("request line longer than {} bytes", limits.max_head),
                ))
            }
            Err(LineError::BareCr) => return Err(HttpError::new(400, "bare CR in request line")),
        }
    };
    let (method, target, version) = parse_request_line(&request_line)?;
    let (path, query) = parse_target(target)?;

    let mut headers = Vec::new();
    loop {
        let line = match read_line(stream, &mut budget) {
            Ok(line) => line,
            Err(LineError::Eof { .. }) => {
                return Err(HttpError::new(
                    400,
                    "connection closed inside the header section",
                ))
            }
            Err(LineError::Io(e)) => return Err(io_error(e, true)),
            Err(LineError::TooLong) => {
                return Err(HttpError::new(
                    431,
                    format!("header section longer than {} bytes", limits.max_head),
                ))
            }
            Err(LineError::BareCr) => return Err(HttpError::new(400, "bare CR in a header")),
        };
        if line.is_empty() {
            break;
        }
        if headers.len() == limits.max_headers {
            return Err(HttpError::new(
                431,
                format!("more than {} header fields", limits.max_headers),
            ));
        }
        headers.push(parse_header_line(&line).map_err(|m| HttpError::new(400, m))?);
    }

    // RFC 9112 §3.2: an HTTP/1.1 request without exactly one Host is a 400.
    let hosts = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
        .count();
    if version == Version::Http11 && hosts != 1 {
        return Err(HttpError::new(
            400,
            format!("an HTTP/1.1 request needs exactly one Host header, not {hosts}"),
        ));
    }
    if let Some(coding) = find_header(&headers, "transfer-encoding") {
        // Refused rather than half-supported: the API's bodies are small JSON documents and a
        // body framed two ways is the root of request smuggling.
        return Err(if coding.to_ascii_lowercase().contains("chunked") {
            HttpError::new(
                411,
                "chunked request bodies are not supported: send the body with Content-Length",
            )
        } else {
            HttpError::new(
                501,
                format!("Transfer-Encoding {coding:?} is not supported"),
            )
        });
    }
    let length = content_length(&headers, limits.max_body)?.unwrap_or(0);
    let mut body = vec![0u8; length];
    let mut got = 0;
    while got < length {
        match stream.read(&mut body[got..]) {
            Ok(0) => {
                return Err(HttpError::new(
                    400,
                    format!("truncated body: connection closed after {got} of {length} bytes"),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e, true)),
        }
    }
    Ok(Some(Request {
        method,
        version,
        path,
        query,
        headers,
        body,
    }))
}

/// `METHOD SP request-target SP HTTP-version` (RFC 9112 §3), nothing more, nothing less.
fn parse_request_line(line: &[u8]) -> Result<(Method, &str, Version), HttpError> {
    let bad = || {
        HttpError::new(
            400,
            format!(
                "malformed request line {:?} (want `METHOD /path HTTP/1.1`)",
                String::from_utf8_lossy(&line[..line.len().min(100)])
            ),
        )
    };
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if !is_token(method) || target.is_empty() {
        return Err(bad());
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        v if v.len() == 8
            && v.starts_with("HTTP/")
            && v.as_bytes()[5].is_ascii_digit()
            && v.as_bytes()[6] == b'.'
            && v.as_bytes()[7].is_ascii_digit() =>
        {
            return Err(HttpError::new(
                505,
                format!("{v} is not supported; use HTTP/1.1"),
            ))
        }
        _ => return Err(bad()),
    };
    Ok((Method::parse(method), target, version))
}

/// Origin-form target `/path?query` (RFC 9112 §3.2.1), percent-decoded.
fn parse_target(target: &str) -> Result<(String, Vec<(String, String)>), HttpError> {
    if !target.starts_with('/') {
        return Err(HttpError::new(
            400,
            format!("request target {target:?} does not start with / (only origin-form is served)"),
        ));
    }
    if let Some(c) = target.bytes().find(|b| !b.is_ascii_graphic() || *b == b'#') {
        return Err(HttpError::new(
            400,
            format!("byte {c:#04x} is not allowed in a request target"),
        ));
    }
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let path = percent_decode(raw_path, false)?;
    let mut query = Vec::new();
    for pair in raw_query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        query.push((percent_decode(k, true)?, percent_decode(v, true)?));
    }
    Ok((path, query))
}

/// Decodes `%XX` escapes (and `+` as a space in query parts); the result must be UTF-8 without NUL.
fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, HttpError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| HttpError::new(400, format!("bad percent escape in {s:?}")))?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    if out.contains(&0) {
        return Err(HttpError::new(400, format!("%00 in {s:?}")));
    }
    String::from_utf8(out)
        .map_err(|_| HttpError::new(400, format!("{s:?} decodes to invalid UTF-8")))
}

// ---------------------------------------------------------------------------------------------
// Server side: responses

/// A response with a fixed-length body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Extra headers; Content-Length and Connection are added by [`Response::write_to`].
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// `value` as JSON (a value that cannot be serialised gives a 500 saying so).
    pub fn json(status: u16, value: &impl Serialize) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response::text(status, "application/json", body),
            Err(e) => Response::error(500, &format!("cannot serialise the response: {e}")),
        }
    }

    /// `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Response {
        let body = serde_json::json!({ "error": message })
            .to_string()
            .into_bytes();
        Response::text(status, "application/json", body)
    }

    pub fn text(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }

    /// No body (204 No Content, typically).
    pub fn empty(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Writes status line, headers (with Content-Length and Connection) and body.
    pub fn write_to(&self, w: &mut impl Write, keep_alive: bool) -> io::Result<()> {
        self.write(w, keep_alive, true)
    }

    /// `with_body: false` for HEAD: same head, no body (RFC 9110 §9.3.2).
    fn write(&self, w: &mut impl Write, keep_alive: bool, with_body: bool) -> io::Result<()> {
        let mut out = head(self.status, &self.headers);
        // RFC 9110 §8.6: no Content-Length in 1xx and 204 responses, which have no body.
        let bodiless = self.status < 200 || self.status == 204 || self.status == 304;
        if !bodiless {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        let mut bytes = out.into_bytes();
        if with_body && !bodiless {
            bytes.extend_from_slice(&self.body);
        }
        w.write_all(&bytes)?;
        w.flush()
    }
}

/// Status line and `headers`, each header cleaned of CR/LF so a handler cannot split the
/// response, without the final empty line.
fn head(status: u16, headers: &[(String, String)]) -> String {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: vigil\r\n",
        status_text(status)
    );
    for (name, value) in headers {
        let clean = |s: &str| {
            s.chars()
                .filter(|c| *c != '\r' && *c != '\n')
                .collect::<String>()
        };
        out.push_str(&format!("{}: {}\r\n", clean(name), clean(value)));
    }
    out
}

/// A response whose body is sent as it is produced (RFC 9112 §7.1), for the event stream. The
/// connection closes after it. Dropping it without [`ChunkedWriter::finish`] leaves the stream
/// without its last chunk, which a client sees as truncated.
pub struct ChunkedWriter<W: Write> {
    inner: W,
}

impl<W: Write> ChunkedWriter<W> {
    /// Writes the response head.
    pub fn start(mut inner: W, status: u16, content_type: &str) -> io::Result<Self> {
        let headers = [
            ("Content-Type".to_string(), content_type.to_string()),
            ("Cache-Control".to_string(), "no-cache".to_string()),
        ];
        let mut out = head(status, &headers);
        out.push_str("Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
        inner.write_all(out.as_bytes())?;
        inner.flush()?;
        Ok(ChunkedWriter { inner })
    }

    /// Sends `data` as one chunk, now. An empty `data` sends nothing (an empty chunk would end
    /// the body).
    pub fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        self.inner.write_all(&out)?;
        self.inner.flush()
    }

    /// Sends the last chunk and gives the writer back.
    pub fn finish(mut self) -> io::Result<W> {
        self.inner.write_all(b"0\r\n\r\n")?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

// ---------------------------------------------------------------------------------------------
// Server side: the accept loop

/// What a handler did with a request.
pub enum Outcome {
    /// Write this response (the connection may carry the next request).
    Respond(Response),
    /// The handler wrote the whole response itself (e.g. with [`ChunkedWriter`]); the
    /// connection is closed.
    Streamed,
}

pub type Handler = Arc<dyn Fn(Request, &mut UnixStream) -> Outcome + Send + Sync>;

/// Connections being served: a count to bound them and wait for them, and a clone of each
/// socket so that stopping can end their reads.
#[derive(Default)]
struct Connections {
    state: Mutex<(usize, u64, HashMap<u64, UnixStream>)>,
    idle: Condvar,
}

/// Holds one connection's place; giving it back is the last thing a connection does before its
/// socket closes, so a client that saw the close can count on the place being free.
struct Slot {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self
            .connections
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        state.2.remove(&self.id);
        self.connections.idle.notify_all();
    }
}

/// How often the accept loop looks at `stop` while no connection comes.
const STOP_POLL: Duration = Duration::from_millis(100);
/// How long [`serve`] waits, after `stop`, for connections in a handler to finish.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `listener` until `stop` is set: one thread per connection, at most
/// `limits.max_connections` at once (the next gets 503 and is closed). A request that cannot be
/// parsed is answered with its status and a JSON error, and its connection closed. On `stop`,
/// connections stop reading (a response being produced is still written) and `serve` waits up
/// to a few seconds for them before it returns.
pub fn serve(listener: UnixListener, limits: Limits, handler: Handler, stop: Arc<AtomicBool>) {
    let connections = Arc::new(Connections::default());
    // Non-blocking so that a connection reset between poll and accept cannot block the loop.
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Acquire) {
        let mut fd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut fd, 1, STOP_POLL.as_millis() as libc::c_int) };
        if ready <= 0 {
            continue; // timeout, or EINTR: look at `stop` again
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue; // the peer went away between poll and accept
            }
            Err(_) => {
                // EMFILE and friends: the listener stays readable, so back off instead of
                // spinning until a connection ends and frees a descriptor.
                std::thread::sleep(STOP_POLL);
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(limits.read_timeout));
        let _ = stream.set_write_timeout(Some(limits.write_timeout));
        let slot = {
            let mut state = connections.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.0 >= limits.max_connections {
                None
            } else {
                state.0 += 1;
                state.1 += 1;
                let id = state.1;
                if let Ok(clone) = stream.try_clone() {
                    state.2.insert(id, clone);
                }
                Some(Slot {
                    connections: connections.clone(),
                    id,
                })
            }
        };
        let Some(slot) = slot else {
            refuse(stream, limits.max_connections);
            continue;
        };
        let (handler, limits) = (handler.clone(), limits.clone());
        let stop = stop.clone();
        // A failed spawn drops the closure, hence the slot and the socket: the client sees EOF.
        let _ = std::thread::Builder::new()
            .name("vigil-api-conn".into())
            .spawn(move || connection(stream, slot, &limits, &handler, &stop));
    }

    // Stop reading on every connection: idle ones end now, busy ones after their response.
    let mut state = connections.state.lock().unwrap_or_else(|e| e.into_inner());
    for stream in state.2.values() {
        let _ = stream.shutdown(std::net::Shutdown::Read);
    }
    let deadline = std::time::Instant::now() + DRAIN;
    while state.0 > 0 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        state = match connections.idle.wait_timeout(state, left) {
            Ok((s, _)) => s,
            Err(e) => e.into_inner().0,
        };
    }
}

fn refuse(mut stream: UnixStream, max: usize) {
    // A short bound: the accept loop must not wait on one client.
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let message = format!("the server is busy ({max} connections open); try again");
    let _ = Response::error(503, &message).write_to(&mut stream, false);
}

fn connection(
    stream: UnixStream,
    slot: Slot,
    limits: &Limits,
    handler: &Handler,
    stop: &AtomicBool,
) {
    let mut reader = BufReader::new(stream);
    loop {
        let request = match read_request(&mut reader, limits) {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(e) => {
                // After a stop, shutdown(Read) ends reads: nobody is waiting for an answer.
                if !stop.load(Ordering::Acquire) {
                    let _ = Response::error(e.status, &e.message).write_to(reader.get_mut(), false);
                }
                break;
            }
        };
        let mut keep_alive = should_keep_alive(&request) && !stop.load(Ordering::Acquire);
        let head_only = request.method == Method::Head;
        let outcome = catch_unwind(AssertUnwindSafe(|| handler(request, reader.get_mut())))
            .unwrap_or_else(|_| {
                // The handler may have written part of a response: answer, then close.
                keep_alive = false;
                Outcome::Respond(Response::error(500, "the request handler panicked"))
            });
        match outcome {
            Outcome::Respond(response) => {
                if response
                    .write(reader.get_mut(), keep_alive, !head_only)
                    .is_err()
                    || !keep_alive
                {
                    break;
                }
            }
            Outcome::Streamed => break,
        }
    }
    let stream = reader.into_inner();
    drop(slot);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

// ---------------------------------------------------------------------------------------------
// Client side

/// A response as the client saw it (a chunked body is already joined).
#[derive(Debug, Clone)]
pub struct ClientResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ClientResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// Why a request to the API socket failed (an HTTP error status is not a failure: it is in
/// [`ClientResponse::status`], except for [`stream`], which needs a 200).
#[derive(Debug)]
pub enum ClientError {
    Connect {
        socket: PathBuf,
        source: io::Error,
    },
    Io {
        socket: PathBuf,
        source: io::Error,
    },
    /// The server answered something that is not HTTP/1.x as this module reads it.
    Protocol(String),
    /// The caller's method or path cannot be sent.
    InvalidRequest(String),
    /// [`stream`] got a status other than 200; `message` is the body's `error` (or the body).
    Status {
        status: u16,
        message: String,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { socket, source } => write!(
                f,
                "cannot connect to {}: {source} — is `vigil host` (or `vigil edge`) running?",
                socket.display()
            ),
            ClientError::Io { socket, source } if is_timeout(source) => {
                write!(f, "{}: timed out waiting for the server", socket.display())
            }
            ClientError::Io { socket, source } => write!(f, "{}: {source}", socket.display()),
            ClientError::Protocol(m) => write!(f, "bad response from the server: {m}"),
            ClientError::InvalidRequest(m) => write!(f, "cannot send the request: {m}"),
            ClientError::Status { status, message } => {
                write!(f, "{status} {}: {message}", status_text(*status))
            }
        }
    }
}

impl std::error::Error for ClientError {}

/// The largest response head and body the client accepts from a server.
const CLIENT_MAX_HEAD: usize = 64 * 1024;
const CLIENT_MAX_BODY: usize = 64 * 1024 * 1024;

/// Sends one request (`Connection: close`) and reads the whole response; `timeout` bounds each
/// read and write. `path` is sent as is: percent-encode the query first.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<ClientResponse, ClientError> {
    let mut reader = send(socket, method, path, body, timeout)?;
    let io = |source| ClientError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let (status, headers) = read_response_head(&mut reader).map_err(io)?;
    let body = if method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304 {
        Vec::new()
    } else if is_chunked(&headers) {
        let mut body = Vec::new();
        let mut chunks = Chunks {
            reader,
            done: false,
            total: 0,
        };
        for chunk in &mut chunks {
            body.extend_from_slice(&chunk.map_err(io)?);
        }
        body
    } else {
        read_fixed_body(&mut reader, &headers).map_err(io)?
    };
    Ok(ClientResponse {
        status,
        headers,
        body,
    })
}

/// Sends `GET path` and returns the chunks of its 200 response as they arrive. `timeout` bounds
/// connecting and the response head; the wait between chunks is unbounded (an event stream may
/// be quiet for hours) unless [`Chunks::set_idle_timeout`] says otherwise.
pub fn stream(socket: &Path, path: &str, timeout: Duration) -> Result<Chunks, ClientError> {
    let mut reader = send(socket, "GET", path, None, timeout)?;
    let io = |source| ClientError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let (status, headers) = read_response_head(&mut reader).map_err(io)?;
    if status != 200 || !is_chunked(&headers) {
        let body = read_fixed_body(&mut reader, &headers).unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        if status == 200 {
            return Err(ClientError::Protocol(format!(
                "{path} did not answer with a stream"
            )));
        }
        return Err(ClientError::Status { status, message });
    }
    let _ = reader.get_ref().set_read_timeout(None);
    Ok(Chunks {
        reader,
        done: false,
        total: 0,
    })
}

fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<BufReader<UnixStream>, ClientError> {
    if !is_token(method) {
        return Err(ClientError::InvalidRequest(format!(
            "bad method {method:?}"
        )));
    }
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientError::InvalidRequest(format!(
            "path {path:?} must start with / and be printable ASCII without spaces (percent-encode it)"
        )));
    }
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    let io = |source| ClientError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: vigil\r\nAccept: */*\r\nConnection: close\r\n"
    );
    let body = body.unwrap_or_default();
    if !body.is_empty() {
        out.push_str("Content-Type: application/json\r\n");
    }
    if !body.is_empty() || !matches!(method, "GET" | "HEAD" | "DELETE") {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    match stream.write_all(&bytes) {
        Ok(()) => {}
        // The server answered early and stopped reading (a body over its limit gets 413 after
        // the head): its answer is still there to read.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) => {}
        Err(e) => return Err(io(e)),
    }
    Ok(BufReader::new(stream))
}

fn protocol(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn line_error(e: LineError, what: &str) -> io::Error {
    match e {
        LineError::Io(e) => e,
        LineError::TooLong => protocol(format!("{what} is too long")),
        LineError::BareCr => protocol(format!("bare CR in {what}")),
        LineError::Eof { .. } => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the server closed the connection inside {what}"),
        ),
    }
}

/// Status line and headers; interim 1xx responses are skipped.
fn read_response_head(r: &mut impl Read) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut budget = CLIENT_MAX_HEAD;
    loop {
        let line = read_line(r, &mut budget).map_err(|e| line_error(e, "the status line"))?;
        let text = String::from_utf8_lossy(&line);
        let mut parts = text.splitn(3, ' ');
        let status = match (parts.next(), parts.next()) {
            (Some("HTTP/1.1" | "HTTP/1.0"), Some(code)) if code.len() == 3 => {
                code.parse::<u16>().ok()
            }
            _ => None,
        }
        .ok_or_else(|| protocol(format!("status line {text:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = read_line(r, &mut budget).map_err(|e| line_error(e, "the headers"))?;
            if line.is_empty() {
                break;
            }
            headers.push(parse_header_line(&line).map_err(protocol)?);
        }
        if !(100..200).contains(&status) {
            return Ok((status, headers));
        }
    }
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    find_header(headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
}

/// A Content-Length body, or everything up to EOF without one.
fn read_fixed_body(r: &mut impl Read, headers: &[(String, String)]) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    match content_length(headers, CLIENT_MAX_BODY).map_err(|e| protocol(e.message))? {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None => {
            r.take(CLIENT_MAX_BODY as u64 + 1).read_to_end(&mut body)?;
            if body.len() > CLIENT_MAX_BODY {
                return Err(protocol("response body too large"));
            }
        }
    }
    Ok(body)
}

/// The chunks of a chunked response body, in order, each as soon as it has fully arrived. Ends
/// after the last (empty) chunk; a stream cut before it yields an `UnexpectedEof` error.
pub struct Chunks {
    reader: BufReader<UnixStream>,
    done: bool,
    total: usize,
}

impl Chunks {
    /// Bounds the wait for each chunk (`None`: wait as long as it takes).
    pub fn set_idle_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.reader.get_ref().set_read_timeout(timeout)
    }

    fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut budget = 1024;
        let line =
            read_line(&mut self.reader, &mut budget).map_err(|e| line_error(e, "a chunk size"))?;
        let text = String::from_utf8_lossy(&line);
        // RFC 9112 §7.1.1: chunk extensions after `;` carry nothing we use.
        let size = text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .ok()
            .filter(|_| !size.is_empty() && size.len() <= 8)
            .ok_or_else(|| protocol(format!("bad chunk size {text:?}")))?;
        if size == 0 {
            // Trailer fields, then the empty line that ends the message.
            let mut budget = CLIENT_MAX_HEAD;
            while !read_line(&mut self.reader, &mut budget)
                .map_err(|e| line_error(e, "the trailer"))?
                .is_empty()
            {}
            return Ok(None);
        }
        self.total += size;
        if self.total > CLIENT_MAX_BODY {
            return Err(protocol("chunked response body too large"));
        }
        let mut data = vec![0u8; size];
        self.reader.read_exact(&mut data)?;
        let mut budget = 2;
        let end =
            read_line(&mut self.reader, &mut budget).map_err(|e| line_error(e, "a chunk end"))?;
        if !end.is_empty() {
            return Err(protocol("chunk longer than its size"));
        }
        Ok(Some(data))
    }
}

impl Iterator for Chunks {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.next_chunk();
        if !matches!(item, Ok(Some(_))) {
            self.done = true;
        }
        item.transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    fn parse(bytes: &[u8]) -> Result<Option<Request>, HttpError> {
        read_request(&mut Cursor::new(bytes), &Limits::default())
    }

    fn status_of(bytes: &[u8]) -> u16 {
        match parse(bytes) {
            Err(e) => e.status,
            Ok(r) => panic!("{:?} was accepted as {r:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn parses_get_with_query_and_headers() {
        let r = parse(
            b"GET /api/v1/vm.info?id=a%20b&x=1+2&flag&&e=%C3%A9 HTTP/1.1\r\n\
              Host: localhost\r\nX-Thing:  v w \t\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.path, "/api/v1/vm.info");
        let q: Vec<(&str, &str)> = r
            .query
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(q, [("id", "a b"), ("x", "1 2"), ("flag", ""), ("e", "é")]);
        assert_eq!(r.query_param("id"), Some("a b"));
        assert_eq!(r.query_param("nope"), None);
        assert_eq!(r.header("x-thing"), Some("v w"));
        assert_eq!(r.header("HOST"), Some("localhost"));
        assert!(r.body.is_empty());
        assert!(should_keep_alive(&r));
    }

    #[test]
    fn parses_put_with_json_body() {
        let r = parse(
            b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 13\r\ncontent-length: 13\r\n\r\n{\"id\": \"t1\"}X",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.method, Method::Put);
        assert_eq!(r.body, b"{\"id\": \"t1\"}X");
        assert_eq!(
            parse(b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap()
                .unwrap()
                .method,
            Method::Other("BREW".into())
        );
    }

    #[test]
    fn pipelined_requests_stay_apart() {
        let bytes = b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
                      GET /b?k=v HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n";
        let mut cursor = Cursor::new(&bytes[..]);
        let limits = Limits::default();
        let first = read_request(&mut cursor, &limits).unwrap().unwrap();
        assert_eq!(
            (first.path.as_str(), first.body.as_slice()),
            ("/a", &b"abc"[..])
        );
        assert!(should_keep_alive(&first));
        let second = read_request(&mut cursor, &limits).unwrap().unwrap();
        assert_eq!(
            (second.path.as_str(), second.query_param("k")),
            ("/b", Some("v"))
        );
        assert!(!should_keep_alive(&second));
        assert_eq!(read_request(&mut cursor, &limits).unwrap(), None);
        // HTTP/1.0 closes unless asked not to; no Host needed.
        let old = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!should_keep_alive(&old));
        let kept = parse(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(should_keep_alive(&kept));
    }

    #[test]
    fn bad_requests_get_their_status() {
        let long_header = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
            "a".repeat(17 * 1024)
        );
        let many_headers = format!("GET / HTTP/1.1\r\nHost: x\r\n{}\r\n", "A: b\r\n".repeat(64));
        let long_line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(17 * 1024));
        let cases: &[(&[u8], u16)] = &[
            (b"HELLO\r\n\r\n", 400),
            (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
            (b"GET / http/1.1\r\nHost: x\r\n\r\n", 400),
            (b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"GET http://localhost/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n c\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\rY: z\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400),
            (long_header.as_bytes(), 431),
            (many_headers.as_bytes(), 431),
            (long_line.as_bytes(), 414),
            (b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413),
            (b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n", 413),
            (b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
            (b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
            (b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 3\r\n\r\nabc", 400),
            (b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", 400),
            (b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 411),
            (b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\n", 400),
            (b"GET /", 400),
            (b"GET /%zz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"GET /%4 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"GET /%ff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"GET /a?b=%00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"GET /a?b=%+1 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                status_of(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        // The chunked refusal says what to do instead.
        let e =
            parse(b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert!(e.message.contains("Content-Length"), "{e}");
        assert_eq!(parse(b"").unwrap(), None);
        assert_eq!(
            parse(b"\r\n\r\n").unwrap_err().status,
            400,
            "EOF after empty lines is a broken request"
        );
    }

    #[test]
    fn a_slow_request_times_out_with_408() {
        for partial in [
            &b""[..],
            b"GET / HTTP/1.1\r\nHo",
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab",
        ] {
            let (mut client, mut server) = UnixStream::pair().unwrap();
            client.write_all(partial).unwrap();
            server
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let e = read_request(&mut server, &Limits::default()).unwrap_err();
            assert_eq!(e.status, 408, "{e}");
            drop(client); // held open until here: the server saw a silent peer, not EOF
        }
    }

    #[test]
    fn responses_are_framed() {
        let mut out = Vec::new();
        Response::error(404, "no \"vm\"")
            .write_to(&mut out, false)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Content-Type: application/json\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        let body = r#"{"error":"no \"vm\""}"#;
        assert!(
            text.ends_with(&format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )),
            "{text}"
        );

        let mut out = Vec::new();
        Response::empty(204).write_to(&mut out, true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            !text.contains("Content-Length") && text.ends_with("Connection: keep-alive\r\n\r\n"),
            "{text}"
        );

        let mut response = Response::json(200, &serde_json::json!({"a": 1}));
        response
            .headers
            .push(("X-Evil".into(), "a\r\nInjected: yes".into()));
        let mut out = Vec::new();
        response.write(&mut out, true, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("Content-Length: 7\r\n") && text.ends_with("\r\n\r\n"),
            "HEAD: head only: {text}"
        );
        assert!(text.contains("X-Evil: aInjected: yes\r\n"), "{text}");

        let mut chunked = ChunkedWriter::start(Vec::new(), 200, "application/x-ndjson").unwrap();
        chunked.write_chunk(b"{\"n\":1}\n").unwrap();
        chunked.write_chunk(b"").unwrap();
        chunked.write_chunk(&[b'x'; 26]).unwrap();
        let text = String::from_utf8(chunked.finish().unwrap()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("Transfer-Encoding: chunked") && !head.contains("Content-Length"));
        assert_eq!(
            body,
            format!(
                "8\r\n{{\"n\":1}}\n\r\n1a\r\n{}\r\n0\r\n\r\n",
                "x".repeat(26)
            )
        );
    }

    /// A server on a socket in the temp dir, stopped and joined on drop.
    struct TestServer {
        path: PathBuf,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl TestServer {
        fn start(name: &str, limits: Limits, handler: Handler) -> TestServer {
            let path =
                std::env::temp_dir().join(format!("vigil-http-{}-{name}.sock", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let thread_stop = stop.clone();
            let thread = std::thread::spawn(move || serve(listener, limits, handler, thread_stop));
            TestServer {
                path,
                stop,
                thread: Some(thread),
            }
        }

        fn stop(&mut self) {
            self.stop.store(true, Ordering::Release);
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap();
            }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop();
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn echo(request: &Request) -> Response {
        Response::json(
            200,
            &serde_json::json!({
                "method": request.method.as_str(),
                "path": request.path,
                "query": request.query,
                "body": String::from_utf8_lossy(&request.body),
            }),
        )
    }

    const T: Duration = Duration::from_secs(10);

    fn json(body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn server_and_client_round_trip() {
        let (next_tx, next_rx) = mpsc::channel::<()>();
        let next_rx = Mutex::new(next_rx);
        let handler: Handler = Arc::new(move |request, stream| match request.path.as_str() {
            "/events" => {
                let mut w =
                    ChunkedWriter::start(stream.try_clone().unwrap(), 200, "application/x-ndjson")
                        .unwrap();
                for n in 0..3 {
                    w.write_chunk(format!("{{\"n\":{n}}}\n").as_bytes())
                        .unwrap();
                    // The next chunk is produced only after the client has read this one.
                    next_rx.lock().unwrap().recv().unwrap();
                }
                w.finish().unwrap();
                Outcome::Streamed
            }
            "/cut" => {
                let mut w =
                    ChunkedWriter::start(stream.try_clone().unwrap(), 200, "text/plain").unwrap();
                w.write_chunk(b"partial").unwrap();
                Outcome::Streamed
            }
            "/panic" => panic!("handler bug"),
            "/empty" => Outcome::Respond(Response::empty(204)),
            "/missing" => Outcome::Respond(Response::error(404, "no such thing")),
            _ => Outcome::Respond(echo(&request)),
        });
        let mut server = TestServer::start("rt", Limits::default(), handler);
        let socket = server.path.clone();

        let r = request(&socket, "GET", "/api/v1/vm.info?id=t%201", None, T).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            json(&r.body),
            serde_json::json!({"method": "GET", "path": "/api/v1/vm.info", "query": [["id", "t 1"]], "body": ""})
        );
        let r = request(
            &socket,
            "PUT",
            "/api/v1/vm.create",
            Some(br#"{"id":"x"}"#),
            T,
        )
        .unwrap();
        assert_eq!(json(&r.body)["body"], r#"{"id":"x"}"#);
        let r = request(&socket, "PUT", "/empty", None, T).unwrap();
        assert_eq!((r.status, r.body.len()), (204, 0));
        let r = request(&socket, "GET", "/panic", None, T).unwrap();
        assert_eq!(r.status, 500);
        let r = request(&socket, "HEAD", "/x", None, T).unwrap();
        assert_eq!((r.status, r.body.len()), (200, 0));
        assert!(matches!(
            request(&socket, "GET", "/a b", None, T),
            Err(ClientError::InvalidRequest(_))
        ));

        // Two pipelined requests on one kept-alive connection, then a malformed one.
        let mut raw = UnixStream::connect(&socket).unwrap();
        raw.set_read_timeout(Some(T)).unwrap();
        raw.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nPUT /two HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi").unwrap();
        let mut reader = BufReader::new(raw);
        for (path, body) in [("/one", ""), ("/two", "hi")] {
            let (status, headers) = read_response_head(&mut reader).unwrap();
            assert_eq!(
                (status, find_header(&headers, "connection")),
                (200, Some("keep-alive"))
            );
            let v = json(&read_fixed_body(&mut reader, &headers).unwrap());
            assert_eq!(
                (v["path"].as_str(), v["body"].as_str()),
                (Some(path), Some(body))
            );
        }
        reader
            .get_mut()
            .write_all(b"GET / HTTP/3.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let (status, headers) = read_response_head(&mut reader).unwrap();
        assert_eq!(
            (status, find_header(&headers, "connection")),
            (505, Some("close"))
        );
        assert!(
            json(&read_fixed_body(&mut reader, &headers).unwrap())["error"]
                .as_str()
                .unwrap()
                .contains("HTTP/3.0")
        );
        let mut rest = Vec::new();
        assert_eq!(
            reader.read_to_end(&mut rest).unwrap(),
            0,
            "closed after an error"
        );

        // A chunked stream, read chunk by chunk while the server is still producing it.
        let mut chunks = stream(&socket, "/events", T).unwrap();
        for n in 0..3 {
            assert_eq!(
                chunks.next().unwrap().unwrap(),
                format!("{{\"n\":{n}}}\n").into_bytes()
            );
            next_tx.send(()).unwrap();
        }
        assert!(chunks.next().is_none(), "the last chunk ends the stream");
        let mut cut = stream(&socket, "/cut", T).unwrap();
        assert_eq!(cut.next().unwrap().unwrap(), b"partial");
        assert_eq!(
            cut.next().unwrap().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(cut.next().is_none());
        match stream(&socket, "/missing", T) {
            Err(ClientError::Status {
                status: 404,
                message,
            }) => assert_eq!(message, "no such thing"),
            other => panic!("{:?}", other.err()),
        }

        // Stopping ends an idle kept-alive connection (EOF, not a 408 thirty seconds later).
        let mut idle = UnixStream::connect(&socket).unwrap();
        idle.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut idle = BufReader::new(idle);
        let (status, headers) = read_response_head(&mut idle).unwrap();
        assert_eq!(status, 200);
        read_fixed_body(&mut idle, &headers).unwrap();
        server.stop();
        let mut rest = Vec::new();
        assert_eq!(idle.read_to_end(&mut rest).unwrap(), 0);
        let e = request(&socket, "GET", "/x", None, T).unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    }

    #[test]
    fn connection_limit_refuses_the_65th_and_keeps_serving() {
        let handler: Handler = Arc::new(|request, _| Outcome::Respond(echo(&request)));
        let server = TestServer::start("limit", Limits::default(), handler);
        let max = Limits::default().max_connections;
        assert_eq!(max, 64);
        // Accepted in connect order; idle ones hold their place (the read timeout is 30 s).
        let mut idle: Vec<UnixStream> = (0..max)
            .map(|_| UnixStream::connect(&server.path).unwrap())
            .collect();
        let mut extra = UnixStream::connect(&server.path).unwrap();
        extra.set_read_timeout(Some(T)).unwrap();
        let mut answer = String::new();
        extra.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{answer}"
        );
        assert!(answer.contains("busy"), "{answer}");

        // An idle connection still works; closing it frees its place before the socket closes.
        let first = &mut idle[0];
        first.set_read_timeout(Some(T)).unwrap();
        first
            .write_all(b"GET /still HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        first.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.contains("/still"),
            "{answer}"
        );
        let r = request(&server.path, "GET", "/after", None, T).unwrap();
        assert_eq!(
            (r.status, json(&r.body)["path"].as_str()),
            (200, Some("/after"))
        );
        drop(idle);
    }

    #[test]
    fn client_errors_say_what_is_wrong() {
        let missing =
            std::env::temp_dir().join(format!("vigil-http-{}-missing.sock", std::process::id()));
        let e = request(&missing, "GET", "/", None, T).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("cannot connect to {}: ", missing.display())),
            "{text}"
        );
        assert!(text.contains("vigil host"), "{text}");
        assert_eq!(
            HttpError::new(413, "big").to_string(),
            "413 Content Too Large: big"
        );
    }
}
