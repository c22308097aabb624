//! COM1 (8250/16550 UART) output by polled port I/O. Usable from ring 0 and from ring 3 (the TSS
//! I/O bitmap grants ring 3 these ports). No initialisation: both QEMU's and the Vigil VMM's UARTs transmit without a
//! programmed baud rate, and every register access is a VM exit worth avoiding.

use super::port::{inb, outsb};

/// COM1 base port (PC/AT convention).
pub const COM1: u16 = 0x3f8;
/// Line status register offset and its "transmit holding register empty" bit (16550 datasheet).
const LSR: u16 = 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// Polls of LSR before a chunk is sent anyway: a UART that never reports empty must not hang the
/// guest (an absent one reads 0xff, which does report empty).
const MAX_POLLS: u32 = 100_000;
/// Bytes sent at once when THR reports empty: a 16550A's transmit FIFO (the Vigil VMM's UART
/// drains each write at once). One `in` and one `rep outsb` per chunk: two exits per 16 bytes,
/// where a byte at a time cost two per byte (a console line was ~150 exits of the boot).
const FIFO: usize = 16;

/// The COM1 console.
pub struct Com1;

impl Com1 {
    fn send(chunk: &[u8]) {
        for _ in 0..MAX_POLLS {
            if inb(COM1 + LSR) & LSR_THR_EMPTY != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        outsb(COM1, chunk);
    }

    pub fn write_bytes(bytes: &[u8]) {
        let mut chunk = [0u8; FIFO];
        let mut len = 0;
        let mut push = |byte: u8| {
            if len == FIFO {
                Self::send(&chunk);
                len = 0;
            }
            chunk[len] = byte;
            len += 1;
        };
        for &byte in bytes {
            if byte == b'\n' {
                push(b'\r');
            }
            push(byte);
        }
        if len > 0 {
            Self::send(&chunk[..len]);
        }
    }
}

impl core::fmt::Write for Com1 {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        Self::write_bytes(s.as_bytes());
        Ok(())
    }
}
