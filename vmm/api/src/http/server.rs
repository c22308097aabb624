//! The server: one event-driven thread holds every connection while it waits for or reads a
//! request, or drains a response; a small pool of worker threads runs the handler on complete
//! requests, and one more serves the priority lane ([`Limits::priority`]: health and stop);
//! streams (`events`) get threads of their own from a separate bounded pool.
//!
//! So no client can starve another by holding a thread: an idle, slow (slow-loris), huge or
//! never-reading connection costs a descriptor and a buffer, never a worker, and is bounded in
//! time (the whole request within `read_timeout`, a response taken within `write_timeout`, an
//! idle keep-alive closed after `read_timeout`) and in number (at `max_connections` the
//! connection idle the longest is closed for the new one). Subscribers hold no request slot.
//!
//! Owns: connections and their lifetime, the worker and stream pools. Must not: know any
//! endpoint (the handler given to [`serve`] does), or block its event thread on a client.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;

/// Bytes a connection keeps of its read buffer between requests.
const KEPT_BUFFER: usize = 16 * 1024;

/// What a handler did with a request.
pub enum Outcome {
    /// Write this response (the connection may carry the next request).
    Respond(Response),
    /// Write this response, then run the function (on the server's event thread: it must be
    /// quick and must not block) once the client has every byte, or once the connection is
    /// gone without it. For what must not start before the answer is out (`vmm.shutdown`).
    RespondThen(Response, Box<dyn FnOnce() + Send>),
    /// A long-lived response (e.g. [`ChunkedWriter`] chunks until the client goes away): the
    /// server hands the socket (blocking, with the write timeout) to this function on a thread
    /// of the stream pool, at most `limits.max_streams` at once (503 beyond); the connection is
    /// closed when it returns.
    Stream(Box<dyn FnOnce(UnixStream) + Send>),
}

pub type Handler = Arc<dyn Fn(Request) -> Outcome + Send + Sync>;

/// How often the event thread looks at `stop` and at deadlines while nothing happens.
pub(super) const STOP_POLL: Duration = Duration::from_millis(100);
/// How long [`serve`] waits, after `stop`, for requests in a handler and streams to finish.
pub(super) const DRAIN: Duration = Duration::from_secs(5);
/// Requests waiting for a worker, beyond which the next one gets a 503.
const QUEUE: usize = 1024;

const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Waiting for the first byte of a request (kept alive).
    Idle,
    /// Part of a request has come.
    Reading,
    /// A worker has the request.
    Busy,
    /// A response is being written.
    Writing,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// Bytes read and not yet part of a dispatched request (a pipelined next request stays).
    buf: Vec<u8>,
    /// How much of `buf` was searched for the end of the head.
    scanned: usize,
    /// The current request's head once parsed, with the head's length and the body's.
    head: Option<(Request, usize, usize)>,
    out: Vec<u8>,
    written: usize,
    close_after: bool,
    /// The peer hung up while a worker had its request: nobody to answer.
    gone: bool,
    /// When this connection's current wait ends (None while a worker has it).
    deadline: Option<Instant>,
    /// When it last became idle (eviction picks the longest idle).
    since: Instant,
    /// Runs once the current response is written, or when the connection goes.
    after: Option<AfterWrite>,
}

/// What [`Outcome::RespondThen`] runs: called when taken out of its connection once the
/// response is written, and on drop otherwise (the connection closed, the reply found nobody),
/// so it runs exactly once whatever the client does.
struct AfterWrite(Option<Box<dyn FnOnce() + Send>>);

impl Drop for AfterWrite {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            if catch_unwind(AssertUnwindSafe(f)).is_err() {
                log::error!("API server: an after-response action panicked");
            }
        }
    }
}

struct Job {
    id: u64,
    request: Request,
    keep_alive: bool,
}

enum Reply {
    Bytes {
        bytes: Vec<u8>,
        keep_alive: bool,
        after: Option<AfterWrite>,
    },
    Stream(Box<dyn FnOnce(UnixStream) + Send>),
}

/// Streams running, to bound them and to wait for them on stop.
#[derive(Default)]
struct Streams {
    count: Mutex<usize>,
    idle: Condvar,
}

struct StreamSlot(Arc<Streams>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut count = self.0.count.lock().unwrap_or_else(|e| e.into_inner());
        *count -= 1;
        self.0.idle.notify_all();
    }
}

/// Serves `listener` until `stop` is set (see the module's description). A request that cannot
/// be parsed is answered with its status and a JSON error, and its connection closed. On
/// `stop`, idle and half-read connections close, requests in a handler are still answered, and
/// `serve` waits up to a few seconds for them and for streams before it returns.
pub fn serve(listener: UnixListener, limits: Limits, handler: Handler, stop: Arc<AtomicBool>) {
    raise_fd_limit();
    let server = match Server::new(listener, limits, handler, stop) {
        Ok(server) => server,
        Err(e) => {
            log::error!("API server: cannot start: {e}");
            return;
        }
    };
    server.run();
}

struct Server {
    listener: UnixListener,
    limits: Limits,
    stop: Arc<AtomicBool>,
    epoll: Epoll,
    wake: Arc<EventFd>,
    jobs: Option<SyncSender<Job>>,
    /// The priority lane's queue ([`Limits::priority`]).
    urgent: Option<SyncSender<Job>>,
    replies: Receiver<(u64, Reply)>,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    streams: Arc<Streams>,
}

impl Server {
    fn new(
        listener: UnixListener,
        limits: Limits,
        handler: Handler,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        let (jobs, queue) = mpsc::sync_channel::<Job>(QUEUE);
        let (urgent, urgent_queue) = mpsc::sync_channel::<Job>(QUEUE);
        let (reply_tx, replies) = mpsc::channel();
        let queue = Arc::new(Mutex::new(queue));
        let urgent_queue = Arc::new(Mutex::new(urgent_queue));
        let lanes = (0..limits.workers.max(1))
            .map(|n| (format!("vigil-api-{n}"), queue.clone()))
            .chain([("vigil-api-prio".to_string(), urgent_queue)]);
        for (name, queue) in lanes {
            let (reply_tx, wake, handler) = (reply_tx.clone(), wake.clone(), handler.clone());
            std::thread::Builder::new()
                .name(name)
                .spawn(move || worker(&queue, &reply_tx, &wake, &handler))?;
        }
        Ok(Server {
            listener,
            limits,
            stop,
            epoll,
            wake,
            jobs: Some(jobs),
            urgent: Some(urgent),
            replies,
            conns: HashMap::new(),
            next_id: 0,
            streams: Arc::default(),
        })
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 256];
        let mut next_sweep = Instant::now() + STOP_POLL;
        while !self.stop.load(Ordering::Acquire) {
            let n = match self.epoll.wait(STOP_POLL.as_millis() as i32, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    log::error!("API server: epoll_wait failed, server stopped: {e}");
                    break;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    LISTENER => self.accept_all(),
                    WAKE => self.take_replies(),
                    id => self.on_event(id, event.event_set()),
                }
            }
            let now = Instant::now();
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + STOP_POLL;
            }
        }
        self.drain();
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    return;
                }
                Err(e) => {
                    // EMFILE and friends: make room (the longest idle connection goes) and
                    // look again on the next round rather than spinning here.
                    log::warn!("API server: accept failed: {e}");
                    self.evict_one("the server is out of descriptors");
                    return;
                }
            };
            if self.conns.len() >= self.limits.max_connections
                && !self.evict_one("the server is at its connection limit")
            {
                refuse(
                    stream,
                    "the server is busy: every connection is in use; try again",
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    stream.as_raw_fd(),
                    EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, id),
                )
                .is_err()
            {
                continue;
            }
            let now = Instant::now();
            self.conns.insert(
                id,
                Conn {
                    stream,
                    state: State::Idle,
                    buf: Vec::new(),
                    scanned: 0,
                    head: None,
                    out: Vec::new(),
                    written: 0,
                    close_after: false,
                    gone: false,
                    deadline: Some(now + self.limits.read_timeout),
                    since: now,
                    after: None,
                },
            );
        }
    }

    /// Closes the connection that has waited longest without a request in a worker (idle or
    /// still sending its request): false if every connection is busy.
    fn evict_one(&mut self, why: &str) -> bool {
        let victim = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Idle | State::Reading))
            .min_by_key(|(_, c)| c.since)
            .map(|(id, _)| *id);
        match victim {
            Some(id) => {
                log::debug!("API server: {why}: closing the longest idle connection");
                self.close(id);
                true
            }
            None => false,
        }
    }

    fn on_event(&mut self, id: u64, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        match conn.state {
            State::Idle | State::Reading => self.read(id),
            State::Writing => self.flush(id),
            State::Busy => {
                // Only a hang-up can come (no interest is registered): stop watching; the
                // reply finds nobody to answer.
                if events.intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP) {
                    conn.gone = true;
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        conn.stream.as_raw_fd(),
                        EpollEvent::default(),
                    );
                }
            }
        }
    }

    fn read(&mut self, id: u64) {
        let cap = self.limits.max_head + self.limits.max_body + 4096;
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let mut chunk = [0u8; 16 * 1024];
        let mut eof = false;
        while conn.buf.len() < cap {
            let want = chunk.len().min(cap - conn.buf.len());
            match conn.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        if conn.state == State::Idle && !conn.buf.is_empty() {
            conn.state = State::Reading;
            conn.deadline = Some(Instant::now() + self.limits.read_timeout);
        }
        self.advance(id);
        if eof {
            match self.conns.get(&id).map(|c| c.state) {
                Some(State::Reading) => self.fail(
                    id,
                    HttpError::new(400, "connection closed inside the request"),
                ),
                Some(State::Idle) => self.close(id),
                _ => {
                    // Busy or writing: the answer still goes out to a half-closed peer; stop
                    // reading so that level-triggered EOF does not spin.
                    if let Some(conn) = self.conns.get_mut(&id) {
                        conn.close_after = true;
                    }
                }
            }
        }
    }

    /// Takes the next complete request out of the connection's buffer and hands it to a worker.
    fn advance(&mut self, id: u64) {
        let limits = self.limits.clone();
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if !matches!(conn.state, State::Idle | State::Reading) {
            return;
        }
        if conn.head.is_none() {
            // Empty lines before a request line are allowed (RFC 9112 §2.2).
            let start = conn
                .buf
                .iter()
                .position(|b| *b != b'\r' && *b != b'\n')
                .unwrap_or(conn.buf.len());
            // ... but they count against the head's limit: a client sending nothing else filled
            // the buffer without ever starting a request, and the full buffer's level-triggered
            // readiness then spun the event thread until the read timeout.
            if start > limits.max_head {
                return self.fail(
                    id,
                    HttpError::new(
                        431,
                        "empty lines before the request line exceed the head limit",
                    ),
                );
            }
            let from = conn.scanned.saturating_sub(3).max(start);
            let ended = head_end(&conn.buf[from..]).is_some();
            conn.scanned = conn.buf.len();
            if !ended && conn.buf.len() - start <= limits.max_head {
                return;
            }
            let mut cursor = Cursor::new(&conn.buf[..]);
            match read_head(&mut cursor, &limits) {
                Ok(Some((request, length))) => {
                    conn.head = Some((request, cursor.position() as usize, length));
                }
                Ok(None) => return,
                Err(e) => return self.fail(id, e),
            }
        }
        let Some((_, head_len, length)) = &conn.head else {
            return;
        };
        let total = head_len + length;
        if conn.buf.len() < total {
            return;
        }
        let (mut request, head_len, _) = conn.head.take().unwrap_or_default();
        request.body = conn.buf[head_len..total].to_vec();
        conn.buf.drain(..total);
        // A large body's buffer is not kept for the connection's life: thousands of kept-alive
        // connections that each once sent a megabyte would hold gigabytes.
        conn.buf.shrink_to(KEPT_BUFFER.max(conn.buf.len()));
        conn.scanned = 0;
        conn.state = State::Busy;
        conn.deadline = None;
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            conn.stream.as_raw_fd(),
            EpollEvent::new(EventSet::empty(), id),
        );
        let keep_alive = should_keep_alive(&request) && !self.stop.load(Ordering::Acquire);
        let lane = if (self.limits.priority)(&request) {
            &self.urgent
        } else {
            &self.jobs
        };
        let Some(jobs) = lane else {
            return;
        };
        match jobs.try_send(Job {
            id,
            request,
            keep_alive,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.fail(
                id,
                HttpError::new(503, format!("the server is busy ({QUEUE} requests queued)")),
            ),
            Err(TrySendError::Disconnected(_)) => self.close(id),
        }
    }

    fn take_replies(&mut self) {
        let _ = self.wake.read();
        while let Ok((id, reply)) = self.replies.try_recv() {
            match reply {
                Reply::Bytes {
                    bytes,
                    keep_alive,
                    after,
                } => {
                    let Some(conn) = self.conns.get_mut(&id) else {
                        continue;
                    };
                    if conn.gone {
                        self.close(id);
                        continue;
                    }
                    conn.out = bytes;
                    conn.written = 0;
                    conn.after = after;
                    conn.close_after |= !keep_alive;
                    conn.state = State::Writing;
                    conn.deadline = Some(Instant::now() + self.limits.write_timeout);
                    self.flush(id);
                }
                Reply::Stream(f) => self.start_stream(id, f),
            }
        }
    }

    fn start_stream(&mut self, id: u64, f: Box<dyn FnOnce(UnixStream) + Send>) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            conn.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        if conn.gone {
            return;
        }
        let stream = conn.stream;
        {
            let mut count = self.streams.count.lock().unwrap_or_else(|e| e.into_inner());
            if *count >= self.limits.max_streams {
                drop(count);
                let message = format!(
                    "too many streams open ({}); try again later",
                    self.limits.max_streams
                );
                refuse(stream, &message);
                return;
            }
            *count += 1;
        }
        let slot = StreamSlot(self.streams.clone());
        let write_timeout = self.limits.write_timeout;
        let spawned = std::thread::Builder::new()
            .name("vigil-api-stream".into())
            .spawn(move || {
                let _slot = slot;
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(write_timeout));
                let Ok(ours) = stream.try_clone() else {
                    return;
                };
                if catch_unwind(AssertUnwindSafe(|| f(ours))).is_err() {
                    log::error!("API server: a stream panicked; its connection is closed");
                }
                let _ = stream.shutdown(std::net::Shutdown::Both);
            });
        if let Err(e) = spawned {
            log::warn!("API server: cannot start a stream thread: {e}");
        }
    }

    /// Writes what the socket takes of the connection's response; the rest waits for POLLOUT.
    fn flush(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        while conn.written < conn.out.len() {
            match conn.stream.write(&conn.out[conn.written..]) {
                Ok(0) => return self.close(id),
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = self.epoll.ctl(
                        ControlOperation::Modify,
                        conn.stream.as_raw_fd(),
                        EpollEvent::new(EventSet::OUT, id),
                    );
                    return;
                }
                Err(_) => return self.close(id),
            }
        }
        // Every byte is out: what waited for that runs now.
        drop(conn.after.take());
        if conn.close_after || self.stop.load(Ordering::Acquire) {
            return self.close(id);
        }
        conn.out = Vec::new();
        let now = Instant::now();
        conn.state = if conn.buf.is_empty() {
            State::Idle
        } else {
            State::Reading
        };
        conn.since = now;
        conn.deadline = Some(now + self.limits.read_timeout);
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            conn.stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, id),
        );
        // A pipelined request may be complete already.
        self.advance(id);
    }

    /// Answers `e` (best effort, without waiting) and closes the connection.
    fn fail(&mut self, id: u64, e: HttpError) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let mut bytes = Vec::new();
        let _ = Response::error(e.status, &e.message).write_to(&mut bytes, false);
        conn.out = bytes;
        conn.written = 0;
        conn.close_after = true;
        conn.state = State::Writing;
        conn.deadline = Some(Instant::now() + Duration::from_secs(1));
        self.flush(id);
    }

    fn close(&mut self, id: u64) {
        if let Some(conn) = self.conns.remove(&id) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Ends the waits that ran out: a request not complete within `read_timeout` gets a 408,
    /// an idle connection or a response nobody takes is closed.
    fn sweep(&mut self, now: Instant) {
        let late: Vec<(u64, State)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(id, c)| (*id, c.state))
            .collect();
        for (id, state) in late {
            if state == State::Reading {
                let e = HttpError::new(408, "timed out waiting for the rest of the request");
                self.fail(id, e);
                // `fail` gave it a second to take the answer; after that it is closed.
            } else {
                self.close(id);
            }
        }
    }

    /// After `stop`: closes idle and half-read connections, answers the requests workers hold,
    /// waits for those and for streams (up to [`DRAIN`]).
    fn drain(mut self) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.listener.as_raw_fd(),
            EpollEvent::default(),
        );
        let waiting: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Idle | State::Reading))
            .map(|(id, _)| *id)
            .collect();
        waiting.into_iter().for_each(|id| self.close(id));
        // Workers end once their queue is empty.
        self.jobs = None;
        self.urgent = None;
        let deadline = Instant::now() + DRAIN;
        let mut events = vec![EpollEvent::default(); 64];
        while !self.conns.is_empty() && Instant::now() < deadline {
            let n = self.epoll.wait(50, &mut events).unwrap_or(0);
            for event in &events[..n] {
                match event.data() {
                    LISTENER => {}
                    WAKE => self.take_replies(),
                    id => self.on_event(id, event.event_set()),
                }
            }
            self.sweep(Instant::now());
        }
        let mut count = self.streams.count.lock().unwrap_or_else(|e| e.into_inner());
        while *count > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            count = match self.streams.idle.wait_timeout(count, left) {
                Ok((c, _)) => c,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// Where the head ends in `bytes` (a blank line), if it does.
fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(2)
        .position(|w| w == b"\n\n")
        .or_else(|| bytes.windows(3).position(|w| w == b"\n\r\n"))
}

fn worker(
    queue: &Mutex<Receiver<Job>>,
    replies: &mpsc::Sender<(u64, Reply)>,
    wake: &EventFd,
    handler: &Handler,
) {
    loop {
        let job = match queue.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let Job {
            id,
            request,
            mut keep_alive,
        } = job;
        let head_only = request.method == Method::Head;
        let outcome = catch_unwind(AssertUnwindSafe(|| handler(request))).unwrap_or_else(|p| {
            let why = vmm_core::devices::panic_message(p.as_ref());
            log::error!("API server: the request handler panicked: {why}");
            keep_alive = false;
            Outcome::Respond(Response::error(
                500,
                &format!("the request handler panicked ({why}); the server goes on"),
            ))
        });
        let bytes = |response: Response, after| {
            let mut bytes = Vec::new();
            let _ = response.write(&mut bytes, keep_alive, !head_only);
            Reply::Bytes {
                bytes,
                keep_alive,
                after,
            }
        };
        let reply = match outcome {
            Outcome::Respond(response) => bytes(response, None),
            Outcome::RespondThen(response, f) => bytes(response, Some(AfterWrite(Some(f)))),
            Outcome::Stream(f) => Reply::Stream(f),
        };
        if replies.send((id, reply)).is_err() {
            return;
        }
        let _ = wake.write(1);
    }
}

/// Answers 503 without waiting on the client (what the socket takes), and closes.
pub(super) fn refuse(mut stream: UnixStream, message: &str) {
    log::warn!("API server: {message}");
    let _ = stream.set_nonblocking(true);
    let _ = Response::error(503, message).write_to(&mut stream, false);
}

/// Raises the soft limit on open descriptors to the hard one: each connection holds one.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
