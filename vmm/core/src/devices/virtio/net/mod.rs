//! virtio-net (virtio 1.2 §5.1): one receive and one transmit queue, a MAC address, link status,
//! no offloads. Frames travel between the queues and a [`FrameLink`] (a TAP device, a VXLAN socket,
//! one end of a datagram socket pair), or straight into the queues of the device at the other end
//! of an in-process link by memory ([`memlink`]), on one backend thread per device, started when
//! the driver sets DRIVER_OK and stopped when it resets the device or the device is dropped.
//!
//! Every frame carries a 12-byte `virtio_net_hdr_v1` (§5.1.6) ahead of it in the queues; with no
//! offload features negotiated it is all zero on receive (num_buffers = 1) and ignored on
//! transmit. Frames in and out are counted, drops by cause.
//!
//! By concern, as Firecracker splits its `devices/virtio/net/`: [`device`] (the device the
//! transport sees, its configuration space and the backend thread's life), `backend` (the
//! thread's event loop, ring access and interrupts), `rx` and `tx` (the two data paths),
//! [`link`] (where frames go over a file descriptor), [`memlink`] (links by memory),
//! [`counters`] (what the device counts).
//!
//! Owns: the virtio-net device type, its ABI constants and its data path.
//! Must not: lose a received frame without counting it, loop on a ring that lies about its
//! indices, or block anything but its own thread.

mod backend;
pub mod counters;
pub mod device;
mod guest_queue;
// For the fuzz targets (fuzz-harness). Not behind a feature: a feature only the harness enables
// would build vmm-core and everything above it twice in `scripts/test`.
#[doc(hidden)]
pub mod fuzzing;
pub mod link;
pub mod memlink;
mod rx;
mod segments;
mod tx;

#[cfg(test)]
mod memlink_tests;
#[cfg(test)]
mod tests;

pub use counters::{NetCounters, NetStats};
pub use device::Net;
pub use link::{FrameBatch, FrameLink, BATCH};
pub use memlink::{HostPort, MemLinkEnd, MemLinkError};

/// Queue indices (virtio 1.2 §5.1.2: receiveq1 is 0, transmitq1 is 1).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Size we offer for each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1` (virtio 1.2 §5.1.6): flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset (u8, u8, 4 × u16), num_buffers (u16).
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in that header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// VIRTIO_NET_F_MAC (§5.1.3): the device has a MAC address in its configuration.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_STATUS (§5.1.3): the configuration has a link status field.
pub const F_STATUS: u64 = 1 << 16;
/// VIRTIO_NET_S_LINK_UP (§5.1.4).
const S_LINK_UP: u16 = 1;

/// What every Vigil net device offers (the real one and the fuzzing one must not drift apart).
pub(crate) const NET_FEATURES: u64 = crate::devices::virtio::features::VERSION_1
    | crate::devices::virtio::features::RING_EVENT_IDX
    | F_MAC
    | F_STATUS;
/// Receive and transmit queue maxima.
pub(crate) const NET_QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
/// VRING_AVAIL_F_NO_INTERRUPT (§2.7.7): the driver does not want used-buffer interrupts.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Largest frame moved either way: a 64 KiB IP datagram in an Ethernet frame with a VLAN tag.
/// The guest cannot send more without GSO; a host-side MTU above it is cut by the kernel read.
pub const MAX_FRAME: usize = 65_536 + 18;
/// Rounds of "drain, re-enable notifications, re-check" before the backend yields to its other
/// events (it notifies itself to come back).
const MAX_ROUNDS: usize = 8;
