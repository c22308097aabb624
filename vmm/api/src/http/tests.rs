use super::client::*;
use super::response::*;
use super::server::*;
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
        (
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n",
            413,
        ),
        (
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            413,
        ),
        (
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            400,
        ),
        (
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            400,
        ),
        (
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 3\r\n\r\nabc",
            400,
        ),
        (
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
            400,
        ),
        (
            b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            411,
        ),
        (
            b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
        ),
        (
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
            400,
        ),
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
    let e = parse(b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
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
