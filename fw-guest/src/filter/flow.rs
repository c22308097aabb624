//! Flow keys and their keyed hash.
//!
//! A flow is always keyed from the tenant's side: `local` is the tenant's address and port,
//! `remote` the peer's, whichever way the packet travels. Both directions of a connection thus
//! share one key and one conntrack entry, which records which side opened it.

use vigil_wire::verdict::{Direction, IpVersion, Protocol};

/// Identity of a flow, seen from the tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub tenant: u32,
    pub ip_version: IpVersion,
    pub protocol: Protocol,
    /// Tenant-side address; IPv4 in the first 4 bytes, rest zero (the verdict encoding).
    pub local: [u8; 16],
    pub remote: [u8; 16],
    /// For ICMP: the echo identifier.
    pub local_port: u16,
    /// For ICMP: 0.
    pub remote_port: u16,
}

impl FlowKey {
    /// Key of a packet travelling in `dir` from `src` to `dst`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn from_packet(
        tenant: u32,
        dir: Direction,
        ip_version: IpVersion,
        protocol: Protocol,
        src: [u8; 16],
        dst: [u8; 16],
        src_port: u16,
        dst_port: u16,
    ) -> FlowKey {
        let (local, remote, local_port, remote_port) = match dir {
            Direction::Egress => (src, dst, src_port, dst_port),
            Direction::Ingress => (dst, src, dst_port, src_port),
        };
        FlowKey {
            tenant,
            ip_version,
            protocol,
            local,
            remote,
            local_port,
            remote_port,
        }
    }

    /// One byte naming IP version and protocol; never 0 (0 marks an empty table slot).
    #[inline]
    pub fn kind(&self) -> u8 {
        kind_byte(self.ip_version, self.protocol)
    }
}

/// The bit of a kind byte that marks IPv6 ([`kind_byte`]).
pub const KIND_V6: u8 = 0x80;

/// IP version in bit 7, IANA protocol number (all < 128) in the low bits.
#[inline]
pub const fn kind_byte(ip: IpVersion, proto: Protocol) -> u8 {
    let v6 = match ip {
        IpVersion::V4 => 0,
        IpVersion::V6 => KIND_V6,
    };
    v6 | proto as u8
}

/// Inverse of [`kind_byte`].
pub const fn kind_parts(kind: u8) -> Option<(IpVersion, Protocol)> {
    let ip = if kind & KIND_V6 != 0 {
        IpVersion::V6
    } else {
        IpVersion::V4
    };
    match Protocol::from_u8(kind & 0x7f) {
        Some(p) => Some((ip, p)),
        None => None,
    }
}

/// Folded 64×64→128 multiply: the mixing step of wyhash-style hashes.
#[inline(always)]
fn mix(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

// Odd constants with well-spread bits (the 64-bit golden ratio and wyhash's primes).
const K0: u64 = 0x9e37_79b9_7f4a_7c15;
const K1: u64 = 0xa076_1d64_78bd_642f;
const K2: u64 = 0xe703_7ed1_a0b4_28db;
const K3: u64 = 0x8ebc_6af0_9c88_c6e3;

#[inline(always)]
fn word(b: &[u8; 16], half: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[half * 8..half * 8 + 8]);
    u64::from_le_bytes(w)
}

/// Keyed hash of the address/port/tenant fields. The seed comes from the boot information so a
/// remote attacker cannot aim many flows at one probe cluster (not a cryptographic MAC: the
/// tables also bound their probe work).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn hash_fields(
    seed: u64,
    tenant: u32,
    kind: u8,
    a: &[u8; 16],
    b: &[u8; 16],
    pa: u16,
    pb: u16,
    tag: u8,
) -> u32 {
    let small = u64::from(tenant) | (u64::from(pa) << 32) | (u64::from(pb) << 48);
    let small2 = u64::from(kind) | (u64::from(tag) << 8);
    let h = mix(word(a, 0) ^ seed ^ K0, word(a, 1) ^ K1)
        ^ mix(word(b, 0) ^ K2, word(b, 1) ^ seed.rotate_left(29) ^ K3)
        ^ mix(small ^ K1, small2 ^ seed ^ K2);
    let h = mix(h ^ K3, K0);
    (h ^ (h >> 32)) as u32
}

impl FlowKey {
    #[inline]
    pub fn hash(&self, seed: u64) -> u32 {
        hash_fields(
            seed,
            self.tenant,
            self.kind(),
            &self.local,
            &self.remote,
            self.local_port,
            self.remote_port,
            0,
        )
    }
}

/// Map a 32-bit hash onto `0..n` without division (Lemire's multiply-shift reduction), so table
/// sizes need not be powers of two.
#[inline(always)]
pub fn reduce(hash: u32, n: usize) -> usize {
    ((u64::from(hash) * n as u64) >> 32) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_directions_share_a_key() {
        let a = vigil_wire::verdict::v4([10, 0, 0, 2]);
        let b = vigil_wire::verdict::v4([10, 0, 0, 5]);
        let out = FlowKey::from_packet(
            1,
            Direction::Egress,
            IpVersion::V4,
            Protocol::Tcp,
            a,
            b,
            40000,
            443,
        );
        let back = FlowKey::from_packet(
            1,
            Direction::Ingress,
            IpVersion::V4,
            Protocol::Tcp,
            b,
            a,
            443,
            40000,
        );
        assert_eq!(out, back);
        assert_eq!(out.hash(7), back.hash(7));
        assert_ne!(out.hash(7), out.hash(8), "seed must change the hash");
    }

    #[test]
    fn kind_roundtrip() {
        for ip in [IpVersion::V4, IpVersion::V6] {
            for p in [
                Protocol::Tcp,
                Protocol::Udp,
                Protocol::Icmp,
                Protocol::Icmpv6,
            ] {
                let k = kind_byte(ip, p);
                assert_ne!(k, 0);
                assert_eq!(kind_parts(k), Some((ip, p)));
            }
        }
    }

    #[test]
    fn reduce_in_range() {
        for n in [1usize, 7, 1000, 74899] {
            for h in [0u32, 1, u32::MAX / 2, u32::MAX] {
                assert!(reduce(h, n) < n);
            }
        }
    }
}
