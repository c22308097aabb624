//! In-process links by memory, vhost-user style: two virtio-net devices of one VMM process (a
//! tenant and its switch port), or a device and a host-side endpoint (a benchmark's generator and
//! sink, a test), exchange frames by reading one guest's transmit queue and writing the other
//! guest's receive queue directly: exactly one copy per frame, no system call per frame, no
//! buffer in between (a frame waits in its sender's ring until the receiver posts a buffer).
//!
//! A link has two ends (sides 0 and 1) and two directions; direction `k` carries frames from side
//! `k` to side `1 - k`. When a device on side `k` activates it lends its transmit queue to
//! direction `k` (as the source) and its receive queue to direction `1 - k` (as the
//! destination); its backend thread then pumps direction `k` when its guest kicks TX and
//! direction `1 - k` when its guest posts receive buffers (kicks RX), so whichever side makes
//! progress possible moves the frames. Each direction is one mutex, taken once per batch.
//!
//! Notifications: while a pump finds work it keeps the source's kicks off; it turns them back on
//! only when the source is empty (and the destination's kicks on only when the destination has no
//! buffers), re-checking after each, so a guest that polls (the micro-VM) makes no exits while
//! frames flow. A host end polls with its own kicks off and sleeps on an eventfd when idle.
//!
//! Batches: each round reads each avail ring's index once, and the used entries it produced are
//! published under one used-index store ([`super::guest_queue`]); frames and bytes are counted
//! once per pump. Both keep the peer guest's cache lines from moving per frame.
//!
//! Owns: [`MemLinkEnd`], [`HostPort`], the per-direction state and the pump.
//! Must not: trust a descriptor, length or index from either guest (chains are checked against
//! each guest's memory, lengths against `MAX_FRAME`, lying rings count as queue errors), keep a
//! queue after its device resets (the device takes it back under the lock, so nothing writes its
//! guest's memory afterwards), allocate per frame, or lose a frame without counting it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::counters::{bump, Tally};
use super::guest_queue::GuestQueue;
use super::guest_queue::{Avail, Completions, BATCH};
use super::segments::Segments;
use super::{MAX_FRAME, NET_HDR_LEN, NUM_BUFFERS_OFFSET};

/// Frames one pump call moves before it lets go of the lock (at most a batch of used entries).
pub(super) const PUMP_BUDGET: usize = super::guest_queue::BATCH;
/// The zero `virtio_net_hdr_v1` with num_buffers = 1 ahead of every received frame.
#[inline]
fn rx_header() -> [u8; NET_HDR_LEN] {
    let mut header = [0u8; NET_HDR_LEN];
    header[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&1u16.to_le_bytes());
    header
}

/// One direction of a link: the sending guest's TX queue and the receiving guest's RX queue,
/// each present while its device is active (a host end has neither: it is the other side).
#[derive(Default)]
pub(super) struct Direction {
    pub(super) src: Option<GuestQueue>,
    pub(super) dst: Option<GuestQueue>,
}

/// Why a pump stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stopped {
    /// The source has nothing more (its kicks are on again).
    SourceEmpty,
    /// The destination has no buffer (its kicks are on again; the source waits in its ring).
    DestinationFull,
    /// The budget ran out with work left: call again.
    Budget,
    /// A side is missing or a ring is broken: nothing to do until a kick.
    Idle,
}

/// What one chain of the source became.
enum Moved {
    /// Copied: this many frame bytes.
    Frame(usize),
    /// The source chain is malformed: completed, counted; the destination buffer stays.
    Malformed,
    /// Too big for the destination's buffer: completed, counted; the buffer stays.
    TooBig,
    /// The destination buffer was unusable: returned empty, the frame stays for the next one.
    BadBuffer,
}

impl Direction {
    /// Moves frames from `src` to `dst` until one runs out or `budget` frames moved.
    pub(super) fn pump(&mut self, budget: usize) -> Stopped {
        let (Some(src), Some(dst)) = (self.src.as_mut(), self.dst.as_mut()) else {
            return Stopped::Idle;
        };
        let budget = budget.min(PUMP_BUDGET);
        let mut moved = 0usize;
        let mut frames = Tally::default();
        let mut empty_rounds = 0;
        let (mut sdone, mut ddone) = (Completions::new(), Completions::new());
        let stopped = loop {
            if moved >= budget {
                break Stopped::Budget;
            }
            src.notifications(false);
            dst.notifications(false);
            let (why, round) = move_batch(src, dst, budget - moved, (&mut sdone, &mut ddone));
            frames.merge(round.tally);
            src.publish(&mut sdone);
            dst.publish(&mut ddone);
            let progress = round.chains > 0;
            moved += round.chains;
            match why {
                Stopped::SourceEmpty if !src.notifications(true) => break why,
                Stopped::DestinationFull if !dst.notifications(true) => break why,
                Stopped::SourceEmpty | Stopped::DestinationFull => {
                    // More arrived while the kicks were off: another round, unless the ring
                    // says "more" and yields nothing (a lying index), which would spin.
                    if !progress {
                        empty_rounds += 1;
                        if empty_rounds > 2 {
                            bump(&src.counters.queue_errors, 1);
                            break Stopped::Idle;
                        }
                    }
                }
                other => break other,
            }
        };
        frames.flush(&src.counters.tx_frames, &src.counters.tx_bytes);
        frames.flush(&dst.counters.rx_frames, &dst.counters.rx_bytes);
        src.signal_used();
        dst.signal_used();
        stopped
    }

    /// The destination is gone (its device reset) and no host end pulls: every frame waiting in
    /// the source is completed and counted as a link error (a cable pulled mid-stream).
    pub(super) fn drop_waiting(&mut self) {
        let Some(src) = self.src.as_mut() else {
            return;
        };
        for _ in 0..usize::from(src.queue.size()) {
            let chain = match src.queue.iter(&src.mem) {
                Ok(mut it) => it.next(),
                Err(_) => {
                    bump(&src.counters.queue_errors, 1);
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            bump(&src.counters.tx_link_errors, 1);
            src.add_used(head, 0);
        }
        src.notifications(true);
        src.signal_used();
    }
}

/// What one round of a pump did.
#[derive(Clone, Copy, Default)]
struct Round {
    /// Frames moved (counted on both devices at the end of the pump).
    tally: Tally,
    /// Chain pairs looked at (frames moved, and malformed, refused or unusable chains): what
    /// the budget counts.
    chains: usize,
}

/// One round of a pump over one snapshot of each avail ring: up to `budget` source chains,
/// their used entries gathered in `done` (source, destination) for the caller to publish.
fn move_batch(
    src: &mut GuestQueue,
    dst: &mut GuestQueue,
    budget: usize,
    (sdone, ddone): (&mut Completions, &mut Completions),
) -> (Stopped, Round) {
    let mut round = Round::default();
    // Filled in place for each chain pair (see `Segments::new`).
    let (mut src_bufs, mut dst_bufs) = (Segments::new(), Segments::new());
    let (mut dbatch, mut sbatch) = (Avail::new(), Avail::new());
    let Some(dchains) = dst.avail(budget, &mut dbatch) else {
        return (Stopped::Idle, round);
    };
    let Some(schains) = src.avail(budget, &mut sbatch) else {
        return (Stopped::Idle, round);
    };
    let why = loop {
        // Each chain adds at most one entry to each side's batch.
        if round.chains >= budget || sdone.is_full() || ddone.is_full() {
            break Stopped::Budget;
        }
        let Some(dhead) = dchains.next() else {
            break Stopped::DestinationFull;
        };
        let Some(shead) = schains.next() else {
            dchains.put_back();
            break Stopped::SourceEmpty;
        };
        schains.prefetch_next(&src.mem);
        dchains.prefetch_next(&dst.mem);
        let from = src_bufs.fill(&src.mem, schains, shead, false, &src.writes);
        let to = dst_bufs.fill(&dst.mem, dchains, dhead, true, &dst.writes);
        round.chains += 1;
        match move_one(from, to) {
            Moved::Frame(len) => {
                round.tally.add(len);
                sdone.push(shead, 0);
                ddone.push(dhead, (NET_HDR_LEN + len) as u32);
            }
            Moved::Malformed => {
                bump(&src.counters.tx_dropped_malformed, 1);
                dchains.put_back();
                sdone.push(shead, 0);
            }
            Moved::TooBig => {
                // Too big for the receiver's buffers (it posts buffers of one size): dropped,
                // the buffer kept for the next frame.
                bump(&dst.counters.rx_dropped_too_big, 1);
                dchains.put_back();
                sdone.push(shead, 0);
            }
            Moved::BadBuffer => {
                bump(&dst.counters.rx_bad_buffers, 1);
                schains.put_back();
                ddone.push(dhead, 0);
            }
        }
    };
    src.consume(schains);
    dst.consume(dchains);
    (why, round)
}

/// Copies one frame from a TX chain's buffers to an RX chain's (the caller completes both).
fn move_one(from: Option<&Segments>, to: Option<&Segments>) -> Moved {
    let Some(from) = from.filter(|s| s.total >= NET_HDR_LEN && s.total - NET_HDR_LEN <= MAX_FRAME)
    else {
        return Moved::Malformed;
    };
    let len = from.total - NET_HDR_LEN;
    let Some(to) = to else {
        return Moved::BadBuffer;
    };
    if to.total < NET_HDR_LEN + len {
        return Moved::TooBig;
    }
    to.write_at(0, &rx_header());
    // SAFETY: both lists lie in mapped guest memory (each queue holds its memory handle), and
    // the lengths were checked above.
    unsafe { to.copy_from(NET_HDR_LEN, from, NET_HDR_LEN, len) };
    Moved::Frame(len)
}

/// Writes host frames into a guest's receive queue while it has buffers; returns how many it
/// took from the front of `frames` (a frame too big for its buffers is taken, dropped and
/// counted; a frame meeting an unusable buffer waits for the next buffer).
fn deliver<'f>(dst: &mut GuestQueue, frames: impl IntoIterator<Item = &'f [u8]>) -> usize {
    dst.notifications(false);
    let header = rx_header();
    let mut frames = frames.into_iter().peekable();
    let mut taken = 0;
    let mut delivered = Tally::default();
    let mut done = Completions::new();
    let mut to_bufs = Segments::new();
    let mut batch = Avail::new();
    loop {
        let before = taken;
        // One snapshot of the avail ring per batch.
        let Some(chains) = dst.avail(BATCH, &mut batch) else {
            break;
        };
        while !done.is_full() {
            let Some(&frame) = frames.peek() else { break };
            let Some(head) = chains.next() else { break };
            chains.prefetch_next(&dst.mem);
            let Some(to) = to_bufs.fill(&dst.mem, chains, head, true, &dst.writes) else {
                bump(&dst.counters.rx_bad_buffers, 1);
                done.push(head, 0);
                continue;
            };
            frames.next();
            taken += 1;
            if frame.len() > MAX_FRAME || to.total < NET_HDR_LEN + frame.len() {
                bump(&dst.counters.rx_dropped_too_big, 1);
                chains.put_back();
                continue;
            }
            to.write_at(0, &header);
            to.write_at(NET_HDR_LEN, frame);
            done.push(head, (NET_HDR_LEN + frame.len()) as u32);
            delivered.add(frame.len());
        }
        dst.consume(chains);
        let full = done.is_full();
        dst.publish(&mut done);
        // Another snapshot only after a full batch that took frames: otherwise the frames or
        // the buffers ran out (or the guest posts only unusable buffers).
        if !full || taken == before {
            break;
        }
    }
    delivered.flush(&dst.counters.rx_frames, &dst.counters.rx_bytes);
    dst.signal_used();
    taken
}

/// What both ends share.
pub(super) struct Shared {
    /// `dirs[k]` carries frames from side k to side 1 - k.
    pub(super) dirs: [Mutex<Direction>; 2],
    /// Signalled for a host end on side k when its peer's guest kicked (frames to pull, or
    /// buffers to fill).
    pub(super) wake: [EventFd; 2],
    /// Whether side k is a host end (it pulls and pushes itself).
    pub(super) host: [AtomicBool; 2],
    /// Who holds side k: the generation of its latest claim (0: nobody). A later claim takes the
    /// side over (a restarted VM's device while the stopped one is not dropped yet); an older
    /// holder's detach then leaves the new holder's queues alone.
    holder: [AtomicU64; 2],
}

/// Claim generations, unique in the process.
static GENERATION: AtomicU64 = AtomicU64::new(1);

impl Shared {
    #[inline]
    pub(super) fn dir(&self, k: usize) -> MutexGuard<'_, Direction> {
        self.dirs[k].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One end of an in-process link, for a virtio-net device ([`super::Net::with_memory_link`]).
#[derive(Clone)]
pub struct MemLinkEnd {
    pub(super) shared: Arc<Shared>,
    pub(super) side: usize,
}

impl std::fmt::Debug for MemLinkEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemLinkEnd(side {})", self.side)
    }
}

/// Why a link end cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MemLinkError {
    #[error("creating the link's eventfds: {0}")]
    EventFd(#[source] io::Error),
}

fn shared() -> Result<Arc<Shared>, MemLinkError> {
    let wake = || EventFd::new(EFD_NONBLOCK).map_err(MemLinkError::EventFd);
    Ok(Arc::new(Shared {
        dirs: [Mutex::default(), Mutex::default()],
        wake: [wake()?, wake()?],
        host: [AtomicBool::new(false), AtomicBool::new(false)],
        holder: [AtomicU64::new(0), AtomicU64::new(0)],
    }))
}

impl MemLinkEnd {
    /// Two device ends of a new link.
    pub fn pair() -> Result<(MemLinkEnd, MemLinkEnd), MemLinkError> {
        let shared = shared()?;
        Ok((
            MemLinkEnd {
                shared: shared.clone(),
                side: 0,
            },
            MemLinkEnd { shared, side: 1 },
        ))
    }

    /// A host end and a device end of a new link.
    pub fn host_pair() -> Result<(HostPort, MemLinkEnd), MemLinkError> {
        let (host, device) = MemLinkEnd::pair()?;
        Ok((host.into_host_port(), device))
    }

    /// Turns this end into a host end (a test or benchmark standing in for a VM's NIC): it takes
    /// the side over; frames then wait for the host to pull and push them.
    pub fn into_host_port(self) -> HostPort {
        let generation = self.claim();
        self.shared.host[self.side].store(true, Ordering::Release);
        HostPort {
            shared: self.shared,
            side: self.side,
            generation,
        }
    }

    /// Sends one frame from the host as if this end's device had sent it (the host announcing a
    /// migrated tenant): written straight into the peer's receive queue.
    pub fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        let mut dir = self.shared.dir(self.side);
        let Some(dst) = dir.dst.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if deliver(dst, [frame]) == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    }

    pub(super) fn peer(&self) -> usize {
        1 - self.side
    }

    /// Takes this side for one device (until [`MemLinkEnd::detach`] with the same generation).
    pub(super) fn claim(&self) -> u64 {
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        if self.shared.holder[self.side].swap(generation, Ordering::AcqRel) != 0 {
            log::warn!(
                "in-process link: side {} taken over by a new device",
                self.side
            );
        }
        generation
    }

    fn holds(&self, generation: u64) -> bool {
        self.shared.holder[self.side].load(Ordering::Acquire) == generation
    }

    /// Lends a device's queues to the link and moves what waits already.
    pub(super) fn attach(&self, generation: u64, rx: GuestQueue, tx: GuestQueue) {
        if !self.holds(generation) {
            return;
        }
        self.shared.dir(self.side).src = Some(tx);
        self.shared.dir(self.peer()).dst = Some(rx);
    }

    /// Takes the queues back: after this the link touches none of this device's guest memory.
    /// Frames the peer's guest queued for this side are completed and counted as link errors.
    /// A device that lost the side to a newer one leaves it alone.
    pub(super) fn detach(&self, generation: u64) {
        let mut outbound = self.shared.dir(self.side);
        if !self.holds(generation) {
            return;
        }
        outbound.src = None;
        drop(outbound);
        let mut inbound = self.shared.dir(self.peer());
        inbound.dst = None;
        if !self.shared.host[self.peer()].load(Ordering::Acquire) {
            inbound.drop_waiting();
        }
        drop(inbound);
        let _ = self.shared.holder[self.side].compare_exchange(
            generation,
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// Pumps direction `k`, and wakes a host end that should look. Returns whether the budget
    /// ran out with work left.
    pub(super) fn pump(&self, k: usize) -> bool {
        let receiver = 1 - k;
        let host = |side: usize| self.shared.host[side].load(Ordering::Acquire);
        if host(receiver) || host(k) {
            let _ = self.shared.wake[if host(receiver) { receiver } else { k }].write(1);
            return false;
        }
        let mut dir = self.shared.dir(k);
        if dir.dst.is_none() {
            // Nobody on the other side: the frames go nowhere, as on an unplugged cable.
            dir.drop_waiting();
            return false;
        }
        dir.pump(PUMP_BUDGET) == Stopped::Budget
    }
}

/// The host side of a link to one device: a benchmark's generator and sink, or a test. It writes
/// frames straight into the device's receive queue and reads them straight from its transmit
/// queue (one copy each), polling with the guest's kicks off; [`HostPort::wait`] sleeps.
pub struct HostPort {
    shared: Arc<Shared>,
    side: usize,
    generation: u64,
}

impl HostPort {
    /// Delivers frames to the device's guest while it has buffers; returns how many it took
    /// (0 while the device is not active). Frames above `MAX_FRAME` or its buffers are skipped
    /// and counted by the device (`rx_dropped_too_big`).
    pub fn send<'f>(&self, frames: impl IntoIterator<Item = &'f [u8]>) -> usize {
        match self.shared.dir(self.side).dst.as_mut() {
            Some(dst) => deliver(dst, frames),
            None => 0,
        }
    }

    /// Takes up to `max` frames the device's guest transmitted: each is copied into `scratch`
    /// (one copy) and handed to `each`. Returns how many. Malformed chains are completed and
    /// counted by the device (`tx_dropped_malformed`); a frame longer than `scratch` is cut.
    pub fn recv(&self, max: usize, scratch: &mut [u8], mut each: impl FnMut(&[u8])) -> usize {
        let mut dir = self.shared.dir(1 - self.side);
        let Some(src) = dir.src.as_mut() else {
            return 0;
        };
        src.notifications(false);
        let mut got = 0;
        let mut taken = Tally::default();
        let mut done = Completions::new();
        let mut from_bufs = Segments::new();
        let mut batch = Avail::new();
        loop {
            let before = got;
            // One snapshot of the avail ring per batch.
            let Some(chains) = src.avail(max - got, &mut batch) else {
                break;
            };
            while got < max && !done.is_full() {
                let Some(head) = chains.next() else { break };
                chains.prefetch_next(&src.mem);
                match from_bufs
                    .fill(&src.mem, chains, head, false, &src.writes)
                    .filter(|s| s.total >= NET_HDR_LEN && s.total - NET_HDR_LEN <= MAX_FRAME)
                {
                    Some(from) => {
                        let len = (from.total - NET_HDR_LEN).min(scratch.len());
                        from.read_at(NET_HDR_LEN, &mut scratch[..len]);
                        taken.add(len);
                        got += 1;
                        each(&scratch[..len]);
                    }
                    None => bump(&src.counters.tx_dropped_malformed, 1),
                }
                done.push(head, 0);
            }
            src.consume(chains);
            let full = done.is_full();
            src.publish(&mut done);
            // Another snapshot only after a full batch that gave frames.
            if !full || got == before || got >= max {
                break;
            }
        }
        taken.flush(&src.counters.tx_frames, &src.counters.tx_bytes);
        src.signal_used();
        got
    }

    /// Whether the device is active (its queues are lent to the link).
    pub fn connected(&self) -> bool {
        self.shared.dir(1 - self.side).src.is_some() && self.shared.dir(self.side).dst.is_some()
    }

    /// Sleeps until the guest kicks (it transmitted, or posted receive buffers), the device
    /// comes up, or `timeout` passes. The kicks are turned on first and re-checked, so nothing
    /// that arrived before the call is slept through; returns at once when there is something
    /// already.
    pub fn wait(&self, timeout: Duration) {
        let ready = self.transmit_kicks_on() || {
            let mut into = self.shared.dir(self.side);
            into.dst.as_mut().is_some_and(|q| q.notifications(true))
        };
        if !ready {
            self.sleep(timeout);
        }
    }

    /// [`HostPort::wait`] for transmitted frames only: a guest's free receive buffers do not
    /// end it (a host end that sent what it had waits for what comes back).
    pub fn wait_for_frames(&self, timeout: Duration) {
        if !self.transmit_kicks_on() {
            self.sleep(timeout);
        }
    }

    /// Turns the guest's transmit kicks on, and says whether it has frames waiting already.
    fn transmit_kicks_on(&self) -> bool {
        let mut out = self.shared.dir(1 - self.side);
        out.src.as_mut().is_some_and(|q| q.notifications(true))
    }

    /// Sleeps on this end's wake-up until it is signalled or `timeout` passes.
    fn sleep(&self, timeout: Duration) {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.shared.wake[self.side]);
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut poll, 1, ms) };
        let _ = self.shared.wake[self.side].read();
    }
}

impl Drop for HostPort {
    fn drop(&mut self) {
        let side = self.side;
        if self.shared.holder[side].load(Ordering::Acquire) == self.generation {
            self.shared.host[side].store(false, Ordering::Release);
            let _ = self.shared.holder[side].compare_exchange(
                self.generation,
                0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }
}
