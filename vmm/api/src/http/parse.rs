//! Reading requests (and the line and head syntax the client shares), bounded by [`Limits`].
//!
//! Owns: RFC 9112 message syntax for requests: request line, headers, Content-Length, target
//! and query decoding. Must not: trust a byte from the peer: every malformed, oversize or slow
//! request is an [`HttpError`] with its status, never a panic or an unbounded wait.

use super::*;

/// Why a line could not be read.
pub(super) enum LineError {
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
pub(super) fn read_line(r: &mut impl Read, budget: &mut usize) -> Result<Vec<u8>, LineError> {
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

pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// `tchar` of RFC 9110 §5.6.2: what method and header names are made of.
pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Splits `name: value` (RFC 9112 §5: no whitespace before the colon, OWS around the value).
pub(super) fn parse_header_line(line: &[u8]) -> Result<(String, String), String> {
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
pub(super) fn content_length(
    headers: &[(String, String)],
    max: usize,
) -> Result<Option<usize>, HttpError> {
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
    let Some((mut request, length)) = read_head(stream, limits)? else {
        return Ok(None);
    };
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
            Err(e) if is_timeout(&e) => {
                return Err(HttpError::new(
                    408,
                    "timed out waiting for the rest of the request",
                ))
            }
            Err(e) => return Err(HttpError::new(400, format!("reading the request: {e}"))),
        }
    }
    request.body = body;
    Ok(Some(request))
}

/// Reads one request's line and header section: the request (with an empty body) and the
/// length of the body that follows. `Ok(None)`: EOF before a byte. Same errors as
/// [`read_request`].
pub fn read_head(
    stream: &mut impl Read,
    limits: &Limits,
) -> Result<Option<(Request, usize)>, HttpError> {
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
    Ok(Some((
        Request {
            method,
            version,
            path,
            query,
            headers,
            body: Vec::new(),
        },
        length,
    )))
}

/// `METHOD SP request-target SP HTTP-version` (RFC 9112 §3), nothing more, nothing less.
pub(super) fn parse_request_line(line: &[u8]) -> Result<(Method, &str, Version), HttpError> {
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
pub(super) fn parse_target(target: &str) -> Result<(String, Vec<(String, String)>), HttpError> {
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
pub(super) fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, HttpError> {
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
