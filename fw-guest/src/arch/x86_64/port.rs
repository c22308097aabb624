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

/// Writes `bytes` to `port` with one `rep outsb`: the VMM sees one exit for the whole slice, where
/// `outb` costs one per byte (KVM completes a string write to a port in one exit per page).
pub fn outsb(port: u16, bytes: &[u8]) {
    // SAFETY: `rep outsb` reads `rcx` bytes from `rsi` (the slice, valid for reads) with the
    // direction flag clear (the ABI guarantees it at every call); port writes have no other
    // memory effects visible to Rust.
    unsafe {
        core::arch::asm!(
            "rep outsb",
            in("dx") port,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(nostack, preserves_flags, readonly)
        )
    };
}
