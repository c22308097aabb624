//! Port I/O. Ring 0 may always use it; ring 3 only on the ports the TSS I/O bitmap grants
//! (cpu::user_port_allowed).

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port reads have no memory effects; the ports used (COM1) are side-effect free to read.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

pub fn outb(port: u16, value: u8) {
    // SAFETY: port writes have no memory effects visible to Rust.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}
