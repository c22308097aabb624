//! The syscall fix for emulating hosts (kvm-here.md): KVM does half of a ring-3 `syscall` (RIP =
//! LSTAR, RCX/R11 set) but leaves CS/SS at the user selectors, so the instruction fetch at LSTAR
//! page-faults. A hardware breakpoint on the guest's #PF handler catches exactly that fault; the
//! VMM then finishes the `syscall` as the CPU would have.
//!
//! Owns: finding the #PF handler in an IDT gate, and the register state of a finished `syscall`.
//! Must not: issue KVM ioctls or read guest memory (the vCPU does, and hands the bytes in).

use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::layout::flat_segment;

/// Bit 1 of RFLAGS always reads as 1.
const RFLAGS_FIXED: u64 = 1 << 1;

/// Where the fix stands on one vCPU.
#[derive(Default)]
pub(crate) struct SyscallFix {
    /// Guest #PF handler the breakpoint sits on (linear address), once found in the guest IDT.
    pub pf_handler: Option<u64>,
    /// IDT base when we last looked, so we look again only when the guest loads a new IDT.
    pub idt_base_seen: Option<u64>,
}

/// The `syscall` MSRs of a vCPU (Intel SDM vol. 4, "Architectural MSRs").
pub(crate) struct SyscallMsrs {
    pub star: u64,
    pub lstar: u64,
    pub sfmask: u64,
}

/// The handler of a present 64-bit interrupt gate: offset 15:0 at bytes 0-1, 31:16 at 6-7, 63:32
/// at 8-11; P = bit 7 of byte 5 (Intel SDM vol. 3, "64-Bit Mode IDT"). None when not present.
pub(crate) fn gate_handler(gate: &[u8; 16]) -> Option<u64> {
    if gate[5] & 0x80 == 0 {
        return None;
    }
    Some(
        u64::from(u16::from_le_bytes([gate[0], gate[1]]))
            | u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16
            | u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32,
    )
}

/// Redoes the entry as `syscall` defines it (Intel SDM vol. 2, SYSCALL): CS = STAR[47:32] (flat
/// 64-bit code, DPL 0), SS = STAR[47:32] + 8, RFLAGS = the user's (from the fault's frame) &
/// ~SFMASK; RSP = the user's (from the frame); RIP = LSTAR; RCX and R11 were already set by
/// KVM's half.
pub(crate) fn finish_syscall(
    regs: &mut kvm_regs,
    sregs: &mut kvm_sregs,
    msrs: &SyscallMsrs,
    frame_rsp: u64,
    frame_rflags: u64,
) {
    let selector = ((msrs.star >> 32) & 0xfffc) as u16;
    sregs.cs = flat_segment(selector, 0xb, true, false);
    sregs.ss = flat_segment(selector + 8, 0x3, false, true);
    regs.rip = msrs.lstar;
    regs.rsp = frame_rsp;
    regs.rflags = (frame_rflags & !msrs.sfmask) | RFLAGS_FIXED;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_handler_reassembles_the_offset() {
        let handler: u64 = 0xffff_ffff_8160_1234;
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        gate[5] = 0x8e; // present, DPL 0, 64-bit interrupt gate
        gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
        assert_eq!(gate_handler(&gate), Some(handler));
        gate[5] = 0x0e;
        assert_eq!(gate_handler(&gate), None, "not present");
    }

    #[test]
    fn a_finished_syscall_runs_the_kernel_entry_in_ring_0() {
        // Linux's STAR: kernel CS 0x10 in bits 47:32, user base 0x23 in bits 63:48.
        let msrs = SyscallMsrs {
            star: 0x0023_0010_0000_0000,
            lstar: 0xffff_ffff_8180_0080,
            sfmask: 0x4_7700,
        };
        let mut regs = kvm_regs {
            rip: msrs.lstar,
            rcx: 0x40_1000,
            r11: 0x246,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0x33;
        finish_syscall(&mut regs, &mut sregs, &msrs, 0x7ffc_0000, 0x246 | 0x100);
        assert_eq!(sregs.cs.selector, 0x10);
        assert_eq!(sregs.cs.dpl, 0);
        assert_eq!(sregs.cs.l, 1, "64-bit code");
        assert_eq!(sregs.ss.selector, 0x18);
        assert_eq!(regs.rip, msrs.lstar);
        assert_eq!(regs.rsp, 0x7ffc_0000);
        assert_eq!(regs.rflags, 0x246 & !0x4_7700 | 0x2, "IF and TF masked");
        assert_eq!((regs.rcx, regs.r11), (0x40_1000, 0x246), "KVM's half kept");
    }
}
