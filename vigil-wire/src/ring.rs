//! Shared-memory single-producer/single-consumer verdict ring, and the counters block the
//! micro-VM writes back.
//!
//! The VMM (producer) maps the ring at a reserved guest-physical region and pushes verdict records;
//! the micro-VM (consumer) polls it: no exits on the fast path. Each side treats the other as
//! hostile: everything read from the shared region (header, the other side's index) is validated,
//! and a violation is a typed error, never undefined behaviour.
//!
//! The region is accessed only through `AtomicU64` words. That makes every access race-free in the
//! Rust memory model even if the other side writes concurrently where it must not (a hostile or
//! buggy peer can garble a record, not cause UB); records are copied word by word into private
//! memory before they are parsed.
//!
//! Ring layout (Vigil's ABI, [`RING_VERSION`]; byte offsets, little endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic [`RING_MAGIC`] |
//! | 8 | 4 | layout version |
//! | 12 | 4 | slot size in bytes ([`SLOT_BYTES`]) |
//! | 16 | 8 | capacity in slots (power of two, at most [`MAX_CAPACITY`]) |
//! | 64 | 8 | producer index (free running count of records pushed), own cache line |
//! | 128 | 8 | consumer index (free running count of records popped), own cache line |
//! | 192 | capacity × 64 | slots; record `i` lives in slot `i mod capacity` |
//!
//! Ordering: the producer writes a slot, then stores the producer index with Release; the consumer
//! loads it with Acquire before reading the slot. The consumer stores its index with Release after
//! copying the slot out; the producer loads it with Acquire before overwriting a slot.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::verdict::RECORD_LEN;

/// "VGLRING1", little endian.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"VGLRING1");
/// Version of the ring layout (and of the verdict record it carries).
pub const RING_VERSION: u32 = 1;
/// Size of one slot: one verdict record, one cache line.
pub const SLOT_BYTES: usize = RECORD_LEN;
/// Largest capacity a consumer accepts (bounds the region it will touch: 64 MiB of slots).
pub const MAX_CAPACITY: u64 = 1 << 20;

const WORD: usize = 8;
const SLOT_WORDS: usize = SLOT_BYTES / WORD;
const W_MAGIC: usize = 0;
const W_VERSION_SLOT: usize = 1;
const W_CAPACITY: usize = 2;
const W_PRODUCER: usize = 64 / WORD;
const W_CONSUMER: usize = 128 / WORD;
const W_SLOTS: usize = 192 / WORD;
/// Bytes before the first slot.
pub const RING_HEADER_BYTES: usize = W_SLOTS * WORD;

/// Bytes a ring of `capacity` slots needs.
pub const fn ring_bytes(capacity: u64) -> usize {
    RING_HEADER_BYTES + capacity as usize * SLOT_BYTES
}

/// Errors of the ring and counters block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The region is not 8-byte aligned.
    Misaligned,
    /// The region is shorter than its header claims (or than the header itself).
    RegionTooSmall {
        have: usize,
        need: usize,
    },
    BadMagic(u64),
    BadVersion(u32),
    BadSlotSize(u32),
    /// Capacity zero, not a power of two, or above [`MAX_CAPACITY`].
    BadCapacity(u64),
    /// The ring is full (producer side; retry after the consumer catches up).
    Full,
    /// The other side's index is outside the window the protocol allows: producer ahead of the
    /// consumer by more than the capacity, or behind it.
    IndexCorrupt {
        producer: u64,
        consumer: u64,
    },
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            RingError::Misaligned => write!(f, "shared region is not 8-byte aligned"),
            RingError::RegionTooSmall { have, need } => {
                write!(f, "shared region has {have} bytes, needs {need}")
            }
            RingError::BadMagic(m) => write!(f, "bad magic 0x{m:016x}"),
            RingError::BadVersion(v) => write!(f, "unsupported layout version {v}"),
            RingError::BadSlotSize(s) => write!(f, "unsupported slot size {s}"),
            RingError::BadCapacity(c) => write!(f, "bad ring capacity {c}"),
            RingError::Full => write!(f, "ring full"),
            RingError::IndexCorrupt { producer, consumer } => {
                write!(
                    f,
                    "ring indices corrupt: producer {producer}, consumer {consumer}"
                )
            }
        }
    }
}

/// View a raw shared mapping as atomic words.
///
/// # Safety
/// `ptr` must be valid for reads and writes of `len` bytes for `'a`, and that memory may only be
/// accessed atomically (or by another process/VM) while the returned slice lives.
pub unsafe fn region_from_raw<'a>(ptr: *mut u8, len: usize) -> Result<&'a [AtomicU64], RingError> {
    if !(ptr as usize).is_multiple_of(core::mem::align_of::<AtomicU64>()) {
        return Err(RingError::Misaligned);
    }
    // SAFETY: alignment checked above; validity and exclusivity are the caller's contract.
    Ok(unsafe { core::slice::from_raw_parts(ptr as *const AtomicU64, len / WORD) })
}

fn validate_capacity(capacity: u64) -> Result<(), RingError> {
    if capacity == 0 || !capacity.is_power_of_two() || capacity > MAX_CAPACITY {
        Err(RingError::BadCapacity(capacity))
    } else {
        Ok(())
    }
}

fn check_size(region: &[AtomicU64], need: usize) -> Result<(), RingError> {
    let have = region.len() * WORD;
    if have < need {
        Err(RingError::RegionTooSmall { have, need })
    } else {
        Ok(())
    }
}

/// Format a ring in `region` (producer side, before the consumer attaches). The magic is stored
/// last, with Release, so a consumer that sees it sees a complete header.
pub fn format(region: &[AtomicU64], capacity: u64) -> Result<(), RingError> {
    validate_capacity(capacity)?;
    check_size(region, ring_bytes(capacity))?;
    region[W_MAGIC].store(0, Ordering::Relaxed);
    for w in &region[1..W_SLOTS] {
        w.store(0, Ordering::Relaxed);
    }
    region[W_VERSION_SLOT].store(
        u64::from(RING_VERSION) | ((SLOT_BYTES as u64) << 32),
        Ordering::Relaxed,
    );
    region[W_CAPACITY].store(capacity, Ordering::Relaxed);
    region[W_MAGIC].store(RING_MAGIC, Ordering::Release);
    Ok(())
}

/// Validate the header; returns the capacity.
fn attach(region: &[AtomicU64]) -> Result<u64, RingError> {
    check_size(region, RING_HEADER_BYTES)?;
    let magic = region[W_MAGIC].load(Ordering::Acquire);
    if magic != RING_MAGIC {
        return Err(RingError::BadMagic(magic));
    }
    let vs = region[W_VERSION_SLOT].load(Ordering::Relaxed);
    let version = vs as u32;
    if version != RING_VERSION {
        return Err(RingError::BadVersion(version));
    }
    let slot = (vs >> 32) as u32;
    if slot as usize != SLOT_BYTES {
        return Err(RingError::BadSlotSize(slot));
    }
    let capacity = region[W_CAPACITY].load(Ordering::Relaxed);
    validate_capacity(capacity)?;
    check_size(region, ring_bytes(capacity))?;
    Ok(capacity)
}

/// The producer end (the VMM). Keeps its own copy of the producer index: the shared copy is only
/// ever written, never trusted.
pub struct Producer<'a> {
    region: &'a [AtomicU64],
    capacity: u64,
    tail: u64,
}

impl<'a> Producer<'a> {
    /// Attach to a formatted ring, resuming at the producer index found there.
    pub fn attach(region: &'a [AtomicU64]) -> Result<Producer<'a>, RingError> {
        let capacity = attach(region)?;
        let tail = region[W_PRODUCER].load(Ordering::Relaxed);
        Ok(Producer {
            region,
            capacity,
            tail,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Push one record. `Err(Full)` when the consumer has not freed a slot yet.
    pub fn push(&mut self, record: &[u8; SLOT_BYTES]) -> Result<(), RingError> {
        let consumer = self.region[W_CONSUMER].load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(consumer);
        if used > self.capacity {
            return Err(RingError::IndexCorrupt {
                producer: self.tail,
                consumer,
            });
        }
        if used == self.capacity {
            return Err(RingError::Full);
        }
        let base = W_SLOTS + (self.tail & (self.capacity - 1)) as usize * SLOT_WORDS;
        for (i, chunk) in record.chunks_exact(WORD).enumerate() {
            let mut w = [0u8; WORD];
            w.copy_from_slice(chunk);
            self.region[base + i].store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        self.tail = self.tail.wrapping_add(1);
        self.region[W_PRODUCER].store(self.tail, Ordering::Release);
        Ok(())
    }

    /// The producer index: how many records were ever pushed (wrapping).
    pub fn position(&self) -> u64 {
        self.tail
    }

    /// Records pushed but not yet consumed, as far as the consumer has published.
    pub fn in_flight(&self) -> u64 {
        let consumer = self.region[W_CONSUMER].load(Ordering::Acquire);
        self.tail.wrapping_sub(consumer).min(self.capacity)
    }
}

/// The consumer end (the micro-VM). Keeps its own copy of the consumer index.
pub struct Consumer<'a> {
    region: &'a [AtomicU64],
    capacity: u64,
    head: u64,
}

impl<'a> Consumer<'a> {
    /// Attach to a formatted ring, resuming at the consumer index found there.
    pub fn attach(region: &'a [AtomicU64]) -> Result<Consumer<'a>, RingError> {
        let capacity = attach(region)?;
        let head = region[W_CONSUMER].load(Ordering::Relaxed);
        Ok(Consumer {
            region,
            capacity,
            head,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The consumer index: the ring position of the next record [`pop`](Self::pop) returns.
    pub fn position(&self) -> u64 {
        self.head
    }

    /// Number of records ready, after validating the producer index.
    pub fn available(&self) -> Result<u64, RingError> {
        let producer = self.region[W_PRODUCER].load(Ordering::Acquire);
        let avail = producer.wrapping_sub(self.head);
        if avail > self.capacity {
            return Err(RingError::IndexCorrupt {
                producer,
                consumer: self.head,
            });
        }
        Ok(avail)
    }

    /// Copy the next record into `out`. `Ok(false)` when the ring is empty.
    pub fn pop(&mut self, out: &mut [u8; SLOT_BYTES]) -> Result<bool, RingError> {
        if self.available()? == 0 {
            return Ok(false);
        }
        let base = W_SLOTS + (self.head & (self.capacity - 1)) as usize * SLOT_WORDS;
        for (i, chunk) in out.chunks_exact_mut(WORD).enumerate() {
            chunk.copy_from_slice(&self.region[base + i].load(Ordering::Relaxed).to_le_bytes());
        }
        self.head = self.head.wrapping_add(1);
        self.region[W_CONSUMER].store(self.head, Ordering::Release);
        Ok(true)
    }
}

/// Why the filter dropped a frame. The discriminant is the counter index in the counters block
/// (Vigil's ABI: append only, never renumber).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A header is truncated or inconsistent (lengths, version, header length).
    Malformed = 0,
    /// EtherType neither IPv4, IPv6, ARP nor one 802.1Q tag around them.
    NonIp = 1,
    /// No verdict opens this new flow.
    NoVerdict = 2,
    /// A verdict matched but the conntrack table had no room.
    TableFull = 3,
    /// A TCP segment the tracked state does not allow (mid-stream pick-up, SYN in an established
    /// flow, data after close).
    InvalidTcpState = 4,
    /// IPv4 fragment (the filter does not reassemble; first and later fragments both dropped).
    Fragment = 5,
    /// An IP protocol or IPv6 next header other than TCP, UDP, ICMP (incl. extension headers),
    /// or an IPv4 source route option (loose or strict: the judged destination is only its
    /// first hop).
    UnsupportedProtocol = 6,
    /// Stacked VLAN tags (802.1ad / QinQ).
    VlanStacked = 7,
    /// An ICMP type that is neither echo, an error about a tracked flow, nor neighbour discovery.
    IcmpUnsupported = 8,
    /// The flow's verdict was removed (or its tenant flushed); the flow is closed.
    Revoked = 9,
    /// The frame came from a switch port with no tenant behind it
    /// ([`crate::boot::TENANT_UNASSIGNED`]), or (edge) no tenant owns its cloud-side address,
    /// or (switch) a frame toward a tenant port is not addressed to it: a unicast destination
    /// MAC not the port's, or an IP destination neither the port's address nor a group.
    UnknownTenant = 10,
    /// A TCP segment of a tracked flow whose sequence or acknowledgment number lies outside the
    /// flow's window (blind injection, a blind RST, a stale segment).
    TcpOutOfWindow = 11,
    /// (Edge) a packet from the outside whose source address cannot come from there: a cloud
    /// tenant's address, loopback, unspecified, multicast or broadcast, link-local, IPv4-mapped.
    /// (Switch) a packet from a tenant port whose IP source is not an address attached to it (nor
    /// its EUI-64 link-local, nor the unspecified address of a DHCP discover).
    SpoofedSource = 12,
    /// A new TCP SYN found its tenant's (or the whole table's) half-open entries at their limit
    /// and no entry it may replace.
    HalfOpenLimit = 13,
    /// (Switch) a frame from a tenant port whose Ethernet source (or ARP sender / neighbour
    /// discovery link-layer address) is not the MAC attached to the port.
    SpoofedMac = 14,
    /// (Switch) an ARP or neighbour advertisement from a tenant port claiming an IP address the
    /// tenant does not own (a gratuitous ARP for the gateway, a forged sender); or one from the
    /// uplink binding an address to another MAC than the switch believes (kept from the tenants).
    SpoofedNeighbor = 15,
    /// (Switch) an ARP request or neighbour solicitation from a tenant port for a target the
    /// switch neither answers itself nor lets out (or a reply to a requester it never saw).
    NeighborTarget = 16,
    /// (Switch) an ARP or neighbour discovery frame from a tenant port that is not exactly the
    /// form the protocol needs: wrong length, non-zero padding or reserved bits, extra options,
    /// an unexpected destination.
    NeighborMalformed = 17,
    /// (Edge) an ACK from the outside that opens no tracked flow while the SYN proxy is answering
    /// SYNs, and whose acknowledgment is not a valid SYN cookie: forged, for another 4-tuple, or
    /// older than the cookies' lifetime.
    SynCookieInvalid = 18,
    /// An ICMP error quoting a tracked TCP flow whose quoted sequence number lies outside what
    /// the quoted segment's sender has in flight (a blind ICMP attack, RFC 5927).
    IcmpOutOfWindow = 19,
    /// A new flow of a tenant that already holds its quota of conntrack entries.
    FlowQuota = 20,
    /// (Switch) an ARP or neighbour discovery frame from a tenant port (or a request the switch
    /// would send on its behalf) over the port's budget of neighbour frames to the uplink.
    NeighborRate = 21,
    /// (Switch) a frame from a tenant port with an 802.1Q tag: a tenant sits on an untagged port
    /// (its port is its identity), and a tag it chose would select a VLAN wherever the frame
    /// leaves the cloud (the edge's outside link on a trunk or a VLAN-aware bridge), or its
    /// priority there.
    VlanTagged = 22,
    /// (Switch) a unicast IP packet from a tenant port in a broadcast or multicast Ethernet frame:
    /// no stack sends one, and it would reach every machine on the segments it crosses (the
    /// edge's outside link among them), not only the address its verdict opens. (Edge) the same
    /// from either side: the cloud port floods it to every host.
    UnicastToGroup = 23,
}

impl DropReason {
    /// Number of reasons (size of the per-reason counter array).
    pub const COUNT: usize = 24;
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::Malformed,
        DropReason::NonIp,
        DropReason::NoVerdict,
        DropReason::TableFull,
        DropReason::InvalidTcpState,
        DropReason::Fragment,
        DropReason::UnsupportedProtocol,
        DropReason::VlanStacked,
        DropReason::IcmpUnsupported,
        DropReason::Revoked,
        DropReason::UnknownTenant,
        DropReason::TcpOutOfWindow,
        DropReason::SpoofedSource,
        DropReason::HalfOpenLimit,
        DropReason::SpoofedMac,
        DropReason::SpoofedNeighbor,
        DropReason::NeighborTarget,
        DropReason::NeighborMalformed,
        DropReason::SynCookieInvalid,
        DropReason::IcmpOutOfWindow,
        DropReason::FlowQuota,
        DropReason::NeighborRate,
        DropReason::VlanTagged,
        DropReason::UnicastToGroup,
    ];

    /// Stable name for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NonIp => "non_ip",
            DropReason::NoVerdict => "no_verdict",
            DropReason::TableFull => "table_full",
            DropReason::InvalidTcpState => "invalid_tcp_state",
            DropReason::Fragment => "fragment",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::VlanStacked => "vlan_stacked",
            DropReason::IcmpUnsupported => "icmp_unsupported",
            DropReason::Revoked => "revoked",
            DropReason::UnknownTenant => "unknown_tenant",
            DropReason::TcpOutOfWindow => "tcp_out_of_window",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::HalfOpenLimit => "half_open_limit",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedNeighbor => "spoofed_neighbor",
            DropReason::NeighborTarget => "neighbor_target",
            DropReason::NeighborMalformed => "neighbor_malformed",
            DropReason::SynCookieInvalid => "syn_cookie_invalid",
            DropReason::IcmpOutOfWindow => "icmp_out_of_window",
            DropReason::FlowQuota => "flow_quota",
            DropReason::NeighborRate => "neighbor_rate",
            DropReason::VlanTagged => "vlan_tagged",
            DropReason::UnicastToGroup => "unicast_to_group",
        }
    }
}

/// "VGLCNTR1", little endian.
pub const COUNTERS_MAGIC: u64 = u64::from_le_bytes(*b"VGLCNTR1");
/// 2: a sample of the last out-of-window drop follows the ports ([`SAMPLE_WORDS`]).
pub const COUNTERS_VERSION: u32 = 2;
/// Room reserved for per-reason counters (reasons are appended up to this many).
pub const MAX_REASONS: usize = 32;
/// Most ports a counters block describes.
pub const MAX_PORTS: usize = 256;
/// Global counters other than drops, in this order at word [`W_GLOBAL`].
pub const GLOBAL_FORWARDED: usize = 0;
pub const GLOBAL_ARP: usize = 1;
pub const GLOBAL_VERDICTS_APPLIED: usize = 2;
pub const GLOBAL_VERDICTS_REJECTED: usize = 3;
pub const GLOBAL_FLOWS_ACTIVE: usize = 4;
pub const GLOBAL_FLOWS_CREATED: usize = 5;
/// Flows taken over mid-stream through `Op::Adopt` verdicts (included in flows created).
pub const GLOBAL_FLOWS_ADOPTED: usize = 6;
/// Flows closed because their verdict was removed or their tenant flushed.
pub const GLOBAL_FLOWS_REVOKED: usize = 7;
pub const GLOBAL_COUNT: usize = 8;
/// Per-port counters, in this order.
pub const PORT_RX_FRAMES: usize = 0;
pub const PORT_RX_BYTES: usize = 1;
pub const PORT_FORWARDED: usize = 2;
pub const PORT_DROPPED: usize = 3;
pub const PORT_WORDS: usize = 4;

/// Data-path stage counters (where a frame's time goes and where a lost one went), in this order
/// at word [`W_STAGE`] of the header.
/// Frames dropped because a transmit ring was full (the receiving side did not keep up).
pub const STAGE_TX_RING_FULL: usize = 0;
/// Queue notifications the micro-VM wrote (each one an exit to the VMM).
pub const STAGE_KICKS: usize = 1;
/// TSC cycles spent in packet-loop rounds that moved frames.
pub const STAGE_BUSY_CYCLES: usize = 2;
/// Frames received in those rounds.
pub const STAGE_BUSY_FRAMES: usize = 3;
pub const STAGE_COUNT: usize = 4;

// Counters block layout in words: 0 magic, 1 version | n_ports << 32, 2..6 stage counters,
// 6..8 reserved, 8.. global counters, 16.. drop counters per reason (MAX_REASONS), then PORT_WORDS per port,
// then the out-of-window sample (SAMPLE_WORDS).
const W_STAGE: usize = 2;
const W_GLOBAL: usize = 8;
const _: () = assert!(W_STAGE + STAGE_COUNT <= W_GLOBAL);
const W_DROPS: usize = W_GLOBAL + GLOBAL_COUNT;
const W_PORTS: usize = W_DROPS + MAX_REASONS;
const _: () = assert!(DropReason::COUNT <= MAX_REASONS);

/// Words of the out-of-window sample: the last TCP segment the filter dropped as out of window
/// and the windows it was judged against (the micro-VM's `WindowSample` says what each word
/// holds). Word 0 counts the samples written; a reader that sees it change while it reads tries
/// again.
pub const SAMPLE_WORDS: usize = 12;

/// Bytes a counters block for `ports` ports needs.
pub const fn counters_bytes(ports: usize) -> usize {
    (W_PORTS + ports * PORT_WORDS + SAMPLE_WORDS) * WORD
}

/// The last TCP segment the filter dropped as out of window, with the windows (Rooij's `end`,
/// `maxend`, `maxwin`) of its sender and receiver as they stood: enough to tell an injected
/// segment from a legitimate one the tracker misjudged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowSample {
    /// Out-of-window drops sampled so far (this is the latest).
    pub count: u64,
    /// The TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub flags: u8,
    /// The flow's TCP state byte before the segment.
    pub state: u8,
    /// The segment travelled in the flow's opening direction.
    pub orig: bool,
    pub ipv6: bool,
    pub seq: u32,
    pub ack: u32,
    pub len: u32,
    pub win: u16,
    /// The flow's remote (outside) and local (tenant) ports, and the remote address.
    pub remote_port: u16,
    pub local_port: u16,
    pub remote: [u8; 16],
    /// (end, maxend, maxwin) of the segment's sender and of its receiver.
    pub sender: [u32; 3],
    pub receiver: [u32; 3],
    /// The window-scale nibbles, and a proxied flow's sequence offset.
    pub wscale: u8,
    pub seq_offset: u32,
    pub now_s: u32,
}

impl WindowSample {
    pub fn to_words(&self) -> [u64; SAMPLE_WORDS] {
        let pair = |a: u32, b: u32| u64::from(a) | (u64::from(b) << 32);
        [
            self.count,
            u64::from(self.flags)
                | (u64::from(self.state) << 8)
                | (u64::from(self.orig) << 16)
                | (u64::from(self.ipv6) << 17)
                | (u64::from(self.wscale) << 24)
                | (u64::from(self.now_s) << 32),
            pair(self.seq, self.ack),
            pair(self.len, u32::from(self.win)),
            pair(u32::from(self.remote_port), u32::from(self.local_port)),
            u64::from_le_bytes(self.remote[..8].try_into().unwrap_or([0; 8])),
            u64::from_le_bytes(self.remote[8..].try_into().unwrap_or([0; 8])),
            pair(self.sender[0], self.sender[1]),
            pair(self.sender[2], self.receiver[0]),
            pair(self.receiver[1], self.receiver[2]),
            u64::from(self.seq_offset),
            0,
        ]
    }

    pub fn from_words(w: &[u64; SAMPLE_WORDS]) -> WindowSample {
        let lo = |x: u64| x as u32;
        let hi = |x: u64| (x >> 32) as u32;
        let mut remote = [0u8; 16];
        remote[..8].copy_from_slice(&w[5].to_le_bytes());
        remote[8..].copy_from_slice(&w[6].to_le_bytes());
        WindowSample {
            count: w[0],
            flags: w[1] as u8,
            state: (w[1] >> 8) as u8,
            orig: (w[1] >> 16) & 1 != 0,
            ipv6: (w[1] >> 17) & 1 != 0,
            wscale: (w[1] >> 24) as u8,
            now_s: hi(w[1]),
            seq: lo(w[2]),
            ack: hi(w[2]),
            len: lo(w[3]),
            win: hi(w[3]) as u16,
            remote_port: lo(w[4]) as u16,
            local_port: hi(w[4]) as u16,
            remote,
            sender: [lo(w[7]), hi(w[7]), lo(w[8])],
            receiver: [hi(w[8]), lo(w[9]), hi(w[9])],
            seq_offset: lo(w[10]),
        }
    }
}

const fn w_sample(ports: usize) -> usize {
    W_PORTS + ports * PORT_WORDS
}

/// Layout of the verdict region the VMM reserves for a micro-VM (`BootInfo::verdict_base/size`):
/// the ring of [`VERDICT_RING_CAPACITY`] slots at offset 0, the counters block for
/// [`MAX_COUNTED_PORTS`] ports at [`COUNTERS_OFFSET`] (the next 4 KiB boundary), the outcome log
/// ([`crate::outcome`]) at [`OUTCOMES_OFFSET`], all page aligned so either side can map them
/// separately.
pub const VERDICT_RING_CAPACITY: u64 = 4096;
pub const MAX_COUNTED_PORTS: usize = 16;
pub const COUNTERS_OFFSET: usize = ring_bytes(VERDICT_RING_CAPACITY).next_multiple_of(4096);
pub const OUTCOMES_OFFSET: usize =
    COUNTERS_OFFSET + counters_bytes(MAX_COUNTED_PORTS).next_multiple_of(4096);
pub const VERDICT_REGION_BYTES: usize =
    OUTCOMES_OFFSET + crate::outcome::outcomes_bytes().next_multiple_of(4096);
// Every reason has its counter word inside the block, and the block inside the region.
const _: () = assert!(W_DROPS + DropReason::COUNT <= W_PORTS);
const _: () = assert!(COUNTERS_OFFSET + counters_bytes(MAX_COUNTED_PORTS) <= OUTCOMES_OFFSET);

/// The writer (micro-VM) end of the counters block. Counters are monotonic, single-writer; each
/// word is published with a Relaxed store (a reader wants fresh values, not a consistent snapshot).
pub struct CountersWriter<'a> {
    region: &'a [AtomicU64],
    ports: usize,
}

impl<'a> CountersWriter<'a> {
    /// Format the block (zeroed counters) and return the writer.
    pub fn format(region: &'a [AtomicU64], ports: usize) -> Result<CountersWriter<'a>, RingError> {
        if ports > MAX_PORTS {
            return Err(RingError::RegionTooSmall {
                have: MAX_PORTS,
                need: ports,
            });
        }
        check_size(region, counters_bytes(ports))?;
        region[0].store(0, Ordering::Relaxed);
        for w in &region[1..counters_bytes(ports) / WORD] {
            w.store(0, Ordering::Relaxed);
        }
        region[1].store(
            u64::from(COUNTERS_VERSION) | ((ports as u64) << 32),
            Ordering::Relaxed,
        );
        region[0].store(COUNTERS_MAGIC, Ordering::Release);
        Ok(CountersWriter { region, ports })
    }

    pub fn set_global(&self, which: usize, value: u64) {
        if which < GLOBAL_COUNT {
            self.region[W_GLOBAL + which].store(value, Ordering::Relaxed);
        }
    }

    /// `which` is one of the `STAGE_*` indices; others are ignored.
    pub fn set_stage(&self, which: usize, value: u64) {
        if which < STAGE_COUNT {
            self.region[W_STAGE + which].store(value, Ordering::Relaxed);
        }
    }

    pub fn set_drop(&self, reason: DropReason, value: u64) {
        self.region[W_DROPS + reason as usize].store(value, Ordering::Relaxed);
    }

    /// `which` is one of the `PORT_*` indices; out-of-range ports are ignored.
    pub fn set_port(&self, port: usize, which: usize, value: u64) {
        if port < self.ports && which < PORT_WORDS {
            self.region[W_PORTS + port * PORT_WORDS + which].store(value, Ordering::Relaxed);
        }
    }

    /// Publishes an out-of-window sample; `words[0]` (its count) goes last.
    pub fn set_sample(&self, words: &[u64; SAMPLE_WORDS]) {
        let base = w_sample(self.ports);
        for (i, w) in words.iter().enumerate().skip(1) {
            self.region[base + i].store(*w, Ordering::Relaxed);
        }
        self.region[base].store(words[0], Ordering::Release);
    }
}

/// The reader (VMM) end of the counters block.
pub struct CountersReader<'a> {
    region: &'a [AtomicU64],
    ports: usize,
}

impl<'a> CountersReader<'a> {
    pub fn attach(region: &'a [AtomicU64]) -> Result<CountersReader<'a>, RingError> {
        check_size(region, counters_bytes(0))?;
        let magic = region[0].load(Ordering::Acquire);
        if magic != COUNTERS_MAGIC {
            return Err(RingError::BadMagic(magic));
        }
        let vp = region[1].load(Ordering::Relaxed);
        if vp as u32 != COUNTERS_VERSION {
            return Err(RingError::BadVersion(vp as u32));
        }
        let ports = (vp >> 32) as usize;
        if ports > MAX_PORTS {
            return Err(RingError::RegionTooSmall {
                have: MAX_PORTS,
                need: ports,
            });
        }
        check_size(region, counters_bytes(ports))?;
        Ok(CountersReader { region, ports })
    }

    pub fn ports(&self) -> usize {
        self.ports
    }

    pub fn global(&self, which: usize) -> Option<u64> {
        (which < GLOBAL_COUNT).then(|| self.region[W_GLOBAL + which].load(Ordering::Relaxed))
    }

    pub fn stage(&self, which: usize) -> Option<u64> {
        (which < STAGE_COUNT).then(|| self.region[W_STAGE + which].load(Ordering::Relaxed))
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.region[W_DROPS + reason as usize].load(Ordering::Relaxed)
    }

    pub fn port(&self, port: usize, which: usize) -> Option<u64> {
        (port < self.ports && which < PORT_WORDS)
            .then(|| self.region[W_PORTS + port * PORT_WORDS + which].load(Ordering::Relaxed))
    }

    /// The out-of-window sample, `None` when there is none yet (or it kept changing while read).
    pub fn sample(&self) -> Option<[u64; SAMPLE_WORDS]> {
        let base = w_sample(self.ports);
        for _ in 0..4 {
            let count = self.region[base].load(Ordering::Acquire);
            if count == 0 {
                return None;
            }
            let mut words = [0u64; SAMPLE_WORDS];
            words[0] = count;
            for (i, w) in words.iter_mut().enumerate().skip(1) {
                *w = self.region[base + i].load(Ordering::Relaxed);
            }
            if self.region[base].load(Ordering::Acquire) == count {
                return Some(words);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn a_window_sample_round_trips_through_the_counters_block() {
        let r = region(counters_bytes(2));
        let w = CountersWriter::format(&r, 2).unwrap();
        let rd = CountersReader::attach(&r).unwrap();
        assert_eq!(rd.sample(), None);
        let sample = WindowSample {
            count: 3,
            flags: 0x11,
            state: 5,
            orig: true,
            ipv6: false,
            seq: 0xdead_beef,
            ack: 7,
            len: 1460,
            win: 502,
            remote_port: 40000,
            local_port: 7000,
            remote: [198, 51, 100, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sender: [1, 2, 3],
            receiver: [4, 5, 6],
            wscale: 0x77,
            seq_offset: 99,
            now_s: 12,
        };
        w.set_port(1, PORT_DROPPED, 9);
        w.set_sample(&sample.to_words());
        assert_eq!(
            rd.sample().map(|s| WindowSample::from_words(&s)),
            Some(sample)
        );
        assert_eq!(rd.port(1, PORT_DROPPED), Some(9));
    }

    fn region(bytes: usize) -> Vec<AtomicU64> {
        (0..bytes.div_ceil(WORD))
            .map(|_| AtomicU64::new(0))
            .collect()
    }

    fn record(n: u64) -> [u8; SLOT_BYTES] {
        let mut r = [0u8; SLOT_BYTES];
        for (i, chunk) in r.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&(n.wrapping_mul(31).wrapping_add(i as u64)).to_le_bytes());
        }
        r
    }

    #[test]
    fn layout_offsets() {
        assert_eq!(RING_HEADER_BYTES, 192);
        assert_eq!(ring_bytes(4), 192 + 256);
        assert_eq!(W_PRODUCER * WORD % 64, 0);
        assert_eq!(W_CONSUMER * WORD - W_PRODUCER * WORD, 64);
    }

    #[test]
    fn fill_drain_wrap() {
        let r = region(ring_bytes(4));
        format(&r, 4).unwrap();
        let mut p = Producer::attach(&r).unwrap();
        let mut c = Consumer::attach(&r).unwrap();
        let mut out = [0u8; SLOT_BYTES];
        assert_eq!(c.pop(&mut out), Ok(false));
        let mut next_out = 0u64;
        for n in 0..4 {
            p.push(&record(n)).unwrap();
        }
        assert_eq!(p.push(&record(99)), Err(RingError::Full));
        for round in 4..40u64 {
            assert_eq!(c.pop(&mut out), Ok(true));
            assert_eq!(out, record(next_out));
            next_out += 1;
            p.push(&record(round)).unwrap();
        }
        while c.pop(&mut out).unwrap() {
            assert_eq!(out, record(next_out));
            next_out += 1;
        }
        assert_eq!(next_out, 40);
    }

    #[test]
    fn hostile_header_and_indices() {
        let r = region(ring_bytes(4));
        assert_eq!(Consumer::attach(&r).err(), Some(RingError::BadMagic(0)));
        assert_eq!(format(&r, 3), Err(RingError::BadCapacity(3)));
        assert!(matches!(
            format(&r, 8),
            Err(RingError::RegionTooSmall { .. })
        ));
        format(&r, 4).unwrap();
        // A capacity rewritten to exceed the region is refused at attach.
        r[W_CAPACITY].store(1 << 10, Ordering::Relaxed);
        assert!(matches!(
            Consumer::attach(&r),
            Err(RingError::RegionTooSmall { .. })
        ));
        r[W_CAPACITY].store(4, Ordering::Relaxed);
        let mut c = Consumer::attach(&r).unwrap();
        let mut out = [0u8; SLOT_BYTES];
        // Producer index beyond the capacity window.
        r[W_PRODUCER].store(5, Ordering::Release);
        assert_eq!(
            c.pop(&mut out),
            Err(RingError::IndexCorrupt {
                producer: 5,
                consumer: 0
            })
        );
        // Producer index behind the consumer (wraps to a huge distance).
        r[W_PRODUCER].store(u64::MAX, Ordering::Release);
        assert!(matches!(
            c.pop(&mut out),
            Err(RingError::IndexCorrupt { .. })
        ));
        // A consumer index moved by the peer does not confuse the producer either.
        r[W_PRODUCER].store(0, Ordering::Release);
        let mut p = Producer::attach(&r).unwrap();
        r[W_CONSUMER].store(100, Ordering::Release);
        assert!(matches!(
            p.push(&record(0)),
            Err(RingError::IndexCorrupt { .. })
        ));
    }

    #[test]
    fn misaligned_raw_region() {
        let mut buf = [0u64; 64];
        let ptr = buf.as_mut_ptr() as *mut u8;
        // SAFETY: the buffer outlives the views; offset 1 is refused before any access.
        unsafe {
            assert_eq!(
                region_from_raw(ptr.add(1), 256).err(),
                Some(RingError::Misaligned)
            );
            assert_eq!(region_from_raw(ptr, 256).unwrap().len(), 32);
        }
    }

    #[test]
    fn two_threads() {
        // Enough records to wrap the 64-slot ring ~800 times. The waits yield rather than spin:
        // on an oversubscribed host both threads may share one core.
        const N: u64 = 50_000;
        let r = region(ring_bytes(64));
        format(&r, 64).unwrap();
        std::thread::scope(|s| {
            let rr = &r;
            s.spawn(move || {
                let mut p = Producer::attach(rr).unwrap();
                let mut n = 0;
                while n < N {
                    match p.push(&record(n)) {
                        Ok(()) => n += 1,
                        Err(RingError::Full) => std::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            });
            let mut c = Consumer::attach(&r).unwrap();
            let mut out = [0u8; SLOT_BYTES];
            let mut n = 0;
            while n < N {
                if c.pop(&mut out).unwrap() {
                    assert_eq!(out, record(n), "record {n}");
                    n += 1;
                } else {
                    std::thread::yield_now();
                }
            }
            assert_eq!(c.available(), Ok(0));
        });
    }

    #[test]
    fn counters_roundtrip() {
        let r = region(counters_bytes(3));
        assert!(CountersReader::attach(&r).is_err());
        let w = CountersWriter::format(&r, 3).unwrap();
        w.set_drop(DropReason::NoVerdict, 17);
        w.set_global(GLOBAL_FORWARDED, 5);
        w.set_port(2, PORT_DROPPED, 9);
        w.set_port(3, PORT_DROPPED, 1); // out of range: ignored
        let rd = CountersReader::attach(&r).unwrap();
        assert_eq!(rd.ports(), 3);
        assert_eq!(rd.drops(DropReason::NoVerdict), 17);
        assert_eq!(rd.drops(DropReason::Malformed), 0);
        assert_eq!(rd.global(GLOBAL_FORWARDED), Some(5));
        assert_eq!(rd.port(2, PORT_DROPPED), Some(9));
        assert_eq!(rd.port(3, PORT_DROPPED), None);
        // A hostile port count is refused.
        r[1].store(
            u64::from(COUNTERS_VERSION) | (1000u64 << 32),
            Ordering::Relaxed,
        );
        assert!(CountersReader::attach(&r).is_err());
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
    }

    #[test]
    fn every_reason_has_a_counter_and_a_unique_name() {
        assert_eq!(DropReason::UnknownTenant as usize, 10);
        assert_eq!(DropReason::UnknownTenant.name(), "unknown_tenant");
        let r = region(VERDICT_REGION_BYTES - COUNTERS_OFFSET);
        let w = CountersWriter::format(&r, MAX_COUNTED_PORTS).unwrap();
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            w.set_drop(*reason, 100 + i as u64);
            for other in &DropReason::ALL[..i] {
                assert_ne!(reason.name(), other.name());
            }
        }
        w.set_port(MAX_COUNTED_PORTS - 1, PORT_DROPPED, 5);
        let rd = CountersReader::attach(&r).unwrap();
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(rd.drops(*reason), 100 + i as u64);
        }
        assert_eq!(rd.port(MAX_COUNTED_PORTS - 1, PORT_DROPPED), Some(5));
        assert_eq!(rd.port(0, PORT_RX_FRAMES), Some(0));
    }
}
