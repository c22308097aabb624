//! The authenticated verdict channel between hosts and the edge node, over UDP: the edge's
//! receiving end, and the keys both ends load. The hosts' sending end is [`crate::link`].
//!
//! Owns: the receiving socket, the pre-shared key (loading and checking it), the edge's boot id,
//! and on the receiving side the order "authenticate, then place in the sender's run, then hand
//! over in sequence order, then acknowledge". The datagram and ack formats live in
//! [`vigil_wire::auth`] and [`vigil_wire::ack`], the per-sender order in [`crate::order`]. Must
//! not: apply anything itself (the caller's `apply` does), or hand a caller records from a
//! datagram that failed any check (a rejected datagram comes back as [`Received::Rejected`] so
//! the caller can log and count it).
//!
//! Why UDP with acks rather than TCP: a verdict batch fits one datagram ([`MAX_RECORDS`]
//! records), the edge keeps no connection per host, and a host behind NAT or a restarted edge
//! needs no reconnect. Delivery is made reliable here: every authentic datagram is answered with
//! a signed, cumulative ack (the sender's run and the sequence number below which everything was
//! applied), and the host retransmits until acknowledged. Authentication does not rely on the
//! source address: a host may sit behind NAT, and the MAC is what proves the sender.
//!
//! Restarts: the edge draws a random boot id when it starts and applies only datagrams that name
//! it, so a datagram recorded for an earlier run of the edge is never applied by a later one (an
//! ack with the new boot id tells the host to start a new run and send again). A host numbers
//! each run from a new epoch above its last one; the edge follows the newest epoch per host.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use vigil_wire::ack::{seal_ack, Ack, Refusal, MAX_REFUSALS};
use vigil_wire::auth::{self, AuthError, MAX_DATAGRAM};
use vigil_wire::verdict::RECORD_LEN;

use crate::order::{Offer, Streams};

pub use crate::order::MAX_SENDERS;
pub use vigil_wire::auth::MAX_RECORDS;

/// Shortest key accepted: 32 bytes (64 hex digits), SHA-256's output size, the strength
/// HMAC-SHA256 can deliver (RFC 2104 §3 advises keys no shorter than the hash output).
pub const MIN_KEY_LEN: usize = 32;
/// Largest key file read: a key is a line of hex; anything much larger is the wrong file.
pub const MAX_KEY_FILE_LEN: u64 = 4096;

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

pub(crate) fn check_key(key: &[u8]) -> io::Result<()> {
    if key.len() < MIN_KEY_LEN {
        return Err(invalid_input(format!(
            "verdict channel key of {} bytes is too short (at least {MIN_KEY_LEN})",
            key.len()
        )));
    }
    Ok(())
}

/// A random, non-zero 64-bit value (the edge's boot id) from the kernel's CSPRNG.
pub fn random_boot_id() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    loop {
        File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let id = u64::from_le_bytes(bytes);
        if id != 0 {
            return Ok(id);
        }
    }
}

/// What the caller's `apply` made of a datagram it took, for the sender's acks: which of its
/// records the tables refused, and how many more the sender may add for certain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Bit `i`: the datagram's record `i` was refused (not applied).
    pub refused: u32,
    /// Why the first refused one was: an [`vigil_wire::outcome::Outcome`] code.
    pub reason: u8,
    /// `Add`/`Adopt` records this sender may send next that the tables take for certain.
    pub room: u32,
}

/// What the acks to one sender repeat: its room and its most recent refusals, for one run.
#[derive(Debug, Default)]
struct Reports {
    epoch: u64,
    room: u32,
    refusals: VecDeque<Refusal>,
}

/// One authentic datagram that is next in its sender's run, handed to the caller's `apply`.
#[derive(Debug)]
pub struct Delivery<'a> {
    pub from: SocketAddr,
    pub sender: u32,
    pub seq: u64,
    /// Raw records (decode each with `VerdictRepr::from_bytes`, which may still reject one).
    pub records: &'a [[u8; RECORD_LEN]],
    /// The sender started a new run (it restarted) with this datagram; the old run's epoch.
    pub restarted: Option<u64>,
}

/// What one datagram turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// Authentic and next in its sender's run: applied, with the held datagrams it released
    /// (`datagrams` in all, `records` records).
    Applied {
        from: SocketAddr,
        sender: u32,
        seq: u64,
        datagrams: usize,
        records: usize,
    },
    /// Authentic but ahead of a gap: held until the datagrams before it arrive.
    Held {
        from: SocketAddr,
        sender: u32,
        seq: u64,
    },
    /// Authentic and applied before: ignored (acknowledged again; its ack may have been lost).
    Duplicate {
        from: SocketAddr,
        sender: u32,
        seq: u64,
    },
    /// Authentic and next, but `apply` could not take it now: the sender will retransmit.
    NotApplied {
        from: SocketAddr,
        sender: u32,
        seq: u64,
    },
    /// Dropped: forged, altered, malformed, for another run of the edge or of the sender, or too
    /// far ahead. Nothing of it may be applied.
    Rejected { from: SocketAddr, reason: AuthError },
}

/// Receiver counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Datagrams applied (held ones included when released).
    pub accepted_datagrams: u64,
    pub accepted_records: u64,
    /// Datagrams held ahead of a gap.
    pub held: u64,
    /// Authentic datagrams applied before (retransmissions whose ack was lost, or replays).
    pub duplicates: u64,
    /// Datagrams `apply` refused (to be retransmitted).
    pub not_applied: u64,
    pub acks_sent: u64,
    /// Senders that started a new run (restarted hosts).
    pub sender_restarts: u64,
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

/// Own keys a sender may have at once (its current one and those of a rotation in progress).
pub const MAX_KEYS_PER_SENDER: usize = 4;

/// The keys the edge checks datagrams with.
///
/// - Key id 0 is the shared key (`--edge-key-file`), if there is one: any sender without keys of
///   its own may sign with it.
/// - Ids 1 and up are a sender's own keys (a host's keys from etcd, by their ids). A sender that
///   has own keys is held to them: the shared key no longer speaks for it, so a host that holds
///   only the shared key cannot pass itself off as that sender.
///
/// Acks are sealed with the key that opened the datagram they answer.
#[derive(Default)]
pub struct Keyring {
    shared: Option<Vec<u8>>,
    senders: HashMap<u32, Vec<(u16, Vec<u8>)>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys.
        f.debug_struct("Keyring")
            .field("shared", &self.shared.is_some())
            .field("senders", &self.key_ids())
            .finish()
    }
}

/// A keyring shared between the receiving thread and whoever installs hosts' keys.
pub type SharedKeyring = Arc<RwLock<Keyring>>;

impl Keyring {
    /// Only the shared key (key id 0).
    pub fn shared(key: Vec<u8>) -> io::Result<Keyring> {
        check_key(&key)?;
        Ok(Keyring {
            shared: Some(key),
            senders: HashMap::new(),
        })
    }

    /// No shared key: only senders given keys of their own are heard.
    pub fn own_keys_only() -> Keyring {
        Keyring::default()
    }

    /// Sets `sender`'s own keys (ids 1 and up, at most [`MAX_KEYS_PER_SENDER`]), replacing
    /// any it had. An empty list removes them (the shared key speaks for it again, if any).
    pub fn set_sender(&mut self, sender: u32, keys: Vec<(u16, Vec<u8>)>) -> io::Result<()> {
        if keys.len() > MAX_KEYS_PER_SENDER {
            return Err(invalid_input(format!(
                "{} keys for sender {sender} (at most {MAX_KEYS_PER_SENDER})",
                keys.len()
            )));
        }
        for (id, key) in &keys {
            if *id == 0 {
                return Err(invalid_input(format!(
                    "key id 0 of sender {sender}: id 0 is the shared key's"
                )));
            }
            check_key(key)?;
        }
        if keys.is_empty() {
            self.senders.remove(&sender);
        } else {
            if !self.senders.contains_key(&sender) && self.senders.len() >= MAX_SENDERS {
                return Err(invalid_input(format!(
                    "keys for {MAX_SENDERS} senders already held; sender {sender} refused"
                )));
            }
            self.senders.insert(sender, keys);
        }
        Ok(())
    }

    /// The key `(sender, key_id)` names, if held.
    pub fn key(&self, sender: u32, key_id: u16) -> Option<&[u8]> {
        match self.senders.get(&sender) {
            Some(own) => own
                .iter()
                .find(|(id, _)| *id == key_id)
                .map(|(_, k)| k.as_slice()),
            None if key_id == 0 => self.shared.as_deref(),
            None => None,
        }
    }

    /// Whether there is a shared key.
    pub fn has_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The senders with own keys and their key ids (never the keys).
    pub fn key_ids(&self) -> std::collections::BTreeMap<u32, Vec<u16>> {
        self.senders
            .iter()
            .map(|(s, keys)| (*s, keys.iter().map(|(id, _)| *id).collect()))
            .collect()
    }
}

/// The receiving end (the edge): authenticates datagrams, orders them per sender, acknowledges.
pub struct VerdictReceiver {
    socket: UdpSocket,
    keys: SharedKeyring,
    boot: u64,
    streams: Streams,
    /// Per sender (at most [`MAX_SENDERS`], like `streams`).
    reports: HashMap<u32, Reports>,
    stats: ChannelStats,
    /// The read timeout last set on the socket (saves a syscall per call when it is unchanged).
    timeout: Option<Duration>,
}

impl fmt::Debug for VerdictReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("VerdictReceiver")
            .field("socket", &self.socket)
            .field("boot", &self.boot)
            .field("senders", &self.streams.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl VerdictReceiver {
    /// Bind the control address (port 0 picks one; see [`VerdictReceiver::local_addr`]), with a
    /// fresh random boot id.
    pub fn bind(addr: impl ToSocketAddrs, key: Vec<u8>) -> io::Result<Self> {
        VerdictReceiver::bind_with_boot(addr, key, random_boot_id()?)
    }

    /// [`VerdictReceiver::bind`] with a chosen boot id (non-zero; a test's fixed value).
    pub fn bind_with_boot(addr: impl ToSocketAddrs, key: Vec<u8>, boot: u64) -> io::Result<Self> {
        let keys = Arc::new(RwLock::new(Keyring::shared(key)?));
        VerdictReceiver::bind_keyring(addr, keys, boot)
    }

    /// Binds with a keyring whose holder may change it while the receiver runs (hosts' own keys
    /// coming and going); `boot` as in [`VerdictReceiver::bind_with_boot`].
    pub fn bind_keyring(
        addr: impl ToSocketAddrs,
        keys: SharedKeyring,
        boot: u64,
    ) -> io::Result<Self> {
        if boot == 0 {
            return Err(invalid_input("an edge boot id is never 0".into()));
        }
        let socket = UdpSocket::bind(addr)?;
        Ok(VerdictReceiver {
            socket,
            keys,
            boot,
            streams: Streams::new(),
            reports: HashMap::new(),
            stats: ChannelStats::default(),
            timeout: None,
        })
    }

    /// The address the channel listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The keyring datagrams are checked with (its holder may add and remove senders' keys).
    pub fn keyring(&self) -> SharedKeyring {
        self.keys.clone()
    }

    /// This run's boot id (hosts address their datagrams to it).
    pub fn boot_id(&self) -> u64 {
        self.boot
    }

    /// The counters so far.
    pub fn stats(&self) -> &ChannelStats {
        &self.stats
    }

    /// Datagrams held ahead of gaps, all senders.
    pub fn held_now(&self) -> usize {
        self.streams.held()
    }

    /// Notes what `apply` made of datagram `seq` of `sender`'s run `epoch`.
    fn note(&mut self, sender: u32, epoch: u64, seq: u64, applied: Applied) {
        if !self.reports.contains_key(&sender) && self.reports.len() >= MAX_SENDERS {
            return;
        }
        let reports = self.reports.entry(sender).or_default();
        if reports.epoch != epoch {
            *reports = Reports {
                epoch,
                ..Reports::default()
            };
        }
        reports.room = applied.room;
        if applied.refused != 0 {
            if reports.refusals.len() == MAX_REFUSALS {
                reports.refusals.pop_front();
            }
            reports.refusals.push_back(Refusal {
                seq,
                records: applied.refused,
                reason: applied.reason,
            });
        }
    }

    /// Acknowledges to `sender` under its key `key_id` (the one that opened the datagram
    /// answered); nothing when that key is gone meanwhile.
    fn ack(&mut self, to: SocketAddr, key_id: u16, sender: u32, epoch: u64, next: u64) {
        let mut ack = Ack {
            key_id,
            sender,
            epoch,
            next,
            edge_boot: self.boot,
            ..Ack::default()
        };
        if let Some(reports) = self.reports.get(&sender).filter(|r| r.epoch == epoch) {
            ack.room = reports.room;
            for (slot, r) in ack.refusals.iter_mut().zip(&reports.refusals) {
                *slot = *r;
            }
            ack.refusal_count = reports.refusals.len() as u8;
        }
        let sealed = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            let Some(key) = keys.key(sender, key_id) else {
                return;
            };
            seal_ack(key, &ack)
        };
        // The boot id is non-zero (checked at bind) and keys are never empty, so sealing
        // cannot fail.
        if let Ok(bytes) = sealed {
            match self.socket.send_to(&bytes, to) {
                Ok(_) => self.stats.acks_sent += 1,
                Err(e) => log::debug!("ack to {to} not sent: {e}"),
            }
        }
    }

    /// Wait up to `timeout` (non-zero) for one datagram and judge it: `Ok(None)` when none came.
    /// Checks run in this order: structure, MAC, edge boot id, the sender's run and order. The
    /// datagram that is next in its run goes to `apply`, then every held one it releases, in
    /// order, until `apply` returns false (not taken: kept for the sender's retransmission).
    /// Every authentic datagram is acknowledged, after `apply`.
    pub fn recv(
        &mut self,
        timeout: Duration,
        mut apply: impl FnMut(&Delivery<'_>) -> bool,
    ) -> io::Result<Option<Received>> {
        self.recv_reporting(timeout, |d| apply(d).then(Applied::default))
    }

    /// [`recv`](Self::recv) whose `apply` also says what became of the records it took (`None`:
    /// not taken): the acks carry it to the sender (its room, and the records refused).
    pub fn recv_reporting(
        &mut self,
        timeout: Duration,
        mut apply: impl FnMut(&Delivery<'_>) -> Option<Applied>,
    ) -> io::Result<Option<Received>> {
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
        let received = self.judge(from, &buf[..len], &mut apply);
        if let Received::Rejected { reason, .. } = &received {
            self.stats.rejected[reason.index()] += 1;
        }
        Ok(Some(received))
    }

    fn judge(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        apply: &mut impl FnMut(&Delivery<'_>) -> Option<Applied>,
    ) -> Received {
        let opened = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            auth::open_with(datagram, |sender, key_id| keys.key(sender, key_id))
        };
        let opened = match opened {
            Ok(opened) => opened,
            Err(reason) => return Received::Rejected { from, reason },
        };
        let h = opened.header;
        let k = h.key_id;
        if h.underlay
            .is_some_and(|signed| signed.to_canonical() != from.ip().to_canonical())
        {
            // The sender's own datagram, sent on by someone at another address (who may be
            // first): never applied nor acknowledged, so its sequence number stays for the
            // sender's own copy, and no host address or trust follows the relay.
            return Received::Rejected {
                from,
                reason: AuthError::Relayed { sender: h.sender },
            };
        }
        if h.edge_boot != self.boot {
            // Authentic, for another run of this edge (or sent before the host learned it):
            // never applied; the ack tells the host which run speaks now.
            self.ack(from, k, h.sender, h.epoch, 0);
            return Received::Rejected {
                from,
                reason: AuthError::OtherEdge {
                    sender: h.sender,
                    edge_boot: h.edge_boot,
                },
            };
        }
        let records: Vec<[u8; RECORD_LEN]> = opened.records().copied().collect();
        let offer = self.streams.offer(h.sender, h.epoch, h.seq, &records);
        let received = match offer {
            Err(reason) => {
                match reason {
                    // Tell the host the run the edge follows (it starts a newer one), or where
                    // the gap is.
                    AuthError::StaleEpoch { current, .. } => {
                        self.ack(from, k, h.sender, current, 0)
                    }
                    AuthError::TooFarAhead { .. } => {
                        if let Some((epoch, next)) = self.streams.position(h.sender) {
                            self.ack(from, k, h.sender, epoch, next);
                        }
                    }
                    _ => {}
                }
                return Received::Rejected { from, reason };
            }
            Ok(Offer::Duplicate) => {
                self.stats.duplicates += 1;
                Received::Duplicate {
                    from,
                    sender: h.sender,
                    seq: h.seq,
                }
            }
            Ok(Offer::Held) => {
                self.stats.held += 1;
                Received::Held {
                    from,
                    sender: h.sender,
                    seq: h.seq,
                }
            }
            Ok(Offer::Ready { restarted }) => {
                if restarted.is_some() {
                    self.stats.sender_restarts += 1;
                }
                let first = Delivery {
                    from,
                    sender: h.sender,
                    seq: h.seq,
                    records: &records,
                    restarted,
                };
                if let Some(applied) = apply(&first) {
                    self.note(h.sender, h.epoch, h.seq, applied);
                    self.streams.applied(h.sender);
                    let (mut datagrams, mut total) = (1, records.len());
                    while let Some((seq, held)) = self.streams.take_ready(h.sender) {
                        let delivery = Delivery {
                            from,
                            sender: h.sender,
                            seq,
                            records: &held,
                            restarted: None,
                        };
                        let Some(applied) = apply(&delivery) else {
                            self.streams.put_back(h.sender, seq, held);
                            self.stats.not_applied += 1;
                            break;
                        };
                        self.note(h.sender, h.epoch, seq, applied);
                        self.streams.applied(h.sender);
                        datagrams += 1;
                        total += held.len();
                    }
                    self.stats.accepted_datagrams += datagrams as u64;
                    self.stats.accepted_records += total as u64;
                    Received::Applied {
                        from,
                        sender: h.sender,
                        seq: h.seq,
                        datagrams,
                        records: total,
                    }
                } else {
                    self.streams.not_applied(h.sender, restarted);
                    self.stats.not_applied += 1;
                    Received::NotApplied {
                        from,
                        sender: h.sender,
                        seq: h.seq,
                    }
                }
            }
        };
        if let Some((epoch, next)) = self.streams.position(h.sender) {
            self.ack(from, k, h.sender, epoch, next);
        }
        received
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
