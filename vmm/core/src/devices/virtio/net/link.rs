//! Where a virtio-net device's frames go: one datagram per Ethernet frame, non-blocking; many
//! frames per system call where the link can batch them (a TAP with io_uring).
//!
//! Owns: the [`FrameLink`] trait, the [`FrameBatch`] a batching link fills and drains, and the
//! implementations for a TAP device and a datagram socket.
//! Must not: block (the backend thread polls the link's fd), cut or join frames, or allocate per
//! frame or per batch.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use crate::devices::tap::Tap;

/// Where a device's frames go: one datagram per Ethernet frame, non-blocking.
pub trait FrameLink: AsRawFd + Send {
    /// Receives one frame into `buf`; `WouldBlock` when none is waiting.
    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame.
    fn send_frame(&self, frame: &[u8]) -> io::Result<usize>;
    /// The slot size of the batches this link fills and drains, `None` when it moves one frame
    /// per call (the backend then uses [`FrameLink::recv_frame`] and [`FrameLink::send_frame`]).
    fn batch_slot(&self) -> Option<usize> {
        None
    }
    /// Fills the empty `batch` with the frames waiting, in one system call; `WouldBlock` when
    /// none is. A frame that filled its whole slot may have been cut: the caller drops it.
    fn recv_batch(&self, batch: &mut FrameBatch) -> io::Result<usize> {
        let _ = batch;
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Sends every frame of `batch` in one system call; how many the link took (the first
    /// error ends the batch, its frame and the rest are not sent).
    fn send_batch(&self, batch: &FrameBatch) -> io::Result<usize> {
        let _ = batch;
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Frames per batch: a link's system call moves up to this many.
pub const BATCH: usize = 32;

/// Up to [`BATCH`] frames, each in a slot of its own in one buffer allocated once: what a
/// batching link reads into or writes from.
pub struct FrameBatch {
    data: Vec<u8>,
    slot: usize,
    lens: [usize; BATCH],
    count: usize,
}

impl FrameBatch {
    /// An empty batch of [`BATCH`] slots of `slot` bytes.
    pub fn new(slot: usize) -> FrameBatch {
        FrameBatch {
            data: vec![0; slot * BATCH],
            slot,
            lens: [0; BATCH],
            count: 0,
        }
    }

    pub fn slot_size(&self) -> usize {
        self.slot
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == BATCH
    }

    pub fn clear(&mut self) {
        self.count = 0;
    }

    /// Frame `i` (below [`FrameBatch::len`]).
    #[inline]
    pub fn frame(&self, i: usize) -> &[u8] {
        &self.data[i * self.slot..i * self.slot + self.lens[i]]
    }

    /// The whole of slot `i`, to be filled.
    #[inline]
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.data[i * self.slot..(i + 1) * self.slot]
    }

    /// Slot `i`'s start, for a system call that fills or drains it.
    #[inline]
    pub(crate) fn slot_ptr(&mut self, i: usize) -> *mut u8 {
        self.slot_mut(i).as_mut_ptr()
    }

    /// Marks slots `0..count` as holding frames of `lens`.
    #[inline]
    pub fn set_len(&mut self, i: usize, len: usize) {
        self.lens[i] = len.min(self.slot);
    }

    #[inline]
    pub fn set_count(&mut self, count: usize) {
        self.count = count.min(BATCH);
    }

    /// The next free slot, to be filled with a frame of at most [`FrameBatch::slot_size`]
    /// bytes and then committed with [`FrameBatch::commit`]; `None` when full.
    #[inline]
    pub fn next_slot(&mut self) -> Option<&mut [u8]> {
        if self.is_full() {
            return None;
        }
        let i = self.count;
        Some(self.slot_mut(i))
    }

    /// Commits the frame of `len` bytes written into the slot [`FrameBatch::next_slot`] gave.
    #[inline]
    pub fn commit(&mut self, len: usize) {
        if self.count < BATCH {
            self.lens[self.count] = len.min(self.slot);
            self.count += 1;
        }
    }
}

impl FrameLink for Tap {
    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_frame(buf)
    }
    fn send_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.write_frame(frame)
    }
    fn batch_slot(&self) -> Option<usize> {
        self.batch_slot()
    }
    fn recv_batch(&self, batch: &mut FrameBatch) -> io::Result<usize> {
        self.read_batch(batch)
    }
    fn send_batch(&self, batch: &FrameBatch) -> io::Result<usize> {
        self.write_batch(batch)
    }
}

/// One end of a `socketpair(AF_UNIX, SOCK_DGRAM)`, set non-blocking by the caller: a link to
/// another device or process in the same host (and the tests' way to see frames without root).
impl FrameLink for UnixDatagram {
    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
    fn send_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.send(frame)
    }
}
