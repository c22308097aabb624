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
/// Chunks of 1 MiB in `/long`: past the client's bound on a whole body.
const LONG_CHUNKS: usize = super::client::CLIENT_MAX_BODY / (1 << 20) + 16;

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

#[test]
fn server_and_client_round_trip() {
    let (next_tx, next_rx) = mpsc::channel::<()>();
    let next_rx = Arc::new(Mutex::new(next_rx));
    let handler: Handler = Arc::new(move |request| match request.path.as_str() {
        "/events" => {
            let next_rx = next_rx.clone();
            Outcome::Stream(Box::new(move |stream| {
                let mut w = ChunkedWriter::start(stream, 200, "application/x-ndjson").unwrap();
                for n in 0..3 {
                    w.write_chunk(format!("{{\"n\":{n}}}\n").as_bytes())
                        .unwrap();
                    // The next chunk is produced only after the client has read this one.
                    next_rx.lock().unwrap().recv().unwrap();
                }
                w.finish().unwrap();
            }))
        }
        "/cut" => Outcome::Stream(Box::new(|stream| {
            let mut w = ChunkedWriter::start(stream, 200, "text/plain").unwrap();
            w.write_chunk(b"partial").unwrap();
        })),
        // More in all than one body may hold, in chunks each well under it.
        "/long" => Outcome::Stream(Box::new(|stream| {
            let mut w = ChunkedWriter::start(stream, 200, "text/plain").unwrap();
            let chunk = vec![b'e'; 1 << 20];
            for _ in 0..LONG_CHUNKS {
                if w.write_chunk(&chunk).is_err() {
                    return;
                }
            }
            let _ = w.finish();
        })),
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
    assert!(
        json(&r.body)["error"]
            .as_str()
            .unwrap()
            .contains("panicked (handler bug)"),
        "{:?}",
        json(&r.body)
    );
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
    // A stream lasts as long as the server sends (an event stream runs for days); a body kept
    // whole is bounded.
    let long = stream(&socket, "/long", T).unwrap();
    assert_eq!(
        long.map(|c| c.unwrap().len()).sum::<usize>(),
        LONG_CHUNKS << 20
    );
    let e = request(&socket, "GET", "/long", None, T).unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
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

/// At the connection limit the longest idle connection makes room: idle clients cannot lock
/// out a new one.
#[test]
fn at_the_connection_limit_the_longest_idle_connection_makes_room() {
    let handler: Handler = Arc::new(|request| Outcome::Respond(echo(&request)));
    let limits = Limits {
        max_connections: 8,
        ..Limits::default()
    };
    let server = TestServer::start("limit", limits, handler);
    let mut idle: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&server.path).unwrap())
        .collect();
    // Every one is held (a request on the last one is answered).
    let last = idle.last_mut().unwrap();
    last.set_read_timeout(Some(T)).unwrap();
    last.write_all(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(last.try_clone().unwrap());
    assert_eq!(read_response_head(&mut reader).unwrap().0, 200);
    // One more: served; the first (idle longest) was closed for it.
    let r = request(&server.path, "GET", "/after", None, T).unwrap();
    assert_eq!(
        (r.status, json(&r.body)["path"].as_str()),
        (200, Some("/after"))
    );
    let first = &mut idle[0];
    first.set_read_timeout(Some(T)).unwrap();
    let mut rest = Vec::new();
    assert_eq!(first.read_to_end(&mut rest).unwrap(), 0, "evicted: EOF");
}

/// The class of clients that hold a connection without finishing anything: a slow-loris head,
/// a body that never comes, a huge head, a client that never reads its responses. Each is
/// bounded (408 within the read timeout, 431, closed after the write timeout) and none delays
/// another client's request.
#[test]
fn slow_huge_and_deaf_clients_do_not_delay_others() {
    let handler: Handler = Arc::new(|request| Outcome::Respond(echo(&request)));
    let limits = Limits {
        workers: 2,
        read_timeout: Duration::from_millis(600),
        write_timeout: Duration::from_millis(600),
        ..Limits::default()
    };
    let server = TestServer::start("slow", limits, handler);
    let connect = || {
        let s = UnixStream::connect(&server.path).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s
    };
    // Slow-loris: a byte now and then, never the end of the head.
    let mut loris = connect();
    loris.write_all(b"GET / HTTP/1.1\r\nX-a: ").unwrap();
    // A body announced and never sent.
    let mut no_body = connect();
    no_body
        .write_all(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
        .unwrap();
    // A head over the limit: 431 at once.
    let mut huge = connect();
    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    while big.len() < 20 * 1024 {
        big.extend_from_slice(
            b"X-pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        );
    }
    let _ = huge.write_all(&big);
    let mut answer = String::new();
    let _ = huge.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    // Empty lines alone, more than a head may hold (allowed before a request line, but
    // bounded): 431 at once, not a full buffer that is never parsed.
    let mut blank = connect();
    let _ = blank.write_all(&b"\r\n".repeat(20 * 1024));
    let mut answer = String::new();
    let _ = blank.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    // Deaf: many pipelined requests whose answers it never reads.
    let mut deaf = connect();
    deaf.set_nonblocking(true).unwrap();
    let one = b"GET /deaf HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..20_000 {
        if deaf.write_all(one).is_err() {
            break;
        }
    }
    // Meanwhile, others are answered at once.
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let r = request(&server.path, "GET", "/ping", None, T).unwrap();
        assert_eq!(r.status, 200);
        // Not a timing test (the machine may be loaded): seconds would mean it waited.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        loris.write_all(b"a").unwrap();
    }
    // The slow ones end with a 408 within the read timeout (counted from their first byte).
    for (name, conn) in [("loris", &mut loris), ("no body", &mut no_body)] {
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{name}: {answer}");
    }
    // The deaf one is closed once its responses sat untaken past the write timeout.
    deaf.set_nonblocking(false).unwrap();
    let started = std::time::Instant::now();
    let mut sink = vec![0u8; 1 << 16];
    loop {
        match deaf.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
        assert!(started.elapsed() < T, "the deaf connection is closed");
    }
}

/// Streams have their own bounded pool: open streams never take a worker, so requests are
/// answered while every stream is open, and the stream over the limit gets a 503.
#[test]
fn streams_do_not_take_request_workers() {
    let release = Arc::new(AtomicBool::new(false));
    let held = release.clone();
    let handler: Handler = Arc::new(move |request| match request.path.as_str() {
        "/events" => {
            let held = held.clone();
            Outcome::Stream(Box::new(move |stream| {
                let mut w = ChunkedWriter::start(stream, 200, "text/plain").unwrap();
                w.write_chunk(b"open").unwrap();
                while !held.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = w.finish();
            }))
        }
        _ => Outcome::Respond(echo(&request)),
    });
    let limits = Limits {
        workers: 2,
        max_streams: 10,
        ..Limits::default()
    };
    let server = TestServer::start("streams", limits, handler);
    let mut open: Vec<Chunks> = (0..10)
        .map(|_| {
            let mut s = stream(&server.path, "/events", T).unwrap();
            assert_eq!(s.next().unwrap().unwrap(), b"open");
            s
        })
        .collect();
    for _ in 0..10 {
        let r = request(&server.path, "GET", "/ping", None, T).unwrap();
        assert_eq!(r.status, 200);
    }
    match stream(&server.path, "/events", T) {
        Err(ClientError::Status {
            status: 503,
            message,
        }) => assert!(message.contains("too many streams"), "{message}"),
        other => panic!("{:?}", other.err()),
    }
    release.store(true, Ordering::Release);
    for s in &mut open {
        assert!(s.next().is_none());
    }
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

/// The priority lane answers while every ordinary worker is stuck in a handler.
#[test]
fn the_priority_lane_answers_while_the_workers_are_busy() {
    let release = Arc::new(AtomicBool::new(false));
    let entered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (held, inside) = (release.clone(), entered.clone());
    let handler: Handler = Arc::new(move |request| {
        if request.path == "/slow" {
            inside.fetch_add(1, Ordering::AcqRel);
            while !held.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Outcome::Respond(echo(&request))
    });
    let limits = Limits {
        workers: 2,
        priority: |r| r.path == "/ping",
        ..Limits::default()
    };
    let server = TestServer::start("prio", limits, handler);
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let path = server.path.clone();
            std::thread::spawn(move || request(&path, "GET", "/slow", None, T).unwrap().status)
        })
        .collect();
    // Both workers are held (and two more requests queue behind them).
    while entered.load(Ordering::Acquire) < 2 {
        std::thread::yield_now();
    }
    let r = request(&server.path, "GET", "/ping", None, T).unwrap();
    assert_eq!(
        (r.status, json(&r.body)["path"].as_str()),
        (200, Some("/ping"))
    );
    assert!(
        slow.iter().all(|t| !t.is_finished()),
        "the slow ones are still held"
    );
    release.store(true, Ordering::Release);
    for t in slow {
        assert_eq!(t.join().unwrap(), 200);
    }
}

/// `Outcome::RespondThen` (what `vmm.shutdown` uses): the action waits until the client has
/// every byte of the answer, and runs exactly once, also when the client goes away unread.
#[test]
fn the_after_write_action_waits_for_the_answer_to_be_out() {
    const BODY: usize = 8 << 20; // larger than any socket buffer: out only as fast as it is read
    let (ran_tx, ran) = mpsc::channel::<String>();
    let ran_tx = Mutex::new(ran_tx);
    let handler: Handler = Arc::new(move |request| {
        let tx = ran_tx.lock().unwrap().clone();
        let path = request.path.clone();
        Outcome::RespondThen(
            Response::text(200, "text/plain", vec![b'x'; BODY]),
            Box::new(move || {
                let _ = tx.send(path);
            }),
        )
    });
    let server = TestServer::start("after", Limits::default(), handler);
    let client = UnixStream::connect(&server.path).unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    (&client)
        .write_all(b"GET /read HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // Unread, most of the answer is still in the server: the action has not run.
    assert!(ran.recv_timeout(Duration::from_millis(300)).is_err());
    let mut reader = BufReader::new(client);
    let (status, headers) = read_response_head(&mut reader).unwrap();
    assert_eq!(status, 200);
    assert_eq!(read_fixed_body(&mut reader, &headers).unwrap().len(), BODY);
    assert_eq!(ran.recv_timeout(T).unwrap(), "/read");
    // A client that goes away without reading: the action still runs.
    let mut gone = UnixStream::connect(&server.path).unwrap();
    gone.write_all(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    drop(gone);
    assert_eq!(ran.recv_timeout(T).unwrap(), "/gone");
    // Once each.
    assert!(ran.recv_timeout(Duration::from_millis(300)).is_err());
}
