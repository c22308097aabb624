//! Acknowledgements of verdict datagrams ([`crate::auth`]): how an edge tells a host which of its
//! datagrams it has applied, so that the host retransmits the others.
//!
//! Owns: the ack format, sealing and opening it (HMAC-SHA256 with the channel's pre-shared key).
//! Must not: allocate, touch the network, or decide what to retransmit (`edge::link` does).
//!
//! Layout (little endian, like [`crate::auth`]'s datagrams):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic [`ACK_MAGIC`] = `"VGA1"` |
//! | 4 | 1 | format version [`ACK_VERSION`] |
//! | 5 | 1 | flags, reserved, must be 0 |
//! | 6 | 2 | key id |
//! | 8 | 4 | sender id: whose datagrams are acknowledged |
//! | 12 | 8 | epoch: which run of the sender |
//! | 20 | 8 | next: every sequence number of that run below it was applied (cumulative); 0 = the edge follows no run of this sender with this epoch (it restarted, or the datagram was for another run of it) |
//! | 28 | 8 | the edge's boot id (never 0): which run of the edge speaks |
//! | 36 | 4 | room: how many more `Add`/`Adopt` records of this sender, sent from `next` on, the edge's tables take for certain (its share of the room; 0 = none certain, wait for this ack's refusals) |
//! | 40 | 1 | refusal entries that follow (at most [`MAX_REFUSALS`]) |
//! | 41 | 3 | reserved, must be 0 |
//! | 44 | 16 × [`MAX_REFUSALS`] | refusal entries, unused ones all zero: datagram sequence number (8), bitmap of its refused records by index (4), the first refusal's reason (1, an [`crate::outcome::Outcome`] code), reserved (3, zero) |
//! | 172 | 32 | HMAC-SHA256 tag over bytes `0 .. 172` |
//!
//! The magic differs from the verdict datagram's inside the signed bytes, so neither can be taken
//! for the other. An ack is cumulative, so a replayed or reordered one tells the host nothing it
//! did not know (it never moves the host's window backwards). The refusal entries are the edge's
//! most recent ones for this run (every ack repeats them), so a lost ack does not lose them
//! unless more than [`MAX_REFUSALS`] refused datagrams follow before the next ack arrives.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::{AuthError, TAG_LEN};

/// `"VGA1"`: Vigil acknowledgement.
pub const ACK_MAGIC: [u8; 4] = *b"VGA1";
/// Version of the layout above (2: room and refusals).
pub const ACK_VERSION: u8 = 2;
/// Refusal entries an ack carries.
pub const MAX_REFUSALS: usize = 8;
const REFUSALS_AT: usize = 44;
const REFUSAL_LEN: usize = 16;
/// Bytes before the tag.
const SIGNED_LEN: usize = REFUSALS_AT + MAX_REFUSALS * REFUSAL_LEN;
/// Length of every ack.
pub const ACK_LEN: usize = SIGNED_LEN + TAG_LEN;

/// Records of one datagram the edge did not apply (its tables refused them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refusal {
    /// The datagram's sequence number (in the ack's run).
    pub seq: u64,
    /// Bit `i`: the datagram's record `i` was refused (a datagram holds at most
    /// [`crate::auth::MAX_RECORDS`] < 32 records). Never 0 in a sealed ack.
    pub records: u32,
    /// Why the first of them was refused: an [`crate::outcome::Outcome`] code.
    pub reason: u8,
}

/// What an ack says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ack {
    pub key_id: u16,
    /// Whose run is acknowledged.
    pub sender: u32,
    pub epoch: u64,
    /// Every sequence number of the run below `next` was applied; 0: the edge follows no such run.
    pub next: u64,
    /// Which run of the edge speaks (never 0).
    pub edge_boot: u64,
    /// `Add`/`Adopt` records the sender may send from `next` on that the edge takes for certain.
    pub room: u32,
    /// The edge's most recent refusals in this run: entries `..refusal_count`.
    pub refusals: [Refusal; MAX_REFUSALS],
    pub refusal_count: u8,
}

impl Ack {
    /// The refusal entries it carries.
    pub fn refusals(&self) -> &[Refusal] {
        &self.refusals[..usize::from(self.refusal_count).min(MAX_REFUSALS)]
    }
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn mac(key: &[u8]) -> Result<Hmac<Sha256>, AuthError> {
    if key.is_empty() {
        return Err(AuthError::KeyEmpty);
    }
    Hmac::<Sha256>::new_from_slice(key).map_err(|_| AuthError::KeyEmpty)
}

/// Seals `ack` under `key`.
pub fn seal_ack(key: &[u8], ack: &Ack) -> Result<[u8; ACK_LEN], AuthError> {
    if ack.edge_boot == 0 {
        return Err(AuthError::BadSequence);
    }
    if usize::from(ack.refusal_count) > MAX_REFUSALS
        || ack.refusals().iter().any(|r| r.records == 0 || r.seq == 0)
    {
        return Err(AuthError::BadLength {
            count: u16::from(ack.refusal_count),
            len: ACK_LEN,
        });
    }
    let mut out = [0u8; ACK_LEN];
    out[0..4].copy_from_slice(&ACK_MAGIC);
    out[4] = ACK_VERSION;
    out[6..8].copy_from_slice(&ack.key_id.to_le_bytes());
    out[8..12].copy_from_slice(&ack.sender.to_le_bytes());
    out[12..20].copy_from_slice(&ack.epoch.to_le_bytes());
    out[20..28].copy_from_slice(&ack.next.to_le_bytes());
    out[28..36].copy_from_slice(&ack.edge_boot.to_le_bytes());
    out[36..40].copy_from_slice(&ack.room.to_le_bytes());
    out[40] = ack.refusal_count;
    for (i, r) in ack.refusals().iter().enumerate() {
        let at = REFUSALS_AT + i * REFUSAL_LEN;
        out[at..at + 8].copy_from_slice(&r.seq.to_le_bytes());
        out[at + 8..at + 12].copy_from_slice(&r.records.to_le_bytes());
        out[at + 12] = r.reason;
    }
    let mut m = mac(key)?;
    m.update(&out[..SIGNED_LEN]);
    out[SIGNED_LEN..].copy_from_slice(&m.finalize().into_bytes());
    Ok(out)
}

/// The key id an ack claims to be sealed with (unauthenticated: it only picks the key to check
/// it with; [`open_ack`] then checks the tag, which covers it).
pub fn claimed_key_id(bytes: &[u8]) -> Option<u16> {
    bytes.get(6..8).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

/// Checks an ack's length, header and tag (constant-time) under `key`.
pub fn open_ack(key: &[u8], bytes: &[u8]) -> Result<Ack, AuthError> {
    if key.is_empty() {
        return Err(AuthError::KeyEmpty);
    }
    if bytes.len() < ACK_LEN {
        return Err(AuthError::Truncated { len: bytes.len() });
    }
    if bytes.len() > ACK_LEN {
        return Err(AuthError::Oversize { len: bytes.len() });
    }
    if bytes[0..4] != ACK_MAGIC {
        return Err(AuthError::BadMagic);
    }
    if bytes[4] != ACK_VERSION {
        return Err(AuthError::BadVersion(bytes[4]));
    }
    if bytes[5] != 0 {
        return Err(AuthError::BadFlags(bytes[5]));
    }
    let mut m = mac(key)?;
    m.update(&bytes[..SIGNED_LEN]);
    m.verify_slice(&bytes[SIGNED_LEN..])
        .map_err(|_| AuthError::BadTag)?;
    let edge_boot = le_u64(&bytes[28..36]);
    if edge_boot == 0 {
        return Err(AuthError::BadSequence);
    }
    // Authentic, so these are the edge's own words; still checked, so a buggy edge cannot make
    // the host read past its entries or take a zero for a refusal.
    let refusal_count = bytes[40];
    if usize::from(refusal_count) > MAX_REFUSALS || bytes[41..44] != [0; 3] {
        return Err(AuthError::BadLength {
            count: u16::from(refusal_count),
            len: bytes.len(),
        });
    }
    let mut refusals = [Refusal::default(); MAX_REFUSALS];
    for (i, r) in refusals
        .iter_mut()
        .enumerate()
        .take(usize::from(refusal_count))
    {
        let at = REFUSALS_AT + i * REFUSAL_LEN;
        *r = Refusal {
            seq: le_u64(&bytes[at..at + 8]),
            records: u32::from_le_bytes([
                bytes[at + 8],
                bytes[at + 9],
                bytes[at + 10],
                bytes[at + 11],
            ]),
            reason: bytes[at + 12],
        };
        if r.records == 0 || r.seq == 0 {
            return Err(AuthError::BadLength {
                count: u16::from(refusal_count),
                len: bytes.len(),
            });
        }
    }
    Ok(Ack {
        room: u32::from_le_bytes([bytes[36], bytes[37], bytes[38], bytes[39]]),
        refusals,
        refusal_count,
        key_id: u16::from_le_bytes([bytes[6], bytes[7]]),
        sender: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        epoch: le_u64(&bytes[12..20]),
        next: le_u64(&bytes[20..28]),
        edge_boot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn ack() -> Ack {
        Ack {
            key_id: 2,
            sender: 7,
            epoch: 1_000,
            next: 1_005,
            edge_boot: 0xfeed,
            room: 300,
            refusals: {
                let mut r = [Refusal::default(); MAX_REFUSALS];
                r[0] = Refusal {
                    seq: 1_003,
                    records: 0b101,
                    reason: 17,
                };
                r[1] = Refusal {
                    seq: 1_004,
                    records: 1 << 19,
                    reason: 18,
                };
                r
            },
            refusal_count: 2,
        }
    }

    #[test]
    fn refusals_round_trip_and_bad_entries_are_refused() {
        let bytes = seal_ack(KEY, &ack()).unwrap();
        let opened = open_ack(KEY, &bytes).unwrap();
        assert_eq!(opened.refusals().len(), 2);
        assert_eq!(opened.refusals()[1].records, 1 << 19);
        assert_eq!(opened.room, 300);
        let mut empty_entry = ack();
        empty_entry.refusals[1].records = 0;
        assert!(seal_ack(KEY, &empty_entry).is_err());
        let mut too_many = ack();
        too_many.refusal_count = MAX_REFUSALS as u8 + 1;
        assert!(seal_ack(KEY, &too_many).is_err());
    }

    #[test]
    fn round_trip() {
        let bytes = seal_ack(KEY, &ack()).unwrap();
        assert_eq!(open_ack(KEY, &bytes), Ok(ack()));
    }

    #[test]
    fn every_flipped_bit_and_cut_is_rejected() {
        let bytes = seal_ack(KEY, &ack()).unwrap();
        for byte in 0..ACK_LEN {
            for bit in 0..8 {
                let mut bad = bytes;
                bad[byte] ^= 1 << bit;
                assert!(open_ack(KEY, &bad).is_err(), "byte {byte} bit {bit}");
            }
        }
        for cut in 0..ACK_LEN {
            assert_eq!(
                open_ack(KEY, &bytes[..cut]),
                Err(AuthError::Truncated { len: cut })
            );
        }
        let mut long = [0u8; ACK_LEN + 1];
        long[..ACK_LEN].copy_from_slice(&bytes);
        assert!(matches!(
            open_ack(KEY, &long),
            Err(AuthError::Oversize { .. })
        ));
        assert_eq!(
            open_ack(b"another key of the same length!!", &bytes),
            Err(AuthError::BadTag)
        );
    }

    #[test]
    fn a_verdict_datagram_is_not_an_ack() {
        use crate::auth::{seal, Header, MAX_DATAGRAM};
        let mut buf = [0u8; MAX_DATAGRAM];
        let header = Header {
            sender: 7,
            seq: 1,
            epoch: 1,
            ..Header::default()
        };
        let len = seal(KEY, &header, &[], &mut buf).unwrap();
        assert!(open_ack(KEY, &buf[..len]).is_err());
        assert!(crate::auth::open(KEY, &seal_ack(KEY, &ack()).unwrap()).is_err());
        assert_eq!(
            seal_ack(
                KEY,
                &Ack {
                    edge_boot: 0,
                    ..ack()
                }
            ),
            Err(AuthError::BadSequence)
        );
    }
}
