//! The client used by `vigil remote` and the tests: one request per connection
//! ([`request`]), or a chunked stream ([`stream`]).
//!
//! Owns: writing requests and reading responses, bounded like the server's reads. Must not:
//! follow redirects or retry (the caller decides).

use super::*;

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
pub(super) const CLIENT_MAX_HEAD: usize = 64 * 1024;
pub(super) const CLIENT_MAX_BODY: usize = 64 * 1024 * 1024;

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
            whole_body: true,
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
        whole_body: false,
    })
}

pub(super) fn send(
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

pub(super) fn protocol(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

pub(super) fn line_error(e: LineError, what: &str) -> io::Error {
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
pub(super) fn read_response_head(r: &mut impl Read) -> io::Result<(u16, Vec<(String, String)>)> {
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

pub(super) fn is_chunked(headers: &[(String, String)]) -> bool {
    find_header(headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
}

/// A Content-Length body, or everything up to EOF without one.
pub(super) fn read_fixed_body(
    r: &mut impl Read,
    headers: &[(String, String)],
) -> io::Result<Vec<u8>> {
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
    /// The chunks make one body kept whole (bounded in all); otherwise a stream, read as it
    /// comes and as long as it lasts (an event stream), bounded chunk by chunk.
    whole_body: bool,
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
        self.total = self.total.saturating_add(size);
        if size > CLIENT_MAX_BODY || (self.whole_body && self.total > CLIENT_MAX_BODY) {
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
