//! The virtio-net device threads' data paths allocate nothing per frame: a counting global
//! allocator around the backend run synchronously (`fuzzing::InlineNet`, the same `Backend` the
//! device thread runs), with frames both ways through a real datagram socket pair (the link kind
//! the benchmark's baseline uses; a TAP's path through the backend is the same code).
//!
//! virtio-queue's `Reader`/`Writer` collected each chain's buffers into a `VecDeque`: one
//! allocation per frame each way, which this test counted before the paths moved to
//! fixed segment lists.

use std::cell::Cell;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_core::devices::virtio::driver::{Buffer, GuestDriver};
use vmm_core::devices::virtio::mmio::MmioTransport;
use vmm_core::devices::virtio::mmio::QueueRings;
use vmm_core::devices::virtio::net::fuzzing::InlineNet;
use vmm_core::devices::virtio::net::{NET_HDR_LEN, RX_QUEUE, TX_QUEUE};
use vmm_core::devices::virtio::status;

struct CountingAlloc;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; the count is a
// const-initialised thread-local without a destructor, which never allocates.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract for `layout` is the system allocator's.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from `alloc` above, i.e. from the system allocator.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: CountingAlloc = CountingAlloc;

/// Allocations this thread makes while `f` runs.
fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(|n| n.get());
    f();
    ALLOCATIONS.with(|n| n.get()) - before
}

const RAM: usize = 4 << 20;
const DATA: u64 = 0x10_0000;
const QSIZE: u16 = 64;
const FRAMES: u64 = 32;

fn frame(tag: u8) -> Vec<u8> {
    let mut f = vec![tag; 60];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f
}

#[test]
fn frames_cross_the_device_both_ways_without_an_allocation_per_frame() {
    let (link, outside) = UnixDatagram::pair().unwrap();
    link.set_nonblocking(true).unwrap();
    outside.set_nonblocking(true).unwrap();
    let mem = vmm_core::anonymous_memory(RAM, true).unwrap();
    let net = InlineNet::new(Box::new(link), [0x52, 0x54, 0, 0, 0, 1]);
    let device = net.handle();
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(mem.clone(), Box::new(net)).unwrap(),
    ));
    let mut driver = GuestDriver::new(mem.clone(), transport);
    let s = driver.init(
        u64::MAX,
        &[
            QueueRings::at(0x1_0000, QSIZE),
            QueueRings::at(0x2_0000, QSIZE),
        ],
    );
    assert_ne!(s & status::DRIVER_OK, 0, "status {s:#x}");

    // Transmit: a header and the frame in one descriptor each, FRAMES + 1 of them (the first
    // warms whatever the path sets up once).
    let transmit = |driver: &mut GuestDriver, i: u64| {
        let at = DATA + i * 0x1000;
        mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(at))
            .unwrap();
        mem.write_slice(&frame(i as u8), GuestAddress(at + 0x100))
            .unwrap();
        driver.publish(
            TX_QUEUE,
            &[
                Buffer {
                    addr: at,
                    len: NET_HDR_LEN as u32,
                    device_writes: false,
                },
                Buffer {
                    addr: at + 0x100,
                    len: 60,
                    device_writes: false,
                },
            ],
        );
    };
    transmit(&mut driver, 0);
    device.process_tx();
    for i in 1..=FRAMES {
        transmit(&mut driver, i);
    }
    assert_eq!(allocations(|| device.process_tx()), 0, "transmit");
    let mut got = [0u8; 2048];
    for i in 0..=FRAMES {
        let n = outside.recv(&mut got).unwrap();
        assert_eq!(&got[..n], frame(i as u8).as_slice());
    }

    // Receive: buffers posted, frames waiting on the link, one warm-up frame first.
    let post = |driver: &mut GuestDriver, i: u64| {
        driver.publish(
            RX_QUEUE,
            &[Buffer {
                addr: DATA + 0x10_0000 + i * 0x1000,
                len: 2048,
                device_writes: true,
            }],
        );
    };
    post(&mut driver, 0);
    outside.send(&frame(0xa0)).unwrap();
    device.process_rx();
    for i in 1..=FRAMES {
        post(&mut driver, i);
        outside.send(&frame(0xa0 + i as u8)).unwrap();
    }
    assert_eq!(allocations(|| device.process_rx()), 0, "receive");
    let stats = device.stats();
    assert_eq!((stats.tx_frames, stats.rx_frames), (FRAMES + 1, FRAMES + 1));
    let mut last = [0u8; 60];
    mem.read_slice(
        &mut last,
        GuestAddress(DATA + 0x10_0000 + FRAMES * 0x1000 + NET_HDR_LEN as u64),
    )
    .unwrap();
    assert_eq!(last.as_slice(), frame(0xa0 + FRAMES as u8).as_slice());
}
