//! The host's end of the verdict channel to the edge.
//!
//! Owns: the socket to the edge and the host's sequence numbers on it, and the counters of
//! what was sent. Must not: decide what to send (that is `tiers`).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use vigil_wire::verdict::RECORD_LEN;

use crate::EdgeLinkConfig;

/// Verdicts to the edge: signed datagrams on the channel, numbered per host.
pub struct EdgeLink {
    socket: UdpSocket,
    config: EdgeLinkConfig,
    seq: Mutex<u64>,
    pub sent_records: AtomicU64,
    pub send_errors: AtomicU64,
}

impl EdgeLink {
    pub fn new(config: EdgeLinkConfig) -> std::io::Result<EdgeLink> {
        let bind: SocketAddr = if config.control.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(config.control)?;
        Ok(EdgeLink {
            socket,
            config,
            // Sequence numbers start above any this sender id used before (a restarted host
            // reuses its id; the edge's replay window remembers the highest number it saw).
            seq: Mutex::new(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_micros() as u64),
            ),
            sent_records: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
        })
    }

    /// Signs and sends records (in as many datagrams as they need).
    pub fn send(&self, records: &[[u8; RECORD_LEN]]) -> bool {
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut ok = true;
        for chunk in records.chunks(vigil_wire::auth::MAX_RECORDS) {
            *seq += 1;
            let mut datagram = [0u8; vigil_wire::auth::MAX_DATAGRAM];
            let sent = vigil_wire::auth::seal(
                &self.config.key,
                self.config.sender,
                *seq,
                now_ms,
                chunk,
                &mut datagram,
            )
            .ok()
            .and_then(|len| self.socket.send(&datagram[..len]).ok());
            if sent.is_some() {
                self.sent_records
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            } else {
                self.send_errors.fetch_add(1, Ordering::Relaxed);
                ok = false;
            }
        }
        ok
    }
}
