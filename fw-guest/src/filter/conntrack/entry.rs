//! One flow's entry: its 32-byte hash slot, and what the pools beside the table hold for the flows
//! that need more (a TCP flow's windows, an IPv6 flow's addresses).
//!
//! Owns: the layout of an entry, the read view that puts its parts together ([`Flow`]), and the
//! pools' free lists.
//! Must not: allocate, or hand out a pool entry that another flow holds.

use super::*;

/// One hash slot. `kind == 0` marks an empty slot; an all-zero slot is empty, so zeroed memory is
/// an empty table.
///
/// 32 bytes, two to a cache line: the key (an IPv4 flow's addresses inline, an IPv6 flow's in the
/// address pool), expiry, verdict and state. 64k flows at the 7/8 load limit take 74 899 slots ×
/// 32 B = 2.29 MiB. The verdict slot index is 16 bits (a verdict table has at most 65 535 slots,
/// [`MAX_VERDICT_SLOTS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSlot {
    pub(super) tenant: u32,
    pub(super) local_port: u16,
    pub(super) remote_port: u16,
    /// Whole seconds of the caller's clock; the entry is live while `now < expires`.
    pub(super) expires: u32,
    pub(super) verdict_slot: u16,
    pub(super) verdict_gen: u16,
    /// IPv4: the tenant-side address, then the peer's. IPv6: the index of the flow's
    /// [`V6Addrs`] (little endian), then a fold of both addresses that lets a probe pass over
    /// most other IPv6 entries without reading the pool.
    pub(super) addrs: [u8; 8],
    /// 1 + the index of the flow's [`TcpExt`]; 0: none (not TCP).
    pub(super) tcp: u32,
    /// IP version and protocol (see `flow::kind_byte`); 0 = empty slot.
    pub(super) kind: u8,
    /// TCP state in the low 3 bits, [`F_PROXIED`], direction and FIN flags in the high nibble.
    pub(super) state: u8,
    pub(super) _pad: [u8; 2],
}

/// A TCP flow's sequence-tracking state, in the TCP pool (32 bytes: two to a cache line).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpExt {
    /// TCP windows: `[opener's side, responder's side]`.
    pub(super) win: [TcpWindow; 2],
    /// While half-open: the age stamp (low 16 bits of the table's half-open insertion counter;
    /// the oldest half-open entry is the one evicted first). Once a proxied flow is established:
    /// the responder's sequence offset (its ISN minus the cookie the opener was given). In a free
    /// entry: the pool's free-list link.
    pub(super) aux: u32,
    /// Window scale shifts: opener's in the low nibble, responder's in the high one;
    /// [`SCALE_NONE`] until the handshake shows both sides sent the option.
    pub(super) wscale: u8,
    pub(super) _pad: [u8; 3],
}

/// An IPv6 flow's addresses, in the address pool (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V6Addrs {
    /// The tenant-side address; in a free entry, its first 4 bytes are the free-list link.
    pub(super) local: [u8; 16],
    pub(super) remote: [u8; 16],
}

/// Most verdict slots a flow can point at (the slot index is 16 bits in a [`FlowSlot`]).
pub const MAX_VERDICT_SLOTS: usize = u16::MAX as usize;

/// A side's scale nibble before the SYN-ACK settles it (the side sent no option, or not yet).
pub(super) const SCALE_NONE: u8 = 0xf;

const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<FlowSlot>() == 32);
    // The pools are carved from the same memory as the slots (`Conntrack::new_empty`).
    assert!(size_of::<TcpExt>() == size_of::<FlowSlot>());
    assert!(size_of::<V6Addrs>() == size_of::<FlowSlot>());
    assert!(align_of::<TcpExt>() <= align_of::<FlowSlot>());
    assert!(align_of::<V6Addrs>() <= align_of::<FlowSlot>());
};

impl FlowSlot {
    pub const EMPTY: FlowSlot = FlowSlot {
        tenant: 0,
        local_port: 0,
        remote_port: 0,
        expires: 0,
        verdict_slot: 0,
        verdict_gen: 0,
        addrs: [0; 8],
        tcp: 0,
        kind: 0,
        state: 0,
        _pad: [0; 2],
    };

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.kind == 0
    }

    #[inline]
    pub(super) fn is_live(&self, now_s: u32) -> bool {
        now_s < self.expires
    }

    #[inline]
    pub(super) fn is_v6(&self) -> bool {
        self.kind & KIND_V6 != 0
    }

    /// The index of an IPv6 flow's addresses in the pool.
    #[inline]
    pub(super) fn v6_index(&self) -> usize {
        u32::from_le_bytes([self.addrs[0], self.addrs[1], self.addrs[2], self.addrs[3]]) as usize
    }

    pub fn origin(&self) -> Direction {
        if self.state & F_ORIGIN_INGRESS != 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        }
    }

    pub fn tcp_state(&self) -> TcpState {
        TcpState::from_bits(self.state)
    }

    /// The raw state byte (TCP state and direction/FIN flags) for [`tcp_step`].
    #[inline]
    pub fn state_byte(&self) -> u8 {
        self.state
    }

    pub fn replied(&self) -> bool {
        self.state & F_REPLIED != 0
    }

    pub fn expires(&self) -> u32 {
        self.expires
    }

    pub fn tenant(&self) -> u32 {
        self.tenant
    }

    pub fn verdict(&self) -> VerdictRef {
        VerdictRef {
            slot: u32::from(self.verdict_slot),
            gen: self.verdict_gen,
        }
    }

    /// Whether the edge's SYN proxy completed this flow's handshake (its responder's sequence
    /// numbers are translated).
    #[inline]
    pub fn is_proxied(&self) -> bool {
        self.state & F_PROXIED != 0
    }

    /// Whether this is a half-open TCP entry (SYN seen, handshake not complete; or adopted, its
    /// other side not yet seen).
    #[inline]
    pub fn is_half_open(&self) -> bool {
        half_open(self.kind, self.state)
    }
}

impl TcpExt {
    pub const EMPTY: TcpExt = TcpExt {
        win: [TcpWindow {
            end: 0,
            maxend: 0,
            maxwin: 0,
        }; 2],
        aux: 0,
        wscale: 0,
        _pad: [0; 3],
    };
}

/// What a flow that is not TCP reads as its windows: none seen.
pub(super) static NO_TCP: TcpExt = TcpExt::EMPTY;

/// A read view of one entry: its slot (whose accessors it shares), and what the pools hold for it.
#[derive(Clone, Copy, Debug)]
pub struct Flow<'t> {
    pub(super) slot: &'t FlowSlot,
    pub(super) tcp: &'t TcpExt,
    pub(super) v6: Option<&'t V6Addrs>,
}

impl core::ops::Deref for Flow<'_> {
    type Target = FlowSlot;

    fn deref(&self) -> &FlowSlot {
        self.slot
    }
}

impl Flow<'_> {
    /// The tenant-side and peer addresses (IPv4 in the first 4 bytes, rest zero).
    fn addresses(&self) -> ([u8; 16], [u8; 16]) {
        addresses_of(self.slot, self.v6)
    }

    /// The key this entry holds (`None` for an empty slot).
    pub fn key(&self) -> Option<FlowKey> {
        let (ip_version, protocol) = kind_parts(self.slot.kind)?;
        let (local, remote) = self.addresses();
        Some(FlowKey {
            tenant: self.slot.tenant,
            ip_version,
            protocol,
            local,
            remote,
            local_port: self.slot.local_port,
            remote_port: self.slot.remote_port,
        })
    }

    /// The tenant-side address and port (the destination of a proxied SYN).
    pub fn local(&self) -> ([u8; 16], u16) {
        (self.addresses().0, self.slot.local_port)
    }

    /// The TCP window of the opener's (`orig`) or the responder's side (see [`TcpExt::window`]).
    pub fn window(&self, orig: bool) -> TcpWindow {
        self.tcp.window(orig)
    }

    /// See [`TcpExt::in_flight`].
    pub fn in_flight(&self, orig: bool, seq: u32) -> bool {
        self.tcp.in_flight(orig, seq)
    }

    /// The window-scale nibbles (the opener's in the low one; 0xf: not offered).
    pub fn wscale_nibbles(&self) -> u8 {
        self.tcp.wscale
    }

    /// The proxied flow's sequence offset: the responder's ISN minus the cookie ISN the opener
    /// saw (0 until the responder's SYN-ACK, and for flows that are not proxied).
    #[inline]
    pub fn seq_offset(&self) -> u32 {
        if self.slot.is_proxied() && !self.slot.is_half_open() {
            self.tcp.aux
        } else {
            0
        }
    }
}

/// A slot's addresses, with its pool entry when it is IPv6 (zeros if that entry is missing, which
/// the pools' sizing rules out).
pub(super) fn addresses_of(s: &FlowSlot, v6: Option<&V6Addrs>) -> ([u8; 16], [u8; 16]) {
    if s.is_v6() {
        v6.map_or(([0; 16], [0; 16]), |p| (p.local, p.remote))
    } else {
        let mut local = [0; 16];
        let mut remote = [0; 16];
        local[..4].copy_from_slice(&s.addrs[..4]);
        remote[..4].copy_from_slice(&s.addrs[4..]);
        (local, remote)
    }
}

/// What a slot's `addrs` hold for `key`: an IPv4 key's addresses; for IPv6, the fold of both in
/// the last 4 bytes (the first 4, the pool index, are the slot's own).
#[inline(always)]
pub(super) fn packed_addrs(key: &FlowKey, kind: u8) -> [u8; 8] {
    if kind & KIND_V6 == 0 {
        let mut out = [0; 8];
        out[..4].copy_from_slice(&key.local[..4]);
        out[4..].copy_from_slice(&key.remote[..4]);
        out
    } else {
        v6_fold(key)
    }
}

/// [`packed_addrs`] of an IPv6 key, out of line so the IPv4 lookup stays small enough to inline.
#[inline(never)]
fn v6_fold(key: &FlowKey) -> [u8; 8] {
    let fold = key
        .local
        .chunks_exact(4)
        .chain(key.remote.chunks_exact(4))
        .enumerate()
        .fold(0u32, |acc, (i, w)| {
            acc.rotate_left(5) ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]) ^ i as u32
        });
    let mut out = [0; 8];
    out[4..].copy_from_slice(&fold.to_le_bytes());
    out
}

/// An entry of a pool that keeps its free list in its free entries.
pub(super) trait Pooled: Copy {
    fn link(&self) -> u32;
    fn set_link(&mut self, link: u32);
}

impl Pooled for TcpExt {
    fn link(&self) -> u32 {
        self.aux
    }
    fn set_link(&mut self, link: u32) {
        self.aux = link;
    }
}

impl Pooled for V6Addrs {
    fn link(&self) -> u32 {
        u32::from_le_bytes([self.local[0], self.local[1], self.local[2], self.local[3]])
    }
    fn set_link(&mut self, link: u32) {
        self.local[..4].copy_from_slice(&link.to_le_bytes());
    }
}

/// Entries handed out from the front, freed ones reused first (last freed, first reused): the
/// entries in use stay packed at the front, so the pages touched follow the most flows of the
/// pool's kind that were live at once, never the table's size.
pub(super) struct Pool<'a, T: Pooled> {
    entries: &'a mut [T],
    /// 1 + the first free entry (its link names the next); 0: none.
    free: u32,
    /// Entries before this one have been handed out at least once.
    pub(super) fresh: u32,
}

impl<'a, T: Pooled> Pool<'a, T> {
    pub(super) fn new(entries: &'a mut [T]) -> Self {
        Pool {
            entries,
            free: 0,
            fresh: 0,
        }
    }

    /// Take an entry, written with `init`. `None` only if every entry is in use, which the
    /// pools' sizing rules out (a pool is as long as the table).
    pub(super) fn alloc(&mut self, init: T) -> Option<u32> {
        let i = if self.free != 0 {
            let i = self.free - 1;
            self.free = self.entries.get(i as usize)?.link();
            i
        } else if (self.fresh as usize) < self.entries.len() {
            self.fresh += 1;
            self.fresh - 1
        } else {
            return None;
        };
        self.entries[i as usize] = init;
        Some(i)
    }

    pub(super) fn release(&mut self, i: usize) {
        if let Some(e) = self.entries.get_mut(i) {
            e.set_link(self.free);
            self.free = i as u32 + 1;
        }
    }

    /// Entries handed out and not freed (walks the free list: tests).
    #[cfg(test)]
    pub(super) fn in_use(&self) -> usize {
        let mut free = 0;
        let mut at = self.free;
        while at != 0 && free <= self.entries.len() {
            free += 1;
            at = self.entries[at as usize - 1].link();
        }
        self.fresh as usize - free
    }

    pub(super) fn get(&self, i: usize) -> Option<&T> {
        self.entries.get(i)
    }

    pub(super) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.entries.get_mut(i)
    }
}
