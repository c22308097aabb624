//! x86_64 bare-metal support: PVH entry to long mode ([`entry`]), CPU tables ([`cpu`]), the
//! ring-0 boot-data capture ([`boot`]), the console ([`serial`]) and the drop to ring 3.
//!
//! Ring 0 does set-up only (its instructions are emulated on some hosts, ~600 ns each): load the
//! GDT, IDT and TSS (static tables), copy the boot data ring 3 needs, `iretq`. Everything after runs in ring 3.

pub mod boot;
pub mod cpu;
mod entry;
mod port;
pub mod serial;

use core::cell::UnsafeCell;
use core::fmt::Write;

use vigil_wire::boot::{exit_code, EXIT_PORT};

pub use boot::BootCapture;
use serial::Com1;

/// Written by ring 0 before ring 3 starts, read-only afterwards; in user-readable `.bss`.
struct CaptureCell(UnsafeCell<BootCapture>);
// SAFETY: one CPU; ring 0 writes it before handing ring 3 a shared reference, nobody writes after.
unsafe impl Sync for CaptureCell {}

static BOOT_CAPTURE: CaptureCell = CaptureCell(UnsafeCell::new(BootCapture::EMPTY));

/// 64-bit ring-0 entry (from `long_mode_start` in entry.rs) with the `hvm_start_info` address.
extern "C" fn kernel_main(start_info_paddr: u32) -> ! {
    // SAFETY: ring 3 has not started; this is the only reference.
    let capture = unsafe { &mut *BOOT_CAPTURE.0.get() };
    // SAFETY: ring 0 with the boot page tables.
    if let Err(error) = unsafe { boot::capture(u64::from(start_info_paddr), capture) } {
        let _ = writeln!(Com1, "fw-guest: bad boot information: {error}");
        exit(exit_code::BAD_BOOT_INFO);
    }
    let entry: extern "C" fn(&'static BootCapture) -> ! = crate::ring3_start;
    // The ABI expects RSP ≡ 8 (mod 16) at a function's first instruction (just after a call).
    let stack = entry::user_stack_top.as_ptr() as u64 - 8;
    // SAFETY: entry and stack are in user pages; the capture is complete and stays unchanged.
    unsafe {
        entry::enter_ring3(
            entry as usize as u64,
            stack,
            capture as *const BootCapture as u64,
        )
    }
}

/// Stops the VM with `code` through the exit port (ring 0 or ring 3). If the write returns (no
/// exit device), spins without consuming more than a `pause` loop.
pub fn exit(code: u8) -> ! {
    port::outb(EXIT_PORT, code);
    loop {
        core::hint::spin_loop();
    }
}

/// The current privilege level, from the CS selector's RPL bits.
pub fn current_privilege_level() -> u16 {
    let cs: u16;
    // SAFETY: reading CS is allowed at every privilege level and has no side effects.
    unsafe {
        core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags))
    };
    cs & 3
}

/// First address of the image's supervisor-only data (for the ring-3 protection self-test).
pub fn kernel_data_start() -> u64 {
    entry::__kdata_start.as_ptr() as u64
}

/// First address of the image's code (for the ring-3 protection self-test).
pub fn text_start() -> u64 {
    entry::__text_start.as_ptr() as u64
}
