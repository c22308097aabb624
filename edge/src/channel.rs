//! The authenticated verdict channel between hosts and the edge node, over UDP.
//!
//! Owns: the sockets, the pre-shared key (loading and checking it), sequence numbering on the
//! sending side, and on the receiving side the order "authenticate, then check replay, then hand
//! over". The datagram format, the MAC and the replay window live in [`vigil_wire::auth`]. Must
//! not: apply anything itself, or hand a caller records from a datagram that failed any check
//! (a rejected datagram comes back as [`Received::Rejected`] so the caller can log and count it).
//!
//! Why UDP: a verdict batch fits one datagram ([`MAX_RECORDS`] records), the edge needs no
//! connection state per host, and a lost datagram costs one flow's first packets until the host
//! re-sends (verdicts are idempotent: re-adding refreshes the lifetime). Authentication does not
//! rely on the source address: a host may sit behind NAT, and the MAC is what proves the sender.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vigil_wire::auth::{self, AuthError, ReplayTable, MAX_DATAGRAM, MAX_RECORDS};
use vigil_wire::verdict::RECORD_LEN;

/// Shortest key accepted: 32 bytes (64 hex digits), SHA-256's output size, the strength
/// HMAC-SHA256 can deliver (RFC 2104 §3 advises keys no shorter than the hash output).
pub const MIN_KEY_LEN: usize = 32;
/// Largest key file read: a key is a line of hex; anything much larger is the wrong file.
pub const MAX_KEY_FILE_LEN: u64 = 4096;
/// Hosts one edge tracks replay state for (see [`ReplayTable`]: a full table refuses new
/// senders rather than forgetting old ones).
pub const MAX_SENDERS: usize = 1024;

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn check_key(key: &[u8]) -> io::Result<()> {
    if key.len() < MIN_KEY_LEN {
        return Err(invalid_input(format!(
            "verdict channel key of {} bytes is too short (at least {MIN_KEY_LEN})",
            key.len()
        )));
    }
    Ok(())
}

/// The sending end (a host): signs verdict records and sends them to one edge.
#[derive(Debug)]
pub struct VerdictSender {
    socket: UdpSocket,
    key: Vec<u8>,
    sender_id: u32,
    next_seq: u64,
}

impl VerdictSender {
    /// A sender with id `sender_id`, connected to the edge's control address, numbering its
    /// datagrams from 1. A sender that restarts must not start at 1 again (the edge remembers
    /// the highest number it accepted and rejects lower ones): see [`VerdictSender::with_first_seq`].
    pub fn connect(edge: impl ToSocketAddrs, key: Vec<u8>, sender_id: u32) -> io::Result<Self> {
        check_key(&key)?;
        let edge = edge.to_socket_addrs()?.next().ok_or_else(|| {
            invalid_input("the edge's control address resolves to nothing".into())
        })?;
        let local: SocketAddr = match edge {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local)?;
        socket.connect(edge)?;
        Ok(VerdictSender {
            socket,
            key,
            sender_id,
            next_seq: 1,
        })
    }

    /// Number the next datagram `seq` (non-zero) instead: a restarted sender resumes above
    /// every number it used before, e.g. from the wall clock in microseconds.
    pub fn with_first_seq(mut self, seq: u64) -> io::Result<Self> {
        if seq == 0 {
            return Err(invalid_input("sequence numbers start at 1".into()));
        }
        self.next_seq = seq;
        Ok(self)
    }

    /// The sequence number the next datagram will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The local address datagrams leave from.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sign and send `records` (emitted with `VerdictRepr::emit`), [`MAX_RECORDS`] per
    /// datagram, in order; returns the number of datagrams sent (0 for no records). Each datagram
    /// consumes a sequence number even if sending it fails, so a number is never signed twice.
    /// An error from a datagram stops the batch (the records before it were sent). UDP gives no
    /// delivery guarantee; an ICMP "port unreachable" from an earlier datagram may surface here as
    /// `ConnectionRefused`.
    pub fn send(&mut self, records: &[[u8; RECORD_LEN]]) -> io::Result<usize> {
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut datagram = [0u8; MAX_DATAGRAM];
        let mut sent = 0;
        for chunk in records.chunks(MAX_RECORDS) {
            let seq = self.next_seq;
            self.next_seq = seq
                .checked_add(1)
                .ok_or_else(|| io::Error::other("verdict sequence numbers exhausted"))?;
            let len = auth::seal(
                &self.key,
                self.sender_id,
                seq,
                timestamp_ms,
                chunk,
                &mut datagram,
            )
            .map_err(io::Error::other)?;
            self.socket.send(&datagram[..len])?;
            sent += 1;
        }
        Ok(sent)
    }
}

/// What one datagram turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// Authentic and fresh: the records may be applied (they are raw; decode each with
    /// `VerdictRepr::from_bytes`, which may still reject one).
    Accepted {
        from: SocketAddr,
        sender: u32,
        seq: u64,
        records: Vec<[u8; RECORD_LEN]>,
    },
    /// Dropped: forged, altered, malformed or replayed. Nothing of it may be applied.
    Rejected { from: SocketAddr, reason: AuthError },
}

/// Receiver counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    pub accepted_datagrams: u64,
    pub accepted_records: u64,
    /// Rejected datagrams, indexed by [`AuthError::index`].
    pub rejected: [u64; AuthError::COUNT],
}

impl ChannelStats {
    /// Rejected datagrams, all reasons.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }

    /// Rejected datagrams with the same reason as `reason` (its fields are ignored).
    pub fn rejected_for(&self, reason: &AuthError) -> u64 {
        self.rejected[reason.index()]
    }

    /// Non-zero rejection counters by [`AuthError::name`].
    pub fn rejected_by_name(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.rejected
            .iter()
            .enumerate()
            .filter(|(_, n)| **n != 0)
            .filter_map(|(i, n)| Some((AuthError::name_of_index(i)?, *n)))
    }
}

/// The receiving end (the edge): authenticates datagrams and filters replays.
pub struct VerdictReceiver {
    socket: UdpSocket,
    key: Vec<u8>,
    // Boxed: 1024 windows are ~40 KiB, too much to move around on the stack.
    replay: Box<ReplayTable<MAX_SENDERS>>,
    stats: ChannelStats,
    /// The read timeout last set on the socket (saves a syscall per call when it is unchanged).
    timeout: Option<Duration>,
}

impl fmt::Debug for VerdictReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("VerdictReceiver")
            .field("socket", &self.socket)
            .field("senders", &self.replay.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl VerdictReceiver {
    /// Bind the control address (port 0 picks one; see [`VerdictReceiver::local_addr`]).
    pub fn bind(addr: impl ToSocketAddrs, key: Vec<u8>) -> io::Result<Self> {
        check_key(&key)?;
        let socket = UdpSocket::bind(addr)?;
        Ok(VerdictReceiver {
            socket,
            key,
            replay: Box::default(),
            stats: ChannelStats::default(),
            timeout: None,
        })
    }

    /// The address the channel listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The counters so far.
    pub fn stats(&self) -> &ChannelStats {
        &self.stats
    }

    /// Forget a sender's replay state (an operator action after a host was reinstalled and
    /// restarted its numbering); returns whether it had any.
    pub fn forget_sender(&mut self, sender: u32) -> bool {
        self.replay.forget(sender)
    }

    /// Wait up to `timeout` (non-zero) for one datagram and judge it: `Ok(None)` when none came.
    /// Checks run in this order: structure, MAC, then replay; the replay window moves only for
    /// an authentic datagram, so forgeries cannot push a real sender out of its window.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Option<Received>> {
        if self.timeout != Some(timeout) {
            // Rejects a zero timeout with InvalidInput.
            self.socket.set_read_timeout(Some(timeout))?;
            self.timeout = Some(timeout);
        }
        // One byte more than the largest valid datagram, so a larger one shows as oversize
        // instead of being silently cut to a plausible length.
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        let (len, from) = loop {
            match self.socket.recv_from(&mut buf) {
                Ok(got) => break got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        };
        let verdict = auth::open(&self.key, &buf[..len]).and_then(|opened| {
            self.replay
                .check_and_update(opened.sender, opened.seq)
                .map(|()| opened)
        });
        Ok(Some(match verdict {
            Ok(opened) => {
                let records: Vec<[u8; RECORD_LEN]> = opened.records().copied().collect();
                self.stats.accepted_datagrams += 1;
                self.stats.accepted_records += records.len() as u64;
                Received::Accepted {
                    from,
                    sender: opened.sender,
                    seq: opened.seq,
                    records,
                }
            }
            Err(reason) => {
                self.stats.rejected[reason.index()] += 1;
                Received::Rejected { from, reason }
            }
        }))
    }
}

/// Why a key could not be loaded. Messages never contain key material.
#[derive(Debug)]
pub enum KeyError {
    /// The key file does not exist.
    Missing { path: PathBuf },
    /// The key file exists but cannot be read.
    Unreadable { path: PathBuf, source: io::Error },
    /// The key file is larger than [`MAX_KEY_FILE_LEN`].
    TooLarge { path: PathBuf },
    /// The key file's content is not a valid key (the inner error says why).
    InFile {
        path: PathBuf,
        source: Box<KeyError>,
    },
    /// No key at all (empty, or only whitespace).
    Empty,
    /// A character that is not a hex digit, at this byte offset of the trimmed text.
    NotHex { offset: usize },
    /// An odd number of hex digits: the last byte is incomplete.
    OddLength { digits: usize },
    /// Fewer than [`MIN_KEY_LEN`] bytes.
    TooShort { bytes: usize },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Missing { path } => write!(f, "key file {} does not exist", path.display()),
            KeyError::Unreadable { path, source } => {
                write!(f, "key file {} unreadable: {source}", path.display())
            }
            KeyError::TooLarge { path } => write!(
                f,
                "key file {} is larger than {MAX_KEY_FILE_LEN} bytes: not a key",
                path.display()
            ),
            KeyError::InFile { path, source } => {
                write!(f, "key file {}: {source}", path.display())
            }
            KeyError::Empty => write!(f, "key is empty"),
            KeyError::NotHex { offset } => {
                write!(f, "key is not hex: non-hex character at offset {offset}")
            }
            KeyError::OddLength { digits } => {
                write!(f, "key has an odd number of hex digits ({digits})")
            }
            KeyError::TooShort { bytes } => write!(
                f,
                "key is {bytes} bytes, at least {MIN_KEY_LEN} needed ({} hex digits)",
                2 * MIN_KEY_LEN
            ),
        }
    }
}

impl std::error::Error for KeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KeyError::Unreadable { source, .. } => Some(source),
            KeyError::InFile { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn key_from_hex_bytes(text: &[u8]) -> Result<Vec<u8>, KeyError> {
    let text = text.trim_ascii();
    if text.is_empty() {
        return Err(KeyError::Empty);
    }
    // Check every character before the length, so a wrong file says "not hex", not "odd".
    if let Some(offset) = text.iter().position(|c| hex_digit(*c).is_none()) {
        return Err(KeyError::NotHex { offset });
    }
    if !text.len().is_multiple_of(2) {
        return Err(KeyError::OddLength { digits: text.len() });
    }
    let key: Vec<u8> = text
        .chunks_exact(2)
        .filter_map(|pair| Some(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?))
        .collect();
    if key.len() < MIN_KEY_LEN {
        return Err(KeyError::TooShort { bytes: key.len() });
    }
    Ok(key)
}

/// Decode a key written as hex digits (either case), surrounding whitespace ignored, at least
/// [`MIN_KEY_LEN`] bytes.
pub fn key_from_hex(text: &str) -> Result<Vec<u8>, KeyError> {
    key_from_hex_bytes(text.as_bytes())
}

/// Read a key file: one key in hex as [`key_from_hex`] takes it (e.g. the output of
/// `openssl rand -hex 32`).
pub fn load_key(path: impl AsRef<Path>) -> Result<Vec<u8>, KeyError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => KeyError::Missing { path: path.into() },
        _ => KeyError::Unreadable {
            path: path.into(),
            source,
        },
    })?;
    let mut text = Vec::new();
    // Bounded read: a key path pointing at a device or a huge file must not eat memory.
    file.take(MAX_KEY_FILE_LEN + 1)
        .read_to_end(&mut text)
        .map_err(|source| KeyError::Unreadable {
            path: path.into(),
            source,
        })?;
    if text.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(KeyError::TooLarge { path: path.into() });
    }
    key_from_hex_bytes(&text).map_err(|e| KeyError::InFile {
        path: path.into(),
        source: Box::new(e),
    })
}
