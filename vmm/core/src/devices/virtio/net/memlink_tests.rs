//! Tests of in-process links by memory: two devices (each with its own guest memory, driven by
//! the `driver` rig as a guest would), or a device and a host port.

use super::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::devices::virtio::driver::{wait_until, Buffer, GuestDriver};
use crate::devices::virtio::features;
use crate::devices::virtio::mmio::QueueRings;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::status;
use crate::write_trap::DeviceWrites;

const RAM: u64 = 4 << 20;
const QSIZE: u16 = 16;
const DATA: u64 = 0x10_0000;
const WAIT: Duration = Duration::from_secs(10);
/// VRING_USED_F_NO_NOTIFY.
const NO_NOTIFY: u16 = 1;

struct Guest {
    mem: GuestMemoryMmap,
    driver: GuestDriver,
    counters: Arc<NetCounters>,
}

fn guest(end: MemLinkEnd, features: u64) -> Guest {
    guest_with(end, features, DeviceWrites::default())
}

/// A guest whose device keeps its writes off the pages `writes` guards (its write traps).
fn guest_with(end: MemLinkEnd, features: u64, writes: DeviceWrites) -> Guest {
    let mem = crate::anonymous_memory(RAM as usize, true).unwrap();
    let net = Net::with_memory_link(end, [0x52, 0x54, 0, 0, 0, 1]);
    let counters = net.counters();
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(mem.clone(), Box::new(net))
            .unwrap()
            .with_device_writes(writes),
    ));
    let mut driver = GuestDriver::new(mem.clone(), transport);
    let s = driver.init(
        features,
        &[
            QueueRings::at(0x1_0000, QSIZE),
            QueueRings::at(0x2_0000, QSIZE),
        ],
    );
    assert_ne!(s & status::DRIVER_OK, 0, "status {s:#x}");
    Guest {
        mem,
        driver,
        counters,
    }
}

fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f
}

impl Guest {
    /// Posts receive buffers `first..first + n` (2 KiB each, at DATA + 64 KiB + i * 4 KiB).
    fn post_rx(&mut self, first: u64, n: u64) {
        for i in first..first + n {
            self.driver.publish(
                RX_QUEUE,
                &[Buffer {
                    addr: DATA + 0x1_0000 + i * 0x1000,
                    len: 2048,
                    device_writes: true,
                }],
            );
        }
        self.driver.notify(RX_QUEUE);
    }

    /// Transmits `f` as a header descriptor and two data descriptors (layout is free).
    fn transmit(&mut self, slot: u64, f: &[u8]) {
        let at = DATA + slot * 0x1000;
        self.mem
            .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(at))
            .unwrap();
        let half = f.len() / 2;
        self.mem
            .write_slice(&f[..half], GuestAddress(at + 0x100))
            .unwrap();
        self.mem
            .write_slice(&f[half..], GuestAddress(at + 0x800))
            .unwrap();
        let buffers = [
            Buffer {
                addr: at,
                len: NET_HDR_LEN as u32,
                device_writes: false,
            },
            Buffer {
                addr: at + 0x100,
                len: half as u32,
                device_writes: false,
            },
            Buffer {
                addr: at + 0x800,
                len: (f.len() - half) as u32,
                device_writes: false,
            },
        ];
        self.driver.publish(TX_QUEUE, &buffers);
        self.driver.notify(TX_QUEUE);
    }

    /// The frame in receive buffer `i`, after its 12-byte header (checked).
    fn received(&self, i: u64, len: usize) -> Vec<u8> {
        let mut got = vec![0u8; NET_HDR_LEN + len];
        self.mem
            .read_slice(&mut got, GuestAddress(DATA + 0x1_0000 + i * 0x1000))
            .unwrap();
        assert_eq!(&got[..10], &[0; 10]);
        assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
        got.split_off(NET_HDR_LEN)
    }

    fn used_flags(&self, queue: usize) -> u16 {
        let used = QueueRings::at(0x1_0000 * (queue as u64 + 1), QSIZE).used;
        self.mem.read_obj(GuestAddress(used)).unwrap()
    }
}

#[test]
fn a_frame_crosses_into_the_peers_buffer_with_one_copy_and_a_zero_header() {
    for features in [u64::MAX, features::VERSION_1] {
        let (a_end, b_end) = MemLinkEnd::pair().unwrap();
        let mut a = guest(a_end, features);
        let mut b = guest(b_end, features);
        b.post_rx(0, 1);
        let f = frame(300, 0xab);
        a.transmit(0, &f);
        assert!(b.driver.wait_used(RX_QUEUE, 1, WAIT));
        assert_eq!(
            b.driver.take_used(RX_QUEUE)[0].1 as usize,
            NET_HDR_LEN + 300
        );
        assert_eq!(b.received(0, 300), f);
        assert!(a.driver.wait_used(TX_QUEUE, 1, WAIT));
        assert_eq!(a.driver.take_used(TX_QUEUE)[0].1, 0);
        let (sa, sb) = (a.counters.snapshot(), b.counters.snapshot());
        assert_eq!((sa.tx_frames, sa.tx_bytes), (1, 300));
        assert_eq!((sb.rx_frames, sb.rx_bytes), (1, 300));
        // And back the other way.
        a.post_rx(0, 1);
        b.transmit(1, &frame(60, 0x5a));
        assert!(a.driver.wait_used(RX_QUEUE, 1, WAIT));
        assert_eq!(a.received(0, 60), frame(60, 0x5a));
    }
}

/// Whether the VMM's dirty bitmap of `mem` (one region) marks the page holding `at`.
fn dirty(mem: &GuestMemoryMmap, at: u64) -> bool {
    use vm_memory::bitmap::Bitmap;
    let mapping: &vm_memory::MmapRegion<_> = mem.iter().next().unwrap();
    mapping.bitmap().dirty_at(at as usize)
}

fn clear_dirty(mem: &GuestMemoryMmap) {
    let mapping: &vm_memory::MmapRegion<_> = mem.iter().next().unwrap();
    mapping.bitmap().as_ref().unwrap().reset();
}

#[test]
fn what_the_link_writes_into_a_guest_is_marked_dirty_for_a_migration() {
    // The link writes guest memory through host pointers, not vm-memory's accessors: the
    // buffer it fills and both used rings must still reach a migration's dirty log.
    let (a_end, b_end) = MemLinkEnd::pair().unwrap();
    let mut a = guest(a_end, u64::MAX);
    let mut b = guest(b_end, u64::MAX);
    b.post_rx(0, 1);
    let (rx_buffer, rx_used) = (DATA + 0x1_0000, QueueRings::at(0x1_0000, QSIZE).used);
    let tx_used = QueueRings::at(0x2_0000, QSIZE).used;
    clear_dirty(&b.mem);
    assert!(!dirty(&b.mem, rx_buffer) && !dirty(&b.mem, rx_used));
    a.transmit(0, &frame(200, 0x11));
    clear_dirty(&a.mem);
    assert!(b.driver.wait_used(RX_QUEUE, 1, WAIT));
    assert!(a.driver.wait_used(TX_QUEUE, 1, WAIT));
    assert!(
        dirty(&b.mem, rx_buffer),
        "the receive buffer the frame landed in"
    );
    assert!(dirty(&b.mem, rx_used), "the receiver's used ring");
    assert!(
        !dirty(&b.mem, DATA + 0x1_0000 + 0x4000),
        "a buffer never posted"
    );
    assert!(dirty(&a.mem, tx_used), "the sender's used ring");
    assert!(!dirty(&a.mem, DATA), "the sender's buffer is only read");
}

#[test]
fn frames_wait_in_the_senders_ring_until_buffers_come_and_arrive_in_order() {
    // Without EVENT_IDX, so the kicks are the used rings' flags (visible to the test).
    let (a_end, b_end) = MemLinkEnd::pair().unwrap();
    let mut a = guest(a_end, features::VERSION_1);
    let mut b = guest(b_end, features::VERSION_1);
    for tag in 1..=3u8 {
        a.transmit(u64::from(tag), &frame(64 + usize::from(tag), tag));
    }
    // Nothing to receive into: the frames stay in A's ring (not completed, not lost), and the
    // pump turned B's receive kicks on to hear about buffers.
    assert!(wait_until(WAIT, || b.used_flags(RX_QUEUE) & NO_NOTIFY == 0
        && a.used_flags(TX_QUEUE) & NO_NOTIFY != 0));
    assert_eq!(a.driver.used_idx(TX_QUEUE), 0);
    // One buffer to spare, so the pump stops on an empty source.
    b.post_rx(0, 4);
    assert!(b.driver.wait_used(RX_QUEUE, 3, WAIT));
    for (i, (_, len)) in b.driver.take_used(RX_QUEUE).into_iter().enumerate() {
        let tag = i as u8 + 1;
        assert_eq!(len as usize, NET_HDR_LEN + 64 + usize::from(tag));
        assert_eq!(
            b.received(i as u64, 64 + usize::from(tag)),
            frame(64 + usize::from(tag), tag)
        );
    }
    assert!(a.driver.wait_used(TX_QUEUE, 3, WAIT));
    // Source empty now: its kicks are on again, the receiver's off (buffers are no news).
    assert!(wait_until(WAIT, || a.used_flags(TX_QUEUE) & NO_NOTIFY == 0
        && b.used_flags(RX_QUEUE) & NO_NOTIFY != 0));
    assert_eq!(b.counters.snapshot().rx_frames, 3);
    assert_eq!(a.counters.snapshot().tx_link_errors, 0);
}

#[test]
fn hostile_chains_are_counted_and_never_copied() {
    let (a_end, b_end) = MemLinkEnd::pair().unwrap();
    let mut a = guest(a_end, u64::MAX);
    let mut b = guest(b_end, u64::MAX);
    // B's first buffer lies outside its memory, its second is too small for what comes.
    b.driver.publish(
        RX_QUEUE,
        &[Buffer {
            addr: RAM + 0x1000,
            len: 2048,
            device_writes: true,
        }],
    );
    b.driver.publish(
        RX_QUEUE,
        &[Buffer {
            addr: DATA + 0x1_0000,
            len: (NET_HDR_LEN + 100) as u32,
            device_writes: true,
        }],
    );
    b.driver.notify(RX_QUEUE);
    // A's first chain lies outside its memory: dropped, counted; the next is too big for B's
    // buffer: dropped at B, the buffer kept; the third fits.
    a.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: RAM - 8,
            len: 64,
            device_writes: false,
        }],
    );
    a.driver.notify(TX_QUEUE);
    a.transmit(1, &frame(200, 1));
    a.transmit(2, &frame(50, 2));
    assert!(a.driver.wait_used(TX_QUEUE, 3, WAIT));
    assert!(b.driver.wait_used(RX_QUEUE, 2, WAIT));
    let used = b.driver.take_used(RX_QUEUE);
    assert_eq!(used[0].1, 0, "the buffer outside memory comes back empty");
    assert_eq!(used[1].1 as usize, NET_HDR_LEN + 50);
    assert_eq!(b.received(0, 50), frame(50, 2));
    let (sa, sb) = (a.counters.snapshot(), b.counters.snapshot());
    assert_eq!((sa.tx_dropped_malformed, sa.tx_frames), (1, 1));
    assert_eq!(
        (sb.rx_bad_buffers, sb.rx_dropped_too_big, sb.rx_frames),
        (1, 1, 1)
    );
}

#[test]
fn a_reset_takes_the_queues_back_and_counts_the_frames_that_waited_for_it() {
    let (a_end, b_end) = MemLinkEnd::pair().unwrap();
    let mut a = guest(a_end, u64::MAX);
    let b = guest(b_end.clone(), u64::MAX);
    // B goes away (its driver resets it): after that the link holds none of B's queues, and
    // what A sends toward it completes as link errors.
    b.driver.write_reg(reg::STATUS, 0);
    assert!(b_end.shared.dir(1).src.is_none() && b_end.shared.dir(0).dst.is_none());
    a.transmit(0, &frame(60, 1));
    a.transmit(1, &frame(60, 2));
    assert!(a.driver.wait_used(TX_QUEUE, 2, WAIT));
    assert_eq!(a.counters.snapshot().tx_link_errors, 2);
    assert_eq!(b.counters.snapshot().rx_frames, 0);
    drop(b);
    // The side is free again: a new device on it receives.
    let mut c = guest(b_end, u64::MAX);
    c.post_rx(0, 1);
    a.transmit(2, &frame(70, 3));
    assert!(c.driver.wait_used(RX_QUEUE, 1, WAIT));
    assert_eq!(c.received(0, 70), frame(70, 3));
}

#[test]
fn a_host_port_writes_and_reads_the_guest_queues_directly() {
    let (host, end) = MemLinkEnd::host_pair().unwrap();
    assert_eq!(host.send([frame(60, 0).as_slice()]), 0, "no device yet");
    let mut g = guest(end.clone(), features::VERSION_1);
    assert!(host.connected());
    g.post_rx(0, 2);
    // The guest posted two buffers: two of three frames are taken, the third waits.
    let frames = [frame(60, 1), frame(61, 2), frame(62, 3)];
    assert!(wait_until(WAIT, || {
        // The device thread may still be starting; the queues are lent at activation.
        host.send(frames.iter().map(|f| f.as_slice())) > 0
    }));
    assert!(g.driver.wait_used(RX_QUEUE, 2, WAIT));
    assert_eq!(g.received(0, 60), frames[0]);
    assert_eq!(g.received(1, 61), frames[1]);
    g.transmit(0, &frame(90, 9));
    g.transmit(1, &frame(91, 8));
    let mut scratch = [0u8; 2048];
    let mut got = Vec::new();
    assert!(wait_until(WAIT, || {
        host.recv(8, &mut scratch, |f| got.push(f.to_vec()));
        got.len() == 2
    }));
    assert_eq!(got, vec![frame(90, 9), frame(91, 8)]);
    assert!(g.driver.wait_used(TX_QUEUE, 2, WAIT));
    // The host polls with the guest's kicks off; `wait` turns them on.
    assert_ne!(g.used_flags(TX_QUEUE) & NO_NOTIFY, 0);
    host.wait(Duration::from_millis(1));
    assert_eq!(g.used_flags(TX_QUEUE) & NO_NOTIFY, 0);
    // A frame sent "as the device" lands in the host's view only through the guest: the host
    // end's `send_frame` path is the device end's (announcements go to the peer's queue).
    assert!(
        end.send_frame(&frame(60, 0)).is_err(),
        "the host side has no receive queue"
    );
    let s = g.counters.snapshot();
    assert_eq!((s.rx_frames, s.tx_frames), (2, 2));
}

#[test]
fn a_host_end_waiting_for_its_device_wakes_when_the_device_comes_up() {
    let (host, end) = MemLinkEnd::host_pair().unwrap();
    let host = Arc::new(host);
    // Nothing to send to and nothing sent: only the device's activation can end this wait
    // before its 30 s (the wake-up is an eventfd count: one made before the poll is kept).
    let waiter = {
        let host = host.clone();
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            host.wait(Duration::from_secs(30));
            started.elapsed()
        })
    };
    let _g = guest(end, features::VERSION_1);
    let waited = waiter.join().unwrap();
    assert!(waited < Duration::from_secs(10), "woke after {waited:?}");
    assert!(host.connected());
}

#[test]
fn no_frame_is_written_into_a_receive_buffer_on_a_page_the_write_traps_guard() {
    // A root guest posting a receive buffer on its own hooked kernel text: the device would
    // write a frame of the sender's choosing there, past the read-only memslot. Buffer 1 (at
    // DATA + 64 KiB + 4 KiB) lies on a guarded page.
    let guarded = DATA + 0x1_0000 + 0x1000;
    for host_end in [true, false] {
        let (a_end, b_end) = if host_end {
            let (host, end) = MemLinkEnd::host_pair().unwrap();
            (Err(host), end)
        } else {
            let (a, b) = MemLinkEnd::pair().unwrap();
            (Ok(a), b)
        };
        let mut g = guest_with(
            b_end,
            features::VERSION_1,
            DeviceWrites::guarding(&[guarded]),
        );
        g.mem
            .write_slice(&[0xcc; 4096], GuestAddress(guarded))
            .unwrap();
        g.post_rx(0, 3);
        let frames = [frame(60, 1), frame(61, 2)];
        match a_end {
            Err(host) => assert!(wait_until(WAIT, || {
                host.send(frames.iter().map(|f| f.as_slice())) == 2
            })),
            Ok(a_end) => {
                let mut a = guest(a_end, features::VERSION_1);
                a.transmit(0, &frames[0]);
                a.transmit(1, &frames[1]);
                assert!(a.driver.wait_used(TX_QUEUE, 2, WAIT));
            }
        }
        assert!(g.driver.wait_used(RX_QUEUE, 3, WAIT));
        let used = g.driver.take_used(RX_QUEUE);
        assert_eq!(
            used,
            vec![
                (0, (NET_HDR_LEN + 60) as u32),
                (1, 0),
                (2, (NET_HDR_LEN + 61) as u32)
            ],
            "the guarded buffer is returned empty, the frame goes to the next one"
        );
        assert_eq!(g.received(0, 60), frames[0]);
        assert_eq!(g.received(2, 61), frames[1]);
        let mut page = vec![0u8; 4096];
        g.mem.read_slice(&mut page, GuestAddress(guarded)).unwrap();
        assert!(
            page.iter().all(|&b| b == 0xcc),
            "the guarded page is untouched"
        );
        let s = g.counters.snapshot();
        assert_eq!((s.rx_bad_buffers, s.rx_frames), (1, 2));
    }
}
