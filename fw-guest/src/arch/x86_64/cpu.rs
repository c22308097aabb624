//! Ring 0's CPU-level policy: segment selectors, ring 3's RFLAGS, and the exception handler that
//! completes ring 3's granted port I/O or reports the exception and stops. The tables themselves
//! (GDT, IDT, TSS) are static data in entry.rs, in the image's supervisor-only pages.

use core::fmt::Write;

use super::entry;
use super::port::{inb, outb, outsb};
use super::serial::{Com1, COM1};

/// GDT selectors (the layout in `entry.rs`: kernel code, kernel data, user data, user code, as
/// SYSRET expects them relative to STAR[63:48] = KERNEL_DS).
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18;
pub const USER_CS: u16 = 0x20;
pub const TSS_SELECTOR: u16 = 0x28;

/// Ring 3's RFLAGS: reserved bit 1 only. IOPL = 0: ring 3 reaches exactly the ports the TSS I/O
/// bitmap grants ([`user_port_allowed`]), and cannot `cli`/`sti`. IF = 0: nothing interrupts the
/// polling loop.
pub const USER_RFLAGS: u64 = 1 << 1;

/// What `isr_common` leaves on the stack (entry.rs): the general registers it pushes, the vector
/// and error code the stub pushes, then the CPU's interrupt frame.
#[repr(C)]
pub struct TrapFrame {
    rax: u64,
    rbx: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
    rbp: u64,
    r8: u64,
    r9: u64,
    r10: u64,
    r11: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const VECTOR_GP: u64 = 13;

/// Ports ring 3 is granted: COM1's eight registers and the exit port. The TSS I/O bitmap in
/// entry.rs grants the same set to the hardware.
pub fn user_port_allowed(port: u16) -> bool {
    (COM1..COM1 + 8).contains(&port) || port == vigil_wire::boot::EXIT_PORT
}

/// Completes a ring-3 `in`/`out` on a granted port that faulted with #GP(0).
///
/// On hardware virtualization and under QEMU TCG the TSS I/O bitmap lets ring 3's granted port
/// I/O through without a trap. On a KVM host that runs guest ring 3 natively in host user mode
/// (kvm_pvm, see docs/kvm-here.md) the guest's TSS does not reach the hardware and every ring-3
/// `in`/`out` raises #GP (measured: IOPL 3 in the iretq frame did not help either); ring 0 then
/// performs the access, for the granted ports only. Only the forms Com1 and exit use are
/// decoded: `in al, dx` (EC), `out dx, al` (EE), `in al, imm8` (E4), `out imm8, al` (E6), and
/// Com1's `rep outsb` to its data register (F3 6E) of at most [`MAX_USER_OUTS`] bytes.
fn emulate_user_port_io(frame: &mut TrapFrame) -> bool {
    if frame.vector != VECTOR_GP || frame.error != 0 || frame.cs & 3 != 3 {
        return false;
    }
    // Ring 3 can only execute the image's text (everything else it can reach is NX), but check
    // the instruction bytes lie there before ring 0 reads them.
    let text_start = entry::__text_start.as_ptr() as u64;
    let text_end = entry::__text_end.as_ptr() as u64;
    if frame.rip < text_start || frame.rip > text_end - 2 {
        return false;
    }
    // SAFETY: two bytes inside the mapped, readable text.
    let op = unsafe { core::ptr::read_volatile(frame.rip as *const [u8; 2]) };
    let dx = frame.rdx as u16;
    if op == [0xf3, 0x6e] {
        return emulate_user_outs(frame, dx);
    }
    let (length, port, is_in) = match op[0] {
        0xec => (1, dx, true),
        0xee => (1, dx, false),
        0xe4 => (2, u16::from(op[1]), true),
        0xe6 => (2, u16::from(op[1]), false),
        _ => return false,
    };
    if !user_port_allowed(port) {
        return false;
    }
    if is_in {
        frame.rax = (frame.rax & !0xff) | u64::from(inb(port));
    } else {
        outb(port, frame.rax as u8);
    }
    frame.rip += length;
    true
}

/// Most bytes ring 3 sends in one `rep outsb` (Com1 sends a 16-byte FIFO's worth at a time).
const MAX_USER_OUTS: u64 = 64;

/// Completes ring 3's `rep outsb` to Com1's data register: the bytes at RSI (ring 3's own,
/// readable memory: the string lies in its stack) sent with one `rep outsb`, one VM exit, then
/// RSI and RCX as the instruction leaves them.
fn emulate_user_outs(frame: &mut TrapFrame, port: u16) -> bool {
    let count = frame.rcx;
    if port != COM1 || count > MAX_USER_OUTS || frame.rsi.checked_add(count).is_none() {
        return false;
    }
    // SAFETY: at most MAX_USER_OUTS bytes from ring 3's pointer; ring 0 reads them with its own
    // rights (no SMAP). A pointer to memory nothing maps faults here and stops the VM, as any
    // ring-0 fault does.
    let bytes = unsafe { core::slice::from_raw_parts(frame.rsi as *const u8, count as usize) };
    outsb(port, bytes);
    frame.rsi += count;
    frame.rcx = 0;
    frame.rip += 2;
    true
}

/// Mnemonics of the architectural exception vectors (SDM vol. 3, table 6-1).
const EXCEPTION_NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "-", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "-", "-", "-", "-", "-", "-",
    "#HV", "#VC", "#SX", "-",
];

/// Called by `isr_common` for every exception. Returns only after completing a ring-3 port access
/// (the stub then resumes the trapped code); anything else is reported on the serial console and
/// stops the VM.
pub extern "C" fn exception_handler(frame: &mut TrapFrame) {
    if emulate_user_port_io(frame) {
        return;
    }
    let cr2: u64;
    // SAFETY: reading CR2 in ring 0 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags))
    };
    let name = EXCEPTION_NAMES
        .get(frame.vector as usize)
        .copied()
        .unwrap_or("?");
    let _ = writeln!(
        Com1,
        "fw-guest: CPU exception {} ({}) error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} cr2={:#x}",
        frame.vector, name, frame.error, frame.rip, frame.cs, frame.rflags, frame.rsp, cr2
    );
    super::exit(vigil_wire::boot::exit_code::CPU_EXCEPTION)
}
