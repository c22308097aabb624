//! COM1 (8250/16550 UART) output by polled port I/O. Usable from ring 0 and from ring 3 (the TSS
//! I/O bitmap grants ring 3 these ports). No initialisation: both QEMU's and the Vigil VMM's UARTs transmit without a
//! programmed baud rate, and every register access is a VM exit worth avoiding.
//!
//! Ring 3's own lines go through [`Console`]: a whole line at once, by address, where the Vigil
//! VMM offers it (`BOOT_FLAG_CONSOLE_MMIO`: one exit a line, where the UART took two for every 16
//! bytes on a hardware host and one a byte on an emulating one: about 7 of the 20 ms from
//! create to first forward there), else through the UART. Panics and CPU exceptions keep the
//! UART: it needs nothing set up.

use core::sync::atomic::{compiler_fence, AtomicBool, Ordering};

use vigil_wire::boot::{console_write, CONSOLE_MAX, CONSOLE_MMIO_ADDR};

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

/// Whether the VMM takes console writes by address (set once by ring 3 from the boot
/// information, before its first line).
static BY_ADDRESS: AtomicBool = AtomicBool::new(false);

/// Sends [`Console`] lines by address from now on (the VMM offered it).
pub fn use_console_by_address() {
    BY_ADDRESS.store(true, Ordering::Relaxed);
}

/// A console line, gathered and sent whole: when full, and when dropped. Use a fresh one per
/// `writeln!` (`let _ = writeln!(Console::new(), ...)`).
pub struct Console {
    bytes: [u8; CONSOLE_MAX],
    len: usize,
}

impl Console {
    pub const fn new() -> Console {
        Console {
            bytes: [0; CONSOLE_MAX],
            len: 0,
        }
    }

    fn flush(&mut self) {
        if self.len == 0 {
            return;
        }
        if BY_ADDRESS.load(Ordering::Relaxed) {
            // Identity-mapped: the buffer's address is its guest-physical address (ring 3's
            // stack and data lie below 4 GiB).
            let value = console_write(self.bytes.as_ptr() as u32, self.len as u32);
            // The bytes are in memory before the write that makes the VMM read them.
            compiler_fence(Ordering::SeqCst);
            // SAFETY: a 64-bit MMIO write to the VMM's console address (outside RAM, mapped for
            // ring 3 with the device range); it has no effect on memory.
            unsafe { core::ptr::write_volatile(CONSOLE_MMIO_ADDR as *mut u64, value) };
        } else {
            Com1::write_bytes(&self.bytes[..self.len]);
        }
        self.len = 0;
    }
}

impl Default for Console {
    fn default() -> Self {
        Console::new()
    }
}

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &byte in s.as_bytes() {
            // As the UART path sends it: CR LF.
            let crlf: &[u8] = if byte == b'\n' {
                b"\r\n"
            } else {
                core::slice::from_ref(&byte)
            };
            for &b in crlf {
                if self.len == CONSOLE_MAX {
                    self.flush();
                }
                self.bytes[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}
