//! Tests of the whole device through its transport, driven as a guest driver would (the
//! `driver` rig), with one end of a datagram socket pair as the link.

use super::*;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::driver::{wait_until, Buffer, GuestDriver};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::mmio::QueueRings;
use crate::devices::virtio::status;
use crate::devices::virtio::{features, interrupt};
use crate::write_trap::DeviceWrites;
use std::sync::Mutex;
use std::time::Duration;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const RAM: u64 = 4 << 20;
const QSIZE: u16 = 16;
const DATA: u64 = 0x10_0000;
const WAIT: Duration = Duration::from_secs(10);

struct Rig {
    mem: GuestMemoryMmap,
    driver: GuestDriver,
    transport: Arc<Mutex<MmioTransport>>,
    counters: Arc<NetCounters>,
    peer: UnixDatagram,
}

fn rig(features: u64) -> Rig {
    rig_with(features, DeviceWrites::default())
}

/// A rig whose device keeps its writes off the pages `writes` guards (its write traps).
fn rig_with(features: u64, writes: DeviceWrites) -> Rig {
    let mem = crate::anonymous_memory(RAM as usize, true).unwrap();
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let net = Net::new(Box::new(ours), MAC);
    let counters = net.counters();
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(mem.clone(), Box::new(net))
            .unwrap()
            .with_device_writes(writes),
    ));
    let mut driver = GuestDriver::new(mem.clone(), transport.clone());
    let s = driver.init(
        features,
        &[
            QueueRings::at(0x1_0000, QSIZE),
            QueueRings::at(0x2_0000, QSIZE),
        ],
    );
    assert_ne!(s & status::DRIVER_OK, 0, "status {s:#x}");
    assert_eq!(s & status::DEVICE_NEEDS_RESET, 0);
    peer.set_read_timeout(Some(WAIT)).unwrap();
    Rig {
        mem,
        driver,
        transport,
        counters,
        peer,
    }
}

fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&MAC);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f
}

fn all_features() -> u64 {
    u64::MAX
}

#[test]
fn configuration_space_has_mac_and_link_up() {
    let r = rig(all_features());
    assert_eq!(r.driver.read_config(0, 6), MAC);
    assert_eq!(r.driver.read_config(6, 2), vec![1, 0]);
    assert_eq!(r.driver.read_config(8, 4), vec![0; 4]);
    assert_eq!(
        r.driver
            .read_reg(crate::devices::virtio::mmio::reg::DEVICE_ID),
        1
    );
}

#[test]
fn transmitted_chain_becomes_one_frame_on_the_link() {
    for features in [all_features(), features::VERSION_1] {
        let mut r = rig(features);
        let f = frame(300, 0xab);
        // Header and the first bytes in one descriptor, the rest in another: layout is free
        // with VERSION_1.
        r.mem
            .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(DATA))
            .unwrap();
        r.mem
            .write_slice(&f[..100], GuestAddress(DATA + 12))
            .unwrap();
        r.mem
            .write_slice(&f[100..], GuestAddress(DATA + 0x1000))
            .unwrap();
        let head = r.driver.publish(
            TX_QUEUE,
            &[
                Buffer {
                    addr: DATA,
                    len: 112,
                    device_writes: false,
                },
                Buffer {
                    addr: DATA + 0x1000,
                    len: 200,
                    device_writes: false,
                },
            ],
        );
        r.driver.notify(TX_QUEUE);
        let mut got = vec![0u8; 2048];
        let n = r.peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        assert!(r.driver.wait_used(TX_QUEUE, 1, WAIT));
        assert_eq!(r.driver.take_used(TX_QUEUE), vec![(u32::from(head), 0)]);
        let s = r.counters.snapshot();
        assert_eq!((s.tx_frames, s.tx_bytes), (1, 300));
        assert!(wait_until(WAIT, || r
            .transport
            .lock()
            .unwrap()
            .interrupt()
            .raised()
            >= 1));
        assert_eq!(
            r.transport.lock().unwrap().interrupt().status() & interrupt::USED_BUFFER,
            1
        );
    }
}

#[test]
fn frame_from_the_link_lands_in_a_receive_buffer_with_a_zero_header() {
    let mut r = rig(all_features());
    let head = r.driver.publish(
        RX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: 1526,
            device_writes: true,
        }],
    );
    r.driver.notify(RX_QUEUE);
    let f = frame(60, 0x11);
    r.peer.send(&f).unwrap();
    assert!(r.driver.wait_used(RX_QUEUE, 1, WAIT));
    assert_eq!(
        r.driver.take_used(RX_QUEUE),
        vec![(u32::from(head), (NET_HDR_LEN + 60) as u32)]
    );
    let mut got = vec![0u8; NET_HDR_LEN + 60];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got[..10], &[0; 10]);
    assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
    assert_eq!(&got[12..], &f[..]);
    let s = r.counters.snapshot();
    assert_eq!((s.rx_frames, s.rx_bytes), (1, 60));
}

#[test]
fn frames_wait_for_buffers_and_arrive_in_order() {
    let mut r = rig(all_features());
    for tag in 1..=3u8 {
        r.peer.send(&frame(64 + usize::from(tag), tag)).unwrap();
    }
    assert!(wait_until(WAIT, || r
        .counters
        .snapshot()
        .rx_waits_for_buffers
        >= 1));
    for i in 0..3u64 {
        r.driver.publish(
            RX_QUEUE,
            &[Buffer {
                addr: DATA + i * 0x1000,
                len: 2048,
                device_writes: true,
            }],
        );
        r.driver.notify(RX_QUEUE);
        assert!(r.driver.wait_used(RX_QUEUE, 1, WAIT));
        let used = r.driver.take_used(RX_QUEUE);
        assert_eq!(used.len(), 1);
        let tag = i as u8 + 1;
        assert_eq!(used[0].1 as usize, NET_HDR_LEN + 64 + usize::from(tag));
        let mut byte = [0u8];
        r.mem
            .read_slice(&mut byte, GuestAddress(DATA + i * 0x1000 + 12 + 20))
            .unwrap();
        assert_eq!(byte[0], tag);
    }
    let s = r.counters.snapshot();
    assert_eq!(s.rx_frames, 3);
    assert_eq!(s.rx_dropped_too_big, 0);
}

#[test]
fn a_frame_too_big_for_the_buffer_is_dropped_and_counted_and_the_buffer_reused() {
    let mut r = rig(all_features());
    let head = r.driver.publish(
        RX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: (NET_HDR_LEN + 100) as u32,
            device_writes: true,
        }],
    );
    r.driver.notify(RX_QUEUE);
    r.peer.send(&frame(200, 1)).unwrap();
    r.peer.send(&frame(50, 2)).unwrap();
    assert!(r.driver.wait_used(RX_QUEUE, 1, WAIT));
    assert_eq!(
        r.driver.take_used(RX_QUEUE),
        vec![(u32::from(head), (NET_HDR_LEN + 50) as u32)]
    );
    let s = r.counters.snapshot();
    assert_eq!((s.rx_dropped_too_big, s.rx_frames), (1, 1));
}

#[test]
fn hostile_transmit_chains_are_returned_and_counted() {
    let mut r = rig(all_features());
    // Outside guest RAM; shorter than the header; a self-referencing loop; longer than
    // MAX_FRAME (spread over many descriptors of the same 64 KiB).
    r.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: RAM - 8,
            len: 64,
            device_writes: false,
        }],
    );
    r.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: 4,
            device_writes: false,
        }],
    );
    let head = r.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: 64,
            device_writes: false,
        }],
    );
    r.driver.write_descriptor(TX_QUEUE, head, DATA, 64, 1, head);
    r.driver.publish(
        TX_QUEUE,
        &[
            Buffer {
                addr: DATA,
                len: 0xffff,
                device_writes: false,
            },
            Buffer {
                addr: DATA,
                len: 0xffff,
                device_writes: false,
            },
        ],
    );
    r.driver.notify(TX_QUEUE);
    assert!(r.driver.wait_used(TX_QUEUE, 4, WAIT));
    assert_eq!(r.driver.take_used(TX_QUEUE).len(), 4);
    let s = r.counters.snapshot();
    assert_eq!(s.tx_dropped_malformed, 3, "{s:?}");
    // The loop is cut at the queue size by virtio-queue: 16 × 64 bytes went out as one frame.
    assert_eq!(s.tx_frames, 1, "{s:?}");
    let mut got = vec![0u8; 4096];
    assert_eq!(
        r.peer.recv(&mut got).unwrap(),
        usize::from(QSIZE) * 64 - NET_HDR_LEN
    );

    // An indirect table (never offered) of 100 zero-length descriptors, then a frame: every
    // descriptor counts against the chain's bound, so it is malformed, not a frame.
    let table = DATA + 0x8000;
    for i in 0..100u16 {
        let (len, flags) = if i == 99 { (92u32, 0u16) } else { (0, 1) };
        let mut raw = Vec::with_capacity(16);
        raw.extend_from_slice(&(DATA + 0x2000).to_le_bytes());
        raw.extend_from_slice(&len.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
        raw.extend_from_slice(&(i + 1).to_le_bytes());
        r.mem
            .write_slice(&raw, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }
    let head = r.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: table,
            len: 1600,
            device_writes: false,
        }],
    );
    r.driver.write_descriptor(TX_QUEUE, head, table, 1600, 4, 0);
    r.driver.notify(TX_QUEUE);
    assert!(r.driver.wait_used(TX_QUEUE, 1, WAIT));
    assert_eq!(r.driver.take_used(TX_QUEUE).len(), 1);
    let s = r.counters.snapshot();
    assert_eq!((s.tx_dropped_malformed, s.tx_frames), (4, 1), "{s:?}");

    // The device still works.
    r.mem
        .write_slice(&frame(80, 9), GuestAddress(DATA + 0x2000 + 12))
        .unwrap();
    r.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: DATA + 0x2000,
            len: 92,
            device_writes: false,
        }],
    );
    r.driver.notify(TX_QUEUE);
    assert_eq!(r.peer.recv(&mut got).unwrap(), 80);
}

#[test]
fn a_lying_available_index_neither_hangs_nor_crashes() {
    let r = rig(all_features());
    r.driver.set_avail_idx(TX_QUEUE, 1000);
    r.driver.notify(TX_QUEUE);
    r.driver.set_avail_idx(RX_QUEUE, 500);
    r.driver.notify(RX_QUEUE);
    r.peer.send(&frame(60, 1)).unwrap();
    assert!(wait_until(WAIT, || r.counters.snapshot().queue_errors >= 2));
    // A reset still stops the thread promptly (the test would hang otherwise).
    r.driver
        .write_reg(crate::devices::virtio::mmio::reg::STATUS, 0);
    assert!(!r.transport.lock().unwrap().is_active());
}

#[test]
fn receive_buffers_outside_memory_are_returned_empty() {
    let mut r = rig(all_features());
    let bad = r.driver.publish(
        RX_QUEUE,
        &[Buffer {
            addr: RAM + 0x1000,
            len: 2048,
            device_writes: true,
        }],
    );
    let good = r.driver.publish(
        RX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: 2048,
            device_writes: true,
        }],
    );
    r.driver.notify(RX_QUEUE);
    r.peer.send(&frame(70, 3)).unwrap();
    assert!(r.driver.wait_used(RX_QUEUE, 2, WAIT));
    assert_eq!(
        r.driver.take_used(RX_QUEUE),
        vec![
            (u32::from(bad), 0),
            (u32::from(good), (NET_HDR_LEN + 70) as u32)
        ]
    );
    assert_eq!(r.counters.snapshot().rx_bad_buffers, 1);
}

#[test]
fn receive_buffers_on_a_page_the_write_traps_guard_are_returned_empty() {
    // A root guest posting a receive buffer across its own hooked kernel text (the TAP and
    // VXLAN device thread's path): the frame must not be written there.
    let guarded = DATA + 0x1000;
    let mut r = rig_with(all_features(), DeviceWrites::guarding(&[guarded]));
    r.mem
        .write_slice(&[0xcc; 4096], GuestAddress(guarded))
        .unwrap();
    let across = r.driver.publish(
        RX_QUEUE,
        &[Buffer {
            addr: guarded - 16,
            len: 2048,
            device_writes: true,
        }],
    );
    let good = r.driver.publish(
        RX_QUEUE,
        &[Buffer {
            addr: DATA + 0x4000,
            len: 2048,
            device_writes: true,
        }],
    );
    r.driver.notify(RX_QUEUE);
    r.peer.send(&frame(70, 3)).unwrap();
    assert!(r.driver.wait_used(RX_QUEUE, 2, WAIT));
    assert_eq!(
        r.driver.take_used(RX_QUEUE),
        vec![
            (u32::from(across), 0),
            (u32::from(good), (NET_HDR_LEN + 70) as u32)
        ]
    );
    let mut page = vec![0u8; 4096];
    r.mem.read_slice(&mut page, GuestAddress(guarded)).unwrap();
    assert!(
        page.iter().all(|&b| b == 0xcc),
        "the guarded page is untouched"
    );
    assert_eq!(r.counters.snapshot().rx_bad_buffers, 1);
}

#[test]
fn interrupts_respect_suppression() {
    // EVENT_IDX: used_event far ahead means "do not interrupt yet".
    let mut r = rig(all_features());
    r.driver.set_used_event(TX_QUEUE, 100);
    r.mem
        .write_slice(&frame(60, 1), GuestAddress(DATA + 12))
        .unwrap();
    r.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: 72,
            device_writes: false,
        }],
    );
    r.driver.notify(TX_QUEUE);
    assert!(r.driver.wait_used(TX_QUEUE, 1, WAIT));
    assert_eq!(r.counters.snapshot().interrupts, 0);
    // used_event = 1: the next used entry (index 1 → 2) crosses it.
    r.driver.take_used(TX_QUEUE);
    r.driver.set_used_event(TX_QUEUE, 1);
    r.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: 72,
            device_writes: false,
        }],
    );
    r.driver.notify(TX_QUEUE);
    assert!(wait_until(WAIT, || r.counters.snapshot().interrupts == 1));

    // Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT.
    let mut r = rig(features::VERSION_1 | F_MAC);
    r.driver.set_avail_flags(TX_QUEUE, 1);
    r.mem
        .write_slice(&frame(60, 1), GuestAddress(DATA + 12))
        .unwrap();
    r.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: 72,
            device_writes: false,
        }],
    );
    r.driver.notify(TX_QUEUE);
    assert!(r.driver.wait_used(TX_QUEUE, 1, WAIT));
    assert_eq!(r.counters.snapshot().interrupts, 0);
    r.driver.set_avail_flags(TX_QUEUE, 0);
    r.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: 72,
            device_writes: false,
        }],
    );
    r.driver.notify(TX_QUEUE);
    assert!(wait_until(WAIT, || r.counters.snapshot().interrupts == 1));
}

/// A polling driver (a micro-VM's) suppresses interrupts and rests in its idle exit: a frame
/// put in its receive ring wakes it through its doorbell instead.
#[test]
fn a_frame_for_a_resting_poller_rings_its_doorbell() {
    let mut r = rig(features::VERSION_1 | F_MAC);
    let bell = Arc::new(crate::idle::IdleDoorbell::default());
    r.transport
        .lock()
        .unwrap()
        .interrupt()
        .set_poller(bell.clone());
    r.driver.set_avail_flags(RX_QUEUE, 1);
    r.driver.publish(
        RX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: 1526,
            device_writes: true,
        }],
    );
    r.driver.notify(RX_QUEUE);
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let resting = bell.clone();
    let vcpu = std::thread::spawn(move || {
        // The first rest records this thread as the poller's.
        resting.rest(Duration::from_millis(1), || false);
        ready_tx.send(()).unwrap();
        let started = std::time::Instant::now();
        resting.rest(Duration::from_secs(30), || false);
        started.elapsed()
    });
    ready.recv().unwrap();
    r.peer.send(&frame(60, 0x22)).unwrap();
    assert!(r.driver.wait_used(RX_QUEUE, 1, WAIT));
    let rested = vcpu.join().unwrap();
    assert!(
        rested < Duration::from_secs(10),
        "the frame did not wake it: {rested:?}"
    );
    assert_eq!(
        r.counters.snapshot().interrupts,
        0,
        "no interrupt: it polls"
    );
}

#[test]
fn reset_gives_the_link_back_and_the_device_runs_again() {
    let mut r = rig(all_features());
    r.driver
        .write_reg(crate::devices::virtio::mmio::reg::STATUS, 0);
    assert!(!r.transport.lock().unwrap().is_active());
    let s = r.driver.init(
        all_features(),
        &[
            QueueRings::at(0x3_0000, QSIZE),
            QueueRings::at(0x4_0000, QSIZE),
        ],
    );
    assert_ne!(s & status::DRIVER_OK, 0);
    r.mem
        .write_slice(&frame(60, 7), GuestAddress(DATA + 12))
        .unwrap();
    r.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: 72,
            device_writes: false,
        }],
    );
    r.driver.notify(TX_QUEUE);
    let mut got = [0u8; 128];
    assert_eq!(r.peer.recv(&mut got).unwrap(), 60);
    assert_eq!(got[20], 7);
}
