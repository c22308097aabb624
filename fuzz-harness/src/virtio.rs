//! A virtio-net device (virtio-mmio transport and both data paths) under a hostile driver: the
//! guest writes any register, any descriptor, any available ring, and notifies when it likes.
//! The data paths run inline ([`vmm_core::devices::virtio::net::fuzzing`]), the same code the
//! device thread runs, so each input is one deterministic run; the link is a datagram socket
//! pair whose other end plays the network.
//!
//! Input: a configuration byte (bit 0: run the driver's normal initialisation first; bit 1: with
//! EVENT_IDX; bits 2-3: queue size 2, 4, 8 or 16), then operations until the input ends:
//! - `0` register write (register byte ×4, u32 value); `1` register read (register byte ×4, width
//!   1, 2, 4 or 8);
//! - `2` guest memory write (u16 address, length byte, bytes);
//! - `3` descriptor (queue bit and index byte, u16 address, u16 length, flags byte, next byte) in
//!   the layout of the normal initialisation; `4` publish a head (queue, head byte) in its
//!   available ring, or (bit 7) set the available index to a u16;
//! - `5` notify the transmit queue; `6` a frame from the network (u16 length, bytes), then the
//!   receive path runs; `7` the receive path runs alone.
//!
//! Invariants: every frame the device counts as sent reached the network, none longer than the
//! device's maximum.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_core::devices::virtio::mmio::QueueRings;
use vmm_core::devices::virtio::mmio::{reg, MmioTransport};
use vmm_core::devices::virtio::net::fuzzing::InlineNet;
use vmm_core::devices::virtio::net::{MAX_FRAME, TX_QUEUE};
use vmm_core::devices::virtio::{features, status};
use vmm_core::devices::MmioDevice;
use vmm_core::GuestMemoryMmap;

use crate::Input;

const RAM: usize = 64 << 10;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

struct Driver {
    mem: GuestMemoryMmap,
    transport: Arc<Mutex<MmioTransport>>,
    layouts: [QueueRings; 2],
    avail_idx: [u16; 2],
}

impl Driver {
    fn write(&self, offset: u64, value: u32) {
        self.transport
            .lock()
            .unwrap()
            .mmio_write(offset, &value.to_le_bytes());
    }

    /// virtio 1.2 §3.1.1, as a well-behaved driver does it.
    fn init(&self, wanted: u64) {
        self.write(reg::STATUS, 0);
        let mut s = status::ACKNOWLEDGE | status::DRIVER;
        self.write(reg::STATUS, s);
        for sel in 0..2u32 {
            self.write(reg::DRIVER_FEATURES_SEL, sel);
            self.write(reg::DRIVER_FEATURES, (wanted >> (32 * sel)) as u32);
        }
        s |= status::FEATURES_OK;
        self.write(reg::STATUS, s);
        for (index, layout) in self.layouts.iter().enumerate() {
            self.write(reg::QUEUE_SEL, index as u32);
            self.write(reg::QUEUE_NUM, u32::from(layout.size));
            for (low, addr) in [
                (reg::QUEUE_DESC_LOW, layout.desc),
                (reg::QUEUE_DRIVER_LOW, layout.avail),
                (reg::QUEUE_DEVICE_LOW, layout.used),
            ] {
                self.write(low, addr as u32);
                self.write(low + 4, (addr >> 32) as u32);
            }
            self.write(reg::QUEUE_READY, 1);
        }
        self.write(reg::STATUS, s | status::DRIVER_OK);
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let config = input.u8();
    let mem = vmm_core::anonymous_memory(RAM, true).expect("guest RAM");
    let (ours, network) = UnixDatagram::pair().expect("socket pair");
    ours.set_nonblocking(true).expect("non-blocking");
    network.set_nonblocking(true).expect("non-blocking");
    let net = InlineNet::new(Box::new(ours), MAC);
    let device = net.handle();
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(mem.clone(), Box::new(net)).expect("transport"),
    ));
    let size = 2u16 << ((config >> 2) & 3);
    let mut d = Driver {
        mem,
        transport,
        layouts: [QueueRings::at(0x1000, size), QueueRings::at(0x3000, size)],
        avail_idx: [0; 2],
    };
    if config & 1 != 0 {
        let mut wanted = features::VERSION_1 | (1 << 5) | (1 << 16);
        if config & 2 != 0 {
            wanted |= features::RING_EVENT_IDX;
        }
        d.init(wanted);
    }
    let mut sent_seen = 0u64;
    let mut frame = vec![0u8; MAX_FRAME + 1];
    while !input.is_empty() {
        match input.u8() % 8 {
            0 => {
                let offset = u64::from(input.u8()) * 4;
                let value = input.u32();
                d.write(offset, value);
            }
            1 => {
                let offset = u64::from(input.u8()) * 4;
                let width = 1 << (input.u8() % 4);
                let mut b = vec![0u8; width];
                d.transport.lock().unwrap().mmio_read(offset, &mut b);
            }
            2 => {
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                let _ = d.mem.write_slice(bytes, GuestAddress(addr));
            }
            3 => {
                let sel = input.u8();
                let layout = d.layouts[usize::from(sel & 1)];
                let index = u64::from(sel >> 1) % u64::from(layout.size);
                let mut raw = [0u8; 16];
                raw[..8].copy_from_slice(&u64::from(input.u16()).to_le_bytes());
                raw[8..12].copy_from_slice(&u32::from(input.u16()).to_le_bytes());
                raw[12..14].copy_from_slice(&u16::from(input.u8()).to_le_bytes());
                raw[14..16].copy_from_slice(&u16::from(input.u8()).to_le_bytes());
                let _ = d
                    .mem
                    .write_slice(&raw, GuestAddress(layout.desc + 16 * index));
            }
            4 => {
                let sel = input.u8();
                let q = usize::from(sel & 1);
                let layout = d.layouts[q];
                if sel & 0x80 != 0 {
                    d.avail_idx[q] = input.u16();
                } else {
                    let slot = u64::from(d.avail_idx[q] % layout.size);
                    let head = u16::from(input.u8());
                    let _ = d
                        .mem
                        .write_obj(head.to_le(), GuestAddress(layout.avail + 4 + 2 * slot));
                    d.avail_idx[q] = d.avail_idx[q].wrapping_add(1);
                }
                let _ = d
                    .mem
                    .write_obj(d.avail_idx[q].to_le(), GuestAddress(layout.avail + 2));
            }
            5 => {
                d.write(reg::QUEUE_NOTIFY, TX_QUEUE as u32);
                device.process_tx();
            }
            6 => {
                let bytes = input.chunk(MAX_FRAME);
                let _ = network.send(bytes);
                device.process_rx();
            }
            _ => device.process_rx(),
        }
        while let Ok(n) = network.recv(&mut frame) {
            assert!(n <= MAX_FRAME, "a frame of {n} bytes on the link");
            sent_seen += 1;
        }
    }
    assert_eq!(
        device.stats().tx_frames,
        sent_seen,
        "frames counted but not sent"
    );
}
