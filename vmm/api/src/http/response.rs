//! Writing responses: fixed-length ([`Response`]) or chunked ([`ChunkedWriter`]).
//!
//! Owns: response framing and header hygiene (no CR/LF from a handler reaches the wire). Must
//! not: know any endpoint.

use super::*;

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
    pub(super) fn write(
        &self,
        w: &mut impl Write,
        keep_alive: bool,
        with_body: bool,
    ) -> io::Result<()> {
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
pub(super) fn head(status: u16, headers: &[(String, String)]) -> String {
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
