//! Authenticated, replay-protected verdict datagrams: how a host pushes verdict records to an edge
//! node over an untrusted network.
//!
//! Owns: the datagram format, sealing (HMAC-SHA256 with a pre-shared key), opening (length and
//! header checks, then a constant-time tag check) and the per-sender anti-replay window. Must not:
//! allocate, touch the network, or interpret the records (the caller decodes each one with
//! [`crate::verdict::VerdictRepr::from_bytes`] after [`open`] succeeded).
//!
//! Layout (Vigil's own ABI, [`VERSION`] 3; integers little endian like every other Vigil record,
//! since both ends are x86-64):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic [`MAGIC`] = `"VGV1"` (Vigil verdicts; the layout is the version byte's) |
//! | 4 | 1 | format version [`VERSION`] |
//! | 5 | 1 | flags, reserved, must be 0 |
//! | 6 | 2 | key id: which pre-shared key signed it (0 when only one key is configured) |
//! | 8 | 4 | sender id: which host |
//! | 12 | 8 | sequence number: consecutive within a run, from its epoch (0 is invalid) |
//! | 20 | 8 | epoch: the sequence number of the run's first datagram (`1 ..= seq`) |
//! | 28 | 8 | edge boot id: which run of the edge the sender addresses (0 = not yet known) |
//! | 36 | 8 | sender's wall clock, ms since the Unix epoch (diagnostics only, never trusted) |
//! | 44 | 16 | the sender's underlay address, IPv6 or IPv4-mapped (all zero: not given) |
//! | 60 | 2 | record count `n`, at most [`MAX_RECORDS`] |
//! | 62 | n × 64 | `n` verdict records ([`RECORD_LEN`] bytes each) |
//! | 62 + n × 64 | 32 | HMAC-SHA256 tag over bytes `0 .. 62 + n × 64` |
//!
//! Every header field is inside the tag, so a forger can change none of them. The UDP source
//! address is not: the underlay address field is how a receiver tells the sender's own datagram
//! from a copy an on-path attacker relays from another address (`edge::channel` refuses those). Delivery is the
//! receiver's business (`edge::channel`): it applies a sender's datagrams in sequence order within
//! the newest epoch it has seen from that sender, only when they name its own boot id, and
//! acknowledges them with [`crate::ack`] datagrams. So a datagram of an older run of the host, or
//! one addressed to an earlier run of the edge, is never applied, and within a run each sequence
//! number is applied at most once. A datagram that fails any check is dropped whole: no record of
//! a rejected datagram is ever applied.
//!
//! [`SignedBatch`] is a zero-copy typed view in the smoltcp `wire` style: `new_checked` checks the
//! lengths, every accessor is then in bounds.

use core::fmt;
use core::net::{IpAddr, Ipv6Addr};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::verdict::RECORD_LEN;

/// `"VGV1"`: Vigil verdicts, format 1.
pub const MAGIC: [u8; 4] = *b"VGV1";
/// Version of the datagram layout above (2: the epoch and edge boot id fields; 3: the underlay
/// address).
pub const VERSION: u8 = 3;
/// Bytes before the first record.
pub const HEADER_LEN: usize = 62;
/// HMAC-SHA256 output length (RFC 2104 with SHA-256, FIPS 180-4): the full tag, never truncated.
pub const TAG_LEN: usize = 32;
/// Largest datagram a sender emits and a receiver accepts: fits a 1500-byte Ethernet MTU with
/// room for IPv6 + UDP headers and a tunnel encapsulation (VXLAN/Geneve) on the way.
pub const MAX_DATAGRAM: usize = 1400;
/// Most records one datagram carries: `(1400 - 62 - 32) / 64` = 20 (1374 bytes).
pub const MAX_RECORDS: usize = (MAX_DATAGRAM - HEADER_LEN - TAG_LEN) / RECORD_LEN;
/// Smallest valid datagram: a header and a tag, no records.
pub const MIN_DATAGRAM: usize = HEADER_LEN + TAG_LEN;
/// How far below the highest accepted sequence number a datagram may still arrive (reordering
/// tolerance), in sequence numbers.
pub const REPLAY_WINDOW: u64 = 128;

mod field {
    use core::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: usize = 4;
    pub const FLAGS: usize = 5;
    pub const KEY_ID: Range<usize> = 6..8;
    pub const SENDER: Range<usize> = 8..12;
    pub const SEQ: Range<usize> = 12..20;
    pub const EPOCH: Range<usize> = 20..28;
    pub const EDGE_BOOT: Range<usize> = 28..36;
    pub const TIMESTAMP_MS: Range<usize> = 36..44;
    pub const UNDERLAY: Range<usize> = 44..60;
    pub const COUNT: Range<usize> = 60..62;
    pub const RECORDS: usize = 62;
}

type HmacSha256 = Hmac<Sha256>;

/// Why a datagram was not sealed, opened or accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthError {
    /// Shorter than a header and a tag.
    Truncated { len: usize },
    /// Longer than [`MAX_DATAGRAM`].
    Oversize { len: usize },
    /// Not a Vigil verdict datagram.
    BadMagic,
    /// A layout version this build does not speak.
    BadVersion(u8),
    /// Reserved flags set.
    BadFlags(u8),
    /// The length does not match the record count.
    BadLength { count: u16, len: usize },
    /// Sequence number or epoch 0, or an epoch above the sequence number.
    BadSequence,
    /// The tag does not match: wrong key, or the datagram was altered.
    BadTag,
    /// This `(sender, seq)` was already accepted.
    Replayed { sender: u32, seq: u64 },
    /// Too far below the highest sequence accepted from this sender to tell whether it is a
    /// replay.
    TooOld { sender: u32, seq: u64, highest: u64 },
    /// The replay table tracks as many senders as it can; a new one is refused.
    TooManySenders { sender: u32 },
    /// The output buffer cannot hold the datagram.
    BufferTooSmall { need: usize, have: usize },
    /// More records than one datagram carries ([`MAX_RECORDS`]).
    TooManyRecords(usize),
    /// An empty key authenticates nothing.
    KeyEmpty,
    /// From an older run of the sender than the newest one seen (a host that restarted, or a
    /// replay of its earlier run).
    StaleEpoch {
        sender: u32,
        epoch: u64,
        current: u64,
    },
    /// Addressed to another run of the receiving edge (or sent before the sender knew it).
    OtherEdge { sender: u32, edge_boot: u64 },
    /// Too far ahead of the next sequence number the receiver applies to hold it.
    TooFarAhead { sender: u32, seq: u64, next: u64 },
    /// The receiver holds no key `key_id` for this sender (never given, rotated out, or the
    /// sender's host is not registered).
    UnknownKey { sender: u32, key_id: u16 },
    /// Authentic, but it came from another address than the underlay address its sender signed
    /// into it: relayed by someone else.
    Relayed { sender: u32 },
}

impl AuthError {
    /// Number of distinct reasons ([`AuthError::index`] is below it): sized for counters.
    pub const COUNT: usize = 19;

    /// A stable short name per reason, for counters and log fields.
    pub const fn name(&self) -> &'static str {
        match self {
            AuthError::Truncated { .. } => "truncated",
            AuthError::Oversize { .. } => "oversize",
            AuthError::BadMagic => "bad_magic",
            AuthError::BadVersion(_) => "bad_version",
            AuthError::BadFlags(_) => "bad_flags",
            AuthError::BadLength { .. } => "bad_length",
            AuthError::BadSequence => "bad_sequence",
            AuthError::BadTag => "bad_tag",
            AuthError::Replayed { .. } => "replayed",
            AuthError::TooOld { .. } => "too_old",
            AuthError::TooManySenders { .. } => "too_many_senders",
            AuthError::BufferTooSmall { .. } => "buffer_too_small",
            AuthError::TooManyRecords(_) => "too_many_records",
            AuthError::KeyEmpty => "key_empty",
            AuthError::StaleEpoch { .. } => "stale_epoch",
            AuthError::OtherEdge { .. } => "other_edge",
            AuthError::TooFarAhead { .. } => "too_far_ahead",
            AuthError::UnknownKey { .. } => "unknown_key",
            AuthError::Relayed { .. } => "relayed",
        }
    }

    /// A dense index per reason, `0..COUNT`, in declaration order (for counter arrays).
    pub const fn index(&self) -> usize {
        match self {
            AuthError::Truncated { .. } => 0,
            AuthError::Oversize { .. } => 1,
            AuthError::BadMagic => 2,
            AuthError::BadVersion(_) => 3,
            AuthError::BadFlags(_) => 4,
            AuthError::BadLength { .. } => 5,
            AuthError::BadSequence => 6,
            AuthError::BadTag => 7,
            AuthError::Replayed { .. } => 8,
            AuthError::TooOld { .. } => 9,
            AuthError::TooManySenders { .. } => 10,
            AuthError::BufferTooSmall { .. } => 11,
            AuthError::TooManyRecords(_) => 12,
            AuthError::KeyEmpty => 13,
            AuthError::StaleEpoch { .. } => 14,
            AuthError::OtherEdge { .. } => 15,
            AuthError::TooFarAhead { .. } => 16,
            AuthError::UnknownKey { .. } => 17,
            AuthError::Relayed { .. } => 18,
        }
    }

    /// The [`AuthError::name`] of reason `index`, the inverse of [`AuthError::index`].
    pub const fn name_of_index(index: usize) -> Option<&'static str> {
        const NAMES: [&str; AuthError::COUNT] = [
            "truncated",
            "oversize",
            "bad_magic",
            "bad_version",
            "bad_flags",
            "bad_length",
            "bad_sequence",
            "bad_tag",
            "replayed",
            "too_old",
            "too_many_senders",
            "buffer_too_small",
            "too_many_records",
            "key_empty",
            "stale_epoch",
            "other_edge",
            "too_far_ahead",
            "unknown_key",
            "relayed",
        ];
        if index < NAMES.len() {
            Some(NAMES[index])
        } else {
            None
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AuthError::Truncated { len } => write!(
                f,
                "verdict datagram truncated: {len} bytes, at least {MIN_DATAGRAM} needed"
            ),
            AuthError::Oversize { len } => write!(
                f,
                "verdict datagram of {len} bytes exceeds the {MAX_DATAGRAM}-byte maximum"
            ),
            AuthError::BadMagic => write!(f, "not a verdict datagram (bad magic)"),
            AuthError::BadVersion(v) => {
                write!(f, "verdict datagram version {v} unsupported (expected {VERSION})")
            }
            AuthError::BadFlags(v) => write!(f, "verdict datagram reserved flags 0x{v:02x} set"),
            AuthError::BadLength { count, len } => write!(
                f,
                "verdict datagram of {len} bytes cannot hold {count} records"
            ),
            AuthError::BadSequence => write!(
                f,
                "verdict datagram sequence number or epoch 0, or epoch above the sequence"
            ),
            AuthError::BadTag => write!(
                f,
                "verdict datagram authentication failed (wrong key or altered)"
            ),
            AuthError::Replayed { sender, seq } => {
                write!(f, "replayed verdict datagram: sender {sender} sequence {seq}")
            }
            AuthError::TooOld {
                sender,
                seq,
                highest,
            } => write!(
                f,
                "verdict datagram too old: sender {sender} sequence {seq}, highest seen {highest}, window {REPLAY_WINDOW}"
            ),
            AuthError::TooManySenders { sender } => write!(
                f,
                "replay table full: new sender {sender} refused"
            ),
            AuthError::BufferTooSmall { need, have } => {
                write!(f, "buffer too small for verdict datagram: {have} of {need} bytes")
            }
            AuthError::TooManyRecords(n) => {
                write!(f, "{n} records do not fit one verdict datagram (at most {MAX_RECORDS})")
            }
            AuthError::KeyEmpty => write!(f, "empty authentication key"),
            AuthError::StaleEpoch {
                sender,
                epoch,
                current,
            } => write!(
                f,
                "verdict datagram of an older run: sender {sender} epoch {epoch}, current {current}"
            ),
            AuthError::OtherEdge { sender, edge_boot } => write!(
                f,
                "verdict datagram from sender {sender} for edge run {edge_boot:#x}, not this one"
            ),
            AuthError::TooFarAhead { sender, seq, next } => write!(
                f,
                "verdict datagram too far ahead: sender {sender} sequence {seq}, next {next}"
            ),
            AuthError::UnknownKey { sender, key_id } => write!(
                f,
                "verdict datagram from sender {sender} signed with key id {key_id}, which this edge does not hold for it"
            ),
            AuthError::Relayed { sender } => write!(
                f,
                "verdict datagram of sender {sender} from another address than the underlay address it signed in (relayed, or the underlay translates addresses: Vigil's does not support NAT between hosts and edges)"
            ),
        }
    }
}

// `core::error::Error` (Rust 1.81) so std callers can box it or wrap it in `io::Error`.
impl core::error::Error for AuthError {}

/// Total datagram length for `count` records.
pub const fn datagram_len(count: usize) -> usize {
    HEADER_LEN + count * RECORD_LEN + TAG_LEN
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}
fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn keyed_mac(key: &[u8]) -> Result<HmacSha256, AuthError> {
    if key.is_empty() {
        return Err(AuthError::KeyEmpty);
    }
    // HMAC takes keys of any length (RFC 2104 §2), so this cannot fail for a non-empty key; map
    // rather than unwrap anyway.
    HmacSha256::new_from_slice(key).map_err(|_| AuthError::KeyEmpty)
}

/// A zero-copy view of a verdict datagram over a byte buffer.
#[derive(Clone, Copy, Debug)]
pub struct SignedBatch<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> SignedBatch<T> {
    /// Wrap a buffer without checking it; accessors may panic on a short buffer.
    pub const fn new_unchecked(buffer: T) -> SignedBatch<T> {
        SignedBatch { buffer }
    }

    /// Wrap a buffer after [`SignedBatch::check_len`].
    pub fn new_checked(buffer: T) -> Result<SignedBatch<T>, AuthError> {
        let b = Self::new_unchecked(buffer);
        b.check_len()?;
        Ok(b)
    }

    /// Check that the buffer holds a header, exactly the records its count announces and a tag,
    /// within [`MAX_DATAGRAM`]. After it, no accessor panics. Does not check the magic, the
    /// version or the tag ([`open`] does).
    pub fn check_len(&self) -> Result<(), AuthError> {
        let len = self.buffer.as_ref().len();
        if len < MIN_DATAGRAM {
            return Err(AuthError::Truncated { len });
        }
        if len > MAX_DATAGRAM {
            return Err(AuthError::Oversize { len });
        }
        let count = self.record_count();
        if count as usize > MAX_RECORDS {
            return Err(AuthError::TooManyRecords(count as usize));
        }
        if datagram_len(count as usize) != len {
            return Err(AuthError::BadLength { count, len });
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn magic(&self) -> [u8; 4] {
        let b = &self.buffer.as_ref()[field::MAGIC];
        [b[0], b[1], b[2], b[3]]
    }
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VERSION]
    }
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }
    pub fn key_id(&self) -> u16 {
        le_u16(&self.buffer.as_ref()[field::KEY_ID])
    }
    pub fn sender(&self) -> u32 {
        le_u32(&self.buffer.as_ref()[field::SENDER])
    }
    pub fn seq(&self) -> u64 {
        le_u64(&self.buffer.as_ref()[field::SEQ])
    }
    pub fn epoch(&self) -> u64 {
        le_u64(&self.buffer.as_ref()[field::EPOCH])
    }
    pub fn edge_boot(&self) -> u64 {
        le_u64(&self.buffer.as_ref()[field::EDGE_BOOT])
    }
    pub fn timestamp_ms(&self) -> u64 {
        le_u64(&self.buffer.as_ref()[field::TIMESTAMP_MS])
    }
    /// The underlay address the sender signed in (None: not given).
    pub fn underlay(&self) -> Option<IpAddr> {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&self.buffer.as_ref()[field::UNDERLAY]);
        let v6 = Ipv6Addr::from(octets);
        if v6.is_unspecified() {
            return None;
        }
        Some(match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        })
    }
    pub fn record_count(&self) -> u16 {
        le_u16(&self.buffer.as_ref()[field::COUNT])
    }

    /// The records, `record_count × RECORD_LEN` bytes.
    pub fn records(&self) -> &[u8] {
        let end = field::RECORDS + self.record_count() as usize * RECORD_LEN;
        &self.buffer.as_ref()[field::RECORDS..end]
    }

    /// The bytes the tag covers (everything before it).
    pub fn signed_bytes(&self) -> &[u8] {
        let end = field::RECORDS + self.record_count() as usize * RECORD_LEN;
        &self.buffer.as_ref()[..end]
    }

    /// The tag as carried (unverified).
    pub fn tag(&self) -> &[u8] {
        let start = field::RECORDS + self.record_count() as usize * RECORD_LEN;
        &self.buffer.as_ref()[start..start + TAG_LEN]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> SignedBatch<T> {
    pub fn set_magic(&mut self, v: [u8; 4]) {
        self.buffer.as_mut()[field::MAGIC].copy_from_slice(&v);
    }
    pub fn set_version(&mut self, v: u8) {
        self.buffer.as_mut()[field::VERSION] = v;
    }
    pub fn set_flags(&mut self, v: u8) {
        self.buffer.as_mut()[field::FLAGS] = v;
    }
    pub fn set_key_id(&mut self, v: u16) {
        self.buffer.as_mut()[field::KEY_ID].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_sender(&mut self, v: u32) {
        self.buffer.as_mut()[field::SENDER].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_seq(&mut self, v: u64) {
        self.buffer.as_mut()[field::SEQ].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_epoch(&mut self, v: u64) {
        self.buffer.as_mut()[field::EPOCH].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_edge_boot(&mut self, v: u64) {
        self.buffer.as_mut()[field::EDGE_BOOT].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_timestamp_ms(&mut self, v: u64) {
        self.buffer.as_mut()[field::TIMESTAMP_MS].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_underlay(&mut self, v: Option<IpAddr>) {
        let octets = match v {
            None => [0u8; 16],
            Some(IpAddr::V4(v4)) => v4.to_ipv6_mapped().octets(),
            Some(IpAddr::V6(v6)) => v6.octets(),
        };
        self.buffer.as_mut()[field::UNDERLAY].copy_from_slice(&octets);
    }
    pub fn set_record_count(&mut self, v: u16) {
        self.buffer.as_mut()[field::COUNT].copy_from_slice(&v.to_le_bytes());
    }

    /// Compute the tag over the header and records with `key` and write it (the record count must
    /// be set first: it places the tag).
    pub fn sign(&mut self, key: &[u8]) -> Result<(), AuthError> {
        let mut mac = keyed_mac(key)?;
        mac.update(self.signed_bytes());
        let tag = mac.finalize().into_bytes();
        let start = field::RECORDS + self.record_count() as usize * RECORD_LEN;
        self.buffer.as_mut()[start..start + TAG_LEN].copy_from_slice(&tag);
        Ok(())
    }
}

/// The header fields a sender chooses for one datagram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Which pre-shared key signs it (0 when only one key is configured).
    pub key_id: u16,
    /// Which host.
    pub sender: u32,
    /// This datagram's number in its run: `epoch`, `epoch + 1`, ... (never 0).
    pub seq: u64,
    /// The first sequence number of the sender's run (`1 ..= seq`); a later run has a larger one.
    pub epoch: u64,
    /// The run of the edge the datagram is for (0 while the sender does not know it).
    pub edge_boot: u64,
    /// The sender's wall clock in ms since the Unix epoch (diagnostics only).
    pub timestamp_ms: u64,
    /// The address the sender sends from on the underlay (None: not given; a receiver then
    /// cannot tell its datagrams from relayed copies).
    pub underlay: Option<IpAddr>,
}

/// Seal `records` (at most [`MAX_RECORDS`], copied as they are: the caller emitted them with
/// [`crate::verdict::VerdictRepr::emit`]) into `out[..len]` under `header`, signed with `key`,
/// and return `len`.
pub fn seal(
    key: &[u8],
    header: &Header,
    records: &[[u8; RECORD_LEN]],
    out: &mut [u8],
) -> Result<usize, AuthError> {
    if key.is_empty() {
        return Err(AuthError::KeyEmpty);
    }
    if records.len() > MAX_RECORDS {
        return Err(AuthError::TooManyRecords(records.len()));
    }
    if header.seq == 0 || header.epoch == 0 || header.epoch > header.seq {
        return Err(AuthError::BadSequence);
    }
    let len = datagram_len(records.len());
    if out.len() < len {
        return Err(AuthError::BufferTooSmall {
            need: len,
            have: out.len(),
        });
    }
    let mut batch = SignedBatch::new_unchecked(&mut out[..len]);
    batch.set_magic(MAGIC);
    batch.set_version(VERSION);
    batch.set_flags(0);
    batch.set_key_id(header.key_id);
    batch.set_sender(header.sender);
    batch.set_seq(header.seq);
    batch.set_epoch(header.epoch);
    batch.set_edge_boot(header.edge_boot);
    batch.set_timestamp_ms(header.timestamp_ms);
    batch.set_underlay(header.underlay);
    // MAX_RECORDS (20) fits a u16.
    batch.set_record_count(records.len() as u16);
    for (slot, record) in out[field::RECORDS..field::RECORDS + records.len() * RECORD_LEN]
        .chunks_exact_mut(RECORD_LEN)
        .zip(records)
    {
        slot.copy_from_slice(record);
    }
    SignedBatch::new_unchecked(&mut out[..len]).sign(key)?;
    Ok(len)
}

/// An authenticated datagram: the tag verified. Not yet checked against replay (the receiver's
/// ordering, `edge::order`, decides whether its sequence number is new).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened<'a> {
    pub header: Header,
    records: &'a [u8],
}

impl<'a> Opened<'a> {
    /// Number of records.
    pub fn record_count(&self) -> usize {
        self.records.len() / RECORD_LEN
    }

    /// The raw records, in order; not validated (decode each with
    /// [`crate::verdict::VerdictRepr::from_bytes`]).
    pub fn records(&self) -> Records<'a> {
        Records {
            chunks: self.records.chunks_exact(RECORD_LEN),
        }
    }
}

/// Iterator over the raw records of an [`Opened`] datagram.
#[derive(Clone, Debug)]
pub struct Records<'a> {
    chunks: core::slice::ChunksExact<'a, u8>,
}

impl<'a> Iterator for Records<'a> {
    type Item = &'a [u8; RECORD_LEN];

    fn next(&mut self) -> Option<Self::Item> {
        // chunks_exact yields exactly RECORD_LEN bytes, so the conversion always succeeds.
        self.chunks.next().and_then(|c| c.try_into().ok())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.chunks.size_hint()
    }
}

impl ExactSizeIterator for Records<'_> {}

/// Check a datagram's structure and its tag under `key` (constant-time comparison); returns the
/// authenticated header and records. Replay is the caller's to check, after this succeeded.
/// The key id in the header is not looked at: one key for every sender (see [`open_with`]).
///
/// Order: length bounds, magic, version, flags, count against length, sequence, tag. Only the
/// cheap structural checks run before the MAC, and none of them depend on the key.
pub fn open<'a>(key: &[u8], datagram: &'a [u8]) -> Result<Opened<'a>, AuthError> {
    if key.is_empty() {
        return Err(AuthError::KeyEmpty);
    }
    open_with(datagram, |_, _| Some(key))
}

/// [`open`] with the key chosen by the datagram's claimed `(sender, key id)`: `key_of` returns
/// the key the receiver holds for that pair, or `None` ([`AuthError::UnknownKey`]). The claim is
/// unauthenticated when `key_of` sees it, but the tag covers both fields, so a datagram naming
/// another sender than its signer's fails the tag check under that sender's key.
pub fn open_with<'a, K: AsRef<[u8]>>(
    datagram: &'a [u8],
    key_of: impl FnOnce(u32, u16) -> Option<K>,
) -> Result<Opened<'a>, AuthError> {
    let len = datagram.len();
    if len < MIN_DATAGRAM {
        return Err(AuthError::Truncated { len });
    }
    if len > MAX_DATAGRAM {
        return Err(AuthError::Oversize { len });
    }
    let batch = SignedBatch::new_unchecked(datagram);
    if batch.magic() != MAGIC {
        return Err(AuthError::BadMagic);
    }
    if batch.version() != VERSION {
        return Err(AuthError::BadVersion(batch.version()));
    }
    if batch.flags() != 0 {
        return Err(AuthError::BadFlags(batch.flags()));
    }
    batch.check_len()?;
    if batch.seq() == 0 || batch.epoch() == 0 || batch.epoch() > batch.seq() {
        return Err(AuthError::BadSequence);
    }
    let key = key_of(batch.sender(), batch.key_id()).ok_or(AuthError::UnknownKey {
        sender: batch.sender(),
        key_id: batch.key_id(),
    })?;
    let mut mac = keyed_mac(key.as_ref())?;
    mac.update(batch.signed_bytes());
    mac.verify_slice(batch.tag())
        .map_err(|_| AuthError::BadTag)?;
    Ok(Opened {
        header: Header {
            key_id: batch.key_id(),
            sender: batch.sender(),
            seq: batch.seq(),
            epoch: batch.epoch(),
            edge_boot: batch.edge_boot(),
            timestamp_ms: batch.timestamp_ms(),
            underlay: batch.underlay(),
        },
        // check_len established: header, whole records, tag.
        records: &datagram[field::RECORDS..len - TAG_LEN],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::{v4, IpVersion, Protocol, Rule, VerdictRepr};

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn records(n: usize) -> [[u8; RECORD_LEN]; MAX_RECORDS] {
        let mut out = [[0u8; RECORD_LEN]; MAX_RECORDS];
        for (i, slot) in out.iter_mut().enumerate().take(n) {
            let rule = Rule::egress_to(IpVersion::V4, Protocol::Tcp, v4([10, 0, 0, i as u8]), 443);
            *slot = VerdictRepr::add(7, i as u64 + 1, 30_000, rule).to_bytes();
        }
        out
    }

    fn sealed(n: usize, seq: u64) -> ([u8; MAX_DATAGRAM], usize) {
        let recs = records(n);
        let mut buf = [0u8; MAX_DATAGRAM];
        let header = Header {
            sender: 42,
            seq,
            epoch: 3,
            edge_boot: 0xB007,
            timestamp_ms: 1_700_000_000_000,
            ..Header::default()
        };
        let len = seal(KEY, &header, &recs[..n], &mut buf).unwrap();
        (buf, len)
    }

    #[test]
    fn max_records_fits_1400() {
        assert_eq!(MAX_RECORDS, 20);
        assert!(datagram_len(MAX_RECORDS) <= MAX_DATAGRAM);
        assert!(datagram_len(MAX_RECORDS + 1) > MAX_DATAGRAM);
    }

    #[test]
    fn round_trip() {
        for n in [0, 1, 7, MAX_RECORDS] {
            let recs = records(n);
            let (buf, len) = sealed(n, 9);
            assert_eq!(len, datagram_len(n));
            let opened = open(KEY, &buf[..len]).unwrap();
            assert_eq!(opened.header.sender, 42);
            assert_eq!(opened.header.seq, 9);
            assert_eq!(opened.header.epoch, 3);
            assert_eq!(opened.header.edge_boot, 0xB007);
            assert_eq!(opened.header.key_id, 0);
            assert_eq!(opened.header.timestamp_ms, 1_700_000_000_000);
            assert_eq!(opened.record_count(), n);
            assert_eq!(opened.records().len(), n);
            for (got, want) in opened.records().zip(&recs[..n]) {
                assert_eq!(got, want);
                // The records decode as the verdicts that went in.
                assert_eq!(
                    VerdictRepr::from_bytes(got).unwrap(),
                    VerdictRepr::from_bytes(want).unwrap()
                );
            }
            let view = SignedBatch::new_checked(&buf[..len]).unwrap();
            assert_eq!(view.magic(), MAGIC);
            assert_eq!(view.record_count() as usize, n);
        }
    }

    #[test]
    fn open_with_takes_the_key_of_the_claimed_sender_and_key_id() {
        const KEY_B: &[u8] = b"fedcba9876543210fedcba9876543210";
        let keys = |sender: u32, key_id: u16| match (sender, key_id) {
            (42, 0) => Some(KEY),
            (43, 5) => Some(KEY_B),
            _ => None,
        };
        let (buf, len) = sealed(1, 9);
        assert_eq!(open_with(&buf[..len], keys).unwrap().header.sender, 42);
        // Sender 42's signer claims to be sender 43 (with 43's key id): 43's key does not match.
        let recs = records(1);
        let mut forged = [0u8; MAX_DATAGRAM];
        let header = Header {
            key_id: 5,
            sender: 43,
            seq: 9,
            epoch: 3,
            ..Header::default()
        };
        let len = seal(KEY, &header, &recs[..1], &mut forged).unwrap();
        assert_eq!(
            open_with(&forged[..len], keys).unwrap_err(),
            AuthError::BadTag
        );
        // Signed by 43 under a key id the receiver does not hold for it.
        let header = Header {
            key_id: 4,
            ..header
        };
        let len = seal(KEY_B, &header, &recs[..1], &mut forged).unwrap();
        assert_eq!(
            open_with(&forged[..len], keys).unwrap_err(),
            AuthError::UnknownKey {
                sender: 43,
                key_id: 4
            }
        );
        // The structure is checked before any key is asked for.
        let asked = core::cell::Cell::new(false);
        let short = open_with(&forged[..10], |_, _| {
            asked.set(true);
            Some(KEY)
        });
        assert_eq!(short.unwrap_err(), AuthError::Truncated { len: 10 });
        assert!(!asked.get());
    }

    #[test]
    fn key_id_is_carried_and_authenticated() {
        let recs = records(1);
        let mut buf = [0u8; MAX_DATAGRAM];
        let header = Header {
            key_id: 3,
            sender: 1,
            seq: 1,
            epoch: 1,
            ..Header::default()
        };
        let len = seal(KEY, &header, &recs[..1], &mut buf).unwrap();
        assert_eq!(open(KEY, &buf[..len]).unwrap().header.key_id, 3);
        SignedBatch::new_unchecked(&mut buf[..len]).set_key_id(4);
        assert_eq!(open(KEY, &buf[..len]), Err(AuthError::BadTag));
    }

    #[test]
    fn the_underlay_address_is_signed_and_read_back_as_given() {
        let mut buf = [0u8; MAX_DATAGRAM];
        let recs = records(1);
        for underlay in [
            None,
            Some(IpAddr::from([192, 0, 2, 7])),
            Some(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 9])),
        ] {
            let header = Header {
                sender: 9,
                seq: 1,
                epoch: 1,
                underlay,
                ..Header::default()
            };
            let len = seal(KEY, &header, &recs[..1], &mut buf).unwrap();
            assert_eq!(open(KEY, &buf[..len]).unwrap().header.underlay, underlay);
            // Another address written over it: the tag no longer matches.
            SignedBatch::new_unchecked(&mut buf[..len]).set_underlay(Some([10, 0, 0, 1].into()));
            assert_eq!(open(KEY, &buf[..len]), Err(AuthError::BadTag));
        }
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let (buf, len) = sealed(3, 5);
        for byte in 0..len {
            for bit in 0..8 {
                let mut bad = buf;
                bad[byte] ^= 1 << bit;
                let err = open(KEY, &bad[..len]).unwrap_err();
                // Fields that do not shape the datagram can only be caught by the tag.
                let structural = field::MAGIC.contains(&byte)
                    || byte == field::VERSION
                    || byte == field::FLAGS
                    || field::COUNT.contains(&byte)
                    || field::SEQ.contains(&byte)
                    || field::EPOCH.contains(&byte);
                if !structural {
                    assert_eq!(err, AuthError::BadTag, "byte {byte} bit {bit}");
                }
            }
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        let (buf, len) = sealed(MAX_RECORDS, 5);
        for cut in 0..len {
            let err = open(KEY, &buf[..cut]).unwrap_err();
            if cut < MIN_DATAGRAM {
                assert_eq!(err, AuthError::Truncated { len: cut });
            } else {
                assert!(matches!(err, AuthError::BadLength { .. }), "{cut}: {err}");
            }
            assert!(SignedBatch::new_checked(&buf[..cut]).is_err());
        }
        // Garbage of every length up to the maximum and beyond: an error, never a panic.
        let garbage = [0xA5u8; MAX_DATAGRAM + 10];
        for cut in 0..garbage.len() {
            assert!(open(KEY, &garbage[..cut]).is_err());
        }
        assert_eq!(
            open(KEY, &garbage),
            Err(AuthError::Oversize {
                len: MAX_DATAGRAM + 10
            })
        );
    }

    #[test]
    fn appended_bytes_are_rejected() {
        let (buf, len) = sealed(2, 5);
        assert!(matches!(
            open(KEY, &buf[..len + 1]),
            Err(AuthError::BadLength { count: 2, .. })
        ));
    }

    #[test]
    fn wrong_key_is_rejected() {
        let (buf, len) = sealed(4, 5);
        assert_eq!(
            open(b"another key of the same length!!", &buf[..len]),
            Err(AuthError::BadTag)
        );
        // A prefix of the key is a different key.
        assert_eq!(open(&KEY[..31], &buf[..len]), Err(AuthError::BadTag));
        assert_eq!(open(b"", &buf[..len]), Err(AuthError::KeyEmpty));
    }

    #[test]
    fn seal_errors() {
        let recs = [[0u8; RECORD_LEN]; MAX_RECORDS + 1];
        let mut buf = [0u8; 2 * MAX_DATAGRAM];
        let h = |seq, epoch| Header {
            sender: 1,
            seq,
            epoch,
            ..Header::default()
        };
        assert_eq!(
            seal(KEY, &h(1, 1), &recs, &mut buf),
            Err(AuthError::TooManyRecords(MAX_RECORDS + 1))
        );
        for (seq, epoch) in [(0, 0), (1, 0), (0, 1), (4, 5)] {
            assert_eq!(
                seal(KEY, &h(seq, epoch), &recs[..1], &mut buf),
                Err(AuthError::BadSequence)
            );
        }
        assert_eq!(
            seal(b"", &h(1, 1), &recs[..1], &mut buf),
            Err(AuthError::KeyEmpty)
        );
        assert_eq!(
            seal(KEY, &h(1, 1), &recs[..2], &mut buf[..100]),
            Err(AuthError::BufferTooSmall {
                need: datagram_len(2),
                have: 100
            })
        );
    }

    #[test]
    fn error_index_and_names_agree() {
        let all = [
            AuthError::Truncated { len: 0 },
            AuthError::Oversize { len: 0 },
            AuthError::BadMagic,
            AuthError::BadVersion(0),
            AuthError::BadFlags(0),
            AuthError::BadLength { count: 0, len: 0 },
            AuthError::BadSequence,
            AuthError::BadTag,
            AuthError::Replayed { sender: 0, seq: 0 },
            AuthError::TooOld {
                sender: 0,
                seq: 0,
                highest: 0,
            },
            AuthError::TooManySenders { sender: 0 },
            AuthError::BufferTooSmall { need: 0, have: 0 },
            AuthError::TooManyRecords(0),
            AuthError::KeyEmpty,
            AuthError::StaleEpoch {
                sender: 0,
                epoch: 0,
                current: 0,
            },
            AuthError::OtherEdge {
                sender: 0,
                edge_boot: 0,
            },
            AuthError::TooFarAhead {
                sender: 0,
                seq: 0,
                next: 0,
            },
            AuthError::UnknownKey {
                sender: 0,
                key_id: 0,
            },
            AuthError::Relayed { sender: 0 },
        ];
        assert_eq!(all.len(), AuthError::COUNT);
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.index(), i);
            assert_eq!(AuthError::name_of_index(i), Some(e.name()));
        }
        assert_eq!(AuthError::name_of_index(AuthError::COUNT), None);
    }
}
