//! A descriptor chain's buffers as host memory: the fixed list the virtio-net data paths copy
//! frames through (one copy, no allocation per frame).
//!
//! Owns: [`Segments`]: building it from a chain (checked against the guest's memory, marked
//! dirty for migration where the device writes), copies in and out of it.
//! Must not: hold an address outside the guest's memory, or copy past a segment.

use std::mem::MaybeUninit;

use crate::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::guest_queue::{raw_access, Avail};
use crate::write_trap::DeviceWrites;

/// Most descriptors a chain may have here (longer ones are malformed for this device).
const MAX_SEGMENTS: usize = 64;

/// A chain's buffers as host addresses, all inside the guest's memory.
pub(super) struct Segments {
    /// The first `count` are set; the rest are never read (not zeroed: a frame's two lists
    /// would cost a 1 KiB memset each).
    at: [MaybeUninit<(*mut u8, usize)>; MAX_SEGMENTS],
    count: usize,
    /// Bytes in all segments.
    pub(super) total: usize,
}

impl Segments {
    /// Segment `i` (host address, length); `i < count` (as an index into a full array would
    /// be, this panics otherwise).
    #[inline]
    fn seg(&self, i: usize) -> (*mut u8, usize) {
        assert!(i < self.count, "segment {i} of {}", self.count);
        // SAFETY: the first `count` entries are written before `count` counts them.
        unsafe { self.at[i].assume_init() }
    }

    /// An empty list, to be filled in place ([`Segments::fill`], [`Segments::fill_chain`]):
    /// the list is 1 KiB, and returning a filled one by value copied all of it on every frame
    /// (a quarter of the in-process link's harness time, `perf`).
    pub(super) fn new() -> Segments {
        // An inline const: `[MaybeUninit::uninit(); N]` (a value repeated) compiled to a 1 KiB
        // memset of zeros here, on every frame.
        Segments {
            at: [const { MaybeUninit::uninit() }; MAX_SEGMENTS],
            count: 0,
            total: 0,
        }
    }

    /// Adds the buffer `len` bytes at `addr`; false when it lies outside guest memory, the list
    /// is full or the total overflows.
    #[inline]
    fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        write: bool,
        writes: &DeviceWrites,
    ) -> bool {
        if len == 0 {
            return true;
        }
        if write && !writes.allows(addr.0, len) {
            return false;
        }
        let Ok(slice) = mem.get_slice(addr, len) else {
            return false;
        };
        // What the device may write is marked dirty (the whole buffer, conservatively).
        self.push_host(raw_access(slice, write), len)
    }

    /// Adds `len` bytes at host address `at`, inside guest memory (checked by the caller);
    /// false when the list is full or the total overflows.
    #[inline]
    fn push_host(&mut self, at: *mut u8, len: usize) -> bool {
        let Some(total) = self
            .total
            .checked_add(len)
            .filter(|_| self.count < MAX_SEGMENTS)
        else {
            return false;
        };
        self.at[self.count] = MaybeUninit::new((at, len));
        self.count += 1;
        self.total = total;
        true
    }

    /// Sets the list to the readable (`write == false`) or writable buffers of the chain at
    /// `head` of a batch (the in-process link) and returns it; None when one lies outside guest
    /// memory, a writable one on a page `writes` keeps the device off, the chain is malformed or
    /// longer than `MAX_SEGMENTS`, or its total overflows.
    #[inline]
    pub(super) fn fill(
        &mut self,
        mem: &GuestMemoryMmap,
        avail: &Avail,
        head: u16,
        write: bool,
        writes: &DeviceWrites,
    ) -> Option<&Segments> {
        self.count = 0;
        self.total = 0;
        // `walk` leaves zero-length buffers out; `host_range` checks the rest against the
        // guest's memory and marks what the device may write dirty.
        let whole = avail.walk(head, write, |b| {
            let len = b.len as usize;
            (!write || writes.allows(b.addr, len))
                && avail
                    .host_range(mem, b.addr, len, write)
                    .is_some_and(|at| self.push_host(at, len))
        });
        whole.then_some(self)
    }

    /// The same for a `virtio-queue` chain (the device threads of TAP, VXLAN and socket links):
    /// what its `Reader`/`Writer` would cover, without their allocation per chain.
    #[inline]
    pub(super) fn fill_chain(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        write: bool,
        writes: &DeviceWrites,
    ) -> Option<&Segments> {
        self.count = 0;
        self.total = 0;
        let mem = chain.memory();
        // Every descriptor of the chain counts, whichever way it goes and whatever its length:
        // a chain may hold 65,535 zero-length ones through an indirect table (a feature this
        // device never offers, which virtio-queue follows all the same), each a read of guest
        // memory, on every kick.
        for (seen, desc) in chain.clone().enumerate() {
            if seen >= MAX_SEGMENTS {
                return None;
            }
            if desc.is_write_only() == write
                && !self.push(mem, desc.addr(), desc.len() as usize, write, writes)
            {
                return None;
            }
        }
        Some(self)
    }

    /// Copies `len` bytes from offset `from` of `src` to offset `to` of `self`.
    ///
    /// # Safety
    /// Both segment lists must point into guest memory that stays mapped for the call, and
    /// `from + len <= src.total`, `to + len <= self.total`.
    #[inline]
    pub(super) unsafe fn copy_from(&self, to: usize, src: &Segments, from: usize, len: usize) {
        let (mut si, mut so) = src.locate(from);
        let (mut di, mut doff) = self.locate(to);
        let mut left = len;
        while left > 0 {
            let (sp, sl) = src.seg(si);
            let (dp, dl) = self.seg(di);
            let n = left.min(sl - so).min(dl - doff);
            // SAFETY: inside both segments (the caller bounds the totals); guest buffers of two
            // guests, or of one guest that chose to overlap its own buffers (then the copy's
            // result is unspecified bytes, never memory outside the guest's).
            unsafe { std::ptr::copy(sp.add(so), dp.add(doff), n) };
            left -= n;
            so += n;
            doff += n;
            if so == sl {
                si += 1;
                so = 0;
            }
            if doff == dl {
                di += 1;
                doff = 0;
            }
        }
    }

    /// Copies `bytes` from the host to offset `to`; the caller checked that they fit.
    #[inline]
    pub(super) fn write_at(&self, to: usize, bytes: &[u8]) {
        let (mut i, mut off) = self.locate(to);
        let mut done = 0;
        while done < bytes.len() {
            let (p, l) = self.seg(i);
            let n = (bytes.len() - done).min(l - off);
            // SAFETY: inside segment i of guest memory (checked when the list was made; the
            // mapping outlives the call: the caller holds the memory handle).
            unsafe { std::ptr::copy_nonoverlapping(bytes[done..].as_ptr(), p.add(off), n) };
            done += n;
            off += n;
            if off == l {
                i += 1;
                off = 0;
            }
        }
    }

    /// Copies `out.len()` bytes from offset `from` to the host; the caller checked the length.
    #[inline]
    pub(super) fn read_at(&self, from: usize, out: &mut [u8]) {
        let (mut i, mut off) = self.locate(from);
        let mut done = 0;
        while done < out.len() {
            let (p, l) = self.seg(i);
            let n = (out.len() - done).min(l - off);
            // SAFETY: as in `write_at`.
            unsafe { std::ptr::copy_nonoverlapping(p.add(off), out[done..].as_mut_ptr(), n) };
            done += n;
            off += n;
            if off == l {
                i += 1;
                off = 0;
            }
        }
    }

    /// (segment, offset in it) of byte `at` (`at < total`, or `at == total` with nothing to do).
    #[inline]
    fn locate(&self, mut at: usize) -> (usize, usize) {
        for i in 0..self.count {
            let (_, l) = self.seg(i);
            if at < l {
                return (i, at);
            }
            at -= l;
        }
        (self.count, 0)
    }
}
