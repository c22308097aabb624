//! The outside world's side of a test: real Linux TCP servers and UDP sinks (on sockets made in
//! a namespace, see [`crate::Namespace::tcp_listener`]) that a tenant talks to, and free ports.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};

/// What a one-shot server reads from its client before it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// One line (its newline not included); a read error or the end ends it early.
    Line,
    /// Whatever the first read returns (up to 16 bytes): for a client that sends no newline and
    /// waits for the answer.
    FirstRead,
}

/// A server that accepts one connection on `listener`, reads `request` (each read bounded by
/// `read_timeout`), answers `reply` and closes (which ends a client such as busybox `nc`, that
/// waits for the server's side to close). Joined: the client's address and what it sent.
pub fn answer_one(
    listener: TcpListener,
    request: Request,
    reply: &'static [u8],
    read_timeout: Duration,
) -> JoinHandle<(SocketAddr, String)> {
    std::thread::spawn(move || {
        let (stream, peer) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(read_timeout)).unwrap();
        let mut stream = BufReader::new(stream);
        let got = match request {
            Request::Line => read_line(&mut stream),
            Request::FirstRead => {
                let mut buf = [0u8; 16];
                let n = stream.read(&mut buf).expect("read");
                String::from_utf8_lossy(&buf[..n]).to_string()
            }
        };
        stream.get_mut().write_all(reply).expect("reply");
        (peer, got)
    })
}

/// One line from `stream`, without its line ending (empty at the end or on a read error).
pub fn read_line(stream: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    let _ = stream.read_line(&mut line);
    line.trim_end().to_string()
}

/// A sink that waits (up to `timeout`) for one datagram on `socket`. Joined: the sender's
/// address and the datagram as text.
pub fn receive_datagram(socket: UdpSocket, timeout: Duration) -> JoinHandle<(SocketAddr, String)> {
    std::thread::spawn(move || {
        socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = socket.recv_from(&mut buf).expect("a datagram");
        (from, String::from_utf8_lossy(&buf[..n]).to_string())
    })
}

/// A UDP port on 127.0.0.1 free at the time of asking (bound and released; nothing else here
/// races for it).
/// A TCP port nobody listens on at the moment (for a migration target).
pub fn free_tcp_port() -> Result<u16> {
    let io = |source| Error::Io {
        what: "a free TCP port".into(),
        source,
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?;
    Ok(listener.local_addr().map_err(io)?.port())
}

pub fn free_udp_port() -> Result<u16> {
    let io = |source| Error::Io {
        what: "a free UDP port".into(),
        source,
    };
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(io)?;
    Ok(socket.local_addr().map_err(io)?.port())
}

/// Writes `line` and a newline to `stream` and reads the peer's line back (without its line
/// ending), waiting up to `wait`. An error says which line and what happened: the write or
/// read failed (a reset, a timeout), or the peer closed first.
pub fn echo(
    stream: &mut BufReader<TcpStream>,
    line: &str,
    wait: Duration,
) -> std::result::Result<String, String> {
    let short: String = line.chars().take(24).collect();
    stream
        .get_mut()
        .set_read_timeout(Some(wait))
        .and_then(|()| stream.get_mut().write_all(format!("{line}\n").as_bytes()))
        .map_err(|e| format!("sending {short:?}: {e}"))?;
    let mut got = String::new();
    match stream.read_line(&mut got) {
        Ok(0) => Err(format!("the peer closed before echoing {short:?}")),
        Ok(_) => Ok(got.trim_end().to_string()),
        Err(e) => Err(format!("no echo of {short:?} within {wait:?}: {e}")),
    }
}
