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
//! | 36 | 32 | HMAC-SHA256 tag over bytes `0 .. 36` |
//!
//! The magic differs from the verdict datagram's inside the signed bytes, so neither can be taken
//! for the other. An ack is cumulative, so a replayed or reordered one tells the host nothing it
//! did not know (it never moves the host's window backwards).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::{AuthError, TAG_LEN};

/// `"VGA1"`: Vigil acknowledgement.
pub const ACK_MAGIC: [u8; 4] = *b"VGA1";
/// Version of the layout above.
pub const ACK_VERSION: u8 = 1;
/// Bytes before the tag.
const SIGNED_LEN: usize = 36;
/// Length of every ack.
pub const ACK_LEN: usize = SIGNED_LEN + TAG_LEN;

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
    let mut out = [0u8; ACK_LEN];
    out[0..4].copy_from_slice(&ACK_MAGIC);
    out[4] = ACK_VERSION;
    out[6..8].copy_from_slice(&ack.key_id.to_le_bytes());
    out[8..12].copy_from_slice(&ack.sender.to_le_bytes());
    out[12..20].copy_from_slice(&ack.epoch.to_le_bytes());
    out[20..28].copy_from_slice(&ack.next.to_le_bytes());
    out[28..36].copy_from_slice(&ack.edge_boot.to_le_bytes());
    let mut m = mac(key)?;
    m.update(&out[..SIGNED_LEN]);
    out[SIGNED_LEN..].copy_from_slice(&m.finalize().into_bytes());
    Ok(out)
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
    Ok(Ack {
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
        }
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
