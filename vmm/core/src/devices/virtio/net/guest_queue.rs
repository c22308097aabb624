//! One guest's virtqueue lent to an in-process link ([`super::memlink`]), a batch at a time: the
//! heads its driver made available read in one pass ([`Avail`]: the avail index once, then the
//! entries together, so the misses on lines the driver just wrote overlap), descriptor chains
//! walked through one view of the descriptor table, the used entries published under one index
//! store ([`Completions`]), and the interrupt decision after them.
//!
//! Why not virtio-queue's iterators here: they re-translate every ring access through the guest
//! memory map and store the used index per entry; perf put most of the link's time on those
//! (the device threads of TAP and socket links keep using them: a system call per frame dwarfs
//! it there).
//!
//! Owns: [`GuestQueue`], [`Avail`], [`Completions`].
//! Must not: trust a head, descriptor, index or ring address from the guest (an index more than a
//! ring ahead, a ring outside its memory and a head past the table are queue errors; a chain ends
//! at the queue's size, at an index past the table or at a descriptor that cannot be read, as in
//! virtio-queue; an indirect descriptor, which the device does not offer, makes it malformed), or
//! publish the used index before the entries it covers.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice,
};

use super::counters::{bump, NetCounters};
use super::VRING_AVAIL_F_NO_INTERRUPT;
use crate::devices::virtio::{interrupt, Interrupt};
use crate::write_trap::DeviceWrites;

/// The most used entries one batch publishes at once, and the most heads it takes.
pub(super) const BATCH: usize = 256;

/// Up to `N` values, of which only those pushed are ever read: the storage is not zeroed (the
/// heads and completions of one call were a 2.5 KiB memset each time, 9-13% of the in-process
/// link's samples under `perf`, where a call often moves a handful of frames).
pub(super) struct Prefix<T: Copy, const N: usize> {
    at: [MaybeUninit<T>; N],
    len: usize,
}

impl<T: Copy, const N: usize> Prefix<T, N> {
    pub(super) fn new() -> Self {
        Prefix {
            at: [const { MaybeUninit::uninit() }; N],
            len: 0,
        }
    }

    #[inline]
    pub(super) fn is_full(&self) -> bool {
        self.len == N
    }

    /// Appends `value`; false (nothing changed) when full.
    #[inline]
    pub(super) fn push(&mut self, value: T) -> bool {
        let Some(slot) = self.at.get_mut(self.len) else {
            return false;
        };
        *slot = MaybeUninit::new(value);
        self.len += 1;
        true
    }

    #[inline]
    pub(super) fn as_slice(&self) -> &[T] {
        // SAFETY: the first `len` entries were written by `push` before `len` counted them.
        unsafe { std::slice::from_raw_parts(self.at.as_ptr().cast::<T>(), self.len) }
    }

    /// Empties it, returning how many it held.
    #[inline]
    pub(super) fn take_len(&mut self) -> usize {
        std::mem::take(&mut self.len)
    }
}
/// virtq_desc flags (§2.7.5).
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: usize = 16;

/// Part of a guest's ring as host memory: `len` bytes at `ptr`, inside the guest's memory
/// (checked when made; the queue's memory handle keeps it mapped while the view is used).
#[derive(Clone, Copy)]
struct RingView {
    ptr: *const u8,
    len: usize,
}

impl RingView {
    fn of(mem: &GuestMemoryMmap, at: u64, len: usize) -> Option<RingView> {
        let slice = mem.get_slice(GuestAddress(at), len).ok()?;
        Some(RingView {
            ptr: slice.ptr_guard().as_ptr(),
            len,
        })
    }

    /// A view the device writes through: the whole range is marked dirty for a migration's
    /// tracking first (the raw stores below bypass vm-memory's accessors).
    fn writable(mem: &GuestMemoryMmap, at: u64, len: usize) -> Option<RingView> {
        let slice = mem.get_slice(GuestAddress(at), len).ok()?;
        Some(RingView {
            ptr: raw_access(slice, true),
            len,
        })
    }

    /// Stores `bytes` at `offset`; false past the view.
    #[inline]
    fn write<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> bool {
        if offset.checked_add(N).is_none_or(|end| end > self.len) {
            return false;
        }
        // SAFETY: inside the view (checked above), in guest memory that stays mapped and that
        // the view was made writable for; volatile because the guest reads it concurrently.
        unsafe {
            std::ptr::write_volatile(self.ptr.add(offset).cast_mut().cast::<[u8; N]>(), bytes)
        };
        true
    }

    /// `N` bytes at `offset`, or None past the view.
    #[inline]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        if offset.checked_add(N)? > self.len {
            return None;
        }
        // SAFETY: inside the view (checked above), in guest memory that stays mapped; volatile
        // because the guest may write it at any time (then the bytes are whatever it wrote).
        Some(unsafe { std::ptr::read_volatile(self.ptr.add(offset).cast::<[u8; N]>()) })
    }
}

/// The host address of `slice`, for copies that bypass vm-memory's accessors: where the device
/// may `write` it, the whole slice is marked dirty first, so a migration's log still sees it.
/// Every raw access of the link to guest memory takes its pointer here.
#[inline]
pub(super) fn raw_access<B: BitmapSlice>(slice: VolatileSlice<'_, B>, write: bool) -> *mut u8 {
    if write {
        slice.bitmap().mark_dirty(0, slice.len());
    }
    slice.ptr_guard_mut().as_ptr()
}

/// A prefetch hint for the line at `p` (never a memory access: any address is harmless).
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 only hints the cache; it cannot fault or change memory.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
}

/// One buffer of a chain: guest address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Buffer {
    pub(super) addr: u64,
    pub(super) len: u32,
}

/// The heads a driver made available, taken in order by a batch ([`GuestQueue::avail`]), and
/// the view of its descriptor table their chains are walked through.
pub(super) struct Avail {
    heads: Prefix<u16, BATCH>,
    taken: usize,
    table: RingView,
    size: u16,
    /// Index of the guest memory region the batch's last buffer lay in: a driver's buffers
    /// mostly share one, and finding it again for every buffer (vm-memory's `find_region`)
    /// was a tenth of the in-process link's harness time (`perf`).
    region: Cell<usize>,
}

impl Avail {
    /// An empty batch, to be filled in place by [`GuestQueue::avail`]: the heads are 512 bytes,
    /// and returning a filled batch by value copied them on every call (a tenth of the
    /// in-process link's harness time, `perf`, where a call often takes a handful of heads).
    pub(super) fn new() -> Avail {
        Avail {
            heads: Prefix::new(),
            taken: 0,
            table: RingView {
                ptr: std::ptr::null(),
                len: 0,
            },
            size: 0,
            region: Cell::new(0),
        }
    }

    /// The next head, taken.
    #[inline]
    pub(super) fn next(&mut self) -> Option<u16> {
        let head = *self.heads.as_slice().get(self.taken)?;
        self.taken += 1;
        Some(head)
    }

    /// Starts loading the first buffer of the next head's chain (its first two cache lines:
    /// a virtio-net header and a small frame), so the copy of the frame after this one does not
    /// wait for the lines the guest last touched. A hint only: nothing is read or written.
    /// (Asking for receive buffers owned, PREFETCHW, measured slower: it takes the lines from
    /// the guest while it may still be reading them.)
    #[inline]
    pub(super) fn prefetch_next(&self, mem: &GuestMemoryMmap) {
        let Some(&head) = self.heads.as_slice().get(self.taken) else {
            return;
        };
        let Some(d) = self.descriptor(head) else {
            return;
        };
        if let Some((region, offset)) = self.region_of(mem, GuestAddress(d.addr)) {
            if let Ok(host) = region.get_host_address(offset) {
                prefetch(host);
                prefetch(host.wrapping_add(64));
            }
        }
    }

    /// The region of `mem` holding `addr`, and `addr` in it: the batch's last region first.
    #[inline]
    fn region_of<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        addr: GuestAddress,
    ) -> Option<(
        &'m <GuestMemoryMmap as GuestMemoryBackend>::R,
        vm_memory::MemoryRegionAddress,
    )> {
        let last = mem
            .iter()
            .nth(self.region.get())
            .and_then(|r| Some((r, r.to_region_addr(addr)?)));
        if last.is_some() {
            return last;
        }
        let (index, region, offset) = mem
            .iter()
            .enumerate()
            .find_map(|(i, r)| Some((i, r, r.to_region_addr(addr)?)))?;
        self.region.set(index);
        Some((region, offset))
    }

    /// The host address of the `len` bytes at guest address `addr`, all inside one region of
    /// `mem` (as `mem.get_slice` requires too); marked dirty for a migration's tracking when
    /// the device may `write` them (the copies through it bypass vm-memory's accessors).
    #[inline]
    pub(super) fn host_range(
        &self,
        mem: &GuestMemoryMmap,
        addr: u64,
        len: usize,
        write: bool,
    ) -> Option<*mut u8> {
        let (region, offset) = self.region_of(mem, GuestAddress(addr))?;
        Some(raw_access(region.get_slice(offset, len).ok()?, write))
    }

    /// Gives the last head back (its buffer is kept for the next frame).
    #[inline]
    pub(super) fn put_back(&mut self) {
        self.taken = self.taken.saturating_sub(1);
    }

    /// Calls `each` with the device-readable (`write == false`) or device-writable buffers of
    /// the chain at `head`, in order, zero-length ones left out. Returns false when the chain
    /// is malformed (an indirect descriptor, or `each` refused a buffer).
    #[inline]
    pub(super) fn walk(
        &self,
        head: u16,
        write: bool,
        mut each: impl FnMut(Buffer) -> bool,
    ) -> bool {
        let mut index = head;
        // At most one pass over the table: a longer chain loops.
        for _ in 0..self.size {
            if index >= self.size {
                return true;
            }
            let Some(d) = self.descriptor(index) else {
                return true;
            };
            if d.flags & DESC_F_INDIRECT != 0 {
                return false;
            }
            let buffer = Buffer {
                addr: d.addr,
                len: d.len,
            };
            if ((d.flags & DESC_F_WRITE != 0) == write) && d.len != 0 && !each(buffer) {
                return false;
            }
            if d.flags & DESC_F_NEXT == 0 {
                return true;
            }
            index = d.next;
        }
        true
    }

    /// Descriptor `index` of the table (a `virtq_desc`, little-endian), or None past it.
    #[inline]
    fn descriptor(&self, index: u16) -> Option<Descriptor> {
        let d = self
            .table
            .read::<DESC_SIZE>(usize::from(index) * DESC_SIZE)?;
        Some(Descriptor {
            addr: u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]),
            len: u32::from_le_bytes([d[8], d[9], d[10], d[11]]),
            flags: u16::from_le_bytes([d[12], d[13]]),
            next: u16::from_le_bytes([d[14], d[15]]),
        })
    }
}

/// One `virtq_desc` as read from the guest (untrusted: every field is checked where used).
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Bytes ahead of the first entry of the avail ring and of the used ring (flags, idx).
const AVAIL_RING_HEADER: u64 = 4;
const USED_RING_HEADER: u64 = 4;

/// Used entries of one batch, published together ([`GuestQueue::publish`]): each the
/// `virtq_used_elem` as one u64 (id in the low half, length in the high), so the batch starts
/// as one memset, not a store per field.
pub(super) struct Completions {
    at: Prefix<u64, BATCH>,
}

impl Completions {
    pub(super) fn new() -> Completions {
        Completions { at: Prefix::new() }
    }

    #[inline]
    pub(super) fn is_full(&self) -> bool {
        self.at.is_full()
    }

    /// Adds one entry; the caller checks `is_full` first (a full batch drops nothing: it is
    /// published before more chains are taken).
    #[inline]
    pub(super) fn push(&mut self, head: u16, len: u32) {
        self.at.push(u64::from(head) | (u64::from(len) << 32));
    }
}

/// One guest queue lent to a link by its device.
pub(super) struct GuestQueue {
    pub(super) mem: GuestMemoryMmap,
    pub(super) queue: Queue,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) event_idx: bool,
    pub(super) counters: Arc<NetCounters>,
    /// What of `mem` the device may write: receive buffers on guarded pages are refused.
    pub(super) writes: DeviceWrites,
    /// Used entries published since the last interrupt decision.
    added: Wrapping<u16>,
    /// Whether an interrupt decision was taken since the queue was lent (vhost's
    /// `signalled_used_valid`). The first one signals whatever `used_event` says: a driver whose
    /// interrupt was lost before this queue existed (a migration's, a restart's) has its
    /// `used_event` behind entries already published, and with `VIRTIO_F_EVENT_IDX` no later
    /// entry would ever pass it again.
    decided: bool,
}

impl GuestQueue {
    pub(super) fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: Arc<Interrupt>,
        event_idx: bool,
        counters: Arc<NetCounters>,
    ) -> GuestQueue {
        GuestQueue {
            mem,
            queue,
            interrupt,
            event_idx,
            counters,
            writes: DeviceWrites::default(),
            added: Wrapping(0),
            decided: false,
        }
    }

    /// Keeps the device's writes off the pages `writes` guards (its VM's write traps).
    pub(super) fn with_device_writes(mut self, writes: DeviceWrites) -> GuestQueue {
        self.writes = writes;
        self
    }

    /// The heads the driver made available since the last batch, at most `max` (and
    /// [`BATCH`]), read in one pass into `into` (emptied first; its region hint is kept); none
    /// are consumed until [`GuestQueue::consume`]. None, and a queue error counted, when the
    /// ring is broken: an avail index more than a ring ahead of the device, or a ring outside
    /// guest memory.
    pub(super) fn avail<'a>(&mut self, max: usize, into: &'a mut Avail) -> Option<&'a mut Avail> {
        into.heads.take_len();
        into.taken = 0;
        let size = self.queue.size();
        let next = self.queue.next_avail();
        let rings = RingView::of(
            &self.mem,
            self.queue.avail_ring(),
            4 + 2 * usize::from(size),
        )
        .zip(RingView::of(
            &self.mem,
            self.queue.desc_table(),
            DESC_SIZE * usize::from(size),
        ));
        // The index is read as an AtomicU16: the view must be 2-byte aligned (virtio-queue
        // refuses an odd ring address; the host mapping is page aligned).
        let usable = |(ring, _): &(RingView, RingView)| {
            size.is_power_of_two() && (ring.ptr as usize).is_multiple_of(2)
        };
        let Some((ring, table)) = rings.filter(usable) else {
            bump(&self.counters.queue_errors, 1);
            return None;
        };
        // Acquire: the entries the index covers are read after it.
        // SAFETY: offset 2 is inside the ring view (4 + 2 * size bytes), 2-byte aligned (checked
        // above), in guest memory that stays mapped.
        let index = u16::from_le(
            unsafe { AtomicU16::from_ptr(ring.ptr.add(2).cast_mut().cast()) }
                .load(Ordering::Acquire),
        );
        let pending = index.wrapping_sub(next);
        if pending > size {
            bump(&self.counters.queue_errors, 1);
            return None;
        }
        let count = usize::from(pending).min(max).min(BATCH);
        let heads = &mut into.heads;
        for i in 0..count {
            // Free-running indices wrap at 2^16, a multiple of the (power of two) size.
            let slot = usize::from(next.wrapping_add(i as u16) % size);
            let Some(bytes) = ring.read::<2>(4 + 2 * slot) else {
                bump(&self.counters.queue_errors, 1);
                return None;
            };
            heads.push(u16::from_le_bytes(bytes));
        }
        // The descriptors of the whole batch start loading together (the driver wrote them
        // last, on its own core).
        for &head in heads.as_slice() {
            prefetch(table.ptr.wrapping_add(usize::from(head % size) * DESC_SIZE));
        }
        into.table = table;
        into.size = size;
        Some(into)
    }

    /// Moves past the heads `avail` took.
    pub(super) fn consume(&mut self, avail: &Avail) {
        let next = self.queue.next_avail().wrapping_add(avail.taken as u16);
        self.queue.set_next_avail(next);
    }

    /// One used entry on its own (the slow paths).
    #[inline]
    pub(super) fn add_used(&mut self, head: u16, len: u32) {
        let mut one = Completions::new();
        one.push(head, len);
        self.publish(&mut one);
    }

    /// Writes a batch's used entries, then moves the used index once (and empties `done`).
    /// Why not `Queue::add_used` per entry: it stores the index after every entry, and the
    /// driver polling that index on the other core takes its cache line away each time.
    pub(super) fn publish(&mut self, done: &mut Completions) {
        if done.at.as_slice().is_empty() {
            return;
        }
        let size = self.queue.size();
        // One view of the whole used ring (flags, idx, entries, avail_event) per batch: a
        // vm-memory write per entry translated its address each time (a tenth of the
        // in-process link's harness time, `perf`). The index is stored as an AtomicU16: the
        // view must be 2-byte aligned (virtio-queue refuses a used ring not 4-byte aligned).
        let ring = RingView::writable(
            &self.mem,
            self.queue.used_ring(),
            USED_RING_HEADER as usize + 8 * usize::from(size) + 2,
        )
        .filter(|ring| (ring.ptr as usize).is_multiple_of(2));
        let Some(ring) = ring else {
            bump(&self.counters.queue_errors, 1);
            done.at.take_len();
            return;
        };
        let mut next = Wrapping(self.queue.next_used());
        let mut written = Wrapping(0u16);
        for &entry in done.at.as_slice() {
            let head = entry as u16;
            // A head from the avail ring is the driver's word: one past the table is refused,
            // as `Queue::add_used` refuses it.
            if head >= size {
                bump(&self.counters.queue_errors, 1);
                continue;
            }
            // virtq_used_elem: le32 id, le32 len, in one store.
            let slot = USED_RING_HEADER as usize + usize::from(next.0 % size) * 8;
            if !ring.write(slot, entry.to_le_bytes()) {
                bump(&self.counters.queue_errors, 1);
                break;
            }
            next += 1;
            written += 1;
        }
        done.at.take_len();
        if written.0 == 0 {
            return;
        }
        // Release: the entries are visible before the index that publishes them.
        // SAFETY: offset 2 is inside the view, 2-byte aligned (checked above), in guest memory
        // that stays mapped.
        unsafe { AtomicU16::from_ptr(ring.ptr.add(2).cast_mut().cast()) }
            .store(next.0.to_le(), Ordering::Release);
        self.queue.set_next_used(next.0);
        self.added += written;
    }

    /// Raises the used-buffer interrupt after used-ring updates, unless the driver suppressed it
    /// (`VIRTIO_F_EVENT_IDX`: unless the used index did not pass its `used_event`; without it:
    /// `VRING_AVAIL_F_NO_INTERRUPT`). The first decision of a freshly lent queue signals anyway
    /// (see `decided`): a spurious interrupt costs the driver one look at its used ring.
    #[inline]
    pub(super) fn signal_used(&mut self) {
        let added = std::mem::replace(&mut self.added, Wrapping(0));
        if added.0 == 0 {
            return;
        }
        // The used index is stored before the driver's word on interrupts is read.
        fence(Ordering::SeqCst);
        let avail = GuestAddress(self.queue.avail_ring());
        let wanted = if !std::mem::replace(&mut self.decided, true) {
            true
        } else if self.event_idx {
            let new = Wrapping(self.queue.next_used());
            let old = new - added;
            let used_event = avail
                .checked_add(AVAIL_RING_HEADER + 2 * u64::from(self.queue.size()))
                .and_then(|at| self.mem.load::<u16>(at, Ordering::Relaxed).ok());
            // The virtio spec's vring_need_event(used_event, new, old).
            used_event
                .is_none_or(|event| new - Wrapping(u16::from_le(event)) - Wrapping(1) < new - old)
        } else {
            self.mem.read_obj::<u16>(avail).map_or(true, |flags| {
                u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0
            })
        };
        if wanted {
            bump(&self.counters.interrupts, 1);
            self.interrupt.signal(interrupt::USED_BUFFER);
        } else {
            self.interrupt.wake_poller();
        }
    }

    /// Kicks off (the pump polls) or on (re-checked: `true` when more is available already).
    #[inline]
    pub(super) fn notifications(&mut self, on: bool) -> bool {
        if on {
            match self.queue.enable_notification(&self.mem) {
                Ok(more) => more,
                Err(_) => {
                    bump(&self.counters.queue_errors, 1);
                    false
                }
            }
        } else {
            let _ = self.queue.disable_notification(&self.mem);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn queue(event_idx: bool) -> GuestQueue {
        let mem = crate::anonymous_memory(1 << 20, true).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        GuestQueue::new(
            mem,
            q,
            Arc::new(Interrupt::new().unwrap()),
            event_idx,
            Arc::default(),
        )
    }

    fn used_idx(q: &GuestQueue) -> u16 {
        q.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn publish(q: &mut GuestQueue, entries: &[(u16, u32)]) {
        let mut done = Completions::new();
        for &(head, len) in entries {
            done.push(head, len);
        }
        q.publish(&mut done);
        assert!(
            done.at.as_slice().is_empty(),
            "a published batch is emptied"
        );
    }

    fn interrupts(q: &GuestQueue) -> u64 {
        q.counters.snapshot().interrupts
    }

    /// Makes `heads` available (after those already there).
    fn offer(q: &GuestQueue, heads: &[u16]) {
        let idx: u16 = q.mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        for (i, &h) in heads.iter().enumerate() {
            let slot = u64::from(idx.wrapping_add(i as u16) % SIZE);
            q.mem
                .write_obj(h, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
        }
        q.mem
            .write_obj(
                idx.wrapping_add(heads.len() as u16),
                GuestAddress(AVAIL + 2),
            )
            .unwrap();
    }

    fn desc(q: &GuestQueue, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * u64::from(i);
        q.mem.write_obj(addr, GuestAddress(at)).unwrap();
        q.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        q.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        q.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn buffers(avail: &Avail, head: u16, write: bool) -> (bool, Vec<Buffer>) {
        let mut got = Vec::new();
        let whole = avail.walk(head, write, |b| {
            got.push(b);
            true
        });
        (whole, got)
    }

    #[test]
    fn heads_are_read_in_one_pass_and_only_those_taken_are_consumed() {
        let mut q = queue(false);
        offer(&q, &[5, 9, 2]);
        let mut batch = Avail::new();
        let avail = q.avail(BATCH, &mut batch).unwrap();
        assert_eq!((avail.next(), avail.next()), (Some(5), Some(9)));
        avail.put_back();
        q.consume(avail);
        assert_eq!(q.queue.next_avail(), 1, "9 was given back");
        let mut batch = Avail::new();
        let avail = q.avail(1, &mut batch).unwrap();
        assert_eq!(
            (avail.next(), avail.next()),
            (Some(9), None),
            "at most `max`"
        );
        q.consume(avail);
        // Across the wrap of the ring and of the 16-bit index.
        q.queue.set_next_avail(u16::MAX - 1);
        q.mem
            .write_obj(u16::MAX - 1, GuestAddress(AVAIL + 2))
            .unwrap();
        offer(&q, &[1, 2, 3]);
        let mut batch = Avail::new();
        let avail = q.avail(BATCH, &mut batch).unwrap();
        let taken: Vec<u16> = std::iter::from_fn(|| avail.next()).collect();
        assert_eq!(taken, [1, 2, 3]);
        q.consume(avail);
        assert_eq!(q.queue.next_avail(), 1);
    }

    #[test]
    fn an_avail_index_more_than_a_ring_ahead_is_a_queue_error() {
        let mut q = queue(false);
        q.mem.write_obj(SIZE + 1, GuestAddress(AVAIL + 2)).unwrap();
        assert!(q.avail(BATCH, &mut Avail::new()).is_none());
        assert_eq!(q.counters.snapshot().queue_errors, 1);
        assert_eq!(q.queue.next_avail(), 0, "nothing taken");
    }

    #[test]
    fn a_chain_is_walked_at_most_once_around_the_table_and_indirect_is_malformed() {
        let mut q = queue(false);
        // 0 -> 1 (readable header, writable buffer), 2 -> 3 -> 2 (a loop), 4 indirect, 5
        // points past the table.
        desc(&q, 0, 0x8000, 12, DESC_F_NEXT, 1);
        desc(&q, 1, 0x9000, 2048, DESC_F_WRITE, 0);
        desc(&q, 2, 0xa000, 64, DESC_F_NEXT, 3);
        desc(&q, 3, 0xb000, 64, DESC_F_NEXT, 2);
        desc(&q, 4, 0xc000, 64, DESC_F_INDIRECT, 0);
        desc(&q, 5, 0xd000, 0, DESC_F_NEXT, SIZE);
        offer(&q, &[0]);
        let mut batch = Avail::new();
        let avail = q.avail(BATCH, &mut batch).unwrap();
        let b = |addr, len| Buffer { addr, len };
        assert_eq!(buffers(avail, 0, false), (true, vec![b(0x8000, 12)]));
        assert_eq!(buffers(avail, 0, true), (true, vec![b(0x9000, 2048)]));
        let (whole, looped) = buffers(avail, 2, false);
        assert!(whole);
        assert_eq!(
            looped.len(),
            usize::from(SIZE),
            "one pass, then the walk stops"
        );
        assert_eq!(buffers(avail, 4, false), (false, vec![]));
        assert_eq!(
            buffers(avail, 5, false),
            (true, vec![]),
            "zero length left out"
        );
        assert_eq!(
            buffers(avail, SIZE, false),
            (true, vec![]),
            "a head past the table"
        );
        // A buffer the caller refuses makes the chain malformed.
        assert!(!avail.walk(0, false, |_| false));
    }

    #[test]
    fn a_batch_lands_in_order_under_one_index_and_a_head_past_the_table_is_refused() {
        let mut q = queue(false);
        publish(&mut q, &[(3, 60), (SIZE, 1), (7, 1514)]);
        assert_eq!(used_idx(&q), 2, "the refused head takes no entry");
        assert_eq!(q.queue.next_used(), 2);
        let entry = |i: u64| -> (u32, u32) {
            let at = GuestAddress(USED + 4 + 8 * i);
            let id: u32 = q.mem.read_obj(at).unwrap();
            (id, q.mem.read_obj(at.unchecked_add(4)).unwrap())
        };
        assert_eq!((entry(0), entry(1)), ((3, 60), (7, 1514)));
        assert_eq!(q.counters.snapshot().queue_errors, 1);
        // The index wraps with the ring: 16 more entries land from slot 2 around to slot 1.
        publish(&mut q, &[(1, 1); SIZE as usize]);
        assert_eq!(used_idx(&q), 18);
    }

    #[test]
    fn with_event_idx_the_interrupt_comes_when_the_used_index_passes_used_event() {
        let mut q = queue(true);
        // used_event sits after the avail ring's entries.
        let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
        q.mem.write_obj(0u16, used_event).unwrap();
        publish(&mut q, &[(0, 1)]);
        q.signal_used();
        assert_eq!(interrupts(&q), 1, "used index 1 passed used_event 0");
        q.mem.write_obj(4u16, used_event).unwrap();
        publish(&mut q, &[(1, 1), (2, 1), (3, 1)]);
        q.signal_used();
        assert_eq!(
            interrupts(&q),
            1,
            "used index 4 has not passed used_event 4"
        );
        publish(&mut q, &[(4, 1), (5, 1)]);
        q.signal_used();
        assert_eq!(interrupts(&q), 2, "used index 6 passed it");
        q.signal_used();
        assert_eq!(interrupts(&q), 2, "nothing new, no interrupt");
        // Across the wrap of the 16-bit index.
        q.queue.set_next_used(u16::MAX - 1);
        q.mem.write_obj(u16::MAX, used_event).unwrap();
        publish(&mut q, &[(0, 1), (1, 1), (2, 1)]);
        assert_eq!(used_idx(&q), 1);
        q.signal_used();
        assert_eq!(interrupts(&q), 3);
    }

    /// A driver whose interrupt was lost (in a migration, say) keeps `used_event` behind entries
    /// already published; with event idx no later entry passes it again. The first decision of
    /// a freshly lent queue signals regardless, and the driver catches up.
    #[test]
    fn a_freshly_lent_queue_signals_its_first_batch_whatever_used_event_says() {
        let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
        let stalled = |q: &mut GuestQueue| {
            // Entries 0..3 published before; the driver never heard of them: used_event 0.
            q.queue.set_next_used(3);
            q.mem.write_obj(3u16, GuestAddress(USED + 2)).unwrap();
            q.mem.write_obj(0u16, used_event).unwrap();
            publish(q, &[(3, 1)]);
            q.signal_used();
        };
        let mut fresh = queue(true);
        stalled(&mut fresh);
        assert_eq!(interrupts(&fresh), 1, "the first decision signals");
        // The same ring on a queue that decided before: the rule alone stays silent.
        let mut decided = queue(true);
        decided.decided = true;
        stalled(&mut decided);
        assert_eq!(
            interrupts(&decided),
            0,
            "vring_need_event(0, 4, 3) is false"
        );
        // Without event idx too, the first decision ignores the suppression flag.
        let mut flags = queue(false);
        flags
            .mem
            .write_obj(VRING_AVAIL_F_NO_INTERRUPT, GuestAddress(AVAIL))
            .unwrap();
        publish(&mut flags, &[(0, 1)]);
        flags.signal_used();
        assert_eq!(interrupts(&flags), 1);
    }

    #[test]
    fn without_event_idx_the_avail_flags_decide() {
        let mut q = queue(false);
        q.decided = true;
        q.mem
            .write_obj(VRING_AVAIL_F_NO_INTERRUPT, GuestAddress(AVAIL))
            .unwrap();
        publish(&mut q, &[(0, 1)]);
        q.signal_used();
        assert_eq!(interrupts(&q), 0);
        q.mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        publish(&mut q, &[(1, 1)]);
        q.signal_used();
        assert_eq!(interrupts(&q), 1);
    }
}
