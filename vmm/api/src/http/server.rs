//! The server: a thread-per-connection accept loop with a bound on connections (503 beyond it),
//! keep-alive and pipelining, and a drain on stop.
//!
//! Owns: connections and their lifetime. Must not: know any endpoint (the handler given to
//! [`serve`] does).

use super::*;

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
pub(super) struct Connections {
    state: Mutex<(usize, u64, HashMap<u64, UnixStream>)>,
    idle: Condvar,
}

/// Holds one connection's place; giving it back is the last thing a connection does before its
/// socket closes, so a client that saw the close can count on the place being free.
pub(super) struct Slot {
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
pub(super) const STOP_POLL: Duration = Duration::from_millis(100);
/// How long [`serve`] waits, after `stop`, for connections in a handler to finish.
pub(super) const DRAIN: Duration = Duration::from_secs(5);

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
            Err(e) => {
                log::warn!("API server: accept failed: {e}");
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
        if let Err(e) = std::thread::Builder::new()
            .name("vigil-api-conn".into())
            .spawn(move || connection(stream, slot, &limits, &handler, &stop))
        {
            log::warn!("API server: cannot start a connection thread: {e}");
        }
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

pub(super) fn refuse(mut stream: UnixStream, max: usize) {
    // A short bound: the accept loop must not wait on one client.
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let message = format!("the server is busy ({max} connections open); try again");
    log::warn!("API server: {message}");
    let _ = Response::error(503, &message).write_to(&mut stream, false);
}

pub(super) fn connection(
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
                log::error!("API server: the request handler panicked");
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
